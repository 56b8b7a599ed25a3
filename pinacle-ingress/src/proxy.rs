//! The Pingora `ProxyHttp` implementation: orchestration only. Each phase calls the pure parts
//! (host routing, intent, credentials, the callback, upstream choice, responses) and keeps what
//! it learnt in the per-request [`RequestCtx`].
//!
//! `request_filter` decides everything (route, credentials, authorization, target) so that
//! `upstream_peer`, which Pingora calls again on retries, only reads the decision.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderName, header};
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
use crate::connections::{self, HeaderDeadline, PlainRequests, Served, Takeover, TakeoverTask};
use crate::host::{self, PodHost, Route};
use crate::intent::{self, Intent};
use crate::plain::{self, Exchange, Failure, PlainRequest, UpstreamPool};
use crate::request_id::RequestIds;
use crate::responses::{Answer, Page, REQUEST_ID_HEADER, UpstreamFailure};
pub use crate::telemetry::RouteKind;
use crate::telemetry::{self, FinishedRequest, Metrics};
use crate::tunnel::{self, Opened, TunnelReport, TunnelSpec, Upgraded};
use crate::upstream::{self, Forwarding, HeaderEdit, Target};

/// Unix seconds now (the credential clock).
pub type Clock = fn() -> i64;

/// The proxy: Pingora's `ProxyHttp` and the gate's [`PlainRequests`] over one shared state.
pub struct Ingress(Arc<State>);

/// What every request reads.
pub struct State {
    /// Swapped whole by a reload (SIGHUP); each use reads the current one.
    config: ArcSwap<IngressConfig>,
    verifier: CredentialVerifier,
    authorizer: Arc<Authorizer>,
    ids: RequestIds,
    clock: Clock,
    metrics: Metrics,
    in_flight: Arc<AtomicUsize>,
    /// Idle upstream connections of the plain path (Pingora keeps its own).
    pool: UpstreamPool,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("listen", &self.config().listen)
            .field("idle_upstream_connections", &self.pool.idle_count())
            .finish_non_exhaustive()
    }
}

impl State {
    /// The current configuration.
    fn config(&self) -> arc_swap::Guard<Arc<IngressConfig>> {
        self.config.load()
    }

    /// The configuration requests now read; requests in progress keep the one they started
    /// with where they hold it.
    pub fn reconfigure(&self, config: Arc<IngressConfig>) {
        self.config.store(config);
    }

    /// The configuration requests now read.
    pub fn current_config(&self) -> Arc<IngressConfig> {
        self.config.load_full()
    }
}

impl std::ops::Deref for Ingress {
    type Target = State;

    fn deref(&self) -> &State {
        &self.0
    }
}

impl std::fmt::Debug for Ingress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingress")
            .field("listen", &self.config().listen)
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
        let pool = UpstreamPool::new(config.timeouts.upstream_idle);
        Self(Arc::new(State {
            config: ArcSwap::new(config),
            verifier,
            authorizer,
            ids: RequestIds::new(),
            clock,
            metrics,
            in_flight: Arc::new(AtomicUsize::new(0)),
            pool,
        }))
    }

    /// A handle that swaps in a new configuration for the requests that follow (see
    /// [`State::reconfigure`]).
    pub fn state(&self) -> Arc<State> {
        self.0.clone()
    }

    /// Requests and tunnels in flight (what a graceful stop waits for).
    pub fn in_flight(&self) -> Arc<AtomicUsize> {
        self.in_flight.clone()
    }

    /// The same proxy as the connection gate's [`PlainRequests`] (see [`crate::plain`]).
    pub fn plain_requests(&self) -> Arc<dyn PlainRequests> {
        Arc::new(Self(self.0.clone()))
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
    /// The signed-in user's email, when the credential says (pages only).
    user_email: Option<String>,
    /// Why the directory could not answer, for the access line's `error`.
    directory_error: Option<&'static str>,
    /// Which engine carried the request: `pingora`, `plain` or `tunnel` (the access line).
    engine: &'static str,
    authz: &'static str,
    target: Option<Target>,
    forward_cookie: Option<Vec<u8>>,
    answer: Option<&'static str>,
    status: u16,
    tunnel: Option<TunnelReport>,
    /// An accepted upgrade waiting for Pingora to hand the connection back (see `logging` and
    /// `persist_connection_context`). A mutex only because Pingora lends the context shared.
    handover: Mutex<Option<Box<TunnelHandover>>>,
    trusted_client: bool,
    upstream_started: Option<Instant>,
    upstream_duration: Option<std::time::Duration>,
    connect_failed: bool,
    /// This request's place under `max_concurrent_requests`.
    in_flight: Option<InFlight>,
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
            user_email: None,
            directory_error: None,
            engine: "pingora",
            authz: "none",
            target: None,
            forward_cookie: None,
            answer: None,
            status: 0,
            tunnel: None,
            handover: Mutex::new(None),
            trusted_client: false,
            upstream_started: None,
            upstream_duration: None,
            connect_failed: false,
            in_flight: None,
            span: tracing::Span::none(),
        }
    }
}

