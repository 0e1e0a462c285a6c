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

pub mod corpus;
pub mod facts;
pub mod packing;
pub mod tokenizer;

pub use memlayer_model_dir::{context_index, retriever};

#[cfg(test)]
use std::path::PathBuf;

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

pub use memlayer_model_dir::files::{read_utf8, write_atomic};
/// Errors of the data pipeline: the model directory's (files, tokenizer,
/// retriever) are the same type.
pub use memlayer_model_dir::{ModelDirError as DataError, Result};

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
