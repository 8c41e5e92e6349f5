//! Replica selection: given a request's shape and each healthy endpoint's
//! load, pick one endpoint and say why.
//!
//! A [`Router`] is owned by one pool and called with `&mut self` (the proxy
//! keeps it behind a short-lived lock; the offline simulator owns it), so a
//! policy keeps its state (a counter, a prefix index, a hash ring) as plain
//! fields. Time is an argument (`RouteRequest::now_ms`); nothing here reads a
//! clock or does I/O. Randomised policies draw from a generator seeded by the
//! caller, so an experiment replays exactly.
//!
//! The proxy builds a pool's router once from its `[pools.routing]` table:
//! [`RoutingConfig`] (validated with [`RoutingConfig::validate`]) and
//! [`build`].

mod cache_aware;
mod config;
mod least_kv;
mod least_requests;
mod load;
mod power_of_two;
mod prefix_affinity;
pub mod prefix_index;
mod random;
mod round_robin;
mod scored;

pub use cache_aware::CacheAware;
pub use config::{
    CacheAwareParams, PolicyKind, PrefixAffinityParams, RoutingConfig, ScoreWeights, ScoredParams,
};
pub use least_kv::LeastKv;
pub use least_requests::LeastRequests;
pub use load::{kv_load, request_load};
pub use power_of_two::PowerOfTwo;
pub use prefix_affinity::PrefixAffinity;
pub use random::RandomChoice;
pub use round_robin::RoundRobin;
pub use scored::Scored;

use crate::prefix::BlockHash;

/// Engine-side gauges scraped from a replica's `/metrics`, fresh enough to trust.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct EngineGauges {
    /// `vllm:num_requests_running`.
    pub running: f64,
    /// `vllm:num_requests_waiting`.
    pub waiting: f64,
    /// `vllm:kv_cache_usage_perc`, 0..=1.
    pub kv_usage: f64,
    /// `num_gpu_blocks` from `vllm:cache_config_info`, when known.
    pub num_gpu_blocks: Option<u64>,
}

/// What is known about one endpoint's load at decision time.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct EndpointLoad {
    /// Requests the proxy has sent there and not yet seen finish.
    pub in_flight: u32,
    /// Prompt + requested output tokens of those requests.
    pub in_flight_tokens: u64,
    /// The engine's own gauges, `None` when never scraped or stale (unknown, not idle).
    pub engine: Option<EngineGauges>,
    /// The proxy's `in_flight` at the moment `engine` was read: engine requests
    /// beyond it belong to other clients (another proxy, direct traffic).
    pub in_flight_at_scrape: u32,
}

/// One candidate endpoint: a stable key (its `host:port`) and its load.
#[derive(Debug, Clone, Copy)]
pub struct EndpointView<'a> {
    /// Stable identity; prefix indexes and hash rings key on it.
    pub key: &'a str,
    /// Current load.
    pub load: EndpointLoad,
}

/// The request facts a policy may use.
#[derive(Debug, Clone, Copy)]
pub struct RouteRequest<'a> {
    /// Chained prefix block hashes of the prompt (see [`crate::prefix`]).
    pub block_hashes: &'a [BlockHash],
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Requested output tokens (`max_tokens`), or the class default.
    pub max_tokens: u32,
    /// Tenant name.
    pub tenant: &'a str,
    /// Request class name.
    pub class: &'a str,
    /// Monotonic time in milliseconds, supplied by the caller.
    pub now_ms: u64,
}

/// Why a policy chose the endpoint it chose (a metric label and a lifecycle field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Next in rotation.
    Rotation,
    /// Uniform random choice.
    Random,
    /// Least loaded by the policy's load measure.
    LeastLoaded,
    /// Endpoint already holds (or was last sent) a prefix of this prompt.
    PrefixHit,
    /// No endpoint matched the prefix; placed by load or hash.
    PrefixMiss,
    /// A prefix match existed but load imbalance overrode it.
    Balance,
    /// Highest weighted score.
    Score,
    /// The policy could not apply (e.g. no load data) and fell back.
    Fallback,
}

impl Reason {
    /// The snake_case label used in metrics and lifecycle records.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Rotation => "rotation",
            Reason::Random => "random",
            Reason::LeastLoaded => "least_loaded",
            Reason::PrefixHit => "prefix_hit",
            Reason::PrefixMiss => "prefix_miss",
            Reason::Balance => "balance",
            Reason::Score => "score",
            Reason::Fallback => "fallback",
        }
    }
}

/// A policy's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Index into the `endpoints` slice the policy was given.
    pub index: usize,
    /// Why.
    pub reason: Reason,
    /// Prompt blocks the policy believes are cached there (0 when it does not track prefixes).
    pub matched_blocks: u32,
}

/// A replica-selection policy for one pool.
pub trait Router: Send {
    /// The policy's config name (`round_robin`, `cache_aware`, ...).
    fn name(&self) -> &'static str;

    /// Picks one of `endpoints` (all healthy; never empty when called) for `req`.
    /// Returns `None` only when `endpoints` is empty. A policy that tracks
    /// prefixes records the routed prompt here.
    fn pick(&mut self, req: &RouteRequest<'_>, endpoints: &[EndpointView<'_>]) -> Option<Decision>;

    /// Number of entries in the policy's bounded state (prefix-index size), for metrics.
    fn state_size(&self) -> usize {
        0
    }
}

