//! One configured cluster: its settings, its `kube::Client` (every call under a timeout),
//! and its health: reachable, and allowed what the actions need (one
//! `SelfSubjectAccessReview` per verb and resource).

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde::{Deserialize, Serialize};

/// `[kubernetes.clusters.NAME]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSettings {
    /// A kubeconfig file; its `context` (or its current context) names the cluster and user.
    pub kubeconfig: PathBuf,
    /// The context in `kubeconfig`; empty = its current context.
    pub context: String,
    /// Use the pod's service account instead of a kubeconfig (the server runs in this
    /// cluster).
    pub in_cluster: bool,
}

impl ClusterSettings {
    /// Checks the fields; the message names the cluster, the field and the fix.
    ///
    /// # Errors
    /// A message for the operator.
    pub fn validate(&self, name: &str) -> Result<(), String> {
        let valid_name = !name.is_empty()
            && name.len() <= 63
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !valid_name {
            return Err(format!(
                "kubernetes.clusters.{name:?}: a cluster name is 1 to 63 characters of a-z, 0-9 and '-'"
            ));
        }
        match (self.in_cluster, self.kubeconfig.as_os_str().is_empty()) {
            (true, false) => Err(format!(
                "kubernetes.clusters.{name}: set either in_cluster = true or kubeconfig, not both"
            )),
            (false, true) => Err(format!(
                "kubernetes.clusters.{name}: set kubeconfig = \"/path/to/kubeconfig\" (with context = \"...\"), or in_cluster = true when the server runs in that cluster"
            )),
            (false, false) if !self.kubeconfig.is_file() => Err(format!(
                "kubernetes.clusters.{name}.kubeconfig: {} is not a readable file",
                self.kubeconfig.display()
            )),
            _ => Ok(()),
        }
    }
}

/// One Kubernetes permission the actions need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permission {
    /// The verb.
    pub verb: &'static str,
    /// The API group ("" = core).
    pub group: &'static str,
    /// The resource (plural).
    pub resource: &'static str,
    /// The subresource, if any.
    pub subresource: &'static str,
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = if self.group.is_empty() {
            String::new()
        } else {
            format!(".{}", self.group)
        };
        let sub = if self.subresource.is_empty() {
            String::new()
        } else {
            format!("/{}", self.subresource)
        };
        write!(f, "{} {}{sub}{group}", self.verb, self.resource)
    }
}

const fn permission(verb: &'static str, group: &'static str, resource: &'static str) -> Permission {
    Permission {
        verb,
        group,
        resource,
        subresource: "",
    }
}

/// Every permission the server uses, checked at start and every minute per cluster. The
/// Helm chart's ClusterRole grants exactly these.
pub const PERMISSIONS: [Permission; 17] = [
    permission("list", "guardian.taonode.io", "taonodes"),
    Permission {
        verb: "patch",
        group: "guardian.taonode.io",
        resource: "taonodes",
        subresource: "status",
    },
    permission("get", "apps", "statefulsets"),
    permission("get", "apps", "deployments"),
    permission("list", "", "pods"),
    permission("delete", "", "pods"),
    permission("create", "", "events"),
    permission("get", "", "pods"),
    permission("patch", "apps", "statefulsets"),
    permission("patch", "apps", "deployments"),
    permission("get", "", "persistentvolumeclaims"),
    permission("patch", "", "persistentvolumeclaims"),
    permission("get", "storage.k8s.io", "storageclasses"),
    permission("get", "", "nodes"),
    permission("patch", "", "nodes"),
    permission("create", "batch", "jobs"),
    permission("get", "batch", "jobs"),
];

/// How one cluster stands, as `guardianctl clusters` and `/metrics` show it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Health {
    /// The last check reached the API server.
    pub reachable: bool,
    /// Permissions the last check found missing.
    pub missing: Vec<String>,
    /// TaoNodes seen in the last successful list.
    pub taonodes: usize,
    /// The last error, if the last call failed.
    pub last_error: String,
    /// When the last check ran, Unix ms (0 = never).
    pub checked_unix_ms: i64,
}

