//! Alert routes end to end: a real server, a fake subtensor node and an agent; the node falls
//! behind (a critical `block_lag`), then heals. Local receivers stand in for Slack, Discord,
//! PagerDuty and a generic webhook, and check each message against the service's documented
//! format: Slack incoming webhooks (Block Kit), Discord webhooks (embeds), PagerDuty Events
//! API v2 (trigger, then resolve with the same dedup_key).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use guardian_tests::fake_node::{FakeNode, FakeNodeConfig};
use guardian_tests::{Scratch, Server, eventually, start_agent};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use serde_json::Value;

type Received = Arc<Mutex<Vec<(String, Value)>>>;

/// One HTTP server for all four services, told apart by path; answers as each service does.
async fn receivers() -> anyhow::Result<(SocketAddr, Received)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let received: Received = Arc::default();
    let kept = Arc::clone(&received);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let kept = Arc::clone(&kept);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let kept = Arc::clone(&kept);
                    async move {
                        let path = request.uri().path().to_owned();
                        let json = request
                            .headers()
                            .get("content-type")
                            .is_some_and(|v| v == "application/json");
                        let body = request
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        let ok = json && !value.is_null();
                        kept.lock().expect("lock").push((path.clone(), value));
                        // PagerDuty answers 202 with a JSON status; Slack "ok"; Discord 204.
                        let (status, text) = match (ok, path.as_str()) {
                            (false, _) => (400, "invalid_payload"),
                            (true, "/pagerduty") => {
                                (202, r#"{"status":"success","message":"Event processed"}"#)
                            }
                            (true, "/discord") => (204, ""),
                            (true, _) => (200, "ok"),
                        };
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from(text)))
                                .expect("response"),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok((address, received))
}

fn is_rfc3339(text: &Value) -> bool {
    text.as_str().is_some_and(|t| {
        t.len() >= 20 && t.as_bytes()[4] == b'-' && t.contains('T') && t.ends_with('Z')
    })
}

fn chars(v: &Value) -> usize {
    v.as_str().map_or(usize::MAX, |s| s.chars().count())
}

/// Slack incoming webhook: `text` (the fallback) and `blocks` of known types within limits.
fn check_slack(body: &Value) {
    assert!(
        chars(&body["text"]) <= 40_000 && chars(&body["text"]) > 0,
        "slack text: {body}"
    );
    let blocks = body["blocks"].as_array().expect("slack blocks");
    assert!(!blocks.is_empty() && blocks.len() <= 50, "{body}");
    for block in blocks {
        match block["type"].as_str() {
            Some("header") => {
                assert_eq!(block["text"]["type"], "plain_text", "{block}");
                assert!(chars(&block["text"]["text"]) <= 150, "{block}");
            }
            Some("section") => {
                assert!(chars(&block["text"]["text"]) <= 3000, "{block}");
                let fields = block["fields"].as_array().expect("fields");
                assert!(fields.len() <= 10, "{block}");
                assert!(
                    fields
                        .iter()
                        .all(|f| f["type"] == "mrkdwn" && chars(&f["text"]) <= 2000),
                    "{block}"
                );
            }
            Some("context") => assert!(
                block["elements"]
                    .as_array()
                    .is_some_and(|e| !e.is_empty() && e.len() <= 10),
                "{block}"
            ),
            other => panic!("unexpected Slack block type {other:?}"),
        }
    }
}

/// Discord webhook: at most 10 embeds, each within Discord's limits.
fn check_discord(body: &Value) {
    let embeds = body["embeds"].as_array().expect("discord embeds");
    assert!(!embeds.is_empty() && embeds.len() <= 10, "{body}");
    for embed in embeds {
        assert!(chars(&embed["title"]) <= 256, "{embed}");
        assert!(chars(&embed["description"]) <= 4096, "{embed}");
        assert!(
            embed["color"].as_u64().is_some_and(|c| c <= 0xFF_FF_FF),
            "{embed}"
        );
        assert!(is_rfc3339(&embed["timestamp"]), "{embed}");
        let fields = embed["fields"].as_array().expect("fields");
        assert!(fields.len() <= 25, "{embed}");
        for f in fields {
            assert!(
                chars(&f["name"]) <= 256 && chars(&f["value"]) <= 1024 && chars(&f["value"]) > 0,
                "{f}"
            );
        }
    }
}

/// PagerDuty Events API v2: a trigger with the required payload fields, or a resolve.
fn check_pagerduty(body: &Value, routing_key: &str) {
    assert_eq!(body["routing_key"], routing_key, "{body}");
    assert!(chars(&body["dedup_key"]) <= 255, "{body}");
    match body["event_action"].as_str() {
        Some("trigger") => {
            let payload = &body["payload"];
            assert!(
                chars(&payload["summary"]) <= 1024 && chars(&payload["summary"]) > 0,
                "{body}"
            );
            assert!(
                chars(&payload["source"]) > 0 && chars(&payload["source"]) < usize::MAX,
                "{body}"
            );
            assert!(
                ["critical", "error", "warning", "info"]
                    .contains(&payload["severity"].as_str().unwrap_or("")),
                "{body}"
            );
            assert!(is_rfc3339(&payload["timestamp"]), "{body}");
        }
        Some("resolve") => assert!(body.get("payload").is_none(), "{body}"),
        other => panic!("event_action {other:?}"),
    }
}

