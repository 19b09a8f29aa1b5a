//! Operator surfaces: the Fleet gRPC API (operator certificates only) and the plain HTTP
//! admin port (`/metrics`, `/healthz`, `/readyz`).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use guardian_proto::v1::fleet_server::Fleet;
use guardian_proto::v1::{
    AuditEntry as AuditEntryMessage, CancelCommandRequest, ClusterHealth, CommandRecord,
    GetCommandRequest, GetNodeRequest, HistoryPoint, HistoryRequest, HistoryResponse,
    IssueCommandRequest, ListAuditRequest, ListAuditResponse, ListClustersRequest,
    ListClustersResponse, ListFindingsRequest, ListFindingsResponse, ListNodesRequest,
    ListNodesResponse, Node, NodeEvent, PauseNodeRequest, ResumeNodeRequest, VerifyAuditRequest,
    VerifyAuditResponse, WatchNodesRequest,
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};

use crate::actuate::{ActuateError, Actuator};
use crate::control::ReconcileHandle;
use crate::identity::{NodeId, Peer};
use crate::metrics::Metrics;
use crate::reconcile::{Action, UnknownAction};
use crate::registry::Registry;
use crate::store::history::TelemetryReader;
use crate::store::telemetry;
use crate::store::{Ledger, SecurityEvent};
use crate::unix_ms;

/// The Fleet gRPC service.
#[derive(Debug, Clone)]
pub struct FleetApi {
    registry: Arc<Registry>,
    ledger: Ledger,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    watchers: TaskTracker,
    telemetry: TelemetryReader,
    actuator: Actuator,
    reconcile: ReconcileHandle,
    /// The audit anchor file `VerifyAudit` checks the chain's head against.
    audit_anchor_file: Option<std::path::PathBuf>,
}

/// The gRPC status for an action that was not carried out.
fn actuate_status(error: ActuateError) -> Status {
    let message = error.to_string();
    match error {
        ActuateError::CommandsOff | ActuateError::AlreadyEnded { .. } => {
            Status::failed_precondition(message)
        }
        ActuateError::Invalid(_) => Status::invalid_argument(message),
        ActuateError::UnknownCommand(_) => Status::not_found(message),
        ActuateError::NotLive(_)
        | ActuateError::NotRecorded(_)
        | ActuateError::NotDelivered { .. }
        | ActuateError::Ledger(_) => Status::unavailable(message),
    }
}

