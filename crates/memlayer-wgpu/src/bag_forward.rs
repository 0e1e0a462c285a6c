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

use crate::buffers::{
    GpuDtype, Kernel, ShardedTable, grid, read_back, read_back_async, storage_init, uniform_init,
};
use crate::context::{GpuContext, GpuError};

/// WGSL of the embedding-bag forward kernel (any row width, u32 loads).
pub const SOURCE: &str = include_str!("../../../shaders/bag_forward.wgsl");
/// WGSL of its 16-byte-load variant (f32 rows with dim % 4 == 0, f16 rows
/// with dim % 8 == 0).
pub const SOURCE_VEC4: &str = include_str!("../../../shaders/bag_forward_vec4.wgsl");

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

/// Uniform of `bag_forward.wgsl` / `bag_forward_vec4.wgsl`. (WGSL layout).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    pub bags: u32,
    pub dim: u32,
    /// u32 words per row (bag_forward.wgsl) or vec4s per row (bag_forward_vec4.wgsl)
    pub row_words: u32,
    pub n_shards: u32,
    pub tpb: u32,
    pub bags_per_wg: u32,
    pub x_groups: u32,
    /// log2(page_rows) when page_rows is a power of two, else u32::MAX
    pub page_shift: u32,
    pub rows: u32,
    pub page_rows: u32,
    pub n_pages: u32,
    pub n_slots: u32,
    pub rows_per_shard: u32,
    pub first_shard: u32,
    pub accumulate: u32,
    pub one: f32,
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

/// The embedding-bag forward pipelines, built once per device: both kernels
/// (`bag_forward.wgsl`, `bag_forward_vec4.wgsl`), each in one variant per
/// (storage type, flat/paged), selected by WGSL override constants.
pub struct BagForward {
    /// `[f16 as usize][paged as usize]`, u32 loads, any width
    kernels: [[Kernel; 2]; 2],
    /// the same with 16-byte loads
    kernels_vec4: [[Kernel; 2]; 2],
    /// Which kernel: `Some(true)` the 16-byte-load kernel whenever the row
    /// width allows it, `Some(false)` always the u32 one, `None` (default)
    /// automatic: 16-byte loads wherever the width allows (on lavapipe
    /// faster than the u32 kernel at every width measured, 64 to 1024).
    /// Both give bit-identical results.
    pub vectorised: Option<bool>,
}

impl BagForward {
    /// Compiles the kernels' eight variants.
    pub fn new(ctx: &GpuContext) -> Result<Self, GpuError> {
        let k = |name, source, f16: bool, paged: bool| {
            Kernel::new(
                ctx,
                name,
                source,
                "main",
                &[("F16", f16 as u8 as f64), ("PAGED", paged as u8 as f64)],
            )
        };
        let four = |name, source| -> Result<[[Kernel; 2]; 2], GpuError> {
            Ok([
                [
                    k(name, source, false, false)?,
                    k(name, source, false, true)?,
                ],
                [k(name, source, true, false)?, k(name, source, true, true)?],
            ])
        };
        Ok(Self {
            kernels: four("bag_forward", SOURCE)?,
            kernels_vec4: four("bag_forward_vec4", SOURCE_VEC4)?,
            vectorised: None,
        })
    }

