//! Per-node windows: the recent past of each node's host and chain figures, in memory, for
//! the detectors' baselines. At most one point per slot (the newest sample in it). A point
//! keeps only the figures the detectors read over time ([`HostHistory`], [`ChainHistory`]),
//! as `f32`/`u32` where they need no more (byte counts exact), so a full 30-minute window is
//! about 11.3 KiB a node (181 slots of 40 + 24 bytes; 64 KiB with whole samples). The newest
//! sample's every figure is in the registry. Rebuilt from the store at start, so a restart
//! does not blind the detectors.

use std::collections::VecDeque;

use crate::batch::values::{ChainValues, HostValues};

/// Width of one slot: a window holds at most one point per slot.
pub const SLOT_MS: i64 = 10_000;

/// One node's recent past.
#[derive(Debug, Clone)]
pub struct Window {
    reach_ms: i64,
    host: VecDeque<HostPoint>,
    chain: VecDeque<ChainPoint>,
}

/// `u64` to `u32`, saturating (block numbers, lags and ages fit; a lying node's nonsense
/// saturates instead of wrapping).
fn narrow(value: u64) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

/// What a window keeps of a host sample: the figures the detectors read over time (storage
/// slowness and fill rate, OOM kills). The newest sample's other figures are in the registry.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct HostHistory {
    /// Free bytes on the chain-data filesystem (exact).
    pub chain_data_available_bytes: u64,
    /// Used share of the chain-data filesystem.
    pub chain_data_used_percent: f64,
    /// Worst read latency across disks.
    pub disk_read_latency_ms_max: f64,
    /// Worst write latency across disks.
    pub disk_write_latency_ms_max: f64,
    /// Busiest disk.
    pub disk_utilisation_percent_max: f64,
    /// Kernel OOM kills since boot.
    pub oom_kills_total: u64,
}

impl From<&HostValues> for HostHistory {
    fn from(v: &HostValues) -> Self {
        Self {
            chain_data_available_bytes: v.chain_data_available_bytes,
            chain_data_used_percent: v.chain_data_used_percent,
            disk_read_latency_ms_max: v.disk_read_latency_ms_max,
            disk_write_latency_ms_max: v.disk_write_latency_ms_max,
            disk_utilisation_percent_max: v.disk_utilisation_percent_max,
            oom_kills_total: v.oom_kills_total,
        }
    }
}

/// What a window keeps of a chain sample: the figures the detectors read over time (lag
/// baselines, finality growth, peer churn, unresponsive runs).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ChainHistory {
    /// 1 when the node answered.
    pub responsive: u8,
    /// Blocks behind the reference tip.
    pub block_lag: u64,
    /// Best minus finalized.
    pub finality_lag_blocks: u64,
    /// Connected peers.
    pub peers: u32,
}

/// A host point as the window keeps it (read it through [`Points`]): 40 bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostPoint {
    at: i64,
    chain_data_available_bytes: u64,
    chain_data_used_percent: f32,
    disk_read_latency_ms_max: f32,
    disk_write_latency_ms_max: f32,
    disk_utilisation_percent_max: f32,
    oom_kills_total: u32,
}

impl HostPoint {
    #[allow(clippy::cast_possible_truncation)]
    fn of(at: i64, v: &HostValues) -> Self {
        Self {
            at,
            chain_data_available_bytes: v.chain_data_available_bytes,
            chain_data_used_percent: v.chain_data_used_percent as f32,
            disk_read_latency_ms_max: v.disk_read_latency_ms_max as f32,
            disk_write_latency_ms_max: v.disk_write_latency_ms_max as f32,
            disk_utilisation_percent_max: v.disk_utilisation_percent_max as f32,
            oom_kills_total: narrow(v.oom_kills_total),
        }
    }
}

/// A chain point as the window keeps it (read it through [`Points`]): 24 bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChainPoint {
    at: i64,
    block_lag: u32,
    finality_lag_blocks: u32,
    peers: u32,
    responsive: u8,
}

impl ChainPoint {
    fn of(at: i64, v: &ChainValues) -> Self {
        Self {
            at,
            block_lag: narrow(v.block_lag),
            finality_lag_blocks: narrow(v.finality_lag_blocks),
            peers: v.peers,
            responsive: v.responsive,
        }
    }
}

/// What a window point is: when it was observed, and the figures it stands for.
pub trait Point: Copy {
    /// The figures, as the detectors read them.
    type Values;
    /// Observation time, Unix ms.
    fn at(&self) -> i64;
    /// Observation time and figures.
    fn values(&self) -> (i64, Self::Values);
}

impl Point for HostPoint {
    type Values = HostHistory;
    fn at(&self) -> i64 {
        self.at
    }
    fn values(&self) -> (i64, HostHistory) {
        (
            self.at,
            HostHistory {
                chain_data_available_bytes: self.chain_data_available_bytes,
                chain_data_used_percent: f64::from(self.chain_data_used_percent),
                disk_read_latency_ms_max: f64::from(self.disk_read_latency_ms_max),
                disk_write_latency_ms_max: f64::from(self.disk_write_latency_ms_max),
                disk_utilisation_percent_max: f64::from(self.disk_utilisation_percent_max),
                oom_kills_total: u64::from(self.oom_kills_total),
            },
        )
    }
}

