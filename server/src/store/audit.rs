//! The audit ledger: an append-only, hash-chained table (`audit_log`) of findings, decisions,
//! commands, outcomes and operator acts, and the check that the chain is intact.
//!
//! # The chain
//! Rows are numbered 1, 2, 3, ... with no gap. Row `seq` stores `prev_hash`, the `hash` of row
//! `seq - 1` ([`GENESIS_PREV_HASH`], 64 zeros, for row 1), and its own `hash`, which is
//! [`entry_hash`] over every other column. Changing a row's content breaks its own hash;
//! removing a row leaves a gap in `seq`; rewriting a row with a recomputed hash breaks the next
//! row's `prev_hash`. [`Ledger::audit_verify`] names the first such broken link.
//!
//! # Guarantees
//! - Appends are serialised: each is one transaction that holds the database's write lock
//!   (SQLite `BEGIN IMMEDIATE`, PostgreSQL `LOCK TABLE audit_log IN SHARE ROW EXCLUSIVE MODE`),
//!   reads the last row and inserts the next. The insert is also `ON CONFLICT (seq) DO
//!   NOTHING` and retried on a conflict, so two appenders never fork the chain.
//! - [`Ledger::audit_append`] returns only after the commit.
//! - Verification reads the table in pages of [`VERIFY_PAGE_ROWS`] rows, never all at once.
//! - Migration `0004_audit` adds triggers that refuse `UPDATE` and `DELETE` (and, on
//!   PostgreSQL, `TRUNCATE`) on `audit_log`; the chain catches a change made around them.
//!
//! # Limits
//! The chain alone cannot show that the newest rows were removed (a shorter chain is still a
//! valid chain), nor stop someone with write access from recomputing every hash after a
//! change. Anchoring the head `(seq, hash)` outside the database (the ClickHouse `audit`
//! mirror, a log shipper) closes both.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use ring::digest::{Context, SHA256};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Backend, Ledger, StoreError, to_i64};

/// `prev_hash` of row 1.
pub const GENESIS_PREV_HASH: &str =
    "0000000000000000000000000000000000000000000000000000000000000000";

/// Rows read per query by [`Ledger::audit_verify`].
pub const VERIFY_PAGE_ROWS: usize = 1000;

/// First field of the hashed encoding: versions the definition of [`entry_hash`].
const DOMAIN_TAG: &[u8] = b"guardian-audit-v1";

/// Tries per append before giving up. With the write lock held a conflict needs a writer
/// that bypasses [`Ledger::audit_append`], so more than one try is already unusual.
const APPEND_ATTEMPTS: u32 = 20;

const COLUMNS: &str = "seq, at_unix_ms, kind, node_id, body, prev_hash, hash";

/// Which audit entries [`Ledger::audit_entries_matching`] returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Only this node's ("" : every node's).
    pub node_id: String,
    /// Only this kind.
    pub kind: Option<AuditKind>,
    /// Only entries at or after this time, Unix ms.
    pub since_unix_ms: Option<i64>,
    /// Only entries at or before this time, Unix ms.
    pub until_unix_ms: Option<i64>,
}

/// What an audit entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuditKind {
    /// Something observed about a node (a rule fired).
    Finding,
    /// What the reconciler decided to do about findings.
    Decision,
    /// A command sent to an agent.
    Command,
    /// What a command did, as the agent reported it.
    Outcome,
    /// An operator's act (approval, override, manual command).
    Operator,
}

impl AuditKind {
    /// Every kind, in the order above.
    pub const ALL: [Self; 5] = [
        Self::Finding,
        Self::Decision,
        Self::Command,
        Self::Outcome,
        Self::Operator,
    ];

    /// The stored (and hashed) name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Finding => "finding",
            Self::Decision => "decision",
            Self::Command => "command",
            Self::Outcome => "outcome",
            Self::Operator => "operator",
        }
    }
}

impl fmt::Display for AuditKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stored `kind` that names no [`AuditKind`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown audit kind {0:?}: expected finding, decision, command, outcome or operator")]
pub struct UnknownAuditKind(pub String);

impl FromStr for AuditKind {
    type Err = UnknownAuditKind;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.as_str() == text)
            .ok_or_else(|| UnknownAuditKind(text.to_owned()))
    }
}

