//! The mTLS stream to the server: sends Hello, then every spooled batch; applies acks;
//! reconnects with jittered exponential backoff.
//!
//! # Guarantees
//! - After each (re)connect every unacked batch is sent again, with its original seq.
//! - Nothing is removed from the spool except by an ack or a counted drop (see
//!   [`crate::spool`]); every batch carries the spool's drop counter.
//! - A command outcome leaves its queue only once a stream took it; one that a closed stream
//!   refused is sent on the next (kept across reconnects, not restarts). Outcomes have no
//!   ack: one taken by a stream that breaks before sending it is lost.
//! - A Welcome's sample interval is applied only within [`SAMPLE_INTERVAL_MS`] (100 ms to
//!   1 h); otherwise the agent keeps its own and logs `WelcomeIntervalRefused`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use guardian_proto::v1::uplink_client::UplinkClient;
use guardian_proto::v1::{
    AgentFrame, Command, CommandOutcome, Hello, NodeDescriptor, ServerFrame, agent_frame,
    server_frame,
};
use rand::Rng;
use tokio::sync::{Notify, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tracing::Instrument;

use crate::command::{CANCEL_COMMAND, CommandVerifier, Executor, Refusal, refusal_outcome};
use crate::config::{AgentConfig, SAMPLE_INTERVAL_MS};
use crate::spool::{self, Spool};

/// Most batches sent but not yet acked on one stream.
const IN_FLIGHT_WINDOW: usize = 256;
/// Time allowed for the TCP+TLS connect and for the Welcome.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a session with the server ended.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    /// TLS material could not be read.
    #[error("cannot read {path}: {source}")]
    ReadTls {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Connecting failed (refused, TLS handshake, timeout).
    #[error("cannot connect to {url}: {detail}")]
    Connect {
        /// The server URL.
        url: String,
        /// What failed.
        detail: String,
    },
    /// The server answered with an error status.
    #[error("server ended the stream: {code:?}: {message}")]
    Refused {
        /// gRPC code.
        code: tonic::Code,
        /// The server's explanation.
        message: String,
    },
    /// The server broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl UplinkError {
    /// Stable label for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ReadTls { .. } => "read_tls",
            Self::Connect { .. } => "connect",
            Self::Refused { .. } => "refused",
            Self::Protocol(_) => "protocol",
        }
    }
}

/// State shared between the sampling loop and the uplink.
#[derive(Debug)]
pub struct Shared {
    /// Batches waiting for acks.
    pub spool: Mutex<Spool>,
    /// Signalled when a batch is queued.
    pub queued: Notify,
    /// Sampling interval; the server's Welcome may change it.
    pub interval_ms: watch::Sender<u64>,
    /// Remote commands: `None` when `[commands] enabled = false` (every command is refused).
    pub commands: Option<RemoteCommands>,
    /// Outcomes waiting to be sent (kept across reconnects, not across restarts).
    pub outcomes: Mutex<VecDeque<CommandOutcome>>,
    /// Signalled when an outcome is queued.
    pub outcome_ready: Notify,
}

/// What running signed commands needs.
#[derive(Debug)]
pub struct RemoteCommands {
    /// Checks signature, node, validity and the persisted seen ids.
    pub verifier: Mutex<CommandVerifier>,
    /// Runs allowed actions.
    pub executor: Arc<Executor>,
}

/// Most outcomes kept while the server is unreachable.
const MAX_PENDING_OUTCOMES: usize = 256;

impl Shared {
    /// Queues an outcome for the server.
    pub fn push_outcome(&self, outcome: CommandOutcome) {
        let mut outcomes = self
            .outcomes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if outcomes.len() >= MAX_PENDING_OUTCOMES {
            let lost = outcomes.pop_front();
            tracing::warn!(
                command_id = lost.map(|o| o.command_id),
                "CommandOutcomeDropped: too many unsent outcomes"
            );
        }
        outcomes.push_back(outcome);
        drop(outcomes);
        self.outcome_ready.notify_one();
    }
}

