//! The telemetry vocabulary every store shares: the flat rows a sample becomes, the metric
//! catalogue the history query accepts, and the history answer.
//!
//! The embedded store (SQLite/PostgreSQL tables) and the ClickHouse store
//! ([`super::clickhouse`]) use the same column names, taken from here, so a metric means
//! the same thing whichever store answers.

use guardian_proto::v1::{ChainSample, GpuDevice, HostSample};

/// Which raw table a metric lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    /// One row per host sample.
    Host,
    /// One row per chain sample.
    Chain,
    /// One row per GPU device per GPU sample.
    Gpu,
}

impl Table {
    /// The raw table's name (the same in every store).
    pub fn name(self) -> &'static str {
        match self {
            Self::Host => "host_samples",
            Self::Chain => "chain_samples",
            Self::Gpu => "gpu_samples",
        }
    }
}

/// One numeric series the history query serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricDef {
    /// The name operators type (`guardianctl history --metric NAME`); also the column name.
    pub name: &'static str,
    /// Where it is stored.
    pub table: Table,
    /// Its unit, for display.
    pub unit: &'static str,
}

const fn m(name: &'static str, table: Table, unit: &'static str) -> MetricDef {
    MetricDef { name, table, unit }
}

/// Every metric the history query accepts. GPU metrics aggregate over all of a node's
/// devices within a bucket.
pub const METRICS: &[MetricDef] = &[
    m("cpu_busy_percent", Table::Host, "%"),
    m("cpu_iowait_percent", Table::Host, "%"),
    m("mem_total_bytes", Table::Host, "bytes"),
    m("mem_available_bytes", Table::Host, "bytes"),
    m("load_avg_1m", Table::Host, ""),
    m("cpu_psi_some_avg10_percent", Table::Host, "%"),
    m("memory_psi_full_avg10_percent", Table::Host, "%"),
    m("io_psi_full_avg10_percent", Table::Host, "%"),
    m("chain_data_used_percent", Table::Host, "%"),
    m("chain_data_available_bytes", Table::Host, "bytes"),
    m("disk_read_latency_ms_max", Table::Host, "ms"),
    m("disk_write_latency_ms_max", Table::Host, "ms"),
    m("disk_utilisation_percent_max", Table::Host, "%"),
    m("net_rx_bytes_per_second", Table::Host, "bytes/s"),
    m("net_tx_bytes_per_second", Table::Host, "bytes/s"),
    m("net_errors_total", Table::Host, "errors"),
    m("oom_kills_total", Table::Host, "kills"),
    m("responsive", Table::Chain, "0/1"),
    m("best_block", Table::Chain, "block"),
    m("finalized_block", Table::Chain, "block"),
    m("sync_highest_block", Table::Chain, "block"),
    m("reference_best_block", Table::Chain, "block"),
    m("block_lag", Table::Chain, "blocks"),
    m("finality_lag_blocks", Table::Chain, "blocks"),
    m("peers", Table::Chain, "peers"),
    m("is_syncing", Table::Chain, "0/1"),
    m("head_age_ms", Table::Chain, "ms"),
    m("rpc_latency_ms", Table::Chain, "ms"),
    m("spec_version", Table::Chain, ""),
    m("blocks_since_last_update", Table::Chain, "blocks"),
    m("validator_trust_ratio", Table::Chain, "ratio"),
    m("emission_rao", Table::Chain, "rao"),
    m("utilisation_gpu_percent", Table::Gpu, "%"),
    m("memory_used_bytes", Table::Gpu, "bytes"),
    m("temperature_celsius", Table::Gpu, "°C"),
    m("power_draw_watts", Table::Gpu, "W"),
    m("sm_clock_mhz", Table::Gpu, "MHz"),
    m("throttle_reasons_bitmask", Table::Gpu, "bitmask"),
    m("ecc_uncorrected_total", Table::Gpu, "errors"),
    m("pcie_replay_total", Table::Gpu, "replays"),
    m("xid_events", Table::Gpu, "events"),
];

/// The catalogue entry for `name`.
pub fn metric(name: &str) -> Option<&'static MetricDef> {
    METRICS.iter().find(|def| def.name == name)
}

/// The metrics of one table, in catalogue order.
pub fn metrics_of(table: Table) -> impl Iterator<Item = &'static MetricDef> {
    METRICS.iter().filter(move |def| def.table == table)
}

