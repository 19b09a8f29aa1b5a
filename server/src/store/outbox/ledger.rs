//! The ledger's side of the outbox: reading batches back in id order, the id ceiling, deleting
//! what ClickHouse holds (and the segment files no row points into), and the pending totals.

use sqlx::Row;

use super::OutboxBatch;
use crate::store::history::count;
use crate::store::{Ledger, StoreError, to_i64};

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
            crate::store::Backend::Sqlite => {
                "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'outbox'), 0)"
            }
            crate::store::Backend::Postgres => {
                "SELECT COALESCE((SELECT max(id) FROM outbox),
                    (SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM outbox_id_seq))"
            }
        };
        let ceiling: Option<i64> = sqlx::query(sql).fetch_one(&self.pool).await?.try_get(0)?;
        Ok(ceiling.and_then(|id| u64::try_from(id).ok()))
    }

    /// Makes the next outbox id larger than `floor` (no-op when it already is).
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn outbox_ids_above(&self, floor: u64) -> Result<(), StoreError> {
        let floor = to_i64(floor);
        match self.backend {
            crate::store::Backend::Sqlite => {
                let mut tx = self.pool.begin().await?;
                sqlx::query(
                    "INSERT INTO sqlite_sequence (name, seq) SELECT 'outbox', $1
                     WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'outbox')",
                )
                .bind(floor)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "UPDATE sqlite_sequence SET seq = $1 WHERE name = 'outbox' AND seq < $1",
                )
                .bind(floor)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
            }
            crate::store::Backend::Postgres => {
                sqlx::query(
                    "SELECT setval('outbox_id_seq', $1, true) FROM outbox_id_seq
                     WHERE (CASE WHEN is_called THEN last_value ELSE 0 END) < $1",
                )
                .bind(floor)
                .fetch_all(&self.pool)
                .await?;
            }
        }
        Ok(())
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
}
