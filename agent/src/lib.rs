//! TaoNode Guardian agent: samples a validator host and streams the samples to the server
//! over mTLS, keeping every batch until the server acks it.
//!
//! Modules in data-flow order: [`sample`] (one sampler per source) -> [`spool`] (numbered
//! batches on disk awaiting ack) -> [`uplink`] (the mTLS stream) -> [`command`] (signed
//! commands from the server: `verify`, then `run` what the local config allows); plus
//! [`config`].

pub mod command;
pub mod config;
pub mod sample;
pub mod spool;
pub mod uplink;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use guardian_proto::v1::NodeDescriptor;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::AgentConfig;
use crate::sample::Sampler;
use crate::spool::Spool;
use crate::uplink::Shared;

/// How long shutdown waits for the sampling loop and the uplink.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(5);

/// Runs the agent until `shutdown` is cancelled, with `spool` (opened by the caller, see
/// [`Spool::open`], so a spool that cannot be opened stops the agent before it starts).
///
/// `commands` is `None` when remote commands are off (every command is then refused).
pub async fn run(
    config: AgentConfig,
    spool: Spool,
    commands: Option<uplink::RemoteCommands>,
    shutdown: CancellationToken,
) {
    let tasks = TaskTracker::new();
    let mut samplers: Vec<Box<dyn Sampler>> = vec![Box::new(sample::host::HostSampler::new(
        config.proc_root.clone(),
        config.chain_data_path.clone(),
    ))];
    if config.gpu {
        samplers.push(Box::new(sample::gpu::GpuSampler::new()));
    }
    if !config.keystore_path.as_os_str().is_empty() {
        samplers.push(Box::new(sample::keystore::KeystoreSampler::new(
            config.keystore_path.clone(),
            config.proc_root.clone(),
        )));
    }
    if config.chain.enabled {
        let chain = &config.chain;
        let settings = sample::chain::ChainSettings {
            endpoint: chain.endpoint.clone(),
            references: chain.references.clone(),
            call_timeout: Duration::from_millis(chain.call_timeout_ms),
            interval: Duration::from_millis(config.sample_interval_ms),
            standing: (!chain.hotkey_ss58.is_empty()).then(|| sample::chain::StandingTarget {
                hotkey_ss58: chain.hotkey_ss58.clone(),
                netuid: chain.netuid,
            }),
            standing_every_blocks: chain.standing_every_blocks,
        };
        samplers.push(Box::new(sample::chain::ChainSampler::spawn(
            settings,
            &tasks,
            shutdown.clone(),
        )));
    }
    let capabilities: Vec<String> = samplers.iter().map(|s| s.name().to_owned()).collect();
    let descriptor = NodeDescriptor {
        node_id: config.node_id.clone(),
        hostname: read_trimmed("/proc/sys/kernel/hostname"),
        network: config.network.clone(),
        kernel_release: read_trimmed("/proc/sys/kernel/osrelease"),
        kubernetes_node: downward("NODE_NAME"),
        pod_name: downward("POD_NAME"),
        pod_namespace: downward("POD_NAMESPACE"),
    };
    let shared = Arc::new(Shared {
        spool: Mutex::new(spool),
        queued: Notify::new(),
        interval_ms: watch::channel(config.sample_interval_ms).0,
        commands,
        outcomes: Mutex::default(),
        outcome_ready: Notify::new(),
    });
    tasks.spawn(
        sample_loop(samplers, Arc::clone(&shared), shutdown.clone())
            .instrument(tracing::info_span!("sample_loop")),
    );
    tasks.spawn(
        uplink::run(config, descriptor, capabilities, shared, shutdown.clone())
            .instrument(tracing::info_span!("uplink")),
    );
    tasks.close();
    shutdown.cancelled().await;
    if tokio::time::timeout(SHUTDOWN_DEADLINE, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("agent tasks still running after the shutdown deadline");
    }
}

/// Takes one round of samples per interval and queues it as one batch.
async fn sample_loop(
    mut samplers: Vec<Box<dyn Sampler>>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let mut interval_rx = shared.interval_ms.subscribe();
    let mut ticker = new_ticker(*interval_rx.borrow_and_update());
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
            Ok(()) = interval_rx.changed() => {
                let ms = *interval_rx.borrow_and_update();
                tracing::info!(interval_ms = ms, "SampleIntervalChanged");
                ticker = new_ticker(ms);
                continue;
            }
        }
        let now = unix_ms();
        let samples: Vec<_> = samplers
            .iter_mut()
            .map(|sampler| sample::take(sampler.as_mut(), now))
            .collect();
        // The spool logs drops and I/O failures itself (rate-limited, with counts).
        let _ = shared.spool().push(samples);
        shared.queued.notify_one();
    }
}

fn new_ticker(ms: u64) -> tokio::time::Interval {
    let mut ticker = tokio::time::interval(Duration::from_millis(ms.max(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Wall-clock now in Unix milliseconds.
pub fn unix_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

/// A Kubernetes downward-API value from the environment (a DaemonSet sets `NODE_NAME`,
/// `POD_NAME` and `POD_NAMESPACE` from fieldRefs); empty when unset or not a plausible
/// Kubernetes name (at most 253 characters of a-z, 0-9, '-' and '.').
fn downward(var: &str) -> String {
    std::env::var(var)
        .ok()
        .filter(|v| {
            v.len() <= 253
                && v.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        })
        .unwrap_or_default()
}
