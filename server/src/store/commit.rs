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
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::batch::{Batch, Kind};
use sqlx::{AssertSqlSafe, Row};
use tokio::sync::{mpsc, oneshot};

use super::embedded::Rows;
use super::insert::{placeholders, statement_chunks};
use super::outbox::{self, OutboxBlob, OutboxGauge};
use super::{Backend, Commit, Ledger, StoreError, to_i64};
use crate::identity::NodeId;

/// Most batches committed in one transaction.
pub const MAX_GROUP_BATCHES: usize = 512;
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

/// Where a committed batch's samples go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Telemetry {
    /// Typed rows in the ledger database (the default, embedded store).
    Embedded,
    /// The outbox, drained into ClickHouse by the sink.
    Outbox,
}

impl Telemetry {
    /// The outbox when ClickHouse is configured, else the embedded rows.
    pub fn of(clickhouse: &super::clickhouse::ClickHouseSettings) -> Self {
        if clickhouse.enabled() {
            Telemetry::Outbox
        } else {
            Telemetry::Embedded
        }
    }
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
                    blobs.push(outbox::blob::encode(batch));
                }
            }
            nodes.entry(job.node.as_str()).or_default().add(batch);
            commits.push(Commit::Stored {
                samples: batch.samples.len(),
            });
        }
        rows.insert(&mut tx, self.backend).await?;
        let ids = outbox::append(
            &mut tx,
            self.backend,
            self.segments.as_ref(),
            &outbox_jobs,
            &blobs,
            now_unix_ms,
        )
        .await?;
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
    for chunk in statement_chunks(jobs, columns.len()) {
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
    for chunk in statement_chunks(&nodes, COLUMNS.len()) {
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
