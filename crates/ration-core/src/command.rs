//! The replicated log format: a versioned batch of ledger commands, and the reply
//! each command gets. This is what Raft stores; it is not the wire protocol (one
//! crate converts between protobuf and these types).

use serde::{Deserialize, Serialize};

use crate::error::LedgerError;
use crate::names::{BudgetPath, ClientId, LeaseId, Principal, Unit};
use crate::window::Window;

/// Largest amount, cap or allowance the ledger accepts (10^18: a trillion dollars
/// in `usd_micros`). Sums of amounts under it cannot overflow a `u64`.
pub const MAX_AMOUNT: u64 = 1_000_000_000_000_000_000;
/// Most limits one budget may carry.
pub const MAX_LIMITS_PER_BUDGET: usize = 16;
/// Most instances one template may have (a template edit rewrites them all in one
/// command, so this bounds that command's work).
pub const MAX_TEMPLATE_INSTANCES: u64 = 100_000;
/// Shortest idle time after which a template's instance may expire (0: never).
pub const MIN_TEMPLATE_IDLE_MS: u64 = 1_000;
/// Longest idle time a template may set (a leap year).
pub const MAX_TEMPLATE_IDLE_MS: u64 = 366 * 24 * 3_600_000;

/// What a gateway does with a limit when it cannot reach the cluster and its leases
/// are spent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum FailPolicy {
    /// Refuse every call: the default for hard caps.
    #[default]
    FailClosed,
    /// Admit up to `amount` in total while cut off, then refuse.
    StaticAllowance { amount: u64 },
}

/// One limit of a budget: at most `cap` of `unit` per `window`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitSpec {
    pub unit: Unit,
    pub cap: u64,
    pub window: Window,
    pub on_unreachable: FailPolicy,
}

/// A budget as an operator declares it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetSpec {
    pub path: BudgetPath,
    pub limits: Vec<LimitSpec>,
}

impl BudgetSpec {
    /// Checks caps, policies and that no (unit, window) appears twice.
    pub fn validate(&self) -> Result<(), LedgerError> {
        if self.limits.len() > MAX_LIMITS_PER_BUDGET {
            return Err(LedgerError::InvalidArgument {
                field: "limits".into(),
                reason: format!(
                    "{} limits given; a budget holds at most {MAX_LIMITS_PER_BUDGET}",
                    self.limits.len()
                ),
            });
        }
        for (i, limit) in self.limits.iter().enumerate() {
            check_amount("cap", limit.cap)?;
            if let FailPolicy::StaticAllowance { amount } = limit.on_unreachable {
                if amount > limit.cap {
                    return Err(LedgerError::InvalidArgument {
                        field: "on_unreachable.static_allowance".into(),
                        reason: format!(
                            "static allowance {amount} is above the cap {} of {} per {}",
                            limit.cap, limit.unit, limit.window
                        ),
                    });
                }
            }
            if self.limits[..i].iter().any(|l| l.unit == limit.unit && l.window == limit.window) {
                return Err(LedgerError::InvalidArgument {
                    field: "limits".into(),
                    reason: format!(
                        "two limits for {} per {}; give each (unit, window) once",
                        limit.unit, limit.window
                    ),
                });
            }
        }
        Ok(())
    }
}

/// A template on `parent`: the first acquire or overrun on a direct child of
/// `parent` that does not exist creates it with these limits, as part of the same
/// command (audited as `budget_created`; a refused acquire creates nothing). The
/// ledger applies commands one at a time, so gateways racing to create the same
/// child create it once. Editing a template rewrites the limits of every instance
/// it made, in the same command, checked as `UpdateBudget` checks each one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateSpec {
    pub parent: BudgetPath,
    pub limits: Vec<LimitSpec>,
    /// At most this many instances at once: `1..=`[`MAX_TEMPLATE_INSTANCES`].
    pub max_instances: u64,
    /// An instance with no live lease for this long, whose windows hold no spend
    /// (every window with spend in it has ended), is deleted (audited as
    /// `instance_expired`; its records stay). 0: instances never expire; else
    /// [`MIN_TEMPLATE_IDLE_MS`]`..=`[`MAX_TEMPLATE_IDLE_MS`].
    pub idle_ms: u64,
    /// An agent run's longest life: an instance grants nothing once this long has
    /// passed since it was made, and no lease on it is valid past then (0: no end;
    /// else up to [`MAX_TEMPLATE_IDLE_MS`]).
    pub max_duration_ms: u64,
    /// Runaway guards: what one `per_ms` span (spans follow each other from the
    /// instance's creation) grants an instance in `unit` is capped at `max`, and
    /// spend counted in one span that reaches `max` halts the instance (frozen,
    /// with the guard as the reason, until an operator unfreezes it).
    pub guards: Vec<Guard>,
}

