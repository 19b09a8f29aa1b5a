//! A fake subtensor node: a legacy JSON-RPC chain that subxt 0.51 accepts, one seeded
//! validator's SubtensorModule storage, and switchable faults (lag, frozen head, stalled
//! finality, no peers, hang, restart, runtime upgrade) for tests and the local quickstart.
//!
//! The node serves WebSocket and HTTP JSON-RPC on one port. Blocks carry empty bodies; each
//! block hash is `blake2_256` of the SCALE-encoded header, because subxt hashes headers itself.
//! Metadata is finney spec 393 (V15), recorded from the real chain.
//!
//! Faults are switched in-process through [`FakeNode`] or, from another process, through the
//! admin methods `fake_*` (see [`ADMIN_METHODS`]), which keep answering while the node hangs.
//!
//! # Guarantees
//! Every task the node spawns stops when the node is shut down or dropped: each is tied to one
//! cancellation token, and every connection is cut when the listener stops.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, bail};
use jsonrpsee::RpcModule;
use jsonrpsee::core::SubscriptionResult;
use jsonrpsee::server::middleware::rpc::{Batch, Notification, RpcServiceBuilder, RpcServiceT};
use jsonrpsee::server::{
    PendingSubscriptionSink, ServerHandle, StopHandle, SubscriptionMessage,
    serve_with_graceful_shutdown, stop_channel,
};
use jsonrpsee::types::{ErrorObject, ErrorObjectOwned, Params, Request};
use parity_scale_codec::{Compact, Encode};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sp_crypto_hashing::{blake2_128, blake2_256, twox_128};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// The recorded `state_call("Metadata_metadata_at_version", 0x0f000000)` result from finney
/// spec 393: `0x01` (Some) ++ compact length ++ V15 `RuntimeMetadataPrefixed`.
const METADATA_AT_V15_HEX: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/data/subtensor/finney_spec393_metadata_at_version15_rpc_result.hex.txt"
));

/// Recorded finney RPC answers; the runtime version (apis, transaction version) comes from here.
const RECORDED_RPC_JSON: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/data/subtensor/finney_spec393_recorded_rpc.json"
));

/// Hex of the finney genesis hash, served for `chain_getBlockHash([0])`.
pub const FINNEY_GENESIS_HASH: &str =
    "0x2f0555cc76fc2840a25a6ea3b9637146806f1f44b090c175ffde2a7e5ab36c03";

/// Alice's well-known development account, the default seeded hotkey.
pub const ALICE: [u8; 32] = [
    0xd4, 0x35, 0x93, 0xc7, 0x15, 0xfd, 0xd3, 0x1c, 0x61, 0x14, 0x1a, 0xbd, 0x04, 0xa9, 0x9f, 0xd6,
    0x82, 0x2c, 0x85, 0x58, 0x85, 0x4c, 0xcd, 0xe3, 0x9a, 0x56, 0x84, 0xe7, 0xa5, 0x6d, 0xa2, 0x7d,
];

/// The root of an empty trie: the real extrinsics root of a block without extrinsics.
const EMPTY_TRIE_ROOT: [u8; 32] = [
    0x03, 0x17, 0x0a, 0x2e, 0x75, 0x97, 0xb7, 0xb7, 0xe3, 0xd8, 0x4c, 0x05, 0x39, 0x1d, 0x13, 0x9a,
    0x62, 0xb1, 0x57, 0xe7, 0x87, 0x86, 0xd8, 0xc0, 0x82, 0xf2, 0x9d, 0xcf, 0x4c, 0x11, 0x13, 0x14,
];

/// How many recent headers the node keeps (by number and by hash), besides genesis.
pub const KEPT_HEADERS: usize = 4096;

/// Blocks produced before the first tick, so that `best - 2` (finalized) exists at once.
const PREPRODUCED: u64 = 16;

/// The admin methods, answered even while the node hangs. Each returns [`FakeStatus`].
///
/// `fake_lag [n]`, `fake_freezeHead`, `fake_stallFinality`, `fake_dropPeers`, `fake_setPeers [n]`,
/// `fake_hang`, `fake_restart [down_ms]` (answers first, then restarts), `fake_setSpecVersion [v]`,
/// `fake_setLastUpdate [block]`, `fake_setValidator [ValidatorPatch]`, `fake_heal`, `fake_status`.
pub const ADMIN_METHODS: &[&str] = &[
    "fake_lag",
    "fake_freezeHead",
    "fake_stallFinality",
    "fake_dropPeers",
    "fake_setPeers",
    "fake_hang",
    "fake_restart",
    "fake_setSpecVersion",
    "fake_setLastUpdate",
    "fake_setValidator",
    "fake_heal",
    "fake_status",
];

/// What a fake node serves and how fast it moves.
#[derive(Debug, Clone)]
pub struct FakeNodeConfig {
    /// Where to listen (WebSocket and HTTP on one port). Default `127.0.0.1:0`.
    pub listen: SocketAddr,
    /// Time between blocks. Default 250 ms (tests); the binary defaults to 1 s.
    pub block_interval: Duration,
    /// Best block number at start, so numbers look real. Default 4 000 000.
    pub initial_best: u64,
    /// Peers reported by `system_health` when healthy. Default 12.
    pub peers: u32,
    /// Runtime spec version at start. Default 393 (the recorded metadata's).
    pub spec_version: u32,
    /// The validator whose standing the storage describes.
    pub validator: SeededValidator,
}

impl Default for FakeNodeConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            block_interval: Duration::from_millis(250),
            initial_best: 4_000_000,
            peers: 12,
            spec_version: 393,
            validator: SeededValidator::default(),
        }
    }
}

impl FakeNodeConfig {
    /// Checks the config before any port is bound.
    ///
    /// # Errors
    /// Names the field and the fix.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.block_interval.is_zero() {
            bail!("block_interval is 0: give a positive interval (e.g. 250 ms)");
        }
        if self.initial_best < PREPRODUCED + 2 {
            bail!("initial_best must be at least {}", PREPRODUCED + 2);
        }
        if self.initial_best > u64::from(u32::MAX) / 2 {
            bail!("initial_best must fit a u32 block number with room to grow");
        }
        let v = &self.validator;
        if v.uid >= v.subnet_size {
            bail!(
                "validator.uid ({}) must be below validator.subnet_size ({})",
                v.uid,
                v.subnet_size
            );
        }
        if u64::from(v.subnet_size) > 4096 {
            bail!("validator.subnet_size must be at most 4096");
        }
        if v.last_update_age > self.initial_best {
            bail!("validator.last_update_age must not exceed initial_best");
        }
        if v.set_weights_every == Some(0) {
            bail!("validator.set_weights_every must be positive (or None to never set weights)");
        }
        Ok(())
    }
}

