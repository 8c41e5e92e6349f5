//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong in workloads, load runs, experiments and reports.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file's content is malformed; `line` is 1-based when known.
    #[error("{path}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The line, when the format is line-oriented.
        line: Option<usize>,
        /// What is wrong.
        message: String,
    },
    /// A specification (workload, experiment, CLI flags) is inconsistent.
    #[error("invalid {what}: {message}")]
    Invalid {
        /// Which specification.
        what: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A child process (`sluice sim`, `sluice serve`) failed to start or died.
    #[error("{name}: {message}")]
    Child {
        /// The child's role, e.g. `sim-0`.
        name: String,
        /// What happened.
        message: String,
    },
    /// An HTTP exchange with a target failed.
    #[error("http: {0}")]
    Http(String),
    /// Encoding or decoding JSON failed.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// Drawing a plot failed.
    #[error("plot: {0}")]
    Plot(String),
    /// The run was interrupted (Ctrl-C) before it could finish.
    #[error("interrupted")]
    Interrupted,
}

impl BenchError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        BenchError::Io {
            path: path.into(),
            source,
        }
    }

    /// An invalid-specification error.
    pub fn invalid(what: &'static str, message: impl Into<String>) -> Self {
        BenchError::Invalid {
            what,
            message: message.into(),
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = BenchError> = std::result::Result<T, E>;
