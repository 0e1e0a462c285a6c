//! A small model shared by the paged-memory tests.
#![allow(dead_code)] // each test binary uses its own subset

use memlayer_core::model::{HierSpec, ModelConfig, ParamStore, PkmSpec};

/// 2 layers, the second a product-key memory of 16² = 256 value rows of 16,
/// and optionally a 2-level hierarchical memory (branching 2).
pub fn cfg(hier: bool) -> ModelConfig {
    ModelConfig {
        vocab_size: 31,
        dim: 16,
        n_layers: 2,
        n_heads: 2,
        ffn_hidden: 24,
        max_seq_len: 32,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
        tie_embeddings: true,
        pkm: Some(PkmSpec {
            layers: vec![1],
            n_keys: 16,
            heads: 2,
            k_dim: 8,
            knn: 3,
            v_dim: 16,
            qk_norm: true,
            gated: false,
        }),
        hier: hier.then(|| HierSpec {
            levels: 2,
            branching: 2,
            units: vec![4, 2],
            generic: false,
            routing: Default::default(),
        }),
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
