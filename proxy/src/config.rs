//! The proxy's configuration: typed TOML, validated once at load.
//!
//! Every table denies unknown keys, so a typo is an error rather than a
//! silently ignored setting. Parse errors carry the file line from the TOML
//! parser; validation errors name the key path and, where the value came from
//! the file, its line. The annotated reference is
//! `fixtures/configs/sluice.toml`, which the tests load.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sluice_policies::classify::{ClassRule, Classifier};
use toml::Spanned;

use crate::config_tenants::{AuthConfig, QuotaConfig, TenantConfig};
use crate::error::ProxyError;
use sluice_policies::admission::AdmissionConfig;
use sluice_policies::experiment::{ExperimentConfig, SplitBy};
use sluice_policies::routing::RoutingConfig;
use sluice_policies::tokenizer::Tokenizer;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listeners and connection limits.
    #[serde(default)]
    pub server: ServerConfig,
    /// Request limits and retry budget.
    #[serde(default)]
    pub limits: Limits,
    /// Where lifecycle records go.
    #[serde(default)]
    pub lifecycle: LifecycleConfig,
    /// Pools of replicas, one model each.
    #[serde(default)]
    pub pools: Vec<Spanned<PoolConfig>>,
    /// Request classes, tried in order.
    #[serde(default)]
    pub classes: Vec<Spanned<ClassRule>>,
    /// Tenants (API keys, limits, priority); none: authentication is off.
    #[serde(default)]
    pub tenants: Vec<Spanned<TenantConfig>>,
    /// Requests without an API key.
    #[serde(default)]
    pub auth: AuthConfig,
    /// Where rate and token budgets live (local or Redis).
    #[serde(default)]
    pub quota: QuotaConfig,
}

/// `[server]`: listeners.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of the OpenAI API listener (port 0 picks a free port).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Address of the admin listener (`/metrics`, `/healthz`, `/readyz`, `/admin/state`).
    #[serde(default = "default_admin_listen")]
    pub admin_listen: String,
    /// Largest request head (request line plus headers) accepted; larger gets 431.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Seconds an idle client keep-alive connection is kept open.
    #[serde(default = "default_keepalive_secs")]
    pub keepalive_secs: u64,
    /// After SIGTERM, how long the proxy keeps accepting while `/readyz`
    /// already answers 503, so load balancers that poll readiness stop
    /// sending before the listener closes.
    #[serde(default)]
    pub shutdown_delay_ms: u64,
    /// After SIGTERM (and the delay), the longest wait for requests in flight
    /// (queued, forwarding, streaming) to finish before the process exits.
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_admin_listen() -> String {
    "127.0.0.1:9090".into()
}
fn default_max_header_bytes() -> usize {
    64 * 1024
}
fn default_keepalive_secs() -> u64 {
    60
}
fn default_drain_timeout_ms() -> u64 {
    30_000
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            admin_listen: default_admin_listen(),
            max_header_bytes: default_max_header_bytes(),
            keepalive_secs: default_keepalive_secs(),
            shutdown_delay_ms: 0,
            drain_timeout_ms: default_drain_timeout_ms(),
        }
    }
}

/// `[limits]`: per-request bounds.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest request body accepted; larger gets 413.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Extra attempts on another replica after a connect error or a 502/503,
    /// only while nothing has reached the client.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// Backoff before the first retry; doubles on each further one.
    #[serde(default = "default_retry_backoff_ms")]
    pub retry_backoff_ms: u64,
}

fn default_max_body_bytes() -> usize {
    8 * 1024 * 1024
}
fn default_max_retries() -> u32 {
    2
}
fn default_retry_backoff_ms() -> u64 {
    20
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: default_max_body_bytes(),
            max_retries: default_max_retries(),
            retry_backoff_ms: default_retry_backoff_ms(),
        }
    }
}

/// `[lifecycle]`: the per-request JSON log.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LifecycleConfig {
    /// `stdout`, `off`, or a file path (appended to).
    #[serde(default = "default_lifecycle_log")]
    pub log: String,
    /// Also record the prompt text (off by default: prompts are user data).
    #[serde(default)]
    pub include_prompts: bool,
    /// Rotate the file before it would pass this size (bytes); absent: never.
    #[serde(default)]
    pub max_bytes: Option<u64>,
    /// Rotated files kept as `log.1` (newest) … `log.N`.
    #[serde(default = "default_lifecycle_keep")]
    pub keep: u32,
}

