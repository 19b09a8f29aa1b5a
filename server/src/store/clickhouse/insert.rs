//! Exactly-once inserts: outbox batches (decoded or still encoded) in RowBinary chunks, one
//! INSERT per table per chunk, only rows newer than each table's high-water mark; the audit
//! mirror.

use ::clickhouse::RowWrite;

use super::repair::ChunkSpan;
use super::rows::*;
use super::schema::RAW_TABLES;
use super::{ClickHouseError, ClickHouseStore};
use crate::batch::Kind;
use crate::batch::values::{ChainValues, GpuValues};
use crate::store::audit::AuditEntry;
use crate::store::outbox::blob::{HOST_WORD_FIELDS, Visit, put_host_words};
use crate::store::outbox::{OutboxBatch, OutboxBlob};

/// Per raw table, the largest `outbox_id` stored in it. Every batch above it is new to the
/// table; a batch at or below it may be stored whole or in part (an INSERT is one part per
/// day partition and shard, and a crash may keep some of them), so
/// [`ClickHouseStore::insert`] reads back which of such a chunk's rows are there.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HighWater {
    ids: [u64; RAW_TABLES.len()],
}

impl HighWater {
    /// The high-water mark of `table` (0 for a name that is not a raw table).
    pub fn get(&self, table: &str) -> u64 {
        RAW_TABLES
            .iter()
            .position(|t| *t == table)
            .map_or(0, |i| self.ids[i])
    }

    /// The smallest mark: every table holds rows of batches up to it (not necessarily all).
    pub fn min(&self) -> u64 {
        self.ids.iter().copied().min().unwrap_or(0)
    }

    fn raise(&mut self, table: usize, id: u64) {
        self.ids[table] = self.ids[table].max(id);
    }
}

/// `max_insert_block_size` for an INSERT of `rows` rows: ClickHouse's default (1 048 576),
/// or more so that the INSERT is one block.
fn block_size(rows: usize) -> String {
    rows.max(1_048_576).to_string()
}

/// Per node, the `(seq, idx)` of the samples a table already holds.
type HeldRows = std::collections::HashMap<String, std::collections::HashSet<(u64, u32)>>;

/// What one [`ClickHouseStore::insert`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct InsertStats {
    /// Batches of the chunk that had at least one row not stored before.
    pub batches: usize,
    /// Rows written, all tables together.
    pub rows: usize,
    /// Rows left out because their table already held their batch (a replay).
    pub skipped_rows: usize,
    /// Rollup buckets given rows whose raw rows had landed without them (a replay).
    pub rollup_buckets_repaired: usize,
}

