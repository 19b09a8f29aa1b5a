//! The reconciler, pure: a phase per node driven by its [`SyncPolicy`]. [`observe`] turns a
//! node's newest figures and findings into an [`Observation`]; [`plan`] (state + observation +
//! policy -> next state and actions) decides. No I/O and no store: the control loop feeds it
//! and writes each decision to the ledger, the actuator carries the actions out.

pub mod action;
pub mod observe;
pub mod plan;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use action::{Action, UnknownAction};
pub use plan::plan;

/// Where a node stands. Stored and sent as the snake_case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// No chain figures yet.
    #[default]
    Pending,
    /// Catching up (initial sync or after a remediation), within `sync_timeout_minutes`.
    Syncing,
    /// Keeping up; no remediable finding.
    Synced,
    /// A remediable finding held for `confirm_samples` evaluations (or the agent is silent).
    Degraded,
    /// A remediation was carried out; waiting for the node to catch up.
    Recovering,
    /// The attempt budget is spent; a human must look (alerted).
    Failed,
    /// `cordon-and-alert`: taken out of automatic remediation and alerted; resume to leave.
    Cordoned,
    /// An operator paused remediation for this node; resume to leave.
    Paused,
}

impl Phase {
    /// Every phase, in declaration order.
    pub const ALL: [Phase; 8] = [
        Phase::Pending,
        Phase::Syncing,
        Phase::Synced,
        Phase::Degraded,
        Phase::Recovering,
        Phase::Failed,
        Phase::Cordoned,
        Phase::Paused,
    ];

    /// Stored and wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Syncing => "syncing",
            Phase::Synced => "synced",
            Phase::Degraded => "degraded",
            Phase::Recovering => "recovering",
            Phase::Failed => "failed",
            Phase::Cordoned => "cordoned",
            Phase::Paused => "paused",
        }
    }

    /// Parses [`Phase::as_str`].
    pub fn parse(name: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.as_str() == name)
    }
}

/// What to do about a node that stays degraded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RecoveryStrategy {
    /// Restart the node's systemd unit (`restart_unit`) or container (`restart_container`).
    Restart,
    /// Run the agent's named hook `snapshot_hook` (restore chain data from a snapshot).
    SnapshotRestore,
    /// Do nothing to the node: cordon it and alert.
    CordonAndAlert,
}

impl RecoveryStrategy {
    /// Config and wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            RecoveryStrategy::Restart => "restart",
            RecoveryStrategy::SnapshotRestore => "snapshot-restore",
            RecoveryStrategy::CordonAndAlert => "cordon-and-alert",
        }
    }
}

/// Per-node remediation policy; `[reconcile.policy]` holds the fleet defaults and
/// `[reconcile.nodes.NODE]` overrides single fields per node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncPolicy {
    /// Blocks behind the reference tip that count as out of sync. Default 10.
    pub max_block_lag: u64,
    /// `restart` | `snapshot-restore` | `cordon-and-alert`. Default `restart`.
    pub recovery_strategy: RecoveryStrategy,
    /// Remediations before the node is `failed`. Default 3.
    pub max_restart_attempts: u32,
    /// Seconds after a remediation before judging it (and the per-node cooldown between
    /// attempts). Default 30.
    pub probe_interval_seconds: u32,
    /// Minutes a node may stay syncing/recovering while catching up. Default 120.
    pub sync_timeout_minutes: u32,
    /// Seconds of `synced` after which the attempt budget resets. Default 1800.
    pub stable_reset_seconds: u32,
    /// Consecutive bad evaluations before `degraded` (hysteresis). Default 2.
    pub confirm_samples: u32,
    /// Consecutive good evaluations before `synced` again (hysteresis). Default 3.
    pub recover_samples: u32,
    /// systemd unit the `restart` strategy restarts. Default `subtensor.service`.
    pub restart_unit: String,
    /// Container the `restart` strategy restarts instead of a unit, when set. Default empty.
    pub restart_container: String,
    /// Agent hook the `snapshot-restore` strategy runs. Default `snapshot-restore`.
    pub snapshot_hook: String,
}

