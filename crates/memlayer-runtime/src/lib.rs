//! Inference with paged memory.
//!
//! A model directory (`memlayer-train`'s export) holds the dense weights in
//! `model.safetensors` and the memory in `memory.bank`. This crate runs the
//! model with its memory **paged**: the dense weights are uploaded, the bank
//! stays at its source (a local file read with positioned reads, or a URL
//! read with HTTP Range requests) and the pages a forward needs are fetched
//! on demand into slots under a byte budget ([`paged::PagedMemory`], an LRU
//! page cache over host memory or wgpu device buffers). Outputs equal the
//! fully resident model's: the same rows are selected and the bag sums them
//! in the same order.
//!
//! - [`generate`]: the one generation loop of every runtime (native, browser,
//!   C ABI): the [`Decoder`] trait, [`Generator`] (tokenizer, routing,
//!   greedy / temperature / top-p sampling, stopping, streaming, timings)
//!   and its [`Generation`];
//! - `paged`: the paged memory (the model's `MemorySource`), its counters;
//! - `pool`: where resident pages live (host, device) and the bag over them;
//! - `burn_decoder`: the native decoder (the burn model + KV cache) and
//!   `open_resident`, `open_paged`: a model directory ready to generate;
//! - `open`: where the bank is read from (`BankLocation`: file, path, URL)
//!   and which device runs the model (`RuntimeBackend` → `RuntimeDevice`),
//!   for every front-end.
//!
//! Features: `burn` (default) builds the native decoder, the paged memory
//! and the pools on burn (CPU); `wgpu` (default) adds wgpu device pools and
//! burn's wgpu backend; `http` (default) banks read from URLs. Without default features only [`generate`] is left
//! (no burn, no threads): the browser runtime (`memlayer-web`, wasm32)
//! drives its own decoder with it.

pub mod budget;
#[cfg(feature = "burn")]
pub mod burn_decoder;
pub mod generate;
#[cfg(feature = "burn")]
pub mod open;
#[cfg(feature = "burn")]
pub mod paged;
#[cfg(feature = "burn")]
pub mod pool;

pub use budget::Budget;
#[cfg(feature = "burn")]
pub use burn_decoder::{BurnDecoder, open_paged, open_resident};
pub use generate::{Decoder, GenerateError, Generation, Generator, Sampling};
#[cfg(feature = "burn")]
pub use paged::{BudgetChange, MemoryAccess, MemoryStats};
