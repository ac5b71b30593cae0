//! Compiles `proto/` with protox (no system `protoc`), then generates the
//! prost messages, the tonic client and server, and the pbjson serde impls
//! that give the REST shim the proto3 JSON mapping.

use std::{env, path::PathBuf};
const PROTOS: &[&str] = &[
    "proto/orchestrator/v1/job.proto",
    "proto/orchestrator/v1/worker.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler
        .include_imports(true)
        .include_source_info(true)
        .open_files(PROTOS)?;
    let fds = compiler.file_descriptor_set();
    let descriptor_path = out_dir.join("orchestrator_descriptor.bin");
    // Encoded by protox itself: it keeps extension options such as
    // google.api.http, which re-encoding the prost types would drop, and the
    // OpenAPI document is generated from them.
    std::fs::write(&descriptor_path, compiler.encode_file_descriptor_set())?;

    tonic_prost_build::configure()
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_fds(fds.clone())?;

    pbjson_build::Builder::new()
        .register_descriptors(&std::fs::read(&descriptor_path)?)?
        .build(&[".orchestrator"])?;
    Ok(())
}
