//! Owns the chain-health findings besides lag: `frozen_head`, `finality_stall`,
//! `syncing_too_long`, `rpc_unresponsive` and `agent_silent`.
//!
//! - `frozen_head`: a responsive, non-syncing node whose best block has not moved for more
//!   than `frozen_head_ms`: its `head_age_ms`, or, when the best block equals the previous
//!   sample's, the time since that sample plus its head age (an agent restart resets the head
//!   age, not the head). Warning; critical at >= 3x.
//! - `finality_stall`: a responsive, non-syncing node with best - finalized >
//!   `max_finality_lag` that grew against the previous sample or the window's oldest point
//!   (whichever is lower). Warning; critical at >= 3x.
//! - `syncing_too_long`: syncing continuously for more than `syncing_too_long_minutes`.
//!   Warning; critical at >= 3x.
//! - `rpc_unresponsive`: the newest chain sample says the RPC did not answer. Critical, score 1.
//! - `agent_silent`: the server last heard from the agent more than `silent_after_ms` ago
//!   (connected or not). Warning; critical at >= 10x. A node never seen gets nothing.
//!
//! Scores ramp from 0.5 just past the threshold to 1.0 where the finding turns critical.

use guardian_proto::v1::ChainSample;

use super::{DetectPolicy, Finding, FindingKind, NodeInput, Severity};

/// Multiple of `silent_after_ms` at which a silent agent is critical.
const SILENT_CRITICAL_FACTOR: i64 = 10;

/// Consensus and liveness findings for one node.
pub fn detect(input: &NodeInput<'_>, policy: &DetectPolicy) -> Vec<Finding> {
    let mut findings = Vec::new();
    findings.extend(agent_silent(input, policy));
    if let Some((at, chain)) = input.chain {
        if chain.responsive {
            findings.extend(frozen_head(input, at, chain, policy));
            findings.extend(finality_stall(input, at, chain, policy));
        } else {
            findings.push(rpc_unresponsive(input, chain));
        }
    }
    findings.extend(syncing_too_long(input, policy));
    findings
}

/// 0.5 just past `limit`, rising linearly to 1.0 at `full`.
fn ramp(value: f64, limit: f64, full: f64) -> f64 {
    if full <= limit {
        return 1.0;
    }
    0.5 + 0.5 * ((value - limit) / (full - limit)).clamp(0.0, 1.0)
}

fn frozen_head(
    input: &NodeInput<'_>,
    at: i64,
    chain: &ChainSample,
    policy: &DetectPolicy,
) -> Option<Finding> {
    if chain.is_syncing {
        return None;
    }
    let mut frozen_ms = chain.head_age_ms;
    let mut basis = "head_age";
    if let Some((prev_at, prev)) = input.previous_chain
        && prev.responsive
        && prev.best_block == chain.best_block
        && prev_at < at
    {
        let since_prev = u64::try_from(at.saturating_sub(prev_at))
            .unwrap_or(0)
            .saturating_add(prev.head_age_ms);
        if since_prev > frozen_ms {
            frozen_ms = since_prev;
            basis = "unchanged_since_previous_sample";
        }
    }
    let limit = policy.frozen_head_ms.max(1);
    if frozen_ms <= limit {
        return None;
    }
    let severity = if frozen_ms >= limit.saturating_mul(3) {
        Severity::Critical
    } else {
        Severity::Warning
    };
    let score = ramp(frozen_ms as f64, limit as f64, limit as f64 * 3.0);
    Some(Finding::new(
        FindingKind::FrozenHead,
        score,
        severity,
        format!(
            "Best block {} has not moved for {} s although the node is not syncing (limit {} s).",
            chain.best_block,
            frozen_ms / 1000,
            limit / 1000
        ),
        [
            ("best_block", chain.best_block.to_string()),
            ("frozen_ms", frozen_ms.to_string()),
            ("head_age_ms", chain.head_age_ms.to_string()),
            ("frozen_head_ms", policy.frozen_head_ms.to_string()),
            ("basis", basis.to_owned()),
        ],
    ))
}

