//! The ClickHouse schema: the bootstrap DDL, numbered migrations (single server or cluster,
//! TTL where the server supports it), applying them, and retention by dropping partitions.

use std::time::Duration;

use super::rows::{COMMON_COLUMNS, datetime, value_columns};
use super::{ClickHouseError, ClickHouseSettings, ClickHouseStore};
use crate::store::telemetry::{Table, metrics_of};

/// The raw tables, in insert order.
pub(super) const RAW_TABLES: [&str; 5] = [
    "host_samples",
    "chain_samples",
    "gpu_samples",
    "keystore_samples",
    "unavailable_samples",
];

/// One schema change: statements run in order, then recorded in `schema_migrations`.
#[derive(Debug, Clone, PartialEq)]
pub struct Migration {
    /// Applied in increasing order, never reused.
    pub version: u32,
    /// What it does.
    pub name: &'static str,
    /// The DDL (each statement idempotent: `IF NOT EXISTS`).
    pub statements: Vec<String>,
}

// ------------------------------------------------------------------ rows

/// Writes DDL for one server or a cluster.
pub(super) struct Ddl<'a> {
    db: &'a str,
    cluster: &'a str,
}

/// How one data table is laid out.
pub(super) struct TableSpec<'a> {
    name: &'a str,
    columns: Vec<(&'a str, &'a str)>,
    aggregating: bool,
    partition_by: &'a str,
    order_by: &'a str,
    ttl: Option<String>,
}

impl Ddl<'_> {
    fn on_cluster(&self) -> String {
        if self.cluster.is_empty() {
            String::new()
        } else {
            format!(" ON CLUSTER {}", self.cluster)
        }
    }

    /// The table that holds the rows on a server: `X` alone, `X_local` in a cluster.
    fn local(&self, name: &str) -> String {
        if self.cluster.is_empty() {
            name.to_owned()
        } else {
            format!("{name}_local")
        }
    }

    /// `CREATE TABLE` for the storage table, plus the Distributed table in a cluster.
    fn table(&self, spec: &TableSpec<'_>) -> Vec<String> {
        let local = self.local(spec.name);
        let kind = if spec.aggregating {
            "AggregatingMergeTree"
        } else {
            "MergeTree"
        };
        let engine = if self.cluster.is_empty() {
            kind.to_owned()
        } else {
            format!(
                "Replicated{kind}('/clickhouse/tables/{{shard}}/{db}/{local}', '{{replica}}')",
                db = self.db
            )
        };
        let columns = spec
            .columns
            .iter()
            .map(|(name, ty)| format!("{name} {ty}"))
            .collect::<Vec<_>>()
            .join(", ");
        let ttl = spec
            .ttl
            .as_ref()
            .map(|t| format!(" TTL {t}"))
            .unwrap_or_default();
        let mut statements = vec![format!(
            "CREATE TABLE IF NOT EXISTS {db}.{local}{on} ({columns}) ENGINE = {engine} \
             PARTITION BY {partition} ORDER BY ({order}){ttl}",
            db = self.db,
            on = self.on_cluster(),
            partition = spec.partition_by,
            order = spec.order_by,
        )];
        if !self.cluster.is_empty() {
            statements.push(format!(
                "CREATE TABLE IF NOT EXISTS {db}.{name}{on} AS {db}.{local} \
                 ENGINE = Distributed({cluster}, {db}, {local}, cityHash64(node_id))",
                db = self.db,
                name = spec.name,
                on = self.on_cluster(),
                cluster = self.cluster,
            ));
        }
        statements
    }
}

