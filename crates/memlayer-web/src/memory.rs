//! The device memory of a product-key model: the memory layers' lookups and
//! embedding-bags on wgpu (WebGPU in the browser), with the shared value
//! table paged in from a [`RemoteBank`] into device slots under a budget.
//!
//! Per memory layer and batch of tokens:
//! 1. the query projection runs on the CPU (`pkm::project_query`);
//! 2. `pk_qk_norm` / `pk_scores` / `pk_topk` / `pk_candidates` pick each
//!    token's `heads × knn` rows and their softmax weights on the device;
//!    they are read back (one round trip);
//! 3. the pages holding those rows are made resident by the bank crate's
//!    page-in engine ([`PageIn`]: LRU slots under the budget, the page
//!    table, runs of tokens when a batch's pages do not fit the slots
//!    together) and its async driver ([`page_in_async`]: every miss of a
//!    run fetched at once, verified, written into its device slot);
//! 4. `bag_forward` sums the rows through the page table on the device (one
//!    round trip), and the layer is finished on the CPU (`pkm::finish`).
//!
//! The numbers equal `memlayer_core::pkm::forward` over the whole table: the
//! kernels are tested against it, and the bag sums in the oracle's order.

use crate::WebError;
use crate::bank::{PageFetch, RemoteBank};
use memlayer_bank::SectionKind;
use memlayer_bank::drive::page_in_async;
use memlayer_bank::pagein::{PageIn, PageInError, PageInOptions};
use memlayer_core::model::ModelConfig;
use memlayer_core::pkm::{self, PkmConfig, PkmParams};
use memlayer_wgpu::bag_forward::BagForward;
use memlayer_wgpu::buffers::{storage_init, storage_zeroed};
use memlayer_wgpu::lookup::{LookupBuffers, LookupKernels, LookupPlan};
use memlayer_wgpu::{GpuContext, GpuDtype, ShardedTable};

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

/// The memory layers of a product-key model on a wgpu device, their value
/// table paged from a remote bank.
pub struct DeviceMemory<F> {
    ctx: GpuContext,
    bank: RemoteBank<F>,
    cfg: PkmConfig,
    layers: Vec<MemoryLayer>,
    /// Budget, LRU slots, page table, runs of tokens, counters.
    engine: PageIn<()>,
    /// (slots × page_rows, dim) f32 on the device
    slots: ShardedTable,
    lookup: LookupKernels,
    bag: BagForward,
    /// The last token count's lookup buffers.
    scratch: Option<LookupScratch>,
    /// A page's values while it is written into its slot (reused).
    decoded: Vec<f32>,
    /// Seconds since some origin, for the time counters (none: not timed).
    clock: Option<fn() -> f64>,
}

impl<F: PageFetch> DeviceMemory<F> {
    /// Times fetches and device work with `clock` (seconds).
    pub fn set_clock(&mut self, clock: fn() -> f64) {
        self.clock = Some(clock);
    }

    fn now(&self) -> f64 {
        self.clock.map_or(0.0, |c| c())
    }

