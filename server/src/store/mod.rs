//! Durable state: the ledger (nodes, batches, security events) and the embedded telemetry
//! rows, in one SQL database through sqlx: a SQLite file by default, PostgreSQL for HA.
//!
//! # Guarantees
//! - [`Ledger::commit_batch`] stores a batch's samples and its `(node, seq)` idempotency
//!   record in one transaction; it returns only after the commit, so an ack sent after it
//!   never covers data that is not on disk. A replayed `(node, seq)` stores nothing new.
//! - Migrations are embedded in the binary and applied at open.

pub mod anchor;
pub mod audit;
pub mod clickhouse;
pub mod commands;
pub mod commit;
mod embedded;
pub mod hello;
pub mod history;
mod insert;
pub mod lock;
pub mod outbox;
pub mod reconcile;
pub mod records;
pub mod retention;
pub mod security;
pub mod telemetry;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use guardian_proto::v1::{HostSample, Node, NodeDescriptor, SampleBatch};
use prost::Message;
use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, Row};

use crate::identity::NodeId;

/// Starts the store's tasks on `tasks` (ending on `shutdown`): embedded retention, the
/// `(node, seq)` record pruner, the group-commit writer and, with ClickHouse configured, the
/// outbox sink. Returns the handle sessions commit through.
///
/// # Errors
/// [`StoreError`] when the outbox's pending totals cannot be read.
pub async fn start(
    ledger: &Ledger,
    config: &crate::config::ServerConfig,
    metrics: &Arc<crate::metrics::Metrics>,
    shutdown: &tokio_util::sync::CancellationToken,
    tasks: &tokio_util::task::TaskTracker,
) -> Result<commit::Committer, StoreError> {
    let telemetry = commit::Telemetry::of(&config.clickhouse);
    let outbox = outbox::start(ledger, &config.clickhouse, metrics, shutdown, tasks).await?;
    // Also with ClickHouse: rows from before it was configured expire too (with empty tables
    // a round is one index seek per node and table).
    if config.embedded_retention_days > 0 {
        tasks.spawn(retention::run_expiry(
            ledger.clone(),
            config.embedded_retention_days,
            retention::EXPIRE_EVERY,
            metrics.embedded_samples_expired.clone(),
            shutdown.clone(),
        ));
    }
    match config.audit_anchor_path() {
        Some(path) => {
            tasks.spawn(anchor::run(
                ledger.clone(),
                path,
                Duration::from_secs(config.audit_anchor_every_seconds),
                shutdown.clone(),
            ));
        }
        None => tracing::warn!(
            "the audit chain is not anchored: set audit_anchor_file (outside the ledger) so that guardianctl audit verify can tell removed or rewritten newest entries"
        ),
    }
    tasks.spawn(records::run_pruner(
        ledger.clone(),
        records::PRUNE_EVERY,
        shutdown.clone(),
    ));
    Ok(commit::Committer::spawn(
        ledger.clone(),
        telemetry,
        outbox,
        config.outbox_max_bytes,
        group_observer(metrics),
        tasks,
    ))
}

/// Records each group commit in `metrics`: its time, its size, and whether it was full.
fn group_observer(metrics: &Arc<crate::metrics::Metrics>) -> commit::GroupObserver {
    let metrics = Arc::clone(metrics);
    Arc::new(move |batches, seconds| {
        metrics.commit_seconds.observe(seconds);
        metrics.commit_group_batches.observe(batches as f64);
        if batches >= commit::MAX_GROUP_BATCHES {
            metrics.commit_groups_full.inc();
        }
    })
}

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// Which SQL engine a ledger URL selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `sqlite://PATH` (the file and its folder are created on first run).
    Sqlite,
    /// `postgres://...` or `postgresql://...`.
    Postgres,
}

