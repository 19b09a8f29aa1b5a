//! The in-memory fleet: every known node, whether it is connected, and its newest figures.
//! Fed by ingest after each commit; read by the Fleet API; changes are broadcast to watchers.

use std::collections::HashMap;
use std::sync::RwLock;

use guardian_proto::v1::{ChainSample, GpuSample, KeystoreSample, Node, NodeDescriptor};
use tokio::sync::broadcast;

use crate::batch::values::{ChainValues, HostValues};
use crate::batch::{Batch, Host, Kind};
use crate::detect::{FleetContext, NodeInput, PreviousGpu};
use crate::identity::NodeId;
use crate::window::Window;

/// Capacity of the change feed; a watcher that falls this far behind gets a fresh snapshot.
const EVENT_CAPACITY: usize = 1024;

/// The fleet as the server sees it now.
#[derive(Debug)]
pub struct Registry {
    nodes: RwLock<HashMap<NodeId, Entry>>,
    events: broadcast::Sender<Node>,
    window_ms: i64,
}

#[derive(Debug)]
struct Entry {
    /// The node; its `last_host` is filled in by [`Entry::snapshot`] while `newest_host`
    /// holds a newer one.
    node: Node,
    /// The newest host sample of the stream, as ingest decoded it: its values serve the
    /// detectors, and its bytes are decoded whole only when someone reads the node.
    newest_host: Option<Host>,
    /// Open streams for this node (a reconnect can overlap the old stream briefly).
    streams: u32,
    /// The node's recent past.
    window: Window,
    /// The chain sample before `node.last_chain`.
    previous_chain: Option<(i64, ChainSample)>,
    /// Newest GPU sample, and what the detectors need of the one before it.
    gpu: Option<(i64, GpuSample)>,
    previous_gpu: Option<(i64, PreviousGpu)>,
    /// Newest keystore sample, and when its key fingerprints last changed.
    keystore: Option<(i64, KeystoreSample)>,
    keystore_changed_unix_ms: Option<i64>,
    /// Start of the current run of syncing chain samples.
    syncing_since_unix_ms: Option<i64>,
    /// The agent clock's offset, from live batches.
    clock: ClockEstimate,
}

/// The agent clock's offset from the server's: per live batch, its newest sample's observed
/// time minus its arrival (ms). A batch counts as live when it arrives at least
/// [`REPLAY_GAP_MS`] after the previous one and its samples advance no more than twice as fast
/// as the arrivals do: a spool replay (old samples catching up, however it is paced) is left
/// out. The estimate is the largest of the last [`CLOCK_BATCHES`] live offsets (transit only
/// makes samples look older), once three are in.
#[derive(Debug, Default)]
struct ClockEstimate {
    last_arrival_unix_ms: i64,
    last_observed_unix_ms: i64,
    offsets: std::collections::VecDeque<i64>,
}

/// Live batches the clock estimate keeps.
const CLOCK_BATCHES: usize = 8;
/// Arrivals closer than this to the previous batch are a replay burst.
const REPLAY_GAP_MS: i64 = 80;

impl ClockEstimate {
    fn record(&mut self, newest_observed_unix_ms: i64, arrival_unix_ms: i64) {
        let arrival_gap = arrival_unix_ms - self.last_arrival_unix_ms;
        let observed_gap = newest_observed_unix_ms - self.last_observed_unix_ms;
        self.last_arrival_unix_ms = arrival_unix_ms;
        self.last_observed_unix_ms = newest_observed_unix_ms;
        if arrival_gap < REPLAY_GAP_MS || observed_gap > 2 * arrival_gap {
            return;
        }
        if self.offsets.len() == CLOCK_BATCHES {
            self.offsets.pop_front();
        }
        self.offsets
            .push_back(newest_observed_unix_ms - arrival_unix_ms);
    }

    fn offset_ms(&self) -> Option<i64> {
        (self.offsets.len() >= 3)
            .then(|| self.offsets.iter().copied().max())
            .flatten()
    }
}

