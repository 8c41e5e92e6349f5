//! The one error type of `sluice-lab`.

use std::path::{Path, PathBuf};

/// Everything that can go wrong while preparing, running or reporting an experiment.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A model or GPU description did not load, or a routing option is unknown.
    #[error(transparent)]
    Policy(#[from] sluice_policies::PolicyError),
    /// The engine model refused its configuration.
    #[error(transparent)]
    Engine(#[from] sluice_enginesim::SimError),
    /// The workload file could not be read.
    #[error(transparent)]
    Workload(#[from] sluice_bench::BenchError),
    /// A command-line value or experiment setting makes no sense.
    #[error("{0}")]
    Invalid(String),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Drawing a plot failed.
    #[error("plot {path}: {message}")]
    Plot {
        /// The SVG file.
        path: PathBuf,
        /// What the plotting library said.
        message: String,
    },
}

impl LabError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        LabError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// A bad setting, with its explanation.
    pub fn invalid(message: impl Into<String>) -> Self {
        LabError::Invalid(message.into())
    }
}

/// `Result` with [`LabError`].
pub type Result<T, E = LabError> = std::result::Result<T, E>;
