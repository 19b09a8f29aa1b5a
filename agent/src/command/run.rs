//! Runs verified commands that the `[commands]` allow-lists permit: plans the process
//! (systemctl, the container runtime, a hook, the diagnostics programs), runs it in its own
//! process group without a shell, with a timeout, keeping a bounded tail of its output.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guardian_proto::v1::{CommandEnvelope, CommandOutcome};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::sync::CancellationToken;

use super::config::has_glob;
use super::{CANCEL_COMMAND, CommandsConfig, Refusal, valid_command_id};

/// Bytes of a command's output reported in its outcome (the last ones).
pub const OUTPUT_TAIL_BYTES: usize = 4096;
/// Largest `collect-diagnostics` report.
pub const DIAGNOSTICS_MAX_BYTES: usize = 64 * 1024;
/// Time allowed for `systemctl restart` / `docker restart`.
pub const RESTART_TIMEOUT: Duration = Duration::from_secs(120);
/// Time allowed for each program of `collect-diagnostics`.
const DIAGNOSTIC_STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long output is still read after a program exited (a background child may hold the pipe).
const DRAIN_GRACE: Duration = Duration::from_secs(1);
/// PATH given to hooks, which otherwise start with an empty environment.
const HOOK_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// One program to run, decided by [`Executor::plan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// The program (resolved through PATH unless absolute).
    pub program: PathBuf,
    /// Its arguments, each one `argv` entry.
    pub args: Vec<String>,
    /// Start from an empty environment (PATH and LANG only) plus `env`.
    pub clean_env: bool,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Killed (with its process group) after this.
    pub timeout: Duration,
}

/// What a verified envelope will do on this agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Run one program; the outcome carries its exit status and output tail.
    Run(Invocation),
    /// Collect the bounded diagnostics report.
    Diagnostics,
    /// Never run command `target`, and stop it if it is running ([`Executor::cancel`]).
    Cancel {
        /// The id of the command to cancel.
        target: String,
    },
}

/// Runs verified envelopes that this agent's `[commands]` config allows.
///
/// Clones share the set of commands running now, so any clone can cancel them.
#[derive(Debug, Clone)]
pub struct Executor {
    config: CommandsConfig,
    chain_data_path: PathBuf,
    running: Arc<Mutex<HashMap<String, Running>>>,
}

/// A command between [`Executor::execute`] and its outcome.
#[derive(Debug)]
struct Running {
    /// Cancelled by [`Executor::cancel`]; its process group is then killed.
    stop: CancellationToken,
    /// The id of the `cancel-command` that stopped it.
    cancelled_by: Option<String>,
}

/// Keeps a command in [`Executor`]'s running set until dropped.
#[derive(Debug)]
struct Registration {
    running: Arc<Mutex<HashMap<String, Running>>>,
    command_id: String,
    stop: CancellationToken,
}

impl Registration {
    /// The `cancel-command` that stopped this command, if one did.
    fn cancelled_by(&self) -> Option<String> {
        lock(&self.running)
            .get(&self.command_id)
            .and_then(|r| r.cancelled_by.clone())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.running).remove(&self.command_id);
    }
}

