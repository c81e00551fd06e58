//! Calls in flight: one ledger lease per call, on a limit of units in flight
//! (a `concurrent` window).
//!
//! Local allowance cannot bound calls in flight across gateways: a unit spent
//! locally never comes back to the pool. So a slot is a real lease of one unit,
//! acquired when the call starts (one round trip, exactly once through retries)
//! and released when it ends. The ledger holds at most the limit's cap of them at
//! once, whatever the gateways do; a crashed gateway's slots come back when their
//! leases expire. The lease asked for covers `max_call` from when the answer
//! arrives: its ttl is `max_call` plus the most one round may take (its answer
//! comes within that, or not at all) plus the SDK's margin (ledger time may run
//! ahead of this clock by that much). A call that outlives `max_call` has no slot
//! any more at the ledger: give the longest a call may take.

use std::sync::Arc;
use std::time::Duration;

use ration_proto::v1::batch_op::Op;
use ration_proto::v1::batch_result::Result as R;
use ration_proto::v1::{self, BatchOp};

use crate::remote::ClusterError;
use crate::Sdk;

/// Attempts to release a slot (each a whole batch round, with its own retries)
/// before leaving it to expire.
const RELEASE_ROUNDS: u32 = 3;

/// Why no slot was taken.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// The ledger refused: every unit is in flight (RESOURCE_EXHAUSTED), the
    /// budget is frozen, or the request is wrong. `code` is the gRPC code.
    #[error("refused ({code:?}): {message}")]
    Refused { code: tonic::Code, message: String },
    /// No answer: the slot may or may not have been taken; if it was, it comes
    /// back when its lease expires.
    #[error(transparent)]
    Unreachable(#[from] ClusterError),
    /// The answer came too late for the lease to cover `max_call` from now (this
    /// host stalled): the slot was given back.
    #[error("the slot was granted too late to cover a call of {max_call_ms} ms; given back")]
    Late { max_call_ms: u64 },
}

/// One unit of a limit on units in flight, held for one call (until at least
/// [`Slot::deadline_ms`]; a crashed gateway's comes back at the ledger when its
/// lease expires, `max_call` plus a round's deadline plus the margin after it was
/// asked for). End it with
/// [`Slot::end`]; dropped without it, it is released in the background.
#[derive(Debug)]
pub struct Slot {
    sdk: Arc<Sdk>,
    lease_id: u64,
    /// On the SDK's clock: the call must end by then (its lease is valid at the
    /// ledger until at least then).
    deadline_ms: u64,
    ended: bool,
}

impl Slot {
    /// The lease holding the unit.
    pub fn lease_id(&self) -> u64 {
        self.lease_id
    }

    /// When, on the SDK's clock (`Sdk::gateway().clock()`), the slot stops being
    /// held at the ledger: at least `max_call` after it was handed out.
    pub fn deadline_ms(&self) -> u64 {
        self.deadline_ms
    }

    /// The call ended: the unit goes back. `used` is counted as consumed on the
    /// budget's limits in the same unit that count spend (1 for a call that
    /// happened; a `concurrent` limit counts nothing).
    pub async fn end(mut self, used: u64) -> Result<(), ClusterError> {
        self.ended = true;
        release(&self.sdk, self.lease_id, used).await
    }

    /// Forgets the slot without releasing it, as a crashed gateway would: the
    /// ledger gets its unit back when the lease expires.
    pub fn abandon(mut self) {
        self.ended = true;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let (sdk, lease_id) = (self.sdk.clone(), self.lease_id);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = release(&sdk, lease_id, 0).await;
            });
        }
    }
}

async fn release(sdk: &Sdk, lease_id: u64, used: u64) -> Result<(), ClusterError> {
    let op = BatchOp {
        op: Some(Op::Release(v1::ReleaseRequest {
            meta: sdk.cluster().meta(),
            lease_id,
            consumed_total: i64::try_from(used).unwrap_or(i64::MAX),
        })),
    };
    let mut last = None;
    for _ in 0..RELEASE_ROUNDS {
        // The same request (id) each round: exactly once.
        match sdk.cluster().batch(vec![op.clone()]).await {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or(ClusterError::NoEndpoints))
}

impl Sdk {
    /// Takes one `unit` on `budget` for a call about to start: an acquire of one
    /// unit, sent now and retried with its request id until answered (within a
    /// round's deadline), valid for `max_call`. Meant for a limit of units in flight
    /// (`UNIT=N/concurrent`) on the budget or an ancestor: at most N slots are held
    /// at once, across every gateway. Do not spend the same unit through local
    /// allowance (`handle`, `reserve`): a lease held there holds units in flight too.
    pub async fn slot(
        self: &Arc<Self>,
        budget: &str,
        unit: &str,
        max_call: Duration,
    ) -> Result<Slot, SlotError> {
        use crate::local::LocalClock;
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let margin_ms = ms(self.lease_margin());
        let max_call_ms = ms(max_call).max(1);
        let ttl = max_call_ms
            .saturating_add(ms(self.cluster().round_deadline()))
            .saturating_add(margin_ms);
        let ttl_ms = i64::try_from(ttl).unwrap_or(i64::MAX);
        let sent = self.gateway().clock().now_ms();
        let op = BatchOp {
            op: Some(Op::Acquire(v1::AcquireRequest {
                meta: self.cluster().meta(),
                budget: budget.to_owned(),
                unit: unit.to_owned(),
                wanted: 1,
                min: 1,
                ttl_ms,
                starts_at_ms: 0,
            })),
        };
        let results = self.cluster().batch(vec![op]).await?;
        match results.into_iter().next().and_then(|r| r.result) {
            Some(R::Lease(lease)) => {
                // Valid from when it was granted, which is after it was sent.
                let granted_ttl = u64::try_from(lease.ttl_ms).unwrap_or(0).min(ttl);
                let deadline_ms = sent.saturating_add(granted_ttl.saturating_sub(margin_ms));
                let slot =
                    Slot { sdk: self.clone(), lease_id: lease.lease_id, deadline_ms, ended: false };
                if self.gateway().clock().now_ms().saturating_add(max_call_ms) > deadline_ms {
                    let _ = slot.end(0).await;
                    return Err(SlotError::Late { max_call_ms });
                }
                Ok(slot)
            }
            Some(R::Error(e)) => {
                Err(SlotError::Refused { code: tonic::Code::from(e.code), message: e.message })
            }
            _ => Err(SlotError::Refused {
                code: tonic::Code::Internal,
                message: "the cluster answered an acquire with something else".into(),
            }),
        }
    }
}
