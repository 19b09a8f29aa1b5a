//! The ClickHouse sink: drains the durable outbox into ClickHouse in commit order, mirrors
//! the ledger's audit chain into ClickHouse's `audit` table, behind a circuit breaker, and
//! applies retention on a schedule.
//!
//! # Guarantees
//! - An outbox batch is deleted only after every raw table holds its rows.
//! - Exactly once per table: after any failure (and at start) the sink asks ClickHouse what
//!   it already holds ([`ClickHouseStore::high_water`]) and skips those rows, so an insert
//!   that landed although its answer was lost is not repeated.
//! - The audit mirror is the same: entries are inserted in seq order, each once; after a
//!   failure and at start the chunk's `(seq, hash)` pairs ClickHouse holds are left out (the
//!   ledger stays the source of truth; `guardianctl audit verify` reads the ledger).
//! - Batches normally reach the sink from memory (the committer hands each committed batch
//!   on, linked to the outbox id before it); the outbox table is read only when memory does
//!   not hold the batch right after the sink's cursor. Either way the outbox row is the
//!   durable copy until ClickHouse holds it.
//! - A chunk whose INSERT failed is retried as the same batches, read from the outbox
//!   table, until it succeeds: never grown by batches that arrived meanwhile. Each attempt
//!   lands (or not) one part per day partition, so a rollup bucket then holds the rows of
//!   one attempt at most, and rows that landed without their rollup are this chunk's rows in
//!   the bucket, which is what the store's rollup repair checks for. A chunk grown between
//!   two attempts that both lost their rollup left a bucket short by less than the chunk,
//!   which the repair rightly does not guess at (seen as `rollup_1m` short of the raw rows).
//! - While ClickHouse is down, batches stay in the outbox (acked, durable); the breaker
//!   spaces out probes; when ClickHouse returns, the backlog is replayed in order with
//!   progress in the log (`Progress`, with rate and ETA; `guardianctl status` shows a banner) and in `guardian_outbox_*` metrics.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::metrics::{Metrics, Reason};
use crate::store::Ledger;
use crate::store::clickhouse::{ClickHouseError, ClickHouseSettings, ClickHouseStore, HighWater};
use crate::store::outbox::OutboxGauge;

/// Consecutive failures that open the breaker.
const TRIP_AFTER: u32 = 3;
/// First open period; doubles up to [`MAX_OPEN`].
const FIRST_OPEN: Duration = Duration::from_millis(500);
/// Longest open period.
const MAX_OPEN: Duration = Duration::from_secs(15);
/// How often retention runs.
const RETENTION_EVERY: Duration = Duration::from_secs(3600);
/// Most batches read from the outbox per chunk.
const MAX_CHUNK_BATCHES: usize = 20_000;
/// Most audit entries mirrored to ClickHouse per INSERT.
const AUDIT_CHUNK: usize = 5_000;

/// Circuit breaker state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Breaker {
    /// Inserting normally.
    Closed,
    /// Not trying until the instant.
    Open(Instant),
    /// One probe allowed.
    HalfOpen,
}

/// The breaker's bookkeeping, separate from IO so it can be tested alone.
#[derive(Debug)]
pub struct CircuitBreaker {
    state: Breaker,
    failures: u32,
    open_for: Duration,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        Self {
            state: Breaker::Closed,
            failures: 0,
            open_for: FIRST_OPEN,
        }
    }
}

impl CircuitBreaker {
    /// How long to wait before the next attempt (zero when one may go now).
    pub fn wait(&mut self, now: Instant) -> Duration {
        match self.state {
            Breaker::Open(until) if now < until => until - now,
            Breaker::Open(_) => {
                self.state = Breaker::HalfOpen;
                Duration::ZERO
            }
            _ => Duration::ZERO,
        }
    }

    /// An attempt succeeded. Returns true when this closed an open breaker.
    pub fn success(&mut self) -> bool {
        let recovered = self.state != Breaker::Closed;
        self.state = Breaker::Closed;
        self.failures = 0;
        self.open_for = FIRST_OPEN;
        recovered
    }

    /// An attempt failed. Returns true when this opened the breaker.
    pub fn failure(&mut self, now: Instant) -> bool {
        self.failures = self.failures.saturating_add(1);
        match self.state {
            Breaker::HalfOpen => {
                self.open_for = (self.open_for * 2).min(MAX_OPEN);
                self.state = Breaker::Open(now + self.open_for);
                false
            }
            Breaker::Closed if self.failures >= TRIP_AFTER => {
                self.state = Breaker::Open(now + self.open_for);
                true
            }
            _ => false,
        }
    }

    /// The state now.
    pub fn state(&self) -> Breaker {
        self.state
    }

