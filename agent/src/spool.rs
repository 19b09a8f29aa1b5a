//! The on-disk spool: owns every batch from sampling until the server acks it, numbered
//! once, bounded by bytes, surviving agent restarts.
//!
//! # Layout of `spool_dir`
//! - `lock`: `flock`ed by the agent that owns the spool; holds its pid.
//! - `state`: TOML (`version`, `next_seq`, `next_local`, `dropped_batches_total`, and the
//!   `mapped_first_local`/`mapped_first_seq` pair), replaced atomically.
//! - `batches/<seq:020>.pb`: one protobuf `SampleBatch` per file.
//! - `unnumbered/<local:020>.pb`: batches taken before this spool ever learnt the server's
//!   numbering (a fresh spool with the server unreachable). The first Welcome maps them, in
//!   one state write, to `seq = mapped_first_seq + (local - mapped_first_local)`.
//! - `corrupt/`: files that could not be read or decoded, kept for inspection.
//!
//! Every file is written to a temporary name, fsync'd, renamed and its folder fsync'd, so a
//! crash leaves either the old or the new file, never a torn one.
//!
//! # Guarantees
//! - A seq is issued at most once per spool: `next_seq` is persisted with every batch and,
//!   at open, is never below the highest seq found on disk plus one.
//! - A batch leaves the spool only by an ack that covers it, or by a counted drop: the
//!   oldest batch when the spool is over `max_bytes`, or a file that cannot be read back.
//!   The counter (`dropped_batches_total`) is persisted before the files are deleted and is
//!   sent in every batch, so a seq gap the server sees is always explained.
//! - Bodies stay on disk: memory holds only the index (seq -> size), except when writing
//!   fails (disk full, read-only): then the batch is kept in memory, bounded by
//!   [`MEMORY_FALLBACK_MAX_BYTES`], and written out once writing works again. Batches held
//!   only in memory are lost if the agent stops before that.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use guardian_proto::v1::{Sample, SampleBatch};
use prost::Message;
use serde::{Deserialize, Serialize};

/// Smallest accepted `spool_max_bytes`.
pub const MIN_MAX_BYTES: u64 = 1 << 20;
/// Most bytes of batches held in memory when they cannot be written to disk.
pub const MEMORY_FALLBACK_MAX_BYTES: u64 = 16 << 20;
/// Sizes are counted in whole blocks of this many bytes: a small batch file still takes one
/// on disk, so the bound is about disk usage, not payload.
const BLOCK_BYTES: u64 = 4096;
/// Version of the `state` file this agent writes; a newer one is refused.
const STATE_VERSION: u32 = 1;
/// Warnings that could repeat every interval are logged at most this often, with counts.
const LOG_EVERY: Duration = Duration::from_secs(10);

const LOCK_FILE: &str = "lock";
const STATE_FILE: &str = "state";
const BATCHES: &str = "batches";
const UNNUMBERED: &str = "unnumbered";
const CORRUPT: &str = "corrupt";

/// Why the spool cannot be opened; the agent does not start without one.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The folder or its lock file cannot be created or read.
    #[error(
        "spool {dir}: cannot {action}: {source}; fix: make spool_dir writable by the agent's user (mode 0700) or point spool_dir elsewhere"
    )]
    Io {
        /// The spool folder.
        dir: PathBuf,
        /// What was attempted.
        action: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Another process holds the lock.
    #[error(
        "spool {dir} is in use by another guardian-agent ({holder}); fix: stop that agent or give this one its own spool_dir"
    )]
    Locked {
        /// The spool folder.
        dir: PathBuf,
        /// `pid N` when the lock file names it.
        holder: String,
    },
    /// The state file was written by a newer agent.
    #[error(
        "spool {dir}: state version {found} is newer than this agent's ({STATE_VERSION}); fix: run the newer agent or point spool_dir at a new folder"
    )]
    Incompatible {
        /// The spool folder.
        dir: PathBuf,
        /// Version found.
        found: u32,
    },
}

impl SpoolError {
    /// Stable label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Io { .. } => "io",
            Self::Locked { .. } => "locked",
            Self::Incompatible { .. } => "incompatible",
        }
    }
}

