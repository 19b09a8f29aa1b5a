//! Placeholder: being written.

use super::{NodeState, Observation, Plan, SyncPolicy};

/// Decides the next state and actions for one node. Pure.
pub fn plan(state: &NodeState, _observation: &Observation, _policy: &SyncPolicy) -> Plan {
    Plan {
        next: state.clone(),
        actions: Vec::new(),
        reason: String::new(),
    }
}
