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
use std::process::{Child, Command, Stdio};

use ration_testkit::python::{self, run};
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
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);

/// The venv, made once per test process.
fn venv() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("pyvenv");
    python::venv(python::Venv { dir: &dir, packages: PACKAGES, check: IMPORTS })
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
