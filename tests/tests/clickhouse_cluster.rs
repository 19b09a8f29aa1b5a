//! ClickHouse cluster mode (`cluster = "fleet"`) on a real cluster: ZooKeeper plus
//! 2 shards x 2 replicas of Debian's ClickHouse 18.16 on loopback, the server writing through
//! Distributed tables into Replicated ones. Needs the Debian packages `zookeeper`,
//! `clickhouse-server` and `clickhouse-client` (`scripts/setup` installs them).

use std::time::Duration;

use guardian_server::store::clickhouse::{ClickHouseSettings, ClickHouseStore};
use guardian_tests::clickhouse::ClickHouseCluster;
use guardian_tests::{Scratch, Server, agreed_or_last, eventually, stream_two_day_batches};

type TestResult = anyhow::Result<()>;

/// Spread over both shards by `cityHash64(node_id)` (checked below, not assumed).
const NODES: [&str; 6] = ["val-a", "val-b", "val-c", "val-d", "val-e", "val-f"];
const BATCHES: u64 = 250;
/// Batches streamed while single replicas are killed; the rest stream while a shard is down.
const HALF: u64 = 150;
/// Host rows per batch ([`guardian_tests::two_day_batch`]): two two days ago, two now.
const ROWS_PER_BATCH: u64 = 4;

/// Rows per replica, in server order.
fn per_server(cluster: &ClickHouseCluster, sql: &str) -> anyhow::Result<Vec<u64>> {
    cluster
        .query_each(sql)?
        .iter()
        .map(|text| Ok(text.trim().parse::<u64>()?))
        .collect()
}

/// Streams `seqs` of every node at once.
async fn stream_all(
    scratch: &Scratch,
    grpc: std::net::SocketAddr,
    seqs: std::ops::RangeInclusive<u64>,
) -> TestResult {
    let stream = |node| stream_two_day_batches(scratch, grpc, node, seqs.clone());
    tokio::try_join!(
        stream(NODES[0]),
        stream(NODES[1]),
        stream(NODES[2]),
        stream(NODES[3]),
        stream(NODES[4]),
        stream(NODES[5])
    )?;
    Ok(())
}

