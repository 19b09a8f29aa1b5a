//! The `TaoNode` custom resource (`guardian.taonode.io/v1alpha1`, namespaced): which agent a
//! validator is, which workload runs its subtensor node, and (written by the server) how it
//! stands. The CRD YAML under `deploy/` is generated from these types
//! (`guardianctl kube crd`).

use kube::CustomResource;
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::reconcile::{RecoveryStrategy, SyncPolicyOverride};

/// The field manager of every status the server applies.
pub const FIELD_MANAGER: &str = "taonode-guardian";

/// What a `TaoNode` declares.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "guardian.taonode.io",
    version = "v1alpha1",
    kind = "TaoNode",
    plural = "taonodes",
    shortname = "tn",
    namespaced,
    status = "TaoNodeStatus",
    printcolumn = r#"{"name":"NODE","type":"string","jsonPath":".spec.nodeId"}"#,
    printcolumn = r#"{"name":"PHASE","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"LAG","type":"integer","jsonPath":".status.blockLag"}"#,
    printcolumn = r#"{"name":"RISK","type":"number","jsonPath":".status.risk"}"#,
    printcolumn = r#"{"name":"LAST-ACTION","type":"string","jsonPath":".status.lastRemediation.action"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TaoNodeSpec {
    /// The agent's node id (its certificate's identity).
    pub node_id: String,
    /// The workload that runs the validator's subtensor node.
    pub workload: Workload,
    /// The Bittensor network (`finney`, `test`, ...).
    #[serde(default)]
    pub network: String,
    /// The subnet the validator serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netuid: Option<u16>,
    /// The validator's hotkey, public ss58 address (never a secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotkey: Option<String>,
    /// Overrides of single fields of the server's `[reconcile.policy]` for this node (they
    /// win over `[reconcile.nodes.NODE]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_policy: Option<TaoNodeSyncPolicy>,
    /// The highest memory limit the server may give the container (a quantity, e.g. `64Gi`);
    /// unset = OOMKilled remediation off for this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_ceiling: Option<String>,
    /// When OOMKilled remediation raises the memory limit (defaults: 3 kills in 60 minutes,
    /// times 1.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_remediation: Option<OomRemediation>,
    /// The chain-data volume the server may grow when it is filling (unset = never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain_volume: Option<ChainVolume>,
    /// How the `snapshot-restore` strategy restores this node's chain data (unset: that
    /// strategy is alerted, not carried out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_restore: Option<SnapshotRestore>,
}

/// Snapshot-restore: scale the workload to 0, run this Job, wait for it, scale back.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotRestore {
    /// The restore Job's `spec` (`batch/v1` JobSpec: its pod template mounts the chain
    /// volume and fills it from a snapshot). Run in the TaoNode's namespace.
    #[schemars(schema_with = "preserve_unknown_fields")]
    pub job: serde_json::Value,
    /// Longest the scale-down and the Job may each take, minutes. Default 120.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_minutes: Option<u32>,
}

/// An object schema Kubernetes keeps whole (`x-kubernetes-preserve-unknown-fields`).
fn preserve_unknown_fields(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

/// Where a snapshot-restore stands, in the TaoNode's status so that a restarted server
/// resumes it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreProgress {
    /// `scaling-down`, `restoring`, `scaling-up`, `done` or `failed`.
    pub step: String,
    /// The workload's replicas before it was scaled to 0 (what it gets back).
    pub replicas: i32,
    /// The restore Job's name (set from `restoring`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub job: String,
    /// When the restore started, RFC 3339 UTC.
    pub started: String,
    /// For humans: the last thing that happened.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// The restore Job failed or ran out of time (the workload is scaled back regardless).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub job_failed: bool,
}

/// Chain storage auto-expansion: the PersistentVolumeClaim that holds the chain data.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChainVolume {
    /// The claim, in the TaoNode's namespace.
    pub claim_name: String,
    /// The largest size the server may request (a quantity, e.g. `4Ti`).
    pub maximum: String,
    /// The requested size is multiplied by this (at most up to `maximum`). Default 1.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    /// Grow when the `storage_full` forecast says the volume fills within this many hours.
    /// Default 72 (acted on once the server's `[detect] storage_full_within_hours`, default
    /// 24, raises the finding: set it to at least this).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub horizon_hours: Option<f64>,
    /// Least minutes between two expansions (and never while a resize is pending). Default 60.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cooldown_minutes: Option<u32>,
}

impl ChainVolume {
    /// `(factor, horizon hours, cooldown ms)` with defaults, bounded (factor 1.05..=4).
    pub fn effective(&self) -> (f64, f64, i64) {
        (
            self.factor.unwrap_or(1.5).clamp(1.05, 4.0),
            self.horizon_hours.unwrap_or(72.0).max(0.0),
            i64::from(self.cooldown_minutes.unwrap_or(60).max(1)) * 60_000,
        )
    }
}

/// OOMKilled remediation thresholds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OomRemediation {
    /// OOM kills of the container within the window that call for a raise. Default 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kills: Option<u32>,
    /// The window, minutes; also the least time between two raises. Default 60.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_minutes: Option<u32>,
    /// The limit is multiplied by this (at most up to `memoryCeiling`). Default 1.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
}

