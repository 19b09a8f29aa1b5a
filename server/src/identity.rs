//! Who is on the other end of a TLS connection: a [`NodeId`] or an operator, read from the
//! URI SAN of a client certificate already chained to the fleet CA by rustls.
//!
//! Certificates name their holder with one URI SAN:
//! `spiffe://taonode-guardian/node/<node-id>` for agents and
//! `spiffe://taonode-guardian/operator/<name>` for operators. Nothing an agent *says* is
//! trusted for identity; only what its certificate proves.

use std::fmt;

use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// URI prefix of an agent certificate's SAN.
pub const NODE_URI_PREFIX: &str = "spiffe://taonode-guardian/node/";
/// URI prefix of an operator certificate's SAN.
pub const OPERATOR_URI_PREFIX: &str = "spiffe://taonode-guardian/operator/";
/// URI SAN prefix binding an agent certificate to a chain network:
/// `spiffe://taonode-guardian/network/<name>`. A node whose certificate carries one may only
/// say that network in its Hello.
pub const NETWORK_URI_PREFIX: &str = "spiffe://taonode-guardian/network/";

/// A validated node identifier: 1..=63 characters of `[a-z0-9._-]`, starting alphanumeric.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(String);

impl NodeId {
    /// Parses and validates a node id.
    ///
    /// # Errors
    /// [`IdentityError::BadName`] naming the rule that was broken.
    pub fn parse(raw: &str) -> Result<Self, IdentityError> {
        validate_name(raw)?;
        Ok(Self(raw.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks the naming rule shared by node ids and operator names.
///
/// # Errors
/// [`IdentityError::BadName`] with the reason.
pub fn validate_name(raw: &str) -> Result<(), IdentityError> {
    guardian_proto::check_name(raw).map_err(|why| IdentityError::BadName {
        name: raw.to_owned(),
        why: why.to_owned(),
    })
}

/// The authenticated holder of a client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// An agent, allowed to stream on `Uplink` only.
    Node(NodeId),
    /// An operator, allowed to call the Fleet API.
    Operator(String),
}

impl Peer {
    /// Reads the identity from a DER certificate (the leaf of the verified chain).
    ///
    /// # Errors
    /// [`IdentityError`] when the certificate cannot be parsed or carries no guardian URI SAN.
    pub fn from_cert_der(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| IdentityError::BadCertificate(e.to_string()))?
            .ok_or(IdentityError::NoGuardianSan)?;
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                if let Some(node) = uri.strip_prefix(NODE_URI_PREFIX) {
                    return Ok(Self::Node(NodeId::parse(node)?));
                }
                if let Some(operator) = uri.strip_prefix(OPERATOR_URI_PREFIX) {
                    validate_name(operator)?;
                    return Ok(Self::Operator(operator.to_owned()));
                }
            }
        }
        Err(IdentityError::NoGuardianSan)
    }

    /// Identity from the peer certificates tonic saw on this request's connection.
    ///
    /// # Errors
    /// [`IdentityError::NoClientCertificate`] when the connection had none.
    pub fn from_request<T>(request: &tonic::Request<T>) -> Result<Self, IdentityError> {
        let certs = request
            .peer_certs()
            .ok_or(IdentityError::NoClientCertificate)?;
        let leaf = certs.first().ok_or(IdentityError::NoClientCertificate)?;
        Self::from_cert_der(leaf.as_ref())
    }

    /// The chain network the client certificate binds its holder to (a
    /// [`NETWORK_URI_PREFIX`] URI SAN), if it names one.
    ///
    /// # Errors
    /// [`IdentityError`] when there is no certificate or it cannot be parsed, or the network
    /// name breaks the naming rule.
    pub fn bound_network<T>(request: &tonic::Request<T>) -> Result<Option<String>, IdentityError> {
        let certs = request
            .peer_certs()
            .ok_or(IdentityError::NoClientCertificate)?;
        let leaf = certs.first().ok_or(IdentityError::NoClientCertificate)?;
        bound_network_of_cert_der(leaf.as_ref())
    }

    /// How the peer appears in logs and the ledger (`node/<id>` or `operator/<name>`).
    pub fn label(&self) -> String {
        match self {
            Self::Node(id) => format!("node/{id}"),
            Self::Operator(name) => format!("operator/{name}"),
        }
    }
}

/// The network a DER certificate binds its holder to ([`Peer::bound_network`]).
///
/// # Errors
/// [`IdentityError`] when the certificate cannot be parsed or the name is invalid.
pub fn bound_network_of_cert_der(der: &[u8]) -> Result<Option<String>, IdentityError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    let Some(san) = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?
    else {
        return Ok(None);
    };
    for name in &san.value.general_names {
        if let GeneralName::URI(uri) = name
            && let Some(network) = uri.strip_prefix(NETWORK_URI_PREFIX)
        {
            validate_name(network)?;
            return Ok(Some(network.to_owned()));
        }
    }
    Ok(None)
}

/// Why a peer has no usable identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The connection presented no client certificate.
    #[error(
        "no client certificate on the connection; connect with mTLS and a certificate from the fleet CA"
    )]
    NoClientCertificate,
    /// The certificate could not be parsed.
    #[error("client certificate cannot be parsed: {0}")]
    BadCertificate(String),
    /// The certificate has no `spiffe://taonode-guardian/...` URI SAN.
    #[error(
        "client certificate has no URI SAN starting with {NODE_URI_PREFIX} or {OPERATOR_URI_PREFIX}; issue it with `guardianctl pki init`"
    )]
    NoGuardianSan,
    /// A name breaks the naming rule.
    #[error("invalid name {name:?}: {why}")]
    BadName {
        /// The offending name.
        name: String,
        /// The rule it breaks.
        why: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_follow_the_naming_rule() {
        assert!(NodeId::parse("validator-01.eu").is_ok());
        for bad in ["", "Upper", "-lead", "has space", &"x".repeat(64)] {
            assert!(NodeId::parse(bad).is_err(), "{bad:?} must be refused");
        }
    }
}