#[tokio::test]
async fn cluster_mode_stores_every_batch_once_through_replica_kills_keeps_rollups_and_drops_old_days_on_every_shard()
-> TestResult {
    let mut cluster = ClickHouseCluster::start(2, 2)?;
    let scratch = Scratch::new(&NODES)?;
    let config = scratch.server_config(
        &scratch.sqlite_url(),
        &format!(
            "[clickhouse]\nurl = \"{}\"\ndatabase = \"guardian\"\ncluster = \"{}\"\n\
             insert_max_delay_ms = 30\nrequest_timeout_ms = 3000\n",
            cluster.servers[0].url(),
            ClickHouseCluster::NAME
        ),
    )?;
    // The server runs the migrations ON CLUSTER at start.
    let server = Server::start(&config, scratch.path("server.log"))?;
    // Phase 1, while the nodes stream their first batches: kill with -9 each replica the
    // sink does not write through (server 0 is in the URL), one at a time; each stays down
    // for a while (the Distributed INSERT must fail over to the other replica of its shard,
    // or fails when the kill lands mid-INSERT) and comes back lagging (the sink's reads must
    // not take its answer as what the cluster holds).
    // The kills start once the sink has written through: a server killed while it creates
    // a Replicated table leaves its replica in ZooKeeper without the table (an operator's
    // fix, which the migration error names; not what this test is about).
    let killer = async {
        let entry = cluster.servers[0].http_port;
        eventually(
            Duration::from_secs(60),
            "the sink to write a first row",
            || async move {
                let count = guardian_tests::clickhouse::http_query(
                    entry,
                    "SELECT count() FROM guardian.host_samples",
                )
                .ok()?;
                (count.trim().parse::<u64>().ok()? > 0).then_some(())
            },
        )
        .await?;
        for victim in [2, 3, 1, 2] {
            tokio::time::sleep(Duration::from_millis(400)).await;
            cluster.servers[victim].kill();
            tokio::time::sleep(Duration::from_millis(700)).await;
            cluster.servers[victim].start_again()?;
        }
        anyhow::Ok(())
    };
    let (streamed, killed) = tokio::join!(stream_all(&scratch, server.grpc, 1..=HALF), killer);
    streamed?;
    killed?;
    // Phase 2: a whole shard down (both replicas of shard 02) while the nodes stream the
    // rest. Whether a phase 1 kill hits an INSERT is up to timing; here every INSERT that
    // touches shard 02 fails until it is back, so the sink's retries are always exercised.
    cluster.servers[2].kill();
    cluster.servers[3].kill();
    let outage = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        cluster.servers[2].start_again()?;
        cluster.servers[3].start_again()?;
        anyhow::Ok(())
    };
    let (streamed, restarted) = tokio::join!(
        stream_all(&scratch, server.grpc, HALF + 1..=BATCHES),
        outage
    );
    streamed?;
    restarted?;

    // Every acked sample is in the cluster exactly once.
    let want = NODES.len() as u64 * BATCHES * ROWS_PER_BATCH;
    let entry = &cluster.servers[0];
    let counts = eventually(
        Duration::from_secs(60),
        "the cluster to hold every sample",
        || async {
            let text = entry
                .query("SELECT count(), uniqExact(node_id, seq, idx) FROM guardian.host_samples")
                .ok()?;
            (text.split_whitespace().nth(1)? == want.to_string()).then_some(text)
        },
    )
    .await
    .map_err(|e| {
        let log = std::fs::read_to_string(scratch.path("server.log")).unwrap_or_default();
        e.context(format!(
            "server log:\n{log}\nClickHouse logs:\n{}",
            cluster.log_text()
        ))
    })?;
    for server in &cluster.servers {
        server.query("SYSTEM SYNC REPLICA guardian.host_samples_local")?;
        server.query("SYSTEM SYNC REPLICA guardian.rollup_1m_local")?;
    }
    let counts_after =
        entry.query("SELECT count(), uniqExact(node_id, seq, idx) FROM guardian.host_samples")?;
    assert_eq!(
        counts_after.trim(),
        format!("{want}\t{want}"),
        "then {counts}"
    );
    let per_node = entry.query(
        "SELECT node_id, min(seq), max(seq), uniqExact(seq), count() \
         FROM guardian.host_samples GROUP BY node_id ORDER BY node_id",
    )?;
    let expected: String = NODES
        .iter()
        .map(|n| {
            format!(
                "{n}\t1\t{BATCHES}\t{BATCHES}\t{}\n",
                BATCHES * ROWS_PER_BATCH
            )
        })
        .collect();
    assert_eq!(per_node, expected);

    // Each shard holds its nodes' rows on both replicas, and both shards hold some.
    let local = per_server(&cluster, "SELECT count() FROM guardian.host_samples_local")?;
    assert_eq!(local[0], local[1], "shard 01's replicas differ: {local:?}");
    assert_eq!(local[2], local[3], "shard 02's replicas differ: {local:?}");
    assert_eq!(local[0] + local[2], want, "{local:?}");
    assert!(
        local[0] > 0 && local[2] > 0,
        "one shard holds every node: {local:?}"
    );

    // The rollups (materialized views on each shard, replicated) agree with the raw rows.
    // Replicas catch up a moment apart, so poll until they agree and report the last read.
    let raw_and_rollup = || -> anyhow::Result<(String, String)> {
        let raw = entry.query(
            "SELECT node_id, count(), round(avg(cpu_busy_percent), 6) FROM guardian.host_samples \
             GROUP BY node_id ORDER BY node_id",
        )?;
        let rollup = entry.query(
            "SELECT node_id, countMerge(count_state), round(avgMerge(avg_state), 6) \
             FROM guardian.rollup_1m WHERE metric = 'cpu_busy_percent' \
             GROUP BY node_id ORDER BY node_id",
        )?;
        Ok((raw, rollup))
    };
    let (raw, rollup) = agreed_or_last(
        Duration::from_secs(30),
        "rollup_1m to agree with the raw rows",
        raw_and_rollup,
    )
    .await?;
    let detail = cluster.query_each(
        "SELECT node_id, countMerge(count_state) FROM guardian.rollup_1m_local \
         WHERE metric = 'cpu_busy_percent' GROUP BY node_id ORDER BY node_id",
    )?;
    let detail_raw = cluster.query_each(
        "SELECT node_id, count() FROM guardian.host_samples_local GROUP BY node_id ORDER BY node_id",
    )?;
    assert_eq!(
        rollup,
        raw,
        "rollup_1m against the raw rows; per replica rollup {detail:?} raw {detail_raw:?}\n{}",
        std::fs::read_to_string(scratch.path("server.log")).unwrap_or_default()
    );
    let rollup_local = per_server(
        &cluster,
        "SELECT countMerge(count_state) FROM guardian.rollup_1m_local WHERE metric = 'cpu_busy_percent'",
    )?;
    assert_eq!(
        rollup_local, local,
        "rollup_1m per replica against the raw rows"
    );

    // The outage was felt by the sink, and it said so.
    let log = std::fs::read_to_string(scratch.path("server.log"))?;
    eprintln!(
        "insert failures {}, rollup repairs {}, rollup differences left {}",
        log.matches("ClickHouseInsertFailed").count(),
        log.matches("ClickHouseRollupRepaired").count(),
        log.matches("ClickHouseRollupDiffers").count()
    );
    assert!(
        log.contains("ClickHouseInsertFailed") || log.contains("ClickHouseUnavailable"),
        "no insert failed while shard 02 was down: the test proved nothing\n{log}"
    );
    assert!(!log.contains("ClickHouseRollupDiffers"), "{log}");

    // Retention: a 1-day raw retention drops the day two days back on every shard (each
    // shard holds rows of that day), and keeps today.
    let old = "SELECT count() FROM guardian.host_samples_local WHERE ts < now() - 86400";
    let before = per_server(&cluster, old)?;
    assert!(
        before.iter().all(|&n| n > 0),
        "old rows per replica: {before:?}"
    );
    let store = ClickHouseStore::open(&ClickHouseSettings {
        url: cluster.servers[0].url(),
        database: "guardian".into(),
        cluster: ClickHouseCluster::NAME.into(),
        raw_retention_days: 1,
        ..ClickHouseSettings::default()
    })
    .await?;
    let dropped = store.drop_expired(guardian_server::unix_ms()).await?;
    assert!(
        dropped.iter().any(|d| d.starts_with("host_samples:")),
        "dropped {dropped:?}"
    );
    // One replica per shard runs the DROP; the other takes it from the replication log.
    for server in &cluster.servers {
        server.query("SYSTEM SYNC REPLICA guardian.host_samples_local")?;
    }
    assert_eq!(per_server(&cluster, old)?, vec![0; 4], "old rows left");
    let kept = per_server(&cluster, "SELECT count() FROM guardian.host_samples_local")?;
    assert_eq!(kept[0] + kept[2], want / 2, "today's rows: {kept:?}");
    drop(server);
    Ok(())
}