/// What the `state` file holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
struct State {
    version: u32,
    /// Seq of the next batch; 0 while the numbering is unknown (fresh spool, no Welcome yet).
    next_seq: u64,
    /// Local number of the next unnumbered batch.
    next_local: u64,
    /// Batches dropped or lost to unreadable files since the spool was created.
    dropped_batches_total: u64,
    /// `unnumbered/L` holds seq `mapped_first_seq + (L - mapped_first_local)` (0: no mapping).
    mapped_first_local: u64,
    /// See `mapped_first_local`.
    mapped_first_seq: u64,
}

impl State {
    fn numbered(&self) -> bool {
        self.next_seq != 0
    }
}

/// Where a batch body is.
#[derive(Debug, Clone)]
enum Body {
    File(PathBuf),
    Memory(Arc<[u8]>),
}

#[derive(Debug)]
struct Entry {
    bytes: u64,
    body: Body,
}

/// A log line that may be due every interval, kept to one per [`LOG_EVERY`] with a count.
#[derive(Debug, Default)]
struct Throttle {
    last: Option<Instant>,
    pending: u64,
}

impl Throttle {
    /// Notes `n` events; returns how many to report when a line is due.
    fn note(&mut self, n: u64) -> Option<u64> {
        self.pending += n;
        let due = self.last.is_none_or(|at| at.elapsed() >= LOG_EVERY);
        due.then(|| {
            self.last = Some(Instant::now());
            std::mem::take(&mut self.pending)
        })
    }
}

/// Batches read for sending, taken under the spool's lock and read outside it.
#[derive(Debug)]
pub struct Plan {
    items: Vec<(u64, Body)>,
    dropped_total: u64,
}

/// The spool. See the module documentation.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    /// Held for the spool's life: the `flock` is released when it closes.
    _lock: File,
    state: State,
    /// Keyed by seq once numbered, by local number before.
    entries: BTreeMap<u64, Entry>,
    bytes: u64,
    memory_bytes: u64,
    last_acked_seq: u64,
    drop_log: Throttle,
    io_log: Throttle,
}

