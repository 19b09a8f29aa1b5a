//! Detectors: pure functions from one node's in-memory window and newest samples (plus a
//! little fleet context) to findings. No I/O, no clocks: `now_unix_ms` is an input, so each
//! detector is unit-tested with hand-built windows.
//!
//! One detector per file: [`block_lag`], [`consensus`], [`weights`], [`hardware`],
//! [`storage`], [`p2p`], [`keystore`]; [`risk`] combines them; [`fleet`] correlates nodes of
//! one network.

pub mod block_lag;
pub mod clock;
pub mod consensus;
pub mod fleet;
pub mod hardware;
pub mod keystore;
pub mod p2p;
pub mod risk;
pub mod storage;
pub mod weights;

use std::collections::BTreeMap;

use guardian_proto::v1::{ChainSample, GpuSample, KeystoreSample};
use serde::{Deserialize, Serialize};

use crate::batch::values::HostValues;
use crate::window::Window;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Worth knowing; no action.
    Info,
    /// Degrading; the reconciler may act.
    Warning,
    /// Losing money or exposed now.
    Critical,
}

impl Severity {
    /// Stored and wire name: `info`, `warning`, `critical`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }
}

/// What a finding is about. The strings are stored and sent; they never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// Behind the reference tip: beyond `max_block_lag`, or an outlier against its own window.
    BlockLag,
    /// The best block stopped moving while the node says it is not syncing.
    FrozenHead,
    /// best - finalized keeps growing beyond the policy.
    FinalityStall,
    /// Still syncing after `syncing_too_long_minutes`.
    SyncingTooLong,
    /// The node's RPC did not answer (socket open, no reply, or refused).
    RpcUnresponsive,
    /// No sample from the agent for `silent_after_ms` (disconnected or stuck).
    AgentSilent,
    /// Weights not set within the rate limit / tempo / activity cutoff.
    WeightsStale,
    /// GPU clocks held back by thermal/power throttle reasons, or too hot.
    GpuThermal,
    /// New Xid events or uncorrected ECC errors.
    GpuErrors,
    /// GPU utilisation collapsed against the window.
    GpuIdle,
    /// CPU or memory pressure (PSI), memory nearly exhausted.
    HostPressure,
    /// New OOM kills.
    OomKill,
    /// Disk latency or utilisation high.
    StorageSlow,
    /// The chain data filesystem fills up soon (linear forecast) or is nearly full.
    StorageFull,
    /// Few peers, or far fewer than the network's median, or high churn.
    P2pIsolation,
    /// The keystore is not on tmpfs, is missing, or has loose modes / a changed key.
    Keystore,
    /// Many nodes of one network degraded together (a fleet finding, not a node's).
    FleetDegraded,
    /// The agent's clock is off the server's (signed commands fail beyond 30 s).
    ClockSkew,
}

impl FindingKind {
    /// Stored and wire name (snake_case of the variant).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BlockLag => "block_lag",
            Self::FrozenHead => "frozen_head",
            Self::FinalityStall => "finality_stall",
            Self::SyncingTooLong => "syncing_too_long",
            Self::RpcUnresponsive => "rpc_unresponsive",
            Self::AgentSilent => "agent_silent",
            Self::WeightsStale => "weights_stale",
            Self::GpuThermal => "gpu_thermal",
            Self::GpuErrors => "gpu_errors",
            Self::GpuIdle => "gpu_idle",
            Self::HostPressure => "host_pressure",
            Self::OomKill => "oom_kill",
            Self::StorageSlow => "storage_slow",
            Self::StorageFull => "storage_full",
            Self::P2pIsolation => "p2p_isolation",
            Self::Keystore => "keystore",
            Self::FleetDegraded => "fleet_degraded",
            Self::ClockSkew => "clock_skew",
        }
    }

    /// Whether restarting or restoring the chain node can fix it: the reconciler remediates
    /// only these (a hot GPU or a key on disk is not fixed by a restart).
    pub fn remediable(self) -> bool {
        matches!(
            self,
            Self::BlockLag
                | Self::FrozenHead
                | Self::FinalityStall
                | Self::SyncingTooLong
                | Self::RpcUnresponsive
        )
    }
}

/// One thing a detector saw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    /// What it is about.
    pub kind: FindingKind,
    /// 0..=1: how far past its threshold (1 = as bad as the detector can tell).
    pub score: f64,
    /// How bad.
    pub severity: Severity,
    /// One sentence for an operator, with the figures.
    pub summary: String,
    /// The figures behind it (name -> value as text), for the audit and the API.
    pub evidence: BTreeMap<String, String>,
}