/// One row of the audit ledger.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    /// Position in the chain, from 1.
    pub seq: u64,
    /// When, Unix milliseconds (the caller's clock).
    pub at_unix_ms: i64,
    /// What it records.
    pub kind: AuditKind,
    /// The node concerned, or `""`.
    pub node_id: String,
    /// The details.
    pub body: serde_json::Value,
    /// The previous row's hash (lowercase hex).
    pub prev_hash: String,
    /// This row's [`entry_hash`] (lowercase hex).
    pub hash: String,
}

/// An entry as the Fleet API (and the web page) shows it.
impl From<AuditEntry> for guardian_proto::v1::AuditEntry {
    fn from(e: AuditEntry) -> Self {
        Self {
            seq: e.seq,
            at_unix_ms: e.at_unix_ms,
            kind: e.kind.as_str().to_owned(),
            node_id: e.node_id,
            body_json: e.body.to_string(),
            prev_hash: e.prev_hash,
            hash: e.hash,
        }
    }
}

/// What [`Ledger::audit_verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditReport {
    /// Rows read (all of them, including any after a break).
    pub entries: u64,
    /// The first broken link, in `seq` order; `None` when the chain is intact.
    pub first_broken: Option<BrokenLink>,
}

impl AuditReport {
    /// True when no link is broken.
    pub fn is_intact(&self) -> bool {
        self.first_broken.is_none()
    }
}

/// A row at which the chain does not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokenLink {
    /// The row's `seq` (0 for a stored seq below 1).
    pub seq: u64,
    /// What is wrong with it.
    pub reason: BreakReason,
}

/// Why a link is broken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BreakReason {
    /// The row's stored hash is not the hash of its content: the row was altered.
    HashMismatch {
        /// The stored `hash`.
        stored: String,
        /// [`entry_hash`] of the stored columns.
        computed: String,
    },
    /// The row's `seq` is not the one after its predecessor's: rows were removed.
    SeqGap {
        /// The `seq` that should have come here.
        expected: u64,
    },
    /// The row's `prev_hash` is not its predecessor's hash: the predecessor was rewritten
    /// (hash recomputed) or rows were reordered.
    PrevHashMismatch {
        /// The predecessor's `hash` (or [`GENESIS_PREV_HASH`]).
        expected: String,
        /// The stored `prev_hash`.
        found: String,
    },
}

impl BreakReason {
    /// Stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::HashMismatch { .. } => "hash_mismatch",
            Self::SeqGap { .. } => "seq_gap",
            Self::PrevHashMismatch { .. } => "prev_hash_mismatch",
        }
    }
}

impl fmt::Display for BreakReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::HashMismatch { stored, computed } => write!(
                f,
                "hash mismatch: the row was altered (stored hash {}, content hashes to {})",
                short(stored),
                short(computed)
            ),
            Self::SeqGap { expected } => write!(
                f,
                "seq gap: expected seq {expected} here, so rows were removed before this one"
            ),
            Self::PrevHashMismatch { expected, found } => write!(
                f,
                "prev_hash mismatch: the link to the previous row is broken (it was rewritten \
                 or rows were reordered; prev_hash {}, previous row's hash {})",
                short(found),
                short(expected)
            ),
        }
    }
}

