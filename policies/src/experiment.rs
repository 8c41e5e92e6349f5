//! Live experiments inside one pool: split its traffic between named arms by
//! weight, each arm routing with its own policy over the same replicas.
//!
//! The `[pools.experiment]` table ([`ExperimentConfig`]) names the arms, their
//! weights and routing, and what the split keys on:
//!
//! - `request`: every request on its own. The n-th request of the pool goes to
//!   the arm whose weight range holds `frac(n·φ)` (a Weyl sequence), so the
//!   shares match the weights within a request or two at any point of the run,
//!   not only on average, and a replay of the same sequence assigns the same.
//! - `tenant` / `header`: sticky. The key (tenant name, or the value of a
//!   header such as a session id) is hashed with xxh3 (seeded by `salt`) into
//!   the same weight ranges, so one key always lands on one arm for as long as
//!   the arms and weights stay the same; every key is still an independent
//!   draw, so the shares match the weights over many keys.
//!
//! An arm with weight 0 gets nothing (a way to drain it without deleting its
//! config). Nothing here reads a clock or does I/O; the caller keeps the
//! request counter.

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::PolicyError;
use crate::routing::RoutingConfig;

/// Most arms in one experiment: arm names are metric label values, so their
/// number must stay small.
pub const MAX_ARMS: usize = 16;
/// Longest arm name (it travels in a response header and a metric label).
pub const MAX_ARM_NAME: usize = 64;

/// 2⁶⁴/φ, the Weyl increment with the lowest discrepancy for a 64-bit counter.
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// What the split keys on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SplitBy {
    /// Each request independently, in weight proportion.
    #[default]
    Request,
    /// The request's tenant: one tenant, one arm.
    Tenant,
    /// The value of `header` (e.g. a session id): one value, one arm.
    Header,
}

impl SplitBy {
    /// The config name.
    pub fn as_str(self) -> &'static str {
        match self {
            SplitBy::Request => "request",
            SplitBy::Tenant => "tenant",
            SplitBy::Header => "header",
        }
    }
}

/// One `[[pools.experiment.arms]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArmConfig {
    /// Arm name: metric label, lifecycle `arm`, `x-sluice-arm` header.
    pub name: String,
    /// Relative share of the traffic (0: none). Any non-negative finite number.
    pub weight: f64,
    /// The arm's routing policy and tuning; absent: the pool's `[pools.routing]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<RoutingConfig>,
}

/// The `[pools.experiment]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    /// What the split keys on (default `request`).
    #[serde(default)]
    pub split_by: SplitBy,
    /// With `split_by = "header"`: the header whose value picks the arm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// Mixed into the key hash: a new salt reshuffles which keys go where.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub salt: String,
    /// The arms, in order (their weight ranges follow this order).
    pub arms: Vec<ArmConfig>,
}