/// The seeded validator and its subnet's SubtensorModule values (spec 393 types).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeededValidator {
    /// Hotkey AccountId (raw 32 bytes; see [`ss58::decode`]). Default [`ALICE`].
    pub hotkey: [u8; 32],
    /// Subnet id. Default 1.
    pub netuid: u16,
    /// The validator's UID. Default 0.
    pub uid: u16,
    /// Neurons in the subnet (length of the per-UID vectors). Default 64.
    pub subnet_size: u16,
    /// `LastUpdate[uid]` at start is `initial_best - last_update_age`. Default 50.
    pub last_update_age: u64,
    /// When set, the validator "sets weights" (LastUpdate = best) every this many blocks.
    /// Default `None`: LastUpdate changes only through the controls.
    pub set_weights_every: Option<u64>,
    /// `ValidatorPermit[uid]`. Default true.
    pub validator_permit: bool,
    /// `ValidatorTrust[uid]` (u16 fixed point). Default 58 982 (0.9).
    pub validator_trust: u16,
    /// `Emission[uid]` in rao. Default 41 000 000.
    pub emission: u64,
    /// `Dividends[uid]` (u16 fixed point). Default 32 768.
    pub dividends: u16,
    /// `Active[uid]`. Default true.
    pub active: bool,
    /// `WeightsSetRateLimit[netuid]` in blocks. Default 100.
    pub weights_set_rate_limit: u64,
    /// `ActivityCutoff[netuid]` in blocks. Default 5000.
    pub activity_cutoff: u16,
    /// `Tempo[netuid]` in blocks. Default 360.
    pub tempo: u16,
}

impl Default for SeededValidator {
    fn default() -> Self {
        Self {
            hotkey: ALICE,
            netuid: 1,
            uid: 0,
            subnet_size: 64,
            last_update_age: 50,
            set_weights_every: None,
            validator_permit: true,
            validator_trust: 58_982,
            emission: 41_000_000,
            dividends: 32_768,
            active: true,
            weights_set_rate_limit: 100,
            activity_cutoff: 5000,
            tempo: 360,
        }
    }
}

/// A partial update of the seeded validator's values (`fake_setValidator`); absent fields stay.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ValidatorPatch {
    /// `LastUpdate[uid]` (absolute block number).
    pub last_update: Option<u64>,
    /// `ValidatorPermit[uid]`.
    pub validator_permit: Option<bool>,
    /// `ValidatorTrust[uid]`.
    pub validator_trust: Option<u16>,
    /// `Emission[uid]` in rao.
    pub emission: Option<u64>,
    /// `Dividends[uid]`.
    pub dividends: Option<u16>,
    /// `Active[uid]`.
    pub active: Option<bool>,
    /// `WeightsSetRateLimit[netuid]`.
    pub weights_set_rate_limit: Option<u64>,
    /// `ActivityCutoff[netuid]`.
    pub activity_cutoff: Option<u16>,
    /// `Tempo[netuid]`.
    pub tempo: Option<u16>,
    /// Automatic weight setting period in blocks; 0 turns it off.
    pub set_weights_every: Option<u64>,
}

/// The node's state as the admin methods report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FakeStatus {
    /// The node's best block.
    pub best: u64,
    /// The node's finalized block.
    pub finalized: u64,
    /// The network tip (`system_syncState.highestBlock`).
    pub highest: u64,
    /// Blocks the node's best trails the tip by.
    pub lag: u64,
    /// No new blocks.
    pub frozen: bool,
    /// Finality does not advance.
    pub finality_stalled: bool,
    /// Peers reported by `system_health`.
    pub peers: u32,
    /// Non-admin calls are not answered.
    pub hanging: bool,
    /// The port accepts connections.
    pub listening: bool,
    /// Runtime spec version.
    pub spec_version: u32,
    /// `LastUpdate[uid]` of the seeded validator.
    pub last_update: u64,
}

/// A running fake subtensor node. Dropping it stops every task and closes the port.
pub struct FakeNode {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for FakeNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeNode")
            .field("addr", &self.shared.addr)
            .finish_non_exhaustive()
    }
}

impl FakeNode {
    /// Validates `config`, binds the port and starts producing blocks.
    ///
    /// # Errors
    /// On invalid config, unreadable fixtures or when the port cannot be bound.
    pub async fn start(config: FakeNodeConfig) -> anyhow::Result<FakeNode> {
        config.validate()?;
        let runtime = RuntimeFixtures::load()?;
        let listener = bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let addr = listener.local_addr()?;
        let state = ChainState::new(&config);
        let shutdown = CancellationToken::new();
        let shared = Arc::new(Shared {
            addr,
            block_interval: config.block_interval,
            initial_best: config.initial_best,
            healthy_peers: config.peers,
            state: Mutex::new(state),
            hang: watch::Sender::new(false),
            listening: watch::Sender::new(true),
            new_heads: broadcast::channel(256).0,
            finalized_heads: broadcast::channel(256).0,
            runtime_versions: broadcast::channel(16).0,
            runtime,
            listener_ctl: Mutex::new(ListenerCtl {
                epoch: shutdown.child_token(),
                down_for: Duration::ZERO,
            }),
            shutdown,
            tracker: TaskTracker::new(),
        });
        let methods = rpc_module(shared.clone())?;
        shared.tracker.spawn(
            produce_blocks(shared.clone()).instrument(tracing::info_span!("fake_node_blocks")),
        );
        shared.tracker.spawn(
            serve(shared.clone(), listener, methods)
                .instrument(tracing::info_span!("fake_node_listener", %addr)),
        );
        Ok(FakeNode { shared })
    }

    /// The bound address (the real port when the config asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `ws://ADDR`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}", self.shared.addr)
    }

    /// `http://ADDR`.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// The node's best block number.
    pub fn best(&self) -> u64 {
        self.shared.lock().best
    }

    /// The node's finalized block number.
    pub fn finalized(&self) -> u64 {
        self.shared.lock().finalized
    }

    /// The network tip (what `system_syncState.highestBlock` reports).
    pub fn highest(&self) -> u64 {
        self.shared.lock().tip
    }

    /// The hash of block `number`, while the node still keeps it.
    pub fn block_hash(&self, number: u64) -> Option<[u8; 32]> {
        self.shared.lock().by_number.get(&number).copied()
    }

    /// Everything the admin methods report.
    pub fn status(&self) -> FakeStatus {
        self.shared.status()
    }

    /// The node falls `blocks` behind the network tip: the tip jumps ahead and keeps advancing,
    /// best follows `blocks` behind, `isSyncing` is true. `lag(0)` catches up at once.
    pub fn lag(&self, blocks: u64) {
        self.shared.lag(blocks);
    }

    /// No new blocks; the node believes it is synced (`highestBlock == best`).
    pub fn freeze_head(&self) {
        self.shared.freeze_head();
    }

    /// Finality stops advancing while best keeps advancing.
    pub fn stall_finality(&self) {
        self.shared.lock().finality_stalled = true;
    }

    /// `system_health.peers` becomes 0.
    pub fn drop_peers(&self) {
        self.shared.lock().peers = 0;
    }

    /// `system_health.peers` becomes `peers`.
    pub fn set_peers(&self, peers: u32) {
        self.shared.lock().peers = peers;
    }

    /// Connections are accepted and requests read, but no non-admin call is answered (on old
    /// and new connections) and subscriptions go quiet, until [`FakeNode::heal`] or a restart.
    pub fn hang(&self) {
        self.shared.hang.send_replace(true);
    }

    /// Closes every connection and stops listening; listens again on the same port after
    /// `down_for`. Returns once the port is closed. A restart ends a hang; other faults
    /// describe the network and stay.
    ///
    /// # Errors
    /// When the listener does not go down within 5 s.
    pub async fn restart(&self, down_for: Duration) -> anyhow::Result<()> {
        self.shared.restart(down_for).await
    }

    /// A runtime upgrade: `Core_version` and `state_getRuntimeVersion` report `spec_version`,
    /// and runtime-version subscribers are told. Metadata stays spec 393's.
    pub fn set_spec_version(&self, spec_version: u32) {
        self.shared.set_spec_version(spec_version);
    }

    /// Sets `LastUpdate[uid]` of the seeded validator to `block`.
    pub fn set_last_update(&self, block: u64) {
        self.shared.lock().last_update = block;
    }

    /// Applies `patch` to the seeded validator's values.
    pub fn patch_validator(&self, patch: &ValidatorPatch) {
        self.shared.lock().apply(patch);
    }

    /// The seeded validator's current values (`last_update_age` is the config's).
    pub fn validator(&self) -> SeededValidator {
        self.shared.lock().validator.clone()
    }

    /// Back to normal: catches up with the tip, resumes blocks and finality, restores peers,
    /// answers again. The spec version stays.
    pub fn heal(&self) {
        self.shared.heal();
    }

    /// Stops every task and waits for them (up to 5 s).
    ///
    /// # Errors
    /// When a task does not stop in time.
    pub async fn shutdown(&self) -> anyhow::Result<()> {
        self.shared.shutdown.cancel();
        self.shared.tracker.close();
        tokio::time::timeout(Duration::from_secs(5), self.shared.tracker.wait())
            .await
            .context("fake node tasks did not stop within 5 s")
    }
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