impl Default for RequestCtx {
    fn default() -> Self {
        Self::new()
    }
}

/// A request counted under `max_concurrent_requests` until dropped (a WebSocket tunnel's lives
/// with the tunnel). A counter, not a tokio `Semaphore`: the limit changes on reload, which a
/// semaphore's fixed permits cannot follow without forgetting or adding permits under load;
/// this costs one atomic add and one subtract per request.
#[derive(Debug)]
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    /// Counts one more; also returns how many were in flight before.
    fn enter(counter: &Arc<AtomicUsize>) -> (Self, usize) {
        let before = counter.fetch_add(1, Ordering::AcqRel);
        (Self(counter.clone()), before)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The parts of a request the decisions read, from Pingora's session or from the plain path.
#[derive(Debug, Clone, Copy)]
struct RequestView<'a> {
    method: &'a http::Method,
    uri: &'a http::Uri,
    headers: &'a http::HeaderMap,
    client_ip: Option<std::net::IpAddr>,
    tls: bool,
}

impl<'a> RequestView<'a> {
    fn of(session: &'a Session) -> Self {
        let req = session.req_header();
        Self {
            method: &req.method,
            uri: &req.uri,
            headers: &req.headers,
            client_ip: client_ip(session),
            tls: is_tls(session),
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

/// Every `Cookie` field joined as one, as bytes (HTTP/2 clients send one field per cookie;
/// values may hold any byte a server set).
fn cookie_header(headers: &http::HeaderMap) -> std::borrow::Cow<'_, [u8]> {
    let mut fields = headers.get_all(header::COOKIE).iter();
    let Some(first) = fields.next() else {
        return std::borrow::Cow::Borrowed(&[]);
    };
    let Some(second) = fields.next() else {
        return std::borrow::Cow::Borrowed(first.as_bytes());
    };
    let mut joined = first.as_bytes().to_vec();
    for value in std::iter::once(second).chain(fields) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(value.as_bytes());
    }
    std::borrow::Cow::Owned(joined)
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
    /// The request's client trust, id, span, host and intent (first thing, on either path).
    fn identify(&self, ctx: &mut RequestCtx, view: &RequestView<'_>, host: String, intent: Intent) {
        ctx.trusted_client = view.client_ip.is_some_and(|ip| {
            self.config()
                .trusted_proxies
                .iter()
                .any(|net| net.contains(ip))
        });
        ctx.request_id = match view
            .headers
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
        {
            Some(id) if ctx.trusted_client && acceptable_request_id(id) => id.to_owned(),
            _ => self.ids.next_id(),
        };
        ctx.span = tracing::info_span!("request", request_id = %ctx.request_id);
        ctx.host = host;
        ctx.intent = intent;
    }

    /// What a page of ours may say about this request.
    fn page<'a>(config: &'a IngressConfig, ctx: &'a RequestCtx) -> Page<'a> {
        Page {
            navigation: ctx.intent.navigation,
            pod: ctx.pod.as_ref().map(|p| (p.slug.as_str(), p.port)),
            dashboard_route: ctx.route == RouteKind::Dashboard,
            user_email: ctx.user_email.as_deref(),
            request_id: &ctx.request_id,
            dashboard_url: &config.dashboard_url,
        }
    }

    /// Writes an answer of ours and records it.
    async fn respond(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        answer: Answer,
    ) -> pingora::Result<bool> {
        let config = self.config();
        let reply = answer.reply_for(&Self::page(&config, ctx));
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
        let config = self.config();
        let tls = config.tls.as_ref().filter(|t| t.redirect_http)?;
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
    fn forwarding(&self, view: &RequestView<'_>, ctx: &RequestCtx) -> Vec<HeaderEdit> {
        let Some(target) = &ctx.target else {
            return Vec::new();
        };
        upstream::forwarding_edits(&Forwarding {
            target,
            cookie: ctx.forward_cookie.as_deref(),
            client_ip: view.client_ip,
            trusted_client: ctx.trusted_client,
            trusted_forwarded_for: if ctx.trusted_client {
                view.headers
                    .get("x-forwarded-for")
                    .and_then(|v| v.to_str().ok())
            } else {
                None
            },
            tls: view.tls,
            original_host: &ctx.host,
            request_id: &ctx.request_id,
        })
    }

    /// Hands the decided request to Pingora (`Ok(false)`), except HTTP/1.1 upgrades, which are
    /// tunnelled by us (see [`crate::tunnel`] for why): here the upstream side is opened; an
    /// accepted upgrade is handed to the connection gate, which writes the `101` and runs the
    /// tunnel once Pingora has finished this request.
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
        if !connections::taken_over_by_gate(session) {
            // Every HTTP/1 connection of the ingress comes through the gate; this is a wiring
            // mistake, not a client's.
            tracing::error!(parent: &ctx.span, request_id = %ctx.request_id, "upgrade on a connection outside the connection gate");
            return self.respond(session, ctx, Answer::Internal).await;
        }
        let edits = self.forwarding(&RequestView::of(session), ctx);
        let strip: &[String] = match target {
            Target::Pod { .. } => &self.config().strip_response_headers,
            Target::Dashboard { .. } => &[],
        };
        let spec = TunnelSpec {
            target: &target,
            edits: &edits,
            strip_response_headers: strip,
            timeouts: &self.config().timeouts,
            request_id: &ctx.request_id,
        };
        match tunnel::open(session, spec).await {
            Ok(Opened::Refused(report)) => {
                ctx.status = report.status;
                ctx.tunnel = Some(report);
                Ok(true)
            }
            Ok(Opened::Upgraded(upgraded)) => {
                // Pingora gives the connection back only if it would keep it alive.
                session.set_keepalive(Some(TAKEOVER_KEEPALIVE_SECS));
                session.set_keepalive_reuses_remaining(None);
                ctx.status = 101;
                *ctx.handover
                    .get_mut()
                    .unwrap_or_else(PoisonError::into_inner) = Some(Box::new(TunnelHandover {
                    upgraded: Some(upgraded),
                    idle: self.config().timeouts.websocket_idle,
                    metrics: self.metrics.clone(),
                    finished: None,
                }));
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
    fn unauthenticated(&self, pod: &PodHost, uri: &http::Uri, intent: Intent) -> Answer {
        if intent.navigation {
            let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
            Answer::SignIn {
                location: callback::sign_in_location(
                    &self.config().dashboard_url,
                    pod,
                    path_and_query,
                ),
            }
        } else {
            Answer::Unauthenticated
        }
    }

    /// Authenticates and authorizes a pod request. No side effects (but cache fills), so the
    /// plain path can drop a judgement it does not serve; [`Self::apply`] records it.
    async fn judge_pod(&self, view: &RequestView<'_>, intent: Intent, pod: &PodHost) -> Judged {
        let now = (self.clock)();
        let cookies = cookie_header(view.headers);
        let mut inspection = self.verifier.inspect(&cookies, now);
        // Moved out (not cloned): only the credential cookie names are needed afterwards.
        let verification = std::mem::replace(
            &mut inspection.verification,
            Verification::Decided(Outcome::Missing),
        );
        let mut judged = Judged {
            verdict: Err(Answer::Internal),
            authz: "none",
            user: None,
            user_email: None,
            lookup: None,
            directory_error: None,
        };
        let outcome = match self.authorizer.resolve(verification, now).await {
            Ok(outcome) => outcome,
            Err(e) => return judged.directory_failed("session lookup", e),
        };
        let principal: Principal = match outcome {
            Outcome::Valid(p) => p,
            other => {
                judged.authz = match other {
                    Outcome::Expired { .. } => "expired",
                    Outcome::Invalid { .. } => "invalid",
                    _ => "missing",
                };
                judged.verdict = Err(self.unauthenticated(pod, view.uri, intent));
                return judged;
            }
        };
        judged.user = Some(principal.user_id.clone());
        judged.user_email = principal
            .claims
            .0
            .get("email")
            .and_then(|v| v.as_str())
            .map(str::to_owned);
        if let Some(scope) = &principal.scope
            && (scope.pod_slug != pod.slug || scope.target_port != pod.port)
        {
            judged.authz = "token_for_other_pod";
            judged.verdict = Err(self.unauthenticated(pod, view.uri, intent));
            return judged;
        }
        let decision = match self
            .authorizer
            .authorize_with_lookup(&principal.user_id, &pod.slug)
            .await
        {
            Ok((d, lookup)) => {
                judged.lookup = Some(lookup);
                d
            }
            Err(e) => return judged.directory_failed("authorization lookup", e),
        };
        let (authz, verdict) = match decision {
            Decision::Allow {
                pod_id, upstream, ..
            } => {
                if let Some(scope) = &principal.scope
                    && scope.pod_id != pod_id
                {
                    // A token for an earlier pod with this slug: get a fresh one.
                    (
                        "token_for_replaced_pod",
                        Err(self.unauthenticated(pod, view.uri, intent)),
                    )
                } else {
                    let config = self.config();
                    let domain = config
                        .upstream_domain
                        .as_ref()
                        .or_else(|| config.base_domains.get(pod.base));
                    let host =
                        domain.map_or_else(String::new, |d| upstream::pod_upstream_host(pod, d));
                    (
                        "allow",
                        Ok(Allowed {
                            target: Target::Pod {
                                addr: upstream,
                                pod_id,
                                host,
                            },
                            forward_cookie: inspection
                                .forwardable_cookie_header(&cookies)
                                .map(std::borrow::Cow::into_owned),
                        }),
                    )
                }
            }
            Decision::Unavailable { status, reason, .. } => (
                "allow_unavailable",
                Err(Answer::PodUnavailable {
                    status: status.as_str().to_owned(),
                    reason: reason.as_str(),
                }),
            ),
            Decision::Deny(reason) => (reason.as_str(), Err(Answer::Forbidden)),
        };
        judged.authz = authz;
        judged.verdict = verdict;
        judged
    }

    /// Records a judgement in the request's context, metrics and log; the target or the answer.
    fn apply(&self, ctx: &mut RequestCtx, judged: Judged) -> Result<Target, Answer> {
        ctx.authz = judged.authz;
        ctx.user = judged.user;
        ctx.user_email = judged.user_email;
        if let Some(lookup) = judged.lookup {
            self.metrics
                .authz_lookup(lookup == pinacle_authz::CacheLookup::Hit);
        }
        if let Some((_, e)) = &judged.directory_error {
            ctx.directory_error = Some(match e {
                DirectoryError::Unavailable(_) => "directory_unavailable",
                DirectoryError::Timeout => "directory_timeout",
                DirectoryError::Query(_) => "directory_query",
            });
        }
        if let Some((what, e)) = &judged.directory_error {
            tracing::warn!(parent: &ctx.span, request_id = %ctx.request_id, error = %e, "{what} failed");
        }
        let allowed = judged.verdict?;
        ctx.forward_cookie = allowed.forward_cookie;
        Ok(allowed.target)
    }
}

/// A pod request's judgement, not yet recorded.
struct Judged {
    verdict: Result<Allowed, Answer>,
    authz: &'static str,
    user: Option<UserId>,
    user_email: Option<String>,
    lookup: Option<pinacle_authz::CacheLookup>,
    directory_error: Option<(&'static str, DirectoryError)>,
}

struct Allowed {
    target: Target,
    forward_cookie: Option<Vec<u8>>,
}

impl Judged {
    /// The directory could not answer: fail closed (503), and say why in the log.
    fn directory_failed(mut self, what: &'static str, e: DirectoryError) -> Self {
        self.authz = "directory_error";
        self.verdict = Err(Answer::AuthorizationUnavailable);
        self.directory_error = Some((what, e));
        self
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
        RequestCtx::new()
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        ctx.started = Instant::now();
        connections::head_read(session);
        let head = normalise_request(session);
        let req = session.req_header();
        let intent = intent::classify(&req.method, &req.headers);
        if !intent.upgrade && req.headers.contains_key(header::UPGRADE) {
            // `Upgrade` without `Connection: upgrade` asks for nothing (RFC 9110 §7.8): a
            // plain request, never a tunnel run by Pingora's loop.
            session.req_header_mut().remove_header(&header::UPGRADE);
        }
        let req = session.req_header();
        self.identify(ctx, &RequestView::of(session), request_host(req), intent);
        if let Err(answer) = head {
            return self.respond(session, ctx, answer).await;
        }
        let too_large = request_head_bytes(req) > self.config().max_request_header_bytes;
        let timeouts = &self.config().timeouts;
        session.set_read_timeout(Some(if ctx.intent.upgrade {
            timeouts.websocket_idle
        } else {
            timeouts.client_read
        }));

        if too_large {
            return self.respond(session, ctx, Answer::HeaderTooLarge).await;
        }
        let (counted, in_flight) = InFlight::enter(&self.in_flight);
        ctx.in_flight = Some(counted);
        if in_flight >= self.config().max_concurrent_requests {
            return self.respond(session, ctx, Answer::Overloaded).await;
        }
        if let Some(answer) = self.https_redirect(session, ctx) {
            return self.respond(session, ctx, answer).await;
        }

        let pod = match host::route(&ctx.host, &self.config().base_domains) {
            Route::Dashboard => {
                ctx.route = RouteKind::Dashboard;
                ctx.target = Some(Target::Dashboard {
                    addr: self.config().dashboard_upstream,
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
            let secure = is_tls(session) || self.config().dashboard_https;
            let answer = callback::answer(&self.verifier, &pod, &query, secure, (self.clock)());
            return self.respond(session, ctx, Answer::Callback(answer)).await;
        }

        ctx.route = RouteKind::Pod;
        let judged = self
            .judge_pod(&RequestView::of(session), ctx.intent, &pod)
            .await;
        match self.apply(ctx, judged) {
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
            &self.config().timeouts,
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
        for edit in self.forwarding(&RequestView::of(session), ctx) {
            match edit {
                HeaderEdit::Set(name, value) => {
                    upstream_request.insert_header(name, value)?;
                }
                HeaderEdit::Remove(name) => {
                    upstream_request.remove_header(&name);
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
        if ctx.upstream_duration.is_none() {
            ctx.upstream_duration = ctx.upstream_started.map(|t| t.elapsed());
        }
        // A switch nobody asked for (upgrades are tunnelled by us, never here): 502, as on the
        // plain path, not a raw relay.
        if upstream_response.status == http::StatusCode::SWITCHING_PROTOCOLS {
            return Err(upstream_error("unrequested protocol switch"));
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
            for name in &self.config().strip_response_headers {
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
        let config = self.config();
        let reply = answer.reply_for(&Self::page(&config, ctx));
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
        let slot = ctx
            .handover
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(mut handover) = slot.take() {
            // An accepted upgrade: logged and counted when its tunnel ends.
            handover.finished = Some((std::mem::take(ctx), RequestFacts::of(session)));
            *ctx.handover
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner) = Some(handover);
            return;
        }
        ctx.in_flight = None;
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
        record(
            &self.metrics,
            ctx,
            Facts::Live(session),
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
            parent: &ctx.span,
            request_id = %ctx.request_id,
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
            ctx.host,
            ctx.request_id
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

#[async_trait]
impl PlainRequests for Ingress {
    /// Serves a bodiless `GET`/`HEAD` to a pod the user may use (see [`crate::plain`]) with
    /// the same decisions, header edits, metrics and access log as the Pingora path; declines
    /// everything else, and every request the ingress would answer itself, untouched.
    async fn serve(&self, conn: &mut HeaderDeadline, stopping: bool) -> Served {
        let config = self.config();
        if !config.plain_path {
            return Served::Declined;
        }
        if config.tls.as_ref().is_some_and(|t| t.redirect_http) && !conn.is_tls() {
            return Served::Declined;
        }
        let Some(request) = PlainRequest::parse(conn.pending(), config.max_request_header_bytes)
        else {
            return Served::Declined;
        };
        let Route::Pod(pod) = host::route(&request.host, &config.base_domains) else {
            return Served::Declined;
        };
        if request.uri.path() == CALLBACK_PATH {
            return Served::Declined;
        }
        let client = conn.client_addr();
        let view = RequestView {
            method: &request.method,
            uri: &request.uri,
            headers: &request.headers,
            client_ip: client.map(|a| a.ip()),
            tls: conn.is_tls(),
        };
        let mut ctx = RequestCtx::new();
        let (counted, in_flight) = InFlight::enter(&self.in_flight);
        if in_flight >= config.max_concurrent_requests {
            return Served::Declined;
        }
        let intent = intent::classify(view.method, view.headers);
        let judged = self.judge_pod(&view, intent, &pod).await;
        // Served here from now on, allowed or not: a request is judged once (a declined one
        // would be judged again by Pingora's path: a second directory query, and with the
        // database down a second timeout).
        self.identify(&mut ctx, &view, request.host.clone(), intent);
        ctx.in_flight = Some(counted);
        ctx.route = RouteKind::Pod;
        ctx.pod = Some(pod);
        ctx.engine = "plain";
        let target = match self.apply(&mut ctx, judged) {
            Ok(target) => target,
            Err(answer) => {
                conn.take_pending_head();
                // The request had no body and asked for keep-alive: the connection stays
                // open as on Pingora's path, unless the ingress is stopping.
                let status = self
                    .answer_plain(conn, &mut ctx, &answer, &request.method, stopping)
                    .await;
                let error = if status == 0 { "client_gone" } else { "" };
                self.finish_plain(conn, ctx, &request, client, (status, 0, error));
                return if status == 0 || stopping {
                    Served::Close
                } else {
                    Served::KeepAlive
                };
            }
        };
        let (addr, group) = match &target {
            Target::Pod { addr, pod_id, .. } => (*addr, upstream::group_key(pod_id)),
            Target::Dashboard { addr } => (*addr, 0),
        };
        ctx.target = Some(target);
        let mut head = Vec::with_capacity(conn.pending().len() + 256);
        request.upstream_head(conn.pending(), &self.forwarding(&view, &ctx), &mut head);
        conn.take_pending_head();
        let exchange = Exchange {
            addr,
            group,
            head: &head,
            head_request: request.method == http::Method::HEAD,
            strip: &config.strip_response_headers,
            request_id: &ctx.request_id,
            close_client: stopping,
            connect_timeout: config.timeouts.upstream_connect,
            read_timeout: config.timeouts.upstream_read,
            write_timeout: config.timeouts.client_read,
        };
        ctx.upstream_started = Some(Instant::now());
        let mut done = plain::exchange(conn, &self.pool, &exchange).await;
        ctx.upstream_duration = done.upstream;
        ctx.status = done.status;
        ctx.connect_failed = done.connect_failed;
        if let Some(failure) = done.failure.filter(|f| f.answerable()) {
            let answer = Answer::upstream(match failure {
                Failure::TimedOut => UpstreamFailure::TimedOut,
                _ => UpstreamFailure::Refused,
            });
            done.status = self
                .answer_plain(conn, &mut ctx, &answer, &request.method, true)
                .await;
        }
        let error = done.failure.map_or("", Failure::as_str);
        self.finish_plain(
            conn,
            ctx,
            &request,
            client,
            (done.status, done.body_bytes, error),
        );
        if done.keep_client {
            Served::KeepAlive
        } else {
            Served::Close
        }
    }
}

impl Ingress {
    /// Ends a request the plain path served: frees its place, counts and logs it with its
    /// `(status, body bytes sent, error)`.
    fn finish_plain(
        &self,
        conn: &mut HeaderDeadline,
        mut ctx: RequestCtx,
        request: &PlainRequest,
        client: Option<std::net::SocketAddr>,
        (status, bytes_out, error): (u16, u64, &str),
    ) {
        conn.request_done();
        ctx.in_flight = None;
        self.metrics.plain_request();
        record(
            &self.metrics,
            &ctx,
            Facts::Plain {
                client,
                method: &request.method,
                uri: &request.uri,
            },
            &Ending {
                status,
                bytes_in: 0,
                bytes_out,
                upgraded: false,
                idle_timeout: false,
                error,
            },
        );
    }

    /// Writes one of our answers on the plain path, with `connection: close` when `close`;
    /// its status, or 0 when the client is gone.
    async fn answer_plain(
        &self,
        conn: &mut HeaderDeadline,
        ctx: &mut RequestCtx,
        answer: &Answer,
        method: &http::Method,
        close: bool,
    ) -> u16 {
        use tokio::io::AsyncWriteExt;

        let config = self.config();
        let reply = answer.reply_for(&Self::page(&config, ctx));
        ctx.answer = Some(answer.name());
        let mut bytes = reply.http1_bytes(answer.name(), &ctx.request_id, close);
        if *method == http::Method::HEAD {
            bytes.truncate(bytes.len().saturating_sub(reply.body.len()));
        }
        let written = tokio::time::timeout(self.config().timeouts.client_read, async {
            conn.write_all(&bytes).await?;
            conn.flush().await
        })
        .await;
        if matches!(written, Ok(Ok(()))) {
            reply.status
        } else {
            0
        }
    }
}

/// The keep-alive a handed-over connection is given so that Pingora returns it (no request
/// follows on it: the tunnel ends the connection).
const TAKEOVER_KEEPALIVE_SECS: u64 = 60;

/// What the access log takes from the request besides its context: from the live session, or
/// (for a tunnel, logged when it ends, long after its Pingora session) kept copies. Read only
/// when the access log is on.
enum Facts<'a> {
    Live(&'a Session),
    Kept(&'a RequestFacts),
    /// A request served by the plain path.
    Plain {
        client: Option<std::net::SocketAddr>,
        method: &'a http::Method,
        uri: &'a http::Uri,
    },
}

impl Facts<'_> {
    fn client(&self) -> String {
        match self {
            Self::Live(session) => session
                .client_addr()
                .map(ToString::to_string)
                .unwrap_or_default(),
            Self::Kept(kept) => kept.client.clone(),
            Self::Plain { client, .. } => client.map(|a| a.to_string()).unwrap_or_default(),
        }
    }

    fn method(&self) -> &str {
        match self {
            Self::Live(session) => session.req_header().method.as_str(),
            Self::Kept(kept) => kept.method.as_str(),
            Self::Plain { method, .. } => method.as_str(),
        }
    }

    fn path(&self) -> String {
        match self {
            Self::Live(session) => {
                let uri = &session.req_header().uri;
                telemetry::loggable_target(uri.path(), uri.query())
            }
            Self::Kept(kept) => kept.path.clone(),
            Self::Plain { uri, .. } => telemetry::loggable_target(uri.path(), uri.query()),
        }
    }
}

/// [`Facts`] kept for a tunnel.
#[derive(Debug)]
struct RequestFacts {
    client: String,
    method: http::Method,
    path: String,
}

impl RequestFacts {
    fn of(session: &Session) -> Self {
        let live = Facts::Live(session);
        Self {
            client: live.client(),
            method: session.req_header().method.clone(),
            path: live.path(),
        }
    }
}

/// How a request ended.
#[derive(Debug)]
struct Ending<'a> {
    status: u16,
    bytes_in: u64,
    bytes_out: u64,
    upgraded: bool,
    idle_timeout: bool,
    error: &'a str,
}

/// The request's metrics and access log line.
fn record(metrics: &Metrics, ctx: &RequestCtx, facts: Facts<'_>, end: &Ending<'_>) {
    let duration = ctx.started.elapsed();
    let port = ctx.pod.as_ref().map_or(0, |p| p.port);
    metrics.request(&FinishedRequest {
        route: ctx.route,
        status: end.status,
        port,
        duration,
        upstream_duration: ctx.upstream_duration,
        bytes_in: end.bytes_in,
        bytes_out: end.bytes_out,
        connect_failed: ctx.connect_failed,
        answer: ctx.answer,
    });
    tracing::info!(
        target: "pinacle_ingress::access",
        parent: &ctx.span,
        request_id = %ctx.request_id,
        client = %facts.client(),
        host = %ctx.host,
        route = ctx.route.as_str(),
        engine = if end.upgraded { "tunnel" } else { ctx.engine },
        pod = ctx.pod.as_ref().map_or("", |p| p.slug.as_str()),
        port,
        user = ctx.user.as_ref().map_or("", UserId::as_str),
        method = facts.method(),
        path = %facts.path(),
        status = end.status,
        answer = ctx.answer.unwrap_or(""),
        authz = ctx.authz,
        upstream = %ctx.target.as_ref().map(|t| t.addr().to_string()).unwrap_or_default(),
        upgraded = end.upgraded,
        bytes_in = end.bytes_in,
        bytes_out = end.bytes_out,
        idle_timeout = end.idle_timeout,
        duration_us = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX),
        upstream_us = ctx.upstream_duration.map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
        error = if end.error.is_empty() { ctx.directory_error.unwrap_or("") } else { end.error },
        "request"
    );
}

/// An accepted upgrade on its way to the connection gate, with its request for the access log.
#[derive(Debug)]
pub struct TunnelHandover {
    upgraded: Option<Upgraded>,
    idle: std::time::Duration,
    metrics: Metrics,
    /// Set by `logging`: the request, logged when the tunnel ends.
    finished: Option<(RequestCtx, RequestFacts)>,
}

impl TunnelHandover {
    fn finish(
        metrics: &Metrics,
        finished: Option<(RequestCtx, RequestFacts)>,
        report: TunnelReport,
        error: &str,
    ) {
        let Some((ctx, facts)) = finished else {
            return;
        };
        record(
            metrics,
            &ctx,
            Facts::Kept(&facts),
            &Ending {
                status: report.status,
                bytes_in: report.bytes_up,
                bytes_out: report.bytes_down,
                upgraded: report.status == 101,
                idle_timeout: report.idle_timeout,
                error,
            },
        );
        // `ctx` goes here, and its place under `max_concurrent_requests` with it.
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
        let metrics = self.metrics.clone();
        let idle = self.idle;
        Box::pin(async move {
            let Some(upgraded) = upgraded else {
                return;
            };
            let report = tunnel::relay(&mut client, &early, upgraded, idle, &metrics).await;
            Self::finish(&metrics, finished, report, "");
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
            .map_or("", |(ctx, _)| ctx.request_id.as_str());
        tracing::warn!(
            request_id,
            "upgrade accepted upstream but the client connection was not handed over; closed"
        );
        let report = TunnelReport {
            status: 0,
            bytes_up: 0,
            bytes_down: 0,
            idle_timeout: false,
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
