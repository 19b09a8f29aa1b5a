//! On-disk spool scenarios with real `guardian-server` and `guardian-agent` processes:
//! batches survive agent restarts and server outages, seqs are never reused or skipped
//! silently, and a full spool's drops are counted.

use std::path::{Path, PathBuf};
use std::time::Duration;

use guardian_agent::spool::Spool;
use guardian_proto::v1::{Sample, SamplerUnavailable, sample};
use guardian_server::identity::NodeId;
use guardian_server::store::Ledger;
use guardian_tests::{Proc, Scratch, Server, eventually, fleet_node, settled, start_agent};

type TestResult = anyhow::Result<()>;

const WAIT: Duration = Duration::from_secs(20);
const NODE: &str = "val-1";

/// A server config on a fixed port, so it can be started after the agent.
fn server_config_on_fixed_port(scratch: &Scratch) -> anyhow::Result<(PathBuf, String)> {
    let port = guardian_tests::stable_port()?;
    let config = scratch.server_config(&scratch.sqlite_url(), "")?;
    let text = std::fs::read_to_string(&config)?.replacen(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
        1,
    );
    std::fs::write(&config, text)?;
    Ok((config, format!("127.0.0.1:{port}")))
}

/// An agent config with its spool in the scratch folder.
fn agent_config(
    scratch: &Scratch,
    server: &str,
    interval_ms: u64,
    extra: &str,
) -> anyhow::Result<PathBuf> {
    let spool = scratch.path("spool");
    scratch.agent_config_with(
        NODE,
        server.parse()?,
        interval_ms,
        &format!("spool_dir = \"{}\"\n{extra}", spool.display()),
    )
}

/// Batch files in the spool (numbered or not).
fn spooled(scratch: &Scratch) -> usize {
    ["batches", "unnumbered"]
        .iter()
        .filter_map(|sub| std::fs::read_dir(scratch.path("spool").join(sub)).ok())
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".pb"))
                .count()
        })
        .sum()
}

async fn wait_for_spooled(scratch: &Scratch, agent: &Proc, at_least: usize) -> TestResult {
    eventually(WAIT, &format!("{at_least} spooled batches"), || async {
        (spooled(scratch) >= at_least).then_some(())
    })
    .await
    .map_err(|e| e.context(agent.log_text()))
}

async fn last_seq(scratch: &Scratch, server: &Server) -> Option<u64> {
    fleet_node(scratch, server.grpc, NODE)
        .await
        .map(|n| n.last_stored_seq)
}

async fn wait_for_seq(scratch: &Scratch, server: &Server, at_least: u64) -> anyhow::Result<u64> {
    eventually(WAIT, &format!("seq {at_least} stored"), || async {
        last_seq(scratch, server)
            .await
            .filter(|seq| *seq >= at_least)
    })
    .await
}

/// `(batches, distinct seqs, host samples)` in the ledger.
async fn counts(scratch: &Scratch) -> anyhow::Result<(u64, u64, u64)> {
    let ledger = Ledger::open(&scratch.sqlite_url()).await?;
    let (batches, distinct, host) = ledger.counts(&NodeId::parse(NODE)?).await?;
    Ok((
        u64::try_from(batches)?,
        u64::try_from(distinct)?,
        u64::try_from(host)?,
    ))
}

/// Every seq the ledger holds for [`NODE`], ascending (one per stored batch row).
async fn stored_seqs(scratch: &Scratch) -> anyhow::Result<Vec<u64>> {
    use sqlx::Connection;
    let mut conn = sqlx::SqliteConnection::connect(&scratch.sqlite_url()).await?;
    let seqs: Vec<i64> =
        sqlx::query_scalar("SELECT seq FROM batches WHERE node_id = $1 ORDER BY seq")
            .bind(NODE)
            .fetch_all(&mut conn)
            .await?;
    seqs.into_iter()
        .map(|s| u64::try_from(s).map_err(anyhow::Error::from))
        .collect()
}

/// What the ledger holds, checked against what the agent sent.
struct Account {
    /// Highest seq the agent ever numbered (from its spool's `next_seq`).
    sent: u64,
    /// Batches stored for the node.
    stored: u64,
    /// Batches the agent counted as dropped.
    dropped: u64,
    /// Host samples stored for the node.
    host: u64,
}

