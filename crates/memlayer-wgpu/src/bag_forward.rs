//! Embedding-bag forward kernel (flat and paged tables, f32 and f16 storage).
//!
//! The GPU version of [`memlayer_core::bag::bag_forward`]: sum mode with
//! per-sample weights, CSR offsets, empty bags give zero rows, accumulation in
//! f32 in entry order (bit-identical to the oracle when the table takes at
//! most [`SHARDS_PER_PASS`] shards; see `shaders/bag_forward.wgsl`).
//!
//! Rows come from a [`ShardedTable`] either directly ([`BagTable::Flat`]) or
//! through a page table ([`BagTable::Paged`]: row → page = row / page_rows →
//! slot = page_table[page] → row slot * page_rows + row % page_rows of a slot
//! pool). On the device a bag that touches a missing page (slot
//! `0xFFFFFFFF`, or any slot outside the pool) or an out-of-range row comes
//! out as NaN; the host-level [`BagForward::run_flat`]/[`BagForward::run_paged`]
//! check every entry first and return a [`GpuError`] naming it.
//!
//! Two kernels: `bag_forward_vec4.wgsl` (16-byte loads) for f32 rows with
//! `dim % 4 == 0` and f16 rows with `dim % 8 == 0`, `bag_forward.wgsl`
//! (u32 loads) for any other width; both give the same bits.

use crate::buffers::{GpuDtype, PendingRead, ShardedTable, StagingPool};
use crate::context::{GpuContext, GpuError};
use crate::launch::{Kernels, Launcher, u32_of};
use crate::shaders::{self, Variant};
use std::sync::Mutex;

/// Shard bindings of the kernel: a table of more shards takes
/// `ceil(shards / SHARDS_PER_PASS)` dispatches.
pub const SHARDS_PER_PASS: usize = 3;

/// Page-table entry of a page that is not resident.
pub const MISSING_PAGE: u32 = u32::MAX;

const WG: usize = 256;
const PER_LANE: usize = 4;
/// vec4s per invocation and block in bag_forward_vec4.wgsl (its PER_LANE);
/// f16 rows use half of them (see the shader header)
const PER_LANE_VEC4: usize = 16;

crate::params! {
/// Uniform of `bag_forward.wgsl` / `bag_forward_vec4.wgsl`. (WGSL layout).
pub struct Params {
    /// Number of bags: rows of `out` (`offsets` holds `bags + 1` entries).
    pub bags: u32,
    /// Elements per table row and per output row.
    pub dim: u32,
    /// u32 words per row (bag_forward.wgsl) or vec4s per row (bag_forward_vec4.wgsl)
    pub row_words: u32,
    /// Shards of the table (1 skips the per-entry shard arithmetic).
    pub n_shards: u32,
    /// Invocations per bag (a power of two, at most 256).
    pub tpb: u32,
    /// Bags per workgroup of 256 invocations (`256 / tpb`).
    pub bags_per_wg: u32,
    /// Workgroups along x of the dispatch grid (workgroup id = `y * x_groups + x`).
    pub x_groups: u32,
    /// log2(page_rows) when page_rows is a power of two, else u32::MAX
    pub page_shift: u32,
    /// Rows of the table (flat: an index is valid if below it).
    pub rows: u32,
    /// Rows per page (1 for a flat table).
    pub page_rows: u32,
    /// Entries of the page table (0 for a flat table).
    pub n_pages: u32,
    /// Page slots in the table's pool, `rows / page_rows` (0 for a flat table).
    pub n_slots: u32,
    /// Rows of every shard but the last: shard = row / rows_per_shard.
    pub rows_per_shard: u32,
    /// First shard bound in this pass (a multiple of [`SHARDS_PER_PASS`]).
    pub first_shard: u32,
    /// 0: the pass writes `out`; 1: it adds to `out` (later passes of a table of many shards).
    pub accumulate: u32,
    /// 1.0, multiplied into each product so it is rounded before it is added (no FMA contraction).
    pub one: f32,
}
}

