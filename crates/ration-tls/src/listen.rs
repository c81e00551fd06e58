//! A TLS listener for tonic: accepts TCP connections and runs each handshake in
//! its own task (bounded in number and time), so a slow or hostile client cannot
//! hold up the accept loop; finished handshakes are handed to the server in order
//! of completion.

use std::sync::Arc;
use std::time::Duration;

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use crate::{Credentials, Identity};

/// A connection whose handshake succeeded (the client proved it holds its
/// certificate's key), with who that certificate names once checked against the
/// CA, or why it was refused.
#[derive(Debug)]
pub struct Accepted {
    stream: TlsStream<TcpStream>,
    info: PeerInfo,
}

/// What the services learn about a TLS connection (tonic puts it in every
/// request's extensions).
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    /// Whether the client presented a certificate at all (one that did not may
    /// still authenticate with a bearer token).
    pub presented: bool,
    /// Who the client's certificate names, or why it is refused (no certificate,
    /// not signed by the CA, expired, naming no one): then every request on the
    /// connection is refused with that reason.
    pub identity: Result<Identity, String>,
}

impl Accepted {
    pub fn info(&self) -> &PeerInfo {
        &self.info
    }
}

impl tonic::transport::server::Connected for Accepted {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for Accepted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Accepted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Bounds on handshakes under way.
#[derive(Clone, Copy, Debug)]
pub struct IncomingLimits {
    /// Handshakes at once; connections beyond it wait in the kernel's backlog.
    pub handshakes: usize,
    /// Longest a handshake may take before the connection is closed.
    pub timeout: Duration,
}

impl Default for IncomingLimits {
    fn default() -> Self {
        Self { handshakes: 256, timeout: Duration::from_secs(10) }
    }
}

/// Serves TLS on `listener` with the current configuration of `tls` at each
/// handshake (so a reload applies to new connections). Failed handshakes are
/// logged (at most one line a second per listener) and dropped. `what` names the
/// listener in logs. The stream ends when the server stops reading it.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<Credentials>,
    limits: IncomingLimits,
    what: &'static str,
) -> ReceiverStream<Result<Accepted, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let permits = Arc::new(Semaphore::new(limits.handshakes.max(1)));
        let quiet = Arc::new(std::sync::Mutex::new(None::<tokio::time::Instant>));
        loop {
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => p,
                () = tx.closed() => return,
            };
            let Ok(permit) = permit else { return };
            let (tcp, from) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: wait, do not spin.
                        tracing::warn!(listener = what, "accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
            let tls = tls.clone();
            let tx = tx.clone();
            let quiet = quiet.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let why = match tokio::time::timeout(limits.timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let certs = stream.get_ref().1.peer_certificates();
                        let presented = certs.is_some_and(|c| !c.is_empty());
                        let identity = tls.authenticate(certs);
                        let info = PeerInfo { remote: Some(from), presented, identity };
                        let _ = tx.send(Ok(Accepted { stream, info })).await;
                        return;
                    }
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => format!("no handshake within {:?}", limits.timeout),
                };
                let now = tokio::time::Instant::now();
                let mut last = quiet.lock().unwrap_or_else(|p| p.into_inner());
                if last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
                    *last = Some(now);
                    tracing::warn!(listener = what, %from, "TLS handshake refused: {why}");
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
