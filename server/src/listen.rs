//! orchd's connection layer, below gRPC and REST: accepting TCP connections,
//! TCP_NODELAY, the TLS handshake, and the timeouts that keep slow or silent
//! clients from holding the server's resources.
//!
//! - Every new connection, on both ports, must send its first bytes (plain)
//!   or finish the TLS handshake within the handshake timeout; one that
//!   opens TCP and sends nothing is closed. Handshakes run in their own
//!   tasks, so a slow one never holds up the accept loop, and at most
//!   [`MAX_HANDSHAKES`] at once per port (more are closed at once).
//! - REST connections (HTTP/1.1) must then deliver each request head (the
//!   request line and headers) within the header timeout, counted from the
//!   connection's start or from the first byte of the request (slowloris),
//!   and are closed once no request has been in flight for the idle
//!   timeout. A request being answered (a long watch stream) is never cut.
//! - gRPC connections (HTTP/2) are watched by tonic's keepalive pings.
//!
//! `orchd dev`'s in-process workers reach the gRPC server through
//! [`LocalConnector`]: in-memory connections handed to the same server, so
//! they need no network, certificate or client certificate.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tower::ServiceExt;

/// How many accepted, handshaken connections may wait for the server to
/// take them.
const BACKLOG: usize = 128;

/// How many connections per port may be in their handshake at once; past
/// that, new connections are closed at once, so a flood of silent clients
/// costs at most this many tasks and sockets.
const MAX_HANDSHAKES: usize = 1024;

/// Buffer of each side of an in-memory connection.
const LOCAL_BUFFER: usize = 256 * 1024;

/// One accepted client connection, ready for HTTP.
pub enum Conn {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP, handshake done.
    Tls(Box<TlsStream<TcpStream>>),
    /// In memory, from a [`LocalConnector`] in this process.
    Local(DuplexStream),
}

impl Conn {
    fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Conn::Plain(tcp) => Some(tcp),
            Conn::Tls(tls) => Some(tls.get_ref().0),
            Conn::Local(_) => None,
        }
    }

    /// The client's address (none for in-memory connections).
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.tcp().and_then(|tcp| tcp.peer_addr().ok())
    }
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        TcpConnectInfo {
            local_addr: self.tcp().and_then(|tcp| tcp.local_addr().ok()),
            remote_addr: self.peer_addr(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::Local(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::Local(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Conn::Local(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
            Conn::Local(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::Local(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::Local(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Accepts connections on `listener` until `shutdown`, and returns them
/// once they are ready for HTTP: TCP_NODELAY set, and within
/// `handshake_timeout` the TLS handshake done (with `tls`) or the first
/// bytes received (without). `port` names the port in logs. The listener
/// is closed when `shutdown` fires.
pub fn accept(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    handshake_timeout: Duration,
    port: &'static str,
    shutdown: CancellationToken,
) -> (mpsc::Sender<Conn>, mpsc::Receiver<Conn>) {
    accept_at_most(
        listener,
        tls,
        handshake_timeout,
        MAX_HANDSHAKES,
        port,
        shutdown,
    )
}

/// [`accept`] with at most `max_handshakes` connections in their handshake.
fn accept_at_most(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    handshake_timeout: Duration,
    max_handshakes: usize,
    port: &'static str,
    shutdown: CancellationToken,
) -> (mpsc::Sender<Conn>, mpsc::Receiver<Conn>) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(max_handshakes));
    let (ready_tx, ready_rx) = mpsc::channel(BACKLOG);
    let tx = ready_tx.clone();
    let acceptor = tls.map(TlsAcceptor::from);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    if !is_connection_error(&e) {
                        // Out of file descriptors and the like: wait for
                        // some to be freed instead of spinning.
                        tracing::warn!(port, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    continue;
                }
            };
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                tracing::debug!(port, %peer, max_handshakes, "too many connections in their handshake; closed");
                continue;
            };
            // Small responses must leave at once: without TCP_NODELAY,
            // Nagle plus delayed ACKs add ~40 ms to every call.
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(port, error = %e, "could not set TCP_NODELAY");
            }
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let ready = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    ready = tokio::time::timeout(handshake_timeout, handshake(tcp, acceptor)) => ready,
                };
                drop(permit);
                match ready {
                    Ok(Ok(conn)) => {
                        tokio::select! {
                            _ = shutdown.cancelled() => {}
                            _ = tx.send(conn) => {}
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(port, %peer, error = %e, "connection dropped before HTTP");
                    }
                    Err(_) => {
                        tracing::debug!(port, %peer, timeout = ?handshake_timeout, "handshake timed out; connection closed");
                    }
                }
            });
        }
    });
    (ready_tx, ready_rx)
}

