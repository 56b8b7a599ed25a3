//! HTTP/1.1 upgrade (WebSocket) tunnels, run here instead of by Pingora's proxy loop.
//!
//! Why, twice over:
//! - In Pingora 0.9.1, when the upstream's `101` is read before Pingora has handled the upgrade
//!   request's own (empty) body, the end of that body is taken for the end of the tunnel and
//!   the connection is closed right after the `101` (cloudflare/pingora#946; fixes proposed in
//!   #947 and #1016, not released). Fast upstreams (ttyd, code-server on the same host) hit it
//!   often.
//! - A tunnel run inside Pingora's request keeps the whole request alive for the tunnel's life:
//!   its futures, session and 64 KiB body buffer, about 60 KiB per idle WebSocket, against
//!   nginx's 18.
//!
//! So the request phase only [`open`]s the upstream side (a hyper HTTP/1.1 client connection,
//! which hands over bytes that arrived with the `101`, then taken back to the raw socket).
//! Nothing is written to the client until Pingora has finished the request and handed the
//! client's connection back to the connection gate (`connections::Takeover`); [`relay`] then
//! writes the `101` and copies bytes on the two raw sockets with one small buffer.
//!
//! Every wait is bounded: connect and response-head by the upstream timeouts, the tunnel by the
//! WebSocket idle timeout (silence both ways, and each write).

use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Body as _;
use hyper_util::rt::TokioIo;
use pingora::http::ResponseHeader;
use pingora::protocols::Stream;
use pingora::proxy::Session;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::config::Timeouts;
use crate::responses::{Answer, MARKER_HEADER, REQUEST_ID_HEADER, UpstreamFailure};
use crate::revocation::Registration;
use crate::telemetry::Metrics;
use crate::upstream::{HeaderEdit, Target};

/// What happened, for the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelReport {
    /// The status the upstream answered (101 when the tunnel was made).
    pub status: u16,
    /// Bytes from the client to the upstream after the upgrade.
    pub bytes_up: u64,
    /// Bytes from the upstream to the client after the upgrade (or the refusal's body).
    pub bytes_down: u64,
    /// Whether the tunnel ended by the idle timeout.
    pub idle_timeout: bool,
    /// Whether it was closed because the user lost access.
    pub revoked: bool,
}

/// What ends a tunnel besides its two sides.
#[derive(Debug)]
pub struct Watch<'a> {
    /// Silence both ways (and each write) for this long.
    pub idle: Duration,
    /// Resolves when the user loses access.
    pub revocation: Option<&'a mut Registration>,
    /// A WebSocket: a revocation sends the client a close frame (1008) first.
    pub websocket: bool,
    /// Where traffic is noted for the activity reports (at most once a second).
    pub activity: Option<&'a crate::control::Touch>,
}

/// The WebSocket close frame a revoked tunnel sends the client: unmasked (server to client),
/// status 1008 (policy violation), reason "access revoked" (RFC 6455 §5.5.1, §7.4.1).
pub const REVOKED_CLOSE_FRAME: &[u8] = b"\x88\x10\x03\xf0access revoked";

/// How the tunnel is set up.
#[derive(Debug, Clone, Copy)]
pub struct TunnelSpec<'a> {
    /// Where to.
    pub target: &'a Target,
    /// Request header edits (Host, Cookie, X-Forwarded-*, request id).
    pub edits: &'a [HeaderEdit],
    /// Response headers to drop (lowercase).
    pub strip_response_headers: &'a [String],
    /// A pod's answer, confined to its host ([`crate::confine`]).
    pub confine: bool,
    /// Fields of ours added to the response (a renewed proxy token, the frame policy).
    pub add: &'a [(http::HeaderName, http::HeaderValue)],
    /// The request target the upstream gets instead of the client's (path routing).
    pub request_target: Option<&'a str>,
    /// Timeouts.
    pub timeouts: &'a Timeouts,
    /// The request id.
    pub request_id: &'a str,
}

/// Counts a tunnel as open for as long as it lives (also when its task is cancelled).
struct OpenTunnel<'a>(&'a Metrics);

impl<'a> OpenTunnel<'a> {
    fn new(metrics: &'a Metrics) -> Self {
        metrics.tunnels(1);
        Self(metrics)
    }
}

impl Drop for OpenTunnel<'_> {
    fn drop(&mut self) {
        self.0.tunnels(-1);
    }
}

