//! Owns `clock_skew`: how far the agent's clock is from the server's, estimated by the registry
//! from live batches (the newest sample's observed time against the batch's arrival; replay
//! bursts left out). Signed commands carry an issued-at and expires-at and agents allow 30 s
//! of skew: an agent clock off by more stops remediation with `expired` / `not yet valid`
//! refusals, so this finding comes first.
//!
//! - warning at |offset| > `clock_skew_warn_ms` (10 s), score 0.5..0.9;
//! - critical at |offset| >= `clock_skew_critical_ms` (25 s), score 1: commands are about
//!   to be refused.
//!
//! No estimate yet (fewer than three live batches) means no finding.
//!
//! A node is judged against its network's shared delay
//! ([`FleetContext::network_clock_delay_ms`]): when this server falls behind its agents'
//! batches, every clock looks behind by the time they waited, and that is not the agents'
//! fault. Seen at 10 000 agents on a saturated server: 2 850 `clock_skew` findings, none real.

use super::{DetectPolicy, Finding, FindingKind, FleetContext, NodeInput, Severity};

/// `clock_skew` findings for one node (at most one).
pub fn detect(input: &NodeInput<'_>, fleet: &FleetContext, policy: &DetectPolicy) -> Vec<Finding> {
    let Some(measured) = input.clock_offset_ms else {
        return Vec::new();
    };
    let shared_delay = fleet.network_clock_delay_ms.unwrap_or(0).min(0);
    let offset = measured - shared_delay;
    let skew = offset.unsigned_abs();
    let warn = policy.clock_skew_warn_ms.max(1);
    if skew <= warn {
        return Vec::new();
    }
    let critical = policy.clock_skew_critical_ms.max(warn + 1);
    let (severity, score) = if skew >= critical {
        (Severity::Critical, 1.0)
    } else {
        (
            Severity::Warning,
            0.5 + 0.4 * (skew - warn) as f64 / (critical - warn) as f64,
        )
    };
    let direction = if offset > 0 { "ahead of" } else { "behind" };
    vec![Finding::new(
        FindingKind::ClockSkew,
        score,
        severity,
        format!(
            "The agent's clock is about {:.1} s {direction} the server's; signed commands are refused beyond 30 s of skew (fix NTP on the host).",
            skew as f64 / 1000.0
        ),
        [
            ("offset_ms", offset.to_string()),
            ("measured_offset_ms", measured.to_string()),
            ("server_delay_ms", (-shared_delay).to_string()),
            ("warn_ms", warn.to_string()),
            ("critical_ms", critical.to_string()),
        ],
    )]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::Window;

    fn finding(offset: Option<i64>) -> Vec<Finding> {
        finding_in(offset, &FleetContext::default())
    }

    fn finding_in(offset: Option<i64>, fleet: &FleetContext) -> Vec<Finding> {
        let window = Window::new(1_800_000);
        let input = NodeInput {
            now_unix_ms: 0,
            connected: true,
            last_seen_unix_ms: 0,
            window: &window,
            host: None,
            chain: None,
            previous_chain: None,
            gpu: None,
            previous_gpu: None,
            keystore: None,
            keystore_changed_unix_ms: None,
            syncing_since_unix_ms: None,
            clock_offset_ms: offset,
        };
        detect(&input, fleet, &DetectPolicy::default())
    }

    #[test]
    fn skew_over_ten_seconds_warns_and_near_the_command_window_is_critical() {
        assert!(finding(None).is_empty());
        assert!(finding(Some(-9_000)).is_empty());
        let warn = finding(Some(-15_000));
        assert_eq!(warn[0].severity, Severity::Warning, "{warn:?}");
        assert!(warn[0].summary.contains("behind"));
        let critical = finding(Some(40_000));
        assert_eq!(critical[0].severity, Severity::Critical);
        assert!(critical[0].summary.contains("ahead of"));
        assert_eq!(critical[0].evidence["offset_ms"], "40000");
    }

    #[test]
    fn a_delay_every_node_of_the_network_shows_is_the_servers_not_the_agents() {
        // The server queues batches ~12 s: every clock looks 12 s behind.
        let slow = FleetContext {
            network_clock_delay_ms: Some(-12_000),
            ..FleetContext::default()
        };
        assert!(
            finding_in(Some(-14_000), &slow).is_empty(),
            "2 s of real skew"
        );
        assert!(
            !finding(Some(-14_000)).is_empty(),
            "without the fleet: a warning"
        );
        // A clock really 40 s behind still stands out, by its own 40 s.
        let behind = finding_in(Some(-52_000), &slow);
        assert_eq!(behind[0].severity, Severity::Critical);
        assert_eq!(behind[0].evidence["offset_ms"], "-40000");
        assert_eq!(behind[0].evidence["measured_offset_ms"], "-52000");
        assert_eq!(behind[0].evidence["server_delay_ms"], "12000");
        // So does one 30 s ahead, measured as 18 s ahead through the delay.
        let ahead = finding_in(Some(18_000), &slow);
        assert_eq!(ahead[0].evidence["offset_ms"], "30000");
        // A fleet ahead is never taken out: queueing cannot make samples newer.
        let ahead_fleet = FleetContext {
            network_clock_delay_ms: Some(20_000),
            ..FleetContext::default()
        };
        assert_eq!(
            finding_in(Some(20_000), &ahead_fleet)[0].evidence["offset_ms"],
            "20000"
        );
    }
}
