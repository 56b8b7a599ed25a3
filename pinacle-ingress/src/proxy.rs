//! The proxy's shared state and its three engines' common handle, [`Ingress`].
//!
//! A request goes one way (see `ARCHITECTURE.md`): an engine parses it into a
//! [`crate::policy::RequestView`], [`State::decide`] judges it once, and the engine carries the
//! verdict out: [`crate::plain_engine`] (bodiless HTTP/1.1 `GET`/`HEAD`),
//! [`crate::pingora_engine`] (Pingora's loop: everything else) or, for an accepted upgrade,
//! [`crate::tunnel`]. [`crate::access::Record::finish`] writes the one access line.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use arc_swap::ArcSwap;
use pinacle_authz::{Authorizer, CredentialVerifier};

use crate::config::IngressConfig;
use crate::connections::PlainRequests;
pub use crate::pingora_engine::RequestCtx;
use crate::plain::UpstreamPool;
use crate::request_id::RequestIds;
use crate::telemetry::Metrics;
pub use crate::telemetry::RouteKind;

/// Unix seconds now (the credential clock).
pub type Clock = fn() -> i64;

/// The proxy: Pingora's `ProxyHttp` and the gate's [`PlainRequests`] over one shared state.
pub struct Ingress(Arc<State>);

/// What every request reads.
pub struct State {
    /// Swapped whole by a reload (SIGHUP); each use reads the current one.
    pub(crate) config: ArcSwap<IngressConfig>,
    pub(crate) verifier: CredentialVerifier,
    pub(crate) authorizer: Arc<Authorizer>,
    pub(crate) ids: RequestIds,
    pub(crate) clock: Clock,
    pub(crate) metrics: Metrics,
    pub(crate) in_flight: Arc<AtomicUsize>,
    /// Idle upstream connections of the plain path (Pingora keeps its own).
    pub(crate) pool: UpstreamPool,
    /// Long-lived connections, closed when their user loses access.
    pub(crate) revocations: crate::revocation::Registry,
    /// Calls to the control plane.
    pub(crate) control: Arc<crate::control::Client>,
    /// Start calls in flight for `wake_on_request`.
    pub(crate) wakes: Arc<crate::control::Wakes>,
    /// Traffic since the last activity report.
    pub(crate) activity: Arc<crate::control::Activity>,
    /// Keys from `[api] jwks_url`.
    pub(crate) url_keys: Arc<crate::api_auth::UrlKeys>,
    /// Rate limits and quotas.
    pub(crate) limiter: Arc<crate::rate_limit::Limiter>,
    /// Bearer tokens verified lately.
    pub(crate) verified_tokens: crate::api_auth::VerifiedTokens,
    /// Agent tunnels: where pods of servers behind NAT are reached.
    pub(crate) agents: Arc<crate::agents::Agents>,
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
    pub(crate) fn config(&self) -> arc_swap::Guard<Arc<IngressConfig>> {
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
        agents: Arc<crate::agents::Agents>,
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
            revocations: crate::revocation::Registry::default(),
            control: Arc::default(),
            wakes: Arc::default(),
            activity: Arc::default(),
            url_keys: Arc::default(),
            limiter: Arc::default(),
            verified_tokens: crate::api_auth::VerifiedTokens::default(),
            agents,
        }))
    }

    /// A handle that swaps in a new configuration for the requests that follow (see
    /// [`State::reconfigure`]).
    pub fn state(&self) -> Arc<State> {
        self.0.clone()
    }

    /// The live connections revocation may close.
    pub fn revocations(&self) -> crate::revocation::Registry {
        self.revocations.clone()
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
