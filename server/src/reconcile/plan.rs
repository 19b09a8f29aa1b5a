//! Decides one node's next [`Phase`] and actions from its state, one observation and its
//! [`SyncPolicy`]: the pure half of the reconciler (no clocks, no I/O, no panics).
//!
//! # Evaluation
//!
//! Every call is one evaluation. It is **bad** when the agent is silent, when a remediable
//! finding counts, or when a sync has overrun `sync_timeout_minutes`; otherwise it is
//! **good**. A bad evaluation increments `bad_streak` and zeroes `good_streak`, a good one the
//! reverse, in every phase (paused and cordoned included), so hysteresis survives a pause.
//!
//! While the node says it is syncing inside its sync window, the lag findings
//! (`block_lag`, `finality_stall`) are expected and do not count; every other remediable kind
//! (`frozen_head`, `rpc_unresponsive`, the detector's own `syncing_too_long`) still does.
//! The sync window starts at:
//!
//! | phase                          | window starts           |
//! |--------------------------------|-------------------------|
//! | `pending`, `synced`, `paused`  | now (a sync begins)     |
//! | `syncing`                      | `phase_since_unix_ms`   |
//! | `recovering`                   | `last_action_unix_ms`   |
//! | `degraded`, `failed`, `cordoned` | none: lag always counts |
//!
//! A `degraded` node that starts syncing therefore does not get a fresh window, so a node
//! that never catches up cannot loop between `syncing` and `degraded` without being acted on.
//!
//! **Confirmed** bad: the evaluation is bad and `bad_streak >= confirm_samples`.
//! **Recovered**: the evaluation is good, the node is not syncing, chain figures exist and
//! `good_streak >= recover_samples`.
//!
//! # Transition table
//!
//! Rows are tried top to bottom; the first that matches decides.
//!
//! | from                     | when                                   | to           | actions |
//! |--------------------------|----------------------------------------|--------------|---------|
//! | any                      | `state.paused`                         | `paused`     | none    |
//! | `cordoned`               | always (operator resume sets `pending`) | `cordoned`  | none    |
//! | `pending`, `paused`¹     | no chain figures yet (even if silent)² | `pending`    | none    |
//! | `pending`, `paused`¹     | confirmed bad                          | *remediate*  |         |
//! | `pending`, `paused`¹     | bad, not confirmed                     | `pending`    | none    |
//! | `pending`, `paused`¹     | good, syncing                          | `syncing`    | none    |
//! | `pending`, `paused`¹     | good, not syncing                      | `synced`     | none    |
//! | `synced`                 | confirmed bad                          | *remediate*  |         |
//! | `synced`                 | bad, not confirmed                     | `synced`     | none    |
//! | `synced`                 | good, syncing with lag findings        | `syncing`    | none    |
//! | `synced`                 | otherwise                              | `synced`     | none    |
//! | `syncing`                | confirmed bad (incl. window overrun)   | *remediate*  |         |
//! | `syncing`                | bad, not confirmed                     | `syncing`    | none    |
//! | `syncing`                | good, syncing                          | `syncing`    | none    |
//! | `syncing`                | good, not syncing, chain figures       | `synced`     | none    |
//! | `degraded`               | confirmed bad                          | *remediate*  |         |
//! | `degraded`               | recovered                              | `synced`     | none    |
//! | `degraded`               | otherwise                              | `degraded`   | none    |
//! | `recovering`             | within `probe_interval_seconds` of the action | `recovering` | none |
//! | `recovering`             | confirmed bad (incl. window overrun)   | *remediate*  |         |
//! | `recovering`             | recovered                              | `synced`     | none    |
//! | `recovering`             | otherwise (catching up, or not enough good) | `recovering` | none |
//! | `failed`                 | recovered                              | `synced`     | none    |
//! | `failed`                 | otherwise                              | `failed`     | none    |
//!
//! ¹ `paused` with `state.paused` cleared: the runner resumed it, so it is judged afresh.
//! ² A node never seen with chain figures has nothing to compare and nothing known to
//!   restart; its `agent_silent` finding alerts on its own. It stays `pending`.
//!
//! *Remediate* (a confirmed bad evaluation), first match decides:
//!
//! | when                                           | to           | actions                      |
//! |------------------------------------------------|--------------|------------------------------|
//! | agent silent                                   | `degraded`   | alert on entering `degraded` |
//! | `blocked_by` a critical kind (keystore)        | `degraded`   | alert on entering `degraded` |
//! | `fleet_hold`                                   | `degraded`   | none (the fleet finding alerts) |
//! | strategy `cordon-and-alert`                    | `cordoned`   | alert                        |
//! | `attempts >= max_restart_attempts`             | `failed`     | alert                        |
//! | last action under `probe_interval_seconds` ago | `degraded`   | none (cooldown)              |
//! | `fleet_in_flight >= fleet_max_in_flight`       | `degraded`   | none (fleet cap)             |
//! | the policy names no unit/container/hook        | `degraded`   | alert on entering `degraded` |
//! | otherwise                                      | `recovering` | command; `attempts += 1`, `last_action_unix_ms = now` |
//!
//! The command is `restart-container {container}` when `restart_container` is set, else
//! `restart-unit {unit}` (strategy `restart`), or `run-hook {hook: snapshot_hook}`
//! (strategy `snapshot-restore`).
//!
//! # Guarantees
//! - Never a command while paused, cordoned, failed, silent, blocked or held by the fleet.
//! - At most one command per `probe_interval_seconds`, and at most `max_restart_attempts`
//!   commands until the budget resets: `attempts` returns to 0 (phase unchanged) on an
//!   evaluation that finds the node `synced` for at least `stable_reset_seconds`.
//! - `phase_since_unix_ms` is `now` exactly when the phase changes.
//! - `reason` is always one sentence with the figures (lag, attempts n/max, the kinds).
//! - A `fleet_max_in_flight` of 0 allows no remediation at all (the cap is taken literally).

use std::collections::BTreeMap;

use super::Action;
use super::{NodeState, Observation, Phase, Plan, PlannedAction, RecoveryStrategy, SyncPolicy};
use crate::detect::FindingKind;

const MS_PER_SECOND: i64 = 1_000;
const MS_PER_MINUTE: i64 = 60_000;

