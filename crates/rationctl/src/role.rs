//! `role grant|revoke|list`: who may do what, on which budgets (enforced by nodes
//! with TLS; ARCHITECTURE.md "Security").

use clap::Subcommand;
use ration_proto::v1;
use serde::Serialize;

use crate::output::{emit, Table};
use crate::Ctx;

#[derive(Debug, Subcommand)]
pub enum RoleCmd {
    /// Give a principal a role on a scope. Audited as `role_granted`. Admin only.
    Grant {
        /// The principal (as its certificate or token names it).
        principal: String,
        /// admin, operator, auditor or gateway.
        role: String,
        /// A budget path (the role holds there and below), or * for the whole
        /// ledger. admin is only ever on *.
        #[arg(long)]
        scope: String,
    },
    /// Take a role on a scope back. Audited as `role_revoked`. Admin only.
    Revoke {
        /// The principal.
        principal: String,
        /// admin, operator, auditor or gateway.
        role: String,
        /// The scope it was granted on: a budget path, or *.
        #[arg(long)]
        scope: String,
    },
    /// The roles of one principal (your own, or anyone's as an admin), or of every
    /// principal (admin).
    List {
        /// Whose roles (all principals' if not given).
        principal: Option<String>,
    },
}

#[derive(Serialize)]
struct Held {
    principal: String,
    role: String,
    scope: String,
}

#[derive(Serialize)]
struct Changed {
    changed: bool,
    roles: Vec<Held>,
}

fn held(principal: &str, roles: Vec<v1::RoleScope>) -> impl Iterator<Item = Held> + '_ {
    roles.into_iter().map(move |r| Held {
        principal: principal.to_owned(),
        role: r.role,
        scope: r.scope,
    })
}

fn table(roles: &[Held]) -> String {
    let mut t = Table::new(&["PRINCIPAL", "ROLE", "SCOPE"]);
    for r in roles {
        t.row(vec![r.principal.clone(), r.role.clone(), r.scope.clone()]);
    }
    t.render()
}

pub(crate) async fn run(
    ctx: &Ctx,
    cmd: RoleCmd,
    out: &mut dyn std::io::Write,
) -> anyhow::Result<()> {
    match cmd {
        RoleCmd::Grant { principal, role, scope } | RoleCmd::Revoke { principal, role, scope }
            if scope.is_empty() =>
        {
            anyhow::bail!("--scope is empty: give a budget path, or * for the whole ledger ({principal} {role})")
        }
        RoleCmd::Grant { principal, role, scope } => {
            let req = v1::RoleRequest { meta: ctx.meta(), subject: principal.clone(), role, scope };
            let reply =
                ctx.on_ledger(&req, |mut c, r| async move { c.grant_role(r).await }).await?;
            changed(ctx, out, &principal, reply)
        }
        RoleCmd::Revoke { principal, role, scope } => {
            let req = v1::RoleRequest { meta: ctx.meta(), subject: principal.clone(), role, scope };
            let reply =
                ctx.on_ledger(&req, |mut c, r| async move { c.revoke_role(r).await }).await?;
            changed(ctx, out, &principal, reply)
        }
        RoleCmd::List { principal } => {
            let mut roles = Vec::new();
            let mut start_after = String::new();
            loop {
                let req = v1::ListRolesRequest {
                    principal: principal.clone().unwrap_or_default(),
                    start_after: start_after.clone(),
                    limit: 1000,
                    linearizable: true,
                };
                let page =
                    ctx.on_ledger(&req, |mut c, r| async move { c.list_roles(r).await }).await?;
                let n = page.principals.len();
                for p in page.principals {
                    start_after.clone_from(&p.principal);
                    roles.extend(held(&p.principal, p.roles));
                }
                if principal.is_some() || n < 1000 {
                    break;
                }
            }
            emit(out, ctx.format, &roles, |r| table(r))
        }
    }
}

fn changed(
    ctx: &Ctx,
    out: &mut dyn std::io::Write,
    principal: &str,
    reply: v1::RolesReply,
) -> anyhow::Result<()> {
    let shown = Changed { changed: reply.changed, roles: held(principal, reply.roles).collect() };
    emit(out, ctx.format, &shown, |s| {
        let note = if s.changed { "changed" } else { "unchanged (already so)" };
        format!("{note}\n{}", table(&s.roles))
    })
}
