//! A real `rationd`, checked from outside by a Python client that uses nothing but
//! PyPI's grpcio packages (tests/python/blackbox.py): health checking answers SERVING,
//! server reflection (v1alpha and v1) lists every service and describes
//! `ration.v1.Ledger`. That is what grpcurl, Kubernetes' gRPC probes and any
//! client without our code see.
//!
//! The Python environment is a venv under the target directory
//! (`$CARGO_TARGET_TMPDIR/pyvenv`), made once with `python3 -m venv` and pip-installed
//! pinned packages, then reused while the pins stay the same. `python3` is required:
//! without it the test fails and says so.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Pinned: the versions this test was written against.
const PACKAGES: &[&str] = &[
    "grpcio==1.85.1",
    "grpcio-health-checking==1.85.1",
    "grpcio-reflection==1.85.1",
    "protobuf==7.36.2",
];
/// What the venv must be able to import to count as ready.
const IMPORTS: &str = "import grpc, grpc_health.v1.health_pb2, grpc_reflection.v1alpha.proto_reflection_descriptor_database";
const PIP_ATTEMPTS: u32 = 3;
const PIP_TIMEOUT: Duration = Duration::from_secs(300);
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);

/// A finished command: exit status and what it printed.
struct Ran {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn output(&self) -> String {
        format!("--- stdout\n{}--- stderr\n{}", self.stdout, self.stderr)
    }
}

/// Runs `cmd` to completion, killing it after `limit`. Output goes through files so
/// a chatty child never blocks on a full pipe.
fn run(cmd: &mut Command, limit: Duration) -> Result<Ran, String> {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = std::fs::read_to_string(&err).unwrap_or_default();
            return Err(format!("{cmd:?} did not finish within {limit:?}\n{stderr}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(Ran {
        status,
        stdout: std::fs::read_to_string(&out).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err).unwrap_or_default(),
    })
}

/// Python 3 on PATH, or a failed test saying what is missing.
fn require_python3() {
    match run(Command::new("python3").arg("--version"), Duration::from_secs(30)) {
        Ok(r) if r.status.success() => {}
        Ok(r) => panic!("python3 --version failed: {}\n{}", r.status, r.output()),
        Err(e) => panic!(
            "this test needs python3 (with the venv module) on PATH; install Python 3 \
             (e.g. apt-get install python3 python3-venv): {e}"
        ),
    }
}

/// The venv's interpreter, if the venv at `dir` has exactly our pins and imports.
fn ready_venv(dir: &Path) -> Option<PathBuf> {
    let python = dir.join("bin").join("python");
    let stamp = std::fs::read_to_string(dir.join("ration-requirements.txt")).ok()?;
    if stamp != PACKAGES.join("\n") {
        return None;
    }
    let ok = run(Command::new(&python).args(["-c", IMPORTS]), Duration::from_secs(60));
    ok.is_ok_and(|r| r.status.success()).then_some(python)
}

/// The venv, made once per test process: the tests here run in parallel threads,
/// and two building it at once would collide on its partial directory.
fn venv() -> PathBuf {
    static VENV: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    VENV.get_or_init(make_venv).clone()
}