/// A batch as [`ClickHouseStore::insert`] takes it: decoded ([`OutboxBatch`]: read back from
/// the outbox table, tests) or still in the outbox's encoding ([`OutboxBlob`]: the sink's
/// in-memory hand-off, whose host samples then go to RowBinary with one copy).
pub trait InsertBatch {
    /// Position in the outbox.
    fn outbox_id(&self) -> u64;
    /// The node.
    fn node_id(&self) -> &str;
    /// The node's network.
    fn network(&self) -> &str;
    /// When the server committed it, Unix milliseconds.
    fn received_at_unix_ms(&self) -> i64;
    /// Calls `each(seq, index, observed_at_unix_ms, sample)` per sample with a kind, in order.
    ///
    /// # Errors
    /// When the batch does not decode.
    fn visit(
        &self,
        each: &mut dyn FnMut(u64, u32, i64, Visit<'_>),
    ) -> Result<(), crate::batch::DecodeError>;
}

impl InsertBatch for OutboxBatch {
    fn outbox_id(&self) -> u64 {
        self.outbox_id
    }
    fn node_id(&self) -> &str {
        &self.node_id
    }
    fn network(&self) -> &str {
        &self.network
    }
    fn received_at_unix_ms(&self) -> i64 {
        self.received_at_unix_ms
    }
    fn visit(
        &self,
        each: &mut dyn FnMut(u64, u32, i64, Visit<'_>),
    ) -> Result<(), crate::batch::DecodeError> {
        // Ingest refuses kind-less samples; there is nothing to store of one.
        crate::store::outbox::blob::visit_batch(&self.batch, each);
        Ok(())
    }
}

impl InsertBatch for OutboxBlob {
    fn outbox_id(&self) -> u64 {
        self.outbox_id
    }
    fn node_id(&self) -> &str {
        &self.node_id
    }
    fn network(&self) -> &str {
        &self.network
    }
    fn received_at_unix_ms(&self) -> i64 {
        self.received_at_unix_ms
    }
    fn visit(
        &self,
        each: &mut dyn FnMut(u64, u32, i64, Visit<'_>),
    ) -> Result<(), crate::batch::DecodeError> {
        crate::store::outbox::blob::visit(&self.blob, each)
    }
}

/// One chunk's rows, split by table.
#[derive(Default)]
pub(super) struct ChunkRows<'a> {
    /// Host rows, already in RowBinary ([`put_host_row`]).
    host: Vec<u8>,
    host_rows: usize,
    chain: Vec<ChainRow<'a>>,
    gpu: Vec<GpuRow<'a>>,
    keystore: Vec<KeystoreRow<'a>>,
    unavailable: Vec<UnavailableRow<'a>>,
}

/// The earliest and latest observed time of the chunk's samples (`(MAX, MIN)` when empty).
fn time_span<B: InsertBatch>(batches: &[B]) -> Result<(i64, i64), ClickHouseError> {
    let (mut first, mut last) = (i64::MAX, i64::MIN);
    for b in batches {
        b.visit(&mut |_, _, at, _| {
            first = first.min(at);
            last = last.max(at);
        })
        .map_err(|source| ClickHouseError::Outbox {
            node: b.node_id().to_owned(),
            outbox_id: b.outbox_id(),
            source,
        })?;
    }
    Ok((first, last))
}

// ------------------------------------------------------------------ DDL

impl ClickHouseStore {
    /// What each raw table already holds: its `max(outbox_id)`. Read it at start and after
    /// any failed insert (a failed or timed-out insert may still have landed).
    ///
    /// # Errors
    /// When a query fails.
    pub async fn high_water(&self) -> Result<HighWater, ClickHouseError> {
        let mut high = HighWater::default();
        for (i, table) in RAW_TABLES.iter().enumerate() {
            let sql = format!("SELECT max(outbox_id) FROM {table}");
            high.ids[i] = self
                .run(
                    "read the high-water mark",
                    self.exact_query(&sql).fetch_one::<u64>(),
                )
                .await?;
        }
        Ok(high)
    }