/// Decides the next state and actions for one node. Pure: the same inputs always give the
/// same plan, and `observation.now_unix_ms` is the only clock.
pub fn plan(state: &NodeState, observation: &Observation, policy: &SyncPolicy) -> Plan {
    let now = observation.now_unix_ms;
    let eval = Evaluation::of(state, observation, policy);

    let mut next = state.clone();
    // Hysteresis counts samples: an evaluation on a tick without a new sample (cooldowns,
    // budgets) does not move the streaks, except silence, which is measured in time.
    let new_evidence = !observation.stale || observation.silent;
    if new_evidence && eval.bad {
        next.bad_streak = next.bad_streak.saturating_add(1);
        next.good_streak = 0;
    } else if new_evidence {
        next.good_streak = next.good_streak.saturating_add(1);
        next.bad_streak = 0;
    }
    let budget_reset = budget_reset(state, now, policy);
    if budget_reset.is_some() {
        next.attempts = 0;
    }

    let step = Step {
        before: state,
        next: &next,
        obs: observation,
        policy,
        eval: &eval,
    };
    let mut outcome = step.decide();
    if let Some((was, synced_ms)) = budget_reset {
        outcome.reason.push_str(&format!(
            "; attempt budget reset after {} min synced (was {was}/{})",
            synced_ms / MS_PER_MINUTE,
            policy.max_restart_attempts
        ));
    }

    if outcome.acted {
        next.attempts = next.attempts.saturating_add(1);
        next.last_action_unix_ms = now;
    }
    if outcome.phase != state.phase {
        next.phase = outcome.phase;
        next.phase_since_unix_ms = now;
    }
    Plan {
        next,
        actions: outcome.actions,
        reason: outcome.reason,
    }
}

/// `Some((attempts before, ms synced))` when this evaluation resets the attempt budget: the
/// node has been `synced` for `stable_reset_seconds` and has attempts to forget.
fn budget_reset(state: &NodeState, now: i64, policy: &SyncPolicy) -> Option<(u32, i64)> {
    let synced_ms = now.saturating_sub(state.phase_since_unix_ms);
    let stable_ms = i64::from(policy.stable_reset_seconds) * 1000;
    (state.phase == Phase::Synced && state.attempts > 0 && synced_ms >= stable_ms)
        .then_some((state.attempts, synced_ms))
}

/// Kinds that only say "behind": expected while a sync is in its window.
fn excused_while_syncing(kind: FindingKind) -> bool {
    matches!(kind, FindingKind::BlockLag | FindingKind::FinalityStall)
}

/// Where the node stands against its sync window.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Sync {
    /// The node does not say it is syncing.
    No,
    /// Syncing, `elapsed_ms` into a window that is still open.
    Within { elapsed_ms: i64 },
    /// Syncing past `sync_timeout_minutes`: counts as bad.
    Overdue { elapsed_ms: i64 },
    /// Syncing in a phase without a window (degraded, failed, cordoned): no excuse.
    Unexcused,
}

/// One evaluation, classified.
struct Evaluation {
    /// Remediable kinds that count against the node.
    counted: Vec<FindingKind>,
    /// Remediable kinds excused by a sync in its window.
    excused: Vec<FindingKind>,
    sync: Sync,
    silent: bool,
    bad: bool,
}

impl Evaluation {
    fn of(state: &NodeState, obs: &Observation, policy: &SyncPolicy) -> Self {
        let now = obs.now_unix_ms;
        let window_start = match state.phase {
            Phase::Pending | Phase::Synced | Phase::Paused => Some(now),
            Phase::Syncing => Some(state.phase_since_unix_ms),
            Phase::Recovering => Some(state.last_action_unix_ms),
            Phase::Degraded | Phase::Failed | Phase::Cordoned => None,
        };
        let timeout_ms = i64::from(policy.sync_timeout_minutes) * MS_PER_MINUTE;
        let sync = match (obs.syncing, window_start) {
            (false, _) => Sync::No,
            (true, None) => Sync::Unexcused,
            (true, Some(start)) => {
                let elapsed_ms = now.saturating_sub(start);
                if elapsed_ms < timeout_ms {
                    Sync::Within { elapsed_ms }
                } else {
                    Sync::Overdue { elapsed_ms }
                }
            }
        };
        let in_window = matches!(sync, Sync::Within { .. });
        let (excused, counted): (Vec<_>, Vec<_>) = obs
            .remediable
            .iter()
            .copied()
            .partition(|kind| in_window && excused_while_syncing(*kind));
        let bad = obs.silent || !counted.is_empty() || matches!(sync, Sync::Overdue { .. });
        Self {
            counted,
            excused,
            sync,
            silent: obs.silent,
            bad,
        }
    }

    /// What is wrong (or that nothing is), with the lag: `block_lag (lag 57 blocks)`.
    fn cause(&self, obs: &Observation, policy: &SyncPolicy) -> String {
        let mut parts = Vec::new();
        if self.silent {
            parts.push("agent silent".to_owned());
        }
        if !self.counted.is_empty() {
            parts.push(kinds(&self.counted));
        }
        if let Sync::Overdue { elapsed_ms } = self.sync {
            parts.push(format!(
                "syncing for {} min, over the {} min timeout",
                elapsed_ms / MS_PER_MINUTE,
                policy.sync_timeout_minutes
            ));
        }
        if parts.is_empty() {
            parts.push("no remediable finding".to_owned());
        }
        format!("{} (lag {} blocks)", parts.join(", "), obs.block_lag)
    }
}

fn kinds(kinds: &[FindingKind]) -> String {
    kinds
        .iter()
        .map(|k| k.as_str())
        .collect::<Vec<_>>()
        .join("+")
}

/// What one evaluation decided, before it is applied to the state.
struct Outcome {
    phase: Phase,
    actions: Vec<PlannedAction>,
    reason: String,
    /// A remediation command was planned: counts an attempt and starts the cooldown.
    acted: bool,
}

impl Outcome {
    fn to(phase: Phase, reason: String) -> Self {
        Self {
            phase,
            actions: Vec::new(),
            reason,
            acted: false,
        }
    }

    fn alerting(mut self, alert: bool, message: String) -> Self {
        if alert {
            self.actions.push(PlannedAction::Alert { message });
        }
        self
    }
}

/// The inputs of one decision. `next` already carries the updated streaks and budget.
struct Step<'a> {
    before: &'a NodeState,
    next: &'a NodeState,
    obs: &'a Observation,
    policy: &'a SyncPolicy,
    eval: &'a Evaluation,
}

