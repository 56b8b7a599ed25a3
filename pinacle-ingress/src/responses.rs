//! Every response the ingress makes itself, and only here: a stable status, body (JSON, or a
//! small HTML page for browsers where one helps) and headers. Each carries the request id and
//! the `x-pinacle-ingress` marker naming the answer, so nobody mistakes it for the pod's.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use serde_json::json;

use crate::callback::CallbackAnswer;
use crate::control::Outcome;

/// The header that marks a response as the ingress's own; its value names the answer.
pub const MARKER_HEADER: &str = "x-pinacle-ingress";
/// The request id header (taken from the request when present, else generated).
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Seconds a browser waits before reloading the "pod not running" page.
pub const UNAVAILABLE_RETRY_SECS: u32 = 5;

/// What the ingress answers itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// A pod host with a port outside 1..=65535 (the digits as written).
    BadPort(String),
    /// A pod-shaped host that cannot name a pod.
    BadHost,
    /// No usable credentials on a navigation: go and sign in.
    SignIn {
        /// The dashboard's `/api/proxy-auth` URL.
        location: String,
    },
    /// No usable credentials on anything but a navigation.
    Unauthenticated,
    /// Authenticated, but no access (or no such pod: the two are not told apart).
    Forbidden,
    /// The user may reach the pod but it is not running or has nowhere to send traffic.
    PodUnavailable {
        /// The pod's status.
        status: String,
        /// What is missing (stable name).
        reason: &'static str,
        /// What the page offers (Start, Stop) and where it follows the status.
        lifecycle: Lifecycle,
    },
    /// The directory (database) could not answer: fail closed.
    AuthorizationUnavailable,
    /// The upstream refused or dropped the connection.
    UpstreamRefused,
    /// The upstream did not answer in time.
    UpstreamTimeout,
    /// The request could not be read (malformed, or the client was too slow).
    BadRequest,
    /// A bug or an unexpected failure inside the ingress.
    Internal,
    /// The `/pinacle-proxy-callback` answer.
    Callback(CallbackAnswer),
    /// The request head is larger than `max_request_header_bytes`.
    HeaderTooLarge,
    /// Plain HTTP with TLS configured: go to https.
    HttpsRedirect {
        /// The https URL.
        location: String,
    },
    /// A health check on the cleartext listener (`listen`) while it redirects everything else.
    Health,
    /// `max_concurrent_requests` reached.
    Overloaded,
    /// The request head did not arrive within `request_header_timeout`.
    RequestHeaderTimeout,
    /// `max_connections` reached: answered, then the connection is closed.
    TooManyConnections,
    /// A CORS preflight from an origin the pod grants ([`crate::cors`]): 204 with the grant.
    Preflight(crate::cors::Preflight),
    /// A CORS preflight from any other origin, or a malformed one: 403, no grant.
    CorsRefused,
    /// The pod's nginx found nothing listening on the port (a dev server still starting): 502;
    /// with `timed_out`, the port accepted but did not answer in time: 504. Recognised by the
    /// pod nginx's marker ([`POD_ROUTER_HEADER`]), never by the status alone: an app's own 502
    /// is relayed as it is.
    PortNotAnswering {
        /// It accepted the connection but did not answer in time.
        timed_out: bool,
    },
    /// A path on the path-routing host that names no pod and port: 404.
    NotAPodPath,
    /// `/__pinacle/status` (a page) or `/__pinacle/status.json`, for a user who may reach the
    /// pod: its status, never forwarded to the pod.
    PodStatus {
        /// The pod's status (`running`, `stopped`, `starting`...).
        status: String,
        /// The JSON form.
        json: bool,
        /// What the page offers (Start, Stop) and where it follows the status.
        lifecycle: Lifecycle,
    },
    /// `/__pinacle/status/start|stop` with anything but `POST`: 405.
    MethodNotAllowed,
    /// A Start or Stop that did not come from the pod's own page (`Origin`, `Sec-Fetch-Site`)
    /// or lacks a valid CSRF token: 403, nothing asked of the control plane.
    LifecycleForbidden {
        /// What is wrong, for the user.
        why: &'static str,
    },
    /// Start or Stop without a control plane configured (`control_url`): 501.
    LifecycleUnavailable,
    /// Start or Stop that does not apply to the pod's status now: 409.
    LifecycleConflict {
        /// The action.
        action: crate::control::Action,
        /// The pod's status.
        status: String,
    },
    /// The pod's server is reached through an agent tunnel and none is connected: 502 at once.
    TunnelOffline,
    /// A machine credential of ours that does not hold (expired, wrong key or audience,
    /// bad signature, stale timestamp): 401, naming nothing inside.
    ApiUnauthorized,
    /// Over a rate limit or the daily quota: 429 with `Retry-After` and the `RateLimit-Policy`
    /// and `RateLimit` fields.
    RateLimited {
        /// Seconds until a request would pass.
        retry_after: u64,
        /// The `RateLimit*` fields ([`crate::rate_limit::fields`]).
        fields: Vec<(&'static str, String)>,
        /// The limit was the daily quota.
        daily: bool,
    },
    /// What the control plane said to a Start or Stop.
    Control {
        /// The action.
        action: crate::control::Action,
        /// Its answer.
        outcome: crate::control::Outcome,
    },
    /// `/_pod/<slug>/<port>` without its slash: 308 to the slash form.
    AddSlash {
        /// The slash form, query kept.
        location: String,
    },
}

/// What a pod's status page offers, and where it follows the status from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lifecycle {
    /// Start applies now (a control plane is configured and the pod is stopped).
    pub can_start: bool,
    /// Stop applies now (a control plane is configured and the pod runs).
    pub can_stop: bool,
    /// The token the page's buttons send ([`crate::control::csrf_token`]); none: no buttons.
    pub csrf: Option<String>,
    /// The path prefix the pod is served under (path routing; empty on pod hosts).
    pub scope: String,
    /// This request asked the control plane to start the pod (`wake_on_request`).
    pub waking: bool,
}

