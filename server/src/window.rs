//! Per-node windows: the recent past of each node's host and chain figures, in memory, for
//! the detectors' baselines. At most one point per slot (the newest sample in it) keeps a
//! 30-minute window of a 1000-node fleet sampled at 1 Hz to tens of MiB. Rebuilt from the
//! store at start, so a restart does not blind the detectors.

use std::collections::VecDeque;

use crate::batch::values::{ChainValues, HostValues};

/// Width of one slot: a window holds at most one point per slot.
pub const SLOT_MS: i64 = 10_000;

/// One node's recent past.
#[derive(Debug, Clone)]
pub struct Window {
    reach_ms: i64,
    host: VecDeque<(i64, HostValues)>,
    chain: VecDeque<(i64, ChainValues)>,
}

impl Window {
    /// An empty window reaching `reach_ms` back from its newest point.
    pub fn new(reach_ms: i64) -> Self {
        Self {
            reach_ms,
            host: VecDeque::new(),
            chain: VecDeque::new(),
        }
    }

    /// Records a host sample observed at `at_unix_ms`.
    pub fn record_host(&mut self, at_unix_ms: i64, values: HostValues) {
        record(&mut self.host, at_unix_ms, values, self.reach_ms);
    }

    /// Records a chain sample observed at `at_unix_ms`.
    pub fn record_chain(&mut self, at_unix_ms: i64, values: ChainValues) {
        record(&mut self.chain, at_unix_ms, values, self.reach_ms);
    }

    /// Host points, oldest first.
    pub fn host(&self) -> &VecDeque<(i64, HostValues)> {
        &self.host
    }

    /// Chain points, oldest first.
    pub fn chain(&self) -> &VecDeque<(i64, ChainValues)> {
        &self.chain
    }

    /// Points held (host + chain).
    pub fn len(&self) -> usize {
        self.host.len() + self.chain.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Observation time of the oldest point held, if any.
    pub fn oldest_unix_ms(&self) -> Option<i64> {
        let host = self.host.front().map(|(at, _)| *at);
        let chain = self.chain.front().map(|(at, _)| *at);
        match (host, chain) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

fn record<T>(points: &mut VecDeque<(i64, T)>, at: i64, value: T, reach_ms: i64) {
    let slot = at.div_euclid(SLOT_MS);
    // Replays after a reconnect can arrive out of order: keep the deque sorted.
    let pos = points.partition_point(|(t, _)| *t <= at);
    if pos > 0 && points[pos - 1].0.div_euclid(SLOT_MS) == slot {
        points[pos - 1] = (at, value);
    } else if pos < points.len() && points[pos].0.div_euclid(SLOT_MS) == slot {
        // A newer point of the same slot is already held.
    } else {
        points.insert(pos, (at, value));
    }
    let newest = points.back().map_or(at, |(t, _)| *t);
    while points.front().is_some_and(|(t, _)| *t < newest - reach_ms) {
        points.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_point_per_slot_within_reach() {
        let mut window = Window::new(60_000);
        for second in 0..120 {
            window.record_host(second * 1000, HostValues::default());
        }
        // 120 s of 1 Hz samples, 10 s slots, 60 s reach: the newest 7 slots' points.
        assert_eq!(window.host().len(), 7);
        assert_eq!(window.host().back().map(|p| p.0), Some(119_000));
        assert_eq!(window.oldest_unix_ms(), Some(59_000));
    }

    #[test]
    fn late_points_are_placed_in_order() {
        let mut window = Window::new(600_000);
        window.record_chain(50_000, ChainValues::default());
        window.record_chain(10_000, ChainValues::default());
        window.record_chain(30_000, ChainValues::default());
        let times: Vec<i64> = window.chain().iter().map(|p| p.0).collect();
        assert_eq!(times, vec![10_000, 30_000, 50_000]);
    }
}
