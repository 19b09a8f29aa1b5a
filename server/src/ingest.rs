//! Uplink service: turns an agent's stream into durable rows. The node id comes from the
//! peer certificate; a batch is acked only after the store committed it.
//!
//! # Guarantees
//! - A stream whose certificate is not an agent's, or whose Hello names another node, is
//!   refused and recorded in the ledger's security events.
//! - A malformed or oversized frame ends *that* stream with a clear status; other streams
//!   are untouched.
//! - `Ack { through_seq }` is sent only after the group commit holding the batch returned
//!   (see [`crate::store::commit`]); a replayed
//!   `(node, seq)` is acked without being stored twice.

use std::sync::Arc;
use std::time::Duration;

use guardian_proto::v1::{Ack, Hello, NodeDescriptor, ServerFrame, Welcome, server_frame};
use guardian_proto::wire::uplink_server::Uplink;
use guardian_proto::wire::{AgentFrameIn, agent_frame_in};
use tokio::sync::mpsc;

use crate::batch::{Batch, Kind};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::actuate::live::SessionTable;
use crate::control::Trigger;
use crate::identity::{NodeId, Peer};
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::store::commit::{Committer, Job};
use crate::store::{Commit, Ledger, SecurityEvent};
use crate::unix_ms;

pub use crate::batch::MAX_SAMPLES_PER_BATCH;
/// How long a new stream waits for the node's previous session to finish its commit.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest text accepted in a Hello field (hostnames may be 253).
const MAX_HELLO_TEXT: usize = 253;

/// The Uplink gRPC service.
#[derive(Debug, Clone)]
pub struct Ingest {
    ledger: Ledger,
    committer: Committer,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    sample_interval_ms: u32,
    hello_timeout: Duration,
    max_frame_bytes: usize,
    shutdown: CancellationToken,
    sessions: TaskTracker,
    takeover: Arc<SessionTable>,
    reconcile: Option<Arc<Trigger>>,
}

