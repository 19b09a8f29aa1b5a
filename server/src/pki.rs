//! Throwaway fleet PKI for trials and tests: one CA, a server certificate, an operator
//! certificate and one agent certificate per node, written as PEM files; plus the Ed25519
//! command-signing key pair (see [`crate::command`]).
//!
//! Production fleets bring their own CA; the server only needs its PEM and the certificates'
//! URI SANs to follow [`crate::identity`].

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::identity::{
    NETWORK_URI_PREFIX, NODE_URI_PREFIX, NodeId, OPERATOR_URI_PREFIX, validate_name,
};

/// What [`init`] wrote.
#[derive(Debug, Clone)]
pub struct PkiFiles {
    /// The folder.
    pub dir: PathBuf,
    /// Every file written, in order.
    pub written: Vec<PathBuf>,
}

impl PkiFiles {
    /// `DIR/ca.pem`.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    /// `(DIR/server.pem, DIR/server-key.pem)`.
    pub fn server(&self) -> (PathBuf, PathBuf) {
        pair(&self.dir, "server")
    }
    /// `(DIR/operator.pem, DIR/operator-key.pem)`.
    pub fn operator(&self) -> (PathBuf, PathBuf) {
        pair(&self.dir, "operator")
    }
    /// `(DIR/node-NAME.pem, DIR/node-NAME-key.pem)`.
    pub fn node(&self, node: &str) -> (PathBuf, PathBuf) {
        pair(&self.dir, &format!("node-{node}"))
    }
    /// `DIR/command-signing-key.pk8`: the server's Ed25519 command key, PKCS#8 DER, mode 0600
    /// (load it with [`crate::actuate::sign::CommandSigner::load`]).
    pub fn command_signing_key(&self) -> PathBuf {
        self.dir.join("command-signing-key.pk8")
    }
    /// `DIR/command-verify.pub`: its public half as 64 lowercase hex characters and a newline
    /// (hex text, so it can be pasted into config management and compared by eye); every
    /// agent's `commands.verify_key_file`.
    pub fn command_verify_key(&self) -> PathBuf {
        self.dir.join("command-verify.pub")
    }
}

fn pair(dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}-key.pem")),
    )
}

/// Why the PKI could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A node or operator name is invalid.
    #[error(transparent)]
    Name(#[from] crate::identity::IdentityError),
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The folder already holds a CA; refusing to overwrite it.
    #[error("{0} already exists; pass --force to replace the whole PKI, or pick another --dir")]
    Exists(PathBuf),
}

/// Options for [`init`].
#[derive(Debug, Clone)]
pub struct PkiRequest {
    /// Node ids to issue agent certificates for.
    pub nodes: Vec<String>,
    /// Operator name for the operator certificate.
    pub operator: String,
    /// Extra DNS names for the server certificate (besides localhost and 127.0.0.1).
    pub server_names: Vec<String>,
    /// Overwrite an existing CA.
    pub force: bool,
    /// Binds every node certificate to this chain network (a second URI SAN,
    /// `spiffe://taonode-guardian/network/<name>`): the server then refuses a Hello naming any
    /// other network. `None`: the agent's Hello says it, unchecked.
    pub network: Option<String>,
}

/// Writes a fresh PKI into `dir` (created if missing). Private keys are written mode 0600.
///
/// # Errors
/// [`PkiError`] on an invalid name, an existing CA without `force`, or an I/O failure.
pub fn init(dir: &Path, request: &PkiRequest) -> Result<PkiFiles, PkiError> {
    for node in &request.nodes {
        NodeId::parse(node)?;
    }
    if let Some(network) = &request.network {
        validate_name(network)?;
    }
    validate_name(&request.operator)?;
    let mut files = PkiFiles {
        dir: dir.to_owned(),
        written: Vec::new(),
    };
    if files.ca().exists() && !request.force {
        return Err(PkiError::Exists(files.ca()));
    }
    fs::create_dir_all(dir).map_err(|source| PkiError::Write {
        path: dir.to_owned(),
        source,
    })?;

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "TaoNode Guardian throwaway fleet CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca_path = files.ca();
    write(&mut files, &ca_path, ca_cert.pem().as_bytes(), false)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let mut server_names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    server_names.extend(request.server_names.iter().cloned());
    let mut server = CertificateParams::new(server_names)?;
    server
        .distinguished_name
        .push(DnType::CommonName, "guardian-server");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    issue(&mut files, &issuer, server, "server")?;

    let operator_uri = format!("{OPERATOR_URI_PREFIX}{}", request.operator);
    issue(
        &mut files,
        &issuer,
        client_params(&request.operator, &operator_uri)?,
        "operator",
    )?;
    for node in &request.nodes {
        let uri = format!("{NODE_URI_PREFIX}{node}");
        let mut params = client_params(node, &uri)?;
        if let Some(network) = &request.network {
            params.subject_alt_names.push(SanType::URI(
                format!("{NETWORK_URI_PREFIX}{network}").try_into()?,
            ));
        }
        issue(&mut files, &issuer, params, &format!("node-{node}"))?;
    }

    let command_key = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    let (signing, verify) = (files.command_signing_key(), files.command_verify_key());
    write(&mut files, &signing, command_key.serialized_der(), true)?;
    let public = format!(
        "{}\n",
        crate::actuate::sign::hex(rcgen::PublicKeyData::der_bytes(&command_key))
    );
    write(&mut files, &verify, public.as_bytes(), false)?;
    Ok(files)
}