/// A configured cluster.
pub struct Cluster {
    /// Its name in the config.
    pub name: String,
    /// The client (its own timeouts on connect, read and write).
    pub client: Client,
    /// The client for watches: no read timeout (a watch is quiet while nothing changes; the
    /// server ends it after `watch_timeout_seconds`), the same connect and write timeouts.
    pub watch_client: Client,
    /// The bound on every call.
    pub timeout: Duration,
    health: Mutex<Health>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Why a call to a cluster failed, in words that say what to do.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// The kubeconfig or in-cluster settings could not make a client.
    #[error("cluster {cluster}: cannot build a client: {why}")]
    Config {
        /// The cluster.
        cluster: String,
        /// Why.
        why: String,
    },
    /// The call did not answer in time.
    #[error("cluster {cluster}: {what} did not answer within {timeout_ms} ms")]
    Timeout {
        /// The cluster.
        cluster: String,
        /// The call.
        what: String,
        /// The bound.
        timeout_ms: u64,
    },
    /// The API server refused: RBAC.
    #[error(
        "cluster {cluster}: forbidden to {what}: grant the server's service account `{permission}` (see the Helm chart's ClusterRole)"
    )]
    Forbidden {
        /// The cluster.
        cluster: String,
        /// The call.
        what: String,
        /// The permission to grant.
        permission: String,
    },
    /// The object is not there.
    #[error("cluster {cluster}: {what}: not found")]
    NotFound {
        /// The cluster.
        cluster: String,
        /// The call.
        what: String,
    },
    /// Any other failure (unreachable, 5xx, conflict).
    #[error("cluster {cluster}: {what} failed: {why}")]
    Failed {
        /// The cluster.
        cluster: String,
        /// The call.
        what: String,
        /// Why.
        why: String,
    },
}

impl KubeError {
    /// A bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            KubeError::Config { .. } => "config",
            KubeError::Timeout { .. } => "timeout",
            KubeError::Forbidden { .. } => "forbidden",
            KubeError::NotFound { .. } => "not_found",
            KubeError::Failed { .. } => "failed",
        }
    }
}

impl Cluster {
    /// Builds the client for `settings` (nothing is called yet).
    ///
    /// # Errors
    /// [`KubeError::Config`] when the kubeconfig cannot be read or names no such context.
    pub async fn connect(
        name: &str,
        settings: &ClusterSettings,
        timeout: Duration,
    ) -> Result<Self, KubeError> {
        let config_error = |why: String| KubeError::Config {
            cluster: name.to_owned(),
            why,
        };
        let mut config = if settings.in_cluster {
            Config::incluster().map_err(|e| config_error(e.to_string()))?
        } else {
            let file = Kubeconfig::read_from(&settings.kubeconfig)
                .map_err(|e| config_error(format!("{}: {e}", settings.kubeconfig.display())))?;
            let options = KubeConfigOptions {
                context: (!settings.context.is_empty()).then(|| settings.context.clone()),
                ..KubeConfigOptions::default()
            };
            Config::from_custom_kubeconfig(file, &options)
                .await
                .map_err(|e| config_error(format!("{}: {e}", settings.kubeconfig.display())))?
        };
        config.connect_timeout = Some(timeout);
        config.write_timeout = Some(timeout);
        let mut watching = config.clone();
        watching.read_timeout = None;
        config.read_timeout = Some(timeout);
        let client = Client::try_from(config).map_err(|e| config_error(e.to_string()))?;
        let watch_client = Client::try_from(watching).map_err(|e| config_error(e.to_string()))?;
        Ok(Self {
            name: name.to_owned(),
            client,
            watch_client,
            timeout,
            health: Mutex::new(Health::default()),
        })
    }

    /// Runs `call` under the cluster's timeout, naming `what` in any error; a 403 names
    /// `permission`.
    ///
    /// # Errors
    /// [`KubeError`].
    pub async fn call<T>(
        &self,
        what: &str,
        permission: Option<Permission>,
        call: impl std::future::Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, KubeError> {
        match tokio::time::timeout(self.timeout, call).await {
            Err(_) => Err(KubeError::Timeout {
                cluster: self.name.clone(),
                what: what.to_owned(),
                timeout_ms: u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX),
            }),
            Ok(Ok(value)) => Ok(value),
            Ok(Err(kube::Error::Api(status))) if status.code == 403 => Err(KubeError::Forbidden {
                cluster: self.name.clone(),
                what: what.to_owned(),
                permission: permission.map_or_else(|| status.message.clone(), |p| p.to_string()),
            }),
            Ok(Err(kube::Error::Api(status))) if status.code == 404 => Err(KubeError::NotFound {
                cluster: self.name.clone(),
                what: what.to_owned(),
            }),
            Ok(Err(error)) => Err(KubeError::Failed {
                cluster: self.name.clone(),
                what: what.to_owned(),
                why: error.to_string(),
            }),
        }
    }