/// SS58 addresses (Substrate's base58 account encoding with a network prefix and checksum).
pub mod ss58 {
    use anyhow::{Context, bail};
    use sp_crypto_hashing::blake2_512;

    const ALPHABET: &[u8; 58] = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";

    /// The Bittensor / generic Substrate network prefix.
    pub const BITTENSOR_PREFIX: u16 = 42;

    /// Decodes an SS58 address into its network prefix and 32-byte account.
    ///
    /// # Errors
    /// On a character outside base58, a wrong length, an unsupported prefix or a bad checksum.
    pub fn decode(address: &str) -> anyhow::Result<(u16, [u8; 32])> {
        let bytes = base58_decode(address)?;
        let (prefix, prefix_len) = match bytes.first() {
            Some(&b) if b < 64 => (u16::from(b), 1),
            Some(&b) if b < 128 => {
                let second = *bytes.get(1).context("address too short")?;
                let lower = (b << 2) | (second >> 6);
                let upper = second & 0b0011_1111;
                (u16::from(lower) | (u16::from(upper) << 8), 2)
            }
            Some(_) => bail!("reserved SS58 prefix byte"),
            None => bail!("empty SS58 address"),
        };
        if bytes.len() != prefix_len + 32 + 2 {
            bail!(
                "SS58 address decodes to {} bytes; an account address has {}",
                bytes.len(),
                prefix_len + 34
            );
        }
        let body = &bytes[..prefix_len + 32];
        let sum = checksum(body);
        if bytes[prefix_len + 32..] != sum[..2] {
            bail!("SS58 checksum mismatch");
        }
        let mut account = [0u8; 32];
        account.copy_from_slice(&bytes[prefix_len..prefix_len + 32]);
        Ok((prefix, account))
    }

    /// Encodes `account` under network `prefix` (0..16384).
    ///
    /// # Errors
    /// When `prefix` is 16384 or above.
    pub fn encode(prefix: u16, account: &[u8; 32]) -> anyhow::Result<String> {
        let mut body = match prefix {
            0..=63 => vec![prefix as u8],
            64..=16383 => {
                let first = ((prefix & 0b0000_0000_1111_1100) as u8) >> 2;
                let second = ((prefix >> 8) as u8) | (((prefix & 0b11) as u8) << 6);
                vec![first | 0b0100_0000, second]
            }
            _ => bail!("SS58 prefix {prefix} is out of range (0..16384)"),
        };
        body.extend_from_slice(account);
        let sum = checksum(&body);
        body.extend_from_slice(&sum[..2]);
        Ok(base58_encode(&body))
    }

    fn checksum(body: &[u8]) -> [u8; 64] {
        let mut input = Vec::with_capacity(7 + body.len());
        input.extend_from_slice(b"SS58PRE");
        input.extend_from_slice(body);
        blake2_512(&input)
    }

    /// Base58 (Bitcoin alphabet) to bytes.
    ///
    /// # Errors
    /// On a character outside the alphabet.
    pub fn base58_decode(text: &str) -> anyhow::Result<Vec<u8>> {
        // Big-endian base-256 digits of the number read so far.
        let mut number: Vec<u8> = Vec::with_capacity(text.len());
        for c in text.bytes() {
            let digit = ALPHABET
                .iter()
                .position(|&a| a == c)
                .with_context(|| format!("{:?} is not a base58 character", c as char))?;
            let mut carry = digit as u32;
            for byte in number.iter_mut().rev() {
                carry += u32::from(*byte) * 58;
                *byte = (carry & 0xff) as u8;
                carry >>= 8;
            }
            while carry > 0 {
                number.insert(0, (carry & 0xff) as u8);
                carry >>= 8;
            }
        }
        let zeros = text.bytes().take_while(|&c| c == b'1').count();
        let mut out = vec![0u8; zeros];
        out.extend_from_slice(&number);
        Ok(out)
    }

    /// Bytes to base58 (Bitcoin alphabet).
    pub fn base58_encode(bytes: &[u8]) -> String {
        // Little-endian base-58 digits.
        let mut digits: Vec<u8> = Vec::with_capacity(bytes.len() * 2);
        for &byte in bytes {
            let mut carry = u32::from(byte);
            for digit in digits.iter_mut() {
                carry += u32::from(*digit) << 8;
                *digit = (carry % 58) as u8;
                carry /= 58;
            }
            while carry > 0 {
                digits.push((carry % 58) as u8);
                carry /= 58;
            }
        }
        let zeros = bytes.iter().take_while(|&&b| b == 0).count();
        let mut out = String::with_capacity(zeros + digits.len());
        out.extend(std::iter::repeat_n('1', zeros));
        out.extend(
            digits
                .iter()
                .rev()
                .map(|&d| ALPHABET[usize::from(d)] as char),
        );
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Chain state

/// A block header; the body is always empty.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Header {
    parent_hash: [u8; 32],
    number: u64,
    state_root: [u8; 32],
    extrinsics_root: [u8; 32],
}

impl Header {
    fn at(number: u64, parent_hash: [u8; 32]) -> Self {
        let mut seed = b"fake-subtensor-state".to_vec();
        seed.extend_from_slice(&number.to_le_bytes());
        Self {
            parent_hash,
            number,
            state_root: blake2_256(&seed),
            extrinsics_root: EMPTY_TRIE_ROOT,
        }
    }

    /// SCALE as `sp_runtime::generic::Header`: the number is compact, the digest an empty Vec.
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 * 3 + 6);
        out.extend_from_slice(&self.parent_hash);
        Compact(self.number).encode_to(&mut out);
        out.extend_from_slice(&self.state_root);
        out.extend_from_slice(&self.extrinsics_root);
        Compact(0u32).encode_to(&mut out);
        out
    }

    fn hash(&self) -> [u8; 32] {
        blake2_256(&self.encode())
    }

    fn to_json(&self) -> Value {
        json!({
            "parentHash": hex0x(&self.parent_hash),
            "number": format!("0x{:x}", self.number),
            "stateRoot": hex0x(&self.state_root),
            "extrinsicsRoot": hex0x(&self.extrinsics_root),
            "digest": { "logs": [] },
        })
    }
}

