//! Chain sampler: owns every call into the subtensor node (the only `subxt` user) and turns what
//! it answers into a `ChainSample`.
//!
//! The network is never touched from [`Sampler::sample`]. [`ChainSampler::spawn`] starts one
//! background task that talks to the node once per interval and keeps a shared snapshot; `sample()`
//! copies the latest snapshot and stamps the head age at the moment it is read.
//!
//! Per interval the task reads, from the node at [`ChainSettings::endpoint`]: `system_health`
//! (its round trip is `rpc_latency_ms`), `system_syncState` (raw JSON), the best header, the
//! finalized head and its header, and `state_getRuntimeVersion`; concurrently it reads the best
//! header of every reference endpoint over a separate, lightweight connection each. New best heads
//! also arrive between rounds through `chain_subscribeNewHeads`; when that subscription cannot be
//! opened or ends, the polled best header is the only source (`head_subscribed = false`). The
//! validator's standing (SubtensorModule storage, through subxt's dynamic storage API) is read on
//! a slower cadence: see [`should_read_standing`].
//!
//! # Guarantees
//! - Every call is bounded by [`ChainSettings::call_timeout`], connecting included. A node that keeps
//!   the socket open but stops answering is reported `responsive = false`, `error = "timed out
//!   after N ms waiting for <call>"` by the round in which it stopped; its connection is then
//!   dropped and re-opened with a capped exponential backoff ([`MAX_RECONNECT_BACKOFF`]).
//! - While the node cannot be read, the last known numbers are kept, `error` says why (connection
//!   refused, timed out, or the call that failed and how) and `head_age_ms` keeps growing.
//! - No log flood: only state changes are logged (`ChainResponsive` / `ChainUnresponsive`,
//!   `ChainHeadSubscribed` / `ChainHeadPolling`, `ChainStandingAvailable` /
//!   `ChainStandingUnavailable`, `ChainReferenceResponsive` / `ChainReferenceUnresponsive`).
//! - The task stops when the shutdown token is cancelled, also in the middle of a round.
//! - Until the first round has finished the sampler is not [`Sampler::ready`]: batches carry
//!   `SamplerUnavailable` ("no answer yet"), never a chain sample claiming the node
//!   unresponsive. (`sample()` itself still answers, with `responsive = false` and that
//!   error.) Every call of the round is bounded by the call timeout, so a node that does not
//!   answer is reported `responsive = false` as soon as the first round's call times out.

use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use guardian_proto::v1::{ChainSample, ReferenceTip, ValidatorStanding, sample};
use subxt::backend::LegacyBackend;
use subxt::config::RpcConfigFor;
use subxt::config::substrate::SubstrateHeader;
use subxt::rpcs::client::{RpcClient, RpcParams, RpcSubscription};
use subxt::rpcs::methods::LegacyRpcMethods;
use subxt::storage::Address;
use subxt::utils::{AccountId32, H256};
use subxt::{OnlineClient, OnlineClientAtBlock, PolkadotConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::{SampleError, Sampler};

/// Longest wait between two reconnect attempts (the backoff doubles from one interval up to this,
/// or up to one interval when the interval is longer).
pub const MAX_RECONNECT_BACKOFF: Duration = Duration::from_secs(10);

/// The pallet holding the validator's standing.
const PALLET: &str = "SubtensorModule";

/// `ValidatorTrust` is a u16 fixed-point share of 1.
const TRUST_SCALE: f64 = 65_535.0;

/// Why there is no sample (and each reference's error) before the first round has finished.
const NOT_YET: &str = "no answer yet: the first round has not finished";

/// RPC types of the chain (a Substrate chain with 32-byte accounts and blake2 hashes).
type Rpc = RpcConfigFor<PolkadotConfig>;

/// A block header as the node sends it.
type Header = SubstrateHeader<H256>;

/// Where and how often to sample the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainSettings {
    /// The node's JSON-RPC WebSocket endpoint (`ws://127.0.0.1:9944` by default).
    pub endpoint: String,
    /// Other nodes of the same network whose best block is reported as a reference tip.
    pub references: Vec<String>,
    /// Upper bound on every call, connecting included.
    pub call_timeout: Duration,
    /// How often the node is read.
    pub interval: Duration,
    /// The validator whose on-chain standing is read; `None` reads no standing.
    pub standing: Option<StandingTarget>,
    /// Standing is re-read every this many new blocks (25 is about 5 minutes), after a
    /// `spec_version` change, and whenever it has never been read.
    pub standing_every_blocks: u64,
}

impl Default for ChainSettings {
    /// `ws://127.0.0.1:9944`, no references, 2 s call timeout, 12 s interval (one block), no
    /// standing, standing every 25 blocks.
    fn default() -> Self {
        Self {
            endpoint: "ws://127.0.0.1:9944".to_owned(),
            references: Vec::new(),
            call_timeout: Duration::from_secs(2),
            interval: Duration::from_secs(12),
            standing: None,
            standing_every_blocks: 25,
        }
    }
}

impl ChainSettings {
    /// Checks the settings before anything is started.
    ///
    /// # Errors
    /// A message naming the field and the fix: an endpoint that is not `ws://` or `wss://`, a zero
    /// interval or timeout, a call timeout longer than the interval (an unresponsive node would
    /// then go unnoticed for more than one round), a zero standing cadence, or an invalid hotkey.
    pub fn validate(&self) -> Result<(), String> {
        validate_endpoint("endpoint", &self.endpoint)?;
        for (index, reference) in self.references.iter().enumerate() {
            validate_endpoint(&format!("references[{index}]"), reference)?;
        }
        if self.interval.is_zero() {
            return Err("interval: must be greater than 0".to_owned());
        }
        if self.call_timeout.is_zero() {
            return Err("call_timeout: must be greater than 0".to_owned());
        }
        if self.call_timeout > self.interval {
            return Err(format!(
                "call_timeout: {} ms is longer than interval ({} ms); make it at most the interval",
                duration_ms(self.call_timeout),
                duration_ms(self.interval)
            ));
        }
        if self.standing_every_blocks == 0 {
            return Err(
                "standing_every_blocks: must be at least 1 (25 is about 5 minutes)".to_owned(),
            );
        }
        if let Some(standing) = &self.standing {
            standing.validate()?;
        }
        Ok(())
    }
}

/// The validator whose standing is read: a hotkey on a subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandingTarget {
    /// The hotkey's SS58 address (`5...` on Bittensor).
    pub hotkey_ss58: String,
    /// The subnet.
    pub netuid: u16,
}

impl StandingTarget {
    /// Checks that the hotkey is a well-formed SS58 address: base58, the length of a one- or
    /// two-byte prefix plus a 32-byte account plus a 2-byte checksum, and a checksum equal to
    /// the first bytes of blake2b-512(`"SS58PRE"` ++ prefix ++ account).
    ///
    /// # Errors
    /// A message naming `standing.hotkey_ss58` and what is wrong with it.
    pub fn validate(&self) -> Result<(), String> {
        parse_ss58(&self.hotkey_ss58).map(|_| ())
    }
}

/// Samples the chain from a background task; [`Sampler::sample`] returns its latest snapshot.
#[derive(Debug, Clone)]
pub struct ChainSampler {
    /// Shared with the background task.
    snapshot: Arc<Mutex<Snapshot>>,
}

