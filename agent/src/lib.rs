//! Guardian agent.
pub mod sample;
