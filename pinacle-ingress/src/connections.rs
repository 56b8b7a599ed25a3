//! Client-connection limits Pingora 0.9.1 has no setting for: how many connections may be open
//! at once (`max_connections`) and how long a client may take to send a request head
//! (`request_header_timeout`, against slow clients; Pingora only bounds each read by 60 s, so
//! a client sending a byte every 59 s holds a connection for good: cloudflare/pingora#447).
//!
//! [`Gate`] wraps the proxy's Pingora app. Each connection (counted from the end of its TLS
//! handshake, which Pingora bounds at 60 s) holds a slot while it lives; one above the limit is
//! answered `503` with `connection: close` and closed. Every other HTTP/1 connection is read
//! through a [`HeaderDeadline`]: the first request head must be complete within the timeout of
//! the connection's start, each later one within the timeout of its first byte. The proxy marks
//! the head as read ([`head_read`], in `request_filter`) and the request as done
//! ([`request_done`], in `logging`); in between, the body and response timeouts apply. A late
//! head gets `408` and the connection closes; a connection that never sent a byte just closes.
//! HTTP/2 connections are counted but not wrapped (h2 has its own flow control).
//!
//! The gate also runs Pingora's HTTP/1 keep-alive loop itself (`Gate::serve_http1`), so that
//! the wait for each request's first bytes happens outside Pingora's per-request futures: an
//! idle kept-alive connection then holds about 20 KiB instead of about 45 KiB.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{
    ALPN, GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    Stream, TimingDigest, UniqueID, UniqueIDType,
};
use pingora::proxy::Session;
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::request_id::RequestIds;
use crate::responses::Answer;
use crate::telemetry::Metrics;

/// How long an idle kept-alive connection waits for its next request (Pingora's own default).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);

/// The most bytes of a request read while waiting for it: a whole browser head, mostly.
const FIRST_READ_BYTES: usize = 4096;

/// How long a refused connection or a late head's answer may take to send (and the refused
/// request to be read, so that closing does not reset the connection under the answer).
const ANSWER_GRACE: Duration = Duration::from_secs(1);

/// The two limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most client connections open at once.
    pub max_connections: usize,
    /// Longest a request head may take.
    pub request_header_timeout: Duration,
}

struct Shared {
    /// Swapped by a reload (SIGHUP).
    limits: Arc<ArcSwap<Limits>>,
    open: AtomicUsize,
    /// HTTP/1 connections not idle between requests (see [`Busy`]).
    busy: Arc<AtomicUsize>,
    metrics: Metrics,
    ids: RequestIds,
}

/// A Pingora app in front of another (the HTTP proxy) that enforces [`Limits`].
pub struct Gate<A> {
    inner: Arc<A>,
    shared: Arc<Shared>,
    plain: Option<Arc<dyn PlainRequests>>,
}

/// Serves some HTTP/1 requests without the Pingora app (see `crate::plain`): asked first for
/// every request whose first bytes arrived; what it declines goes to the app untouched.
#[async_trait]
pub trait PlainRequests: Send + Sync {
    /// Serves the request waiting on `conn` ([`HeaderDeadline::pending`]) or declines it.
    async fn serve(&self, conn: &mut HeaderDeadline, stopping: bool) -> Served;
}

/// What [`PlainRequests::serve`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// Not a request it serves: nothing was read or written.
    Declined,
    /// Served; the connection may take another request.
    KeepAlive,
    /// Served (or failed); the connection closes.
    Close,
}