impl Backend {
    /// Picks the backend from a URL's scheme.
    ///
    /// # Errors
    /// [`StoreError::UnsupportedUrl`] for any other scheme.
    pub fn from_url(url: &str) -> Result<Self, StoreError> {
        if url.starts_with("sqlite:") {
            Ok(Self::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres)
        } else {
            Err(StoreError::UnsupportedUrl(redact(url)))
        }
    }
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL names no supported engine.
    #[error("unsupported ledger URL {0:?}: use sqlite://PATH or postgres://USER@HOST:PORT/DB")]
    UnsupportedUrl(String),
    /// The SQLite file's folder could not be created.
    #[error("cannot create the folder for the SQLite ledger {path}: {source}")]
    CreateDir {
        /// The folder.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Connecting failed.
    #[error("cannot connect to the ledger at {url}: {source}")]
    Connect {
        /// The URL, password removed.
        url: String,
        /// The driver error.
        source: sqlx::Error,
    },
    /// A migration failed.
    #[error("ledger migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A query failed.
    #[error("ledger query failed: {0}")]
    Query(#[from] sqlx::Error),
    /// A write shared with other callers failed, or had no answer for this caller.
    #[error("ledger query failed: {0}")]
    Shared(String),
    /// An outbox segment file could not be written, read or removed.
    #[error(
        "outbox segment folder {path}: {source} (check that the folder is writable and the disk not full)"
    )]
    Segment {
        /// The folder.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Another server holds the ledger.
    #[error(
        "{ledger} is in use by {holder}: one server per ledger; stop the other server, or point ledger_url at another ledger"
    )]
    Locked {
        /// Which ledger.
        ledger: String,
        /// Who holds it.
        holder: String,
    },
    /// A stored blob (protobuf, or the outbox's own encoding) did not decode.
    #[error("stored sample for node {node} does not decode: {source}")]
    Corrupt {
        /// The node.
        node: String,
        /// The decode error.
        source: crate::batch::DecodeError,
    },
}

impl StoreError {
    /// Stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::UnsupportedUrl(_) => "unsupported_url",
            Self::CreateDir { .. } => "create_dir",
            Self::Connect { .. } => "connect",
            Self::Migrate(_) => "migrate",
            Self::Query(_) | Self::Shared(_) => "query",
            Self::Corrupt { .. } => "corrupt",
            Self::Segment { .. } => "segment",
            Self::Locked { .. } => "locked",
        }
    }
}

/// What [`Ledger::commit_batch`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// The batch was new and is now durable.
    Stored {
        /// Samples written.
        samples: usize,
    },
    /// This `(node, seq)` was already committed; nothing was written.
    Duplicate,
    /// The seq is at or below its node's floor: stored long ago, its record since pruned
    /// (`store::records`); nothing was written. Acked like [`Commit::Duplicate`].
    BelowFloor,
}

/// A refused stream or call, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecurityEvent {
    /// When, Unix milliseconds.
    pub at_unix_ms: i64,
    /// Stable kind, e.g. `hello_identity_mismatch`.
    pub kind: String,
    /// Who (`node/<id>`, `operator/<name>`, or `unknown`).
    pub peer: String,
    /// What happened.
    pub detail: String,
}

/// The SQL ledger and embedded telemetry store.
#[derive(Debug, Clone)]
pub struct Ledger {
    pool: AnyPool,
    backend: Backend,
    /// SQLite has one writer: ingest's group commit and the audited writers (reconciler,
    /// commands) queue here, first come first served, instead of racing for the file lock
    /// through SQLite's busy handler (whose back-off sleeps starve the rarer writer).
    write_gate: Option<Arc<tokio::sync::Mutex<()>>>,
    /// SQLite file ledgers: the folder of outbox segment files, and its append side once
    /// the first outbox batch is written.
    segments: Option<Arc<outbox::segments::Folder>>,
    /// Per node: every seq at or below is a replay (see [`records`]).
    floors: Arc<std::sync::Mutex<std::collections::HashMap<String, u64>>>,
    /// Held by a group commit and by a pruning transaction: a commit never sees a record
    /// deleted without the floor that covers it (PostgreSQL has no write gate).
    records_gate: Arc<tokio::sync::Mutex<()>>,
    /// Hellos of new or changed nodes waiting for their shared write ([`Ledger::record_hello`]).
    hellos: Arc<std::sync::Mutex<hello::HelloQueue>>,
    /// The SQLite file (None for PostgreSQL or in memory), for the server lock.
    file: Option<Arc<std::path::PathBuf>>,
    /// How many security events each peer may still write this minute.
    security_limit: Arc<security::PeerLimit>,
}