fn default_lifecycle_log() -> String {
    "off".into()
}
fn default_lifecycle_keep() -> u32 {
    5
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        Self {
            log: default_lifecycle_log(),
            include_prompts: false,
            max_bytes: None,
            keep: default_lifecycle_keep(),
        }
    }
}

impl LifecycleConfig {
    /// The rotation limits for the writer.
    pub fn rotation(&self) -> crate::lifecycle::Rotation {
        crate::lifecycle::Rotation {
            max_bytes: self.max_bytes.unwrap_or(0),
            keep: self.keep,
        }
    }
}

/// `[[pools]]`: replicas serving one model.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Pool name (metric label, class target).
    pub name: String,
    /// The `model` requests must name; `*` accepts any model.
    pub model: String,
    /// Static replica addresses, `IP:PORT` or `http://IP:PORT`.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// A DNS name with port (`vllm.ns.svc.cluster.local:8000`), re-resolved periodically.
    #[serde(default)]
    pub dns: Option<String>,
    /// How often `dns` is re-resolved.
    #[serde(default = "default_dns_refresh_ms")]
    pub dns_refresh_ms: u64,
    /// A Hugging Face `tokenizer.json` for counting and hashing prompts
    /// (relative to the config file); the word-piece estimate when unset.
    /// Give the replicas (or `sluice sim --tokenizer`) the same file.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// KV-cache block size in tokens for prefix hashing (vLLM's `--block-size`).
    #[serde(default = "default_block_size")]
    pub block_size: usize,
    /// Ask streaming upstreams for a final `usage` chunk (hidden from clients
    /// that did not ask for it) so output tokens are counted exactly.
    #[serde(default = "default_true")]
    pub stream_usage: bool,
    /// Replica selection policy.
    #[serde(default)]
    pub routing: RoutingConfig,
    /// Bounds on every wait.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Active health checks.
    #[serde(default)]
    pub health: HealthConfig,
    /// Scraping of each replica's `/metrics`.
    #[serde(default)]
    pub scrape: ScrapeConfig,
    /// Passive ejection on failures.
    #[serde(default)]
    pub ejection: EjectionConfig,
    /// KV-aware admission control; absent: every request goes straight to routing.
    #[serde(default)]
    pub admission: Option<AdmissionConfig>,
    /// A live split of the pool's traffic between arms, each with its own
    /// routing; absent: every request uses `routing`.
    #[serde(default)]
    pub experiment: Option<ExperimentConfig>,
}

fn default_dns_refresh_ms() -> u64 {
    5_000
}
fn default_block_size() -> usize {
    16
}
fn default_true() -> bool {
    true
}

/// `[pools.timeouts]`, all in milliseconds.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// TCP connect to a replica.
    #[serde(default = "default_connect_ms")]
    pub connect_ms: u64,
    /// From sending the request to the first token (streaming) or the response head.
    #[serde(default = "default_first_token_ms")]
    pub first_token_ms: u64,
    /// Longest gap between two chunks of a response body.
    #[serde(default = "default_idle_ms")]
    pub idle_ms: u64,
    /// Whole request, from the first upstream attempt to the last byte.
    #[serde(default = "default_total_ms")]
    pub total_ms: u64,
}

fn default_connect_ms() -> u64 {
    2_000
}
fn default_first_token_ms() -> u64 {
    60_000
}
fn default_idle_ms() -> u64 {
    30_000
}
fn default_total_ms() -> u64 {
    600_000
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect_ms: default_connect_ms(),
            first_token_ms: default_first_token_ms(),
            idle_ms: default_idle_ms(),
            total_ms: default_total_ms(),
        }
    }
}

