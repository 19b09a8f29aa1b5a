//! The ClickHouse store against a real, private ClickHouse server (18.16 from Debian here):
//! migrations, exactly-once inserts across replays and restarts, rollups, retention and the
//! reads that rebuild in-memory windows.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use guardian_proto::v1::{
    ChainSample, DiskIo, Filesystem, GpuDevice, GpuSample, HostSample, KeyFile, KeystoreSample,
    NetIo, Pressure, Sample, SampleBatch, SamplerUnavailable, XidEvent, sample,
};
use guardian_server::batch::Batch;
use guardian_server::batch::values::{ChainValues, HostValues};
use guardian_server::store::clickhouse::{ClickHouseSettings, ClickHouseStore, migrations};
use guardian_server::store::outbox::blob;
use guardian_server::store::outbox::{OutboxBatch, OutboxBlob};
use guardian_server::store::telemetry::metric;
use guardian_tests::clickhouse::ClickHouse;

type TestResult = anyhow::Result<()>;

const RAW_TABLES: [&str; 5] = [
    "host_samples",
    "chain_samples",
    "gpu_samples",
    "keystore_samples",
    "unavailable_samples",
];

fn settings(ch: &ClickHouse) -> ClickHouseSettings {
    ClickHouseSettings {
        url: ch.url(),
        ..ClickHouseSettings::default()
    }
}

