//! One active server among several on one PostgreSQL ledger (`standby = true`): the standby
//! neither listens nor acts while the leader holds the ledger's advisory lock; it takes over
//! within seconds when the leader is killed with -9, and acts (one pod deleted through
//! Kubernetes, its audit entry naming the new leader's term); a leader whose lock is taken
//! from it (its PostgreSQL session terminated) stops acting and shuts down. Every write the
//! fake Kubernetes API server receives is counted.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use guardian_proto::v1::GetNodeRequest;
use guardian_tests::fake_kube::FakeKube;
use guardian_tests::fake_node::{FakeNode, FakeNodeConfig};
use guardian_tests::{Postgres, Proc, Scratch, binary, eventually, start_agent};
use serde_json::json;

type TestResult = anyhow::Result<()>;

const WAIT: Duration = Duration::from_secs(40);
const TAONODES: &str = "/apis/guardian.taonode.io/v1alpha1/namespaces/validators/taonodes";
const PODS: &str = "/api/v1/namespaces/validators/pods";
const SETS: &str = "/apis/apps/v1/namespaces/validators/statefulsets";

fn declare(kube: &FakeKube) {
    kube.put(
        TAONODES,
        json!({
            "apiVersion": "guardian.taonode.io/v1alpha1", "kind": "TaoNode",
            "metadata": { "name": "val-a" },
            "spec": { "nodeId": "val-a", "workload": { "kind": "StatefulSet", "name": "subtensor-a", "container": "subtensor" } }
        }),
    );
    kube.put(
        SETS,
        json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": { "name": "subtensor-a" },
            "spec": { "selector": { "matchLabels": { "app": "subtensor-a" } } }
        }),
    );
    kube.put(
        PODS,
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": "subtensor-a-0", "labels": { "app": "subtensor-a" } },
            "spec": { "containers": [{ "name": "subtensor", "image": "subtensor" }] }
        }),
    );
}

/// A server process whose "listening" line is awaited in the background.
struct Replica {
    proc: Proc,
    listening: std::sync::mpsc::Receiver<String>,
}

impl Replica {
    fn start(config: &Path, log: std::path::PathBuf) -> anyhow::Result<Self> {
        let mut child = Command::new(binary("guardian-server")?)
            .arg("--config")
            .arg(config)
            .env("GUARDIAN_LOG", "info,guardian_server=debug")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let (tx, listening) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            if BufReader::new(stdout).read_line(&mut line).is_ok() && !line.is_empty() {
                let _ = tx.send(line);
            }
        });
        Ok(Self {
            proc: Proc { child, log },
            listening,
        })
    }

    /// Its gRPC address once it listens (within `wait`), or `None`.
    fn listening_within(&self, wait: Duration) -> Option<SocketAddr> {
        let line = self.listening.recv_timeout(wait).ok()?;
        line.split_whitespace()
            .find_map(|w| w.strip_prefix("grpc="))
            .and_then(|a| a.parse().ok())
    }
}

struct Rig {
    scratch: Scratch,
    _postgres: Postgres,
    kube: FakeKube,
    node: FakeNode,
    agent: Proc,
    first: Replica,
    second: Replica,
    grpc: SocketAddr,
}

impl Rig {
    async fn start() -> anyhow::Result<Rig> {
        let postgres = Postgres::start()?;
        let kube = FakeKube::start("a").await?;
        declare(&kube);
        let scratch = Scratch::new(&["val-a"])?;
        let port = guardian_tests::stable_port()?;
        let extra = format!(
            "standby = true\n[detect]\nfrozen_head_ms = 2500\n[reconcile]\nevaluate_interval_ms = 200\n\
             [reconcile.policy]\nmax_block_lag = 5\nprobe_interval_seconds = 2\nconfirm_samples = 2\nrecover_samples = 2\n\
             [kubernetes]\nrequest_timeout_ms = 1000\n\
             [kubernetes.clusters.a]\nkubeconfig = \"{}\"\n",
            kube.kubeconfig().display()
        );
        let config = scratch.server_config(&postgres.url(), &extra)?;
        let text = std::fs::read_to_string(&config)?.replacen(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{port}\""),
            1,
        );
        std::fs::write(&config, text)?;
        let first = Replica::start(&config, scratch.path("server-1.log"))?;
        let grpc = first
            .listening_within(Duration::from_secs(20))
            .ok_or_else(|| {
                anyhow::anyhow!("the first server did not listen: {}", first.proc.log_text())
            })?;
        let second = Replica::start(&config, scratch.path("server-2.log"))?;
        let node = FakeNode::start(FakeNodeConfig::default()).await?;
        let agent = start_agent(
            &scratch.agent_config_with(
                "val-a",
                grpc,
                400,
                &format!(
                    "[chain]\nendpoint = \"{}\"\ncall_timeout_ms = 300\n",
                    node.ws_url()
                ),
            )?,
            scratch.path("agent.log"),
        )?;
        let rig = Rig {
            scratch,
            _postgres: postgres,
            kube,
            node,
            agent,
            first,
            second,
            grpc,
        };
        rig.wait_phase("synced").await?;
        Ok(rig)
    }

    async fn wait_phase(&self, phase: &str) -> anyhow::Result<()> {
        eventually(WAIT, &format!("val-a to be {phase}"), || async {
            let mut operator = self.scratch.operator(self.grpc).await.ok()?;
            let node = operator
                .get_node(GetNodeRequest {
                    node_id: "val-a".into(),
                })
                .await
                .ok()?
                .into_inner();
            (node.phase == phase).then_some(())
        })
        .await
    }

    fn deletions(&self) -> usize {
        self.kube
            .writes()
            .iter()
            .filter(|r| r.method == "DELETE")
            .count()
    }
}

