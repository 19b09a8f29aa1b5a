//! Snapshot-restore: scale the workload to 0, run the TaoNode's restore Job, scale back; each
//! step kept in the TaoNode's `status.restore` so that a restarted server resumes it.

#[allow(clippy::wildcard_imports)]
use super::*;

impl Kubernetes {
    /// Starts (or resumes, from its TaoNode's `status.restore`) a snapshot-restore of `managed`
    /// on its own task, unless one runs in this server already or this is a dry run.
    pub fn snapshot_restore(self: Arc<Self>, node: NodeId, managed: Managed, reason: String) {
        if self.dry_run || !crate::fence::may_act() {
            return;
        }
        if !self
            .restoring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(node.to_string())
        {
            return;
        }
        let Some(cluster) = self.clusters.get(&managed.cluster).cloned() else {
            return;
        };
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = self.restore(&cluster, &node, &managed, &reason) => {}
            }
            self.restoring
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(node.as_str());
        });
    }

    /// Snapshot-restore: scales the workload to 0, waits for its pods to go, runs the
    /// TaoNode's restore Job, waits for it, and scales the workload back to what it had, each
    /// step audited and kept in the TaoNode's `status.restore`, so that a restarted server
    /// resumes where it stopped. A failed or timed-out Job still gets the workload scaled
    /// back, and is alerted.
    pub(super) async fn restore(
        &self,
        cluster: &Cluster,
        node: &NodeId,
        managed: &Managed,
        reason: &str,
    ) {
        let Some(spec) = managed.spec.snapshot_restore.clone() else {
            return;
        };
        let timeout =
            Duration::from_secs(u64::from(spec.timeout_minutes.unwrap_or(120).max(1)) * 60);
        let mut progress = match managed
            .restore
            .clone()
            .filter(|r| matches!(r.step.as_str(), "scaling-down" | "restoring" | "scaling-up"))
        {
            Some(resumed) => {
                tracing::info!(node = %node, step = resumed.step, "SnapshotRestoreResumed");
                resumed
            }
            None => {
                let replicas = match self.replicas(cluster, managed).await {
                    Ok(r) if r > 0 => r,
                    Ok(_) => {
                        self.alert(node, "snapshot_restore", format!("{node}: snapshot-restore not started: its workload is scaled to 0 already"));
                        return;
                    }
                    Err(error) => {
                        self.alert(
                            node,
                            "snapshot_restore",
                            format!("{node}: snapshot-restore not started: {error}"),
                        );
                        return;
                    }
                };
                crd::RestoreProgress {
                    step: "scaling-down".into(),
                    replicas,
                    job: String::new(),
                    started: rfc3339(unix_ms()),
                    message: reason.to_owned(),
                    job_failed: false,
                }
            }
        };
        loop {
            if !crate::fence::may_act() {
                return;
            }
            self.record_restore(cluster, node, managed, &progress).await;
            let step = progress.step.clone();
            let result: Result<(), String> = match step.as_str() {
                "scaling-down" => match self.scale(cluster, node, managed, 0, reason).await {
                    Ok(()) => self
                        .wait_pods_gone(cluster, managed, timeout)
                        .await
                        .map(|()| {
                            progress.job = format!("{}-restore-{}", managed.name, unix_ms() / 1000);
                            progress.step = "restoring".into();
                            progress.message = "workload scaled to 0; restore Job created".into();
                        }),
                    Err(e) => Err(e),
                },
                "restoring" => match self
                    .run_restore_job(cluster, node, managed, &spec, &progress.job, timeout)
                    .await
                {
                    Ok(()) => {
                        progress.step = "scaling-up".into();
                        progress.message = format!("restore Job {} completed", progress.job);
                        Ok(())
                    }
                    Err(why) => {
                        // The Job failed or ran out of time: the workload is scaled back anyway.
                        progress.job_failed = true;
                        progress.step = "scaling-up".into();
                        progress.message = why;
                        Ok(())
                    }
                },
                "scaling-up" => self
                    .scale(cluster, node, managed, progress.replicas, reason)
                    .await
                    .map(|()| {
                        progress.step = if progress.job_failed {
                            "failed".into()
                        } else {
                            "done".into()
                        };
                    }),
                _ => break,
            };
            if let Err(why) = result {
                // An API call failed: the step is tried again shortly (it is idempotent),
                // until the timeout, then given up with an alert.
                tracing::warn!(node = %node, step, why, "SnapshotRestoreStepFailed: retrying");
                if progress.started.is_empty()
                    || oom::parse_rfc3339(&progress.started).is_some_and(|at| {
                        unix_ms() - at > i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX) * 2
                    })
                {
                    progress.message = format!("gave up at {step}: {why}");
                    progress.step = "failed".into();
                    self.record_restore(cluster, node, managed, &progress).await;
                    self.alert(
                        node,
                        "snapshot_restore",
                        format!("{node}: snapshot-restore gave up at {step}: {why}"),
                    );
                    return;
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            if matches!(progress.step.as_str(), "done" | "failed") {
                self.record_restore(cluster, node, managed, &progress).await;
                break;
            }
        }
        let ok = progress.step == "done";
        self.event(
            cluster,
            managed,
            if ok {
                "RestoreCompleted"
            } else {
                "RestoreFailed"
            },
            &format!("snapshot-restore {}: {}", progress.step, progress.message),
            ok,
        )
        .await;
        if ok {
            tracing::info!(node = %node, job = progress.job, "SnapshotRestoreCompleted");
        } else {
            self.alert(
                node,
                "snapshot_restore",
                format!(
                    "{node}: snapshot-restore failed: {}; the workload is scaled back to {}",
                    progress.message, progress.replicas
                ),
            );
        }
    }

    /// Keeps `progress` in memory and in the TaoNode's `status.restore`.
    pub(super) async fn record_restore(
        &self,
        cluster: &Cluster,
        node: &NodeId,
        managed: &Managed,
        progress: &crd::RestoreProgress,
    ) {
        self.figures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(node.to_string())
            .or_default()
            .restore = Some(progress.clone());
        self.apply_status(cluster, node, managed).await;
    }

    /// The workload's `spec.replicas` (1 when unset).
    pub(super) async fn replicas(
        &self,
        cluster: &Cluster,
        managed: &Managed,
    ) -> Result<i32, KubeError> {
        let (_, object) = self.workload(cluster, managed).await?;
        Ok(object["spec"]["replicas"]
            .as_i64()
            .and_then(|r| i32::try_from(r).ok())
            .unwrap_or(1))
    }

    /// Sets the workload's replicas to `to` (audited before and after; nothing when it has
    /// them already).
    pub(super) async fn scale(
        &self,
        cluster: &Cluster,
        node: &NodeId,
        managed: &Managed,
        to: i32,
        reason: &str,
    ) -> Result<(), String> {
        let workload = &managed.spec.workload;
        let now = self
            .replicas(cluster, managed)
            .await
            .map_err(|e| e.to_string())?;
        if now == to {
            return Ok(());
        }
        let body = serde_json::json!({
            "namespace": managed.namespace,
            "taonode": managed.name,
            "verb": "patch",
            "resource": if workload.kind == WorkloadKind::StatefulSet { "statefulsets" } else { "deployments" },
            "name": workload.name,
            "replicas": { "from": now, "to": to },
            "reason": format!("snapshot-restore: {reason}"),
        });
        let patch = Patch::Merge(serde_json::json!({ "spec": { "replicas": to } }));
        self.audited(
            cluster,
            node,
            body,
            "scale",
            None,
            self.patch_workload(cluster, managed, &patch),
        )
        .await
    }

    /// Waits (every 2 s, up to `timeout`) until no pod of the workload is left.
    pub(super) async fn wait_pods_gone(
        &self,
        cluster: &Cluster,
        managed: &Managed,
        timeout: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let (pods, _) = self
                .pods_of(cluster, managed)
                .await
                .map_err(|e| e.to_string())?;
            if pods.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} pod(s) still there after {} minutes",
                    pods.len(),
                    timeout.as_secs() / 60
                ));
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    /// Creates the restore Job `name` (unless it exists: a resumed restore) and waits (every
    /// 2 s, up to `timeout`) for it to complete; `Err` when it failed or ran out of time.
    pub(super) async fn run_restore_job(
        &self,
        cluster: &Cluster,
        node: &NodeId,
        managed: &Managed,
        spec: &crd::SnapshotRestore,
        name: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        let jobs: Api<BatchJob> = Api::namespaced(cluster.client.clone(), &managed.namespace);
        let exists = match cluster
            .call(
                &format!("get job {}/{name}", managed.namespace),
                Some(cluster::PERMISSIONS[16]),
                jobs.get(name),
            )
            .await
        {
            Ok(_) => true,
            Err(KubeError::NotFound { .. }) => false,
            Err(error) => return Err(error.to_string()),
        };
        if !exists {
            // Built first: a template that is not a Job spec is refused before anything.
            let job: BatchJob = serde_json::from_value(serde_json::json!({
                "apiVersion": "batch/v1",
                "kind": "Job",
                "metadata": {
                    "name": name,
                    "namespace": managed.namespace,
                    "labels": { "guardian.taonode.io/restore-of": managed.name },
                },
                "spec": spec.job,
            }))
            .map_err(|e| format!("snapshotRestore.job is not a Job spec: {e}"))?;
            let body = serde_json::json!({
                "namespace": managed.namespace,
                "taonode": managed.name,
                "verb": "create",
                "resource": "jobs",
                "name": name,
                "reason": "snapshot-restore",
            });
            self.audited(
                cluster,
                node,
                body,
                "job",
                None,
                cluster.call(
                    &format!("create job {}/{name}", managed.namespace),
                    Some(cluster::PERMISSIONS[15]),
                    jobs.create(&PostParams::default(), &job),
                ),
            )
            .await?;
        }
        let deadline = Instant::now() + timeout;
        loop {
            let job = cluster
                .call(
                    &format!("get job {}/{name}", managed.namespace),
                    Some(cluster::PERMISSIONS[16]),
                    jobs.get(name),
                )
                .await
                .map_err(|e| e.to_string())?;
            let conditions = job
                .status
                .as_ref()
                .and_then(|s| s.conditions.clone())
                .unwrap_or_default();
            if conditions
                .iter()
                .any(|c| c.type_ == "Complete" && c.status == "True")
            {
                return Ok(());
            }
            if let Some(failed) = conditions
                .iter()
                .find(|c| c.type_ == "Failed" && c.status == "True")
            {
                return Err(format!(
                    "restore Job {name} failed: {}",
                    failed.message.clone().unwrap_or_default()
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "restore Job {name} did not complete within {} minutes",
                    timeout.as_secs() / 60
                ));
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
}
