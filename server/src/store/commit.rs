//! Group commit: every session hands its batch to one writer task, which commits all the
//! batches waiting at that moment in one transaction and answers each session. One fsync
//! then covers hundreds of batches, which is what lets a single SQLite file keep up with a
//! fleet.
//!
//! # Guarantees
//! - A session's [`Committer::commit`] returns `Stored` only after the transaction holding
//!   its batch committed; `Duplicate` when `(node, seq)` was committed before.
//! - If a group's transaction fails, each of its batches is retried alone, so one bad batch
//!   cannot fail the others.
//! - With ClickHouse as the telemetry store, batches go to the durable outbox instead of
//!   the embedded rows, and the writer stops taking new batches while the outbox holds more
//!   than its byte bound (backpressure: agents keep them in their spools meanwhile).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use guardian_proto::v1::{SampleBatch, sample};
use prost::Message;
use sqlx::{AssertSqlSafe, Row};
use tokio::sync::{Notify, mpsc, oneshot};

use super::telemetry::{ChainValues, GpuValues, HostValues};
use super::{Backend, Commit, Ledger, StoreError, to_i64};
use crate::identity::NodeId;

/// Most batches committed in one transaction.
const MAX_GROUP_BATCHES: usize = 512;
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
    pub batch: Arc<SampleBatch>,
}

