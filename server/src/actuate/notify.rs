//! How an [`Alert`] looks to each service a route sends to: the generic JSON webhook, Slack
//! (incoming webhook, Block Kit), Discord (webhook, embeds) and PagerDuty (Events API v2:
//! `trigger` with a stable `dedup_key` per finding, `resolve` when it clears). Pure: the
//! sender in [`super::alert`] delivers what these build.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::alert::Alert;

/// The services a route can send to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Service {
    /// The alert as JSON, as it is ([`Alert`]).
    #[default]
    Webhook,
    /// A Slack incoming webhook: Block Kit blocks with a plain-text fallback.
    Slack,
    /// A Discord webhook: one embed.
    Discord,
    /// PagerDuty Events API v2 (`routing_key` required).
    Pagerduty,
}

impl Service {
    /// The name used in config, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Webhook => "webhook",
            Self::Slack => "slack",
            Self::Discord => "discord",
            Self::Pagerduty => "pagerduty",
        }
    }

    /// The endpoint used when a route gives no `url` (only PagerDuty has a fixed one).
    pub fn default_url(self) -> Option<&'static str> {
        match self {
            Self::Pagerduty => Some("https://events.pagerduty.com/v2/enqueue"),
            _ => None,
        }
    }
}

/// Whether the alert reports a cleared finding (sent as a "resolved" message).
pub fn is_resolve(alert: &Alert) -> bool {
    alert.event == "finding_cleared"
}

/// The key that names one problem across its messages: the same finding kind on the same node
/// (or network) is one incident until it clears.
pub fn dedup_key(alert: &Alert) -> String {
    let subject = if alert.node_id.is_empty() {
        format!("network:{}", alert.network)
    } else {
        alert.node_id.clone()
    };
    format!("taonode-guardian/{subject}/{}", alert.kind)
}

/// RFC 3339 UTC time of `unix_ms`, with milliseconds.
fn rfc3339(unix_ms: i64) -> String {
    format!(
        "{}.{:03}Z",
        crate::utc(unix_ms).replacen(' ', "T", 1),
        unix_ms.rem_euclid(1000)
    )
}

/// `text` cut to at most `max` characters (with an ellipsis when cut).
fn cut(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

fn subject(alert: &Alert) -> String {
    match (alert.node_id.is_empty(), alert.network.is_empty()) {
        (false, false) => format!("{} ({})", alert.node_id, alert.network),
        (false, true) => alert.node_id.clone(),
        (true, _) => format!("network {}", alert.network),
    }
}

fn title(alert: &Alert) -> String {
    if is_resolve(alert) {
        format!("Resolved: {} on {}", alert.kind, subject(alert))
    } else if alert.event == "remediation_alert" {
        format!(
            "Remediation needs an operator: {} on {}",
            alert.kind,
            subject(alert)
        )
    } else {
        format!(
            "{} {} on {}",
            alert.severity.to_uppercase(),
            alert.kind,
            subject(alert)
        )
    }
}

/// The request body for `service`.
pub fn payload(service: Service, alert: &Alert, routing_key: &str) -> Value {
    match service {
        Service::Webhook => serde_json::to_value(alert).unwrap_or(Value::Null),
        Service::Slack => slack(alert),
        Service::Discord => discord(alert),
        Service::Pagerduty => pagerduty(alert, routing_key),
    }
}

/// Slack: `text` is the notification fallback; the header block's plain text is at most 150
/// characters and a section's text at most 3000 (Block Kit limits).
fn slack(alert: &Alert) -> Value {
    let title = title(alert);
    let icon = if is_resolve(alert) {
        ":white_check_mark:"
    } else if alert.severity == "critical" {
        ":rotating_light:"
    } else {
        ":warning:"
    };
    let mut fields = vec![
        json!({"type": "mrkdwn", "text": format!("*Node*\n{}", if alert.node_id.is_empty() { "-" } else { &alert.node_id })}),
        json!({"type": "mrkdwn", "text": format!("*Network*\n{}", if alert.network.is_empty() { "-" } else { &alert.network })}),
        json!({"type": "mrkdwn", "text": format!("*Kind*\n{}", alert.kind)}),
    ];
    if !is_resolve(alert) {
        fields.push(json!({"type": "mrkdwn", "text": format!("*Severity*\n{}", alert.severity)}));
    }
    json!({
        "text": cut(&format!("{title}: {}", alert.summary), 3000),
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": cut(&format!("{icon} {title}"), 150), "emoji": true}},
            {"type": "section", "text": {"type": "mrkdwn", "text": cut(&alert.summary, 3000)}, "fields": fields},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": format!("TaoNode Guardian · {} · {}", alert.event, rfc3339(alert.at_unix_ms))}]},
        ],
    })
}

