//! Signed remote commands across the two crates: what the server's `CommandSigner` issues
//! with the keys `pki init` writes, the agent's `CommandVerifier` accepts exactly once, and
//! its `Executor` runs only what the agent's config allows; forged, replayed, expired,
//! not-yet-valid, other-node and not-allowed commands are refused with their kind; a signed
//! `cancel-command` stops its target or makes sure it never runs.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use guardian_agent::command::{CommandVerifier, Executor, refusal_outcome};
use guardian_agent::config::CommandsConfig;
use guardian_proto::v1::Command;
use guardian_server::actuate::sign::CommandSigner;
use guardian_server::identity::NodeId;
use guardian_server::pki::{self, PkiFiles, PkiRequest};
use guardian_server::reconcile::Action;

type TestResult = anyhow::Result<()>;

const NODE: &str = "val-1";
const TTL: Duration = Duration::from_secs(300);

/// A tempdir with a fresh PKI (nodes val-1 and val-2), the server's signer, and an agent
/// `[commands]` config allowing one unit and the given hooks.
struct Fixture {
    dir: tempfile::TempDir,
    files: PkiFiles,
    signer: CommandSigner,
    config: CommandsConfig,
}

impl Fixture {
    fn new() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let files = pki_in(&dir.path().join("pki"))?;
        let signer = CommandSigner::load(&files.command_signing_key())?;
        let config = CommandsConfig {
            enabled: true,
            verify_key_file: files.command_verify_key(),
            allowed_units: vec!["subtensor.service".into()],
            hooks: BTreeMap::new(),
            hook_timeout_ms: 1000,
            ..CommandsConfig::default()
        };
        Ok(Self {
            dir,
            files,
            signer,
            config,
        })
    }

    fn seen_path(&self) -> PathBuf {
        self.dir.path().join("commands-seen")
    }

    /// A verifier for `node` as the agent opens it at start (key file + seen-ids file).
    fn verifier(&self, node: &str) -> anyhow::Result<CommandVerifier> {
        Ok(CommandVerifier::open(
            &self.config,
            node,
            &self.seen_path(),
            now(),
        )?)
    }

    fn issue(
        &self,
        node: &str,
        action: Action,
        params: &[(&str, &str)],
        issued_at: i64,
    ) -> anyhow::Result<Command> {
        let params: HashMap<String, String> = params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let (_, command) =
            self.signer
                .issue(&NodeId::parse(node)?, action, params, TTL, issued_at)?;
        Ok(command)
    }

    /// Writes an executable shell script into the tempdir and registers it as hook `name`.
    fn hook(&mut self, name: &str, body: &str) -> anyhow::Result<()> {
        let path = self.dir.path().join(format!("{name}.sh"));
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n"))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        self.config.hooks.insert(name.to_owned(), path);
        Ok(())
    }
}

fn pki_in(dir: &Path) -> anyhow::Result<PkiFiles> {
    Ok(pki::init(
        dir,
        &PkiRequest {
            nodes: vec![NODE.into(), "val-2".into()],
            operator: "tester".into(),
            server_names: vec![],
            force: false,
            network: None,
        },
    )?)
}

fn now() -> i64 {
    guardian_agent::unix_ms()
}

fn refused(verifier: &mut CommandVerifier, command: &Command) -> &'static str {
    match verifier.verify(command, now()) {
        Ok(envelope) => panic!("command {} must be refused", envelope.command_id),
        Err(refusal) => refusal.kind(),
    }
}

