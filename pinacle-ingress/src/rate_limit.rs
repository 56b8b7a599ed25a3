//! Rate limits and daily quotas: token buckets per user and per pod and a quota per UTC day,
//! per kind of client (API clients, browsers), kept in Redis and so shared by every gateway
//! (one Lua script, one round trip, atomic across the request's buckets and quota), or in
//! memory when no Redis is configured or while it cannot be reached (the same limits, quota
//! included; each gateway then counts on its own).
//!
//! The bucket: `burst` tokens, refilled at `per_second`; a request takes one token from each
//! of its buckets and one unit of each quota, all or nothing. Redis keeps its own clock
//! (`TIME`), so gateways with skewed clocks share one bucket correctly.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use pinacle_authz::Secret;

/// One limit (`{ burst = 10, per_second = 5, daily = 200000 }`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    /// Tokens the bucket holds.
    pub burst: u32,
    /// Tokens refilled per second.
    pub per_second: f64,
    /// Requests per UTC day (none: no quota).
    pub daily: Option<u64>,
}

/// `[rate_limits]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RateLimits {
    /// Per user, for API clients (bearer JWT, HMAC).
    pub api_per_user: Option<Limit>,
    /// Per pod, for API clients.
    pub api_per_pod: Option<Limit>,
    /// Per user, for browsers (cookies, proxy tokens).
    pub browser_per_user: Option<Limit>,
    /// Per client address (IPv6: per /64), always in this gateway's memory: the directory
    /// queries a client may cause before anyone is signed in (database session tokens and CORS
    /// pass slugs that are not cached). On unless turned off ([`DEFAULT_LOOKUPS_PER_CLIENT`]).
    pub lookups_per_client: Option<Limit>,
    /// Where buckets are shared (none: in memory).
    pub redis_url: Option<Secret>,
    /// Longest one Redis check may take before this gateway counts in memory.
    pub redis_timeout: Duration,
}

/// `lookups_per_client` unless configured: a browser whose database session is not cached
/// costs one; a NAT of many users stays far below it, a stranger guessing tokens gets 20 a
/// second.
pub const DEFAULT_LOOKUPS_PER_CLIENT: Limit = Limit {
    burst: 100,
    per_second: 20.0,
    daily: None,
};

impl RateLimits {
    /// Whether any limit of a signed-in client is set (`lookups_per_client` is checked apart).
    pub fn any(&self) -> bool {
        self.api_per_user.is_some() || self.api_per_pod.is_some() || self.browser_per_user.is_some()
    }
}

/// The kind of client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Authenticated by a bearer JWT or an HMAC signature.
    Api,
    /// Authenticated by a session cookie or a proxy token.
    Browser,
    /// Not (yet) authenticated: directory lookups by client address.
    Lookup,
}

impl Kind {
    /// `api` or `browser`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Api => "api",
            Self::Browser => "browser",
            Self::Lookup => "lookup",
        }
    }
}

/// One bucket or quota of a check.
#[derive(Debug, Clone, PartialEq)]
pub struct Counter {
    /// The policy's name (`api-user`, `api-pod`, `browser-user`), as the `RateLimit` fields say.
    pub policy: &'static str,
    /// The key (without the day for quotas).
    pub key: String,
    /// The limit.
    pub limit: Limit,
}

/// What a request is checked against.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Check {
    /// Its counters.
    pub counters: Vec<Counter>,
}

impl Check {
    /// The counters for a request of `kind` by `user` to pod `pod` (for [`Kind::Lookup`]:
    /// `user` is the [`client_key`], `pod` unused).
    pub fn of(limits: &RateLimits, kind: Kind, user: &str, pod: &str) -> Self {
        let mut counters = Vec::new();
        let mut add = |policy: &'static str, limit: Option<Limit>, key: String| {
            if let Some(limit) = limit {
                counters.push(Counter { policy, key, limit });
            }
        };
        match kind {
            Kind::Api => {
                add("api-user", limits.api_per_user, format!("api:user:{user}"));
                add("api-pod", limits.api_per_pod, format!("api:pod:{pod}"));
            }
            Kind::Browser => {
                add(
                    "browser-user",
                    limits.browser_per_user,
                    format!("browser:user:{user}"),
                );
            }
            Kind::Lookup => {
                add(
                    "client-lookups",
                    limits.lookups_per_client,
                    format!("lookups:client:{user}"),
                );
            }
        }
        Self { counters }
    }
}

