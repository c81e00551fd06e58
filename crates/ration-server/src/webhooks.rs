//! Webhooks: the leader POSTs every audit record of the configured kinds
//! (`threshold_crossed` and `run_halted` by default: [`KINDS`]) to the configured
//! URL.
//!
//! Delivery is at least once, with a stable idempotency key: the record's hash,
//! which every replica computes the same, so a receiver that keeps the keys it has
//! seen acts on each crossing exactly once. The cursor (every notice before audit
//! sequence number N is delivered) is replicated: after delivering, the leader
//! proposes `Command::AckNotices`, and a new leader resumes from the last one
//! applied. What the old leader delivered after its last acknowledgement is
//! delivered again, with the same key.
//!
//! Each POST carries the JSON body, `Idempotency-Key`, and
//! `X-Ration-Signature: sha256=<hex HMAC-SHA256 of the body under the secret>`. A
//! failed POST (no connection, a timeout, a status other than 2xx) is retried with
//! exponential backoff (250 ms doubling to 30 s) while this node is the leader;
//! later notices wait behind it, so they arrive in audit order.

use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Weak;
use std::time::Duration;

use hmac::{Hmac, Mac};
use ration_core::audit::{AuditFilter, AuditKind, AuditRecord, Detail};
use ration_core::Command;
use sha2::Sha256;

use crate::Node;

/// Where and how to deliver notices.
#[derive(Clone)]
pub struct WebhookTarget {
    /// `host:port` to connect to.
    pub authority: String,
    /// The request's `Host` header: the URL's authority as written (no default
    /// port added).
    pub host_header: String,
    /// The host alone (without brackets): the name an https receiver's
    /// certificate must carry.
    pub host: String,
    /// The request path (with its query).
    pub path: String,
    pub secret: Vec<u8>,
    /// For an https:// URL: the CAs the receiver's certificate is checked against.
    pub tls: Option<ration_tls::ClientTls>,
    /// The kinds of record delivered (some of [`KINDS`]).
    pub kinds: Vec<AuditKind>,
}

/// The kinds of record a webhook can deliver: a threshold crossed, a run halted by
/// its runaway guard.
pub const KINDS: [AuditKind; 2] = [AuditKind::ThresholdCrossed, AuditKind::RunHalted];

/// The kinds named in `names` (each one of [`KINDS`], at least one), or why not.
pub fn kinds(names: &[String]) -> Result<Vec<AuditKind>, String> {
    if names.is_empty() {
        return Err("webhook_kinds is empty (to deliver nothing, leave webhook_url unset)".into());
    }
    let mut out = Vec::new();
    for name in names {
        let Some(kind) = KINDS.into_iter().find(|k| k.name() == name) else {
            let known: Vec<&str> = KINDS.iter().map(|k| k.name()).collect();
            return Err(format!("webhook_kinds: {name:?} is not one of {known:?}"));
        };
        if !out.contains(&kind) {
            out.push(kind);
        }
    }
    Ok(out)
}

/// A signing secret is at least 16 bytes.
pub fn check_secret(secret: &[u8]) -> Result<(), String> {
    if secret.len() < 16 {
        return Err(format!(
            "the webhook secret is {} bytes; at least 16 are needed",
            secret.len()
        ));
    }
    Ok(())
}

impl std::fmt::Debug for WebhookTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookTarget")
            .field("authority", &self.authority)
            .field("path", &self.path)
            .field("https", &self.tls.is_some())
            .field("kinds", &self.kinds)
            .finish_non_exhaustive()
    }
}

