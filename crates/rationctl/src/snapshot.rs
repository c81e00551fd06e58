//! `snapshot save|restore|status`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context};
use clap::Subcommand;
use ration_proto::v1;
use ration_store::backup::SnapshotInfo;
use serde::Serialize;
use sha2::Digest;
use tokio_stream::StreamExt;

use crate::output::{bytes, emit, Table};
use crate::{describe, Ctx};

#[derive(Debug, Subcommand)]
pub enum SnapshotCmd {
    /// Have the first endpoint that answers build a snapshot and download it.
    Save {
        /// Where to write it (written to FILE.part first, renamed when complete).
        file: PathBuf,
    },
    /// Build a new node's data directory from a snapshot file (offline; no
    /// endpoint is contacted). Start the node on it with `--join <member>`.
    Restore {
        /// The snapshot file (from `snapshot save`).
        file: PathBuf,
        /// The data directory to create; it must not exist or be empty.
        #[arg(long)]
        data_dir: PathBuf,
        /// Disaster recovery: make the directory the only voter of a NEW cluster
        /// (new cluster id, membership of this one node), for when every node of the
        /// old cluster is lost. Needs --node-id and --addr.
        #[arg(long, requires_all = ["node_id", "addr"])]
        new_cluster: bool,
        /// With --new-cluster: the node id the directory will run as.
        #[arg(long, requires = "new_cluster")]
        node_id: Option<u64>,
        /// With --new-cluster: the address it will serve on, as others dial it.
        #[arg(long, requires = "new_cluster")]
        addr: Option<String>,
        /// Copy the audit segments the snapshot lists from this directory (an old
        /// data directory's `audit/`, or the audit archive), each checked against
        /// the snapshot's manifest. A snapshot carries only the records after its
        /// last segment; a node that joins an existing cluster fetches missing
        /// segments from its peers, but a new cluster has no peer to ask.
        #[arg(long)]
        audit_segments: Option<PathBuf>,
    },
    /// Check a snapshot file (ledger invariants, audit chain) and describe it.
    Status {
        /// The snapshot file.
        file: PathBuf,
    },
}

#[derive(Debug, Serialize)]
struct Described {
    file: String,
    bytes: u64,
    last_log_index: u64,
    last_log_term: u64,
    members: Vec<String>,
    budgets: usize,
    live_leases: usize,
    audit_records: u64,
    /// Sealed segments the snapshot lists (files beside it, not in it).
    audit_segments: usize,
    /// With `restore --audit-segments`: how many were copied and which are missing.
    #[serde(skip_serializing_if = "Option::is_none")]
    segments_copied: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    segments_missing: Option<Vec<String>>,
    state_digest: String,
}

fn describe_snapshot(file: &std::path::Path, size: u64, info: &SnapshotInfo) -> Described {
    Described {
        file: file.display().to_string(),
        bytes: size,
        last_log_index: info.last_log_index,
        last_log_term: info.last_log_term,
        members: info
            .members
            .iter()
            .map(|(id, addr, voter)| {
                format!("{id}={addr}{}", if *voter { "" } else { " (learner)" })
            })
            .collect(),
        budgets: info.budgets,
        live_leases: info.live_leases,
        audit_records: info.audit_records,
        audit_segments: info.audit_segments,
        segments_copied: None,
        segments_missing: None,
        state_digest: ration_core::audit::hex(&info.digest),
    }
}

fn table(d: &Described) -> String {
    let mut t = Table::new(&["FIELD", "VALUE"]);
    for (k, v) in [
        ("file", d.file.clone()),
        ("size", bytes(d.bytes)),
        ("last log index", d.last_log_index.to_string()),
        ("last log term", d.last_log_term.to_string()),
        ("members", d.members.join(", ")),
        ("budgets", d.budgets.to_string()),
        ("live leases", d.live_leases.to_string()),
        ("audit records", d.audit_records.to_string()),
        ("audit segments", d.audit_segments.to_string()),
        ("state digest", d.state_digest.clone()),
    ] {
        t.row(vec![k.to_owned(), v]);
    }
    if let Some(n) = d.segments_copied {
        t.row(vec!["segments copied".into(), n.to_string()]);
    }
    if let Some(m) = &d.segments_missing {
        let shown = if m.is_empty() { "none".to_owned() } else { m.join(", ") };
        t.row(vec!["segments missing".into(), shown]);
    }
    t.render()
}

fn read(file: &std::path::Path) -> anyhow::Result<(Vec<u8>, SnapshotInfo)> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let info = ration_store::backup::inspect_snapshot(&bytes)
        .map_err(|e| anyhow!("{} does not check: {e}", file.display()))?;
    Ok((bytes, info))
}

