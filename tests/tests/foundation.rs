//! Foundation scenarios: real `guardian-server`, `guardian-agent` and `guardianctl`
//! processes on 127.0.0.1 with a throwaway PKI.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use guardian_agent::spool::Spool;
use guardian_proto::v1::{
    AgentFrame, GetNodeRequest, Hello, ListNodesRequest, NodeDescriptor, Sample, SampleBatch,
    SamplerUnavailable, agent_frame, sample, server_frame,
};
use guardian_server::identity::NodeId;
use guardian_server::store::Ledger;
use guardian_tests::{
    Postgres, Scratch, Server, binary, encode, eventually, raw_uplink, settled, start_agent,
};
use tonic::Code;

type TestResult = anyhow::Result<()>;

const WAIT: Duration = Duration::from_secs(20);

async fn last_seq(scratch: &Scratch, server: &Server, node: &str) -> Option<u64> {
    let mut client = scratch.operator(server.grpc).await.ok()?;
    let node = client
        .get_node(GetNodeRequest {
            node_id: node.into(),
        })
        .await
        .ok()?
        .into_inner();
    Some(node.last_stored_seq)
}

async fn wait_for_batches(
    scratch: &Scratch,
    server: &Server,
    node: &str,
    at_least: u64,
) -> anyhow::Result<u64> {
    eventually(
        WAIT,
        &format!("{node} to store {at_least} batches"),
        || async {
            last_seq(scratch, server, node)
                .await
                .filter(|seq| *seq >= at_least)
        },
    )
    .await
}

/// What an agent's spool says it sent, read after the agent exited (the spool is locked while
/// it runs): `(sent, waiting, dropped)`, where `sent` is the highest seq it ever numbered,
/// `waiting` the seqs still on disk without an ack and `dropped` its counted drops.
fn spool_account(dir: &Path) -> anyhow::Result<(u64, Vec<u64>, u64)> {
    let mut spool = Spool::open(dir, 1 << 40)?;
    let sent = spool
        .next_seq()
        .ok_or_else(|| anyhow::anyhow!("the spool in {} was never numbered", dir.display()))?
        - 1;
    let waiting = spool
        .batches_after(0, usize::MAX)
        .iter()
        .map(|b| b.seq)
        .collect();
    Ok((sent, waiting, spool.dropped_batches()))
}

/// Every seq the ledger at `url` holds for `node`, ascending (one per stored batch row).
async fn stored_seqs(url: &str, node: &str) -> anyhow::Result<Vec<u64>> {
    use sqlx::Connection;
    const SQL: &str = "SELECT seq FROM batches WHERE node_id = $1 ORDER BY seq";
    let seqs: Vec<i64> = if url.starts_with("postgres") {
        let mut conn = sqlx::PgConnection::connect(url).await?;
        sqlx::query_scalar(SQL)
            .bind(node)
            .fetch_all(&mut conn)
            .await?
    } else {
        let mut conn = sqlx::SqliteConnection::connect(url).await?;
        sqlx::query_scalar(SQL)
            .bind(node)
            .fetch_all(&mut conn)
            .await?
    };
    seqs.into_iter()
        .map(|s| u64::try_from(s).map_err(anyhow::Error::from))
        .collect()
}

/// Checks the ledger against what the (exited) agent of `node` sent: every seq in `1..=sent`
/// is stored exactly once, except a tail still waiting in its spool for an ack; nothing
/// beyond `sent` is stored; the agent dropped nothing; one host sample per stored batch.
async fn assert_stored_what_the_agent_sent(
    scratch: &Scratch,
    server: &Server,
    url: &str,
    node: &str,
) -> anyhow::Result<u64> {
    // A batch the agent sent just before it left may still be committing: read the ledger
    // once the server has ended the agent's stream.
    settled(scratch, server.grpc, node).await?;
    let (sent, waiting, dropped) = spool_account(&scratch.path(&format!("spool-{node}")))?;
    let stored = stored_seqs(url, node).await?;
    assert_eq!(dropped, 0, "the agent dropped no batch");
    // A batch sent but not acked before the agent stopped may or may not be stored yet.
    let acked = sent.saturating_sub(waiting.len() as u64);
    assert_eq!(
        waiting,
        (acked + 1..=sent).collect::<Vec<_>>(),
        "the spool holds only the unacked tail of 1..={sent}"
    );
    let expected: Vec<u64> = (1..=u64::try_from(stored.len())?).collect();
    assert_eq!(stored, expected, "stored seqs are 1..=n, each once, no gap");
    assert!(
        (acked..=sent).contains(&(stored.len() as u64)),
        "the agent sent 1..={sent} ({} waiting), the ledger holds 1..={}",
        waiting.len(),
        stored.len()
    );
    let ledger = Ledger::open(url).await?;
    let (batches, _, host_samples) = ledger.counts(&NodeId::parse(node)?).await?;
    ledger.close().await;
    assert_eq!(
        (u64::try_from(batches)?, u64::try_from(host_samples)?),
        (stored.len() as u64, stored.len() as u64),
        "every stored batch holds its one host sample"
    );
    Ok(sent)
}

