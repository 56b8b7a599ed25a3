//! Every decision about a request, made once: [`State::decide`] reads a [`RequestView`] and
//! the connection's [`ConnInfo`] and returns a [`Judgement`]: the request's [`Record`] so far
//! and a [`Verdict`], either an [`Answer`] of ours or a [`Plan`] to forward. The engines (the
//! plain path, Pingora's loop, the tunnel) only carry the verdict out; none of them decides.
//!
//! The order of the checks: a head the engine could not normalise, the head's size, the
//! in-flight limit, the https redirect, the host's route, the proxy-token callback, then the
//! credentials (a machine's, `[api]`, else the browser's) and the owner-or-team rule (the
//! step that may wait, on the directory), the rate limits (Redis, bounded); then the
//! pod's own paths under `/__pinacle/status` (the status, and Start and Stop, which wait on the
//! control plane, bounded by `control_timeout`), or the plan.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::header;
use pinacle_authz::{
    Decision, DirectoryError, Outcome, Principal, SessionToken, UserId, Verification,
};

use crate::access::Record;
use crate::callback::{self, CALLBACK_PATH, CallbackQuery};
use crate::config::{ControlConfig, IngressConfig, Timeouts};
use crate::control::{self, Action, Outcome as ControlOutcome};
use crate::cors::{self, CorsMode};
use crate::host::{self, PodHost, Route};
use crate::intent::{self, Intent};
use crate::path_routing::{self, PathRoute};
use crate::proxy::State;
use crate::responses::{Answer, Lifecycle, Page, REQUEST_ID_HEADER};
use crate::revocation::Grant;
use crate::telemetry::RouteKind;
use crate::upstream::{self, Forwarding, HeaderEdit, Target};

/// The pod status page on every pod host (and under path routing's prefix).
pub const STATUS_PAGE_PATH: &str = "/__pinacle/status";
/// Its JSON.
pub const STATUS_JSON_PATH: &str = "/__pinacle/status.json";
/// Start, from the status page (`POST`).
pub const START_PATH: &str = "/__pinacle/status/start";
/// Stop, from the status page (`POST`).
pub const STOP_PATH: &str = "/__pinacle/status/stop";

/// The parts of a request the decisions read, as either engine parsed them.
#[derive(Debug, Clone)]
pub struct RequestView<'a> {
    /// The method.
    pub method: &'a http::Method,
    /// The target, in origin form.
    pub uri: &'a http::Uri,
    /// The header fields.
    pub headers: &'a http::HeaderMap,
    /// The `Host` (or HTTP/2 `:authority`).
    pub host: &'a str,
    /// The size of the head as received.
    pub head_bytes: usize,
    /// An HTTP/2 request (never tunnelled: no extended CONNECT yet).
    pub http2: bool,
    /// The engine found the head malformed: this answer, once the request is identified.
    pub malformed: Option<Answer>,
}

/// What the decisions read about the connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    /// The peer's address.
    pub client: Option<SocketAddr>,
    /// Whether it came over TLS.
    pub tls: bool,
}

/// What to do with a request.
#[derive(Debug)]
pub enum Verdict {
    /// The ingress answers itself.
    Answer(Answer),
    /// Forward it.
    Forward(Plan),
}

/// A request to forward: where, with which header edits, and how to treat the response.
#[derive(Debug)]
pub struct Plan {
    /// Where to.
    pub target: Target,
    /// The request's header edits (Host, Cookie, X-Forwarded-*, request id).
    pub edits: Vec<HeaderEdit>,
    /// An HTTP/1.1 upgrade: the tunnel carries it.
    pub tunnel: bool,
    /// Fields added to the response: a pod's frame policy (`Content-Security-Policy:
    /// frame-ancestors ...`, enforced together with any policy the pod sets, so it can only
    /// narrow it) and a renewed proxy token's `Set-Cookie`.
    pub add_response: Vec<(http::HeaderName, http::HeaderValue)>,
    /// A granted cross-origin request's `Origin`: the response gets
    /// `Access-Control-Allow-Origin` (this origin), `-Credentials: true` and `Vary: Origin`
    /// unless the pod set its own.
    pub cors_origin: Option<http::HeaderValue>,
    /// The request target the upstream gets instead of the client's (path routing: the prefix
    /// removed).
    pub upstream_target: Option<String>,
    /// Path routing's prefix: a response `Location` that is a path on this host gets it back.
    pub location_prefix: Option<String>,
    /// What a pod request was allowed under: a long-lived connection registers it, to be
    /// closed when access goes ([`crate::revocation`]).
    pub grant: Option<Arc<Grant>>,
    /// Where a long-lived connection notes its traffic for the activity reports (none when
    /// they are off).
    pub activity: Option<control::Touch>,
    /// The configuration the request was judged under.
    config: Arc<IngressConfig>,
}

impl Plan {
    /// Response fields removed before the client sees them (lowercase; a pod's only).
    pub fn strip_response_headers(&self) -> &[String] {
        match self.target {
            Target::Pod { .. } => &self.config.strip_response_headers,
            Target::Dashboard { .. } => &[],
        }
    }

    /// Whether the upstream's answer is confined to the request's host ([`crate::confine`]): a
    /// pod's is, the dashboard's is not.
    pub fn confine(&self) -> bool {
        matches!(self.target, Target::Pod { .. })
    }

    /// The timeouts that apply.
    pub fn timeouts(&self) -> &Timeouts {
        &self.config.timeouts
    }
}

