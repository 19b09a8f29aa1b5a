//! Signed remote commands end to end, real processes: an operator issues a command with
//! guardianctl, the server signs, records and audits it and sends it down the node's live
//! stream, the agent verifies it and runs it only if its own config allows it, and the
//! outcome comes back, recorded and audited once.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use guardian_proto::v1::{GetNodeRequest, IssueCommandRequest};
use guardian_tests::{Scratch, Server, binary, eventually, start_agent};
use tonic::Code;

type TestResult = anyhow::Result<()>;

const WAIT: Duration = Duration::from_secs(30);

fn guardianctl(
    scratch: &Scratch,
    server: &Server,
    args: &[&str],
) -> anyhow::Result<(bool, String)> {
    let out = std::process::Command::new(binary("guardianctl")?)
        .args(args)
        .arg("--server")
        .arg(format!("https://{}", server.grpc))
        .arg("--pki-dir")
        .arg(&scratch.pki.dir)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

/// A server that signs commands, with the reconciler off: these tests are about operator
/// commands only, and the reconciler's own audit entries (findings about this machine, e.g.
/// CPU pressure on a busy CI host) would change the audit counts they check.
fn command_server(scratch: &Scratch) -> anyhow::Result<Server> {
    let extra = format!(
        "command_signing_key_file = \"{}\"\n[reconcile]\nenabled = false\n",
        scratch.pki.command_signing_key().display()
    );
    Server::start(
        &scratch.server_config(&scratch.sqlite_url(), &extra)?,
        scratch.path("server.log"),
    )
}

/// Writes an executable hook script `NAME.sh` with `body` and starts val-1's agent allowing it
/// as hook `name`, then waits until val-1 is connected.
async fn agent_with_hook(
    scratch: &Scratch,
    server: &Server,
    name: &str,
    body: &str,
    timeout_ms: u64,
) -> anyhow::Result<guardian_tests::Proc> {
    let hook = scratch.path(&format!("{name}.sh"));
    std::fs::write(&hook, format!("#!/bin/sh\n{body}"))?;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755))?;
    let agent_extra = format!(
        "[commands]\nenabled = true\nverify_key_file = \"{}\"\nhook_timeout_ms = {timeout_ms}\n[commands.hooks]\n{name} = \"{}\"\n",
        scratch.pki.command_verify_key().display(),
        hook.display()
    );
    let agent = start_agent(
        &scratch.agent_config_with("val-1", server.grpc, 200, &agent_extra)?,
        scratch.path("agent.log"),
    )?;
    let operator = scratch.operator(server.grpc).await?;
    eventually(WAIT, "val-1 to connect", || {
        let mut operator = operator.clone();
        async move {
            let node = operator
                .get_node(GetNodeRequest {
                    node_id: "val-1".into(),
                })
                .await
                .ok()?
                .into_inner();
            (node.connected && node.last_stored_seq > 0).then_some(())
        }
    })
    .await?;
    Ok(agent)
}

