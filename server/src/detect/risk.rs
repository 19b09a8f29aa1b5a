//! Placeholder: being written.

use super::Finding;

/// Composite validator risk 0..=1.
pub fn score(_findings: &[Finding]) -> f64 {
    0.0
}