/// Checks the ledger against the spool of the (exited) agent: nothing beyond `sent` is
/// stored; the spool holds only the unacked tail of `1..=sent`; every seq below that tail is
/// stored once or is one of the agent's counted drops.
async fn account(scratch: &Scratch) -> anyhow::Result<Account> {
    let mut spool = Spool::open(&scratch.path("spool"), 1 << 40)?;
    let sent = spool
        .next_seq()
        .ok_or_else(|| anyhow::anyhow!("the spool was never numbered"))?
        - 1;
    let waiting: Vec<u64> = spool
        .batches_after(0, usize::MAX)
        .iter()
        .map(|b| b.seq)
        .collect();
    let dropped = spool.dropped_batches();
    drop(spool);
    let stored = stored_seqs(scratch).await?;
    let acked = sent.saturating_sub(waiting.len() as u64);
    assert_eq!(
        waiting,
        (acked + 1..=sent).collect::<Vec<_>>(),
        "the spool holds only the unacked tail of 1..={sent}"
    );
    assert!(
        stored.last().is_none_or(|last| *last <= sent),
        "the ledger holds seqs up to {:?}, the agent sent 1..={sent}",
        stored.last()
    );
    // A batch sent but not acked before the agent stopped may or may not be stored yet.
    let missing = (1..=acked)
        .filter(|seq| stored.binary_search(seq).is_err())
        .count() as u64;
    assert_eq!(
        missing,
        dropped,
        "every seq in 1..={acked} is stored or a counted drop (stored {}, dropped {dropped})",
        stored.len()
    );
    let (batches, _, host) = counts(scratch).await?;
    assert_eq!(batches, stored.len() as u64);
    Ok(Account {
        sent,
        stored: stored.len() as u64,
        dropped,
        host,
    })
}

/// The `next_seq=N` an agent log's `SpoolOpened` line reports.
fn opened_next_seq(log: &str) -> Option<u64> {
    log.lines()
        .find(|l| l.contains("SpoolOpened"))?
        .split_whitespace()
        .find_map(|w| w.strip_prefix("next_seq="))?
        .parse()
        .ok()
}

#[tokio::test]
async fn batches_of_two_agent_runs_while_the_server_is_down_all_arrive_once_in_order() -> TestResult
{
    let scratch = Scratch::new(&[NODE])?;
    let (server_config, server_addr) = server_config_on_fixed_port(&scratch)?;
    let config = agent_config(&scratch, &server_addr, 200, "")?;

    let mut first = start_agent(&config, scratch.path("agent-1.log"))?;
    wait_for_spooled(&scratch, &first, 3).await?;
    assert_eq!(first.terminate()?, Some(0), "{}", first.log_text());
    let after_first = spooled(&scratch);

    let mut second = start_agent(&config, scratch.path("agent-2.log"))?;
    wait_for_spooled(&scratch, &second, after_first + 3).await?;
    let before_server = spooled(&scratch);

    let server = Server::start(&server_config, scratch.path("server.log"))?;
    let stored = wait_for_seq(&scratch, &server, before_server as u64 + 2).await?;
    assert_eq!(second.terminate()?, Some(0), "{}", second.log_text());
    settled(&scratch, server.grpc, NODE).await?;

    let account = account(&scratch).await?;
    let last = last_seq(&scratch, &server).await.unwrap_or(0);
    assert!(last >= stored);
    assert_eq!(account.dropped, 0, "nothing dropped");
    assert_eq!(
        account.stored, last,
        "seqs contiguous from 1 (no gap in 1..={last})"
    );
    assert_eq!(
        account.host, account.stored,
        "every batch holds its host sample"
    );
    assert!(
        account.stored >= before_server as u64,
        "all {before_server} batches taken while the server was down arrived ({})",
        account.stored
    );
    for agent in [&first, &second] {
        assert!(
            !agent.log_text().contains("SpoolBatchesDropped"),
            "{}",
            agent.log_text()
        );
    }
    Ok(())
}