/// As a remote server is reached: LZ4-compressed requests and answers (the default to a
/// loopback address is none).
fn lz4_settings(ch: &ClickHouse) -> ClickHouseSettings {
    ClickHouseSettings {
        compression: "lz4".into(),
        ..settings(ch)
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn host(cpu: f64) -> sample::Kind {
    sample::Kind::Host(HostSample {
        cpu_busy_percent: cpu,
        mem_total_bytes: 64 << 30,
        mem_available_bytes: 20 << 30,
        load_avg_1m: cpu / 10.0,
        oom_kills_total: 2,
        ..Default::default()
    })
}

fn chain(best: u64) -> sample::Kind {
    sample::Kind::Chain(ChainSample {
        responsive: true,
        best_block: best,
        finalized_block: best - 2,
        sync_highest_block: best + 1,
        peers: 12,
        rpc_latency_ms: 3.5,
        spec_version: 393,
        ..Default::default()
    })
}

fn gpu(util: f64) -> sample::Kind {
    let device = |index: u32| GpuDevice {
        index,
        uuid: format!("GPU-{index}"),
        utilisation_gpu_percent: util + f64::from(index),
        temperature_celsius: 60.0,
        xid_events: vec![XidEvent {
            xid: 79,
            observed_at_unix_ms: 1,
        }],
        ..Default::default()
    };
    sample::Kind::Gpu(GpuSample {
        available: true,
        devices: vec![device(0), device(1)],
        ..Default::default()
    })
}

fn keystore() -> sample::Kind {
    sample::Kind::Keystore(KeystoreSample {
        present: true,
        on_tmpfs: true,
        dir_mode: 0o700,
        file_count: 1,
        total_bytes: 300,
        files: vec![KeyFile {
            name: "hotkeys/default".into(),
            sha256_fingerprint: "ab".repeat(32),
            ..Default::default()
        }],
        ..Default::default()
    })
}

fn unavailable() -> sample::Kind {
    sample::Kind::Unavailable(SamplerUnavailable {
        sampler: "gpu".into(),
        reason: "no NVML".into(),
    })
}

fn batch(outbox_id: u64, node: &str, seq: u64, samples: Vec<(i64, sample::Kind)>) -> OutboxBatch {
    OutboxBatch {
        outbox_id,
        node_id: node.into(),
        network: "finney".into(),
        received_at_unix_ms: samples.last().map_or(0, |(at, _)| *at),
        batch: std::sync::Arc::new(Batch::from(&SampleBatch {
            seq,
            spool_dropped_batches_total: 0,
            samples: samples
                .into_iter()
                .map(|(observed_at_unix_ms, kind)| Sample {
                    observed_at_unix_ms,
                    kind: Some(kind),
                })
                .collect(),
        })),
    }
}

/// Batches `ids` of node n1, each with one sample of every kind (GPU: two devices).
fn mixed_chunk(ids: std::ops::RangeInclusive<u64>, at: i64) -> Vec<OutboxBatch> {
    ids.map(|id| {
        let t = at + i64::try_from(id).unwrap_or(0) * 1000;
        batch(
            id,
            "n1",
            id + 100,
            vec![
                (t, host(id as f64)),
                (t, chain(1000 + id)),
                (t, gpu(50.0)),
                (t, keystore()),
                (t, unavailable()),
            ],
        )
    })
    .collect()
}

fn count(ch: &ClickHouse, table: &str) -> anyhow::Result<u64> {
    Ok(ch
        .query(&format!("SELECT count() FROM guardian.{table}"))?
        .trim()
        .parse()?)
}

#[tokio::test]
async fn opening_twice_applies_each_migration_once() -> TestResult {
    let ch = ClickHouse::start()?;
    let store = ClickHouseStore::open(&settings(&ch)).await?;
    assert!(store.server_version().starts_with("18.16"));
    assert!(!store.supports_ttl(), "18.16 has no table TTL");
    store.ping().await?;
    drop(store);
    let again = ClickHouseStore::open(&settings(&ch)).await?;
    let recorded =
        ch.query("SELECT version, name FROM guardian.schema_migrations ORDER BY version")?;
    let versions: Vec<&str> = recorded
        .lines()
        .filter_map(|l| l.split('\t').next())
        .collect();
    assert_eq!(versions, ["1", "2", "3"], "{recorded}");
    let tables =
        ch.query("SELECT name FROM system.tables WHERE database = 'guardian' ORDER BY name")?;
    for table in
        RAW_TABLES
            .iter()
            .chain(&["rollup_1m", "rollup_1h", "findings", "actions", "audit"])
    {
        assert!(
            tables.lines().any(|l| l == *table),
            "{table} missing: {tables}"
        );
    }
    assert_eq!(tables.lines().filter(|l| l.starts_with("mv_")).count(), 6);
    assert_eq!(again.high_water().await?.min(), 0);

    // Refusals name the server and never the password.
    let wrong = ClickHouseSettings {
        password: "hunter2".into(),
        ..settings(&ch)
    };
    let err = ClickHouseStore::open(&wrong)
        .await
        .expect_err("wrong password");
    assert_eq!(err.kind(), "server", "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&ch.url()) && !text.contains("hunter2"),
        "{text}"
    );
    let nowhere = ClickHouseSettings {
        url: "http://127.0.0.1:1".into(),
        ..settings(&ch)
    };
    let err = ClickHouseStore::open(&nowhere)
        .await
        .expect_err("nothing listens");
    assert_eq!(err.kind(), "unreachable", "{err}");
    Ok(())
}

#[tokio::test]
async fn a_replayed_chunk_is_stored_once_per_table_even_across_a_restart() -> TestResult {
    let mut ch = ClickHouse::start()?;
    let store = ClickHouseStore::open(&lz4_settings(&ch)).await?;
    let at = now_ms() - 60_000;
    let first = mixed_chunk(1..=5, at);

    let mut high = store.high_water().await?;
    let stats = store.insert(&first, &mut high).await?;
    assert_eq!((stats.batches, stats.rows, stats.skipped_rows), (5, 30, 0));
    assert_eq!(high.min(), 5);
    for (table, rows) in RAW_TABLES.iter().zip([5, 5, 10, 5, 5]) {
        assert_eq!(count(&ch, table)?, rows, "{table}");
    }
    let stored =
        ch.query("SELECT fingerprints, present, dir_mode FROM guardian.keystore_samples LIMIT 1")?;
    assert_eq!(
        stored.trim(),
        format!("['hotkeys/default:{}']\t1\t448", "ab".repeat(32))
    );
    assert_eq!(
        ch.query("SELECT sampler, reason FROM guardian.unavailable_samples LIMIT 1")?
            .trim(),
        "gpu\tno NVML"
    );

    // The server restarts; the sink replays an overlapping chunk with what it reads back.
    ch.start_again()?;
    let mut high = store.high_water().await?;
    for table in RAW_TABLES {
        assert_eq!(high.get(table), 5, "{table}");
    }
    let replay = mixed_chunk(3..=8, at);
    let stats = store.insert(&replay, &mut high).await?;
    assert_eq!((stats.batches, stats.rows, stats.skipped_rows), (3, 18, 18));
    assert_eq!(high.min(), 8);
    // And the same chunk once more, as after an insert that timed out but landed.
    let mut high = store.high_water().await?;
    let stats = store.insert(&replay, &mut high).await?;
    assert_eq!((stats.batches, stats.rows), (0, 0));

    let (rows, distinct, seqs) = store.host_counts("n1").await?;
    assert_eq!((rows, distinct, seqs), (8, 8, 8));
    for (table, rows) in RAW_TABLES.iter().zip([8, 8, 16, 8, 8]) {
        assert_eq!(count(&ch, table)?, rows, "{table}");
    }
    Ok(())
}

/// An INSERT whose rows fall in two day partitions is two parts, and ClickHouse may keep one
/// without the other (killed between them, or a shard down in a cluster). The retry must
/// store the missing day's rows, once, although the table's `max(outbox_id)` already covers
/// the whole chunk.
#[tokio::test]
async fn a_chunk_that_landed_in_one_day_partition_only_is_completed_once() -> TestResult {
    let ch = ClickHouse::start()?;
    let store = ClickHouseStore::open(&settings(&ch)).await?;
    // Two days apart: different partitions in any server time zone.
    let (old_day, today) = (now_ms() - 2 * 86_400_000, now_ms() - 60_000);
    // Per batch: the old day's samples first (indexes 0 and 1), then today's (2 and 3).
    let samples = |id: u64, days: &[i64]| {
        days.iter()
            .flat_map(|&t| {
                let t = t + i64::try_from(id).unwrap_or(0) * 1000;
                [(t, host(id as f64)), (t, gpu(40.0))]
            })
            .collect::<Vec<_>>()
    };
    let chunk = |days: &[i64]| {
        (1..=6u64)
            .map(|id| {
                let node = if id % 2 == 0 { "n1" } else { "n2" };
                batch(id, node, id + 100, samples(id, days))
            })
            .collect::<Vec<_>>()
    };
    // What a crash between the two parts leaves: the old day's rows of every batch.
    let mut high = store.high_water().await?;
    store.insert(&chunk(&[old_day]), &mut high).await?;
    assert_eq!(
        (count(&ch, "host_samples")?, count(&ch, "gpu_samples")?),
        (6, 12)
    );

    // The sink starts again, reads the marks, and replays the whole chunk.
    let mut high = store.high_water().await?;
    let stats = store.insert(&chunk(&[old_day, today]), &mut high).await?;
    assert_eq!(
        (stats.batches, stats.rows, stats.skipped_rows),
        (6, 18, 18),
        "today's host and GPU rows are written, the old day's left out"
    );
    let per_table = |table: &str| -> anyhow::Result<String> {
        Ok(ch
            .query(&format!(
                "SELECT count(), uniqExact(node_id, seq, idx), uniqExact(toYYYYMMDD(ts)) FROM guardian.{table}"
            ))?
            .trim()
            .to_owned())
    };
    assert_eq!(per_table("host_samples")?, "12\t12\t2");
    assert_eq!(per_table("gpu_samples")?, "24\t12\t2");
    // And once more, as after an insert that timed out but landed: nothing new.
    let mut high = store.high_water().await?;
    let stats = store.insert(&chunk(&[old_day, today]), &mut high).await?;
    assert_eq!((stats.batches, stats.rows, stats.skipped_rows), (0, 0, 36));
    assert_eq!(per_table("host_samples")?, "12\t12\t2");
    Ok(())
}

/// Raw rows that landed without their rollup (ClickHouse killed between the raw part and the
/// view's part; a detached view stands in for the kill here) get it back when the same chunk
/// is retried, once. A bucket short by less than the chunk's landed rows, as when a chunk grew
/// between two such attempts, is reported and left alone: the store cannot tell which rows
/// lack their rollup, which is why the sink retries a failed chunk as the same batches.
#[tokio::test]
async fn rows_that_lost_their_rollup_get_it_back_when_the_same_chunk_is_retried() -> TestResult {
    let ch = ClickHouse::start()?;
    let store = ClickHouseStore::open(&settings(&ch)).await?;
    // One minute bucket, five minutes ago: a host sample a second.
    let minute = (now_ms() / 60_000 - 5) * 60_000;
    let chunk = |ids: std::ops::RangeInclusive<u64>| {
        ids.map(|id| {
            let t = minute + i64::try_from(id).unwrap_or(0) * 1000;
            batch(id, "n1", id, vec![(t, host(10.0))])
        })
        .collect::<Vec<_>>()
    };
    let view = |verb: &str| ch.query(&format!("{verb} TABLE guardian.mv_host_samples_rollup_1m"));
    let rolled_and_raw = || -> anyhow::Result<(u64, u64)> {
        let rolled = ch
            .query(
                "SELECT countMerge(count_state) FROM guardian.rollup_1m \
                 WHERE metric = 'cpu_busy_percent'",
            )?
            .trim()
            .parse()?;
        Ok((rolled, count(&ch, "host_samples")?))
    };

    // Batches 1 and 2 land without their rollup; the same chunk again repairs the bucket.
    view("DETACH")?;
    store
        .insert(&chunk(1..=2), &mut store.high_water().await?)
        .await?;
    view("ATTACH")?;
    assert_eq!(rolled_and_raw()?, (0, 2));
    let stats = store
        .insert(&chunk(1..=2), &mut store.high_water().await?)
        .await?;
    assert_eq!((stats.rollup_buckets_repaired, stats.rows), (1, 0));
    assert_eq!(rolled_and_raw()?, (2, 2));
    // Once: a second retry finds the bucket whole.
    let stats = store
        .insert(&chunk(1..=2), &mut store.high_water().await?)
        .await?;
    assert_eq!(stats.rollup_buckets_repaired, 0);
    assert_eq!(rolled_and_raw()?, (2, 2));

    // A chunk that grows between two attempts that both lose the view: 3-4 land without
    // their rollup, the retry with 5 repairs them and then 5 lands without its rollup too.
    view("DETACH")?;
    store
        .insert(&chunk(3..=4), &mut store.high_water().await?)
        .await?;
    let stats = store
        .insert(&chunk(3..=5), &mut store.high_water().await?)
        .await?;
    assert_eq!((stats.rollup_buckets_repaired, stats.rows), (1, 1));
    view("ATTACH")?;
    assert_eq!(rolled_and_raw()?, (4, 5));
    // Now the bucket is short by 1 of the chunk's 3 landed rows: not guessed at.
    let stats = store
        .insert(&chunk(3..=6), &mut store.high_water().await?)
        .await?;
    assert_eq!((stats.rollup_buckets_repaired, stats.rows), (0, 1));
    assert_eq!(rolled_and_raw()?, (5, 6));
    Ok(())
}

#[tokio::test]
async fn history_from_raw_rows_and_from_rollups_agree() -> TestResult {
    let ch = ClickHouse::start()?;
    let store = ClickHouseStore::open(&lz4_settings(&ch)).await?;
    // Three whole minutes inside one hour, an hour ago: 6 samples a minute, 10 s apart.
    let hour = (now_ms() / 3_600_000 - 1) * 3_600_000;
    let mut chunk = Vec::new();
    for i in 0..18u64 {
        let t = hour + i64::try_from(i)? * 10_000;
        chunk.push(batch(
            i + 1,
            "n1",
            i + 1,
            vec![(t, host((i * 7 % 11) as f64)), (t, gpu(i as f64))],
        ));
        // Another node's rows must not leak into n1's history.
        chunk.push(batch(100 + i, "n2", i + 1, vec![(t, host(99.0))]));
    }
    chunk.sort_by_key(|b| b.outbox_id);
    let mut high = store.high_water().await?;
    // Two inserts, so the rollups hold several partial states per bucket.
    store.insert(&chunk[..15], &mut high).await?;
    store.insert(&chunk[15..], &mut high).await?;

    for name in ["cpu_busy_percent", "utilisation_gpu_percent"] {
        let def = metric(name).ok_or_else(|| anyhow::anyhow!("{name} not in catalogue"))?;
        let (from, to) = (hour, hour + 180_000);
        let raw = store.history("n1", def, from, to, 60, "raw").await?;
        let rollup = store.history("n1", def, from, to, 60, "rollup_1m").await?;
        assert_eq!(raw.len(), 3, "{name}: {raw:?}");
        assert_eq!(raw.len(), rollup.len(), "{name}");
        let per_bucket = if name == "utilisation_gpu_percent" {
            12
        } else {
            6
        };
        for (r, m) in raw.iter().zip(&rollup) {
            assert_eq!(r.start_unix_ms, m.start_unix_ms);
            assert_eq!((r.count, m.count), (per_bucket, per_bucket));
            assert!((r.avg - m.avg).abs() < 1e-9, "{name}: {r:?} vs {m:?}");
            assert_eq!((r.min, r.max), (m.min, m.max));
        }
        assert_eq!(raw[0].start_unix_ms, hour);
        let hourly = store
            .history("n1", def, from, hour + 3_600_000, 3600, "rollup_1h")
            .await?;
        let raw_hourly = store
            .history("n1", def, from, hour + 3_600_000, 3600, "raw")
            .await?;
        assert_eq!(hourly.len(), 1);
        assert_eq!(hourly[0].count, per_bucket * 3);
        assert!((hourly[0].avg - raw_hourly[0].avg).abs() < 1e-9);
    }
    let cpu = metric("cpu_busy_percent").ok_or_else(|| anyhow::anyhow!("catalogue"))?;
    let err = store
        .history("n1", cpu, hour, hour + 1, 60, "rollup_5m")
        .await
        .expect_err("unknown source");
    assert_eq!(err.kind(), "request");
    Ok(())
}

#[tokio::test]
async fn expired_partitions_are_dropped_and_recent_ones_kept() -> TestResult {
    let ch = ClickHouse::start()?;
    let settings = ClickHouseSettings {
        rollup_1m_retention_days: 45,
        ..settings(&ch)
    };
    let store = ClickHouseStore::open(&settings).await?;
    let now = now_ms();
    let old = now - 60 * 86_400_000;
    let chunk = vec![
        batch(1, "n1", 1, vec![(old, host(1.0)), (old, chain(10))]),
        batch(2, "n1", 2, vec![(now, host(2.0)), (now, chain(20))]),
    ];
    let mut high = store.high_water().await?;
    store.insert(&chunk, &mut high).await?;
    let old_day = ch.query(&format!("SELECT toYYYYMMDD(toDateTime({}))", old / 1000))?;
    let old_month = ch.query(&format!("SELECT toYYYYMM(toDateTime({}))", old / 1000))?;

    let dropped = store.drop_expired(now).await?;
    assert!(
        dropped.contains(&format!("host_samples:{}", old_day.trim())),
        "{dropped:?}"
    );
    assert!(
        dropped.contains(&format!("chain_samples:{}", old_day.trim())),
        "{dropped:?}"
    );
    assert!(
        dropped.contains(&format!("rollup_1m:{}", old_month.trim())),
        "{dropped:?}"
    );
    assert!(
        !dropped.iter().any(|d| d.starts_with("rollup_1h:")),
        "730 days not reached: {dropped:?}"
    );
    assert_eq!(count(&ch, "host_samples")?, 1);
    assert_eq!(
        ch.query("SELECT toInt64(max(ts_ms)) FROM guardian.host_samples")?
            .trim(),
        now.to_string()
    );
    // Nothing left to drop.
    assert_eq!(store.drop_expired(now).await?, Vec::<String>::new());
    Ok(())
}

#[tokio::test]
async fn recent_rows_come_back_by_node_then_time() -> TestResult {
    let ch = ClickHouse::start()?;
    let store = ClickHouseStore::open(&settings(&ch)).await?;
    let t0 = now_ms();
    let mut chunk = Vec::new();
    let mut id = 0;
    for (i, offset) in [120_000, 60_000, 0].into_iter().enumerate() {
        for node in ["n2", "n1"] {
            id += 1;
            let cpu = f64::from(u32::try_from(i)?) + if node == "n1" { 0.5 } else { 0.25 };
            chunk.push(batch(
                id,
                node,
                id,
                vec![(t0 - offset, host(cpu)), (t0 - offset, chain(500 + id))],
            ));
        }
    }
    let mut high = store.high_water().await?;
    store.insert(&chunk, &mut high).await?;

    let hosts = store.recent_host(t0 - 60_000).await?;
    let order: Vec<(&str, i64)> = hosts.iter().map(|(n, at, _)| (n.as_str(), *at)).collect();
    assert_eq!(
        order,
        [
            ("n1", t0 - 60_000),
            ("n1", t0),
            ("n2", t0 - 60_000),
            ("n2", t0)
        ]
    );
    let sample::Kind::Host(expected) = host(2.5) else {
        anyhow::bail!("not a host sample")
    };
    assert_eq!(hosts[1].2, HostValues::of(&expected));

    let chains = store.recent_chain(t0).await?;
    assert_eq!(chains.len(), 2);
    let sample::Kind::Chain(expected) = chain(506) else {
        anyhow::bail!("not a chain sample")
    };
    assert_eq!(chains[0].0, "n1");
    assert_eq!(chains[0].2, ChainValues::of(&expected));
    Ok(())
}

/// The cluster DDL cannot run here (no ZooKeeper), but 18.16 must parse every statement:
/// the server then stops at the unknown cluster (code 170), never at a syntax error (62).
#[tokio::test]
async fn cluster_mode_ddl_parses_on_this_server() -> TestResult {
    let ch = ClickHouse::start()?;
    let settings = ClickHouseSettings {
        cluster: "fleet".into(),
        ..settings(&ch)
    };
    for m in migrations(&settings, false) {
        for statement in m.statements {
            let err = ch
                .query(&statement)
                .expect_err("no cluster named fleet here");
            let text = err.to_string();
            assert!(
                text.contains("Code: 170") && text.contains("fleet"),
                "{statement}\n{text}"
            );
        }
    }
    Ok(())
}

#[tokio::test]
async fn a_full_chunk_of_50_000_rows_lands_in_one_call() -> TestResult {
    let ch = ClickHouse::start()?;
    let store = ClickHouseStore::open(&settings(&ch)).await?;
    let at = now_ms() - 3_600_000;
    // 50 000 host rows: 500 batches of 100 samples from 50 nodes.
    let chunk: Vec<OutboxBatch> = (1..=500u64)
        .map(|id| {
            let node = format!("node-{:02}", id % 50);
            let samples = (0..100i64)
                .map(|i| (at + i * 1000, host((id % 100) as f64)))
                .collect();
            batch(id, &node, id, samples)
        })
        .collect();
    let mut high = store.high_water().await?;
    let started = Instant::now();
    let stats = store.insert(&chunk, &mut high).await?;
    let took = started.elapsed();
    assert_eq!(stats.rows, 50_000);
    assert_eq!(count(&ch, "host_samples")?, 50_000);
    eprintln!(
        "inserted {} host rows (+ rollup views) in {took:?}: {:.0} rows/s",
        stats.rows,
        stats.rows as f64 / took.as_secs_f64()
    );
    Ok(())
}

/// A host sample whose 17 stored values all differ (a swapped column would show).
fn full_host(i: u32) -> sample::Kind {
    let f = f64::from(i);
    let pressure = |base: f64| {
        Some(Pressure {
            some_avg10_percent: base + 0.5,
            full_avg10_percent: base + 0.25,
            ..Default::default()
        })
    };
    sample::Kind::Host(HostSample {
        cpu_busy_percent: 10.5 + f,
        cpu_iowait_percent: 2.25,
        mem_total_bytes: (64 << 30) + u64::from(i),
        mem_available_bytes: 20 << 30,
        load_avg_1m: 3.75,
        cpu_pressure: pressure(1.0),
        memory_pressure: pressure(2.0),
        io_pressure: pressure(3.0),
        chain_data: Some(Filesystem {
            path: "/var/lib/subtensor".into(),
            available_bytes: 1_600_000_000_000,
            used_percent: 58.125,
            ..Default::default()
        }),
        disks: vec![DiskIo {
            device: "nvme0n1".into(),
            read_latency_ms: 0.375,
            write_latency_ms: 0.875,
            utilisation_percent: 45.5,
            ..Default::default()
        }],
        networks: vec![NetIo {
            interface: "eth0".into(),
            rx_bytes_per_second: 4e7,
            tx_bytes_per_second: 2.5e7,
            rx_errors_total: 3,
            tx_errors_total: 4,
            ..Default::default()
        }],
        oom_kills_total: 6,
        ..Default::default()
    })
}

/// The sink hands ClickHouse its in-memory outbox blobs, whose host samples go to RowBinary
/// straight from the blob's words; batches read back from the outbox table come decoded.
/// Both must store the same rows, every column of every table.
#[tokio::test]
async fn outbox_blobs_and_decoded_batches_store_identical_rows() -> TestResult {
    let ch = ClickHouse::start()?;
    let store = ClickHouseStore::open(&lz4_settings(&ch)).await?;
    let at = now_ms() - 60_000;
    let chunk = |node: &str, first_id: u64| -> Vec<OutboxBatch> {
        (0..3u64)
            .map(|i| {
                let t = at + i64::try_from(i).unwrap_or(0) * 1000;
                let mut b = mixed_chunk(first_id + i..=first_id + i, at).remove(0);
                b.node_id = node.into();
                b.received_at_unix_ms = t + 500;
                b.batch = std::sync::Arc::new(Batch::from(&SampleBatch {
                    seq: 100 + i,
                    spool_dropped_batches_total: 0,
                    samples: [
                        full_host(u32::try_from(i).unwrap_or(0)),
                        chain(1000 + i),
                        full_host(7),
                        gpu(50.0),
                        keystore(),
                        unavailable(),
                    ]
                    .into_iter()
                    .map(|kind| Sample {
                        observed_at_unix_ms: t,
                        kind: Some(kind),
                    })
                    .collect(),
                }));
                b
            })
            .collect()
    };
    let decoded = chunk("decoded", 1);
    let blobs: Vec<OutboxBlob> = chunk("blob", 4)
        .iter()
        .map(|b| OutboxBlob {
            outbox_id: b.outbox_id,
            node_id: b.node_id.clone(),
            network: b.network.clone(),
            received_at_unix_ms: b.received_at_unix_ms,
            samples: b.batch.samples.len(),
            blob: blob::encode(&b.batch),
        })
        .collect();
    let mut high = store.high_water().await?;
    let stats = store.insert(&decoded, &mut high).await?;
    assert_eq!((stats.batches, stats.rows), (3, 21));
    let stats = store.insert(&blobs, &mut high).await?;
    assert_eq!((stats.batches, stats.rows), (3, 21));
    // The same chunk again stores nothing (the high-water marks hold for both paths).
    let stats = store.insert(&blobs, &mut high).await?;
    assert_eq!((stats.batches, stats.rows, stats.skipped_rows), (0, 0, 21));

    for (table, rows) in RAW_TABLES.iter().zip([6, 3, 6, 3, 3]) {
        let columns = ch.query(&format!(
            "SELECT name FROM system.columns WHERE database = 'guardian' AND table = '{table}' \
             AND name NOT IN ('node_id', 'outbox_id')"
        ))?;
        let columns: Vec<&str> = columns.lines().collect();
        assert!(columns.len() > 6, "{table}: {columns:?}");
        let select = |node: &str| {
            ch.query(&format!(
                "SELECT {} FROM guardian.{table} WHERE node_id = '{node}' ORDER BY seq, idx",
                columns.join(", ")
            ))
        };
        let (via_decoded, via_blob) = (select("decoded")?, select("blob")?);
        assert_eq!(via_blob.lines().count(), rows, "{table}:\n{via_blob}");
        assert_eq!(via_blob, via_decoded, "{table}");
    }
    // And the values are the sample's, column by column.
    let hosts = store.recent_host(at - 1).await?;
    let blob_hosts: Vec<&HostValues> = hosts
        .iter()
        .filter(|(node, _, _)| node == "blob")
        .map(|(_, _, values)| values)
        .collect();
    let sample::Kind::Host(expected) = full_host(7) else {
        anyhow::bail!("not a host sample")
    };
    let expected = HostValues::of(&expected);
    assert_eq!(expected.net_errors_total, 7);
    assert!(blob_hosts.contains(&&expected), "{blob_hosts:?}");
    Ok(())
}