/// The field the pod's nginx marks its own answers with (`nginx-templates`): `not-listening`
/// on its 502 when nothing listens on the port, `timeout` on its 504.
pub const POD_ROUTER_HEADER: &str = "x-pinacle-pod-router";

/// What the pod's nginx says about a 502/504 it made itself: `Some(timed_out)`.
pub fn pod_router_failure(status: u16, marker: Option<&[u8]>) -> Option<bool> {
    match (status, marker?) {
        (502, b"not-listening") => Some(false),
        (504, b"timeout") => Some(true),
        _ => None,
    }
}

/// How an upstream failed, as every engine reports it before any byte of an answer reached the
/// client: the one mapping from upstream failures to our answers ([`Answer::upstream`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// Refused, reset, closed without an answer, or answered what cannot be relayed: 502.
    Refused,
    /// No connection or no answer in time: 504.
    TimedOut,
}

/// A response ready to be written: header and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Header fields in order (the marker, request id and framing are added by [`Reply::header`]).
    pub headers: Vec<(&'static str, String)>,
    /// The body.
    pub body: Bytes,
}

/// What a page for a person may say about the request; every field is optional.
#[derive(Debug, Clone, Copy, Default)]
pub struct Page<'a> {
    /// A browser navigation: HTML pages where a person should read the answer.
    pub navigation: bool,
    /// The pod and port asked for (pod hosts).
    pub pod: Option<(&'a str, u16)>,
    /// The request went to the dashboard route.
    pub dashboard_route: bool,
    /// Who is signed in, when known.
    pub user_email: Option<&'a str>,
    /// The request id, to quote when asking for help.
    pub request_id: &'a str,
    /// The dashboard's public URL (the way back; signing in as someone else).
    pub dashboard_url: &'a str,
}

/// Seconds before the first automatic retry of a page that waits for something (a pod that is
/// not running, an authorization that cannot be checked); each later retry waits twice as long,
/// up to [`RETRY_MAX_SECS`].
pub const RETRY_FIRST_SECS: u32 = UNAVAILABLE_RETRY_SECS;
/// The longest wait between automatic retries.
pub const RETRY_MAX_SECS: u32 = 120;

impl Answer {
    /// Every answer's [`Answer::name`] (metrics start each at zero).
    pub const NAMES: [&'static str; 38] = [
        "bad-port",
        "bad-host",
        "sign-in",
        "unauthenticated",
        "forbidden",
        "pod-unavailable",
        "authorization-unavailable",
        "upstream-refused",
        "upstream-timeout",
        "bad-request",
        "internal-error",
        "callback",
        "callback-refused",
        "header-too-large",
        "https-redirect",
        "health",
        "overloaded",
        "request-header-timeout",
        "too-many-connections",
        "cors-preflight",
        "cors-refused",
        "port-not-listening",
        "port-timeout",
        "not-a-pod-path",
        "add-slash",
        "pod-status",
        "method-not-allowed",
        "lifecycle-forbidden",
        "lifecycle-unavailable",
        "lifecycle-conflict",
        "control-accepted",
        "control-in-transition",
        "control-refused",
        "control-unreachable",
        "control-timeout",
        "api-unauthorized",
        "rate-limited",
        "tunnel-offline",
    ];

    /// Our answer to an upstream failure (every engine's).
    pub fn upstream(failure: UpstreamFailure) -> Self {
        match failure {
            UpstreamFailure::Refused => Self::UpstreamRefused,
            UpstreamFailure::TimedOut => Self::UpstreamTimeout,
        }
    }