/// The verdict.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Go ahead.
    Allowed,
    /// Over a limit.
    Limited {
        /// Seconds until a request would pass (at least 1).
        retry_after: u64,
        /// The counter that limited it.
        policy: &'static str,
        /// Its limit.
        limit: Limit,
        /// A bucket (false) or the daily quota (true).
        daily: bool,
    },
}

/// Who a client address is, for counting it: IPv4 (and IPv4-mapped) addresses as they are,
/// IPv6 by its /64 (one host's share of a network; anyone holds a whole /64).
pub fn client_net(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip.to_canonical() {
        v4 @ std::net::IpAddr::V4(_) => v4,
        std::net::IpAddr::V6(v6) => {
            let s = v6.segments();
            std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0).into()
        }
    }
}

/// The key a client address is counted under ([`client_net`]; IPv6 networks with `/64`).
pub fn client_key(ip: std::net::IpAddr) -> String {
    match client_net(ip) {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(net) => format!("{net}/64"),
    }
}

impl Verdict {
    /// `allowed` or `limited` (the metric's label).
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Limited { .. } => "limited",
        }
    }
}

/// Seconds from `now` (unix) to the next UTC midnight, and the day's number.
pub fn utc_day(now: i64) -> (i64, u64) {
    let day = now.div_euclid(86_400);
    (day, u64::try_from((day + 1) * 86_400 - now).unwrap_or(1))
}

/// A bucket in memory.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at_ms: i64,
    /// When it holds its whole burst again (from then on it is as good as absent).
    full_at_ms: i64,
}

/// The in-memory store: buckets and the day's counts. Bounded: at most [`MEMORY_KEYS`] keys
/// (or the capacity given). A full store forgets buckets that have refilled and other days'
/// counts (at most once a second, so a full store costs no scan per request); if it is still
/// full, a key it does not hold is allowed and not stored, while the keys it holds are still
/// enforced.
#[derive(Debug)]
pub struct Memory {
    state: Mutex<MemoryState>,
    capacity: usize,
}

impl Default for Memory {
    fn default() -> Self {
        Self::with_capacity(MEMORY_KEYS)
    }
}

#[derive(Debug, Default)]
struct MemoryState {
    buckets: HashMap<String, Bucket>,
    counts: HashMap<(String, i64), u64>,
    pruned_at_ms: i64,
}

/// Keys the memory store tracks at most.
pub const MEMORY_KEYS: usize = 200_000;

impl Memory {
    /// A store of at most `capacity` keys.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            state: Mutex::default(),
            capacity,
        }
    }

    /// Checks and, if allowed, takes (`now_ms`: unix milliseconds).
    pub fn check(&self, check: &Check, now_ms: i64) -> Verdict {
        self.check_cost(check, 1, now_ms)
    }

    /// [`Memory::check`] for `cost` units at once (each bucket's share capped at its burst, so
    /// that a cost can always be met once the bucket is full).
    pub fn check_cost(&self, check: &Check, cost: u32, now_ms: i64) -> Verdict {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (day, to_midnight) = utc_day(now_ms.div_euclid(1000));
        let held = |state: &MemoryState| state.buckets.len() + state.counts.len();
        if held(&state) >= self.capacity && now_ms - state.pruned_at_ms >= 1000 {
            state.prune(now_ms, day);
            state.pruned_at_ms = now_ms;
        }
        let full = held(&state) >= self.capacity;
        let mut worst: Option<Verdict> = None;
        let mut refilled = Vec::with_capacity(check.counters.len());
        for counter in &check.counters {
            let limit = counter.limit;
            let bucket = state.buckets.get(&counter.key).copied().unwrap_or(Bucket {
                tokens: f64::from(limit.burst),
                at_ms: now_ms,
                full_at_ms: now_ms,
            });
            let tokens = refill(bucket, limit, now_ms);
            let need = f64::from(cost.min(limit.burst));
            refilled.push((tokens, need));
            if tokens < need {
                let wait = ((need - tokens) / limit.per_second).ceil().max(1.0) as u64;
                worse(&mut worst, wait, counter, false);
            }
            if let Some(daily) = limit.daily {
                let used = state
                    .counts
                    .get(&(counter.key.clone(), day))
                    .copied()
                    .unwrap_or(0);
                if used + u64::from(cost) > daily {
                    worse(&mut worst, to_midnight, counter, true);
                }
            }
        }
        if let Some(limited) = worst {
            return limited;
        }
        for (counter, (tokens, need)) in check.counters.iter().zip(refilled) {
            let limit = counter.limit;
            let left = tokens - need;
            let refill_ms = (f64::from(limit.burst) - left) / limit.per_second * 1000.0;
            let bucket = Bucket {
                tokens: left,
                at_ms: now_ms,
                full_at_ms: now_ms.saturating_add(refill_ms.ceil() as i64),
            };
            match state.buckets.get_mut(&counter.key) {
                Some(held) => *held = bucket,
                None if !full => {
                    state.buckets.insert(counter.key.clone(), bucket);
                }
                None => {}
            }
            if limit.daily.is_some() {
                let key = (counter.key.clone(), day);
                match state.counts.get_mut(&key) {
                    Some(used) => *used += u64::from(cost),
                    None if !full => {
                        state.counts.insert(key, u64::from(cost));
                    }
                    None => {}
                }
            }
        }
        Verdict::Allowed
    }
}

