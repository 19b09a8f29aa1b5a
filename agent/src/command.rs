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
//!   hooks get parameters only as `GUARDIAN_PARAM_<KEY>` environment variables.
//! - Output kept and reported is bounded ([`OUTPUT_TAIL_BYTES`], [`DIAGNOSTICS_MAX_BYTES`]).

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guardian_proto::v1::{Command, CommandEnvelope, CommandOutcome};
use prost::Message;
use ring::signature::{ED25519, UnparsedPublicKey};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::sync::CancellationToken;

use crate::config::CommandsConfig;

/// How far in the agent's future `issued_at` may be (clock skew between server and agent).
pub const MAX_CLOCK_SKEW_MS: i64 = 30_000;
/// Longest lifetime (`expires_at - issued_at`) accepted.
pub const MAX_TTL_MS: i64 = 3_600_000;
/// A seen id is kept this long after its command expired, against the clock stepping back.
pub const SEEN_RETENTION_MARGIN_MS: i64 = 3_600_000;
/// Bytes of a command's output reported in its outcome (the last ones).
pub const OUTPUT_TAIL_BYTES: usize = 4096;
/// Largest `collect-diagnostics` report.
pub const DIAGNOSTICS_MAX_BYTES: usize = 64 * 1024;
/// Time allowed for `systemctl restart` / `docker restart`.
pub const RESTART_TIMEOUT: Duration = Duration::from_secs(120);
/// Time allowed for each program of `collect-diagnostics`.
const DIAGNOSTIC_STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long output is still read after a program exited (a background child may hold the pipe).
const DRAIN_GRACE: Duration = Duration::from_secs(1);
/// PATH given to hooks, which otherwise start with an empty environment.
const HOOK_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
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

/// Why commands could not be set up (key file or seen-ids file).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The verify key file could not be read.
    #[error("cannot read {path}: {source}")]
    ReadKey {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The verify key file does not hold 64 hex characters.
    #[error("{path} does not hold a 32-byte Ed25519 public key as 64 hex characters")]
    BadKey {
        /// The file.
        path: PathBuf,
    },
    /// The seen-ids file could not be read or rewritten.
    #[error("seen-ids file {path}: {source}")]
    SeenIo {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A complete line of the seen-ids file is not `ID EXPIRES_AT_UNIX_MS`.
    #[error(
        "seen-ids file {path} line {line} is corrupt; move it aside to start over (commands issued in the last hour could then run again)"
    )]
    SeenCorrupt {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
    },
}

impl SetupError {
    /// Stable label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            SetupError::ReadKey { .. } => "read_key",
            SetupError::BadKey { .. } => "bad_key",
            SetupError::SeenIo { .. } => "seen_io",
            SetupError::SeenCorrupt { .. } => "seen_corrupt",
        }
    }
}

/// Reads a verify key file: 64 hex characters (surrounding whitespace ignored), as
/// `guardianctl pki init` writes `command-verify.pub`.
///
/// # Errors
/// [`SetupError::ReadKey`] or [`SetupError::BadKey`].
pub fn load_verify_key(path: &Path) -> Result<[u8; 32], SetupError> {
    let text = fs::read_to_string(path).map_err(|source| SetupError::ReadKey {
        path: path.to_owned(),
        source,
    })?;
    parse_hex_key(text.trim()).ok_or_else(|| SetupError::BadKey {
        path: path.to_owned(),
    })
}

fn parse_hex_key(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(key)
}

/// The ids of commands already received, persisted in one file so they survive restarts.
///
/// File format: one line per id, `COMMAND_ID EXPIRES_AT_UNIX_MS\n`, appended and fsync'd per
/// id. Opening rewrites it atomically (temp file, fsync, rename), forgetting ids whose
/// command expired more than [`SEEN_RETENTION_MARGIN_MS`] ago (an expired command is refused
/// anyway) and a torn last line (an append that never returned, so never ran).
#[derive(Debug)]
pub struct SeenIds {
    path: PathBuf,
    ids: HashMap<String, i64>,
    file: File,
    appends_since_compaction: usize,
}

/// Appends between two compactions of the seen-ids file.
const COMPACT_EVERY: usize = 4096;

