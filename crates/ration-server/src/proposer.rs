//! Group commit: many client commands become one Raft entry.
//!
//! One task takes everything queued (up to `batch_max_commands` commands or
//! `batch_max_bytes` bytes), waits up to `batch_wait_us` for more if the entry is
//! not full, stamps the leader's clock into it and proposes it. One proposal is in
//! flight at a time: measurements on this stack showed more made entries smaller and
//! throughput lower. So the log flushes once per entry, not once per command.
//!
//! The queue is bounded in commands (`proposal_queue`): a request whose commands do
//! not fit is refused at once as overloaded, never buffered.

use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::Raft;
use ration_core::{Batch, Command, Entry, Op, Outcome};
use ration_store::{NodeId, TypeConfig};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore, TryAcquireError};

use crate::metrics::Metrics;

/// The ledger's only clock: the leader's time stamp for each entry, bounded by its
/// monotonic clock (`ration_core::timebound`).
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// Wall-clock time, ms since the Unix epoch.
    fn now_ms(&self) -> u64;
    /// Monotonic time, ms from an origin fixed for the process.
    fn mono_ms(&self) -> u64 {
        process_mono_ms()
    }
}

/// Milliseconds since this process first asked.
pub fn process_mono_ms() -> u64 {
    static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(std::time::Instant::now);
    u64::try_from(origin.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Wall-clock time.
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }
}

/// The system clock with its wall time moved by a fixed offset: a node whose clock
/// is wrong, for tests.
#[derive(Debug)]
pub struct OffsetClock {
    pub offset_ms: std::sync::atomic::AtomicI64,
}

impl Clock for OffsetClock {
    fn now_ms(&self) -> u64 {
        let off = self.offset_ms.load(std::sync::atomic::Ordering::Relaxed);
        SystemClock.now_ms().saturating_add_signed(off)
    }
}

/// Why a command got no outcome.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ProposeError {
    #[error("this node is not the leader")]
    NotLeader { leader: Option<(NodeId, String)> },
    /// The queue holds this many commands already.
    #[error("the proposal queue is full ({0} commands); retry with backoff")]
    Overloaded(usize),
    #[error("the node is shutting down")]
    Shutdown,
    /// The leader is handing leadership over: it takes no writes meanwhile, so that
    /// its followers stop hearing from it and vote for the new leader.
    #[error("leadership is moving to another node; retry shortly")]
    Transferring,
    /// The command may or may not have been committed: retry with the same request id.
    #[error("outcome unknown ({0}); retry with the same request id")]
    Unknown(String),
}

struct Pending {
    commands: Vec<Command>,
    bytes: usize,
    reply: oneshot::Sender<Result<Vec<Outcome>, ProposeError>>,
    /// One permit per command, held until its outcome is sent: the queue's bound.
    permits: OwnedSemaphorePermit,
}

#[derive(Clone, Copy, Debug)]
pub struct BatchLimits {
    pub max_commands: usize,
    pub max_bytes: usize,
    pub wait: Duration,
    /// Most commands queued or in flight at once; a request that would pass it is
    /// refused as overloaded. (Counted in commands, not requests: one Batch RPC of
    /// 1,024 operations takes 1,024.)
    pub queue: usize,
}

/// A handle to submit commands.
#[derive(Clone, Debug)]
pub struct Proposer {
    tx: mpsc::UnboundedSender<Pending>,
    room: Arc<Semaphore>,
    queue: usize,
}