/// Whether `name` can be an arm name: a short `[A-Za-z0-9._-]` token, safe
/// in a header value and a metric label.
pub fn valid_arm_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_ARM_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Whether `name` is a lowercase HTTP header name (RFC 9110 token
/// characters, as the `http` crate parses them; it would lowercase others).
fn valid_header_name(name: &str) -> bool {
    name.len() <= 128
        && http::HeaderName::from_bytes(name.as_bytes()).is_ok_and(|n| n.as_str() == name)
}

impl ExperimentConfig {
    /// Checks arms, weights, names and the header; `origin` (e.g.
    /// `pools[0].experiment`) prefixes the key in the error.
    pub fn validate(&self, origin: &str) -> Result<(), PolicyError> {
        let invalid = |key: String, message: String| PolicyError::Invalid {
            origin: origin.to_string(),
            key,
            message,
        };
        if self.arms.is_empty() {
            return Err(invalid(
                "arms".into(),
                "an experiment needs at least one `[[arms]]` entry".into(),
            ));
        }
        if self.arms.len() > MAX_ARMS {
            return Err(invalid(
                "arms".into(),
                format!(
                    "{} arms; at most {MAX_ARMS} (each is a metric label value)",
                    self.arms.len()
                ),
            ));
        }
        for (i, a) in self.arms.iter().enumerate() {
            if !valid_arm_name(&a.name) {
                return Err(invalid(
                    format!("arms[{i}].name"),
                    format!(
                        "{:?} must be 1..={MAX_ARM_NAME} characters of [A-Za-z0-9._-]",
                        a.name
                    ),
                ));
            }
            if self.arms[..i].iter().any(|b| b.name == a.name) {
                return Err(invalid(
                    format!("arms[{i}].name"),
                    format!("arm `{}` is named twice", a.name),
                ));
            }
            if !(a.weight.is_finite() && a.weight >= 0.0) {
                return Err(invalid(
                    format!("arms[{i}].weight"),
                    format!(
                        "{} must be a finite number >= 0 (0 sends the arm nothing)",
                        a.weight
                    ),
                ));
            }
            if let Some(r) = &a.routing {
                r.validate(&format!("{origin}.arms[{i}].routing"))?;
            }
        }
        let total: f64 = self.arms.iter().map(|a| a.weight).sum();
        if !(total.is_finite() && total > 0.0) {
            return Err(invalid(
                "arms".into(),
                "every weight is 0; at least one arm must get traffic".into(),
            ));
        }
        match (self.split_by, &self.header) {
            (SplitBy::Header, None) => Err(invalid(
                "header".into(),
                "`split_by = \"header\"` needs `header = \"x-session-id\"` (or another name)"
                    .into(),
            )),
            (SplitBy::Header, Some(h)) if !valid_header_name(h) => Err(invalid(
                "header".into(),
                format!("{h:?} is not a lowercase HTTP header name"),
            )),
            (SplitBy::Request | SplitBy::Tenant, Some(_)) => Err(invalid(
                "header".into(),
                format!(
                    "only `split_by = \"header\"` uses it, and this experiment splits by `{}`",
                    self.split_by.as_str()
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Each arm's share of the traffic, 0..=1, in arm order.
    pub fn shares(&self) -> Vec<f64> {
        let total: f64 = self.arms.iter().map(|a| a.weight.max(0.0)).sum();
        self.arms
            .iter()
            .map(|a| {
                if total > 0.0 {
                    a.weight.max(0.0) / total
                } else {
                    0.0
                }
            })
            .collect()
    }
}

/// The assignment of an experiment: weight ranges over the 64-bit hash space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// Exclusive upper end of each arm's range; a zero-weight arm has an empty
    /// range (its bound equals the previous one). The last positive arm's
    /// bound is `None`: it takes everything above the others.
    bounds: Vec<Option<u64>>,
    seed: u64,
    by: SplitBy,
}

impl Split {
    /// The split of `cfg`, which should have passed [`ExperimentConfig::validate`]
    /// (otherwise: negative and non-finite weights count as 0, and with no
    /// positive weight everything goes to the first arm).
    pub fn new(cfg: &ExperimentConfig) -> Self {
        let shares = cfg.shares();
        let last_positive = shares.iter().rposition(|&s| s > 0.0).unwrap_or(0);
        let mut cumulative = 0.0f64;
        let bounds = shares
            .iter()
            .enumerate()
            .map(|(i, s)| {
                cumulative += s;
                if i >= last_positive {
                    None
                } else {
                    // 2^64 as f64 is exact; the cast saturates at u64::MAX.
                    Some((cumulative * 18_446_744_073_709_551_616.0) as u64)
                }
            })
            .collect();
        Split {
            bounds,
            seed: xxh3_64_with_seed(cfg.salt.as_bytes(), 0x736c_7569_6365_4142),
            by: cfg.split_by,
        }
    }

    /// What the split keys on.
    pub fn by(&self) -> SplitBy {
        self.by
    }

    /// The arm whose range holds `point`.
    pub fn arm_at(&self, point: u64) -> usize {
        let mut lo = 0u64;
        for (i, b) in self.bounds.iter().enumerate() {
            match *b {
                None => return i,
                Some(hi) if point >= lo && point < hi => return i,
                Some(hi) => lo = lo.max(hi),
            }
        }
        0
    }

    /// The arm of the `n`-th request (`split_by = "request"`): a low-discrepancy
    /// walk over the ranges, so any window of requests is split close to the weights.
    pub fn arm_for_request(&self, n: u64) -> usize {
        self.arm_at(n.wrapping_mul(GOLDEN))
    }

    /// The arm of a sticky key (tenant name or header value): the same key
    /// always gets the same arm under the same config.
    pub fn arm_for_key(&self, key: &str) -> usize {
        self.arm_at(xxh3_64_with_seed(key.as_bytes(), self.seed))
    }

    /// The arm for one request: by `key` when the split is sticky and the key
    /// is present, else by the request counter `n` (a request without the
    /// header has no session to stick to).
    pub fn assign(&self, key: Option<&str>, n: u64) -> usize {
        match (self.by, key) {
            (SplitBy::Tenant | SplitBy::Header, Some(k)) => self.arm_for_key(k),
            _ => self.arm_for_request(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::PolicyKind;
    use proptest::prelude::*;

    fn exp(by: SplitBy, weights: &[f64]) -> ExperimentConfig {
        ExperimentConfig {
            split_by: by,
            header: (by == SplitBy::Header).then(|| "x-session-id".to_string()),
            salt: String::new(),
            arms: weights
                .iter()
                .enumerate()
                .map(|(i, &w)| ArmConfig {
                    name: format!("arm{i}"),
                    weight: w,
                    routing: None,
                })
                .collect(),
        }
    }

    fn counts(split: &Split, arms: usize, n: u64, f: impl Fn(&Split, u64) -> usize) -> Vec<u64> {
        let mut c = vec![0u64; arms];
        for i in 0..n {
            c[f(split, i)] += 1;
        }
        c
    }

    #[test]
    fn parses_the_documented_shape() {
        let text = r#"
split_by = "header"
header = "x-session-id"
salt = "2026-11"

[[arms]]
name = "baseline"
weight = 3

[[arms]]
name = "cache"
weight = 1
routing = { policy = "cache_aware", balance_abs_threshold = 8 }
"#;
        let cfg: ExperimentConfig = toml::from_str(text).unwrap();
        cfg.validate("e").unwrap();
        assert_eq!(cfg.split_by, SplitBy::Header);
        assert_eq!(cfg.arms[0].weight, 3.0);
        assert_eq!(
            cfg.arms[1].routing.as_ref().map(|r| r.policy),
            Some(PolicyKind::CacheAware)
        );
        assert_eq!(cfg.shares(), vec![0.75, 0.25]);
        let e = toml::from_str::<ExperimentConfig>("split_by = \"cookie\"\narms = []")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cookie"), "{e}");
        let e =
            toml::from_str::<ExperimentConfig>("[[arms]]\nname = \"a\"\nweight = 1\nwieght = 2")
                .unwrap_err()
                .to_string();
        assert!(e.contains("wieght"), "{e}");
    }

    #[test]
    fn validation_names_the_key() {
        let check = |cfg: &ExperimentConfig, key: &str| {
            let e = cfg.validate("pools[0].experiment").unwrap_err().to_string();
            assert!(
                e.contains("pools[0].experiment") && e.contains(key),
                "{key}: {e}"
            );
        };
        check(&exp(SplitBy::Request, &[]), "`arms`");
        check(&exp(SplitBy::Request, &[1.0, -1.0]), "arms[1].weight");
        check(&exp(SplitBy::Request, &[f64::NAN]), "arms[0].weight");
        check(&exp(SplitBy::Request, &[f64::INFINITY]), "arms[0].weight");
        check(&exp(SplitBy::Request, &[0.0, 0.0]), "every weight is 0");
        check(&exp(SplitBy::Request, &[1.0; MAX_ARMS + 1]), "at most");
        let mut dup = exp(SplitBy::Request, &[1.0, 1.0]);
        dup.arms[1].name = "arm0".into();
        check(&dup, "named twice");
        let mut bad = exp(SplitBy::Request, &[1.0]);
        bad.arms[0].name = "a b".into();
        check(&bad, "arms[0].name");
        let mut no_header = exp(SplitBy::Header, &[1.0]);
        no_header.header = None;
        check(&no_header, "needs `header");
        let mut upper = exp(SplitBy::Header, &[1.0]);
        upper.header = Some("X-Session".into());
        check(&upper, "lowercase");
        for bad in ["", "x session", "x:session", "x-session\n"] {
            let mut not_token = exp(SplitBy::Header, &[1.0]);
            not_token.header = Some(bad.into());
            check(&not_token, "not a lowercase HTTP header name");
        }
        let mut long = exp(SplitBy::Header, &[1.0]);
        long.header = Some("x".repeat(129));
        check(&long, "not a lowercase HTTP header name");
        let mut unused = exp(SplitBy::Tenant, &[1.0]);
        unused.header = Some("x-session-id".into());
        check(&unused, "only `split_by = \"header\"`");
        let mut routing = exp(SplitBy::Request, &[1.0]);
        routing.arms[0].routing = Some(RoutingConfig {
            balance_abs_threshold: Some(3),
            ..RoutingConfig::with_policy(PolicyKind::RoundRobin)
        });
        check(&routing, "arms[0].routing");
        exp(SplitBy::Request, &[0.0, 2.5]).validate("x").unwrap();
    }

    #[test]
    fn request_split_tracks_the_weights_closely() {
        let split = Split::new(&exp(SplitBy::Request, &[3.0, 1.0]));
        // Any prefix of the sequence is within three requests of 3:1.
        let mut c = [0i64; 2];
        for n in 0..10_000u64 {
            c[split.arm_for_request(n)] += 1;
            let total = (n + 1) as f64;
            assert!((c[1] as f64 - total / 4.0).abs() <= 3.0, "{n}: {c:?}");
        }
    }

    #[test]
    fn zero_weight_arms_get_nothing() {
        let split = Split::new(&exp(SplitBy::Request, &[0.0, 1.0, 0.0, 2.0, 0.0]));
        let c = counts(&split, 5, 30_000, Split::arm_for_request);
        assert_eq!((c[0], c[2], c[4]), (0, 0, 0), "{c:?}");
        assert!(c[1] > 9_900 && c[1] < 10_100, "{c:?}");
        let keyed = Split::new(&exp(SplitBy::Tenant, &[0.0, 1.0, 0.0]));
        for i in 0..10_000 {
            assert_eq!(keyed.arm_for_key(&format!("tenant-{i}")), 1);
        }
        // The extremes of the point space land in positive arms.
        assert_eq!(split.arm_at(0), 1);
        assert_eq!(split.arm_at(u64::MAX), 3);
    }

    #[test]
    fn keys_are_sticky_and_salt_reshuffles() {
        let cfg = exp(SplitBy::Header, &[1.0, 1.0]);
        let a = Split::new(&cfg);
        let b = Split::new(&cfg);
        let mut salted = cfg.clone();
        salted.salt = "v2".into();
        let s = Split::new(&salted);
        let mut moved = 0;
        for i in 0..1000 {
            let key = format!("session-{i}");
            assert_eq!(a.arm_for_key(&key), b.arm_for_key(&key));
            assert_eq!(a.assign(Some(&key), i), a.assign(Some(&key), i + 17));
            moved += usize::from(a.arm_for_key(&key) != s.arm_for_key(&key));
        }
        assert!((400..600).contains(&moved), "{moved}");
        // No key: per request.
        assert_eq!(a.assign(None, 5), a.arm_for_request(5));
        // A request split ignores any key.
        let r = Split::new(&exp(SplitBy::Request, &[1.0, 1.0]));
        assert_eq!(r.assign(Some("k"), 9), r.arm_for_request(9));
    }

    proptest! {
        /// Any weights: the request split follows them within a few requests,
        /// keyed splits within statistical noise, and zero weights get nothing.
        #[test]
        fn weights_are_respected(
            weights in proptest::collection::vec(prop_oneof![Just(0.0), 0.01f64..100.0], 1..8),
            salt in "[a-z]{0,6}",
        ) {
            prop_assume!(weights.iter().any(|&w| w > 0.0));
            let mut cfg = exp(SplitBy::Tenant, &weights);
            cfg.salt = salt;
            cfg.validate("p").unwrap();
            let split = Split::new(&cfg);
            let shares = cfg.shares();
            let n = 4000u64;
            let by_request = counts(&split, weights.len(), n, Split::arm_for_request);
            let by_key = counts(&split, weights.len(), n, |s, i| s.arm_for_key(&format!("k{i}")));
            for (i, share) in shares.iter().enumerate() {
                let want = share * n as f64;
                if *share == 0.0 {
                    prop_assert_eq!(by_request[i], 0);
                    prop_assert_eq!(by_key[i], 0);
                }
                prop_assert!((by_request[i] as f64 - want).abs() <= 8.0, "{:?} vs {:?}", by_request, shares);
                // Binomial: 6 standard deviations (≤ 0.5·√n) plus slack.
                let sd = (n as f64 * share * (1.0 - share)).sqrt();
                prop_assert!((by_key[i] as f64 - want).abs() <= 6.0 * sd + 2.0, "{:?} vs {:?}", by_key, shares);
            }
        }

        /// The same key under the same config always maps to the same arm,
        /// and every answer is an arm index.
        #[test]
        fn assignment_is_deterministic(
            weights in proptest::collection::vec(0.1f64..10.0, 1..6),
            keys in proptest::collection::vec(".{0,40}", 1..50),
            n in any::<u64>(),
        ) {
            let cfg = exp(SplitBy::Header, &weights);
            let split = Split::new(&cfg);
            let again = Split::new(&cfg.clone());
            for k in &keys {
                let arm = split.assign(Some(k), n);
                prop_assert!(arm < weights.len());
                prop_assert_eq!(arm, again.assign(Some(k), n.wrapping_add(1)));
            }
            prop_assert!(split.arm_for_request(n) < weights.len());
        }
    }
}
