//! Property tests of the agent's command envelope checks ([`CommandVerifier::verify`]): a
//! validly signed, current command for this node is accepted once per command id; any altered
//! byte of the envelope or signature is refused; a broken rule is refused with its kind, the
//! first one in the verifier's order.
//!
//! Commands are signed the way the server's `CommandSigner::issue` does it: Ed25519 (ring)
//! over exactly `CommandEnvelope::encode_to_vec()`. Every case gets a fresh temp dir for its
//! seen-ids file.

use std::collections::HashMap;
use std::sync::OnceLock;

use guardian_agent::command::{CommandVerifier, MAX_CLOCK_SKEW_MS, MAX_TTL_MS, SeenIds};
use guardian_proto::v1::{Command, CommandEnvelope};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::Config;
use prost::Message;
use ring::signature::{Ed25519KeyPair, KeyPair};

/// The node the verifier under test runs on.
const NODE: &str = "val-1";
/// Latest `now` generated (2100-01-01): far from the `i64` ends, which get their own cases.
const LATEST_NOW_MS: i64 = 4_102_444_800_000;

/// Fast, and no regression files written next to the sources.
fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

fn new_key() -> Ed25519KeyPair {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).expect("pkcs8");
    Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key")
}

/// The server's command signing key (one per test process: generating is the slow part).
fn server_key() -> &'static Ed25519KeyPair {
    static KEY: OnceLock<Ed25519KeyPair> = OnceLock::new();
    KEY.get_or_init(new_key)
}

/// A key the agent does not trust.
fn other_key() -> &'static Ed25519KeyPair {
    static KEY: OnceLock<Ed25519KeyPair> = OnceLock::new();
    KEY.get_or_init(new_key)
}

/// An agent's verifier with its own, empty seen-ids file (the dir lives as long as it).
struct Agent {
    dir: tempfile::TempDir,
    verifier: CommandVerifier,
}

impl Agent {
    fn start(now: i64) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let verifier = verifier_in(&dir, now);
        Self { dir, verifier }
    }

    /// The verifier after a restart: same seen-ids file, re-read.
    fn restart(&mut self, now: i64) {
        self.verifier = verifier_in(&self.dir, now);
    }

    /// `Ok(())` if accepted, else the refusal's kind.
    fn verify(&mut self, command: &Command, now: i64) -> Result<(), &'static str> {
        self.verifier
            .verify(command, now)
            .map(|_| ())
            .map_err(|refusal| refusal.kind())
    }
}

fn verifier_in(dir: &tempfile::TempDir, now: i64) -> CommandVerifier {
    let seen = SeenIds::open(&dir.path().join("commands-seen"), now).expect("open seen ids");
    let public: [u8; 32] = server_key()
        .public_key()
        .as_ref()
        .try_into()
        .expect("32-byte key");
    CommandVerifier::new(public, NODE, seen)
}

/// Signs `bytes` as the server does (Ed25519 over exactly the bytes sent).
fn sign_bytes(key: &Ed25519KeyPair, bytes: Vec<u8>) -> Command {
    Command {
        signature: key.sign(&bytes).as_ref().to_vec(),
        envelope: bytes,
    }
}

fn sign(envelope: &CommandEnvelope) -> Command {
    sign_bytes(server_key(), envelope.encode_to_vec())
}

fn envelope(
    command_id: String,
    node_id: String,
    body: Body,
    issued_at_unix_ms: i64,
    expires_at_unix_ms: i64,
) -> CommandEnvelope {
    CommandEnvelope {
        command_id,
        node_id,
        action: body.action,
        parameters: body.parameters,
        issued_at_unix_ms,
        expires_at_unix_ms,
    }
}

/// The fields the verifier does not check: any value must do.
#[derive(Debug, Clone)]
struct Body {
    action: String,
    parameters: HashMap<String, String>,
}

fn body() -> impl Strategy<Value = Body> {
    let action = prop_oneof![
        Just("restart-unit".to_owned()),
        Just("collect-diagnostics".to_owned()),
        ".{0,24}",
    ];
    let parameters = prop::collection::hash_map(".{0,16}", ".{0,48}", 0..5);
    (action, parameters).prop_map(|(action, parameters)| Body { action, parameters })
}

fn now() -> impl Strategy<Value = i64> {
    prop_oneof![Just(1_800_000_000_000i64), 0..=LATEST_NOW_MS]
}

/// Ids the agent accepts: 1 to 64 of A-Z, a-z, 0-9, '-', '_'.
fn command_id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-]{1,64}"
}

/// Offsets of a valid `issued_at` from `now`: anywhere from just inside the longest lifetime in
/// the past to the allowed skew in the future, the ends included.
fn valid_issued_offset() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(MAX_CLOCK_SKEW_MS),
        Just(-MAX_CLOCK_SKEW_MS),
        Just(0),
        Just(1 - MAX_TTL_MS),
        -MAX_CLOCK_SKEW_MS..=MAX_CLOCK_SKEW_MS,
        (1 - MAX_TTL_MS)..=MAX_CLOCK_SKEW_MS,
    ]
}