/// Where the bag's rows come from.
#[derive(Clone, Copy)]
pub enum BagTable<'a> {
    /// Row `i` of the table is row `i` of this sharded table.
    Flat(&'a ShardedTable),
    /// Row `i` is row `i % page_rows` of page `i / page_rows`, which sits in
    /// slot `page_table[page]` of `slots` (slot `s` = rows
    /// `s * page_rows .. (s + 1) * page_rows`).
    Paged {
        /// The slot pool; its `rows_per_shard` must be a multiple of `page_rows`.
        slots: &'a ShardedTable,
        /// Rows per page.
        page_rows: usize,
        /// Pages in the (virtual) table: rows `0 .. n_pages * page_rows`.
        n_pages: usize,
        /// (n_pages) u32 slot of each page, [`MISSING_PAGE`] if absent.
        page_table: &'a wgpu::Buffer,
    },
}

impl BagTable<'_> {
    fn storage(&self) -> &ShardedTable {
        match self {
            BagTable::Flat(t) => t,
            BagTable::Paged { slots, .. } => slots,
        }
    }
}

/// A table as a bag sequence binds it (`B`: the launcher's buffer type).
pub struct TableView<'a, B> {
    /// The shards, `rows_per_shard` rows each (the last may hold fewer).
    pub shards: &'a [B],
    /// Rows stored.
    pub rows: usize,
    /// Elements per row.
    pub dim: usize,
    /// Storage type.
    pub dtype: GpuDtype,
    /// Rows per shard.
    pub rows_per_shard: usize,
}

/// A page table in front of a [`TableView`] of slots.
pub struct Paging<'a, B> {
    /// (n_pages) u32 slot of each page, [`MISSING_PAGE`] if absent.
    pub page_table: &'a B,
    /// Rows per page.
    pub page_rows: usize,
    /// Pages in the virtual table.
    pub n_pages: usize,
}

/// The bag's CSR inputs and output (`B`: the launcher's buffer type).
pub struct BagIo<'a, B> {
    /// (nnz) u32 row ids.
    pub indices: &'a B,
    /// (nnz) f32 per-sample weights.
    pub weights: &'a B,
    /// (bags + 1) u32 CSR offsets.
    pub offsets: &'a B,
    /// (bags, dim) f32 output.
    pub out: &'a B,
    /// Bags.
    pub bags: usize,
}

/// Which kernel a table of this storage type and width takes: the 16-byte-load
/// kernel where the width allows it and `vectorised` does not say no.
pub fn takes_vec4(dtype: GpuDtype, dim: usize, vectorised: Option<bool>) -> bool {
    let fits = match dtype {
        GpuDtype::F32 => dim.is_multiple_of(4),
        GpuDtype::F16 | GpuDtype::Bf16 => dim.is_multiple_of(8),
    };
    fits && vectorised.unwrap_or(true)
}

/// The registry variant of the bag forward for (kernel, storage, paging).
pub fn kernel(vec4: bool, dtype: GpuDtype, paged: bool) -> Variant {
    let shader = if vec4 {
        &shaders::BAG_FORWARD_VEC4
    } else {
        &shaders::BAG_FORWARD
    };
    // overrides: F16 (bit 0), PAGED (bit 1), BF16 (bit 2)
    shader.variant(
        (dtype == GpuDtype::F16) as u32
            | (paged as u32) << 1
            | ((dtype == GpuDtype::Bf16) as u32) << 2,
    )
}

