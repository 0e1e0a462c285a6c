//! memlayer: portable memory layers.
//!
//! This facade re-exports the crates an application embeds to run a memory
//! model (training, `memlayer-train`, is a separate leaf); see
//! `docs/ARCHITECTURE.md` for the map.
//!
//! - [`core`]: the CPU oracle, `ModelConfig`, `ParamStore`, sampling;
//! - [`bank`]: the paged bank, page sources, the page-in engine;
//! - [`model_dir`]: the model directory (checksums, tokenizer, routing);
//! - [`cpu`], [`wgpu`]: the memory ops on the CPU and on wgpu/WebGPU;
//! - [`model`]: the burn model;
//! - [`runtime`]: `Generator`, `Budget`, `open_paged` / `open_resident`;
//! - [`http`]: the HTTP Range page source and the static Range server;
//! - `cuda` (feature `cuda`): the memory ops as CUDA kernels (`memlayer-cuda`).

pub use memlayer_bank as bank;
pub use memlayer_core as core;
pub use memlayer_cpu as cpu;
#[cfg(feature = "cuda")]
pub use memlayer_cuda as cuda;
pub use memlayer_http as http;
pub use memlayer_model as model;
pub use memlayer_model_dir as model_dir;
pub use memlayer_runtime as runtime;
pub use memlayer_wgpu as wgpu;
