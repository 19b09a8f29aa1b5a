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

use super::{DetectPolicy, Finding, FindingKind, NodeInput, Severity};

/// `clock_skew` findings for one node (at most one).
pub fn detect(input: &NodeInput<'_>, policy: &DetectPolicy) -> Vec<Finding> {
    let Some(offset) = input.clock_offset_ms else {
        return Vec::new();
    };
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
        detect(&input, &DetectPolicy::default())
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
}
