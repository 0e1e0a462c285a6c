//! memlayer-core: the CPU oracle (truth for every backend) and the model's
//! configuration and parameters. The bank lives in `memlayer-bank`, the model
//! directory in `memlayer-model-dir`.
//!
//! No GPU code lives here and the crate builds for `wasm32-unknown-unknown`.
//! Tensors are plain row-major `Vec<f32>` / slices; every function documents
//! the shapes it expects.

pub mod bag;
pub mod error;
pub mod hier;
pub mod interop;
pub mod linalg;
pub mod model;
pub mod pkm;
pub mod rng;
pub mod sample;
pub mod topk;
