//! Owns the ClickHouse telemetry store: its schema and migrations, exactly-once inserts of
//! outbox batches, retention by partition drop, and the history and recent-row reads.
//!
//! This is the only module that uses the `clickhouse` crate (RowBinary over HTTP, schema
//! validation off so that ClickHouse 18.16 works; TLS is not built in, so the URL is
//! `http://`).
//!
//! # Schema
//! - Raw tables, one row per sample (GPU: per device): `host_samples`, `chain_samples`,
//!   `gpu_samples`, `keystore_samples`, `unavailable_samples`. MergeTree, one partition per
//!   day of `ts` (the observed time), ordered by `(node_id, ts)`. Value columns carry the
//!   metric names of [`super::telemetry`].
//! - Rollups `rollup_1m`, `rollup_1h`: AggregatingMergeTree of avg/min/max/count states per
//!   `(node_id, metric, t)`, one partition per month, filled by one materialized view per
//!   (raw table, rollup) that unpivots the metric columns with `ARRAY JOIN`.
//! - `findings`, `actions`, `audit`: for the reconciler, partitioned by month.
//! - `schema_migrations` records each applied [`Migration`].
//!
//! # Exactly once
//! Every raw row carries the `outbox_id` of the batch it came from, and batches are inserted
//! in outbox order, one INSERT per table per chunk. So `max(outbox_id)` of a table
//! ([`ClickHouseStore::high_water`]) says which batches that table already holds, even when
//! an INSERT timed out after it landed; [`ClickHouseStore::insert`] writes only newer rows.
//!
//! # Retention
//! [`ClickHouseStore::drop_expired`] drops whole partitions whose newest row is older than
//! the table's retention (18.16 has no TTL). On servers >= 19.6 the tables also get a `TTL`
//! clause, so the server expires rows itself between drops.
//!
//! # Cluster mode (`cluster = "NAME"`)
//! Every DDL statement runs `ON CLUSTER NAME`. Each data table `X` becomes `X_local`, a
//! `ReplicatedMergeTree('/clickhouse/tables/{shard}/DB/X_local', '{replica}')` (rollups:
//! `ReplicatedAggregatingMergeTree`), plus `X`, a `Distributed(NAME, DB, X_local,
//! cityHash64(node_id))` table: all rows of one node live on one shard, so its rollups are
//! complete there. Materialized views read `*_samples_local` and write `rollup_*_local` on
//! each shard. Inserts and queries use the Distributed names; inserts set
//! `insert_distributed_sync=1` so that a successful INSERT is on the shards (the high-water
//! read depends on it). `schema_migrations` is one ReplicatedMergeTree replicated to every
//! server. The operator must provide:
//! - the cluster in `<remote_servers>` on every server, with `internal_replication` true;
//! - the macros `{shard}` and `{replica}` in `<macros>` on every server (`{replica}`
//!   unique in the whole cluster, e.g. the host name);
//! - ZooKeeper (or ClickHouse Keeper) in `<zookeeper>`, which replication and `ON CLUSTER`
//!   DDL need.
//!
//! Partition drops read the `system.parts` of the server in the URL and run `ON CLUSTER`;
//! a shard that lacks a partition ignores the drop.

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use ::clickhouse::error::Error as ChError;
use ::clickhouse::{Client, Compression, Row, RowOwned, RowRead, RowWrite};
use guardian_proto::v1::{KeystoreSample, SamplerUnavailable};
use serde::{Deserialize, Serialize};

use super::audit::AuditEntry;
use super::outbox::blob::{HOST_WORD_FIELDS, Visit, put_host_words};
use super::outbox::{OutboxBatch, OutboxBlob};
use super::redact;
use super::telemetry::{HistoryPoint, METRICS, MetricDef, Table, metrics_of};
use crate::batch::Kind;
use crate::batch::values::{ChainValues, GpuValues, HostValues};

/// How the server reaches ClickHouse, and how long each table keeps its rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClickHouseSettings {
    /// HTTP interface, e.g. `http://127.0.0.1:8123`. Default `""`: ClickHouse is off.
    pub url: String,
    /// Database, created if missing. Default `guardian`.
    pub database: String,
    /// User. Default `default`.
    pub user: String,
    /// Password. Default empty. Never logged.
    pub password: String,
    /// `""` (default): one server. Otherwise the cluster name from `<remote_servers>`: see
    /// the module documentation for what cluster mode creates and needs.
    pub cluster: String,
    /// Days of raw rows to keep. Default 30.
    pub raw_retention_days: u32,
    /// Days of 1-minute rollups to keep. Default 180.
    pub rollup_1m_retention_days: u32,
    /// Days of 1-hour rollups to keep. Default 730.
    pub rollup_1h_retention_days: u32,
    /// The sink inserts once this many rows wait. Default 50 000.
    pub insert_max_rows: usize,
    /// The sink inserts once the oldest waiting row is this old, milliseconds. Default 1000.
    pub insert_max_delay_ms: u64,
    /// Committed batches (outbox blobs, `store::outbox::blob`) kept in memory for the sink so it
    /// need not read them back from the outbox; 0 turns that off. Default 256 MiB: about
    /// 17 s of 100 000 host samples/s, enough to ride out a ClickHouse pause without the
    /// dearer read-back.
    pub handoff_max_bytes: u64,
    /// Limit on one request, milliseconds. Default 10 000.
    pub request_timeout_ms: u64,
    /// `auto` (default): LZ4 over the network, none to a loopback address (where it only
    /// costs CPU); `lz4`; or `none`.
    pub compression: String,
}

impl Default for ClickHouseSettings {
    fn default() -> Self {
        Self {
            url: String::new(),
            database: "guardian".into(),
            user: "default".into(),
            password: String::new(),
            cluster: String::new(),
            raw_retention_days: 30,
            rollup_1m_retention_days: 180,
            rollup_1h_retention_days: 730,
            insert_max_rows: 50_000,
            insert_max_delay_ms: 1_000,
            handoff_max_bytes: 256 << 20,
            request_timeout_ms: 10_000,
            compression: "auto".into(),
        }
    }
}

impl ClickHouseSettings {
    /// Whether ClickHouse is configured (a non-empty `url`).
    pub fn enabled(&self) -> bool {
        !self.url.is_empty()
    }

