//! The fleet web page (`[web]`, off by default): HTTPS with the server certificate, read-only,
//! for operators who sign in with an operator client certificate from the fleet CA or a
//! bearer token whose SHA-256 is in `[web] token_sha256` (the sign-in form keeps it in a
//! `Secure; HttpOnly; SameSite=Strict` cookie).
//!
//! - `/`: the fleet, worst first, kept live by server-sent events from the same fleet watch
//!   the Fleet API's `WatchNodes` uses ([`crate::registry::Registry::watch`]).
//! - `/nodes/ID?range=1h|24h|7d`: a node's figures, charts from the history the Fleet API's
//!   `GetHistory` serves (inline SVG), its findings with evidence, its commands and outcomes,
//!   and its audit entries.
//! - `/events` (`?node=ID`): the event stream itself (`event: node`, one JSON row each).
//!
//! The tables are complete without JavaScript; the one script only applies the events.

pub mod chart;
pub mod page;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Form, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use guardian_proto::v1::HistoryRequest;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::FleetApi;
use crate::https::ConnectionPeer;
use crate::identity::{NodeId, Peer};
use crate::registry::Registry;
use crate::store::Ledger;
use crate::unix_ms;
use page::FleetRow;

/// `[web]`: the page is off unless `listen` is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebSettings {
    /// HTTPS address of the fleet web page; empty = off.
    pub listen: String,
    /// Hex SHA-256 of each accepted access token (`printf %s TOKEN | sha256sum`).
    pub token_sha256: Vec<String>,
    /// Let in browsers that present an operator client certificate from the fleet CA.
    pub client_certificates: bool,
}

impl Default for WebSettings {
    fn default() -> Self {
        Self {
            listen: String::new(),
            token_sha256: Vec::new(),
            client_certificates: true,
        }
    }
}

impl WebSettings {
    /// Checks the settings; returns the address to bind when the page is on.
    ///
    /// # Errors
    /// A field and what is wrong with it.
    pub fn validate(&self) -> Result<Option<SocketAddr>, (&'static str, String)> {
        let Some(addr) = crate::https::parse_listen("web.listen", &self.listen, "0.0.0.0:7446")?
        else {
            return Ok(None);
        };
        if self.token_sha256.is_empty() && !self.client_certificates {
            return Err((
                "web.token_sha256",
                "the page is on but nobody can sign in: add the hex SHA-256 of a token (printf %s TOKEN | sha256sum) or set client_certificates = true".into(),
            ));
        }
        crate::https::validate_token_hashes("web.token_sha256", &self.token_sha256)?;
        Ok(Some(addr))
    }
}

/// The cookie the sign-in form sets.
const COOKIE: &str = "guardian_web";
/// How long a sign-in lasts (seconds).
const COOKIE_MAX_AGE: u32 = 12 * 3600;

#[derive(Clone)]
struct WebState {
    fleet: FleetApi,
    registry: Arc<Registry>,
    ledger: Ledger,
    tokens: Arc<Vec<String>>,
    client_certificates: bool,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    failures: Arc<std::sync::Mutex<FailedSignIns>>,
}

/// Failed sign-ins an address may make a minute before it is told to wait.
const FAILED_SIGN_INS_PER_MINUTE: u32 = 10;
/// Addresses tracked at once; the oldest minute's entries go first.
const TRACKED_ADDRESSES: usize = 10_000;

/// Wrong tokens per client address in the current minute (from the sign-in form, a bearer
/// header or a cookie): guessing is slowed to [`FAILED_SIGN_INS_PER_MINUTE`] an address, one
/// address cannot lock out another, and operator certificates are never throttled.
#[derive(Debug, Default)]
struct FailedSignIns {
    by_address: std::collections::HashMap<std::net::IpAddr, (std::time::Instant, u32)>,
}