    /// The stable name of the answer (the marker header's value and the logs' `answer`).
    pub fn name(&self) -> &'static str {
        match self {
            Self::BadPort(_) => "bad-port",
            Self::BadHost => "bad-host",
            Self::SignIn { .. } => "sign-in",
            Self::Unauthenticated => "unauthenticated",
            Self::Forbidden => "forbidden",
            Self::PodUnavailable { .. } => "pod-unavailable",
            Self::AuthorizationUnavailable => "authorization-unavailable",
            Self::UpstreamRefused => "upstream-refused",
            Self::UpstreamTimeout => "upstream-timeout",
            Self::BadRequest => "bad-request",
            Self::Internal => "internal-error",
            Self::Callback(CallbackAnswer::SetCookie { .. }) => "callback",
            Self::Callback(_) => "callback-refused",
            Self::HeaderTooLarge => "header-too-large",
            Self::HttpsRedirect { .. } => "https-redirect",
            Self::Health => "health",
            Self::Overloaded => "overloaded",
            Self::RequestHeaderTimeout => "request-header-timeout",
            Self::TooManyConnections => "too-many-connections",
            Self::Preflight(_) => "cors-preflight",
            Self::CorsRefused => "cors-refused",
            Self::PortNotAnswering { timed_out: false } => "port-not-listening",
            Self::PortNotAnswering { timed_out: true } => "port-timeout",
            Self::NotAPodPath => "not-a-pod-path",
            Self::PodStatus { .. } => "pod-status",
            Self::AddSlash { .. } => "add-slash",
            Self::MethodNotAllowed => "method-not-allowed",
            Self::LifecycleForbidden { .. } => "lifecycle-forbidden",
            Self::LifecycleUnavailable => "lifecycle-unavailable",
            Self::LifecycleConflict { .. } => "lifecycle-conflict",
            Self::ApiUnauthorized => "api-unauthorized",
            Self::TunnelOffline => "tunnel-offline",
            Self::RateLimited { .. } => "rate-limited",
            Self::Control { outcome, .. } => match outcome {
                Outcome::Accepted => "control-accepted",
                Outcome::InTransition => "control-in-transition",
                Outcome::Refused { .. } => "control-refused",
                Outcome::Unreachable => "control-unreachable",
                Outcome::TimedOut => "control-timeout",
            },
        }
    }

    /// The status code.
    pub fn status(&self) -> u16 {
        match self {
            Self::BadPort(_) | Self::BadHost | Self::BadRequest => 400,
            Self::SignIn { .. } => 302,
            Self::Unauthenticated => 401,
            Self::Forbidden => 403,
            Self::PodUnavailable { .. }
            | Self::AuthorizationUnavailable
            | Self::Overloaded
            | Self::TooManyConnections => 503,
            Self::RequestHeaderTimeout => 408,
            Self::UpstreamRefused => 502,
            Self::UpstreamTimeout => 504,
            Self::Internal => 500,
            Self::HeaderTooLarge => 431,
            Self::HttpsRedirect { .. } => 308,
            Self::Health => 200,
            Self::Preflight(_) => 204,
            Self::CorsRefused => 403,
            Self::PortNotAnswering { timed_out: false } => 502,
            Self::PortNotAnswering { timed_out: true } => 504,
            Self::NotAPodPath => 404,
            Self::PodStatus { .. } => 200,
            Self::AddSlash { .. } => 308,
            Self::MethodNotAllowed => 405,
            Self::LifecycleForbidden { .. } => 403,
            Self::LifecycleUnavailable => 501,
            Self::LifecycleConflict { .. } => 409,
            Self::ApiUnauthorized => 401,
            Self::TunnelOffline => 502,
            Self::RateLimited { .. } => 429,
            Self::Control { outcome, .. } => match outcome {
                Outcome::Accepted | Outcome::InTransition => 202,
                Outcome::Refused { .. } => 502,
                Outcome::Unreachable => 503,
                Outcome::TimedOut => 504,
            },
            Self::Callback(c) => match c {
                CallbackAnswer::SetCookie { .. } => 302,
                CallbackAnswer::MissingToken => 400,
                CallbackAnswer::InvalidToken => 401,
                CallbackAnswer::WrongPod => 403,
            },
        }
    }

    /// Builds the reply without page details; `html` when the client is a browser navigating.
    pub fn reply(&self, html: bool) -> Reply {
        self.reply_for(&Page {
            navigation: html,
            ..Page::default()
        })
    }

    /// Builds the reply: JSON, or for a navigation a page that says what happened to which pod
    /// and port, who is signed in, the request id, and what to do next.
    pub fn reply_for(&self, page: &Page<'_>) -> Reply {
        let status = self.status();
        let html = page.navigation;
        let mut headers = Vec::new();
        let (title, message, error) = match self {
            Self::BadPort(digits) if html => {
                let message = format!(
                    "<code>{}</code> is not a port: pod addresses look like \
                     <code>localhost-&lt;port&gt;-pod-&lt;name&gt;</code> with a port from 1 to 65535.",
                    escape_html(digits)
                );
                return page_reply(status, "No such port", &message, page, Retry::No);
            }
            Self::BadPort(digits) => {
                return json_reply(
                    status,
                    json!({ "error": format!("Invalid port number: {digits}") }),
                );
            }
            Self::BadHost if html => {
                return page_reply(
                    status,
                    "No such pod address",
                    "This address does not name a pod.",
                    page,
                    Retry::No,
                );
            }
            Self::BadHost => return json_reply(status, json!({ "error": "Invalid pod host" })),
            Self::SignIn { location } => {
                headers.push(("location", location.clone()));
                return Reply {
                    status,
                    headers,
                    body: Bytes::new(),
                };
            }
            Self::Callback(CallbackAnswer::SetCookie {
                set_cookie,
                location,
            }) => {
                headers.push(("set-cookie", set_cookie.clone()));
                headers.push(("location", location.clone()));
                return Reply {
                    status,
                    headers,
                    body: Bytes::new(),
                };
            }
            Self::Callback(CallbackAnswer::MissingToken) => {
                return json_reply(status, json!({ "error": "Missing token parameter" }));
            }
            Self::Callback(CallbackAnswer::InvalidToken) => {
                return json_reply(status, json!({ "error": "Invalid or expired token" }));
            }
            Self::Callback(CallbackAnswer::WrongPod) => {
                return json_reply(
                    status,
                    json!({ "error": "Token does not match requested pod/port" }),
                );
            }
            Self::Unauthenticated => {
                return json_reply(status, json!({ "error": "Authentication required" }));
            }
            Self::HeaderTooLarge => {
                return json_reply(status, json!({ "error": "Request header too large" }));
            }
            Self::Health => return json_reply(status, json!({ "status": "ok" })),
            Self::Preflight(p) => {
                let mut headers = vec![
                    ("access-control-allow-origin", p.origin.clone()),
                    ("access-control-allow-credentials", "true".to_owned()),
                    ("access-control-allow-methods", p.method.clone()),
                ];
                if let Some(requested) = &p.headers {
                    headers.push(("access-control-allow-headers", requested.clone()));
                }
                headers.push(("access-control-max-age", "600".to_owned()));
                headers.push((
                    "vary",
                    "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
                        .to_owned(),
                ));
                return Reply {
                    status,
                    headers,
                    body: Bytes::new(),
                };
            }
            Self::CorsRefused => {
                return json_reply(
                    status,
                    json!({ "error": "Cross-origin request from an origin this pod does not grant" }),
                );
            }
            Self::Overloaded => {
                let mut reply =
                    json_reply(status, json!({ "error": "Too many requests in flight" }));
                reply.headers.push(("retry-after", "1".to_owned()));
                return reply;
            }
            Self::TooManyConnections => {
                let mut reply = json_reply(status, json!({ "error": "Too many connections" }));
                reply.headers.push(("retry-after", "1".to_owned()));
                return reply;
            }
            Self::RequestHeaderTimeout => {
                return json_reply(status, json!({ "error": "Request header timeout" }));
            }
            Self::PodStatus {
                status: pod_status,
                json: true,
                lifecycle,
            } => {
                let (slug, port) = page.pod.unwrap_or(("", 0));
                return json_reply(
                    status,
                    json!({
                        "pod": slug, "status": pod_status, "port": port,
                        "can_start": lifecycle.can_start, "can_stop": lifecycle.can_stop,
                    }),
                );
            }
            Self::PodStatus {
                status: pod_status,
                json: false,
                lifecycle,
            } => {
                let message = format!(
                    "Status: {}. <a id=\"open\" href=\"{}/\"{}>Open the app</a>",
                    status_badge(pod_status),
                    escape_html(&lifecycle.scope),
                    if pod_status == "running" {
                        ""
                    } else {
                        " hidden"
                    }
                );
                return page_reply(
                    status,
                    "Pod status",
                    &message,
                    page,
                    Retry::Follow {
                        lifecycle: lifecycle.clone(),
                        status: pod_status.clone(),
                        reload: false,
                    },
                );
            }
            Self::ApiUnauthorized => {
                let mut reply = json_reply(status, json!({ "error": "Invalid credentials" }));
                reply.headers.push((
                    "www-authenticate",
                    "Bearer error=\"invalid_token\"".to_owned(),
                ));
                return reply;
            }
            Self::RateLimited {
                retry_after,
                fields,
                daily,
            } => {
                let mut reply = json_reply(
                    status,
                    json!({
                        "error": if *daily { "Daily quota exhausted" } else { "Too many requests" },
                        "retry_after": retry_after,
                    }),
                );
                reply.headers.push(("retry-after", retry_after.to_string()));
                reply.headers.extend(fields.iter().cloned());
                return reply;
            }
            Self::MethodNotAllowed => {
                let mut reply = json_reply(status, json!({ "error": "Use POST" }));
                reply.headers.push(("allow", "POST".to_owned()));
                return reply;
            }
            Self::LifecycleForbidden { why } => {
                return json_reply(status, json!({ "error": why }));
            }
            Self::LifecycleUnavailable => {
                return json_reply(
                    status,
                    json!({ "error": "Starting and stopping pods is not set up on this ingress" }),
                );
            }
            Self::LifecycleConflict {
                action,
                status: pod_status,
            } => {
                return json_reply(
                    status,
                    json!({
                        "error": format!("The pod is {pod_status}: it cannot be {} now", match action {
                            crate::control::Action::Start => "started",
                            crate::control::Action::Stop => "stopped",
                        }),
                        "status": pod_status,
                    }),
                );
            }
            Self::Control { action, outcome } => {
                let verb = match action {
                    crate::control::Action::Start => "start",
                    crate::control::Action::Stop => "stop",
                };
                let body = match outcome {
                    Outcome::Accepted => json!({ "result": "accepted", "action": verb }),
                    Outcome::InTransition => json!({ "result": "in_transition", "action": verb }),
                    Outcome::Refused {
                        status: code,
                        message,
                    } => json!({
                        "error": if message.is_empty() {
                            format!("The control plane refused to {verb} the pod (HTTP {code})")
                        } else {
                            format!("The control plane refused to {verb} the pod (HTTP {code}): {message}")
                        },
                    }),
                    Outcome::Unreachable => json!({
                        "error": format!("The control plane cannot be reached, so the pod was not asked to {verb}. Try again in a moment."),
                    }),
                    Outcome::TimedOut => json!({
                        "error": format!("The control plane did not answer in time; the pod may or may not {verb}. This page shows its status."),
                    }),
                };
                let mut reply = json_reply(status, body);
                if matches!(outcome, Outcome::Unreachable | Outcome::TimedOut) {
                    reply
                        .headers
                        .push(("retry-after", UNAVAILABLE_RETRY_SECS.to_string()));
                }
                return reply;
            }
            Self::NotAPodPath => {
                return json_reply(
                    status,
                    json!({ "error": "Not a pod address: use /_pod/<pod>/<port>/" }),
                );
            }
            Self::HttpsRedirect { location } | Self::AddSlash { location } => {
                headers.push(("location", location.clone()));
                return Reply {
                    status,
                    headers,
                    body: Bytes::new(),
                };
            }
            Self::PortNotAnswering { timed_out } => {
                let port = page.pod.map_or(0, |(_, port)| port);
                let mut reply = if html {
                    let message = if *timed_out {
                        format!(
                            "Something accepts connections on port <strong>{port}</strong> but                              did not answer in time. This page tries again on its own and opens                              the app once it answers."
                        )
                    } else {
                        format!(
                            "Nothing listens on port <strong>{port}</strong> in this pod yet: a                              dev server may still be starting. This page tries again on its own                              and opens the app once the port answers."
                        )
                    };
                    let title = if *timed_out {
                        "The app on this port is not answering"
                    } else {
                        "Nothing is listening on this port yet"
                    };
                    page_reply(status, title, &message, page, Retry::Backoff)
                } else {
                    let error = if *timed_out {
                        format!("The app on port {port} did not answer in time")
                    } else {
                        format!("Nothing is listening on port {port} yet")
                    };
                    json_reply(status, json!({ "error": error, "port": port }))
                };
                reply
                    .headers
                    .push(("retry-after", UNAVAILABLE_RETRY_SECS.to_string()));
                return reply;
            }
            Self::PodUnavailable {
                status: pod_status,
                reason,
                lifecycle,
            } => {
                let retry = UNAVAILABLE_RETRY_SECS;
                let mut reply = if html {
                    let next = if lifecycle.waking {
                        "It is being started now"
                    } else if lifecycle.can_start {
                        "Start it here or from the dashboard"
                    } else {
                        "Start it from the dashboard"
                    };
                    let message = format!(
                        "It is {} right now. <span id=\"hint\">{next}</span>; this page follows \
                         the pod's status and opens the pod once it runs.",
                        status_badge(pod_status),
                    );
                    page_reply(
                        status,
                        "This pod is not running",
                        &message,
                        page,
                        Retry::Follow {
                            lifecycle: lifecycle.clone(),
                            status: pod_status.clone(),
                            reload: true,
                        },
                    )
                } else {
                    json_reply(
                        status,
                        json!({ "error": "Pod not available", "status": pod_status, "reason": reason }),
                    )
                };
                reply.headers.push(("retry-after", retry.to_string()));
                return reply;
            }
            Self::TunnelOffline => (
                "The pod's server is not connected",
                "This pod runs on a server that reaches the ingress through its agent, and the \
                 agent is not connected right now. This page tries again on its own.",
                "The pod's server is not connected",
            ),
            Self::Forbidden => (
                "No access to this pod",
                "You are signed in, but this pod belongs to someone else: only its owner and the \
                 members of its team may open it. If you used another account for this team, \
                 sign in as that one.",
                "Forbidden",
            ),
            Self::AuthorizationUnavailable => (
                "Access cannot be checked right now",
                "The service that knows who may open this pod is not answering. This page tries \
                 again on its own.",
                "Authorization temporarily unavailable",
            ),
            Self::UpstreamRefused if page.dashboard_route => (
                "The dashboard is not answering",
                "The dashboard did not accept the connection. It may be restarting; try again in \
                 a moment.",
                "Upstream unavailable",
            ),
            Self::UpstreamTimeout if page.dashboard_route => (
                "The dashboard is taking too long",
                "The dashboard did not answer in time. Try again in a moment.",
                "Upstream timed out",
            ),
            Self::UpstreamRefused => (
                "Nothing answered",
                "The pod is running, but nothing accepted the connection on this port. If a \
                 server there is still starting, try again in a moment.",
                "Upstream unavailable",
            ),
            Self::UpstreamTimeout => (
                "No answer in time",
                "The pod did not answer in time on this port.",
                "Upstream timed out",
            ),
            Self::BadRequest => (
                "Bad request",
                "The request could not be read.",
                "Bad request",
            ),
            Self::Internal => (
                "Something went wrong",
                "The ingress failed to handle this request. Quoting the request id below helps \
                 find out why.",
                "Internal error",
            ),
        };
        if html {
            let retry = if matches!(self, Self::AuthorizationUnavailable | Self::TunnelOffline) {
                Retry::Backoff
            } else {
                Retry::No
            };
            page_reply(status, title, message, page, retry)
        } else {
            json_reply(status, json!({ "error": error }))
        }
    }
}