    /// Checks the settings when ClickHouse is enabled (nothing to check when it is off).
    ///
    /// # Errors
    /// A message naming the field and the fix.
    pub fn validate(&self) -> Result<(), String> {
        if !self.enabled() {
            return Ok(());
        }
        if self.url.starts_with("https://") {
            return Err(format!(
                "clickhouse.url {:?}: https is not built into this server; use http:// (on a \
                 private network, or through a local TLS-terminating proxy)",
                redact(&self.url)
            ));
        }
        if !self.url.starts_with("http://") || self.url.len() <= "http://".len() {
            return Err(format!(
                "clickhouse.url {:?} must start with http:// and name a host, e.g. \
                 http://127.0.0.1:8123",
                redact(&self.url)
            ));
        }
        if !is_identifier(&self.database) {
            return Err(format!(
                "clickhouse.database {:?} must be a plain name (letters, digits, _; not \
                 starting with a digit), e.g. guardian",
                self.database
            ));
        }
        if self.user.is_empty() {
            return Err(
                "clickhouse.user must not be empty; use default for the built-in user".into(),
            );
        }
        if !self.cluster.is_empty() && !is_identifier(&self.cluster) {
            return Err(format!(
                "clickhouse.cluster {:?} must be empty (one server) or a cluster name from \
                 <remote_servers> (letters, digits, _)",
                self.cluster
            ));
        }
        for (field, days) in [
            ("raw_retention_days", self.raw_retention_days),
            ("rollup_1m_retention_days", self.rollup_1m_retention_days),
            ("rollup_1h_retention_days", self.rollup_1h_retention_days),
        ] {
            if days == 0 {
                return Err(format!(
                    "clickhouse.{field} must be at least 1 (days to keep); use a large number to keep data longer"
                ));
            }
        }
        if self.insert_max_rows == 0 {
            return Err("clickhouse.insert_max_rows must be at least 1 (default 50000)".into());
        }
        if self.insert_max_delay_ms == 0 {
            return Err("clickhouse.insert_max_delay_ms must be at least 1 (default 1000)".into());
        }
        if self.request_timeout_ms < 100 {
            return Err(format!(
                "clickhouse.request_timeout_ms {} is too short; use at least 100 (default 10000)",
                self.request_timeout_ms
            ));
        }
        if !matches!(self.compression.as_str(), "auto" | "lz4" | "none") {
            return Err(format!(
                "clickhouse.compression {:?} must be auto (LZ4 unless the server is on a \
                 loopback address), lz4 or none",
                self.compression
            ));
        }
        Ok(())
    }

    /// Whether requests are LZ4-compressed (see `compression`).
    pub fn lz4(&self) -> bool {
        match self.compression.as_str() {
            "none" => false,
            "auto" => !is_loopback_url(&self.url),
            _ => true,
        }
    }
}

/// Whether an `http://` URL names a loopback host (`localhost`, 127.0.0.0/8, `::1`).
fn is_loopback_url(url: &str) -> bool {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let authority = rest.split('/').next().unwrap_or_default();
    let host_port = authority.rsplit('@').next().unwrap_or_default();
    let host = if let Some(bracketed) = host_port.strip_prefix('[') {
        bracketed.split(']').next().unwrap_or_default()
    } else {
        host_port.split(':').next().unwrap_or_default()
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `[A-Za-z_][A-Za-z0-9_]*`: safe to write into SQL unquoted.
fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Why a ClickHouse call failed. Messages name the server (password removed), never data.
#[derive(Debug, thiserror::Error)]
pub enum ClickHouseError {
    /// The settings are invalid (see [`ClickHouseSettings::validate`]).
    #[error("invalid ClickHouse settings: {0}")]
    Settings(String),
    /// No connection or a broken one.
    #[error("ClickHouse at {url} is unreachable while trying to {what}: {source}")]
    Unreachable {
        /// Server URL, password removed.
        url: String,
        /// The operation.
        what: &'static str,
        /// The client's error.
        source: ChError,
    },
    /// No answer within `request_timeout_ms`.
    #[error("ClickHouse at {url} did not answer within {timeout_ms} ms while trying to {what}")]
    Timeout {
        /// Server URL, password removed.
        url: String,
        /// The operation.
        what: &'static str,
        /// The limit.
        timeout_ms: u64,
    },
    /// The server refused the statement (its message is included).
    #[error("ClickHouse at {url} refused to {what}: {source}")]
    Server {
        /// Server URL, password removed.
        url: String,
        /// The operation.
        what: &'static str,
        /// The client's error, with the server's message.
        source: ChError,
    },
    /// An answer did not match the expected row shape (schema drift).
    #[error("ClickHouse at {url} answered in an unexpected shape while trying to {what}: {source}")]
    Decode {
        /// Server URL, password removed.
        url: String,
        /// The operation.
        what: &'static str,
        /// The client's error.
        source: ChError,
    },
    /// A schema migration failed; later ones were not tried.
    #[error("ClickHouse at {url}: migration {version} ({name}) failed: {source}")]
    Migration {
        /// Server URL, password removed.
        url: String,
        /// Migration version.
        version: u32,
        /// Migration name.
        name: &'static str,
        /// What failed.
        source: Box<ClickHouseError>,
    },
    /// A request this store cannot serve (unknown metric or source).
    #[error("invalid ClickHouse request: {0}")]
    Request(String),
    /// A batch of the chunk to insert does not decode (nothing of the chunk was sent).
    #[error("outbox batch {outbox_id} of node {node} does not decode: {source}")]
    Outbox {
        /// The node.
        node: String,
        /// The batch's outbox id.
        outbox_id: u64,
        /// The decode error.
        source: crate::batch::DecodeError,
    },
}

impl ClickHouseError {
    /// A bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Settings(_) => "settings",
            Self::Unreachable { .. } => "unreachable",
            Self::Timeout { .. } => "timeout",
            Self::Server { .. } => "server",
            Self::Decode { .. } => "decode",
            Self::Migration { .. } => "migration",
            Self::Request(_) => "request",
            Self::Outbox { .. } => "corrupt",
        }
    }
}

/// The raw tables, in insert order.
const RAW_TABLES: [&str; 5] = [
    "host_samples",
    "chain_samples",
    "gpu_samples",
    "keystore_samples",
    "unavailable_samples",
];

/// Per raw table, the largest `outbox_id` known to be stored in it: every batch with an id
/// at or below it has all its rows for that table stored.
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

    /// The smallest mark: every batch at or below it is stored in every table.
    pub fn min(&self) -> u64 {
        self.ids.iter().copied().min().unwrap_or(0)
    }

    fn raise(&mut self, table: usize, id: u64) {
        self.ids[table] = self.ids[table].max(id);
    }
}

/// What one [`ClickHouseStore::insert`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct InsertStats {
    /// Batches of the chunk that had at least one row not stored before.
    pub batches: usize,
    /// Rows written, all tables together.
    pub rows: usize,
    /// Rows left out because their table already held their batch (a replay).
    pub skipped_rows: usize,
}

/// One schema change: statements run in order, then recorded in `schema_migrations`.
#[derive(Debug, Clone, PartialEq)]
pub struct Migration {
    /// Applied in increasing order, never reused.
    pub version: u32,
    /// What it does.
    pub name: &'static str,
    /// The DDL (each statement idempotent: `IF NOT EXISTS`).
    pub statements: Vec<String>,
}

// ------------------------------------------------------------------ rows

/// Columns every raw table starts with.
const COMMON_COLUMNS: &[(&str, &str)] = &[
    ("node_id", "String"),
    ("network", "String"),
    ("ts", "DateTime"),
    ("ts_ms", "Int64"),
    ("seq", "UInt64"),
    ("idx", "UInt32"),
    ("outbox_id", "UInt64"),
    ("received_at", "DateTime"),
];

