//! memlayer in the browser.
//!
//! A product-key memory model runs in a Web Worker: its dense part (attention,
//! FFNs, norms, logits) on the CPU in wasm, its memory layers on WebGPU —
//! `shaders/pk_*.wgsl` pick each token's value rows, `bag_forward.wgsl` sums
//! them through a page table from a slot pool on the device — while the
//! memory bank stays on the server and only the pages the lookups choose are
//! fetched (`fetch` with a `Range` header), checked against the bank's
//! checksums, kept in the browser's Cache API (a reload does not fetch them
//! again) and written into device slots under a byte budget (LRU).
//!
//! - [`bank`]: the remote bank (header, page table, verified page reads) over a [`bank::PageFetch`];
//! - [`memory`]: the device memory: lookup + paged embedding-bag on wgpu, the page cache, counters;
//! - [`decoder`]: the decoder with a KV cache, memory layers awaited on the
//!   device (none for a dense model): the runtime's `Decoder`;
//! - [`engine`]: the runtime's `Generator` (the one generation loop of every
//!   runtime) over that decoder and the model directory's tokenizer;
//! - [`kernel_check`]: the lookup and bag forward for `memlayer bench`'s
//!   browser backends (outputs for its parity pass, timings);
//! - `web` (wasm32 only): the wasm-bindgen API (`ChatEngine`, `kernel_check`) and the fetch / Cache API source.
//!
//! Everything but `web` also builds natively: the tests run this crate's
//! forward on lavapipe with pages read from a file and compare it with the
//! CPU reference in `memlayer-core`.

pub mod bank;
pub mod decoder;
pub mod engine;
pub mod kernel_check;
pub mod memory;
#[cfg(target_arch = "wasm32")]
mod web;

pub use decoder::WebDecoder;
pub use engine::{Engine, MemorySetup, ModelFiles, RoutingBytes};
pub use memlayer_runtime::Generation;
pub use memory::{MemoryOptions, MemoryStats, WebMemory};

/// Errors of the web runtime; every message names what failed and where.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    /// A file of the model directory is missing or invalid.
    #[error("{file}: {message}")]
    Model {
        /// The file (URL or path).
        file: String,
        /// What is wrong.
        message: String,
    },
    /// Reading the bank failed: fetching its bytes (HTTP status, network
    /// error) or the bytes are invalid (checksum, truncation, table).
    #[error(transparent)]
    Remote(#[from] memlayer_bank::remote::RemoteError),
    /// The GPU refused or failed.
    #[error(transparent)]
    Gpu(#[from] memlayer_wgpu::GpuError),
    /// The reference math refused its input (shapes, config).
    #[error(transparent)]
    Oracle(#[from] memlayer_core::error::OracleError),
    /// The model directory's checksums are missing, or a file or the bank
    /// is not what `checksums.json` records.
    #[error(transparent)]
    Manifest(#[from] memlayer_model_dir::ManifestError),
    /// The bank's sections do not fit the model's config.
    #[error(transparent)]
    BankFit(#[from] memlayer_model_dir::BankFitError),
    /// A file of the model directory (routing files) is invalid; the
    /// message names it.
    #[error(transparent)]
    ModelDir(#[from] memlayer_model_dir::ModelDirError),
    /// Bad input (prompt, budget, model kind).
    #[error("{0}")]
    Input(String),
    /// The generation loop refused (sampling, prompt length, tokenizer).
    #[error(transparent)]
    Generate(#[from] memlayer_runtime::GenerateError),
}
