//! `guardian-loadgen`: a fleet load generator. `pki` writes certificates for N simulated
//! agents; `run` streams realistic sample batches from each of them, over its own mTLS
//! connection, to a running `guardian-server` and reports throughput and ack latency.
//! With `--lag-agents N` the first N agents fall [`LAG_BLOCKS`] behind the chain tip
//! `--lag-after-s` into the run, and the report measures the server's remediation: the time
//! from each one's first lagging batch to the signed command on its stream, and any command
//! that reached an agent that was not lagging (a false positive).
//!
//! Data flow of `run`: [`SampleGen`] builds an agent's batches -> [`agent`] tasks send them,
//! match acks and time commands -> [`Stats`] (counters and [`LatencyHistogram`]s) -> [`Report`]
//! on stdout.
//!
//! # Guarantees
//! - Bounded time: a connect phase of at most 60 s, `--duration-s` of sending, at most 10 s
//!   waiting for outstanding acks, 5 s joining the agent tasks.
//! - Bounded memory: an agent keeps at most 256 unacked batches, and only their seq and
//!   timestamp; a batch is rebuilt deterministically from them when it is resent, so a
//!   resend carries the original seq and identical contents. Histograms have fixed buckets.
//! - Sequence numbers follow the agent protocol: the first batch is `last_stored_seq + 1`
//!   from the first Welcome, then +1 per batch, never reused.

use std::collections::{BTreeMap, VecDeque};
use std::f64::consts::TAU;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use guardian_proto::v1::uplink_client::UplinkClient;
use guardian_proto::v1::{
    AgentFrame, ChainSample, Command, CommandEnvelope, DiskIo, Filesystem, GpuDevice, GpuProcess,
    GpuSample, Hello, HostSample, NetIo, NodeDescriptor, Pressure, ReferenceTip, Sample,
    SampleBatch, ServerFrame, ValidatorStanding, Welcome, agent_frame, sample, server_frame,
};
use guardian_server::pki::{self, PkiRequest};
use prost::Message;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tracing::Instrument;

/// Most batches one agent keeps sent-but-unacked (the real agent's window).
const IN_FLIGHT_WINDOW: usize = 256;
/// Time allowed for TCP+TLS, and again for the Welcome.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the first connect of every agent may take before sending starts anyway.
const CONNECT_PHASE_MAX: Duration = Duration::from_secs(60);
/// How long the end of the run waits for outstanding acks.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long aborted agent tasks get to finish before they are dropped.
const JOIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Progress line cadence.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Reconnect backoff: first window and cap, in milliseconds (the agent's defaults,
/// `reconnect.initial_ms` and `reconnect.max_ms`).
const BACKOFF_INITIAL_MS: u64 = 500;
const BACKOFF_MAX_MS: u64 = 30_000;
/// sysexits EX_USAGE, for invalid arguments.
const EXIT_USAGE: u8 = 64;
/// Blocks a lagging agent's node stays behind the tip (`--lag-agents`).
const LAG_BLOCKS: u64 = 50;

// ---------------------------------------------------------------- command line

/// Fleet load generator for guardian-server: N simulated agents over real mTLS streams.
#[derive(Debug, Parser)]
#[command(name = "guardian-loadgen", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Writes a fresh throwaway PKI: CA, server (localhost), operator "bench" and nodes
    /// PREFIX0001..PREFIXNNNN.
    Pki(PkiArgs),
    /// Runs the simulated agents against a server and prints the report.
    Run(RunArgs),
    /// Times the server's batch decoder (`guardian_server::batch::Batch::decode`) on the
    /// generator's batches, in this process: no server, no network.
    Decode(DecodeArgs),
}

#[derive(Debug, clap::Args)]
struct DecodeArgs {
    /// Samples per batch, as for `run`.
    #[arg(long, default_value_t = 50)]
    samples_per_batch: usize,
    /// Distinct batches generated (from 100 agents) and decoded in turn.
    #[arg(long, default_value_t = 1_000)]
    batches: usize,
    /// Passes over them; the best pass is reported.
    #[arg(long, default_value_t = 20)]
    passes: usize,
}

#[derive(Debug, clap::Args)]
struct PkiArgs {
    /// Folder for the PEM files (created; an existing PKI there is replaced).
    #[arg(long)]
    dir: PathBuf,
    /// Number of agent certificates.
    #[arg(long)]
    agents: u32,
    /// Node id prefix; ids are PREFIX + a number zero-padded to at least 4 digits.
    #[arg(long, default_value = "load")]
    prefix: String,
}

#[derive(Debug, Clone, clap::Args)]
struct RunArgs {
    /// Server URL, e.g. https://127.0.0.1:7443.
    #[arg(long)]
    server: String,
    /// Folder written by `guardian-loadgen pki`.
    #[arg(long)]
    pki_dir: PathBuf,
    /// Number of simulated agents (each with its own connection).
    #[arg(long)]
    agents: u32,
    /// Node id prefix used when the PKI was written.
    #[arg(long, default_value = "load")]
    prefix: String,
    /// Batches per second per agent.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Samples per batch, all kinds counted (host, one chain, a gpu every 10th batch).
    #[arg(long, default_value_t = 10)]
    samples_per_batch: usize,
    /// Seconds of sending, after the connect phase.
    #[arg(long, default_value_t = 30)]
    duration_s: u64,
    /// Chain network reported in Hello.
    #[arg(long, default_value = "finney")]
    network: String,
    /// Most TLS handshakes (connect + Hello + Welcome) in progress at once.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Name the server's certificate is checked against.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
    /// Add each node's sent seq range and acked_through to the report.
    #[arg(long)]
    per_node: bool,
    /// Agents whose node falls 50 blocks behind the chain tip: the first N of the fleet.
    #[arg(long, default_value_t = 0)]
    lag_agents: u32,
    /// Seconds into the sending phase at which the `--lag-agents` fall behind (and stay).
    #[arg(long, default_value_t = 10)]
    lag_after_s: u64,
    /// Minutes of history that each agent's first batches also carry (a host and a chain
    /// sample every 10 s; `--backfill-steps-per-batch` steps a batch, oldest first, as a spool
    /// replay after an outage brings them): the server's windows fill as after that long of
    /// streaming, within the first minutes of the run (memory benchmarks of the steady state).
    #[arg(long, default_value_t = 0)]
    backfill_minutes: u32,
    /// 10 s steps of history each early batch carries with `--backfill-minutes` (each a
    /// host and a chain sample): fewer spread the replay over more batches, so that a large
    /// fleet's replay does not outrun the server.
    #[arg(long, default_value_t = 6)]
    backfill_steps_per_batch: u32,
}

impl RunArgs {
    /// Checks every flag before anything is read or connected.
    fn validate(&self) -> Result<(), String> {
        if self.agents == 0 || self.agents > 100_000 {
            return Err("--agents must be 1..=100000".into());
        }
        if !(self.rate.is_finite() && self.rate > 0.0 && self.rate <= 1_000.0) {
            return Err("--rate must be > 0 and <= 1000 batches/s per agent".into());
        }
        let most = guardian_server::ingest::MAX_SAMPLES_PER_BATCH;
        if self.samples_per_batch == 0 || self.samples_per_batch > most {
            return Err(format!(
                "--samples-per-batch must be 1..={most} (the server's limit)"
            ));
        }
        if self.duration_s == 0 || self.duration_s > 86_400 {
            return Err("--duration-s must be 1..=86400".into());
        }
        if self.lag_agents > self.agents {
            return Err(format!(
                "--lag-agents {} is more than --agents {}",
                self.lag_agents, self.agents
            ));
        }
        if self.lag_agents > 0 && self.lag_after_s >= self.duration_s {
            return Err(format!(
                "--lag-after-s {} must be under --duration-s {}: the fault would start after sending stops",
                self.lag_after_s, self.duration_s
            ));
        }
        if self.connect_concurrency == 0 {
            return Err("--connect-concurrency must be at least 1".into());
        }
        if !(1..=60).contains(&self.backfill_steps_per_batch) {
            return Err("--backfill-steps-per-batch must be 1 to 60".into());
        }
        let extra = 2 * self.backfill_steps_per_batch as usize;
        if self.backfill_minutes > 0
            && self.samples_per_batch + extra > guardian_server::ingest::MAX_SAMPLES_PER_BATCH
        {
            return Err(format!(
                "--backfill-minutes adds {extra} samples to each early batch, over the server's limit with --samples-per-batch {}",
                self.samples_per_batch
            ));
        }
        if self.backfill_minutes > 24 * 60 {
            return Err("--backfill-minutes must be at most 1440 (a day)".into());
        }
        if self.network.is_empty() || self.network.len() > 253 {
            return Err("--network must be 1 to 253 bytes".into());
        }
        if !self.server.starts_with("https://") {
            return Err(format!(
                "--server {:?} must be an https:// URL (the uplink is mTLS only)",
                self.server
            ));
        }
        check_prefix(&self.prefix)?;
        // The largest batch (a gpu one) must fit the server's frame limit.
        let generator = SampleGen::new(1, self.samples_per_batch, self.period());
        let size = generator.batch(10, 0).encoded_len();
        if size > guardian_proto::DEFAULT_MAX_FRAME_BYTES {
            return Err(format!(
                "--samples-per-batch {} makes {size}-byte batches; the server accepts frames up to {} bytes",
                self.samples_per_batch,
                guardian_proto::DEFAULT_MAX_FRAME_BYTES
            ));
        }
        Ok(())
    }

    fn period(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.rate)
    }
}

fn check_prefix(prefix: &str) -> Result<(), String> {
    guardian_proto::check_name(&node_name(prefix, 1, 9))
        .map_err(|why| format!("--prefix {prefix:?} does not make a valid node id: {why}"))
}

/// Digits in node numbers: at least 4, more when `agents` needs them.
fn name_width(agents: u32) -> usize {
    agents.to_string().len().max(4)
}

/// `PREFIX` + `index` zero-padded to `width` digits (`load0001`).
fn node_name(prefix: &str, index: u32, width: usize) -> String {
    format!("{prefix}{index:0width$}")
}