/// One node's figures as `/metrics` shows them ([`Registry::metric_rows`]).
#[derive(Debug, Clone, PartialEq)]
pub struct NodeMetricRow {
    /// Node id.
    pub node: String,
    /// Its network.
    pub network: String,
    /// An agent stream is open.
    pub connected: bool,
    /// Its last batch (or connect), Unix ms.
    pub last_seen_unix_ms: i64,
    /// Reconciler phase ("" before the first evaluation).
    pub phase: String,
    /// Composite risk 0..1.
    pub risk: f64,
    /// Open findings.
    pub open_findings: u32,
    /// Paused by an operator.
    pub paused: bool,
    /// The Kubernetes node the agent runs on ("" outside Kubernetes).
    pub kubernetes_node: String,
}

/// The reconciler's figures shown on a node (see [`Registry::set_reconcile`]).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ReconcileFigures {
    /// Phase name.
    pub phase: String,
    /// When the phase was entered.
    pub phase_since_unix_ms: i64,
    /// Composite risk 0..1.
    pub risk: f64,
    /// Open findings.
    pub open_findings: u32,
    /// Remediations in the current budget.
    pub attempts: u32,
    /// Paused by an operator.
    pub paused: bool,
}

impl Entry {
    fn new(node: Node, window_ms: i64) -> Self {
        Self {
            node,
            newest_host: None,
            streams: 0,
            window: Window::new(window_ms),
            previous_chain: None,
            gpu: None,
            previous_gpu: None,
            keystore: None,
            keystore_changed_unix_ms: None,
            syncing_since_unix_ms: None,
            clock: ClockEstimate::default(),
        }
    }

    /// The node as readers see it, with its newest host sample whole.
    fn snapshot(&self) -> Node {
        let mut node = self.node.clone();
        if let Some(host) = &self.newest_host {
            node.last_host = Some(host.sample());
        }
        node
    }

    /// The newest host sample's values.
    fn host_values(&self) -> Option<HostValues> {
        match &self.newest_host {
            Some(host) => Some(host.values),
            None => self.node.last_host.as_ref().map(HostValues::of),
        }
    }

    fn sync_window_figures(&mut self) {
        self.node.window_points = u32::try_from(self.window.len()).unwrap_or(u32::MAX);
        self.node.window_oldest_unix_ms = self.window.oldest_unix_ms().unwrap_or(0);
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            nodes: RwLock::default(),
            events: broadcast::channel(EVENT_CAPACITY).0,
            window_ms: 1_800_000,
        }
    }
}

impl Registry {
    /// A registry seeded with the nodes stored in the ledger (all disconnected), keeping
    /// `window_seconds` of each node's figures in memory.
    pub fn from_stored(nodes: Vec<Node>, window_seconds: u32) -> Self {
        let registry = Self {
            window_ms: i64::from(window_seconds) * 1000,
            ..Self::default()
        };
        {
            let mut map = registry.write();
            for node in nodes {
                if let Ok(id) = NodeId::parse(&node.node_id) {
                    map.insert(id, Entry::new(node, registry.window_ms));
                }
            }
        }
        registry
    }

    /// How far back windows reach, ms.
    pub fn window_ms(&self) -> i64 {
        self.window_ms
    }

    /// Refills the windows from stored rows (`(node, observed_at, values)`); nodes the
    /// registry does not know are skipped. Returns the points now held in all.
    pub fn rebuild_windows(
        &self,
        host: Vec<(String, i64, HostValues)>,
        chain: Vec<(String, i64, ChainValues)>,
    ) -> usize {
        let mut map = self.write();
        for (node, at, values) in host {
            if let Some(entry) = NodeId::parse(&node).ok().and_then(|id| map.get_mut(&id)) {
                entry.window.record_host(at, values);
            }
        }
        for (node, at, values) in chain {
            if let Some(entry) = NodeId::parse(&node).ok().and_then(|id| map.get_mut(&id)) {
                entry.window.record_chain(at, values);
            }
        }
        let mut total = 0;
        for entry in map.values_mut() {
            entry.sync_window_figures();
            total += entry.window.len();
        }
        total
    }

