//! A pool's routers: one per arm of its `[pools.experiment]`, or a single
//! unnamed one when it runs no experiment, and the split that assigns each
//! request to an arm.
//!
//! Every arm routes over the same endpoints, with its own router (its own
//! prefix index, ring or counter), so one arm's placements never steer the
//! other's. Assignment is `sluice_policies::experiment::Split`; this module
//! only supplies its key (tenant or header value) and the request counter.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sluice_policies::experiment::{Split, SplitBy};
use sluice_policies::prefix::stable_hash;
use sluice_policies::routing::{self, Decision, EndpointView, RouteRequest, Router, RoutingConfig};

use crate::config::PoolConfig;
use crate::endpoint::lock;

/// One arm: its name, share and router.
pub struct Arm {
    /// Arm name; `None` in a pool without an experiment.
    pub name: Option<String>,
    /// Share of the pool's traffic, 0..=1.
    pub share: f64,
    /// The routing config its router was built from.
    pub routing: RoutingConfig,
    router: Arc<Mutex<Box<dyn Router>>>,
    policy: &'static str,
}

impl Arm {
    /// The routing policy's name.
    pub fn policy(&self) -> &'static str {
        self.policy
    }

    /// Entries in its router's bounded state.
    pub fn state_size(&self) -> usize {
        lock(&self.router).state_size()
    }
}

/// The arms of one pool and how requests are split between them.
pub struct Arms {
    arms: Vec<Arm>,
    split: Option<Split>,
    header: Option<String>,
    /// Requests assigned per request so far (the split's sequence number).
    requests: AtomicU64,
}

impl Arms {
    /// Builds the arms `cfg` asks for. An arm keeps its router (and so its
    /// prefix index) from `previous` when an arm of the same name (or the
    /// unnamed one) had the same routing config; otherwise it starts fresh.
    pub fn new(cfg: &PoolConfig, previous: Option<&Arms>, seed: u64) -> Self {
        let reuse = |name: Option<&str>, routing: &RoutingConfig| {
            previous
                .and_then(|p| {
                    p.arms
                        .iter()
                        .find(|a| a.name.as_deref() == name && &a.routing == routing)
                })
                .map(|a| Arc::clone(&a.router))
        };
        let make = |name: Option<String>, share: f64, routing: RoutingConfig| {
            // Each arm draws from its own stream, so arms of one policy do not move in lockstep.
            let arm_seed = name
                .as_deref()
                .map_or(seed, |n| seed ^ stable_hash(n).rotate_left(17));
            let router = reuse(name.as_deref(), &routing)
                .unwrap_or_else(|| Arc::new(Mutex::new(routing::build(&routing, arm_seed))));
            let policy = lock(&router).name();
            Arm {
                name,
                share,
                routing,
                router,
                policy,
            }
        };
        let (arms, split, header) = match &cfg.experiment {
            // An experiment without arms never passes validation; route as if unset.
            Some(e) if !e.arms.is_empty() => (
                e.arms
                    .iter()
                    .zip(e.shares())
                    .map(|(a, share)| {
                        let routing = a.routing.clone().unwrap_or_else(|| cfg.routing.clone());
                        make(Some(a.name.clone()), share, routing)
                    })
                    .collect(),
                Some(Split::new(e)),
                e.header.clone(),
            ),
            _ => (vec![make(None, 1.0, cfg.routing.clone())], None, None),
        };
        let requests = previous.map_or(0, |p| p.requests.load(Ordering::Relaxed));
        Self {
            arms,
            split,
            header,
            requests: AtomicU64::new(requests),
        }
    }

