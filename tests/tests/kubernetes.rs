//! Remediation through the Kubernetes API of two clusters, end to end with real processes:
//! fake subtensor nodes sampled by real agents, the server with `[kubernetes.clusters.a]` and
//! `[kubernetes.clusters.b]`, each a fake Kubernetes API server (real HTTP, the real `kube`
//! client through a kubeconfig) that records every request. The assertions count the writes
//! each cluster received.

use std::time::{Duration, Instant};

use guardian_proto::v1::fleet_client::FleetClient;
use guardian_proto::v1::{GetNodeRequest, Node};
use guardian_tests::fake_kube::{FakeKube, Recorded};
use guardian_tests::fake_node::{FakeNode, FakeNodeConfig};
use guardian_tests::{Proc, Scratch, Server, binary, eventually, start_agent_with_env};
use serde_json::{Value, json};
use tonic::transport::Channel;

type TestResult = anyhow::Result<()>;

const INTERVAL_MS: u64 = 400;
const WAIT: Duration = Duration::from_secs(40);
const TAONODES: &str = "/apis/guardian.taonode.io/v1alpha1/namespaces/validators/taonodes";
const PODS: &str = "/api/v1/namespaces/validators/pods";
const SETS: &str = "/apis/apps/v1/namespaces/validators/statefulsets";

/// Two clusters, one validator in each: `val-a` in cluster a, `val-b` in cluster b.
struct Rig {
    scratch: Scratch,
    config: std::path::PathBuf,
    server: Server,
    nodes: Vec<FakeNode>,
    agents: Vec<Proc>,
    clusters: [FakeKube; 2],
    operator: FleetClient<Channel>,
}

/// A validator's workload in `kube`: a TaoNode naming `node`, its StatefulSet and one pod.
fn declare(kube: &FakeKube, node: &str) {
    kube.put_validator(node);
}

/// The workload's pod `subtensor-NODE-0` (a new uid each time, as its controller makes it).
fn pod(kube: &FakeKube, node: &str) {
    kube.put_validator_pod(node);
}

fn is_write_of(r: &Recorded, method: &str, path_part: &str) -> bool {
    r.method == method && r.path.contains(path_part)
}

impl Rig {
    async fn start(reconcile: &str) -> anyhow::Result<Rig> {
        let names = ["val-a", "val-b"];
        let clusters = [FakeKube::start("a").await?, FakeKube::start("b").await?];
        declare(&clusters[0], "val-a");
        declare(&clusters[1], "val-b");
        Self::start_with(&names, clusters, reconcile, "", &[]).await
    }

