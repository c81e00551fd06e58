//! turmoil's simulated TCP under tonic: accepted streams for the server, a
//! connector for client channels. Everything must be created inside a host.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::{Channel, Endpoint};

/// The gRPC port every simulated node serves on.
pub const PORT: u16 = 50051;

/// An accepted simulated connection, as tonic's server wants it.
#[derive(Debug)]
pub struct SimIo(pub turmoil::net::TcpStream);

impl tonic::transport::server::Connected for SimIo {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for SimIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for SimIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Accepts on `0.0.0.0:PORT` in the current host; the stream tonic serves from.
pub async fn incoming(
) -> std::io::Result<impl tokio_stream::Stream<Item = Result<SimIo, std::io::Error>> + Send + 'static>
{
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", PORT)).await?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            if tx.send(SimIo(stream)).is_err() {
                return;
            }
        }
    });
    Ok(tokio_stream::StreamExt::map(
        tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        Ok::<SimIo, std::io::Error>,
    ))
}

/// A lazy channel to `host:port` over simulated TCP, with a deadline on every call.
pub fn channel(addr: &str, timeout: Duration) -> Channel {
    let target = addr.to_owned();
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap_or_else(|_| Endpoint::from_static("http://invalid"))
        .connect_timeout(timeout)
        .timeout(timeout);
    endpoint.connect_with_connector_lazy(tower::service_fn(move |_| {
        let target = target.clone();
        async move {
            let stream = turmoil::net::TcpStream::connect(target).await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    }))
}
