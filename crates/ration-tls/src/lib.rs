//! # ration-tls
//!
//! TLS for Ration's two listeners and its clients:
//! - [`TlsFiles`] and [`Credentials`]: a CA, a certificate and its key, read from
//!   PEM files and turned into rustls configurations that ask for (server) or
//!   present (client) a certificate, and [`Credentials::authenticate`], which
//!   checks a client's certificate after the handshake; [`Credentials::reload`] re-reads them, and
//!   [`Credentials::watch`] does so when the files change or on SIGHUP;
//! - [`Identity`]: who a certificate names (a node, or a principal);
//! - [`incoming`]: a TLS listener for tonic, handshakes off the accept loop;
//! - [`Connector`]: a TLS connector for tonic channels, verifying the server's
//!   certificate against the address dialled;
//! - [`dev`]: a development CA and certificates (rcgen), for tests and trials;
//! - [`token`]: bearer tokens for clients without a certificate.
//!
//! The crypto provider is ring's, named explicitly, so nothing depends on a
//! process-wide default.

pub mod dev;
mod identity;
mod listen;
pub mod token;

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig};
use serde::{Deserialize, Serialize};

pub use identity::{identity_of, Identity, NODE_PATH, PRINCIPAL_PATH};
pub use listen::{incoming, Accepted, IncomingLimits, PeerInfo};

/// Where a party's TLS material lives: the CA that signs every certificate it
/// accepts, its own certificate (chain, leaf first) and that certificate's key,
/// each a PEM file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What went wrong with TLS material, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {reason}")]
    Bad { path: PathBuf, reason: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn bad(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::Bad { path: path.to_path_buf(), reason: reason.to_string() }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_path_buf(), source })
}

/// Every certificate in a PEM file (at least one).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(path, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(bad(path, "holds no PEM certificate (-----BEGIN CERTIFICATE-----)"));
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| bad(path, format!("no PEM private key: {e}")))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots.add(cert).map_err(|e| bad(path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// The material of [`TlsFiles`], read and checked once.
#[derive(Debug)]
struct Material {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    identity: Identity,
}

impl Material {
    fn read(files: &TlsFiles) -> Result<Self, TlsError> {
        let roots = Arc::new(roots(&files.ca)?);
        let chain = read_certs(&files.cert)?;
        let key = read_key(&files.key)?;
        let identity = identity_of(&chain[0]).map_err(|e| bad(&files.cert, e))?;
        Ok(Self { roots, chain, key, identity })
    }

    /// The verifier of client certificates: signed by the CA, valid now, for
    /// client authentication.
    fn verifier(&self, files: &TlsFiles) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
        WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| bad(&files.ca, e))
    }

    /// A server that asks for a client certificate and checks, during the
    /// handshake, that the client holds its key; whether the certificate itself
    /// is acceptable (`verifier`) is decided right after the handshake
    /// ([`Credentials::authenticate`]), so that a refused client gets a gRPC
    /// status saying why instead of a bare TLS alert that a TLS 1.3 client often
    /// never reads.
    fn server(
        &self,
        files: &TlsFiles,
        verifier: Arc<dyn ClientCertVerifier>,
    ) -> Result<ServerConfig, TlsError> {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(Arc::new(Deferred(verifier)))
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| {
                bad(&files.key, format!("does not go with {}: {e}", files.cert.display()))
            })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }

    /// A client presenting its certificate and trusting only the CA.
    fn client(&self, files: &TlsFiles) -> Result<ClientConfig, TlsError> {
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| {
                bad(&files.key, format!("does not go with {}: {e}", files.cert.display()))
            })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

/// When the three files last changed (modification time and length of each).
type Stamp = Vec<Option<(SystemTime, u64)>>;

fn stamp(files: &TlsFiles) -> Stamp {
    [&files.ca, &files.cert, &files.key]
        .iter()
        .map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len()))))
        .collect()
}

