//! The memory of a model in the browser, paged from a [`RemoteBank`] under
//! one byte budget by the bank crate's page-in engine ([`PageIn`]) and its
//! async drivers:
//!
//! - **product-key values** on wgpu (WebGPU in the browser). Per memory
//!   layer and batch of tokens:
//!   1. the query projection runs on the CPU (`pkm::project_query`);
//!   2. `pk_qk_norm` / `pk_scores` / `pk_topk` / `pk_candidates` pick each
//!      token's `heads × knn` rows and their softmax weights on the device;
//!      they are read back (one round trip);
//!   3. the pages holding those rows are made resident (LRU slots under the
//!      budget, the page table, runs of tokens when a batch's pages do not
//!      fit the slots together) by [`page_in_async`]: every miss of a run
//!      fetched at once, verified, written into its device slot;
//!   4. `bag_forward` sums the rows through the page table on the device
//!      (one round trip), and the layer is finished on the CPU (`pkm::finish`).
//! - **FFN-memory blocks** (hierarchical memory) on the host: one block per
//!   level for the context's route, fetched by [`block_async`] (every level
//!   that misses at once), verified, unpacked into the dense layers' FFN
//!   blocks once, and kept while the context stays; with prefetch,
//!   [`WebMemory::prefetch`] fetches another route's blocks ahead (the chat
//!   prefetches the question being typed) into one extra block per level.
//!
//! The numbers equal `memlayer_core::model::reference::forward` of the
//! fully resident model: the kernels are tested against it, the bag sums in
//! the oracle's order and the blocks are the bank's own.

use crate::WebError;
use crate::bank::{PageFetch, RemoteBank};
use memlayer_bank::drive::{block_async, page_in_async, prefetch_async};
use memlayer_bank::pagein::{PageIn, PageInError, PageInOptions};
use memlayer_core::hier::ffn::FfnBlock;
use memlayer_core::model::{ModelConfig, ParamStore};
use memlayer_core::pkm::{self, PkmConfig, PkmParams};
use memlayer_wgpu::bag_forward::BagForward;
use memlayer_wgpu::buffers::{storage_init, storage_zeroed};
use memlayer_wgpu::lookup::{LookupBuffers, LookupKernels, LookupPlan};
use memlayer_wgpu::{GpuContext, GpuDtype, ShardedTable};
use std::sync::Arc;

pub use memlayer_bank::pagein::MemoryStats;

impl From<PageInError> for WebError {
    fn from(e: PageInError) -> Self {
        match e {
            PageInError::Bank(e) => WebError::Remote(e.into()),
            PageInError::Remote(e) => e.into(),
            e => WebError::Input(e.to_string()),
        }
    }
}

/// One level's block unpacked: the FFN block of each dense layer, in layer
/// order (what the engine holds per level).
pub type LevelBlocks = Arc<Vec<FfnBlock>>;

/// How a [`WebMemory`] pages.
pub struct MemoryOptions {
    /// The device of the product-key memory's lookups and bags: required
    /// when the model has one, unused otherwise (a hierarchical memory runs
    /// on the CPU).
    pub ctx: Option<GpuContext>,
    /// Bytes of resident memory: value slots on the device in the bank's
    /// dtype plus the blocks as f32 (one per level, two with `prefetch`).
    pub budget_bytes: u64,
    /// Reserve one extra block per level for [`WebMemory::prefetch`].
    pub prefetch: bool,
}

/// One memory layer: its parameters and its sub-keys on the device.
struct MemoryLayer {
    layer: usize,
    params: PkmParams,
    /// (heads, 2, n_keys, k_dim/2) f32
    keys: wgpu::Buffer,
}

/// The lookup's device buffers for one token count, kept across calls
/// (decoding looks up one token per layer per step: nothing is allocated).
struct LookupScratch {
    tokens: usize,
    /// The outputs and scratch of `LookupPlan::new(.., tokens)`.
    out: LookupBuffers,
    /// (tokens, heads · k_dim) f32, rewritten each call
    query: wgpu::Buffer,
}

