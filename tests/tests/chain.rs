//! Chain sampler scenarios against the fake subtensor node: every fault mode shows in the
//! samples within two sampling intervals, standing read through subxt matches the seeded
//! storage, and chain figures reach `guardianctl status` through the real processes.

use std::process::Command;
use std::time::{Duration, Instant};

use guardian_agent::sample::Sampler;
use guardian_agent::sample::chain::{ChainSampler, ChainSettings, StandingTarget};
use guardian_proto::v1::{ChainSample, sample};
use guardian_tests::fake_node::{FakeNode, FakeNodeConfig, ss58};
use guardian_tests::{Scratch, Server, binary, eventually, start_agent};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Sampling interval of these tests; blocks come every 250 ms.
const INTERVAL: Duration = Duration::from_millis(400);
/// The requirement: a fault shows within two sampling intervals.
const TWO_INTERVALS: Duration = Duration::from_millis(800);

struct Rig {
    node: FakeNode,
    sampler: ChainSampler,
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl Rig {
    async fn start() -> anyhow::Result<Self> {
        let node = FakeNode::start(FakeNodeConfig::default()).await?;
        let validator = node.validator();
        let settings = ChainSettings {
            endpoint: node.ws_url(),
            references: vec![],
            call_timeout: Duration::from_millis(250),
            interval: INTERVAL,
            standing: Some(StandingTarget {
                hotkey_ss58: ss58::encode(ss58::BITTENSOR_PREFIX, &validator.hotkey)?,
                netuid: validator.netuid,
            }),
            standing_every_blocks: 25,
        };
        let tasks = TaskTracker::new();
        let stop = CancellationToken::new();
        let sampler = ChainSampler::spawn(settings, &tasks, stop.clone());
        let rig = Self {
            node,
            sampler,
            tasks,
            stop,
        };
        rig.within(
            Duration::from_secs(15),
            "a first healthy sample with standing",
            |c| c.responsive && c.best_block > 0 && c.standing.is_some(),
        )
        .await?;
        Ok(rig)
    }

    fn sample(&self) -> anyhow::Result<ChainSample> {
        let mut sampler = self.sampler.clone();
        match sampler.sample()? {
            sample::Kind::Chain(chain) => Ok(chain),
            other => anyhow::bail!("not a chain sample: {other:?}"),
        }
    }

    /// Polls samples until `check` holds or `limit` passes; returns the sample and the time taken.
    async fn within(
        &self,
        limit: Duration,
        what: &str,
        check: impl Fn(&ChainSample) -> bool,
    ) -> anyhow::Result<(ChainSample, Duration)> {
        let started = Instant::now();
        loop {
            let chain = self.sample()?;
            if check(&chain) {
                return Ok((chain, started.elapsed()));
            }
            if started.elapsed() > limit {
                anyhow::bail!("{what}: not seen within {limit:?}; last sample {chain:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tasks.wait()).await;
        let _ = self.node.shutdown().await;
    }
}

#[tokio::test]
async fn standing_read_through_subxt_matches_the_seeded_storage() -> anyhow::Result<()> {
    let rig = Rig::start().await?;
    let seeded = rig.node.validator();
    let chain = rig.sample()?;
    let standing = chain
        .standing
        .clone()
        .ok_or_else(|| anyhow::anyhow!("no standing"))?;
    assert!(standing.registered);
    assert_eq!(standing.uid, u32::from(seeded.uid));
    assert_eq!(standing.netuid, u32::from(seeded.netuid));
    assert_eq!(standing.validator_permit, seeded.validator_permit);
    assert_eq!(
        standing.validator_trust_raw,
        u32::from(seeded.validator_trust)
    );
    assert_eq!(standing.emission_rao, seeded.emission);
    assert_eq!(standing.active, seeded.active);
    assert_eq!(
        standing.weights_set_rate_limit_blocks,
        seeded.weights_set_rate_limit
    );
    assert_eq!(
        standing.activity_cutoff_blocks,
        u32::from(seeded.activity_cutoff)
    );
    assert_eq!(standing.tempo_blocks, u32::from(seeded.tempo));
    let status = rig.node.status();
    assert_eq!(standing.last_update_block, status.last_update);
    assert!(
        standing.blocks_since_last_update >= seeded.last_update_age,
        "{standing:?}"
    );
    assert_eq!(chain.spec_version, 393);
    assert!(
        chain.peers > 0 && !chain.is_syncing && chain.head_subscribed,
        "{chain:?}"
    );
    rig.stop().await;
    Ok(())
}

#[tokio::test]
async fn every_fault_mode_shows_within_two_sampling_intervals() -> anyhow::Result<()> {
    let rig = Rig::start().await?;

    rig.node.lag(50);
    rig.within(TWO_INTERVALS, "lag", |c| {
        c.is_syncing && c.sync_highest_block.saturating_sub(c.sync_current_block) >= 50
    })
    .await?;
    rig.node.heal();
    rig.within(Duration::from_secs(5), "healed from lag", |c| !c.is_syncing)
        .await?;

    rig.node.drop_peers();
    rig.within(TWO_INTERVALS, "dropped peers", |c| c.peers == 0)
        .await?;
    rig.node.heal();
    rig.within(Duration::from_secs(5), "peers back", |c| c.peers > 0)
        .await?;

    // A frozen head: the best block stops and its age passes one block time plus an interval.
    rig.node.freeze_head();
    let frozen_at = rig.node.best();
    rig.within(TWO_INTERVALS, "frozen head", |c| {
        c.best_block == frozen_at && c.head_age_ms >= 500
    })
    .await?;
    rig.node.heal();
    rig.within(Duration::from_secs(5), "head moving again", |c| {
        c.best_block > frozen_at
    })
    .await?;

    rig.node.stall_finality();
    let stalled_at = rig.node.finalized();
    rig.within(TWO_INTERVALS, "finality stall", |c| {
        c.finalized_block <= stalled_at && c.best_block >= stalled_at + 4
    })
    .await?;
    rig.node.heal();
    rig.within(Duration::from_secs(5), "finality back", |c| {
        c.finalized_block > stalled_at
    })
    .await?;

    rig.node.set_spec_version(394);
    rig.within(TWO_INTERVALS, "runtime upgrade", |c| c.spec_version == 394)
        .await?;

    // The commonest real failure: the socket stays open, nothing answers.
    rig.node.hang();
    let (hung, _) = rig
        .within(TWO_INTERVALS, "unresponsive node", |c| !c.responsive)
        .await?;
    assert!(hung.error.contains("timed out"), "{}", hung.error);
    rig.node.heal();
    rig.within(Duration::from_secs(15), "responsive after a hang", |c| {
        c.responsive
    })
    .await?;

    let reconnects_before = rig.sample()?.reconnects_total;
    rig.node.restart(Duration::from_millis(1000)).await?;
    rig.within(TWO_INTERVALS, "restart seen as unresponsive", |c| {
        !c.responsive
    })
    .await?;
    let (back, _) = rig
        .within(Duration::from_secs(20), "reconnected after restart", |c| {
            c.responsive
        })
        .await?;
    assert!(back.reconnects_total > reconnects_before, "{back:?}");
    rig.stop().await;
    Ok(())
}

#[tokio::test]
async fn chain_figures_and_standing_reach_guardianctl_status() -> anyhow::Result<()> {
    let node = FakeNode::start(FakeNodeConfig::default()).await?;
    let hotkey = ss58::encode(ss58::BITTENSOR_PREFIX, &node.validator().hotkey)?;
    let scratch = Scratch::new(&["val-1"])?;
    let server = Server::start(
        &scratch.server_config(&scratch.sqlite_url(), "")?,
        scratch.path("server.log"),
    )?;
    let chain = format!(
        "[chain]\nendpoint = \"{}\"\ncall_timeout_ms = 300\nhotkey_ss58 = \"{hotkey}\"\nnetuid = {}\n",
        node.ws_url(),
        node.validator().netuid
    );
    let _agent = start_agent(
        &scratch.agent_config_with("val-1", server.grpc, 500, &chain)?,
        scratch.path("agent.log"),
    )?;
    let status = || {
        Command::new(binary("guardianctl")?)
            .args([
                "status",
                "--server",
                &format!("https://{}", server.grpc),
                "--output",
                "json",
            ])
            .arg("--pki-dir")
            .arg(&scratch.pki.dir)
            .output()
            .map_err(anyhow::Error::from)
    };
    let row = eventually(
        Duration::from_secs(30),
        "chain standing in status",
        || async {
            let out = status().ok()?;
            let rows: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let row = rows.get(0)?.clone();
            row["chain"]["standing"]["registered"]
                .as_bool()?
                .then_some(row)
        },
    )
    .await?;
    let chain = &row["chain"];
    assert_eq!(chain["responsive"], true, "{row}");
    assert!(
        chain["best_block"].as_u64().unwrap_or(0) >= 4_000_000,
        "{row}"
    );
    assert_eq!(chain["peers"], 12);
    assert_eq!(chain["standing"]["uid"], 0);
    assert_eq!(chain["standing"]["emission_rao"], node.validator().emission);
    node.shutdown().await?;
    Ok(())
}
