//! The Prometheus rules of deploy/prometheus/ in the real Prometheus (Debian's 2.42) scraping a
//! running server: the target is up, every rule evaluates without error, the per-node series
//! arrive, and the silent-agent alert goes pending for a node whose agent went away.
//! (`promtool test rules` checks each alert's logic on made-up series: scripts/check-prometheus.)

use std::path::PathBuf;
use std::time::Duration;

use guardian_tests::prometheus::Prometheus;
use guardian_tests::{Scratch, Server, eventually, stream_two_day_batches};

#[tokio::test]
async fn prometheus_scrapes_the_server_and_evaluates_every_rule() -> anyhow::Result<()> {
    let scratch = Scratch::new(&["val-a"])?;
    let config = scratch.server_config(&scratch.sqlite_url(), "")?;
    let server = Server::start(&config, scratch.path("server.log"))?;
    // A node that streamed and went away: known, not connected.
    stream_two_day_batches(&scratch, server.grpc, "val-a", 1..=3).await?;

    let rules =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus/guardian.rules.yml");
    let text = std::fs::read_to_string(&rules)?;
    let rule_count = text.matches("- record:").count() + text.matches("- alert:").count();
    let prometheus = Prometheus::start(
        &scratch.path("prometheus"),
        &[("guardian-server", server.admin)],
        &[rules],
    )?;
    let with_log =
        |e: anyhow::Error| e.context(format!("prometheus log:\n{}", prometheus.proc.log_text()));

    eventually(
        Duration::from_secs(40),
        "the server's target to be up",
        || async {
            let targets = prometheus.api("targets").ok()?;
            let active = targets["activeTargets"].as_array()?;
            (active.len() == 1
                && active[0]["health"] == "up"
                && active[0]["labels"]["job"] == "guardian-server")
                .then_some(())
        },
    )
    .await
    .map_err(with_log)?;

    let evaluated = eventually(
        Duration::from_secs(40),
        "every rule to evaluate without error",
        || async {
            let groups = prometheus.api("rules").ok()?;
            let rules: Vec<serde_json::Value> = groups["groups"]
                .as_array()?
                .iter()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .collect();
            let done = rules.len() == rule_count
                && rules.iter().all(|r| {
                    r["health"] == "ok"
                        && !r["lastEvaluation"]
                            .as_str()
                            .unwrap_or("0001")
                            .starts_with("0001")
                });
            done.then_some(rules)
        },
    )
    .await
    .map_err(with_log)?;
    assert_eq!(evaluated.len(), rule_count);

    // The per-node series, through Prometheus.
    let connected = eventually(
        Duration::from_secs(20),
        "guardian_node_connected of val-a",
        || async {
            let data = prometheus.api("query?query=guardian_node_connected").ok()?;
            let result = data["result"].as_array()?.first()?.clone();
            (result["metric"]["node"] == "val-a").then_some(result)
        },
    )
    .await?;
    assert_eq!(connected["value"][1], "0", "{connected}");
    assert_eq!(connected["metric"]["network"], "local", "{connected}");

    // A recording rule over them, and the alert on the silent agent (pending: `for: 5m`).
    let ratio = eventually(
        Duration::from_secs(20),
        "guardian:nodes_connected:ratio",
        || async {
            let data = prometheus
                .api("query?query=guardian:nodes_connected:ratio")
                .ok()?;
            data["result"]
                .as_array()?
                .first()
                .map(|r| r["value"][1].clone())
        },
    )
    .await?;
    assert_eq!(ratio, "0");
    eventually(
        Duration::from_secs(20),
        "GuardianAgentSilent to go pending for val-a",
        || async {
            let alerts = prometheus.api("alerts").ok()?;
            alerts["alerts"]
                .as_array()?
                .iter()
                .any(|a| {
                    a["labels"]["alertname"] == "GuardianAgentSilent"
                        && a["labels"]["node"] == "val-a"
                        && a["state"] == "pending"
                })
                .then_some(())
        },
    )
    .await?;
    // Each Prometheus query of the Argo Rollouts AnalysisTemplates (deploy/argo/) runs, its
    // args filled as a Rollout fills them; without rollout labels the answer is empty, which
    // every template's successCondition accepts (`len(result) == 0 || ...`).
    let argo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/argo");
    let mut queried = 0;
    for entry in std::fs::read_dir(&argo)? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let template: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&path)?)?;
        for metric in template["spec"]["metrics"]
            .as_sequence()
            .into_iter()
            .flatten()
        {
            let Some(query) = metric["provider"]["prometheus"]["query"].as_str() else {
                continue;
            };
            let mut filled = query.to_owned();
            for arg in template["spec"]["args"].as_sequence().into_iter().flatten() {
                let name = arg["name"].as_str().unwrap_or_default();
                let value = arg["value"].as_str().unwrap_or(match name {
                    "canary-hash" => "6d4f9c7b8", // pragma: allowlist secret (a pod-template hash)
                    "stable-hash" => "5c8e7a6b4", // pragma: allowlist secret (a pod-template hash)
                    _ => "unused",
                });
                filled = filled.replace(&format!("{{{{args.{name}}}}}"), value);
            }
            assert!(
                !filled.contains("{{"),
                "{}: an arg is left unfilled: {filled}",
                path.display()
            );
            let data = prometheus
                .query(&filled)
                .map_err(|e| e.context(format!("{}", path.display())))?;
            assert_eq!(data["resultType"], "vector", "{}: {data}", path.display());
            let condition = metric["successCondition"].as_str().unwrap_or_default();
            assert!(
                condition.starts_with("len(result) == 0 || "),
                "{}: {condition}",
                path.display()
            );
            queried += 1;
        }
    }
    assert_eq!(queried, 3, "the three Prometheus templates");

    // Every panel query of the Grafana server-health dashboard runs (Grafana's $__rate_interval
    // and the dashboard's $job filled in), and the ones over gauges of this server answer.
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/server-health.json"),
    )?)?;
    let mut panels = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"]
                .as_str()
                .expect("expr")
                .replace("$__rate_interval", "1m")
                .replace("$job", "guardian-server");
            let data = prometheus
                .query(&expr)
                .map_err(|e| e.context(format!("panel {}", panel["title"])))?;
            assert_eq!(
                data["resultType"], "vector",
                "panel {}: {data}",
                panel["title"]
            );
            panels += 1;
        }
    }
    assert_eq!(panels, 10);
    let phases =
        prometheus.query("sum by (phase) (guardian_node_phase{job=\"guardian-server\"})")?;
    assert!(
        phases["result"].as_array().is_some_and(|r| !r.is_empty()),
        "{phases}"
    );

    // Nothing else fires on a healthy, idle server.
    let alerts = prometheus.api("alerts")?;
    let others: Vec<_> = alerts["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["labels"]["alertname"] != "GuardianAgentSilent")
        .collect();
    assert!(others.is_empty(), "{others:?}");
    Ok(())
}