/// The common column values of one row.
#[derive(Clone, Copy)]
struct Common<'a> {
    node_id: &'a str,
    network: &'a str,
    ts: u32,
    ts_ms: i64,
    seq: u64,
    idx: u32,
    outbox_id: u64,
    received_at: u32,
}

/// Unix milliseconds to a `DateTime` (seconds, UInt32), clamped to its range.
fn datetime(unix_ms: i64) -> u32 {
    u32::try_from(unix_ms.div_euclid(1000).max(0)).unwrap_or(u32::MAX)
}

/// Bytes of RowBinary sent per request body piece (what the client's own row inserts send).
const ROW_BINARY_PIECE: usize = 256 * 1024;

/// `host_samples`' insert columns, quoted: the common ones, then the host values in the
/// order of the outbox's host words (the same order as `HostRow`, which a test checks).
fn host_columns() -> String {
    COMMON_COLUMNS
        .iter()
        .map(|(name, _)| *name)
        .chain(HOST_WORD_FIELDS)
        .map(|name| format!("`{name}`"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Appends one `host_samples` row in RowBinary: the common columns, then `words` (the 17
/// host values as little-endian 64-bit words, which is their RowBinary: Float64 and UInt64).
fn put_host_row(out: &mut Vec<u8>, c: &Common<'_>, words: &[u8]) {
    put_string(out, c.node_id);
    put_string(out, c.network);
    out.extend_from_slice(&c.ts.to_le_bytes());
    out.extend_from_slice(&c.ts_ms.to_le_bytes());
    out.extend_from_slice(&c.seq.to_le_bytes());
    out.extend_from_slice(&c.idx.to_le_bytes());
    out.extend_from_slice(&c.outbox_id.to_le_bytes());
    out.extend_from_slice(&c.received_at.to_le_bytes());
    out.extend_from_slice(words);
}

/// A RowBinary `String`: LEB128 length, then the bytes.
fn put_string(out: &mut Vec<u8>, text: &str) {
    let mut len = text.len() as u64;
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
    out.extend_from_slice(text.as_bytes());
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
        super::outbox::blob::visit_batch(&self.batch, each);
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
        super::outbox::blob::visit(&self.blob, each)
    }
}

/// Defines a raw table's insert row (common columns, then `values`' fields), its value
/// columns for the DDL, and the conversion from the values struct: one list, so the DDL,
/// the RowBinary layout and the flattener cannot drift apart.
macro_rules! raw_table {
    ($(#[$meta:meta])* $row:ident, $columns:ident, $values:ident { $($field:ident: $ty:ty => $ch:literal),* $(,)? }) => {
        #[derive(Debug, Row, Serialize)]
        $(#[$meta])*
        struct $row<'a> {
            node_id: &'a str,
            network: &'a str,
            ts: u32,
            ts_ms: i64,
            seq: u64,
            idx: u32,
            outbox_id: u64,
            received_at: u32,
            $($field: $ty,)*
        }

        const $columns: &[(&str, &str)] = &[$((stringify!($field), $ch),)*];

        $(#[$meta])*
        impl<'a> $row<'a> {
            fn new(c: Common<'a>, v: $values) -> Self {
                Self {
                    node_id: c.node_id,
                    network: c.network,
                    ts: c.ts,
                    ts_ms: c.ts_ms,
                    seq: c.seq,
                    idx: c.idx,
                    outbox_id: c.outbox_id,
                    received_at: c.received_at,
                    $($field: v.$field,)*
                }
            }
        }
    };
}

/// Defines the row that `recent_*` reads back into a values struct.
macro_rules! recent_row {
    ($read:ident, $values:ident { $($field:ident: $ty:ty),* $(,)? }) => {
        #[derive(Debug, Row, Deserialize)]
        struct $read {
            node_id: String,
            ts_ms: i64,
            $($field: $ty,)*
        }

        impl $read {
            fn into_parts(self) -> (String, i64, $values) {
                (self.node_id, self.ts_ms, $values { $($field: self.$field,)* })
            }
        }
    };
}

raw_table!(
    // Host rows are written as RowBinary straight from the outbox's host words
    // (`put_host_row`); this struct keeps the DDL's column list and types, which a test
    // holds that layout to.
    #[allow(dead_code)]
    HostRow, HOST_COLUMNS, HostValues {
    cpu_busy_percent: f64 => "Float64",
    cpu_iowait_percent: f64 => "Float64",
    mem_total_bytes: u64 => "UInt64",
    mem_available_bytes: u64 => "UInt64",
    load_avg_1m: f64 => "Float64",
    cpu_psi_some_avg10_percent: f64 => "Float64",
    memory_psi_full_avg10_percent: f64 => "Float64",
    io_psi_full_avg10_percent: f64 => "Float64",
    chain_data_used_percent: f64 => "Float64",
    chain_data_available_bytes: u64 => "UInt64",
    disk_read_latency_ms_max: f64 => "Float64",
    disk_write_latency_ms_max: f64 => "Float64",
    disk_utilisation_percent_max: f64 => "Float64",
    net_rx_bytes_per_second: f64 => "Float64",
    net_tx_bytes_per_second: f64 => "Float64",
    net_errors_total: u64 => "UInt64",
    oom_kills_total: u64 => "UInt64",
});

recent_row!(
    HostRecent,
    HostValues {
        cpu_busy_percent: f64,
        cpu_iowait_percent: f64,
        mem_total_bytes: u64,
        mem_available_bytes: u64,
        load_avg_1m: f64,
        cpu_psi_some_avg10_percent: f64,
        memory_psi_full_avg10_percent: f64,
        io_psi_full_avg10_percent: f64,
        chain_data_used_percent: f64,
        chain_data_available_bytes: u64,
        disk_read_latency_ms_max: f64,
        disk_write_latency_ms_max: f64,
        disk_utilisation_percent_max: f64,
        net_rx_bytes_per_second: f64,
        net_tx_bytes_per_second: f64,
        net_errors_total: u64,
        oom_kills_total: u64,
    }
);

raw_table!(ChainRow, CHAIN_COLUMNS, ChainValues {
    responsive: u8 => "UInt8",
    best_block: u64 => "UInt64",
    finalized_block: u64 => "UInt64",
    sync_highest_block: u64 => "UInt64",
    reference_best_block: u64 => "UInt64",
    block_lag: u64 => "UInt64",
    finality_lag_blocks: u64 => "UInt64",
    peers: u32 => "UInt32",
    is_syncing: u8 => "UInt8",
    head_age_ms: u64 => "UInt64",
    rpc_latency_ms: f64 => "Float64",
    spec_version: u32 => "UInt32",
    blocks_since_last_update: u64 => "UInt64",
    validator_trust_ratio: f64 => "Float64",
    emission_rao: u64 => "UInt64",
});

recent_row!(
    ChainRecent,
    ChainValues {
        responsive: u8,
        best_block: u64,
        finalized_block: u64,
        sync_highest_block: u64,
        reference_best_block: u64,
        block_lag: u64,
        finality_lag_blocks: u64,
        peers: u32,
        is_syncing: u8,
        head_age_ms: u64,
        rpc_latency_ms: f64,
        spec_version: u32,
        blocks_since_last_update: u64,
        validator_trust_ratio: f64,
        emission_rao: u64,
    }
);

raw_table!(GpuRow, GPU_COLUMNS, GpuValues {
    gpu_index: u32 => "UInt32",
    gpu_uuid: String => "String",
    utilisation_gpu_percent: f64 => "Float64",
    memory_used_bytes: u64 => "UInt64",
    temperature_celsius: f64 => "Float64",
    power_draw_watts: f64 => "Float64",
    sm_clock_mhz: u32 => "UInt32",
    throttle_reasons_bitmask: u64 => "UInt64",
    ecc_uncorrected_total: u64 => "UInt64",
    pcie_replay_total: u64 => "UInt64",
    xid_events: u32 => "UInt32",
});

/// A keystore sample's row values: metadata and fingerprints, never key bytes.
struct KeystoreValues {
    present: u8,
    on_tmpfs: u8,
    mount_nodev: u8,
    mount_nosuid: u8,
    mount_noexec: u8,
    mount_read_only: u8,
    dir_mode: u32,
    dir_uid: u32,
    file_count: u32,
    total_bytes: u64,
    swap_active: u8,
    fingerprints: Vec<String>,
}

impl KeystoreValues {
    fn of(k: &KeystoreSample) -> Self {
        Self {
            present: u8::from(k.present),
            on_tmpfs: u8::from(k.on_tmpfs),
            mount_nodev: u8::from(k.mount_nodev),
            mount_nosuid: u8::from(k.mount_nosuid),
            mount_noexec: u8::from(k.mount_noexec),
            mount_read_only: u8::from(k.mount_read_only),
            dir_mode: k.dir_mode,
            dir_uid: k.dir_uid,
            file_count: k.file_count,
            total_bytes: k.total_bytes,
            swap_active: u8::from(k.swap_active),
            fingerprints: k
                .files
                .iter()
                .map(|f| format!("{}:{}", f.name, f.sha256_fingerprint))
                .collect(),
        }
    }
}

raw_table!(KeystoreRow, KEYSTORE_COLUMNS, KeystoreValues {
    present: u8 => "UInt8",
    on_tmpfs: u8 => "UInt8",
    mount_nodev: u8 => "UInt8",
    mount_nosuid: u8 => "UInt8",
    mount_noexec: u8 => "UInt8",
    mount_read_only: u8 => "UInt8",
    dir_mode: u32 => "UInt32",
    dir_uid: u32 => "UInt32",
    file_count: u32 => "UInt32",
    total_bytes: u64 => "UInt64",
    swap_active: u8 => "UInt8",
    fingerprints: Vec<String> => "Array(String)",
});

/// A sampler-unavailable sample's row values.
struct UnavailableValues<'a> {
    sampler: &'a str,
    reason: &'a str,
}

impl<'a> UnavailableValues<'a> {
    fn of(u: &'a SamplerUnavailable) -> Self {
        Self {
            sampler: &u.sampler,
            reason: &u.reason,
        }
    }
}

/// One mirrored audit entry (columns of the `audit` table).
#[derive(Debug, Row, Serialize)]
struct AuditRow<'a> {
    seq: u64,
    at: u32,
    kind: &'a str,
    node_id: &'a str,
    body: String,
    prev_hash: &'a str,
    hash: &'a str,
}

#[derive(Debug, Row, Serialize)]
struct UnavailableRow<'a> {
    node_id: &'a str,
    network: &'a str,
    ts: u32,
    ts_ms: i64,
    seq: u64,
    idx: u32,
    outbox_id: u64,
    received_at: u32,
    sampler: &'a str,
    reason: &'a str,
}

const UNAVAILABLE_COLUMNS: &[(&str, &str)] = &[("sampler", "String"), ("reason", "String")];

impl<'a> UnavailableRow<'a> {
    fn new(c: Common<'a>, v: UnavailableValues<'a>) -> Self {
        Self {
            node_id: c.node_id,
            network: c.network,
            ts: c.ts,
            ts_ms: c.ts_ms,
            seq: c.seq,
            idx: c.idx,
            outbox_id: c.outbox_id,
            received_at: c.received_at,
            sampler: v.sampler,
            reason: v.reason,
        }
    }
}

/// The value columns of a raw table, by name (after the [`COMMON_COLUMNS`]).
fn value_columns(table: &str) -> &'static [(&'static str, &'static str)] {
    match table {
        "host_samples" => HOST_COLUMNS,
        "chain_samples" => CHAIN_COLUMNS,
        "gpu_samples" => GPU_COLUMNS,
        "keystore_samples" => KEYSTORE_COLUMNS,
        _ => UNAVAILABLE_COLUMNS,
    }
}

/// One chunk's rows, split by table.
#[derive(Default)]
struct ChunkRows<'a> {
    /// Host rows, already in RowBinary ([`put_host_row`]).
    host: Vec<u8>,
    host_rows: usize,
    chain: Vec<ChainRow<'a>>,
    gpu: Vec<GpuRow<'a>>,
    keystore: Vec<KeystoreRow<'a>>,
    unavailable: Vec<UnavailableRow<'a>>,
}

