//! The Sluice proxy service on Pingora.
//!
//! An OpenAI-compatible reverse proxy in front of pools of LLM engine
//! replicas. Decisions (classification, routing) come from
//! `sluice-policies`; this crate turns HTTP into calls on them and results
//! back into HTTP: listeners ([`server`]), the request path ([`api`],
//! [`forward`]), replica state ([`pool`], [`endpoint`]), configuration
//! ([`config`]), metrics and the lifecycle log.

#![forbid(unsafe_code)]

pub mod admin;
pub mod admission;
pub mod api;
pub mod arms;
pub mod body;
pub mod client_stream;
pub mod config;
pub mod config_tenants;
pub mod config_watch;
pub mod endpoint;
pub mod error;
pub mod forward;
pub mod lifecycle;
pub mod metrics;
pub mod outlier;
pub mod pool;
pub mod probe;
pub mod quota;
pub mod redis_quota;
pub mod scrape;
pub mod server;
pub mod sse;
pub mod state;
pub mod tenancy;
pub mod tenant;
pub mod upstream_pool;
pub mod usage;

pub use config::Config;
pub use error::ProxyError;
pub use server::{CheckArgs, RunningProxy, ServeArgs, check, serve};
