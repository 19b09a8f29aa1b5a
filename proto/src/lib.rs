//! The guardian.v1 wire contract: generated protobuf types and gRPC stubs. No I/O.
//!
//! Modules, in data-flow order: [`v1`] (agent frames and samples, server frames, the Fleet API).

/// Generated code for package `guardian.v1`.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("guardian.v1");
}

/// Default maximum size of one decoded frame, in bytes (4 MiB).
pub const DEFAULT_MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;

/// Checks the naming rule for node ids and operator names, shared by agents (config
/// validation) and the server (certificate identities): 1..=63 characters of
/// `[a-z0-9._-]`, starting with a lowercase letter or a digit.
///
/// # Errors
/// The rule that was broken, as a sentence fragment.
pub fn check_name(raw: &str) -> Result<(), &'static str> {
    if raw.is_empty() || raw.len() > 63 {
        return Err("must be 1 to 63 characters");
    }
    if !raw.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit()) {
        return Err("must start with a lowercase letter or a digit");
    }
    if !raw
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'))
    {
        return Err("may contain only a-z, 0-9, '-', '_' and '.'");
    }
    Ok(())
}
