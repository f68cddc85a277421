//! The recmesh contracts, generated once from `proto/recmesh/v1/*.proto`.
//!
//! Every service and client depends on this crate rather than compiling the
//! protos itself, so there is one generated copy and one descriptor set.

#![allow(clippy::all, missing_docs)]

/// `recmesh.v1`: messages and the client and server stubs of every service.
pub mod v1 {
    tonic::include_proto!("recmesh.v1");
}

/// Encoded `FileDescriptorSet` of every recmesh proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("recmesh_descriptor");

pub use v1::*;