impl Spool {
    /// Opens (creating if needed, mode 0700) the spool in `dir` holding at most `max_bytes`
    /// of batches, and locks it for this process.
    ///
    /// Unreadable batch files are moved to `corrupt/` and counted as dropped; leftovers of
    /// interrupted writes are removed.
    ///
    /// # Errors
    /// [`SpoolError::Locked`] when another process holds the spool; [`SpoolError::Io`] when
    /// the folder or lock cannot be created; [`SpoolError::Incompatible`] for a newer state.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, SpoolError> {
        let io = |action: String| {
            let dir = dir.to_path_buf();
            move |source| SpoolError::Io {
                dir,
                action,
                source,
            }
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io("create the folder".into()))?;
        let lock = lock(dir)?;
        for sub in [BATCHES, UNNUMBERED, CORRUPT] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir.join(sub))
                .map_err(io(format!("create {sub}/")))?;
        }
        let mut spool = Self {
            dir: dir.to_path_buf(),
            max_bytes: max_bytes.max(1),
            _lock: lock,
            state: State::default(),
            entries: BTreeMap::new(),
            bytes: 0,
            memory_bytes: 0,
            last_acked_seq: 0,
            drop_log: Throttle::default(),
            io_log: Throttle::default(),
        };
        let stored = spool.read_state()?;
        spool.state = stored.clone().unwrap_or_default();
        spool.state.version = STATE_VERSION;
        let numbered_files = spool
            .scan(BATCHES)
            .map_err(io(format!("list {BATCHES}/")))?;
        let unnumbered_files = spool
            .scan(UNNUMBERED)
            .map_err(io(format!("list {UNNUMBERED}/")))?;
        let numbered = spool.state.numbered() || !numbered_files.is_empty();
        if stored.is_none() && !(numbered_files.is_empty() && unnumbered_files.is_empty()) {
            tracing::warn!(
                dir = %dir.display(),
                "SpoolStateMissing: batch files without a state file; numbering inferred from the files, drop counter restarts at 0"
            );
        }
        let mut unmappable = Vec::new();
        if numbered {
            for (seq, bytes, path) in numbered_files {
                spool.insert(seq, bytes, Body::File(path));
            }
            let (first_local, first_seq) =
                (spool.state.mapped_first_local, spool.state.mapped_first_seq);
            for (local, bytes, path) in unnumbered_files {
                if first_seq != 0 && local >= first_local {
                    spool.insert(first_seq + (local - first_local), bytes, Body::File(path));
                } else {
                    unmappable.push(path);
                }
            }
            let after_files = spool.entries.keys().next_back().map_or(1, |seq| seq + 1);
            spool.state.next_seq = spool.state.next_seq.max(after_files);
        } else {
            for (local, bytes, path) in unnumbered_files {
                spool.insert(local, bytes, Body::File(path));
            }
            let after_files = spool.entries.keys().next_back().map_or(1, |l| l + 1);
            spool.state.next_local = spool.state.next_local.max(after_files);
        }
        if !unmappable.is_empty() {
            tracing::error!(
                dir = %dir.display(),
                files = unmappable.len(),
                "SpoolUnmappable: unnumbered batches whose numbering was lost with the state file; moved to corrupt/ and counted as dropped"
            );
            for path in &unmappable {
                spool.quarantine_file(path);
            }
            spool.state.dropped_batches_total += unmappable.len() as u64;
        }
        // Over the bound already (e.g. spool_max_bytes was lowered).
        let dropped = spool.shed();
        if stored.as_ref() != Some(&spool.state) {
            spool.write_state();
        }
        spool.delete_dropped(dropped);
        tracing::info!(
            dir = %dir.display(),
            pending = spool.entries.len(),
            bytes = spool.bytes,
            max_bytes = spool.max_bytes,
            numbered = spool.state.numbered(),
            next_seq = spool.state.next_seq,
            dropped_batches_total = spool.state.dropped_batches_total,
            "SpoolOpened"
        );
        Ok(spool)
    }

    /// Queues a batch (persisted before this returns, unless the disk fails). When the spool
    /// is over its bound, the oldest batches are dropped and counted; returns the new
    /// drop total when that happened.
    pub fn push(&mut self, samples: Vec<Sample>) -> Option<u64> {
        let numbered = self.state.numbered();
        let key = if numbered {
            self.state.next_seq
        } else {
            self.state.next_local
        };
        let batch = SampleBatch {
            seq: if numbered { key } else { 0 },
            samples,
            spool_dropped_batches_total: self.state.dropped_batches_total,
        };
        let body = batch.encode_to_vec();
        let bytes = footprint(body.len());
        if numbered {
            self.state.next_seq += 1;
        } else {
            self.state.next_local += 1;
        }
        let entry = match self.write_batch(numbered, key, &body) {
            Ok(path) => {
                self.spill_memory();
                Body::File(path)
            }
            Err(()) => {
                self.memory_bytes += bytes;
                Body::Memory(body.into())
            }
        };
        self.insert(key, bytes, entry);
        let mut dropped = self.shed();
        dropped.extend(self.shed_memory());
        let dropped_now = dropped.len() as u64;
        self.write_state();
        self.delete_dropped(dropped);
        (dropped_now > 0).then_some(self.state.dropped_batches_total)
    }

    /// Applies a Welcome's `last_stored_seq`. A spool that never had a numbering takes it
    /// (`last_stored_seq + 1` onward, unnumbered batches first, in order); a numbered one
    /// keeps its own, but moves `next_seq` past a server that already holds seqs this
    /// spool never issued (batches already written keep their numbers).
    pub fn set_base(&mut self, last_stored_seq: u64) {
        if !self.state.numbered() {
            let first_seq = last_stored_seq + 1;
            let first_local = self
                .entries
                .keys()
                .next()
                .copied()
                .unwrap_or(self.state.next_local);
            self.state.mapped_first_local = first_local;
            self.state.mapped_first_seq = first_seq;
            self.state.next_seq = first_seq + (self.state.next_local - first_local);
            self.entries = std::mem::take(&mut self.entries)
                .into_iter()
                .map(|(local, entry)| (first_seq + (local - first_local), entry))
                .collect();
            self.write_state();
            tracing::info!(
                first_seq,
                batches = self.entries.len(),
                next_seq = self.state.next_seq,
                "SpoolNumbered: batches taken before the first Welcome are numbered now"
            );
        } else if last_stored_seq >= self.state.next_seq {
            let shadowed = self.entries.range(..=last_stored_seq).count();
            tracing::error!(
                last_stored_seq,
                next_seq = self.state.next_seq,
                shadowed_batches = shadowed,
                dir = %self.dir.display(),
                "SpoolBehindServer: the server holds seqs this spool never issued (spool wiped or \
                 restored, or another agent uses this node's certificate); new batches continue \
                 after the server's, and pending batches at or below it will be taken as replays"
            );
            self.state.next_seq = last_stored_seq + 1;
            self.write_state();
        }
    }

    /// Whether batches are numbered (a Welcome or a previous run gave the numbering).
    pub fn has_base(&self) -> bool {
        self.state.numbered()
    }

    /// Which batches to send after `after_seq` (exclusive), oldest first, at most `limit`.
    /// Cheap: reads no file. Empty until numbered.
    pub fn plan_after(&self, after_seq: u64, limit: usize) -> Plan {
        let items = if self.state.numbered() {
            self.entries
                .range(after_seq.saturating_add(1)..)
                .take(limit)
                .map(|(seq, entry)| (*seq, entry.body.clone()))
                .collect()
        } else {
            Vec::new()
        };
        Plan {
            items,
            dropped_total: self.state.dropped_batches_total,
        }
    }

    /// [`Spool::plan_after`] and [`Plan::read`] in one, quarantining unreadable files.
    pub fn batches_after(&mut self, after_seq: u64, limit: usize) -> Vec<SampleBatch> {
        let (batches, unreadable) = self.plan_after(after_seq, limit).read();
        self.quarantine(&unreadable);
        batches
    }

    /// Forgets (deletes) every batch with seq <= `through_seq`. Returns how many.
    pub fn ack(&mut self, through_seq: u64) -> usize {
        if !self.state.numbered() {
            return 0;
        }
        self.last_acked_seq = self.last_acked_seq.max(through_seq);
        let keep = self.entries.split_off(&through_seq.saturating_add(1));
        let acked = std::mem::replace(&mut self.entries, keep);
        for entry in acked.values() {
            self.forget(entry);
            if let Body::File(path) = &entry.body {
                // A file that survives is resent after a restart; the server dedupes it.
                if let Err(error) = fs::remove_file(path)
                    && error.kind() != std::io::ErrorKind::NotFound
                {
                    self.io_failed("delete an acked batch", path, &error);
                }
            }
        }
        acked.len()
    }

    /// Highest seq acked in this process (0 if none).
    pub fn last_acked_seq(&self) -> u64 {
        self.last_acked_seq
    }

    /// Batches waiting.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Batches dropped (full spool, unreadable file) since the spool was created.
    pub fn dropped_batches(&self) -> u64 {
        self.state.dropped_batches_total
    }

    /// Bytes the batches waiting count against the bound (whole 4 KiB blocks each).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Seq the next batch gets; `None` until numbered.
    pub fn next_seq(&self) -> Option<u64> {
        self.state.numbered().then_some(self.state.next_seq)
    }

    /// Moves unreadable batches to `corrupt/` and counts them as dropped.
    pub fn quarantine(&mut self, seqs: &[u64]) {
        let mut lost = 0u64;
        for seq in seqs {
            let Some(entry) = self.entries.remove(seq) else {
                continue;
            };
            self.forget(&entry);
            if let Body::File(path) = &entry.body {
                self.quarantine_file(path);
            }
            lost += 1;
            tracing::error!(
                seq,
                "SpoolBatchUnreadable: moved to corrupt/ and counted as dropped"
            );
        }
        if lost > 0 {
            self.state.dropped_batches_total += lost;
            self.write_state();
        }
    }

    fn insert(&mut self, key: u64, bytes: u64, body: Body) {
        self.bytes += bytes;
        if let Some(old) = self.entries.insert(key, Entry { bytes, body }) {
            self.forget(&old);
        }
    }

    /// Accounting for an entry that left the index.
    fn forget(&mut self, entry: &Entry) {
        self.bytes -= entry.bytes;
        if matches!(entry.body, Body::Memory(_)) {
            self.memory_bytes -= entry.bytes;
        }
    }

    /// Takes the oldest entries out while over `max_bytes`, counting them.
    fn shed(&mut self) -> Vec<Entry> {
        let mut dropped = Vec::new();
        while self.bytes > self.max_bytes {
            let Some((_, entry)) = self.entries.pop_first() else {
                break;
            };
            self.forget(&entry);
            dropped.push(entry);
        }
        self.count_dropped(dropped.len() as u64);
        dropped
    }

    /// Takes the oldest in-memory entries out while over the memory fallback bound.
    fn shed_memory(&mut self) -> Vec<Entry> {
        let cap = MEMORY_FALLBACK_MAX_BYTES.min(self.max_bytes);
        let mut dropped = Vec::new();
        while self.memory_bytes > cap {
            let Some(key) = self
                .entries
                .iter()
                .find(|(_, e)| matches!(e.body, Body::Memory(_)))
                .map(|(k, _)| *k)
            else {
                break;
            };
            if let Some(entry) = self.entries.remove(&key) {
                self.forget(&entry);
                dropped.push(entry);
            }
        }
        self.count_dropped(dropped.len() as u64);
        dropped
    }

    fn count_dropped(&mut self, n: u64) {
        if n == 0 {
            return;
        }
        self.state.dropped_batches_total += n;
        if let Some(since_last_log) = self.drop_log.note(n) {
            tracing::warn!(
                dropped_batches_total = self.state.dropped_batches_total,
                dropped_since_last_log = since_last_log,
                pending = self.entries.len(),
                bytes = self.bytes,
                max_bytes = self.max_bytes,
                "SpoolBatchesDropped: spool full while the server is unreachable; oldest batches dropped"
            );
        }
    }

    /// Deletes the files of dropped entries (after the counter was persisted).
    fn delete_dropped(&mut self, dropped: Vec<Entry>) {
        for entry in dropped {
            if let Body::File(path) = entry.body
                && let Err(error) = fs::remove_file(&path)
                && error.kind() != std::io::ErrorKind::NotFound
            {
                self.io_failed("delete a dropped batch", &path, &error);
            }
        }
    }

    /// Writes one batch file; `Err` (already logged) when the disk refuses.
    fn write_batch(&mut self, numbered: bool, key: u64, body: &[u8]) -> Result<PathBuf, ()> {
        let folder = self.dir.join(if numbered { BATCHES } else { UNNUMBERED });
        let path = folder.join(format!("{key:020}.pb"));
        match write_atomic(&folder, &path, body) {
            Ok(()) => Ok(path),
            Err(error) => {
                self.io_failed("write a batch (kept in memory)", &path, &error);
                Err(())
            }
        }
    }

    /// Writes batches held in memory to disk, oldest first, until one fails.
    fn spill_memory(&mut self) {
        if self.memory_bytes == 0 {
            return;
        }
        let numbered = self.state.numbered();
        let held: Vec<(u64, Arc<[u8]>)> = self
            .entries
            .iter()
            .filter_map(|(key, e)| match &e.body {
                Body::Memory(body) => Some((*key, Arc::clone(body))),
                Body::File(_) => None,
            })
            .collect();
        for (key, body) in held {
            let Ok(path) = self.write_batch(numbered, key, &body) else {
                return;
            };
            if let Some(entry) = self.entries.get_mut(&key) {
                entry.body = Body::File(path);
                self.memory_bytes -= entry.bytes;
            }
        }
    }

    /// Persists the state; a failure is logged and retried with the next change.
    fn write_state(&mut self) {
        let text = match toml::to_string(&self.state) {
            Ok(text) => text,
            Err(error) => {
                tracing::error!(%error, "SpoolStateUnencodable");
                return;
            }
        };
        let path = self.dir.join(STATE_FILE);
        if let Err(error) = write_atomic(&self.dir, &path, text.as_bytes()) {
            self.io_failed("write the state", &path, &error);
        }
    }

    /// The stored state; an unreadable one is moved aside and rebuilt from the files.
    fn read_state(&self) -> Result<Option<State>, SpoolError> {
        let path = self.dir.join(STATE_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(SpoolError::Io {
                    dir: self.dir.clone(),
                    action: format!("read {}", path.display()),
                    source,
                });
            }
        };
        match toml::from_str::<State>(&text) {
            Ok(state) if state.version > STATE_VERSION => Err(SpoolError::Incompatible {
                dir: self.dir.clone(),
                found: state.version,
            }),
            Ok(state) => Ok(Some(state)),
            Err(error) => {
                tracing::error!(
                    path = %path.display(), %error,
                    "SpoolStateCorrupt: moved to corrupt/; numbering is rebuilt from the batch files"
                );
                self.quarantine_file(&path);
                Ok(None)
            }
        }
    }

    /// Lists `sub/` as `(number, size, path)`, oldest first; removes leftovers of interrupted
    /// writes and quarantines files that do not decode. Bodies are read one at a time.
    fn scan(&mut self, sub: &str) -> std::io::Result<Vec<(u64, u64, PathBuf)>> {
        let mut found = Vec::new();
        let mut corrupt = 0u64;
        for item in fs::read_dir(self.dir.join(sub))? {
            let path = item?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if name.ends_with(".tmp") {
                let _ = fs::remove_file(&path);
                continue;
            }
            let Some(number) = name
                .strip_suffix(".pb")
                .and_then(|n| n.parse::<u64>().ok())
                .filter(|n| *n > 0)
            else {
                tracing::warn!(path = %path.display(), "SpoolStrayFile: not a batch file; left alone");
                continue;
            };
            match fs::read(&path) {
                Ok(body) if SampleBatch::decode(body.as_slice()).is_ok() => {
                    found.push((number, footprint(body.len()), path));
                }
                result => {
                    let why = result.map_or_else(|e| e.to_string(), |_| "does not decode".into());
                    tracing::error!(
                        path = %path.display(), why,
                        "SpoolBatchUnreadable: moved to corrupt/ and counted as dropped"
                    );
                    self.quarantine_file(&path);
                    corrupt += 1;
                }
            }
        }
        self.state.dropped_batches_total += corrupt;
        found.sort_unstable_by_key(|(number, _, _)| *number);
        Ok(found)
    }

    /// Moves a file to `corrupt/` (deleting it if that fails, so it is not read again).
    fn quarantine_file(&self, path: &Path) {
        let folder = path
            .parent()
            .and_then(Path::file_name)
            .and_then(|n| n.to_str())
            .unwrap_or("spool");
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
        let target = self
            .dir
            .join(CORRUPT)
            .join(format!("{folder}-{name}.{}", crate::unix_ms()));
        if fs::rename(path, &target).is_err() {
            let _ = fs::remove_file(path);
        }
    }

    fn io_failed(&mut self, action: &str, path: &Path, error: &std::io::Error) {
        if let Some(failures) = self.io_log.note(1) {
            tracing::error!(
                action, path = %path.display(), %error, failures_since_last_log = failures,
                pending = self.entries.len(), memory_bytes = self.memory_bytes,
                "SpoolIoFailed: the agent keeps running; batches that cannot be written stay in memory"
            );
        }
    }
}

