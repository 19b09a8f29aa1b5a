//! The fake subtensor node: subxt accepts it, its blocks are real header hashes, and every
//! fault mode is visible over plain JSON-RPC, in-process and through the `fake-subtensor` binary.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use guardian_tests::fake_node::{FakeNode, FakeNodeConfig, FakeStatus, SeededValidator, ss58};
use guardian_tests::{Proc, eventually};
use jsonrpsee::core::client::{ClientT, SubscriptionClientT};
use jsonrpsee::core::params::ArrayParams;
use jsonrpsee::http_client::HttpClientBuilder;
use jsonrpsee::rpc_params;
use jsonrpsee::ws_client::WsClientBuilder;
use parity_scale_codec::{Compact, Decode, Encode};
use serde_json::Value;

const ALICE_SS58: &str = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY";
const ALICE_HEX: &str = "d43593c715fdd31c61141abd04a99fd6822c8558854ccde39a5684e7a56da27d";

async fn start() -> anyhow::Result<FakeNode> {
    FakeNode::start(FakeNodeConfig::default()).await
}

/// One call over a fresh HTTP connection.
async fn rpc(url: &str, method: &str, params: ArrayParams) -> anyhow::Result<Value> {
    let client = HttpClientBuilder::default()
        .request_timeout(Duration::from_secs(5))
        .build(url)?;
    Ok(client.request(method, params).await?)
}

async fn sync_state(url: &str) -> anyhow::Result<(u64, u64)> {
    let s = rpc(url, "system_syncState", rpc_params![]).await?;
    let n = |k: &str| {
        s[k].as_u64()
            .ok_or_else(|| anyhow::anyhow!("no {k} in {s}"))
    };
    Ok((n("currentBlock")?, n("highestBlock")?))
}

fn number(header: &Value) -> anyhow::Result<u64> {
    let text = header["number"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no number in {header}"))?;
    Ok(u64::from_str_radix(text.trim_start_matches("0x"), 16)?)
}

fn bytes(v: &Value) -> anyhow::Result<Vec<u8>> {
    let text = v
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("{v} is not a string"))?;
    Ok(hex::decode(text.trim_start_matches("0x"))?)
}

/// SCALE of a header as the node serves it, computed independently of the node's code.
fn header_hash(header: &Value) -> anyhow::Result<[u8; 32]> {
    let mut out = bytes(&header["parentHash"])?;
    Compact(number(header)?).encode_to(&mut out);
    out.extend(bytes(&header["stateRoot"])?);
    out.extend(bytes(&header["extrinsicsRoot"])?);
    let logs = header["digest"]["logs"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("no digest logs"))?;
    anyhow::ensure!(logs.is_empty(), "the fake serves empty digests");
    Compact(0u32).encode_to(&mut out);
    Ok(sp_crypto_hashing::blake2_256(&out))
}

#[test]
fn ss58_round_trips_alice_and_rejects_a_bad_checksum() -> anyhow::Result<()> {
    let (prefix, account) = ss58::decode(ALICE_SS58)?;
    assert_eq!(prefix, 42);
    assert_eq!(hex::encode(account), ALICE_HEX);
    assert_eq!(ss58::encode(42, &account)?, ALICE_SS58);
    // Polkadot (prefix 0) and a two-byte prefix round-trip too.
    for prefix in [0u16, 2, 42, 63, 64, 255, 1284, 16383] {
        let encoded = ss58::encode(prefix, &account)?;
        assert_eq!(
            ss58::decode(&encoded)?,
            (prefix, account),
            "prefix {prefix}"
        );
    }
    let mut tampered = ALICE_SS58.to_owned();
    tampered.replace_range(10..11, if &ALICE_SS58[10..11] == "a" { "b" } else { "a" });
    assert!(ss58::decode(&tampered).is_err());
    assert!(ss58::decode("0OIl").is_err());
    assert_eq!(ss58::base58_encode(&[0, 0, 1]), "112");
    assert_eq!(ss58::base58_decode("112")?, vec![0, 0, 1]);
    Ok(())
}