impl FleetApi {
    /// A Fleet API over `registry`; watch streams end on `shutdown`. History comes from
    /// `telemetry`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        registry: Arc<Registry>,
        ledger: Ledger,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
        watchers: TaskTracker,
        telemetry: TelemetryReader,
        actuator: Actuator,
        reconcile: ReconcileHandle,
    ) -> Self {
        Self {
            registry,
            ledger,
            metrics,
            shutdown,
            watchers,
            telemetry,
            actuator,
            reconcile,
            audit_anchor_file: None,
        }
    }

    /// `VerifyAudit` also checks the newest anchor in `file` (the server's
    /// `audit_anchor_file`, or beside a SQLite ledger).
    #[must_use]
    pub fn with_audit_anchor(mut self, file: Option<std::path::PathBuf>) -> Self {
        self.audit_anchor_file = file;
        self
    }

    fn node_or_status(&self, raw: &str) -> Result<Node, Status> {
        let id = NodeId::parse(raw).map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.registry
            .get(&id)
            .ok_or_else(|| Status::not_found(format!("no node {raw:?} has ever connected")))
    }

    async fn command_record(&self, command_id: &str) -> Result<Response<CommandRecord>, Status> {
        self.ledger
            .command(command_id)
            .await
            .map_err(|e| Status::unavailable(format!("the ledger cannot answer now: {e}")))?
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no command {command_id:?} was issued")))
    }

    /// One node's metric history (`GetHistory` without the caller check): the web page
    /// draws its charts from this too.
    ///
    /// # Errors
    /// The status `GetHistory` answers with.
    pub async fn history(&self, request: HistoryRequest) -> Result<HistoryResponse, Status> {
        let id =
            NodeId::parse(&request.node_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if self.registry.get(&id).is_none() {
            return Err(Status::not_found(format!(
                "no node {:?} has ever connected",
                request.node_id
            )));
        }
        let def = telemetry::metric(&request.metric).ok_or_else(|| {
            Status::invalid_argument(
                telemetry::HistoryError::UnknownMetric(request.metric.clone()).to_string(),
            )
        })?;
        let to = if request.to_unix_ms == 0 {
            unix_ms()
        } else {
            request.to_unix_ms
        };
        let from = if request.from_unix_ms == 0 {
            to - 3_600_000
        } else {
            request.from_unix_ms
        };
        let (resolution, plan_source) = telemetry::plan(from, to, request.resolution_seconds)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (source, points) = self
            .telemetry
            .history(id.as_str(), def, (from, to), resolution, plan_source)
            .await
            .map_err(|error| {
                tracing::warn!(%error, "HistoryFailed");
                Status::unavailable(format!("{error}; retry later"))
            })?;
        Ok(HistoryResponse {
            node_id: id.to_string(),
            metric: def.name.to_owned(),
            unit: def.unit.to_owned(),
            resolution_seconds: resolution,
            source: source.to_owned(),
            points: points
                .into_iter()
                .map(|p| HistoryPoint {
                    start_unix_ms: p.start_unix_ms,
                    avg: p.avg,
                    min: p.min,
                    max: p.max,
                    count: p.count,
                })
                .collect(),
        })
    }

    /// Lets operators through; refuses (and records) anyone else.
    async fn authorize<T>(&self, request: &Request<T>, method: &str) -> Result<String, Status> {
        let (reason, peer, status) = match Peer::from_request(request) {
            Ok(Peer::Operator(name)) => return Ok(name),
            Ok(peer @ Peer::Node(_)) => (
                "fleet_call_by_agent",
                peer.label(),
                Status::permission_denied(format!(
                    "{} holds an agent certificate; the Fleet API ({method}) needs an operator certificate \
                     (guardianctl pki init writes operator.pem)",
                    peer.label()
                )),
            ),
            Err(error) => (
                "no_identity",
                "unknown".to_owned(),
                Status::unauthenticated(error.to_string()),
            ),
        };
        self.metrics.refuse(reason);
        let event = SecurityEvent {
            at_unix_ms: unix_ms(),
            kind: reason.to_owned(),
            peer,
            detail: status.message().to_owned(),
        };
        match self.ledger.record_security_event(&event).await {
            Ok(true) => tracing::warn!(reason, peer = event.peer, method, "CallRefused"),
            Ok(false) => {
                self.metrics.security_events_suppressed.inc();
            }
            Err(error) => tracing::error!(%error, "cannot record security event"),
        }
        Err(status)
    }
}

#[tonic::async_trait]
impl Fleet for FleetApi {
    async fn list_nodes(
        &self,
        request: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        self.authorize(&request, "ListNodes").await?;
        let nodes = self.registry.list();
        let fleet_risk = nodes.iter().map(|n| n.risk).fold(0.0, f64::max);
        let work = crate::progress::PROGRESS
            .snapshot()
            .into_iter()
            .map(|w| guardian_proto::v1::ServerWork {
                name: w.name.to_owned(),
                what: w.what.to_owned(),
                unit: w.unit.to_owned(),
                done: w.done,
                total: w.total,
                rate_per_second: w.rate_per_second,
                eta_seconds: w.eta_seconds.unwrap_or(-1.0),
            })
            .collect();
        Ok(Response::new(ListNodesResponse {
            nodes,
            fleet_risk,
            work,
        }))
    }

    async fn get_node(&self, request: Request<GetNodeRequest>) -> Result<Response<Node>, Status> {
        self.authorize(&request, "GetNode").await?;
        let raw = &request.get_ref().node_id;
        let id = NodeId::parse(raw).map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.registry
            .get(&id)
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no node {raw:?} has ever connected")))
    }

    async fn get_history(
        &self,
        request: Request<HistoryRequest>,
    ) -> Result<Response<HistoryResponse>, Status> {
        self.authorize(&request, "GetHistory").await?;
        self.history(request.into_inner()).await.map(Response::new)
    }

