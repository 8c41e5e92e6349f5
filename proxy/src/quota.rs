//! Per-tenant quotas on the request path: request rate, token budget,
//! concurrency and per-request caps.
//!
//! Each tenant has its own `governor` limiters (a keyed limiter would share
//! one quota between tenants) and its own `TenantQuota` (caps, concurrency
//! and the token budget's reserve/settle arithmetic from `sluice-policies`),
//! kept in a `DashMap` that survives config reloads so usage is not reset by
//! a SIGHUP. With `quota.backend = "redis"` the rate and token checks run in
//! Redis instead, and concurrency is also counted there as expiring leases
//! (see [`crate::redis_quota`]); the local slot count still applies, so a
//! fail-open outage leaves each proxy enforcing the limit on its own.
//!
//! A successful check returns a [`QuotaPermit`]: it holds the concurrency
//! slot (and its Redis lease) and the token reservation and gives them back
//! when dropped — on finish, error and client disconnect alike — settling the
//! reservation to the usage recorded with [`QuotaPermit::record_usage`].

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use prometheus::IntGauge;
use sluice_policies::quota::{
    Denial, DenyReason, QuotaGrant, RateLimitHeaders, TenantLimits, TenantQuota,
};

use crate::config_tenants::{FailPolicy, QuotaBackend, QuotaConfig};
use crate::redis_quota::{Lease, RedisLimits, RedisQuota, RedisVerdict};
use crate::tenant::Tenant;
use crate::usage::UsageMetrics;

/// Most tenants tracked; beyond it idle tenants' state is dropped (a config
/// cannot name more, but the bound keeps memory fixed whatever happens).
const MAX_TENANTS: usize = 100_000;

type Limiter = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

/// A refusal: status, reason label, message and the headers to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaRefusal {
    /// 429 (retryable limits), 400 (request over a per-request cap) or 503
    /// (the quota backend is down and the policy is fail-closed).
    pub status: u16,
    /// Metric / lifecycle label (`requests_per_minute`, `tokens_per_minute`, ...).
    pub reason: &'static str,
    /// Message for the OpenAI error body.
    pub message: String,
    /// OpenAI error `code`.
    pub code: &'static str,
    /// Offending request field, if any.
    pub param: Option<&'static str>,
    /// `Retry-After` in milliseconds.
    pub retry_after_ms: Option<u64>,
    /// `x-ratelimit-*` values at refusal.
    pub headers: Vec<(&'static str, String)>,
}

/// A tenant's local quota state.
struct TenantState {
    rate: RwLock<Rates>,
    quota: Mutex<TenantQuota>,
    slots: IntGauge,
    reserved: IntGauge,
}

#[derive(Default)]
struct Rates {
    per_second: Option<(u32, Arc<Limiter>)>,
    per_minute: Option<(u32, Arc<Limiter>)>,
}

fn limiter(per_second: bool, n: u32) -> Option<(u32, Arc<Limiter>)> {
    let n = NonZeroU32::new(n)?;
    let q = if per_second {
        Quota::per_second(n)
    } else {
        Quota::per_minute(n)
    };
    Some((
        n.get(),
        Arc::new(RateLimiter::direct(q).with_middleware::<StateInformationMiddleware>()),
    ))
}

impl Rates {
    fn matches(&self, l: &TenantLimits) -> bool {
        self.per_second.as_ref().map(|r| r.0) == l.requests_per_second
            && self.per_minute.as_ref().map(|r| r.0) == l.requests_per_minute
    }

    fn build(l: &TenantLimits) -> Self {
        Self {
            per_second: l.requests_per_second.and_then(|n| limiter(true, n)),
            per_minute: l.requests_per_minute.and_then(|n| limiter(false, n)),
        }
    }
}

/// Every tenant's quota state, plus the optional Redis backend.
pub struct Quotas {
    tenants: DashMap<String, Arc<TenantState>>,
    redis: Option<Arc<RedisQuota>>,
    fail_policy: FailPolicy,
    /// Whether the last backend call failed: logs go out on changes only.
    backend_down: AtomicBool,
    metrics: UsageMetrics,
    epoch: Instant,
}

impl std::fmt::Debug for Quotas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quotas")
            .field("tenants", &self.tenants.len())
            .field("redis", &self.redis)
            .finish_non_exhaustive()
    }
}

