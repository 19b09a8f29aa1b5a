//! `guardian-server`: loads and checks the configuration, binds the sockets, traps signals,
//! and hands over to [`guardian_server::run`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use figment::Figment;
use figment::providers::Serialized;
use guardian_server::config::{EXIT_CONFIG, ServerConfig};
use guardian_server::store::Ledger;
use guardian_server::{Listeners, run};

/// mimalloc instead of glibc's malloc: under ingest load the server spent ~25 % of its CPU in
/// glibc's allocator (arena lock waits, consolidation); see BENCHMARKS.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long mimalloc keeps freed memory before returning it to the kernel, in ms (its own
/// default is 1 s). Ingest frees and reallocates the same buffers all the time; returning them
/// each second cost ~0.37 page faults per sample (each one zeroing a fresh page), 20 s cost
/// 0.19 and ~10 % less server CPU per sample (BENCHMARKS.md). Memory freed after a burst
/// still goes back, 20 s later. `MIMALLOC_PURGE_DELAY` in the environment overrides it.
const ALLOCATOR_PURGE_DELAY_MS: std::ffi::c_long = 20_000;

// Documented exception to the workspace's `unsafe_code` lint: mimalloc has no safe Rust API for
// its options, and its environment variable is read before `main` runs.
#[allow(unsafe_code)]
unsafe extern "C" {
    /// mimalloc's `mi_option_set` (linked in by `libmimalloc-sys`).
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// Sets [`ALLOCATOR_PURGE_DELAY_MS`] unless the operator chose one.
#[allow(unsafe_code)]
fn tune_allocator() {
    /// `mi_option_purge_delay` in `mi_option_t` (the same position in mimalloc v2 and v3).
    const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: plain C call setting an integer option; mimalloc reads options atomically.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, ALLOCATOR_PURGE_DELAY_MS) };
    }
}
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// TaoNode Guardian control server: accepts agents over mTLS gRPC, stores their samples,
/// serves the Fleet API, and exposes /metrics, /healthz and /readyz on the admin port.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// TOML configuration file (see --print-config for every field and its default).
    #[arg(long, short, env = "GUARDIAN_SERVER_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration and exit: 0 when valid, 64 with the field and the fix when not.
    #[arg(long)]
    check_config: bool,
    /// Print the effective configuration (defaults included, documented) and exit.
    #[arg(long)]
    print_config: bool,
    /// Overrides `listen` (mTLS gRPC address).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Overrides `admin_listen` (HTTP admin address).
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// Overrides `ledger_url` (sqlite://PATH or postgres://...).
    #[arg(long)]
    ledger_url: Option<String>,
}

