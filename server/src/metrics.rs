//! Named server events as Prometheus metrics, rendered on the admin port's `/metrics`.
//! Counter names get `_total` appended by the encoder.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A label naming why something was refused or failed; values come from `kind()` methods.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// Stable, bounded reason.
    pub reason: &'static str,
}

/// A label naming a configured Kubernetes cluster (bounded by the config).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabel {
    /// The cluster's name in `[kubernetes.clusters.NAME]`.
    pub cluster: String,
}

/// A Kubernetes write or failure: cluster and a bounded kind.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterReason {
    /// The cluster.
    pub cluster: String,
    /// Stable, bounded reason or verb.
    pub reason: &'static str,
}

/// Every metric the server exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Batches committed to the store and acked (`BatchAcked`).
    pub batches_committed: Counter,
    /// Batches received again after a reconnect and acked without storing (`BatchReplayed`).
    pub batches_duplicate: Counter,
    /// Of those, replays at or below their node's pruning floor (stored long ago).
    pub batches_below_floor: Counter,
    /// Embedded-store sample rows deleted by retention.
    pub embedded_samples_expired: Counter,
    /// Samples committed.
    pub samples_committed: Counter,
    /// Streams and calls refused, by reason (`StreamRefused`).
    pub refused: Family<Reason, Counter>,
    /// Store failures, by kind (`StoreFailed`).
    pub store_errors: Family<Reason, Counter>,
    /// Agent streams open now.
    pub streams_active: Gauge,
    /// Nodes known to the registry.
    pub nodes_known: Gauge,
    /// Time to commit one group of batches (one transaction).
    pub commit_seconds: Histogram,
    /// Batches per group commit.
    pub commit_group_batches: Histogram,
    /// Group commits that took the most batches a group may hold: more were waiting, so
    /// the writer is behind when most groups are full.
    pub commit_groups_full: Counter,
    /// Batches waiting in the ClickHouse outbox.
    pub outbox_batches: Gauge,
    /// Bytes waiting in the ClickHouse outbox.
    pub outbox_bytes: Gauge,
    /// Rows inserted into ClickHouse.
    pub clickhouse_rows: Counter,
    /// Batches the sink took from memory (the committer's hand-off).
    pub sink_batches_from_memory: Counter,
    /// Batches the sink read back from the outbox table.
    pub sink_batches_from_outbox: Counter,
    /// Rows skipped on replay because ClickHouse already held them.
    pub clickhouse_rows_skipped: Counter,
    /// ClickHouse insert failures, by kind.
    pub clickhouse_errors: Family<Reason, Counter>,
    /// Time of one ClickHouse insert (every raw table of one chunk).
    pub clickhouse_insert_seconds: Histogram,
    /// ClickHouse circuit breaker: 0 closed, 1 open, 2 half-open.
    pub clickhouse_breaker: Gauge,
    /// Partitions dropped by retention.
    pub clickhouse_partitions_dropped: Counter,
    /// Reconciler evaluations of one node (detectors + plan).
    pub reconcile_evaluations: Counter,
    /// Findings raised, by kind (`FindingRaised`).
    pub findings_raised: Family<Reason, Counter>,
    /// Remediation commands sent by the reconciler, by action (`RemediationIssued`).
    pub remediations_issued: Family<Reason, Counter>,
    /// Alerts raised by the reconciler (`RemediationAlert`).
    pub remediation_alerts: Counter,
    /// From the arrival of the batch that tipped a decision to its command leaving the server.
    pub decision_latency_seconds: Histogram,
    /// How long a reconciler pass's one ledger transaction took (findings, decisions,
    /// commands and their audit entries), waiting for the ledger's writer included.
    pub reconcile_pass_write_seconds: Histogram,
    /// Webhook alerts by fate: delivered, failed, dropped_queue_full.
    pub alerts: Family<Reason, Counter>,
    /// gRPC connections held now (TLS handshake pending or done).
    pub connections_open: Gauge,
    /// Refusals over their peer's security-event budget: counted here, not written.
    pub security_events_suppressed: Counter,
    /// gRPC connections closed before or instead of serving, by reason.
    pub connections_refused: Family<Reason, Counter>,
    /// 1 while a Kubernetes cluster's last call reached its API server.
    pub kube_cluster_up: Family<ClusterLabel, Gauge>,
    /// Permissions the last check found missing, per cluster.
    pub kube_missing_permissions: Family<ClusterLabel, Gauge>,
    /// TaoNodes seen in the last list, per cluster.
    pub kube_taonodes: Family<ClusterLabel, Gauge>,
    /// Kubernetes writes made, by cluster and what (`delete_pod`, `status`, `event`).
    pub kube_writes: Family<ClusterReason, Counter>,
    /// Kubernetes calls that failed, by cluster and kind.
    pub kube_errors: Family<ClusterReason, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("guardian");
        let metrics = Self {
            batches_committed: Counter::default(),
            batches_duplicate: Counter::default(),
            batches_below_floor: Counter::default(),
            embedded_samples_expired: Counter::default(),
            samples_committed: Counter::default(),
            refused: Family::default(),
            store_errors: Family::default(),
            streams_active: Gauge::default(),
            nodes_known: Gauge::default(),
            commit_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            commit_group_batches: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            commit_groups_full: Counter::default(),
            outbox_batches: Gauge::default(),
            outbox_bytes: Gauge::default(),
            clickhouse_rows: Counter::default(),
            sink_batches_from_memory: Counter::default(),
            sink_batches_from_outbox: Counter::default(),
            clickhouse_rows_skipped: Counter::default(),
            clickhouse_errors: Family::default(),
            clickhouse_insert_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            clickhouse_breaker: Gauge::default(),
            clickhouse_partitions_dropped: Counter::default(),
            reconcile_evaluations: Counter::default(),
            findings_raised: Family::default(),
            remediations_issued: Family::default(),
            remediation_alerts: Counter::default(),
            decision_latency_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            reconcile_pass_write_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            alerts: Family::default(),
            connections_open: Gauge::default(),
            security_events_suppressed: Counter::default(),
            connections_refused: Family::default(),
            kube_cluster_up: Family::default(),
            kube_missing_permissions: Family::default(),
            kube_taonodes: Family::default(),
            kube_writes: Family::default(),
            kube_errors: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "ingest_batches_committed",
            "Batches committed and acked",
            metrics.batches_committed.clone(),
        );
        registry.register(
            "ingest_batches_duplicate",
            "Replayed batches acked without storing",
            metrics.batches_duplicate.clone(),
        );
        registry.register(
            "embedded_samples_expired",
            "Sample rows the embedded store deleted as older than embedded_retention_days",
            metrics.embedded_samples_expired.clone(),
        );
        registry.register(
            "ingest_batches_below_floor",
            "Of the replayed batches, those at or below their node's pruning floor (stored more than one pruning round ago; many mean an agent's spool went back in time)",
            metrics.batches_below_floor.clone(),
        );
        registry.register(
            "ingest_samples_committed",
            "Samples committed",
            metrics.samples_committed.clone(),
        );
        registry.register(
            "refused",
            "Streams and calls refused, by reason",
            metrics.refused.clone(),
        );
        registry.register(
            "store_errors",
            "Store failures, by kind",
            metrics.store_errors.clone(),
        );
        registry.register(
            "uplink_streams_active",
            "Agent streams open now",
            metrics.streams_active.clone(),
        );
        registry.register(
            "fleet_nodes",
            "Nodes known to the server",
            metrics.nodes_known.clone(),
        );
        registry.register(
            "ingest_commit_seconds",
            "Time to commit one group of batches (one transaction)",
            metrics.commit_seconds.clone(),
        );
        registry.register(
            "ingest_commit_group_batches",
            "Batches per group commit",
            metrics.commit_group_batches.clone(),
        );
        registry.register(
            "ingest_commit_groups_full",
            "Group commits that held the most batches a group may (512): more were waiting",
            metrics.commit_groups_full.clone(),
        );
        registry.register(
            "outbox_batches",
            "Batches waiting in the ClickHouse outbox",
            metrics.outbox_batches.clone(),
        );
        registry.register(
            "outbox_bytes",
            "Bytes waiting in the ClickHouse outbox",
            metrics.outbox_bytes.clone(),
        );
        registry.register(
            "clickhouse_rows_inserted",
            "Rows inserted into ClickHouse",
            metrics.clickhouse_rows.clone(),
        );
        registry.register(
            "sink_batches_from_memory",
            "Batches the ClickHouse sink took from memory right after their commit",
            metrics.sink_batches_from_memory.clone(),
        );
        registry.register(
            "sink_batches_from_outbox",
            "Batches the ClickHouse sink read back from the outbox table (after a restart, a failure, or when memory was full)",
            metrics.sink_batches_from_outbox.clone(),
        );
        registry.register(
            "clickhouse_rows_skipped",
            "Rows skipped on replay because ClickHouse already held them",
            metrics.clickhouse_rows_skipped.clone(),
        );
        registry.register(
            "clickhouse_errors",
            "ClickHouse failures, by kind",
            metrics.clickhouse_errors.clone(),
        );
        registry.register(
            "clickhouse_insert_seconds",
            "Time of one ClickHouse insert of a chunk",
            metrics.clickhouse_insert_seconds.clone(),
        );
        registry.register(
            "clickhouse_breaker_state",
            "ClickHouse circuit breaker: 0 closed, 1 open, 2 half-open",
            metrics.clickhouse_breaker.clone(),
        );
        registry.register(
            "clickhouse_partitions_dropped",
            "Partitions dropped by retention",
            metrics.clickhouse_partitions_dropped.clone(),
        );
        registry.register(
            "reconcile_evaluations",
            "Reconciler evaluations of one node",
            metrics.reconcile_evaluations.clone(),
        );
        registry.register(
            "findings_raised",
            "Findings raised, by kind",
            metrics.findings_raised.clone(),
        );
        registry.register(
            "remediations_issued",
            "Remediation commands sent by the reconciler, by action",
            metrics.remediations_issued.clone(),
        );
        registry.register(
            "remediation_alerts",
            "Alerts raised by the reconciler",
            metrics.remediation_alerts.clone(),
        );
        registry.register(
            "decision_latency_seconds",
            "From the arrival of the batch that tipped a decision to its command leaving the server",
            metrics.decision_latency_seconds.clone(),
        );
        registry.register(
            "reconcile_pass_write_seconds",
            "A reconciler pass's ledger transaction (findings, decisions, commands, audit), waiting for the writer included",
            metrics.reconcile_pass_write_seconds.clone(),
        );
        registry.register(
            "alerts",
            "Webhook alerts by fate (delivered, failed, dropped_queue_full)",
            metrics.alerts.clone(),
        );
        registry.register(
            "security_events_suppressed",
            "Refusals over their peer's budget (10 a minute) of security_events rows: counted, not written",
            metrics.security_events_suppressed.clone(),
        );
        registry.register(
            "connections_open",
            "gRPC connections held now (TLS handshake pending or done)",
            metrics.connections_open.clone(),
        );
        registry.register(
            "connections_refused",
            "gRPC connections closed unserved: at_capacity, handshake_timeout, handshake_failed, evicted (oldest pending handshake), out_of_descriptors (accept failed)",
            metrics.connections_refused.clone(),
        );
        registry.register(
            "kube_cluster_up",
            "1 while the cluster's last call reached its API server",
            metrics.kube_cluster_up.clone(),
        );
        registry.register(
            "kube_missing_permissions",
            "Permissions the last SelfSubjectAccessReview check found missing",
            metrics.kube_missing_permissions.clone(),
        );
        registry.register(
            "kube_taonodes",
            "TaoNodes seen in the cluster's last list",
            metrics.kube_taonodes.clone(),
        );
        registry.register(
            "kube_writes",
            "Kubernetes writes made: delete_pod, raise_memory, expand_volume, cordon, scale, job, status, event",
            metrics.kube_writes.clone(),
        );
        registry.register(
            "kube_errors",
            "Kubernetes calls that failed: timeout, forbidden, not_found, failed",
            metrics.kube_errors.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }
}