#[tokio::test]
async fn subxt_reads_the_seeded_validator_standing() -> anyhow::Result<()> {
    use subxt::dynamic::storage;
    let validator = SeededValidator {
        netuid: 7,
        uid: 3,
        subnet_size: 10,
        last_update_age: 50,
        validator_trust: 51_234,
        emission: 987_654_321,
        weights_set_rate_limit: 123,
        activity_cutoff: 4321,
        tempo: 99,
        ..SeededValidator::default()
    };
    let fake = FakeNode::start(FakeNodeConfig {
        validator: validator.clone(),
        ..FakeNodeConfig::default()
    })
    .await?;
    let api = subxt::OnlineClient::<subxt::PolkadotConfig>::from_url(fake.ws_url()).await?;
    let at = api.at_current_block().await?;
    let finalized = at.block_number();
    assert!(finalized + 2 >= fake.best() - 1 && finalized <= fake.best());
    let hotkey = validator.hotkey;
    let netuid = validator.netuid;

    let uid = at
        .storage()
        .fetch(
            storage::<(u16, [u8; 32]), u16>("SubtensorModule", "Uids"),
            (netuid, hotkey),
        )
        .await?
        .decode()?;
    assert_eq!(uid, 3);
    let key = at
        .storage()
        .fetch(
            storage::<(u16, u16), [u8; 32]>("SubtensorModule", "Keys"),
            (netuid, uid),
        )
        .await?
        .decode()?;
    assert_eq!(key, hotkey);
    let last_update = at
        .storage()
        .fetch(
            storage::<(u16,), Vec<u64>>("SubtensorModule", "LastUpdate"),
            (netuid,),
        )
        .await?
        .decode()?;
    assert_eq!(last_update.len(), 10);
    assert_eq!(last_update[3], 4_000_000 - 50);
    let trust = at
        .storage()
        .fetch(
            storage::<(u16,), Vec<u16>>("SubtensorModule", "ValidatorTrust"),
            (netuid,),
        )
        .await?
        .decode()?;
    assert_eq!(trust[3], 51_234);
    let permit = at
        .storage()
        .fetch(
            storage::<(u16,), Vec<bool>>("SubtensorModule", "ValidatorPermit"),
            (netuid,),
        )
        .await?
        .decode()?;
    assert!(permit[3]);
    let emission = at
        .storage()
        .fetch(
            storage::<(u16,), Vec<u64>>("SubtensorModule", "Emission"),
            (netuid,),
        )
        .await?
        .decode()?;
    assert_eq!(emission[3], 987_654_321);
    let active = at
        .storage()
        .fetch(
            storage::<(u16,), Vec<bool>>("SubtensorModule", "Active"),
            (netuid,),
        )
        .await?
        .decode()?;
    assert!(active[3]);
    let dividends = at
        .storage()
        .fetch(
            storage::<(u16,), Vec<u16>>("SubtensorModule", "Dividends"),
            (netuid,),
        )
        .await?
        .decode()?;
    assert_eq!(dividends[3], validator.dividends);
    let rate_limit = at
        .storage()
        .fetch(
            storage::<(u16,), u64>("SubtensorModule", "WeightsSetRateLimit"),
            (netuid,),
        )
        .await?
        .decode()?;
    assert_eq!(rate_limit, 123);
    let cutoff = at
        .storage()
        .fetch(
            storage::<(u16,), u16>("SubtensorModule", "ActivityCutoff"),
            (netuid,),
        )
        .await?
        .decode()?;
    assert_eq!(cutoff, 4321);
    let tempo = at
        .storage()
        .fetch(
            storage::<(u16,), u16>("SubtensorModule", "Tempo"),
            (netuid,),
        )
        .await?
        .decode()?;
    assert_eq!(tempo, 99);

    // A later block sees a changed LastUpdate.
    fake.set_last_update(4_000_010);
    let later = api.at_current_block().await?;
    let last_update = later
        .storage()
        .fetch(
            storage::<(u16,), Vec<u64>>("SubtensorModule", "LastUpdate"),
            (netuid,),
        )
        .await?
        .decode()?;
    assert_eq!(last_update[3], 4_000_010);
    Ok(())
}