impl Default for SyncPolicy {
    fn default() -> Self {
        Self {
            max_block_lag: 10,
            recovery_strategy: RecoveryStrategy::Restart,
            max_restart_attempts: 3,
            probe_interval_seconds: 30,
            sync_timeout_minutes: 120,
            stable_reset_seconds: 1800,
            confirm_samples: 2,
            recover_samples: 3,
            restart_unit: "subtensor.service".to_owned(),
            restart_container: String::new(),
            snapshot_hook: "snapshot-restore".to_owned(),
        }
    }
}

/// The reconciler's memory of one node; stored in the ledger (`node_state`) after every
/// decision so a restart continues the budget and the cooldown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct NodeState {
    /// Current phase.
    pub phase: Phase,
    /// When it entered `phase`.
    pub phase_since_unix_ms: i64,
    /// Remediations carried out in the current budget.
    pub attempts: u32,
    /// When the last remediation was decided (0 = never).
    pub last_action_unix_ms: i64,
    /// Consecutive evaluations with a remediable finding.
    pub bad_streak: u32,
    /// Consecutive evaluations without one.
    pub good_streak: u32,
    /// An operator paused this node (phase `paused` until resumed).
    pub paused: bool,
}

impl NodeState {
    /// Whether the fields worth keeping across a restart differ (streaks are not kept).
    pub fn persisted_differs(&self, other: &NodeState) -> bool {
        self.phase != other.phase
            || self.attempts != other.attempts
            || self.last_action_unix_ms != other.last_action_unix_ms
            || self.paused != other.paused
    }
}

/// What the control loop observed for one evaluation (derived from findings and the registry).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Observation {
    /// Evaluation time.
    pub now_unix_ms: i64,
    /// Whether any chain figure was ever seen (false -> `pending`).
    pub has_chain: bool,
    /// Current block lag against the reference tip.
    pub block_lag: u64,
    /// The node says it is syncing (and is not frozen).
    pub syncing: bool,
    /// Kinds of the remediable findings now present (`FindingKind::remediable`).
    pub remediable: Vec<crate::detect::FindingKind>,
    /// The agent is silent: the node degrades but no command can reach it.
    pub silent: bool,
    /// A critical non-remediable finding (keystore) forbids touching the node.
    pub blocked_by: Option<crate::detect::FindingKind>,
    /// Fleet correlation holds per-node remediation for this node's network.
    pub fleet_hold: bool,
    /// No new sample arrived since the last evaluation (a tick): streaks stay as they are.
    pub stale: bool,
    /// Remediations in flight across the fleet (nodes in `recovering`), this node excluded.
    pub fleet_in_flight: usize,
    /// Fleet-wide cap on concurrent remediations.
    pub fleet_max_in_flight: usize,
}

/// One thing the plan wants done.
#[derive(Debug, Clone, PartialEq)]
pub enum PlannedAction {
    /// Send a signed command to the node's agent.
    Command {
        /// Agent action.
        action: Action,
        /// Its parameters.
        parameters: BTreeMap<String, String>,
    },
    /// Tell a human (log event `RemediationAlert`, webhook when configured).
    Alert {
        /// What and why.
        message: String,
    },
}

/// The result of one [`plan`] call.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// State after the decision (unchanged phase is fine).
    pub next: NodeState,
    /// Actions to carry out (after the decision is written).
    pub actions: Vec<PlannedAction>,
    /// Why, in one sentence (audited when the phase changes or actions are planned).
    pub reason: String,
}

impl Plan {
    /// Whether this plan is worth recording: a phase change or any action.
    pub fn is_decision(&self, before: &NodeState) -> bool {
        self.next.phase != before.phase || !self.actions.is_empty()
    }
}

/// `[reconcile]`: the reconciler's switches and the fleet's default [`SyncPolicy`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReconcileSettings {
    /// Run detectors and the reconciler. Default true.
    pub enabled: bool,
    /// Decide and record everything, send no command. Default false.
    pub dry_run: bool,
    /// Most nodes in `recovering` at once across the fleet. Default 5.
    pub max_concurrent_remediations: usize,
    /// How often every node is evaluated even without a new sample (silent agents,
    /// cooldowns, budget resets), ms. Default 1000.
    pub evaluate_interval_ms: u64,
    /// Fleet defaults.
    pub policy: SyncPolicy,
    /// Per-node overrides of single fields: `[reconcile.nodes.NODE_ID]`.
    pub nodes: BTreeMap<String, SyncPolicyOverride>,
}

