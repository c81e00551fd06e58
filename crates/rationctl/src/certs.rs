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