/// Launches the embedding-bag forward `out[b] = Σ_{e in bag b} weights[e] *
/// table[row(indices[e])]` (row through `paging` when given), in
/// `ceil(shards / SHARDS_PER_PASS)` dispatches. Nothing for zero bags.
pub fn bag_forward<L: Launcher>(
    l: &mut L,
    vectorised: Option<bool>,
    table: &TableView<'_, L::Buffer>,
    paging: Option<&Paging<'_, L::Buffer>>,
    io: &BagIo<'_, L::Buffer>,
) -> Result<(), GpuError> {
    let (bags, dim) = (io.bags, table.dim);
    if bags == 0 || dim == 0 {
        return Ok(());
    }
    if table.rows_per_shard == 0 || table.shards.is_empty() {
        return Err(GpuError::Invalid(format!(
            "table of {} rows in {} shards cannot be addressed by the kernel",
            table.rows,
            table.shards.len()
        )));
    }
    let vec4 = takes_vec4(table.dtype, dim, vectorised);
    let kernel = kernel(vec4, table.dtype, paging.is_some());
    let row_words = table.dtype.row_words(dim);
    // words per row for bag_forward.wgsl (4 per invocation and block),
    // vec4s per row for bag_forward_vec4.wgsl (16 per invocation and
    // block for f32, 8 for f16; at least 2 invocations per bag: measured)
    let (row_words, per_lane, min_tpb) = match (vec4, table.dtype) {
        (false, _) => (row_words, PER_LANE, 1),
        (true, GpuDtype::F32) => (row_words / 4, PER_LANE_VEC4, 2),
        (true, GpuDtype::F16 | GpuDtype::Bf16) => (row_words / 4, PER_LANE_VEC4 / 2, 2),
    };
    let tpb = row_words
        .div_ceil(per_lane)
        .next_power_of_two()
        .clamp(min_tpb, WG);
    let bags_per_wg = WG / tpb;
    let g = l.grid(bags.div_ceil(bags_per_wg))?;
    let unused = l.unused()?;
    let (page_rows, n_pages, page_table) = match paging {
        Some(p) => (p.page_rows, p.n_pages, p.page_table),
        None => (1, 0, &unused),
    };
    let n_slots = if paging.is_some() {
        table.rows / page_rows.max(1)
    } else {
        0
    };
    let mut params = Params {
        bags: u32_of("bags", bags)?,
        dim: u32_of("dim", dim)?,
        row_words: u32_of("row words", row_words)?,
        n_shards: u32_of("shards", table.shards.len())?,
        tpb: tpb as u32,
        bags_per_wg: bags_per_wg as u32,
        x_groups: g.x,
        page_shift: if page_rows.is_power_of_two() {
            page_rows.trailing_zeros()
        } else {
            u32::MAX
        },
        rows: u32_of("table rows", table.rows)?,
        page_rows: u32_of("page rows", page_rows)?,
        n_pages: u32_of("pages", n_pages)?,
        n_slots: u32_of("slots", n_slots)?,
        rows_per_shard: u32_of("rows per shard", table.rows_per_shard)?,
        first_shard: 0,
        accumulate: 0,
        one: 1.0,
    };
    for (pass, first) in (0..table.shards.len()).step_by(SHARDS_PER_PASS).enumerate() {
        params.first_shard = first as u32;
        params.accumulate = (pass > 0) as u32;
        // shard bindings past the table's last shard are not read
        let shard = |i: usize| table.shards.get(first + i).unwrap_or(&unused);
        l.launch(
            kernel,
            &params,
            &[
                io.indices,
                io.weights,
                io.offsets,
                page_table,
                io.out,
                shard(0),
                shard(1),
                shard(2),
            ],
            g,
        )?;
    }
    Ok(())
}

/// Device inputs of host-level bags, reused from call to call (grown when a
/// call needs more), so a repeated decode step creates no buffer.
#[derive(Default)]
struct InputPool {
    /// indices, weights, offsets, page table, out
    buffers: [Option<wgpu::Buffer>; 5],
}

impl InputPool {
    /// Slot `i` holding at least `bytes` bytes (at least 4), created on demand.
    fn get(&mut self, ctx: &GpuContext, kernels: &Kernels, i: usize, bytes: u64) -> wgpu::Buffer {
        let bytes = bytes.max(4);
        match &self.buffers[i] {
            Some(b) if b.size() >= bytes => b.clone(),
            _ => {
                kernels.count_buffer();
                // room to grow, within one binding
                let limit = ctx.max_binding_bytes() / 4 * 4;
                let size = bytes.next_power_of_two().min(limit).max(bytes);
                let b = crate::buffers::storage_zeroed(ctx, "bag input", size);
                self.buffers[i] = Some(b.clone());
                b
            }
        }
    }

    /// Slot `i` holding `data` (written by the queue).
    fn write<T: bytemuck::Pod>(
        &mut self,
        ctx: &GpuContext,
        kernels: &Kernels,
        i: usize,
        data: &[T],
    ) -> wgpu::Buffer {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let b = self.get(ctx, kernels, i, bytes.len() as u64);
        if !bytes.is_empty() {
            ctx.queue.write_buffer(&b, 0, bytes);
        }
        b
    }
}

/// The embedding-bag forward pipelines, built once per device: both kernels
/// (`bag_forward.wgsl`, `bag_forward_vec4.wgsl`), each in one variant per
/// (storage type, flat/paged), selected by WGSL override constants; their
/// bind groups cached, and the host-level calls' device inputs and
/// read-back staging pooled: a repeated [`BagForward::run_paged`] with the
/// same slots and no larger shapes creates no bind group and no buffer
/// ([`BagForward::stats`]).
pub struct BagForward {
    kernels: Kernels,
    inputs: Mutex<InputPool>,
    staging: StagingPool,
    /// Which kernel: `Some(true)` the 16-byte-load kernel whenever the row
    /// width allows it, `Some(false)` always the u32 one, `None` (default)
    /// automatic: 16-byte loads wherever the width allows (on lavapipe
    /// faster than the u32 kernel at every width measured, 64 to 1024).
    /// Both give bit-identical results.
    pub vectorised: Option<bool>,
}