// ------------------------------------------------------------------ DDL

/// Writes DDL for one server or a cluster.
struct Ddl<'a> {
    db: &'a str,
    cluster: &'a str,
}

/// How one data table is laid out.
struct TableSpec<'a> {
    name: &'a str,
    columns: Vec<(&'a str, &'a str)>,
    aggregating: bool,
    partition_by: &'a str,
    order_by: &'a str,
    ttl: Option<String>,
}

impl Ddl<'_> {
    fn on_cluster(&self) -> String {
        if self.cluster.is_empty() {
            String::new()
        } else {
            format!(" ON CLUSTER {}", self.cluster)
        }
    }

    /// The table that holds the rows on a server: `X` alone, `X_local` in a cluster.
    fn local(&self, name: &str) -> String {
        if self.cluster.is_empty() {
            name.to_owned()
        } else {
            format!("{name}_local")
        }
    }

    /// `CREATE TABLE` for the storage table, plus the Distributed table in a cluster.
    fn table(&self, spec: &TableSpec<'_>) -> Vec<String> {
        let local = self.local(spec.name);
        let kind = if spec.aggregating {
            "AggregatingMergeTree"
        } else {
            "MergeTree"
        };
        let engine = if self.cluster.is_empty() {
            kind.to_owned()
        } else {
            format!(
                "Replicated{kind}('/clickhouse/tables/{{shard}}/{db}/{local}', '{{replica}}')",
                db = self.db
            )
        };
        let columns = spec
            .columns
            .iter()
            .map(|(name, ty)| format!("{name} {ty}"))
            .collect::<Vec<_>>()
            .join(", ");
        let ttl = spec
            .ttl
            .as_ref()
            .map(|t| format!(" TTL {t}"))
            .unwrap_or_default();
        let mut statements = vec![format!(
            "CREATE TABLE IF NOT EXISTS {db}.{local}{on} ({columns}) ENGINE = {engine} \
             PARTITION BY {partition} ORDER BY ({order}){ttl}",
            db = self.db,
            on = self.on_cluster(),
            partition = spec.partition_by,
            order = spec.order_by,
        )];
        if !self.cluster.is_empty() {
            statements.push(format!(
                "CREATE TABLE IF NOT EXISTS {db}.{name}{on} AS {db}.{local} \
                 ENGINE = Distributed({cluster}, {db}, {local}, cityHash64(node_id))",
                db = self.db,
                name = spec.name,
                on = self.on_cluster(),
                cluster = self.cluster,
            ));
        }
        statements
    }
}

