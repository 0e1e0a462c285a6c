//! Backward kernels: embedding-bag (table and per-sample-weight gradients) and product-key lookup.
//!
//! Both scatter-adds of the backward — the value-table gradient
//! `dV[indices[e]] += w[e] * dm[bag(e)]` and the sub-key gradient summed over
//! tokens — are computed as *gathers* over a deterministic reverse index
//! ([`crate::reverse_index`]): WGSL has no float atomics, and a
//! compare-and-swap loop on u32 bits would add in a scheduling-dependent
//! order. Each gradient element is one invocation's sequential f32 sum in the
//! CPU oracle's order (ascending entry position), so results are reproducible
//! bit for bit from run to run, and equal the oracle's when the driver rounds
//! like IEEE f32 (no fma contraction).
//!
//! Two levels of API: `record_*` functions that take device buffers and record
//! into a command encoder (for chaining on the device), and `run` functions
//! that take host slices, validate them, and read the results back.

use crate::buffers::{GpuDtype, ShardedTable, read_back, storage_init, storage_zeroed};
use crate::context::{GpuContext, GpuError};
use crate::launch::{Launcher, u32_of};
use crate::reverse_index::{
    ReverseIndex, ReverseIndexKernels, check_binding, check_reverse_index, count_u32, reverse_index,
};
use crate::shaders::{self, Variant};
use memlayer_core::bag::SparseRows;
use memlayer_core::pkm::PkmConfig;

/// The kernels of the bag backward (after the reverse index): bag of each
/// entry, sparse table gradient, its scatter into a dense table, weight
/// gradient (f32 and f16 tables).
pub const BAG_KERNELS: [Variant; 5] = [
    shaders::BAG_BACKWARD_BAG_OF.plain(),
    shaders::BAG_BACKWARD_TABLE.plain(),
    shaders::BAG_BACKWARD_DENSE.plain(),
    shaders::BAG_BACKWARD_WEIGHTS.variant(0),
    shaders::BAG_BACKWARD_WEIGHTS.variant(1),
];

/// The kernels of the lookup backward (after the reverse index): softmax,
/// key qk-norm, sub-key ids, query gradient, sub-key gradient.
pub const LOOKUP_KERNELS: [Variant; 5] = [
    shaders::PK_BACKWARD_SOFTMAX.plain(),
    shaders::PK_BACKWARD_KEY_NORM.plain(),
    shaders::PK_BACKWARD_KEY_IDS.plain(),
    shaders::PK_BACKWARD_QUERY.plain(),
    shaders::PK_BACKWARD_KEYS.plain(),
];

/// Largest sub-key width (`k_dim / 2`) the lookup backward handles (workgroup memory).
pub const MAX_HALF: usize = 1024;

crate::params! {
/// Uniform of `bag_backward_bag_of.wgsl`. (WGSL layout).
pub struct BagOfParams {
    /// Number of bag entries (`offsets[bags]`).
    pub n: u32,
    /// Number of bags (`offsets` holds `bags + 1` entries, bags >= 1).
    pub bags: u32,
    /// Workgroups along x of the dispatch grid (workgroup id = `y * x_groups + x`).
    pub x_groups: u32,
    /// Padding to a multiple of 16 bytes (WGSL uniform layout).
    pub _pad: u32,
}
}

crate::params! {
/// Uniform of `bag_backward_table.wgsl`. (WGSL layout).
pub struct TableParams {
    /// Elements per gradient row.
    pub dim: u32,
    /// First row slot of the output shard (its row 0).
    pub slot_base: u32,
    /// Row slots in the output shard: rows of `out` (slots, dim).
    pub slots: u32,
    /// Workgroups along x of the dispatch grid (workgroup id = `y * x_groups + x`).
    pub x_groups: u32,
}
}