/// The first 12 hex digits, enough to tell hashes apart in a message.
fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// The hash of one audit row, as 64 lowercase hex digits.
///
/// SHA-256 over the concatenation of seven fields, each written as its length in bytes
/// (8 bytes, big-endian unsigned) followed by its bytes:
/// 1. the domain tag `guardian-audit-v1` (ASCII),
/// 2. `seq`: 8 bytes, big-endian unsigned,
/// 3. `at_unix_ms`: 8 bytes, big-endian two's complement,
/// 4. `kind`, 5. `node_id`, 6. `body` (the JSON text exactly as stored) and 7. `prev_hash`
///    (the hex text exactly as stored): their UTF-8 bytes.
///
/// The length prefixes make the encoding injective: no two rows share an encoding, so no
/// byte can move from one column to the next without changing the hash.
pub fn entry_hash(
    seq: u64,
    at_unix_ms: i64,
    kind: &str,
    node_id: &str,
    body: &str,
    prev_hash: &str,
) -> String {
    let mut digest = Context::new(&SHA256);
    let mut field = |bytes: &[u8]| {
        // usize -> u64 is lossless on every target Rust supports.
        digest.update(&(bytes.len() as u64).to_be_bytes());
        digest.update(bytes);
    };
    field(DOMAIN_TAG);
    field(&seq.to_be_bytes());
    field(&at_unix_ms.to_be_bytes());
    field(kind.as_bytes());
    field(node_id.as_bytes());
    field(body.as_bytes());
    field(prev_hash.as_bytes());
    digest
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A row as stored, before any parsing: what verification hashes.
struct StoredRow {
    seq: i64,
    at_unix_ms: i64,
    kind: String,
    node_id: String,
    body: String,
    prev_hash: String,
    hash: String,
}

impl StoredRow {
    fn read(row: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            seq: row.try_get(0)?,
            at_unix_ms: row.try_get(1)?,
            kind: row.try_get(2)?,
            node_id: row.try_get(3)?,
            body: row.try_get(4)?,
            prev_hash: row.try_get(5)?,
            hash: row.try_get(6)?,
        })
    }

    fn computed_hash(&self) -> String {
        entry_hash(
            u64::try_from(self.seq).unwrap_or(0),
            self.at_unix_ms,
            &self.kind,
            &self.node_id,
            &self.body,
            &self.prev_hash,
        )
    }

    /// The first thing wrong with this row, given what its predecessor implies.
    fn check(&self, expected_seq: i64, expected_prev: &str) -> Option<BreakReason> {
        let computed = self.computed_hash();
        if computed != self.hash {
            return Some(BreakReason::HashMismatch {
                stored: self.hash.clone(),
                computed,
            });
        }
        if self.seq != expected_seq {
            return Some(BreakReason::SeqGap {
                expected: u64::try_from(expected_seq).unwrap_or(0),
            });
        }
        if self.prev_hash != expected_prev {
            return Some(BreakReason::PrevHashMismatch {
                expected: expected_prev.to_owned(),
                found: self.prev_hash.clone(),
            });
        }
        None
    }

    fn into_entry(self) -> Result<AuditEntry, sqlx::Error> {
        Ok(AuditEntry {
            seq: u64::try_from(self.seq).unwrap_or(0),
            at_unix_ms: self.at_unix_ms,
            kind: self
                .kind
                .parse()
                .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
            node_id: self.node_id,
            body: serde_json::from_str(&self.body).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
            prev_hash: self.prev_hash,
            hash: self.hash,
        })
    }
}