impl ChainSampler {
    /// Starts the background task on `tasks` (span `chain_sampler`); it stops when `shutdown` is
    /// cancelled. The settings should have passed [`ChainSettings::validate`]; an invalid hotkey
    /// disables the standing reading (logged once).
    ///
    /// # Panics
    /// Outside a tokio runtime (as `tokio::spawn`).
    pub fn spawn(
        settings: ChainSettings,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        let snapshot = Arc::new(Mutex::new(Snapshot::new(&settings, Instant::now())));
        let span = tracing::info_span!("chain_sampler", endpoint = %settings.endpoint);
        let task = Task::new(settings, Arc::clone(&snapshot));
        tasks.spawn(task.run(shutdown).instrument(span));
        Self { snapshot }
    }
}

impl Sampler for ChainSampler {
    fn name(&self) -> &'static str {
        "chain"
    }

    /// Not before the first round has finished: until then nothing is known about the node,
    /// and [`Sampler::sample`] would say "unresponsive" (`responsive` is false by default).
    fn ready(&self) -> Result<(), SampleError> {
        let snapshot = lock(&self.snapshot);
        if snapshot.answered {
            Ok(())
        } else {
            Err(SampleError::NotYet(format!(
                "{}: {NOT_YET}",
                snapshot.sample.endpoint
            )))
        }
    }

    fn sample(&mut self) -> Result<sample::Kind, SampleError> {
        Ok(sample::Kind::Chain(
            lock(&self.snapshot).view(Instant::now()),
        ))
    }
}

/// Whether the standing is due: it has never been read (`last_read_block` is `None`), the
/// runtime changed, at least `every` blocks were added since the last reading, or the best block
/// went below it (the node was restored or re-synced).
pub fn should_read_standing(
    last_read_block: Option<u64>,
    best: u64,
    spec_changed: bool,
    every: u64,
) -> bool {
    match last_read_block {
        None => true,
        Some(last) => spec_changed || best < last || best - last >= every,
    }
}

/// Why the node (or a reference) could not be read. Its `Display` text becomes `error`.
#[derive(Debug, Clone, thiserror::Error)]
enum ChainError {
    /// The WebSocket connection could not be opened (refused, bad address, handshake failed).
    #[error("cannot connect to {endpoint}: {detail}")]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// The client's description.
        detail: String,
    },
    /// A call got no answer within the call timeout.
    #[error("timed out after {after_ms} ms waiting for {call}")]
    Timeout {
        /// The call (`connect`, `system_health`, ...).
        call: String,
        /// The call timeout.
        after_ms: u64,
    },
    /// The connection failed under a call.
    #[error("{call}: connection lost: {detail}")]
    Transport {
        /// The call.
        call: String,
        /// The client's description.
        detail: String,
    },
    /// The node answered, but with an error or something that could not be understood.
    #[error("{call} failed: {detail}")]
    Call {
        /// The call or storage item.
        call: String,
        /// What was wrong.
        detail: String,
    },
}

impl ChainError {
    /// Stable label for metrics and logs.
    fn kind(&self) -> &'static str {
        match self {
            Self::Connect { .. } => "connect",
            Self::Timeout { .. } => "timeout",
            Self::Transport { .. } => "transport",
            Self::Call { .. } => "call",
        }
    }

    /// Whether the connection is unusable and must be re-opened.
    fn drops_connection(&self) -> bool {
        !matches!(self, Self::Call { .. })
    }

    /// Classifies an RPC error of `call`.
    fn rpc(call: &str, error: subxt::rpcs::Error) -> Self {
        match error {
            subxt::rpcs::Error::Client(_) | subxt::rpcs::Error::DisconnectedWillReconnect(_) => {
                Self::Transport {
                    call: call.to_owned(),
                    detail: client_detail(&error),
                }
            }
            other => Self::Call {
                call: call.to_owned(),
                detail: other.to_string(),
            },
        }
    }

    /// An error of a subxt (storage, client) call.
    fn call(call: &str, error: impl std::fmt::Display) -> Self {
        Self::Call {
            call: call.to_owned(),
            detail: error.to_string(),
        }
    }
}

/// The text of a client error without the `"RPC error: client error: "` prefixes that subxt
/// stacks once per layer.
fn client_detail(error: &impl std::fmt::Display) -> String {
    const PREFIX: &str = "RPC error: client error: ";
    let text = error.to_string();
    let mut rest = text.as_str();
    while let Some(stripped) = rest.strip_prefix(PREFIX) {
        rest = stripped;
    }
    rest.to_owned()
}

/// Awaits `future` for at most `limit`.
async fn within<T>(
    call: &str,
    limit: Duration,
    future: impl Future<Output = T>,
) -> Result<T, ChainError> {
    tokio::time::timeout(limit, future)
        .await
        .map_err(|_| ChainError::Timeout {
            call: call.to_owned(),
            after_ms: duration_ms(limit),
        })
}

/// Parses an SS58 address into its 32-byte account.
fn parse_ss58(address: &str) -> Result<[u8; 32], String> {
    AccountId32::from_str(address)
        .map(|account| account.0)
        .map_err(|error| {
            format!("standing.hotkey_ss58: {address:?} is not a valid SS58 address ({error}); use the hotkey's public address, e.g. from `btcli wallet overview`")
        })
}

/// Checks that `url` is a WebSocket URL with a host.
fn validate_endpoint(field: &str, url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("wss://"));
    match rest {
        Some(rest) if !rest.is_empty() && !rest.starts_with('/') => Ok(()),
        Some(_) => Err(format!(
            "{field}: {url:?} has no host; e.g. ws://127.0.0.1:9944"
        )),
        None => Err(format!(
            "{field}: {url:?} must start with ws:// or wss://; e.g. ws://127.0.0.1:9944"
        )),
    }
}

/// Milliseconds of `duration`, saturating.
fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Locks the snapshot; a panic elsewhere while it was held does not make it unusable (every
/// update leaves it consistent).
fn lock(snapshot: &Mutex<Snapshot>) -> MutexGuard<'_, Snapshot> {
    snapshot.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Remembers when the best block number last changed.
#[derive(Debug, Clone)]
struct HeadTracker {
    /// The latest best block number seen.
    best: Option<u64>,
    /// When it last changed (or when tracking started, before any observation).
    changed_at: Instant,
}

impl HeadTracker {
    /// A tracker that has seen nothing since `start`.
    fn new(start: Instant) -> Self {
        Self {
            best: None,
            changed_at: start,
        }
    }

    /// Records that the best block was `number` at `at`; returns whether it changed.
    fn observe(&mut self, number: u64, at: Instant) -> bool {
        if self.best == Some(number) {
            return false;
        }
        self.best = Some(number);
        self.changed_at = at;
        true
    }

    /// The latest best block number seen.
    fn best(&self) -> Option<u64> {
        self.best
    }

    /// Time since the best block number last changed.
    fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.changed_at)
    }
}

/// `best - last_update`, or 0 when the node is behind the reading.
fn blocks_since(best: u64, last_update: u64) -> u64 {
    best.saturating_sub(last_update)
}