impl OomRemediation {
    /// `(kills, window in ms, factor)` with the defaults filled in and bounded (kills >= 1,
    /// window >= 1 minute, factor in 1.05..=4).
    pub fn effective(&self) -> (usize, i64, f64) {
        let kills = usize::try_from(self.kills.unwrap_or(3).max(1)).unwrap_or(3);
        let window = i64::from(self.window_minutes.unwrap_or(60).max(1)) * 60_000;
        let factor = self.factor.unwrap_or(1.5).clamp(1.05, 4.0);
        (kills, window, factor)
    }
}

/// The validator's workload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    /// `StatefulSet` or `Deployment`.
    pub kind: WorkloadKind,
    /// Its name, in the TaoNode's namespace.
    pub name: String,
    /// The subtensor container in its pods.
    pub container: String,
}

/// Which kind of workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum WorkloadKind {
    /// `apps/v1` StatefulSet.
    StatefulSet,
    /// `apps/v1` Deployment.
    Deployment,
}

impl WorkloadKind {
    /// The kind's name.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::StatefulSet => "StatefulSet",
            WorkloadKind::Deployment => "Deployment",
        }
    }
}

/// The per-node policy fields a TaoNode may set (those of `[reconcile.nodes.NODE]` that mean
/// something in Kubernetes).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaoNodeSyncPolicy {
    /// Blocks behind the reference tip that count as out of sync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_block_lag: Option<u64>,
    /// `restart` or `cordon-and-alert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_strategy: Option<TaoNodeStrategy>,
    /// Remediations before the node is `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_restart_attempts: Option<u32>,
    /// Seconds after a remediation before judging it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_interval_seconds: Option<u32>,
    /// Minutes a node may stay syncing/recovering while catching up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_timeout_minutes: Option<u32>,
}

/// The strategies a TaoNode may choose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum TaoNodeStrategy {
    /// Delete the validator's pod; its controller makes a new one.
    Restart,
    /// Alert only (the node is marked, nothing restarted).
    CordonAndAlert,
}

impl TaoNodeSyncPolicy {
    /// As a `[reconcile.nodes.NODE]` override.
    pub fn to_override(&self) -> SyncPolicyOverride {
        SyncPolicyOverride {
            max_block_lag: self.max_block_lag,
            recovery_strategy: self.recovery_strategy.map(|s| match s {
                TaoNodeStrategy::Restart => RecoveryStrategy::Restart,
                TaoNodeStrategy::CordonAndAlert => RecoveryStrategy::CordonAndAlert,
            }),
            max_restart_attempts: self.max_restart_attempts,
            probe_interval_seconds: self.probe_interval_seconds,
            sync_timeout_minutes: self.sync_timeout_minutes,
            ..SyncPolicyOverride::default()
        }
    }
}

/// How the node stands, written by the server (server-side apply, field manager
/// [`FIELD_MANAGER`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaoNodeStatus {
    /// The reconciler's phase (`pending`, `synced`, `syncing`, `degraded`, `recovering`,
    /// `failed`, `paused`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Blocks behind the network's tip.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_lag: Option<u64>,
    /// Composite risk, 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub risk: Option<f64>,
    /// Open findings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_findings: Option<u32>,
    /// Remediations in the current budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// The last remediation carried out through Kubernetes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_remediation: Option<LastRemediation>,
    /// `Ready` (the node is synced) and `Remediating`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The spec generation this status was written for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The snapshot-restore in progress (or the last one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreProgress>,
}

/// One remediation and how it ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastRemediation {
    /// What was done (`delete-pod`).
    pub action: String,
    /// When, RFC 3339 UTC.
    pub time: String,
    /// `succeeded`, `failed: ...`, `dry-run`.
    pub outcome: String,
}

/// A status condition, as Kubernetes conventions have it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready` or `Remediating`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// A CamelCase reason.
    pub reason: String,
    /// For humans.
    pub message: String,
    /// When the status last changed, RFC 3339 UTC.
    pub last_transition_time: String,
}

/// The CRD as YAML, what `deploy/crds/taonodes.yaml` holds.
///
/// # Panics
/// Never in practice: the CRD is plain data that always serializes.
pub fn crd_yaml() -> String {
    let crd = TaoNode::crd();
    let body = serde_yaml::to_string(&crd).unwrap_or_else(|e| panic!("the CRD serializes: {e}"));
    format!(
        "# Generated by `guardianctl kube crd` from server/src/actuate/kubernetes/crd.rs; do not edit.\n{body}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checked_in_crd_is_the_generated_one() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crds/taonodes.yaml");
        let checked_in = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            checked_in == crd_yaml(),
            "{path} differs from the types in crd.rs: regenerate it with \
             `cargo run -p guardian-server --bin guardianctl -- kube crd > deploy/crds/taonodes.yaml`"
        );
    }

    #[test]
    fn kubectl_get_shows_node_phase_lag_risk_last_action_and_age() {
        let crd = TaoNode::crd();
        let columns: Vec<String> = crd.spec.versions[0]
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| format!("{}={}", c.name, c.json_path))
            .collect();
        assert_eq!(
            columns,
            [
                "NODE=.spec.nodeId",
                "PHASE=.status.phase",
                "LAG=.status.blockLag",
                "RISK=.status.risk",
                "LAST-ACTION=.status.lastRemediation.action",
                "AGE=.metadata.creationTimestamp"
            ]
        );
        assert!(
            crd.spec.versions[0]
                .subresources
                .as_ref()
                .is_some_and(|s| s.status.is_some())
        );
    }
}
