//! memlayer-model-dir: the model directory, written by training and read by
//! every runtime (native, browser, C ABI).
//!
//! ```text
//! config.json          ModelConfig (memlayer-core), bounds-checked before use
//! model.safetensors    dense weights (f32), ParamStore names
//! memory.bank          product-key values and FFN-memory blocks (memlayer-bank)
//! tokenizer.json       HF tokenizers BPE                     tokenizer
//! retriever.json       TF-IDF retriever                      retriever  (hierarchical memory)
//! tree.safetensors     cluster tree                          routing    (hierarchical memory)
//! context_index.json   nearest-training-context index        context_index
//! checksums.json       length + xxh3 of every file above     manifest
//! ```
//!
//! - [`manifest`]: `checksums.json` and its verifier (files and the bank's identity);
//! - [`bank_fit`]: a bank's sections against the config's shapes;
//! - [`tokenizer`], [`retriever`], [`context_index`], [`routing`]: the
//!   tokenizer and a context's route to its memory blocks;
//! - [`dir`] (not on wasm32): the directory on disk: export, load, checks;
//! - [`files`]: atomic writes, whole-file reads.
//!
//! No burn, no GPU: the crate builds for `wasm32-unknown-unknown`, where the
//! browser verifies and parses the same files it fetched.

pub mod bank_fit;
pub mod context_index;
#[cfg(not(target_arch = "wasm32"))]
pub mod dir;
pub mod error;
pub mod files;
pub mod manifest;
pub mod retriever;
pub mod routing;
pub mod tokenizer;

pub use bank_fit::{BankFitError, check_bank_fits};
pub use error::{ModelDirError, Result};
pub use manifest::{BankIdentity, CHECKSUMS_FILE, Checksums, FileDigest, ManifestError};
pub use routing::{Routing, RoutingFiles, route};
pub use tokenizer::Tokenizer;