/// The subnet-wide storage the standing is taken from, as decoded. Vectors are indexed by UID;
/// they are left empty when the hotkey has no UID.
#[derive(Debug, Clone, Default, PartialEq)]
struct SubnetState {
    /// `LastUpdate`: block of each UID's last accepted weights.
    last_update: Vec<u64>,
    /// `Emission` in rao.
    emission: Vec<u64>,
    /// `ValidatorTrust` as u16 shares.
    validator_trust: Vec<u16>,
    /// `ValidatorPermit`.
    validator_permit: Vec<bool>,
    /// `Active`.
    active: Vec<bool>,
    /// `WeightsSetRateLimit` in blocks.
    weights_set_rate_limit: u64,
    /// `ActivityCutoff` in blocks.
    activity_cutoff: u16,
    /// `Tempo` in blocks.
    tempo: u16,
}

/// The element of a per-UID vector, or its default when the vector is shorter.
fn by_uid<T: Copy + Default>(values: &[T], uid: u16) -> T {
    values.get(usize::from(uid)).copied().unwrap_or_default()
}

/// Builds the standing of `target` from the decoded storage: `uid` is `Uids[netuid][hotkey]`
/// (`None`: not registered), read at `read_at_block`, with `best` the latest best block.
fn standing_from(
    target: &StandingTarget,
    uid: Option<u16>,
    subnet: &SubnetState,
    read_at_block: u64,
    best: u64,
) -> ValidatorStanding {
    let mut standing = ValidatorStanding {
        hotkey_ss58: target.hotkey_ss58.clone(),
        netuid: u32::from(target.netuid),
        weights_set_rate_limit_blocks: subnet.weights_set_rate_limit,
        activity_cutoff_blocks: u32::from(subnet.activity_cutoff),
        tempo_blocks: u32::from(subnet.tempo),
        read_at_block,
        ..ValidatorStanding::default()
    };
    if let Some(uid) = uid {
        let last_update = by_uid(&subnet.last_update, uid);
        let trust = by_uid(&subnet.validator_trust, uid);
        standing.registered = true;
        standing.uid = u32::from(uid);
        standing.last_update_block = last_update;
        standing.blocks_since_last_update = blocks_since(best, last_update);
        standing.validator_permit = by_uid(&subnet.validator_permit, uid);
        standing.validator_trust_raw = u32::from(trust);
        standing.validator_trust_ratio = f64::from(trust) / TRUST_SCALE;
        standing.emission_rao = by_uid(&subnet.emission, uid);
        standing.active = by_uid(&subnet.active, uid);
    }
    standing
}

/// How long to wait before reconnect attempt number `failures` (1-based): one interval, doubling,
/// capped at [`MAX_RECONNECT_BACKOFF`] (or at the interval, when that is longer).
fn reconnect_backoff(interval: Duration, failures: u32) -> Duration {
    let cap = MAX_RECONNECT_BACKOFF.max(interval);
    let factor = 1_u32 << failures.saturating_sub(1).min(16);
    interval.saturating_mul(factor).min(cap)
}

/// What `sample()` reads: the latest sample and the head tracker that stamps its age.
#[derive(Debug)]
struct Snapshot {
    /// The latest state; `head_age_ms` and `blocks_since_last_update` are filled in by [`Self::view`].
    sample: ChainSample,
    /// When the best block last changed.
    head: HeadTracker,
    /// Whether a round has finished (published a reading or a failure): before that the
    /// sample says nothing true about the node, not even that it is unresponsive.
    answered: bool,
}

impl Snapshot {
    /// The snapshot before the first round.
    fn new(settings: &ChainSettings, start: Instant) -> Self {
        Self {
            sample: ChainSample {
                endpoint: settings.endpoint.clone(),
                error: NOT_YET.to_owned(),
                references: settings
                    .references
                    .iter()
                    .map(|endpoint| ReferenceTip {
                        endpoint: endpoint.clone(),
                        error: NOT_YET.to_owned(),
                        ..ReferenceTip::default()
                    })
                    .collect(),
                ..ChainSample::default()
            },
            head: HeadTracker::new(start),
            answered: false,
        }
    }

    /// The sample as of `now`.
    fn view(&self, now: Instant) -> ChainSample {
        let mut sample = self.sample.clone();
        sample.head_age_ms = duration_ms(self.head.age(now));
        if let Some(standing) = sample.standing.as_mut()
            && standing.registered
        {
            standing.blocks_since_last_update =
                blocks_since(sample.best_block, standing.last_update_block);
        }
        sample
    }

    /// Records a best block number. A polled number is taken when no subscription delivers heads,
    /// or when it is ahead of them (a subscription that silently stalled); otherwise the
    /// subscription, which sees every head as it comes, is trusted.
    fn observe_best(&mut self, number: u64, at: Instant, from_subscription: bool) {
        let take = from_subscription
            || !self.sample.head_subscribed
            || self.head.best().is_none_or(|best| number > best);
        if take {
            self.head.observe(number, at);
            self.sample.best_block = number;
        }
    }
}

/// One open connection to a node.
struct Connection {
    /// The raw client, for calls subxt does not wrap (`system_syncState`).
    rpc: RpcClient,
    /// Typed legacy RPC methods over `rpc`.
    methods: LegacyRpcMethods<Rpc>,
    /// The storage client, built on first use (it fetches the genesis hash, then metadata).
    online: Option<OnlineClient<PolkadotConfig>>,
    /// The new-heads subscription, while it delivers.
    heads: Option<RpcSubscription<Header>>,
    /// False once the node refused the subscription: it is not asked again on this connection.
    subscription_supported: bool,
}

/// A connection to one endpoint that is re-opened after failures, with a backoff.
struct Link {
    /// The endpoint.
    endpoint: String,
    /// Whether to keep a new-heads subscription open.
    subscribe_heads: bool,
    /// The open connection, if any.
    conn: Option<Connection>,
    /// Consecutive failed rounds.
    failures: u32,
    /// No reconnect attempt before this.
    retry_at: Option<Instant>,
    /// Why the last attempt failed (reported while waiting to retry).
    last_error: Option<ChainError>,
    /// Whether a connection was ever opened.
    ever_connected: bool,
    /// Connections opened after the first.
    reconnects_total: u64,
}

impl Link {
    /// A link that has not connected yet.
    fn new(endpoint: String, subscribe_heads: bool) -> Self {
        Self {
            endpoint,
            subscribe_heads,
            conn: None,
            failures: 0,
            retry_at: None,
            last_error: None,
            ever_connected: false,
            reconnects_total: 0,
        }
    }

    /// The open connection, opening one if the backoff allows.
    async fn ensure(
        &mut self,
        limit: Duration,
        interval: Duration,
        started: Instant,
    ) -> Result<&mut Connection, ChainError> {
        if self.conn.is_none() {
            if let Some(retry_at) = self.retry_at
                && started < retry_at
                && let Some(error) = &self.last_error
            {
                return Err(error.clone());
            }
            let connected = within(
                "connect",
                limit,
                RpcClient::from_insecure_url(&self.endpoint),
            )
            .await
            .and_then(|result| {
                result.map_err(|error| ChainError::Connect {
                    endpoint: self.endpoint.clone(),
                    detail: client_detail(&error),
                })
            });
            let rpc = match connected {
                Ok(rpc) => rpc,
                Err(error) => {
                    self.fail(&error, interval, started);
                    return Err(error);
                }
            };
            if self.ever_connected {
                self.reconnects_total += 1;
            }
            self.ever_connected = true;
            self.conn = Some(Connection {
                methods: LegacyRpcMethods::new(rpc.clone()),
                rpc,
                online: None,
                heads: None,
                subscription_supported: true,
            });
        }
        let subscribe = self.subscribe_heads;
        let conn = self.conn.as_mut().ok_or_else(|| ChainError::Transport {
            call: "connect".to_owned(),
            detail: "no connection".to_owned(),
        })?;
        if subscribe && conn.heads.is_none() && conn.subscription_supported {
            match within(
                "chain_subscribeNewHeads",
                limit,
                conn.methods.chain_subscribe_new_heads(),
            )
            .await
            .and_then(|result| result.map_err(|e| ChainError::rpc("chain_subscribeNewHeads", e)))
            {
                Ok(heads) => conn.heads = Some(heads),
                Err(error) if error.drops_connection() => {
                    self.fail(&error, interval, started);
                    return Err(error);
                }
                Err(error) => {
                    tracing::debug!(error = %error, "new-heads subscription refused; polling");
                    conn.subscription_supported = false;
                }
            }
        }
        self.conn.as_mut().ok_or_else(|| ChainError::Transport {
            call: "connect".to_owned(),
            detail: "no connection".to_owned(),
        })
    }