    /// Writes a chunk of outbox batches (in outbox order): one RowBinary INSERT per raw
    /// table, holding only rows whose batch is above the table's mark in `high`. After each
    /// table's INSERT succeeds its mark rises to the chunk's largest `outbox_id`.
    ///
    /// # Guarantees
    /// With `high` from [`Self::high_water`] (or kept from earlier successful calls), a chunk
    /// replayed after a crash or a failed call stores each row once per table, and once in
    /// each rollup (see `repair` for raw rows that landed without their rollup).
    ///
    /// # Errors
    /// When an INSERT fails: the marks of tables written before it stay raised; read
    /// [`Self::high_water`] again before retrying, since the failed one may have landed.
    pub async fn insert<B: InsertBatch>(
        &self,
        batches: &[B],
        high: &mut HighWater,
    ) -> Result<InsertStats, ClickHouseError> {
        let mut stats = InsertStats::default();
        let mut rows = ChunkRows::default();
        let chunk_max = batches
            .iter()
            .map(InsertBatch::outbox_id)
            .max()
            .unwrap_or(0);
        let high_ids = high.ids;
        // A table whose mark reaches into this chunk may hold part of it: an INSERT is one
        // part per day partition (per shard, in a cluster), and a crash can keep some parts
        // and lose others. Its rows from this chunk are read back by key and left out.
        let chunk_min = batches
            .iter()
            .map(InsertBatch::outbox_id)
            .min()
            .unwrap_or(0);
        let held = self
            .held_rows(batches, chunk_min, chunk_max, &high_ids)
            .await?;
        // Of a chunk that may have landed in part, the raw tables hold just the parts that
        // landed: a rollup bucket short by exactly those rows lost them with the server
        // (see `repair`) and gets them now, before the rest goes through the views.
        if held.iter().any(Option::is_some) {
            let (first_unix_ms, last_unix_ms) = time_span(batches)?;
            let nodes = batches.iter().map(|b| b.node_id().to_owned()).collect();
            stats.rollup_buckets_repaired = self
                .repair_rollups(&ChunkSpan {
                    outbox_min: chunk_min,
                    outbox_max: chunk_max,
                    first_unix_ms,
                    last_unix_ms,
                    nodes: &nodes,
                })
                .await?;
        }
        let fresh = |table: usize, outbox_id: u64, node: &str, seq: u64, idx: u32| {
            outbox_id > high_ids[table]
                || held[table]
                    .as_ref()
                    .is_some_and(|held| !held.get(node).is_some_and(|k| k.contains(&(seq, idx))))
        };
        // Host rows go to RowBinary as they are read; the other kinds (a few per batch) are
        // kept, with where they came from, and become rows afterwards.
        let mut others: Vec<(usize, u64, u32, i64, Kind)> = Vec::new();
        for (at_batch, b) in batches.iter().enumerate() {
            let outbox_id = b.outbox_id();
            let (node_id, network) = (b.node_id(), b.network());
            let received_at = datetime(b.received_at_unix_ms());
            let mut new_rows = 0usize;
            b.visit(&mut |seq, idx, at, sample| {
                let (table, count) = match sample {
                    Visit::HostWords(words) => {
                        if fresh(0, outbox_id, node_id, seq, idx) {
                            let c = Common {
                                node_id,
                                network,
                                ts: datetime(at),
                                ts_ms: at,
                                seq,
                                idx,
                                outbox_id,
                                received_at,
                            };
                            put_host_row(&mut rows.host, &c, words);
                            rows.host_rows += 1;
                        }
                        (0, 1)
                    }
                    Visit::Kind(kind) => {
                        let (table, count) = match kind {
                            Kind::Host(_) => (0, 1),
                            Kind::Chain(_) => (1, 1),
                            Kind::Gpu(g) => (2, g.devices.len()),
                            Kind::Keystore(_) => (3, 1),
                            Kind::Unavailable(_) => (4, 1),
                        };
                        if fresh(table, outbox_id, node_id, seq, idx) {
                            others.push((at_batch, seq, idx, at, kind.clone()));
                        }
                        (table, count)
                    }
                };
                if fresh(table, outbox_id, node_id, seq, idx) {
                    new_rows += count;
                } else {
                    stats.skipped_rows += count;
                }
            })
            .map_err(|source| ClickHouseError::Outbox {
                node: node_id.to_owned(),
                outbox_id,
                source,
            })?;
            if new_rows > 0 {
                stats.batches += 1;
            }
        }
        for (at_batch, seq, idx, at, kind) in &others {
            let b = &batches[*at_batch];
            let c = Common {
                node_id: b.node_id(),
                network: b.network(),
                ts: datetime(*at),
                ts_ms: *at,
                seq: *seq,
                idx: *idx,
                outbox_id: b.outbox_id(),
                received_at: datetime(b.received_at_unix_ms()),
            };
            match kind {
                Kind::Host(h) => {
                    let mut words = Vec::with_capacity(HOST_WORD_FIELDS.len() * 8);
                    put_host_words(&mut words, &h.values);
                    put_host_row(&mut rows.host, &c, &words);
                    rows.host_rows += 1;
                }
                Kind::Chain(ch) => rows.chain.push(ChainRow::new(c, ChainValues::of(ch))),
                Kind::Gpu(g) => rows
                    .gpu
                    .extend(g.devices.iter().map(|d| GpuRow::new(c, GpuValues::of(d)))),
                Kind::Keystore(k) => rows
                    .keystore
                    .push(KeystoreRow::new(c, KeystoreValues::of(k))),
                Kind::Unavailable(u) => rows
                    .unavailable
                    .push(UnavailableRow::new(c, UnavailableValues::of(u))),
            }
        }

        stats.rows += self
            .write_row_binary(RAW_TABLES[0], &host_columns(), rows.host, rows.host_rows)
            .await?;
        high.raise(0, chunk_max);
        stats.rows += self
            .write::<ChainRow<'static>>(RAW_TABLES[1], &rows.chain)
            .await?;
        high.raise(1, chunk_max);
        stats.rows += self
            .write::<GpuRow<'static>>(RAW_TABLES[2], &rows.gpu)
            .await?;
        high.raise(2, chunk_max);
        stats.rows += self
            .write::<KeystoreRow<'static>>(RAW_TABLES[3], &rows.keystore)
            .await?;
        high.raise(3, chunk_max);
        stats.rows += self
            .write::<UnavailableRow<'static>>(RAW_TABLES[4], &rows.unavailable)
            .await?;
        high.raise(4, chunk_max);
        Ok(stats)
    }