/// Sends the queued outcomes on `tx`, oldest first. An outcome leaves the queue only once the
/// stream took it; one that could not be sent goes back to the front, for the next stream.
///
/// # Errors
/// [`UplinkError::Protocol`] when the stream is closed.
async fn send_outcomes(
    outcomes: &Mutex<VecDeque<CommandOutcome>>,
    tx: &mpsc::Sender<AgentFrame>,
) -> Result<(), UplinkError> {
    let lock = || {
        outcomes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    loop {
        // Popped under the lock, sent without it: a finishing command can queue meanwhile.
        let Some(outcome) = lock().pop_front() else {
            return Ok(());
        };
        let frame = AgentFrame {
            frame: Some(agent_frame::Frame::Outcome(outcome)),
        };
        if let Err(mpsc::error::SendError(frame)) = tx.send(frame).await {
            if let Some(agent_frame::Frame::Outcome(outcome)) = frame.frame {
                requeue_outcome(&mut lock(), outcome);
            }
            return Err(UplinkError::Protocol("request stream closed".into()));
        }
    }
}

/// Puts back at the front an outcome that could not be sent, unless the queue filled up
/// meanwhile (then it is the oldest, and dropped, as [`Shared::push_outcome`] would).
fn requeue_outcome(outcomes: &mut VecDeque<CommandOutcome>, outcome: CommandOutcome) {
    if outcomes.len() >= MAX_PENDING_OUTCOMES {
        tracing::warn!(
            command_id = outcome.command_id,
            "CommandOutcomeDropped: too many unsent outcomes"
        );
        return;
    }
    outcomes.push_front(outcome);
}

/// Applies the sampling interval a Welcome asks for: 0 keeps the agent's own, and so does a
/// value outside [`SAMPLE_INTERVAL_MS`] (logged), which a misconfigured or hostile server
/// could otherwise use to make the agent sample every millisecond.
fn apply_welcome_interval(interval_ms: &watch::Sender<u64>, asked_ms: u32) {
    if asked_ms == 0 {
        return;
    }
    let asked = u64::from(asked_ms);
    if !SAMPLE_INTERVAL_MS.contains(&asked) {
        tracing::warn!(
            asked_ms,
            kept_ms = *interval_ms.borrow(),
            "WelcomeIntervalRefused: the server asked for a sample interval of {asked_ms} ms, outside {}..={} ms; keeping the agent's own",
            SAMPLE_INTERVAL_MS.start(),
            SAMPLE_INTERVAL_MS.end()
        );
        return;
    }
    // Only a real change restarts the ticker (a reconnect must not add a batch).
    interval_ms.send_if_modified(|ms| std::mem::replace(ms, asked) != asked);
}

/// Clock offset (ms) over which the agent warns at connect: half the 30 s of skew signed
/// commands tolerate.
const CLOCK_SKEW_WARN_MS: i64 = 15_000;

/// This host's clock minus the server's, from a Welcome's server time (`None` from an older
/// server that does not send it). Transit makes it err by the one-way latency at most.
fn clock_offset_ms(server_time_unix_ms: i64, local_now_unix_ms: i64) -> Option<i64> {
    (server_time_unix_ms > 0).then(|| local_now_unix_ms.saturating_sub(server_time_unix_ms))
}

/// Verifies a command and, if it may run, runs it in the background; the outcome (or the
/// refusal) is queued for the server. A `cancel-command` is answered at once, under the
/// verifier's lock (its target is recorded as seen before the next command is verified).
fn handle_command(shared: &Arc<Shared>, command: Command) {
    let Some(remote) = &shared.commands else {
        let refusal = Refusal::ActionNotAllowed(
            "this agent runs no remote commands ([commands] enabled = false)".to_owned(),
        );
        tracing::warn!("CommandRefused: {refusal}");
        shared.push_outcome(refusal_outcome(&command, &refusal));
        return;
    };
    let now = crate::unix_ms();
    let mut verifier = remote
        .verifier
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let verdict = verifier.verify(&command, now);
    match verdict {
        Err(refusal) => {
            drop(verifier);
            shared.push_outcome(refusal_outcome(&command, &refusal));
        }
        Ok(envelope) if envelope.action == CANCEL_COMMAND => {
            let outcome = remote.executor.cancel(&envelope, &mut verifier, now);
            drop(verifier);
            shared.push_outcome(outcome);
        }
        Ok(envelope) => {
            drop(verifier);
            // Counted as running from here, so a cancel in the next frame finds it.
            let run = remote.executor.execute(&envelope);
            let shared = Arc::clone(shared);
            tokio::spawn(
                async move {
                    let outcome = run.await;
                    shared.push_outcome(outcome);
                }
                .instrument(tracing::info_span!(
                    "command",
                    command_id = envelope.command_id
                )),
            );
        }
    }
}

impl Shared {
    /// Locks the spool; a poisoned lock (a panic mid-update) still holds consistent data.
    pub fn spool(&self) -> std::sync::MutexGuard<'_, Spool> {
        self.spool
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Keeps a session open with the server until `shutdown`, reconnecting with backoff.
pub async fn run(
    config: AgentConfig,
    descriptor: NodeDescriptor,
    capabilities: Vec<String>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let mut failures: u32 = 0;
    let shared = &shared;
    loop {
        let session = session(
            &config,
            &descriptor,
            &capabilities,
            shared,
            &shutdown,
            &mut failures,
        );
        let outcome = tokio::select! {
            () = shutdown.cancelled() => return,
            outcome = session => outcome,
        };
        if shutdown.is_cancelled() {
            return;
        }
        let delay = backoff(&config, failures);
        match outcome {
            Ok(()) => tracing::info!(retry_in_ms = delay.as_millis() as u64, "UplinkClosed"),
            Err(error) => tracing::warn!(
                %error, kind = error.kind(), retry_in_ms = delay.as_millis() as u64,
                pending = shared.spool().len(), "UplinkDisconnected"
            ),
        }
        failures = failures.saturating_add(1);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// The reconnect delay after `failures` consecutive failures, from the config.
fn backoff(config: &AgentConfig, failures: u32) -> Duration {
    reconnect_delay(
        config.reconnect.initial_ms,
        config.reconnect.max_ms,
        failures,
        rand::rng().random_range(0.0..=1.0),
    )
}

/// Full-jitter exponential backoff: `jitter` (0..=1, uniform) times
/// d = min(`max_ms`, `initial_ms` x 2^`failures`), at least 1 ms. Full jitter (not [d/2, d])
/// spreads a fleet that lost its server at the same instant over the whole window, so a
/// restarted server meets a stream of handshakes instead of one wave per doubling.
pub fn reconnect_delay(initial_ms: u64, max_ms: u64, failures: u32, jitter: f64) -> Duration {
    let window = initial_ms
        .saturating_mul(1u64 << failures.min(20))
        .min(max_ms);
    let delay = (jitter.clamp(0.0, 1.0) * window as f64) as u64;
    Duration::from_millis(delay.max(1))
}

async fn channel(config: &AgentConfig) -> Result<Channel, UplinkError> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|source| UplinkError::ReadTls {
            path: path.display().to_string(),
            source,
        })
    };
    let connect_error = |detail: String| UplinkError::Connect {
        url: config.server_url.clone(),
        detail,
    };
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&config.tls.ca_file)?))
        .identity(Identity::from_pem(
            read(&config.tls.cert_file)?,
            read(&config.tls.key_file)?,
        ))
        .domain_name(config.server_name.clone());
    Endpoint::from_shared(config.server_url.clone())
        .map_err(|e| connect_error(e.to_string()))?
        .tls_config(tls)
        .map_err(|e| connect_error(e.to_string()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| connect_error(error_chain(&e)))
}

