//! Pruning of the `(node, seq)` idempotency records in `batches`.
//!
//! Every committed batch leaves a record, so that a replay is acked without being stored
//! twice. Kept forever, the records would grow the ledger with every batch of the fleet
//! (roughly 50 bytes each: gigabytes a day at 1 000 agents sending a batch a second).
//!
//! # Why a floor is enough
//! A node's session commits its batches one at a time, in the order the agent numbered
//! them, and ends at the first failure; a new session for the node starts only after the
//! old one ended. So every seq at or below a node's `last_stored_seq` is either stored or
//! was dropped by the agent's own spool, and will never come again as new data.
//!
//! # Guarantees
//! - The pruner raises a node's floor (`nodes.batch_floor_seq`) only to the
//!   `last_stored_seq` it read one round earlier, so the records of the last round always
//!   stay. It raises the in-memory floor first, then the one on disk, and only then
//!   deletes the records at or below it, in bounded steps.
//! - [`Ledger::commit_group`](super::Ledger::commit_group) treats a batch at or below its
//!   node's floor as a replay. It reads the floor under the gate the pruner takes to raise
//!   it, so it never misses a record deleted under a floor it has not seen.
//! - One server process per ledger: the floors live in this process's memory (loaded at
//!   open), as does the gate.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::Row;
use tokio_util::sync::CancellationToken;

use super::{Ledger, StoreError};

/// How often the pruner runs; the records of batches committed within the last round
/// always stay.
pub const PRUNE_EVERY: Duration = Duration::from_secs(600);
/// Nodes whose floors one transaction raises.
const NODES_PER_TRANSACTION: usize = 100;
/// Seqs one DELETE covers: the first round after an upgrade meets a node's whole history,
/// and each statement holds the writer only briefly.
const RECORDS_PER_DELETE: i64 = 10_000;

