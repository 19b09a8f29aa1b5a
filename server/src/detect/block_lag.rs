//! Owns `block_lag`: how far the node's best block is behind the reference tip, absolutely
//! and against the node's own recent past.
//!
//! The reference tip is the highest of the newest chain sample's `sync_highest_block`, the
//! best block of its responsive reference endpoints, and the fleet's best block for the same
//! network; lag = tip - best_block, floored at 0.
//!
//! - Absolute: lag > `max_block_lag` is a warning, critical at >= 3x. The score ramps from
//!   0.5 just past the limit to 1.0 at 3x, so a lag just over the limit already counts.
//! - Outlier: below the limit, z = (own lag - mean) / std over the window's responsive chain
//!   points (older than the newest sample). The window's points hold each sample's lag behind
//!   the node's own sources (sync state and references: the fleet's tip is not known when a
//!   point is recorded, nor when the window is rebuilt from the store), so the newest sample
//!   is measured the same way: a node that always trails the fleet by a few blocks is not
//!   "unusual for it". It fires as a warning when z >= `lag_z_threshold`, the window has >= 6
//!   such points and the own lag >= 3; score = z / 3. The standard deviation is floored at one
//!   block: lags are whole blocks, and a flat window must not turn any wobble into an
//!   infinite z.
//!
//! An unresponsive node gets no `block_lag` finding: that is `rpc_unresponsive`'s job.

use crate::batch::values::reference_tip;

use super::{DetectPolicy, Finding, FindingKind, FleetContext, NodeInput, Severity};

/// Fewest window points the outlier test needs.
const MIN_WINDOW_POINTS: usize = 6;
/// Smallest lag (blocks) the outlier test reports: one or two blocks behind is normal jitter.
const MIN_OUTLIER_LAG: u64 = 3;
/// Floor of the window's standard deviation (blocks).
const MIN_STD_BLOCKS: f64 = 1.0;

/// `block_lag` findings for one node (at most one).
pub fn detect(input: &NodeInput<'_>, fleet: &FleetContext, policy: &DetectPolicy) -> Vec<Finding> {
    let Some((at, chain)) = input.chain else {
        return Vec::new();
    };
    if !chain.responsive {
        return Vec::new();
    }
    let tip = reference_tip(chain, fleet.network_best_block);
    let (tip_source, tip, lag) = (tip.source.as_str(), tip.block, tip.lag(chain.best_block));
    // The measure the window's points hold (see the module doc).
    let own = reference_tip(chain, 0);
    let own_lag = own.lag(chain.best_block);

    let baseline: Vec<f64> = input
        .window
        .chain()
        .iter()
        .filter(|(t, v)| *t < at && v.responsive == 1)
        .map(|(_, v)| v.block_lag as f64)
        .collect();
    let stats = (baseline.len() >= MIN_WINDOW_POINTS).then(|| {
        let n = baseline.len() as f64;
        let mean = baseline.iter().sum::<f64>() / n;
        let var = baseline.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        let std = var.sqrt();
        let z = (own_lag as f64 - mean) / std.max(MIN_STD_BLOCKS);
        (mean, std, z)
    });

    let mut evidence = vec![
        ("lag", lag.to_string()),
        ("tip", tip.to_string()),
        ("best_block", chain.best_block.to_string()),
        ("tip_source", tip_source.to_owned()),
        ("max_block_lag", policy.max_block_lag.to_string()),
        ("window_points", baseline.len().to_string()),
    ];
    if let Some((mean, std, z)) = stats {
        evidence.push(("own_lag", own_lag.to_string()));
        evidence.push(("z", format!("{z:.2}")));
        evidence.push(("window_mean", format!("{mean:.2}")));
        evidence.push(("window_std", format!("{std:.2}")));
    }

    let max = policy.max_block_lag.max(1);
    if lag > max {
        let severity = if lag >= max.saturating_mul(3) {
            Severity::Critical
        } else {
            Severity::Warning
        };
        let score = 0.5 + 0.5 * (lag - max) as f64 / (max as f64 * 2.0);
        let summary = format!(
            "Node is {lag} blocks behind the {tip_source} tip {tip} (best {}), over the limit of {}.",
            chain.best_block, policy.max_block_lag
        );
        return vec![Finding::new(
            FindingKind::BlockLag,
            score,
            severity,
            summary,
            evidence,
        )];
    }

    if let Some((mean, _, z)) = stats
        && own_lag >= MIN_OUTLIER_LAG
        && z >= policy.lag_z_threshold
    {
        let summary = format!(
            "Node is {own_lag} blocks behind the {} tip {}, unusual for it \
             (z {z:.1} against a window mean of {mean:.1}).",
            own.source.as_str(),
            own.block
        );
        return vec![Finding::new(
            FindingKind::BlockLag,
            z / 3.0,
            Severity::Warning,
            summary,
            evidence,
        )];
    }
    Vec::new()
}