    fn gauge(&self) -> i64 {
        match self.state {
            Breaker::Closed => 0,
            Breaker::Open(_) => 1,
            Breaker::HalfOpen => 2,
        }
    }
}

/// Runs the sink until `shutdown`; a chunk in flight is finished first.
pub async fn run(
    ledger: Ledger,
    settings: ClickHouseSettings,
    outbox: Arc<OutboxGauge>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut breaker = CircuitBreaker::default();
    let mut store: Option<ClickHouseStore> = None;
    let mut high: Option<HighWater> = None;
    // Highest outbox id whose batch, and every one before it, every table holds. It starts
    // at 0: the outbox keeps each batch until ClickHouse holds it, so whatever it still holds
    // is read again, and `insert` leaves out the rows that had landed.
    let mut cursor = 0u64;
    // Largest outbox id of a chunk whose INSERT was tried and failed: the retry is that
    // chunk again, no more (see the guarantees above).
    let mut retry_through: Option<u64> = None;
    // Highest audit seq mirrored with every entry before it (None = ask ClickHouse).
    let mut audit_cursor: Option<u64> = None;
    // Whether ClickHouse may hold some entries above `audit_cursor` (at start, after a
    // failed INSERT): those are read back and left out.
    let mut audit_recheck = true;
    let mut last_retention: Option<Instant> = None;
    let mut replaying = false;
    let mut replay_total = 0u64;
    let max_rows = settings.insert_max_rows.max(1);
    let max_delay = Duration::from_millis(settings.insert_max_delay_ms);
    loop {
        metrics.clickhouse_breaker.set(breaker.gauge());
        metrics
            .outbox_batches
            .set(i64::try_from(outbox.batches.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
        metrics
            .outbox_bytes
            .set(i64::try_from(outbox.bytes.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
        let wait = breaker.wait(Instant::now());
        if !wait.is_zero() {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => continue,
            }
        }
        let attempt = async {
            let current = match &store {
                Some(store) => store.clone(),
                None => {
                    let opened = ClickHouseStore::open(&settings).await?;
                    tracing::info!(
                        url = settings.url,
                        database = settings.database,
                        version = opened.server_version(),
                        ttl = opened.supports_ttl(),
                        "ClickHouseReady"
                    );
                    store = Some(opened.clone());
                    opened
                }
            };
            let known = match &mut high {
                Some(known) => known,
                None => high.insert(current.high_water().await?),
            };
            if last_retention.is_none_or(|at| at.elapsed() >= RETENTION_EVERY) {
                last_retention = Some(Instant::now());
                let dropped = current.drop_expired(crate::unix_ms()).await?;
                if !dropped.is_empty() {
                    metrics
                        .clickhouse_partitions_dropped
                        .inc_by(dropped.len() as u64);
                    tracing::info!(?dropped, "RetentionDroppedPartitions");
                }
            }
            // The audit chain is mirrored in seq order, each entry once. An INSERT that
            // failed may have landed in part (one part per month, per shard), so the chunk
            // after a failure, and the first after start, leave out what ClickHouse holds.
            let mirrored = match audit_cursor {
                Some(seq) => seq,
                None => {
                    audit_recheck = true;
                    // A part lost at the last crash lies within one chunk of the mark.
                    let common = audit_mirror_cursor(&ledger, &current).await?;
                    *audit_cursor.insert(common.saturating_sub(AUDIT_CHUNK as u64))
                }
            };
            let mut entries = ledger
                .audit_entries(mirrored, AUDIT_CHUNK)
                .await
                .map_err(SinkError::Ledger)?;
            if let (Some(first), Some(last)) = (entries.first(), entries.last()) {
                let last_seq = last.seq;
                if audit_recheck {
                    let held: std::collections::HashSet<(u64, String)> = current
                        .audit_hashes(first.seq, last_seq)
                        .await?
                        .into_iter()
                        .collect();
                    entries.retain(|e| !held.contains(&(e.seq, e.hash.clone())));
                }
                audit_recheck = true;
                current.insert_audit(&entries).await?;
                audit_recheck = false;
                audit_cursor = Some(last_seq);
                metrics.clickhouse_rows.inc_by(entries.len() as u64);
            }
            // Freshly committed batches come from memory; the outbox table is read only when
            // memory lacks the very next one (restart, failure, overflow).
            // A retry reads the table, which holds the failed chunk whole (memory may have
            // a gap where the first try did not).
            let memory = match retry_through {
                Some(_) => None,
                None => outbox.take_after(cursor, MAX_CHUNK_BATCHES, max_rows),
            };
            let from_memory = memory.is_some();
            let table = match memory {
                Some(_) => Vec::new(),
                None => {
                    let mut read = ledger
                        .outbox_read(cursor, MAX_CHUNK_BATCHES, max_rows)
                        .await
                        .map_err(SinkError::Ledger)?;
                    if let Some(through) = retry_through {
                        read.retain(|b| b.outbox_id <= through);
                    }
                    read
                }
            };
            let (samples, first_received, last_id): (usize, _, _) = match &memory {
                Some(blobs) => (
                    blobs.iter().map(|b| b.samples).sum(),
                    blobs.first().map(|b| b.received_at_unix_ms),
                    blobs.last().map(|b| b.outbox_id),
                ),
                None => (
                    table.iter().map(|b| b.batch.samples.len()).sum(),
                    table.first().map(|b| b.received_at_unix_ms),
                    table.last().map(|b| b.outbox_id),
                ),
            };
            let (Some(first_received), Some(last_id)) = (first_received, last_id) else {
                return Ok::<_, SinkError>(Step::Idle);
            };
            // Time trigger: a small chunk waits until its oldest batch is max_delay old.
            let age = crate::unix_ms().saturating_sub(first_received);
            let age = Duration::from_millis(u64::try_from(age).unwrap_or(0));
            if samples < max_rows
                && age < max_delay
                && retry_through.is_none()
                && !shutdown.is_cancelled()
            {
                return Ok(Step::Wait(max_delay - age));
            }
            let started = Instant::now();
            retry_through.get_or_insert(last_id);
            // Memory blobs go to ClickHouse as they are (host samples are copied into
            // RowBinary, never decoded into a batch); rows read back come decoded.
            let (chunk_batches, inserted) = match &memory {
                Some(blobs) => (blobs.len(), current.insert(blobs, known).await),
                None => (table.len(), current.insert(&table, known).await),
            };
            let stats = inserted.map_err(|error| match error {
                ClickHouseError::Outbox { node, source, .. } => {
                    SinkError::Ledger(crate::store::StoreError::Corrupt { node, source })
                }
                other => SinkError::ClickHouse(other),
            })?;
            retry_through = None;
            metrics
                .clickhouse_insert_seconds
                .observe(started.elapsed().as_secs_f64());
            metrics.clickhouse_rows.inc_by(stats.rows as u64);
            metrics
                .clickhouse_rows_skipped
                .inc_by(stats.skipped_rows as u64);
            cursor = last_id;
            if from_memory {
                metrics
                    .sink_batches_from_memory
                    .inc_by(chunk_batches as u64);
            } else {
                metrics
                    .sink_batches_from_outbox
                    .inc_by(chunk_batches as u64);
            }
            let (batches, bytes) = ledger
                .outbox_delete_through(last_id)
                .await
                .map_err(SinkError::Ledger)?;
            outbox.remove(batches, bytes);
            Ok(Step::Inserted {
                batches: chunk_batches,
                rows: stats.rows,
            })
        };
        // A probe of a ClickHouse that was away, with batches waiting: the replay begins (its
        // first chunk may be all of it).
        let pending = outbox.batches.load(Ordering::Relaxed);
        if breaker.gauge() != 0 && pending > 0 && replay_total == 0 {
            replay_total = pending;
            crate::progress::PROGRESS.start(
                "outbox_replay",
                "replaying the ClickHouse outbox",
                "batches",
                replay_total,
            );
        }
        match attempt.await {
            Ok(step) => {
                if breaker.success() {
                    let pending = outbox.batches.load(Ordering::Relaxed);
                    tracing::info!(
                        pending_batches = pending,
                        "ClickHouseRecovered: replaying the outbox in order"
                    );
                    replaying = true;
                }
                match step {
                    Step::Idle => {
                        if replaying {
                            tracing::info!("OutboxReplay complete: ClickHouse is up to date");
                            replaying = false;
                        }
                        if replay_total > 0 {
                            crate::progress::PROGRESS.set_done("outbox_replay", replay_total);
                            crate::progress::PROGRESS.finish("outbox_replay");
                            replay_total = 0;
                        }
                        if shutdown.is_cancelled() {
                            return;
                        }
                        tokio::select! {
                            () = shutdown.cancelled() => {}
                            () = outbox.added.notified() => {}
                            () = tokio::time::sleep(max_delay.max(Duration::from_millis(50))) => {}
                        }
                    }
                    Step::Wait(delay) => {
                        tokio::select! {
                            () = shutdown.cancelled() => {}
                            () = tokio::time::sleep(delay) => {}
                        }
                    }
                    Step::Inserted { batches, rows } => {
                        tracing::debug!(batches, rows, "ClickHouseInserted");
                        if replay_total > 0 {
                            let remaining = outbox.batches.load(Ordering::Relaxed);
                            crate::progress::PROGRESS
                                .set_done("outbox_replay", replay_total.saturating_sub(remaining));
                        }
                    }
                }
            }
            Err(error) => {
                metrics
                    .clickhouse_errors
                    .get_or_create(&Reason {
                        reason: error.kind(),
                    })
                    .inc();
                // What landed is unknown now: ask ClickHouse again before the next insert.
                high = None;
                if matches!(error, SinkError::ClickHouse(_)) {
                    store = None;
                }
                let opened = breaker.failure(Instant::now());
                let pending = outbox.batches.load(Ordering::Relaxed);
                if opened {
                    tracing::error!(%error, pending_batches = pending, "ClickHouseUnavailable: breaker open; batches stay in the outbox");
                } else if breaker.state() == Breaker::Closed {
                    tracing::warn!(%error, pending_batches = pending, "ClickHouseInsertFailed: retrying");
                } else {
                    tracing::debug!(%error, pending_batches = pending, "ClickHouse probe failed");
                }
                if shutdown.is_cancelled() {
                    return;
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        }
    }
}

enum Step {
    Idle,
    Wait(Duration),
    Inserted { batches: usize, rows: usize },
}

#[derive(Debug, thiserror::Error)]
enum SinkError {
    #[error(transparent)]
    ClickHouse(#[from] crate::store::clickhouse::ClickHouseError),
    #[error("outbox: {0}")]
    Ledger(crate::store::StoreError),
}

impl SinkError {
    fn kind(&self) -> &'static str {
        match self {
            Self::ClickHouse(error) => error.kind(),
            Self::Ledger(error) => error.kind(),
        }
    }
}

/// Audit entries compared per page while looking for where the mirror and the ledger part.
const AUDIT_COMPARE_PAGE: u64 = 1_000;

/// The highest audit seq the mirror holds *from this ledger's chain*: ClickHouse's `max(seq)`
/// when its entry there is the ledger's; otherwise (a ledger restored from a backup, a fresh
/// or moved ledger: the mirror holds another timeline's entries under the seqs this chain
/// reuses) the last seq both hold with the same hash, so that the new entries are mirrored
/// instead of skipped (`AuditMirrorDiverged`). The ledger stays the source of truth for
/// `guardianctl audit verify`; the mirror then holds both timelines, told apart by hash.
async fn audit_mirror_cursor(ledger: &Ledger, store: &ClickHouseStore) -> Result<u64, SinkError> {
    let mirrored = store.audit_high_water().await?;
    let head = ledger
        .audit_head()
        .await
        .map_err(SinkError::Ledger)?
        .map_or(0, |(seq, _)| seq);
    let mut to = mirrored.min(head);
    if to == 0 {
        return Ok(0);
    }
    while to > 0 {
        let from = to.saturating_sub(AUDIT_COMPARE_PAGE - 1).max(1);
        let held: std::collections::HashSet<(u64, String)> =
            store.audit_hashes(from, to).await?.into_iter().collect();
        let ours = ledger
            .audit_entries(
                from - 1,
                usize::try_from(to - from + 1).unwrap_or(usize::MAX),
            )
            .await
            .map_err(SinkError::Ledger)?;
        if let Some(common) = ours
            .iter()
            .rev()
            .find(|e| held.contains(&(e.seq, e.hash.clone())))
            .map(|e| e.seq)
        {
            if common != mirrored {
                tracing::warn!(
                    clickhouse_max = mirrored,
                    ledger_head = head,
                    common,
                    "AuditMirrorDiverged: ClickHouse's audit table holds entries of another timeline (ledger restored, fresh or moved); mirroring this chain from the last shared entry"
                );
            }
            return Ok(common);
        }
        to = from - 1;
    }
    tracing::warn!(
        clickhouse_max = mirrored,
        ledger_head = head,
        "AuditMirrorDiverged: no entry of this chain is in ClickHouse's audit table; mirroring it whole"
    );
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_opens_after_repeated_failures_and_probes_once() {
        let mut breaker = CircuitBreaker::default();
        let now = Instant::now();
        assert!(!breaker.failure(now));
        assert!(!breaker.failure(now));
        assert!(breaker.failure(now), "third failure opens");
        assert!(breaker.wait(now) > Duration::ZERO);
        let later = now + FIRST_OPEN;
        assert_eq!(breaker.wait(later), Duration::ZERO);
        assert_eq!(breaker.state(), Breaker::HalfOpen);
        assert!(!breaker.failure(later), "a failed probe re-opens, longer");
        assert!(breaker.wait(later) > FIRST_OPEN);
        assert_eq!(breaker.wait(later + MAX_OPEN), Duration::ZERO);
        assert!(breaker.success(), "a good probe closes it");
        assert_eq!(breaker.state(), Breaker::Closed);
    }
}
