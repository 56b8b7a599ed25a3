//! Plain HTTP/1.1 requests served by the connection gate itself, without Pingora's proxy loop.
//!
//! Why: measured on one core (`benches/load/run.sh`, README "Under load"), Pingora's HTTP/1
//! proxy path costs about 25 µs of user CPU per request before any work of ours, against 5 µs for
//! a plain Tokio forwarder (`benches/src/bin/tokio-floor.rs`) and 8 µs for nginx; the kernel's
//! share is the same for all three. So the commonest request, a bodiless `GET`/`HEAD` to a pod
//! whatever its route, is served here once [`crate::policy`] has judged it (the plain engine,
//! `plain_engine.rs`, answers our own answers too); everything else (bodies, upgrades, HTTP/1.0,
//! odd framing) still goes through Pingora, which sees the request untouched.
//!
//! The pure parts: [`PlainRequest::parse`] (which requests qualify),
//! [`PlainRequest::upstream_head`] (the request as forwarded, with the same header edits as the
//! Pingora path), [`ResponseHead::parse`] (framing of the upstream's answer, and the head the
//! client gets), and [`ChunkedEnd`] (where a chunked body ends, so both connections stay
//! reusable). [`UpstreamPool`] keeps idle upstream
//! connections; [`exchange`] runs one request over them, every wait bounded.

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::PoisonError;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::confine::{self, Confined};
use tokio::net::TcpStream;

use crate::framing;
use crate::responses::{MARKER_HEADER, REQUEST_ID_HEADER};
use crate::responses::{POD_ROUTER_HEADER, pod_router_failure};
use crate::upstream::HeaderEdit;

/// Most header fields in a request head served here (more: Pingora's path).
const MAX_HEADERS: usize = 96;
/// Most header fields in an upstream response head relayed (Pingora's own limit).
const MAX_RESPONSE_HEADERS: usize = 256;
/// Longest upstream response head.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Longest chunk-size or trailer line of a chunked body.
const MAX_CHUNK_LINE: usize = 4096;
/// Body bytes read from the upstream at a time.
const BODY_READ: usize = 64 * 1024;
/// Body bytes copied behind the response head to send both at once.
const COALESCE: usize = 16 * 1024;
/// Idle connections kept per upstream address.
const IDLE_PER_UPSTREAM: usize = 64;

/// Whether a request field sends the request to Pingora's path: a hop-by-hop field
/// ([`framing::is_request_hop`]: a body, or framing this path does not interpret), an upgrade
/// or an expectation.
fn not_plain(name: &[u8]) -> bool {
    framing::is_request_hop(name)
        || name.eq_ignore_ascii_case(b"upgrade")
        || name.eq_ignore_ascii_case(b"expect")
}

/// A bodiless HTTP/1.1 `GET` or `HEAD` whose head arrived whole.
#[derive(Debug)]
pub struct PlainRequest {
    /// `GET` or `HEAD`.
    pub method: Method,
    /// The origin-form target.
    pub uri: Uri,
    /// The header fields.
    pub headers: HeaderMap,
    /// The `Host` field.
    pub host: String,
    /// The request line and each field as byte ranges of the head, so that the head sent
    /// upstream is built without parsing it again.
    raw: RawHead,
}

/// Where the parts of a request head are, as offsets into it.
#[derive(Debug, Default)]
struct RawHead {
    /// `method SP target`.
    line: std::ops::Range<usize>,
    /// Each field: its name and its value.
    fields: Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>,
}

/// The range `part` occupies in `whole` (`part` is a slice of it).
fn range_in(whole: &[u8], part: &[u8]) -> std::ops::Range<usize> {
    let start = (part.as_ptr() as usize).saturating_sub(whole.as_ptr() as usize);
    start..start + part.len()
}

impl PlainRequest {
    /// The request in `bytes` if it qualifies: HTTP/1.1, `GET` or `HEAD`, an origin-form target,
    /// one `Host`, no field that implies a body, an upgrade or hop-by-hop handling, `Connection` absent or `keep-alive`, and nothing
    /// behind the head (no pipelining). `None` sends it to Pingora's path.
    pub fn parse(bytes: &[u8], max_head_bytes: usize) -> Option<Self> {
        let mut fields = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let httparse::Status::Complete(len) =
            req.parse_with_uninit_headers(bytes, &mut fields).ok()?
        else {
            return None;
        };
        if len != bytes.len() || len > max_head_bytes || req.version != Some(1) {
            return None;
        }
        let method = match req.method? {
            "GET" => Method::GET,
            "HEAD" => Method::HEAD,
            _ => return None,
        };
        let path = req.path?;
        if !path.starts_with('/') {
            return None;
        }
        let uri = Uri::try_from(path).ok()?;
        let mut headers = HeaderMap::with_capacity(req.headers.len());
        let mut host = None;
        let method_at = range_in(bytes, req.method?.as_bytes());
        let mut raw = RawHead {
            line: method_at.start..range_in(bytes, path.as_bytes()).end,
            fields: Vec::with_capacity(req.headers.len()),
        };
        for field in req.headers.iter() {
            raw.fields.push((
                range_in(bytes, field.name.as_bytes()),
                range_in(bytes, field.value),
            ));
            let name = HeaderName::from_bytes(field.name.as_bytes()).ok()?;
            if not_plain(name.as_str().as_bytes()) {
                return None;
            }
            if name == http::header::CONNECTION && !field.value.eq_ignore_ascii_case(b"keep-alive")
            {
                return None;
            }
            let value = HeaderValue::from_bytes(field.value).ok()?;
            if name == http::header::HOST {
                if host.is_some() {
                    return None;
                }
                let text = value.to_str().ok()?;
                // `host[:port]` only (no userinfo, nothing a URI authority refuses): anything
                // else is Pingora's to refuse, as for every engine.
                if text.contains('@') || text.parse::<http::uri::Authority>().is_err() {
                    return None;
                }
                host = Some(text.to_owned());
            }
            headers.append(name, value);
        }
        Some(Self {
            method,
            uri,
            headers,
            host: host?,
            raw,
        })
    }