impl Finding {
    /// A finding with `evidence` given as pairs; `score` is clamped to 0..=1 (NaN -> 0).
    pub fn new(
        kind: FindingKind,
        score: f64,
        severity: Severity,
        summary: impl Into<String>,
        evidence: impl IntoIterator<Item = (&'static str, String)>,
    ) -> Self {
        let score = if score.is_nan() {
            0.0
        } else {
            score.clamp(0.0, 1.0)
        };
        Self {
            kind,
            score,
            severity,
            summary: summary.into(),
            evidence: evidence
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
        }
    }
}

/// What the detectors compare a new GPU sample with: per device of the sample before it, the
/// uncorrected ECC count and the utilisation. Kept instead of the whole sample (8 devices
/// with names, processes and reasons are ~2.5 KiB a node; this is ~0.5 KiB).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PreviousGpu {
    /// Whether NVML answered.
    pub available: bool,
    /// Its devices.
    pub devices: Vec<PreviousDevice>,
}

/// One device of a [`PreviousGpu`].
#[derive(Debug, Clone, PartialEq)]
pub struct PreviousDevice {
    /// NVML UUID: how a device is matched across samples.
    pub uuid: Box<str>,
    /// Volatile uncorrected ECC errors.
    pub ecc_uncorrected_total: u64,
    /// GPU utilisation.
    pub utilisation_gpu_percent: f64,
}

impl From<&GpuSample> for PreviousGpu {
    fn from(gpu: &GpuSample) -> Self {
        Self {
            available: gpu.available,
            devices: gpu
                .devices
                .iter()
                .map(|d| PreviousDevice {
                    uuid: d.uuid.as_str().into(),
                    ecc_uncorrected_total: d.ecc_uncorrected_total,
                    utilisation_gpu_percent: d.utilisation_gpu_percent,
                })
                .collect(),
        }
    }
}

