//! Group commit: every session hands its batch to one writer task, which commits all the
//! batches waiting at that moment in one transaction and answers each session. One fsync
//! then covers hundreds of batches, which is what lets a single SQLite file keep up with a
//! fleet.
//!
//! # Guarantees
//! - A session's [`Committer::commit`] returns `Stored` only after the transaction holding
//!   its batch committed; `Duplicate` when `(node, seq)` was committed before; `BelowFloor`
//!   when its seq is at or below the node's floor (stored, or dropped by the agent's spool,
//!   long ago: [`super::records`]).
//! - If a group's transaction fails, each of its batches is retried alone, so one bad batch
//!   cannot fail the others.
//! - With ClickHouse as the telemetry store, batches go to the durable outbox instead of
//!   the embedded rows, and the writer stops taking new batches while the outbox holds more
//!   than its byte bound (backpressure: agents keep them in their spools meanwhile).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::batch::{Batch, Kind};
use prost::Message;
use sqlx::{AssertSqlSafe, Row};
use tokio::sync::{Notify, mpsc, oneshot};

use super::telemetry::{ChainValues, GpuValues, OutboxBlob};
use super::{Backend, Commit, Ledger, StoreError, to_i64};
use crate::identity::NodeId;

/// Most batches committed in one transaction.
const MAX_GROUP_BATCHES: usize = 512;
/// How long the writer waits for more batches after the first of a group. At 1 000
/// batches/s, 3 ms (with groups below 16) made ~11-batch groups, 92 fsyncs a second; 10 ms
/// (below 64) ~17-batch groups; 20 ms (below 128) ~27-batch groups and 30 ms ~40, each
/// ~1 us less server CPU per sample than 10 ms (within the runs' noise of each other) for
/// ~10-15 ms more ack latency at p50 (BENCHMARKS.md). Telemetry at 12 s blocks does not
/// notice, and decisions stay well inside their 200 ms. A session commits one batch at a
/// time, so one agent's replay runs at about one batch per linger plus commit (~30/s).
const COMMIT_LINGER: Duration = Duration::from_millis(20);
/// The writer lingers only after groups smaller than this (a larger bound than the groups
/// a linger makes, so that a busy fleet does not alternate between lingering and not).
const LINGER_BELOW_BATCHES: usize = 128;
/// Bound values per multi-row INSERT statement (SQLite allows 32 766, PostgreSQL 65 535).
/// With numbered placeholders sqlx-sqlite resolves each parameter's name by a linear scan, so
/// binding was quadratic in the values per statement (a 400-row statement spent 80 % of the
/// server's CPU there); SQLite statements therefore use anonymous `?` placeholders.
const VALUES_PER_STATEMENT: usize = 4096;

/// Where a committed batch's samples go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Telemetry {
    /// Typed rows in the ledger database (the default, embedded store).
    Embedded,
    /// The outbox, drained into ClickHouse by the sink.
    Outbox,
}

/// One batch to commit.
#[derive(Debug, Clone)]
pub struct Job {
    /// The node (from its certificate).
    pub node: NodeId,
    /// Its network (from its Hello).
    pub network: String,
    /// The batch (shared with the session, which needs it after the commit).
    pub batch: Arc<Batch>,
}

/// The outbox's size, shared by the writer (adds) and the sink (removes), and the
/// in-memory hand-off of freshly committed batches to the sink.
#[derive(Debug, Default)]
pub struct OutboxGauge {
    /// Batches waiting for ClickHouse.
    pub batches: AtomicU64,
    /// Their size (outbox blob bytes).
    pub bytes: AtomicU64,
    /// Signalled when batches are added.
    pub added: Notify,
    /// Signalled when batches are removed.
    pub drained: Notify,
    /// Committed batches waiting for the sink in memory (a copy: the outbox row stays the
    /// durable one until ClickHouse holds it).
    handoff: std::sync::Mutex<Handoff>,
}

/// Committed outbox batches in commit order, each linked to the outbox id committed before
/// it, so the sink can tell whether memory holds *every* batch after its cursor.
#[derive(Debug, Default)]
struct Handoff {
    queue: std::collections::VecDeque<Handed>,
    /// Encoded bytes of the queued batches.
    bytes: u64,
    /// Bound on `bytes`; 0 turns the hand-off off.
    max_bytes: u64,
    /// The newest outbox id the writer committed, when it knows it (not across a restart
    /// or a failed group, when the chain starts again).
    last_id: Option<u64>,
}

#[derive(Debug)]
struct Handed {
    /// The outbox id committed just before this batch (None: not known).
    prev_id: Option<u64>,
    /// The batch as the outbox holds it (its blob's size is what it costs memory).
    blob: OutboxBlob,
}

