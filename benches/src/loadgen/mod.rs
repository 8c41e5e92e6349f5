//! The load generator: sends a workload to an OpenAI-compatible URL and records every request.

pub mod record;
pub mod sse;
