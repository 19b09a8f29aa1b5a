//! Verifies signed commands and runs the allow-listed ones, each command id at most once.
//!
//! Two halves: [`CommandVerifier::verify`] decides whether a [`Command`] from the server is
//! genuine, meant for this node, current and new (recording its id before it returns), and
//! [`Executor`] runs a verified envelope if this agent's `[commands]` config allows it
//! ([`Executor::plan`] is the pure decision, [`Executor::execute`] the act). Either way the
//! result is a [`CommandOutcome`] for the server. A `cancel-command` is answered by
//! [`Executor::cancel`] instead, which needs both halves: it records its target in the seen
//! ids (so the target never runs) and stops the target if it is running.
//!
//! # Guarantees
//! - The signature is checked over the exact envelope bytes received, before decoding.
//! - A command id is written (fsync'd) to the seen-ids file before `verify` returns it, so a
//!   crash or reconnect mid-execution never runs it twice; it may then run zero times.
//! - A cancelled command's id is written (fsync'd) the same way before the cancel's outcome
//!   is reported, so a cancelled command that arrives later (even after a restart) is refused.
//! - Nothing runs through a shell: programs get their arguments as separate `argv` entries,
//!   hooks get parameters only as `GUARDIAN_PARAM_<KEY>` environment variables (keys that
//!   differ only in case are refused, as they would set the same variable).
//! - A unit or container is named exactly: glob characters (`*?[]\`), which `systemctl`
//!   would expand, are refused in the allow-lists and in parameters.
//! - Output kept and reported is bounded ([`OUTPUT_TAIL_BYTES`], [`DIAGNOSTICS_MAX_BYTES`]).
//!
//! Layout: `verify.rs` holds the first half ([`CommandVerifier`], the seen-ids file
//! [`SeenIds`], the verify key), `run.rs` the second ([`Executor`]: allow-lists, processes,
//! timeouts, bounded output), `config.rs` the `[commands]` table ([`CommandsConfig`]). This
//! module holds what both halves share ([`Refusal`], [`refusal_outcome`], the command id
//! syntax) and [`Executor::cancel`], the one step that needs both.

mod config;
mod run;
mod verify;

use guardian_proto::v1::{Command, CommandEnvelope, CommandOutcome};
use prost::Message;

pub use config::CommandsConfig;
pub use run::{
    DIAGNOSTICS_MAX_BYTES, Executor, Invocation, OUTPUT_TAIL_BYTES, Plan, RESTART_TIMEOUT,
};
pub use verify::{
    CommandVerifier, MAX_CLOCK_SKEW_MS, MAX_TTL_MS, SEEN_RETENTION_MARGIN_MS, SeenIds, SetupError,
    load_verify_key,
};

/// The action that cancels another command (parameter `command_id`); answered by
/// [`Executor::cancel`], not [`Executor::execute`].
pub const CANCEL_COMMAND: &str = "cancel-command";

/// Why a command was not run. [`Refusal::kind`] is the stable label (logs, metrics, the
/// outcome's `refused` field).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The signature does not verify with this agent's key (forged or altered).
    #[error("signature does not verify with commands.verify_key_file: {0}")]
    BadSignature(String),
    /// Signed, but not a usable envelope.
    #[error("malformed envelope: {0}")]
    Malformed(String),
    /// Signed for another node.
    #[error("command is for node {got:?}, this agent is {expected:?}")]
    WrongNode {
        /// This agent's node id.
        expected: String,
        /// The envelope's node id.
        got: String,
    },
    /// Past its expiry.
    #[error("expired at {expires_at_unix_ms} (now {now_unix_ms}, {} ms ago)", ms_between(.now_unix_ms, .expires_at_unix_ms))]
    Expired {
        /// The envelope's expiry.
        expires_at_unix_ms: i64,
        /// The agent's clock.
        now_unix_ms: i64,
    },
    /// Issued further in the future than the allowed clock skew.
    #[error(
        "issued at {issued_at_unix_ms}, {} ms in this agent's future (allowed skew {MAX_CLOCK_SKEW_MS} ms); check both clocks",
        ms_between(.issued_at_unix_ms, .now_unix_ms)
    )]
    NotYetValid {
        /// The envelope's issue time.
        issued_at_unix_ms: i64,
        /// The agent's clock.
        now_unix_ms: i64,
    },
    /// A lifetime longer than [`MAX_TTL_MS`] (or negative).
    #[error("lifetime {lifetime_ms} ms is outside 0..={MAX_TTL_MS} ms")]
    LifetimeTooLong {
        /// `expires_at - issued_at`.
        lifetime_ms: i64,
    },
    /// This command id was seen before (now or before a restart).
    #[error("command {command_id} was already received; each command runs at most once")]
    Replayed {
        /// The id.
        command_id: String,
    },
    /// This command id was cancelled (by a `cancel-command`) before it arrived. After a
    /// restart the same command is refused as [`Refusal::Replayed`].
    #[error("command {command_id} was cancelled by command {by} before it arrived; it never runs")]
    Cancelled {
        /// The id.
        command_id: String,
        /// The id of the `cancel-command`.
        by: String,
    },
    /// The action, or its target, is not allowed by this agent's `[commands]` config.
    #[error("not allowed: {0}")]
    ActionNotAllowed(String),
    /// The id could not be recorded as seen, so running it could not be made once-only.
    #[error("cannot record the command id as seen: {0}")]
    SeenStoreFailed(String),
}