impl OutboxGauge {
    /// Records batches removed by the sink.
    pub fn remove(&self, batches: u64, bytes: u64) {
        let sub = |cell: &AtomicU64, n: u64| {
            let _ = cell.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n))
            });
        };
        sub(&self.batches, batches);
        sub(&self.bytes, bytes);
        self.drained.notify_waiters();
    }

    /// Keeps at most `max_bytes` (outbox blob bytes) of committed batches in memory for the sink; 0
    /// turns the hand-off off.
    pub fn set_handoff_max_bytes(&self, max_bytes: u64) {
        self.lock_handoff().max_bytes = max_bytes;
    }

    fn lock_handoff(&self) -> std::sync::MutexGuard<'_, Handoff> {
        self.handoff
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The writer committed `batches` (ascending outbox ids) as the only outbox rows of one
    /// transaction: counts them and hands them to the sink.
    fn added_group(&self, batches: Vec<OutboxBlob>) {
        if batches.is_empty() {
            return;
        }
        let bytes: u64 = batches.iter().map(|b| b.blob.len() as u64).sum();
        self.batches
            .fetch_add(batches.len() as u64, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.hand_off(batches);
        self.added.notify_one();
    }

    fn hand_off(&self, batches: Vec<OutboxBlob>) {
        let mut handoff = self.lock_handoff();
        for blob in batches {
            let id = blob.outbox_id;
            let bytes = blob.blob.len() as u64;
            let prev_id = handoff.last_id.replace(id);
            // A full queue drops the copy; the link of the next one then points at a
            // batch memory lacks and the sink reads the outbox table instead.
            if handoff.max_bytes > 0 && handoff.bytes + bytes <= handoff.max_bytes {
                handoff.bytes += bytes;
                handoff.queue.push_back(Handed { prev_id, blob });
            }
        }
    }

    /// Before its first group: `ceiling` is at least every outbox id committed so far
    /// ([`Ledger::outbox_id_ceiling`]), so the first batch the writer hands off directly
    /// follows it. When the sink's cursor is there too (everything delivered, e.g. a fresh
    /// store) the sink takes batches from memory from the start; otherwise it reads the table
    /// until it gets there, as after any break. A ceiling above the last committed id (a
    /// rolled-back id) only means the sink reads the table once more.
    fn start_chain(&self, ceiling: u64) {
        self.lock_handoff().last_id.get_or_insert(ceiling);
    }

    /// The writer cannot tell which outbox ids a transaction got (it failed): the chain
    /// starts again.
    fn break_chain(&self) {
        self.lock_handoff().last_id = None;
    }

    /// The batches right after `cursor` (the highest outbox id ClickHouse holds), from
    /// memory: `None` when memory does not hold the very next one (after a restart, a
    /// failure or an overflow the sink reads the outbox table). Stops once `max_samples`
    /// samples are reached and at `max_batches` (as [`Ledger::outbox_read`] does).
    /// Batches at or below `cursor` are forgotten. The blobs are shared, not copied; the
    /// sink decodes them once it inserts them.
    pub fn take_after(
        &self,
        cursor: u64,
        max_batches: usize,
        max_samples: usize,
    ) -> Option<Vec<OutboxBlob>> {
        let mut handoff = self.lock_handoff();
        while handoff
            .queue
            .front()
            .is_some_and(|h| h.blob.outbox_id <= cursor)
        {
            if let Some(gone) = handoff.queue.pop_front() {
                handoff.bytes -= gone.blob.blob.len() as u64;
            }
        }
        let first = handoff.queue.front()?;
        if first.prev_id != Some(cursor) {
            return None;
        }
        let mut out: Vec<OutboxBlob> = Vec::new();
        let mut samples = 0usize;
        let mut prev = cursor;
        for handed in &handoff.queue {
            if handed.prev_id != Some(prev) || out.len() >= max_batches {
                break;
            }
            samples += handed.blob.samples;
            prev = handed.blob.outbox_id;
            out.push(handed.blob.clone());
            if samples >= max_samples {
                break;
            }
        }
        Some(out)
    }

    /// Batches and blob bytes held in memory for the sink.
    pub fn handoff_len(&self) -> (usize, u64) {
        let handoff = self.lock_handoff();
        (handoff.queue.len(), handoff.bytes)
    }
}

/// Why a commit failed, as a session sees it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct CommitError {
    /// Stable label ([`StoreError::kind`]).
    pub kind: &'static str,
    /// What failed.
    pub message: String,
}

impl From<&StoreError> for CommitError {
    fn from(error: &StoreError) -> Self {
        Self {
            kind: error.kind(),
            message: error.to_string(),
        }
    }
}

struct Pending {
    job: Job,
    reply: oneshot::Sender<Result<Commit, CommitError>>,
}

/// Observes each group: (batches in the group, seconds the transaction took).
pub type GroupObserver = Arc<dyn Fn(usize, f64) + Send + Sync>;

/// The handle sessions commit through.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<Pending>,
}

impl std::fmt::Debug for Committer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Committer").finish_non_exhaustive()
    }
}

impl Committer {
    /// Starts the writer task. It ends when every [`Committer`] clone is dropped, after
    /// committing what was queued.
    pub fn spawn(
        ledger: Ledger,
        telemetry: Telemetry,
        outbox: Arc<OutboxGauge>,
        max_outbox_bytes: u64,
        observe: GroupObserver,
        tasks: &tokio_util::task::TaskTracker,
    ) -> Self {
        let (tx, rx) = mpsc::channel(4 * MAX_GROUP_BATCHES);
        tasks.spawn(writer(
            ledger,
            telemetry,
            outbox,
            max_outbox_bytes,
            observe,
            rx,
        ));
        Self { tx }
    }

