//! The Pingora `ProxyHttp` implementation: orchestration only. Each phase calls the pure parts
//! (host routing, intent, credentials, the callback, upstream choice, responses) and keeps what
//! it learnt in the per-request [`RequestCtx`].
//!
//! `request_filter` decides everything (route, credentials, authorization, target) so that
//! `upstream_peer`, which Pingora calls again on retries, only reads the decision.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use http::header;
use pinacle_authz::{
    Authorizer, CredentialVerifier, Decision, DirectoryError, Outcome, Principal, UserId,
    Verification,
};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType};

use crate::callback::{self, CALLBACK_PATH, CallbackQuery};
use crate::config::IngressConfig;
use crate::connections;
use crate::host::{self, PodHost, Route};
use crate::intent::{self, Intent};
use crate::request_id::RequestIds;
use crate::responses::{Answer, REQUEST_ID_HEADER};
use crate::telemetry::{self, FinishedRequest, Metrics};
use crate::tunnel::{self, TunnelSpec};
use crate::upstream::{self, Forwarding, HeaderEdit, Target};

/// Unix seconds now (the credential clock).
pub type Clock = fn() -> i64;

/// The shared state of the proxy.
pub struct Ingress {
    config: Arc<IngressConfig>,
    verifier: CredentialVerifier,
    authorizer: Arc<Authorizer>,
    ids: RequestIds,
    clock: Clock,
    metrics: Metrics,
    in_flight: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for Ingress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingress")
            .field("listen", &self.config.listen)
            .finish_non_exhaustive()
    }
}

impl Ingress {
    /// Wires the parts together.
    pub fn new(
        config: Arc<IngressConfig>,
        verifier: CredentialVerifier,
        authorizer: Arc<Authorizer>,
        clock: Clock,
        metrics: Metrics,
    ) -> Self {
        Self {
            config,
            verifier,
            authorizer,
            ids: RequestIds::new(),
            clock,
            metrics,
            in_flight: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

/// What kind of request this turned out to be (logs and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RouteKind {
    /// Not yet routed (the request could not be read).
    #[default]
    Unrouted,
    /// To the dashboard.
    Dashboard,
    /// To a pod (or refused on a pod host).
    Pod,
    /// The proxy-token callback.
    Callback,
}

impl RouteKind {
    /// Stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unrouted => "unrouted",
            Self::Dashboard => "dashboard",
            Self::Pod => "pod",
            Self::Callback => "callback",
        }
    }
}

/// Per-request state, carried across Pingora's phases.
#[derive(Debug)]
pub struct RequestCtx {
    /// The request id (logs, `x-request-id`).
    pub request_id: String,
    started: Instant,
    route: RouteKind,
    host: String,
    pod: Option<PodHost>,
    intent: Intent,
    user: Option<UserId>,
    authz: &'static str,
    target: Option<Target>,
    forward_cookie: Option<String>,
    answer: Option<&'static str>,
    status: u16,
    tunnel: Option<tunnel::TunnelReport>,
    trusted_client: bool,
    upstream_started: Option<Instant>,
    upstream_duration: Option<std::time::Duration>,
    connect_failed: bool,
    counted: bool,
    /// The request's span (its id); our events in every phase are its children.
    span: tracing::Span,
}

