//! `audit export` against a real 3-node cluster while nodes go away mid-export:
//! every page fails over, a stopped export is a prefix that `--resume` finishes,
//! the trailer names the count and the chain head, and `audit verify --file` tells
//! complete, prefix and broken files apart by exit status.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ration_proto::v1;
use ration_testkit::inproc::Cluster;
use ration_testkit::{create_lifetime_budget, ledger, meta};
use rationctl::audit::{exit_code, ExportFile, EXIT_BROKEN, EXIT_PREFIX};
use rationctl::FileFormat;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Lease grants written, after one budget creation: 2,401 records, three pages.
const GRANTS: u64 = 2400;
const RECORDS: u64 = GRANTS + 1;

/// Runs rationctl in-process: its result and what it printed.
async fn ctl(endpoints: &[String], args: &[&str]) -> (anyhow::Result<()>, String) {
    let eps = endpoints.join(",");
    let mut argv = vec!["rationctl", "--endpoints", &eps, "--timeout-ms", "3000"];
    argv.extend_from_slice(args);
    let mut out = Vec::new();
    let result = rationctl::run(argv, &mut out).await;
    (result, String::from_utf8(out).unwrap())
}

/// `audit verify --file` with JSON output: the exit status the binary would use, the
/// report, and the error line (empty when complete).
async fn verify(path: &Path) -> (i32, Value, String) {
    let (result, out) =
        ctl(&["127.0.0.1:1".into()], &["-o", "json", "audit", "verify", "--file", p(path)]).await;
    let report: Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("verify printed {out:?}: {e}"));
    match result {
        Ok(()) => (0, report, String::new()),
        Err(e) => (exit_code(&e), report, format!("{e:#}")),
    }
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A loopback port nothing listens on.
fn dead_endpoint() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr.to_string()
}

/// A TCP proxy in front of one node. It passes bytes until more than `limit` have
/// come back from the node, then drops every connection and stops listening: to a
/// client behind it, the node dies in the middle of a reply.
#[derive(Debug)]
struct CutProxy {
    addr: SocketAddr,
    sent: AtomicU64,
    limit: AtomicU64,
    cut: watch::Sender<bool>,
}