impl SeenIds {
    /// Opens (or creates) the seen-ids file at `path`, dropping entries that expired long
    /// before `now_unix_ms`.
    ///
    /// # Errors
    /// [`SetupError::SeenIo`] or [`SetupError::SeenCorrupt`].
    pub fn open(path: &Path, now_unix_ms: i64) -> Result<Self, SetupError> {
        let io = |source| SetupError::SeenIo {
            path: path.to_owned(),
            source,
        };
        let text = match fs::read(path) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io(e)),
        };
        let mut ids = HashMap::new();
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        for (n, line) in complete.lines().enumerate() {
            let parsed = line.split_once(' ').and_then(|(id, expires)| {
                Some((id, expires.parse::<i64>().ok()?)).filter(|_| valid_command_id(id))
            });
            let Some((id, expires)) = parsed else {
                return Err(SetupError::SeenCorrupt {
                    path: path.to_owned(),
                    line: n + 1,
                });
            };
            ids.insert(id.to_owned(), expires);
        }
        retain_recent(&mut ids, now_unix_ms);
        let file = rewrite(path, &ids).map_err(io)?;
        Ok(Self {
            path: path.to_owned(),
            ids,
            file,
            appends_since_compaction: 0,
        })
    }

    /// Whether `command_id` was recorded.
    pub fn contains(&self, command_id: &str) -> bool {
        self.ids.contains_key(command_id)
    }

    /// How many ids are remembered.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Records `command_id` durably (appended and fsync'd before this returns).
    ///
    /// # Errors
    /// The I/O error; the id is then not remembered.
    pub fn insert(
        &mut self,
        command_id: &str,
        expires_at_unix_ms: i64,
        now_unix_ms: i64,
    ) -> std::io::Result<()> {
        self.file
            .write_all(format!("{command_id} {expires_at_unix_ms}\n").as_bytes())?;
        self.file.sync_data()?;
        self.ids.insert(command_id.to_owned(), expires_at_unix_ms);
        self.appends_since_compaction += 1;
        if self.appends_since_compaction >= COMPACT_EVERY {
            // The id is durable already; a failed compaction only leaves a longer file.
            if let Err(error) = self.compact(now_unix_ms) {
                tracing::warn!(%error, path = %self.path.display(), "seen-ids compaction failed");
            }
        }
        Ok(())
    }

    /// Forgets long-expired ids and atomically rewrites the file with the rest.
    fn compact(&mut self, now_unix_ms: i64) -> std::io::Result<()> {
        retain_recent(&mut self.ids, now_unix_ms);
        self.file = rewrite(&self.path, &self.ids)?;
        self.appends_since_compaction = 0;
        Ok(())
    }
}

/// Drops ids whose command expired more than [`SEEN_RETENTION_MARGIN_MS`] before `now`.
fn retain_recent(ids: &mut HashMap<String, i64>, now_unix_ms: i64) {
    ids.retain(|_, expires| expires.saturating_add(SEEN_RETENTION_MARGIN_MS) > now_unix_ms);
}

/// Replaces the file at `path` with `ids` (temp file, fsync, rename, fsync of the folder) and
/// returns it opened for appending.
fn rewrite(path: &Path, ids: &HashMap<String, i64>) -> std::io::Result<File> {
    let mut text = String::new();
    for (id, expires) in ids {
        text.push_str(&format!("{id} {expires}\n"));
    }
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    {
        let mut file = File::create(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)?.sync_all()?;
    }
    OpenOptions::new().append(true).open(path)
}

/// Command ids are printable tokens (the server issues 32 hex characters).
fn valid_command_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Decides whether a [`Command`] may run on this node: genuine, for this node, current, new.
#[derive(Debug)]
pub struct CommandVerifier {
    public_key: [u8; 32],
    node_id: String,
    seen: SeenIds,
    /// Seen ids recorded by [`CommandVerifier::forbid`] (target -> cancel id), so a refusal
    /// can name the cancel. In memory only: after a restart such a target is `replayed`.
    cancelled: HashMap<String, String>,
}

impl CommandVerifier {
    /// A verifier for `node_id` trusting the raw Ed25519 `public_key`.
    pub fn new(public_key: [u8; 32], node_id: impl Into<String>, seen: SeenIds) -> Self {
        Self {
            public_key,
            node_id: node_id.into(),
            seen,
            cancelled: HashMap::new(),
        }
    }

    /// Loads `config.verify_key_file` and opens the seen-ids file at `seen_path`
    /// (e.g. `SPOOL_DIR/commands-seen`).
    ///
    /// # Errors
    /// [`SetupError`] when either file is unusable.
    pub fn open(
        config: &CommandsConfig,
        node_id: impl Into<String>,
        seen_path: &Path,
        now_unix_ms: i64,
    ) -> Result<Self, SetupError> {
        let key = load_verify_key(&config.verify_key_file)?;
        Ok(Self::new(
            key,
            node_id,
            SeenIds::open(seen_path, now_unix_ms)?,
        ))
    }

    /// The seen-ids set.
    pub fn seen(&self) -> &SeenIds {
        &self.seen
    }

    /// Checks, in order: the signature over the envelope bytes, that they decode, the node
    /// id, the validity window (not expired, not issued beyond the allowed skew in the
    /// future, lifetime at most [`MAX_TTL_MS`]) and that the id is new; then records the id
    /// as seen and returns the envelope. Logs `CommandRefused` with the kind on refusal.
    ///
    /// # Errors
    /// The first [`Refusal`] that applies.
    pub fn verify(
        &mut self,
        command: &Command,
        now_unix_ms: i64,
    ) -> Result<CommandEnvelope, Refusal> {
        let verdict = self.check(command, now_unix_ms);
        if let Err(refusal) = &verdict {
            tracing::warn!(
                kind = refusal.kind(),
                command_id = refusal_outcome(command, refusal).command_id,
                "CommandRefused: {refusal}"
            );
        }
        verdict
    }