    /// Commits one batch; returns once it is durable (or known to be a replay).
    ///
    /// # Errors
    /// [`CommitError`] when the store failed: the batch is not stored and must not be acked.
    pub async fn commit(&self, job: Job) -> Result<Commit, CommitError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || CommitError {
            kind: "stopped",
            message: "the store writer has stopped (server shutting down)".to_owned(),
        };
        self.tx
            .send(Pending { job, reply })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

async fn writer(
    ledger: Ledger,
    telemetry: Telemetry,
    outbox: Arc<OutboxGauge>,
    max_outbox_bytes: u64,
    observe: GroupObserver,
    mut rx: mpsc::Receiver<Pending>,
) {
    let mut group: Vec<Pending> = Vec::with_capacity(MAX_GROUP_BATCHES);
    let mut warned_full = false;
    if telemetry == Telemetry::Outbox {
        match ledger.outbox_id_ceiling().await {
            Ok(Some(ceiling)) => outbox.start_chain(ceiling),
            Ok(None) => {}
            // The sink then reads the first batches from the table: slower, not wrong.
            Err(error) => tracing::warn!(%error, "OutboxCeilingUnknown"),
        }
    }
    let mut last_group = 0usize;
    loop {
        if telemetry == Telemetry::Outbox {
            // Backpressure: hold new batches while the outbox is over its bound.
            while outbox.bytes.load(Ordering::Relaxed) > max_outbox_bytes {
                if !warned_full {
                    tracing::warn!(
                        pending_bytes = outbox.bytes.load(Ordering::Relaxed),
                        max_outbox_bytes,
                        "OutboxFull: ClickHouse is behind; ingest paused (agents keep spooling)"
                    );
                    warned_full = true;
                }
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), outbox.drained.notified()).await;
            }
            warned_full = false;
        }
        let Some(first) = rx.recv().await else { return };
        group.push(first);
        // After a small group, linger briefly for more: each transaction costs thread
        // hand-offs and an fsync whatever its size, so at a fleet's steady trickle a few
        // milliseconds of ack latency buy several batches per transaction. Under load the
        // groups are large anyway and the writer does not wait.
        let linger = last_group < LINGER_BELOW_BATCHES;
        let deadline = tokio::time::Instant::now() + COMMIT_LINGER;
        while group.len() < MAX_GROUP_BATCHES {
            match rx.try_recv() {
                Ok(more) => group.push(more),
                Err(mpsc::error::TryRecvError::Empty) if !linger => break,
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(more)) => group.push(more),
                        Ok(None) | Err(_) => break,
                    }
                }
            }
        }
        last_group = group.len();
        let jobs: Vec<Job> = group.iter().map(|p| p.job.clone()).collect();
        let started = Instant::now();
        let now = crate::unix_ms();
        match ledger.commit_group(&jobs, telemetry, now).await {
            Ok(done) => {
                observe(jobs.len(), started.elapsed().as_secs_f64());
                outbox.added_group(done.outbox);
                for (pending, commit) in group.drain(..).zip(done.commits) {
                    let _ = pending.reply.send(Ok(commit));
                }
            }
            Err(error) if group.len() > 1 => {
                tracing::warn!(%error, batches = group.len(), "GroupCommitFailed: retrying each batch alone");
                outbox.break_chain();
                for pending in group.drain(..) {
                    let result = ledger
                        .commit_group(std::slice::from_ref(&pending.job), telemetry, now)
                        .await;
                    let reply = match result {
                        Ok(mut done) => {
                            outbox.added_group(std::mem::take(&mut done.outbox));
                            Ok(done.commits.remove(0))
                        }
                        Err(error) => {
                            outbox.break_chain();
                            Err(CommitError::from(&error))
                        }
                    };
                    let _ = pending.reply.send(reply);
                }
            }
            Err(error) => {
                outbox.break_chain();
                let error = CommitError::from(&error);
                for pending in group.drain(..) {
                    let _ = pending.reply.send(Err(error.clone()));
                }
            }
        }
    }
}

/// `(?, ?, ...)` (SQLite) or `($a, $b, ...)` (PostgreSQL) for one row of `width` values
/// starting after `*next`.
fn placeholders(next: &mut usize, width: usize, backend: Backend) -> String {
    let mut row = String::with_capacity(width * 4 + 2);
    row.push('(');
    for i in 0..width {
        if i > 0 {
            row.push_str(", ");
        }
        *next += 1;
        match backend {
            // Anonymous parameters: sqlx-sqlite then binds each in O(1) (a numbered one costs
            // a linear scan of the statement's parameter names).
            Backend::Sqlite => row.push('?'),
            Backend::Postgres => {
                row.push('$');
                row.push_str(&next.to_string());
            }
        }
    }
    row.push(')');
    row
}

/// A value bound into a multi-row INSERT.
#[derive(Debug, Clone)]
enum Value {
    I(i64),
    F(f64),
    T(String),
    B(Vec<u8>),
}

/// `INSERT INTO table (columns) VALUES (...), ...` for `rows` rows, then `suffix`, with every
/// value bound (table and column names are constants of this module).
fn insert_query(
    backend: Backend,
    table: &str,
    columns: &[&str],
    rows: Vec<Vec<Value>>,
    suffix: &str,
) -> sqlx::query::Query<'static, sqlx::Any, sqlx::any::AnyArguments> {
    let mut sql = format!("INSERT INTO {table} ({}) VALUES ", columns.join(", "));
    let mut next = 0usize;
    for i in 0..rows.len() {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&placeholders(&mut next, columns.len(), backend));
    }
    sql.push_str(suffix);
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for value in rows.into_iter().flatten() {
        query = match value {
            Value::I(v) => query.bind(v),
            Value::F(v) => query.bind(v),
            Value::T(v) => query.bind(v),
            Value::B(v) => query.bind(v),
        };
    }
    query
}

/// `rows` in statements of at most [`VALUES_PER_STATEMENT`] bound values.
fn statements(rows: Vec<Vec<Value>>, columns: usize) -> Vec<Vec<Vec<Value>>> {
    let rows_per_statement = (VALUES_PER_STATEMENT / columns.max(1)).max(1);
    let mut rows = rows.into_iter().peekable();
    let mut out = Vec::new();
    while rows.peek().is_some() {
        out.push(rows.by_ref().take(rows_per_statement).collect());
    }
    out
}

