//! Rate and token budgets kept in Redis, so limits hold across proxy replicas.
//!
//! One Lua script per request does every check atomically on the server
//! (GCRA for requests per second and per minute, then the token-bucket
//! reservation) and commits only when all pass: one round trip, no partial
//! charge. Time is Redis's own `TIME`, so proxies with skewed clocks agree.
//! A second script settles the reservation to actual usage when the request
//! ends. Concurrency stays local to each proxy (a slot held in Redis by a
//! crashed proxy would never come back).
//!
//! The GCRA arithmetic mirrors `sluice_policies::quota::gcra::check`; the
//! bucket mirrors `TokenBudget` (refill continuously to one minute's worth,
//! overuse becomes debt of at most one minute).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;

/// Atomic admit: KEYS = rps TAT, rpm TAT, token bucket;
/// ARGV = rps, rpm, tokens per minute (0: no such limit), cost.
/// Returns {status, which, retry_ms, remaining_req, reset_req_ms, remaining_tok, reset_tok_ms}:
/// status 1 allowed, 0 refused by `which` (1 rps, 2 rpm, 3 tokens), -1 request over the whole budget.
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
local cap = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
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
return {1, 0, 0, rem_req, reset_req, rem_tok, reset_tok}
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
}

impl RedisLimits {
    /// Whether there is anything to check in Redis.
    pub fn any(&self) -> bool {
        self.rps > 0 || self.rpm > 0 || self.tpm > 0
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
    timeout: Duration,
    prefix: String,
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
    /// is handled like one that goes down later.
    pub fn new(url: &str, timeout: Duration, prefix: &str) -> Result<Self, BackendError> {
        let client =
            redis::Client::open(url).map_err(|e| BackendError(format!("quota.redis_url: {e}")))?;
        Ok(Self {
            client,
            conn: Mutex::new(None),
            down_until: Mutex::new(None),
            admit: redis::Script::new(ADMIT),
            settle: redis::Script::new(SETTLE),
            timeout,
            prefix: prefix.to_string(),
        })
    }

    fn key(&self, tenant: &str, what: &str) -> String {
        // The hash tag keeps one tenant's keys in one Redis Cluster slot (the script touches all three).
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

    /// Checks and reserves `cost` tokens for `tenant` in one round trip.
    pub async fn admit(
        &self,
        tenant: &str,
        limits: RedisLimits,
        cost: u64,
    ) -> Result<RedisOutcome, BackendError> {
        let mut conn = self.connection().await?;
        let mut inv = self.admit.prepare_invoke();
        inv.key(self.key(tenant, "rps"))
            .key(self.key(tenant, "rpm"))
            .key(self.key(tenant, "tokens"))
            .arg(limits.rps)
            .arg(limits.rpm)
            .arg(limits.tpm)
            .arg(cost);
        let reply: Vec<i64> =
            match tokio::time::timeout(self.timeout, inv.invoke_async(&mut conn)).await {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => return Err(self.mark_down(format!("redis admit: {e}"))),
                Err(_) => return Err(self.mark_down("redis admit timed out".into())),
            };
        parse_admit(&reply).ok_or_else(|| BackendError(format!("redis admit: bad reply {reply:?}")))
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
        let q = RedisQuota::new("redis://127.0.0.1:1", Duration::from_millis(200), "t").unwrap();
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
        let q = RedisQuota::new(&server.url, Duration::from_secs(2), "t").unwrap();
        let rate = RedisLimits {
            rpm: 3,
            ..Default::default()
        };
        let mut allowed = 0;
        for _ in 0..5 {
            let o = q.admit("a", rate, 0).await.unwrap();
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
            q.admit("b", rate, 0).await.unwrap().verdict,
            RedisVerdict::Allowed
        );

        let tokens = RedisLimits {
            tpm: 1000,
            ..Default::default()
        };
        let o = q.admit("c", tokens, 600).await.unwrap();
        assert_eq!(o.verdict, RedisVerdict::Allowed);
        assert!((399..=401).contains(&o.remaining_tokens.unwrap()));
        let o = q.admit("c", tokens, 600).await.unwrap();
        assert_eq!(o.verdict, RedisVerdict::Tokens);
        assert!(o.retry_after_ms > 10_000);
        // Settle: 600 reserved, 100 used → 500 come back.
        let left = q.settle("c", 1000, 600, 100).await.unwrap();
        assert!((899..=902).contains(&left), "{left}");
        assert_eq!(
            q.admit("c", tokens, 600).await.unwrap().verdict,
            RedisVerdict::Allowed
        );
        assert_eq!(
            q.admit("c", tokens, 1001).await.unwrap().verdict,
            RedisVerdict::TooLarge
        );
        // Redis going away is an error, not a hang.
        drop(server);
        assert!(q.admit("c", tokens, 1).await.is_err());
    }
}