impl Reply {
    /// Every field of the answer, in order: the reply's own, then the marker, the request id,
    /// `cache-control: no-store`, `connection: close` when `close`, and the content length.
    /// Both ways of writing an answer (Pingora's [`Self::header`], the raw
    /// [`Self::http1_bytes`]) take their fields from here.
    fn fields<'a>(
        &'a self,
        marker: &'static str,
        request_id: &'a str,
        close: bool,
        length: &'a str,
    ) -> impl Iterator<Item = (&'static str, &'a str)> {
        self.headers
            .iter()
            .map(|(name, value)| (*name, value.as_str()))
            .chain([
                (MARKER_HEADER, marker),
                (REQUEST_ID_HEADER, request_id),
                ("cache-control", "no-store"),
            ])
            .chain(close.then_some(("connection", "close")))
            // A 204 carries no Content-Length (RFC 9110 §8.6).
            .chain((self.status != 204).then_some(("content-length", length)))
    }

    /// The response header for Pingora to write (its fields: `Reply::fields`).
    ///
    /// # Errors
    /// Only if a field value is not a valid header value (never for the values built here).
    pub fn header(
        &self,
        marker: &'static str,
        request_id: &str,
    ) -> pingora::Result<ResponseHeader> {
        let mut header = ResponseHeader::build(self.status, Some(self.headers.len() + 4))?;
        let length = self.body.len().to_string();
        for (name, value) in self.fields(marker, request_id, false, &length) {
            header.append_header(name, value)?;
        }
        Ok(header)
    }

    /// The whole HTTP/1.1 response as bytes, for answers written outside Pingora (the
    /// connection limits, the plain path's answers) by [`crate::framing::response_head`];
    /// `close` adds `connection: close`.
    pub fn http1_bytes(&self, marker: &'static str, request_id: &str, close: bool) -> Vec<u8> {
        let status = http::StatusCode::from_u16(self.status)
            .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        let length = self.body.len().to_string();
        let mut bytes = crate::framing::response_head(
            status,
            self.fields(marker, request_id, close, &length)
                .map(|(name, value)| (name.as_bytes(), value.as_bytes())),
        );
        bytes.extend_from_slice(&self.body);
        bytes
    }
}

