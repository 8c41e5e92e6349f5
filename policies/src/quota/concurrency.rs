//! Concurrent-request slots for one tenant.
//!
//! Pure counting: the proxy acquires a slot at admission and releases it
//! exactly once when the request ends however it ends. `release` saturates
//! instead of underflowing, and [`Concurrency::in_use`] is exported as a
//! metric so that a leak shows up as a number that never returns to zero.

/// A tenant's concurrency counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Concurrency {
    limit: Option<u32>,
    in_use: u32,
}

impl Concurrency {
    /// A counter allowing `limit` concurrent requests (`None`: unlimited, still counted).
    pub fn new(limit: Option<u32>) -> Self {
        Concurrency { limit, in_use: 0 }
    }

    /// Takes a slot if one is free.
    pub fn try_acquire(&mut self) -> bool {
        if self.limit.is_some_and(|l| self.in_use >= l) {
            return false;
        }
        self.in_use = self.in_use.saturating_add(1);
        true
    }

    /// Returns a slot.
    pub fn release(&mut self) {
        self.in_use = self.in_use.saturating_sub(1);
    }

    /// Slots held.
    pub fn in_use(&self) -> u32 {
        self.in_use
    }

    /// The limit, if any.
    pub fn limit(&self) -> Option<u32> {
        self.limit
    }

    /// Changes the limit (config reload); held slots stay held.
    pub fn set_limit(&mut self, limit: Option<u32>) {
        self.limit = limit;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_never_underflows() {
        let mut c = Concurrency::new(Some(2));
        assert!(c.try_acquire() && c.try_acquire());
        assert!(!c.try_acquire());
        c.release();
        assert!(c.try_acquire());
        c.release();
        c.release();
        c.release();
        assert_eq!(c.in_use(), 0);
        let mut u = Concurrency::new(None);
        for _ in 0..1000 {
            assert!(u.try_acquire());
        }
        assert_eq!(u.in_use(), 1000);
    }
}
