//! Owns the embedded telemetry rows: the typed columns of `host_samples`, `chain_samples`,
//! `gpu_samples`, `unavailable_samples` and the whole samples of `kind_samples`, as the group
//! commit writes them into the ledger database when ClickHouse is not configured.

use prost::Message;

use super::insert::{Value, insert_rows};
use super::{Backend, StoreError, to_i64};
use crate::batch::values::{ChainValues, GpuValues};
use crate::batch::{Batch, Kind};

const HOST_COLUMNS: &[&str] = &[
    "node_id",
    "seq",
    "idx",
    "observed_at_unix_ms",
    "cpu_busy_percent",
    "cpu_iowait_percent",
    "mem_total_bytes",
    "mem_available_bytes",
    "load_avg_1m",
    "cpu_psi_some_avg10_percent",
    "memory_psi_full_avg10_percent",
    "io_psi_full_avg10_percent",
    "chain_data_used_percent",
    "chain_data_available_bytes",
    "disk_read_latency_ms_max",
    "disk_write_latency_ms_max",
    "disk_utilisation_percent_max",
    "net_rx_bytes_per_second",
    "net_tx_bytes_per_second",
    "net_errors_total",
    "oom_kills_total",
    "sample",
];

const CHAIN_COLUMNS: &[&str] = &[
    "node_id",
    "seq",
    "idx",
    "observed_at_unix_ms",
    "responsive",
    "best_block",
    "finalized_block",
    "sync_highest_block",
    "reference_best_block",
    "block_lag",
    "finality_lag_blocks",
    "peers",
    "is_syncing",
    "head_age_ms",
    "rpc_latency_ms",
    "spec_version",
    "blocks_since_last_update",
    "validator_trust_ratio",
    "emission_rao",
];

const GPU_COLUMNS: &[&str] = &[
    "node_id",
    "seq",
    "idx",
    "gpu_index",
    "observed_at_unix_ms",
    "gpu_uuid",
    "utilisation_gpu_percent",
    "memory_used_bytes",
    "temperature_celsius",
    "power_draw_watts",
    "sm_clock_mhz",
    "throttle_reasons_bitmask",
    "ecc_uncorrected_total",
    "pcie_replay_total",
    "xid_events",
];

/// A group's embedded telemetry rows, by table.
#[derive(Default)]
pub(super) struct Rows {
    host: Vec<Vec<Value>>,
    chain: Vec<Vec<Value>>,
    gpu: Vec<Vec<Value>>,
    unavailable: Vec<Vec<Value>>,
    kind: Vec<Vec<Value>>,
}

