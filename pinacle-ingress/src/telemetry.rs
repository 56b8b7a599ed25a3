//! Telemetry: Prometheus metrics, the logging setup, and what of a request may be logged.
//!
//! Metric names follow Prometheus conventions (`pinacle_ingress_` prefix, base units, `_total`
//! for counters). Logs never carry cookies, tokens or secrets: the access log has the path with
//! token-like query values redacted, and Pingora's own debug output (which prints whole request
//! headers) is capped at `info` whatever `RUST_LOG` says.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// Latency buckets in seconds: 0.5 ms to 60 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// The ingress's metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    upstream_duration: HistogramVec,
    authz_cache: IntCounterVec,
    directory_duration: HistogramVec,
    directory_errors: IntCounterVec,
    tunnels_open: IntGauge,
    connect_failures: IntCounterVec,
    received_bytes: IntCounterVec,
    sent_bytes: IntCounterVec,
    connections_open: IntGauge,
    connections_refused: IntCounter,
    header_timeouts: IntCounter,
    plain_requests: IntCounter,
    answers: IntCounterVec,
    reloads: IntCounterVec,
    notifications: IntCounter,
    listener_reconnects: IntCounter,
    revoked: IntCounterVec,
    control_calls: IntCounterVec,
    agents_connected: IntGauge,
    agent_streams: IntGauge,
    agent_handshakes: IntGauge,
    agent_bytes: IntCounterVec,
    agent_connects: IntCounterVec,
    jwks_fetches: IntCounterVec,
    rate_limits: IntCounterVec,
    redis_failures: IntCounter,
    activity_dropped: IntCounter,
    /// Each [`RouteKind`]'s series, resolved on first use: a labelled lookup hashes its labels
    /// under a lock on every request otherwise.
    route_series: Arc<[OnceLock<RouteSeries>; RouteKind::ALL.len()]>,
    /// The authorization cache's hit and miss series, resolved on first use (as above).
    authz_series: Arc<[OnceLock<IntCounter>; 3]>,
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
    /// Every kind, in declaration order (the index of each is `kind as usize`).
    const ALL: [Self; 4] = [Self::Unrouted, Self::Dashboard, Self::Pod, Self::Callback];

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

/// One route's series.
#[derive(Debug)]
struct RouteSeries {
    duration: Histogram,
    upstream: Histogram,
    received: IntCounter,
    sent: IntCounter,
}

/// Pod ports with a label of their own (PINACLE.md): VS Code, kanban, the coding agent, the
/// terminal, the usual app ports. Any other port is `other`, so the label stays bounded.
const WELL_KNOWN_PORTS: [(u16, &str); 7] = [
    (8726, "8726"),
    (5262, "5262"),
    (2528, "2528"),
    (7681, "7681"),
    (3000, "3000"),
    (5173, "5173"),
    (8080, "8080"),
];

/// The `port` label: the number for a well-known port, `other` for any other, `` for none.
pub fn port_label(port: u16) -> &'static str {
    if port == 0 {
        return "";
    }
    WELL_KNOWN_PORTS
        .iter()
        .find(|(p, _)| *p == port)
        .map_or("other", |(_, label)| label)
}

/// The directory queries (the `query` label).
const DIRECTORY_QUERIES: [&str; 5] = ["pods_by_slug", "session", "user_exists", "ping", "agents"];
/// The directory error kinds (the `kind` label).
const DIRECTORY_ERROR_KINDS: [&str; 3] = ["unavailable", "timeout", "query"];

