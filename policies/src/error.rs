//! The one error type of `sluice-policies`.

use std::path::PathBuf;

/// Everything that can go wrong while loading data or validating a decision input.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A data file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file that was asked for.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A TOML document did not parse or did not match the expected shape.
    #[error("{origin}: {message}")]
    Parse {
        /// File path, or `built-in <name>` for compiled-in data.
        origin: String,
        /// The parser's message, which names the key and the line.
        message: String,
    },
    /// A value parsed but makes no sense (zero layers, negative memory, ...).
    #[error("{origin}: invalid `{key}`: {message}")]
    Invalid {
        /// File path, or `built-in <name>`.
        origin: String,
        /// The offending key.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// A name that is neither built in nor a readable file.
    #[error("unknown {kind} `{name}` (known: {known})")]
    Unknown {
        /// "model" or "gpu".
        kind: &'static str,
        /// What the user asked for.
        name: String,
        /// Comma-separated list of the built-in names.
        known: String,
    },
}