fn finality_stall(
    input: &NodeInput<'_>,
    at: i64,
    chain: &ChainSample,
    policy: &DetectPolicy,
) -> Option<Finding> {
    if chain.is_syncing {
        return None;
    }
    let lag = chain.best_block.saturating_sub(chain.finalized_block);
    let limit = policy.max_finality_lag.max(1);
    if lag <= limit {
        return None;
    }
    let previous = input
        .previous_chain
        .filter(|(t, p)| *t < at && p.responsive)
        .map(|(_, p)| p.best_block.saturating_sub(p.finalized_block));
    let oldest = input
        .window
        .chain()
        .iter()
        .find(|(t, v)| *t < at && v.responsive == 1)
        .map(|(_, v)| v.finality_lag_blocks);
    // Without any earlier figure growth cannot be told; a steady or shrinking lag is finality
    // keeping pace (or catching up), not a stall.
    let grew_from = previous.into_iter().chain(oldest).min()?;
    if lag <= grew_from {
        return None;
    }
    let severity = if lag >= limit.saturating_mul(3) {
        Severity::Critical
    } else {
        Severity::Warning
    };
    let score = ramp(lag as f64, limit as f64, limit as f64 * 3.0);
    Some(Finding::new(
        FindingKind::FinalityStall,
        score,
        severity,
        format!(
            "Finality is {lag} blocks behind best block {} (finalized {}), up from {grew_from}; \
             limit {}.",
            chain.best_block, chain.finalized_block, policy.max_finality_lag
        ),
        [
            ("finality_lag", lag.to_string()),
            ("best_block", chain.best_block.to_string()),
            ("finalized_block", chain.finalized_block.to_string()),
            ("grew_from", grew_from.to_string()),
            ("max_finality_lag", policy.max_finality_lag.to_string()),
        ],
    ))
}

fn syncing_too_long(input: &NodeInput<'_>, policy: &DetectPolicy) -> Option<Finding> {
    let since = input.syncing_since_unix_ms?;
    let syncing_ms = input.now_unix_ms.saturating_sub(since);
    let limit_ms = i64::try_from(policy.syncing_too_long_minutes.saturating_mul(60_000))
        .unwrap_or(i64::MAX)
        .max(1);
    if syncing_ms <= limit_ms {
        return None;
    }
    let severity = if syncing_ms >= limit_ms.saturating_mul(3) {
        Severity::Critical
    } else {
        Severity::Warning
    };
    let score = ramp(syncing_ms as f64, limit_ms as f64, limit_ms as f64 * 3.0);
    let mut evidence = vec![
        ("syncing_minutes", (syncing_ms / 60_000).to_string()),
        ("syncing_since_unix_ms", since.to_string()),
        (
            "syncing_too_long_minutes",
            policy.syncing_too_long_minutes.to_string(),
        ),
    ];
    let mut progress = String::new();
    if let Some((_, chain)) = input.chain {
        evidence.push(("best_block", chain.best_block.to_string()));
        evidence.push(("sync_highest_block", chain.sync_highest_block.to_string()));
        progress = format!(
            " (at block {} of {})",
            chain.best_block, chain.sync_highest_block
        );
    }
    Some(Finding::new(
        FindingKind::SyncingTooLong,
        score,
        severity,
        format!(
            "Node has been syncing for {} minutes{progress}, over the limit of {}.",
            syncing_ms / 60_000,
            policy.syncing_too_long_minutes
        ),
        evidence,
    ))
}

fn rpc_unresponsive(input: &NodeInput<'_>, chain: &ChainSample) -> Finding {
    // Consecutive unresponsive points at the end of the window: how long this has lasted.
    let unresponsive_points = input
        .window
        .chain()
        .iter()
        .rev()
        .take_while(|(_, v)| v.responsive == 0)
        .count();
    let error = if chain.error.is_empty() {
        "no reason given"
    } else {
        chain.error.as_str()
    };
    Finding::new(
        FindingKind::RpcUnresponsive,
        1.0,
        Severity::Critical,
        format!(
            "Node RPC at {} did not answer: {error} ({} reconnects so far).",
            chain.endpoint, chain.reconnects_total
        ),
        [
            ("endpoint", chain.endpoint.clone()),
            ("error", error.to_owned()),
            ("reconnects_total", chain.reconnects_total.to_string()),
            ("head_age_ms", chain.head_age_ms.to_string()),
            (
                "unresponsive_window_points",
                unresponsive_points.to_string(),
            ),
        ],
    )
}

fn agent_silent(input: &NodeInput<'_>, policy: &DetectPolicy) -> Option<Finding> {
    if input.last_seen_unix_ms <= 0 {
        return None;
    }
    let silent_ms = input.now_unix_ms.saturating_sub(input.last_seen_unix_ms);
    let limit = policy.silent_after_ms.max(1);
    if silent_ms <= limit {
        return None;
    }
    let full = limit.saturating_mul(SILENT_CRITICAL_FACTOR);
    let severity = if silent_ms >= full {
        Severity::Critical
    } else {
        Severity::Warning
    };
    let score = ramp(silent_ms as f64, limit as f64, full as f64);
    let state = if input.connected {
        "its stream is open but quiet"
    } else {
        "it is disconnected"
    };
    Some(Finding::new(
        FindingKind::AgentSilent,
        score,
        severity,
        format!(
            "No sample from the agent for {} s ({state}); limit {} s.",
            silent_ms / 1000,
            limit / 1000
        ),
        [
            ("silent_ms", silent_ms.to_string()),
            ("last_seen_unix_ms", input.last_seen_unix_ms.to_string()),
            ("connected", input.connected.to_string()),
            ("silent_after_ms", policy.silent_after_ms.to_string()),
        ],
    ))
}

