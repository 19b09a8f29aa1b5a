//! Owns the audit chain's anchors: the chain's head `(seq, hash)` written every
//! `audit_anchor_every_seconds` to an append-only file outside the ledger (synced), so that
//! `guardianctl audit verify` can tell when the newest entries were removed or the last ones
//! rewritten with recomputed hashes — which the chain alone cannot show (a shorter or
//! recomputed chain is still a valid chain).
//!
//! # What verification then proves
//! Every entry up to the newest anchor is the one the server saw (same seq, same hash, and
//! through the chain every row before it). Entries after the newest anchor (at most one
//! interval) are covered by the chain only. Someone who can write both the ledger and the
//! anchor file can still rewrite history: keep the file on another volume, or ship it off the
//! host (a log shipper tails it: one line per anchor).
//!
//! Line format: `seq hash at_unix_ms`, one anchor per line, oldest first.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Ledger, StoreError};

/// One anchored head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    /// The head's seq.
    pub seq: u64,
    /// The head's hash (lowercase hex).
    pub hash: String,
    /// When it was anchored.
    pub at_unix_ms: i64,
}

/// How the ledger disagrees with its newest anchor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnchorMismatch {
    /// The ledger ends before the anchored seq: entries were removed.
    #[error(
        "the anchor of {at} saw the chain at seq {anchored}, but the ledger ends at seq {ledger_head}: the newest entries were removed"
    )]
    Truncated {
        /// The anchored seq.
        anchored: u64,
        /// The ledger's last seq.
        ledger_head: u64,
        /// When it was anchored (UTC).
        at: String,
    },
    /// The entry at the anchored seq has another hash: it (or one before it) was rewritten.
    #[error(
        "the anchor of {at} saw seq {seq} with hash {anchored}, but the ledger's entry there hashes to {ledger}: rewritten"
    )]
    Rewritten {
        /// The anchored seq.
        seq: u64,
        /// The anchored hash (short).
        anchored: String,
        /// The ledger's hash there (short).
        ledger: String,
        /// When it was anchored (UTC).
        at: String,
    },
}

/// The anchor file beside a SQLite ledger (`<ledger file>.audit-anchor`); `None` for
/// PostgreSQL or an in-memory ledger (configure `audit_anchor_file` there).
pub fn default_file(ledger_url: &str) -> Option<PathBuf> {
    super::sqlite_file(ledger_url).map(|file| {
        let mut path = file.into_os_string();
        path.push(".audit-anchor");
        PathBuf::from(path)
    })
}

/// Every anchor in `path`, oldest first (none when the file does not exist).
///
/// # Errors
/// The file cannot be read, or a line is not `seq hash at_unix_ms`.
pub fn read(path: &Path) -> Result<Vec<Anchor>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(format!("cannot read {}: {error}", path.display())),
    };
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(n, line)| {
            let mut parts = line.split_whitespace();
            let bad = || {
                format!(
                    "{} line {}: not `seq hash at_unix_ms`",
                    path.display(),
                    n + 1
                )
            };
            Ok(Anchor {
                seq: parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?,
                hash: parts
                    .next()
                    .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
                    .ok_or_else(bad)?
                    .to_owned(),
                at_unix_ms: parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?,
            })
        })
        .collect()
}

/// Appends `anchor` to `path` and syncs it.
///
/// # Errors
/// The file cannot be opened, written or synced.
pub fn append(path: &Path, anchor: &Anchor) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(file, "{} {} {}", anchor.seq, anchor.hash, anchor.at_unix_ms)?;
    file.sync_data()
}