impl Ledger {
    /// Opens (creating if needed) the database at `url` and applies the embedded migrations.
    ///
    /// # Errors
    /// [`StoreError`] when the URL is unsupported, the database unreachable or a migration fails.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        install_default_drivers();
        let backend = Backend::from_url(url)?;
        let connect_url = match backend {
            Backend::Sqlite => sqlite_url(url)?,
            Backend::Postgres => url.to_owned(),
        };
        let pool = AnyPoolOptions::new()
            .max_connections(match backend {
                // One writer is what SQLite can do anyway; more only adds lock waits.
                Backend::Sqlite => 4,
                Backend::Postgres => 16,
            })
            .acquire_timeout(Duration::from_secs(10))
            // A pooled SQLite connection is a file handle: pinging it before every use only
            // costs a round trip to its worker thread per statement.
            .test_before_acquire(backend == Backend::Postgres)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL keeps readers off the writer's back; FULL syncs the WAL on
                        // every commit, so an acked batch survives power loss, not only a
                        // process crash.
                        sqlx::query("PRAGMA journal_mode = WAL")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA synchronous = FULL")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA busy_timeout = 10000")
                            .execute(&mut *conn)
                            .await?;
                        // Statement journals (multi-row INSERTs inside the group commit) in
                        // memory, not in temp files opened and written per statement.
                        sqlx::query("PRAGMA temp_store = MEMORY")
                            .execute(&mut *conn)
                            .await?;
                        // INSERT OR REPLACE deletes the row it replaces: with recursive
                        // triggers that delete fires audit_log's no-delete trigger too.
                        sqlx::query("PRAGMA recursive_triggers = ON")
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(&connect_url)
            .await
            .map_err(|source| StoreError::Connect {
                url: redact(url),
                source,
            })?;
        match backend {
            Backend::Sqlite => SQLITE_MIGRATIONS.run(&pool).await?,
            Backend::Postgres => POSTGRES_MIGRATIONS.run(&pool).await?,
        }
        let write_gate =
            (backend == Backend::Sqlite).then(|| Arc::new(tokio::sync::Mutex::new(())));
        let segments = match backend {
            Backend::Sqlite => sqlite_file(url).map(|file| {
                let mut dir = file.into_os_string();
                dir.push("-outbox");
                Arc::new(outbox::segments::Folder::new(dir.into()))
            }),
            Backend::Postgres => None,
        };
        let file = match backend {
            Backend::Sqlite => sqlite_file(url).map(Arc::new),
            Backend::Postgres => None,
        };
        let ledger = Self {
            pool,
            backend,
            write_gate,
            segments,
            file,
            security_limit: Arc::default(),
            floors: Arc::default(),
            records_gate: Arc::default(),
            hellos: Arc::default(),
        };
        ledger.load_floors().await?;
        Ok(ledger)
    }

    /// Waits for this process's turn to write (SQLite); `None` on PostgreSQL.
    pub(crate) async fn write_turn(&self) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        match &self.write_gate {
            Some(gate) => Some(Arc::clone(gate).lock_owned().await),
            None => None,
        }
    }

    /// The engine in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Checks the database answers.
    ///
    /// # Errors
    /// [`StoreError::Query`] when it does not.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Registers a node's Hello (creating the node on first contact) and returns the highest
    /// committed sequence number for it.
    ///
    /// A known node whose hostname, agent version and network are unchanged needs no write
    /// (its batches move `last_seen_unix_ms`): a fleet reconnecting after a server restart
    /// costs reads only. New or changed nodes share one transaction with the other Hellos
    /// waiting at the time ([`hello::HelloQueue`]): 1 000 agents meeting a fresh ledger
    /// cost a few dozen commits, not 1 000, and do not hold the group commit back for each.
    ///
    /// # Errors
    /// [`StoreError::Query`] or [`StoreError::Shared`].
    pub async fn record_hello(
        &self,
        node: &NodeId,
        descriptor: &NodeDescriptor,
        agent_version: &str,
        now_unix_ms: i64,
    ) -> Result<u64, StoreError> {
        let known = sqlx::query(
            "SELECT hostname, agent_version, network, last_stored_seq FROM nodes WHERE node_id = $1",
        )
        .bind(node.as_str())
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = known {
            let (hostname, version, network, seq): (String, String, String, i64) = (
                row.try_get(0)?,
                row.try_get(1)?,
                row.try_get(2)?,
                row.try_get(3)?,
            );
            if hostname == descriptor.hostname
                && version == agent_version
                && network == descriptor.network
            {
                return Ok(u64::try_from(seq)
                    .unwrap_or(0)
                    .max(self.batch_floor(node.as_str())));
            }
        }
        let (done, answer) = tokio::sync::oneshot::channel();
        let start = {
            let mut queue = self
                .hellos
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            queue.waiting.push(hello::HelloJob {
                node: node.to_string(),
                hostname: descriptor.hostname.clone(),
                agent_version: agent_version.to_owned(),
                network: descriptor.network.clone(),
                now_unix_ms,
                done,
            });
            !std::mem::replace(&mut queue.draining, true)
        };
        if start {
            // A task of its own: a caller that goes away (its stream dropped) must not
            // strand the Hellos that joined its write.
            let ledger = self.clone();
            tokio::spawn(async move { ledger.drain_hellos().await });
        }
        // A floor adopted from ClickHouse (records::adopt_floors) counts as stored: an agent
        // with a fresh spool numbers on from it, never reusing a seq ClickHouse holds.
        answer
            .await
            .map_err(|_| StoreError::Shared("the Hello writer stopped before answering".into()))?
            .map(|seq| seq.max(self.batch_floor(node.as_str())))
    }

    /// Stores one batch atomically in the embedded tables, at most once per `(node, seq)`
    /// (a group of one: see [`commit::Committer`] for the path ingest uses).
    ///
    /// # Errors
    /// [`StoreError::Query`]; nothing is stored then, and the batch must not be acked.
    pub async fn commit_batch(
        &self,
        node: &NodeId,
        batch: &SampleBatch,
        now_unix_ms: i64,
    ) -> Result<Commit, StoreError> {
        let job = commit::Job {
            node: node.clone(),
            network: String::new(),
            batch: std::sync::Arc::new(crate::batch::Batch::from(batch)),
        };
        let mut done = self
            .commit_group(&[job], commit::Telemetry::Embedded, now_unix_ms)
            .await?;
        Ok(done.commits.remove(0))
    }

    /// Records a refused stream or call, at most
    /// [`security::EVENTS_PER_PEER_PER_MINUTE`] per peer and minute: returns false (nothing
    /// written) for the rest, which callers count. A refusal flood from one certificate then
    /// costs no synced write each, and cannot grow the table without bound.
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn record_security_event(&self, event: &SecurityEvent) -> Result<bool, StoreError> {
        if !self.security_limit.admit(&event.peer, event.at_unix_ms) {
            return Ok(false);
        }
        let _turn = self.write_turn().await;
        sqlx::query(
            "INSERT INTO security_events (at_unix_ms, kind, peer, detail) VALUES ($1, $2, $3, $4)",
        )
        .bind(event.at_unix_ms)
        .bind(&event.kind)
        .bind(&event.peer)
        .bind(&event.detail)
        .execute(&self.pool)
        .await?;
        Ok(true)
    }

    /// Deletes security events recorded before `before_unix_ms`; returns how many.
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn prune_security_events(&self, before_unix_ms: i64) -> Result<u64, StoreError> {
        let _turn = self.write_turn().await;
        Ok(
            sqlx::query("DELETE FROM security_events WHERE at_unix_ms < $1")
                .bind(before_unix_ms)
                .execute(&self.pool)
                .await?
                .rows_affected(),
        )
    }

    /// Every recorded security event, oldest first.
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn security_events(&self) -> Result<Vec<SecurityEvent>, StoreError> {
        let rows =
            sqlx::query("SELECT at_unix_ms, kind, peer, detail FROM security_events ORDER BY id")
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|row| {
                Ok(SecurityEvent {
                    at_unix_ms: row.try_get(0)?,
                    kind: row.try_get(1)?,
                    peer: row.try_get(2)?,
                    detail: row.try_get(3)?,
                })
            })
            .collect()
    }

    /// Every known node with its newest host sample (`connected` is left false: the
    /// registry knows live connections, the ledger does not).
    ///
    /// # Errors
    /// [`StoreError::Query`] or [`StoreError::Corrupt`].
    pub async fn nodes(&self) -> Result<Vec<Node>, StoreError> {
        let rows = sqlx::query(
            "SELECT node_id, hostname, agent_version, network, first_seen_unix_ms, last_seen_unix_ms,
                    last_stored_seq, last_host, last_host_observed_unix_ms, spool_dropped_batches_total
             FROM nodes ORDER BY node_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let node_id: String = row.try_get(0)?;
                let last_host: Option<Vec<u8>> = row.try_get(7)?;
                let last_host = last_host
                    .map(|bytes| HostSample::decode(bytes.as_slice()))
                    .transpose()
                    .map_err(|source| StoreError::Corrupt {
                        node: node_id.clone(),
                        source: source.into(),
                    })?;
                Ok(Node {
                    node_id,
                    hostname: row.try_get(1)?,
                    agent_version: row.try_get(2)?,
                    network: row.try_get(3)?,
                    first_seen_unix_ms: row.try_get(4)?,
                    last_seen_unix_ms: row.try_get(5)?,
                    connected: false,
                    last_stored_seq: u64::try_from(row.try_get::<i64, _>(6)?).unwrap_or(0),
                    last_host,
                    last_host_observed_unix_ms: row.try_get(8)?,
                    // Chain figures live in memory only; the next sample restores them.
                    last_chain: None,
                    last_chain_observed_unix_ms: 0,
                    spool_dropped_batches_total: u64::try_from(row.try_get::<i64, _>(9)?)
                        .unwrap_or(0),
                    // The registry fills these from its windows.
                    window_points: 0,
                    window_oldest_unix_ms: 0,
                    // The reconciler fills these.
                    ..Node::default()
                })
            })
            .collect()
    }

    /// `(batch records, distinct seqs, host samples)` stored for a node: the figures the
    /// exactly-once checks compare with what was sent. Batch records at or below the
    /// node's floor are pruned after a round of [`records::PRUNE_EVERY`], so the first two
    /// count only the batches of the last round or two once the pruner ran.
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn counts(&self, node: &NodeId) -> Result<(i64, i64, i64), StoreError> {
        // One statement, so a commit landing meanwhile cannot skew one count against another.
        let row = sqlx::query(
            "SELECT (SELECT COUNT(*) FROM batches WHERE node_id = $1),
                    (SELECT COUNT(DISTINCT seq) FROM batches WHERE node_id = $1),
                    (SELECT COUNT(*) FROM host_samples WHERE node_id = $1)",
        )
        .bind(node.as_str())
        .fetch_one(&self.pool)
        .await?;
        Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?))
    }

    /// Every stored sample of `kind` (`gpu`, `keystore`) for a node, protobuf-encoded
    /// `guardian.v1.Sample`s, oldest first.
    ///
    /// # Errors
    /// [`StoreError::Query`].
    pub async fn kind_samples(
        &self,
        node: &NodeId,
        kind: &str,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let rows = sqlx::query(
            "SELECT sample FROM kind_samples WHERE node_id = $1 AND kind = $2 ORDER BY seq, idx",
        )
        .bind(node.as_str())
        .bind(kind)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|row| Ok(row.try_get(0)?)).collect()
    }

    /// Closes the pool, waiting for in-flight queries.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// SQL BIGINT is signed; counters beyond i64::MAX saturate rather than wrap.
fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Turns `sqlite://PATH` into a URL that creates the file, creating its folder too.
/// The database file of a SQLite URL (None for an in-memory database).
fn sqlite_file(url: &str) -> Option<std::path::PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    let path = rest.split_once('?').map_or(rest, |(path, _)| path);
    (!path.is_empty() && path != ":memory:" && !rest.contains("mode=memory"))
        .then(|| std::path::PathBuf::from(path))
}

fn sqlite_url(url: &str) -> Result<String, StoreError> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path != ":memory:"
        && let Some(parent) = Path::new(path)
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent).map_err(|source| StoreError::CreateDir {
            path: parent.display().to_string(),
            source,
        })?;
    }
    let query = if query.contains("mode=") {
        query.to_owned()
    } else if query.is_empty() {
        "mode=rwc".to_owned()
    } else {
        format!("{query}&mode=rwc")
    };
    // Validate early so a typo is reported as the URL, not as a driver error.
    sqlx::sqlite::SqliteConnectOptions::from_str(&format!("sqlite://{path}?{query}"))
        .map_err(|_| StoreError::UnsupportedUrl(url.to_owned()))?;
    Ok(format!("sqlite://{path}?{query}"))
}

/// Removes a password from a URL before it reaches a log or an error.
pub fn redact(url: &str) -> String {
    // The last '@' ends the userinfo: a password may itself contain '@'.
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_full_group_commits_count_as_full() {
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let observe = group_observer(&metrics);
        observe(commit::MAX_GROUP_BATCHES - 1, 0.01);
        observe(1, 0.001);
        assert_eq!(metrics.commit_groups_full.get(), 0);
        observe(commit::MAX_GROUP_BATCHES, 0.2);
        assert_eq!(metrics.commit_groups_full.get(), 1);
    }

    #[test]
    fn passwords_never_reach_errors() {
        assert_eq!(
            redact("postgres://u:secret@h:1/db"),
            "postgres://u:***@h:1/db"
        );
        assert_eq!(redact("sqlite://data/x.db"), "sqlite://data/x.db");
        assert_eq!(redact("postgres://u:p@ss@h/db"), "postgres://u:***@h/db");
    }

    #[test]
    fn only_sqlite_and_postgres_urls_are_accepted() {
        assert!(matches!(
            Backend::from_url("mysql://x"),
            Err(StoreError::UnsupportedUrl(_))
        ));
        assert_eq!(
            Backend::from_url("postgresql://x").ok(),
            Some(Backend::Postgres)
        );
    }

    #[tokio::test]
    async fn a_replayed_batch_is_stored_once() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let url = format!("sqlite://{}/sub/ledger.db", dir.path().display());
        let ledger = Ledger::open(&url).await?;
        let node = NodeId::parse("n1")?;
        assert_eq!(
            ledger
                .record_hello(&node, &NodeDescriptor::default(), "t", 1)
                .await?,
            0
        );
        let batch = SampleBatch {
            spool_dropped_batches_total: 0,
            seq: 7,
            samples: vec![guardian_proto::v1::Sample {
                observed_at_unix_ms: 5,
                kind: Some(guardian_proto::v1::sample::Kind::Host(HostSample {
                    cpu_count: 2,
                    ..Default::default()
                })),
            }],
        };
        assert_eq!(
            ledger.commit_batch(&node, &batch, 10).await?,
            Commit::Stored { samples: 1 }
        );
        assert_eq!(
            ledger.commit_batch(&node, &batch, 11).await?,
            Commit::Duplicate
        );
        assert_eq!(ledger.counts(&node).await?, (1, 1, 1));
        let nodes = ledger.nodes().await?;
        assert_eq!(nodes[0].last_stored_seq, 7);
        assert_eq!(nodes[0].last_host.as_ref().map(|h| h.cpu_count), Some(2));
        drop(ledger);
        // Reopening applies no migration twice and keeps the data.
        let again = Ledger::open(&url).await?;
        assert_eq!(
            again
                .record_hello(&node, &NodeDescriptor::default(), "t", 20)
                .await?,
            7
        );
        Ok(())
    }
}
