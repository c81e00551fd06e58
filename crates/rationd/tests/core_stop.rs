//! A real `rationd` whose Raft core stops exits non-zero, so systemd's
//! `Restart=on-failure` or Kubernetes restarts it. No fault switch is built into the
//! binary: the node's data directory is on a small tmpfs that the test mounts, and
//! writes fill it until the log store's writes fail, which openraft treats as fatal.
//!
//! Mounting needs root (CI runs as root here). Without it the test says so and
//! passes without checking anything; `RATION_REQUIRE_MOUNT=1` makes that a failure.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ration_proto::v1;
use ration_proto::v1::ledger_client::LedgerClient;
use ration_testkit::process::free_addrs;
use ration_testkit::{channel, leader, meta};

struct Mount(std::path::PathBuf);

impl Mount {
    fn tmpfs(at: &Path, size: &str) -> Result<Self, String> {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(Self(at.to_owned()))
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rationd_exits_non_zero_when_its_raft_core_stops() {
    let root = tempfile::tempdir().unwrap();
    let _mount = match Mount::tmpfs(root.path(), "6m") {
        Ok(m) => m,
        Err(e) if std::env::var_os("RATION_REQUIRE_MOUNT").is_none() => {
            eprintln!("SKIPPED: cannot mount a tmpfs ({}); run as root to check this", e.trim());
            return;
        }
        Err(e) => panic!("cannot mount a tmpfs: {e}"),
    };
    let addr = free_addrs(1)[0];
    let logs = tempfile::tempdir().unwrap();
    let (out, err) = (logs.path().join("stdout"), logs.path().join("stderr"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_rationd"))
        .args(["--node-id", "1", "--listen", &addr.to_string()])
        .args(["--data-dir", root.path().join("node-1").to_str().unwrap()])
        .args(["--initial-cluster", &format!("1={addr}"), "--metrics-listen", "off"])
        .env("RATION_LOG", "warn")
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::from(std::fs::File::create(&out).unwrap()))
        .stderr(Stdio::from(std::fs::File::create(&err).unwrap()))
        .spawn()
        .unwrap();
    leader(&[addr]).await;

    // Budgets with many limits (~1 KB per command) until the disk is full and the
    // process exits.
    let limits: Vec<v1::Limit> = (0..16)
        .map(|i| v1::Limit {
            unit: format!("unit_{i:02}_padding_padding_padding"),
            cap: 1_000_000,
            window: Some(v1::Window { period: v1::Period::Month as i32, offset_minutes: 0 }),
            static_allowance: None,
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut written = 0u64;
    let mut last_error = None;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "rationd still runs after {written} writes (last error: {last_error:?}):\n{}",
            std::fs::read_to_string(&out).unwrap_or_default()
        );
        let mut c = LedgerClient::new(channel(addr));
        let r = c
            .create_budget(v1::CreateBudgetRequest {
                meta: meta("filler", written + 1, "gw-chaos"),
                path: format!("fill-{written}"),
                limits: limits.clone(),
            })
            .await;
        match r {
            Ok(_) => written += 1,
            Err(e) => {
                if last_error.is_none() {
                    eprintln!("first refused write: {e:?}");
                }
                last_error = Some(e);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let stdout = std::fs::read_to_string(&out).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    eprintln!(
        "rationd exited with {status} after {written} writes (last error: {last_error:?})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
    );
    assert!(written > 0, "nothing was written before the disk filled");
    assert!(!status.success(), "rationd exited successfully after its core stopped");
    assert!(
        stdout.contains("the Raft core stopped") || stderr.contains("the Raft core stopped"),
        "rationd did not say its Raft core stopped"
    );
    // rationd's panic hook exits with 101 and logs "panic: ..."; this must be the
    // orderly path instead.
    assert_eq!(status.code(), Some(1), "rationd did not exit through its error path");
    assert!(!stdout.contains("panic: "), "rationd panicked instead of stopping cleanly");
}