/// Flags that override configuration fields; unset flags override nothing.
#[derive(Serialize)]
struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    admin_listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ledger_url: Option<String>,
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    let overrides = Figment::from(Serialized::defaults(Overrides {
        listen: cli.listen,
        admin_listen: cli.admin_listen,
        ledger_url: cli.ledger_url.clone(),
    }));
    let config = match ServerConfig::load(cli.config.as_deref(), overrides) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("guardian-server: {error}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    if cli.print_config {
        print!("{}", config.documented_toml());
        return ExitCode::SUCCESS;
    }
    if let Err(error) = config.validate() {
        eprintln!("guardian-server: {error}");
        return ExitCode::from(EXIT_CONFIG as u8);
    }
    if cli.check_config {
        println!("guardian-server: configuration is valid");
        return ExitCode::SUCCESS;
    }
    // GUARDIAN_LOG_FORMAT=json: one JSON object a line (timestamp, level, target, the event's
    // fields flattened, its spans), for log pipelines; text (the default) otherwise.
    let json = match std::env::var("GUARDIAN_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text" | "") | Err(_) => false,
        Ok(other) => {
            eprintln!(
                "guardian-server: GUARDIAN_LOG_FORMAT={other:?} is not a log format: use text or json"
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
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.worker_threads > 0 {
        runtime.worker_threads(config.worker_threads);
    }
    let runtime = match runtime.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("guardian-server: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("guardian-server: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: ServerConfig) -> anyhow::Result<()> {
    // Migrations first: "listening" means ready.
    let ledger = Ledger::open(&config.ledger_url).await?;
    // One server per ledger: a second one stops here, naming the holder, before it listens;
    // with `standby = true` it waits here instead and takes over when the holder stops.
    let Some(mut ledger_lock) = take_ledger(&ledger, &config).await? else {
        return Ok(());
    };
    guardian_server::fence::acquired(guardian_server::unix_ms());
    if let Some(term) = guardian_server::fence::term() {
        tracing::info!(
            leader = term.leader,
            term = term.term,
            "LedgerTaken: this server acts on the ledger"
        );
    }
    let grpc = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot bind listen = {}", config.listen))?;
    let admin = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("cannot bind admin_listen = {}", config.admin_listen))?;
    let analysis = bind_optional("analysis.listen", config.analysis.validate()).await?;
    let web = bind_optional("web.listen", config.web.validate()).await?;
    // One stdout line that scripts and tests wait for; ports are the bound ones (port 0 works).
    let mut optional = String::new();
    if let Some(listener) = &analysis {
        optional.push_str(&format!(" analysis={}", listener.local_addr()?));
    }
    if let Some(listener) = &web {
        optional.push_str(&format!(" web={}", listener.local_addr()?));
    }
    println!(
        "guardian-server listening grpc={} admin={}{optional}",
        grpc.local_addr()?,
        admin.local_addr()?
    );
    let shutdown = CancellationToken::new();
    let server = run(
        Listeners {
            grpc,
            admin,
            analysis,
            web,
        },
        config,
        ledger,
        shutdown.clone(),
    );
    tokio::pin!(server);
    // Fencing: the lock is checked every second; once lost, nothing more is acted on
    // (`fence::deposed`) and the server stops, so that its supervisor starts it as a standby.
    let fencing = async {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if !ledger_lock.still_held(Duration::from_secs(2)).await {
                guardian_server::fence::deposed();
                tracing::error!(
                    "LedgerLockLost: another server may act now; this one stops acting and shuts down"
                );
                return;
            }
        }
    };
    tokio::select! {
        outcome = &mut server => outcome?,
        () = wait_for_signal() => {
            tracing::info!("shutdown requested; draining streams");
            shutdown.cancel();
            server.await?;
        }
        () = fencing => {
            // No draining: a deposed server must stop ingesting and serving at once (its
            // agents reconnect to the new leader).
            shutdown.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
            anyhow::bail!("lost the ledger's lock (another server took over): stopped");
        }
    }
    Ok(())
}

/// Takes the ledger's lock. As a `standby`, waits while another server holds it, with the
/// admin port answering (alive, not ready); `None` when a stop signal came first.
async fn take_ledger(
    ledger: &Ledger,
    config: &ServerConfig,
) -> anyhow::Result<Option<guardian_server::store::lock::ServerLock>> {
    if !config.standby {
        return Ok(Some(ledger.lock_for_server().await?));
    }
    let holder = match ledger.lock_for_server().await {
        Ok(lock) => return Ok(Some(lock)),
        Err(guardian_server::store::StoreError::Locked { holder, .. }) => holder,
        Err(error) => return Err(error.into()),
    };
    tracing::info!(
        holder,
        "Standby: another server holds the ledger; taking over when it stops"
    );
    let admin = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("cannot bind admin_listen = {}", config.admin_listen))?;
    let stop_admin = CancellationToken::new();
    let standby_admin = tokio::spawn(
        axum::serve(admin, guardian_server::api::standby_router())
            .with_graceful_shutdown(stop_admin.clone().cancelled_owned())
            .into_future(),
    );
    let taken = wait_for_ledger(ledger).await;
    stop_admin.cancel();
    let _ = standby_admin.await;
    taken
}

/// Tries the ledger's lock every second until it is taken (`None`: a stop signal came
/// first), logging `Standby` every minute.
async fn wait_for_ledger(
    ledger: &Ledger,
) -> anyhow::Result<Option<guardian_server::store::lock::ServerLock>> {
    let signal = wait_for_signal();
    tokio::pin!(signal);
    let mut logged = std::time::Instant::now();
    loop {
        tokio::select! {
            () = &mut signal => return Ok(None),
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        match ledger.lock_for_server().await {
            Ok(lock) => return Ok(Some(lock)),
            Err(guardian_server::store::StoreError::Locked { holder, .. }) => {
                if logged.elapsed() >= Duration::from_secs(60) {
                    logged = std::time::Instant::now();
                    tracing::info!(holder, "Standby: still waiting for the ledger");
                }
            }
            Err(error) => return Err(error.into()),
        }
    }
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

/// Binds an optional HTTPS listener whose settings were validated (with the config) already.
async fn bind_optional<E>(
    field: &str,
    address: Result<Option<std::net::SocketAddr>, E>,
) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    match address.ok().flatten() {
        Some(address) => Ok(Some(
            tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("cannot bind {field} = {address}"))?,
        )),
        None => Ok(None),
    }
}