impl Quotas {
    /// Quota state for `cfg`'s backend.
    pub fn new(cfg: &QuotaConfig, metrics: UsageMetrics) -> Result<Self, String> {
        let redis = match (cfg.backend, &cfg.redis_url) {
            (QuotaBackend::Redis, Some(url)) => Some(Arc::new(
                RedisQuota::new(
                    url,
                    Duration::from_millis(cfg.redis_timeout_ms),
                    &cfg.key_prefix,
                    Duration::from_millis(cfg.concurrency_lease_ttl_ms),
                )
                .map_err(|e| e.0)?,
            )),
            (QuotaBackend::Redis, None) => {
                return Err("`quota.backend = \"redis\"` needs `quota.redis_url`".into());
            }
            (QuotaBackend::Local, _) => None,
        };
        Ok(Self {
            tenants: DashMap::new(),
            redis,
            fail_policy: cfg.on_backend_error,
            backend_down: AtomicBool::new(false),
            metrics,
            epoch: Instant::now(),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether this backend keeps rate, token and concurrency budgets in Redis.
    pub fn uses_redis(&self) -> bool {
        self.redis.is_some()
    }

    /// The local limits: everything when local; caps and concurrency only
    /// with Redis (which holds rate and tokens, and concurrency fleet-wide:
    /// the local count is the floor that still holds when Redis is down).
    fn local_limits(&self, l: &TenantLimits) -> TenantLimits {
        if self.redis.is_some() {
            TenantLimits {
                requests_per_second: None,
                requests_per_minute: None,
                tokens_per_minute: None,
                ..*l
            }
        } else {
            *l
        }
    }

    fn state(&self, tenant: &Tenant, now_ms: u64) -> Arc<TenantState> {
        let limits = self.local_limits(&tenant.limits);
        if let Some(s) = self.tenants.get(&tenant.name) {
            let s = Arc::clone(s.value());
            let mut q = lock(&s.quota);
            if *q.limits() != limits {
                // A reload changed the limits: keep usage, take the new values.
                q.set_limits(limits, now_ms);
            }
            drop(q);
            let stale = !read(&s.rate).matches(&limits);
            if stale {
                *write(&s.rate) = Rates::build(&limits);
            }
            return s;
        }
        if self.tenants.len() >= MAX_TENANTS {
            self.tenants
                .retain(|_, s| lock(&s.quota).in_flight() > 0 || Arc::strong_count(s) > 1);
        }
        let s = Arc::new(TenantState {
            rate: RwLock::new(Rates::build(&limits)),
            quota: Mutex::new(TenantQuota::new(limits, now_ms)),
            slots: self.metrics.slots.with_label_values(&[&tenant.name]),
            reserved: self
                .metrics
                .reserved_tokens
                .with_label_values(&[&tenant.name]),
        });
        Arc::clone(self.tenants.entry(tenant.name.clone()).or_insert(s).value())
    }

    /// Checks every quota of `tenant` for a request of `prompt_tokens` and
    /// `max_tokens`; on success the permit holds the slot and reservation.
    pub async fn admit(
        &self,
        tenant: &Tenant,
        prompt_tokens: u32,
        max_tokens: u32,
    ) -> Result<QuotaPermit, QuotaRefusal> {
        let now_ms = self.now_ms();
        let state = self.state(tenant, now_ms);
        let mut headers = RateLimitHeaders::default();
        if self.redis.is_none() {
            rate_check(&state, tenant, &mut headers).map_err(|r| self.refused(tenant, r))?;
        }
        let grant = {
            let mut q = lock(&state.quota);
            let g = q.admit(prompt_tokens, max_tokens, now_ms);
            let h = q.headers(now_ms);
            headers.limit_tokens = h.limit_tokens;
            headers.remaining_tokens = h.remaining_tokens;
            headers.reset_tokens_ms = h.reset_tokens_ms;
            g
        };
        let grant = grant.map_err(|d| self.refused(tenant, denial(&d, &headers)))?;
        state.slots.inc();
        let reserved_local = grant.reserved_tokens();
        let mut permit = QuotaPermit {
            state: Arc::clone(&state),
            grant: Some(grant),
            max_tokens: 0,
            clamped: false,
            prompt_tokens,
            used: None,
            redis: None,
            lease: None,
            headers: Vec::new(),
            reserved_gauge: reserved_local,
            epoch: self.epoch,
        };
        permit.max_tokens = permit.grant.as_ref().map_or(max_tokens, |g| g.max_tokens);
        permit.clamped = permit.grant.as_ref().is_some_and(|g| g.clamped);
        if let Some(redis) = &self.redis {
            let limits = RedisLimits {
                rps: tenant.limits.requests_per_second.unwrap_or(0),
                rpm: tenant.limits.requests_per_minute.unwrap_or(0),
                tpm: tenant.limits.tokens_per_minute.unwrap_or(0),
                concurrent: tenant.limits.max_concurrent.unwrap_or(0),
            };
            if limits.any() {
                let cost = u64::from(prompt_tokens) + u64::from(permit.max_tokens);
                match redis.admit(&tenant.name, limits, cost).await {
                    Ok((o, lease)) => {
                        if self.backend_down.swap(false, Ordering::Relaxed) {
                            tracing::warn!("quota backend reachable again");
                            eprintln!("sluice: quota backend reachable again; limits enforced");
                        }
                        headers = RateLimitHeaders {
                            limit_requests: rate_limit_shown(&tenant.limits),
                            remaining_requests: o.remaining_requests.unwrap_or(0),
                            reset_requests_ms: o.reset_requests_ms,
                            limit_tokens: tenant.limits.tokens_per_minute,
                            remaining_tokens: o.remaining_tokens.unwrap_or(0),
                            reset_tokens_ms: o.reset_tokens_ms,
                        };
                        if let Some(r) = redis_refusal(o.verdict, o.retry_after_ms, tenant, cost) {
                            // Dropping the permit returns the local slot; nothing was reserved in Redis.
                            drop(permit);
                            return Err(self.refused(
                                tenant,
                                QuotaRefusal {
                                    headers: headers.pairs(),
                                    ..r
                                },
                            ));
                        }
                        permit.lease = lease;
                        if limits.tpm > 0 {
                            permit.redis = Some(RedisHold {
                                backend: Arc::clone(redis),
                                tenant: tenant.name.clone(),
                                tpm: limits.tpm,
                                reserved: cost,
                            });
                            permit.reserved_gauge = cost;
                        }
                    }
                    Err(e) => {
                        self.metrics
                            .backend_errors
                            .with_label_values(&["redis", self.fail_policy.as_str()])
                            .inc();
                        if !self.backend_down.swap(true, Ordering::Relaxed) {
                            let what = match self.fail_policy {
                                FailPolicy::Open => {
                                    "requests admitted without rate and token limits, concurrency counted per proxy"
                                }
                                FailPolicy::Closed => "requests refused with 503",
                            };
                            let policy = self.fail_policy.as_str();
                            tracing::error!(error = %e.0, policy, "quota backend unavailable");
                            // The proxy's operational messages go to stderr (no subscriber is
                            // installed); one line per outage, not per request.
                            eprintln!(
                                "sluice: quota backend unavailable ({}); failing {policy}: {what} until it answers again",
                                e.0
                            );
                        }
                        match self.fail_policy {
                            FailPolicy::Open => {}
                            FailPolicy::Closed => {
                                drop(permit);
                                return Err(self.refused(tenant, QuotaRefusal {
                                    status: 503,
                                    reason: "quota_backend_unavailable",
                                    message: "The rate-limit service is unavailable; try again shortly".into(),
                                    code: "quota_backend_unavailable",
                                    param: None,
                                    retry_after_ms: Some(1000),
                                    headers: Vec::new(),
                                }));
                            }
                        }
                    }
                }
            }
        }
        state.reserved.add(gauge_i64(permit.reserved_gauge));
        permit.headers = headers.pairs();
        self.metrics
            .requests
            .with_label_values(&[&tenant.name])
            .inc();
        Ok(permit)
    }

    fn refused(&self, tenant: &Tenant, r: QuotaRefusal) -> QuotaRefusal {
        self.metrics.reject(&tenant.name, r.reason);
        r
    }

    /// Concurrency slots held by `tenant` (tests and the state view).
    pub fn in_flight(&self, tenant: &str) -> u32 {
        self.tenants
            .get(tenant)
            .map_or(0, |s| lock(&s.quota).in_flight())
    }

    /// The usage metrics.
    pub fn metrics(&self) -> &UsageMetrics {
        &self.metrics
    }
}

/// The rate limit shown in `x-ratelimit-limit-requests`: per minute when set
/// (OpenAI's unit), else per second.
fn rate_limit_shown(l: &TenantLimits) -> Option<u64> {
    l.requests_per_minute
        .or(l.requests_per_second)
        .map(u64::from)
}

fn rate_check(
    state: &TenantState,
    tenant: &Tenant,
    headers: &mut RateLimitHeaders,
) -> Result<(), QuotaRefusal> {
    let rates = read(&state.rate);
    let mut shown = None;
    for (name, entry, period_ms) in [
        ("requests_per_second", &rates.per_second, 1000u64),
        ("requests_per_minute", &rates.per_minute, 60_000u64),
    ] {
        let Some((n, lim)) = entry else { continue };
        match lim.check() {
            Ok(snap) => {
                let remaining = u64::from(snap.remaining_burst_capacity());
                let used = u64::from(*n).saturating_sub(remaining);
                let reset = used * period_ms / u64::from((*n).max(1));
                shown = Some((u64::from(*n), remaining, reset));
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
                let h = RateLimitHeaders {
                    limit_requests: Some(u64::from(*n)),
                    remaining_requests: 0,
                    reset_requests_ms: wait_ms,
                    ..Default::default()
                };
                let unit = if period_ms == 1000 {
                    "second"
                } else {
                    "minute"
                };
                return Err(QuotaRefusal {
                    status: 429,
                    reason: name,
                    message: format!(
                        "Rate limit reached for tenant {}: {n} requests per {unit}. Please try again in {}.",
                        tenant.name,
                        sluice_policies::quota::format_reset(wait_ms)
                    ),
                    code: "rate_limit_exceeded",
                    param: None,
                    retry_after_ms: Some(wait_ms),
                    headers: h.pairs(),
                });
            }
        }
    }
    if let Some((limit, remaining, reset)) = shown {
        headers.limit_requests = Some(limit);
        headers.remaining_requests = remaining;
        headers.reset_requests_ms = reset;
    }
    Ok(())
}

fn denial(d: &Denial, headers: &RateLimitHeaders) -> QuotaRefusal {
    let (status, code, param) = match d.reason {
        DenyReason::Concurrency | DenyReason::TokenRate | DenyReason::TokenRequestTooLarge => {
            (429, "rate_limit_exceeded", None)
        }
        DenyReason::PromptTooLong => (400, "prompt_too_long", Some("messages")),
        DenyReason::OutputTooLong => (400, "max_tokens_too_large", Some("max_tokens")),
        DenyReason::ContextTooLong => (400, "context_length_exceeded", Some("max_tokens")),
    };
    QuotaRefusal {
        status,
        reason: d.reason.as_str(),
        message: d.message.clone(),
        code,
        param,
        retry_after_ms: d.retry_after_ms,
        headers: headers.pairs(),
    }
}

fn redis_refusal(
    v: RedisVerdict,
    retry_after_ms: u64,
    tenant: &Tenant,
    cost: u64,
) -> Option<QuotaRefusal> {
    let l = &tenant.limits;
    let (reason, message, retry) = match v {
        RedisVerdict::Allowed => return None,
        RedisVerdict::RequestsPerSecond => (
            "requests_per_second",
            format!(
                "Rate limit reached for tenant {}: {} requests per second.",
                tenant.name,
                l.requests_per_second.unwrap_or(0)
            ),
            Some(retry_after_ms.max(1)),
        ),
        RedisVerdict::RequestsPerMinute => (
            "requests_per_minute",
            format!(
                "Rate limit reached for tenant {}: {} requests per minute.",
                tenant.name,
                l.requests_per_minute.unwrap_or(0)
            ),
            Some(retry_after_ms.max(1)),
        ),
        RedisVerdict::Tokens => (
            "tokens_per_minute",
            format!(
                "token rate limit reached: {} tokens per minute; this request needs {cost} (prompt + max_tokens)",
                l.tokens_per_minute.unwrap_or(0)
            ),
            Some(retry_after_ms.max(1)),
        ),
        RedisVerdict::Concurrency => (
            "concurrency",
            format!(
                "too many concurrent requests: this key allows {} across all proxies",
                l.max_concurrent.unwrap_or(0)
            ),
            Some(retry_after_ms.max(1)),
        ),
        RedisVerdict::TooLarge => (
            "request_over_token_budget",
            format!(
                "this request needs {cost} tokens (prompt + max_tokens), more than the key's whole budget of {} per minute; lower max_tokens",
                l.tokens_per_minute.unwrap_or(0)
            ),
            None,
        ),
    };
    Some(QuotaRefusal {
        status: 429,
        reason,
        message,
        code: "rate_limit_exceeded",
        param: None,
        retry_after_ms: retry,
        headers: Vec::new(),
    })
}

/// A token reservation held in Redis.
struct RedisHold {
    backend: Arc<RedisQuota>,
    tenant: String,
    tpm: u64,
    reserved: u64,
}

/// An admitted request's quota: slot and reservation, returned on drop.
pub struct QuotaPermit {
    state: Arc<TenantState>,
    grant: Option<QuotaGrant>,
    /// `max_tokens` to forward (clamped when the tenant's cap says so).
    pub max_tokens: u32,
    /// Whether `max_tokens` was lowered to the tenant's cap.
    pub clamped: bool,
    prompt_tokens: u32,
    used: Option<u64>,
    redis: Option<RedisHold>,
    /// The fleet-wide concurrency slot; dropping it releases it in Redis.
    lease: Option<Lease>,
    /// `x-ratelimit-*` headers for the response.
    pub headers: Vec<(&'static str, String)>,
    reserved_gauge: u64,
    epoch: Instant,
}

impl std::fmt::Debug for QuotaPermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuotaPermit")
            .field("max_tokens", &self.max_tokens)
            .field("used", &self.used)
            .finish_non_exhaustive()
    }
}

impl QuotaPermit {
    /// Records the tokens the request actually used (prompt + completion,
    /// from the upstream's usage). Without it the prompt alone is charged:
    /// the engine prefilled it even if the client went away.
    pub fn record_usage(&mut self, tokens: u64) {
        self.used = Some(tokens);
    }

    /// Tokens reserved for this request.
    pub fn reserved_tokens(&self) -> u64 {
        self.reserved_gauge
    }
}

impl Drop for QuotaPermit {
    fn drop(&mut self) {
        let used = self.used.unwrap_or(u64::from(self.prompt_tokens));
        let now_ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        if let Some(g) = self.grant.take() {
            lock(&self.state.quota).finish(g, used, now_ms);
            self.state.slots.dec();
        }
        self.state.reserved.sub(gauge_i64(self.reserved_gauge));
        if let Some(h) = self.redis.take() {
            // Settling needs a round trip; do it off the request's path.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    if let Err(e) = h.backend.settle(&h.tenant, h.tpm, h.reserved, used).await {
                        tracing::warn!(tenant = %h.tenant, error = %e.0, "could not settle a token reservation in redis; it refills within a minute");
                    }
                });
            }
        }
    }
}

