//! `member`, `endpoint` and `leader`: membership, per-node status, leadership.

use std::io::Write;

use anyhow::{anyhow, bail};
use clap::Subcommand;
use ration_proto::{rpc, v1};
use serde::Serialize;

use crate::output::{bytes, emit, Table};
use crate::{describe, Ctx};

#[derive(Debug, Subcommand)]
pub enum MemberCmd {
    /// List members, their addresses and roles.
    List,
    /// Add a node as a non-voting learner; returns once it has caught up.
    Add {
        /// The new node's id (unique, non-zero).
        id: u64,
        /// The address it serves on (host:port), as the other members should dial it.
        addr: String,
    },
    /// Make learners voters, in one membership change (promote two at once to go
    /// from an odd number of voters to the next odd number).
    Promote {
        /// The learners' node ids.
        #[arg(required = true)]
        ids: Vec<u64>,
    },
    /// Remove a node (voter or learner) from the cluster.
    Remove {
        /// The node's id.
        id: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum EndpointCmd {
    /// Whether each endpoint answers the gRPC health check with SERVING.
    Health,
    /// Each endpoint's id, role, term, log indexes, lag and data size.
    Status,
}

#[derive(Debug, Subcommand)]
pub enum LeaderCmd {
    /// Move leadership to a voter that has caught up.
    Move {
        /// The voter to take leadership.
        id: u64,
    },
}

#[derive(Debug, Serialize)]
struct MemberRow {
    id: u64,
    addr: String,
    role: &'static str,
    leader: bool,
}

async fn status_of(ctx: &Ctx, endpoint: String) -> Result<v1::StatusReply, tonic::Status> {
    let mut client =
        ctx.cluster(&endpoint).map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    Ok(client.status(v1::StatusRequest { digest: false }).await?.into_inner())
}

fn member_rows(members: &[v1::Member], leader: Option<u64>) -> Vec<MemberRow> {
    members
        .iter()
        .map(|m| MemberRow {
            id: m.id,
            addr: m.addr.clone(),
            role: if m.voter { "voter" } else { "learner" },
            leader: leader == Some(m.id),
        })
        .collect()
}

fn member_table(rows: &Vec<MemberRow>) -> String {
    let mut t = Table::new(&["ID", "ADDRESS", "ROLE", "LEADER"]);
    for r in rows {
        t.row(vec![
            r.id.to_string(),
            r.addr.clone(),
            r.role.to_owned(),
            if r.leader { "*".into() } else { String::new() },
        ]);
    }
    t.render()
}

pub async fn member(ctx: &Ctx, cmd: MemberCmd, out: &mut dyn Write) -> anyhow::Result<()> {
    let status = ctx.first(|e| status_of(ctx, e)).await?;
    let members = match cmd {
        MemberCmd::List => status.members,
        MemberCmd::Add { id, addr } => {
            if id == 0 {
                bail!("node ids start at 1");
            }
            if status.members.iter().any(|m| m.id == id) {
                bail!("node {id} is already a member");
            }
            let req = v1::AddLearnerRequest { id, addr };
            ctx.on_cluster(&req, |mut c, r| async move { c.add_learner(r).await }).await?.members
        }
        MemberCmd::Promote { ids } => {
            let mut voters: Vec<u64> =
                status.members.iter().filter(|m| m.voter).map(|m| m.id).collect();
            for id in ids {
                let member = status.members.iter().find(|m| m.id == id).ok_or_else(|| {
                    anyhow!("node {id} is not a member: add it first (member add)")
                })?;
                if member.voter {
                    bail!("node {id} is already a voter");
                }
                if !voters.contains(&id) {
                    voters.push(id);
                }
            }
            if voters.len() % 2 == 0 {
                eprintln!(
                    "warning: {} voters tolerate no more failures than {} (keep the number odd)",
                    voters.len(),
                    voters.len() - 1
                );
            }
            change(ctx, v1::ChangeMembershipRequest { voters, retain: false, remove: vec![] })
                .await?
        }
        MemberCmd::Remove { id } => {
            if !status.members.iter().any(|m| m.id == id) {
                bail!("node {id} is not a member");
            }
            change(
                ctx,
                v1::ChangeMembershipRequest { voters: vec![], retain: false, remove: vec![id] },
            )
            .await?
        }
    };
    let leader = ctx.first(|e| status_of(ctx, e)).await.ok().and_then(|s| s.leader);
    let rows = member_rows(&members, leader.or(status.leader));
    emit(out, ctx.format, &rows, member_table)
}

async fn change(ctx: &Ctx, req: v1::ChangeMembershipRequest) -> anyhow::Result<Vec<v1::Member>> {
    let reply =
        ctx.on_cluster(&req, |mut c, r| async move { c.change_membership(r).await }).await?;
    Ok(reply.members)
}

#[derive(Debug, Serialize)]
struct HealthRow {
    endpoint: String,
    healthy: bool,
    took_ms: u128,
    error: String,
}

#[derive(Debug, Serialize)]
struct StatusRow {
    endpoint: String,
    id: u64,
    addr: String,
    role: String,
    term: u64,
    leader: Option<u64>,
    last_log_index: u64,
    commit_index: u64,
    applied_index: u64,
    /// Entries the leader has committed that this node has not applied.
    lag: u64,
    data_bytes: u64,
    budgets: u64,
    live_leases: u64,
    audit_records: u64,
}

pub async fn endpoint(ctx: &Ctx, cmd: EndpointCmd, out: &mut dyn Write) -> anyhow::Result<()> {
    match cmd {
        EndpointCmd::Health => {
            let mut rows = Vec::new();
            for e in &ctx.endpoints {
                let started = std::time::Instant::now();
                let result = async {
                    let mut c = tonic_health::pb::health_client::HealthClient::new(ctx.channel(e)?);
                    let reply = c
                        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
                        .await
                        .map_err(|s| anyhow!(describe(&s)))?
                        .into_inner();
                    let serving =
                        tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
                    if reply.status == serving {
                        Ok(())
                    } else {
                        Err(anyhow!("status {}", reply.status))
                    }
                }
                .await;
                rows.push(HealthRow {
                    endpoint: e.clone(),
                    healthy: result.is_ok(),
                    took_ms: started.elapsed().as_millis(),
                    error: result.err().map(|e| format!("{e:#}")).unwrap_or_default(),
                });
            }
            emit(out, ctx.format, &rows, |rows| {
                let mut t = Table::new(&["ENDPOINT", "HEALTHY", "TOOK", "ERROR"]);
                for r in rows {
                    t.row(vec![
                        r.endpoint.clone(),
                        r.healthy.to_string(),
                        format!("{} ms", r.took_ms),
                        r.error.clone(),
                    ]);
                }
                t.render()
            })?;
            let sick: Vec<&str> =
                rows.iter().filter(|r| !r.healthy).map(|r| r.endpoint.as_str()).collect();
            if !sick.is_empty() {
                bail!("unhealthy: {}", sick.join(", "));
            }
            Ok(())
        }
        EndpointCmd::Status => {
            let mut answers = Vec::new();
            let mut failed = Vec::new();
            for e in &ctx.endpoints {
                match status_of(ctx, e.clone()).await {
                    Ok(s) => answers.push((e.clone(), s)),
                    Err(s) => failed.push(format!("{e}: {}", describe(&s))),
                }
            }
            // The leader's commit index is the cluster's; elsewhere it is a lower bound.
            let commit = answers
                .iter()
                .filter(|(_, s)| rpc::is_leader(s))
                .map(|(_, s)| s.commit_index)
                .max()
                .unwrap_or_else(|| answers.iter().map(|(_, s)| s.commit_index).max().unwrap_or(0));
            let rows: Vec<StatusRow> = answers
                .into_iter()
                .map(|(endpoint, s)| StatusRow {
                    endpoint,
                    id: s.id,
                    role: rpc::role_name(s.role()).to_owned(),
                    addr: s.addr,
                    term: s.term,
                    leader: s.leader,
                    last_log_index: s.last_log_index,
                    commit_index: s.commit_index,
                    applied_index: s.applied_index,
                    lag: commit.saturating_sub(s.applied_index),
                    data_bytes: s.data_bytes,
                    budgets: s.budgets,
                    live_leases: s.live_leases,
                    audit_records: s.audit_records,
                })
                .collect();
            emit(out, ctx.format, &rows, |rows| {
                let mut t = Table::new(&[
                    "ENDPOINT", "ID", "ROLE", "TERM", "LEADER", "LAST LOG", "COMMIT", "APPLIED",
                    "LAG", "DATA", "BUDGETS", "LEASES", "AUDIT",
                ]);
                for r in rows {
                    t.row(vec![
                        r.endpoint.clone(),
                        r.id.to_string(),
                        r.role.clone(),
                        r.term.to_string(),
                        r.leader.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
                        r.last_log_index.to_string(),
                        r.commit_index.to_string(),
                        r.applied_index.to_string(),
                        r.lag.to_string(),
                        bytes(r.data_bytes),
                        r.budgets.to_string(),
                        r.live_leases.to_string(),
                        r.audit_records.to_string(),
                    ]);
                }
                t.render()
            })?;
            if !failed.is_empty() {
                bail!("no status from {}", failed.join("; "));
            }
            Ok(())
        }
    }
}

pub async fn leader(ctx: &Ctx, cmd: LeaderCmd, out: &mut dyn Write) -> anyhow::Result<()> {
    let LeaderCmd::Move { id } = cmd;
    let req = v1::TransferLeaderRequest { to: id };
    let status = ctx.on_cluster(&req, |mut c, r| async move { c.transfer_leader(r).await }).await?;
    if status.leader != Some(id) {
        bail!("node {id} did not become leader (leader is {:?})", status.leader);
    }
    let rows = member_rows(&status.members, status.leader);
    emit(out, ctx.format, &rows, member_table)
}
