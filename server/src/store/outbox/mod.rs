//! Owns the ClickHouse outbox: every committed batch waits here, in the ledger's `outbox`
//! table (its bytes in segment files beside a SQLite ledger: [`segments`]), in the server's
//! own compact encoding ([`blob`]), until the sink ([`sink`]) has inserted it into ClickHouse.
//! Also the outbox's gauge and the in-memory hand-off of freshly committed batches to the
//! sink, and the ledger's outbox reads.

pub mod blob;
pub mod ledger;
pub mod segments;
pub mod sink;

use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::Row;
use tokio::sync::Notify;

use super::commit::Job;
use super::insert::{Value, insert_query, statements};
use super::{Backend, StoreError, to_i64};
use crate::batch::DecodeError;

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
    pub(in crate::store) fn added_group(&self, batches: Vec<OutboxBlob>) {
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
    pub(in crate::store) fn start_chain(&self, ceiling: u64) {
        self.lock_handoff().last_id.get_or_insert(ceiling);
    }

    /// The writer cannot tell which outbox ids a transaction got (it failed): the chain
    /// starts again.
    pub(in crate::store) fn break_chain(&self) {
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

/// A committed batch as the telemetry sinks see it: numbered by the durable outbox it
/// waited in, in commit order.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxBatch {
    /// Position in the outbox: strictly increasing in commit order, never reused.
    pub outbox_id: u64,
    /// The node (from its certificate).
    pub node_id: String,
    /// The node's network (from its Hello).
    pub network: String,
    /// When the server committed it, Unix milliseconds.
    pub received_at_unix_ms: i64,
    /// The batch, decoded from its outbox blob ([`super::blob`]: host samples carry their
    /// values, not their encoded bytes).
    pub batch: std::sync::Arc<crate::batch::Batch>,
}

/// A committed batch as the outbox holds it, in the outbox's encoding ([`super::blob`]):
/// what the group commit hands the sink in memory, the same bytes the segment file holds.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxBlob {
    /// Position in the outbox ([`OutboxBatch::outbox_id`]).
    pub outbox_id: u64,
    /// The node (from its certificate).
    pub node_id: String,
    /// The node's network (from its Hello).
    pub network: String,
    /// When the server committed it, Unix milliseconds.
    pub received_at_unix_ms: i64,
    /// How many samples it holds.
    pub samples: usize,
    /// The encoded batch.
    pub blob: prost::bytes::Bytes,
}

impl OutboxBlob {
    /// Decodes the batch.
    ///
    /// # Errors
    /// When the blob is corrupt ([`super::blob::decode`]).
    pub fn decode(&self) -> Result<OutboxBatch, DecodeError> {
        Ok(OutboxBatch {
            outbox_id: self.outbox_id,
            node_id: self.node_id.clone(),
            network: self.network.clone(),
            received_at_unix_ms: self.received_at_unix_ms,
            batch: std::sync::Arc::new(blob::decode(&self.blob)?),
        })
    }
}

/// Loads the outbox's gauge from the ledger (what waits from before a restart) and, with
/// ClickHouse configured, starts the sink on `tasks`. Without it, batches still in the outbox
/// stay there (warned once) until it is configured again.
///
/// # Errors
/// [`StoreError`] when the pending totals cannot be read.
pub async fn start(
    ledger: &super::Ledger,
    clickhouse: &super::clickhouse::ClickHouseSettings,
    metrics: &std::sync::Arc<crate::metrics::Metrics>,
    shutdown: &tokio_util::sync::CancellationToken,
    tasks: &tokio_util::task::TaskTracker,
) -> Result<std::sync::Arc<OutboxGauge>, StoreError> {
    if clickhouse.enabled() {
        ids_above_this_start(ledger).await?;
        adopt_clickhouse_floors(ledger, clickhouse).await;
    }
    let gauge = std::sync::Arc::new(OutboxGauge::default());
    gauge.set_handoff_max_bytes(clickhouse.handoff_max_bytes);
    let (pending_batches, pending_bytes) = ledger.outbox_pending().await?;
    gauge.batches.store(pending_batches, Ordering::Relaxed);
    gauge.bytes.store(pending_bytes, Ordering::Relaxed);
    if pending_batches > 0 {
        if clickhouse.enabled() {
            tracing::info!(
                pending_batches,
                pending_bytes,
                "OutboxReplay: batches committed before the restart are still to be inserted into ClickHouse"
            );
        } else {
            tracing::warn!(
                pending_batches,
                "the outbox holds batches for ClickHouse but [clickhouse] url is not set; they stay there until it is"
            );
        }
    }
    if clickhouse.enabled() {
        tasks.spawn(sink::run(
            ledger.clone(),
            clickhouse.clone(),
            std::sync::Arc::clone(&gauge),
            std::sync::Arc::clone(metrics),
            shutdown.clone(),
        ));
    }
    Ok(gauge)
}

