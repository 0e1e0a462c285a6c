//! Training configuration (`train.json` in a model directory) and presets.
//!
//! Presets: `tiny` (CI: trains in about a minute on 2 cores) and `demo` (the
//! default model of the main job), each as `-dense`, `-pkm` (product-key
//! memory replacing the FFN of one layer; values shared) and `-hier`
//! (hierarchical FFN memory appended to every FFN). The variants of one size
//! share data, tokenizer, seeds and schedule; `-pkm` keeps the active
//! parameters per token at or below `-dense`.

use crate::data::facts::FactsConfig;
use crate::optim::OptimConfig;
use memlayer_core::model::{HierSpec, ModelConfig, PkmSpec};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Where the training text comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataSpec {
    /// The generated long-tail facts world (DESIGN §5), with its evaluation.
    Facts(FactsConfig),
    /// Any UTF-8 text file, cut into contexts of about `target_chars`.
    Text {
        /// The file.
        path: PathBuf,
        /// Context length in characters.
        target_chars: usize,
    },
}

/// Everything a training run depends on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Name of the run (the preset name for presets).
    pub name: String,
    /// The model (its `vocab_size` is the BPE vocabulary trained).
    pub model: ModelConfig,
    /// Training text.
    pub data: DataSpec,
    /// Tokens per training sequence.
    pub seq_len: usize,
    /// Sequences per step.
    pub batch_size: usize,
    /// Optimiser steps.
    pub steps: u64,
    /// Seed of initialisation, batch order and generic-block draws.
    pub seed: u64,
    /// Seed of the data split (held-out contexts, hence the tokenizer), the
    /// cluster tree and the evaluation sample; `None` uses `seed`. An
    /// experiment sets it so that runs with different `seed`s see identical
    /// data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_seed: Option<u64>,
    /// Optimiser and schedule.
    pub optim: OptimConfig,
    /// Write a checkpoint every this many steps (and at the end).
    pub checkpoint_every: u64,
    /// Width of the TF-IDF retriever embedding (hierarchical memory).
    pub retriever_dim: usize,
    /// Fraction of contexts held out for perplexity.
    pub heldout_fraction: f64,
    /// Fact queries evaluated per frequency bucket (0 = all).
    pub eval_per_bucket: usize,
}

/// Names of the built-in presets.
pub const PRESETS: [&str; 6] = [
    "tiny-dense",
    "tiny-pkm",
    "tiny-hier",
    "demo-dense",
    "demo-pkm",
    "demo-hier",
];

impl TrainConfig {
    /// The preset called `name` (see [`PRESETS`]).
    pub fn preset(name: &str) -> Option<Self> {
        let (size, variant) = name.split_once('-')?;
        let mut c = match size {
            "tiny" => Self::tiny_dense(),
            "demo" => Self::demo_dense(),
            _ => return None,
        };
        c.name = name.to_string();
        let d = c.model.dim;
        match variant {
            "dense" => {}
            "pkm" => {
                // one memory layer in the middle, replacing that layer's FFN
                let layer = c.model.n_layers / 2;
                let n_keys = if size == "tiny" { 64 } else { 128 };
                c.model.pkm = Some(PkmSpec {
                    layers: vec![layer],
                    n_keys,
                    heads: 4,
                    k_dim: d / 2,
                    knn: 16,
                    v_dim: d,
                    qk_norm: true,
                    gated: false,
                });
            }
            "hier" => {
                let (levels, branching, units) = if size == "tiny" {
                    (2, 4, vec![16, 8])
                } else {
                    (2, 8, vec![24, 12])
                };
                c.model.hier = Some(HierSpec {
                    levels,
                    branching,
                    units,
                    generic: true,
                    routing: Default::default(),
                });
            }
            _ => return None,
        }
        Some(c)
    }