/// `2xx`, `4xx`, ... (`0xx` when no response was sent).
pub fn status_class(status: u16) -> &'static str {
    match status / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        5 => "5xx",
        _ => "none",
    }
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    ///
    /// # Errors
    /// Only if two metrics share a name (a bug caught by the tests).
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                labels,
            )?;
            registry.register(Box::new(h.clone()))?;
            Ok::<_, prometheus::Error>(h)
        };
        let requests = counter(
            "pinacle_ingress_requests_total",
            "Requests by route kind (pod, dashboard, callback, unrouted), status class and pod \
             port (well-known ports by number, any other as `other`, none as ``).",
            &["route", "status_class", "port"],
        )?;
        let answers = counter(
            "pinacle_ingress_answers_total",
            "Responses the ingress made itself (not the upstream's), by answer: the value of \
             their x-pinacle-ingress header.",
            &["answer"],
        )?;
        let request_duration = histogram(
            "pinacle_ingress_request_duration_seconds",
            "Time from the request head to the end of the response, by route kind.",
            &["route"],
        )?;
        let upstream_duration = histogram(
            "pinacle_ingress_upstream_response_seconds",
            "Time from sending the request upstream to its response head, by route kind.",
            &["route"],
        )?;
        let authz_cache = counter(
            "pinacle_ingress_authz_cache_lookups_total",
            "Authorization decisions by whether the cache answered (hit), the directory (miss), \
             or, the directory failing, an allow kept for stale-if-error (stale).",
            &["result"],
        )?;
        let directory_duration = histogram(
            "pinacle_ingress_directory_query_duration_seconds",
            "Pod directory (database) query latency, by query.",
            &["query"],
        )?;
        let directory_errors = counter(
            "pinacle_ingress_directory_errors_total",
            "Pod directory queries that failed, by query and kind (unavailable, timeout, query).",
            &["query", "kind"],
        )?;
        let tunnels_open = IntGauge::new(
            "pinacle_ingress_websocket_tunnels_open",
            "WebSocket (upgraded) tunnels open now.",
        )?;
        registry.register(Box::new(tunnels_open.clone()))?;
        let connect_failures = counter(
            "pinacle_ingress_upstream_connect_failures_total",
            "Upstream connections that could not be made (refused or timed out), by route kind.",
            &["route"],
        )?;
        let received_bytes = counter(
            "pinacle_ingress_received_bytes_total",
            "Body bytes received from clients (WebSocket payload included), by route kind.",
            &["route"],
        )?;
        let sent_bytes = counter(
            "pinacle_ingress_sent_bytes_total",
            "Body bytes sent to clients (WebSocket payload included), by route kind.",
            &["route"],
        )?;
        let connections_open = IntGauge::new(
            "pinacle_ingress_client_connections_open",
            "Client connections open now (counted from the end of the TLS handshake).",
        )?;
        registry.register(Box::new(connections_open.clone()))?;
        let connections_refused = IntCounter::new(
            "pinacle_ingress_client_connections_refused_total",
            "Client connections answered 503 and closed because max_connections were open.",
        )?;
        registry.register(Box::new(connections_refused.clone()))?;
        let header_timeouts = IntCounter::new(
            "pinacle_ingress_request_header_timeouts_total",
            "Connections closed because a request head took longer than request_header_timeout.",
        )?;
        registry.register(Box::new(header_timeouts.clone()))?;
        let plain_requests = IntCounter::new(
            "pinacle_ingress_plain_requests_total",
            "Requests served by the plain engine (bodiless HTTP/1.1 GET/HEAD) without \
             Pingora's proxy loop; also counted in pinacle_ingress_requests_total.",
        )?;
        registry.register(Box::new(plain_requests.clone()))?;
        let build_info = prometheus::IntGaugeVec::new(
            Opts::new(
                "pinacle_ingress_build_info",
                "Always 1; the labels name the running build.",
            ),
            &["version", "commit"],
        )?;
        build_info
            .with_label_values(&[crate::VERSION, crate::GIT_COMMIT])
            .set(1);
        registry.register(Box::new(build_info))?;
        // Open file descriptors, resident memory, CPU seconds, start time (Linux /proc).
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let reloads = counter(
            "pinacle_ingress_config_reloads_total",
            "Reloads (SIGHUP) by result: applied, or rejected (invalid; nothing changed).",
            &["result"],
        )?;
        let notifications = IntCounter::new(
            "pinacle_ingress_directory_notifications_total",
            "Change notifications received from the directory (LISTEN pinacle_authz).",
        )?;
        registry.register(Box::new(notifications.clone()))?;
        let listener_reconnects = IntCounter::new(
            "pinacle_ingress_directory_listener_reconnects_total",
            "Times the notification connection was made again after a loss (every cached \
             answer is forgotten each time).",
        )?;
        registry.register(Box::new(listener_reconnects.clone()))?;
        let revoked = counter(
            "pinacle_ingress_revoked_connections_total",
            "Open WebSocket tunnels (tunnel) and streaming responses (stream) closed because the \
             user lost access to the pod.",
            &["kind"],
        )?;
        for kind in ["tunnel", "stream"] {
            revoked.with_label_values(&[kind]);
        }
        let control_calls = counter(
            "pinacle_ingress_control_calls_total",
            "Calls to the control plane by act (start, stop, wake, activity) and result \
             (accepted, in_transition, refused, unreachable, timeout).",
            &["act", "result"],
        )?;
        for act in ["start", "stop", "wake", "activity"] {
            for result in [
                "accepted",
                "in_transition",
                "refused",
                "unreachable",
                "timeout",
            ] {
                control_calls.with_label_values(&[act, result]);
            }
        }
        let agents_connected = IntGauge::new(
            "pinacle_ingress_agents_connected",
            "Agent tunnels connected to this gateway (pinacle-agent).",
        )?;
        registry.register(Box::new(agents_connected.clone()))?;
        let agent_streams = IntGauge::new(
            "pinacle_ingress_agent_streams_open",
            "Streams open on agent tunnels (one per bridged upstream connection).",
        )?;
        registry.register(Box::new(agent_streams.clone()))?;
        let agent_handshakes = IntGauge::new(
            "pinacle_ingress_agent_handshakes_pending",
            "Connections to agent_listen that have not yet proved which server they speak for.",
        )?;
        registry.register(Box::new(agent_handshakes.clone()))?;
        let agent_bytes = counter(
            "pinacle_ingress_agent_bytes_total",
            "Bytes carried on agent tunnels, by direction (to_agent, from_agent).",
            &["direction"],
        )?;
        for direction in ["to_agent", "from_agent"] {
            agent_bytes.with_label_values(&[direction]);
        }
        let agent_connects = counter(
            "pinacle_ingress_agent_connects_total",
            "Agent connections by result (accepted, refused; busy: closed unanswered because too \
             many handshakes were pending): reconnects show here.",
            &["result"],
        )?;
        for result in ["accepted", "refused", "busy"] {
            agent_connects.with_label_values(&[result]);
        }
        let jwks_fetches = counter(
            "pinacle_ingress_jwks_fetches_total",
            "Fetches of [api] jwks_url by result (ok, failed).",
            &["result"],
        )?;
        for result in ["ok", "failed"] {
            jwks_fetches.with_label_values(&[result]);
        }
        let rate_limits = counter(
            "pinacle_ingress_rate_limit_checks_total",
            "Rate-limit checks by kind of client (api, browser; lookup: directory lookups before \
             sign-in, by client address), outcome (allowed, limited) and where they were \
             counted (redis, memory).",
            &["kind", "outcome", "backend"],
        )?;
        for kind in ["api", "browser", "lookup"] {
            for outcome in ["allowed", "limited"] {
                for backend in ["redis", "memory"] {
                    rate_limits.with_label_values(&[kind, outcome, backend]);
                }
            }
        }
        let redis_failures = IntCounter::new(
            "pinacle_ingress_rate_limit_redis_failures_total",
            "Times Redis could not answer a rate-limit check in time (the gateway then counts \
             in memory for a second before trying again).",
        )?;
        registry.register(Box::new(redis_failures.clone()))?;
        let activity_dropped = IntCounter::new(
            "pinacle_ingress_activity_dropped_total",
            "Pods left out of activity reports because a batch was full (10000 pods).",
        )?;
        registry.register(Box::new(activity_dropped.clone()))?;
        let metrics = Self {
            registry,
            answers,
            reloads,
            notifications,
            listener_reconnects,
            revoked,
            control_calls,
            agents_connected,
            agent_streams,
            agent_handshakes,
            agent_bytes,
            agent_connects,
            jwks_fetches,
            rate_limits,
            redis_failures,
            activity_dropped,
            connections_open,
            connections_refused,
            header_timeouts,
            plain_requests,
            route_series: Arc::new(Default::default()),
            authz_series: Arc::new(Default::default()),
            requests,
            request_duration,
            upstream_duration,
            authz_cache,
            directory_duration,
            directory_errors,
            tunnels_open,
            connect_failures,
            received_bytes,
            sent_bytes,
        };
        metrics.initialise_series();
        Ok(metrics)
    }

    /// Creates every series with a fixed label set at zero, so that dashboards and alerts see
    /// them before the first event (`rate()` of a series that appears at 1 misses that 1).
    fn initialise_series(&self) {
        for route in RouteKind::ALL {
            self.series_for(route);
            self.connect_failures.with_label_values(&[route.as_str()]);
            // Pod and callback requests carry a port label; the others none.
            let ports: Vec<&str> = match route {
                RouteKind::Pod | RouteKind::Callback => WELL_KNOWN_PORTS
                    .iter()
                    .map(|(_, label)| *label)
                    .chain(["other"])
                    .collect(),
                RouteKind::Dashboard | RouteKind::Unrouted => vec![""],
            };
            for class in ["1xx", "2xx", "3xx", "4xx", "5xx"] {
                for port in &ports {
                    self.requests
                        .with_label_values(&[route.as_str(), class, port]);
                }
            }
        }
        for result in ["hit", "miss", "stale"] {
            self.authz_cache.with_label_values(&[result]);
        }
        for query in DIRECTORY_QUERIES {
            self.directory_duration.with_label_values(&[query]);
            for kind in DIRECTORY_ERROR_KINDS {
                self.directory_errors.with_label_values(&[query, kind]);
            }
        }
        for answer in crate::responses::Answer::NAMES {
            self.answers.with_label_values(&[answer]);
        }
        for result in ["applied", "rejected"] {
            self.reloads.with_label_values(&[result]);
        }
    }

    /// Counts a reload by its result.
    pub fn reload(&self, result: &str) {
        self.reloads.with_label_values(&[result]).inc();
    }

    /// Counts a response the ingress made itself.
    pub fn answer(&self, name: &str) {
        self.answers.with_label_values(&[name]).inc();
    }

    fn series_for(&self, route: RouteKind) -> RouteSeries {
        let route = route.as_str();
        RouteSeries {
            duration: self.request_duration.with_label_values(&[route]),
            upstream: self.upstream_duration.with_label_values(&[route]),
            received: self.received_bytes.with_label_values(&[route]),
            sent: self.sent_bytes.with_label_values(&[route]),
        }
    }

    /// Records a finished request.
    pub fn request(&self, done: &FinishedRequest) {
        let port = port_label(done.port);
        if let Some(answer) = done.answer {
            self.answer(answer);
        }
        let route = done.route.as_str();
        self.requests
            .with_label_values(&[route, status_class(done.status), port])
            .inc();
        let cell = self.route_series.get(done.route as usize);
        let resolved;
        let series = if let Some(cell) = cell {
            cell.get_or_init(|| self.series_for(done.route))
        } else {
            resolved = self.series_for(done.route);
            &resolved
        };
        series.duration.observe(done.duration.as_secs_f64());
        if let Some(upstream) = done.upstream_duration {
            series.upstream.observe(upstream.as_secs_f64());
        }
        series.received.inc_by(done.bytes_in);
        series.sent.inc_by(done.bytes_out);
        if done.connect_failed {
            self.connect_failures.with_label_values(&[route]).inc();
        }
    }

    /// Records an authorization cache lookup.
    pub fn authz_lookup(&self, lookup: pinacle_authz::CacheLookup) {
        let (index, label) = match lookup {
            pinacle_authz::CacheLookup::Hit => (0, "hit"),
            pinacle_authz::CacheLookup::Miss => (1, "miss"),
            pinacle_authz::CacheLookup::Stale => (2, "stale"),
        };
        if let Some(cell) = self.authz_series.get(index) {
            cell.get_or_init(|| self.authz_cache.with_label_values(&[label]))
                .inc();
        }
    }

    /// Records a directory query.
    pub fn directory_query(&self, query: &str, took: Duration, error: Option<&str>) {
        self.directory_duration
            .with_label_values(&[query])
            .observe(took.as_secs_f64());
        if let Some(kind) = error {
            self.directory_errors
                .with_label_values(&[query, kind])
                .inc();
        }
    }

    /// A tunnel opened (`+1`) or closed (`-1`).
    pub fn tunnels(&self, delta: i64) {
        self.tunnels_open.add(delta);
    }

    /// A client connection opened (`+1`) or closed (`-1`).
    pub fn connections(&self, delta: i64) {
        self.connections_open.add(delta);
    }

    /// A client connection refused at `max_connections`.
    pub fn connection_refused(&self) {
        self.connections_refused.inc();
    }

    /// A request head that did not arrive within `request_header_timeout`.
    pub fn header_timeout(&self) {
        self.header_timeouts.inc();
    }

    /// Brings the listener's counters up to `stats` (they only grow).
    pub fn live_stats(&self, stats: &pinacle_authz::live::LiveStats) {
        use std::sync::atomic::Ordering;
        let sync = |counter: &IntCounter, value: u64| {
            let seen = counter.get();
            if value > seen {
                counter.inc_by(value - seen);
            }
        };
        sync(
            &self.notifications,
            stats.notifications.load(Ordering::Relaxed),
        );
        sync(
            &self.listener_reconnects,
            stats.reconnects.load(Ordering::Relaxed),
        );
    }

    /// A connection closed because its user lost access (`tunnel` or `stream`).
    pub fn revoked(&self, kind: &str) {
        self.revoked.with_label_values(&[kind]).inc();
    }

    /// Counts a call to the control plane.
    pub fn control_call(&self, act: &str, result: &str) {
        self.control_calls.with_label_values(&[act, result]).inc();
    }

    /// Sets how many agent tunnels are connected.
    pub fn agents_connected(&self, n: usize) {
        self.agents_connected
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// One more (or fewer) stream open on agent tunnels.
    pub fn agent_streams(&self, delta: i64) {
        self.agent_streams.add(delta);
    }

    /// Moves the count of pending agent handshakes.
    pub fn agent_handshakes(&self, delta: i64) {
        self.agent_handshakes.add(delta);
    }

    /// Counts bytes carried on a tunnel stream.
    pub fn agent_bytes(&self, direction: &str, n: u64) {
        self.agent_bytes.with_label_values(&[direction]).inc_by(n);
    }

    /// Counts an agent connection attempt.
    pub fn agent_connect(&self, result: &str) {
        self.agent_connects.with_label_values(&[result]).inc();
    }

    /// Counts a JWKS fetch.
    pub fn jwks_fetch(&self, result: &str) {
        self.jwks_fetches.with_label_values(&[result]).inc();
    }

    /// Counts a rate-limit check.
    pub fn rate_limit(&self, kind: &str, outcome: &str, backend: &str) {
        self.rate_limits
            .with_label_values(&[kind, outcome, backend])
            .inc();
    }

    /// Counts a Redis failure of a rate-limit check.
    pub fn redis_failure(&self) {
        self.redis_failures.inc();
    }

    /// Counts pods left out of an activity report.
    pub fn activity_dropped(&self, pods: usize) {
        self.activity_dropped.inc_by(pods as u64);
    }

    /// Records a request served by the plain path (`crate::plain`).
    pub fn plain_request(&self) {
        self.plain_requests.inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// What the metrics need to know about a finished request.
#[derive(Debug, Clone, Copy)]
pub struct FinishedRequest {
    /// Route kind.
    pub route: RouteKind,
    /// Status sent (0: none).
    pub status: u16,
    /// Pod port (0: not a pod request).
    pub port: u16,
    /// Whole duration.
    pub duration: Duration,
    /// Upstream time to response head, when proxied.
    pub upstream_duration: Option<Duration>,
    /// Body bytes from the client.
    pub bytes_in: u64,
    /// Body bytes to the client.
    pub bytes_out: u64,
    /// Whether connecting upstream failed.
    pub connect_failed: bool,
    /// The answer's name when the ingress answered itself.
    pub answer: Option<&'static str>,
}

/// Query keys whose values are credentials whatever they look like.
fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "token",
        "secret",
        "password",
        "passwd",
        "auth",
        "key",
        "sig",
        "session",
        "jwt",
        "code",
        "credential",
    ]
    .iter()
    .any(|word| key.contains(word))
}

