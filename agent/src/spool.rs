//! Batches waiting for the server's ack, numbered once and kept until acked.
//!
//! # Guarantees
//! - A batch is removed only by an ack that covers it, or by an explicit, counted drop of
//!   the oldest batch when the spool is full.
//! - A batch's sequence number never changes once the server's numbering base is known,
//!   so a resend after a reconnect is recognised by the server as the same `(node, seq)`.
//!
//! This spool lives in memory: batches survive reconnects but not an agent restart.
//! (The on-disk spool is the Lossless-telemetry work.)

use std::collections::VecDeque;

use guardian_proto::v1::{Sample, SampleBatch};

/// A bounded queue of numbered batches.
#[derive(Debug)]
pub struct Spool {
    pending: VecDeque<(u64, Vec<Sample>)>,
    /// Local number of the next batch (1-based, per process).
    next_local: u64,
    /// Server's last stored seq when this process first connected; seq = base + local.
    base: Option<u64>,
    capacity: usize,
    dropped_batches: u64,
    last_acked_seq: u64,
}

impl Spool {
    /// An empty spool holding at most `capacity` batches.
    pub fn new(capacity: usize) -> Self {
        Self {
            pending: VecDeque::new(),
            next_local: 1,
            base: None,
            capacity: capacity.max(1),
            dropped_batches: 0,
            last_acked_seq: 0,
        }
    }

    /// Queues a batch; when full, drops the oldest and returns how many were dropped in all.
    pub fn push(&mut self, samples: Vec<Sample>) -> Option<u64> {
        let mut dropped = None;
        if self.pending.len() >= self.capacity {
            self.pending.pop_front();
            self.dropped_batches += 1;
            dropped = Some(self.dropped_batches);
        }
        self.pending.push_back((self.next_local, samples));
        self.next_local += 1;
        dropped
    }

    /// Fixes the numbering base from the first Welcome of this process; later calls keep it.
    pub fn set_base(&mut self, last_stored_seq: u64) {
        self.base.get_or_insert(last_stored_seq);
    }

    /// Whether batches can be numbered yet.
    pub fn has_base(&self) -> bool {
        self.base.is_some()
    }

    /// Batches after `after_seq` (exclusive), oldest first, at most `limit`, numbered.
    /// Empty until the base is known.
    pub fn batches_after(&self, after_seq: u64, limit: usize) -> Vec<SampleBatch> {
        let Some(base) = self.base else {
            return Vec::new();
        };
        self.pending
            .iter()
            .filter(|(local, _)| base + local > after_seq)
            .take(limit)
            .map(|(local, samples)| SampleBatch {
                spool_dropped_batches_total: 0,
                seq: base + local,
                samples: samples.clone(),
            })
            .collect()
    }

    /// Applies an ack: forgets every batch with seq <= `through_seq`. Returns how many.
    pub fn ack(&mut self, through_seq: u64) -> usize {
        let Some(base) = self.base else { return 0 };
        let before = self.pending.len();
        while self
            .pending
            .front()
            .is_some_and(|(local, _)| base + local <= through_seq)
        {
            self.pending.pop_front();
        }
        self.last_acked_seq = self.last_acked_seq.max(through_seq);
        before - self.pending.len()
    }

    /// Highest seq acked so far (0 if none).
    pub fn last_acked_seq(&self) -> u64 {
        self.last_acked_seq
    }

    /// Batches waiting.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Batches dropped because the spool was full, since start.
    pub fn dropped_batches(&self) -> u64 {
        self.dropped_batches
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_keep_their_numbers_across_resends_and_leave_only_on_ack() {
        let mut spool = Spool::new(10);
        spool.push(vec![]);
        spool.push(vec![]);
        assert!(
            spool.batches_after(0, 10).is_empty(),
            "no numbering before Welcome"
        );
        spool.set_base(40);
        spool.set_base(99);
        let seqs: Vec<u64> = spool.batches_after(0, 10).iter().map(|b| b.seq).collect();
        assert_eq!(seqs, vec![41, 42]);
        assert_eq!(spool.ack(41), 1);
        assert_eq!(spool.batches_after(0, 10)[0].seq, 42);
        assert_eq!(spool.batches_after(42, 10).len(), 0);
    }

    #[test]
    fn a_full_spool_drops_the_oldest_and_counts_it() {
        let mut spool = Spool::new(2);
        assert_eq!(spool.push(vec![]), None);
        assert_eq!(spool.push(vec![]), None);
        assert_eq!(spool.push(vec![]), Some(1));
        spool.set_base(0);
        let seqs: Vec<u64> = spool.batches_after(0, 10).iter().map(|b| b.seq).collect();
        assert_eq!(seqs, vec![2, 3]);
        assert_eq!(spool.dropped_batches(), 1);
    }
}