impl MemoryState {
    /// Forgets buckets that are full again and counts of other days.
    fn prune(&mut self, now_ms: i64, day: i64) {
        self.counts.retain(|(_, d), _| *d == day);
        self.buckets.retain(|_, b| b.full_at_ms > now_ms);
    }
}

fn refill(bucket: Bucket, limit: Limit, now_ms: i64) -> f64 {
    let elapsed = (now_ms - bucket.at_ms).max(0) as f64 / 1000.0;
    (bucket.tokens + elapsed * limit.per_second).min(f64::from(limit.burst))
}

/// Keeps the longest wait.
fn worse(worst: &mut Option<Verdict>, wait: u64, counter: &Counter, daily: bool) {
    let longer = match worst {
        Some(Verdict::Limited { retry_after, .. }) => wait > *retry_after,
        _ => true,
    };
    if longer {
        *worst = Some(Verdict::Limited {
            retry_after: wait.max(1),
            policy: counter.policy,
            limit: counter.limit,
            daily,
        });
    }
}

/// The Redis script: every bucket refilled by Redis's clock, every quota read; all allowed,
/// all taken; else the longest wait and which counter. KEYS: the buckets, then the quotas.
/// ARGV: bucket count, quota count, then burst and rate per bucket, then limit and seconds to
/// midnight per quota. Returns `{allowed, wait_ms, index}` (index 1-based over KEYS).
pub const SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local nb, nq = tonumber(ARGV[1]), tonumber(ARGV[2])
local tokens, wait, which = {}, 0, 0
for i = 1, nb do
  local burst, rate = tonumber(ARGV[2 + 2 * i - 1]), tonumber(ARGV[2 + 2 * i])
  local s = redis.call('HMGET', KEYS[i], 't', 'at')
  local have, at = tonumber(s[1]) or burst, tonumber(s[2]) or now
  local elapsed = now - at
  if elapsed < 0 then elapsed = 0 end
  have = math.min(burst, have + elapsed * rate / 1000)
  tokens[i] = have
  if have < 1 then
    local w = math.ceil((1 - have) * 1000 / rate)
    if w > wait then wait, which = w, i end
  end
end
local base = 2 + 2 * nb
for j = 1, nq do
  local limit, left = tonumber(ARGV[base + 2 * j - 1]), tonumber(ARGV[base + 2 * j])
  local used = tonumber(redis.call('GET', KEYS[nb + j]) or '0')
  if used >= limit and left * 1000 > wait then wait, which = left * 1000, nb + j end