/// Values that look like tokens: JWTs, or long runs of base64/hex-like characters.
fn looks_like_token(value: &str) -> bool {
    if value.contains("eyJ") {
        return true;
    }
    value.len() >= 24
        && value.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(b, b'-' | b'_' | b'.' | b'~' | b'%' | b'+' | b'/' | b'=')
        })
        && value.bytes().any(|b| b.is_ascii_digit())
        && value.bytes().any(|b| b.is_ascii_alphabetic())
}

/// The path and query for the access log, with credential-like query values replaced by
/// `REDACTED` (by key name or by shape). The query is kept otherwise, as sent.
pub fn loggable_target(path: &str, query: Option<&str>) -> String {
    let Some(query) = query.filter(|q| !q.is_empty()) else {
        return path.to_owned();
    };
    let parts: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, value)) if is_secret_key(key) || looks_like_token(value) => {
                format!("{key}=REDACTED")
            }
            Some(_) => pair.to_owned(),
            None if looks_like_token(pair) => "REDACTED".to_owned(),
            None => pair.to_owned(),
        })
        .collect();
    format!("{path}?{}", parts.join("&"))
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// `text` or `json`.
    ///
    /// # Errors
    /// Anything else.
    pub fn parse(value: &str) -> Result<Self, String> {
        match value.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("{other:?} is not a log format (text or json)")),
        }
    }
}