crate::params! {
/// Uniform of `bag_backward_weights.wgsl`. (WGSL layout).
pub struct WeightsParams {
    /// Number of bag entries: length of `dw`.
    pub n: u32,
    /// Elements per table row and per `grad_out` row.
    pub dim: u32,
    /// u32 words per table row (f32: `dim`; f16: `ceil(dim / 2)`).
    pub row_words: u32,
    /// First table row held by the bound shard.
    pub first_row: u32,
    /// Rows held by the bound shard.
    pub shard_rows: u32,
    /// Workgroups along x of the dispatch grid (workgroup id = `y * x_groups + x`).
    pub x_groups: u32,
    /// Padding to a multiple of 16 bytes (WGSL uniform layout).
    pub _pad: [u32; 2],
}
}

crate::params! {
/// Uniform of `bag_backward_dense.wgsl`. (WGSL layout).
pub struct DenseParams {
    /// Elements per row.
    pub dim: u32,
    /// Row slots of the sparse gradient (rows of `sparse`; only the first `count` are copied).
    pub slots: u32,
    /// Workgroups along x of the dispatch grid (workgroup id = `y * x_groups + x`).
    pub x_groups: u32,
    /// Padding to a multiple of 16 bytes (WGSL uniform layout).
    pub _pad: u32,
}
}

crate::params! {
pub(crate) struct SoftmaxParams {
    rows: u32,
    knn: u32,
    x_groups: u32,
    _pad: u32,
}
}

crate::params! {
pub(crate) struct KeyNormParams {
    rows: u32,
    half: u32,
    x_groups: u32,
    _pad: u32,
}
}

crate::params! {
pub(crate) struct KeyIdsParams {
    th: u32,
    heads: u32,
    n_keys: u32,
    knn: u32,
    x_groups: u32,
    _pad: [u32; 3],
}
}

crate::params! {
pub(crate) struct QueryParams {
    th: u32,
    heads: u32,
    n_keys: u32,
    half: u32,
    k_dim: u32,
    knn: u32,
    qk_norm: u32,
    scale: f32,
    x_groups: u32,
    _pad: [u32; 3],
}
}

crate::params! {
pub(crate) struct KeysParams {
    half: u32,
    k_dim: u32,
    knn: u32,
    qk_norm: u32,
    scale: f32,
    slots: u32,
    n_keys: u32,
    x_groups: u32,
}
}

fn buffer_holds(what: &str, buf: &wgpu::Buffer, bytes: u64) -> Result<(), GpuError> {
    if buf.size() < bytes {
        return Err(GpuError::Invalid(format!(
            "{what}: buffer of {} bytes is smaller than the {bytes} bytes the shapes need",
            buf.size()
        )));
    }
    Ok(())
}

fn check_len(what: &str, got: usize, expected: usize, shape: &str) -> Result<(), GpuError> {
    if got != expected {
        return Err(GpuError::Invalid(format!(
            "{what}: expected {expected} elements {shape}, got {got}"
        )));
    }
    Ok(())
}

/// The reverse index of an embedding-bag's entries and the bag of each entry
/// (`B`: the launcher's buffer type).
pub struct BagIndex<B = wgpu::Buffer> {
    /// Entries (`indices.len()`).
    pub n: usize,
    /// Bags (`offsets.len() - 1`).
    pub bags: usize,
    /// Entries grouped by row id, ascending entry position within a row.
    pub index: ReverseIndex<B>,
    /// (n) u32 bag of each entry.
    pub bag_of: B,
}

/// Launches the reverse index of `indices[..n]` (row ids `< rows`) and the
/// bag of every entry from `offsets` (bags + 1) u32 CSR.
pub fn bag_index<L: Launcher>(
    l: &mut L,
    indices: &L::Buffer,
    offsets: &L::Buffer,
    n: usize,
    bags: usize,
    rows: usize,
) -> Result<BagIndex<L::Buffer>, GpuError> {
    let n32 = u32_of("bag entries", n)?;
    let bags32 = u32_of("bags", bags)?;
    if n > 0 && bags == 0 {
        return Err(GpuError::Invalid(format!("{n} entries but no bags")));
    }
    let index = reverse_index(l, indices, n, rows as u64)?;
    let bag_of = l.zeroed("bag of entry", (n * 4) as u64)?;
    if n > 0 {
        let g = l.grid(n.div_ceil(256))?;
        let params = BagOfParams {
            n: n32,
            bags: bags32,
            x_groups: g.x,
            _pad: 0,
        };
        l.launch(BAG_KERNELS[0], &params, &[offsets, &bag_of], g)?;
    }
    Ok(BagIndex {
        n,
        bags,
        index,
        bag_of,
    })
}

