//! Drives the control loop: after each committed batch (and on a steady tick for nodes that
//! went quiet) it runs the detectors over the node's window, observes
//! ([`reconcile::observe`]), asks [`reconcile::plan`] what to do, stages raised and cleared
//! findings and the decision, and hands the pass to [`crate::actuate`], which writes it to the
//! ledger and only then carries it out: a signed command down the agent's live stream, or an
//! alert.
//!
//! One task owns every node's [`NodeState`]; ingest wakes it through a [`Trigger`] and the
//! Fleet API reaches it through a [`ReconcileHandle`] (pause, resume).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::actuate::Actuator;
use crate::actuate::alert::Alert;
use crate::actuate::kubernetes::NodeFigures;
use crate::detect::fleet::{self, NodeHealth};
use crate::detect::{self, DetectPolicy, Finding, FindingKind, FleetContext, Severity};
use crate::identity::NodeId;
use crate::metrics::Metrics;
use crate::reconcile::observe::{self, ChainView, LagHistory};
use crate::reconcile::{NodeState, Phase, Plan, PlannedAction, ReconcileSettings, SyncPolicy};
use crate::registry::{ReconcileFigures, Registry};
use crate::store::Ledger;
use crate::store::reconcile::{ClearedFinding, DecisionWrite, RaisedFinding};
use crate::unix_ms;

/// Nodes with new samples, each with the arrival time of its oldest unevaluated batch.
#[derive(Debug, Default)]
pub struct Trigger {
    pending: Mutex<HashMap<NodeId, Instant>>,
    wake: Notify,
}

impl Trigger {
    /// A batch for `node` that arrived at `arrived` was committed.
    pub fn sample(&self, node: &NodeId, arrived: Instant) {
        {
            let mut pending = self
                .pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            pending.entry(node.clone()).or_insert(arrived);
        }
        self.wake.notify_one();
    }

