//! TaoNode Guardian control server: accepts agent streams over mTLS, stores them, and
//! serves the fleet to operators.
//!
//! Modules in data-flow order: [`identity`] (who is calling, from the certificate),
//! [`ingest`] (Uplink streams -> commit -> ack), [`store`] (the sqlx ledger and embedded
//! telemetry), [`registry`] (the fleet in memory), [`api`] (Fleet gRPC + admin HTTP),
//! [`metrics`]; plus [`config`] and [`pki`] (throwaway certificates for trials and tests).

pub mod alert;
pub mod api;
pub mod batch;
pub mod command;
pub mod config;
pub mod detect;
pub mod identity;
pub mod ingest;
pub mod metrics;
pub mod pki;
pub mod read_ahead;
pub mod reconcile;
pub mod registry;
pub mod sink;
pub mod store;
pub mod window;

use std::sync::Arc;
use std::time::Duration;

use guardian_proto::v1::fleet_server::FleetServer;
use guardian_proto::wire::uplink_server::UplinkServer;
use tokio::net::TcpListener;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::config::ServerConfig;
use crate::store::Ledger;

/// HTTP/2 flow-control window per stream and per connection: what an agent may send ahead
/// of what its session has read. A session reads its next batch only after committing the
/// last one, so a few batches of prefetch are all it can use; hyper's default (1 MiB) let
/// 1 000 agents park up to 1 GiB in the server while the store was behind.
const RECEIVE_WINDOW_BYTES: u32 = 256 * 1024;
/// How long shutdown waits for sessions and watchers to finish.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);

/// Sockets bound by the caller (main.rs, or a test on port 0).
#[derive(Debug)]
pub struct Listeners {
    /// mTLS gRPC: Uplink and Fleet.
    pub grpc: TcpListener,
    /// Plain HTTP admin.
    pub admin: TcpListener,
}

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A TLS file could not be read.
    #[error("cannot read {path}: {source}")]
    ReadTls {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The ledger could not be opened.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    /// The command signing key could not be loaded.
    #[error("command signing key: {0}")]
    Command(String),
    /// The admin HTTP server failed.
    #[error("admin HTTP server failed: {0}")]
    Admin(std::io::Error),
}

