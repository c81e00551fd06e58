//! What every client of the services (the SDK, rationctl, the simulation, the
//! tests) needs to read a gRPC result the same way: which failures are worth
//! retrying, which status means "overloaded", and who leads.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::v1;

/// The `ErrorInfo.domain` of Ration's structured statuses.
pub const DOMAIN: &str = "ration.v1";
/// The `ErrorInfo.reason` of a node too busy to take the request now.
pub const REASON_OVERLOADED: &str = "OVERLOADED";
/// The `ErrorInfo.reason` of a request refused by a per-principal limit.
pub const REASON_PRINCIPAL_LIMIT: &str = "PRINCIPAL_LIMIT";

/// Whether a failed call may not have taken effect, so sending it again (with the
/// same request id, which makes a write exactly-once) is the way to learn its
/// outcome: the transport failed, the node is overloaded or has no leader, or the
/// deadline passed. Refusals (INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED for a
/// spent budget, ...) are answers, not failures: retrying them is pointless.
pub fn retryable(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Cancelled
            | Code::Internal
    )
}

/// The status of a node whose proposal queue is full: UNAVAILABLE (so it is
/// retryable) with an `ErrorInfo` whose reason is [`REASON_OVERLOADED`] and a
/// `RetryInfo` saying how long to wait. Clients tell it apart from a refusal with
/// [`is_overloaded`], never by reading the message.
pub fn overloaded(message: impl Into<String>, retry_after: Duration) -> Status {
    let mut details = ErrorDetails::with_retry_info(Some(retry_after));
    details.set_error_info(REASON_OVERLOADED, DOMAIN, std::collections::HashMap::new());
    Status::with_error_details(Code::Unavailable, message, details)
}

/// Whether `s` refuses a request for a per-principal limit (RESOURCE_EXHAUSTED
/// with an `ErrorInfo` whose reason is [`REASON_PRINCIPAL_LIMIT`]; its metadata
/// names the `limit` and its `max`).
pub fn is_principal_limit(s: &Status) -> bool {
    s.code() == Code::ResourceExhausted
        && s.get_details_error_info()
            .is_some_and(|i| i.domain == DOMAIN && i.reason == REASON_PRINCIPAL_LIMIT)
}

/// Whether `s` is [`overloaded`]'s status.
pub fn is_overloaded(s: &Status) -> bool {
    s.code() == Code::Unavailable
        && s.get_details_error_info()
            .is_some_and(|i| i.domain == DOMAIN && i.reason == REASON_OVERLOADED)
}

/// How long the server asked the client to wait before retrying, if it said.
pub fn retry_after(s: &Status) -> Option<Duration> {
    s.get_details_retry_info().and_then(|r| r.retry_delay)
}

/// Whether the node that answered `Status` sees itself lead. (Only such a node is
/// sure; a follower's `leader` field may be stale.)
pub fn is_leader(s: &v1::StatusReply) -> bool {
    s.role() == v1::Role::Leader
}

/// A role's lower-case name, for tables, logs and JSON.
pub fn role_name(role: v1::Role) -> &'static str {
    match role {
        v1::Role::Leader => "leader",
        v1::Role::Follower => "follower",
        v1::Role::Candidate => "candidate",
        v1::Role::Learner => "learner",
        v1::Role::Shutdown => "shutdown",
        v1::Role::Unspecified => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overload_is_retryable_and_recognized_without_its_message() {
        let s = overloaded("the proposal queue is full", Duration::from_millis(50));
        assert!(retryable(&s));
        assert!(is_overloaded(&s));
        assert_eq!(retry_after(&s), Some(Duration::from_millis(50)));
        // The details survive the trip through HTTP/2 trailers.
        let mut headers = tonic::codegen::http::HeaderMap::new();
        s.add_header(&mut headers).unwrap();
        let back = Status::from_header_map(&headers).unwrap();
        assert!(is_overloaded(&back), "{back:?}");
        // A spent budget is an answer, not an overload, whatever its message says.
        let spent = Status::resource_exhausted("overloaded queue");
        assert!(!is_overloaded(&spent) && !retryable(&spent));
        assert!(!is_overloaded(&Status::unavailable("no leader")));
    }

    #[test]
    fn roles() {
        let mut s = v1::StatusReply::default();
        assert!(!is_leader(&s));
        s.set_role(v1::Role::Leader);
        assert!(is_leader(&s));
        assert_eq!(role_name(s.role()), "leader");
    }
}