struct ChainState {
    /// The network tip.
    tip: u64,
    best: u64,
    finalized: u64,
    lag: u64,
    frozen: bool,
    finality_stalled: bool,
    peers: u32,
    spec_version: u32,
    by_number: BTreeMap<u64, [u8; 32]>,
    headers: HashMap<[u8; 32], Arc<Header>>,
    genesis: [u8; 32],
    validator: SeededValidator,
    /// `LastUpdate[uid]` of the seeded validator.
    last_update: u64,
    /// `LastUpdate` of every other neuron (fixed).
    others_last_update: u64,
}

impl ChainState {
    fn new(config: &FakeNodeConfig) -> Self {
        let genesis = parse_hash(FINNEY_GENESIS_HASH).unwrap_or([0u8; 32]);
        let mut state = Self {
            tip: config.initial_best,
            best: 0,
            finalized: 0,
            lag: 0,
            frozen: false,
            finality_stalled: false,
            peers: config.peers,
            spec_version: config.spec_version,
            by_number: BTreeMap::new(),
            headers: HashMap::new(),
            genesis,
            validator: config.validator.clone(),
            last_update: config.initial_best - config.validator.last_update_age,
            others_last_update: config.initial_best.saturating_sub(20),
        };
        let first = config.initial_best - PREPRODUCED;
        let mut seed = b"fake-subtensor-parent".to_vec();
        seed.extend_from_slice(&first.to_le_bytes());
        let mut parent = blake2_256(&seed);
        for number in first..=config.initial_best {
            let header = Header::at(number, parent);
            parent = header.hash();
            state.insert(header);
        }
        state.best = config.initial_best;
        state.finalized = config.initial_best - 2;
        state
    }

    fn insert(&mut self, header: Header) {
        let hash = header.hash();
        self.by_number.insert(header.number, hash);
        self.headers.insert(hash, Arc::new(header));
        while self.by_number.len() > KEPT_HEADERS {
            let Some((_, old)) = self.by_number.pop_first() else {
                break;
            };
            self.headers.remove(&old);
        }
    }

    fn header_by_number(&self, number: u64) -> Option<Arc<Header>> {
        let hash = self.by_number.get(&number)?;
        self.headers.get(hash).cloned()
    }

    fn best_header(&self) -> Option<Arc<Header>> {
        self.header_by_number(self.best)
    }

    fn hash_of(&self, number: u64) -> Option<[u8; 32]> {
        if number == 0 {
            return Some(self.genesis);
        }
        if number > self.best {
            return None;
        }
        self.by_number.get(&number).copied()
    }

    /// Produces blocks up to `tip - lag` and advances finality. Returns the new best headers
    /// and the newly finalized headers, in order.
    fn catch_up(&mut self) -> (Vec<Arc<Header>>, Vec<Arc<Header>>) {
        let target = self.tip.saturating_sub(self.lag).max(self.best);
        let mut new_heads = Vec::new();
        // Bounded: never more than the kept window in one step.
        let start = self
            .best
            .max(target.saturating_sub(KEPT_HEADERS as u64 / 2));
        if start > self.best {
            // A jump larger than the window: continue the chain from the last kept header.
            self.best = start;
        }
        while self.best < target {
            let parent = self
                .by_number
                .last_key_value()
                .map(|(_, h)| *h)
                .unwrap_or(self.genesis);
            let header = Header::at(self.best + 1, parent);
            self.best += 1;
            self.insert(header);
            if let Some(h) = self.best_header() {
                new_heads.push(h);
            }
        }
        let mut finalized = Vec::new();
        if !self.finality_stalled {
            let target = self.best.saturating_sub(2);
            let from = self.finalized.max(target.saturating_sub(64));
            for number in from + 1..=target {
                if let Some(h) = self.header_by_number(number) {
                    finalized.push(h);
                }
            }
            self.finalized = self.finalized.max(target);
        }
        if let Some(every) = self.validator.set_weights_every
            && every > 0
            && self.best >= self.last_update + every
        {
            self.last_update = self.best;
        }
        (new_heads, finalized)
    }

    fn apply(&mut self, patch: &ValidatorPatch) {
        let v = &mut self.validator;
        if let Some(x) = patch.last_update {
            self.last_update = x;
        }
        if let Some(x) = patch.validator_permit {
            v.validator_permit = x;
        }
        if let Some(x) = patch.validator_trust {
            v.validator_trust = x;
        }
        if let Some(x) = patch.emission {
            v.emission = x;
        }
        if let Some(x) = patch.dividends {
            v.dividends = x;
        }
        if let Some(x) = patch.active {
            v.active = x;
        }
        if let Some(x) = patch.weights_set_rate_limit {
            v.weights_set_rate_limit = x;
        }
        if let Some(x) = patch.activity_cutoff {
            v.activity_cutoff = x;
        }
        if let Some(x) = patch.tempo {
            v.tempo = x;
        }
        if let Some(x) = patch.set_weights_every {
            v.set_weights_every = (x > 0).then_some(x);
        }
    }

    /// The SubtensorModule storage this node serves, by full key.
    fn storage(&self) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let v = &self.validator;
        let n = usize::from(v.subnet_size);
        let me = usize::from(v.uid);
        let netuid = v.netuid.to_le_bytes();
        let per_uid = |item: &str| -> Vec<u8> {
            let mut key = storage_prefix("SubtensorModule", item);
            key.extend_from_slice(&netuid);
            key
        };
        let mut map = BTreeMap::new();
        let mut vector = |item: &str, value: Vec<u8>| {
            map.insert(per_uid(item), value);
        };
        let mut last_update = vec![self.others_last_update; n];
        last_update[me] = self.last_update;
        vector("LastUpdate", last_update.encode());
        let mut permit = vec![false; n];
        permit[me] = v.validator_permit;
        vector("ValidatorPermit", permit.encode());
        let mut trust = vec![0u16; n];
        trust[me] = v.validator_trust;
        vector("ValidatorTrust", trust.encode());
        let mut emission = vec![1_000_000u64; n];
        emission[me] = v.emission;
        vector("Emission", emission.encode());
        let mut dividends = vec![0u16; n];
        dividends[me] = v.dividends;
        vector("Dividends", dividends.encode());
        let mut active = vec![true; n];
        active[me] = v.active;
        vector("Active", active.encode());
        vector("WeightsSetRateLimit", v.weights_set_rate_limit.encode());
        vector("ActivityCutoff", v.activity_cutoff.encode());
        vector("Tempo", v.tempo.encode());
        vector("SubnetworkN", v.subnet_size.encode());
        for uid in 0..v.subnet_size {
            let account = if uid == v.uid {
                v.hotkey
            } else {
                let mut seed = b"fake-subtensor-neuron".to_vec();
                seed.extend_from_slice(&uid.to_le_bytes());
                blake2_256(&seed)
            };
            let mut uids = per_uid("Uids");
            uids.extend_from_slice(&blake2_128(&account));
            uids.extend_from_slice(&account);
            map.insert(uids, uid.encode());
            let mut keys = per_uid("Keys");
            keys.extend_from_slice(&uid.to_le_bytes());
            map.insert(keys, account.to_vec());
        }
        map
    }
}

// ---------------------------------------------------------------------------------------------
// Shared node

struct ListenerCtl {
    /// Cancelled to close the current listener and every connection it accepted.
    epoch: CancellationToken,
    /// How long the next restart keeps the port closed.
    down_for: Duration,
}