// ---------------------------------------------------------------- pki

fn write_pki(args: &PkiArgs) -> anyhow::Result<()> {
    if args.agents == 0 {
        bail!("--agents must be at least 1");
    }
    check_prefix(&args.prefix).map_err(anyhow::Error::msg)?;
    let width = name_width(args.agents);
    let nodes: Vec<String> = (1..=args.agents)
        .map(|i| node_name(&args.prefix, i, width))
        .collect();
    let started = std::time::Instant::now();
    // Certificates of an earlier, larger PKI with the same prefix would chain to the old CA.
    let stale = remove_stale_nodes(&args.dir, &args.prefix, &nodes)?;
    let files = pki::init(
        &args.dir,
        &PkiRequest {
            nodes,
            operator: "bench".into(),
            server_names: vec![],
            force: true,
            network: None,
        },
    )?;
    eprintln!(
        "guardian-loadgen: wrote {} files ({} node certificates {}..{}) to {} in {:.2} s{}",
        files.written.len(),
        args.agents,
        node_name(&args.prefix, 1, width),
        node_name(&args.prefix, args.agents, width),
        args.dir.display(),
        started.elapsed().as_secs_f64(),
        if stale > 0 {
            format!(" (removed {stale} stale node files)")
        } else {
            String::new()
        }
    );
    Ok(())
}

/// Removes `node-PREFIX<digits>[-key].pem` files not in `keep`; returns how many.
fn remove_stale_nodes(dir: &Path, prefix: &str, keep: &[String]) -> anyhow::Result<usize> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
    };
    let keep: std::collections::HashSet<&str> = keep.iter().map(String::as_str).collect();
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name
            .strip_prefix("node-")
            .and_then(|n| n.strip_suffix(".pem"))
        else {
            continue;
        };
        let node = stem.strip_suffix("-key").unwrap_or(stem);
        let is_ours = node
            .strip_prefix(prefix)
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if is_ours && !keep.contains(node) {
            std::fs::remove_file(entry.path())
                .with_context(|| format!("cannot remove {}", entry.path().display()))?;
            removed += 1;
        }
    }
    Ok(removed)
}

// ---------------------------------------------------------------- latency histogram

/// Sub-buckets per power of two (64: at most 1/64 = 1.6 % relative error).
const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;
/// Values below this are counted exactly, one bucket each.
const EXACT: u64 = 2 * SUB;
const BUCKETS: usize = (EXACT + (64 - SUB_BITS as u64 - 1) * SUB) as usize;

/// Latencies in microseconds in log-linear buckets: exact below 128 µs, then 64 buckets per
/// power of two. Fixed memory (about 30 KB) whatever the number of values; the max is exact.
#[derive(Debug, Clone)]
struct LatencyHistogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            counts: vec![0; BUCKETS],
            total: 0,
            max: 0,
        }
    }
}

impl LatencyHistogram {
    fn bucket(value: u64) -> usize {
        if value < EXACT {
            return value as usize;
        }
        let exp = 63 - u64::from(value.leading_zeros());
        let shift = exp - u64::from(SUB_BITS);
        let mantissa = value >> shift; // in SUB..2*SUB
        (EXACT + (exp - u64::from(SUB_BITS) - 1) * SUB + (mantissa - SUB)) as usize
    }

    /// Highest value that falls in bucket `index`.
    fn upper_bound(index: usize) -> u64 {
        let index = index as u64;
        if index < EXACT {
            return index;
        }
        let j = index - EXACT;
        let exp = u64::from(SUB_BITS) + 1 + j / SUB;
        let shift = exp - u64::from(SUB_BITS);
        let lower = (SUB + j % SUB) << shift;
        lower + ((1u64 << shift) - 1)
    }

    fn record(&mut self, micros: u64) {
        self.counts[Self::bucket(micros)] += 1;
        self.total += 1;
        self.max = self.max.max(micros);
    }

    /// The value at quantile `q` (0..=1): the upper bound of the bucket holding the
    /// ceil(q * n)-th smallest value, capped at the exact max. `None` when empty.
    fn quantile(&self, q: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (index, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(Self::upper_bound(index).min(self.max));
            }
        }
        Some(self.max)
    }

    fn summary(&self) -> LatencySummary {
        let ms = |q: f64| {
            self.quantile(q)
                .map(|us| (us as f64 / 1_000.0 * 1_000.0).round() / 1_000.0)
        };
        LatencySummary {
            count: self.total,
            p50: ms(0.50),
            p90: ms(0.90),
            p99: ms(0.99),
            max: ms(1.0),
        }
    }
}

/// Percentiles in milliseconds (µs precision).
#[derive(Debug, Clone, Serialize)]
struct LatencySummary {
    count: u64,
    p50: Option<f64>,
    p90: Option<f64>,
    p99: Option<f64>,
    max: Option<f64>,
}

// ---------------------------------------------------------------- sample generator

/// Builds one simulated agent's batches. Deterministic in (agent, seq, batch time, fault
/// onset), so a resend rebuilds exactly the batch first sent. Values vary smoothly over
/// simulated time (`seq` x period) plus per-batch noise; the chain advances one block per
/// 12 s of it.
#[derive(Debug, Clone)]
struct SampleGen {
    agent: u32,
    samples_per_batch: usize,
    period_ms: u64,
    /// From this seq on the node's best block is [`LAG_BLOCKS`] behind the tip it reports
    /// (sync target and reference); set once, so earlier seqs are rebuilt healthy.
    lag_from_seq: Option<u64>,
    /// History that the first batches also carry (see `--backfill-minutes`), ms.
    backfill_ms: u64,
    /// Steps of that history a batch carries.
    backfill_steps_per_batch: u64,
}

/// Spacing of backfilled history (a host and a chain sample each step).
const BACKFILL_STEP_MS: u64 = 10_000;

/// SS58 of the well-known dev account Alice, as the simulated validator hotkey.
const HOTKEY: &str = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY";
const GIB: u64 = 1 << 30;

impl SampleGen {
    fn new(agent: u32, samples_per_batch: usize, period: Duration) -> Self {
        Self {
            agent,
            samples_per_batch: samples_per_batch.max(1),
            period_ms: (period.as_millis() as u64).max(1),
            lag_from_seq: None,
            backfill_ms: 0,
            backfill_steps_per_batch: 1,
        }
    }

    /// The first batches also carry `minutes` of history, `steps_per_batch` 10 s steps each.
    fn with_backfill(mut self, minutes: u32, steps_per_batch: u32) -> Self {
        self.backfill_ms = u64::from(minutes) * 60_000;
        self.backfill_steps_per_batch = u64::from(steps_per_batch.max(1));
        self
    }

    /// Whether batch `seq` reports the node behind the tip.
    fn lagging(&self, seq: u64) -> bool {
        self.lag_from_seq.is_some_and(|from| seq >= from)
    }

    /// Batch `seq` taken at `at_unix_ms`: host samples spread over the batch period, then
    /// one chain sample, then (every 10th seq) one gpu sample; `samples_per_batch` in all
    /// (host samples are dropped first when it is too small for the extras, down to one).
    fn batch(&self, seq: u64, at_unix_ms: i64) -> SampleBatch {
        let mut rng = SmallRng::seed_from_u64((u64::from(self.agent) << 40) ^ seq);
        let sim_ms = seq.saturating_mul(self.period_ms);
        let wanted_extras = 1 + usize::from(seq.is_multiple_of(10));
        let extras = wanted_extras.min(self.samples_per_batch - 1);
        let hosts = self.samples_per_batch - extras;
        let mut samples = Vec::with_capacity(self.samples_per_batch);
        // History first, a few steps per batch over the first batches (oldest first), a host
        // and a healthy chain sample per step: batches stay the size a spool replay sends.
        let steps = self.backfill_ms / BACKFILL_STEP_MS;
        let per_batch = self.backfill_steps_per_batch;
        let first = (seq.max(1) - 1) * per_batch;
        for step in first..steps.min(first + per_batch) {
            let back_ms = (steps - step) * BACKFILL_STEP_MS;
            let at = at_unix_ms - back_ms as i64;
            samples.push(Sample {
                observed_at_unix_ms: at,
                kind: Some(sample::Kind::Host(self.host(&mut rng, 0))),
            });
            samples.push(Sample {
                observed_at_unix_ms: at,
                kind: Some(sample::Kind::Chain(self.chain(&mut rng, 0, false))),
            });
        }
        for i in 0..hosts {
            let back_ms = (hosts - 1 - i) as u64 * self.period_ms / hosts as u64;
            samples.push(Sample {
                observed_at_unix_ms: at_unix_ms - back_ms as i64,
                kind: Some(sample::Kind::Host(
                    self.host(&mut rng, sim_ms.saturating_sub(back_ms)),
                )),
            });
        }
        if extras >= 1 {
            samples.push(Sample {
                observed_at_unix_ms: at_unix_ms,
                kind: Some(sample::Kind::Chain(self.chain(
                    &mut rng,
                    sim_ms,
                    self.lagging(seq),
                ))),
            });
        }
        if extras >= 2 {
            samples.push(Sample {
                observed_at_unix_ms: at_unix_ms,
                kind: Some(sample::Kind::Gpu(self.gpu(&mut rng))),
            });
        }
        SampleBatch {
            seq,
            samples,
            spool_dropped_batches_total: 0,
        }
    }

    /// A value in -1..=1 following a sine of `period_s`, phase-shifted per agent.
    fn wave(&self, sim_ms: u64, period_s: f64) -> f64 {
        let t = sim_ms as f64 / 1_000.0;
        (t / period_s * TAU + f64::from(self.agent) * 0.37).sin()
    }

