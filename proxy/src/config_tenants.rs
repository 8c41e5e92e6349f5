//! The tenant, authentication and quota-backend sections of the config:
//! `[[tenants]]`, `[auth]` and `[quota]`. Per-pool admission lives in
//! `[pools.admission]` (`sluice_policies::admission::AdmissionConfig`).
//!
//! With no `[[tenants]]` at all authentication is off and every request
//! belongs to the unlimited tenant `default`, so a config without these
//! sections behaves exactly as before.

use serde::Deserialize;
use sluice_policies::admission::Priority;
use sluice_policies::quota::TenantLimits;
use toml::Spanned;

/// One `[[tenants]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Name used in metrics, lifecycle records and Redis keys.
    pub name: String,
    /// SHA-256 digests (64 hex digits) of the tenant's API keys; the keys
    /// themselves never appear in the file.
    #[serde(default)]
    pub api_key_sha256: Vec<String>,
    /// Environment variables holding API keys (hashed at load; a missing
    /// variable is a config error).
    #[serde(default)]
    pub api_key_env: Vec<String>,
    /// Models the tenant may use (`*` or empty: all).
    #[serde(default)]
    pub models: Vec<String>,
    /// Priority band in admission queues.
    #[serde(default)]
    pub priority: Priority,
    /// Weight in `fair` queue order (> 0).
    #[serde(default = "default_weight")]
    pub weight: f64,
    /// Scope prefix caching to this tenant: the proxy sets vLLM's
    /// `cache_salt` and salts its own prefix index.
    #[serde(default)]
    pub cache_isolation: bool,
    /// Rate, token, concurrency and per-request limits.
    #[serde(default)]
    pub limits: TenantLimits,
}

fn default_weight() -> f64 {
    1.0
}

/// `[auth]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Tenant that requests without an API key belong to; without it they get 401.
    #[serde(default)]
    pub anonymous_tenant: Option<String>,
}

/// Where rate and token budgets are kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaBackend {
    /// In this process: limits are per proxy replica.
    #[default]
    Local,
    /// In Redis, with atomic scripts: limits hold across proxy replicas.
    Redis,
}

/// What to do when the Redis backend cannot answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailPolicy {
    /// Admit the request unlimited (availability over enforcement).
    #[default]
    Open,
    /// Refuse with 503 (enforcement over availability).
    Closed,
}

impl FailPolicy {
    /// The config name (metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            FailPolicy::Open => "open",
            FailPolicy::Closed => "closed",
        }
    }
}

/// `[quota]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    /// `local` (default) or `redis`.
    #[serde(default)]
    pub backend: QuotaBackend,
    /// `redis://host:port[/db]`, required for `backend = "redis"`.
    #[serde(default)]
    pub redis_url: Option<String>,
    /// `open` (default) or `closed` when Redis is unreachable or slow.
    #[serde(default)]
    pub on_backend_error: FailPolicy,
    /// Bound on one Redis round trip (and on connecting).
    #[serde(default = "default_redis_timeout_ms")]
    pub redis_timeout_ms: u64,
    /// Prefix of every Redis key, so several fleets can share one Redis.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// How long a concurrency slot held in Redis outlives the last renewal
    /// by its proxy: how soon a crashed proxy's slots come back. Live
    /// requests renew every third of it.
    #[serde(default = "default_concurrency_lease_ttl_ms")]
    pub concurrency_lease_ttl_ms: u64,
}

fn default_redis_timeout_ms() -> u64 {
    50
}
fn default_key_prefix() -> String {
    "sluice".into()
}
fn default_concurrency_lease_ttl_ms() -> u64 {
    30_000
}

impl Default for QuotaConfig {
    fn default() -> Self {
        Self {
            backend: QuotaBackend::Local,
            redis_url: None,
            on_backend_error: FailPolicy::Open,
            redis_timeout_ms: default_redis_timeout_ms(),
            key_prefix: default_key_prefix(),
            concurrency_lease_ttl_ms: default_concurrency_lease_ttl_ms(),
        }
    }
}