/// A write transaction that holds the audit chain's head: entries appended through it chain
/// one after another, together with any other statement run on [`AuditTx::conn`], and land
/// all at once on [`AuditTx::commit`] (or not at all).
pub struct AuditTx {
    tx: sqlx::Transaction<'static, sqlx::Any>,
    seq: u64,
    hash: String,
    /// Held until the transaction ends (see `Ledger::write_turn`).
    _turn: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl std::fmt::Debug for AuditTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditTx")
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl AuditTx {
    /// The transaction's connection, for the statements that go with the entries.
    pub fn conn(&mut self) -> &mut sqlx::AnyConnection {
        &mut self.tx
    }

    /// Appends one entry after the last one (in this transaction).
    ///
    /// # Errors
    /// [`StoreError::Query`]: roll the whole transaction back (drop it).
    pub async fn append(
        &mut self,
        kind: AuditKind,
        node_id: &str,
        body: &serde_json::Value,
        at_unix_ms: i64,
    ) -> Result<AuditEntry, StoreError> {
        let seq = self
            .seq
            .checked_add(1)
            .filter(|&s| s <= i64::MAX as u64)
            .ok_or_else(|| {
                sqlx::Error::Protocol(format!(
                    "audit_log's last seq {} has no successor",
                    self.seq
                ))
            })?;
        let body_text = body.to_string();
        let hash = entry_hash(
            seq,
            at_unix_ms,
            kind.as_str(),
            node_id,
            &body_text,
            &self.hash,
        );
        let inserted = sqlx::query(
            "INSERT INTO audit_log (seq, at_unix_ms, kind, node_id, body, prev_hash, hash)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (seq) DO NOTHING",
        )
        .bind(to_i64(seq))
        .bind(at_unix_ms)
        .bind(kind.as_str())
        .bind(node_id)
        .bind(&body_text)
        .bind(&self.hash)
        .bind(&hash)
        .execute(&mut *self.tx)
        .await?
        .rows_affected();
        if inserted != 1 {
            return Err(StoreError::Query(sqlx::Error::Protocol(format!(
                "audit seq {seq} was taken by a writer that did not hold the lock"
            ))));
        }
        let prev_hash = std::mem::replace(&mut self.hash, hash.clone());
        self.seq = seq;
        Ok(AuditEntry {
            seq,
            at_unix_ms,
            kind,
            node_id: node_id.to_owned(),
            body: body.clone(),
            prev_hash,
            hash,
        })
    }

    /// Commits everything appended and run.
    ///
    /// # Errors
    /// [`StoreError::Query`]: nothing landed.
    pub async fn commit(self) -> Result<(), StoreError> {
        self.tx.commit().await?;
        Ok(())
    }
}

impl Ledger {
    /// Begins a write transaction holding the audit chain's head (SQLite: `BEGIN IMMEDIATE`,
    /// which takes the write lock now, waiting up to busy_timeout; PostgreSQL: a lock on
    /// `audit_log` that conflicts with other appenders, not with readers).
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn begin_audited(&self) -> Result<AuditTx, StoreError> {
        let turn = self.write_turn().await;
        let mut tx = match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => {
                let mut tx = self.pool.begin().await?;
                sqlx::query("LOCK TABLE audit_log IN SHARE ROW EXCLUSIVE MODE")
                    .execute(&mut *tx)
                    .await?;
                tx
            }
        };
        let last = sqlx::query("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut *tx)
            .await?;
        let (seq, hash) = match last {
            None => (0, GENESIS_PREV_HASH.to_owned()),
            Some(row) => {
                let seq: i64 = row.try_get(0)?;
                (u64::try_from(seq).unwrap_or(0), row.try_get(1)?)
            }
        };
        Ok(AuditTx {
            tx,
            seq,
            hash,
            _turn: turn,
        })
    }

    /// Appends one entry to the audit chain and returns it as stored.
    ///
    /// # Guarantees
    /// The entry is committed, directly after the entry that was last when it was appended,
    /// before this returns; concurrent appends are serialised (see the module doc).
    ///
    /// # Errors
    /// [`StoreError::Query`]; nothing is appended then.
    pub async fn audit_append(
        &self,
        kind: AuditKind,
        node_id: &str,
        body: &serde_json::Value,
        at_unix_ms: i64,
    ) -> Result<AuditEntry, StoreError> {
        let mut last_error = None;
        for attempt in 1..=APPEND_ATTEMPTS {
            let mut tx = self.begin_audited().await?;
            match tx.append(kind, node_id, body, at_unix_ms).await {
                Ok(entry) => {
                    tx.commit().await?;
                    return Ok(entry);
                }
                Err(error) => {
                    // Someone took this seq without the lock: read the new head and retry.
                    drop(tx);
                    tracing::warn!(attempt, %error, "audit append lost a race for its seq; retrying");
                    last_error = Some(error);
                    tokio::time::sleep(Duration::from_millis(u64::from(attempt) * 5)).await;
                }
            }
        }
        Err(last_error.unwrap_or_else(|| {
            StoreError::Query(sqlx::Error::Protocol(format!(
                "audit append: the next seq was taken {APPEND_ATTEMPTS} times in a row"
            )))
        }))
    }

    /// Checks the whole audit chain, oldest row first, reading it in pages.
    ///
    /// # Errors
    /// [`StoreError::Query`] when the table cannot be read (a broken chain is not an error:
    /// see [`AuditReport::first_broken`]).
    pub async fn audit_verify(&self) -> Result<AuditReport, StoreError> {
        self.audit_verify_in_pages(VERIFY_PAGE_ROWS).await
    }

