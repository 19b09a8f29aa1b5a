//! Detect, decide, remediate, end to end with real processes: fake subtensor nodes, agents
//! sampling them, the server's detectors and reconciler, signed commands run by the agent
//! through a stand-in container runtime (a script that "restarts" the node by healing the
//! fake node over its admin RPC), findings and phases read through the Fleet API and
//! guardianctl, and the audit chain verified at the end.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use guardian_proto::v1::fleet_client::FleetClient;
use guardian_proto::v1::{GetNodeRequest, ListFindingsRequest, Node};
use guardian_tests::fake_node::{FakeNode, FakeNodeConfig};
use guardian_tests::{Proc, Scratch, Server, binary, eventually, start_agent};
use tonic::transport::Channel;

type TestResult = anyhow::Result<()>;

/// Agent sampling interval.
const INTERVAL_MS: u64 = 400;
const WAIT: Duration = Duration::from_secs(40);

/// What the stand-in container runtime does when asked to restart the node.
#[derive(Clone, Copy, PartialEq)]
enum Restart {
    /// Heals the fake node (the restart fixes it).
    Heals,
    /// Does nothing useful (the restart does not help).
    DoesNotHelp,
}

/// What a rig's server and agents are configured with, beyond the defaults of [`Rig::start`].
#[derive(Default)]
struct Setup<'a> {
    /// Lines of `[reconcile.policy]`.
    policy: &'a str,
    /// Lines of `[reconcile]`.
    reconcile: &'a str,
    /// Lines of `[detect]`.
    detect: &'a str,
    /// Further server tables.
    more: &'a str,
    /// Top-level agent keys.
    agent: &'a str,
    /// Nodes whose fake subtensor node starts at another best block (default 4 000 000).
    initial_best: &'a [(&'a str, u64)],
}

struct Rig {
    scratch: Scratch,
    server: Server,
    nodes: Vec<FakeNode>,
    agents: Vec<Proc>,
    operator: FleetClient<Channel>,
}

