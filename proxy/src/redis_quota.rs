//! Rate, token and concurrency budgets kept in Redis, so limits hold across
//! proxy replicas.
//!
//! One Lua script per request does every check atomically on the server
//! (GCRA for requests per second and per minute, the concurrency lease, then
//! the token-bucket reservation) and commits only when all pass: one round
//! trip, and a refused request takes nothing. Time is Redis's own `TIME`, so
//! proxies with skewed clocks agree. A second script settles the reservation
//! to actual usage when the request ends.
//!
//! Concurrency is a sorted set of leases per tenant: member = this proxy's
//! instance id and a request number, score = the lease's expiry (Redis ms).
//! Admission drops expired members, counts the rest and adds its own. A
//! [`Lease`] removes its member when dropped (finish, error, disconnect,
//! timeout); while held, one background task per backend pushes the expiry
//! of all its live leases forward every third of the TTL. A proxy that dies
//! stops renewing, so its slots come back by themselves one TTL later.
//!
//! The GCRA arithmetic mirrors `sluice_policies::quota::gcra::check`; the
//! bucket mirrors `TokenBudget` (refill continuously to one minute's worth,
//! overuse becomes debt of at most one minute).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;

/// Atomic admit: KEYS = rps TAT, rpm TAT, token bucket, lease set;
/// ARGV = rps, rpm, tokens per minute, concurrent requests (0: no such limit),
/// cost, lease member, lease TTL in ms.
/// Returns {status, which, retry_ms, remaining_req, reset_req_ms, remaining_tok, reset_tok_ms}:
/// status 1 allowed, 0 refused by `which` (1 rps, 2 rpm, 3 tokens, 4 concurrency),
/// -1 request over the whole budget. Nothing is written before every check passed
/// (dropping expired leases aside, which changes no count a live request holds).
const ADMIT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local counts = {tonumber(ARGV[1]), tonumber(ARGV[2])}
local periods = {1000, 60000}
local new_tats = {}
local rem_req, reset_req = -1, 0
for i = 1, 2 do
  if counts[i] > 0 then
    local interval = periods[i] / counts[i]
    local tolerance = interval * (counts[i] - 1)
    local tat = tonumber(redis.call('GET', KEYS[i]) or now)
    if tat < now then tat = now end
    local new_tat = tat + interval
    local allow_at = new_tat - interval - tolerance
    if allow_at > now then
      return {0, i, math.ceil(allow_at - now), 0, math.ceil(tat - now), -1, 0}
    end
    new_tats[i] = new_tat
    local ahead = new_tat - now
    local rem = math.floor((tolerance + interval - ahead) / interval)
    if rem < 0 then rem = 0 end
    rem_req = rem
    reset_req = math.ceil(ahead)
  end
end
local slots = tonumber(ARGV[4])
if slots > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
  if redis.call('ZCARD', KEYS[4]) >= slots then
    -- A slot frees when some request ends; a second is a polite guess.
    return {0, 4, 1000, rem_req, reset_req, -1, 0}
  end
end
local cap = tonumber(ARGV[3])
local cost = tonumber(ARGV[5])
local rem_tok, reset_tok = -1, 0
local tokens = 0
if cap > 0 then
  if cost > cap then return {-1, 3, 0, rem_req, reset_req, 0, 0} end
  local b = redis.call('HMGET', KEYS[3], 'tokens', 'ts')
  tokens = tonumber(b[1]) or cap
  local ts = tonumber(b[2]) or now
  if now > ts then tokens = math.min(cap, tokens + (now - ts) * cap / 60000) end
  if tokens < cost then
    local rem = math.floor(tokens)
    if rem < 0 then rem = 0 end
    return {0, 3, math.ceil((cost - tokens) * 60000 / cap), rem_req, reset_req, rem,
            math.ceil((cap - tokens) * 60000 / cap)}
  end
  tokens = tokens - cost
  redis.call('HSET', KEYS[3], 'tokens', string.format('%.3f', tokens), 'ts', now)
  redis.call('PEXPIRE', KEYS[3], 120000)
  rem_tok = math.floor(tokens)
  reset_tok = math.ceil((cap - tokens) * 60000 / cap)