impl FailedSignIns {
    /// Whether `address` may try now.
    fn may_try(&mut self, address: std::net::IpAddr, now: std::time::Instant) -> bool {
        match self.by_address.get(&address) {
            Some((since, count)) if now.duration_since(*since).as_secs() < 60 => {
                *count < FAILED_SIGN_INS_PER_MINUTE
            }
            _ => true,
        }
    }

    /// Counts a failure of `address`.
    fn failed(&mut self, address: std::net::IpAddr, now: std::time::Instant) {
        if self.by_address.len() >= TRACKED_ADDRESSES {
            self.by_address
                .retain(|_, (since, _)| now.duration_since(*since).as_secs() < 60);
        }
        if self.by_address.len() >= TRACKED_ADDRESSES {
            return;
        }
        let entry = self.by_address.entry(address).or_insert((now, 0));
        if now.duration_since(entry.0).as_secs() >= 60 {
            *entry = (now, 0);
        }
        entry.1 += 1;
    }
}

/// What the page reads.
#[derive(Debug, Clone)]
pub struct WebParts {
    /// The Fleet API, for history.
    pub fleet: FleetApi,
    /// The fleet.
    pub registry: Arc<Registry>,
    /// Findings, commands, audit.
    pub ledger: Ledger,
    /// Ends the event streams.
    pub shutdown: CancellationToken,
    /// Holds the watch tasks.
    pub tasks: TaskTracker,
}

/// The page's router; serve it with `into_make_service_with_connect_info::<ConnectionPeer>()`
/// on a [`crate::https::TlsListener`].
pub fn router(parts: WebParts, settings: &WebSettings) -> Router {
    let state = WebState {
        fleet: parts.fleet,
        registry: parts.registry,
        ledger: parts.ledger,
        tokens: crate::https::hashes(&settings.token_sha256),
        client_certificates: settings.client_certificates,
        shutdown: parts.shutdown,
        tasks: parts.tasks,
        failures: Arc::default(),
    };
    let signed_in = Router::new()
        .route("/", get(fleet))
        .route("/nodes/{id}", get(node))
        .route("/events", get(events))
        .fallback(not_found)
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_sign_in,
        ));
    Router::new()
        .route("/login", get(sign_in_page).post(sign_in))
        .route("/logout", post(sign_out))
        .route("/static/app.js", get(script))
        .route("/static/style.css", get(style))
        .merge(signed_in)
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(state)
}

fn cookie_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

/// What a request's credentials say.
enum Credentials {
    /// Let in by an operator certificate (never throttled): the operator's name.
    Operator(String),
    /// Let in by an accepted token.
    Token,
    /// A token was presented (header or cookie) and is not accepted.
    Refused,
    /// Nothing was presented.
    None,
}

fn credentials(state: &WebState, connection: &ConnectionPeer, headers: &HeaderMap) -> Credentials {
    if state.client_certificates
        && let Some(Peer::Operator(name)) = &connection.peer
    {
        return Credentials::Operator(name.clone());
    }
    let cookie = cookie_token(headers);
    let presented = headers.contains_key(header::AUTHORIZATION) || cookie.is_some();
    let by_header = crate::https::bearer_accepted(headers, &state.tokens);
    let by_cookie = cookie
        .is_some_and(|token| crate::https::token_accepted(&percent_decode(token), &state.tokens));
    if by_header || by_cookie {
        Credentials::Token
    } else if presented {
        Credentials::Refused
    } else {
        Credentials::None
    }
}

/// The answer to an address that has guessed too many tokens this minute.
fn throttled(next: &str, certificates: bool) -> Response {
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::RETRY_AFTER, "60")],
        Html(page::sign_in(
            Some("Too many wrong tokens from this address: wait a minute, then try again."),
            next,
            certificates,
        )),
    )
        .into_response()
}

