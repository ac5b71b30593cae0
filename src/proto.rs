//! Types and gRPC stubs generated from `proto/orchestrator/v1`, with serde
//! impls that follow the proto3 JSON mapping (pbjson).

#![allow(missing_docs, clippy::all, clippy::pedantic)]

pub mod v1 {
    tonic::include_proto!("orchestrator.v1");
    include!(concat!(env!("OUT_DIR"), "/orchestrator.v1.serde.rs"));
}

/// Encoded `FileDescriptorSet` of the whole contract, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/orchestrator_descriptor.bin"));