    fn check(&mut self, command: &Command, now: i64) -> Result<CommandEnvelope, Refusal> {
        UnparsedPublicKey::new(&ED25519, &self.public_key)
            .verify(&command.envelope, &command.signature)
            .map_err(|_| {
                Refusal::BadSignature(format!(
                    "{} signature bytes over {} envelope bytes",
                    command.signature.len(),
                    command.envelope.len()
                ))
            })?;
        let envelope = CommandEnvelope::decode(command.envelope.as_slice())
            .map_err(|e| Refusal::Malformed(format!("not a CommandEnvelope: {e}")))?;
        if !valid_command_id(&envelope.command_id) {
            return Err(Refusal::Malformed(format!(
                "command_id {:?} is not 1 to 64 characters of A-Z, a-z, 0-9, '-', '_'",
                envelope.command_id
            )));
        }
        if envelope.node_id != self.node_id {
            return Err(Refusal::WrongNode {
                expected: self.node_id.clone(),
                got: envelope.node_id,
            });
        }
        let lifetime_ms = envelope
            .expires_at_unix_ms
            .saturating_sub(envelope.issued_at_unix_ms);
        if !(0..=MAX_TTL_MS).contains(&lifetime_ms) {
            return Err(Refusal::LifetimeTooLong { lifetime_ms });
        }
        if envelope.expires_at_unix_ms <= now {
            return Err(Refusal::Expired {
                expires_at_unix_ms: envelope.expires_at_unix_ms,
                now_unix_ms: now,
            });
        }
        if envelope.issued_at_unix_ms > now.saturating_add(MAX_CLOCK_SKEW_MS) {
            return Err(Refusal::NotYetValid {
                issued_at_unix_ms: envelope.issued_at_unix_ms,
                now_unix_ms: now,
            });
        }
        if self.seen.contains(&envelope.command_id) {
            return Err(match self.cancelled.get(&envelope.command_id) {
                Some(by) => Refusal::Cancelled {
                    command_id: envelope.command_id,
                    by: by.clone(),
                },
                None => Refusal::Replayed {
                    command_id: envelope.command_id,
                },
            });
        }
        self.seen
            .insert(&envelope.command_id, envelope.expires_at_unix_ms, now)
            .map_err(|e| Refusal::SeenStoreFailed(format!("{}: {e}", self.seen.path.display())))?;
        Ok(envelope)
    }

    /// Records `target` as seen on behalf of the verified `cancel-command` `by`, so that
    /// verifying `target` later is refused ([`Refusal::Cancelled`]). Returns whether `target`
    /// was new here (never received, so it will never run).
    ///
    /// # Guarantees
    /// The id is appended and fsync'd before this returns `Ok(true)`, and remembered at least
    /// as long as `target` could still be accepted.
    ///
    /// # Errors
    /// [`Refusal::SeenStoreFailed`] when it cannot be recorded.
    pub fn forbid(
        &mut self,
        target: &str,
        by: &CommandEnvelope,
        now_unix_ms: i64,
    ) -> Result<bool, Refusal> {
        if self.seen.contains(target) {
            return Ok(false);
        }
        // The target was issued before its cancel, so it expires at most MAX_TTL_MS after the
        // cancel was issued; the target's own expiry is unknown here.
        let expires = by
            .issued_at_unix_ms
            .max(now_unix_ms)
            .saturating_add(MAX_TTL_MS);
        self.seen
            .insert(target, expires, now_unix_ms)
            .map_err(|e| Refusal::SeenStoreFailed(format!("{}: {e}", self.seen.path.display())))?;
        // Forget names of cancels whose targets the seen set no longer holds (compacted).
        let seen = &self.seen;
        self.cancelled.retain(|id, _| seen.contains(id));
        self.cancelled
            .insert(target.to_owned(), by.command_id.clone());
        Ok(true)
    }
}

/// One program to run, decided by [`Executor::plan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// The program (resolved through PATH unless absolute).
    pub program: PathBuf,
    /// Its arguments, each one `argv` entry.
    pub args: Vec<String>,
    /// Start from an empty environment (PATH and LANG only) plus `env`.
    pub clean_env: bool,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Killed (with its process group) after this.
    pub timeout: Duration,
}

/// What a verified envelope will do on this agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Run one program; the outcome carries its exit status and output tail.
    Run(Invocation),
    /// Collect the bounded diagnostics report.
    Diagnostics,
    /// Never run command `target`, and stop it if it is running ([`Executor::cancel`]).
    Cancel {
        /// The id of the command to cancel.
        target: String,
    },
}

/// Runs verified envelopes that this agent's `[commands]` config allows.
///
/// Clones share the set of commands running now, so any clone can cancel them.
#[derive(Debug, Clone)]
pub struct Executor {
    config: CommandsConfig,
    chain_data_path: PathBuf,
    running: Arc<Mutex<HashMap<String, Running>>>,
}

/// A command between [`Executor::execute`] and its outcome.
#[derive(Debug)]
struct Running {
    /// Cancelled by [`Executor::cancel`]; its process group is then killed.
    stop: CancellationToken,
    /// The id of the `cancel-command` that stopped it.
    cancelled_by: Option<String>,
}

/// Keeps a command in [`Executor`]'s running set until dropped.
#[derive(Debug)]
struct Registration {
    running: Arc<Mutex<HashMap<String, Running>>>,
    command_id: String,
    stop: CancellationToken,
}

impl Registration {
    /// The `cancel-command` that stopped this command, if one did.
    fn cancelled_by(&self) -> Option<String> {
        lock(&self.running)
            .get(&self.command_id)
            .and_then(|r| r.cancelled_by.clone())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.running).remove(&self.command_id);
    }
}