/// Launches the sparse table gradient into one f32 shard `out` (slots,
/// dim): slot `s` receives the gradient of row `unique_ids[slot_base + s]`
/// (slots at or past the index's count are left untouched).
/// weights: (n) f32; grad_out: (bags, dim) f32.
#[allow(clippy::too_many_arguments)]
pub fn table_grad<L: Launcher>(
    l: &mut L,
    idx: &BagIndex<L::Buffer>,
    weights: &L::Buffer,
    grad_out: &L::Buffer,
    out: &L::Buffer,
    dim: usize,
    slot_base: usize,
    slots: usize,
) -> Result<(), GpuError> {
    let groups = u32_of("table gradient elements", slots * dim.div_ceil(4))?.div_ceil(256);
    let g = l.grid(groups as usize)?;
    let params = TableParams {
        dim: u32_of("dim", dim)?,
        slot_base: u32_of("gradient slots", slot_base)?,
        slots: u32_of("gradient slots", slots)?,
        x_groups: g.x,
    };
    l.launch(
        BAG_KERNELS[1],
        &params,
        &[
            &idx.index.seg_start,
            &idx.index.sorted_entries,
            &idx.bag_of,
            weights,
            grad_out,
            out,
        ],
        g,
    )
}

/// Launches the scatter of sparse gradient rows (slot `u` = row
/// `unique_ids[u]`, `u < count`, of `slots`) into the dense (rows, dim) f32
/// gradient `dense` (`bag_backward_dense.wgsl`; rows never touched keep
/// their contents).
pub fn scatter_dense<L: Launcher>(
    l: &mut L,
    index: &ReverseIndex<L::Buffer>,
    sparse: &L::Buffer,
    dense: &L::Buffer,
    rows: usize,
    dim: usize,
    slots: usize,
) -> Result<(), GpuError> {
    // the kernel addresses the dense table with u32
    u32_of("value table elements", rows * dim)?;
    let g = l.grid(u32_of("gradient elements", slots * dim)?.div_ceil(256) as usize)?;
    let params = DenseParams {
        dim: dim as u32,
        slots: u32_of("gradient slots", slots)?,
        x_groups: g.x,
        _pad: 0,
    };
    l.launch(
        BAG_KERNELS[2],
        &params,
        &[&index.count, &index.unique_ids, sparse, dense],
        g,
    )
}

/// Launches the per-sample-weight gradient `dw[e] = dot(table[indices[e]],
/// grad_out[bag(e)])` for the entries whose row lies in one shard (rows
/// `first_row .. first_row + shard_rows`, `row_words` u32 words each, f16
/// when `f16`). grad_out: (bags, dim) f32; dw: (n) f32.
#[allow(clippy::too_many_arguments)]
pub fn weight_grad<L: Launcher>(
    l: &mut L,
    idx: &BagIndex<L::Buffer>,
    shard: &L::Buffer,
    grad_out: &L::Buffer,
    dw: &L::Buffer,
    dtype: GpuDtype,
    dim: usize,
    first_row: usize,
    shard_rows: usize,
) -> Result<(), GpuError> {
    if dtype == GpuDtype::Bf16 {
        // bag_backward_weights.wgsl reads f32 or f16 tables; bf16 tables
        // are only paged slots (inference), never trained through here
        return Err(GpuError::Invalid(
            "the per-sample-weight gradient reads f32 or f16 tables, not bf16".into(),
        ));
    }
    let g = l.grid(idx.n.div_ceil(64))?;
    let params = WeightsParams {
        n: u32_of("bag entries", idx.n)?,
        dim: u32_of("dim", dim)?,
        row_words: u32_of("row words", dtype.row_words(dim))?,
        first_row: u32_of("table rows", first_row)?,
        shard_rows: u32_of("table rows", shard_rows)?,
        x_groups: g.x,
        _pad: [0; 2],
    };
    let kernel = BAG_KERNELS[3 + (dtype == GpuDtype::F16) as usize];
    l.launch(
        kernel,
        &params,
        &[
            &idx.index.sorted_ids,
            &idx.index.sorted_entries,
            &idx.bag_of,
            grad_out,
            shard,
            dw,
        ],
        g,
    )
}