/// Multi-row INSERT of `rows` into `table(columns)`, in statements of at most
/// [`VALUES_PER_STATEMENT`] bound values.
async fn insert_rows(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    backend: Backend,
    table: &str,
    columns: &[&str],
    rows: Vec<Vec<Value>>,
) -> Result<(), StoreError> {
    for chunk in statements(rows, columns.len()) {
        debug_assert!(chunk.iter().all(|row| row.len() == columns.len()));
        insert_query(backend, table, columns, chunk, "")
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

const HOST_COLUMNS: &[&str] = &[
    "node_id",
    "seq",
    "idx",
    "observed_at_unix_ms",
    "cpu_busy_percent",
    "cpu_iowait_percent",
    "mem_total_bytes",
    "mem_available_bytes",
    "load_avg_1m",
    "cpu_psi_some_avg10_percent",
    "memory_psi_full_avg10_percent",
    "io_psi_full_avg10_percent",
    "chain_data_used_percent",
    "chain_data_available_bytes",
    "disk_read_latency_ms_max",
    "disk_write_latency_ms_max",
    "disk_utilisation_percent_max",
    "net_rx_bytes_per_second",
    "net_tx_bytes_per_second",
    "net_errors_total",
    "oom_kills_total",
    "sample",
];

const CHAIN_COLUMNS: &[&str] = &[
    "node_id",
    "seq",
    "idx",
    "observed_at_unix_ms",
    "responsive",
    "best_block",
    "finalized_block",
    "sync_highest_block",
    "reference_best_block",
    "block_lag",
    "finality_lag_blocks",
    "peers",
    "is_syncing",
    "head_age_ms",
    "rpc_latency_ms",
    "spec_version",
    "blocks_since_last_update",
    "validator_trust_ratio",
    "emission_rao",
];

const GPU_COLUMNS: &[&str] = &[
    "node_id",
    "seq",
    "idx",
    "gpu_index",
    "observed_at_unix_ms",
    "gpu_uuid",
    "utilisation_gpu_percent",
    "memory_used_bytes",
    "temperature_celsius",
    "power_draw_watts",
    "sm_clock_mhz",
    "throttle_reasons_bitmask",
    "ecc_uncorrected_total",
    "pcie_replay_total",
    "xid_events",
];

#[derive(Default)]
struct Rows {
    host: Vec<Vec<Value>>,
    chain: Vec<Vec<Value>>,
    gpu: Vec<Vec<Value>>,
    unavailable: Vec<Vec<Value>>,
    kind: Vec<Vec<Value>>,
}

impl Rows {
    fn add(&mut self, node: &str, batch: &Batch) {
        let seq = to_i64(batch.seq);
        let key = |idx: usize, at: i64| {
            vec![
                Value::T(node.to_owned()),
                Value::I(seq),
                Value::I(to_i64(idx as u64)),
                Value::I(at),
            ]
        };
        for (idx, sample) in batch.samples.iter().enumerate() {
            let at = sample.observed_at_unix_ms;
            match &sample.kind {
                Some(Kind::Host(host)) => {
                    let v = host.values;
                    let mut row = key(idx, at);
                    row.extend([
                        Value::F(v.cpu_busy_percent),
                        Value::F(v.cpu_iowait_percent),
                        Value::I(to_i64(v.mem_total_bytes)),
                        Value::I(to_i64(v.mem_available_bytes)),
                        Value::F(v.load_avg_1m),
                        Value::F(v.cpu_psi_some_avg10_percent),
                        Value::F(v.memory_psi_full_avg10_percent),
                        Value::F(v.io_psi_full_avg10_percent),
                        Value::F(v.chain_data_used_percent),
                        Value::I(to_i64(v.chain_data_available_bytes)),
                        Value::F(v.disk_read_latency_ms_max),
                        Value::F(v.disk_write_latency_ms_max),
                        Value::F(v.disk_utilisation_percent_max),
                        Value::F(v.net_rx_bytes_per_second),
                        Value::F(v.net_tx_bytes_per_second),
                        Value::I(to_i64(v.net_errors_total)),
                        Value::I(to_i64(v.oom_kills_total)),
                        Value::B(host.encoded.to_vec()),
                    ]);
                    self.host.push(row);
                }
                Some(Kind::Chain(chain)) => {
                    let v = ChainValues::of(chain);
                    let mut row = key(idx, at);
                    row.extend([
                        Value::I(i64::from(v.responsive)),
                        Value::I(to_i64(v.best_block)),
                        Value::I(to_i64(v.finalized_block)),
                        Value::I(to_i64(v.sync_highest_block)),
                        Value::I(to_i64(v.reference_best_block)),
                        Value::I(to_i64(v.block_lag)),
                        Value::I(to_i64(v.finality_lag_blocks)),
                        Value::I(i64::from(v.peers)),
                        Value::I(i64::from(v.is_syncing)),
                        Value::I(to_i64(v.head_age_ms)),
                        Value::F(v.rpc_latency_ms),
                        Value::I(i64::from(v.spec_version)),
                        Value::I(to_i64(v.blocks_since_last_update)),
                        Value::F(v.validator_trust_ratio),
                        Value::I(to_i64(v.emission_rao)),
                    ]);
                    self.chain.push(row);
                    self.kind
                        .push(kind_row(node, seq, idx, "chain", at, sample));
                }
                Some(Kind::Gpu(gpu)) => {
                    for device in &gpu.devices {
                        let v = GpuValues::of(device);
                        self.gpu.push(vec![
                            Value::T(node.to_owned()),
                            Value::I(seq),
                            Value::I(to_i64(idx as u64)),
                            Value::I(i64::from(v.gpu_index)),
                            Value::I(at),
                            Value::T(v.gpu_uuid),
                            Value::F(v.utilisation_gpu_percent),
                            Value::I(to_i64(v.memory_used_bytes)),
                            Value::F(v.temperature_celsius),
                            Value::F(v.power_draw_watts),
                            Value::I(i64::from(v.sm_clock_mhz)),
                            Value::I(to_i64(v.throttle_reasons_bitmask)),
                            Value::I(to_i64(v.ecc_uncorrected_total)),
                            Value::I(to_i64(v.pcie_replay_total)),
                            Value::I(i64::from(v.xid_events)),
                        ]);
                    }
                    self.kind.push(kind_row(node, seq, idx, "gpu", at, sample));
                }
                Some(Kind::Keystore(_)) => {
                    self.kind
                        .push(kind_row(node, seq, idx, "keystore", at, sample));
                }
                Some(Kind::Unavailable(why)) => {
                    let mut row = key(idx, at);
                    row.extend([Value::T(why.sampler.clone()), Value::T(why.reason.clone())]);
                    self.unavailable.push(row);
                }
                // Ingest rejects kind-less samples before they get here.
                None => {}
            }
        }
    }
}

fn kind_row(
    node: &str,
    seq: i64,
    idx: usize,
    kind: &str,
    at: i64,
    sample: &crate::batch::Sample,
) -> Vec<Value> {
    vec![
        Value::T(node.to_owned()),
        Value::I(seq),
        Value::I(to_i64(idx as u64)),
        Value::T(kind.to_owned()),
        Value::I(at),
        // Whole, as the generated type (chain, GPU and keystore samples: a few per batch).
        Value::B(sample.to_proto().encode_to_vec()),
    ]
}

impl Ledger {
    /// Commits `jobs` in one transaction. Returns, per job, what happened, and the batches
    /// it added to the outbox (with [`Telemetry::Outbox`]), as the outbox holds them (blobs, with ids).
    ///
    /// # Errors
    /// [`StoreError::Query`]; nothing of the group is stored then.
    pub async fn commit_group(
        &self,
        jobs: &[Job],
        telemetry: Telemetry,
        now_unix_ms: i64,
    ) -> Result<Group, StoreError> {
        let _records = self.records_gate.lock().await;
        let _turn = self.write_turn().await;
        // At or below its node's floor a batch is a replay whose record was pruned.
        let below_floor: Vec<bool> = jobs
            .iter()
            .map(|job| {
                let floor = self.batch_floor(job.node.as_str());
                if job.batch.seq > floor {
                    return false;
                }
                // Normal once after a long disconnect that lost an ack; many in a row mean
                // the agent's spool went back in time (restored from a backup).
                tracing::info!(node = %job.node, seq = job.batch.seq, floor, "BatchAtOrBelowFloor: acked as a replay of a batch stored long ago");
                true
            })
            .collect();
        let fresh: Vec<&Job> = jobs
            .iter()
            .zip(&below_floor)
            .filter_map(|(job, below)| (!below).then_some(job))
            .collect();
        let mut tx = self.pool.begin().await?;
        let mut stored = insert_batch_records(&mut tx, self.backend, &fresh, now_unix_ms).await?;
        let mut commits = Vec::with_capacity(jobs.len());
        let mut rows = Rows::default();
        let mut blobs: Vec<prost::bytes::Bytes> = Vec::new();
        let mut outbox_jobs: Vec<&Job> = Vec::new();
        let mut nodes: HashMap<&str, NodeUpdate> = HashMap::new();
        for (job, below) in jobs.iter().zip(below_floor) {
            let batch = &job.batch;
            if below {
                commits.push(Commit::BelowFloor);
                continue;
            }
            // Taken once: a second job with the same (node, seq) in one group is a replay.
            if !stored.remove(&(job.node.as_str().to_owned(), to_i64(batch.seq))) {
                commits.push(Commit::Duplicate);
                continue;
            }
            match telemetry {
                Telemetry::Embedded => rows.add(job.node.as_str(), batch),
                Telemetry::Outbox => {
                    outbox_jobs.push(job);
                    blobs.push(super::blob::encode(batch));
                }
            }
            nodes.entry(job.node.as_str()).or_default().add(batch);
            commits.push(Commit::Stored {
                samples: batch.samples.len(),
            });
        }
        insert_rows(
            &mut tx,
            self.backend,
            "host_samples",
            HOST_COLUMNS,
            rows.host,
        )
        .await?;
        insert_rows(
            &mut tx,
            self.backend,
            "chain_samples",
            CHAIN_COLUMNS,
            rows.chain,
        )
        .await?;
        insert_rows(&mut tx, self.backend, "gpu_samples", GPU_COLUMNS, rows.gpu).await?;
        insert_rows(
            &mut tx,
            self.backend,
            "unavailable_samples",
            &[
                "node_id",
                "seq",
                "idx",
                "observed_at_unix_ms",
                "sampler",
                "reason",
            ],
            rows.unavailable,
        )
        .await?;
        insert_rows(
            &mut tx,
            self.backend,
            "kind_samples",
            &[
                "node_id",
                "seq",
                "idx",
                "kind",
                "observed_at_unix_ms",
                "sample",
            ],
            rows.kind,
        )
        .await?;
        // A SQLite file ledger keeps the blobs in segment files, synced before this
        // transaction commits; the rows say where (segments.rs).
        // (blob in the row, segment, offset, length); segment 0: the blob is in the row.
        let row = |job: &Job, blob: Vec<u8>, [segment, offset, len]: [u64; 3]| {
            vec![
                Value::T(job.node.to_string()),
                Value::T(job.network.clone()),
                Value::I(now_unix_ms),
                Value::B(blob),
                Value::I(to_i64(segment)),
                Value::I(to_i64(offset)),
                Value::I(to_i64(len)),
            ]
        };
        let outbox: Vec<Vec<Value>> = match &self.segments {
            Some(folder) if !blobs.is_empty() => folder
                .append(blobs.clone())
                .await?
                .into_iter()
                .zip(&outbox_jobs)
                .map(|(at, job)| row(job, Vec::new(), [at.segment, at.offset, at.len]))
                .collect(),
            _ => blobs
                .iter()
                .zip(&outbox_jobs)
                .map(|(blob, job)| row(job, blob.to_vec(), [0, 0, 0]))
                .collect(),
        };
        let ids = insert_outbox(&mut tx, self.backend, outbox).await?;
        update_nodes(&mut tx, self.backend, nodes, now_unix_ms).await?;
        tx.commit().await?;
        let outbox = ids
            .into_iter()
            .zip(outbox_jobs)
            .zip(blobs)
            .map(|((outbox_id, job), blob)| OutboxBlob {
                outbox_id,
                node_id: job.node.to_string(),
                network: job.network.clone(),
                received_at_unix_ms: now_unix_ms,
                samples: job.batch.samples.len(),
                blob,
            })
            .collect();
        Ok(Group { commits, outbox })
    }
}

/// Inserts outbox rows (`node_id, network, received_at_unix_ms, batch, segment,
/// segment_offset, segment_len`); returns their ids
/// in list order.
async fn insert_outbox(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    backend: Backend,
    rows: Vec<Vec<Value>>,
) -> Result<Vec<u64>, StoreError> {
    const COLUMNS: [&str; 7] = [
        "node_id",
        "network",
        "received_at_unix_ms",
        "batch",
        "segment",
        "segment_offset",
        "segment_len",
    ];
    let mut ids = Vec::with_capacity(rows.len());
    for chunk in statements(rows, COLUMNS.len()) {
        // A multi-row VALUES list assigns ids in list order (SQLite AUTOINCREMENT rowids,
        // PostgreSQL sequence calls) and one writer task means no other transaction
        // interleaves ids, but RETURNING's row order is unspecified: sort.
        let mut statement_ids = insert_query(backend, "outbox", &COLUMNS, chunk, " RETURNING id")
            .fetch_all(&mut **tx)
            .await?
            .iter()
            .map(|row| {
                row.try_get::<i64, _>(0)
                    .map(|id| u64::try_from(id).unwrap_or(0))
            })
            .collect::<Result<Vec<u64>, _>>()?;
        statement_ids.sort_unstable();
        ids.extend(statement_ids);
    }
    Ok(ids)
}

/// Hellos of new or changed nodes waiting for their write, and whether a task drains them.
#[derive(Debug, Default)]
pub struct HelloQueue {
    pub(super) waiting: Vec<HelloJob>,
    pub(super) draining: bool,
}

/// One Hello waiting for its write.
#[derive(Debug)]
pub(super) struct HelloJob {
    pub(super) node: String,
    pub(super) hostname: String,
    pub(super) agent_version: String,
    pub(super) network: String,
    pub(super) now_unix_ms: i64,
    pub(super) done: oneshot::Sender<Result<u64, StoreError>>,
}

/// Clears the drain flag and fails what still waits if the drain task ends without doing so
/// (a panic): later Hellos then start a new task instead of waiting for none.
struct DrainGuard<'a> {
    queue: &'a std::sync::Mutex<HelloQueue>,
    done: bool,
}

impl Drop for DrainGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            let mut queue = self
                .queue
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            queue.draining = false;
            // Dropping their senders answers the waiters with an error.
            queue.waiting.clear();
        }
    }
}

