//! The analysis endpoint for progressive delivery (Argo Rollouts' `web` metric provider, or
//! anything that gates a rollout on fleet health): HTTPS with the server certificate, a
//! bearer token whose SHA-256 is in `[analysis] token_sha256`, read-only.
//!
//! `GET /api/v1/risk?node=ID` | `?network=NAME` | `?selector=KEY=VALUE,KEY!=VALUE` answers
//! `{"scope", "nodes", "risk", "phase", "phases", "worst"}`: the highest risk and the worst
//! phase of the matching nodes. Selector keys are the node's labels: `node`, `network`,
//! `phase`, `connected`, `kubernetes_node`. No match is a 404 (an analysis then errors,
//! which Argo counts as inconclusive, never as healthy), and a node whose agent is not
//! connected counts with risk 1 (its health is not known).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};

use crate::registry::{NodeMetricRow, Registry};

/// `[analysis]`: the endpoint is off unless `listen` is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct AnalysisSettings {
    /// HTTPS address of the analysis endpoint (server certificate, bearer token); empty = off.
    pub listen: String,
    /// Hex SHA-256 of each accepted bearer token (`printf %s TOKEN | sha256sum`); the tokens
    /// themselves are never stored.
    pub token_sha256: Vec<String>,
}

impl AnalysisSettings {
    /// Checks the settings; returns the address to bind when the endpoint is on.
    ///
    /// # Errors
    /// A field and what is wrong with it.
    pub fn validate(&self) -> Result<Option<SocketAddr>, (&'static str, String)> {
        let Some(addr) =
            crate::https::parse_listen("analysis.listen", &self.listen, "0.0.0.0:7445")?
        else {
            return Ok(None);
        };
        if self.token_sha256.is_empty() {
            return Err((
                "analysis.token_sha256",
                "the endpoint is on but accepts no token: add the hex SHA-256 of one (printf %s TOKEN | sha256sum)".into(),
            ));
        }
        crate::https::validate_token_hashes("analysis.token_sha256", &self.token_sha256)?;
        Ok(Some(addr))
    }
}

#[derive(Clone)]
struct AnalysisState {
    registry: Arc<Registry>,
    /// Accepted token hashes, lower-case hex.
    tokens: Arc<Vec<String>>,
}

/// Phases from best to worst: the worst of a set is the one reported.
const PHASE_ORDER: [&str; 8] = [
    "synced",
    "pending",
    "syncing",
    "paused",
    "recovering",
    "degraded",
    "cordoned",
    "failed",
];

pub(crate) fn phase_rank(phase: &str) -> usize {
    PHASE_ORDER.iter().position(|p| *p == phase).unwrap_or(1)
}

/// The query: exactly one of `node`, `network`, `selector`.
#[derive(Debug, Deserialize)]
struct RiskQuery {
    node: Option<String>,
    network: Option<String>,
    selector: Option<String>,
}

/// One `KEY=VALUE` or `KEY!=VALUE` of a selector.
#[derive(Debug, PartialEq)]
struct Requirement {
    key: String,
    value: String,
    equal: bool,
}

fn parse_selector(text: &str) -> Result<Vec<Requirement>, String> {
    const KEYS: [&str; 5] = ["node", "network", "phase", "connected", "kubernetes_node"];
    text.split(',')
        .filter(|part| !part.trim().is_empty())
        .map(|part| {
            let (key, value, equal) = if let Some((k, v)) = part.split_once("!=") {
                (k, v, false)
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (k, v, true)
            } else {
                return Err(format!("{part:?} is not KEY=VALUE or KEY!=VALUE"));
            };
            let key = key.trim();
            if !KEYS.contains(&key) {
                return Err(format!(
                    "unknown label {key:?}: use one of {}",
                    KEYS.join(", ")
                ));
            }
            Ok(Requirement {
                key: key.to_owned(),
                value: value.trim().to_owned(),
                equal,
            })
        })
        .collect()
}