end
if wait > 0 then return {0, wait, which} end
for i = 1, nb do
  local burst, rate = tonumber(ARGV[2 + 2 * i - 1]), tonumber(ARGV[2 + 2 * i])
  redis.call('HSET', KEYS[i], 't', tostring(tokens[i] - 1), 'at', now)
  redis.call('PEXPIRE', KEYS[i], math.ceil(burst * 1000 / rate) + 1000)
end
for j = 1, nq do
  local used = redis.call('INCR', KEYS[nb + j])
  if used == 1 then redis.call('EXPIRE', KEYS[nb + j], tonumber(ARGV[base + 2 * j]) + 3600) end
end
return {1, 0, 0}
";

/// The prefix of every key the ingress writes to Redis.
pub const KEY_PREFIX: &str = "pinacle:rl:";

/// Where a check was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Shared, in Redis.
    Redis,
    /// This gateway's memory.
    Memory,
}

impl Backend {
    /// `redis` or `memory`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Redis => "redis",
            Self::Memory => "memory",
        }
    }
}

/// How long after a Redis failure checks stay in memory before Redis is tried again.
pub const REDIS_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The limiter: Redis when configured and reachable, memory otherwise.
#[derive(Default)]
pub struct Limiter {
    memory: Memory,
    /// `lookups_per_client`'s buckets, apart: addresses of anyone on the network never crowd
    /// out the signed-in clients' limits.
    lookups: Memory,
    redis: ArcSwapOption<RedisLink>,
    /// Unix ms until which Redis is not tried (after a failure).
    down_until_ms: AtomicU64,
    connecting: tokio::sync::Mutex<()>,
    /// Unix ms of the last warning about a client over `lookups_per_client`.
    lookups_warned_ms: AtomicU64,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("redis", &self.redis.load().is_some())
            .finish_non_exhaustive()
    }
}

/// A Redis connection for one URL.
struct RedisLink {
    url: Secret,
    connection: redis::aio::MultiplexedConnection,
}

/// What happened to Redis during a check (for the log and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisEvent {
    /// Nothing new.
    None,
    /// It failed: checks go to memory for a while.
    Failed,
    /// It answered again after failing.
    Recovered,
}

impl Limiter {
    /// Checks `cost` directory lookups a not yet authenticated request from `client` would
    /// cause against `lookups_per_client` (in memory: it protects this gateway's queries, and
    /// costs anonymous traffic no Redis round trip). Allowed when the limit is off.
    pub fn check_lookups(
        &self,
        limits: &RateLimits,
        client: std::net::IpAddr,
        cost: usize,
        now_ms: i64,
    ) -> (Check, Verdict) {
        let check = Check::of(limits, Kind::Lookup, &client_key(client), "");
        if check.counters.is_empty() {
            return (check, Verdict::Allowed);
        }
        let cost = u32::try_from(cost).unwrap_or(u32::MAX);
        let verdict = self.lookups.check_cost(&check, cost, now_ms);
        (check, verdict)
    }