/// `CREATE DATABASE` and `schema_migrations`: what must exist before migrations are read.
pub(super) fn bootstrap(settings: &ClickHouseSettings) -> Vec<String> {
    let ddl = Ddl {
        db: &settings.database,
        cluster: &settings.cluster,
    };
    let engine = if settings.cluster.is_empty() {
        "MergeTree".to_owned()
    } else {
        // One copy on every server of the cluster (not per shard).
        format!(
            "ReplicatedMergeTree('/clickhouse/tables/all/{}/schema_migrations', '{{replica}}')",
            settings.database
        )
    };
    vec![
        format!(
            "CREATE DATABASE IF NOT EXISTS {}{}",
            settings.database,
            ddl.on_cluster()
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {}.schema_migrations{} (version UInt32, name String, \
             applied_at DateTime) ENGINE = {engine} ORDER BY version",
            settings.database,
            ddl.on_cluster()
        ),
    ]
}

/// The rollup tables and how each buckets time.
pub(super) const ROLLUPS: [(&str, &str); 2] = [
    ("rollup_1m", "toStartOfMinute"),
    ("rollup_1h", "toStartOfHour"),
];

/// The raw tables whose metrics the rollups aggregate.
pub(super) const ROLLED_UP: [Table; 3] = [Table::Host, Table::Chain, Table::Gpu];

/// What a rollup view computes from `source` (one row per node, metric and `bucket` of time),
/// rows limited by `filter` (a `WHERE` clause, or ""). The views and the rollup repair
/// ([`super::repair`]) share it, so a repaired bucket holds what the view would have written.
pub(super) fn rollup_select(table: Table, bucket: &str, source: &str, filter: &str) -> String {
    let names = metrics_of(table)
        .map(|m| format!("'{}'", m.name))
        .collect::<Vec<_>>()
        .join(", ");
    let values = metrics_of(table)
        .map(|m| format!("toFloat64({})", m.name))
        .collect::<Vec<_>>()
        .join(", ");
    let filter = if filter.is_empty() {
        String::new()
    } else {
        format!("{filter} ")
    };
    format!(
        "SELECT node_id, metric, {bucket}(ts) AS t, avgState(value) AS avg_state, \
         minState(value) AS min_state, maxState(value) AS max_state, \
         countState() AS count_state \
         FROM {source} ARRAY JOIN [{names}] AS metric, [{values}] AS value \
         {filter}GROUP BY node_id, metric, t"
    )
}

/// The schema, as versioned migrations. `supports_ttl` adds `TTL` clauses (servers >= 19.6).
pub fn migrations(settings: &ClickHouseSettings, supports_ttl: bool) -> Vec<Migration> {
    let ddl = Ddl {
        db: &settings.database,
        cluster: &settings.cluster,
    };
    let ttl =
        |column: &str, days: u32| supports_ttl.then(|| format!("{column} + INTERVAL {days} DAY"));

    let mut raw = Vec::new();
    for table in RAW_TABLES {
        let columns = COMMON_COLUMNS
            .iter()
            .chain(value_columns(table))
            .copied()
            .collect();
        raw.extend(ddl.table(&TableSpec {
            name: table,
            columns,
            aggregating: false,
            partition_by: "toYYYYMMDD(ts)",
            order_by: "node_id, ts",
            ttl: ttl("ts", settings.raw_retention_days),
        }));
    }

    let mut rollups = Vec::new();
    for (rollup, bucket) in ROLLUPS {
        let days = if rollup == "rollup_1m" {
            settings.rollup_1m_retention_days
        } else {
            settings.rollup_1h_retention_days
        };
        rollups.extend(ddl.table(&TableSpec {
            name: rollup,
            columns: vec![
                ("node_id", "String"),
                ("metric", "String"),
                ("t", "DateTime"),
                ("avg_state", "AggregateFunction(avg, Float64)"),
                ("min_state", "AggregateFunction(min, Float64)"),
                ("max_state", "AggregateFunction(max, Float64)"),
                ("count_state", "AggregateFunction(count)"),
            ],
            aggregating: true,
            partition_by: "toYYYYMM(t)",
            order_by: "node_id, metric, t",
            ttl: ttl("t", days),
        }));
        for table in ROLLED_UP {
            rollups.push(format!(
                "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.mv_{raw}_{rollup}{on} TO {db}.{target} AS {select}",
                db = settings.database,
                raw = table.name(),
                on = ddl.on_cluster(),
                target = ddl.local(rollup),
                select = rollup_select(
                    table,
                    bucket,
                    &format!("{}.{}", settings.database, ddl.local(table.name())),
                    ""
                ),
            ));
        }
    }

    let mut reconciler = Vec::new();
    for (name, columns, order_by) in [
        (
            "findings",
            vec![
                ("at", "DateTime"),
                ("node_id", "String"),
                ("network", "String"),
                ("detector", "String"),
                ("severity", "String"),
                ("score", "Float64"),
                ("evidence", "String"),
            ],
            "node_id, at",
        ),
        (
            "actions",
            vec![
                ("at", "DateTime"),
                ("node_id", "String"),
                ("command_id", "String"),
                ("action", "String"),
                ("parameters", "String"),
                ("phase", "String"),
                ("dry_run", "UInt8"),
                ("outcome", "String"),
                ("detail", "String"),
            ],
            "node_id, at",
        ),
        (
            "audit",
            vec![
                ("seq", "UInt64"),
                ("at", "DateTime"),
                ("kind", "String"),
                ("node_id", "String"),
                ("body", "String"),
                ("prev_hash", "String"),
                ("hash", "String"),
            ],
            "seq",
        ),
    ] {
        reconciler.extend(ddl.table(&TableSpec {
            name,
            columns,
            aggregating: false,
            partition_by: "toYYYYMM(at)",
            order_by,
            ttl: None,
        }));
    }

    vec![
        Migration {
            version: 1,
            name: "raw sample tables",
            statements: raw,
        },
        Migration {
            version: 2,
            name: "1-minute and 1-hour rollups with their materialized views",
            statements: rollups,
        },
        Migration {
            version: 3,
            name: "findings, actions and audit tables",
            statements: reconciler,
        },
    ]
}