fn label<'a>(row: &'a NodeMetricRow, key: &str) -> std::borrow::Cow<'a, str> {
    match key {
        "node" => row.node.as_str().into(),
        "network" => row.network.as_str().into(),
        "phase" => (if row.phase.is_empty() {
            "pending"
        } else {
            row.phase.as_str()
        })
        .into(),
        "connected" => row.connected.to_string().into(),
        "kubernetes_node" => row.kubernetes_node.as_str().into(),
        _ => "".into(),
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

async fn risk(
    State(state): State<AnalysisState>,
    headers: HeaderMap,
    Query(query): Query<RiskQuery>,
) -> Response {
    if !crate::https::bearer_accepted(&headers, &state.tokens) {
        let mut response = error(
            StatusCode::UNAUTHORIZED,
            "a bearer token whose SHA-256 is in [analysis] token_sha256 is required",
        );
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return response;
    }
    let (scope, requirements) = match (&query.node, &query.network, &query.selector) {
        (Some(node), None, None) => (
            format!("node={node}"),
            vec![Requirement {
                key: "node".into(),
                value: node.clone(),
                equal: true,
            }],
        ),
        (None, Some(network), None) => (
            format!("network={network}"),
            vec![Requirement {
                key: "network".into(),
                value: network.clone(),
                equal: true,
            }],
        ),
        (None, None, Some(selector)) => match parse_selector(selector) {
            Ok(r) => (selector.clone(), r),
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("selector: {e}")),
        },
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "give exactly one of node=ID, network=NAME or selector=KEY=VALUE,...",
            );
        }
    };
    let rows: Vec<NodeMetricRow> = state
        .registry
        .metric_rows()
        .into_iter()
        .filter(|row| {
            requirements
                .iter()
                .all(|r| (label(row, &r.key) == r.value) == r.equal)
        })
        .map(|mut row| {
            // A node whose agent is away is not known to be healthy: its risk counts as 1.
            if !row.connected {
                row.risk = 1.0;
            }
            row
        })
        .collect();
    let Some(worst) = rows.iter().max_by(|a, b| {
        a.risk
            .total_cmp(&b.risk)
            .then(phase_rank(&label(a, "phase")).cmp(&phase_rank(&label(b, "phase"))))
    }) else {
        return error(StatusCode::NOT_FOUND, format!("no node matches {scope}"));
    };
    let mut phases: BTreeMap<String, u32> = BTreeMap::new();
    for row in &rows {
        *phases.entry(label(row, "phase").into_owned()).or_default() += 1;
    }
    let phase = phases
        .keys()
        .max_by_key(|p| phase_rank(p))
        .cloned()
        .unwrap_or_default();
    Json(serde_json::json!({
        "scope": scope,
        "nodes": rows.len(),
        "risk": worst.risk,
        "phase": phase,
        "phases": phases,
        "connected": rows.iter().filter(|r| r.connected).count(),
        "worst": { "node": worst.node, "network": worst.network, "risk": worst.risk, "phase": label(worst, "phase") },
    }))
    .into_response()
}

/// The endpoint's router.
pub fn router(registry: Arc<Registry>, settings: &AnalysisSettings) -> Router {
    Router::new()
        .route("/api/v1/risk", get(risk))
        .with_state(AnalysisState {
            registry,
            tokens: crate::https::hashes(&settings.token_sha256),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::https::EMPTY_SHA256;

    #[test]
    fn selectors_parse_and_unknown_labels_are_named() {
        assert_eq!(
            parse_selector("network=finney,phase!=synced").expect("parses"),
            vec![
                Requirement {
                    key: "network".into(),
                    value: "finney".into(),
                    equal: true
                },
                Requirement {
                    key: "phase".into(),
                    value: "synced".into(),
                    equal: false
                },
            ]
        );
        let err = parse_selector("team=a").expect_err("unknown");
        assert!(err.contains("unknown label \"team\""), "{err}");
        assert!(parse_selector("network").is_err());
    }

    #[test]
    fn settings_refuse_an_open_endpoint_without_tokens_and_a_token_in_place_of_its_hash() {
        let on = |tokens: &[&str]| AnalysisSettings {
            listen: "127.0.0.1:7445".into(),
            token_sha256: tokens.iter().map(|t| (*t).to_owned()).collect(),
        };
        assert_eq!(AnalysisSettings::default().validate(), Ok(None));
        assert_eq!(
            on(&[]).validate().expect_err("no token").0,
            "analysis.token_sha256"
        );
        let err = on(&["my-secret-token"])
            .validate()
            .expect_err("a token, not a hash")
            .1;
        assert!(err.contains("never the token"), "{err}");
        assert!(on(&[&"ab".repeat(32)]).validate().expect("valid").is_some());
        let err = on(&[EMPTY_SHA256])
            .validate()
            .expect_err("the empty token's hash")
            .1;
        assert!(err.contains("empty token"), "{err}");
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            header::HeaderValue::from_static("Bearer "),
        );
        assert!(!crate::https::bearer_accepted(
            &headers,
            &[EMPTY_SHA256.to_owned()]
        ));
    }

    #[test]
    fn the_worst_phase_wins() {
        assert!(phase_rank("failed") > phase_rank("degraded"));
        assert!(phase_rank("degraded") > phase_rank("synced"));
    }
}