/// A decided request.
#[derive(Debug)]
pub struct Judgement {
    /// The record so far (identity, route, user, authorization).
    pub record: Record,
    /// Its place under `max_concurrent_requests` (none when refused before counting).
    pub in_flight: Option<InFlight>,
    /// What to do.
    pub verdict: Verdict,
}

/// A request counted under `max_concurrent_requests` until dropped (a WebSocket tunnel's lives
/// with the tunnel). A counter, not a tokio `Semaphore`: the limit changes on reload, which a
/// semaphore's fixed permits cannot follow without forgetting or adding permits under load;
/// this costs one atomic add and one subtract per request.
#[derive(Debug)]
pub struct InFlight(Arc<AtomicUsize>);

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

/// What a page of ours may say about this request.
pub fn page<'a>(config: &'a IngressConfig, record: &'a Record) -> Page<'a> {
    Page {
        navigation: record.intent.navigation,
        pod: record.pod.as_ref().map(|p| (p.slug.as_str(), p.port)),
        dashboard_route: record.route == RouteKind::Dashboard,
        user_email: record.user_email.as_deref(),
        request_id: &record.request_id,
        dashboard_url: &config.dashboard_url,
    }
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

/// An incoming request id we may keep: short, printable, no separators that break log lines.
fn acceptable_request_id(value: &str) -> bool {
    (1..=128).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// The host without a numeric port.
fn host_without_port(host: &str) -> &str {
    host.rsplit_once(':').map_or(host, |(h, p)| {
        if p.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host
        }
    })
}

impl State {
    /// Judges a request, once. The steps that wait are the directory's (bounded by
    /// `directory_query_timeout`) and, for a Start or Stop only, the control plane's (bounded by
    /// `control_timeout`); it records the cache lookup in the metrics and a directory failure in
    /// the log. A wake (`wake_on_request`) is a background task, never waited for.
    pub async fn decide(&self, view: &RequestView<'_>, conn: ConnInfo) -> Judgement {
        let config = self.config.load_full();
        let mut record = self.identify(&config, view, conn);
        let mut in_flight = None;
        let verdict = self
            .verdict(&config, view, conn, &mut record, &mut in_flight)
            .await;
        Judgement {
            record,
            in_flight,
            verdict,
        }
    }

    /// The request's client trust, id, span, host and intent.
    fn identify(&self, config: &IngressConfig, view: &RequestView<'_>, conn: ConnInfo) -> Record {
        let trusted_client = conn.client.is_some_and(|a| {
            config
                .trusted_proxies
                .iter()
                .any(|net| net.contains(a.ip()))
        });
        let request_id = match view
            .headers
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
        {
            Some(id) if trusted_client && acceptable_request_id(id) => id.to_owned(),
            _ => self.ids.next_id(),
        };
        Record {
            span: tracing::info_span!("request", request_id = %request_id),
            request_id,
            client: conn.client,
            method: view.method.clone(),
            uri: view.uri.clone(),
            host: view.host.to_owned(),
            trusted_client,
            intent: intent::classify(view.method, view.headers),
            ..Record::default()
        }
    }

    async fn verdict(
        &self,
        config: &Arc<IngressConfig>,
        view: &RequestView<'_>,
        conn: ConnInfo,
        record: &mut Record,
        in_flight: &mut Option<InFlight>,
    ) -> Verdict {
        if let Some(answer) = &view.malformed {
            return Verdict::Answer(answer.clone());
        }
        if view.head_bytes > config.max_request_header_bytes {
            return Verdict::Answer(Answer::HeaderTooLarge);
        }
        let (counted, before) = InFlight::enter(&self.in_flight);
        *in_flight = Some(counted);
        if before >= config.max_concurrent_requests {
            return Verdict::Answer(Answer::Overloaded);
        }
        if let Some(answer) = https_redirect(config, view, conn) {
            return Verdict::Answer(answer);
        }
        // Where the pod's path starts: `(prefix, the path and query the pod gets)` on the
        // path-routing host; `None` on pod hosts.
        let mut scoped: Option<(String, String)> = None;
        let routed = match config
            .path_routing_host
            .as_ref()
            .filter(|h| path_routing::is_routing_host(view.host, h.as_str()))
        {
            Some(_) => {
                record.route = RouteKind::Pod;
                match path_routing::route(view.uri.path()) {
                    PathRoute::NotAPod => return Verdict::Answer(Answer::NotAPodPath),
                    PathRoute::AddSlash => {
                        let query = view
                            .uri
                            .query()
                            .map(|q| format!("?{q}"))
                            .unwrap_or_default();
                        return Verdict::Answer(Answer::AddSlash {
                            location: format!("{}/{query}", view.uri.path()),
                        });
                    }
                    PathRoute::Pod { pod, prefix, rest } => {
                        let query = view
                            .uri
                            .query()
                            .map(|q| format!("?{q}"))
                            .unwrap_or_default();
                        scoped = Some((prefix, format!("{rest}{query}")));
                        Route::Pod(pod)
                    }
                }
            }
            None => host::route(view.host, &config.base_domains),
        };
        let pod = match routed {
            Route::Dashboard => {
                record.route = RouteKind::Dashboard;
                let target = Target::Dashboard {
                    addr: config.dashboard_upstream,
                };
                return Verdict::Forward(plan(config, view, conn, record, target, None));
            }
            Route::BadPort(digits) => {
                record.route = RouteKind::Pod;
                return Verdict::Answer(Answer::BadPort(digits));
            }
            Route::BadSlug => {
                record.route = RouteKind::Pod;
                return Verdict::Answer(Answer::BadHost);
            }
            Route::Pod(pod) => pod,
        };
        record.pod = Some(pod.clone());
        if cors::is_preflight(view.method, view.headers) {
            record.route = RouteKind::Pod;
            if config.cors == CorsMode::Pass || config.cors_pass_ports.contains(&pod.port) {
                return self
                    .pass_preflight(config, view, conn, record, &pod, scoped)
                    .await;
            }
            let granted = cors::preflight(view.headers).filter(|p| {
                config.cors == CorsMode::SamePod
                    && cors::origin_allowed(
                        &p.origin,
                        &pod,
                        &config.base_domains,
                        &config.dashboard_origin,
                    )
            });
            return Verdict::Answer(granted.map_or(Answer::CorsRefused, Answer::Preflight));
        }
        let scope = scoped.as_ref().map_or("", |(prefix, _)| prefix.as_str());
        let pod_target = scoped.as_ref().map_or_else(
            || view.uri.path_and_query().map_or("/", |p| p.as_str()),
            |(_, target)| target.as_str(),
        );
        let pod_path = pod_target.split_once('?').map_or(pod_target, |(p, _)| p);
        if pod_path == CALLBACK_PATH {
            record.route = RouteKind::Callback;
            let query = CallbackQuery::parse(view.uri.query().unwrap_or(""));
            let secure = conn.tls || config.dashboard_https;
            let answer =
                callback::answer(&self.verifier, &pod, &query, secure, (self.clock)(), scope);
            return Verdict::Answer(Answer::Callback(answer));
        }
        record.route = RouteKind::Pod;
        let secure = conn.tls || config.dashboard_https;
        let judged = self
            .judge_pod(
                config,
                view,
                record.intent,
                &pod,
                (secure, scope, pod_target),
                || lookup_client(record, view),
            )
            .await;
        let action = match pod_path {
            START_PATH => Some(Action::Start),
            STOP_PATH => Some(Action::Stop),
            _ => None,
        };
        if let Some(action) = action {
            if view.method != http::Method::POST {
                return Verdict::Answer(Answer::MethodNotAllowed);
            }
            return Verdict::Answer(
                self.lifecycle_action(config, view, conn, record, &pod, action, judged)
                    .await,
            );
        }
        let status_json = match pod_path {
            STATUS_PAGE_PATH => Some(false),
            STATUS_JSON_PATH => Some(true),
            _ => None,
        };
        let user = judged.user.clone();
        let pod_id = judged.pod_id.clone();
        if let Some(json) = status_json {
            // For whoever may reach the pod, running or not; never forwarded.
            let status = match self.apply(record, judged) {
                Ok(_) => "running".to_owned(),
                Err(Answer::PodUnavailable { status, .. }) => status,
                Err(other) => return Verdict::Answer(other),
            };
            let lifecycle = self.lifecycle(config, user.as_ref(), &pod, &status, scope);
            return Verdict::Answer(Answer::PodStatus {
                status,
                json,
                lifecycle,
            });
        }
        match self.apply(record, judged) {
            Ok(allowed) => {
                if config.rate_limits.any()
                    && let Some(limited) = self.rate_limit(config, record, &allowed).await
                {
                    return Verdict::Answer(limited);
                }
                let mut plan = plan(
                    config,
                    view,
                    conn,
                    record,
                    allowed.target,
                    allowed.forward_cookie.as_deref(),
                );
                plan.add_response
                    .push((header::CONTENT_SECURITY_POLICY, config.frame_policy.clone()));
                if let Some(cookie) = allowed
                    .set_cookie
                    .and_then(|c| http::HeaderValue::try_from(c).ok())
                {
                    plan.add_response.push((header::SET_COOKIE, cookie));
                }
                plan.cors_origin = cors_grant(config, view, &pod);
                if allowed.machine.is_some_and(|m| m.strip_authorization) {
                    plan.edits.push(HeaderEdit::Remove(header::AUTHORIZATION));
                }
                if config
                    .control
                    .as_ref()
                    .is_some_and(|c| c.activity_interval.is_some())
                {
                    let touch = control::Touch {
                        activity: self.activity.clone(),
                        pod: allowed.grant.pod_id.clone(),
                        user: allowed.grant.user.clone(),
                        clock: self.clock,
                    };
                    if !self
                        .activity
                        .record(&touch.pod, &touch.user, (self.clock)())
                    {
                        self.metrics.activity_dropped(1);
                    }
                    plan.activity = Some(touch);
                }
                plan.grant = Some(Arc::new(allowed.grant));
                scope_plan(&mut plan, scoped);
                Verdict::Forward(plan)
            }
            Err(Answer::PodUnavailable {
                status,
                reason,
                lifecycle: _,
            }) => {
                let mut lifecycle = self.lifecycle(config, user.as_ref(), &pod, &status, scope);
                if record.intent.navigation
                    && status == "stopped"
                    && let (Some(control), Some(user), Some(pod_id)) = (
                        config.control.as_ref().filter(|c| c.wake_on_request),
                        user.as_ref(),
                        pod_id.as_ref(),
                    )
                {
                    self.wake(control, &pod, pod_id, user, record);
                    lifecycle.waking = true;
                    lifecycle.can_start = false;
                }
                Verdict::Answer(Answer::PodUnavailable {
                    status,
                    reason,
                    lifecycle,
                })
            }
            Err(answer) => Verdict::Answer(answer),
        }
    }

    /// Takes `cost` directory lookups from `client`'s `lookups_per_client` budget; the 429
    /// when it is spent (no client address, or the limit off: allowed).
    fn lookup_budget(
        &self,
        config: &IngressConfig,
        client: Option<IpAddr>,
        cost: usize,
    ) -> Option<Answer> {
        let client = client?;
        config.rate_limits.lookups_per_client?;
        let now_ms = unix_ms();
        let (check, verdict) =
            self.limiter
                .check_lookups(&config.rate_limits, client, cost, now_ms);
        self.metrics
            .rate_limit("lookup", verdict.outcome(), "memory");
        if matches!(verdict, crate::rate_limit::Verdict::Limited { .. })
            && self.limiter.lookup_warning_due(now_ms)
        {
            tracing::warn!(
                %client,
                "a client is over lookups_per_client (directory lookups before sign-in): answered \
                 429; if this address is a proxy in front of the ingress, list it in \
                 trusted_proxies so its clients are counted apart (logged at most every 10 s)"
            );
        }
        rate_limited(&check, &verdict)
    }

    /// Checks the request against its kind's rate limits and quotas; the answer when over.
    async fn rate_limit(
        &self,
        config: &IngressConfig,
        record: &Record,
        allowed: &Allowed,
    ) -> Option<Answer> {
        use crate::rate_limit::{Backend, Check, Kind, RedisEvent};
        let kind = if allowed.machine.is_some() {
            Kind::Api
        } else {
            Kind::Browser
        };
        let check = Check::of(
            &config.rate_limits,
            kind,
            allowed.grant.user.as_str(),
            allowed.grant.pod_id.as_str(),
        );
        if check.counters.is_empty() {
            return None;
        }
        let (verdict, backend, event) = self
            .limiter
            .check(&config.rate_limits, &check, unix_ms())
            .await;
        match event {
            RedisEvent::Failed => {
                self.metrics.redis_failure();
                tracing::warn!(parent: &record.span, request_id = %record.request_id, "Redis did not answer a rate-limit check in time: this gateway counts limits in memory until it does");
            }
            RedisEvent::Recovered => {
                tracing::info!(parent: &record.span, request_id = %record.request_id, "Redis answers rate-limit checks again");
            }
            RedisEvent::None
                if backend == Backend::Memory && config.rate_limits.redis_url.is_some() =>
            {
                // Still in memory after a failure (counted once, at the failure).
            }
            RedisEvent::None => {}
        }
        self.metrics
            .rate_limit(kind.as_str(), verdict.outcome(), backend.as_str());
        rate_limited(&check, &verdict)
    }

    /// What a status page offers this user: Start and Stop where they apply, with a CSRF token
    /// bound to the user and pod, when a control plane is configured.
    fn lifecycle(
        &self,
        config: &IngressConfig,
        user: Option<&UserId>,
        pod: &PodHost,
        status: &str,
        scope: &str,
    ) -> Lifecycle {
        let control = config.control.as_ref();
        Lifecycle {
            can_start: control.is_some() && Action::Start.applies_to(status),
            can_stop: control.is_some() && Action::Stop.applies_to(status),
            csrf: control.zip(user).map(|(c, user)| {
                control::csrf_token(&c.secret, user, pod.slug.as_str(), (self.clock)())
            }),
            scope: scope.to_owned(),
            waking: false,
        }
    }

    /// `POST /__pinacle/status/start|stop`: the user must be allowed the pod, the request must
    /// come from the pod's own page (same origin, a valid CSRF token), a control plane must be
    /// configured and the action must apply to the pod's status; then the control plane is
    /// asked, bounded by `control_timeout`.
    #[allow(clippy::too_many_arguments)]
    async fn lifecycle_action(
        &self,
        config: &IngressConfig,
        view: &RequestView<'_>,
        conn: ConnInfo,
        record: &mut Record,
        pod: &PodHost,
        action: Action,
        judged: Judged,
    ) -> Answer {
        let user = judged.user.clone();
        let pod_id = judged.pod_id.clone();
        let status = match self.apply(record, judged) {
            Ok(_) => "running".to_owned(),
            Err(Answer::PodUnavailable { status, .. }) => status,
            Err(other) => return other,
        };
        let (Some(user), Some(pod_id)) = (user, pod_id) else {
            return Answer::Internal;
        };
        if let Some(why) = cross_site(view, conn) {
            tracing::warn!(parent: &record.span, request_id = %record.request_id, why, action = action.as_str(), "pod lifecycle request refused");
            return Answer::LifecycleForbidden { why };
        }
        let Some(control) = config.control.as_ref() else {
            return Answer::LifecycleUnavailable;
        };
        let csrf = view
            .headers
            .get(control::CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !control::csrf_valid(
            &control.secret,
            &user,
            pod.slug.as_str(),
            csrf,
            (self.clock)(),
        ) {
            tracing::warn!(parent: &record.span, request_id = %record.request_id, action = action.as_str(), "pod lifecycle request without a valid CSRF token");
            return Answer::LifecycleForbidden {
                why: "This page's form token is missing or expired: reload the page and try again",
            };
        }
        if !action.applies_to(&status) {
            return Answer::LifecycleConflict { action, status };
        }
        let outcome = self
            .control
            .lifecycle(control, action, &pod_id, &user, (self.clock)())
            .await;
        self.metrics.control_call(action.as_str(), outcome.as_str());
        match &outcome {
            ControlOutcome::Accepted | ControlOutcome::InTransition => {
                tracing::info!(parent: &record.span, request_id = %record.request_id, action = action.as_str(), pod_id = pod_id.as_str(), result = outcome.as_str(), "pod lifecycle request passed to the control plane");
                // The status is about to change: ask the directory again.
                self.authorizer.invalidate_pod(&pod.slug);
            }
            ControlOutcome::Refused { status, message } => {
                tracing::warn!(parent: &record.span, request_id = %record.request_id, action = action.as_str(), pod_id = pod_id.as_str(), status, message = %message, "the control plane refused a pod lifecycle request");
            }
            ControlOutcome::Unreachable | ControlOutcome::TimedOut => {
                tracing::warn!(parent: &record.span, request_id = %record.request_id, action = action.as_str(), pod_id = pod_id.as_str(), result = outcome.as_str(), url = %control.url, "the control plane could not be asked");
            }
        }
        Answer::Control { action, outcome }
    }

    /// Asks the control plane to start a stopped pod a navigation reached (`wake_on_request`),
    /// in the background: one call per pod at a time, and none again for a while after one
    /// was accepted (the pod is on its way; the page follows it).
    fn wake(
        &self,
        control: &ControlConfig,
        pod: &PodHost,
        pod_id: &pinacle_authz::PodId,
        user: &UserId,
        record: &Record,
    ) {
        let Some(waking) = self.wakes.begin(pod_id) else {
            return;
        };
        let client = self.control.clone();
        let authorizer = self.authorizer.clone();
        let metrics = self.metrics.clone();
        let (control, slug, pod_id, user) = (
            control.clone(),
            pod.slug.clone(),
            pod_id.clone(),
            user.clone(),
        );
        let request_id = record.request_id.clone();
        let now = (self.clock)();
        tokio::spawn(async move {
            let outcome = client
                .lifecycle(&control, Action::Start, &pod_id, &user, now)
                .await;
            metrics.control_call("wake", outcome.as_str());
            match &outcome {
                ControlOutcome::Accepted | ControlOutcome::InTransition => {
                    tracing::info!(
                        request_id,
                        pod_id = pod_id.as_str(),
                        result = outcome.as_str(),
                        "woke a stopped pod on request"
                    );
                    authorizer.invalidate_pod(&slug);
                    tokio::time::sleep(WAKE_COOLDOWN).await;
                }
                ControlOutcome::Refused { status, message } => {
                    tracing::warn!(request_id, pod_id = pod_id.as_str(), status, message = %message, "the control plane refused to wake a pod");
                }
                ControlOutcome::Unreachable | ControlOutcome::TimedOut => {
                    tracing::warn!(request_id, pod_id = pod_id.as_str(), result = outcome.as_str(), url = %control.url, "the control plane could not be asked to wake a pod");
                }
            }
            drop(waking);
        });
    }

    /// A CORS preflight passed to the pod unauthenticated (`cors_preflight = "pass"`): where
    /// the slug's pod is, without a user; credentials are removed as always. A pod that cannot
    /// be reached, or none, is refused like any preflight (nothing told about it).
    async fn pass_preflight(
        &self,
        config: &Arc<IngressConfig>,
        view: &RequestView<'_>,
        conn: ConnInfo,
        record: &mut Record,
        pod: &PodHost,
        scoped: Option<(String, String)>,
    ) -> Verdict {
        record.authz = "cors_pass";
        if !self.authorizer.is_located(&pod.slug)
            && let Some(limited) = self.lookup_budget(config, lookup_client(record, view), 1)
        {
            record.authz = "lookups_limited";
            return Verdict::Answer(limited);
        }
        match self.authorizer.locate(&pod.slug).await {
            Ok(Decision::Allow {
                pod_id, upstream, ..
            }) => {
                let Some(reach) = self.reach(upstream) else {
                    return Verdict::Answer(Answer::TunnelOffline);
                };
                let target = pod_upstream(config, pod, pod_id, reach);
                let mut plan = plan(config, view, conn, record, target, None);
                scope_plan(&mut plan, scoped);
                Verdict::Forward(plan)
            }
            Ok(_) => Verdict::Answer(Answer::CorsRefused),
            Err(e) => {
                record.authz = "directory_error";
                tracing::warn!(parent: &record.span, request_id = %record.request_id, error = %e, "pod lookup for a preflight failed");
                Verdict::Answer(Answer::AuthorizationUnavailable)
            }
        }
    }

    /// The answer to a pod request without usable credentials.
    fn unauthenticated(
        config: &IngressConfig,
        pod: &PodHost,
        path_and_query: &str,
        intent: Intent,
    ) -> Answer {
        if intent.navigation {
            Answer::SignIn {
                location: callback::sign_in_location(&config.dashboard_url, pod, path_and_query),
            }
        } else {
            Answer::Unauthenticated
        }
    }

    /// Authenticates and authorizes a pod request (cache fills aside, no side effects;
    /// [`Self::apply`] records it).
    async fn judge_pod(
        &self,
        config: &IngressConfig,
        view: &RequestView<'_>,
        intent: Intent,
        pod: &PodHost,
        (secure, scope, pod_target): (bool, &str, &str),
        client: impl FnOnce() -> Option<IpAddr>,
    ) -> Judged {
        let now = (self.clock)();
        let cookies = cookie_header(view.headers);
        let mut inspection = self.verifier.inspect(&cookies, now);
        // Moved out (not cloned): only the credential cookie names are needed afterwards.
        let verification = std::mem::replace(
            &mut inspection.verification,
            Verification::Decided(Outcome::Missing),
        );
        let sessions: Vec<SessionToken> = match &verification {
            Verification::DatabaseSessions(candidates) => {
                candidates.iter().map(|c| c.token.clone()).collect()
            }
            Verification::Decided(_) => Vec::new(),
        };
        let mut judged = Judged {
            verdict: Err(Answer::Internal),
            authz: "none",
            pod_id: None,
            user: None,
            user_email: None,
            lookup: None,
            directory_error: None,
            machine: None,
        };
        // A machine's credentials, when it presents ours, decide alone (a cookie beside them
        // is still stripped, never used).
        let machine = match self.machine(config, view, now).await {
            MachineCheck::Absent => None,
            MachineCheck::Invalid(reason) => {
                judged.authz = reason;
                judged.verdict = Err(Answer::ApiUnauthorized);
                return judged;
            }
            MachineCheck::Valid(machine, bearer_ours) => Some((machine, bearer_ours)),
        };
        let principal: Option<Principal> = match &machine {
            Some((m, bearer_ours)) => {
                judged.user = Some(m.user.clone());
                judged.machine = Some(MachineUse {
                    kind: m.kind,
                    strip_authorization: *bearer_ours,
                });
                if !m.scope.allows(pod.slug.as_str(), pod.port) {
                    judged.authz = "api_scope";
                    judged.verdict = Err(Answer::Forbidden);
                    return judged;
                }
                None
            }
            None => {
                let needed = self.authorizer.lookups_needed(&verification);
                if needed > 0
                    && let Some(limited) = self.lookup_budget(config, client(), needed)
                {
                    judged.authz = "lookups_limited";
                    judged.verdict = Err(limited);
                    return judged;
                }
                let outcome = match self.authorizer.resolve(verification, now).await {
                    Ok(outcome) => outcome,
                    Err(e) => return judged.directory_failed("session lookup", e),
                };
                match outcome {
                    Outcome::Valid(p) => Some(p),
                    other => {
                        judged.authz = match other {
                            Outcome::Expired { .. } => "expired",
                            Outcome::Invalid { .. } => "invalid",
                            _ => "missing",
                        };
                        judged.verdict =
                            Err(Self::unauthenticated(config, pod, pod_target, intent));
                        return judged;
                    }
                }
            }
        };
        if let Some(principal) = &principal {
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
                judged.verdict = Err(Self::unauthenticated(config, pod, pod_target, intent));
                return judged;
            }
        }
        let Some(user) = judged.user.clone() else {
            return judged;
        };
        let decision = match self
            .authorizer
            .authorize_with_lookup(&user, &pod.slug)
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
                judged.pod_id = Some(pod_id.clone());
                if let Some(scope) = principal.as_ref().and_then(|p| p.scope.as_ref())
                    && scope.pod_id != pod_id
                {
                    // A token for an earlier pod with this slug: get a fresh one.
                    (
                        "token_for_replaced_pod",
                        Err(Self::unauthenticated(config, pod, pod_target, intent)),
                    )
                } else if let Some(reach) = self.reach(upstream) {
                    let set_cookie = principal
                        .as_ref()
                        .and_then(|p| self.verifier.renewal(p, now))
                        .map(|(token, embed)| {
                            callback::proxy_token_cookie(&token, embed, secure, scope)
                        });
                    let stale = judged.lookup == Some(pinacle_authz::CacheLookup::Stale);
                    (
                        if stale { "allow_stale" } else { "allow" },
                        Ok(Allowed {
                            machine: judged.machine,
                            grant: Grant {
                                user: user.clone(),
                                slug: pod.slug.clone(),
                                pod_id: pod_id.clone(),
                                upstream,
                                sessions,
                            },
                            target: pod_upstream(config, pod, pod_id, reach),
                            forward_cookie: inspection
                                .forwardable_cookie_header(&cookies)
                                .map(std::borrow::Cow::into_owned),
                            set_cookie,
                        }),
                    )
                } else {
                    // Its server has a registered agent and no tunnel is up.
                    ("tunnel_offline", Err(Answer::TunnelOffline))
                }
            }
            Decision::Unavailable {
                status,
                reason,
                pod_id,
            } => {
                judged.pod_id = Some(pod_id);
                (
                    "allow_unavailable",
                    Err(Answer::PodUnavailable {
                        status: status.as_str().to_owned(),
                        reason: reason.as_str(),
                        lifecycle: Lifecycle {
                            scope: scope.to_owned(),
                            ..Lifecycle::default()
                        },
                    }),
                )
            }
            Decision::Deny(reason) => (reason.as_str(), Err(Answer::Forbidden)),
        };
        judged.authz = authz;
        judged.verdict = verdict;
        judged
    }

    /// Where `upstream` is reached: itself, or the bridge of its server's agent tunnel; `None`
    /// when its server has a registered agent that is not connected.
    fn reach(&self, upstream: std::net::SocketAddr) -> Option<std::net::SocketAddr> {
        match self.agents.route(upstream) {
            crate::agents::Route::Direct => Some(upstream),
            crate::agents::Route::Tunnel(bridge) => Some(bridge),
            crate::agents::Route::Offline => None,
        }
    }

    /// The request's machine credentials (`[api]`): an HMAC signature when it names a client,
    /// else a bearer token of ours (an unknown key id fetches the JWKS URL again, at most once
    /// per `jwks_refresh_interval`, bounded by `jwks_timeout`).
    async fn machine(
        &self,
        config: &IngressConfig,
        view: &RequestView<'_>,
        now: i64,
    ) -> MachineCheck {
        use crate::api_auth::{self, Bearer, Verdict as Machine};
        let Some(api_arc) = config.api.as_ref() else {
            return MachineCheck::Absent;
        };
        let api = &**api_arc;
        let signed = api_auth::Signed {
            method: view.method.as_str(),
            host: view.host,
            path_and_query: view.uri.path_and_query().map_or("/", |p| p.as_str()),
        };
        if let Some(verdict) = api_auth::verify_hmac(view.headers, signed, api, now) {
            return match verdict {
                Machine::Valid(m) => MachineCheck::Valid(m, false),
                Machine::Invalid(reason) => MachineCheck::Invalid(reason),
                Machine::Absent => MachineCheck::Absent,
            };
        }
        let Some(token) = view
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| api_auth::bearer_token(v.as_bytes()))
        else {
            return MachineCheck::Absent;
        };
        let mut url_keys = self.url_keys.current();
        let Bearer::Ours { token, unknown_kid } = api_auth::classify(token, api, &url_keys) else {
            return MachineCheck::Absent;
        };
        if unknown_kid.is_some()
            && let Some(url) = &api.jwks_url
            && self
                .url_keys
                .refresh_on_unknown_kid(url, api, &self.metrics)
                .await
        {
            url_keys = self.url_keys.current();
        }
        if let Some(machine) = self.verified_tokens.get(token, api_arc, &url_keys, now) {
            return MachineCheck::Valid(machine, true);
        }
        match api_auth::verify_jwt(token, api, &url_keys, now) {
            Machine::Valid(m) => {
                self.verified_tokens.insert(token, &m, api_arc, &url_keys);
                MachineCheck::Valid(m, true)
            }
            Machine::Invalid(reason) => MachineCheck::Invalid(reason),
            Machine::Absent => MachineCheck::Absent,
        }
    }

    /// Records a judgement in the request's record, the metrics and the log.
    fn apply(&self, record: &mut Record, judged: Judged) -> Result<Allowed, Answer> {
        record.authz = judged.authz;
        record.credential = judged.machine.map(|m| m.kind);
        record.user = judged.user;
        record.user_email = judged.user_email;
        if let Some(lookup) = judged.lookup {
            self.metrics.authz_lookup(lookup);
        }
        if let Some((what, e)) = &judged.directory_error {
            record.directory_error = Some(match e {
                DirectoryError::Unavailable(_) => "directory_unavailable",
                DirectoryError::Timeout => "directory_timeout",
                DirectoryError::Query(_) => "directory_query",
            });
            tracing::warn!(parent: &record.span, request_id = %record.request_id, error = %e, "{what} failed");
        }
        judged.verdict
    }
}

