//! The Pingora engine: Pingora's HTTP/1 and HTTP/2 loop carries every request the plain path
//! does not (bodies, HTTP/2, HTTP/1.0, odd framing) and opens WebSocket tunnels. It only
//! executes [`crate::policy`]'s verdict: `request_filter` asks for it, then answers or hands
//! the [`Plan`] to Pingora (`upstream_peer` and the filters only read it, so Pingora's retries
//! decide nothing again).

use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderName, header};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType};

use crate::access::{Ending, Record};
use crate::connections::{self, Takeover, TakeoverTask};
use crate::intent;
use crate::policy::{self, ConnInfo, InFlight, Plan, RequestView, Verdict};
use crate::proxy::Ingress;
use crate::responses::{
    Answer, MARKER_HEADER, POD_ROUTER_HEADER, REQUEST_ID_HEADER, UpstreamFailure,
    pod_router_failure,
};

/// The error types for a pod nginx's marked 502 and 504 (see [`pod_router_failure`]).
const PORT_NOT_LISTENING: &str = "port_not_listening";
const PORT_TIMEOUT: &str = "port_timeout";
use crate::revocation::Registration;
use crate::telemetry::{self, Metrics};
use crate::tunnel::{self, Opened, TunnelReport, TunnelSpec, Upgraded};
use crate::upstream::{self, HeaderEdit};

/// Per-request state, carried across Pingora's phases.
#[derive(Debug, Default)]
pub struct RequestCtx {
    /// The access record.
    record: Record,
    /// `request_filter` has judged the request (else the record is filled from the session
    /// when it is logged).
    judged: bool,
    /// The verdict to forward.
    plan: Option<Plan>,
    /// This request's place under `max_concurrent_requests`.
    in_flight: Option<InFlight>,
    /// A refused upgrade's report.
    tunnel: Option<TunnelReport>,
    /// A pod response's grant, registered for revocation while its body streams: the body ends
    /// at the first chunk after access is gone (Pingora offers no way to end an idle one).
    registration: Option<Registration>,
    /// An accepted upgrade waiting for Pingora to hand the connection back (see `logging` and
    /// `persist_connection_context`). A mutex only because Pingora lends the context shared.
    handover: Mutex<Option<Box<TunnelHandover>>>,
}

/// The `Host` header, or the `:authority` of an HTTP/2 request.
fn request_host(req: &RequestHeader) -> String {
    req.headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri.authority().map(|a| a.as_str().to_owned()))
        .unwrap_or_default()
}

fn conn_info(session: &Session) -> ConnInfo {
    ConnInfo {
        client: session.client_addr().and_then(|a| a.as_inet()).copied(),
        tls: session.digest().is_some_and(|d| d.ssl_digest.is_some()),
    }
}

/// The size of the request head as received (request line and header fields).
fn request_head_bytes(req: &RequestHeader) -> usize {
    // Request line: method, target, version and separators (no allocation on the hot path).
    let target = req.uri.path_and_query().map_or(1, |p| p.as_str().len())
        + req.uri.authority().map_or(0, |a| a.as_str().len());
    let line = req.method.as_str().len() + target + 12;
    req.headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum::<usize>()
        + line
}

impl Ingress {
    /// Writes an answer of ours and records it.
    async fn respond(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        answer: Answer,
    ) -> pingora::Result<bool> {
        let reply = answer.reply_for(&policy::page(&self.config(), &ctx.record));
        let header = reply.header(answer.name(), &ctx.record.request_id)?;
        ctx.record.answer = Some(answer.name());
        ctx.record.status = reply.status;
        let head = session.req_header().method == http::Method::HEAD;
        let no_body = reply.body.is_empty() || head;
        session
            .write_response_header(Box::new(header), no_body)
            .await?;
        if !no_body {
            session.write_response_body(Some(reply.body), true).await?;
        }
        Ok(true)
    }