    /// Whether a client over `lookups_per_client` should be logged now: once per 10 s at most,
    /// so that a flood of guesses is one line, not one per request.
    pub fn lookup_warning_due(&self, now_ms: i64) -> bool {
        let now = u64::try_from(now_ms).unwrap_or(0);
        let last = self.lookups_warned_ms.load(Ordering::Relaxed);
        (last == 0 || now.saturating_sub(last) >= 10_000)
            && self
                .lookups_warned_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Checks `check` (empty: allowed at once) for a request at `now_ms` (unix ms).
    pub async fn check(
        &self,
        limits: &RateLimits,
        check: &Check,
        now_ms: i64,
    ) -> (Verdict, Backend, RedisEvent) {
        if check.counters.is_empty() {
            return (Verdict::Allowed, Backend::Memory, RedisEvent::None);
        }
        let Some(url) = &limits.redis_url else {
            return (
                self.memory.check(check, now_ms),
                Backend::Memory,
                RedisEvent::None,
            );
        };
        let now_u = u64::try_from(now_ms).unwrap_or(0);
        let down_until = self.down_until_ms.load(Ordering::Acquire);
        if now_u < down_until {
            return (
                self.memory.check(check, now_ms),
                Backend::Memory,
                RedisEvent::None,
            );
        }
        let answered = tokio::time::timeout(
            limits.redis_timeout,
            self.redis_check(url, limits.redis_timeout, check, now_ms),
        )
        .await;
        match answered {
            Ok(Ok(verdict)) => {
                let recovered = down_until != 0
                    && self
                        .down_until_ms
                        .compare_exchange(down_until, 0, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok();
                let event = if recovered {
                    RedisEvent::Recovered
                } else {
                    RedisEvent::None
                };
                (verdict, Backend::Redis, event)
            }
            _ => {
                // Forget the connection (a new one is made when Redis is tried again) and count
                // here for a while.
                self.redis.store(None);
                let until = now_u + REDIS_RETRY_AFTER.as_millis() as u64;
                let previous = self.down_until_ms.swap(until, Ordering::AcqRel);
                let event = if previous == 0 {
                    RedisEvent::Failed
                } else {
                    RedisEvent::None
                };
                (self.memory.check(check, now_ms), Backend::Memory, event)
            }
        }
    }

    async fn redis_check(
        &self,
        url: &Secret,
        timeout: Duration,
        check: &Check,
        now_ms: i64,
    ) -> Result<Verdict, String> {
        let mut connection = self.connection(url, timeout).await?;
        let (day, to_midnight) = utc_day(now_ms.div_euclid(1000));
        let mut invocation = script().prepare_invoke();
        let buckets: Vec<&Counter> = check.counters.iter().collect();
        let quotas: Vec<&Counter> = check
            .counters
            .iter()
            .filter(|c| c.limit.daily.is_some())
            .collect();
        for c in &buckets {
            invocation.key(format!("{KEY_PREFIX}b:{}", c.key));
        }
        for c in &quotas {
            invocation.key(format!("{KEY_PREFIX}q:{}:{day}", c.key));
        }
        invocation.arg(buckets.len()).arg(quotas.len());
        for c in &buckets {
            invocation.arg(c.limit.burst).arg(c.limit.per_second);
        }
        for c in &quotas {
            invocation
                .arg(c.limit.daily.unwrap_or(u64::MAX))
                .arg(to_midnight);
        }
        let (allowed, wait_ms, index): (i64, i64, usize) = invocation
            .invoke_async(&mut connection)
            .await
            .map_err(|e| e.to_string())?;
        if allowed == 1 {
            return Ok(Verdict::Allowed);
        }
        let daily = index > buckets.len();
        let counter = if daily {
            quotas.get(index - buckets.len() - 1)
        } else {
            buckets.get(index.saturating_sub(1))
        };
        let Some(counter) = counter else {
            return Err(format!("the script named counter {index}"));
        };
        Ok(Verdict::Limited {
            retry_after: u64::try_from((wait_ms + 999) / 1000).unwrap_or(1).max(1),
            policy: counter.policy,
            limit: counter.limit,
            daily,
        })
    }

    /// The connection for `url`, made once (again after a failure or a change of URL).
    async fn connection(
        &self,
        url: &Secret,
        timeout: Duration,
    ) -> Result<redis::aio::MultiplexedConnection, String> {
        if let Some(link) = self.redis.load_full()
            && link.url == *url
        {
            return Ok(link.connection.clone());
        }
        let _one = self.connecting.lock().await;
        if let Some(link) = self.redis.load_full()
            && link.url == *url
        {
            return Ok(link.connection.clone());
        }
        let text = std::str::from_utf8(url.expose()).map_err(|e| e.to_string())?;
        let client = redis::Client::open(text).map_err(|e| e.to_string())?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        let connection = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| e.to_string())?;
        self.redis.store(Some(Arc::new(RedisLink {
            url: url.clone(),
            connection: connection.clone(),
        })));
        Ok(connection)
    }
}

fn script() -> &'static redis::Script {
    static SCRIPT_ONCE: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
    SCRIPT_ONCE.get_or_init(|| redis::Script::new(SCRIPT))
}