/// How long after an accepted wake no other is sent for the pod.
const WAKE_COOLDOWN: std::time::Duration = std::time::Duration::from_secs(10);

/// Why a Start or Stop did not come from the pod's own page: `Origin` must be present and
/// name this host (https on TLS), and `Sec-Fetch-Site`, when sent, must be `same-origin`.
fn cross_site(view: &RequestView<'_>, conn: ConnInfo) -> Option<&'static str> {
    const WHY: &str = "Start and Stop only work from the pod's own status page";
    if view
        .headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes() != b"same-origin")
    {
        return Some(WHY);
    }
    let origin = view
        .headers
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok());
    let Some((scheme, authority)) = origin.and_then(|o| o.split_once("://")) else {
        return Some(WHY);
    };
    let scheme_ok = match scheme {
        "https" => true,
        "http" => !conn.tls,
        _ => false,
    };
    (!scheme_ok || !authority.eq_ignore_ascii_case(view.host)).then_some(WHY)
}

/// On the cleartext listener (`listen`) with TLS configured and `http_redirect_to_https`: 308 to https,
/// except health checks.
fn https_redirect(
    config: &IngressConfig,
    view: &RequestView<'_>,
    conn: ConnInfo,
) -> Option<Answer> {
    let tls = config.tls.as_ref().filter(|t| t.redirect_http)?;
    if conn.tls {
        return None;
    }
    if matches!(view.uri.path(), "/healthz" | "/readyz") {
        return Some(Answer::Health);
    }
    let port = match tls.listen.port() {
        443 => String::new(),
        p => format!(":{p}"),
    };
    let path = view.uri.path_and_query().map_or("/", |p| p.as_str());
    Some(Answer::HttpsRedirect {
        location: format!("https://{}{port}{path}", host_without_port(view.host)),
    })
}