/// `major.minor` of a `version()` string such as `18.16.1`.
pub(super) fn supports_ttl(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= (19, 6)
}

// ------------------------------------------------------------------ store

impl ClickHouseStore {
    pub(super) async fn apply(&self, migration: &Migration) -> Result<(), ClickHouseError> {
        for statement in &migration.statements {
            self.ddl("apply a migration", statement).await?;
        }
        let record = self
            .client
            .query("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, now())")
            .bind(migration.version)
            .bind(migration.name);
        self.run("record a migration", record.execute()).await
    }

    /// Runs one DDL statement. `ON CLUSTER` statements wait for every server, up to the
    /// server's `distributed_ddl_task_timeout` (180 s by default).
    pub(super) async fn ddl(
        &self,
        what: &'static str,
        statement: &str,
    ) -> Result<(), ClickHouseError> {
        let limit = if self.settings.cluster.is_empty() {
            self.timeout()
        } else {
            self.timeout().max(Duration::from_secs(190))
        };
        self.run_for(what, limit, self.client.query_raw(statement).execute())
            .await
    }

    /// Drops every partition whose newest row is older than its table's retention at
    /// `now_unix_ms`. Returns the `table:partition_id` pairs dropped.
    ///
    /// In a cluster, one replica of each shard runs the drop and the others apply it from
    /// the replication log moments later (`SYSTEM SYNC REPLICA` waits for that).
    ///
    /// # Errors
    /// When a query or a drop fails (partitions dropped before it stay dropped).
    pub async fn drop_expired(&self, now_unix_ms: i64) -> Result<Vec<String>, ClickHouseError> {
        let ddl = Ddl {
            db: &self.settings.database,
            cluster: &self.settings.cluster,
        };
        let mut plan: Vec<(&str, u32)> = RAW_TABLES
            .iter()
            .map(|t| (*t, self.settings.raw_retention_days))
            .collect();
        plan.push(("rollup_1m", self.settings.rollup_1m_retention_days));
        plan.push(("rollup_1h", self.settings.rollup_1h_retention_days));
        let now_s = now_unix_ms.div_euclid(1000);
        let mut dropped = Vec::new();
        for (table, days) in plan {
            let cutoff = datetime((now_s - i64::from(days) * 86_400) * 1000);
            let local = ddl.local(table);
            // In a cluster, every shard's parts: one shard may hold a day the others lack.
            let parts = if self.settings.cluster.is_empty() {
                "system.parts".to_owned()
            } else {
                format!("cluster({}, system, parts)", self.settings.cluster)
            };
            let partitions = self
                .run(
                    "list expired partitions",
                    self.client
                        .query(&format!(
                            "SELECT partition_id FROM {parts} \
                             WHERE database = ? AND table = ? AND active \
                             GROUP BY partition_id HAVING max(max_time) < toDateTime(?) \
                             ORDER BY partition_id"
                        ))
                        .bind(self.settings.database.as_str())
                        .bind(local.as_str())
                        .bind(cutoff)
                        .fetch_all::<String>(),
                )
                .await?;
            for id in partitions {
                let sql = format!(
                    "ALTER TABLE {db}.{local}{on} DROP PARTITION ID '{id}'",
                    db = self.settings.database,
                    on = ddl.on_cluster(),
                    id = id.replace(['\'', '\\'], ""),
                );
                self.ddl("drop an expired partition", &sql).await?;
                tracing::info!(table, partition = %id, "ClickHousePartitionDropped");
                dropped.push(format!("{table}:{id}"));
            }
        }
        Ok(dropped)
    }
}