/// The product-key memory on the device: its layers, value slots, kernels.
struct DeviceValues {
    ctx: GpuContext,
    cfg: PkmConfig,
    layers: Vec<MemoryLayer>,
    /// (slots × page_rows, dim) in the bank's dtype on the device (f16 and
    /// bf16 packed two per u32, widened exactly by `bag_forward.wgsl`)
    slots: ShardedTable,
    lookup: LookupKernels,
    bag: BagForward,
    /// The last token count's lookup buffers.
    scratch: Option<LookupScratch>,
    /// A page's values while it is written into its slot (reused).
    decoded: Vec<f32>,
}

/// The hierarchical memory's shape.
struct Hier {
    /// Tree levels (one block each).
    levels: usize,
    /// Units of a level-`l` block (index 0 = level 1).
    units: Vec<usize>,
    /// Dense layers (each gets one FFN block per level).
    dense_layers: usize,
    dim: usize,
}

/// A model's memory in the browser: product-key values paged into device
/// slots, FFN-memory blocks held on the host, under one budget.
pub struct WebMemory<F> {
    bank: RemoteBank<F>,
    /// Budget, LRU slots, page table, runs of tokens, block state, counters.
    engine: PageIn<LevelBlocks>,
    values: Option<DeviceValues>,
    hier: Option<Hier>,
    /// Seconds since some origin, for the time counters (none: not timed).
    clock: Option<fn() -> f64>,
}

impl<F: PageFetch> WebMemory<F> {
    /// Times fetches and device work with `clock` (seconds).
    pub fn set_clock(&mut self, clock: fn() -> f64) {
        self.clock = Some(clock);
    }

    fn now(&self) -> f64 {
        self.clock.map_or(0.0, |c| c())
    }

    /// The memory of `cfg` (a model with a product-key or hierarchical
    /// memory, or both), its memory layers' parameters from `store` (the
    /// dense weights), paged from `bank` (whose sections must fit `cfg`)
    /// under `opts`. Fails naming the minimum if the budget cannot hold the
    /// blocks plus one token's value pages.
    pub fn new(
        bank: RemoteBank<F>,
        cfg: &ModelConfig,
        store: &ParamStore,
        opts: MemoryOptions,
    ) -> Result<Self, WebError> {
        if cfg.pkm.is_none() && cfg.hier.is_none() {
            return Err(WebError::Input(
                "the model has no memory: it takes no bank".into(),
            ));
        }
        memlayer_model_dir::check_bank_fits(cfg, bank.sections(), bank.location())?;
        let pcfg = cfg.pkm_config();
        let engine = PageIn::new(
            bank.sections(),
            &PageInOptions {
                budget_bytes: opts.budget_bytes,
                prefetch: opts.prefetch && cfg.hier.is_some(),
                token_pages: pcfg.as_ref().map(|p| p.bag_size() as u32),
            },
        )?;
        let values = match pcfg {
            Some(pcfg) => {
                let ctx = opts.ctx.ok_or_else(|| {
                    WebError::Input(
                        "the model has a product-key memory: it needs a WebGPU device".into(),
                    )
                })?;
                Some(DeviceValues::new(ctx, cfg, pcfg, store, &engine)?)
            }
            None => None,
        };
        let hier = cfg.hier.as_ref().map(|h| Hier {
            levels: h.levels,
            units: h.units.clone(),
            dense_layers: cfg.dense_layers().len(),
            dim: cfg.dim,
        });
        if let Some(h) = &hier
            && engine.levels().len() != h.levels
        {
            return Err(WebError::Input(format!(
                "{}: {} block sections for a memory of {} levels",
                bank.location(),
                engine.levels().len(),
                h.levels
            )));
        }
        Ok(Self {
            bank,
            engine,
            values,
            hier,
            clock: None,
        })
    }

    /// The device of the product-key memory (`None` without one).
    pub fn gpu(&self) -> Option<&GpuContext> {
        self.values.as_ref().map(|v| &v.ctx)
    }

