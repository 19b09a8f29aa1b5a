//! TaoNode Guardian control server: accepts agent streams over mTLS, stores them, and
//! serves the fleet to operators.
//!
//! Modules in data-flow order:
//! [`listen`] (connections within limits, mTLS handshakes) -> [`identity`] (who is calling,
//! from the certificate) -> [`ingest`] (Uplink streams -> commit -> ack; [`read_ahead`] under
//! its TLS) ->
//! [`batch`] (decoded batches; [`batch::values`]: the values the server keeps, the reference
//! tip) -> [`store`] (the sqlx ledger, embedded telemetry, the outbox and ClickHouse,
//! history) -> [`registry`] and [`window`] (the fleet and per-node windows in memory) ->
//! [`detect`] (pure detectors) -> [`reconcile`] (pure: observe, plan) -> [`control`] (the
//! loop driver) -> [`actuate`] (sign, record + audit, deliver; alerts) -> [`api`] (Fleet
//! gRPC + admin HTTP). Beside the flow: [`config`], [`metrics`] and [`pki`] (throwaway
//! certificates for trials and tests). `docs/architecture.md` has the map and the layering
//! rules (`server/tests/layering.rs` enforces them).

pub mod actuate;
pub mod analysis;
pub mod api;
pub mod batch;
pub mod config;
pub mod control;
pub mod detect;
pub mod fence;
mod health;
pub mod https;
pub mod identity;
pub mod ingest;
pub mod listen;
pub mod metrics;
pub mod pki;
pub mod progress;
pub mod read_ahead;
pub mod rechunk;
pub mod reconcile;
pub mod registry;
pub mod store;
pub mod web;
pub mod window;

use std::sync::Arc;
use std::time::Duration;

use guardian_proto::v1::fleet_server::FleetServer;
use guardian_proto::wire::uplink_server::UplinkServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Server;

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
    /// The HTTPS analysis endpoint, when `[analysis] listen` is set.
    pub analysis: Option<TcpListener>,
    /// The HTTPS fleet web page, when `[web] listen` is set.
    pub web: Option<TcpListener>,
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
    /// The actuator could not start: the command signing key or a Kubernetes cluster's
    /// client.
    #[error("actuator: {0}")]
    Command(String),
    /// The TLS material is unusable.
    #[error(transparent)]
    Tls(#[from] listen::ListenError),
    /// The admin HTTP server failed.
    #[error("admin HTTP server failed: {0}")]
    Admin(std::io::Error),
}