impl WebhookTarget {
    /// Parses an `http://` or `https://` URL (`host[:port][/path]`; the port is 80
    /// or 443 if not given). An https receiver's certificate is checked against the
    /// CA certificates in `ca` (PEM) if given, else against the public web's roots.
    pub fn parse(url: &str, secret: Vec<u8>, ca: Option<&Path>) -> Result<Self, String> {
        let (rest, https) = if let Some(rest) = url.strip_prefix("https://") {
            (rest, true)
        } else if let Some(rest) = url.strip_prefix("http://") {
            (rest, false)
        } else {
            return Err(format!("webhook_url {url:?} must start with http:// or https://"));
        };
        if ca.is_some() && !https {
            return Err(format!(
                "webhook_ca_file is set but webhook_url {url:?} is not https://: the CA is \
                 what an https receiver's certificate is checked against"
            ));
        }
        let (authority, path) = match rest.find(['/', '?', '#']) {
            Some(i) if rest[i..].starts_with('/') => (&rest[..i], &rest[i..]),
            Some(_) => return Err(format!("webhook_url {url:?}: the path must start with /")),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            return Err(format!("webhook_url {url:?}: user names and passwords are not supported"));
        }
        // host, [v6 host], host:port or [v6 host]:port.
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => match v6.split_once(']') {
                Some((host, "")) => (host, None),
                Some((host, p)) => (host, Some(p.strip_prefix(':').unwrap_or(p))),
                None => return Err(format!("webhook_url {url:?}: no ] after the IPv6 address")),
            },
            None => match authority.rsplit_once(':') {
                Some((host, p)) => (host, Some(p)),
                None => (authority, None),
            },
        };
        if host.is_empty() {
            return Err(format!("webhook_url {url:?} names no host"));
        }
        // A DNS name or an IP address (an https receiver's certificate names it).
        ration_tls::check_server_name(host).map_err(|e| format!("webhook_url {url:?}: {e}"))?;
        let host_header = authority.to_owned();
        let port: u16 = match port {
            None => {
                if https {
                    443
                } else {
                    80
                }
            }
            Some(p) => p
                .parse()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("webhook_url {url:?}: {p:?} is not a port (1-65535)"))?,
        };
        let authority =
            if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
        let tls = if https {
            Some(ration_tls::https_client(ca).map_err(|e| format!("webhook_ca_file: {e}"))?)
        } else {
            None
        };
        check_secret(&secret)?;
        Ok(Self {
            authority,
            host_header,
            host: host.to_owned(),
            path: path.to_owned(),
            secret,
            tls,
            kinds: KINDS.to_vec(),
        })
    }
}

/// Most notices read per pass.
const PAGE: usize = 1000;
/// How often the leader looks for new notices.
const POLL: Duration = Duration::from_millis(200);
/// Deadline of one POST.
const POST_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The body of one notice, as JSON: what happened, and where (None for a record of
/// another kind).
pub fn body(r: &AuditRecord) -> Option<String> {
    let e = &r.entry;
    let b = e.balances.first()?;
    let key = ration_core::audit::hex(&r.hash);
    let head = format!(
        "{{\"id\":\"{key}\",\"kind\":\"{}\",\"seq\":{},\"time_ms\":{},\"budget\":{},\"unit\":{},",
        e.kind.name(),
        e.seq,
        e.effective_ms,
        json_str(b.budget.as_str()),
        json_str(b.unit.as_str()),
    );
    let principal = json_str(e.principal.as_str());
    match (e.kind, &e.detail) {
        (AuditKind::ThresholdCrossed, Some(Detail::Threshold { percent })) => Some(format!(
            "{head}\"window\":{},\"window_start_ms\":{},\"percent\":{percent},\"cap\":{},\
             \"consumed\":{},\"principal\":{principal}}}",
            json_str(&b.window.to_string()),
            b.window_start_ms,
            b.cap,
            b.consumed,
        )),
        // The guard's figures (see AuditKind::RunHalted): its maximum per span,
        // the span's start, what was spent and granted in it.
        (AuditKind::RunHalted, _) => Some(format!(
            "{head}\"guard_max\":{},\"span_start_ms\":{},\"spent\":{},\"granted\":{},\
             \"principal\":{principal}}}",
            b.cap, b.window_start_ms, b.consumed, b.outstanding,
        )),
        _ => None,
    }
}

fn json_str(s: &str) -> String {
    // Budget paths, units and principals are printable ASCII without quotes or
    // backslashes (ration_core::names), but escape anyway.
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `sha256=<hex>` of HMAC-SHA256(secret, body).
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    let digest: [u8; 32] = mac.finalize().into_bytes().into();
    format!("sha256={}", ration_core::audit::hex(&digest))
}

/// One POST; Ok on a 2xx answer.
async fn post(target: &WebhookTarget, key: &str, body: String) -> Result<(), String> {
    use http_body_util::Full;
    let sig = signature(&target.secret, body.as_bytes());
    let req = http::Request::post(&target.path)
        .header(http::header::HOST, &target.host_header)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header("idempotency-key", key)
        .header("x-ration-signature", sig)
        .body(Full::new(bytes::Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(&target.authority)
            .await
            .map_err(|e| format!("connect {}: {e}", target.authority))?;
        let _ = tcp.set_nodelay(true);
        let status = match &target.tls {
            None => exchange(tcp, req).await?,
            Some(tls) => {
                let stream = tls
                    .connect(&target.host, tcp)
                    .await
                    .map_err(|e| format!("TLS with {}: {e}", target.authority))?;
                exchange(stream, req).await?
            }
        };
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("answered {status}"))
        }
    };
    tokio::time::timeout(POST_TIMEOUT, attempt)
        .await
        .map_err(|_| format!("no answer in {POST_TIMEOUT:?}"))?
}