impl Ingest {
    /// A service writing into `ledger`; sessions are spawned on `sessions` and end when
    /// `shutdown` is cancelled.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ledger: Ledger,
        committer: Committer,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        sample_interval_ms: u32,
        hello_timeout: Duration,
        max_frame_bytes: usize,
        shutdown: CancellationToken,
        sessions: TaskTracker,
    ) -> Self {
        Self {
            ledger,
            committer,
            registry,
            metrics,
            sample_interval_ms,
            hello_timeout,
            max_frame_bytes,
            shutdown,
            sessions,
            takeover: Arc::default(),
            reconcile: None,
        }
    }

    /// Wakes the control loop after each committed batch (`None`: the loop is off).
    #[must_use]
    pub fn with_reconcile(mut self, trigger: Option<Arc<Trigger>>) -> Self {
        self.reconcile = trigger;
        self
    }

    /// The live-session table commands are delivered through (`crate::actuate`).
    pub fn sessions(&self) -> Arc<SessionTable> {
        Arc::clone(&self.takeover)
    }

    /// Records a refusal (metric, log line, ledger row) and returns the status to send.
    async fn refuse(&self, reason: &'static str, peer: &str, status: Status) -> Status {
        self.metrics.refuse(reason);
        let event = SecurityEvent {
            at_unix_ms: unix_ms(),
            kind: reason.to_owned(),
            peer: peer.to_owned(),
            detail: status.message().to_owned(),
        };
        match self.ledger.record_security_event(&event).await {
            Ok(true) => {
                tracing::warn!(reason, peer, detail = status.message(), "StreamRefused");
            }
            // Over the peer's budget: counted, neither written nor logged.
            Ok(false) => {
                self.metrics.security_events_suppressed.inc();
            }
            Err(error) => {
                // The refusal itself still happens; losing the record is logged and counted.
                self.metrics
                    .store_errors
                    .get_or_create(&crate::metrics::Reason {
                        reason: error.kind(),
                    })
                    .inc();
                tracing::error!(%error, "cannot record security event");
            }
        }
        status
    }

    async fn await_hello(
        &self,
        node: &NodeId,
        inbound: &mut Streaming<AgentFrameIn>,
    ) -> Result<Hello, Status> {
        let peer = format!("node/{node}");
        let first = match tokio::time::timeout(self.hello_timeout, inbound.message()).await {
            Err(_) => {
                let status = Status::deadline_exceeded(format!(
                    "no Hello within {} ms of opening the stream",
                    self.hello_timeout.as_millis()
                ));
                return Err(self.refuse("hello_timeout", &peer, status).await);
            }
            Ok(Err(status)) => return Err(self.frame_error(&peer, status).await),
            Ok(Ok(None)) => return Err(Status::cancelled("stream closed before Hello")),
            Ok(Ok(Some(frame))) => frame,
        };
        let Some(agent_frame_in::Frame::Hello(hello)) = first.frame else {
            let status = Status::failed_precondition("the first frame of a stream must be Hello");
            return Err(self.refuse("missing_hello", &peer, status).await);
        };
        let claimed = hello
            .node
            .as_ref()
            .map(|d| d.node_id.as_str())
            .unwrap_or("");
        if claimed != node.as_str() {
            let status = Status::permission_denied(format!(
                "certificate identifies node \"{node}\" but Hello claims \"{claimed}\"; \
                 each agent must use its own certificate and set node_id to match it"
            ));
            return Err(self.refuse("hello_identity_mismatch", &peer, status).await);
        }
        Ok(hello)
    }

    /// Classifies a decode/transport error on an inbound frame and records it.
    async fn frame_error(&self, peer: &str, status: Status) -> Status {
        let (reason, status) = match status.code() {
            Code::OutOfRange | Code::ResourceExhausted => (
                "frame_too_large",
                Status::resource_exhausted(format!(
                    "frame refused: {}; this server accepts frames up to {} bytes (max_frame_bytes): send smaller batches",
                    status.message(),
                    self.max_frame_bytes
                )),
            ),
            Code::Cancelled | Code::Unavailable => return status,
            _ => (
                "malformed_frame",
                Status::invalid_argument(format!(
                    "malformed AgentFrame: {}; agent and server must both speak guardian.v1",
                    status.message()
                )),
            ),
        };
        self.refuse(reason, peer, status).await
    }

    /// Runs one established session until the agent leaves, a frame is bad, or shutdown.
    async fn session(
        self,
        node: NodeId,
        network: String,
        mut inbound: Streaming<AgentFrameIn>,
        outbound: mpsc::Sender<Result<ServerFrame, Status>>,
        (generation, cancel, running): (u64, CancellationToken, tokio::sync::OwnedMutexGuard<()>),
    ) {
        let peer = format!("node/{node}");
        self.metrics.streams_active.inc();
        let end: Option<Status> = loop {
            let frame = tokio::select! {
                () = cancel.cancelled() => break Some(if self.shutdown.is_cancelled() {
                    Status::unavailable("server shutting down; reconnect")
                } else {
                    Status::aborted(format!("a newer stream for node {node} took over this one"))
                }),
                () = outbound.closed() => break None,
                frame = inbound.message() => frame,
            };
            let frame = match frame {
                Ok(Some(frame)) => frame,
                Ok(None) => break None,
                Err(status) => break Some(self.frame_error(&peer, status).await),
            };
            match frame.frame {
                Some(agent_frame_in::Frame::Batch(encoded)) => {
                    let batch = match Batch::decode(&encoded) {
                        Ok(batch) => batch,
                        Err(error) => {
                            let status = Status::invalid_argument(format!(
                                "malformed AgentFrame: its SampleBatch does not decode ({error}); \
                                 agent and server must both speak guardian.v1"
                            ));
                            break Some(self.refuse("malformed_frame", &peer, status).await);
                        }
                    };
                    if let Err(status) = self.validate(&batch) {
                        break Some(self.refuse("malformed_frame", &peer, status).await);
                    }
                    let seq = batch.seq;
                    match self.commit(&node, &network, batch).await {
                        Ok(()) => {
                            let ack = ServerFrame {
                                frame: Some(server_frame::Frame::Ack(Ack { through_seq: seq })),
                            };
                            if outbound.send(Ok(ack)).await.is_err() {
                                break None;
                            }
                        }
                        Err(status) => break Some(status),
                    }
                }
                Some(agent_frame_in::Frame::Outcome(outcome)) => {
                    match self
                        .ledger
                        .record_command_outcome(&node, &outcome, unix_ms())
                        .await
                    {
                        Ok(recorded) => tracing::info!(
                            node = %node, command_id = outcome.command_id,
                            succeeded = outcome.succeeded, refused = outcome.refused,
                            ?recorded, "CommandOutcomeReceived"
                        ),
                        // The agent does not resend outcomes: the loss is logged and counted.
                        Err(error) => {
                            self.metrics
                                .store_errors
                                .get_or_create(&crate::metrics::Reason {
                                    reason: error.kind(),
                                })
                                .inc();
                            tracing::error!(node = %node, command_id = outcome.command_id, %error, "CommandOutcomeNotRecorded");
                        }
                    }
                }
                Some(agent_frame_in::Frame::Hello(_)) => {
                    let status = Status::failed_precondition(
                        "Hello may only be the first frame of a stream",
                    );
                    break Some(self.refuse("repeated_hello", &peer, status).await);
                }
                None => {
                    let status =
                        Status::invalid_argument("AgentFrame carries no frame (empty oneof)");
                    break Some(self.refuse("malformed_frame", &peer, status).await);
                }
            }
        };
        if let Some(status) = end {
            // The agent may already be gone; nothing more to do then.
            let _ = outbound.send(Err(status)).await;
        }
        self.metrics.streams_active.dec();
        self.takeover.end(&node, generation);
        drop(running);
        self.registry.disconnected(&node, unix_ms());
        tracing::info!(node = %node, "AgentDisconnected");
    }

    /// Bounds what a Hello may make the server keep in memory and in the ledger.
    fn check_hello(&self, hello: &Hello, descriptor: &NodeDescriptor) -> Result<(), Status> {
        let fields = [
            ("agent_version", hello.agent_version.len()),
            ("node.hostname", descriptor.hostname.len()),
            ("node.network", descriptor.network.len()),
            ("node.kernel_release", descriptor.kernel_release.len()),
            ("node.kubernetes_node", descriptor.kubernetes_node.len()),
            ("node.pod_name", descriptor.pod_name.len()),
            ("node.pod_namespace", descriptor.pod_namespace.len()),
        ];
        if let Some((field, len)) = fields.iter().find(|(_, len)| *len > MAX_HELLO_TEXT) {
            return Err(Status::invalid_argument(format!(
                "Hello.{field} is {len} bytes; at most {MAX_HELLO_TEXT} are accepted"
            )));
        }
        if hello.capabilities.len() > 64 {
            return Err(Status::invalid_argument(
                "Hello lists more than 64 capabilities",
            ));
        }
        Ok(())
    }

    fn validate(&self, batch: &Batch) -> Result<(), Status> {
        if batch.seq == 0 || batch.seq > i64::MAX as u64 {
            return Err(Status::invalid_argument(format!(
                "SampleBatch.seq {} is outside 1..={}",
                batch.seq,
                i64::MAX
            )));
        }
        for sample in &batch.samples {
            if let Some(Kind::Host(host)) = &sample.kind
                && (host.disks > 256 || host.networks > 256)
            {
                return Err(Status::invalid_argument(format!(
                    "SampleBatch {} reports {} disks and {} networks; at most 256 of each are accepted",
                    batch.seq, host.disks, host.networks
                )));
            }
        }
        if let Some(idx) = batch.samples.iter().position(|s| s.kind.is_none()) {
            return Err(Status::invalid_argument(format!(
                "SampleBatch {} sample {idx} has no kind",
                batch.seq
            )));
        }
        Ok(())
    }

    async fn commit(&self, node: &NodeId, network: &str, batch: Batch) -> Result<(), Status> {
        let arrived = std::time::Instant::now();
        let now = unix_ms();
        let seq = batch.seq;
        let batch = Arc::new(batch);
        let job = Job {
            node: node.clone(),
            network: network.to_owned(),
            batch: Arc::clone(&batch),
        };
        match self.committer.commit(job).await {
            Ok(Commit::Stored { samples }) => {
                self.metrics.batches_committed.inc();
                self.metrics.samples_committed.inc_by(samples as u64);
                self.registry.committed(node, &batch, now);
                if let Some(trigger) = &self.reconcile {
                    trigger.sample(node, arrived);
                }
                tracing::debug!(node = %node, seq, samples, "BatchAcked");
                Ok(())
            }
            Ok(Commit::Duplicate) => {
                self.metrics.batches_duplicate.inc();
                tracing::debug!(node = %node, seq, "BatchReplayed");
                Ok(())
            }
            Ok(Commit::BelowFloor) => {
                self.metrics.batches_duplicate.inc();
                self.metrics.batches_below_floor.inc();
                Ok(())
            }
            Err(error) => {
                self.metrics
                    .store_errors
                    .get_or_create(&crate::metrics::Reason { reason: error.kind })
                    .inc();
                tracing::error!(node = %node, seq, %error, "StoreFailed");
                Err(Status::unavailable(format!(
                    "store commit failed, batch {seq} not acked (the agent resends it)"
                )))
            }
        }
    }
}

