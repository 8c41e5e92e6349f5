//! Capacity planning without a GPU: replay a workload in virtual time
//! through the same engine model ([`sluice_enginesim`]), routing code
//! ([`sluice_policies::routing`]) and metrics ([`sluice_bench::metrics`]) as
//! the live path, thousands of times faster than real time.
//!
//! - [`replay`]: one deployment, one workload → per-request records
//!   identical in shape to `sluice bench`'s, lifecycle records, engine
//!   statistics and gauge timelines (`sluice simulate`).
//! - [`capacity`]: a sweep over GPUs, replica counts, KV sizes, request
//!   rates and policies that picks the cheapest deployment meeting the SLOs
//!   (`sluice capacity`).
//! - [`report`]: the lab report (question, environment, workload, metrics,
//!   results, explanation, conclusion, tuning suggestions).

pub mod admission;
pub mod capacity;
pub mod error;
pub mod outcome;
pub mod plot;
pub mod prepare;
pub mod replay;
pub mod report;
pub mod scenario;

pub use admission::{admission_spec, parse_admission};
pub use error::{LabError, Result};
pub use outcome::{Derived, LifecycleRecord, Outcome, ReplicaStats, Sample};
pub use prepare::{PreparedRequest, PreparedWorkload};
pub use replay::replay;
pub use scenario::{EngineKnobs, Scenario, Scheduler};