impl Proposer {
    pub fn start(
        raft: Raft<TypeConfig>,
        time: Stamper,
        limits: BatchLimits,
        metrics: Arc<Metrics>,
    ) -> Self {
        // The channel needs no bound of its own: every message holds permits.
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(raft, time, limits, rx, metrics));
        Self { tx, room: Arc::new(Semaphore::new(limits.queue)), queue: limits.queue }
    }

    /// Whether nothing is queued or in flight (every accepted command answered).
    pub fn idle(&self) -> bool {
        self.room.available_permits() == self.queue
    }

    /// Proposes commands together (in one entry, in order) and waits for their
    /// outcomes: exactly one per command, in the same order.
    pub async fn propose(&self, commands: Vec<Command>) -> Result<Vec<Outcome>, ProposeError> {
        let bytes = commands.iter().map(estimate_bytes).sum();
        let n = u32::try_from(commands.len()).unwrap_or(u32::MAX);
        let permits = self.room.clone().try_acquire_many_owned(n).map_err(|e| match e {
            TryAcquireError::NoPermits => ProposeError::Overloaded(self.queue),
            TryAcquireError::Closed => ProposeError::Shutdown,
        })?;
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Pending { commands, bytes, reply, permits })
            .map_err(|_| ProposeError::Shutdown)?;
        rx.await.map_err(|_| ProposeError::Shutdown)?
    }
}

/// An upper estimate of a command's encoded size, without encoding it.
fn estimate_bytes(c: &Command) -> usize {
    let Some(r) = c.request() else { return 8 };
    let names = r.client.as_str().len() + r.principal.as_str().len() + 48;
    names
        + match &r.op {
            Op::CreateBudget(s) | Op::UpdateBudget { spec: s, .. } => {
                s.path.as_str().len()
                    + s.limits.iter().map(|l| l.unit.as_str().len() + 40).sum::<usize>()
            }
            Op::DeleteBudget { path, .. } => path.as_str().len() + 12,
            Op::Acquire(a) | Op::AcquireNext(ration_core::AcquireNext { acquire: a, .. }) => {
                a.budget.as_str().len() + a.unit.as_str().len() + 48
            }
            Op::Overrun(o) => o.budget.as_str().len() + o.unit.as_str().len() + 24,
            Op::Report(_) | Op::Release(_) => 32,
            Op::SetLimits(_) => 40,
            Op::GrantRole(g) | Op::RevokeRole(g) => {
                g.principal.as_str().len() + g.scope.to_string().len() + 8
            }
        }
}

/// Writes one entry; None if abandoned. On a leader, the write is abandoned (its callers get
/// `Unknown`: retrying with the same request id is safe) once this node stops
/// leading or its term changes: openraft answers a write only when its log index is
/// applied or truncated, and an entry replaced by a snapshot from the next leader is
/// neither, so waiting on it would stall this proposer (and every later write)
/// forever, even after this node leads again.
async fn write(
    raft: &Raft<TypeConfig>,
    entry: Entry,
) -> Option<
    Result<
        openraft::raft::ClientWriteResponse<TypeConfig>,
        RaftError<NodeId, ClientWriteError<NodeId, openraft::BasicNode>>,
    >,