impl Step<'_> {
    fn decide(&self) -> Outcome {
        if self.before.paused {
            return Outcome::to(
                Phase::Paused,
                format!(
                    "paused by an operator, no remediation until resumed: {}, {}",
                    self.cause(),
                    self.attempts()
                ),
            );
        }
        match self.before.phase {
            Phase::Cordoned => Outcome::to(
                Phase::Cordoned,
                format!(
                    "cordoned ({}): no automatic remediation until an operator resumes it; {}",
                    self.policy.recovery_strategy.as_str(),
                    self.cause()
                ),
            ),
            Phase::Pending | Phase::Paused => self.fresh(),
            Phase::Synced => self.synced(),
            Phase::Syncing => self.syncing(),
            Phase::Degraded => self.degraded(),
            Phase::Recovering => self.recovering(),
            Phase::Failed => self.failed(),
        }
    }

    /// `pending`, or `paused` just resumed: judged from this observation alone.
    fn fresh(&self) -> Outcome {
        if !self.obs.has_chain {
            let silent = if self.eval.silent {
                " and the agent is silent"
            } else {
                ""
            };
            return Outcome::to(
                Phase::Pending,
                format!("no chain figures yet{silent}: pending, nothing to judge or restart"),
            );
        }
        if self.confirmed() {
            return self.remediate();
        }
        if self.eval.bad {
            return Outcome::to(Phase::Pending, self.unconfirmed("pending"));
        }
        if self.obs.syncing {
            return Outcome::to(Phase::Syncing, self.syncing_reason("syncing"));
        }
        Outcome::to(
            Phase::Synced,
            format!("in sync: lag {} blocks, not syncing", self.obs.block_lag),
        )
    }

    fn synced(&self) -> Outcome {
        if self.confirmed() {
            return self.remediate();
        }
        if self.eval.bad {
            return Outcome::to(Phase::Synced, self.unconfirmed("still synced"));
        }
        if self.obs.syncing && !self.eval.excused.is_empty() {
            return Outcome::to(
                Phase::Syncing,
                self.syncing_reason("fell behind and is syncing"),
            );
        }
        Outcome::to(
            Phase::Synced,
            format!(
                "in sync: lag {} blocks, no remediable finding, {}",
                self.obs.block_lag,
                self.attempts()
            ),
        )
    }

    fn syncing(&self) -> Outcome {
        if self.confirmed() {
            return self.remediate();
        }
        if self.eval.bad {
            return Outcome::to(Phase::Syncing, self.unconfirmed("still syncing"));
        }
        if self.obs.syncing || !self.obs.has_chain {
            return Outcome::to(Phase::Syncing, self.syncing_reason("still syncing"));
        }
        Outcome::to(
            Phase::Synced,
            format!(
                "caught up: lag {} blocks, no longer syncing",
                self.obs.block_lag
            ),
        )
    }

    fn degraded(&self) -> Outcome {
        if self.confirmed() {
            return self.remediate();
        }
        if self.recovered() {
            return self.back_in_sync();
        }
        if self.eval.bad {
            return Outcome::to(
                Phase::Degraded,
                self.unconfirmed("degraded, not acting yet"),
            );
        }
        Outcome::to(Phase::Degraded, self.not_yet_recovered("degraded"))
    }

    fn recovering(&self) -> Outcome {
        let since_ms = self
            .obs
            .now_unix_ms
            .saturating_sub(self.before.last_action_unix_ms);
        let probe_ms = self.probe_ms();
        if since_ms < probe_ms {
            return Outcome::to(
                Phase::Recovering,
                format!(
                    "judging attempt {}/{} in {} s (probe interval {} s): {}",
                    self.next.attempts,
                    self.policy.max_restart_attempts,
                    probe_ms
                        .saturating_sub(since_ms)
                        .saturating_add(MS_PER_SECOND - 1)
                        / MS_PER_SECOND,
                    self.policy.probe_interval_seconds,
                    self.cause()
                ),
            );
        }
        if self.confirmed() {
            return self.remediate();
        }
        if self.recovered() {
            return self.back_in_sync();
        }
        if self.eval.bad {
            return Outcome::to(Phase::Recovering, self.unconfirmed("recovering"));
        }
        if let Sync::Within { elapsed_ms } = self.eval.sync {
            return Outcome::to(
                Phase::Recovering,
                format!(
                    "catching up after attempt {}/{}: lag {} blocks, syncing for {} of {} min",
                    self.next.attempts,
                    self.policy.max_restart_attempts,
                    self.obs.block_lag,
                    elapsed_ms / MS_PER_MINUTE,
                    self.policy.sync_timeout_minutes
                ),
            );
        }
        Outcome::to(Phase::Recovering, self.not_yet_recovered("recovering"))
    }

    fn failed(&self) -> Outcome {
        if self.recovered() {
            return self.back_in_sync();
        }
        Outcome::to(
            Phase::Failed,
            format!(
                "failed after {}: no further commands until a human looks; {}, good {}/{}",
                self.attempts(),
                self.cause(),
                self.next.good_streak,
                self.policy.recover_samples
            ),
        )
    }

    /// A confirmed bad evaluation: act, or say why not.
    fn remediate(&self) -> Outcome {
        let cause = self.cause();
        let entering_degraded = self.before.phase != Phase::Degraded;
        if self.eval.silent {
            return Outcome::to(
                Phase::Degraded,
                format!(
                    "degraded: {cause} for {} evaluations, no command can reach it; {}",
                    self.next.bad_streak,
                    self.attempts()
                ),
            )
            .alerting(
                entering_degraded,
                format!(
                    "node degraded: its agent is silent ({cause}); the guardian cannot send it a command"
                ),
            );
        }
        if let Some(kind) = self.obs.blocked_by {
            return Outcome::to(
                Phase::Degraded,
                format!(
                    "degraded but blocked by {}: never restart a node whose keystore is not safe; {cause}, {}",
                    kind.as_str(),
                    self.attempts()
                ),
            )
            .alerting(
                entering_degraded,
                format!(
                    "node degraded ({cause}) but remediation is blocked by {}: never restart a node whose keystore is not safe",
                    kind.as_str()
                ),
            );
        }
        if self.obs.fleet_hold {
            return Outcome::to(
                Phase::Degraded,
                format!(
                    "degraded, held by fleet correlation (the network is degraded as a whole): no per-node remediation; {cause}, {}",
                    self.attempts()
                ),
            );
        }
        if self.policy.recovery_strategy == RecoveryStrategy::CordonAndAlert {
            return Outcome::to(
                Phase::Cordoned,
                format!(
                    "cordoned by cordon-and-alert after {} bad evaluations: {cause}",
                    self.next.bad_streak
                ),
            )
            .alerting(
                true,
                format!(
                    "node cordoned (cordon-and-alert): {cause} for {} evaluations; resume it once fixed",
                    self.next.bad_streak
                ),
            );
        }
        if self.next.attempts >= self.policy.max_restart_attempts {
            return Outcome::to(
                Phase::Failed,
                format!(
                    "failed: attempt budget spent ({}) and still {cause}",
                    self.attempts()
                ),
            )
            .alerting(
                self.before.phase != Phase::Failed,
                format!(
                    "remediation failed: {} spent and still {cause}; a human must look",
                    self.attempts()
                ),
            );
        }
        let since_ms = self
            .obs
            .now_unix_ms
            .saturating_sub(self.before.last_action_unix_ms);
        if self.before.last_action_unix_ms != 0 && since_ms < self.probe_ms() {
            return Outcome::to(
                Phase::Degraded,
                format!(
                    "degraded, cooling down: last remediation {} s ago, probe interval {} s; {cause}, {}",
                    since_ms / MS_PER_SECOND,
                    self.policy.probe_interval_seconds,
                    self.attempts()
                ),
            );
        }
        if self.obs.fleet_in_flight >= self.obs.fleet_max_in_flight {
            return Outcome::to(
                Phase::Degraded,
                format!(
                    "degraded, waiting for the fleet cap: {}/{} remediations in flight; {cause}, {}",
                    self.obs.fleet_in_flight,
                    self.obs.fleet_max_in_flight,
                    self.attempts()
                ),
            );
        }
        let (action, key, value) = self.command();
        if value.is_empty() {
            return Outcome::to(
                Phase::Degraded,
                format!(
                    "degraded, but the {} policy names no {key} for {}: {cause}",
                    self.policy.recovery_strategy.as_str(),
                    action.as_str()
                ),
            )
            .alerting(
                entering_degraded,
                format!(
                    "node degraded ({cause}) and cannot be remediated: the {} policy names no {key}",
                    self.policy.recovery_strategy.as_str()
                ),
            );
        }
        let reason = format!(
            "degraded for {} evaluations ({cause}): {} {value}, attempt {}/{}",
            self.next.bad_streak,
            action.as_str(),
            self.next.attempts.saturating_add(1),
            self.policy.max_restart_attempts
        );
        Outcome {
            phase: Phase::Recovering,
            actions: vec![PlannedAction::Command {
                action,
                parameters: BTreeMap::from([(key.to_owned(), value.to_owned())]),
            }],
            reason,
            acted: true,
        }
    }

    /// The agent action, its parameter name and value for the policy's strategy.
    fn command(&self) -> (Action, &'static str, &str) {
        let policy = self.policy;
        match policy.recovery_strategy {
            RecoveryStrategy::SnapshotRestore => (Action::RunHook, "hook", &policy.snapshot_hook),
            // Cordon-and-alert never reaches a command; it shares the restart arm for totality.
            _ if !policy.restart_container.is_empty() => (
                Action::RestartContainer,
                "container",
                &policy.restart_container,
            ),
            _ => (Action::RestartUnit, "unit", &policy.restart_unit),
        }
    }

    fn back_in_sync(&self) -> Outcome {
        Outcome::to(
            Phase::Synced,
            format!(
                "back in sync after {} good evaluations: lag {} blocks; {} kept until {} s synced",
                self.next.good_streak,
                self.obs.block_lag,
                self.attempts(),
                self.policy.stable_reset_seconds
            ),
        )
    }

    fn confirmed(&self) -> bool {
        self.eval.bad && self.next.bad_streak >= self.policy.confirm_samples
    }

    fn recovered(&self) -> bool {
        !self.eval.bad
            && !self.obs.syncing
            && self.obs.has_chain
            && self.next.good_streak >= self.policy.recover_samples
    }

    fn probe_ms(&self) -> i64 {
        i64::from(self.policy.probe_interval_seconds) * MS_PER_SECOND
    }

    fn cause(&self) -> String {
        self.eval.cause(self.obs, self.policy)
    }

    fn attempts(&self) -> String {
        format!(
            "attempts {}/{}",
            self.next.attempts, self.policy.max_restart_attempts
        )
    }

    fn unconfirmed(&self, standing: &str) -> String {
        format!(
            "bad evaluation {}/{} ({}): {standing}; {}",
            self.next.bad_streak,
            self.policy.confirm_samples,
            self.cause(),
            self.attempts()
        )
    }

    fn not_yet_recovered(&self, standing: &str) -> String {
        let syncing = if self.obs.syncing {
            ", still syncing"
        } else {
            ""
        };
        format!(
            "{standing}: good evaluation {}/{} (lag {} blocks{syncing}); {}",
            self.next.good_streak,
            self.policy.recover_samples,
            self.obs.block_lag,
            self.attempts()
        )
    }

    fn syncing_reason(&self, standing: &str) -> String {
        let elapsed_ms = match self.eval.sync {
            Sync::Within { elapsed_ms } | Sync::Overdue { elapsed_ms } => elapsed_ms,
            Sync::No | Sync::Unexcused => 0,
        };
        let excused = if self.eval.excused.is_empty() {
            String::new()
        } else {
            format!(", {} expected while syncing", kinds(&self.eval.excused))
        };
        format!(
            "{standing}: lag {} blocks{excused}, {} of {} min allowed",
            self.obs.block_lag,
            elapsed_ms / MS_PER_MINUTE,
            self.policy.sync_timeout_minutes
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An arbitrary evaluation time; samples arrive every [`STEP_MS`].
    const T0: i64 = 1_700_000_000_000;
    const STEP_MS: i64 = 10_000;

    /// Feeds observations to [`plan`] one evaluation at a time, the way the runner does, and
    /// checks the invariants that must hold after every evaluation.
    struct Sim {
        state: NodeState,
        policy: SyncPolicy,
        now: i64,
    }

    impl Sim {
        fn new() -> Self {
            Self::with(SyncPolicy::default())
        }

        fn with(policy: SyncPolicy) -> Self {
            Self {
                state: NodeState {
                    phase_since_unix_ms: T0 - STEP_MS,
                    ..NodeState::default()
                },
                policy,
                now: T0,
            }
        }

        /// A node that has had one good evaluation (so it is synced).
        fn synced(policy: SyncPolicy) -> Self {
            let mut sim = Self::with(policy);
            sim.step(&good());
            assert_eq!(sim.phase(), Phase::Synced);
            sim
        }

        /// One evaluation at the current time; then time moves on by one sample.
        fn step(&mut self, observation: &Observation) -> Plan {
            let observation = Observation {
                now_unix_ms: self.now,
                ..observation.clone()
            };
            let before = self.state.clone();
            let plan = plan(&before, &observation, &self.policy);
            assert_eq!(
                plan,
                super::plan(&before, &observation, &self.policy),
                "deterministic"
            );
            assert!(!plan.reason.is_empty(), "every plan says why");
            if plan.next.phase == before.phase {
                assert_eq!(plan.next.phase_since_unix_ms, before.phase_since_unix_ms);
            } else {
                assert_eq!(plan.next.phase_since_unix_ms, self.now);
            }
            let commanded = !commands(&plan.actions).is_empty();
            if commanded {
                assert!(!before.paused && !observation.silent && !observation.fleet_hold);
                assert!(observation.blocked_by.is_none());
                assert_eq!(plan.next.phase, Phase::Recovering);
                assert_eq!(plan.next.attempts, before.attempts + 1);
                assert_eq!(plan.next.last_action_unix_ms, self.now);
            }
            self.state = plan.next.clone();
            self.now += STEP_MS;
            plan
        }

        /// `n` evaluations of the same observation; every action planned, in order.
        fn feed(&mut self, n: usize, observation: &Observation) -> Vec<PlannedAction> {
            (0..n)
                .flat_map(|_| self.step(observation).actions)
                .collect()
        }

        /// Moves the clock without evaluating (the runner skipped or the node was quiet).
        fn wait_ms(&mut self, ms: i64) {
            self.now += ms;
        }

        fn phase(&self) -> Phase {
            self.state.phase
        }
    }

    fn good() -> Observation {
        Observation {
            has_chain: true,
            block_lag: 1,
            fleet_max_in_flight: 2,
            ..Observation::default()
        }
    }

    fn lagging() -> Observation {
        Observation {
            block_lag: 57,
            remediable: vec![FindingKind::BlockLag],
            ..good()
        }
    }

    fn silent() -> Observation {
        Observation {
            silent: true,
            ..good()
        }
    }

    /// Catching up: the node says it is syncing and lags (the detector reports the lag).
    fn catching_up(lag: u64) -> Observation {
        Observation {
            syncing: true,
            block_lag: lag,
            remediable: vec![FindingKind::BlockLag],
            ..good()
        }
    }

    fn commands(actions: &[PlannedAction]) -> Vec<(Action, BTreeMap<String, String>)> {
        actions
            .iter()
            .filter_map(|a| match a {
                PlannedAction::Command { action, parameters } => {
                    Some((*action, parameters.clone()))
                }
                PlannedAction::Alert { .. } => None,
            })
            .collect()
    }

    fn alerts(actions: &[PlannedAction]) -> Vec<String> {
        actions
            .iter()
            .filter_map(|a| match a {
                PlannedAction::Alert { message } => Some(message.clone()),
                PlannedAction::Command { .. } => None,
            })
            .collect()
    }

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn restart_unit() -> (Action, BTreeMap<String, String>) {
        (
            Action::RestartUnit,
            params(&[("unit", "subtensor.service")]),
        )
    }

    // --- first sight ---------------------------------------------------------------------

    #[test]
    fn first_good_sample_moves_pending_to_synced() {
        let mut sim = Sim::new();
        let plan = sim.step(&good());
        assert_eq!(plan.next.phase, Phase::Synced);
        assert_eq!(plan.next.phase_since_unix_ms, T0);
        assert!(plan.actions.is_empty());
        assert!(plan.reason.contains("lag 1 blocks"), "{}", plan.reason);
    }

    #[test]
    fn node_without_chain_figures_stays_pending_even_when_silent() {
        let mut sim = Sim::new();
        let quiet = Observation {
            has_chain: false,
            silent: true,
            ..good()
        };
        let actions = sim.feed(10, &quiet);
        assert!(actions.is_empty());
        assert_eq!(sim.phase(), Phase::Pending);
        assert_eq!(sim.state.bad_streak, 10, "streaks are still tracked");
        assert_eq!(sim.state.phase_since_unix_ms, T0 - STEP_MS);
    }

    #[test]
    fn pending_node_first_seen_syncing_is_syncing_not_degraded() {
        let mut sim = Sim::new();
        let plan = sim.step(&catching_up(5_000));
        assert_eq!(plan.next.phase, Phase::Syncing);
        assert!(plan.reason.contains("block_lag expected while syncing"));
        assert!(sim.feed(20, &catching_up(4_000)).is_empty());
        assert_eq!(sim.phase(), Phase::Syncing);
        sim.step(&good());
        assert_eq!(
            sim.phase(),
            Phase::Synced,
            "caught up goes straight to synced"
        );
    }

    // --- hysteresis and the first remediation --------------------------------------------

    #[test]
    fn single_bad_evaluation_does_not_degrade() {
        let mut sim = Sim::synced(SyncPolicy::default());
        let plan = sim.step(&lagging());
        assert_eq!(plan.next.phase, Phase::Synced);
        assert!(plan.actions.is_empty());
        assert!(
            plan.reason.contains("bad evaluation 1/2"),
            "{}",
            plan.reason
        );
        sim.step(&good());
        assert_eq!(sim.state.bad_streak, 0);
    }

    #[test]
    fn ticks_without_a_new_sample_do_not_confirm_a_fault() {
        let mut sim = Sim::synced(SyncPolicy::default());
        sim.step(&lagging());
        let stale = Observation {
            stale: true,
            ..lagging()
        };
        for _ in 0..5 {
            let plan = sim.step(&stale);
            assert!(plan.actions.is_empty(), "{}", plan.reason);
            assert_eq!(plan.next.phase, Phase::Synced);
        }
        assert_eq!(sim.state.bad_streak, 1, "only samples count");
        assert_eq!(
            commands(&sim.step(&lagging()).actions),
            vec![restart_unit()]
        );
    }

    #[test]
    fn flapping_node_is_never_confirmed_bad() {
        let mut sim = Sim::synced(SyncPolicy::default());
        for _ in 0..20 {
            assert!(sim.step(&lagging()).actions.is_empty());
            assert!(sim.step(&good()).actions.is_empty());
        }
        assert_eq!(sim.phase(), Phase::Synced);
    }

    #[test]
    fn two_bad_evaluations_restart_the_unit_in_the_same_evaluation() {
        let mut sim = Sim::synced(SyncPolicy::default());
        sim.step(&lagging());
        let at = sim.now;
        let plan = sim.step(&lagging());
        assert_eq!(commands(&plan.actions), vec![restart_unit()]);
        assert!(alerts(&plan.actions).is_empty());
        assert_eq!(plan.next.phase, Phase::Recovering);
        assert_eq!(plan.next.attempts, 1);
        assert_eq!(plan.next.last_action_unix_ms, at);
        assert_eq!(plan.next.phase_since_unix_ms, at);
        for figure in [
            "block_lag",
            "lag 57 blocks",
            "attempt 1/3",
            "subtensor.service",
        ] {
            assert!(plan.reason.contains(figure), "{figure}: {}", plan.reason);
        }
    }

    #[test]
    fn confirm_samples_is_the_policy_figure() {
        let policy = SyncPolicy {
            confirm_samples: 4,
            ..SyncPolicy::default()
        };
        let mut sim = Sim::synced(policy);
        assert!(sim.feed(3, &lagging()).is_empty());
        assert_eq!(
            commands(&sim.step(&lagging()).actions),
            vec![restart_unit()]
        );
    }

    // --- cooldown, probe and budget ------------------------------------------------------

    #[test]
    fn cooldown_blocks_a_second_command_while_judging_the_first() {
        let mut sim = Sim::synced(SyncPolicy::default());
        assert_eq!(commands(&sim.feed(2, &lagging())).len(), 1);
        // 10 s and 20 s after the restart: inside the 30 s probe interval.
        for _ in 0..2 {
            let plan = sim.step(&lagging());
            assert!(plan.actions.is_empty());
            assert_eq!(plan.next.phase, Phase::Recovering);
            assert!(
                plan.reason.contains("probe interval 30 s"),
                "{}",
                plan.reason
            );
        }
        assert_eq!(sim.state.attempts, 1);
    }

    #[test]
    fn cooldown_blocks_a_command_from_degraded() {
        let state = NodeState {
            phase: Phase::Degraded,
            phase_since_unix_ms: T0 - 20_000,
            attempts: 1,
            last_action_unix_ms: T0 - 5_000,
            bad_streak: 5,
            ..NodeState::default()
        };
        let observation = Observation {
            now_unix_ms: T0,
            ..lagging()
        };
        let plan = plan(&state, &observation, &SyncPolicy::default());
        assert!(plan.actions.is_empty());
        assert_eq!(plan.next.phase, Phase::Degraded);
        assert!(
            plan.reason
                .contains("cooling down: last remediation 5 s ago")
        );

        let later = Observation {
            now_unix_ms: T0 + 25_000,
            ..lagging()
        };
        let plan = super::plan(&state, &later, &SyncPolicy::default());
        assert_eq!(commands(&plan.actions), vec![restart_unit()]);
        assert_eq!(plan.next.attempts, 2);
    }

    #[test]
    fn still_bad_after_probe_interval_makes_a_second_attempt() {
        let mut sim = Sim::synced(SyncPolicy::default());
        sim.feed(2, &lagging());
        sim.feed(2, &lagging());
        // 30 s after the first restart.
        let plan = sim.step(&lagging());
        assert_eq!(commands(&plan.actions), vec![restart_unit()]);
        assert_eq!(plan.next.attempts, 2);
        assert_eq!(plan.next.phase, Phase::Recovering);
        assert!(plan.reason.contains("attempt 2/3"), "{}", plan.reason);
    }

    #[test]
    fn spent_budget_fails_with_one_alert_and_no_more_commands() {
        let mut sim = Sim::synced(SyncPolicy::default());
        // Attempts at samples 2, 5 and 8; judged again at 11.
        let actions = sim.feed(10, &lagging());
        assert_eq!(commands(&actions), vec![restart_unit(); 3]);
        assert!(alerts(&actions).is_empty());
        let plan = sim.step(&lagging());
        assert_eq!(plan.next.phase, Phase::Failed);
        assert!(commands(&plan.actions).is_empty());
        let alert = alerts(&plan.actions);
        assert_eq!(alert.len(), 1);
        assert!(alert[0].contains("attempts 3/3"), "{}", alert[0]);
        assert!(alert[0].contains("block_lag"), "{}", alert[0]);

        assert!(sim.feed(100, &lagging()).is_empty(), "failed never acts");
        assert_eq!(sim.phase(), Phase::Failed);
        assert_eq!(sim.state.attempts, 3);
    }

    #[test]
    fn failed_node_returns_to_synced_after_recover_samples() {
        let mut sim = Sim::synced(SyncPolicy::default());
        sim.feed(11, &lagging());
        assert_eq!(sim.phase(), Phase::Failed);
        assert!(sim.feed(2, &good()).is_empty());
        assert_eq!(
            sim.phase(),
            Phase::Failed,
            "two good evaluations are not enough"
        );
        let plan = sim.step(&good());
        assert_eq!(plan.next.phase, Phase::Synced);
        assert!(plan.actions.is_empty());
        assert_eq!(
            plan.next.attempts, 3,
            "budget kept until the node is stable"
        );
    }

    #[test]
    fn recovering_node_needs_recover_samples_good_evaluations() {
        let mut sim = Sim::synced(SyncPolicy::default());
        sim.feed(2, &lagging());
        assert_eq!(sim.phase(), Phase::Recovering);
        sim.feed(2, &good());
        assert_eq!(
            sim.phase(),
            Phase::Recovering,
            "still inside the probe interval"
        );
        sim.step(&good());
        assert_eq!(sim.phase(), Phase::Synced);
        assert_eq!(sim.state.attempts, 1);
    }

    #[test]
    fn budget_resets_after_a_stable_period() {
        let mut sim = Sim::synced(SyncPolicy::default());
        sim.feed(2, &lagging());
        sim.feed(3, &good());
        assert_eq!((sim.phase(), sim.state.attempts), (Phase::Synced, 1));
        let synced_at = sim.state.phase_since_unix_ms;

        sim.now = synced_at + 29 * MS_PER_MINUTE;
        let before = sim.state.clone();
        let plan = sim.step(&good());
        assert_eq!(plan.next.attempts, 1, "29 min is not stable yet");
        assert!(!plan.is_decision(&before));

        sim.now = synced_at + 30 * MS_PER_MINUTE;
        let before = sim.state.clone();
        let plan = sim.step(&good());
        assert_eq!(plan.next.attempts, 0);
        assert_eq!(plan.next.phase, Phase::Synced);
        assert!(
            !plan.is_decision(&before),
            "a budget reset alone is not a decision"
        );
        assert!(
            plan.reason
                .contains("budget reset after 30 min synced (was 1/3)"),
            "{}",
            plan.reason
        );
    }

    #[test]
    fn reset_budget_allows_a_full_round_of_attempts_again() {
        let mut sim = Sim::synced(SyncPolicy::default());
        sim.feed(11, &lagging());
        sim.feed(3, &good());
        assert_eq!((sim.phase(), sim.state.attempts), (Phase::Synced, 3));
        sim.wait_ms(30 * MS_PER_MINUTE);
        sim.step(&good());
        assert_eq!(sim.state.attempts, 0);
        let actions = sim.feed(11, &lagging());
        assert_eq!(commands(&actions).len(), 3);
        assert_eq!(sim.phase(), Phase::Failed);
    }

    // --- strategies ----------------------------------------------------------------------

    #[test]
    fn snapshot_restore_runs_the_hook() {
        let policy = SyncPolicy {
            recovery_strategy: RecoveryStrategy::SnapshotRestore,
            ..SyncPolicy::default()
        };
        let mut sim = Sim::synced(policy);
        let actions = sim.feed(2, &lagging());
        assert_eq!(
            commands(&actions),
            vec![(Action::RunHook, params(&[("hook", "snapshot-restore")]))]
        );
    }

    #[test]
    fn container_restart_when_a_container_is_configured() {
        let policy = SyncPolicy {
            restart_container: "subtensor".to_owned(),
            ..SyncPolicy::default()
        };
        let mut sim = Sim::synced(policy);
        let actions = sim.feed(2, &lagging());
        assert_eq!(
            commands(&actions),
            vec![(
                Action::RestartContainer,
                params(&[("container", "subtensor")])
            )]
        );
    }

    #[test]
    fn command_parameters_are_the_ones_the_agent_requires() {
        for strategy in [RecoveryStrategy::Restart, RecoveryStrategy::SnapshotRestore] {
            for container in ["", "subtensor"] {
                let policy = SyncPolicy {
                    recovery_strategy: strategy,
                    restart_container: container.to_owned(),
                    ..SyncPolicy::default()
                };
                let mut sim = Sim::synced(policy);
                for (action, parameters) in commands(&sim.feed(2, &lagging())) {
                    let keys: Vec<_> = parameters.keys().map(String::as_str).collect();
                    assert_eq!(
                        keys,
                        action.required_parameter().into_iter().collect::<Vec<_>>()
                    );
                }
            }
        }
    }

    #[test]
    fn policy_without_a_unit_alerts_instead_of_sending_an_empty_command() {
        let policy = SyncPolicy {
            restart_unit: String::new(),
            ..SyncPolicy::default()
        };
        let mut sim = Sim::synced(policy);
        let actions = sim.feed(10, &lagging());
        assert!(commands(&actions).is_empty());
        assert_eq!(alerts(&actions).len(), 1);
        assert_eq!(sim.phase(), Phase::Degraded);
    }

    #[test]
    fn cordon_and_alert_cordons_once_and_stays_until_resumed() {
        let policy = SyncPolicy {
            recovery_strategy: RecoveryStrategy::CordonAndAlert,
            ..SyncPolicy::default()
        };
        let mut sim = Sim::synced(policy);
        let actions = sim.feed(2, &lagging());
        assert!(commands(&actions).is_empty());
        assert_eq!(alerts(&actions).len(), 1);
        assert!(alerts(&actions)[0].contains("cordon"));
        assert_eq!(sim.phase(), Phase::Cordoned);

        assert!(sim.feed(10, &lagging()).is_empty());
        assert!(sim.feed(10, &good()).is_empty());
        assert_eq!(
            sim.phase(),
            Phase::Cordoned,
            "good evaluations do not uncordon"
        );

        // The runner's operator resume: back to pending, then judged afresh.
        sim.state.phase = Phase::Pending;
        sim.step(&good());
        assert_eq!(sim.phase(), Phase::Synced);
    }

    // --- operator pause ------------------------------------------------------------------

    #[test]
    fn paused_node_never_acts() {
        let mut sim = Sim::synced(SyncPolicy::default());
        sim.state.paused = true;
        let paused_at = sim.now;
        for observation in [lagging(), silent(), catching_up(9_000), good(), lagging()] {
            assert!(sim.feed(20, &observation).is_empty());
        }
        assert_eq!(sim.phase(), Phase::Paused);
        assert_eq!(sim.state.phase_since_unix_ms, paused_at);
        assert_eq!(sim.state.bad_streak, 20, "streaks are tracked while paused");
    }

    #[test]
    fn pause_holds_a_recovering_node_and_resume_judges_afresh() {
        let mut sim = Sim::synced(SyncPolicy::default());
        sim.feed(2, &lagging());
        sim.state.paused = true;
        assert!(sim.feed(10, &lagging()).is_empty());
        assert_eq!(sim.phase(), Phase::Paused);

        // Resumed (the runner clears `paused`) while good: straight to synced.
        sim.state.paused = false;
        sim.step(&good());
        assert_eq!(sim.phase(), Phase::Synced);
        assert_eq!(sim.state.attempts, 1);
    }

    #[test]
    fn node_resumed_while_still_bad_is_remediated_at_once() {
        let mut sim = Sim::synced(SyncPolicy::default());
        sim.state.paused = true;
        sim.feed(5, &lagging());
        sim.state.paused = false;
        let plan = sim.step(&lagging());
        assert_eq!(commands(&plan.actions), vec![restart_unit()]);
    }

    // --- nothing may be sent ---------------------------------------------------------------

    #[test]
    fn silent_agent_degrades_with_one_alert_and_no_command() {
        let mut sim = Sim::synced(SyncPolicy::default());
        assert!(sim.step(&silent()).actions.is_empty());
        let plan = sim.step(&silent());
        assert_eq!(plan.next.phase, Phase::Degraded);
        assert!(commands(&plan.actions).is_empty());
        let alert = alerts(&plan.actions);
        assert_eq!(alert.len(), 1);
        assert!(alert[0].contains("silent"), "{}", alert[0]);

        assert!(sim.feed(30, &silent()).is_empty(), "alerted once only");
        assert_eq!(sim.phase(), Phase::Degraded);

        // The agent is back and the node still lags: the streak is already confirmed.
        let plan = sim.step(&lagging());
        assert_eq!(commands(&plan.actions), vec![restart_unit()]);
    }

    #[test]
    fn silent_agent_that_comes_back_healthy_returns_to_synced() {
        let mut sim = Sim::synced(SyncPolicy::default());
        sim.feed(3, &silent());
        assert_eq!(sim.phase(), Phase::Degraded);
        sim.feed(2, &good());
        assert_eq!(sim.phase(), Phase::Degraded);
        sim.step(&good());
        assert_eq!(sim.phase(), Phase::Synced);
        assert_eq!(sim.state.attempts, 0);
    }

    #[test]
    fn keystore_block_forbids_any_command() {
        let blocked = Observation {
            blocked_by: Some(FindingKind::Keystore),
            ..lagging()
        };
        let mut sim = Sim::synced(SyncPolicy::default());
        let actions = sim.feed(50, &blocked);
        assert!(commands(&actions).is_empty());
        let alert = alerts(&actions);
        assert_eq!(alert.len(), 1, "alerted once, on entering degraded");
        assert!(alert[0].contains("keystore"), "{}", alert[0]);
        assert!(alert[0].contains("never restart"), "{}", alert[0]);
        assert_eq!(sim.phase(), Phase::Degraded);
        assert_eq!(sim.state.attempts, 0);
    }

    #[test]
    fn keystore_block_also_stops_a_recovering_node() {
        let mut sim = Sim::synced(SyncPolicy::default());
        sim.feed(2, &lagging());
        sim.feed(2, &lagging());
        let blocked = Observation {
            blocked_by: Some(FindingKind::Keystore),
            ..lagging()
        };
        let plan = sim.step(&blocked);
        assert!(commands(&plan.actions).is_empty());
        assert_eq!(alerts(&plan.actions).len(), 1);
        assert_eq!(plan.next.phase, Phase::Degraded);
    }

    #[test]
    fn fleet_hold_holds_without_command_or_alert() {
        let held = Observation {
            fleet_hold: true,
            ..lagging()
        };
        let mut sim = Sim::synced(SyncPolicy::default());
        let actions = sim.feed(20, &held);
        assert!(
            actions.is_empty(),
            "the fleet finding alerts, not each node"
        );
        assert_eq!(sim.phase(), Phase::Degraded);
        let plan = sim.step(&held);
        assert!(plan.reason.contains("fleet correlation"), "{}", plan.reason);

        // The hold lifts: the node is remediated at once.
        let plan = sim.step(&lagging());
        assert_eq!(commands(&plan.actions), vec![restart_unit()]);
    }

    #[test]
    fn fleet_cap_makes_the_node_wait_for_a_slot() {
        let full = Observation {
            fleet_in_flight: 2,
            fleet_max_in_flight: 2,
            ..lagging()
        };
        let mut sim = Sim::synced(SyncPolicy::default());
        assert!(sim.feed(5, &full).is_empty());
        assert_eq!(sim.phase(), Phase::Degraded);
        let plan = sim.step(&full);
        assert!(plan.reason.contains("fleet cap: 2/2"), "{}", plan.reason);

        let slot = Observation {
            fleet_in_flight: 1,
            ..full
        };
        let plan = sim.step(&slot);
        assert_eq!(commands(&plan.actions), vec![restart_unit()]);
        assert_eq!(plan.next.phase, Phase::Recovering);
    }

    #[test]
    fn spent_budget_fails_even_while_the_fleet_cap_is_full() {
        let state = NodeState {
            phase: Phase::Degraded,
            attempts: 3,
            bad_streak: 4,
            ..NodeState::default()
        };
        let observation = Observation {
            now_unix_ms: T0,
            fleet_in_flight: 5,
            ..lagging()
        };
        let plan = plan(&state, &observation, &SyncPolicy::default());
        assert_eq!(plan.next.phase, Phase::Failed);
        assert_eq!(alerts(&plan.actions).len(), 1);
    }

    // --- syncing ---------------------------------------------------------------------------

    #[test]
    fn syncing_within_the_timeout_is_not_degraded() {
        let mut sim = Sim::synced(SyncPolicy::default());
        sim.step(&catching_up(3_000));
        assert_eq!(sim.phase(), Phase::Syncing);
        let started = sim.state.phase_since_unix_ms;
        sim.now = started + 119 * MS_PER_MINUTE;
        let actions = sim.feed(5, &catching_up(200));
        assert!(actions.is_empty());
        assert_eq!(sim.phase(), Phase::Syncing);
        assert_eq!(sim.state.bad_streak, 0);
    }

    #[test]
    fn syncing_beyond_the_timeout_is_degraded_and_remediated() {
        let mut sim = Sim::synced(SyncPolicy::default());
        sim.step(&catching_up(3_000));
        sim.now = sim.state.phase_since_unix_ms + 120 * MS_PER_MINUTE;
        let plan = sim.step(&catching_up(2_000));
        assert!(
            plan.actions.is_empty(),
            "hysteresis applies to the timeout too"
        );
        assert!(
            plan.reason.contains("over the 120 min timeout"),
            "{}",
            plan.reason
        );
        let plan = sim.step(&catching_up(2_000));
        assert_eq!(commands(&plan.actions), vec![restart_unit()]);
    }

    #[test]
    fn syncing_beyond_the_timeout_without_a_lag_finding_is_still_bad() {
        let policy = SyncPolicy {
            sync_timeout_minutes: 1,
            ..SyncPolicy::default()
        };
        let mut sim = Sim::synced(policy);
        sim.step(&catching_up(3_000));
        let syncing_quietly = Observation {
            syncing: true,
            ..good()
        };
        sim.wait_ms(MS_PER_MINUTE);
        let full = Observation {
            fleet_in_flight: 2,
            ..syncing_quietly
        };
        sim.feed(2, &full);
        assert_eq!(sim.phase(), Phase::Degraded);
    }

    #[test]
    fn detector_syncing_too_long_finding_degrades_a_syncing_node() {
        let mut sim = Sim::synced(SyncPolicy::default());
        sim.step(&catching_up(3_000));
        let too_long = Observation {
            remediable: vec![FindingKind::BlockLag, FindingKind::SyncingTooLong],
            ..catching_up(3_000)
        };
        let plan = sim.step(&too_long);
        assert!(plan.reason.contains("syncing_too_long"), "{}", plan.reason);
        assert!(
            !plan.reason.contains("block_lag"),
            "lag is excused: {}",
            plan.reason
        );
        let plan = sim.step(&too_long);
        assert_eq!(commands(&plan.actions), vec![restart_unit()]);
    }

    #[test]
    fn frozen_rpc_is_not_excused_by_syncing() {
        let mut sim = Sim::synced(SyncPolicy::default());
        let unresponsive = Observation {
            remediable: vec![FindingKind::BlockLag, FindingKind::RpcUnresponsive],
            ..catching_up(3_000)
        };
        let actions = sim.feed(2, &unresponsive);
        assert_eq!(commands(&actions), vec![restart_unit()]);
    }

    #[test]
    fn recovering_node_catching_up_waits_until_the_sync_timeout() {
        let mut sim = Sim::synced(SyncPolicy::default());
        sim.feed(2, &lagging());
        let acted_at = sim.state.last_action_unix_ms;
        let actions = sim.feed(300, &catching_up(20_000));
        assert!(
            actions.is_empty(),
            "catching up after a restart is progress"
        );
        assert_eq!(sim.phase(), Phase::Recovering);
        let plan = sim.step(&catching_up(10_000));
        assert!(
            plan.reason.contains("catching up after attempt 1/3"),
            "{}",
            plan.reason
        );

        sim.now = acted_at + 120 * MS_PER_MINUTE;
        let actions = sim.feed(2, &catching_up(9_000));
        assert_eq!(commands(&actions), vec![restart_unit()]);
        assert_eq!(sim.state.attempts, 2);
    }

    #[test]
    fn recovering_node_that_catches_up_is_synced() {
        let mut sim = Sim::synced(SyncPolicy::default());
        sim.feed(2, &lagging());
        sim.feed(30, &catching_up(5_000));
        sim.feed(3, &good());
        assert_eq!(sim.phase(), Phase::Synced);
    }

    #[test]
    fn degraded_node_gets_no_fresh_sync_window() {
        let state = NodeState {
            phase: Phase::Degraded,
            bad_streak: 3,
            ..NodeState::default()
        };
        let observation = Observation {
            now_unix_ms: T0,
            ..catching_up(4_000)
        };
        let plan = plan(&state, &observation, &SyncPolicy::default());
        assert_eq!(plan.next.bad_streak, 4);
        assert_eq!(commands(&plan.actions), vec![restart_unit()]);
    }

    // --- robustness ------------------------------------------------------------------------

    #[test]
    fn extreme_figures_never_panic() {
        let policies = [
            SyncPolicy::default(),
            SyncPolicy {
                max_restart_attempts: 0,
                probe_interval_seconds: 0,
                sync_timeout_minutes: 0,
                stable_reset_seconds: 0,
                confirm_samples: 0,
                recover_samples: 0,
                restart_unit: String::new(),
                snapshot_hook: String::new(),
                ..SyncPolicy::default()
            },
            SyncPolicy {
                max_restart_attempts: u32::MAX,
                probe_interval_seconds: u32::MAX,
                sync_timeout_minutes: u32::MAX,
                stable_reset_seconds: u32::MAX,
                confirm_samples: u32::MAX,
                recover_samples: u32::MAX,
                recovery_strategy: RecoveryStrategy::SnapshotRestore,
                ..SyncPolicy::default()
            },
        ];
        let times = [i64::MIN, -1, 0, 1, T0, i64::MAX];
        let observations = [good(), lagging(), silent(), catching_up(u64::MAX)];
        for policy in &policies {
            for phase in Phase::ALL {
                for &since in &times {
                    for &now in &times {
                        for observation in &observations {
                            let state = NodeState {
                                phase,
                                phase_since_unix_ms: since,
                                last_action_unix_ms: since,
                                attempts: u32::MAX,
                                bad_streak: u32::MAX,
                                good_streak: u32::MAX,
                                paused: false,
                            };
                            let observation = Observation {
                                now_unix_ms: now,
                                ..observation.clone()
                            };
                            let plan = plan(&state, &observation, policy);
                            assert!(!plan.reason.is_empty());
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn zero_fleet_cap_allows_no_remediation() {
        let no_slots = Observation {
            fleet_max_in_flight: 0,
            ..lagging()
        };
        let mut sim = Sim::synced(SyncPolicy::default());
        assert!(sim.feed(10, &no_slots).is_empty());
        assert_eq!(sim.phase(), Phase::Degraded);
    }
}