impl Ledger {
    /// Writes the waiting Hellos, all of them in one transaction, until none wait. If that
    /// transaction fails, each Hello is written alone, so one bad Hello fails only itself.
    pub(super) async fn drain_hellos(&self) {
        let mut guard = DrainGuard {
            queue: &self.hellos,
            done: false,
        };
        loop {
            let jobs = {
                let mut queue = self
                    .hellos
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if queue.waiting.is_empty() {
                    queue.draining = false;
                    guard.done = true;
                    return;
                }
                std::mem::take(&mut queue.waiting)
            };
            let written = self.write_hellos(&jobs).await;
            let answers: Vec<Result<u64, StoreError>> = match written {
                Ok(seqs) => jobs
                    .iter()
                    .map(|job| {
                        seqs.get(&job.node).copied().ok_or_else(|| {
                            StoreError::Shared(format!(
                                "the Hello upsert of node {} returned no row",
                                job.node
                            ))
                        })
                    })
                    .collect(),
                Err(error) if jobs.len() == 1 => vec![Err(error)],
                Err(_) => {
                    let mut answers = Vec::with_capacity(jobs.len());
                    for job in &jobs {
                        let alone = self.write_hellos(std::slice::from_ref(job)).await;
                        answers.push(alone.and_then(|seqs| {
                            seqs.get(&job.node).copied().ok_or_else(|| {
                                StoreError::Shared(format!(
                                    "the Hello upsert of node {} returned no row",
                                    job.node
                                ))
                            })
                        }));
                    }
                    answers
                }
            };
            for (job, answer) in jobs.into_iter().zip(answers) {
                // A caller that went away no longer needs its answer.
                let _ = job.done.send(answer);
            }
        }
    }