/// A lifetime in 1..=MAX_TTL_MS that still ends after `now` for an envelope issued at
/// `now + offset` (the ends included).
fn valid_ttl(offset: i64) -> impl Strategy<Value = i64> {
    let shortest = 1i64.max(1 - offset);
    prop_oneof![Just(shortest), Just(MAX_TTL_MS), shortest..=MAX_TTL_MS]
}

/// An envelope signed for this node, current at `now`, lifetime in 1..=MAX_TTL_MS.
fn valid_envelope_at(
    now: i64,
    id: impl Strategy<Value = String>,
) -> impl Strategy<Value = CommandEnvelope> {
    (id, body(), valid_issued_offset())
        .prop_flat_map(|(id, body, offset)| (Just((id, body, offset)), valid_ttl(offset)))
        .prop_map(move |((id, body, offset), ttl)| {
            let issued = now + offset;
            envelope(id, NODE.to_owned(), body, issued, issued + ttl)
        })
}

/// `(now, envelope)` with [`valid_envelope_at`].
fn valid_envelope() -> impl Strategy<Value = (i64, CommandEnvelope)> {
    now().prop_flat_map(|now| (Just(now), valid_envelope_at(now, command_id())))
}

/// One changed byte: replaced, deleted or inserted.
#[derive(Debug, Clone)]
enum Tamper {
    Replace { at: Index, xor: u8 },
    Delete { at: Index },
    Insert { at: Index, byte: u8 },
}

impl Tamper {
    fn apply(&self, bytes: &mut Vec<u8>) {
        match *self {
            Tamper::Replace { at, xor } => {
                let at = at.index(bytes.len());
                bytes[at] ^= xor;
            }
            Tamper::Delete { at } => {
                bytes.remove(at.index(bytes.len()));
            }
            Tamper::Insert { at, byte } => bytes.insert(at.index(bytes.len() + 1), byte),
        }
    }
}

fn tamper() -> impl Strategy<Value = Tamper> {
    prop_oneof![
        2 => (any::<Index>(), 1..=u8::MAX).prop_map(|(at, xor)| Tamper::Replace { at, xor }),
        1 => any::<Index>().prop_map(|at| Tamper::Delete { at }),
        1 => (any::<Index>(), any::<u8>()).prop_map(|(at, byte)| Tamper::Insert { at, byte }),
    ]
}

/// The single rule an otherwise valid envelope breaks.
#[derive(Debug, Clone)]
enum Broken {
    /// Signed for another node.
    OtherNode(String),
    /// Expired `ago` ms before now (0 included: `expires_at == now` is expired).
    ExpiredAgo { ago: i64, ttl: i64 },
    /// Issued `beyond` ms further in the future than the skew allows.
    IssuedBeyondSkew { beyond: i64, ttl: i64 },
    /// A lifetime `over` ms longer than MAX_TTL_MS, issued within the skew of now.
    LifetimeOver { over: i64, offset: i64 },
}

impl Broken {
    fn kind(&self) -> &'static str {
        match self {
            Broken::OtherNode(_) => "wrong_node",
            Broken::ExpiredAgo { .. } => "expired",
            Broken::IssuedBeyondSkew { .. } => "not_yet_valid",
            Broken::LifetimeOver { .. } => "lifetime_too_long",
        }
    }
}

fn broken() -> impl Strategy<Value = Broken> {
    let ttl = || prop_oneof![Just(1), Just(MAX_TTL_MS), 1..=MAX_TTL_MS];
    let ago = prop_oneof![
        Just(0),
        Just(MAX_CLOCK_SKEW_MS + 1),
        (MAX_CLOCK_SKEW_MS + 1)..=10 * MAX_TTL_MS,
        0..=MAX_CLOCK_SKEW_MS,
    ];
    let beyond = prop_oneof![Just(1), 1..=10 * MAX_TTL_MS];
    let over = prop_oneof![Just(1), 1..=10 * MAX_TTL_MS, Just(i64::MAX / 2)];
    prop_oneof![
        ".{0,24}"
            .prop_filter("another node", |n| n != NODE)
            .prop_map(Broken::OtherNode),
        (ago, ttl()).prop_map(|(ago, ttl)| Broken::ExpiredAgo { ago, ttl }),
        (beyond, ttl()).prop_map(|(beyond, ttl)| Broken::IssuedBeyondSkew { beyond, ttl }),
        (over, -MAX_CLOCK_SKEW_MS..=MAX_CLOCK_SKEW_MS)
            .prop_map(|(over, offset)| Broken::LifetimeOver { over, offset }),
    ]
}