    fn host(&self, rng: &mut SmallRng, sim_ms: u64) -> HostSample {
        let t_s = sim_ms as f64 / 1_000.0;
        let cpu_busy = (35.0 + 20.0 * self.wave(sim_ms, 300.0) + rng.random_range(-5.0..5.0))
            .clamp(0.0, 100.0);
        let iowait = (2.0 + 1.5 * self.wave(sim_ms, 120.0) + rng.random_range(0.0..1.0)).max(0.0);
        let cpus = 64u32;
        let mem_total = 512 * GIB;
        let mem_available = (mem_total as f64 * (0.55 + 0.1 * self.wave(sim_ms, 600.0))) as u64;
        let load = cpu_busy / 100.0 * f64::from(cpus);
        let pressure = |base: f64, rng: &mut SmallRng| Pressure {
            some_avg10_percent: (base + rng.random_range(0.0..2.0)).max(0.0),
            some_avg60_percent: base.max(0.0),
            full_avg10_percent: (base / 3.0 + rng.random_range(0.0..0.5)).max(0.0),
            full_avg60_percent: (base / 3.0).max(0.0),
            some_total_microseconds: (t_s * base * 10_000.0) as u64,
        };
        let fs_total = 3_840_000_000_000u64;
        // The chain database grows about 1 MB per simulated minute.
        let fs_available =
            (fs_total as f64 * 0.42) as u64 - (sim_ms / 60_000).saturating_mul(1_000_000);
        let disks = (0..4)
            .map(|d| DiskIo {
                device: format!("nvme{d}n1"),
                reads_per_second: rng.random_range(50.0..2_000.0),
                writes_per_second: rng.random_range(100.0..4_000.0),
                read_bytes_per_second: rng.random_range(1e6..200e6),
                write_bytes_per_second: rng.random_range(2e6..400e6),
                read_latency_ms: rng.random_range(0.05..0.8),
                write_latency_ms: rng.random_range(0.02..1.5),
                utilisation_percent: (30.0
                    + 25.0 * self.wave(sim_ms, 90.0 + f64::from(d))
                    + rng.random_range(0.0..10.0))
                .clamp(0.0, 100.0),
            })
            .collect();
        let networks = (0..2u64)
            .map(|n| {
                let rx_rate = 40e6 / (n + 1) as f64 * (1.0 + 0.3 * self.wave(sim_ms, 60.0));
                let tx_rate = 25e6 / (n + 1) as f64 * (1.0 + 0.3 * self.wave(sim_ms, 45.0));
                NetIo {
                    interface: format!("eth{n}"),
                    rx_bytes_total: 10_000_000_000_000 + (t_s * 40e6) as u64,
                    tx_bytes_total: 7_000_000_000_000 + (t_s * 25e6) as u64,
                    rx_errors_total: sim_ms / 3_600_000,
                    tx_errors_total: 0,
                    rx_dropped_total: sim_ms / 600_000,
                    tx_dropped_total: 0,
                    rx_bytes_per_second: rx_rate,
                    tx_bytes_per_second: tx_rate,
                }
            })
            .collect();
        HostSample {
            cpu_busy_percent: cpu_busy,
            cpu_iowait_percent: iowait,
            cpu_count: cpus,
            mem_total_bytes: mem_total,
            mem_available_bytes: mem_available,
            swap_total_bytes: 8 * GIB,
            swap_free_bytes: 8 * GIB - rng.random_range(0..64 << 20),
            load_avg_1m: load + rng.random_range(-2.0..2.0f64).max(-load),
            load_avg_5m: load,
            load_avg_15m: load * 0.95,
            cpu_pressure: Some(pressure(cpu_busy / 10.0, rng)),
            memory_pressure: Some(pressure(0.5, rng)),
            io_pressure: Some(pressure(iowait, rng)),
            chain_data: Some(Filesystem {
                path: "/var/lib/subtensor".into(),
                total_bytes: fs_total,
                available_bytes: fs_available,
                used_percent: 100.0 * (1.0 - fs_available as f64 / fs_total as f64),
                inodes_total: 240_000_000,
                inodes_free: 239_000_000 - sim_ms / 1_000,
            }),
            disks,
            networks,
            oom_kills_total: 0,
            uptime_seconds: 12 * 86_400 + sim_ms / 1_000,
        }
    }

    /// A `lagging` node still follows the chain, [`LAG_BLOCKS`] behind the tip that its
    /// sync status and the reference report; it does not say it is syncing.
    fn chain(&self, rng: &mut SmallRng, sim_ms: u64, lagging: bool) -> ChainSample {
        let blocks = sim_ms / 12_000;
        let tip = 4_000_000 + u64::from(self.agent % 7) + blocks;
        let best = if lagging { tip - LAG_BLOCKS } else { tip };
        let since_update = blocks % 360;
        let trust = 60_000 + rng.random_range(0..5_000u32);
        ChainSample {
            endpoint: "ws://127.0.0.1:9944".into(),
            responsive: true,
            error: String::new(),
            best_block: best,
            finalized_block: best - 2 - blocks % 2,
            sync_current_block: best,
            sync_highest_block: tip,
            sync_starting_block: 3_990_000,
            // Steady, as a real node's: 20 to 35 by agent, give or take a peer.
            peers: 20 + self.agent % 16 + rng.random_range(0..2),
            is_syncing: false,
            should_have_peers: true,
            head_age_ms: sim_ms % 12_000,
            head_subscribed: true,
            rpc_latency_ms: rng.random_range(0.3..4.0),
            spec_version: 393,
            transaction_version: 1,
            references: vec![ReferenceTip {
                endpoint: "wss://entrypoint-finney.opentensor.ai:443".into(),
                responsive: true,
                best_block: tip + rng.random_range(0..2),
                error: String::new(),
            }],
            standing: Some(ValidatorStanding {
                hotkey_ss58: HOTKEY.into(),
                netuid: 1,
                registered: true,
                uid: self.agent % 256,
                last_update_block: best - since_update,
                blocks_since_last_update: since_update,
                validator_permit: true,
                validator_trust_raw: trust,
                validator_trust_ratio: f64::from(trust) / 65_535.0,
                emission_rao: 1_000_000_000 + rng.random_range(0..100_000_000),
                active: true,
                weights_set_rate_limit_blocks: 100,
                activity_cutoff_blocks: 5_000,
                tempo_blocks: 360,
                read_at_block: best,
            }),
            reconnects_total: 0,
        }
    }

    fn gpu(&self, rng: &mut SmallRng) -> GpuSample {
        let devices = (0..8u32)
            .map(|i| {
                let used = rng.random_range(20 * GIB..78 * GIB);
                GpuDevice {
                    index: i,
                    uuid: format!("GPU-{:08x}-0000-4000-8000-{i:012x}", self.agent),
                    name: "NVIDIA H100 80GB HBM3".into(),
                    utilisation_gpu_percent: rng.random_range(40.0..100.0),
                    utilisation_memory_percent: rng.random_range(10.0..60.0),
                    memory_used_bytes: used,
                    memory_total_bytes: 80 * GIB,
                    temperature_celsius: rng.random_range(40.0..80.0),
                    power_draw_watts: rng.random_range(250.0..650.0),
                    power_limit_watts: 700.0,
                    sm_clock_mhz: 1_980,
                    throttle_reasons_bitmask: 0,
                    throttle_reasons: vec![],
                    ecc_corrected_total: 0,
                    ecc_uncorrected_total: 0,
                    pcie_replay_total: 0,
                    xid_events: vec![],
                    processes: vec![GpuProcess {
                        pid: 4_242 + i,
                        used_memory_bytes: used,
                    }],
                    unsupported_fields: vec![],
                }
            })
            .collect();
        GpuSample {
            available: true,
            unavailable_reason: String::new(),
            driver_version: "550.90.07".into(),
            devices,
        }
    }
}

// ---------------------------------------------------------------- shared counters

/// Counters shared by all agents; the report and the progress lines read them.
#[derive(Debug)]
struct Stats {
    /// Reference point of the `*_us` fields.
    base: Instant,
    agents_connected: AtomicU64,
    connected_now: AtomicU64,
    /// Batches written to a stream for the first time.
    batches_sent: AtomicU64,
    /// Writes of a batch already written once (after a reconnect).
    batches_resent: AtomicU64,
    batches_acked: AtomicU64,
    samples_acked: AtomicU64,
    bytes_sent: AtomicU64,
    /// Send times that passed without a batch: the agent had no seq base yet (never
    /// connected) or this process fell behind.
    ticks_missed: AtomicU64,
    /// Send times skipped because 256 batches were unacked.
    window_full: AtomicU64,
    reconnects: AtomicU64,
    first_send_us: AtomicU64,
    last_ack_us: AtomicU64,
    ack_latency: Mutex<LatencyHistogram>,
    connect_latency: Mutex<LatencyHistogram>,
    errors: Mutex<BTreeMap<&'static str, u64>>,
    first_error: Mutex<Option<String>>,
    /// `--lag-agents` that wrote their first lagging batch.
    lag_faults_sent: AtomicU64,
    /// Commands on any stream, whatever they say.
    commands_received: AtomicU64,
    /// Commands to an agent not lagging at the time: false positives.
    commands_to_healthy: AtomicU64,
    /// Commands to a lagging agent after its first one.
    commands_repeated: AtomicU64,
    /// Commands whose envelope did not decode or named another node.
    commands_malformed: AtomicU64,
    /// Decoded commands per action (the server's action names: a handful).
    commands_by_action: Mutex<BTreeMap<String, u64>>,
    /// First lagging batch written -> first command received, per lagging agent.
    fault_to_command: Mutex<LatencyHistogram>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic mid-update leaves counters that are still usable.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Stats {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            agents_connected: AtomicU64::new(0),
            connected_now: AtomicU64::new(0),
            batches_sent: AtomicU64::new(0),
            batches_resent: AtomicU64::new(0),
            batches_acked: AtomicU64::new(0),
            samples_acked: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            ticks_missed: AtomicU64::new(0),
            window_full: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            first_send_us: AtomicU64::new(u64::MAX),
            last_ack_us: AtomicU64::new(0),
            ack_latency: Mutex::default(),
            connect_latency: Mutex::default(),
            errors: Mutex::default(),
            first_error: Mutex::default(),
            lag_faults_sent: AtomicU64::new(0),
            commands_received: AtomicU64::new(0),
            commands_to_healthy: AtomicU64::new(0),
            commands_repeated: AtomicU64::new(0),
            commands_malformed: AtomicU64::new(0),
            commands_by_action: Mutex::default(),
            fault_to_command: Mutex::default(),
        }
    }

    fn since_base_us(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_micros() as u64
    }

    fn error(&self, error: &AgentError) {
        *lock(&self.errors).entry(error.kind()).or_default() += 1;
        lock(&self.first_error).get_or_insert_with(|| error.to_string());
    }

    fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