    /// The remote bank.
    pub fn bank(&self) -> &RemoteBank<F> {
        &self.bank
    }

    /// The counters, with the budget, slots and resident gauges as of now.
    pub fn stats(&self) -> MemoryStats {
        self.engine.stats()
    }

    /// Whether layer `i` is a product-key memory layer.
    pub fn is_memory_layer(&self, i: usize) -> bool {
        self.values
            .as_ref()
            .is_some_and(|v| v.layers.iter().any(|l| l.layer == i))
    }

    /// Whether a block per level is reserved for [`WebMemory::prefetch`].
    pub fn prefetch_enabled(&self) -> bool {
        self.engine.prefetch_enabled()
    }

    /// Runs every device kernel once (a lookup of a zero query, an empty
    /// bag) so the driver compiles its pipelines now rather than in the
    /// first token: SwiftShader's JIT takes seconds. Counters are not
    /// touched. Nothing to do without a product-key memory.
    pub async fn warm_up(&mut self) -> Result<(), WebError> {
        match self.values.as_mut() {
            Some(v) => v.warm_up(&self.engine).await,
            None => Ok(()),
        }
    }

    /// Output of product-key memory layer `layer` for `x` (tokens, dim) →
    /// (tokens, dim).
    pub async fn forward(
        &mut self,
        layer: usize,
        x: &[f32],
        tokens: usize,
    ) -> Result<Vec<f32>, WebError> {
        let clock = self.clock;
        let now = || clock.map_or(0.0, |c| c());
        let v = self
            .values
            .as_mut()
            .ok_or_else(|| WebError::Input("the model has no product-key memory".into()))?;
        let li = v
            .layers
            .iter()
            .position(|l| l.layer == layer)
            .ok_or_else(|| WebError::Input(format!("layer {layer} is not a memory layer")))?;
        memlayer_core::error::check_len("memory layer input", x, &[tokens, v.cfg.dim])?;
        if tokens == 0 {
            return Ok(Vec::new());
        }
        // (tokens, heads * k_dim)
        let query = pkm::project_query(&v.cfg, &v.layers[li].params, x, tokens);
        let t0 = now();
        // (tokens, heads, knn) each
        let (rows, weights) = v.lookup(li, &query, tokens).await?;
        self.engine.add_device_seconds(now() - t0);
        let memory = self.bag_paged(&rows, &weights, tokens).await?;
        let v = self
            .values
            .as_ref()
            .ok_or_else(|| WebError::Input("no values".into()))?;
        let done = pkm::finish(&v.cfg, &v.layers[li].params, x, &memory, tokens);
        Ok(done.output)
    }

    /// Bags of `heads × knn` rows each (`rows`, `weights`: (bags, bag))
    /// through the page table, paging in runs of bags whose pages fit the
    /// slots → (bags, v_dim).
    async fn bag_paged(
        &mut self,
        rows: &[u32],
        weights: &[f32],
        bags: usize,
    ) -> Result<Vec<f32>, WebError> {
        let clock = self.clock;
        let now = || clock.map_or(0.0, |c| c());
        let Self {
            bank,
            engine,
            values,
            ..
        } = self;
        let v = values
            .as_mut()
            .ok_or_else(|| WebError::Input("the model has no product-key memory".into()))?;
        let g = *engine
            .values()
            .ok_or_else(|| WebError::Input("the bank has no product-key value section".into()))?;
        let bag = v.cfg.bag_size();
        let mut out = Vec::with_capacity(bags * g.dim);
        // the constructor guarantees one token's pages fit
        for run in engine.value_runs(&rows[..bags * bag], bag)? {
            let (start, end) = (run.bags.start, run.bags.end);
            let t0 = now();
            let (ctx, slots) = (&v.ctx, &v.slots);
            page_in_async(engine, bank, &run.pages, &mut v.decoded, |slot, data| {
                // the page decoded to f32 by the driver; values of a 16-bit
                // bank round back to their own bits (exact)
                let words = memlayer_wgpu::buffers::encode_rows(data, g.dim, slots.dtype);
                slots
                    .write_rows(ctx, slot as usize * g.page_rows, &words)
                    .map_err(|e| e.to_string())
            })
            .await?;
            let t1 = now();
            engine.add_fetch_seconds(t1 - t0);
            let offsets = memlayer_core::bag::uniform_offsets(end - start, bag);
            let part = v
                .bag
                .run_paged_async(
                    &v.ctx,
                    &v.slots,
                    g.page_rows,
                    engine.page_table(),
                    &rows[start * bag..end * bag],
                    &weights[start * bag..end * bag],
                    &offsets,
                )
                .await?;
            engine.add_device_seconds(now() - t1);
            out.extend(part);
        }
        Ok(out)
    }

