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
