//! # ration-proto
//!
//! The gRPC interfaces generated from `proto/`; [`convert`], the one place that
//! turns protobuf messages into ration-core types (checking every field) and core
//! results back into protobuf replies and gRPC statuses; and [`rpc`], how every
//! client reads a result (retryable, overloaded, leader).

pub mod convert;
pub mod rpc;

#[allow(clippy::all, clippy::pedantic, missing_docs, missing_debug_implementations)]
pub mod v1 {
    tonic::include_proto!("ration.v1");
}

/// The encoded file descriptor set, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ration_descriptor");
