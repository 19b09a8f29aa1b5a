//! Owns observation: what one evaluation of a node sees, derived from its newest chain sample,
//! its findings and its recent lag, as the [`Observation`] that [`plan`](super::plan) decides
//! on. Pure: the control loop gathers the inputs and keeps the [`LagHistory`].

use std::collections::VecDeque;

use guardian_proto::v1::ChainSample;

use super::{NodeState, Observation, Phase, Plan, PlannedAction};
use crate::batch::values::reference_tip;
use crate::detect::{Finding, FindingKind, Severity};

/// A node's newest chain figures as the reconciler judges them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChainView {
    /// Whether any chain sample exists (false -> `pending`).
    pub has_chain: bool,
    /// Lag against the reference tip (0 when the node did not answer).
    pub block_lag: u64,
    /// The node says it is syncing (and answered).
    pub says_syncing: bool,
    /// When the newest chain sample was observed (Unix ms).
    pub at_unix_ms: Option<i64>,
}

impl ChainView {
    /// The view of the newest chain sample (`(observed at, sample)`), judged against the
    /// reference tip ([`reference_tip`]) with `network_best_block` as the fleet's tip.
    pub fn of(chain: Option<(i64, &ChainSample)>, network_best_block: u64) -> Self {
        let at_unix_ms = chain.map(|(at, _)| at);
        match chain {
            Some((_, chain)) if chain.responsive => Self {
                has_chain: true,
                block_lag: reference_tip(chain, network_best_block).lag(chain.best_block),
                says_syncing: chain.is_syncing,
                at_unix_ms,
            },
            Some(_) => Self {
                has_chain: true,
                at_unix_ms,
                ..Self::default()
            },
            None => Self::default(),
        }
    }
}

/// What [`observe`] needs besides the node's findings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Context {
    /// Evaluation time.
    pub now_unix_ms: i64,
    /// The node's phase before this evaluation.
    pub phase: Phase,
    /// The node's chain view.
    pub chain: ChainView,
    /// Whether its lag shrinks over a probe interval ([`LagHistory::progressing`]).
    pub progressing: bool,
    /// Whether a new batch brought this evaluation (false: a tick).
    pub fresh: bool,
    /// A chain sample older than this is stale (`[detect] silent_after_ms`).
    pub silent_after_ms: i64,
    /// The node's `max_block_lag`.
    pub max_block_lag: u64,
    /// Fleet correlation holds per-node remediation on the node's network.
    pub fleet_hold: bool,
    /// Remediations in flight across the fleet, this node excluded.
    pub fleet_in_flight: usize,
    /// Fleet-wide cap on concurrent remediations.
    pub fleet_max_in_flight: usize,
}

/// The observation of one node from its findings and `context`.
///
/// - Catching up (`syncing`) is expected only before the node was ever synced and after a
///   remediation, and only while the lag shrinks and the head is not frozen: a synced node
///   that falls behind is degraded even if it says syncing.
/// - A z-score `block_lag` under `max_block_lag` is an early warning, not a reason to
///   restart; nor is a lag while catching up.
/// - A critical keystore finding blocks every command.
/// - A tick, or a chain sample older than `silent_after_ms` (a replayed spool), is stale:
///   it informs the record, not an action.
pub fn observe(findings: &[Finding], context: &Context) -> Observation {
    let frozen = findings.iter().any(|f| f.kind == FindingKind::FrozenHead);
    let syncing = context.chain.says_syncing
        && !frozen
        && context.progressing
        && matches!(
            context.phase,
            Phase::Pending | Phase::Syncing | Phase::Recovering
        );
    let lag = context.chain.block_lag;
    let remediable: Vec<FindingKind> = findings
        .iter()
        .filter(|f| f.kind.remediable())
        .filter(|f| f.kind != FindingKind::BlockLag || lag > context.max_block_lag)
        .filter(|f| !(syncing && f.kind == FindingKind::BlockLag))
        .map(|f| f.kind)
        .collect();
    Observation {
        now_unix_ms: context.now_unix_ms,
        has_chain: context.chain.has_chain,
        block_lag: lag,
        syncing,
        remediable,
        silent: findings.iter().any(|f| f.kind == FindingKind::AgentSilent),
        blocked_by: findings
            .iter()
            .find(|f| f.kind == FindingKind::Keystore && f.severity == Severity::Critical)
            .map(|f| f.kind),
        stale: !context.fresh
            || context
                .chain
                .at_unix_ms
                .is_some_and(|at| context.now_unix_ms - at > context.silent_after_ms),
        fleet_hold: context.fleet_hold,
        fleet_in_flight: context.fleet_in_flight,
        fleet_max_in_flight: context.fleet_max_in_flight,
    }
}