/// Locks the running set; a poisoned lock (a panic mid-update) still holds consistent data.
fn lock(
    running: &Mutex<HashMap<String, Running>>,
) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
    running
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Executor {
    /// An executor for `config`; `chain_data_path` is the folder `df` reports in diagnostics.
    pub fn new(config: CommandsConfig, chain_data_path: PathBuf) -> Self {
        Self {
            config,
            chain_data_path,
            running: Arc::default(),
        }
    }

    /// Decides what `envelope` does here, without doing it. `cancel-command` needs no
    /// allow-list entry (it can only make the agent do less), only commands enabled.
    ///
    /// # Errors
    /// [`Refusal::ActionNotAllowed`] for an unknown action, a target not in the allow-list or
    /// commands disabled; [`Refusal::Malformed`] for a missing or unusable parameter.
    pub fn plan(&self, envelope: &CommandEnvelope) -> Result<Plan, Refusal> {
        if !self.config.enabled {
            return Err(Refusal::ActionNotAllowed(
                "commands.enabled is false on this agent".to_owned(),
            ));
        }
        let param = |name: &str| {
            envelope
                .parameters
                .get(name)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| {
                    Refusal::Malformed(format!(
                        "action {} needs the parameter {name:?}",
                        envelope.action
                    ))
                })
        };
        let allowed = |list: &[String], name: &str, field: &str| {
            if list.iter().any(|n| n == name) {
                Ok(())
            } else {
                Err(Refusal::ActionNotAllowed(format!(
                    "{name:?} is not in {field} ({})",
                    if list.is_empty() {
                        "empty".to_owned()
                    } else {
                        list.join(", ")
                    }
                )))
            }
        };
        match envelope.action.as_str() {
            "restart-unit" => {
                let unit = exact_name(param("unit")?, "unit")?;
                allowed(&self.config.allowed_units, unit, "commands.allowed_units")?;
                Ok(Plan::Run(Invocation {
                    program: PathBuf::from("systemctl"),
                    args: vec!["restart".to_owned(), unit.clone()],
                    clean_env: false,
                    env: Vec::new(),
                    timeout: RESTART_TIMEOUT,
                }))
            }
            "restart-container" => {
                let name = exact_name(param("container")?, "container")?;
                allowed(
                    &self.config.allowed_containers,
                    name,
                    "commands.allowed_containers",
                )?;
                Ok(Plan::Run(Invocation {
                    program: PathBuf::from(&self.config.container_runtime),
                    args: vec!["restart".to_owned(), name.clone()],
                    clean_env: false,
                    env: Vec::new(),
                    timeout: RESTART_TIMEOUT,
                }))
            }
            "run-hook" => {
                let hook = param("hook")?;
                let Some(script) = self.config.hooks.get(hook.as_str()) else {
                    let names: Vec<&str> = self.config.hooks.keys().map(String::as_str).collect();
                    return Err(Refusal::ActionNotAllowed(format!(
                        "hook {hook:?} is not in commands.hooks ({})",
                        if names.is_empty() {
                            "empty".to_owned()
                        } else {
                            names.join(", ")
                        }
                    )));
                };
                let mut env = vec![
                    (
                        "GUARDIAN_COMMAND_ID".to_owned(),
                        envelope.command_id.clone(),
                    ),
                    ("GUARDIAN_NODE_ID".to_owned(), envelope.node_id.clone()),
                ];
                let mut keys: Vec<&String> = envelope.parameters.keys().collect();
                keys.sort();
                // Keys that differ only in case would set the same variable, one value lost.
                let mut names: HashMap<String, &String> = HashMap::new();
                for key in keys {
                    let value = &envelope.parameters[key];
                    if key.is_empty()
                        || key.len() > 64
                        || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                    {
                        return Err(Refusal::Malformed(format!(
                            "parameter key {key:?} cannot be an environment variable name (A-Z, a-z, 0-9, '_')"
                        )));
                    }
                    if value.contains('\0') {
                        return Err(Refusal::Malformed(format!(
                            "parameter {key:?} holds a NUL byte"
                        )));
                    }
                    let name = format!("GUARDIAN_PARAM_{}", key.to_ascii_uppercase());
                    if let Some(other) = names.insert(name.clone(), key) {
                        return Err(Refusal::Malformed(format!(
                            "parameter keys {other:?} and {key:?} both become {name}; keys must differ in more than case"
                        )));
                    }
                    env.push((name, value.clone()));
                }
                Ok(Plan::Run(Invocation {
                    program: script.clone(),
                    args: Vec::new(),
                    clean_env: true,
                    env,
                    timeout: Duration::from_millis(self.config.hook_timeout_ms),
                }))
            }
            "collect-diagnostics" => Ok(Plan::Diagnostics),
            CANCEL_COMMAND => {
                let target = param("command_id")?;
                if !valid_command_id(target) {
                    return Err(Refusal::Malformed(format!(
                        "parameter \"command_id\" {target:?} is not 1 to 64 characters of A-Z, a-z, 0-9, '-', '_'"
                    )));
                }
                if *target == envelope.command_id {
                    return Err(Refusal::Malformed(
                        "a cancel-command cannot cancel itself".to_owned(),
                    ));
                }
                Ok(Plan::Cancel {
                    target: target.clone(),
                })
            }
            other => Err(Refusal::ActionNotAllowed(format!(
                "unknown action {other:?} (this agent knows restart-unit, restart-container, run-hook, collect-diagnostics, cancel-command)"
            ))),
        }
    }

    /// Plans and runs `envelope` (already verified), and reports what happened. A refused
    /// plan becomes a refused outcome. Logs `CommandExecuted` or `CommandRefused`.
    ///
    /// # Guarantees
    /// The command counts as running from the moment `execute` is called, before the future
    /// is first polled, so a [`Executor::cancel`] handled right after spawning it stops it.
    /// A stopped command fails with a detail that starts `cancelled by command <id>`.
    /// A `cancel-command` is refused here (malformed): it goes to [`Executor::cancel`].
    pub fn execute(
        &self,
        envelope: &CommandEnvelope,
    ) -> impl Future<Output = CommandOutcome> + Send + 'static {
        let stop = CancellationToken::new();
        lock(&self.running).insert(
            envelope.command_id.clone(),
            Running {
                stop: stop.clone(),
                cancelled_by: None,
            },
        );
        let registration = Registration {
            running: Arc::clone(&self.running),
            command_id: envelope.command_id.clone(),
            stop,
        };
        let executor = self.clone();
        let envelope = envelope.clone();
        async move { executor.run(&envelope, registration).await }
    }

    async fn run(&self, envelope: &CommandEnvelope, registration: Registration) -> CommandOutcome {
        let refused = |refusal: Refusal| {
            tracing::warn!(
                kind = refusal.kind(),
                command_id = envelope.command_id,
                action = envelope.action,
                "CommandRefused: {refusal}"
            );
            refusal.outcome(&envelope.command_id)
        };
        let plan = match self.plan(envelope) {
            Ok(plan) => plan,
            Err(refusal) => return refused(refusal),
        };
        let stop = &registration.stop;
        let (succeeded, detail) = match plan {
            Plan::Run(invocation) => {
                let ran = run_bounded(&invocation, OUTPUT_TAIL_BYTES, stop).await;
                (ran.succeeded(), ran.describe())
            }
            Plan::Diagnostics => (true, self.diagnostics(stop).await),
            Plan::Cancel { .. } => {
                return refused(Refusal::Malformed(
                    "cancel-command must be answered by Executor::cancel, which records its target as seen".to_owned(),
                ));
            }
        };
        let cancelled_by = registration.cancelled_by();
        let (succeeded, detail) = match &cancelled_by {
            Some(by) => (false, format!("cancelled by command {by}; {detail}")),
            None => (succeeded, detail),
        };
        tracing::info!(
            command_id = envelope.command_id,
            action = envelope.action,
            succeeded,
            cancelled_by,
            "CommandExecuted"
        );
        CommandOutcome {
            command_id: envelope.command_id.clone(),
            succeeded,
            detail,
            refused: String::new(),
        }
    }

    /// Stops `target` if it is running (first cancel wins); returns whether it was.
    pub(super) fn stop(&self, target: &str, by: &str) -> bool {
        let mut running = lock(&self.running);
        let Some(command) = running.get_mut(target) else {
            return false;
        };
        command.cancelled_by.get_or_insert_with(|| by.to_owned());
        command.stop.cancel();
        true
    }

    /// uname, uptime, df of the chain data, memory, and the status of every allowed unit and
    /// container; each step bounded in time and output, the whole at most
    /// [`DIAGNOSTICS_MAX_BYTES`].
    /// Stops after the current step once `stop` is cancelled.
    async fn diagnostics(&self, stop: &CancellationToken) -> String {
        let chain = self.chain_data_path.display().to_string();
        let mut steps: Vec<(String, Vec<String>)> = vec![
            ("uname".into(), vec!["-a".into()]),
            ("uptime".into(), vec![]),
            ("df".into(), vec!["-h".into(), chain]),
            ("free".into(), vec!["-m".into()]),
        ];
        for unit in &self.config.allowed_units {
            steps.push((
                "systemctl".into(),
                vec![
                    "status".into(),
                    "--no-pager".into(),
                    "--lines=20".into(),
                    unit.clone(),
                ],
            ));
        }
        if !self.config.allowed_containers.is_empty() {
            steps.push((
                self.config.container_runtime.clone(),
                vec!["ps".into(), "--all".into()],
            ));
        }
        let mut report = String::new();
        for (program, args) in steps {
            if report.len() >= DIAGNOSTICS_MAX_BYTES || stop.is_cancelled() {
                break;
            }
            let invocation = Invocation {
                program: PathBuf::from(&program),
                args: args.clone(),
                clean_env: false,
                env: Vec::new(),
                timeout: DIAGNOSTIC_STEP_TIMEOUT,
            };
            let ran = run_bounded(&invocation, 8 * 1024, stop).await;
            report.push_str(&format!("== {program} {} ==\n", args.join(" ")));
            report.push_str(&ran.describe());
            report.push('\n');
        }
        if report.len() > DIAGNOSTICS_MAX_BYTES {
            // Says so, within the bound: the operator must not mistake a cut report for all
            // there was.
            let marker = format!(
                "\n[diagnostics truncated at {DIAGNOSTICS_MAX_BYTES} of {} bytes; later steps not run]\n",
                report.len()
            );
            truncate_at_char(&mut report, DIAGNOSTICS_MAX_BYTES - marker.len());
            report.push_str(&marker);
        }
        report
    }
}

