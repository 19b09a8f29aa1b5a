//! Owns the ClickHouse telemetry store: its settings, the connection, and (one file each) its
//! schema, migrations and retention by partition drop ([`schema`]), the rows it stores
//! ([`rows`]), exactly-once inserts of outbox batches ([`insert`]), and the history and
//! recent-row reads ([`read`]).
//!
//! This is the only module that uses the `clickhouse` crate (RowBinary over HTTP, schema
//! validation off so that ClickHouse 18.16 works; TLS is not built in, so the URL is
//! `http://`).
//!
//! # Schema
//! - Raw tables, one row per sample (GPU: per device): `host_samples`, `chain_samples`,
//!   `gpu_samples`, `keystore_samples`, `unavailable_samples`. MergeTree, one partition per
//!   day of `ts` (the observed time), ordered by `(node_id, ts)`. Value columns carry the
//!   metric names of [`super::telemetry`].
//! - Rollups `rollup_1m`, `rollup_1h`: AggregatingMergeTree of avg/min/max/count states per
//!   `(node_id, metric, t)`, one partition per month, filled by one materialized view per
//!   (raw table, rollup) that unpivots the metric columns with `ARRAY JOIN`.
//! - `findings`, `actions`, `audit`: for the reconciler, partitioned by month.
//! - `schema_migrations` records each applied [`Migration`].
//!
//! # Exactly once
//! Every raw row carries the `outbox_id` of the batch it came from, and batches are inserted
//! in outbox order, one INSERT (one block) per table per chunk. So a batch above a table's
//! `max(outbox_id)` ([`ClickHouseStore::high_water`]) is new to it. An INSERT is not atomic,
//! though: it is one part per day partition (and per shard), and a crash or a lost shard can
//! keep some parts and lose the others. So when a chunk reaches down to a table's mark (at
//! start, after a failure, on a replayed outbox) [`ClickHouseStore::insert`] reads back the
//! `(node_id, seq, idx)` keys the table holds from the chunk's batches and writes only the
//! rows that are missing: each row once, whatever landed.
//!
//! # Retention
//! [`ClickHouseStore::drop_expired`] drops whole partitions whose newest row is older than
//! the table's retention (18.16 has no TTL). On servers >= 19.6 the tables also get a `TTL`
//! clause, so the server expires rows itself between drops.
//!
//! # Cluster mode (`cluster = "NAME"`)
//! Every DDL statement runs `ON CLUSTER NAME`. Each data table `X` becomes `X_local`, a
//! `ReplicatedMergeTree('/clickhouse/tables/{shard}/DB/X_local', '{replica}')` (rollups:
//! `ReplicatedAggregatingMergeTree`), plus `X`, a `Distributed(NAME, DB, X_local,
//! cityHash64(node_id))` table: all rows of one node live on one shard, so its rollups are
//! complete there. Materialized views read `*_samples_local` and write `rollup_*_local` on
//! each shard. Inserts and queries use the Distributed names; inserts set
//! `insert_distributed_sync=1` so that a successful INSERT is on the shards (the high-water
//! read depends on it). The reads that decide what is stored (the sink's and the audit
//! mirror's marks and read-backs, [`ClickHouseStore::exact_query`]) skip a replica that is
//! catching up: a Distributed read asks one replica per shard, and one just restarted after
//! a crash answers with what it held before it. A replayed chunk writes only the rows the
//! read-back misses, which are whole parts (one shard's rows of one day); one written twice
//! anyway would be dropped by Replicated insert deduplication. `schema_migrations` is one
//! ReplicatedMergeTree replicated to every server. The operator must provide:
//! - the cluster in `<remote_servers>` on every server, with `internal_replication` true;
//! - the macros `{shard}` and `{replica}` in `<macros>` on every server (`{replica}`
//!   unique in the whole cluster, e.g. the host name);
//! - ZooKeeper (or ClickHouse Keeper) in `<zookeeper>`, which replication and `ON CLUSTER`
//!   DDL need.
//!
//! Partition drops read the parts of every shard (`cluster(NAME, system, parts)`) and run
//! `ON CLUSTER`; a shard that lacks a partition ignores the drop.

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use ::clickhouse::error::Error as ChError;
use ::clickhouse::{Client, Compression};
use serde::{Deserialize, Serialize};

