//! Lossless delivery into ClickHouse through real faults, real processes: the server killed
//! mid-stream, ClickHouse stopped for a minute, the agent killed, the network cut for a
//! minute, ClickHouse killed with -9 again and again under several nodes whose batches span
//! two days. After each, every sequence number the agent produced is stored exactly once:
//! rows = distinct = sent, and the seqs are exactly 1..=sent.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use guardian_proto::v1::GetNodeRequest;
use guardian_server::store::clickhouse::{ClickHouseSettings, ClickHouseStore};
use guardian_tests::clickhouse::ClickHouse;
use guardian_tests::proxy::Proxy;
use guardian_tests::{Proc, Scratch, Server, agreed_or_last, eventually, settled, start_agent};

type TestResult = anyhow::Result<()>;

const NODE: &str = "val-1";
const WAIT: Duration = Duration::from_secs(30);
/// How long ClickHouse is down and the network cut (the figure).
const OUTAGE: Duration = Duration::from_secs(60);

/// ClickHouse, a server on a fixed port writing into it, and the scratch folder.
struct Rig {
    scratch: Scratch,
    clickhouse: ClickHouse,
    config: PathBuf,
    server: Server,
    starts: u32,
}

impl Rig {
    async fn new() -> anyhow::Result<Self> {
        let clickhouse = ClickHouse::start()?;
        let scratch = Scratch::new(&[NODE])?;
        let port = guardian_tests::stable_port()?;
        let extra = format!(
            "[clickhouse]\nurl = \"{}\"\ndatabase = \"guardian\"\ninsert_max_delay_ms = 200\nrequest_timeout_ms = 3000\n",
            clickhouse.url()
        );
        let config = scratch.server_config(&scratch.sqlite_url(), &extra)?;
        let text = std::fs::read_to_string(&config)?.replacen(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{port}\""),
            1,
        );
        std::fs::write(&config, text)?;
        let server = Server::start(&config, scratch.path("server-1.log"))?;
        Ok(Self {
            scratch,
            clickhouse,
            config,
            server,
            starts: 1,
        })
    }

    fn agent(&self, server: SocketAddr, run: u32) -> anyhow::Result<Proc> {
        let config = self.scratch.agent_config(NODE, server, 100)?;
        start_agent(&config, self.scratch.path(&format!("agent-{run}.log")))
    }

    fn restart_server(&mut self) -> anyhow::Result<()> {
        self.starts += 1;
        self.server = Server::start(
            &self.config,
            self.scratch.path(&format!("server-{}.log", self.starts)),
        )?;
        Ok(())
    }

    async fn last_seq(&self) -> Option<u64> {
        let mut client = self.scratch.operator(self.server.grpc).await.ok()?;
        let node = client
            .get_node(GetNodeRequest {
                node_id: NODE.into(),
            })
            .await
            .ok()?
            .into_inner();
        Some(node.last_stored_seq)
    }

    async fn wait_for_seq(&self, at_least: u64) -> anyhow::Result<u64> {
        eventually(
            WAIT,
            &format!("{NODE} to commit seq {at_least}"),
            || async { self.last_seq().await.filter(|seq| *seq >= at_least) },
        )
        .await
    }

    fn server_log(&self) -> String {
        (1..=self.starts)
            .map(|n| std::fs::read_to_string(self.scratch.path(&format!("server-{n}.log"))))
            .filter_map(Result::ok)
            .collect()
    }

    /// Stops the agent, then checks ClickHouse holds every committed seq, 1..=sent, exactly once.
    async fn agent_done_then_exactly_once(&self, agent: &mut Proc) -> anyhow::Result<u64> {
        assert_eq!(agent.terminate()?, Some(0), "agent exits cleanly");
        let log = agent.log_text();
        assert!(
            !log.contains("SpoolBatchesDropped"),
            "the spool dropped batches: {log}"
        );
        // Batches still in the spool at exit were never sent; they go with the next start.
        // A batch sent just before the agent left may still be committing: wait for the
        // server to end the stream, then for ClickHouse to hold what it committed.
        settled(&self.scratch, self.server.grpc, NODE).await?;
        let store = ClickHouseStore::open(&ClickHouseSettings {
            url: self.clickhouse.url(),
            database: "guardian".into(),
            ..ClickHouseSettings::default()
        })
        .await?;
        let (sent, counts) = eventually(WAIT, "ClickHouse to hold every batch", || async {
            let sent = self.last_seq().await?;
            let counts = store.host_counts(NODE).await.ok()?;
            (sent > 0 && counts.2 == sent).then_some((sent, counts))
        })
        .await?;
        assert_eq!(
            counts,
            (sent, sent, sent),
            "rows, distinct (seq, idx) and distinct seqs must all equal the {sent} batches sent"
        );
        let range = self.clickhouse.query(&format!(
            "SELECT min(seq), max(seq) FROM guardian.host_samples WHERE node_id = '{NODE}'"
        ))?;
        assert_eq!(
            range.trim(),
            format!("1\t{sent}"),
            "seqs are exactly 1..={sent}"
        );
        Ok(sent)
    }
}