/// `name`, the value of parameter `key`, if it names one unit or container exactly. Checked
/// although the allow-lists refuse patterns: an [`Executor`] may be built from a config that
/// was never validated.
///
/// # Errors
/// [`Refusal::Malformed`] when it holds a glob character, which `systemctl` would expand.
fn exact_name<'e>(name: &'e String, key: &str) -> Result<&'e String, Refusal> {
    if has_glob(name) {
        return Err(Refusal::Malformed(format!(
            "parameter {key:?} {name:?} holds a glob character ('*', '?', '[', ']' or '\\'), which systemctl would expand to every match; name one {key} exactly"
        )));
    }
    Ok(name)
}

fn truncate_at_char(text: &mut String, max: usize) {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
}

/// What one bounded run produced.
#[derive(Debug)]
struct Ran {
    program: PathBuf,
    status: Option<ExitStatus>,
    start_error: Option<String>,
    timed_out: Option<Duration>,
    /// Killed (or never started) because the command was cancelled.
    stopped: bool,
    elapsed: Duration,
    tail: Tail,
}

impl Ran {
    fn succeeded(&self) -> bool {
        !self.stopped && self.timed_out.is_none() && self.status.is_some_and(|s| s.success())
    }

    fn describe(&self) -> String {
        let program = self.program.display();
        let head = if let Some(error) = &self.start_error {
            format!("could not start {program}: {error}")
        } else if self.stopped {
            format!(
                "{program} killed after {} ms: the command was cancelled",
                self.elapsed.as_millis()
            )
        } else if let Some(timeout) = self.timed_out {
            format!(
                "{program} killed after its timeout of {} ms",
                timeout.as_millis()
            )
        } else if let Some(status) = self.status {
            format!(
                "{program} exited with {status} after {} ms",
                self.elapsed.as_millis()
            )
        } else {
            format!("{program}: exit status unknown")
        };
        if self.tail.total == 0 {
            return format!("{head}; no output");
        }
        let text = String::from_utf8_lossy(&self.tail.bytes);
        if self.tail.total > self.tail.bytes.len() as u64 {
            format!(
                "{head}; last {} of {} output bytes:\n{text}",
                self.tail.bytes.len(),
                self.tail.total
            )
        } else {
            format!("{head}; output:\n{text}")
        }
    }
}