/// Locks the running set; a poisoned lock (a panic mid-update) still holds consistent data.
fn lock(
    running: &Mutex<HashMap<String, Running>>,
) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
    running
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Executor {
    /// An executor for `config`; `chain_data_path` is the folder `df` reports in diagnostics.
    pub fn new(config: CommandsConfig, chain_data_path: PathBuf) -> Self {
        Self {
            config,
            chain_data_path,
            running: Arc::default(),
        }
    }

    /// Decides what `envelope` does here, without doing it. `cancel-command` needs no
    /// allow-list entry (it can only make the agent do less), only commands enabled.
    ///
    /// # Errors
    /// [`Refusal::ActionNotAllowed`] for an unknown action, a target not in the allow-list or
    /// commands disabled; [`Refusal::Malformed`] for a missing or unusable parameter.
    pub fn plan(&self, envelope: &CommandEnvelope) -> Result<Plan, Refusal> {
        if !self.config.enabled {
            return Err(Refusal::ActionNotAllowed(
                "commands.enabled is false on this agent".to_owned(),
            ));
        }
        let param = |name: &str| {
            envelope
                .parameters
                .get(name)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| {
                    Refusal::Malformed(format!(
                        "action {} needs the parameter {name:?}",
                        envelope.action
                    ))
                })
        };
        let allowed = |list: &[String], name: &str, field: &str| {
            if list.iter().any(|n| n == name) {
                Ok(())
            } else {
                Err(Refusal::ActionNotAllowed(format!(
                    "{name:?} is not in {field} ({})",
                    if list.is_empty() {
                        "empty".to_owned()
                    } else {
                        list.join(", ")
                    }
                )))
            }
        };
        match envelope.action.as_str() {
            "restart-unit" => {
                let unit = param("unit")?;
                allowed(&self.config.allowed_units, unit, "commands.allowed_units")?;
                Ok(Plan::Run(Invocation {
                    program: PathBuf::from("systemctl"),
                    args: vec!["restart".to_owned(), unit.clone()],
                    clean_env: false,
                    env: Vec::new(),
                    timeout: RESTART_TIMEOUT,
                }))
            }
            "restart-container" => {
                let name = param("container")?;
                allowed(
                    &self.config.allowed_containers,
                    name,
                    "commands.allowed_containers",
                )?;
                Ok(Plan::Run(Invocation {
                    program: PathBuf::from(&self.config.container_runtime),
                    args: vec!["restart".to_owned(), name.clone()],
                    clean_env: false,
                    env: Vec::new(),
                    timeout: RESTART_TIMEOUT,
                }))
            }
            "run-hook" => {
                let hook = param("hook")?;
                let Some(script) = self.config.hooks.get(hook.as_str()) else {
                    let names: Vec<&str> = self.config.hooks.keys().map(String::as_str).collect();
                    return Err(Refusal::ActionNotAllowed(format!(
                        "hook {hook:?} is not in commands.hooks ({})",
                        if names.is_empty() {
                            "empty".to_owned()
                        } else {
                            names.join(", ")
                        }
                    )));
                };
                let mut env = vec![
                    (
                        "GUARDIAN_COMMAND_ID".to_owned(),
                        envelope.command_id.clone(),
                    ),
                    ("GUARDIAN_NODE_ID".to_owned(), envelope.node_id.clone()),
                ];
                let mut keys: Vec<&String> = envelope.parameters.keys().collect();
                keys.sort();
                for key in keys {
                    let value = &envelope.parameters[key];
                    if key.is_empty()
                        || key.len() > 64
                        || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                    {
                        return Err(Refusal::Malformed(format!(
                            "parameter key {key:?} cannot be an environment variable name (A-Z, a-z, 0-9, '_')"
                        )));
                    }
                    if value.contains('\0') {
                        return Err(Refusal::Malformed(format!(
                            "parameter {key:?} holds a NUL byte"
                        )));
                    }
                    env.push((
                        format!("GUARDIAN_PARAM_{}", key.to_ascii_uppercase()),
                        value.clone(),
                    ));
                }
                Ok(Plan::Run(Invocation {
                    program: script.clone(),
                    args: Vec::new(),
                    clean_env: true,
                    env,
                    timeout: Duration::from_millis(self.config.hook_timeout_ms),
                }))
            }
            "collect-diagnostics" => Ok(Plan::Diagnostics),
            CANCEL_COMMAND => {
                let target = param("command_id")?;
                if !valid_command_id(target) {
                    return Err(Refusal::Malformed(format!(
                        "parameter \"command_id\" {target:?} is not 1 to 64 characters of A-Z, a-z, 0-9, '-', '_'"
                    )));
                }
                if *target == envelope.command_id {
                    return Err(Refusal::Malformed(
                        "a cancel-command cannot cancel itself".to_owned(),
                    ));
                }
                Ok(Plan::Cancel {
                    target: target.clone(),
                })
            }
            other => Err(Refusal::ActionNotAllowed(format!(
                "unknown action {other:?} (this agent knows restart-unit, restart-container, run-hook, collect-diagnostics, cancel-command)"
            ))),
        }
    }

    /// Plans and runs `envelope` (already verified), and reports what happened. A refused
    /// plan becomes a refused outcome. Logs `CommandExecuted` or `CommandRefused`.
    ///
    /// # Guarantees
    /// The command counts as running from the moment `execute` is called, before the future
    /// is first polled, so a [`Executor::cancel`] handled right after spawning it stops it.
    /// A stopped command fails with a detail that starts `cancelled by command <id>`.
    /// A `cancel-command` is refused here (malformed): it goes to [`Executor::cancel`].
    pub fn execute(
        &self,
        envelope: &CommandEnvelope,
    ) -> impl Future<Output = CommandOutcome> + Send + 'static {
        let stop = CancellationToken::new();
        lock(&self.running).insert(
            envelope.command_id.clone(),
            Running {
                stop: stop.clone(),
                cancelled_by: None,
            },
        );
        let registration = Registration {
            running: Arc::clone(&self.running),
            command_id: envelope.command_id.clone(),
            stop,
        };
        let executor = self.clone();
        let envelope = envelope.clone();
        async move { executor.run(&envelope, registration).await }
    }

    async fn run(&self, envelope: &CommandEnvelope, registration: Registration) -> CommandOutcome {
        let refused = |refusal: Refusal| {
            tracing::warn!(
                kind = refusal.kind(),
                command_id = envelope.command_id,
                action = envelope.action,
                "CommandRefused: {refusal}"
            );
            refusal.outcome(&envelope.command_id)
        };
        let plan = match self.plan(envelope) {
            Ok(plan) => plan,
            Err(refusal) => return refused(refusal),
        };
        let stop = &registration.stop;
        let (succeeded, detail) = match plan {
            Plan::Run(invocation) => {
                let ran = run_bounded(&invocation, OUTPUT_TAIL_BYTES, stop).await;
                (ran.succeeded(), ran.describe())
            }
            Plan::Diagnostics => (true, self.diagnostics(stop).await),
            Plan::Cancel { .. } => {
                return refused(Refusal::Malformed(
                    "cancel-command must be answered by Executor::cancel, which records its target as seen".to_owned(),
                ));
            }
        };
        let cancelled_by = registration.cancelled_by();
        let (succeeded, detail) = match &cancelled_by {
            Some(by) => (false, format!("cancelled by command {by}; {detail}")),
            None => (succeeded, detail),
        };
        tracing::info!(
            command_id = envelope.command_id,
            action = envelope.action,
            succeeded,
            cancelled_by,
            "CommandExecuted"
        );
        CommandOutcome {
            command_id: envelope.command_id.clone(),
            succeeded,
            detail,
            refused: String::new(),
        }
    }

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

    /// Stops `target` if it is running (first cancel wins); returns whether it was.
    fn stop(&self, target: &str, by: &str) -> bool {
        let mut running = lock(&self.running);
        let Some(command) = running.get_mut(target) else {
            return false;
        };
        command.cancelled_by.get_or_insert_with(|| by.to_owned());
        command.stop.cancel();
        true
    }

    /// uname, uptime, df of the chain data, memory, and the status of every allowed unit and
    /// container; each step bounded in time and output, the whole at most
    /// [`DIAGNOSTICS_MAX_BYTES`].
    /// Stops after the current step once `stop` is cancelled.
    async fn diagnostics(&self, stop: &CancellationToken) -> String {
        let chain = self.chain_data_path.display().to_string();
        let mut steps: Vec<(String, Vec<String>)> = vec![
            ("uname".into(), vec!["-a".into()]),
            ("uptime".into(), vec![]),
            ("df".into(), vec!["-h".into(), chain]),
            ("free".into(), vec!["-m".into()]),
        ];
        for unit in &self.config.allowed_units {
            steps.push((
                "systemctl".into(),
                vec![
                    "status".into(),
                    "--no-pager".into(),
                    "--lines=20".into(),
                    unit.clone(),
                ],
            ));
        }
        if !self.config.allowed_containers.is_empty() {
            steps.push((
                self.config.container_runtime.clone(),
                vec!["ps".into(), "--all".into()],
            ));
        }
        let mut report = String::new();
        for (program, args) in steps {
            if report.len() >= DIAGNOSTICS_MAX_BYTES || stop.is_cancelled() {
                break;
            }
            let invocation = Invocation {
                program: PathBuf::from(&program),
                args: args.clone(),
                clean_env: false,
                env: Vec::new(),
                timeout: DIAGNOSTIC_STEP_TIMEOUT,
            };
            let ran = run_bounded(&invocation, 8 * 1024, stop).await;
            report.push_str(&format!("== {program} {} ==\n", args.join(" ")));
            report.push_str(&ran.describe());
            report.push('\n');
        }
        truncate_at_char(&mut report, DIAGNOSTICS_MAX_BYTES);
        report
    }
}

