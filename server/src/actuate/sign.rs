//! Signs agent commands: one Ed25519 signing key, one signed envelope per command.
//!
//! The server signs the protobuf bytes of a [`CommandEnvelope`]; the agent verifies those exact
//! bytes before decoding them (see `guardian_agent::command`), so no canonical encoding is
//! needed. The signing key is the PKCS#8 file `guardianctl pki init` writes
//! (`command-signing-key.pk8`); agents hold its public half (`command-verify.pub`).
//!
//! # Guarantees
//! - Every command gets a fresh random 128-bit id, so two issues never share an id.
//! - [`CommandSigner::issue`] refuses lifetimes the agent would refuse (zero, or over
//!   [`MAX_TTL`]) and envelopes missing the parameter their action needs.

use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use guardian_proto::v1::{Command, CommandEnvelope};
use prost::Message;
use rcgen::{KeyPair, PKCS_ED25519, PublicKeyData, SigningKey};

use crate::identity::NodeId;
use crate::reconcile::{Action, UnknownAction};

/// Longest lifetime an agent accepts (`expires_at - issued_at`).
pub const MAX_TTL: Duration = Duration::from_secs(3600);

/// Why a command could not be signed or the signing key not loaded.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The key file could not be read.
    #[error("cannot read command signing key {path}: {source}")]
    ReadKey {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The key file is not an Ed25519 PKCS#8 key.
    #[error(
        "{path} is not an Ed25519 PKCS#8 (DER) key: {reason}; guardianctl pki init writes one as command-signing-key.pk8"
    )]
    BadKey {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An action string that is not one of [`Action::ALL`].
    #[error(transparent)]
    UnknownAction(#[from] UnknownAction),
    /// The action needs a parameter that was not given.
    #[error("action {action} needs the parameter {parameter:?}")]
    MissingParameter {
        /// The action.
        action: Action,
        /// The parameter it needs.
        parameter: &'static str,
    },
    /// A parameter key the agent cannot pass on (hooks get `GUARDIAN_PARAM_<KEY>`).
    #[error("parameter key {0:?} must be 1 to 64 characters of A-Z, a-z, 0-9 and '_'")]
    BadParameterKey(String),
    /// A lifetime the agent would refuse.
    #[error("ttl {ttl_ms} ms is outside 1..={max_ms} ms")]
    Ttl {
        /// The requested lifetime.
        ttl_ms: u128,
        /// [`MAX_TTL`] in ms.
        max_ms: u128,
    },
    /// The system random source failed.
    #[error("cannot read /dev/urandom for a command id: {0}")]
    Random(std::io::Error),
    /// The signature could not be made.
    #[error("signing failed: {0}")]
    Sign(#[from] rcgen::Error),
}

impl CommandError {
    /// Stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            CommandError::ReadKey { .. } => "read_key",
            CommandError::BadKey { .. } => "bad_key",
            CommandError::UnknownAction(_) => "unknown_action",
            CommandError::MissingParameter { .. } => "missing_parameter",
            CommandError::BadParameterKey(_) => "bad_parameter_key",
            CommandError::Ttl { .. } => "ttl",
            CommandError::Random(_) => "random",
            CommandError::Sign(_) => "sign",
        }
    }
}

/// Signs command envelopes with the server's Ed25519 command key.
pub struct CommandSigner {
    key: KeyPair,
}

impl fmt::Debug for CommandSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandSigner")
            .field("public_key", &hex(self.public_key()))
            .finish_non_exhaustive()
    }
}

impl CommandSigner {
    /// Loads the PKCS#8 (DER) Ed25519 key at `path`.
    ///
    /// # Errors
    /// [`CommandError::ReadKey`] or [`CommandError::BadKey`].
    pub fn load(path: &Path) -> Result<Self, CommandError> {
        let der = std::fs::read(path).map_err(|source| CommandError::ReadKey {
            path: path.to_owned(),
            source,
        })?;
        Self::from_pkcs8(&der).map_err(|reason| CommandError::BadKey {
            path: path.to_owned(),
            reason,
        })
    }

    /// The signer `command_signing_key_file` names, or `None` when it is empty (commands
    /// off).
    ///
    /// # Errors
    /// [`CommandError::ReadKey`] or [`CommandError::BadKey`].
    pub fn from_config(path: &Path) -> Result<Option<Self>, CommandError> {
        if path.as_os_str().is_empty() {
            return Ok(None);
        }
        Self::load(path).map(Some)
    }

