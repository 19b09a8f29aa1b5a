//! The Kubernetes actuator: remediation through the Kubernetes API of each configured
//! cluster, beside the agent actuator. A node is Kubernetes-managed when a `TaoNode` in one
//! of the clusters names its node id; its remediations then go to its cluster instead of its
//! agent.
//!
//! Per cluster, four tasks: a watcher of every TaoNode (the index of managed nodes), a health
//! check at start and every minute (reachable; each permission of [`cluster::PERMISSIONS`]
//! allowed), an OOM-kill check, and the writer, which makes up to 16 nodes' writes at once,
//! each node's in order. A slow or unreachable cluster never blocks another cluster, the
//! control loop or ingest: every call has a timeout and each cluster has its own queue.
//!
//! Modules: [`cluster`] (settings, client, health), [`crd`] (the TaoNode types), [`oom`]
//! (quantities and the OOM-kill window, pure); one per action: `restart` (delete the pod),
//! `cordon` (the pod's node unschedulable), `restore` (snapshot-restore through a Job),
//! `memory` (OOMKilled memory raises), `volume` (chain PVC growth); `status` (the TaoNode's
//! status). This is the only module that imports `kube` and `k8s_openapi` (layering rule 7).
//!
//! # Guarantees
//! - Every write that remediates is in the ledger's audit chain before it is made, and its
//!   outcome after; one that cannot be audited is not made.
//! - One remediation deletes at most one pod, the one chosen when it was decided (a
//!   precondition on its uid): a retry never deletes a second pod. Patches carry the object's
//!   resourceVersion.
//! - In a dry run nothing is written to any cluster (no deletion, patch, Job, event or status).
//! - A node whose cluster is unreachable is alerted, never acted on some other way.
//! - A server that lost the ledger's lock writes nothing more ([`crate::fence`]).

pub mod cluster;
mod cordon;
pub mod crd;
mod memory;
pub mod oom;
mod restart;
mod restore;
mod status;
mod volume;

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
use restart::choose_pod;
use status::rfc3339;

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

    /// The pods the workload's selector matches now (and the selector, for messages).
    pub(super) async fn pods_of(
        &self,
        cluster: &Cluster,
        managed: &Managed,
    ) -> Result<(Vec<Pod>, String), KubeError> {
        let (selector, _) = self.workload(cluster, managed).await?;
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
            .await?;
        Ok((found.items, labels))
    }

    /// Makes one remediating write the audited way: `body` (what and why; the actuator,
    /// cluster and leader are added) goes into the audit chain first, and a write the ledger
    /// did not take is not made; nothing is made once the ledger's lock is lost; then `call`
    /// runs (its answer observed against `arrived` for the decision latency), and its outcome
    /// is audited and counted (`written` in `guardian_kube_writes_total`). `Err` says why in
    /// words.
    pub(super) async fn audited<T>(
        &self,
        cluster: &Cluster,
        node: &NodeId,
        mut body: serde_json::Value,
        written: &'static str,
        arrived: Option<Instant>,
        call: impl std::future::Future<Output = Result<T, KubeError>>,
    ) -> Result<T, String> {
        body["actuator"] = "kubernetes".into();
        body["cluster"] = cluster.name.clone().into();
        body["leader"] = serde_json::to_value(crate::fence::term()).unwrap_or_default();
        self.ledger
            .audit_append(AuditKind::Command, node.as_str(), &body, unix_ms())
            .await
            .map_err(|e| format!("not audited, so not made: {e}"))?;
        if !crate::fence::may_act() {
            return Err("not made: this server lost the ledger's lock".into());
        }
        let result = call.await;
        if let Some(arrived) = arrived {
            self.metrics
                .decision_latency_seconds
                .observe(arrived.elapsed().as_secs_f64());
        }
        body["outcome"] = match &result {
            Ok(_) => "succeeded".to_owned(),
            Err(error) => format!("failed: {error}"),
        }
        .into();
        if let Err(error) = self
            .ledger
            .audit_append(AuditKind::Outcome, node.as_str(), &body, unix_ms())
            .await
        {
            tracing::error!(node = %node, %error, "KubernetesOutcomeNotAudited");
        }
        match result {
            Ok(value) => {
                self.wrote(cluster, written);
                Ok(value)
            }
            Err(error) => {
                self.failed(cluster, &error);
                Err(error.to_string())
            }
        }
    }

    /// Patches the TaoNode's workload (StatefulSet or Deployment) with `patch`.
    pub(super) async fn patch_workload(
        &self,
        cluster: &Cluster,
        managed: &Managed,
        patch: &Patch<serde_json::Value>,
    ) -> Result<(), KubeError> {
        let workload = &managed.spec.workload;
        let ns = &managed.namespace;
        let what = format!("patch {} {ns}/{}", workload.kind.as_str(), workload.name);
        let params = PatchParams::default();
        match workload.kind {
            WorkloadKind::StatefulSet => {
                let api: Api<StatefulSet> = Api::namespaced(cluster.client.clone(), ns);
                cluster
                    .call(
                        &what,
                        Some(cluster::PERMISSIONS[8]),
                        api.patch(&workload.name, &params, patch),
                    )
                    .await
                    .map(|_| ())
            }
            WorkloadKind::Deployment => {
                let api: Api<Deployment> = Api::namespaced(cluster.client.clone(), ns);
                cluster
                    .call(
                        &what,
                        Some(cluster::PERMISSIONS[9]),
                        api.patch(&workload.name, &params, patch),
                    )
                    .await
                    .map(|_| ())
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

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
