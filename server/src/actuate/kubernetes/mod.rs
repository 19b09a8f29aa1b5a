//! The Kubernetes actuator: remediation through the Kubernetes API of each configured
//! cluster, beside the agent actuator. A node is Kubernetes-managed when a `TaoNode` in one
//! of the clusters names its node id; its restarts then delete the validator's pod (its
//! controller makes a new one) instead of asking the agent.
//!
//! Per cluster, three tasks: a poller that lists every TaoNode (the index of managed
//! nodes), a health check at start and every minute (reachable; each permission of
//! [`cluster::PERMISSIONS`] allowed), and one worker that makes the cluster's writes in
//! order. A slow or unreachable cluster never blocks another cluster, the control loop or
//! ingest: every call has a timeout and each cluster has its own queue.
//!
//! This is the only module that imports `kube` and `k8s_openapi`.
//!
//! # Guarantees
//! - Every write that remediates (a pod deletion) is in the ledger's audit chain before it
//!   is made, and its outcome after; one that cannot be audited is not made.
//! - One remediation deletes at most one pod, the one chosen when it was decided (a
//!   precondition on its uid): a retry never deletes a second pod.
//! - In a dry run nothing is written to any cluster (no deletion, event or status).
//! - A node whose cluster is unreachable is alerted, never acted on some other way.

pub mod cluster;
pub mod crd;
pub mod oom;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::Job as BatchJob;
use k8s_openapi::api::core::v1::{Event, Node, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::actuate::alert::{Alert, Alerts};
use crate::identity::NodeId;
use crate::metrics::{ClusterLabel, ClusterReason, Metrics, Reason};
use crate::reconcile::SyncPolicyOverride;
use crate::store::Ledger;
use crate::store::audit::AuditKind;
use crate::unix_ms;
use cluster::{Cluster, ClusterSettings, Health, KubeError, Permission};
use crd::{Condition, FIELD_MANAGER, LastRemediation, TaoNode, TaoNodeStatus, WorkloadKind};

/// Writes queued per cluster before new ones are refused (and alerted).
const QUEUE: usize = 1024;
/// Nodes whose writes one cluster makes at once.
const WORKERS: usize = 16;

/// `[kubernetes]`: the clusters the server may act in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubeSettings {
    /// `[kubernetes.clusters.NAME]`, one per cluster; none = Kubernetes off.
    pub clusters: BTreeMap<String, ClusterSettings>,
    /// Bound on every call to an API server, ms. Default 5000.
    pub request_timeout_ms: u64,
    /// How long one watch of TaoNodes stays open before it is renewed (from where it was),
    /// s. Default 290.
    pub watch_timeout_seconds: u32,
    /// How often each cluster's reachability and permissions are checked, s. Default 60.
    pub health_interval_seconds: u64,
    /// How often the pods of TaoNodes with a `memoryCeiling` are read for OOM kills, ms.
    /// Default 10000.
    pub oom_check_interval_ms: u64,
}

impl Default for KubeSettings {
    fn default() -> Self {
        Self {
            clusters: BTreeMap::new(),
            request_timeout_ms: 5000,
            watch_timeout_seconds: 290,
            health_interval_seconds: 60,
            oom_check_interval_ms: 10_000,
        }
    }
}

impl KubeSettings {
    /// Checks every cluster's settings and the intervals.
    ///
    /// # Errors
    /// A message naming the field and the fix.
    pub fn validate(&self) -> Result<(), String> {
        for (name, cluster) in &self.clusters {
            cluster.validate(name)?;
        }
        if self.request_timeout_ms < 100 {
            return Err("kubernetes.request_timeout_ms must be at least 100 (default 5000)".into());
        }
        if !(1..=3600).contains(&self.watch_timeout_seconds) {
            return Err(
                "kubernetes.watch_timeout_seconds must be within 1..=3600 (default 290)".into(),
            );
        }
        if self.oom_check_interval_ms < 100 {
            return Err(
                "kubernetes.oom_check_interval_ms must be at least 100 (default 10000)".into(),
            );
        }
        if self.health_interval_seconds == 0 {
            return Err(
                "kubernetes.health_interval_seconds must be at least 1 (default 60)".into(),
            );
        }
        Ok(())
    }
}

/// A node some TaoNode manages.
#[derive(Debug, Clone, PartialEq)]
pub struct Managed {
    /// The cluster the TaoNode is in.
    pub cluster: String,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its uid (events refer to it).
    pub uid: String,
    /// Its `metadata.generation`.
    pub generation: Option<i64>,
    /// What it declares.
    pub spec: crd::TaoNodeSpec,
    /// The snapshot-restore its status records, if any (what a restarted server resumes).
    pub restore: Option<crd::RestoreProgress>,
}

/// What a cluster's worker does next.
#[derive(Debug)]
enum Job {
    /// Delete the validator's pod.
    Restart {
        node: NodeId,
        managed: Managed,
        reason: String,
        arrived: Option<Instant>,
        /// The Kubernetes node the agent reported (downward API), if any.
        host: String,
    },
    /// Apply the TaoNode's status.
    Status { node: NodeId, managed: Managed },
    /// Raise the container's memory limit after `kills` OOM kills in the window.
    RaiseMemory {
        node: NodeId,
        managed: Managed,
        kills: usize,
    },
    /// Grow the chain-data volume; `why` is the forecast that calls for it.
    ExpandVolume {
        node: NodeId,
        managed: Managed,
        why: String,
    },
    /// Cordon-and-alert: mark the Kubernetes node of the validator's pod unschedulable.
    Cordon {
        node: NodeId,
        managed: Managed,
        reason: String,
        host: String,
    },
}

/// What the reconciler last said of a node, for its TaoNode's status.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeFigures {
    /// Phase name.
    pub phase: String,
    /// Blocks behind the tip.
    pub block_lag: u64,
    /// Risk 0..1.
    pub risk: f64,
    /// Open findings.
    pub open_findings: u32,
    /// Attempts in the budget.
    pub attempts: u32,
    /// When the phase was entered, Unix ms (the conditions' lastTransitionTime).
    pub phase_since_unix_ms: i64,
}

/// Per node: the figures its status was last written with, its last remediation, and when
/// (Unix ms) the status was last queued.
#[derive(Debug, Clone, Default)]
struct Standing {
    figures: NodeFigures,
    last: Option<LastRemediation>,
    queued_unix_ms: i64,
    restore: Option<crd::RestoreProgress>,
}

/// The Kubernetes actuator. Cheap to share (`Arc`).
pub struct Kubernetes {
    clusters: BTreeMap<String, Arc<Cluster>>,
    queues: BTreeMap<String, mpsc::Sender<Job>>,
    index: RwLock<HashMap<String, Managed>>,
    figures: Mutex<HashMap<String, Standing>>,
    ledger: Ledger,
    registry: Arc<crate::registry::Registry>,
    metrics: Arc<Metrics>,
    alerts: Alerts,
    dry_run: bool,
    watch_timeout_seconds: u32,
    health_every: Duration,
    oom_every: Duration,
    oom: Mutex<oom::OomTracker>,
    /// Per node: when its chain volume was last grown (or a grow was queued), Unix ms.
    grown: Mutex<HashMap<String, i64>>,
    /// Nodes whose snapshot-restore runs in this server now.
    restoring: Mutex<std::collections::HashSet<String>>,
    /// Ends the restore tasks with the server (a restarted server resumes them).
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Kubernetes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kubernetes")
            .field("clusters", &self.clusters.keys().collect::<Vec<_>>())
            .field("dry_run", &self.dry_run)
            .finish_non_exhaustive()
    }
}

/// One cluster as `guardianctl clusters` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterView {
    /// Its name.
    pub name: String,
    /// Its health.
    pub health: Health,
}

