//! What the server's HTTPS listeners share (the analysis endpoint and the fleet web page): a
//! TLS listener for `axum::serve` that knows who connected, the rustls configs, and bearer
//! tokens checked against the SHA-256 hashes in the config (the tokens are never stored).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, header};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::identity::Peer;

/// SHA-256 of the empty string: never an accepted token.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"; // pragma: allowlist secret

/// The address of an HTTPS listener's `listen` setting; `None` when it is empty (off).
///
/// # Errors
/// `field` and what is wrong, with `example` as the fix.
pub fn parse_listen(
    field: &'static str,
    listen: &str,
    example: &str,
) -> Result<Option<SocketAddr>, (&'static str, String)> {
    if listen.is_empty() {
        return Ok(None);
    }
    listen.parse().map(Some).map_err(|e| {
        (
            field,
            format!("{listen:?} is not an address ({e}): write HOST:PORT, e.g. {example}"),
        )
    })
}

/// Checks a list of token hashes from the config; `field` names it in the error.
///
/// # Errors
/// The field and what is wrong: the empty token's hash, or something that is not a hex
/// SHA-256 (most often the token itself pasted in place of its hash).
pub fn validate_token_hashes(
    field: &'static str,
    hashes: &[String],
) -> Result<(), (&'static str, String)> {
    for hash in hashes {
        if hash.eq_ignore_ascii_case(EMPTY_SHA256) {
            return Err((
                field,
                "that is the SHA-256 of an empty token (was the variable unset when it was hashed?): hash a real token".into(),
            ));
        }
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err((
                field,
                format!(
                    "{hash:?} is not a hex SHA-256 (64 hex digits): put the token's hash here, never the token"
                ),
            ));
        }
    }
    Ok(())
}

/// The accepted token hashes of a config, lower-case, shared by the handlers.
pub fn hashes(configured: &[String]) -> Arc<Vec<String>> {
    Arc::new(configured.iter().map(|t| t.to_ascii_lowercase()).collect())
}

/// Whether `token`'s SHA-256 is one of `hashes` (lower-case hex). An empty token never is.
pub fn token_accepted(token: &str, hashes: &[String]) -> bool {
    let token = token.trim();
    if token.is_empty() {
        return false;
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    hashes.iter().any(|t| t.eq_ignore_ascii_case(&hex))
}

/// Whether the request's `Authorization: Bearer TOKEN` is accepted.
pub fn bearer_accepted(headers: &HeaderMap, hashes: &[String]) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|token| token_accepted(token, hashes))
}

/// Time a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A TLS listener for `axum::serve`: handshakes run concurrently (a slow client holds up no
/// one), and only finished ones are handed over.
pub struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(TlsStream<tokio::net::TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Accepts on `listener` with `tls` until `shutdown`; `name` labels its log lines.
    ///
    /// # Errors
    /// When the listener has no local address.
    pub fn new(
        name: &'static str,
        listener: TcpListener,
        tls: Arc<ServerConfig>,
        shutdown: CancellationToken,
        tasks: &TaskTracker,
    ) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        let acceptor = TlsAcceptor::from(tls);
        let handshakes = tasks.clone();
        tasks.spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    () = shutdown.cancelled() => break,
                    accepted = listener.accept() => match accepted {
                        Ok(pair) => pair,
                        Err(error) => {
                            tracing::warn!(listener = name, %error, "HttpsAcceptFailed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                handshakes.spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((stream, peer)).await;
                        }
                        Ok(Err(error)) => {
                            tracing::debug!(listener = name, %peer, %error, "HttpsHandshakeFailed");
                        }
                        Err(_) => tracing::debug!(listener = name, %peer, "HttpsHandshakeTimedOut"),
                    }
                });
            }
        });
        Ok(Self { ready, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(pair) => pair,
            // The accept loop ended (shutdown): wait for the graceful shutdown to end serve.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Who is on a connection of a [`TlsListener`]: the identity in the client certificate the
/// TLS handshake verified, if the client sent one. Handlers read it with
/// `ConnectInfo<ConnectionPeer>`.
#[derive(Debug, Clone)]
pub struct ConnectionPeer {
    /// The client's address.
    pub address: SocketAddr,
    /// The verified client certificate's identity; `None` without a certificate (or with one
    /// that carries no guardian identity).
    pub peer: Option<Peer>,
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>>
    for ConnectionPeer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        let peer = stream
            .io()
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|leaf| Peer::from_cert_der(leaf.as_ref()).ok());
        Self {
            address: *stream.remote_addr(),
            peer,
        }
    }
}

fn chain_and_key(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<
    (
        Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>>,
        tokio_rustls::rustls::pki_types::PrivateKeyDer<'static>,
    ),
    String,
> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("tls.cert_file: {e}"))?;
    if chain.is_empty() {
        return Err("tls.cert_file: no certificate in it".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("tls.key_file: {e}"))?;
    Ok((chain, key))
}

/// A server config with the server's certificate and no client certificate asked.
///
/// # Errors
/// When the PEM files are unusable.
pub fn tls_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<ServerConfig>, String> {
    let (chain, key) = chain_and_key(cert_pem, key_pem)?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("tls.cert_file/tls.key_file: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A server config with the server's certificate that also asks for (but does not require)
/// a client certificate from the fleet CA: an operator's browser may present one, and one
/// that does not chain to the CA fails the handshake.
///
/// # Errors
/// When the PEM files are unusable.
pub fn tls_config_optional_clients(
    ca_pem: &[u8],
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<Arc<ServerConfig>, String> {
    use tokio_rustls::rustls::RootCertStore;
    use tokio_rustls::rustls::pki_types::CertificateDer;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::server::WebPkiClientVerifier;
    let (chain, key) = chain_and_key(cert_pem, key_pem)?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots
            .add(cert.map_err(|e| format!("tls.ca_file: {e}"))?)
            .map_err(|e| format!("tls.ca_file: {e}"))?;
    }
    if roots.is_empty() {
        return Err("tls.ca_file: no certificate in it".into());
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), Arc::clone(&provider))
        .allow_unauthenticated()
        .build()
        .map_err(|e| format!("tls.ca_file: {e}"))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| format!("tls.cert_file/tls.key_file: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