    /// The request head as sent upstream: the client's request line and fields in their
    /// order and case, minus every field an edit names, then the edits' values (the same
    /// [`HeaderEdit`]s the Pingora path applies). `bytes` is the head this was parsed from;
    /// `target` replaces the client's request target (path routing).
    pub fn upstream_head(
        &self,
        bytes: &[u8],
        target: Option<&str>,
        edits: &[HeaderEdit],
        out: &mut Vec<u8>,
    ) {
        let part = |range: &std::ops::Range<usize>| bytes.get(range.clone()).unwrap_or_default();
        out.clear();
        match target {
            Some(target) => {
                for piece in [self.method.as_str().as_bytes(), b" ", target.as_bytes()] {
                    out.extend_from_slice(piece);
                }
            }
            None => out.extend_from_slice(part(&self.raw.line)),
        }
        out.extend_from_slice(b" HTTP/1.1\r\n");
        let edited = |name: &[u8]| edits.iter().any(|e| e.edits(name));
        for (name, value) in &self.raw.fields {
            let name = part(name);
            if !edited(name) {
                framing::field(out, name, part(value));
            }
        }
        for edit in edits {
            if let HeaderEdit::Set(name, value) = edit {
                framing::field(out, name.as_str().as_bytes(), value);
            }
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// How an upstream response's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (`HEAD`, `204`, `304`).
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`, relayed as it comes.
    Chunked,
    /// Until the upstream closes (the client's connection then closes too).
    UntilClose,
}

/// What the upstream answered, as far as relaying it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// Length of the head in the buffer it was parsed from.
    pub len: usize,
    /// The status code.
    pub status: u16,
    /// How the body is delimited.
    pub framing: Framing,
    /// Whether the upstream connection may be used again after the body.
    pub reusable: bool,
    /// What its `Content-Length` fields say (relayed as one field of this value).
    pub content_length: Option<u64>,
}

/// Why an upstream response cannot be relayed (answered `502`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadResponse {
    /// Not HTTP, or more fields than this path reads.
    #[error("unparsable response head")]
    Unparsable,
    /// `101` to a request that asked no upgrade.
    #[error("unrequested protocol switch")]
    UnrequestedSwitch,
    /// `Content-Length` values that disagree or do not parse.
    #[error("invalid content-length")]
    ContentLength,
    /// The pod's nginx says nothing answered on the port (its marked 502 or 504).
    #[error("nothing answers on the pod's port")]
    PodRouter {
        /// Its 504: accepted but no answer in time.
        timed_out: bool,
    },
}

/// What the client's response head gets besides the upstream's fields.
#[derive(Debug, Clone, Copy)]
pub struct ClientEdits<'a> {
    /// Lowercase field names dropped (pod responses).
    pub strip: &'a [String],
    /// Sent as `x-request-id`.
    pub request_id: &'a str,
    /// Whether the client's connection closes after this response whatever its framing.
    pub close: bool,
    /// Fields of ours added to the final response (frame policy, a renewed token).
    pub add: &'a [(HeaderName, HeaderValue)],
    /// A granted cross-origin request's `Origin`, answered unless the upstream set its own
    /// `Access-Control-Allow-Origin`.
    pub cors_origin: Option<&'a HeaderValue>,
    /// The upstream is a pod's nginx: its own marked 502/504 are ours to answer
    /// ([`BadResponse::PodRouter`]).
    pub pod_router: bool,
    /// Path routing's prefix, put back on a `Location` that is a path on this host.
    pub location_prefix: Option<&'a str>,
    /// A pod's answer, confined to its host ([`crate::confine`]).
    pub confine: bool,
}

impl ResponseHead {
    /// Parses the head at the start of `buf` and writes the client's version of it to `out`
    /// (the upstream's status and fields, the hop's own dropped, our request id added);
    /// `Ok(None)` while the head is incomplete.
    ///
    /// # Errors
    /// [`BadResponse`] for a response that cannot be relayed safely.
    pub fn parse(
        buf: &[u8],
        head_request: bool,
        edits: &ClientEdits<'_>,
        out: &mut Vec<u8>,
    ) -> Result<Option<Self>, BadResponse> {
        let mut fields = [const { MaybeUninit::uninit() }; MAX_RESPONSE_HEADERS];
        let mut res = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut res,
            buf,
            &mut fields,
        ) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(BadResponse::Unparsable),
        };
        let status = res.code.ok_or(BadResponse::Unparsable)?;
        if status == 101 {
            return Err(BadResponse::UnrequestedSwitch);
        }
        if edits.pod_router && matches!(status, 502 | 504) {
            let marker = res
                .headers
                .iter()
                .find(|f| f.name.eq_ignore_ascii_case(POD_ROUTER_HEADER))
                .map(|f| f.value);
            if let Some(timed_out) = pod_router_failure(status, marker) {
                return Err(BadResponse::PodRouter { timed_out });
            }
        }
        let mut length: Option<u64> = None;
        let mut chunked = None;
        let mut close = res.version != Some(1);
        for field in res.headers.iter() {
            if field.name.eq_ignore_ascii_case("content-length") {
                let value = framing::content_length([field.value])
                    .ok()
                    .flatten()
                    .ok_or(BadResponse::ContentLength)?;
                if length.is_some_and(|l| l != value) {
                    return Err(BadResponse::ContentLength);
                }
                length = Some(value);
            } else if field.name.eq_ignore_ascii_case("transfer-encoding") {
                // The last coding decides (RFC 9112 6.3): chunked, or read until close.
                let last = field
                    .value
                    .rsplit(|b| *b == b',')
                    .next()
                    .unwrap_or_default();
                chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if field.name.eq_ignore_ascii_case("connection") {
                close |= field
                    .value
                    .split(|b| *b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
            }
        }
        let framing = if head_request || matches!(status, 100..=199 | 204 | 304) {
            Framing::Empty
        } else {
            match (chunked, length) {
                (Some(true), _) => Framing::Chunked,
                (Some(false), _) => Framing::UntilClose,
                (None, Some(n)) => Framing::Length(n),
                (None, None) => Framing::UntilClose,
            }
        };
        let head = Self {
            len,
            status,
            framing,
            reusable: !close && framing != Framing::UntilClose,
            content_length: length,
        };
        client_head(&head, res.reason.unwrap_or(""), res.headers, edits, out);
        Ok(Some(head))
    }
}

/// The response head for the client: the upstream's status and fields minus `edits.strip`,
/// the hop's own ([`framing::is_response_hop`]) and its `x-request-id`; `Content-Length` as one
/// field of the agreed value, or none beside `chunked`; then our request id, and
/// `connection: close` when the client's connection closes after this response (`edits.close`,
/// or a body that ends with the upstream's close). Informational heads get no additions.
fn client_head(
    head: &ResponseHead,
    reason: &str,
    fields: &[httparse::Header<'_>],
    edits: &ClientEdits<'_>,
    out: &mut Vec<u8>,
) {
    out.clear();
    framing::status_line(out, head.status, reason.as_bytes());
    let nominated = framing::nominated(
        fields
            .iter()
            .filter(|f| f.name.eq_ignore_ascii_case("connection"))
            .map(|f| f.value),
    );
    let mut length = (head.framing != Framing::Chunked)
        .then_some(head.content_length)
        .flatten();
    let mut cors_answered = false;
    for field in fields {
        let name = field.name;
        cors_answered |= name.eq_ignore_ascii_case("access-control-allow-origin");
        if name.eq_ignore_ascii_case("content-length") {
            // Once, as a plain number (`5, 5` is 5).
            if let Some(n) = length.take() {
                framing::field(
                    out,
                    name.as_bytes(),
                    itoa::Buffer::new().format(n).as_bytes(),
                );
            }
            continue;
        }
        let dropped = framing::is_response_hop(name.as_bytes(), &nominated, false)
            || name.eq_ignore_ascii_case(REQUEST_ID_HEADER)
            || name.eq_ignore_ascii_case(MARKER_HEADER)
            || edits.strip.iter().any(|s| s.eq_ignore_ascii_case(name));
        if dropped {
            continue;
        }
        if edits.confine {
            if name.eq_ignore_ascii_case("set-cookie") {
                match confine::set_cookie(field.value) {
                    Confined::Keep => framing::field(out, name.as_bytes(), field.value),
                    Confined::Rewritten(value) => framing::field(out, name.as_bytes(), &value),
                    Confined::Drop => {}
                }
                continue;
            }
            if name.eq_ignore_ascii_case(confine::SITE_WIDE) {
                continue;
            }
        }
        match edits
            .location_prefix
            .filter(|_| name.eq_ignore_ascii_case("location"))
        {
            Some(prefix) => match crate::path_routing::prefixed_location(prefix, field.value) {
                Some(location) => framing::field(out, name.as_bytes(), &location),
                None => framing::field(out, name.as_bytes(), field.value),
            },
            None => framing::field(out, name.as_bytes(), field.value),
        }
    }
    if head.status >= 200 {
        framing::field(
            out,
            REQUEST_ID_HEADER.as_bytes(),
            edits.request_id.as_bytes(),
        );
        for (name, value) in edits.add {
            framing::field(out, name.as_str().as_bytes(), value.as_bytes());
        }
        if let Some(origin) = edits.cors_origin.filter(|_| !cors_answered) {
            framing::field(out, b"access-control-allow-origin", origin.as_bytes());
            framing::field(out, b"access-control-allow-credentials", b"true");
            framing::field(out, b"vary", b"Origin");
        }
        if edits.close || head.framing == Framing::UntilClose {
            framing::field(out, b"connection", b"close");
        }
    }
    out.extend_from_slice(b"\r\n");
}

/// Where a chunked body ends, fed the bytes as they arrive (the bytes themselves are relayed
/// unchanged): chunk-size lines, data and its CRLF, the last chunk, trailer fields, the final
/// empty line.
#[derive(Debug, Default)]
pub struct ChunkedEnd {
    state: ChunkState,
    line: Vec<u8>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading a chunk-size line.
    #[default]
    Size,
    /// Inside a chunk's data: bytes left.
    Data(u64),
    /// The CRLF after a chunk's data: bytes of it left.
    DataEnd(u8),
    /// Reading trailer lines after the last chunk.
    Trailers,
    /// The body is complete.
    Done,
}

/// A chunked body that cannot be relayed (the client's connection is closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed chunked body")]
pub struct BadChunk;

impl ChunkedEnd {
    /// Takes the next bytes of the body. `Ok(Some(n))`: the body ends after the first `n` of
    /// them (anything behind is not part of it); `Ok(None)`: more is needed.
    ///
    /// # Errors
    /// [`BadChunk`] for a malformed size line, a missing CRLF or an over-long line.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Option<usize>, BadChunk> {
        let mut at = 0;
        while at < bytes.len() {
            let rest = bytes.get(at..).unwrap_or_default();
            match self.state {
                ChunkState::Done => return Ok(Some(at)),
                ChunkState::Data(left) => {
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(rest.len());
                    at += take;
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd(2)
                    } else {
                        ChunkState::Data(left)
                    };
                }
                ChunkState::DataEnd(left) => {
                    let expected: &[u8] = if left == 2 { b"\r\n" } else { b"\n" };
                    let n = usize::from(left).min(rest.len());
                    if rest.get(..n) != expected.get(..n) {
                        return Err(BadChunk);
                    }
                    at += n;
                    let left = left - n as u8;
                    self.state = if left == 0 {
                        ChunkState::Size
                    } else {
                        ChunkState::DataEnd(left)
                    };
                }
                ChunkState::Size | ChunkState::Trailers => {
                    let Some(newline) = rest.iter().position(|b| *b == b'\n') else {
                        self.push_line(rest)?;
                        return Ok(None);
                    };
                    self.push_line(rest.get(..=newline).unwrap_or_default())?;
                    at += newline + 1;
                    self.end_line()?;
                }
            }
        }
        Ok((self.state == ChunkState::Done).then_some(at))
    }

    fn push_line(&mut self, part: &[u8]) -> Result<(), BadChunk> {
        if self.line.len() + part.len() > MAX_CHUNK_LINE {
            return Err(BadChunk);
        }
        self.line.extend_from_slice(part);
        Ok(())
    }

    /// A whole line (with its LF) is in `self.line`.
    fn end_line(&mut self) -> Result<(), BadChunk> {
        let line = std::mem::take(&mut self.line);
        self.state = match self.state {
            ChunkState::Size => match httparse::parse_chunk_size(&line) {
                Ok(httparse::Status::Complete((_, 0))) => ChunkState::Trailers,
                Ok(httparse::Status::Complete((_, size))) => ChunkState::Data(size),
                _ => return Err(BadChunk),
            },
            ChunkState::Trailers if line == b"\r\n" => ChunkState::Done,
            ChunkState::Trailers if line.ends_with(b"\r\n") => ChunkState::Trailers,
            _ => return Err(BadChunk),
        };
        self.line = line;
        self.line.clear();
        Ok(())
    }
}

/// Which pooled connections a request may use: the upstream's address and a group within it
/// (`upstream::group_key` of the pod, as Pingora's pool keys its peers), so that pods that
/// ever share an address never share a connection.
pub type PoolKey = (SocketAddr, u64);

/// Idle keep-alive connections to upstreams, by [`PoolKey`], newest first out. Connections idle
/// longer than `idle_timeout` (below the pods' nginx keep-alive, so never one it is closing)
/// or found closed are dropped; the whole pool is swept at most once a second.
///
/// Ours rather than pingora-pool or hyper's client: the exchange reads and writes raw bytes on
/// the socket, with no per-request `Request`/`Response` objects, which is where the plain
/// engine's gain is made (`benches/load/instructions.sh`: a 1 KiB GET to a pod costs 28.8 k
/// instructions here, 69.6 k on Pingora's loop and pool).
#[derive(Debug)]
pub struct UpstreamPool {
    idle: Mutex<HashMap<PoolKey, Vec<(TcpStream, Instant)>>>,
    idle_timeout: Duration,
    started: Instant,
    /// Milliseconds after `started` of the last sweep.
    swept_ms: AtomicU64,
}

impl UpstreamPool {
    /// An empty pool.
    pub fn new(idle_timeout: Duration) -> Self {
        Self {
            idle: Mutex::new(HashMap::new()),
            idle_timeout,
            started: Instant::now(),
            swept_ms: AtomicU64::new(0),
        }
    }

    /// An idle connection for `key` that is still open, if any.
    pub fn take(&self, key: PoolKey) -> Option<TcpStream> {
        self.sweep();
        loop {
            let (stream, since) = self
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get_mut(&key)?
                .pop()?;
            if since.elapsed() < self.idle_timeout && still_open(&stream) {
                return Some(stream);
            }
        }
    }

    /// Keeps `stream` for the next request with `key`.
    pub fn give_back(&self, key: PoolKey, stream: TcpStream) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.entry(key).or_default();
        if list.len() >= IDLE_PER_UPSTREAM {
            list.remove(0);
        }
        list.push((stream, Instant::now()));
    }

    /// How many idle connections are kept (tests, metrics).
    pub fn idle_count(&self) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(Vec::len)
            .sum()
    }

    fn sweep(&self) {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let last = self.swept_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < 1000
            || self
                .swept_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.retain(|_, list| {
            list.retain(|(_, since)| since.elapsed() < self.idle_timeout);
            !list.is_empty()
        });
    }
}

/// Whether an idle connection is still open, without a system call unless the runtime saw it
/// become readable (an idle HTTP connection that is readable was closed or sent junk).
fn still_open(stream: &TcpStream) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    match stream.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        Poll::Ready(Ok(())) => matches!(
            stream.try_read(&mut [0u8; 1]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
        ),
    }
}

/// One request's trip upstream and back.
#[derive(Debug)]
pub struct Exchange<'a> {
    /// The upstream.
    pub addr: SocketAddr,
    /// Its group in the pool (see [`PoolKey`]).
    pub group: u64,
    /// The request head to send ([`PlainRequest::upstream_head`]).
    pub head: &'a [u8],
    /// Whether the request is `HEAD` (no response body whatever the fields say).
    pub head_request: bool,
    /// Lowercase response field names to drop.
    pub strip: &'a [String],
    /// The request id, sent back in `x-request-id`.
    pub request_id: &'a str,
    /// Whether the client's connection closes after this response (the server is stopping).
    pub close_client: bool,
    /// Fields of ours added to the response.
    pub add: &'a [(HeaderName, HeaderValue)],
    /// A granted cross-origin request's `Origin` (see [`ClientEdits::cors_origin`]).
    pub cors_origin: Option<&'a HeaderValue>,
    /// The upstream is a pod's nginx (see [`ClientEdits::pod_router`]).
    pub pod_router: bool,
    /// Path routing's prefix (see [`ClientEdits::location_prefix`]).
    pub location_prefix: Option<&'a str>,
    /// See [`ClientEdits::confine`].
    pub confine: bool,
    /// Connect to the upstream.
    pub connect_timeout: Duration,
    /// Each wait for the upstream.
    pub read_timeout: Duration,
    /// Each write to the client.
    pub write_timeout: Duration,
}

/// How an exchange ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchanged {
    /// The status sent to the client (0: none).
    pub status: u16,
    /// Response bytes after the head sent to the client.
    pub body_bytes: u64,
    /// Time from sending the request to the response head.
    pub upstream: Option<Duration>,
    /// Whether the client's connection may take another request.
    pub keep_client: bool,
    /// What went wrong, if anything.
    pub failure: Option<Failure>,
    /// Whether the failure was connecting (no connection to the upstream was made).
    pub connect_failed: bool,
}

/// What went wrong in an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The upstream refused the connection, or closed or reset it before answering.
    Refused,
    /// The upstream did not accept the connection or answer in time.
    TimedOut,
    /// The upstream's answer cannot be relayed.
    BadResponse,
    /// The upstream failed after its head was relayed: the client's connection is closed.
    BrokenBody,
    /// The client went away.
    ClientGone,
    /// The pod's nginx found nothing answering on the port (its marked 502 or 504).
    PortNotAnswering {
        /// Its 504.
        timed_out: bool,
    },
}

impl Failure {
    /// A short name for the access log's `error` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Refused => "upstream_refused",
            Self::TimedOut => "upstream_timeout",
            Self::BadResponse => "upstream_bad_response",
            Self::BrokenBody => "upstream_body_broken",
            Self::ClientGone => "client_gone",
            Self::PortNotAnswering { timed_out: false } => "port_not_listening",
            Self::PortNotAnswering { timed_out: true } => "port_timeout",
        }
    }

    /// Whether nothing was sent to the client yet, so the ingress answers instead.
    pub fn answerable(self) -> bool {
        matches!(
            self,
            Self::Refused | Self::TimedOut | Self::BadResponse | Self::PortNotAnswering { .. }
        )
    }
}

enum Attempt {
    /// The request could not be sent or no byte came back on a reused connection.
    Stale,
    Done(Exchanged),
}

/// Sends the request and relays the response to `client`. A pooled connection that turns out
/// closed before any byte of the answer is replaced by a new one once (`GET`/`HEAD` are safe
/// to repeat).
pub async fn exchange<C>(client: &mut C, pool: &UpstreamPool, ex: &Exchange<'_>) -> Exchanged
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    if let Some(pooled) = pool.take((ex.addr, ex.group))
        && let Attempt::Done(done) = attempt(client, pool, ex, pooled, true).await
    {
        return done;
    }
    let fresh = match tokio::time::timeout(ex.connect_timeout, TcpStream::connect(ex.addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(_)) => return connect_failed(Failure::Refused),
        Err(_) => return connect_failed(Failure::TimedOut),
    };
    let _ = fresh.set_nodelay(true);
    match attempt(client, pool, ex, fresh, false).await {
        Attempt::Done(done) => done,
        Attempt::Stale => failed(Failure::Refused),
    }
}

fn failed(failure: Failure) -> Exchanged {
    Exchanged {
        status: 0,
        body_bytes: 0,
        upstream: None,
        keep_client: false,
        failure: Some(failure),
        connect_failed: false,
    }
}

fn connect_failed(failure: Failure) -> Exchanged {
    Exchanged {
        connect_failed: true,
        ..failed(failure)
    }
}

async fn attempt<C>(
    client: &mut C,
    pool: &UpstreamPool,
    ex: &Exchange<'_>,
    mut upstream: TcpStream,
    reused: bool,
) -> Attempt
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let sent_at = Instant::now();
    match tokio::time::timeout(ex.read_timeout, upstream.write_all(ex.head)).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) if reused => return Attempt::Stale,
        Ok(Err(_)) => return Attempt::Done(failed(Failure::Refused)),
        Err(_) => return Attempt::Done(failed(Failure::TimedOut)),
    }
    let mut buf: Vec<u8> = Vec::with_capacity(8 * 1024);
    // The client's head, and the first body bytes when few (see `relay_body`).
    let mut out: Vec<u8> = Vec::with_capacity(COALESCE / 4);
    let mut upstream_time = None;
    let mut status = 0;
    let edits = ClientEdits {
        strip: ex.strip,
        request_id: ex.request_id,
        close: ex.close_client,
        add: ex.add,
        cors_origin: ex.cors_origin,
        pod_router: ex.pod_router,
        location_prefix: ex.location_prefix,
        confine: ex.confine,
    };
    // Informational answers (103) are passed on; the final head follows.
    let head = loop {
        let parsed = match ResponseHead::parse(&buf, ex.head_request, &edits, &mut out) {
            Ok(parsed) => parsed,
            Err(BadResponse::PodRouter { timed_out }) => {
                return Attempt::Done(failed(Failure::PortNotAnswering { timed_out }));
            }
            Err(_) => return Attempt::Done(failed(Failure::BadResponse)),
        };
        let Some(head) = parsed else {
            if buf.len() >= MAX_RESPONSE_HEAD {
                return Attempt::Done(failed(Failure::BadResponse));
            }
            buf.reserve(8 * 1024);
            match tokio::time::timeout(ex.read_timeout, upstream.read_buf(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => continue,
                Ok(_) if reused && buf.is_empty() && status == 0 => return Attempt::Stale,
                Ok(_) if status == 0 => return Attempt::Done(failed(Failure::Refused)),
                Ok(_) => return Attempt::Done(broken(status, 0)),
                Err(_) if status == 0 => return Attempt::Done(failed(Failure::TimedOut)),
                Err(_) => return Attempt::Done(broken(status, 0)),
            }
        };
        upstream_time.get_or_insert_with(|| sent_at.elapsed());
        status = head.status;
        if head.status >= 200 {
            // Written with the body's first bytes (one system call for a small response).
            break head;
        }
        if !write_client(client, &out, ex.write_timeout).await {
            return Attempt::Done(gone(status, 0));
        }
        buf.drain(..head.len);
    };
    let mut sent: u64 = 0;
    let body_start = head.len;
    let until_close = head.framing == Framing::UntilClose;
    let relayed = relay_body(
        client,
        &mut upstream,
        ex,
        &head,
        (&mut buf, body_start),
        &mut out,
        &mut sent,
    )
    .await;
    let done = match relayed {
        Ok(clean) => {
            let keep_client = !ex.close_client && !until_close;
            if clean && head.reusable {
                pool.give_back((ex.addr, ex.group), upstream);
            }
            Exchanged {
                status,
                body_bytes: sent,
                upstream: upstream_time,
                keep_client,
                failure: None,
                connect_failed: false,
            }
        }
        Err(failure) => Exchanged {
            status,
            body_bytes: sent,
            upstream: upstream_time,
            ..failed(failure)
        },
    };
    Attempt::Done(done)
}

fn broken(status: u16, body_bytes: u64) -> Exchanged {
    Exchanged {
        status,
        body_bytes,
        ..failed(Failure::BrokenBody)
    }
}

fn gone(status: u16, body_bytes: u64) -> Exchanged {
    Exchanged {
        status,
        body_bytes,
        ..failed(Failure::ClientGone)
    }
}

async fn write_client<C>(client: &mut C, bytes: &[u8], timeout: Duration) -> bool
where
    C: AsyncWrite + Unpin + ?Sized,
{
    matches!(
        tokio::time::timeout(timeout, async {
            client.write_all(bytes).await?;
            client.flush().await
        })
        .await,
        Ok(Ok(()))
    )
}

/// Relays the body that starts at `buf[start..]` and continues on `upstream`, after the
/// response head in `head_bytes` (sent with the first body bytes when they are few). `Ok(true)`:
/// the body ended exactly where its framing says (the upstream connection is reusable when its
/// head allows); `Ok(false)`: it ended, but bytes followed it.
async fn relay_body<C>(
    client: &mut C,
    upstream: &mut TcpStream,
    ex: &Exchange<'_>,
    head: &ResponseHead,
    (buf, start): (&mut Vec<u8>, usize),
    head_bytes: &mut Vec<u8>,
    sent: &mut u64,
) -> Result<bool, Failure>
where
    C: AsyncWrite + Unpin + ?Sized,
{
    let mut chunked = ChunkedEnd::default();
    let mut left = match head.framing {
        Framing::Empty => 0,
        Framing::Length(n) => n,
        Framing::Chunked | Framing::UntilClose => u64::MAX,
    };
    let mut offset = start;
    loop {
        let available = buf.get(offset..).unwrap_or_default();
        let (take, ended) = match head.framing {
            Framing::Empty | Framing::Length(_) => {
                let take = usize::try_from(left)
                    .unwrap_or(usize::MAX)
                    .min(available.len());
                left -= take as u64;
                (take, left == 0)
            }
            Framing::Chunked => match chunked.feed(available) {
                Ok(Some(end)) => (end, true),
                Ok(None) => (available.len(), false),
                // Malformed: a 502 of ours while nothing has gone out, else the client's
                // connection closes.
                Err(BadChunk) if head_bytes.is_empty() => return Err(Failure::BrokenBody),
                Err(BadChunk) => return Err(Failure::BadResponse),
            },
            Framing::UntilClose => (available.len(), false),
        };
        let piece = available.get(..take).unwrap_or_default();
        if !head_bytes.is_empty() && piece.len() <= COALESCE {
            head_bytes.extend_from_slice(piece);
            if !write_client(client, head_bytes, ex.write_timeout).await {
                return Err(Failure::ClientGone);
            }
            head_bytes.clear();
        } else {
            if !head_bytes.is_empty() {
                if !write_client(client, head_bytes, ex.write_timeout).await {
                    return Err(Failure::ClientGone);
                }
                head_bytes.clear();
            }
            if !piece.is_empty() && !write_client(client, piece, ex.write_timeout).await {
                return Err(Failure::ClientGone);
            }
        }
        *sent += piece.len() as u64;
        if ended {
            return Ok(offset + take == buf.len());
        }
        buf.clear();
        offset = 0;
        buf.reserve(BODY_READ);
        match tokio::time::timeout(ex.read_timeout, upstream.read_buf(buf)).await {
            Ok(Ok(0)) if head.framing == Framing::UntilClose => return Ok(false),
            Ok(Ok(n)) if n > 0 => {}
            _ => return Err(Failure::BrokenBody),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(head: &str) -> Option<PlainRequest> {
        PlainRequest::parse(head.as_bytes(), 16 * 1024)
    }

    #[test]
    fn only_whole_bodiless_http11_gets_and_heads_qualify() {
        let ok = parse("GET /a?b=1 HTTP/1.1\r\nHost: x.test\r\nCookie: c=1\r\n\r\n").unwrap();
        assert_eq!(ok.method, Method::GET);
        assert_eq!(ok.uri.path(), "/a");
        assert_eq!(ok.host, "x.test");
        assert!(parse("HEAD / HTTP/1.1\r\nHost: x\r\nConnection: Keep-Alive\r\n\r\n").is_some());
        for refused in [
            "GET / HTTP/1.1\r\nHost: x\r\n",                       // incomplete
            "GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\n", // pipelined
            "GET / HTTP/1.0\r\nHost: x\r\n\r\n",                   // HTTP/1.0
            "POST / HTTP/1.1\r\nHost: x\r\n\r\n",                  // method
            "GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n",           // absolute form
            "GET / HTTP/1.1\r\n\r\n",                              // no Host
            "GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",        // two Hosts
            "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", // body framing
            "GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: user@x\r\n\r\n", // userinfo
            "GET / HTTP/1.1\r\nHost: x y\r\n\r\n",    // not an authority
        ] {
            assert!(parse(refused).is_none(), "{refused:?}");
        }
        let big = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX: {}\r\n\r\n",
            "a".repeat(100)
        );
        assert!(PlainRequest::parse(big.as_bytes(), 64).is_none());
    }

    #[test]
    fn the_upstream_head_keeps_order_and_case_and_applies_every_edit() {
        let raw = b"GET /p?q HTTP/1.1\r\nHost: a.test\r\nX-Keep: 1\r\nCookie: s=1; t=2\r\nX-Forwarded-For: 6.6.6.6\r\nAccept: */*\r\n\r\n";
        let edits = vec![
            HeaderEdit::Set(http::header::HOST, b"pod.internal".to_vec()),
            HeaderEdit::Remove(http::header::COOKIE),
            HeaderEdit::Set(
                HeaderName::from_static("x-forwarded-for"),
                b"1.2.3.4".to_vec(),
            ),
        ];
        let mut out = Vec::new();
        PlainRequest::parse(raw, 16 * 1024)
            .unwrap()
            .upstream_head(raw, None, &edits, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /p?q HTTP/1.1\r\nX-Keep: 1\r\nAccept: */*\r\nhost: pod.internal\r\n\
             x-forwarded-for: 1.2.3.4\r\n\r\n"
        );
    }

    fn head(raw: &str, head_request: bool) -> Result<Option<ResponseHead>, BadResponse> {
        let edits = ClientEdits {
            strip: &[],
            request_id: "rid",
            close: false,
            add: &[],
            cors_origin: None,
            pod_router: true,
            location_prefix: None,
            confine: false,
        };
        ResponseHead::parse(raw.as_bytes(), head_request, &edits, &mut Vec::new())
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let framing = |raw: &str| head(raw, false).unwrap().unwrap().framing;
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
            Framing::Length(5)
        );
        assert_eq!(
            framing(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 5\r\n\r\n"
            ),
            Framing::Chunked
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"),
            Framing::UntilClose
        );
        assert_eq!(framing("HTTP/1.1 200 OK\r\n\r\n"), Framing::UntilClose);
        assert_eq!(
            framing("HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n"),
            Framing::Empty
        );
        assert_eq!(
            framing("HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"),
            Framing::Empty
        );
        let head_reply = head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true);
        assert_eq!(head_reply.unwrap().unwrap().framing, Framing::Empty);
        assert_eq!(head("HTTP/1.1 200 OK\r\nContent-Le", false), Ok(None));
        assert_eq!(
            head(
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                false
            ),
            Err(BadResponse::ContentLength)
        );
        for bad in ["-1", "+5", "5, 6", "5,", "0x5"] {
            assert_eq!(
                head(
                    &format!("HTTP/1.1 200 OK\r\nContent-Length: {bad}\r\n\r\n"),
                    false
                ),
                Err(BadResponse::ContentLength),
                "{bad}"
            );
        }
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n"),
            Framing::Length(5)
        );
        assert_eq!(
            head("HTTP/1.1 101 Switching\r\n\r\n", false),
            Err(BadResponse::UnrequestedSwitch)
        );
        assert_eq!(
            head("SSH-2.0-x\r\n\r\n", false),
            Err(BadResponse::Unparsable)
        );
        let reusable = |raw: &str| head(raw, false).unwrap().unwrap().reusable;
        assert!(reusable("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"));
        assert!(!reusable(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        ));
        assert!(!reusable("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"));
        assert!(!reusable("HTTP/1.1 200 OK\r\n\r\n"));
    }

    #[test]
    fn the_client_head_drops_hop_and_stripped_fields_and_adds_the_request_id() {
        let raw = "HTTP/1.1 200 OK\r\nServer: x\r\nConnection: keep-alive\r\nX-Frame-Options: DENY\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\nX-Request-Id: theirs\r\n\r\n";
        let strip = vec!["x-frame-options".to_owned()];
        let client = |close: bool, raw: &str| {
            let edits = ClientEdits {
                strip: &strip,
                request_id: "rid",
                close,
                add: &[],
                cors_origin: None,
                pod_router: true,
                location_prefix: None,
                confine: false,
            };
            let mut out = Vec::new();
            ResponseHead::parse(raw.as_bytes(), false, &edits, &mut out).unwrap();
            String::from_utf8(out).unwrap()
        };
        assert_eq!(
            client(true, raw),
            "HTTP/1.1 200 OK\r\nServer: x\r\nTransfer-Encoding: chunked\r\nx-request-id: rid\r\n\
             connection: close\r\n\r\n"
        );
        // A body that ends with the upstream's close ends the client's connection too.
        assert_eq!(
            client(false, "HTTP/1.1 200 Fine\r\nA: b\r\n\r\n"),
            "HTTP/1.1 200 Fine\r\nA: b\r\nx-request-id: rid\r\nconnection: close\r\n\r\n"
        );
        assert_eq!(
            client(false, "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"),
            "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        );
        // Fields the upstream's Connection nominates, and Keep-Alive, stay with that hop; a
        // repeated length goes out once, as a number.
        assert_eq!(
            client(
                false,
                "HTTP/1.1 200 OK\r\nConnection: X-Internal\r\nX-Internal: s\r\nKeep-Alive: timeout=5\r\n\
                 Content-Length: 2, 2\r\nContent-Length: 2\r\nX-App: a\r\n\r\n"
            ),
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-App: a\r\nx-request-id: rid\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn pooled_connections_serve_only_their_own_group_and_closed_ones_are_dropped() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pool = UpstreamPool::new(Duration::from_secs(60));
        let client = TcpStream::connect(addr).await.unwrap();
        let (server_side, _) = listener.accept().await.unwrap();
        pool.give_back((addr, 1), client);
        assert!(
            pool.take((addr, 2)).is_none(),
            "another pod at the same address"
        );
        let again = pool.take((addr, 1)).expect("its own group");
        pool.give_back((addr, 1), again);
        // The upstream closes the idle connection: it is not handed out again.
        drop(server_side);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(pool.take((addr, 1)).is_none());
        assert_eq!(pool.idle_count(), 0);
    }

    /// Feeds `body` split at every pair of points; the end must be found at `end` every time.
    fn ends_at(body: &[u8], end: usize) {
        for a in 0..=body.len() {
            for b in a..=body.len() {
                let mut tracker = ChunkedEnd::default();
                let mut found = None;
                let mut base = 0;
                for part in [&body[..a], &body[a..b], &body[b..]] {
                    if found.is_none()
                        && let Some(n) = tracker.feed(part).unwrap()
                    {
                        found = Some(base + n);
                    }
                    base += part.len();
                }
                assert_eq!(found, Some(end), "split at {a}, {b}");
            }
        }
    }

    #[test]
    fn a_chunked_body_ends_after_its_last_chunk_and_trailers_however_it_is_split() {
        let body = b"5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\n\r\n";
        ends_at(body, body.len());
        let with_trailer = b"3\r\nabc\r\n0\r\nX-Sum: 1\r\n\r\n";
        ends_at(with_trailer, with_trailer.len());
        let mut followed = with_trailer.to_vec();
        followed.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        ends_at(&followed, with_trailer.len());
        for bad in [&b"zz\r\n"[..], b"3\r\nabcX\r\n", b"0\r\nno-crlf\n"] {
            assert_eq!(ChunkedEnd::default().feed(bad), Err(BadChunk), "{bad:?}");
        }
        let long = vec![b'1'; MAX_CHUNK_LINE + 1];
        assert_eq!(ChunkedEnd::default().feed(&long), Err(BadChunk));
    }
}