/// The `RateLimit-Policy` and `RateLimit` fields (IETF httpapi draft) of a 429: every policy
/// of the request's kind, and how much of the one that limited is left (`r=0`) and when it
/// comes back (`t`).
pub fn fields(check: &Check, verdict: &Verdict) -> Vec<(&'static str, String)> {
    let Verdict::Limited {
        retry_after,
        policy,
        daily,
        ..
    } = verdict
    else {
        return Vec::new();
    };
    let mut policies = Vec::new();
    for c in &check.counters {
        let window = (f64::from(c.limit.burst) / c.limit.per_second)
            .ceil()
            .max(1.0) as u64;
        policies.push(format!("\"{}\";q={};w={window}", c.policy, c.limit.burst));
        if let Some(daily) = c.limit.daily {
            policies.push(format!("\"{}-daily\";q={daily};w=86400", c.policy));
        }
    }
    let name = if *daily {
        format!("{policy}-daily")
    } else {
        (*policy).to_owned()
    };
    vec![
        ("ratelimit-policy", policies.join(", ")),
        ("ratelimit", format!("\"{name}\";r=0;t={retry_after}")),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> RateLimits {
        RateLimits {
            api_per_user: Some(Limit {
                burst: 3,
                per_second: 1.0,
                daily: Some(5),
            }),
            api_per_pod: Some(Limit {
                burst: 10,
                per_second: 10.0,
                daily: None,
            }),
            browser_per_user: None,
            lookups_per_client: Some(Limit {
                burst: 4,
                per_second: 2.0,
                daily: None,
            }),
            redis_url: None,
            redis_timeout: Duration::from_millis(50),
        }
    }

    #[test]
    fn lookups_are_counted_per_address_several_at_once() {
        let limiter = Limiter::default();
        let (a, b): (std::net::IpAddr, std::net::IpAddr) =
            ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let t0 = 1_000_000_000_000;
        let take = |ip, cost, at| limiter.check_lookups(&limits(), ip, cost, at).1;
        assert_eq!(take(a, 3, t0), Verdict::Allowed);
        // One left: two at once are refused whole, one passes.
        assert!(matches!(
            take(a, 2, t0),
            Verdict::Limited {
                retry_after: 1,
                policy: "client-lookups",
                ..
            }
        ));
        assert_eq!(take(a, 1, t0), Verdict::Allowed);
        assert!(matches!(take(a, 1, t0), Verdict::Limited { .. }));
        // Another address has its own budget; a cost above the burst takes the whole burst.
        assert_eq!(take(b, 16, t0), Verdict::Allowed);
        assert!(matches!(take(b, 1, t0), Verdict::Limited { .. }));
        // Refilled at its rate.
        assert_eq!(take(a, 2, t0 + 1000), Verdict::Allowed);
        // Over the limit is logged once per 10 s at most.
        assert!(limiter.lookup_warning_due(t0));
        assert!(!limiter.lookup_warning_due(t0 + 9_999));
        assert!(limiter.lookup_warning_due(t0 + 10_000));
        // Off: nothing counted.
        let off = RateLimits {
            lookups_per_client: None,
            ..limits()
        };
        assert_eq!(limiter.check_lookups(&off, a, 100, t0).1, Verdict::Allowed);
        let only_lookups = RateLimits {
            lookups_per_client: limits().lookups_per_client,
            ..RateLimits::default()
        };
        assert!(
            !only_lookups.any(),
            "lookups are no signed-in client's limit: no per-request check for them"
        );
    }

    #[test]
    fn a_full_store_forgets_refilled_buckets_and_never_stores_beyond_its_capacity() {
        let memory = Memory::with_capacity(2);
        let limit = Limit {
            burst: 2,
            per_second: 1.0,
            daily: None,
        };
        let key = |k: &str| Check {
            counters: vec![Counter {
                policy: "p",
                key: k.to_owned(),
                limit,
            }],
        };
        let t0 = 1_000_000_000_000;
        assert_eq!(memory.check(&key("a"), t0), Verdict::Allowed);
        assert_eq!(memory.check(&key("b"), t0), Verdict::Allowed);
        // Full, and a and b still refilling: c is allowed however often, and not stored.
        for _ in 0..5 {
            assert_eq!(memory.check(&key("c"), t0 + 10), Verdict::Allowed);
        }
        // The keys held are still enforced.
        assert_eq!(memory.check(&key("a"), t0 + 10), Verdict::Allowed);
        assert!(matches!(
            memory.check(&key("a"), t0 + 10),
            Verdict::Limited { .. }
        ));
        let held = |m: &Memory| m.state.lock().unwrap().buckets.len();
        assert_eq!(held(&memory), 2);
        // Once a and b have refilled, they are forgotten and c is counted.
        let later = t0 + 2_500;
        assert_eq!(memory.check(&key("c"), later), Verdict::Allowed);
        assert_eq!(memory.check(&key("c"), later), Verdict::Allowed);
        assert!(matches!(
            memory.check(&key("c"), later),
            Verdict::Limited { .. }
        ));
        assert_eq!(held(&memory), 1);
    }

    #[test]
    fn clients_are_keyed_by_address_and_ipv6_by_its_64() {
        let key = |s: &str| client_key(s.parse().unwrap());
        assert_eq!(key("198.51.100.7"), "198.51.100.7");
        assert_eq!(key("::ffff:198.51.100.7"), "198.51.100.7");
        assert_eq!(key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64");
        assert_eq!(key("2001:db8:1:2:bbbb::9"), key("2001:db8:1:2::1"));
        assert_ne!(key("2001:db8:1:3::1"), key("2001:db8:1:2::1"));
    }

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
        let memory = Memory::default();
        let check = Check::of(&limits(), Kind::Api, "ada", "p1");
        let t0 = 1_000_000_000_000;
        for _ in 0..3 {
            assert_eq!(memory.check(&check, t0), Verdict::Allowed);
        }
        match memory.check(&check, t0) {
            Verdict::Limited {
                retry_after,
                policy,
                daily,
                ..
            } => assert_eq!((retry_after, policy, daily), (1, "api-user", false)),
            other => unreachable!("{other:?}"),
        }
        // One second later: one token.
        assert_eq!(memory.check(&check, t0 + 1000), Verdict::Allowed);
        assert!(matches!(
            memory.check(&check, t0 + 1000),
            Verdict::Limited { .. }
        ));
        // A refused request took nothing: the quota counts 4 of 5 so far.
        assert_eq!(memory.check(&check, t0 + 10_000), Verdict::Allowed);
        match memory.check(&check, t0 + 20_000) {
            Verdict::Limited {
                daily, retry_after, ..
            } => {
                assert!(daily);
                assert_eq!(retry_after, utc_day(t0 / 1000 + 20).1);
            }
            other => unreachable!("{other:?}"),
        }
        // Browsers have no limit here; another user has their own bucket.
        let browser = Check::of(&limits(), Kind::Browser, "ada", "p1");
        assert!(browser.counters.is_empty());
        let bob = Check::of(&limits(), Kind::Api, "bob", "p1");
        assert_eq!(memory.check(&bob, t0 + 20_000), Verdict::Allowed);
    }

    #[test]
    fn the_quota_resets_at_utc_midnight() {
        let memory = Memory::default();
        let check = Check::of(&limits(), Kind::Api, "ada", "p1");
        let before_midnight = 86_400 * 20_000 - 10;
        for i in 0..5 {
            assert_eq!(
                memory.check(&check, (before_midnight + i) * 1000),
                Verdict::Allowed
            );
        }
        assert!(matches!(
            memory.check(&check, (before_midnight + 8) * 1000),
            Verdict::Limited {
                daily: true,
                retry_after: 2,
                ..
            }
        ));
        assert_eq!(
            memory.check(&check, (before_midnight + 10) * 1000),
            Verdict::Allowed
        );
    }

    #[test]
    fn the_fields_name_every_policy_and_the_one_that_limited() {
        let check = Check::of(&limits(), Kind::Api, "ada", "p1");
        let verdict = Verdict::Limited {
            retry_after: 7,
            policy: "api-user",
            limit: limits().api_per_user.unwrap_or(Limit {
                burst: 0,
                per_second: 1.0,
                daily: None,
            }),
            daily: true,
        };
        assert_eq!(
            fields(&check, &verdict),
            vec![
                (
                    "ratelimit-policy",
                    "\"api-user\";q=3;w=3, \"api-user-daily\";q=5;w=86400, \"api-pod\";q=10;w=1"
                        .to_owned()
                ),
                ("ratelimit", "\"api-user-daily\";r=0;t=7".to_owned()),
            ]
        );
    }
}
