//! GUARDIAN_LOG_FORMAT=json: both daemons write one JSON object a line (timestamp, level,
//! target, the event's fields flattened), which log pipelines take as they are; a format
//! that is neither text nor json is refused at start with the fix.

use std::time::Duration;

use guardian_tests::{Scratch, Server, binary, eventually, start_agent_with_env};

/// Every line of `log` as JSON, failing on the first line that is not.
fn json_lines(log: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    log.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| anyhow::anyhow!("not JSON ({e}): {l}")))
        .collect()
}

#[tokio::test]
async fn both_daemons_log_one_json_object_a_line_when_asked() -> anyhow::Result<()> {
    let scratch = Scratch::new(&["val-a"])?;
    let config = scratch.server_config(&scratch.sqlite_url(), "")?;
    let json = [("GUARDIAN_LOG_FORMAT", "json")];
    let server = Server::start_with_env(&config, scratch.path("server.log"), &json)?;
    let agent = start_agent_with_env(
        &scratch.agent_config("val-a", server.grpc, 200)?,
        scratch.path("agent.log"),
        &json,
    )?;
    let connected = eventually(
        Duration::from_secs(20),
        "the server to log AgentConnected as JSON",
        || async {
            let lines = json_lines(&server.proc.log_text()).ok()?;
            lines.into_iter().find(|l| l["message"] == "AgentConnected")
        },
    )
    .await?;
    assert_eq!(connected["node"], "val-a", "{connected}");
    assert_eq!(connected["level"], "INFO", "{connected}");
    assert!(
        connected["timestamp"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{connected}"
    );
    assert_eq!(
        connected["target"], "guardian_server::ingest",
        "{connected}"
    );

    let uplink = eventually(
        Duration::from_secs(20),
        "the agent to log UplinkConnected as JSON",
        || async {
            let lines = json_lines(&agent.log_text()).ok()?;
            lines.into_iter().find(|l| {
                l["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("UplinkConnected"))
            })
        },
    )
    .await?;
    assert_eq!(uplink["level"], "INFO", "{uplink}");
    // Debug lines carry their spans: the first ack comes a commit after the connect.
    eventually(
        Duration::from_secs(20),
        "a BatchAcked line in a node's span",
        || async {
            server
                .proc
                .log_text()
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .any(|l| l["message"] == "BatchAcked" && l["span"]["node"] == "val-a")
                .then_some(())
        },
    )
    .await?;
    // Every line so far is JSON.
    json_lines(&server.proc.log_text())?;
    json_lines(&agent.log_text())?;
    Ok(())
}

#[test]
fn an_unknown_log_format_is_refused_with_the_fix() -> anyhow::Result<()> {
    let scratch = Scratch::new(&["val-a"])?;
    let config = scratch.server_config(&scratch.sqlite_url(), "")?;
    for (daemon, config) in [
        ("guardian-server", config),
        (
            "guardian-agent",
            scratch.agent_config("val-a", "127.0.0.1:1".parse()?, 1000)?,
        ),
    ] {
        let out = std::process::Command::new(binary(daemon)?)
            .arg("--config")
            .arg(&config)
            .env("GUARDIAN_LOG_FORMAT", "xml")
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{daemon}: {err}");
        assert!(
            err.contains("GUARDIAN_LOG_FORMAT=\"xml\"") && err.contains("use text or json"),
            "{daemon}: {err}"
        );
    }
    Ok(())
}