/// The first rule `bytes` break, in the verifier's order (signature, decode, command id,
/// node, lifetime, expiry, skew, seen), or `None` if they are to be accepted. The signature
/// is good here; `seen` holds the ids already accepted.
fn first_broken_rule(bytes: &[u8], now: i64, seen: &[String]) -> Option<&'static str> {
    let Ok(envelope) = CommandEnvelope::decode(bytes) else {
        return Some("malformed");
    };
    let id = &envelope.command_id;
    let id_ok = (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    let lifetime = envelope
        .expires_at_unix_ms
        .saturating_sub(envelope.issued_at_unix_ms);
    if !id_ok {
        Some("malformed")
    } else if envelope.node_id != NODE {
        Some("wrong_node")
    } else if !(0..=MAX_TTL_MS).contains(&lifetime) {
        Some("lifetime_too_long")
    } else if envelope.expires_at_unix_ms <= now {
        Some("expired")
    } else if envelope.issued_at_unix_ms > now.saturating_add(MAX_CLOCK_SKEW_MS) {
        Some("not_yet_valid")
    } else if seen.contains(id) {
        Some("replayed")
    } else {
        None
    }
}

/// Any id, valid or not (empty, too long, a character outside the allowed set).
fn any_command_id() -> impl Strategy<Value = String> {
    prop_oneof![
        12 => command_id(),
        1 => Just(String::new()),
        1 => "[A-Za-z0-9_-]{65,80}",
        1 => "[a-z0-9]{0,8}[ ./:\\\\\né\u{0}][a-z0-9]{0,8}",
    ]
}

/// An `issued_at` offset or lifetime anywhere: often in the `valid` range, else near it, at a
/// boundary or at an `i64` end.
fn any_offset(valid: std::ops::RangeInclusive<i64>, edges: [i64; 4]) -> impl Strategy<Value = i64> {
    prop_oneof![
        8 => valid,
        1 => Just(edges[0]),
        1 => Just(edges[1]),
        1 => Just(edges[2]),
        1 => Just(edges[3]),
        1 => Just(i64::MIN),
        1 => Just(i64::MAX),
        2 => -2 * MAX_TTL_MS..=2 * MAX_TTL_MS,
        1 => any::<i64>(),
    ]
}

/// What the order property sends: a well-formed envelope with any fields, or any bytes.
#[derive(Debug, Clone)]
struct Anything {
    now: i64,
    /// Envelope bytes signed by the server key (or `other_key` if `forged`).
    bytes: Vec<u8>,
    forged: bool,
    /// Whether a valid command with the same id was accepted first.
    seen_first: bool,
}

fn anything() -> impl Strategy<Value = Anything> {
    let node = prop_oneof![6 => Just(NODE.to_owned()), 1 => ".{0,24}"];
    let issued_offset = any_offset(
        -MAX_TTL_MS..=MAX_CLOCK_SKEW_MS,
        [MAX_CLOCK_SKEW_MS, MAX_CLOCK_SKEW_MS + 1, 0, -MAX_TTL_MS],
    );
    let lifetime = any_offset(1..=MAX_TTL_MS, [MAX_TTL_MS, MAX_TTL_MS + 1, 0, -1]);
    let fields = (any_command_id(), node, body(), issued_offset, lifetime);
    let bytes = prop_oneof![
        16 => (now(), fields).prop_map(|(now, (id, node, body, offset, lifetime))| {
            let issued = now.saturating_add(offset);
            let expires = issued.saturating_add(lifetime);
            (now, envelope(id, node, body, issued, expires).encode_to_vec())
        }),
        1 => (now(), prop::collection::vec(any::<u8>(), 0..64)),
    ];
    (bytes, prop::bool::weighted(0.1), any::<bool>()).prop_map(
        |((now, bytes), forged, seen_first)| Anything {
            now,
            bytes,
            forged,
            seen_first,
        },
    )
}