struct Shared {
    addr: SocketAddr,
    block_interval: Duration,
    initial_best: u64,
    healthy_peers: u32,
    state: Mutex<ChainState>,
    hang: watch::Sender<bool>,
    listening: watch::Sender<bool>,
    new_heads: broadcast::Sender<Arc<Header>>,
    finalized_heads: broadcast::Sender<Arc<Header>>,
    runtime_versions: broadcast::Sender<u32>,
    runtime: RuntimeFixtures,
    listener_ctl: Mutex<ListenerCtl>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, ChainState> {
        // A panic while holding the lock leaves plain numbers behind; keep serving them.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn ctl(&self) -> MutexGuard<'_, ListenerCtl> {
        self.listener_ctl.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn status(&self) -> FakeStatus {
        let s = self.lock();
        FakeStatus {
            best: s.best,
            finalized: s.finalized,
            highest: s.tip,
            lag: s.lag,
            frozen: s.frozen,
            finality_stalled: s.finality_stalled,
            peers: s.peers,
            hanging: *self.hang.borrow(),
            listening: *self.listening.borrow(),
            spec_version: s.spec_version,
            last_update: s.last_update,
        }
    }

    /// One block interval: the tip moves unless frozen, best follows, finality follows best.
    fn step(&self) {
        let (heads, finalized) = {
            let mut s = self.lock();
            if !s.frozen {
                s.tip += 1;
            }
            s.catch_up()
        };
        self.publish(heads, finalized);
    }

    fn publish(&self, heads: Vec<Arc<Header>>, finalized: Vec<Arc<Header>>) {
        // No receivers is not an error: nobody subscribed yet.
        for h in heads {
            let _ = self.new_heads.send(h);
        }
        for h in finalized {
            let _ = self.finalized_heads.send(h);
        }
    }

    fn lag(&self, blocks: u64) {
        let (heads, finalized) = {
            let mut s = self.lock();
            s.lag = blocks;
            if blocks > 0 {
                // The network is ahead: the tip jumps so that the gap shows at once.
                s.tip = s.tip.max(s.best + blocks);
            }
            s.catch_up()
        };
        self.publish(heads, finalized);
    }

    fn freeze_head(&self) {
        let mut s = self.lock();
        s.frozen = true;
        s.lag = 0;
        s.tip = s.best;
    }

    fn heal(&self) {
        let (heads, finalized) = {
            let mut s = self.lock();
            s.lag = 0;
            s.frozen = false;
            s.finality_stalled = false;
            s.peers = self.healthy_peers;
            s.catch_up()
        };
        self.hang.send_replace(false);
        self.publish(heads, finalized);
    }

    fn set_spec_version(&self, spec_version: u32) {
        self.lock().spec_version = spec_version;
        let _ = self.runtime_versions.send(spec_version);
    }

    async fn restart(&self, down_for: Duration) -> anyhow::Result<()> {
        {
            let mut ctl = self.ctl();
            ctl.down_for = down_for;
            ctl.epoch.cancel();
        }
        self.hang.send_replace(false);
        let mut listening = self.listening.subscribe();
        tokio::time::timeout(Duration::from_secs(5), listening.wait_for(|up| !*up))
            .await
            .context("the listener did not close within 5 s")?
            .context("the node is shut down")?;
        Ok(())
    }

    fn runtime_version_json(&self, spec_version: u32) -> Value {
        let mut v = self.runtime.version.clone();
        v["specVersion"] = json!(spec_version);
        v
    }
}

/// Metadata and runtime version taken from the recorded finney fixtures.
struct RuntimeFixtures {
    /// `Option<Vec<u8>>` SCALE: the answer to `Metadata_metadata_at_version(15)`.
    metadata_at_v15: Vec<u8>,
    /// The recorded `state_getRuntimeVersion` result.
    version: Value,
}

impl RuntimeFixtures {
    fn load() -> anyhow::Result<Self> {
        let hex_text = METADATA_AT_V15_HEX.trim();
        let metadata_at_v15 = hex::decode(hex_text.strip_prefix("0x").unwrap_or(hex_text))
            .context("the recorded metadata file is not hex")?;
        if metadata_at_v15.first() != Some(&1) {
            bail!("the recorded metadata answer is not Some(..)");
        }
        let recorded: Value =
            serde_json::from_str(RECORDED_RPC_JSON).context("the recorded RPC file is not JSON")?;
        let version = recorded["responses"]["state_getRuntimeVersion"]
            .as_object()
            .and_then(|answers| answers.values().next())
            .map(|answer| answer["result"].clone())
            .context("no state_getRuntimeVersion in the recorded RPC file")?;
        // Fail here, not on the first call, when the recording lacks a field.
        encode_runtime_version(&version, 0)?;
        Ok(Self {
            metadata_at_v15,
            version,
        })
    }

    /// `Metadata_metadata` answer: `Vec<u8>` SCALE (compact length ++ metadata).
    fn metadata_vec(&self) -> &[u8] {
        &self.metadata_at_v15[1..]
    }

    /// Raw `RuntimeMetadataPrefixed` bytes (`state_getMetadata`).
    fn metadata_raw(&self) -> anyhow::Result<&[u8]> {
        let mut input = self.metadata_vec();
        let len = <Compact<u32> as parity_scale_codec::Decode>::decode(&mut input)
            .context("bad metadata length prefix")?;
        if input.len() != len.0 as usize {
            bail!("metadata length prefix does not match");
        }
        Ok(input)
    }
}

/// SCALE `sp_version::RuntimeVersion` (Core API v5) from its JSON form, with `spec_version`.
fn encode_runtime_version(v: &Value, spec_version: u32) -> anyhow::Result<Vec<u8>> {
    let text = |field: &str| -> anyhow::Result<String> {
        Ok(v[field]
            .as_str()
            .with_context(|| format!("runtime version lacks {field}"))?
            .to_owned())
    };
    let number = |field: &str| -> anyhow::Result<u32> {
        let n = v[field]
            .as_u64()
            .with_context(|| format!("runtime version lacks {field}"))?;
        Ok(u32::try_from(n)?)
    };
    let mut apis: Vec<([u8; 8], u32)> = Vec::new();
    for api in v["apis"].as_array().context("runtime version lacks apis")? {
        let id = api[0].as_str().context("api id is not a string")?;
        let bytes = hex::decode(id.trim_start_matches("0x"))?;
        let id: [u8; 8] = bytes
            .try_into()
            .map_err(|_| anyhow::anyhow!("api id is not 8 bytes"))?;
        let version = u32::try_from(api[1].as_u64().context("api version is not a number")?)?;
        apis.push((id, version));
    }
    let system_version = u8::try_from(number("systemVersion").unwrap_or(1))?;
    let mut out = Vec::new();
    text("specName")?.encode_to(&mut out);
    text("implName")?.encode_to(&mut out);
    number("authoringVersion")?.encode_to(&mut out);
    spec_version.encode_to(&mut out);
    number("implVersion")?.encode_to(&mut out);
    apis.encode_to(&mut out);
    number("transactionVersion")?.encode_to(&mut out);
    system_version.encode_to(&mut out);
    Ok(out)
}

fn storage_prefix(pallet: &str, item: &str) -> Vec<u8> {
    let mut key = twox_128(pallet.as_bytes()).to_vec();
    key.extend_from_slice(&twox_128(item.as_bytes()));
    key
}

fn hex0x(bytes: &[u8]) -> String {
    format!("0x{}", hex::encode(bytes))
}

fn parse_bytes(text: &str) -> Option<Vec<u8>> {
    hex::decode(text.strip_prefix("0x").unwrap_or(text)).ok()
}

fn parse_hash(text: &str) -> Option<[u8; 32]> {
    parse_bytes(text)?.try_into().ok()
}

// ---------------------------------------------------------------------------------------------
// Tasks

async fn produce_blocks(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.block_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // The first tick fires at once; the pre-produced blocks already cover it.
    tick.tick().await;
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => break,
            _ = tick.tick() => shared.step(),
        }
    }
}