end
for i = 1, 2 do
  if new_tats[i] then
    redis.call('SET', KEYS[i], string.format('%.3f', new_tats[i]), 'PX', math.ceil(new_tats[i] - now) + 1000)
  end
end
if slots > 0 then
  local ttl = tonumber(ARGV[7])
  redis.call('ZADD', KEYS[4], now + ttl, ARGV[6])
  -- The set outlives its newest lease (proxies may run different TTLs: never shorten it).
  if redis.call('PTTL', KEYS[4]) < ttl + 1000 then redis.call('PEXPIRE', KEYS[4], ttl + 1000) end
end
return {1, 0, 0, rem_req, reset_req, rem_tok, reset_tok}
";

/// Renew: KEYS = lease set; ARGV = lease TTL in ms, members. Pushes the expiry
/// of members still present to now + TTL (`XX`: a lease already released or
/// reclaimed is not brought back). Returns how many were renewed.
const RENEW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local n = 0
for i = 2, #ARGV do
  n = n + redis.call('ZADD', KEYS[1], 'XX', 'CH', now + ttl, ARGV[i])
end
if n > 0 and redis.call('PTTL', KEYS[1]) < ttl + 1000 then
  redis.call('PEXPIRE', KEYS[1], ttl + 1000)
end
return n
";

/// Settle: KEYS = token bucket; ARGV = tokens per minute, tokens to give back
/// (negative: charge more). Returns the remaining tokens.
const SETTLE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cap = tonumber(ARGV[1])
local delta = tonumber(ARGV[2])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1]) or cap
local ts = tonumber(b[2]) or now
if now > ts then tokens = math.min(cap, tokens + (now - ts) * cap / 60000) end
tokens = tokens + delta
if tokens > cap then tokens = cap end
if tokens < -cap then tokens = -cap end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.3f', tokens), 'ts', now)
redis.call('PEXPIRE', KEYS[1], 120000)
if tokens < 0 then return 0 end
return math.floor(tokens)
";

/// After a failed connect, answer per the fail policy without trying again for this long.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(500);

/// The limits one admit call checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RedisLimits {
    /// Requests per second (0: none).
    pub rps: u32,
    /// Requests per minute (0: none).
    pub rpm: u32,
    /// Tokens per minute (0: none).
    pub tpm: u64,
    /// Requests in flight at once, fleet-wide (0: none).
    pub concurrent: u32,
}

impl RedisLimits {
    /// Whether there is anything to check in Redis.
    pub fn any(&self) -> bool {
        self.rps > 0 || self.rpm > 0 || self.tpm > 0 || self.concurrent > 0
    }
}

/// What the admit script answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisVerdict {
    /// Allowed; the cost is reserved in the bucket.
    Allowed,
    /// Refused by requests per second.
    RequestsPerSecond,
    /// Refused by requests per minute.
    RequestsPerMinute,
    /// Refused by the token budget; retry later.
    Tokens,
    /// Refused: the tenant holds all its concurrent slots across the fleet.
    Concurrency,
    /// The request alone is larger than a minute's token budget.
    TooLarge,
}

/// The verdict with the values for `Retry-After` and `x-ratelimit-*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedisOutcome {
    /// The verdict.
    pub verdict: RedisVerdict,
    /// Milliseconds until a retry can succeed (refusals).
    pub retry_after_ms: u64,
    /// Requests left in the tightest rate window (`None` without a rate limit).
    pub remaining_requests: Option<u64>,
    /// Milliseconds until the rate window is full again.
    pub reset_requests_ms: u64,
    /// Tokens left (`None` without a token limit).
    pub remaining_tokens: Option<u64>,
    /// Milliseconds until the bucket is full again.
    pub reset_tokens_ms: u64,
}

/// Why Redis could not answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendError(pub String);

