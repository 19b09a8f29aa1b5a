//! Owns the composite validator risk: one figure 0..=1 from a node's findings.
//!
//! risk = 1 - prod over findings of (1 - w(kind, severity) x score x s(severity)), where
//!
//! - w = 1.0 for chain health (`block_lag`, `frozen_head`, `finality_stall`,
//!   `syncing_too_long`, `rpc_unresponsive`, `agent_silent`) and for a critical `keystore`;
//!   0.6 for a non-critical `keystore`; 0.8 for `weights_stale`; 0.6 for hardware
//!   (`gpu_*`, `host_pressure`, `oom_kill`); 0.5 for storage and for `p2p_isolation`;
//!   0 for `fleet_degraded` (a network's problem, not the node's);
//! - s = 0.5 for info findings, 1 otherwise.
//!
//! Independent risks compound: two 0.5 risks make 0.75, never more than 1, and one finding
//! at full weight and score makes 1 on its own. A non-finite score counts as 0.

use super::{Finding, FindingKind, Severity};

/// Weight of a finding in the composite risk (see the module doc).
fn weight(kind: FindingKind, severity: Severity) -> f64 {
    match kind {
        FindingKind::BlockLag
        | FindingKind::FrozenHead
        | FindingKind::FinalityStall
        | FindingKind::SyncingTooLong
        | FindingKind::RpcUnresponsive
        | FindingKind::AgentSilent => 1.0,
        FindingKind::Keystore if severity == Severity::Critical => 1.0,
        FindingKind::Keystore => 0.6,
        FindingKind::WeightsStale => 0.8,
        FindingKind::GpuThermal
        | FindingKind::GpuErrors
        | FindingKind::GpuIdle
        | FindingKind::HostPressure
        | FindingKind::OomKill => 0.6,
        FindingKind::StorageSlow | FindingKind::StorageFull | FindingKind::P2pIsolation => 0.5,
        FindingKind::FleetDegraded => 0.0,
        FindingKind::ClockSkew => 0.5,
    }
}

/// Composite validator risk 0..=1 of one node's findings (0 with none).
pub fn score(findings: &[Finding]) -> f64 {
    let safe = findings
        .iter()
        .map(|f| {
            let score = if f.score.is_finite() {
                f.score.clamp(0.0, 1.0)
            } else {
                0.0
            };
            let severity = if f.severity == Severity::Info {
                0.5
            } else {
                1.0
            };
            1.0 - weight(f.kind, f.severity) * score * severity
        })
        .product::<f64>();
    (1.0 - safe).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finding(kind: FindingKind, severity: Severity, score: f64) -> Finding {
        Finding::new(kind, score, severity, "test", [])
    }

    #[test]
    fn no_findings_is_no_risk() {
        assert_eq!(score(&[]), 0.0);
    }

    #[test]
    fn full_chain_health_finding_is_full_risk() {
        let risk = score(&[finding(
            FindingKind::RpcUnresponsive,
            Severity::Critical,
            1.0,
        )]);
        assert!((risk - 1.0).abs() < 1e-9);
    }

    #[test]
    fn independent_risks_compound_but_stay_under_one() {
        let one = finding(FindingKind::BlockLag, Severity::Warning, 0.5);
        let risk = score(&[one.clone(), one]);
        assert!((risk - 0.75).abs() < 1e-9);
    }

    #[test]
    fn hardware_weighs_less_than_chain_health() {
        let gpu = score(&[finding(FindingKind::GpuThermal, Severity::Warning, 0.5)]);
        let lag = score(&[finding(FindingKind::BlockLag, Severity::Warning, 0.5)]);
        assert!((gpu - 0.3).abs() < 1e-9);
        assert!(gpu < lag);
    }

    #[test]
    fn info_findings_count_half() {
        let risk = score(&[finding(FindingKind::P2pIsolation, Severity::Info, 0.4)]);
        assert!((risk - 0.1).abs() < 1e-9);
    }

    #[test]
    fn keystore_on_disk_is_full_risk_but_loose_modes_are_not() {
        let critical = score(&[finding(FindingKind::Keystore, Severity::Critical, 1.0)]);
        let warning = score(&[finding(FindingKind::Keystore, Severity::Warning, 0.6)]);
        assert!((critical - 1.0).abs() < 1e-9);
        assert!((warning - 0.36).abs() < 1e-9);
    }

    #[test]
    fn fleet_findings_do_not_count() {
        let risk = score(&[finding(FindingKind::FleetDegraded, Severity::Critical, 1.0)]);
        assert_eq!(risk, 0.0);
    }

    #[test]
    fn nan_score_counts_as_zero() {
        let mut broken = finding(FindingKind::BlockLag, Severity::Critical, 1.0);
        broken.score = f64::NAN;
        assert_eq!(score(&[broken]), 0.0);
    }
}