    /// One transaction upserting every node of `jobs` (a node's newest Hello wins); returns
    /// each node's `last_stored_seq`.
    async fn write_hellos(&self, jobs: &[HelloJob]) -> Result<HashMap<String, u64>, StoreError> {
        const COLUMNS: [&str; 6] = [
            "node_id",
            "hostname",
            "agent_version",
            "network",
            "first_seen_unix_ms",
            "last_seen_unix_ms",
        ];
        // One row per node (a statement may not upsert the same row twice), in node order
        // (PostgreSQL row locks taken in one order by every writer of many nodes).
        let mut newest: std::collections::BTreeMap<&str, &HelloJob> =
            std::collections::BTreeMap::new();
        for job in jobs {
            newest.insert(job.node.as_str(), job);
        }
        let rows: Vec<Vec<Value>> = newest
            .values()
            .map(|job| {
                vec![
                    Value::T(job.node.clone()),
                    Value::T(job.hostname.clone()),
                    Value::T(job.agent_version.clone()),
                    Value::T(job.network.clone()),
                    Value::I(job.now_unix_ms),
                    Value::I(job.now_unix_ms),
                ]
            })
            .collect();
        let _turn = self.write_turn().await;
        let mut tx = self.pool.begin().await?;
        let mut seqs = HashMap::with_capacity(rows.len());
        for chunk in statements(rows, COLUMNS.len()) {
            let query = insert_query(
                self.backend,
                "nodes",
                &COLUMNS,
                chunk,
                " ON CONFLICT (node_id) DO UPDATE SET hostname = excluded.hostname,
                     agent_version = excluded.agent_version, network = excluded.network,
                     last_seen_unix_ms = excluded.last_seen_unix_ms
                 RETURNING node_id, last_stored_seq",
            );
            for row in query.fetch_all(&mut *tx).await? {
                let node: String = row.try_get(0)?;
                let seq: i64 = row.try_get(1)?;
                seqs.insert(node, u64::try_from(seq).unwrap_or(0));
            }
        }
        tx.commit().await?;
        Ok(seqs)
    }
}

/// What one group commit did.
#[derive(Debug)]
pub struct Group {
    /// Per job, in order.
    pub commits: Vec<Commit>,
    /// The batches it added to the outbox, ascending ids, as the outbox holds them.
    pub outbox: Vec<OutboxBlob>,
}