impl BagForward {
    /// Compiles the kernels' twelve variants (f32, f16, bf16 × flat, paged
    /// × u32, vec4 loads; F16 with BF16 is no storage type).
    pub fn new(ctx: &GpuContext) -> Result<Self, GpuError> {
        let variants = shaders::BAG_FORWARD
            .variants()
            .chain(shaders::BAG_FORWARD_VEC4.variants())
            .filter(|v| !(v.flag(0) && v.flag(2)));
        Ok(Self {
            kernels: Kernels::new(ctx, variants)?,
            inputs: Mutex::default(),
            staging: StagingPool::default(),
            vectorised: None,
        })
    }

    /// Bind groups and buffers created so far (pipelines' cache, pooled
    /// inputs and staging buffers).
    pub fn stats(&self) -> crate::launch::LaunchStats {
        let mut s = self.kernels.stats();
        s.buffers += self.staging.created();
        s
    }

    /// Records `out[b] = Σ_{e in bag b} weights[e] * table[indices[e]]`.
    ///
    /// indices: (nnz) u32; weights: (nnz) f32; offsets: (bags + 1) u32 CSR
    /// (non-decreasing, from 0 to nnz; the device only clamps them to the
    /// indices buffer); out: (bags, dim) f32. Entries whose row cannot be
    /// resolved turn their bag into NaN. Records nothing for zero bags.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        table: BagTable<'_>,
        indices: &wgpu::Buffer,
        weights: &wgpu::Buffer,
        offsets: &wgpu::Buffer,
        bags: usize,
        out: &wgpu::Buffer,
    ) -> Result<(), GpuError> {
        let t = table.storage();
        let dim = t.dim;
        let out_bytes = (bags as u64) * (dim as u64) * 4;
        if out.size() < out_bytes {
            return Err(GpuError::Invalid(format!(
                "bag output holds {} bytes, ({bags}, {dim}) f32 needs {out_bytes}",
                out.size()
            )));
        }
        if out_bytes > ctx.max_binding_bytes() {
            return Err(GpuError::Invalid(format!(
                "bag output ({bags}, {dim}) f32 takes {out_bytes} bytes, more than one binding \
                 ({} bytes); split the batch",
                ctx.max_binding_bytes()
            )));
        }
        if offsets.size() < (bags as u64 + 1) * 4 {
            return Err(GpuError::Invalid(format!(
                "offsets buffer holds {} bytes, {bags} bags need {}",
                offsets.size(),
                (bags + 1) * 4
            )));
        }
        if t.rows > u32::MAX as usize || t.rows_per_shard == 0 || t.shards.is_empty() {
            return Err(GpuError::Invalid(format!(
                "table of {} rows in {} shards cannot be addressed by the kernel",
                t.rows,
                t.shards.len()
            )));
        }
        let paging = match table {
            BagTable::Flat(_) => None,
            BagTable::Paged {
                slots,
                page_rows,
                n_pages,
                page_table,
            } => {
                if page_rows == 0 || slots.rows_per_shard % page_rows != 0 {
                    return Err(GpuError::Invalid(format!(
                        "page_rows {page_rows} must be positive and divide the slot pool's \
                         rows_per_shard {} (a page must not straddle two shards)",
                        slots.rows_per_shard
                    )));
                }
                if n_pages > u32::MAX as usize || page_table.size() < n_pages as u64 * 4 {
                    return Err(GpuError::Invalid(format!(
                        "page table buffer of {} bytes cannot hold {n_pages} pages",
                        page_table.size()
                    )));
                }
                Some(Paging {
                    page_table,
                    page_rows,
                    n_pages,
                })
            }
        };
        let view = TableView {
            shards: &t.shards,
            rows: t.rows,
            dim,
            dtype: t.dtype,
            rows_per_shard: t.rows_per_shard,
        };
        let io = BagIo {
            indices,
            weights,
            offsets,
            out,
            bags,
        };
        bag_forward(
            &mut self.kernels.launcher(ctx, encoder),
            self.vectorised,
            &view,
            paging.as_ref(),
            &io,
        )
    }

    /// Host-level bag forward over a flat sharded table `(rows, dim)`:
    /// indices, weights: (nnz); offsets: (bags + 1) → (bags, dim).
    pub fn run_flat(
        &self,
        ctx: &GpuContext,
        table: &ShardedTable,
        indices: &[u32],
        weights: &[f32],
        offsets: &[usize],
    ) -> Result<Vec<f32>, GpuError> {
        let bags = check_bags(table.rows, indices, weights, offsets)?;
        let pending = self.submit(ctx, table, None, indices, weights, offsets, bags)?;
        self.finish(ctx, pending)
    }

    /// Host-level bag forward through a page table: row `i` of the virtual
    /// `(page_table.len() * page_rows, dim)` table is row `i % page_rows` of
    /// slot `page_table[i / page_rows]` of `slots`. A page an entry needs that
    /// is missing ([`MISSING_PAGE`] or outside the pool) is an error.
    /// indices, weights: (nnz); offsets: (bags + 1) → (bags, dim).
    #[allow(clippy::too_many_arguments)]
    pub fn run_paged(
        &self,
        ctx: &GpuContext,
        slots: &ShardedTable,
        page_rows: usize,
        page_table: &[u32],
        indices: &[u32],
        weights: &[f32],
        offsets: &[usize],
    ) -> Result<Vec<f32>, GpuError> {
        let bags = check_paged(slots, page_rows, page_table, indices, weights, offsets)?;
        let pages = Some((page_rows, page_table));
        let pending = self.submit(ctx, slots, pages, indices, weights, offsets, bags)?;
        self.finish(ctx, pending)
    }

    /// [`BagForward::run_paged`] as a future (the web's read-back yields to
    /// the browser; natively it polls the device).
    #[allow(clippy::too_many_arguments)]
    pub async fn run_paged_async(
        &self,
        ctx: &GpuContext,
        slots: &ShardedTable,
        page_rows: usize,
        page_table: &[u32],
        indices: &[u32],
        weights: &[f32],
        offsets: &[usize],
    ) -> Result<Vec<f32>, GpuError> {
        let bags = check_paged(slots, page_rows, page_table, indices, weights, offsets)?;
        let pages = Some((page_rows, page_table));
        match self.submit(ctx, slots, pages, indices, weights, offsets, bags)? {
            Some(p) => {
                let parts = p.finish(ctx, Some(&self.staging)).await?;
                Ok(bytemuck::pod_collect_to_vec(&parts[0]))
            }
            None => Ok(Vec::new()),
        }
    }

    /// Blocks on a submitted bag's read-back (natively; on the web a
    /// read-back must yield: use the async methods).
    fn finish(&self, ctx: &GpuContext, pending: Option<PendingRead>) -> Result<Vec<f32>, GpuError> {
        let Some(p) = pending else {
            return Ok(Vec::new());
        };
        #[cfg(not(target_arch = "wasm32"))]
        {
            let parts = pollster::block_on(p.finish(ctx, Some(&self.staging)))?;
            Ok(bytemuck::pod_collect_to_vec(&parts[0]))
        }
        #[cfg(target_arch = "wasm32")]
        {
            let _ = (ctx, p);
            Err(GpuError::ReadBack(
                "a blocking read-back is impossible on the web: use run_paged_async".into(),
            ))
        }
    }

    /// Writes the (checked) bag inputs into the pooled device buffers,
    /// records the bag and the copy of its output `(bags, dim)` f32 to a
    /// staging buffer, and submits: the pending read-back, or `None` when
    /// there is nothing to compute. Inputs, output, bind groups and staging
    /// are reused, so a repeated call creates nothing on the device.
    #[allow(clippy::too_many_arguments)]
    fn submit(
        &self,
        ctx: &GpuContext,
        table: &ShardedTable,
        pages: Option<(usize, &[u32])>,
        indices: &[u32],
        weights: &[f32],
        offsets: &[usize],
        bags: usize,
    ) -> Result<Option<PendingRead>, GpuError> {
        let dim = table.dim;
        if bags == 0 || dim == 0 {
            return Ok(None);
        }
        let limit = ctx.max_binding_bytes();
        if indices.len() as u64 * 4 > limit {
            return Err(GpuError::Invalid(format!(
                "{} entries take more than one binding ({limit} bytes); split the batch",
                indices.len()
            )));
        }
        let offsets32: Vec<u32> = offsets.iter().map(|&o| o as u32).collect();
        let out_bytes = (bags * dim) as u64 * 4;
        // the pool stays locked until the submit, so a concurrent call's
        // writes land after this call's commands
        let mut pool = self.inputs.lock().unwrap_or_else(|e| e.into_inner());
        let k = &self.kernels;
        let (ib, wb, ob, pt, out) = ctx.scoped("uploading bag inputs", || {
            (
                pool.write(ctx, k, 0, indices),
                pool.write(ctx, k, 1, weights),
                pool.write(ctx, k, 2, &offsets32),
                pool.write(ctx, k, 3, pages.map_or(&[][..], |p| p.1)),
                pool.get(ctx, k, 4, out_bytes),
            )
        })?;
        let table = match pages {
            None => BagTable::Flat(table),
            Some((page_rows, page_table)) => BagTable::Paged {
                slots: table,
                page_rows,
                n_pages: page_table.len(),
                page_table: &pt,
            },
        };
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        ctx.scoped("recording the bag forward", || {
            self.record(ctx, &mut encoder, table, &ib, &wb, &ob, bags, &out)
        })??;
        let pending = PendingRead::record(
            ctx,
            Some(&self.staging),
            &mut encoder,
            &[(&out, 0, out_bytes)],
        )?;
        ctx.queue.submit([encoder.finish()]);
        drop(pool);
        Ok(pending)
    }
}