/// Asks for a client certificate and checks the handshake's signatures (proof
/// that the client holds the certificate's key) with the real verifier, but
/// leaves the certificate's chain and validity to [`Credentials::authenticate`],
/// after the handshake. A connection whose certificate fails that check is
/// served nothing: every request on it is refused with the reason.
#[derive(Debug)]
struct Deferred(Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for Deferred {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// A certificate's validity bound, as RFC 3339.
fn when(t: UnixTime) -> String {
    let secs = i64::try_from(t.as_secs()).unwrap_or(i64::MAX);
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| format!("{secs} s after the epoch"))
}

/// Why a client certificate is refused, in words.
fn refusal(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::Expired => "is expired".into(),
            C::ExpiredContext { not_after, .. } => {
                format!("is expired (since {})", when(*not_after))
            }
            C::NotValidYet => "is not valid yet".into(),
            C::NotValidYetContext { not_before, .. } => {
                format!("is not valid yet (from {})", when(*not_before))
            }
            C::UnknownIssuer => "is not signed by the CA this node trusts".into(),
            C::BadSignature => {
                "is not signed by the CA this node trusts (its signature does not verify)".into()
            }
            C::Revoked => "is revoked".into(),
            C::InvalidPurpose => "is not for client authentication (extended key usage)".into(),
            C::BadEncoding => "does not decode".into(),
            other => format!("is refused: {other:?}"),
        },
        other => format!("is refused: {other}"),
    }
}

#[derive(Debug)]
struct Current {
    verifier: Arc<dyn ClientCertVerifier>,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    identity: Identity,
    stamp: Stamp,
}

/// A party's TLS configurations, built from [`TlsFiles`] and replaced whole when
/// the files change: connections made after a reload use the new certificate,
/// those open keep theirs.
#[derive(Debug)]
pub struct Credentials {
    files: TlsFiles,
    current: RwLock<Current>,
    reloads: std::sync::atomic::AtomicU64,
}

impl Credentials {
    /// Reads and checks the files: the CA, a certificate naming an [`Identity`],
    /// and the key that goes with it.
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let current = Self::build(&files)?;
        Ok(Arc::new(Self { files, current: RwLock::new(current), reloads: Default::default() }))
    }

    fn build(files: &TlsFiles) -> Result<Current, TlsError> {
        let stamp = stamp(files);
        let m = Material::read(files)?;
        let verifier = m.verifier(files)?;
        Ok(Current {
            server: Arc::new(m.server(files, verifier.clone())?),
            verifier,
            client: Arc::new(m.client(files)?),
            identity: m.identity,
            stamp,
        })
    }

    fn current(&self) -> std::sync::RwLockReadGuard<'_, Current> {
        self.current.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// For accepting connections (a client certificate is required).
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.current().server.clone()
    }

    /// For dialling (this party's certificate is presented).
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.current().client.clone()
    }

    /// Who a client that completed a handshake is: its certificate chain (leaf
    /// first, as presented) checked against the CA and the time now, then the
    /// identity the leaf names; or why it is refused, in words.
    pub fn authenticate(&self, chain: Option<&[CertificateDer<'_>]>) -> Result<Identity, String> {
        let Some([leaf, intermediates @ ..]) = chain else {
            return Err("no client certificate was presented: this node requires one signed by \
                        its CA"
                .into());
        };
        let verifier = self.current().verifier.clone();
        verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map_err(|e| format!("the client certificate {}", refusal(&e)))?;
        identity_of(leaf).map_err(|e| format!("the client certificate {e}"))
    }

    /// Who this party's own certificate names.
    pub fn identity(&self) -> Identity {
        self.current().identity.clone()
    }

    /// How many reloads took effect since loading.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Reads the files again. On success the new configurations replace the old
    /// (true); on failure the old stay in force and the error says why.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let next = Self::build(&self.files)?;
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        *current = next;
        self.reloads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(true)
    }

    /// Reloads when any of the files changes (checked every `every`) and on SIGHUP,
    /// logging what happened; a failed reload keeps the old material. Ends when
    /// the last other holder of `self` drops it.
    pub fn watch(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        // Registered before this returns: from then on SIGHUP reloads instead of
        // ending the process.
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                #[cfg(unix)]
                let hangup = async {
                    match hup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                };
                #[cfg(not(unix))]
                let hangup = std::future::pending::<Option<()>>();
                let asked = tokio::select! {
                    _ = tick.tick() => false,
                    _ = hangup => true,
                };
                let Some(me) = weak.upgrade() else { return };
                if !asked && stamp(&me.files) == me.current().stamp {
                    continue;
                }
                match me.reload() {
                    Ok(_) => tracing::info!(
                        cert = %me.files.cert.display(),
                        identity = %me.identity(),
                        reason = if asked { "SIGHUP" } else { "files changed" },
                        "TLS certificates reloaded"
                    ),
                    Err(e) => {
                        // Keep the old material; do not retry an unchanged bad file
                        // every tick.
                        let mut current = me.current.write().unwrap_or_else(|p| p.into_inner());
                        current.stamp = stamp(&me.files);
                        tracing::warn!(
                            "TLS certificates not reloaded (the old ones stay in force): {e}"
                        );
                    }
                }
            }
        })
    }
}