    /// A copy of one node's window.
    pub fn window(&self, id: &NodeId) -> Option<Window> {
        self.read().get(id).map(|e| e.window.clone())
    }

    /// A stream for `id` passed Hello.
    pub fn connected(
        &self,
        id: &NodeId,
        descriptor: &NodeDescriptor,
        agent_version: &str,
        last_stored_seq: u64,
        now_unix_ms: i64,
    ) {
        self.update(id, now_unix_ms, |entry| {
            entry.streams += 1;
            let node = &mut entry.node;
            node.connected = true;
            node.hostname.clone_from(&descriptor.hostname);
            node.network.clone_from(&descriptor.network);
            node.kubernetes_node.clone_from(&descriptor.kubernetes_node);
            node.agent_pod = if descriptor.pod_name.is_empty() {
                String::new()
            } else {
                format!("{}/{}", descriptor.pod_namespace, descriptor.pod_name)
            };
            node.agent_version = agent_version.to_owned();
            node.last_stored_seq = node.last_stored_seq.max(last_stored_seq);
        });
    }

    /// A batch for `id` was committed.
    pub fn committed(&self, id: &NodeId, batch: &Batch, now_unix_ms: i64) {
        self.update(id, now_unix_ms, |entry| {
            let node = &mut entry.node;
            node.last_stored_seq = node.last_stored_seq.max(batch.seq);
            // Windows take every sample; the newest of each kind is cloned once.
            let mut newest_host: Option<(i64, &crate::batch::Host)> = None;
            let mut newest_chain: Option<(i64, &guardian_proto::v1::ChainSample)> = None;
            let mut newest_gpu: Option<(i64, &GpuSample)> = None;
            let mut newest_keystore: Option<(i64, &KeystoreSample)> = None;
            for sample in &batch.samples {
                let at = sample.observed_at_unix_ms;
                match &sample.kind {
                    Some(Kind::Host(host)) => {
                        entry.window.record_host(at, host.values);
                        if newest_host.is_none_or(|(seen, _)| at >= seen) {
                            newest_host = Some((at, host));
                        }
                    }
                    Some(Kind::Chain(chain)) => {
                        entry.window.record_chain(at, ChainValues::of(chain));
                        if newest_chain.is_none_or(|(seen, _)| at >= seen) {
                            newest_chain = Some((at, chain));
                        }
                    }
                    Some(Kind::Gpu(gpu)) if newest_gpu.is_none_or(|(seen, _)| at >= seen) => {
                        newest_gpu = Some((at, gpu));
                    }
                    Some(Kind::Keystore(keystore))
                        if newest_keystore.is_none_or(|(seen, _)| at >= seen) =>
                    {
                        newest_keystore = Some((at, keystore));
                    }
                    _ => {}
                }
            }
            if let Some((at, host)) = newest_host
                && at >= node.last_host_observed_unix_ms
            {
                // Decoded whole only when the node is read (Entry::snapshot). Its bytes are
                // copied: ingest's slice shares the whole received frame (up to
                // max_frame_bytes), which must not stay alive until the node's next sample.
                node.last_host = None;
                entry.newest_host = Some(Host {
                    encoded: prost::bytes::Bytes::copy_from_slice(&host.encoded),
                    ..host.clone()
                });
                node.last_host_observed_unix_ms = at;
            }
            if let Some((at, chain)) = newest_chain
                && at >= node.last_chain_observed_unix_ms
            {
                if chain.responsive && chain.is_syncing {
                    entry.syncing_since_unix_ms.get_or_insert(at);
                } else if chain.responsive {
                    entry.syncing_since_unix_ms = None;
                }
                let before = node.last_chain.replace(chain.clone());
                let before_at = std::mem::replace(&mut node.last_chain_observed_unix_ms, at);
                entry.previous_chain = before.map(|c| (before_at, c));
            }
            if let Some((at, gpu)) = newest_gpu
                && entry.gpu.as_ref().is_none_or(|(seen, _)| at >= *seen)
            {
                entry.previous_gpu = entry
                    .gpu
                    .replace((at, gpu.clone()))
                    .map(|(at, before)| (at, PreviousGpu::from(&before)));
            }
            if let Some((at, keystore)) = newest_keystore
                && entry.keystore.as_ref().is_none_or(|(seen, _)| at >= *seen)
            {
                let fingerprints = |k: &KeystoreSample| {
                    let mut prints: Vec<&str> = k
                        .files
                        .iter()
                        .map(|f| f.sha256_fingerprint.as_str())
                        .collect();
                    prints.sort_unstable();
                    prints.join(",")
                };
                if let Some((_, before)) = &entry.keystore
                    && fingerprints(before) != fingerprints(keystore)
                {
                    entry.keystore_changed_unix_ms = Some(at);
                }
                entry.keystore = Some((at, keystore.clone()));
            }
            if let Some(newest) = batch.samples.iter().map(|s| s.observed_at_unix_ms).max() {
                entry.clock.record(newest, now_unix_ms);
            }
            node.spool_dropped_batches_total = node
                .spool_dropped_batches_total
                .max(batch.spool_dropped_batches_total);
            entry.sync_window_figures();
        });
    }