    /// Whether a table of this storage type and width takes the 16-byte-load kernel.
    fn takes_vec4(&self, dtype: GpuDtype, dim: usize) -> bool {
        let fits = match dtype {
            GpuDtype::F32 => dim.is_multiple_of(4),
            GpuDtype::F16 => dim.is_multiple_of(8),
        };
        fits && self.vectorised.unwrap_or(true)
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
        let (paged, page_rows, n_pages, n_slots, page_table) = match table {
            BagTable::Flat(_) => (false, 1, 0, 0, indices),
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
                (true, page_rows, n_pages, slots.rows / page_rows, page_table)
            }
        };
        if bags == 0 {
            return Ok(());
        }
        let vec4 = self.takes_vec4(t.dtype, dim);
        let kernels = if vec4 {
            &self.kernels_vec4
        } else {
            &self.kernels
        };
        let kernel = &kernels[(t.dtype == GpuDtype::F16) as usize][paged as usize];
        // words per row for bag_forward.wgsl (4 per invocation and block),
        // vec4s per row for bag_forward_vec4.wgsl (16 per invocation and
        // block for f32, 8 for f16; at least 2 invocations per bag: measured)
        let (row_words, per_lane, min_tpb) = match (vec4, t.dtype) {
            (false, _) => (t.row_words(), PER_LANE, 1),
            (true, GpuDtype::F32) => (t.row_words() / 4, PER_LANE_VEC4, 2),
            (true, GpuDtype::F16) => (t.row_words() / 4, PER_LANE_VEC4 / 2, 2),
        };
        let tpb = row_words
            .div_ceil(per_lane)
            .next_power_of_two()
            .clamp(min_tpb, WG);
        let bags_per_wg = WG / tpb;
        let groups = grid(ctx, bags.div_ceil(bags_per_wg) as u32);
        for (pass, first) in (0..t.shards.len()).step_by(SHARDS_PER_PASS).enumerate() {
            let params = uniform_init(
                ctx,
                "bag_forward params",
                &Params {
                    bags: bags as u32,
                    dim: dim as u32,
                    row_words: row_words as u32,
                    n_shards: t.shards.len() as u32,
                    tpb: tpb as u32,
                    bags_per_wg: bags_per_wg as u32,
                    x_groups: groups.0,
                    page_shift: if page_rows.is_power_of_two() {
                        page_rows.trailing_zeros()
                    } else {
                        u32::MAX
                    },
                    rows: t.rows as u32,
                    page_rows: page_rows as u32,
                    n_pages: n_pages as u32,
                    n_slots: n_slots as u32,
                    rows_per_shard: t.rows_per_shard as u32,
                    first_shard: first as u32,
                    accumulate: (pass > 0) as u32,
                    one: 1.0,
                },
            );
            let shard = |i: usize| t.shards.get(first + i).unwrap_or(&t.shards[first]);
            kernel.dispatch(
                ctx,
                encoder,
                &[
                    params.as_entire_binding(),
                    indices.as_entire_binding(),
                    weights.as_entire_binding(),
                    offsets.as_entire_binding(),
                    page_table.as_entire_binding(),
                    out.as_entire_binding(),
                    shard(0).as_entire_binding(),
                    shard(1).as_entire_binding(),
                    shard(2).as_entire_binding(),
                ],
                groups,
            );
        }
        Ok(())
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
        self.run(ctx, BagTable::Flat(table), indices, weights, offsets, bags)
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
        let (bags, out) =
            self.submit_paged(ctx, slots, page_rows, page_table, indices, weights, offsets)?;
        match out {
            Some(out) => read_back(ctx, &out, 0, bags * slots.dim),
            None => Ok(Vec::new()),
        }
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
        let (bags, out) =
            self.submit_paged(ctx, slots, page_rows, page_table, indices, weights, offsets)?;
        match out {
            Some(out) => read_back_async(ctx, &out, 0, bags * slots.dim).await,
            None => Ok(Vec::new()),
        }
    }

    /// Checks and submits a paged bag: the number of bags and the output
    /// buffer (none when there is nothing to compute).
    #[allow(clippy::too_many_arguments)]
    fn submit_paged(
        &self,
        ctx: &GpuContext,
        slots: &ShardedTable,
        page_rows: usize,
        page_table: &[u32],
        indices: &[u32],
        weights: &[f32],
        offsets: &[usize],
    ) -> Result<(usize, Option<wgpu::Buffer>), GpuError> {
        let bags = check_paged(slots, page_rows, page_table, indices, weights, offsets)?;
        let pt = storage_init(ctx, "bag page table", page_table);
        let table = BagTable::Paged {
            slots,
            page_rows,
            n_pages: page_table.len(),
            page_table: &pt,
        };
        Ok((
            bags,
            self.submit(ctx, table, indices, weights, offsets, bags)?,
        ))
    }

    fn run(
        &self,
        ctx: &GpuContext,
        table: BagTable<'_>,
        indices: &[u32],
        weights: &[f32],
        offsets: &[usize],
        bags: usize,
    ) -> Result<Vec<f32>, GpuError> {
        let dim = table.storage().dim;
        match self.submit(ctx, table, indices, weights, offsets, bags)? {
            Some(out) => read_back(ctx, &out, 0, bags * dim),
            None => Ok(Vec::new()),
        }
    }

    /// Uploads the bag inputs, records and submits the bag; the output
    /// buffer `(bags, dim)` f32, or `None` when there is nothing to compute.
    fn submit(
        &self,
        ctx: &GpuContext,
        table: BagTable<'_>,
        indices: &[u32],
        weights: &[f32],
        offsets: &[usize],
        bags: usize,
    ) -> Result<Option<wgpu::Buffer>, GpuError> {
        let dim = table.storage().dim;
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
        let (ib, wb, ob, out) = ctx.scoped("uploading bag inputs", || {
            (
                storage_init(ctx, "bag indices", indices),
                storage_init(ctx, "bag weights", weights),
                storage_init(ctx, "bag offsets", &offsets32),
                crate::buffers::storage_zeroed(ctx, "bag out", (bags * dim) as u64 * 4),
            )
        })?;
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        ctx.scoped("recording the bag forward", || {
            self.record(ctx, &mut encoder, table, &ib, &wb, &ob, bags, &out)
        })??;
        ctx.queue.submit([encoder.finish()]);
        Ok(Some(out))
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