#[tokio::test]
async fn agent_runs_a_signed_hook_once_with_its_parameters() -> TestResult {
    let mut f = Fixture::new()?;
    f.hook(
        "snapshot-restore",
        "echo \"restoring $GUARDIAN_PARAM_SNAPSHOT for $GUARDIAN_NODE_ID\"; echo done >&2",
    )?;
    let mut verifier = f.verifier(NODE)?;
    let command = f.issue(
        NODE,
        Action::RunHook,
        &[("hook", "snapshot-restore"), ("snapshot", "block-4242")],
        now(),
    )?;
    let envelope = verifier.verify(&command, now())?;
    assert_eq!(envelope.action, "run-hook");
    let outcome = Executor::new(f.config.clone(), f.dir.path().to_owned())
        .execute(&envelope)
        .await;
    assert_eq!(outcome.command_id, envelope.command_id);
    assert!(outcome.succeeded, "{}", outcome.detail);
    assert!(outcome.refused.is_empty());
    assert!(
        outcome.detail.contains("restoring block-4242 for val-1"),
        "{}",
        outcome.detail
    );
    assert!(outcome.detail.contains("done"), "{}", outcome.detail);
    assert!(
        outcome.detail.contains("exit status: 0"),
        "{}",
        outcome.detail
    );
    Ok(())
}

#[tokio::test]
async fn agent_refuses_replayed_command_also_after_restart() -> TestResult {
    let mut f = Fixture::new()?;
    f.hook("count", "echo ran >> \"$GUARDIAN_PARAM_LOG\"")?;
    let log = f.dir.path().join("runs.log");
    let log_text = log.display().to_string();
    let command = f.issue(
        NODE,
        Action::RunHook,
        &[("hook", "count"), ("log", &log_text)],
        now(),
    )?;
    let executor = Executor::new(f.config.clone(), f.dir.path().to_owned());
    let mut verifier = f.verifier(NODE)?;
    let envelope = verifier.verify(&command, now())?;
    assert!(executor.execute(&envelope).await.succeeded);

    assert_eq!(refused(&mut verifier, &command), "replayed");
    // A restarted agent (or a reconnect that re-delivers it) reopens the seen-ids file.
    drop(verifier);
    let mut restarted = f.verifier(NODE)?;
    assert_eq!(refused(&mut restarted, &command), "replayed");
    let refusal = restarted.verify(&command, now()).expect_err("replayed");
    let outcome = refusal_outcome(&command, &refusal);
    assert_eq!(
        (outcome.succeeded, outcome.refused.as_str()),
        (false, "replayed")
    );
    assert!(outcome.detail.contains(&outcome.command_id));
    assert_eq!(std::fs::read_to_string(&log)?, "ran\n");
    Ok(())
}

#[test]
fn agent_refuses_forged_commands() -> TestResult {
    let f = Fixture::new()?;
    let mut verifier = f.verifier(NODE)?;
    // Signed by another server's key (another PKI).
    let other = pki_in(&f.dir.path().join("other-pki"))?;
    let forger = CommandSigner::load(&other.command_signing_key())?;
    let (_, forged) = forger.issue(
        &NodeId::parse(NODE)?,
        Action::CollectDiagnostics,
        HashMap::new(),
        TTL,
        now(),
    )?;
    assert_eq!(refused(&mut verifier, &forged), "bad_signature");
    let outcome = refusal_outcome(
        &forged,
        &verifier.verify(&forged, now()).expect_err("forged"),
    );
    assert_eq!(outcome.refused, "bad_signature");
    assert!(!outcome.succeeded);

    // Genuine, then altered in transit: every flipped byte breaks the signature.
    let genuine = f.issue(
        NODE,
        Action::RestartUnit,
        &[("unit", "subtensor.service")],
        now(),
    )?;
    for at in [0, genuine.envelope.len() / 2, genuine.envelope.len() - 1] {
        let mut altered = genuine.clone();
        altered.envelope[at] ^= 0x01;
        assert_eq!(
            refused(&mut verifier, &altered),
            "bad_signature",
            "byte {at}"
        );
    }
    let mut bad_signature = genuine.clone();
    bad_signature.signature[0] ^= 0x80;
    assert_eq!(refused(&mut verifier, &bad_signature), "bad_signature");
    // None of them burned the genuine id.
    verifier.verify(&genuine, now())?;
    assert_eq!(f.files.command_verify_key(), f.config.verify_key_file);
    Ok(())
}