    /// The blocks of the context routed to `rows` (one table row per
    /// level): each level's current or prefetched block, or its page
    /// fetched (all levels that miss at once), verified and unpacked.
    /// (levels) of (dense layers) FFN blocks.
    pub async fn blocks(&mut self, rows: &[usize]) -> Result<Vec<LevelBlocks>, WebError> {
        let h = self.hier.as_ref().ok_or_else(|| {
            WebError::Input("block rows given to a model without a hierarchical memory".into())
        })?;
        if rows.len() != h.levels {
            return Err(WebError::Input(format!(
                "{} block rows for a memory of {} levels",
                rows.len(),
                h.levels
            )));
        }
        let unpack = h.unpacker();
        let t0 = self.now();
        let blocks = block_async(&mut self.engine, &self.bank, rows, unpack).await?;
        let t1 = self.now();
        self.engine.add_fetch_seconds(t1 - t0);
        Ok(blocks)
    }

    /// Fetches the blocks of `rows` (another context's route) ahead of its
    /// forward into the prefetch reserve; returns how many were fetched
    /// (levels already current or prefetched are skipped). Needs
    /// [`MemoryOptions::prefetch`]; a page that fails is left for the
    /// forward to fetch and report.
    pub async fn prefetch(&mut self, rows: &[usize]) -> Result<usize, WebError> {
        let h = self.hier.as_ref().ok_or_else(|| {
            WebError::Input("nothing to prefetch: the model has no hierarchical memory".into())
        })?;
        let unpack = h.unpacker();
        Ok(prefetch_async(&mut self.engine, &self.bank, rows, unpack).await?)
    }
}

impl Hier {
    /// Unpacks a level's block page (`f[dense layers][3][units][dim]`) into
    /// one FFN block per dense layer.
    fn unpacker(&self) -> impl FnMut(usize, &[f32]) -> Result<LevelBlocks, String> + use<> {
        let (units, layers, d) = (self.units.clone(), self.dense_layers, self.dim);
        move |level, values| {
            let r = *units
                .get(level)
                .ok_or_else(|| format!("no level {}", level + 1))?;
            let per = 3 * r * d;
            if values.len() != layers * per {
                return Err(format!(
                    "{} values, {layers} dense layers × 3 × {r} units × {d} need {}",
                    values.len(),
                    layers * per
                ));
            }
            values
                .chunks_exact(per)
                .map(|page| FfnBlock::from_page(r, d, page).map_err(|e| e.to_string()))
                .collect::<Result<Vec<_>, _>>()
                .map(Arc::new)
        }
    }
}

/// The device storage of a bank's dtype (as the native runtime's
/// `DevicePool`): f32, or f16 / bf16 two per u32 word.
fn gpu_dtype(dtype: memlayer_bank::Dtype) -> GpuDtype {
    match dtype {
        memlayer_bank::Dtype::F32 => GpuDtype::F32,
        memlayer_bank::Dtype::F16 => GpuDtype::F16,
        memlayer_bank::Dtype::Bf16 => GpuDtype::Bf16,
    }
}