fn ms_between(later: &i64, earlier: &i64) -> i64 {
    later.saturating_sub(*earlier)
}

impl Refusal {
    /// Stable label: `bad_signature`, `malformed`, `wrong_node`, `expired`, `not_yet_valid`,
    /// `lifetime_too_long`, `replayed`, `cancelled`, `action_not_allowed`, `seen_store_failed`.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::BadSignature(_) => "bad_signature",
            Refusal::Malformed(_) => "malformed",
            Refusal::WrongNode { .. } => "wrong_node",
            Refusal::Expired { .. } => "expired",
            Refusal::NotYetValid { .. } => "not_yet_valid",
            Refusal::LifetimeTooLong { .. } => "lifetime_too_long",
            Refusal::Replayed { .. } => "replayed",
            Refusal::Cancelled { .. } => "cancelled",
            Refusal::ActionNotAllowed(_) => "action_not_allowed",
            Refusal::SeenStoreFailed(_) => "seen_store_failed",
        }
    }

    /// The outcome that reports this refusal for `command_id`.
    pub fn outcome(&self, command_id: &str) -> CommandOutcome {
        CommandOutcome {
            command_id: command_id.to_owned(),
            succeeded: false,
            detail: format!("refused ({}): {self}", self.kind()),
            refused: self.kind().to_owned(),
        }
    }
}