impl Kubernetes {
    /// Builds a client per configured cluster and starts each cluster's poller, health
    /// check and worker on `tasks`; `None` when no cluster is configured.
    ///
    /// # Errors
    /// When a cluster's kubeconfig cannot make a client (the message names the cluster).
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        settings: &KubeSettings,
        ledger: Ledger,
        registry: Arc<crate::registry::Registry>,
        metrics: Arc<Metrics>,
        alerts: Alerts,
        dry_run: bool,
        shutdown: &CancellationToken,
        tasks: &TaskTracker,
    ) -> Result<Option<Arc<Self>>, KubeError> {
        if settings.clusters.is_empty() {
            return Ok(None);
        }
        let timeout = Duration::from_millis(settings.request_timeout_ms);
        let mut clusters = BTreeMap::new();
        let mut receivers = Vec::new();
        let mut queues = BTreeMap::new();
        for (name, cluster) in &settings.clusters {
            let connected = Cluster::connect(name, cluster, timeout).await?;
            clusters.insert(name.clone(), Arc::new(connected));
            let (tx, rx) = mpsc::channel(QUEUE);
            queues.insert(name.clone(), tx);
            receivers.push((name.clone(), rx));
        }
        let this = Arc::new(Self {
            clusters,
            queues,
            index: RwLock::new(HashMap::new()),
            figures: Mutex::new(HashMap::new()),
            ledger,
            registry,
            metrics,
            alerts,
            dry_run,
            watch_timeout_seconds: settings.watch_timeout_seconds,
            health_every: Duration::from_secs(settings.health_interval_seconds),
            oom_every: Duration::from_millis(settings.oom_check_interval_ms),
            oom: Mutex::new(oom::OomTracker::default()),
            grown: Mutex::new(HashMap::new()),
            restoring: Mutex::new(std::collections::HashSet::new()),
            shutdown: shutdown.clone(),
        });
        for (name, rx) in receivers {
            let Some(cluster) = this.clusters.get(&name).cloned() else {
                continue;
            };
            tasks.spawn(Arc::clone(&this).watch(Arc::clone(&cluster), shutdown.clone()));
            tasks.spawn(Arc::clone(&this).check_health(Arc::clone(&cluster), shutdown.clone()));
            tasks.spawn(Arc::clone(&this).check_oom(Arc::clone(&cluster), shutdown.clone()));
            tasks.spawn(Arc::clone(&this).work(cluster, rx, shutdown.clone()));
        }
        tracing::info!(
            clusters = ?this.clusters.keys().collect::<Vec<_>>(),
            dry_run,
            "KubernetesActuatorStarted"
        );
        Ok(Some(this))
    }

    /// The TaoNode that manages `node`, if any.
    pub fn managed(&self, node: &NodeId) -> Option<Managed> {
        self.index
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(node.as_str())
            .cloned()
    }

    /// The policy override `node`'s TaoNode declares, if any.
    pub fn policy_override(&self, node: &NodeId) -> Option<SyncPolicyOverride> {
        self.managed(node)?
            .spec
            .sync_policy
            .as_ref()
            .map(crd::TaoNodeSyncPolicy::to_override)
    }

    /// Every cluster and its last health.
    pub fn clusters(&self) -> Vec<ClusterView> {
        self.clusters
            .values()
            .map(|c| ClusterView {
                name: c.name.clone(),
                health: c.health(),
            })
            .collect()
    }

    /// Queues a restart of `managed` (already decided and written to the ledger): its pod is
    /// deleted by the cluster's worker. A cluster known unreachable, or a full queue, is
    /// alerted instead: the node is never acted on some other way.
    pub fn restart(
        &self,
        node: &NodeId,
        managed: Managed,
        reason: String,
        arrived: Option<Instant>,
    ) {
        let cluster = managed.cluster.clone();
        let unreachable = self.clusters.get(&cluster).is_none_or(|c| {
            let h = c.health();
            h.checked_unix_ms > 0 && !h.reachable
        });
        if unreachable {
            self.alert(
                node,
                "kubernetes_unreachable",
                format!(
                    "{node}: not restarted: cluster {cluster} is unreachable ({}); nothing else is tried",
                    self.clusters
                        .get(&cluster)
                        .map(|c| c.health().last_error)
                        .unwrap_or_default()
                ),
            );
            return;
        }
        let host = self
            .registry
            .get(node)
            .map(|n| n.kubernetes_node)
            .unwrap_or_default();
        self.enqueue(
            &cluster,
            Job::Restart {
                node: node.clone(),
                managed,
                reason,
                arrived,
                host,
            },
        );
    }

    /// Takes the reconciler's figures for `node`; when they changed (a phase, the attempts,
    /// the findings) or the lag moved and 10 s passed, its TaoNode's status is applied.
    pub fn observe(&self, node: &NodeId, figures: NodeFigures) {
        if self.dry_run {
            return;
        }
        let Some(managed) = self.managed(node) else {
            return;
        };
        let now = unix_ms();
        let changed = {
            let mut all = self
                .figures
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let entry = all.entry(node.to_string()).or_default();
            let (last, written) = (&entry.figures, &entry.queued_unix_ms);
            let moved = last.phase != figures.phase
                || last.attempts != figures.attempts
                || last.open_findings != figures.open_findings
                || (last.risk - figures.risk).abs() >= 0.1
                || (last.block_lag != figures.block_lag && now - *written >= 10_000);
            if moved {
                entry.figures = figures;
                entry.queued_unix_ms = now;
            }
            moved
        };
        if changed {
            self.enqueue(
                &managed.cluster.clone(),
                Job::Status {
                    node: node.clone(),
                    managed,
                },
            );
        }
    }

    /// Queues cordon-and-alert for `managed` (the reconciler cordoned `node`, and the
    /// decision is written): the Kubernetes node its pod runs on is marked unschedulable. A
    /// cluster known unreachable is alerted instead.
    pub fn cordon(&self, node: &NodeId, managed: Managed, reason: String) {
        let host = self
            .registry
            .get(node)
            .map(|n| n.kubernetes_node)
            .unwrap_or_default();
        self.enqueue(
            &managed.cluster.clone(),
            Job::Cordon {
                node: node.clone(),
                managed,
                reason,
                host,
            },
        );
    }

    /// Starts (or resumes, from its TaoNode's `status.restore`) a snapshot-restore of `managed`
    /// on its own task, unless one runs in this server already or this is a dry run.
    pub fn snapshot_restore(self: Arc<Self>, node: NodeId, managed: Managed, reason: String) {
        if self.dry_run || !crate::fence::may_act() {
            return;
        }
        if !self
            .restoring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(node.to_string())
        {
            return;
        }
        let Some(cluster) = self.clusters.get(&managed.cluster).cloned() else {
            return;
        };
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = self.restore(&cluster, &node, &managed, &reason) => {}
            }
            self.restoring
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(node.as_str());
        });
    }

    /// Takes the `storage_full` forecast for `node` (hours to full, or `None` when the
    /// finding is about the share used, not the trend; not called without the finding): when
    /// its TaoNode declares a `chainVolume` and the volume fills within its horizon, a grow is
    /// queued, at most once per cooldown.
    pub fn storage_filling(&self, node: &NodeId, hours_to_full: Option<f64>) {
        let Some(managed) = self.managed(node) else {
            return;
        };
        let Some(volume) = managed.spec.chain_volume.clone() else {
            return;
        };
        let (_, horizon, cooldown) = volume.effective();
        if hours_to_full.is_some_and(|h| h > horizon) {
            return;
        }
        let now = unix_ms();
        {
            let mut grown = self
                .grown
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if grown
                .get(node.as_str())
                .is_some_and(|at| now - at < cooldown)
            {
                return;
            }
            grown.insert(node.to_string(), now);
        }
        let why = match hours_to_full {
            Some(hours) => {
                format!("the chain data fills in {hours:.1} hours (horizon {horizon:.0} hours)")
            }
            None => "the chain data filesystem is nearly full".to_owned(),
        };
        if self.dry_run {
            tracing::info!(node = %node, claim = volume.claim_name, why, "RemediationDryRun: the chain volume would be grown; nothing written to Kubernetes");
            return;
        }
        self.enqueue(
            &managed.cluster.clone(),
            Job::ExpandVolume {
                node: node.clone(),
                managed,
                why,
            },
        );
    }

    fn enqueue(&self, cluster: &str, job: Job) {
        let Some(queue) = self.queues.get(cluster) else {
            return;
        };
        if let Err(error) = queue.try_send(job) {
            let job = match error {
                mpsc::error::TrySendError::Full(job) | mpsc::error::TrySendError::Closed(job) => {
                    job
                }
            };
            if let Job::Restart { node, .. } = job {
                self.alert(
                    &node,
                    "kubernetes_backlog",
                    format!("{node}: not restarted: cluster {cluster}'s write queue is full ({QUEUE}); it is slow or down"),
                );
            }
        }
    }

    fn alert(&self, node: &NodeId, kind: &str, summary: String) {
        self.metrics.remediation_alerts.inc();
        tracing::warn!(node = %node, kind, summary, "RemediationAlert");
        self.alerts.send(Alert {
            event: "remediation_alert",
            node_id: node.to_string(),
            network: String::new(),
            kind: kind.to_owned(),
            severity: "critical",
            summary,
            at_unix_ms: unix_ms(),
        });
    }

    fn failed(&self, cluster: &Cluster, error: &KubeError) {
        self.metrics
            .kube_errors
            .get_or_create(&ClusterReason {
                cluster: cluster.name.clone(),
                reason: error.kind(),
            })
            .inc();
        cluster.note(Err(error));
        self.set_cluster_gauges(cluster);
    }

    fn wrote(&self, cluster: &Cluster, what: &'static str) {
        self.metrics
            .kube_writes
            .get_or_create(&ClusterReason {
                cluster: cluster.name.clone(),
                reason: what,
            })
            .inc();
    }

    fn set_cluster_gauges(&self, cluster: &Cluster) {
        let health = cluster.health();
        let label = ClusterLabel {
            cluster: cluster.name.clone(),
        };
        self.metrics
            .kube_cluster_up
            .get_or_create(&label)
            .set(i64::from(health.reachable));
        self.metrics
            .kube_missing_permissions
            .get_or_create(&label)
            .set(i64::try_from(health.missing.len()).unwrap_or(i64::MAX));
        self.metrics
            .kube_taonodes
            .get_or_create(&label)
            .set(i64::try_from(health.taonodes).unwrap_or(i64::MAX));
    }

    /// Watches the cluster's TaoNodes (a kube-runtime watcher: list, then watch from its
    /// resourceVersion, re-listing with backoff when a watch drops) and keeps the index of
    /// managed nodes. A TaoNode whose status records an unfinished snapshot-restore has it
    /// resumed.
    async fn watch(self: Arc<Self>, cluster: Arc<Cluster>, shutdown: CancellationToken) {
        use kube::runtime::WatchStreamExt;
        use kube::runtime::watcher::{self, Event as Watched};
        use tokio_stream::StreamExt;
        let api: Api<TaoNode> = Api::all(cluster.watch_client.clone());
        let config = watcher::Config::default().timeout(self.watch_timeout_seconds);
        let stream = watcher::watcher(api, config).default_backoff();
        tokio::pin!(stream);
        let mut current: BTreeMap<(String, String), Managed> = BTreeMap::new();
        let mut listing: BTreeMap<(String, String), Managed> = BTreeMap::new();
        loop {
            let event = tokio::select! {
                () = shutdown.cancelled() => return,
                event = stream.next() => match event {
                    Some(event) => event,
                    None => return,
                },
            };
            let changed = match event {
                Ok(Watched::Init) => {
                    listing.clear();
                    None
                }
                Ok(Watched::InitApply(tn)) => {
                    if let Some(m) = managed_of(&cluster.name, tn) {
                        listing.insert((m.namespace.clone(), m.name.clone()), m);
                    }
                    None
                }
                Ok(Watched::InitDone) => {
                    current = std::mem::take(&mut listing);
                    Some(current.values().cloned().collect::<Vec<_>>())
                }
                Ok(Watched::Apply(tn)) => managed_of(&cluster.name, tn).map(|m| {
                    current.insert((m.namespace.clone(), m.name.clone()), m.clone());
                    vec![m]
                }),
                Ok(Watched::Delete(tn)) => {
                    let key = (
                        tn.metadata.namespace.clone().unwrap_or_default(),
                        tn.metadata.name.clone().unwrap_or_default(),
                    );
                    current.remove(&key);
                    Some(Vec::new())
                }
                Err(error) => {
                    let error = KubeError::Failed {
                        cluster: cluster.name.clone(),
                        what: "watch taonodes".into(),
                        why: error.to_string(),
                    };
                    tracing::warn!(cluster = cluster.name, %error, "TaoNodeWatchFailed: retrying with backoff");
                    self.failed(&cluster, &error);
                    None
                }
            };
            let Some(touched) = changed else {
                continue;
            };
            cluster.note(Ok(Some(current.len())));
            for m in &touched {
                if m.restore.as_ref().is_some_and(|r| {
                    matches!(r.step.as_str(), "scaling-down" | "restoring" | "scaling-up")
                }) && let Ok(node) = NodeId::parse(&m.spec.node_id)
                {
                    let reason = "resumed after a server restart".to_owned();
                    Arc::clone(&self).snapshot_restore(node, m.clone(), reason);
                }
            }
            self.replace_index(&cluster.name, current.values().cloned().collect());
            self.set_cluster_gauges(&cluster);
        }
    }

    /// Puts `managed` in place of the cluster's entries; a node id another cluster already
    /// claims stays with that one (logged).
    fn replace_index(&self, cluster: &str, managed: Vec<Managed>) {
        let mut index = self
            .index
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        index.retain(|_, m| m.cluster != cluster);
        for m in managed {
            let node = m.spec.node_id.clone();
            match index.get(&node) {
                Some(other) => tracing::warn!(
                    node,
                    cluster,
                    taonode = m.name,
                    claimed_by = other.cluster,
                    "TaoNodeDuplicate: another cluster's TaoNode names this node; ignoring this one"
                ),
                None => {
                    index.insert(node, m);
                }
            }
        }
    }

    /// Checks reachability and permissions at start and every `health_every`.
    async fn check_health(self: Arc<Self>, cluster: Arc<Cluster>, shutdown: CancellationToken) {
        loop {
            let health = cluster.check(unix_ms()).await;
            if !health.reachable {
                tracing::warn!(
                    cluster = cluster.name,
                    error = health.last_error,
                    "KubernetesClusterUnreachable"
                );
            } else if !health.missing.is_empty() {
                tracing::warn!(cluster = cluster.name, missing = ?health.missing, "KubernetesPermissionsMissing: grant these to the server's service account");
            } else {
                tracing::debug!(cluster = cluster.name, "KubernetesClusterHealthy");
            }
            self.set_cluster_gauges(&cluster);
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(self.health_every) => {}
            }
        }
    }

    /// Makes the cluster's writes, one at a time, in the order they were queued.
    /// Makes the cluster's writes: up to [`WORKERS`] at once, each node's in the order they
    /// were queued (a status never overtakes the restart before it): every node with work
    /// has one task that runs its jobs one by one.
    async fn work(
        self: Arc<Self>,
        cluster: Arc<Cluster>,
        mut queue: mpsc::Receiver<Job>,
        shutdown: CancellationToken,
    ) {
        let slots = Arc::new(tokio::sync::Semaphore::new(WORKERS));
        let mut per_node: HashMap<String, mpsc::UnboundedSender<Job>> = HashMap::new();
        let mut running = tokio::task::JoinSet::new();
        loop {
            let job = tokio::select! {
                () = shutdown.cancelled() => break,
                job = queue.recv() => match job {
                    Some(job) => job,
                    None => break,
                },
                Some(_) = running.join_next(), if !running.is_empty() => continue,
            };
            let node = match &job {
                Job::Restart { node, .. }
                | Job::Status { node, .. }
                | Job::RaiseMemory { node, .. }
                | Job::ExpandVolume { node, .. }
                | Job::Cordon { node, .. } => node.to_string(),
            };
            per_node.retain(|_, tx| !tx.is_closed());
            let job = match per_node.get(&node) {
                Some(tx) => match tx.send(job) {
                    Ok(()) => continue,
                    Err(mpsc::error::SendError(job)) => job,
                },
                None => job,
            };
            let (tx, rx) = mpsc::unbounded_channel();
            // A new channel always takes its first job.
            let _ = tx.send(job);
            per_node.insert(node, tx);
            running.spawn(Arc::clone(&self).node_jobs(
                Arc::clone(&cluster),
                rx,
                Arc::clone(&slots),
            ));
        }
        running.abort_all();
        while running.join_next().await.is_some() {}
    }

    /// Runs one node's jobs in order, each with a slot of the cluster's [`WORKERS`]; ends
    /// after a second without work (closing its channel first, so nothing sent is lost).
    async fn node_jobs(
        self: Arc<Self>,
        cluster: Arc<Cluster>,
        mut jobs: mpsc::UnboundedReceiver<Job>,
        slots: Arc<tokio::sync::Semaphore>,
    ) {
        loop {
            let job = match tokio::time::timeout(Duration::from_secs(1), jobs.recv()).await {
                Ok(Some(job)) => job,
                Ok(None) => return,
                Err(_) => {
                    jobs.close();
                    match jobs.try_recv() {
                        Ok(job) => job,
                        Err(_) => return,
                    }
                }
            };
            let Ok(_slot) = slots.acquire().await else {
                return;
            };
            self.run_job(&cluster, job).await;
        }
    }

    async fn run_job(&self, cluster: &Cluster, job: Job) {
        // Fencing: a server that lost the ledger's lock writes nothing more.
        if !crate::fence::may_act() {
            tracing::warn!(
                cluster = cluster.name,
                "KubernetesWriteDropped: this server lost the ledger's lock"
            );
            return;
        }
        match job {
            Job::Restart {
                node,
                managed,
                reason,
                arrived,
                host,
            } => {
                self.delete_pod(cluster, &node, &managed, &reason, &host, arrived)
                    .await;
            }
            Job::Status { node, managed } => self.apply_status(cluster, &node, &managed).await,
            Job::RaiseMemory {
                node,
                managed,
                kills,
            } => self.raise_memory(cluster, &node, &managed, kills).await,
            Job::ExpandVolume { node, managed, why } => {
                self.expand_volume(cluster, &node, &managed, &why).await;
            }
            Job::Cordon {
                node,
                managed,
                reason,
                host,
            } => {
                self.cordon_node(cluster, &node, &managed, &reason, &host)
                    .await;
            }
        }
    }

    /// Every `oom_every`, reads the pods of this cluster's TaoNodes that set a
    /// `memoryCeiling` and queues a memory raise for a node whose container was OOM-killed
    /// often enough within the window (at most once per window).
    async fn check_oom(self: Arc<Self>, cluster: Arc<Cluster>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(self.oom_every) => {}
            }
            let watched: Vec<Managed> = self
                .index
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .values()
                .filter(|m| m.cluster == cluster.name && m.spec.memory_ceiling.is_some())
                .cloned()
                .collect();
            for managed in watched {
                let Ok(node) = NodeId::parse(&managed.spec.node_id) else {
                    continue;
                };
                let (threshold, window, _) = managed
                    .spec
                    .oom_remediation
                    .clone()
                    .unwrap_or_default()
                    .effective();
                let killed = match self.oom_kills(&cluster, &managed).await {
                    Ok(killed) => killed,
                    Err(error) => {
                        tracing::debug!(node = %node, %error, "OomCheckFailed");
                        self.failed(&cluster, &error);
                        continue;
                    }
                };
                let now = unix_ms();
                let (kills, may_raise) = {
                    let mut tracker = self
                        .oom
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    let mut kills = tracker.observe(node.as_str(), None, now, window);
                    for finished in &killed {
                        kills = tracker.observe(node.as_str(), Some(finished), now, window);
                    }
                    let may = kills >= threshold && tracker.may_raise(node.as_str(), now, window);
                    if may {
                        // Once per window, whatever comes of it (a failure is alerted).
                        tracker.raised(node.as_str(), now);
                    }
                    (kills, may)
                };
                if !may_raise {
                    continue;
                }
                if self.dry_run {
                    tracing::info!(node = %node, kills, "RemediationDryRun: the memory limit would be raised; nothing written to Kubernetes");
                    continue;
                }
                self.enqueue(
                    &cluster.name,
                    Job::RaiseMemory {
                        node,
                        managed,
                        kills,
                    },
                );
            }
        }
    }

    /// The `finishedAt` of each OOM kill the workload's pods report for its container (the
    /// last termination of each pod's container).
    async fn oom_kills(
        &self,
        cluster: &Cluster,
        managed: &Managed,
    ) -> Result<Vec<String>, KubeError> {
        let (selector, _) = self.workload(cluster, managed).await?;
        let labels = selector
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &managed.namespace);
        let list = Permission {
            verb: "list",
            group: "",
            resource: "pods",
            subresource: "",
        };
        let found = cluster
            .call(
                &format!("list pods {} -l {labels}", managed.namespace),
                Some(list),
                pods.list(&ListParams::default().labels(&labels)),
            )
            .await?;
        let container = &managed.spec.workload.container;
        Ok(found
            .items
            .iter()
            .filter_map(|p| p.status.as_ref()?.container_statuses.as_ref())
            .flatten()
            .filter(|c| &c.name == container)
            .filter_map(|c| c.last_state.as_ref()?.terminated.as_ref())
            .filter(|t| t.reason.as_deref() == Some("OOMKilled"))
            .map(|t| {
                serde_json::to_value(&t.finished_at)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_else(|| format!("restart-{}", t.exit_code))
            })
            .collect())
    }

    /// The workload's `matchLabels` and the JSON of its object (for the raise).
    async fn workload(
        &self,
        cluster: &Cluster,
        managed: &Managed,
    ) -> Result<(BTreeMap<String, String>, serde_json::Value), KubeError> {
        let ns = &managed.namespace;
        let workload = &managed.spec.workload;
        let get = |resource: &'static str| Permission {
            verb: "get",
            group: "apps",
            resource,
            subresource: "",
        };
        let what = format!("get {} {ns}/{}", workload.kind.as_str(), workload.name);
        let (selector, object) = match workload.kind {
            WorkloadKind::StatefulSet => {
                let api: Api<StatefulSet> = Api::namespaced(cluster.client.clone(), ns);
                let set = cluster
                    .call(&what, Some(get("statefulsets")), api.get(&workload.name))
                    .await?;
                let json = serde_json::to_value(&set).unwrap_or_default();
                (set.spec.and_then(|s| s.selector.match_labels), json)
            }
            WorkloadKind::Deployment => {
                let api: Api<Deployment> = Api::namespaced(cluster.client.clone(), ns);
                let set = cluster
                    .call(&what, Some(get("deployments")), api.get(&workload.name))
                    .await?;
                let json = serde_json::to_value(&set).unwrap_or_default();
                (set.spec.and_then(|s| s.selector.match_labels), json)
            }
        };
        let selector = selector.unwrap_or_default();
        if selector.is_empty() {
            return Err(KubeError::Failed {
                cluster: cluster.name.clone(),
                what,
                why: "the workload has no matchLabels selector; its pods cannot be found".into(),
            });
        }
        Ok((selector, object))
    }

    /// OOMKilled remediation: raises the container's memory limit in the workload's pod
    /// template by the TaoNode's factor, never above its `memoryCeiling` (a strategic merge
    /// patch carrying the workload's resourceVersion: a concurrent change makes it fail, not
    /// apply twice). Audited before and after, with an Event; at the ceiling it alerts.
    async fn raise_memory(
        &self,
        cluster: &Cluster,
        node: &NodeId,
        managed: &Managed,
        kills: usize,
    ) {
        let workload = &managed.spec.workload;
        let (_, _, factor) = managed
            .spec
            .oom_remediation
            .clone()
            .unwrap_or_default()
            .effective();
        let ceiling_text = managed.spec.memory_ceiling.clone().unwrap_or_default();
        let outcome: Result<(String, String), String> = async {
            let ceiling = oom::parse_quantity(&ceiling_text).ok_or_else(|| {
                format!("memoryCeiling {ceiling_text:?} is not a quantity (e.g. 64Gi)")
            })?;
            let (_, object) = self
                .workload(cluster, managed)
                .await
                .map_err(|e| e.to_string())?;
            let containers = object["spec"]["template"]["spec"]["containers"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let container = containers
                .iter()
                .find(|c| c["name"] == workload.container.as_str())
                .ok_or_else(|| format!("the pod template has no container {:?}", workload.container))?;
            let current_text = container["resources"]["limits"]["memory"]
                .as_str()
                .ok_or_else(|| format!("container {:?} has no memory limit to raise", workload.container))?
                .to_owned();
            let current = oom::parse_quantity(&current_text)
                .ok_or_else(|| format!("its memory limit {current_text:?} is not a quantity"))?;
            let new = match oom::next_limit(current, factor, ceiling) {
                oom::Raise::AtCeiling => {
                    return Err(format!(
                        "its memory limit {current_text} is at the TaoNode's memoryCeiling {ceiling_text}: not raised"
                    ));
                }
                oom::Raise::To(bytes) => oom::mebibytes(bytes),
            };
            let body = serde_json::json!({
                "actuator": "kubernetes",
                "cluster": cluster.name,
                "namespace": managed.namespace,
                "taonode": managed.name,
                "verb": "patch",
                "resource": if workload.kind == WorkloadKind::StatefulSet { "statefulsets" } else { "deployments" },
                "name": workload.name,
                "container": workload.container,
                "memory_limit": { "from": current_text, "to": new, "ceiling": ceiling_text },
                "reason": format!("{kills} OOM kills within the window"),
                "leader": crate::fence::term(),
            });
            self.ledger
                .audit_append(AuditKind::Command, node.as_str(), &body, unix_ms())
                .await
                .map_err(|e| format!("not audited, so not made: {e}"))?;
            if !crate::fence::may_act() {
                return Err("not made: this server lost the ledger's lock".into());
            }
            let patch = serde_json::json!({
                "metadata": { "resourceVersion": object["metadata"]["resourceVersion"] },
                "spec": { "template": { "spec": { "containers": [{
                    "name": workload.container,
                    "resources": { "limits": { "memory": new } }
                }] } } }
            });
            let params = PatchParams::default();
            let what = format!("patch {} {}/{}", workload.kind.as_str(), managed.namespace, workload.name);
            let result = match workload.kind {
                WorkloadKind::StatefulSet => {
                    let api: Api<StatefulSet> = Api::namespaced(cluster.client.clone(), &managed.namespace);
                    cluster
                        .call(&what, Some(cluster::PERMISSIONS[8]), api.patch(&workload.name, &params, &Patch::Strategic(&patch)))
                        .await
                        .map(|_| ())
                }
                WorkloadKind::Deployment => {
                    let api: Api<Deployment> = Api::namespaced(cluster.client.clone(), &managed.namespace);
                    cluster
                        .call(&what, Some(cluster::PERMISSIONS[9]), api.patch(&workload.name, &params, &Patch::Strategic(&patch)))
                        .await
                        .map(|_| ())
                }
            };
            let mut after = body.clone();
            after["outcome"] = serde_json::Value::String(match &result {
                Ok(()) => "succeeded".to_owned(),
                Err(error) => format!("failed: {error}"),
            });
            if let Err(error) = self
                .ledger
                .audit_append(AuditKind::Outcome, node.as_str(), &after, unix_ms())
                .await
            {
                tracing::error!(node = %node, %error, "KubernetesOutcomeNotAudited");
            }
            match result {
                Ok(()) => {
                    self.wrote(cluster, "raise_memory");
                    Ok((current_text, new))
                }
                Err(error) => {
                    self.failed(cluster, &error);
                    Err(error.to_string())
                }
            }
        }
        .await;
        match outcome {
            Ok((from, to)) => {
                tracing::info!(node = %node, cluster = cluster.name, from, to, kills, "MemoryLimitRaised");
                self.metrics
                    .remediations_issued
                    .get_or_create(&Reason {
                        reason: "raise-memory-limit",
                    })
                    .inc();
                self.event(
                    cluster,
                    managed,
                    "MemoryLimitRaised",
                    &format!(
                        "raised container {}'s memory limit from {from} to {to} after {kills} OOM kills (ceiling {ceiling_text})",
                        workload.container
                    ),
                    true,
                )
                .await;
            }
            Err(why) => {
                self.alert(
                    node,
                    "oom_killed",
                    format!("{node}: OOM-killed {kills} times within the window; {why}"),
                );
                self.event(cluster, managed, "MemoryLimitNotRaised", &why, false)
                    .await;
            }
        }
    }

    /// Snapshot-restore: scales the workload to 0, waits for its pods to go, runs the
    /// TaoNode's restore Job, waits for it, and scales the workload back to what it had, each
    /// step audited and kept in the TaoNode's `status.restore`, so that a restarted server
    /// resumes where it stopped. A failed or timed-out Job still gets the workload scaled
    /// back, and is alerted.
    async fn restore(&self, cluster: &Cluster, node: &NodeId, managed: &Managed, reason: &str) {
        let Some(spec) = managed.spec.snapshot_restore.clone() else {
            return;
        };
        let timeout =
            Duration::from_secs(u64::from(spec.timeout_minutes.unwrap_or(120).max(1)) * 60);
        let mut progress = match managed
            .restore
            .clone()
            .filter(|r| matches!(r.step.as_str(), "scaling-down" | "restoring" | "scaling-up"))
        {
            Some(resumed) => {
                tracing::info!(node = %node, step = resumed.step, "SnapshotRestoreResumed");
                resumed
            }
            None => {
                let replicas = match self.replicas(cluster, managed).await {
                    Ok(r) if r > 0 => r,
                    Ok(_) => {
                        self.alert(node, "snapshot_restore", format!("{node}: snapshot-restore not started: its workload is scaled to 0 already"));
                        return;
                    }
                    Err(error) => {
                        self.alert(
                            node,
                            "snapshot_restore",
                            format!("{node}: snapshot-restore not started: {error}"),
                        );
                        return;
                    }
                };
                crd::RestoreProgress {
                    step: "scaling-down".into(),
                    replicas,
                    job: String::new(),
                    started: rfc3339(unix_ms()),
                    message: reason.to_owned(),
                    job_failed: false,
                }
            }
        };
        loop {
            if !crate::fence::may_act() {
                return;
            }
            self.record_restore(cluster, node, managed, &progress).await;
            let step = progress.step.clone();
            let result: Result<(), String> = match step.as_str() {
                "scaling-down" => match self.scale(cluster, node, managed, 0, reason).await {
                    Ok(()) => self
                        .wait_pods_gone(cluster, managed, timeout)
                        .await
                        .map(|()| {
                            progress.job = format!("{}-restore-{}", managed.name, unix_ms() / 1000);
                            progress.step = "restoring".into();
                            progress.message = "workload scaled to 0; restore Job created".into();
                        }),
                    Err(e) => Err(e),
                },
                "restoring" => match self
                    .run_restore_job(cluster, node, managed, &spec, &progress.job, timeout)
                    .await
                {
                    Ok(()) => {
                        progress.step = "scaling-up".into();
                        progress.message = format!("restore Job {} completed", progress.job);
                        Ok(())
                    }
                    Err(why) => {
                        // The Job failed or ran out of time: the workload is scaled back anyway.
                        progress.job_failed = true;
                        progress.step = "scaling-up".into();
                        progress.message = why;
                        Ok(())
                    }
                },
                "scaling-up" => self
                    .scale(cluster, node, managed, progress.replicas, reason)
                    .await
                    .map(|()| {
                        progress.step = if progress.job_failed {
                            "failed".into()
                        } else {
                            "done".into()
                        };
                    }),
                _ => break,
            };
            if let Err(why) = result {
                // An API call failed: the step is tried again shortly (it is idempotent),
                // until the timeout, then given up with an alert.
                tracing::warn!(node = %node, step, why, "SnapshotRestoreStepFailed: retrying");
                if progress.started.is_empty()
                    || oom::parse_rfc3339(&progress.started).is_some_and(|at| {
                        unix_ms() - at > i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX) * 2
                    })
                {
                    progress.message = format!("gave up at {step}: {why}");
                    progress.step = "failed".into();
                    self.record_restore(cluster, node, managed, &progress).await;
                    self.alert(
                        node,
                        "snapshot_restore",
                        format!("{node}: snapshot-restore gave up at {step}: {why}"),
                    );
                    return;
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            if matches!(progress.step.as_str(), "done" | "failed") {
                self.record_restore(cluster, node, managed, &progress).await;
                break;
            }
        }
        let ok = progress.step == "done";
        self.event(
            cluster,
            managed,
            if ok {
                "RestoreCompleted"
            } else {
                "RestoreFailed"
            },
            &format!("snapshot-restore {}: {}", progress.step, progress.message),
            ok,
        )
        .await;
        if ok {
            tracing::info!(node = %node, job = progress.job, "SnapshotRestoreCompleted");
        } else {
            self.alert(
                node,
                "snapshot_restore",
                format!(
                    "{node}: snapshot-restore failed: {}; the workload is scaled back to {}",
                    progress.message, progress.replicas
                ),
            );
        }
    }

    /// Keeps `progress` in memory and in the TaoNode's `status.restore`.
    async fn record_restore(
        &self,
        cluster: &Cluster,
        node: &NodeId,
        managed: &Managed,
        progress: &crd::RestoreProgress,
    ) {
        self.figures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(node.to_string())
            .or_default()
            .restore = Some(progress.clone());
        self.apply_status(cluster, node, managed).await;
    }

    /// The workload's `spec.replicas` (1 when unset).
    async fn replicas(&self, cluster: &Cluster, managed: &Managed) -> Result<i32, KubeError> {
        let (_, object) = self.workload(cluster, managed).await?;
        Ok(object["spec"]["replicas"]
            .as_i64()
            .and_then(|r| i32::try_from(r).ok())
            .unwrap_or(1))
    }

    /// Sets the workload's replicas to `to` (audited before and after; nothing when it has
    /// them already).
    async fn scale(
        &self,
        cluster: &Cluster,
        node: &NodeId,
        managed: &Managed,
        to: i32,
        reason: &str,
    ) -> Result<(), String> {
        let workload = &managed.spec.workload;
        let now = self
            .replicas(cluster, managed)
            .await
            .map_err(|e| e.to_string())?;
        if now == to {
            return Ok(());
        }
        let body = serde_json::json!({
            "actuator": "kubernetes",
            "cluster": cluster.name,
            "namespace": managed.namespace,
            "taonode": managed.name,
            "verb": "patch",
            "resource": if workload.kind == WorkloadKind::StatefulSet { "statefulsets" } else { "deployments" },
            "name": workload.name,
            "replicas": { "from": now, "to": to },
            "reason": format!("snapshot-restore: {reason}"),
            "leader": crate::fence::term(),
        });
        self.ledger
            .audit_append(AuditKind::Command, node.as_str(), &body, unix_ms())
            .await
            .map_err(|e| format!("not audited, so not made: {e}"))?;
        if !crate::fence::may_act() {
            return Err("not made: this server lost the ledger's lock".into());
        }
        let patch = serde_json::json!({ "spec": { "replicas": to } });
        let what = format!(
            "scale {} {}/{} to {to}",
            workload.kind.as_str(),
            managed.namespace,
            workload.name
        );
        let result = match workload.kind {
            WorkloadKind::StatefulSet => {
                let api: Api<StatefulSet> =
                    Api::namespaced(cluster.client.clone(), &managed.namespace);
                cluster
                    .call(
                        &what,
                        Some(cluster::PERMISSIONS[8]),
                        api.patch(
                            &workload.name,
                            &PatchParams::default(),
                            &Patch::Merge(&patch),
                        ),
                    )
                    .await
                    .map(|_| ())
            }
            WorkloadKind::Deployment => {
                let api: Api<Deployment> =
                    Api::namespaced(cluster.client.clone(), &managed.namespace);
                cluster
                    .call(
                        &what,
                        Some(cluster::PERMISSIONS[9]),
                        api.patch(
                            &workload.name,
                            &PatchParams::default(),
                            &Patch::Merge(&patch),
                        ),
                    )
                    .await
                    .map(|_| ())
            }
        };
        let mut after = body.clone();
        after["outcome"] = serde_json::Value::String(match &result {
            Ok(()) => "succeeded".to_owned(),
            Err(error) => format!("failed: {error}"),
        });
        if let Err(error) = self
            .ledger
            .audit_append(AuditKind::Outcome, node.as_str(), &after, unix_ms())
            .await
        {
            tracing::error!(node = %node, %error, "KubernetesOutcomeNotAudited");
        }
        match result {
            Ok(()) => {
                self.wrote(cluster, "scale");
                Ok(())
            }
            Err(error) => {
                self.failed(cluster, &error);
                Err(error.to_string())
            }
        }
    }

    /// Waits (every 2 s, up to `timeout`) until no pod of the workload is left.
    async fn wait_pods_gone(
        &self,
        cluster: &Cluster,
        managed: &Managed,
        timeout: Duration,
    ) -> Result<(), String> {
        let (selector, _) = self
            .workload(cluster, managed)
            .await
            .map_err(|e| e.to_string())?;
        let labels = selector
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &managed.namespace);
        let deadline = Instant::now() + timeout;
        loop {
            let found = cluster
                .call(
                    &format!("list pods {} -l {labels}", managed.namespace),
                    Some(cluster::PERMISSIONS[4]),
                    pods.list(&ListParams::default().labels(&labels)),
                )
                .await
                .map_err(|e| e.to_string())?;
            if found.items.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} pod(s) still there after {} minutes",
                    found.items.len(),
                    timeout.as_secs() / 60
                ));
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    /// Creates the restore Job `name` (unless it exists: a resumed restore) and waits (every
    /// 2 s, up to `timeout`) for it to complete; `Err` when it failed or ran out of time.
    async fn run_restore_job(
        &self,
        cluster: &Cluster,
        node: &NodeId,
        managed: &Managed,
        spec: &crd::SnapshotRestore,
        name: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        let jobs: Api<BatchJob> = Api::namespaced(cluster.client.clone(), &managed.namespace);
        let exists = match cluster
            .call(
                &format!("get job {}/{name}", managed.namespace),
                Some(cluster::PERMISSIONS[16]),
                jobs.get(name),
            )
            .await
        {
            Ok(_) => true,
            Err(KubeError::NotFound { .. }) => false,
            Err(error) => return Err(error.to_string()),
        };
        if !exists {
            let body = serde_json::json!({
                "actuator": "kubernetes",
                "cluster": cluster.name,
                "namespace": managed.namespace,
                "taonode": managed.name,
                "verb": "create",
                "resource": "jobs",
                "name": name,
                "reason": "snapshot-restore",
                "leader": crate::fence::term(),
            });
            self.ledger
                .audit_append(AuditKind::Command, node.as_str(), &body, unix_ms())
                .await
                .map_err(|e| format!("not audited, so not made: {e}"))?;
            let job: BatchJob = serde_json::from_value(serde_json::json!({
                "apiVersion": "batch/v1",
                "kind": "Job",
                "metadata": {
                    "name": name,
                    "namespace": managed.namespace,
                    "labels": { "guardian.taonode.io/restore-of": managed.name },
                },
                "spec": spec.job,
            }))
            .map_err(|e| format!("snapshotRestore.job is not a Job spec: {e}"))?;
            cluster
                .call(
                    &format!("create job {}/{name}", managed.namespace),
                    Some(cluster::PERMISSIONS[15]),
                    jobs.create(&PostParams::default(), &job),
                )
                .await
                .map_err(|e| e.to_string())?;
            self.wrote(cluster, "job");
        }
        let deadline = Instant::now() + timeout;
        loop {
            let job = cluster
                .call(
                    &format!("get job {}/{name}", managed.namespace),
                    Some(cluster::PERMISSIONS[16]),
                    jobs.get(name),
                )
                .await
                .map_err(|e| e.to_string())?;
            let conditions = job
                .status
                .as_ref()
                .and_then(|s| s.conditions.clone())
                .unwrap_or_default();
            if conditions
                .iter()
                .any(|c| c.type_ == "Complete" && c.status == "True")
            {
                return Ok(());
            }
            if let Some(failed) = conditions
                .iter()
                .find(|c| c.type_ == "Failed" && c.status == "True")
            {
                return Err(format!(
                    "restore Job {name} failed: {}",
                    failed.message.clone().unwrap_or_default()
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "restore Job {name} did not complete within {} minutes",
                    timeout.as_secs() / 60
                ));
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    /// Cordon-and-alert: finds the Kubernetes node of the validator's pod (as a restart picks
    /// the pod) and marks it unschedulable, unless it already is. Audited before and after,
    /// with an Event; anything that stops it is alerted. Uncordoning is the operator's
    /// (`kubectl uncordon`), as resuming the node is.
    async fn cordon_node(
        &self,
        cluster: &Cluster,
        node: &NodeId,
        managed: &Managed,
        reason: &str,
        host: &str,
    ) {
        let outcome: Result<String, String> = async {
            let (selector, _) = self
                .workload(cluster, managed)
                .await
                .map_err(|e| e.to_string())?;
            let labels = selector
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",");
            let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &managed.namespace);
            let found = cluster
                .call(
                    &format!("list pods {} -l {labels}", managed.namespace),
                    Some(cluster::PERMISSIONS[4]),
                    pods.list(&ListParams::default().labels(&labels)),
                )
                .await
                .map_err(|e| e.to_string())?;
            let (pod, _) = choose_pod(&found.items, &managed.spec.workload.container, host)?;
            let kube_node = found
                .items
                .iter()
                .find(|p| p.metadata.name.as_deref() == Some(pod.as_str()))
                .and_then(|p| p.spec.as_ref()?.node_name.clone())
                .ok_or_else(|| format!("pod {pod} is not scheduled on a node"))?;
            let nodes: Api<Node> = Api::all(cluster.client.clone());
            let current = cluster
                .call(
                    &format!("get node {kube_node}"),
                    Some(cluster::PERMISSIONS[13]),
                    nodes.get(&kube_node),
                )
                .await
                .map_err(|e| e.to_string())?;
            if current.spec.as_ref().and_then(|s| s.unschedulable) == Some(true) {
                return Ok(format!("{kube_node} (already unschedulable)"));
            }
            let body = serde_json::json!({
                "actuator": "kubernetes",
                "cluster": cluster.name,
                "taonode": managed.name,
                "namespace": managed.namespace,
                "verb": "patch",
                "resource": "nodes",
                "name": kube_node,
                "change": "unschedulable",
                "reason": reason,
                "leader": crate::fence::term(),
            });
            self.ledger
                .audit_append(AuditKind::Command, node.as_str(), &body, unix_ms())
                .await
                .map_err(|e| format!("not audited, so not made: {e}"))?;
            if !crate::fence::may_act() {
                return Err("not made: this server lost the ledger's lock".into());
            }
            let patch = serde_json::json!({ "spec": { "unschedulable": true } });
            let result = cluster
                .call(
                    &format!("patch node {kube_node}"),
                    Some(cluster::PERMISSIONS[14]),
                    nodes.patch(&kube_node, &PatchParams::default(), &Patch::Merge(&patch)),
                )
                .await
                .map(|_| ());
            let mut after = body.clone();
            after["outcome"] = serde_json::Value::String(match &result {
                Ok(()) => "succeeded".to_owned(),
                Err(error) => format!("failed: {error}"),
            });
            if let Err(error) = self
                .ledger
                .audit_append(AuditKind::Outcome, node.as_str(), &after, unix_ms())
                .await
            {
                tracing::error!(node = %node, %error, "KubernetesOutcomeNotAudited");
            }
            match result {
                Ok(()) => {
                    self.wrote(cluster, "cordon");
                    Ok(kube_node)
                }
                Err(error) => {
                    self.failed(cluster, &error);
                    Err(error.to_string())
                }
            }
        }
        .await;
        match outcome {
            Ok(kube_node) => {
                tracing::info!(node = %node, cluster = cluster.name, kube_node, "KubernetesNodeCordoned");
                self.event(
                    cluster,
                    managed,
                    "NodeCordoned",
                    &format!("marked Kubernetes node {kube_node} unschedulable (cordon-and-alert): {reason}"),
                    true,
                )
                .await;
            }
            Err(why) => {
                self.alert(
                    node,
                    "kubernetes_remediation_failed",
                    format!(
                        "{node}: cordon through cluster {} failed: {why}",
                        cluster.name
                    ),
                );
                self.event(cluster, managed, "CordonFailed", &why, false)
                    .await;
            }
        }
    }

    /// Chain storage auto-expansion: grows the TaoNode's chain-data claim by its factor, never
    /// above its maximum, only when the claim's StorageClass allows expansion and no resize of
    /// it is still pending (a merge patch carrying the claim's resourceVersion). Audited before
    /// and after, with an Event; anything that stops it is alerted.
    async fn expand_volume(&self, cluster: &Cluster, node: &NodeId, managed: &Managed, why: &str) {
        let Some(volume) = managed.spec.chain_volume.clone() else {
            return;
        };
        let (factor, _, _) = volume.effective();
        let ns = &managed.namespace;
        let claim = &volume.claim_name;
        let outcome: Result<(String, String), String> = async {
            let maximum = oom::parse_quantity(&volume.maximum).ok_or_else(|| {
                format!("chainVolume.maximum {:?} is not a quantity (e.g. 4Ti)", volume.maximum)
            })?;
            let claims: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client.clone(), ns);
            let pvc = cluster
                .call(
                    &format!("get persistentvolumeclaim {ns}/{claim}"),
                    Some(cluster::PERMISSIONS[10]),
                    claims.get(claim),
                )
                .await
                .map_err(|e| e.to_string())?;
            let json = serde_json::to_value(&pvc).unwrap_or_default();
            let requested_text = json["spec"]["resources"]["requests"]["storage"]
                .as_str()
                .ok_or_else(|| format!("claim {claim} requests no storage size"))?
                .to_owned();
            let requested = oom::parse_quantity(&requested_text)
                .ok_or_else(|| format!("claim {claim}'s size {requested_text:?} is not a quantity"))?;
            let pending = json["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| {
                    matches!(c["type"].as_str(), Some("Resizing" | "FileSystemResizePending"))
                        && c["status"] == "True"
                });
            let capacity = json["status"]["capacity"]["storage"]
                .as_str()
                .and_then(oom::parse_quantity)
                .unwrap_or(0);
            if pending || capacity < requested {
                return Err(format!(
                    "claim {claim} is still being resized ({requested_text} requested, {} held): not grown again until it finishes",
                    oom::mebibytes(capacity)
                ));
            }
            let class_name = json["spec"]["storageClassName"].as_str().unwrap_or_default().to_owned();
            if class_name.is_empty() {
                return Err(format!("claim {claim} names no StorageClass: it cannot be expanded"));
            }
            let classes: Api<StorageClass> = Api::all(cluster.client.clone());
            let class = cluster
                .call(
                    &format!("get storageclass {class_name}"),
                    Some(cluster::PERMISSIONS[12]),
                    classes.get(&class_name),
                )
                .await
                .map_err(|e| e.to_string())?;
            if class.allow_volume_expansion != Some(true) {
                return Err(format!(
                    "StorageClass {class_name} does not allow volume expansion (allowVolumeExpansion): claim {claim} cannot grow"
                ));
            }
            let new = match oom::next_limit(requested, factor, maximum) {
                oom::Raise::AtCeiling => {
                    return Err(format!(
                        "claim {claim} already requests {requested_text}, the TaoNode's chainVolume.maximum {}: not grown",
                        volume.maximum
                    ));
                }
                oom::Raise::To(bytes) => oom::mebibytes(bytes),
            };
            let body = serde_json::json!({
                "actuator": "kubernetes",
                "cluster": cluster.name,
                "namespace": ns,
                "taonode": managed.name,
                "verb": "patch",
                "resource": "persistentvolumeclaims",
                "name": claim,
                "storage": { "from": requested_text, "to": new, "maximum": volume.maximum },
                "reason": why,
                "leader": crate::fence::term(),
            });
            self.ledger
                .audit_append(AuditKind::Command, node.as_str(), &body, unix_ms())
                .await
                .map_err(|e| format!("not audited, so not made: {e}"))?;
            if !crate::fence::may_act() {
                return Err("not made: this server lost the ledger's lock".into());
            }
            let patch = serde_json::json!({
                "metadata": { "resourceVersion": json["metadata"]["resourceVersion"] },
                "spec": { "resources": { "requests": { "storage": new } } }
            });
            let result = cluster
                .call(
                    &format!("patch persistentvolumeclaim {ns}/{claim}"),
                    Some(cluster::PERMISSIONS[11]),
                    claims.patch(claim, &PatchParams::default(), &Patch::Merge(&patch)),
                )
                .await
                .map(|_| ());
            let mut after = body.clone();
            after["outcome"] = serde_json::Value::String(match &result {
                Ok(()) => "succeeded".to_owned(),
                Err(error) => format!("failed: {error}"),
            });
            if let Err(error) = self
                .ledger
                .audit_append(AuditKind::Outcome, node.as_str(), &after, unix_ms())
                .await
            {
                tracing::error!(node = %node, %error, "KubernetesOutcomeNotAudited");
            }
            match result {
                Ok(()) => {
                    self.wrote(cluster, "expand_volume");
                    Ok((requested_text, new))
                }
                Err(error) => {
                    self.failed(cluster, &error);
                    Err(error.to_string())
                }
            }
        }
        .await;
        match outcome {
            Ok((from, to)) => {
                tracing::info!(node = %node, cluster = cluster.name, claim, from, to, "ChainVolumeExpanded");
                self.metrics
                    .remediations_issued
                    .get_or_create(&Reason {
                        reason: "expand-volume",
                    })
                    .inc();
                self.event(
                    cluster,
                    managed,
                    "VolumeExpanded",
                    &format!("requested {to} for claim {claim} (was {from}): {why}"),
                    true,
                )
                .await;
            }
            Err(reason) => {
                self.alert(node, "storage_full", format!("{node}: {why}; {reason}"));
                self.event(cluster, managed, "VolumeNotExpanded", &reason, false)
                    .await;
            }
        }
    }

    /// Restart: finds the workload's one pod, audits the deletion, deletes it under a uid
    /// precondition, audits the outcome, writes an Event and the status.
    async fn delete_pod(
        &self,
        cluster: &Cluster,
        node: &NodeId,
        managed: &Managed,
        reason: &str,
        host: &str,
        arrived: Option<Instant>,
    ) {
        let outcome = match self.pick_pod(cluster, managed, host).await {
            Err(error) => Err(error.to_string()),
            Ok(pod) => {
                let body = serde_json::json!({
                    "actuator": "kubernetes",
                    "cluster": cluster.name,
                    "namespace": managed.namespace,
                    "taonode": managed.name,
                    "verb": "delete",
                    "resource": "pods",
                    "name": pod.0,
                    "uid": pod.1,
                    "reason": reason,
                    "leader": crate::fence::term(),
                });
                // Audited before it is made: a write the ledger did not take is not made.
                match self
                    .ledger
                    .audit_append(AuditKind::Command, node.as_str(), &body, unix_ms())
                    .await
                {
                    Err(error) => Err(format!("not audited, so not made: {error}")),
                    Ok(_) if !crate::fence::may_act() => {
                        Err("not made: this server lost the ledger's lock".to_owned())
                    }
                    Ok(_) => {
                        let pods: Api<Pod> =
                            Api::namespaced(cluster.client.clone(), &managed.namespace);
                        let params = DeleteParams {
                            preconditions: Some(Preconditions {
                                uid: Some(pod.1.clone()),
                                resource_version: None,
                            }),
                            ..DeleteParams::default()
                        };
                        let delete = Permission {
                            verb: "delete",
                            group: "",
                            resource: "pods",
                            subresource: "",
                        };
                        let what = format!("delete pod {}/{}", managed.namespace, pod.0);
                        let result = cluster
                            .call(&what, Some(delete), pods.delete(&pod.0, &params))
                            .await;
                        if let Some(arrived) = arrived {
                            self.metrics
                                .decision_latency_seconds
                                .observe(arrived.elapsed().as_secs_f64());
                        }
                        let outcome = match &result {
                            Ok(_) => Ok(pod.0.clone()),
                            Err(error) => Err(error.to_string()),
                        };
                        let mut after = body.clone();
                        after["outcome"] = serde_json::Value::String(match &outcome {
                            Ok(_) => "succeeded".to_owned(),
                            Err(why) => format!("failed: {why}"),
                        });
                        if let Err(error) = self
                            .ledger
                            .audit_append(AuditKind::Outcome, node.as_str(), &after, unix_ms())
                            .await
                        {
                            tracing::error!(node = %node, %error, "KubernetesOutcomeNotAudited");
                        }
                        match result {
                            Ok(_) => self.wrote(cluster, "delete_pod"),
                            Err(error) => self.failed(cluster, &error),
                        }
                        outcome
                    }
                }
            }
        };
        let (event_reason, message, outcome_text) = match &outcome {
            Ok(pod) => {
                self.metrics
                    .remediations_issued
                    .get_or_create(&Reason {
                        reason: "delete-pod",
                    })
                    .inc();
                tracing::info!(node = %node, cluster = cluster.name, pod, reason, "RemediationIssued: pod deleted");
                (
                    "PodDeleted",
                    format!("deleted pod {pod} to restart the validator's node: {reason}"),
                    "succeeded".to_owned(),
                )
            }
            Err(why) => {
                self.alert(
                    node,
                    "kubernetes_remediation_failed",
                    format!(
                        "{node}: restart through cluster {} failed: {why}",
                        cluster.name
                    ),
                );
                (
                    "RemediationFailed",
                    format!("could not restart the validator's node: {why}"),
                    format!("failed: {why}"),
                )
            }
        };
        self.event(cluster, managed, event_reason, &message, outcome.is_ok())
            .await;
        {
            let mut all = self
                .figures
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let entry = all.entry(node.to_string()).or_default();
            entry.last = Some(LastRemediation {
                action: "delete-pod".to_owned(),
                time: rfc3339(unix_ms()),
                outcome: outcome_text,
            });
        }
        self.apply_status(cluster, node, managed).await;
    }

    /// The workload's pod to delete: `(name, uid)`, chosen by [`choose_pod`] among the pods
    /// its selector matches; anything but one clear choice is refused with the reason.
    async fn pick_pod(
        &self,
        cluster: &Cluster,
        managed: &Managed,
        host: &str,
    ) -> Result<(String, String), KubeError> {
        let ns = &managed.namespace;
        let workload = &managed.spec.workload;
        let get = |resource: &'static str| Permission {
            verb: "get",
            group: "apps",
            resource,
            subresource: "",
        };
        let what = format!("get {} {ns}/{}", workload.kind.as_str(), workload.name);
        let selector = match workload.kind {
            WorkloadKind::StatefulSet => {
                let api: Api<StatefulSet> = Api::namespaced(cluster.client.clone(), ns);
                let set = cluster
                    .call(&what, Some(get("statefulsets")), api.get(&workload.name))
                    .await?;
                set.spec
                    .map(|s| s.selector.match_labels.unwrap_or_default())
            }
            WorkloadKind::Deployment => {
                let api: Api<Deployment> = Api::namespaced(cluster.client.clone(), ns);
                let set = cluster
                    .call(&what, Some(get("deployments")), api.get(&workload.name))
                    .await?;
                set.spec
                    .map(|s| s.selector.match_labels.unwrap_or_default())
            }
        }
        .unwrap_or_default();
        let refuse = |why: String| KubeError::Failed {
            cluster: cluster.name.clone(),
            what: what.clone(),
            why,
        };
        if selector.is_empty() {
            return Err(refuse(
                "the workload has no matchLabels selector; its pods cannot be found".into(),
            ));
        }
        let labels = selector
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), ns);
        let list = Permission {
            verb: "list",
            group: "",
            resource: "pods",
            subresource: "",
        };
        let found = cluster
            .call(
                &format!("list pods {ns} -l {labels}"),
                Some(list),
                pods.list(&ListParams::default().labels(&labels)),
            )
            .await?;
        choose_pod(&found.items, &workload.container, host)
            .map_err(|why| refuse(format!("{why} (selector {labels}); nothing deleted")))
    }

    /// A Kubernetes Event on the TaoNode (best effort: a failure is counted and logged).
    async fn event(
        &self,
        cluster: &Cluster,
        managed: &Managed,
        reason: &str,
        message: &str,
        normal: bool,
    ) {
        let now = rfc3339(unix_ms());
        let event = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "generateName": format!("{}.", managed.name),
                "namespace": managed.namespace,
            },
            "involvedObject": {
                "apiVersion": "guardian.taonode.io/v1alpha1",
                "kind": "TaoNode",
                "name": managed.name,
                "namespace": managed.namespace,
                "uid": managed.uid,
            },
            "reason": reason,
            "message": message,
            "type": if normal { "Normal" } else { "Warning" },
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "source": { "component": FIELD_MANAGER },
            "reportingComponent": FIELD_MANAGER,
        });
        let event: Event = match serde_json::from_value(event) {
            Ok(event) => event,
            Err(error) => {
                tracing::error!(%error, "KubernetesEventNotBuilt");
                return;
            }
        };
        let api: Api<Event> = Api::namespaced(cluster.client.clone(), &managed.namespace);
        let create = Permission {
            verb: "create",
            group: "",
            resource: "events",
            subresource: "",
        };
        match cluster
            .call(
                &format!(
                    "create event on taonode {}/{}",
                    managed.namespace, managed.name
                ),
                Some(create),
                api.create(&PostParams::default(), &event),
            )
            .await
        {
            Ok(_) => self.wrote(cluster, "event"),
            Err(error) => {
                tracing::warn!(%error, "KubernetesEventNotWritten");
                self.failed(cluster, &error);
            }
        }
    }

    /// Applies the TaoNode's whole status (server-side apply, field manager
    /// `taonode-guardian`, forced: the server owns status).
    async fn apply_status(&self, cluster: &Cluster, node: &NodeId, managed: &Managed) {
        let standing = self
            .figures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(node.as_str())
            .cloned()
            .unwrap_or_default();
        let mut status = status_of(&standing.figures, standing.last, managed.generation);
        status.restore = standing.restore.or_else(|| managed.restore.clone());
        let patch = serde_json::json!({
            "apiVersion": "guardian.taonode.io/v1alpha1",
            "kind": "TaoNode",
            "metadata": { "name": managed.name, "namespace": managed.namespace },
            "status": status,
        });
        let api: Api<TaoNode> = Api::namespaced(cluster.client.clone(), &managed.namespace);
        let permission = Permission {
            verb: "patch",
            group: "guardian.taonode.io",
            resource: "taonodes",
            subresource: "status",
        };
        match cluster
            .call(
                &format!(
                    "apply status of taonode {}/{}",
                    managed.namespace, managed.name
                ),
                Some(permission),
                api.patch_status(
                    &managed.name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&patch),
                ),
            )
            .await
        {
            Ok(_) => self.wrote(cluster, "status"),
            Err(error) => {
                tracing::warn!(node = %node, %error, "TaoNodeStatusNotWritten");
                self.failed(cluster, &error);
            }
        }
    }
}