proptest! {
    #![proptest_config(config(128))]

    /// Each id is accepted on its first arrival and refused as replayed on every later one:
    /// the same bytes resent, another envelope with the id, and after a restart.
    #[test]
    fn agent_accepts_each_valid_command_exactly_once(
        (now, commands) in now().prop_flat_map(|now| {
            // Few ids, so that some repeat within a case.
            let commands = prop::collection::vec(valid_envelope_at(now, "[a-c]{1,2}"), 1..8);
            (Just(now), commands)
        }),
    ) {
        let mut agent = Agent::start(now);
        let mut accepted: Vec<String> = Vec::new();
        for envelope in &commands {
            let command = sign(envelope);
            let id = &envelope.command_id;
            if accepted.contains(id) {
                prop_assert_eq!(agent.verify(&command, now), Err("replayed"), "{:?}", envelope);
                continue;
            }
            prop_assert_eq!(
                agent.verifier.verify(&command, now).map_err(|r| r.kind()),
                Ok(envelope.clone())
            );
            accepted.push(id.clone());
            prop_assert_eq!(agent.verify(&command, now), Err("replayed"));
            prop_assert!(agent.verifier.seen().contains(id));
        }
        prop_assert_eq!(agent.verifier.seen().len(), accepted.len());
        // Durable: a restarted agent refuses every one of them.
        agent.restart(now);
        for envelope in &commands {
            prop_assert_eq!(agent.verify(&sign(envelope), now), Err("replayed"), "{:?}", envelope);
        }
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// Changing, deleting or inserting one byte of the envelope or of the signature makes it
    /// a bad signature (checked first, over the exact bytes), and the refusal records
    /// nothing: the untouched command is still accepted afterwards.
    #[test]
    fn agent_refuses_any_single_byte_change(
        (now, envelope) in valid_envelope(),
        in_signature in any::<bool>(),
        change in tamper(),
    ) {
        let mut agent = Agent::start(now);
        let command = sign(&envelope);
        let mut tampered = command.clone();
        if in_signature {
            change.apply(&mut tampered.signature);
        } else {
            change.apply(&mut tampered.envelope);
        }
        prop_assert_ne!(&tampered, &command);
        prop_assert_eq!(agent.verify(&tampered, now), Err("bad_signature"));
        prop_assert!(agent.verifier.seen().is_empty());
        prop_assert_eq!(agent.verify(&command, now), Ok(()));
    }

    /// An otherwise valid command that breaks one rule (another node, expired, issued beyond
    /// the skew, lifetime over MAX_TTL_MS) is refused with that rule's kind.
    #[test]
    fn agent_refuses_a_command_breaking_one_rule_with_its_kind(
        (now, valid) in valid_envelope(),
        broken in broken(),
    ) {
        let mut envelope = valid;
        match &broken {
            Broken::OtherNode(node) => envelope.node_id.clone_from(node),
            Broken::ExpiredAgo { ago, ttl } => {
                envelope.expires_at_unix_ms = now - ago;
                envelope.issued_at_unix_ms = envelope.expires_at_unix_ms - ttl;
            }
            Broken::IssuedBeyondSkew { beyond, ttl } => {
                envelope.issued_at_unix_ms = now + MAX_CLOCK_SKEW_MS + beyond;
                envelope.expires_at_unix_ms = envelope.issued_at_unix_ms + ttl;
            }
            Broken::LifetimeOver { over, offset } => {
                envelope.issued_at_unix_ms = now + offset;
                envelope.expires_at_unix_ms =
                    envelope.issued_at_unix_ms.saturating_add(MAX_TTL_MS + over);
            }
        }
        let mut agent = Agent::start(now);
        prop_assert_eq!(agent.verify(&sign(&envelope), now), Err(broken.kind()));
        prop_assert!(agent.verifier.seen().is_empty());
        // The same id, unbroken, is still new.
        prop_assert_eq!(agent.verify(&sign(&valid_twin(&envelope, now)), now), Ok(()));
    }

    /// Any command, however many rules it breaks, is refused with the first broken rule in
    /// the verifier's order, and accepted only if it breaks none.
    #[test]
    fn agent_refuses_with_the_first_broken_rule_in_order(sent in anything()) {
        let now = sent.now;
        let mut agent = Agent::start(now);
        let mut seen = Vec::new();
        let decoded = CommandEnvelope::decode(sent.bytes.as_slice()).ok();
        if sent.seen_first
            && let Some(decoded) = &decoded
            && (1..=64).contains(&decoded.command_id.len())
            && decoded
                .command_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            prop_assert_eq!(agent.verify(&sign(&valid_twin(decoded, now)), now), Ok(()));
            seen.push(decoded.command_id.clone());
        }
        let expected = if sent.forged {
            Some("bad_signature")
        } else {
            first_broken_rule(&sent.bytes, now, &seen)
        };
        let key = if sent.forged { other_key() } else { server_key() };
        let actual = agent.verify(&sign_bytes(key, sent.bytes.clone()), now);
        prop_assert_eq!(actual, expected.map_or(Ok(()), Err), "{:?}", decoded);
        let recorded = usize::from(expected.is_none());
        prop_assert_eq!(agent.verifier.seen().len(), seen.len() + recorded);
    }
}

/// A valid envelope for this node with `envelope`'s id, current at `now`.
fn valid_twin(envelope: &CommandEnvelope, now: i64) -> CommandEnvelope {
    CommandEnvelope {
        command_id: envelope.command_id.clone(),
        node_id: NODE.to_owned(),
        action: "collect-diagnostics".to_owned(),
        parameters: HashMap::new(),
        issued_at_unix_ms: now,
        expires_at_unix_ms: now + 60_000,
    }
}