> {
    let mut metrics = raft.metrics();
    let (leading, term) = {
        let m = metrics.borrow_and_update();
        (m.state == openraft::ServerState::Leader, m.current_term)
    };
    if !leading {
        // Not leading: openraft answers at once (ForwardToLeader, with a hint).
        return Some(raft.client_write(entry).await);
    }
    let deposed = async move {
        loop {
            let still = {
                let m = metrics.borrow_and_update();
                m.state == openraft::ServerState::Leader && m.current_term == term
            };
            if !still {
                return;
            }
            if metrics.changed().await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        written = raft.client_write(entry) => Some(written),
        () = deposed => None,
    }
}

/// What the proposer stamps entries with: the clock, the bound on ledger time, and
/// where to read the ledger's time.
#[derive(Clone, Debug)]
pub struct Stamper {
    pub clock: Arc<dyn Clock>,
    pub bound: Arc<std::sync::Mutex<ration_core::timebound::TimeBound>>,
    pub ledger_now: ration_store::LedgerNow,
}

impl Stamper {
    /// The time stamp for an entry proposed now in `term`.
    fn stamp(&self, term: u64) -> u64 {
        let ledger_ms = self.ledger_now.get();
        let (wall, mono) = (self.clock.now_ms(), self.clock.mono_ms());
        self.bound.lock().unwrap_or_else(|p| p.into_inner()).stamp(term, wall, mono, ledger_ms)
    }
}

async fn run(
    raft: Raft<TypeConfig>,
    time: Stamper,
    limits: BatchLimits,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    metrics: Arc<Metrics>,
) {
    while let Some(first) = rx.recv().await {
        let mut count = first.commands.len();
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + limits.wait;
        while count < limits.max_commands && bytes < limits.max_bytes {
            let next = match rx.try_recv() {
                Ok(p) => Some(p),
                Err(mpsc::error::TryRecvError::Disconnected) => None,
                Err(mpsc::error::TryRecvError::Empty) => {
                    tokio::time::timeout_at(deadline, rx.recv()).await.ok().flatten()
                }
            };
            let Some(p) = next else { break };
            count += p.commands.len();
            bytes += p.bytes;
            batch.push(p);
        }
        // A caller's commands stay together: an entry may exceed the command limit by
        // one caller's batch (at most MAX_BATCH_OPS), which the configuration keeps
        // under the ledger's per-entry maximum.
        let mut commands = Vec::with_capacity(count);
        let mut replies = Vec::with_capacity(batch.len());
        // Released when this entry's outcomes are sent (dropped at the loop's end).
        let mut _permits = Vec::with_capacity(batch.len());
        for p in batch {
            replies.push((p.commands.len(), p.reply));
            commands.extend(p.commands);
            _permits.push(p.permits);
        }
        // Each acquire's unit and top-level budget, for the metrics' labels.
        let acquires: Vec<crate::metrics::CommandLabels> = commands
            .iter()
            .map(|c| match c.request().map(|r| &r.op) {
                Some(
                    Op::Acquire(a) | Op::AcquireNext(ration_core::AcquireNext { acquire: a, .. }),
                ) => crate::metrics::CommandLabels::Acquire {
                    unit: a.unit.as_str().to_owned(),
                    top: a.budget.root().to_owned(),
                },
                Some(Op::Overrun(o)) => {
                    crate::metrics::CommandLabels::Overrun { unit: o.unit.as_str().to_owned() }
                }
                _ => crate::metrics::CommandLabels::Other,
            })
            .collect();
        let term = raft.metrics().borrow().current_term;
        let entry = Entry::V1(Batch { time_ms: time.stamp(term), commands });
        let Some(written) = write(&raft, entry).await else {
            let err = ProposeError::Unknown(
                "leadership changed while the write was in flight".to_owned(),
            );
            for (_, reply) in replies {
                let _ = reply.send(Err(err.clone()));
            }
            continue;
        };
        match written {
            // The ledger answers every command of an entry, in order: anything else
            // would hand callers each other's outcomes, so it fails them all.
            Ok(written) if written.data.outcomes.len() != acquires.len() => {
                let err = format!(
                    "the ledger returned {} outcomes for {} commands",
                    written.data.outcomes.len(),
                    acquires.len()
                );
                tracing::error!("{err}");
                debug_assert!(false, "{err}");
                for (_, reply) in replies {
                    let _ = reply.send(Err(ProposeError::Unknown(err.clone())));
                }
            }
            Ok(written) => {
                metrics.proposed(&acquires, &written.data.outcomes);
                let mut outcomes = written.data.outcomes.into_iter();
                for (n, reply) in replies {
                    let _ = reply.send(Ok(outcomes.by_ref().take(n).collect()));
                }
            }
            Err(e) => {
                let err = match e {
                    RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
                        ProposeError::NotLeader {
                            leader: f.leader_id.zip(f.leader_node.map(|n| n.addr)),
                        }
                    }
                    other => ProposeError::Unknown(other.to_string()),
                };
                for (_, reply) in replies {
                    let _ = reply.send(Err(err.clone()));
                }
            }
        }
    }
}
