//! Reads of the ledger database beyond the fleet: the ClickHouse outbox, the embedded
//! store's history, and the recent rows that rebuild in-memory windows at start.

use sqlx::{AssertSqlSafe, Row};

use super::telemetry::{ChainValues, HistoryPoint, HostValues, MetricDef, OutboxBatch, Table};
use super::{Ledger, StoreError, to_i64};

/// Outbox rows one query reads: at ~8 KiB a 50-sample batch, ~2 MiB of blobs past the
/// chunk's end at most.
const OUTBOX_READ_PAGE_ROWS: usize = 256;

impl Ledger {
    /// Outbox batches with `id > after_id`, oldest first: at most `max_batches`, and no more
    /// once `max_samples` samples are gathered.
    ///
    /// # Errors
    /// [`StoreError::Query`]; [`StoreError::Corrupt`] when a stored batch does not decode.
    pub async fn outbox_read(
        &self,
        after_id: u64,
        max_batches: usize,
        max_samples: usize,
    ) -> Result<Vec<OutboxBatch>, StoreError> {
        let mut out = Vec::new();
        let mut samples = 0usize;
        let mut after = after_id;
        // Page by page, so that reading stops near `max_samples`: one query for all of
        // `max_batches` rows read (and, in segment files, preaded) up to 20x the blobs the
        // chunk could use, which made falling behind ClickHouse dearer than keeping up.
        while out.len() < max_batches {
            let page = (max_batches - out.len()).min(OUTBOX_READ_PAGE_ROWS);
            let rows = sqlx::query(
                "SELECT id, node_id, network, received_at_unix_ms, batch, segment, segment_offset,
                        segment_len
                 FROM outbox WHERE id > $1 ORDER BY id LIMIT $2",
            )
            .bind(to_i64(after))
            .bind(to_i64(page as u64))
            .fetch_all(&self.pool)
            .await?;
            let last_page = rows.len() < page;
            // Blobs in segment files (segment > 0) are read in one go per page.
            let mut located = Vec::new();
            for row in &rows {
                let segment = count(row, 5)?;
                if segment > 0 {
                    located.push(super::segments::Location {
                        segment,
                        offset: count(row, 6)?,
                        len: count(row, 7)?,
                    });
                }
            }
            let mut from_segments = match (&self.segments, located.is_empty()) {
                (_, true) => Vec::new(),
                (Some(folder), false) => folder.read(located).await?,
                (None, false) => {
                    return Err(StoreError::Segment {
                        path: "(none: not a SQLite file ledger)".to_owned(),
                        source: std::io::Error::other(
                            "outbox rows refer to segment files, but this ledger has no segment folder",
                        ),
                    });
                }
            }
            .into_iter();
            for row in rows {
                let node_id: String = row.try_get(1)?;
                let blob: Vec<u8> = if count(&row, 5)? > 0 {
                    from_segments.next().unwrap_or_default()
                } else {
                    row.try_get(4)?
                };
                let batch =
                    super::blob::decode(&blob.into()).map_err(|source| StoreError::Corrupt {
                        node: node_id.clone(),
                        source,
                    })?;
                samples += batch.samples.len();
                after = u64::try_from(row.try_get::<i64, _>(0)?).unwrap_or(0);
                out.push(OutboxBatch {
                    outbox_id: after,
                    node_id,
                    network: row.try_get(2)?,
                    received_at_unix_ms: row.try_get(3)?,
                    batch: std::sync::Arc::new(batch),
                });
                if samples >= max_samples {
                    return Ok(out);
                }
            }
            if last_page {
                break;
            }
        }
        Ok(out)
    }

    /// An outbox id at least as large as every id committed so far (0: none yet), or None
    /// when the ledger cannot tell. Call it only while no outbox insert is in flight (the
    /// group-commit writer does, before its first group).
    ///
    /// SQLite's `sqlite_sequence` holds the largest id ever committed (AUTOINCREMENT never
    /// reuses one, and a rolled-back insert rolls it back too); PostgreSQL: the largest id
    /// still in the table, or else the sequence's last value.
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn outbox_id_ceiling(&self) -> Result<Option<u64>, StoreError> {
        let sql = match self.backend {
            super::Backend::Sqlite => {
                "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'outbox'), 0)"
            }
            super::Backend::Postgres => {
                "SELECT COALESCE((SELECT max(id) FROM outbox),
                    (SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM outbox_id_seq))"
            }
        };
        let ceiling: Option<i64> = sqlx::query(sql).fetch_one(&self.pool).await?.try_get(0)?;
        Ok(ceiling.and_then(|id| u64::try_from(id).ok()))
    }

    /// Deletes outbox batches with `id <= through_id` (delivered). Returns
    /// `(batches, bytes)` removed.
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn outbox_delete_through(&self, through_id: u64) -> Result<(u64, u64), StoreError> {
        // Before the rows are read: see segments::Folder::current. Without it (no segment
        // could be opened) the rows are still deleted; their files go with a later clean-up.
        let current = match &self.segments {
            Some(folder) => match folder.current().await {
                Ok(current) => Some(current),
                Err(error) => {
                    tracing::warn!(%error, "OutboxSegmentsNotRemoved");
                    None
                }
            },
            None => None,
        };
        let _turn = self.write_turn().await;
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "SELECT COUNT(*), CAST(COALESCE(SUM(LENGTH(batch) + segment_len), 0) AS BIGINT) FROM outbox
             WHERE id <= $1",
        )
        .bind(to_i64(through_id))
        .fetch_one(&mut *tx)
        .await?;
        let counted = (count(&row, 0)?, count(&row, 1)?);
        sqlx::query("DELETE FROM outbox WHERE id <= $1")
            .bind(to_i64(through_id))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        drop(_turn);
        if let (Some(folder), Some(current)) = (&self.segments, current) {
            // The rows are gone whatever happens here (the caller must count them as removed);
            // a file left behind goes with the next clean-up.
            if let Err(error) = self.remove_segments(folder, current).await {
                tracing::warn!(%error, "OutboxSegmentsNotRemoved");
            }
        }
        Ok(counted)
    }

    /// Removes the segment files below the oldest one a row refers to (and below `current`).
    async fn remove_segments(
        &self,
        folder: &std::sync::Arc<super::segments::Folder>,
        current: u64,
    ) -> Result<usize, StoreError> {
        // Segments only grow with ids, so the oldest row holds the oldest live segment.
        let oldest_live: Option<i64> =
            sqlx::query("SELECT segment FROM outbox WHERE segment > 0 ORDER BY id LIMIT 1")
                .fetch_optional(&self.pool)
                .await?
                .map(|row| row.try_get(0))
                .transpose()?;
        let below = oldest_live
            .and_then(|s| u64::try_from(s).ok())
            .map_or(current, |oldest| oldest.min(current));
        folder.remove_below(below).await
    }

    /// `(batches, bytes)` waiting in the outbox.
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn outbox_pending(&self) -> Result<(u64, u64), StoreError> {
        let row = sqlx::query(
            "SELECT COUNT(*), CAST(COALESCE(SUM(LENGTH(batch) + segment_len), 0) AS BIGINT) FROM outbox",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok((count(&row, 0)?, count(&row, 1)?))
    }

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

fn count(row: &sqlx::any::AnyRow, idx: usize) -> Result<u64, StoreError> {
    Ok(u64::try_from(row.try_get::<i64, _>(idx)?).unwrap_or(0))
}