// ---------------------------------------------------------------- one agent

/// Why an agent's session ended or never started.
#[derive(Debug, thiserror::Error)]
enum AgentError {
    /// TCP connect or TLS handshake failed.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The server did not answer in time.
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// The server ended the stream with a status.
    #[error("server status {}: {}", code_name(.0.code()), .0.message())]
    Status(tonic::Status),
    /// The server closed the stream without a status.
    #[error("server closed the stream")]
    Closed,
    /// The server broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(&'static str),
}

impl AgentError {
    /// Stable label for the report's error counts.
    fn kind(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::Timeout(_) => "timeout",
            Self::Status(status) => code_name(status.code()),
            Self::Closed => "closed",
            Self::Protocol(_) => "protocol",
        }
    }
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// The error and its sources on one line (tonic's transport errors hide the cause); a
/// cause already quoted by its parent is not repeated.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The send time after `previous`; send times already past `now` are skipped, not made up
/// in a burst. Returns the time and how many were skipped.
fn next_tick(previous: Instant, period: Duration, now: Instant) -> (Instant, u64) {
    let next = previous + period;
    if next >= now {
        return (next, 0);
    }
    let behind = now.duration_since(next).as_nanos();
    let skipped = (behind / period.as_nanos().max(1)) as u64 + 1;
    let ahead = Duration::from_nanos((period.as_nanos() as u64).saturating_mul(skipped));
    (next + ahead, skipped)
}

/// Everything the agents share.
#[derive(Debug)]
struct Fleet {
    endpoint: Endpoint,
    ca: Certificate,
    server_name: String,
    network: String,
    agents: u32,
    period: Duration,
    samples_per_batch: usize,
    connect_permits: Semaphore,
    /// Agents 1..=`lag_agents` fall behind from `lag_after` into the sending phase on.
    lag_agents: u32,
    /// Offset of the fault from the start of sending.
    lag_after: Duration,
    /// Minutes of history in each agent's first batches.
    backfill_minutes: u32,
    /// 10 s steps of that history per batch.
    backfill_steps_per_batch: u32,
    stats: Stats,
    /// Ends the sending phase; agents then wait for their acks.
    stop_sending: CancellationToken,
    /// Ends everything now.
    abort: CancellationToken,
}

/// One simulated agent's identity.
#[derive(Debug)]
struct AgentSpec {
    index: u32,
    node: String,
    identity: Identity,
}

/// A node's sent seq range, for `--per-node`.
#[derive(Debug, Clone, Serialize)]
struct NodeSeqs {
    first_seq: Option<u64>,
    last_seq: Option<u64>,
    acked_through: u64,
}

/// A batch built but not yet acked.
#[derive(Debug)]
struct Pending {
    seq: u64,
    at_unix_ms: i64,
    /// Last write to a stream; `None` while not written on the current stream.
    sent_at: Option<Instant>,
    written_before: bool,
}

/// An open stream: the request side and the server's frames.
struct Session {
    tx: mpsc::Sender<AgentFrame>,
    inbound: tonic::Streaming<ServerFrame>,
}

/// A stream that answered Hello, boxed (a `Streaming` is large).
type Opened = Result<(Box<Session>, Welcome), AgentError>;

/// An agent's connection state.
enum Link {
    Up(Box<Session>),
    Connecting(std::pin::Pin<Box<dyn Future<Output = Opened> + Send>>),
    /// Backing off until then.
    Waiting(Instant),
}

enum LinkEvent {
    Frame(Result<Option<ServerFrame>, tonic::Status>),
    Opened(Opened),
    RetryDue,
}

impl Link {
    /// The next thing that happens on the link. Cancel-safe: a connect in progress lives
    /// in `self` and continues on the next call.
    async fn event(&mut self) -> LinkEvent {
        match self {
            Self::Up(session) => LinkEvent::Frame(session.inbound.message().await),
            Self::Connecting(opening) => LinkEvent::Opened(opening.as_mut().await),
            Self::Waiting(at) => {
                tokio::time::sleep_until(*at).await;
                LinkEvent::RetryDue
            }
        }
    }
}

/// Opens one stream: TLS channel, Hello, Welcome. Holds a connect permit throughout.
async fn open_session(fleet: Arc<Fleet>, identity: Identity, hello: Hello) -> Opened {
    let _permit = fleet
        .connect_permits
        .acquire()
        .await
        .map_err(|_| AgentError::Protocol("connect permits closed"))?;
    let began = Instant::now();
    let tls = ClientTlsConfig::new()
        .ca_certificate(fleet.ca.clone())
        .identity(identity)
        .domain_name(fleet.server_name.clone());
    let endpoint = fleet
        .endpoint
        .clone()
        .tls_config(tls)
        .map_err(|e| AgentError::Connect(error_chain(&e)))?;
    let channel = tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect())
        .await
        .map_err(|_| AgentError::Timeout("TCP+TLS connect took over 10 s"))?
        .map_err(|e| AgentError::Connect(error_chain(&e)))?;
    let mut client = UplinkClient::new(channel)
        .max_decoding_message_size(guardian_proto::DEFAULT_MAX_FRAME_BYTES)
        .max_encoding_message_size(guardian_proto::DEFAULT_MAX_FRAME_BYTES);
    let (tx, rx) = mpsc::channel::<AgentFrame>(IN_FLIGHT_WINDOW + 8);
    let hello = AgentFrame {
        frame: Some(agent_frame::Frame::Hello(hello)),
    };
    tx.try_send(hello)
        .map_err(|_| AgentError::Protocol("fresh request channel refused Hello"))?;
    let mut inbound =
        tokio::time::timeout(CONNECT_TIMEOUT, client.connect(ReceiverStream::new(rx)))
            .await
            .map_err(|_| AgentError::Timeout("no answer to Hello within 10 s"))?
            .map_err(AgentError::Status)?
            .into_inner();
    let welcome = match tokio::time::timeout(CONNECT_TIMEOUT, inbound.message()).await {
        Err(_) => return Err(AgentError::Timeout("no Welcome within 10 s")),
        Ok(Err(status)) => return Err(AgentError::Status(status)),
        Ok(Ok(Some(ServerFrame {
            frame: Some(server_frame::Frame::Welcome(welcome)),
        }))) => welcome,
        Ok(Ok(None)) => return Err(AgentError::Closed),
        Ok(Ok(Some(_))) => return Err(AgentError::Protocol("first server frame was not Welcome")),
    };
    lock(&fleet.stats.connect_latency).record(began.elapsed().as_micros() as u64);
    Ok((Box::new(Session { tx, inbound }), welcome))
}

/// One agent's bookkeeping of seqs and unacked batches.
#[derive(Debug)]
struct AgentState {
    generator: SampleGen,
    /// Next seq to hand out; `None` until the first Welcome.
    next_seq: Option<u64>,
    unacked: VecDeque<Pending>,
    seqs: NodeSeqs,
    /// When the first lagging batch was written (`--lag-agents` only).
    fault_sent_at: Option<Instant>,
    /// Whether a command arrived since the fault began.
    commanded: bool,
}

impl AgentState {
    /// Applies a Welcome: the first one sets the seq base; batches the server already holds
    /// count as acked (without a latency: their ack was lost with the old stream).
    fn welcome(&mut self, fleet: &Fleet, node: &str, last_stored_seq: u64) {
        match self.next_seq {
            None => self.next_seq = Some(last_stored_seq + 1),
            Some(next) if last_stored_seq >= next => {
                tracing::warn!(
                    node,
                    last_stored_seq,
                    next,
                    "ServerAheadOfAgent: another writer uses this node id"
                );
                self.next_seq = Some(last_stored_seq + 1);
            }
            Some(_) => {}
        }
        if last_stored_seq < self.seqs.acked_through {
            tracing::warn!(
                node,
                last_stored_seq,
                acked_through = self.seqs.acked_through,
                "ServerForgotAckedBatches"
            );
        }
        self.ack(fleet, last_stored_seq, None);
    }

    /// Removes every batch up to `through_seq`; `now` records their latency.
    fn ack(&mut self, fleet: &Fleet, through_seq: u64, now: Option<Instant>) {
        self.seqs.acked_through = self.seqs.acked_through.max(through_seq);
        let mut acked = 0u64;
        let mut latency = lock_if(now.is_some(), &fleet.stats.ack_latency);
        while self.unacked.front().is_some_and(|p| p.seq <= through_seq) {
            let Some(pending) = self.unacked.pop_front() else {
                break;
            };
            acked += 1;
            if let (Some(now), Some(sent_at), Some(histogram)) =
                (now, pending.sent_at, latency.as_mut())
            {
                histogram.record(now.saturating_duration_since(sent_at).as_micros() as u64);
            }
        }
        drop(latency);
        if acked > 0 {
            let stats = &fleet.stats;
            bump(&stats.batches_acked, acked);
            bump(
                &stats.samples_acked,
                acked * self.generator.samples_per_batch as u64,
            );
            if let Some(now) = now {
                stats
                    .last_ack_us
                    .fetch_max(stats.since_base_us(now), Ordering::Relaxed);
            }
        }
    }