impl Point for ChainPoint {
    type Values = ChainHistory;
    fn at(&self) -> i64 {
        self.at
    }
    fn values(&self) -> (i64, ChainHistory) {
        (
            self.at,
            ChainHistory {
                responsive: self.responsive,
                block_lag: u64::from(self.block_lag),
                finality_lag_blocks: u64::from(self.finality_lag_blocks),
                peers: self.peers,
            },
        )
    }
}

/// A window's points of one kind, oldest first, read as `(observed at, figures)`.
#[derive(Debug, Clone, Copy)]
pub struct Points<'a, P: Point> {
    points: &'a VecDeque<P>,
}

impl<'a, P: Point> Points<'a, P> {
    /// Oldest first.
    pub fn iter(
        &self,
    ) -> impl DoubleEndedIterator<Item = (i64, P::Values)> + ExactSizeIterator + 'a {
        self.points.iter().map(P::values)
    }

    /// The newest point.
    pub fn back(&self) -> Option<(i64, P::Values)> {
        self.points.back().map(P::values)
    }

    /// The oldest point.
    pub fn front(&self) -> Option<(i64, P::Values)> {
        self.points.front().map(P::values)
    }

    /// How many points.
    pub fn len(&self) -> usize {
        self.points.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }
}

/// Host points of a window.
pub type HostPoints<'a> = Points<'a, HostPoint>;
/// Chain points of a window.
pub type ChainPoints<'a> = Points<'a, ChainPoint>;

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
        record(
            &mut self.host,
            HostPoint::of(at_unix_ms, &values),
            self.reach_ms,
        );
    }

    /// Records a chain sample observed at `at_unix_ms`.
    pub fn record_chain(&mut self, at_unix_ms: i64, values: ChainValues) {
        record(
            &mut self.chain,
            ChainPoint::of(at_unix_ms, &values),
            self.reach_ms,
        );
    }

    /// Host points, oldest first.
    pub fn host(&self) -> HostPoints<'_> {
        Points { points: &self.host }
    }

    /// Chain points, oldest first.
    pub fn chain(&self) -> ChainPoints<'_> {
        Points {
            points: &self.chain,
        }
    }

    /// Points held (host + chain).
    pub fn len(&self) -> usize {
        self.host.len() + self.chain.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Heap bytes the window's points take (capacity, not just length).
    pub fn heap_bytes(&self) -> usize {
        self.host.capacity() * std::mem::size_of::<HostPoint>()
            + self.chain.capacity() * std::mem::size_of::<ChainPoint>()
    }

    /// Observation time of the oldest point held, if any.
    pub fn oldest_unix_ms(&self) -> Option<i64> {
        let host = self.host.front().map(|p| p.at);
        let chain = self.chain.front().map(|p| p.at);
        match (host, chain) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

fn record<P: Point>(points: &mut VecDeque<P>, point: P, reach_ms: i64) {
    let at = point.at();
    let slot = at.div_euclid(SLOT_MS);
    // Replays after a reconnect can arrive out of order: keep the deque sorted.
    let pos = points.partition_point(|p| p.at() <= at);
    if pos > 0 && points[pos - 1].at().div_euclid(SLOT_MS) == slot {
        points[pos - 1] = point;
    } else if pos < points.len() && points[pos].at().div_euclid(SLOT_MS) == slot {
        // A newer point of the same slot is already held.
    } else {
        if points.len() == points.capacity() {
            // Grow by doubling, but never past the slots the reach can hold: a full window
            // then holds no spare capacity (a doubling would leave up to half of it unused).
            let slots = usize::try_from(reach_ms / SLOT_MS + 2).unwrap_or(usize::MAX);
            let target = (points.len() * 2).clamp(4, slots.max(points.len() + 1));
            points.reserve_exact(target - points.len());
        }
        points.insert(pos, point);
    }
    let newest = points.back().map_or(at, Point::at);
    while points.front().is_some_and(|p| p.at() < newest - reach_ms) {
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
        assert!(window.host().len() <= 8);
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

    #[test]
    fn a_full_half_hour_window_stays_compact_and_keeps_the_figures_detectors_read() {
        let mut window = Window::new(1_800_000);
        for second in 0..3600 {
            let at = second * 1000;
            window.record_host(
                at,
                HostValues {
                    disk_read_latency_ms_max: 12.5,
                    chain_data_available_bytes: 1_234_567_890_123,
                    oom_kills_total: 7,
                    ..HostValues::default()
                },
            );
            window.record_chain(
                at,
                ChainValues {
                    responsive: 1,
                    best_block: 4_000_000 + u64::try_from(second).unwrap_or(0) / 12,
                    block_lag: 3,
                    peers: 12,
                    emission_rao: 9_876_543_210,
                    ..ChainValues::default()
                },
            );
        }
        assert_eq!(window.host().len(), 181);
        // Measured, not assumed: capacity times point size, under 12 KiB a node.
        assert!(
            window.heap_bytes() <= 12 * 1024,
            "{} bytes",
            window.heap_bytes()
        );
        let (_, host) = window.host().back().expect("a point");
        assert_eq!(host.chain_data_available_bytes, 1_234_567_890_123);
        assert!((host.disk_read_latency_ms_max - 12.5).abs() < 1e-6);
        assert_eq!(host.oom_kills_total, 7);
        let (_, chain) = window.chain().back().expect("a point");
        assert_eq!((chain.block_lag, chain.peers, chain.responsive), (3, 12, 1));
    }
}
