//! Chain storage auto-expansion: growing a TaoNode's chain-data claim on a `storage_full`
//! forecast.

#[allow(clippy::wildcard_imports)]
use super::*;

impl Kubernetes {
    /// Takes the `storage_full` forecast for `node` (hours to full, or `None` when the
    /// finding is about the share used, not the trend; not called without the finding): when
    /// its TaoNode declares a `chainVolume` and the volume fills within its horizon, a grow is
    /// queued, at most once per cooldown.
    pub fn storage_filling(&self, node: &NodeId, hours_to_full: Option<f64>) {
        let Some(managed) = self.managed(node) else {
            return;
        };
        let Some(volume) = managed.spec.chain_volume.clone() else {
            return;
        };
        let (_, horizon, cooldown) = volume.effective();
        if hours_to_full.is_some_and(|h| h > horizon) {
            return;
        }
        let now = unix_ms();
        {
            let mut grown = self
                .grown
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if grown
                .get(node.as_str())
                .is_some_and(|at| now - at < cooldown)
            {
                return;
            }
            grown.insert(node.to_string(), now);
        }
        let why = match hours_to_full {
            Some(hours) => {
                format!("the chain data fills in {hours:.1} hours (horizon {horizon:.0} hours)")
            }
            None => "the chain data filesystem is nearly full".to_owned(),
        };
        if self.dry_run {
            tracing::info!(node = %node, claim = volume.claim_name, why, "RemediationDryRun: the chain volume would be grown; nothing written to Kubernetes");
            return;
        }
        self.enqueue(
            &managed.cluster.clone(),
            Job::ExpandVolume {
                node: node.clone(),
                managed,
                why,
            },
        );
    }

    /// Chain storage auto-expansion: grows the TaoNode's chain-data claim by its factor, never
    /// above its maximum, only when the claim's StorageClass allows expansion and no resize of
    /// it is still pending (a merge patch carrying the claim's resourceVersion). Audited before
    /// and after, with an Event; anything that stops it is alerted.
    pub(super) async fn expand_volume(
        &self,
        cluster: &Cluster,
        node: &NodeId,
        managed: &Managed,
        why: &str,
    ) {
        let Some(volume) = managed.spec.chain_volume.clone() else {
            return;
        };
        let (factor, _, _) = volume.effective();
        let ns = &managed.namespace;
        let claim = &volume.claim_name;
        let outcome: Result<(String, String), String> = async {
            let maximum = oom::parse_quantity(&volume.maximum).ok_or_else(|| {
                format!("chainVolume.maximum {:?} is not a quantity (e.g. 4Ti)", volume.maximum)
            })?;
            let claims: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client.clone(), ns);
            let pvc = cluster
                .call(
                    &format!("get persistentvolumeclaim {ns}/{claim}"),
                    Some(cluster::PERMISSIONS[10]),
                    claims.get(claim),
                )
                .await
                .map_err(|e| e.to_string())?;
            let json = serde_json::to_value(&pvc).unwrap_or_default();
            let requested_text = json["spec"]["resources"]["requests"]["storage"]
                .as_str()
                .ok_or_else(|| format!("claim {claim} requests no storage size"))?
                .to_owned();
            let requested = oom::parse_quantity(&requested_text)
                .ok_or_else(|| format!("claim {claim}'s size {requested_text:?} is not a quantity"))?;
            let pending = json["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| {
                    matches!(c["type"].as_str(), Some("Resizing" | "FileSystemResizePending"))
                        && c["status"] == "True"
                });
            let capacity = json["status"]["capacity"]["storage"]
                .as_str()
                .and_then(oom::parse_quantity)
                .unwrap_or(0);
            if pending || capacity < requested {
                return Err(format!(
                    "claim {claim} is still being resized ({requested_text} requested, {} held): not grown again until it finishes",
                    oom::mebibytes(capacity)
                ));
            }
            let class_name = json["spec"]["storageClassName"].as_str().unwrap_or_default().to_owned();
            if class_name.is_empty() {
                return Err(format!("claim {claim} names no StorageClass: it cannot be expanded"));
            }
            let classes: Api<StorageClass> = Api::all(cluster.client.clone());
            let class = cluster
                .call(
                    &format!("get storageclass {class_name}"),
                    Some(cluster::PERMISSIONS[12]),
                    classes.get(&class_name),
                )
                .await
                .map_err(|e| e.to_string())?;
            if class.allow_volume_expansion != Some(true) {
                return Err(format!(
                    "StorageClass {class_name} does not allow volume expansion (allowVolumeExpansion): claim {claim} cannot grow"
                ));
            }
            let new = match oom::next_limit(requested, factor, maximum) {
                oom::Raise::AtCeiling => {
                    return Err(format!(
                        "claim {claim} already requests {requested_text}, the TaoNode's chainVolume.maximum {}: not grown",
                        volume.maximum
                    ));
                }
                oom::Raise::To(bytes) => oom::mebibytes(bytes),
            };
            let body = serde_json::json!({
                "namespace": ns,
                "taonode": managed.name,
                "verb": "patch",
                "resource": "persistentvolumeclaims",
                "name": claim,
                "storage": { "from": requested_text, "to": new, "maximum": volume.maximum },
                "reason": why,
            });
            let patch = serde_json::json!({
                "metadata": { "resourceVersion": json["metadata"]["resourceVersion"] },
                "spec": { "resources": { "requests": { "storage": new } } }
            });
            self.audited(
                cluster,
                node,
                body,
                "expand_volume",
                None,
                cluster
                .call(
                    &format!("patch persistentvolumeclaim {ns}/{claim}"),
                    Some(cluster::PERMISSIONS[11]),
                    claims.patch(claim, &PatchParams::default(), &Patch::Merge(&patch)),
                ),
            )
            .await
            .map(|_| (requested_text, new))
        }
        .await;
        match outcome {
            Ok((from, to)) => {
                tracing::info!(node = %node, cluster = cluster.name, claim, from, to, "ChainVolumeExpanded");
                self.metrics
                    .remediations_issued
                    .get_or_create(&Reason {
                        reason: "expand-volume",
                    })
                    .inc();
                self.event(
                    cluster,
                    managed,
                    "VolumeExpanded",
                    &format!("requested {to} for claim {claim} (was {from}): {why}"),
                    true,
                )
                .await;
            }
            Err(reason) => {
                self.alert(node, "storage_full", format!("{node}: {why}; {reason}"));
                self.event(cluster, managed, "VolumeNotExpanded", &reason, false)
                    .await;
            }
        }
    }
}