    /// Writes batch `index` of `unacked` to `tx`.
    fn write(
        &mut self,
        fleet: &Fleet,
        tx: &mpsc::Sender<AgentFrame>,
        index: usize,
    ) -> Result<(), AgentError> {
        let Some(pending) = self.unacked.get_mut(index) else {
            return Ok(());
        };
        let batch = self.generator.batch(pending.seq, pending.at_unix_ms);
        let bytes = batch.encoded_len() as u64;
        let now = Instant::now();
        // At most 256 batches plus Hello are ever queued: the channel holds 264.
        tx.try_send(AgentFrame {
            frame: Some(agent_frame::Frame::Batch(batch)),
        })
        .map_err(|_| AgentError::Protocol("request stream closed or full"))?;
        pending.sent_at = Some(now);
        let stats = &fleet.stats;
        bump(&stats.bytes_sent, bytes);
        if pending.written_before {
            bump(&stats.batches_resent, 1);
        } else {
            pending.written_before = true;
            bump(&stats.batches_sent, 1);
            stats
                .first_send_us
                .fetch_min(stats.since_base_us(now), Ordering::Relaxed);
            self.seqs.first_seq.get_or_insert(pending.seq);
            self.seqs.last_seq = Some(pending.seq);
            if self.fault_sent_at.is_none() && self.generator.lagging(pending.seq) {
                self.fault_sent_at = Some(now);
                bump(&stats.lag_faults_sent, 1);
            }
        }
        Ok(())
    }

    /// Counts a signed command that arrived at `now`; the first after the fault began is
    /// timed from the first lagging batch. The signature is the real agent's business.
    fn command(&mut self, fleet: &Fleet, node: &str, command: &Command, now: Instant) {
        let stats = &fleet.stats;
        bump(&stats.commands_received, 1);
        let envelope = match CommandEnvelope::decode(command.envelope.as_slice()) {
            Ok(envelope) if envelope.node_id == node => envelope,
            Ok(envelope) => {
                tracing::warn!(node, for_node = envelope.node_id, "CommandForAnotherNode");
                bump(&stats.commands_malformed, 1);
                return;
            }
            Err(error) => {
                tracing::warn!(node, %error, "CommandEnvelopeMalformed");
                bump(&stats.commands_malformed, 1);
                return;
            }
        };
        *lock(&stats.commands_by_action)
            .entry(envelope.action.clone())
            .or_default() += 1;
        match self.fault_sent_at {
            None => {
                tracing::warn!(
                    node,
                    action = envelope.action,
                    command_id = envelope.command_id,
                    "CommandToHealthyAgent"
                );
                bump(&stats.commands_to_healthy, 1);
            }
            Some(at) if !self.commanded => {
                self.commanded = true;
                let took = now.saturating_duration_since(at);
                tracing::debug!(
                    node,
                    action = envelope.action,
                    took_ms = took.as_millis() as u64,
                    "CommandAfterFault"
                );
                lock(&stats.fault_to_command).record(took.as_micros() as u64);
            }
            Some(_) => bump(&stats.commands_repeated, 1),
        }
    }
}

/// Locks `mutex` only when `wanted`.
fn lock_if<T>(wanted: bool, mutex: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    wanted.then(|| lock(mutex))
}

/// Sends this agent's first-connect outcome to the coordinator.
type InitialReport = mpsc::Sender<Result<(), String>>;

/// One simulated agent: connects, waits for the common start, sends a batch per period,
/// matches acks, reconnects with backoff and resends; returns its seq range.
async fn agent(
    fleet: Arc<Fleet>,
    spec: AgentSpec,
    initial: InitialReport,
    mut start: watch::Receiver<Option<Instant>>,
) -> (String, NodeSeqs) {
    let mut state = AgentState {
        generator: SampleGen::new(spec.index, fleet.samples_per_batch, fleet.period)
            .with_backfill(fleet.backfill_minutes, fleet.backfill_steps_per_batch),
        next_seq: None,
        unacked: VecDeque::with_capacity(IN_FLIGHT_WINDOW),
        seqs: NodeSeqs {
            first_seq: None,
            last_seq: None,
            acked_through: 0,
        },
        fault_sent_at: None,
        commanded: false,
    };
    let lags = spec.index <= fleet.lag_agents;
    let descriptor = NodeDescriptor {
        node_id: spec.node.clone(),
        hostname: format!("{}.bench.internal", spec.node),
        network: fleet.network.clone(),
        kernel_release: "6.8.0-45-generic".into(),
        ..NodeDescriptor::default()
    };
    let hello = |acked: u64| Hello {
        agent_version: concat!("guardian-loadgen/", env!("CARGO_PKG_VERSION")).to_owned(),
        node: Some(descriptor.clone()),
        capabilities: vec!["host".into(), "chain".into(), "gpu".into()],
        last_acked_seq: acked,
    };
    let done = |state: AgentState| (spec.node.clone(), state.seqs);
    let stats = &fleet.stats;
    let mut failures = 0u32;
    let mut ever_connected = false;

    // First connect, before the common start.
    let opened = tokio::select! {
        () = fleet.abort.cancelled() => return done(state),
        () = fleet.stop_sending.cancelled() => return done(state),
        opened = open_session(Arc::clone(&fleet), spec.identity.clone(), hello(0)) => opened,
    };
    let mut link = match opened {
        Ok((session, welcome)) => {
            ever_connected = true;
            bump(&stats.agents_connected, 1);
            bump(&stats.connected_now, 1);
            let _ = initial.send(Ok(())).await;
            state.welcome(&fleet, &spec.node, welcome.last_stored_seq);
            Link::Up(session)
        }
        Err(error) => {
            stats.error(&error);
            tracing::debug!(%error, kind = error.kind(), "AgentConnectFailed");
            let _ = initial.send(Err(error.to_string())).await;
            failures += 1;
            Link::Waiting(Instant::now() + backoff(failures))
        }
    };
    drop(initial);
    let start = tokio::select! {
        () = fleet.abort.cancelled() => return done(state),
        () = fleet.stop_sending.cancelled() => return done(state),
        start = start.wait_for(Option::is_some) => match start.ok().and_then(|s| *s) {
            Some(start) => start,
            None => return done(state),
        },
    };
    // Agents' send times are spread evenly over one period.
    let offset = Duration::from_nanos(
        (fleet.period.as_nanos() as u64).saturating_mul(u64::from(spec.index - 1))
            / u64::from(fleet.agents),
    );
    let mut tick_at = start + offset;
    let lag_at = start + fleet.lag_after;
    let mut stopped = false;

    loop {
        if stopped && state.unacked.is_empty() {
            break;
        }
        let event = tokio::select! {
            () = fleet.abort.cancelled() => break,
            () = fleet.stop_sending.cancelled(), if !stopped => {
                stopped = true;
                continue;
            }
            () = tokio::time::sleep_until(tick_at), if !stopped => None,
            event = link.event() => Some(event),
        };
        let failure = match event {
            None => {
                let (next, skipped) = next_tick(tick_at, fleet.period, Instant::now());
                tick_at = next;
                bump(&stats.ticks_missed, skipped);
                let Some(seq) = state.next_seq else {
                    bump(&stats.ticks_missed, 1);
                    continue;
                };
                if state.unacked.len() >= IN_FLIGHT_WINDOW {
                    bump(&stats.window_full, 1);
                    continue;
                }
                state.next_seq = Some(seq + 1);
                if lags && state.generator.lag_from_seq.is_none() && Instant::now() >= lag_at {
                    state.generator.lag_from_seq = Some(seq);
                }
                state.unacked.push_back(Pending {
                    seq,
                    at_unix_ms: guardian_server::unix_ms(),
                    sent_at: None,
                    written_before: false,
                });
                match &link {
                    Link::Up(session) => {
                        let last = state.unacked.len() - 1;
                        state.write(&fleet, &session.tx, last).err()
                    }
                    _ => None,
                }
            }
            Some(LinkEvent::Frame(frame)) => match frame {
                Ok(Some(ServerFrame {
                    frame: Some(server_frame::Frame::Ack(ack)),
                })) => {
                    state.ack(&fleet, ack.through_seq, Some(Instant::now()));
                    None
                }
                // Counted and timed, never run.
                Ok(Some(ServerFrame {
                    frame: Some(server_frame::Frame::Command(command)),
                })) => {
                    state.command(&fleet, &spec.node, &command, Instant::now());
                    None
                }
                Ok(Some(_)) => Some(AgentError::Protocol("unexpected server frame")),
                Ok(None) => Some(AgentError::Closed),
                Err(status) => Some(AgentError::Status(status)),
            },
            Some(LinkEvent::Opened(Ok((session, welcome)))) => {
                failures = 0;
                bump(&stats.connected_now, 1);
                if ever_connected {
                    bump(&stats.reconnects, 1);
                } else {
                    ever_connected = true;
                    bump(&stats.agents_connected, 1);
                }
                state.welcome(&fleet, &spec.node, welcome.last_stored_seq);
                for pending in &mut state.unacked {
                    pending.sent_at = None;
                }
                let mut failed = None;
                for index in 0..state.unacked.len() {
                    if let Err(error) = state.write(&fleet, &session.tx, index) {
                        failed = Some(error);
                        break;
                    }
                }
                link = Link::Up(session);
                failed
            }
            Some(LinkEvent::Opened(Err(error))) => {
                stats.error(&error);
                failures = failures.saturating_add(1);
                tracing::debug!(%error, kind = error.kind(), "AgentConnectFailed");
                link = Link::Waiting(Instant::now() + backoff(failures));
                None
            }
            Some(LinkEvent::RetryDue) => {
                link = Link::Connecting(Box::pin(open_session(
                    Arc::clone(&fleet),
                    spec.identity.clone(),
                    hello(state.seqs.acked_through),
                )));
                None
            }
        };
        if let Some(error) = failure {
            stats.error(&error);
            stats.connected_now.fetch_sub(1, Ordering::Relaxed);
            failures = failures.saturating_add(1);
            let delay = backoff(failures);
            tracing::debug!(%error, kind = error.kind(), retry_in_ms = delay.as_millis() as u64,
                unacked = state.unacked.len(), "AgentDisconnected");
            link = Link::Waiting(Instant::now() + delay);
        }
    }
    if matches!(link, Link::Up(_)) {
        stats.connected_now.fetch_sub(1, Ordering::Relaxed);
    }
    done(state)
}

/// The real agent's reconnect backoff (full jitter), with its default window.
fn backoff(failures: u32) -> Duration {
    guardian_agent::uplink::reconnect_delay(
        BACKOFF_INITIAL_MS,
        BACKOFF_MAX_MS,
        failures.saturating_sub(1),
        rand::rng().random_range(0.0..=1.0),
    )
}