async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Accepts connections until the epoch ends, then keeps the port closed for the restart's
/// `down_for` and listens again; stops on shutdown.
async fn serve(shared: Arc<Shared>, listener: TcpListener, methods: jsonrpsee::Methods) {
    let mut listener = Some(listener);
    loop {
        let current = match listener.take() {
            Some(l) => l,
            None => match rebind(&shared).await {
                Some(l) => l,
                None => return,
            },
        };
        let epoch = shared.shutdown.child_token();
        shared.ctl().epoch = epoch.clone();
        shared.listening.send_replace(true);
        tracing::debug!(addr = %shared.addr, "fake node listening");
        let (stop_handle, server_handle) = stop_channel();
        accept_until(&shared, &current, &epoch, &methods, &stop_handle).await;
        drop(current);
        stop_server(server_handle);
        shared.listening.send_replace(false);
        if shared.shutdown.is_cancelled() {
            return;
        }
        let down_for = shared.ctl().down_for;
        tracing::debug!(?down_for, "fake node restarting");
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            () = tokio::time::sleep(down_for) => {}
        }
    }
}

fn stop_server(handle: ServerHandle) {
    // Already stopped only when every connection is gone, which is fine.
    let _ = handle.stop();
}

/// Binds the same address again, for up to 30 s (the old socket may linger briefly).
async fn rebind(shared: &Shared) -> Option<TcpListener> {
    for _ in 0..600 {
        match bind(shared.addr).await {
            Ok(l) => return Some(l),
            Err(e) => tracing::debug!(error = %e, "fake node rebind failed; retrying"),
        }
        tokio::select! {
            () = shared.shutdown.cancelled() => return None,
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    tracing::error!(addr = %shared.addr, "fake node could not listen again within 30 s");
    None
}

async fn accept_until(
    shared: &Arc<Shared>,
    listener: &TcpListener,
    epoch: &CancellationToken,
    methods: &jsonrpsee::Methods,
    stop_handle: &StopHandle,
) {
    let service_builder = jsonrpsee::server::Server::builder().to_service_builder();
    loop {
        let accepted = tokio::select! {
            () = epoch.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (socket, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Transient (e.g. too many open files): back off briefly instead of spinning.
                tracing::debug!(error = %e, "fake node accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let gate = HangGateLayer {
            hang: shared.hang.subscribe(),
            epoch: epoch.clone(),
        };
        let service = service_builder
            .clone()
            .set_rpc_middleware(RpcServiceBuilder::new().layer_fn(move |inner| HangGate {
                inner,
                hang: gate.hang.clone(),
                epoch: gate.epoch.clone(),
            }))
            .build(methods.clone(), stop_handle.clone());
        let io = Killable::new(socket, epoch.clone());
        let stopped = stop_handle.clone().shutdown();
        shared.tracker.spawn(
            async move {
                if let Err(e) = serve_with_graceful_shutdown(io, service, stopped).await {
                    tracing::trace!(error = %e, "fake node connection ended");
                }
            }
            .instrument(tracing::debug_span!("fake_node_conn", %peer)),
        );
    }
}

/// A TCP stream that fails every read and write once its epoch is cancelled, so a restart
/// cuts connections that jsonrpsee upgraded to WebSocket and drives on its own tasks.
struct Killable {
    inner: TcpStream,
    token: CancellationToken,
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Killable {
    fn new(inner: TcpStream, token: CancellationToken) -> Self {
        let killed = Box::pin(token.clone().cancelled_owned());
        Self {
            inner,
            token,
            killed,
        }
    }

    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.token.is_cancelled() || self.killed.as_mut().poll(cx).is_ready() {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "fake node restarted",
            ));
        }
        Ok(())
    }
}

impl AsyncRead for Killable {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Killable {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[derive(Clone)]
struct HangGateLayer {
    hang: watch::Receiver<bool>,
    epoch: CancellationToken,
}

/// RPC middleware: while the node hangs, holds every non-admin call until the hang ends or
/// the connection's epoch ends (restart or shutdown).
#[derive(Clone)]
struct HangGate<S> {
    inner: S,
    hang: watch::Receiver<bool>,
    epoch: CancellationToken,
}

impl<S> HangGate<S> {
    fn wait(&self, admin: bool) -> impl Future<Output = ()> + Send + 'static {
        let mut hang = self.hang.clone();
        let epoch = self.epoch.clone();
        async move {
            if admin {
                return;
            }
            tokio::select! {
                _ = hang.wait_for(|h| !*h) => {}
                () = epoch.cancelled() => {}
            }
        }
    }
}

fn is_admin(method: &str) -> bool {
    method.starts_with("fake_")
}

impl<S> RpcServiceT for HangGate<S>
where
    S: RpcServiceT + Send + Sync + Clone + 'static,
{
    type MethodResponse = S::MethodResponse;
    type NotificationResponse = S::NotificationResponse;
    type BatchResponse = S::BatchResponse;

    fn call<'a>(
        &self,
        request: Request<'a>,
    ) -> impl Future<Output = Self::MethodResponse> + Send + 'a {
        let wait = self.wait(is_admin(request.method_name()));
        let inner = self.inner.clone();
        async move {
            wait.await;
            inner.call(request).await
        }
    }

    fn batch<'a>(&self, batch: Batch<'a>) -> impl Future<Output = Self::BatchResponse> + Send + 'a {
        let wait = self.wait(false);
        let inner = self.inner.clone();
        async move {
            wait.await;
            inner.batch(batch).await
        }
    }

    fn notification<'a>(
        &self,
        n: Notification<'a>,
    ) -> impl Future<Output = Self::NotificationResponse> + Send + 'a {
        self.inner.notification(n)
    }
}

// ---------------------------------------------------------------------------------------------
// RPC methods

type RpcResult = Result<Value, ErrorObjectOwned>;

fn invalid_params(message: impl Into<String>) -> ErrorObjectOwned {
    ErrorObject::owned(-32602, message, None::<()>)
}

fn execution_failed(message: impl Into<String>) -> ErrorObjectOwned {
    ErrorObject::owned(-32000, message, None::<()>)
}

/// The `n`th positional parameter, `None` when absent or null.
fn param(params: &Params<'_>, n: usize) -> Result<Option<Value>, ErrorObjectOwned> {
    if params.as_str().is_none() {
        return Ok(None);
    }
    let value: Value = params.parse()?;
    Ok(match value {
        Value::Array(mut items) if n < items.len() => {
            Some(items.swap_remove(n)).filter(|v| !v.is_null())
        }
        Value::Array(_) => None,
        Value::Null => None,
        other if n == 0 => Some(other),
        _ => None,
    })
}

fn param_u64(params: &Params<'_>, n: usize) -> Result<Option<u64>, ErrorObjectOwned> {
    match param(params, n)? {
        None => Ok(None),
        Some(v) => number_of(&v).map(Some),
    }
}