/// Embedding-bag backward (sum mode, per-sample weights): the sparse table
/// gradient and the per-sample-weight gradient. Pipelines are built once.
pub struct BagBackward {
    index: ReverseIndexKernels,
}

impl BagBackward {
    /// Builds the pipelines.
    pub fn new(ctx: &GpuContext) -> Result<Self, GpuError> {
        Ok(Self {
            index: ReverseIndexKernels::with(ctx, BAG_KERNELS)?,
        })
    }

    /// The reverse-index pipelines (shared with other users).
    pub fn reverse_index(&self) -> &ReverseIndexKernels {
        &self.index
    }

    /// Records the reverse index of `indices` and the bag of every entry.
    ///
    /// indices: (n) u32 row ids `< rows`; offsets: (bags + 1) u32 CSR offsets
    /// (0 first, n last, non-decreasing). Contents are not checked here (see
    /// [`BagBackward::run`]); an out-of-range id gives a wrong (but memory-safe) result.
    #[allow(clippy::too_many_arguments)]
    pub fn record_index(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        indices: &wgpu::Buffer,
        offsets: &wgpu::Buffer,
        n: usize,
        bags: usize,
        rows: usize,
    ) -> Result<BagIndex, GpuError> {
        count_u32("bag entries", n)?;
        count_u32("bags", bags)?;
        buffer_holds("offsets", offsets, (bags as u64 + 1) * 4)?;
        check_binding(ctx, "offsets", (bags as u64 + 1) * 4)?;
        check_reverse_index(ctx, indices, n)?;
        let mut l = self.index.kernels().launcher(ctx, encoder);
        bag_index(&mut l, indices, offsets, n, bags, rows)
    }

    /// Records the sparse table gradient: row slot `u` of `out` receives the
    /// gradient of row `idx.index.unique_ids[u]`, for every `u < count`
    /// (slots past `count` are left untouched).
    ///
    /// weights: (n) f32; grad_out: (bags, out.dim) f32; out: an F32 table of
    /// at least `count` rows (`n` rows always suffice) and width `dim`.
    pub fn record_table_grad(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        idx: &BagIndex,
        weights: &wgpu::Buffer,
        grad_out: &wgpu::Buffer,
        out: &ShardedTable,
    ) -> Result<(), GpuError> {
        if out.dtype != GpuDtype::F32 {
            return Err(GpuError::Invalid(
                "table gradient output must be stored as f32".into(),
            ));
        }
        let dim = out.dim;
        buffer_holds("weights", weights, (idx.n * 4) as u64)?;
        buffer_holds("grad_out", grad_out, (idx.bags * dim * 4) as u64)?;
        if idx.n == 0 || out.rows == 0 {
            return Ok(());
        }
        let mut l = self.index.kernels().launcher(ctx, encoder);
        for (s, shard) in out.shards.iter().enumerate() {
            let slot_base = s * out.rows_per_shard;
            let slots = out.rows_per_shard.min(out.rows - slot_base.min(out.rows));
            // slots past n can never hold a row
            let slots = slots.min(idx.n.saturating_sub(slot_base));
            if slots == 0 {
                continue;
            }
            table_grad(&mut l, idx, weights, grad_out, shard, dim, slot_base, slots)?;
        }
        Ok(())
    }

