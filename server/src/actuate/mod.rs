//! Carries out planned actions: the one place that signs an agent command, records it in the
//! ledger with its audit entry, delivers it down the agent's live stream (or logs what a dry
//! run would have sent), and tells humans (alerts, webhooks).
//!
//! Both the Fleet API (`IssueCommand`, `CancelCommand`) and the control loop come here: the
//! API through [`Actuator::issue`] and [`Actuator::cancel`], the loop by staging a pass
//! ([`Actuator::stage_command`], [`Pass`]) and handing it to [`Actuator::carry_out`], which
//! writes the whole pass in one transaction before anything leaves. For a node a `TaoNode`
//! manages, the loop's restarts go to the Kubernetes actuator ([`kubernetes`]) instead of
//! the agent.
//!
//! Modules: [`sign`] (Ed25519 command envelopes), [`live`] (the live-session table),
//! [`alert`] (the webhook), [`kubernetes`] (TaoNodes, clusters, pod deletion, status).
//!
//! # Guarantees
//! - A command is written to the ledger and the audit chain before it is sent; one that
//!   cannot be written is not sent.
//! - Commands are never queued for later: only a node with a live stream gets one.

pub mod alert;
pub mod kubernetes;
pub mod live;
pub mod notify;
pub mod sign;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guardian_proto::v1::{Command, CommandEnvelope, CommandRecord};

use crate::identity::NodeId;
use crate::metrics::{Metrics, Reason};
use crate::reconcile::Action;
use crate::store::reconcile::PassWrites;
use crate::store::{Ledger, StoreError};
use crate::unix_ms;
use alert::{Alert, Alerts};
use live::SessionTable;
use sign::{CommandError, CommandSigner};

/// How long a reconciler command stays valid: it must not run long after the decision.
const RECONCILER_COMMAND_TTL: Duration = Duration::from_secs(120);
/// How long a signed cancellation stays valid.
const CANCEL_TTL: Duration = Duration::from_secs(300);

/// Why an action was not carried out. The messages say what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ActuateError {
    /// No signing key is configured.
    #[error(
        "remote commands are off on this server: set command_signing_key_file \
         (guardianctl pki init writes command-signing-key.pk8; agents need command-verify.pub)"
    )]
    CommandsOff,
    /// The node has no live stream; nothing was signed or recorded.
    #[error(
        "node {0} has no live stream; nothing was issued (commands are never queued \
         for later: a stale restart is worse than none)"
    )]
    NotLive(NodeId),
    /// The command is one the agent would refuse.
    #[error(transparent)]
    Invalid(#[from] CommandError),
    /// The ledger did not take the record; nothing was sent.
    #[error("cannot record the command: {0}")]
    NotRecorded(StoreError),
    /// Recorded, but the stream did not take it.
    #[error("command {command_id} recorded but not delivered: {why}; it expires unexecuted")]
    NotDelivered {
        /// The recorded command.
        command_id: String,
        /// Why not.
        why: String,
    },
    /// The ledger could not answer.
    #[error("the ledger cannot answer now: {0}")]
    Ledger(StoreError),
    /// No such command.
    #[error("no command {0:?} was issued")]
    UnknownCommand(String),
    /// The command already ended.
    #[error("command {command_id} already ended ({state}): nothing to cancel")]
    AlreadyEnded {
        /// The command.
        command_id: String,
        /// Its final state.
        state: String,
    },
}

impl ActuateError {
    /// Stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ActuateError::CommandsOff => "commands_off",
            ActuateError::NotLive(_) => "not_live",
            ActuateError::Invalid(_) => "invalid",
            ActuateError::NotRecorded(_) => "not_recorded",
            ActuateError::NotDelivered { .. } => "not_delivered",
            ActuateError::Ledger(_) => "ledger",
            ActuateError::UnknownCommand(_) => "unknown_command",
            ActuateError::AlreadyEnded { .. } => "already_ended",
        }
    }
}

/// A signed command, not yet sent.
#[derive(Debug, Clone)]
pub struct Signed {
    /// The node it is for.
    pub node: NodeId,
    /// What it asks.
    pub action: Action,
    /// The envelope (what the ledger records).
    pub envelope: CommandEnvelope,
    /// The wire form (envelope bytes + signature).
    command: Command,
}

