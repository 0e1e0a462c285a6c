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
//! - [`paged`]: the paged memory (the model's `MemorySource`), its counters;
//! - [`pool`]: where resident pages live (host, device) and the bag over them;
//! - [`generate`]: generation with a KV cache and greedy / temperature / top-p sampling;
//! - [`open_resident`], [`open_paged`]: a model directory ready to generate.

pub mod generate;
pub mod paged;
pub mod pool;

use burn::tensor::Device;
use memlayer_bank::{BankReader, FileSource, PageSource};
use memlayer_model::{MemoryOps, Model, ModelError};
use paged::{PagedMemory, PagedOptions};
use std::path::Path;
use std::sync::Arc;

pub use generate::{Generation, Generator, Sampling};
pub use paged::MemoryStats;

fn load_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Input(e.to_string())
}

/// The model directory with its whole memory read into the model (every
/// file and page verified, the bank checked against the config and the
/// checksums as in [`open_paged`]): the reference a paged run is compared with.
pub fn open_resident(dir: &Path, device: &Device, ops: MemoryOps) -> Result<Generator, ModelError> {
    let m = memlayer_model_dir::dir::load(dir).map_err(load_err)?;
    let model = Model::new(&m.config, &m.store, device, ops, false)?;
    Ok(Generator {
        model,
        tokenizer: m.tokenizer,
        routing: m.routing,
    })
}

/// The model directory with its memory paged from `source` (the directory's
/// `memory.bank` when `None`) under `opts`.
///
/// Refused before anything runs (errors name the field or file and both
/// values): a config out of bounds, a directory without `checksums.json` or
/// whose files differ from it, a bank whose sections do not fit the config
/// (`memlayer_model_dir::check_bank_fits`) or that is not the bank the
/// checksums record (another model's, even of the same shape).
pub fn open_paged(
    dir: &Path,
    source: Option<Box<dyn PageSource>>,
    opts: PagedOptions,
    device: &Device,
    ops: MemoryOps,
) -> Result<(Generator, Arc<PagedMemory>), ModelError> {
    let m = memlayer_model_dir::dir::load_dense(dir).map_err(load_err)?;
    let source: Box<dyn PageSource> = match source {
        Some(s) => s,
        None => {
            let path = dir.join("memory.bank");
            Box::new(FileSource::open(&path).map_err(load_err)?)
        }
    };
    let bank = BankReader::open(source).map_err(load_err)?;
    // before a single page is used: the bank's shapes fit config.json, and it
    // is the bank checksums.json records (not another model's, whatever the source)
    memlayer_model_dir::dir::check_bank(&m.config, &m.checksums, &bank).map_err(load_err)?;
    let memory = Arc::new(PagedMemory::new(bank, opts)?);
    let model = Model::with_memory(&m.config, &m.store, device, ops, memory.clone())?;
    Ok((
        Generator {
            model,
            tokenizer: m.tokenizer,
            routing: m.routing,
        },
        memory,
    ))
}

/// Bytes of f32 memory a model directory's bank holds when fully resident
/// (value rows + one block per level): the reference of a budget in percent.
pub fn resident_bytes(bank: &BankReader<impl PageSource>) -> u64 {
    bank.sections()
        .iter()
        .map(|s| s.geometry.rows * u64::from(s.geometry.dim) * 4)
        .sum()
}