/// A pod's upstream target, with the `Host` its nginx routes by.
fn pod_upstream(
    config: &IngressConfig,
    pod: &PodHost,
    pod_id: pinacle_authz::PodId,
    addr: std::net::SocketAddr,
) -> Target {
    let domain = config
        .upstream_domain
        .as_ref()
        .or_else(|| config.base_domains.get(pod.base));
    Target::Pod {
        addr,
        pod_id,
        host: domain.map_or_else(String::new, |d| upstream::pod_upstream_host(pod, d)),
    }
}

/// Path routing's part of a plan: the target without the prefix, the prefix named to the pod
/// (`X-Forwarded-Prefix`) and put back on `Location`s.
fn scope_plan(plan: &mut Plan, scoped: Option<(String, String)>) {
    let Some((prefix, target)) = scoped else {
        return;
    };
    plan.edits.push(HeaderEdit::Set(
        http::HeaderName::from_static("x-forwarded-prefix"),
        prefix.as_bytes().to_vec(),
    ));
    plan.upstream_target = Some(target);
    plan.location_prefix = Some(prefix);
}

/// The `Origin` of a cross-origin request to `pod` that the pod's CORS mode grants.
fn cors_grant(
    config: &IngressConfig,
    view: &RequestView<'_>,
    pod: &PodHost,
) -> Option<http::HeaderValue> {
    if config.cors != CorsMode::SamePod {
        return None;
    }
    let origin = view.headers.get(header::ORIGIN)?;
    let text = origin.to_str().ok()?;
    cors::origin_allowed(text, pod, &config.base_domains, &config.dashboard_origin)
        .then(|| origin.clone())
}