/// Discord: one embed; title at most 256 characters, description 4096, field values 1024,
/// colour a 24-bit integer, timestamp ISO 8601.
fn discord(alert: &Alert) -> Value {
    let color = if is_resolve(alert) {
        0x2E_CC_71
    } else if alert.severity == "critical" {
        0xE7_4C_3C
    } else {
        0xF1_C4_0F
    };
    let field = |name: &str, value: &str| json!({"name": name, "value": cut(if value.is_empty() { "-" } else { value }, 1024), "inline": true});
    json!({
        "username": "TaoNode Guardian",
        "allowed_mentions": {"parse": []},
        "embeds": [{
            "title": cut(&title(alert), 256),
            "description": cut(&alert.summary, 4096),
            "color": color,
            "fields": [
                field("Node", &alert.node_id),
                field("Network", &alert.network),
                field("Kind", &alert.kind),
                field("Severity", if is_resolve(alert) { "resolved" } else { alert.severity }),
            ],
            "timestamp": rfc3339(alert.at_unix_ms),
            "footer": {"text": format!("TaoNode Guardian · {}", alert.event)},
        }],
    })
}

/// PagerDuty Events API v2: `trigger` (summary at most 1024 characters, severity critical,
/// error, warning or info) or `resolve` (routing key and dedup key only).
fn pagerduty(alert: &Alert, routing_key: &str) -> Value {
    if is_resolve(alert) {
        return json!({
            "routing_key": routing_key,
            "event_action": "resolve",
            "dedup_key": dedup_key(alert),
        });
    }
    let severity = match alert.severity {
        "critical" => "critical",
        "warning" => "warning",
        "info" => "info",
        _ => "error",
    };
    json!({
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": dedup_key(alert),
        "payload": {
            "summary": cut(&format!("{}: {}", title(alert), alert.summary), 1024),
            "source": if alert.node_id.is_empty() { format!("network:{}", alert.network) } else { alert.node_id.clone() },
            "severity": severity,
            "timestamp": rfc3339(alert.at_unix_ms),
            "component": "validator",
            "group": alert.network,
            "class": alert.kind,
            "custom_details": {"event": alert.event, "summary": alert.summary},
        },
        "client": "TaoNode Guardian",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(event: &'static str) -> Alert {
        Alert {
            event,
            node_id: "val-a".into(),
            network: "finney".into(),
            kind: "block_lag".into(),
            severity: "critical",
            summary: "Node is 40 blocks behind".into(),
            at_unix_ms: 1_796_601_046_123,
        }
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_796_601_046_123), "2026-12-06T23:50:46.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn pagerduty_triggers_and_resolves_one_incident_per_node_and_kind() {
        let trigger = payload(Service::Pagerduty, &alert("finding_raised"), "k");
        let resolve = payload(Service::Pagerduty, &alert("finding_cleared"), "k");
        assert_eq!(trigger["event_action"], "trigger");
        assert_eq!(resolve["event_action"], "resolve");
        assert_eq!(trigger["dedup_key"], resolve["dedup_key"]);
        assert_eq!(trigger["dedup_key"], "taonode-guardian/val-a/block_lag");
        assert!(resolve.get("payload").is_none());
    }

    #[test]
    fn long_texts_are_cut_to_the_services_limits() {
        let mut long = alert("finding_raised");
        long.summary = "x".repeat(5000);
        long.kind = "k".repeat(300);
        let slack = payload(Service::Slack, &long, "");
        assert!(
            slack["blocks"][0]["text"]["text"]
                .as_str()
                .is_some_and(|t| t.chars().count() <= 150)
        );
        let discord = payload(Service::Discord, &long, "");
        assert!(
            discord["embeds"][0]["title"]
                .as_str()
                .is_some_and(|t| t.chars().count() <= 256)
        );
        assert!(
            discord["embeds"][0]["description"]
                .as_str()
                .is_some_and(|t| t.chars().count() <= 4096)
        );
        let pd = payload(Service::Pagerduty, &long, "k");
        assert!(
            pd["payload"]["summary"]
                .as_str()
                .is_some_and(|t| t.chars().count() <= 1024)
        );
    }
}
