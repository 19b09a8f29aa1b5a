//! Decides whether a received command may run here: its signature over the exact bytes
//! received, this node's id, the validity window and clock skew, and the persisted set of
//! seen command ids (its file, torn-line recovery and compaction).

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use guardian_proto::v1::{Command, CommandEnvelope};
use prost::Message;
use ring::signature::{ED25519, UnparsedPublicKey};

use super::{CommandsConfig, Refusal, refusal_outcome, valid_command_id};

/// How far in the agent's future `issued_at` may be (clock skew between server and agent).
pub const MAX_CLOCK_SKEW_MS: i64 = 30_000;
/// Longest lifetime (`expires_at - issued_at`) accepted.
pub const MAX_TTL_MS: i64 = 3_600_000;
/// A seen id is kept this long after its command expired, against the clock stepping back.
pub const SEEN_RETENTION_MARGIN_MS: i64 = 3_600_000;

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
/// id. Opening, and every `COMPACT_EVERY` (4096) appends, rewrites it atomically (temp
/// file, fsync, rename), forgetting ids whose command expired more than
/// [`SEEN_RETENTION_MARGIN_MS`] ago (an expired command is refused anyway) and a torn last
/// line (an append that never returned, so never ran).
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

    /// Records `command_id` durably (appended and fsync'd before this returns). Every
    /// `COMPACT_EVERY` (4096) appends the file is compacted first.
    ///
    /// # Guarantees
    /// The open handle always names the file at the path: a compaction swaps it only once the
    /// new file is in place, so no later id is appended to an unlinked file.
    ///
    /// # Errors
    /// The I/O error of the append or of a due compaction; the id is then not remembered
    /// (the command must not run). A compaction that failed is tried again by the next insert.
    pub fn insert(
        &mut self,
        command_id: &str,
        expires_at_unix_ms: i64,
        now_unix_ms: i64,
    ) -> std::io::Result<()> {
        if self.appends_since_compaction >= COMPACT_EVERY {
            self.compact(now_unix_ms).inspect_err(|error| {
                tracing::warn!(%error, path = %self.path.display(), "seen-ids compaction failed");
            })?;
        }
        self.file
            .write_all(format!("{command_id} {expires_at_unix_ms}\n").as_bytes())?;
        self.file.sync_data()?;
        self.ids.insert(command_id.to_owned(), expires_at_unix_ms);
        self.appends_since_compaction += 1;
        Ok(())
    }

    /// Forgets long-expired ids and atomically rewrites the file with the rest.
    ///
    /// # Errors
    /// Before the rename the old file, and the handle on it, stay as they were. After it the
    /// handle is already on the new file; only the folder fsync can still fail.
    fn compact(&mut self, now_unix_ms: i64) -> std::io::Result<()> {
        let mut kept = self.ids.clone();
        retain_recent(&mut kept, now_unix_ms);
        let (tmp, file) = write_temp(&self.path, &kept)?;
        fault(Step::Rename)?;
        fs::rename(&tmp, &self.path)?;
        // The path names the new file from here: the handle must follow it whatever fails next.
        self.file = file;
        self.ids = kept;
        self.appends_since_compaction = 0;
        sync_folder(&self.path)
    }
}

/// Drops ids whose command expired more than [`SEEN_RETENTION_MARGIN_MS`] before `now`.
fn retain_recent(ids: &mut HashMap<String, i64>, now_unix_ms: i64) {
    ids.retain(|_, expires| expires.saturating_add(SEEN_RETENTION_MARGIN_MS) > now_unix_ms);
}

/// Replaces the file at `path` with `ids` (temp file, fsync, rename, fsync of the folder) and
/// returns it opened for appending.
fn rewrite(path: &Path, ids: &HashMap<String, i64>) -> std::io::Result<File> {
    let (tmp, file) = write_temp(path, ids)?;
    fault(Step::Rename)?;
    fs::rename(&tmp, path)?;
    sync_folder(path)?;
    Ok(file)
}

