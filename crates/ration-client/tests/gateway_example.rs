//! The example gateway, run as a user would: `--help` lists its flags, and with no
//! ledger to reach it says so (and keeps trying) instead of exiting or hanging
//! silently. The binary is the one `cargo test` builds beside this test.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Builds the example (as a plain binary: `cargo test` builds examples only as
/// test harnesses) with the cargo running this test, and returns its path.
fn gateway() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let out = Command::new(cargo)
                .args(["build", "-q", "-p", "ration-client", "--example", "gateway"])
                .args(["--message-format", "json"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            // The built executable, from cargo's own report of it.
            let text = String::from_utf8_lossy(&out.stdout);
            let line = text
                .lines()
                .find(|l| l.contains("\"executable\"") && l.contains("\"gateway\""))
                .unwrap_or_else(|| panic!("cargo did not report the example: {text}"));
            let at = line.find("\"executable\":\"").unwrap() + "\"executable\":\"".len();
            PathBuf::from(&line[at..at + line[at..].find('"').unwrap()])
        })
        .clone()
}

#[test]
fn help_lists_the_flags() {
    let out = Command::new(gateway()).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in ["--endpoints", "--listen", "RATION_ENDPOINTS"] {
        assert!(text.contains(flag), "--help does not mention {flag}:\n{text}");
    }
}

#[test]
fn an_unreachable_ledger_is_logged() {
    // Two endpoints nobody listens on.
    let dead: Vec<String> = (0..2)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string()
        })
        .collect();
    let mut child = Command::new(gateway())
        .args(["--endpoints", &dead.join(","), "--listen", "127.0.0.1:0"])
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(4));
    assert!(child.try_wait().unwrap().is_none(), "the gateway exited instead of retrying");
    child.kill().unwrap();
    child.wait().unwrap();
    let text = reader.join().unwrap();
    assert!(
        text.contains("cannot reach the ledger at")
            && text.contains(&dead[0])
            && text.contains(&dead[1]),
        "nothing said within {:?}:\n{text}",
        started.elapsed()
    );
}

/// One POST to the gateway's /v1/complete; the HTTP status line and body.
fn complete(addr: &str) -> std::io::Result<String> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "POST /v1/complete?prompt_tokens=10&max_tokens=20 HTTP/1.1\r\nHost: x\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// The gateway with `--cacert --cert --key` against a node serving mutual TLS:
/// without roles it says what it lacks and exits; once an admin has granted its
/// principal operator and gateway on `demo`, it creates its budgets and admits
/// calls; when the node then stops, it says once that the cluster does not answer.
#[test]
fn the_gateway_runs_over_mutual_tls_with_the_roles_it_needs() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let set = ration_tls::dev::write_set(
        &dir.path().join("certs"),
        &[1],
        &["127.0.0.1".into()],
        &["admin".into(), "gw-demo".into()],
    )
    .unwrap();
    let (node, addr) = rt
        .block_on(ration_testkit::inproc::tls_node(dir.path().join("n1"), set.nodes[0].1.clone()));
    let gw = &set.principals.iter().find(|(p, _)| p == "gw-demo").unwrap().1;
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let start = || {
        Command::new(gateway())
            .args(["--endpoints", &addr.to_string(), "--listen", &free.to_string()])
            .args(["--cacert", &path(&gw.ca), "--cert", &path(&gw.cert), "--key", &path(&gw.key)])
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };

    // No roles: refused, said, and the gateway exits (non-zero) instead of retrying.
    let mut child = start();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the gateway kept running without its roles");
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut said = String::new();
    child.stderr.take().unwrap().read_to_string(&mut said).unwrap();
    assert!(!status.success(), "{said}");
    assert!(
        said.contains("PermissionDenied") && said.contains("rationctl role grant gw-demo"),
        "{said}"
    );

    // An admin grants them; the gateway then admits calls.
    let admin = &set.principals.iter().find(|(p, _)| p == "admin").unwrap().1;
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_with_connector_lazy(ration_tls::Connector::new(
                ration_tls::ClientTls::from_files(admin).unwrap(),
            ));
        let mut ledger = ration_proto::v1::ledger_client::LedgerClient::new(channel);
        for (i, role) in ["operator", "gateway"].into_iter().enumerate() {
            ledger
                .grant_role(ration_proto::v1::RoleRequest {
                    meta: Some(ration_proto::v1::RequestMeta {
                        client_id: "test-admin".into(),
                        request_id: i as u64 + 1,
                        principal: "admin".into(),
                        ..Default::default()
                    }),
                    subject: "gw-demo".into(),
                    role: role.into(),
                    scope: "demo".into(),
                })
                .await
                .unwrap();
        }
    });
    let mut child = start();
    let deadline = Instant::now() + Duration::from_secs(60);
    let answer = loop {
        // The first call may be refused until the first lease arrives.
        match complete(&free.to_string()) {
            Ok(a) if a.starts_with("HTTP/1.1 200") => break a,
            other => {
                assert!(child.try_wait().unwrap().is_none(), "the gateway exited: {other:?}");
                assert!(Instant::now() < deadline, "no call admitted within 60 s: {other:?}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    assert!(answer.contains("\"admitted\":1"), "{answer}");

    // The cluster goes silent mid-run: the gateway says so, once.
    let said = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut stderr = child.stderr.take().unwrap();
    let sink = said.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    rt.block_on(node.stop()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let silent = "the cluster did not answer a refill round";
    while !said.lock().unwrap().contains(silent) {
        assert!(Instant::now() < deadline, "nothing said: {}", said.lock().unwrap());
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(said.lock().unwrap().matches(silent).count(), 1, "{}", said.lock().unwrap());
    child.kill().unwrap();
    child.wait().unwrap();
}