async fn require_sign_in(
    State(state): State<WebState>,
    ConnectInfo(connection): ConnectInfo<ConnectionPeer>,
    request: Request,
    next: Next,
) -> Response {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, "GET, HEAD")],
            "the fleet page is read-only: use the Fleet API or guardianctl to act\n",
        )
            .into_response();
    }
    let (ip, now) = (connection.address.ip(), std::time::Instant::now());
    match credentials(&state, &connection, request.headers()) {
        Credentials::Operator(name) => {
            tracing::debug!(operator = name, peer = %connection.address, path = request.uri().path(), "WebRequest");
            return next.run(request).await;
        }
        // A token, right or wrong, is tried only while the address may try.
        Credentials::Token | Credentials::Refused
            if !state.failures.lock().is_ok_and(|mut f| f.may_try(ip, now)) =>
        {
            tracing::warn!(peer = %connection.address, "WebSignInThrottled");
            return throttled("/", state.client_certificates);
        }
        Credentials::Token => {
            tracing::debug!(peer = %connection.address, path = request.uri().path(), "WebRequest");
            return next.run(request).await;
        }
        Credentials::Refused => {
            if let Ok(mut failures) = state.failures.lock() {
                failures.failed(ip, now);
            }
            tracing::warn!(peer = %connection.address, "WebTokenRefused");
        }
        Credentials::None => {}
    }
    if let Some(Peer::Node(id)) = &connection.peer {
        tracing::warn!(peer = %connection.address, node = %id, "WebRefusedAgentCertificate");
    }
    let path = request.uri().path();
    if path == "/events" {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "sign in first: an operator client certificate, or a bearer token whose SHA-256 is in [web] token_sha256\n",
        )
            .into_response();
    }
    let next = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        Html(page::sign_in(None, &next, state.client_certificates)),
    )
        .into_response()
}

async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    for (name, value) in [
        (
            "content-security-policy",
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "no-referrer"),
        ("cache-control", "no-store"),
        ("strict-transport-security", "max-age=31536000"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// `%XX` decoded, as the sign-in form encodes the cookie's value.
fn percent_decode(text: &str) -> String {
    let hex = |b: u8| char::from(b).to_digit(16);
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push(u8::try_from(hi * 16 + lo).unwrap_or(b'?'));
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A local path to return to after signing in; anything else goes to `/`.
fn local_path(next: &str) -> &str {
    if next.starts_with('/') && !next.starts_with("//") && !next.contains('\\') {
        next
    } else {
        "/"
    }
}

#[derive(Debug, Deserialize)]
struct NextQuery {
    next: Option<String>,
}

async fn sign_in_page(State(state): State<WebState>, Query(query): Query<NextQuery>) -> Response {
    let next = local_path(query.next.as_deref().unwrap_or("/")).to_owned();
    Html(page::sign_in(None, &next, state.client_certificates)).into_response()
}

#[derive(Debug, Deserialize)]
struct SignIn {
    token: String,
    #[serde(default)]
    next: String,
}

async fn sign_in(
    State(state): State<WebState>,
    ConnectInfo(connection): ConnectInfo<ConnectionPeer>,
    Form(form): Form<SignIn>,
) -> Response {
    let next = local_path(&form.next).to_owned();
    let (ip, now) = (connection.address.ip(), std::time::Instant::now());
    if !state.failures.lock().is_ok_and(|mut f| f.may_try(ip, now)) {
        tracing::warn!(peer = %connection.address, "WebSignInThrottled");
        return throttled(&next, state.client_certificates);
    }
    if !crate::https::token_accepted(&form.token, &state.tokens) {
        if let Ok(mut failures) = state.failures.lock() {
            failures.failed(ip, now);
        }
        tracing::warn!(peer = %connection.address, "WebSignInRefused");
        return (
            StatusCode::UNAUTHORIZED,
            Html(page::sign_in(
                Some("That token is not accepted: ask for one whose SHA-256 is in the server's [web] token_sha256."),
                &next,
                state.client_certificates,
            )),
        )
            .into_response();
    }
    tracing::info!(peer = %connection.address, "WebSignedIn");
    // The token is kept as the browser sent it (form-decoded), percent-encoded for the
    // cookie's character set.
    let value: String = form
        .token
        .trim()
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let cookie = format!(
        "{COOKIE}={value}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={COOKIE_MAX_AGE}"
    );
    let mut response = Redirect::to(&next).into_response();
    if let Ok(cookie) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

async fn sign_out() -> Response {
    let mut response = Redirect::to("/login").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "guardian_web=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    response
}

async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("assets/app.js"),
    )
        .into_response()
}

async fn style() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("assets/style.css"),
    )
        .into_response()
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Html(page::not_found("There is no page at this address.")),
    )
        .into_response()
}

