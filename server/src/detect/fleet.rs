//! Fleet correlation: when a configured share of one network's nodes degrade together, the
//! chain or the network is the cause: one fleet finding, and per-node remediation is held.
//!
//! Nodes are grouped by network. A network with at least `fleet_min_nodes` nodes, at least
//! one of them degraded, and a degraded share >= `fleet_degraded_share` gets one
//! `fleet_degraded` finding: critical, score = the degraded share, evidence naming up to 10
//! degraded nodes. Networks come out in name order.

use std::collections::BTreeMap;

use super::{DetectPolicy, Finding, FindingKind, Severity};

/// Degraded node ids named in evidence, at most.
const MAX_LISTED: usize = 10;

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
pub fn correlate(nodes: &[NodeHealth], policy: &DetectPolicy) -> Vec<FleetFinding> {
    let mut networks: BTreeMap<&str, Vec<&NodeHealth>> = BTreeMap::new();
    for node in nodes {
        networks
            .entry(node.network.as_str())
            .or_default()
            .push(node);
    }
    networks
        .into_iter()
        .filter_map(|(network, members)| degraded_together(network, &members, policy))
        .collect()
}

fn degraded_together(
    network: &str,
    members: &[&NodeHealth],
    policy: &DetectPolicy,
) -> Option<FleetFinding> {
    let total = members.len();
    let mut degraded: Vec<&str> = members
        .iter()
        .filter(|n| n.degraded)
        .map(|n| n.node_id.as_str())
        .collect();
    if total < policy.fleet_min_nodes.max(1) || degraded.is_empty() {
        return None;
    }
    let share = degraded.len() as f64 / total as f64;
    if share < policy.fleet_degraded_share {
        return None;
    }
    degraded.sort_unstable();
    let mut listed = degraded
        .iter()
        .take(MAX_LISTED)
        .copied()
        .collect::<Vec<_>>()
        .join(",");
    if degraded.len() > MAX_LISTED {
        listed.push_str(&format!(",+{} more", degraded.len() - MAX_LISTED));
    }
    let finding = Finding::new(
        FindingKind::FleetDegraded,
        share,
        Severity::Critical,
        format!(
            "{} of {total} nodes on {network} are degraded together ({:.0}%): the chain or the \
             network is the likely cause, so per-node remediation is held.",
            degraded.len(),
            share * 100.0
        ),
        [
            ("network", network.to_owned()),
            ("degraded", degraded.len().to_string()),
            ("nodes", total.to_string()),
            ("share", format!("{share:.2}")),
            ("node_ids", listed),
        ],
    );
    Some(FleetFinding {
        network: network.to_owned(),
        finding,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(network: &str, total: usize, degraded: usize) -> Vec<NodeHealth> {
        (0..total)
            .map(|i| NodeHealth {
                node_id: format!("{network}-{i:02}"),
                network: network.to_owned(),
                degraded: i < degraded,
            })
            .collect()
    }

    #[test]
    fn half_of_a_network_degraded_together_is_a_fleet_finding() {
        let mut fleet = nodes("finney", 4, 2);
        fleet.extend(nodes("test", 4, 1));
        let findings = correlate(&fleet, &DetectPolicy::default());
        assert_eq!(findings.len(), 1, "{findings:?}");
        let f = &findings[0];
        assert_eq!(f.network, "finney");
        assert_eq!(f.finding.kind, FindingKind::FleetDegraded);
        assert_eq!(f.finding.severity, Severity::Critical);
        assert!((f.finding.score - 0.5).abs() < 1e-9);
        assert_eq!(f.finding.evidence["node_ids"], "finney-00,finney-01");
        assert_eq!(f.finding.evidence["nodes"], "4");
    }

    #[test]
    fn a_few_degraded_nodes_are_their_own_problem() {
        let findings = correlate(&nodes("finney", 10, 4), &DetectPolicy::default());
        assert!(findings.is_empty());
    }

    #[test]
    fn networks_smaller_than_fleet_min_nodes_are_not_correlated() {
        let findings = correlate(&nodes("local", 2, 2), &DetectPolicy::default());
        assert!(findings.is_empty());
    }

    #[test]
    fn evidence_names_at_most_ten_nodes() {
        let findings = correlate(&nodes("finney", 12, 12), &DetectPolicy::default());
        let ids = &findings[0].finding.evidence["node_ids"];
        assert!(ids.ends_with(",+2 more"), "{ids}");
        assert_eq!(findings[0].finding.evidence["degraded"], "12");
    }

    #[test]
    fn zero_share_policy_needs_a_degraded_node() {
        let policy = DetectPolicy {
            fleet_degraded_share: 0.0,
            ..DetectPolicy::default()
        };
        assert!(correlate(&nodes("finney", 5, 0), &policy).is_empty());
    }
}