/// A host sample's row values (column order = [`METRICS`] order for [`Table::Host`]).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct HostValues {
    /// `cpu_busy_percent`.
    pub cpu_busy_percent: f64,
    /// `cpu_iowait_percent`.
    pub cpu_iowait_percent: f64,
    /// `mem_total_bytes`.
    pub mem_total_bytes: u64,
    /// `mem_available_bytes`.
    pub mem_available_bytes: u64,
    /// `load_avg_1m`.
    pub load_avg_1m: f64,
    /// `cpu_psi_some_avg10_percent` (0 where the kernel has no PSI).
    pub cpu_psi_some_avg10_percent: f64,
    /// `memory_psi_full_avg10_percent`.
    pub memory_psi_full_avg10_percent: f64,
    /// `io_psi_full_avg10_percent`.
    pub io_psi_full_avg10_percent: f64,
    /// `chain_data_used_percent`.
    pub chain_data_used_percent: f64,
    /// `chain_data_available_bytes`.
    pub chain_data_available_bytes: u64,
    /// `disk_read_latency_ms_max` over all disks.
    pub disk_read_latency_ms_max: f64,
    /// `disk_write_latency_ms_max` over all disks.
    pub disk_write_latency_ms_max: f64,
    /// `disk_utilisation_percent_max` over all disks.
    pub disk_utilisation_percent_max: f64,
    /// `net_rx_bytes_per_second` summed over interfaces.
    pub net_rx_bytes_per_second: f64,
    /// `net_tx_bytes_per_second` summed over interfaces.
    pub net_tx_bytes_per_second: f64,
    /// `net_errors_total` (rx + tx errors, all interfaces).
    pub net_errors_total: u64,
    /// `oom_kills_total`.
    pub oom_kills_total: u64,
}

impl HostValues {
    /// Flattens a host sample.
    pub fn of(host: &HostSample) -> Self {
        let max = |f: fn(&guardian_proto::v1::DiskIo) -> f64| {
            host.disks.iter().map(f).fold(0.0, f64::max)
        };
        Self {
            cpu_busy_percent: host.cpu_busy_percent,
            cpu_iowait_percent: host.cpu_iowait_percent,
            mem_total_bytes: host.mem_total_bytes,
            mem_available_bytes: host.mem_available_bytes,
            load_avg_1m: host.load_avg_1m,
            cpu_psi_some_avg10_percent: host
                .cpu_pressure
                .as_ref()
                .map_or(0.0, |p| p.some_avg10_percent),
            memory_psi_full_avg10_percent: host
                .memory_pressure
                .as_ref()
                .map_or(0.0, |p| p.full_avg10_percent),
            io_psi_full_avg10_percent: host
                .io_pressure
                .as_ref()
                .map_or(0.0, |p| p.full_avg10_percent),
            chain_data_used_percent: host.chain_data.as_ref().map_or(0.0, |f| f.used_percent),
            chain_data_available_bytes: host.chain_data.as_ref().map_or(0, |f| f.available_bytes),
            disk_read_latency_ms_max: max(|d| d.read_latency_ms),
            disk_write_latency_ms_max: max(|d| d.write_latency_ms),
            disk_utilisation_percent_max: max(|d| d.utilisation_percent),
            net_rx_bytes_per_second: host.networks.iter().map(|n| n.rx_bytes_per_second).sum(),
            net_tx_bytes_per_second: host.networks.iter().map(|n| n.tx_bytes_per_second).sum(),
            net_errors_total: host
                .networks
                .iter()
                .map(|n| n.rx_errors_total.saturating_add(n.tx_errors_total))
                .fold(0u64, u64::saturating_add),
            oom_kills_total: host.oom_kills_total,
        }
    }
}

/// A chain sample's row values (column order = [`METRICS`] order for [`Table::Chain`]).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ChainValues {
    /// `responsive`: the node answered this interval (1) or not (0).
    pub responsive: u8,
    /// `best_block`.
    pub best_block: u64,
    /// `finalized_block`.
    pub finalized_block: u64,
    /// `sync_highest_block` (`system_syncState.highestBlock`).
    pub sync_highest_block: u64,
    /// `reference_best_block`: the highest tip any responsive reference endpoint reported.
    pub reference_best_block: u64,
    /// `block_lag`: max(sync_highest_block, reference_best_block) - best_block, floored at 0.
    pub block_lag: u64,
    /// `finality_lag_blocks`: best_block - finalized_block.
    pub finality_lag_blocks: u64,
    /// `peers`.
    pub peers: u32,
    /// `is_syncing` (0/1).
    pub is_syncing: u8,
    /// `head_age_ms`.
    pub head_age_ms: u64,
    /// `rpc_latency_ms`.
    pub rpc_latency_ms: f64,
    /// `spec_version`.
    pub spec_version: u32,
    /// `blocks_since_last_update` (0 without standing).
    pub blocks_since_last_update: u64,
    /// `validator_trust_ratio` (0 without standing).
    pub validator_trust_ratio: f64,
    /// `emission_rao` (0 without standing).
    pub emission_rao: u64,
}