/// Most runaway guards one template may carry.
pub const MAX_GUARDS: usize = 8;

/// A runaway guard of a template (see [`TemplateSpec::guards`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Guard {
    pub unit: Unit,
    pub max: u64,
    /// 1,000 ms up to [`MAX_TEMPLATE_IDLE_MS`].
    pub per_ms: u64,
}

impl TemplateSpec {
    pub fn validate(&self) -> Result<(), LedgerError> {
        BudgetSpec { path: self.parent.clone(), limits: self.limits.clone() }.validate()?;
        if self.limits.is_empty() {
            return Err(LedgerError::InvalidArgument {
                field: "limits".into(),
                reason: "a template needs at least one limit".into(),
            });
        }
        if self.max_instances == 0 || self.max_instances > MAX_TEMPLATE_INSTANCES {
            return Err(LedgerError::InvalidArgument {
                field: "max_instances".into(),
                reason: format!("{} is outside 1..={MAX_TEMPLATE_INSTANCES}", self.max_instances),
            });
        }
        if self.max_duration_ms > MAX_TEMPLATE_IDLE_MS {
            return Err(LedgerError::InvalidArgument {
                field: "max_duration_ms".into(),
                reason: format!(
                    "{} is above {MAX_TEMPLATE_IDLE_MS} (0: runs never end)",
                    self.max_duration_ms
                ),
            });
        }
        if self.guards.len() > MAX_GUARDS {
            return Err(LedgerError::InvalidArgument {
                field: "guards".into(),
                reason: format!("{} guards given; at most {MAX_GUARDS}", self.guards.len()),
            });
        }
        for (i, g) in self.guards.iter().enumerate() {
            check_amount("guards.max", g.max)?;
            if g.max == 0 {
                return Err(LedgerError::InvalidArgument {
                    field: "guards.max".into(),
                    reason: "must be at least 1".into(),
                });
            }
            if !(MIN_TEMPLATE_IDLE_MS..=MAX_TEMPLATE_IDLE_MS).contains(&g.per_ms) {
                return Err(LedgerError::InvalidArgument {
                    field: "guards.per_ms".into(),
                    reason: format!(
                        "{} is outside {MIN_TEMPLATE_IDLE_MS}..={MAX_TEMPLATE_IDLE_MS}",
                        g.per_ms
                    ),
                });
            }
            if self.guards[..i].iter().any(|o| o.unit == g.unit && o.per_ms == g.per_ms) {
                return Err(LedgerError::InvalidArgument {
                    field: "guards".into(),
                    reason: format!("two guards for {} per {} ms", g.unit, g.per_ms),
                });
            }
        }
        if self.idle_ms != 0
            && !(MIN_TEMPLATE_IDLE_MS..=MAX_TEMPLATE_IDLE_MS).contains(&self.idle_ms)
        {
            return Err(LedgerError::InvalidArgument {
                field: "idle_ms".into(),
                reason: format!(
                    "{} is outside {MIN_TEMPLATE_IDLE_MS}..={MAX_TEMPLATE_IDLE_MS} (0: never expire)",
                    self.idle_ms
                ),
            });
        }
        Ok(())
    }
}

/// Refuses amounts above [`MAX_AMOUNT`].
pub fn check_amount(field: &str, value: u64) -> Result<(), LedgerError> {
    if value > MAX_AMOUNT {
        return Err(LedgerError::AmountTooLarge { field: field.into(), value, max: MAX_AMOUNT });
    }
    Ok(())
}

/// Ask for an allowance of `unit` on `budget`: at most `wanted`, at least `min`,
/// valid for at most `ttl_ms` (and never past the end of its window).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acquire {
    pub budget: BudgetPath,
    pub unit: Unit,
    pub wanted: u64,
    pub min: u64,
    pub ttl_ms: u64,
}

