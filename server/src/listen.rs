//! Owns the gRPC listener's front door: accepts TCP connections within a cap, turns on TCP
//! keepalive, completes each TLS handshake (client certificate required) within a deadline,
//! and hands only finished handshakes to the gRPC server.
//!
//! Why here and not in tonic: tonic's TLS accept has no default deadline, keeps every pending
//! handshake, and retries a failed `accept` at once, so 1 100 idle TCP connections from a peer
//! with no certificate exhausted a 1 024-descriptor process and then spun a core on `EMFILE`
//! while no agent could connect.
//!
//! # Guarantees
//! - At most [`ConnectionLimits::max_connections`] connections are held (pending or served);
//!   one over it is closed at once (`guardian_connections_refused_total{reason="at_capacity"}`).
//!   The cap is lowered to fit the process's descriptor limit, which is raised to its hard
//!   limit first.
//! - At most [`ConnectionLimits::max_pending_handshakes`] handshakes are pending; a new
//!   connection beyond it evicts the oldest pending one (a real client finishes its handshake
//!   in milliseconds; an idle socket is what gets evicted). Each handshake gets
//!   [`ConnectionLimits::tls_handshake_timeout_ms`].
//! - An `accept` that fails for want of descriptors or memory waits 100 ms before the next
//!   try (counted, logged at most every 10 s), instead of spinning.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::{AbortHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};
use tracing::Instrument;

use crate::metrics::{Metrics, Reason};
use crate::read_ahead::ReadAhead;

/// Descriptors kept free for everything but client connections (ledger, segment files,
/// ClickHouse, the admin port, logs).
const RESERVED_DESCRIPTORS: u64 = 256;
/// Wait after an `accept` that failed for want of descriptors or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Limits of the gRPC listener (`[connections]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionLimits {
    /// Most connections held at once, pending or served. Default 16 384 (lowered to fit the
    /// descriptor limit).
    pub max_connections: usize,
    /// Most TLS handshakes pending at once; beyond it the oldest is dropped. Default 1 024.
    pub max_pending_handshakes: usize,
    /// Time a client has to complete its TLS handshake, ms. Default 10 000.
    pub tls_handshake_timeout_ms: u64,
    /// Idle time before TCP keepalive probes start, s (then every 10 s, 6 probes). Default 60.
    pub tcp_keepalive_seconds: u64,
    /// Most concurrent HTTP/2 streams one connection may open (an agent uses 1). Default 64.
    pub max_streams_per_connection: u32,
    /// Most HTTP/2 streams a client may reset before they are accepted (rapid-reset guard).
    /// Default 32.
    pub max_pending_reset_streams: usize,
    /// Time a request may take to produce its response, ms (a stream's response is its first
    /// frame: long-lived streams are not cut). Default 60 000.
    pub request_timeout_ms: u64,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 16_384,
            max_pending_handshakes: 1_024,
            tls_handshake_timeout_ms: 10_000,
            tcp_keepalive_seconds: 60,
            max_streams_per_connection: 64,
            max_pending_reset_streams: 32,
            request_timeout_ms: 60_000,
        }
    }
}

impl ConnectionLimits {
    /// The first field out of range: `(field, problem, fix)`.
    pub fn problem(&self) -> Option<(&'static str, String, &'static str)> {
        if self.max_connections == 0 {
            return Some((
                "connections.max_connections",
                "0 lets nobody in".into(),
                "use the default 16384, or the number of agents plus operators with room to spare",
            ));
        }
        if self.max_pending_handshakes == 0 || self.max_pending_handshakes > self.max_connections {
            return Some((
                "connections.max_pending_handshakes",
                format!(
                    "{} is outside 1..=max_connections ({})",
                    self.max_pending_handshakes, self.max_connections
                ),
                "use the default 1024",
            ));
        }
        if !(100..=120_000).contains(&self.tls_handshake_timeout_ms) {
            return Some((
                "connections.tls_handshake_timeout_ms",
                format!("{} is outside 100..=120000", self.tls_handshake_timeout_ms),
                "use the default 10000",
            ));
        }
        if !(1..=7_200).contains(&self.tcp_keepalive_seconds) {
            return Some((
                "connections.tcp_keepalive_seconds",
                format!("{} is outside 1..=7200", self.tcp_keepalive_seconds),
                "use the default 60",
            ));
        }
        if self.max_streams_per_connection == 0 {
            return Some((
                "connections.max_streams_per_connection",
                "0 lets no request through".into(),
                "use the default 64",
            ));
        }
        if !(1_000..=3_600_000).contains(&self.request_timeout_ms) {
            return Some((
                "connections.request_timeout_ms",
                format!("{} is outside 1000..=3600000", self.request_timeout_ms),
                "use the default 60000",
            ));
        }
        None
    }
}

/// Why the listener's TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// A PEM file holds nothing usable.
    #[error("{what}: {problem}")]
    Pem {
        /// Which file.
        what: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// rustls refused the material.
    #[error("TLS setup failed: {0}")]
    Tls(String),
}