#[tokio::test]
async fn the_standby_takes_over_from_a_leader_killed_with_9_and_only_it_acts() -> TestResult {
    let mut rig = Rig::start().await?;
    // The standby waits: no listener, no action.
    assert!(
        rig.second
            .listening_within(Duration::from_secs(2))
            .is_none()
    );
    assert!(
        rig.second.proc.log_text().contains("Standby"),
        "{}",
        rig.second.proc.log_text()
    );

    rig.first.proc.child.kill()?;
    rig.first.proc.child.wait()?;
    let killed = Instant::now();
    let grpc = rig
        .second
        .listening_within(Duration::from_secs(20))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "the standby did not take over: {}",
                rig.second.proc.log_text()
            )
        })?;
    let took_over = killed.elapsed();
    assert_eq!(grpc, rig.grpc, "the standby listens on the same address");
    assert!(
        took_over <= Duration::from_secs(5),
        "took over after {took_over:?}"
    );
    println!(
        "standby took over {:.2} s after the leader was killed",
        took_over.as_secs_f64()
    );

    // The agent reconnects to the new leader, which acts once.
    rig.wait_phase("synced").await?;
    rig.node.lag(40);
    eventually(WAIT, "the pod to be deleted", || async {
        rig.kube.get(PODS, "subtensor-a-0").is_none().then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}; log:\n{}", rig.second.proc.log_text()))?;
    assert_eq!(rig.deletions(), 1);
    let pid = rig.second.proc.child.id();
    let audit = Command::new(binary("guardianctl")?)
        .args(["audit", "list", "--limit", "1000", "--ledger-url"])
        .arg(rig._postgres.url())
        .output()?;
    let audit = String::from_utf8_lossy(&audit.stdout);
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"verb\":\"delete\"") && l.contains(&format!("/{pid}\""))),
        "the deletion's audit entry names the new leader (pid {pid}): {audit}"
    );
    rig.agent.terminate()?;
    rig.node.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn a_leader_that_loses_its_lock_stops_acting_and_the_standby_takes_over() -> TestResult {
    let mut rig = Rig::start().await?;
    // Take the lock from the leader: end its PostgreSQL session as a failover tool would.
    let pool = sqlx::PgPool::connect(&rig._postgres.url()).await?;
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted",
    )
    .execute(&pool)
    .await?;
    // The leader notices within its 1 s check, stops and exits non-zero; the standby takes over.
    let deadline = Instant::now() + Duration::from_secs(15);
    let exited = loop {
        if let Some(status) = rig.first.proc.child.try_wait()? {
            break status;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the deposed leader did not exit: {}",
            rig.first.proc.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!exited.success());
    assert!(
        rig.first.proc.log_text().contains("LedgerLockLost"),
        "{}",
        rig.first.proc.log_text()
    );
    rig.second
        .listening_within(Duration::from_secs(20))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "the standby did not take over: {}",
                rig.second.proc.log_text()
            )
        })?;
    rig.wait_phase("synced").await?;
    rig.node.lag(40);
    eventually(WAIT, "the pod to be deleted", || async {
        rig.kube.get(PODS, "subtensor-a-0").is_none().then_some(())
    })
    .await?;
    // Time for anyone else to (wrongly) act too.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(rig.deletions(), 1, "{:?}", rig.kube.writes());
    rig.agent.terminate()?;
    rig.node.shutdown().await?;
    Ok(())
}