/// Report `consumed_delta` more spent from a lease; optionally extend it to
/// `renew_ttl_ms` from now (never past its window).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub lease: LeaseId,
    pub consumed_delta: u64,
    pub renew_ttl_ms: Option<u64>,
}

/// Settle a lease: `consumed_total` was spent from it in all; the rest goes back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub lease: LeaseId,
    pub consumed_total: u64,
}

/// A call on `budget` really cost `amount` of `unit` more than the gateway had
/// reserved and could take from its leases: the excess is counted as consumed in
/// every limit in that unit on the budget and its ancestors (in their current
/// windows), and audited as an overrun. Nothing is refused for being over the cap:
/// the spend already happened. A limit over its cap grants nothing until its window
/// rolls over or its cap is raised.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overrun {
    pub budget: BudgetPath,
    pub unit: Unit,
    pub amount: u64,
}

/// A mutating operation. New variants go at the end: the log stores their index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    CreateBudget(BudgetSpec),
    /// Replace a budget's limits, if it is still at `expected_version`.
    UpdateBudget {
        spec: BudgetSpec,
        expected_version: u64,
    },
    /// Delete a leaf budget with no live leases (at `expected_version`, if given).
    DeleteBudget {
        path: BudgetPath,
        expected_version: Option<u64>,
    },
    Acquire(Acquire),
    Report(Report),
    Release(Release),
    Overrun(Overrun),
    /// An acquire for the next window: see [`AcquireNext`].
    AcquireNext(AcquireNext),
    /// Replace the per-principal limits (audited as `limits_changed`).
    SetLimits(crate::ledger::PrincipalLimits),
    /// Give a principal a role on a scope (audited as `role_granted`).
    GrantRole(RoleGrant),
    /// Take a role on a scope back from a principal (audited as `role_revoked`).
    RevokeRole(RoleGrant),
    /// Set or replace the template on a budget (audited as `template_set`).
    SetTemplate(TemplateSpec),
    /// Remove the template on a budget (audited as `template_deleted`); its
    /// instances stay, as ordinary budgets that never expire.
    DeleteTemplate {
        parent: BudgetPath,
    },
    /// Freeze (or unfreeze) a budget: while it is frozen, no acquire on it or below
    /// it is granted (audited as `budget_frozen` / `budget_unfrozen`). Leases
    /// already granted stay spendable until they settle or expire.
    Freeze {
        path: BudgetPath,
        frozen: bool,
    },
    /// Add a version to a model's price (audited as `price_set`). See [`PriceSpec`].
    SetPrice(PriceSpec),
    /// Replace a budget's alert thresholds and shadow mode (audited as
    /// `options_set`). See [`BudgetOptions`].
    SetOptions {
        path: BudgetPath,
        options: BudgetOptions,
    },
    /// Run `op` with `note` attached: every audit record `op` causes carries the
    /// note's trace id and usage lines (see [`Annotation`]). `op` may not be
    /// `Annotated` itself.
    Annotated {
        note: Annotation,
        op: Box<Op>,
    },
    /// Record one call for the audit trail (audited as `call_recorded`): what it
    /// used and cost, at which price version, under which trace id. It moves no
    /// allowance (the call was paid from a lease); it is how an auditor finds a call
    /// by its trace id.
    RecordCall(CallRecord),
}

/// Longest model name, trace id or usage-line model.
pub const MAX_LABEL_LEN: usize = 128;
/// Most versions the price book keeps per model (the oldest go first).
pub const MAX_PRICE_VERSIONS: usize = 64;
/// Most models in the price book.
pub const MAX_MODELS: usize = 4096;
/// Most thresholds one budget may have.
pub const MAX_THRESHOLDS: usize = 16;
/// Most usage lines one command may carry.
pub const MAX_USAGE_LINES: usize = 32;

/// What a model costs, in `usd_micros` per million tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Price {
    pub input: u64,
    pub cached_input: u64,
    pub output: u64,
}

/// Prices are capped so that a call of up to 2^32 tokens of each kind costs at
/// most [`MAX_AMOUNT`]: 10^12 usd_micros (a million dollars) per million tokens.
pub const MAX_PRICE_PER_MTOK: u64 = 1_000_000_000_000;