impl<A> fmt::Debug for Gate<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gate")
            .field("limits", &**self.shared.limits.load())
            .field("open", &self.shared.open.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<A> Gate<A> {
    /// Puts `inner` behind the limits; `metrics` gets the open, refused and timed-out counts.
    pub fn new(inner: A, limits: Limits, metrics: Metrics) -> Self {
        Self {
            inner: Arc::new(inner),
            shared: Arc::new(Shared {
                limits: Arc::new(ArcSwap::from_pointee(limits)),
                open: AtomicUsize::new(0),
                busy: Arc::new(AtomicUsize::new(0)),
                metrics,
                ids: RequestIds::new(),
            }),
            plain: None,
        }
    }

    /// The limits in force, swappable: new values apply to the connections and request heads
    /// that follow.
    pub fn limits(&self) -> Arc<ArcSwap<Limits>> {
        self.shared.limits.clone()
    }

    /// How many HTTP/1 connections are accepted and not idle between requests: waiting for
    /// their first request or serving one. A graceful stop waits for these as well as for the
    /// requests in flight (a request is only counted once its head is read).
    pub fn busy(&self) -> Arc<AtomicUsize> {
        self.shared.busy.clone()
    }

    /// Lets `plain` serve the requests it takes before the app sees them.
    #[must_use]
    pub fn with_plain_requests(mut self, plain: Arc<dyn PlainRequests>) -> Self {
        self.plain = Some(plain);
        self
    }
}

/// A connection's place under `max_connections`, given back when dropped.
struct Slot(Arc<Shared>);

impl Slot {
    fn take(shared: &Arc<Shared>) -> Option<Self> {
        let max = shared.limits.load().max_connections;
        shared
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        shared.metrics.connections(1);
        Some(Self(shared.clone()))
    }
}

/// A connection counted in [`Gate::busy`] while it lives.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn enter(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.connections(-1);
    }
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServerApp for Gate<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let Some(_slot) = Slot::take(&self.shared) else {
            // Boxed: its buffer would otherwise be part of every connection's future.
            Box::pin(refuse(&self.shared, stream)).await;
            return None;
        };
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            // HTTP/2: Pingora's own connection loop.
            let mut stream = stream;
            while let Some(again) = ServerApp::process_new(&self.inner, stream, shutdown).await {
                stream = again;
            }
            return None;
        }
        let handed = self
            .serve_http1(
                Box::new(HeaderDeadline::new(stream, self.shared.clone())),
                shutdown,
            )
            .await;
        if let Some((takeover, client, early)) = handed {
            // A task of its own, sized for the tunnel: Pingora's per-connection task (about
            // 9 KiB, most of it TLS-handshake state) ends here instead of living as long.
            tokio::spawn(async move {
                let _slot = _slot;
                takeover.0.run(client, early).await;
            });
        }
        None
    }

    async fn cleanup(&self) {
        ServerApp::cleanup(&*self.inner).await;
    }
}

impl<A: HttpServerApp + Send + Sync + 'static> Gate<A> {
    /// Pingora's HTTP/1 keep-alive loop, with one change: the wait for each request's first
    /// bytes happens here rather than inside Pingora's per-request futures (tens of KiB), so an
    /// idle kept-alive connection holds little more than its socket. Returns a [`Takeover`]
    /// handed over with the connection, with the connection and its unread bytes.
    async fn serve_http1(
        self: &Arc<Self>,
        mut conn: Box<HeaderDeadline>,
        shutdown: &ShutdownWatch,
    ) -> Option<(Takeover, Stream, Vec<u8>)> {
        // Pingora's settings from the previous request: `None` for a session that starts the
        // way a new connection's does (the first, and any after a plain request).
        let mut carried: Option<Option<HttpPersistentSettings>> = None;
        // The plain path only counts requests against no limit of Pingora's.
        let plain = self.plain.as_ref().filter(|_| {
            self.inner
                .server_options()
                .and_then(|o| o.keepalive_request_limit)
                .is_none()
        });
        let mut first = true;
        // Busy from the accept (a request is on its way) until idle after a request.
        let mut busy = Some(Busy::enter(&self.shared.busy));
        loop {
            if !first {
                busy = None;
            }
            // The first head's deadline runs from the connection's start.
            let arrived = conn.wait_for_request((!first).then_some(shutdown)).await;
            if !arrived {
                return None;
            }
            if busy.is_none() {
                busy = Some(Busy::enter(&self.shared.busy));
            }
            first = false;
            if let Some(plain) = plain {
                let stopping = *shutdown.borrow();
                match plain.serve(&mut conn, stopping).await {
                    Served::Declined => {}
                    Served::KeepAlive => {
                        carried = None;
                        continue;
                    }
                    Served::Close => return None,
                }
            }
            let mut session = ServerSession::new_http1(conn);
            match carried.take() {
                None => {
                    // As Pingora does for a new connection.
                    session.set_keepalive((!*shutdown.borrow()).then_some(60));
                    session.set_keepalive_reuses_remaining(
                        self.inner
                            .server_options()
                            .and_then(|o| o.keepalive_request_limit),
                    );
                }
                // We never enable pipelining, so no request bytes are carried in `settings`.
                Some(Some(settings)) => settings.apply_to_session(&mut session),
                Some(None) => {}
            }
            let next = self.inner.process_new_http(session, shutdown).await?;
            let (stream, mut settings) = next.consume();
            // The stream handed back is the one we gave.
            let again = stream.into_any().downcast::<HeaderDeadline>().ok()?;
            let takeover = settings
                .as_mut()
                .and_then(HttpPersistentSettings::take_user_context)
                .and_then(|context| context.downcast::<Takeover>().ok());
            if let Some(takeover) = takeover {
                // No more HTTP on this connection: no head deadline, no Pingora session.
                let (client, early) = again.into_parts();
                return Some((*takeover, client, early));
            }
            conn = again;
            carried = Some(settings);
        }
    }
}