/// Client-side TLS: a fixed configuration, or a party's reloading credentials.
#[derive(Clone, Debug)]
pub enum ClientTls {
    Fixed(Arc<ClientConfig>),
    Reloading(Arc<Credentials>),
}

impl ClientTls {
    /// Trusts `ca` and presents `cert`/`key`.
    pub fn from_files(files: &TlsFiles) -> Result<Self, TlsError> {
        Ok(Self::Fixed(Arc::new(Material::read(files)?.client(files)?)))
    }

    /// Trusts `ca` and presents no certificate (a client that authenticates with
    /// a bearer token instead).
    pub fn ca_only(ca: &Path) -> Result<Self, TlsError> {
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots(ca)?)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self::Fixed(Arc::new(config)))
    }

    fn config(&self) -> Arc<ClientConfig> {
        match self {
            Self::Fixed(c) => c.clone(),
            Self::Reloading(c) => c.client_config(),
        }
    }

    /// TLS over `tcp` to a server that must present a certificate for `host` (a
    /// DNS name or an IP address) from a trusted CA.
    pub async fn connect(
        &self,
        host: &str,
        tcp: tokio::net::TcpStream,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let server = server_name(host)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        tokio_rustls::TlsConnector::from(self.config()).connect(server, tcp).await
    }
}

/// A client configuration for HTTPS to a server outside the cluster (a webhook
/// receiver): its certificate is checked against `ca` if given (a private CA), else
/// against the public web's roots (Mozilla's, compiled in: the same in any
/// container, whatever its system store holds). HTTP/1.1, no client certificate.
pub fn https_client(ca: Option<&Path>) -> Result<ClientTls, TlsError> {
    let roots = match ca {
        Some(path) => roots(path)?,
        None => RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() },
    };
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(ClientTls::Fixed(Arc::new(config)))
}

/// Whether `host` can be checked against a certificate: a DNS name or an IP
/// address (without brackets). Err says why not.
pub fn check_server_name(host: &str) -> Result<(), String> {
    server_name(host).map(|_| ())
}

/// `host` as the name a server's certificate must carry.
fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_owned())
        .map_err(|e| format!("{host:?} is not a DNS name or IP address: {e}"))
}

/// Dials `host:port` over TCP and TLS for a tonic channel, checking the server's
/// certificate against the CA and against the host dialled (a DNS name or an IP
/// address in its subject alternative names), or against `server_name` if set.
///
/// Use with `Endpoint::from_shared("http://host:port")` and
/// `connect_with_connector_lazy`: the URI's scheme only tells tonic to dial.
#[derive(Clone, Debug)]
pub struct Connector {
    tls: ClientTls,
    server_name: Option<String>,
}

impl Connector {
    pub fn new(tls: ClientTls) -> Self {
        Self { tls, server_name: None }
    }

    /// Checks the server's certificate for `name` instead of the host dialled.
    pub fn with_server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }
}

type Connecting<T> = Pin<Box<dyn std::future::Future<Output = std::io::Result<T>> + Send>>;

impl tower::Service<http::Uri> for Connector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = std::io::Error;
    type Future = Connecting<Self::Response>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let config = self.tls.config();
        let name = self.server_name.clone();
        Box::pin(async move {
            let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
            let host = uri
                .host()
                .ok_or_else(|| invalid(format!("{uri}: no host to dial")))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().ok_or_else(|| invalid(format!("{uri}: no port")))?;
            let server = server_name(name.as_deref().unwrap_or(&host)).map_err(invalid)?;
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(config).connect(server, tcp).await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

#[cfg(test)]
mod tests;
