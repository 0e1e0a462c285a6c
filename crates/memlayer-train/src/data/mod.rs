//! Training data: where token sequences come from (DESIGN §2, §5).
//!
//! ```text
//! facts::FactsDataset::generate ─┐                      (synthetic long-tail facts + eval set)
//! corpus::load_contexts ─────────┴─► Vec<Context> ─► tokenizer::train_bpe / Tokenizer::encode
//!                                        │
//!                                        └─► retriever::TfIdfRetriever::embed ─► ClusterTree::build
//!                                                                                    │
//!            packing::pack_clustered (one cluster path per sequence) ◄───────────────┘
//!            packing::pack_plain     (dense / PKM models)
//!                 └─► PackedSequences::batch_at(seed, step, batch) — a pure function of the step
//! ```
//!
//! A [`Context`] is the unit the hierarchical memory's retriever sees: one
//! document (a few sentences about entities of one topic, or a few paragraphs
//! of a text file). Everything random is drawn from
//! [`memlayer_core::rng::Rng`], so a seed gives the same data on every
//! platform.

pub mod context_index;
pub mod corpus;
pub mod facts;
pub mod packing;
pub mod retriever;
pub mod tokenizer;

use std::io::Write;
use std::path::{Path, PathBuf};

use memlayer_core::error::OracleError;
use serde::{Deserialize, Serialize};

pub use corpus::{CorpusConfig, contexts_from_text, load_contexts, load_text};
pub use facts::{BucketSpec, Entity, FactQuery, FactsConfig, FactsDataset};
pub use packing::{BatchIter, PackedSequences, pack_clustered, pack_plain, pack_with_tree};
pub use retriever::TfIdfRetriever;
pub use tokenizer::{DEFAULT_SPECIAL_TOKENS, EOS_TOKEN, PAD_TOKEN, Tokenizer, train_bpe};

/// One training document: the unit that is retrieved, clustered and packed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Context {
    /// The document text (UTF-8, no blank lines inside facts contexts).
    pub text: String,
    /// Topic of a synthetic facts context; `None` for real text.
    pub topic: Option<u32>,
    /// Entities mentioned, in order of first mention (facts only; empty for
    /// real text).
    pub entity_ids: Vec<u32>,
}

/// Errors of the data pipeline. Every file error names its path.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
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
    /// An error of the memlayer-core oracle (cluster tree).
    #[error(transparent)]
    Oracle(#[from] OracleError),
}

impl DataError {
    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn parse(path: &Path, message: impl Into<String>) -> Self {
        Self::Parse {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

/// Result of the data pipeline.
pub type Result<T, E = DataError> = std::result::Result<T, E>;

/// Writes `bytes` to `path` atomically: a temporary file in the same
/// directory, flushed and synced, then renamed over `path`. A reader never
/// sees a half-written file; on error the temporary file is removed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| DataError::Config(format!("{} is not a file path", path.display())))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| DataError::io("create", &tmp, e))?;
        f.write_all(bytes)
            .map_err(|e| DataError::io("write", &tmp, e))?;
        f.sync_all().map_err(|e| DataError::io("sync", &tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| DataError::io("rename into", path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Reads a whole file as UTF-8; errors name the path (missing file, not
/// UTF-8 with the offset of the first bad byte).
pub fn read_utf8(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io("read", path, e))?;
    String::from_utf8(bytes).map_err(|e| DataError::NotUtf8 {
        path: path.to_path_buf(),
        offset: e.utf8_error().valid_up_to(),
    })
}

/// A fresh, empty directory under the system temp dir for tests.
#[cfg(test)]
pub(crate) fn test_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "memlayer-train-{name}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create test dir");
    dir
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp_file() {
        let dir = test_dir("atomic");
        let p = dir.join("out.txt");
        write_atomic(&p, b"first").unwrap();
        write_atomic(&p, "second ✓".as_bytes()).unwrap();
        assert_eq!(read_utf8(&p).unwrap(), "second ✓");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        // a directory that does not exist is a named error
        let bad = dir.join("missing").join("x.txt");
        let err = write_atomic(&bad, b"x").unwrap_err().to_string();
        assert!(err.contains("missing"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn read_errors_name_the_path() {
        let dir = test_dir("read");
        let missing = dir.join("nope.txt");
        let err = read_utf8(&missing).unwrap_err().to_string();
        assert!(err.contains("nope.txt"), "{err}");
        let bad = dir.join("latin1.txt");
        std::fs::write(&bad, b"caf\xe9 au lait").unwrap();
        let err = read_utf8(&bad).unwrap_err();
        assert!(matches!(err, DataError::NotUtf8 { offset: 3, .. }), "{err}");
        assert!(err.to_string().contains("latin1.txt"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
