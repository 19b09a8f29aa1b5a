//! The Grafana dashboards of deploy/grafana/ without a Grafana: every ClickHouse panel's query
//! (and template variable query) is taken from the dashboard JSON, its macros expanded the way
//! the grafana-clickhouse-datasource plugin documents them, and run against a real ClickHouse
//! (Debian's 18.16) holding the schema the server makes and six hours of test samples. Each
//! must return rows, a time series with a DateTime first column and numeric values. The
//! Prometheus dashboard's queries run in a real Prometheus in tests/tests/prometheus.rs.

use std::path::PathBuf;

use guardian_server::store::clickhouse::{ClickHouseSettings, ClickHouseStore};
use guardian_tests::clickhouse::ClickHouse;
use serde_json::Value;

const NODES: [&str; 2] = ["val-a", "val-b"];

/// The plugin's macros and this dashboard's variables, for the range `from..to` (Unix s).
fn expand(sql: &str, from: i64, to: i64, interval_s: i64) -> String {
    let mut out = sql
        .replace(
            "${node:singlequote}",
            &NODES.map(|n| format!("'{n}'")).join(","),
        )
        .replace("${node}", NODES[0])
        .replace("$__fromTime", &format!("toDateTime({from})"))
        .replace("$__toTime", &format!("toDateTime({to})"))
        .replace("$__interval_s", &interval_s.to_string());
    // Buckets are `toDateTime(intDiv(toUInt32(t), $__interval_s) * $__interval_s)`, not the
    // plugin's `$__timeInterval` (toStartOfInterval, which ClickHouse 18.16 lacks).
    while let Some(start) = out.find("$__timeFilter(") {
        let open = start + "$__timeFilter(".len();
        let close = open + out[open..].find(')').expect("macro closes");
        let column = out[open..close].trim().to_owned();
        let text = format!("{column} >= toDateTime({from}) AND {column} <= toDateTime({to})");
        out.replace_range(start..=close, &text);
    }
    assert!(!out.contains('$'), "a macro or variable left: {out}");
    out
}

/// Rows of test data: six hours, one sample a minute per node, with a lag spike on val-a.
fn seed(clickhouse: &ClickHouse) -> anyhow::Result<()> {
    let common = "node_id, network, ts, ts_ms, seq, idx, outbox_id, received_at";
    let source = |values: &str| {
        format!(
            "SELECT ['val-a', 'val-b'][(number % 2) + 1] AS node_id, 'finney', toDateTime(now() - 21600 + intDiv(number, 2) * 60) AS ts, \
             toInt64(toUInt32(ts)) * 1000, intDiv(number, 2) + 1, 0, number + 1, ts, {values} FROM system.numbers LIMIT 720"
        )
    };
    clickhouse.query(&format!(
        "INSERT INTO guardian.host_samples ({common}, cpu_busy_percent, mem_available_bytes, disk_read_latency_ms_max, disk_write_latency_ms_max) {}",
        source("toFloat64(number % 90), toUInt64(8000000000 - number * 1000), toFloat64(number % 7), toFloat64(number % 11)")
    ))?;
    clickhouse.query(&format!(
        "INSERT INTO guardian.chain_samples ({common}, responsive, best_block, block_lag, peers, head_age_ms) {}",
        source("1, toUInt64(4000000 + intDiv(number, 2) * 5), toUInt64(if(number % 2 = 0 AND number > 700, 40, 0)), toUInt32(12 + number % 5), toUInt64(1000 + number % 3000)")
    ))?;
    clickhouse.query(&format!(
        "INSERT INTO guardian.gpu_samples ({common}, gpu_index, utilisation_gpu_percent, temperature_celsius) {}",
        source("0, toFloat64(50 + number % 40), toFloat64(60 + number % 25)")
    ))?;
    clickhouse.query(
        "INSERT INTO guardian.findings (at, node_id, network, detector, severity, score, evidence) VALUES \
         (now() - 600, 'val-a', 'finney', 'block_lag', 'critical', 1.0, '{\"lag\":\"40\"}'), \
         (now() - 300, 'val-b', 'finney', 'gpu_temperature', 'warning', 0.5, '{}')",
    )?;
    Ok(())
}

#[tokio::test]
async fn every_clickhouse_panel_query_returns_typed_rows_from_the_rollups() -> anyhow::Result<()> {
    let clickhouse = ClickHouse::start()?;
    ClickHouseStore::open(&ClickHouseSettings {
        url: clickhouse.url(),
        ..ClickHouseSettings::default()
    })
    .await?;
    seed(&clickhouse)?;
    let to = guardian_server::unix_ms() / 1000 + 60;
    let from = to - 6 * 3600 - 120;

    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana");
    let mut checked = 0;
    for file in ["fleet-overview.json", "node-detail.json"] {
        let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(dir.join(file))?)?;
        let mut queries: Vec<(String, String, bool)> = Vec::new();
        for variable in dashboard["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if variable["type"] == "query" {
                let name = format!("{file}: variable {}", variable["name"]);
                queries.push((
                    name,
                    variable["query"].as_str().expect("query").to_owned(),
                    false,
                ));
            }
        }
        for panel in dashboard["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().expect("targets") {
                assert_eq!(
                    target["datasource"]["type"], "grafana-clickhouse-datasource",
                    "{file}: {}",
                    panel["title"]
                );
                let series = target["format"] == 1;
                let name = format!("{file}: panel {}", panel["title"]);
                queries.push((
                    name,
                    target["rawSql"].as_str().expect("rawSql").to_owned(),
                    series,
                ));
            }
        }
        for (name, sql, series) in queries {
            let sql = expand(&sql, from, to, 600);
            let answer = guardian_tests::clickhouse::http_query(
                clickhouse.http_port,
                &format!("{sql} FORMAT JSONCompact"),
            )
            .map_err(|e| e.context(format!("{name}: {sql}")))?;
            let answer: Value = serde_json::from_str(&answer)?;
            let rows = answer["data"].as_array().expect("data");
            assert!(!rows.is_empty(), "{name}: no rows from {sql}");
            let types: Vec<&str> = answer["meta"]
                .as_array()
                .expect("meta")
                .iter()
                .map(|c| c["type"].as_str().unwrap_or(""))
                .collect();
            if series {
                assert_eq!(types[0], "DateTime", "{name}: the time column: {types:?}");
                let value = types.last().expect("a value column");
                assert!(
                    value.starts_with("Float")
                        || value.starts_with("UInt")
                        || value.starts_with("Int"),
                    "{name}: value column {value}"
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 20, "{checked} queries checked");
    Ok(())
}
