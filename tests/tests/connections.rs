//! The gRPC listener under a connection flood: idle TCP connections that never start TLS and
//! authenticated clients opening streams that never say Hello must not lock a real agent out,
//! with the server under systemd's default descriptor limit (1 024).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use guardian_proto::v1::GetNodeRequest;
use guardian_tests::{
    Scratch, Server, admin_metrics, eventually, hello_frame, host_batch_frame, metric_value,
    raw_uplink, start_agent,
};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

type TestResult = anyhow::Result<()>;

/// Idle TCP connections opened by the flood.
const IDLE_CONNECTIONS: usize = 2_000;
/// Handshake deadline given to the server.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Lets this test process hold the flood's sockets whatever its soft limit.
fn raise_own_descriptor_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    let _ = setrlimit(Resource::Nofile, limit);
}

fn hello(node: &str) -> Vec<u8> {
    hello_frame(node, "local")
}

/// Streams `count` batches as `node` over a fresh connection, one every 100 ms, and returns
/// each batch's time from send to its ack.
async fn ack_latencies(
    scratch: &Scratch,
    server: SocketAddr,
    node: &str,
    count: u64,
) -> anyhow::Result<Vec<Duration>> {
    let (cert, key) = scratch.pki.node(node);
    let connect = async {
        let channel = scratch.channel(server, &cert, &key).await?;
        raw_uplink(channel, vec![hello(node)])
            .await
            .map_err(|s| anyhow::anyhow!("stream refused: {s:?}"))
    };
    // A real client completes its handshake in milliseconds: it must get in well before
    // the flood's sockets time out (HANDSHAKE_TIMEOUT, 5 s), with slack for a busy machine.
    let (tx, mut replies) = tokio::time::timeout(Duration::from_secs(4), connect)
        .await
        .map_err(|_| anyhow::anyhow!("no stream within 4 s"))??;
    let mut latencies = Vec::new();
    for seq in 1..=count {
        let sent = Instant::now();
        tx.send(host_batch_frame(seq, guardian_server::unix_ms()))
            .await?;
        tokio::time::timeout(
            Duration::from_secs(5),
            guardian_tests::wait_for_ack(&mut replies, seq),
        )
        .await
        .map_err(|_| anyhow::anyhow!("batch {seq} not acked within 5 s"))??;
        latencies.push(sent.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(latencies)
}

#[tokio::test]
async fn a_connection_flood_does_not_lock_agents_out_and_idle_sockets_are_closed() -> TestResult {
    raise_own_descriptor_limit();
    let scratch = Scratch::new(&["val-1", "probe", "before", "flooder"])?;
    let config = scratch.server_config(
        &scratch.sqlite_url(),
        &format!(
            "hello_timeout_ms = 1000\n[connections]\ntls_handshake_timeout_ms = {}\n",
            HANDSHAKE_TIMEOUT.as_millis()
        ),
    )?;
    let server = Server::start_with_nofile(&config, scratch.path("server.log"), 1_024)?;

    // The usual latency, before the flood.
    let usual = ack_latencies(&scratch, server.grpc, "before", 10).await?;
    let usual_max = usual.iter().max().copied().unwrap_or_default();

    // 2 000 TCP connections that never start TLS (no certificate at all)...
    let mut idle = Vec::with_capacity(IDLE_CONNECTIONS);
    for _ in 0..IDLE_CONNECTIONS {
        idle.push(TcpStream::connect(server.grpc).await?);
    }
    let flood_started = Instant::now();
    // ... and authenticated connections opening streams that never say Hello.
    let (cert, key) = scratch.pki.node("flooder");
    let mut empty_streams = Vec::new();
    for _ in 0..4 {
        let channel = scratch.channel(server.grpc, &cert, &key).await?;
        for _ in 0..100 {
            let channel = channel.clone();
            empty_streams.push(tokio::spawn(async move {
                // Holds its request stream open without a frame until the server gives up.
                if let Ok((_tx, mut replies)) = raw_uplink(channel, vec![]).await {
                    let _ = replies.message().await;
                }
            }));
        }
    }

    // A real agent process connecting during the flood streams as usual.
    let agent = start_agent(
        &scratch.agent_config("val-1", server.grpc, 200)?,
        scratch.path("agent-val-1.log"),
    )?;
    // And a client measuring its acks, on a connection opened during the flood.
    let during = ack_latencies(&scratch, server.grpc, "probe", 20).await?;
    let during_max = during.iter().max().copied().unwrap_or_default();
    assert_eq!(during.len(), 20, "every batch acked");
    assert!(
        during_max <= usual_max.max(Duration::from_millis(100)) * 10,
        "acks during the flood took up to {during_max:?} (usual: up to {usual_max:?}); server log:\n{}",
        server
            .proc
            .log_text()
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let mut operator = scratch.operator(server.grpc).await?;
    eventually(
        Duration::from_secs(10),
        "the agent's batches stored",
        || {
            let mut operator = operator.clone();
            async move {
                let node = operator
                    .get_node(GetNodeRequest {
                        node_id: "val-1".into(),
                    })
                    .await
                    .ok()?
                    .into_inner();
                (node.last_stored_seq >= 5).then_some(())
            }
        },
    )
    .await?;

    // The flood was held off by evicting pending handshakes, not by waiting for them.
    let metrics = admin_metrics(server.admin)?;
    assert!(
        metrics.contains("guardian_connections_refused_total{reason=\"evicted\"}"),
        "{metrics}"
    );

    // Every idle socket is closed by the server once its handshake deadline passed (or
    // earlier, evicted to make room for a real client).
    let deadline = flood_started + HANDSHAKE_TIMEOUT + Duration::from_secs(3);
    tokio::time::sleep_until(deadline.into()).await;
    let mut still_open = 0;
    for socket in &mut idle {
        let mut byte = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(5), socket.read(&mut byte)).await {
            Ok(Ok(0) | Err(_)) => {}
            Ok(Ok(_)) | Err(_) => still_open += 1,
        }
    }
    assert_eq!(
        still_open, 0,
        "idle sockets still open after the handshake deadline"
    );
    for stream in empty_streams {
        stream.abort();
    }
    let _ = operator
        .get_node(GetNodeRequest {
            node_id: "val-1".into(),
        })
        .await?;
    drop(agent);
    Ok(())
}

#[tokio::test]
async fn a_refusal_flood_writes_a_bounded_number_of_events_and_does_not_slow_ingest() -> TestResult
{
    let scratch = Scratch::new(&["probe", "before", "flooder"])?;
    let server = Server::start(
        &scratch.server_config(&scratch.sqlite_url(), "")?,
        scratch.path("server.log"),
    )?;
    let usual = ack_latencies(&scratch, server.grpc, "before", 10).await?;
    let usual_max = usual.iter().max().copied().unwrap_or_default();

    // 1 000 streams from one certificate, each claiming to be another node: each is refused
    // and was, before, one synced security_events write under the ledger's write lock.
    const REFUSALS: usize = 1_000;
    let (cert, key) = scratch.pki.node("flooder");
    let channel = scratch.channel(server.grpc, &cert, &key).await?;
    let flood = tokio::spawn(async move {
        let mut refused = 0usize;
        let mut pending = tokio::task::JoinSet::new();
        for _ in 0..REFUSALS {
            if pending.len() >= 32
                && let Some(Ok(true)) = pending.join_next().await
            {
                refused += 1;
            }
            let channel = channel.clone();
            pending.spawn(async move {
                match raw_uplink(channel, vec![hello("probe")]).await {
                    Err(status) => status.code() == tonic::Code::PermissionDenied,
                    Ok((_tx, mut replies)) => replies
                        .message()
                        .await
                        .err()
                        .is_some_and(|s| s.code() == tonic::Code::PermissionDenied),
                }
            });
        }
        while let Some(done) = pending.join_next().await {
            refused += usize::from(done.unwrap_or(false));
        }
        refused
    });
    let during = ack_latencies(&scratch, server.grpc, "probe", 20).await?;
    let refused = flood.await?;
    assert_eq!(refused, REFUSALS, "every claim was refused");
    let during_max = during.iter().max().copied().unwrap_or_default();
    assert!(
        during_max <= usual_max.max(Duration::from_millis(100)) * 10,
        "acks during the flood took up to {during_max:?} (usual: up to {usual_max:?})"
    );

    let events = guardian_server::store::Ledger::open(&scratch.sqlite_url())
        .await?
        .security_events()
        .await?;
    let written = events.iter().filter(|e| e.peer == "node/flooder").count();
    // 10 a minute; the flood may straddle one minute boundary.
    assert!(
        (1..=2 * guardian_server::store::security::EVENTS_PER_PEER_PER_MINUTE as usize)
            .contains(&written),
        "{written} security events written for the flood"
    );
    let metrics = admin_metrics(server.admin)?;
    let suppressed =
        metric_value(&metrics, "guardian_security_events_suppressed_total").unwrap_or(0.0);
    assert_eq!(suppressed as usize + written, REFUSALS, "{metrics}");
    Ok(())
}