/// Errors of one connection that the accept loop can ignore.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

async fn handshake(tcp: TcpStream, tls: Option<TlsAcceptor>) -> io::Result<Conn> {
    match tls {
        Some(acceptor) => Ok(Conn::Tls(Box::new(acceptor.accept(tcp).await?))),
        None => {
            // Waits for a first byte (or the end of the stream) without
            // taking it; `readable()` alone may return at once.
            tcp.peek(&mut [0u8; 1]).await?;
            Ok(Conn::Plain(tcp))
        }
    }
}

/// Opens in-memory connections to a server fed by [`accept`]'s channel.
#[derive(Clone)]
pub struct LocalConnector(mpsc::Sender<Conn>);

impl LocalConnector {
    /// A connector handing its connections to `server`.
    pub fn new(server: mpsc::Sender<Conn>) -> Self {
        LocalConnector(server)
    }

    /// A lazily connected gRPC channel whose connections are in memory.
    pub fn channel(&self) -> tonic::transport::Channel {
        let server = self.0.clone();
        let connector = tower::service_fn(move |_: tonic::transport::Uri| {
            let server = server.clone();
            async move {
                let (client, ours) = tokio::io::duplex(LOCAL_BUFFER);
                server
                    .send(Conn::Local(ours))
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::NotConnected, "orchd stopped"))?;
                Ok::<_, io::Error>(TokioIo::new(client))
            }
        });
        tonic::transport::Endpoint::from_static("http://orchd.in-process")
            .connect_with_connector_lazy(connector)
    }
}

/// How long a REST connection may take over its parts.
#[derive(Debug, Clone, Copy)]
pub struct HttpTimeouts {
    /// To deliver a request head, from connecting or from its first byte.
    pub header: Duration,
    /// With no request in flight.
    pub idle: Duration,
}

/// Serves `router` over HTTP/1.1 on the connections from `incoming` until
/// `shutdown`, then lets requests in flight finish and closes every
/// connection.
pub async fn serve_rest(
    mut incoming: mpsc::Receiver<Conn>,
    router: axum::Router,
    timeouts: HttpTimeouts,
    shutdown: CancellationToken,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    // No hyper timer, so no hyper header timeout: `Activity` enforces both
    // timeouts, with the idle one apart from the header one (hyper counts
    // the wait between keep-alive requests as header time).
    let http = hyper::server::conn::http1::Builder::new();
    loop {
        let conn = tokio::select! {
            _ = shutdown.cancelled() => break,
            conn = incoming.recv() => match conn {
                Some(conn) => conn,
                None => break,
            },
        };
        let peer = conn.peer_addr();
        let (activity, phases) = Activity::new();
        let io = TokioIo::new(Watched {
            inner: conn,
            activity: activity.clone(),
        });
        let router = router.clone();
        let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
            let finished = activity.request_started();
            let response = router.clone().oneshot(request.map(Body::new));
            async move {
                let response = response.await?;
                Ok::<_, std::convert::Infallible>(response.map(|body| {
                    Body::new(Tracked {
                        body,
                        _finished: finished,
                    })
                }))
            }
        });
        let connection = graceful.watch(http.serve_connection(io, service));
        tokio::spawn(async move {
            tokio::select! {
                result = connection => {
                    if let Err(e) = result {
                        tracing::debug!(?peer, error = %e, "REST connection ended with an error");
                    }
                }
                why = expiry(phases, timeouts) => {
                    tracing::debug!(?peer, why, "REST connection closed");
                }
            }
        });
    }
    drop(incoming);
    graceful.shutdown().await;
}

/// Where a REST connection is, for its timeouts.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Waiting for a request head, since this instant (the connection's
    /// start, or the first byte after an idle spell).
    Head(Instant),
    /// This many requests being answered.
    Busy(usize),
    /// Nothing in flight since this instant.
    Idle(Instant),
}

/// The phase of one connection, updated by its reads and its requests.
#[derive(Clone)]
struct Activity(Arc<watch::Sender<Phase>>);

impl Activity {
    fn new() -> (Activity, watch::Receiver<Phase>) {
        let (tx, rx) = watch::channel(Phase::Head(Instant::now()));
        (Activity(Arc::new(tx)), rx)
    }