/// A Redis quota backend (one per proxy, connection multiplexed).
pub struct RedisQuota {
    client: redis::Client,
    conn: Mutex<Option<MultiplexedConnection>>,
    down_until: Mutex<Option<Instant>>,
    admit: redis::Script,
    settle: redis::Script,
    renew: redis::Script,
    timeout: Duration,
    prefix: String,
    lease_ttl: Duration,
    /// Names this backend's leases apart from other proxies' (and from an
    /// earlier process on the same host).
    instance: String,
    next_lease: AtomicU64,
    /// Live leases to renew: lease-set key → members.
    leases: Mutex<HashMap<String, HashSet<String>>>,
    renewer_started: AtomicBool,
}

impl std::fmt::Debug for RedisQuota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisQuota")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl RedisQuota {
    /// A backend for `url`; connects lazily, so a Redis that is down at start-up
    /// is handled like one that goes down later. Concurrency leases live
    /// `lease_ttl` past their last renewal.
    pub fn new(
        url: &str,
        timeout: Duration,
        prefix: &str,
        lease_ttl: Duration,
    ) -> Result<Self, BackendError> {
        let client =
            redis::Client::open(url).map_err(|e| BackendError(format!("quota.redis_url: {e}")))?;
        Ok(Self {
            client,
            conn: Mutex::new(None),
            down_until: Mutex::new(None),
            admit: redis::Script::new(ADMIT),
            settle: redis::Script::new(SETTLE),
            renew: redis::Script::new(RENEW),
            timeout,
            prefix: prefix.to_string(),
            lease_ttl,
            instance: format!("{}-{:016x}", std::process::id(), rand::random::<u64>()),
            next_lease: AtomicU64::new(0),
            leases: Mutex::new(HashMap::new()),
            renewer_started: AtomicBool::new(false),
        })
    }

    fn key(&self, tenant: &str, what: &str) -> String {
        // The hash tag keeps one tenant's keys in one Redis Cluster slot (the script touches all four).
        format!("{}:{{{tenant}}}:{what}", self.prefix)
    }

    async fn connection(&self) -> Result<MultiplexedConnection, BackendError> {
        if let Some(c) = lock(&self.conn).clone() {
            return Ok(c);
        }
        if lock(&self.down_until).is_some_and(|t| Instant::now() < t) {
            return Err(BackendError("redis unreachable (backing off)".into()));
        }
        let result =
            tokio::time::timeout(self.timeout, self.client.get_multiplexed_async_connection())
                .await;
        match result {
            Ok(Ok(c)) => {
                *lock(&self.conn) = Some(c.clone());
                *lock(&self.down_until) = None;
                Ok(c)
            }
            Ok(Err(e)) => Err(self.mark_down(format!("redis connect: {e}"))),
            Err(_) => Err(self.mark_down("redis connect timed out".into())),
        }
    }

    fn mark_down(&self, why: String) -> BackendError {
        *lock(&self.conn) = None;
        *lock(&self.down_until) = Some(Instant::now() + RECONNECT_BACKOFF);
        BackendError(why)
    }

    /// Checks every limit for `tenant` and, when all pass, reserves `cost`
    /// tokens and (with a concurrency limit) takes a lease, in one round trip.
    /// The lease comes back only when allowed; dropping it frees the slot.
    pub async fn admit(
        self: &Arc<Self>,
        tenant: &str,
        limits: RedisLimits,
        cost: u64,
    ) -> Result<(RedisOutcome, Option<Lease>), BackendError> {
        let mut conn = self.connection().await?;
        // Registered before the call: if this future is dropped mid-call (the
        // client went away) or the reply is lost, the lease's drop still
        // removes whatever the script may have added.
        let mut lease = (limits.concurrent > 0).then(|| self.new_lease(tenant));
        let mut inv = self.admit.prepare_invoke();
        inv.key(self.key(tenant, "rps"))
            .key(self.key(tenant, "rpm"))
            .key(self.key(tenant, "tokens"))
            .key(self.key(tenant, "leases"))
            .arg(limits.rps)
            .arg(limits.rpm)
            .arg(limits.tpm)
            .arg(limits.concurrent)
            .arg(cost)
            .arg(lease.as_ref().map_or("", |l| l.member.as_str()))
            .arg(duration_ms(self.lease_ttl));
        let reply: Vec<i64> =
            match tokio::time::timeout(self.timeout, inv.invoke_async(&mut conn)).await {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => return Err(self.mark_down(format!("redis admit: {e}"))),
                Err(_) => return Err(self.mark_down("redis admit timed out".into())),
            };
        let outcome = parse_admit(&reply)
            .ok_or_else(|| BackendError(format!("redis admit: bad reply {reply:?}")))?;
        if outcome.verdict != RedisVerdict::Allowed {
            // The script wrote nothing: no removal to send.
            if let Some(l) = lease.as_mut() {
                l.armed = false;
            }
            return Ok((outcome, None));
        }
        if lease.is_some() {
            self.start_renewer();
        }
        Ok((outcome, lease))
    }

    /// A lease for `tenant`, registered for renewal, not yet taken in Redis.
    fn new_lease(self: &Arc<Self>, tenant: &str) -> Lease {
        let key = self.key(tenant, "leases");
        let n = self.next_lease.fetch_add(1, Ordering::Relaxed);
        let member = format!("{}:{n}", self.instance);
        lock(&self.leases)
            .entry(key.clone())
            .or_default()
            .insert(member.clone());
        Lease {
            backend: Arc::clone(self),
            key,
            member,
            armed: true,
        }
    }

    /// Starts the renewal task once, on the runtime of the first lease.
    fn start_renewer(self: &Arc<Self>) {
        if self.renewer_started.swap(true, Ordering::Relaxed) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.renewer_started.store(false, Ordering::Relaxed);
            return;
        };
        let every = (self.lease_ttl / 3).max(Duration::from_millis(10));
        rt.spawn(renew_loop(Arc::downgrade(self), every));
    }

    /// Pushes the expiry of every live lease forward: one script call per
    /// tenant, all sent at once on the multiplexed connection (one pipeline).
    async fn renew_all(&self) -> Result<u64, BackendError> {
        let batches: Vec<(String, Vec<String>)> = lock(&self.leases)
            .iter()
            .map(|(k, m)| (k.clone(), m.iter().cloned().collect()))
            .collect();
        if batches.is_empty() {
            return Ok(0);
        }
        let conn = self.connection().await?;
        let ttl = duration_ms(self.lease_ttl);
        let calls = batches.iter().map(|(key, members)| {
            let mut conn = conn.clone();
            let mut inv = self.renew.prepare_invoke();
            inv.key(key).arg(ttl).arg(members);
            async move { inv.invoke_async::<u64>(&mut conn).await }
        });
        let all = futures::future::join_all(calls);
        match tokio::time::timeout(self.timeout, all).await {
            Ok(results) => {
                let mut renewed = 0;
                for r in results {
                    match r {
                        Ok(n) => renewed += n,
                        Err(e) => return Err(self.mark_down(format!("redis lease renewal: {e}"))),
                    }
                }
                Ok(renewed)
            }
            Err(_) => Err(self.mark_down("redis lease renewal timed out".into())),
        }
    }

    /// Forgets a lease locally (no more renewals) and, when `remove`, deletes
    /// it in Redis off the caller's path. Without a runtime it expires by TTL.
    fn release(self: &Arc<Self>, key: String, member: String, remove: bool) {
        {
            let mut leases = lock(&self.leases);
            if let Some(set) = leases.get_mut(&key) {
                set.remove(&member);
                if set.is_empty() {
                    leases.remove(&key);
                }
            }
        }
        if !remove {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let this = Arc::clone(self);
        rt.spawn(async move {
            if let Err(e) = this.remove_lease(&key, &member).await {
                tracing::warn!(%key, error = %e.0, "could not release a concurrency lease in redis; it expires by TTL");
            }
        });
    }

    async fn remove_lease(&self, key: &str, member: &str) -> Result<(), BackendError> {
        let mut conn = self.connection().await?;
        let mut zrem = redis::cmd("ZREM");
        zrem.arg(key).arg(member);
        match tokio::time::timeout(self.timeout, zrem.query_async::<i64>(&mut conn)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(self.mark_down(format!("redis lease release: {e}"))),
            Err(_) => Err(self.mark_down("redis lease release timed out".into())),
        }
    }

    /// Leases this proxy holds now (all tenants).
    pub fn live_leases(&self) -> usize {
        lock(&self.leases).values().map(HashSet::len).sum()
    }

    /// Gives back `reserved - used` tokens (or charges the excess).
    pub async fn settle(
        &self,
        tenant: &str,
        tpm: u64,
        reserved: u64,
        used: u64,
    ) -> Result<u64, BackendError> {
        if tpm == 0 || reserved == used {
            return Ok(0);
        }
        let mut conn = self.connection().await?;
        let delta = i128::from(reserved) - i128::from(used);
        let delta = i64::try_from(delta).unwrap_or(if delta < 0 { i64::MIN } else { i64::MAX });
        let mut inv = self.settle.prepare_invoke();
        inv.key(self.key(tenant, "tokens")).arg(tpm).arg(delta);
        match tokio::time::timeout(self.timeout, inv.invoke_async::<i64>(&mut conn)).await {
            Ok(Ok(v)) => Ok(u64::try_from(v).unwrap_or(0)),
            Ok(Err(e)) => Err(self.mark_down(format!("redis settle: {e}"))),
            Err(_) => Err(self.mark_down("redis settle timed out".into())),
        }
    }
}

