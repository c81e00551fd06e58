use std::time::Duration;

use tempfile::TempDir;
use tokio_stream::StreamExt;
use tower::Service;

use super::dev::{Ca, Leaf};
use super::*;

fn pem_cert(pem: &str) -> CertificateDer<'static> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

#[test]
fn certificates_name_nodes_and_principals() {
    let ca = Ca::new("test").unwrap();
    let node = ca.issue(&Leaf::node(7, &["127.0.0.1".into()])).unwrap();
    assert_eq!(identity_of(&pem_cert(&node.cert_pem)), Ok(Identity::Node(7)));
    let gw = ca.issue(&Leaf::principal("gw-eu")).unwrap();
    assert_eq!(identity_of(&pem_cert(&gw.cert_pem)), Ok(Identity::Principal("gw-eu".into())));
    // No Ration URI: the common name is the principal.
    let plain = ca.issue(&Leaf { uri: None, ..Leaf::principal("finance") }).unwrap();
    assert_eq!(identity_of(&pem_cert(&plain.cert_pem)), Ok(Identity::Principal("finance".into())));
    // Another SPIFFE URI is not a Ration identity; the common name decides.
    let other = ca
        .issue(&Leaf { uri: Some("spiffe://corp/ns/prod/sa/gw".into()), ..Leaf::principal("gw") })
        .unwrap();
    assert_eq!(identity_of(&pem_cert(&other.cert_pem)), Ok(Identity::Principal("gw".into())));
    let none = ca.issue(&Leaf { uri: None, ..Leaf::principal("") }).unwrap();
    let err = identity_of(&pem_cert(&none.cert_pem)).unwrap_err();
    assert!(err.contains("names no identity"), "{err}");
    let zero =
        ca.issue(&Leaf { uri: Some("spiffe://x/ration/node/0".into()), ..Leaf::principal("a") });
    let err = identity_of(&pem_cert(&zero.unwrap().cert_pem)).unwrap_err();
    assert!(err.contains("not a node id"), "{err}");
}

#[test]
fn bad_files_are_named_in_the_error() {
    let dir = TempDir::new().unwrap();
    let set = dev::write_set(dir.path(), &[1], &["127.0.0.1".into()], &[]).unwrap();
    let files = set.nodes[0].1.clone();
    let missing = TlsFiles { ca: dir.path().join("nope.pem"), ..files.clone() };
    let err = Credentials::load(missing).unwrap_err().to_string();
    assert!(err.contains("nope.pem"), "{err}");
    let swapped = TlsFiles { cert: files.key.clone(), ..files.clone() };
    let err = Credentials::load(swapped).unwrap_err().to_string();
    assert!(err.contains("node-1-key.pem") && err.contains("no PEM certificate"), "{err}");
    let other = Ca::new("other").unwrap().issue(&Leaf::node(1, &[])).unwrap();
    let wrong_key = dir.path().join("other-key.pem");
    std::fs::write(&wrong_key, other.key_pem).unwrap();
    let err = Credentials::load(TlsFiles { key: wrong_key, ..files }).unwrap_err().to_string();
    assert!(err.contains("other-key.pem"), "{err}");
}

/// Serves TLS with `server` and returns the address and the accepted connections.
async fn serve(
    server: Arc<Credentials>,
) -> (std::net::SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Result<Identity, String>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut accepted = incoming(
        listener,
        server,
        IncomingLimits { handshakes: 4, timeout: Duration::from_secs(2) },
        "test",
    );
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(stream)) = accepted.next().await {
            let _ = tx.send(stream.info().identity.clone());
            // Keep the connection open until the client is done.
            tokio::spawn(async move {
                let mut s = stream;
                let mut buf = [0u8; 1];
                let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
            });
        }
    });
    (addr, rx)
}

async fn dial(tls: ClientTls, addr: &str) -> std::io::Result<()> {
    dial_as(Connector::new(tls), addr).await
}

async fn dial_as(mut c: Connector, addr: &str) -> std::io::Result<()> {
    let mut io = c.call(format!("http://{addr}").parse().unwrap()).await?;
    // TLS 1.3 reports a refused client certificate only on the first read.
    let mut buf = [0u8; 1];
    match tokio::time::timeout(
        Duration::from_millis(300),
        tokio::io::AsyncReadExt::read(io.inner_mut(), &mut buf),
    )
    .await
    {
        Ok(Err(e)) => Err(e),
        _ => Ok(()),
    }
}