fn json_reply(status: u16, value: serde_json::Value) -> Reply {
    Reply {
        status,
        headers: vec![("content-type", "application/json".to_owned())],
        body: Bytes::from(value.to_string()),
    }
}

/// Whether a page retries by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Retry {
    No,
    /// Reloads after [`RETRY_FIRST_SECS`], then twice as long each time up to
    /// [`RETRY_MAX_SECS`] (the count kept per tab in `sessionStorage`).
    Backoff,
    /// Follows the pod's status (`status_url`, JSON): every 2 s while the pod is starting or
    /// stopping, every 15 s otherwise, updating `#pod-status`; once it runs, reloads (the page
    /// stands where the app will be) or shows the `#open` link.
    Follow {
        /// Start and Stop, and the scope `status.json` is under.
        lifecycle: Lifecycle,
        /// The status the page was made with.
        status: String,
        /// Reload when running (else show `#open`).
        reload: bool,
    },
}

/// The page's script that follows the status and works Start and Stop
/// (`__CONFIG__`: [`follow_script`]'s JSON).
const FOLLOW_SCRIPT: &str = r#"<script>(function(){var c=__CONFIG__,$=function(i){return document.getElementById(i);},
el=$('pod-status'),open=$('open'),start=$('start'),stop=$('stop'),msg=$('lifecycle-message'),hint=$('hint'),
s=el.textContent,cs=c.can_start,cp=c.can_stop,timer,progress=false,
pending=c.waking?{from:s,until:Date.now()+120000}:null;
function cls(t){return t==='running'?'running':(t==='stopped'||t==='error'||t==='failed')?'stopped':'transition';}
function moving(t){return t==='starting'||t==='stopping'||t==='creating'||t==='provisioning';}
function show(b,visible,enabled){if(b){b.hidden=!visible;b.disabled=!enabled;}}
function say(text,error){if(msg){msg.textContent=text;msg.className=error?'error':'';}progress=!!text&&!error;}
function render(){el.textContent=s;el.className='s-'+cls(s);show(start,cs||moving(s),cs&&!pending);
show(stop,cp||moving(s),cp&&!pending);if(open){open.hidden=s!=='running';}
if(hint){hint.textContent=(pending||moving(s))?(s==='stopping'?'It is stopping':'It is being started now'):cs?'Start it here or from the dashboard':'Start it from the dashboard';}
if(progress&&!pending&&!moving(s)){say('');}}
function next(){clearTimeout(timer);timer=setTimeout(poll,(moving(s)||pending)?2000:15000);}
function poll(){fetch(c.base+'.json',{credentials:'same-origin',cache:'no-store'})
.then(function(r){return r.json();}).then(function(j){if(!j.status){next();return;}
if(pending&&j.status===pending.from&&Date.now()<pending.until){next();return;}
pending=null;s=j.status;cs=!!j.can_start;cp=!!j.can_stop;
if(s==='running'&&c.reload){location.reload();return;}render();next();}).catch(next);}
function act(a,b){b.disabled=true;say('');var from=s;
fetch(c.base+'/'+a,{method:'POST',credentials:'same-origin',cache:'no-store',headers:{'x-pinacle-csrf':c.csrf}})
.then(function(r){return r.json().catch(function(){return {};}).then(function(j){
if(r.ok){pending={from:from,until:Date.now()+120000};s=a==='start'?'starting':'stopping';cs=cp=false;
say(a==='start'?'Starting the pod\u2026':'Stopping the pod\u2026');render();next();}
else{say(j.error||('Failed (HTTP '+r.status+')'),true);b.disabled=false;}});})
.catch(function(){say('The ingress could not be reached. Try again.',true);b.disabled=false;});}
if(start){start.onclick=function(){act('start',start);};}
if(stop){stop.onclick=function(){act('stop',stop);};}
render();next();})();</script>"#;