fn upstream_error(e: &hyper::Error) -> Answer {
    Answer::upstream(if e.is_timeout() {
        UpstreamFailure::TimedOut
    } else {
        UpstreamFailure::Refused
    })
}

async fn within<T>(limit: Duration, fut: impl Future<Output = T>) -> Result<T, Answer> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| Answer::upstream(UpstreamFailure::TimedOut))
}

/// Builds the upstream request from the client's, with the edits applied.
fn upstream_request(
    session: &Session,
    edits: &[HeaderEdit],
    target: Option<&str>,
) -> Result<hyper::Request<Empty<Bytes>>, Answer> {
    let req = session.req_header();
    let path = target.unwrap_or_else(|| req.uri.path_and_query().map_or("/", |p| p.as_str()));
    let mut builder = hyper::Request::builder()
        .method(req.method.clone())
        .uri(path)
        .version(http::Version::HTTP_11);
    let headers = builder.headers_mut().ok_or(Answer::Internal)?;
    for (name, value) in &req.headers {
        let edited = edits.iter().any(|e| e.edits(name.as_str().as_bytes()));
        if !edited && !crate::framing::is_request_hop(name.as_str().as_bytes()) {
            headers.append(name.clone(), value.clone());
        }
    }
    for edit in edits {
        if let HeaderEdit::Set(name, value) = edit {
            let value = http::HeaderValue::from_bytes(value).map_err(|_| Answer::BadRequest)?;
            headers.insert(name.clone(), value);
        }
    }
    builder.body(Empty::new()).map_err(|_| Answer::BadRequest)
}

fn response_header(
    response: &hyper::Response<hyper::body::Incoming>,
    strip: &[String],
    request_id: &str,
) -> pingora::Result<ResponseHeader> {
    let upgraded = response.status() == http::StatusCode::SWITCHING_PROTOCOLS;
    let mut header = ResponseHeader::build(
        response.status().as_u16(),
        Some(response.headers().len() + 1),
    )?;
    let nominated = crate::framing::nominated(
        response
            .headers()
            .get_all(http::header::CONNECTION)
            .iter()
            .map(http::HeaderValue::as_bytes),
    );
    for (name, value) in response.headers() {
        let name_str = name.as_str();
        let hop = crate::framing::is_response_hop(name_str.as_bytes(), &nominated, upgraded)
            || (name_str == "upgrade" && !upgraded);
        let ours = name_str == REQUEST_ID_HEADER || name_str == MARKER_HEADER;
        if hop || ours || strip.iter().any(|s| s == name_str) {
            continue;
        }
        header.append_header(name.clone(), value.clone())?;
    }
    header.insert_header(REQUEST_ID_HEADER, request_id)?;
    Ok(header)
}

/// How a tunnel's opening went, when the upstream answered.
#[derive(Debug)]
pub enum Opened {
    /// The upstream refused the upgrade; its answer was relayed to the client as it was.
    Refused(TunnelReport),
    /// The upstream switched protocols. Nothing has been written to the client yet: the `101`
    /// and the tunnel are run on the client's raw connection by [`relay`], once Pingora has
    /// handed the connection back (`connections::Takeover`).
    Upgraded(Upgraded),
}

/// An upstream connection that has switched protocols, waiting for its client.
#[derive(Debug)]
pub struct Upgraded {
    upstream: TcpStream,
    /// Bytes the upstream sent right behind its `101` (read along with the head).
    early_down: Bytes,
    /// The `101` head for the client, edited like every response head.
    head: Vec<u8>,
}

/// Serialises a response head (status line, fields, blank line) for a raw HTTP/1.1 write.
fn head_bytes(header: &ResponseHeader) -> Vec<u8> {
    crate::framing::response_head(
        header.status,
        header
            .headers
            .iter()
            .map(|(name, value)| (name.as_str().as_bytes(), value.as_bytes())),
    )
}

