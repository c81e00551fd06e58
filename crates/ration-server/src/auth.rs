//! Who is calling, and what each port lets them call.
//!
//! A node serves clients and peers on separate ports when `peer_listen` is set
//! (required with TLS). With TLS every connection's certificate was verified
//! against the CA at the handshake ([`ration_tls::incoming`]); this layer reads
//! the identity it names and applies the port's rule before any service runs:
//! - the client port serves principals: a node certificate is refused there;
//! - the peer port serves members: only node certificates, and a call a member
//!   forwards on behalf of a client it authenticated carries that client's
//!   principal in `x-ration-principal`, honoured only there;
//! - the methods only peers use (`Campaign`, `PauseElections`) are refused on the
//!   client port whenever the ports are separate.
//!
//! The identity reaches the services as a [`Caller`] in the request's extensions.

use std::task::{Context, Poll};

use ration_tls::token::TokenKey;
use ration_tls::{Identity, PeerInfo};
use tonic::Status;

/// Metadata carrying the principal a member forwards a call for.
pub const ON_BEHALF_OF: &str = "x-ration-principal";
/// Metadata on Raft messages: the sender's client address (so followers can tell
/// clients where the leader is when the ports are separate).
pub const CLIENT_ADDR: &str = "x-ration-client-addr";

/// Who sent a request, as far as this node can tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A plaintext connection: no one is authenticated, and a request's principal
    /// is whatever it says.
    Unauthenticated,
    /// A cluster member, by its node certificate (peer port).
    Node(u64),
    /// A client, by its certificate (client port).
    Principal(String),
    /// A call member `by` forwarded for a client it authenticated as `principal`.
    Forwarded { by: u64, principal: String },
}

impl Caller {
    /// The principal this caller is authenticated as, if any: requests must then
    /// name it.
    pub fn principal(&self) -> Option<&str> {
        match self {
            Self::Principal(p) | Self::Forwarded { principal: p, .. } => Some(p),
            Self::Unauthenticated | Self::Node(_) => None,
        }
    }

    /// The member whose certificate made this call, if any.
    pub fn node(&self) -> Option<u64> {
        match self {
            Self::Node(id) | Self::Forwarded { by: id, .. } => Some(*id),
            Self::Unauthenticated | Self::Principal(_) => None,
        }
    }

    /// The caller of a request (unauthenticated if no layer set one: tests that
    /// call services directly).
    pub fn of<T>(req: &tonic::Request<T>) -> Caller {
        req.extensions().get::<Caller>().cloned().unwrap_or(Caller::Unauthenticated)
    }
}

/// Which port a layer guards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Port {
    /// One port for clients and peers (plaintext only).
    Shared,
    /// The client port, with a separate peer port.
    Client,
    /// The peer port.
    Peer,
}

/// Methods only members call, served on the peer port.
const PEER_ONLY: [&str; 2] = ["/ration.v1.Cluster/Campaign", "/ration.v1.Cluster/PauseElections"];

/// The expiry (Unix seconds) of the bearer token a call was admitted with, in its
/// extensions: a call that outlives it (a Pipeline stream) refuses what comes after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenExpiry(pub u64);

impl TokenExpiry {
    /// Refuses work once the token has expired, with how long ago.
    pub fn check(&self, now: u64) -> Result<(), Status> {
        if now > self.0 {
            return Err(Status::unauthenticated(format!(
                "the bearer token this call was opened with expired {} s ago: open a new \
                 call with a fresh token",
                now - self.0
            )));
        }
        Ok(())
    }
}