impl Rows {
    /// Adds the rows of `node`'s `batch`.
    pub(super) fn add(&mut self, node: &str, batch: &Batch) {
        let seq = to_i64(batch.seq);
        let key = |idx: usize, at: i64| {
            vec![
                Value::T(node.to_owned()),
                Value::I(seq),
                Value::I(to_i64(idx as u64)),
                Value::I(at),
            ]
        };
        for (idx, sample) in batch.samples.iter().enumerate() {
            let at = sample.observed_at_unix_ms;
            match &sample.kind {
                Some(Kind::Host(host)) => {
                    let v = host.values;
                    let mut row = key(idx, at);
                    row.extend([
                        Value::F(v.cpu_busy_percent),
                        Value::F(v.cpu_iowait_percent),
                        Value::I(to_i64(v.mem_total_bytes)),
                        Value::I(to_i64(v.mem_available_bytes)),
                        Value::F(v.load_avg_1m),
                        Value::F(v.cpu_psi_some_avg10_percent),
                        Value::F(v.memory_psi_full_avg10_percent),
                        Value::F(v.io_psi_full_avg10_percent),
                        Value::F(v.chain_data_used_percent),
                        Value::I(to_i64(v.chain_data_available_bytes)),
                        Value::F(v.disk_read_latency_ms_max),
                        Value::F(v.disk_write_latency_ms_max),
                        Value::F(v.disk_utilisation_percent_max),
                        Value::F(v.net_rx_bytes_per_second),
                        Value::F(v.net_tx_bytes_per_second),
                        Value::I(to_i64(v.net_errors_total)),
                        Value::I(to_i64(v.oom_kills_total)),
                        Value::B(host.encoded.to_vec()),
                    ]);
                    self.host.push(row);
                }
                Some(Kind::Chain(chain)) => {
                    let v = ChainValues::of(chain);
                    let mut row = key(idx, at);
                    row.extend([
                        Value::I(i64::from(v.responsive)),
                        Value::I(to_i64(v.best_block)),
                        Value::I(to_i64(v.finalized_block)),
                        Value::I(to_i64(v.sync_highest_block)),
                        Value::I(to_i64(v.reference_best_block)),
                        Value::I(to_i64(v.block_lag)),
                        Value::I(to_i64(v.finality_lag_blocks)),
                        Value::I(i64::from(v.peers)),
                        Value::I(i64::from(v.is_syncing)),
                        Value::I(to_i64(v.head_age_ms)),
                        Value::F(v.rpc_latency_ms),
                        Value::I(i64::from(v.spec_version)),
                        Value::I(to_i64(v.blocks_since_last_update)),
                        Value::F(v.validator_trust_ratio),
                        Value::I(to_i64(v.emission_rao)),
                    ]);
                    self.chain.push(row);
                    self.kind
                        .push(kind_row(node, seq, idx, "chain", at, sample));
                }
                Some(Kind::Gpu(gpu)) => {
                    for device in &gpu.devices {
                        let v = GpuValues::of(device);
                        self.gpu.push(vec![
                            Value::T(node.to_owned()),
                            Value::I(seq),
                            Value::I(to_i64(idx as u64)),
                            Value::I(i64::from(v.gpu_index)),
                            Value::I(at),
                            Value::T(v.gpu_uuid),
                            Value::F(v.utilisation_gpu_percent),
                            Value::I(to_i64(v.memory_used_bytes)),
                            Value::F(v.temperature_celsius),
                            Value::F(v.power_draw_watts),
                            Value::I(i64::from(v.sm_clock_mhz)),
                            Value::I(to_i64(v.throttle_reasons_bitmask)),
                            Value::I(to_i64(v.ecc_uncorrected_total)),
                            Value::I(to_i64(v.pcie_replay_total)),
                            Value::I(i64::from(v.xid_events)),
                        ]);
                    }
                    self.kind.push(kind_row(node, seq, idx, "gpu", at, sample));
                }
                Some(Kind::Keystore(_)) => {
                    self.kind
                        .push(kind_row(node, seq, idx, "keystore", at, sample));
                }
                Some(Kind::Unavailable(why)) => {
                    let mut row = key(idx, at);
                    row.extend([Value::T(why.sampler.clone()), Value::T(why.reason.clone())]);
                    self.unavailable.push(row);
                }
                // Ingest rejects kind-less samples before they get here.
                None => {}
            }
        }
    }
}

fn kind_row(
    node: &str,
    seq: i64,
    idx: usize,
    kind: &str,
    at: i64,
    sample: &crate::batch::Sample,
) -> Vec<Value> {
    vec![
        Value::T(node.to_owned()),
        Value::I(seq),
        Value::I(to_i64(idx as u64)),
        Value::T(kind.to_owned()),
        Value::I(at),
        // Whole, as the generated type (chain, GPU and keystore samples: a few per batch).
        Value::B(sample.to_proto().encode_to_vec()),
    ]
}

impl Rows {
    /// Inserts every row, table by table, in `tx`.
    pub(super) async fn insert(
        self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        backend: Backend,
    ) -> Result<(), StoreError> {
        insert_rows(tx, backend, "host_samples", HOST_COLUMNS, self.host).await?;
        insert_rows(tx, backend, "chain_samples", CHAIN_COLUMNS, self.chain).await?;
        insert_rows(tx, backend, "gpu_samples", GPU_COLUMNS, self.gpu).await?;
        insert_rows(
            tx,
            backend,
            "unavailable_samples",
            &[
                "node_id",
                "seq",
                "idx",
                "observed_at_unix_ms",
                "sampler",
                "reason",
            ],
            self.unavailable,
        )
        .await?;
        insert_rows(
            tx,
            backend,
            "kind_samples",
            &[
                "node_id",
                "seq",
                "idx",
                "kind",
                "observed_at_unix_ms",
                "sample",
            ],
            self.kind,
        )
        .await?;
        Ok(())
    }
}
