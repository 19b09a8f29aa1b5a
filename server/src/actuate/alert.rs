//! Alerts to a human, through routes: every `RemediationAlert` of the reconciler and every
//! finding at or over a route's `min_severity` goes to that route's service: the generic JSON
//! webhook, Slack, Discord or PagerDuty ([`super::notify`] builds each body), and a finding
//! that clears sends a "resolved" message where its trigger went. `[alerts] webhook_url` is a
//! route of its own (the generic webhook, `[alerts] min_severity`).
//!
//! Per route: its own bounded queue and sender (a slow service holds up no other), retries
//! with exponential backoff (429 and 5xx are retried, other 4xx are not), repeats of an open
//! problem suppressed for `repeat_after_seconds`, at most `max_per_minute` messages. Sending
//! never blocks the control loop; what is not delivered is counted
//! (`guardian_alerts_total{reason}`) and logged, never silently lost.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::notify::{self, Service};
use crate::detect::Severity;
use crate::metrics::{Metrics, Reason};

/// One `[[alerts.routes]]`: where alerts of some severities and networks go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteSettings {
    /// Name in logs (unique).
    pub name: String,
    /// `webhook`, `slack`, `discord` or `pagerduty`.
    pub service: Service,
    /// The service's URL (Slack or Discord webhook URL, the generic webhook's URL); empty for
    /// PagerDuty = its Events API v2 endpoint.
    pub url: String,
    /// PagerDuty: the integration's routing key (32 characters).
    pub routing_key: String,
    /// Findings at or over this severity are sent (`info`, `warning`, `critical`); remediation
    /// alerts always are. Default critical.
    pub min_severity: Severity,
    /// Only these networks (empty = all).
    pub networks: Vec<String>,
    /// At most this many messages a minute; beyond it they are dropped (counted). Default 30.
    pub max_per_minute: u32,
    /// An open problem (same node and kind) is not sent again before this many seconds,
    /// unless it cleared in between. Default 3600.
    pub repeat_after_seconds: u64,
}

impl Default for RouteSettings {
    fn default() -> Self {
        Self {
            name: String::new(),
            service: Service::Webhook,
            url: String::new(),
            routing_key: String::new(),
            min_severity: Severity::Critical,
            networks: Vec::new(),
            max_per_minute: 30,
            repeat_after_seconds: 3600,
        }
    }
}

/// `[alerts]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertSettings {
    /// Where alerts are POSTed (`http://` or `https://`); empty = log and metric only.
    pub webhook_url: String,
    /// Findings at or over this severity alert too (`info`, `warning`, `critical`). Default critical.
    pub min_severity: Severity,
    /// Per-request timeout, ms. Default 5000.
    pub timeout_ms: u64,
    /// Tries per alert before it is given up (counted). Default 3.
    pub attempts: u32,
    /// Alerts that may wait per route; beyond it new ones are dropped (counted). Default 1000.
    pub queue: usize,
    /// Routes to Slack, Discord, PagerDuty or webhooks (`[[alerts.routes]]`).
    pub routes: Vec<RouteSettings>,
}

impl Default for AlertSettings {
    fn default() -> Self {
        Self {
            webhook_url: String::new(),
            min_severity: Severity::Critical,
            timeout_ms: 5000,
            attempts: 3,
            queue: 1000,
            routes: Vec::new(),
        }
    }
}

impl AlertSettings {
    /// A problem with these settings, naming the field.
    pub fn problem(&self) -> Option<String> {
        if self.timeout_ms == 0 || self.attempts == 0 || self.queue == 0 {
            return Some("alerts.timeout_ms, attempts and queue must be at least 1".to_owned());
        }
        let mut names = std::collections::HashSet::new();
        for route in self.all_routes() {
            let name = &route.name;
            if name.is_empty() {
                return Some("alerts.routes: every route needs a name".to_owned());
            }
            if !names.insert(name.clone()) {
                return Some(format!("alerts.routes: two routes are named {name:?}"));
            }
            let url = route.url.trim();
            match url.parse::<hyper::Uri>() {
                Ok(uri)
                    if matches!(uri.scheme_str(), Some("http" | "https"))
                        && uri.host().is_some() => {}
                Ok(_) => {
                    return Some(format!(
                        "alerts route {name:?}: url {url:?} must be an http:// or https:// URL with a host"
                    ));
                }
                Err(e) => {
                    return Some(format!(
                        "alerts route {name:?}: url {url:?} is not a URL: {e}"
                    ));
                }
            }
            if route.service == Service::Pagerduty && route.routing_key.trim().len() != 32 {
                return Some(format!(
                    "alerts route {name:?}: a PagerDuty route needs routing_key, the 32-character integration key of an Events API v2 integration"
                ));
            }
            if route.max_per_minute == 0 {
                return Some(format!(
                    "alerts route {name:?}: max_per_minute must be at least 1"
                ));
            }
        }
        None
    }

