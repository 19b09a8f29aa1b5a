//! Alerts to a human: every `RemediationAlert` of the reconciler and every finding at or over
//! `[alerts] min_severity` is POSTed as JSON to `[alerts] webhook_url` (http or https with the
//! system's roots). Sending never blocks the control loop: alerts wait in a bounded queue,
//! each is tried `attempts` times with a timeout, and what cannot be queued or delivered is
//! counted (`guardian_alerts_total{reason}`) and logged, never silently lost.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::detect::Severity;
use crate::metrics::{Metrics, Reason};

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
    /// Alerts that may wait; beyond it new ones are dropped (counted). Default 1000.
    pub queue: usize,
}

impl Default for AlertSettings {
    fn default() -> Self {
        Self {
            webhook_url: String::new(),
            min_severity: Severity::Critical,
            timeout_ms: 5000,
            attempts: 3,
            queue: 1000,
        }
    }
}

impl AlertSettings {
    /// A problem with these settings, naming the field.
    pub fn problem(&self) -> Option<String> {
        let url = self.webhook_url.trim();
        if !url.is_empty() {
            match url.parse::<hyper::Uri>() {
                Ok(uri)
                    if matches!(uri.scheme_str(), Some("http" | "https"))
                        && uri.host().is_some() => {}
                Ok(_) => {
                    return Some(format!(
                        "alerts.webhook_url {url:?} must be an http:// or https:// URL with a host"
                    ));
                }
                Err(e) => return Some(format!("alerts.webhook_url {url:?} is not a URL: {e}")),
            }
        }
        if self.timeout_ms == 0 || self.attempts == 0 || self.queue == 0 {
            return Some("alerts.timeout_ms, attempts and queue must be at least 1".to_owned());
        }
        None
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
    queue: Option<mpsc::Sender<Alert>>,
    min_severity: Severity,
    metrics: Arc<Metrics>,
}

impl Alerts {
    /// Starts the sender task on `tasks` when a webhook is configured.
    pub fn spawn(
        settings: &AlertSettings,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
        tasks: &TaskTracker,
    ) -> Self {
        let url = settings.webhook_url.trim();
        let queue = if url.is_empty() {
            None
        } else {
            let (tx, rx) = mpsc::channel(settings.queue);
            let sender = Sender {
                url: url.to_owned(),
                timeout: Duration::from_millis(settings.timeout_ms),
                attempts: settings.attempts,
                metrics: Arc::clone(&metrics),
            };
            tasks.spawn(
                sender
                    .run(rx, shutdown)
                    .instrument(tracing::info_span!("alert_webhook")),
            );
            Some(tx)
        };
        Self {
            queue,
            min_severity: settings.min_severity,
            metrics,
        }
    }

    /// Whether a finding of `severity` alerts.
    pub fn wants(&self, severity: Severity) -> bool {
        severity >= self.min_severity
    }

    /// Queues `alert` for the webhook (no-op without one); never waits.
    pub fn send(&self, alert: Alert) {
        let Some(queue) = &self.queue else {
            return;
        };
        match queue.try_send(alert) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(alert)) => {
                self.count("dropped_queue_full");
                tracing::error!(
                    node = alert.node_id,
                    kind = alert.kind,
                    "AlertDropped: the webhook queue is full"
                );
            }
            Err(mpsc::error::TrySendError::Closed(alert)) => {
                self.count("dropped_sender_stopped");
                tracing::error!(
                    node = alert.node_id,
                    kind = alert.kind,
                    "AlertDropped: the webhook sender has stopped"
                );
            }
        }
    }

    fn count(&self, reason: &'static str) {
        self.metrics.alerts.get_or_create(&Reason { reason }).inc();
    }
}

struct Sender {
    url: String,
    timeout: Duration,
    attempts: u32,
    metrics: Arc<Metrics>,
}

impl Sender {
    async fn run(self, mut queue: mpsc::Receiver<Alert>, shutdown: CancellationToken) {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        let connector = match hyper_rustls::HttpsConnectorBuilder::new().with_native_roots() {
            Ok(builder) => builder.https_or_http().enable_http1().wrap_connector(http),
            Err(error) => {
                tracing::error!(%error, "AlertWebhookUnavailable: no system root certificates; alerts stay in the log");
                return;
            }
        };
        let client: Client<_, Full<Bytes>> =
            Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector);
        loop {
            let alert = tokio::select! {
                () = shutdown.cancelled() => break,
                next = queue.recv() => match next {
                    Some(alert) => alert,
                    None => break,
                },
            };
            let body = serde_json::to_vec(&alert).unwrap_or_default();
            let mut delivered = false;
            for attempt in 1..=self.attempts {
                let request = hyper::Request::post(&self.url)
                    .header("content-type", "application/json")
                    .header("user-agent", "guardian-server")
                    .body(Full::new(Bytes::from(body.clone())));
                let Ok(request) = request else { break };
                let outcome = tokio::time::timeout(self.timeout, async {
                    let response = client.request(request).await.map_err(|e| e.to_string())?;
                    let status = response.status();
                    // Read the body so the connection can be reused.
                    let _ = response.into_body().collect().await;
                    if status.is_success() {
                        Ok(())
                    } else {
                        Err(format!("answered {status}"))
                    }
                })
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {:?}", self.timeout)));
                match outcome {
                    Ok(()) => {
                        delivered = true;
                        break;
                    }
                    Err(why) => {
                        tracing::warn!(attempt, why, node = alert.node_id, "AlertWebhookFailed");
                        tokio::select! {
                            () = shutdown.cancelled() => break,
                            () = tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))) => {}
                        }
                    }
                }
            }
            let reason = if delivered { "delivered" } else { "failed" };
            self.metrics.alerts.get_or_create(&Reason { reason }).inc();
            if !delivered {
                tracing::error!(
                    node = alert.node_id,
                    kind = alert.kind,
                    summary = alert.summary,
                    "AlertNotDelivered"
                );
            }
        }
    }
}