#[cfg(test)]
pub(crate) mod tests {
    //! Also holds the scenario helpers the other detectors' tests share.

    use guardian_proto::v1::{ChainSample, ReferenceTip};

    use super::*;
    use crate::batch::values::ChainValues;
    use crate::window::Window;

    /// Evaluation time of every detector test.
    pub(crate) const NOW: i64 = 1_700_000_000_000;

    /// A 30-minute window, as the server keeps.
    pub(crate) fn window() -> Window {
        Window::new(1_800_000)
    }

    /// A node whose agent is connected and was heard from just now, with no samples: tests add
    /// what their scenario needs with struct-update syntax.
    pub(crate) fn quiet_input(window: &Window) -> NodeInput<'_> {
        NodeInput {
            now_unix_ms: NOW,
            connected: true,
            last_seen_unix_ms: NOW,
            window,
            host: None,
            chain: None,
            previous_chain: None,
            gpu: None,
            previous_gpu: None,
            keystore: None,
            keystore_changed_unix_ms: None,
            syncing_since_unix_ms: None,
            clock_offset_ms: None,
        }
    }

    /// A responsive, synced node at `best` whose own sync state reports `highest`.
    pub(crate) fn chain_at(best: u64, highest: u64) -> ChainSample {
        ChainSample {
            responsive: true,
            best_block: best,
            finalized_block: best.saturating_sub(2),
            sync_highest_block: highest,
            peers: 25,
            should_have_peers: true,
            head_age_ms: 3_000,
            ..ChainSample::default()
        }
    }

    /// A window of `lags`, one responsive chain point per 10 s slot ending 10 s before [`NOW`].
    fn window_of_lags(lags: &[u64]) -> Window {
        let mut window = window();
        let start = NOW - 10_000 * lags.len() as i64;
        for (i, lag) in lags.iter().enumerate() {
            window.record_chain(
                start + 10_000 * i as i64,
                ChainValues {
                    responsive: 1,
                    block_lag: *lag,
                    ..ChainValues::default()
                },
            );
        }
        window
    }

    fn run(input: &NodeInput<'_>, fleet: &FleetContext) -> Vec<Finding> {
        detect(input, fleet, &DetectPolicy::default())
    }

    #[test]
    fn lag_beyond_max_block_lag_is_a_warning() {
        let window = window();
        let chain = chain_at(1_000, 1_012);
        let input = NodeInput {
            chain: Some((NOW, &chain)),
            ..quiet_input(&window)
        };
        let findings = run(&input, &FleetContext::default());
        assert_eq!(findings.len(), 1, "{findings:?}");
        let f = &findings[0];
        assert_eq!(f.kind, FindingKind::BlockLag);
        assert_eq!(f.severity, Severity::Warning);
        assert!(f.score >= 0.5 && f.score < 0.6, "score {}", f.score);
        assert_eq!(f.evidence["lag"], "12");
        assert_eq!(f.evidence["tip_source"], "sync_state");
    }

    #[test]
    fn lag_at_three_times_max_is_critical() {
        let window = window();
        let chain = chain_at(1_000, 1_030);
        let input = NodeInput {
            chain: Some((NOW, &chain)),
            ..quiet_input(&window)
        };
        let findings = run(&input, &FleetContext::default());
        assert_eq!(findings[0].severity, Severity::Critical);
        assert!((findings[0].score - 1.0).abs() < 1e-9);
    }

    #[test]
    fn lag_at_max_block_lag_is_quiet() {
        let window = window();
        let chain = chain_at(1_000, 1_010);
        let input = NodeInput {
            chain: Some((NOW, &chain)),
            ..quiet_input(&window)
        };
        assert!(run(&input, &FleetContext::default()).is_empty());
    }

    #[test]
    fn fleet_tip_counts_when_the_node_thinks_it_is_synced() {
        let window = window();
        let chain = ChainSample {
            references: vec![ReferenceTip {
                responsive: false,
                best_block: 5_000,
                ..ReferenceTip::default()
            }],
            ..chain_at(1_000, 1_000)
        };
        let input = NodeInput {
            chain: Some((NOW, &chain)),
            ..quiet_input(&window)
        };
        let fleet = FleetContext {
            network_best_block: 1_020,
            network_median_peers: None,
            network_clock_delay_ms: None,
        };
        let findings = run(&input, &fleet);
        assert_eq!(findings.len(), 1, "{findings:?}");
        assert_eq!(findings[0].evidence["tip_source"], "fleet");
        assert_eq!(findings[0].evidence["tip"], "1020");
        // The unresponsive reference's 5 000 is ignored.
        assert_eq!(findings[0].evidence["lag"], "20");
    }

    #[test]
    fn responsive_reference_sets_the_tip() {
        let window = window();
        let chain = ChainSample {
            references: vec![ReferenceTip {
                responsive: true,
                best_block: 1_015,
                ..ReferenceTip::default()
            }],
            ..chain_at(1_000, 1_001)
        };
        let input = NodeInput {
            chain: Some((NOW, &chain)),
            ..quiet_input(&window)
        };
        let findings = run(&input, &FleetContext::default());
        assert_eq!(findings[0].evidence["tip_source"], "reference");
        assert_eq!(findings[0].evidence["lag"], "15");
    }

    #[test]
    fn unresponsive_node_is_left_to_rpc_unresponsive() {
        let window = window();
        let chain = ChainSample {
            responsive: false,
            ..chain_at(1_000, 2_000)
        };
        let input = NodeInput {
            chain: Some((NOW, &chain)),
            ..quiet_input(&window)
        };
        assert!(run(&input, &FleetContext::default()).is_empty());
    }

    #[test]
    fn node_ahead_of_the_tip_has_no_lag() {
        let window = window();
        let chain = chain_at(1_000, 990);
        let input = NodeInput {
            chain: Some((NOW, &chain)),
            ..quiet_input(&window)
        };
        assert!(run(&input, &FleetContext::default()).is_empty());
    }

    #[test]
    fn sudden_lag_below_max_is_an_outlier_against_a_steady_window() {
        let window = window_of_lags(&[0, 1, 0, 1, 0, 1, 0, 1]);
        let chain = chain_at(1_000, 1_006);
        let input = NodeInput {
            chain: Some((NOW, &chain)),
            ..quiet_input(&window)
        };
        let findings = run(&input, &FleetContext::default());
        assert_eq!(findings.len(), 1, "{findings:?}");
        assert_eq!(findings[0].severity, Severity::Warning);
        assert!(findings[0].score > 0.9, "score {}", findings[0].score);
        assert_eq!(findings[0].evidence["window_mean"], "0.50");
    }

    #[test]
    fn a_node_that_always_trails_the_fleet_a_little_is_not_an_outlier() {
        // Its own sources say it is at most a block behind, as its window does; the fleet's
        // best is 6 ahead, every time. Under the limit, and usual for it.
        let window = window_of_lags(&[0, 1, 0, 1, 0, 1, 0, 1]);
        let chain = chain_at(1_000, 1_001);
        let input = NodeInput {
            chain: Some((NOW, &chain)),
            ..quiet_input(&window)
        };
        let fleet = FleetContext {
            network_best_block: 1_006,
            ..FleetContext::default()
        };
        assert!(run(&input, &fleet).is_empty());
        // Falling behind its own sources too is still seen, and named by them.
        let behind = chain_at(1_000, 1_006);
        let input = NodeInput {
            chain: Some((NOW, &behind)),
            ..quiet_input(&window)
        };
        let findings = run(&input, &fleet);
        assert_eq!(findings.len(), 1, "{findings:?}");
        assert!(
            findings[0].summary.contains("sync_state tip 1006"),
            "{}",
            findings[0].summary
        );
        assert_eq!(findings[0].evidence["own_lag"], "6");
    }

    #[test]
    fn usual_lag_for_a_noisy_node_is_quiet() {
        let window = window_of_lags(&[0, 6, 1, 5, 2, 6, 0, 4]);
        let chain = chain_at(1_000, 1_006);
        let input = NodeInput {
            chain: Some((NOW, &chain)),
            ..quiet_input(&window)
        };
        assert!(run(&input, &FleetContext::default()).is_empty());
    }

    #[test]
    fn outlier_needs_six_window_points() {
        let window = window_of_lags(&[0, 0, 0, 0, 0]);
        let chain = chain_at(1_000, 1_006);
        let input = NodeInput {
            chain: Some((NOW, &chain)),
            ..quiet_input(&window)
        };
        assert!(run(&input, &FleetContext::default()).is_empty());
    }

    #[test]
    fn outlier_of_two_blocks_is_jitter() {
        let window = window_of_lags(&[0, 0, 0, 0, 0, 0, 0, 0]);
        let chain = chain_at(1_000, 1_002);
        let input = NodeInput {
            chain: Some((NOW, &chain)),
            ..quiet_input(&window)
        };
        assert!(run(&input, &FleetContext::default()).is_empty());
    }
}