    /// Records the per-sample-weight gradient `dw[e] = dot(table[indices[e]],
    /// grad_out[bag(e)])`, one dispatch per table shard.
    ///
    /// table: (rows, dim) f32 or f16, any number of shards; grad_out: (bags, dim) f32;
    /// dw: (n) f32 output.
    pub fn record_weight_grad(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        idx: &BagIndex,
        table: &ShardedTable,
        grad_out: &wgpu::Buffer,
        dw: &wgpu::Buffer,
    ) -> Result<(), GpuError> {
        buffer_holds("grad_out", grad_out, (idx.bags * table.dim * 4) as u64)?;
        buffer_holds("dweights", dw, (idx.n * 4) as u64)?;
        if idx.n == 0 {
            return Ok(());
        }
        let mut l = self.index.kernels().launcher(ctx, encoder);
        for (s, shard) in table.shards.iter().enumerate() {
            let first_row = s * table.rows_per_shard;
            let shard_rows = table
                .rows_per_shard
                .min(table.rows - first_row.min(table.rows));
            if shard_rows == 0 {
                continue;
            }
            weight_grad(
                &mut l,
                idx,
                shard,
                grad_out,
                dw,
                table.dtype,
                table.dim,
                first_row,
                shard_rows,
            )?;
        }
        Ok(())
    }

    /// Host convenience: the full backward of an embedding-bag over `table`.
    ///
    /// table: (rows, dim) on the device; indices, weights: (n); offsets:
    /// (bags + 1) CSR (0 first, n last, non-decreasing; empty bags allowed);
    /// grad_out: (bags, dim) → (table gradient rows ascending and unique,
    /// dweights (n)). Equals `bag::bag_backward_table` / `bag_backward_weights`
    /// of `memlayer-core` on the table's stored values.
    pub fn run(
        &self,
        ctx: &GpuContext,
        table: &ShardedTable,
        indices: &[u32],
        weights: &[f32],
        offsets: &[usize],
        grad_out: &[f32],
    ) -> Result<(SparseRows, Vec<f32>), GpuError> {
        let (n, dim) = (indices.len(), table.dim);
        check_len("per_sample_weights", weights.len(), n, "(one per index)")?;
        let bags = offsets.len().checked_sub(1).ok_or_else(|| {
            GpuError::Invalid("offsets must have bags + 1 entries (at least one)".into())
        })?;
        if offsets[0] != 0 || offsets[bags] != n {
            return Err(GpuError::Invalid(format!(
                "offsets must start at 0 and end at {n} (got {} .. {})",
                offsets[0], offsets[bags]
            )));
        }
        if offsets.windows(2).any(|w| w[0] > w[1]) {
            return Err(GpuError::Invalid("offsets must be non-decreasing".into()));
        }
        if let Some(&bad) = indices.iter().find(|&&i| i as usize >= table.rows) {
            return Err(GpuError::Invalid(format!(
                "index {bad} out of range for a table of {} rows",
                table.rows
            )));
        }
        check_len("grad_out", grad_out.len(), bags * dim, "(bags, dim)")?;
        count_u32("bags", bags)?;
        count_u32("entries", n)?;
        check_binding(ctx, "grad_out", (grad_out.len() * 4) as u64)?;
        check_binding(ctx, "indices", (n * 4) as u64)?;
        if n == 0 {
            return Ok((SparseRows::empty(dim), Vec::new()));
        }
        let offsets32: Vec<u32> = offsets.iter().map(|&o| o as u32).collect();
        let d_indices = storage_init(ctx, "indices", indices);
        let d_weights = storage_init(ctx, "weights", weights);
        let d_offsets = storage_init(ctx, "offsets", &offsets32);
        let d_grad = storage_init(ctx, "grad_out", grad_out);
        let dw = storage_zeroed(ctx, "dweights", (n * 4) as u64);
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        let idx = ctx.scoped("recording the bag backward index", || {
            let idx = self.record_index(
                ctx,
                &mut encoder,
                &d_indices,
                &d_offsets,
                n,
                bags,
                table.rows,
            )?;
            self.record_weight_grad(ctx, &mut encoder, &idx, table, &d_grad, &dw)?;
            Ok::<_, GpuError>(idx)
        })??;
        ctx.queue.submit([encoder.finish()]);
        let count = read_back::<u32>(ctx, &idx.index.count, 0, 1)?[0] as usize;
        let out = ShardedTable::zeroed(ctx, "table gradient", count, dim, GpuDtype::F32, 1)?;
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        ctx.scoped("recording the bag table gradient", || {
            self.record_table_grad(ctx, &mut encoder, &idx, &d_weights, &d_grad, &out)
        })??;
        ctx.queue.submit([encoder.finish()]);
        let rows = read_back::<u32>(ctx, &idx.index.unique_ids, 0, count)?;
        let grads = out.download(ctx)?;
        let dweights = read_back::<f32>(ctx, &dw, 0, n)?;
        Ok((SparseRows { dim, rows, grads }, dweights))
    }
}