/// Checks a paged bag's inputs (CSR shape, rows, every entry's page
/// resident in the pool); returns the number of bags.
fn check_paged(
    slots: &ShardedTable,
    page_rows: usize,
    page_table: &[u32],
    indices: &[u32],
    weights: &[f32],
    offsets: &[usize],
) -> Result<usize, GpuError> {
    if page_rows == 0 {
        return Err(GpuError::Invalid("page_rows must be positive".into()));
    }
    let rows = page_table.len().checked_mul(page_rows).ok_or_else(|| {
        GpuError::Invalid(format!(
            "{} pages of {page_rows} rows overflow",
            page_table.len()
        ))
    })?;
    let bags = check_bags(rows, indices, weights, offsets)?;
    let n_slots = slots.rows / page_rows;
    for b in 0..bags {
        for (e, &row) in indices
            .iter()
            .enumerate()
            .take(offsets[b + 1])
            .skip(offsets[b])
        {
            let page = row as usize / page_rows;
            let slot = page_table[page];
            if slot as usize >= n_slots {
                let what = if slot == MISSING_PAGE {
                    "is missing from the page table".to_string()
                } else {
                    format!("maps to slot {slot}, outside the pool of {n_slots} slots")
                };
                return Err(GpuError::Invalid(format!(
                    "bag {b}, entry {e} (row {row}): page {page} {what}"
                )));
            }
        }
    }
    Ok(bags)
}

