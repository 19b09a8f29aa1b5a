//! OOMKilled remediation: reading the pods of TaoNodes with a `memoryCeiling` for OOM kills,
//! and raising the container's memory limit (the pure part is in [`super::oom`]).

#[allow(clippy::wildcard_imports)]
use super::*;

impl Kubernetes {
    /// Every `oom_every`, reads the pods of this cluster's TaoNodes that set a
    /// `memoryCeiling` and queues a memory raise for a node whose container was OOM-killed
    /// often enough within the window (at most once per window).
    pub(super) async fn check_oom(
        self: Arc<Self>,
        cluster: Arc<Cluster>,
        shutdown: CancellationToken,
    ) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(self.oom_every) => {}
            }
            let watched: Vec<Managed> = self
                .index
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .values()
                .filter(|m| m.cluster == cluster.name && m.spec.memory_ceiling.is_some())
                .cloned()
                .collect();
            for managed in watched {
                let Ok(node) = NodeId::parse(&managed.spec.node_id) else {
                    continue;
                };
                let (threshold, window, _) = managed
                    .spec
                    .oom_remediation
                    .clone()
                    .unwrap_or_default()
                    .effective();
                let killed = match self.oom_kills(&cluster, &managed).await {
                    Ok(killed) => killed,
                    Err(error) => {
                        tracing::debug!(node = %node, %error, "OomCheckFailed");
                        self.failed(&cluster, &error);
                        continue;
                    }
                };
                let now = unix_ms();
                let (kills, may_raise) = {
                    let mut tracker = self
                        .oom
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    let mut kills = tracker.observe(node.as_str(), None, now, window);
                    for finished in &killed {
                        kills = tracker.observe(node.as_str(), Some(finished), now, window);
                    }
                    let may = kills >= threshold && tracker.may_raise(node.as_str(), now, window);
                    if may {
                        // Once per window, whatever comes of it (a failure is alerted).
                        tracker.raised(node.as_str(), now);
                    }
                    (kills, may)
                };
                if !may_raise {
                    continue;
                }
                if self.dry_run {
                    tracing::info!(node = %node, kills, "RemediationDryRun: the memory limit would be raised; nothing written to Kubernetes");
                    continue;
                }
                self.enqueue(
                    &cluster.name,
                    Job::RaiseMemory {
                        node,
                        managed,
                        kills,
                    },
                );
            }
        }
    }

    /// The `finishedAt` of each OOM kill the workload's pods report for its container (the
    /// last termination of each pod's container).
    pub(super) async fn oom_kills(
        &self,
        cluster: &Cluster,
        managed: &Managed,
    ) -> Result<Vec<String>, KubeError> {
        let (pods, _) = self.pods_of(cluster, managed).await?;
        let container = &managed.spec.workload.container;
        Ok(pods
            .iter()
            .filter_map(|p| p.status.as_ref()?.container_statuses.as_ref())
            .flatten()
            .filter(|c| &c.name == container)
            .filter_map(|c| c.last_state.as_ref()?.terminated.as_ref())
            .filter(|t| t.reason.as_deref() == Some("OOMKilled"))
            .map(|t| {
                serde_json::to_value(&t.finished_at)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_else(|| format!("restart-{}", t.exit_code))
            })
            .collect())
    }

    /// OOMKilled remediation: raises the container's memory limit in the workload's pod
    /// template by the TaoNode's factor, never above its `memoryCeiling` (a strategic merge
    /// patch carrying the workload's resourceVersion: a concurrent change makes it fail, not
    /// apply twice). Audited before and after, with an Event; at the ceiling it alerts.
    pub(super) async fn raise_memory(
        &self,
        cluster: &Cluster,
        node: &NodeId,
        managed: &Managed,
        kills: usize,
    ) {
        let workload = &managed.spec.workload;
        let (_, _, factor) = managed
            .spec
            .oom_remediation
            .clone()
            .unwrap_or_default()
            .effective();
        let ceiling_text = managed.spec.memory_ceiling.clone().unwrap_or_default();
        let outcome: Result<(String, String), String> = async {
            let ceiling = oom::parse_quantity(&ceiling_text).ok_or_else(|| {
                format!("memoryCeiling {ceiling_text:?} is not a quantity (e.g. 64Gi)")
            })?;
            let (_, object) = self
                .workload(cluster, managed)
                .await
                .map_err(|e| e.to_string())?;
            let containers = object["spec"]["template"]["spec"]["containers"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let container = containers
                .iter()
                .find(|c| c["name"] == workload.container.as_str())
                .ok_or_else(|| format!("the pod template has no container {:?}", workload.container))?;
            let current_text = container["resources"]["limits"]["memory"]
                .as_str()
                .ok_or_else(|| format!("container {:?} has no memory limit to raise", workload.container))?
                .to_owned();
            let current = oom::parse_quantity(&current_text)
                .ok_or_else(|| format!("its memory limit {current_text:?} is not a quantity"))?;
            let new = match oom::next_limit(current, factor, ceiling) {
                oom::Raise::AtCeiling => {
                    return Err(format!(
                        "its memory limit {current_text} is at the TaoNode's memoryCeiling {ceiling_text}: not raised"
                    ));
                }
                oom::Raise::To(bytes) => oom::mebibytes(bytes),
            };
            let body = serde_json::json!({
                "namespace": managed.namespace,
                "taonode": managed.name,
                "verb": "patch",
                "resource": if workload.kind == WorkloadKind::StatefulSet { "statefulsets" } else { "deployments" },
                "name": workload.name,
                "container": workload.container,
                "memory_limit": { "from": current_text, "to": new, "ceiling": ceiling_text },
                "reason": format!("{kills} OOM kills within the window"),
            });
            let patch = serde_json::json!({
                "metadata": { "resourceVersion": object["metadata"]["resourceVersion"] },
                "spec": { "template": { "spec": { "containers": [{
                    "name": workload.container,
                    "resources": { "limits": { "memory": new } }
                }] } } }
            });
            self.audited(
                cluster,
                node,
                body,
                "raise_memory",
                None,
                self.patch_workload(cluster, managed, &Patch::Strategic(patch)),
            )
            .await
            .map(|()| (current_text, new))
        }
        .await;
        match outcome {
            Ok((from, to)) => {
                tracing::info!(node = %node, cluster = cluster.name, from, to, kills, "MemoryLimitRaised");
                self.metrics
                    .remediations_issued
                    .get_or_create(&Reason {
                        reason: "raise-memory-limit",
                    })
                    .inc();
                self.event(
                    cluster,
                    managed,
                    "MemoryLimitRaised",
                    &format!(
                        "raised container {}'s memory limit from {from} to {to} after {kills} OOM kills (ceiling {ceiling_text})",
                        workload.container
                    ),
                    true,
                )
                .await;
            }
            Err(why) => {
                self.alert(
                    node,
                    "oom_killed",
                    format!("{node}: OOM-killed {kills} times within the window; {why}"),
                );
                self.event(cluster, managed, "MemoryLimitNotRaised", &why, false)
                    .await;
            }
        }
    }
}