#[cfg(test)]
mod tests {
    use ::clickhouse::Row;

    use super::super::rows::*;
    use super::*;
    use crate::store::clickhouse::tests::{cluster, single};
    use crate::store::telemetry::METRICS;

    fn all_statements(settings: &ClickHouseSettings, ttl: bool) -> Vec<String> {
        let mut all = bootstrap(settings);
        all.extend(
            migrations(settings, ttl)
                .into_iter()
                .flat_map(|m| m.statements),
        );
        all
    }

    #[test]
    fn migrations_are_numbered_in_order_and_cover_every_table() {
        let list = migrations(&single(), false);
        let versions: Vec<u32> = list.iter().map(|m| m.version).collect();
        assert_eq!(versions, vec![1, 2, 3]);
        let text = all_statements(&single(), false).join("\n");
        for table in
            RAW_TABLES
                .iter()
                .chain(&["rollup_1m", "rollup_1h", "findings", "actions", "audit"])
        {
            assert!(
                text.contains(&format!("CREATE TABLE IF NOT EXISTS guardian.{table} (")),
                "{table} missing"
            );
        }
        // One view per (table with metrics, rollup).
        assert_eq!(text.matches("CREATE MATERIALIZED VIEW").count(), 6);
        assert!(!text.contains("ON CLUSTER"));
        assert!(!text.contains("Replicated"));
        assert!(!text.contains("Distributed"));
    }

    #[test]
    fn every_cluster_statement_runs_on_the_cluster_with_replicated_local_tables() {
        let statements = all_statements(&cluster(), false);
        for s in &statements {
            assert!(
                s.contains(" ON CLUSTER fleet ") || s.ends_with(" ON CLUSTER fleet"),
                "no ON CLUSTER: {s}"
            );
        }
        let text = statements.join("\n");
        for table in RAW_TABLES.iter().chain(&["findings", "actions", "audit"]) {
            assert!(text.contains(&format!(
                "CREATE TABLE IF NOT EXISTS guardian.{table}_local ON CLUSTER fleet ("
            )));
            assert!(text.contains(&format!(
                "ENGINE = ReplicatedMergeTree('/clickhouse/tables/{{shard}}/guardian/{table}_local', '{{replica}}')"
            )));
            assert!(text.contains(&format!(
                "CREATE TABLE IF NOT EXISTS guardian.{table} ON CLUSTER fleet AS guardian.{table}_local \
                 ENGINE = Distributed(fleet, guardian, {table}_local, cityHash64(node_id))"
            )));
        }
        for rollup in ["rollup_1m", "rollup_1h"] {
            assert!(text.contains(&format!(
                "ENGINE = ReplicatedAggregatingMergeTree('/clickhouse/tables/{{shard}}/guardian/{rollup}_local', '{{replica}}')"
            )));
            assert!(text.contains(&format!(
                "Distributed(fleet, guardian, {rollup}_local, cityHash64(node_id))"
            )));
            for raw in ["host_samples", "chain_samples", "gpu_samples"] {
                assert!(text.contains(&format!(
                    "mv_{raw}_{rollup} ON CLUSTER fleet TO guardian.{rollup}_local AS"
                )));
                assert!(text.contains(&format!("FROM guardian.{raw}_local ARRAY JOIN")));
            }
        }
        assert!(
            text.contains(
                "ReplicatedMergeTree('/clickhouse/tables/all/guardian/schema_migrations'"
            )
        );
        // Views never read or write the Distributed tables.
        assert!(!text.contains("TO guardian.rollup_1m AS"));
    }