/// The server side of mTLS: the server's certificate chain and key, client certificates
/// required and chained to the fleet CA, HTTP/2 only.
///
/// # Errors
/// [`ListenError`] when a PEM holds no certificate or key, or rustls refuses them.
pub fn tls_config(
    ca_pem: &[u8],
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<Arc<ServerConfig>, ListenError> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let pem_error = |what: &'static str| {
        move |e: tokio_rustls::rustls::pki_types::pem::Error| ListenError::Pem {
            what,
            problem: e.to_string(),
        }
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots
            .add(cert.map_err(pem_error("tls.ca_file"))?)
            .map_err(|e| ListenError::Tls(format!("tls.ca_file: {e}")))?;
    }
    if roots.is_empty() {
        return Err(ListenError::Pem {
            what: "tls.ca_file",
            problem: "no certificate in it".into(),
        });
    }
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error("tls.cert_file"))?;
    if chain.is_empty() {
        return Err(ListenError::Pem {
            what: "tls.cert_file",
            problem: "no certificate in it".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(pem_error("tls.key_file"))?;
    let verifier = WebPkiClientVerifier::builder(roots.into())
        .build()
        .map_err(|e| ListenError::Tls(e.to_string()))?;
    let mut config = ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| ListenError::Tls(e.to_string()))?;
    config.alpn_protocols.push(b"h2".to_vec());
    Ok(Arc::new(config))
}

/// A served connection: TLS over the read-ahead socket, holding its place under the cap.
#[derive(Debug)]
pub struct Conn {
    io: tokio_rustls::server::TlsStream<ReadAhead>,
    _permit: Permit,
}

/// A place under [`ConnectionLimits::max_connections`], released (and the gauge lowered)
/// when the connection is dropped.
#[derive(Debug)]
struct Permit {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.metrics.connections_open.dec();
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl Connected for Conn {
    // The type tonic looks up for `Request::peer_certs` and `remote_addr`.
    type ConnectInfo = TlsConnectInfo<TcpConnectInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// The connection cap that fits the descriptor limit: raises the soft `RLIMIT_NOFILE` to the
/// hard limit, then keeps [`RESERVED_DESCRIPTORS`] free for everything else.
fn fitted_max_connections(wanted: usize) -> usize {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        if let Err(error) = setrlimit(Resource::Nofile, limit) {
            tracing::warn!(%error, "cannot raise the descriptor limit to its hard limit");
        }
        limit = getrlimit(Resource::Nofile);
    }
    let Some(soft) = limit.current else {
        return wanted;
    };
    let fits =
        usize::try_from(soft.saturating_sub(RESERVED_DESCRIPTORS).max(16)).unwrap_or(usize::MAX);
    if fits < wanted {
        tracing::warn!(
            wanted,
            fits,
            descriptor_limit = soft,
            "ConnectionCapLowered: the descriptor limit is too low for [connections] max_connections; \
             raise LimitNOFILE (systemd) or ulimit -n"
        );
    }
    wanted.min(fits)
}

/// Accepts connections on `listener` within `limits` (on a task of `tasks`, until
/// `shutdown`), completes their TLS handshakes with `tls`, and yields the finished ones.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    limits: &ConnectionLimits,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    tasks: &TaskTracker,
) -> ReceiverStream<Result<Conn, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let front = FrontDoor {
        acceptor: TlsAcceptor::from(tls),
        permits: Arc::new(Semaphore::new(fitted_max_connections(
            limits.max_connections,
        ))),
        max_pending: limits.max_pending_handshakes,
        handshake_timeout: Duration::from_millis(limits.tls_handshake_timeout_ms),
        keepalive: Duration::from_secs(limits.tcp_keepalive_seconds),
        metrics,
        tx,
    };
    tasks.spawn(
        front
            .run(listener, shutdown)
            .instrument(tracing::info_span!("grpc_listener")),
    );
    ReceiverStream::new(rx)
}

struct FrontDoor {
    acceptor: TlsAcceptor,
    permits: Arc<Semaphore>,
    max_pending: usize,
    handshake_timeout: Duration,
    keepalive: Duration,
    metrics: Arc<Metrics>,
    tx: mpsc::Sender<Result<Conn, io::Error>>,
}

