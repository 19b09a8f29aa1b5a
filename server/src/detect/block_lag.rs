//! Placeholder: being written.

use super::{DetectPolicy, Finding, FleetContext, NodeInput};

/// Findings of this detector.
pub fn detect(
    _input: &NodeInput<'_>,
    _fleet: &FleetContext,
    _policy: &DetectPolicy,
) -> Vec<Finding> {
    Vec::new()
}
