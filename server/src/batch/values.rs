//! Owns the flat values the server keeps of each sample (a host sample's 17 figures, a chain
//! sample's row, one GPU device's row) and the one rule for a node's reference chain tip.
//!
//! The window, the detectors, the embedded tables and ClickHouse all read these types, so
//! they live beside the batch decoder that produces them, not in a store. The column order of
//! each type is the metric order of its table (`crate::store::telemetry::METRICS`).

use guardian_proto::v1::{ChainSample, GpuDevice, HostSample};

/// Which source set a node's reference tip (ties keep the first: the node's own view, then
/// its references, then the fleet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TipSource {
    /// The node's own `system_syncState.highestBlock`.
    SyncState,
    /// The best block of a responsive reference endpoint.
    Reference,
    /// The best block of another node of the same network.
    Fleet,
}

impl TipSource {
    /// Stable label for evidence and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            TipSource::SyncState => "sync_state",
            TipSource::Reference => "reference",
            TipSource::Fleet => "fleet",
        }
    }
}

/// The chain tip a node is judged against, and where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tip {
    /// The tip's block number.
    pub block: u64,
    /// Which source set it.
    pub source: TipSource,
}

impl Tip {
    /// How far `best_block` is behind this tip (0 when at or ahead of it).
    pub fn lag(self, best_block: u64) -> u64 {
        self.block.saturating_sub(best_block)
    }
}

/// The highest best block any responsive reference endpoint of `chain` reported (0 if none).
pub fn reference_best_block(chain: &ChainSample) -> u64 {
    chain
        .references
        .iter()
        .filter(|r| r.responsive)
        .map(|r| r.best_block)
        .max()
        .unwrap_or(0)
}

/// The reference tip of a node: the highest of its own `sync_highest_block`, its responsive
/// reference endpoints and `network_best_block` (the best block of its network's nodes; 0
/// where the fleet is not consulted). A node is never judged only by its own view.
pub fn reference_tip(chain: &ChainSample, network_best_block: u64) -> Tip {
    [
        (TipSource::SyncState, chain.sync_highest_block),
        (TipSource::Reference, reference_best_block(chain)),
        (TipSource::Fleet, network_best_block),
    ]
    .into_iter()
    .fold(
        Tip {
            block: 0,
            source: TipSource::SyncState,
        },
        |best, (source, block)| {
            if block > best.block {
                Tip { block, source }
            } else {
                best
            }
        },
    )
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
        let reference_best_block = reference_best_block(chain);
        let tip = reference_tip(chain, 0).block;
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

#[cfg(test)]
mod tests {
    use guardian_proto::v1::ReferenceTip;

    use super::*;

    fn chain(highest: u64, references: &[(u64, bool)]) -> ChainSample {
        ChainSample {
            responsive: true,
            best_block: 100,
            sync_highest_block: highest,
            references: references
                .iter()
                .map(|&(best_block, responsive)| ReferenceTip {
                    best_block,
                    responsive,
                    ..ReferenceTip::default()
                })
                .collect(),
            ..ChainSample::default()
        }
    }

    #[test]
    fn reference_tip_takes_the_highest_source_and_ties_keep_the_nodes_own_view() {
        let own = reference_tip(&chain(110, &[(105, true)]), 108);
        assert_eq!((own.block, own.source), (110, TipSource::SyncState));
        assert_eq!(own.lag(100), 10);
        let reference = reference_tip(&chain(110, &[(120, true), (500, false)]), 115);
        assert_eq!(
            (reference.block, reference.source),
            (120, TipSource::Reference)
        );
        let fleet = reference_tip(&chain(110, &[(120, true)]), 130);
        assert_eq!((fleet.block, fleet.source), (130, TipSource::Fleet));
        let tie = reference_tip(&chain(110, &[(110, true)]), 110);
        assert_eq!(tie.source, TipSource::SyncState);
        assert_eq!(reference_tip(&chain(90, &[]), 0).lag(100), 0);
    }

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
                    ..ReferenceTip::default()
                },
                ReferenceTip {
                    best_block: 999,
                    responsive: false,
                    ..ReferenceTip::default()
                },
            ],
            ..ChainSample::default()
        };
        let values = ChainValues::of(&chain);
        assert_eq!(values.reference_best_block, 110);
        assert_eq!(values.block_lag, 10);
        assert_eq!(values.finality_lag_blocks, 3);
    }

    #[test]
    fn chain_values_lag_ignores_the_fleet_and_unresponsive_references() {
        let values = ChainValues::of(&chain(104, &[(107, true), (900, false)]));
        assert_eq!(values.reference_best_block, 107);
        assert_eq!(values.block_lag, 7);
    }
}