impl Ledger {
    /// The chain's last entry `(seq, hash)`, if any.
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn audit_head(&self) -> Result<Option<(u64, String)>, StoreError> {
        use sqlx::Row;
        let row = sqlx::query("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| {
            Ok((
                u64::try_from(row.try_get::<i64, _>(0)?).unwrap_or(0),
                row.try_get(1)?,
            ))
        })
        .transpose()
    }

    /// Compares the ledger with the newest of `anchors`.
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn audit_check_anchor(
        &self,
        anchors: &[Anchor],
    ) -> Result<Option<AnchorMismatch>, StoreError> {
        use sqlx::Row;
        let Some(newest) = anchors.iter().max_by_key(|a| a.seq) else {
            return Ok(None);
        };
        let at = utc(newest.at_unix_ms);
        let head = self.audit_head().await?.map_or(0, |(seq, _)| seq);
        if head < newest.seq {
            return Ok(Some(AnchorMismatch::Truncated {
                anchored: newest.seq,
                ledger_head: head,
                at,
            }));
        }
        let hash: String = sqlx::query("SELECT hash FROM audit_log WHERE seq = $1")
            .bind(super::to_i64(newest.seq))
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?;
        if hash != newest.hash {
            return Ok(Some(AnchorMismatch::Rewritten {
                seq: newest.seq,
                anchored: newest.hash.chars().take(12).collect(),
                ledger: hash.chars().take(12).collect(),
                at,
            }));
        }
        Ok(None)
    }
}

/// Anchors the chain's head in `path` now and then every `every` while it moves, until
/// `shutdown`. A failed anchor is logged (`AuditAnchorFailed`) and tried again next round.
pub async fn run(ledger: Ledger, path: PathBuf, every: Duration, shutdown: CancellationToken) {
    let mut anchored = read(&path)
        .ok()
        .and_then(|anchors| anchors.last().map(|a| a.seq));
    loop {
        match ledger.audit_head().await {
            Ok(Some((seq, hash))) if anchored != Some(seq) => {
                let anchor = Anchor {
                    seq,
                    hash,
                    at_unix_ms: crate::unix_ms(),
                };
                let written = {
                    let path = path.clone();
                    tokio::task::spawn_blocking(move || append(&path, &anchor)).await
                };
                match written {
                    Ok(Ok(())) => anchored = Some(seq),
                    Ok(Err(error)) => {
                        tracing::warn!(%error, path = %path.display(), "AuditAnchorFailed");
                    }
                    Err(error) => tracing::warn!(%error, "AuditAnchorFailed"),
                }
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "AuditAnchorFailed: cannot read the head"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

fn utc(unix_ms: i64) -> String {
    format!("{} UTC", crate::utc(unix_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn insert_or_replace_cannot_rewrite_an_audit_row_through_the_ledger()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let ledger = Ledger::open(&format!("sqlite://{}/l.db", dir.path().display())).await?;
        let body = serde_json::json!({"act": "ack"});
        let entry = ledger
            .audit_append(crate::store::audit::AuditKind::Operator, "", &body, 1)
            .await?;
        // REPLACE deletes the old row first; with recursive triggers that delete is refused.
        let replaced = sqlx::query(
            "INSERT OR REPLACE INTO audit_log (seq, at_unix_ms, kind, node_id, body, prev_hash, hash)
             VALUES (1, 1, 'operator', '', '{}', $1, $2)",
        )
        .bind(&entry.prev_hash)
        .bind(&entry.hash)
        .execute(&ledger.pool)
        .await;
        assert!(replaced.is_err(), "the audit row was replaced");
        Ok(())
    }

    #[test]
    fn anchors_round_trip_and_bad_lines_are_named() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("a");
        assert!(read(&path).expect("missing is empty").is_empty());
        let anchor = Anchor {
            seq: 7,
            hash: "ab".repeat(32),
            at_unix_ms: 1_765_000_000_000,
        };
        append(&path, &anchor).expect("append");
        append(
            &path,
            &Anchor {
                seq: 9,
                ..anchor.clone()
            },
        )
        .expect("append");
        let read_back = read(&path).expect("read");
        assert_eq!(read_back.len(), 2);
        assert_eq!(read_back[0], anchor);
        std::fs::write(&path, "7 nothex 1\n").expect("write");
        assert!(read(&path).expect_err("bad").contains("line 1"));
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_765_000_000_000), "2025-12-06 05:46:40 UTC");
    }
}
