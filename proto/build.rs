//! Generates the guardian.v1 Rust code from `proto/guardian/v1/*.proto` at build time.
//!
//! protoc comes from the `protoc-bin-vendored` crate unless `PROTOC` is set, so a fresh
//! machine needs nothing beyond crates.io.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    if std::env::var_os("PROTOC").is_none() {
        config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    }
    tonic_prost_build::configure()
        // The rpc `Uplink.Connect` would clash with the generated `connect` constructor;
        // channels are built by the callers (they need mTLS settings anyway).
        .build_transport(false)
        .compile_with_config(config, &["proto/guardian/v1/guardian.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
