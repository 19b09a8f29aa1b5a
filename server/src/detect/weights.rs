//! Owns `weights_stale`: whether the validator's hotkey keeps setting weights on its subnet,
//! read from the newest chain sample's `standing`.
//!
//! The rule, with `since` = `blocks_since_last_update` and `stale` =
//! 2 x max(`weights_set_rate_limit_blocks`, `tempo_blocks`):
//!
//! - critical, score 1: `active` is false, or `since` >= `activity_cutoff_blocks` (the chain
//!   has stopped counting the validator: it loses its permit and its dividends);
//! - critical, score `since / cutoff` (0.8..1): `since` >= 0.8 x `activity_cutoff_blocks`;
//! - warning, score 0.3..0.8 (`since / (0.8 x cutoff)`): `since` > `stale`, i.e. two rate
//!   limits or two epochs went by without accepted weights;
//! - warning, score 0.6: a standing is configured but the hotkey has no UID on the subnet.
//!
//! No standing (none configured, or not read yet) means no finding. A zero `stale` or cutoff
//! (not read from the chain) disables the test that needs it.

use guardian_proto::v1::ValidatorStanding;

use super::{DetectPolicy, Finding, FindingKind, NodeInput, Severity};

/// Share of `activity_cutoff_blocks` at which staleness turns critical.
const CUTOFF_SHARE_CRITICAL: f64 = 0.8;

/// `weights_stale` findings for one node (at most one).
pub fn detect(input: &NodeInput<'_>, _policy: &DetectPolicy) -> Vec<Finding> {
    let Some(standing) = input.chain.and_then(|(_, chain)| chain.standing.as_ref()) else {
        return Vec::new();
    };
    if !standing.registered {
        return vec![Finding::new(
            FindingKind::WeightsStale,
            0.6,
            Severity::Warning,
            format!(
                "Hotkey {} is not registered on subnet {}: it cannot set weights.",
                standing.hotkey_ss58, standing.netuid
            ),
            [
                ("hotkey_ss58", standing.hotkey_ss58.clone()),
                ("netuid", standing.netuid.to_string()),
                ("registered", "false".to_owned()),
            ],
        )];
    }
    stale(standing).into_iter().collect()
}

fn stale(standing: &ValidatorStanding) -> Option<Finding> {
    let since = standing.blocks_since_last_update;
    let stale_after = standing
        .weights_set_rate_limit_blocks
        .max(u64::from(standing.tempo_blocks))
        .saturating_mul(2);
    let cutoff = u64::from(standing.activity_cutoff_blocks);
    let near_cutoff = cutoff as f64 * CUTOFF_SHARE_CRITICAL;

    let (severity, score, why) = if !standing.active {
        (
            Severity::Critical,
            1.0,
            "the chain marks it inactive".to_owned(),
        )
    } else if cutoff > 0 && since >= cutoff {
        (
            Severity::Critical,
            1.0,
            format!("past the activity cutoff of {cutoff} blocks"),
        )
    } else if cutoff > 0 && since as f64 >= near_cutoff {
        (
            Severity::Critical,
            since as f64 / cutoff as f64,
            format!("near the activity cutoff of {cutoff} blocks"),
        )
    } else if stale_after > 0 && since > stale_after {
        let score = if cutoff > 0 {
            (since as f64 / near_cutoff).clamp(0.3, 0.8)
        } else {
            0.5
        };
        (
            Severity::Warning,
            score,
            format!("over twice the rate limit / tempo ({stale_after} blocks)"),
        )
    } else {
        return None;
    };

    Some(Finding::new(
        FindingKind::WeightsStale,
        score,
        severity,
        format!(
            "Hotkey {} (uid {} on subnet {}) last set weights {since} blocks ago, {why}.",
            standing.hotkey_ss58, standing.uid, standing.netuid
        ),
        [
            ("hotkey_ss58", standing.hotkey_ss58.clone()),
            ("netuid", standing.netuid.to_string()),
            ("uid", standing.uid.to_string()),
            ("blocks_since_last_update", since.to_string()),
            ("last_update_block", standing.last_update_block.to_string()),
            ("stale_after_blocks", stale_after.to_string()),
            ("activity_cutoff_blocks", cutoff.to_string()),
            (
                "weights_set_rate_limit_blocks",
                standing.weights_set_rate_limit_blocks.to_string(),
            ),
            ("tempo_blocks", standing.tempo_blocks.to_string()),
            ("active", standing.active.to_string()),
            ("validator_permit", standing.validator_permit.to_string()),
        ],
    ))
}

