//! Owns the Hello writes: Hellos of new or changed nodes wait in a queue and one task writes
//! all that wait at the time in one transaction ([`Ledger::record_hello`] hands them over).

use std::collections::HashMap;

use sqlx::Row;
use tokio::sync::oneshot;

use super::insert::{Value, insert_query, statements};
use super::{Ledger, StoreError};

/// Hellos of new or changed nodes waiting for their write, and whether a task drains them.
#[derive(Debug, Default)]
pub struct HelloQueue {
    pub(super) waiting: Vec<HelloJob>,
    pub(super) draining: bool,
}

/// One Hello waiting for its write.
#[derive(Debug)]
pub(super) struct HelloJob {
    pub(super) node: String,
    pub(super) hostname: String,
    pub(super) agent_version: String,
    pub(super) network: String,
    pub(super) now_unix_ms: i64,
    pub(super) done: oneshot::Sender<Result<u64, StoreError>>,
}

/// Clears the drain flag and fails what still waits if the drain task ends without doing so
/// (a panic): later Hellos then start a new task instead of waiting for none.
struct DrainGuard<'a> {
    queue: &'a std::sync::Mutex<HelloQueue>,
    done: bool,
}

impl Drop for DrainGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            let mut queue = self
                .queue
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            queue.draining = false;
            // Dropping their senders answers the waiters with an error.
            queue.waiting.clear();
        }
    }
}

impl Ledger {
    /// Writes the waiting Hellos, all of them in one transaction, until none wait. If that
    /// transaction fails, each Hello is written alone, so one bad Hello fails only itself.
    pub(super) async fn drain_hellos(&self) {
        let mut guard = DrainGuard {
            queue: &self.hellos,
            done: false,
        };
        loop {
            let jobs = {
                let mut queue = self
                    .hellos
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if queue.waiting.is_empty() {
                    queue.draining = false;
                    guard.done = true;
                    return;
                }
                std::mem::take(&mut queue.waiting)
            };
            let written = self.write_hellos(&jobs).await;
            let answers: Vec<Result<u64, StoreError>> = match written {
                Ok(seqs) => jobs
                    .iter()
                    .map(|job| {
                        seqs.get(&job.node).copied().ok_or_else(|| {
                            StoreError::Shared(format!(
                                "the Hello upsert of node {} returned no row",
                                job.node
                            ))
                        })
                    })
                    .collect(),
                Err(error) if jobs.len() == 1 => vec![Err(error)],
                Err(_) => {
                    let mut answers = Vec::with_capacity(jobs.len());
                    for job in &jobs {
                        let alone = self.write_hellos(std::slice::from_ref(job)).await;
                        answers.push(alone.and_then(|seqs| {
                            seqs.get(&job.node).copied().ok_or_else(|| {
                                StoreError::Shared(format!(
                                    "the Hello upsert of node {} returned no row",
                                    job.node
                                ))
                            })
                        }));
                    }
                    answers
                }
            };
            for (job, answer) in jobs.into_iter().zip(answers) {
                // A caller that went away no longer needs its answer.
                let _ = job.done.send(answer);
            }
        }
    }

    /// One transaction upserting every node of `jobs` (a node's newest Hello wins); returns
    /// each node's `last_stored_seq`.
    async fn write_hellos(&self, jobs: &[HelloJob]) -> Result<HashMap<String, u64>, StoreError> {
        const COLUMNS: [&str; 6] = [
            "node_id",
            "hostname",
            "agent_version",
            "network",
            "first_seen_unix_ms",
            "last_seen_unix_ms",
        ];
        // One row per node (a statement may not upsert the same row twice), in node order
        // (PostgreSQL row locks taken in one order by every writer of many nodes).
        let mut newest: std::collections::BTreeMap<&str, &HelloJob> =
            std::collections::BTreeMap::new();
        for job in jobs {
            newest.insert(job.node.as_str(), job);
        }
        let rows: Vec<Vec<Value>> = newest
            .values()
            .map(|job| {
                vec![
                    Value::T(job.node.clone()),
                    Value::T(job.hostname.clone()),
                    Value::T(job.agent_version.clone()),
                    Value::T(job.network.clone()),
                    Value::I(job.now_unix_ms),
                    Value::I(job.now_unix_ms),
                ]
            })
            .collect();
        let _turn = self.write_turn().await;
        let mut tx = self.pool.begin().await?;
        let mut seqs = HashMap::with_capacity(rows.len());
        for chunk in statements(rows, COLUMNS.len()) {
            let query = insert_query(
                self.backend,
                "nodes",
                &COLUMNS,
                chunk,
                " ON CONFLICT (node_id) DO UPDATE SET hostname = excluded.hostname,
                     agent_version = excluded.agent_version, network = excluded.network,
                     last_seen_unix_ms = excluded.last_seen_unix_ms
                 RETURNING node_id, last_stored_seq",
            );
            for row in query.fetch_all(&mut *tx).await? {
                let node: String = row.try_get(0)?;
                let seq: i64 = row.try_get(1)?;
                seqs.insert(node, u64::try_from(seq).unwrap_or(0));
            }
        }
        tx.commit().await?;
        Ok(seqs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(
        node: &str,
        hostname: &str,
        at: i64,
    ) -> (HelloJob, oneshot::Receiver<Result<u64, StoreError>>) {
        let (done, answer) = oneshot::channel();
        let job = HelloJob {
            node: node.into(),
            hostname: hostname.into(),
            agent_version: "1.0".into(),
            network: "finney".into(),
            now_unix_ms: at,
            done,
        };
        (job, answer)
    }

    #[tokio::test]
    async fn one_write_takes_many_hellos_and_the_newest_of_a_repeated_node_wins()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let ledger = Ledger::open(&format!("sqlite://{}/l.db", dir.path().display())).await?;
        // More rows than one statement holds (6 values a row), one node three times.
        let mut jobs = Vec::new();
        let mut answers = Vec::new();
        for i in 0..800 {
            let (job, answer) = hello(&format!("n{i:03}"), "h", 1);
            jobs.push(job);
            answers.push(answer);
        }
        for (at, host) in [(2, "second"), (3, "third")] {
            let (job, answer) = hello("n005", host, at);
            jobs.push(job);
            answers.push(answer);
        }
        let seqs = ledger.write_hellos(&jobs).await?;
        assert_eq!(seqs.len(), 800);
        assert!(seqs.values().all(|seq| *seq == 0));
        let nodes = ledger.nodes().await?;
        assert_eq!(nodes.len(), 800);
        let n5 = nodes.iter().find(|n| n.node_id == "n005").ok_or("n005")?;
        assert_eq!((n5.hostname.as_str(), n5.last_seen_unix_ms), ("third", 3));

        // Through the queue: every waiter gets its answer, and the flag is cleared after.
        ledger
            .hellos
            .lock()
            .map_err(|_| "poisoned")?
            .waiting
            .extend(jobs);
        ledger.hellos.lock().map_err(|_| "poisoned")?.draining = true;
        ledger.drain_hellos().await;
        for answer in answers {
            assert_eq!(answer.await??, 0);
        }
        let queue = ledger.hellos.lock().map_err(|_| "poisoned")?;
        assert!(!queue.draining && queue.waiting.is_empty());
        Ok(())
    }
}