/// Writes `ids` to `PATH.tmp`, fsyncs it and returns its path and the file opened for
/// appending (opened before it is renamed into place, so that a failed open leaves the old
/// file, and the handle on it, in use).
fn write_temp(path: &Path, ids: &HashMap<String, i64>) -> std::io::Result<(PathBuf, File)> {
    let mut text = String::new();
    for (id, expires) in ids {
        text.push_str(&format!("{id} {expires}\n"));
    }
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    {
        fault(Step::WriteTemp)?;
        let mut file = File::create(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
    }
    fault(Step::OpenTemp)?;
    let file = OpenOptions::new().append(true).open(&tmp)?;
    Ok((tmp, file))
}

/// Fsyncs the folder holding `path`, so that a rename into it is durable.
fn sync_folder(path: &Path) -> std::io::Result<()> {
    fault(Step::SyncFolder)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The steps of a rewrite of the seen-ids file, named so that a test can make one fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    WriteTemp,
    OpenTemp,
    Rename,
    SyncFolder,
}

#[cfg(test)]
thread_local! {
    /// The step that fails on this thread (tests only).
    static FAIL_AT: std::cell::Cell<Option<Step>> = const { std::cell::Cell::new(None) };
}

/// Fails `step` when a test asked for it on this thread; nothing otherwise.
fn fault(step: Step) -> std::io::Result<()> {
    #[cfg(test)]
    if FAIL_AT.get() == Some(step) {
        return Err(std::io::Error::other(format!(
            "injected failure at {step:?}"
        )));
    }
    let _ = step;
    Ok(())
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

    /// Checks, in order: the signature over the envelope bytes, that they decode and carry a
    /// well-formed command id, the node id, the validity window (lifetime at most
    /// [`MAX_TTL_MS`], then not expired (no skew allowance on expiry), then not issued more
    /// than [`MAX_CLOCK_SKEW_MS`] in the future) and that the id is new; then records the id
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::tests::{NOW, envelope, fixture, refusal, sign};

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

    /// Inserts `id`; an accepted id is added to `accepted`, a refused one must not be
    /// remembered.
    fn insert(seen: &mut SeenIds, accepted: &mut Vec<String>, id: &str) {
        match seen.insert(id, NOW + 60_000, NOW) {
            Ok(()) => accepted.push(id.to_owned()),
            Err(error) => assert!(!seen.contains(id), "{id} refused ({error}) but remembered"),
        }
    }

    /// Asserts that a restart reading `path` finds every id in `accepted`.
    fn assert_all_survive(path: &Path, accepted: &[String]) {
        let reopened = SeenIds::open(path, NOW).expect("reopen");
        for id in accepted {
            assert!(
                reopened.contains(id),
                "{id} was accepted but is lost on reopen"
            );
        }
    }

    #[test]
    fn no_seen_id_is_lost_when_a_compaction_fails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("commands-seen");
        let tmp = dir.path().join("commands-seen.tmp");
        let mut seen = SeenIds::open(&path, NOW).expect("open");
        let mut accepted = Vec::new();
        insert(&mut seen, &mut accepted, "a1");
        // A temp path that cannot be created (also as root): the compaction due with this
        // insert fails before the rename.
        fs::create_dir(&tmp).expect("mkdir");
        seen.appends_since_compaction = COMPACT_EVERY;
        insert(&mut seen, &mut accepted, "a2");
        fs::remove_dir(&tmp).expect("rmdir");
        insert(&mut seen, &mut accepted, "a3");
        // A failure after the rename (the folder fsync), then one before the next rename.
        seen.appends_since_compaction = COMPACT_EVERY;
        FAIL_AT.set(Some(Step::SyncFolder));
        insert(&mut seen, &mut accepted, "a4");
        FAIL_AT.set(None);
        fs::create_dir(&tmp).expect("mkdir");
        insert(&mut seen, &mut accepted, "a5");
        // A restart now reads what is at the path (from a copy: the temp path is blocked).
        let copy = dir.path().join("after-failures");
        fs::copy(&path, &copy).expect("copy");
        assert_all_survive(&copy, &accepted);
        fs::remove_dir(&tmp).expect("rmdir");
        insert(&mut seen, &mut accepted, "a6");
        assert_all_survive(&path, &accepted);
        // Whichever step fails, the insert that needed the compaction is refused and the
        // next one is kept.
        for step in [
            Step::WriteTemp,
            Step::OpenTemp,
            Step::Rename,
            Step::SyncFolder,
        ] {
            seen.appends_since_compaction = COMPACT_EVERY;
            FAIL_AT.set(Some(step));
            let refused = format!("{step:?}-1");
            assert!(
                seen.insert(&refused, NOW + 60_000, NOW).is_err(),
                "{step:?}"
            );
            assert!(!seen.contains(&refused));
            FAIL_AT.set(None);
            insert(&mut seen, &mut accepted, &format!("{step:?}-2"));
            assert_all_survive(&path, &accepted);
        }
        assert!(
            accepted.contains(&"SyncFolder-2".to_owned()),
            "{accepted:?}"
        );
    }
}