    /// The routes, `webhook_url` first (as route "webhook"), each with its URL filled in.
    pub fn all_routes(&self) -> Vec<RouteSettings> {
        let mut routes = Vec::new();
        let url = self.webhook_url.trim();
        if !url.is_empty() {
            routes.push(RouteSettings {
                name: "webhook".to_owned(),
                service: Service::Webhook,
                url: url.to_owned(),
                min_severity: self.min_severity,
                max_per_minute: 600,
                repeat_after_seconds: 0,
                ..RouteSettings::default()
            });
        }
        for route in &self.routes {
            let mut route = route.clone();
            if route.url.trim().is_empty() {
                route.url = route.service.default_url().unwrap_or_default().to_owned();
            }
            routes.push(route);
        }
        routes
    }
}

/// One alert as it is sent.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alert {
    /// `remediation_alert` or `finding_raised`.
    pub event: &'static str,
    /// The node, or empty for a fleet finding.
    pub node_id: String,
    /// Its network.
    pub network: String,
    /// Finding kind or the reconciler's phase.
    pub kind: String,
    /// `info`, `warning`, `critical`.
    pub severity: &'static str,
    /// One sentence.
    pub summary: String,
    /// When, Unix ms.
    pub at_unix_ms: i64,
}

/// Where the reconciler hands alerts; cheap to clone.
#[derive(Debug, Clone)]
pub struct Alerts {
    routes: Vec<RouteHandle>,
    metrics: Arc<Metrics>,
}

#[derive(Debug, Clone)]
struct RouteHandle {
    name: String,
    min_severity: Severity,
    networks: Vec<String>,
    queue: mpsc::Sender<Alert>,
}

impl RouteHandle {
    fn takes(&self, alert: &Alert) -> bool {
        // An alert without a network (a Kubernetes remediation alert) goes to every route.
        let network = self.networks.is_empty()
            || alert.network.is_empty()
            || self.networks.contains(&alert.network);
        let severity = match alert.event {
            // Resolves go where their trigger went (the sender knows); remediation alerts always.
            "finding_cleared" | "remediation_alert" => true,
            _ => [Severity::Info, Severity::Warning, Severity::Critical]
                .into_iter()
                .find(|s| s.as_str() == alert.severity)
                .is_some_and(|s| s >= self.min_severity),
        };
        network && severity
    }
}

impl Alerts {
    /// Starts one sender task per route on `tasks`.
    pub fn spawn(
        settings: &AlertSettings,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
        tasks: &TaskTracker,
    ) -> Self {
        let mut routes = Vec::new();
        for route in settings.all_routes() {
            let (tx, rx) = mpsc::channel(settings.queue);
            let sender = Sender {
                timeout: Duration::from_millis(settings.timeout_ms),
                attempts: settings.attempts,
                metrics: Arc::clone(&metrics),
                open: HashMap::new(),
                recent: VecDeque::new(),
                route: route.clone(),
            };
            tasks.spawn(
                sender
                    .run(rx, shutdown.clone())
                    .instrument(tracing::info_span!(
                        "alert_route",
                        route = route.name,
                        service = route.service.as_str()
                    )),
            );
            routes.push(RouteHandle {
                name: route.name,
                min_severity: route.min_severity,
                networks: route.networks,
                queue: tx,
            });
        }
        Self { routes, metrics }
    }

    /// Whether a finding of `severity` goes to any route.
    pub fn wants(&self, severity: Severity) -> bool {
        self.routes.iter().any(|r| severity >= r.min_severity)
    }

