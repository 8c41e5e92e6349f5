//! Workloads: the JSONL format, synthetic generation, trace importers and inspection.

pub mod arrival;
pub mod dist;
pub mod import;
pub mod inspect;
pub mod request;
pub mod synth;
pub mod text;

pub use request::{Content, Message, Segment, WorkloadRequest, read_workload, write_workload};