pub async fn run(ctx: &Ctx, cmd: SnapshotCmd, out: &mut dyn Write) -> anyhow::Result<()> {
    match cmd {
        SnapshotCmd::Save { file } => {
            let (stream, endpoint) = ctx
                .first(|e| async move {
                    let mut c =
                        ctx.cluster(&e).map_err(|x| tonic::Status::unavailable(x.to_string()))?;
                    Ok((c.save_snapshot(v1::SaveSnapshotRequest {}).await?.into_inner(), e))
                })
                .await?;
            let part = file.with_extension("part");
            let written = download(stream, &part).await.with_context(|| {
                format!("downloading the snapshot from {endpoint} into {}", part.display())
            });
            let (size, _) = match written {
                Ok(w) => w,
                Err(e) => {
                    let _ = std::fs::remove_file(&part);
                    return Err(e);
                }
            };
            let (_, info) = read(&part)?;
            std::fs::rename(&part, &file).with_context(|| {
                format!("cannot rename {} to {}", part.display(), file.display())
            })?;
            emit(out, ctx.format, &describe_snapshot(&file, size, &info), table)
        }
        SnapshotCmd::Restore {
            file,
            data_dir,
            new_cluster: true,
            node_id,
            addr,
            audit_segments,
        } => {
            let (bytes, _) = read(&file)?;
            let (id, addr) = (node_id.unwrap_or_default(), addr.unwrap_or_default());
            let (info, cluster) =
                ration_store::backup::restore_new_cluster(&data_dir, &bytes, id, &addr)
                    .await
                    .context("snapshot restore")?;
            let mut d = describe_snapshot(&file, bytes.len() as u64, &info);
            copy_segments(&mut d, &data_dir, audit_segments.as_deref())?;
            emit(out, ctx.format, &d, |d| {
                format!(
                    "{}restored into {} as node {id} ({addr}), the only voter of new cluster {cluster:016x}:\n\
                     start it with: rationd --node-id {id} --listen {addr} --data-dir {}\n\
                     then start each other node on an empty directory with --join {addr} --join-as voter\n",
                    table(d),
                    data_dir.display(),
                    data_dir.display()
                )
            })
        }
        SnapshotCmd::Restore { file, data_dir, audit_segments, .. } => {
            let (bytes, _) = read(&file)?;
            let info =
                ration_store::backup::restore(&data_dir, &bytes).context("snapshot restore")?;
            let mut d = describe_snapshot(&file, bytes.len() as u64, &info);
            copy_segments(&mut d, &data_dir, audit_segments.as_deref())?;
            emit(out, ctx.format, &d, |d| {
                format!(
                    "{}restored into {}: start the node on it with --join <member address>\n",
                    table(d),
                    data_dir.display()
                )
            })
        }
        SnapshotCmd::Status { file } => {
            let (bytes, info) = read(&file)?;
            emit(out, ctx.format, &describe_snapshot(&file, bytes.len() as u64, &info), table)
        }
    }
}

/// With `--audit-segments`: copies the listed segments into the restored directory.
fn copy_segments(
    d: &mut Described,
    data_dir: &std::path::Path,
    from: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let Some(from) = from else { return Ok(()) };
    let done = ration_store::backup::copy_segments(data_dir, from)
        .with_context(|| format!("copying audit segments from {}", from.display()))?;
    d.segments_copied = Some(done.copied);
    d.segments_missing =
        Some(done.missing.iter().map(|(first, n)| format!("{first}..{}", first + n)).collect());
    Ok(())
}

/// Writes the streamed chunks to `part`, checking the size and SHA-256 the server
/// sent. Shows a progress bar on a terminal.
async fn download(
    mut stream: tonic::Streaming<v1::SnapshotChunk>,
    part: &std::path::Path,
) -> anyhow::Result<(u64, Vec<u8>)> {
    let mut f = std::fs::File::create(part)?;
    let mut hasher = sha2::Sha256::new();
    let mut total = None;
    let mut got = 0u64;
    let mut expected_hash = None;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bytes}/{total_bytes} {wide_bar} {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|s| anyhow!(describe(&s)))?;
        if total.is_none() {
            total = Some(chunk.total_bytes);
            bar.set_length(chunk.total_bytes);
        }
        got += chunk.data.len() as u64;
        if Some(got) > total {
            bail!("the server sent more than the {} bytes it announced", total.unwrap_or(0));
        }
        hasher.update(&chunk.data);
        f.write_all(&chunk.data)?;
        bar.set_position(got);
        if !chunk.sha256.is_empty() {
            expected_hash = Some(chunk.sha256);
        }
    }
    bar.finish_and_clear();
    f.sync_all()?;
    let total = total.ok_or_else(|| anyhow!("the server sent no snapshot"))?;
    if got != total {
        bail!("transfer cut short: {got} of {total} bytes");
    }
    let hash = hasher.finalize().to_vec();
    if expected_hash.as_ref() != Some(&hash) {
        bail!("the downloaded snapshot's SHA-256 does not match the server's");
    }
    Ok((got, hash))
}
