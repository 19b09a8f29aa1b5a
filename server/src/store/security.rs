//! Owns the security-event budget: how many refusals per peer and minute reach the ledger's
//! `security_events` (each a synced write under the write lock), and how long they are kept.

use std::collections::HashMap;
use std::sync::Mutex;

/// Refusals of one peer written per minute; the rest are counted, not written.
pub const EVENTS_PER_PEER_PER_MINUTE: u32 = 10;
/// Days security events are kept (pruned with the batch records, every 10 minutes).
pub const RETENTION_DAYS: i64 = 90;
/// Peers remembered before windows that ended are forgotten.
const MAX_PEERS: usize = 4_096;
const MINUTE_MS: i64 = 60_000;

/// Per peer: the minute it is in and the events written in it.
#[derive(Debug, Default)]
pub struct PeerLimit {
    windows: Mutex<HashMap<String, (i64, u32)>>,
}

impl PeerLimit {
    /// Whether `peer` may write one more event at `now_unix_ms` (and counts it if so).
    pub fn admit(&self, peer: &str, now_unix_ms: i64) -> bool {
        let minute = now_unix_ms.div_euclid(MINUTE_MS);
        let mut windows = self
            .windows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if windows.len() >= MAX_PEERS && !windows.contains_key(peer) {
            windows.retain(|_, (at, _)| *at == minute);
        }
        let window = windows.entry(peer.to_owned()).or_insert((minute, 0));
        if window.0 != minute {
            *window = (minute, 0);
        }
        if window.1 >= EVENTS_PER_PEER_PER_MINUTE {
            return false;
        }
        window.1 += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_peer_gets_its_own_budget_per_minute() {
        let limit = PeerLimit::default();
        let admitted = (0..25).filter(|_| limit.admit("node/a", 1_000)).count();
        assert_eq!(admitted, EVENTS_PER_PEER_PER_MINUTE as usize);
        assert!(
            limit.admit("node/b", 1_000),
            "another peer is not held back"
        );
        assert!(limit.admit("node/a", 61_000), "a new minute, a new budget");
    }
}
