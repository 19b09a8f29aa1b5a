//! Owns `p2p_isolation`: whether the node keeps enough, and steady, peers. At most one finding,
//! the first of these that holds:
//!
//! 1. no peers at all: critical, score 1;
//! 2. peers <= `min_peers`: warning, score 0.5 at `min_peers` rising to 1 towards zero;
//! 3. peers < `peers_median_share` x the network's median peer count (from the fleet):
//!    warning, score 0.5 at the bound rising to 1 towards zero;
//! 4. churn: over >= 6 responsive window points the peer count's coefficient of variation
//!    (std / mean) is > 0.5: info, or warning when > 1; score = cv / 2.
//!
//! Only responsive chain samples of nodes that say they should have peers
//! (`should_have_peers`, false on a dev chain) are judged.

use super::{DetectPolicy, Finding, FindingKind, FleetContext, NodeInput, Severity};
use crate::window::Window;

/// Fewest responsive window points for the churn test.
const CHURN_MIN_POINTS: usize = 6;
/// Coefficient of variation of the peer count above which churn is info, and warning.
const CHURN_INFO_CV: f64 = 0.5;
const CHURN_WARNING_CV: f64 = 1.0;

/// `p2p_isolation` findings for one node (at most one).
pub fn detect(input: &NodeInput<'_>, fleet: &FleetContext, policy: &DetectPolicy) -> Vec<Finding> {
    let Some((_, chain)) = input.chain else {
        return Vec::new();
    };
    if !chain.responsive || !chain.should_have_peers {
        return Vec::new();
    }
    let peers = chain.peers;
    let peers_f = f64::from(peers);
    let min_peers = policy.min_peers;
    let median_bound = fleet
        .network_median_peers
        .filter(|m| *m > 0.0)
        .map(|m| (m, m * policy.peers_median_share));
    let churn = churn(input.window);

    let (severity, score, why) = if peers == 0 {
        (Severity::Critical, 1.0, "has no peers".to_owned())
    } else if peers <= min_peers {
        (
            Severity::Warning,
            0.5 + 0.5 * f64::from(min_peers - peers) / f64::from(min_peers),
            format!("has {peers} peers, at or under the minimum of {min_peers}"),
        )
    } else if let Some((median, bound)) = median_bound.filter(|(_, bound)| peers_f < *bound) {
        (
            Severity::Warning,
            0.5 + 0.5 * (1.0 - peers_f / bound),
            format!("has {peers} peers against a network median of {median:.0} (bound {bound:.1})"),
        )
    } else if let Some((cv, mean, _)) = churn.filter(|(cv, _, _)| *cv > CHURN_INFO_CV) {
        let severity = if cv > CHURN_WARNING_CV {
            Severity::Warning
        } else {
            Severity::Info
        };
        (
            severity,
            cv / 2.0,
            format!("peer count swings widely (cv {cv:.2} around a mean of {mean:.1})"),
        )
    } else {
        return Vec::new();
    };

    let mut evidence = vec![
        ("peers", peers.to_string()),
        ("min_peers", min_peers.to_string()),
        (
            "peers_median_share",
            format!("{:.2}", policy.peers_median_share),
        ),
        (
            "network_median_peers",
            fleet
                .network_median_peers
                .map_or_else(|| "none".to_owned(), |m| format!("{m:.1}")),
        ),
    ];
    if let Some((cv, mean, std)) = churn {
        evidence.push(("churn_cv", format!("{cv:.2}")));
        evidence.push(("window_mean_peers", format!("{mean:.1}")));
        evidence.push(("window_std_peers", format!("{std:.1}")));
    }
    vec![Finding::new(
        FindingKind::P2pIsolation,
        score,
        severity,
        format!("Node {why}."),
        evidence,
    )]
}