    /// The memory of `cfg` (a product-key model) on `ctx`, its layers'
    /// parameters from `store` (the dense weights), its values paged from
    /// `bank` into `budget_bytes` of device slots. Fails naming the minimum
    /// if the budget cannot hold one token's pages.
    pub fn new(
        ctx: GpuContext,
        bank: RemoteBank<F>,
        cfg: &ModelConfig,
        store: &memlayer_core::model::ParamStore,
        budget_bytes: u64,
    ) -> Result<Self, WebError> {
        let pcfg = cfg
            .pkm_config()
            .ok_or_else(|| WebError::Input("the model has no product-key memory".into()))?;
        let section = *bank
            .sections()
            .iter()
            .find(|s| matches!(s.spec.kind, SectionKind::PkmValues { .. }))
            .ok_or_else(|| {
                WebError::Input(format!(
                    "{}: the bank has no product-key value section",
                    bank.location()
                ))
            })?;
        let g = section.geometry;
        if g.rows as usize != pcfg.n_rows() || g.dim as usize != pcfg.v_dim {
            return Err(WebError::Input(format!(
                "{}: value section of {} rows × {} does not match the model's {} × {}",
                bank.location(),
                g.rows,
                g.dim,
                pcfg.n_rows(),
                pcfg.v_dim
            )));
        }
        // the value section only: the browser runs no FFN-memory blocks
        let engine = PageIn::new(
            &[section],
            &PageInOptions {
                budget_bytes,
                prefetch: false,
                token_pages: Some(pcfg.bag_size() as u32),
            },
        )?;
        let page_rows = g.page_rows as usize;
        let slots = ShardedTable::zeroed(
            &ctx,
            "value page slots",
            engine.value_slots() as usize * page_rows,
            g.dim as usize,
            GpuDtype::F32,
            page_rows,
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
            bank,
            cfg: pcfg,
            layers,
            engine,
            slots,
            lookup,
            bag,
            scratch: None,
            decoded: Vec::new(),
            clock: None,
        })
    }

    /// The device.
    pub fn gpu(&self) -> &GpuContext {
        &self.ctx
    }

    /// The remote bank.
    pub fn bank(&self) -> &RemoteBank<F> {
        &self.bank
    }

    /// The counters, with the budget, slots and resident gauges as of now.
    pub fn stats(&self) -> MemoryStats {
        self.engine.stats()
    }

    /// Whether layer `i` is a memory layer.
    pub fn is_memory_layer(&self, i: usize) -> bool {
        self.layers.iter().any(|l| l.layer == i)
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

    /// Runs every kernel once (a lookup of a zero query, an empty bag) so
    /// the driver compiles its pipelines now rather than in the first
    /// token: SwiftShader's JIT takes seconds. Counters are not touched;
    /// the one-token lookup buffers are kept for decoding.
    pub async fn warm_up(&mut self) -> Result<(), WebError> {
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
        scratch.out.read_async(&self.ctx).await?;
        self.scratch = Some(scratch);
        // one empty bag through the (empty) page table
        self.bag
            .run_paged_async(
                &self.ctx,
                &self.slots,
                self.engine.values().map_or(1, |v| v.page_rows),
                self.engine.page_table(),
                &[],
                &[],
                &[0, 0],
            )
            .await?;
        Ok(())
    }

    /// Output of memory layer `layer` for `x` (tokens, dim) → (tokens, dim).
    pub async fn forward(
        &mut self,
        layer: usize,
        x: &[f32],
        tokens: usize,
    ) -> Result<Vec<f32>, WebError> {
        let li = self
            .layers
            .iter()
            .position(|l| l.layer == layer)
            .ok_or_else(|| WebError::Input(format!("layer {layer} is not a memory layer")))?;
        memlayer_core::error::check_len("memory layer input", x, &[tokens, self.cfg.dim])?;
        if tokens == 0 {
            return Ok(Vec::new());
        }
        // (tokens, heads * k_dim)
        let query = pkm::project_query(&self.cfg, &self.layers[li].params, x, tokens);
        let scratch = self.scratch_for(tokens)?;
        let t0 = self.now();
        self.ctx
            .queue
            .write_buffer(&scratch.query, 0, bytemuck::cast_slice(&query));
        let mut encoder = self.ctx.device.create_command_encoder(&Default::default());
        self.lookup.record(
            &self.ctx,
            &mut encoder,
            &self.layers[li].keys,
            &scratch.query,
            &scratch.out,
        )?;
        self.ctx.queue.submit([encoder.finish()]);
        // (tokens, heads, knn) each
        let lk = scratch.out.read_async(&self.ctx).await?;
        self.scratch = Some(scratch);
        let t1 = self.now();
        self.engine.add_device_seconds(t1 - t0);
        let bag = self.cfg.bag_size();
        let memory = self
            .bag_paged(&lk.indices, &lk.weights, tokens, bag)
            .await?;
        let done = pkm::finish(&self.cfg, &self.layers[li].params, x, &memory, tokens);
        Ok(done.output)
    }

    /// Bags of `bag` rows each (`rows`, `weights`: (bags, bag)) through the
    /// page table, paging in runs of bags whose pages fit the slots → (bags, v_dim).
    async fn bag_paged(
        &mut self,
        rows: &[u32],
        weights: &[f32],
        bags: usize,
        bag: usize,
    ) -> Result<Vec<f32>, WebError> {
        let v = *self
            .engine
            .values()
            .ok_or_else(|| WebError::Input("the bank has no product-key value section".into()))?;
        let mut out = Vec::with_capacity(bags * v.dim);
        // the constructor guarantees one token's pages fit
        let runs = self.engine.value_runs(&rows[..bags * bag], bag)?;
        for run in runs {
            let (start, end) = (run.bags.start, run.bags.end);
            let t0 = self.now();
            let (ctx, slots) = (&self.ctx, &self.slots);
            page_in_async(
                &mut self.engine,
                &self.bank,
                &run.pages,
                &mut self.decoded,
                |slot, data| {
                    let words = memlayer_wgpu::buffers::encode_rows(data, v.dim, GpuDtype::F32);
                    slots
                        .write_rows(ctx, slot as usize * v.page_rows, &words)
                        .map_err(|e| e.to_string())
                },
            )
            .await?;
            let t1 = self.now();
            self.engine.add_fetch_seconds(t1 - t0);
            let offsets = memlayer_core::bag::uniform_offsets(end - start, bag);
            let part = self
                .bag
                .run_paged_async(
                    &self.ctx,
                    &self.slots,
                    v.page_rows,
                    self.engine.page_table(),
                    &rows[start * bag..end * bag],
                    &weights[start * bag..end * bag],
                    &offsets,
                )
                .await?;
            self.engine.add_device_seconds(self.now() - t1);
            out.extend(part);
        }
        Ok(out)
    }
}