/// Work that owns a client connection once Pingora has finished its request: an accepted
/// WebSocket upgrade, whose `101` and tunnel run on the raw connection (see `crate::tunnel`).
/// The proxy hands it over as the request's persisted connection context; Pingora returns it
/// with the connection, and the gate runs it instead of waiting for another request.
pub struct Takeover(pub Box<dyn TakeoverTask>);

impl fmt::Debug for Takeover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Takeover")
    }
}

/// See [`Takeover`].
pub trait TakeoverTask: Send + Sync {
    /// Runs on the client's connection. `early`: bytes the client sent behind its request that
    /// Pingora did not read.
    fn run(
        self: Box<Self>,
        client: Stream,
        early: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// Whether a connection given back by Pingora comes to the gate (every HTTP/1 connection of the
/// ingress), so that a [`Takeover`] handed over with it is run.
pub fn taken_over_by_gate(session: &Session) -> bool {
    deadline_of(session).is_some()
}

/// Answers a connection above the limit: reads (some of) its request, writes the 503, closes.
/// HTTP/2 clients (ALPN) cannot read an HTTP/1 answer and are just closed.
async fn refuse(shared: &Shared, mut stream: Stream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    shared.metrics.connection_refused();
    let client = client_addr(&*stream);
    let answer = Answer::TooManyConnections;
    shared.metrics.answer(answer.name());
    let request_id = shared.ids.next_id();
    tracing::warn!(
        target: "pinacle_ingress::access",
        request_id = %request_id,
        client = %client,
        status = answer.status(),
        answer = answer.name(),
        max_connections = shared.limits.load().max_connections,
        "connection refused"
    );
    if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
        return;
    }
    let mut scratch = [0u8; 4096];
    let _ = tokio::time::timeout(ANSWER_GRACE, stream.read(&mut scratch)).await;
    let bytes = answer
        .reply(false)
        .http1_bytes(answer.name(), &request_id, true);
    let sent = tokio::time::timeout(ANSWER_GRACE, async {
        stream.write_all(&bytes).await?;
        stream.flush().await
    })
    .await;
    if matches!(sent, Ok(Ok(()))) {
        Shutdown::shutdown(stream.as_mut()).await;
        // Drain what the client still sends so that the close is not a reset.
        let _ = tokio::time::timeout(ANSWER_GRACE, async {
            while stream.read(&mut scratch).await.is_ok_and(|n| n > 0) {}
        })
        .await;
    }
}

fn client_addr(stream: &dyn pingora::protocols::IO) -> String {
    stream
        .get_socket_digest()
        .and_then(|d| d.peer_addr().map(ToString::to_string))
        .unwrap_or_default()
}

/// Between requests: no deadline of ours (Pingora's keep-alive timeout applies).
const AWAITING: u8 = 0;
/// A request head is being read: the deadline runs.
const HEAD: u8 = 1;
/// The head was read: the body and response have their own timeouts.
const MESSAGE: u8 = 2;

/// A client stream whose request heads must arrive in time (see the module documentation).
pub struct HeaderDeadline {
    inner: Stream,
    shared: Arc<Shared>,
    phase: AtomicU8,
    /// Whether any byte of the current head arrived (the first request starts without one).
    head_started: bool,
    deadline: Pin<Box<Sleep>>,
    /// Set when the deadline passed: the 408 still to be written.
    late: Option<LateAnswer>,
    /// Bytes read while waiting for a request, handed to Pingora's first read.
    first: Vec<u8>,
    first_taken: usize,
}

struct LateAnswer {
    bytes: Vec<u8>,
    written: usize,
}

impl fmt::Debug for HeaderDeadline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeaderDeadline")
            .field("inner", &self.inner)
            .field("phase", &self.phase.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl HeaderDeadline {
    fn new(inner: Stream, shared: Arc<Shared>) -> Self {
        let timeout = shared.limits.load().request_header_timeout;
        Self {
            inner,
            shared,
            phase: AtomicU8::new(HEAD),
            head_started: false,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            late: None,
            first: Vec::new(),
            first_taken: 0,
        }
    }

    /// Waits for the next request's first bytes (kept for Pingora's first read). The first
    /// request waits until its head deadline; a later one up to [`KEEPALIVE_IDLE`], and no
    /// longer than the server runs (`shutdown`). False: nothing came, the client closed, or the
    /// server is stopping; the connection closes without an answer.
    async fn wait_for_request(&mut self, shutdown: Option<&ShutdownWatch>) -> bool {
        use tokio::io::AsyncReadExt;

        if self.first_taken < self.first.len() {
            return true;
        }
        let until = match shutdown {
            None => self.deadline.deadline(),
            Some(_) => Instant::now() + KEEPALIVE_IDLE,
        };
        let mut buf = Vec::with_capacity(FIRST_READ_BYTES);
        let read = tokio::time::timeout_at(until, self.inner.read_buf(&mut buf));
        let stopping = async {
            match shutdown {
                Some(watch) => {
                    let _ = watch.clone().wait_for(|down| *down).await;
                }
                None => std::future::pending().await,
            }
        };
        let got = tokio::select! {
            biased;
            read = read => matches!(read, Ok(Ok(n)) if n > 0),
            () = stopping => false,
        };
        if got {
            if shutdown.is_some() {
                // A later request: its head deadline starts with its first byte.
                self.phase.store(HEAD, Ordering::Release);
                let timeout = self.shared.limits.load().request_header_timeout;
                self.deadline.as_mut().reset(Instant::now() + timeout);
            }
            self.head_started = true;
            self.first = buf;
            self.first_taken = 0;
        }
        got
    }

    /// Bytes of the next request already read (what [`PlainRequests::serve`] looks at).
    pub fn pending(&self) -> &[u8] {
        self.first.get(self.first_taken..).unwrap_or_default()
    }

    /// Takes the pending bytes as a whole request head: its deadline stops.
    pub fn take_pending_head(&mut self) {
        self.first = Vec::new();
        self.first_taken = 0;
        self.phase.store(MESSAGE, Ordering::Release);
    }

    /// The request is answered: the next head's deadline starts with its first byte.
    pub fn request_done(&self) {
        self.phase.store(AWAITING, Ordering::Release);
    }

    /// The client's address.
    pub fn client_addr(&self) -> Option<std::net::SocketAddr> {
        self.inner
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet().copied()))
    }

