//! The `[pools.routing]` table: which policy a pool uses and its tuning.
//!
//! Parameters are flat keys next to `policy` so a config reads like the
//! routers SREs already know (SGLang's `--balance-abs-threshold`, ...). Every
//! parameter is optional and has a documented default; setting one that the
//! chosen policy does not use is an error, because a knob that silently does
//! nothing is how a misconfigured pool ships.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::PolicyError;

/// A routing policy's config name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    /// Next endpoint in turn.
    RoundRobin,
    /// Uniform random endpoint (seeded).
    Random,
    /// Fewest requests in flight (proxy count, or the engine's running + waiting when higher).
    #[default]
    LeastRequests,
    /// Lowest KV-cache usage, falling back to fewest requests when gauges are unknown.
    LeastKv,
    /// Two random endpoints, the less loaded of them.
    PowerOfTwo,
    /// Consistent hashing with bounded load on the leading prefix blocks.
    PrefixAffinity,
    /// Longest match in an approximate prefix index, guarded by load balance.
    CacheAware,
    /// Highest weighted sum of normalised scorers.
    Scored,
}

impl PolicyKind {
    /// Every policy, in documentation order.
    pub const ALL: [PolicyKind; 8] = [
        PolicyKind::RoundRobin,
        PolicyKind::Random,
        PolicyKind::LeastRequests,
        PolicyKind::LeastKv,
        PolicyKind::PowerOfTwo,
        PolicyKind::PrefixAffinity,
        PolicyKind::CacheAware,
        PolicyKind::Scored,
    ];

    /// The config name (`round_robin`, `cache_aware`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::RoundRobin => "round_robin",
            PolicyKind::Random => "random",
            PolicyKind::LeastRequests => "least_requests",
            PolicyKind::LeastKv => "least_kv",
            PolicyKind::PowerOfTwo => "power_of_two",
            PolicyKind::PrefixAffinity => "prefix_affinity",
            PolicyKind::CacheAware => "cache_aware",
            PolicyKind::Scored => "scored",
        }
    }

    /// Whether the policy keeps a prefix index (and so reports `state_size`).
    pub fn tracks_prefixes(self) -> bool {
        matches!(self, PolicyKind::CacheAware | PolicyKind::Scored)
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PolicyKind {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PolicyKind::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| PolicyError::Unknown {
                kind: "routing policy",
                name: s.to_string(),
                known: PolicyKind::ALL.map(PolicyKind::as_str).join(", "),
            })
    }
}

/// Weights of the `scored` policy's scorers; each scorer is normalised to 0..=1 first.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScoreWeights {
    /// Fraction of the prompt's blocks the endpoint is believed to hold (higher is better).
    pub prefix: f64,
    /// Engine waiting queue, relative to the longest among the candidates (lower is better).
    pub queue: f64,
    /// KV-cache usage including tokens the proxy has in flight there (lower is better).
    pub kv: f64,
    /// Proxy's own in-flight requests, relative to the busiest candidate (lower is better).
    pub in_flight: f64,
}

impl Default for ScoreWeights {
    fn default() -> Self {
        ScoreWeights {
            prefix: 2.0,
            queue: 1.0,
            kv: 1.0,
            in_flight: 1.0,
        }
    }
}

/// The `[pools.routing]` table.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Which policy (default `least_requests`).
    pub policy: PolicyKind,
    /// `prefix_affinity`: leading blocks whose chained hash picks the ring position (default 4).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix_blocks: Option<u32>,
    /// `prefix_affinity`: ring points per endpoint (default 100).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub virtual_nodes: Option<u32>,
    /// `prefix_affinity`: ε of the bounded-load rule, skip endpoints above (1+ε)·mean (default 0.25).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_epsilon: Option<f64>,
    /// `cache_aware`: requests of imbalance tolerated before load beats a prefix match (default 32).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balance_abs_threshold: Option<u32>,
    /// `cache_aware`: ratio to the least-loaded endpoint tolerated before load beats a match (default 1.5).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balance_rel_threshold: Option<f64>,
    /// `cache_aware`: minimum matched fraction of the prompt's blocks that counts as a hit (default 0.5).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_threshold: Option<f64>,
    /// `cache_aware`, `scored`: most prefix blocks the index remembers (default 262144, ~24 B each).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_index_blocks: Option<usize>,
    /// `prefix_affinity`, `cache_aware`, `scored`: keep each tenant's prefixes apart (default false).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant_scoped: Option<bool>,
    /// `least_kv`, `scored`: tokens per KV block, to count in-flight tokens as KV usage (default 16).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u32>,
    /// `scored`: the scorers' weights (`[pools.routing.weights]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weights: Option<ScoreWeights>,
}

