//! Fencing for the one active server on a ledger: which server acts, in which term, and
//! whether it still may. `main.rs` takes the ledger's lock (waiting for it as a standby with
//! `standby = true`), then [`acquired`] records the term; a task checks every second that the
//! lock is still held and calls [`deposed`] the moment it is not. The actuator asks
//! [`may_act`] before every write that remediates (a ledger pass, a Kubernetes write), so a
//! server that lost its lock never acts again; it then shuts down, and its supervisor starts
//! it again as a standby.
//!
//! A process holds one ledger, so this state is process-wide.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

static DEPOSED: AtomicBool = AtomicBool::new(false);
static TERM: Mutex<Option<Term>> = Mutex::new(None);

/// Who acts and since when.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Term {
    /// `hostname/pid` of the acting server.
    pub leader: String,
    /// When it took the ledger's lock, Unix ms (a later term is a larger number).
    pub term: i64,
}

/// Records that this process took the ledger's lock now.
pub fn acquired(now_unix_ms: i64) {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    let term = Term {
        leader: format!("{host}/{}", std::process::id()),
        term: now_unix_ms,
    };
    *TERM
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(term);
}

/// The current term, when this process holds the ledger.
pub fn term() -> Option<Term> {
    TERM.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

/// This process lost the ledger's lock: it must never act again.
pub fn deposed() {
    DEPOSED.store(true, Ordering::SeqCst);
}

/// Whether this process may still act (it has not lost the ledger's lock).
pub fn may_act() -> bool {
    !DEPOSED.load(Ordering::SeqCst)
}