/// Checks the tenant sections; `at` turns a span into ` (line N)`.
pub fn validate(
    tenants: &[Spanned<TenantConfig>],
    auth: &AuthConfig,
    quota: &QuotaConfig,
    at: &dyn Fn(std::ops::Range<usize>) -> String,
) -> Result<(), String> {
    for (i, sp) in tenants.iter().enumerate() {
        let t = sp.get_ref();
        let key = format!("tenants[{i}]");
        let fail = |m: String| format!("`{key}`{}: {m}", at(sp.span()));
        let valid_name = !t.name.is_empty()
            && t.name.len() <= 64
            && t.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
        if !valid_name {
            return Err(fail(format!(
                "name `{}` must be 1-64 characters of letters, digits, `-`, `_` or `.`",
                t.name
            )));
        }
        if tenants[..i].iter().any(|o| o.get_ref().name == t.name) {
            return Err(fail(format!("tenant name `{}` is used twice", t.name)));
        }
        for (j, d) in t.api_key_sha256.iter().enumerate() {
            if parse_digest(d).is_none() {
                return Err(fail(format!(
                    "`api_key_sha256[{j}]` must be 64 hex digits (the SHA-256 of the key)"
                )));
            }
        }
        if !(t.weight.is_finite() && t.weight > 0.0) {
            return Err(fail("`weight` must be a positive number".into()));
        }
        t.limits
            .validate(&format!("{key}.limits"))
            .map_err(|e| fail(e.to_string()))?;
    }
    if let Some(anon) = &auth.anonymous_tenant
        && !tenants.iter().any(|t| &t.get_ref().name == anon)
    {
        return Err(format!(
            "`auth.anonymous_tenant` = `{anon}` is not a `[[tenants]]` name"
        ));
    }
    if quota.backend == QuotaBackend::Redis {
        match &quota.redis_url {
            None => return Err("`quota.backend = \"redis\"` needs `quota.redis_url`".into()),
            Some(u) if redis::Client::open(u.as_str()).is_err() => {
                return Err(format!("`quota.redis_url` = `{u}` is not a redis:// URL"));
            }
            Some(_) => {}
        }
    }
    if quota.redis_timeout_ms == 0 || quota.redis_timeout_ms > 10_000 {
        return Err("`quota.redis_timeout_ms` must be in 1..=10000".into());
    }
    if quota.key_prefix.is_empty() {
        return Err("`quota.key_prefix` must not be empty".into());
    }
    let ttl = quota.concurrency_lease_ttl_ms;
    if !(1000..=3_600_000).contains(&ttl) {
        return Err("`quota.concurrency_lease_ttl_ms` must be in 1000..=3600000".into());
    }
    if ttl < 3 * quota.redis_timeout_ms {
        return Err(format!(
            "`quota.concurrency_lease_ttl_ms` = {ttl} must be at least 3 x `quota.redis_timeout_ms` ({}): leases are renewed every third of it",
            quota.redis_timeout_ms
        ));
    }
    Ok(())
}

/// The `sluice check` lines for tenants, quotas and admission.
pub fn explain(
    tenants: &[Spanned<TenantConfig>],
    auth: &AuthConfig,
    quota: &QuotaConfig,
    admission: &[(&str, Option<&sluice_policies::admission::AdmissionConfig>)],
) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    if tenants.is_empty() {
        let _ = writeln!(
            o,
            "tenants: none (no authentication; every request is tenant `default`, unlimited)"
        );
    } else {
        let _ = writeln!(
            o,
            "tenants: API key required ({}), quotas kept {}",
            match &auth.anonymous_tenant {
                Some(a) => format!("requests without one are tenant `{a}`"),
                None => "missing or unknown key -> 401".into(),
            },
            match quota.backend {
                QuotaBackend::Local => "in this process (per proxy replica)".to_string(),
                QuotaBackend::Redis => format!(
                    "in Redis (rates, tokens and concurrency fleet-wide; a stopped proxy's concurrency slots return after {} ms; fail {} when unreachable{})",
                    quota.concurrency_lease_ttl_ms,
                    quota.on_backend_error.as_str(),
                    match quota.on_backend_error {
                        FailPolicy::Open => ", concurrency then counted per proxy",
                        FailPolicy::Closed => "",
                    }
                ),
            }
        );
        for t in tenants.iter().map(Spanned::get_ref) {
            let keys = t.api_key_sha256.len() + t.api_key_env.len();
            let limits = toml::to_string(&t.limits)
                .map(|s| s.lines().collect::<Vec<_>>().join(", "))
                .unwrap_or_default();
            let _ = writeln!(
                o,
                "  {}: {keys} key(s), priority {}, weight {}{}, limits: {}",
                t.name,
                t.priority.as_str(),
                t.weight,
                if t.cache_isolation {
                    ", cache-isolated"
                } else {
                    ""
                },
                if limits.is_empty() {
                    "none".into()
                } else {
                    limits
                }
            );
        }
    }
    for (pool, a) in admission {
        match a {
            Some(a) if a.enabled => {
                let _ = write!(
                    o,
                    "admission `{pool}`: KV usage <= {}, engine waiting <= {} per replica, queue `{}` (<= {} requests, <= {} ms)",
                    a.max_kv_usage,
                    a.max_engine_waiting,
                    a.order.as_str(),
                    a.max_queue_len,
                    a.max_queue_wait_ms
                );
                if let Some(b) = a.endpoint_kv_blocks {
                    let _ = write!(o, ", {b} KV blocks per replica until scraped");
                }
                if a.shed_on_ttft_slo {
                    let _ = write!(
                        o,
                        ", sheds what cannot start within its TTFT SLO less {} ms",
                        a.engine_ttft_ms
                    );
                }
                if let Some(n) = a.max_prefilling {
                    let _ = write!(
                        o,
                        ", <= {n} admitted per replica per {} ms",
                        a.engine_ttft_ms
                    );
                }
                let _ = writeln!(o);
            }
            _ => {
                let _ = writeln!(o, "admission `{pool}`: off");
            }
        }
    }
    o
}