/// Decides who calls on `port`, or refuses the call; with the expiry of the bearer
/// token that authenticated the caller, if one did. A client that presented no
/// certificate may authenticate on the client port with a bearer token made with
/// `tokens` (the node's token key, if it has one).
pub fn admit(
    port: Port,
    path: &str,
    peer: Option<&PeerInfo>,
    on_behalf: Option<&str>,
    bearer: Option<&str>,
    tokens: Option<&TokenKey>,
) -> Result<(Caller, Option<TokenExpiry>), Status> {
    if port == Port::Client && PEER_ONLY.contains(&path) {
        let method = path.rsplit('/').next().unwrap_or(path);
        return Err(Status::permission_denied(format!(
            "{method} is for cluster members: it is served on the peer port only"
        )));
    }
    let Some(peer) = peer else {
        return Ok((Caller::Unauthenticated, None));
    };
    if let (false, Some(token), Port::Client) = (peer.presented, bearer, port) {
        let Some(key) = tokens else {
            return Err(Status::unauthenticated(
                "this node accepts no bearer tokens (no token_key_file): present a client certificate",
            ));
        };
        return key
            .verify_until(token, ration_tls::token::unix_now())
            .map(|(p, until)| (Caller::Principal(p), Some(TokenExpiry(until))))
            .map_err(|why| Status::unauthenticated(format!("bearer token refused: {why}")));
    }
    let identity = peer.identity.as_ref().map_err(|why| {
        Status::unauthenticated(format!("TLS client authentication failed: {why}"))
    })?;
    let caller = match (port, identity) {
        (Port::Peer, Identity::Node(id)) => match on_behalf {
            Some(p) => Ok(Caller::Forwarded { by: *id, principal: p.to_owned() }),
            None => Ok(Caller::Node(*id)),
        },
        (Port::Peer, Identity::Principal(p)) => Err(Status::permission_denied(format!(
            "this is the peer port, for cluster members (node certificates); principal {p:?} \
             must use the client port"
        ))),
        (Port::Client | Port::Shared, Identity::Principal(p)) => Ok(Caller::Principal(p.clone())),
        (Port::Client | Port::Shared, Identity::Node(id)) => {
            Err(Status::permission_denied(format!(
                "node {id}'s certificate is for the peer port; clients need a certificate \
                 naming a principal"
            )))
        }
    };
    caller.map(|c| (c, None))
}

/// The tower layer applying [`admit`] to every request on a port.
#[derive(Clone, Debug)]
pub(crate) struct Gate {
    pub port: Port,
    pub tokens: Option<std::sync::Arc<TokenKey>>,
}

impl<S> tower::Layer<S> for Gate {
    type Service = Gated<S>;
    fn layer(&self, inner: S) -> Gated<S> {
        Gated { inner, port: self.port, tokens: self.tokens.clone() }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Gated<S> {
    inner: S,
    port: Port,
    tokens: Option<std::sync::Arc<TokenKey>>,
}

impl<S, B, RB> tower::Service<http::Request<B>> for Gated<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let on_behalf =
            req.headers().get(ON_BEHALF_OF).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let bearer = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned);
        let admitted = admit(
            self.port,
            req.uri().path(),
            req.extensions().get::<PeerInfo>(),
            on_behalf.as_deref(),
            bearer.as_deref(),
            self.tokens.as_deref(),
        );
        match admitted {
            Ok((caller, expiry)) => {
                req.extensions_mut().insert(caller);
                if let Some(expiry) = expiry {
                    req.extensions_mut().insert(expiry);
                }
                Box::pin(self.inner.call(req))
            }
            Err(status) => {
                let reply = status.into_http::<RB>();
                Box::pin(async move { Ok(reply) })
            }
        }
    }
}

