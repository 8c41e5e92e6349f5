//! Tokens-per-minute budget with reserve/settle.
//!
//! A token bucket holding at most one minute's worth of tokens, refilled
//! continuously. Admission reserves the most a request can cost (prompt +
//! `max_tokens`); when the response ends the reservation is settled against
//! the actual usage, giving back what was not used or charging what was used
//! beyond it (a real tokenizer may count more than the estimate). A budget
//! can go into debt by at most one minute's worth, which later requests wait
//! out. The same arithmetic runs in the Redis backend's script; the state is
//! two numbers (`level`, `updated_ms`) so the two can be compared.

/// A reservation to hand back to [`TokenBudget::settle`] exactly once.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a reservation must be settled, or its tokens stay charged"]
pub struct TokenReservation {
    tokens: u64,
}

impl TokenReservation {
    /// Tokens reserved.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }
}

/// One tenant's token bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBudget {
    per_minute: u64,
    level: f64,
    updated_ms: u64,
}

/// Why a reservation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenShortfall {
    /// Not enough tokens now; enough in this many milliseconds.
    Wait {
        /// Milliseconds until the reservation would fit.
        retry_after_ms: u64,
    },
    /// More than a whole minute's budget: it will never fit.
    TooLarge,
}

impl TokenBudget {
    /// A full budget of `per_minute` tokens (at least 1) as of `now_ms`.
    pub fn new(per_minute: u64, now_ms: u64) -> Self {
        let per_minute = per_minute.max(1);
        TokenBudget {
            per_minute,
            level: per_minute as f64,
            updated_ms: now_ms,
        }
    }

    /// Tokens per minute.
    pub fn per_minute(&self) -> u64 {
        self.per_minute
    }

    fn rate_per_ms(&self) -> f64 {
        self.per_minute as f64 / 60_000.0
    }

    /// The level at `now_ms` (time never runs backwards here).
    fn level_at(&self, now_ms: u64) -> f64 {
        let elapsed = now_ms.saturating_sub(self.updated_ms) as f64;
        (self.level + elapsed * self.rate_per_ms()).min(self.per_minute as f64)
    }

    fn advance(&mut self, now_ms: u64) {
        self.level = self.level_at(now_ms);
        self.updated_ms = self.updated_ms.max(now_ms);
    }

    /// Reserves `tokens`, or says when they would fit.
    pub fn try_reserve(
        &mut self,
        tokens: u64,
        now_ms: u64,
    ) -> Result<TokenReservation, TokenShortfall> {
        if tokens > self.per_minute {
            return Err(TokenShortfall::TooLarge);
        }
        self.advance(now_ms);
        let need = tokens as f64;
        if self.level >= need {
            self.level -= need;
            return Ok(TokenReservation { tokens });
        }
        let retry_after_ms = ((need - self.level) / self.rate_per_ms()).ceil().max(1.0) as u64;
        Err(TokenShortfall::Wait { retry_after_ms })
    }

    /// Settles a reservation against the tokens actually used.
    pub fn settle(&mut self, reservation: TokenReservation, actual: u64, now_ms: u64) {
        self.advance(now_ms);
        let cap = self.per_minute as f64;
        self.level = (self.level + reservation.tokens as f64 - actual as f64).clamp(-cap, cap);
    }

    /// Whole tokens available at `now_ms` (for `x-ratelimit-remaining-tokens`).
    pub fn remaining(&self, now_ms: u64) -> u64 {
        self.level_at(now_ms).max(0.0).floor() as u64
    }

    /// Milliseconds until the budget is full again (for `x-ratelimit-reset-tokens`).
    pub fn reset_ms(&self, now_ms: u64) -> u64 {
        let missing = self.per_minute as f64 - self.level_at(now_ms);
        (missing / self.rate_per_ms()).ceil().max(0.0) as u64
    }

    /// Changes the rate (config reload), keeping the level within the new cap.
    pub fn set_per_minute(&mut self, per_minute: u64, now_ms: u64) {
        self.advance(now_ms);
        self.per_minute = per_minute.max(1);
        self.level = self.level.min(self.per_minute as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reserve_settle_and_refill() {
        let mut b = TokenBudget::new(6000, 0); // 100 tokens/s
        let r = b.try_reserve(5000, 0).unwrap();
        assert_eq!(b.remaining(0), 1000);
        assert_eq!(
            b.try_reserve(2000, 0),
            Err(TokenShortfall::Wait {
                retry_after_ms: 10_000
            })
        );
        // Used only 3000 of 5000: 2000 come back.
        b.settle(r, 3000, 0);
        assert_eq!(b.remaining(0), 3000);
        assert_eq!(b.remaining(10_000), 4000);
        assert_eq!(b.reset_ms(10_000), 20_000);
        assert_eq!(b.try_reserve(6001, 0), Err(TokenShortfall::TooLarge));
        // Charged more than reserved: debt, bounded by a minute's budget.
        let r = b.try_reserve(10, 10_000).unwrap();
        b.settle(r, 1_000_000, 10_000);
        assert_eq!(b.remaining(10_000), 0);
        assert_eq!(b.reset_ms(10_000), 120_000);
        assert_eq!(b.remaining(200_000), 6000);
    }

    proptest! {
        #[test]
        fn unused_reservations_come_back_in_full(
            ops in proptest::collection::vec((1u64..3000, 0u64..5000), 1..50),
        ) {
            let mut b = TokenBudget::new(10_000, 0);
            let mut held = Vec::new();
            for (tokens, _) in &ops {
                if let Ok(r) = b.try_reserve(*tokens, 0) {
                    held.push(r);
                }
                prop_assert!(b.remaining(0) <= 10_000);
            }
            let used: u64 = held.iter().map(|r| r.tokens() / 2).sum();
            for r in held {
                let t = r.tokens();
                b.settle(r, t / 2, 0);
            }
            // Only what was used stays charged.
            prop_assert_eq!(b.remaining(0), 10_000 - used);
        }
    }
}