/// `[pools.health]`: active checks.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Path probed with GET; any 2xx is healthy.
    #[serde(default = "default_health_path")]
    pub path: String,
    /// Time between probes.
    #[serde(default = "default_health_interval_ms")]
    pub interval_ms: u64,
    /// Bound on one probe.
    #[serde(default = "default_health_timeout_ms")]
    pub timeout_ms: u64,
    /// Consecutive failed probes that mark a replica unhealthy.
    #[serde(default = "default_unhealthy_threshold")]
    pub unhealthy_threshold: u32,
    /// Consecutive good probes that bring it back.
    #[serde(default = "default_healthy_threshold")]
    pub healthy_threshold: u32,
}

fn default_health_path() -> String {
    "/health".into()
}
fn default_health_interval_ms() -> u64 {
    2_000
}
fn default_health_timeout_ms() -> u64 {
    1_000
}
fn default_unhealthy_threshold() -> u32 {
    2
}
fn default_healthy_threshold() -> u32 {
    1
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            path: default_health_path(),
            interval_ms: default_health_interval_ms(),
            timeout_ms: default_health_timeout_ms(),
            unhealthy_threshold: default_unhealthy_threshold(),
            healthy_threshold: default_healthy_threshold(),
        }
    }
}

/// `[pools.scrape]`: the engine's own gauges.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScrapeConfig {
    /// Scrape at all (off for upstreams without vLLM metrics).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Path of the Prometheus text endpoint.
    #[serde(default = "default_scrape_path")]
    pub path: String,
    /// Time between scrapes.
    #[serde(default = "default_scrape_interval_ms")]
    pub interval_ms: u64,
    /// Age after which a scrape no longer counts (the view becomes unknown).
    #[serde(default = "default_stale_after_ms")]
    pub stale_after_ms: u64,
}

fn default_scrape_path() -> String {
    "/metrics".into()
}
fn default_scrape_interval_ms() -> u64 {
    1_000
}
fn default_stale_after_ms() -> u64 {
    3_000
}

impl Default for ScrapeConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            path: default_scrape_path(),
            interval_ms: default_scrape_interval_ms(),
            stale_after_ms: default_stale_after_ms(),
        }
    }
}

/// `[pools.ejection]`: passive outlier detection.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EjectionConfig {
    /// Failures in a row, attributed to the replica, that eject it (0 disables).
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u32,
    /// First ejection length; each further ejection in a row doubles it.
    #[serde(default = "default_base_ejection_ms")]
    pub base_ejection_ms: u64,
    /// Cap on one ejection's length.
    #[serde(default = "default_max_ejection_ms")]
    pub max_ejection_ms: u64,
    /// Most of the pool that may be ejected at once, in percent (at least one replica stays).
    #[serde(default = "default_max_ejection_percent")]
    pub max_ejection_percent: u32,
}

fn default_consecutive_failures() -> u32 {
    5
}
fn default_base_ejection_ms() -> u64 {
    10_000
}
fn default_max_ejection_ms() -> u64 {
    300_000
}
fn default_max_ejection_percent() -> u32 {
    50
}

impl Default for EjectionConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: default_consecutive_failures(),
            base_ejection_ms: default_base_ejection_ms(),
            max_ejection_ms: default_max_ejection_ms(),
            max_ejection_percent: default_max_ejection_percent(),
        }
    }
}

/// Where a pool's replicas come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discovery {
    /// A fixed list.
    Static(Vec<SocketAddr>),
    /// A DNS name and port, re-resolved every `refresh_ms`.
    Dns {
        /// `host:port`.
        target: String,
        /// Re-resolution period.
        refresh_ms: u64,
    },
}

impl PoolConfig {
    /// The validated discovery source (call after [`Config::validate`]).
    pub fn discovery(&self) -> Discovery {
        match &self.dns {
            Some(target) => Discovery::Dns {
                target: target.clone(),
                refresh_ms: self.dns_refresh_ms,
            },
            None => Discovery::Static(
                self.endpoints
                    .iter()
                    .filter_map(|e| parse_endpoint(e).ok())
                    .collect(),
            ),
        }
    }

    /// Whether this pool serves requests naming `model`.
    pub fn serves(&self, model: &str) -> bool {
        self.model == "*" || self.model == model
    }
}

