//! Compiles the `.proto` files in `proto/` with protox (a pure-Rust protobuf
//! compiler: no system `protoc` is needed) and generates prost messages plus tonic
//! client and server stubs.

use std::path::Path;

const PROTO_ROOT: &str = "proto";

const PROTO_FILES: &[&str] = &[
    "istio/workload/workload.proto",
    "istio/security/authorization.proto",
    "istio/ca/ca.proto",
    "istio/zds/zds.proto",
    "envoy/config/core/v3/base.proto",
    "envoy/service/discovery/v3/discovery.proto",
    "google/rpc/status.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    for file in PROTO_FILES {
        println!(
            "cargo:rerun-if-changed={}",
            Path::new(PROTO_ROOT).join(file).display()
        );
    }

    let descriptors = protox::compile(PROTO_FILES, [PROTO_ROOT])?;

    let mut prost_config = tonic_prost_build::Config::new();
    // `prost::Name` impls give every message its `type.googleapis.com/...` URL.
    prost_config.enable_type_names();
    prost_config.type_name_domain(["."], "type.googleapis.com");
    // Ordered maps make encodings (and so golden tests and config dumps) deterministic.
    prost_config.btree_map(["."]);

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Stubs stay transport-agnostic: callers bring their own channel.
        .build_transport(false)
        // prost's codec, but undecodable messages are InvalidArgument.
        .codec_path("crate::codec::Codec")
        .emit_rerun_if_changed(false)
        .compile_fds_with_config(descriptors, prost_config)?;
    Ok(())
}