#[tokio::test]
async fn blocks_advance_and_each_hash_is_the_header_hash() -> anyhow::Result<()> {
    let fake = start().await?;
    let url = fake.http_url();
    let first = rpc(&url, "chain_getHeader", rpc_params![]).await?;
    let first_number = number(&first)?;
    assert!(first_number >= 4_000_000);
    let ws = WsClientBuilder::default().build(fake.ws_url()).await?;
    let mut heads = ws
        .subscribe::<Value, _>(
            "chain_subscribeNewHeads",
            rpc_params![],
            "chain_unsubscribeNewHeads",
        )
        .await?;
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let next = tokio::time::timeout(Duration::from_secs(3), heads.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("subscription ended"))??;
        seen.push(number(&next)?);
    }
    assert!(seen.windows(2).all(|w| w[1] == w[0] + 1), "{seen:?}");
    let best = number(&rpc(&url, "chain_getHeader", rpc_params![]).await?)?;
    assert!(best > first_number);

    let mut parent: Option<[u8; 32]> = None;
    for n in best - 5..=best {
        let hash = rpc(&url, "chain_getBlockHash", rpc_params![n]).await?;
        let header = rpc(&url, "chain_getHeader", rpc_params![hash.clone()]).await?;
        assert_eq!(number(&header)?, n);
        let computed = header_hash(&header)?;
        assert_eq!(bytes(&hash)?, computed.to_vec(), "block {n}");
        if let Some(p) = parent {
            assert_eq!(bytes(&header["parentHash"])?, p.to_vec());
        }
        parent = Some(computed);
        let block = rpc(&url, "chain_getBlock", rpc_params![hash]).await?;
        assert_eq!(block["block"]["header"], header);
        assert_eq!(block["block"]["extrinsics"], serde_json::json!([]));
    }
    let finalized_hash = rpc(&url, "chain_getFinalizedHead", rpc_params![]).await?;
    let finalized = rpc(&url, "chain_getHeader", rpc_params![finalized_hash]).await?;
    let status = fake.status();
    assert!(number(&finalized)? + 3 >= status.best && number(&finalized)? + 2 <= status.best);
    let genesis = rpc(&url, "chain_getBlockHash", rpc_params![0]).await?;
    assert_eq!(
        genesis,
        Value::from(guardian_tests::fake_node::FINNEY_GENESIS_HASH)
    );
    let methods = rpc(&url, "rpc_methods", rpc_params![]).await?;
    let methods = methods["methods"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("no methods"))?;
    assert!(methods.iter().any(|m| m == "state_getStorage"));
    assert!(!methods.iter().any(|m| {
        m.as_str().is_some_and(|m| {
            m.starts_with("chainHead_v1") || m.starts_with("archive_v1") || m.starts_with("fake_")
        })
    }));
    Ok(())
}

#[tokio::test]
async fn lagging_node_reports_syncing_behind_an_advancing_tip() -> anyhow::Result<()> {
    let fake = start().await?;
    let url = fake.http_url();
    fake.lag(20);
    let (current, highest) = sync_state(&url).await?;
    assert!(highest - current >= 20, "{current} {highest}");
    let health = rpc(&url, "system_health", rpc_params![]).await?;
    assert_eq!(health["isSyncing"], Value::Bool(true));
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (current2, highest2) = sync_state(&url).await?;
    assert!(highest2 > highest, "the tip keeps advancing");
    assert_eq!(highest2 - current2, 20);
    fake.heal();
    let (current3, highest3) = sync_state(&url).await?;
    assert_eq!(current3, highest3);
    let health = rpc(&url, "system_health", rpc_params![]).await?;
    assert_eq!(health["isSyncing"], Value::Bool(false));
    Ok(())
}

#[tokio::test]
async fn frozen_head_stops_best_and_claims_to_be_synced() -> anyhow::Result<()> {
    let fake = start().await?;
    let url = fake.http_url();
    fake.freeze_head();
    let (current, highest) = sync_state(&url).await?;
    assert_eq!(current, highest);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let head = number(&rpc(&url, "chain_getHeader", rpc_params![]).await?)?;
    assert_eq!(head, current, "no new blocks while frozen");
    let health = rpc(&url, "system_health", rpc_params![]).await?;
    assert_eq!(health["isSyncing"], Value::Bool(false));
    fake.heal();
    eventually(Duration::from_secs(3), "blocks again", || async {
        (fake.best() > current).then_some(())
    })
    .await
}

#[tokio::test]
async fn stalled_finality_keeps_best_moving() -> anyhow::Result<()> {
    let fake = start().await?;
    let url = fake.http_url();
    fake.stall_finality();
    let finalized = rpc(&url, "chain_getFinalizedHead", rpc_params![]).await?;
    let best = fake.best();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        rpc(&url, "chain_getFinalizedHead", rpc_params![]).await?,
        finalized
    );
    assert!(fake.best() >= best + 2);
    fake.heal();
    assert_eq!(fake.finalized(), fake.best() - 2);
    Ok(())
}