/// [`FOLLOW_SCRIPT`] with its settings.
fn follow_script(lifecycle: &Lifecycle, reload: bool) -> String {
    let config = json!({
        "base": format!("{}/__pinacle/status", lifecycle.scope),
        "csrf": lifecycle.csrf,
        "can_start": lifecycle.can_start,
        "can_stop": lifecycle.can_stop,
        "reload": reload,
        "waking": lifecycle.waking,
    })
    .to_string()
    // Inside a <script>: no `</script>` or `<!--` from a value.
    .replace('<', "\\u003c");
    FOLLOW_SCRIPT.replace("__CONFIG__", &config)
}

/// Start and Stop (when a control plane is configured): Start when the pod is stopped, Stop
/// when it runs, both shown and disabled while it is on its way; and where their errors go.
fn lifecycle_controls(lifecycle: &Lifecycle, status: &str) -> String {
    if lifecycle.csrf.is_none() {
        return String::new();
    }
    let moving = matches!(
        status,
        "starting" | "stopping" | "creating" | "provisioning"
    );
    let button = |id: &str, label: &str, can: bool| {
        format!(
            "<button type=\"button\" id=\"{id}\"{}{}>{label}</button>",
            if can || moving { "" } else { " hidden" },
            if can { "" } else { " disabled" }
        )
    };
    format!(
        "<div class=\"controls\">{}{}</div><p id=\"lifecycle-message\" role=\"status\"></p>",
        button("start", "Start", lifecycle.can_start),
        button("stop", "Stop", lifecycle.can_stop)
    )
}

/// The status as the page shows it (`#pod-status`, coloured by [`status_class`]).
fn status_badge(status: &str) -> String {
    format!(
        "<strong id=\"pod-status\" class=\"s-{}\">{}</strong>",
        status_class(status),
        escape_html(status)
    )
}

/// The colour class of a pod status: green running, red stopped or failed, yellow on its way.
fn status_class(status: &str) -> &'static str {
    match status {
        "running" => "running",
        "stopped" | "error" | "failed" => "stopped",
        _ => "transition",
    }
}