// ---------------------------------------------------------------- the run

/// What `run` prints.
#[derive(Debug, Serialize)]
struct Report {
    server: String,
    agents: u32,
    agents_connected: u64,
    agents_connected_at_end: u64,
    rate_per_agent: f64,
    samples_per_batch: usize,
    duration_s: u64,
    batches_sent: u64,
    batches_resent: u64,
    batches_acked: u64,
    batches_unacked: u64,
    samples_acked: u64,
    bytes_sent: u64,
    /// From the first batch written to the last ack received.
    window_s: f64,
    batches_per_s: f64,
    samples_per_s: f64,
    ack_latency_ms: LatencySummary,
    connect_ms: LatencySummary,
    reconnects: u64,
    errors: BTreeMap<&'static str, u64>,
    first_error: Option<String>,
    ticks_missed: u64,
    window_full: u64,
    /// `--lag-agents`, `--lag-after-s` and the blocks they fall behind.
    lag_agents: u32,
    lag_after_s: u64,
    lag_blocks: u64,
    /// Lagging agents that wrote a lagging batch (the fault began).
    lag_agents_faulted: u64,
    commands_received: u64,
    /// Commands to agents that were not lagging when they arrived: false positives.
    commands_to_healthy_agents: u64,
    /// Commands to a lagging agent after its first.
    commands_repeated: u64,
    /// Undecodable envelopes or envelopes for another node.
    commands_malformed: u64,
    commands_by_action: BTreeMap<String, u64>,
    /// Per lagging agent: first lagging batch written -> first command received. Its
    /// `count` is the number of lagging agents remediated.
    fault_to_command_ms: LatencySummary,
    /// The same in sampling intervals (one chain sample per batch: 1 / `rate_per_agent`).
    fault_to_command_intervals: IntervalSummary,
    #[serde(skip_serializing_if = "Option::is_none")]
    nodes: Option<BTreeMap<String, NodeSeqs>>,
}

/// Percentiles as multiples of the sampling interval.
#[derive(Debug, Clone, Serialize)]
struct IntervalSummary {
    p50: Option<f64>,
    p99: Option<f64>,
    max: Option<f64>,
}

impl IntervalSummary {
    fn of(ms: &LatencySummary, period: Duration) -> Self {
        let period_ms = period.as_secs_f64() * 1_000.0;
        let intervals = |v: Option<f64>| v.map(|ms| (ms / period_ms * 1_000.0).round() / 1_000.0);
        Self {
            p50: intervals(ms.p50),
            p99: intervals(ms.p99),
            max: intervals(ms.max),
        }
    }
}

/// Reads the CA and every agent's certificate and key, before anything connects.
fn load_agents(args: &RunArgs) -> anyhow::Result<(Certificate, Vec<AgentSpec>)> {
    let read = |path: PathBuf| {
        std::fs::read(&path).with_context(|| {
            format!(
                "cannot read {}; write the certificates first: guardian-loadgen pki --dir {} --agents {}{}",
                path.display(),
                args.pki_dir.display(),
                args.agents,
                if args.prefix == "load" { String::new() } else { format!(" --prefix {}", args.prefix) }
            )
        })
    };
    let ca = Certificate::from_pem(read(args.pki_dir.join("ca.pem"))?);
    // A PKI written for more agents may use wider numbers: take the width that exists.
    let width = (name_width(args.agents)..=10)
        .find(|&w| {
            args.pki_dir
                .join(format!("node-{}.pem", node_name(&args.prefix, 1, w)))
                .is_file()
        })
        .unwrap_or(name_width(args.agents));
    let mut agents = Vec::with_capacity(args.agents as usize);
    for index in 1..=args.agents {
        let node = node_name(&args.prefix, index, width);
        let cert = read(args.pki_dir.join(format!("node-{node}.pem")))?;
        let key = read(args.pki_dir.join(format!("node-{node}-key.pem")))?;
        agents.push(AgentSpec {
            index,
            node,
            identity: Identity::from_pem(cert, key),
        });
    }
    Ok((ca, agents))
}

/// Each agent holds a socket: raises the soft open-files limit toward the hard one when the
/// run needs more than it allows (a common default soft limit is 1024).
///
/// # Errors
/// When even the hard limit is too low.
fn ensure_open_files(agents: u32) -> anyhow::Result<()> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let needed = u64::from(agents) + 256;
    let limit = getrlimit(Resource::Nofile);
    // `None` means unlimited.
    if limit.current.is_none_or(|current| current >= needed) {
        return Ok(());
    }
    let target = limit.maximum.map_or(needed, |maximum| maximum.min(needed));
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(target),
            maximum: limit.maximum,
        },
    )
    .context("cannot raise the open-files limit")?;
    if target < needed {
        bail!(
            "{agents} agents need about {needed} open files but the hard limit is {target}: \
             raise it (ulimit -Hn) or run fewer agents"
        );
    }
    tracing::info!(open_files = target, "raised the open-files limit");
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    ensure_open_files(args.agents)?;
    let (ca, specs) = load_agents(&args)?;
    let endpoint = Endpoint::from_shared(args.server.clone())
        .with_context(|| format!("--server {:?} is not a valid URL", args.server))?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10));
    let fleet = Arc::new(Fleet {
        endpoint,
        ca,
        server_name: args.server_name.clone(),
        network: args.network.clone(),
        agents: args.agents,
        period: args.period(),
        samples_per_batch: args.samples_per_batch,
        connect_permits: Semaphore::new(args.connect_concurrency),
        lag_agents: args.lag_agents,
        lag_after: Duration::from_secs(args.lag_after_s),
        backfill_minutes: args.backfill_minutes,
        backfill_steps_per_batch: args.backfill_steps_per_batch,
        stats: Stats::new(),
        stop_sending: CancellationToken::new(),
        abort: CancellationToken::new(),
    });
    let stats = &fleet.stats;
    let (start_tx, start_rx) = watch::channel(None);
    let (initial_tx, mut initial_rx) = mpsc::channel(args.agents as usize);
    let mut tasks = JoinSet::new();
    for spec in specs {
        let span = tracing::info_span!("agent", node = %spec.node);
        tasks.spawn(
            agent(
                Arc::clone(&fleet),
                spec,
                initial_tx.clone(),
                start_rx.clone(),
            )
            .instrument(span),
        );
    }
    drop(initial_tx);

    // Connect phase: every agent's first attempt, or the cap.
    let began = Instant::now();
    let phase_end = began + CONNECT_PHASE_MAX;
    let mut attempted = 0u32;
    let mut interrupted = false;
    while attempted < args.agents {
        tokio::select! {
            outcome = initial_rx.recv() => match outcome {
                Some(_) => attempted += 1,
                None => break,
            },
            () = tokio::time::sleep_until(phase_end) => break,
            _ = tokio::signal::ctrl_c() => { interrupted = true; break }
        }
    }
    drop(initial_rx);
    let connected = Stats::get(&stats.agents_connected);
    tracing::info!(
        connected,
        agents = args.agents,
        attempted,
        took_ms = began.elapsed().as_millis() as u64,
        "ConnectPhaseDone"
    );
    if connected == 0 || interrupted {
        fleet.abort.cancel();
        join_all(&mut tasks, JOIN_TIMEOUT).await;
        if interrupted {
            bail!("interrupted during the connect phase");
        }
        let why = lock(&stats.first_error)
            .clone()
            .unwrap_or_else(|| format!("no answer within {} s", CONNECT_PHASE_MAX.as_secs()));
        eprintln!(
            "guardian-loadgen: no agent could connect to {} ({attempted} of {} attempted); first error: {why}",
            args.server, args.agents
        );
        return Ok(ExitCode::FAILURE);
    }

    // Sending phase.
    let start = Instant::now();
    let _ = start_tx.send(Some(start));
    let stop_at = start + Duration::from_secs(args.duration_s);
    let mut progress = tokio::time::interval_at(start + PROGRESS_EVERY, PROGRESS_EVERY);
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(stop_at) => break,
            _ = tokio::signal::ctrl_c() => {
                tracing::warn!("interrupted: stopping early and reporting");
                break;
            }
            _ = progress.tick() => log_progress(stats, start),
        }
    }
    // Read before agents with nothing unacked start leaving.
    let connected_at_end = Stats::get(&stats.connected_now);
    fleet.stop_sending.cancel();
    log_progress(stats, start);

    // Drain: agents end when all their batches are acked.
    let mut nodes = BTreeMap::new();
    let drain_end = Instant::now() + DRAIN_TIMEOUT;
    loop {
        match tokio::time::timeout_at(drain_end, tasks.join_next()).await {
            Ok(Some(Ok((node, seqs)))) => {
                nodes.insert(node, seqs);
            }
            Ok(Some(Err(error))) => tracing::error!(%error, "agent task failed"),
            Ok(None) => break,
            Err(_) => {
                tracing::warn!(
                    agents_waiting = tasks.len(),
                    "acks still outstanding after {} s; giving up on them",
                    DRAIN_TIMEOUT.as_secs()
                );
                break;
            }
        }
    }
    fleet.abort.cancel();
    for (node, seqs) in join_all(&mut tasks, JOIN_TIMEOUT).await {
        nodes.insert(node, seqs);
    }

    let report = report(
        &args,
        stats,
        connected_at_end,
        args.per_node.then_some(nodes),
    );
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(ExitCode::SUCCESS)
}

/// Waits up to `limit` for the remaining tasks, then drops the rest; returns their results.
async fn join_all(
    tasks: &mut JoinSet<(String, NodeSeqs)>,
    limit: Duration,
) -> Vec<(String, NodeSeqs)> {
    let mut results = Vec::new();
    let end = Instant::now() + limit;
    while let Ok(Some(joined)) = tokio::time::timeout_at(end, tasks.join_next()).await {
        match joined {
            Ok(result) => results.push(result),
            Err(error) => tracing::error!(%error, "agent task failed"),
        }
    }
    if !tasks.is_empty() {
        tracing::warn!(
            left = tasks.len(),
            "agent tasks did not stop in time; dropping them"
        );
        tasks.abort_all();
    }
    results
}