impl Metrics {
    /// Counts a refusal.
    pub fn refuse(&self, reason: &'static str) {
        self.refused.get_or_create(&Reason { reason }).inc();
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// `text` (the registry's exposition) with the per-node gauges added before its `# EOF`:
/// `guardian_node_risk`, `guardian_node_open_findings`, `guardian_node_connected`,
/// `guardian_node_last_seen_timestamp_seconds` and `guardian_node_phase`, each labelled with
/// `node` and `network`. Made at scrape time from the registry, so no ingest path pays for them.
#[must_use]
pub fn with_node_series(mut text: String, rows: &[crate::registry::NodeMetricRow]) -> String {
    use std::fmt::Write as _;
    let eof = text.rfind("# EOF").unwrap_or(text.len());
    let tail = text.split_off(eof);
    let label = |v: &str| {
        v.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    };
    let mut family =
        |name: &str, help: &str, value: &dyn Fn(&crate::registry::NodeMetricRow) -> String| {
            let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} gauge");
            for row in rows {
                let _ = writeln!(
                    text,
                    "{name}{{node=\"{}\",network=\"{}\"}} {}",
                    label(&row.node),
                    label(&row.network),
                    value(row)
                );
            }
        };
    family(
        "guardian_node_risk",
        "Composite risk 0..1 of the node at its last evaluation.",
        &|r| format!("{}", r.risk),
    );
    family(
        "guardian_node_open_findings",
        "Open findings of the node.",
        &|r| r.open_findings.to_string(),
    );
    family(
        "guardian_node_connected",
        "1 while the node's agent has a stream open.",
        &|r| u8::from(r.connected).to_string(),
    );
    family(
        "guardian_node_last_seen_timestamp_seconds",
        "When the node's agent last sent a batch or connected (Unix seconds).",
        &|r| format!("{:.3}", r.last_seen_unix_ms as f64 / 1000.0),
    );
    let _ = writeln!(
        text,
        "# HELP guardian_node_phase 1 for the node's reconciler phase, 0 for the others.\n\
         # TYPE guardian_node_phase gauge"
    );
    for row in rows {
        // Before its first evaluation a node is pending.
        let phase = if row.phase.is_empty() {
            "pending"
        } else {
            row.phase.as_str()
        };
        // One series per phase (1 for the node's, 0 for the rest): rules select without a regex.
        for p in crate::reconcile::Phase::ALL.map(crate::reconcile::Phase::as_str) {
            let _ = writeln!(
                text,
                "guardian_node_phase{{node=\"{}\",network=\"{}\",phase=\"{p}\"}} {}",
                label(&row.node),
                label(&row.network),
                u8::from(p == phase)
            );
        }
    }
    text.push_str(&tail);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_series_come_before_the_end_marker_with_escaped_labels_and_one_phase_set() {
        let row =
            |node: &str, phase: &str, risk: f64, connected: bool| crate::registry::NodeMetricRow {
                node: node.to_owned(),
                network: "finney".to_owned(),
                connected,
                last_seen_unix_ms: 1_700_000_000_250,
                phase: phase.to_owned(),
                risk,
                open_findings: 2,
                paused: false,
                kubernetes_node: String::new(),
            };
        let text = with_node_series(
            Metrics::default().render(),
            &[
                row("val-a", "degraded", 0.75, true),
                row("odd\"name", "", 0.0, false),
            ],
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
        for line in [
            "guardian_node_risk{node=\"val-a\",network=\"finney\"} 0.75",
            "guardian_node_open_findings{node=\"val-a\",network=\"finney\"} 2",
            "guardian_node_connected{node=\"val-a\",network=\"finney\"} 1",
            "guardian_node_connected{node=\"odd\\\"name\",network=\"finney\"} 0",
            "guardian_node_last_seen_timestamp_seconds{node=\"val-a\",network=\"finney\"} 1700000000.250",
            "guardian_node_phase{node=\"val-a\",network=\"finney\",phase=\"degraded\"} 1",
            "guardian_node_phase{node=\"val-a\",network=\"finney\",phase=\"synced\"} 0",
            "guardian_node_phase{node=\"odd\\\"name\",network=\"finney\",phase=\"pending\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line} in\n{text}");
        }
        let ones = text
            .lines()
            .filter(|l| l.starts_with("guardian_node_phase{node=\"val-a\"") && l.ends_with(" 1"))
            .count();
        assert_eq!(ones, 1, "{text}");
    }

    #[test]
    fn counters_render_with_prefix_and_total_suffix() {
        let metrics = Metrics::default();
        metrics.batches_committed.inc();
        metrics.refuse("hello_identity_mismatch");
        let text = metrics.render();
        assert!(
            text.contains("guardian_ingest_batches_committed_total 1"),
            "{text}"
        );
        assert!(
            text.contains("guardian_refused_total{reason=\"hello_identity_mismatch\"} 1"),
            "{text}"
        );
    }
}