/// Device inputs of the lookup backward (row-major, f32 unless noted; `B`:
/// the launcher's buffer type).
pub struct LookupBackwardInputs<'a, B = wgpu::Buffer> {
    /// (heads, 2, n_keys, half) sub-keys.
    pub keys: &'a B,
    /// (tokens, heads, k_dim) queries (before qk-norm).
    pub query: &'a B,
    /// (tokens, heads, knn) u32 selected rows `< n_keys²`.
    pub indices: &'a B,
    /// (tokens, heads, knn) softmax weights of the forward.
    pub weights: &'a B,
    /// (tokens, heads, knn) gradient of the loss w.r.t. the weights.
    pub d_weights: &'a B,
}

/// Device outputs of the lookup backward.
pub struct LookupBackwardOutputs<B = wgpu::Buffer> {
    /// (heads, 2, n_keys, half) sub-key gradient (zero where no score read a sub-key).
    pub d_keys: B,
    /// (tokens, heads, k_dim) query gradient.
    pub d_query: B,
    /// (tokens, heads, knn) gradient of the pre-softmax scores.
    pub d_scores: B,
}

/// Launches the lookup backward for `tokens` tokens into new buffers:
/// softmax backward, the scored sub-keys (qk-norm), the query gradient,
/// the reverse index of the sub-key ids and the sub-key gradient.
pub fn lookup_backward<L: Launcher>(
    l: &mut L,
    cfg: &PkmConfig,
    tokens: usize,
    inputs: &LookupBackwardInputs<'_, L::Buffer>,
) -> Result<LookupBackwardOutputs<L::Buffer>, GpuError> {
    let (heads, n_keys, half, k_dim, knn) = (cfg.heads, cfg.n_keys, cfg.half(), cfg.k_dim, cfg.knn);
    let th = tokens * heads;
    let sel = th * knn;
    let key_words = heads * 2 * n_keys * half;
    let out = LookupBackwardOutputs {
        d_keys: l.zeroed("d_keys", (key_words * 4) as u64)?,
        d_query: l.zeroed("d_query", (th * k_dim * 4) as u64)?,
        d_scores: l.zeroed("d_scores", (sel * 4) as u64)?,
    };
    if tokens == 0 {
        return Ok(out);
    }
    let scale = cfg.score_scale();
    let qk_norm = cfg.qk_norm as u32;
    let [softmax, key_norm, key_ids_kernel, query, keys] = LOOKUP_KERNELS;

    // softmax backward
    let g = l.grid(th.div_ceil(64))?;
    let params = SoftmaxParams {
        rows: u32_of("(token, head) rows", th)?,
        knn: knn as u32,
        x_groups: g.x,
        _pad: 0,
    };
    l.launch(
        softmax,
        &params,
        &[inputs.weights, inputs.d_weights, &out.d_scores],
        g,
    )?;

    // scored sub-keys
    let keys_s_buf;
    let keys_s = if cfg.qk_norm {
        keys_s_buf = l.zeroed("scored keys", (key_words * 4) as u64)?;
        let rows = heads * 2 * n_keys;
        let g = l.grid(rows.div_ceil(64))?;
        let params = KeyNormParams {
            rows: u32_of("sub-keys", rows)?,
            half: half as u32,
            x_groups: g.x,
            _pad: 0,
        };
        l.launch(key_norm, &params, &[inputs.keys, &keys_s_buf], g)?;
        &keys_s_buf
    } else {
        inputs.keys
    };

    // query gradient (and the scored query halves)
    let qs = l.zeroed("scored queries", (th * k_dim * 4) as u64)?;
    let g = l.grid(2 * th)?;
    let params = QueryParams {
        th: th as u32,
        heads: heads as u32,
        n_keys: n_keys as u32,
        half: half as u32,
        k_dim: k_dim as u32,
        knn: knn as u32,
        qk_norm,
        scale,
        x_groups: g.x,
        _pad: [0; 3],
    };
    l.launch(
        query,
        &params,
        &[
            inputs.query,
            keys_s,
            inputs.indices,
            &out.d_scores,
            &qs,
            &out.d_query,
        ],
        g,
    )?;

    // reverse index of the sub-key ids, entries p = (th * 2 + side) * knn + j
    let entries = 2 * sel;
    let key_ids = l.zeroed("sub-key ids", (entries * 4) as u64)?;
    let g = l.grid(entries.div_ceil(256))?;
    let params = KeyIdsParams {
        th: th as u32,
        heads: heads as u32,
        n_keys: n_keys as u32,
        knn: knn as u32,
        x_groups: g.x,
        _pad: [0; 3],
    };
    l.launch(key_ids_kernel, &params, &[inputs.indices, &key_ids], g)?;
    let index = reverse_index(l, &key_ids, entries, (heads * 2 * n_keys) as u64)?;

    // sub-key gradient, one workgroup per distinct sub-key
    let slots = entries.min(heads * 2 * n_keys);
    let g = l.grid(slots)?;
    let params = KeysParams {
        half: half as u32,
        k_dim: k_dim as u32,
        knn: knn as u32,
        qk_norm,
        scale,
        slots: slots as u32,
        n_keys: n_keys as u32,
        x_groups: g.x,
    };
    l.launch(
        keys,
        &params,
        &[
            &index.seg_start,
            &index.sorted_entries,
            &index.unique_ids,
            &out.d_scores,
            &qs,
            inputs.keys,
            &out.d_keys,
        ],
        g,
    )?;
    Ok(out)
}