fn number_of(v: &Value) -> Result<u64, ErrorObjectOwned> {
    if let Some(n) = v.as_u64() {
        return Ok(n);
    }
    let text = v
        .as_str()
        .ok_or_else(|| invalid_params(format!("{v} is not a block number")))?;
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| invalid_params(format!("{text:?} is not a block number")))
}

fn param_hash(params: &Params<'_>, n: usize) -> Result<Option<[u8; 32]>, ErrorObjectOwned> {
    match param(params, n)? {
        None => Ok(None),
        Some(Value::String(s)) => parse_hash(&s)
            .map(Some)
            .ok_or_else(|| invalid_params(format!("{s:?} is not a 32-byte hex hash"))),
        Some(other) => Err(invalid_params(format!("{other} is not a hash"))),
    }
}

fn param_bytes(params: &Params<'_>, n: usize) -> Result<Option<Vec<u8>>, ErrorObjectOwned> {
    match param(params, n)? {
        None => Ok(None),
        Some(Value::String(s)) => parse_bytes(&s)
            .map(Some)
            .ok_or_else(|| invalid_params(format!("{s:?} is not hex"))),
        Some(other) => Err(invalid_params(format!("{other} is not hex bytes"))),
    }
}

fn block_hash_of(state: &ChainState, number: Option<&Value>) -> RpcResult {
    let hash = match number {
        None | Some(Value::Null) => state.hash_of(state.best),
        Some(Value::Array(items)) => {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                out.push(block_hash_of(state, Some(item))?);
            }
            return Ok(Value::Array(out));
        }
        Some(v) => state.hash_of(number_of(v)?),
    };
    Ok(hash.map_or(Value::Null, |h| json!(hex0x(&h))))
}

fn header_json(state: &ChainState, hash: Option<[u8; 32]>) -> Value {
    let header = match hash {
        None => state.best_header(),
        Some(h) => state.headers.get(&h).cloned(),
    };
    if let Some(h) = header {
        return h.to_json();
    }
    if hash == Some(state.genesis) {
        return Header {
            parent_hash: [0u8; 32],
            number: 0,
            state_root: [0u8; 32],
            extrinsics_root: EMPTY_TRIE_ROOT,
        }
        .to_json();
    }
    Value::Null
}

fn state_call(shared: &Shared, params: &Params<'_>) -> RpcResult {
    let method = match param(params, 0)? {
        Some(Value::String(s)) => s,
        _ => return Err(invalid_params("state_call needs a method name")),
    };
    let data = param_bytes(params, 1)?.unwrap_or_default();
    let bytes: Vec<u8> = match method.as_str() {
        "Core_version" => {
            let spec = shared.lock().spec_version;
            encode_runtime_version(&shared.runtime.version, spec)
                .map_err(|e| execution_failed(e.to_string()))?
        }
        "Metadata_metadata_versions" => vec![14u32, 15].encode(),
        "Metadata_metadata_at_version" => {
            if data.as_slice() == 15u32.encode().as_slice() {
                shared.runtime.metadata_at_v15.clone()
            } else {
                // Only V15 was recorded.
                None::<Vec<u8>>.encode()
            }
        }
        "Metadata_metadata" => shared.runtime.metadata_vec().to_vec(),
        other => {
            return Err(execution_failed(format!(
                "Execution failed: Other: Exported method {other} is not found"
            )));
        }
    };
    Ok(json!(hex0x(&bytes)))
}

fn system_health(state: &ChainState) -> Value {
    json!({
        "peers": state.peers,
        "isSyncing": state.best < state.tip,
        "shouldHavePeers": true,
    })
}

fn admin_status(shared: &Shared) -> RpcResult {
    serde_json::to_value(shared.status()).map_err(|e| execution_failed(e.to_string()))
}

fn rpc_module(shared: Arc<Shared>) -> anyhow::Result<jsonrpsee::Methods> {
    let mut module = RpcModule::new(shared);

    module.register_method("chain_getBlockHash", |p, s, _| {
        let number = param(&p, 0)?;
        block_hash_of(&s.lock(), number.as_ref())
    })?;
    module.register_method("chain_getHead", |_, s, _| block_hash_of(&s.lock(), None))?;
    module.register_method("chain_getFinalizedHead", |_, s, _| {
        let state = s.lock();
        let hash = state.hash_of(state.finalized);
        Ok::<_, ErrorObjectOwned>(hash.map_or(Value::Null, |h| json!(hex0x(&h))))
    })?;
    module.register_alias("chain_getFinalisedHead", "chain_getFinalizedHead")?;
    module.register_method("chain_getHeader", |p, s, _| {
        let hash = param_hash(&p, 0)?;
        Ok::<_, ErrorObjectOwned>(header_json(&s.lock(), hash))
    })?;
    module.register_method("chain_getBlock", |p, s, _| {
        let hash = param_hash(&p, 0)?;
        let header = header_json(&s.lock(), hash);
        Ok::<_, ErrorObjectOwned>(if header.is_null() {
            Value::Null
        } else {
            json!({ "block": { "header": header, "extrinsics": [] }, "justifications": null })
        })
    })?;
    module.register_method("state_getRuntimeVersion", |_, s, _| {
        let spec = s.lock().spec_version;
        Ok::<_, ErrorObjectOwned>(s.runtime_version_json(spec))
    })?;
    module.register_alias("chain_getRuntimeVersion", "state_getRuntimeVersion")?;
    module.register_method("state_call", |p, s, _| state_call(s, &p))?;
    module.register_method("state_getMetadata", |_, s, _| {
        s.runtime
            .metadata_raw()
            .map(|m| json!(hex0x(m)))
            .map_err(|e| execution_failed(e.to_string()))
    })?;
    module.register_method("state_getStorage", |p, s, _| {
        let key = param_bytes(&p, 0)?.ok_or_else(|| invalid_params("missing storage key"))?;
        let storage = s.lock().storage();
        Ok::<_, ErrorObjectOwned>(storage.get(&key).map_or(Value::Null, |v| json!(hex0x(v))))
    })?;
    module.register_alias("state_getStorageAt", "state_getStorage")?;
    module.register_method("state_getKeysPaged", |p, s, _| {
        let prefix = param_bytes(&p, 0)?.unwrap_or_default();
        let count = usize::try_from(param_u64(&p, 1)?.unwrap_or(1000)).unwrap_or(usize::MAX);
        let start = param_bytes(&p, 2)?;
        let storage = s.lock().storage();
        let keys: Vec<Value> = storage
            .keys()
            .filter(|k| k.starts_with(&prefix))
            .filter(|k| start.as_ref().is_none_or(|st| k.as_slice() > st.as_slice()))
            .take(count.min(1000))
            .map(|k| json!(hex0x(k)))
            .collect();
        Ok::<_, ErrorObjectOwned>(Value::Array(keys))
    })?;
    module.register_method("state_queryStorageAt", |p, s, _| {
        let keys = match param(&p, 0)? {
            Some(Value::Array(keys)) => keys,
            _ => return Err(invalid_params("state_queryStorageAt needs a list of keys")),
        };
        let at = param_hash(&p, 1)?;
        let state = s.lock();
        let block = at
            .or_else(|| state.hash_of(state.best))
            .unwrap_or(state.genesis);
        let storage = state.storage();
        let mut changes = Vec::with_capacity(keys.len());
        for key in keys {
            let text = key
                .as_str()
                .ok_or_else(|| invalid_params("a key is not hex"))?;
            let bytes = parse_bytes(text).ok_or_else(|| invalid_params("a key is not hex"))?;
            let value = storage.get(&bytes).map_or(Value::Null, |v| json!(hex0x(v)));
            changes.push(json!([text, value]));
        }
        Ok(json!([{ "block": hex0x(&block), "changes": changes }]))
    })?;
    module.register_method("system_health", |_, s, _| system_health(&s.lock()))?;
    module.register_method("system_syncState", |_, s, _| {
        let state = s.lock();
        json!({
            "startingBlock": s.initial_best,
            "currentBlock": state.best,
            "highestBlock": state.tip,
        })
    })?;
    module.register_method("system_chain", |_, _, _| "Bittensor")?;
    module.register_method("system_name", |_, _, _| "Subtensor Node")?;
    module.register_method("system_version", |_, _, _| "4.0.0-dev-fake-subtensor")?;
    module.register_method("system_chainType", |_, _, _| "Live")?;
    module.register_method(
        "system_properties",
        |_, _, _| json!({ "ss58Format": 42, "tokenDecimals": 9, "tokenSymbol": "TAO" }),
    )?;

    module.register_subscription(
        "chain_subscribeNewHeads",
        "chain_newHead",
        "chain_unsubscribeNewHeads",
        |_, pending, s, _| async move {
            let rx = s.new_heads.subscribe();
            let first = s.lock().best_header();
            pump_headers(pending, rx, first, Arc::clone(&*s)).await
        },
    )?;
    module.register_subscription(
        "chain_subscribeAllHeads",
        "chain_allHead",
        "chain_unsubscribeAllHeads",
        |_, pending, s, _| async move {
            let rx = s.new_heads.subscribe();
            let first = s.lock().best_header();
            pump_headers(pending, rx, first, Arc::clone(&*s)).await
        },
    )?;
    module.register_subscription(
        "chain_subscribeFinalizedHeads",
        "chain_finalizedHead",
        "chain_unsubscribeFinalizedHeads",
        |_, pending, s, _| async move {
            let rx = s.finalized_heads.subscribe();
            let first = {
                let state = s.lock();
                state.header_by_number(state.finalized)
            };
            pump_headers(pending, rx, first, Arc::clone(&*s)).await
        },
    )?;
    module.register_subscription(
        "state_subscribeRuntimeVersion",
        "state_runtimeVersion",
        "state_unsubscribeRuntimeVersion",
        |_, pending, s, _| async move {
            let rx = s.runtime_versions.subscribe();
            let first = s.lock().spec_version;
            pump_runtime_versions(pending, rx, first, Arc::clone(&*s)).await
        },
    )?;

    register_admin(&mut module)?;

    let mut names: Vec<String> = module
        .method_names()
        .filter(|m| !is_admin(m))
        .map(str::to_owned)
        .collect();
    names.push("rpc_methods".to_owned());
    names.sort();
    module.register_method(
        "rpc_methods",
        move |_, _, _| json!({ "version": 1, "methods": names }),
    )?;
    Ok(module.into())
}

