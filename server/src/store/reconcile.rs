//! The reconciler's durable side: each node's state (phase, attempt budget, cooldown),
//! findings from raise to clear, and cancelled commands. Every change is audited.

use std::collections::HashMap;

use guardian_proto::v1::{CommandRecord, FindingRecord};
use sqlx::Row;

use super::audit::{AuditKind, AuditTx};
use super::{Ledger, StoreError};
use crate::detect::Finding;
use crate::reconcile::{NodeState, Plan, PlannedAction};

/// Open finding rows at start: `(node_id or "", kind) -> finding_id`.
pub type OpenFindings = HashMap<(String, String), u64>;

impl Ledger {
    /// Every stored node state (a row that does not parse is skipped with a warning: the
    /// node starts from `pending` again, which only delays its first decision).
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn node_states(&self) -> Result<Vec<(String, NodeState)>, StoreError> {
        let rows = sqlx::query("SELECT node_id, state FROM node_state")
            .fetch_all(&self.pool)
            .await?;
        let mut states = Vec::with_capacity(rows.len());
        for row in rows {
            let node: String = row.try_get(0)?;
            let text: String = row.try_get(1)?;
            match serde_json::from_str::<NodeState>(&text) {
                Ok(state) => states.push((node, state)),
                Err(e) => tracing::warn!(node, error = %e, "NodeStateUnreadable"),
            }
        }
        Ok(states)
    }

    /// Writes everything one reconciler pass decided, in one transaction: cleared and
    /// raised findings, decisions (state first, then the audit entry), plain state saves,
    /// and the commands about to be sent. Returns the ids of `raised`, in order.
    ///
    /// # Guarantees
    /// All of it lands, or none of it (then nothing may be carried out).
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn write_pass(
        &self,
        pass: &PassWrites,
        now_unix_ms: i64,
    ) -> Result<Vec<u64>, StoreError> {
        let mut tx = self.begin_audited().await?;
        for cleared in &pass.cleared {
            sqlx::query(
                "UPDATE findings SET cleared_at_unix_ms = $2
                 WHERE finding_id = $1 AND cleared_at_unix_ms = 0",
            )
            .bind(super::to_i64(cleared.finding_id))
            .bind(now_unix_ms)
            .execute(tx.conn())
            .await?;
            let body = serde_json::json!({
                "event": "cleared", "finding_id": cleared.finding_id, "kind": cleared.kind,
            });
            tx.append(AuditKind::Finding, &cleared.node_id, &body, now_unix_ms)
                .await?;
        }
        let mut ids = Vec::with_capacity(pass.raised.len());
        for raised in &pass.raised {
            let finding = &raised.finding;
            let evidence = serde_json::to_string(&finding.evidence).unwrap_or_default();
            let row = sqlx::query(
                "INSERT INTO findings (node_id, network, kind, severity, score, summary, evidence,
                     raised_at_unix_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING finding_id",
            )
            .bind(&raised.node_id)
            .bind(&raised.network)
            .bind(finding.kind.as_str())
            .bind(finding.severity.as_str())
            .bind(finding.score)
            .bind(&finding.summary)
            .bind(evidence)
            .bind(now_unix_ms)
            .fetch_one(tx.conn())
            .await?;
            let id: i64 = row.try_get(0)?;
            let body = serde_json::json!({
                "event": "raised",
                "finding_id": id,
                "network": raised.network,
                "kind": finding.kind.as_str(),
                "severity": finding.severity.as_str(),
                "score": finding.score,
                "summary": finding.summary,
                "evidence": finding.evidence,
            });
            tx.append(AuditKind::Finding, &raised.node_id, &body, now_unix_ms)
                .await?;
            ids.push(u64::try_from(id).unwrap_or_default());
        }
        for decision in &pass.decisions {
            save_state_in(&mut tx, &decision.node_id, &decision.plan.next, now_unix_ms).await?;
            tx.append(
                AuditKind::Decision,
                &decision.node_id,
                &decision_body(&decision.before, &decision.plan, decision.dry_run),
                now_unix_ms,
            )
            .await?;
        }
        for (node_id, state) in &pass.states {
            save_state_in(&mut tx, node_id, state, now_unix_ms).await?;
        }
        for (envelope, issued_by) in &pass.commands {
            super::commands::record_issued_in(&mut tx, envelope, issued_by).await?;
        }
        tx.commit().await?;
        Ok(ids)
    }

