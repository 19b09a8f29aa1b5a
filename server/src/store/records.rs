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
//!   `last_stored_seq` it read one round earlier, so the records of at least the last
//!   round stay, and deletes the records at or below the floor in the same transaction.
//! - [`Ledger::commit_group`](super::Ledger::commit_group) treats a batch at or below its
//!   node's floor as a replay. It reads the floor under the same gate the pruner holds, so
//!   it never sees a record deleted without the floor that covers it.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::Row;
use tokio_util::sync::CancellationToken;

use super::{Ledger, StoreError};

/// How often the pruner runs; records of at least this long ago stay.
pub const PRUNE_EVERY: Duration = Duration::from_secs(600);
/// Nodes per pruning transaction: each holds the writer only briefly.
const NODES_PER_TRANSACTION: usize = 100;

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

    /// Raises each node's floor to the given seq (never lowers it) and deletes its records
    /// at or below it. `through` must hold seqs no higher than the node's `last_stored_seq`.
    /// Returns the records deleted.
    ///
    /// # Errors
    /// [`StoreError::Query`]; the transactions before the failing one stay done.
    pub async fn prune_batch_records(&self, through: &[(String, u64)]) -> Result<u64, StoreError> {
        let mut deleted = 0u64;
        let raise: Vec<&(String, u64)> = through
            .iter()
            .filter(|(node, seq)| *seq > self.batch_floor(node))
            .collect();
        for chunk in raise.chunks(NODES_PER_TRANSACTION) {
            let _records = self.records_gate.lock().await;
            let _turn = self.write_turn().await;
            let mut tx = self.pool.begin().await?;
            for (node, seq) in chunk {
                let seq = i64::try_from(*seq).unwrap_or(i64::MAX);
                deleted += sqlx::query("DELETE FROM batches WHERE node_id = $1 AND seq <= $2")
                    .bind(node.as_str())
                    .bind(seq)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                sqlx::query(
                    "UPDATE nodes SET batch_floor_seq = $2 WHERE node_id = $1 AND batch_floor_seq < $2",
                )
                .bind(node.as_str())
                .bind(seq)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            let mut floors = self
                .floors
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for (node, seq) in chunk {
                let floor = floors.entry(node.clone()).or_default();
                *floor = (*floor).max(*seq);
            }
        }
        Ok(deleted)
    }

    /// Reads every node's floor (at open).
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
                    match ledger.prune_batch_records(&through).await {
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
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}