#[tonic::async_trait]
impl Uplink for Ingest {
    type ConnectStream = ReceiverStream<Result<ServerFrame, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<AgentFrameIn>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let node = match Peer::from_request(&request) {
            Ok(Peer::Node(node)) => node,
            Ok(other @ Peer::Operator(_)) => {
                let status = Status::permission_denied(
                    "an operator certificate cannot stream telemetry; agents use their node certificate",
                );
                return Err(self.refuse("wrong_role", &other.label(), status).await);
            }
            Err(error) => {
                let status = Status::unauthenticated(error.to_string());
                return Err(self.refuse("no_identity", "unknown", status).await);
            }
        };
        let bound_network = match Peer::bound_network(&request) {
            Ok(network) => network,
            Err(error) => {
                let status = Status::unauthenticated(error.to_string());
                return Err(self
                    .refuse("no_identity", &format!("node/{node}"), status)
                    .await);
            }
        };
        let mut inbound = request.into_inner();
        let hello = self.await_hello(&node, &mut inbound).await?;
        let descriptor = hello.node.clone().unwrap_or_default();
        self.check_hello(&hello, &descriptor)?;
        // The network decides which fleet a node is judged with: a certificate that names one
        // wins over what the agent says.
        if let Some(bound) = bound_network
            && descriptor.network != bound
        {
            let status = Status::permission_denied(format!(
                "node {node}'s certificate binds it to network {bound:?} but its Hello says {:?}; \
                 set network = \"{bound}\" in the agent's config, or issue it a certificate for the other network",
                descriptor.network
            ));
            return Err(self
                .refuse("hello_network_mismatch", &format!("node/{node}"), status)
                .await);
        }
        let (generation, cancel, running) = self.takeover.begin(&node, &self.shutdown);
        let running = tokio::time::timeout(TAKEOVER_TIMEOUT, running.lock_owned())
            .await
            .map_err(|_| {
                Status::unavailable(format!(
                    "the previous stream of node {node} is still committing; retry shortly"
                ))
            })?;
        let last_stored_seq = self
            .ledger
            .record_hello(&node, &descriptor, &hello.agent_version, unix_ms())
            .await
            .map_err(|error| {
                tracing::error!(node = %node, %error, "StoreFailed");
                Status::unavailable("the server's ledger is unavailable; retrying later is safe")
            })?;
        self.registry.connected(
            &node,
            &descriptor,
            &hello.agent_version,
            last_stored_seq,
            unix_ms(),
        );
        self.metrics
            .nodes_known
            .set(i64::try_from(self.registry.len()).unwrap_or(i64::MAX));
        tracing::info!(node = %node, agent_version = hello.agent_version, last_acked_seq = hello.last_acked_seq, last_stored_seq, "AgentConnected");

        let (outbound, rx) = mpsc::channel(64);
        let welcome = ServerFrame {
            frame: Some(server_frame::Frame::Welcome(Welcome {
                node_id: node.to_string(),
                sample_interval_ms: self.sample_interval_ms,
                last_stored_seq,
                server_time_unix_ms: unix_ms(),
            })),
        };
        // The channel is fresh, so this cannot be full; commands can be queued only after.
        let _ = outbound.try_send(Ok(welcome));
        self.takeover.attach(&node, generation, outbound.clone());
        let span = tracing::info_span!("uplink_session", node = %node);
        self.sessions.spawn(
            self.clone()
                .session(
                    node,
                    descriptor.network.clone(),
                    inbound,
                    outbound,
                    (generation, cancel, running),
                )
                .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