/// Opens an Uplink stream, sends `frames`, and returns the status the server ended it with
/// (before or after its first reply); fails if the server accepts the stream.
async fn refusal(
    channel: tonic::transport::Channel,
    frames: Vec<Vec<u8>>,
) -> anyhow::Result<tonic::Status> {
    match raw_uplink(channel, frames).await {
        Err(status) => Ok(status),
        Ok((_tx, mut replies)) => replies
            .message()
            .await
            .err()
            .ok_or_else(|| anyhow::anyhow!("the server accepted the stream")),
    }
}

fn hello(node: &str) -> AgentFrame {
    AgentFrame {
        frame: Some(agent_frame::Frame::Hello(Hello {
            agent_version: "test".into(),
            node: Some(NodeDescriptor {
                node_id: node.into(),
                ..NodeDescriptor::default()
            }),
            capabilities: vec![],
            last_acked_seq: 0,
        })),
    }
}

#[tokio::test]
async fn agent_samples_reach_the_store_and_status_shows_fresh_host_figures() -> TestResult {
    let scratch = Scratch::new(&["val-1"])?;
    let server = Server::start(
        &scratch.server_config(&scratch.sqlite_url(), "")?,
        scratch.path("server.log"),
    )?;
    let mut agent = start_agent(
        &scratch.agent_config("val-1", server.grpc, 200)?,
        scratch.path("agent.log"),
    )?;
    wait_for_batches(&scratch, &server, "val-1", 3).await?;

    let ctl = |format: &str| {
        Command::new(binary("guardianctl")?)
            .args([
                "status",
                "--server",
                &format!("https://{}", server.grpc),
                "--output",
                format,
            ])
            .arg("--pki-dir")
            .arg(&scratch.pki.dir)
            .output()
            .map_err(anyhow::Error::from)
    };
    let json = ctl("json")?;
    assert!(
        json.status.success(),
        "{}",
        String::from_utf8_lossy(&json.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&json.stdout)?;
    let row = &rows[0];
    assert_eq!(row["node_id"], "val-1");
    assert_eq!(row["connected"], true);
    let age = row["last_sample_age_ms"].as_i64().unwrap_or(i64::MAX);
    assert!((0..5000).contains(&age), "sample age {age} ms");
    assert!(row["host"]["mem_total_bytes"].as_u64().unwrap_or(0) > 0);
    assert!(row["host"]["cpu_count"].as_u64().unwrap_or(0) >= 1);
    assert!(row["host"]["chain_data_used_percent"].as_f64().is_some());

    let table = ctl("table")?;
    let table = String::from_utf8(table.stdout)?;
    assert!(table.starts_with("NODE"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("val-1") && l.contains("connected")),
        "{table}"
    );

    // The rows are in the SQLite file: every batch the agent sent once, one host sample each.
    assert_eq!(agent.terminate()?, Some(0), "{}", agent.log_text());
    let sent = assert_stored_what_the_agent_sent(&scratch, &server, &scratch.sqlite_url(), "val-1")
        .await?;
    assert!(sent >= 3);

    let metrics = reqwest_like_get(server.admin, "/metrics").await?;
    assert!(
        metrics.contains("guardian_ingest_batches_committed_total"),
        "{metrics}"
    );
    assert!(
        reqwest_like_get(server.admin, "/healthz")
            .await?
            .contains("ok")
    );
    assert!(
        reqwest_like_get(server.admin, "/readyz")
            .await?
            .contains("ready")
    );
    Ok(())
}

/// A minimal HTTP/1.0 GET (the admin port is plain HTTP).
async fn reqwest_like_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    Ok(body)
}