    /// Checks the cluster: the API server answers `/version`, and each of [`PERMISSIONS`]
    /// is allowed (a `SelfSubjectAccessReview` each). Updates [`Self::health`].
    pub async fn check(&self, now_unix_ms: i64) -> Health {
        let mut missing = Vec::new();
        let mut last_error = String::new();
        let reachable = match self
            .call("GET /version", None, self.client.apiserver_version())
            .await
        {
            Ok(_) => true,
            Err(error) => {
                last_error = error.to_string();
                false
            }
        };
        if reachable {
            let reviews: Api<SelfSubjectAccessReview> = Api::all(self.client.clone());
            for p in PERMISSIONS {
                let review = SelfSubjectAccessReview {
                    spec: SelfSubjectAccessReviewSpec {
                        resource_attributes: Some(ResourceAttributes {
                            verb: Some(p.verb.to_owned()),
                            group: Some(p.group.to_owned()),
                            resource: Some(p.resource.to_owned()),
                            subresource: (!p.subresource.is_empty())
                                .then(|| p.subresource.to_owned()),
                            ..ResourceAttributes::default()
                        }),
                        ..SelfSubjectAccessReviewSpec::default()
                    },
                    ..SelfSubjectAccessReview::default()
                };
                match self
                    .call(
                        "create selfsubjectaccessreviews",
                        None,
                        reviews.create(&PostParams::default(), &review),
                    )
                    .await
                {
                    Ok(answer) if answer.status.as_ref().is_some_and(|s| s.allowed) => {}
                    Ok(_) => missing.push(p.to_string()),
                    Err(error) => {
                        last_error = error.to_string();
                        break;
                    }
                }
            }
        }
        let mut health = self
            .health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        health.reachable = reachable;
        health.missing = missing;
        health.last_error = last_error;
        health.checked_unix_ms = now_unix_ms;
        health.clone()
    }

    /// The last health seen.
    pub fn health(&self) -> Health {
        self.health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Records the outcome of a call made outside [`Self::check`].
    pub fn note(&self, outcome: Result<Option<usize>, &KubeError>) {
        let mut health = self
            .health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match outcome {
            Ok(taonodes) => {
                health.reachable = true;
                if let Some(count) = taonodes {
                    health.taonodes = count;
                }
                health.last_error.clear();
            }
            Err(error) => {
                if matches!(error, KubeError::Timeout { .. } | KubeError::Failed { .. }) {
                    health.reachable = false;
                }
                health.last_error = error.to_string();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_name_the_cluster_and_the_fix() {
        let none = ClusterSettings::default();
        assert!(
            none.validate("a")
                .expect_err("refused")
                .contains("in_cluster = true")
        );
        let both = ClusterSettings {
            in_cluster: true,
            kubeconfig: "/etc/hosts".into(),
            ..ClusterSettings::default()
        };
        assert!(
            both.validate("a")
                .expect_err("refused")
                .contains("not both")
        );
        let missing = ClusterSettings {
            kubeconfig: "/nonexistent/kubeconfig".into(),
            ..ClusterSettings::default()
        };
        assert!(
            missing
                .validate("east")
                .expect_err("refused")
                .contains("kubernetes.clusters.east.kubeconfig")
        );
        let inside = ClusterSettings {
            in_cluster: true,
            ..ClusterSettings::default()
        };
        assert!(inside.validate("east-1").is_ok());
        assert!(
            inside
                .validate("East")
                .expect_err("refused")
                .contains("a-z")
        );
    }

    #[test]
    fn permissions_read_as_rbac_rules() {
        assert_eq!(
            PERMISSIONS[1].to_string(),
            "patch taonodes/status.guardian.taonode.io"
        );
        assert_eq!(PERMISSIONS[5].to_string(), "delete pods");
    }
}