fn client_params(common_name: &str, uri: &str) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.subject_alt_names = vec![SanType::URI(uri.try_into()?)];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    Ok(params)
}

fn issue(
    files: &mut PkiFiles,
    issuer: &Issuer<'_, KeyPair>,
    params: CertificateParams,
    stem: &str,
) -> Result<(), PkiError> {
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    let (cert_path, key_path) = pair(&files.dir, stem);
    write(files, &cert_path, cert.pem().as_bytes(), false)?;
    write(files, &key_path, key.serialize_pem().as_bytes(), true)?;
    Ok(())
}

fn write(files: &mut PkiFiles, path: &Path, contents: &[u8], secret: bool) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| PkiError::Write {
        path: path.to_owned(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(err)?;
    file.write_all(contents).map_err(err)?;
    // `mode` applies only to new files: make --force over an old, looser key tight too.
    std::fs::set_permissions(
        path,
        std::os::unix::fs::PermissionsExt::from_mode(if secret { 0o600 } else { 0o644 }),
    )
    .map_err(err)?;
    files.written.push(path.to_owned());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Peer;

    #[test]
    fn issued_certificates_carry_the_identity_the_server_reads()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let files = init(
            dir.path(),
            &PkiRequest {
                nodes: vec!["val-1".into()],
                operator: "alice".into(),
                server_names: vec![],
                force: false,
                network: None,
            },
        )?;
        let der = |path: PathBuf| -> Result<Vec<u8>, Box<dyn std::error::Error>> {
            let pem = fs::read(path)?;
            let (_, pem) = x509_parser::pem::parse_x509_pem(&pem)?;
            Ok(pem.contents)
        };
        assert_eq!(
            Peer::from_cert_der(&der(files.node("val-1").0)?)?,
            Peer::Node(NodeId::parse("val-1")?)
        );
        assert_eq!(
            Peer::from_cert_der(&der(files.operator().0)?)?,
            Peer::Operator("alice".into())
        );
        assert!(Peer::from_cert_der(&der(files.server().0)?).is_err());
        assert_eq!(
            crate::identity::bound_network_of_cert_der(&der(files.node("val-1").0)?)?,
            None
        );
        let bound = tempfile::tempdir()?;
        let bound = init(
            bound.path(),
            &PkiRequest {
                nodes: vec!["val-2".into()],
                operator: "alice".into(),
                server_names: vec![],
                force: false,
                network: Some("finney".into()),
            },
        )?;
        let cert = der(bound.node("val-2").0)?;
        assert_eq!(
            Peer::from_cert_der(&cert)?,
            Peer::Node(NodeId::parse("val-2")?)
        );
        assert_eq!(
            crate::identity::bound_network_of_cert_der(&cert)?,
            Some("finney".to_owned())
        );
        assert_eq!(
            fs::read_to_string(files.command_verify_key())?,
            format!(
                "{}\n",
                crate::actuate::sign::verify_key_hex(&files.command_signing_key())?
            )
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(files.command_signing_key())?
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        assert!(matches!(
            init(
                dir.path(),
                &PkiRequest {
                    nodes: vec![],
                    operator: "a".into(),
                    server_names: vec![],
                    force: false,
                    network: None,
                }
            ),
            Err(PkiError::Exists(_))
        ));
        Ok(())
    }
}
