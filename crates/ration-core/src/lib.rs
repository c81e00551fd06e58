//! # ration-core
//!
//! The quota ledger of Ration as a pure, deterministic state machine.
//!
//! Architecture invariant: this crate knows nothing about protobuf, sled, tokio or
//! openraft. It reads no clock, does no I/O, and iterates no hash map in hash
//! order. Its one random draw is the seed of the hashed indexes
//! (`index::HashIndex`), which decides where entries sit in
//! memory, never what a lookup answers or the order anything is walked or written
//! in. `Ledger::apply(index, entry)` is a function of the state and the entry
//! alone, so every replica that applies the same log holds the same bytes
//! (`Ledger::digest`). A test of the
//! workspace (`tests/layering.rs`) fails if the dependency tree grows an I/O crate.
//!
//! - [`names`]: validated budget paths, units, client ids, principals, lease ids.
//! - [`window`]: calendar windows computed from ledger time.
//! - [`command`]: the versioned log entry ([`Entry`]) and replies.
//! - [`ledger`]: the state machine, its queries, snapshots and invariant checks.
//! - [`audit`]: hash-chained audit records, queries, spend per window, verification.
//! - [`error`]: typed refusals.
//! - [`timebound`]: the bound on the time stamps a leader may give entries.

// Overflow is a safety bug here: every sum must be checked, saturating or proven bounded.
#![warn(clippy::arithmetic_side_effects)]

// A planted bug exists for the simulation to catch (crates/ration-sim/README.md) and
// only in debug builds: a release build with it (`--release --all-features`) is a
// compile error, so no release `rationd` can ship it.
#[cfg(all(feature = "planted-bug-expiry-refunds", not(debug_assertions)))]
compile_error!(
    "feature `planted-bug-expiry-refunds` plants a bug for the simulation to catch; it is refused in release builds"
);

pub mod audit;
pub mod command;
mod dedup;
pub mod error;
mod hashing;
mod index;
pub mod ledger;
pub mod names;
pub mod timebound;
pub mod window;
mod wire;

pub use audit::{AuditFilter, AuditKind, AuditLog, AuditRecord, ChainHead};
pub use command::{
    Acquire, AcquireNext, Authority, Batch, BudgetSpec, Command, Entry, FailPolicy, Grant,
    LimitSpec, Op, Outcome, Overrun, Release, Reply, Report, Request, Role, RoleGrant, Scope,
    TemplateSpec, MAX_AMOUNT,
};
pub use error::{ErrorKind, LedgerError};
pub use hashing::{encode, encode_onto, try_encode};
pub use ledger::{
    Action, Applied, BudgetView, LeaseView, Ledger, LedgerConfig, LimitView, PrincipalLimits,
    PrincipalUsage, TemplateView, Totals,
};
pub use names::{BudgetPath, ClientId, LeaseId, Principal, Unit};
pub use window::{Period, Window};
