//! Load generator, workloads, A/B harness and reports.
