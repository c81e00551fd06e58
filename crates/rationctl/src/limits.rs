//! `limits show|set`: the per-principal limits (replicated configuration) and what
//! principals hold against them.

use clap::Subcommand;
use ration_proto::v1;
use serde::Serialize;

use crate::output::{emit, Table};
use crate::Ctx;

#[derive(Debug, Subcommand)]
pub enum LimitsCmd {
    /// The per-principal limits in force, and what principals hold: the one named
    /// with --principal, or the fullest ones.
    Show {
        /// Show what this principal holds.
        #[arg(long)]
        principal: Option<String>,
        /// How many of the fullest principals to show (at most 100).
        #[arg(long, default_value_t = 10)]
        top: u32,
    },
    /// Change the limits named; the others keep their value. Audited as
    /// `limits_changed` on budget path `_ration`.
    Set {
        /// Client ids in the exactly-once table one principal may have.
        #[arg(long)]
        clients: Option<u64>,
        /// Results remembered for one principal's clients, in all.
        #[arg(long)]
        outcomes: Option<u64>,
        /// Live leases one principal may hold.
        #[arg(long)]
        live_leases: Option<u64>,
        /// Budgets one principal may have created (that still exist).
        #[arg(long)]
        budgets: Option<u64>,
    },
}

#[derive(Serialize)]
struct Limits {
    clients: u64,
    outcomes: u64,
    live_leases: u64,
    budgets: u64,
}

#[derive(Serialize)]
struct Usage {
    principal: String,
    clients: u64,
    outcomes: u64,
    live_leases: u64,
    budgets: u64,
}

#[derive(Serialize)]
struct Shown {
    limits: Limits,
    principals: Vec<Usage>,
}

fn limits(l: Option<&v1::PrincipalLimits>) -> Limits {
    let l = l.cloned().unwrap_or_default();
    Limits {
        clients: l.clients,
        outcomes: l.outcomes,
        live_leases: l.live_leases,
        budgets: l.budgets,
    }
}

fn limits_table(l: &Limits) -> String {
    let mut t = Table::new(&["LIMIT (PER PRINCIPAL)", "VALUE"]);
    for (name, v) in [
        ("clients", l.clients),
        ("outcomes", l.outcomes),
        ("live_leases", l.live_leases),
        ("budgets", l.budgets),
    ] {
        t.row(vec![name.to_owned(), v.to_string()]);
    }
    t.render()
}

async fn get(ctx: &Ctx, principal: String, top: u32) -> anyhow::Result<v1::LimitsReply> {
    let req = v1::GetLimitsRequest { principal, top, linearizable: true };
    ctx.on_ledger(&req, |mut c, r| async move { c.get_limits(r).await }).await
}

pub(crate) async fn run(
    ctx: &Ctx,
    cmd: LimitsCmd,
    out: &mut dyn std::io::Write,
) -> anyhow::Result<()> {
    match cmd {
        LimitsCmd::Show { principal, top } => {
            let reply = get(ctx, principal.unwrap_or_default(), top).await?;
            let shown = Shown {
                limits: limits(reply.limits.as_ref()),
                principals: reply
                    .usage
                    .into_iter()
                    .map(|u| Usage {
                        principal: u.principal,
                        clients: u.clients,
                        outcomes: u.outcomes,
                        live_leases: u.live_leases,
                        budgets: u.budgets,
                    })
                    .collect(),
            };
            emit(out, ctx.format, &shown, |s| {
                let mut text = limits_table(&s.limits);
                text.push('\n');
                let mut t =
                    Table::new(&["PRINCIPAL", "CLIENTS", "OUTCOMES", "LIVE_LEASES", "BUDGETS"]);
                for u in &s.principals {
                    t.row(vec![
                        u.principal.clone(),
                        u.clients.to_string(),
                        u.outcomes.to_string(),
                        u.live_leases.to_string(),
                        u.budgets.to_string(),
                    ]);
                }
                text.push_str(&t.render());
                text
            })
        }
        LimitsCmd::Set { clients, outcomes, live_leases, budgets } => {
            if clients.is_none() && outcomes.is_none() && live_leases.is_none() && budgets.is_none()
            {
                anyhow::bail!(
                    "name at least one limit: --clients, --outcomes, --live-leases or --budgets"
                );
            }
            // Read, change what was named, write. Two operators at once: the last
            // write wins, and both are in the audit log.
            let now = get(ctx, String::new(), 0).await?.limits.unwrap_or_default();
            let new = v1::PrincipalLimits {
                clients: clients.unwrap_or(now.clients),
                outcomes: outcomes.unwrap_or(now.outcomes),
                live_leases: live_leases.unwrap_or(now.live_leases),
                budgets: budgets.unwrap_or(now.budgets),
            };
            let req = v1::SetLimitsRequest { meta: ctx.meta(), limits: Some(new) };
            let reply =
                ctx.on_ledger(&req, |mut c, r| async move { c.set_limits(r).await }).await?;
            let l = limits(reply.limits.as_ref());
            emit(out, ctx.format, &l, limits_table)
        }
    }
}
