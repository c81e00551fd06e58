//! Webhooks: the leader POSTs every `threshold_crossed` audit record to the
//! configured URL.
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

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Weak;
use std::time::Duration;

use hmac::{Hmac, Mac};
use ration_core::audit::{AuditFilter, AuditKind, AuditRecord, Detail};
use ration_core::Command;
use sha2::Sha256;

use crate::Node;

/// Where and how to deliver notices.
#[derive(Clone, Debug)]
pub struct WebhookTarget {
    /// `host:port` to connect to.
    pub authority: String,
    /// The request path (with its query).
    pub path: String,
    pub secret: Vec<u8>,
}

impl WebhookTarget {
    /// Parses an `http://host:port/path` URL. HTTPS is not supported yet: the
    /// message says so.
    pub fn parse(url: &str, secret: Vec<u8>) -> Result<Self, String> {
        let Some(rest) = url.strip_prefix("http://") else {
            return Err(format!(
                "webhook_url {url:?} must start with http:// (https is not supported yet: \
                 put a TLS-terminating proxy on loopback in front of the receiver)"
            ));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() || !authority.contains(':') {
            return Err(format!("webhook_url {url:?} needs a host:port"));
        }
        if secret.len() < 16 {
            return Err(format!(
                "the webhook secret is {} bytes; at least 16 are needed",
                secret.len()
            ));
        }
        Ok(Self { authority: authority.to_owned(), path: path.to_owned(), secret })
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

/// The body of one notice: what crossed, and where.
pub fn body(r: &AuditRecord) -> Option<String> {
    let e = &r.entry;
    let Some(Detail::Threshold { percent }) = &e.detail else { return None };
    let b = e.balances.first()?;
    let key = ration_core::audit::hex(&r.hash);
    Some(format!(
        "{{\"id\":\"{key}\",\"kind\":\"threshold_crossed\",\"seq\":{},\"time_ms\":{},\
         \"budget\":{},\"unit\":{},\"window\":{},\"window_start_ms\":{},\"percent\":{percent},\
         \"cap\":{},\"consumed\":{},\"principal\":{}}}",
        e.seq,
        e.effective_ms,
        json_str(b.budget.as_str()),
        json_str(b.unit.as_str()),
        json_str(&b.window.to_string()),
        b.window_start_ms,
        b.cap,
        b.consumed,
        json_str(e.principal.as_str()),
    ))
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
    use http_body_util::{BodyExt, Full};
    let sig = signature(&target.secret, body.as_bytes());
    let attempt = async {
        let stream = tokio::net::TcpStream::connect(&target.authority)
            .await
            .map_err(|e| format!("connect {}: {e}", target.authority))?;
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = http::Request::post(&target.path)
            .header(http::header::HOST, &target.authority)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header("idempotency-key", key)
            .header("x-ration-signature", sig)
            .body(Full::new(bytes::Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| format!("send: {e}"))?;
        let status = resp.status();
        let _ = resp.into_body().collect().await;
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

/// Delivers notices while this node leads; runs until the node stops.
pub(crate) async fn run(node: Weak<Node>, target: WebhookTarget) {
    let filter = AuditFilter { kinds: vec![AuditKind::ThresholdCrossed], ..AuditFilter::default() };
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
        let t = WebhookTarget::parse("http://127.0.0.1:9000/hooks/ration?x=1", s()).unwrap();
        assert_eq!(
            (t.authority.as_str(), t.path.as_str()),
            ("127.0.0.1:9000", "/hooks/ration?x=1")
        );
        assert_eq!(WebhookTarget::parse("http://h:1", s()).unwrap().path, "/");
        assert!(WebhookTarget::parse("https://h:1/", s()).unwrap_err().contains("https"));
        assert!(WebhookTarget::parse("http://h/", s()).unwrap_err().contains("host:port"));
        assert!(WebhookTarget::parse("http://h:1/", b"short".to_vec()).unwrap_err().contains("16"));
    }
}
