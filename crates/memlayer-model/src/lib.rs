//! memlayer's model in burn: a Llama-style decoder (RMSNorm, RoPE attention
//! with a KV cache, SwiGLU) with product-key memory layers (values shared by
//! all of them) and a hierarchical FFN memory (one block per tree level
//! appended to every dense FFN). One definition for training on an autodiff
//! device and for inference; the memory ops are a burn backend extension with
//! a portable fallback ([`ops`]).

#[cfg(feature = "wgpu")]
pub mod gpu;
pub mod model;
pub mod ops;

pub use model::{Forward, KvCache, MemoryReads, MemorySource, Model, ModelError};
pub use ops::MemoryOps;
