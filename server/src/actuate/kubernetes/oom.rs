//! OOMKilled remediation, the pure part: memory quantities, the OOM kills seen per node in a
//! sliding window, and what limit to set. The Kubernetes calls are in the parent module.
//!
//! A kill is a container status whose `lastState.terminated.reason` is `OOMKilled`, told
//! apart by its `finishedAt` (so a kill seen on several polls counts once). When a node's
//! container was killed `kills` times within `window`, its memory limit is raised by
//! `factor`, never above the TaoNode's `memoryCeiling`, and at most once per window.

use std::collections::{BTreeSet, HashMap};

/// Bytes in a Kubernetes quantity (`64Gi`, `1500Mi`, `8G`, `512000000`, `1.5Gi`); `None` when
/// it is not one.
pub fn parse_quantity(text: &str) -> Option<u128> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let multiplier: u128 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return None,
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return None;
    }
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let mut bytes = whole.checked_mul(multiplier)?;
    if !fraction.is_empty() {
        let digits = u32::try_from(fraction.len()).ok().filter(|d| *d <= 12)?;
        let scale = 10u128.pow(digits);
        let part: u128 = fraction.parse().ok()?;
        bytes = bytes.checked_add(part.checked_mul(multiplier)? / scale)?;
    }
    Some(bytes)
}

/// `bytes` as a quantity in whole mebibytes, rounded down (`6144Mi`).
pub fn mebibytes(bytes: u128) -> String {
    format!("{}Mi", bytes >> 20)
}

/// What to do about a node's memory limit after enough kills.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Raise {
    /// Set the limit to this many bytes.
    To(u128),
    /// The limit is already at (or above) the ceiling: alert, change nothing.
    AtCeiling,
}

/// The next limit: `current` times `factor`, at most `ceiling`.
pub fn next_limit(current: u128, factor: f64, ceiling: u128) -> Raise {
    if current >= ceiling {
        return Raise::AtCeiling;
    }
    // Quantities are far below 2^52 bytes, where f64 is exact to the byte.
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let raised = (current as f64 * factor.max(1.0)).ceil() as u128;
    Raise::To(raised.clamp(current + 1, ceiling))
}

/// Per node: the kills seen (by `finishedAt`, with when they happened) and the last raise.
#[derive(Debug, Default)]
pub struct OomTracker {
    nodes: HashMap<String, NodeKills>,
}

#[derive(Debug, Default)]
struct NodeKills {
    seen: BTreeSet<String>,
    at: Vec<i64>,
    raised_unix_ms: i64,
}

impl OomTracker {
    /// Records a container status: `finished_at` of its last termination when the reason was
    /// `OOMKilled` (RFC 3339; unparseable: `now`). Returns the kills within `window_ms`.
    pub fn observe(
        &mut self,
        node: &str,
        oom_finished_at: Option<&str>,
        now_unix_ms: i64,
        window_ms: i64,
    ) -> usize {
        let entry = self.nodes.entry(node.to_owned()).or_default();
        if let Some(finished) = oom_finished_at
            && entry.seen.insert(finished.to_owned())
        {
            entry
                .at
                .push(parse_rfc3339(finished).unwrap_or(now_unix_ms));
        }
        entry.at.retain(|t| now_unix_ms - t <= window_ms);
        if entry.seen.len() > 64 {
            // Bounded: old ids are only needed while their kill is in the window.
            let keep: Vec<String> = entry.seen.iter().rev().take(32).cloned().collect();
            entry.seen = keep.into_iter().collect();
        }
        entry.at.len()
    }

    /// Whether a raise is allowed now: none within the last `window_ms`.
    pub fn may_raise(&self, node: &str, now_unix_ms: i64, window_ms: i64) -> bool {
        self.nodes
            .get(node)
            .is_none_or(|e| e.raised_unix_ms == 0 || now_unix_ms - e.raised_unix_ms > window_ms)
    }

    /// Records a raise (made, or decided in a dry run) at `now`.
    pub fn raised(&mut self, node: &str, now_unix_ms: i64) {
        self.nodes
            .entry(node.to_owned())
            .or_default()
            .raised_unix_ms = now_unix_ms;
    }
}

/// Unix ms of `YYYY-MM-DDTHH:MM:SS[.fff]Z` (what Kubernetes writes); `None` otherwise.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    let text = text.strip_suffix('Z')?;
    let (date, time) = text.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (year, month, day) = (d.next()??, d.next()??, d.next()??);
    let time = time.split('.').next()?;
    let mut t = time.split(':').map(|p| p.parse::<i64>().ok());
    let (hour, minute, second) = (t.next()??, t.next()??, t.next()??);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400) + hour * 3600 + minute * 60 + second) * 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse_in_both_systems() {
        assert_eq!(parse_quantity("4Gi"), Some(4 << 30));
        assert_eq!(parse_quantity("1500Mi"), Some(1500 << 20));
        assert_eq!(parse_quantity("8G"), Some(8_000_000_000));
        assert_eq!(parse_quantity("1.5Gi"), Some(3 << 29));
        assert_eq!(parse_quantity("512000000"), Some(512_000_000));
        assert_eq!(parse_quantity("4GB"), None);
        assert_eq!(parse_quantity("Gi"), None);
        assert_eq!(mebibytes(6 << 30), "6144Mi");
    }

    #[test]
    fn the_limit_rises_by_the_factor_and_never_above_the_ceiling() {
        assert_eq!(next_limit(4 << 30, 1.5, 16 << 30), Raise::To(6 << 30));
        assert_eq!(next_limit(4 << 30, 1.5, 5 << 30), Raise::To(5 << 30));
        assert_eq!(next_limit(5 << 30, 1.5, 5 << 30), Raise::AtCeiling);
        assert_eq!(next_limit(6 << 30, 1.5, 5 << 30), Raise::AtCeiling);
    }

    #[test]
    fn kills_count_once_each_within_the_window_and_raises_once_per_window() {
        let mut t = OomTracker::default();
        let window = 3_600_000;
        let now = parse_rfc3339("2026-12-06T12:00:00Z").unwrap_or_default();
        assert_eq!(t.observe("n", Some("2026-12-06T11:50:00Z"), now, window), 1);
        assert_eq!(
            t.observe("n", Some("2026-12-06T11:50:00Z"), now, window),
            1,
            "seen again"
        );
        assert_eq!(t.observe("n", None, now, window), 1);
        assert_eq!(
            t.observe("n", Some("2026-12-06T10:00:00Z"), now, window),
            1,
            "outside"
        );
        assert_eq!(t.observe("n", Some("2026-12-06T11:55:00Z"), now, window), 2);
        assert!(t.may_raise("n", now, window));
        t.raised("n", now);
        assert!(!t.may_raise("n", now + 60_000, window));
        assert!(t.may_raise("n", now + window + 1, window));
        assert_eq!(parse_rfc3339("1970-01-01T00:00:01Z"), Some(1000));
        assert_eq!(parse_rfc3339("2026-12-06 12:00:00"), None);
    }
}