impl Plan {
    /// Reads the planned batches (no lock needed). Returns them, numbered and carrying the
    /// drop counter, plus the seqs whose files could not be read or decoded. A file that is
    /// gone was acked or dropped meanwhile and is skipped.
    pub fn read(self) -> (Vec<SampleBatch>, Vec<u64>) {
        let mut batches = Vec::with_capacity(self.items.len());
        let mut unreadable = Vec::new();
        for (seq, body) in self.items {
            let decoded = match body {
                Body::Memory(bytes) => SampleBatch::decode(&bytes[..]).ok(),
                Body::File(path) => match read_file(&path) {
                    Ok(bytes) => SampleBatch::decode(bytes.as_slice()).ok(),
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(error) => {
                        tracing::error!(path = %path.display(), %error, "SpoolReadFailed");
                        None
                    }
                },
            };
            match decoded {
                Some(mut batch) => {
                    // The name is authoritative: unnumbered files were written with seq 0.
                    batch.seq = seq;
                    batch.spool_dropped_batches_total = self.dropped_total;
                    batches.push(batch);
                }
                None => unreadable.push(seq),
            }
        }
        (batches, unreadable)
    }
}

/// Batches after `after_seq` (exclusive), oldest first, at most `limit`, holding `spool`'s
/// lock only to plan and, if a file was unreadable, to quarantine it: the files are read
/// with the lock released.
pub fn read_after(spool: &Mutex<Spool>, after_seq: u64, limit: usize) -> Vec<SampleBatch> {
    let lock = || spool.lock().unwrap_or_else(PoisonError::into_inner);
    let plan = lock().plan_after(after_seq, limit);
    let (batches, unreadable) = plan.read();
    if !unreadable.is_empty() {
        lock().quarantine(&unreadable);
    }
    batches
}