/// What one control-loop pass decided: written to the ledger in one transaction by
/// [`Actuator::carry_out`], then carried out.
#[derive(Debug, Default)]
pub struct Pass {
    /// Everything the ledger records for the pass (findings, decisions, states, commands).
    pub writes: PassWrites,
    /// Signed commands to send once written, with the arrival of the batch that tipped them.
    sends: Vec<(Signed, Option<Instant>)>,
    /// Commands a dry run would have sent.
    dry_runs: Vec<(NodeId, Action, BTreeMap<String, String>)>,
    /// Restarts for the Kubernetes actuator, queued once written.
    kube_restarts: Vec<(NodeId, kubernetes::Managed, String, Option<Instant>)>,
    /// Snapshot-restores for the Kubernetes actuator, started once written.
    kube_restores: Vec<(NodeId, kubernetes::Managed, String)>,
    /// Alerts to raise once written.
    pub alerts: Vec<Alert>,
    /// Decisions to log once written: node, from, to, attempts, reason.
    pub decided: Vec<(NodeId, &'static str, &'static str, u32, String)>,
}

/// Carries out actions: signs, records, delivers, alerts. Cheap to clone.
#[derive(Clone)]
pub struct Actuator {
    /// Signs envelopes; `None` when `command_signing_key_file` is not set.
    signer: Option<Arc<CommandSigner>>,
    sessions: Arc<SessionTable>,
    ledger: Ledger,
    metrics: Arc<Metrics>,
    alerts: Alerts,
    dry_run: bool,
    /// The Kubernetes actuator, when clusters are configured.
    kube: Option<Arc<kubernetes::Kubernetes>>,
}

impl std::fmt::Debug for Actuator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Actuator")
            .field("commands", &self.signer.is_some())
            .field("dry_run", &self.dry_run)
            .finish_non_exhaustive()
    }
}

/// Starts the actuator from the server's config: loads the command signing key (none: commands
/// off), starts the webhook sender and, with `[kubernetes]` clusters, the Kubernetes actuator
/// on `tasks` (ending on `shutdown`).
///
/// # Errors
/// A message when `command_signing_key_file` cannot be read or is not an Ed25519 key, or a
/// cluster's kubeconfig cannot make a client.
pub async fn start(
    config: &crate::config::ServerConfig,
    sessions: Arc<SessionTable>,
    registry: Arc<crate::registry::Registry>,
    ledger: Ledger,
    metrics: &Arc<Metrics>,
    shutdown: &tokio_util::sync::CancellationToken,
    tasks: &tokio_util::task::TaskTracker,
) -> Result<Actuator, String> {
    let signer = CommandSigner::from_config(&config.command_signing_key_file)
        .map_err(|e| e.to_string())?
        .map(Arc::new);
    let alerts = Alerts::spawn(&config.alerts, Arc::clone(metrics), shutdown.clone(), tasks);
    let kube = kubernetes::Kubernetes::start(
        &config.kubernetes,
        ledger.clone(),
        registry,
        Arc::clone(metrics),
        alerts.clone(),
        config.reconcile.dry_run,
        shutdown,
        tasks,
    )
    .await
    .map_err(|e| e.to_string())?;
    let mut actuator = Actuator::new(
        signer,
        sessions,
        ledger,
        Arc::clone(metrics),
        alerts,
        config.reconcile.dry_run,
    );
    actuator.kube = kube;
    Ok(actuator)
}

impl Actuator {
    /// An actuator signing with `signer` (None = commands off), delivering through
    /// `sessions`, recording in `ledger`. With `dry_run`, the control loop's commands are
    /// logged, not signed or sent (operators' commands still go).
    pub fn new(
        signer: Option<Arc<CommandSigner>>,
        sessions: Arc<SessionTable>,
        ledger: Ledger,
        metrics: Arc<Metrics>,
        alerts: Alerts,
        dry_run: bool,
    ) -> Self {
        Self {
            signer,
            sessions,
            ledger,
            metrics,
            alerts,
            dry_run,
            kube: None,
        }
    }

    /// Whether commands can be signed (a signing key is configured).
    pub fn commands_on(&self) -> bool {
        self.signer.is_some()
    }

    /// Whether the loop's remediations of `node` can be carried out: a TaoNode manages it
    /// (the Kubernetes actuator acts), or commands can be signed for its agent.
    pub fn can_remediate(&self, node: &NodeId) -> bool {
        self.signer.is_some() || self.managed(node).is_some()
    }