    /// As [`Rig::start`] with the clusters given, `detect` lines in `[detect]`, and `env` in
    /// every agent's environment.
    async fn start_with(
        names: &[&str],
        clusters: [FakeKube; 2],
        reconcile: &str,
        detect: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Rig> {
        let scratch = Scratch::new(names)?;
        // No command signing key: Kubernetes-managed nodes need none.
        let server_extra = format!(
            "[detect]\nfrozen_head_ms = 2500\n{detect}\n\
             [reconcile]\nevaluate_interval_ms = 200\n{reconcile}\n[reconcile.policy]\nmax_block_lag = 5\n\
             recovery_strategy = \"restart\"\nprobe_interval_seconds = 2\nconfirm_samples = 2\nrecover_samples = 2\n\
             [kubernetes]\nrequest_timeout_ms = 1000\nhealth_interval_seconds = 1\n\
             [kubernetes.clusters.a]\nkubeconfig = \"{}\"\n\
             [kubernetes.clusters.b]\nkubeconfig = \"{}\"\n",
            clusters[0].kubeconfig().display(),
            clusters[1].kubeconfig().display(),
        );
        let config = scratch.server_config(&scratch.sqlite_url(), &server_extra)?;
        let server = Server::start(&config, scratch.path("server.log"))?;
        let mut nodes = Vec::new();
        let mut agents = Vec::new();
        for name in names {
            let node = FakeNode::start(FakeNodeConfig::default()).await?;
            let agent_extra = format!(
                "[chain]\nendpoint = \"{}\"\ncall_timeout_ms = 300\n",
                node.ws_url()
            );
            agents.push(start_agent_with_env(
                &scratch.agent_config_with(name, server.grpc, INTERVAL_MS, &agent_extra)?,
                scratch.path(&format!("agent-{name}.log")),
                env,
            )?);
            nodes.push(node);
        }
        let operator = scratch.operator(server.grpc).await?;
        let rig = Rig {
            scratch,
            config,
            server,
            nodes,
            agents,
            clusters,
            operator,
        };
        for name in names {
            rig.wait_phase(name, "synced").await?;
        }
        Ok(rig)
    }

    async fn node(&self, name: &str) -> Option<Node> {
        let mut operator = self.operator.clone();
        Some(
            operator
                .get_node(GetNodeRequest {
                    node_id: name.into(),
                })
                .await
                .ok()?
                .into_inner(),
        )
    }

    async fn wait_phase(&self, name: &str, phase: &str) -> anyhow::Result<Node> {
        eventually(WAIT, &format!("{name} to be {phase}"), || async {
            self.node(name).await.filter(|n| n.phase == phase)
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}; server log:\n{}", self.server_log_tail()))
    }

    /// The TaoNode's status as the cluster holds it.
    fn status(&self, cluster: usize, node: &str) -> Value {
        self.clusters[cluster]
            .get(TAONODES, node)
            .and_then(|t| t.get("status").cloned())
            .unwrap_or(Value::Null)
    }

    async fn wait_status_phase(
        &self,
        cluster: usize,
        node: &str,
        phase: &str,
    ) -> anyhow::Result<Duration> {
        let started = Instant::now();
        eventually(
            Duration::from_secs(10),
            &format!("{node}'s TaoNode status to say {phase}"),
            || async { (self.status(cluster, node)["phase"] == phase).then_some(()) },
        )
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "{e}; status {}; server log:\n{}",
                self.status(cluster, node),
                self.server_log_tail()
            )
        })?;
        Ok(started.elapsed())
    }

    /// Waits until the reconciler has evaluated `per_node` more times per node, so that
    /// "nothing was done" is checked after it had that many chances to act.
    async fn wait_evaluations(&self, per_node: u64) -> anyhow::Result<()> {
        let count = || {
            guardian_tests::admin_metrics(self.server.admin)
                .ok()
                .and_then(|m| {
                    guardian_tests::metric_value(&m, "guardian_reconcile_evaluations_total")
                })
        };
        let start = count().ok_or_else(|| anyhow::anyhow!("no evaluations metric"))?;
        let more = (per_node * self.nodes.len() as u64) as f64;
        eventually(WAIT, "more evaluations", || async {
            count().filter(|now| *now >= start + more).map(|_| ())
        })
        .await
    }

    fn deletions(&self, cluster: usize) -> Vec<Recorded> {
        self.clusters[cluster]
            .writes()
            .into_iter()
            .filter(|r| r.method == "DELETE" || r.path.ends_with("/eviction"))
            .collect()
    }

    fn guardianctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = std::process::Command::new(binary("guardianctl")?)
            .args(args)
            .arg("--server")
            .arg(format!("https://{}", self.server.grpc))
            .arg("--pki-dir")
            .arg(&self.scratch.pki.dir)
            .output()?;
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }

    fn audit_list(&self) -> anyhow::Result<String> {
        let out = std::process::Command::new(binary("guardianctl")?)
            .args(["audit", "list", "--limit", "10000", "--ledger-url"])
            .arg(self.scratch.sqlite_url())
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn server_log_tail(&self) -> String {
        let text = self.server.proc.log_text();
        let lines: Vec<&str> = text.lines().filter(|l| !l.contains("BatchAcked")).collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    async fn stop(mut self) -> TestResult {
        for agent in &mut self.agents {
            agent.terminate()?;
        }
        for node in &self.nodes {
            node.shutdown().await?;
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_lagging_node_in_cluster_a_gets_exactly_one_pod_deleted_there_and_nothing_in_b()
-> TestResult {
    let rig = Rig::start("").await?;
    // The status follows the node: synced, written by server-side apply.
    rig.wait_status_phase(0, "val-a", "synced").await?;
    rig.wait_status_phase(1, "val-b", "synced").await?;
    let apply = rig.clusters[0]
        .writes()
        .into_iter()
        .find(|r| r.path.ends_with("/taonodes/val-a/status"))
        .ok_or_else(|| anyhow::anyhow!("no status write"))?;
    assert_eq!(apply.method, "PATCH");
    assert_eq!(apply.content_type, "application/apply-patch+yaml");
    assert_eq!(
        apply.param("fieldManager").as_deref(),
        Some("taonode-guardian")
    );

    let pod_uid = rig.clusters[0]
        .get(PODS, "subtensor-val-a-0")
        .and_then(|p| p["metadata"]["uid"].as_str().map(str::to_owned))
        .ok_or_else(|| anyhow::anyhow!("no pod"))?;
    rig.nodes[0].lag(40);
    eventually(WAIT, "val-a's pod to be deleted", || async {
        rig.clusters[0]
            .get(PODS, "subtensor-val-a-0")
            .is_none()
            .then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}; server log:\n{}", rig.server_log_tail()))?;
    // Its StatefulSet makes a new pod; the restart healed the node.
    pod(&rig.clusters[0], "val-a");
    rig.nodes[0].heal();
    rig.wait_phase("val-a", "synced").await?;
    let followed = rig.wait_status_phase(0, "val-a", "synced").await?;
    assert!(
        followed <= Duration::from_secs(2),
        "status followed after {followed:?}"
    );

    let deleted = rig.deletions(0);
    assert_eq!(deleted.len(), 1, "exactly one deletion in a: {deleted:?}");
    assert_eq!(deleted[0].path, format!("{PODS}/subtensor-val-a-0"));
    let body = deleted[0].json().unwrap_or(Value::Null);
    assert_eq!(body["preconditions"]["uid"], pod_uid.as_str(), "{body}");
    assert!(
        rig.deletions(1).is_empty(),
        "nothing deleted in b: {:?}",
        rig.deletions(1)
    );
    assert!(
        rig.clusters[1]
            .writes()
            .iter()
            .all(|r| r.path.ends_with("/taonodes/val-b/status")),
        "b got only val-b's status: {:?}",
        rig.clusters[1].writes()
    );
    let events: Vec<Value> = rig.clusters[0]
        .writes()
        .iter()
        .filter(|r| is_write_of(r, "POST", "/namespaces/validators/events"))
        .filter_map(Recorded::json)
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["reason"], "PodDeleted");
    assert_eq!(events[0]["involvedObject"]["kind"], "TaoNode");
    assert_eq!(events[0]["involvedObject"]["name"], "val-a");
    let status = rig.status(0, "val-a");
    assert_eq!(
        status["lastRemediation"]["action"], "delete-pod",
        "{status}"
    );
    assert_eq!(
        status["lastRemediation"]["outcome"], "succeeded",
        "{status}"
    );

    // The deletion is audited before it is made (command, then outcome), and the chain holds.
    let audit = rig.audit_list()?;
    let command = audit
        .find("\"verb\":\"delete\"")
        .ok_or_else(|| anyhow::anyhow!("no audited deletion: {audit}"))?;
    let outcome = audit
        .find("\"outcome\":\"succeeded\"")
        .ok_or_else(|| anyhow::anyhow!("no audited outcome: {audit}"))?;
    assert!(command < outcome, "{audit}");
    let clusters = rig.guardianctl(&["clusters"])?;
    assert!(
        clusters
            .lines()
            .any(|l| l.starts_with("a ") && l.contains("yes")),
        "{clusters}"
    );
    rig.stop().await
}

#[tokio::test]
async fn a_dry_run_writes_nothing_to_any_cluster() -> TestResult {
    let rig = Rig::start("dry_run = true").await?;
    rig.nodes[0].lag(40);
    rig.wait_phase("val-a", "recovering").await?;
    // Time for a worker to (wrongly) act: several evaluations and polls.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (i, cluster) in rig.clusters.iter().enumerate() {
        assert!(
            cluster.writes().is_empty(),
            "cluster {i} got writes: {:?}",
            cluster.writes()
        );
    }
    assert!(rig.server.proc.log_text().contains("RemediationDryRun"));
    rig.stop().await
}

#[tokio::test]
async fn a_refused_deletion_is_alerted_with_the_permission_to_grant() -> TestResult {
    let clusters = [FakeKube::start("a").await?, FakeKube::start("b").await?];
    declare(&clusters[0], "val-a");
    declare(&clusters[1], "val-b");
    clusters[0].deny("delete", "", "pods");
    clusters[0].fail(Some("DELETE"), PODS, 403, u32::MAX);
    let rig = Rig::start_with(&["val-a", "val-b"], clusters, "", "", &[]).await?;
    let listed = eventually(
        Duration::from_secs(10),
        "guardianctl clusters to show the missing permission",
        || async {
            rig.guardianctl(&["clusters"])
                .ok()
                .filter(|t| t.contains("delete pods"))
        },
    )
    .await?;
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("b ") && l.contains(" -")),
        "{listed}"
    );
    rig.nodes[0].lag(40);
    let log = eventually(WAIT, "an alert naming the permission", || async {
        let log = rig.server.proc.log_text();
        log.lines()
            .any(|l| {
                l.contains("RemediationAlert")
                    && l.contains("grant the server's service account `delete pods`")
            })
            .then_some(log)
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}; server log:\n{}", rig.server_log_tail()))?;
    assert!(rig.clusters[0].get(PODS, "subtensor-val-a-0").is_some());
    assert!(!log.contains("panicked"));
    let metrics = guardian_tests::admin_metrics(rig.server.admin)?;
    assert_eq!(
        guardian_tests::metric_value(&metrics, "guardian_kube_missing_permissions{cluster=\"a\"}"),
        Some(1.0),
        "{metrics}"
    );
    rig.stop().await
}

#[tokio::test]
async fn cluster_b_unreachable_still_remediates_a_and_only_alerts_for_b() -> TestResult {
    let rig = Rig::start("").await?;
    rig.wait_status_phase(1, "val-b", "synced").await?;
    rig.clusters[1].down().await;
    eventually(
        Duration::from_secs(10),
        "b to be seen unreachable",
        || async {
            rig.guardianctl(&["clusters"])
                .ok()
                .filter(|t| t.lines().any(|l| l.starts_with("b ") && l.contains("NO")))
        },
    )
    .await?;
    rig.nodes[0].lag(40);
    rig.nodes[1].lag(40);
    eventually(WAIT, "val-a's pod to be deleted", || async {
        rig.clusters[0]
            .get(PODS, "subtensor-val-a-0")
            .is_none()
            .then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}; server log:\n{}", rig.server_log_tail()))?;
    eventually(WAIT, "an alert for val-b", || async {
        rig.server
            .proc
            .log_text()
            .lines()
            .any(|l| l.contains("RemediationAlert") && l.contains("cluster b is unreachable"))
            .then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}; server log:\n{}", rig.server_log_tail()))?;
    rig.clusters[1].up()?;
    assert!(rig.clusters[1].get(PODS, "subtensor-val-b-0").is_some());
    assert!(rig.deletions(1).is_empty());
    assert_eq!(rig.deletions(0).len(), 1);
    rig.stop().await
}

#[tokio::test]
async fn the_agents_kubernetes_node_tells_which_of_several_pods_to_delete() -> TestResult {
    let clusters = [FakeKube::start("a").await?, FakeKube::start("b").await?];
    declare(&clusters[0], "val-a");
    declare(&clusters[1], "val-b");
    // Two pods of val-a's StatefulSet on two Kubernetes nodes; its agent runs on worker-2.
    for (index, host) in [(0, "worker-1"), (1, "worker-2")] {
        clusters[0].put(
            PODS,
            json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": format!("subtensor-val-a-{index}"),
                    "labels": { "app": "subtensor-val-a" }
                },
                "spec": {
                    "nodeName": host,
                    "containers": [{ "name": "subtensor", "image": "subtensor" }]
                }
            }),
        );
    }
    let env = [
        ("NODE_NAME", "worker-2"),
        ("POD_NAME", "guardian-agent-x7k2p"),
        ("POD_NAMESPACE", "guardian"),
    ];
    let rig = Rig::start_with(&["val-a", "val-b"], clusters, "", "", &env).await?;
    let node = rig
        .node("val-a")
        .await
        .ok_or_else(|| anyhow::anyhow!("no node"))?;
    assert_eq!(node.kubernetes_node, "worker-2");
    assert_eq!(node.agent_pod, "guardian/guardian-agent-x7k2p");
    let status = rig.guardianctl(&["status", "-o", "json"])?;
    assert!(
        status.contains("\"kubernetes_node\": \"worker-2\""),
        "{status}"
    );
    rig.nodes[0].lag(40);
    eventually(WAIT, "the pod on worker-2 to be deleted", || async {
        rig.clusters[0]
            .get(PODS, "subtensor-val-a-1")
            .is_none()
            .then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}; server log:\n{}", rig.server_log_tail()))?;
    assert!(rig.clusters[0].get(PODS, "subtensor-val-a-0").is_some());
    assert_eq!(rig.deletions(0).len(), 1, "{:?}", rig.deletions(0));
    rig.stop().await
}

#[tokio::test]
async fn a_fleet_wide_stall_deletes_nothing_anywhere() -> TestResult {
    let clusters = [FakeKube::start("a").await?, FakeKube::start("b").await?];
    declare(&clusters[0], "val-a");
    declare(&clusters[1], "val-b");
    // Two nodes are this test's whole network: both lagging is the network, not the nodes.
    let rig = Rig::start_with(
        &["val-a", "val-b"],
        clusters,
        "",
        "fleet_min_nodes = 2",
        &[],
    )
    .await?;
    for node in &rig.nodes {
        node.lag(40);
    }
    eventually(WAIT, "a fleet_degraded finding", || async {
        let mut operator = rig.operator.clone();
        operator
            .list_findings(guardian_proto::v1::ListFindingsRequest {
                node_id: String::new(),
                include_cleared: false,
                limit: 100,
            })
            .await
            .ok()?
            .into_inner()
            .findings
            .into_iter()
            .find(|f| f.kind == "fleet_degraded")
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}; server log:\n{}", rig.server_log_tail()))?;
    rig.wait_evaluations(10).await?;
    for cluster in 0..2 {
        assert!(
            rig.deletions(cluster).is_empty(),
            "cluster {cluster}: {:?}",
            rig.deletions(cluster)
        );
    }
    rig.stop().await
}

/// A TaoNode with a memory ceiling, its StatefulSet (memory limit `limit`) and one pod.
fn declare_with_memory(kube: &FakeKube, node: &str, limit: &str, ceiling: &str) {
    let set = format!("subtensor-{node}");
    kube.put(
        TAONODES,
        json!({
            "apiVersion": "guardian.taonode.io/v1alpha1",
            "kind": "TaoNode",
            "metadata": { "name": node },
            "spec": {
                "nodeId": node,
                "workload": { "kind": "StatefulSet", "name": set, "container": "subtensor" },
                "memoryCeiling": ceiling,
                "oomRemediation": { "kills": 3, "windowMinutes": 60, "factor": 1.5 }
            }
        }),
    );
    kube.put(
        SETS,
        json!({
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": { "name": set },
            "spec": {
                "selector": { "matchLabels": { "app": set } },
                "template": {
                    "metadata": { "labels": { "app": set } },
                    "spec": { "containers": [{
                        "name": "subtensor",
                        "image": "subtensor",
                        "resources": { "limits": { "memory": limit } }
                    }] }
                }
            }
        }),
    );
    oom_killed(kube, node, 0);
}

/// The node's pod as its container was last OOM-killed `kills` times (none: running).
fn oom_killed(kube: &FakeKube, node: &str, kills: u32) {
    let set = format!("subtensor-{node}");
    let last = if kills == 0 {
        json!({})
    } else {
        json!({ "terminated": {
            "reason": "OOMKilled",
            "exitCode": 137,
            "finishedAt": format!("{}Z", guardian_server::utc(guardian_server::unix_ms() - 60_000 + i64::from(kills) * 1000).replacen(' ', "T", 1))
        } })
    };
    kube.put(
        PODS,
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": format!("{set}-0"), "labels": { "app": set } },
            "spec": { "containers": [{ "name": "subtensor", "image": "subtensor" }] },
            "status": { "containerStatuses": [{
                "name": "subtensor", "ready": true, "restartCount": kills, "image": "subtensor",
                "imageID": "", "lastState": last, "state": { "running": {} }
            }] }
        }),
    );
}

fn memory_patches(kube: &FakeKube, node: &str) -> Vec<Value> {
    kube.writes()
        .iter()
        .filter(|r| r.method == "PATCH" && r.path == format!("{SETS}/subtensor-{node}"))
        .filter_map(|r| {
            assert_eq!(r.content_type, "application/strategic-merge-patch+json");
            r.json()
        })
        .collect()
}

#[tokio::test]
async fn oom_kills_raise_the_memory_limit_once_per_window_and_never_above_the_ceiling() -> TestResult
{
    let kube = FakeKube::start("a").await?;
    declare_with_memory(&kube, "val-p", "4Gi", "64Gi");
    declare_with_memory(&kube, "val-o", "4Gi", "5Gi");
    declare_with_memory(&kube, "val-q", "8Gi", "8Gi");
    let scratch = Scratch::new(&["val-p"])?;
    let server = Server::start(
        &scratch.server_config(
            &scratch.sqlite_url(),
            &format!(
                "[kubernetes]\noom_check_interval_ms = 200\nrequest_timeout_ms = 1000\n\
                 [kubernetes.clusters.a]\nkubeconfig = \"{}\"\n",
                kube.kubeconfig().display()
            ),
        )?,
        scratch.path("server.log"),
    )?;
    let log_tail = || {
        let text = server.proc.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    };
    // Two kills: not yet.
    for kills in 1..=2 {
        for node in ["val-p", "val-o", "val-q"] {
            oom_killed(&kube, node, kills);
        }
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    assert!(
        memory_patches(&kube, "val-p").is_empty(),
        "{:?}",
        kube.writes()
    );
    // The third kill within the window: one raise by 1.5, capped at the ceiling.
    for node in ["val-p", "val-o", "val-q"] {
        oom_killed(&kube, node, 3);
    }
    eventually(Duration::from_secs(10), "both raises", || async {
        (memory_patches(&kube, "val-p").len() == 1 && memory_patches(&kube, "val-o").len() == 1)
            .then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}; writes {:?}\nlog:\n{}", kube.writes(), log_tail()))?;
    let limit = |patch: &Value| {
        patch["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"].clone()
    };
    assert_eq!(limit(&memory_patches(&kube, "val-p")[0]), "6144Mi");
    assert_eq!(
        limit(&memory_patches(&kube, "val-o")[0]),
        "5120Mi",
        "capped at the 5Gi ceiling"
    );
    assert!(memory_patches(&kube, "val-p")[0]["metadata"]["resourceVersion"].is_string());
    // At its ceiling already: alerted, an Event, no patch.
    eventually(Duration::from_secs(10), "the ceiling alert", || async {
        server
            .proc
            .log_text()
            .lines()
            .any(|l| {
                l.contains("RemediationAlert")
                    && l.contains("val-q")
                    && l.contains("memoryCeiling 8Gi")
            })
            .then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}; log:\n{}", log_tail()))?;
    assert!(memory_patches(&kube, "val-q").is_empty());
    // Each Event is posted after its outcome is audited, a moment after the patch or alert.
    let reasons = || -> Vec<String> {
        kube.writes()
            .iter()
            .filter(|r| r.path.ends_with("/events"))
            .filter_map(|r| r.json())
            .map(|e| {
                format!(
                    "{}:{}",
                    e["involvedObject"]["name"].as_str().unwrap_or(""),
                    e["reason"].as_str().unwrap_or("")
                )
            })
            .collect()
    };
    let wanted = [
        "val-p:MemoryLimitRaised",
        "val-o:MemoryLimitRaised",
        "val-q:MemoryLimitNotRaised",
    ];
    eventually(Duration::from_secs(10), "the three Events", || async {
        let reasons = reasons();
        wanted
            .iter()
            .all(|want| reasons.iter().any(|r| r == want))
            .then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}; Events {:?}", reasons()))?;
    // A fourth kill in the same window: no second raise.
    oom_killed(&kube, "val-p", 4);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(memory_patches(&kube, "val-p").len(), 1);
    // Audited before and after.
    let audit = std::process::Command::new(binary("guardianctl")?)
        .args(["audit", "list", "--limit", "1000", "--ledger-url"])
        .arg(scratch.sqlite_url())
        .output()?;
    let audit = String::from_utf8_lossy(&audit.stdout);
    assert!(audit.contains("\"to\":\"6144Mi\""), "{audit}");
    assert_eq!(
        audit.matches("\"outcome\":\"succeeded\"").count(),
        2,
        "{audit}"
    );
    Ok(())
}

const CLAIMS: &str = "/api/v1/namespaces/validators/persistentvolumeclaims";
const CLASSES: &str = "/apis/storage.k8s.io/v1/storageclasses";

/// A TaoNode whose chain data lives on claim `chain-NODE` of StorageClass `class`.
fn declare_with_volume(kube: &FakeKube, node: &str, class: &str, resizing: bool) {
    kube.put(
        TAONODES,
        json!({
            "apiVersion": "guardian.taonode.io/v1alpha1",
            "kind": "TaoNode",
            "metadata": { "name": node },
            "spec": {
                "nodeId": node,
                "workload": { "kind": "StatefulSet", "name": format!("subtensor-{node}"), "container": "subtensor" },
                "chainVolume": { "claimName": format!("chain-{node}"), "maximum": "200Gi", "factor": 1.5 }
            }
        }),
    );
    let conditions = if resizing {
        json!([{ "type": "FileSystemResizePending", "status": "True" }])
    } else {
        json!([])
    };
    kube.put(
        CLAIMS,
        json!({
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": { "name": format!("chain-{node}") },
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": class,
                "resources": { "requests": { "storage": "100Gi" } }
            },
            "status": { "phase": "Bound", "capacity": { "storage": "100Gi" }, "conditions": conditions }
        }),
    );
}

/// Streams `node`'s chain data filling at 1 GiB a minute over the last ten minutes (as a
/// spool replay would deliver it): the forecast says full in about 1.5 hours.
async fn stream_filling_disk(scratch: &Scratch, server: &Server, node: &str) -> anyhow::Result<()> {
    use guardian_proto::v1::{
        AgentFrame, Filesystem, HostSample, Sample, SampleBatch, agent_frame, sample,
    };
    let (cert, key) = scratch.pki.node(node);
    let channel = scratch.channel(server.grpc, &cert, &key).await?;
    let (tx, mut replies) =
        guardian_tests::raw_uplink(channel, vec![guardian_tests::hello_frame(node, "local")])
            .await
            .map_err(|s| anyhow::anyhow!("{node} refused: {s:?}"))?;
    let now = guardian_server::unix_ms();
    for seq in 1..=10u64 {
        let minutes_ago = 10 - i64::try_from(seq)?;
        let available = (100u64 - (seq - 1)) << 30;
        let frame = AgentFrame {
            frame: Some(agent_frame::Frame::Batch(SampleBatch {
                seq,
                samples: vec![Sample {
                    observed_at_unix_ms: now - minutes_ago * 60_000 - 1000,
                    kind: Some(sample::Kind::Host(HostSample {
                        cpu_busy_percent: 5.0,
                        chain_data: Some(Filesystem {
                            path: "/var/lib/subtensor".into(),
                            total_bytes: 1000 << 30,
                            available_bytes: available,
                            used_percent: 100.0
                                - (available as f64 / (1000u64 << 30) as f64) * 100.0,
                            ..Filesystem::default()
                        }),
                        ..HostSample::default()
                    })),
                }],
                spool_dropped_batches_total: 0,
            })),
        };
        tx.send(guardian_tests::encode(&frame)).await?;
        guardian_tests::wait_for_ack(&mut replies, seq).await?;
    }
    // Keep the stream open a moment so the last evaluation runs while the node is live.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(())
}

fn claim_patches(kube: &FakeKube, node: &str) -> Vec<Value> {
    kube.writes()
        .iter()
        .filter(|r| r.method == "PATCH" && r.path == format!("{CLAIMS}/chain-{node}"))
        .filter_map(Recorded::json)
        .collect()
}

#[tokio::test]
async fn a_filling_chain_volume_grows_once_never_while_resizing_and_only_where_expansion_is_allowed()
-> TestResult {
    let kube = FakeKube::start("a").await?;
    kube.put(CLASSES, json!({ "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": { "name": "fast" }, "provisioner": "csi.example.com", "allowVolumeExpansion": true }));
    kube.put(CLASSES, json!({ "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": { "name": "fixed" }, "provisioner": "csi.example.com", "allowVolumeExpansion": false }));
    declare_with_volume(&kube, "val-s", "fast", false);
    declare_with_volume(&kube, "val-t", "fast", true);
    declare_with_volume(&kube, "val-u", "fixed", false);
    let scratch = Scratch::new(&["val-s", "val-t", "val-u"])?;
    let server = Server::start(
        &scratch.server_config(
            &scratch.sqlite_url(),
            &format!(
                "[reconcile]\nevaluate_interval_ms = 200\n\
                 [kubernetes]\nrequest_timeout_ms = 1000\n\
                 [kubernetes.clusters.a]\nkubeconfig = \"{}\"\n",
                kube.kubeconfig().display()
            ),
        )?,
        scratch.path("server.log"),
    )?;
    let log_tail = || {
        let text = server.proc.log_text();
        let lines: Vec<&str> = text.lines().filter(|l| !l.contains("BatchAcked")).collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    };
    // The TaoNodes must be indexed before the forecast arrives.
    eventually(Duration::from_secs(10), "the TaoNodes listed", || async {
        let metrics = guardian_tests::admin_metrics(server.admin).ok()?;
        (guardian_tests::metric_value(&metrics, "guardian_kube_taonodes{cluster=\"a\"}")? >= 3.0)
            .then_some(())
    })
    .await?;
    for node in ["val-s", "val-t", "val-u"] {
        stream_filling_disk(&scratch, &server, node).await?;
    }
    eventually(Duration::from_secs(15), "val-s's claim to grow", || async {
        (claim_patches(&kube, "val-s").len() == 1).then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}; writes {:?}\nlog:\n{}", kube.writes(), log_tail()))?;
    let patch = &claim_patches(&kube, "val-s")[0];
    assert_eq!(
        patch["spec"]["resources"]["requests"]["storage"], "153600Mi",
        "{patch}"
    );
    assert!(patch["metadata"]["resourceVersion"].is_string(), "{patch}");
    for (node, why) in [
        ("val-t", "still being resized"),
        ("val-u", "does not allow volume expansion"),
    ] {
        eventually(
            Duration::from_secs(10),
            &format!("{node}'s alert"),
            || async {
                server
                    .proc
                    .log_text()
                    .lines()
                    .any(|l| l.contains("RemediationAlert") && l.contains(node) && l.contains(why))
                    .then_some(())
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}; log:\n{}", log_tail()))?;
        assert!(
            claim_patches(&kube, node).is_empty(),
            "{node}: {:?}",
            claim_patches(&kube, node)
        );
    }
    // More filling forecasts within the cooldown: no second grow.
    stream_filling_disk(&scratch, &server, "val-s").await.ok();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(claim_patches(&kube, "val-s").len(), 1);
    let events: Vec<String> = kube
        .writes()
        .iter()
        .filter(|r| r.path.ends_with("/events"))
        .filter_map(Recorded::json)
        .map(|e| {
            format!(
                "{}:{}",
                e["involvedObject"]["name"].as_str().unwrap_or(""),
                e["reason"].as_str().unwrap_or("")
            )
        })
        .collect();
    for want in [
        "val-s:VolumeExpanded",
        "val-t:VolumeNotExpanded",
        "val-u:VolumeNotExpanded",
    ] {
        assert!(
            events.iter().any(|e| e == want),
            "{want} missing: {events:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn cordon_and_alert_marks_the_pods_kubernetes_node_unschedulable_once() -> TestResult {
    let clusters = [FakeKube::start("a").await?, FakeKube::start("b").await?];
    declare(&clusters[0], "val-a");
    declare(&clusters[1], "val-b");
    clusters[0].put(
        PODS,
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": "subtensor-val-a-0", "labels": { "app": "subtensor-val-a" } },
            "spec": { "nodeName": "worker-7", "containers": [{ "name": "subtensor", "image": "subtensor" }] }
        }),
    );
    clusters[0].put(
        "/api/v1/nodes",
        json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": "worker-7" }, "spec": {} }),
    );
    let rig = Rig::start_with(
        &["val-a", "val-b"],
        clusters,
        "[reconcile.nodes.val-a]\nrecovery_strategy = \"cordon-and-alert\"",
        "",
        &[],
    )
    .await?;
    rig.nodes[0].lag(40);
    rig.wait_phase("val-a", "cordoned").await?;
    eventually(
        Duration::from_secs(10),
        "worker-7 to be unschedulable",
        || async {
            (rig.clusters[0].get("/api/v1/nodes", "worker-7")?["spec"]["unschedulable"] == true)
                .then_some(())
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}; log:\n{}", rig.server_log_tail()))?;
    rig.wait_evaluations(5).await?;
    let node_patches: Vec<Recorded> = rig.clusters[0]
        .writes()
        .into_iter()
        .filter(|r| r.path == "/api/v1/nodes/worker-7")
        .collect();
    assert_eq!(node_patches.len(), 1, "{node_patches:?}");
    assert!(
        rig.deletions(0).is_empty(),
        "cordon-and-alert deletes nothing"
    );
    assert!(
        rig.clusters[1]
            .writes()
            .iter()
            .all(|r| r.path.contains("/taonodes/"))
    );
    rig.stop().await
}

const JOBS: &str = "/apis/batch/v1/namespaces/validators/jobs";

/// val-a restores by snapshot: a TaoNode with `snapshotRestore` and a 1-replica StatefulSet.
fn declare_restorable(kube: &FakeKube) {
    declare(kube, "val-a");
    let mut taonode = kube.get(TAONODES, "val-a").unwrap_or_default();
    taonode["spec"]["snapshotRestore"] = json!({
        "job": { "template": { "spec": {
            "restartPolicy": "Never",
            "containers": [{ "name": "restore", "image": "restore:1", "args": ["--from", "latest"] }]
        } } },
        "timeoutMinutes": 5
    });
    kube.put(TAONODES, taonode);
    let mut set = kube.get(SETS, "subtensor-val-a").unwrap_or_default();
    set["spec"]["replicas"] = json!(1);
    kube.put(SETS, set);
}

/// What the StatefulSet controller and the Job controller would do: pods follow the replicas;
/// a restore Job completes when `complete_jobs`.
fn controllers(kube: &FakeKube, complete_jobs: bool) {
    let replicas = kube
        .get(SETS, "subtensor-val-a")
        .and_then(|s| s["spec"]["replicas"].as_i64())
        .unwrap_or(1);
    let pod_there = kube.get(PODS, "subtensor-val-a-0").is_some();
    if replicas == 0 && pod_there {
        kube.remove(PODS, "subtensor-val-a-0");
    }
    if replicas > 0 && !pod_there {
        pod(kube, "val-a");
    }
    if complete_jobs {
        for mut job in kube.list(JOBS) {
            if job["status"]["conditions"].is_null() {
                job["status"] = json!({ "succeeded": 1, "conditions": [{ "type": "Complete", "status": "True" }] });
                kube.put(JOBS, job);
            }
        }
    }
}

fn replica_patches(kube: &FakeKube) -> Vec<i64> {
    kube.writes()
        .iter()
        .filter(|r| r.method == "PATCH" && r.path == format!("{SETS}/subtensor-val-a"))
        .filter_map(|r| r.json()?["spec"]["replicas"].as_i64())
        .collect()
}

async fn drive_until(
    rig: &Rig,
    complete_jobs: bool,
    what: &str,
    done: impl Fn(&Rig) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    while !done(rig) {
        controllers(&rig.clusters[0], complete_jobs);
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out waiting for {what}; writes {:?}\nlog:\n{}",
            rig.clusters[0].writes(),
            rig.server_log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test]
async fn snapshot_restore_scales_to_zero_runs_the_job_and_scales_back() -> TestResult {
    let clusters = [FakeKube::start("a").await?, FakeKube::start("b").await?];
    declare_restorable(&clusters[0]);
    declare(&clusters[1], "val-b");
    let rig = Rig::start_with(
        &["val-a", "val-b"],
        clusters,
        "[reconcile.nodes.val-a]\nrecovery_strategy = \"snapshot-restore\"",
        "",
        &[],
    )
    .await?;
    rig.nodes[0].lag(40);
    // The RestoreCompleted Event is posted after the status says done.
    drive_until(&rig, true, "the restore to finish", |rig| {
        rig.status(0, "val-a")["restore"]["step"] == "done"
            && rig.clusters[0]
                .writes()
                .iter()
                .filter(|r| r.path.ends_with("/events"))
                .filter_map(Recorded::json)
                .any(|e| e["reason"] == "RestoreCompleted")
    })
    .await?;
    rig.nodes[0].heal();
    assert_eq!(
        replica_patches(&rig.clusters[0]),
        [0, 1],
        "scaled to 0, then back to 1"
    );
    let jobs = rig.clusters[0].list(JOBS);
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(
        jobs[0]["spec"]["template"]["spec"]["containers"][0]["image"],
        "restore:1"
    );
    // Order of the writes: scale down, then the Job, then scale up.
    let order: Vec<String> = rig.clusters[0]
        .writes()
        .iter()
        .filter(|r| r.path.contains("/statefulsets/") || r.path.ends_with("/jobs"))
        .map(|r| format!("{} {}", r.method, r.path.rsplit('/').next().unwrap_or("")))
        .collect();
    assert_eq!(
        order,
        [
            "PATCH subtensor-val-a",
            "POST jobs",
            "PATCH subtensor-val-a"
        ]
    );
    assert!(
        rig.deletions(0).is_empty(),
        "a restore deletes no pod itself"
    );
    let events: Vec<Value> = rig.clusters[0]
        .writes()
        .iter()
        .filter(|r| r.path.ends_with("/events"))
        .filter_map(Recorded::json)
        .collect();
    assert!(
        events.iter().any(|e| e["reason"] == "RestoreCompleted"),
        "{events:?}"
    );
    let audit = rig.audit_list()?;
    assert!(audit.contains("\"resource\":\"jobs\""), "{audit}");
    assert_eq!(
        audit.matches("\"replicas\":{").count(),
        4,
        "two scales, each audited before and after: {audit}"
    );
    rig.stop().await
}

#[tokio::test]
async fn a_snapshot_restore_resumes_after_the_server_is_killed() -> TestResult {
    let clusters = [FakeKube::start("a").await?, FakeKube::start("b").await?];
    declare_restorable(&clusters[0]);
    declare(&clusters[1], "val-b");
    let mut rig = Rig::start_with(
        &["val-a", "val-b"],
        clusters,
        "[reconcile.nodes.val-a]\nrecovery_strategy = \"snapshot-restore\"",
        "",
        &[],
    )
    .await?;
    rig.nodes[0].lag(40);
    // Up to the Job, which the Job controller does not finish yet.
    drive_until(&rig, false, "the restore Job", |rig| {
        !rig.clusters[0].list(JOBS).is_empty()
            && rig.status(0, "val-a")["restore"]["step"] == "restoring"
    })
    .await?;
    rig.server.proc.child.kill()?;
    rig.server.proc.child.wait()?;
    rig.server = Server::start(&rig.config, rig.scratch.path("server-2.log"))?;
    // The new server reads status.restore and goes on: waits for the Job, scales back.
    drive_until(&rig, true, "the resumed restore to finish", |rig| {
        rig.status(0, "val-a")["restore"]["step"] == "done"
    })
    .await?;
    assert_eq!(replica_patches(&rig.clusters[0]), [0, 1]);
    assert_eq!(rig.clusters[0].list(JOBS).len(), 1, "no second Job");
    assert!(
        rig.server
            .proc
            .log_text()
            .contains("SnapshotRestoreResumed")
    );
    rig.stop().await
}

#[tokio::test]
async fn taonodes_are_watched_and_a_dropped_watch_is_resumed() -> TestResult {
    let kube = FakeKube::start("a").await?;
    declare(&kube, "val-a");
    let scratch = Scratch::new(&["val-a"])?;
    let server = Server::start(
        &scratch.server_config(
            &scratch.sqlite_url(),
            &format!(
                "[kubernetes]\nrequest_timeout_ms = 1000\n[kubernetes.clusters.a]\nkubeconfig = \"{}\"\n",
                kube.kubeconfig().display()
            ),
        )?,
        scratch.path("server.log"),
    )?;
    let taonodes = || {
        guardian_tests::admin_metrics(server.admin)
            .ok()
            .and_then(|m| guardian_tests::metric_value(&m, "guardian_kube_taonodes{cluster=\"a\"}"))
    };
    eventually(Duration::from_secs(10), "the first TaoNode", || async {
        (taonodes()? == 1.0).then_some(())
    })
    .await?;
    // Added while the watch is open: seen from the watch event, without a new list.
    let lists_before = kube
        .requests()
        .iter()
        .filter(|r| {
            r.method == "GET" && r.path.ends_with("/taonodes") && r.param("watch").is_none()
        })
        .count();
    declare(&kube, "val-c");
    let seen = Instant::now();
    eventually(Duration::from_secs(5), "the second TaoNode", || async {
        (taonodes()? == 2.0).then_some(())
    })
    .await?;
    assert!(
        seen.elapsed() < Duration::from_secs(2),
        "seen after {:?}",
        seen.elapsed()
    );
    let lists_after = kube
        .requests()
        .iter()
        .filter(|r| {
            r.method == "GET" && r.path.ends_with("/taonodes") && r.param("watch").is_none()
        })
        .count();
    assert_eq!(lists_before, lists_after, "no re-list for a watch event");
    // The API server goes away (the watch drops); a TaoNode is removed meanwhile.
    kube.down().await;
    kube.remove(TAONODES, "val-c");
    tokio::time::sleep(Duration::from_secs(1)).await;
    kube.up()?;
    eventually(
        Duration::from_secs(20),
        "the watch to resume and see the removal",
        || async { (taonodes()? == 1.0).then_some(()) },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}; log:\n{}", server.proc.log_text()))?;
    Ok(())
}