#[tokio::test]
async fn dropped_peers_report_zero() -> anyhow::Result<()> {
    let fake = start().await?;
    let url = fake.http_url();
    assert_eq!(
        rpc(&url, "system_health", rpc_params![]).await?["peers"],
        12
    );
    fake.drop_peers();
    assert_eq!(rpc(&url, "system_health", rpc_params![]).await?["peers"], 0);
    fake.heal();
    assert_eq!(
        rpc(&url, "system_health", rpc_params![]).await?["peers"],
        12
    );
    Ok(())
}

#[tokio::test]
async fn hung_node_answers_only_admin_calls() -> anyhow::Result<()> {
    let fake = start().await?;
    let ws = WsClientBuilder::default()
        .request_timeout(Duration::from_millis(500))
        .build(fake.ws_url())
        .await?;
    let _: Value = ws.request("chain_getHead", rpc_params![]).await?;
    fake.hang();
    let started = Instant::now();
    let result: Result<Value, _> = ws.request("chain_getHead", rpc_params![]).await;
    assert!(result.is_err(), "old connection: {result:?}");
    assert!(started.elapsed() >= Duration::from_millis(450));
    // A new connection is accepted but not answered either (HTTP and WebSocket).
    let http = HttpClientBuilder::default()
        .request_timeout(Duration::from_millis(500))
        .build(fake.http_url())?;
    let result: Result<Value, _> = http.request("system_health", rpc_params![]).await;
    assert!(result.is_err(), "new connection: {result:?}");
    let ws2 = WsClientBuilder::default()
        .request_timeout(Duration::from_millis(500))
        .build(fake.ws_url())
        .await?;
    let result: Result<Value, _> = ws2.request("system_health", rpc_params![]).await;
    assert!(result.is_err(), "new ws connection: {result:?}");
    // Admin methods still answer.
    let status: FakeStatus = http.request("fake_status", rpc_params![]).await?;
    assert!(status.hanging);
    let status: FakeStatus = ws.request("fake_heal", rpc_params![]).await?;
    assert!(!status.hanging);
    let _: Value = ws.request("chain_getHead", rpc_params![]).await?;
    Ok(())
}

#[tokio::test]
async fn restarted_node_refuses_then_listens_on_the_same_port() -> anyhow::Result<()> {
    let fake = start().await?;
    let addr = fake.addr();
    let ws = WsClientBuilder::default().build(fake.ws_url()).await?;
    let _: Value = ws.request("chain_getHead", rpc_params![]).await?;
    let began = Instant::now();
    fake.restart(Duration::from_millis(1500)).await?;
    // The open connection is cut.
    tokio::time::timeout(Duration::from_secs(2), ws.on_disconnect()).await?;
    assert!(!ws.is_connected());
    // The port refuses while down.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    assert!(
        rpc(&fake.http_url(), "chain_getHead", rpc_params![])
            .await
            .is_err()
    );
    assert!(!fake.status().listening);
    // And answers again on the same port afterwards.
    eventually(
        Duration::from_secs(5),
        "the node to listen again",
        || async {
            rpc(&fake.http_url(), "chain_getHead", rpc_params![])
                .await
                .ok()
        },
    )
    .await?;
    assert!(began.elapsed() >= Duration::from_millis(1400));
    assert_eq!(fake.addr(), addr);
    let ws = WsClientBuilder::default().build(fake.ws_url()).await?;
    let _: Value = ws.request("chain_getHead", rpc_params![]).await?;
    Ok(())
}

#[tokio::test]
async fn runtime_upgrade_changes_the_spec_version() -> anyhow::Result<()> {
    let fake = start().await?;
    let url = fake.http_url();
    let ws = WsClientBuilder::default().build(fake.ws_url()).await?;
    let mut versions = ws
        .subscribe::<Value, _>(
            "state_subscribeRuntimeVersion",
            rpc_params![],
            "state_unsubscribeRuntimeVersion",
        )
        .await?;
    let first = tokio::time::timeout(Duration::from_secs(2), versions.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("subscription ended"))??;
    assert_eq!(first["specVersion"], 393);
    let version = rpc(&url, "state_getRuntimeVersion", rpc_params![]).await?;
    assert_eq!(version["specVersion"], 393);
    assert_eq!(version["transactionVersion"], 1);

    fake.set_spec_version(394);
    let pushed = tokio::time::timeout(Duration::from_secs(2), versions.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("subscription ended"))??;
    assert_eq!(pushed["specVersion"], 394);
    let version = rpc(&url, "state_getRuntimeVersion", rpc_params![]).await?;
    assert_eq!(version["specVersion"], 394);
    let core = rpc(&url, "state_call", rpc_params!["Core_version", "0x"]).await?;
    let core = bytes(&core)?;
    let mut input = &core[..];
    let (_spec_name, _impl_name, _authoring, spec_version) =
        <(String, String, u32, u32)>::decode(&mut input)?;
    assert_eq!(spec_version, 394);
    Ok(())
}