/// A watched TaoNode as the index keeps it (`None` without a name).
fn managed_of(cluster: &str, tn: TaoNode) -> Option<Managed> {
    Some(Managed {
        cluster: cluster.to_owned(),
        namespace: tn.metadata.namespace.clone().unwrap_or_default(),
        name: tn.metadata.name.clone()?,
        uid: tn.metadata.uid.clone().unwrap_or_default(),
        generation: tn.metadata.generation,
        restore: tn.status.and_then(|s| s.restore),
        spec: tn.spec,
    })
}

/// The pod to delete among `pods` (those the workload's selector matches): not already
/// terminating, with `container`; when several remain, the one on `host` (the Kubernetes node
/// the agent reported), if exactly one is. Anything else is refused with the reason: deleting
/// one of several pods would be a guess.
fn choose_pod(pods: &[Pod], container: &str, host: &str) -> Result<(String, String), String> {
    let live: Vec<&Pod> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            p.spec
                .as_ref()
                .is_some_and(|s| s.containers.iter().any(|c| c.name == container))
        })
        .collect();
    let on_host: Vec<&Pod> = if live.len() > 1 && !host.is_empty() {
        live.iter()
            .copied()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(host))
            .collect()
    } else {
        live.clone()
    };
    let named = |pod: &Pod| {
        (
            pod.metadata.name.clone().unwrap_or_default(),
            pod.metadata.uid.clone().unwrap_or_default(),
        )
    };
    match (live.as_slice(), on_host.as_slice()) {
        ([pod], _) | (_, [pod]) => Ok(named(pod)),
        ([], _) => Err(format!("no running pod has container {container:?}")),
        (many, []) if !host.is_empty() => Err(format!(
            "{} pods match and none runs on the agent's node {host}",
            many.len()
        )),
        (many, _) => Err(format!(
            "{} pods match and the agent reported no Kubernetes node to tell them apart",
            many.len()
        )),
    }
}

