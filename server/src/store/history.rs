//! Owns history: bucketed history of a node's metric and the recent rows that rebuild the
//! in-memory windows at start, from whichever telemetry store holds them ([`TelemetryReader`]:
//! the ledger's embedded tables, or ClickHouse).

use sqlx::{AssertSqlSafe, Row};

use std::sync::Arc;

use super::clickhouse::{ClickHouseError, ClickHouseSettings, ClickHouseStore};
use super::telemetry::{HistoryPoint, MetricDef, Table};
use super::{Ledger, StoreError};
use crate::batch::values::{ChainValues, HostValues};

/// Where telemetry reads go: the ledger's embedded tables, or ClickHouse when `[clickhouse]
/// url` is set (opened on first use: the server starts while ClickHouse is down, and the
/// outbox keeps ingest lossless meanwhile). The one place that branches on it for reads:
/// window rebuild and `GetHistory` both come here.
#[derive(Clone)]
pub enum TelemetryReader {
    /// The ledger's embedded tables.
    Embedded(Ledger),
    /// ClickHouse.
    ClickHouse {
        /// How to reach it.
        settings: ClickHouseSettings,
        /// Opened on the first read.
        store: Arc<tokio::sync::OnceCell<ClickHouseStore>>,
    },
}

impl std::fmt::Debug for TelemetryReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TelemetryReader::Embedded(_) => f.write_str("TelemetryReader::Embedded"),
            TelemetryReader::ClickHouse { settings, .. } => f
                .debug_struct("TelemetryReader::ClickHouse")
                .field("url", &settings.url)
                .finish_non_exhaustive(),
        }
    }
}

/// Rows that rebuild the windows: host and chain values by node then time.
pub type RecentRows = (
    Vec<(String, i64, HostValues)>,
    Vec<(String, i64, ChainValues)>,
);