/// (std / mean, mean, std) of the peer count over the window's responsive chain points;
/// None with too few points or no peers on average.
fn churn(window: &Window) -> Option<(f64, f64, f64)> {
    let peers: Vec<f64> = window
        .chain()
        .iter()
        .filter(|(_, v)| v.responsive == 1)
        .map(|(_, v)| f64::from(v.peers))
        .collect();
    if peers.len() < CHURN_MIN_POINTS {
        return None;
    }
    let n = peers.len() as f64;
    let mean = peers.iter().sum::<f64>() / n;
    if mean <= 0.0 {
        return None;
    }
    let std = (peers.iter().map(|p| (p - mean).powi(2)).sum::<f64>() / n).sqrt();
    Some((std / mean, mean, std))
}

#[cfg(test)]
mod tests {
    use guardian_proto::v1::ChainSample;

    use super::super::block_lag::tests::{NOW, chain_at, quiet_input, window};
    use super::*;
    use crate::batch::values::ChainValues;

    fn window_of_peers(peers: &[u32]) -> Window {
        let mut window = window();
        let start = NOW - 10_000 * (peers.len() as i64 - 1);
        for (i, p) in peers.iter().enumerate() {
            window.record_chain(
                start + 10_000 * i as i64,
                ChainValues {
                    responsive: 1,
                    peers: *p,
                    ..ChainValues::default()
                },
            );
        }
        window
    }

    fn run(window: &Window, peers: u32, median: Option<f64>) -> Vec<Finding> {
        let chain = ChainSample {
            peers,
            ..chain_at(1_000, 1_000)
        };
        let input = NodeInput {
            chain: Some((NOW, &chain)),
            ..quiet_input(window)
        };
        let fleet = FleetContext {
            network_best_block: 0,
            network_median_peers: median,
            network_clock_delay_ms: None,
        };
        detect(&input, &fleet, &DetectPolicy::default())
    }

    #[test]
    fn well_connected_node_is_quiet() {
        let window = window_of_peers(&[24, 25, 26, 25, 24, 25]);
        assert!(run(&window, 25, Some(30.0)).is_empty());
    }

    #[test]
    fn node_without_peers_is_critical() {
        let findings = run(&window(), 0, None);
        assert_eq!(findings.len(), 1, "{findings:?}");
        assert_eq!(findings[0].kind, FindingKind::P2pIsolation);
        assert_eq!(findings[0].severity, Severity::Critical);
    }

    #[test]
    fn node_at_min_peers_is_a_warning() {
        let findings = run(&window(), 3, None);
        assert_eq!(findings[0].severity, Severity::Warning);
        assert!((findings[0].score - 0.5).abs() < 1e-9);
        assert!(run(&window(), 4, None).is_empty());
    }

    #[test]
    fn node_far_under_the_network_median_is_isolated() {
        // A quarter of a median of 40 is 10; 6 peers is well under it.
        let findings = run(&window(), 6, Some(40.0));
        assert_eq!(findings[0].severity, Severity::Warning);
        assert_eq!(findings[0].evidence["network_median_peers"], "40.0");
        assert!(run(&window(), 10, Some(40.0)).is_empty());
    }

    #[test]
    fn swinging_peer_count_is_churn() {
        let window = window_of_peers(&[40, 4, 38, 5, 41, 4, 39, 6]);
        let findings = run(&window, 30, None);
        assert_eq!(findings.len(), 1, "{findings:?}");
        assert_eq!(findings[0].severity, Severity::Info);
        assert!(findings[0].summary.contains("swings"));
    }

    #[test]
    fn dev_chain_without_peers_is_quiet() {
        let chain = ChainSample {
            peers: 0,
            should_have_peers: false,
            ..chain_at(1_000, 1_000)
        };
        let window = window();
        let input = NodeInput {
            chain: Some((NOW, &chain)),
            ..quiet_input(&window)
        };
        assert!(detect(&input, &FleetContext::default(), &DetectPolicy::default()).is_empty());
    }

    #[test]
    fn unresponsive_node_is_not_judged_on_peers() {
        let chain = ChainSample {
            responsive: false,
            peers: 0,
            ..chain_at(1_000, 1_000)
        };
        let window = window();
        let input = NodeInput {
            chain: Some((NOW, &chain)),
            ..quiet_input(&window)
        };
        assert!(detect(&input, &FleetContext::default(), &DetectPolicy::default()).is_empty());
    }
}