#[tokio::test]
async fn clients_from_another_ca_and_plaintext_clients_are_refused() -> TestResult {
    let scratch = Scratch::new(&["val-1"])?;
    let rogue = Scratch::new(&["val-1"])?;
    let server = Server::start(
        &scratch.server_config(&scratch.sqlite_url(), "")?,
        scratch.path("server.log"),
    )?;

    // Trusts the real CA (so the server's certificate checks out) but presents a rogue
    // operator certificate: the server must end the handshake.
    let (cert, key) = rogue.pki.operator();
    let refused = match scratch.channel(server.grpc, &cert, &key).await {
        Err(_) => true,
        Ok(channel) => guardian_proto::v1::fleet_client::FleetClient::new(channel)
            .list_nodes(ListNodesRequest {})
            .await
            .is_err(),
    };
    assert!(
        refused,
        "a rogue-CA certificate must not reach the Fleet API"
    );

    let (cert, key) = rogue.pki.node("val-1");
    let refused = match scratch.channel(server.grpc, &cert, &key).await {
        Err(_) => true,
        Ok(channel) => raw_uplink(channel, vec![encode(&hello("val-1"))])
            .await
            .is_err(),
    };
    assert!(refused, "a rogue-CA agent must not stream");

    let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", server.grpc))?
        .connect_timeout(Duration::from_secs(3));
    let refused = match plain.connect().await {
        Err(_) => true,
        Ok(channel) => guardian_proto::v1::fleet_client::FleetClient::new(channel)
            .list_nodes(ListNodesRequest {})
            .await
            .is_err(),
    };
    assert!(refused, "plaintext must be refused");

    // The real operator still gets through and no node was registered by the rogues.
    let nodes = scratch
        .operator(server.grpc)
        .await?
        .list_nodes(ListNodesRequest {})
        .await?
        .into_inner()
        .nodes;
    assert!(nodes.is_empty(), "{nodes:?}");
    Ok(())
}

#[tokio::test]
async fn hello_naming_another_network_than_the_certificate_is_refused_and_recorded() -> TestResult {
    // The certificate binds val-1 to finney: it cannot join (and be judged with, or pull the
    // tip of) another network by saying so.
    let scratch = Scratch::with_network(&["val-1"], Some("finney"))?;
    let server = Server::start(
        &scratch.server_config(&scratch.sqlite_url(), "")?,
        scratch.path("server.log"),
    )?;
    let (cert, key) = scratch.pki.node("val-1");
    let hello_in = |network: &str| {
        let mut frame = hello("val-1");
        if let Some(agent_frame::Frame::Hello(hello)) = &mut frame.frame
            && let Some(node) = &mut hello.node
        {
            node.network = network.into();
        }
        encode(&frame)
    };
    let channel = scratch.channel(server.grpc, &cert, &key).await?;
    let status = refusal(channel, vec![hello_in("local")]).await?;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("\"finney\"") && status.message().contains("\"local\""),
        "{}",
        status.message()
    );
    let ledger = Ledger::open(&scratch.sqlite_url()).await?;
    let events = ledger.security_events().await?;
    let event = events
        .iter()
        .find(|e| e.kind == "hello_network_mismatch")
        .ok_or_else(|| anyhow::anyhow!("refusal not recorded: {events:?}"))?;
    assert_eq!(event.peer, "node/val-1");

    // The network it is bound to is welcome.
    let channel = scratch.channel(server.grpc, &cert, &key).await?;
    let (_tx, mut replies) = raw_uplink(channel, vec![hello_in("finney")])
        .await
        .map_err(|s| anyhow::anyhow!("refused: {s:?}"))?;
    let welcome = replies.message().await?;
    assert!(
        matches!(
            welcome.and_then(|f| f.frame),
            Some(server_frame::Frame::Welcome(_))
        ),
        "no Welcome for the bound network"
    );
    Ok(())
}

