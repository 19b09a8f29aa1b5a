//! `guardian-agent`: loads and checks the configuration, traps signals, and runs
//! [`guardian_agent::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use figment::Figment;
use figment::providers::Serialized;
use guardian_agent::config::{AgentConfig, EXIT_CONFIG};
use guardian_agent::spool::Spool;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// TaoNode Guardian agent: samples this validator host and streams it to the server over mTLS.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// TOML configuration file (see --print-config for every field and its default).
    #[arg(long, short, env = "GUARDIAN_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration and exit: 0 when valid, 64 with the field and the fix when not.
    #[arg(long)]
    check_config: bool,
    /// Print the effective configuration (defaults included, documented) and exit.
    #[arg(long)]
    print_config: bool,
    /// Overrides `node_id`.
    #[arg(long)]
    node_id: Option<String>,
    /// Overrides `server_url`.
    #[arg(long)]
    server_url: Option<String>,
    /// Overrides `sample_interval_ms`.
    #[arg(long)]
    sample_interval_ms: Option<u64>,
    /// Overrides `chain_data_path`.
    #[arg(long)]
    chain_data_path: Option<PathBuf>,
}

/// Flags that override configuration fields; unset flags override nothing.
#[derive(Serialize)]
struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    node_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    server_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sample_interval_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    chain_data_path: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let overrides = Figment::from(Serialized::defaults(Overrides {
        node_id: cli.node_id.clone(),
        server_url: cli.server_url.clone(),
        sample_interval_ms: cli.sample_interval_ms,
        chain_data_path: cli.chain_data_path.clone(),
    }));
    let config = match AgentConfig::load(cli.config.as_deref(), overrides) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("guardian-agent: {error}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    if cli.print_config {
        print!("{}", config.documented_toml());
        return ExitCode::SUCCESS;
    }
    if let Err(error) = config.validate() {
        eprintln!("guardian-agent: {error}");
        return ExitCode::from(EXIT_CONFIG as u8);
    }
    if cli.check_config {
        println!("guardian-agent: configuration is valid");
        return ExitCode::SUCCESS;
    }
    // GUARDIAN_LOG_FORMAT=json: one JSON object a line (timestamp, level, target, the event's
    // fields flattened, its spans), for log pipelines; text (the default) otherwise.
    let json = match std::env::var("GUARDIAN_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text" | "") | Err(_) => false,
        Ok(other) => {
            eprintln!(
                "guardian-agent: GUARDIAN_LOG_FORMAT={other:?} is not a log format: use text or json"
            );
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("GUARDIAN_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr);
    if json {
        logs.json()
            .flatten_event(true)
            .with_current_span(true)
            .init();
    } else {
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    // Opened before anything runs: without a spool no batch could be kept, and a second
    // agent on the same folder would corrupt the numbering. Exit 1 (not 64): the config is
    // valid, the folder is unusable right now (permissions, disk, another agent).
    let spool = match Spool::open(&config.spool_dir, config.spool_max_bytes) {
        Ok(spool) => spool,
        Err(error) => {
            eprintln!("guardian-agent: {error}");
            return ExitCode::FAILURE;
        }
    };
    // Remote commands: the verify key and the seen-ids file (beside the spool) must be
    // usable before anything runs, or a replayed command could run twice.
    let commands = if config.commands.enabled {
        let seen = config.spool_dir.join("commands-seen");
        match guardian_agent::command::CommandVerifier::open(
            &config.commands,
            config.node_id.clone(),
            &seen,
            guardian_agent::unix_ms(),
        ) {
            Ok(verifier) => Some(guardian_agent::uplink::RemoteCommands {
                verifier: std::sync::Mutex::new(verifier),
                executor: std::sync::Arc::new(guardian_agent::command::Executor::new(
                    config.commands.clone(),
                    config.chain_data_path.clone(),
                )),
            }),
            Err(error) => {
                eprintln!("guardian-agent: remote commands: {error}");
                return ExitCode::from(64);
            }
        }
    } else {
        None
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("guardian-agent: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tracing::info!(
            node = config.node_id,
            server = config.server_url,
            "guardian-agent starting"
        );
        let agent = guardian_agent::run(config, spool, commands, shutdown.clone());
        tokio::pin!(agent);
        tokio::select! {
            () = &mut agent => {}
            () = wait_for_signal() => {
                tracing::info!("shutdown requested");
                shutdown.cancel();
                agent.await;
            }
        }
    });
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
