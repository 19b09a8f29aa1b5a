//! Pruning of the `(node, seq)` idempotency records, on SQLite and on a real PostgreSQL:
//! records at or below a node's floor are deleted, the floor survives a restart, and a
//! replay at or below it is still acked without being stored again.

use std::time::Duration;

use guardian_proto::v1::NodeDescriptor;
use guardian_server::identity::NodeId;
use guardian_server::store::commit::{Job, Telemetry};
use guardian_server::store::{Commit, Ledger, records};
use guardian_tests::Postgres;
use tokio_util::sync::CancellationToken;

type TestResult = anyhow::Result<()>;

/// Commits `(node, seq)` jobs as one group; returns per job whether it was stored, and how
/// many batches went to the outbox.
async fn commit(ledger: &Ledger, jobs: &[(&str, u64)]) -> anyhow::Result<(Vec<bool>, usize)> {
    let jobs: Vec<Job> = jobs
        .iter()
        .map(|(node, seq)| guardian_tests::unavailable_job(node, *seq))
        .collect::<anyhow::Result<_>>()?;
    let group = ledger.commit_group(&jobs, Telemetry::Outbox, 5_000).await?;
    let stored = group
        .commits
        .iter()
        .map(|c| matches!(c, Commit::Stored { .. }))
        .collect();
    Ok((stored, group.outbox.len()))
}

async fn records_of(ledger: &Ledger, node: &str) -> anyhow::Result<i64> {
    Ok(ledger.counts(&NodeId::parse(node)?).await?.0)
}

async fn pruned_records_stay_replays(url: &str) -> TestResult {
    let ledger = Ledger::open(url).await?;
    for node in ["n1", "n2", "n3"] {
        ledger
            .record_hello(&NodeId::parse(node)?, &NodeDescriptor::default(), "t", 1)
            .await?;
    }
    let first: Vec<(&str, u64)> = (1..=5)
        .map(|seq| ("n1", seq))
        .chain((1..=3).map(|seq| ("n2", seq)))
        .collect();
    assert_eq!(commit(&ledger, &first).await?, (vec![true; 8], 8));
    let seqs = ledger.stored_seqs().await?;
    assert_eq!((seqs["n1"], seqs["n2"]), (5, 3));

    let stop = CancellationToken::new();
    // A seq above last_stored_seq is clamped to it: n2's floor rises to 3, not 9.
    assert_eq!(
        ledger
            .prune_batch_records(&[("n1".into(), 4), ("n2".into(), 9)], &stop)
            .await?,
        4 + 3
    );
    assert_eq!(records_of(&ledger, "n1").await?, 1);
    assert_eq!(records_of(&ledger, "n2").await?, 0);
    assert_eq!((ledger.batch_floor("n1"), ledger.batch_floor("n2")), (4, 3));

    // Replays at or below the floor, above it (record kept), of the other node, a new
    // batch, and the same new batch twice in one group.
    let (stored, outboxed) = commit(
        &ledger,
        &[
            ("n1", 2),
            ("n1", 4),
            ("n1", 5),
            ("n2", 3),
            ("n1", 6),
            ("n2", 4),
            ("n2", 4),
        ],
    )
    .await?;
    assert_eq!(stored, [false, false, false, false, true, true, false]);
    assert_eq!(outboxed, 2);
    // Only the ones at or below the floor say so; the others are ordinary replays.
    let jobs: Vec<Job> = [("n1", 4), ("n1", 5), ("n2", 3), ("n2", 4)]
        .iter()
        .map(|(node, seq)| guardian_tests::unavailable_job(node, *seq))
        .collect::<anyhow::Result<_>>()?;
    let again = ledger.commit_group(&jobs, Telemetry::Outbox, 6_000).await?;
    assert_eq!(
        again.commits,
        [
            Commit::BelowFloor,
            Commit::Duplicate,
            Commit::BelowFloor,
            Commit::Duplicate
        ]
    );

    // A lower seq never lowers the floor.
    assert_eq!(
        ledger
            .prune_batch_records(&[("n1".into(), 2)], &stop)
            .await?,
        0
    );
    assert_eq!(ledger.batch_floor("n1"), 4);
    drop(ledger);

    // After a restart the floor is read back and still turns old replays away.
    let ledger = Ledger::open(url).await?;
    assert_eq!((ledger.batch_floor("n1"), ledger.batch_floor("n2")), (4, 3));
    assert_eq!(
        commit(&ledger, &[("n1", 3), ("n1", 7)]).await?,
        (vec![false, true], 1)
    );

    // A first round meeting a long history deletes it in bounded steps.
    let long: Vec<(&str, u64)> = (1..=25_000).map(|seq| ("n3", seq)).collect();
    for group in long.chunks(5_000) {
        commit(&ledger, group).await?;
    }
    assert_eq!(
        ledger
            .prune_batch_records(&[("n3".into(), 24_999)], &stop)
            .await?,
        24_999
    );
    assert_eq!(records_of(&ledger, "n3").await?, 1);

    // The pruner raises each floor to the last_stored_seq it read one round earlier.
    let shutdown = CancellationToken::new();
    let pruner = tokio::spawn(records::run_pruner(
        ledger.clone(),
        Duration::from_millis(100),
        shutdown.clone(),
    ));
    let mut waited = 0;
    // A round raises the floors in memory first and deletes the records after: wait for
    // both before stopping it (stopping mid-round leaves records for the next one).
    while (ledger.batch_floor("n1"), ledger.batch_floor("n2")) != (7, 4)
        || ledger.batch_floor("n3") != 25_000
        || records_of(&ledger, "n1").await?
            + records_of(&ledger, "n2").await?
            + records_of(&ledger, "n3").await?
            != 0
    {
        assert!(
            waited < 100,
            "the pruner did not raise the floors and delete the records within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += 1;
    }
    shutdown.cancel();
    pruner.await?;
    assert_eq!(records_of(&ledger, "n1").await?, 0);
    assert_eq!(records_of(&ledger, "n2").await?, 0);
    assert_eq!(records_of(&ledger, "n3").await?, 0);
    assert_eq!(
        commit(&ledger, &[("n1", 7), ("n2", 1), ("n1", 8)]).await?,
        (vec![false, false, true], 1)
    );
    Ok(())
}

#[tokio::test]
async fn pruned_records_stay_replays_on_sqlite() -> TestResult {
    let dir = tempfile::tempdir()?;
    pruned_records_stay_replays(&format!("sqlite://{}/g.db", dir.path().display())).await
}

#[tokio::test]
async fn pruned_records_stay_replays_on_postgresql() -> TestResult {
    let postgres = Postgres::start()?;
    pruned_records_stay_replays(&postgres.url()).await
}