#[tokio::test]
async fn hello_naming_another_node_is_refused_and_recorded() -> TestResult {
    let scratch = Scratch::new(&["val-1", "val-2"])?;
    let server = Server::start(
        &scratch.server_config(&scratch.sqlite_url(), "")?,
        scratch.path("server.log"),
    )?;
    let (cert, key) = scratch.pki.node("val-1");
    let channel = scratch.channel(server.grpc, &cert, &key).await?;
    let status = refusal(channel, vec![encode(&hello("val-2"))]).await?;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("val-2"), "{}", status.message());

    let ledger = Ledger::open(&scratch.sqlite_url()).await?;
    let events = ledger.security_events().await?;
    let event = events
        .iter()
        .find(|e| e.kind == "hello_identity_mismatch")
        .ok_or_else(|| anyhow::anyhow!("refusal not recorded: {events:?}"))?;
    assert_eq!(event.peer, "node/val-1");
    let nodes = scratch
        .operator(server.grpc)
        .await?
        .list_nodes(ListNodesRequest {})
        .await?
        .into_inner()
        .nodes;
    assert!(
        nodes.is_empty(),
        "a refused Hello must not register a node: {nodes:?}"
    );
    Ok(())
}

#[tokio::test]
async fn an_agent_certificate_cannot_call_the_fleet_api() -> TestResult {
    let scratch = Scratch::new(&["val-1"])?;
    let server = Server::start(
        &scratch.server_config(&scratch.sqlite_url(), "")?,
        scratch.path("server.log"),
    )?;
    let (cert, key) = scratch.pki.node("val-1");
    let channel = scratch.channel(server.grpc, &cert, &key).await?;
    let status = guardian_proto::v1::fleet_client::FleetClient::new(channel)
        .list_nodes(ListNodesRequest {})
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("agent certificate was allowed"))?;
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("operator certificate"),
        "{}",
        status.message()
    );
    let events = Ledger::open(&scratch.sqlite_url())
        .await?
        .security_events()
        .await?;
    assert!(
        events
            .iter()
            .any(|e| e.kind == "fleet_call_by_agent" && e.peer == "node/val-1"),
        "{events:?}"
    );
    Ok(())
}

#[tokio::test]
async fn malformed_or_oversized_frames_end_only_that_stream() -> TestResult {
    let scratch = Scratch::new(&["val-1", "val-2"])?;
    let config = scratch.server_config(&scratch.sqlite_url(), "max_frame_bytes = 65536")?;
    let server = Server::start(&config, scratch.path("server.log"))?;
    let _agent = start_agent(
        &scratch.agent_config("val-2", server.grpc, 200)?,
        scratch.path("agent.log"),
    )?;
    wait_for_batches(&scratch, &server, "val-2", 1).await?;

    let (cert, key) = scratch.pki.node("val-1");
    let welcome_then_error = |frames: Vec<Vec<u8>>| {
        let channel = scratch.channel(server.grpc, &cert, &key);
        async move {
            let (_tx, mut replies) = raw_uplink(channel.await?, frames).await?;
            let first = replies.message().await?.and_then(|f| f.frame);
            anyhow::ensure!(
                matches!(first, Some(server_frame::Frame::Welcome(_))),
                "no Welcome: {first:?}"
            );
            loop {
                match replies.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => anyhow::bail!("stream ended without an error status"),
                    Err(status) => return Ok(status),
                }
            }
        }
    };

    let huge = AgentFrame {
        frame: Some(agent_frame::Frame::Batch(SampleBatch {
            spool_dropped_batches_total: 0,
            seq: 1,
            samples: vec![Sample {
                observed_at_unix_ms: 1,
                kind: Some(sample::Kind::Unavailable(SamplerUnavailable {
                    sampler: "host".into(),
                    reason: "x".repeat(100_000),
                })),
            }],
        })),
    };
    let status = welcome_then_error(vec![encode(&hello("val-1")), encode(&huge)]).await?;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("max_frame_bytes"),
        "{}",
        status.message()
    );

    // Field 1 with wire type 7 does not exist in protobuf.
    let garbage = vec![0x0f, 0xff, 0xff, 0xff, 0xff];
    let status = welcome_then_error(vec![encode(&hello("val-1")), garbage]).await?;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("malformed AgentFrame"),
        "{}",
        status.message()
    );

    // A frame that parses but whose batch (field 2) holds garbage: refused the same way.
    let bad_batch = vec![0x12, 0x05, 0x0f, 0xff, 0xff, 0xff, 0xff];
    let status = welcome_then_error(vec![encode(&hello("val-1")), bad_batch]).await?;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("malformed AgentFrame"),
        "{}",
        status.message()
    );

    // A batch whose sample has no kind is refused too, and stores nothing.
    let empty = AgentFrame {
        frame: Some(agent_frame::Frame::Batch(SampleBatch {
            spool_dropped_batches_total: 0,
            seq: 1,
            samples: vec![Sample {
                observed_at_unix_ms: 1,
                kind: None,
            }],
        })),
    };
    let status = welcome_then_error(vec![encode(&hello("val-1")), encode(&empty)]).await?;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // The well-behaved agent kept streaming throughout.
    let before = last_seq(&scratch, &server, "val-2").await.unwrap_or(0);
    wait_for_batches(&scratch, &server, "val-2", before + 3).await?;
    assert_eq!(last_seq(&scratch, &server, "val-1").await, Some(0));
    let events = Ledger::open(&scratch.sqlite_url())
        .await?
        .security_events()
        .await?;
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert!(
        kinds.contains(&"frame_too_large") && kinds.contains(&"malformed_frame"),
        "{kinds:?}"
    );
    Ok(())
}