/// Runs the server on the given listeners and the opened `ledger` (see [`Ledger::open`];
/// opening it first lets the caller announce readiness only once migrations are applied)
/// until `shutdown` is cancelled. Streams still open [`SHUTDOWN_DEADLINE`] after shutdown
/// began are cut.
///
/// # Errors
/// [`ServerError`] when TLS material, the ledger or a listener fails.
pub async fn run(
    listeners: Listeners,
    config: ServerConfig,
    ledger: Ledger,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|source| ServerError::ReadTls {
            path: path.display().to_string(),
            source,
        })
    };
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            read(&config.tls.cert_file)?,
            read(&config.tls.key_file)?,
        ))
        .client_ca_root(Certificate::from_pem(read(&config.tls.ca_file)?))
        .client_auth_optional(false);

    let signer = if config.command_signing_key_file.as_os_str().is_empty() {
        None
    } else {
        Some(Arc::new(
            command::CommandSigner::load(&config.command_signing_key_file)
                .map_err(|e| ServerError::Command(e.to_string()))?,
        ))
    };
    let registry = Arc::new(registry::Registry::from_stored(
        ledger.nodes().await?,
        config.window_seconds,
    ));
    rebuild_windows(&registry, &ledger, &config).await;
    let metrics = Arc::new(metrics::Metrics::default());
    metrics
        .nodes_known
        .set(i64::try_from(registry.len()).unwrap_or(i64::MAX));
    let tasks = TaskTracker::new();

    let telemetry = if config.clickhouse.enabled() {
        store::commit::Telemetry::Outbox
    } else {
        store::commit::Telemetry::Embedded
    };
    let outbox = Arc::new(store::commit::OutboxGauge::default());
    outbox.set_handoff_max_bytes(config.clickhouse.handoff_max_bytes);
    let (pending_batches, pending_bytes) = ledger.outbox_pending().await?;
    outbox
        .batches
        .store(pending_batches, std::sync::atomic::Ordering::Relaxed);
    outbox
        .bytes
        .store(pending_bytes, std::sync::atomic::Ordering::Relaxed);
    if pending_batches > 0 {
        if telemetry == store::commit::Telemetry::Outbox {
            tracing::info!(
                pending_batches,
                pending_bytes,
                "OutboxReplay: batches committed before the restart are still to be inserted into ClickHouse"
            );
        } else {
            tracing::warn!(
                pending_batches,
                "the outbox holds batches for ClickHouse but [clickhouse] url is not set; they stay there until it is"
            );
        }
    }
    let observe: store::commit::GroupObserver = {
        let metrics = Arc::clone(&metrics);
        Arc::new(move |batches, seconds| {
            metrics.commit_seconds.observe(seconds);
            metrics.commit_group_batches.observe(batches as f64);
        })
    };
    // Also with ClickHouse: rows from before it was configured expire too (with empty tables
    // a round is one index seek per node and table).
    if config.embedded_retention_days > 0 {
        tasks.spawn(store::retention::run_expiry(
            ledger.clone(),
            config.embedded_retention_days,
            store::retention::EXPIRE_EVERY,
            metrics.embedded_samples_expired.clone(),
            shutdown.clone(),
        ));
    }
    tasks.spawn(store::records::run_pruner(
        ledger.clone(),
        store::records::PRUNE_EVERY,
        shutdown.clone(),
    ));
    let committer = store::commit::Committer::spawn(
        ledger.clone(),
        telemetry,
        Arc::clone(&outbox),
        config.outbox_max_bytes,
        observe,
        &tasks,
    );
    if telemetry == store::commit::Telemetry::Outbox {
        tasks.spawn(sink::run(
            ledger.clone(),
            config.clickhouse.clone(),
            Arc::clone(&outbox),
            Arc::clone(&metrics),
            shutdown.clone(),
        ));
    }

    let ingest = ingest::Ingest::new(
        ledger.clone(),
        committer,
        Arc::clone(&registry),
        Arc::clone(&metrics),
        config.sample_interval_ms,
        Duration::from_millis(config.hello_timeout_ms),
        config.max_frame_bytes,
        shutdown.clone(),
        tasks.clone(),
    );
    let commands = api::Commands {
        signer,
        live: ingest.live_sessions(),
    };
    let (ingest, reconcile) = if config.reconcile.enabled {
        let handle = reconcile::runner::spawn(
            reconcile::runner::Parts {
                settings: config.reconcile.clone(),
                detect: config.detect.clone(),
                registry: Arc::clone(&registry),
                ledger: ledger.clone(),
                commands: commands.clone(),
                metrics: Arc::clone(&metrics),
                alerts: alert::Alerts::spawn(
                    &config.alerts,
                    Arc::clone(&metrics),
                    shutdown.clone(),
                    &tasks,
                ),
            },
            shutdown.clone(),
            &tasks,
        )
        .await?;
        (ingest.with_reconcile(handle.trigger()), handle)
    } else {
        tracing::warn!("[reconcile] enabled = false: no detectors, no remediation");
        (ingest, reconcile::runner::ReconcileHandle::disabled())
    };
    let fleet = api::FleetApi::new(
        Arc::clone(&registry),
        ledger.clone(),
        Arc::clone(&metrics),
        shutdown.clone(),
        tasks.clone(),
        &config.clickhouse,
        commands,
        reconcile,
    );
    let grpc = Server::builder()
        .tls_config(tls)?
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .initial_stream_window_size(RECEIVE_WINDOW_BYTES)
        .initial_connection_window_size(RECEIVE_WINDOW_BYTES)
        .add_service(
            UplinkServer::new(ingest)
                .max_decoding_message_size(config.max_frame_bytes)
                .max_encoding_message_size(config.max_frame_bytes),
        )
        .add_service(
            FleetServer::new(fleet)
                .max_decoding_message_size(config.max_frame_bytes)
                .max_encoding_message_size(64 * 1024 * 1024),
        )
        .serve_with_incoming_shutdown(
            TcpListenerStream::new(listeners.grpc)
                .map(|accepted| accepted.map(read_ahead::ReadAhead::new)),
            shutdown.clone().cancelled_owned(),
        );
    let admin = axum::serve(
        listeners.admin,
        api::admin_router(api::AdminState {
            metrics,
            ledger: ledger.clone(),
        }),
    )
    .with_graceful_shutdown(shutdown.clone().cancelled_owned());

    // Graceful shutdown waits for open streams; a peer that never reads must not hold it.
    let cut_off = async {
        shutdown.cancelled().await;
        tokio::time::sleep(SHUTDOWN_DEADLINE).await;
    };
    let grpc = async {
        tokio::select! {
            outcome = grpc => outcome.map_err(ServerError::from),
            () = cut_off => {
                tracing::warn!("streams still open at the shutdown deadline; closing them");
                Ok(())
            }
        }
    };
    let outcome = tokio::try_join!(grpc, async { admin.await.map_err(ServerError::Admin) });
    // Either both stopped on shutdown, or one failed: stop the other parts too.
    shutdown.cancel();
    tasks.close();
    if tokio::time::timeout(SHUTDOWN_DEADLINE, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("sessions still running after the shutdown deadline");
    }
    ledger.close().await;
    outcome.map(|_| ())
}

/// Refills the per-node windows from the telemetry store (ClickHouse when configured, else
/// the embedded tables). A store that cannot answer leaves them empty, with a warning: the
/// server still starts, and the windows fill from live samples.
async fn rebuild_windows(registry: &registry::Registry, ledger: &Ledger, config: &ServerConfig) {
    let started = std::time::Instant::now();
    let since = unix_ms() - registry.window_ms();
    let rows = if config.clickhouse.enabled() {
        let fetched = async {
            let store = store::clickhouse::ClickHouseStore::open(&config.clickhouse).await?;
            Ok::<_, store::clickhouse::ClickHouseError>((
                store.recent_host(since).await?,
                store.recent_chain(since).await?,
            ))
        };
        match tokio::time::timeout(Duration::from_secs(30), fetched).await {
            Ok(Ok(rows)) => Some(rows),
            Ok(Err(error)) => {
                tracing::warn!(%error, "WindowsNotRebuilt: ClickHouse did not answer; windows fill from live samples");
                None
            }
            Err(_) => {
                tracing::warn!(
                    "WindowsNotRebuilt: ClickHouse took over 30 s; windows fill from live samples"
                );
                None
            }
        }
    } else {
        let fetched = async {
            Ok::<_, store::StoreError>((
                ledger.recent_host(since).await?,
                ledger.recent_chain(since).await?,
            ))
        };
        match fetched.await {
            Ok(rows) => Some(rows),
            Err(error) => {
                tracing::warn!(%error, "WindowsNotRebuilt: windows fill from live samples");
                None
            }
        }
    };
    if let Some((host, chain)) = rows {
        let rows = host.len() + chain.len();
        let points = registry.rebuild_windows(host, chain);
        tracing::info!(
            rows,
            points,
            millis = started.elapsed().as_millis() as u64,
            "WindowsRebuilt"
        );
    }
}

/// Wall-clock now in Unix milliseconds.
pub fn unix_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}