#[tokio::test]
async fn server_killed_mid_stream_loses_and_doubles_nothing() -> TestResult {
    let mut rig = Rig::new().await?;
    let mut agent = rig.agent(rig.server.grpc, 1)?;
    rig.wait_for_seq(10).await?;
    rig.server.proc.child.kill()?;
    rig.server.proc.child.wait()?;
    tokio::time::sleep(Duration::from_millis(700)).await;
    rig.restart_server()?;
    let restored = rig.last_seq().await.unwrap_or(0);
    rig.wait_for_seq(restored + 10).await?;
    rig.agent_done_then_exactly_once(&mut agent).await?;
    Ok(())
}

#[tokio::test]
async fn clickhouse_down_for_a_minute_loses_and_doubles_nothing() -> TestResult {
    let mut rig = Rig::new().await?;
    let mut agent = rig.agent(rig.server.grpc, 1)?;
    rig.wait_for_seq(5).await?;
    rig.clickhouse.stop()?;
    let before = rig.last_seq().await.unwrap_or(0);
    tokio::time::sleep(OUTAGE).await;
    // Ingest went on into the outbox while ClickHouse was down: acked, durable.
    let during = rig.last_seq().await.unwrap_or(0);
    assert!(
        during >= before + 100,
        "batches kept being acked during the outage ({before} -> {during})"
    );
    rig.clickhouse.start_again()?;
    rig.wait_for_seq(during + 5).await?;
    rig.agent_done_then_exactly_once(&mut agent).await?;
    let log = rig.server_log();
    assert!(log.contains("ClickHouseUnavailable"), "{log}");
    assert!(log.contains("ClickHouseRecovered"), "{log}");
    // The replay is long work: started with its total, and reported done with its rate.
    let started = log
        .lines()
        .find(|l| l.contains("ProgressStarted") && l.contains("outbox_replay"))
        .unwrap_or_else(|| panic!("no ProgressStarted for the replay: {log}"));
    assert!(
        started.contains("total=") && !started.contains("total=0 "),
        "{started}"
    );
    assert!(
        log.lines().any(|l| l.contains("ProgressDone")
            && l.contains("outbox_replay")
            && l.contains("rate_per_second=")),
        "{log}"
    );
    Ok(())
}

#[tokio::test]
async fn agent_killed_and_restarted_loses_and_doubles_nothing() -> TestResult {
    let rig = Rig::new().await?;
    let mut first = rig.agent(rig.server.grpc, 1)?;
    let killed_at = rig.wait_for_seq(10).await?;
    first.child.kill()?;
    first.child.wait()?;
    let mut second = rig.agent(rig.server.grpc, 2)?;
    rig.wait_for_seq(killed_at + 10).await?;
    rig.agent_done_then_exactly_once(&mut second).await?;
    Ok(())
}

