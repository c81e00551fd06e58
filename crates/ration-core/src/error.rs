//! Typed refusals. A refusal is an ordinary outcome of applying a command: it is
//! replicated, remembered for retries, and changes nothing else.

use serde::{Deserialize, Serialize};

use crate::names::{BudgetPath, LeaseId, Unit};
use crate::window::Window;

/// What class of problem a refusal is; the service edge maps it to a gRPC code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request itself is malformed (INVALID_ARGUMENT).
    InvalidArgument,
    /// A named budget or lease does not exist (NOT_FOUND).
    NotFound,
    /// The budget already exists (ALREADY_EXISTS).
    AlreadyExists,
    /// The request is well formed but the ledger's state forbids it (FAILED_PRECONDITION).
    FailedPrecondition,
    /// Not enough allowance, or a ledger limit is full (RESOURCE_EXHAUSTED).
    ResourceExhausted,
    /// The lease belongs to another principal, or the principal lacks the role
    /// (PERMISSION_DENIED).
    PermissionDenied,
    /// A concurrent change won (ABORTED): re-read and retry.
    Aborted,
}

/// Every way the ledger refuses a command. Messages say what was wrong and, where
/// it helps, what to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum LedgerError {
    #[error("invalid budget path {path:?}: {reason}")]
    InvalidPath { path: String, reason: String },
    #[error("invalid unit {unit:?}: {reason}")]
    InvalidUnit { unit: String, reason: String },
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    #[error("invalid amount for {field}: {value} is above the largest allowed amount {max}")]
    AmountTooLarge { field: String, value: u64, max: u64 },
    #[error("budget {path} does not exist")]
    BudgetNotFound { path: BudgetPath },
    #[error("budget {path} already exists; update it with its current version instead")]
    BudgetExists { path: BudgetPath },
    #[error("parent budget {parent} of {path} does not exist; create it first")]
    ParentNotFound { path: BudgetPath, parent: BudgetPath },
    #[error("budget {path} has {children} child budget(s); delete them first")]
    HasChildren { path: BudgetPath, children: u64 },
    #[error("budget {path} has {leases} live lease(s) in its subtree; wait for them to settle or expire")]
    HasLiveLeases { path: BudgetPath, leases: u64 },
    #[error(
        "budget {path} is at version {actual}, not the expected {expected}; re-read it and retry"
    )]
    VersionMismatch { path: BudgetPath, expected: u64, actual: u64 },
    #[error("new cap {cap} for {unit} per {window} on {path} is below what is already consumed or leased ({in_use})")]
    CapBelowUsage { path: BudgetPath, unit: Unit, window: Window, cap: u64, in_use: u64 },
    #[error("neither {path} nor any ancestor has a limit in unit {unit}")]
    NoLimitForUnit { path: BudgetPath, unit: Unit },
    #[error("budget {path} is exhausted for {unit} per {window}: {available} available, at least {min} wanted")]
    Exhausted { path: BudgetPath, unit: Unit, window: Window, available: u64, min: u64 },
    #[error("lease {lease} is unknown: never granted, or settled and forgotten")]
    LeaseNotFound { lease: LeaseId },
    #[error("lease {lease} has expired; its allowance was charged as consumed; send a final release to get a refund")]
    LeaseExpired { lease: LeaseId },
    #[error("lease {lease} belongs to another principal")]
    ForeignLease { lease: LeaseId },
    #[error("lease {lease} granted {granted} and {reported} is already reported; {requested} more does not fit")]
    OverReport { lease: LeaseId, granted: u64, reported: u64, requested: u64 },
    #[error("lease {lease} already reported {reported} consumed; a final total of {total} cannot be lower")]
    ReleaseBelowReported { lease: LeaseId, reported: u64, total: u64 },
    #[error("the ledger holds its maximum of {max} {what}; retry later or raise the limit")]
    LedgerFull { what: String, max: u64 },
    #[error("request {request} of client {client} is older than the {window} requests remembered for it; send it with a new request id")]
    RequestTooOld { client: String, request: u64, window: u32 },
    #[error("request {request} of client {client} was already used for a different command; use a new request id")]
    RequestIdReused { client: String, request: u64 },
    #[error("principal {principal} holds its maximum of {max} {what}; retry when it holds fewer, or have an operator raise the limit (rationctl limits set)")]
    PrincipalLimit { principal: String, what: String, max: u64 },
    #[error("client id {client} belongs to another principal (requests are exactly-once per principal and client id); use a client id of your own")]
    ForeignClient { client: String },
    #[error("principal {principal} may not {action}: that needs {needs}; it holds {holds} (an admin grants roles with `rationctl role grant`)")]
    NotAuthorized { principal: String, action: String, needs: String, holds: String },
    #[error("budget {path} is frozen: it grants nothing until an operator unfreezes it (rationctl budget unfreeze {path})")]
    Frozen { path: BudgetPath },
    #[error("run {path} was halted by its runaway guard: {reason}; an operator may resume it (rationctl budget unfreeze {path})")]
    Halted { path: BudgetPath, reason: String },
    #[error("run {path} was granted its guard's {max} {unit} for this {per_ms} ms span; more after {span_end_ms} (spending all of it halts the run)")]
    GuardReached { path: BudgetPath, unit: Unit, max: u64, per_ms: u64, span_end_ms: u64 },
    #[error(
        "run {path} ended at {ended_at_ms} (its template's max duration); it grants nothing more"
    )]
    RunEnded { path: BudgetPath, ended_at_ms: u64 },
    #[error("budget {path} has no template")]
    TemplateNotFound { path: BudgetPath },
    #[error("budget {path} has a template; delete the template first (rationctl budget template delete {path})")]
    HasTemplate { path: BudgetPath },
}

impl LedgerError {
    pub fn kind(&self) -> ErrorKind {
        use LedgerError::*;
        match self {
            InvalidPath { .. }
            | InvalidUnit { .. }
            | InvalidArgument { .. }
            | AmountTooLarge { .. }
            | RequestIdReused { .. } => ErrorKind::InvalidArgument,
            BudgetNotFound { .. } | LeaseNotFound { .. } | TemplateNotFound { .. } => {
                ErrorKind::NotFound
            }
            BudgetExists { .. } => ErrorKind::AlreadyExists,
            ParentNotFound { .. }
            | HasChildren { .. }
            | HasLiveLeases { .. }
            | CapBelowUsage { .. }
            | NoLimitForUnit { .. }
            | LeaseExpired { .. }
            | OverReport { .. }
            | ReleaseBelowReported { .. }
            | RequestTooOld { .. }
            | Frozen { .. }
            | Halted { .. }
            | RunEnded { .. }
            | HasTemplate { .. } => ErrorKind::FailedPrecondition,
            Exhausted { .. } | LedgerFull { .. } | PrincipalLimit { .. } | GuardReached { .. } => {
                ErrorKind::ResourceExhausted
            }
            ForeignLease { .. } | ForeignClient { .. } | NotAuthorized { .. } => {
                ErrorKind::PermissionDenied
            }
            VersionMismatch { .. } => ErrorKind::Aborted,
        }
    }
}