/// Resolved parameters of `prefix_affinity`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrefixAffinityParams {
    /// Leading blocks hashed onto the ring.
    pub prefix_blocks: u32,
    /// Ring points per endpoint.
    pub virtual_nodes: u32,
    /// ε of the (1+ε)·mean load bound.
    pub load_epsilon: f64,
    /// Mix the tenant into the ring key.
    pub tenant_scoped: bool,
}

impl Default for PrefixAffinityParams {
    fn default() -> Self {
        PrefixAffinityParams {
            prefix_blocks: 4,
            virtual_nodes: 100,
            load_epsilon: 0.25,
            tenant_scoped: false,
        }
    }
}

/// Resolved parameters of `cache_aware`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheAwareParams {
    /// Absolute imbalance (requests) tolerated before balancing.
    pub balance_abs_threshold: f64,
    /// Relative imbalance tolerated before balancing.
    pub balance_rel_threshold: f64,
    /// Minimum matched fraction that counts as a hit.
    pub cache_threshold: f64,
    /// Prefix-index capacity in blocks.
    pub max_index_blocks: usize,
    /// Scope the index by tenant.
    pub tenant_scoped: bool,
}

impl Default for CacheAwareParams {
    fn default() -> Self {
        CacheAwareParams {
            balance_abs_threshold: 32.0,
            balance_rel_threshold: 1.5,
            cache_threshold: 0.5,
            max_index_blocks: DEFAULT_INDEX_BLOCKS,
            tenant_scoped: false,
        }
    }
}

/// Resolved parameters of `scored`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoredParams {
    /// Scorer weights.
    pub weights: ScoreWeights,
    /// Prefix-index capacity in blocks.
    pub max_index_blocks: usize,
    /// Scope the index by tenant.
    pub tenant_scoped: bool,
    /// Tokens per KV block.
    pub block_size: u32,
}

impl Default for ScoredParams {
    fn default() -> Self {
        ScoredParams {
            weights: ScoreWeights::default(),
            max_index_blocks: DEFAULT_INDEX_BLOCKS,
            tenant_scoped: false,
            block_size: DEFAULT_BLOCK_SIZE,
        }
    }
}

/// Default prefix-index capacity: about 4M tokens of distinct prefixes at 16-token blocks.
const DEFAULT_INDEX_BLOCKS: usize = 262_144;
/// vLLM's default KV block size.
const DEFAULT_BLOCK_SIZE: u32 = 16;
/// Smallest index worth having (and the floor `build` clamps to).
const MIN_INDEX_BLOCKS: usize = 1024;
/// Largest index accepted (~1.5 GiB); beyond that a typo is likelier than intent.
const MAX_INDEX_BLOCKS: usize = 64 << 20;

use PolicyKind::{CacheAware, LeastKv, PrefixAffinity, Scored};

impl RoutingConfig {
    /// A config that selects `policy` with every parameter at its default.
    pub fn with_policy(policy: PolicyKind) -> Self {
        RoutingConfig {
            policy,
            ..RoutingConfig::default()
        }
    }

