//! Owns the chain-data disk findings: `storage_slow` and `storage_full`.
//!
//! - `storage_slow`: a disk's read or write latency over `disk_latency_ms`, or its utilisation
//!   over `disk_utilisation_percent`, sustained: in at least 2 of the last 3 window host
//!   points (or in the newest host sample while the window holds fewer than 3). Warning;
//!   score 0.5 at the limit, 1.0 at 4x the latency or full utilisation.
//! - `storage_full`: the chain-data filesystem is at >= `storage_used_percent` (critical,
//!   score 0.8..1), or a least-squares line through the window's `chain_data_available_bytes`
//!   (>= 6 points spanning >= 5 minutes) reaches zero within `storage_full_within_hours`
//!   (warning; critical under a quarter of it; score 0.5..1 as the time left shrinks).

use super::{DetectPolicy, Finding, FindingKind, NodeInput, Severity};
use crate::window::HostHistory;

/// Window host points the sustained test looks at, and how many of them must be slow.
const SLOW_RECENT: usize = 3;
const SLOW_NEEDED: usize = 2;
/// Fewest points and shortest span for a fill-rate forecast.
const FIT_MIN_POINTS: usize = 6;
const FIT_MIN_SPAN_MS: i64 = 5 * 60_000;
const MS_PER_HOUR: f64 = 3_600_000.0;

/// Storage findings for one node.
pub fn detect(input: &NodeInput<'_>, policy: &DetectPolicy) -> Vec<Finding> {
    let newest = input
        .host
        .map(|(at, v)| (at, HostHistory::from(&v)))
        .or_else(|| input.window.host().back());
    let mut findings = Vec::new();
    findings.extend(storage_slow(input, newest.map(|(_, v)| v), policy));
    if let Some(newest) = newest {
        findings.extend(storage_full(input, newest, policy));
    }
    findings
}

/// Worst excess of one host point over the slow-disk limits (0 when not slow; 0.5 at a
/// limit, 1.0 at 4x the latency or 100% utilisation).
fn slowness(v: &HostHistory, policy: &DetectPolicy) -> f64 {
    let mut worst: f64 = 0.0;
    let latency = v.disk_read_latency_ms_max.max(v.disk_write_latency_ms_max);
    if latency > policy.disk_latency_ms && policy.disk_latency_ms > 0.0 {
        let ratio = latency / policy.disk_latency_ms;
        worst = worst.max(0.5 + 0.5 * ((ratio - 1.0) / 3.0).clamp(0.0, 1.0));
    }
    let util = v.disk_utilisation_percent_max;
    if util > policy.disk_utilisation_percent {
        let room = (100.0 - policy.disk_utilisation_percent).max(f64::EPSILON);
        worst = worst.max(0.5 + 0.5 * ((util - policy.disk_utilisation_percent) / room).min(1.0));
    }
    worst
}

fn storage_slow(
    input: &NodeInput<'_>,
    newest: Option<HostHistory>,
    policy: &DetectPolicy,
) -> Option<Finding> {
    let window = input.window.host();
    let (recent, needed): (Vec<HostHistory>, usize) = if window.len() >= SLOW_RECENT {
        let recent = window.iter().rev().take(SLOW_RECENT).map(|(_, v)| v);
        (recent.collect(), SLOW_NEEDED)
    } else {
        (newest.into_iter().collect(), 1)
    };
    let slow: Vec<(f64, &HostHistory)> = recent
        .iter()
        .map(|v| (slowness(v, policy), v))
        .filter(|(score, _)| *score > 0.0)
        .collect();
    if slow.len() < needed {
        return None;
    }
    let score = slow.iter().map(|(s, _)| *s).fold(0.0, f64::max);
    let max = |f: fn(&HostHistory) -> f64| slow.iter().map(|(_, v)| f(v)).fold(0.0, f64::max);
    let read = max(|v| v.disk_read_latency_ms_max);
    let write = max(|v| v.disk_write_latency_ms_max);
    let util = max(|v| v.disk_utilisation_percent_max);
    Some(Finding::new(
        FindingKind::StorageSlow,
        score,
        Severity::Warning,
        format!(
            "Disks slow in {} of the last {} samples: up to {read:.0} ms read, {write:.0} ms \
             write latency and {util:.0}% utilisation (limits {:.0} ms, {:.0}%).",
            slow.len(),
            recent.len(),
            policy.disk_latency_ms,
            policy.disk_utilisation_percent
        ),
        [
            ("disk_read_latency_ms_max", format!("{read:.1}")),
            ("disk_write_latency_ms_max", format!("{write:.1}")),
            ("disk_utilisation_percent_max", format!("{util:.1}")),
            ("slow_points", format!("{}/{}", slow.len(), recent.len())),
            ("disk_latency_ms", format!("{:.1}", policy.disk_latency_ms)),
            (
                "disk_utilisation_percent",
                format!("{:.1}", policy.disk_utilisation_percent),
            ),
        ],
    ))
}