    /// Records one decision on its own (an operator's pause or resume), with `operator`'s
    /// audit entry first.
    ///
    /// # Errors
    /// [`StoreError::Query`]: then nothing must be carried out.
    pub async fn record_operator_decision(
        &self,
        node_id: &str,
        operator: &serde_json::Value,
        before: &NodeState,
        plan: &Plan,
        dry_run: bool,
        now_unix_ms: i64,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_audited().await?;
        tx.append(AuditKind::Operator, node_id, operator, now_unix_ms)
            .await?;
        save_state_in(&mut tx, node_id, &plan.next, now_unix_ms).await?;
        tx.append(
            AuditKind::Decision,
            node_id,
            &decision_body(before, plan, dry_run),
            now_unix_ms,
        )
        .await?;
        tx.commit().await
    }

    /// Findings still open (to carry across a restart without raising them again).
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn open_findings(&self) -> Result<OpenFindings, StoreError> {
        let rows = sqlx::query(
            "SELECT finding_id, node_id, kind, network FROM findings WHERE cleared_at_unix_ms = 0",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut open = OpenFindings::new();
        for row in rows {
            let id: i64 = row.try_get(0)?;
            let node: String = row.try_get(1)?;
            let kind: String = row.try_get(2)?;
            let network: String = row.try_get(3)?;
            // Fleet findings are keyed by their network.
            let key = if node.is_empty() {
                format!("network:{network}")
            } else {
                node
            };
            open.insert((key, kind), u64::try_from(id).unwrap_or_default());
        }
        Ok(open)
    }

    /// Findings, newest first: open ones (all, or `include_cleared`), for one node (its own
    /// and none of the fleet's) or for all (`node_id` empty).
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn findings(
        &self,
        node_id: &str,
        include_cleared: bool,
        limit: u32,
    ) -> Result<Vec<FindingRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT finding_id, node_id, network, kind, severity, score, summary, evidence,
                    raised_at_unix_ms, cleared_at_unix_ms
             FROM findings
             WHERE ($1 = '' OR node_id = $1) AND ($2 = 1 OR cleared_at_unix_ms = 0)
             ORDER BY raised_at_unix_ms DESC, finding_id DESC LIMIT $3",
        )
        .bind(node_id)
        .bind(i64::from(include_cleared))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                let id: i64 = row.try_get(0)?;
                let evidence: String = row.try_get(7)?;
                Ok(FindingRecord {
                    finding_id: u64::try_from(id).unwrap_or_default(),
                    node_id: row.try_get(1)?,
                    network: row.try_get(2)?,
                    kind: row.try_get(3)?,
                    severity: row.try_get(4)?,
                    score: row.try_get(5)?,
                    summary: row.try_get(6)?,
                    evidence: serde_json::from_str(&evidence).unwrap_or_default(),
                    raised_at_unix_ms: row.try_get(8)?,
                    cleared_at_unix_ms: row.try_get(9)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Cancels a command that has no outcome yet, with its audit entry, in one transaction.
    /// `None` when no such command exists; otherwise the record as it now stands and whether
    /// this call cancelled it (false: it had already finished or been cancelled).
    ///
    /// # Errors
    /// [`StoreError::Query`]: nothing changed.
    pub async fn cancel_command(
        &self,
        command_id: &str,
        operator: &str,
        reason: &str,
        now_unix_ms: i64,
    ) -> Result<Option<(CommandRecord, bool)>, StoreError> {
        let detail = format!("cancelled by {operator}: {reason}");
        let mut tx = self.begin_audited().await?;
        let node: Option<String> = sqlx::query(
            "UPDATE commands SET state = 'cancelled', detail = $2, outcome_at_unix_ms = $3
             WHERE command_id = $1 AND state = 'issued' RETURNING node_id",
        )
        .bind(command_id)
        .bind(&detail)
        .bind(now_unix_ms)
        .fetch_optional(tx.conn())
        .await?
        .map(|row| row.try_get(0))
        .transpose()?;
        let cancelled_now = node.is_some();
        if let Some(node) = node {
            let body = serde_json::json!({
                "event": "command_cancelled",
                "command_id": command_id,
                "operator": operator,
                "reason": reason,
            });
            tx.append(AuditKind::Operator, &node, &body, now_unix_ms)
                .await?;
            tx.commit().await?;
        } else {
            drop(tx);
        }
        Ok(self
            .command(command_id)
            .await?
            .map(|record| (record, cancelled_now)))
    }
}

/// A finding to raise in a pass (node `""` for a fleet finding).
#[derive(Debug, Clone)]
pub struct RaisedFinding {
    /// The node, or `""`.
    pub node_id: String,
    /// Its network.
    pub network: String,
    /// What was found.
    pub finding: Finding,
}

/// A finding that went away.
#[derive(Debug, Clone)]
pub struct ClearedFinding {
    /// Its row.
    pub finding_id: u64,
    /// The node, or `""`.
    pub node_id: String,
    /// Its network (for alerts).
    pub network: String,
    /// Its kind.
    pub kind: String,
}

/// A decision to record.
#[derive(Debug, Clone)]
pub struct DecisionWrite {
    /// The node.
    pub node_id: String,
    /// Its state before.
    pub before: NodeState,
    /// What was decided.
    pub plan: Plan,
    /// Whether the reconciler runs dry.
    pub dry_run: bool,
}

/// What one reconciler pass writes ([`Ledger::write_pass`]).
#[derive(Debug, Clone, Default)]
pub struct PassWrites {
    /// Findings that went away.
    pub cleared: Vec<ClearedFinding>,
    /// New findings.
    pub raised: Vec<RaisedFinding>,
    /// Decisions.
    pub decisions: Vec<DecisionWrite>,
    /// States that changed without a decision (budget reset).
    pub states: Vec<(String, NodeState)>,
    /// Commands about to be sent, with who issued them.
    pub commands: Vec<(guardian_proto::v1::CommandEnvelope, String)>,
}

impl PassWrites {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.cleared.is_empty()
            && self.raised.is_empty()
            && self.decisions.is_empty()
            && self.states.is_empty()
            && self.commands.is_empty()
    }
}

async fn save_state_in(
    tx: &mut AuditTx,
    node_id: &str,
    state: &NodeState,
    now_unix_ms: i64,
) -> Result<(), StoreError> {
    let text = serde_json::to_string(state).unwrap_or_default();
    sqlx::query(
        "INSERT INTO node_state (node_id, phase, state, updated_at_unix_ms)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (node_id) DO UPDATE SET phase = excluded.phase,
             state = excluded.state, updated_at_unix_ms = excluded.updated_at_unix_ms",
    )
    .bind(node_id)
    .bind(state.phase.as_str())
    .bind(text)
    .bind(now_unix_ms)
    .execute(tx.conn())
    .await?;
    Ok(())
}

fn decision_body(before: &NodeState, plan: &Plan, dry_run: bool) -> serde_json::Value {
    let actions: Vec<serde_json::Value> = plan
        .actions
        .iter()
        .map(|a| match a {
            PlannedAction::Command { action, parameters } => {
                serde_json::json!({"command": action.as_str(), "parameters": parameters})
            }
            PlannedAction::Alert { message } => serde_json::json!({"alert": message}),
        })
        .collect();
    serde_json::json!({
        "from": before.phase.as_str(),
        "to": plan.next.phase.as_str(),
        "reason": plan.reason,
        "attempts": plan.next.attempts,
        "actions": actions,
        "dry_run": dry_run,
        "leader": crate::fence::term(),
    })
}
