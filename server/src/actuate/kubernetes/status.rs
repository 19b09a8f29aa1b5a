//! The TaoNode's status: when it is written, and what it says.

#[allow(clippy::wildcard_imports)]
use super::*;

impl Kubernetes {
    /// Takes the reconciler's figures for `node`; when they changed (a phase, the attempts,
    /// the findings) or the lag moved and 10 s passed, its TaoNode's status is applied.
    pub fn observe(&self, node: &NodeId, figures: NodeFigures) {
        if self.dry_run {
            return;
        }
        let Some(managed) = self.managed(node) else {
            return;
        };
        let now = unix_ms();
        let changed = {
            let mut all = self
                .figures
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let entry = all.entry(node.to_string()).or_default();
            let (last, written) = (&entry.figures, &entry.queued_unix_ms);
            let moved = last.phase != figures.phase
                || last.attempts != figures.attempts
                || last.open_findings != figures.open_findings
                || (last.risk - figures.risk).abs() >= 0.1
                || (last.block_lag != figures.block_lag && now - *written >= 10_000);
            if moved {
                entry.figures = figures;
                entry.queued_unix_ms = now;
            }
            moved
        };
        if changed {
            self.enqueue(
                &managed.cluster.clone(),
                Job::Status {
                    node: node.clone(),
                    managed,
                },
            );
        }
    }

    /// Applies the TaoNode's whole status (server-side apply, field manager
    /// `taonode-guardian`, forced: the server owns status).
    pub(super) async fn apply_status(&self, cluster: &Cluster, node: &NodeId, managed: &Managed) {
        let standing = self
            .figures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(node.as_str())
            .cloned()
            .unwrap_or_default();
        let mut status = status_of(&standing.figures, standing.last, managed.generation);
        status.restore = standing.restore.or_else(|| managed.restore.clone());
        let patch = serde_json::json!({
            "apiVersion": "guardian.taonode.io/v1alpha1",
            "kind": "TaoNode",
            "metadata": { "name": managed.name, "namespace": managed.namespace },
            "status": status,
        });
        let api: Api<TaoNode> = Api::namespaced(cluster.client.clone(), &managed.namespace);
        let permission = Permission {
            verb: "patch",
            group: "guardian.taonode.io",
            resource: "taonodes",
            subresource: "status",
        };
        match cluster
            .call(
                &format!(
                    "apply status of taonode {}/{}",
                    managed.namespace, managed.name
                ),
                Some(permission),
                api.patch_status(
                    &managed.name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&patch),
                ),
            )
            .await
        {
            Ok(_) => self.wrote(cluster, "status"),
            Err(error) => {
                tracing::warn!(node = %node, %error, "TaoNodeStatusNotWritten");
                self.failed(cluster, &error);
            }
        }
    }
}

/// The status a TaoNode gets for `figures`.
pub(super) fn status_of(
    figures: &NodeFigures,
    last: Option<LastRemediation>,
    generation: Option<i64>,
) -> TaoNodeStatus {
    // Both conditions change only with the phase.
    let since = rfc3339(figures.phase_since_unix_ms);
    let ready = figures.phase == "synced";
    let remediating = figures.phase == "recovering";
    let condition = |type_: &str, on: bool, reason: &str, message: String| Condition {
        type_: type_.to_owned(),
        status: if on { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message,
        last_transition_time: since.clone(),
    };
    TaoNodeStatus {
        phase: (!figures.phase.is_empty()).then(|| figures.phase.clone()),
        block_lag: Some(figures.block_lag),
        risk: Some((figures.risk * 100.0).round() / 100.0),
        open_findings: Some(figures.open_findings),
        attempts: Some(figures.attempts),
        last_remediation: last,
        conditions: vec![
            condition(
                "Ready",
                ready,
                if ready { "Synced" } else { "NotSynced" },
                format!(
                    "phase {}, {} blocks behind",
                    figures.phase, figures.block_lag
                ),
            ),
            condition(
                "Remediating",
                remediating,
                if remediating { "Recovering" } else { "Idle" },
                format!("{} remediation(s) in the current budget", figures.attempts),
            ),
        ],
        observed_generation: generation,
        restore: None,
    }
}

/// RFC 3339 UTC with second precision.
pub(super) fn rfc3339(unix_ms: i64) -> String {
    format!("{}Z", crate::utc(unix_ms).replacen(' ', "T", 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_says_ready_only_when_synced_and_keeps_the_last_remediation() {
        let figures = NodeFigures {
            phase: "recovering".into(),
            block_lag: 42,
            risk: 0.734,
            open_findings: 1,
            attempts: 1,
            phase_since_unix_ms: 1_000,
        };
        let last = LastRemediation {
            action: "delete-pod".into(),
            time: "2026-12-06T10:00:00Z".into(),
            outcome: "succeeded".into(),
        };
        let status = status_of(&figures, Some(last.clone()), Some(3));
        assert_eq!(status.phase.as_deref(), Some("recovering"));
        assert_eq!(status.risk, Some(0.73));
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(status.last_remediation, Some(last));
        assert_eq!(status.conditions[0].status, "False");
        assert_eq!(status.conditions[1].status, "True");
        assert_eq!(
            status.conditions[0].last_transition_time,
            "1970-01-01T00:00:01Z"
        );
    }
}