impl Rig {
    /// One fake node and agent per name (network "local"), a server with the policy
    /// `reconcile` (TOML lines of `[reconcile.policy]`) and `more` (further server TOML).
    async fn start(names: &[&str], restart: Restart, setup: Setup<'_>) -> anyhow::Result<Rig> {
        let Setup {
            policy,
            reconcile,
            detect,
            more,
            agent: agent_more,
            initial_best,
        } = setup;
        let scratch = Scratch::new(names)?;
        let server_extra = format!(
            "command_signing_key_file = \"{}\"\n[detect]\nfrozen_head_ms = 2500\n{detect}\n\
             [reconcile]\nevaluate_interval_ms = 200\n{reconcile}\n[reconcile.policy]\nmax_block_lag = 5\n\
             recovery_strategy = \"restart\"\nrestart_container = \"subtensor\"\n\
             probe_interval_seconds = 2\nconfirm_samples = 2\nrecover_samples = 2\n{policy}\n{more}\n",
            scratch.pki.command_signing_key().display()
        );
        let server = Server::start(
            &scratch.server_config(&scratch.sqlite_url(), &server_extra)?,
            scratch.path("server.log"),
        )?;
        let mut nodes = Vec::new();
        let mut agents = Vec::new();
        for name in names {
            let mut config = FakeNodeConfig::default();
            if let Some((_, best)) = initial_best.iter().find(|(n, _)| n == name) {
                config.initial_best = *best;
            }
            let node = FakeNode::start(config).await?;
            let runs = scratch.path(&format!("restarts-{name}"));
            let runtime = scratch.path(&format!("runtime-{name}.sh"));
            let heal = match restart {
                Restart::Heals => format!(
                    "curl -s -m 5 -H 'Content-Type: application/json' \
                     -d '{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"fake_heal\",\"params\":[]}}' {} > /dev/null\n",
                    node.http_url()
                ),
                Restart::DoesNotHelp => String::new(),
            };
            std::fs::write(
                &runtime,
                format!(
                    "#!/bin/sh\necho \"$@\" >> '{}'\n{heal}echo \"$1 $2: done\"\n",
                    runs.display()
                ),
            )?;
            std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o755))?;
            let agent_extra = format!(
                "{agent_more}[commands]\nenabled = true\nverify_key_file = \"{}\"\n\
                 container_runtime = \"{}\"\nallowed_containers = [\"subtensor\"]\n\
                 [chain]\nendpoint = \"{}\"\ncall_timeout_ms = 300\n",
                scratch.pki.command_verify_key().display(),
                runtime.display(),
                node.ws_url()
            );
            agents.push(start_agent(
                &scratch.agent_config_with(name, server.grpc, INTERVAL_MS, &agent_extra)?,
                scratch.path(&format!("agent-{name}.log")),
            )?);
            nodes.push(node);
        }
        let operator = scratch.operator(server.grpc).await?;
        let rig = Rig {
            scratch,
            server,
            nodes,
            agents,
            operator,
        };
        for name in names {
            rig.wait_phase(name, "synced").await?;
        }
        Ok(rig)
    }

    /// Waits until the reconciler has evaluated `per_node` more times per node of the rig
    /// (`guardian_reconcile_evaluations_total`), so "it did not act" is checked after the
    /// reconciler had that many chances to act, however slow the machine, not after a sleep.
    async fn wait_evaluations(&self, per_node: u64) -> anyhow::Result<()> {
        let start = evaluations(&reqwest_metrics(self).await?).ok_or_else(|| {
            anyhow::anyhow!("no guardian_reconcile_evaluations_total on /metrics")
        })?;
        let more = per_node * self.nodes.len() as u64;
        eventually(WAIT, &format!("{more} more evaluations"), || async {
            let now = evaluations(&reqwest_metrics(self).await.ok()?)?;
            (now >= start + more).then_some(())
        })
        .await
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

    /// The restarts the stand-in runtime ran for `name`.
    fn restarts(&self, name: &str) -> usize {
        std::fs::read_to_string(self.restarts_file(name))
            .map(|t| t.lines().count())
            .unwrap_or(0)
    }

    fn restarts_file(&self, name: &str) -> PathBuf {
        self.scratch.path(&format!("restarts-{name}"))
    }

    async fn wait_restarts(&self, name: &str, count: usize) -> anyhow::Result<Duration> {
        let started = Instant::now();
        eventually(WAIT, &format!("{count} restart(s) of {name}"), || async {
            (self.restarts(name) >= count).then_some(())
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}; server log:\n{}", self.server_log_tail()))?;
        Ok(started.elapsed())
    }

    async fn findings(&self, node: &str) -> anyhow::Result<Vec<guardian_proto::v1::FindingRecord>> {
        let mut operator = self.operator.clone();
        Ok(operator
            .list_findings(ListFindingsRequest {
                node_id: node.into(),
                include_cleared: true,
                limit: 1000,
            })
            .await?
            .into_inner()
            .findings)
    }

    fn guardianctl(&self, args: &[&str]) -> anyhow::Result<(bool, String)> {
        let out = std::process::Command::new(binary("guardianctl")?)
            .args(args)
            .arg("--server")
            .arg(format!("https://{}", self.server.grpc))
            .arg("--pki-dir")
            .arg(&self.scratch.pki.dir)
            .output()?;
        Ok((
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ))
    }

    /// `guardianctl audit verify` against the ledger file, and the audit entries' text.
    fn audit(&self) -> anyhow::Result<(bool, String)> {
        let url = self.scratch.sqlite_url();
        let run = |args: &[&str]| -> anyhow::Result<(bool, String)> {
            let out = std::process::Command::new(binary("guardianctl")?)
                .args(args)
                .arg("--ledger-url")
                .arg(&url)
                .output()?;
            Ok((
                out.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            ))
        };
        let (ok, verify) = run(&["audit", "verify"])?;
        let (_, list) = run(&["audit", "list", "--limit", "10000"])?;
        Ok((ok, format!("{verify}\n{list}")))
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
async fn a_lagging_node_is_restarted_once_and_comes_back_synced() -> TestResult {
    let rig = Rig::start(&["val-1"], Restart::Heals, Setup::default()).await?;
    let fault = Instant::now();
    rig.nodes[0].lag(40);
    let to_restart = rig.wait_restarts("val-1", 1).await?;
    let back = rig.wait_phase("val-1", "synced").await?;
    let synced_after = fault.elapsed();
    println!(
        "fault-to-remediation {:.2} s ({:.1} sampling intervals of {INTERVAL_MS} ms); synced again after {:.2} s",
        to_restart.as_secs_f64(),
        to_restart.as_secs_f64() * 1000.0 / INTERVAL_MS as f64,
        synced_after.as_secs_f64()
    );
    assert_eq!(back.remediation_attempts, 1, "{back:?}");
    assert_eq!(
        std::fs::read_to_string(rig.restarts_file("val-1"))?.trim(),
        "restart subtensor"
    );
    // Give the reconciler chances to (wrongly) act again.
    rig.wait_evaluations(QUIET_EVALUATIONS).await?;
    assert_eq!(
        rig.restarts("val-1"),
        1,
        "restarted again after it recovered"
    );

    let findings = rig.findings("val-1").await?;
    let lag = findings
        .iter()
        .find(|f| f.kind == "block_lag")
        .ok_or_else(|| anyhow::anyhow!("no block_lag finding: {findings:?}"))?;
    assert!(
        lag.cleared_at_unix_ms > 0,
        "the lag finding cleared: {lag:?}"
    );
    assert!(
        lag.score > 0.0 && lag.evidence.contains_key("lag"),
        "{lag:?}"
    );

    let (ok, audit) = rig.audit()?;
    assert!(ok, "{audit}");
    for needle in [
        "\"to\":\"recovering\"",
        "\"to\":\"synced\"",
        "restart-container",
        "\"state\":\"succeeded\"",
        "block_lag",
    ] {
        assert!(audit.contains(needle), "audit lacks {needle}: {audit}");
    }
    let metrics = reqwest_metrics(&rig).await?;
    assert!(
        metrics.contains("guardian_decision_latency_seconds_count 1"),
        "{metrics}"
    );
    // The finding, the decision and the command were each written in a pass of their own
    // or together: at least one pass write was timed.
    let passes =
        guardian_tests::metric_value(&metrics, "guardian_reconcile_pass_write_seconds_count");
    assert!(passes.is_some_and(|n| n >= 1.0), "{metrics}");
    rig.stop().await
}

#[tokio::test]
async fn a_frozen_head_is_remediated_and_an_unresponsive_rpc_is_detected() -> TestResult {
    let rig = Rig::start(&["val-1"], Restart::Heals, Setup::default()).await?;
    rig.nodes[0].freeze_head();
    rig.wait_restarts("val-1", 1).await?;
    rig.wait_phase("val-1", "synced").await?;
    assert!(
        rig.findings("val-1")
            .await?
            .iter()
            .any(|f| f.kind == "frozen_head"),
        "no frozen_head finding"
    );

    rig.nodes[0].hang();
    let finding = eventually(WAIT, "rpc_unresponsive finding", || async {
        rig.findings("val-1")
            .await
            .ok()?
            .into_iter()
            .find(|f| f.kind == "rpc_unresponsive")
    })
    .await?;
    assert_eq!(finding.severity, "critical", "{finding:?}");
    // Unresponsive is remediable too: the restart heals the hang.
    rig.wait_restarts("val-1", 2).await?;
    rig.wait_phase("val-1", "synced").await?;
    rig.stop().await
}

#[tokio::test]
async fn repeated_failure_ends_failed_and_the_budget_resets_after_stability() -> TestResult {
    let rig = Rig::start(
        &["val-1"],
        Restart::DoesNotHelp,
        Setup {
            policy: "max_restart_attempts = 2\nstable_reset_seconds = 3\n",
            ..Setup::default()
        },
    )
    .await?;
    rig.nodes[0].lag(40);
    let failed = rig.wait_phase("val-1", "failed").await?;
    assert_eq!(failed.remediation_attempts, 2, "{failed:?}");
    assert_eq!(rig.restarts("val-1"), 2);
    rig.wait_evaluations(QUIET_EVALUATIONS).await?;
    assert_eq!(rig.restarts("val-1"), 2, "acted after the budget was spent");

    // A human fixes it: the node is synced again and, after a stable period, the budget
    // is whole again, so the next fault is remediated.
    rig.nodes[0].heal();
    rig.wait_phase("val-1", "synced").await?;
    eventually(WAIT, "the attempt budget to reset", || async {
        rig.node("val-1")
            .await
            .filter(|n| n.remediation_attempts == 0)
    })
    .await?;
    rig.nodes[0].lag(40);
    rig.wait_restarts("val-1", 3).await?;
    let (ok, audit) = rig.audit()?;
    assert!(ok, "{audit}");
    assert!(audit.contains("\"to\":\"failed\""), "{audit}");
    rig.stop().await
}

#[tokio::test]
async fn cordon_and_alert_cordons_without_a_command_until_resumed() -> TestResult {
    let webhook = Webhook::start().await?;
    let more = format!(
        "[reconcile.nodes.val-1]\nrecovery_strategy = \"cordon-and-alert\"\n\
         [alerts]\nwebhook_url = \"{}\"\n",
        webhook.url
    );
    let rig = Rig::start(
        &["val-1"],
        Restart::Heals,
        Setup {
            more: &more,
            ..Setup::default()
        },
    )
    .await?;
    rig.nodes[0].lag(40);
    rig.wait_phase("val-1", "cordoned").await?;
    rig.wait_evaluations(QUIET_EVALUATIONS).await?;
    assert_eq!(rig.restarts("val-1"), 0, "cordon-and-alert sent a command");
    assert!(
        rig.server.proc.log_text().contains("RemediationAlert"),
        "no alert logged"
    );
    // The alert reached the operator's webhook as JSON, once.
    let alert = eventually(WAIT, "the cordon alert at the webhook", || async {
        webhook.bodies().into_iter().find_map(|body| {
            let alert: serde_json::Value = serde_json::from_str(&body).ok()?;
            (alert["event"] == "remediation_alert").then_some(alert)
        })
    })
    .await?;
    assert_eq!(alert["node_id"], "val-1", "{alert}");
    assert_eq!(alert["kind"], "cordoned", "{alert}");
    assert!(
        alert["summary"]
            .as_str()
            .is_some_and(|s| s.contains("block_lag")),
        "{alert}"
    );
    assert_eq!(
        webhook
            .bodies()
            .iter()
            .filter(|b| b.contains("remediation_alert"))
            .count(),
        1,
        "one alert per cordon"
    );
    // The operator fixes the node, sees the lag gone, and hands it back.
    rig.nodes[0].heal();
    eventually(WAIT, "the lag finding to clear", || async {
        rig.findings("val-1")
            .await
            .ok()?
            .iter()
            .all(|f| f.kind != "block_lag" || f.cleared_at_unix_ms > 0)
            .then_some(())
    })
    .await?;
    let (ok, text) = rig.guardianctl(&["resume", "val-1"])?;
    assert!(ok, "{text}");
    rig.wait_phase("val-1", "synced").await?;
    rig.stop().await
}

#[tokio::test]
async fn a_paused_node_is_left_alone_until_resumed() -> TestResult {
    let rig = Rig::start(&["val-1"], Restart::Heals, Setup::default()).await?;
    let (ok, text) = rig.guardianctl(&["pause", "val-1", "--reason", "maintenance"])?;
    assert!(ok && text.contains("paused"), "{text}");
    rig.nodes[0].lag(40);
    rig.wait_evaluations(QUIET_EVALUATIONS).await?;
    assert_eq!(rig.restarts("val-1"), 0, "a paused node was restarted");
    assert_eq!(
        rig.node("val-1").await.map(|n| n.phase),
        Some("paused".to_owned())
    );
    let (ok, text) = rig.guardianctl(&["resume", "val-1"])?;
    assert!(ok, "{text}");
    rig.wait_restarts("val-1", 1).await?;
    rig.wait_phase("val-1", "synced").await?;
    let (ok, audit) = rig.audit()?;
    assert!(ok, "{audit}");
    assert!(
        audit.contains("node_paused") && audit.contains("maintenance"),
        "{audit}"
    );
    rig.stop().await
}

#[tokio::test]
async fn fleet_wide_lag_raises_one_fleet_finding_and_restarts_nothing() -> TestResult {
    let names = ["val-1", "val-2", "val-3"];
    let rig = Rig::start(&names, Restart::Heals, Setup::default()).await?;
    for node in &rig.nodes {
        node.lag(40);
    }
    let fleet = eventually(WAIT, "a fleet finding", || async {
        rig.findings("")
            .await
            .ok()?
            .into_iter()
            .find(|f| f.kind == "fleet_degraded" && f.cleared_at_unix_ms == 0)
    })
    .await?;
    assert_eq!(fleet.node_id, "", "{fleet:?}");
    assert_eq!(fleet.network, "local", "{fleet:?}");
    rig.wait_evaluations(QUIET_EVALUATIONS).await?;
    for name in names {
        assert_eq!(
            rig.restarts(name),
            0,
            "{name} was restarted during a fleet-wide lag"
        );
    }
    let fleet_findings: Vec<_> = rig
        .findings("")
        .await?
        .into_iter()
        .filter(|f| f.kind == "fleet_degraded")
        .collect();
    assert_eq!(
        fleet_findings.len(),
        1,
        "one fleet finding, not one per node or per sample: {fleet_findings:?}\n{}",
        rig.server_log_tail()
    );
    rig.stop().await
}

#[tokio::test]
async fn a_keystore_on_disk_is_critical_and_blocks_any_restart() -> TestResult {
    let keystore = tempfile::tempdir_in(std::env::temp_dir())?;
    std::fs::write(keystore.path().join("hotkey"), b"{\"not\":\"a real key\"}")?;
    std::fs::set_permissions(
        keystore.path().join("hotkey"),
        std::fs::Permissions::from_mode(0o600),
    )?;
    let agent_more = format!("keystore_path = \"{}\"\n", keystore.path().display());
    let rig = Rig::start(
        &["val-1"],
        Restart::Heals,
        Setup {
            agent: &agent_more,
            ..Setup::default()
        },
    )
    .await?;
    let finding = eventually(WAIT, "a keystore finding", || async {
        rig.findings("val-1")
            .await
            .ok()?
            .into_iter()
            .find(|f| f.kind == "keystore")
    })
    .await?;
    assert_eq!(finding.severity, "critical", "{finding:?}");
    rig.nodes[0].lag(40);
    rig.wait_phase("val-1", "degraded").await?;
    rig.wait_evaluations(QUIET_EVALUATIONS).await?;
    assert_eq!(
        rig.restarts("val-1"),
        0,
        "a node whose keystore is unsafe was restarted"
    );
    let (ok, text) = rig.guardianctl(&["findings", "--node", "val-1"])?;
    assert!(ok && text.contains("critical keystore"), "{text}");
    rig.stop().await
}

#[tokio::test]
async fn one_lying_agent_among_five_cannot_get_a_restart_or_a_fleet_hold() -> TestResult {
    // The liar's node says it is at block 999 999 999 (and in sync there); the four honest
    // ones are at ~4 000 000. Judged against a plain max of the network, every honest node
    // was ~996 million blocks behind: restarted, or (at fleet_min_nodes) a fleet_degraded
    // hold on the whole network.
    let names = ["val-1", "val-2", "val-3", "val-4", "liar"];
    let rig = Rig::start(
        &names,
        Restart::Heals,
        Setup {
            initial_best: &[("liar", 999_999_999)],
            ..Setup::default()
        },
    )
    .await?;
    // Rig::start waited for every node to be synced. Let the reconciler evaluate every node
    // many times with the liar's figures in the fleet (not a fixed sleep: a count).
    rig.wait_evaluations(20).await?;
    for name in names {
        assert_eq!(rig.restarts(name), 0, "{name} was restarted");
        let node = rig
            .node(name)
            .await
            .ok_or_else(|| anyhow::anyhow!("{name} unknown"))?;
        assert_eq!(
            node.phase,
            "synced",
            "{name}: {node:?}\n{}",
            rig.server_log_tail()
        );
    }
    let findings = rig.findings("").await?;
    assert!(
        !findings
            .iter()
            .any(|f| f.kind == "fleet_degraded" || f.kind == "block_lag"),
        "the lie raised findings: {findings:?}"
    );
    rig.stop().await
}

/// Evaluations per node to wait for before checking that the reconciler did nothing: with
/// evaluations every 200 ms and samples every 400 ms, about 3 s and several new samples each,
/// more than `confirm_samples`.
const QUIET_EVALUATIONS: u64 = 15;

/// `guardian_reconcile_evaluations_total` in a `/metrics` text, if it is there.
fn evaluations(metrics: &str) -> Option<u64> {
    guardian_tests::metric_value(metrics, "guardian_reconcile_evaluations_total").map(|v| v as u64)
}

async fn reqwest_metrics(rig: &Rig) -> anyhow::Result<String> {
    guardian_tests::admin_metrics(rig.server.admin)
}

#[tokio::test]
async fn the_audit_chain_is_mirrored_to_clickhouse_entry_for_entry() -> TestResult {
    let clickhouse = guardian_tests::clickhouse::ClickHouse::start()?;
    let more = format!(
        "[clickhouse]\nurl = \"{}\"\ndatabase = \"guardian\"\ninsert_max_delay_ms = 100\n",
        clickhouse.url()
    );
    let rig = Rig::start(
        &["val-1"],
        Restart::Heals,
        Setup {
            more: &more,
            ..Setup::default()
        },
    )
    .await?;
    rig.nodes[0].lag(40);
    rig.wait_restarts("val-1", 1).await?;
    rig.wait_phase("val-1", "synced").await?;
    let (ok, audit) = rig.audit()?;
    assert!(ok, "{audit}");
    // "audit chain OK: N entries"
    let entries: u64 = audit
        .split_whitespace()
        .skip_while(|w| *w != "OK:")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no entry count in {audit}"))?;
    assert!(entries >= 6, "{audit}");
    let mirrored = eventually(WAIT, "the audit mirror to catch up", || async {
        let text = clickhouse
            .query("SELECT count(), uniqExact(seq), min(seq), max(seq) FROM guardian.audit")
            .ok()?;
        let counts: Vec<u64> = text
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        (counts.first().copied()? >= entries).then_some(counts)
    })
    .await?;
    let newest = mirrored[3];
    assert_eq!(
        mirrored[0], mirrored[1],
        "an audit entry was mirrored twice: {mirrored:?}"
    );
    assert_eq!(mirrored[2], 1, "{mirrored:?}");
    assert_eq!(mirrored[0], newest, "the mirror has a gap: {mirrored:?}");
    // The mirror carries the chain: each row's prev_hash is the hash of the row before it.
    let broken = clickhouse.query(
        "SELECT count() FROM guardian.audit AS a ANY INNER JOIN \
         (SELECT seq + 1 AS seq, hash AS before FROM guardian.audit) AS b USING seq \
         WHERE a.prev_hash != b.before",
    )?;
    assert_eq!(broken.trim(), "0", "mirrored rows do not chain");
    let kinds = clickhouse.query("SELECT groupUniqArray(kind) FROM guardian.audit")?;
    for kind in ["finding", "decision", "command", "outcome"] {
        assert!(kinds.contains(kind), "{kinds}");
    }
    rig.stop().await
}

#[tokio::test]
async fn dry_run_decides_and_audits_but_sends_nothing() -> TestResult {
    let rig = Rig::start(
        &["val-1"],
        Restart::Heals,
        Setup {
            reconcile: "dry_run = true",
            ..Setup::default()
        },
    )
    .await?;
    rig.nodes[0].lag(40);
    rig.wait_phase("val-1", "recovering").await?;
    rig.wait_evaluations(QUIET_EVALUATIONS).await?;
    assert_eq!(rig.restarts("val-1"), 0, "dry run sent a command");
    assert!(
        rig.server.proc.log_text().contains("RemediationDryRun"),
        "no dry-run event"
    );
    let (ok, audit) = rig.audit()?;
    assert!(ok, "{audit}");
    assert!(audit.contains("\"dry_run\":true"), "{audit}");
    assert!(
        !audit.contains("\"kind\":\"command\"") && !audit.lines().any(|l| l.contains(" command ")),
        "a command was recorded in dry-run: {audit}"
    );
    rig.stop().await
}

#[tokio::test]
async fn a_silent_agent_degrades_its_node_with_an_alert_and_no_command() -> TestResult {
    let mut rig = Rig::start(
        &["val-1"],
        Restart::Heals,
        Setup {
            detect: "silent_after_ms = 2000",
            ..Setup::default()
        },
    )
    .await?;
    rig.agents[0].terminate()?;
    let node = rig.wait_phase("val-1", "degraded").await?;
    assert!(!node.connected, "{node:?}");
    let silent = rig
        .findings("val-1")
        .await?
        .into_iter()
        .find(|f| f.kind == "agent_silent")
        .ok_or_else(|| anyhow::anyhow!("no agent_silent finding"))?;
    assert!(
        silent.evidence.values().any(|v| !v.is_empty()),
        "{silent:?}"
    );
    assert!(rig.server.proc.log_text().contains("RemediationAlert"));
    assert_eq!(rig.restarts("val-1"), 0);
    rig.agents.clear();
    rig.stop().await
}

/// A webhook receiver on 127.0.0.1: answers 200 to every POST and keeps the bodies.
struct Webhook {
    url: String,
    bodies: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Webhook {
    async fn start() -> anyhow::Result<Self> {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/hooks/guardian", listener.local_addr()?);
        let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = std::sync::Arc::clone(&bodies);
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let kept = std::sync::Arc::clone(&kept);
                tokio::spawn(async move {
                    let mut reader = BufReader::new(socket);
                    // Requests on one keep-alive connection, one after another.
                    for _ in 0..1000 {
                        let mut length = 0usize;
                        let mut line = String::new();
                        loop {
                            line.clear();
                            if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            let header = line.trim_end();
                            if header.is_empty() {
                                break;
                            }
                            if let Some((name, value)) = header.split_once(':')
                                && name.eq_ignore_ascii_case("content-length")
                            {
                                length = value.trim().parse().unwrap_or(0);
                            }
                        }
                        let mut body = vec![0; length.min(1 << 20)];
                        if reader.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        if let Ok(mut bodies) = kept.lock() {
                            bodies.push(String::from_utf8_lossy(&body).into_owned());
                        }
                        let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                        if reader.get_mut().write_all(reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Ok(Self { url, bodies, task })
    }

    fn bodies(&self) -> Vec<String> {
        self.bodies.lock().map(|b| b.clone()).unwrap_or_default()
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.task.abort();
    }
}