impl RequestCtx {
    fn new() -> Self {
        Self {
            request_id: String::new(),
            started: Instant::now(),
            route: RouteKind::Unrouted,
            host: String::new(),
            pod: None,
            intent: Intent::default(),
            user: None,
            authz: "none",
            target: None,
            forward_cookie: None,
            answer: None,
            status: 0,
            tunnel: None,
            trusted_client: false,
            upstream_started: None,
            upstream_duration: None,
            connect_failed: false,
            counted: false,
            span: tracing::Span::none(),
        }
    }
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

/// Every `Cookie` header joined as one (HTTP/2 clients send one field per cookie).
fn cookie_header(req: &RequestHeader) -> String {
    let mut joined = String::new();
    for value in req.headers.get_all(header::COOKIE) {
        if let Ok(v) = value.to_str() {
            if !joined.is_empty() {
                joined.push_str("; ");
            }
            joined.push_str(v);
        }
    }
    joined
}

fn client_ip(session: &Session) -> Option<std::net::IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

/// An incoming request id we may keep: short, printable, no separators that break log lines.
fn acceptable_request_id(value: &str) -> bool {
    (1..=128).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
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

fn is_tls(session: &Session) -> bool {
    session.digest().is_some_and(|d| d.ssl_digest.is_some())
}

impl Ingress {
    /// Writes an answer of ours and records it.
    async fn respond(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        answer: Answer,
    ) -> pingora::Result<bool> {
        let reply = answer.reply(ctx.intent.navigation);
        let header = reply.header(answer.name(), &ctx.request_id)?;
        ctx.answer = Some(answer.name());
        ctx.status = reply.status;
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

    /// On the plain listener with TLS configured and `http_redirect_to_https`: 308 to https,
    /// except health checks.
    fn https_redirect(&self, session: &Session, ctx: &RequestCtx) -> Option<Answer> {
        let tls = self.config.tls.as_ref().filter(|t| t.redirect_http)?;
        if is_tls(session) {
            return None;
        }
        let uri = &session.req_header().uri;
        if matches!(uri.path(), "/healthz" | "/readyz") {
            return Some(Answer::Health);
        }
        let host = ctx
            .host
            .rsplit_once(':')
            .map_or(ctx.host.as_str(), |(h, p)| {
                if p.bytes().all(|b| b.is_ascii_digit()) {
                    h
                } else {
                    ctx.host.as_str()
                }
            });
        let port = match tls.listen.port() {
            443 => String::new(),
            p => format!(":{p}"),
        };
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        Some(Answer::HttpsRedirect {
            location: format!("https://{host}{port}{path}"),
        })
    }

    /// The header edits for the decided target.
    fn forwarding(&self, session: &Session, ctx: &RequestCtx) -> Vec<HeaderEdit> {
        let Some(target) = &ctx.target else {
            return Vec::new();
        };
        upstream::forwarding_edits(&Forwarding {
            target,
            cookie: ctx.forward_cookie.as_deref(),
            client_ip: client_ip(session),
            trusted_forwarded_for: if ctx.trusted_client {
                session
                    .req_header()
                    .headers
                    .get("x-forwarded-for")
                    .and_then(|v| v.to_str().ok())
            } else {
                None
            },
            tls: is_tls(session),
            original_host: &ctx.host,
            request_id: &ctx.request_id,
        })
    }

    /// Hands the decided request to Pingora (`Ok(false)`), except HTTP/1.1 upgrades, which are
    /// tunnelled here (see [`crate::tunnel`] for why).
    async fn proxy_or_tunnel(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        if !ctx.intent.upgrade || session.is_http2() {
            return Ok(false);
        }
        let Some(target) = ctx.target.clone() else {
            return Ok(false);
        };
        let edits = self.forwarding(session, ctx);
        let strip: &[String] = match target {
            Target::Pod { .. } => &self.config.strip_response_headers,
            Target::Dashboard { .. } => &[],
        };
        let spec = TunnelSpec {
            target: &target,
            edits: &edits,
            strip_response_headers: strip,
            timeouts: &self.config.timeouts,
            request_id: &ctx.request_id,
            metrics: &self.metrics,
        };
        match tunnel::run(session, spec).await {
            Ok(report) => {
                ctx.status = report.status;
                ctx.tunnel = Some(report);
                Ok(true)
            }
            Err(answer) => {
                ctx.connect_failed =
                    matches!(answer, Answer::UpstreamRefused | Answer::UpstreamTimeout);
                self.respond(session, ctx, answer).await
            }
        }
    }

    /// The answer to a pod request without usable credentials.
    fn unauthenticated(&self, pod: &PodHost, session: &Session, intent: Intent) -> Answer {
        if intent.navigation {
            let uri = &session.req_header().uri;
            let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
            Answer::SignIn {
                location: callback::sign_in_location(
                    &self.config.dashboard_url,
                    pod,
                    path_and_query,
                ),
            }
        } else {
            Answer::Unauthenticated
        }
    }

    /// Authenticates and authorizes a pod request; `Ok(target)` or the answer to give instead.
    async fn decide_pod(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
        pod: &PodHost,
    ) -> Result<Target, Answer> {
        let now = (self.clock)();
        let cookies = cookie_header(session.req_header());
        let mut inspection = self.verifier.inspect(&cookies, now);
        // Moved out (not cloned): only the credential cookie names are needed afterwards.
        let verification = std::mem::replace(
            &mut inspection.verification,
            Verification::Decided(Outcome::Missing),
        );
        let outcome = match self.authorizer.resolve(verification, now).await {
            Ok(outcome) => outcome,
            Err(e) => return Err(directory_failed(ctx, "session lookup", &e)),
        };
        let principal: Principal = match outcome {
            Outcome::Valid(p) => p,
            other => {
                ctx.authz = match other {
                    Outcome::Expired { .. } => "expired",
                    Outcome::Invalid { .. } => "invalid",
                    _ => "missing",
                };
                return Err(self.unauthenticated(pod, session, ctx.intent));
            }
        };
        ctx.user = Some(principal.user_id.clone());
        if let Some(scope) = &principal.scope
            && (scope.pod_slug != pod.slug || scope.target_port != pod.port)
        {
            ctx.authz = "token_for_other_pod";
            return Err(self.unauthenticated(pod, session, ctx.intent));
        }
        let decision = match self
            .authorizer
            .authorize_with_lookup(&principal.user_id, &pod.slug)
            .await
        {
            Ok((d, lookup)) => {
                self.metrics
                    .authz_lookup(lookup == pinacle_authz::CacheLookup::Hit);
                d
            }
            Err(e) => return Err(directory_failed(ctx, "authorization lookup", &e)),
        };
        match decision {
            Decision::Allow {
                pod_id, upstream, ..
            } => {
                if let Some(scope) = &principal.scope
                    && scope.pod_id != pod_id
                {
                    // A token for an earlier pod with this slug: get a fresh one.
                    ctx.authz = "token_for_replaced_pod";
                    return Err(self.unauthenticated(pod, session, ctx.intent));
                }
                ctx.authz = "allow";
                ctx.forward_cookie = inspection.forwardable_cookie_header(&cookies);
                let domain = self
                    .config
                    .upstream_domain
                    .as_ref()
                    .or_else(|| self.config.base_domains.get(pod.base));
                let host = domain.map_or_else(String::new, |d| upstream::pod_upstream_host(pod, d));
                Ok(Target::Pod {
                    addr: upstream,
                    pod_id,
                    host,
                })
            }
            Decision::Unavailable { status, reason, .. } => {
                ctx.authz = "allow_unavailable";
                Err(Answer::PodUnavailable {
                    status: status.as_str().to_owned(),
                    reason: reason.as_str(),
                })
            }
            Decision::Deny(reason) => {
                ctx.authz = reason.as_str();
                Err(Answer::Forbidden)
            }
        }
    }
}

/// The directory could not answer: fail closed (503), and say why in the log.
fn directory_failed(ctx: &mut RequestCtx, what: &str, e: &DirectoryError) -> Answer {
    tracing::warn!(parent: &ctx.span, request_id = %ctx.request_id, error = %e, "{what} failed");
    ctx.authz = "directory_error";
    Answer::AuthorizationUnavailable
}

/// Maps a proxying error to our answer; `None` when the client is gone.
fn answer_for_error(e: &Error) -> Option<Answer> {
    use ErrorType::*;
    Some(match (e.esource(), e.etype()) {
        (_, HTTPStatus(400)) => Answer::BadRequest,
        (_, HTTPStatus(code)) if *code >= 500 => Answer::Internal,
        (_, HTTPStatus(_)) => Answer::BadRequest,
        (ErrorSource::Upstream, ConnectTimedout | ReadTimedout | WriteTimedout) => {
            Answer::UpstreamTimeout
        }
        (ErrorSource::Upstream, _) => Answer::UpstreamRefused,
        (ErrorSource::Downstream, WriteError | ReadError | ConnectionClosed) => return None,
        (ErrorSource::Downstream, _) => Answer::BadRequest,
        (ErrorSource::Internal | ErrorSource::Unset, ConnectTimedout) => Answer::UpstreamTimeout,
        (ErrorSource::Internal | ErrorSource::Unset, ConnectRefused | ConnectNoRoute) => {
            Answer::UpstreamRefused
        }
        (ErrorSource::Internal | ErrorSource::Unset, _) => Answer::Internal,
    })
}

#[async_trait]
impl ProxyHttp for Ingress {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new()
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        ctx.started = Instant::now();
        connections::head_read(session);
        ctx.trusted_client = client_ip(session).is_some_and(|ip| {
            self.config
                .trusted_proxies
                .iter()
                .any(|net| net.contains(ip))
        });
        let req = session.req_header();
        ctx.request_id = match req
            .headers
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
        {
            Some(id) if ctx.trusted_client && acceptable_request_id(id) => id.to_owned(),
            _ => self.ids.next_id(),
        };
        ctx.span = tracing::info_span!("request", request_id = %ctx.request_id);
        ctx.host = request_host(req);
        ctx.intent = intent::classify(&req.method, &req.headers);
        let too_large = request_head_bytes(req) > self.config.max_request_header_bytes;
        let timeouts = &self.config.timeouts;
        session.set_read_timeout(Some(if ctx.intent.upgrade {
            timeouts.websocket_idle
        } else {
            timeouts.client_read
        }));

        if too_large {
            return self.respond(session, ctx, Answer::HeaderTooLarge).await;
        }
        let in_flight = self
            .in_flight
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        ctx.counted = true;
        if in_flight >= self.config.max_concurrent_requests {
            return self.respond(session, ctx, Answer::Overloaded).await;
        }
        if let Some(answer) = self.https_redirect(session, ctx) {
            return self.respond(session, ctx, answer).await;
        }

        let pod = match host::route(&ctx.host, &self.config.base_domains) {
            Route::Dashboard => {
                ctx.route = RouteKind::Dashboard;
                ctx.target = Some(Target::Dashboard {
                    addr: self.config.dashboard_upstream,
                });
                return self.proxy_or_tunnel(session, ctx).await;
            }
            Route::BadPort(digits) => {
                ctx.route = RouteKind::Pod;
                return self.respond(session, ctx, Answer::BadPort(digits)).await;
            }
            Route::BadSlug => {
                ctx.route = RouteKind::Pod;
                return self.respond(session, ctx, Answer::BadHost).await;
            }
            Route::Pod(pod) => pod,
        };
        ctx.pod = Some(pod.clone());

        if session.req_header().uri.path() == CALLBACK_PATH {
            ctx.route = RouteKind::Callback;
            let query = CallbackQuery::parse(session.req_header().uri.query().unwrap_or(""));
            let secure = is_tls(session) || self.config.dashboard_https;
            let answer = callback::answer(&self.verifier, &pod, &query, secure, (self.clock)());
            return self.respond(session, ctx, Answer::Callback(answer)).await;
        }

        ctx.route = RouteKind::Pod;
        match self.decide_pod(session, ctx, &pod).await {
            Ok(target) => {
                ctx.target = Some(target);
                self.proxy_or_tunnel(session, ctx).await
            }
            Err(answer) => self.respond(session, ctx, answer).await,
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        let Some(target) = &ctx.target else {
            return Err(Error::explain(
                ErrorType::InternalError,
                "no upstream decided for this request",
            ));
        };
        Ok(Box::new(upstream::peer(
            target,
            &self.config.timeouts,
            ctx.intent.upgrade,
        )))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        ctx.upstream_started = Some(Instant::now());
        for edit in self.forwarding(session, ctx) {
            match edit {
                HeaderEdit::Set(name, value) => {
                    upstream_request.insert_header(name, value)?;
                }
                HeaderEdit::Remove(name) => {
                    upstream_request.remove_header(&name);
                }
            }
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        _upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        if ctx.upstream_duration.is_none() {
            ctx.upstream_duration = ctx.upstream_started.map(|t| t.elapsed());
        }
        Ok(())
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        e: Box<Error>,
    ) -> Box<Error> {
        ctx.connect_failed = true;
        e
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        if matches!(ctx.target, Some(Target::Pod { .. })) {
            for name in &self.config.strip_response_headers {
                upstream_response.remove_header(name.as_str());
            }
        }
        upstream_response.insert_header(REQUEST_ID_HEADER, ctx.request_id.as_str())?;
        ctx.status = upstream_response.status.as_u16();
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        if ctx.request_id.is_empty() {
            ctx.request_id = self.ids.next_id();
        }
        let Some(answer) = answer_for_error(e) else {
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        };
        let reply = answer.reply(ctx.intent.navigation);
        ctx.answer = Some(answer.name());
        ctx.status = reply.status;
        let body: Bytes = reply.body.clone();
        match reply.header(answer.name(), &ctx.request_id) {
            Ok(header) => {
                if let Err(write_error) = session
                    .as_downstream_mut()
                    .write_error_response(header, body)
                    .await
                {
                    tracing::debug!(parent: &ctx.span, request_id = %ctx.request_id, error = %write_error, "could not send the error response");
                }
            }
            Err(build_error) => {
                tracing::error!(parent: &ctx.span, request_id = %ctx.request_id, error = %build_error, "could not build the error response");
            }
        }
        FailToProxy {
            error_code: reply.status,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        connections::request_done(session);
        if std::mem::take(&mut ctx.counted) {
            self.in_flight
                .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        }
        let status = session
            .response_written()
            .map_or(ctx.status, |r| r.status.as_u16());
        let (bytes_in, bytes_out) = ctx.tunnel.map_or(
            (
                session.body_bytes_read() as u64,
                session.body_bytes_sent() as u64,
            ),
            |t| (t.bytes_up, t.bytes_down),
        );
        let duration = ctx.started.elapsed();
        let port = ctx.pod.as_ref().map_or(0, |p| p.port);
        self.metrics.request(&FinishedRequest {
            route: ctx.route.as_str(),
            status,
            port,
            duration,
            upstream_duration: ctx.upstream_duration,
            bytes_in,
            bytes_out,
            connect_failed: ctx.connect_failed,
        });
        let req = session.req_header();
        tracing::info!(
            target: "pinacle_ingress::access",
            parent: &ctx.span,
            request_id = %ctx.request_id,
            client = %session.client_addr().map(ToString::to_string).unwrap_or_default(),
            host = %ctx.host,
            route = ctx.route.as_str(),
            pod = ctx.pod.as_ref().map_or("", |p| p.slug.as_str()),
            port,
            user = ctx.user.as_ref().map_or("", UserId::as_str),
            method = %req.method,
            path = %telemetry::loggable_target(req.uri.path(), req.uri.query()),
            status,
            answer = ctx.answer.unwrap_or(""),
            authz = ctx.authz,
            upstream = %ctx.target.as_ref().map(|t| t.addr().to_string()).unwrap_or_default(),
            upgraded = session.was_upgraded() || ctx.tunnel.is_some_and(|t| t.status == 101),
            bytes_in,
            bytes_out,
            idle_timeout = ctx.tunnel.is_some_and(|t| t.idle_timeout),
            duration_us = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX),
            upstream_us = ctx.upstream_duration.map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
            error = %e.map(|e| e.etype().as_str()).unwrap_or(""),
            "request"
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