fn log_progress(stats: &Stats, start: Instant) {
    let sent = Stats::get(&stats.batches_sent);
    let acked = Stats::get(&stats.batches_acked);
    tracing::info!(
        elapsed_s = start.elapsed().as_secs(),
        connected = Stats::get(&stats.connected_now),
        sent,
        acked,
        in_flight = sent.saturating_sub(acked),
        reconnects = Stats::get(&stats.reconnects),
        errors = lock(&stats.errors).values().sum::<u64>(),
        "LoadProgress"
    );
}

fn report(
    args: &RunArgs,
    stats: &Stats,
    connected_at_end: u64,
    nodes: Option<BTreeMap<String, NodeSeqs>>,
) -> Report {
    let first = Stats::get(&stats.first_send_us);
    let last = Stats::get(&stats.last_ack_us);
    let window_s = if first != u64::MAX && last > first {
        (last - first) as f64 / 1e6
    } else {
        0.0
    };
    let per_s = |n: u64| {
        if window_s > 0.0 {
            (n as f64 / window_s * 10.0).round() / 10.0
        } else {
            0.0
        }
    };
    let sent = Stats::get(&stats.batches_sent);
    let acked = Stats::get(&stats.batches_acked);
    let samples = Stats::get(&stats.samples_acked);
    let fault_to_command = lock(&stats.fault_to_command).summary();
    Report {
        server: args.server.clone(),
        agents: args.agents,
        agents_connected: Stats::get(&stats.agents_connected),
        agents_connected_at_end: connected_at_end,
        rate_per_agent: args.rate,
        samples_per_batch: args.samples_per_batch,
        duration_s: args.duration_s,
        batches_sent: sent,
        batches_resent: Stats::get(&stats.batches_resent),
        batches_acked: acked,
        batches_unacked: sent.saturating_sub(acked),
        samples_acked: samples,
        bytes_sent: Stats::get(&stats.bytes_sent),
        window_s: (window_s * 1_000.0).round() / 1_000.0,
        batches_per_s: per_s(acked),
        samples_per_s: per_s(samples),
        ack_latency_ms: lock(&stats.ack_latency).summary(),
        connect_ms: lock(&stats.connect_latency).summary(),
        reconnects: Stats::get(&stats.reconnects),
        errors: lock(&stats.errors).clone(),
        first_error: lock(&stats.first_error).clone(),
        ticks_missed: Stats::get(&stats.ticks_missed),
        window_full: Stats::get(&stats.window_full),
        lag_agents: args.lag_agents,
        lag_after_s: args.lag_after_s,
        lag_blocks: LAG_BLOCKS,
        lag_agents_faulted: Stats::get(&stats.lag_faults_sent),
        commands_received: Stats::get(&stats.commands_received),
        commands_to_healthy_agents: Stats::get(&stats.commands_to_healthy),
        commands_repeated: Stats::get(&stats.commands_repeated),
        commands_malformed: Stats::get(&stats.commands_malformed),
        commands_by_action: lock(&stats.commands_by_action).clone(),
        fault_to_command_intervals: IntervalSummary::of(&fault_to_command, args.period()),
        fault_to_command_ms: fault_to_command,
        nodes,
    }
}