#[cfg(test)]
mod tests {
    use guardian_proto::v1::ChainSample;

    use super::super::block_lag::tests::{NOW, chain_at, quiet_input, window};
    use super::*;

    /// A registered, active validator on a subnet with tempo 360, rate limit 100 and
    /// activity cutoff 5000, that last set weights `since` blocks ago.
    fn standing(since: u64) -> ValidatorStanding {
        ValidatorStanding {
            hotkey_ss58: "5F3sa2TJAWMqDhXG6jhV4N8ko9SxwGy8TpaNS1repo5EYjQX".to_owned(),
            netuid: 1,
            registered: true,
            uid: 7,
            last_update_block: 100_000 - since,
            blocks_since_last_update: since,
            validator_permit: true,
            active: true,
            weights_set_rate_limit_blocks: 100,
            activity_cutoff_blocks: 5_000,
            tempo_blocks: 360,
            read_at_block: 100_000,
            ..ValidatorStanding::default()
        }
    }

    fn run(standing: Option<ValidatorStanding>) -> Vec<Finding> {
        let window = window();
        let chain = ChainSample {
            standing,
            ..chain_at(100_000, 100_000)
        };
        let input = NodeInput {
            chain: Some((NOW, &chain)),
            ..quiet_input(&window)
        };
        detect(&input, &DetectPolicy::default())
    }

    #[test]
    fn weights_set_within_two_tempos_are_fresh() {
        assert!(run(Some(standing(720))).is_empty());
    }

    #[test]
    fn weights_older_than_two_tempos_are_a_warning() {
        let findings = run(Some(standing(721)));
        assert_eq!(findings.len(), 1, "{findings:?}");
        assert_eq!(findings[0].kind, FindingKind::WeightsStale);
        assert_eq!(findings[0].severity, Severity::Warning);
        assert!(findings[0].score >= 0.3, "score {}", findings[0].score);
        assert_eq!(findings[0].evidence["stale_after_blocks"], "720");
    }

    #[test]
    fn weights_near_the_activity_cutoff_are_critical() {
        let findings = run(Some(standing(4_000)));
        assert_eq!(findings[0].severity, Severity::Critical);
        assert!((findings[0].score - 0.8).abs() < 1e-9);
    }

    #[test]
    fn inactive_validator_is_critical_even_with_fresh_weights() {
        let findings = run(Some(ValidatorStanding {
            active: false,
            ..standing(10)
        }));
        assert_eq!(findings[0].severity, Severity::Critical);
        assert!((findings[0].score - 1.0).abs() < 1e-9);
    }

    #[test]
    fn unregistered_hotkey_is_a_warning() {
        let findings = run(Some(ValidatorStanding {
            registered: false,
            ..ValidatorStanding::default()
        }));
        assert_eq!(findings[0].severity, Severity::Warning);
        assert_eq!(findings[0].evidence["registered"], "false");
    }

    #[test]
    fn no_standing_configured_is_quiet() {
        assert!(run(None).is_empty());
    }

    #[test]
    fn unknown_subnet_parameters_do_not_fire() {
        let findings = run(Some(ValidatorStanding {
            weights_set_rate_limit_blocks: 0,
            tempo_blocks: 0,
            activity_cutoff_blocks: 0,
            ..standing(50_000)
        }));
        assert!(findings.is_empty(), "{findings:?}");
    }
}
