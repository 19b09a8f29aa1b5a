//! Clock skew is found before signed commands start failing: an agent whose clock runs 40 s
//! ahead gets a critical `clock_skew` finding; one that replays an old spool burst and then
//! streams live with a good clock gets none.

use std::time::Duration;

use guardian_proto::v1::ListFindingsRequest;
use guardian_tests::{Scratch, Server, eventually, hello_frame, host_batch_frame, raw_uplink};

type TestResult = anyhow::Result<()>;

/// Streams as `node`: first `replayed` batches observed two minutes ago, back to back (a
/// spool replay), then `live` batches 200 ms apart observed at the agent's clock, which is
/// `skew_ms` off the server's; waits for each ack.
async fn stream(
    scratch: &Scratch,
    server: &Server,
    node: &str,
    replayed: u64,
    live: u64,
    skew_ms: i64,
) -> anyhow::Result<()> {
    let (cert, key) = scratch.pki.node(node);
    let channel = scratch.channel(server.grpc, &cert, &key).await?;
    let (tx, mut replies) = raw_uplink(channel, vec![hello_frame(node, "local")])
        .await
        .map_err(|s| anyhow::anyhow!("refused: {s:?}"))?;
    for seq in 1..=replayed + live {
        let observed = if seq <= replayed {
            guardian_server::unix_ms() - 120_000 + i64::try_from(seq)? * 1_000
        } else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            guardian_server::unix_ms() + skew_ms
        };
        tx.send(host_batch_frame(seq, observed)).await?;
        guardian_tests::wait_for_ack(&mut replies, seq).await?;
    }
    Ok(())
}

#[tokio::test]
async fn an_agent_clock_off_by_forty_seconds_is_critical_and_a_replay_is_not_skew() -> TestResult {
    let scratch = Scratch::new(&["ahead", "replayer"])?;
    let server = Server::start(
        &scratch.server_config(
            &scratch.sqlite_url(),
            "[reconcile]\nevaluate_interval_ms = 200\n",
        )?,
        scratch.path("server.log"),
    )?;
    stream(&scratch, &server, "ahead", 0, 8, 40_000).await?;
    stream(&scratch, &server, "replayer", 30, 8, 0).await?;
    let mut operator = scratch.operator(server.grpc).await?;
    let skew = eventually(Duration::from_secs(10), "a clock_skew finding", || {
        let mut operator = operator.clone();
        async move {
            operator
                .list_findings(ListFindingsRequest {
                    node_id: "ahead".into(),
                    include_cleared: true,
                    limit: 100,
                })
                .await
                .ok()?
                .into_inner()
                .findings
                .into_iter()
                .find(|f| f.kind == "clock_skew")
        }
    })
    .await?;
    assert_eq!(skew.severity, "critical", "{skew:?}");
    assert!(skew.summary.contains("ahead of"), "{skew:?}");
    let replayer = operator
        .list_findings(ListFindingsRequest {
            node_id: "replayer".into(),
            include_cleared: true,
            limit: 100,
        })
        .await?
        .into_inner()
        .findings;
    assert!(
        !replayer.iter().any(|f| f.kind == "clock_skew"),
        "a replayed spool is not a slow clock: {replayer:?}"
    );
    Ok(())
}