/// The report as a readable table.
fn render(r: &Report) -> String {
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.3}"));
    let latency = |s: &LatencySummary| {
        format!(
            "p50 {}  p90 {}  p99 {}  max {}  (n={})",
            ms(s.p50),
            ms(s.p90),
            ms(s.p99),
            ms(s.max),
            s.count
        )
    };
    let errors = if r.errors.is_empty() {
        "none".to_owned()
    } else {
        r.errors
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut out = format!(
        "guardian-loadgen: {} agents -> {}, {} batches/s each, {} samples/batch, {} s\n",
        r.agents, r.server, r.rate_per_agent, r.samples_per_batch, r.duration_s
    );
    let mut row = |label: &str, value: String| {
        out.push_str(&format!("  {label:<22}{value}\n"));
    };
    row(
        "agents connected",
        format!(
            "{} of {} ({} at end of sending)",
            r.agents_connected, r.agents, r.agents_connected_at_end
        ),
    );
    row(
        "batches sent / acked",
        format!(
            "{} / {}  (unacked {}, resent {})",
            r.batches_sent, r.batches_acked, r.batches_unacked, r.batches_resent
        ),
    );
    row("samples acked", r.samples_acked.to_string());
    row(
        "throughput",
        format!(
            "{} batches/s, {} samples/s, {:.2} MB/s over {:.3} s",
            r.batches_per_s,
            r.samples_per_s,
            if r.window_s > 0.0 {
                r.bytes_sent as f64 / r.window_s / 1e6
            } else {
                0.0
            },
            r.window_s
        ),
    );
    row("ack latency ms", latency(&r.ack_latency_ms));
    row("connect ms", latency(&r.connect_ms));
    row("reconnects", r.reconnects.to_string());
    row("errors", errors);
    if let Some(first) = &r.first_error {
        row("first error", first.clone());
    }
    row(
        "ticks missed / full",
        format!("{} / {}", r.ticks_missed, r.window_full),
    );
    let actions = if r.commands_by_action.is_empty() {
        "none".to_owned()
    } else {
        r.commands_by_action
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    row(
        "commands received",
        format!(
            "{} ({actions}; repeated {}, malformed {})",
            r.commands_received, r.commands_repeated, r.commands_malformed
        ),
    );
    row(
        "commands to healthy",
        r.commands_to_healthy_agents.to_string(),
    );
    if r.lag_agents > 0 {
        row(
            "lagging agents",
            format!(
                "{} told to fall {} blocks behind after {} s; {} did, {} got a command",
                r.lag_agents,
                r.lag_blocks,
                r.lag_after_s,
                r.lag_agents_faulted,
                r.fault_to_command_ms.count
            ),
        );
        row("fault to command ms", latency(&r.fault_to_command_ms));
        let n = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
        let i = &r.fault_to_command_intervals;
        row(
            "  in intervals",
            format!("p50 {}  p99 {}  max {}", n(i.p50), n(i.p99), n(i.max)),
        );
    }
    if let Some(nodes) = &r.nodes {
        for (node, seqs) in nodes {
            row(
                node,
                format!(
                    "seq {:?}..{:?} acked through {}",
                    seqs.first_seq, seqs.last_seq, seqs.acked_through
                ),
            );
        }
    }
    out
}

/// `guardian-loadgen decode`: the best of `passes` timed passes of `Batch::decode` over
/// `batches` encoded batches, in ns per batch and per sample.
fn bench_decode(args: &DecodeArgs) -> anyhow::Result<()> {
    let most = guardian_server::ingest::MAX_SAMPLES_PER_BATCH;
    anyhow::ensure!(
        (1..=most).contains(&args.samples_per_batch),
        "--samples-per-batch must be 1..={most}"
    );
    anyhow::ensure!(
        (1..=1_000_000).contains(&args.batches) && (1..=10_000).contains(&args.passes),
        "--batches must be 1..=1000000 and --passes 1..=10000"
    );
    let frames: Vec<bytes::Bytes> = (0..args.batches)
        .map(|i| {
            let agent = u32::try_from(i % 100).unwrap_or(0) + 1;
            let generator = SampleGen::new(agent, args.samples_per_batch, Duration::from_secs(1));
            let seq = i as u64 + 1;
            bytes::Bytes::from(
                generator
                    .batch(seq, 1_700_000_000_000 + seq as i64 * 1_000)
                    .encode_to_vec(),
            )
        })
        .collect();
    let bytes: usize = frames.iter().map(bytes::Bytes::len).sum();
    let mut samples = 0usize;
    let mut best = Duration::MAX;
    for _ in 0..args.passes {
        let started = Instant::now();
        samples = 0;
        for frame in &frames {
            let batch = guardian_server::batch::Batch::decode(std::hint::black_box(frame))?;
            samples += std::hint::black_box(batch).samples.len();
        }
        best = best.min(started.elapsed());
    }
    let ns = best.as_nanos() as f64;
    println!(
        "decode: {} batches, {samples} samples, {bytes} bytes ({:.0} bytes/sample); best of {} passes: {:.0} ns/batch, {:.1} ns/sample, {:.0} MB/s",
        frames.len(),
        bytes as f64 / samples.max(1) as f64,
        args.passes,
        ns / frames.len() as f64,
        ns / samples.max(1) as f64,
        bytes as f64 / ns * 1e3,
    );
    Ok(())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("GUARDIAN_LOADGEN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let outcome = match cli.command {
        Cmd::Pki(args) => write_pki(&args).map(|()| ExitCode::SUCCESS),
        Cmd::Decode(args) => bench_decode(&args).map(|()| ExitCode::SUCCESS),
        Cmd::Run(args) => {
            if let Err(problem) = args.validate() {
                eprintln!("guardian-loadgen: invalid arguments: {problem}");
                return ExitCode::from(EXIT_USAGE);
            }
            run(args).await
        }
    };
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("guardian-loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_latencies_are_exact_and_the_max_is_kept() {
        let mut h = LatencyHistogram::default();
        for v in [5, 5, 7, 100] {
            h.record(v);
        }
        assert_eq!(h.quantile(0.5), Some(5));
        assert_eq!(h.quantile(0.75), Some(7));
        assert_eq!(h.quantile(1.0), Some(100));
        assert_eq!(h.summary().count, 4);
        assert_eq!(LatencyHistogram::default().quantile(0.5), None);
    }

    #[test]
    fn percentiles_are_within_the_bucket_error() {
        let mut h = LatencyHistogram::default();
        for v in 1..=100_000u64 {
            h.record(v * 10);
        }
        for (q, exact) in [(0.5, 500_000.0), (0.9, 900_000.0), (0.99, 990_000.0)] {
            let got = h.quantile(q).map(|v| v as f64).unwrap_or(0.0);
            // Reported as the bucket's upper bound: never below, at most 1/64 above.
            assert!(
                got >= exact && got <= exact * (1.0 + 1.0 / 64.0),
                "q{q}: {got} vs {exact}"
            );
        }
        assert_eq!(h.quantile(1.0), Some(1_000_000));
    }

    #[test]
    fn buckets_cover_every_u64_and_bounds_are_consistent() {
        for v in [
            0,
            1,
            127,
            128,
            129,
            1_000,
            65_535,
            1 << 40,
            u64::MAX - 1,
            u64::MAX,
        ] {
            let b = LatencyHistogram::bucket(v);
            assert!(b < BUCKETS, "{v} -> {b}");
            assert!(LatencyHistogram::upper_bound(b) >= v);
            if b > 0 {
                assert!(LatencyHistogram::upper_bound(b - 1) < v, "{v}");
            }
        }
        let mut h = LatencyHistogram::default();
        h.record(u64::MAX);
        assert_eq!(h.quantile(0.5), Some(u64::MAX));
    }

    #[test]
    fn summary_is_in_milliseconds() {
        let mut h = LatencyHistogram::default();
        h.record(2_500);
        let s = h.summary();
        assert_eq!(s.max, Some(2.5));
        assert!(s.p50.is_some_and(|p| (p - 2.5).abs() < 0.05));
    }

    fn kinds(batch: &SampleBatch) -> (usize, usize, usize) {
        let count = |f: fn(&sample::Kind) -> bool| {
            batch
                .samples
                .iter()
                .filter(|s| s.kind.as_ref().is_some_and(f))
                .count()
        };
        (
            count(|k| matches!(k, sample::Kind::Host(_))),
            count(|k| matches!(k, sample::Kind::Chain(_))),
            count(|k| matches!(k, sample::Kind::Gpu(_))),
        )
    }

    #[test]
    fn the_first_batches_carry_the_backfilled_history_oldest_first() {
        let generator = SampleGen::new(3, 3, Duration::from_secs(1)).with_backfill(30, 6);
        let now = 1_700_000_000_000;
        let first = generator.batch(1, now);
        assert_eq!(first.samples.len(), 3 + 12);
        let times: Vec<i64> = first
            .samples
            .iter()
            .map(|s| s.observed_at_unix_ms)
            .collect();
        assert_eq!(times[0], now - 30 * 60_000);
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "oldest first");
        // 180 steps, 6 a batch: batches 1..=30 carry history, batch 31 does not.
        assert_eq!(generator.batch(30, now).samples.len(), 3 + 12);
        assert_eq!(
            generator.batch(30, now).samples[10].observed_at_unix_ms,
            now - 10_000
        );
        assert_eq!(generator.batch(31, now).samples.len(), 3);
        // One step a batch: 180 batches carry a host and a chain sample of history each.
        let spread = SampleGen::new(3, 3, Duration::from_secs(1)).with_backfill(30, 1);
        assert_eq!(spread.batch(1, now).samples.len(), 3 + 2);
        assert_eq!(
            spread.batch(1, now).samples[0].observed_at_unix_ms,
            now - 30 * 60_000
        );
        assert_eq!(spread.batch(180, now).samples.len(), 3 + 2);
        assert_eq!(spread.batch(181, now).samples.len(), 3);
    }

    #[test]
    fn batches_carry_the_asked_number_of_samples_of_each_kind() {
        for per_batch in [1, 2, 3, 10, 100] {
            let generator = SampleGen::new(7, per_batch, Duration::from_secs(1));
            for seq in 1..=20 {
                let batch = generator.batch(seq, 1_700_000_000_000);
                assert_eq!(batch.seq, seq);
                assert_eq!(batch.samples.len(), per_batch, "{per_batch} seq {seq}");
                let (host, chain, gpu) = kinds(&batch);
                assert!(host >= 1);
                assert_eq!(chain, usize::from(per_batch >= 2));
                assert_eq!(gpu, usize::from(per_batch >= 3 && seq.is_multiple_of(10)));
            }
        }
    }

    #[test]
    fn samples_look_like_a_gpu_validator() {
        let generator = SampleGen::new(3, 10, Duration::from_secs(1));
        let batch = generator.batch(10, 1_700_000_000_000);
        for s in &batch.samples {
            match &s.kind {
                Some(sample::Kind::Host(h)) => {
                    assert_eq!(h.disks.len(), 4);
                    assert_eq!(h.networks.len(), 2);
                    assert!(h.cpu_pressure.is_some() && h.chain_data.is_some());
                    assert!((0.0..=100.0).contains(&h.cpu_busy_percent));
                }
                Some(sample::Kind::Chain(c)) => {
                    assert!(c.best_block > c.finalized_block);
                    assert!(c.standing.is_some());
                }
                Some(sample::Kind::Gpu(g)) => assert_eq!(g.devices.len(), 8),
                _ => panic!("unexpected sample kind"),
            }
        }
        // Host samples are spread over the batch period, oldest first.
        assert!(batch.samples[0].observed_at_unix_ms < batch.samples[7].observed_at_unix_ms);
        // Sizes: a 10-sample batch is a few KB; the gpu one is larger.
        let plain = generator.batch(11, 0).encoded_len();
        let with_gpu = batch.encoded_len();
        assert!(
            (3_000..12_000).contains(&plain),
            "plain batch {plain} bytes"
        );
        assert!(
            with_gpu > plain && with_gpu < 16_000,
            "gpu batch {with_gpu} bytes"
        );
    }

    #[test]
    fn the_chain_advances_a_block_per_twelve_simulated_seconds() {
        let generator = SampleGen::new(1, 2, Duration::from_secs(1));
        let best = |seq| {
            generator
                .batch(seq, 0)
                .samples
                .iter()
                .find_map(|s| match &s.kind {
                    Some(sample::Kind::Chain(c)) => Some(c.best_block),
                    _ => None,
                })
                .unwrap_or(0)
        };
        assert_eq!(best(1_200) - best(0), 100);
    }

    fn chain_of(batch: &SampleBatch) -> ChainSample {
        batch
            .samples
            .iter()
            .find_map(|s| match &s.kind {
                Some(sample::Kind::Chain(c)) => Some(c.clone()),
                _ => None,
            })
            .unwrap_or_default()
    }

    #[test]
    fn a_lagging_node_stays_fifty_blocks_behind_the_tip_it_reports() {
        let mut generator = SampleGen::new(5, 3, Duration::from_secs(1));
        let healthy_before = generator.batch(99, 0);
        generator.lag_from_seq = Some(100);
        // Seqs before the onset are rebuilt exactly as first sent (a resend).
        assert_eq!(generator.batch(99, 0), healthy_before);
        let healthy = chain_of(&healthy_before);
        assert_eq!(healthy.sync_highest_block, healthy.best_block);
        for seq in [100, 101, 1_000] {
            let c = chain_of(&generator.batch(seq, 0));
            assert_eq!(c.sync_highest_block - c.best_block, LAG_BLOCKS, "seq {seq}");
            assert!(
                c.references
                    .iter()
                    .all(|r| r.best_block >= c.sync_highest_block)
            );
            assert!(!c.is_syncing && c.responsive);
            assert!(c.best_block > c.finalized_block);
        }
        // It still follows the chain: no frozen head.
        let later = chain_of(&generator.batch(1_000, 0)).best_block;
        assert!(later > chain_of(&generator.batch(100, 0)).best_block);
    }

    fn run_args(extra: &[&str]) -> RunArgs {
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            run: RunArgs,
        }
        let mut argv = vec![
            "loadgen",
            "--server",
            "https://127.0.0.1:7443",
            "--pki-dir",
            "/nonexistent",
            "--agents",
            "10",
            "--duration-s",
            "30",
        ];
        argv.extend_from_slice(extra);
        Wrap::parse_from(argv).run
    }

    #[test]
    fn the_fault_must_fit_the_fleet_and_the_run() {
        let plain = run_args(&[]);
        assert_eq!((plain.lag_agents, plain.lag_after_s), (0, 10));
        assert!(plain.validate().is_ok());
        assert!(run_args(&["--lag-agents", "4"]).validate().is_ok());
        assert!(run_args(&["--lag-agents", "11"]).validate().is_err());
        assert!(
            run_args(&["--lag-agents", "1", "--lag-after-s", "30"])
                .validate()
                .is_err()
        );
        // No fault, no constraint on its start.
        assert!(run_args(&["--lag-after-s", "60"]).validate().is_ok());
    }

    #[test]
    fn fault_to_command_is_also_given_in_sampling_intervals() {
        let mut h = LatencyHistogram::default();
        h.record(1_000_000);
        h.record(1_500_000);
        let i = IntervalSummary::of(&h.summary(), Duration::from_millis(500));
        assert!(i.p50.is_some_and(|p| (p - 2.0).abs() < 0.05), "{i:?}");
        assert!(i.p99.is_some_and(|p| (p - 3.0).abs() < 0.05), "{i:?}");
    }

    #[test]
    fn a_resent_batch_is_identical_to_the_first() {
        let generator = SampleGen::new(42, 10, Duration::from_millis(100));
        assert_eq!(generator.batch(30, 123), generator.batch(30, 123));
        assert_ne!(generator.batch(30, 123), generator.batch(31, 123));
    }

    #[test]
    fn late_send_times_are_skipped_not_bunched() {
        let t0 = Instant::now();
        let p = Duration::from_millis(100);
        assert_eq!(next_tick(t0, p, t0), (t0 + p, 0));
        let (next, skipped) = next_tick(t0, p, t0 + Duration::from_millis(350));
        assert_eq!(skipped, 3);
        assert_eq!(next, t0 + Duration::from_millis(400));
    }

    #[test]
    fn node_names_are_zero_padded_to_four_digits_or_more() {
        assert_eq!(node_name("load", 1, name_width(100)), "load0001");
        assert_eq!(node_name("load", 1000, name_width(1000)), "load1000");
        assert_eq!(node_name("load", 7, name_width(12_345)), "load00007");
        assert!(check_prefix("load").is_ok());
        assert!(check_prefix("Load").is_err());
    }
}
