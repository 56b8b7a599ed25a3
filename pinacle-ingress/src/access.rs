//! The one record of a request: filled by [`crate::policy`] (who, where, which decision) and by
//! the engine that carried it out (status, bytes, timings), then written once as the metrics and
//! the access line by [`Record::finish`], whichever engine served the request.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use pinacle_authz::UserId;

use crate::host::PodHost;
use crate::intent::Intent;
use crate::telemetry::{self, FinishedRequest, Metrics, RouteKind};

/// Which engine carried a request (the access line's `engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Engine {
    /// Pingora's HTTP/1 and HTTP/2 loop.
    #[default]
    Pingora,
    /// The plain path ([`crate::plain`]).
    Plain,
    /// A WebSocket (or other upgrade) tunnel ([`crate::tunnel`]).
    Tunnel,
}

impl Engine {
    /// The access line's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pingora => "pingora",
            Self::Plain => "plain",
            Self::Tunnel => "tunnel",
        }
    }
}

/// Everything the access line and the request metrics say about one request.
#[derive(Debug)]
pub struct Record {
    /// The request id (logs, `x-request-id`).
    pub request_id: String,
    /// The request's span (its id); events in every phase are its children.
    pub span: tracing::Span,
    /// When the request head had arrived.
    pub started: Instant,
    /// The client's address (the peer's: a trusted proxy's own).
    pub client: Option<SocketAddr>,
    /// The method.
    pub method: http::Method,
    /// The target as received (logged with credential-like query values redacted).
    pub uri: http::Uri,
    /// The `Host` (or `:authority`) as received.
    pub host: String,
    /// Whether the peer is a trusted proxy.
    pub trusted_client: bool,
    /// What kind of request this turned out to be.
    pub route: RouteKind,
    /// The pod host, when the host named one.
    pub pod: Option<PodHost>,
    /// Navigation, upgrade, or neither.
    pub intent: Intent,
    /// The authenticated user.
    pub user: Option<UserId>,
    /// The signed-in user's email, when the credential says (pages only).
    pub user_email: Option<String>,
    /// The authorization outcome (`allow`, `not_member`, `missing`…).
    pub authz: &'static str,
    /// The machine credential used (`jwt`, `hmac`), when one was.
    pub credential: Option<&'static str>,
    /// Why the directory could not answer, for the access line's `error`.
    pub directory_error: Option<&'static str>,
    /// Which engine carried the request.
    pub engine: Engine,
    /// The upstream the request was forwarded to.
    pub upstream: Option<SocketAddr>,
    /// The name of our own answer, when the ingress answered.
    pub answer: Option<&'static str>,
    /// The status sent (0 while none is).
    pub status: u16,
    /// When the request went upstream.
    pub upstream_started: Option<Instant>,
    /// Until the upstream's response head arrived.
    pub upstream_duration: Option<Duration>,
    /// The upstream could not be connected to.
    pub connect_failed: bool,
}

impl Default for Record {
    fn default() -> Self {
        Self {
            request_id: String::new(),
            span: tracing::Span::none(),
            started: Instant::now(),
            client: None,
            method: http::Method::GET,
            uri: http::Uri::default(),
            host: String::new(),
            trusted_client: false,
            route: RouteKind::Unrouted,
            pod: None,
            intent: Intent::default(),
            user: None,
            user_email: None,
            authz: "none",
            credential: None,
            directory_error: None,
            engine: Engine::Pingora,
            upstream: None,
            answer: None,
            status: 0,
            upstream_started: None,
            upstream_duration: None,
            connect_failed: false,
        }
    }
}

/// How a request ended, as its engine saw it.
#[derive(Debug, Default)]
pub struct Ending<'a> {
    /// The status sent (0: none).
    pub status: u16,
    /// Body bytes from the client (after an upgrade: every byte up).
    pub bytes_in: u64,
    /// Body bytes to the client (after an upgrade: every byte down).
    pub bytes_out: u64,
    /// The connection was upgraded (a tunnel ran).
    pub upgraded: bool,
    /// A tunnel ended by its idle timeout.
    pub idle_timeout: bool,
    /// What went wrong (empty: nothing).
    pub error: &'a str,
}

impl Record {
    /// The request's metrics and its access line.
    pub fn finish(&self, metrics: &Metrics, end: &Ending<'_>) {
        let duration = self.started.elapsed();
        let port = self.pod.as_ref().map_or(0, |p| p.port);
        metrics.request(&FinishedRequest {
            route: self.route,
            status: end.status,
            port,
            duration,
            upstream_duration: self.upstream_duration,
            bytes_in: end.bytes_in,
            bytes_out: end.bytes_out,
            connect_failed: self.connect_failed,
            answer: self.answer,
        });
        let engine = if end.upgraded {
            Engine::Tunnel
        } else {
            self.engine
        };
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        tracing::info!(
            target: "pinacle_ingress::access",
            parent: &self.span,
            request_id = %self.request_id,
            client = %self.client.map(|a| a.to_string()).unwrap_or_default(),
            host = %self.host,
            route = self.route.as_str(),
            engine = engine.as_str(),
            pod = self.pod.as_ref().map_or("", |p| p.slug.as_str()),
            port,
            user = self.user.as_ref().map_or("", UserId::as_str),
            method = self.method.as_str(),
            path = %telemetry::loggable_target(self.uri.path(), self.uri.query()),
            status = end.status,
            answer = self.answer.unwrap_or(""),
            authz = self.authz,
            credential = self.credential.unwrap_or(""),
            upstream = %self.upstream.map(|a| a.to_string()).unwrap_or_default(),
            upgraded = end.upgraded,
            bytes_in = end.bytes_in,
            bytes_out = end.bytes_out,
            idle_timeout = end.idle_timeout,
            duration_us = micros(duration),
            upstream_us = self.upstream_duration.map_or(0, micros),
            error = if end.error.is_empty() { self.directory_error.unwrap_or("") } else { end.error },
            "request"
        );
    }
}