/// The plan for a request allowed to `target`: its header edits and what applies to the
/// response.
fn plan(
    config: &Arc<IngressConfig>,
    view: &RequestView<'_>,
    conn: ConnInfo,
    record: &mut Record,
    target: Target,
    forward_cookie: Option<&[u8]>,
) -> Plan {
    let edits = upstream::forwarding_edits(&Forwarding {
        target: &target,
        cookie: forward_cookie,
        client_ip: conn.client.map(|a| a.ip()),
        trusted_client: record.trusted_client,
        trusted_forwarded_for: if record.trusted_client {
            view.headers
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
        } else {
            None
        },
        tls: conn.tls,
        original_host: view.host,
        request_id: &record.request_id,
    });
    let mut edits = edits;
    if record.trusted_client {
        // Our HMAC fields never travel on (an untrusted client's are `RemoveSpoofable`'s).
        for name in [
            crate::api_auth::CLIENT_HEADER,
            crate::api_auth::TIMESTAMP_HEADER,
            crate::api_auth::SIGNATURE_HEADER,
        ] {
            if view.headers.contains_key(name) {
                edits.push(HeaderEdit::Remove(http::HeaderName::from_static(name)));
            }
        }
    }
    record.upstream = Some(target.addr());
    Plan {
        tunnel: record.intent.upgrade && !view.http2,
        target,
        edits,
        add_response: Vec::new(),
        cors_origin: None,
        grant: None,
        activity: None,
        upstream_target: None,
        location_prefix: None,
        config: config.clone(),
    }
}

