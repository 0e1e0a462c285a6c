//! A small model shared by the paged-memory tests.
#![allow(dead_code)] // each test binary uses its own subset

use memlayer_core::model::{ModelConfig, ParamStore, PkmSpec};

/// 2 layers, the second a product-key memory of 16² = 256 value rows of 16,
/// and optionally a 2-level hierarchical memory (branching 2).
pub fn cfg(hier: bool) -> ModelConfig {
    let tiny = ModelConfig::tiny_tied_for_tests(hier);
    ModelConfig {
        vocab_size: 31,
        pkm: (tiny.pkm.clone()).map(|p| PkmSpec { n_keys: 16, ..p }),
        ..tiny
    }
}

/// The dense parameters of `store` (what `model.safetensors` holds).
pub fn dense_of(cfg: &ModelConfig, store: &ParamStore) -> ParamStore {
    let mut dense = ParamStore::dense_zeros(cfg).unwrap();
    for p in dense.params_mut() {
        p.data.clone_from(&store.get(&p.name).unwrap().data);
    }
    dense
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct ScratchDir(pub std::path::PathBuf);

impl ScratchDir {
    /// `memlayer-<name>-<pid>`, emptied first.
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("memlayer-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// `name` inside it.
    pub fn join(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Vocabulary of [`tiny_tokenizer`] (256 bytes + EOS + merges).
pub const TINY_VOCAB: usize = 270;

/// A byte-level BPE of [`TINY_VOCAB`] tokens (`tests/fixtures/tiny_tokenizer.json`,
/// written by `memlayer-train`'s `train_bpe` on three fact sentences).
pub fn tiny_tokenizer() -> memlayer_model_dir::Tokenizer {
    let json = include_str!("../fixtures/tiny_tokenizer.json");
    let t = memlayer_model_dir::Tokenizer::from_json(json).unwrap();
    assert_eq!(t.vocab_size(), TINY_VOCAB);
    t
}

/// [`cfg`] with the vocabulary of [`tiny_tokenizer`] (a model a directory
/// can hold and a generator can run).
pub fn dir_cfg(hier: bool) -> ModelConfig {
    ModelConfig {
        vocab_size: TINY_VOCAB,
        ..cfg(hier)
    }
}

/// Exports a product-key model of `cfg` with parameters drawn from `seed`
/// into `dir` (`memlayer_model_dir::dir::export`: config, dense weights,
/// bank, tokenizer, checksums.json last).
pub fn export_model_dir(dir: &std::path::Path, cfg: &ModelConfig, seed: u64) -> ParamStore {
    assert!(cfg.hier.is_none(), "routing files are not built here");
    let store = ParamStore::init(cfg, seed).unwrap();
    let tokenizer = tiny_tokenizer();
    memlayer_model_dir::dir::export(
        cfg,
        &store,
        dir,
        &memlayer_model_dir::dir::ExportParts {
            tokenizer: &tokenizer,
            routing: None,
            bank_dtype: memlayer_bank::Dtype::F32,
            value_page_rows: None,
        },
    )
    .unwrap();
    store
}
