//! The analysis endpoint for rollout gates, as Argo Rollouts' `web` provider uses it: the
//! `guardian-risk` AnalysisTemplate of deploy/argo/ is read, its URL and header filled with a
//! live server's address and token, its `jsonPath` evaluated on the answer with a JSONPath
//! library and its `successCondition` applied; a missing or wrong token is refused.

use std::path::PathBuf;
use std::process::Command;

use guardian_tests::{
    Scratch, Server, eventually, hello_frame, raw_uplink, two_day_batch, wait_for_ack,
};

const TOKEN: &str = "analysis-test-token-8f1d";

/// `(status, body)` of an HTTPS GET to the server's analysis endpoint, trusting its CA.
fn get(scratch: &Scratch, url: &str, token: Option<&str>) -> anyhow::Result<(u16, String)> {
    let mut command = Command::new("curl");
    command
        .args(["-s", "-m", "10", "-w", "\n%{http_code}", "--cacert"])
        .arg(scratch.pki.ca());
    if let Some(token) = token {
        command.args(["-H", &format!("Authorization: Bearer {token}")]);
    }
    // The server certificate names localhost.
    let port = url
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next())
        .unwrap_or("0");
    command.args(["--resolve", &format!("localhost:{port}:127.0.0.1"), url]);
    let out = command.output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Ok((code.trim().parse().unwrap_or(0), body.to_owned()))
}

/// Argo's `successCondition` for a single comparison of `result` with a number.
fn condition_holds(condition: &str, result: f64) -> bool {
    let mut parts = condition.split_whitespace();
    let (Some("result"), Some(op), Some(bound)) = (parts.next(), parts.next(), parts.next()) else {
        panic!("not a `result OP NUMBER` condition: {condition}");
    };
    let bound: f64 = bound.parse().expect("a number");
    match op {
        "<" => result < bound,
        "<=" => result <= bound,
        ">" => result > bound,
        ">=" => result >= bound,
        other => panic!("operator {other}"),
    }
}

#[tokio::test]
async fn the_risk_template_reads_the_live_endpoint_and_a_wrong_token_is_refused()
-> anyhow::Result<()> {
    let scratch = Scratch::new(&["val-a", "val-b"])?;
    let hash: String = ring::digest::digest(&ring::digest::SHA256, TOKEN.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let config = scratch.server_config(
        &scratch.sqlite_url(),
        &format!("[analysis]\nlisten = \"127.0.0.1:0\"\ntoken_sha256 = [\"{hash}\"]\n"),
    )?;
    let server = Server::start(&config, scratch.path("server.log"))?;
    let address = server
        .analysis
        .expect("the listening line names the analysis address");
    // Two agents that stay connected (a node whose agent is away counts as risk 1).
    let mut streams = Vec::new();
    for node in ["val-a", "val-b"] {
        let (cert, key) = scratch.pki.node(node);
        let channel = scratch.channel(server.grpc, &cert, &key).await?;
        let (tx, mut replies) = raw_uplink(channel, vec![hello_frame(node, "local")])
            .await
            .map_err(|s| anyhow::anyhow!("{node} refused: {s:?}"))?;
        for seq in 1..=3 {
            tx.send(two_day_batch(seq)?).await?;
            wait_for_ack(&mut replies, seq).await?;
        }
        streams.push((tx, replies));
    }

    // The template, as Argo would fill it.
    let template: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/argo/guardian-risk.yaml"),
    )?)?;
    let metric = &template["spec"]["metrics"][0];
    let web = &metric["provider"]["web"];
    let base = format!("https://localhost:{}", address.port());
    let fill = |text: &str, scope: &str| {
        text.replace("{{args.guardian-url}}", &base)
            .replace("{{args.scope}}", scope)
            .replace("{{args.guardian-token}}", TOKEN)
    };
    let header = fill(web["headers"][0]["value"].as_str().expect("header"), "");
    let token = header.strip_prefix("Bearer ").expect("a bearer header");
    let json_path = web["jsonPath"].as_str().expect("jsonPath");
    // Kubernetes-style `{$.x}` braces around a JSONPath expression.
    let path =
        serde_json_path::JsonPath::parse(json_path.trim_start_matches('{').trim_end_matches('}'))?;
    let condition = metric["successCondition"]
        .as_str()
        .expect("successCondition");

    for scope in [
        "network=local",
        "node=val-a",
        "selector=network%3Dlocal,phase!%3Dfailed",
    ] {
        let url = fill(web["url"].as_str().expect("url"), scope);
        let (status, body) = get(&scratch, &url, Some(token))?;
        assert_eq!(status, 200, "{scope}: {body}");
        let answer: serde_json::Value = serde_json::from_str(&body)?;
        let result = path
            .query(&answer)
            .exactly_one()
            .map_err(|e| anyhow::anyhow!("{e}: {answer}"))?;
        let risk = result.as_f64().expect("a number");
        assert!((0.0..=1.0).contains(&risk), "{answer}");
        assert!(
            condition_holds(condition, risk),
            "a quiet fleet fails {condition}: {answer}"
        );
        let want_nodes = if scope.starts_with("node=") { 1 } else { 2 };
        assert_eq!(answer["nodes"], want_nodes, "{scope}: {answer}");
    }
    // The condition fails a risky reading: val-b's agent goes away, and a node of unknown
    // health counts as risk 1, so the gate stops a rollout that touches it.
    assert!(!condition_holds(condition, 0.75));
    drop(streams.pop());
    let url = fill(web["url"].as_str().expect("url"), "node=val-b");
    let risk = eventually(
        std::time::Duration::from_secs(10),
        "val-b to count as risk 1",
        || async {
            let (_, body) = get(&scratch, &url, Some(token)).ok()?;
            let answer: serde_json::Value = serde_json::from_str(&body).ok()?;
            let risk = path.query(&answer).exactly_one().ok()?.as_f64()?;
            (risk >= 1.0).then_some(risk)
        },
    )
    .await?;
    assert!(!condition_holds(condition, risk));

    // Refusals: no token, a wrong token, no scope, an unknown node or label.
    let url = format!("{base}/api/v1/risk?network=local");
    let (status, body) = get(&scratch, &url, None)?;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("bearer token"), "{body}");
    assert_eq!(get(&scratch, &url, Some("not-the-token"))?.0, 401);
    assert_eq!(
        get(&scratch, &format!("{base}/api/v1/risk"), Some(TOKEN))?.0,
        400
    );
    let (status, body) = get(
        &scratch,
        &format!("{base}/api/v1/risk?node=val-zz"),
        Some(TOKEN),
    )?;
    assert_eq!(status, 404, "{body}");
    let (status, body) = get(
        &scratch,
        &format!("{base}/api/v1/risk?selector=team%3Da"),
        Some(TOKEN),
    )?;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("unknown label"), "{body}");
    Ok(())
}
