//! Training of memlayer models: data (long-tail facts, text corpora), BPE
//! tokenizer, retriever and cluster tree, the AdamW loop with per-group
//! learning rates and sparse memory updates, atomic checkpoints with resume,
//! evaluation (recall by frequency bucket, perplexity), plots and export to a
//! model directory.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod eval;
pub mod experiment;
pub mod optim;
pub mod pipeline;
pub mod plot;
pub mod prepare;
pub mod trainer;

/// The model directory (`memlayer-model-dir`): training exports into it.
pub use memlayer_model_dir::dir as model_dir;

pub use config::{DataSpec, PRESETS, TrainConfig};
pub use pipeline::{RunReport, eval_dir, train_and_report};
pub use trainer::{TrainError, TrainOptions, train};
