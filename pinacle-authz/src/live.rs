//! Live invalidation: the dashboard's database announces every change to the rows
//! authorization reads (`sql/pinacle-notify.sql`: triggers that `NOTIFY pinacle_authz`), and
//! [`spawn_listener`] keeps one `LISTEN` connection that forgets exactly the affected cached
//! answers, then tells whoever subscribed ([`LiveHandle::subscribe`]) so that live connections
//! can be checked again.
//!
//! When the connection is lost, everything cached is forgotten once it is back (changes made
//! meanwhile were not announced to us), and subscribers hear [`Invalidation::Everything`]. The
//! connection is re-made with capped, jittered exponential backoff, and pinged so that a link
//! that silently stopped passing traffic is noticed within `ping_interval + ping_timeout`.
//!
//! `LISTEN` needs a session of its own on the server: point it at Postgres itself or a pooler
//! in session mode, never a transaction-mode pooler (PgBouncer's `pool_mode = transaction`
//! drops notifications).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde::Deserialize;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::sync::broadcast;

use crate::authorizer::Authorizer;
use crate::ids::{PodSlug, UserId};

/// The channel the triggers notify.
pub const CHANNEL: &str = "pinacle_authz";

/// What a change makes stale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// Everything about these users (membership, sessions, the user row).
    Users(Vec<UserId>),
    /// Every decision about the pods with these slugs (status, archive, server, owner, team).
    Pods(Vec<PodSlug>),
    /// Everything (a server changed, the listener was disconnected, a payload we do not
    /// understand).
    Everything,
}

/// A notification's payload, as the triggers build it.
#[derive(Debug, Deserialize)]
struct Payload {
    table: String,
    #[serde(default)]
    users: Vec<String>,
    #[serde(default)]
    slugs: Vec<String>,
}

impl Invalidation {
    /// What a notification's payload makes stale. Anything unexpected forgets everything
    /// (safe: the next requests ask the directory again).
    pub fn from_payload(payload: &str) -> Self {
        let Ok(p) = serde_json::from_str::<Payload>(payload) else {
            return Self::Everything;
        };
        match p.table.as_str() {
            "team_member" | "user" | "session" => {
                let users: Result<Vec<UserId>, _> =
                    p.users.iter().map(|u| UserId::new(u)).collect();
                match users {
                    Ok(users) => Self::Users(users),
                    Err(_) => Self::Everything,
                }
            }
            "pod" => {
                let slugs: Result<Vec<PodSlug>, _> =
                    p.slugs.iter().map(|s| PodSlug::parse(s)).collect();
                match slugs {
                    Ok(slugs) => Self::Pods(slugs),
                    Err(_) => Self::Everything,
                }
            }
            _ => Self::Everything,
        }
    }

    /// Whether this can change what `user` may do on the pod `slug`.
    pub fn concerns(&self, user: &UserId, slug: &PodSlug) -> bool {
        match self {
            Self::Users(users) => users.contains(user),
            Self::Pods(slugs) => slugs.contains(slug),
            Self::Everything => true,
        }
    }
}

impl Authorizer {
    /// Forgets the cached answers `invalidation` makes stale.
    pub fn invalidate(&self, invalidation: &Invalidation) {
        match invalidation {
            Invalidation::Users(users) => users.iter().for_each(|u| self.invalidate_user(u)),
            Invalidation::Pods(slugs) => slugs.iter().for_each(|s| self.invalidate_pod(s)),
            Invalidation::Everything => self.invalidate_all(),
        }
    }
}

/// Listener settings.
#[derive(Debug, Clone)]
pub struct LiveOptions {
    /// The first wait before reconnecting (doubled per failure, with jitter).
    pub reconnect_min: Duration,
    /// The longest wait before reconnecting.
    pub reconnect_max: Duration,
    /// Longest wait to connect and `LISTEN`, and for a ping's answer.
    pub timeout: Duration,
    /// How often a quiet connection is pinged.
    pub ping_interval: Duration,
}

impl Default for LiveOptions {
    fn default() -> Self {
        Self {
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(10),
            timeout: Duration::from_secs(2),
            ping_interval: Duration::from_secs(10),
        }
    }
}

/// Counters of the listener (for metrics).
#[derive(Debug, Default)]
pub struct LiveStats {
    /// Notifications received.
    pub notifications: AtomicU64,
    /// Connections re-made after a loss (the first connection is not counted).
    pub reconnects: AtomicU64,
    /// Whether the listener is connected now.
    pub connected: AtomicBool,
}

/// The running listener.
#[derive(Debug, Clone)]
pub struct LiveHandle {
    events: broadcast::Sender<Invalidation>,
    stats: Arc<LiveStats>,
}

impl LiveHandle {
    /// Every invalidation from now on, after the cache has applied it. A receiver that falls
    /// behind gets `Lagged` from `recv`: treat it as [`Invalidation::Everything`].
    pub fn subscribe(&self) -> broadcast::Receiver<Invalidation> {
        self.events.subscribe()
    }

    /// The listener's counters.
    pub fn stats(&self) -> &Arc<LiveStats> {
        &self.stats
    }
}

/// Starts the listener on the current Tokio runtime: it runs until the runtime stops.
pub fn spawn_listener(
    connect: PgConnectOptions,
    authorizer: Authorizer,
    options: LiveOptions,
) -> LiveHandle {
    let (events, _) = broadcast::channel(1024);
    let handle = LiveHandle {
        events,
        stats: Arc::new(LiveStats::default()),
    };
    let task = handle.clone();
    tokio::spawn(async move { run(connect, authorizer, options, task).await });
    handle
}