    /// Hands the planned request to Pingora (`Ok(false)`), except HTTP/1.1 upgrades, which are
    /// tunnelled by us (see [`crate::tunnel`] for why): here the upstream side is opened; an
    /// accepted upgrade is handed to the connection gate, which writes the `101` and runs the
    /// tunnel once Pingora has finished this request.
    async fn proxy_or_tunnel(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        let Some(plan) = ctx.plan.as_ref().filter(|p| p.tunnel) else {
            return Ok(false);
        };
        if !connections::taken_over_by_gate(session) {
            // Every HTTP/1 connection of the ingress comes through the gate; this is a wiring
            // mistake, not a client's.
            tracing::error!(parent: &ctx.record.span, request_id = %ctx.record.request_id, "upgrade on a connection outside the connection gate");
            return self.respond(session, ctx, Answer::Internal).await;
        }
        let spec = TunnelSpec {
            target: &plan.target,
            edits: &plan.edits,
            strip_response_headers: plan.strip_response_headers(),
            confine: plan.confine(),
            add: &plan.add_response,
            request_target: plan.upstream_target.as_deref(),
            timeouts: plan.timeouts(),
            request_id: &ctx.record.request_id,
        };
        let websocket = session
            .req_header()
            .headers
            .get(header::UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
        let registration = plan
            .grant
            .as_ref()
            .map(|grant| self.revocations.register(grant.clone()));
        let idle = plan.timeouts().websocket_idle;
        let opened = tunnel::open(session, spec).await;
        match opened {
            Ok(Opened::Refused(report)) => {
                ctx.record.status = report.status;
                ctx.tunnel = Some(report);
                Ok(true)
            }
            Ok(Opened::Upgraded(upgraded)) => {
                // Pingora gives the connection back only if it would keep it alive.
                session.set_keepalive(Some(TAKEOVER_KEEPALIVE_SECS));
                session.set_keepalive_reuses_remaining(None);
                ctx.record.status = 101;
                *ctx.handover
                    .get_mut()
                    .unwrap_or_else(PoisonError::into_inner) = Some(Box::new(TunnelHandover {
                    upgraded: Some(upgraded),
                    idle,
                    metrics: self.metrics.clone(),
                    finished: None,
                    registration,
                    websocket,
                    activity: plan.activity.clone(),
                }));
                Ok(true)
            }
            Err(answer) => {
                ctx.record.connect_failed =
                    matches!(answer, Answer::UpstreamRefused | Answer::UpstreamTimeout);
                self.respond(session, ctx, answer).await
            }
        }
    }
}

/// Brings an HTTP/1 request head to the one form the rest reads: a `Content-Length` list of
/// one value (`3, 3`) becomes that value; an absolute-form target becomes its origin form
/// (Pingora keeps the authority off the URI and refuses one that differs from `Host`, so the
/// authority routes the request).
///
/// # Errors
/// 400 for an HTTP/1.1 request without `Host` (RFC 9112 §3.2), or a `Content-Length` that
/// cannot be relied on.
fn normalise_request(session: &mut Session) -> Result<(), Answer> {
    let req = session.req_header_mut();
    if req.version == http::Version::HTTP_2 {
        return Ok(());
    }
    if req.version == http::Version::HTTP_11 && !req.headers.contains_key(header::HOST) {
        return Err(Answer::BadRequest);
    }
    if !matches!(req.raw_path().first(), None | Some(b'/' | b'*')) {
        // Absolute form (its authority equals `Host`): upstreams get the origin form.
        let origin = req.uri.path_and_query().map_or("/", |p| p.as_str());
        let origin = http::Uri::try_from(origin).map_err(|_| Answer::BadRequest)?;
        req.set_uri(origin);
    }
    let lengths = req.headers.get_all(header::CONTENT_LENGTH);
    if lengths.iter().count() > 1 || lengths.iter().any(|v| v.as_bytes().contains(&b',')) {
        let length = crate::framing::content_length(lengths.iter().map(|v| v.as_bytes()))
            .map_err(|_| Answer::BadRequest)?;
        if let Some(n) = length {
            req.insert_header(header::CONTENT_LENGTH, n)
                .map_err(|_| Answer::BadRequest)?;
        }
    }
    Ok(())
}

/// An error the upstream caused (our answer: 502).
fn upstream_error(why: &'static str) -> Box<Error> {
    let mut e = Error::explain(ErrorType::InvalidHTTPHeader, why);
    e.esource = ErrorSource::Upstream;
    e
}

/// The upstream's response head as every engine relays it ([`crate::framing`]): the hop's own
/// fields dropped, `Content-Length` as one plain number (none beside `Transfer-Encoding`).
///
/// # Errors
/// An upstream error (502) for a `Content-Length` that cannot be relied on.
fn normalise_response(response: &mut ResponseHeader) -> pingora::Result<()> {
    let (hop, length, rewrite_length) = {
        let headers = &response.headers;
        let nominated = crate::framing::nominated(
            headers
                .get_all(header::CONNECTION)
                .iter()
                .map(http::HeaderValue::as_bytes),
        );
        let hop: Vec<HeaderName> = headers
            .keys()
            .filter(|n| crate::framing::is_response_hop(n.as_str().as_bytes(), &nominated, false))
            .cloned()
            .collect();
        let lengths = headers.get_all(header::CONTENT_LENGTH);
        let length = crate::framing::content_length(lengths.iter().map(|v| v.as_bytes()))
            .map_err(|_| upstream_error("invalid content-length"))?;
        // Rewritten only when not already one plain number (the common case costs nothing).
        let plain = lengths.iter().count() == 1
            && lengths
                .iter()
                .all(|v| v.as_bytes().iter().all(u8::is_ascii_digit));
        let chunked = headers.contains_key(header::TRANSFER_ENCODING);
        let rewrite = length.is_some() && (chunked || !plain);
        (hop, length.filter(|_| !chunked), rewrite)
    };
    for name in hop {
        response.remove_header(&name);
    }
    if rewrite_length {
        response.remove_header(&header::CONTENT_LENGTH);
        if let Some(n) = length {
            response.insert_header(header::CONTENT_LENGTH, n)?;
        }
    }
    Ok(())
}

/// Maps a proxying error to our answer; `None` when the client is gone.
fn answer_for_error(e: &Error) -> Option<Answer> {
    use ErrorType::*;
    Some(match (e.esource(), e.etype()) {
        (_, Custom(PORT_NOT_LISTENING)) => Answer::PortNotAnswering { timed_out: false },
        (_, Custom(PORT_TIMEOUT)) => Answer::PortNotAnswering { timed_out: true },
        (_, HTTPStatus(400)) => Answer::BadRequest,
        (_, HTTPStatus(code)) if *code >= 500 => Answer::Internal,
        (_, HTTPStatus(_)) => Answer::BadRequest,
        (ErrorSource::Upstream, ConnectTimedout | ReadTimedout | WriteTimedout) => {
            Answer::upstream(UpstreamFailure::TimedOut)
        }
        (ErrorSource::Upstream, _) => Answer::upstream(UpstreamFailure::Refused),
        (ErrorSource::Downstream, WriteError | ReadError | ConnectionClosed) => return None,
        (ErrorSource::Downstream, _) => Answer::BadRequest,
        (ErrorSource::Internal | ErrorSource::Unset, ConnectTimedout) => {
            Answer::upstream(UpstreamFailure::TimedOut)
        }
        (ErrorSource::Internal | ErrorSource::Unset, ConnectRefused | ConnectNoRoute) => {
            Answer::upstream(UpstreamFailure::Refused)
        }
        (ErrorSource::Internal | ErrorSource::Unset, _) => Answer::Internal,
    })
}

#[async_trait]
impl ProxyHttp for Ingress {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::default()
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        connections::head_read(session);
        let malformed = normalise_request(session).err();
        let req = session.req_header();
        if !intent::classify(&req.method, &req.headers).upgrade
            && req.headers.contains_key(header::UPGRADE)
        {
            // `Upgrade` without `Connection: upgrade` asks for nothing (RFC 9110 §7.8): a
            // plain request, never a tunnel run by Pingora's loop.
            session.req_header_mut().remove_header(&header::UPGRADE);
        }
        let req = session.req_header();
        let host = request_host(req);
        let view = RequestView {
            method: &req.method,
            uri: &req.uri,
            headers: &req.headers,
            host: &host,
            head_bytes: request_head_bytes(req),
            http2: session.is_http2(),
            malformed,
        };
        let judgement = self.decide(&view, conn_info(session)).await;
        ctx.record = judgement.record;
        ctx.in_flight = judgement.in_flight;
        ctx.judged = true;
        let timeouts = &self.config().timeouts;
        session.set_read_timeout(Some(if ctx.record.intent.upgrade {
            timeouts.websocket_idle
        } else {
            timeouts.client_read
        }));
        match judgement.verdict {
            Verdict::Answer(answer) => self.respond(session, ctx, answer).await,
            Verdict::Forward(plan) => {
                ctx.plan = Some(plan);
                self.proxy_or_tunnel(session, ctx).await
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        let Some(plan) = &ctx.plan else {
            return Err(Error::explain(
                ErrorType::InternalError,
                "no upstream decided for this request",
            ));
        };
        Ok(Box::new(upstream::peer(
            &plan.target,
            plan.timeouts(),
            ctx.record.intent.upgrade,
        )))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        ctx.record.upstream_started = Some(Instant::now());
        let Some(plan) = &ctx.plan else {
            return Ok(());
        };
        if let Some(target) = &plan.upstream_target {
            let uri = http::Uri::try_from(target.as_str())
                .map_err(|_| Error::explain(ErrorType::InternalError, "bad upstream target"))?;
            upstream_request.set_uri(uri);
        }
        for edit in &plan.edits {
            match edit {
                HeaderEdit::Set(name, value) => {
                    upstream_request.insert_header(name.clone(), value.as_slice())?;
                }
                HeaderEdit::Remove(name) => {
                    upstream_request.remove_header(name);
                }
                HeaderEdit::RemoveSpoofable => {
                    let spoofed: Vec<HeaderName> = upstream_request
                        .headers
                        .keys()
                        .filter(|n| upstream::is_spoofable(n.as_str().as_bytes()))
                        .cloned()
                        .collect();
                    for name in spoofed {
                        upstream_request.remove_header(&name);
                    }
                }
            }
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        if ctx.record.upstream_duration.is_none() {
            ctx.record.upstream_duration = ctx.record.upstream_started.map(|t| t.elapsed());
        }
        // A switch nobody asked for (upgrades are tunnelled by us, never here): 502, as on the
        // plain path, not a raw relay.
        if upstream_response.status == http::StatusCode::SWITCHING_PROTOCOLS {
            return Err(upstream_error("unrequested protocol switch"));
        }
        if ctx
            .plan
            .as_ref()
            .is_some_and(|p| matches!(p.target, upstream::Target::Pod { .. }))
            && let Some(timed_out) = pod_router_failure(
                upstream_response.status.as_u16(),
                upstream_response
                    .headers
                    .get(POD_ROUTER_HEADER)
                    .map(http::HeaderValue::as_bytes),
            )
        {
            let mut e = Error::explain(
                ErrorType::Custom(if timed_out {
                    PORT_TIMEOUT
                } else {
                    PORT_NOT_LISTENING
                }),
                "the pod's nginx found nothing answering on the port",
            );
            e.esource = ErrorSource::Upstream;
            return Err(e);
        }
        normalise_response(upstream_response)
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        e: Box<Error>,
    ) -> Box<Error> {
        ctx.record.connect_failed = true;
        e
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        if let Some(plan) = &ctx.plan {
            for name in plan.strip_response_headers() {
                upstream_response.remove_header(name.as_str());
            }
            if plan.confine() {
                crate::confine::apply(upstream_response)?;
            }
            for (name, value) in &plan.add_response {
                upstream_response.append_header(name.clone(), value.clone())?;
            }
            if let Some(prefix) = &plan.location_prefix
                && let Some(location) = upstream_response
                    .headers
                    .get(header::LOCATION)
                    .and_then(|l| crate::path_routing::prefixed_location(prefix, l.as_bytes()))
            {
                let value = http::HeaderValue::from_bytes(&location)
                    .map_err(|_| upstream_error("unusable location"))?;
                upstream_response.insert_header(header::LOCATION, value)?;
            }
            if let Some(origin) = &plan.cors_origin
                && !upstream_response
                    .headers
                    .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN)
            {
                upstream_response
                    .insert_header(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone())?;
                upstream_response
                    .insert_header(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, "true")?;
                upstream_response.append_header(header::VARY, "Origin")?;
            }
            if let Some(grant) = &plan.grant {
                ctx.registration = Some(self.revocations.register(grant.clone()));
            }
        }
        // Only the ingress marks its own answers (looked up first: Pingora's removal also
        // rebuilds its case map).
        if upstream_response.headers.contains_key(MARKER_HEADER) {
            upstream_response.remove_header(MARKER_HEADER);
        }
        upstream_response.insert_header(REQUEST_ID_HEADER, ctx.record.request_id.as_str())?;
        ctx.record.status = upstream_response.status.as_u16();
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        _body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Option<std::time::Duration>> {
        if ctx
            .registration
            .as_ref()
            .is_some_and(Registration::is_revoked)
        {
            ctx.registration = None;
            self.metrics.revoked("stream");
            return Err(Error::explain(
                ErrorType::Custom("access_revoked"),
                "access revoked while the response streamed",
            ));
        }
        Ok(None)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        if ctx.record.request_id.is_empty() {
            ctx.record.request_id = self.ids.next_id();
        }
        let Some(answer) = answer_for_error(e) else {
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        };
        let reply = answer.reply_for(&policy::page(&self.config(), &ctx.record));
        ctx.record.answer = Some(answer.name());
        ctx.record.status = reply.status;
        let body: Bytes = reply.body.clone();
        match reply.header(answer.name(), &ctx.record.request_id) {
            Ok(header) => {
                if let Err(write_error) = session
                    .as_downstream_mut()
                    .write_error_response(header, body)
                    .await
                {
                    tracing::debug!(parent: &ctx.record.span, request_id = %ctx.record.request_id, error = %write_error, "could not send the error response");
                }
            }
            Err(build_error) => {
                tracing::error!(parent: &ctx.record.span, request_id = %ctx.record.request_id, error = %build_error, "could not build the error response");
            }
        }
        FailToProxy {
            error_code: reply.status,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        connections::request_done(session);
        if !ctx.judged {
            // Pingora could not read the request (or refused it) before `request_filter`.
            let req = session.req_header();
            ctx.record.client = conn_info(session).client;
            ctx.record.method = req.method.clone();
            ctx.record.uri = req.uri.clone();
            ctx.record.host = request_host(req);
        }
        let slot = ctx
            .handover
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(handover) = slot.as_mut() {
            // An accepted upgrade: logged and counted when its tunnel ends.
            handover.finished = Some((std::mem::take(&mut ctx.record), ctx.in_flight.take()));
            return;
        }
        ctx.in_flight = None;
        ctx.registration = None;
        let status = session
            .response_written()
            .map_or(ctx.record.status, |r| r.status.as_u16());
        let (bytes_in, bytes_out) = ctx.tunnel.map_or(
            (
                session.body_bytes_read() as u64,
                session.body_bytes_sent() as u64,
            ),
            |t| (t.bytes_up, t.bytes_down),
        );
        ctx.record.finish(
            &self.metrics,
            &Ending {
                status,
                bytes_in,
                bytes_out,
                upgraded: session.was_upgraded(),
                idle_timeout: false,
                error: e.map_or("", |e| e.etype().as_str()),
            },
        );
    }

    /// An upstream that refuses, times out or breaks off is an ordinary event: the access line
    /// records it (status 502/504, `error`), and a WARN names it here instead of Pingora's
    /// ERROR line. Everything else keeps Pingora's line.
    fn suppress_error_log(&self, session: &Session, ctx: &RequestCtx, error: &Error) -> bool {
        if *error.esource() != ErrorSource::Upstream {
            return false;
        }
        tracing::warn!(
            parent: &ctx.record.span,
            request_id = %ctx.record.request_id,
            error = %error.etype().as_str(),
            request = %self.request_summary(session, ctx),
            "upstream failed"
        );
        true
    }

    /// What Pingora's own error lines name the request by: its method, its target with
    /// credential-like query values redacted as in the access log, its host and request id
    /// (Pingora's default prints the raw target, `?token=` included).
    fn request_summary(&self, session: &Session, ctx: &RequestCtx) -> String {
        let req = session.req_header();
        format!(
            "{} {}, Host: {}, request_id: {}",
            req.method,
            telemetry::loggable_target(req.uri.path(), req.uri.query()),
            ctx.record.host,
            ctx.record.request_id
        )
    }

    fn persist_connection_context(
        &self,
        _session: &Session,
        ctx: &RequestCtx,
    ) -> Option<Box<dyn std::any::Any + Send + Sync>> {
        let handover = ctx
            .handover
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()?;
        Some(Box::new(Takeover(handover)))
    }
}

/// The keep-alive a handed-over connection is given so that Pingora returns it (no request
/// follows on it: the tunnel ends the connection).
const TAKEOVER_KEEPALIVE_SECS: u64 = 60;

/// An accepted upgrade on its way to the connection gate, with its record for the access log.
#[derive(Debug)]
pub struct TunnelHandover {
    upgraded: Option<Upgraded>,
    idle: std::time::Duration,
    metrics: Metrics,
    /// Set by `logging`: the request, logged when the tunnel ends, and its place under
    /// `max_concurrent_requests`, held as long as the tunnel runs.
    finished: Option<(Record, Option<InFlight>)>,
    /// The tunnel's grant, registered for revocation (pod tunnels).
    registration: Option<Registration>,
    /// A WebSocket (a revocation sends a close frame first).
    websocket: bool,
    /// Where its traffic is noted for the activity reports.
    activity: Option<crate::control::Touch>,
}

impl TunnelHandover {
    fn finish(
        metrics: &Metrics,
        finished: Option<(Record, Option<InFlight>)>,
        report: TunnelReport,
        error: &str,
    ) {
        let Some((mut record, in_flight)) = finished else {
            return;
        };
        record.status = report.status;
        drop(in_flight);
        record.finish(
            metrics,
            &Ending {
                status: report.status,
                bytes_in: report.bytes_up,
                bytes_out: report.bytes_down,
                upgraded: report.status == 101,
                idle_timeout: report.idle_timeout,
                error,
            },
        );
    }
}

impl TakeoverTask for TunnelHandover {
    fn run(
        mut self: Box<Self>,
        mut client: pingora::protocols::Stream,
        early: Vec<u8>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        let upgraded = self.upgraded.take();
        let finished = self.finished.take();
        let mut registration = self.registration.take();
        let metrics = self.metrics.clone();
        let idle = self.idle;
        let websocket = self.websocket;
        let activity = self.activity.take();
        Box::pin(async move {
            let Some(upgraded) = upgraded else {
                return;
            };
            let watch = tunnel::Watch {
                idle,
                revocation: registration.as_mut(),
                websocket,
                activity: activity.as_ref(),
            };
            let report = tunnel::relay(&mut client, &early, upgraded, watch, &metrics).await;
            let error = if report.revoked {
                metrics.revoked("tunnel");
                "access_revoked"
            } else {
                ""
            };
            Self::finish(&metrics, finished, report, error);
        })
    }
}

impl Drop for TunnelHandover {
    fn drop(&mut self) {
        if self.upgraded.take().is_none() {
            return;
        }
        // Pingora did not give the connection back: the client sent bytes before the `101`
        // (which WebSocket clients must not do) or went away. The upstream side closes here.
        let request_id = self
            .finished
            .as_ref()
            .map_or("", |(record, _)| record.request_id.as_str());
        tracing::warn!(
            request_id,
            "upgrade accepted upstream but the client connection was not handed over; closed"
        );
        let report = TunnelReport {
            status: 0,
            bytes_up: 0,
            bytes_down: 0,
            idle_timeout: false,
            revoked: false,
        };
        Self::finish(
            &self.metrics,
            self.finished.take(),
            report,
            "handover_failed",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_the_issue_statuses() {
        let upstream = |etype| {
            let mut e = Error::new(etype);
            e.esource = ErrorSource::Upstream;
            answer_for_error(&e).map(|a| a.status())
        };
        assert_eq!(upstream(ErrorType::ConnectRefused), Some(502));
        assert_eq!(upstream(ErrorType::ConnectTimedout), Some(504));
        assert_eq!(upstream(ErrorType::ReadTimedout), Some(504));
        assert_eq!(upstream(ErrorType::ConnectionClosed), Some(502));
        let mut gone = Error::new(ErrorType::ConnectionClosed);
        gone.esource = ErrorSource::Downstream;
        assert_eq!(answer_for_error(&gone), None);
        let mut bad = Error::new(ErrorType::InvalidHTTPHeader);
        bad.esource = ErrorSource::Downstream;
        assert_eq!(answer_for_error(&bad).map(|a| a.status()), Some(400));
        let internal = Error::new(ErrorType::InternalError);
        assert_eq!(answer_for_error(&internal).map(|a| a.status()), Some(500));
    }
}