/// Opens the upstream side of a tunnel. An upstream that refuses the upgrade has its answer
/// relayed here; an accepted upgrade is returned for [`relay`], with nothing written to the
/// client yet.
///
/// # Errors
/// The upstream refused the connection, timed out or answered garbage before its response
/// head: nothing has been written to the client (the caller answers).
pub async fn open(session: &mut Session, spec: TunnelSpec<'_>) -> Result<Opened, Answer> {
    let timeouts = spec.timeouts;
    let addr = spec.target.addr();
    let stream = within(
        timeouts.upstream_connect,
        tokio::net::TcpStream::connect(addr),
    )
    .await?
    .map_err(|_| Answer::upstream(UpstreamFailure::Refused))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| upstream_error(&e))?;
    tokio::spawn(async move {
        let _ = connection.with_upgrades().await;
    });
    let request = upstream_request(session, spec.edits, spec.request_target)?;
    let response = within(timeouts.upstream_read, sender.send_request(request))
        .await?
        .map_err(|e| upstream_error(&e))?;
    let status = response.status().as_u16();
    let mut header = response_header(&response, spec.strip_response_headers, spec.request_id)
        .map_err(|_| Answer::upstream(UpstreamFailure::Refused))?;
    if spec.confine {
        crate::confine::apply(&mut header)
            .map_err(|_| Answer::upstream(UpstreamFailure::Refused))?;
    }
    for (name, value) in spec.add {
        header
            .append_header(name.clone(), value.clone())
            .map_err(|_| Answer::Internal)?;
    }

    if status != 101 {
        return Ok(Opened::Refused(
            relay_refusal(session, header, response, timeouts).await,
        ));
    }
    let upgraded = within(timeouts.upstream_read, hyper::upgrade::on(response))
        .await?
        .map_err(|e| upstream_error(&e))?;
    // Back to the raw socket: hyper's buffers and boxes are not kept for the tunnel's life.
    let parts = upgraded
        .downcast::<TokioIo<TcpStream>>()
        .map_err(|_| Answer::Internal)?;
    Ok(Opened::Upgraded(Upgraded {
        upstream: parts.io.into_inner(),
        early_down: Bytes::copy_from_slice(&parts.read_buf),
        head: head_bytes(&header),
    }))
}

/// Relays an upstream's refusal of an upgrade as an ordinary response.
async fn relay_refusal(
    session: &mut Session,
    header: ResponseHeader,
    response: hyper::Response<hyper::body::Incoming>,
    timeouts: &Timeouts,
) -> TunnelReport {
    let mut report = TunnelReport {
        status: header.status.as_u16(),
        bytes_up: 0,
        bytes_down: 0,
        idle_timeout: false,
        revoked: false,
    };
    let mut body = response.into_body();
    if session
        .write_response_header(Box::new(header), body.is_end_stream())
        .await
        .is_err()
    {
        return report;
    }
    while let Ok(Some(Ok(frame))) = tokio::time::timeout(timeouts.upstream_read, body.frame()).await
    {
        if let Ok(data) = frame.into_data() {
            report.bytes_down += data.len() as u64;
            if session
                .write_response_body(Some(data), false)
                .await
                .is_err()
            {
                return report;
            }
        }
    }
    let _ = session.write_response_body(None, true).await;
    report
}

/// The relay's one buffer. Small: idle tunnels (a silent VS Code tab) live for hours, and
/// while one waits nothing is buffered at all.
const RELAY_BUFFER: usize = 4 * 1024;

