//! The device memory of a product-key model: the memory layers' lookups and
//! embedding-bags on wgpu (WebGPU in the browser), with the shared value
//! table paged in from a [`RemoteBank`] into device slots under a budget.
//!
//! Per memory layer and batch of tokens:
//! 1. the query projection runs on the CPU (`pkm::project_query`);
//! 2. `pk_qk_norm` / `pk_scores` / `pk_topk` / `pk_candidates` pick each
//!    token's `heads × knn` rows and their softmax weights on the device;
//!    they are read back (one round trip);
//! 3. the pages holding those rows are made resident: the LRU policy
//!    ([`PageCache`]) gives each missing page a slot, the pages are fetched
//!    (verified) and written into the slots; a batch whose pages do not fit
//!    the slots together is cut into runs of tokens that do;
//! 4. `bag_forward` sums the rows through the page table on the device (one
//!    round trip), and the layer is finished on the CPU (`pkm::finish`).
//!
//! The numbers equal `memlayer_core::pkm::forward` over the whole table: the
//! kernels are tested against it, and the bag sums in the oracle's order.

use crate::WebError;
use crate::bank::{PageFetch, RemoteBank};
use memlayer_bank::cache::{BagRun, NO_SLOT, PageCache, bag_runs};
use memlayer_bank::{PageId, SectionInfo, SectionKind, decode_into};
use memlayer_core::model::ModelConfig;
use memlayer_core::pkm::{self, PkmConfig, PkmParams};
use memlayer_wgpu::bag_forward::BagForward;
use memlayer_wgpu::buffers::storage_init;
use memlayer_wgpu::lookup::{LookupBuffers, LookupKernels, LookupPlan};
use memlayer_wgpu::{GpuContext, GpuDtype, ShardedTable};
use serde::Serialize;

/// Counters of a [`DeviceMemory`] (since it was opened).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MemoryStats {
    /// Resident budget in bytes (f32 slots).
    pub budget_bytes: u64,
    /// Slots (pages that fit the budget together).
    pub slots: u32,
    /// Value pages resident now.
    pub resident_pages: u64,
    /// Bytes of the resident pages.
    pub resident_bytes: u64,
    /// Value pages in the bank.
    pub bank_pages: u64,
    /// Pages brought in on misses (network or local copy).
    pub pages_streamed: u64,
    /// Of those, pages served by the browser's local copy (Cache API).
    pub pages_from_cache: u64,
    /// Bytes of the pages that came over the network.
    pub bytes_streamed: u64,
    /// Page accesses (one per distinct page per run of tokens).
    pub accesses: u64,
    /// Accesses that found the page resident.
    pub hits: u64,
    /// Accesses that had to bring the page in.
    pub misses: u64,
    /// Resident pages dropped to make room.
    pub evictions: u64,
    /// `hits / accesses` (1 before any access).
    pub hit_rate: f64,
    /// Seconds waiting for pages (network or local copy), with a clock set.
    pub fetch_seconds: f64,
    /// Seconds of lookups and bags on the device, read-backs included.
    pub device_seconds: f64,
}

/// One memory layer: its parameters and its sub-keys on the device.
struct MemoryLayer {
    layer: usize,
    params: PkmParams,
    /// (heads, 2, n_keys, k_dim/2) f32
    keys: wgpu::Buffer,
}

/// The value section's geometry.
#[derive(Clone, Copy, Debug)]
struct Values {
    section: SectionInfo,
    rows: usize,
    dim: usize,
    page_rows: usize,
}

