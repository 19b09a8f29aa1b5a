//! The telemetry vocabulary every store shares: the flat rows a sample becomes, the metric
//! catalogue the history query accepts, and the history answer.
//!
//! The embedded store (SQLite/PostgreSQL tables) and the ClickHouse store
//! ([`super::clickhouse`]) use the same column names, taken from here, so a metric means
//! the same thing whichever store answers.

/// Which raw table a metric lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    /// One row per host sample.
    Host,
    /// One row per chain sample.
    Chain,
    /// One row per GPU device per GPU sample.
    Gpu,
}

impl Table {
    /// The raw table's name (the same in every store).
    pub fn name(self) -> &'static str {
        match self {
            Self::Host => "host_samples",
            Self::Chain => "chain_samples",
            Self::Gpu => "gpu_samples",
        }
    }
}

/// One numeric series the history query serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricDef {
    /// The name operators type (`guardianctl history --metric NAME`); also the column name.
    pub name: &'static str,
    /// Where it is stored.
    pub table: Table,
    /// Its unit, for display.
    pub unit: &'static str,
}

const fn m(name: &'static str, table: Table, unit: &'static str) -> MetricDef {
    MetricDef { name, table, unit }
}

/// Every metric the history query accepts. GPU metrics aggregate over all of a node's
/// devices within a bucket.
pub const METRICS: &[MetricDef] = &[
    m("cpu_busy_percent", Table::Host, "%"),
    m("cpu_iowait_percent", Table::Host, "%"),
    m("mem_total_bytes", Table::Host, "bytes"),
    m("mem_available_bytes", Table::Host, "bytes"),
    m("load_avg_1m", Table::Host, ""),
    m("cpu_psi_some_avg10_percent", Table::Host, "%"),
    m("memory_psi_full_avg10_percent", Table::Host, "%"),
    m("io_psi_full_avg10_percent", Table::Host, "%"),
    m("chain_data_used_percent", Table::Host, "%"),
    m("chain_data_available_bytes", Table::Host, "bytes"),
    m("disk_read_latency_ms_max", Table::Host, "ms"),
    m("disk_write_latency_ms_max", Table::Host, "ms"),
    m("disk_utilisation_percent_max", Table::Host, "%"),
    m("net_rx_bytes_per_second", Table::Host, "bytes/s"),
    m("net_tx_bytes_per_second", Table::Host, "bytes/s"),
    m("net_errors_total", Table::Host, "errors"),
    m("oom_kills_total", Table::Host, "kills"),
    m("responsive", Table::Chain, "0/1"),
    m("best_block", Table::Chain, "block"),
    m("finalized_block", Table::Chain, "block"),
    m("sync_highest_block", Table::Chain, "block"),
    m("reference_best_block", Table::Chain, "block"),
    m("block_lag", Table::Chain, "blocks"),
    m("finality_lag_blocks", Table::Chain, "blocks"),
    m("peers", Table::Chain, "peers"),
    m("is_syncing", Table::Chain, "0/1"),
    m("head_age_ms", Table::Chain, "ms"),
    m("rpc_latency_ms", Table::Chain, "ms"),
    m("spec_version", Table::Chain, ""),
    m("blocks_since_last_update", Table::Chain, "blocks"),
    m("validator_trust_ratio", Table::Chain, "ratio"),
    m("emission_rao", Table::Chain, "rao"),
    m("utilisation_gpu_percent", Table::Gpu, "%"),
    m("memory_used_bytes", Table::Gpu, "bytes"),
    m("temperature_celsius", Table::Gpu, "°C"),
    m("power_draw_watts", Table::Gpu, "W"),
    m("sm_clock_mhz", Table::Gpu, "MHz"),
    m("throttle_reasons_bitmask", Table::Gpu, "bitmask"),
    m("ecc_uncorrected_total", Table::Gpu, "errors"),
    m("pcie_replay_total", Table::Gpu, "replays"),
    m("xid_events", Table::Gpu, "events"),
];

/// The catalogue entry for `name`.
pub fn metric(name: &str) -> Option<&'static MetricDef> {
    METRICS.iter().find(|def| def.name == name)
}