    /// Records a failed round; a failure that breaks the connection drops it and schedules the
    /// reconnect.
    fn fail(&mut self, error: &ChainError, interval: Duration, started: Instant) {
        if !error.drops_connection() {
            return;
        }
        self.conn = None;
        self.failures = self.failures.saturating_add(1);
        self.retry_at = Some(started + reconnect_backoff(interval, self.failures));
        self.last_error = Some(error.clone());
    }

    /// Records a successful round.
    fn succeed(&mut self) {
        self.failures = 0;
        self.retry_at = None;
        self.last_error = None;
    }

    /// Whether heads currently come from a subscription.
    fn head_subscribed(&self) -> bool {
        self.conn.as_ref().is_some_and(|conn| conn.heads.is_some())
    }

    /// One round against the local node.
    async fn read_node(
        &mut self,
        limit: Duration,
        interval: Duration,
        started: Instant,
    ) -> Result<NodeReading, ChainError> {
        let conn = self.ensure(limit, interval, started).await?;
        let result = read_node(&conn.rpc, &conn.methods, limit).await;
        match &result {
            Ok(_) => self.succeed(),
            Err(error) => self.fail(error, interval, started),
        }
        result
    }

    /// One round against a reference endpoint: its best block number.
    async fn read_best(
        &mut self,
        limit: Duration,
        interval: Duration,
        started: Instant,
    ) -> Result<u64, ChainError> {
        let conn = self.ensure(limit, interval, started).await?;
        let result = best_number(&conn.methods, limit).await;
        match &result {
            Ok(_) => self.succeed(),
            Err(error) => self.fail(error, interval, started),
        }
        result
    }

    /// Reads the standing of `target` at the node's current (finalized) block.
    async fn read_standing(
        &mut self,
        target: &StandingTarget,
        account: [u8; 32],
        best: u64,
        limit: Duration,
    ) -> Result<ValidatorStanding, ChainError> {
        let conn = self.conn.as_mut().ok_or_else(|| ChainError::Transport {
            call: "storage".to_owned(),
            detail: "not connected".to_owned(),
        })?;
        let online = match &conn.online {
            Some(online) => online.clone(),
            None => {
                let backend =
                    Arc::new(LegacyBackend::<PolkadotConfig>::builder().build(conn.rpc.clone()));
                let online = within("genesis hash", limit, OnlineClient::from_backend(backend))
                    .await?
                    .map_err(|error| ChainError::call("genesis hash", error))?;
                conn.online = Some(online.clone());
                online
            }
        };
        read_standing(&online, target, account, best, limit).await
    }
}

/// What one round read from the local node.
#[derive(Debug, Clone, PartialEq)]
struct NodeReading {
    /// `system_health`.
    peers: u32,
    /// `system_health`.
    is_syncing: bool,
    /// `system_health`.
    should_have_peers: bool,
    /// Round trip of `system_health`.
    latency_ms: f64,
    /// `system_syncState`.
    sync: SyncState,
    /// Number of the best header.
    best: u64,
    /// Number of the finalized head.
    finalized: u64,
    /// `state_getRuntimeVersion`.
    spec_version: u32,
    /// `state_getRuntimeVersion`.
    transaction_version: u32,
}

/// `system_syncState` as a node returns it (plain JSON numbers; `highestBlock` is null while
/// the node knows no peer's best block).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct SyncState {
    /// Block the node started syncing from.
    starting_block: u64,
    /// The node's best block.
    current_block: u64,
    /// The best block its peers announce.
    #[serde(default)]
    highest_block: Option<u64>,
}

/// Reads the local node's state; every call is bounded by `limit`.
async fn read_node(
    rpc: &RpcClient,
    methods: &LegacyRpcMethods<Rpc>,
    limit: Duration,
) -> Result<NodeReading, ChainError> {
    let asked = Instant::now();
    let health = within("system_health", limit, methods.system_health())
        .await?
        .map_err(|e| ChainError::rpc("system_health", e))?;
    let latency = asked.elapsed();
    let sync: SyncState = within(
        "system_syncState",
        limit,
        rpc.request("system_syncState", RpcParams::new()),
    )
    .await?
    .map_err(|e| ChainError::rpc("system_syncState", e))?;
    let best = best_number(methods, limit).await?;
    let finalized_hash = within(
        "chain_getFinalizedHead",
        limit,
        methods.chain_get_finalized_head(),
    )
    .await?
    .map_err(|e| ChainError::rpc("chain_getFinalizedHead", e))?;
    let finalized = within(
        "chain_getHeader",
        limit,
        methods.chain_get_header(Some(finalized_hash)),
    )
    .await?
    .map_err(|e| ChainError::rpc("chain_getHeader", e))?
    .ok_or_else(|| ChainError::call("chain_getHeader", "no header for the finalized head"))?
    .number;
    let version = within(
        "state_getRuntimeVersion",
        limit,
        methods.state_get_runtime_version(None),
    )
    .await?
    .map_err(|e| ChainError::rpc("state_getRuntimeVersion", e))?;
    Ok(NodeReading {
        peers: u32::try_from(health.peers).unwrap_or(u32::MAX),
        is_syncing: health.is_syncing,
        should_have_peers: health.should_have_peers,
        latency_ms: latency.as_secs_f64() * 1000.0,
        sync,
        best,
        finalized,
        spec_version: version.spec_version,
        transaction_version: version.transaction_version,
    })
}

/// The number of the node's best header.
async fn best_number(methods: &LegacyRpcMethods<Rpc>, limit: Duration) -> Result<u64, ChainError> {
    within("chain_getHeader", limit, methods.chain_get_header(None))
        .await?
        .map_err(|e| ChainError::rpc("chain_getHeader", e))?
        .map(|header| header.number)
        .ok_or_else(|| ChainError::call("chain_getHeader", "no best header"))
}

/// Fetches one storage value (its default when absent and the item has one; `None` when absent
/// without a default), bounded by `limit`.
async fn fetch<A: Address>(
    at: &OnlineClientAtBlock<PolkadotConfig>,
    address: A,
    keys: A::KeyParts,
    limit: Duration,
) -> Result<Option<A::Value>, ChainError> {
    let item = address.entry_name().to_owned();
    let value = within(&item, limit, at.storage().try_fetch(address, keys))
        .await?
        .map_err(|error| ChainError::call(&item, error))?;
    value
        .map(|value| value.decode())
        .transpose()
        .map_err(|error| ChainError::call(&item, error))
}

