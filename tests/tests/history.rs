//! History (Fleet API `GetHistory`, `guardianctl history`) and the per-node windows rebuilt
//! from the store at start, against the embedded store and ClickHouse, real processes.

use std::path::Path;
use std::time::Duration;

use guardian_proto::v1::{HistoryRequest, HistoryResponse};
use guardian_tests::clickhouse::ClickHouse;
use guardian_tests::{Scratch, Server, binary, eventually, fleet_node, settled, start_agent};
use tonic::Code;

type TestResult = anyhow::Result<()>;

const NODE: &str = "val-1";
const WAIT: Duration = Duration::from_secs(30);

async fn history(
    scratch: &Scratch,
    server: &Server,
    metric: &str,
    resolution_seconds: u32,
) -> Result<HistoryResponse, tonic::Status> {
    let mut client = scratch
        .operator(server.grpc)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let now = guardian_server::unix_ms();
    client
        .get_history(HistoryRequest {
            node_id: NODE.into(),
            metric: metric.into(),
            from_unix_ms: now - 3_600_000,
            to_unix_ms: now + 60_000,
            resolution_seconds,
        })
        .await
        .map(tonic::Response::into_inner)
}

/// The `cpu_busy_percent` history at `resolution_seconds`, once its points count `sent`
/// samples (ClickHouse lands them a moment after the ack).
async fn counting(
    scratch: &Scratch,
    server: &Server,
    resolution_seconds: u32,
    sent: u64,
) -> anyhow::Result<HistoryResponse> {
    let what = format!("the history at {resolution_seconds} s to count all {sent} samples");
    eventually(WAIT, &what, || async {
        let answer = history(scratch, server, "cpu_busy_percent", resolution_seconds)
            .await
            .ok()?;
        (answer.points.iter().map(|p| p.count).sum::<u64>() == sent).then_some(answer)
    })
    .await
}

async fn node(scratch: &Scratch, server: &Server) -> Option<guardian_proto::v1::Node> {
    fleet_node(scratch, server.grpc, NODE).await
}

/// Streams for a while, stops the agent, and returns the last committed seq.
async fn stream_then_stop(scratch: &Scratch, server: &Server, batches: u64) -> anyhow::Result<u64> {
    let mut agent = start_agent(
        &scratch.agent_config(NODE, server.grpc, 100)?,
        scratch.path("agent.log"),
    )?;
    eventually(WAIT, "batches to be committed", || async {
        node(scratch, server)
            .await
            .filter(|n| n.last_stored_seq >= batches)
    })
    .await?;
    assert_eq!(agent.terminate()?, Some(0));
    Ok(settled(scratch, server.grpc, NODE).await?.last_stored_seq)
}

fn with_port(config: &Path) -> anyhow::Result<()> {
    let port = guardian_tests::stable_port()?;
    let text = std::fs::read_to_string(config)?.replacen(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
        1,
    );
    std::fs::write(config, text)?;
    Ok(())
}

/// Restarts the server with no agent connected and checks the window came back from the store.
async fn windows_survive_a_restart(
    scratch: &Scratch,
    mut server: Server,
    config: &Path,
) -> anyhow::Result<Server> {
    let before = node(scratch, &server).await.map_or(0, |n| n.window_points);
    assert!(before > 0, "the window fills from live samples");
    server.proc.child.kill()?;
    server.proc.child.wait()?;
    let server = Server::start(config, scratch.path("server-2.log"))?;
    let after = node(scratch, &server).await;
    let after = after.as_ref().map_or(0, |n| n.window_points);
    assert_eq!(
        after,
        before,
        "the window is rebuilt from the store at start; log: {}",
        server.proc.log_text()
    );
    assert!(server.proc.log_text().contains("WindowsRebuilt"));
    Ok(server)
}

#[tokio::test]
async fn history_and_windows_from_the_embedded_store() -> TestResult {
    let scratch = Scratch::new(&[NODE])?;
    let config = scratch.server_config(&scratch.sqlite_url(), "")?;
    with_port(&config)?;
    let server = Server::start(&config, scratch.path("server-1.log"))?;
    let sent = stream_then_stop(&scratch, &server, 20).await?;

    let answer = history(&scratch, &server, "cpu_busy_percent", 1).await?;
    assert_eq!(answer.source, "embedded");
    assert_eq!(answer.unit, "%");
    let counted: u64 = answer.points.iter().map(|p| p.count).sum();
    assert_eq!(
        counted, sent,
        "one host sample per batch, every one counted"
    );
    assert!(
        answer
            .points
            .iter()
            .all(|p| p.min <= p.avg && p.avg <= p.max && (0.0..=100.0).contains(&p.avg))
    );
    // Coarser buckets hold the same samples.
    let coarse = history(&scratch, &server, "cpu_busy_percent", 60).await?;
    assert_eq!(coarse.points.iter().map(|p| p.count).sum::<u64>(), sent);
    assert!(coarse.points.len() <= 2, "{:?}", coarse.points);

    let wrong = history(&scratch, &server, "cpu_busy", 0)
        .await
        .expect_err("an unknown metric is refused");
    assert_eq!(wrong.code(), Code::InvalidArgument);
    assert!(
        wrong.message().contains("cpu_busy_percent"),
        "the refusal lists the known metrics: {}",
        wrong.message()
    );

    let out = std::process::Command::new(binary("guardianctl")?)
        .args(["history", "--node", NODE, "--metric", "mem_available_bytes"])
        .args(["--since", "10m", "--resolution", "1"])
        .arg("--server")
        .arg(format!("https://{}", server.grpc))
        .arg("--pki-dir")
        .arg(&scratch.pki.dir)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    assert!(text.contains("mem_available_bytes (bytes)"), "{text}");
    assert!(text.lines().count() >= 3, "{text}");

    windows_survive_a_restart(&scratch, server, &config).await?;
    Ok(())
}

#[tokio::test]
async fn history_and_windows_from_clickhouse() -> TestResult {
    let clickhouse = ClickHouse::start()?;
    let scratch = Scratch::new(&[NODE])?;
    let extra = format!(
        "[clickhouse]\nurl = \"{}\"\ndatabase = \"guardian\"\ninsert_max_delay_ms = 100\n",
        clickhouse.url()
    );
    let config = scratch.server_config(&scratch.sqlite_url(), &extra)?;
    with_port(&config)?;
    let server = Server::start(&config, scratch.path("server-1.log"))?;
    let sent = stream_then_stop(&scratch, &server, 20).await?;

    let raw = counting(&scratch, &server, 1, sent).await?;
    assert_eq!(raw.source, "raw");
    // ClickHouse writes an INSERT's materialized views after its raw table's part, so
    // the raw rows can be visible a moment before the rollup rows of the same INSERT.
    let rollup = counting(&scratch, &server, 60, sent).await?;
    assert_eq!(rollup.source, "rollup_1m");
    let raw_max = raw.points.iter().map(|p| p.max).fold(f64::MIN, f64::max);
    let rollup_max = rollup.points.iter().map(|p| p.max).fold(f64::MIN, f64::max);
    assert!(
        (raw_max - rollup_max).abs() < 1e-9,
        "{raw_max} vs {rollup_max}"
    );
    let hourly = counting(&scratch, &server, 3600, sent).await?;
    assert_eq!(hourly.source, "rollup_1h");

    windows_survive_a_restart(&scratch, server, &config).await?;
    Ok(())
}