/// `CREATE DATABASE` and `schema_migrations`: what must exist before migrations are read.
fn bootstrap(settings: &ClickHouseSettings) -> Vec<String> {
    let ddl = Ddl {
        db: &settings.database,
        cluster: &settings.cluster,
    };
    let engine = if settings.cluster.is_empty() {
        "MergeTree".to_owned()
    } else {
        // One copy on every server of the cluster (not per shard).
        format!(
            "ReplicatedMergeTree('/clickhouse/tables/all/{}/schema_migrations', '{{replica}}')",
            settings.database
        )
    };
    vec![
        format!(
            "CREATE DATABASE IF NOT EXISTS {}{}",
            settings.database,
            ddl.on_cluster()
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {}.schema_migrations{} (version UInt32, name String, \
             applied_at DateTime) ENGINE = {engine} ORDER BY version",
            settings.database,
            ddl.on_cluster()
        ),
    ]
}

/// The rollup tables and how each buckets time.
const ROLLUPS: [(&str, &str); 2] = [
    ("rollup_1m", "toStartOfMinute"),
    ("rollup_1h", "toStartOfHour"),
];

/// The schema, as versioned migrations. `supports_ttl` adds `TTL` clauses (servers >= 19.6).
pub fn migrations(settings: &ClickHouseSettings, supports_ttl: bool) -> Vec<Migration> {
    let ddl = Ddl {
        db: &settings.database,
        cluster: &settings.cluster,
    };
    let ttl =
        |column: &str, days: u32| supports_ttl.then(|| format!("{column} + INTERVAL {days} DAY"));

    let mut raw = Vec::new();
    for table in RAW_TABLES {
        let columns = COMMON_COLUMNS
            .iter()
            .chain(value_columns(table))
            .copied()
            .collect();
        raw.extend(ddl.table(&TableSpec {
            name: table,
            columns,
            aggregating: false,
            partition_by: "toYYYYMMDD(ts)",
            order_by: "node_id, ts",
            ttl: ttl("ts", settings.raw_retention_days),
        }));
    }

    let mut rollups = Vec::new();
    for (rollup, bucket) in ROLLUPS {
        let days = if rollup == "rollup_1m" {
            settings.rollup_1m_retention_days
        } else {
            settings.rollup_1h_retention_days
        };
        rollups.extend(ddl.table(&TableSpec {
            name: rollup,
            columns: vec![
                ("node_id", "String"),
                ("metric", "String"),
                ("t", "DateTime"),
                ("avg_state", "AggregateFunction(avg, Float64)"),
                ("min_state", "AggregateFunction(min, Float64)"),
                ("max_state", "AggregateFunction(max, Float64)"),
                ("count_state", "AggregateFunction(count)"),
            ],
            aggregating: true,
            partition_by: "toYYYYMM(t)",
            order_by: "node_id, metric, t",
            ttl: ttl("t", days),
        }));
        for table in [Table::Host, Table::Chain, Table::Gpu] {
            let names = metrics_of(table)
                .map(|m| format!("'{}'", m.name))
                .collect::<Vec<_>>()
                .join(", ");
            let values = metrics_of(table)
                .map(|m| format!("toFloat64({})", m.name))
                .collect::<Vec<_>>()
                .join(", ");
            rollups.push(format!(
                "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.mv_{raw}_{rollup}{on} TO {db}.{target} AS \
                 SELECT node_id, metric, {bucket}(ts) AS t, avgState(value) AS avg_state, \
                 minState(value) AS min_state, maxState(value) AS max_state, \
                 countState() AS count_state \
                 FROM {db}.{source} ARRAY JOIN [{names}] AS metric, [{values}] AS value \
                 GROUP BY node_id, metric, t",
                db = settings.database,
                raw = table.name(),
                on = ddl.on_cluster(),
                target = ddl.local(rollup),
                source = ddl.local(table.name()),
            ));
        }
    }

    let mut reconciler = Vec::new();
    for (name, columns, order_by) in [
        (
            "findings",
            vec![
                ("at", "DateTime"),
                ("node_id", "String"),
                ("network", "String"),
                ("detector", "String"),
                ("severity", "String"),
                ("score", "Float64"),
                ("evidence", "String"),
            ],
            "node_id, at",
        ),
        (
            "actions",
            vec![
                ("at", "DateTime"),
                ("node_id", "String"),
                ("command_id", "String"),
                ("action", "String"),
                ("parameters", "String"),
                ("phase", "String"),
                ("dry_run", "UInt8"),
                ("outcome", "String"),
                ("detail", "String"),
            ],
            "node_id, at",
        ),
        (
            "audit",
            vec![
                ("seq", "UInt64"),
                ("at", "DateTime"),
                ("kind", "String"),
                ("node_id", "String"),
                ("body", "String"),
                ("prev_hash", "String"),
                ("hash", "String"),
            ],
            "seq",
        ),
    ] {
        reconciler.extend(ddl.table(&TableSpec {
            name,
            columns,
            aggregating: false,
            partition_by: "toYYYYMM(at)",
            order_by,
            ttl: None,
        }));
    }

    vec![
        Migration {
            version: 1,
            name: "raw sample tables",
            statements: raw,
        },
        Migration {
            version: 2,
            name: "1-minute and 1-hour rollups with their materialized views",
            statements: rollups,
        },
        Migration {
            version: 3,
            name: "findings, actions and audit tables",
            statements: reconciler,
        },
    ]
}

/// `major.minor` of a `version()` string such as `18.16.1`.
fn supports_ttl(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= (19, 6)
}

// ------------------------------------------------------------------ store

/// One bucket as the history queries return it.
#[derive(Debug, Row, Deserialize)]
struct BucketRow {
    start_unix_ms: i64,
    avg: f64,
    min: f64,
    max: f64,
    count: u64,
}

/// A connection to the ClickHouse store (cheap to clone; clones share the HTTP pool).
#[derive(Clone)]
pub struct ClickHouseStore {
    client: Client,
    settings: ClickHouseSettings,
    url: String,
    version: String,
    ttl: bool,
}

