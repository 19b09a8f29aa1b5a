//! Generates the guardian.v1 Rust code from `proto/guardian/v1/*.proto` at build time.
//!
//! protoc comes from the `protoc-bin-vendored` crate unless `PROTOC` is set, so a fresh
//! machine needs nothing beyond crates.io.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    if std::env::var_os("PROTOC").is_none() {
        config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    }
    // The descriptors, for gRPC server reflection (grpcurl lists and calls the Fleet API).
    let descriptors =
        std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("guardian_descriptor.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptors)
        // The rpc `Uplink.Connect` would clash with the generated `connect` constructor;
        // channels are built by the callers (they need mTLS settings anyway).
        .build_transport(false)
        .compile_with_config(config, &["proto/guardian/v1/guardian.proto"], &["proto"])?;
    // The server's side of `Uplink.Connect`, over `wire::AgentFrameIn`: the same route and
    // wire format, but a batch arrives as its encoded bytes (decoded by the server itself).
    let connect = tonic_build::manual::Method::builder()
        .name("connect")
        .route_name("Connect")
        .input_type("crate::wire::AgentFrameIn")
        .output_type("crate::v1::ServerFrame")
        // Small starting buffers: they are held per connected agent (see `wire::UplinkCodec`).
        .codec_path("crate::wire::UplinkCodec")
        .client_streaming()
        .server_streaming()
        .build();
    let uplink = tonic_build::manual::Service::builder()
        .name("Uplink")
        .package("guardian.v1")
        .comment("The server's view of guardian.v1.Uplink (see `wire`).")
        .method(connect)
        .build();
    tonic_build::manual::Builder::new()
        .build_client(false)
        .build_transport(false)
        .compile(&[uplink]);
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