impl Price {
    /// The cost in `usd_micros` of `input` (uncached) input tokens, `cached` cached
    /// input tokens and `output` output tokens, rounded up to the next usd_micro.
    pub fn cost(&self, input: u64, cached: u64, output: u64) -> u64 {
        let micro_millionths = u128::from(input)
            .saturating_mul(self.input.into())
            .saturating_add(u128::from(cached).saturating_mul(self.cached_input.into()))
            .saturating_add(u128::from(output).saturating_mul(self.output.into()));
        let cost = micro_millionths.div_ceil(1_000_000);
        u64::try_from(cost).unwrap_or(u64::MAX).min(MAX_AMOUNT)
    }
}

/// One version of a model's price: in force from `effective_from_ms` (ledger
/// time) until the next version's. Versions of a model are numbered from 1 and
/// must come in effective-time order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriceSpec {
    pub model: String,
    pub price: Price,
    /// 0: from the ledger time the command applies at.
    pub effective_from_ms: u64,
}

impl PriceSpec {
    pub fn validate(&self) -> Result<(), LedgerError> {
        check_label("model", &self.model)?;
        for (field, v) in [
            ("price.input", self.price.input),
            ("price.cached_input", self.price.cached_input),
            ("price.output", self.price.output),
        ] {
            if v > MAX_PRICE_PER_MTOK {
                return Err(LedgerError::AmountTooLarge {
                    field: field.into(),
                    value: v,
                    max: MAX_PRICE_PER_MTOK,
                });
            }
        }
        Ok(())
    }
}

/// A budget's alert thresholds and shadow mode.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetOptions {
    /// Percentages of each limit's cap (1..=1000, each once). When spend in a
    /// window reaches one, the ledger emits one `threshold_crossed` record for it,
    /// once per window.
    pub thresholds_pct: Vec<u32>,
    /// The budget's own caps refuse nothing: an acquire they would have refused is
    /// granted and recorded (`shadow_refusal`). Its ancestors' caps still apply, and
    /// its spend counts in their figures.
    pub shadow: bool,
}

impl BudgetOptions {
    pub fn validate(&self) -> Result<(), LedgerError> {
        if self.thresholds_pct.len() > MAX_THRESHOLDS {
            return Err(LedgerError::InvalidArgument {
                field: "thresholds_pct".into(),
                reason: format!(
                    "{} thresholds given; at most {MAX_THRESHOLDS}",
                    self.thresholds_pct.len()
                ),
            });
        }
        for (i, t) in self.thresholds_pct.iter().enumerate() {
            if !(1..=1000).contains(t) {
                return Err(LedgerError::InvalidArgument {
                    field: "thresholds_pct".into(),
                    reason: format!("{t} is outside 1..=1000 (percent of the cap)"),
                });
            }
            if self.thresholds_pct[..i].contains(t) {
                return Err(LedgerError::InvalidArgument {
                    field: "thresholds_pct".into(),
                    reason: format!("{t}% is given twice"),
                });
            }
        }
        Ok(())
    }
}

/// Spend on one model at one price version, as a gateway settles it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageLine {
    pub model: String,
    pub price_version: u32,
    pub calls: u64,
    pub input_tokens: u64,
    pub cached_tokens: u64,
    pub output_tokens: u64,
    /// What these tokens cost at that version, in usd_micros.
    pub cost_usd_micros: u64,
}

/// What a caller attaches to a command: a trace id (a W3C `traceparent`, a run id,
/// a request id of its own) and, on a settlement, subtotals per (model, price
/// version) of the calls it settles.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Annotation {
    pub trace: Option<String>,
    pub usage: Vec<UsageLine>,
}

impl Annotation {
    pub fn validate(&self) -> Result<(), LedgerError> {
        if let Some(t) = &self.trace {
            check_label("trace", t)?;
        }
        if self.usage.len() > MAX_USAGE_LINES {
            return Err(LedgerError::InvalidArgument {
                field: "usage".into(),
                reason: format!(
                    "{} usage lines given; at most {MAX_USAGE_LINES}",
                    self.usage.len()
                ),
            });
        }
        for u in &self.usage {
            u.validate()?;
        }
        Ok(())
    }
}