/// Parses `IP:PORT` or `http://IP:PORT[/]`.
pub fn parse_endpoint(s: &str) -> Result<SocketAddr, String> {
    if s.starts_with("https://") {
        return Err(format!(
            "`{s}`: https upstreams are not supported; use http://"
        ));
    }
    let bare = s.strip_prefix("http://").unwrap_or(s).trim_end_matches('/');
    bare.parse::<SocketAddr>()
        .map_err(|_| format!("`{s}` is not IP:PORT (use `dns = \"name:port\"` for host names)"))
}

/// The policy name and any tuning set explicitly, e.g. `cache_aware (balance_abs_threshold = 8)`.
pub fn describe_routing(r: &RoutingConfig) -> String {
    let name = r.policy.as_str();
    let tuning = toml::Value::try_from(r)
        .ok()
        .and_then(|v| v.as_table().cloned())
        .map(|t| {
            t.iter()
                .filter(|(k, _)| k.as_str() != "policy")
                .map(|(k, v)| format!("{k} = {v}"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    if tuning.is_empty() {
        name.to_string()
    } else {
        format!("{name} ({})", tuning.join(", "))
    }
}

/// The `sluice check` lines of a pool's experiment.
fn explain_experiment(o: &mut String, e: &ExperimentConfig, pool_routing: &RoutingConfig) {
    let by = match (e.split_by, &e.header) {
        (SplitBy::Header, Some(h)) => {
            format!("by header `{h}` (sticky per value; requests without it are split per request)")
        }
        (SplitBy::Tenant, _) => "by tenant (sticky per tenant)".to_string(),
        _ => "per request".to_string(),
    };
    let salt = if e.salt.is_empty() {
        String::new()
    } else {
        format!(", salt `{}`", e.salt)
    };
    let _ = writeln!(
        o,
        "  experiment: traffic split {by}{salt}; each arm has its own router over these endpoints"
    );
    for (a, share) in e.arms.iter().zip(e.shares()) {
        let routing = match &a.routing {
            Some(r) => describe_routing(r),
            None => format!("{} (the pool's)", describe_routing(pool_routing)),
        };
        let _ = writeln!(
            o,
            "    arm `{}`: weight {} ({:.1}% of requests), routing {routing}",
            a.name,
            a.weight,
            share * 100.0
        );
    }
}

/// 1-based line of byte offset `at` in `src`.
fn line_of(src: &str, at: usize) -> usize {
    src.as_bytes()[..at.min(src.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ProxyError> {
        let src = std::fs::read_to_string(path)
            .map_err(|e| ProxyError::Config(format!("cannot read {}: {e}", path.display())))?;
        let mut cfg = Self::parse(&src, &path.display().to_string())?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        for p in &mut cfg.pools {
            if let Some(t) = &mut p.get_mut().tokenizer {
                if t.is_relative() {
                    *t = base.join(&*t);
                }
            }
        }
        Ok(cfg)
    }

    /// Loads every pool's tokenizer, in pool order (errors name the file).
    pub fn tokenizers(&self) -> Result<Vec<Tokenizer>, ProxyError> {
        self.pools()
            .map(|p| match &p.tokenizer {
                Some(path) => Tokenizer::from_file(path)
                    .map_err(|e| ProxyError::Config(format!("pool `{}`: tokenizer: {e}", p.name))),
                None => Ok(Tokenizer::Estimate),
            })
            .collect()
    }

    /// Parses and validates config text; `origin` names it in errors.
    pub fn parse(src: &str, origin: &str) -> Result<Self, ProxyError> {
        let cfg: Config = toml::from_str(src)
            .map_err(|e| ProxyError::Config(format!("{origin}: {}", e.to_string().trim_end())))?;
        cfg.validate(Some(src))
            .map_err(|m| ProxyError::Config(format!("{origin}: {m}")))?;
        Ok(cfg)
    }

    /// A one-pool config for `sluice serve --upstream URL...`.
    pub fn for_upstreams(upstreams: &[String], model: Option<&str>) -> Result<Self, ProxyError> {
        let pool = PoolConfig {
            name: "default".into(),
            model: model.unwrap_or("*").into(),
            endpoints: upstreams.to_vec(),
            dns: None,
            dns_refresh_ms: default_dns_refresh_ms(),
            tokenizer: None,
            block_size: default_block_size(),
            stream_usage: true,
            routing: RoutingConfig::default(),
            timeouts: Timeouts::default(),
            health: HealthConfig::default(),
            scrape: ScrapeConfig::default(),
            ejection: EjectionConfig::default(),
            admission: None,
            experiment: None,
        };
        let cfg = Config {
            server: ServerConfig::default(),
            limits: Limits::default(),
            lifecycle: LifecycleConfig::default(),
            pools: vec![Spanned::new(0..0, pool)],
            classes: Vec::new(),
            tenants: Vec::new(),
            auth: AuthConfig::default(),
            quota: QuotaConfig::default(),
        };
        cfg.validate(None)
            .map_err(|m| ProxyError::Config(format!("--upstream: {m}")))?;
        Ok(cfg)
    }

    /// The pools without their spans.
    pub fn pools(&self) -> impl Iterator<Item = &PoolConfig> {
        self.pools.iter().map(Spanned::get_ref)
    }

    /// The validated classifier.
    pub fn classifier(&self) -> Result<Classifier, ProxyError> {
        Classifier::new(self.classes.iter().map(|c| c.get_ref().clone()).collect())
            .map_err(|e| ProxyError::Config(e.to_string()))
    }

    /// Checks everything serde cannot: references, ranges, addresses.
    /// `src` (the file text) lets messages name lines.
    pub fn validate(&self, src: Option<&str>) -> Result<(), String> {
        let at = |span: std::ops::Range<usize>| match src {
            Some(s) if span.end > 0 => format!(" (line {})", line_of(s, span.start)),
            _ => String::new(),
        };
        for (key, addr) in [
            ("server.listen", &self.server.listen),
            ("server.admin_listen", &self.server.admin_listen),
        ] {
            addr.parse::<SocketAddr>()
                .map_err(|_| format!("`{key}` = `{addr}` is not IP:PORT"))?;
        }
        if self.server.max_header_bytes < 1024 {
            return Err("`server.max_header_bytes` must be at least 1024".into());
        }
        if self.limits.max_body_bytes == 0 {
            return Err("`limits.max_body_bytes` must be positive".into());
        }
        if self.limits.max_retries > 10 {
            return Err("`limits.max_retries` must be at most 10".into());
        }
        if self.lifecycle.max_bytes.is_some_and(|b| b < 1024) {
            return Err("`lifecycle.max_bytes` must be at least 1024".into());
        }
        if self.lifecycle.keep > 1000 {
            return Err("`lifecycle.keep` must be at most 1000".into());
        }
        if self.pools.is_empty() {
            return Err("no `[[pools]]` configured; at least one pool is needed".into());
        }
        for (i, sp) in self.pools.iter().enumerate() {
            let p = sp.get_ref();
            let key = format!("pools[{i}]");
            let line = at(sp.span());
            let fail = |m: String| format!("`{key}`{line}: {m}");
            if p.name.trim().is_empty() {
                return Err(fail("`name` must not be empty".into()));
            }
            if self.pools[..i].iter().any(|q| q.get_ref().name == p.name) {
                return Err(fail(format!("pool name `{}` is used twice", p.name)));
            }
            if p.model.trim().is_empty() {
                return Err(fail("`model` must not be empty".into()));
            }
            match (&p.dns, p.endpoints.is_empty()) {
                (Some(_), false) => {
                    return Err(fail("set either `endpoints` or `dns`, not both".into()));
                }
                (None, true) => {
                    return Err(fail(
                        "needs `endpoints = [...]` or `dns = \"name:port\"`".into(),
                    ));
                }
                (Some(d), true) => {
                    let ok = d
                        .rsplit_once(':')
                        .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok());
                    if !ok {
                        return Err(fail(format!("`dns` = `{d}` must be `name:port`")));
                    }
                    if p.dns_refresh_ms < 100 {
                        return Err(fail("`dns_refresh_ms` must be at least 100".into()));
                    }
                }
                (None, false) => {
                    for (j, e) in p.endpoints.iter().enumerate() {
                        parse_endpoint(e).map_err(|m| fail(format!("`endpoints[{j}]`: {m}")))?;
                        if p.endpoints[..j]
                            .iter()
                            .any(|f| parse_endpoint(f) == parse_endpoint(e))
                        {
                            return Err(fail(format!("`endpoints[{j}]` `{e}` is listed twice")));
                        }
                    }
                }
            }
            if p.block_size == 0 || p.block_size > 1024 {
                return Err(fail("`block_size` must be in 1..=1024".into()));
            }
            p.routing
                .validate(&format!("{key}.routing"))
                .map_err(|m| fail(m.to_string()))?;
            let t = &p.timeouts;
            for (k, v) in [
                ("connect_ms", t.connect_ms),
                ("first_token_ms", t.first_token_ms),
                ("idle_ms", t.idle_ms),
                ("total_ms", t.total_ms),
            ] {
                if v == 0 {
                    return Err(fail(format!("`timeouts.{k}` must be positive")));
                }
            }
            if t.first_token_ms > t.total_ms {
                return Err(fail(
                    "`timeouts.first_token_ms` exceeds `timeouts.total_ms`".into(),
                ));
            }
            let h = &p.health;
            if !h.path.starts_with('/') {
                return Err(fail("`health.path` must start with `/`".into()));
            }
            if h.interval_ms < 10 || h.timeout_ms == 0 {
                return Err(fail(
                    "`health.interval_ms` must be at least 10 and `health.timeout_ms` positive"
                        .into(),
                ));
            }
            if h.unhealthy_threshold == 0 || h.healthy_threshold == 0 {
                return Err(fail("health thresholds must be at least 1".into()));
            }
            let s = &p.scrape;
            if !s.path.starts_with('/') {
                return Err(fail("`scrape.path` must start with `/`".into()));
            }
            if s.interval_ms < 10 {
                return Err(fail("`scrape.interval_ms` must be at least 10".into()));
            }
            if s.stale_after_ms < s.interval_ms {
                return Err(fail(
                    "`scrape.stale_after_ms` must be at least `scrape.interval_ms`".into(),
                ));
            }
            if let Some(e) = &p.experiment {
                e.validate(&format!("{key}.experiment"))
                    .map_err(|m| fail(m.to_string()))?;
                if e.split_by == SplitBy::Tenant && self.tenants.is_empty() {
                    return Err(fail(
                        "`experiment.split_by = \"tenant\"` needs `[[tenants]]`: without them every request is tenant `default` and one arm gets everything".into(),
                    ));
                }
            }
            if let Some(a) = &p.admission {
                a.validate(&format!("{key}.admission"))
                    .map_err(|m| fail(m.to_string()))?;
            }
            let e = &p.ejection;
            if e.max_ejection_percent > 100 {
                return Err(fail(
                    "`ejection.max_ejection_percent` must be at most 100".into(),
                ));
            }
            if e.base_ejection_ms == 0 || e.max_ejection_ms < e.base_ejection_ms {
                return Err(fail(
                    "`ejection.base_ejection_ms` must be positive and at most `max_ejection_ms`"
                        .into(),
                ));
            }
        }
        for (i, sc) in self.classes.iter().enumerate() {
            let c = sc.get_ref();
            if !self.pools().any(|p| p.name == c.pool) {
                return Err(format!(
                    "`classes[{i}]`{}: class `{}` names pool `{}`, which is not configured",
                    at(sc.span()),
                    c.name,
                    c.pool
                ));
            }
        }
        self.classifier().map_err(|e| e.to_string())?;
        crate::config_tenants::validate(&self.tenants, &self.auth, &self.quota, &at)?;
        Ok(())
    }

    /// A human explanation of what this config does, for `sluice check`.
    pub fn explain(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "listeners:");
        let _ = writeln!(o, "  api    http://{}  (OpenAI API)", self.server.listen);
        let _ = writeln!(
            o,
            "  admin  http://{}  (/metrics /healthz /readyz /admin/state)",
            self.server.admin_listen
        );
        let _ = writeln!(
            o,
            "limits: body <= {} bytes (413 beyond), headers <= {} bytes (431 beyond), up to {} retries before the first byte (backoff {} ms, doubling)",
            self.limits.max_body_bytes,
            self.server.max_header_bytes,
            self.limits.max_retries,
            self.limits.retry_backoff_ms
        );
        let _ = writeln!(
            o,
            "shutdown: on SIGTERM /readyz answers 503 at once, the API listener closes {} ms later, requests in flight get up to {} ms to finish",
            self.server.shutdown_delay_ms, self.server.drain_timeout_ms
        );
        let _ = writeln!(
            o,
            "lifecycle log: {}{}{}",
            self.lifecycle.log,
            if self.lifecycle.include_prompts {
                " (prompts included)"
            } else {
                ""
            },
            match (self.lifecycle.log.as_str(), self.lifecycle.max_bytes) {
                ("off" | "" | "stdout" | "-", _) => String::new(),
                (_, Some(b)) => format!(
                    "; rotated at {b} bytes, {} old files kept; reopened on SIGHUP/SIGUSR1",
                    self.lifecycle.keep
                ),
                (_, None) => "; reopened on SIGHUP/SIGUSR1".to_string(),
            }
        );
        for p in self.pools() {
            let _ = writeln!(o, "pool `{}`:", p.name);
            let model = if p.model == "*" {
                "any model".to_string()
            } else {
                format!("model `{}`", p.model)
            };
            let _ = writeln!(o, "  serves {model}");
            match p.discovery() {
                Discovery::Static(eps) => {
                    let list: Vec<String> = eps.iter().map(|a| a.to_string()).collect();
                    let _ = writeln!(o, "  endpoints: {} (static)", list.join(", "));
                }
                Discovery::Dns { target, refresh_ms } => {
                    let _ = writeln!(
                        o,
                        "  endpoints: DNS `{target}`, re-resolved every {refresh_ms} ms"
                    );
                }
            }
            let _ = writeln!(o, "  routing: {}", describe_routing(&p.routing));
            if let Some(e) = &p.experiment {
                explain_experiment(&mut o, e, &p.routing);
            }
            let _ = writeln!(
                o,
                "  tokens: {}; prefix blocks of {} tokens",
                p.tokenizer
                    .as_ref()
                    .map_or("word-piece estimate".to_string(), |t| format!(
                        "tokenizer {}",
                        t.display()
                    )),
                p.block_size
            );
            let t = &p.timeouts;
            let _ = writeln!(
                o,
                "  timeouts: connect {} ms, first token {} ms, idle {} ms, total {} ms",
                t.connect_ms, t.first_token_ms, t.idle_ms, t.total_ms
            );
            let h = &p.health;
            let _ = writeln!(
                o,
                "  health: GET {} every {} ms (timeout {} ms); unhealthy after {} failures, healthy after {} successes",
                h.path, h.interval_ms, h.timeout_ms, h.unhealthy_threshold, h.healthy_threshold
            );
            if p.scrape.enabled {
                let _ = writeln!(
                    o,
                    "  scrape: GET {} every {} ms; older than {} ms counts as unknown",
                    p.scrape.path, p.scrape.interval_ms, p.scrape.stale_after_ms
                );
            } else {
                let _ = writeln!(o, "  scrape: off");
            }
            let e = &p.ejection;
            if e.consecutive_failures == 0 {
                let _ = writeln!(o, "  passive ejection: off");
            } else {
                let _ = writeln!(
                    o,
                    "  passive ejection: after {} failures in a row for {}..{} ms, at most {}% of the pool",
                    e.consecutive_failures,
                    e.base_ejection_ms,
                    e.max_ejection_ms,
                    e.max_ejection_percent
                );
            }
        }
        if self.classes.is_empty() {
            let _ = writeln!(
                o,
                "classes: none; every request is class `default` on the first pool serving its model"
            );
        } else {
            let _ = writeln!(o, "classes (first match wins):");
            for c in &self.classes {
                let c = c.get_ref();
                let mut conds = Vec::new();
                match (c.min_prompt_tokens, c.max_prompt_tokens) {
                    (Some(a), Some(b)) => conds.push(format!("prompt {a}..={b} tokens")),
                    (Some(a), None) => conds.push(format!("prompt >= {a} tokens")),
                    (None, Some(b)) => conds.push(format!("prompt <= {b} tokens")),
                    (None, None) => {}
                }
                match (c.min_output_tokens, c.max_output_tokens) {
                    (Some(a), Some(b)) => conds.push(format!("max_tokens {a}..={b}")),
                    (Some(a), None) => conds.push(format!("max_tokens >= {a}")),
                    (None, Some(b)) => conds.push(format!("max_tokens <= {b}")),
                    (None, None) => {}
                }
                if let Some(h) = &c.header {
                    conds.push(format!("header {}: {}", h.name, h.value));
                }
                let when = if conds.is_empty() {
                    "always".to_string()
                } else {
                    conds.join(" and ")
                };
                let slo = c
                    .ttft_slo_ms
                    .map(|ms| format!(", TTFT SLO {ms} ms"))
                    .unwrap_or_default();
                let _ = writeln!(
                    o,
                    "  {} -> pool `{}` when {when} (default max_tokens {}{slo})",
                    c.name, c.pool, c.default_output_tokens
                );
            }
            let _ = writeln!(
                o,
                "  otherwise: class `default` on the first pool serving the model"
            );
        }
        let admission: Vec<_> = self
            .pools()
            .map(|p| (p.name.as_str(), p.admission.as_ref()))
            .collect();
        o.push_str(&crate::config_tenants::explain(
            &self.tenants,
            &self.auth,
            &self.quota,
            &admission,
        ));
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
[[pools]]
name = "chat"
model = "m"
endpoints = ["127.0.0.1:1", "http://127.0.0.1:2/"]
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MIN, "t").unwrap();
        let p = c.pools().next().unwrap();
        assert_eq!(p.timeouts.connect_ms, 2_000);
        assert_eq!(c.limits.max_body_bytes, 8 * 1024 * 1024);
        assert_eq!(
            p.discovery(),
            Discovery::Static(vec![
                "127.0.0.1:1".parse().unwrap(),
                "127.0.0.1:2".parse().unwrap()
            ])
        );
        assert!(c.explain().contains("pool `chat`"));
    }

    #[test]
    fn explain_names_each_class_ttft_slo() {
        let src = format!(
            "{MIN}\n[[classes]]\nname = \"urgent\"\npool = \"chat\"\nttft_slo_ms = 50\n\
             [[classes]]\nname = \"bulk\"\npool = \"chat\"\n"
        );
        let text = Config::parse(&src, "t").unwrap().explain();
        let line = |name: &str| {
            text.lines()
                .find(|l| l.trim_start().starts_with(name))
                .unwrap_or_default()
                .to_string()
        };
        assert!(line("urgent").contains("TTFT SLO 50 ms"), "{text}");
        assert!(!line("bulk").contains("TTFT SLO"), "{text}");
    }

    #[test]
    fn unknown_keys_name_the_line() {
        let src = format!("{MIN}typo = 3\n");
        let err = Config::parse(&src, "f.toml").unwrap_err().to_string();
        assert!(err.contains("line 6"), "{err}");
        assert!(err.contains("typo"), "{err}");
    }

    #[test]
    fn bad_references_name_the_line() {
        let src = format!("{MIN}\n[[classes]]\nname = \"x\"\npool = \"nope\"\n");
        let err = Config::parse(&src, "f.toml").unwrap_err().to_string();
        assert!(err.contains("line 7"), "{err}");
        assert!(err.contains("nope"), "{err}");
        let src = MIN.replace("127.0.0.1:1", "localhost:1");
        let err = Config::parse(&src, "f.toml").unwrap_err().to_string();
        assert!(
            err.contains("line 2") && err.contains("endpoints[0]"),
            "{err}"
        );
    }

    #[test]
    fn empty_and_contradictory_configs_are_rejected() {
        assert!(
            Config::parse("", "e")
                .unwrap_err()
                .to_string()
                .contains("no `[[pools]]`")
        );
        let both = format!("{MIN}dns = \"x:1\"\n");
        assert!(
            Config::parse(&both, "b")
                .unwrap_err()
                .to_string()
                .contains("not both")
        );
    }
}