use super::redact;

mod insert;
mod read;
mod repair;
mod rows;
mod schema;

pub use insert::{HighWater, InsertBatch, InsertStats};
pub use schema::{Migration, migrations};
use schema::{bootstrap, supports_ttl};

/// How the server reaches ClickHouse, and how long each table keeps its rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClickHouseSettings {
    /// HTTP interface, e.g. `http://127.0.0.1:8123`. Default `""`: ClickHouse is off.
    pub url: String,
    /// Database, created if missing. Default `guardian`.
    pub database: String,
    /// User. Default `default`.
    pub user: String,
    /// Password. Default empty. Never logged.
    pub password: String,
    /// `""` (default): one server. Otherwise the cluster name from `<remote_servers>`: see
    /// the module documentation for what cluster mode creates and needs.
    pub cluster: String,
    /// Days of raw rows to keep. Default 30.
    pub raw_retention_days: u32,
    /// Days of 1-minute rollups to keep. Default 180.
    pub rollup_1m_retention_days: u32,
    /// Days of 1-hour rollups to keep. Default 730.
    pub rollup_1h_retention_days: u32,
    /// The sink inserts once this many rows wait. Default 50 000.
    pub insert_max_rows: usize,
    /// The sink inserts once the oldest waiting row is this old, milliseconds. Default 1000.
    pub insert_max_delay_ms: u64,
    /// Committed batches (outbox blobs, `store::outbox::blob`) kept in memory for the sink so it
    /// need not read them back from the outbox; 0 turns that off. Default 256 MiB: about
    /// 17 s of 100 000 host samples/s, enough to ride out a ClickHouse pause without the
    /// dearer read-back.
    pub handoff_max_bytes: u64,
    /// Limit on one request, milliseconds. Default 10 000.
    pub request_timeout_ms: u64,
    /// `auto` (default): LZ4 over the network, none to a loopback address (where it only
    /// costs CPU); `lz4`; or `none`.
    pub compression: String,
}

impl Default for ClickHouseSettings {
    fn default() -> Self {
        Self {
            url: String::new(),
            database: "guardian".into(),
            user: "default".into(),
            password: String::new(),
            cluster: String::new(),
            raw_retention_days: 30,
            rollup_1m_retention_days: 180,
            rollup_1h_retention_days: 730,
            insert_max_rows: 50_000,
            insert_max_delay_ms: 1_000,
            handoff_max_bytes: 256 << 20,
            request_timeout_ms: 10_000,
            compression: "auto".into(),
        }
    }
}

impl ClickHouseSettings {
    /// Whether ClickHouse is configured (a non-empty `url`).
    pub fn enabled(&self) -> bool {
        !self.url.is_empty()
    }