    /// The TaoNode managing `node`, when Kubernetes is on and one names it.
    pub fn managed(&self, node: &NodeId) -> Option<kubernetes::Managed> {
        self.kube.as_ref()?.managed(node)
    }

    /// The Kubernetes actuator, when clusters are configured.
    pub fn kubernetes(&self) -> Option<&Arc<kubernetes::Kubernetes>> {
        self.kube.as_ref()
    }

    /// Whether the control loop's commands are only logged.
    pub fn dry_run(&self) -> bool {
        self.dry_run
    }

    /// The webhook sender.
    pub fn alerts(&self) -> &Alerts {
        &self.alerts
    }

    /// Signs one command for `node`, valid from now for `ttl`.
    fn sign(
        &self,
        node: &NodeId,
        action: Action,
        parameters: HashMap<String, String>,
        ttl: Duration,
    ) -> Result<Signed, ActuateError> {
        let signer = self.signer.as_ref().ok_or(ActuateError::CommandsOff)?;
        let (envelope, command) = signer.issue(node, action, parameters, ttl, unix_ms())?;
        Ok(Signed {
            node: node.clone(),
            action,
            envelope,
            command,
        })
    }

    /// Sends a recorded command down its node's live stream.
    async fn deliver(&self, signed: Signed) -> Result<(), String> {
        self.sessions
            .send_command(&signed.node, signed.command)
            .await
    }

    /// Signs, records (with its audit entry) and delivers one operator command; returns its
    /// id. A node without a live stream gets nothing (checked before signing).
    ///
    /// # Errors
    /// [`ActuateError`]: commands off, no live stream, an invalid command, a ledger that
    /// did not take the record (nothing sent), or a stream that did not take it.
    pub async fn issue(
        &self,
        node: &NodeId,
        action: Action,
        parameters: HashMap<String, String>,
        ttl: Duration,
        issued_by: &str,
    ) -> Result<String, ActuateError> {
        if self.signer.is_none() {
            return Err(ActuateError::CommandsOff);
        }
        if !self.sessions.is_live(node) {
            return Err(ActuateError::NotLive(node.clone()));
        }
        let signed = self.sign(node, action, parameters, ttl)?;
        // Written (and audited) before it leaves: a command is never sent unrecorded.
        self.ledger
            .record_command_issued(&signed.envelope, issued_by)
            .await
            .map_err(ActuateError::NotRecorded)?;
        let command_id = signed.envelope.command_id.clone();
        tracing::info!(node = %node, command_id, action = action.as_str(), issued_by, "CommandIssued");
        if let Err(why) = self.deliver(signed).await {
            tracing::warn!(node = %node, command_id, why, "CommandNotDelivered");
            return Err(ActuateError::NotDelivered { command_id, why });
        }
        Ok(command_id)
    }

    /// Marks command `command_id` cancelled in the ledger (audited) and tells a live agent,
    /// signed, never to run it and to stop it if it runs. The ledger already says cancelled,
    /// so a late outcome is kept out of the record either way.
    ///
    /// # Errors
    /// [`ActuateError::Ledger`], [`ActuateError::UnknownCommand`], or
    /// [`ActuateError::AlreadyEnded`] when there is nothing to cancel.
    pub async fn cancel(
        &self,
        command_id: &str,
        operator: &str,
        reason: &str,
    ) -> Result<CommandRecord, ActuateError> {
        let (record, cancelled_now) = self
            .ledger
            .cancel_command(command_id, operator, reason, unix_ms())
            .await
            .map_err(ActuateError::Ledger)?
            .ok_or_else(|| ActuateError::UnknownCommand(command_id.to_owned()))?;
        if !cancelled_now {
            return Err(ActuateError::AlreadyEnded {
                command_id: record.command_id,
                state: record.state,
            });
        }
        tracing::info!(
            command_id = record.command_id,
            node = record.node_id,
            operator,
            "CommandCancelled"
        );
        if let Ok(node) = NodeId::parse(&record.node_id)
            && self.signer.is_some()
            && self.sessions.is_live(&node)
        {
            let parameters = HashMap::from([("command_id".to_owned(), record.command_id.clone())]);
            match self
                .issue(
                    &node,
                    Action::CancelCommand,
                    parameters,
                    CANCEL_TTL,
                    &format!("operator/{operator}"),
                )
                .await
            {
                Ok(_) | Err(ActuateError::NotRecorded(_)) => {}
                Err(ActuateError::NotDelivered { why, .. }) => {
                    tracing::warn!(node = %node, why, "CancelNotDelivered");
                }
                Err(error) => tracing::warn!(%error, "CancelNotSigned"),
            }
        }
        Ok(record)
    }

