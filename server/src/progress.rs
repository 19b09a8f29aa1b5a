//! Long work the server does in the background (replaying the ClickHouse outbox after an
//! outage, rebuilding the windows at start), with its progress: logged as it goes (done /
//! total / rate / ETA, every [`LOG_EVERY`]) and shown to operators (`ListNodes` carries it,
//! `guardianctl status` prints a banner while it runs).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a running piece of work logs its progress.
pub const LOG_EVERY: Duration = Duration::from_secs(5);

/// Every piece of work running now.
pub static PROGRESS: Progress = Progress::new();

/// The work registry.
#[derive(Debug)]
pub struct Progress {
    work: Mutex<BTreeMap<&'static str, Work>>,
}

#[derive(Debug, Clone)]
struct Work {
    what: &'static str,
    unit: &'static str,
    total: u64,
    done: u64,
    started: Instant,
    logged: Instant,
}

/// One piece of work as operators see it.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkSnapshot {
    /// Stable name (`outbox_replay`, `window_rebuild`).
    pub name: &'static str,
    /// What it is, for people.
    pub what: &'static str,
    /// What is counted (`batches`, `rows`).
    pub unit: &'static str,
    /// Done so far.
    pub done: u64,
    /// Known total (0 = not known yet).
    pub total: u64,
    /// Units a second since it started.
    pub rate_per_second: f64,
    /// Seconds left at that rate (`None` when the total or the rate is not known).
    pub eta_seconds: Option<f64>,
}

impl WorkSnapshot {
    /// `replaying the ClickHouse outbox: 1200 / 5000 batches (24 %), 310/s, ETA 12 s`.
    pub fn line(&self) -> String {
        describe(
            self.what,
            self.unit,
            self.done,
            self.total,
            self.rate_per_second,
            self.eta_seconds,
        )
    }
}

/// One line for a piece of work (see [`WorkSnapshot::line`]); `guardianctl status` prints the
/// same from the Fleet API's answer.
pub fn describe(
    what: &str,
    unit: &str,
    done: u64,
    total: u64,
    rate_per_second: f64,
    eta_seconds: Option<f64>,
) -> String {
    let mut line = format!("{what}: {done}");
    if total > 0 {
        let percent = done as f64 * 100.0 / total as f64;
        line.push_str(&format!(" / {total} {unit} ({percent:.0} %)"));
    } else {
        line.push_str(&format!(" {unit}"));
    }
    line.push_str(&format!(", {rate_per_second:.0}/s"));
    if let Some(eta) = eta_seconds {
        line.push_str(&format!(", ETA {eta:.0} s"));
    }
    line
}

impl Work {
    fn snapshot(&self, name: &'static str, now: Instant) -> WorkSnapshot {
        let secs = now.duration_since(self.started).as_secs_f64();
        let rate = if secs > 0.0 {
            self.done as f64 / secs
        } else {
            0.0
        };
        let eta = (self.total > 0 && rate > 0.0)
            .then(|| self.total.saturating_sub(self.done) as f64 / rate);
        WorkSnapshot {
            name,
            what: self.what,
            unit: self.unit,
            done: self.done,
            total: self.total,
            rate_per_second: rate,
            eta_seconds: eta,
        }
    }
}

impl Progress {
    /// An empty registry.
    pub const fn new() -> Self {
        Self {
            work: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, Work>> {
        self.work
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts (or restarts) `name`, of `total` units (0 = not known yet), and logs it.
    pub fn start(&self, name: &'static str, what: &'static str, unit: &'static str, total: u64) {
        let now = Instant::now();
        self.lock().insert(
            name,
            Work {
                what,
                unit,
                total,
                done: 0,
                started: now,
                logged: now,
            },
        );
        tracing::info!(work = name, total, unit, "ProgressStarted: {what}");
    }

    /// Sets the total of `name` once it is known.
    pub fn set_total(&self, name: &'static str, total: u64) {
        if let Some(work) = self.lock().get_mut(name) {
            work.total = total;
        }
    }

    /// Sets how much of `name` is done; logs the progress every [`LOG_EVERY`].
    pub fn set_done(&self, name: &'static str, done: u64) {
        let now = Instant::now();
        let line = {
            let mut map = self.lock();
            let Some(work) = map.get_mut(name) else {
                return;
            };
            work.done = done.max(work.done);
            if work.total > 0 {
                work.total = work.total.max(work.done);
            }
            if now.duration_since(work.logged) < LOG_EVERY {
                return;
            }
            work.logged = now;
            work.snapshot(name, now)
        };
        tracing::info!(
            work = name,
            done = line.done,
            total = line.total,
            rate_per_second = line.rate_per_second.round(),
            eta_seconds = line.eta_seconds.map(f64::round),
            "Progress: {}",
            line.line()
        );
    }

    /// Ends `name`, logging what it came to.
    pub fn finish(&self, name: &'static str) {
        let now = Instant::now();
        let Some(work) = self.lock().remove(name) else {
            return;
        };
        let snapshot = work.snapshot(name, now);
        tracing::info!(
            work = name,
            done = snapshot.done,
            unit = snapshot.unit,
            millis = now.duration_since(work.started).as_millis() as u64,
            rate_per_second = snapshot.rate_per_second.round(),
            "ProgressDone: {}",
            snapshot.what
        );
    }

    /// Every piece of work running now.
    pub fn snapshot(&self) -> Vec<WorkSnapshot> {
        let now = Instant::now();
        self.lock()
            .iter()
            .map(|(name, work)| work.snapshot(name, now))
            .collect()
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_shows_while_it_runs_with_rate_and_eta_and_goes_when_done() {
        let progress = Progress::new();
        progress.start("replay", "replaying the outbox", "batches", 1000);
        std::thread::sleep(Duration::from_millis(50));
        progress.set_done("replay", 250);
        let now = progress.snapshot();
        assert_eq!(now.len(), 1);
        let work = &now[0];
        assert_eq!((work.done, work.total), (250, 1000));
        assert!(work.rate_per_second > 0.0);
        let eta = work.eta_seconds.expect("an ETA");
        // 750 left at the rate that did 250: three times the time so far.
        let elapsed = 250.0 / work.rate_per_second;
        assert!(
            (eta - 3.0 * elapsed).abs() < 0.01 * eta.max(1.0),
            "{eta} vs {elapsed}"
        );
        assert!(
            work.line()
                .starts_with("replaying the outbox: 250 / 1000 batches (25 %)"),
            "{}",
            work.line()
        );
        // Progress never goes back, and a total grows to what was done.
        progress.set_done("replay", 100);
        progress.set_done("replay", 1200);
        assert_eq!(progress.snapshot()[0].done, 1200);
        assert_eq!(progress.snapshot()[0].total, 1200);
        progress.finish("replay");
        assert!(progress.snapshot().is_empty());
    }

    #[test]
    fn an_unknown_total_has_no_eta() {
        let progress = Progress::new();
        progress.start("rebuild", "rebuilding the windows", "rows", 0);
        progress.set_done("rebuild", 10);
        let work = &progress.snapshot()[0];
        assert_eq!(work.eta_seconds, None);
        assert!(
            work.line().starts_with("rebuilding the windows: 10 rows"),
            "{}",
            work.line()
        );
    }
}