    /// Per raw table whose mark in `high` is at or above `chunk_min` (it may hold rows of
    /// this chunk): the `(seq, idx)` keys per node it holds from batches
    /// `chunk_min..=chunk_max`, read within the chunk's observed times so that only the
    /// chunk's partitions are scanned. `None` for the other tables.
    ///
    /// A sample's rows share its observed time, so they are one partition (and one shard) and
    /// land together: a key present means all of that sample's rows are.
    async fn held_rows<B: InsertBatch>(
        &self,
        batches: &[B],
        chunk_min: u64,
        chunk_max: u64,
        high: &[u64; RAW_TABLES.len()],
    ) -> Result<[Option<HeldRows>; RAW_TABLES.len()], ClickHouseError> {
        let mut held: [Option<HeldRows>; RAW_TABLES.len()] = Default::default();
        if high.iter().all(|&mark| mark < chunk_min) {
            return Ok(held);
        }
        let (first, last) = time_span(batches)?;
        if first > last {
            return Ok(held);
        }
        for (i, table) in RAW_TABLES.iter().enumerate() {
            if high[i] < chunk_min {
                continue;
            }
            let sql = format!(
                "SELECT node_id, seq, idx FROM {table} WHERE outbox_id >= ? AND outbox_id <= ? \
                 AND ts >= toDateTime(?) AND ts <= toDateTime(?)"
            );
            let keys = self
                .run(
                    "read back the rows of a chunk already stored",
                    self.exact_query(&sql)
                        .bind(chunk_min)
                        .bind(chunk_max)
                        .bind(datetime(first))
                        .bind(datetime(last))
                        .fetch_all::<(String, u64, u32)>(),
                )
                .await?;
            let mut rows = HeldRows::new();
            for (node, seq, idx) in keys {
                rows.entry(node).or_default().insert((seq, idx));
            }
            held[i] = Some(rows);
        }
        Ok(held)
    }

    /// One INSERT of `rows` rows already in RowBinary (`data`, columns `columns`) into
    /// `table`, sent in pieces of [`ROW_BINARY_PIECE`] bytes (none when `rows` is 0).
    /// Returns `rows`.
    async fn write_row_binary(
        &self,
        table: &str,
        columns: &str,
        data: Vec<u8>,
        rows: usize,
    ) -> Result<usize, ClickHouseError> {
        if rows == 0 {
            return Ok(0);
        }
        let data = prost::bytes::Bytes::from(data);
        let call = async {
            let mut insert = self
                .client
                .insert_formatted_with(format!("INSERT INTO {table}({columns}) FORMAT RowBinary"))
                .with_timeouts(Some(self.timeout()), Some(self.timeout()));
            if !self.settings.cluster.is_empty() {
                insert = insert.with_setting("insert_distributed_sync", "1");
            }
            // One block, so that a sample's rows are never split between two parts.
            insert = insert.with_setting("max_insert_block_size", block_size(rows));
            let mut at = 0;
            while at < data.len() {
                let end = data.len().min(at + ROW_BINARY_PIECE);
                insert.send(data.slice(at..end)).await?;
                at = end;
            }
            insert.end().await
        };
        self.run_for("insert rows", self.timeout() * 3, call)
            .await?;
        Ok(rows)
    }