/// Whose roles decide what `caller` may do, and on what authority: `None` for a
/// caller no one authenticated (a plaintext node checks no roles) and for a
/// member acting for itself (members are trusted: ARCHITECTURE.md "Threat model").
/// A principal in `admins` (the node's bootstrap admins) is an admin whatever the
/// ledger holds.
pub fn authority(
    caller: &Caller,
    admins: &[String],
) -> Result<Option<(ration_core::Principal, ration_core::Authority)>, Status> {
    let Some(name) = caller.principal() else { return Ok(None) };
    let principal = ration_core::Principal::new(name).map_err(|e| {
        Status::permission_denied(format!(
            "the authenticated identity is not a usable principal: {e}"
        ))
    })?;
    let authority = if admins.iter().any(|a| a == name) {
        ration_core::Authority::BootstrapAdmin
    } else {
        ration_core::Authority::Roles
    };
    Ok(Some((principal, authority)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(identity: Result<Identity, String>) -> PeerInfo {
        PeerInfo { remote: None, presented: identity.is_ok(), identity }
    }

    fn admit(
        port: Port,
        path: &str,
        peer: Option<&PeerInfo>,
        on_behalf: Option<&str>,
    ) -> Result<Caller, Status> {
        super::admit(port, path, peer, on_behalf, None, None).map(|(caller, _)| caller)
    }

    #[test]
    fn each_port_admits_its_own_kind_of_certificate() {
        let node = peer(Ok(Identity::Node(2)));
        let gw = peer(Ok(Identity::Principal("gw".into())));
        let raft = "/ration.v1.Raft/AppendEntries";
        assert_eq!(admit(Port::Peer, raft, Some(&node), None).unwrap(), Caller::Node(2));
        assert_eq!(
            admit(Port::Peer, "/ration.v1.Ledger/Acquire", Some(&node), Some("gw")).unwrap(),
            Caller::Forwarded { by: 2, principal: "gw".into() }
        );
        let err = admit(Port::Peer, raft, Some(&gw), None).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(err.message().contains("client port"), "{}", err.message());
        let acquire = "/ration.v1.Ledger/Acquire";
        assert_eq!(
            admit(Port::Client, acquire, Some(&gw), None).unwrap(),
            Caller::Principal("gw".into())
        );
        // A client cannot claim to act for someone else: the header counts only
        // from a member on the peer port.
        assert_eq!(
            admit(Port::Client, acquire, Some(&gw), Some("root")).unwrap(),
            Caller::Principal("gw".into())
        );
        let err = admit(Port::Client, acquire, Some(&node), None).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        let err = admit(Port::Client, acquire, Some(&peer(Err("names no identity".into()))), None)
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        let err = admit(Port::Client, "/ration.v1.Cluster/Campaign", Some(&gw), None).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(admit(Port::Peer, "/ration.v1.Cluster/Campaign", Some(&node), None).is_ok());
        // Plaintext: nobody is authenticated, and the header means nothing.
        assert_eq!(
            admit(Port::Shared, acquire, None, Some("root")).unwrap(),
            Caller::Unauthenticated
        );
        assert!(admit(Port::Client, "/ration.v1.Cluster/PauseElections", None, None).is_err());
    }

    #[test]
    fn a_client_without_a_certificate_may_bring_a_bearer_token() {
        let key = TokenKey::from_bytes(&[1; 32]);
        let none = PeerInfo {
            remote: None,
            presented: false,
            identity: Err("no client certificate was presented".into()),
        };
        let acquire = "/ration.v1.Ledger/Acquire";
        let until = ration_tls::token::unix_now() + 60;
        let token = key.issue("gw", until);
        let with = |t: Option<&str>, k: Option<&TokenKey>, port| {
            super::admit(port, acquire, Some(&none), None, t, k).map(|(caller, _)| caller)
        };
        assert_eq!(
            with(Some(&token), Some(&key), Port::Client).unwrap(),
            Caller::Principal("gw".into())
        );
        // Not on the peer port, not without a key, not a bad token, not no token.
        assert_eq!(
            with(Some(&token), Some(&key), Port::Peer).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let err = with(Some(&token), None, Port::Client).unwrap_err();
        assert!(err.message().contains("no bearer tokens"), "{}", err.message());
        let stale = key.issue("gw", 1);
        let err = with(Some(&stale), Some(&key), Port::Client).unwrap_err();
        assert!(err.message().contains("expired"), "{}", err.message());
        assert_eq!(
            with(None, Some(&key), Port::Client).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        // A presented certificate decides, token or not.
        let gw = peer(Ok(Identity::Principal("cert-gw".into())));
        let by_cert =
            super::admit(Port::Client, acquire, Some(&gw), None, Some(&token), Some(&key));
        assert_eq!(by_cert.unwrap().0, Caller::Principal("cert-gw".into()));
        // A token's expiry goes with the call (a stream checks it as it goes); a
        // certificate's call carries none.
        let (_, expiry) =
            super::admit(Port::Client, acquire, Some(&none), None, Some(&token), Some(&key))
                .unwrap();
        assert_eq!(expiry, Some(super::TokenExpiry(until)));
        assert!(expiry.unwrap().check(until).is_ok());
        let late = expiry.unwrap().check(until + 3).unwrap_err();
        assert_eq!(late.code(), tonic::Code::Unauthenticated);
        assert!(late.message().contains("expired 3 s ago"), "{}", late.message());
        let by_cert = super::admit(Port::Client, acquire, Some(&gw), None, None, Some(&key));
        assert_eq!(by_cert.unwrap().1, None);
    }
}