/// Inserts the `(node, seq)` idempotency records of a group; returns the ones that were new.
async fn insert_batch_records(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    backend: Backend,
    jobs: &[&Job],
    now_unix_ms: i64,
) -> Result<HashSet<(String, i64)>, StoreError> {
    let mut stored = HashSet::with_capacity(jobs.len());
    let columns = ["node_id", "seq", "received_at_unix_ms", "sample_count"];
    for chunk in jobs.chunks(VALUES_PER_STATEMENT / columns.len()) {
        let mut sql = format!("INSERT INTO batches ({}) VALUES ", columns.join(", "));
        let mut next = 0usize;
        for i in 0..chunk.len() {
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&placeholders(&mut next, columns.len(), backend));
        }
        sql.push_str(" ON CONFLICT (node_id, seq) DO NOTHING RETURNING node_id, seq");
        // Only placeholders are spliced in; every value is bound.
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for job in chunk {
            query = query
                .bind(job.node.as_str().to_owned())
                .bind(to_i64(job.batch.seq))
                .bind(now_unix_ms)
                .bind(to_i64(job.batch.samples.len() as u64));
        }
        for row in query.fetch_all(&mut **tx).await? {
            stored.insert((row.try_get(0)?, row.try_get(1)?));
        }
    }
    Ok(stored)
}

/// What a group changes in one node's row.
#[derive(Default)]
struct NodeUpdate {
    last_stored_seq: u64,
    spool_dropped_batches_total: u64,
    newest_host: Option<(i64, prost::bytes::Bytes)>,
}

impl NodeUpdate {
    fn add(&mut self, batch: &Batch) {
        self.last_stored_seq = self.last_stored_seq.max(batch.seq);
        self.spool_dropped_batches_total = self
            .spool_dropped_batches_total
            .max(batch.spool_dropped_batches_total);
        let newest = batch
            .samples
            .iter()
            .filter_map(|s| match &s.kind {
                Some(Kind::Host(host)) => Some((s.observed_at_unix_ms, host)),
                _ => None,
            })
            .max_by_key(|(at, _)| *at);
        if let Some((at, host)) = newest
            && self
                .newest_host
                .as_ref()
                .is_none_or(|(seen, _)| at >= *seen)
        {
            self.newest_host = Some((at, host.encoded.clone()));
        }
    }
}