/// The last `keep` bytes of a stream, and how many there were in all.
#[derive(Debug)]
struct Tail {
    keep: usize,
    bytes: Vec<u8>,
    total: u64,
}

impl Tail {
    fn push(&mut self, chunk: &[u8]) {
        self.total += chunk.len() as u64;
        self.bytes.extend_from_slice(chunk);
        if self.bytes.len() > self.keep {
            let excess = self.bytes.len() - self.keep;
            self.bytes.drain(..excess);
        }
    }
}

/// Reads from `reader` if there is one; pends forever once it is gone.
async fn read_some<R: AsyncRead + Unpin>(reader: &mut Option<R>, buf: &mut [u8]) -> usize {
    match reader {
        Some(r) => r.read(buf).await.unwrap_or(0),
        None => std::future::pending().await,
    }
}

/// How a bounded run ended.
enum End {
    Exited,
    TimedOut,
    Stopped,
}

/// Runs `invocation` in its own process group, keeping the last `keep` bytes of stdout and
/// stderr (interleaved as they arrive); kills the group when the timeout passes or `stop` is
/// cancelled (and does not start it if `stop` already is).
async fn run_bounded(invocation: &Invocation, keep: usize, stop: &CancellationToken) -> Ran {
    let started = Instant::now();
    let mut ran = Ran {
        program: invocation.program.clone(),
        status: None,
        start_error: None,
        timed_out: None,
        stopped: false,
        elapsed: Duration::ZERO,
        tail: Tail {
            keep,
            bytes: Vec::new(),
            total: 0,
        },
    };
    let mut cmd = tokio::process::Command::new(&invocation.program);
    cmd.args(&invocation.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    if invocation.clean_env {
        cmd.env_clear().env("PATH", HOOK_PATH).env("LANG", "C");
    }
    cmd.envs(invocation.env.iter().map(|(k, v)| (k, v)));
    if stop.is_cancelled() {
        ran.stopped = true;
        ran.start_error = Some("the command was cancelled before it started".to_owned());
        return ran;
    }
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(error) => {
            ran.start_error = Some(error.to_string());
            return ran;
        }
    };
    let pid = child.id();
    let (mut stdout, mut stderr) = (child.stdout.take(), child.stderr.take());
    let tail = &mut ran.tail;
    let mut status = None;
    let io = tokio::time::timeout(invocation.timeout, async {
        let (mut out_buf, mut err_buf) = (vec![0u8; 8192], vec![0u8; 8192]);
        let mut drain_until = None;
        loop {
            if stdout.is_none() && stderr.is_none() && status.is_some() {
                return;
            }
            let drain_deadline = drain_until.unwrap_or_else(|| {
                tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600)
            });
            tokio::select! {
                n = read_some(&mut stdout, &mut out_buf) => {
                    if n == 0 { stdout = None } else { tail.push(&out_buf[..n]) }
                }
                n = read_some(&mut stderr, &mut err_buf) => {
                    if n == 0 { stderr = None } else { tail.push(&err_buf[..n]) }
                }
                exited = child.wait(), if status.is_none() => {
                    status = Some(exited);
                    drain_until = Some(tokio::time::Instant::now() + DRAIN_GRACE);
                }
                () = tokio::time::sleep_until(drain_deadline), if drain_until.is_some() => return,
            }
        }
    });
    let end = tokio::select! {
        finished = io => if finished.is_ok() { End::Exited } else { End::TimedOut },
        () = stop.cancelled() => End::Stopped,
    };
    match end {
        End::Exited => {}
        End::TimedOut => ran.timed_out = Some(invocation.timeout),
        End::Stopped => ran.stopped = true,
    }
    if !matches!(end, End::Exited) {
        if let Some(pid) = pid {
            // The whole group: a hook's children (sleep, rsync, ...) must not outlive it.
            let _ = tokio::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await;
        }
        let _ = child.start_kill();
        status = tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .ok();
    }
    ran.status = status.and_then(Result::ok);
    ran.elapsed = started.elapsed();
    ran
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::tests::{NOW, envelope};

    #[tokio::test]
    async fn command_cancelled_before_it_starts_never_starts() {
        let executor = Executor::new(
            CommandsConfig {
                enabled: true,
                hooks: [("h".to_owned(), PathBuf::from("/bin/true"))].into(),
                ..CommandsConfig::default()
            },
            PathBuf::from("/"),
        );
        let mut hook = envelope("h1", "val-1", NOW, NOW + 60_000);
        hook.action = "run-hook".to_owned();
        hook.parameters = [("hook".to_owned(), "h".to_owned())].into();
        // Registered as running by execute() itself, before the future is polled.
        let run = executor.execute(&hook);
        assert!(executor.stop("h1", "x9"));
        let outcome = run.await;
        assert!(!outcome.succeeded);
        assert!(
            outcome
                .detail
                .starts_with("cancelled by command x9; could not start /bin/true: the command was cancelled before it started"),
            "{}",
            outcome.detail
        );
        assert!(
            !executor.stop("h1", "x9"),
            "finished commands leave the running set"
        );
    }

    #[test]
    fn command_plans_follow_the_allow_lists() {
        let config = CommandsConfig {
            enabled: true,
            allowed_units: vec!["subtensor.service".into()],
            allowed_containers: vec!["validator".into()],
            container_runtime: "podman".into(),
            hooks: [("restore".to_owned(), PathBuf::from("/opt/restore.sh"))].into(),
            hook_timeout_ms: 1000,
            ..CommandsConfig::default()
        };
        let executor = Executor::new(config.clone(), PathBuf::from("/"));
        let with = |action: &str, params: &[(&str, &str)]| {
            let mut e = envelope("c1", "val-1", NOW, NOW + 1000);
            e.action = action.to_owned();
            e.parameters = params
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            executor.plan(&e)
        };
        let Ok(Plan::Run(unit)) = with("restart-unit", &[("unit", "subtensor.service")]) else {
            panic!("restart-unit must plan a run");
        };
        assert_eq!(
            (unit.program.as_os_str(), unit.args.as_slice()),
            (
                "systemctl".as_ref(),
                ["restart".to_owned(), "subtensor.service".to_owned()].as_slice()
            )
        );
        let Ok(Plan::Run(container)) = with("restart-container", &[("container", "validator")])
        else {
            panic!("restart-container must plan a run");
        };
        assert_eq!(container.program, PathBuf::from("podman"));
        let Ok(Plan::Run(hook)) = with("run-hook", &[("hook", "restore"), ("snapshot", "s1")])
        else {
            panic!("run-hook must plan a run");
        };
        assert!(hook.clean_env && hook.args.is_empty());
        assert!(
            hook.env
                .contains(&("GUARDIAN_PARAM_SNAPSHOT".to_owned(), "s1".to_owned()))
        );
        let kind = |r: Result<Plan, Refusal>| r.expect_err("refused").kind();
        assert_eq!(
            kind(with("restart-unit", &[("unit", "sshd.service")])),
            "action_not_allowed"
        );
        assert_eq!(
            kind(with("restart-container", &[("container", "other")])),
            "action_not_allowed"
        );
        assert_eq!(
            kind(with("run-hook", &[("hook", "wipe")])),
            "action_not_allowed"
        );
        assert_eq!(kind(with("reboot", &[])), "action_not_allowed");
        assert_eq!(kind(with("restart-unit", &[])), "malformed");
        // cancel-command needs no allow-list entry, only a usable command_id.
        assert_eq!(
            with(CANCEL_COMMAND, &[("command_id", "t1")]),
            Ok(Plan::Cancel {
                target: "t1".to_owned()
            })
        );
        for params in [&[][..], &[("command_id", "")], &[("command_id", "a b")]] {
            assert_eq!(
                kind(with(CANCEL_COMMAND, params)),
                "malformed",
                "{params:?}"
            );
        }
        assert_eq!(
            kind(with(CANCEL_COMMAND, &[("command_id", "c1")])),
            "malformed",
            "a cancel cannot cancel itself"
        );
        assert_eq!(
            kind(with("run-hook", &[("hook", "restore"), ("a=b", "1")])),
            "malformed"
        );
        let disabled = Executor::new(
            CommandsConfig {
                enabled: false,
                ..config
            },
            PathBuf::from("/"),
        );
        assert_eq!(
            kind(disabled.plan(&envelope("c2", "val-1", NOW, NOW + 1))),
            "action_not_allowed"
        );
    }

    fn shell(script: &str) -> Invocation {
        Invocation {
            program: PathBuf::from("sh"),
            args: vec!["-c".into(), script.into()],
            clean_env: false,
            env: Vec::new(),
            timeout: Duration::from_secs(10),
        }
    }

    #[tokio::test]
    async fn command_output_is_bounded_to_its_tail() {
        let long = shell("i=0; while [ $i -lt 2000 ]; do echo line-$i; i=$((i+1)); done; exit 3");
        let ran = run_bounded(&long, OUTPUT_TAIL_BYTES, &CancellationToken::new()).await;
        assert!(!ran.succeeded());
        assert_eq!(ran.tail.bytes.len(), OUTPUT_TAIL_BYTES);
        let detail = ran.describe();
        assert!(detail.contains("exit status: 3"), "{detail}");
        assert!(detail.contains("line-1999"), "{detail}");
        assert!(!detail.contains("line-0\n"), "{detail}");
        // Standard error is kept too. (The two pipes are read concurrently, so which of
        // them comes last in the tail is not fixed: it is checked on a run of its own.)
        let failing = shell("echo starting; echo oops >&2; exit 3");
        let ran = run_bounded(&failing, OUTPUT_TAIL_BYTES, &CancellationToken::new()).await;
        let detail = ran.describe();
        assert!(
            detail.contains("oops") && detail.contains("starting"),
            "{detail}"
        );
    }

    fn planned(
        executor: &Executor,
        action: &str,
        params: &[(&str, &str)],
    ) -> Result<Plan, Refusal> {
        let mut e = envelope("c1", "val-1", NOW, NOW + 1000);
        e.action = action.to_owned();
        e.parameters = params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        executor.plan(&e)
    }

    #[test]
    fn a_unit_or_container_with_a_glob_character_is_refused_even_if_listed() {
        // Built without CommandsConfig::validate, which would refuse these entries.
        let globs = ["*", "sub*.service", "node?", "node[12]", "a\\x2d"];
        let executor = Executor::new(
            CommandsConfig {
                enabled: true,
                allowed_units: globs.iter().map(|g| (*g).to_owned()).collect(),
                allowed_containers: globs.iter().map(|g| (*g).to_owned()).collect(),
                ..CommandsConfig::default()
            },
            PathBuf::from("/"),
        );
        for glob in globs {
            for (action, key) in [("restart-unit", "unit"), ("restart-container", "container")] {
                let refused = planned(&executor, action, &[(key, glob)]).expect_err(glob);
                assert_eq!(refused.kind(), "malformed", "{action} {glob}");
                assert!(refused.to_string().contains("glob"), "{refused}");
            }
        }
    }

    #[test]
    fn hook_parameters_whose_keys_differ_only_in_case_are_refused() {
        let executor = Executor::new(
            CommandsConfig {
                enabled: true,
                hooks: [("restore".to_owned(), PathBuf::from("/opt/restore.sh"))].into(),
                ..CommandsConfig::default()
            },
            PathBuf::from("/"),
        );
        for params in [
            &[("hook", "restore"), ("snapshot", "s1"), ("SNAPSHOT", "s2")][..],
            &[("hook", "restore"), ("Hook", "other")],
        ] {
            let refused = planned(&executor, "run-hook", params).expect_err("collision");
            assert_eq!(refused.kind(), "malformed", "{params:?}");
            assert!(refused.to_string().contains("GUARDIAN_PARAM_"), "{refused}");
        }
        planned(
            &executor,
            "run-hook",
            &[("hook", "restore"), ("snapshot", "s1")],
        )
        .expect("distinct keys");
    }
}