impl CutProxy {
    async fn start(target: SocketAddr) -> Arc<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = Arc::new(Self {
            addr: listener.local_addr().unwrap(),
            sent: AtomicU64::new(0),
            limit: AtomicU64::new(u64::MAX),
            cut: watch::Sender::new(false),
        });
        let me = proxy.clone();
        tokio::spawn(async move {
            let mut cut = me.cut.subscribe();
            loop {
                let conn = tokio::select! {
                    c = listener.accept() => match c {
                        Ok((c, _)) => c,
                        Err(_) => return,
                    },
                    // The listener is dropped: connections are refused from now on.
                    _ = cut.wait_for(|c| *c) => return,
                };
                tokio::spawn(me.clone().serve(conn, target));
            }
        });
        proxy
    }

    async fn serve(self: Arc<Self>, conn: TcpStream, target: SocketAddr) {
        let Ok(upstream) = TcpStream::connect(target).await else { return };
        let _ = conn.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let (mut cr, mut cw) = conn.into_split();
        let (mut ur, mut uw) = upstream.into_split();
        let (mut cut_up, mut cut_down) = (self.cut.subscribe(), self.cut.subscribe());
        let up = async {
            tokio::select! {
                _ = tokio::io::copy(&mut cr, &mut uw) => {}
                _ = cut_up.wait_for(|c| *c) => {}
            }
        };
        let down = async {
            let mut buf = vec![0u8; 8 * 1024];
            loop {
                let n = tokio::select! {
                    r = ur.read(&mut buf) => match r {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    },
                    _ = cut_down.wait_for(|c| *c) => return,
                };
                let total = self.sent.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                if total > self.limit.load(Ordering::SeqCst) {
                    self.cut.send_replace(true);
                    return;
                }
                if cw.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        };
        tokio::select! {
            _ = up => {}
            _ = down => {}
        }
    }

    /// Measures one full page of records through the proxy, then arms it to cut
    /// halfway through the second page a client fetches.
    async fn cut_in_second_page(&self) {
        let page = ledger(self.addr)
            .query_audit(v1::QueryAuditRequest {
                limit: 1000,
                linearizable: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page.records.len(), 1000);
        let one_page = self.sent.swap(0, Ordering::SeqCst);
        self.limit.store(one_page + one_page / 2, Ordering::SeqCst);
    }

    async fn wait_cut(&self) {
        self.cut.subscribe().wait_for(|c| *c).await.unwrap();
    }

    fn was_cut(&self) -> bool {
        *self.cut.borrow()
    }
}

/// `GRANTS` lease grants on `acme`, in batches of 1000.
async fn grant(addr: SocketAddr) {
    let mut l = ledger(addr);
    for start in (0..GRANTS).step_by(1000) {
        let ops = (start..(start + 1000).min(GRANTS))
            .map(|i| v1::BatchOp {
                op: Some(v1::batch_op::Op::Acquire(v1::AcquireRequest {
                    meta: meta("writer", i + 1, "gw-1"),
                    budget: "acme".into(),
                    unit: "tokens".into(),
                    wanted: 1,
                    min: 1,
                    ttl_ms: 60_000,
                    starts_at_ms: 0,
                })),
            })
            .collect();
        let reply = l.batch(v1::BatchRequest { ops }).await.unwrap().into_inner();
        for r in &reply.results {
            assert!(matches!(r.result, Some(v1::batch_result::Result::Lease(_))), "{r:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn export_fails_over_page_by_page_and_verify_tells_complete_from_prefix_and_broken() {
    let mut c = Cluster::start(3, |_| {}).await;
    let leader = c.leader().await;
    let addrs: Vec<SocketAddr> = c.running();
    create_lifetime_budget(&addrs, 1, "acme", 1_000_000_000).await;
    grant(c.addrs[&leader]).await;
    let statuses = c.converged().await;
    assert!(statuses.iter().all(|s| s.audit_records == RECORDS), "{statuses:?}");
    let eps: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    let dir = c.dir.path().to_owned();

    // 1. The only endpoint dies halfway through the second page: the export stops,
    // says what the file holds, and the file is a prefix that --resume finishes.
    let follower = *c.addrs.keys().find(|id| **id != leader).unwrap();
    let p1 = CutProxy::start(c.addrs[&follower]).await;
    p1.cut_in_second_page().await;
    let resumed = dir.join("resumed.jsonl");
    let (result, _) = ctl(&[p1.addr.to_string()], &["audit", "export", "--out", p(&resumed)]).await;
    let err = result.unwrap_err();
    let msg = format!("{err:#}");
    assert_eq!(exit_code(&err), 1, "{msg}");
    assert!(p1.was_cut());
    assert!(
        msg.contains("holds 1000 records (seq 0..=999) and no trailer, so it is a prefix")
            && msg.contains(&format!("rationctl audit export --out {} --resume", p(&resumed)))
            && msg.contains("no endpoint answered for audit records from seq 1000 in 5 rounds"),
        "{msg}"
    );
    let (code, report, err) = verify(&resumed).await;
    assert_eq!(
        (code, &report["status"], &report["records"]),
        (EXIT_PREFIX, &"prefix".into(), &1000.into())
    );
    assert!(err.contains("is a prefix") && err.contains("no trailer"), "{err}");
    ctl(&eps, &["audit", "export", "--out", p(&resumed), "--resume"]).await.0.unwrap();
    let (code, report, _) = verify(&resumed).await;
    assert_eq!((code, &report["status"]), (0, &"complete".into()), "{report}");

    // 2. A dead endpoint first, then a proxy in front of the leader that dies
    // halfway through the second page, and the leader itself stopped then: every
    // page fails over (through a leader election) and the export completes.
    let p2 = CutProxy::start(c.addrs[&leader]).await;
    p2.cut_in_second_page().await;
    let mut eps2 = vec![dead_endpoint(), p2.addr.to_string()];
    eps2.extend(c.addrs.iter().filter(|(id, _)| **id != leader).map(|(_, a)| a.to_string()));
    let full = dir.join("failover.jsonl");
    let export_args = ["audit", "export", "--out", p(&full)];
    let started = std::time::Instant::now();
    let ((result, _), ()) = tokio::join!(ctl(&eps2, &export_args), async {
        p2.wait_cut().await;
        c.stop(leader).await;
    });
    result.unwrap();
    assert!(p2.was_cut());
    eprintln!("export with failover took {:?}", started.elapsed());

    // The right count, and a trailer naming it and the chain head.
    let running: Vec<String> = c.running().iter().map(ToString::to_string).collect();
    let chain = ration_testkit::audit_records(c.running()[0]).await;
    assert_eq!(chain.len() as u64, RECORDS);
    let file = ExportFile::read(&full, FileFormat::Jsonl).unwrap();
    assert_eq!(file.records.len() as u64, RECORDS);
    assert!(file.records.iter().enumerate().all(|(i, r)| r.entry.seq == i as u64));
    let (trailer, _) = file.trailer.clone().expect("a trailer");
    let head = ration_testkit::hex(&chain.last().unwrap().hash);
    assert_eq!(
        (trailer.records, trailer.first_seq, trailer.last_seq, trailer.chain_head.as_deref()),
        (RECORDS, Some(0), Some(RECORDS - 1), Some(head.as_str()))
    );
    let text = std::fs::read_to_string(&full).unwrap();
    assert_eq!(
        text.lines().last().unwrap(),
        format!(
            r#"{{"trailer":{{"records":{RECORDS},"first_seq":0,"last_seq":{},"chain_head":"{head}"}}}}"#,
            RECORDS - 1
        )
    );
    // The resumed export is the same file, byte for byte; so is one to stdout.
    assert_eq!(std::fs::read(&resumed).unwrap(), text.as_bytes());
    let (result, stdout) = ctl(&running, &["audit", "export"]).await;
    result.unwrap();
    assert_eq!(stdout, text);
    // Resuming a complete file with nothing new leaves it as it was.
    ctl(&running, &["audit", "export", "--out", p(&resumed), "--resume"]).await.0.unwrap();
    assert_eq!(std::fs::read(&resumed).unwrap(), text.as_bytes());

    // (b) verify: complete, at the chain head.
    let (code, report, _) = verify(&full).await;
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["status"], "complete");
    assert_eq!(report["records"], RECORDS);
    assert_eq!(report["head_hash"], head.as_str());
    assert_eq!(report["trailer"]["chain_head"], head.as_str());
    let (result, table) = ctl(&running, &["audit", "verify", "--file", p(&full)]).await;
    result.unwrap();
    assert!(table.starts_with(&format!("OK: complete: {RECORDS} records verified")), "{table}");

    let lines: Vec<&str> = text.lines().collect();
    let copy = |name: &str, content: String| {
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        path
    };
    let joined = |lines: &[&str]| lines.iter().map(|l| format!("{l}\n")).collect::<String>();

    // (c) Truncated copies are prefixes: the trailer and the last records dropped...
    let cut = copy("cut.jsonl", joined(&lines[..2000]));
    let (code, report, err) = verify(&cut).await;
    assert_eq!(
        (code, &report["status"], &report["records"]),
        (EXIT_PREFIX, &"prefix".into(), &2000.into())
    );
    assert_eq!(report["last_seq"], 1999);
    assert!(err.contains("is a prefix: its 2000 records chain, but it has no trailer"), "{err}");
    // ... a file cut in the middle of a line ...
    let torn = copy("torn.jsonl", format!("{}{}", joined(&lines[..1500]), &lines[1500][..100]));
    let (code, report, err) = verify(&torn).await;
    assert_eq!((code, &report["records"]), (EXIT_PREFIX, &1500.into()));
    assert!(err.contains("last line is cut off"), "{err}");
    // ... and records missing before a trailer that names them.
    let short = copy("short.jsonl", joined(&[&lines[..2000], &lines[lines.len() - 1..]].concat()));
    let (code, _, err) = verify(&short).await;
    assert_eq!(code, EXIT_PREFIX);
    assert!(err.contains(&format!("its trailer names {RECORDS} records")), "{err}");
    // A prefix resumes to the complete file.
    ctl(&running, &["audit", "export", "--out", p(&torn), "--resume"]).await.0.unwrap();
    assert_eq!(std::fs::read_to_string(&torn).unwrap(), text);

    // (d) One altered record is broken; so is a trailer that disagrees, and a record
    // after the trailer.
    let mut altered: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
    assert!(altered[1234].contains(r#""granted":1,"#));
    altered[1234] = altered[1234].replacen(r#""granted":1,"#, r#""granted":2,"#, 1);
    let altered =
        copy("altered.jsonl", joined(&altered.iter().map(String::as_str).collect::<Vec<_>>()));
    let (code, report, err) = verify(&altered).await;
    assert_eq!((code, &report["status"]), (EXIT_BROKEN, &"broken".into()));
    assert!(
        err.contains("is broken: audit chain breaks at record 1234")
            && err.contains("does not match its hash"),
        "{err}"
    );
    let zeros = "0".repeat(64);
    let mut wrong = lines.clone();
    let trailer_line = wrong.pop().unwrap().replace(&head, &zeros);
    wrong.push(&trailer_line);
    let wrong_head = copy("wrong_head.jsonl", joined(&wrong));
    let (code, _, err) = verify(&wrong_head).await;
    assert_eq!(code, EXIT_BROKEN);
    assert!(err.contains("disagrees with its records"), "{err}");
    let after = copy("after.jsonl", format!("{text}{}\n", lines[5]));
    let (code, _, err) = verify(&after).await;
    assert_eq!(code, EXIT_BROKEN);
    assert!(err.contains(&format!("line {} follows the trailer", lines.len() + 1)), "{err}");
    // A broken file is not resumed.
    let (result, _) = ctl(&running, &["audit", "export", "--out", p(&altered), "--resume"]).await;
    let err = format!("{:#}", result.unwrap_err());
    assert!(err.contains("cannot resume") && err.contains("broken"), "{err}");

    // CSV: the same trailer, as a row; a cut copy is a prefix and resumes.
    let csv = dir.join("audit.csv");
    ctl(&running, &["audit", "export", "--format", "csv", "--out", p(&csv)]).await.0.unwrap();
    let (code, report, _) = verify(&csv).await;
    assert_eq!((code, &report["records"]), (0, &RECORDS.into()), "{report}");
    let csv_text = std::fs::read_to_string(&csv).unwrap();
    let rows: Vec<&str> = csv_text.lines().collect();
    assert!(rows.last().unwrap().starts_with("trailer,"), "{}", rows.last().unwrap());
    let csv_cut = copy("cut.csv", joined(&rows[..1001]));
    let (code, report, _) = verify(&csv_cut).await;
    assert_eq!((code, &report["records"]), (EXIT_PREFIX, &1000.into()));
    ctl(&running, &["audit", "export", "--format", "csv", "--out", p(&csv_cut), "--resume"])
        .await
        .0
        .unwrap();
    assert_eq!(std::fs::read_to_string(&csv_cut).unwrap(), csv_text);

    // The exit statuses are in verify's help.
    let (result, _) = ctl(&running, &["audit", "verify", "--help"]).await;
    let help = result.unwrap_err().to_string();
    assert!(help.contains("3 prefix") && help.contains("4 broken"), "{help}");
    c.shutdown().await;
}