/// The memory layers of a product-key model on a wgpu device, their value
/// table paged from a remote bank.
pub struct DeviceMemory<F> {
    ctx: GpuContext,
    bank: RemoteBank<F>,
    cfg: PkmConfig,
    layers: Vec<MemoryLayer>,
    values: Values,
    cache: PageCache,
    /// Slot of each value page (local ids), `NO_SLOT` when not resident.
    page_table: Vec<u32>,
    /// (slots × page_rows, dim) f32 on the device
    slots: ShardedTable,
    lookup: LookupKernels,
    bag: BagForward,
    stats: MemoryStats,
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
    /// `bank` into `budget_bytes` of device slots.
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
        let values = Values {
            section,
            rows: g.rows as usize,
            dim: g.dim as usize,
            page_rows: g.page_rows as usize,
        };
        if values.rows != pcfg.n_rows() || values.dim != pcfg.v_dim {
            return Err(WebError::Input(format!(
                "{}: value section of {} rows × {} does not match the model's {} × {}",
                bank.location(),
                values.rows,
                values.dim,
                pcfg.n_rows(),
                pcfg.v_dim
            )));
        }
        let slot_bytes = (values.page_rows * values.dim * 4) as u64;
        let cache = PageCache::new(budget_bytes, slot_bytes)
            .map_err(|e| WebError::Input(format!("memory budget: {e}")))?;
        let need = pcfg.bag_size() as u32;
        if cache.slot_count() < need.min(g.page_count as u32) {
            return Err(WebError::Input(format!(
                "a budget of {budget_bytes} bytes holds {} pages of {slot_bytes} bytes; one token \
                 reads up to {need} pages: raise the budget to at least {} bytes",
                cache.slot_count(),
                u64::from(need) * slot_bytes
            )));
        }
        let slots = ShardedTable::zeroed(
            &ctx,
            "value page slots",
            cache.slot_count() as usize * values.page_rows,
            values.dim,
            GpuDtype::F32,
            values.page_rows,
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
        let stats = MemoryStats {
            budget_bytes,
            slots: cache.slot_count(),
            bank_pages: g.page_count,
            hit_rate: 1.0,
            ..Default::default()
        };
        Ok(Self {
            page_table: vec![NO_SLOT; g.page_count as usize],
            ctx,
            bank,
            cfg: pcfg,
            layers,
            values,
            cache,
            slots,
            lookup,
            bag,
            stats,
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

    /// The counters.
    pub fn stats(&self) -> MemoryStats {
        let mut s = self.stats;
        s.resident_pages = self.cache.resident_pages() as u64;
        s.resident_bytes = s.resident_pages * self.cache.slot_bytes();
        s.hit_rate = if s.accesses == 0 {
            1.0
        } else {
            s.hits as f64 / s.accesses as f64
        };
        s
    }

    /// Whether layer `i` is a memory layer.
    pub fn is_memory_layer(&self, i: usize) -> bool {
        self.layers.iter().any(|l| l.layer == i)
    }

    /// Runs every kernel once (a lookup of a zero query, an empty bag) so
    /// the driver compiles its pipelines now rather than in the first
    /// token: SwiftShader's JIT takes seconds. Counters are not touched.
    pub async fn warm_up(&mut self) -> Result<(), WebError> {
        let Some(layer) = self.layers.first() else {
            return Ok(());
        };
        let plan = LookupPlan::new(&self.ctx, &self.cfg, 1)?;
        let out = LookupBuffers::new(&self.ctx, &plan)?;
        let query = storage_init(
            &self.ctx,
            "warm-up query",
            &vec![0f32; self.cfg.query_dim()],
        );
        let mut encoder = self.ctx.device.create_command_encoder(&Default::default());
        self.lookup
            .record(&self.ctx, &mut encoder, &layer.keys, &query, &out)?;
        self.ctx.queue.submit([encoder.finish()]);
        out.read_async(&self.ctx).await?;
        // one empty bag through the (empty) page table
        self.bag
            .run_paged_async(
                &self.ctx,
                &self.slots,
                self.values.page_rows,
                &self.page_table,
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
        let cfg = self.cfg.clone();
        // (tokens, heads * k_dim)
        let query = pkm::project_query(&cfg, &self.layers[li].params, x, tokens);
        let plan = LookupPlan::new(&self.ctx, &cfg, tokens)?;
        let out = LookupBuffers::new(&self.ctx, &plan)?;
        let t0 = self.now();
        let query_buf = storage_init(&self.ctx, "memory query", &query);
        let mut encoder = self.ctx.device.create_command_encoder(&Default::default());
        self.lookup.record(
            &self.ctx,
            &mut encoder,
            &self.layers[li].keys,
            &query_buf,
            &out,
        )?;
        self.ctx.queue.submit([encoder.finish()]);
        // (tokens, heads, knn) each
        let lk = out.read_async(&self.ctx).await?;
        self.stats.device_seconds += self.now() - t0;
        let bag = cfg.bag_size();
        let memory = self
            .bag_paged(&lk.indices, &lk.weights, tokens, bag)
            .await?;
        let done = pkm::finish(&cfg, &self.layers[li].params, x, &memory, tokens);
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
        let v = self.values;
        if let Some(&bad) = rows.iter().find(|&&r| r as usize >= v.rows) {
            return Err(WebError::Input(format!(
                "value row {bad} outside the bank's {} rows",
                v.rows
            )));
        }
        let slots = self.cache.slot_count() as usize;
        let mut out = Vec::with_capacity(bags * v.dim);
        // the constructor guarantees one token's pages fit
        let runs = bag_runs(&rows[..bags * bag], bag, v.page_rows, slots)
            .map_err(|e| WebError::Input(e.to_string()))?;
        for BagRun { bags: run, pages } in runs {
            let (start, end) = (run.start, run.end);
            let t0 = self.now();
            self.page_in(&pages).await?;
            let t1 = self.now();
            self.stats.fetch_seconds += t1 - t0;
            let offsets: Vec<usize> = (0..=end - start).map(|b| b * bag).collect();
            let part = self
                .bag
                .run_paged_async(
                    &self.ctx,
                    &self.slots,
                    v.page_rows,
                    &self.page_table,
                    &rows[start * bag..end * bag],
                    &weights[start * bag..end * bag],
                    &offsets,
                )
                .await?;
            self.stats.device_seconds += self.now() - t1;
            out.extend(part);
        }
        Ok(out)
    }

    /// Makes the value pages `local` (distinct local ids) resident together.
    async fn page_in(&mut self, local: &[u32]) -> Result<(), WebError> {
        let first = self.values.section.first_page;
        let globals: Vec<PageId> = local.iter().map(|&p| first + u64::from(p)).collect();
        let admitted = self
            .cache
            .admit(&globals, first, &mut self.page_table)
            .map_err(|e| WebError::Input(e.to_string()))?;
        self.stats.accesses += globals.len() as u64;
        self.stats.hits += admitted.hits;
        self.stats.misses += admitted.misses.len() as u64;
        self.stats.evictions += admitted.evictions;
        let misses = admitted.misses;
        if misses.is_empty() {
            return Ok(());
        }
        let pages: Vec<PageId> = misses.iter().map(|m| m.0).collect();
        let fetched = self.bank.read_pages(&pages).await;
        let dtype = self.values.section.spec.dtype;
        let mut failure = None;
        let mut decoded = Vec::new();
        for (&(page, slot), r) in misses.iter().zip(fetched) {
            let written = r.and_then(|f| {
                decoded.clear();
                decoded.resize(f.bytes.len() / dtype.size(), 0.0);
                decode_into(dtype, &f.bytes, &mut decoded)?;
                let words =
                    memlayer_wgpu::buffers::encode_rows(&decoded, self.values.dim, GpuDtype::F32);
                self.slots
                    .write_rows(&self.ctx, slot as usize * self.values.page_rows, &words)?;
                Ok(f)
            });
            match written {
                Ok(f) => {
                    self.page_table[(page - first) as usize] = slot;
                    self.stats.pages_streamed += 1;
                    if f.from_cache {
                        self.stats.pages_from_cache += 1;
                    } else {
                        self.stats.bytes_streamed += f.bytes.len() as u64;
                    }
                }
                Err(e) => {
                    // not resident: a later access fetches it again
                    self.cache.remove(page);
                    failure.get_or_insert(e);
                }
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
