//! Signed commands as recorded: issued (with who issued them), then the first outcome the
//! agent reports. Each step is also appended to the audit chain.

use std::collections::HashMap;

use guardian_proto::v1::{CommandEnvelope, CommandOutcome, CommandRecord};
use sqlx::Row;

use super::audit::{AuditKind, AuditTx};
use super::{Ledger, StoreError};
use crate::identity::NodeId;

/// What [`Ledger::record_command_outcome`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeRecorded {
    /// The first outcome for this command: stored and audited.
    Stored,
    /// An outcome was already recorded (e.g. a later `replayed` refusal): kept the first.
    AlreadyKnown,
    /// No command with this id was issued to this node: nothing stored.
    Unknown,
}

impl Ledger {
    /// Records a command before it is sent (and audits it), in one transaction.
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn record_command_issued(
        &self,
        envelope: &CommandEnvelope,
        issued_by: &str,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_audited().await?;
        record_issued_in(&mut tx, envelope, issued_by).await?;
        tx.commit().await
    }

    /// Records the first outcome a node reports for one of *its* commands (and audits it).
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn record_command_outcome(
        &self,
        node: &NodeId,
        outcome: &CommandOutcome,
        now_unix_ms: i64,
    ) -> Result<OutcomeRecorded, StoreError> {
        let state = if !outcome.refused.is_empty() {
            "refused"
        } else if outcome.succeeded {
            "succeeded"
        } else {
            "failed"
        };
        let detail = if outcome.refused.is_empty() {
            outcome.detail.clone()
        } else {
            format!("{}: {}", outcome.refused, outcome.detail)
        };
        let mut tx = self.begin_audited().await?;
        let updated = sqlx::query(
            "UPDATE commands SET state = $3, detail = $4, outcome_at_unix_ms = $5
             WHERE command_id = $1 AND node_id = $2 AND state = 'issued'",
        )
        .bind(&outcome.command_id)
        .bind(node.as_str())
        .bind(state)
        .bind(&detail)
        .bind(now_unix_ms)
        .execute(tx.conn())
        .await?
        .rows_affected();
        if updated == 0 {
            let known =
                sqlx::query("SELECT 1 FROM commands WHERE command_id = $1 AND node_id = $2")
                    .bind(&outcome.command_id)
                    .bind(node.as_str())
                    .fetch_optional(tx.conn())
                    .await?
                    .is_some();
            return Ok(if known {
                OutcomeRecorded::AlreadyKnown
            } else {
                OutcomeRecorded::Unknown
            });
        }
        let body = serde_json::json!({
            "command_id": outcome.command_id,
            "state": state,
            "detail": detail,
        });
        // The outcome and its audit entry land together or not at all.
        tx.append(AuditKind::Outcome, node.as_str(), &body, now_unix_ms)
            .await?;
        tx.commit().await?;
        Ok(OutcomeRecorded::Stored)
    }

    /// One command as recorded.
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn command(&self, command_id: &str) -> Result<Option<CommandRecord>, StoreError> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COMMAND_COLUMNS} FROM commands WHERE command_id = $1"
        )))
        .bind(command_id)
        .fetch_optional(&self.pool)
        .await?
        .map(|row| command_from_row(&row))
        .transpose()
    }

    /// The newest `limit` commands of `node_id`, newest first.
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn commands_of_node(
        &self,
        node_id: &str,
        limit: u32,
    ) -> Result<Vec<CommandRecord>, StoreError> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COMMAND_COLUMNS} FROM commands WHERE node_id = $1 \
             ORDER BY issued_at_unix_ms DESC, command_id DESC LIMIT $2"
        )))
        .bind(node_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(command_from_row)
        .collect()
    }
}

const COMMAND_COLUMNS: &str = "command_id, node_id, action, parameters, issued_at_unix_ms, \
     expires_at_unix_ms, issued_by, state, detail, outcome_at_unix_ms";

fn command_from_row(row: &sqlx::any::AnyRow) -> Result<CommandRecord, StoreError> {
    let parameters: String = row.try_get(3)?;
    let parameters: HashMap<String, String> = serde_json::from_str(&parameters).unwrap_or_default();
    Ok(CommandRecord {
        command_id: row.try_get(0)?,
        node_id: row.try_get(1)?,
        action: row.try_get(2)?,
        parameters,
        issued_at_unix_ms: row.try_get(4)?,
        expires_at_unix_ms: row.try_get(5)?,
        issued_by: row.try_get(6)?,
        state: row.try_get(7)?,
        detail: row.try_get(8)?,
        outcome_at_unix_ms: row.try_get(9)?,
    })
}

/// Inserts an issued command and its audit entry inside `tx`.
///
/// # Errors
/// [`StoreError::Query`]: drop the transaction.
pub(crate) async fn record_issued_in(
    tx: &mut AuditTx,
    envelope: &CommandEnvelope,
    issued_by: &str,
) -> Result<(), StoreError> {
    let parameters: serde_json::Map<String, serde_json::Value> = envelope
        .parameters
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    let parameters = serde_json::Value::Object(parameters);
    sqlx::query(
        "INSERT INTO commands (command_id, node_id, action, parameters, issued_at_unix_ms,
             expires_at_unix_ms, issued_by, state)
         VALUES ($1, $2, $3, $4, $5, $6, $7, 'issued')",
    )
    .bind(&envelope.command_id)
    .bind(&envelope.node_id)
    .bind(&envelope.action)
    .bind(parameters.to_string())
    .bind(envelope.issued_at_unix_ms)
    .bind(envelope.expires_at_unix_ms)
    .bind(issued_by)
    .execute(tx.conn())
    .await?;
    let body = serde_json::json!({
        "command_id": envelope.command_id,
        "action": envelope.action,
        "parameters": parameters,
        "issued_at_unix_ms": envelope.issued_at_unix_ms,
        "expires_at_unix_ms": envelope.expires_at_unix_ms,
        "issued_by": issued_by,
        // Which server acted, in which term (absent in tools that hold no ledger lock).
        "leader": crate::fence::term(),
    });
    tx.append(
        AuditKind::Command,
        &envelope.node_id,
        &body,
        envelope.issued_at_unix_ms,
    )
    .await?;
    Ok(())
}
