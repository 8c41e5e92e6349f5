//! Per-tenant quota arithmetic: token budgets with reserve/settle,
//! concurrency slots, per-request caps, and the `x-ratelimit-*` values.
//!
//! The proxy holds one [`TenantQuota`] per tenant (behind a lock) and calls
//! [`TenantQuota::admit`] before admission control and [`TenantQuota::finish`]
//! exactly once when the request ends — normally, on error, or on client
//! disconnect — so that slots and reservations never leak. Request-rate
//! limiting is `governor`'s job in the proxy; [`gcra`] is the same algorithm
//! as a pure function, for the Redis backend's script-parity tests and for
//! computing the request headers' remaining/reset values.

mod caps;
mod concurrency;
pub mod gcra;
mod headers;
mod limits;
mod token_budget;

pub use caps::{CapCheck, CapViolation, OutputCapMode, RequestCaps};
pub use concurrency::Concurrency;
pub use headers::{RateLimitHeaders, format_reset, retry_after_secs};
pub use limits::{Denial, DenyReason, QuotaGrant, TenantLimits, TenantQuota};
pub use token_budget::{TokenBudget, TokenReservation};