impl Ledger {
    /// Every node's `last_stored_seq`.
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn stored_seqs(&self) -> Result<HashMap<String, u64>, StoreError> {
        let rows = sqlx::query("SELECT node_id, last_stored_seq FROM nodes")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                Ok((
                    row.try_get::<String, _>(0)?,
                    u64::try_from(row.try_get::<i64, _>(1)?).unwrap_or(0),
                ))
            })
            .collect()
    }

    /// A node's floor: every seq at or below it is a replay (0: none).
    pub fn batch_floor(&self, node: &str) -> u64 {
        self.floors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(node)
            .copied()
            .unwrap_or(0)
    }

    /// Raises each node's floor to the given seq, clamped to its `last_stored_seq` (a floor
    /// never goes down), then deletes its records at or below the floor in bounded steps.
    /// Returns the records deleted; stops early (keeping the rest for the next round) once
    /// `stop` is cancelled.
    ///
    /// # Errors
    /// [`StoreError::Query`]; floors already raised stay raised.
    pub async fn prune_batch_records(
        &self,
        through: &[(String, u64)],
        stop: &CancellationToken,
    ) -> Result<u64, StoreError> {
        let stored = self.stored_seqs().await?;
        let raise: Vec<(String, u64)> = through
            .iter()
            .filter_map(|(node, seq)| {
                let seq = (*seq).min(stored.get(node).copied().unwrap_or(0));
                (seq > self.batch_floor(node)).then(|| (node.clone(), seq))
            })
            .collect();
        let mut deleted = 0u64;
        for chunk in raise.chunks(NODES_PER_TRANSACTION) {
            if stop.is_cancelled() {
                break;
            }
            // In memory first, under the gate: a group commit that starts after this sees
            // the new floor, one still running finishes first. Safe before the database
            // agrees, since every seq at or below it is stored already; the records go
            // only once the floor is on disk, so after a restart they still cover the gap.
            {
                let _records = self.records_gate.lock().await;
                let mut floors = self
                    .floors
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                for (node, seq) in chunk {
                    let floor = floors.entry(node.clone()).or_default();
                    *floor = (*floor).max(*seq);
                }
            }
            {
                let _turn = self.write_turn().await;
                let mut tx = self.pool.begin().await?;
                for (node, seq) in chunk {
                    sqlx::query(
                        "UPDATE nodes SET batch_floor_seq = $2 WHERE node_id = $1 AND batch_floor_seq < $2",
                    )
                    .bind(node.as_str())
                    .bind(i64::try_from(*seq).unwrap_or(i64::MAX))
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
            }
            for (node, seq) in chunk {
                deleted += self.delete_records(node, *seq, stop).await?;
            }
        }
        Ok(deleted)
    }

    /// Deletes `node`'s records at or below `through`, [`RECORDS_PER_DELETE`] seqs per
    /// statement, each statement its own short write.
    async fn delete_records(
        &self,
        node: &str,
        through: u64,
        stop: &CancellationToken,
    ) -> Result<u64, StoreError> {
        let through = i64::try_from(through).unwrap_or(i64::MAX);
        let mut deleted = 0u64;
        while !stop.is_cancelled() {
            let lowest: Option<i64> =
                sqlx::query("SELECT MIN(seq) FROM batches WHERE node_id = $1")
                    .bind(node)
                    .fetch_one(&self.pool)
                    .await?
                    .try_get(0)?;
            let Some(lowest) = lowest.filter(|lowest| *lowest <= through) else {
                break;
            };
            let upto = through.min(lowest.saturating_add(RECORDS_PER_DELETE - 1));
            let _turn = self.write_turn().await;
            deleted += sqlx::query("DELETE FROM batches WHERE node_id = $1 AND seq <= $2")
                .bind(node)
                .bind(upto)
                .execute(&self.pool)
                .await?
                .rows_affected();
        }
        Ok(deleted)
    }

    /// Reads every node's floor (at open).
    /// Raises the in-memory floors to what ClickHouse holds (`(node, highest seq)`): after a
    /// restore, a fresh ledger or a move, the ledger has no records of batches another
    /// timeline stored, and an agent's resend of one would be stored twice. Every seq of a
    /// node up to the highest ClickHouse holds was committed (a session commits in order) and
    /// delivered (the sink inserts in outbox order), so anything at or below it is a replay.
    pub async fn adopt_floors(&self, held: &[(String, u64)]) -> usize {
        let _records = self.records_gate.lock().await;
        let mut floors = self
            .floors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut raised = 0;
        for (node, seq) in held {
            let floor = floors.entry(node.clone()).or_default();
            if *seq > *floor {
                *floor = *seq;
                raised += 1;
            }
        }
        raised
    }

    pub(super) async fn load_floors(&self) -> Result<(), StoreError> {
        let rows =
            sqlx::query("SELECT node_id, batch_floor_seq FROM nodes WHERE batch_floor_seq > 0")
                .fetch_all(&self.pool)
                .await?;
        let mut loaded = HashMap::with_capacity(rows.len());
        for row in rows {
            loaded.insert(
                row.try_get::<String, _>(0)?,
                u64::try_from(row.try_get::<i64, _>(1)?).unwrap_or(0),
            );
        }
        *self
            .floors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = loaded;
        Ok(())
    }
}

/// Runs until `shutdown`: every `every`, raises each node's floor to the `last_stored_seq`
/// read one round before and deletes the records below it.
pub async fn run_pruner(ledger: Ledger, every: Duration, shutdown: CancellationToken) {
    let mut previous: Option<HashMap<String, u64>> = None;
    loop {
        match ledger.stored_seqs().await {
            Ok(now) => {
                if let Some(then) = previous.replace(now) {
                    let through: Vec<(String, u64)> = then.into_iter().collect();
                    let started = std::time::Instant::now();
                    match ledger.prune_batch_records(&through, &shutdown).await {
                        Ok(records) => tracing::info!(
                            records,
                            nodes = through.len(),
                            ms = started.elapsed().as_millis(),
                            "BatchRecordsPruned"
                        ),
                        Err(error) => tracing::warn!(
                            %error,
                            "BatchRecordsNotPruned: the ledger keeps them until the next round"
                        ),
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "BatchRecordsNotPruned: cannot read the nodes"),
        }
        let before = crate::unix_ms() - super::security::RETENTION_DAYS * 86_400_000;
        match ledger.prune_security_events(before).await {
            Ok(0) => {}
            Ok(events) => tracing::info!(events, "SecurityEventsExpired"),
            Err(error) => tracing::warn!(%error, "SecurityEventsNotPruned"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}
