//! The guardian.v1 wire contract: generated protobuf types and gRPC stubs. No I/O.
//!
//! Modules, in data-flow order: [`v1`] (agent frames and samples, server frames, the Fleet API),
//! [`wire`] (the server's view of the agent stream, batches left encoded).

/// Generated code for package `guardian.v1`.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("guardian.v1");
}

/// The encoded `FileDescriptorSet` of `guardian.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/guardian_descriptor.bin"));

/// The server's view of the agent stream: wire-compatible with [`v1::AgentFrame`] (same
/// route, same field numbers), but a batch stays the bytes the agent encoded, so the server
/// decodes them with its own lean decoder (and keeps host samples' bytes zero-copy).
#[allow(missing_docs, clippy::all)]
pub mod wire {
    /// [`crate::v1::AgentFrame`] with the batch left encoded.
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct AgentFrameIn {
        /// The frame.
        #[prost(oneof = "agent_frame_in::Frame", tags = "1, 2, 3")]
        pub frame: ::core::option::Option<agent_frame_in::Frame>,
    }

    /// The frame kinds of [`AgentFrameIn`].
    pub mod agent_frame_in {
        /// [`crate::v1::agent_frame::Frame`], with `Batch` undecoded.
        #[derive(Clone, PartialEq, ::prost::Oneof)]
        pub enum Frame {
            /// The first frame of a stream.
            #[prost(message, tag = "1")]
            Hello(crate::v1::Hello),
            /// An encoded `guardian.v1.SampleBatch`.
            #[prost(bytes = "bytes", tag = "2")]
            Batch(::prost::bytes::Bytes),
            /// What a command did.
            #[prost(message, tag = "3")]
            Outcome(crate::v1::CommandOutcome),
        }
    }

    include!(concat!(env!("OUT_DIR"), "/guardian.v1.Uplink.rs"));
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