#[tokio::test]
async fn an_allowed_hook_runs_once_and_everything_else_is_refused_and_audited() -> TestResult {
    let scratch = Scratch::new(&["val-1", "val-2"])?;
    let server = command_server(&scratch)?;
    let marker = scratch.path("restored-from");
    let _agent = agent_with_hook(
        &scratch,
        &server,
        "snapshot-restore",
        &format!(
            "printf '%s' \"$GUARDIAN_PARAM_SNAPSHOT\" > '{}'\necho restored from \"$GUARDIAN_PARAM_SNAPSHOT\"\n",
            marker.display()
        ),
        10_000,
    )
    .await?;
    let mut operator = scratch.operator(server.grpc).await?;

    // Allowed: the hook runs with its parameter, the outcome comes back.
    let (ok, text) = guardianctl(
        &scratch,
        &server,
        &[
            "command",
            "issue",
            "--node",
            "val-1",
            "--action",
            "run-hook",
            "--param",
            "hook=snapshot-restore",
            "--param",
            "snapshot=s1",
            "--wait",
            "20",
        ],
    )?;
    assert!(ok, "{text}");
    assert!(text.contains("state=succeeded"), "{text}");
    assert!(text.contains("restored from s1"), "{text}");
    assert_eq!(std::fs::read_to_string(&marker)?, "s1");

    // Not in the agent's allow-list: refused by the agent, recorded as refused.
    let (ok, text) = guardianctl(
        &scratch,
        &server,
        &[
            "command",
            "issue",
            "--node",
            "val-1",
            "--action",
            "restart-unit",
            "--param",
            "unit=sshd.service",
            "--wait",
            "20",
        ],
    )?;
    assert!(
        !ok,
        "a refused command is a failure for the operator: {text}"
    );
    assert!(text.contains("state=refused"), "{text}");
    assert!(text.contains("action_not_allowed"), "{text}");

    // A node without a live stream gets nothing, and nothing is recorded for it.
    let status = operator
        .issue_command(IssueCommandRequest {
            node_id: "val-2".into(),
            action: "collect-diagnostics".into(),
            parameters: Default::default(),
            ttl_seconds: 60,
        })
        .await
        .expect_err("val-2 never connected");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    // An agent certificate cannot issue commands.
    let (cert, key) = scratch.pki.node("val-1");
    let mut agent_client = guardian_proto::v1::fleet_client::FleetClient::new(
        scratch.channel(server.grpc, &cert, &key).await?,
    );
    let status = agent_client
        .issue_command(IssueCommandRequest {
            node_id: "val-1".into(),
            action: "collect-diagnostics".into(),
            parameters: Default::default(),
            ttl_seconds: 60,
        })
        .await
        .expect_err("agents are not operators");
    assert_eq!(status.code(), Code::PermissionDenied);

    // Both commands and both outcomes are in the audit chain, which verifies.
    let out = std::process::Command::new(binary("guardianctl")?)
        .args(["audit", "verify", "--ledger-url", &scratch.sqlite_url()])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("audit chain OK: 4 entries"), "{text}");
    Ok(())
}

#[tokio::test]
async fn an_operator_cancels_a_running_hook_once_and_it_is_audited() -> TestResult {
    let scratch = Scratch::new(&["val-1"])?;
    let server = command_server(&scratch)?;
    let started = scratch.path("hook-started");
    let _agent = agent_with_hook(
        &scratch,
        &server,
        "slow",
        &format!("touch '{}'\nsleep 60\necho finished\n", started.display()),
        120_000,
    )
    .await?;
    let (ok, text) = guardianctl(
        &scratch,
        &server,
        &[
            "command",
            "issue",
            "--node",
            "val-1",
            "--action",
            "run-hook",
            "--param",
            "hook=slow",
            "--wait",
            "0",
        ],
    )?;
    assert!(ok, "{text}");
    // "issued ID to NODE"
    let id = text
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("no command id in {text}"))?
        .to_owned();
    eventually(WAIT, "the hook to start", || async {
        started.exists().then_some(())
    })
    .await?;

    let (ok, text) = guardianctl(
        &scratch,
        &server,
        &["command", "cancel", &id, "--reason", "wrong node"],
    )?;
    assert!(ok && text.contains("state=cancelled"), "{text}");
    // A second cancel changes nothing and says so.
    let (ok, text) = guardianctl(&scratch, &server, &["command", "cancel", &id])?;
    assert!(!ok && text.contains("already ended"), "{text}");
    // The agent stopped the hook: its cancel-command reports it.
    let stopped = eventually(WAIT, "the cancel's outcome", || async {
        let out = std::process::Command::new(binary("guardianctl").ok()?)
            .args(["audit", "list", "--ledger-url", &scratch.sqlite_url()])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains("stopped running command").then_some(text)
    })
    .await?;
    assert!(
        stopped.contains("command_cancelled") && stopped.contains("wrong node"),
        "{stopped}"
    );
    assert_eq!(
        stopped.matches("command_cancelled").count(),
        1,
        "one cancel audited: {stopped}"
    );
    let out = std::process::Command::new(binary("guardianctl")?)
        .args(["audit", "verify", "--ledger-url", &scratch.sqlite_url()])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}