impl FrontDoor {
    async fn run(self, listener: TcpListener, shutdown: CancellationToken) {
        let mut handshakes: JoinSet<()> = JoinSet::new();
        // Pending handshakes, oldest first (finished ones are skipped when evicting).
        let mut order: VecDeque<AbortHandle> = VecDeque::new();
        let mut last_warned: Option<Instant> = None;
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.tx.closed() => break,
                Some(_) = handshakes.join_next(), if !handshakes.is_empty() => continue,
                accepted = listener.accept() => accepted,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    if out_of_resources(&error) {
                        self.refused("out_of_descriptors");
                        if last_warned.is_none_or(|at| at.elapsed() > Duration::from_secs(10)) {
                            last_warned = Some(Instant::now());
                            tracing::warn!(%error, "AcceptFailed: out of descriptors or memory; retrying every 100 ms");
                        }
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                    continue;
                }
            };
            // At the cap, pending handshakes make room (oldest first); served connections
            // are never dropped for a newcomer.
            let permit = loop {
                while handshakes.try_join_next().is_some() {}
                if let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() {
                    break Some(permit);
                }
                if !self.evict_oldest(&mut handshakes, &mut order).await {
                    break None;
                }
            };
            let Some(permit) = permit else {
                self.refused("at_capacity");
                continue;
            };
            self.metrics.connections_open.inc();
            let permit = Permit {
                _permit: permit,
                metrics: Arc::clone(&self.metrics),
            };
            if let Err(error) = keepalive(&stream, self.keepalive) {
                tracing::debug!(%error, "cannot set TCP keepalive");
            }
            // At the bound, the oldest pending handshake makes room.
            while handshakes.len() >= self.max_pending
                && self.evict_oldest(&mut handshakes, &mut order).await
            {}
            while order.front().is_some_and(AbortHandle::is_finished) {
                order.pop_front();
            }
            let acceptor = self.acceptor.clone();
            let timeout = self.handshake_timeout;
            let tx = self.tx.clone();
            let metrics = Arc::clone(&self.metrics);
            order.push_back(handshakes.spawn(async move {
                let socket = ReadAhead::new(stream);
                match tokio::time::timeout(timeout, acceptor.accept(socket)).await {
                    Ok(Ok(io)) => {
                        let _ = tx
                            .send(Ok(Conn {
                                io,
                                _permit: permit,
                            }))
                            .await;
                    }
                    Ok(Err(error)) => {
                        metrics
                            .connections_refused
                            .get_or_create(&Reason {
                                reason: "handshake_failed",
                            })
                            .inc();
                        tracing::debug!(%error, "TlsHandshakeFailed");
                    }
                    Err(_) => {
                        metrics
                            .connections_refused
                            .get_or_create(&Reason {
                                reason: "handshake_timeout",
                            })
                            .inc();
                    }
                }
            }));
        }
        handshakes.shutdown().await;
    }

    /// Drops the oldest pending handshake (its socket closes, its place under the cap frees);
    /// false when none is pending.
    async fn evict_oldest(
        &self,
        handshakes: &mut JoinSet<()>,
        order: &mut VecDeque<AbortHandle>,
    ) -> bool {
        while let Some(oldest) = order.pop_front() {
            if oldest.is_finished() {
                continue;
            }
            oldest.abort();
            self.refused("evicted");
            // The aborted task ends at its next poll, dropping its socket and permit.
            while handshakes.join_next().await.is_some() {
                if oldest.is_finished() {
                    break;
                }
            }
            while handshakes.try_join_next().is_some() {}
            return true;
        }
        false
    }

    fn refused(&self, reason: &'static str) {
        self.metrics
            .connections_refused
            .get_or_create(&Reason { reason })
            .inc();
    }
}

/// Whether an `accept` error means the process is out of descriptors or memory.
fn out_of_resources(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(code) if code == rustix::io::Errno::MFILE.raw_os_error()
            || code == rustix::io::Errno::NFILE.raw_os_error()
            || code == rustix::io::Errno::NOBUFS.raw_os_error()
            || code == rustix::io::Errno::NOMEM.raw_os_error()
    )
}

/// TCP keepalive on `stream`: probes after `idle`, then every 10 s, 6 of them.
fn keepalive(stream: &tokio::net::TcpStream, idle: Duration) -> io::Result<()> {
    use rustix::net::sockopt;
    sockopt::set_socket_keepalive(stream, true)?;
    sockopt::set_tcp_keepidle(stream, idle)?;
    sockopt::set_tcp_keepintvl(stream, Duration::from_secs(10))?;
    sockopt::set_tcp_keepcnt(stream, 6)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_out_of_range_name_the_field() {
        assert_eq!(ConnectionLimits::default().problem(), None);
        let field = |limits: ConnectionLimits| limits.problem().map(|p| p.0);
        assert_eq!(
            field(ConnectionLimits {
                max_connections: 0,
                ..ConnectionLimits::default()
            }),
            Some("connections.max_connections")
        );
        assert_eq!(
            field(ConnectionLimits {
                max_pending_handshakes: 20_000,
                ..ConnectionLimits::default()
            }),
            Some("connections.max_pending_handshakes")
        );
        assert_eq!(
            field(ConnectionLimits {
                tls_handshake_timeout_ms: 0,
                ..ConnectionLimits::default()
            }),
            Some("connections.tls_handshake_timeout_ms")
        );
    }

    #[test]
    fn descriptor_exhaustion_is_told_apart_from_other_accept_errors() {
        assert!(out_of_resources(&io::Error::from_raw_os_error(
            rustix::io::Errno::MFILE.raw_os_error()
        )));
        assert!(!out_of_resources(&io::Error::from(
            io::ErrorKind::ConnectionAborted
        )));
    }
}