    /// Picks the arm of one request. `tenant` and `header` (a lookup of the
    /// request's headers by lowercase name) supply the sticky key; a request
    /// without the split header is assigned per request.
    pub fn assign<'h>(&self, tenant: &str, header: impl Fn(&str) -> Option<&'h str>) -> usize {
        let Some(split) = &self.split else {
            return 0;
        };
        let key = match split.by() {
            SplitBy::Request => None,
            SplitBy::Tenant => Some(tenant),
            SplitBy::Header => self
                .header
                .as_deref()
                .and_then(header)
                .map(str::trim)
                .filter(|v| !v.is_empty()),
        };
        match key {
            Some(k) => split.arm_for_key(k),
            None => split.arm_for_request(self.requests.fetch_add(1, Ordering::Relaxed)),
        }
    }

    /// Whether the pool runs an experiment.
    pub fn is_experiment(&self) -> bool {
        self.split.is_some()
    }

    /// What the split keys on, when there is one.
    pub fn split_by(&self) -> Option<SplitBy> {
        self.split.as_ref().map(Split::by)
    }

    /// The split header, with `split_by = "header"`.
    pub fn header(&self) -> Option<&str> {
        self.header.as_deref()
    }

    /// Every arm, in config order.
    pub fn iter(&self) -> impl Iterator<Item = &Arm> {
        self.arms.iter()
    }

    /// Arm `arm`, or the last when out of range.
    fn get(&self, arm: usize) -> &Arm {
        // `new` always builds at least one arm.
        &self.arms[arm.min(self.arms.len().saturating_sub(1))]
    }

    /// The name of arm `arm` (`None` without an experiment).
    pub fn name(&self, arm: usize) -> Option<&str> {
        self.get(arm).name.as_deref()
    }

    /// The routing policy of arm `arm`.
    pub fn policy(&self, arm: usize) -> &'static str {
        self.get(arm).policy
    }

    /// Asks arm `arm`'s router to pick among `endpoints`.
    pub fn pick(
        &self,
        arm: usize,
        req: &RouteRequest<'_>,
        endpoints: &[EndpointView<'_>],
    ) -> Option<Decision> {
        lock(&self.get(arm).router).pick(req, endpoints)
    }

    /// Entries in every arm's router state together.
    pub fn state_size(&self) -> usize {
        self.arms.iter().map(Arm::state_size).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn pool(extra: &str) -> PoolConfig {
        let src = format!(
            "[[pools]]\nname = \"p\"\nmodel = \"m\"\nendpoints = [\"127.0.0.1:1\"]\n{extra}"
        );
        Config::parse(&src, "t")
            .unwrap()
            .pools()
            .next()
            .unwrap()
            .clone()
    }

    const EXP: &str = r#"
[pools.experiment]
split_by = "header"
header = "x-session-id"

[[pools.experiment.arms]]
name = "a"
weight = 1

[[pools.experiment.arms]]
name = "b"
weight = 1
routing = { policy = "cache_aware" }
"#;

    #[test]
    fn a_pool_without_experiment_has_one_unnamed_arm() {
        let arms = Arms::new(&pool(""), None, 1);
        assert!(!arms.is_experiment());
        assert_eq!(arms.assign("t", |_| Some("x")), 0);
        assert_eq!(arms.name(0), None);
        assert_eq!(arms.policy(0), "least_requests");
        assert_eq!(arms.policy(7), "least_requests");
        // An unvalidated experiment without arms routes as if there were none.
        let mut empty = pool("");
        empty.experiment = Some(sluice_policies::experiment::ExperimentConfig {
            split_by: SplitBy::Request,
            header: None,
            salt: String::new(),
            arms: Vec::new(),
        });
        let arms = Arms::new(&empty, None, 1);
        assert!(!arms.is_experiment());
        assert_eq!(arms.assign("t", |_| None), 0);
    }

    #[test]
    fn arms_get_their_own_policies_and_sticky_keys() {
        let arms = Arms::new(&pool(EXP), None, 1);
        assert_eq!(arms.policy(0), "least_requests");
        assert_eq!(arms.policy(1), "cache_aware");
        let mut seen = [0; 2];
        for i in 0..200 {
            let sid = format!("s{i}");
            let arm = arms.assign("t", |h| (h == "x-session-id").then_some(sid.as_str()));
            assert_eq!(
                arm,
                arms.assign("other", |h| (h == "x-session-id").then_some(sid.as_str()))
            );
            seen[arm] += 1;
        }
        assert!(seen[0] > 60 && seen[1] > 60, "{seen:?}");
        // No header: per request, alternating at 1:1.
        let a = arms.assign("t", |_| None);
        let b = arms.assign("t", |_| Some("  "));
        assert_ne!(a, b);
    }

    #[test]
    fn reload_keeps_routers_of_unchanged_arms() {
        let old = Arms::new(&pool(EXP), None, 1);
        let same = Arms::new(&pool(EXP), Some(&old), 1);
        assert!(Arc::ptr_eq(&old.arms[1].router, &same.arms[1].router));
        let changed = Arms::new(
            &pool(&EXP.replace("\"cache_aware\"", "\"scored\"")),
            Some(&old),
            1,
        );
        assert!(Arc::ptr_eq(&old.arms[0].router, &changed.arms[0].router));
        assert!(!Arc::ptr_eq(&old.arms[1].router, &changed.arms[1].router));
        assert_eq!(changed.policy(1), "scored");
    }
}
