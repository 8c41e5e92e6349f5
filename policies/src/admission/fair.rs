//! Virtual token counters: weighted fair sharing of a pool between tenants.
//!
//! The Virtual Token Counter of Sheng et al., "Fairness in Serving Large
//! Language Models" (OSDI 2024): each tenant's counter grows by the tokens it
//! is served, divided by its weight, with output tokens costing more than
//! prompt tokens (they take a decode step each); the queue serves the
//! backlogged tenant with the smallest counter. A tenant that was idle is
//! lifted to the smallest backlogged counter when it returns, so idleness
//! banks no credit. Counters are kept for at most [`MAX_TENANTS`] tenants.

use std::collections::HashMap;

use foldhash::fast::FixedState;

/// Most tenants with a remembered counter (the idle one with the lowest counter goes first).
pub const MAX_TENANTS: usize = 4096;

/// Per-tenant virtual counters.
#[derive(Debug, Clone)]
pub struct VirtualCounters {
    output_cost: f64,
    // foldhash: looked up once per backlogged tenant on every pick.
    counters: HashMap<String, f64, FixedState>,
    /// Counter of the tenant served last; an arrival to an empty queue is lifted to it.
    last_served: f64,
}

impl VirtualCounters {
    /// Counters where one output token costs `output_cost` prompt tokens.
    pub fn new(output_cost: f64) -> Self {
        VirtualCounters {
            output_cost,
            counters: HashMap::with_hasher(FixedState::with_seed(0)),
            last_served: 0.0,
        }
    }

    /// The tenant's counter (0 when unknown).
    pub fn get(&self, tenant: &str) -> f64 {
        self.counters.get(tenant).copied().unwrap_or(0.0)
    }

    /// A tenant becomes backlogged; `min_backlogged` is the smallest counter
    /// among the tenants already waiting (`None`: the queue was empty).
    pub fn on_backlogged(
        &mut self,
        tenant: &str,
        min_backlogged: Option<f64>,
        is_backlogged: impl Fn(&str) -> bool,
    ) {
        let floor = min_backlogged.unwrap_or(self.last_served);
        if let Some(c) = self.counters.get_mut(tenant) {
            *c = c.max(floor);
            return;
        }
        if self.counters.len() >= MAX_TENANTS {
            let victim = self
                .counters
                .iter()
                .filter(|(t, _)| !is_backlogged(t))
                .min_by(|a, b| a.1.total_cmp(b.1).then_with(|| a.0.cmp(b.0)))
                .map(|(t, _)| t.clone());
            if let Some(v) = victim {
                self.counters.remove(&v);
            }
        }
        self.counters.insert(tenant.to_string(), floor);
    }

    /// Charges a dispatched request: prompt tokens + `output_cost` × expected output, over `weight`.
    pub fn charge(&mut self, tenant: &str, prompt_tokens: u32, output_tokens: u32, weight: f64) {
        let cost = f64::from(prompt_tokens) + self.output_cost * f64::from(output_tokens);
        let c = self
            .counters
            .entry(tenant.to_string())
            .or_insert(self.last_served);
        *c += cost / weight_or_one(weight);
        self.last_served = *c;
    }

    /// Corrects a charge once the actual output is known.
    pub fn settle(&mut self, tenant: &str, expected_output: u32, actual_output: u32, weight: f64) {
        if let Some(c) = self.counters.get_mut(tenant) {
            let delta = f64::from(actual_output) - f64::from(expected_output);
            *c = (*c + self.output_cost * delta / weight_or_one(weight)).max(0.0);
        }
    }

    /// Tenants remembered.
    pub fn len(&self) -> usize {
        self.counters.len()
    }

    /// Whether no tenant is remembered.
    pub fn is_empty(&self) -> bool {
        self.counters.is_empty()
    }
}

/// A usable weight: positive and finite, else 1.
pub(crate) fn weight_or_one(w: f64) -> f64 {
    if w.is_finite() && w > 0.0 { w } else { 1.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_and_output_cost() {
        let mut v = VirtualCounters::new(2.0);
        v.on_backlogged("a", None, |_| false);
        v.on_backlogged("b", Some(0.0), |_| true);
        v.charge("a", 100, 50, 2.0);
        v.charge("b", 100, 50, 1.0);
        assert_eq!(v.get("a"), 100.0);
        assert_eq!(v.get("b"), 200.0);
        v.settle("b", 50, 0, 1.0);
        assert_eq!(v.get("b"), 100.0);
    }

    #[test]
    fn idle_tenants_bank_no_credit() {
        let mut v = VirtualCounters::new(1.0);
        v.on_backlogged("busy", None, |_| false);
        v.charge("busy", 10_000, 0, 1.0);
        // "late" arrives while busy is backlogged: lifted to busy's counter.
        v.on_backlogged("late", Some(v.get("busy")), |_| true);
        assert_eq!(v.get("late"), 10_000.0);
    }
}
