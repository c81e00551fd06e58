//! Roles: who may do what, on which budgets. Replicated state, changed only by
//! [`crate::Op::GrantRole`] and [`crate::Op::RevokeRole`] (audited as
//! `role_granted` and `role_revoked`), and checked when a command applies, so a
//! revoke takes effect in log order on every replica.
//!
//! The rules ([`Ledger::authorize`]):
//! - `admin` (on `*` only) may do everything;
//! - `operator` on a scope creates, updates and deletes budgets in it, and reads them;
//! - `auditor` on a scope reads audit records, spend, budgets and leases in it (a
//!   role change on a subtree is a record of that subtree; the ledger's own
//!   records, limit changes and roles on `*`, need `*`; figures of budgets above
//!   the scope that a record's change touched are withheld, see `audit_scopes`);
//! - `gateway` on a scope acquires, renews and overruns on budgets in it, and reads them;
//! - a lease's holder reports on it, releases it and reads it whatever roles it
//!   holds, and reports overruns on the limit it draws on: spend that happened is
//!   always recorded. A report asking to renew a lease renews it only while its
//!   holder is still a gateway on its budget;
//! - everything else is refused (default deny).
//!
//! Only requests a node authenticated are checked ([`crate::Command::Authenticated`]):
//! a plaintext cluster authenticates no one and checks nothing.

use std::collections::{BTreeMap, BTreeSet};

use super::{Ctx, Ledger, LEDGER_PATH};
use crate::audit::AuditKind;
use crate::command::{Authority, Op, Outcome, Reply, Request, Role, RoleGrant, Scope};
use crate::error::LedgerError;
use crate::names::{BudgetPath, LeaseId, Principal, Unit};

/// Most roles one principal may hold.
pub const MAX_ROLES_PER_PRINCIPAL: usize = 64;
/// Most principals that may hold roles.
pub const MAX_PRINCIPALS_WITH_ROLES: usize = 100_000;

/// The roles table: (role, scope) pairs per principal.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Roles {
    pub(super) held: BTreeMap<Principal, BTreeSet<(Role, Scope)>>,
}

