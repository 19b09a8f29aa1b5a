//! The rows ClickHouse stores: the common columns, the raw tables' rows (one list per table
//! so the DDL, the RowBinary layout and the flattener cannot drift apart), keystore,
//! unavailable and audit rows, and the rows the recent reads return.

use ::clickhouse::Row;
use guardian_proto::v1::{KeystoreSample, SamplerUnavailable};
use serde::{Deserialize, Serialize};

use crate::batch::values::{ChainValues, GpuValues, HostValues};
use crate::store::outbox::blob::HOST_WORD_FIELDS;

/// Columns every raw table starts with.
pub(super) const COMMON_COLUMNS: &[(&str, &str)] = &[
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
pub(super) struct Common<'a> {
    pub(super) node_id: &'a str,
    pub(super) network: &'a str,
    pub(super) ts: u32,
    pub(super) ts_ms: i64,
    pub(super) seq: u64,
    pub(super) idx: u32,
    pub(super) outbox_id: u64,
    pub(super) received_at: u32,
}

/// Unix milliseconds to a `DateTime` (seconds, UInt32), clamped to its range.
pub(super) fn datetime(unix_ms: i64) -> u32 {
    u32::try_from(unix_ms.div_euclid(1000).max(0)).unwrap_or(u32::MAX)
}

/// Bytes of RowBinary sent per request body piece (what the client's own row inserts send).
pub(super) const ROW_BINARY_PIECE: usize = 256 * 1024;

/// `host_samples`' insert columns, quoted: the common ones, then the host values in the
/// order of the outbox's host words (the same order as `HostRow`, which a test checks).
pub(super) fn host_columns() -> String {
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
pub(super) fn put_host_row(out: &mut Vec<u8>, c: &Common<'_>, words: &[u8]) {
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
pub(super) fn put_string(out: &mut Vec<u8>, text: &str) {
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

/// Defines a raw table's insert row (common columns, then `values`' fields), its value
/// columns for the DDL, and the conversion from the values struct: one list, so the DDL,
/// the RowBinary layout and the flattener cannot drift apart.
macro_rules! raw_table {
    ($(#[$meta:meta])* $row:ident, $columns:ident, $values:ident { $($field:ident: $ty:ty => $ch:literal),* $(,)? }) => {
        #[derive(Debug, Row, Serialize)]
        $(#[$meta])*
        pub(super) struct $row<'a> {
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

        pub(super) const $columns: &[(&str, &str)] = &[$((stringify!($field), $ch),)*];

        $(#[$meta])*
        impl<'a> $row<'a> {
            pub(super) fn new(c: Common<'a>, v: $values) -> Self {
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
        pub(super) struct $read {
            node_id: String,
            ts_ms: i64,
            $($field: $ty,)*
        }

        impl $read {
            pub(super) fn into_parts(self) -> (String, i64, $values) {
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
pub(super) struct KeystoreValues {
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
    pub(super) fn of(k: &KeystoreSample) -> Self {
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
pub(super) struct UnavailableValues<'a> {
    sampler: &'a str,
    reason: &'a str,
}

impl<'a> UnavailableValues<'a> {
    pub(super) fn of(u: &'a SamplerUnavailable) -> Self {
        Self {
            sampler: &u.sampler,
            reason: &u.reason,
        }
    }
}

/// One mirrored audit entry (columns of the `audit` table).
#[derive(Debug, Row, Serialize)]
pub(super) struct AuditRow<'a> {
    pub(super) seq: u64,
    pub(super) at: u32,
    pub(super) kind: &'a str,
    pub(super) node_id: &'a str,
    pub(super) body: String,
    pub(super) prev_hash: &'a str,
    pub(super) hash: &'a str,
}

#[derive(Debug, Row, Serialize)]
pub(super) struct UnavailableRow<'a> {
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

pub(super) const UNAVAILABLE_COLUMNS: &[(&str, &str)] =
    &[("sampler", "String"), ("reason", "String")];

impl<'a> UnavailableRow<'a> {
    pub(super) fn new(c: Common<'a>, v: UnavailableValues<'a>) -> Self {
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
pub(super) fn value_columns(table: &str) -> &'static [(&'static str, &'static str)] {
    match table {
        "host_samples" => HOST_COLUMNS,
        "chain_samples" => CHAIN_COLUMNS,
        "gpu_samples" => GPU_COLUMNS,
        "keystore_samples" => KEYSTORE_COLUMNS,
        _ => UNAVAILABLE_COLUMNS,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::outbox::blob::put_host_words;

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
}