    /// Checks ranges and that every parameter set is used by the chosen
    /// policy; `origin` (file and table, e.g. `sluice.toml [pools.chat.routing]`)
    /// prefixes the error.
    pub fn validate(&self, origin: &str) -> Result<(), PolicyError> {
        let invalid = |key: &str, message: String| PolicyError::Invalid {
            origin: origin.to_string(),
            key: key.to_string(),
            message,
        };
        let set: [(&str, bool, &[PolicyKind]); 10] = [
            (
                "prefix_blocks",
                self.prefix_blocks.is_some(),
                &[PrefixAffinity],
            ),
            (
                "virtual_nodes",
                self.virtual_nodes.is_some(),
                &[PrefixAffinity],
            ),
            (
                "load_epsilon",
                self.load_epsilon.is_some(),
                &[PrefixAffinity],
            ),
            (
                "balance_abs_threshold",
                self.balance_abs_threshold.is_some(),
                &[CacheAware],
            ),
            (
                "balance_rel_threshold",
                self.balance_rel_threshold.is_some(),
                &[CacheAware],
            ),
            (
                "cache_threshold",
                self.cache_threshold.is_some(),
                &[CacheAware],
            ),
            (
                "max_index_blocks",
                self.max_index_blocks.is_some(),
                &[CacheAware, Scored],
            ),
            (
                "tenant_scoped",
                self.tenant_scoped.is_some(),
                &[PrefixAffinity, CacheAware, Scored],
            ),
            ("block_size", self.block_size.is_some(), &[LeastKv, Scored]),
            ("weights", self.weights.is_some(), &[Scored]),
        ];
        for (key, is_set, users) in set {
            if is_set && !users.contains(&self.policy) {
                let names: Vec<&str> = users.iter().map(|p| p.as_str()).collect();
                return Err(invalid(
                    key,
                    format!(
                        "only policy {} uses it, and this pool's policy is `{}`",
                        names.join(" or "),
                        self.policy
                    ),
                ));
            }
        }
        if let Some(n) = self.prefix_blocks
            && !(1..=4096).contains(&n)
        {
            return Err(invalid("prefix_blocks", format!("{n} is not in 1..=4096")));
        }
        if let Some(n) = self.virtual_nodes
            && !(1..=10_000).contains(&n)
        {
            return Err(invalid("virtual_nodes", format!("{n} is not in 1..=10000")));
        }
        if let Some(e) = self.load_epsilon
            && !(e.is_finite() && e > 0.0 && e <= 100.0)
        {
            return Err(invalid("load_epsilon", format!("{e} is not in (0, 100]")));
        }
        if let Some(r) = self.balance_rel_threshold
            && !(r.is_finite() && r >= 1.0)
        {
            return Err(invalid(
                "balance_rel_threshold",
                format!("{r} must be a finite ratio >= 1.0"),
            ));
        }
        if let Some(c) = self.cache_threshold
            && !(0.0..=1.0).contains(&c)
        {
            return Err(invalid(
                "cache_threshold",
                format!("{c} is not in 0.0..=1.0"),
            ));
        }
        if let Some(n) = self.max_index_blocks
            && !(MIN_INDEX_BLOCKS..=MAX_INDEX_BLOCKS).contains(&n)
        {
            return Err(invalid(
                "max_index_blocks",
                format!("{n} is not in {MIN_INDEX_BLOCKS}..={MAX_INDEX_BLOCKS}"),
            ));
        }
        if let Some(b) = self.block_size
            && !(1..=4096).contains(&b)
        {
            return Err(invalid("block_size", format!("{b} is not in 1..=4096")));
        }
        if let Some(w) = self.weights {
            let all = [
                ("weights.prefix", w.prefix),
                ("weights.queue", w.queue),
                ("weights.kv", w.kv),
                ("weights.in_flight", w.in_flight),
            ];
            for (key, v) in all {
                if !(v.is_finite() && (0.0..=1000.0).contains(&v)) {
                    return Err(invalid(key, format!("{v} is not in 0.0..=1000.0")));
                }
            }
            if all.iter().all(|(_, v)| *v == 0.0) {
                return Err(invalid("weights", "all weights are zero".to_string()));
            }
        }
        Ok(())
    }

    /// Tokens per KV block, defaulted and clamped.
    pub fn block_size(&self) -> u32 {
        self.block_size.unwrap_or(DEFAULT_BLOCK_SIZE).clamp(1, 4096)
    }

    /// `prefix_affinity` parameters with defaults filled in and values clamped.
    pub fn prefix_affinity(&self) -> PrefixAffinityParams {
        let d = PrefixAffinityParams::default();
        PrefixAffinityParams {
            prefix_blocks: self.prefix_blocks.unwrap_or(d.prefix_blocks).clamp(1, 4096),
            virtual_nodes: self
                .virtual_nodes
                .unwrap_or(d.virtual_nodes)
                .clamp(1, 10_000),
            load_epsilon: finite_in(self.load_epsilon, d.load_epsilon, 1e-6, 100.0),
            tenant_scoped: self.tenant_scoped.unwrap_or(d.tenant_scoped),
        }
    }

    /// `cache_aware` parameters with defaults filled in and values clamped.
    pub fn cache_aware(&self) -> CacheAwareParams {
        let d = CacheAwareParams::default();
        CacheAwareParams {
            balance_abs_threshold: self
                .balance_abs_threshold
                .map_or(d.balance_abs_threshold, f64::from),
            balance_rel_threshold: finite_in(
                self.balance_rel_threshold,
                d.balance_rel_threshold,
                1.0,
                1e9,
            ),
            cache_threshold: finite_in(self.cache_threshold, d.cache_threshold, 0.0, 1.0),
            max_index_blocks: self
                .max_index_blocks
                .unwrap_or(d.max_index_blocks)
                .clamp(MIN_INDEX_BLOCKS, MAX_INDEX_BLOCKS),
            tenant_scoped: self.tenant_scoped.unwrap_or(d.tenant_scoped),
        }
    }