#[tokio::test]
async fn an_agent_killed_mid_stream_neither_reuses_nor_skips_a_seq() -> TestResult {
    let scratch = Scratch::new(&[NODE])?;
    let server = Server::start(
        &scratch.server_config(&scratch.sqlite_url(), "")?,
        scratch.path("server.log"),
    )?;
    let config = agent_config(&scratch, &server.grpc.to_string(), 100, "")?;
    let mut first = start_agent(&config, scratch.path("agent-1.log"))?;
    wait_for_seq(&scratch, &server, 5).await?;
    first.child.kill()?;
    first.child.wait()?;
    // Whatever the killed agent got stored is final now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stored_by_first = last_seq(&scratch, &server).await.unwrap_or(0);

    let mut second = start_agent(&config, scratch.path("agent-2.log"))?;
    wait_for_seq(&scratch, &server, stored_by_first + 10).await?;
    assert_eq!(second.terminate()?, Some(0));
    settled(&scratch, server.grpc, NODE).await?;
    let next_seq = opened_next_seq(&second.log_text())
        .ok_or_else(|| anyhow::anyhow!("no SpoolOpened next_seq: {}", second.log_text()))?;
    assert!(
        next_seq > stored_by_first,
        "the restarted agent continues after seq {stored_by_first}, not at {next_seq}"
    );

    let account = account(&scratch).await?;
    let last = last_seq(&scratch, &server).await.unwrap_or(0);
    assert_eq!(account.dropped, 0, "nothing dropped");
    assert_eq!(account.stored, last, "no gap in 1..={last}");
    assert_eq!(
        account.host, account.stored,
        "every batch holds its host sample"
    );
    assert!(
        account.sent >= stored_by_first + 10,
        "the agents sent 1..={}",
        account.sent
    );
    Ok(())
}

/// A batch of about `bytes` encoded bytes (a sampler-unavailable report).
fn big_batch(bytes: usize) -> Vec<Sample> {
    vec![Sample {
        observed_at_unix_ms: guardian_agent::unix_ms(),
        kind: Some(sample::Kind::Unavailable(SamplerUnavailable {
            sampler: "test".into(),
            reason: "x".repeat(bytes),
        })),
    }]
}

#[tokio::test]
async fn a_full_spool_drops_the_oldest_and_the_seq_gap_equals_the_counter() -> TestResult {
    let scratch = Scratch::new(&[NODE])?;
    let (server_config, server_addr) = server_config_on_fixed_port(&scratch)?;
    let spool_dir = scratch.path("spool");
    // A previous run left 2.4 MB of numbered batches (seqs 1..=8); the agent's bound is 1 MiB.
    {
        let mut spool = Spool::open(&spool_dir, 64 << 20)?;
        spool.set_base(0);
        for _ in 0..8 {
            spool.push(big_batch(300_000));
        }
    }
    let config = agent_config(&scratch, &server_addr, 200, "spool_max_bytes = 1048576\n")?;
    let mut agent = start_agent(&config, scratch.path("agent.log"))?;
    wait_for_spooled(&scratch, &agent, 5).await?;
    tokio::time::sleep(Duration::from_millis(600)).await;

    let server = Server::start(&server_config, scratch.path("server.log"))?;
    wait_for_seq(&scratch, &server, 8 + 5).await?;
    assert_eq!(agent.terminate()?, Some(0));
    settled(&scratch, server.grpc, NODE).await?;
    let log = agent.log_text();
    assert!(log.contains("SpoolBatchesDropped"), "{log}");

    let account = account(&scratch).await?;
    assert!(account.dropped > 0, "{log}");
    let last = last_seq(&scratch, &server).await.unwrap_or(0);
    assert!(last <= account.sent);
    assert_eq!(
        last - account.stored,
        account.dropped,
        "every missing seq is a counted drop (stored {} of 1..={last})",
        account.stored
    );
    Ok(())
}

#[tokio::test]
async fn a_second_agent_on_the_same_spool_exits_naming_the_folder() -> TestResult {
    let scratch = Scratch::new(&[NODE])?;
    let config = agent_config(&scratch, "127.0.0.1:1", 200, "")?;
    let _first = start_agent(&config, scratch.path("agent-1.log"))?;
    wait_for_path(&scratch.path("spool").join("state")).await?;
    let mut second = start_agent(&config, scratch.path("agent-2.log"))?;
    let status = tokio::task::spawn_blocking(move || {
        let status = second.child.wait();
        (status, second.log_text())
    })
    .await?;
    let (status, log) = (status.0?, status.1);
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("in use by another guardian-agent") && log.contains("spool"),
        "{log}"
    );
    Ok(())
}

async fn wait_for_path(path: &Path) -> TestResult {
    eventually(WAIT, &format!("{}", path.display()), || async {
        path.exists().then_some(())
    })
    .await
}