/// Fetches a storage value that has a default (every item but `Uids`).
async fn fetch_value<A: Address>(
    at: &OnlineClientAtBlock<PolkadotConfig>,
    address: A,
    keys: A::KeyParts,
    limit: Duration,
) -> Result<A::Value, ChainError> {
    let item = address.entry_name().to_owned();
    fetch(at, address, keys, limit)
        .await?
        .ok_or_else(|| ChainError::call(&item, "no value and no default"))
}

/// Reads the standing through subxt's dynamic storage API at the node's current block.
async fn read_standing(
    online: &OnlineClient<PolkadotConfig>,
    target: &StandingTarget,
    account: [u8; 32],
    best: u64,
    limit: Duration,
) -> Result<ValidatorStanding, ChainError> {
    use subxt::dynamic::storage;

    let at = within("at_current_block", limit, online.at_current_block())
        .await?
        .map_err(|error| ChainError::call("at_current_block", error))?;
    let netuid = target.netuid;
    let uid = fetch(
        &at,
        storage::<(u16, [u8; 32]), u16>(PALLET, "Uids"),
        (netuid, account),
        limit,
    )
    .await?;
    let mut subnet = SubnetState {
        weights_set_rate_limit: fetch_value(
            &at,
            storage::<(u16,), u64>(PALLET, "WeightsSetRateLimit"),
            (netuid,),
            limit,
        )
        .await?,
        activity_cutoff: fetch_value(
            &at,
            storage::<(u16,), u16>(PALLET, "ActivityCutoff"),
            (netuid,),
            limit,
        )
        .await?,
        tempo: fetch_value(
            &at,
            storage::<(u16,), u16>(PALLET, "Tempo"),
            (netuid,),
            limit,
        )
        .await?,
        ..SubnetState::default()
    };
    if uid.is_some() {
        subnet.last_update = fetch_value(
            &at,
            storage::<(u16,), Vec<u64>>(PALLET, "LastUpdate"),
            (netuid,),
            limit,
        )
        .await?;
        subnet.emission = fetch_value(
            &at,
            storage::<(u16,), Vec<u64>>(PALLET, "Emission"),
            (netuid,),
            limit,
        )
        .await?;
        subnet.validator_trust = fetch_value(
            &at,
            storage::<(u16,), Vec<u16>>(PALLET, "ValidatorTrust"),
            (netuid,),
            limit,
        )
        .await?;
        subnet.validator_permit = fetch_value(
            &at,
            storage::<(u16,), Vec<bool>>(PALLET, "ValidatorPermit"),
            (netuid,),
            limit,
        )
        .await?;
        subnet.active = fetch_value(
            &at,
            storage::<(u16,), Vec<bool>>(PALLET, "Active"),
            (netuid,),
            limit,
        )
        .await?;
    }
    Ok(standing_from(target, uid, &subnet, at.block_number(), best))
}

/// A reference endpoint and what was last logged about it.
struct Reference {
    /// Its connection.
    link: Link,
    /// Whether it answered last round (`None` before the first).
    was_responsive: Option<bool>,
}

impl Reference {
    /// Reads its best block; logs when it starts or stops answering.
    async fn poll(
        &mut self,
        limit: Duration,
        interval: Duration,
        started: Instant,
    ) -> Result<u64, ChainError> {
        let result = self.link.read_best(limit, interval, started).await;
        let responsive = result.is_ok();
        if self.was_responsive != Some(responsive) {
            match &result {
                Ok(best) => {
                    tracing::info!(reference = %self.link.endpoint, best, "ChainReferenceResponsive")
                }
                Err(error) => tracing::warn!(
                    reference = %self.link.endpoint,
                    error = %error,
                    kind = error.kind(),
                    "ChainReferenceUnresponsive"
                ),
            }
            self.was_responsive = Some(responsive);
        }
        result
    }
}

/// Standing bookkeeping.
struct StandingJob {
    /// The validator.
    target: StandingTarget,
    /// Its hotkey's account.
    account: [u8; 32],
    /// Cadence in blocks.
    every: u64,
    /// Best block when the standing was last attempted (success or an answered failure).
    last_attempt_best: Option<u64>,
    /// The runtime changed since the last successful reading.
    spec_changed: bool,
    /// The last `spec_version` seen.
    last_spec: Option<u32>,
    /// Whether the last attempt succeeded (`None` before the first), for transition logs.
    was_available: Option<bool>,
}

/// What the main loop woke up for.
enum Wake {
    /// Shutdown.
    Stop,
    /// Time for a round.
    Tick,
    /// A new-heads notification, an error, or the end of the subscription.
    Head(Option<Result<Header, subxt::rpcs::Error>>),
}

/// The background task's state.
struct Task {
    /// The settings.
    settings: ChainSettings,
    /// What `sample()` reads.
    snapshot: Arc<Mutex<Snapshot>>,
    /// The local node.
    node: Link,
    /// The reference endpoints.
    references: Vec<Reference>,
    /// Standing, when configured with a valid hotkey.
    standing: Option<StandingJob>,
    /// Error kind last logged for the node (`Some(None)`: responsive), for transition logs.
    logged_state: Option<Option<&'static str>>,
    /// Whether heads were subscribed when last logged.
    logged_subscribed: Option<bool>,
}

impl Task {
    /// The task for `settings`, publishing into `snapshot`.
    fn new(settings: ChainSettings, snapshot: Arc<Mutex<Snapshot>>) -> Self {
        let standing = settings.standing.as_ref().and_then(|target| {
            match parse_ss58(&target.hotkey_ss58) {
                Ok(account) => Some(StandingJob {
                    target: target.clone(),
                    account,
                    every: settings.standing_every_blocks.max(1),
                    last_attempt_best: None,
                    spec_changed: false,
                    last_spec: None,
                    was_available: None,
                }),
                Err(reason) => {
                    tracing::warn!(reason = %reason, "ChainStandingUnavailable: standing disabled");
                    None
                }
            }
        });
        Self {
            node: Link::new(settings.endpoint.clone(), true),
            references: settings
                .references
                .iter()
                .map(|endpoint| Reference {
                    link: Link::new(endpoint.clone(), false),
                    was_responsive: None,
                })
                .collect(),
            standing,
            snapshot,
            settings,
            logged_state: None,
            logged_subscribed: None,
        }
    }

    /// Runs rounds until `shutdown`, handling new heads in between.
    async fn run(mut self, shutdown: CancellationToken) {
        let mut ticker =
            tokio::time::interval(self.settings.interval.max(Duration::from_millis(1)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wake = tokio::select! {
                () = shutdown.cancelled() => Wake::Stop,
                _ = ticker.tick() => Wake::Tick,
                head = next_head(&mut self.node) => Wake::Head(head),
            };
            match wake {
                Wake::Stop => break,
                Wake::Tick => {
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = self.round() => {}
                    }
                }
                Wake::Head(head) => self.on_head(head),
            }
        }
        tracing::debug!("chain sampler stopped");
    }

    /// Handles one event of the new-heads subscription.
    fn on_head(&mut self, head: Option<Result<Header, subxt::rpcs::Error>>) {
        match head {
            Some(Ok(header)) => {
                lock(&self.snapshot).observe_best(header.number, Instant::now(), true);
            }
            Some(Err(error)) => {
                tracing::debug!(error = %error, "new-heads subscription failed; polling");
                self.end_subscription();
            }
            None => self.end_subscription(),
        }
    }