fn register_admin(module: &mut RpcModule<Arc<Shared>>) -> anyhow::Result<()> {
    module.register_method("fake_status", |_, s, _| admin_status(s))?;
    module.register_method("fake_lag", |p, s, _| {
        let blocks = param_u64(&p, 0)?.ok_or_else(|| invalid_params("fake_lag needs [blocks]"))?;
        s.lag(blocks);
        admin_status(s)
    })?;
    module.register_method("fake_freezeHead", |_, s, _| {
        s.freeze_head();
        admin_status(s)
    })?;
    module.register_method("fake_stallFinality", |_, s, _| {
        s.lock().finality_stalled = true;
        admin_status(s)
    })?;
    module.register_method("fake_dropPeers", |_, s, _| {
        s.lock().peers = 0;
        admin_status(s)
    })?;
    module.register_method("fake_setPeers", |p, s, _| {
        let peers = param_u64(&p, 0)?.ok_or_else(|| invalid_params("fake_setPeers needs [n]"))?;
        s.lock().peers = u32::try_from(peers).map_err(|_| invalid_params("too many peers"))?;
        admin_status(s)
    })?;
    module.register_method("fake_hang", |_, s, _| {
        s.hang.send_replace(true);
        admin_status(s)
    })?;
    module.register_method("fake_heal", |_, s, _| {
        s.heal();
        admin_status(s)
    })?;
    module.register_method("fake_setSpecVersion", |p, s, _| {
        let v = param_u64(&p, 0)?.ok_or_else(|| invalid_params("fake_setSpecVersion needs [v]"))?;
        s.set_spec_version(u32::try_from(v).map_err(|_| invalid_params("spec version is a u32"))?);
        admin_status(s)
    })?;
    module.register_method("fake_setLastUpdate", |p, s, _| {
        let block =
            param_u64(&p, 0)?.ok_or_else(|| invalid_params("fake_setLastUpdate needs [block]"))?;
        s.lock().last_update = block;
        admin_status(s)
    })?;
    module.register_method("fake_setValidator", |p, s, _| {
        let patch: ValidatorPatch = match param(&p, 0)? {
            Some(v) => serde_json::from_value(v).map_err(|e| invalid_params(e.to_string()))?,
            None => return Err(invalid_params("fake_setValidator needs [{...}]")),
        };
        s.lock().apply(&patch);
        admin_status(s)
    })?;
    module.register_method("fake_restart", |p, s, _| {
        let down_ms = param_u64(&p, 0)?.unwrap_or(1000);
        let shared = Arc::clone(s);
        // Answer first: the restart closes this very connection.
        s.tracker.spawn(
            async move {
                tokio::select! {
                    () = shared.shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
                if let Err(e) = shared.restart(Duration::from_millis(down_ms)).await {
                    tracing::warn!(error = %e, "fake node restart failed");
                }
            }
            .instrument(tracing::info_span!("fake_node_restart")),
        );
        admin_status(s)
    })?;
    Ok(())
}

async fn pump_headers(
    pending: PendingSubscriptionSink,
    mut rx: broadcast::Receiver<Arc<Header>>,
    first: Option<Arc<Header>>,
    shared: Arc<Shared>,
) -> SubscriptionResult {
    let sink = pending.accept().await?;
    if let Some(h) = first {
        sink.send(message(&h.to_json())?).await?;
    }
    loop {
        let header = tokio::select! {
            () = sink.closed() => break,
            () = shared.shutdown.cancelled() => break,
            received = rx.recv() => match received {
                Ok(h) => h,
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => break,
            },
        };
        if *shared.hang.borrow() {
            continue;
        }
        sink.send(message(&header.to_json())?).await?;
    }
    Ok(())
}

async fn pump_runtime_versions(
    pending: PendingSubscriptionSink,
    mut rx: broadcast::Receiver<u32>,
    first: u32,
    shared: Arc<Shared>,
) -> SubscriptionResult {
    let sink = pending.accept().await?;
    sink.send(message(&shared.runtime_version_json(first))?)
        .await?;
    loop {
        let spec = tokio::select! {
            () = sink.closed() => break,
            () = shared.shutdown.cancelled() => break,
            received = rx.recv() => match received {
                Ok(v) => v,
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => break,
            },
        };
        sink.send(message(&shared.runtime_version_json(spec))?)
            .await?;
    }
    Ok(())
}

fn message(value: &Value) -> Result<SubscriptionMessage, serde_json::Error> {
    Ok(SubscriptionMessage::from(serde_json::value::to_raw_value(
        value,
    )?))
}
