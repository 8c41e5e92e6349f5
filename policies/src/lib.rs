//! Pure decisions for Sluice.
//!
//! Everything here is deterministic and free of I/O beyond reading a data file
//! the caller names: model and GPU descriptions, KV-cache capacity arithmetic,
//! token ids and prefix block hashes, and routing (classification, quotas and
//! admission as they land). Time is always an argument; nothing reads a clock.

pub mod admission;
pub mod capacity;
pub mod classify;
pub mod error;
pub mod experiment;
pub mod hardware;
pub mod prefix;
pub mod quota;
pub mod routing;
pub mod tokenizer;
pub mod tokens;

pub use error::PolicyError;