impl UsageLine {
    pub fn validate(&self) -> Result<(), LedgerError> {
        check_label("usage.model", &self.model)?;
        for (field, v) in [
            ("usage.calls", self.calls),
            ("usage.input_tokens", self.input_tokens),
            ("usage.cached_tokens", self.cached_tokens),
            ("usage.output_tokens", self.output_tokens),
            ("usage.cost_usd_micros", self.cost_usd_micros),
        ] {
            check_amount(field, v)?;
        }
        Ok(())
    }
}

/// One call, for the audit trail (see [`Op::RecordCall`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallRecord {
    pub budget: BudgetPath,
    pub trace: String,
    pub usage: UsageLine,
}

/// Refuses an empty, over-long or non-printable label (model name, trace id).
pub fn check_label(field: &str, value: &str) -> Result<(), LedgerError> {
    let reason = if value.is_empty() {
        "is empty".to_string()
    } else if value.len() > MAX_LABEL_LEN {
        format!("is {} bytes; at most {MAX_LABEL_LEN}", value.len())
    } else if !value.chars().all(|c| c.is_ascii_graphic()) {
        "may hold only printable ASCII without spaces".to_string()
    } else {
        return Ok(());
    };
    Err(LedgerError::InvalidArgument { field: field.into(), reason })
}

impl Op {
    /// The operation an [`Op::Annotated`] wraps, or `self`.
    pub fn inner(&self) -> &Op {
        match self {
            Op::Annotated { op, .. } => op,
            op => op,
        }
    }
}

/// What a principal may do, on the budgets of its scope (see [`crate::ledger`]'s
/// `roles` module for the rules).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Everything: membership, leader transfer, snapshots, limits, roles, and what
    /// the other roles may do. Only on the whole ledger.
    Admin,
    /// Create, update and delete budgets; read them.
    Operator,
    /// Read audit records, spend, budgets and leases.
    Auditor,
    /// Acquire, report, release and overrun on budgets; read them and its own leases.
    Gateway,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Admin, Role::Operator, Role::Auditor, Role::Gateway];

    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Auditor => "auditor",
            Role::Gateway => "gateway",
        }
    }

    /// The role named `name`, or a refusal listing the names.
    pub fn parse(name: &str) -> Result<Role, LedgerError> {
        Role::ALL.into_iter().find(|r| r.name() == name).ok_or_else(|| {
            LedgerError::InvalidArgument {
                field: "role".into(),
                reason: format!("{name:?} is not a role; use admin, operator, auditor or gateway"),
            }
        })
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The budgets a role applies to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Scope {
    /// Every budget, and the ledger's own records (written `*`).
    All,
    /// This budget and every budget below it.
    Subtree(BudgetPath),
}

impl Scope {
    /// `*` for the whole ledger, else a budget path.
    pub fn parse(text: &str) -> Result<Scope, LedgerError> {
        match text {
            "*" => Ok(Scope::All),
            "" => Err(LedgerError::InvalidArgument {
                field: "scope".into(),
                reason: "empty; give a budget path, or * for the whole ledger".into(),
            }),
            path => BudgetPath::new(path).map(Scope::Subtree),
        }
    }

    /// True if `path` lies in this scope.
    pub fn covers(&self, path: &BudgetPath) -> bool {
        match self {
            Scope::All => true,
            Scope::Subtree(top) => path.is_within(top),
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::All => f.write_str("*"),
            Scope::Subtree(path) => write!(f, "{path}"),
        }
    }
}

/// One role of one principal on one scope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleGrant {
    pub principal: Principal,
    pub role: Role,
    pub scope: Scope,
}

/// Acquire a lease that opens at `starts_at_ms`, the end of the current window of
/// the limits it draws on: it is counted in the next window of each limit whose
/// window ends then (in the current window of the others), and nothing may be spent
/// from it before it opens. A gateway takes it shortly before a window boundary so
/// the boundary is not a gap. If ledger time has already reached `starts_at_ms`, it
/// is an ordinary acquire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcquireNext {
    pub acquire: Acquire,
    pub starts_at_ms: u64,
}

/// A client's request: exactly once per (client, request_id).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub client: ClientId,
    pub request_id: u64,
    /// The authenticated identity the request acts as; leases belong to it.
    pub principal: Principal,
    pub op: Op,
}

