//! Rollup repair after an uncertain chunk.
//!
//! A rollup row comes from a materialized view that runs after the raw part is written,
//! in the same INSERT but not atomically with it: a ClickHouse server killed between the two
//! (seen with a replica killed mid-insert in cluster mode) keeps the raw rows and loses
//! their rollup. The sink then finds those raw rows stored and rightly does not write them
//! again, so the view never sees them.
//!
//! So when a chunk reaches down to a table's mark (it may have landed in part), the buckets
//! it touches are checked before the rest of it is written, while the raw tables hold just
//! the parts of it that landed: per node and bucket, the rollup's count against the raw
//! rows' count. A bucket short by exactly the chunk's rows there (one raw part per shard
//! and day, so the rows of a bucket landed with or without their view together) gets the
//! view's own aggregation of those rows
//! ([`super::schema::rollup_select`]). A bucket that agrees is left alone, so a repair run
//! twice (a crash during it) adds nothing; any other difference is reported, not guessed at.

use std::collections::{BTreeSet, HashMap};

use super::rows::datetime;
use super::schema::{ROLLED_UP, ROLLUPS, rollup_select};
use super::{ClickHouseError, ClickHouseStore};
use crate::store::telemetry::metrics_of;

/// Rows per `(node, bucket start in Unix seconds)`.
type Counts = HashMap<(String, u32), u64>;

/// The chunk a repair looks at: its outbox ids, observed times and nodes.
pub(super) struct ChunkSpan<'a> {
    pub(super) outbox_min: u64,
    pub(super) outbox_max: u64,
    pub(super) first_unix_ms: i64,
    pub(super) last_unix_ms: i64,
    pub(super) nodes: &'a BTreeSet<String>,
}

impl ClickHouseStore {
    /// Gives every rollup bucket that lacks exactly this chunk's rows the view's aggregation
    /// of them. Returns the buckets repaired.
    ///
    /// # Errors
    /// When a read or the repair INSERT fails (the next uncertain pass checks again).
    pub(super) async fn repair_rollups(
        &self,
        span: &ChunkSpan<'_>,
    ) -> Result<usize, ClickHouseError> {
        if span.nodes.is_empty() || span.first_unix_ms > span.last_unix_ms {
            return Ok(0);
        }
        let nodes: Vec<&str> = span.nodes.iter().map(String::as_str).collect();
        let mut repaired = 0;
        for table in ROLLED_UP {
            let Some(first_metric) = metrics_of(table).next() else {
                continue;
            };
            for (rollup, bucket) in ROLLUPS {
                let chunk = self
                    .counts(
                        &format!(
                            "SELECT node_id, toUInt32({bucket}(ts)) AS b, count() FROM {raw} \
                             WHERE outbox_id >= ? AND outbox_id <= ? \
                             AND ts >= toDateTime(?) AND ts <= toDateTime(?) GROUP BY node_id, b",
                            raw = table.name()
                        ),
                        |q| {
                            q.bind(span.outbox_min)
                                .bind(span.outbox_max)
                                .bind(datetime(span.first_unix_ms))
                                .bind(datetime(span.last_unix_ms))
                        },
                    )
                    .await?;
                let Some(lo) = chunk.keys().map(|k| k.1).min() else {
                    continue;
                };
                let hi = chunk.keys().map(|k| k.1).max().unwrap_or(lo);
                let raw = self
                    .counts(
                        &format!(
                            "SELECT node_id, toUInt32({bucket}(ts)) AS b, count() FROM {raw} \
                             WHERE has(?, node_id) AND {bucket}(ts) >= toDateTime(?) \
                             AND {bucket}(ts) <= toDateTime(?) GROUP BY node_id, b",
                            raw = table.name()
                        ),
                        |q| q.bind(&nodes).bind(lo).bind(hi),
                    )
                    .await?;
                let rolled = self
                    .counts(
                        &format!(
                            "SELECT node_id, toUInt32(t) AS b, countMerge(count_state) FROM {rollup} \
                             WHERE metric = ? AND has(?, node_id) AND t >= toDateTime(?) \
                             AND t <= toDateTime(?) GROUP BY node_id, b"
                        ),
                        |q| q.bind(first_metric.name).bind(&nodes).bind(lo).bind(hi),
                    )
                    .await?;
                let mut lacking = Vec::new();
                for (key, &in_chunk) in &chunk {
                    let raw_n = raw.get(key).copied().unwrap_or(0);
                    let rolled_n = rolled.get(key).copied().unwrap_or(0);
                    if rolled_n == raw_n {
                        continue;
                    }
                    if rolled_n + in_chunk == raw_n {
                        lacking.push(key);
                    } else {
                        tracing::warn!(
                            rollup,
                            table = table.name(),
                            node = key.0,
                            bucket_unix_s = key.1,
                            raw_rows = raw_n,
                            rollup_rows = rolled_n,
                            chunk_rows = in_chunk,
                            "ClickHouseRollupDiffers: not by this chunk's rows; left as it is"
                        );
                    }
                }
                if lacking.is_empty() {
                    continue;
                }
                let keys = lacking
                    .iter()
                    .map(|(node, b)| format!("('{}', {b})", node.replace(['\'', '\\'], "")))
                    .collect::<Vec<_>>()
                    .join(", ");
                let filter = format!(
                    "WHERE outbox_id >= {min} AND outbox_id <= {max} \
                     AND ts >= toDateTime({first}) AND ts <= toDateTime({last}) \
                     AND (node_id, toUInt32({bucket}(ts))) IN ({keys})",
                    min = span.outbox_min,
                    max = span.outbox_max,
                    first = datetime(span.first_unix_ms),
                    last = datetime(span.last_unix_ms),
                );
                let sql = format!(
                    "INSERT INTO {rollup} (node_id, metric, t, avg_state, min_state, max_state, count_state) {}",
                    rollup_select(table, bucket, table.name(), &filter)
                );
                let mut insert = self.exact_query(&sql);
                if !self.settings.cluster.is_empty() {
                    insert = insert.with_setting("insert_distributed_sync", "1");
                }
                self.run("repair a rollup", insert.execute()).await?;
                tracing::warn!(
                    rollup,
                    table = table.name(),
                    buckets = lacking.len(),
                    outbox_min = span.outbox_min,
                    outbox_max = span.outbox_max,
                    "ClickHouseRollupRepaired: raw rows had landed without their rollup"
                );
                repaired += lacking.len();
            }
        }
        Ok(repaired)
    }

    async fn counts(
        &self,
        sql: &str,
        bind: impl FnOnce(::clickhouse::query::Query) -> ::clickhouse::query::Query,
    ) -> Result<Counts, ClickHouseError> {
        let rows = self
            .run(
                "count rows for a rollup check",
                bind(self.exact_query(sql)).fetch_all::<(String, u32, u64)>(),
            )
            .await?;
        Ok(rows.into_iter().map(|(n, b, c)| ((n, b), c)).collect())
    }
}
