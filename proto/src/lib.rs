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

    /// Starting size of the Uplink stream's buffers, each way. tonic's default is 8 KiB,
    /// held per stream for its whole life: the decode buffer per direction keeps the largest
    /// message it has held, the encode buffer is for acks of a few bytes. A batch of the
    /// agent's cadence is about 1 KiB, so the buffers start there and grow when a frame needs
    /// it (heaptrack: 16 KiB of tonic buffers per connected node with the defaults).
    pub const UPLINK_BUFFER_BYTES: usize = 1024;

    /// prost over the Uplink with [`UPLINK_BUFFER_BYTES`] starting buffers (the generated
    /// server constructs it with `Default`).
    #[derive(Debug, Clone, Copy)]
    pub struct UplinkCodec<T, U>(std::marker::PhantomData<fn(T) -> U>);

    impl<T, U> Default for UplinkCodec<T, U> {
        fn default() -> Self {
            Self(std::marker::PhantomData)
        }
    }

    impl<T, U> tonic::codec::Codec for UplinkCodec<T, U>
    where
        T: ::prost::Message + Send + 'static,
        U: ::prost::Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = tonic_prost::ProstEncoder<T>;
        type Decoder = tonic_prost::ProstDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            tonic_prost::ProstEncoder::new(settings())
        }

        fn decoder(&mut self) -> Self::Decoder {
            tonic_prost::ProstDecoder::new(settings())
        }
    }

    fn settings() -> tonic::codec::BufferSettings {
        // tonic's default yield threshold (32 KiB), spelled out: it has no accessor.
        tonic::codec::BufferSettings::new(UPLINK_BUFFER_BYTES, 32 * 1024)
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