/// A node's lag per fresh sample over the last two probe intervals: is it catching up?
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LagHistory(VecDeque<(i64, u64)>);

impl LagHistory {
    /// Records `lag` at `now` when `fresh` (a new sample), forgets what is older than two
    /// probe intervals, and says whether the node is catching up: its lag is lower than one
    /// probe interval ago, or there is not a probe interval of history yet.
    pub fn progressing(&mut self, now: i64, lag: u64, probe_ms: i64, fresh: bool) -> bool {
        if fresh {
            self.0.push_back((now, lag));
            while self
                .0
                .front()
                .is_some_and(|(at, _)| *at < now - 2 * probe_ms)
            {
                self.0.pop_front();
            }
        }
        let probe_ago = self
            .0
            .iter()
            .rev()
            .find(|(at, _)| *at <= now - probe_ms)
            .map(|(_, lag)| *lag);
        probe_ago.is_none_or(|then| lag < then)
    }
}

/// A plan that wants a command on a server that cannot sign one: no attempt is spent and no
/// phase of recovery is claimed; the node is degraded and a human is told once.
pub fn without_commands(before: &NodeState, plan: Plan, now: i64) -> Plan {
    let mut next = plan.next;
    next.attempts = before.attempts;
    next.last_action_unix_ms = before.last_action_unix_ms;
    next.phase = Phase::Degraded;
    if before.phase != Phase::Degraded {
        next.phase_since_unix_ms = now;
    }
    let actions = if before.phase == Phase::Degraded {
        Vec::new()
    } else {
        vec![PlannedAction::Alert {
            message: format!(
                "{}; but remote commands are off on this server (command_signing_key_file), so nothing was sent",
                plan.reason
            ),
        }]
    };
    Plan {
        next,
        actions,
        reason: format!("{} (not sent: remote commands are off)", plan.reason),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use guardian_proto::v1::ReferenceTip;

    use super::super::Action;
    use super::*;

    fn finding(kind: FindingKind, severity: Severity) -> Finding {
        Finding {
            kind,
            severity,
            score: 1.0,
            summary: String::new(),
            evidence: BTreeMap::new(),
        }
    }

    fn context(phase: Phase, lag: u64, says_syncing: bool) -> Context {
        Context {
            now_unix_ms: 100_000,
            phase,
            chain: ChainView {
                has_chain: true,
                block_lag: lag,
                says_syncing,
                at_unix_ms: Some(99_000),
            },
            progressing: true,
            fresh: true,
            silent_after_ms: 30_000,
            max_block_lag: 10,
            fleet_hold: false,
            fleet_in_flight: 0,
            fleet_max_in_flight: 5,
        }
    }

    #[test]
    fn chain_view_lags_behind_the_best_source_and_an_unresponsive_node_has_no_lag() {
        let chain = ChainSample {
            responsive: true,
            best_block: 100,
            sync_highest_block: 104,
            is_syncing: true,
            references: vec![ReferenceTip {
                best_block: 108,
                responsive: true,
                ..ReferenceTip::default()
            }],
            ..ChainSample::default()
        };
        let view = ChainView::of(Some((5, &chain)), 112);
        assert_eq!(
            view,
            ChainView {
                has_chain: true,
                block_lag: 12,
                says_syncing: true,
                at_unix_ms: Some(5)
            }
        );
        assert_eq!(ChainView::of(Some((5, &chain)), 0).block_lag, 8);
        let silent = ChainSample {
            responsive: false,
            ..chain
        };
        let view = ChainView::of(Some((7, &silent)), 112);
        assert!(view.has_chain && view.block_lag == 0 && !view.says_syncing);
        assert!(!ChainView::of(None, 112).has_chain);
    }

    #[test]
    fn a_lag_under_the_limit_or_while_catching_up_is_not_remediable() {
        let lag = [finding(FindingKind::BlockLag, Severity::Warning)];
        assert!(
            observe(&lag, &context(Phase::Synced, 5, false))
                .remediable
                .is_empty()
        );
        assert_eq!(
            observe(&lag, &context(Phase::Synced, 50, false)).remediable,
            [FindingKind::BlockLag]
        );
        // A synced node that falls behind is degraded even if it says syncing.
        let synced = observe(&lag, &context(Phase::Synced, 50, true));
        assert!(!synced.syncing);
        assert_eq!(synced.remediable, [FindingKind::BlockLag]);
        let recovering = observe(&lag, &context(Phase::Recovering, 50, true));
        assert!(recovering.syncing && recovering.remediable.is_empty());
        // Not while the head is frozen, nor while the lag does not shrink.
        let frozen = [
            finding(FindingKind::BlockLag, Severity::Warning),
            finding(FindingKind::FrozenHead, Severity::Critical),
        ];
        assert!(!observe(&frozen, &context(Phase::Recovering, 50, true)).syncing);
        let stuck = Context {
            progressing: false,
            ..context(Phase::Recovering, 50, true)
        };
        assert!(!observe(&lag, &stuck).syncing);
    }

    #[test]
    fn a_critical_keystore_blocks_and_ticks_or_old_samples_are_stale() {
        let findings = [
            finding(FindingKind::Keystore, Severity::Critical),
            finding(FindingKind::AgentSilent, Severity::Warning),
        ];
        let seen = observe(&findings, &context(Phase::Synced, 0, false));
        assert_eq!(seen.blocked_by, Some(FindingKind::Keystore));
        assert!(seen.silent && !seen.stale);
        let warning = [finding(FindingKind::Keystore, Severity::Warning)];
        assert_eq!(
            observe(&warning, &context(Phase::Synced, 0, false)).blocked_by,
            None
        );
        let tick = Context {
            fresh: false,
            ..context(Phase::Synced, 0, false)
        };
        assert!(observe(&[], &tick).stale);
        let mut replayed = context(Phase::Synced, 0, false);
        replayed.chain.at_unix_ms = Some(replayed.now_unix_ms - 30_001);
        assert!(observe(&[], &replayed).stale);
    }

    #[test]
    fn lag_history_says_progressing_only_while_the_lag_shrinks_over_a_probe() {
        let mut history = LagHistory::default();
        assert!(history.progressing(0, 50, 1_000, true), "no history yet");
        assert!(history.progressing(1_000, 40, 1_000, true));
        assert!(
            !history.progressing(2_000, 45, 1_000, true),
            "worse than 1 s ago"
        );
        // A tick records nothing and compares with what is there.
        assert!(history.progressing(2_500, 30, 1_000, false));
        assert_eq!(history.0.len(), 3);
        history.progressing(10_000, 30, 1_000, true);
        assert_eq!(history.0.len(), 1, "older than two probes is forgotten");
    }

    #[test]
    fn without_a_signing_key_no_attempt_is_spent_and_one_alert_is_raised() {
        let before = NodeState {
            phase: Phase::Synced,
            attempts: 1,
            last_action_unix_ms: 5,
            ..NodeState::default()
        };
        let wanted = Plan {
            next: NodeState {
                phase: Phase::Recovering,
                attempts: 2,
                last_action_unix_ms: 100,
                ..before.clone()
            },
            actions: vec![PlannedAction::Command {
                action: Action::RestartUnit,
                parameters: BTreeMap::from([("unit".to_owned(), "subtensor.service".to_owned())]),
            }],
            reason: "degraded for 2 evaluations".to_owned(),
        };
        let plan = without_commands(&before, wanted.clone(), 100);
        assert_eq!(plan.next.phase, Phase::Degraded);
        assert_eq!(plan.next.attempts, 1, "no attempt spent");
        assert_eq!(plan.next.last_action_unix_ms, 5, "no cooldown started");
        assert!(matches!(
            plan.actions.as_slice(),
            [PlannedAction::Alert { .. }]
        ));
        // Already degraded: no second alert.
        let again = without_commands(&plan.next, wanted, 200);
        assert!(again.actions.is_empty());
        assert!(!again.is_decision(&plan.next));
    }
}
