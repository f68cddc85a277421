//! The TCP connector of every mesh channel: tonic's own (hyper-util's
//! `HttpConnector`), and one check after it, that the connection is not
//! to itself.
//!
//! A client that connects to a local port nobody listens on yet can be
//! handed that very port as its source port when it lies inside the
//! kernel's ephemeral range (Linux: 32768–60999, which holds gRPC's usual
//! 50051 and recmesh's defaults). TCP's simultaneous open then connects the
//! socket to itself. The HTTP/2 handshake fails, the channel reconnects,
//! but the closed socket stays in TIME-WAIT on the server's port for a
//! minute, and a service that binds after its clients start (retrieval
//! binds once its index is built) fails with "Address already in use".
//! Seen here with the six binaries started by hand. The connector refuses
//! such a connection and closes it with a reset, which leaves no TIME-WAIT,
//! so the port stays free for its server. Go's dialer does the same
//! (`selfConnect` in `net/tcpsock_posix.go`).

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::net::TcpStream;
use tonic::transport::Uri;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A connector that refuses connections to itself; see the module docs.
#[derive(Debug, Clone)]
pub struct NoSelfConnect<C>(C);

impl NoSelfConnect<HttpConnector> {
    /// hyper-util's connector, set as tonic sets it for an endpoint with
    /// `tcp_nodelay(true)` (the endpoint's `connect_timeout` still applies:
    /// tonic wraps any connector in it).
    pub fn http() -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        NoSelfConnect(http)
    }
}

impl<C> NoSelfConnect<C> {
    /// Wraps any connector that yields TCP streams.
    pub fn new(inner: C) -> Self {
        NoSelfConnect(inner)
    }
}

impl<C> tower::Service<Uri> for NoSelfConnect<C>
where
    C: tower::Service<Uri, Response = TokioIo<TcpStream>>,
    C::Error: Into<BoxError>,
    C::Future: Send + 'static,
{
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move {
            let io = connecting.await.map_err(Into::into)?;
            refuse_self_connect(io.inner())?;
            Ok(io)
        })
    }
}

/// An error when `stream` is connected to itself; the stream is then set to
/// close with a reset (no TIME-WAIT) when dropped.
fn refuse_self_connect(stream: &TcpStream) -> std::io::Result<()> {
    let local = stream.local_addr()?;
    if local != stream.peer_addr()? {
        return Ok(());
    }
    // Best effort: without it the port is held in TIME-WAIT for a minute.
    let _ = stream.set_zero_linger();
    metrics::counter!("recmesh_self_connects_total").increment(1);
    Err(std::io::Error::new(
        std::io::ErrorKind::ConnectionRefused,
        format!(
            "connected to itself at {local}: nothing listens there yet \
             (the port is inside the kernel's ephemeral range; will retry)"
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpSocket};
    use tower::{Service, ServiceExt};

    /// A socket connected to itself, as the kernel makes one when it picks
    /// the destination port as the source port.
    async fn self_connected() -> TcpStream {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let own = socket.local_addr().expect("local addr");
        socket.connect(own).await.expect("simultaneous open")
    }

    #[tokio::test]
    async fn a_connection_to_itself_is_refused_and_frees_its_port() {
        let stream = self_connected().await;
        let port = stream.local_addr().expect("local").port();
        assert_eq!(stream.local_addr().ok(), stream.peer_addr().ok());
        let mut slot = Some(stream);
        let mut connector = NoSelfConnect::new(tower::service_fn(move |_: Uri| {
            let stream = slot.take().expect("called once");
            async move { Ok::<_, std::io::Error>(TokioIo::new(stream)) }
        }));
        let err = connector
            .ready()
            .await
            .expect("ready")
            .call(Uri::from_static("http://127.0.0.1"))
            .await
            .expect_err("a self-connect must be refused");
        assert!(err.to_string().contains("connected to itself"), "{err}");
        // The server that belongs on that port can bind it at once.
        TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("the port is free again, with no TIME-WAIT left");
    }

    #[tokio::test]
    async fn a_connection_to_a_server_passes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let uri: Uri = format!("http://{addr}").parse().expect("uri");
        let mut connector = NoSelfConnect::http();
        let io = connector
            .ready()
            .await
            .expect("ready")
            .call(uri)
            .await
            .expect("connects");
        assert_eq!(io.inner().peer_addr().ok(), Some(addr));
    }
}