/// Backward of the product-key lookup: softmax, sub-key scores, sub-keys and
/// queries (through qk-norm when enabled). Pipelines are built once.
pub struct LookupBackward {
    index: ReverseIndexKernels,
}

impl LookupBackward {
    /// Builds the pipelines.
    pub fn new(ctx: &GpuContext) -> Result<Self, GpuError> {
        Ok(Self {
            index: ReverseIndexKernels::with(ctx, LOOKUP_KERNELS)?,
        })
    }

    fn check_shapes(ctx: &GpuContext, cfg: &PkmConfig, tokens: usize) -> Result<(), GpuError> {
        cfg.validate()?;
        if cfg.half() > MAX_HALF {
            return Err(GpuError::Invalid(format!(
                "k_dim {} too large: the lookup backward handles k_dim / 2 <= {MAX_HALF}",
                cfg.k_dim
            )));
        }
        let key_words = cfg.heads * 2 * cfg.n_keys * cfg.half();
        let sel = tokens
            .checked_mul(cfg.heads * cfg.knn)
            .ok_or_else(|| GpuError::Invalid(format!("{tokens} tokens overflow")))?;
        count_u32("sub-key elements", key_words)?;
        count_u32("query elements", tokens * cfg.query_dim())?;
        count_u32("sub-key entries", 2 * sel)?;
        check_binding(ctx, "keys", (key_words * 4) as u64)?;
        check_binding(ctx, "query", (tokens * cfg.query_dim() * 4) as u64)?;
        check_binding(ctx, "sub-key entries", (2 * sel * 4 + 4) as u64)?;
        Ok(())
    }