    /// Checks the settings when ClickHouse is enabled (nothing to check when it is off).
    ///
    /// # Errors
    /// A message naming the field and the fix.
    pub fn validate(&self) -> Result<(), String> {
        if !self.enabled() {
            return Ok(());
        }
        if self.url.starts_with("https://") {
            return Err(format!(
                "clickhouse.url {:?}: https is not built into this server; use http:// (on a \
                 private network, or through a local TLS-terminating proxy)",
                redact(&self.url)
            ));
        }
        if !self.url.starts_with("http://") || self.url.len() <= "http://".len() {
            return Err(format!(
                "clickhouse.url {:?} must start with http:// and name a host, e.g. \
                 http://127.0.0.1:8123",
                redact(&self.url)
            ));
        }
        if !is_identifier(&self.database) {
            return Err(format!(
                "clickhouse.database {:?} must be a plain name (letters, digits, _; not \
                 starting with a digit), e.g. guardian",
                self.database
            ));
        }
        if self.user.is_empty() {
            return Err(
                "clickhouse.user must not be empty; use default for the built-in user".into(),
            );
        }
        if !self.cluster.is_empty() && !is_identifier(&self.cluster) {
            return Err(format!(
                "clickhouse.cluster {:?} must be empty (one server) or a cluster name from \
                 <remote_servers> (letters, digits, _)",
                self.cluster
            ));
        }
        for (field, days) in [
            ("raw_retention_days", self.raw_retention_days),
            ("rollup_1m_retention_days", self.rollup_1m_retention_days),
            ("rollup_1h_retention_days", self.rollup_1h_retention_days),
        ] {
            if days == 0 {
                return Err(format!(
                    "clickhouse.{field} must be at least 1 (days to keep); use a large number to keep data longer"
                ));
            }
        }
        if self.insert_max_rows == 0 {
            return Err("clickhouse.insert_max_rows must be at least 1 (default 50000)".into());
        }
        if self.insert_max_delay_ms == 0 {
            return Err("clickhouse.insert_max_delay_ms must be at least 1 (default 1000)".into());
        }
        if self.request_timeout_ms < 100 {
            return Err(format!(
                "clickhouse.request_timeout_ms {} is too short; use at least 100 (default 10000)",
                self.request_timeout_ms
            ));
        }
        if !matches!(self.compression.as_str(), "auto" | "lz4" | "none") {
            return Err(format!(
                "clickhouse.compression {:?} must be auto (LZ4 unless the server is on a \
                 loopback address), lz4 or none",
                self.compression
            ));
        }
        Ok(())
    }

    /// Whether requests are LZ4-compressed (see `compression`).
    pub fn lz4(&self) -> bool {
        match self.compression.as_str() {
            "none" => false,
            "auto" => !is_loopback_url(&self.url),
            _ => true,
        }
    }
}

/// Whether an `http://` URL names a loopback host (`localhost`, 127.0.0.0/8, `::1`).
fn is_loopback_url(url: &str) -> bool {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let authority = rest.split('/').next().unwrap_or_default();
    let host_port = authority.rsplit('@').next().unwrap_or_default();
    let host = if let Some(bracketed) = host_port.strip_prefix('[') {
        bracketed.split(']').next().unwrap_or_default()
    } else {
        host_port.split(':').next().unwrap_or_default()
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `[A-Za-z_][A-Za-z0-9_]*`: safe to write into SQL unquoted.
fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Why a ClickHouse call failed. Messages name the server (password removed), never data.
#[derive(Debug, thiserror::Error)]
pub enum ClickHouseError {
    /// The settings are invalid (see [`ClickHouseSettings::validate`]).
    #[error("invalid ClickHouse settings: {0}")]
    Settings(String),
    /// No connection or a broken one.
    #[error("ClickHouse at {url} is unreachable while trying to {what}: {source}")]
    Unreachable {
        /// Server URL, password removed.
        url: String,
        /// The operation.
        what: &'static str,
        /// The client's error.
        source: ChError,
    },
    /// No answer within `request_timeout_ms`.
    #[error("ClickHouse at {url} did not answer within {timeout_ms} ms while trying to {what}")]
    Timeout {
        /// Server URL, password removed.
        url: String,
        /// The operation.
        what: &'static str,
        /// The limit.
        timeout_ms: u64,
    },
    /// The server refused the statement (its message is included).
    #[error("ClickHouse at {url} refused to {what}: {source}")]
    Server {
        /// Server URL, password removed.
        url: String,
        /// The operation.
        what: &'static str,
        /// The client's error, with the server's message.
        source: ChError,
    },
    /// An answer did not match the expected row shape (schema drift).
    #[error("ClickHouse at {url} answered in an unexpected shape while trying to {what}: {source}")]
    Decode {
        /// Server URL, password removed.
        url: String,
        /// The operation.
        what: &'static str,
        /// The client's error.
        source: ChError,
    },
    /// A schema migration failed; later ones were not tried.
    #[error("ClickHouse at {url}: migration {version} ({name}) failed: {source}{hint}")]
    Migration {
        /// Server URL, password removed.
        url: String,
        /// Migration version.
        version: u32,
        /// Migration name.
        name: &'static str,
        /// What failed.
        source: Box<ClickHouseError>,
        /// How to get past a failure the store cannot mend itself ("" when none is known).
        hint: &'static str,
    },
    /// A request this store cannot serve (unknown metric or source).
    #[error("invalid ClickHouse request: {0}")]
    Request(String),
    /// A batch of the chunk to insert does not decode (nothing of the chunk was sent).
    #[error("outbox batch {outbox_id} of node {node} does not decode: {source}")]
    Outbox {
        /// The node.
        node: String,
        /// The batch's outbox id.
        outbox_id: u64,
        /// The decode error.
        source: crate::batch::DecodeError,
    },
}

impl ClickHouseError {
    /// A bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Settings(_) => "settings",
            Self::Unreachable { .. } => "unreachable",
            Self::Timeout { .. } => "timeout",
            Self::Server { .. } => "server",
            Self::Decode { .. } => "decode",
            Self::Migration { .. } => "migration",
            Self::Request(_) => "request",
            Self::Outbox { .. } => "corrupt",
        }
    }
}

