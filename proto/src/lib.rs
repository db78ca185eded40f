//! The memplace API: the `memplace.v1` gRPC service and the handoff socket messages.
//!
//! Generated from `proto/memplace/v1/*.proto` at build time; see those files for the contract.
#![allow(missing_docs, clippy::all)]

pub mod names;

/// `memplace.v1`.
pub mod v1 {
    tonic::include_proto!("memplace.v1");
}

/// The encoded `FileDescriptorSet` of the API, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("memplace_descriptor");