    /// Stages a control-loop command into `pass`: signed now, recorded with the pass and sent
    /// after its commit by [`Actuator::carry_out`]. In a dry run it is only logged then.
    pub fn stage_command(
        &self,
        pass: &mut Pass,
        node: &NodeId,
        action: Action,
        parameters: BTreeMap<String, String>,
        arrived: Option<Instant>,
    ) {
        if let Some(managed) = self.managed(node) {
            self.stage_kubernetes(pass, node, managed, action, parameters, arrived);
            return;
        }
        if self.dry_run {
            pass.dry_runs.push((node.clone(), action, parameters));
            return;
        }
        match self.sign(
            node,
            action,
            parameters.into_iter().collect(),
            RECONCILER_COMMAND_TTL,
        ) {
            Ok(signed) => {
                pass.writes
                    .commands
                    .push((signed.envelope.clone(), "reconciler".to_owned()));
                pass.sends.push((signed, arrived));
            }
            Err(ActuateError::CommandsOff) => {
                tracing::warn!(node = %node, action = action.as_str(), "RemediationImpossible: remote commands are off (command_signing_key_file)");
            }
            Err(error) => tracing::error!(node = %node, %error, "RemediationNotSigned"),
        }
    }

    /// Stages a loop action for a Kubernetes-managed node: a restart deletes its pod (after
    /// the pass is written); what Kubernetes cannot do yet is alerted, never sent to the agent.
    fn stage_kubernetes(
        &self,
        pass: &mut Pass,
        node: &NodeId,
        managed: kubernetes::Managed,
        action: Action,
        parameters: BTreeMap<String, String>,
        arrived: Option<Instant>,
    ) {
        let reason = format!(
            "the reconciler decided {} ({parameters:?})",
            action.as_str()
        );
        match action {
            Action::RestartUnit | Action::RestartContainer if self.dry_run => {
                tracing::info!(
                    node = %node,
                    cluster = managed.cluster,
                    taonode = managed.name,
                    action = "delete-pod",
                    "RemediationDryRun: nothing written to Kubernetes"
                );
            }
            Action::RestartUnit | Action::RestartContainer => {
                pass.kube_restarts.push((node.clone(), managed, reason, arrived));
            }
            Action::RunHook if managed.spec.snapshot_restore.is_some() && self.dry_run => {
                tracing::info!(
                    node = %node,
                    cluster = managed.cluster,
                    taonode = managed.name,
                    action = "snapshot-restore",
                    "RemediationDryRun: nothing written to Kubernetes"
                );
            }
            Action::RunHook if managed.spec.snapshot_restore.is_some() => {
                pass.kube_restores.push((node.clone(), managed, reason));
            }
            other => pass.alerts.push(Alert {
                event: "remediation_alert",
                node_id: node.to_string(),
                network: managed.spec.network.clone(),
                kind: "kubernetes_unsupported".to_owned(),
                severity: "critical",
                summary: format!(
                    "{node}: {} is not carried out through Kubernetes yet (TaoNode {}/{} in cluster {}); nothing was done",
                    other.as_str(),
                    managed.namespace,
                    managed.name,
                    managed.cluster
                ),
                at_unix_ms: unix_ms(),
            }),
        }
    }