fn gauge_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Registry;
    use sluice_policies::quota::OutputCapMode;

    fn quotas() -> Quotas {
        Quotas::new(&QuotaConfig::default(), UsageMetrics::new(&Registry::new())).unwrap()
    }

    fn tenant(limits: TenantLimits) -> Tenant {
        Tenant {
            name: "t".into(),
            limits,
            ..Tenant::unlimited()
        }
    }

    #[tokio::test]
    async fn rate_limit_refuses_with_headers() {
        let q = quotas();
        let t = tenant(TenantLimits {
            requests_per_minute: Some(2),
            ..Default::default()
        });
        let a = q.admit(&t, 10, 10).await.unwrap();
        assert!(
            a.headers
                .contains(&("x-ratelimit-limit-requests", "2".into()))
        );
        assert!(
            a.headers
                .contains(&("x-ratelimit-remaining-requests", "1".into()))
        );
        let _b = q.admit(&t, 10, 10).await.unwrap();
        let r = q.admit(&t, 10, 10).await.unwrap_err();
        assert_eq!((r.status, r.reason), (429, "requests_per_minute"));
        let retry = r.retry_after_ms.unwrap();
        assert!(retry > 20_000 && retry <= 30_000, "{retry}");
        assert!(
            r.headers
                .contains(&("x-ratelimit-remaining-requests", "0".into()))
        );
    }

    #[tokio::test]
    async fn slots_and_tokens_come_back_on_drop() {
        let q = quotas();
        let t = tenant(TenantLimits {
            max_concurrent: Some(1),
            tokens_per_minute: Some(1000),
            ..Default::default()
        });
        let mut a = q.admit(&t, 100, 400).await.unwrap();
        assert_eq!(a.reserved_tokens(), 500);
        assert!(
            a.headers
                .contains(&("x-ratelimit-remaining-tokens", "500".into()))
        );
        let r = q.admit(&t, 1, 1).await.unwrap_err();
        assert_eq!((r.status, r.reason), (429, "concurrency"));
        a.record_usage(150);
        drop(a);
        assert_eq!(q.in_flight("t"), 0);
        let b = q.admit(&t, 100, 700).await.unwrap();
        // 1000 - 150 settled - 800 reserved (plus a few ms of refill).
        let rem: u64 = b
            .headers
            .iter()
            .find(|(k, _)| *k == "x-ratelimit-remaining-tokens")
            .unwrap()
            .1
            .parse()
            .unwrap();
        assert!((50..60).contains(&rem), "{rem}");
        drop(b);
        assert_eq!(q.metrics.slots.with_label_values(&["t"]).get(), 0);
        assert_eq!(q.metrics.reserved_tokens.with_label_values(&["t"]).get(), 0);
    }

    #[tokio::test]
    async fn caps_reject_or_clamp() {
        let q = quotas();
        let t = tenant(TenantLimits {
            max_output_tokens: Some(100),
            ..Default::default()
        });
        let r = q.admit(&t, 10, 500).await.unwrap_err();
        assert_eq!((r.status, r.param), (400, Some("max_tokens")));
        let t = tenant(TenantLimits {
            max_output_tokens: Some(100),
            on_output_over_cap: OutputCapMode::Clamp,
            ..Default::default()
        });
        let p = q.admit(&t, 10, 500).await.unwrap();
        assert_eq!((p.max_tokens, p.clamped), (100, true));
    }

    #[tokio::test]
    async fn tenants_have_separate_limiters() {
        let q = quotas();
        let limits = TenantLimits {
            requests_per_second: Some(1),
            ..Default::default()
        };
        let a = tenant(limits);
        let b = Tenant {
            name: "u".into(),
            ..tenant(limits)
        };
        let _x = q.admit(&a, 1, 1).await.unwrap();
        let _y = q.admit(&b, 1, 1).await.unwrap();
        assert!(q.admit(&a, 1, 1).await.is_err());
    }

    #[tokio::test]
    async fn redis_down_follows_the_policy() {
        let metrics = UsageMetrics::new(&Registry::new());
        let cfg = |p| QuotaConfig {
            backend: QuotaBackend::Redis,
            redis_url: Some("redis://127.0.0.1:1".into()),
            on_backend_error: p,
            redis_timeout_ms: 100,
            key_prefix: "t".into(),
            concurrency_lease_ttl_ms: 30_000,
        };
        let t = tenant(TenantLimits {
            requests_per_minute: Some(1),
            max_concurrent: Some(5),
            ..Default::default()
        });
        let open = Quotas::new(&cfg(FailPolicy::Open), metrics.clone()).unwrap();
        assert!(open.admit(&t, 1, 1).await.is_ok());
        // Failing open, concurrency falls back to this proxy's own count.
        let one = tenant(TenantLimits {
            max_concurrent: Some(1),
            ..Default::default()
        });
        let held = open.admit(&one, 1, 1).await.unwrap();
        let r = open.admit(&one, 1, 1).await.unwrap_err();
        assert_eq!((r.status, r.reason), (429, "concurrency"));
        drop(held);
        assert!(open.admit(&one, 1, 1).await.is_ok());
        let closed = Quotas::new(&cfg(FailPolicy::Closed), metrics.clone()).unwrap();
        let r = closed.admit(&t, 1, 1).await.unwrap_err();
        assert_eq!(r.status, 503);
        assert_eq!(closed.in_flight("t"), 0, "the local slot is returned");
        assert_eq!(
            metrics
                .backend_errors
                .with_label_values(&["redis", "closed"])
                .get(),
            1
        );
    }
}