/// Outbox ids of this run start above the wall clock in microseconds (and above every id
/// the ledger handed out).
///
/// ClickHouse's exactly-once rule is per outbox id: a table holding `max(outbox_id) = N`
/// takes only batches above N. A ledger restored from a backup, a fresh ledger, or a move to
/// PostgreSQL would hand out ids ClickHouse already holds from the other timeline, and their
/// batches were acked and then silently skipped. Ids that start each run at the clock's
/// microseconds stay above every id of every earlier run as long as a run commits fewer
/// batches than microseconds pass (it would take 1 000 000 batches/s) and the clock does not
/// go back between runs by more than the previous run lasted (keep NTP on).
async fn ids_above_this_start(ledger: &super::Ledger) -> Result<(), StoreError> {
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2));
    ledger.outbox_ids_above(now_us).await
}

/// Adopts as floors the seqs ClickHouse holds from the last two days (before ingest starts,
/// waiting at most 10 s): after a restore or a move, agents resending batches another
/// timeline already stored get them acked as replays instead of stored twice. Without
/// ClickHouse at start this is skipped, with a warning.
async fn adopt_clickhouse_floors(
    ledger: &super::Ledger,
    settings: &super::clickhouse::ClickHouseSettings,
) {
    let held = async {
        let store = super::clickhouse::ClickHouseStore::open(settings).await?;
        store.recent_max_seqs(2).await
    };
    match tokio::time::timeout(std::time::Duration::from_secs(10), held).await {
        Ok(Ok(held)) => {
            let raised = ledger.adopt_floors(&held).await;
            if raised > 0 {
                tracing::warn!(
                    nodes = raised,
                    "FloorsAdoptedFromClickHouse: ClickHouse holds newer batches than this ledger recorded (restored, fresh or moved ledger); resends of them are acked as replays"
                );
            }
        }
        Ok(Err(error)) => {
            tracing::warn!(%error, "FloorsNotAdopted: ClickHouse did not answer at start; after a ledger restore, batches agents resend may be stored twice")
        }
        Err(_) => tracing::warn!(
            "FloorsNotAdopted: ClickHouse took over 10 s at start; after a ledger restore, batches agents resend may be stored twice"
        ),
    }
}

/// Appends a group's outbox batches (`jobs` with their encoded `blobs`) in `tx`: a SQLite file
/// ledger keeps the blobs in segment files, synced before the transaction commits, and the rows
/// say where; otherwise the blob is in the row. Returns the rows' ids in list order.
pub(super) async fn append(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    backend: Backend,
    segments: Option<&std::sync::Arc<segments::Folder>>,
    jobs: &[&Job],
    blobs: &[prost::bytes::Bytes],
    now_unix_ms: i64,
) -> Result<Vec<u64>, StoreError> {
    // A SQLite file ledger keeps the blobs in segment files, synced before this
    // transaction commits; the rows say where (segments.rs).
    // (blob in the row, segment, offset, length); segment 0: the blob is in the row.
    let row = |job: &&Job, blob: Vec<u8>, [segment, offset, len]: [u64; 3]| {
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
    let rows: Vec<Vec<Value>> = match segments {
        Some(folder) if !blobs.is_empty() => folder
            .append(blobs.to_vec())
            .await?
            .into_iter()
            .zip(jobs)
            .map(|(at, job)| row(job, Vec::new(), [at.segment, at.offset, at.len]))
            .collect(),
        _ => blobs
            .iter()
            .zip(jobs)
            .map(|(blob, job)| row(job, blob.to_vec(), [0, 0, 0]))
            .collect(),
    };
    insert_outbox(tx, backend, rows).await
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Batch;

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
            blob: blob::encode(&batch),
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
}