#[tokio::test]
async fn network_cut_for_a_minute_loses_and_doubles_nothing() -> TestResult {
    let rig = Rig::new().await?;
    let proxy = Proxy::start(rig.server.grpc).await?;
    let mut agent = rig.agent(proxy.addr(), 1)?;
    rig.wait_for_seq(5).await?;
    proxy.cut();
    let before = rig.last_seq().await.unwrap_or(0);
    tokio::time::sleep(OUTAGE).await;
    let during = rig.last_seq().await.unwrap_or(0);
    assert!(
        during <= before + 2,
        "nothing crosses a cut network ({before} -> {during})"
    );
    let spooled = std::fs::read_dir(rig.scratch.path(&format!("spool-{NODE}/batches")))?.count();
    assert!(
        spooled >= 300,
        "the agent spools on disk during the cut ({spooled} files)"
    );
    proxy.heal();
    rig.wait_for_seq(before + spooled as u64).await?;
    rig.agent_done_then_exactly_once(&mut agent).await?;
    Ok(())
}

/// Copies every file of the SQLite ledger at `data` (the database, its WAL and shared-memory
/// files, and its `-outbox` segment folder) into `to`, as an operator's backup would.
fn copy_ledger(data: &std::path::Path, to: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(data)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_ledger(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// Waits until ClickHouse holds every batch the server committed, so that what the next
/// step does to the ledger cannot be blamed on batches still in its outbox. The agent has
/// exited: its last batch may still be committing until the server ends its stream.
async fn clickhouse_caught_up(rig: &Rig) -> anyhow::Result<u64> {
    settled(&rig.scratch, rig.server.grpc, NODE).await?;
    let store = ClickHouseStore::open(&ClickHouseSettings {
        url: rig.clickhouse.url(),
        database: "guardian".into(),
        ..ClickHouseSettings::default()
    })
    .await?;
    eventually(WAIT, "ClickHouse to catch up", || async {
        let sent = rig.last_seq().await?;
        let counts = store.host_counts(NODE).await.ok()?;
        (sent > 0 && counts.2 == sent).then_some(sent)
    })
    .await
}

/// Pauses and resumes the node through the Fleet API: two operator decisions, two audit
/// entries.
async fn pause_and_resume(rig: &Rig) -> anyhow::Result<()> {
    let mut operator = rig.scratch.operator(rig.server.grpc).await?;
    operator
        .pause_node(guardian_proto::v1::PauseNodeRequest {
            node_id: NODE.into(),
            reason: "restore test".into(),
        })
        .await?;
    operator
        .resume_node(guardian_proto::v1::ResumeNodeRequest {
            node_id: NODE.into(),
        })
        .await?;
    Ok(())
}

/// Waits until ClickHouse's `audit` table holds every entry of the ledger's chain, each with
/// the ledger's own hash.
async fn audit_mirrored(rig: &Rig) -> anyhow::Result<usize> {
    let ledger = guardian_server::store::Ledger::open(&rig.scratch.sqlite_url()).await?;
    let ours: Vec<String> = ledger
        .audit_entries(0, 100_000)
        .await?
        .into_iter()
        .map(|e| format!("{}\t{}", e.seq, e.hash))
        .collect();
    ledger.close().await;
    eventually(
        WAIT,
        "ClickHouse's audit table to hold the ledger's chain",
        || async {
            let held = rig
                .clickhouse
                .query("SELECT seq, hash FROM guardian.audit")
                .ok()?;
            let held: std::collections::HashSet<&str> = held.lines().collect();
            ours.iter()
                .all(|pair| held.contains(pair.as_str()))
                .then_some(ours.len())
        },
    )
    .await
}

#[tokio::test]
async fn a_ledger_restored_from_a_backup_loses_nothing_in_clickhouse() -> TestResult {
    // Reproduced by the review: after a restore, new batches got outbox ids ClickHouse already
    // held from the lost timeline, were acked, and never inserted (59 of 84 in one run).
    let mut rig = Rig::new().await?;
    let mut agent = rig.agent(rig.server.grpc, 1)?;
    rig.wait_for_seq(20).await?;
    pause_and_resume(&rig).await?;
    rig.server.proc.terminate_within(Duration::from_secs(30))?;
    let data = rig.scratch.path("data");
    let backup = rig.scratch.path("backup");
    copy_ledger(&data, &backup)?;
    rig.restart_server()?;
    let before_restore = rig.last_seq().await.unwrap_or(0);
    rig.wait_for_seq(before_restore + 40).await?;
    // Everything acked so far reaches ClickHouse before the ledger is replaced (what is acked
    // and still in the outbox when a ledger is replaced is gone: the agent deleted it).
    assert_eq!(agent.terminate()?, Some(0), "agent exits cleanly");
    clickhouse_caught_up(&rig).await?;
    // The lost timeline's audit entries reach the mirror too: ClickHouse then holds seqs the
    // restored chain will reuse for other entries.
    pause_and_resume(&rig).await?;
    audit_mirrored(&rig).await?;
    rig.server.proc.terminate_within(Duration::from_secs(30))?;
    std::fs::remove_dir_all(&data)?;
    copy_ledger(&backup, &data)?;
    rig.restart_server()?;
    let restored = rig.last_seq().await.unwrap_or(0);
    assert!(
        restored < before_restore + 40,
        "the ledger is the backup's ({restored})"
    );
    let mut agent = rig.agent(rig.server.grpc, 2)?;
    // The agent numbers on from its own spool; the restored ledger commits those batches.
    let resumed = eventually(WAIT, "the agent to stream again", || async {
        rig.last_seq()
            .await
            .filter(|seq| *seq > before_restore + 40)
    })
    .await?;
    rig.wait_for_seq(resumed + 40).await?;
    rig.agent_done_then_exactly_once(&mut agent).await?;
    // The restored chain's new entries are mirrored, not skipped under the reused seqs.
    pause_and_resume(&rig).await?;
    let entries = audit_mirrored(&rig).await?;
    assert!(entries >= 4, "{entries} audit entries");
    Ok(())
}

#[tokio::test]
async fn a_move_from_sqlite_to_postgresql_loses_nothing_in_clickhouse() -> TestResult {
    let postgres = guardian_tests::Postgres::start()?;
    let mut rig = Rig::new().await?;
    let mut agent = rig.agent(rig.server.grpc, 1)?;
    rig.wait_for_seq(30).await?;
    // The outbox drains into ClickHouse before the move, as the README asks.
    assert_eq!(agent.terminate()?, Some(0), "agent exits cleanly");
    clickhouse_caught_up(&rig).await?;
    rig.server.proc.terminate_within(Duration::from_secs(30))?;
    let text = std::fs::read_to_string(&rig.config)?.replacen(
        &format!("ledger_url = \"{}\"", rig.scratch.sqlite_url()),
        &format!("ledger_url = \"{}\"", postgres.url()),
        1,
    );
    assert!(text.contains("postgres"), "{text}");
    std::fs::write(&rig.config, text)?;
    rig.restart_server()?;
    let mut agent = rig.agent(rig.server.grpc, 2)?;
    let resumed = eventually(WAIT, "the agent to stream into the new ledger", || async {
        rig.last_seq().await.filter(|seq| *seq > 30)
    })
    .await?;
    rig.wait_for_seq(resumed + 40).await?;
    rig.agent_done_then_exactly_once(&mut agent).await?;
    Ok(())
}

#[tokio::test]
async fn clickhouse_killed_mid_insert_under_several_nodes_and_two_days_loses_and_doubles_nothing()
-> TestResult {
    const NODES: [&str; 3] = ["val-a", "val-b", "val-c"];
    const BATCHES: u64 = 150;
    let mut clickhouse = ClickHouse::start()?;
    let scratch = Scratch::new(&NODES)?;
    let config = scratch.server_config(
        &scratch.sqlite_url(),
        &format!(
            "[clickhouse]\nurl = \"{}\"\ndatabase = \"guardian\"\ninsert_max_delay_ms = 30\nrequest_timeout_ms = 3000\n",
            clickhouse.url()
        ),
    )?;
    let server = Server::start(&config, scratch.path("server.log"))?;
    let stream =
        |node| guardian_tests::stream_two_day_batches(&scratch, server.grpc, node, 1..=BATCHES);
    let streams = async { tokio::try_join!(stream(NODES[0]), stream(NODES[1]), stream(NODES[2])) };
    // Five times while the nodes stream: let inserts run, then kill ClickHouse with -9
    // wherever it is and start it again. Before the read-back fix, 2 runs in 8 (three kills)
    // lost the newer day's rows of the chunk in flight: its older day's part had landed.
    let killer = async {
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(400)).await;
            clickhouse.kill_and_restart()?;
        }
        anyhow::Ok(())
    };
    let (streamed, killed) = tokio::join!(streams, killer);
    streamed?;
    killed?;

    // Every acked sample reaches ClickHouse exactly once: rows = distinct (node, seq, idx) =
    // 4 per batch, both days present, seqs exactly 1..=BATCHES per node.
    let want = NODES.len() as u64 * BATCHES * 4;
    let counts = eventually(Duration::from_secs(60), "ClickHouse to hold every sample", || async {
        let text = clickhouse
            .query("SELECT count(), uniqExact(node_id, seq, idx) FROM guardian.host_samples")
            .ok()?;
        (text.split_whitespace().nth(1)? == want.to_string()).then_some(text)
    })
    .await
    .map_err(|e| {
        let held = clickhouse.query(
            "SELECT node_id, count(), uniqExact(seq, idx), min(seq), max(seq), uniqExact(toYYYYMMDD(ts)) \
             FROM guardian.host_samples GROUP BY node_id ORDER BY node_id",
        );
        let short = clickhouse.query(
            "SELECT node_id, seq, groupArray(idx), groupArray(outbox_id) FROM guardian.host_samples \
             GROUP BY node_id, seq HAVING count() != 4",
        );
        let log = std::fs::read_to_string(scratch.path("server.log")).unwrap_or_default();
        e.context(format!(
            "ClickHouse holds {held:?}; short batches {short:?}; server log:\n{log}\nClickHouse log:\n{}",
            clickhouse.log_text()
        ))
    })?;
    // A row written twice would show after the distinct count has caught up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let counts_after = clickhouse
        .query("SELECT count(), uniqExact(node_id, seq, idx) FROM guardian.host_samples")?;
    assert_eq!(
        counts_after.trim(),
        format!("{want}\t{want}"),
        "then {counts}"
    );
    let per_node = clickhouse.query(
        "SELECT node_id, min(seq), max(seq), uniqExact(seq), uniqExact(toYYYYMMDD(ts)) \
         FROM guardian.host_samples GROUP BY node_id ORDER BY node_id",
    )?;
    let expected: String = NODES
        .iter()
        .map(|n| format!("{n}\t1\t{BATCHES}\t{BATCHES}\t2\n"))
        .collect();
    assert_eq!(per_node, expected);
    // The rollups hold each row once too: a kill between a raw part and its view's part
    // is repaired on the replay (which may still be under way for the last chunk).
    let raw_and_rollup = || -> anyhow::Result<(String, String)> {
        let raw = clickhouse.query(
            "SELECT node_id, count() FROM guardian.host_samples GROUP BY node_id ORDER BY node_id",
        )?;
        let rollup = clickhouse.query(
            "SELECT node_id, countMerge(count_state) FROM guardian.rollup_1m \
             WHERE metric = 'cpu_busy_percent' GROUP BY node_id ORDER BY node_id",
        )?;
        Ok((raw, rollup))
    };
    let (raw, rollup) =
        agreed_or_last(WAIT, "rollup_1m to agree with the raw rows", raw_and_rollup).await?;
    let log = std::fs::read_to_string(scratch.path("server.log"))?;
    let rollup_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ClickHouseRollup") || l.contains("ClickHouseInsertFailed"))
        .collect();
    assert_eq!(
        rollup,
        raw,
        "rollup_1m against the raw rows; the server's repairs and failures:\n{}",
        rollup_lines.join("\n")
    );
    assert!(
        log.contains("ClickHouseInsertFailed") || log.contains("ClickHouseUnavailable"),
        "the kills were felt: {log}"
    );
    assert!(!log.contains("ClickHouseRollupDiffers"), "{log}");
    Ok(())
}
