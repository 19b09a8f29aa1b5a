//! Hellos on SQLite and on a real PostgreSQL: a fleet meeting a fresh ledger all at once is
//! written in shared transactions and every node gets its row and its `last_stored_seq`;
//! a known node with an unchanged descriptor costs no write; a changed one is updated.

use guardian_proto::v1::NodeDescriptor;
use guardian_server::identity::NodeId;
use guardian_server::store::Ledger;
use guardian_server::store::commit::Telemetry;
use guardian_tests::Postgres;

type TestResult = anyhow::Result<()>;

fn descriptor(host: &str) -> NodeDescriptor {
    NodeDescriptor {
        hostname: host.into(),
        network: "finney".into(),
        ..NodeDescriptor::default()
    }
}

async fn hellos_share_writes_and_read_back(url: &str) -> TestResult {
    let ledger = Ledger::open(url).await?;
    // 300 agents at once, one of them twice (a reconnect racing its own first Hello).
    let mut calls = Vec::new();
    for i in 0..300u32 {
        let ledger = ledger.clone();
        calls.push(tokio::spawn(async move {
            let node = NodeId::parse(&format!("n{i:03}"))?;
            let seq = ledger
                .record_hello(&node, &descriptor(&format!("host-{i}")), "1.0", 1_000)
                .await?;
            anyhow::Ok(seq)
        }));
    }
    let again = ledger.clone();
    calls.push(tokio::spawn(async move {
        let seq = again
            .record_hello(&NodeId::parse("n007")?, &descriptor("host-7"), "1.0", 1_001)
            .await?;
        anyhow::Ok(seq)
    }));
    for call in calls {
        assert_eq!(call.await??, 0);
    }
    let nodes = ledger.nodes().await?;
    assert_eq!(nodes.len(), 300);
    let n7 = nodes
        .iter()
        .find(|n| n.node_id == "n007")
        .ok_or_else(|| anyhow::anyhow!("n007 missing"))?;
    assert_eq!(
        (
            n7.hostname.as_str(),
            n7.network.as_str(),
            n7.agent_version.as_str()
        ),
        ("host-7", "finney", "1.0")
    );
    assert!(matches!(n7.first_seen_unix_ms, 1_000 | 1_001), "{n7:?}");

    // Batches stored for n007: its next Hello reads their seq back.
    let jobs = vec![
        guardian_tests::unavailable_job("n007", 1)?,
        guardian_tests::unavailable_job("n007", 2)?,
    ];
    ledger.commit_group(&jobs, Telemetry::Outbox, 2_000).await?;
    let n7_id = NodeId::parse("n007")?;
    assert_eq!(
        ledger
            .record_hello(&n7_id, &descriptor("host-7"), "1.0", 3_000)
            .await?,
        2
    );
    // Unchanged: nothing written (last_seen stays what the batches set).
    let last_seen = |nodes: &[guardian_proto::v1::Node]| {
        nodes
            .iter()
            .find(|n| n.node_id == "n007")
            .map(|n| n.last_seen_unix_ms)
    };
    assert_eq!(last_seen(&ledger.nodes().await?), Some(2_000));
    // A new agent version is written, and the seq still read back.
    assert_eq!(
        ledger
            .record_hello(&n7_id, &descriptor("host-7"), "1.1", 4_000)
            .await?,
        2
    );
    let nodes = ledger.nodes().await?;
    let n7 = nodes
        .iter()
        .find(|n| n.node_id == "n007")
        .ok_or_else(|| anyhow::anyhow!("n007 missing"))?;
    assert_eq!(
        (n7.agent_version.as_str(), n7.last_seen_unix_ms),
        ("1.1", 4_000)
    );
    assert!(matches!(n7.first_seen_unix_ms, 1_000 | 1_001), "{n7:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hellos_share_writes_on_sqlite() -> TestResult {
    let dir = tempfile::tempdir()?;
    hellos_share_writes_and_read_back(&format!("sqlite://{}/ledger.db", dir.path().display())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hellos_share_writes_on_postgresql() -> TestResult {
    let postgres = Postgres::start()?;
    hellos_share_writes_and_read_back(&postgres.url()).await?;

    // PostgreSQL refuses a NUL in text: that Hello fails, alone, whoever shared its write.
    let ledger = Ledger::open(&postgres.url()).await?;
    let mut calls = Vec::new();
    for i in 0..100u32 {
        let ledger = ledger.clone();
        calls.push(tokio::spawn(async move {
            let host = if i == 50 {
                "bad\0host".to_owned()
            } else {
                format!("m-{i}")
            };
            ledger
                .record_hello(
                    &NodeId::parse(&format!("m{i:03}"))?,
                    &descriptor(&host),
                    "1.0",
                    5,
                )
                .await
                .map_err(anyhow::Error::from)
        }));
    }
    let mut failed = Vec::new();
    for (i, call) in calls.into_iter().enumerate() {
        if let Err(error) = call.await? {
            failed.push((i, error.to_string()));
        }
    }
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].0, 50, "{failed:?}");
    let nodes = ledger.nodes().await?;
    assert_eq!(
        nodes.iter().filter(|n| n.node_id.starts_with('m')).count(),
        99
    );
    Ok(())
}
