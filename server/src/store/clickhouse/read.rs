//! Reads: bucketed history of a node's metric (raw rows or rollups), the recent rows that
//! rebuild the windows, and per-node counts.

use ::clickhouse::{Row, RowOwned, RowRead};
use serde::Deserialize;

use super::rows::{ChainRecent, HostRecent, datetime};
use super::{ClickHouseError, ClickHouseStore};
use crate::batch::values::{ChainValues, HostValues};
use crate::store::telemetry::{HistoryPoint, METRICS, MetricDef};

/// One bucket as the history queries return it.
#[derive(Debug, Row, Deserialize)]
pub(super) struct BucketRow {
    start_unix_ms: i64,
    avg: f64,
    min: f64,
    max: f64,
    count: u64,
}

impl ClickHouseStore {
    /// Bucketed history of one node's metric over `[from, to)`: avg/min/max/count per
    /// `resolution_seconds` bucket, oldest first, empty buckets left out. `source` (from
    /// [`super::telemetry::plan`]) picks the raw table or a rollup; rollups count every
    /// minute/hour that starts in the range, from its bucket start.
    ///
    /// # Errors
    /// [`ClickHouseError::Request`] for a metric outside the catalogue or an unknown source;
    /// others when the query fails.
    pub async fn history(
        &self,
        node_id: &str,
        metric: &MetricDef,
        from_unix_ms: i64,
        to_unix_ms: i64,
        resolution_seconds: u32,
        source: &str,
    ) -> Result<Vec<HistoryPoint>, ClickHouseError> {
        // Column and table names come from the fixed catalogue, never from request text.
        if !METRICS.contains(metric) {
            return Err(ClickHouseError::Request(format!(
                "metric {:?} is not in the catalogue",
                metric.name
            )));
        }
        let res = resolution_seconds.max(1);
        let from_s = from_unix_ms.div_euclid(1000);
        let to_s = (to_unix_ms + 999).div_euclid(1000);
        let query = match source {
            "raw" => self
                .client
                .query(&format!(
                    "SELECT toInt64(intDiv(toUInt32(ts), {res}) * {res} * 1000) AS b, \
                     avg(toFloat64({col})), min(toFloat64({col})), max(toFloat64({col})), \
                     toUInt64(count()) \
                     FROM {table} \
                     WHERE node_id = ? AND ts >= toDateTime(?) AND ts <= toDateTime(?) \
                     AND ts_ms >= ? AND ts_ms < ? \
                     GROUP BY b ORDER BY b",
                    col = metric.name,
                    table = metric.table.name(),
                ))
                .bind(node_id)
                .bind(datetime(from_unix_ms))
                .bind(datetime(to_s * 1000))
                .bind(from_unix_ms)
                .bind(to_unix_ms),
            "rollup_1m" | "rollup_1h" => {
                let step: i64 = if source == "rollup_1m" { 60 } else { 3600 };
                self.client
                    .query(&format!(
                        "SELECT toInt64(intDiv(toUInt32(t), {res}) * {res} * 1000) AS b, \
                         avgMerge(avg_state), minMerge(min_state), maxMerge(max_state), \
                         toUInt64(countMerge(count_state)) \
                         FROM {source} \
                         WHERE node_id = ? AND metric = ? AND t >= toDateTime(?) AND t < toDateTime(?) \
                         GROUP BY b ORDER BY b"
                    ))
                    .bind(node_id)
                    .bind(metric.name)
                    .bind(datetime(from_s.div_euclid(step) * step * 1000))
                    .bind(datetime(to_s * 1000))
            }
            other => {
                return Err(ClickHouseError::Request(format!(
                    "unknown history source {other:?}: use raw, rollup_1m or rollup_1h"
                )));
            }
        };
        let rows = self
            .run("read history", query.fetch_all::<BucketRow>())
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| HistoryPoint {
                start_unix_ms: r.start_unix_ms,
                avg: r.avg,
                min: r.min,
                max: r.max,
                count: r.count,
            })
            .collect())
    }

    /// Host rows observed at or after `since_unix_ms`, by node then time.
    ///
    /// # Errors
    /// When the query fails.
    pub async fn recent_host(
        &self,
        since_unix_ms: i64,
    ) -> Result<Vec<(String, i64, HostValues)>, ClickHouseError> {
        let rows = self
            .recent::<HostRecent>("host_samples", since_unix_ms)
            .await?;
        Ok(rows.into_iter().map(HostRecent::into_parts).collect())
    }

    /// Chain rows observed at or after `since_unix_ms`, by node then time.
    ///
    /// # Errors
    /// When the query fails.
    pub async fn recent_chain(
        &self,
        since_unix_ms: i64,
    ) -> Result<Vec<(String, i64, ChainValues)>, ClickHouseError> {
        let rows = self
            .recent::<ChainRecent>("chain_samples", since_unix_ms)
            .await?;
        Ok(rows.into_iter().map(ChainRecent::into_parts).collect())
    }

    async fn recent<R: RowOwned + RowRead>(
        &self,
        table: &str,
        since_unix_ms: i64,
    ) -> Result<Vec<R>, ClickHouseError> {
        let query = self
            .client
            .query(&format!(
                "SELECT ?fields FROM {table} WHERE ts >= toDateTime(?) AND ts_ms >= ? \
                 ORDER BY node_id, ts_ms, seq, idx"
            ))
            .bind(datetime(since_unix_ms))
            .bind(since_unix_ms);
        self.run("read recent rows", query.fetch_all::<R>()).await
    }

    /// Each node's highest seq stored in the last `days` days (raw tables of every kind):
    /// what a ledger that lost its records (restored, fresh, moved) adopts as floors.
    ///
    /// # Errors
    /// When the query fails.
    pub async fn recent_max_seqs(&self, days: u32) -> Result<Vec<(String, u64)>, ClickHouseError> {
        let since = i64::from(days) * 86_400;
        let query = self.client.query(&format!(
            "SELECT node_id, toUInt64(max(seq)) FROM (\
               SELECT node_id, seq FROM host_samples WHERE ts >= now() - {since} \
               UNION ALL SELECT node_id, seq FROM chain_samples WHERE ts >= now() - {since} \
               UNION ALL SELECT node_id, seq FROM unavailable_samples WHERE ts >= now() - {since}) \
             GROUP BY node_id"
        ));
        self.run("read recent seqs", query.fetch_all::<(String, u64)>())
            .await
    }

    /// `(rows, distinct (seq, idx), distinct seqs)` of one node's host samples.
    ///
    /// # Errors
    /// When the query fails.
    pub async fn host_counts(&self, node_id: &str) -> Result<(u64, u64, u64), ClickHouseError> {
        let query = self
            .client
            .query(
                "SELECT toUInt64(count()), toUInt64(uniqExact(seq, idx)), toUInt64(uniqExact(seq)) \
                 FROM host_samples WHERE node_id = ?",
            )
            .bind(node_id);
        self.run("count host rows", query.fetch_one::<(u64, u64, u64)>())
            .await
    }
}