fn run_check(bin: &str, args: &[&str]) -> anyhow::Result<(Option<i32>, String)> {
    let out = Command::new(binary(bin)?).args(args).output()?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn bad_config_exits_64_naming_the_field() -> TestResult {
    let scratch = Scratch::new(&["val-1"])?;
    let good = scratch.server_config(&scratch.sqlite_url(), "")?;
    let good = good.to_str().unwrap_or_default().to_owned();
    assert_eq!(
        run_check("guardian-server", &["--config", &good, "--check-config"])?.0,
        Some(0)
    );

    let cases = [
        ("max_frame_bytes = 10", "max_frame_bytes"),
        ("listen_adress = \"127.0.0.1:1\"", "listen_adress"),
        ("hello_timeout_ms = \"soon\"", "hello_timeout_ms"),
    ];
    for (extra, field) in cases {
        let config = scratch.server_config(&scratch.sqlite_url(), extra)?;
        let (code, stderr) = run_check(
            "guardian-server",
            &[
                "--config",
                config.to_str().unwrap_or_default(),
                "--check-config",
            ],
        )?;
        assert_eq!(code, Some(64), "{extra}: {stderr}");
        assert!(
            stderr.contains(&format!("`{field}`")) && stderr.contains("fix:"),
            "{extra}: {stderr}"
        );
    }
    let config = scratch.server_config("mysql://nope", "")?;
    let (code, stderr) = run_check(
        "guardian-server",
        &[
            "--config",
            config.to_str().unwrap_or_default(),
            "--check-config",
        ],
    )?;
    assert_eq!(code, Some(64));
    assert!(stderr.contains("`ledger_url`"), "{stderr}");

    let agent = scratch.agent_config("val-1", "127.0.0.1:1".parse()?, 1000)?;
    let agent = agent.to_str().unwrap_or_default();
    assert_eq!(
        run_check("guardian-agent", &["--config", agent, "--check-config"])?.0,
        Some(0)
    );
    let (code, stderr) = run_check(
        "guardian-agent",
        &["--config", agent, "--check-config", "--node-id", "Bad Name"],
    )?;
    assert_eq!(code, Some(64));
    assert!(stderr.contains("`node_id`"), "{stderr}");
    let (code, stderr) = run_check(
        "guardian-agent",
        &[
            "--config",
            agent,
            "--check-config",
            "--sample-interval-ms",
            "5",
        ],
    )?;
    assert_eq!(code, Some(64));
    assert!(stderr.contains("`sample_interval_ms`"), "{stderr}");
    let (code, stderr) = run_check(
        "guardian-agent",
        &["--config", "/nonexistent.toml", "--check-config"],
    )?;
    assert_eq!(code, Some(64));
    assert!(stderr.contains("--config"), "{stderr}");

    // --print-config writes the documented effective config, which loads back as valid.
    let printed = Command::new(binary("guardian-agent")?)
        .args(["--config", agent, "--print-config"])
        .output()?;
    assert!(printed.status.success());
    let text = String::from_utf8(printed.stdout)?;
    assert!(
        text.contains("# This node's id") && text.contains("node_id = \"val-1\""),
        "{text}"
    );
    let reprinted = scratch.path("printed.toml");
    std::fs::write(&reprinted, text)?;
    assert_eq!(
        run_check(
            "guardian-agent",
            &[
                "--config",
                reprinted.to_str().unwrap_or_default(),
                "--check-config"
            ]
        )?
        .0,
        Some(0)
    );
    Ok(())
}

#[tokio::test]
async fn watch_follows_the_fleet_live() -> TestResult {
    let scratch = Scratch::new(&["val-1"])?;
    let server = Server::start(
        &scratch.server_config(&scratch.sqlite_url(), "")?,
        scratch.path("server.log"),
    )?;
    let watch = tokio::process::Command::new(binary("guardianctl")?)
        .args([
            "watch",
            "--count",
            "3",
            "--server",
            &format!("https://{}", server.grpc),
        ])
        .arg("--pki-dir")
        .arg(&scratch.pki.dir)
        .output();
    let _agent = start_agent(
        &scratch.agent_config("val-1", server.grpc, 200)?,
        scratch.path("agent.log"),
    )?;
    let out = tokio::time::timeout(WAIT, watch).await??;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(text.lines().all(|l| l.contains("val-1")), "{text}");
    Ok(())
}

#[tokio::test]
async fn no_batch_is_lost_or_doubled_when_the_server_is_killed_and_restarted() -> TestResult {
    let scratch = Scratch::new(&["val-1"])?;
    let port = guardian_tests::stable_port()?;
    let config = scratch.server_config(&scratch.sqlite_url(), "")?;
    let text = std::fs::read_to_string(&config)?.replacen(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
        1,
    );
    std::fs::write(&config, text)?;
    let mut server = Server::start(&config, scratch.path("server-1.log"))?;
    let mut agent = start_agent(
        &scratch.agent_config("val-1", server.grpc, 100)?,
        scratch.path("agent.log"),
    )?;
    wait_for_batches(&scratch, &server, "val-1", 5).await?;
    server.proc.child.kill()?;
    server.proc.child.wait()?;
    tokio::time::sleep(Duration::from_millis(700)).await;

    // Same port, so the agent reconnects by itself.
    let server = Server::start(&config, scratch.path("server-2.log"))?;
    let restored = last_seq(&scratch, &server, "val-1").await.unwrap_or(0);
    assert!(
        restored >= 5,
        "the registry is rebuilt from the ledger (seq {restored})"
    );
    wait_for_batches(&scratch, &server, "val-1", restored + 5).await?;
    assert_eq!(
        agent.terminate()?,
        Some(0),
        "agent exits cleanly on SIGTERM"
    );

    let sent = assert_stored_what_the_agent_sent(&scratch, &server, &scratch.sqlite_url(), "val-1")
        .await?;
    let last = last_seq(&scratch, &server, "val-1").await.unwrap_or(0);
    assert!(
        last <= sent,
        "the server reports seq {last}, the agent sent 1..={sent}"
    );
    Ok(())
}

#[tokio::test]
async fn the_ledger_works_on_postgresql() -> TestResult {
    let postgres = Postgres::start()?;
    let scratch = Scratch::new(&["val-1"])?;
    let server = Server::start(
        &scratch.server_config(&postgres.url(), "")?,
        scratch.path("server.log"),
    )?;
    let mut agent = start_agent(
        &scratch.agent_config("val-1", server.grpc, 200)?,
        scratch.path("agent.log"),
    )?;
    wait_for_batches(&scratch, &server, "val-1", 3).await?;
    assert_eq!(agent.terminate()?, Some(0), "{}", agent.log_text());

    let sent =
        assert_stored_what_the_agent_sent(&scratch, &server, &postgres.url(), "val-1").await?;
    assert!(sent >= 3);
    let ledger = Ledger::open(&postgres.url()).await?;
    let nodes = ledger.nodes().await?;
    assert_eq!(nodes.len(), 1);
    assert!(
        nodes[0]
            .last_host
            .as_ref()
            .is_some_and(|h| h.mem_total_bytes > 0)
    );

    // A refused Hello is recorded in PostgreSQL too.
    let (cert, key) = scratch.pki.node("val-1");
    let channel = scratch.channel(server.grpc, &cert, &key).await?;
    if let Ok((_tx, mut replies)) = raw_uplink(channel, vec![encode(&hello("intruder"))]).await {
        assert!(replies.message().await.is_err());
    }
    let events = ledger.security_events().await?;
    assert!(
        events.iter().any(|e| e.kind == "hello_identity_mismatch"),
        "{events:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_stream_without_hello_is_refused() -> TestResult {
    let scratch = Scratch::new(&["val-1"])?;
    let config = scratch.server_config(&scratch.sqlite_url(), "hello_timeout_ms = 300")?;
    let server = Server::start(&config, scratch.path("server.log"))?;
    let (cert, key) = scratch.pki.node("val-1");

    // First frame is a batch, not Hello.
    let batch = AgentFrame {
        frame: Some(agent_frame::Frame::Batch(SampleBatch {
            spool_dropped_batches_total: 0,
            seq: 1,
            samples: vec![],
        })),
    };
    let channel = scratch.channel(server.grpc, &cert, &key).await?;
    let status = refusal(channel, vec![encode(&batch)]).await?;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");

    // Nothing at all: the server gives up after hello_timeout_ms instead of holding the stream.
    let channel = scratch.channel(server.grpc, &cert, &key).await?;
    let started = std::time::Instant::now();
    let status = refusal(channel, vec![]).await?;
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() < WAIT);
    let events = Ledger::open(&scratch.sqlite_url())
        .await?
        .security_events()
        .await?;
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert!(
        kinds.contains(&"missing_hello") && kinds.contains(&"hello_timeout"),
        "{kinds:?}"
    );
    Ok(())
}

#[tokio::test]
async fn an_agent_killed_and_restarted_continues_the_numbering_without_collisions() -> TestResult {
    let scratch = Scratch::new(&["val-1"])?;
    let server = Server::start(
        &scratch.server_config(&scratch.sqlite_url(), "")?,
        scratch.path("server.log"),
    )?;
    let config = scratch.agent_config("val-1", server.grpc, 100)?;
    let mut first = start_agent(&config, scratch.path("agent-1.log"))?;
    let killed_at = wait_for_batches(&scratch, &server, "val-1", 5).await?;
    first.child.kill()?;
    first.child.wait()?;
    // Restart at once: the old stream may still be open on the server side.
    let mut second = start_agent(&config, scratch.path("agent-2.log"))?;
    wait_for_batches(&scratch, &server, "val-1", killed_at + 10).await?;
    assert_eq!(second.terminate()?, Some(0));

    // A kill between the server's commit and the agent's file delete makes the restarted
    // agent resend that batch: acked as a duplicate, stored once. What must not happen is a
    // reused seq carrying new data, which would show as a gap below.
    let sent = assert_stored_what_the_agent_sent(&scratch, &server, &scratch.sqlite_url(), "val-1")
        .await?;
    assert!(sent >= killed_at + 10, "the second agent sent 1..={sent}");
    Ok(())
}

/// Starts a second server on `config`'s ledger and returns its exit status and stderr; a
/// server still running after 10 s is killed and reported as `None` (it took the ledger).
fn second_server(
    scratch: &Scratch,
    config: &std::path::Path,
) -> anyhow::Result<(Option<i32>, String)> {
    let log = scratch.path("second-server.log");
    let mut child = Command::new(binary("guardian-server")?)
        .arg("--config")
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(status) = child.try_wait()? {
            break status.code();
        }
        if std::time::Instant::now() > deadline {
            child.kill()?;
            child.wait()?;
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok((code, std::fs::read_to_string(log)?))
}

#[tokio::test]
async fn a_second_server_on_the_same_sqlite_ledger_exits_naming_the_holder() -> TestResult {
    let scratch = Scratch::new(&["val-1"])?;
    let config = scratch.server_config(&scratch.sqlite_url(), "")?;
    let server = Server::start(&config, scratch.path("server.log"))?;
    let (code, stderr) = second_server(&scratch, &config)?;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("one server per ledger")
            && stderr.contains(&format!("pid {}", server.proc.child.id())),
        "{stderr}"
    );
    // Readers such as guardianctl audit verify still open it.
    let ledger = Ledger::open(&scratch.sqlite_url()).await?;
    assert!(ledger.security_events().await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn a_second_server_on_the_same_postgresql_ledger_exits() -> TestResult {
    let postgres = Postgres::start()?;
    let scratch = Scratch::new(&["val-1"])?;
    let config = scratch.server_config(&postgres.url(), "")?;
    let _server = Server::start(&config, scratch.path("server.log"))?;
    let (code, stderr) = second_server(&scratch, &config)?;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("one server per ledger") && stderr.contains("advisory lock"),
        "{stderr}"
    );
    Ok(())
}