/// Crates whose debug output prints whole request headers (cookies): capped at `info`.
const CAPPED: &[&str] = &[
    "pingora_proxy",
    "pingora_core",
    "pingora_pool",
    "h2",
    "hyper",
];

/// Whether text logs are coloured: only on a terminal, and never with `NO_COLOR` set to
/// anything non-empty (no-color.org).
fn colour(no_color: Option<std::ffi::OsString>) -> bool {
    use std::io::IsTerminal;
    no_color.is_none_or(|v| v.is_empty()) && std::io::stderr().is_terminal()
}

/// The running filter's handle, for [`set_log_filter`]; `None` when `RUST_LOG` fixed it.
static FILTER: OnceLock<
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>,
> = OnceLock::new();

/// The filter from directives, with the crates whose debug output prints whole request headers
/// capped at `info`.
fn capped_filter(directives: &str) -> tracing_subscriber::EnvFilter {
    let mut filter = tracing_subscriber::EnvFilter::try_new(directives)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    for target in CAPPED {
        if let Ok(directive) = format!("{target}=info").parse() {
            filter = filter.add_directive(directive);
        }
    }
    filter
}

/// Installs the global subscriber: `RUST_LOG` when set, else `filter` (the `log_filter` key;
/// changeable later by [`set_log_filter`]); writes to stderr (text or JSON) and bridges
/// Pingora's `log` records into tracing (target `pingora`). Does nothing if a subscriber is
/// already set.
pub fn init_logging(format: LogFormat, filter: &str) {
    use tracing_subscriber::layer::SubscriberExt;

    let from_env = std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty());
    let (layer, handle) = tracing_subscriber::reload::Layer::new(capped_filter(
        from_env.as_deref().unwrap_or(filter),
    ));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => tracing::subscriber::set_global_default(
            tracing_subscriber::registry()
                .with(layer)
                .with(fmt.with_ansi(colour(std::env::var_os("NO_COLOR")))),
        ),
        LogFormat::Json => tracing::subscriber::set_global_default(
            tracing_subscriber::registry().with(layer).with(
                fmt.json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_ansi(false),
            ),
        ),
    };
    if installed.is_err() {
        return;
    }
    if from_env.is_none() {
        let _ = FILTER.set(handle);
    }
    if log::set_boxed_logger(Box::new(LogBridge)).is_ok() {
        // Pingora's debug output prints whole request headers (cookies): never below info.
        log::set_max_level(log::LevelFilter::Info);
    }
}