impl DeviceValues {
    /// The product-key layers of `cfg` on `ctx`, `engine.value_slots()`
    /// slots of values in the bank's dtype.
    fn new(
        ctx: GpuContext,
        cfg: &ModelConfig,
        pcfg: PkmConfig,
        store: &ParamStore,
        engine: &PageIn<LevelBlocks>,
    ) -> Result<Self, WebError> {
        let g = engine
            .values()
            .ok_or_else(|| WebError::Input("the bank has no product-key value section".into()))?;
        let slots = ShardedTable::zeroed(
            &ctx,
            "value page slots",
            engine.value_slots() as usize * g.page_rows,
            g.dim,
            gpu_dtype(g.section.spec.dtype),
            g.page_rows,
        )?;
        let mut layers = Vec::new();
        for i in 0..cfg.n_layers {
            if cfg.is_pkm_layer(i) {
                let params = memlayer_core::model::reference::pkm_params(cfg, store, i)?;
                params.check(&pcfg)?;
                let keys = storage_init(&ctx, "memory sub-keys", &params.keys);
                layers.push(MemoryLayer {
                    layer: i,
                    params,
                    keys,
                });
            }
        }
        let lookup = LookupKernels::new(&ctx)?;
        let bag = BagForward::new(&ctx)?;
        Ok(Self {
            ctx,
            cfg: pcfg,
            layers,
            slots,
            lookup,
            bag,
            scratch: None,
            decoded: Vec::new(),
        })
    }

    /// The lookup buffers for `tokens` queries: the kept ones if they are
    /// for that count, else new ones (the old are dropped).
    fn scratch_for(&mut self, tokens: usize) -> Result<LookupScratch, WebError> {
        if let Some(s) = self.scratch.take_if(|s| s.tokens == tokens) {
            return Ok(s);
        }
        self.scratch = None;
        let plan = LookupPlan::new(&self.ctx, &self.cfg, tokens)?;
        Ok(LookupScratch {
            tokens,
            out: LookupBuffers::new(&self.ctx, &plan)?,
            query: storage_zeroed(
                &self.ctx,
                "memory query",
                (tokens * self.cfg.query_dim()) as u64 * 4,
            ),
        })
    }

    /// The rows and softmax weights layer `li` picks for `query` (tokens,
    /// heads · k_dim) → ((tokens, heads, knn) rows, same weights).
    async fn lookup(
        &mut self,
        li: usize,
        query: &[f32],
        tokens: usize,
    ) -> Result<(Vec<u32>, Vec<f32>), WebError> {
        let scratch = self.scratch_for(tokens)?;
        self.ctx
            .queue
            .write_buffer(&scratch.query, 0, bytemuck::cast_slice(query));
        let mut encoder = self.ctx.device.create_command_encoder(&Default::default());
        self.lookup.record(
            &self.ctx,
            &mut encoder,
            &self.layers[li].keys,
            &scratch.query,
            &scratch.out,
        )?;
        self.ctx.queue.submit([encoder.finish()]);
        let lk = scratch.out.read_async(&self.ctx).await;
        self.scratch = Some(scratch);
        let lk = lk?;
        Ok((lk.indices, lk.weights))
    }

    /// See [`WebMemory::warm_up`].
    async fn warm_up(&mut self, engine: &PageIn<LevelBlocks>) -> Result<(), WebError> {
        if self.layers.is_empty() {
            return Ok(());
        }
        let scratch = self.scratch_for(1)?;
        let mut encoder = self.ctx.device.create_command_encoder(&Default::default());
        // a new query buffer is zeroed: the lookup of a zero query
        self.lookup.record(
            &self.ctx,
            &mut encoder,
            &self.layers[0].keys,
            &scratch.query,
            &scratch.out,
        )?;
        self.ctx.queue.submit([encoder.finish()]);
        let read = scratch.out.read_async(&self.ctx).await;
        self.scratch = Some(scratch);
        read?;
        // one empty bag through the (empty) page table
        self.bag
            .run_paged_async(
                &self.ctx,
                &self.slots,
                engine.values().map_or(1, |v| v.page_rows),
                engine.page_table(),
                &[],
                &[],
                &[0, 0],
            )
            .await?;
        Ok(())
    }
}