/// A hex SHA-256 digest as bytes.
pub fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Doc {
        #[serde(default)]
        tenants: Vec<Spanned<TenantConfig>>,
        #[serde(default)]
        auth: AuthConfig,
        #[serde(default)]
        quota: QuotaConfig,
    }

    fn check(src: &str) -> Result<(), String> {
        let d: Doc = toml::from_str(src).map_err(|e| e.to_string())?;
        validate(&d.tenants, &d.auth, &d.quota, &|_| String::new())
    }

    #[test]
    fn parses_a_full_tenant() {
        let d: Doc = toml::from_str(
            r#"
            [auth]
            anonymous_tenant = "free"
            [quota]
            backend = "redis"
            redis_url = "redis://127.0.0.1:6379"
            on_backend_error = "closed"
            [[tenants]]
            name = "acme"
            api_key_sha256 = ["9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"]
            priority = "interactive"
            weight = 2.0
            cache_isolation = true
            [tenants.limits]
            requests_per_minute = 60
            tokens_per_minute = 10000
            [[tenants]]
            name = "free"
            "#,
        )
        .unwrap();
        validate(&d.tenants, &d.auth, &d.quota, &|_| String::new()).unwrap();
        let t = d.tenants[0].get_ref();
        assert_eq!(t.priority, Priority::Interactive);
        assert_eq!(t.limits.requests_per_minute, Some(60));
        assert_eq!(d.quota.on_backend_error, FailPolicy::Closed);
    }

    #[test]
    fn bad_values_are_named() {
        let e = check("[[tenants]]\nname = \"a\"\napi_key_sha256 = [\"abc\"]").unwrap_err();
        assert!(e.contains("api_key_sha256[0]"), "{e}");
        let e = check("[[tenants]]\nname = \"a\"\n[[tenants]]\nname = \"a\"").unwrap_err();
        assert!(e.contains("used twice"), "{e}");
        let e = check("[auth]\nanonymous_tenant = \"x\"").unwrap_err();
        assert!(e.contains("anonymous_tenant"), "{e}");
        let e = check("[quota]\nbackend = \"redis\"").unwrap_err();
        assert!(e.contains("redis_url"), "{e}");
        let e = check("[[tenants]]\nname = \"a\"\nweight = 0").unwrap_err();
        assert!(e.contains("weight"), "{e}");
        let e = check("[[tenants]]\nname = \"a b\"").unwrap_err();
        assert!(e.contains("name"), "{e}");
        let e =
            check("[[tenants]]\nname = \"a\"\n[tenants.limits]\nmax_concurrent = 0").unwrap_err();
        assert!(e.contains("max_concurrent"), "{e}");
        assert!(check("[[tenants]]\nname = \"a\"\nkeys = []").is_err());
    }

    #[test]
    fn lease_ttl_is_bounded_and_explained() {
        let d: Doc = toml::from_str(
            "[quota]\nbackend = \"redis\"\nredis_url = \"redis://127.0.0.1:6379\"\nconcurrency_lease_ttl_ms = 2000\n[[tenants]]\nname = \"a\"",
        )
        .unwrap();
        validate(&d.tenants, &d.auth, &d.quota, &|_| String::new()).unwrap();
        assert_eq!(d.quota.concurrency_lease_ttl_ms, 2000);
        let text = explain(&d.tenants, &d.auth, &d.quota, &[]);
        assert!(
            text.contains("concurrency fleet-wide") && text.contains("after 2000 ms"),
            "{text}"
        );
        assert_eq!(QuotaConfig::default().concurrency_lease_ttl_ms, 30_000);
        let e = check("[quota]\nconcurrency_lease_ttl_ms = 10").unwrap_err();
        assert!(e.contains("concurrency_lease_ttl_ms"), "{e}");
        let e =
            check("[quota]\nredis_timeout_ms = 1000\nconcurrency_lease_ttl_ms = 2000").unwrap_err();
        assert!(e.contains("3 x `quota.redis_timeout_ms`"), "{e}");
        assert!(
            check("[quota]\nlease_ttl_ms = 2000").is_err(),
            "unknown keys are refused"
        );
    }

    #[test]
    fn digests_parse() {
        assert!(parse_digest(&"ab".repeat(32)).is_some());
        assert!(parse_digest(&"zz".repeat(32)).is_none());
        assert!(parse_digest("ab").is_none());
    }
}
