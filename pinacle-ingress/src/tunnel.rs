//! HTTP/1.1 upgrade (WebSocket) tunnels, run here instead of by Pingora's proxy loop.
//!
//! Why: in Pingora 0.9.1, when the upstream's `101` is read before Pingora has handled the
//! upgrade request's own (empty) body, the end of that body is taken for the end of the tunnel
//! and the connection is closed right after the `101` (cloudflare/pingora#946; fixes proposed
//! in #947 and #1016, not released). Fast upstreams (ttyd, code-server on the same host) hit it
//! often. Here the upstream leg is a hyper HTTP/1.1 client connection (which hands over bytes
//! that arrived with the `101`), and the downstream leg is Pingora's own session, which switches
//! to raw mode when we write the `101`. Remove this module once a Pingora release has the fix.
//!
//! Every wait is bounded: connect and response-head by the upstream timeouts, the tunnel by the
//! WebSocket idle timeout (in both directions).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Body as _;
use hyper_util::rt::TokioIo;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::Timeouts;
use crate::responses::{Answer, REQUEST_ID_HEADER};
use crate::telemetry::Metrics;
use crate::upstream::{HeaderEdit, Target};

/// Request fields that describe this hop only (the upgrade pair is kept).
const HOP_BY_HOP: &[&str] = &[
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "content-length",
];

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
}

/// How the tunnel is set up.
#[derive(Debug, Clone, Copy)]
pub struct TunnelSpec<'a> {
    /// Where to.
    pub target: &'a Target,
    /// Request header edits (Host, Cookie, X-Forwarded-*, request id).
    pub edits: &'a [HeaderEdit],
    /// Response headers to drop (lowercase).
    pub strip_response_headers: &'a [String],
    /// Timeouts.
    pub timeouts: &'a Timeouts,
    /// The request id.
    pub request_id: &'a str,
    /// Where open tunnels are counted.
    pub metrics: &'a Metrics,
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
    if e.is_timeout() {
        Answer::UpstreamTimeout
    } else {
        Answer::UpstreamRefused
    }
}

async fn within<T>(limit: Duration, fut: impl Future<Output = T>) -> Result<T, Answer> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| Answer::UpstreamTimeout)
}

/// Builds the upstream request from the client's, with the edits applied.
fn upstream_request(
    session: &Session,
    edits: &[HeaderEdit],
) -> Result<hyper::Request<Empty<Bytes>>, Answer> {
    let req = session.req_header();
    let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut builder = hyper::Request::builder()
        .method(req.method.clone())
        .uri(path)
        .version(http::Version::HTTP_11);
    let headers = builder.headers_mut().ok_or(Answer::Internal)?;
    for (name, value) in &req.headers {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            headers.append(name.clone(), value.clone());
        }
    }
    for edit in edits {
        match edit {
            HeaderEdit::Set(name, value) => {
                let value = http::HeaderValue::from_str(value).map_err(|_| Answer::BadRequest)?;
                headers.insert(name.clone(), value);
            }
            HeaderEdit::Remove(name) => {
                headers.remove(name);
            }
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
    for (name, value) in response.headers() {
        let name_str = name.as_str();
        let hop = matches!(name_str, "connection" | "keep-alive" | "upgrade") && !upgraded;
        if hop || strip.iter().any(|s| s == name_str) {
            continue;
        }
        header.append_header(name.clone(), value.clone())?;
    }
    header.insert_header(REQUEST_ID_HEADER, request_id)?;
    Ok(header)
}

enum Event {
    Down(pingora::Result<Option<Bytes>>),
    Up(std::io::Result<usize>),
}

/// Runs the tunnel to the end. `Err(answer)` when nothing has been written to the client yet
/// (the caller answers); once the upstream's head has been relayed, failures only end the
/// tunnel.
///
/// # Errors
/// The upstream refused, timed out or answered garbage before its response head.
pub async fn run(session: &mut Session, spec: TunnelSpec<'_>) -> Result<TunnelReport, Answer> {
    let timeouts = spec.timeouts;
    let addr = spec.target.addr();
    let stream = within(
        timeouts.upstream_connect,
        tokio::net::TcpStream::connect(addr),
    )
    .await?
    .map_err(|_| Answer::UpstreamRefused)?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| upstream_error(&e))?;
    tokio::spawn(async move {
        let _ = connection.with_upgrades().await;
    });
    let request = upstream_request(session, spec.edits)?;
    let response = within(timeouts.upstream_read, sender.send_request(request))
        .await?
        .map_err(|e| upstream_error(&e))?;
    let status = response.status().as_u16();
    let header = response_header(&response, spec.strip_response_headers, spec.request_id)
        .map_err(|_| Answer::UpstreamRefused)?;

    if status != 101 {
        // The upstream refused the upgrade: relay its answer as an ordinary response.
        let mut report = TunnelReport {
            status,
            bytes_up: 0,
            bytes_down: 0,
            idle_timeout: false,
        };
        let mut body = response.into_body();
        if session
            .write_response_header(Box::new(header), body.is_end_stream())
            .await
            .is_err()
        {
            return Ok(report);
        }
        while let Ok(Some(Ok(frame))) =
            tokio::time::timeout(timeouts.upstream_read, body.frame()).await
        {
            if let Ok(data) = frame.into_data() {
                report.bytes_down += data.len() as u64;
                if session
                    .write_response_body(Some(data), false)
                    .await
                    .is_err()
                {
                    return Ok(report);
                }
            }
        }
        let _ = session.write_response_body(None, true).await;
        return Ok(report);
    }

    let upgraded = within(timeouts.upstream_read, hyper::upgrade::on(response))
        .await?
        .map_err(|e| upstream_error(&e))?;
    let mut report = TunnelReport {
        status,
        bytes_up: 0,
        bytes_down: 0,
        idle_timeout: false,
    };
    if session
        .write_response_header(Box::new(header), false)
        .await
        .is_err()
    {
        return Ok(report);
    }
    let _open = OpenTunnel::new(spec.metrics);
    let mut upstream = TokioIo::new(upgraded);
    // Small: idle tunnels (a silent VS Code tab) hold this buffer for hours.
    let mut buf = vec![0u8; 4 * 1024];
    loop {
        let event = tokio::time::timeout(timeouts.websocket_idle, async {
            tokio::select! {
                down = session.read_request_body() => Event::Down(down),
                up = upstream.read(&mut buf) => Event::Up(up),
            }
        })
        .await;
        match event {
            Err(_) => {
                report.idle_timeout = true;
                break;
            }
            Ok(Event::Down(Ok(Some(bytes)))) => {
                report.bytes_up += bytes.len() as u64;
                if upstream.write_all(&bytes).await.is_err() {
                    break;
                }
            }
            Ok(Event::Down(_)) => {
                let _ = upstream.shutdown().await;
                break;
            }
            Ok(Event::Up(Ok(0) | Err(_))) => break,
            Ok(Event::Up(Ok(n))) => {
                report.bytes_down += n as u64;
                let data = Bytes::copy_from_slice(buf.get(..n).unwrap_or_default());
                if session
                    .write_response_body(Some(data), false)
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    let _ = session.write_response_body(None, true).await;
    Ok(report)
}
