//! Restart: deleting the validator's one pod (its controller makes a new one), and which pod.

#[allow(clippy::wildcard_imports)]
use super::*;

impl Kubernetes {
    /// Queues a restart of `managed` (already decided and written to the ledger): its pod is
    /// deleted by the cluster's worker. A cluster known unreachable, or a full queue, is
    /// alerted instead: the node is never acted on some other way.
    pub fn restart(
        &self,
        node: &NodeId,
        managed: Managed,
        reason: String,
        arrived: Option<Instant>,
    ) {
        let cluster = managed.cluster.clone();
        let unreachable = self.clusters.get(&cluster).is_none_or(|c| {
            let h = c.health();
            h.checked_unix_ms > 0 && !h.reachable
        });
        if unreachable {
            self.alert(
                node,
                "kubernetes_unreachable",
                format!(
                    "{node}: not restarted: cluster {cluster} is unreachable ({}); nothing else is tried",
                    self.clusters
                        .get(&cluster)
                        .map(|c| c.health().last_error)
                        .unwrap_or_default()
                ),
            );
            return;
        }
        let host = self
            .registry
            .get(node)
            .map(|n| n.kubernetes_node)
            .unwrap_or_default();
        self.enqueue(
            &cluster,
            Job::Restart {
                node: node.clone(),
                managed,
                reason,
                arrived,
                host,
            },
        );
    }

    /// Restart: finds the workload's one pod, audits the deletion, deletes it under a uid
    /// precondition, audits the outcome, writes an Event and the status.
    pub(super) async fn delete_pod(
        &self,
        cluster: &Cluster,
        node: &NodeId,
        managed: &Managed,
        reason: &str,
        host: &str,
        arrived: Option<Instant>,
    ) {
        let outcome = match self.pick_pod(cluster, managed, host).await {
            Err(error) => Err(error.to_string()),
            Ok((name, uid)) => {
                let body = serde_json::json!({
                    "namespace": managed.namespace,
                    "taonode": managed.name,
                    "verb": "delete",
                    "resource": "pods",
                    "name": name,
                    "uid": uid,
                    "reason": reason,
                });
                let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &managed.namespace);
                let params = DeleteParams {
                    preconditions: Some(Preconditions {
                        uid: Some(uid.clone()),
                        resource_version: None,
                    }),
                    ..DeleteParams::default()
                };
                let what = format!("delete pod {}/{name}", managed.namespace);
                self.audited(
                    cluster,
                    node,
                    body,
                    "delete_pod",
                    arrived,
                    cluster.call(
                        &what,
                        Some(cluster::PERMISSIONS[5]),
                        pods.delete(&name, &params),
                    ),
                )
                .await
                .map(|_| name)
            }
        };
        let (event_reason, message, outcome_text) = match &outcome {
            Ok(pod) => {
                self.metrics
                    .remediations_issued
                    .get_or_create(&Reason {
                        reason: "delete-pod",
                    })
                    .inc();
                tracing::info!(node = %node, cluster = cluster.name, pod, reason, "RemediationIssued: pod deleted");
                (
                    "PodDeleted",
                    format!("deleted pod {pod} to restart the validator's node: {reason}"),
                    "succeeded".to_owned(),
                )
            }
            Err(why) => {
                self.alert(
                    node,
                    "kubernetes_remediation_failed",
                    format!(
                        "{node}: restart through cluster {} failed: {why}",
                        cluster.name
                    ),
                );
                (
                    "RemediationFailed",
                    format!("could not restart the validator's node: {why}"),
                    format!("failed: {why}"),
                )
            }
        };
        self.event(cluster, managed, event_reason, &message, outcome.is_ok())
            .await;
        {
            let mut all = self
                .figures
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let entry = all.entry(node.to_string()).or_default();
            entry.last = Some(LastRemediation {
                action: "delete-pod".to_owned(),
                time: rfc3339(unix_ms()),
                outcome: outcome_text,
            });
        }
        self.apply_status(cluster, node, managed).await;
    }

    /// The workload's pod to delete: `(name, uid)`, chosen by [`choose_pod`] among the pods
    /// its selector matches; anything but one clear choice is refused with the reason.
    pub(super) async fn pick_pod(
        &self,
        cluster: &Cluster,
        managed: &Managed,
        host: &str,
    ) -> Result<(String, String), KubeError> {
        let (pods, labels) = self.pods_of(cluster, managed).await?;
        let workload = &managed.spec.workload;
        choose_pod(&pods, &workload.container, host).map_err(|why| KubeError::Failed {
            cluster: cluster.name.clone(),
            what: format!(
                "find the pod of {} {}/{}",
                workload.kind.as_str(),
                managed.namespace,
                workload.name
            ),
            why: format!("{why} (selector {labels}); nothing deleted"),
        })
    }
}

/// The pod to delete among `pods` (those the workload's selector matches): not already
/// terminating, with `container`; when several remain, the one on `host` (the Kubernetes node
/// the agent reported), if exactly one is. Anything else is refused with the reason: deleting
/// one of several pods would be a guess.
pub(super) fn choose_pod(
    pods: &[Pod],
    container: &str,
    host: &str,
) -> Result<(String, String), String> {
    let live: Vec<&Pod> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            p.spec
                .as_ref()
                .is_some_and(|s| s.containers.iter().any(|c| c.name == container))
        })
        .collect();
    let on_host: Vec<&Pod> = if live.len() > 1 && !host.is_empty() {
        live.iter()
            .copied()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(host))
            .collect()
    } else {
        live.clone()
    };
    let named = |pod: &Pod| {
        (
            pod.metadata.name.clone().unwrap_or_default(),
            pod.metadata.uid.clone().unwrap_or_default(),
        )
    };
    match (live.as_slice(), on_host.as_slice()) {
        ([pod], _) | (_, [pod]) => Ok(named(pod)),
        ([], _) => Err(format!("no running pod has container {container:?}")),
        (many, []) if !host.is_empty() => Err(format!(
            "{} pods match and none runs on the agent's node {host}",
            many.len()
        )),
        (many, _) => Err(format!(
            "{} pods match and the agent reported no Kubernetes node to tell them apart",
            many.len()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, node: &str, container: &str, terminating: bool) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": name,
                "uid": format!("uid-{name}"),
                "deletionTimestamp": terminating.then_some("2026-12-06T10:00:00Z"),
            },
            "spec": { "nodeName": node, "containers": [{ "name": container }] }
        }))
        .unwrap_or_default()
    }

    #[test]
    fn the_pod_to_delete_is_one_clear_choice_or_none() {
        let one = [pod("s-0", "n1", "subtensor", false)];
        assert_eq!(
            choose_pod(&one, "subtensor", ""),
            Ok(("s-0".into(), "uid-s-0".into()))
        );
        assert!(choose_pod(&one, "other", "").is_err_and(|e| e.contains("container")));
        let rolling = [
            pod("s-0", "n1", "subtensor", true),
            pod("s-1", "n2", "subtensor", false),
        ];
        assert_eq!(
            choose_pod(&rolling, "subtensor", "").map(|p| p.0),
            Ok("s-1".into())
        );
        let two = [
            pod("a", "n1", "subtensor", false),
            pod("b", "n2", "subtensor", false),
        ];
        assert_eq!(
            choose_pod(&two, "subtensor", "n2").map(|p| p.0),
            Ok("b".into())
        );
        assert!(choose_pod(&two, "subtensor", "").is_err_and(|e| e.contains("no Kubernetes node")));
        assert!(choose_pod(&two, "subtensor", "n9").is_err_and(|e| e.contains("n9")));
    }
}