/// Why a telemetry read failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The embedded tables did not answer.
    #[error("the embedded store cannot answer now: {0}")]
    Embedded(#[from] StoreError),
    /// ClickHouse did not answer.
    #[error("ClickHouse cannot answer now: {0}")]
    ClickHouse(#[from] ClickHouseError),
}

impl TelemetryReader {
    /// ClickHouse when `clickhouse` is enabled, else the embedded tables of `ledger`.
    pub fn new(ledger: &Ledger, clickhouse: &ClickHouseSettings) -> Self {
        if clickhouse.enabled() {
            TelemetryReader::ClickHouse {
                settings: clickhouse.clone(),
                store: Arc::default(),
            }
        } else {
            TelemetryReader::Embedded(ledger.clone())
        }
    }

    /// Whether reads go to ClickHouse.
    pub fn is_clickhouse(&self) -> bool {
        matches!(self, TelemetryReader::ClickHouse { .. })
    }

    async fn clickhouse(
        settings: &ClickHouseSettings,
        store: &tokio::sync::OnceCell<ClickHouseStore>,
    ) -> Result<ClickHouseStore, ClickHouseError> {
        store
            .get_or_try_init(|| ClickHouseStore::open(settings))
            .await
            .cloned()
    }

    /// Bucketed history of one node's metric; returns the source that answered
    /// (`embedded`, or ClickHouse's `plan_source`: raw rows or a rollup) and the points.
    ///
    /// # Errors
    /// [`ReadError`] naming the store that did not answer.
    pub async fn history(
        &self,
        node_id: &str,
        metric: &MetricDef,
        (from_unix_ms, to_unix_ms): (i64, i64),
        resolution_seconds: u32,
        plan_source: &'static str,
    ) -> Result<(&'static str, Vec<HistoryPoint>), ReadError> {
        match self {
            TelemetryReader::Embedded(ledger) => Ok((
                "embedded",
                ledger
                    .history(
                        node_id,
                        metric,
                        from_unix_ms,
                        to_unix_ms,
                        resolution_seconds,
                    )
                    .await?,
            )),
            TelemetryReader::ClickHouse { settings, store } => {
                let store = Self::clickhouse(settings, store).await?;
                let points = store
                    .history(
                        node_id,
                        metric,
                        from_unix_ms,
                        to_unix_ms,
                        resolution_seconds,
                        plan_source,
                    )
                    .await?;
                Ok((plan_source, points))
            }
        }
    }

    /// Host and chain rows observed since `since_unix_ms` (the windows' span).
    ///
    /// # Errors
    /// [`ReadError`] naming the store that did not answer.
    pub async fn recent(&self, since_unix_ms: i64) -> Result<RecentRows, ReadError> {
        match self {
            TelemetryReader::Embedded(ledger) => Ok((
                ledger.recent_host(since_unix_ms).await?,
                ledger.recent_chain(since_unix_ms).await?,
            )),
            TelemetryReader::ClickHouse { settings, store } => {
                let store = Self::clickhouse(settings, store).await?;
                Ok((
                    store.recent_host(since_unix_ms).await?,
                    store.recent_chain(since_unix_ms).await?,
                ))
            }
        }
    }
}

impl Ledger {
    /// Bucketed history of one node's metric from the embedded tables.
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn history(
        &self,
        node_id: &str,
        metric: &MetricDef,
        from_unix_ms: i64,
        to_unix_ms: i64,
        resolution_seconds: u32,
    ) -> Result<Vec<HistoryPoint>, StoreError> {
        let width_ms = i64::from(resolution_seconds.max(1)) * 1000;
        // The column comes from the fixed catalogue, never from the request text.
        let sql = format!(
            "SELECT (observed_at_unix_ms / $4) * $4 AS bucket, AVG(CAST({col} AS DOUBLE PRECISION)),
                    MIN(CAST({col} AS DOUBLE PRECISION)), MAX(CAST({col} AS DOUBLE PRECISION)), COUNT({col})
             FROM {table}
             WHERE node_id = $1 AND observed_at_unix_ms >= $2 AND observed_at_unix_ms < $3
               AND {col} IS NOT NULL
             GROUP BY bucket ORDER BY bucket",
            col = metric.name,
            table = Table::name(metric.table),
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(node_id)
            .bind(from_unix_ms)
            .bind(to_unix_ms)
            .bind(width_ms)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                Ok(HistoryPoint {
                    start_unix_ms: row.try_get(0)?,
                    avg: row.try_get(1)?,
                    min: row.try_get(2)?,
                    max: row.try_get(3)?,
                    count: count(row, 4)?,
                })
            })
            .collect()
    }

    /// Host rows observed since `since_unix_ms`, by node then time.
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn recent_host(
        &self,
        since_unix_ms: i64,
    ) -> Result<Vec<(String, i64, HostValues)>, StoreError> {
        let rows = sqlx::query(
            "SELECT node_id, observed_at_unix_ms, cpu_busy_percent, cpu_iowait_percent, mem_total_bytes,
                    mem_available_bytes, load_avg_1m, cpu_psi_some_avg10_percent,
                    memory_psi_full_avg10_percent, io_psi_full_avg10_percent, chain_data_used_percent,
                    chain_data_available_bytes, disk_read_latency_ms_max, disk_write_latency_ms_max,
                    disk_utilisation_percent_max, net_rx_bytes_per_second, net_tx_bytes_per_second,
                    net_errors_total, oom_kills_total
             FROM host_samples WHERE observed_at_unix_ms >= $1 ORDER BY node_id, observed_at_unix_ms",
        )
        .bind(since_unix_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let f = |i: usize| -> Result<f64, StoreError> {
                    Ok(r.try_get::<Option<f64>, _>(i)?.unwrap_or(0.0))
                };
                let u = |i: usize| -> Result<u64, StoreError> {
                    Ok(u64::try_from(r.try_get::<Option<i64>, _>(i)?.unwrap_or(0)).unwrap_or(0))
                };
                Ok((
                    r.try_get(0)?,
                    r.try_get(1)?,
                    HostValues {
                        cpu_busy_percent: f(2)?,
                        cpu_iowait_percent: f(3)?,
                        mem_total_bytes: u(4)?,
                        mem_available_bytes: u(5)?,
                        load_avg_1m: f(6)?,
                        cpu_psi_some_avg10_percent: f(7)?,
                        memory_psi_full_avg10_percent: f(8)?,
                        io_psi_full_avg10_percent: f(9)?,
                        chain_data_used_percent: f(10)?,
                        chain_data_available_bytes: u(11)?,
                        disk_read_latency_ms_max: f(12)?,
                        disk_write_latency_ms_max: f(13)?,
                        disk_utilisation_percent_max: f(14)?,
                        net_rx_bytes_per_second: f(15)?,
                        net_tx_bytes_per_second: f(16)?,
                        net_errors_total: u(17)?,
                        oom_kills_total: u(18)?,
                    },
                ))
            })
            .collect()
    }

    /// Chain rows observed since `since_unix_ms`, by node then time.
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn recent_chain(
        &self,
        since_unix_ms: i64,
    ) -> Result<Vec<(String, i64, ChainValues)>, StoreError> {
        let rows = sqlx::query(
            "SELECT node_id, observed_at_unix_ms, responsive, best_block, finalized_block,
                    sync_highest_block, reference_best_block, block_lag, finality_lag_blocks, peers,
                    is_syncing, head_age_ms, rpc_latency_ms, spec_version, blocks_since_last_update,
                    validator_trust_ratio, emission_rao
             FROM chain_samples WHERE observed_at_unix_ms >= $1 ORDER BY node_id, observed_at_unix_ms",
        )
        .bind(since_unix_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let u = |i: usize| -> Result<u64, StoreError> {
                    Ok(u64::try_from(r.try_get::<i64, _>(i)?).unwrap_or(0))
                };
                let small = |i: usize| -> Result<u32, StoreError> {
                    Ok(u32::try_from(u(i)?).unwrap_or(u32::MAX))
                };
                Ok((
                    r.try_get(0)?,
                    r.try_get(1)?,
                    ChainValues {
                        responsive: u8::from(u(2)? != 0),
                        best_block: u(3)?,
                        finalized_block: u(4)?,
                        sync_highest_block: u(5)?,
                        reference_best_block: u(6)?,
                        block_lag: u(7)?,
                        finality_lag_blocks: u(8)?,
                        peers: small(9)?,
                        is_syncing: u8::from(u(10)? != 0),
                        head_age_ms: u(11)?,
                        rpc_latency_ms: r.try_get(12)?,
                        spec_version: small(13)?,
                        blocks_since_last_update: u(14)?,
                        validator_trust_ratio: r.try_get(15)?,
                        emission_rao: u(16)?,
                    },
                ))
            })
            .collect()
    }
}

pub(super) fn count(row: &sqlx::any::AnyRow, idx: usize) -> Result<u64, StoreError> {
    Ok(u64::try_from(row.try_get::<i64, _>(idx)?).unwrap_or(0))
}