/// Whether a host point carries chain-data filesystem figures (all zero when the agent has
/// no chain-data path configured).
fn has_chain_data(v: &HostHistory) -> bool {
    v.chain_data_used_percent > 0.0 || v.chain_data_available_bytes > 0
}

/// Least-squares slope (bytes per hour) of `chain_data_available_bytes` over the window's
/// host points, with the point count; None when there are too few points or too short a span.
fn fill_rate(input: &NodeInput<'_>) -> Option<(f64, usize)> {
    let points: Vec<(f64, f64)> = input
        .window
        .host()
        .iter()
        .filter(|(_, v)| has_chain_data(v))
        .map(|(at, v)| (at, v.chain_data_available_bytes as f64))
        .scan(None, |origin, (at, y)| {
            // Hours since the first point: small numbers keep the sums exact enough.
            let t0 = *origin.get_or_insert(at);
            Some(((at - t0) as f64 / MS_PER_HOUR, y))
        })
        .collect();
    let span_hours = points.last().map_or(0.0, |(x, _)| *x);
    if points.len() < FIT_MIN_POINTS || span_hours * MS_PER_HOUR < FIT_MIN_SPAN_MS as f64 {
        return None;
    }
    let n = points.len() as f64;
    let mean_x = points.iter().map(|(x, _)| x).sum::<f64>() / n;
    let mean_y = points.iter().map(|(_, y)| y).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|(x, _)| (x - mean_x).powi(2)).sum();
    let sxy: f64 = points
        .iter()
        .map(|(x, y)| (x - mean_x) * (y - mean_y))
        .sum();
    (sxx > 0.0).then(|| (sxy / sxx, points.len()))
}

fn storage_full(
    input: &NodeInput<'_>,
    (_, newest): (i64, HostHistory),
    policy: &DetectPolicy,
) -> Option<Finding> {
    if !has_chain_data(&newest) {
        return None;
    }
    let used = newest.chain_data_used_percent;
    let available = newest.chain_data_available_bytes;
    let fit = fill_rate(input);
    let hours_to_full = fit
        .filter(|(slope, _)| *slope < 0.0)
        .map(|(slope, _)| available as f64 / -slope);
    let within = policy.storage_full_within_hours;

    let (severity, score, why) = if used >= policy.storage_used_percent {
        let room = (100.0 - policy.storage_used_percent).max(f64::EPSILON);
        let score = 0.8 + 0.2 * ((used - policy.storage_used_percent) / room).min(1.0);
        (
            Severity::Critical,
            score,
            format!(
                "{used:.1}% used (limit {:.0}%)",
                policy.storage_used_percent
            ),
        )
    } else if let Some(hours) = hours_to_full.filter(|h| *h <= within && within > 0.0) {
        let severity = if hours < within / 4.0 {
            Severity::Critical
        } else {
            Severity::Warning
        };
        (
            severity,
            0.5 + 0.5 * (1.0 - hours / within),
            format!("full in {hours:.1} hours at the current rate (limit {within:.0} hours)"),
        )
    } else {
        return None;
    };

    let (slope, points) = fit.map_or((None, 0), |(slope, n)| (Some(slope), n));
    Some(Finding::new(
        FindingKind::StorageFull,
        score,
        severity,
        format!(
            "Chain data filesystem {why}; {} GiB available.",
            available / (1 << 30)
        ),
        [
            ("used_percent", format!("{used:.1}")),
            ("available_bytes", available.to_string()),
            (
                "hours_to_full",
                hours_to_full.map_or_else(|| "none".to_owned(), |h| format!("{h:.1}")),
            ),
            (
                "slope_bytes_per_hour",
                slope.map_or_else(|| "none".to_owned(), |s| format!("{s:.0}")),
            ),
            ("fit_points", points.to_string()),
            (
                "storage_used_percent",
                format!("{:.1}", policy.storage_used_percent),
            ),
            ("storage_full_within_hours", format!("{within:.1}")),
        ],
    ))
}

#[cfg(test)]
mod tests {
    use super::super::block_lag::tests::{NOW, quiet_input, window};
    use super::*;
    use crate::batch::values::HostValues;
    use crate::window::Window;

    const GIB: u64 = 1 << 30;

    fn kinds(findings: &[Finding]) -> Vec<FindingKind> {
        findings.iter().map(|f| f.kind).collect()
    }

    fn run(window: &Window) -> Vec<Finding> {
        detect(&quiet_input(window), &DetectPolicy::default())
    }

