//! Group commit: many client commands become one Raft entry.
//!
//! One task takes everything queued (up to `batch_max_commands` commands or
//! `batch_max_bytes` bytes), waits up to `batch_wait_us` for more if the entry is
//! not full, stamps the leader's clock into it and proposes it. So the log flushes
//! once per entry, not once per command.
//!
//! Pipelined, but only with full entries: while an entry is in flight, the next
//! one is proposed only once it is full, up to `max_proposals_in_flight` at once.
//! With little load that is one proposal at a time, as before (measurements on this
//! stack showed that proposing partial entries concurrently made entries smaller
//! and throughput lower); under load, and whenever a commit takes long (voters far
//! apart), full entries follow each other without waiting for the previous commit.
//! Entries reach openraft in the order they were built (`client_write_ff` queues
//! each before the next is built), so the log order is the proposal order.
//!
//! The queue is bounded in commands (`proposal_queue`): a request whose commands do
//! not fit is refused at once as overloaded, never buffered.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
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
    /// Most entries proposed and not yet answered; a second and later one is
    /// proposed only when full.
    pub in_flight: usize,
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
    names + op_bytes(&r.op)
}

fn op_bytes(op: &Op) -> usize {
    match op {
        Op::CreateBudget(s) | Op::UpdateBudget { spec: s, .. } => {
            s.path.as_str().len()
                + s.limits.iter().map(|l| l.unit.as_str().len() + 40).sum::<usize>()
        }
        Op::DeleteBudget { path, .. } => path.as_str().len() + 12,
        Op::SetTemplate(t) => {
            t.parent.as_str().len()
                + 24
                + t.limits.iter().map(|l| l.unit.as_str().len() + 40).sum::<usize>()
        }
        Op::DeleteTemplate { parent: path } | Op::Freeze { path, .. } => path.as_str().len() + 8,
        Op::Acquire(a) | Op::AcquireNext(ration_core::AcquireNext { acquire: a, .. }) => {
            a.budget.as_str().len() + a.unit.as_str().len() + 48
        }
        Op::Overrun(o) => o.budget.as_str().len() + o.unit.as_str().len() + 24,
        Op::Report(_) | Op::Release(_) => 32,
        Op::SetLimits(_) => 40,
        Op::GrantRole(g) | Op::RevokeRole(g) => {
            g.principal.as_str().len() + g.scope.to_string().len() + 8
        }
        Op::SetPrice(p) => p.model.len() + 40,
        Op::SetOptions { path, options } => {
            path.as_str().len() + 8 + 4 * options.thresholds_pct.len()
        }
        Op::RecordCall(c) => c.budget.as_str().len() + c.trace.len() + usage_bytes(&c.usage),
        Op::Annotated { note, op } => {
            note.trace.as_ref().map_or(0, String::len)
                + note.usage.iter().map(usage_bytes).sum::<usize>()
                + 8
                + op_bytes(op)
        }
    }
}