impl std::fmt::Debug for ClickHouseStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClickHouseStore")
            .field("url", &self.url)
            .field("database", &self.settings.database)
            .field("cluster", &self.settings.cluster)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl ClickHouseStore {
    /// Connects, creates the database if missing and applies pending migrations in order,
    /// each recorded in `schema_migrations`.
    ///
    /// # Errors
    /// [`ClickHouseError::Settings`] for invalid settings; [`ClickHouseError::Migration`]
    /// when a migration fails (earlier ones stay applied, later ones are not tried); any
    /// other variant when the server cannot be reached or refuses.
    pub async fn open(settings: &ClickHouseSettings) -> Result<Self, ClickHouseError> {
        settings.validate().map_err(ClickHouseError::Settings)?;
        if !settings.enabled() {
            return Err(ClickHouseError::Settings(
                "clickhouse.url is empty: ClickHouse is off".into(),
            ));
        }
        let base = Client::default()
            .with_url(settings.url.as_str())
            .with_user(settings.user.as_str())
            .with_password(settings.password.as_str())
            .with_compression(if settings.lz4() {
                Compression::Lz4
            } else {
                Compression::None
            })
            .with_validation(false);
        let mut store = Self {
            client: base.clone(),
            settings: settings.clone(),
            url: redact(&settings.url),
            version: String::new(),
            ttl: false,
        };
        store.version = store
            .run(
                "read the server version",
                store.client.query("SELECT version()").fetch_one::<String>(),
            )
            .await?;
        store.ttl = supports_ttl(&store.version);
        for statement in bootstrap(settings) {
            store.ddl("create the database", &statement).await?;
        }
        store.client = base.with_database(settings.database.as_str());

        let applied: BTreeSet<u32> = store
            .run(
                "read schema_migrations",
                store
                    .client
                    .query("SELECT DISTINCT version FROM schema_migrations")
                    .fetch_all::<u32>(),
            )
            .await?
            .into_iter()
            .collect();
        for migration in migrations(settings, store.ttl) {
            if applied.contains(&migration.version) {
                continue;
            }
            store
                .apply(&migration)
                .await
                .map_err(|source| ClickHouseError::Migration {
                    url: store.url.clone(),
                    version: migration.version,
                    name: migration.name,
                    source: Box::new(source),
                })?;
            tracing::info!(
                version = migration.version,
                name = migration.name,
                server = %store.url,
                "ClickHouseMigrationApplied"
            );
        }
        Ok(store)
    }

    async fn apply(&self, migration: &Migration) -> Result<(), ClickHouseError> {
        for statement in &migration.statements {
            self.ddl("apply a migration", statement).await?;
        }
        let record = self
            .client
            .query("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, now())")
            .bind(migration.version)
            .bind(migration.name);
        self.run("record a migration", record.execute()).await
    }

    /// Runs one DDL statement. `ON CLUSTER` statements wait for every server, up to the
    /// server's `distributed_ddl_task_timeout` (180 s by default).
    async fn ddl(&self, what: &'static str, statement: &str) -> Result<(), ClickHouseError> {
        let limit = if self.settings.cluster.is_empty() {
            self.timeout()
        } else {
            self.timeout().max(Duration::from_secs(190))
        };
        self.run_for(what, limit, self.client.query_raw(statement).execute())
            .await
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.settings.request_timeout_ms)
    }

    async fn run<T>(
        &self,
        what: &'static str,
        call: impl Future<Output = Result<T, ChError>>,
    ) -> Result<T, ClickHouseError> {
        self.run_for(what, self.timeout(), call).await
    }

    async fn run_for<T>(
        &self,
        what: &'static str,
        limit: Duration,
        call: impl Future<Output = Result<T, ChError>>,
    ) -> Result<T, ClickHouseError> {
        match tokio::time::timeout(limit, call).await {
            Ok(result) => result.map_err(|e| self.error(what, e)),
            Err(_) => Err(ClickHouseError::Timeout {
                url: self.url.clone(),
                what,
                timeout_ms: u64::try_from(limit.as_millis()).unwrap_or(u64::MAX),
            }),
        }
    }

    fn error(&self, what: &'static str, source: ChError) -> ClickHouseError {
        let url = self.url.clone();
        match source {
            ChError::TimedOut => ClickHouseError::Timeout {
                url,
                what,
                timeout_ms: self.settings.request_timeout_ms,
            },
            ChError::Network(_) | ChError::Other(_) => {
                ClickHouseError::Unreachable { url, what, source }
            }
            ChError::BadResponse(_) => ClickHouseError::Server { url, what, source },
            _ => ClickHouseError::Decode { url, what, source },
        }
    }

    /// The server's `version()`, e.g. `18.16.1`.
    pub fn server_version(&self) -> &str {
        &self.version
    }

    /// Whether the tables were created with `TTL` (server >= 19.6).
    pub fn supports_ttl(&self) -> bool {
        self.ttl
    }

    /// One round trip.
    ///
    /// # Errors
    /// When the server does not answer.
    pub async fn ping(&self) -> Result<(), ClickHouseError> {
        self.run("ping", self.client.query("SELECT 1").fetch_one::<u8>())
            .await
            .map(|_| ())
    }

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
                    self.client.query(&sql).fetch_one::<u64>(),
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
    /// replayed after a crash or a failed call stores each row once per table.
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
        let fresh = |table: usize, outbox_id: u64| outbox_id > high_ids[table];
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
                        if fresh(0, outbox_id) {
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
                        if fresh(table, outbox_id) {
                            others.push((at_batch, seq, idx, at, kind.clone()));
                        }
                        (table, count)
                    }
                };
                if fresh(table, outbox_id) {
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
            self.client
                .query("SELECT max(seq) FROM audit")
                .fetch_one::<u64>(),
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

    /// Drops every partition whose newest row is older than its table's retention at
    /// `now_unix_ms`. Returns the `table:partition_id` pairs dropped.
    ///
    /// # Errors
    /// When a query or a drop fails (partitions dropped before it stay dropped).
    pub async fn drop_expired(&self, now_unix_ms: i64) -> Result<Vec<String>, ClickHouseError> {
        let ddl = Ddl {
            db: &self.settings.database,
            cluster: &self.settings.cluster,
        };
        let mut plan: Vec<(&str, u32)> = RAW_TABLES
            .iter()
            .map(|t| (*t, self.settings.raw_retention_days))
            .collect();
        plan.push(("rollup_1m", self.settings.rollup_1m_retention_days));
        plan.push(("rollup_1h", self.settings.rollup_1h_retention_days));
        let now_s = now_unix_ms.div_euclid(1000);
        let mut dropped = Vec::new();
        for (table, days) in plan {
            let cutoff = datetime((now_s - i64::from(days) * 86_400) * 1000);
            let local = ddl.local(table);
            let partitions = self
                .run(
                    "list expired partitions",
                    self.client
                        .query(
                            "SELECT partition_id FROM system.parts \
                             WHERE database = ? AND table = ? AND active \
                             GROUP BY partition_id HAVING max(max_time) < toDateTime(?) \
                             ORDER BY partition_id",
                        )
                        .bind(self.settings.database.as_str())
                        .bind(local.as_str())
                        .bind(cutoff)
                        .fetch_all::<String>(),
                )
                .await?;
            for id in partitions {
                let sql = format!(
                    "ALTER TABLE {db}.{local}{on} DROP PARTITION ID '{id}'",
                    db = self.settings.database,
                    on = ddl.on_cluster(),
                    id = id.replace(['\'', '\\'], ""),
                );
                self.ddl("drop an expired partition", &sql).await?;
                tracing::info!(table, partition = %id, "ClickHousePartitionDropped");
                dropped.push(format!("{table}:{id}"));
            }
        }
        Ok(dropped)
    }

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

    /// `(rows, distinct (seq, idx), distinct seq)` in `host_samples` for a node: what the
    /// exactly-once checks compare with what was sent.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_rows_written_directly_follow_the_host_row_struct_and_its_ddl() {
        // Same columns, same order as the struct the DDL is made from...
        let quoted: Vec<String> = <HostRow<'_> as Row>::COLUMN_NAMES
            .iter()
            .map(|name| format!("`{name}`"))
            .collect();
        assert_eq!(host_columns(), quoted.join(","));
        // ...and every host value column is an 8-byte little-endian word in RowBinary.
        assert_eq!(HOST_COLUMNS.len(), HOST_WORD_FIELDS.len());
        for ((name, ty), word) in HOST_COLUMNS.iter().zip(HOST_WORD_FIELDS) {
            assert_eq!(*name, word);
            assert!(matches!(*ty, "Float64" | "UInt64"), "{name}: {ty}");
        }
        let common: Vec<&str> = COMMON_COLUMNS.iter().map(|(name, _)| *name).collect();
        assert_eq!(
            common,
            [
                "node_id",
                "network",
                "ts",
                "ts_ms",
                "seq",
                "idx",
                "outbox_id",
                "received_at"
            ]
        );
    }

    #[test]
    fn a_host_row_is_laid_out_as_row_binary() {
        let node = "n".repeat(200); // a two-byte LEB128 length
        let c = Common {
            node_id: &node,
            network: "finney",
            ts: 0x0102_0304,
            ts_ms: -2,
            seq: 7,
            idx: 3,
            outbox_id: 0x1122_3344_5566_7788,
            received_at: 9,
        };
        let values = HostValues {
            cpu_busy_percent: 1.5,
            oom_kills_total: 42,
            ..HostValues::default()
        };
        let mut words = Vec::new();
        put_host_words(&mut words, &values);
        let mut row = Vec::new();
        put_host_row(&mut row, &c, &words);

        let mut expected = vec![0xc8, 0x01];
        expected.extend_from_slice(node.as_bytes());
        expected.push(6);
        expected.extend_from_slice(b"finney");
        expected.extend_from_slice(&[4, 3, 2, 1]);
        expected.extend_from_slice(&(-2i64).to_le_bytes());
        expected.extend_from_slice(&7u64.to_le_bytes());
        expected.extend_from_slice(&3u32.to_le_bytes());
        expected.extend_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
        expected.extend_from_slice(&9u32.to_le_bytes());
        expected.extend_from_slice(&1.5f64.to_le_bytes());
        expected.extend_from_slice(&[0; 15 * 8]);
        expected.extend_from_slice(&42u64.to_le_bytes());
        assert_eq!(row, expected);
    }

    fn single() -> ClickHouseSettings {
        ClickHouseSettings {
            url: "http://127.0.0.1:8123".into(),
            ..ClickHouseSettings::default()
        }
    }

    fn cluster() -> ClickHouseSettings {
        ClickHouseSettings {
            cluster: "fleet".into(),
            ..single()
        }
    }

    fn all_statements(settings: &ClickHouseSettings, ttl: bool) -> Vec<String> {
        let mut all = bootstrap(settings);
        all.extend(
            migrations(settings, ttl)
                .into_iter()
                .flat_map(|m| m.statements),
        );
        all
    }

    #[test]
    fn migrations_are_numbered_in_order_and_cover_every_table() {
        let list = migrations(&single(), false);
        let versions: Vec<u32> = list.iter().map(|m| m.version).collect();
        assert_eq!(versions, vec![1, 2, 3]);
        let text = all_statements(&single(), false).join("\n");
        for table in
            RAW_TABLES
                .iter()
                .chain(&["rollup_1m", "rollup_1h", "findings", "actions", "audit"])
        {
            assert!(
                text.contains(&format!("CREATE TABLE IF NOT EXISTS guardian.{table} (")),
                "{table} missing"
            );
        }
        // One view per (table with metrics, rollup).
        assert_eq!(text.matches("CREATE MATERIALIZED VIEW").count(), 6);
        assert!(!text.contains("ON CLUSTER"));
        assert!(!text.contains("Replicated"));
        assert!(!text.contains("Distributed"));
    }

    #[test]
    fn every_cluster_statement_runs_on_the_cluster_with_replicated_local_tables() {
        let statements = all_statements(&cluster(), false);
        for s in &statements {
            assert!(
                s.contains(" ON CLUSTER fleet ") || s.ends_with(" ON CLUSTER fleet"),
                "no ON CLUSTER: {s}"
            );
        }
        let text = statements.join("\n");
        for table in RAW_TABLES.iter().chain(&["findings", "actions", "audit"]) {
            assert!(text.contains(&format!(
                "CREATE TABLE IF NOT EXISTS guardian.{table}_local ON CLUSTER fleet ("
            )));
            assert!(text.contains(&format!(
                "ENGINE = ReplicatedMergeTree('/clickhouse/tables/{{shard}}/guardian/{table}_local', '{{replica}}')"
            )));
            assert!(text.contains(&format!(
                "CREATE TABLE IF NOT EXISTS guardian.{table} ON CLUSTER fleet AS guardian.{table}_local \
                 ENGINE = Distributed(fleet, guardian, {table}_local, cityHash64(node_id))"
            )));
        }
        for rollup in ["rollup_1m", "rollup_1h"] {
            assert!(text.contains(&format!(
                "ENGINE = ReplicatedAggregatingMergeTree('/clickhouse/tables/{{shard}}/guardian/{rollup}_local', '{{replica}}')"
            )));
            assert!(text.contains(&format!(
                "Distributed(fleet, guardian, {rollup}_local, cityHash64(node_id))"
            )));
            for raw in ["host_samples", "chain_samples", "gpu_samples"] {
                assert!(text.contains(&format!(
                    "mv_{raw}_{rollup} ON CLUSTER fleet TO guardian.{rollup}_local AS"
                )));
                assert!(text.contains(&format!("FROM guardian.{raw}_local ARRAY JOIN")));
            }
        }
        assert!(
            text.contains(
                "ReplicatedMergeTree('/clickhouse/tables/all/guardian/schema_migrations'"
            )
        );
        // Views never read or write the Distributed tables.
        assert!(!text.contains("TO guardian.rollup_1m AS"));
    }

    #[test]
    fn ttl_only_when_the_server_supports_it() {
        for settings in [single(), cluster()] {
            assert!(!all_statements(&settings, false).join("\n").contains("TTL"));
            let with = all_statements(&settings, true).join("\n");
            assert_eq!(with.matches(" TTL ts + INTERVAL 30 DAY").count(), 5);
            assert_eq!(with.matches(" TTL t + INTERVAL 180 DAY").count(), 1);
            assert_eq!(with.matches(" TTL t + INTERVAL 730 DAY").count(), 1);
            assert!(
                !with.contains("TTL at"),
                "reconciler tables keep everything"
            );
        }
        assert!(!supports_ttl("18.16.1"));
        assert!(!supports_ttl("19.5.3.8"));
        assert!(supports_ttl("19.6.2.11"));
        assert!(supports_ttl("24.3.1"));
    }

    #[test]
    fn views_unpivot_every_catalogue_metric_and_rows_match_the_ddl() {
        let text = migrations(&single(), false)[1].statements.join("\n");
        for def in METRICS {
            assert!(text.contains(&format!("'{}'", def.name)));
            assert!(text.contains(&format!("toFloat64({})", def.name)));
            let columns = value_columns(def.table.name());
            assert!(
                columns.iter().any(|(c, _)| *c == def.name),
                "{} has no column",
                def.name
            );
        }
        let names = |cols: &[(&str, &str)]| -> Vec<String> {
            COMMON_COLUMNS
                .iter()
                .chain(cols)
                .map(|(n, _)| (*n).to_owned())
                .collect()
        };
        let fields = |f: &[&str]| -> Vec<String> { f.iter().map(|s| (*s).to_owned()).collect() };
        assert_eq!(
            fields(<HostRow<'_> as Row>::COLUMN_NAMES),
            names(HOST_COLUMNS)
        );
        assert_eq!(
            fields(<ChainRow<'_> as Row>::COLUMN_NAMES),
            names(CHAIN_COLUMNS)
        );
        assert_eq!(
            fields(<GpuRow<'_> as Row>::COLUMN_NAMES),
            names(GPU_COLUMNS)
        );
        assert_eq!(
            fields(<KeystoreRow<'_> as Row>::COLUMN_NAMES),
            names(KEYSTORE_COLUMNS)
        );
        let recent = |cols: &[(&str, &str)]| -> Vec<String> {
            ["node_id", "ts_ms"]
                .iter()
                .copied()
                .chain(cols.iter().map(|(n, _)| *n))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(
            fields(<HostRecent as Row>::COLUMN_NAMES),
            recent(HOST_COLUMNS)
        );
        assert_eq!(
            fields(<ChainRecent as Row>::COLUMN_NAMES),
            recent(CHAIN_COLUMNS)
        );
        assert_eq!(
            fields(<UnavailableRow<'_> as Row>::COLUMN_NAMES),
            names(UNAVAILABLE_COLUMNS)
        );
    }

    #[test]
    fn settings_are_checked_only_when_enabled_and_name_the_field() {
        assert!(!ClickHouseSettings::default().enabled());
        assert_eq!(ClickHouseSettings::default().validate(), Ok(()));
        assert_eq!(single().validate(), Ok(()));
        assert_eq!(cluster().validate(), Ok(()));
        let bad = |s: ClickHouseSettings, field: &str| {
            let message = s.validate().expect_err(field);
            assert!(message.contains(field), "{message:?} does not name {field}");
        };
        bad(
            ClickHouseSettings {
                url: "127.0.0.1:8123".into(),
                ..single()
            },
            "clickhouse.url",
        );
        bad(
            ClickHouseSettings {
                url: "https://u:secret@h:8443".into(),
                ..single()
            },
            "clickhouse.url",
        );
        assert!(
            !ClickHouseSettings {
                url: "https://u:secret@h:8443".into(),
                ..single()
            }
            .validate()
            .err()
            .unwrap_or_default()
            .contains("secret")
        );
        bad(
            ClickHouseSettings {
                database: "guardian; DROP".into(),
                ..single()
            },
            "clickhouse.database",
        );
        bad(
            ClickHouseSettings {
                cluster: "a-b".into(),
                ..single()
            },
            "clickhouse.cluster",
        );
        bad(
            ClickHouseSettings {
                raw_retention_days: 0,
                ..single()
            },
            "clickhouse.raw_retention_days",
        );
        bad(
            ClickHouseSettings {
                request_timeout_ms: 5,
                ..single()
            },
            "clickhouse.request_timeout_ms",
        );
        bad(
            ClickHouseSettings {
                insert_max_rows: 0,
                ..single()
            },
            "clickhouse.insert_max_rows",
        );
        bad(
            ClickHouseSettings {
                compression: "zstd".into(),
                ..single()
            },
            "clickhouse.compression",
        );
    }

    #[test]
    fn compression_is_lz4_except_to_a_loopback_server_unless_chosen() {
        let with = |url: &str, compression: &str| ClickHouseSettings {
            url: url.into(),
            compression: compression.into(),
            ..ClickHouseSettings::default()
        };
        for url in [
            "http://127.0.0.1:8123",
            "http://127.3.2.1",
            "http://localhost:8123/",
            "http://user:pw@LOCALHOST:8123",
            "http://[::1]:8123",
        ] {
            assert!(!with(url, "auto").lz4(), "{url}");
            assert!(with(url, "lz4").lz4(), "{url}");
        }
        for url in [
            "http://10.0.0.5:8123",
            "http://ch.internal:8123",
            "http://localhost.example.com",
            "http://[2001:db8::1]:8123",
            "http://127.0.0.1@ch:8123",
        ] {
            assert!(with(url, "auto").lz4(), "{url}");
            assert!(!with(url, "none").lz4(), "{url}");
        }
    }

    #[test]
    fn settings_parse_from_toml_with_defaults_and_refuse_unknown_keys() {
        let parsed: ClickHouseSettings =
            toml::from_str("url = \"http://ch:8123\"\ncluster = \"fleet\"\n").expect("parses");
        assert_eq!(parsed.database, "guardian");
        assert_eq!(parsed.raw_retention_days, 30);
        assert_eq!(parsed.cluster, "fleet");
        assert!(toml::from_str::<ClickHouseSettings>("ulr = \"x\"").is_err());
    }

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

    #[test]
    fn error_kinds_are_bounded_labels() {
        let e = ClickHouseError::Timeout {
            url: "http://h:8123".into(),
            what: "ping",
            timeout_ms: 10,
        };
        assert_eq!(e.kind(), "timeout");
        assert!(e.to_string().contains("http://h:8123"));
        assert_eq!(ClickHouseError::Request("x".into()).kind(), "request");
    }
}
