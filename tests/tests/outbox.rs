//! The ClickHouse outbox in the ledger, on SQLite and on a real PostgreSQL: a group commit
//! reports the outbox ids its batches got, in commit order, and they are the ids (and the
//! bytes) the sink reads back from the table, across multi-statement groups.

use guardian_server::store::commit::{Job, Telemetry};
use guardian_server::store::{Commit, Ledger};
use guardian_tests::Postgres;

type TestResult = anyhow::Result<()>;

fn job(node: &str, seq: u64) -> anyhow::Result<Job> {
    guardian_tests::unavailable_job(node, seq)
}

async fn ids_follow_commit_order(ledger: &Ledger) -> TestResult {
    // Nothing committed yet: the writer's chain starts at 0.
    assert_eq!(ledger.outbox_id_ceiling().await?, Some(0));
    // Two nodes interleaved.
    let jobs: Vec<Job> = (1..=6u64)
        .map(|seq| job(if seq % 2 == 0 { "n2" } else { "n1" }, seq))
        .collect::<anyhow::Result<_>>()?;
    let group = ledger.commit_group(&jobs, Telemetry::Outbox, 5_000).await?;
    assert!(
        group
            .commits
            .iter()
            .all(|c| matches!(c, Commit::Stored { samples: 1 }))
    );
    let handed: Vec<(String, u64, u64)> = group
        .outbox
        .iter()
        .map(|b| Ok((b.node_id.clone(), b.decode()?.batch.seq, b.outbox_id)))
        .collect::<anyhow::Result<_>>()?;
    let handed: Vec<(String, u64, u64)> = handed.into_iter().collect();
    assert_eq!(handed.len(), 6);
    assert!(
        handed.windows(2).all(|w| w[0].2 < w[1].2),
        "ids ascend: {handed:?}"
    );
    let wanted: Vec<(String, u64)> = jobs
        .iter()
        .map(|j| (j.node.to_string(), j.batch.seq))
        .collect();
    let got: Vec<(String, u64)> = handed.iter().map(|(n, s, _)| (n.clone(), *s)).collect();
    assert_eq!(got, wanted, "the outbox holds the group in job order");

    // The table agrees: same ids, same batches (the ones committed), same bytes.
    let read = ledger.outbox_read(0, 100, 1_000).await?;
    assert_eq!(read.len(), 6);
    for ((handed, stored), job) in group.outbox.iter().zip(&read).zip(&jobs) {
        assert_eq!(handed.outbox_id, stored.outbox_id);
        assert_eq!(&handed.decode()?, stored);
        assert_eq!(stored.batch, job.batch);
        assert_eq!(
            handed.blob,
            guardian_server::store::outbox::blob::encode(&job.batch)
        );
    }

    // A replayed (node, seq) is a duplicate and adds nothing to the outbox.
    let again = ledger
        .commit_group(&[job("n1", 1)?], Telemetry::Outbox, 6_000)
        .await?;
    assert!(matches!(again.commits[..], [Commit::Duplicate]));
    assert!(again.outbox.is_empty());

    // A group larger than one statement (1 024 outbox rows each) keeps its order too.
    let big: Vec<Job> = (1..=1_500u64)
        .map(|seq| job("n3", seq))
        .collect::<anyhow::Result<_>>()?;
    let group = ledger.commit_group(&big, Telemetry::Outbox, 7_000).await?;
    assert_eq!(group.outbox.len(), 1_500);
    let last_small = read.last().map_or(0, |b| b.outbox_id);
    let mut previous = last_small;
    for (seq, batch) in (1..=1_500u64).zip(&group.outbox) {
        assert_eq!(batch.decode()?.batch.seq, seq);
        assert!(batch.outbox_id > previous, "ids ascend across statements");
        previous = batch.outbox_id;
    }
    let read = ledger.outbox_read(last_small, 2_000, 10_000).await?;
    let read_ids: Vec<u64> = read.iter().map(|b| b.outbox_id).collect();
    let handed_ids: Vec<u64> = group.outbox.iter().map(|b| b.outbox_id).collect();
    assert_eq!(read_ids, handed_ids);
    // The read goes page by page (256 rows) and stops at either limit, mid-page too.
    let capped = ledger.outbox_read(last_small, 2_000, 700).await?;
    assert_eq!(capped.len(), 700, "samples cap (one sample a batch)");
    assert_eq!(
        capped.iter().map(|b| b.outbox_id).collect::<Vec<_>>(),
        handed_ids[..700]
    );
    let capped = ledger.outbox_read(last_small, 300, 10_000).await?;
    assert_eq!(
        capped.iter().map(|b| b.outbox_id).collect::<Vec<_>>(),
        handed_ids[..300]
    );
    let capped = ledger.outbox_read(last_small, 512, 10_000).await?;
    assert_eq!(
        capped.iter().map(|b| b.outbox_id).collect::<Vec<_>>(),
        handed_ids[..512]
    );
    let capped = ledger.outbox_read(last_small, 2_000, 512).await?;
    assert_eq!(capped.len(), 512, "samples cap on a page boundary");
    let tail = ledger.outbox_read(handed_ids[1_199], 2_000, 10_000).await?;
    assert_eq!(
        tail.iter().map(|b| b.outbox_id).collect::<Vec<_>>(),
        handed_ids[1_200..]
    );

    // The ceiling covers every committed id, also once the sink has drained them all (the
    // writer's first hand-off after a restart links to it).
    assert_eq!(ledger.outbox_id_ceiling().await?, Some(previous));
    ledger.outbox_delete_through(previous).await?;
    assert!(ledger.outbox_read(0, 10, 10).await?.is_empty());
    assert_eq!(ledger.outbox_id_ceiling().await?, Some(previous));
    Ok(())
}

