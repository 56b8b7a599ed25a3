//! Revocation reaching live traffic. A long-lived connection (a WebSocket tunnel, a streaming
//! response on the plain engine) registers the grant it was allowed under; [`run`] checks the
//! grants again when the directory announces a change that concerns them
//! ([`pinacle_authz::live`]) and, whatever is announced, every allow TTL, and closes the
//! connections whose user has lost access: membership removed, the pod archived, stopped,
//! replaced or moved to another server, the user deleted, the database session deleted. An
//! expiring credential alone closes nothing (a proxy token reaching its 15 minutes is not a
//! loss of access), and neither does a directory that cannot answer (a stale allow or an error:
//! "could not decide" is not "no").

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use pinacle_authz::live::{Invalidation, LiveHandle};
use pinacle_authz::{Authorizer, Decision, PodId, PodSlug, SessionToken, UserId};
use tokio::sync::{broadcast, watch};

use crate::telemetry::Metrics;

/// What a connection was allowed under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The user.
    pub user: UserId,
    /// The pod's slug (as in the hostname).
    pub slug: PodSlug,
    /// The pod it reached (a new pod with the slug is another pod).
    pub pod_id: PodId,
    /// The upstream it reached (a pod moved to another server is reached elsewhere).
    pub upstream: SocketAddr,
    /// The database session tokens the request presented (empty for other credentials): the
    /// connection lives while one of them exists.
    pub sessions: Vec<SessionToken>,
}

/// The registered live connections.
#[derive(Debug, Clone, Default)]
pub struct Registry(Arc<Inner>);

/// A registered connection's grant and the switch that revokes it.
type Entry = (Arc<Grant>, watch::Sender<bool>);

#[derive(Debug, Default)]
struct Inner {
    next: AtomicU64,
    live: Mutex<HashMap<u64, Entry>>,
}

/// A registered connection: [`Registration::revoked`] resolves once access is gone;
/// dropping it unregisters.
#[derive(Debug)]
pub struct Registration {
    id: u64,
    registry: Registry,
    revoked: watch::Receiver<bool>,
}

impl Registration {
    /// Resolves when the connection must close (never, while access holds).
    pub async fn revoked(&mut self) {
        // `wait_for` also sees a revocation that happened before the first poll; an error means
        // the registry is gone, which never revokes.
        if self.revoked.wait_for(|revoked| *revoked).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Registration {
    /// Whether access is gone (a synchronous look, for callbacks that cannot wait).
    pub fn is_revoked(&self) -> bool {
        *self.revoked.borrow()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry
            .0
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

impl Registry {
    /// Registers a live connection under `grant`.
    pub fn register(&self, grant: Arc<Grant>) -> Registration {
        let id = self.0.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(false);
        self.0
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, (grant, tx));
        Registration {
            id,
            registry: self.clone(),
            revoked: rx,
        }
    }

    /// How many connections are registered.
    pub fn len(&self) -> usize {
        self.0
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The registered grants `invalidation` concerns.
    fn concerned(&self, invalidation: &Invalidation) -> Vec<(u64, Arc<Grant>)> {
        self.0
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(_, (grant, _))| invalidation.concerns(&grant.user, &grant.slug))
            .map(|(id, (grant, _))| (*id, grant.clone()))
            .collect()
    }

    fn revoke(&self, id: u64) {
        if let Some((_, tx)) = self
            .0
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
        {
            let _ = tx.send(true);
        }
    }
}

/// Whether `grant` still holds. Directory failures keep it (not a denial).
pub async fn still_allowed(authorizer: &Authorizer, grant: &Grant) -> bool {
    match authorizer.authorize(&grant.user, &grant.slug).await {
        Ok(Decision::Allow {
            pod_id, upstream, ..
        }) if pod_id == grant.pod_id && upstream == grant.upstream => {}
        Ok(_) => return false,
        Err(_) => return true,
    }
    if grant.sessions.is_empty() {
        return true;
    }
    for token in &grant.sessions {
        match authorizer.session_exists(token).await {
            Ok(false) => {}
            Ok(true) | Err(_) => return true,
        }
    }
    false
}

/// Checks the concerned grants again on every invalidation and every `period()`, revoking those
/// that no longer hold. Runs until the runtime stops.
pub async fn run(
    registry: Registry,
    authorizer: Arc<Authorizer>,
    live: Option<LiveHandle>,
    metrics: Metrics,
    period: impl Fn() -> Duration + Send + 'static,
) {
    let mut events = live.as_ref().map(LiveHandle::subscribe);
    let mut next_sweep = tokio::time::Instant::now() + period();
    loop {
        let invalidation = tokio::select! {
            event = next_event(&mut events) => event,
            () = tokio::time::sleep_until(next_sweep) => {
                next_sweep = tokio::time::Instant::now() + period();
                Invalidation::Everything
            }
        };
        if let Some(live) = &live {
            metrics.live_stats(live.stats());
        }
        for (id, grant) in registry.concerned(&invalidation) {
            if !still_allowed(&authorizer, &grant).await {
                tracing::info!(
                    user = grant.user.as_str(),
                    pod = grant.slug.as_str(),
                    "access revoked; closing the live connection"
                );
                registry.revoke(id);
            }
        }
    }
}

/// The next invalidation; a receiver that fell behind re-checks everything; without a listener,
/// never.
async fn next_event(events: &mut Option<broadcast::Receiver<Invalidation>>) -> Invalidation {
    let Some(rx) = events else {
        return std::future::pending().await;
    };
    match rx.recv().await {
        Ok(invalidation) => invalidation,
        Err(broadcast::error::RecvError::Lagged(_)) => Invalidation::Everything,
        Err(broadcast::error::RecvError::Closed) => {
            *events = None;
            std::future::pending().await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(user: &str, slug: &str) -> Arc<Grant> {
        Arc::new(Grant {
            user: UserId::new(user).unwrap(),
            slug: PodSlug::parse(slug).unwrap(),
            pod_id: PodId::new("pod_1").unwrap(),
            upstream: "127.0.0.1:1".parse().unwrap(),
            sessions: Vec::new(),
        })
    }

    #[tokio::test]
    async fn only_concerned_registrations_are_found_and_dropping_unregisters() {
        let registry = Registry::default();
        let a = registry.register(grant("a", "demo"));
        let b = registry.register(grant("b", "other"));
        assert_eq!(registry.len(), 2);
        let users = Invalidation::Users(vec![UserId::new("a").unwrap()]);
        let found: Vec<u64> = registry
            .concerned(&users)
            .iter()
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(found, vec![a.id]);
        let pods = Invalidation::Pods(vec![PodSlug::parse("other").unwrap()]);
        let found: Vec<u64> = registry
            .concerned(&pods)
            .iter()
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(found, vec![b.id]);
        assert_eq!(registry.concerned(&Invalidation::Everything).len(), 2);
        drop(a);
        assert_eq!(registry.len(), 1);
    }

    #[tokio::test]
    async fn a_revocation_wakes_its_connection_even_before_it_waits() {
        let registry = Registry::default();
        let mut a = registry.register(grant("a", "demo"));
        let mut b = registry.register(grant("b", "demo"));
        registry.revoke(a.id);
        tokio::time::timeout(Duration::from_secs(5), a.revoked())
            .await
            .expect("the revoked connection is told");
        let waiting = tokio::time::timeout(Duration::from_millis(50), b.revoked()).await;
        assert!(waiting.is_err(), "the other connection is not revoked");
    }
}