/// A page for a person: what happened (title and message), to which pod and port, who is signed
/// in, the request id, and the next steps.
fn page_reply(
    status: u16,
    title: &str,
    message_html: &str,
    page: &Page<'_>,
    retry: Retry,
) -> Reply {
    let mut facts = String::new();
    if let Some((slug, port)) = page.pod {
        facts.push_str(&format!(
            "<li>Pod <strong>{}</strong>, port <strong>{port}</strong></li>",
            escape_html(slug)
        ));
    }
    if let Some(email) = page.user_email {
        facts.push_str(&format!(
            "<li>Signed in as <strong>{}</strong></li>",
            escape_html(email)
        ));
    }
    if !page.request_id.is_empty() {
        facts.push_str(&format!(
            "<li>Request id <code>{}</code></li>",
            escape_html(page.request_id)
        ));
    }
    let mut actions = String::new();
    if !page.dashboard_url.is_empty() {
        let dashboard = escape_html(page.dashboard_url.trim_end_matches('/'));
        actions.push_str(&format!(
            "<a class=\"button\" href=\"{dashboard}/\">Back to the dashboard</a>"
        ));
        if page.user_email.is_some() || status == 403 {
            actions.push_str(&format!(
                "<a href=\"{dashboard}/api/auth/signout\">Sign in as someone else</a>"
            ));
        }
    }
    let (retry_note, script) = match retry {
        Retry::No => (String::new(), String::new()),
        Retry::Follow {
            lifecycle,
            status: pod_status,
            reload,
        } => (
            format!(
                "{}<p class=\"note\">This page follows the pod's status.</p>",
                lifecycle_controls(&lifecycle, &pod_status)
            ),
            follow_script(&lifecycle, reload),
        ),
        Retry::Backoff => (
            "<p class=\"note\" id=\"retry\">Checking again shortly.</p>".to_owned(),
            format!(
                "<script>(function(){{var k='pinacle-retry:'+location.pathname,\
                 n=+(sessionStorage.getItem(k)||0),\
                 s=Math.min({RETRY_MAX_SECS},{RETRY_FIRST_SECS}*Math.pow(2,n));\
                 document.getElementById('retry').textContent='Checking again in '+s+' seconds.';\
                 setTimeout(function(){{sessionStorage.setItem(k,n+1);location.reload();}},s*1000);\
                 }})();</script>"
            ),
        ),
    };
    let title = escape_html(title);
    let body = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\"><title>{title}</title>\
         <style>body{{font-family:system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1f2328}}\
         main{{max-width:34rem;margin:12vh auto;padding:2rem 2.2rem;background:#fff;\
         border:1px solid #d9dde3;border-radius:12px}}h1{{font-size:1.35rem;margin:0 0 .8rem}}\
         p{{line-height:1.5}}ul{{padding:0;list-style:none;color:#57606a;font-size:.92rem}}\
         li{{margin:.25rem 0}}code{{font-size:.85rem}}.actions{{margin-top:1.4rem;display:flex;\
         gap:1rem;align-items:center}}a{{color:#0b5fcc}}a.button{{background:#0b5fcc;color:#fff;\
         padding:.5rem .9rem;border-radius:6px;text-decoration:none}}.note{{color:#57606a;\
         font-size:.9rem}}.s-running{{color:#1a7f37}}.s-stopped{{color:#cf222e}}\
         .s-transition{{color:#9a6700}}.controls{{display:flex;gap:.6rem}}\
         button{{font:inherit;padding:.45rem 1rem;border-radius:6px;border:1px solid;color:#fff;\
         cursor:pointer}}#start{{background:#1a7f37;border-color:#1a7f37}}\
         #stop{{background:#cf222e;border-color:#cf222e}}button:disabled{{opacity:.45;cursor:default}}\
         #lifecycle-message{{color:#57606a;font-size:.92rem}}#lifecycle-message.error{{color:#cf222e}}</style></head><body><main><h1>{title}</h1><p>{message_html}</p>\
         {retry_note}<ul>{facts}</ul><div class=\"actions\">{actions}</div></main>{script}\
         </body></html>\n"
    );
    Reply {
        status,
        headers: vec![("content-type", "text/html; charset=utf-8".to_owned())],
        body: Bytes::from(body),
    }
}

fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_answer_is_named_in_names() {
        let all = [
            Answer::BadPort("0".into()),
            Answer::BadHost,
            Answer::SignIn {
                location: "/".into(),
            },
            Answer::Unauthenticated,
            Answer::Forbidden,
            Answer::PodUnavailable {
                status: "stopped".into(),
                reason: "not_running",
                lifecycle: Lifecycle::default(),
            },
            Answer::AuthorizationUnavailable,
            Answer::UpstreamRefused,
            Answer::UpstreamTimeout,
            Answer::BadRequest,
            Answer::Internal,
            Answer::Callback(CallbackAnswer::SetCookie {
                set_cookie: String::new(),
                location: "/".into(),
            }),
            Answer::Callback(CallbackAnswer::MissingToken),
            Answer::HeaderTooLarge,
            Answer::HttpsRedirect {
                location: "/".into(),
            },
            Answer::Health,
            Answer::Overloaded,
            Answer::RequestHeaderTimeout,
            Answer::TooManyConnections,
            Answer::Preflight(crate::cors::Preflight {
                origin: "https://a.test".into(),
                method: "PUT".into(),
                headers: None,
            }),
            Answer::CorsRefused,
            Answer::PortNotAnswering { timed_out: false },
            Answer::PortNotAnswering { timed_out: true },
            Answer::NotAPodPath,
            Answer::PodStatus {
                status: "running".into(),
                json: true,
                lifecycle: Lifecycle::default(),
            },
            Answer::AddSlash {
                location: "/".into(),
            },
            Answer::MethodNotAllowed,
            Answer::ApiUnauthorized,
            Answer::TunnelOffline,
            Answer::RateLimited {
                retry_after: 1,
                fields: Vec::new(),
                daily: false,
            },
            Answer::LifecycleForbidden { why: "x" },
            Answer::LifecycleUnavailable,
            Answer::LifecycleConflict {
                action: crate::control::Action::Start,
                status: "running".into(),
            },
            Answer::Control {
                action: crate::control::Action::Start,
                outcome: Outcome::Accepted,
            },
            Answer::Control {
                action: crate::control::Action::Start,
                outcome: Outcome::InTransition,
            },
            Answer::Control {
                action: crate::control::Action::Start,
                outcome: Outcome::Refused {
                    status: 500,
                    message: String::new(),
                },
            },
            Answer::Control {
                action: crate::control::Action::Start,
                outcome: Outcome::Unreachable,
            },
            Answer::Control {
                action: crate::control::Action::Start,
                outcome: Outcome::TimedOut,
            },
        ];
        let mut names: Vec<&str> = all.iter().map(Answer::name).collect();
        names.sort_unstable();
        let mut listed = Answer::NAMES.to_vec();
        listed.sort_unstable();
        assert_eq!(names, listed);
    }

    fn body(r: &Reply) -> String {
        String::from_utf8(r.body.to_vec()).unwrap()
    }

    #[test]
    fn exact_bodies_the_dashboard_and_old_ingress_promised() {
        let r = Answer::BadPort("70000".into()).reply(false);
        assert_eq!(
            (r.status, body(&r).as_str()),
            (400, r#"{"error":"Invalid port number: 70000"}"#)
        );
        for (answer, status, text) in [
            (
                CallbackAnswer::MissingToken,
                400,
                r#"{"error":"Missing token parameter"}"#,
            ),
            (
                CallbackAnswer::InvalidToken,
                401,
                r#"{"error":"Invalid or expired token"}"#,
            ),
            (
                CallbackAnswer::WrongPod,
                403,
                r#"{"error":"Token does not match requested pod/port"}"#,
            ),
        ] {
            let r = Answer::Callback(answer).reply(true);
            assert_eq!((r.status, body(&r).as_str()), (status, text));
        }
    }

    #[test]
    fn unavailable_pods_get_a_page_that_follows_the_status_or_json() {
        let answer = Answer::PodUnavailable {
            status: "<stopped>".into(),
            reason: "not_running",
            lifecycle: Lifecycle {
                scope: "/_pod/demo/3000".into(),
                ..Lifecycle::default()
            },
        };
        let page = answer.reply(true);
        assert_eq!(page.status, 503);
        let text = body(&page);
        assert!(!text.contains("http-equiv=\"refresh\""), "no fixed reload");
        assert!(text.contains("\"base\":\"/_pod/demo/3000/__pinacle/status\""));
        assert!(text.contains("fetch(c.base+'.json'"));
        assert!(text.contains("location.reload()") && text.contains("?2000:15000"));
        assert!(text.contains("\"reload\":true"));
        // No control plane: no buttons.
        assert!(!text.contains("<button"));
        let offered = Answer::PodUnavailable {
            status: "stopped".into(),
            reason: "not_running",
            lifecycle: Lifecycle {
                can_start: true,
                csrf: Some("1.ab</script>".into()),
                ..Lifecycle::default()
            },
        };
        let text = body(&offered.reply(true));
        assert!(
            text.contains("<button type=\"button\" id=\"start\">Start</button>"),
            "{text}"
        );
        assert!(
            text.contains("id=\"stop\" hidden disabled>Stop</button>"),
            "{text}"
        );
        assert!(text.contains("Start it here or from the dashboard"));
        assert!(text.contains("\"csrf\":\"1.ab\\u003c/script>\""), "{text}");
        assert!(body(&page).contains("&lt;stopped&gt;"));
        assert!(page.headers.contains(&("retry-after", "5".into())));
        let json: serde_json::Value = serde_json::from_slice(&answer.reply(false).body).unwrap();
        assert_eq!(json["status"], "<stopped>");
        assert_eq!(json["reason"], "not_running");
    }

    #[test]
    fn pages_name_the_pod_the_user_and_the_request_and_offer_the_next_step() {
        let page = Page {
            navigation: true,
            pod: Some(("my<pod>", 3000)),
            dashboard_route: false,
            user_email: Some("ada@example.com"),
            request_id: "req-1",
            dashboard_url: "https://pinacle.dev/",
        };
        let forbidden = body(&Answer::Forbidden.reply_for(&page));
        for text in [
            "No access to this pod",
            "my&lt;pod&gt;",
            "port <strong>3000</strong>",
            "ada@example.com",
            "<code>req-1</code>",
            "href=\"https://pinacle.dev/\"",
            "href=\"https://pinacle.dev/api/auth/signout\"",
        ] {
            assert!(forbidden.contains(text), "{text} not in {forbidden}");
        }
        // The bad-port answer is a page for people and the dashboard's JSON for programs.
        let bad_port = Answer::BadPort("70000".into());
        assert!(body(&bad_port.reply_for(&page)).contains("<code>70000</code> is not a port"));
        assert_eq!(
            body(&bad_port.reply(false)),
            r#"{"error":"Invalid port number: 70000"}"#
        );
        // A failing dashboard is not called a pod.
        let dashboard = Page {
            pod: None,
            dashboard_route: true,
            user_email: None,
            ..page
        };
        let text = body(&Answer::UpstreamRefused.reply_for(&dashboard));
        assert!(
            text.contains("The dashboard is not answering") && !text.contains("pod"),
            "{text}"
        );
    }

    #[test]
    fn headers_carry_marker_request_id_and_length() {
        let reply = Answer::UpstreamTimeout.reply(false);
        let header = reply
            .header(Answer::UpstreamTimeout.name(), "req-1")
            .unwrap();
        assert_eq!(header.status.as_u16(), 504);
        assert_eq!(header.headers[MARKER_HEADER], "upstream-timeout");
        assert_eq!(header.headers[REQUEST_ID_HEADER], "req-1");
        assert_eq!(
            header.headers["content-length"],
            reply.body.len().to_string()
        );
        assert_eq!(header.headers["cache-control"], "no-store");
    }

    #[test]
    fn raw_answers_are_complete_http1_responses() {
        let answer = Answer::TooManyConnections;
        let bytes = answer
            .reply(false)
            .http1_bytes(answer.name(), "req-2", true);
        let text = String::from_utf8(bytes).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{head}"
        );
        for field in [
            "retry-after: 1",
            "x-pinacle-ingress: too-many-connections",
            "x-request-id: req-2",
            "connection: close",
            "content-type: application/json",
        ] {
            assert!(head.split("\r\n").any(|l| l == field), "{field} in {head}");
        }
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert_eq!(body, r#"{"error":"Too many connections"}"#);
        let timeout = Answer::RequestHeaderTimeout.reply(false);
        let text =
            String::from_utf8(timeout.http1_bytes("request-header-timeout", "r", true)).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
            "{text}"
        );
        let kept =
            String::from_utf8(answer.reply(false).http1_bytes(answer.name(), "r", false)).unwrap();
        assert!(!kept.to_ascii_lowercase().contains("connection:"), "{kept}");
        assert!(
            kept.ends_with(r#"{"error":"Too many connections"}"#),
            "{kept}"
        );
    }

    #[test]
    fn every_error_status_is_where_the_issue_puts_it() {
        for (answer, status) in [
            (Answer::Unauthenticated, 401),
            (Answer::Forbidden, 403),
            (Answer::AuthorizationUnavailable, 503),
            (Answer::UpstreamRefused, 502),
            (Answer::UpstreamTimeout, 504),
            (
                Answer::SignIn {
                    location: "/x".into(),
                },
                302,
            ),
        ] {
            assert_eq!(answer.reply(false).status, status, "{answer:?}");
        }
    }
}