/// One upsert row per node of the group (every node already has its row from Hello; the
/// insert half only satisfies the syntax).
async fn update_nodes(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    backend: Backend,
    nodes: HashMap<&str, NodeUpdate>,
    now_unix_ms: i64,
) -> Result<(), StoreError> {
    const COLUMNS: [&str; 7] = [
        "node_id",
        "first_seen_unix_ms",
        "last_seen_unix_ms",
        "last_stored_seq",
        "spool_dropped_batches_total",
        "last_host",
        "last_host_observed_unix_ms",
    ];
    let nodes: Vec<(&str, NodeUpdate)> = nodes.into_iter().collect();
    for chunk in nodes.chunks(VALUES_PER_STATEMENT / COLUMNS.len()) {
        let mut sql = format!("INSERT INTO nodes ({}) VALUES ", COLUMNS.join(", "));
        let mut next = 0usize;
        for i in 0..chunk.len() {
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&placeholders(&mut next, COLUMNS.len(), backend));
        }
        sql.push_str(
            " ON CONFLICT (node_id) DO UPDATE SET
                 last_seen_unix_ms = excluded.last_seen_unix_ms,
                 last_stored_seq = CASE WHEN nodes.last_stored_seq < excluded.last_stored_seq
                     THEN excluded.last_stored_seq ELSE nodes.last_stored_seq END,
                 spool_dropped_batches_total = CASE
                     WHEN nodes.spool_dropped_batches_total < excluded.spool_dropped_batches_total
                     THEN excluded.spool_dropped_batches_total ELSE nodes.spool_dropped_batches_total END,
                 last_host = CASE WHEN excluded.last_host IS NOT NULL
                     AND excluded.last_host_observed_unix_ms >= nodes.last_host_observed_unix_ms
                     THEN excluded.last_host ELSE nodes.last_host END,
                 last_host_observed_unix_ms = CASE WHEN excluded.last_host IS NOT NULL
                     AND excluded.last_host_observed_unix_ms >= nodes.last_host_observed_unix_ms
                     THEN excluded.last_host_observed_unix_ms ELSE nodes.last_host_observed_unix_ms END",
        );
        // Column names are constants; every value is bound.
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for (node, update) in chunk {
            let (host_at, host) = match &update.newest_host {
                Some((at, bytes)) => (*at, Some(bytes.to_vec())),
                None => (0, None),
            };
            query = query
                .bind((*node).to_owned())
                .bind(now_unix_ms)
                .bind(now_unix_ms)
                .bind(to_i64(update.last_stored_seq))
                .bind(to_i64(update.spool_dropped_batches_total))
                .bind(host)
                .bind(host_at);
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(
        node: &str,
        hostname: &str,
        at: i64,
    ) -> (HelloJob, oneshot::Receiver<Result<u64, StoreError>>) {
        let (done, answer) = oneshot::channel();
        let job = HelloJob {
            node: node.into(),
            hostname: hostname.into(),
            agent_version: "1.0".into(),
            network: "finney".into(),
            now_unix_ms: at,
            done,
        };
        (job, answer)
    }

    #[tokio::test]
    async fn one_write_takes_many_hellos_and_the_newest_of_a_repeated_node_wins()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let ledger = Ledger::open(&format!("sqlite://{}/l.db", dir.path().display())).await?;
        // More rows than one statement holds (6 values a row), one node three times.
        let mut jobs = Vec::new();
        let mut answers = Vec::new();
        for i in 0..800 {
            let (job, answer) = hello(&format!("n{i:03}"), "h", 1);
            jobs.push(job);
            answers.push(answer);
        }
        for (at, host) in [(2, "second"), (3, "third")] {
            let (job, answer) = hello("n005", host, at);
            jobs.push(job);
            answers.push(answer);
        }
        let seqs = ledger.write_hellos(&jobs).await?;
        assert_eq!(seqs.len(), 800);
        assert!(seqs.values().all(|seq| *seq == 0));
        let nodes = ledger.nodes().await?;
        assert_eq!(nodes.len(), 800);
        let n5 = nodes.iter().find(|n| n.node_id == "n005").ok_or("n005")?;
        assert_eq!((n5.hostname.as_str(), n5.last_seen_unix_ms), ("third", 3));

        // Through the queue: every waiter gets its answer, and the flag is cleared after.
        ledger
            .hellos
            .lock()
            .map_err(|_| "poisoned")?
            .waiting
            .extend(jobs);
        ledger.hellos.lock().map_err(|_| "poisoned")?.draining = true;
        ledger.drain_hellos().await;
        for answer in answers {
            assert_eq!(answer.await??, 0);
        }
        let queue = ledger.hellos.lock().map_err(|_| "poisoned")?;
        assert!(!queue.draining && queue.waiting.is_empty());
        Ok(())
    }

    fn handed(id: u64, samples: usize) -> OutboxBlob {
        let batch = Batch {
            seq: id,
            samples: vec![
                crate::batch::Sample {
                    observed_at_unix_ms: 0,
                    kind: None
                };
                samples
            ],
            spool_dropped_batches_total: 0,
        };
        OutboxBlob {
            outbox_id: id,
            node_id: "n1".into(),
            network: "finney".into(),
            received_at_unix_ms: 0,
            samples,
            blob: super::super::blob::encode(&batch),
        }
    }

    /// The blob size of a one-sample `handed` batch.
    const ONE: u64 = 31;

    fn ids(batches: Option<Vec<OutboxBlob>>) -> Option<Vec<u64>> {
        batches.map(|batches| batches.iter().map(|b| b.outbox_id).collect())
    }

    #[test]
    fn a_chain_started_at_the_ceiling_serves_the_first_group_from_memory() {
        let gauge = OutboxGauge::default();
        gauge.set_handoff_max_bytes(1_000);
        gauge.start_chain(4);
        gauge.added_group(vec![handed(5, 1), handed(6, 1)]);
        // The sink's cursor is elsewhere (ClickHouse behind): the table first.
        assert_eq!(gauge.take_after(3, 100, 100), None);
        assert_eq!(ids(gauge.take_after(4, 100, 100)), Some(vec![5, 6]));
        // Only before the first group: later the writer's own chain wins.
        gauge.start_chain(100);
        gauge.added_group(vec![handed(7, 1)]);
        assert_eq!(ids(gauge.take_after(6, 100, 100)), Some(vec![7]));
    }

    #[test]
    fn memory_serves_the_sink_only_from_the_batch_right_after_its_cursor() {
        let gauge = OutboxGauge::default();
        gauge.set_handoff_max_bytes(1_000);
        // The writer does not know what came before its first group (a restart): the
        // sink must read the table first.
        gauge.added_group(vec![handed(5, 1), handed(6, 1)]);
        assert_eq!(gauge.take_after(0, 100, 100), None);
        assert_eq!(
            gauge.take_after(4, 100, 100),
            None,
            "5's predecessor is unknown"
        );
        // The table gave the sink up to 5: 6 links to 5, so memory serves from there.
        gauge.added_group(vec![handed(7, 1)]);
        assert_eq!(ids(gauge.take_after(5, 100, 100)), Some(vec![6, 7]));
        // Taking is not consuming: a failed insert can take them again...
        assert_eq!(ids(gauge.take_after(5, 100, 100)), Some(vec![6, 7]));
        // ...and delivered ones are forgotten once the cursor passes them.
        assert_eq!(ids(gauge.take_after(6, 100, 100)), Some(vec![7]));
        assert_eq!(gauge.handoff_len(), (1, ONE));
        assert_eq!(gauge.batches.load(Ordering::Relaxed), 3);
        assert_eq!(gauge.bytes.load(Ordering::Relaxed), 3 * ONE);
    }

    #[test]
    fn a_dropped_or_failed_batch_breaks_the_chain_until_the_table_was_read_past_it() {
        let gauge = OutboxGauge::default();
        gauge.set_handoff_max_bytes(2 * ONE + ONE / 2);
        gauge.added_group(vec![handed(1, 1)]);
        gauge.added_group(vec![handed(2, 1), handed(3, 1)]);
        // Memory holds 1 and 2 (2.5 batches' bytes); 3 did not fit; 4 links to 3.
        assert_eq!(gauge.handoff_len(), (2, 2 * ONE));
        assert_eq!(gauge.take_after(0, 100, 100), None);
        assert_eq!(ids(gauge.take_after(1, 100, 100)), Some(vec![2]));
        gauge.added_group(vec![handed(4, 1)]);
        assert_eq!(
            gauge.take_after(2, 100, 100),
            None,
            "3 is only in the table"
        );
        assert_eq!(ids(gauge.take_after(3, 100, 100)), Some(vec![4]));
        // A failed group: the ids it got (or not) are unknown, the next one starts a chain.
        gauge.break_chain();
        gauge.added_group(vec![handed(9, 1)]);
        assert_eq!(gauge.take_after(4, 100, 100), None);
        // Off: nothing is kept.
        let off = OutboxGauge::default();
        off.added_group(vec![handed(1, 1)]);
        assert_eq!(off.handoff_len(), (0, 0));
        assert_eq!(off.batches.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_memory_chunk_stops_at_the_sample_and_batch_limits() {
        let gauge = OutboxGauge::default();
        gauge.set_handoff_max_bytes(10_000);
        gauge.added_group(vec![handed(1, 10)]);
        gauge.added_group((2..=6).map(|id| handed(id, 10)).collect());
        assert_eq!(ids(gauge.take_after(1, 100, 25)), Some(vec![2, 3, 4]));
        assert_eq!(ids(gauge.take_after(1, 2, 1_000)), Some(vec![2, 3]));
        assert_eq!(ids(gauge.take_after(1, 100, 1)), Some(vec![2]));
        assert_eq!(
            gauge.take_after(6, 100, 100),
            None,
            "nothing after the newest"
        );
        assert_eq!(gauge.handoff_len(), (0, 0));
    }

    #[test]
    fn placeholders_number_across_rows() {
        let mut next = 0;
        assert_eq!(placeholders(&mut next, 2, Backend::Postgres), "($1, $2)");
        assert_eq!(placeholders(&mut next, 2, Backend::Postgres), "($3, $4)");
        assert_eq!(placeholders(&mut next, 2, Backend::Sqlite), "(?, ?)");
    }
}
