//! `fake-subtensor`: runs the fake subtensor node of `guardian_tests::fake_node` as a process,
//! for the local quickstart and real-process tests. Prints one line
//! `fake-subtensor listening ws://ADDR` on stdout when ready; stops on SIGTERM or Ctrl-C.
//! Faults are switched with the `fake_*` JSON-RPC admin methods.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use guardian_tests::fake_node::{FakeNode, FakeNodeConfig, SeededValidator, ss58};

/// A fake subtensor node (legacy JSON-RPC over WebSocket and HTTP on one port).
#[derive(Debug, Parser)]
#[command(name = "fake-subtensor", version)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:9944")]
    listen: SocketAddr,
    /// Milliseconds between blocks.
    #[arg(long, default_value_t = 1000)]
    block_ms: u64,
    /// SS58 hotkey of the seeded validator (default: Alice).
    #[arg(long)]
    hotkey: Option<String>,
    /// Subnet of the seeded validator.
    #[arg(long, default_value_t = 1)]
    netuid: u16,
    /// UID of the seeded validator.
    #[arg(long, default_value_t = 0)]
    uid: u16,
    /// Best block number at start.
    #[arg(long, default_value_t = 4_000_000)]
    best: u64,
    /// Runtime spec version at start.
    #[arg(long, default_value_t = 393)]
    spec_version: u32,
    /// Peers reported when healthy.
    #[arg(long, default_value_t = 12)]
    peers: u32,
    /// The validator sets weights every N blocks (0: never; LastUpdate then only changes
    /// through `fake_setLastUpdate`).
    #[arg(long, default_value_t = 360)]
    weights_every: u64,
}

fn config(args: &Args) -> anyhow::Result<FakeNodeConfig> {
    let hotkey = match &args.hotkey {
        Some(address) => {
            let (prefix, account) = ss58::decode(address)
                .map_err(|e| anyhow::anyhow!("--hotkey {address:?} is not an SS58 address: {e}"))?;
            if prefix != ss58::BITTENSOR_PREFIX {
                tracing::warn!(prefix, "--hotkey uses an SS58 prefix other than 42");
            }
            account
        }
        None => SeededValidator::default().hotkey,
    };
    let config = FakeNodeConfig {
        listen: args.listen,
        block_interval: Duration::from_millis(args.block_ms),
        initial_best: args.best,
        peers: args.peers,
        spec_version: args.spec_version,
        validator: SeededValidator {
            hotkey,
            netuid: args.netuid,
            uid: args.uid,
            subnet_size: SeededValidator::default().subnet_size.max(args.uid + 1),
            set_weights_every: (args.weights_every > 0).then_some(args.weights_every),
            ..SeededValidator::default()
        },
    };
    config.validate()?;
    Ok(config)
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FAKE_SUBTENSOR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let config = match config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fake-subtensor: invalid arguments: {e:#}");
            return ExitCode::from(64);
        }
    };
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fake-subtensor: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: FakeNodeConfig) -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let node = FakeNode::start(config).await?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "fake-subtensor listening {}", node.ws_url())?;
        out.flush()?;
    }
    tracing::info!(addr = %node.addr(), "fake subtensor node ready");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    tracing::info!("stopping");
    node.shutdown().await
}
