//! Load generator, workloads, A/B harness and reports.
//!
//! Talks to the proxy and the simulated replicas only over HTTP; starts them
//! as child processes of the running `sluice` executable when an experiment
//! needs a fleet.

pub mod ab;
pub mod arms;
pub mod cli;
pub mod error;
pub mod fleet;
pub mod loadgen;
pub mod metrics;
pub mod report;
pub mod scrape;
pub mod stats;
pub mod workload;

pub use error::{BenchError, Result};