fn truncate_at_char(text: &mut String, max: usize) {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
}

/// What one bounded run produced.
#[derive(Debug)]
struct Ran {
    program: PathBuf,
    status: Option<ExitStatus>,
    start_error: Option<String>,
    timed_out: Option<Duration>,
    /// Killed (or never started) because the command was cancelled.
    stopped: bool,
    elapsed: Duration,
    tail: Tail,
}

impl Ran {
    fn succeeded(&self) -> bool {
        !self.stopped && self.timed_out.is_none() && self.status.is_some_and(|s| s.success())
    }

    fn describe(&self) -> String {
        let program = self.program.display();
        let head = if let Some(error) = &self.start_error {
            format!("could not start {program}: {error}")
        } else if self.stopped {
            format!(
                "{program} killed after {} ms: the command was cancelled",
                self.elapsed.as_millis()
            )
        } else if let Some(timeout) = self.timed_out {
            format!(
                "{program} killed after its timeout of {} ms",
                timeout.as_millis()
            )
        } else if let Some(status) = self.status {
            format!(
                "{program} exited with {status} after {} ms",
                self.elapsed.as_millis()
            )
        } else {
            format!("{program}: exit status unknown")
        };
        if self.tail.total == 0 {
            return format!("{head}; no output");
        }
        let text = String::from_utf8_lossy(&self.tail.bytes);
        if self.tail.total > self.tail.bytes.len() as u64 {
            format!(
                "{head}; last {} of {} output bytes:\n{text}",
                self.tail.bytes.len(),
                self.tail.total
            )
        } else {
            format!("{head}; output:\n{text}")
        }
    }
}