#[tokio::test]
async fn a_lagging_node_is_sent_to_every_route_in_its_format_and_resolved_when_it_heals()
-> anyhow::Result<()> {
    let (address, received) = receivers().await?;
    let key = "R0UTINGKEY0123456789abcdef012345"; // pragma: allowlist secret (a test routing key)
    let scratch = Scratch::new(&["val-1"])?;
    let routes = format!(
        "[detect]\nfrozen_head_ms = 2500\n[reconcile]\nevaluate_interval_ms = 200\n\
         [reconcile.policy]\nmax_block_lag = 5\nrecovery_strategy = \"cordon-and-alert\"\nconfirm_samples = 2\n\
         [alerts]\nwebhook_url = \"http://{address}/webhook\"\n\
         [[alerts.routes]]\nname = \"chat\"\nservice = \"slack\"\nurl = \"http://{address}/slack\"\n\
         [[alerts.routes]]\nname = \"community\"\nservice = \"discord\"\nurl = \"http://{address}/discord\"\nnetworks = [\"local\"]\n\
         [[alerts.routes]]\nname = \"oncall\"\nservice = \"pagerduty\"\nurl = \"http://{address}/pagerduty\"\nrouting_key = \"{key}\"\n\
         [[alerts.routes]]\nname = \"elsewhere\"\nservice = \"slack\"\nurl = \"http://{address}/other-network\"\nnetworks = [\"finney\"]\n"
    );
    let server = Server::start(
        &scratch.server_config(&scratch.sqlite_url(), &routes)?,
        scratch.path("server.log"),
    )?;
    let node = FakeNode::start(FakeNodeConfig::default()).await?;
    let agent_extra = format!(
        "[chain]\nendpoint = \"{}\"\ncall_timeout_ms = 300\n",
        node.ws_url()
    );
    let _agent = start_agent(
        &scratch.agent_config_with("val-1", server.grpc, 400, &agent_extra)?,
        scratch.path("agent.log"),
    )?;
    let block_lag = |path: &str, action: &str| {
        let received = Arc::clone(&received);
        let path = path.to_owned();
        let action = action.to_owned();
        move || {
            let received = Arc::clone(&received);
            let path = path.clone();
            let action = action.clone();
            async move {
                received.lock().expect("lock").iter().find_map(|(p, body)| {
                    let text = body.to_string();
                    (*p == path && text.contains("block_lag") && text.contains(&action))
                        .then(|| body.clone())
                })
            }
        }
    };
    // Let the node settle, then make it fall behind.
    tokio::time::sleep(Duration::from_secs(3)).await;
    node.lag(40);
    let log = || std::fs::read_to_string(scratch.path("server.log")).unwrap_or_default();
    let pd = eventually(
        Duration::from_secs(30),
        "a PagerDuty trigger",
        block_lag("/pagerduty", "trigger"),
    )
    .await
    .map_err(|e| e.context(log()))?;
    check_pagerduty(&pd, key);
    let slack = eventually(
        Duration::from_secs(10),
        "a Slack message",
        block_lag("/slack", "CRITICAL"),
    )
    .await?;
    check_slack(&slack);
    let discord = eventually(
        Duration::from_secs(10),
        "a Discord embed",
        block_lag("/discord", "CRITICAL"),
    )
    .await?;
    check_discord(&discord);
    let webhook = eventually(
        Duration::from_secs(10),
        "the generic webhook",
        block_lag("/webhook", "finding_raised"),
    )
    .await?;
    assert_eq!(webhook["severity"], "critical", "{webhook}");
    assert_eq!(webhook["node_id"], "val-1", "{webhook}");

    // Healed: the finding clears, and each service hears it was resolved.
    node.heal();
    let resolve = eventually(
        Duration::from_secs(30),
        "a PagerDuty resolve",
        block_lag("/pagerduty", "resolve"),
    )
    .await?;
    check_pagerduty(&resolve, key);
    assert_eq!(
        resolve["dedup_key"], pd["dedup_key"],
        "resolve names the trigger's incident"
    );
    let slack = eventually(
        Duration::from_secs(10),
        "a Slack resolved message",
        block_lag("/slack", "Resolved"),
    )
    .await?;
    check_slack(&slack);
    let discord = eventually(
        Duration::from_secs(10),
        "a Discord resolved embed",
        block_lag("/discord", "Resolved"),
    )
    .await?;
    check_discord(&discord);

    // Every message passed its format; the other network's route heard nothing; no service
    // got the same trigger twice.
    let all = received.lock().expect("lock").clone();
    for (path, body) in &all {
        match path.as_str() {
            "/slack" => check_slack(body),
            "/discord" => check_discord(body),
            "/pagerduty" => check_pagerduty(body, key),
            "/webhook" => assert!(body["event"].is_string(), "{body}"),
            other => panic!("a message to {other}: {body}"),
        }
    }
    let triggers = all
        .iter()
        .filter(|(p, b)| {
            p == "/pagerduty" && b["event_action"] == "trigger" && b["dedup_key"] == pd["dedup_key"]
        })
        .count();
    assert_eq!(triggers, 1, "{all:?}");
    Ok(())
}