    /// Falls back to polling after the subscription ended or failed.
    fn end_subscription(&mut self) {
        if let Some(conn) = self.node.conn.as_mut() {
            conn.heads = None;
        }
        lock(&self.snapshot).sample.head_subscribed = false;
        self.log_subscription();
    }

    /// One round: node and references concurrently, then the standing if due.
    async fn round(&mut self) {
        let started = Instant::now();
        let limit = self.settings.call_timeout;
        let interval = self.settings.interval;
        let references = subxt::ext::futures::future::join_all(
            self.references
                .iter_mut()
                .map(|reference| reference.poll(limit, interval, started)),
        );
        let (node, tips) = tokio::join!(self.node.read_node(limit, interval, started), references);
        {
            let mut snapshot = lock(&self.snapshot);
            for (tip, result) in snapshot.sample.references.iter_mut().zip(tips) {
                match result {
                    Ok(best) => {
                        tip.responsive = true;
                        tip.best_block = best;
                        tip.error.clear();
                    }
                    Err(error) => {
                        tip.responsive = false;
                        tip.error = error.to_string();
                    }
                }
            }
        }
        let reading = match node {
            Ok(reading) => reading,
            Err(error) => {
                self.publish_failure(&error);
                return;
            }
        };
        self.publish(&reading);
        if let Err(error) = self.maybe_read_standing(&reading).await {
            // Only a broken connection gets here: the node stopped answering mid-round.
            self.node.fail(&error, interval, started);
            self.publish_failure(&error);
        }
    }

    /// Publishes a successful node reading.
    fn publish(&mut self, reading: &NodeReading) {
        let subscribed = self.node.head_subscribed();
        {
            let mut snapshot = lock(&self.snapshot);
            snapshot.sample.head_subscribed = subscribed;
            snapshot.observe_best(reading.best, Instant::now(), false);
            snapshot.answered = true;
            let sample = &mut snapshot.sample;
            sample.responsive = true;
            sample.error.clear();
            sample.finalized_block = reading.finalized;
            sample.sync_current_block = reading.sync.current_block;
            sample.sync_highest_block = reading.sync.highest_block.unwrap_or_default();
            sample.sync_starting_block = reading.sync.starting_block;
            sample.peers = reading.peers;
            sample.is_syncing = reading.is_syncing;
            sample.should_have_peers = reading.should_have_peers;
            sample.rpc_latency_ms = reading.latency_ms;
            sample.spec_version = reading.spec_version;
            sample.transaction_version = reading.transaction_version;
            sample.reconnects_total = self.node.reconnects_total;
        }
        if self.logged_state != Some(None) {
            tracing::info!(
                best = reading.best,
                finalized = reading.finalized,
                peers = reading.peers,
                spec_version = reading.spec_version,
                "ChainResponsive"
            );
            self.logged_state = Some(None);
        }
        self.log_subscription();
    }

    /// Publishes why the node could not be read; the last known numbers stay.
    fn publish_failure(&mut self, error: &ChainError) {
        let subscribed = self.node.head_subscribed();
        {
            let mut snapshot = lock(&self.snapshot);
            snapshot.answered = true;
            snapshot.sample.responsive = false;
            snapshot.sample.error = error.to_string();
            snapshot.sample.head_subscribed = subscribed;
            snapshot.sample.reconnects_total = self.node.reconnects_total;
        }
        if self.logged_state != Some(Some(error.kind())) {
            tracing::warn!(error = %error, kind = error.kind(), "ChainUnresponsive");
            self.logged_state = Some(Some(error.kind()));
        }
        self.log_subscription();
    }

    /// Logs a change of the head source.
    fn log_subscription(&mut self) {
        let subscribed = self.node.head_subscribed();
        if self.logged_subscribed == Some(subscribed) {
            return;
        }
        if subscribed {
            tracing::info!("ChainHeadSubscribed");
        } else if self.logged_subscribed.is_some() || self.node.conn.is_some() {
            tracing::info!(
                "ChainHeadPolling: no new-heads subscription; polling the best header each interval"
            );
        }
        self.logged_subscribed = Some(subscribed);
    }

    /// Reads the standing when it is due.
    ///
    /// # Errors
    /// Only errors that break the connection (a timeout); anything else is logged, kept out of
    /// `responsive`, and retried on the normal cadence.
    async fn maybe_read_standing(&mut self, reading: &NodeReading) -> Result<(), ChainError> {
        let Some(job) = self.standing.as_mut() else {
            return Ok(());
        };
        if job
            .last_spec
            .is_some_and(|spec| spec != reading.spec_version)
        {
            job.spec_changed = true;
        }
        job.last_spec = Some(reading.spec_version);
        if !should_read_standing(
            job.last_attempt_best,
            reading.best,
            job.spec_changed,
            job.every,
        ) {
            return Ok(());
        }
        let result = self
            .node
            .read_standing(
                &job.target,
                job.account,
                reading.best,
                self.settings.call_timeout,
            )
            .await;
        match result {
            Ok(standing) => {
                job.last_attempt_best = Some(reading.best);
                job.spec_changed = false;
                tracing::debug!(
                    registered = standing.registered,
                    uid = standing.uid,
                    read_at_block = standing.read_at_block,
                    "ChainStandingRead"
                );
                if job.was_available != Some(true) {
                    tracing::info!(
                        netuid = standing.netuid,
                        registered = standing.registered,
                        "ChainStandingAvailable"
                    );
                    job.was_available = Some(true);
                }
                lock(&self.snapshot).sample.standing = Some(standing);
                Ok(())
            }
            Err(error) if error.drops_connection() => Err(error),
            Err(error) => {
                job.last_attempt_best = Some(reading.best);
                if job.was_available != Some(false) {
                    tracing::warn!(error = %error, kind = error.kind(), "ChainStandingUnavailable");
                    job.was_available = Some(false);
                }
                Ok(())
            }
        }
    }
}