/// A concurrency slot held in Redis: renewed while it lives, removed when
/// dropped (on every way a request ends).
pub struct Lease {
    backend: Arc<RedisQuota>,
    key: String,
    member: String,
    /// Whether dropping must remove the member in Redis (false when the
    /// script certainly never added it).
    armed: bool,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.key)
            .field("member", &self.member)
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// Stops renewing without removing: what a crashed proxy leaves behind.
    #[cfg(test)]
    fn abandon(mut self) {
        self.armed = false;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let key = std::mem::take(&mut self.key);
        let member = std::mem::take(&mut self.member);
        self.backend.release(key, member, self.armed);
    }
}

/// Renews `backend`'s leases every `every` until the backend is gone (a
/// reload that replaced it, once its last permit ended).
async fn renew_loop(backend: Weak<RedisQuota>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut failing = false;
    loop {
        tick.tick().await;
        let Some(b) = backend.upgrade() else { return };
        match b.renew_all().await {
            Ok(_) => failing = false,
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e.0, "could not renew concurrency leases in redis; they expire unless renewed within their TTL");
            }
            Err(_) => {}
        }
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn parse_admit(r: &[i64]) -> Option<RedisOutcome> {
    let [status, which, retry, rem_req, reset_req, rem_tok, reset_tok] = *r else {
        return None;
    };
    let verdict = match (status, which) {
        (1, _) => RedisVerdict::Allowed,
        (-1, _) => RedisVerdict::TooLarge,
        (0, 1) => RedisVerdict::RequestsPerSecond,
        (0, 2) => RedisVerdict::RequestsPerMinute,
        (0, 3) => RedisVerdict::Tokens,
        (0, 4) => RedisVerdict::Concurrency,
        _ => return None,
    };
    let opt = |v: i64| u64::try_from(v).ok();
    Some(RedisOutcome {
        verdict,
        retry_after_ms: opt(retry).unwrap_or(0),
        remaining_requests: opt(rem_req),
        reset_requests_ms: opt(reset_req).unwrap_or(0),
        remaining_tokens: opt(rem_tok),
        reset_tokens_ms: opt(reset_tok).unwrap_or(0),
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(url: &str, timeout: Duration, lease_ttl: Duration) -> Arc<RedisQuota> {
        Arc::new(RedisQuota::new(url, timeout, "t", lease_ttl).unwrap())
    }

    #[test]
    fn replies_parse() {
        let o = parse_admit(&[1, 0, 0, 4, 200, -1, 0]).unwrap();
        assert_eq!(o.verdict, RedisVerdict::Allowed);
        assert_eq!(o.remaining_requests, Some(4));
        assert_eq!(o.remaining_tokens, None);
        let o = parse_admit(&[0, 3, 1500, -1, 0, 10, 6000]).unwrap();
        assert_eq!((o.verdict, o.retry_after_ms), (RedisVerdict::Tokens, 1500));
        assert!(parse_admit(&[0, 9, 0, 0, 0, 0, 0]).is_none());
        assert!(parse_admit(&[1]).is_none());
    }

    #[tokio::test]
    async fn unreachable_redis_is_an_error_not_a_hang() {
        // Port 1 on loopback refuses connections.
        let q = backend(
            "redis://127.0.0.1:1",
            Duration::from_millis(200),
            Duration::from_secs(30),
        );
        let limits = RedisLimits {
            rpm: 10,
            ..Default::default()
        };
        assert!(q.admit("a", limits, 1).await.is_err());
        // Backing off: answered at once.
        let start = Instant::now();
        assert!(q.admit("a", limits, 1).await.is_err());
        assert!(start.elapsed() < Duration::from_millis(150));
    }

    /// A throwaway `redis-server` on a free port, killed on drop.
    struct RedisServer {
        child: std::process::Child,
        url: String,
    }

    impl Drop for RedisServer {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn redis_server() -> Option<RedisServer> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn();
        let Ok(child) = child else {
            eprintln!("redis-server not installed (./dev setup installs it); skipping");
            return None;
        };
        let server = RedisServer {
            child,
            url: format!("redis://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(server)
    }

    #[tokio::test]
    async fn scripts_enforce_rate_and_tokens() {
        let Some(server) = redis_server() else { return };
        let q = backend(&server.url, Duration::from_secs(2), Duration::from_secs(30));
        let rate = RedisLimits {
            rpm: 3,
            ..Default::default()
        };
        let mut allowed = 0;
        for _ in 0..5 {
            let o = q.admit("a", rate, 0).await.unwrap().0;
            if o.verdict == RedisVerdict::Allowed {
                allowed += 1;
            } else {
                assert_eq!(o.verdict, RedisVerdict::RequestsPerMinute);
                assert!(o.retry_after_ms > 10_000 && o.retry_after_ms <= 20_000);
            }
        }
        assert_eq!(allowed, 3);
        // Another tenant has its own budget.
        assert_eq!(
            q.admit("b", rate, 0).await.unwrap().0.verdict,
            RedisVerdict::Allowed
        );

        let tokens = RedisLimits {
            tpm: 1000,
            ..Default::default()
        };
        let o = q.admit("c", tokens, 600).await.unwrap().0;
        assert_eq!(o.verdict, RedisVerdict::Allowed);
        assert!((399..=401).contains(&o.remaining_tokens.unwrap()));
        let o = q.admit("c", tokens, 600).await.unwrap().0;
        assert_eq!(o.verdict, RedisVerdict::Tokens);
        assert!(o.retry_after_ms > 10_000);
        // Settle: 600 reserved, 100 used → 500 come back.
        let left = q.settle("c", 1000, 600, 100).await.unwrap();
        assert!((899..=902).contains(&left), "{left}");
        assert_eq!(
            q.admit("c", tokens, 600).await.unwrap().0.verdict,
            RedisVerdict::Allowed
        );
        assert_eq!(
            q.admit("c", tokens, 1001).await.unwrap().0.verdict,
            RedisVerdict::TooLarge
        );
        // Redis going away is an error, not a hang.
        drop(server);
        assert!(q.admit("c", tokens, 1).await.is_err());
    }

    async fn leases_in_redis(url: &str, key: &str) -> u64 {
        let client = redis::Client::open(url).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("ZCARD")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap()
    }

    /// Polls until `key` holds `n` leases; false after 5 s.
    async fn leases_become(url: &str, key: &str, n: u64) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if leases_in_redis(url, key).await == n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    #[tokio::test]
    async fn leases_cap_concurrency_across_proxies() {
        let Some(server) = redis_server() else { return };
        let ttl = Duration::from_secs(30);
        let a = backend(&server.url, Duration::from_secs(2), ttl);
        let b = backend(&server.url, Duration::from_secs(2), ttl);
        assert_eq!(
            a.key("x", "leases"),
            "t:{x}:leases",
            "one cluster slot per tenant"
        );
        let two = RedisLimits {
            concurrent: 2,
            ..Default::default()
        };
        let (o1, l1) = a.admit("x", two, 0).await.unwrap();
        let (o2, l2) = a.admit("x", two, 0).await.unwrap();
        assert_eq!(
            (o1.verdict, o2.verdict),
            (RedisVerdict::Allowed, RedisVerdict::Allowed)
        );
        let (l1, l2) = (l1.unwrap(), l2.unwrap());
        assert_eq!(a.live_leases(), 2);
        let (o, none) = b.admit("x", two, 0).await.unwrap();
        assert_eq!(
            (o.verdict, o.retry_after_ms),
            (RedisVerdict::Concurrency, 1000)
        );
        assert!(none.is_none());
        assert_eq!(b.live_leases(), 0, "a refusal holds nothing");
        assert_eq!(leases_in_redis(&server.url, "t:{x}:leases").await, 2);
        // Another tenant has its own slots.
        assert!(b.admit("y", two, 0).await.unwrap().1.is_some());

        // Releasing one frees a slot for the other proxy.
        drop(l1);
        assert_eq!(a.live_leases(), 1);
        assert!(leases_become(&server.url, "t:{x}:leases", 1).await);
        let (o, l3) = b.admit("x", two, 0).await.unwrap();
        assert_eq!(o.verdict, RedisVerdict::Allowed);
        assert!(l3.is_some());
        drop((l2, l3));
        assert!(leases_become(&server.url, "t:{x}:leases", 0).await);

        // A concurrency refusal charges no rate or token budget.
        let mixed = RedisLimits {
            rpm: 3,
            tpm: 1000,
            concurrent: 1,
            ..Default::default()
        };
        let (o, held) = a.admit("z", mixed, 100).await.unwrap();
        assert_eq!(o.remaining_requests, Some(2));
        for _ in 0..3 {
            let (o, l) = b.admit("z", mixed, 100).await.unwrap();
            assert_eq!(o.verdict, RedisVerdict::Concurrency);
            assert!(l.is_none());
        }
        drop(held);
        assert!(leases_become(&server.url, "t:{z}:leases", 0).await);
        let (o, _l) = b.admit("z", mixed, 100).await.unwrap();
        assert_eq!(o.verdict, RedisVerdict::Allowed);
        assert_eq!(o.remaining_requests, Some(1), "refusals took no request");
        assert!((799..=801).contains(&o.remaining_tokens.unwrap()), "{o:?}");
    }

    #[tokio::test]
    async fn live_leases_are_renewed_and_abandoned_ones_reclaimed() {
        let Some(server) = redis_server() else { return };
        let ttl = Duration::from_millis(300);
        let a = backend(&server.url, Duration::from_secs(2), ttl);
        let b = backend(&server.url, Duration::from_secs(2), ttl);
        let one = RedisLimits {
            concurrent: 1,
            ..Default::default()
        };
        let (_, held) = a.admit("x", one, 0).await.unwrap();
        let held = held.unwrap();
        // Well past the TTL: renewal (every 100 ms) keeps the slot taken.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(
            b.admit("x", one, 0).await.unwrap().0.verdict,
            RedisVerdict::Concurrency
        );
        // The holder "crashes": no more renewals, no release. The slot comes
        // back by itself once the lease expires.
        held.abandon();
        assert_eq!(a.live_leases(), 0);
        let start = Instant::now();
        let mut taken = None;
        while taken.is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "lease never expired"
            );
            let (o, l) = b.admit("x", one, 0).await.unwrap();
            if o.verdict == RedisVerdict::Allowed {
                taken = l;
            } else {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        assert_eq!(leases_in_redis(&server.url, "t:{x}:leases").await, 1);
        // The expired member was dropped, not just outnumbered.
        drop(taken);
        assert!(leases_become(&server.url, "t:{x}:leases", 0).await);
    }
}