#[test]
fn agent_refuses_expired_future_and_other_node_commands() -> TestResult {
    let f = Fixture::new()?;
    let mut verifier = f.verifier(NODE)?;
    let diag = Action::CollectDiagnostics;
    let expired = f.issue(NODE, diag, &[], now() - 2 * TTL.as_millis() as i64)?;
    assert_eq!(refused(&mut verifier, &expired), "expired");
    let future = f.issue(NODE, diag, &[], now() + 60_000)?;
    assert_eq!(refused(&mut verifier, &future), "not_yet_valid");
    let other_node = f.issue("val-2", diag, &[], now())?;
    assert_eq!(refused(&mut verifier, &other_node), "wrong_node");
    // The other node's agent takes it.
    let seen_2 = f.dir.path().join("commands-seen-2");
    CommandVerifier::open(&f.config, "val-2", &seen_2, now())?.verify(&other_node, now())?;
    assert!(verifier.seen().is_empty());
    Ok(())
}

#[tokio::test]
async fn agent_refuses_actions_its_config_does_not_allow() -> TestResult {
    let f = Fixture::new()?;
    let mut verifier = f.verifier(NODE)?;
    let executor = Executor::new(f.config.clone(), f.dir.path().to_owned());
    for (action, params) in [
        (Action::RestartUnit, vec![("unit", "sshd.service")]),
        (Action::RestartContainer, vec![("container", "validator")]),
        (Action::RunHook, vec![("hook", "wipe-disk")]),
    ] {
        let command = f.issue(NODE, action, &params, now())?;
        let envelope = verifier.verify(&command, now())?;
        let outcome = executor.execute(&envelope).await;
        assert!(!outcome.succeeded, "{action}");
        assert_eq!(outcome.refused, "action_not_allowed", "{action}");
        assert_eq!(outcome.command_id, envelope.command_id);
        assert!(
            outcome.detail.contains("not in commands."),
            "{}",
            outcome.detail
        );
    }
    Ok(())
}

#[tokio::test]
async fn hook_past_its_timeout_is_killed_and_reported_failed() -> TestResult {
    let mut f = Fixture::new()?;
    let pid_file = f.dir.path().join("sleep.pid");
    f.hook(
        "slow",
        &format!(
            "echo started; sleep 30 & echo $! > '{}'; wait",
            pid_file.display()
        ),
    )?;
    // Long enough for `sh` to start and write the pid file on a loaded machine.
    f.config.hook_timeout_ms = 1500;
    let mut verifier = f.verifier(NODE)?;
    let command = f.issue(NODE, Action::RunHook, &[("hook", "slow")], now())?;
    let envelope = verifier.verify(&command, now())?;
    let started = std::time::Instant::now();
    let outcome = Executor::new(f.config.clone(), f.dir.path().to_owned())
        .execute(&envelope)
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(!outcome.succeeded);
    assert!(outcome.refused.is_empty(), "it ran, then was killed");
    assert!(
        outcome
            .detail
            .contains("killed after its timeout of 1500 ms"),
        "{}",
        outcome.detail
    );
    assert!(outcome.detail.contains("started"), "{}", outcome.detail);
    // The hook's own child went with it (the whole process group is killed).
    let sleep_pid = std::fs::read_to_string(&pid_file)?.trim().to_owned();
    let gone = || {
        std::fs::read_to_string(format!("/proc/{sleep_pid}/stat"))
            .map_or(true, |stat| stat.contains(") Z "))
    };
    for _ in 0..50 {
        if gone() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone(), "sleep {sleep_pid} outlived its killed hook");
    Ok(())
}

#[tokio::test]
async fn diagnostics_are_collected_and_bounded() -> TestResult {
    let f = Fixture::new()?;
    let mut verifier = f.verifier(NODE)?;
    let envelope = verifier.verify(
        &f.issue(NODE, Action::CollectDiagnostics, &[], now())?,
        now(),
    )?;
    let outcome = Executor::new(f.config.clone(), f.dir.path().to_owned())
        .execute(&envelope)
        .await;
    assert!(outcome.succeeded);
    assert!(
        outcome.detail.contains("== uname -a =="),
        "{}",
        outcome.detail
    );
    assert!(outcome.detail.contains("== df -h "), "{}", outcome.detail);
    assert!(outcome.detail.len() <= guardian_agent::command::DIAGNOSTICS_MAX_BYTES);
    Ok(())
}