/// Runs the server on the given listeners and the opened `ledger` (see [`Ledger::open`];
/// opening it first lets the caller announce readiness only once migrations are applied; the
/// caller also holds [`Ledger::lock_for_server`], as `main.rs` does)
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
    let tls = tls_config(&config)?;
    let telemetry = store::history::TelemetryReader::new(&ledger, &config.clickhouse);
    let registry = Arc::new(registry::Registry::from_stored(
        ledger.nodes().await?,
        config.window_seconds,
    ));
    rebuild_windows(&registry, &telemetry).await;
    let metrics = Arc::new(metrics::Metrics::default());
    metrics
        .nodes_known
        .set(i64::try_from(registry.len()).unwrap_or(i64::MAX));
    let tasks = TaskTracker::new();

    let committer = store::start(&ledger, &config, &metrics, &shutdown, &tasks).await?;
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
    let actuator = actuate::start(
        &config,
        ingest.sessions(),
        Arc::clone(&registry),
        ledger.clone(),
        &metrics,
        &shutdown,
        &tasks,
    )
    .await
    .map_err(ServerError::Command)?;
    let reconcile = control::start(
        &config, &registry, &ledger, &actuator, &metrics, &shutdown, &tasks,
    )
    .await?;
    let ingest = ingest.with_reconcile(reconcile.trigger());
    let fleet = api::FleetApi::new(
        Arc::clone(&registry),
        ledger.clone(),
        Arc::clone(&metrics),
        shutdown.clone(),
        tasks.clone(),
        telemetry,
        actuator,
        reconcile,
    )
    .with_audit_anchor(config.audit_anchor_path());
    let web_fleet = fleet.clone();
    // grpc.health.v1 on both listeners (the admin one is plain HTTP/2 for Kubernetes gRPC
    // probes, which speak no TLS), and server reflection on the mTLS one (grpcurl).
    let (health, health_service) = tonic_health::server::health_reporter();
    health::watch_ledger(health, ledger.clone(), shutdown.clone(), &tasks);
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(guardian_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServerError::Command(format!("gRPC reflection: {e}")))?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(guardian_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| ServerError::Command(format!("gRPC reflection: {e}")))?;
    let limits = &config.connections;
    let incoming = listen::incoming(
        listeners.grpc,
        tls,
        limits,
        Arc::clone(&metrics),
        shutdown.clone(),
        &tasks,
    );
    let grpc = Server::builder()
        .max_concurrent_streams(Some(limits.max_streams_per_connection))
        .http2_max_pending_accept_reset_streams(Some(limits.max_pending_reset_streams))
        .timeout(Duration::from_millis(limits.request_timeout_ms))
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .initial_stream_window_size(RECEIVE_WINDOW_BYTES)
        .initial_connection_window_size(RECEIVE_WINDOW_BYTES)
        .add_service(rechunk::RechunkedService(
            UplinkServer::new(ingest)
                .max_decoding_message_size(config.max_frame_bytes)
                .max_encoding_message_size(config.max_frame_bytes),
        ))
        .add_service(health_service.clone())
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(
            FleetServer::new(fleet)
                .max_decoding_message_size(config.max_frame_bytes)
                .max_encoding_message_size(64 * 1024 * 1024),
        )
        .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
    let admin = axum::serve(
        listeners.admin,
        api::admin_router(api::AdminState {
            metrics,
            registry: Arc::clone(&registry),
            ledger: ledger.clone(),
        })
        .merge(tonic::service::Routes::new(health_service).into_axum_router()),
    )
    .with_graceful_shutdown(shutdown.clone().cancelled_owned());

    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|source| ServerError::ReadTls {
            path: path.display().to_string(),
            source,
        })
    };
    let analysis = match listeners.analysis {
        Some(listener) => {
            let tls =
                https::tls_config(&read(&config.tls.cert_file)?, &read(&config.tls.key_file)?)
                    .map_err(|e| ServerError::Tls(listen::ListenError::Tls(e)))?;
            let listener =
                https::TlsListener::new("analysis", listener, tls, shutdown.clone(), &tasks)
                    .map_err(ServerError::Admin)?;
            let serve = axum::serve(
                listener,
                analysis::router(Arc::clone(&registry), &config.analysis),
            )
            .with_graceful_shutdown(shutdown.clone().cancelled_owned());
            Some(tokio::spawn(async move { serve.await }))
        }
        None => None,
    };

    let web = match listeners.web {
        Some(listener) => {
            let tls = https::tls_config_optional_clients(
                &read(&config.tls.ca_file)?,
                &read(&config.tls.cert_file)?,
                &read(&config.tls.key_file)?,
            )
            .map_err(|e| ServerError::Tls(listen::ListenError::Tls(e)))?;
            let listener = https::TlsListener::new("web", listener, tls, shutdown.clone(), &tasks)
                .map_err(ServerError::Admin)?;
            let router = web::router(
                web::WebParts {
                    fleet: web_fleet,
                    registry: Arc::clone(&registry),
                    ledger: ledger.clone(),
                    shutdown: shutdown.clone(),
                    tasks: tasks.clone(),
                },
                &config.web,
            );
            let serve = axum::serve(
                listener,
                router.into_make_service_with_connect_info::<https::ConnectionPeer>(),
            )
            .with_graceful_shutdown(shutdown.clone().cancelled_owned());
            Some(tokio::spawn(async move { serve.await }))
        }
        None => None,
    };

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
    if let Some(analysis) = analysis
        && let Ok(Err(error)) = analysis.await
    {
        tracing::warn!(%error, "the analysis endpoint stopped with an error");
    }
    if let Some(web) = web
        && let Ok(Err(error)) = web.await
    {
        tracing::warn!(%error, "the web page stopped with an error");
    }
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

/// The gRPC listener's TLS: the server's certificate, and client certificates required and
/// chained to the fleet CA.
fn tls_config(
    config: &ServerConfig,
) -> Result<Arc<tokio_rustls::rustls::ServerConfig>, ServerError> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|source| ServerError::ReadTls {
            path: path.display().to_string(),
            source,
        })
    };
    Ok(listen::tls_config(
        &read(&config.tls.ca_file)?,
        &read(&config.tls.cert_file)?,
        &read(&config.tls.key_file)?,
    )?)
}

/// Refills the per-node windows from the telemetry store. A store that cannot answer (within
/// 30 s) leaves them empty, with a warning: the server still starts, and the windows fill
/// from live samples.
async fn rebuild_windows(
    registry: &registry::Registry,
    telemetry: &store::history::TelemetryReader,
) {
    let started = std::time::Instant::now();
    let since = unix_ms() - registry.window_ms();
    let progress = &progress::PROGRESS;
    progress.start(
        "window_rebuild",
        "rebuilding the per-node windows from the telemetry store",
        "rows",
        0,
    );
    let read = tokio::time::timeout(Duration::from_secs(30), telemetry.recent(since)).await;
    if let Ok(Ok((host, chain))) = &read {
        let rows = (host.len() + chain.len()) as u64;
        progress.set_total("window_rebuild", rows);
    }
    let outcome = read;
    progress.finish("window_rebuild");
    match outcome {
        Ok(Ok((host, chain))) => {
            let rows = host.len() + chain.len();
            let points = registry.rebuild_windows(host, chain);
            tracing::info!(
                rows,
                points,
                millis = started.elapsed().as_millis() as u64,
                "WindowsRebuilt"
            );
        }
        Ok(Err(error)) => {
            tracing::warn!(%error, "WindowsNotRebuilt: windows fill from live samples");
        }
        Err(_) => tracing::warn!(
            "WindowsNotRebuilt: the telemetry store took over 30 s; windows fill from live samples"
        ),
    }
}

/// Wall-clock now in Unix milliseconds.
pub fn unix_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

/// `YYYY-MM-DD HH:MM:SS` in UTC (civil-from-days, no time zone database needed).
pub fn utc(unix_ms: i64) -> String {
    let secs = unix_ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