/// Replaces the log filter (a reload's `log_filter`). False when `RUST_LOG` fixed the filter
/// at start, or logging was not set up by [`init_logging`].
pub fn set_log_filter(directives: &str) -> bool {
    FILTER
        .get()
        .is_some_and(|handle| handle.reload(capped_filter(directives)).is_ok())
}

/// Pingora's `log` records as tracing events of target `pingora` with the crate's own target
/// as the `log_target` field: one field each, no source paths (tracing-log's bridge adds
/// `log.file`, `log.line`, `log.module_path` and `log.target` to every JSON line), and
/// ordinary events at an ordinary level ([`bridged_level`]).
#[derive(Debug)]
struct LogBridge;

impl log::Log for LogBridge {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Info
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let message = record.args().to_string();
        let log_target = record.target();
        match bridged_level(record.level(), &message) {
            log::Level::Error => tracing::error!(target: "pingora", log_target, "{message}"),
            log::Level::Warn => tracing::warn!(target: "pingora", log_target, "{message}"),
            log::Level::Info => tracing::info!(target: "pingora", log_target, "{message}"),
            log::Level::Debug => tracing::debug!(target: "pingora", log_target, "{message}"),
            log::Level::Trace => tracing::trace!(target: "pingora", log_target, "{message}"),
        }
    }

    fn flush(&self) {}
}

