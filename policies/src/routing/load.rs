//! Load measures shared by the load-aware policies, and least-loaded choice.
//!
//! Two sources describe an endpoint's load: what the proxy itself has in
//! flight there (exact, current, but blind to other proxies' traffic) and the
//! engine's scraped gauges (complete, but up to a scrape interval old). The
//! measures here combine them so that neither a stale gauge nor a second proxy
//! makes a busy endpoint look idle.

use super::{EndpointLoad, EndpointView};
use crate::prefix::stable_hash;

/// Requests at the endpoint as best known: what the proxy has in flight there
/// now, plus the engine's running + waiting requests that are not the proxy's.
///
/// The engine's count at the last scrape includes the proxy's own requests of
/// that moment (`in_flight_at_scrape`); only the excess is other clients'
/// traffic (another proxy, direct callers). Adding the whole gauge would count
/// the proxy's requests twice; taking the larger of the two (the obvious
/// alternative) lets a scrape up to an interval old mask every request sent
/// since, so a burst piles onto whichever endpoint looked emptiest then.
pub fn request_load(load: &EndpointLoad) -> f64 {
    let own = f64::from(load.in_flight);
    match load.engine {
        Some(g) => {
            let engine = non_negative(g.running) + non_negative(g.waiting);
            own + (engine - f64::from(load.in_flight_at_scrape)).max(0.0)
        }
        None => own,
    }
}

/// KV-cache usage as a fraction of capacity, `None` when the engine's gauges
/// are unknown or stale.
///
/// When the engine's block count is known, tokens the proxy has in flight
/// there are added on top of the scraped usage: between two scrapes the
/// gauge does not move, and without this term every request of that interval
/// would pile onto the endpoint that looked emptiest at the last scrape.
pub fn kv_load(load: &EndpointLoad, block_size: u32) -> Option<f64> {
    let g = load.engine?;
    let mut usage = non_negative(g.kv_usage);
    if let Some(blocks) = g.num_gpu_blocks.filter(|b| *b > 0) {
        let capacity = blocks as f64 * f64::from(block_size.max(1));
        usage += load.in_flight_tokens as f64 / capacity;
    }
    Some(usage)
}

/// Finite and non-negative, or zero (a garbled gauge must not look like infinite load).
fn non_negative(x: f64) -> f64 {
    if x.is_finite() && x > 0.0 { x } else { 0.0 }
}

/// Rendezvous weight of `key` for `salt`: ties go to the endpoint with the
/// highest weight, so equal-load choices spread (a varying salt) or stay put
/// (a salt derived from the prompt) independently of slice order.
pub(crate) fn rendezvous(salt: u64, key: &str) -> u64 {
    mix64(stable_hash(key) ^ salt)
}

/// SplitMix64's finaliser: a cheap bijective scramble of 64 bits.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Index of the endpoint with the smallest `measure`; exact ties go to the
/// highest rendezvous weight for `salt`. Non-finite measures count as
/// infinitely loaded. `endpoints` must not be empty.
pub(crate) fn least_by(
    endpoints: &[EndpointView<'_>],
    salt: u64,
    mut measure: impl FnMut(usize, &EndpointView<'_>) -> f64,
) -> usize {
    let mut best = 0;
    let mut best_m = f64::INFINITY;
    let mut best_w = 0;
    for (i, ep) in endpoints.iter().enumerate() {
        let mut m = measure(i, ep);
        if !m.is_finite() {
            m = f64::INFINITY;
        }
        if i == 0 || m < best_m {
            best = i;
            best_m = m;
            best_w = rendezvous(salt, ep.key);
        } else if m == best_m {
            let w = rendezvous(salt, ep.key);
            if w > best_w {
                best = i;
                best_w = w;
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::EngineGauges;

    #[test]
    fn request_load_adds_only_other_clients_engine_load() {
        let mut l = EndpointLoad {
            in_flight: 3,
            ..Default::default()
        };
        assert_eq!(request_load(&l), 3.0);
        // At the scrape the proxy had 2 in flight and the engine held 7: 5 are
        // someone else's, on top of the proxy's 3 now.
        l.in_flight_at_scrape = 2;
        l.engine = Some(EngineGauges {
            running: 5.0,
            waiting: 2.0,
            ..Default::default()
        });
        assert_eq!(request_load(&l), 8.0);
        // Engine shows fewer than the proxy had sent (some not arrived yet):
        // the proxy's own count stands, nothing negative is added.
        l.in_flight_at_scrape = 9;
        assert_eq!(request_load(&l), 3.0);
        // Requests sent since the scrape count even though the gauge is old.
        l.in_flight = 10;
        assert_eq!(request_load(&l), 10.0);
        l.in_flight_at_scrape = 0;
        l.engine = Some(EngineGauges {
            running: f64::NAN,
            waiting: -1.0,
            ..Default::default()
        });
        assert_eq!(request_load(&l), 10.0);
    }

    #[test]
    fn kv_load_counts_in_flight_tokens_when_capacity_is_known() {
        let mut l = EndpointLoad {
            in_flight_tokens: 1600,
            ..Default::default()
        };
        assert_eq!(kv_load(&l, 16), None);
        l.engine = Some(EngineGauges {
            kv_usage: 0.5,
            ..Default::default()
        });
        assert_eq!(kv_load(&l, 16), Some(0.5));
        l.engine = Some(EngineGauges {
            kv_usage: 0.5,
            num_gpu_blocks: Some(1000),
            ..Default::default()
        });
        assert_eq!(kv_load(&l, 16), Some(0.6));
    }

    #[test]
    fn ties_spread_with_the_salt() {
        let keys = ["a:1", "b:1", "c:1", "d:1"];
        let eps: Vec<_> = keys
            .iter()
            .map(|k| EndpointView {
                key: k,
                load: EndpointLoad::default(),
            })
            .collect();
        let mut seen = [0; 4];
        for salt in 0..400 {
            seen[least_by(&eps, salt, |_, _| 1.0)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
        assert_eq!(least_by(&eps, 7, |i, _| if i == 2 { 0.5 } else { 1.0 }), 2);
        assert_eq!(
            least_by(&eps, 7, |i, _| if i == 2 { 0.5 } else { f64::NAN }),
            2
        );
    }
}