/// The status a TaoNode gets for `figures`.
fn status_of(
    figures: &NodeFigures,
    last: Option<LastRemediation>,
    generation: Option<i64>,
) -> TaoNodeStatus {
    // Both conditions change only with the phase.
    let since = rfc3339(figures.phase_since_unix_ms);
    let ready = figures.phase == "synced";
    let remediating = figures.phase == "recovering";
    let condition = |type_: &str, on: bool, reason: &str, message: String| Condition {
        type_: type_.to_owned(),
        status: if on { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message,
        last_transition_time: since.clone(),
    };
    TaoNodeStatus {
        phase: (!figures.phase.is_empty()).then(|| figures.phase.clone()),
        block_lag: Some(figures.block_lag),
        risk: Some((figures.risk * 100.0).round() / 100.0),
        open_findings: Some(figures.open_findings),
        attempts: Some(figures.attempts),
        last_remediation: last,
        conditions: vec![
            condition(
                "Ready",
                ready,
                if ready { "Synced" } else { "NotSynced" },
                format!(
                    "phase {}, {} blocks behind",
                    figures.phase, figures.block_lag
                ),
            ),
            condition(
                "Remediating",
                remediating,
                if remediating { "Recovering" } else { "Idle" },
                format!("{} remediation(s) in the current budget", figures.attempts),
            ),
        ],
        observed_generation: generation,
        restore: None,
    }
}

/// RFC 3339 UTC with second precision.
fn rfc3339(unix_ms: i64) -> String {
    format!("{}Z", crate::utc(unix_ms).replacen(' ', "T", 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_says_ready_only_when_synced_and_keeps_the_last_remediation() {
        let figures = NodeFigures {
            phase: "recovering".into(),
            block_lag: 42,
            risk: 0.734,
            open_findings: 1,
            attempts: 1,
            phase_since_unix_ms: 1_000,
        };
        let last = LastRemediation {
            action: "delete-pod".into(),
            time: "2026-12-06T10:00:00Z".into(),
            outcome: "succeeded".into(),
        };
        let status = status_of(&figures, Some(last.clone()), Some(3));
        assert_eq!(status.phase.as_deref(), Some("recovering"));
        assert_eq!(status.risk, Some(0.73));
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(status.last_remediation, Some(last));
        assert_eq!(status.conditions[0].status, "False");
        assert_eq!(status.conditions[1].status, "True");
        assert_eq!(
            status.conditions[0].last_transition_time,
            "1970-01-01T00:00:01Z"
        );
    }

    fn pod(name: &str, node: &str, container: &str, terminating: bool) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": name,
                "uid": format!("uid-{name}"),
                "deletionTimestamp": terminating.then_some("2026-12-06T10:00:00Z"),
            },
            "spec": { "nodeName": node, "containers": [{ "name": container }] }
        }))
        .unwrap_or_default()
    }

    #[test]
    fn the_pod_to_delete_is_one_clear_choice_or_none() {
        let one = [pod("s-0", "n1", "subtensor", false)];
        assert_eq!(
            choose_pod(&one, "subtensor", ""),
            Ok(("s-0".into(), "uid-s-0".into()))
        );
        assert!(choose_pod(&one, "other", "").is_err_and(|e| e.contains("container")));
        let rolling = [
            pod("s-0", "n1", "subtensor", true),
            pod("s-1", "n2", "subtensor", false),
        ];
        assert_eq!(
            choose_pod(&rolling, "subtensor", "").map(|p| p.0),
            Ok("s-1".into())
        );
        let two = [
            pod("a", "n1", "subtensor", false),
            pod("b", "n2", "subtensor", false),
        ];
        assert_eq!(
            choose_pod(&two, "subtensor", "n2").map(|p| p.0),
            Ok("b".into())
        );
        assert!(choose_pod(&two, "subtensor", "").is_err_and(|e| e.contains("no Kubernetes node")));
        assert!(choose_pod(&two, "subtensor", "n9").is_err_and(|e| e.contains("n9")));
    }

    #[test]
    fn settings_refuse_what_cannot_work() {
        let mut settings = KubeSettings::default();
        assert!(settings.validate().is_ok());
        settings.watch_timeout_seconds = 0;
        assert!(
            settings
                .validate()
                .expect_err("refused")
                .contains("watch_timeout_seconds")
        );
    }
}