    fn take(&self) -> HashMap<NodeId, Instant> {
        std::mem::take(
            &mut *self
                .pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

/// An operator's request to the reconciler.
#[derive(Debug)]
enum Request {
    Pause {
        node: NodeId,
        operator: String,
        reason: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Resume {
        node: NodeId,
        operator: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// The Fleet API's way in (pause, resume); cheap to clone.
#[derive(Debug, Clone)]
pub struct ReconcileHandle {
    trigger: Arc<Trigger>,
    requests: Option<mpsc::Sender<Request>>,
}

impl ReconcileHandle {
    /// A handle to a reconciler that is off: samples are ignored, pause/resume refused.
    pub fn disabled() -> Self {
        Self {
            trigger: Arc::default(),
            requests: None,
        }
    }

    /// What ingest wakes the control loop with (`None` when it is off).
    pub fn trigger(&self) -> Option<Arc<Trigger>> {
        self.requests.as_ref().map(|_| Arc::clone(&self.trigger))
    }

    /// Stops automatic remediation of `node` until [`ReconcileHandle::resume`].
    ///
    /// # Errors
    /// Why not (reconciler off, unknown node, ledger unavailable).
    pub async fn pause(&self, node: NodeId, operator: &str, reason: &str) -> Result<(), String> {
        self.ask(|reply| Request::Pause {
            node,
            operator: operator.to_owned(),
            reason: reason.to_owned(),
            reply,
        })
        .await
    }

    /// Hands a paused or cordoned node back to the reconciler (from `pending`).
    ///
    /// # Errors
    /// Why not (reconciler off, unknown node, ledger unavailable).
    pub async fn resume(&self, node: NodeId, operator: &str) -> Result<(), String> {
        self.ask(|reply| Request::Resume {
            node,
            operator: operator.to_owned(),
            reply,
        })
        .await
    }

    async fn ask(
        &self,
        request: impl FnOnce(oneshot::Sender<Result<(), String>>) -> Request,
    ) -> Result<(), String> {
        let Some(requests) = &self.requests else {
            return Err(
                "the reconciler is off on this server ([reconcile] enabled = false)".to_owned(),
            );
        };
        let (reply, answer) = oneshot::channel();
        requests
            .send(request(reply))
            .await
            .map_err(|_| "the reconciler has stopped (server shutting down)".to_owned())?;
        answer
            .await
            .map_err(|_| "the reconciler stopped before answering".to_owned())?
    }
}

/// What the control loop needs from the rest of the server.
#[derive(Debug)]
pub struct Parts {
    /// `[reconcile]`.
    pub settings: ReconcileSettings,
    /// `[detect]`.
    pub detect: DetectPolicy,
    /// The fleet in memory.
    pub registry: Arc<Registry>,
    /// The ledger.
    pub ledger: Ledger,
    /// Carries out what the loop decides.
    pub actuator: Actuator,
    /// Counters.
    pub metrics: Arc<Metrics>,
}

/// Starts the control loop on `tasks` when `[reconcile] enabled` (else a handle that ignores
/// samples and refuses pause/resume).
///
/// # Errors
/// [`crate::store::StoreError`] when the stored state cannot be read.
pub async fn start(
    config: &crate::config::ServerConfig,
    registry: &Arc<Registry>,
    ledger: &Ledger,
    actuator: &Actuator,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
    tasks: &TaskTracker,
) -> Result<ReconcileHandle, crate::store::StoreError> {
    if !config.reconcile.enabled {
        tracing::warn!("[reconcile] enabled = false: no detectors, no remediation");
        return Ok(ReconcileHandle::disabled());
    }
    spawn(
        Parts {
            settings: config.reconcile.clone(),
            detect: config.detect.clone(),
            registry: Arc::clone(registry),
            ledger: ledger.clone(),
            actuator: actuator.clone(),
            metrics: Arc::clone(metrics),
        },
        shutdown.clone(),
        tasks,
    )
    .await
}

/// Loads the stored states and open findings, then spawns the loop on `tasks` (it ends when
/// `shutdown` is cancelled).
///
/// # Errors
/// [`crate::store::StoreError`] when the stored state cannot be read.
pub async fn spawn(
    parts: Parts,
    shutdown: CancellationToken,
    tasks: &TaskTracker,
) -> Result<ReconcileHandle, crate::store::StoreError> {
    let mut states = HashMap::new();
    for (node, state) in parts.ledger.node_states().await? {
        if let Ok(id) = NodeId::parse(&node) {
            states.insert(id, state);
        }
    }
    let open = parts.ledger.open_findings().await?;
    if !parts.actuator.commands_on() && !parts.settings.dry_run {
        tracing::warn!(
            "reconciler runs without command_signing_key_file: it decides and alerts, but cannot send a remediation"
        );
    }
    let trigger = Arc::new(Trigger::default());
    let (requests, inbox) = mpsc::channel(64);
    let mut runner = Runner {
        in_flight: states
            .iter()
            .filter(|(_, s)| s.phase == Phase::Recovering)
            .map(|(id, _)| id.clone())
            .collect(),
        states,
        open: OpenFindings::from(open),
        current: HashMap::new(),
        health: FleetHealth::default(),
        contexts: HashMap::new(),
        evaluated: HashMap::new(),
        policies: HashMap::new(),
        lags: HashMap::new(),
        heard: HashSet::new(),
        started_unix_ms: unix_ms(),
        trigger: Arc::clone(&trigger),
        parts,
    };
    for (id, state) in &runner.states {
        runner.parts.registry.set_reconcile(
            id,
            &ReconcileFigures {
                phase: state.phase.as_str().to_owned(),
                phase_since_unix_ms: state.phase_since_unix_ms,
                attempts: state.attempts,
                paused: state.paused,
                ..ReconcileFigures::default()
            },
        );
    }
    let span = tracing::info_span!("reconciler");
    tasks.spawn(async move { runner.run(inbox, shutdown).await }.instrument(span));
    Ok(ReconcileHandle {
        trigger,
        requests: Some(requests),
    })
}

struct Runner {
    parts: Parts,
    trigger: Arc<Trigger>,
    states: HashMap<NodeId, NodeState>,
    /// Open findings, by node id or "network:NAME".
    open: OpenFindings,
    /// Each node's findings at its last evaluation (risk, API).
    current: HashMap<NodeId, Vec<Finding>>,
    /// Each node's network and whether it has a remediable finding now.
    health: FleetHealth,
    /// Per network: best block and median peers, refreshed each tick.
    contexts: HashMap<String, FleetContext>,
    /// When each node was last evaluated (the tick skips fresh ones).
    evaluated: HashMap<NodeId, Instant>,
    /// Per node: its sync policy and detector thresholds (from the settings).
    policies: HashMap<NodeId, Arc<(SyncPolicy, DetectPolicy)>>,
    /// Nodes in `recovering`.
    in_flight: HashSet<NodeId>,
    /// Each node's recent lag per fresh sample (is it catching up?).
    lags: HashMap<NodeId, LagHistory>,
    /// Nodes that delivered a sample since this server started: only their findings may be
    /// cleared (before that, a detector without input says nothing about the node).
    heard: HashSet<NodeId>,
    /// When this reconciler started (silence is not judged before `silent_after_ms` of it).
    started_unix_ms: i64,
}

/// Each node's network and whether it has a remediable finding now, with per-network
/// counts kept in step so that the fleet share costs one lookup per evaluation, not a walk
/// over the fleet.
#[derive(Debug, Default)]
struct FleetHealth {
    nodes: HashMap<NodeId, (String, bool)>,
    /// Per network: (nodes, degraded nodes).
    counts: HashMap<String, (usize, usize)>,
}

impl FleetHealth {
    fn set(&mut self, id: &NodeId, network: &str, degraded: bool) {
        if let Some((was_network, was_degraded)) = self.nodes.get(id) {
            if was_network == network && *was_degraded == degraded {
                return;
            }
            if let Some(count) = self.counts.get_mut(was_network) {
                count.0 -= 1;
                count.1 -= usize::from(*was_degraded);
                if count.0 == 0 {
                    self.counts.remove(was_network);
                }
            }
        }
        let count = self.counts.entry(network.to_owned()).or_default();
        count.0 += 1;
        count.1 += usize::from(degraded);
        self.nodes
            .insert(id.clone(), (network.to_owned(), degraded));
    }

    /// `(nodes, degraded nodes)` of `network`.
    fn counts(&self, network: &str) -> (usize, usize) {
        self.counts.get(network).copied().unwrap_or_default()
    }
}

/// Open findings by key (a node id or "network:NAME"), then kind: a node's evaluation looks
/// at its own findings only.
#[derive(Debug, Default)]
struct OpenFindings {
    by_key: HashMap<String, HashMap<String, u64>>,
}

impl From<crate::store::reconcile::OpenFindings> for OpenFindings {
    fn from(flat: crate::store::reconcile::OpenFindings) -> Self {
        let mut open = Self::default();
        for ((key, kind), finding_id) in flat {
            open.insert(&key, &kind, finding_id);
        }
        open
    }
}

impl OpenFindings {
    /// `(kind, finding_id)` of each finding open on `key`.
    fn of(&self, key: &str) -> impl Iterator<Item = (&String, &u64)> {
        self.by_key.get(key).into_iter().flatten()
    }

    fn contains(&self, key: &str, kind: &str) -> bool {
        self.by_key.get(key).is_some_and(|k| k.contains_key(kind))
    }

    fn insert(&mut self, key: &str, kind: &str, finding_id: u64) {
        self.by_key
            .entry(key.to_owned())
            .or_default()
            .insert(kind.to_owned(), finding_id);
    }

    fn remove(&mut self, key: &str, kind: &str) -> Option<u64> {
        let kinds = self.by_key.get_mut(key)?;
        let finding_id = kinds.remove(kind);
        if kinds.is_empty() {
            self.by_key.remove(key);
        }
        finding_id
    }

    fn keys(&self) -> impl Iterator<Item = &String> {
        self.by_key.keys()
    }
}

/// What one pass decided: the part [`Actuator::carry_out`] writes and carries out, and
/// what the loop adopts once it is written.
#[derive(Default)]
struct Pass {
    carry: crate::actuate::Pass,
    /// `(key, kind)` of each raised finding, in `carry.writes.raised` order.
    raised_keys: Vec<(String, String)>,
    /// `(key, kind)` of each cleared finding.
    cleared_keys: Vec<(String, String)>,
    /// States to adopt once written.
    states: Vec<(NodeId, NodeState)>,
    /// Figures to show on nodes.
    figures: Vec<(NodeId, ReconcileFigures, u64)>,
}

impl Runner {
    async fn run(&mut self, mut inbox: mpsc::Receiver<Request>, shutdown: CancellationToken) {
        let every = Duration::from_millis(self.parts.settings.evaluate_interval_ms);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tracing::info!(
            dry_run = self.parts.settings.dry_run,
            nodes = self.states.len(),
            "ReconcilerStarted"
        );
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.trigger.wake.notified() => {
                    // Everything that arrived meanwhile is decided in one pass and one
                    // ledger transaction: a burst of faults costs one write, not one each.
                    let mut pass = Pass::default();
                    for (node, arrived) in self.trigger.take() {
                        self.evaluate(&node, Some(arrived), &mut pass);
                    }
                    self.finish(pass).await;
                }
                _ = tick.tick() => self.tick(every).await,
                Some(request) = inbox.recv() => self.answer(request).await,
            }
        }
    }

    /// Refreshes fleet context, correlates networks, and evaluates nodes not evaluated
    /// within `every` (silent agents, cooldowns and budgets move on without samples).
    async fn tick(&mut self, every: Duration) {
        self.contexts = self
            .parts
            .registry
            .network_contexts(self.parts.detect.fleet_tip_agreement);
        let mut pass = Pass::default();
        self.correlate(&mut pass);
        for (id, _) in self.parts.registry.ids() {
            let fresh = self
                .evaluated
                .get(&id)
                .is_some_and(|at| at.elapsed() < every);
            if !fresh {
                self.evaluate(&id, None, &mut pass);
            }
        }
        self.finish(pass).await;
    }

    fn policy(&mut self, id: &NodeId) -> Arc<(SyncPolicy, DetectPolicy)> {
        let settings = &self.parts.settings;
        let base = &self.parts.detect;
        let make = |sync: SyncPolicy| {
            let detect = DetectPolicy {
                max_block_lag: sync.max_block_lag,
                ..base.clone()
            };
            Arc::new((sync, detect))
        };
        // A TaoNode's syncPolicy wins over [reconcile.nodes.NODE]; it may change at any
        // time, so it is not cached.
        if let Some(over) = self
            .parts
            .actuator
            .kubernetes()
            .and_then(|k| k.policy_override(id))
        {
            return make(over.apply(&settings.policy_for(id.as_str())));
        }
        Arc::clone(
            self.policies
                .entry(id.clone())
                .or_insert_with(|| make(settings.policy_for(id.as_str()))),
        )
    }

    /// Detects and plans for one node, staging what it decides into `pass`.
    fn evaluate(&mut self, id: &NodeId, arrived: Option<Instant>, pass: &mut Pass) {
        let now = unix_ms();
        let policies = self.policy(id);
        let (sync_policy, detect_policy) = &*policies;
        let contexts = &self.contexts;
        let Some((network, mut findings, chain)) =
            self.parts.registry.evaluate(id, now, |input, network| {
                let context = contexts.get(network).copied().unwrap_or_default();
                let findings = detect::detect(input, &context, detect_policy);
                let chain = ChainView::of(input.chain, context.network_best_block);
                (network.to_owned(), findings, chain)
            })
        else {
            return;
        };
        self.evaluated.insert(id.clone(), Instant::now());
        self.parts.metrics.reconcile_evaluations.inc();
        // The server's own downtime is not the agents' silence: give them silent_after_ms
        // from our start to reconnect.
        if now - self.started_unix_ms < self.parts.detect.silent_after_ms {
            findings.retain(|f| f.kind != FindingKind::AgentSilent);
        }
        if arrived.is_some() {
            self.heard.insert(id.clone());
        }
        let may_clear = self.heard.contains(id);
        self.stage_findings(id.as_str(), &network, &findings, may_clear, pass);

        let before = self.states.get(id).cloned().unwrap_or_default();
        let probe_ms = i64::from(sync_policy.probe_interval_seconds) * 1000;
        let progressing = self.lags.entry(id.clone()).or_default().progressing(
            now,
            chain.block_lag,
            probe_ms,
            arrived.is_some(),
        );
        let mut observation = observe::observe(
            &findings,
            &observe::Context {
                now_unix_ms: now,
                phase: before.phase,
                chain,
                progressing,
                fresh: arrived.is_some(),
                silent_after_ms: self.parts.detect.silent_after_ms,
                max_block_lag: sync_policy.max_block_lag,
                // Set below, once this node's own health counts in its network's share.
                fleet_hold: false,
                fleet_in_flight: self.in_flight.len() - usize::from(self.in_flight.contains(id)),
                fleet_max_in_flight: self.parts.settings.max_concurrent_remediations,
            },
        );
        // The fleet share counts nodes whose chain degrades; a silent agent (a host down,
        // a decommissioned node) says nothing about the chain or the network.
        self.health
            .set(id, &network, !observation.remediable.is_empty());
        observation.fleet_hold = self.network_held(&network);
        let mut plan = crate::reconcile::plan(&before, &observation, sync_policy);
        let wants_command = plan
            .actions
            .iter()
            .any(|a| matches!(a, PlannedAction::Command { .. }));
        if wants_command && !self.parts.actuator.can_remediate(id) && !self.parts.settings.dry_run {
            plan = observe::without_commands(&before, plan, now);
        }
        let figures = ReconcileFigures {
            phase: plan.next.phase.as_str().to_owned(),
            phase_since_unix_ms: plan.next.phase_since_unix_ms,
            risk: detect::risk::score(&findings),
            open_findings: u32::try_from(findings.len()).unwrap_or(u32::MAX),
            attempts: plan.next.attempts,
            paused: plan.next.paused,
        };
        self.current.insert(id.clone(), findings);
        self.stage_plan(id, &network, before, plan, arrived, pass);
        pass.figures.push((id.clone(), figures, chain.block_lag));
    }

    /// Stages a plan: the decision (or a plain state save), then its actions.
    fn stage_plan(
        &mut self,
        id: &NodeId,
        network: &str,
        before: NodeState,
        plan: Plan,
        arrived: Option<Instant>,
        pass: &mut Pass,
    ) {
        let now = unix_ms();
        let dry_run = self.parts.settings.dry_run;
        if plan.is_decision(&before) {
            pass.carry.decided.push((
                id.clone(),
                before.phase.as_str(),
                plan.next.phase.as_str(),
                plan.next.attempts,
                plan.reason.clone(),
            ));
            pass.carry.writes.decisions.push(DecisionWrite {
                node_id: id.to_string(),
                before: before.clone(),
                plan: plan.clone(),
                dry_run,
            });
        } else if before.persisted_differs(&plan.next) {
            pass.carry
                .writes
                .states
                .push((id.to_string(), plan.next.clone()));
        }
        // Counted now, so the fleet cap holds within one pass.
        if plan.next.phase == Phase::Recovering {
            self.in_flight.insert(id.clone());
        } else {
            self.in_flight.remove(id);
        }
        for action in &plan.actions {
            match action {
                PlannedAction::Command { action, parameters } => {
                    self.parts.actuator.stage_command(
                        &mut pass.carry,
                        id,
                        *action,
                        parameters.clone(),
                        arrived,
                    );
                }
                PlannedAction::Alert { message } => pass.carry.alerts.push(Alert {
                    event: "remediation_alert",
                    node_id: id.to_string(),
                    network: network.to_owned(),
                    kind: plan.next.phase.as_str().to_owned(),
                    severity: Severity::Critical.as_str(),
                    summary: message.clone(),
                    at_unix_ms: now,
                }),
            }
        }
        pass.states.push((id.clone(), plan.next));
    }

    /// Stages findings that are new and clears those that went away.
    fn stage_findings(
        &self,
        key: &str,
        network: &str,
        findings: &[Finding],
        may_clear: bool,
        pass: &mut Pass,
    ) {
        let node_id = if key.starts_with("network:") { "" } else { key };
        let kinds: HashSet<&str> = findings.iter().map(|f| f.kind.as_str()).collect();
        if may_clear {
            for (kind, finding_id) in self.open.of(key) {
                if !kinds.contains(kind.as_str()) {
                    pass.carry.writes.cleared.push(ClearedFinding {
                        finding_id: *finding_id,
                        node_id: node_id.to_owned(),
                        network: network.to_owned(),
                        kind: kind.clone(),
                    });
                    pass.cleared_keys.push((key.to_owned(), kind.clone()));
                }
            }
        }
        // A node's findings may hold several of one kind; the first (worst-sorted) is stored.
        let mut seen = HashSet::new();
        for finding in findings {
            let kind = finding.kind.as_str();
            if !seen.insert(kind) || self.open.contains(key, kind) {
                continue;
            }
            pass.carry.writes.raised.push(RaisedFinding {
                node_id: node_id.to_owned(),
                network: network.to_owned(),
                finding: finding.clone(),
            });
            pass.raised_keys.push((key.to_owned(), kind.to_owned()));
        }
    }

    /// Hands the pass to the actuator (written in one transaction, then carried out) and
    /// adopts what it decided. A pass that cannot be written is dropped whole: nothing is
    /// sent, and the next evaluation decides again.
    async fn finish(&mut self, pass: Pass) {
        let Pass {
            carry,
            raised_keys,
            cleared_keys,
            states,
            figures,
        } = pass;
        match self.parts.actuator.carry_out(carry).await {
            Ok(ids) => {
                for ((key, kind), finding_id) in raised_keys.iter().zip(ids) {
                    self.open.insert(key, kind, finding_id);
                }
            }
            Err(_) => {
                self.in_flight = self
                    .states
                    .iter()
                    .filter(|(_, s)| s.phase == Phase::Recovering)
                    .map(|(id, _)| id.clone())
                    .collect();
                return;
            }
        }
        for key in &cleared_keys {
            if let Some(finding_id) = self.open.remove(&key.0, &key.1) {
                tracing::info!(node = key.0, kind = key.1, finding_id, "FindingCleared");
            }
        }
        for (id, state) in states {
            self.states.insert(id, state);
        }
        let kube = self.parts.actuator.kubernetes();
        for (id, figures, block_lag) in figures {
            if let Some(kube) = kube {
                let filling = self.current.get(&id).and_then(|findings| {
                    findings
                        .iter()
                        .find(|f| f.kind == FindingKind::StorageFull)
                        .map(|f| {
                            f.evidence
                                .get("hours_to_full")
                                .and_then(|h| h.parse::<f64>().ok())
                        })
                });
                if let Some(hours_to_full) = filling {
                    kube.storage_filling(&id, hours_to_full);
                }
                kube.observe(
                    &id,
                    NodeFigures {
                        phase: figures.phase.clone(),
                        block_lag,
                        risk: figures.risk,
                        open_findings: figures.open_findings,
                        attempts: figures.attempts,
                        phase_since_unix_ms: figures.phase_since_unix_ms,
                    },
                );
            }
            self.parts.registry.set_reconcile(&id, &figures);
        }
    }

    /// Whether the share of `network`'s nodes degraded now calls for holding per-node action.
    fn network_held(&self, network: &str) -> bool {
        let (nodes, degraded) = self.health.counts(network);
        let policy = &self.parts.detect;
        degraded > 0
            && nodes >= policy.fleet_min_nodes.max(1)
            && degraded as f64 >= policy.fleet_degraded_share * nodes as f64
    }

    /// Stages one fleet finding per network (raised or cleared). Per-node action is held on
    /// a momentary share ([`Runner::network_held`]: no restart may slip through while the
    /// others' next samples are in flight); the fleet finding counts only nodes whose bad
    /// streak is confirmed, so one odd sample per node does not page anyone.
    fn correlate(&mut self, pass: &mut Pass) {
        let mut nodes = Vec::with_capacity(self.health.nodes.len());
        for (id, (network, degraded)) in self.health.nodes.clone() {
            let policy = self.policy(&id);
            let confirmed = self
                .states
                .get(&id)
                .is_some_and(|s| s.bad_streak >= policy.0.confirm_samples);
            nodes.push(NodeHealth {
                node_id: id.to_string(),
                network,
                degraded: degraded && confirmed,
            });
        }
        let fleet_findings = fleet::correlate(&nodes, &self.parts.detect);
        // Networks with nodes now, and those with an open fleet finding (whose nodes may have
        // gone: their finding must still clear).
        let mut networks: HashSet<String> = nodes.iter().map(|n| n.network.clone()).collect();
        networks.extend(
            self.open
                .keys()
                .filter_map(|key| key.strip_prefix("network:").map(str::to_owned)),
        );
        for network in networks {
            let findings: Vec<Finding> = fleet_findings
                .iter()
                .filter(|f| f.network == network)
                .map(|f| f.finding.clone())
                .collect();
            self.stage_findings(
                &format!("network:{network}"),
                &network,
                &findings,
                true,
                pass,
            );
        }
    }

    async fn answer(&mut self, request: Request) {
        match request {
            Request::Pause {
                node,
                operator,
                reason,
                reply,
            } => {
                let result = self
                    .operator_decision(&node, &operator, true, &reason)
                    .await;
                let _ = reply.send(result);
            }
            Request::Resume {
                node,
                operator,
                reply,
            } => {
                let result = self.operator_decision(&node, &operator, false, "").await;
                let _ = reply.send(result);
            }
        }
    }

    async fn operator_decision(
        &mut self,
        node: &NodeId,
        operator: &str,
        pause: bool,
        reason: &str,
    ) -> Result<(), String> {
        if self.parts.registry.get(node).is_none() {
            return Err(format!("no node {node} has ever connected"));
        }
        let now = unix_ms();
        let before = self.states.get(node).cloned().unwrap_or_default();
        let mut next = before.clone();
        next.paused = pause;
        // A resumed node is handed back as it is now (its streaks were kept while paused),
        // not as a newcomer that may take its time to sync.
        next.phase = match (pause, self.health.nodes.get(node)) {
            (true, _) => Phase::Paused,
            (false, Some((_, true))) => Phase::Degraded,
            (false, Some((_, false))) => Phase::Synced,
            (false, None) => Phase::Pending,
        };
        next.phase_since_unix_ms = now;
        let plan = Plan {
            next,
            actions: Vec::new(),
            reason: if pause {
                format!("paused by operator {operator}: {reason}")
            } else {
                format!("resumed by operator {operator}")
            },
        };
        let body = serde_json::json!({
            "event": if pause { "node_paused" } else { "node_resumed" },
            "operator": operator,
            "reason": reason,
        });
        self.parts
            .ledger
            .record_operator_decision(
                node.as_str(),
                &body,
                &before,
                &plan,
                self.parts.settings.dry_run,
                now,
            )
            .await
            .map_err(|e| format!("cannot record it: {e}"))?;
        tracing::info!(node = %node, operator, pause, "OperatorDecision");
        self.in_flight.remove(node);
        self.states.insert(node.clone(), plan.next.clone());
        let findings = self.current.get(node);
        self.parts.registry.set_reconcile(
            node,
            &ReconcileFigures {
                phase: plan.next.phase.as_str().to_owned(),
                phase_since_unix_ms: now,
                risk: findings.map_or(0.0, |f| detect::risk::score(f)),
                open_findings: findings.map_or(0, |f| u32::try_from(f.len()).unwrap_or(u32::MAX)),
                attempts: plan.next.attempts,
                paused: pause,
            },
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_health_counts_follow_each_node_across_networks_and_states() {
        let a = NodeId::parse("a").expect("valid id");
        let b = NodeId::parse("b").expect("valid id");
        let mut health = FleetHealth::default();
        health.set(&a, "finney", true);
        health.set(&b, "finney", false);
        assert_eq!(health.counts("finney"), (2, 1));
        health.set(&a, "finney", true);
        assert_eq!(health.counts("finney"), (2, 1));
        health.set(&a, "finney", false);
        assert_eq!(health.counts("finney"), (2, 0));
        health.set(&b, "test", true);
        assert_eq!(health.counts("finney"), (1, 0));
        assert_eq!(health.counts("test"), (1, 1));
        health.set(&a, "test", false);
        assert_eq!(health.counts("finney"), (0, 0));
        assert!(!health.counts.contains_key("finney"));
        assert_eq!(health.counts("test"), (2, 1));
        assert_eq!(health.nodes.get(&a), Some(&("test".to_owned(), false)));
    }

    #[test]
    fn open_findings_are_found_by_key_and_removed_one_kind_at_a_time() {
        let mut flat = crate::store::reconcile::OpenFindings::new();
        flat.insert(("a".into(), "block_lag".into()), 1);
        flat.insert(("a".into(), "gpu_hot".into()), 2);
        flat.insert(("network:finney".into(), "fleet_degraded".into()), 3);
        let mut open = OpenFindings::from(flat);
        let mut of_a: Vec<(String, u64)> = open.of("a").map(|(k, i)| (k.clone(), *i)).collect();
        of_a.sort();
        assert_eq!(of_a, [("block_lag".into(), 1), ("gpu_hot".into(), 2)]);
        assert_eq!(open.of("b").count(), 0);
        assert!(open.contains("a", "gpu_hot") && !open.contains("b", "gpu_hot"));
        assert_eq!(open.remove("a", "block_lag"), Some(1));
        assert_eq!(open.remove("a", "block_lag"), None);
        assert_eq!(open.remove("a", "gpu_hot"), Some(2));
        assert!(!open.by_key.contains_key("a"));
        open.insert("b", "keystore", 4);
        let mut keys: Vec<&String> = open.keys().collect();
        keys.sort();
        assert_eq!(keys, ["b", "network:finney"]);
    }
}