impl Default for ReconcileSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            dry_run: false,
            max_concurrent_remediations: 5,
            evaluate_interval_ms: 1000,
            policy: SyncPolicy::default(),
            nodes: BTreeMap::new(),
        }
    }
}

/// One node's overrides of the fleet's [`SyncPolicy`]; unset fields keep the default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
#[allow(missing_docs)]
pub struct SyncPolicyOverride {
    pub max_block_lag: Option<u64>,
    pub recovery_strategy: Option<RecoveryStrategy>,
    pub max_restart_attempts: Option<u32>,
    pub probe_interval_seconds: Option<u32>,
    pub sync_timeout_minutes: Option<u32>,
    pub stable_reset_seconds: Option<u32>,
    pub confirm_samples: Option<u32>,
    pub recover_samples: Option<u32>,
    pub restart_unit: Option<String>,
    pub restart_container: Option<String>,
    pub snapshot_hook: Option<String>,
}

impl SyncPolicyOverride {
    /// `base` with this override's set fields.
    pub fn apply(&self, base: &SyncPolicy) -> SyncPolicy {
        let mut policy = base.clone();
        macro_rules! take {
            ($($field:ident),*) => {
                $(if let Some(value) = &self.$field {
                    policy.$field = value.clone();
                })*
            };
        }
        take!(
            max_block_lag,
            recovery_strategy,
            max_restart_attempts,
            probe_interval_seconds,
            sync_timeout_minutes,
            stable_reset_seconds,
            confirm_samples,
            recover_samples,
            restart_unit,
            restart_container,
            snapshot_hook
        );
        policy
    }
}

impl SyncPolicy {
    /// Problems with this policy, each naming the field (`at` is where it came from).
    pub fn problems(&self, at: &str) -> Vec<String> {
        let mut problems = Vec::new();
        if self.max_block_lag == 0 {
            problems.push(format!("{at}.max_block_lag must be at least 1 block"));
        }
        if self.confirm_samples == 0 || self.recover_samples == 0 {
            problems.push(format!(
                "{at}.confirm_samples and recover_samples must be at least 1"
            ));
        }
        if self.probe_interval_seconds == 0 {
            problems.push(format!("{at}.probe_interval_seconds must be at least 1"));
        }
        if self.recovery_strategy == RecoveryStrategy::Restart
            && self.restart_unit.trim().is_empty()
            && self.restart_container.trim().is_empty()
        {
            problems.push(format!(
                "{at}: recovery_strategy = \"restart\" needs restart_unit or restart_container"
            ));
        }
        if self.recovery_strategy == RecoveryStrategy::SnapshotRestore
            && self.snapshot_hook.trim().is_empty()
        {
            problems.push(format!(
                "{at}: recovery_strategy = \"snapshot-restore\" needs snapshot_hook (a hook named in the agent's [commands.hooks])"
            ));
        }
        problems
    }
}

impl ReconcileSettings {
    /// The policy for one node: the fleet default with its overrides.
    pub fn policy_for(&self, node_id: &str) -> SyncPolicy {
        match self.nodes.get(node_id) {
            Some(over) => over.apply(&self.policy),
            None => self.policy.clone(),
        }
    }

    /// Problems with these settings, each naming the field and the fix.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = self.policy.problems("reconcile.policy");
        if self.max_concurrent_remediations == 0 {
            problems.push(
                "reconcile.max_concurrent_remediations must be at least 1 (use dry_run = true to act on nothing)"
                    .to_owned(),
            );
        }
        if self.evaluate_interval_ms < 100 {
            problems.push("reconcile.evaluate_interval_ms must be at least 100".to_owned());
        }
        for (node, over) in &self.nodes {
            if let Err(e) = crate::identity::NodeId::parse(node) {
                problems.push(format!("reconcile.nodes.{node}: {e}"));
            }
            problems.extend(
                over.apply(&self.policy)
                    .problems(&format!("reconcile.nodes.{node}")),
            );
        }
        problems
    }
}
