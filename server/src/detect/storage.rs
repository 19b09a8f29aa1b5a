//! Placeholder: being written.

use super::{DetectPolicy, Finding, NodeInput};

/// Findings of this detector.
pub fn detect(_input: &NodeInput<'_>, _policy: &DetectPolicy) -> Vec<Finding> {
    Vec::new()
}