    /// Whether the connection is TLS.
    pub fn is_tls(&self) -> bool {
        self.inner.get_ssl_digest().is_some()
    }

    /// The client's stream and the bytes read from it that nobody took yet.
    fn into_parts(self) -> (Stream, Vec<u8>) {
        let mut early = self.first;
        early.drain(..self.first_taken.min(early.len()));
        (self.inner, early)
    }

    /// The deadline passed: log, count, and start writing the 408 (or close quietly when the
    /// client never sent anything).
    fn expire(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let timeout = self.shared.limits.load().request_header_timeout;
        if !self.head_started {
            tracing::debug!(client = %client_addr(&*self.inner), ?timeout, "idle connection closed: no request within request_header_timeout");
            return Poll::Ready(Ok(()));
        }
        self.shared.metrics.header_timeout();
        let answer = Answer::RequestHeaderTimeout;
        self.shared.metrics.answer(answer.name());
        let request_id = self.shared.ids.next_id();
        tracing::warn!(
            target: "pinacle_ingress::access",
            request_id = %request_id,
            client = %client_addr(&*self.inner),
            status = answer.status(),
            answer = answer.name(),
            timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            "request head too slow"
        );
        self.late = Some(LateAnswer {
            bytes: answer
                .reply(false)
                .http1_bytes(answer.name(), &request_id, true),
            written: 0,
        });
        self.deadline.as_mut().reset(Instant::now() + ANSWER_GRACE);
        self.poll_late(cx)
    }