/// The last `keep` bytes of a stream, and how many there were in all.
#[derive(Debug)]
struct Tail {
    keep: usize,
    bytes: Vec<u8>,
    total: u64,
}

impl Tail {
    fn push(&mut self, chunk: &[u8]) {
        self.total += chunk.len() as u64;
        self.bytes.extend_from_slice(chunk);
        if self.bytes.len() > self.keep {
            let excess = self.bytes.len() - self.keep;
            self.bytes.drain(..excess);
        }
    }
}

/// Reads from `reader` if there is one; pends forever once it is gone.
async fn read_some<R: AsyncRead + Unpin>(reader: &mut Option<R>, buf: &mut [u8]) -> usize {
    match reader {
        Some(r) => r.read(buf).await.unwrap_or(0),
        None => std::future::pending().await,
    }
}

/// How a bounded run ended.
enum End {
    Exited,
    TimedOut,
    Stopped,
}

/// Runs `invocation` in its own process group, keeping the last `keep` bytes of stdout and
/// stderr (interleaved as they arrive); kills the group when the timeout passes or `stop` is
/// cancelled (and does not start it if `stop` already is).
async fn run_bounded(invocation: &Invocation, keep: usize, stop: &CancellationToken) -> Ran {
    let started = Instant::now();
    let mut ran = Ran {
        program: invocation.program.clone(),
        status: None,
        start_error: None,
        timed_out: None,
        stopped: false,
        elapsed: Duration::ZERO,
        tail: Tail {
            keep,
            bytes: Vec::new(),
            total: 0,
        },
    };
    let mut cmd = tokio::process::Command::new(&invocation.program);
    cmd.args(&invocation.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    if invocation.clean_env {
        cmd.env_clear().env("PATH", HOOK_PATH).env("LANG", "C");
    }
    cmd.envs(invocation.env.iter().map(|(k, v)| (k, v)));
    if stop.is_cancelled() {
        ran.stopped = true;
        ran.start_error = Some("the command was cancelled before it started".to_owned());
        return ran;
    }
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(error) => {
            ran.start_error = Some(error.to_string());
            return ran;
        }
    };
    let pid = child.id();
    let (mut stdout, mut stderr) = (child.stdout.take(), child.stderr.take());
    let tail = &mut ran.tail;
    let mut status = None;
    let io = tokio::time::timeout(invocation.timeout, async {
        let (mut out_buf, mut err_buf) = (vec![0u8; 8192], vec![0u8; 8192]);
        let mut drain_until = None;
        loop {
            if stdout.is_none() && stderr.is_none() && status.is_some() {
                return;
            }
            let drain_deadline = drain_until.unwrap_or_else(|| {
                tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600)
            });
            tokio::select! {
                n = read_some(&mut stdout, &mut out_buf) => {
                    if n == 0 { stdout = None } else { tail.push(&out_buf[..n]) }
                }
                n = read_some(&mut stderr, &mut err_buf) => {
                    if n == 0 { stderr = None } else { tail.push(&err_buf[..n]) }
                }
                exited = child.wait(), if status.is_none() => {
                    status = Some(exited);
                    drain_until = Some(tokio::time::Instant::now() + DRAIN_GRACE);
                }
                () = tokio::time::sleep_until(drain_deadline), if drain_until.is_some() => return,
            }
        }
    });
    let end = tokio::select! {
        finished = io => if finished.is_ok() { End::Exited } else { End::TimedOut },
        () = stop.cancelled() => End::Stopped,
    };
    match end {
        End::Exited => {}
        End::TimedOut => ran.timed_out = Some(invocation.timeout),
        End::Stopped => ran.stopped = true,
    }
    if !matches!(end, End::Exited) {
        if let Some(pid) = pid {
            // The whole group: a hook's children (sleep, rsync, ...) must not outlive it.
            let _ = tokio::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await;
        }
        let _ = child.start_kill();
        status = tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .ok();
    }
    ran.status = status.and_then(Result::ok);
    ran.elapsed = started.elapsed();
    ran
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{Ed25519KeyPair, KeyPair};

    const NOW: i64 = 1_800_000_000_000;

    struct Fixture {
        _dir: tempfile::TempDir,
        key: Ed25519KeyPair,
        verifier: CommandVerifier,
        seen_path: PathBuf,
    }

    fn fixture() -> Fixture {
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
            verifier,
            seen_path,
        }
    }

    fn envelope(id: &str, node: &str, issued: i64, expires: i64) -> CommandEnvelope {
        CommandEnvelope {
            command_id: id.to_owned(),
            node_id: node.to_owned(),
            action: "collect-diagnostics".to_owned(),
            parameters: HashMap::new(),
            issued_at_unix_ms: issued,
            expires_at_unix_ms: expires,
        }
    }

    fn sign(key: &Ed25519KeyPair, envelope: &CommandEnvelope) -> Command {
        let bytes = envelope.encode_to_vec();
        Command {
            signature: key.sign(&bytes).as_ref().to_vec(),
            envelope: bytes,
        }
    }

    fn refusal(f: &mut Fixture, command: &Command) -> &'static str {
        f.verifier
            .verify(command, NOW)
            .expect_err("must be refused")
            .kind()
    }

    #[test]
    fn command_checks_refuse_each_bad_command_with_its_kind() {
        let mut f = fixture();
        let ok = sign(&f.key, &envelope("a1", "val-1", NOW, NOW + 60_000));
        let mut flipped = ok.clone();
        flipped.envelope[3] ^= 1;
        assert_eq!(refusal(&mut f, &flipped), "bad_signature");
        let unsigned = Command {
            envelope: b"\xff\xff".to_vec(),
            signature: f.key.sign(b"\xff\xff").as_ref().to_vec(),
        };
        assert_eq!(refusal(&mut f, &unsigned), "malformed");
        let other = sign(&f.key, &envelope("a2", "val-2", NOW, NOW + 60_000));
        assert_eq!(refusal(&mut f, &other), "wrong_node");
        let expired = sign(&f.key, &envelope("a3", "val-1", NOW - 120_000, NOW - 1));
        assert_eq!(refusal(&mut f, &expired), "expired");
        let future = sign(&f.key, &envelope("a4", "val-1", NOW + 31_000, NOW + 90_000));
        assert_eq!(refusal(&mut f, &future), "not_yet_valid");
        let skewed = sign(&f.key, &envelope("a5", "val-1", NOW + 29_000, NOW + 90_000));
        f.verifier.verify(&skewed, NOW).expect("within skew");
        let long = sign(&f.key, &envelope("a6", "val-1", NOW, NOW + MAX_TTL_MS + 1));
        assert_eq!(refusal(&mut f, &long), "lifetime_too_long");
        let bad_id = sign(&f.key, &envelope("a b", "val-1", NOW, NOW + 1000));
        assert_eq!(refusal(&mut f, &bad_id), "malformed");
        f.verifier.verify(&ok, NOW).expect("valid");
        assert_eq!(refusal(&mut f, &ok), "replayed");
        // Refused commands burn no ids: only a5 and a1 were recorded.
        assert_eq!(f.verifier.seen().len(), 2);
    }

    #[test]
    fn command_ids_survive_a_restart_and_a_torn_last_line() {
        let mut f = fixture();
        let ok = sign(&f.key, &envelope("b1", "val-1", NOW, NOW + 60_000));
        f.verifier.verify(&ok, NOW).expect("valid");
        // A crash mid-append leaves a torn line; it never returned, so it never ran.
        let mut file = OpenOptions::new()
            .append(true)
            .open(&f.seen_path)
            .expect("open");
        file.write_all(b"b2 18000").expect("write");
        let seen = SeenIds::open(&f.seen_path, NOW + 1000).expect("reopen");
        assert!(seen.contains("b1"));
        assert!(!seen.contains("b2"));
        f.verifier = CommandVerifier::new(f.verifier.public_key, "val-1", seen);
        assert_eq!(refusal(&mut f, &ok), "replayed");
        // Long after expiry (plus the margin) the id is forgotten, and still refused as expired.
        let late = NOW + 60_000 + SEEN_RETENTION_MARGIN_MS + 1;
        let seen = SeenIds::open(&f.seen_path, late).expect("reopen");
        assert!(seen.is_empty());
        f.verifier = CommandVerifier::new(f.verifier.public_key, "val-1", seen);
        assert_eq!(
            f.verifier.verify(&ok, late).expect_err("refused").kind(),
            "expired"
        );
        fs::write(&f.seen_path, "garbage\n").expect("write");
        assert_eq!(
            SeenIds::open(&f.seen_path, NOW)
                .expect_err("corrupt")
                .kind(),
            "seen_corrupt"
        );
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
        f.verifier = CommandVerifier::new(f.verifier.public_key, "val-1", seen);
        assert_eq!(refusal(&mut f, &target), "replayed");
    }

    #[tokio::test]
    async fn command_cancelled_before_it_starts_never_starts() {
        let executor = Executor::new(
            CommandsConfig {
                enabled: true,
                hooks: [("h".to_owned(), PathBuf::from("/bin/true"))].into(),
                ..CommandsConfig::default()
            },
            PathBuf::from("/"),
        );
        let mut hook = envelope("h1", "val-1", NOW, NOW + 60_000);
        hook.action = "run-hook".to_owned();
        hook.parameters = [("hook".to_owned(), "h".to_owned())].into();
        // Registered as running by execute() itself, before the future is polled.
        let run = executor.execute(&hook);
        assert!(executor.stop("h1", "x9"));
        let outcome = run.await;
        assert!(!outcome.succeeded);
        assert!(
            outcome
                .detail
                .starts_with("cancelled by command x9; could not start /bin/true: the command was cancelled before it started"),
            "{}",
            outcome.detail
        );
        assert!(
            !executor.stop("h1", "x9"),
            "finished commands leave the running set"
        );
    }

    #[test]
    fn command_plans_follow_the_allow_lists() {
        let config = CommandsConfig {
            enabled: true,
            allowed_units: vec!["subtensor.service".into()],
            allowed_containers: vec!["validator".into()],
            container_runtime: "podman".into(),
            hooks: [("restore".to_owned(), PathBuf::from("/opt/restore.sh"))].into(),
            hook_timeout_ms: 1000,
            ..CommandsConfig::default()
        };
        let executor = Executor::new(config.clone(), PathBuf::from("/"));
        let with = |action: &str, params: &[(&str, &str)]| {
            let mut e = envelope("c1", "val-1", NOW, NOW + 1000);
            e.action = action.to_owned();
            e.parameters = params
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            executor.plan(&e)
        };
        let Ok(Plan::Run(unit)) = with("restart-unit", &[("unit", "subtensor.service")]) else {
            panic!("restart-unit must plan a run");
        };
        assert_eq!(
            (unit.program.as_os_str(), unit.args.as_slice()),
            (
                "systemctl".as_ref(),
                ["restart".to_owned(), "subtensor.service".to_owned()].as_slice()
            )
        );
        let Ok(Plan::Run(container)) = with("restart-container", &[("container", "validator")])
        else {
            panic!("restart-container must plan a run");
        };
        assert_eq!(container.program, PathBuf::from("podman"));
        let Ok(Plan::Run(hook)) = with("run-hook", &[("hook", "restore"), ("snapshot", "s1")])
        else {
            panic!("run-hook must plan a run");
        };
        assert!(hook.clean_env && hook.args.is_empty());
        assert!(
            hook.env
                .contains(&("GUARDIAN_PARAM_SNAPSHOT".to_owned(), "s1".to_owned()))
        );
        let kind = |r: Result<Plan, Refusal>| r.expect_err("refused").kind();
        assert_eq!(
            kind(with("restart-unit", &[("unit", "sshd.service")])),
            "action_not_allowed"
        );
        assert_eq!(
            kind(with("restart-container", &[("container", "other")])),
            "action_not_allowed"
        );
        assert_eq!(
            kind(with("run-hook", &[("hook", "wipe")])),
            "action_not_allowed"
        );
        assert_eq!(kind(with("reboot", &[])), "action_not_allowed");
        assert_eq!(kind(with("restart-unit", &[])), "malformed");
        // cancel-command needs no allow-list entry, only a usable command_id.
        assert_eq!(
            with(CANCEL_COMMAND, &[("command_id", "t1")]),
            Ok(Plan::Cancel {
                target: "t1".to_owned()
            })
        );
        for params in [&[][..], &[("command_id", "")], &[("command_id", "a b")]] {
            assert_eq!(
                kind(with(CANCEL_COMMAND, params)),
                "malformed",
                "{params:?}"
            );
        }
        assert_eq!(
            kind(with(CANCEL_COMMAND, &[("command_id", "c1")])),
            "malformed",
            "a cancel cannot cancel itself"
        );
        assert_eq!(
            kind(with("run-hook", &[("hook", "restore"), ("a=b", "1")])),
            "malformed"
        );
        let disabled = Executor::new(
            CommandsConfig {
                enabled: false,
                ..config
            },
            PathBuf::from("/"),
        );
        assert_eq!(
            kind(disabled.plan(&envelope("c2", "val-1", NOW, NOW + 1))),
            "action_not_allowed"
        );
    }

    #[tokio::test]
    async fn command_output_is_bounded_to_its_tail() {
        let invocation = Invocation {
            program: PathBuf::from("sh"),
            args: vec![
                "-c".into(),
                // The pause lets the reader drain stdout first: the two pipes are read
                // concurrently, so without it the stderr line can be read before the last
                // 4 KiB of stdout and fall out of the tail.
                "i=0; while [ $i -lt 2000 ]; do echo line-$i; i=$((i+1)); done; sleep 0.3; echo oops >&2; exit 3".into(),
            ],
            clean_env: false,
            env: Vec::new(),
            timeout: Duration::from_secs(10),
        };
        let ran = run_bounded(&invocation, OUTPUT_TAIL_BYTES, &CancellationToken::new()).await;
        assert!(!ran.succeeded());
        assert_eq!(ran.tail.bytes.len(), OUTPUT_TAIL_BYTES);
        let detail = ran.describe();
        assert!(detail.contains("exit status: 3"), "{detail}");
        assert!(
            detail.contains("oops") && detail.contains("line-1999"),
            "{detail}"
        );
        assert!(!detail.contains("line-0\n"), "{detail}");
    }
}