fn usage_bytes(u: &ration_core::command::UsageLine) -> usize {
    u.model.len() + 64
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

type Replies = Vec<(usize, oneshot::Sender<Result<Vec<Outcome>, ProposeError>>)>;
type InFlight = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Commands waiting to be proposed, in arrival order.
#[derive(Default)]
struct Queued {
    pending: VecDeque<Pending>,
    commands: usize,
    bytes: usize,
}

impl Queued {
    fn push(&mut self, p: Pending) {
        self.commands += p.commands.len();
        self.bytes += p.bytes;
        self.pending.push_back(p);
    }

    fn full(&self, limits: &BatchLimits) -> bool {
        self.commands >= limits.max_commands || self.bytes >= limits.max_bytes
    }

    /// The next entry's worth, oldest first. A caller's commands stay together:
    /// an entry may exceed the command limit by one caller's batch (at most
    /// MAX_BATCH_OPS), which the configuration keeps under the ledger's per-entry
    /// maximum.
    fn take(&mut self, limits: &BatchLimits) -> Vec<Pending> {
        let (mut count, mut bytes) = (0, 0);
        let mut batch = Vec::new();
        while count < limits.max_commands && bytes < limits.max_bytes {
            let Some(p) = self.pending.pop_front() else { break };
            count += p.commands.len();
            bytes += p.bytes;
            batch.push(p);
        }
        self.commands -= count;
        self.bytes -= bytes;
        batch
    }
}

async fn run(
    raft: Raft<TypeConfig>,
    time: Stamper,
    limits: BatchLimits,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    metrics: Arc<Metrics>,
) {
    let mut queued = Queued::default();
    // Each entry in flight answers its callers from a task of its own.
    let mut in_flight = tokio::task::JoinSet::new();
    let mut open = true;
    let most = limits.in_flight.max(1);
    loop {
        while open {
            match rx.try_recv() {
                Ok(p) => queued.push(p),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        let ready = !queued.pending.is_empty()
            && (in_flight.is_empty() || (queued.full(&limits) && in_flight.len() < most));
        if ready {
            if in_flight.is_empty() && !queued.full(&limits) {
                // Nothing in flight and the entry is not full: wait a little for more.
                let deadline = tokio::time::Instant::now() + limits.wait;
                while open && !queued.full(&limits) {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(p)) => queued.push(p),
                        Ok(None) => open = false,
                        Err(_) => break,
                    }
                }
            }
            let batch = queued.take(&limits);
            if let Some(waiting) = propose(&raft, &time, batch, &metrics).await {
                in_flight.spawn(waiting);
            }
            continue;
        }
        if !open && queued.pending.is_empty() && in_flight.is_empty() {
            return;
        }
        tokio::select! {
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
            p = rx.recv(), if open => match p {
                Some(p) => queued.push(p),
                None => open = false,
            },
        }
    }
}

/// Builds one entry of `batch` and hands it to openraft. Returns what answers its
/// callers once it is committed and applied, or None when they are answered
/// already (this node does not lead, or openraft stopped).
///
/// On a leader, the write is abandoned (its callers get `Unknown`: retrying with the
/// same request id is safe) once this node stops leading or its term changes:
/// openraft answers a write only when its log index is applied or truncated, and an
/// entry replaced by a snapshot from the next leader is neither, so waiting on it
/// would stall the callers forever, even after this node leads again.
async fn propose(
    raft: &Raft<TypeConfig>,
    time: &Stamper,
    batch: Vec<Pending>,
    metrics: &Arc<Metrics>,
) -> Option<InFlight> {
    let count = batch.iter().map(|p| p.commands.len()).sum();
    let mut commands = Vec::with_capacity(count);
    let mut replies: Replies = Vec::with_capacity(batch.len());
    // Released when this entry's outcomes are sent.
    let mut permits = Vec::with_capacity(batch.len());
    for p in batch {
        replies.push((p.commands.len(), p.reply));
        commands.extend(p.commands);
        permits.push(p.permits);
    }
    // Each acquire's unit and top-level budget, for the metrics' labels.
    let labels: Vec<crate::metrics::CommandLabels> = commands
        .iter()
        .map(|c| match c.request().map(|r| &r.op) {
            Some(Op::Acquire(a) | Op::AcquireNext(ration_core::AcquireNext { acquire: a, .. })) => {
                crate::metrics::CommandLabels::Acquire {
                    unit: a.unit.as_str().to_owned(),
                    top: a.budget.root().to_owned(),
                }
            }
            Some(Op::Overrun(o)) => {
                crate::metrics::CommandLabels::Overrun { unit: o.unit.as_str().to_owned() }
            }
            _ => crate::metrics::CommandLabels::Other,
        })
        .collect();
    let mut watch = raft.metrics();
    let (leading, term) = {
        let m = watch.borrow_and_update();
        (m.state == openraft::ServerState::Leader, m.current_term)
    };
    let entry: ration_store::SharedEntry =
        Entry::V1(Batch { time_ms: time.stamp(term), commands }).into();
    if !leading {
        // Not leading: openraft answers at once (ForwardToLeader, with a hint).
        let written = raft.client_write(entry).await.map_err(|e| match e {
            RaftError::APIError(e) => e.into(),
            RaftError::Fatal(f) => ProposeError::Unknown(f.to_string()),
        });
        answer(written, replies, &labels, metrics);
        return None;
    }
    let rx = match raft.client_write_ff(entry).await {
        Ok(rx) => rx,
        Err(fatal) => {
            answer(Err(ProposeError::Unknown(fatal.to_string())), replies, &labels, metrics);
            return None;
        }
    };
    let deposed = async move {
        loop {
            let still = {
                let m = watch.borrow_and_update();
                m.state == openraft::ServerState::Leader && m.current_term == term
            };
            if !still || watch.changed().await.is_err() {
                return;
            }
        }
    };
    let metrics = metrics.clone();
    Some(Box::pin(async move {
        let written = tokio::select! {
            r = rx => match r {
                Ok(Ok(w)) => Ok(w),
                Ok(Err(e)) => Err(e.into()),
                Err(_) => Err(ProposeError::Unknown("the Raft core stopped".to_owned())),
            },
            () = deposed => Err(ProposeError::Unknown(
                "leadership changed while the write was in flight".to_owned(),
            )),
        };
        answer(written, replies, &labels, &metrics);
        drop(permits);
    }))
}

impl From<ClientWriteError<NodeId, openraft::BasicNode>> for ProposeError {
    fn from(e: ClientWriteError<NodeId, openraft::BasicNode>) -> Self {
        match e {
            ClientWriteError::ForwardToLeader(f) => {
                ProposeError::NotLeader { leader: f.leader_id.zip(f.leader_node.map(|n| n.addr)) }
            }
            other => ProposeError::Unknown(other.to_string()),
        }
    }
}

/// Sends each caller its outcomes (or the entry's error).
fn answer(
    written: Result<openraft::raft::ClientWriteResponse<TypeConfig>, ProposeError>,
    replies: Replies,
    labels: &[crate::metrics::CommandLabels],
    metrics: &Metrics,
) {
    match written {
        // The ledger answers every command of an entry, in order: anything else
        // would hand callers each other's outcomes, so it fails them all.
        Ok(written) if written.data.outcomes.len() != labels.len() => {
            let err = format!(
                "the ledger returned {} outcomes for {} commands",
                written.data.outcomes.len(),
                labels.len()
            );
            tracing::error!("{err}");
            debug_assert!(false, "{err}");
            for (_, reply) in replies {
                let _ = reply.send(Err(ProposeError::Unknown(err.clone())));
            }
        }
        Ok(written) => {
            metrics.proposed(labels, &written.data.outcomes);
            let mut outcomes = written.data.outcomes.into_iter();
            for (n, reply) in replies {
                let _ = reply.send(Ok(outcomes.by_ref().take(n).collect()));
            }
        }
        Err(err) => {
            for (_, reply) in replies {
                let _ = reply.send(Err(err.clone()));
            }
        }
    }
}
