//! Cordon-and-alert: marking the Kubernetes node of a validator's pod unschedulable.

#[allow(clippy::wildcard_imports)]
use super::*;

impl Kubernetes {
    /// Queues cordon-and-alert for `managed` (the reconciler cordoned `node`, and the
    /// decision is written): the Kubernetes node its pod runs on is marked unschedulable. A
    /// cluster known unreachable is alerted instead.
    pub fn cordon(&self, node: &NodeId, managed: Managed, reason: String) {
        let host = self
            .registry
            .get(node)
            .map(|n| n.kubernetes_node)
            .unwrap_or_default();
        self.enqueue(
            &managed.cluster.clone(),
            Job::Cordon {
                node: node.clone(),
                managed,
                reason,
                host,
            },
        );
    }

    /// Cordon-and-alert: finds the Kubernetes node of the validator's pod (as a restart picks
    /// the pod) and marks it unschedulable, unless it already is. Audited before and after,
    /// with an Event; anything that stops it is alerted. Uncordoning is the operator's
    /// (`kubectl uncordon`), as resuming the node is.
    pub(super) async fn cordon_node(
        &self,
        cluster: &Cluster,
        node: &NodeId,
        managed: &Managed,
        reason: &str,
        host: &str,
    ) {
        let outcome: Result<String, String> = async {
            let (pods, _) = self
                .pods_of(cluster, managed)
                .await
                .map_err(|e| e.to_string())?;
            let (pod, _) = choose_pod(&pods, &managed.spec.workload.container, host)?;
            let kube_node = pods
                .iter()
                .find(|p| p.metadata.name.as_deref() == Some(pod.as_str()))
                .and_then(|p| p.spec.as_ref()?.node_name.clone())
                .ok_or_else(|| format!("pod {pod} is not scheduled on a node"))?;
            let nodes: Api<Node> = Api::all(cluster.client.clone());
            let current = cluster
                .call(
                    &format!("get node {kube_node}"),
                    Some(cluster::PERMISSIONS[13]),
                    nodes.get(&kube_node),
                )
                .await
                .map_err(|e| e.to_string())?;
            if current.spec.as_ref().and_then(|s| s.unschedulable) == Some(true) {
                return Ok(format!("{kube_node} (already unschedulable)"));
            }
            let body = serde_json::json!({
                "taonode": managed.name,
                "namespace": managed.namespace,
                "verb": "patch",
                "resource": "nodes",
                "name": kube_node,
                "change": "unschedulable",
                "reason": reason,
            });
            let patch = serde_json::json!({ "spec": { "unschedulable": true } });
            self.audited(
                cluster,
                node,
                body,
                "cordon",
                None,
                cluster.call(
                    &format!("patch node {kube_node}"),
                    Some(cluster::PERMISSIONS[14]),
                    nodes.patch(&kube_node, &PatchParams::default(), &Patch::Merge(&patch)),
                ),
            )
            .await
            .map(|_| kube_node)
        }
        .await;
        match outcome {
            Ok(kube_node) => {
                tracing::info!(node = %node, cluster = cluster.name, kube_node, "KubernetesNodeCordoned");
                self.event(
                    cluster,
                    managed,
                    "NodeCordoned",
                    &format!("marked Kubernetes node {kube_node} unschedulable (cordon-and-alert): {reason}"),
                    true,
                )
                .await;
            }
            Err(why) => {
                self.alert(
                    node,
                    "kubernetes_remediation_failed",
                    format!(
                        "{node}: cordon through cluster {} failed: {why}",
                        cluster.name
                    ),
                );
                self.event(cluster, managed, "CordonFailed", &why, false)
                    .await;
            }
        }
    }
}