/// A venv with the pinned packages: reused if present, else built beside it and
/// renamed into place, so an interrupted build is never mistaken for a ready one.
fn make_venv() -> PathBuf {
    require_python3();
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let dir = tmp.join("pyvenv");
    if let Some(python) = ready_venv(&dir) {
        return python;
    }
    let partial = tmp.join(format!("pyvenv.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    let made =
        run(Command::new("python3").args(["-m", "venv"]).arg(&partial), Duration::from_secs(180))
            .unwrap_or_else(|e| panic!("python3 -m venv: {e}"));
    assert!(
        made.status.success(),
        "python3 -m venv {} failed (on Debian/Ubuntu: apt-get install python3-venv)\n{}",
        partial.display(),
        made.output()
    );
    let mut attempt = 0;
    loop {
        attempt += 1;
        let installed = run(
            Command::new(partial.join("bin").join("python"))
                .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
                .args(["--no-input", "--timeout", "30", "--retries", "2"])
                .args(PACKAGES),
            PIP_TIMEOUT,
        );
        match installed {
            Ok(r) if r.status.success() => break,
            Ok(r) if attempt >= PIP_ATTEMPTS => {
                panic!("pip install {PACKAGES:?} failed {attempt} times; last:\n{}", r.output())
            }
            Err(e) if attempt >= PIP_ATTEMPTS => {
                panic!("pip install {PACKAGES:?} failed {attempt} times; last: {e}")
            }
            Ok(r) => eprintln!("pip install attempt {attempt} failed, retrying:\n{}", r.output()),
            Err(e) => eprintln!("pip install attempt {attempt} failed, retrying: {e}"),
        }
        std::thread::sleep(Duration::from_secs(2 * u64::from(attempt)));
    }
    std::fs::write(partial.join("ration-requirements.txt"), PACKAGES.join("\n")).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    if std::fs::rename(&partial, &dir).is_err() {
        // Another test run finished its venv first: use that one.
        let _ = std::fs::remove_dir_all(&partial);
    }
    ready_venv(&dir)
        .unwrap_or_else(|| panic!("the venv at {} does not import grpcio", dir.display()))
}

/// A running `rationd`; killed (and reaped) when dropped, pass or fail.
struct Rationd {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    _data: tempfile::TempDir,
}

impl Rationd {
    /// Starts a single node on a free loopback port and waits until it accepts
    /// connections. A port taken between choosing and binding it is retried.
    fn start() -> Self {
        Self::start_with(&[])
    }

    /// [`Rationd::start`] with more flags.
    fn start_with(extra: &[String]) -> Self {
        for _ in 0..3 {
            let data = tempfile::tempdir().unwrap();
            let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
            let log = data.path().join("rationd.log");
            let child = Command::new(env!("CARGO_BIN_EXE_rationd"))
                .args(["--listen", &addr.to_string(), "--metrics-listen", "off"])
                .args(extra)
                .arg("--data-dir")
                .arg(data.path().join("node"))
                .env("RATION_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            let mut node = Rationd { child, addr, log, _data: data };
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Some(status) = node.child.try_wait().unwrap() {
                    eprintln!("rationd exited at start ({status}):\n{}", node.log_text());
                    break;
                }
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return node;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            assert!(
                Instant::now() < deadline,
                "rationd did not listen within 30 s:\n{}",
                node.log_text()
            );
        }
        panic!("rationd did not start (3 attempts)");
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Rationd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn python_grpcio_sees_health_and_reflection() {
    let started = Instant::now();
    let python = venv();
    let venv_time = started.elapsed();
    let node = Rationd::start();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/blackbox.py");
    let ran = run(Command::new(&python).arg(&script).arg(node.addr.to_string()), SCRIPT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\nrationd log:\n{}", node.log_text()));
    eprintln!("{}", ran.output());
    assert!(
        ran.status.success(),
        "blackbox.py against rationd at {} failed ({}):\n{}\nrationd log:\n{}",
        node.addr,
        ran.status,
        ran.output(),
        node.log_text()
    );
    eprintln!(
        "python venv ready in {:.1} s, whole test {:.1} s",
        venv_time.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

/// A node serving mutual TLS (a client port and a peer port), checked by Python's
/// grpcio with its own TLS stack: a client certificate is served, no certificate
/// and a node certificate used as a client are refused with their statuses.
#[test]
fn python_grpcio_over_mutual_tls() {
    let python = venv();
    let certs = tempfile::tempdir().unwrap();
    let set = ration_tls::dev::write_set(
        certs.path(),
        &[1],
        &["127.0.0.1".into(), "localhost".into()],
        &["gw".into()],
    )
    .unwrap();
    let node_files = &set.nodes[0].1;
    let gw = &set.principals[0].1;
    let peer = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let node = Rationd::start_with(&[
        "--peer-listen".into(),
        peer.to_string(),
        "--tls-ca".into(),
        path(&node_files.ca),
        "--tls-cert".into(),
        path(&node_files.cert),
        "--tls-key".into(),
        path(&node_files.key),
    ]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/tls_blackbox.py");
    let ran = run(
        Command::new(&python).arg(&script).arg(node.addr.to_string()).args([
            path(&set.ca),
            path(&gw.cert),
            path(&gw.key),
            path(&node_files.cert),
            path(&node_files.key),
        ]),
        SCRIPT_TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("{e}\nrationd log:\n{}", node.log_text()));
    eprintln!("{}", ran.output());
    assert!(
        ran.status.success(),
        "tls_blackbox.py against rationd at {} failed ({}):\n{}\nrationd log:\n{}",
        node.addr,
        ran.status,
        ran.output(),
        node.log_text()
    );
}