#[tokio::test]
async fn diagnostics_larger_than_the_bound_are_cut_to_it() -> TestResult {
    use guardian_agent::command::DIAGNOSTICS_MAX_BYTES;
    let mut f = Fixture::new()?;
    // Each allowed unit adds a `systemctl status` step whose header names the unit: twelve
    // 8 KiB names make the report pass 64 KiB whatever systemctl prints (or fails to).
    let unit = |i: usize| format!("unit-{i:02}-{}.service", "x".repeat(8 * 1024));
    f.config.allowed_units = (0..12).map(unit).collect();
    let mut verifier = f.verifier(NODE)?;
    let envelope = verifier.verify(
        &f.issue(NODE, Action::CollectDiagnostics, &[], now())?,
        now(),
    )?;
    let outcome = Executor::new(f.config.clone(), f.dir.path().to_owned())
        .execute(&envelope)
        .await;
    let detail = &outcome.detail;
    let head: String = detail.chars().take(300).collect();
    assert!(outcome.succeeded, "{head}");
    assert!(detail.starts_with("== uname -a =="), "{head}");
    // Cut at a char boundary at most 3 bytes below the bound (marker included).
    assert!(
        (DIAGNOSTICS_MAX_BYTES - 3..=DIAGNOSTICS_MAX_BYTES).contains(&detail.len()),
        "the report is cut to {DIAGNOSTICS_MAX_BYTES} bytes, not {}",
        detail.len()
    );
    // It says it was cut, within the bound.
    assert!(
        detail.trim_end().ends_with("later steps not run]")
            && detail.contains(&format!(
                "[diagnostics truncated at {DIAGNOSTICS_MAX_BYTES} of "
            )),
        "no truncation marker: {}",
        detail.chars().rev().take(200).collect::<String>()
    );
    // Cut after the first unit's step; the last unit's step never ran.
    assert!(detail.contains(&format!(
        "== systemctl status --no-pager --lines=20 {} ==",
        unit(0)
    )));
    assert!(
        !detail.contains("unit-11-"),
        "the last unit's step ran although the report was already full"
    );
    Ok(())
}

