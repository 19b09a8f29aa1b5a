//! Retention of the embedded telemetry store.
//!
//! With the embedded store (no ClickHouse) every sample stays in the ledger's sample tables;
//! kept forever they would fill the disk (a host sample a second is ~30 million rows a year
//! per node). Every [`EXPIRE_EVERY`] the server deletes the rows observed more than
//! `retention_days` ago.
//!
//! Age is the agent's `observed_at_unix_ms` (the rows keep no receive time): an agent whose
//! clock is far behind has its fresh samples deleted at the next round.
//!
//! # Guarantees
//! - Only rows observed before the cutoff go; the in-memory windows (`window_seconds`, at
//!   most a day) are rebuilt from rows well inside it.
//! - Each DELETE covers one node's oldest [`WINDOW_MS`] of one table (an index range on
//!   `(node_id, observed_at_unix_ms)`, per kind in `kind_samples`), so a first round meeting
//!   months of history holds the writer only briefly at a time; cancelling stops between
//!   statements and the next round goes on from there.
//! - A kind written to `kind_samples` must be listed in [`SCOPES`], or its rows stay (the
//!   test commits every kind and checks every table empties).

use std::time::Duration;

use sqlx::{AssertSqlSafe, Row};
use tokio_util::sync::CancellationToken;

use super::{Ledger, StoreError};

/// How often expired samples are deleted.
pub const EXPIRE_EVERY: Duration = Duration::from_secs(600);
/// Observed time one DELETE covers, per node and table.
const WINDOW_MS: i64 = 3_600_000;
/// The embedded store's sample tables (each has `node_id` and `observed_at_unix_ms`).
const TABLES: [&str; 5] = [
    "host_samples",
    "chain_samples",
    "gpu_samples",
    "unavailable_samples",
    "kind_samples",
];
/// What one expiry step scans: a table, and for `kind_samples` a kind (its time index is
/// `(node_id, kind, observed_at_unix_ms)`), so that each step's `MIN` is one index seek.
const SCOPES: [(&str, Option<&str>); 7] = [
    ("host_samples", None),
    ("chain_samples", None),
    ("gpu_samples", None),
    ("unavailable_samples", None),
    ("kind_samples", Some("chain")),
    ("kind_samples", Some("gpu")),
    ("kind_samples", Some("keystore")),
];
const DAY_MS: i64 = 86_400_000;

impl Ledger {
    /// Deletes every sample row observed before `before_unix_ms`, node by node and table by
    /// table, [`WINDOW_MS`] of observed time per statement. Returns the rows deleted; stops
    /// early (the rest goes next round) once `stop` is cancelled.
    ///
    /// # Errors
    /// [`StoreError::Query`]; what was deleted before it stays deleted.
    pub async fn expire_samples(
        &self,
        before_unix_ms: i64,
        stop: &CancellationToken,
    ) -> Result<u64, StoreError> {
        let nodes: Vec<String> = sqlx::query("SELECT node_id FROM nodes ORDER BY node_id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| row.try_get::<String, _>(0))
            .collect::<Result<_, _>>()?;
        let mut deleted = 0u64;
        for (table, kind) in SCOPES {
            // `table` and `kind` come from SCOPES, never from input.
            let filter = kind.map_or(String::new(), |kind| format!(" AND kind = '{kind}'"));
            for node in &nodes {
                loop {
                    if stop.is_cancelled() {
                        return Ok(deleted);
                    }
                    let oldest: Option<i64> = sqlx::query(AssertSqlSafe(format!(
                        "SELECT MIN(observed_at_unix_ms) FROM {table} WHERE node_id = $1{filter}"
                    )))
                    .bind(node.as_str())
                    .fetch_one(&self.pool)
                    .await?
                    .try_get(0)?;
                    let Some(oldest) = oldest.filter(|oldest| *oldest < before_unix_ms) else {
                        break;
                    };
                    // oldest < upto: every statement deletes at least the oldest row.
                    let upto = before_unix_ms.min(oldest.saturating_add(WINDOW_MS));
                    let _turn = self.write_turn().await;
                    deleted += sqlx::query(AssertSqlSafe(format!(
                        "DELETE FROM {table} WHERE node_id = $1{filter} AND observed_at_unix_ms < $2"
                    )))
                    .bind(node.as_str())
                    .bind(upto)
                    .execute(&self.pool)
                    .await?
                    .rows_affected();
                }
            }
        }
        Ok(deleted)
    }
}

impl Ledger {
    /// Rows a node has in each embedded sample table, in the order `host_samples`,
    /// `chain_samples`, `gpu_samples`, `unavailable_samples`, `kind_samples` (for checks
    /// and tests).
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn sample_rows(&self, node: &str) -> Result<[i64; 5], StoreError> {
        let mut counts = [0i64; 5];
        for (count, table) in counts.iter_mut().zip(TABLES) {
            *count = sqlx::query(AssertSqlSafe(format!(
                "SELECT COUNT(*) FROM {table} WHERE node_id = $1"
            )))
            .bind(node)
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?;
        }
        Ok(counts)
    }
}

/// Runs until `shutdown`: every `every`, deletes the embedded samples observed more than
/// `retention_days` ago (`crate::unix_ms` is now). Adds what it deleted to `expired`.
pub async fn run_expiry(
    ledger: Ledger,
    retention_days: u32,
    every: Duration,
    expired: prometheus_client::metrics::counter::Counter,
    shutdown: CancellationToken,
) {
    loop {
        let before = crate::unix_ms().saturating_sub(i64::from(retention_days) * DAY_MS);
        let started = std::time::Instant::now();
        match ledger.expire_samples(before, &shutdown).await {
            Ok(0) => {}
            Ok(rows) => {
                expired.inc_by(rows);
                tracing::info!(
                    rows,
                    retention_days,
                    ms = started.elapsed().as_millis(),
                    "SamplesExpired"
                );
            }
            Err(error) => tracing::warn!(
                %error,
                "SamplesNotExpired: the embedded store keeps them until the next round"
            ),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}