async fn run(
    connect: PgConnectOptions,
    authorizer: Authorizer,
    options: LiveOptions,
    handle: LiveHandle,
) {
    let mut failures: u32 = 0;
    // Answers cached before the first connection, or while none was up, may be stale.
    let mut missed = false;
    loop {
        match listen_once(&connect, &authorizer, &options, &handle, missed).await {
            // Connected, then lost: try again at once (the first retry waits the minimum).
            Ok(()) => {
                missed = true;
                failures = 0;
                tracing::warn!(
                    channel = CHANNEL,
                    "lost the directory's notification connection; reconnecting"
                );
            }
            Err(e) => {
                missed = true;
                failures = failures.saturating_add(1);
                tracing::warn!(channel = CHANNEL, error = %e, failures, "cannot listen for directory changes");
            }
        }
        handle.stats.connected.store(false, Ordering::Relaxed);
        tokio::time::sleep(backoff(&options, failures)).await;
    }
}

/// The wait before reconnect attempt `failures` (0: the first after a loss).
fn backoff(options: &LiveOptions, failures: u32) -> Duration {
    let base = options
        .reconnect_min
        .saturating_mul(1u32 << failures.min(16))
        .min(options.reconnect_max);
    // Up to a quarter more, so that gateways that lost the database together do not return
    // in step (the clock's low bits are enough jitter for this).
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let jitter = base.mul_f64(f64::from(nanos % 1000) / 4000.0);
    (base + jitter).min(options.reconnect_max)
}

/// One connection's life: connect, `LISTEN`, apply notifications until the connection fails.
/// `Ok(())` when a working connection was lost; `Err` when none could be made.
async fn listen_once(
    connect: &PgConnectOptions,
    authorizer: &Authorizer,
    options: &LiveOptions,
    handle: &LiveHandle,
    reconnecting: bool,
) -> Result<(), sqlx::Error> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(options.timeout)
        .connect_lazy_with(connect.clone());
    let mut listener = tokio::time::timeout(options.timeout, async {
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.ignore_pool_close_event(true);
        listener.listen(CHANNEL).await?;
        Ok::<_, sqlx::Error>(listener)
    })
    .await
    .map_err(|_| sqlx::Error::PoolTimedOut)??;
    handle.stats.connected.store(true, Ordering::Relaxed);
    if reconnecting {
        // Changes made while we were away were not announced to us.
        handle.stats.reconnects.fetch_add(1, Ordering::Relaxed);
        authorizer.invalidate_all();
        let _ = handle.events.send(Invalidation::Everything);
        tracing::info!(
            channel = CHANNEL,
            "listening for directory changes again; forgot every cached answer"
        );
    } else {
        tracing::info!(channel = CHANNEL, "listening for directory changes");
    }
    loop {
        let next = tokio::time::timeout(options.ping_interval, listener.try_recv()).await;
        match next {
            Ok(Ok(Some(notification))) => {
                handle.stats.notifications.fetch_add(1, Ordering::Relaxed);
                let invalidation = Invalidation::from_payload(notification.payload());
                tracing::debug!(?invalidation, "directory change");
                authorizer.invalidate(&invalidation);
                let _ = handle.events.send(invalidation);
            }
            // The connection was lost (`try_recv` reconnects on its next call; we start over
            // ourselves to forget everything first).
            Ok(Ok(None)) | Ok(Err(_)) => return Ok(()),
            Err(_) => {
                // Quiet for a while: make sure the link still carries traffic.
                let ping = tokio::time::timeout(
                    options.timeout,
                    sqlx::query("SELECT 1").execute(&mut listener),
                )
                .await;
                if !matches!(ping, Ok(Ok(_))) {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_name_what_to_forget_and_anything_odd_forgets_everything() {
        let user = |s: &str| UserId::new(s).unwrap();
        assert_eq!(
            Invalidation::from_payload(r#"{"table":"team_member","users":["u2"],"slugs":[]}"#),
            Invalidation::Users(vec![user("u2")])
        );
        assert_eq!(
            Invalidation::from_payload(r#"{"table":"session","users":["u1"]}"#),
            Invalidation::Users(vec![user("u1")])
        );
        assert_eq!(
            Invalidation::from_payload(r#"{"table":"pod","users":[],"slugs":["demo","demo2"]}"#),
            Invalidation::Pods(vec![
                PodSlug::parse("demo").unwrap(),
                PodSlug::parse("demo2").unwrap()
            ])
        );
        for odd in [
            r#"{"table":"server","users":[],"slugs":[]}"#,
            r#"{"table":"pod","slugs":["Not A Slug"]}"#,
            r#"{"table":"user","users":[""]}"#,
            "not json",
            r#"{"table":"team"}"#,
        ] {
            assert_eq!(
                Invalidation::from_payload(odd),
                Invalidation::Everything,
                "{odd}"
            );
        }
        let demo = PodSlug::parse("demo").unwrap();
        assert!(Invalidation::Users(vec![user("a")]).concerns(&user("a"), &demo));
        assert!(!Invalidation::Users(vec![user("a")]).concerns(&user("b"), &demo));
        assert!(Invalidation::Pods(vec![demo.clone()]).concerns(&user("b"), &demo));
        assert!(Invalidation::Everything.concerns(&user("b"), &demo));
    }

    #[test]
    fn reconnect_waits_grow_and_are_capped() {
        let options = LiveOptions {
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(2),
            ..LiveOptions::default()
        };
        let first = backoff(&options, 0);
        assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(125));
        let third = backoff(&options, 2);
        assert!(third >= Duration::from_millis(400) && third <= Duration::from_millis(500));
        assert_eq!(backoff(&options, 30), Duration::from_secs(2));
        assert!(backoff(&options, 5) <= Duration::from_secs(2));
    }
}