    /// `scored` parameters with defaults filled in and values clamped.
    pub fn scored(&self) -> ScoredParams {
        let d = ScoredParams::default();
        let w = self.weights.unwrap_or(d.weights);
        let clamp_w = |v: f64| {
            if v.is_finite() {
                v.clamp(0.0, 1000.0)
            } else {
                0.0
            }
        };
        ScoredParams {
            weights: ScoreWeights {
                prefix: clamp_w(w.prefix),
                queue: clamp_w(w.queue),
                kv: clamp_w(w.kv),
                in_flight: clamp_w(w.in_flight),
            },
            max_index_blocks: self
                .max_index_blocks
                .unwrap_or(d.max_index_blocks)
                .clamp(MIN_INDEX_BLOCKS, MAX_INDEX_BLOCKS),
            tenant_scoped: self.tenant_scoped.unwrap_or(d.tenant_scoped),
            block_size: self.block_size(),
        }
    }
}

/// `v` if set and finite, clamped to `lo..=hi`; otherwise `default`.
fn finite_in(v: Option<f64>, default: f64, lo: f64, hi: f64) -> f64 {
    match v {
        Some(x) if x.is_finite() => x.clamp(lo, hi),
        _ => default,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<RoutingConfig, String> {
        toml::from_str::<RoutingConfig>(text).map_err(|e| e.to_string())
    }

    #[test]
    fn parses_every_policy_name() {
        for p in PolicyKind::ALL {
            let cfg = parse(&format!("policy = \"{p}\"")).unwrap();
            assert_eq!(cfg.policy, p);
            cfg.validate("t").unwrap();
            assert_eq!(p.as_str().parse::<PolicyKind>().unwrap(), p);
        }
        assert_eq!(parse("").unwrap().policy, PolicyKind::LeastRequests);
    }

    #[test]
    fn unknown_keys_and_names_are_rejected() {
        let e = parse("policy = \"cache_aware\"\nbalance_treshold = 3").unwrap_err();
        assert!(e.contains("balance_treshold"), "{e}");
        let e = parse("policy = \"fastest\"").unwrap_err();
        assert!(e.contains("fastest"), "{e}");
        let e = "fastest".parse::<PolicyKind>().unwrap_err().to_string();
        assert!(e.contains("round_robin") && e.contains("scored"), "{e}");
        let e = parse("policy = \"scored\"\n[weights]\nprefx = 1.0").unwrap_err();
        assert!(e.contains("prefx"), "{e}");
    }

    #[test]
    fn parameters_must_belong_to_the_policy() {
        let cfg = parse("policy = \"round_robin\"\nbalance_abs_threshold = 8").unwrap();
        let e = cfg.validate("pool chat").unwrap_err().to_string();
        assert!(
            e.contains("pool chat") && e.contains("balance_abs_threshold"),
            "{e}"
        );
        assert!(
            e.contains("cache_aware") && e.contains("round_robin"),
            "{e}"
        );
        let cfg = parse("policy = \"cache_aware\"\nbalance_abs_threshold = 8").unwrap();
        cfg.validate("x").unwrap();
        assert_eq!(cfg.cache_aware().balance_abs_threshold, 8.0);
    }

    #[test]
    fn ranges_are_checked() {
        let bad = [
            "policy = \"cache_aware\"\nbalance_rel_threshold = 0.5",
            "policy = \"cache_aware\"\ncache_threshold = 1.5",
            "policy = \"cache_aware\"\nmax_index_blocks = 3",
            "policy = \"prefix_affinity\"\nprefix_blocks = 0",
            "policy = \"prefix_affinity\"\nload_epsilon = 0.0",
            "policy = \"prefix_affinity\"\nvirtual_nodes = 0",
            "policy = \"least_kv\"\nblock_size = 0",
            "policy = \"scored\"\n[weights]\nprefix = 0.0\nqueue = 0.0\nkv = 0.0\nin_flight = 0.0",
            "policy = \"scored\"\n[weights]\nkv = -1.0",
        ];
        for text in bad {
            let cfg = parse(text).unwrap();
            assert!(cfg.validate("x").is_err(), "accepted: {text}");
        }
    }

    #[test]
    fn defaults_resolve() {
        let cfg = parse("policy = \"scored\"\n[weights]\nkv = 3.0").unwrap();
        cfg.validate("x").unwrap();
        let p = cfg.scored();
        assert_eq!(p.weights.kv, 3.0);
        assert_eq!(p.weights.prefix, ScoreWeights::default().prefix);
        assert_eq!(p.max_index_blocks, DEFAULT_INDEX_BLOCKS);
        let round_trip: RoutingConfig = toml::from_str(&toml::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(round_trip, cfg);
    }
}