/// Everything a detector may look at for one node. Borrowed from the registry.
#[derive(Debug, Clone, Copy)]
pub struct NodeInput<'a> {
    /// Evaluation time.
    pub now_unix_ms: i64,
    /// Whether the agent has a live stream.
    pub connected: bool,
    /// When the server last heard from the agent (0 = never).
    pub last_seen_unix_ms: i64,
    /// Host and chain points of the last `window_seconds` (one per 10 s slot), oldest first.
    pub window: &'a Window,
    /// Newest host sample's values and its observation time.
    pub host: Option<(i64, HostValues)>,
    /// Newest chain sample (with validator standing when configured) and its time.
    pub chain: Option<(i64, &'a ChainSample)>,
    /// Chain sample before the newest (for short-term change: head frozen, peers churn).
    pub previous_chain: Option<(i64, &'a ChainSample)>,
    /// Newest GPU sample and its time.
    pub gpu: Option<(i64, &'a GpuSample)>,
    /// What the GPU sample before the newest said, per device (for counter deltas and
    /// utilisation drops).
    pub previous_gpu: Option<(i64, &'a PreviousGpu)>,
    /// Newest keystore sample and its time.
    pub keystore: Option<(i64, &'a KeystoreSample)>,
    /// When the set of key fingerprints last changed (not counting the first sight).
    pub keystore_changed_unix_ms: Option<i64>,
    /// When the node was first seen by the chain sampler as syncing in its current run of
    /// syncing samples (None while not syncing).
    pub syncing_since_unix_ms: Option<i64>,
    /// Estimated offset of the agent's clock from the server's, ms (positive: ahead); None
    /// until three live batches arrived.
    pub clock_offset_ms: Option<i64>,
}

/// What the other nodes of the same network say (computed by the caller over the registry).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FleetContext {
    /// Highest best block reported by any other responsive node of the same network (0 = none).
    pub network_best_block: u64,
    /// Median peer count of the other responsive nodes of the same network (None = fewer than 2).
    pub network_median_peers: Option<f64>,
    /// This server's own delay as every agent's clock sees it: the median clock offset of the
    /// network's connected nodes, when at least [`CLOCK_FLEET_MIN`] have an estimate and the
    /// median is behind (negative). A batch queued in this server (an overloaded ingest, a
    /// slow store) looks older on arrival, so every node's clock looks behind by about the
    /// same amount; `clock_skew` judges a node against this, not against zero. A median
    /// ahead is not taken out: queueing cannot make samples look newer. None otherwise.
    pub network_clock_delay_ms: Option<i64>,
}

/// Nodes of a network with a clock estimate needed before their median counts as the
/// server's own delay ([`FleetContext::network_clock_delay_ms`]).
pub const CLOCK_FLEET_MIN: usize = 5;

/// Detector thresholds. Every default is documented here and in README.md (`[detect]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectPolicy {
    /// Absolute block lag at which `block_lag` fires (warning; critical at 3x). Default 10
    /// (two minutes of 12 s blocks). The reconciler's `max_block_lag` overrides it per node.
    pub max_block_lag: u64,
    /// z-score of the current lag behind the node's own sources (sync state, references; as
    /// the window records it) against the window, above which `block_lag` fires even below
    /// `max_block_lag` (needs >= 6 window points and that lag >= 3). Default 3.0.
    pub lag_z_threshold: f64,
    /// Head age (ms) beyond which a non-syncing node's head counts as frozen. Default 60 000 (5 blocks).
    pub frozen_head_ms: u64,
    /// best - finalized (blocks) beyond which finality counts as stalled. Default 30.
    pub max_finality_lag: u64,
    /// Minutes of continuous syncing before `syncing_too_long`. Default 120.
    pub syncing_too_long_minutes: u64,
    /// No sample for this long (ms) -> `agent_silent`. Default 30 000.
    pub silent_after_ms: i64,
    /// GPU temperature (Celsius) for `gpu_thermal` warning (critical at +10). Default 85.
    pub gpu_temperature_celsius: f64,
    /// GPU utilisation (%) under which, after a window mean above `gpu_busy_percent`, it counts
    /// as collapsed. Default 5.
    pub gpu_idle_percent: f64,
    /// See `gpu_idle_percent`. Default 40.
    pub gpu_busy_percent: f64,
    /// CPU PSI some avg10 (%) for `host_pressure`. Default 40.
    pub cpu_psi_percent: f64,
    /// Memory PSI full avg10 (%) for `host_pressure`. Default 10.
    pub memory_psi_percent: f64,
    /// Available memory share (%) under which memory counts as nearly exhausted. Default 5.
    pub min_memory_available_percent: f64,
    /// Disk read/write latency (ms) for `storage_slow`. Default 50.
    pub disk_latency_ms: f64,
    /// Disk utilisation (%) for `storage_slow`. Default 95.
    pub disk_utilisation_percent: f64,
    /// Forecast time-to-full (hours) under which `storage_full` fires. Default 24.
    pub storage_full_within_hours: f64,
    /// Used share (%) of the chain data filesystem for `storage_full` regardless of trend. Default 95.
    pub storage_used_percent: f64,
    /// Peer count at or under which the node counts as isolated. Default 3.
    pub min_peers: u32,
    /// Share of the network's median peer count under which the node counts as isolated. Default 0.25.
    pub peers_median_share: f64,
    /// Fraction of nodes of one network degraded together for a fleet finding. Default 0.5.
    pub fleet_degraded_share: f64,
    /// Fewest nodes of a network for fleet correlation to apply. Default 3.
    pub fleet_min_nodes: usize,
    /// How many connected nodes of a network must have reached a block for it to count as the
    /// network's tip (the k-th highest best block). Default 2: one agent that lies about its
    /// best block (or a node on a fork racing ahead) cannot make the others look behind.
    /// With fewer nodes than this the fleet sets no tip (each node's own `highestBlock` and
    /// its reference endpoints still do).
    pub fleet_tip_agreement: usize,
    /// How long a changed key fingerprint stays a finding (ms). Default 600 000.
    pub keystore_rotation_hold_ms: i64,
    /// Agent clock offset (ms) over which `clock_skew` warns. Default 10 000.
    pub clock_skew_warn_ms: u64,
    /// Agent clock offset (ms) at which `clock_skew` is critical (agents refuse commands
    /// beyond 30 s). Default 25 000.
    pub clock_skew_critical_ms: u64,
}

impl Default for DetectPolicy {
    fn default() -> Self {
        Self {
            max_block_lag: 10,
            lag_z_threshold: 3.0,
            frozen_head_ms: 60_000,
            max_finality_lag: 30,
            syncing_too_long_minutes: 120,
            silent_after_ms: 30_000,
            gpu_temperature_celsius: 85.0,
            gpu_idle_percent: 5.0,
            gpu_busy_percent: 40.0,
            cpu_psi_percent: 40.0,
            memory_psi_percent: 10.0,
            min_memory_available_percent: 5.0,
            disk_latency_ms: 50.0,
            disk_utilisation_percent: 95.0,
            storage_full_within_hours: 24.0,
            storage_used_percent: 95.0,
            min_peers: 3,
            peers_median_share: 0.25,
            fleet_degraded_share: 0.5,
            fleet_min_nodes: 3,
            fleet_tip_agreement: 2,
            keystore_rotation_hold_ms: 600_000,
            clock_skew_warn_ms: 10_000,
            clock_skew_critical_ms: 25_000,
        }
    }
}

/// Runs every node detector; findings sorted by kind. The composite risk is [`risk::score`].
pub fn detect(input: &NodeInput<'_>, fleet: &FleetContext, policy: &DetectPolicy) -> Vec<Finding> {
    let mut findings = Vec::new();
    findings.extend(block_lag::detect(input, fleet, policy));
    findings.extend(consensus::detect(input, policy));
    findings.extend(weights::detect(input, policy));
    findings.extend(hardware::detect(input, policy));
    findings.extend(storage::detect(input, policy));
    findings.extend(p2p::detect(input, fleet, policy));
    findings.extend(keystore::detect(input, policy));
    findings.extend(clock::detect(input, fleet, policy));
    findings.sort_by_key(|f| f.kind);
    findings
}
