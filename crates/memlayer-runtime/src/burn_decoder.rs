//! The native decoder: the burn [`Model`] (resident or paged memory) with
//! its [`KvCache`] and the current context's block rows, as a
//! [`Decoder`]; and [`open_resident`] / [`open_paged`], a model directory
//! ready to generate with it.

use crate::generate::{Decoder, GenerateError, Generator};
use crate::paged::{PagedMemory, PagedOptions};
use burn::tensor::Device;
use memlayer_bank::{BankReader, FileSource, PageSource};
use memlayer_core::model::ModelConfig;
use memlayer_model::{KvCache, MemoryOps, Model, ModelError};
use std::path::Path;
use std::sync::Arc;

impl From<GenerateError> for ModelError {
    fn from(e: GenerateError) -> Self {
        match e {
            GenerateError::Input(m) => ModelError::Input(m),
            e => ModelError::Input(e.to_string()),
        }
    }
}

/// The burn model with its attention cache: prefill and one token per
/// forward, the hierarchical memory's blocks those of the rows given at
/// [`Decoder::reset`]. Its steps never wait, so the blocking
/// [`Generator::generate`] drives it.
pub struct BurnDecoder {
    model: Model,
    cache: KvCache,
    block_rows: Option<Vec<usize>>,
    memory: Option<Arc<PagedMemory>>,
}

impl BurnDecoder {
    /// A decoder over `model`; `memory` is the paged memory the model reads
    /// through ([`Model::with_memory`]), kept here for its counters (`None`
    /// for a resident model or one without memory).
    pub fn new(model: Model, memory: Option<Arc<PagedMemory>>) -> Self {
        Self {
            model,
            cache: KvCache::new(),
            block_rows: None,
            memory,
        }
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The paged memory (counters, budget, prefetch), if the model pages one.
    pub fn memory(&self) -> Option<&Arc<PagedMemory>> {
        self.memory.as_ref()
    }

    /// Positions in the attention cache.
    pub fn position(&self) -> usize {
        self.cache.len
    }

    /// Block rows of the current context (one per level), if any.
    pub fn block_rows(&self) -> Option<&[usize]> {
        self.block_rows.as_deref()
    }
}

impl Decoder for BurnDecoder {
    type Error = ModelError;

    fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    fn reset(&mut self, block_rows: Option<&[usize]>) -> Result<(), ModelError> {
        self.cache = KvCache::new();
        self.block_rows = block_rows.map(<[usize]>::to_vec);
        Ok(())
    }

    async fn step(&mut self, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::Input("no tokens to feed".into()));
        }
        let f = self.model.forward(
            self.model.tokens(tokens, 1)?,
            self.block_rows.as_deref(),
            Some(&mut self.cache),
        )?;
        let v = self.model.config().vocab_size;
        let mut logits: Vec<f32> = f.logits.into_data().iter::<f32>().collect();
        // the last position's (vocab)
        logits.drain(..logits.len() - v);
        Ok(logits)
    }
}

fn load_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Input(e.to_string())
}

/// Whether `cfg` has a memory (product-key or hierarchical): a bank to read.
fn has_memory(cfg: &ModelConfig) -> bool {
    cfg.pkm.is_some() || cfg.hier.is_some()
}

/// The model directory with its whole memory read into the model (every
/// file and page verified, the bank checked against the config and the
/// checksums as in [`open_paged`]): the reference a paged run is compared
/// with. A model without memory reads no bank.
pub fn open_resident(
    dir: &Path,
    device: &Device,
    ops: MemoryOps,
) -> Result<Generator<BurnDecoder>, ModelError> {
    let m = memlayer_model_dir::dir::load(dir).map_err(load_err)?;
    let model = Model::new(&m.config, &m.store, device, ops, false)?;
    Generator::new(BurnDecoder::new(model, None), m.tokenizer, m.routing)
}

/// The model directory with its memory paged from `source` (the directory's
/// `memory.bank` when `None`) under `opts`; the paged memory is returned
/// with the generator (and kept by its decoder: [`BurnDecoder::memory`]).
///
/// A dense model (its config has neither a product-key nor a hierarchical
/// memory) opens no bank: `source` and `opts` are not used, the memory is
/// `None` and the directory needs no `memory.bank`.
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
) -> Result<(Generator<BurnDecoder>, Option<Arc<PagedMemory>>), ModelError> {
    let m = memlayer_model_dir::dir::load_dense(dir).map_err(load_err)?;
    if !has_memory(&m.config) {
        let model = Model::new(&m.config, &m.store, device, ops, false)?;
        let g = Generator::new(BurnDecoder::new(model, None), m.tokenizer, m.routing)?;
        return Ok((g, None));
    }
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
    let g = Generator::new(
        BurnDecoder::new(model, Some(memory.clone())),
        m.tokenizer,
        m.routing,
    )?;
    Ok((g, Some(memory)))
}
