//! The load generator: sends a workload to an OpenAI-compatible URL and records every request.

pub mod client;
pub mod output;
pub mod record;
pub mod run;
pub mod sse;

pub use client::ApiClient;
pub use record::RequestRecord;
pub use run::{LoadConfig, LoadMode, LoadOutput, run_load};