#[tokio::test]
async fn mutual_tls_checks_both_sides_and_reloads() {
    let dir = TempDir::new().unwrap();
    let set =
        dev::write_set(dir.path(), &[1], &["127.0.0.1".into(), "localhost".into()], &["gw".into()])
            .unwrap();
    let node = Credentials::load(set.nodes[0].1.clone()).unwrap();
    assert_eq!(node.identity(), Identity::Node(1));
    let (addr, mut seen) = serve(node.clone()).await;
    let gw = ClientTls::from_files(&set.principals[0].1).unwrap();

    // The right CA, the right host: the server sees the client's identity.
    dial(gw.clone(), &addr.to_string()).await.unwrap();
    assert_eq!(seen.recv().await, Some(Ok(Identity::Principal("gw".into()))));
    dial(gw.clone(), &format!("localhost:{}", addr.port())).await.unwrap();
    assert_eq!(seen.recv().await, Some(Ok(Identity::Principal("gw".into()))));

    // A client from another CA completes the handshake (it holds its key) but is
    // refused, with the reason, for every request.
    let refused = |got: Option<Result<Identity, String>>, why: &str| {
        let err = got.expect("a connection").expect_err("refused");
        assert!(err.contains(why), "{err}");
    };
    let other_dir = TempDir::new().unwrap();
    let other = dev::write_set(other_dir.path(), &[], &[], &["gw".into()]).unwrap();
    let foreign =
        ClientTls::from_files(&TlsFiles { ca: set.ca.clone(), ..other.principals[0].1.clone() })
            .unwrap();
    dial(foreign, &addr.to_string()).await.unwrap();
    refused(seen.recv().await, "not signed by the CA this node trusts");
    // A client that trusts another CA refuses the server.
    assert!(dial(ClientTls::from_files(&other.principals[0].1).unwrap(), &addr.to_string())
        .await
        .is_err());
    // No client certificate: refused.
    dial(ClientTls::ca_only(&set.ca).unwrap(), &addr.to_string()).await.unwrap();
    refused(seen.recv().await, "no client certificate");
    // An expired client certificate: refused.
    let ca = Ca::new("expiring").unwrap();
    let ca_dir = TempDir::new().unwrap();
    let ca_path = ca.write(ca_dir.path()).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let expired = ca
        .issue(&Leaf {
            not_before: now - time::Duration::days(10),
            not_after: now - time::Duration::days(1),
            ..Leaf::principal("gw")
        })
        .unwrap()
        .write(ca_dir.path(), "expired", &ca_path)
        .unwrap();
    let fresh_node = ca
        .issue(&Leaf::node(1, &["127.0.0.1".into()]))
        .unwrap()
        .write(ca_dir.path(), "node", &ca_path)
        .unwrap();
    let (addr2, mut seen2) = serve(Credentials::load(fresh_node).unwrap()).await;
    dial(ClientTls::from_files(&expired).unwrap(), &addr2.to_string()).await.unwrap();
    refused(seen2.recv().await, "is expired");
    // The server's certificate must name the host dialled.
    let elsewhere = Connector::new(gw.clone()).with_server_name("ration-9.example");
    let err = dial_as(elsewhere, &addr.to_string()).await.unwrap_err();
    assert!(err.to_string().contains("certificate"), "{err}");

    // Reload: the node's files replaced by ones from the other CA; new
    // connections from the first CA's clients are then refused.
    let before = node.reloads();
    std::fs::copy(&other.ca, &set.ca).unwrap();
    assert!(node.reload().is_ok());
    assert_eq!(node.reloads(), before + 1);
    dial(gw, &addr.to_string()).await.unwrap();
    refused(seen.recv().await, "not signed by the CA this node trusts");
    // A reload that fails keeps the old material.
    std::fs::write(&set.nodes[0].1.key, "not a key").unwrap();
    assert!(node.reload().is_err());
    assert_eq!(node.identity(), Identity::Node(1));
}

#[tokio::test]
async fn changed_files_are_reloaded_by_the_watcher() {
    let dir = TempDir::new().unwrap();
    let set = dev::write_set(dir.path(), &[1], &["127.0.0.1".into()], &[]).unwrap();
    let node = Credentials::load(set.nodes[0].1.clone()).unwrap();
    let _watcher = node.watch(Duration::from_millis(20));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(node.reloads(), 0, "unchanged files are not reloaded");
    // A renewed certificate and key (same CA) written over the old files.
    let renewed = set.authority.issue(&Leaf::node(1, &["127.0.0.1".into()])).unwrap();
    std::fs::write(&set.nodes[0].1.cert, &renewed.cert_pem).unwrap();
    std::fs::write(&set.nodes[0].1.key, &renewed.key_pem).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while node.reloads() == 0 {
        assert!(std::time::Instant::now() < deadline, "no reload within 5 s of the change");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(node.identity(), Identity::Node(1));
}