fn row_of(registry: &Registry, node: &guardian_proto::v1::Node) -> FleetRow {
    let gpu = NodeId::parse(&node.node_id)
        .ok()
        .and_then(|id| registry.gpu(&id))
        .map(|(_, gpu)| gpu);
    FleetRow::of(node, gpu.as_ref())
}

async fn fleet(State(state): State<WebState>) -> Response {
    let nodes = state.registry.list();
    let fleet_risk = nodes.iter().map(|n| n.risk).fold(0.0, f64::max);
    let mut rows: Vec<FleetRow> = nodes.iter().map(|n| row_of(&state.registry, n)).collect();
    Html(page::fleet(&mut rows, fleet_risk, unix_ms())).into_response()
}

#[derive(Debug, Deserialize)]
struct RangeQuery {
    range: Option<String>,
}

/// The charts of the node page: catalogue metric and heading.
const CHARTS: [(&str, &str); 9] = [
    ("block_lag", "Block lag"),
    ("head_age_ms", "Head age"),
    ("peers", "Peers"),
    ("cpu_busy_percent", "CPU busy"),
    ("mem_available_bytes", "Memory available"),
    ("disk_read_latency_ms_max", "Disk read latency (worst disk)"),
    (
        "disk_write_latency_ms_max",
        "Disk write latency (worst disk)",
    ),
    ("temperature_celsius", "GPU temperature"),
    ("utilisation_gpu_percent", "GPU utilisation"),
];

async fn node(
    State(state): State<WebState>,
    Path(raw): Path<String>,
    Query(query): Query<RangeQuery>,
) -> Response {
    let missing = || {
        (
            StatusCode::NOT_FOUND,
            Html(page::not_found(&format!(
                "No node {raw:?} has ever connected to this server."
            ))),
        )
            .into_response()
    };
    let Ok(id) = NodeId::parse(&raw) else {
        return missing();
    };
    let Some(node) = state.registry.get(&id) else {
        return missing();
    };
    let (range, span_ms): (&'static str, i64) = match query.range.as_deref() {
        Some("24h") => ("24h", 86_400_000),
        Some("7d") => ("7d", 7 * 86_400_000),
        _ => ("1h", 3_600_000),
    };
    let now = unix_ms();
    let mut charts = Vec::with_capacity(CHARTS.len());
    for (metric, title) in CHARTS {
        let answer = state
            .fleet
            .history(HistoryRequest {
                node_id: id.to_string(),
                metric: metric.to_owned(),
                from_unix_ms: now - span_ms,
                to_unix_ms: now,
                resolution_seconds: 0,
            })
            .await;
        charts.push(match answer {
            Ok(history) => chart::Chart {
                metric,
                title,
                unit: &history.unit,
                points: &history.points,
                from_ms: now - span_ms,
                to_ms: now,
                resolution_seconds: history.resolution_seconds,
            }
            .render(),
            Err(status) => format!(
                "<figure class=\"chart\" data-metric=\"{metric}\" data-points=\"0\"><figcaption><b>{}</b></figcaption>\
                 <p class=\"error\">Cannot be read now: {}</p></figure>",
                page::esc(title),
                page::esc(status.message())
            ),
        });
    }
    let text = |e: crate::store::StoreError| e.to_string();
    let detail = page::NodeDetail {
        gpu: state.registry.gpu(&id).map(|(_, gpu)| gpu),
        charts,
        range,
        findings: state
            .ledger
            .findings(id.as_str(), true, 50)
            .await
            .map_err(text),
        commands: state
            .ledger
            .commands_of_node(id.as_str(), 50)
            .await
            .map_err(text),
        audit: state
            .ledger
            .audit_entries_newest(id.as_str(), 50)
            .await
            .map_err(text)
            .map(|entries| entries.into_iter().map(Into::into).collect()),
    };
    Html(page::node(&node, &detail)).into_response()
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    node: Option<String>,
}