impl ChainValues {
    /// Flattens a chain sample.
    pub fn of(chain: &ChainSample) -> Self {
        let reference_best_block = chain
            .references
            .iter()
            .filter(|r| r.responsive)
            .map(|r| r.best_block)
            .max()
            .unwrap_or(0);
        let tip = chain.sync_highest_block.max(reference_best_block);
        let standing = chain.standing.as_ref();
        Self {
            responsive: u8::from(chain.responsive),
            best_block: chain.best_block,
            finalized_block: chain.finalized_block,
            sync_highest_block: chain.sync_highest_block,
            reference_best_block,
            block_lag: tip.saturating_sub(chain.best_block),
            finality_lag_blocks: chain.best_block.saturating_sub(chain.finalized_block),
            peers: chain.peers,
            is_syncing: u8::from(chain.is_syncing),
            head_age_ms: chain.head_age_ms,
            rpc_latency_ms: chain.rpc_latency_ms,
            spec_version: chain.spec_version,
            blocks_since_last_update: standing.map_or(0, |s| s.blocks_since_last_update),
            validator_trust_ratio: standing.map_or(0.0, |s| s.validator_trust_ratio),
            emission_rao: standing.map_or(0, |s| s.emission_rao),
        }
    }
}

/// One GPU device's row values (column order = [`METRICS`] order for [`Table::Gpu`]),
/// plus its identity columns `gpu_index` and `gpu_uuid`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GpuValues {
    /// Device index.
    pub gpu_index: u32,
    /// Device UUID.
    pub gpu_uuid: String,
    /// `utilisation_gpu_percent`.
    pub utilisation_gpu_percent: f64,
    /// `memory_used_bytes`.
    pub memory_used_bytes: u64,
    /// `temperature_celsius`.
    pub temperature_celsius: f64,
    /// `power_draw_watts`.
    pub power_draw_watts: f64,
    /// `sm_clock_mhz`.
    pub sm_clock_mhz: u32,
    /// `throttle_reasons_bitmask`.
    pub throttle_reasons_bitmask: u64,
    /// `ecc_uncorrected_total`.
    pub ecc_uncorrected_total: u64,
    /// `pcie_replay_total`.
    pub pcie_replay_total: u64,
    /// `xid_events`: Xid events reported in this sample.
    pub xid_events: u32,
}

impl GpuValues {
    /// Flattens one device.
    pub fn of(device: &GpuDevice) -> Self {
        Self {
            gpu_index: device.index,
            gpu_uuid: device.uuid.clone(),
            utilisation_gpu_percent: device.utilisation_gpu_percent,
            memory_used_bytes: device.memory_used_bytes,
            temperature_celsius: device.temperature_celsius,
            power_draw_watts: device.power_draw_watts,
            sm_clock_mhz: device.sm_clock_mhz,
            throttle_reasons_bitmask: device.throttle_reasons_bitmask,
            ecc_uncorrected_total: device.ecc_uncorrected_total,
            pcie_replay_total: device.pcie_replay_total,
            xid_events: u32::try_from(device.xid_events.len()).unwrap_or(u32::MAX),
        }
    }
}

/// One bucket of a history answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HistoryPoint {
    /// Bucket start, Unix milliseconds.
    pub start_unix_ms: i64,
    /// Mean of the values in the bucket.
    pub avg: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// How many values.
    pub count: u64,
}

/// A history answer.
#[derive(Debug, Clone, PartialEq)]
pub struct History {
    /// Bucket width actually used.
    pub resolution_seconds: u32,
    /// Where it came from: `raw`, `rollup_1m` or `rollup_1h`.
    pub source: &'static str,
    /// Buckets with data, oldest first (empty buckets are omitted).
    pub points: Vec<HistoryPoint>,
}

/// Most buckets one history answer may hold.
pub const MAX_HISTORY_POINTS: i64 = 10_000;

/// Why a history request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    /// Not in [`METRICS`].
    #[error("unknown metric {0:?}; known metrics: {known}", known = METRICS.iter().map(|d| d.name).collect::<Vec<_>>().join(", "))]
    UnknownMetric(String),
    /// `from >= to`.
    #[error("empty time range: from ({from}) must be before to ({to}), both Unix milliseconds")]
    EmptyRange {
        /// Start.
        from: i64,
        /// End.
        to: i64,
    },
    /// Too many buckets.
    #[error(
        "{buckets} buckets of {resolution_seconds} s is more than {MAX_HISTORY_POINTS}; ask for a coarser resolution or a shorter range"
    )]
    TooManyPoints {
        /// Buckets the request implies.
        buckets: i64,
        /// The resolution.
        resolution_seconds: u32,
    },
}