/// One connection: Hello, Welcome, then send/ack until the stream ends.
async fn session(
    config: &AgentConfig,
    descriptor: &NodeDescriptor,
    capabilities: &[String],
    shared: &Arc<Shared>,
    shutdown: &CancellationToken,
    failures: &mut u32,
) -> Result<(), UplinkError> {
    let channel = channel(config).await?;
    let mut client = UplinkClient::new(channel)
        .max_decoding_message_size(guardian_proto::DEFAULT_MAX_FRAME_BYTES)
        .max_encoding_message_size(guardian_proto::DEFAULT_MAX_FRAME_BYTES);
    let (tx, rx) = mpsc::channel::<AgentFrame>(IN_FLIGHT_WINDOW + 8);
    let hello = AgentFrame {
        frame: Some(agent_frame::Frame::Hello(Hello {
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            node: Some(descriptor.clone()),
            capabilities: capabilities.to_vec(),
            last_acked_seq: shared.spool().last_acked_seq(),
        })),
    };
    // The channel is fresh: this cannot be full.
    let _ = tx.try_send(hello);
    let refused = |status: tonic::Status| UplinkError::Refused {
        code: status.code(),
        message: status.message().to_owned(),
    };
    let mut inbound =
        tokio::time::timeout(CONNECT_TIMEOUT, client.connect(ReceiverStream::new(rx)))
            .await
            .map_err(|_| UplinkError::Protocol("no answer to Hello within 10 s".into()))?
            .map_err(refused)?
            .into_inner();
    let welcome = match tokio::time::timeout(CONNECT_TIMEOUT, inbound.message()).await {
        Err(_) => return Err(UplinkError::Protocol("no Welcome within 10 s".into())),
        Ok(Err(status)) => return Err(refused(status)),
        Ok(Ok(Some(ServerFrame {
            frame: Some(server_frame::Frame::Welcome(welcome)),
        }))) => welcome,
        Ok(Ok(_)) => {
            return Err(UplinkError::Protocol(
                "first server frame was not Welcome".into(),
            ));
        }
    };
    *failures = 0;
    shared.spool().set_base(welcome.last_stored_seq);
    apply_welcome_interval(&shared.interval_ms, welcome.sample_interval_ms);
    let local_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    if let Some(offset_ms) = clock_offset_ms(welcome.server_time_unix_ms, local_now)
        && offset_ms.abs() > CLOCK_SKEW_WARN_MS
    {
        tracing::warn!(
            offset_ms,
            "ClockSkew: this host's clock is {offset_ms} ms off the server's; signed commands are refused beyond 30 s of skew: fix NTP on this host"
        );
    }
    tracing::info!(
        server = config.server_url,
        node = welcome.node_id,
        last_stored_seq = welcome.last_stored_seq,
        pending = shared.spool().len(),
        "UplinkConnected"
    );

    // Highest seq written to this stream; everything after it is (re)sent.
    let mut sent_through = 0u64;
    let mut acked_through = 0u64;
    loop {
        send_outcomes(&shared.outcomes, &tx).await?;
        // Top up the in-flight window from the spool.
        let in_flight =
            usize::try_from(sent_through.saturating_sub(acked_through)).unwrap_or(usize::MAX);
        let room = IN_FLIGHT_WINDOW.saturating_sub(in_flight);
        if room > 0 {
            // Files are read with the spool unlocked: the sampler is not held up.
            let batches = spool::read_after(&shared.spool, sent_through.max(acked_through), room);
            for batch in batches {
                let seq = batch.seq;
                let frame = AgentFrame {
                    frame: Some(agent_frame::Frame::Batch(batch)),
                };
                if tx.send(frame).await.is_err() {
                    return Err(UplinkError::Protocol("request stream closed".into()));
                }
                sent_through = seq;
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = shared.queued.notified() => {}
            () = shared.outcome_ready.notified() => {}
            message = inbound.message() => match message {
                Ok(Some(ServerFrame { frame: Some(server_frame::Frame::Ack(ack)) })) => {
                    let removed = shared.spool().ack(ack.through_seq);
                    acked_through = acked_through.max(ack.through_seq);
                    tracing::debug!(through_seq = ack.through_seq, removed, "BatchAcked");
                }
                Ok(Some(ServerFrame { frame: Some(server_frame::Frame::Command(command)) })) => {
                    handle_command(shared, command);
                }
                Ok(Some(_)) => return Err(UplinkError::Protocol("unexpected server frame".into())),
                Ok(None) => return Ok(()),
                Err(status) => return Err(refused(status)),
            },
        }
    }
}

/// The error and its sources on one line (tonic's transport errors hide the cause).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_delay_is_full_jitter_over_a_doubling_capped_window() {
        let ms = |failures, jitter| reconnect_delay(500, 30_000, failures, jitter).as_millis();
        // The whole window, from (almost) nothing to its top.
        assert_eq!(ms(0, 0.0), 1);
        assert_eq!(ms(0, 0.5), 250);
        assert_eq!(ms(0, 1.0), 500);
        assert_eq!(ms(3, 1.0), 4_000);
        assert_eq!(ms(3, 0.25), 1_000);
        // Capped, however many failures.
        assert_eq!(ms(6, 1.0), 30_000);
        assert_eq!(ms(u32::MAX, 1.0), 30_000);
        assert_eq!(ms(u32::MAX, 0.5), 15_000);
        // Out-of-range jitter is clamped.
        assert_eq!(ms(1, 7.0), 1_000);
        assert_eq!(ms(1, -1.0), 1);
    }

    fn outcome(id: &str) -> CommandOutcome {
        CommandOutcome {
            command_id: id.to_owned(),
            succeeded: true,
            detail: String::new(),
            refused: String::new(),
        }
    }

    fn queued(outcomes: &Mutex<VecDeque<CommandOutcome>>) -> Vec<String> {
        outcomes
            .lock()
            .expect("lock")
            .iter()
            .map(|o| o.command_id.clone())
            .collect()
    }

    #[tokio::test]
    async fn outcomes_survive_a_closed_stream_and_go_out_on_the_next() {
        let outcomes = Mutex::new(VecDeque::from([outcome("c1"), outcome("c2")]));
        let (closed, rx) = mpsc::channel::<AgentFrame>(8);
        drop(rx);
        assert!(send_outcomes(&outcomes, &closed).await.is_err());
        assert_eq!(queued(&outcomes), ["c1", "c2"], "kept for the next stream");
        let (open, mut rx) = mpsc::channel::<AgentFrame>(8);
        send_outcomes(&outcomes, &open).await.expect("sent");
        assert!(
            queued(&outcomes).is_empty(),
            "sent outcomes leave the queue"
        );
        let mut sent = Vec::new();
        while let Ok(AgentFrame {
            frame: Some(agent_frame::Frame::Outcome(o)),
        }) = rx.try_recv()
        {
            sent.push(o.command_id);
        }
        assert_eq!(sent, ["c1", "c2"], "in order");
    }

    #[test]
    fn the_clock_offset_is_read_from_the_welcome_and_an_old_server_gives_none() {
        assert_eq!(clock_offset_ms(0, 1_000_000), None, "older server");
        assert_eq!(clock_offset_ms(1_000_000, 1_040_000), Some(40_000), "ahead");
        assert_eq!(clock_offset_ms(1_000_000, 960_000), Some(-40_000), "behind");
    }

    #[test]
    fn a_welcome_interval_outside_100_ms_to_1_h_is_ignored() {
        let (interval, _rx) = watch::channel(1000u64);
        for bad in [1, 99, 3_600_001, u32::MAX] {
            apply_welcome_interval(&interval, bad);
            assert_eq!(*interval.borrow(), 1000, "{bad} ms must be refused");
        }
        apply_welcome_interval(&interval, 0);
        assert_eq!(*interval.borrow(), 1000, "0 keeps the agent's own");
        for good in [100, 250, 3_600_000] {
            apply_welcome_interval(&interval, good);
            assert_eq!(*interval.borrow(), u64::from(good));
        }
    }
}