/// Builds the router a pool's `[pools.routing]` table asks for.
///
/// `seed` drives every random choice and keys the prefix index's hash, so
/// the same seed and the same request sequence give the same decisions.
/// Expects a config that passed [`RoutingConfig::validate`]; out-of-range
/// values in one that did not are clamped, never a panic.
pub fn build(cfg: &RoutingConfig, seed: u64) -> Box<dyn Router> {
    match cfg.policy {
        PolicyKind::RoundRobin => Box::new(RoundRobin::default()),
        PolicyKind::Random => Box::new(RandomChoice::new(seed)),
        PolicyKind::LeastRequests => Box::new(LeastRequests::default()),
        PolicyKind::LeastKv => Box::new(LeastKv::new(cfg.block_size())),
        PolicyKind::PowerOfTwo => Box::new(PowerOfTwo::new(seed)),
        PolicyKind::PrefixAffinity => Box::new(PrefixAffinity::new(cfg.prefix_affinity())),
        PolicyKind::CacheAware => Box::new(CacheAware::new(cfg.cache_aware(), seed)),
        PolicyKind::Scored => Box::new(Scored::new(cfg.scored(), seed)),
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Builders for policy tests.

    use super::{EndpointLoad, EndpointView, RouteRequest};
    use crate::prefix::BlockHash;

    /// Views of `keys` with the given proxy in-flight counts and no engine gauges.
    pub fn views<'a>(keys: &[&'a str], in_flight: &[u32]) -> Vec<EndpointView<'a>> {
        keys.iter()
            .zip(in_flight)
            .map(|(key, &n)| EndpointView {
                key,
                load: EndpointLoad {
                    in_flight: n,
                    in_flight_tokens: u64::from(n) * 1000,
                    engine: None,
                    in_flight_at_scrape: 0,
                },
            })
            .collect()
    }

    /// A request of tenant `t` with the given block hashes.
    pub fn request(block_hashes: &[BlockHash]) -> RouteRequest<'_> {
        RouteRequest {
            block_hashes,
            prompt_tokens: block_hashes.len() as u32 * 16,
            max_tokens: 128,
            tenant: "t",
            class: "chat",
            now_ms: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{request, views};
    use super::*;

    #[test]
    fn build_gives_every_policy_by_name() {
        let keys = ["a", "b", "c"];
        let eps = views(&keys, &[1, 0, 2]);
        let hashes: Vec<BlockHash> = (1..=20).collect();
        for p in PolicyKind::ALL {
            let mut r = build(&RoutingConfig::with_policy(p), 42);
            assert_eq!(r.name(), p.as_str());
            for _ in 0..10 {
                let d = r.pick(&request(&hashes), &eps).unwrap();
                assert!(d.index < keys.len());
            }
            assert!(r.pick(&request(&hashes), &[]).is_none());
            assert_eq!(r.state_size() > 0, p.tracks_prefixes(), "{p}");
        }
    }

    use proptest::prelude::*;

    fn arb_load() -> impl Strategy<Value = EndpointLoad> {
        let gauge = prop_oneof![
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(-1.0),
            0.0f64..100.0,
        ];
        (
            0u32..100,
            0u64..1_000_000,
            0u32..100,
            proptest::option::of((
                gauge.clone(),
                gauge.clone(),
                gauge,
                proptest::option::of(0u64..50_000),
            )),
        )
            .prop_map(
                |(in_flight, in_flight_tokens, at_scrape, engine)| EndpointLoad {
                    in_flight,
                    in_flight_tokens,
                    in_flight_at_scrape: at_scrape,
                    engine: engine.map(|(running, waiting, kv_usage, num_gpu_blocks)| {
                        EngineGauges {
                            running,
                            waiting,
                            kv_usage,
                            num_gpu_blocks,
                        }
                    }),
                },
            )
    }

    proptest! {
        /// Any policy, any loads (garbled gauges included), endpoints coming
        /// and going between calls: a pick is always in range.
        #[test]
        fn picks_are_always_in_range(
            rounds in proptest::collection::vec(
                (proptest::collection::vec(arb_load(), 1..40), 0usize..200, 0u64..20),
                1..30,
            ),
            policy in 0usize..PolicyKind::ALL.len(),
            seed in any::<u64>(),
        ) {
            let names: Vec<String> = (0..200).map(|i| format!("10.1.{}.{}:8000", i / 250, i % 250)).collect();
            let mut r = build(&RoutingConfig::with_policy(PolicyKind::ALL[policy]), seed);
            for (loads, offset, prompt) in rounds {
                let eps: Vec<EndpointView<'_>> = loads
                    .iter()
                    .enumerate()
                    .map(|(i, load)| EndpointView { key: &names[(offset + i) % names.len()], load: *load })
                    .collect();
                let hashes: Vec<BlockHash> = (0..prompt * 7).map(|i| i ^ (prompt << 32)).collect();
                let d = r.pick(&request(&hashes), &eps).unwrap();
                prop_assert!(d.index < eps.len());
                prop_assert!(d.matched_blocks as usize <= hashes.len());
            }
        }
    }

    #[test]
    fn same_seed_same_decisions() {
        let keys = ["a", "b", "c", "d"];
        let eps = views(&keys, &[0; 4]);
        for p in PolicyKind::ALL {
            let mut x = build(&RoutingConfig::with_policy(p), 9);
            let mut y = build(&RoutingConfig::with_policy(p), 9);
            for i in 0..50u64 {
                let hashes = [i % 7, i];
                let req = request(&hashes);
                assert_eq!(x.pick(&req, &eps), y.pick(&req, &eps), "{p}");
            }
        }
    }
}