/// How often a page's event stream sends what changed: a node that changed several times
/// in between is sent once, as it is now. A fleet of 10 000 agents that each report every
/// second costs a browser at most one update per node per flush, not 10 000 events a second.
const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

async fn events(State(state): State<WebState>, Query(query): Query<EventsQuery>) -> Response {
    let only = query.node.filter(|n| !n.is_empty());
    let mut changes = state.registry.watch(
        state.shutdown.clone(),
        &state.tasks,
        tracing::info_span!("web_events"),
    );
    let registry = Arc::clone(&state.registry);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, axum::Error>>(1024);
    state.tasks.spawn(async move {
        let mut pending: std::collections::HashMap<String, guardian_proto::v1::Node> =
            std::collections::HashMap::new();
        let mut flush = tokio::time::interval(FLUSH_EVERY);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                node = changes.recv() => match node {
                    Some(node) if only.as_ref().is_none_or(|only| *only == node.node_id) => {
                        pending.insert(node.node_id.clone(), node);
                    }
                    Some(_) => {}
                    None => return,
                },
                _ = flush.tick() => {
                    for (_, node) in pending.drain() {
                        let event = Event::default().event("node").json_data(row_of(&registry, &node));
                        if tx.send(event).await.is_err() {
                            return;
                        }
                    }
                }
                () = tx.closed() => return,
            }
        }
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(15)))
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_paths_are_followed_after_sign_in() {
        assert_eq!(local_path("/nodes/a?range=24h"), "/nodes/a?range=24h");
        assert_eq!(local_path("//evil.example/"), "/");
        assert_eq!(local_path("https://evil.example/"), "/");
        assert_eq!(local_path("/\\evil.example"), "/");
    }

    #[test]
    fn cookie_values_decode() {
        assert_eq!(percent_decode("a%2Bb+c%"), "a+b+c%");
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("theme=dark; guardian_web=tok%20en"),
        );
        assert_eq!(cookie_token(&headers), Some("tok%20en"));
    }

    #[test]
    fn wrong_tokens_are_throttled_per_address() {
        let mut failures = FailedSignIns::default();
        let (a, b): (std::net::IpAddr, std::net::IpAddr) = (
            "10.0.0.1".parse().expect("ip"),
            "10.0.0.2".parse().expect("ip"),
        );
        let now = std::time::Instant::now();
        for _ in 0..FAILED_SIGN_INS_PER_MINUTE {
            assert!(failures.may_try(a, now));
            failures.failed(a, now);
        }
        assert!(
            !failures.may_try(a, now),
            "the 11th try within the minute waits"
        );
        assert!(
            failures.may_try(b, now),
            "another address is not locked out"
        );
        let later = now + std::time::Duration::from_secs(61);
        assert!(
            failures.may_try(a, later),
            "a minute later it may try again"
        );
    }

    #[test]
    fn a_page_nobody_can_open_is_refused() {
        let settings = WebSettings {
            listen: "127.0.0.1:7446".into(),
            token_sha256: Vec::new(),
            client_certificates: false,
        };
        assert_eq!(
            settings.validate().expect_err("no way in").0,
            "web.token_sha256"
        );
        let certificates_only = WebSettings {
            client_certificates: true,
            ..settings
        };
        assert!(certificates_only.validate().expect("valid").is_some());
        assert_eq!(WebSettings::default().validate(), Ok(None));
    }
}