    /// A window of host points `step_ms` apart, the newest at [`NOW`].
    fn window_of(step_ms: i64, points: &[HostValues]) -> Window {
        let mut window = window();
        let start = NOW - step_ms * (points.len() as i64 - 1);
        for (i, v) in points.iter().enumerate() {
            window.record_host(start + step_ms * i as i64, *v);
        }
        window
    }

    fn disk(latency_ms: f64, utilisation: f64) -> HostValues {
        HostValues {
            disk_read_latency_ms_max: latency_ms,
            disk_write_latency_ms_max: latency_ms / 2.0,
            disk_utilisation_percent_max: utilisation,
            ..HostValues::default()
        }
    }

    #[test]
    fn fast_disks_are_quiet() {
        let window = window_of(10_000, &[disk(5.0, 30.0); 6]);
        assert!(run(&window).is_empty());
    }

    #[test]
    fn slow_disk_in_two_of_the_last_three_points_is_storage_slow() {
        let window = window_of(
            10_000,
            &[
                disk(5.0, 30.0),
                disk(120.0, 60.0),
                disk(5.0, 30.0),
                disk(80.0, 99.0),
            ],
        );
        let findings = run(&window);
        assert_eq!(kinds(&findings), vec![FindingKind::StorageSlow]);
        assert_eq!(findings[0].severity, Severity::Warning);
        assert_eq!(findings[0].evidence["slow_points"], "2/3");
        assert_eq!(findings[0].evidence["disk_read_latency_ms_max"], "120.0");
    }

    #[test]
    fn one_slow_point_of_three_is_a_blip() {
        let window = window_of(
            10_000,
            &[disk(5.0, 30.0), disk(5.0, 30.0), disk(500.0, 100.0)],
        );
        assert!(run(&window).is_empty());
    }

    #[test]
    fn short_window_judges_the_newest_sample() {
        let window = window_of(10_000, &[disk(200.0, 50.0)]);
        let findings = run(&window);
        assert_eq!(kinds(&findings), vec![FindingKind::StorageSlow]);
        // 4x the latency limit scores 1.
        assert!((findings[0].score - 1.0).abs() < 1e-9);
    }

    fn filling(available: u64, used_percent: f64) -> HostValues {
        HostValues {
            chain_data_available_bytes: available,
            chain_data_used_percent: used_percent,
            ..HostValues::default()
        }
    }

    /// Eleven points a minute apart, losing `gib_per_hour` GiB an hour from 100 GiB.
    fn filling_window(gib_per_hour: u64) -> Window {
        let points: Vec<HostValues> = (0..11)
            .map(|minute| filling(100 * GIB - minute * gib_per_hour * GIB / 60, 80.0))
            .collect();
        window_of(60_000, &points)
    }

    #[test]
    fn filesystem_filling_within_a_day_is_a_warning() {
        // ~98 GiB left at 10 GiB/h: full in about 10 hours.
        let findings = run(&filling_window(10));
        assert_eq!(kinds(&findings), vec![FindingKind::StorageFull]);
        assert_eq!(findings[0].severity, Severity::Warning);
        assert_eq!(findings[0].evidence["hours_to_full"], "9.8");
        let slope: f64 = findings[0].evidence["slope_bytes_per_hour"]
            .parse()
            .expect("slope is a number");
        assert!((slope + (10 * GIB) as f64).abs() < 1e3, "slope {slope}");
    }

    #[test]
    fn filesystem_filling_within_six_hours_is_critical() {
        let findings = run(&filling_window(60));
        assert_eq!(findings[0].severity, Severity::Critical);
    }

    #[test]
    fn slow_growth_is_quiet() {
        assert!(run(&filling_window(1)).is_empty());
    }

    #[test]
    fn forecast_needs_five_minutes_of_points() {
        // Steep, but 10 points over 90 s is too little to extrapolate from.
        let points: Vec<HostValues> = (0..10)
            .map(|i| filling(100 * GIB - i * GIB, 80.0))
            .collect();
        assert!(run(&window_of(10_000, &points)).is_empty());
    }

    #[test]
    fn nearly_full_filesystem_is_critical_without_a_trend() {
        let window = window_of(10_000, &[filling(10 * GIB, 96.0)]);
        let findings = run(&window);
        assert_eq!(kinds(&findings), vec![FindingKind::StorageFull]);
        assert_eq!(findings[0].severity, Severity::Critical);
        assert_eq!(findings[0].evidence["hours_to_full"], "none");
    }

    #[test]
    fn no_chain_data_path_is_quiet() {
        let window = window_of(60_000, &[HostValues::default(); 11]);
        assert!(run(&window).is_empty());
    }
}