    /// A signer from PKCS#8 DER bytes.
    ///
    /// # Errors
    /// Why the bytes are not an Ed25519 PKCS#8 key.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, String> {
        let key = KeyPair::try_from(der).map_err(|e| e.to_string())?;
        if !key.is_compatible(&PKCS_ED25519) {
            return Err(format!("it is a {:?} key, not Ed25519", key.algorithm()));
        }
        Ok(Self { key })
    }

    /// The raw 32-byte Ed25519 public key agents verify with.
    pub fn public_key(&self) -> &[u8] {
        self.key.der_bytes()
    }

    /// Builds, encodes and signs one command for `node`, valid from `now_unix_ms` for `ttl`.
    /// Returns the envelope (for the ledger) and the wire [`Command`] (for the stream).
    ///
    /// # Errors
    /// [`CommandError`] for a lifetime outside 1 ms..=[`MAX_TTL`], a missing required
    /// parameter, a parameter key hooks could not receive, or a failed random source.
    pub fn issue(
        &self,
        node: &NodeId,
        action: Action,
        parameters: HashMap<String, String>,
        ttl: Duration,
        now_unix_ms: i64,
    ) -> Result<(CommandEnvelope, Command), CommandError> {
        if ttl.is_zero() || ttl > MAX_TTL {
            return Err(CommandError::Ttl {
                ttl_ms: ttl.as_millis(),
                max_ms: MAX_TTL.as_millis(),
            });
        }
        if let Some(parameter) = action.required_parameter()
            && parameters.get(parameter).is_none_or(|v| v.is_empty())
        {
            return Err(CommandError::MissingParameter { action, parameter });
        }
        if let Some(key) = parameters.keys().find(|k| !valid_parameter_key(k)) {
            return Err(CommandError::BadParameterKey(key.clone()));
        }
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let envelope = CommandEnvelope {
            command_id: random_id()?,
            node_id: node.as_str().to_owned(),
            action: action.as_str().to_owned(),
            parameters,
            issued_at_unix_ms: now_unix_ms,
            expires_at_unix_ms: now_unix_ms.saturating_add(ttl_ms),
        };
        let bytes = envelope.encode_to_vec();
        let signature = self.key.sign(&bytes)?;
        Ok((
            envelope,
            Command {
                envelope: bytes,
                signature,
            },
        ))
    }
}

/// The lowercase hex of the public half of the signing key at `path`: what agents verify
/// with (`command-verify.pub`).
///
/// # Errors
/// [`CommandError::ReadKey`] or [`CommandError::BadKey`].
pub fn verify_key_hex(path: &Path) -> Result<String, CommandError> {
    CommandSigner::load(path).map(|signer| hex(signer.public_key()))
}

/// Parameter keys become environment variable names on the agent.
fn valid_parameter_key(key: &str) -> bool {
    (1..=64).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// 128 random bits as 32 lowercase hex characters, from the kernel's CSPRNG.
fn random_id() -> Result<String, CommandError> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(CommandError::Random)?;
    Ok(hex(&bytes))
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> CommandSigner {
        let key = KeyPair::generate_for(&PKCS_ED25519).expect("generate");
        CommandSigner::from_pkcs8(key.serialized_der()).expect("load")
    }

    #[test]
    fn command_ids_are_random_hex_and_the_envelope_bytes_decode_back() {
        let signer = signer();
        let node = NodeId::parse("val-1").expect("node");
        let params = HashMap::from([("unit".to_owned(), "subtensor.service".to_owned())]);
        let (a, wire) = signer
            .issue(&node, Action::RestartUnit, params.clone(), MAX_TTL, 1_000)
            .expect("issue");
        let (b, _) = signer
            .issue(&node, Action::RestartUnit, params, MAX_TTL, 1_000)
            .expect("issue");
        assert_eq!(a.command_id.len(), 32);
        assert!(a.command_id.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a.command_id, b.command_id);
        assert_eq!(a.expires_at_unix_ms, 1_000 + 3_600_000);
        assert_eq!(
            CommandEnvelope::decode(wire.envelope.as_slice()).expect("decode"),
            a
        );
        assert_eq!(wire.signature.len(), 64);
        assert_eq!(signer.public_key().len(), 32);
    }

    #[test]
    fn command_the_agent_would_refuse_is_not_issued() {
        let signer = signer();
        let node = NodeId::parse("val-1").expect("node");
        let issue = |action, params: &[(&str, &str)], ttl| {
            let params = params
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            signer
                .issue(&node, action, params, ttl, 0)
                .expect_err("must fail")
                .kind()
        };
        assert_eq!(issue(Action::RunHook, &[], MAX_TTL), "missing_parameter");
        assert_eq!(
            issue(Action::RunHook, &[("hook", "x"), ("a-b", "1")], MAX_TTL),
            "bad_parameter_key"
        );
        assert_eq!(issue(Action::CollectDiagnostics, &[], MAX_TTL * 2), "ttl");
        assert_eq!(
            "restart-container".parse::<Action>().expect("parse"),
            Action::RestartContainer
        );
        assert!("reboot".parse::<Action>().is_err());
    }
}