    /// Writes the 408, then fails the read (Pingora closes the connection); gives up on a client
    /// that does not take it within [`ANSWER_GRACE`].
    fn poll_late(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let timed_out = || {
            Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request head not received within request_header_timeout",
            )))
        };
        let Some(late) = self.late.as_mut() else {
            return timed_out();
        };
        loop {
            let step = if late.written < late.bytes.len() {
                Pin::new(&mut self.inner).poll_write(cx, &late.bytes[late.written..])
            } else {
                Pin::new(&mut self.inner).poll_flush(cx).map_ok(|()| 0)
            };
            match step {
                Poll::Ready(Ok(n)) if n > 0 => late.written += n,
                Poll::Ready(_) => return timed_out(),
                Poll::Pending if self.deadline.as_mut().poll(cx).is_ready() => return timed_out(),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Marks the request head as read (from `request_filter`): the deadline stops.
pub fn head_read(session: &Session) {
    if let Some(stream) = deadline_of(session) {
        stream.phase.store(MESSAGE, Ordering::Release);
    }
}

/// Marks the request as done (from `logging`): the next head's deadline starts with its first
/// byte.
pub fn request_done(session: &Session) {
    if let Some(stream) = deadline_of(session) {
        stream.phase.store(AWAITING, Ordering::Release);
    }
}

fn deadline_of(session: &Session) -> Option<&HeaderDeadline> {
    session
        .stream()
        .and_then(|s| (**s).as_any().downcast_ref::<HeaderDeadline>())
}

impl AsyncRead for HeaderDeadline {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.late.is_some() {
            return this.poll_late(cx);
        }
        if this.first_taken < this.first.len() {
            let rest = this.first.get(this.first_taken..).unwrap_or_default();
            let n = rest.len().min(buf.remaining());
            buf.put_slice(rest.get(..n).unwrap_or_default());
            this.first_taken += n;
            if this.first_taken == this.first.len() {
                this.first = Vec::new();
                this.first_taken = 0;
            }
            return Poll::Ready(Ok(()));
        }
        let phase = this.phase.load(Ordering::Acquire);
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        let got_bytes = buf.filled().len() > before;
        match (&polled, phase) {
            (Poll::Ready(Ok(())), AWAITING) if got_bytes => {
                this.phase.store(HEAD, Ordering::Release);
                this.head_started = true;
                let timeout = this.shared.limits.load().request_header_timeout;
                this.deadline.as_mut().reset(Instant::now() + timeout);
            }
            (Poll::Ready(Ok(())), HEAD) if got_bytes => this.head_started = true,
            (Poll::Pending, HEAD) if this.deadline.as_mut().poll(cx).is_ready() => {
                return this.expire(cx);
            }
            _ => {}
        }
        polled
    }
}

impl AsyncWrite for HeaderDeadline {
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

#[async_trait]
impl Shutdown for HeaderDeadline {
    async fn shutdown(&mut self) {
        Shutdown::shutdown(self.inner.as_mut()).await;
    }
}

impl UniqueID for HeaderDeadline {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for HeaderDeadline {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for HeaderDeadline {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for HeaderDeadline {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest);
    }
}

impl GetSocketDigest for HeaderDeadline {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest);
    }
}

#[async_trait]
impl Peek for HeaderDeadline {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}
