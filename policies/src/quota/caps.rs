//! Per-request caps: longest prompt, largest `max_tokens`, longest context.
//!
//! Checked before anything is reserved, because a request over a cap will
//! never fit however long the client waits.

use serde::{Deserialize, Serialize};

/// What to do with a `max_tokens` above the tenant's cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputCapMode {
    /// Refuse the request.
    #[default]
    Reject,
    /// Lower `max_tokens` to the cap and forward it.
    Clamp,
}

/// A tenant's per-request caps (all optional; built from [`super::TenantLimits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RequestCaps {
    /// Most prompt tokens one request may carry.
    pub max_prompt_tokens: Option<u32>,
    /// Largest `max_tokens` one request may ask for.
    pub max_output_tokens: Option<u32>,
    /// Most prompt + output tokens one request may span.
    pub max_context_tokens: Option<u32>,
    /// Reject or clamp an over-cap `max_tokens` (also used for the context cap).
    pub on_output_over_cap: OutputCapMode,
}

/// Outcome of a cap check that passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapCheck {
    /// The `max_tokens` to forward (lowered when clamped).
    pub max_tokens: u32,
    /// Whether `max_tokens` was lowered.
    pub clamped: bool,
}

/// Which cap a request broke, with the limit and the request's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapViolation {
    /// Prompt longer than `max_prompt_tokens`.
    Prompt {
        /// The cap.
        limit: u32,
        /// The request's prompt tokens.
        actual: u32,
    },
    /// `max_tokens` above `max_output_tokens` in reject mode.
    Output {
        /// The cap.
        limit: u32,
        /// The requested `max_tokens`.
        actual: u32,
    },
    /// Prompt + `max_tokens` above `max_context_tokens` (in reject mode, or prompt alone too long).
    Context {
        /// The cap.
        limit: u32,
        /// Prompt + requested output.
        actual: u64,
    },
}

impl RequestCaps {
    /// Checks `prompt_tokens` and the requested `max_tokens` against the caps.
    pub fn check(&self, prompt_tokens: u32, max_tokens: u32) -> Result<CapCheck, CapViolation> {
        if let Some(limit) = self.max_prompt_tokens
            && prompt_tokens > limit
        {
            return Err(CapViolation::Prompt {
                limit,
                actual: prompt_tokens,
            });
        }
        let clamp = self.on_output_over_cap == OutputCapMode::Clamp;
        let mut out = max_tokens;
        if let Some(limit) = self.max_output_tokens
            && out > limit
        {
            if !clamp {
                return Err(CapViolation::Output { limit, actual: out });
            }
            out = limit;
        }
        if let Some(limit) = self.max_context_tokens {
            let total = u64::from(prompt_tokens) + u64::from(out);
            if total > u64::from(limit) {
                let room = limit.saturating_sub(prompt_tokens);
                // Clamping to zero output would forward a useless request.
                if !clamp || room == 0 {
                    return Err(CapViolation::Context {
                        limit,
                        actual: total,
                    });
                }
                out = room;
            }
        }
        Ok(CapCheck {
            max_tokens: out,
            clamped: out != max_tokens,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reject_and_clamp() {
        let mut caps = RequestCaps {
            max_prompt_tokens: Some(1000),
            max_output_tokens: Some(200),
            max_context_tokens: Some(1100),
            on_output_over_cap: OutputCapMode::Reject,
        };
        assert_eq!(
            caps.check(500, 100),
            Ok(CapCheck {
                max_tokens: 100,
                clamped: false
            })
        );
        assert!(matches!(
            caps.check(1001, 1),
            Err(CapViolation::Prompt {
                limit: 1000,
                actual: 1001
            })
        ));
        assert!(matches!(
            caps.check(10, 300),
            Err(CapViolation::Output { .. })
        ));
        assert!(matches!(
            caps.check(1000, 150),
            Err(CapViolation::Context { actual: 1150, .. })
        ));
        caps.on_output_over_cap = OutputCapMode::Clamp;
        assert_eq!(caps.check(10, 300).unwrap().max_tokens, 200);
        let c = caps.check(1000, 150).unwrap();
        assert_eq!((c.max_tokens, c.clamped), (100, true));
        caps.max_prompt_tokens = None;
        assert!(caps.check(1100, 10).is_err(), "no room left for output");
        assert_eq!(
            RequestCaps::default()
                .check(u32::MAX, u32::MAX)
                .unwrap()
                .max_tokens,
            u32::MAX
        );
    }
}