#[tokio::test]
async fn admin_methods_drive_the_faults_over_json_rpc() -> anyhow::Result<()> {
    let fake = start().await?;
    let url = fake.http_url();
    let status: Value = rpc(&url, "fake_lag", rpc_params![7]).await?;
    assert_eq!(status["lag"], 7);
    let (current, highest) = sync_state(&url).await?;
    assert!(highest - current >= 7);
    rpc(&url, "fake_dropPeers", rpc_params![]).await?;
    rpc(&url, "fake_stallFinality", rpc_params![]).await?;
    rpc(&url, "fake_setSpecVersion", rpc_params![400]).await?;
    rpc(&url, "fake_setLastUpdate", rpc_params![123]).await?;
    let status: FakeStatus =
        serde_json::from_value(rpc(&url, "fake_status", rpc_params![]).await?)?;
    assert_eq!(status.peers, 0);
    assert!(status.finality_stalled);
    assert_eq!(status.spec_version, 400);
    assert_eq!(status.last_update, 123);
    rpc(
        &url,
        "fake_setValidator",
        rpc_params![serde_json::json!({"validatorPermit": false, "emission": 5})],
    )
    .await?;
    assert!(!fake.validator().validator_permit);
    assert_eq!(fake.validator().emission, 5);
    rpc(&url, "fake_freezeHead", rpc_params![]).await?;
    assert!(fake.status().frozen);
    let status: FakeStatus = serde_json::from_value(rpc(&url, "fake_heal", rpc_params![]).await?)?;
    assert_eq!(status.lag, 0);
    assert_eq!(status.peers, 12);
    assert!(!status.frozen && !status.finality_stalled);
    // Down long enough that a 100 ms poll on a busy machine cannot miss it.
    rpc(&url, "fake_restart", rpc_params![1000]).await?;
    eventually(Duration::from_secs(2), "the restart to begin", || async {
        (!fake.status().listening).then_some(())
    })
    .await?;
    eventually(
        Duration::from_secs(5),
        "the node to listen again",
        || async { rpc(&url, "fake_status", rpc_params![]).await.ok() },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn binary_prints_its_listening_line_and_serves() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("fake-subtensor.log");
    let mut child = Command::new(guardian_tests::binary("fake-subtensor")?)
        .args(["--listen", "127.0.0.1:0", "--block-ms", "200"])
        .args(["--hotkey", ALICE_SS58, "--netuid", "3", "--uid", "2"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut proc = Proc { child, log };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(20))
        .map_err(|e| anyhow::anyhow!("no listening line ({e}); log: {}", proc.log_text()))?;
    let ws_url = line
        .trim()
        .strip_prefix("fake-subtensor listening ")
        .ok_or_else(|| anyhow::anyhow!("unexpected line {line:?}"))?
        .to_owned();
    let http_url = ws_url.replacen("ws://", "http://", 1);
    assert_eq!(
        rpc(&http_url, "system_chain", rpc_params![]).await?,
        "Bittensor"
    );
    let ws = WsClientBuilder::default().build(&ws_url).await?;
    let props: Value = ws.request("system_properties", rpc_params![]).await?;
    assert_eq!(props["ss58Format"], 42);
    rpc(&http_url, "fake_lag", rpc_params![4]).await?;
    let (current, highest) = sync_state(&http_url).await?;
    assert!(highest - current >= 4);
    let status: FakeStatus =
        serde_json::from_value(rpc(&http_url, "fake_heal", rpc_params![]).await?)?;
    assert_eq!(status.lag, 0);
    assert_eq!(proc.terminate()?, Some(0), "log: {}", proc.log_text());
    Ok(())
}

#[tokio::test]
async fn a_dropped_node_closes_its_port() -> anyhow::Result<()> {
    let fake = start().await?;
    let addr = fake.addr();
    let ws = WsClientBuilder::default().build(fake.ws_url()).await?;
    fake.shutdown().await?;
    drop(fake);
    tokio::time::timeout(Duration::from_secs(2), ws.on_disconnect()).await?;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    Ok(())
}
