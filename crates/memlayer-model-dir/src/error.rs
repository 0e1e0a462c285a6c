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
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A text file is not valid UTF-8.
    #[error("{} is not valid UTF-8 (first invalid byte at offset {offset})", path.display())]
    NotUtf8 { path: PathBuf, offset: usize },
    /// A file was read but its content is not what it should be.
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
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
    pub fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    pub fn parse(path: &Path, message: impl Into<String>) -> Self {
        Self::Parse {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

/// Result of this crate.
pub type Result<T, E = ModelDirError> = std::result::Result<T, E>;
