//! Retention of the embedded store, on SQLite and on a real PostgreSQL: sample rows observed
//! before the cutoff go from every sample table, node by node, across several delete
//! windows; newer rows and other nodes' rows stay; the scheduled task does it by itself.

use std::sync::Arc;
use std::time::Duration;

use guardian_proto::v1::{
    ChainSample, GpuDevice, GpuSample, HostSample, KeystoreSample, NodeDescriptor, Sample,
    SampleBatch, SamplerUnavailable, sample,
};
use guardian_server::batch::Batch;
use guardian_server::identity::NodeId;
use guardian_server::store::commit::{Job, Telemetry};
use guardian_server::store::{Ledger, retention};
use guardian_tests::Postgres;
use tokio_util::sync::CancellationToken;

type TestResult = anyhow::Result<()>;

const DAY_MS: i64 = 86_400_000;
const HOUR_MS: i64 = 3_600_000;

/// A batch with one sample of every kind, all observed at `at_unix_ms`.
fn job(node: &str, seq: u64, at_unix_ms: i64) -> anyhow::Result<Job> {
    let kinds = [
        sample::Kind::Host(HostSample {
            cpu_count: 8,
            ..HostSample::default()
        }),
        sample::Kind::Chain(ChainSample {
            best_block: seq,
            ..ChainSample::default()
        }),
        sample::Kind::Gpu(GpuSample {
            available: true,
            devices: vec![GpuDevice::default()],
            ..GpuSample::default()
        }),
        sample::Kind::Keystore(KeystoreSample::default()),
        sample::Kind::Unavailable(SamplerUnavailable {
            sampler: "gpu".into(),
            reason: "test".into(),
        }),
    ];
    let batch = SampleBatch {
        seq,
        spool_dropped_batches_total: 0,
        samples: kinds
            .into_iter()
            .map(|kind| Sample {
                observed_at_unix_ms: at_unix_ms,
                kind: Some(kind),
            })
            .collect(),
    };
    Ok(Job {
        node: NodeId::parse(node)?,
        network: "finney".into(),
        batch: Arc::new(Batch::from(&batch)),
    })
}

async fn expiry(url: &str) -> TestResult {
    let ledger = Ledger::open(url).await?;
    for node in ["n1", "n2"] {
        ledger
            .record_hello(&NodeId::parse(node)?, &NodeDescriptor::default(), "t", 1)
            .await?;
    }
    let now = guardian_server::unix_ms();
    let cutoff = now - 30 * DAY_MS;
    // n1: old batches spread over ~5 hours 40 days ago (several delete windows), one just
    // before the cutoff, one just after it, and two recent ones; n2: the same newer ones.
    let old = [
        now - 40 * DAY_MS,
        now - 40 * DAY_MS + 2 * HOUR_MS,
        now - 40 * DAY_MS + 5 * HOUR_MS,
        cutoff - 1,
    ];
    let newer = [cutoff, now - DAY_MS, now];
    let mut jobs = Vec::new();
    for (seq, at) in old.iter().chain(&newer).enumerate() {
        jobs.push(job("n1", seq as u64 + 1, *at)?);
    }
    for (seq, at) in newer.iter().enumerate() {
        jobs.push(job("n2", seq as u64 + 1, *at)?);
    }
    ledger.commit_group(&jobs, Telemetry::Embedded, now).await?;
    let before = ledger.sample_rows("n1").await?;
    let kept = ledger.sample_rows("n2").await?;
    // Each batch leaves the same rows per table; n2 has 3 batches.
    assert!(
        kept.iter().all(|rows| *rows > 0 && rows % 3 == 0),
        "every table holds rows of every batch: {kept:?}"
    );
    let one_batch = kept.map(|rows| rows / 3);
    assert!(before.iter().zip(&kept).all(|(n1, n2)| n1 > n2));

    // A cancelled round deletes nothing.
    let cancelled = CancellationToken::new();
    cancelled.cancel();
    assert_eq!(ledger.expire_samples(cutoff, &cancelled).await?, 0);
    assert_eq!(ledger.sample_rows("n1").await?, before);

    let stop = CancellationToken::new();
    let deleted = ledger.expire_samples(cutoff, &stop).await?;
    assert_eq!(
        deleted,
        before
            .iter()
            .zip(&kept)
            .map(|(n1, n2)| (n1 - n2) as u64)
            .sum::<u64>()
    );
    assert_eq!(ledger.sample_rows("n1").await?, kept);
    assert_eq!(ledger.sample_rows("n2").await?, kept);
    // Nothing left to do the second time.
    assert_eq!(ledger.expire_samples(cutoff, &stop).await?, 0);

    // The scheduled task: a retention of 1 day takes the two older of the three left.
    let metrics = prometheus_client::metrics::counter::Counter::<u64>::default();
    let task = tokio::spawn(retention::run_expiry(
        ledger.clone(),
        1,
        Duration::from_millis(50),
        metrics.clone(),
        stop.clone(),
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = [
            ledger.sample_rows("n1").await?,
            ledger.sample_rows("n2").await?,
        ];
        if left == [one_batch; 2] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the task did not expire the rows: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    task.await?;
    // Two batches of each node went.
    assert_eq!(metrics.get(), 2 * 2 * one_batch.iter().sum::<i64>() as u64);
    Ok(())
}

#[tokio::test]
async fn old_samples_expire_on_sqlite() -> TestResult {
    let dir = tempfile::tempdir()?;
    expiry(&format!("sqlite://{}/g.db", dir.path().display())).await
}

#[tokio::test]
async fn old_samples_expire_on_postgresql() -> TestResult {
    let postgres = Postgres::start()?;
    expiry(&postgres.url()).await
}
