//! The error of the model-directory crate.

use crate::bank_fit::BankFitError;
use crate::manifest::ManifestError;
use memlayer_core::error::OracleError;
use std::path::{Path, PathBuf};

/// Errors of reading and writing a model directory and its data files
/// (tokenizer, retriever, context index). Every file error names its path.
#[derive(Debug, thiserror::Error)]
pub enum ModelDirError {
    /// A file could not be read, written or renamed.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        /// The operation that failed, as a verb (`"read"`, `"create"`, `"rename into"`, …).
        op: &'static str,
        /// The file the operation was applied to.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A text file is not valid UTF-8.
    #[error("{} is not valid UTF-8 (first invalid byte at offset {offset})", path.display())]
    NotUtf8 {
        /// The file that was read.
        path: PathBuf,
        /// Byte offset of the first invalid byte.
        offset: usize,
    },
    /// A file was read but its content is not what it should be.
    #[error("{}: {message}", path.display())]
    Parse {
        /// The file whose content is wrong.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The tokenizer library failed (training, encoding or decoding).
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A configuration or argument is out of its domain.
    #[error("invalid config: {0}")]
    Config(String),
    /// An error of the memlayer-core oracle (cluster tree, parameters).
    #[error(transparent)]
    Oracle(#[from] OracleError),
    /// A file of the directory is not what `checksums.json` records, or the
    /// checksums are missing.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The bank's sections do not fit the config.
    #[error(transparent)]
    BankFit(#[from] BankFitError),
    /// The bank's bytes are invalid.
    #[error(transparent)]
    Bank(#[from] memlayer_bank::BankError),
    /// Anything else, with its reason.
    #[error("{0}")]
    Other(String),
}

impl ModelDirError {
    /// A [`ModelDirError::Io`] error: `op` (a verb such as `"read"`) failed
    /// on `path` with `source`.
    pub fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    /// A [`ModelDirError::Parse`] error: the content of `path` is wrong, for
    /// the reason `message`.
    pub fn parse(path: &Path, message: impl Into<String>) -> Self {
        Self::Parse {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

/// Result of this crate.
pub type Result<T, E = ModelDirError> = std::result::Result<T, E>;