/// Runs an accepted tunnel on the client's raw connection: writes the `101` (and what the
/// upstream sent behind it), then what the client sent early, then copies both ways until the
/// upstream closes (a client that half-closes still gets what the upstream sends until then),
/// either side fails, or both are silent for `idle`. Every write is bounded by `idle` too.
pub async fn relay(
    client: &mut Stream,
    early_up: &[u8],
    upgraded: Upgraded,
    watch: Watch<'_>,
    metrics: &Metrics,
) -> TunnelReport {
    let Watch {
        idle,
        mut revocation,
        websocket,
        activity,
    } = watch;
    let Upgraded {
        mut upstream,
        early_down,
        head,
    } = upgraded;
    let mut report = TunnelReport {
        status: 101,
        bytes_up: 0,
        bytes_down: 0,
        idle_timeout: false,
        revoked: false,
    };
    let _open = OpenTunnel::new(metrics);
    let opened = tokio::time::timeout(idle, async {
        client.write_all(&head).await?;
        client.write_all(&early_down).await?;
        client.flush().await?;
        upstream.write_all(early_up).await
    })
    .await;
    if !matches!(opened, Ok(Ok(()))) {
        // The client went away (or stopped reading) before its 101.
        report.status = 0;
        return report;
    }
    report.bytes_down += early_down.len() as u64;
    report.bytes_up += early_up.len() as u64;
    drop((head, early_down));

    let mut buf = vec![0u8; RELAY_BUFFER];
    // Re-armed only when it fires (from the last activity), not on every message.
    let mut last_activity = tokio::time::Instant::now();
    // The request that opened the tunnel was noted already.
    let mut last_touch = last_activity;
    let silence = tokio::time::sleep(idle);
    tokio::pin!(silence);
    let mut upstream_first = false;
    // A client that has sent its FIN is done sending; the pod may still talk (a half-close,
    // RFC 9293 §3.6), and is relayed until it closes.
    let mut client_done = false;
    loop {
        // Both sides read into the one buffer by `poll_read`, which also tells tokio that a
        // socket is drained after a short read: waiting for readiness and then `try_read`
        // cost one more `recvfrom` (EAGAIN) per message. Sides take turns going first.
        upstream_first = !upstream_first;
        let read = std::future::poll_fn(|cx| {
            let mut read = ReadBuf::new(&mut buf);
            for from_upstream in [upstream_first, !upstream_first] {
                let polled = match from_upstream {
                    false if client_done => continue,
                    true => Pin::new(&mut upstream).poll_read(cx, &mut read),
                    false => Pin::new(&mut *client).poll_read(cx, &mut read),
                };
                if let Poll::Ready(result) = polled {
                    let n = result.map(|()| read.filled().len());
                    return Poll::Ready(if from_upstream {
                        Event::FromUpstream(n)
                    } else {
                        Event::FromClient(n)
                    });
                }
            }
            silence.as_mut().poll(cx).map(|()| Event::Silent)
        });
        let event = tokio::select! {
            biased;
            () = revoked(&mut revocation) => Event::Revoked,
            event = read => event,
        };
        let moved = match event {
            Event::Silent => {
                let quiet_until = last_activity + idle;
                if quiet_until > tokio::time::Instant::now() {
                    silence.as_mut().reset(quiet_until);
                    continue;
                }
                report.idle_timeout = true;
                break;
            }
            // The client is done sending (a half-close): the pod gets its FIN and may still
            // answer, which is relayed until it closes (or the tunnel idles out).
            Event::FromClient(Ok(0)) => {
                client_done = true;
                let _ = tokio::time::timeout(idle, upstream.shutdown()).await;
                true
            }
            // The pod is done: nobody is left to talk to (a WebSocket server closes after the
            // closing handshake), so the tunnel ends and the client gets its FIN below.
            Event::FromUpstream(Ok(0)) => break,
            Event::FromClient(Err(_)) | Event::FromUpstream(Err(_)) => break,
            Event::Revoked => {
                report.revoked = true;
                if websocket {
                    // Between two reads: a frame the pod sent may have been cut short, in which
                    // case the browser reports a protocol error instead of 1008; closed either way.
                    let _ = tokio::time::timeout(Duration::from_secs(1), async {
                        client.write_all(REVOKED_CLOSE_FRAME).await?;
                        client.flush().await
                    })
                    .await;
                }
                let _ = tokio::time::timeout(Duration::from_secs(1), upstream.shutdown()).await;
                break;
            }
            Event::FromClient(Ok(n)) => {
                let data = buf.get(..n).unwrap_or_default();
                let written = tokio::time::timeout(idle, upstream.write_all(data)).await;
                report.bytes_up += n as u64;
                matches!(written, Ok(Ok(())))
            }
            Event::FromUpstream(Ok(n)) => {
                let data = buf.get(..n).unwrap_or_default();
                let written = tokio::time::timeout(idle, async {
                    client.write_all(data).await?;
                    client.flush().await
                })
                .await;
                report.bytes_down += n as u64;
                matches!(written, Ok(Ok(())))
            }
        };
        if !moved {
            break;
        }
        let now = tokio::time::Instant::now();
        if let Some(touch) = activity
            && now.duration_since(last_touch) >= Duration::from_secs(1)
        {
            touch.touch();
            last_touch = now;
        }
        last_activity = now;
    }
    // A clean end for the client (TLS close_notify, then FIN), bounded.
    let _ = tokio::time::timeout(Duration::from_secs(1), client.shutdown()).await;
    report
}

/// What the relay saw: bytes from the client (counted in `bytes_up`), bytes from the upstream
/// (counted in `bytes_down`), or silence.
enum Event {
    FromClient(std::io::Result<usize>),
    FromUpstream(std::io::Result<usize>),
    Silent,
    Revoked,
}

/// Resolves when the tunnel's user loses access (never without a registration).
async fn revoked(revocation: &mut Option<&mut Registration>) {
    match revocation {
        Some(registration) => registration.revoked().await,
        None => std::future::pending().await,
    }
}