    /// Writes `pass` (one transaction) and only then carries it out: logs and alerts for
    /// raised findings, decisions, dry runs, commands down the live streams, remediation
    /// alerts. Returns the ids of the raised findings, in `pass.writes.raised` order.
    ///
    /// # Errors
    /// A pass that cannot be written is dropped whole: nothing is sent (logged
    /// `DecisionNotRecorded`), and the next evaluation decides again.
    pub async fn carry_out(&self, pass: Pass) -> Result<Vec<u64>, StoreError> {
        let now = unix_ms();
        if !crate::fence::may_act() {
            // Deposed: another server may hold the ledger now. Nothing is written or sent.
            tracing::warn!(
                decisions = pass.writes.decisions.len(),
                "PassDropped: this server lost the ledger's lock"
            );
            return Err(StoreError::Locked {
                ledger: "the ledger".into(),
                holder: "another server (this one lost the lock)".into(),
            });
        }
        let ids = if pass.writes.is_empty() {
            Vec::new()
        } else {
            let started = std::time::Instant::now();
            let written = self
                .ledger
                .write_pass(&pass.writes, now)
                .await
                .inspect_err(|error| {
                    tracing::error!(%error, decisions = pass.writes.decisions.len(), "DecisionNotRecorded: nothing of this pass is carried out");
                })?;
            self.metrics
                .reconcile_pass_write_seconds
                .observe(started.elapsed().as_secs_f64());
            written
        };
        for raised in &pass.writes.raised {
            let finding = &raised.finding;
            let kind = finding.kind.as_str();
            self.metrics
                .findings_raised
                .get_or_create(&Reason { reason: kind })
                .inc();
            let key = if raised.node_id.is_empty() {
                format!("network:{}", raised.network)
            } else {
                raised.node_id.clone()
            };
            tracing::info!(
                node = key,
                kind,
                severity = finding.severity.as_str(),
                score = finding.score,
                summary = finding.summary,
                "FindingRaised"
            );
            if self.alerts.wants(finding.severity) {
                self.alerts.send(Alert {
                    event: "finding_raised",
                    node_id: raised.node_id.clone(),
                    network: raised.network.clone(),
                    kind: kind.to_owned(),
                    severity: finding.severity.as_str(),
                    summary: finding.summary.clone(),
                    at_unix_ms: now,
                });
            }
        }
        for cleared in &pass.writes.cleared {
            // Routes send a "resolved" message only for what they sent the trigger of.
            self.alerts.send(Alert {
                event: "finding_cleared",
                node_id: cleared.node_id.clone(),
                network: cleared.network.clone(),
                kind: cleared.kind.clone(),
                severity: "info",
                summary: format!("{} cleared", cleared.kind),
                at_unix_ms: now,
            });
        }
        for (node, from, to, attempts, reason) in &pass.decided {
            tracing::info!(node = %node, from, to, attempts, reason, "PhaseDecided");
            // Cordon-and-alert through Kubernetes: the node of a managed validator's pod.
            if *to == "cordoned"
                && *from != "cordoned"
                && let Some(kube) = &self.kube
                && let Some(managed) = kube.managed(node)
            {
                if self.dry_run {
                    tracing::info!(node = %node, cluster = managed.cluster, "RemediationDryRun: the Kubernetes node would be cordoned; nothing written");
                } else {
                    kube.cordon(node, managed, reason.clone());
                }
            }
        }
        for (id, action, parameters) in &pass.dry_runs {
            tracing::info!(node = %id, action = action.as_str(), ?parameters, "RemediationDryRun");
        }
        for (signed, arrived) in pass.sends {
            let (node, action) = (signed.node.clone(), signed.action);
            let command_id = signed.envelope.command_id.clone();
            match self.deliver(signed).await {
                Ok(()) => {
                    if let Some(arrived) = arrived {
                        self.metrics
                            .decision_latency_seconds
                            .observe(arrived.elapsed().as_secs_f64());
                    }
                    self.metrics
                        .remediations_issued
                        .get_or_create(&Reason {
                            reason: action.as_str(),
                        })
                        .inc();
                    tracing::info!(node = %node, command_id, action = action.as_str(), "RemediationIssued");
                }
                Err(why) => {
                    tracing::warn!(node = %node, command_id, why, "RemediationNotDelivered");
                }
            }
        }
        if let Some(kube) = &self.kube {
            for (node, managed, reason, arrived) in pass.kube_restarts {
                kube.restart(&node, managed, reason, arrived);
            }
            for (node, managed, reason) in pass.kube_restores {
                Arc::clone(kube).snapshot_restore(node, managed, reason);
            }
        }
        for alert in pass.alerts {
            self.metrics.remediation_alerts.inc();
            tracing::warn!(
                node = alert.node_id,
                message = alert.summary,
                "RemediationAlert"
            );
            self.alerts.send(alert);
        }
        Ok(ids)
    }
}