/// The resolution and source a history request is served at. `requested_seconds == 0`
/// picks one: raw samples at 10 s for up to 6 hours, 1-minute rollups up to 7 days,
/// 1-hour rollups beyond. A requested resolution is served from the coarsest rollup
/// that divides it (raw below a minute).
///
/// # Errors
/// [`HistoryError::EmptyRange`] or [`HistoryError::TooManyPoints`].
pub fn plan(
    from_unix_ms: i64,
    to_unix_ms: i64,
    requested_seconds: u32,
) -> Result<(u32, &'static str), HistoryError> {
    if from_unix_ms >= to_unix_ms {
        return Err(HistoryError::EmptyRange {
            from: from_unix_ms,
            to: to_unix_ms,
        });
    }
    let span_s = (to_unix_ms - from_unix_ms) / 1000;
    let resolution = if requested_seconds > 0 {
        requested_seconds
    } else if span_s <= 6 * 3600 {
        10
    } else if span_s <= 7 * 86_400 {
        60
    } else {
        3600
    };
    let source = if resolution % 3600 == 0 {
        "rollup_1h"
    } else if resolution % 60 == 0 {
        "rollup_1m"
    } else {
        "raw"
    };
    let buckets = span_s / i64::from(resolution) + 1;
    if buckets > MAX_HISTORY_POINTS {
        return Err(HistoryError::TooManyPoints {
            buckets,
            resolution_seconds: resolution,
        });
    }
    Ok((resolution, source))
}

#[cfg(test)]
mod tests {
    use super::*;
    use guardian_proto::v1::ReferenceTip;

    #[test]
    fn lag_is_measured_against_the_best_known_tip() {
        let chain = ChainSample {
            best_block: 100,
            finalized_block: 97,
            sync_highest_block: 104,
            references: vec![
                ReferenceTip {
                    best_block: 110,
                    responsive: true,
                    ..Default::default()
                },
                ReferenceTip {
                    best_block: 999,
                    responsive: false,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let values = ChainValues::of(&chain);
        assert_eq!(values.reference_best_block, 110);
        assert_eq!(values.block_lag, 10);
        assert_eq!(values.finality_lag_blocks, 3);
    }

    #[test]
    fn history_plans_pick_rollups_for_long_ranges() {
        let hour = 3_600_000;
        assert_eq!(plan(0, hour, 0), Ok((10, "raw")));
        assert_eq!(plan(0, 2 * 86_400_000, 0), Ok((60, "rollup_1m")));
        assert_eq!(plan(0, 30 * 86_400_000, 0), Ok((3600, "rollup_1h")));
        assert_eq!(plan(0, hour, 300), Ok((300, "rollup_1m")));
        assert!(matches!(
            plan(0, 30 * 86_400_000, 1),
            Err(HistoryError::TooManyPoints { .. })
        ));
        assert!(matches!(
            plan(5, 5, 0),
            Err(HistoryError::EmptyRange { .. })
        ));
    }

    #[test]
    fn every_metric_name_is_unique_and_found() {
        for def in METRICS {
            assert_eq!(metric(def.name), Some(def));
        }
        assert!(metric("nope").is_none());
    }
}

/// A committed batch as the telemetry sinks see it: numbered by the durable outbox it
/// waited in, in commit order.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxBatch {
    /// Position in the outbox: strictly increasing in commit order, never reused.
    pub outbox_id: u64,
    /// The node (from its certificate).
    pub node_id: String,
    /// The node's network (from its Hello).
    pub network: String,
    /// When the server committed it, Unix milliseconds.
    pub received_at_unix_ms: i64,
    /// The batch, decoded from its outbox blob ([`super::blob`]: host samples carry their
    /// values, not their encoded bytes).
    pub batch: std::sync::Arc<crate::batch::Batch>,
}

/// A committed batch as the outbox holds it, in the outbox's encoding ([`super::blob`]):
/// what the group commit hands the sink in memory, the same bytes the segment file holds.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxBlob {
    /// Position in the outbox ([`OutboxBatch::outbox_id`]).
    pub outbox_id: u64,
    /// The node (from its certificate).
    pub node_id: String,
    /// The node's network (from its Hello).
    pub network: String,
    /// When the server committed it, Unix milliseconds.
    pub received_at_unix_ms: i64,
    /// How many samples it holds.
    pub samples: usize,
    /// The encoded batch.
    pub blob: prost::bytes::Bytes,
}

impl OutboxBlob {
    /// Decodes the batch.
    ///
    /// # Errors
    /// When the blob is corrupt ([`super::blob::decode`]).
    pub fn decode(&self) -> Result<OutboxBatch, crate::batch::DecodeError> {
        Ok(OutboxBatch {
            outbox_id: self.outbox_id,
            node_id: self.node_id.clone(),
            network: self.network.clone(),
            received_at_unix_ms: self.received_at_unix_ms,
            batch: std::sync::Arc::new(super::blob::decode(&self.blob)?),
        })
    }
}