/// Something a principal asks to do, for [`Ledger::authorize`].
#[derive(Clone, Copy, Debug)]
pub enum Action<'a> {
    /// Create, update or delete this budget.
    ManageBudget(&'a BudgetPath),
    /// Acquire or renew allowance on this budget, or report an overrun on it.
    Spend(&'a BudgetPath),
    /// Read the limits and figures of this budget (`None`: of every budget).
    ReadBudget(Option<&'a BudgetPath>),
    /// Read audit records and spend of a subtree (`None`: of the whole ledger,
    /// including its own records).
    ReadAudit(Option<&'a BudgetPath>),
    /// Read a live lease.
    ReadLease(LeaseId),
    /// Change the ledger's limits or roles, membership, leadership, snapshots.
    Administer,
}

impl Action<'_> {
    fn describe(&self) -> String {
        match self {
            Action::ManageBudget(p) => format!("create, update or delete budget {p}"),
            Action::Spend(p) => format!("acquire, renew or overrun on budget {p}"),
            Action::ReadBudget(Some(p)) => format!("read budget {p}"),
            Action::ReadBudget(None) => "list every budget".into(),
            Action::ReadAudit(Some(p)) => format!("read the audit records of {p}"),
            Action::ReadAudit(None) => "read the audit records of the whole ledger".into(),
            Action::ReadLease(l) => format!("read lease {l}"),
            Action::Administer => {
                "administer the cluster (limits, roles, membership, leadership, snapshots)".into()
            }
        }
    }
}

impl Ledger {
    /// The roles `principal` holds, in order.
    pub fn roles_of(&self, principal: &Principal) -> Vec<(Role, Scope)> {
        self.roles.held.get(principal).map(|r| r.iter().cloned().collect()).unwrap_or_default()
    }

    /// How many principals hold `role` (on any scope).
    pub fn holders_of(&self, role: Role) -> usize {
        self.roles.held.values().filter(|r| r.iter().any(|(held, _)| *held == role)).count()
    }

    /// Every principal's roles, in principal order, from after `start_after`, at
    /// most `limit` principals.
    pub fn all_roles(
        &self,
        start_after: Option<&Principal>,
        limit: usize,
    ) -> Vec<(Principal, Vec<(Role, Scope)>)> {
        use std::ops::Bound;
        let from = start_after.map_or(Bound::Unbounded, Bound::Excluded);
        self.roles
            .held
            .range((from, Bound::Unbounded))
            .take(limit)
            .map(|(p, r)| (p.clone(), r.iter().cloned().collect()))
            .collect()
    }

    /// The subtrees whose figures `principal` may see in audit records: `None` for
    /// all (an admin, an auditor on `*`, a bootstrap admin), else its auditor
    /// scopes. A record's `balances` also show the ancestors its change touched;
    /// those outside these scopes are withheld from a scoped auditor.
    pub fn audit_scopes(
        &self,
        principal: &Principal,
        authority: Authority,
    ) -> Option<Vec<BudgetPath>> {
        if authority == Authority::BootstrapAdmin {
            return None;
        }
        let held = self.roles.held.get(principal)?;
        let mut scopes = Vec::new();
        for (role, scope) in held {
            match (role, scope) {
                (Role::Admin, _) | (Role::Auditor, Scope::All) => return None,
                (Role::Auditor, Scope::Subtree(p)) => scopes.push(p.clone()),
                _ => {}
            }
        }
        Some(scopes)
    }

    /// Whether `principal`'s roles let it do `action` (a bootstrap admin may do
    /// everything). The one rule for reads on a node and for commands as they apply.
    pub fn authorize(
        &self,
        principal: &Principal,
        authority: Authority,
        action: Action<'_>,
    ) -> Result<(), LedgerError> {
        if authority == Authority::BootstrapAdmin {
            return Ok(());
        }
        let held = self.roles.held.get(principal);
        let has = |role: Role, path: Option<&BudgetPath>| {
            held.is_some_and(|r| {
                r.iter().any(|(r, scope)| {
                    *r == Role::Admin
                        || (*r == role && path.map_or(*scope == Scope::All, |p| scope.covers(p)))
                })
            })
        };
        let (allowed, needs) = match action {
            Action::ManageBudget(p) => {
                (has(Role::Operator, Some(p)), format!("role operator on {p} or above it"))
            }
            Action::Spend(p) => {
                (has(Role::Gateway, Some(p)), format!("role gateway on {p} or above it"))
            }
            Action::ReadBudget(p) => (
                [Role::Operator, Role::Auditor, Role::Gateway].into_iter().any(|r| has(r, p)),
                match p {
                    Some(p) => format!("role operator, auditor or gateway on {p} or above it"),
                    None => "role operator, auditor or gateway on * (or name a subtree)".into(),
                },
            ),
            Action::ReadAudit(p) => (
                has(Role::Auditor, p),
                match p {
                    Some(p) => format!("role auditor on {p} or above it"),
                    None => "role auditor on * (or name a subtree)".into(),
                },
            ),
            Action::ReadLease(id) => match self.leases.get(&id) {
                Some(l) if l.principal == *principal => (true, String::new()),
                Some(l) => (
                    has(Role::Auditor, Some(&l.path)),
                    format!("to hold the lease, or role auditor on {} or above it", l.path),
                ),
                // Nothing to reveal: the caller learns it is not live.
                None => (true, String::new()),
            },
            Action::Administer => (false, "role admin".into()),
        };
        if allowed || has(Role::Admin, None) {
            return Ok(());
        }
        Err(LedgerError::NotAuthorized {
            principal: principal.to_string(),
            action: action.describe(),
            needs,
            holds: describe_roles(held),
        })
    }

    /// What `req` needs, checked as it applies with `authority` (and by a node
    /// before it proposes, to refuse early). `Ok(false)` for a
    /// report whose renewal its principal may no longer ask for: the report is
    /// applied without it. A report or release of another principal's lease is
    /// refused elsewhere; of one's own needs no role.
    pub fn authorize_request(
        &self,
        req: &Request,
        authority: Authority,
    ) -> Result<bool, LedgerError> {
        let p = &req.principal;
        let may = |action| self.authorize(p, authority, action);
        match req.op.inner() {
            Op::CreateBudget(spec) => may(Action::ManageBudget(&spec.path))?,
            Op::UpdateBudget { spec, .. } => may(Action::ManageBudget(&spec.path))?,
            Op::DeleteBudget { path, .. } => may(Action::ManageBudget(path))?,
            Op::SetTemplate(t) => may(Action::ManageBudget(&t.parent))?,
            Op::DeleteTemplate { parent } => may(Action::ManageBudget(parent))?,
            Op::Freeze { path, .. } => may(Action::ManageBudget(path))?,
            Op::Acquire(a) => may(Action::Spend(&a.budget))?,
            Op::AcquireNext(a) => may(Action::Spend(&a.acquire.budget))?,
            // An overrun is spend that already happened: a principal spending from
            // that pool (a live lease on the nearest limit in the unit) may report
            // it even after losing its role, so nothing spent is left out.
            Op::Overrun(o) => {
                if !self.spends_from(p, &o.budget, &o.unit) {
                    may(Action::Spend(&o.budget))?;
                }
            }
            Op::Report(r) if r.renew_ttl_ms.is_some() => {
                let renews =
                    self.leases.get(&r.lease).is_some_and(|l| may(Action::Spend(&l.path)).is_ok());
                return Ok(renews);
            }
            Op::Report(_) | Op::Release(_) => {}
            Op::SetLimits(_) | Op::GrantRole(_) | Op::RevokeRole(_) => may(Action::Administer)?,
            Op::SetPrice(_) => {
                let book = BudgetPath::new(super::LEDGER_PATH).expect("the ledger's path is valid");
                may(Action::ManageBudget(&book))?
            }
            Op::SetOptions { path, .. } => may(Action::ManageBudget(path))?,
            Op::RecordCall(c) => may(Action::Spend(&c.budget))?,
            // Nested annotations are refused when applied; nothing to authorize.
            Op::Annotated { .. } => {}
        }
        Ok(true)
    }

    /// Whether `principal` holds a live lease (open or for the next window) on the
    /// limit in `unit` nearest `budget` (on it, or its closest ancestor with one).
    fn spends_from(&self, principal: &Principal, budget: &BudgetPath, unit: &Unit) -> bool {
        let mut at = self.by_path.get(budget).copied();
        while let Some(id) = at {
            let Some(b) = self.budgets.get(&id) else { return false };
            if let Some(l) = b.limits.iter().find(|l| l.spec.unit == *unit) {
                return l.counter.holders.contains(principal)
                    || l.counter.upcoming_holders.contains(principal);
            }
            at = b.parent;
        }
        false
    }

    pub(super) fn grant_role(&mut self, ctx: &mut Ctx<'_>, grant: &RoleGrant) -> Outcome {
        check_grant(grant)?;
        let key = (grant.role, grant.scope.clone());
        let held = self.roles.held.get(&grant.principal);
        if held.is_some_and(|r| r.contains(&key)) {
            return Ok(Reply::RolesChanged { changed: false });
        }
        let count = held.map_or(0, BTreeSet::len);
        if count >= MAX_ROLES_PER_PRINCIPAL {
            return Err(LedgerError::LedgerFull {
                what: format!("roles for principal {}", grant.principal),
                max: MAX_ROLES_PER_PRINCIPAL as u64,
            });
        }
        if held.is_none() && self.roles.held.len() >= MAX_PRINCIPALS_WITH_ROLES {
            return Err(LedgerError::LedgerFull {
                what: "principals with roles".into(),
                max: MAX_PRINCIPALS_WITH_ROLES as u64,
            });
        }
        self.roles.held.entry(grant.principal.clone()).or_default().insert(key);
        self.emit_role(ctx, AuditKind::RoleGranted, grant);
        Ok(Reply::RolesChanged { changed: true })
    }

    pub(super) fn revoke_role(&mut self, ctx: &mut Ctx<'_>, grant: &RoleGrant) -> Outcome {
        check_grant(grant)?;
        let key = (grant.role, grant.scope.clone());
        let Some(held) = self.roles.held.get_mut(&grant.principal) else {
            return Ok(Reply::RolesChanged { changed: false });
        };
        if !held.remove(&key) {
            return Ok(Reply::RolesChanged { changed: false });
        }
        if held.is_empty() {
            self.roles.held.remove(&grant.principal);
        }
        self.emit_role(ctx, AuditKind::RoleRevoked, grant);
        Ok(Reply::RolesChanged { changed: true })
    }

    /// The audit record of a role change: about the principal whose roles changed,
    /// the role as its unit, the scope as its budget (`_ration` for `*`).
    fn emit_role(&mut self, ctx: &mut Ctx<'_>, kind: AuditKind, grant: &RoleGrant) {
        let budget = match &grant.scope {
            Scope::All => BudgetPath::new(LEDGER_PATH).expect("the ledger's own path is valid"),
            Scope::Subtree(p) => p.clone(),
        };
        let mut entry =
            self.base_entry(ctx.index, kind, budget, grant.principal.clone(), self.now_ms);
        entry.unit = Some(Unit::new(grant.role.name()).expect("role names are valid units"));
        self.record(ctx.audit, entry);
    }

    /// The roles table as the snapshot's fifth section.
    pub(super) fn roles_section(&self) -> Vec<(Principal, Role, Scope)> {
        let mut out = Vec::new();
        for (p, held) in &self.roles.held {
            for (role, scope) in held {
                out.push((p.clone(), *role, scope.clone()));
            }
        }
        out
    }

    /// Every grant is one `GrantRole` could have made, within the bounds.
    pub(super) fn check_roles(&self) -> Result<(), super::InvariantError> {
        let bad = |detail: String| Err(super::InvariantError::Roles { detail });
        if self.roles.held.len() > MAX_PRINCIPALS_WITH_ROLES {
            return bad(format!("{} principals hold roles", self.roles.held.len()));
        }
        for (principal, held) in &self.roles.held {
            if held.is_empty() || held.len() > MAX_ROLES_PER_PRINCIPAL {
                return bad(format!("{principal} holds {} roles", held.len()));
            }
            for (role, scope) in held {
                let grant =
                    RoleGrant { principal: principal.clone(), role: *role, scope: scope.clone() };
                if let Err(e) = check_grant(&grant) {
                    return bad(format!("{principal}: {e}"));
                }
            }
        }
        Ok(())
    }

    /// Restores the roles table from the snapshot's fifth section.
    pub(super) fn restore_roles(&mut self, section: Vec<(Principal, Role, Scope)>) {
        self.roles = Roles::default();
        for (p, role, scope) in section {
            self.roles.held.entry(p).or_default().insert((role, scope));
        }
    }
}

/// Refuses a grant no one could use: admin is for the whole ledger only.
fn check_grant(grant: &RoleGrant) -> Result<(), LedgerError> {
    if grant.role == Role::Admin && grant.scope != Scope::All {
        return Err(LedgerError::InvalidArgument {
            field: "scope".into(),
            reason: format!("role admin is for the whole ledger (scope *), not {}", grant.scope),
        });
    }
    if let Scope::Subtree(p) = &grant.scope {
        if p.root() == LEDGER_PATH {
            return Err(LedgerError::InvalidArgument {
                field: "scope".into(),
                reason: format!("{p} holds the ledger's own records; use * for the whole ledger"),
            });
        }
    }
    Ok(())
}

fn describe_roles(held: Option<&BTreeSet<(Role, Scope)>>) -> String {
    match held {
        Some(r) if !r.is_empty() => r
            .iter()
            .map(|(role, scope)| format!("{role} on {scope}"))
            .collect::<Vec<_>>()
            .join(", "),
        _ => "no roles".into(),
    }
}