#[cfg(test)]
mod tests {
    use super::super::block_lag::tests::{NOW, chain_at, quiet_input, window};
    use super::*;
    use crate::batch::values::ChainValues;

    fn kinds(findings: &[Finding]) -> Vec<FindingKind> {
        findings.iter().map(|f| f.kind).collect()
    }

    fn run(input: &NodeInput<'_>) -> Vec<Finding> {
        detect(input, &DetectPolicy::default())
    }

    #[test]
    fn healthy_node_is_quiet() {
        let window = window();
        let chain = chain_at(1_000, 1_000);
        let input = NodeInput {
            chain: Some((NOW, &chain)),
            ..quiet_input(&window)
        };
        assert!(run(&input).is_empty());
    }

    #[test]
    fn head_frozen_on_a_synced_node_is_a_warning() {
        let window = window();
        let chain = ChainSample {
            head_age_ms: 90_000,
            ..chain_at(1_000, 1_000)
        };
        let input = NodeInput {
            chain: Some((NOW, &chain)),
            ..quiet_input(&window)
        };
        let findings = run(&input);
        assert_eq!(kinds(&findings), vec![FindingKind::FrozenHead]);
        assert_eq!(findings[0].severity, Severity::Warning);
        assert!((findings[0].score - 0.625).abs() < 1e-9);
        assert_eq!(findings[0].evidence["frozen_ms"], "90000");
    }

    #[test]
    fn head_frozen_for_three_minutes_is_critical() {
        let window = window();
        let chain = ChainSample {
            head_age_ms: 180_000,
            ..chain_at(1_000, 1_000)
        };
        let input = NodeInput {
            chain: Some((NOW, &chain)),
            ..quiet_input(&window)
        };
        assert_eq!(run(&input)[0].severity, Severity::Critical);
    }

    #[test]
    fn old_head_while_syncing_is_not_frozen() {
        let window = window();
        let chain = ChainSample {
            head_age_ms: 600_000,
            is_syncing: true,
            ..chain_at(1_000, 1_000)
        };
        let input = NodeInput {
            chain: Some((NOW, &chain)),
            ..quiet_input(&window)
        };
        assert!(run(&input).is_empty());
    }

    #[test]
    fn head_unchanged_across_an_agent_restart_is_frozen() {
        let window = window();
        // The restarted agent's head age starts again from zero; the head did not move.
        let previous = ChainSample {
            head_age_ms: 40_000,
            ..chain_at(1_000, 1_000)
        };
        let chain = ChainSample {
            head_age_ms: 1_000,
            ..chain_at(1_000, 1_000)
        };
        let input = NodeInput {
            chain: Some((NOW, &chain)),
            previous_chain: Some((NOW - 30_000, &previous)),
            ..quiet_input(&window)
        };
        let findings = run(&input);
        assert_eq!(kinds(&findings), vec![FindingKind::FrozenHead]);
        assert_eq!(findings[0].evidence["frozen_ms"], "70000");
        assert_eq!(
            findings[0].evidence["basis"],
            "unchanged_since_previous_sample"
        );
    }

    fn window_of_finality_lags(lags: &[u64]) -> crate::window::Window {
        let mut window = window();
        let start = NOW - 10_000 * lags.len() as i64;
        for (i, lag) in lags.iter().enumerate() {
            window.record_chain(
                start + 10_000 * i as i64,
                ChainValues {
                    responsive: 1,
                    finality_lag_blocks: *lag,
                    ..ChainValues::default()
                },
            );
        }
        window
    }

    #[test]
    fn finality_lag_growing_beyond_the_policy_is_a_stall() {
        let window = window_of_finality_lags(&[2, 2, 10, 20, 30, 38]);
        let previous = ChainSample {
            finalized_block: 1_000,
            ..chain_at(1_038, 1_038)
        };
        let chain = ChainSample {
            finalized_block: 1_000,
            ..chain_at(1_040, 1_040)
        };
        let input = NodeInput {
            chain: Some((NOW, &chain)),
            previous_chain: Some((NOW - 12_000, &previous)),
            ..quiet_input(&window)
        };
        let findings = run(&input);
        assert_eq!(kinds(&findings), vec![FindingKind::FinalityStall]);
        assert_eq!(findings[0].severity, Severity::Warning);
        assert_eq!(findings[0].evidence["finality_lag"], "40");
        assert_eq!(findings[0].evidence["grew_from"], "2");
    }