/// A connection to the ClickHouse store (cheap to clone; clones share the HTTP pool).
#[derive(Clone)]
pub struct ClickHouseStore {
    client: Client,
    settings: ClickHouseSettings,
    url: String,
    version: String,
    ttl: bool,
}

impl std::fmt::Debug for ClickHouseStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClickHouseStore")
            .field("url", &self.url)
            .field("database", &self.settings.database)
            .field("cluster", &self.settings.cluster)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// What an operator can do about a migration error the store cannot mend by retrying.
fn migration_hint(error: &str) -> &'static str {
    // Code 253 (REPLICA_IS_ALREADY_EXIST): a server was stopped while it created a Replicated
    // table; ZooKeeper registered the replica, the server never wrote the table, and every
    // retry of the CREATE meets the registration.
    if error.contains("Code: 253") {
        " (a ClickHouse server was stopped while it created this table: ZooKeeper holds its \
         replica, the server has no table. Remove that replica's ZooKeeper path named above, \
         e.g. `zkCli.sh deleteall /clickhouse/tables/02/guardian/host_samples_local/replicas/r3`, \
         and guardian-server creates the table again on its next try)"
    } else {
        ""
    }
}

impl ClickHouseStore {
    /// Connects, creates the database if missing and applies pending migrations in order,
    /// each recorded in `schema_migrations`.
    ///
    /// # Errors
    /// [`ClickHouseError::Settings`] for invalid settings; [`ClickHouseError::Migration`]
    /// when a migration fails (earlier ones stay applied, later ones are not tried); any
    /// other variant when the server cannot be reached or refuses.
    pub async fn open(settings: &ClickHouseSettings) -> Result<Self, ClickHouseError> {
        settings.validate().map_err(ClickHouseError::Settings)?;
        if !settings.enabled() {
            return Err(ClickHouseError::Settings(
                "clickhouse.url is empty: ClickHouse is off".into(),
            ));
        }
        let base = Client::default()
            .with_url(settings.url.as_str())
            .with_user(settings.user.as_str())
            .with_password(settings.password.as_str())
            .with_compression(if settings.lz4() {
                Compression::Lz4
            } else {
                Compression::None
            })
            .with_validation(false);
        let mut store = Self {
            client: base.clone(),
            settings: settings.clone(),
            url: redact(&settings.url),
            version: String::new(),
            ttl: false,
        };
        store.version = store
            .run(
                "read the server version",
                store.client.query("SELECT version()").fetch_one::<String>(),
            )
            .await?;
        store.ttl = supports_ttl(&store.version);
        for statement in bootstrap(settings) {
            store.ddl("create the database", &statement).await?;
        }
        store.client = base.with_database(settings.database.as_str());

        let applied: BTreeSet<u32> = store
            .run(
                "read schema_migrations",
                store
                    .client
                    .query("SELECT DISTINCT version FROM schema_migrations")
                    .fetch_all::<u32>(),
            )
            .await?
            .into_iter()
            .collect();
        for migration in migrations(settings, store.ttl) {
            if applied.contains(&migration.version) {
                continue;
            }
            store
                .apply(&migration)
                .await
                .map_err(|source| ClickHouseError::Migration {
                    url: store.url.clone(),
                    version: migration.version,
                    name: migration.name,
                    hint: migration_hint(&source.to_string()),
                    source: Box::new(source),
                })?;
            tracing::info!(
                version = migration.version,
                name = migration.name,
                server = %store.url,
                "ClickHouseMigrationApplied"
            );
        }
        Ok(store)
    }