    async fn issue_command(
        &self,
        request: Request<IssueCommandRequest>,
    ) -> Result<Response<CommandRecord>, Status> {
        let operator = self.authorize(&request, "IssueCommand").await?;
        let request = request.into_inner();
        let node =
            NodeId::parse(&request.node_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let action: Action = request
            .action
            .parse()
            .map_err(|e: UnknownAction| Status::invalid_argument(e.to_string()))?;
        let ttl = std::time::Duration::from_secs(u64::from(match request.ttl_seconds {
            0 => 300,
            ttl => ttl,
        }));
        let command_id = self
            .actuator
            .issue(
                &node,
                action,
                request.parameters,
                ttl,
                &format!("operator/{operator}"),
            )
            .await
            .map_err(actuate_status)?;
        self.command_record(&command_id).await
    }

    async fn cancel_command(
        &self,
        request: Request<CancelCommandRequest>,
    ) -> Result<Response<CommandRecord>, Status> {
        let operator = self.authorize(&request, "CancelCommand").await?;
        let request = request.into_inner();
        let reason = if request.reason.trim().is_empty() {
            "no reason given"
        } else {
            request.reason.trim()
        };
        self.actuator
            .cancel(&request.command_id, &operator, reason)
            .await
            .map(Response::new)
            .map_err(actuate_status)
    }

    async fn list_findings(
        &self,
        request: Request<ListFindingsRequest>,
    ) -> Result<Response<ListFindingsResponse>, Status> {
        self.authorize(&request, "ListFindings").await?;
        let request = request.into_inner();
        if !request.node_id.is_empty() {
            NodeId::parse(&request.node_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let limit = match request.limit {
            0 => 100,
            n => n.min(10_000),
        };
        let findings = self
            .ledger
            .findings(&request.node_id, request.include_cleared, limit)
            .await
            .map_err(|e| Status::unavailable(format!("the ledger cannot answer now: {e}")))?;
        let fleet_risk = self
            .registry
            .list()
            .iter()
            .map(|n| n.risk)
            .fold(0.0, f64::max);
        Ok(Response::new(ListFindingsResponse {
            findings,
            fleet_risk,
        }))
    }

    async fn list_audit(
        &self,
        request: Request<ListAuditRequest>,
    ) -> Result<Response<ListAuditResponse>, Status> {
        use crate::store::audit::{AuditFilter, AuditKind};
        self.authorize(&request, "ListAudit").await?;
        let request = request.into_inner();
        if !request.node_id.is_empty() {
            NodeId::parse(&request.node_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let kind = match request.kind.as_str() {
            "" => None,
            text => Some(
                text.parse::<AuditKind>()
                    .map_err(|e| Status::invalid_argument(e.to_string()))?,
            ),
        };
        let bound = |ms: i64| (ms != 0).then_some(ms);
        let filter = AuditFilter {
            node_id: request.node_id,
            kind,
            since_unix_ms: bound(request.since_unix_ms),
            until_unix_ms: bound(request.until_unix_ms),
        };
        let limit = match request.limit {
            0 => 100,
            n => n.min(10_000) as usize,
        };
        let entries = self
            .ledger
            .audit_entries_matching(request.after_seq, limit, &filter)
            .await
            .map_err(|e| Status::unavailable(format!("the ledger cannot answer now: {e}")))?;
        let next_after_seq = if entries.len() == limit {
            entries.last().map_or(0, |e| e.seq)
        } else {
            0
        };
        Ok(Response::new(ListAuditResponse {
            entries: entries.into_iter().map(AuditEntryMessage::from).collect(),
            next_after_seq,
        }))
    }

    async fn verify_audit(
        &self,
        request: Request<VerifyAuditRequest>,
    ) -> Result<Response<VerifyAuditResponse>, Status> {
        self.authorize(&request, "VerifyAudit").await?;
        let unavailable = |e: crate::store::StoreError| {
            Status::unavailable(format!("the ledger cannot answer now: {e}"))
        };
        let report = self.ledger.audit_verify().await.map_err(unavailable)?;
        let anchors = match &self.audit_anchor_file {
            Some(path) => crate::store::anchor::read(path).map_err(|e| {
                Status::internal(format!("the server cannot read its audit anchor file: {e}"))
            })?,
            None => Vec::new(),
        };
        let mut answer = VerifyAuditResponse {
            intact: true,
            entries: report.entries,
            anchors: u32::try_from(anchors.len()).unwrap_or(u32::MAX),
            anchored_seq: anchors.iter().map(|a| a.seq).max().unwrap_or(0),
            ..VerifyAuditResponse::default()
        };
        if let Some(broken) = report.first_broken {
            answer.intact = false;
            answer.broken_seq = broken.seq;
            answer.reason = broken.reason.to_string();
        } else if let Some(mismatch) = self
            .ledger
            .audit_check_anchor(&anchors)
            .await
            .map_err(unavailable)?
        {
            answer.intact = false;
            answer.reason = mismatch.to_string();
        }
        Ok(Response::new(answer))
    }

    async fn pause_node(
        &self,
        request: Request<PauseNodeRequest>,
    ) -> Result<Response<Node>, Status> {
        let operator = self.authorize(&request, "PauseNode").await?;
        let request = request.into_inner();
        self.node_or_status(&request.node_id)?;
        let node =
            NodeId::parse(&request.node_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let reason = if request.reason.trim().is_empty() {
            "no reason given"
        } else {
            request.reason.trim()
        };
        self.reconcile
            .pause(node, &operator, reason)
            .await
            .map_err(Status::failed_precondition)?;
        self.node_or_status(&request.node_id).map(Response::new)
    }

    async fn resume_node(
        &self,
        request: Request<ResumeNodeRequest>,
    ) -> Result<Response<Node>, Status> {
        let operator = self.authorize(&request, "ResumeNode").await?;
        let request = request.into_inner();
        self.node_or_status(&request.node_id)?;
        let node =
            NodeId::parse(&request.node_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.reconcile
            .resume(node, &operator)
            .await
            .map_err(Status::failed_precondition)?;
        self.node_or_status(&request.node_id).map(Response::new)
    }

    async fn list_clusters(
        &self,
        request: Request<ListClustersRequest>,
    ) -> Result<Response<ListClustersResponse>, Status> {
        self.authorize(&request, "ListClusters").await?;
        let clusters = self
            .actuator
            .kubernetes()
            .map(|k| k.clusters())
            .unwrap_or_default()
            .into_iter()
            .map(|c| ClusterHealth {
                name: c.name,
                reachable: c.health.reachable,
                missing_permissions: c.health.missing,
                taonodes: u32::try_from(c.health.taonodes).unwrap_or(u32::MAX),
                last_error: c.health.last_error,
                checked_unix_ms: c.health.checked_unix_ms,
            })
            .collect();
        Ok(Response::new(ListClustersResponse { clusters }))
    }

    async fn get_command(
        &self,
        request: Request<GetCommandRequest>,
    ) -> Result<Response<CommandRecord>, Status> {
        self.authorize(&request, "GetCommand").await?;
        self.command_record(&request.get_ref().command_id).await
    }

    type WatchNodesStream =
        tokio_stream::adapters::Map<ReceiverStream<Node>, fn(Node) -> Result<NodeEvent, Status>>;

    async fn watch_nodes(
        &self,
        request: Request<WatchNodesRequest>,
    ) -> Result<Response<Self::WatchNodesStream>, Status> {
        let operator = self.authorize(&request, "WatchNodes").await?;
        let changes = self.registry.watch(
            self.shutdown.clone(),
            &self.watchers,
            tracing::info_span!("fleet_watch", operator),
        );
        let event: fn(Node) -> Result<NodeEvent, Status> =
            |node| Ok(NodeEvent { node: Some(node) });
        Ok(Response::new(tokio_stream::StreamExt::map(
            ReceiverStream::new(changes),
            event,
        )))
    }
}

/// What the admin handlers read.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// Metrics to render.
    pub metrics: Arc<Metrics>,
    /// The fleet, for the per-node series (`guardian_node_*`).
    pub registry: Arc<crate::registry::Registry>,
    /// Checked by `/readyz`.
    pub ledger: Ledger,
}

/// The admin HTTP router.
pub fn admin_router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// The admin router of a standby (waiting for the ledger): alive, not ready, and one gauge,
/// so that probes keep it running and no traffic is routed to it.
pub fn standby_router() -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|| async {
                "# HELP guardian_standby 1 while this server waits for the ledger held by another\n\
                 # TYPE guardian_standby gauge\nguardian_standby 1\n"
            }),
        )
        .route("/healthz", get(|| async { "ok (standby)\n" }))
        .route(
            "/readyz",
            get(|| async {
                (
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    "standby: another server holds the ledger\n",
                )
            }),
        )
}

async fn metrics(
    State(state): State<AdminState>,
) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::with_node_series(state.metrics.render(), &state.registry.metric_rows()),
    )
}

async fn readyz(State(state): State<AdminState>) -> (StatusCode, String) {
    match state.ledger.ping().await {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("ledger not answering: {error}\n"),
        ),
    }
}