/// Checks CSR bags as `memlayer_core::bag` does; returns the number of bags.
fn check_bags(
    rows: usize,
    indices: &[u32],
    weights: &[f32],
    offsets: &[usize],
) -> Result<usize, GpuError> {
    if weights.len() != indices.len() {
        return Err(GpuError::Invalid(format!(
            "{} per-sample weights for {} indices (need one per index)",
            weights.len(),
            indices.len()
        )));
    }
    if indices.len() > u32::MAX as usize {
        return Err(GpuError::Invalid(format!(
            "{} entries do not fit 32-bit offsets",
            indices.len()
        )));
    }
    let Some(bags) = offsets.len().checked_sub(1) else {
        return Err(GpuError::Invalid(
            "offsets must have bags + 1 entries (at least one)".into(),
        ));
    };
    if offsets[0] != 0 || offsets[bags] != indices.len() {
        return Err(GpuError::Invalid(format!(
            "offsets must start at 0 and end at {} (got {} .. {})",
            indices.len(),
            offsets[0],
            offsets[bags]
        )));
    }
    if let Some(b) = offsets.windows(2).position(|w| w[0] > w[1]) {
        return Err(GpuError::Invalid(format!(
            "offsets must be non-decreasing (offsets[{b}] = {} > offsets[{}] = {})",
            offsets[b],
            b + 1,
            offsets[b + 1]
        )));
    }
    if let Some(e) = indices.iter().position(|&i| i as usize >= rows) {
        return Err(GpuError::Invalid(format!(
            "index {} (entry {e}) out of range for a table of {rows} rows",
            indices[e]
        )));
    }
    Ok(bags)
}