    #[test]
    fn ttl_only_when_the_server_supports_it() {
        for settings in [single(), cluster()] {
            assert!(!all_statements(&settings, false).join("\n").contains("TTL"));
            let with = all_statements(&settings, true).join("\n");
            assert_eq!(with.matches(" TTL ts + INTERVAL 30 DAY").count(), 5);
            assert_eq!(with.matches(" TTL t + INTERVAL 180 DAY").count(), 1);
            assert_eq!(with.matches(" TTL t + INTERVAL 730 DAY").count(), 1);
            assert!(
                !with.contains("TTL at"),
                "reconciler tables keep everything"
            );
        }
        assert!(!supports_ttl("18.16.1"));
        assert!(!supports_ttl("19.5.3.8"));
        assert!(supports_ttl("19.6.2.11"));
        assert!(supports_ttl("24.3.1"));
    }

    #[test]
    fn views_unpivot_every_catalogue_metric_and_rows_match_the_ddl() {
        let text = migrations(&single(), false)[1].statements.join("\n");
        for def in METRICS {
            assert!(text.contains(&format!("'{}'", def.name)));
            assert!(text.contains(&format!("toFloat64({})", def.name)));
            let columns = value_columns(def.table.name());
            assert!(
                columns.iter().any(|(c, _)| *c == def.name),
                "{} has no column",
                def.name
            );
        }
        let names = |cols: &[(&str, &str)]| -> Vec<String> {
            COMMON_COLUMNS
                .iter()
                .chain(cols)
                .map(|(n, _)| (*n).to_owned())
                .collect()
        };
        let fields = |f: &[&str]| -> Vec<String> { f.iter().map(|s| (*s).to_owned()).collect() };
        assert_eq!(
            fields(<HostRow<'_> as Row>::COLUMN_NAMES),
            names(HOST_COLUMNS)
        );
        assert_eq!(
            fields(<ChainRow<'_> as Row>::COLUMN_NAMES),
            names(CHAIN_COLUMNS)
        );
        assert_eq!(
            fields(<GpuRow<'_> as Row>::COLUMN_NAMES),
            names(GPU_COLUMNS)
        );
        assert_eq!(
            fields(<KeystoreRow<'_> as Row>::COLUMN_NAMES),
            names(KEYSTORE_COLUMNS)
        );
        let recent = |cols: &[(&str, &str)]| -> Vec<String> {
            ["node_id", "ts_ms"]
                .iter()
                .copied()
                .chain(cols.iter().map(|(n, _)| *n))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(
            fields(<HostRecent as Row>::COLUMN_NAMES),
            recent(HOST_COLUMNS)
        );
        assert_eq!(
            fields(<ChainRecent as Row>::COLUMN_NAMES),
            recent(CHAIN_COLUMNS)
        );
        assert_eq!(
            fields(<UnavailableRow<'_> as Row>::COLUMN_NAMES),
            names(UNAVAILABLE_COLUMNS)
        );
    }
}