    /// Runs `detect` over one node's window and newest samples (under the read lock: keep
    /// it quick), with the node's network. `None` for an unknown node.
    pub fn evaluate<R>(
        &self,
        id: &NodeId,
        now_unix_ms: i64,
        detect: impl FnOnce(&NodeInput<'_>, &str) -> R,
    ) -> Option<R> {
        let map = self.read();
        let entry = map.get(id)?;
        let node = &entry.node;
        let input = NodeInput {
            now_unix_ms,
            connected: node.connected,
            last_seen_unix_ms: node.last_seen_unix_ms,
            window: &entry.window,
            host: entry
                .host_values()
                .map(|values| (node.last_host_observed_unix_ms, values)),
            chain: node
                .last_chain
                .as_ref()
                .map(|c| (node.last_chain_observed_unix_ms, c)),
            previous_chain: entry.previous_chain.as_ref().map(|(at, c)| (*at, c)),
            gpu: entry.gpu.as_ref().map(|(at, g)| (*at, g)),
            previous_gpu: entry.previous_gpu.as_ref().map(|(at, g)| (*at, g)),
            keystore: entry.keystore.as_ref().map(|(at, k)| (*at, k)),
            keystore_changed_unix_ms: entry.keystore_changed_unix_ms,
            syncing_since_unix_ms: entry.syncing_since_unix_ms,
            clock_offset_ms: entry.clock.offset_ms(),
        };
        Some(detect(&input, &node.network))
    }

    /// Every node id with its network.
    pub fn ids(&self) -> Vec<(NodeId, String)> {
        self.read()
            .iter()
            .map(|(id, e)| (id.clone(), e.node.network.clone()))
            .collect()
    }

    /// Per network: the tip its connected nodes with a responsive chain sample agree on (the
    /// highest best block that at least `tip_agreement` of them reached: [`agreed_tip`]) and
    /// their median peer count.
    pub fn network_contexts(&self, tip_agreement: usize) -> HashMap<String, FleetContext> {
        let map = self.read();
        let mut by_network: HashMap<&str, (Vec<u64>, Vec<u32>)> = HashMap::new();
        let mut clocks: HashMap<&str, Vec<i64>> = HashMap::new();
        for entry in map.values() {
            let node = &entry.node;
            if node.connected
                && let Some(offset) = entry.clock.offset_ms()
            {
                clocks
                    .entry(node.network.as_str())
                    .or_default()
                    .push(offset);
            }
            if let Some(chain) = &node.last_chain
                && chain.responsive
                && node.connected
            {
                let slot = by_network.entry(node.network.as_str()).or_default();
                slot.0.push(chain.best_block);
                slot.1.push(chain.peers);
            }
        }
        for network in clocks.keys() {
            by_network.entry(network).or_default();
        }
        by_network
            .into_iter()
            .map(|(network, (mut bests, mut peers))| {
                peers.sort_unstable();
                bests.sort_unstable_by(|a, b| b.cmp(a));
                let best = agreed_tip(&bests, tip_agreement);
                let median = (peers.len() >= 2).then(|| {
                    let mid = peers.len() / 2;
                    if peers.len() % 2 == 0 {
                        (f64::from(peers[mid - 1]) + f64::from(peers[mid])) / 2.0
                    } else {
                        f64::from(peers[mid])
                    }
                });
                (
                    network.to_owned(),
                    FleetContext {
                        network_best_block: best,
                        network_median_peers: median,
                        network_clock_delay_ms: clocks
                            .get_mut(network)
                            .and_then(|offsets| shared_clock_delay(offsets)),
                    },
                )
            })
            .collect()
    }

    /// Shows the reconciler's figures on a node; watchers hear of it only when they change.
    pub fn set_reconcile(&self, id: &NodeId, figures: &ReconcileFigures) {
        let snapshot = {
            let mut map = self.write();
            let Some(entry) = map.get_mut(id) else {
                return;
            };
            let node = &mut entry.node;
            let risk_changed = (node.risk - figures.risk).abs() >= 0.01;
            if node.phase == figures.phase
                && node.phase_since_unix_ms == figures.phase_since_unix_ms
                && !risk_changed
                && node.open_findings == figures.open_findings
                && node.remediation_attempts == figures.attempts
                && node.paused == figures.paused
            {
                return;
            }
            node.phase.clone_from(&figures.phase);
            node.phase_since_unix_ms = figures.phase_since_unix_ms;
            node.risk = figures.risk;
            node.open_findings = figures.open_findings;
            node.remediation_attempts = figures.attempts;
            node.paused = figures.paused;
            entry.snapshot()
        };
        let _ = self.events.send(snapshot);
    }

    /// A stream for `id` ended.
    pub fn disconnected(&self, id: &NodeId, now_unix_ms: i64) {
        self.update(id, now_unix_ms, |entry| {
            entry.streams = entry.streams.saturating_sub(1);
            entry.node.connected = entry.streams > 0;
        });
    }

    /// Every node, sorted by id.
    pub fn list(&self) -> Vec<Node> {
        let map = self.read();
        let mut nodes: Vec<Node> = map.values().map(Entry::snapshot).collect();
        nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        nodes
    }

    /// One node.
    pub fn get(&self, id: &NodeId) -> Option<Node> {
        self.read().get(id).map(Entry::snapshot)
    }

    /// Each node's figures for `/metrics`, sorted by id: read in place, without the
    /// whole-node copies [`Registry::list`] makes.
    pub fn metric_rows(&self) -> Vec<NodeMetricRow> {
        let map = self.read();
        let mut rows: Vec<NodeMetricRow> = map
            .values()
            .map(|e| NodeMetricRow {
                node: e.node.node_id.clone(),
                network: e.node.network.clone(),
                connected: e.node.connected,
                last_seen_unix_ms: e.node.last_seen_unix_ms,
                phase: e.node.phase.clone(),
                risk: e.node.risk,
                open_findings: e.node.open_findings,
                paused: e.node.paused,
                kubernetes_node: e.node.kubernetes_node.clone(),
            })
            .collect();
        rows.sort_by(|a, b| a.node.cmp(&b.node));
        rows
    }

    /// Number of nodes known.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether no node is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A feed of every node change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Node> {
        self.events.subscribe()
    }