    /// Records the lookup backward for `tokens` tokens and returns the output
    /// buffers (nothing read back). Input contents are not checked here (see
    /// [`LookupBackward::run`]); shapes and limits are.
    pub fn record(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        cfg: &PkmConfig,
        tokens: usize,
        inputs: &LookupBackwardInputs<'_>,
    ) -> Result<LookupBackwardOutputs, GpuError> {
        Self::check_shapes(ctx, cfg, tokens)?;
        let th = tokens * cfg.heads;
        let sel = th * cfg.knn;
        let key_words = cfg.heads * 2 * cfg.n_keys * cfg.half();
        buffer_holds("keys", inputs.keys, (key_words * 4) as u64)?;
        buffer_holds("query", inputs.query, (th * cfg.k_dim * 4) as u64)?;
        buffer_holds("indices", inputs.indices, (sel * 4) as u64)?;
        buffer_holds("weights", inputs.weights, (sel * 4) as u64)?;
        buffer_holds("d_weights", inputs.d_weights, (sel * 4) as u64)?;
        let mut l = self.index.kernels().launcher(ctx, encoder);
        lookup_backward(&mut l, cfg, tokens, inputs)
    }

    /// Host convenience: the lookup backward from host slices.
    ///
    /// keys: (heads, 2, n_keys, half); query: (tokens, heads, k_dim);
    /// indices, weights, d_weights: (tokens, heads, knn) (indices and weights
    /// from the forward) → (d_keys like keys, d_query like query). Equals
    /// `pkm::softmax_backward_rows` followed by `pkm::scores_backward`.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        ctx: &GpuContext,
        cfg: &PkmConfig,
        keys: &[f32],
        query: &[f32],
        tokens: usize,
        indices: &[u32],
        weights: &[f32],
        d_weights: &[f32],
    ) -> Result<(Vec<f32>, Vec<f32>), GpuError> {
        Self::check_shapes(ctx, cfg, tokens)?;
        let sel = tokens * cfg.heads * cfg.knn;
        let key_words = cfg.heads * 2 * cfg.n_keys * cfg.half();
        check_len("keys", keys.len(), key_words, "(heads, 2, n_keys, half)")?;
        let q_words = tokens * cfg.query_dim();
        check_len("query", query.len(), q_words, "(tokens, heads, k_dim)")?;
        check_len("indices", indices.len(), sel, "(tokens, heads, knn)")?;
        check_len("weights", weights.len(), sel, "(tokens, heads, knn)")?;
        check_len("d_weights", d_weights.len(), sel, "(tokens, heads, knn)")?;
        if let Some(&bad) = indices.iter().find(|&&r| r as usize >= cfg.n_rows()) {
            return Err(GpuError::Invalid(format!(
                "index {bad} out of range for n_keys² = {} rows",
                cfg.n_rows()
            )));
        }
        if tokens == 0 {
            return Ok((vec![0.0; key_words], Vec::new()));
        }
        let d_keys_in = storage_init(ctx, "keys", keys);
        let d_query_in = storage_init(ctx, "query", query);
        let d_indices = storage_init(ctx, "indices", indices);
        let d_w = storage_init(ctx, "weights", weights);
        let d_dw = storage_init(ctx, "d_weights", d_weights);
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        let out = ctx.scoped("recording the lookup backward", || {
            self.record(
                ctx,
                &mut encoder,
                cfg,
                tokens,
                &LookupBackwardInputs {
                    keys: &d_keys_in,
                    query: &d_query_in,
                    indices: &d_indices,
                    weights: &d_w,
                    d_weights: &d_dw,
                },
            )
        })??;
        ctx.queue.submit([encoder.finish()]);
        Ok((
            read_back(ctx, &out.d_keys, 0, key_words)?,
            read_back(ctx, &out.d_query, 0, q_words)?,
        ))
    }
}