/// The outcome for a command [`CommandVerifier::verify`] refused. The id comes from the
/// envelope even when its signature failed (then it is unverified, and empty if undecodable).
pub fn refusal_outcome(command: &Command, refusal: &Refusal) -> CommandOutcome {
    let id = CommandEnvelope::decode(command.envelope.as_slice())
        .map(|e| e.command_id)
        .unwrap_or_default();
    refusal.outcome(&id)
}
/// Command ids are printable tokens (the server issues 32 hex characters).
fn valid_command_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Executor {
    /// Answers a verified `cancel-command`: records its target as seen in `verifier` (so the
    /// target is refused if it arrives later), then stops the target if it is running (its
    /// process group is killed and its own outcome fails as cancelled). The outcome succeeds
    /// with `stopped running command X`, `command X will never run` or `command X already
    /// finished; nothing to stop`. Logs `CommandCancelled` or `CommandRefused`.
    pub fn cancel(
        &self,
        envelope: &CommandEnvelope,
        verifier: &mut CommandVerifier,
        now_unix_ms: i64,
    ) -> CommandOutcome {
        let refused = |refusal: Refusal| {
            tracing::warn!(
                kind = refusal.kind(),
                command_id = envelope.command_id,
                action = envelope.action,
                "CommandRefused: {refusal}"
            );
            refusal.outcome(&envelope.command_id)
        };
        let target = match self.plan(envelope) {
            Ok(Plan::Cancel { target }) => target,
            Ok(_) => {
                return refused(Refusal::Malformed(format!(
                    "action {} is not {CANCEL_COMMAND}",
                    envelope.action
                )));
            }
            Err(refusal) => return refused(refusal),
        };
        let never_received = match verifier.forbid(&target, envelope, now_unix_ms) {
            Ok(new) => new,
            Err(refusal) => return refused(refusal),
        };
        let detail = if self.stop(&target, &envelope.command_id) {
            format!("stopped running command {target}")
        } else if never_received {
            format!("command {target} will never run")
        } else {
            format!("command {target} already finished; nothing to stop")
        };
        tracing::info!(
            command_id = envelope.command_id,
            cancelled = target,
            "CommandCancelled: {detail}"
        );
        CommandOutcome {
            command_id: envelope.command_id.clone(),
            succeeded: true,
            detail,
            refused: String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{Ed25519KeyPair, KeyPair};
    use std::collections::HashMap;
    use std::path::PathBuf;

    pub(super) const NOW: i64 = 1_800_000_000_000;

    pub(super) struct Fixture {
        _dir: tempfile::TempDir,
        pub(super) key: Ed25519KeyPair,
        pub(super) public_key: [u8; 32],
        pub(super) verifier: CommandVerifier,
        pub(super) seen_path: PathBuf,
    }

    pub(super) fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).expect("generate");
        let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key");
        let public: [u8; 32] = key.public_key().as_ref().try_into().expect("32 bytes");
        let seen_path = dir.path().join("commands-seen");
        let verifier = CommandVerifier::new(
            public,
            "val-1",
            SeenIds::open(&seen_path, NOW).expect("open"),
        );
        Fixture {
            _dir: dir,
            key,
            public_key: public,
            verifier,
            seen_path,
        }
    }

    pub(super) fn envelope(id: &str, node: &str, issued: i64, expires: i64) -> CommandEnvelope {
        CommandEnvelope {
            command_id: id.to_owned(),
            node_id: node.to_owned(),
            action: "collect-diagnostics".to_owned(),
            parameters: HashMap::new(),
            issued_at_unix_ms: issued,
            expires_at_unix_ms: expires,
        }
    }

    pub(super) fn sign(key: &Ed25519KeyPair, envelope: &CommandEnvelope) -> Command {
        let bytes = envelope.encode_to_vec();
        Command {
            signature: key.sign(&bytes).as_ref().to_vec(),
            envelope: bytes,
        }
    }

    pub(super) fn refusal(f: &mut Fixture, command: &Command) -> &'static str {
        f.verifier
            .verify(command, NOW)
            .expect_err("must be refused")
            .kind()
    }

    #[test]
    fn cancelled_command_is_refused_naming_its_cancel_and_stays_refused_after_restart() {
        let mut f = fixture();
        let executor = Executor::new(
            CommandsConfig {
                enabled: true,
                ..CommandsConfig::default()
            },
            PathBuf::from("/"),
        );
        let mut cancel = envelope("x1", "val-1", NOW, NOW + 60_000);
        cancel.action = CANCEL_COMMAND.to_owned();
        cancel.parameters = [("command_id".to_owned(), "t1".to_owned())].into();
        let cancel = f
            .verifier
            .verify(&sign(&f.key, &cancel), NOW)
            .expect("valid");
        let outcome = executor.cancel(&cancel, &mut f.verifier, NOW);
        assert!(outcome.succeeded, "{}", outcome.detail);
        assert_eq!(outcome.detail, "command t1 will never run");
        let target = sign(&f.key, &envelope("t1", "val-1", NOW, NOW + 60_000));
        let refused = f.verifier.verify(&target, NOW).expect_err("cancelled");
        assert_eq!(refused.kind(), "cancelled");
        assert!(
            refused.to_string().contains("cancelled by command x1"),
            "{refused}"
        );
        // Cancelling it again (a resent cancel) finds it received and not running.
        let mut again = cancel.clone();
        again.command_id = "x2".to_owned();
        assert_eq!(
            executor.cancel(&again, &mut f.verifier, NOW).detail,
            "command t1 already finished; nothing to stop"
        );
        // Durable: after a restart it is still refused (no longer naming the cancel).
        let seen = SeenIds::open(&f.seen_path, NOW + 1000).expect("reopen");
        f.verifier = CommandVerifier::new(f.public_key, "val-1", seen);
        assert_eq!(refusal(&mut f, &target), "replayed");
    }
}
