//! Passive outlier detection for one endpoint: failures attributed to it in
//! a row eject it for a while, doubling on repeat offences, and one success
//! clears the count.
//!
//! Which failures count is decided by the caller (see
//! [`crate::forward`]): a request that failed on every replica it tried is
//! treated as that request's fault and attributes nothing, so a poison
//! request cannot eject a healthy pool. The pool also caps how much of
//! itself may be ejected at once.

use std::time::{Duration, Instant};

use crate::config::EjectionConfig;

/// Ejection state of one endpoint.
#[derive(Debug, Default, Clone)]
pub struct Outlier {
    consecutive: u32,
    ejected_until: Option<Instant>,
    /// Ejections in a row without a healthy period in between (drives the backoff).
    strikes: u32,
}

impl Outlier {
    /// Whether the endpoint is ejected at `now`.
    pub fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|t| now < t)
    }

    /// Records a failure attributed to the endpoint. Ejects it when the
    /// threshold is reached and `may_eject` (the pool's cap allows it);
    /// returns whether this call ejected it.
    pub fn record_failure(&mut self, now: Instant, cfg: &EjectionConfig, may_eject: bool) -> bool {
        if cfg.consecutive_failures == 0 || self.is_ejected(now) {
            return false;
        }
        self.consecutive = self.consecutive.saturating_add(1);
        if self.consecutive < cfg.consecutive_failures || !may_eject {
            return false;
        }
        let factor = 1u64 << self.strikes.min(16);
        let ms = cfg
            .base_ejection_ms
            .saturating_mul(factor)
            .min(cfg.max_ejection_ms);
        self.ejected_until = Some(now + Duration::from_millis(ms));
        self.strikes = self.strikes.saturating_add(1);
        self.consecutive = 0;
        true
    }

    /// Records a success: the failure run ends, and a replica that served
    /// after its ejection expired is forgiven its strikes.
    pub fn record_success(&mut self, now: Instant) {
        self.consecutive = 0;
        if self.ejected_until.is_some_and(|t| now >= t) {
            self.ejected_until = None;
            self.strikes = 0;
        }
    }

    /// Failures in the current run.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive
    }
}

/// Whether one more ejection keeps the pool within `max_percent` ejected
/// (at least one endpoint always stays in).
pub fn may_eject(ejected: usize, total: usize, max_percent: u32) -> bool {
    if total <= 1 {
        return false;
    }
    let allowed = (total * max_percent as usize / 100).min(total - 1);
    ejected < allowed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> EjectionConfig {
        EjectionConfig {
            consecutive_failures: 3,
            base_ejection_ms: 1_000,
            max_ejection_ms: 3_000,
            max_ejection_percent: 50,
        }
    }

    #[test]
    fn ejects_after_a_run_and_backs_off() {
        let t0 = Instant::now();
        let mut o = Outlier::default();
        assert!(!o.record_failure(t0, &cfg(), true));
        assert!(!o.record_failure(t0, &cfg(), true));
        assert!(o.record_failure(t0, &cfg(), true));
        assert!(o.is_ejected(t0 + Duration::from_millis(999)));
        assert!(!o.is_ejected(t0 + Duration::from_millis(1_000)));
        // Fails again right after coming back: twice as long.
        let t1 = t0 + Duration::from_millis(1_000);
        for _ in 0..3 {
            o.record_failure(t1, &cfg(), true);
        }
        assert!(o.is_ejected(t1 + Duration::from_millis(1_999)));
        // Third time is capped at max_ejection_ms.
        let t2 = t1 + Duration::from_millis(2_000);
        for _ in 0..3 {
            o.record_failure(t2, &cfg(), true);
        }
        assert!(!o.is_ejected(t2 + Duration::from_millis(3_000)));
    }

    #[test]
    fn success_resets_the_run() {
        let t = Instant::now();
        let mut o = Outlier::default();
        o.record_failure(t, &cfg(), true);
        o.record_failure(t, &cfg(), true);
        o.record_success(t);
        assert!(!o.record_failure(t, &cfg(), true));
        assert_eq!(o.consecutive_failures(), 1);
    }

    #[test]
    fn pool_cap_keeps_replicas_in() {
        assert!(!may_eject(0, 1, 100), "a lone replica is never ejected");
        assert!(may_eject(0, 2, 50));
        assert!(!may_eject(1, 2, 50));
        assert!(!may_eject(1, 2, 100), "one always stays");
        assert!(!may_eject(0, 3, 10));
        let t = Instant::now();
        let mut o = Outlier::default();
        for _ in 0..5 {
            assert!(!o.record_failure(t, &cfg(), false));
        }
        assert!(!o.is_ejected(t));
    }
}