/// One HTTP/1.1 request on a fresh connection; its answer's status.
async fn exchange<IO>(
    io: IO,
    req: http::Request<http_body_util::Full<bytes::Bytes>>,
) -> Result<http::StatusCode, String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use http_body_util::BodyExt;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender.send_request(req).await.map_err(|e| format!("send: {e}"))?;
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    Ok(status)
}

/// Delivers notices while this node leads; runs until the node stops.
pub(crate) async fn run(node: Weak<Node>, target: WebhookTarget) {
    let filter = AuditFilter { kinds: target.kinds.clone(), ..AuditFilter::default() };
    // Where this leader has delivered up to (None: not leading).
    let mut cursor: Option<u64> = None;
    let mut acked_proposed = 0u64;
    // Delivered since the last acknowledgement this leader proposed: owed one.
    let mut owed = false;
    let mut every = tokio::time::interval(POLL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(n) = node.upgrade() else { return };
        if n.raft.metrics().borrow().state == openraft::ServerState::Shutdown {
            return;
        }
        if !n.is_leader() {
            // A later term starts from the replicated cursor.
            (cursor, acked_proposed, owed) = (None, 0, false);
            continue;
        }
        let (acked, head) = {
            let state = n.reader.state();
            (state.ledger.notices_acked(), state.ledger.chain_head().next_seq)
        };
        // A new leader starts where the replicated cursor is.
        let from = cursor.map_or(acked, |c| c.max(acked));
        n.metrics.webhook_backlog.store(head.saturating_sub(from), Relaxed);
        if from >= head {
            cursor = Some(from);
            continue;
        }
        let audit = n.reader.audit.clone();
        let f = filter.clone();
        let page = n
            .heavy("reading notices", move || -> Result<(Vec<AuditRecord>, u64), String> {
                let mut found = Vec::new();
                let mut next = from;
                let mut scanned = 0usize;
                while next < head && found.len() < PAGE && scanned < 100 * PAGE {
                    next = audit.skip_to(next, &f).min(head);
                    let chunk = audit.read(next, PAGE).map_err(|e| e.to_string())?;
                    if chunk.is_empty() {
                        break;
                    }
                    for r in chunk {
                        if r.entry.seq >= head {
                            break;
                        }
                        scanned += 1;
                        next = r.entry.seq + 1;
                        if f.matches(&r) {
                            found.push(r);
                        }
                    }
                }
                Ok((found, next))
            })
            .await;
        let (records, next) = match page {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                tracing::warn!("webhooks: reading audit records from {from}: {e}");
                continue;
            }
            // Busy with heavy reads: next poll.
            Err(_) => continue,
        };
        drop(n);
        let mut delivered_to = from;
        let mut lost_lead = false;
        for r in records {
            let Some(body) = body(&r) else {
                delivered_to = r.entry.seq + 1;
                continue;
            };
            let key = ration_core::audit::hex(&r.hash);
            let mut backoff = BACKOFF_MIN;
            loop {
                let Some(n) = node.upgrade() else { return };
                if !n.is_leader() {
                    lost_lead = true;
                    break;
                }
                match post(&target, &key, body.clone()).await {
                    Ok(()) => {
                        n.metrics.webhook_delivered.fetch_add(1, Relaxed);
                        break;
                    }
                    Err(e) => {
                        n.metrics.webhook_failed.fetch_add(1, Relaxed);
                        tracing::warn!(
                            "webhook for audit record {} failed ({e}); retrying in {backoff:?}",
                            r.entry.seq
                        );
                    }
                }
                drop(n);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            if lost_lead {
                break;
            }
            delivered_to = r.entry.seq + 1;
            owed = true;
        }
        if lost_lead {
            (cursor, acked_proposed, owed) = (None, 0, false);
            continue;
        }
        let done = next.max(delivered_to);
        cursor = Some(done);
        let Some(n) = node.upgrade() else { return };
        // Acknowledge when something was delivered, or when the cursor moved far:
        // one small entry, not one per poll.
        if done > acked_proposed && (owed || done.saturating_sub(acked) >= 10_000) {
            if let Err(e) = n.proposer.propose(vec![Command::AckNotices { upto_seq: done }]).await {
                tracing::debug!("webhooks: acknowledgement not proposed: {e}");
            } else {
                acked_proposed = done;
                owed = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_as_rfc_4231_gives_it() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn urls_and_secrets_are_checked() {
        let s = || b"0123456789abcdef".to_vec();
        let parse = |url: &str| WebhookTarget::parse(url, s(), None);
        let t = parse("http://127.0.0.1:9000/hooks/ration?x=1").unwrap();
        assert_eq!(
            (t.authority.as_str(), t.path.as_str(), t.tls.is_some()),
            ("127.0.0.1:9000", "/hooks/ration?x=1", false)
        );
        assert_eq!(parse("http://h:1").unwrap().path, "/");
        // Default ports, https, IPv6 literals.
        assert_eq!(parse("http://h/").unwrap().authority, "h:80");
        let t = parse("https://hooks.example.com/services/T0/B0").unwrap();
        assert_eq!(
            (t.authority.as_str(), t.host.as_str(), t.path.as_str(), t.tls.is_some()),
            ("hooks.example.com:443", "hooks.example.com", "/services/T0/B0", true)
        );
        assert_eq!(t.host_header, "hooks.example.com");
        let t = parse("https://[::1]:8443/x").unwrap();
        assert_eq!((t.authority.as_str(), t.host.as_str()), ("[::1]:8443", "::1"));
        assert_eq!(parse("https://[::1]").unwrap().authority, "[::1]:443");
        // What is wrong is said.
        let err = |url: &str| parse(url).unwrap_err();
        assert!(err("ftp://h/").contains("http:// or https://"), "{}", err("ftp://h/"));
        assert!(err("http://h:0/").contains("not a port"));
        assert!(err("http://h:x/").contains("not a port"));
        assert!(err("http:///x").contains("no host"));
        assert!(err("https://u:p@h/").contains("passwords"));
        assert!(err("http://h?x").contains("must start with /"));
        assert!(err("https://[::1/").contains("]"));
        for bad in ["https://bad_name!/", "http://bad host/", "http://h:1:2/"] {
            assert!(err(bad).contains("not a DNS name"), "{bad}: {}", err(bad));
        }
        assert!(WebhookTarget::parse("http://h:1/", b"short".to_vec(), None)
            .unwrap_err()
            .contains("16"));
        // A CA is for https only, and must be readable.
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, ration_tls::dev::Ca::new("hooks").unwrap().cert_pem()).unwrap();
        assert!(WebhookTarget::parse("https://h/", s(), Some(&ca)).unwrap().tls.is_some());
        let e = WebhookTarget::parse("http://h/", s(), Some(&ca)).unwrap_err();
        assert!(e.contains("not https://"), "{e}");
        let e = WebhookTarget::parse("https://h/", s(), Some(&dir.path().join("none.pem")))
            .unwrap_err();
        assert!(e.contains("webhook_ca_file") && e.contains("none.pem"), "{e}");
    }

    /// POSTs received by [`https_receiver`]: (headers, body).
    type Posts = tokio::sync::mpsc::UnboundedReceiver<(http::HeaderMap, String)>;

    /// An HTTPS receiver on loopback presenting a certificate from `ca` for
    /// `hosts`; answers 200 to every request.
    async fn https_receiver(ca: &ration_tls::dev::Ca, hosts: &[&str]) -> (String, Posts) {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let hosts: Vec<String> = hosts.iter().map(|h| (*h).to_owned()).collect();
        let issued = ca.issue(&ration_tls::dev::Leaf::node(1, &hosts)).unwrap();
        let chain = CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    // A client that does not trust the certificate hangs up here.
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let serve = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let tx = tx.clone();
                            async move {
                                use http_body_util::BodyExt;
                                let (parts, body) = req.into_parts();
                                let body = body.collect().await?.to_bytes();
                                let body = String::from_utf8_lossy(&body).into_owned();
                                let _ = tx.send((parts.headers, body));
                                Ok::<_, hyper::Error>(http::Response::new(http_body_util::Empty::<
                                    bytes::Bytes,
                                >::new(
                                )))
                            }
                        },
                    );
                    let io = hyper_util::rt::TokioIo::new(tls);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, serve)
                        .await;
                });
            }
        });
        (format!("https://{addr}/hook"), rx)
    }

    /// A POST over https reaches a receiver whose certificate comes from the
    /// configured CA, signed; a receiver the CA did not certify, or certified for
    /// another name, gets nothing, and the error says it was the certificate.
    #[tokio::test]
    async fn an_https_receiver_gets_the_post_only_with_a_certificate_the_ca_vouches_for() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ration_tls::dev::Ca::new("hooks CA").unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.cert_pem()).unwrap();
        let secret = b"0123456789abcdef0123".to_vec();
        let body = r#"{"id":"k1"}"#.to_owned();

        let (url, mut posts) = https_receiver(&ca, &["127.0.0.1"]).await;
        let target = WebhookTarget::parse(&url, secret.clone(), Some(&ca_file)).unwrap();
        post(&target, "k1", body.clone()).await.unwrap();
        let (headers, got) = posts.recv().await.unwrap();
        assert_eq!(got, body);
        assert_eq!(headers["idempotency-key"], "k1");
        assert_eq!(headers["x-ration-signature"], signature(&secret, body.as_bytes()).as_str());
        assert_eq!(headers["host"], url.trim_start_matches("https://").trim_end_matches("/hook"));

        // Certified by another CA: refused at the handshake, nothing received.
        let other = ration_tls::dev::Ca::new("someone else").unwrap();
        let (url, mut posts) = https_receiver(&other, &["127.0.0.1"]).await;
        let target = WebhookTarget::parse(&url, secret.clone(), Some(&ca_file)).unwrap();
        let e = post(&target, "k2", body.clone()).await.unwrap_err();
        assert!(e.contains("TLS") && e.contains("certificate"), "{e}");
        // Certified by the CA, but for another name than the one dialled.
        let (url, _) = https_receiver(&ca, &["hooks.example.com"]).await;
        let target = WebhookTarget::parse(&url, secret.clone(), Some(&ca_file)).unwrap();
        let e = post(&target, "k3", body.clone()).await.unwrap_err();
        assert!(e.contains("TLS") && e.contains("certificate"), "{e}");
        // And without a CA file only the public web's roots count: a private
        // CA's receiver is refused too.
        let (url, _) = https_receiver(&ca, &["127.0.0.1"]).await;
        let target = WebhookTarget::parse(&url, secret, None).unwrap();
        let e = post(&target, "k4", body).await.unwrap_err();
        assert!(e.contains("certificate"), "{e}");
        assert!(posts.try_recv().is_err(), "nothing reached the receiver it did not trust");
    }

    #[test]
    fn the_kinds_delivered_are_named_and_checked() {
        let names = |n: &[&str]| n.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(kinds(&names(&["run_halted"])).unwrap(), [AuditKind::RunHalted]);
        assert_eq!(
            kinds(&names(&["threshold_crossed", "run_halted", "threshold_crossed"])).unwrap(),
            KINDS
        );
        let e = kinds(&names(&["lease_granted"])).unwrap_err();
        assert!(e.contains("\"lease_granted\" is not one of") && e.contains("run_halted"), "{e}");
        assert!(kinds(&[]).unwrap_err().contains("empty"));
        // The default is every kind.
        let default = crate::config::Config::default().webhook_kinds;
        assert_eq!(kinds(&default).unwrap(), KINDS);
    }

    /// The next POST's body, after checking its key and signature (the secret is
    /// the one the tests write).
    async fn next_post(posts: &mut Posts) -> String {
        let (headers, body) = tokio::time::timeout(Duration::from_secs(10), posts.recv())
            .await
            .expect("a POST within 10 s")
            .unwrap();
        let key = headers["idempotency-key"].to_str().unwrap();
        assert!(body.contains(&format!("\"id\":\"{key}\"")), "{body}");
        assert_eq!(
            headers["x-ration-signature"],
            signature(b"0123456789abcdef0123", body.as_bytes()).as_str()
        );
        body
    }

    /// A node with an https `webhook_url` and `webhook_ca_file` POSTs a crossed
    /// threshold, then a run halted by its runaway guard, to a receiver certified
    /// by that CA, signed, each keyed by its record's hash.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_posts_a_crossed_threshold_and_a_halted_run_to_an_https_receiver() {
        use ration_proto::v1;
        let dir = tempfile::tempdir().unwrap();
        let ca = ration_tls::dev::Ca::new("hooks CA").unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.cert_pem()).unwrap();
        let secret_file = dir.path().join("secret");
        std::fs::write(&secret_file, "0123456789abcdef0123\n").unwrap();
        let (url, mut posts) = https_receiver(&ca, &["127.0.0.1"]).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = crate::config::Config {
            node_id: 1,
            listen: addr,
            data_dir: dir.path().join("node"),
            initial_cluster: vec![format!("1={addr}")],
            metrics_listen: "127.0.0.1:0".into(),
            webhook_url: Some(url),
            webhook_secret_file: Some(secret_file),
            webhook_ca_file: Some(ca_file),
            ..crate::config::Config::default()
        };
        let node = crate::start(config, listener).await.unwrap();
        let mut ledger =
            v1::ledger_client::LedgerClient::connect(format!("http://{addr}")).await.unwrap();
        let meta = |id: u64| {
            Some(v1::RequestMeta {
                client_id: "hooks".into(),
                request_id: id,
                principal: "ops".into(),
                ..Default::default()
            })
        };
        let limit = v1::Limit {
            unit: "tokens".into(),
            cap: 100,
            window: Some(v1::Window { period: v1::Period::Lifetime as i32, offset_minutes: 0 }),
            static_allowance: None,
        };
        let create = v1::CreateBudgetRequest {
            meta: meta(1),
            path: "a".into(),
            limits: vec![limit.clone()],
        };
        // The node answers once it has elected itself.
        let started = std::time::Instant::now();
        while let Err(e) = ledger.create_budget(create.clone()).await {
            assert!(started.elapsed() < Duration::from_secs(10), "no leader: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ledger
            .set_budget_options(v1::SetBudgetOptionsRequest {
                meta: meta(2),
                path: "a".into(),
                options: Some(v1::BudgetOptions { thresholds_pct: vec![50], shadow: false }),
            })
            .await
            .unwrap();
        let lease = ledger
            .acquire(v1::AcquireRequest {
                meta: meta(3),
                budget: "a".into(),
                unit: "tokens".into(),
                wanted: 60,
                min: 60,
                ttl_ms: 60_000,
                starts_at_ms: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let report = |id: u64, lease_id: u64, consumed_delta: i64| v1::ReportRequest {
            meta: meta(id),
            lease_id,
            consumed_delta,
            renew_ttl_ms: None,
        };
        ledger.report(report(4, lease.lease_id, 60)).await.unwrap();
        let body = next_post(&mut posts).await;
        assert!(body.contains("\"kind\":\"threshold_crossed\""), "{body}");
        assert!(body.contains("\"percent\":50") && body.contains("\"budget\":\"a\""), "{body}");

        // A run whose guard allows 2 calls a minute spends them: halted.
        ledger
            .create_budget(v1::CreateBudgetRequest {
                meta: meta(5),
                path: "runs".into(),
                limits: vec![limit.clone()],
            })
            .await
            .unwrap();
        ledger
            .set_template(v1::SetTemplateRequest {
                meta: meta(6),
                parent: "runs".into(),
                limits: vec![v1::Limit { unit: "calls".into(), ..limit.clone() }],
                max_instances: 10,
                idle_ms: 0,
                max_duration_ms: 0,
                guards: vec![v1::Guard { unit: "calls".into(), max: 2, per_ms: 60_000 }],
            })
            .await
            .unwrap();
        let calls = |id: u64, wanted: i64| v1::AcquireRequest {
            meta: meta(id),
            budget: "runs/r1".into(),
            unit: "calls".into(),
            wanted,
            min: wanted,
            ttl_ms: 60_000,
            starts_at_ms: 0,
        };
        let lease = ledger.acquire(calls(7, 2)).await.unwrap().into_inner();
        // More is refused in this span; spending all of it halts the run.
        let e = ledger.acquire(calls(8, 1)).await.unwrap_err();
        assert!(e.message().contains("spending all of it halts the run"), "{e:?}");
        ledger.report(report(9, lease.lease_id, 2)).await.unwrap();
        let body = next_post(&mut posts).await;
        assert!(body.contains("\"kind\":\"run_halted\""), "{body}");
        assert!(
            body.contains("\"budget\":\"runs/r1\"")
                && body.contains("\"unit\":\"calls\"")
                && body.contains("\"guard_max\":2")
                && body.contains("\"spent\":2")
                && body.contains("\"granted\":2"),
            "{body}"
        );
        node.stop().await.unwrap();
    }
}