    fn tiny_dense() -> Self {
        Self {
            name: "tiny-dense".into(),
            model: ModelConfig {
                vocab_size: 1024,
                dim: 64,
                n_layers: 2,
                n_heads: 4,
                ffn_hidden: 176,
                max_seq_len: 128,
                rope_theta: 10_000.0,
                norm_eps: 1e-5,
                tie_embeddings: true,
                pkm: None,
                hier: None,
            },
            data: DataSpec::Facts(FactsConfig::tiny()),
            seq_len: 64,
            batch_size: 16,
            steps: 800,
            seed: 1,
            data_seed: None,
            optim: OptimConfig {
                lr: 3e-3,
                warmup_steps: 40,
                ..OptimConfig::default()
            },
            checkpoint_every: 200,
            retriever_dim: 256,
            heldout_fraction: 0.05,
            eval_per_bucket: 200,
        }
    }

    fn demo_dense() -> Self {
        let mut c = Self::tiny_dense();
        c.name = "demo-dense".into();
        c.model.vocab_size = 2048;
        c.model.dim = 128;
        c.model.n_layers = 4;
        c.model.n_heads = 4;
        c.model.ffn_hidden = 344;
        c.model.max_seq_len = 256;
        c.data = DataSpec::Facts(FactsConfig::demo());
        c.seq_len = 128;
        c.batch_size = 16;
        c.steps = 2000;
        c.optim.lr = 2e-3;
        c.optim.warmup_steps = 100;
        c.checkpoint_every = 200;
        c.eval_per_bucket = 300;
        c
    }

    /// Seed of everything data-side (see [`TrainConfig::data_seed`]).
    pub fn data_seed(&self) -> u64 {
        self.data_seed.unwrap_or(self.seed)
    }

    /// Checks the run's own constraints (the model config validates itself).
    pub fn validate(&self) -> Result<(), String> {
        self.model.validate().map_err(|e| e.to_string())?;
        if self.seq_len == 0 || self.seq_len > self.model.max_seq_len {
            return Err(format!(
                "seq_len {} must be in 1..={} (model max_seq_len)",
                self.seq_len, self.model.max_seq_len
            ));
        }
        if self.batch_size == 0 || self.steps == 0 || self.checkpoint_every == 0 {
            return Err("batch_size, steps and checkpoint_every must be positive".into());
        }
        if !(0.0..0.5).contains(&self.heldout_fraction) {
            return Err("heldout_fraction must be in [0, 0.5)".into());
        }
        if self.model.hier.is_some() && self.retriever_dim == 0 {
            return Err("retriever_dim must be positive".into());
        }
        Ok(())
    }

    /// Canonical JSON (what checkpoints are tied to).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_and_pkm_keeps_active_params_at_most_dense() {
        for name in PRESETS {
            let c = TrainConfig::preset(name).unwrap();
            c.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(c.name, name);
            let back: TrainConfig = serde_json::from_str(&c.to_json()).unwrap();
            assert_eq!(back, c);
        }
        for size in ["tiny", "demo"] {
            let dense = TrainConfig::preset(&format!("{size}-dense")).unwrap();
            let pkm = TrainConfig::preset(&format!("{size}-pkm")).unwrap();
            let hier = TrainConfig::preset(&format!("{size}-hier")).unwrap();
            let (d, p, h) = (
                dense.model.param_counts(),
                pkm.model.param_counts(),
                hier.model.param_counts(),
            );
            assert!(p.active() <= d.active(), "{size}: {p:?} vs {d:?}");
            assert!(p.total() > 2 * d.total(), "{size}: memory adds capacity");
            // blocks fetched per context stay small against the anchor
            assert!(h.active_memory * 10 <= d.dense * 2, "{size}: {h:?}");
            assert_eq!((dense.seq_len, dense.steps), (pkm.seq_len, pkm.steps));
        }
        assert!(TrainConfig::preset("tiny-huge").is_none());
        assert!(TrainConfig::preset("nope").is_none());
    }
}