/// The outbox's size, shared by the writer (adds) and the sink (removes).
#[derive(Debug, Default)]
pub struct OutboxGauge {
    /// Batches waiting for ClickHouse.
    pub batches: AtomicU64,
    /// Their encoded size.
    pub bytes: AtomicU64,
    /// Signalled when batches are added.
    pub added: Notify,
    /// Signalled when batches are removed.
    pub drained: Notify,
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
        while group.len() < MAX_GROUP_BATCHES {
            match rx.try_recv() {
                Ok(more) => group.push(more),
                Err(_) => break,
            }
        }
        let jobs: Vec<Job> = group.iter().map(|p| p.job.clone()).collect();
        let started = Instant::now();
        let now = crate::unix_ms();
        match ledger.commit_group(&jobs, telemetry, now).await {
            Ok(outcome) => {
                observe(jobs.len(), started.elapsed().as_secs_f64());
                if telemetry == Telemetry::Outbox {
                    outbox.added.notify_one();
                }
                for (pending, (commit, bytes)) in group.drain(..).zip(outcome) {
                    if bytes > 0 {
                        outbox.batches.fetch_add(1, Ordering::Relaxed);
                        outbox.bytes.fetch_add(bytes, Ordering::Relaxed);
                    }
                    let _ = pending.reply.send(Ok(commit));
                }
            }
            Err(error) if group.len() > 1 => {
                tracing::warn!(%error, batches = group.len(), "GroupCommitFailed: retrying each batch alone");
                for pending in group.drain(..) {
                    let result = ledger
                        .commit_group(std::slice::from_ref(&pending.job), telemetry, now)
                        .await;
                    let reply = match result {
                        Ok(mut outcome) => {
                            let (commit, bytes) = outcome.remove(0);
                            if bytes > 0 {
                                outbox.batches.fetch_add(1, Ordering::Relaxed);
                                outbox.bytes.fetch_add(bytes, Ordering::Relaxed);
                                outbox.added.notify_one();
                            }
                            Ok(commit)
                        }
                        Err(error) => Err(CommitError::from(&error)),
                    };
                    let _ = pending.reply.send(reply);
                }
            }
            Err(error) => {
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

/// Multi-row INSERT of `rows` into `table(columns)`, in statements of at most
/// [`VALUES_PER_STATEMENT`] bound values.
async fn insert_rows(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    backend: Backend,
    table: &str,
    columns: &[&str],
    rows: Vec<Vec<Value>>,
) -> Result<(), StoreError> {
    let rows_per_statement = (VALUES_PER_STATEMENT / columns.len().max(1)).max(1);
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        let chunk: Vec<Vec<Value>> = rows.by_ref().take(rows_per_statement).collect();
        let mut sql = format!("INSERT INTO {table} ({}) VALUES ", columns.join(", "));
        let mut next = 0usize;
        for i in 0..chunk.len() {
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&placeholders(&mut next, columns.len(), backend));
        }
        // Table and column names are constants of this module; every value is bound.
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for row in chunk {
            debug_assert_eq!(row.len(), columns.len());
            for value in row {
                query = match value {
                    Value::I(v) => query.bind(v),
                    Value::F(v) => query.bind(v),
                    Value::T(v) => query.bind(v),
                    Value::B(v) => query.bind(v),
                };
            }
        }
        query.execute(&mut **tx).await?;
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
    fn add(&mut self, node: &str, batch: &SampleBatch) {
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
                Some(sample::Kind::Host(host)) => {
                    let v = HostValues::of(host);
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
                        Value::B(host.encode_to_vec()),
                    ]);
                    self.host.push(row);
                }
                Some(sample::Kind::Chain(chain)) => {
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
                Some(sample::Kind::Gpu(gpu)) => {
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
                Some(sample::Kind::Keystore(_)) => {
                    self.kind
                        .push(kind_row(node, seq, idx, "keystore", at, sample));
                }
                Some(sample::Kind::Unavailable(why)) => {
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
    sample: &guardian_proto::v1::Sample,
) -> Vec<Value> {
    vec![
        Value::T(node.to_owned()),
        Value::I(seq),
        Value::I(to_i64(idx as u64)),
        Value::T(kind.to_owned()),
        Value::I(at),
        Value::B(sample.encode_to_vec()),
    ]
}

impl Ledger {
    /// Commits `jobs` in one transaction. Returns, per job, what happened and the bytes it
    /// added to the outbox (0 unless stored with [`Telemetry::Outbox`]).
    ///
    /// # Errors
    /// [`StoreError::Query`]; nothing of the group is stored then.
    pub async fn commit_group(
        &self,
        jobs: &[Job],
        telemetry: Telemetry,
        now_unix_ms: i64,
    ) -> Result<Vec<(Commit, u64)>, StoreError> {
        let _turn = self.write_turn().await;
        let mut tx = self.pool.begin().await?;
        let stored = insert_batch_records(&mut tx, self.backend, jobs, now_unix_ms).await?;
        let mut outcome = Vec::with_capacity(jobs.len());
        let mut rows = Rows::default();
        let mut outbox: Vec<Vec<Value>> = Vec::new();
        let mut nodes: HashMap<&str, NodeUpdate> = HashMap::new();
        for job in jobs {
            let batch = &job.batch;
            if !stored.contains(&(job.node.as_str().to_owned(), to_i64(batch.seq))) {
                outcome.push((Commit::Duplicate, 0));
                continue;
            }
            let mut bytes = 0;
            match telemetry {
                Telemetry::Embedded => rows.add(job.node.as_str(), batch),
                Telemetry::Outbox => {
                    let encoded = batch.encode_to_vec();
                    bytes = encoded.len() as u64;
                    outbox.push(vec![
                        Value::T(job.node.to_string()),
                        Value::T(job.network.clone()),
                        Value::I(now_unix_ms),
                        Value::B(encoded),
                    ]);
                }
            }
            nodes.entry(job.node.as_str()).or_default().add(batch);
            outcome.push((
                Commit::Stored {
                    samples: batch.samples.len(),
                },
                bytes,
            ));
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
        // A multi-row VALUES list assigns ids in list order (SQLite rowids, PostgreSQL
        // sequence calls); one writer task means no other transaction interleaves ids.
        insert_rows(
            &mut tx,
            self.backend,
            "outbox",
            &["node_id", "network", "received_at_unix_ms", "batch"],
            outbox,
        )
        .await?;
        update_nodes(&mut tx, self.backend, nodes, now_unix_ms).await?;
        tx.commit().await?;
        Ok(outcome)
    }
}

/// Inserts the `(node, seq)` idempotency records of a group; returns the ones that were new.
async fn insert_batch_records(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    backend: Backend,
    jobs: &[Job],
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
    newest_host: Option<(i64, Vec<u8>)>,
}

impl NodeUpdate {
    fn add(&mut self, batch: &SampleBatch) {
        self.last_stored_seq = self.last_stored_seq.max(batch.seq);
        self.spool_dropped_batches_total = self
            .spool_dropped_batches_total
            .max(batch.spool_dropped_batches_total);
        let newest = batch
            .samples
            .iter()
            .filter_map(|s| match &s.kind {
                Some(sample::Kind::Host(host)) => Some((s.observed_at_unix_ms, host)),
                _ => None,
            })
            .max_by_key(|(at, _)| *at);
        if let Some((at, host)) = newest
            && self
                .newest_host
                .as_ref()
                .is_none_or(|(seen, _)| at >= *seen)
        {
            self.newest_host = Some((at, host.encode_to_vec()));
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
                Some((at, bytes)) => (*at, Some(bytes.clone())),
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

    #[test]
    fn placeholders_number_across_rows() {
        let mut next = 0;
        assert_eq!(placeholders(&mut next, 2, Backend::Postgres), "($1, $2)");
        assert_eq!(placeholders(&mut next, 2, Backend::Postgres), "($3, $4)");
        assert_eq!(placeholders(&mut next, 2, Backend::Sqlite), "(?, ?)");
    }
}