    /// Queues `alert` for every route that takes it; never waits.
    pub fn send(&self, alert: Alert) {
        for route in self.routes.iter().filter(|r| r.takes(&alert)) {
            match route.queue.try_send(alert.clone()) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(alert)) => {
                    self.count("dropped_queue_full");
                    tracing::error!(
                        route = route.name,
                        node = alert.node_id,
                        kind = alert.kind,
                        "AlertDropped: the route's queue is full"
                    );
                }
                Err(mpsc::error::TrySendError::Closed(alert)) => {
                    self.count("dropped_sender_stopped");
                    tracing::error!(
                        route = route.name,
                        node = alert.node_id,
                        kind = alert.kind,
                        "AlertDropped: the route's sender has stopped"
                    );
                }
            }
        }
    }

    fn count(&self, reason: &'static str) {
        self.metrics.alerts.get_or_create(&Reason { reason }).inc();
    }
}

/// Longest wait between two tries of one message.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

struct Sender {
    route: RouteSettings,
    timeout: Duration,
    attempts: u32,
    metrics: Arc<Metrics>,
    /// Open problems this route was told of (dedup key -> when last sent).
    open: HashMap<String, Instant>,
    /// When the messages of the last minute went (rate limit).
    recent: VecDeque<Instant>,
}

/// What one try of a delivery came to.
enum Tried {
    Delivered,
    /// Worth another try (no answer, 429, 5xx).
    Retry(String),
    /// Not worth another try (another 4xx: the message or the route is wrong).
    Refused(String),
}

impl Sender {
    fn count(&self, reason: &'static str) {
        self.metrics.alerts.get_or_create(&Reason { reason }).inc();
    }