    /// Bytes arrived: on an idle connection, a request head starts.
    fn read(&self) {
        self.0.send_if_modified(|phase| match phase {
            Phase::Idle(_) => {
                *phase = Phase::Head(Instant::now());
                true
            }
            _ => false,
        });
    }

    /// A request head was read; the guard marks the end of its response.
    fn request_started(&self) -> RequestDone {
        self.0.send_modify(|phase| {
            *phase = match *phase {
                Phase::Busy(n) => Phase::Busy(n + 1),
                _ => Phase::Busy(1),
            }
        });
        RequestDone(self.clone())
    }
}

/// Dropped when a response was sent (or abandoned).
struct RequestDone(Activity);

impl Drop for RequestDone {
    fn drop(&mut self) {
        self.0.0.send_modify(|phase| {
            *phase = match *phase {
                Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
                _ => Phase::Idle(Instant::now()),
            }
        });
    }
}

/// Resolves, with the reason, when the connection has been waiting for a
/// request head or idle for too long.
async fn expiry(mut phases: watch::Receiver<Phase>, timeouts: HttpTimeouts) -> &'static str {
    loop {
        let phase = *phases.borrow_and_update();
        let (deadline, why) = match phase {
            Phase::Head(since) => (since + timeouts.header, "request head not received in time"),
            Phase::Idle(since) => (since + timeouts.idle, "idle"),
            Phase::Busy(_) => {
                if phases.changed().await.is_err() {
                    return "gone";
                }
                continue;
            }
        };
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                if !phases.has_changed().unwrap_or(false) {
                    return why;
                }
            }
            changed = phases.changed() => {
                if changed.is_err() {
                    return "gone";
                }
            }
        }
    }
}

/// A connection that reports incoming bytes to its [`Activity`].
struct Watched {
    inner: Conn,
    activity: Activity,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.read();
        }
        poll
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A response body that ends its request's [`RequestDone`] when dropped,
/// i.e. once hyper wrote it all (or the client went away).
struct Tracked {
    body: Body,
    _finished: RequestDone,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    /// Injects: a plain client that sends nothing, and one that sends a
    /// byte. Asserts: the first is closed after the handshake timeout
    /// without reaching the server; the second reaches it.
    #[tokio::test]
    async fn silent_plain_connections_are_closed_after_the_handshake_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let (_tx, mut ready) = accept(
            listener,
            None,
            Duration::from_millis(300),
            "test",
            stop.clone(),
        );
        let silent = tokio::task::spawn_blocking(move || {
            let mut stream = std::net::TcpStream::connect(addr).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            stream.read(&mut [0u8; 16])
        });
        let closed = silent.await.unwrap();
        assert!(matches!(closed, Ok(0)), "{closed:?}");
        let talker = tokio::task::spawn_blocking(move || {
            let mut stream = std::net::TcpStream::connect(addr).unwrap();
            stream.write_all(b"x").unwrap();
            stream
        });
        let _stream = talker.await.unwrap();
        let conn = tokio::time::timeout(Duration::from_secs(10), ready.recv())
            .await
            .unwrap();
        assert!(matches!(conn, Some(Conn::Plain(_))));
        stop.cancel();
    }

    /// Injects: more silent connections than may be in their handshake at
    /// once. Asserts: the one past the limit is closed at once, while the
    /// others are still waiting (their handshake timeout is long).
    #[tokio::test]
    async fn connections_past_the_handshake_limit_are_closed_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let _ready = accept_at_most(
            listener,
            None,
            Duration::from_secs(60),
            2,
            "test",
            stop.clone(),
        );
        let outcome = tokio::task::spawn_blocking(move || {
            let mut waiting = Vec::new();
            for _ in 0..2 {
                waiting.push(std::net::TcpStream::connect(addr).unwrap());
                // Let the accept loop take it before the next one.
                std::thread::sleep(Duration::from_millis(200));
            }
            let mut third = std::net::TcpStream::connect(addr).unwrap();
            third
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let third_read = third.read(&mut [0u8; 1]);
            let first = &mut waiting[0];
            first
                .set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let first_read = first.read(&mut [0u8; 1]);
            (third_read, first_read)
        })
        .await
        .unwrap();
        assert!(
            matches!(outcome.0, Ok(0)),
            "the third is closed: {:?}",
            outcome.0
        );
        assert!(outcome.1.is_err(), "the first still waits: {:?}", outcome.1);
        stop.cancel();
    }
}
