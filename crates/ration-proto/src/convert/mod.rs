//! Protobuf ⇄ ration-core: the one place that converts, in both directions.
//!
//! - [`to_core`]: what clients and operators send, checked field by field. A bad
//!   field becomes INVALID_ARGUMENT naming it; nothing unchecked reaches the core.
//! - [`to_proto`]: core results (replies, views, audit records, refusals) as
//!   protobuf messages and gRPC statuses.
//!
//! The direction is in the path: `convert::to_core::acquire(&request)`,
//! `convert::to_proto::lease(&reply)`.

use tonic::Status;

pub mod to_core;
pub mod to_proto;

#[cfg(test)]
mod tests;

/// Records or budgets one page returns when the request leaves `limit` at 0.
pub const DEFAULT_PAGE: usize = 100;
/// Most records or budgets one page returns, whatever the request asks.
pub const MAX_PAGE: usize = 1000;
/// Most operations one Batch call may carry.
pub const MAX_BATCH_OPS: usize = 1024;

fn missing(field: &str) -> Status {
    Status::invalid_argument(format!("{field} is required"))
}
