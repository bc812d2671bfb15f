//! The library's error type. Every variant names the file (and where it helps the tensor, field
//! or line) so that the CLI can print one line a user can act on.

use std::path::PathBuf;

/// Anything that can go wrong while reading a model, its tokenizer or a dataset.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// `config.json` is missing a field, has a wrong value, or describes an unsupported model.
    #[error("{path}: {message}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong and, where possible, what to change.
        message: String,
    },
    /// A weights file is truncated or corrupt, or a tensor is missing or misshapen.
    #[error("{path}: {message}")]
    Checkpoint {
        /// The weights file (or checkpoint directory when no file could be named).
        path: PathBuf,
        /// What is wrong, naming the tensor where there is one.
        message: String,
    },
    /// The tokenizer or chat template could not be loaded or used.
    #[error("{path}: {message}")]
    Tokenizer {
        /// The tokenizer or template file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A dataset row is not usable.
    #[error("{path}:{line}: {message}")]
    Dataset {
        /// The dataset file.
        path: PathBuf,
        /// 1-based line number of the row.
        line: usize,
        /// What is wrong with the row.
        message: String,
    },
    /// A command-line option, or a combination of them, that cannot work.
    #[error("{0}")]
    Usage(String),
    /// Training cannot go on (for example, the loss diverged).
    #[error("{0}")]
    Training(String),
    /// The device asked for is not usable here (no driver, index out of range, not built in).
    #[error("{0}")]
    Device(String),
    /// The group of workers or nodes could not be formed or kept (a refused token, a lost
    /// node, a failed worker).
    #[error("{0}")]
    Cluster(String),
    /// A node was lost or a worker failed; the group can be formed again (`--max-restarts`).
    #[error("{0}")]
    GroupBroken(String),
    /// The user pressed Ctrl-C; the operation stopped and cleaned up.
    #[error("interrupted")]
    Interrupted,
    /// A dataset as a whole is not usable (for example, it has no rows).
    #[error("{path}: {message}")]
    DatasetFile {
        /// The dataset file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// Shorthand for results in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