    /// The fleet watch that the Fleet API's `WatchNodes` and the web page's live table share:
    /// every node now, then each change as it happens. A watcher that falls behind the change
    /// feed gets a fresh snapshot (the whole truth again) instead of a gap. The feed ends on
    /// `shutdown` or when the receiver is dropped.
    pub fn watch(
        self: &std::sync::Arc<Self>,
        shutdown: tokio_util::sync::CancellationToken,
        tasks: &tokio_util::task::TaskTracker,
        span: tracing::Span,
    ) -> tokio::sync::mpsc::Receiver<Node> {
        use tracing::Instrument;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        // Subscribe before the snapshot so no change falls between them.
        let mut changes = self.subscribe();
        let registry = std::sync::Arc::clone(self);
        tasks.spawn(
            async move {
                let send_snapshot = |tx: &tokio::sync::mpsc::Sender<Node>| {
                    let tx = tx.clone();
                    let nodes = registry.list();
                    async move {
                        for node in nodes {
                            if tx.send(node).await.is_err() {
                                return false;
                            }
                        }
                        true
                    }
                };
                if !send_snapshot(&tx).await {
                    return;
                }
                loop {
                    let change = tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tx.closed() => return,
                        change = changes.recv() => change,
                    };
                    let delivered = match change {
                        Ok(node) => tx.send(node).await.is_ok(),
                        Err(broadcast::error::RecvError::Lagged(_)) => send_snapshot(&tx).await,
                        Err(broadcast::error::RecvError::Closed) => return,
                    };
                    if !delivered {
                        return;
                    }
                }
            }
            .instrument(span),
        );
        rx
    }

    /// The node's newest GPU sample and when it was observed (Unix ms).
    pub fn gpu(&self, id: &NodeId) -> Option<(i64, GpuSample)> {
        self.read().get(id).and_then(|entry| entry.gpu.clone())
    }

    fn update(&self, id: &NodeId, now_unix_ms: i64, change: impl FnOnce(&mut Entry)) {
        let snapshot = {
            let mut map = self.write();
            let window_ms = self.window_ms;
            let entry = map.entry(id.clone()).or_insert_with(|| {
                Entry::new(
                    Node {
                        node_id: id.to_string(),
                        first_seen_unix_ms: now_unix_ms,
                        ..Node::default()
                    },
                    window_ms,
                )
            });
            change(entry);
            entry.node.last_seen_unix_ms = entry.node.last_seen_unix_ms.max(now_unix_ms);
            // The snapshot (the node with its newest samples) is cloned only for watchers;
            // one who subscribes after this check sees the node's next change.
            (self.events.receiver_count() > 0).then(|| entry.snapshot())
        };
        // No watcher is not an error.
        if let Some(snapshot) = snapshot {
            let _ = self.events.send(snapshot);
        }
    }

    // A poisoned lock only means a panic elsewhere mid-update of plain data; keep serving.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<NodeId, Entry>> {
        self.nodes
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<NodeId, Entry>> {
        self.nodes
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The median of a network's clock offsets when it says every clock looks behind: the
/// server's own delay ([`FleetContext::network_clock_delay_ms`]). None with fewer than
/// [`crate::detect::CLOCK_FLEET_MIN`] offsets or a median at or ahead of zero.
fn shared_clock_delay(offsets: &mut [i64]) -> Option<i64> {
    if offsets.len() < crate::detect::CLOCK_FLEET_MIN {
        return None;
    }
    offsets.sort_unstable();
    let median = offsets[offsets.len() / 2];
    (median < 0).then_some(median)
}

/// The highest block at least `agreement` nodes reached: the `agreement`-th highest of
/// `bests_descending` (0 when fewer nodes report). One node alone, lying or forked, cannot set
/// a network's tip; its honest peers are then judged by the rest of the fleet, their own view
/// and their reference endpoints.
pub fn agreed_tip(bests_descending: &[u64], agreement: usize) -> u64 {
    bests_descending
        .get(agreement.max(1) - 1)
        .copied()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_estimate_follows_live_batches_and_leaves_replays_out() {
        let mut clock = ClockEstimate::default();
        // A replay paced slowly (old samples a second apart, arriving 200 ms apart)...
        for i in 0..20 {
            clock.record(1_000_000 + i * 1_000, 2_000_000 + i * 200);
        }
        assert_eq!(clock.offset_ms(), None, "a replay is not a slow clock");
        // ...then live batches every second from a clock 40 s ahead.
        for i in 1..=4 {
            clock.record(2_044_000 + i * 1_000, 2_004_000 + i * 1_000);
        }
        assert_eq!(clock.offset_ms(), Some(40_000));
    }

    #[test]
    fn a_networks_shared_clock_delay_is_its_median_behind() {
        assert_eq!(
            shared_clock_delay(&mut [-9_000, -12_000, -11_000, -40_000]),
            None
        );
        assert_eq!(
            shared_clock_delay(&mut [-9_000, -12_000, -11_000, -40_000, 60_000]),
            Some(-11_000)
        );
        assert_eq!(shared_clock_delay(&mut [-100, 0, 0, 0, 30_000]), None);
    }

    #[test]
    fn one_node_alone_cannot_set_the_network_tip() {
        // Four honest nodes around 4 000 000 and one claiming 999 999 999.
        let bests = [999_999_999, 4_000_012, 4_000_010, 4_000_009, 4_000_001];
        assert_eq!(agreed_tip(&bests, 2), 4_000_012);
        assert_eq!(
            agreed_tip(&bests, 1),
            999_999_999,
            "agreement 1 is the plain max"
        );
        assert_eq!(agreed_tip(&bests, 3), 4_000_010);
        assert_eq!(
            agreed_tip(&[4_000_000], 2),
            0,
            "too few nodes: no fleet tip"
        );
        assert_eq!(agreed_tip(&[], 2), 0);
        assert_eq!(agreed_tip(&[7, 5], 0), 7, "0 is taken as 1");
    }

    #[test]
    fn the_newest_host_sample_reads_whole_and_its_values_reach_the_detectors() {
        use guardian_proto::v1::{DiskIo, HostSample, Sample, SampleBatch, sample};
        let registry = Registry::default();
        let id = NodeId::parse("a").expect("id");
        let host = |cpu: f64| HostSample {
            cpu_busy_percent: cpu,
            oom_kills_total: 4,
            disks: vec![DiskIo {
                device: "nvme0n1".into(),
                read_latency_ms: 2.5,
                ..Default::default()
            }],
            ..Default::default()
        };
        let batch = Batch::from(&SampleBatch {
            seq: 1,
            spool_dropped_batches_total: 0,
            samples: [(20, 30.0), (10, 10.0)]
                .into_iter()
                .map(|(at, cpu)| Sample {
                    observed_at_unix_ms: at,
                    kind: Some(sample::Kind::Host(host(cpu))),
                })
                .collect(),
        });
        registry.committed(&id, &batch, 30);
        let node = registry.get(&id).expect("known");
        assert_eq!(node.last_host, Some(host(30.0)), "the newest, every field");
        assert_eq!(node.last_host_observed_unix_ms, 20);
        assert_eq!(registry.list()[0].last_host, Some(host(30.0)));
        let seen = registry.evaluate(&id, 40, |input, _| input.host);
        assert_eq!(seen, Some(Some((20, HostValues::of(&host(30.0))))));

        // A node read back from the ledger at start has its stored sample.
        let stored = Registry::from_stored(vec![node], 1800);
        assert_eq!(
            stored.evaluate(&id, 40, |input, _| input.host),
            Some(Some((20, HostValues::of(&host(30.0)))))
        );
        assert_eq!(stored.get(&id).and_then(|n| n.last_host), Some(host(30.0)));
    }

    #[test]
    fn a_node_stays_connected_while_any_stream_is_open() {
        let registry = Registry::default();
        let id = NodeId::parse("a").expect("id");
        registry.connected(&id, &NodeDescriptor::default(), "v", 0, 1);
        registry.connected(&id, &NodeDescriptor::default(), "v", 0, 2);
        registry.disconnected(&id, 3);
        assert!(registry.get(&id).is_some_and(|n| n.connected));
        registry.disconnected(&id, 4);
        assert!(
            registry
                .get(&id)
                .is_some_and(|n| !n.connected && n.last_seen_unix_ms == 4)
        );
    }
}