#[tokio::test]
async fn outbox_ids_follow_commit_order_on_sqlite() -> TestResult {
    let dir = tempfile::tempdir()?;
    let ledger = Ledger::open(&format!("sqlite://{}/g.db", dir.path().display())).await?;
    ids_follow_commit_order(&ledger).await
}

#[tokio::test]
async fn outbox_ids_follow_commit_order_on_postgresql() -> TestResult {
    let postgres = Postgres::start()?;
    let ledger = Ledger::open(&postgres.url()).await?;
    ids_follow_commit_order(&ledger).await
}

fn segment_files(dir: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    names.sort();
    Ok(names)
}

#[tokio::test]
async fn sqlite_outbox_blobs_live_in_segment_files_until_delivered() -> TestResult {
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}/g.db", dir.path().display());
    let folder = dir.path().join("g.db-outbox");
    let jobs = |seqs: std::ops::RangeInclusive<u64>| -> anyhow::Result<Vec<Job>> {
        seqs.map(|seq| job("n1", seq)).collect()
    };
    let ledger = Ledger::open(&url).await?;
    // An embedded-store ledger never creates the folder; the first outbox group does.
    assert!(!folder.exists());
    let first = ledger
        .commit_group(&jobs(1..=3)?, Telemetry::Outbox, 1)
        .await?;
    assert_eq!(segment_files(&folder)?, ["000000000001.seg"]);
    let first_bytes: u64 = first.outbox.iter().map(|b| b.blob.len() as u64).sum();
    assert_eq!(ledger.outbox_pending().await?, (3, first_bytes));
    drop(ledger);

    // A restart appends to a new segment; both read back, in id order, intact.
    let ledger = Ledger::open(&url).await?;
    let second = ledger
        .commit_group(&jobs(4..=5)?, Telemetry::Outbox, 2)
        .await?;
    assert_eq!(
        segment_files(&folder)?,
        ["000000000001.seg", "000000000002.seg"]
    );
    let read = ledger.outbox_read(0, 100, 1_000).await?;
    let handed: Vec<_> = first.outbox.iter().chain(&second.outbox).collect();
    assert_eq!(read.len(), 5);
    for (stored, handed) in read.iter().zip(&handed) {
        assert_eq!(stored, &handed.decode()?);
    }

    // Delivering the first segment's batches removes its file, not the current one.
    let last_of_first = first.outbox.last().map_or(0, |b| b.outbox_id);
    assert_eq!(
        ledger.outbox_delete_through(last_of_first).await?,
        (3, first_bytes)
    );
    assert_eq!(segment_files(&folder)?, ["000000000002.seg"]);
    assert_eq!(ledger.outbox_read(0, 100, 1_000).await?.len(), 2);
    let last = second.outbox.last().map_or(0, |b| b.outbox_id);
    ledger.outbox_delete_through(last).await?;
    assert_eq!(ledger.outbox_pending().await?, (0, 0));
    assert_eq!(segment_files(&folder)?, ["000000000002.seg"]);
    Ok(())
}

/// Outbox rows written before the outbox had its own encoding hold the agent's protobuf
/// bytes; after an upgrade they still drain, in id order with the new ones.
#[tokio::test]
async fn outbox_rows_in_the_agents_encoding_still_read_back() -> TestResult {
    use guardian_proto::v1::{HostSample, Sample, SampleBatch, sample};
    use prost::Message;
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}/g.db", dir.path().display());
    let ledger = Ledger::open(&url).await?;
    let legacy = SampleBatch {
        seq: 9,
        spool_dropped_batches_total: 0,
        samples: vec![Sample {
            observed_at_unix_ms: 5_000,
            kind: Some(sample::Kind::Host(HostSample {
                cpu_busy_percent: 42.5,
                mem_total_bytes: 1 << 36,
                ..Default::default()
            })),
        }],
    }
    .encode_to_vec();
    let pool = sqlx::SqlitePool::connect(&url).await?;
    sqlx::query(
        "INSERT INTO outbox (node_id, network, received_at_unix_ms, batch, segment, segment_offset, segment_len)
         VALUES ('old', 'finney', 4000, ?, 0, 0, 0)",
    )
    .bind(legacy.clone())
    .execute(&pool)
    .await?;
    pool.close().await;
    let new = ledger
        .commit_group(&[job("n1", 1)?], Telemetry::Outbox, 6_000)
        .await?;
    let read = ledger.outbox_read(0, 10, 100).await?;
    assert_eq!(read.len(), 2);
    assert_eq!(read[0].node_id, "old");
    let want = guardian_server::batch::Batch::decode(&legacy.into())?;
    assert_eq!(*read[0].batch, want);
    let Some(guardian_server::batch::Kind::Host(host)) = &read[0].batch.samples[0].kind else {
        anyhow::bail!("a host sample")
    };
    assert_eq!(host.values.cpu_busy_percent, 42.5);
    assert_eq!(read[1], new.outbox[0].decode()?);
    Ok(())
}