/// What a batch of `len` encoded bytes counts against the bound.
fn footprint(len: usize) -> u64 {
    (len as u64).div_ceil(BLOCK_BYTES).max(1) * BLOCK_BYTES
}

fn read_file(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    File::open(path)?.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Writes `path` atomically and durably: temp file, fsync, rename, fsync of `folder`.
fn write_atomic(folder: &Path, path: &Path, body: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(body)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(folder)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Takes the spool's `flock` (non-blocking) and records this pid in the lock file.
fn lock(dir: &Path) -> Result<File, SpoolError> {
    let path = dir.join(LOCK_FILE);
    let io = |action: &str| {
        let action = format!("{action} {}", path.display());
        move |source| SpoolError::Io {
            dir: dir.to_path_buf(),
            action,
            source,
        }
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io("open"))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(errno) if errno == rustix::io::Errno::WOULDBLOCK => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = text
                .trim()
                .parse::<u32>()
                .map_or_else(|_| "pid unknown".to_owned(), |pid| format!("pid {pid}"));
            return Err(SpoolError::Locked {
                dir: dir.to_path_buf(),
                holder,
            });
        }
        Err(errno) => return Err(io("lock")(errno.into())),
    }
    file.set_len(0).map_err(io("truncate"))?;
    file.write_all(format!("{}\n", std::process::id()).as_bytes())
        .map_err(io("write"))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn seqs(spool: &mut Spool) -> Vec<u64> {
        spool.batches_after(0, 1000).iter().map(|b| b.seq).collect()
    }

    /// A batch of about `bytes` encoded bytes.
    fn sized(bytes: usize) -> Vec<Sample> {
        vec![Sample {
            observed_at_unix_ms: 1,
            kind: Some(guardian_proto::v1::sample::Kind::Unavailable(
                guardian_proto::v1::SamplerUnavailable {
                    sampler: "test".into(),
                    reason: "x".repeat(bytes),
                },
            )),
        }]
    }

    #[test]
    fn a_fresh_spool_waits_for_the_first_welcome_then_numbers_from_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut spool = Spool::open(dir.path(), MIB).expect("open");
        assert!(!spool.has_base());
        spool.push(vec![]);
        spool.push(vec![]);
        assert!(
            spool.batches_after(0, 10).is_empty(),
            "no numbering before Welcome"
        );
        assert_eq!(spool.ack(100), 0, "nothing is acked before numbering");
        spool.set_base(40);
        // A reconnect: the server stored what was sent; the numbering stays.
        spool.set_base(42);
        assert_eq!(seqs(&mut spool), vec![41, 42]);
        spool.push(vec![]);
        assert_eq!(seqs(&mut spool), vec![41, 42, 43]);
        assert_eq!(spool.batches_after(41, 10)[0].seq, 42);
    }

    #[test]
    fn unnumbered_batches_survive_a_restart_and_are_numbered_by_the_later_welcome() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut spool = Spool::open(dir.path(), MIB).expect("open");
            spool.push(vec![]);
            spool.push(vec![]);
        }
        let mut spool = Spool::open(dir.path(), MIB).expect("reopen");
        assert_eq!(spool.len(), 2);
        spool.push(vec![]);
        spool.set_base(0);
        assert_eq!(seqs(&mut spool), vec![1, 2, 3]);
        drop(spool);
        // The mapping is persisted: the files keep those numbers.
        let mut spool = Spool::open(dir.path(), MIB).expect("reopen");
        assert_eq!(seqs(&mut spool), vec![1, 2, 3]);
        assert_eq!(spool.next_seq(), Some(4));
    }

    #[test]
    fn numbering_continues_across_reopen_and_acked_files_are_deleted() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut spool = Spool::open(dir.path(), MIB).expect("open");
            spool.set_base(10);
            spool.push(vec![]);
            spool.push(vec![]);
            spool.push(vec![]);
            assert_eq!(spool.ack(12), 2);
            assert_eq!(spool.last_acked_seq(), 12);
            let files = fs::read_dir(dir.path().join(BATCHES)).expect("ls").count();
            assert_eq!(files, 1, "acked files are deleted");
            assert_eq!(spool.ack(13), 1);
        }
        let mut spool = Spool::open(dir.path(), MIB).expect("reopen");
        assert!(spool.has_base(), "a restarted spool needs no Welcome");
        assert!(spool.is_empty());
        spool.push(vec![]);
        assert_eq!(seqs(&mut spool), vec![14], "no seq is reused");
    }

    #[test]
    fn a_full_spool_drops_the_oldest_and_the_counter_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut spool = Spool::open(dir.path(), MIB).expect("open");
            spool.set_base(0);
            for _ in 0..3 {
                assert_eq!(spool.push(sized(300_000)), None);
            }
            assert_eq!(spool.push(sized(300_000)), Some(1));
            assert_eq!(spool.push(sized(300_000)), Some(2));
            assert!(spool.bytes() <= MIB);
            assert_eq!(seqs(&mut spool), vec![3, 4, 5]);
            let sent = spool.batches_after(0, 1);
            assert_eq!(sent[0].spool_dropped_batches_total, 2);
        }
        let mut spool = Spool::open(dir.path(), MIB).expect("reopen");
        assert_eq!(spool.dropped_batches(), 2);
        assert_eq!(seqs(&mut spool), vec![3, 4, 5]);
    }

    #[test]
    fn a_corrupt_file_is_quarantined_and_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut spool = Spool::open(dir.path(), MIB).expect("open");
            spool.set_base(0);
            spool.push(vec![]);
            spool.push(sized(10));
        }
        fs::write(
            dir.path().join(BATCHES).join(format!("{:020}.pb", 2)),
            b"\xff\xff\xff",
        )
        .expect("corrupt");
        let mut spool = Spool::open(dir.path(), MIB).expect("reopen");
        assert_eq!(seqs(&mut spool), vec![1]);
        assert_eq!(spool.dropped_batches(), 1);
        assert_eq!(spool.next_seq(), Some(3));
        let quarantined = fs::read_dir(dir.path().join(CORRUPT)).expect("ls").count();
        assert_eq!(quarantined, 1);

        // Corrupted after open: found when read for sending.
        fs::write(
            dir.path().join(BATCHES).join(format!("{:020}.pb", 1)),
            b"\xff",
        )
        .expect("corrupt");
        assert!(spool.batches_after(0, 10).is_empty());
        assert_eq!(spool.dropped_batches(), 2);
        assert!(spool.is_empty());
    }

    #[test]
    fn a_welcome_ahead_of_the_spool_moves_the_numbering_past_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut spool = Spool::open(dir.path(), MIB).expect("open");
        spool.set_base(0);
        spool.push(vec![]);
        spool.set_base(50);
        spool.push(vec![]);
        assert_eq!(
            seqs(&mut spool),
            vec![1, 51],
            "written batches keep their number"
        );
        spool.set_base(10);
        spool.push(vec![]);
        assert_eq!(seqs(&mut spool), vec![1, 51, 52]);
    }

    #[test]
    fn a_second_open_of_the_same_folder_is_refused_naming_the_holder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(dir.path(), MIB).expect("open");
        let error = Spool::open(dir.path(), MIB).expect_err("locked");
        assert_eq!(error.kind(), "locked");
        let text = error.to_string();
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        drop(spool);
        Spool::open(dir.path(), MIB).expect("free after close");
    }

    #[test]
    fn an_unwritable_disk_keeps_batches_in_memory_and_sends_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut spool = Spool::open(dir.path(), MIB).expect("open");
        spool.set_base(0);
        // A file where the folder should be: every write fails, also as root.
        fs::remove_dir_all(dir.path().join(BATCHES)).expect("rm");
        fs::write(dir.path().join(BATCHES), b"").expect("block");
        spool.push(vec![]);
        spool.push(vec![]);
        assert_eq!(seqs(&mut spool), vec![1, 2]);
        // Writing works again: held batches go to disk with the next one.
        fs::remove_file(dir.path().join(BATCHES)).expect("unblock");
        fs::create_dir(dir.path().join(BATCHES)).expect("mkdir");
        spool.push(vec![]);
        assert_eq!(spool.memory_bytes, 0);
        let files = fs::read_dir(dir.path().join(BATCHES)).expect("ls").count();
        assert_eq!(files, 3);
        assert_eq!(spool.ack(3), 3);
    }

    #[test]
    fn a_restart_after_a_lost_state_write_does_not_reuse_a_seq() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut spool = Spool::open(dir.path(), MIB).expect("open");
            spool.set_base(5);
            spool.push(vec![]);
            spool.push(vec![]);
        }
        fs::remove_file(dir.path().join(STATE_FILE)).expect("rm state");
        let mut spool = Spool::open(dir.path(), MIB).expect("reopen");
        assert_eq!(spool.next_seq(), Some(8));
        assert_eq!(seqs(&mut spool), vec![6, 7]);
    }
}