/// One command of a log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Proposed by the leader so expiry and window rollover happen with no writes.
    Tick,
    /// A request from a caller no one authenticated (a plaintext cluster): its
    /// principal is whatever it says, and no role is checked.
    Request(Request),
    /// A request whose principal the proposing node authenticated (TLS): applying
    /// it checks the principal's roles first (see [`Authority`]).
    Authenticated { request: Request, authority: Authority },
    /// Proposed by the leader once it has delivered every notice (webhook) for the
    /// audit records before sequence number `upto_seq`: the cursor a new leader
    /// resumes from. It never moves back.
    AckNotices { upto_seq: u64 },
}

impl Command {
    /// The client request this command carries, if any.
    pub fn request(&self) -> Option<&Request> {
        match self {
            Command::Tick | Command::AckNotices { .. } => None,
            Command::Request(request) | Command::Authenticated { request, .. } => Some(request),
        }
    }
}

/// On what grounds an authenticated request may act.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Authority {
    /// The roles the ledger holds for its principal, as of when it applies.
    Roles,
    /// Its principal is one of the proposing node's configured bootstrap admins
    /// (`admins`): an admin whatever the ledger holds, so a new cluster can grant
    /// its first roles.
    BootstrapAdmin,
}

/// A group-committed batch: the leader's time stamp and the commands, in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// The leader's wall clock when it proposed the entry, in ms since the epoch.
    /// The ledger's time is the maximum of every time stamp it has applied.
    pub time_ms: u64,
    pub commands: Vec<Command>,
}

/// A replicated log entry. Versioned: a new format is a new variant, and every
/// version stays decodable so old logs and snapshots replay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entry {
    V1(Batch),
}

impl Entry {
    pub fn encode(&self) -> Vec<u8> {
        crate::encode(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(bytes)
    }
}

/// A granted lease as the gateway sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub lease: LeaseId,
    pub granted: u64,
    /// Ledger time after which the unsettled allowance is charged as consumed.
    pub expires_at_ms: u64,
    /// End of the tightest window the lease draws on; `expires_at_ms <= window_end_ms`.
    pub window_end_ms: u64,
    /// How long the lease is valid from when it was granted: the ttl asked for, cut
    /// at the end of its window. A gateway spends from it until at most
    /// `sent_at + ttl_ms - margin` on its own clock.
    pub ttl_ms: u64,
}

/// A successful command's reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Ticked {
        now_ms: u64,
    },
    BudgetCreated {
        version: u64,
    },
    BudgetUpdated {
        version: u64,
    },
    BudgetDeleted,
    Granted(Grant),
    Reported {
        lease: LeaseId,
        unreported: u64,
        expires_at_ms: u64,
    },
    /// `returned` went back to the pool from a live lease; `refunded` went back from
    /// an expired one (late final report while its window was open).
    Released {
        lease: LeaseId,
        returned: u64,
        refunded: u64,
        late: bool,
    },
    /// An overrun was counted; `over_cap` when a limit it touched is now above its
    /// cap (it grants nothing until its window rolls over or its cap is raised).
    OverrunRecorded {
        recorded: u64,
        over_cap: bool,
    },
    /// The per-principal limits were replaced.
    LimitsSet,
    /// A role was granted or revoked; `changed` is false if it already was so.
    RolesChanged {
        changed: bool,
    },
    /// A template was set; `instances` of it were rewritten to its limits.
    TemplateSet {
        instances: u64,
    },
    /// A template was removed; its `instances` are now ordinary budgets.
    TemplateDeleted {
        instances: u64,
    },
    /// A budget was frozen or unfrozen (`changed` false if it already was so).
    /// `held`: per unit, what live leases drawing on its limits hold unspent (the
    /// most that can still be spent under it while it stays frozen, beyond
    /// overruns reported for calls already admitted).
    Frozen {
        changed: bool,
        held: Vec<(Unit, u64)>,
    },
    /// A price version was added: the model's `version`, in force from
    /// `effective_from_ms`.
    PriceSet {
        version: u32,
        effective_from_ms: u64,
    },
    /// A budget's options were replaced.
    OptionsSet,
    /// A call was recorded.
    CallRecorded,
    /// The webhook cursor is now at `acked_seq` (see [`Command::AckNotices`]).
    NoticesAcked {
        acked_seq: u64,
    },
}

/// What a command produced: a reply or a refusal.
pub type Outcome = Result<Reply, LedgerError>;
