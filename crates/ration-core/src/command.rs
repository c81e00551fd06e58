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
}

impl Command {
    /// The client request this command carries, if any.
    pub fn request(&self) -> Option<&Request> {
        match self {
            Command::Tick => None,
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
        postcard::to_stdvec(self).expect("encoding an entry into a Vec cannot fail")
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
}

/// What a command produced: a reply or a refusal.
pub type Outcome = Result<Reply, LedgerError>;
