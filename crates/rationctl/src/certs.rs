//! `certs dev`: a development CA and the certificates a cluster and its clients
//! need, written as PEM files (rcgen, through `ration_tls::dev`). For trials and
//! tests: the CA's key sits beside the certificates it signed.

use std::path::PathBuf;

use clap::Subcommand;
use serde::Serialize;

use crate::output::{emit, Table};
use crate::Ctx;

#[derive(Debug, Subcommand)]
pub enum CertsCmd {
    /// Make a CA (ca.pem, ca-key.pem), a certificate per node (node-<id>.pem and
    /// node-<id>-key.pem, serving --hosts) and one per principal (<name>.pem,
    /// <name>-key.pem), valid for a year.
    Dev {
        /// Where to write the files (created if missing).
        #[arg(long, default_value = "ration-certs")]
        out: PathBuf,
        /// Node ids to make certificates for.
        #[arg(long, value_delimiter = ',', default_value = "1")]
        nodes: Vec<u64>,
        /// DNS names and IP addresses the nodes are dialled by (in every node
        /// certificate).
        #[arg(long, value_delimiter = ',', default_value = "127.0.0.1,localhost")]
        hosts: Vec<String>,
        /// Principals to make client certificates for.
        #[arg(long, value_delimiter = ',', default_value = "admin")]
        principals: Vec<String>,
    },
}

#[derive(Serialize)]
struct Made {
    party: String,
    cert: String,
    key: String,
}

pub(crate) async fn run(
    ctx: &Ctx,
    cmd: CertsCmd,
    out: &mut dyn std::io::Write,
) -> anyhow::Result<()> {
    let CertsCmd::Dev { out: dir, nodes, hosts, principals } = cmd;
    if let Some(bad) = principals.iter().find(|p| {
        p.is_empty() || !p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
    }) {
        anyhow::bail!(
            "principal {bad:?}: use letters, digits and - _ . @ (it becomes a file name and a URI)"
        );
    }
    if nodes.contains(&0) {
        anyhow::bail!("node ids start at 1");
    }
    let set = ration_tls::dev::write_set(&dir, &nodes, &hosts, &principals)
        .map_err(|e| anyhow::anyhow!("writing certificates into {}: {e}", dir.display()))?;
    let mut made = vec![Made {
        party: "CA".into(),
        cert: set.ca.display().to_string(),
        key: dir.join("ca-key.pem").display().to_string(),
    }];
    for (id, f) in &set.nodes {
        made.push(Made {
            party: format!("node {id}"),
            cert: f.cert.display().to_string(),
            key: f.key.display().to_string(),
        });
    }
    for (p, f) in &set.principals {
        made.push(Made {
            party: format!("principal {p}"),
            cert: f.cert.display().to_string(),
            key: f.key.display().to_string(),
        });
    }
    emit(out, ctx.format, &made, |made| {
        let mut t = Table::new(&["PARTY", "CERT", "KEY"]);
        for m in made {
            t.row(vec![m.party.clone(), m.cert.clone(), m.key.clone()]);
        }
        t.render()
    })
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Make a bearer token for a principal, signed with the cluster's token key
    /// (the file every node reads as token_key_file). Prints the token.
    Issue {
        /// The key file.
        #[arg(long)]
        key_file: PathBuf,
        /// Who the token authenticates.
        #[arg(long)]
        principal: String,
        /// How long it is valid: seconds, or a number with s, m, h or d.
        #[arg(long, default_value = "30d")]
        ttl: String,
    },
}

/// Seconds in `ttl` (`90`, `90s`, `15m`, `12h`, `30d`).
fn ttl_seconds(ttl: &str) -> anyhow::Result<u64> {
    let t = ttl.trim();
    let (digits, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| anyhow::anyhow!("--ttl {ttl:?}: use 90, 90s, 15m, 12h or 30d"))?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => anyhow::bail!("--ttl {ttl:?}: use 90, 90s, 15m, 12h or 30d"),
    };
    let secs = n.saturating_mul(scale);
    if secs == 0 {
        anyhow::bail!("--ttl must be positive");
    }
    Ok(secs)
}

pub(crate) fn token(ctx: &Ctx, cmd: TokenCmd, out: &mut dyn std::io::Write) -> anyhow::Result<()> {
    let TokenCmd::Issue { key_file, principal, ttl } = cmd;
    ration_core::Principal::new(principal.as_str())
        .map_err(|e| anyhow::anyhow!("--principal: {e}"))?;
    let key = ration_tls::token::TokenKey::load(&key_file)?;
    let not_after = ration_tls::token::unix_now().saturating_add(ttl_seconds(&ttl)?);
    let token = key.issue(&principal, not_after);
    #[derive(Serialize)]
    struct Issued {
        principal: String,
        not_after_unix: u64,
        token: String,
    }
    let issued = Issued { principal, not_after_unix: not_after, token };
    emit(out, ctx.format, &issued, |i| format!("{}\n", i.token))
}