/// The next new-heads event, or never when there is no subscription.
async fn next_head(link: &mut Link) -> Option<Result<Header, subxt::rpcs::Error>> {
    match link.conn.as_mut().and_then(|conn| conn.heads.as_mut()) {
        Some(heads) => heads.next().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: &str = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY";

    fn target() -> StandingTarget {
        StandingTarget {
            hotkey_ss58: ALICE.to_owned(),
            netuid: 1,
        }
    }

    fn chain(kind: Result<sample::Kind, SampleError>) -> ChainSample {
        match kind {
            Ok(sample::Kind::Chain(chain)) => chain,
            other => panic!("expected a chain sample, got {other:?}"),
        }
    }

    #[test]
    fn alice_is_a_valid_hotkey() {
        assert_eq!(target().validate(), Ok(()));
        let account = parse_ss58(ALICE).expect("valid");
        // Alice's sr25519 public key.
        assert_eq!(account[..4], [0xd4, 0x35, 0x93, 0xc7]);
    }

    #[test]
    fn hotkey_with_a_bad_checksum_is_refused() {
        let mut bad = ALICE.to_owned();
        bad.pop();
        bad.push('Z');
        let error = StandingTarget {
            hotkey_ss58: bad,
            netuid: 1,
        }
        .validate()
        .expect_err("bad checksum");
        assert!(error.starts_with("standing.hotkey_ss58: "), "{error}");
        assert!(error.to_lowercase().contains("checksum"), "{error}");
    }

    #[test]
    fn hotkey_of_the_wrong_length_is_refused() {
        for address in [&ALICE[..ALICE.len() - 1], &ALICE[..20], "", "5Grw0OIl"] {
            let error = StandingTarget {
                hotkey_ss58: address.to_owned(),
                netuid: 1,
            }
            .validate()
            .expect_err(address);
            assert!(error.starts_with("standing.hotkey_ss58: "), "{error}");
        }
        let mut long = ALICE.to_owned();
        long.push('1');
        assert!(parse_ss58(&long).is_err());
    }

    #[test]
    fn settings_validation_names_the_field() {
        let mut settings = ChainSettings {
            standing: Some(target()),
            references: vec!["wss://archive.chain.opentensor.ai:443".to_owned()],
            ..ChainSettings::default()
        };
        assert_eq!(settings.validate(), Ok(()));
        settings.endpoint = "http://127.0.0.1:9944".to_owned();
        let error = settings.validate().expect_err("http");
        assert!(error.starts_with("endpoint: "), "{error}");
        settings.endpoint = "ws://".to_owned();
        assert!(settings.validate().is_err());
        settings.endpoint = "ws://127.0.0.1:9944".to_owned();
        settings.references.push("127.0.0.1:9944".to_owned());
        let error = settings.validate().expect_err("no scheme");
        assert!(error.starts_with("references[1]: "), "{error}");
        settings.references.pop();
        settings.call_timeout = Duration::from_secs(60);
        let error = settings.validate().expect_err("timeout > interval");
        assert!(error.starts_with("call_timeout: "), "{error}");
        settings.call_timeout = Duration::from_secs(2);
        settings.standing_every_blocks = 0;
        assert!(settings.validate().is_err());
        settings.standing_every_blocks = 25;
        settings.standing = Some(StandingTarget {
            hotkey_ss58: "not-an-address".to_owned(),
            netuid: 1,
        });
        let error = settings.validate().expect_err("hotkey");
        assert!(error.starts_with("standing.hotkey_ss58: "), "{error}");
    }

    #[test]
    fn head_age_counts_from_the_last_change_of_the_best_number() {
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let mut head = HeadTracker::new(start);
        assert_eq!(head.best(), None);
        assert_eq!(
            head.age(at(500)),
            Duration::from_millis(500),
            "no head seen yet"
        );
        assert!(head.observe(100, at(1_000)));
        assert_eq!(head.age(at(1_000)), Duration::ZERO);
        assert!(!head.observe(100, at(13_000)), "same number is no change");
        assert_eq!(head.age(at(25_000)), Duration::from_secs(24));
        assert!(head.observe(101, at(25_000)));
        assert_eq!(head.age(at(26_000)), Duration::from_secs(1));
        assert!(
            head.observe(99, at(27_000)),
            "a reorg to a lower number is a change"
        );
        assert_eq!(head.best(), Some(99));
        assert_eq!(
            head.age(at(26_000)),
            Duration::ZERO,
            "monotonic: never negative"
        );
    }

    #[test]
    fn polled_best_behind_the_subscription_is_ignored() {
        let start = Instant::now();
        let mut snapshot = Snapshot::new(&ChainSettings::default(), start);
        snapshot.sample.head_subscribed = true;
        snapshot.observe_best(10, start, true);
        snapshot.observe_best(9, start + Duration::from_secs(1), false);
        assert_eq!(snapshot.sample.best_block, 10);
        assert_eq!(
            snapshot.head.age(start + Duration::from_secs(2)),
            Duration::from_secs(2)
        );
        // A stalled subscription: polling is ahead, so it is taken.
        snapshot.observe_best(12, start + Duration::from_secs(3), false);
        assert_eq!(snapshot.sample.best_block, 12);
        snapshot.sample.head_subscribed = false;
        snapshot.observe_best(11, start + Duration::from_secs(4), false);
        assert_eq!(
            snapshot.sample.best_block, 11,
            "polling only: every answer counts"
        );
    }

    fn subnet() -> SubnetState {
        SubnetState {
            last_update: vec![90, 4_000, 950],
            emission: vec![1, 2_000_000, 3],
            validator_trust: vec![0, 65_535, 32_768],
            validator_permit: vec![false, true, false],
            active: vec![false, true, true],
            weights_set_rate_limit: 100,
            activity_cutoff: 5_000,
            tempo: 360,
        }
    }

    #[test]
    fn standing_is_indexed_by_uid() {
        let standing = standing_from(&target(), Some(1), &subnet(), 4_998, 5_000);
        assert_eq!(
            standing,
            ValidatorStanding {
                hotkey_ss58: ALICE.to_owned(),
                netuid: 1,
                registered: true,
                uid: 1,
                last_update_block: 4_000,
                blocks_since_last_update: 1_000,
                validator_permit: true,
                validator_trust_raw: 65_535,
                validator_trust_ratio: 1.0,
                emission_rao: 2_000_000,
                active: true,
                weights_set_rate_limit_blocks: 100,
                activity_cutoff_blocks: 5_000,
                tempo_blocks: 360,
                read_at_block: 4_998,
            }
        );
        let half = standing_from(&target(), Some(2), &subnet(), 4_998, 5_000);
        assert!((half.validator_trust_ratio - 32_768.0 / 65_535.0).abs() < 1e-12);
    }

    #[test]
    fn uid_past_the_end_of_a_vector_reads_defaults() {
        let mut state = subnet();
        state.emission.truncate(1);
        state.active.clear();
        let standing = standing_from(&target(), Some(2), &state, 1_000, 1_000);
        assert!(standing.registered);
        assert_eq!(standing.last_update_block, 950);
        assert_eq!(standing.emission_rao, 0);
        assert!(!standing.active);
        let beyond = standing_from(&target(), Some(7), &state, 1_000, 1_000);
        assert_eq!(beyond.uid, 7);
        assert_eq!(beyond.last_update_block, 0);
        assert!(!beyond.validator_permit);
    }

    #[test]
    fn unregistered_hotkey_keeps_subnet_parameters() {
        let standing = standing_from(
            &target(),
            None,
            &SubnetState {
                tempo: 360,
                ..SubnetState::default()
            },
            10,
            12,
        );
        assert!(!standing.registered);
        assert_eq!(standing.uid, 0);
        assert_eq!(standing.tempo_blocks, 360);
        assert_eq!(standing.read_at_block, 10);
        assert_eq!(standing.blocks_since_last_update, 0);
    }

    #[test]
    fn blocks_since_last_update_follows_the_latest_best_and_saturates() {
        assert_eq!(blocks_since(100, 40), 60);
        assert_eq!(blocks_since(40, 100), 0);
        let start = Instant::now();
        let mut snapshot = Snapshot::new(&ChainSettings::default(), start);
        snapshot.sample.standing = Some(standing_from(&target(), Some(1), &subnet(), 4_100, 4_100));
        snapshot.observe_best(4_100, start, false);
        let view = snapshot.view(start);
        assert_eq!(
            view.standing.as_ref().map(|s| s.blocks_since_last_update),
            Some(100)
        );
        // No new standing reading, but the head moved on.
        snapshot.observe_best(4_125, start + Duration::from_secs(300), false);
        let view = snapshot.view(start + Duration::from_secs(301));
        assert_eq!(
            view.standing.as_ref().map(|s| s.blocks_since_last_update),
            Some(125)
        );
        assert_eq!(view.head_age_ms, 1_000);
        // The node went back below the last update: 0, not an underflow.
        snapshot.observe_best(3_000, start + Duration::from_secs(302), false);
        let view = snapshot.view(start + Duration::from_secs(302));
        assert_eq!(
            view.standing.as_ref().map(|s| s.blocks_since_last_update),
            Some(0)
        );
    }

    #[test]
    fn standing_cadence() {
        assert!(should_read_standing(None, 0, false, 25), "never read");
        assert!(!should_read_standing(Some(100), 100, false, 25));
        assert!(!should_read_standing(Some(100), 124, false, 25));
        assert!(should_read_standing(Some(100), 125, false, 25));
        assert!(
            should_read_standing(Some(100), 101, true, 25),
            "runtime upgrade"
        );
        assert!(
            should_read_standing(Some(100), 50, false, 25),
            "node went back"
        );
        assert!(should_read_standing(Some(100), 101, false, 1));
    }

    #[test]
    fn reconnect_backoff_doubles_up_to_the_cap() {
        let second = Duration::from_secs(1);
        assert_eq!(reconnect_backoff(second, 1), second);
        assert_eq!(reconnect_backoff(second, 2), 2 * second);
        assert_eq!(reconnect_backoff(second, 4), 8 * second);
        assert_eq!(reconnect_backoff(second, 5), MAX_RECONNECT_BACKOFF);
        assert_eq!(reconnect_backoff(second, u32::MAX), MAX_RECONNECT_BACKOFF);
        let minute = Duration::from_secs(60);
        assert_eq!(
            reconnect_backoff(minute, 3),
            minute,
            "never below one interval"
        );
    }

    #[test]
    fn error_texts_say_why() {
        let timeout = ChainError::Timeout {
            call: "system_health".to_owned(),
            after_ms: 2_000,
        };
        assert_eq!(
            timeout.to_string(),
            "timed out after 2000 ms waiting for system_health"
        );
        assert!(timeout.drops_connection());
        let call = ChainError::call("system_syncState", "Method not found");
        assert_eq!(call.kind(), "call");
        assert!(!call.drops_connection());
        assert_eq!(
            client_detail(&"RPC error: client error: RPC error: client error: Connection refused"),
            "Connection refused"
        );
    }

    /// Polls `sample()` until `done` holds or `deadline` passes; returns the last sample.
    async fn sample_until(
        sampler: &mut ChainSampler,
        deadline: Duration,
        done: impl Fn(&ChainSample) -> bool,
    ) -> ChainSample {
        let until = Instant::now() + deadline;
        loop {
            let sample = chain(sampler.sample());
            if done(&sample) || Instant::now() >= until {
                return sample;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn settings_for(endpoint: String) -> ChainSettings {
        ChainSettings {
            endpoint,
            references: Vec::new(),
            call_timeout: Duration::from_millis(100),
            interval: Duration::from_millis(200),
            standing: Some(target()),
            standing_every_blocks: 25,
        }
    }

    async fn stop(tasks: TaskTracker, shutdown: CancellationToken) {
        shutdown.cancel();
        tasks.close();
        tokio::time::timeout(Duration::from_secs(2), tasks.wait())
            .await
            .expect("the chain task stops on the token");
    }

    #[tokio::test]
    async fn node_that_holds_the_socket_but_never_answers_is_unresponsive() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let tasks = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let mut sampler = ChainSampler::spawn(
            settings_for(format!("ws://{address}")),
            &tasks,
            shutdown.clone(),
        );
        assert_eq!(sampler.name(), "chain");
        let sample = tokio::time::timeout(
            Duration::from_secs(3),
            sample_until(&mut sampler, Duration::from_secs(1), |s| s.error != NOT_YET),
        )
        .await
        .expect("bounded");
        assert!(!sample.responsive, "{sample:?}");
        assert_eq!(sample.endpoint, format!("ws://{address}"));
        assert!(
            sample.error.contains("timed out after 100 ms"),
            "{}",
            sample.error
        );
        assert!(sample.standing.is_none());
        let later = tokio::time::timeout(
            Duration::from_secs(3),
            sample_until(&mut sampler, Duration::from_millis(300), |_| false),
        )
        .await
        .expect("bounded");
        assert!(!later.responsive);
        assert!(
            later.head_age_ms > sample.head_age_ms,
            "head age keeps growing"
        );
        stop(tasks, shutdown).await;
        silent.abort();
    }

    #[tokio::test]
    async fn refused_port_is_unresponsive_with_the_connection_error() {
        let address = {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            listener.local_addr().expect("address")
        };
        let tasks = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let settings = ChainSettings {
            references: vec![format!("ws://{address}")],
            ..settings_for(format!("ws://{address}"))
        };
        let mut sampler = ChainSampler::spawn(settings, &tasks, shutdown.clone());
        let sample = tokio::time::timeout(
            Duration::from_secs(3),
            sample_until(&mut sampler, Duration::from_secs(1), |s| {
                s.error != NOT_YET && s.references.iter().all(|r| r.error != NOT_YET)
            }),
        )
        .await
        .expect("bounded");
        assert!(!sample.responsive, "{sample:?}");
        assert!(
            sample
                .error
                .starts_with(&format!("cannot connect to ws://{address}")),
            "{}",
            sample.error
        );
        assert!(
            sample.error.to_lowercase().contains("refused"),
            "{}",
            sample.error
        );
        assert_eq!(sample.reconnects_total, 0);
        assert_eq!(sample.references.len(), 1);
        assert!(!sample.references[0].responsive);
        assert!(
            sample.references[0].error.starts_with("cannot connect to"),
            "{}",
            sample.references[0].error
        );
        stop(tasks, shutdown).await;
    }

    #[tokio::test]
    async fn no_sample_claims_the_node_unresponsive_before_the_first_round_ends() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let tasks = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let settings = ChainSettings {
            call_timeout: Duration::from_millis(300),
            interval: Duration::from_millis(600),
            ..settings_for(format!("ws://{address}"))
        };
        let started = Instant::now();
        let mut sampler = ChainSampler::spawn(settings, &tasks, shutdown.clone());
        // What the agent's first batch carries, taken right away while the first round waits.
        let first = super::super::take(&mut sampler, 0).kind;
        assert!(
            started.elapsed() < Duration::from_millis(300),
            "too slow to test"
        );
        match &first {
            Some(sample::Kind::Chain(chain)) => assert!(
                chain.responsive,
                "before the first round ends nothing is known, yet the batch says unresponsive: {chain:?}"
            ),
            Some(sample::Kind::Unavailable(why)) => {
                assert_eq!(why.sampler, "chain");
                assert!(why.reason.contains(NOT_YET), "{}", why.reason);
            }
            other => panic!("{other:?}"),
        }
        // A node that does not answer is reported once the first round's call times out.
        let reported = tokio::time::timeout(Duration::from_secs(3), async {
            loop {
                if let Some(sample::Kind::Chain(chain)) = super::super::take(&mut sampler, 0).kind {
                    return chain;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("a chain sample within 3 s");
        assert!(!reported.responsive, "{reported:?}");
        assert!(
            reported.error.contains("timed out after 300 ms"),
            "{}",
            reported.error
        );
        assert!(started.elapsed() >= Duration::from_millis(300));
        stop(tasks, shutdown).await;
        silent.abort();
    }
}