    async fn run(mut self, mut queue: mpsc::Receiver<Alert>, shutdown: CancellationToken) {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        let connector = match hyper_rustls::HttpsConnectorBuilder::new().with_native_roots() {
            Ok(builder) => builder.https_or_http().enable_http1().wrap_connector(http),
            Err(error) => {
                tracing::error!(%error, "AlertRouteUnavailable: no system root certificates; alerts stay in the log");
                return;
            }
        };
        let client: Client<_, Full<Bytes>> =
            Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector);
        loop {
            let alert = tokio::select! {
                () = shutdown.cancelled() => {
                    // What is still queued at shutdown is counted, not silently gone.
                    let mut left = 0;
                    while let Ok(alert) = queue.try_recv() {
                        left += 1;
                        tracing::warn!(node = alert.node_id, kind = alert.kind, "AlertNotSent: the server is stopping");
                    }
                    for _ in 0..left {
                        self.count("dropped_shutdown");
                    }
                    break;
                }
                next = queue.recv() => match next {
                    Some(alert) => alert,
                    None => break,
                },
            };
            let key = notify::dedup_key(&alert);
            let now = Instant::now();
            let resolve = notify::is_resolve(&alert);
            if resolve {
                // Only what this route triggered; the key goes once the resolve is delivered.
                if !self.open.contains_key(&key) {
                    continue;
                }
            } else if let Some(sent) = self.open.get(&key)
                && now.duration_since(*sent) < Duration::from_secs(self.route.repeat_after_seconds)
            {
                self.count("deduplicated");
                tracing::debug!(key, "AlertDeduplicated");
                continue;
            }
            while self
                .recent
                .front()
                .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
            {
                self.recent.pop_front();
            }
            // Resolves are never rate limited: a dropped one would leave an incident open.
            if !resolve && self.recent.len() >= self.route.max_per_minute as usize {
                self.count("rate_limited");
                tracing::warn!(
                    key,
                    max_per_minute = self.route.max_per_minute,
                    "AlertRateLimited: dropped"
                );
                continue;
            }
            self.recent.push_back(now);
            let body = serde_json::to_vec(&notify::payload(
                self.route.service,
                &alert,
                self.route.routing_key.trim(),
            ))
            .unwrap_or_default();
            let delivered = self.deliver(&client, &body, &alert, &shutdown).await;
            if delivered {
                self.count("delivered");
                if resolve {
                    self.open.remove(&key);
                } else {
                    self.open.insert(key, now);
                }
            } else {
                self.count("failed");
                tracing::error!(
                    node = alert.node_id,
                    kind = alert.kind,
                    summary = alert.summary,
                    "AlertNotDelivered"
                );
            }
        }
    }

    async fn deliver<C>(
        &self,
        client: &Client<C, Full<Bytes>>,
        body: &[u8],
        alert: &Alert,
        shutdown: &CancellationToken,
    ) -> bool
    where
        C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
    {
        let mut backoff = Duration::from_millis(500);
        for attempt in 1..=self.attempts {
            let Ok(request) = hyper::Request::post(self.route.url.trim())
                .header("content-type", "application/json")
                .header("user-agent", "guardian-server")
                .body(Full::new(Bytes::from(body.to_vec())))
            else {
                return false;
            };
            let tried = tokio::time::timeout(self.timeout, async {
                let response = match client.request(request).await {
                    Ok(response) => response,
                    Err(e) => return Tried::Retry(e.to_string()),
                };
                let status = response.status();
                // Read the body so the connection can be reused, and to say why.
                let text = response
                    .into_body()
                    .collect()
                    .await
                    .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                    .unwrap_or_default();
                if status.is_success() {
                    Tried::Delivered
                } else if status.as_u16() == 429 || status.is_server_error() {
                    Tried::Retry(format!("answered {status}"))
                } else {
                    Tried::Refused(format!(
                        "answered {status}: {}",
                        text.chars().take(300).collect::<String>()
                    ))
                }
            })
            .await
            .unwrap_or_else(|_| Tried::Retry(format!("no answer within {:?}", self.timeout)));
            match tried {
                Tried::Delivered => return true,
                Tried::Refused(why) => {
                    tracing::error!(
                        why,
                        node = alert.node_id,
                        "AlertRefused: the service refused the message; check the route's url and key"
                    );
                    return false;
                }
                Tried::Retry(why) => {
                    tracing::warn!(attempt, why, node = alert.node_id, "AlertRouteFailed");
                    if attempt == self.attempts {
                        break;
                    }
                    tokio::select! {
                        () = shutdown.cancelled() => return false,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A plain HTTP receiver on 127.0.0.1: answers each POST with the next status of
    /// `statuses` (then 200) and keeps the bodies.
    async fn receiver(statuses: Vec<u16>) -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&bodies);
        let statuses = Arc::new(Mutex::new(VecDeque::from(statuses)));
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let kept = Arc::clone(&kept);
                let statuses = Arc::clone(&statuses);
                tokio::spawn(async move {
                    loop {
                        let mut buf = Vec::new();
                        let mut chunk = [0u8; 4096];
                        let body_start = loop {
                            let Ok(n) = stream.read(&mut chunk).await else {
                                return;
                            };
                            if n == 0 {
                                return;
                            }
                            buf.extend_from_slice(&chunk[..n]);
                            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break i + 4;
                            }
                        };
                        let head = String::from_utf8_lossy(&buf[..body_start]).to_lowercase();
                        let length: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        while buf.len() < body_start + length {
                            let Ok(n) = stream.read(&mut chunk).await else {
                                return;
                            };
                            if n == 0 {
                                return;
                            }
                            buf.extend_from_slice(&chunk[..n]);
                        }
                        let status = statuses.lock().expect("lock").pop_front().unwrap_or(200);
                        if status == 200 {
                            let body =
                                serde_json::from_slice(&buf[body_start..body_start + length])
                                    .unwrap_or_default();
                            kept.lock().expect("lock").push(body);
                        }
                        let answer = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n");
                        if stream.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (url, bodies)
    }

    fn finding(node: &str, kind: &str, event: &'static str) -> Alert {
        Alert {
            event,
            node_id: node.into(),
            network: "finney".into(),
            kind: kind.into(),
            severity: "critical",
            summary: format!("{kind} on {node}"),
            at_unix_ms: 1_796_601_046_000,
        }
    }

    fn settings(url: &str, route: RouteSettings) -> AlertSettings {
        AlertSettings {
            timeout_ms: 2000,
            attempts: 3,
            routes: vec![RouteSettings {
                name: "r".into(),
                url: url.into(),
                ..route
            }],
            ..AlertSettings::default()
        }
    }

    async fn settle(bodies: &Arc<Mutex<Vec<serde_json::Value>>>, want: usize) -> usize {
        for _ in 0..250 {
            if bodies.lock().expect("lock").len() >= want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A little more, to see anything that should not come.
        tokio::time::sleep(Duration::from_millis(100)).await;
        bodies.lock().expect("lock").len()
    }

    #[tokio::test]
    async fn repeats_are_suppressed_until_the_problem_clears_and_resolves_follow_triggers_only() {
        let (url, bodies) = receiver(Vec::new()).await;
        let metrics = Arc::new(Metrics::default());
        let tasks = TaskTracker::new();
        let alerts = Alerts::spawn(
            &settings(&url, RouteSettings::default()),
            Arc::clone(&metrics),
            CancellationToken::new(),
            &tasks,
        );
        alerts.send(finding("val-b", "block_lag", "finding_cleared")); // never triggered: not sent
        alerts.send(finding("val-a", "block_lag", "finding_raised"));
        alerts.send(finding("val-a", "block_lag", "finding_raised")); // a repeat
        alerts.send(finding("val-a", "block_lag", "finding_cleared"));
        alerts.send(finding("val-a", "block_lag", "finding_raised")); // open again after clearing
        assert_eq!(settle(&bodies, 3).await, 3);
        let events: Vec<String> = bodies
            .lock()
            .expect("lock")
            .iter()
            .map(|b| b["event"].as_str().unwrap_or("").to_owned())
            .collect();
        assert_eq!(
            events,
            ["finding_raised", "finding_cleared", "finding_raised"]
        );
        let text = metrics.render();
        assert!(
            text.contains("guardian_alerts_total{reason=\"deduplicated\"} 1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_route_keeps_to_its_rate_and_its_severity_and_network() {
        let (url, bodies) = receiver(Vec::new()).await;
        let metrics = Arc::new(Metrics::default());
        let route = RouteSettings {
            max_per_minute: 2,
            min_severity: Severity::Critical,
            networks: vec!["finney".into()],
            ..RouteSettings::default()
        };
        let alerts = Alerts::spawn(
            &settings(&url, route),
            Arc::clone(&metrics),
            CancellationToken::new(),
            &TaskTracker::new(),
        );
        let mut warning = finding("val-w", "peers_low", "finding_raised");
        warning.severity = "warning";
        alerts.send(warning);
        let mut other_network = finding("val-t", "block_lag", "finding_raised");
        other_network.network = "test".into();
        alerts.send(other_network);
        for node in ["val-1", "val-2", "val-3", "val-4"] {
            alerts.send(finding(node, "block_lag", "finding_raised"));
        }
        assert_eq!(settle(&bodies, 2).await, 2);
        assert!(
            metrics
                .render()
                .contains("guardian_alerts_total{reason=\"rate_limited\"} 2")
        );
    }

    #[tokio::test]
    async fn a_resolve_is_never_rate_limited_and_a_networkless_remediation_alert_passes_the_filter()
    {
        let (url, bodies) = receiver(Vec::new()).await;
        let route = RouteSettings {
            max_per_minute: 1,
            networks: vec!["finney".into()],
            ..RouteSettings::default()
        };
        let alerts = Alerts::spawn(
            &settings(&url, route),
            Arc::new(Metrics::default()),
            CancellationToken::new(),
            &TaskTracker::new(),
        );
        alerts.send(finding("val-a", "block_lag", "finding_raised"));
        alerts.send(finding("val-a", "block_lag", "finding_cleared"));
        let mut kube = finding("val-k", "kubernetes_backlog", "remediation_alert");
        kube.network = String::new();
        assert!(alerts.routes[0].takes(&kube));
        assert_eq!(
            settle(&bodies, 2).await,
            2,
            "trigger and resolve both delivered within one minute's budget of 1"
        );
    }

    #[tokio::test]
    async fn server_errors_are_retried_and_a_refusal_is_not() {
        let (url, bodies) = receiver(vec![503, 429]).await;
        let metrics = Arc::new(Metrics::default());
        let alerts = Alerts::spawn(
            &settings(&url, RouteSettings::default()),
            Arc::clone(&metrics),
            CancellationToken::new(),
            &TaskTracker::new(),
        );
        alerts.send(finding("val-a", "block_lag", "finding_raised"));
        assert_eq!(settle(&bodies, 1).await, 1, "delivered on the third try");

        let (url, bodies) = receiver(vec![400, 400, 400]).await;
        let alerts = Alerts::spawn(
            &settings(&url, RouteSettings::default()),
            Arc::clone(&metrics),
            CancellationToken::new(),
            &TaskTracker::new(),
        );
        alerts.send(finding("val-a", "block_lag", "finding_raised"));
        alerts.send(finding("val-b", "block_lag", "finding_raised"));
        // Each is refused once and given up at once (a 400 is not retried).
        assert_eq!(settle(&bodies, 0).await, 0);
        for _ in 0..50 {
            if metrics
                .render()
                .contains("guardian_alerts_total{reason=\"failed\"} 2")
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            metrics
                .render()
                .contains("guardian_alerts_total{reason=\"failed\"} 2"),
            "{}",
            metrics.render()
        );
    }
}
