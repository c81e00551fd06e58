//! Bearer tokens, for clients that cannot hold a certificate: they still talk TLS
//! (trusting the cluster's CA) and send `authorization: Bearer <token>`.
//!
//! Format: `ration1.<payload>.<mac>`, where `payload` is the base64url (no
//! padding) of `<principal>\n<not after, Unix seconds>` and `mac` the base64url of
//! HMAC-SHA256 under the cluster's token key of `ration1.<payload>`. Why this and
//! not a JWT: one fixed algorithm and no header to choose it (no algorithm
//! confusion), no JSON to parse, and nothing but a shared key to verify, so every
//! node checks a token with no replicated state and no round trip. A token is
//! valid until its expiry; revoking one means rotating the key (every token made
//! with it stops working) or, once roles exist, revoking its principal's roles.

use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::TlsError;

const PREFIX: &str = "ration1.";
/// The shortest key accepted, in bytes.
pub const MIN_KEY_BYTES: usize = 32;
/// The longest token accepted, in bytes.
const MAX_TOKEN_BYTES: usize = 1024;

/// The secret tokens are made and checked with (every node and the issuer hold
/// the same file).
#[derive(Clone)]
pub struct TokenKey(Vec<u8>);

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

impl TokenKey {
    /// The key in `path`: its bytes, surrounding whitespace trimmed, at least
    /// [`MIN_KEY_BYTES`] of them.
    pub fn load(path: &Path) -> Result<Self, TlsError> {
        let bytes = std::fs::read(path)
            .map_err(|source| TlsError::Read { path: path.to_path_buf(), source })?;
        let text = bytes.trim_ascii();
        if text.len() < MIN_KEY_BYTES {
            return Err(TlsError::Bad {
                path: path.to_path_buf(),
                reason: format!(
                    "a token key needs at least {MIN_KEY_BYTES} bytes, this one has {}",
                    text.len()
                ),
            });
        }
        Ok(Self(text.to_vec()))
    }

    pub fn from_bytes(bytes: &[u8]) -> Self {
        Self(bytes.to_vec())
    }

    fn mac(&self) -> Hmac<Sha256> {
        <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes a key of any length")
    }

    /// A token for `principal`, valid until `not_after` (Unix seconds).
    pub fn issue(&self, principal: &str, not_after: u64) -> String {
        let payload = URL_SAFE_NO_PAD.encode(format!("{principal}\n{not_after}"));
        let signed = format!("{PREFIX}{payload}");
        let mut mac = self.mac();
        mac.update(signed.as_bytes());
        let tag = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{signed}.{tag}")
    }

    /// The principal a token names, if it was made with this key and has not
    /// expired at `now` (Unix seconds); or why not, in words.
    pub fn verify(&self, token: &str, now: u64) -> Result<String, String> {
        self.verify_until(token, now).map(|(principal, _)| principal)
    }

    /// As [`TokenKey::verify`], with the token's expiry (Unix seconds): a call that
    /// outlives its token (a stream) checks it again as it goes.
    pub fn verify_until(&self, token: &str, now: u64) -> Result<(String, u64), String> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(format!("the token is longer than {MAX_TOKEN_BYTES} bytes"));
        }
        let rest =
            token.strip_prefix(PREFIX).ok_or("the token is not a Ration token (ration1.…)")?;
        let (payload, tag) = rest.split_once('.').ok_or("the token has no signature")?;
        let tag =
            URL_SAFE_NO_PAD.decode(tag).map_err(|_| "the token's signature is not base64url")?;
        let mut mac = self.mac();
        mac.update(PREFIX.as_bytes());
        mac.update(payload.as_bytes());
        mac.verify_slice(&tag)
            .map_err(|_| "the token's signature does not verify (another key, or altered)")?;
        let payload = URL_SAFE_NO_PAD.decode(payload).map_err(|_| "the token does not decode")?;
        let payload = String::from_utf8(payload).map_err(|_| "the token does not decode")?;
        let (principal, not_after) = payload.split_once('\n').ok_or("the token does not decode")?;
        let not_after: u64 = not_after.parse().map_err(|_| "the token does not decode")?;
        if now > not_after {
            return Err(format!("the token expired {} s ago", now - not_after));
        }
        if principal.is_empty() {
            return Err("the token names no principal".into());
        }
        Ok((principal.to_owned(), not_after))
    }
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A tower service that adds `authorization: Bearer <token>` to every request: wrap
/// a tonic `Channel` in it to call with a token.
#[derive(Clone, Debug)]
pub struct WithToken<S> {
    inner: S,
    header: Option<http::HeaderValue>,
}

impl<S> WithToken<S> {
    /// `token` None: requests pass unchanged.
    pub fn new(inner: S, token: Option<&str>) -> Result<Self, String> {
        let header = token
            .map(|t| {
                let mut v = http::HeaderValue::from_str(&format!("Bearer {t}"))
                    .map_err(|_| "a token is printable ASCII".to_owned())?;
                v.set_sensitive(true);
                Ok::<_, String>(v)
            })
            .transpose()?;
        Ok(Self { inner, header })
    }
}

impl<S, B> tower::Service<http::Request<B>> for WithToken<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        if let Some(h) = &self.header {
            req.headers_mut().insert(http::header::AUTHORIZATION, h.clone());
        }
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_name_their_principal_until_they_expire() {
        let key = TokenKey::from_bytes(&[7; 32]);
        let t = key.issue("gw-eu", 1_000);
        assert!(t.starts_with("ration1."), "{t}");
        assert_eq!(key.verify(&t, 999), Ok("gw-eu".into()));
        assert_eq!(key.verify(&t, 1_000), Ok("gw-eu".into()));
        let err = key.verify(&t, 1_005).unwrap_err();
        assert!(err.contains("expired 5 s ago"), "{err}");
        // Another key, an altered payload, garbage: refused, saying why.
        let other = TokenKey::from_bytes(&[8; 32]);
        assert!(other.verify(&t, 0).unwrap_err().contains("does not verify"));
        let forged_payload = URL_SAFE_NO_PAD.encode("admin\n1000");
        let (_, tag) = t.rsplit_once('.').unwrap();
        let forged = format!("ration1.{forged_payload}.{tag}");
        assert!(key.verify(&forged, 0).unwrap_err().contains("does not verify"));
        assert!(key.verify("eyJhbGciOi.x.y", 0).unwrap_err().contains("not a Ration token"));
        assert!(key.verify("ration1.abc", 0).unwrap_err().contains("no signature"));
    }

    #[test]
    fn a_short_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, "too short\n").unwrap();
        let err = TokenKey::load(&path).unwrap_err().to_string();
        assert!(err.contains("at least 32 bytes"), "{err}");
        std::fs::write(&path, format!("{}\n", "k".repeat(40))).unwrap();
        TokenKey::load(&path).unwrap();
    }
}
