//! rationctl against a node serving mutual TLS: `certs dev` makes the files the
//! node and rationctl use, `--cacert/--cert/--key` authenticate by certificate,
//! `token issue` makes a bearer token that `--cacert --token` authenticates with,
//! and what either creates is audited under the authenticated principal.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use ration_testkit::inproc::{config, listener};
use serde_json::Value;

async fn ctl(args: &[&str]) -> Result<String, String> {
    let mut argv = vec!["rationctl", "--timeout-ms", "5000"];
    argv.extend_from_slice(args);
    let mut out = Vec::new();
    match rationctl::run(argv, &mut out).await {
        Ok(()) => Ok(String::from_utf8(out).unwrap()),
        Err(e) => Err(format!("{e:#}")),
    }
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rationctl_authenticates_by_certificate_or_by_token() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    ctl(&[
        "certs",
        "dev",
        "--out",
        &path(&certs),
        "--nodes",
        "1",
        "--hosts",
        "127.0.0.1",
        "--principals",
        "admin,gw",
    ])
    .await
    .unwrap();
    let key_file = dir.path().join("token.key");
    std::fs::write(&key_file, "a-token-key-of-enough-bytes-0123456789abcdef\n").unwrap();

    let (l, pl) = (listener().await, listener().await);
    let addr = l.local_addr().unwrap();
    let mut cfg = config(1, addr, dir.path().join("n1"), &[(1, pl.local_addr().unwrap())]);
    cfg.peer_listen = Some(pl.local_addr().unwrap());
    cfg.tls = Some(ration_tls::TlsFiles {
        ca: certs.join("ca.pem"),
        cert: certs.join("node-{node_id}.pem"),
        key: certs.join("node-{node_id}-key.pem"),
    });
    cfg.token_key_file = Some(key_file.clone());
    let node = ration_server::start_split(cfg, l, Some(pl)).await.unwrap();
    let endpoint = addr.to_string();
    let ca = path(&certs.join("ca.pem"));
    let (admin_cert, admin_key) =
        (path(&certs.join("admin.pem")), path(&certs.join("admin-key.pem")));

    // By certificate: the principal defaults to the one the certificate names.
    let as_admin = |args: &[&str]| {
        let mut v = vec!["--endpoints", &endpoint, "--cacert", &ca, "--cert", &admin_cert];
        v.extend_from_slice(&["--key", &admin_key]);
        v.extend_from_slice(args);
        v.iter().map(|s| (*s).to_owned()).collect::<Vec<String>>()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let args = as_admin(&["budget", "set", "acme", "--limit", "tokens=1000/day"]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        match ctl(&args).await {
            Ok(_) => break,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("waiting for the node: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }

    // A token for gw, issued offline with the cluster's key file.
    let issued = ctl(&[
        "-o",
        "json",
        "token",
        "issue",
        "--key-file",
        &path(&key_file),
        "--principal",
        "gw",
        "--ttl",
        "1h",
    ])
    .await
    .unwrap();
    let issued: Value = serde_json::from_str(&issued).unwrap();
    let token = issued["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("ration1."), "{issued}");
    let as_gw = |args: &[&str]| {
        let mut v = vec!["--endpoints", &endpoint, "--cacert", &ca, "--token", &token];
        v.extend_from_slice(args);
        v.iter().map(|s| (*s).to_owned()).collect::<Vec<String>>()
    };
    let run = |args: Vec<String>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ctl(&args).await
    };
    // gw holds no role yet: refused, and told what it needs.
    let err =
        run(as_gw(&["budget", "set", "acme/gw", "--limit", "tokens=10/day"])).await.unwrap_err();
    assert!(err.contains("PERMISSION_DENIED") && err.contains("on acme/gw or above it"), "{err}");
    // admin (a bootstrap admin) makes gw an operator of acme/gw.
    let granted =
        run(as_admin(&["role", "grant", "gw", "operator", "--scope", "acme/gw"])).await.unwrap();
    assert!(granted.starts_with("changed") && granted.contains("acme/gw"), "{granted}");
    let again =
        run(as_admin(&["role", "grant", "gw", "operator", "--scope", "acme/gw"])).await.unwrap();
    assert!(again.starts_with("unchanged"), "{again}");
    run(as_gw(&["budget", "set", "acme/gw", "--limit", "tokens=10/day"])).await.unwrap();
    // Only there; gw sees its own roles but not everyone's.
    let err =
        run(as_gw(&["budget", "set", "acme/other", "--limit", "tokens=10/day"])).await.unwrap_err();
    assert!(err.contains("PERMISSION_DENIED"), "{err}");
    let mine: Value =
        serde_json::from_str(&run(as_gw(&["-o", "json", "role", "list", "gw"])).await.unwrap())
            .unwrap();
    assert_eq!(
        mine,
        serde_json::json!([{"principal": "gw", "role": "operator", "scope": "acme/gw"}])
    );
    let err = run(as_gw(&["role", "list"])).await.unwrap_err();
    assert!(err.contains("needs role admin"), "{err}");
    let err = run(as_gw(&["role", "grant", "gw", "admin", "--scope", "*"])).await.unwrap_err();
    assert!(err.contains("needs role admin"), "{err}");
    // admin revokes it: gw can no longer change the budget; both changes audited.
    run(as_admin(&["role", "revoke", "gw", "operator", "--scope", "acme/gw"])).await.unwrap();
    let err =
        run(as_gw(&["budget", "set", "acme/gw", "--limit", "tokens=20/day"])).await.unwrap_err();
    assert!(err.contains("PERMISSION_DENIED") && err.contains("no roles"), "{err}");
    let all = run(as_admin(&["role", "list"])).await.unwrap();
    assert!(!all.contains("gw"), "{all}");
    let audited =
        run(as_admin(&["-o", "json", "audit", "query", "--kind", "role_granted,role_revoked"]))
            .await
            .unwrap();
    let audited: Value = serde_json::from_str(&audited).unwrap();
    let changes: Vec<(String, String, String, String)> = audited["records"]
        .as_array()
        .or_else(|| audited.as_array())
        .unwrap_or_else(|| panic!("{audited}"))
        .iter()
        .map(|r| {
            let field = |f: &str| r[f].as_str().unwrap_or_default().to_owned();
            (field("kind"), field("principal"), field("unit"), field("budget"))
        })
        .collect();
    let change = |kind: &str| (kind.into(), "gw".into(), "operator".into(), "acme/gw".into());
    assert_eq!(changes, vec![change("role_revoked"), change("role_granted")], "newest first");

    // Each change is audited under its authenticated principal.
    let args = as_admin(&["-o", "json", "audit", "query", "--kind", "budget_created"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ctl(&args).await.unwrap();
    let records: Value = serde_json::from_str(&out).unwrap();
    let who: Vec<(String, String)> = records["records"]
        .as_array()
        .or_else(|| records.as_array())
        .unwrap_or_else(|| panic!("{out}"))
        .iter()
        .map(|r| {
            (r["budget"].as_str().unwrap().to_owned(), r["principal"].as_str().unwrap().to_owned())
        })
        .collect();
    assert!(who.contains(&("acme".into(), "admin".into())), "{who:?}");
    assert!(who.contains(&("acme/gw".into(), "gw".into())), "{who:?}");

    // Refused: a token with a certificate, a token without TLS, a token the
    // node's key did not make.
    let err =
        ctl(&["--endpoints", &endpoint, "--token", &token, "budget", "list"]).await.unwrap_err();
    assert!(err.contains("--cacert"), "{err}");
    let other = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(other.path(), "another-token-key-of-enough-bytes-0123456789").unwrap();
    let forged =
        ctl(&["token", "issue", "--key-file", &path(other.path()), "--principal", "admin"])
            .await
            .unwrap();
    let err = ctl(&[
        "--endpoints",
        &endpoint,
        "--cacert",
        &ca,
        "--token",
        forged.trim(),
        "budget",
        "set",
        "evil",
        "--limit",
        "tokens=1/day",
    ])
    .await
    .unwrap_err();
    assert!(err.contains("UNAUTHENTICATED") && err.contains("does not verify"), "{err}");
    node.stop().await.unwrap();
}