/// A pod request's judgement, not yet recorded.
struct Judged {
    verdict: Result<Allowed, Answer>,
    authz: &'static str,
    /// The pod the user may reach (allowed or unavailable).
    pod_id: Option<pinacle_authz::PodId>,
    user: Option<UserId>,
    user_email: Option<String>,
    lookup: Option<pinacle_authz::CacheLookup>,
    directory_error: Option<(&'static str, DirectoryError)>,
    /// The request came with a machine's credentials.
    machine: Option<MachineUse>,
}

/// How a machine's credentials were used.
#[derive(Debug, Clone, Copy)]
struct MachineUse {
    /// `jwt` or `hmac`.
    kind: &'static str,
    /// The `Authorization` field was ours: removed before forwarding.
    strip_authorization: bool,
}

/// What a request's machine credentials came to.
enum MachineCheck {
    Absent,
    Invalid(&'static str),
    /// Valid; whether it was our bearer token (else an HMAC signature).
    Valid(crate::api_auth::Machine, bool),
}

/// Where an allowed pod request goes, the `Cookie` left for it, what it was allowed under, and
/// a renewed proxy token's `Set-Cookie`.
struct Allowed {
    /// The machine credential it came with.
    machine: Option<MachineUse>,
    target: Target,
    forward_cookie: Option<Vec<u8>>,
    grant: Grant,
    set_cookie: Option<String>,
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

/// The 429 for a check over its limit.
fn rate_limited(
    check: &crate::rate_limit::Check,
    verdict: &crate::rate_limit::Verdict,
) -> Option<Answer> {
    match *verdict {
        crate::rate_limit::Verdict::Allowed => None,
        crate::rate_limit::Verdict::Limited {
            retry_after, daily, ..
        } => Some(Answer::RateLimited {
            retry_after,
            fields: crate::rate_limit::fields(check, verdict),
            daily,
        }),
    }
}

/// Now, in unix milliseconds (rate limits).
fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The address directory lookups before sign-in are counted against: the client a trusted
/// proxy names last in `X-Forwarded-For` (the one it saw), else the peer.
fn lookup_client(record: &Record, view: &RequestView<'_>) -> Option<IpAddr> {
    let peer = record.client.map(|a| a.ip());
    if !record.trusted_client {
        return peer;
    }
    view.headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .next_back()
        .and_then(|last| last.trim().parse().ok())
        .or(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_from_trusted_proxies_must_be_short_and_printable() {
        assert!(acceptable_request_id("abc-123_x.y:z"));
        assert!(!acceptable_request_id(""));
        assert!(!acceptable_request_id("has space"));
        assert!(!acceptable_request_id(&"a".repeat(129)));
    }

    #[test]
    fn the_redirect_host_loses_only_a_numeric_port() {
        assert_eq!(host_without_port("a.example:8080"), "a.example");
        assert_eq!(host_without_port("a.example"), "a.example");
        assert_eq!(host_without_port("[::1]:80"), "[::1]");
    }
}