    async fn audit_verify_in_pages(&self, page_rows: usize) -> Result<AuditReport, StoreError> {
        let page = i64::try_from(page_rows.max(1)).unwrap_or(i64::MAX);
        let mut report = AuditReport {
            entries: 0,
            first_broken: None,
        };
        // Every row, including any stray one below seq 1, is read and checked.
        let mut cursor = i64::MIN;
        let mut expected_seq: i64 = 1;
        let mut expected_prev = GENESIS_PREV_HASH.to_owned();
        loop {
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {COLUMNS} FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2"
            )))
            .bind(cursor)
            .bind(page)
            .fetch_all(&self.pool)
            .await?;
            for row in &rows {
                let row = StoredRow::read(row)?;
                report.entries += 1;
                if report.first_broken.is_none()
                    && let Some(reason) = row.check(expected_seq, &expected_prev)
                {
                    report.first_broken = Some(BrokenLink {
                        seq: u64::try_from(row.seq).unwrap_or(0),
                        reason,
                    });
                }
                // Later rows are checked against what is actually stored before them.
                cursor = row.seq;
                expected_seq = row.seq.saturating_add(1);
                expected_prev = row.hash;
            }
            if rows.len() < page_rows.max(1) {
                return Ok(report);
            }
        }
    }

    /// Up to `limit` entries with `seq > after_seq` that match `filter`, oldest first.
    ///
    /// # Errors
    /// [`StoreError::Query`], also when a stored `kind` or `body` does not parse.
    pub async fn audit_entries_matching(
        &self,
        after_seq: u64,
        limit: usize,
        filter: &AuditFilter,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM audit_log WHERE seq > $1 AND ($2 = '' OR node_id = $2) \
             AND ($3 = '' OR kind = $3) AND at_unix_ms >= $4 AND at_unix_ms <= $5 \
             ORDER BY seq LIMIT $6"
        )))
        .bind(to_i64(after_seq))
        .bind(filter.node_id.as_str())
        .bind(filter.kind.map_or("", AuditKind::as_str))
        .bind(filter.since_unix_ms.unwrap_or(i64::MIN))
        .bind(filter.until_unix_ms.unwrap_or(i64::MAX))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| Ok(StoredRow::read(row)?.into_entry()?))
            .collect()
    }

    /// The newest `limit` entries about `node_id`, newest first (the web node page).
    ///
    /// # Errors
    /// [`StoreError::Query`], also when a stored `kind` or `body` does not parse.
    pub async fn audit_entries_newest(
        &self,
        node_id: &str,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM audit_log WHERE node_id = $1 ORDER BY seq DESC LIMIT $2"
        )))
        .bind(node_id)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| Ok(StoredRow::read(row)?.into_entry()?))
            .collect()
    }

    /// Up to `limit` entries with `seq > after_seq`, oldest first.
    ///
    /// # Errors
    /// [`StoreError::Query`], also when a stored `kind` or `body` does not parse.
    pub async fn audit_entries(
        &self,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        self.audit_entries_matching(after_seq, limit, &AuditFilter::default())
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    async fn ledger_with(entries: u64) -> Result<(tempfile::TempDir, Ledger), StoreError> {
        let dir = tempfile::tempdir().map_err(|e| StoreError::Query(e.into()))?;
        let ledger = Ledger::open(&format!("sqlite://{}/l.db", dir.path().display())).await?;
        for i in 1..=entries {
            let kind = AuditKind::ALL[(i as usize - 1) % AuditKind::ALL.len()];
            let body = serde_json::json!({ "i": i, "note": format!("entry {i}") });
            ledger
                .audit_append(kind, "val-1", &body, 1000 + i as i64)
                .await?;
        }
        Ok((dir, ledger))
    }

    async fn sql(ledger: &Ledger, statement: &'static str) -> Result<(), sqlx::Error> {
        sqlx::query(statement).execute(&ledger.pool).await.map(drop)
    }

    #[test]
    fn the_hash_definition_is_pinned() {
        // Independently computed (Python hashlib) from the encoding in `entry_hash`'s doc.
        assert_eq!(
            entry_hash(1, 1000, "finding", "val-1", r#"{"a":1}"#, GENESIS_PREV_HASH),
            "8ad3ffcc62b58c6f92ef0765afeebd6504d3a9d13d8bd1080b3d6a4d2ccba843"
        );
        // Length prefixes: moving a byte between fields changes the hash.
        assert_ne!(
            entry_hash(1, 0, "ab", "c", "", ""),
            entry_hash(1, 0, "a", "bc", "", "")
        );
    }

    #[test]
    fn kinds_round_trip_through_their_names() {
        for kind in AuditKind::ALL {
            assert_eq!(kind.as_str().parse::<AuditKind>().ok(), Some(kind));
        }
        assert!("approval".parse::<AuditKind>().is_err());
    }

    #[tokio::test]
    async fn an_audit_chain_links_every_entry_to_the_previous_one() -> TestResult {
        let (_dir, ledger) = ledger_with(7).await?;
        let entries = ledger.audit_entries(0, 100).await?;
        assert_eq!(entries.len(), 7);
        assert_eq!(entries[0].prev_hash, GENESIS_PREV_HASH);
        for pair in entries.windows(2) {
            assert_eq!(pair[1].seq, pair[0].seq + 1);
            assert_eq!(pair[1].prev_hash, pair[0].hash);
        }
        assert_eq!(ledger.audit_entries(5, 1).await?[0].seq, 6);
        // Paging does not change the verdict: pages of 2, 3 and 1000 rows.
        for page in [2, 3, VERIFY_PAGE_ROWS] {
            let report = ledger.audit_verify_in_pages(page).await?;
            assert_eq!(
                report,
                AuditReport {
                    entries: 7,
                    first_broken: None
                }
            );
        }
        Ok(())
    }

    #[tokio::test]
    async fn the_audit_log_refuses_update_and_delete() -> TestResult {
        let (_dir, ledger) = ledger_with(2).await?;
        let update = sql(&ledger, "UPDATE audit_log SET body = '{}' WHERE seq = 1").await;
        assert!(update.is_err_and(|e| e.to_string().contains("append-only")));
        let delete = sql(&ledger, "DELETE FROM audit_log WHERE seq = 1").await;
        assert!(delete.is_err_and(|e| e.to_string().contains("append-only")));
        assert!(ledger.audit_verify().await?.is_intact());
        Ok(())
    }

    #[tokio::test]
    async fn an_altered_row_is_named_by_its_hash() -> TestResult {
        let (_dir, ledger) = ledger_with(5).await?;
        sql(&ledger, "DROP TRIGGER audit_log_no_update").await?;
        sql(
            &ledger,
            "UPDATE audit_log SET body = '{\"i\":3,\"note\":\"nothing happened\"}' WHERE seq = 3",
        )
        .await?;
        let report = ledger.audit_verify_in_pages(2).await?;
        assert_eq!(report.entries, 5);
        let broken = report.first_broken.ok_or("chain reported intact")?;
        assert_eq!(broken.seq, 3);
        assert_eq!(broken.reason.kind(), "hash_mismatch");
        Ok(())
    }

    #[tokio::test]
    async fn a_removed_row_is_named_by_the_gap_it_leaves() -> TestResult {
        let (_dir, ledger) = ledger_with(5).await?;
        sql(&ledger, "DROP TRIGGER audit_log_no_delete").await?;
        sql(&ledger, "DELETE FROM audit_log WHERE seq = 3").await?;
        let report = ledger.audit_verify_in_pages(2).await?;
        assert_eq!(report.entries, 4);
        assert_eq!(
            report.first_broken,
            Some(BrokenLink {
                seq: 4,
                reason: BreakReason::SeqGap { expected: 3 }
            })
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_rewritten_row_with_a_fresh_hash_breaks_the_next_link() -> TestResult {
        let (_dir, ledger) = ledger_with(5).await?;
        sql(&ledger, "DROP TRIGGER audit_log_no_update").await?;
        let entry = ledger.audit_entries(2, 1).await?.remove(0);
        let forged = entry_hash(
            3,
            entry.at_unix_ms,
            "finding",
            "val-1",
            "{}",
            &entry.prev_hash,
        );
        sqlx::query("UPDATE audit_log SET kind = 'finding', body = '{}', hash = $1 WHERE seq = 3")
            .bind(&forged)
            .execute(&ledger.pool)
            .await?;
        let broken = ledger
            .audit_verify()
            .await?
            .first_broken
            .ok_or("chain reported intact")?;
        assert_eq!(broken.seq, 4);
        assert_eq!(
            broken.reason,
            BreakReason::PrevHashMismatch {
                expected: forged,
                found: entry.hash
            }
        );
        Ok(())
    }
}