    /// A read whose answer must include every row acknowledged so far. In a cluster a
    /// Distributed read asks one replica per shard; a replica more than a second behind (one
    /// restarted after a crash reports a huge delay until it rejoins) is skipped, and when
    /// every replica of a shard is behind the read fails and is retried, rather than answer
    /// "not stored" for rows that are.
    pub(super) fn exact_query(&self, sql: &str) -> ::clickhouse::query::Query {
        let query = self.client.query(sql);
        if self.settings.cluster.is_empty() {
            return query;
        }
        query
            .with_setting("max_replica_delay_for_distributed_queries", "1")
            .with_setting("fallback_to_stale_replicas_for_distributed_queries", "0")
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.settings.request_timeout_ms)
    }

    async fn run<T>(
        &self,
        what: &'static str,
        call: impl Future<Output = Result<T, ChError>>,
    ) -> Result<T, ClickHouseError> {
        self.run_for(what, self.timeout(), call).await
    }

    async fn run_for<T>(
        &self,
        what: &'static str,
        limit: Duration,
        call: impl Future<Output = Result<T, ChError>>,
    ) -> Result<T, ClickHouseError> {
        match tokio::time::timeout(limit, call).await {
            Ok(result) => result.map_err(|e| self.error(what, e)),
            Err(_) => Err(ClickHouseError::Timeout {
                url: self.url.clone(),
                what,
                timeout_ms: u64::try_from(limit.as_millis()).unwrap_or(u64::MAX),
            }),
        }
    }

    fn error(&self, what: &'static str, source: ChError) -> ClickHouseError {
        let url = self.url.clone();
        match source {
            ChError::TimedOut => ClickHouseError::Timeout {
                url,
                what,
                timeout_ms: self.settings.request_timeout_ms,
            },
            ChError::Network(_) | ChError::Other(_) => {
                ClickHouseError::Unreachable { url, what, source }
            }
            ChError::BadResponse(_) => ClickHouseError::Server { url, what, source },
            _ => ClickHouseError::Decode { url, what, source },
        }
    }

    /// The server's `version()`, e.g. `18.16.1`.
    pub fn server_version(&self) -> &str {
        &self.version
    }

    /// Whether the tables were created with `TTL` (server >= 19.6).
    pub fn supports_ttl(&self) -> bool {
        self.ttl
    }

    /// One round trip.
    ///
    /// # Errors
    /// When the server does not answer.
    pub async fn ping(&self) -> Result<(), ClickHouseError> {
        self.run("ping", self.client.query("SELECT 1").fetch_one::<u8>())
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn single() -> ClickHouseSettings {
        ClickHouseSettings {
            url: "http://127.0.0.1:8123".into(),
            ..ClickHouseSettings::default()
        }
    }

    pub(super) fn cluster() -> ClickHouseSettings {
        ClickHouseSettings {
            cluster: "fleet".into(),
            ..single()
        }
    }

    #[test]
    fn settings_are_checked_only_when_enabled_and_name_the_field() {
        assert!(!ClickHouseSettings::default().enabled());
        assert_eq!(ClickHouseSettings::default().validate(), Ok(()));
        assert_eq!(single().validate(), Ok(()));
        assert_eq!(cluster().validate(), Ok(()));
        let bad = |s: ClickHouseSettings, field: &str| {
            let message = s.validate().expect_err(field);
            assert!(message.contains(field), "{message:?} does not name {field}");
        };
        bad(
            ClickHouseSettings {
                url: "127.0.0.1:8123".into(),
                ..single()
            },
            "clickhouse.url",
        );
        bad(
            ClickHouseSettings {
                url: "https://u:secret@h:8443".into(),
                ..single()
            },
            "clickhouse.url",
        );
        assert!(
            !ClickHouseSettings {
                url: "https://u:secret@h:8443".into(),
                ..single()
            }
            .validate()
            .err()
            .unwrap_or_default()
            .contains("secret")
        );
        bad(
            ClickHouseSettings {
                database: "guardian; DROP".into(),
                ..single()
            },
            "clickhouse.database",
        );
        bad(
            ClickHouseSettings {
                cluster: "a-b".into(),
                ..single()
            },
            "clickhouse.cluster",
        );
        bad(
            ClickHouseSettings {
                raw_retention_days: 0,
                ..single()
            },
            "clickhouse.raw_retention_days",
        );
        bad(
            ClickHouseSettings {
                request_timeout_ms: 5,
                ..single()
            },
            "clickhouse.request_timeout_ms",
        );
        bad(
            ClickHouseSettings {
                insert_max_rows: 0,
                ..single()
            },
            "clickhouse.insert_max_rows",
        );
        bad(
            ClickHouseSettings {
                compression: "zstd".into(),
                ..single()
            },
            "clickhouse.compression",
        );
    }

    #[test]
    fn compression_is_lz4_except_to_a_loopback_server_unless_chosen() {
        let with = |url: &str, compression: &str| ClickHouseSettings {
            url: url.into(),
            compression: compression.into(),
            ..ClickHouseSettings::default()
        };
        for url in [
            "http://127.0.0.1:8123",
            "http://127.3.2.1",
            "http://localhost:8123/",
            "http://user:pw@LOCALHOST:8123",
            "http://[::1]:8123",
        ] {
            assert!(!with(url, "auto").lz4(), "{url}");
            assert!(with(url, "lz4").lz4(), "{url}");
        }
        for url in [
            "http://10.0.0.5:8123",
            "http://ch.internal:8123",
            "http://localhost.example.com",
            "http://[2001:db8::1]:8123",
            "http://127.0.0.1@ch:8123",
        ] {
            assert!(with(url, "auto").lz4(), "{url}");
            assert!(!with(url, "none").lz4(), "{url}");
        }
    }

    #[test]
    fn settings_parse_from_toml_with_defaults_and_refuse_unknown_keys() {
        let parsed: ClickHouseSettings =
            toml::from_str("url = \"http://ch:8123\"\ncluster = \"fleet\"\n").expect("parses");
        assert_eq!(parsed.database, "guardian");
        assert_eq!(parsed.raw_retention_days, 30);
        assert_eq!(parsed.cluster, "fleet");
        assert!(toml::from_str::<ClickHouseSettings>("ulr = \"x\"").is_err());
    }

    #[test]
    fn error_kinds_are_bounded_labels() {
        let e = ClickHouseError::Timeout {
            url: "http://h:8123".into(),
            what: "ping",
            timeout_ms: 10,
        };
        assert_eq!(e.kind(), "timeout");
        assert!(e.to_string().contains("http://h:8123"));
        assert_eq!(ClickHouseError::Request("x".into()).kind(), "request");
    }
}