/// The metrics of one table, in catalogue order.
pub fn metrics_of(table: Table) -> impl Iterator<Item = &'static MetricDef> {
    METRICS.iter().filter(move |def| def.table == table)
}

/// One bucket of a history answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HistoryPoint {
    /// Bucket start, Unix milliseconds.
    pub start_unix_ms: i64,
    /// Mean of the values in the bucket.
    pub avg: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// How many values.
    pub count: u64,
}

/// A history answer.
#[derive(Debug, Clone, PartialEq)]
pub struct History {
    /// Bucket width actually used.
    pub resolution_seconds: u32,
    /// Where it came from: `raw`, `rollup_1m` or `rollup_1h`.
    pub source: &'static str,
    /// Buckets with data, oldest first (empty buckets are omitted).
    pub points: Vec<HistoryPoint>,
}

/// Most buckets one history answer may hold.
pub const MAX_HISTORY_POINTS: i64 = 10_000;

/// Why a history request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    /// Not in [`METRICS`].
    #[error("unknown metric {0:?}; known metrics: {known}", known = METRICS.iter().map(|d| d.name).collect::<Vec<_>>().join(", "))]
    UnknownMetric(String),
    /// `from >= to`.
    #[error("empty time range: from ({from}) must be before to ({to}), both Unix milliseconds")]
    EmptyRange {
        /// Start.
        from: i64,
        /// End.
        to: i64,
    },
    /// Too many buckets.
    #[error(
        "{buckets} buckets of {resolution_seconds} s is more than {MAX_HISTORY_POINTS}; ask for a coarser resolution or a shorter range"
    )]
    TooManyPoints {
        /// Buckets the request implies.
        buckets: i64,
        /// The resolution.
        resolution_seconds: u32,
    },
}

/// The resolution and source a history request is served at. `requested_seconds == 0`
/// picks one: raw samples at 10 s for up to 6 hours, 1-minute rollups up to 7 days,
/// 1-hour rollups beyond. A requested resolution is served from the coarsest rollup
/// that divides it (raw below a minute).
///
/// # Errors
/// [`HistoryError::EmptyRange`] or [`HistoryError::TooManyPoints`].
pub fn plan(
    from_unix_ms: i64,
    to_unix_ms: i64,
    requested_seconds: u32,
) -> Result<(u32, &'static str), HistoryError> {
    if from_unix_ms >= to_unix_ms {
        return Err(HistoryError::EmptyRange {
            from: from_unix_ms,
            to: to_unix_ms,
        });
    }
    let span_s = (to_unix_ms - from_unix_ms) / 1000;
    let resolution = if requested_seconds > 0 {
        requested_seconds
    } else if span_s <= 6 * 3600 {
        10
    } else if span_s <= 7 * 86_400 {
        60
    } else {
        3600
    };
    let source = if resolution % 3600 == 0 {
        "rollup_1h"
    } else if resolution % 60 == 0 {
        "rollup_1m"
    } else {
        "raw"
    };
    let buckets = span_s / i64::from(resolution) + 1;
    if buckets > MAX_HISTORY_POINTS {
        return Err(HistoryError::TooManyPoints {
            buckets,
            resolution_seconds: resolution,
        });
    }
    Ok((resolution, source))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_plans_pick_rollups_for_long_ranges() {
        let hour = 3_600_000;
        assert_eq!(plan(0, hour, 0), Ok((10, "raw")));
        assert_eq!(plan(0, 2 * 86_400_000, 0), Ok((60, "rollup_1m")));
        assert_eq!(plan(0, 30 * 86_400_000, 0), Ok((3600, "rollup_1h")));
        assert_eq!(plan(0, hour, 300), Ok((300, "rollup_1m")));
        assert!(matches!(
            plan(0, 30 * 86_400_000, 1),
            Err(HistoryError::TooManyPoints { .. })
        ));
        assert!(matches!(
            plan(5, 5, 0),
            Err(HistoryError::EmptyRange { .. })
        ));
    }

    #[test]
    fn every_metric_name_is_unique_and_found() {
        for def in METRICS {
            assert_eq!(metric(def.name), Some(def));
        }
        assert!(metric("nope").is_none());
    }
}