/// The level a Pingora record is logged at: its own, except for messages that are part of
/// normal operation: a process started with `--upgrade` waiting for the old one's sockets
/// (ERROR and WARN in pingora-core's `transfer_fd`) is INFO.
fn bridged_level(level: log::Level, message: &str) -> log::Level {
    const ORDINARY: [&str; 3] = [
        "No incoming socket transfer",
        "server not ready, will try again",
        "Connect() not ready, will try again",
    ];
    if ORDINARY.iter().any(|m| message.starts_with(m)) {
        log::Level::Info
    } else {
        level
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_like_query_values_are_redacted() {
        assert_eq!(loggable_target("/a", None), "/a");
        assert_eq!(
            loggable_target("/a", Some("page=2&q=rust")),
            "/a?page=2&q=rust"
        );
        assert_eq!(
            loggable_target("/pinacle-proxy-callback", Some("token=abc&return_url=%2F")),
            "/pinacle-proxy-callback?token=REDACTED&return_url=%2F"
        );
        assert_eq!(
            loggable_target("/x", Some("id=eyJhbGciOiJIUzI1NiJ9.e30.sig&n=1")),
            "/x?id=REDACTED&n=1"
        );
        assert_eq!(
            loggable_target("/x", Some("state=8f3a9c2e71b44d0f9e2a6b7c1d5e3f40")),
            "/x?state=REDACTED"
        );
        assert_eq!(
            loggable_target("/x", Some("API_KEY=1")),
            "/x?API_KEY=REDACTED"
        );
        assert_eq!(
            loggable_target("/x", Some("lang=english-language-words")),
            "/x?lang=english-language-words"
        );
    }

    #[test]
    fn metrics_render_in_prometheus_text_format_and_move() {
        let m = Metrics::new().unwrap();
        m.request(&FinishedRequest {
            route: RouteKind::Pod,
            status: 200,
            port: 3000,
            duration: Duration::from_millis(3),
            upstream_duration: Some(Duration::from_millis(2)),
            bytes_in: 10,
            bytes_out: 20,
            connect_failed: false,
            answer: None,
        });
        m.request(&FinishedRequest {
            route: RouteKind::Pod,
            status: 403,
            port: 31337,
            duration: Duration::from_millis(1),
            upstream_duration: None,
            bytes_in: 0,
            bytes_out: 20,
            connect_failed: false,
            answer: Some("forbidden"),
        });
        m.authz_lookup(pinacle_authz::CacheLookup::Hit);
        m.authz_lookup(pinacle_authz::CacheLookup::Miss);
        m.directory_query("pods_by_slug", Duration::from_millis(1), Some("timeout"));
        m.tunnels(1);
        let text = m.render();
        for line in [
            "pinacle_ingress_requests_total{port=\"3000\",route=\"pod\",status_class=\"2xx\"} 1",
            "pinacle_ingress_requests_total{port=\"other\",route=\"pod\",status_class=\"4xx\"} 1",
            "pinacle_ingress_answers_total{answer=\"forbidden\"} 1",
            "pinacle_ingress_authz_cache_lookups_total{result=\"hit\"} 1",
            "pinacle_ingress_directory_errors_total{kind=\"timeout\",query=\"pods_by_slug\"} 1",
            "pinacle_ingress_websocket_tunnels_open 1",
            "pinacle_ingress_sent_bytes_total{route=\"pod\"} 40",
            "# TYPE pinacle_ingress_request_duration_seconds histogram",
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
    }

    #[test]
    fn waiting_for_an_upgrade_is_not_an_error() {
        assert_eq!(
            bridged_level(
                log::Level::Error,
                "No incoming socket transfer, sleep 1s and try again"
            ),
            log::Level::Info
        );
        assert_eq!(
            bridged_level(log::Level::Error, "Fail to proxy: ..."),
            log::Level::Error
        );
    }

    #[test]
    fn the_port_label_is_bounded() {
        assert_eq!(port_label(0), "");
        assert_eq!(port_label(8726), "8726");
        assert_eq!(port_label(3000), "3000");
        assert_eq!(port_label(31337), "other");
        assert_eq!(port_label(1), "other");
    }

    #[test]
    fn fixed_label_series_exist_at_zero_from_the_start() {
        let text = Metrics::new().unwrap().render();
        for series in [
            "pinacle_ingress_answers_total{answer=\"forbidden\"} 0",
            "pinacle_ingress_answers_total{answer=\"too-many-connections\"} 0",
            "pinacle_ingress_authz_cache_lookups_total{result=\"miss\"} 0",
            "pinacle_ingress_directory_errors_total{kind=\"timeout\",query=\"session\"} 0",
            "pinacle_ingress_upstream_connect_failures_total{route=\"pod\"} 0",
            "pinacle_ingress_received_bytes_total{route=\"dashboard\"} 0",
            "pinacle_ingress_requests_total{port=\"8726\",route=\"pod\",status_class=\"5xx\"} 0",
            "pinacle_ingress_requests_total{port=\"\",route=\"dashboard\",status_class=\"2xx\"} 0",
        ] {
            assert!(text.contains(series), "{series} not in:\n{text}");
        }
    }

    #[test]
    fn status_classes() {
        assert_eq!(status_class(101), "1xx");
        assert_eq!(status_class(404), "4xx");
        assert_eq!(status_class(0), "none");
    }
}