    /// One INSERT of `rows` into `table` (none when `rows` is empty). Returns the row count.
    async fn write<R: RowWrite>(
        &self,
        table: &str,
        rows: &[R::Value<'_>],
    ) -> Result<usize, ClickHouseError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let call = async {
            let mut insert = self
                .client
                .insert::<R>(table)
                .await?
                .with_timeouts(Some(self.timeout()), Some(self.timeout()));
            if !self.settings.cluster.is_empty() {
                insert = insert.with_setting("insert_distributed_sync", "1");
            }
            insert = insert.with_setting("max_insert_block_size", block_size(rows.len()));
            for row in rows {
                insert.write(row).await?;
            }
            insert.end().await
        };
        // The client's own timeouts bound each send and the final answer; this bounds the
        // whole call (a chunk is at most `insert_max_rows` rows).
        self.run_for("insert rows", self.timeout() * 3, call)
            .await?;
        Ok(rows.len())
    }

    /// The highest audit `seq` mirrored so far (0 = none). Read it at start and after any
    /// failed mirror insert.
    ///
    /// # Errors
    /// When the query fails.
    pub async fn audit_high_water(&self) -> Result<u64, ClickHouseError> {
        self.run(
            "read the audit mirror's high-water mark",
            self.exact_query("SELECT max(seq) FROM audit")
                .fetch_one::<u64>(),
        )
        .await
    }

    /// The `(seq, hash)` pairs the mirror holds with `from <= seq <= to` (a seq may appear
    /// twice after a ledger restore: once per timeline).
    ///
    /// # Errors
    /// When the query fails.
    pub async fn audit_hashes(
        &self,
        from: u64,
        to: u64,
    ) -> Result<Vec<(u64, String)>, ClickHouseError> {
        self.run(
            "read the audit mirror's hashes",
            self.exact_query("SELECT seq, hash FROM audit WHERE seq >= ? AND seq <= ?")
                .bind(from)
                .bind(to)
                .fetch_all::<(u64, String)>(),
        )
        .await
    }

    /// Mirrors ledger audit entries (oldest first, all above [`Self::audit_high_water`])
    /// into the `audit` table in one INSERT. Returns the rows written.
    ///
    /// # Errors
    /// When the INSERT fails (it may still have landed: read the high-water mark again).
    pub async fn insert_audit(&self, entries: &[AuditEntry]) -> Result<usize, ClickHouseError> {
        let rows: Vec<AuditRow<'_>> = entries
            .iter()
            .map(|e| AuditRow {
                seq: e.seq,
                at: datetime(e.at_unix_ms),
                kind: e.kind.as_str(),
                node_id: &e.node_id,
                body: e.body.to_string(),
                prev_hash: &e.prev_hash,
                hash: &e.hash,
            })
            .collect();
        self.write::<AuditRow<'static>>("audit", &rows).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn high_water_min_is_the_least_table() {
        let mut high = HighWater::default();
        assert_eq!(high.min(), 0);
        for i in 0..RAW_TABLES.len() {
            high.raise(i, 10);
        }
        high.raise(2, 4);
        high.raise(0, 12);
        assert_eq!(high.get("host_samples"), 12);
        assert_eq!(high.get("gpu_samples"), 10);
        assert_eq!(high.get("nope"), 0);
        assert_eq!(high.min(), 10);
    }
}