    #[test]
    fn steady_finality_lag_is_not_a_stall() {
        let window = window_of_finality_lags(&[40, 40, 40, 40, 40, 40]);
        let previous = ChainSample {
            finalized_block: 1_000,
            ..chain_at(1_040, 1_040)
        };
        let chain = ChainSample {
            finalized_block: 1_001,
            ..chain_at(1_041, 1_041)
        };
        let input = NodeInput {
            chain: Some((NOW, &chain)),
            previous_chain: Some((NOW - 12_000, &previous)),
            ..quiet_input(&window)
        };
        assert!(run(&input).is_empty());
    }

    #[test]
    fn finality_lag_within_the_policy_is_quiet() {
        let window = window_of_finality_lags(&[2, 2, 2, 2, 2, 2]);
        let chain = ChainSample {
            finalized_block: 1_010,
            ..chain_at(1_040, 1_040)
        };
        let input = NodeInput {
            chain: Some((NOW, &chain)),
            ..quiet_input(&window)
        };
        assert!(run(&input).is_empty());
    }

    #[test]
    fn syncing_beyond_the_limit_is_syncing_too_long() {
        let window = window();
        let chain = ChainSample {
            is_syncing: true,
            ..chain_at(500_000, 4_000_000)
        };
        let input = NodeInput {
            chain: Some((NOW, &chain)),
            syncing_since_unix_ms: Some(NOW - 150 * 60_000),
            ..quiet_input(&window)
        };
        let findings = run(&input);
        assert_eq!(kinds(&findings), vec![FindingKind::SyncingTooLong]);
        assert_eq!(findings[0].severity, Severity::Warning);
        assert_eq!(findings[0].evidence["syncing_minutes"], "150");
        assert_eq!(findings[0].evidence["sync_highest_block"], "4000000");
    }

    #[test]
    fn syncing_within_the_limit_is_quiet() {
        let window = window();
        let input = NodeInput {
            syncing_since_unix_ms: Some(NOW - 119 * 60_000),
            ..quiet_input(&window)
        };
        assert!(run(&input).is_empty());
    }

    #[test]
    fn unresponsive_rpc_is_critical_with_its_error() {
        let mut window = window();
        for i in 1..=3 {
            window.record_chain(NOW - 30_000 + 10_000 * i, ChainValues::default());
        }
        let chain = ChainSample {
            endpoint: "ws://127.0.0.1:9944".to_owned(),
            responsive: false,
            error: "timed out after 2000 ms".to_owned(),
            head_age_ms: 600_000,
            ..ChainSample::default()
        };
        let input = NodeInput {
            chain: Some((NOW, &chain)),
            ..quiet_input(&window)
        };
        let findings = run(&input);
        // Only the RPC finding: an unresponsive node's head age says nothing about its head.
        assert_eq!(kinds(&findings), vec![FindingKind::RpcUnresponsive]);
        assert_eq!(findings[0].severity, Severity::Critical);
        assert_eq!(findings[0].evidence["error"], "timed out after 2000 ms");
        assert_eq!(findings[0].evidence["unresponsive_window_points"], "3");
        assert!(findings[0].summary.contains("timed out after 2000 ms"));
    }

    #[test]
    fn silent_agent_is_a_warning_then_critical() {
        let window = window();
        let input = NodeInput {
            connected: false,
            last_seen_unix_ms: NOW - 45_000,
            ..quiet_input(&window)
        };
        let findings = run(&input);
        assert_eq!(kinds(&findings), vec![FindingKind::AgentSilent]);
        assert_eq!(findings[0].severity, Severity::Warning);
        assert_eq!(findings[0].evidence["connected"], "false");

        let input = NodeInput {
            last_seen_unix_ms: NOW - 300_000,
            ..input
        };
        assert_eq!(run(&input)[0].severity, Severity::Critical);
    }

    #[test]
    fn connected_but_stuck_agent_is_silent() {
        let window = window();
        let input = NodeInput {
            connected: true,
            last_seen_unix_ms: NOW - 31_000,
            ..quiet_input(&window)
        };
        assert_eq!(kinds(&run(&input)), vec![FindingKind::AgentSilent]);
    }

    #[test]
    fn agent_heard_from_within_the_limit_is_quiet() {
        let window = window();
        let input = NodeInput {
            connected: false,
            last_seen_unix_ms: NOW - 30_000,
            ..quiet_input(&window)
        };
        assert!(run(&input).is_empty());
    }

    #[test]
    fn node_never_seen_is_not_silent() {
        let window = window();
        let input = NodeInput {
            connected: false,
            last_seen_unix_ms: 0,
            ..quiet_input(&window)
        };
        assert!(run(&input).is_empty());
    }
}