#[tokio::test]
async fn cancel_stops_a_running_hook_and_the_cancelled_id_never_runs() -> TestResult {
    let mut f = Fixture::new()?;
    let pid_file = f.dir.path().join("sleep.pid");
    f.hook(
        "slow",
        &format!(
            "echo started; sleep 30 & echo $! > '{}'; wait",
            pid_file.display()
        ),
    )?;
    f.hook("count", "echo ran >> \"$GUARDIAN_PARAM_LOG\"")?;
    // Long enough that only the cancel can end it.
    f.config.hook_timeout_ms = 60_000;
    let mut verifier = f.verifier(NODE)?;
    let executor = Executor::new(f.config.clone(), f.dir.path().to_owned());

    // A hook is running when its cancel arrives: its process group is killed.
    let slow = verifier.verify(
        &f.issue(NODE, Action::RunHook, &[("hook", "slow")], now())?,
        now(),
    )?;
    let running = tokio::spawn(executor.execute(&slow));
    for _ in 0..100 {
        if std::fs::read_to_string(&pid_file).is_ok_and(|pid| pid.ends_with('\n')) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sleep_pid = std::fs::read_to_string(&pid_file)?.trim().to_owned();
    let cancel = verifier.verify(
        &f.issue(
            NODE,
            Action::CancelCommand,
            &[("command_id", &slow.command_id)],
            now(),
        )?,
        now(),
    )?;
    let started = std::time::Instant::now();
    let outcome = executor.cancel(&cancel, &mut verifier, now());
    assert!(outcome.succeeded, "{}", outcome.detail);
    assert_eq!(
        outcome.detail,
        format!("stopped running command {}", slow.command_id)
    );
    let stopped = tokio::time::timeout(Duration::from_secs(10), running).await??;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(stopped.command_id, slow.command_id);
    assert!(!stopped.succeeded);
    assert!(stopped.refused.is_empty(), "it ran, then was cancelled");
    assert!(
        stopped
            .detail
            .starts_with(&format!("cancelled by command {}; ", cancel.command_id)),
        "{}",
        stopped.detail
    );
    assert!(
        stopped.detail.contains("the command was cancelled"),
        "{}",
        stopped.detail
    );
    let gone = || {
        std::fs::read_to_string(format!("/proc/{sleep_pid}/stat"))
            .map_or(true, |stat| stat.contains(") Z "))
    };
    for _ in 0..50 {
        if gone() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone(), "sleep {sleep_pid} outlived its cancelled hook");
    // Cancelling a finished command changes nothing.
    let late = verifier.verify(
        &f.issue(
            NODE,
            Action::CancelCommand,
            &[("command_id", &slow.command_id)],
            now(),
        )?,
        now(),
    )?;
    assert_eq!(
        executor.cancel(&late, &mut verifier, now()).detail,
        format!(
            "command {} already finished; nothing to stop",
            slow.command_id
        )
    );

    // A command cancelled before it arrives is refused when it does, also after a restart.
    let log = f.dir.path().join("runs.log");
    let log_text = log.display().to_string();
    let (queued, queued_command) = f.signer.issue(
        &NodeId::parse(NODE)?,
        Action::RunHook,
        HashMap::from([
            ("hook".to_owned(), "count".to_owned()),
            ("log".to_owned(), log_text),
        ]),
        TTL,
        now(),
    )?;
    let cancel = verifier.verify(
        &f.issue(
            NODE,
            Action::CancelCommand,
            &[("command_id", &queued.command_id)],
            now(),
        )?,
        now(),
    )?;
    let outcome = executor.cancel(&cancel, &mut verifier, now());
    assert!(outcome.succeeded, "{}", outcome.detail);
    assert_eq!(
        outcome.detail,
        format!("command {} will never run", queued.command_id)
    );
    let refusal = verifier
        .verify(&queued_command, now())
        .expect_err("cancelled");
    let answer = refusal_outcome(&queued_command, &refusal);
    assert_eq!(
        (answer.succeeded, answer.refused.as_str()),
        (false, "cancelled")
    );
    assert!(
        answer
            .detail
            .contains(&format!("cancelled by command {}", cancel.command_id)),
        "{}",
        answer.detail
    );
    drop(verifier);
    let mut restarted = f.verifier(NODE)?;
    assert_eq!(refused(&mut restarted, &queued_command), "replayed");
    assert!(!log.exists(), "the cancelled hook ran");
    Ok(())
}

#[test]
fn cancel_without_a_command_id_is_refused_as_malformed() -> TestResult {
    let f = Fixture::new()?;
    let mut verifier = f.verifier(NODE)?;
    // The server's signer will not issue one; should one arrive, the agent refuses it
    // rather than take it as "cancel nothing" (or everything).
    let (mut envelope, _) = f.signer.issue(
        &NodeId::parse(NODE)?,
        Action::CancelCommand,
        HashMap::from([("command_id".to_owned(), "x".to_owned())]),
        TTL,
        now(),
    )?;
    envelope
        .parameters
        .insert("command_id".to_owned(), String::new());
    let executor = Executor::new(f.config.clone(), f.dir.path().to_owned());
    let outcome = executor.cancel(&envelope, &mut verifier, now());
    assert!(!outcome.succeeded);
    assert_eq!(outcome.refused, "malformed");
    assert!(
        outcome.detail.contains("\"command_id\""),
        "{}",
        outcome.detail
    );
    assert!(verifier.seen().is_empty(), "nothing was cancelled");
    Ok(())
}
