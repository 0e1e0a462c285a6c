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

use crate::buffers::uniform_init;
use crate::buffers::{
    GpuDtype, Kernel, ShardedTable, grid, read_back, storage_init, storage_zeroed,
};
use crate::context::{GpuContext, GpuError};
use crate::reverse_index::{ReverseIndex, ReverseIndexKernels, check_binding, count_u32};
use memlayer_core::bag::SparseRows;
use memlayer_core::pkm::PkmConfig;

/// Entry -> bag map.
pub const BAG_OF_SOURCE: &str = include_str!("../../../shaders/bag_backward_bag_of.wgsl");
/// Sparse table gradient.
pub const BAG_TABLE_SOURCE: &str = include_str!("../../../shaders/bag_backward_table.wgsl");
/// Per-sample-weight gradient.
pub const BAG_WEIGHTS_SOURCE: &str = include_str!("../../../shaders/bag_backward_weights.wgsl");
/// Softmax backward per (token, head).
pub const PK_SOFTMAX_SOURCE: &str = include_str!("../../../shaders/pk_backward_softmax.wgsl");
/// qk-norm of the sub-keys.
pub const PK_KEY_NORM_SOURCE: &str = include_str!("../../../shaders/pk_backward_key_norm.wgsl");
/// Sub-key ids of the selected scores.
pub const PK_KEY_IDS_SOURCE: &str = include_str!("../../../shaders/pk_backward_key_ids.wgsl");
/// Query gradient.
pub const PK_QUERY_SOURCE: &str = include_str!("../../../shaders/pk_backward_query.wgsl");
/// Sub-key gradient.
pub const PK_KEYS_SOURCE: &str = include_str!("../../../shaders/pk_backward_keys.wgsl");

/// Largest sub-key width (`k_dim / 2`) the lookup backward handles (workgroup memory).
pub const MAX_HALF: usize = 1024;

/// Uniform of `bag_backward_bag_of.wgsl`. (WGSL layout).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BagOfParams {
    pub n: u32,
    pub bags: u32,
    pub x_groups: u32,
    pub _pad: u32,
}

/// Uniform of `bag_backward_table.wgsl`. (WGSL layout).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct TableParams {
    pub dim: u32,
    pub slot_base: u32,
    pub slots: u32,
    pub x_groups: u32,
}

/// Uniform of `bag_backward_weights.wgsl`. (WGSL layout).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct WeightsParams {
    pub n: u32,
    pub dim: u32,
    pub row_words: u32,
    pub first_row: u32,
    pub shard_rows: u32,
    pub x_groups: u32,
    pub _pad: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct SoftmaxParams {
    rows: u32,
    knn: u32,
    x_groups: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct KeyIdsParams {
    th: u32,
    heads: u32,
    n_keys: u32,
    knn: u32,
    x_groups: u32,
    _pad: [u32; 3],
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct QueryParams {
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

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct KeysParams {
    half: u32,
    k_dim: u32,
    knn: u32,
    qk_norm: u32,
    scale: f32,
    slots: u32,
    n_keys: u32,
    x_groups: u32,
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

/// The reverse index of an embedding-bag's entries and the bag of each entry.
pub struct BagIndex {
    /// Entries (`indices.len()`).
    pub n: usize,
    /// Bags (`offsets.len() - 1`).
    pub bags: usize,
    /// Entries grouped by row id, ascending entry position within a row.
    pub index: ReverseIndex,
    /// (n) u32 bag of each entry.
    pub bag_of: wgpu::Buffer,
}

/// Embedding-bag backward (sum mode, per-sample weights): the sparse table
/// gradient and the per-sample-weight gradient. Pipelines are built once.
pub struct BagBackward {
    index: ReverseIndexKernels,
    bag_of: Kernel,
    table: Kernel,
    weights_f32: Kernel,
    weights_f16: Kernel,
}

impl BagBackward {
    /// Builds the pipelines.
    pub fn new(ctx: &GpuContext) -> Result<Self, GpuError> {
        Ok(Self {
            index: ReverseIndexKernels::new(ctx)?,
            bag_of: Kernel::new(ctx, "bag_backward_bag_of", BAG_OF_SOURCE, "main", &[])?,
            table: Kernel::new(ctx, "bag_backward_table", BAG_TABLE_SOURCE, "main", &[])?,
            weights_f32: Kernel::new(
                ctx,
                "bag_backward_weights",
                BAG_WEIGHTS_SOURCE,
                "main",
                &[("F16", 0.0)],
            )?,
            weights_f16: Kernel::new(
                ctx,
                "bag_backward_weights_f16",
                BAG_WEIGHTS_SOURCE,
                "main",
                &[("F16", 1.0)],
            )?,
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
        let n32 = count_u32("bag entries", n)?;
        let bags32 = count_u32("bags", bags)?;
        if n > 0 && bags == 0 {
            return Err(GpuError::Invalid(format!("{n} entries but no bags")));
        }
        buffer_holds("offsets", offsets, (bags as u64 + 1) * 4)?;
        check_binding(ctx, "offsets", (bags as u64 + 1) * 4)?;
        let index = self.index.record(ctx, encoder, indices, n, rows as u64)?;
        let bag_of = storage_zeroed(ctx, "bag of entry", (n * 4) as u64);
        if n > 0 {
            let g = grid(ctx, n.div_ceil(256) as u32);
            let params = uniform_init(
                ctx,
                "bag_of params",
                &BagOfParams {
                    n: n32,
                    bags: bags32,
                    x_groups: g.0,
                    _pad: 0,
                },
            );
            self.bag_of.dispatch(
                ctx,
                encoder,
                &[
                    params.as_entire_binding(),
                    offsets.as_entire_binding(),
                    bag_of.as_entire_binding(),
                ],
                g,
            );
        }
        Ok(BagIndex {
            n,
            bags,
            index,
            bag_of,
        })
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
        for (s, shard) in out.shards.iter().enumerate() {
            let slot_base = s * out.rows_per_shard;
            let slots = out.rows_per_shard.min(out.rows - slot_base.min(out.rows));
            // slots past n can never hold a row
            let slots = slots.min(idx.n.saturating_sub(slot_base));
            if slots == 0 {
                continue;
            }
            let groups =
                count_u32("table gradient elements", slots * dim.div_ceil(4))?.div_ceil(256);
            let g = grid(ctx, groups);
            let params = uniform_init(
                ctx,
                "bag table params",
                &TableParams {
                    dim: dim as u32,
                    slot_base: slot_base as u32,
                    slots: slots as u32,
                    x_groups: g.0,
                },
            );
            self.table.dispatch(
                ctx,
                encoder,
                &[
                    params.as_entire_binding(),
                    idx.index.seg_start.as_entire_binding(),
                    idx.index.sorted_entries.as_entire_binding(),
                    idx.bag_of.as_entire_binding(),
                    weights.as_entire_binding(),
                    grad_out.as_entire_binding(),
                    shard.as_entire_binding(),
                ],
                g,
            );
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
        let kernel = match table.dtype {
            GpuDtype::F32 => &self.weights_f32,
            GpuDtype::F16 => &self.weights_f16,
        };
        let g = grid(ctx, idx.n.div_ceil(64) as u32);
        for (s, shard) in table.shards.iter().enumerate() {
            let first_row = s * table.rows_per_shard;
            let shard_rows = table
                .rows_per_shard
                .min(table.rows - first_row.min(table.rows));
            if shard_rows == 0 {
                continue;
            }
            let params = uniform_init(
                ctx,
                "bag weights params",
                &WeightsParams {
                    n: idx.n as u32,
                    dim: count_u32("dim", table.dim)?,
                    row_words: table.row_words() as u32,
                    first_row: count_u32("table rows", first_row)?,
                    shard_rows: shard_rows as u32,
                    x_groups: g.0,
                    _pad: [0; 2],
                },
            );
            kernel.dispatch(
                ctx,
                encoder,
                &[
                    params.as_entire_binding(),
                    idx.index.sorted_ids.as_entire_binding(),
                    idx.index.sorted_entries.as_entire_binding(),
                    idx.bag_of.as_entire_binding(),
                    grad_out.as_entire_binding(),
                    shard.as_entire_binding(),
                    dw.as_entire_binding(),
                ],
                g,
            );
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

/// Device inputs of the lookup backward (row-major, f32 unless noted).
pub struct LookupBackwardInputs<'a> {
    /// (heads, 2, n_keys, half) sub-keys.
    pub keys: &'a wgpu::Buffer,
    /// (tokens, heads, k_dim) queries (before qk-norm).
    pub query: &'a wgpu::Buffer,
    /// (tokens, heads, knn) u32 selected rows `< n_keys²`.
    pub indices: &'a wgpu::Buffer,
    /// (tokens, heads, knn) softmax weights of the forward.
    pub weights: &'a wgpu::Buffer,
    /// (tokens, heads, knn) gradient of the loss w.r.t. the weights.
    pub d_weights: &'a wgpu::Buffer,
}

/// Device outputs of the lookup backward.
pub struct LookupBackwardOutputs {
    /// (heads, 2, n_keys, half) sub-key gradient (zero where no score read a sub-key).
    pub d_keys: wgpu::Buffer,
    /// (tokens, heads, k_dim) query gradient.
    pub d_query: wgpu::Buffer,
    /// (tokens, heads, knn) gradient of the pre-softmax scores.
    pub d_scores: wgpu::Buffer,
}

/// Backward of the product-key lookup: softmax, sub-key scores, sub-keys and
/// queries (through qk-norm when enabled). Pipelines are built once.
pub struct LookupBackward {
    index: ReverseIndexKernels,
    softmax: Kernel,
    key_norm: Kernel,
    key_ids: Kernel,
    query: Kernel,
    keys: Kernel,
}

impl LookupBackward {
    /// Builds the pipelines.
    pub fn new(ctx: &GpuContext) -> Result<Self, GpuError> {
        Ok(Self {
            index: ReverseIndexKernels::new(ctx)?,
            softmax: Kernel::new(ctx, "pk_backward_softmax", PK_SOFTMAX_SOURCE, "main", &[])?,
            key_norm: Kernel::new(ctx, "pk_backward_key_norm", PK_KEY_NORM_SOURCE, "main", &[])?,
            key_ids: Kernel::new(ctx, "pk_backward_key_ids", PK_KEY_IDS_SOURCE, "main", &[])?,
            query: Kernel::new(ctx, "pk_backward_query", PK_QUERY_SOURCE, "main", &[])?,
            keys: Kernel::new(ctx, "pk_backward_keys", PK_KEYS_SOURCE, "main", &[])?,
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
        let (heads, n_keys, half, k_dim, knn) =
            (cfg.heads, cfg.n_keys, cfg.half(), cfg.k_dim, cfg.knn);
        let th = tokens * heads;
        let sel = th * knn;
        let key_words = heads * 2 * n_keys * half;
        buffer_holds("keys", inputs.keys, (key_words * 4) as u64)?;
        buffer_holds("query", inputs.query, (th * k_dim * 4) as u64)?;
        buffer_holds("indices", inputs.indices, (sel * 4) as u64)?;
        buffer_holds("weights", inputs.weights, (sel * 4) as u64)?;
        buffer_holds("d_weights", inputs.d_weights, (sel * 4) as u64)?;
        let d_keys = storage_zeroed(ctx, "d_keys", (key_words * 4) as u64);
        let d_query = storage_zeroed(ctx, "d_query", (th * k_dim * 4) as u64);
        let d_scores = storage_zeroed(ctx, "d_scores", (sel * 4) as u64);
        let out = LookupBackwardOutputs {
            d_keys,
            d_query,
            d_scores,
        };
        if tokens == 0 {
            return Ok(out);
        }
        let scale = cfg.score_scale();
        let qk_norm = cfg.qk_norm as u32;

        // softmax backward
        let g = grid(ctx, th.div_ceil(64) as u32);
        let params = uniform_init(
            ctx,
            "pk softmax params",
            &SoftmaxParams {
                rows: th as u32,
                knn: knn as u32,
                x_groups: g.0,
                _pad: 0,
            },
        );
        self.softmax.dispatch(
            ctx,
            encoder,
            &[
                params.as_entire_binding(),
                inputs.weights.as_entire_binding(),
                inputs.d_weights.as_entire_binding(),
                out.d_scores.as_entire_binding(),
            ],
            g,
        );

        // scored sub-keys
        let keys_s_buf;
        let keys_s = if cfg.qk_norm {
            keys_s_buf = storage_zeroed(ctx, "scored keys", (key_words * 4) as u64);
            let rows = heads * 2 * n_keys;
            let g = grid(ctx, rows.div_ceil(64) as u32);
            let params = uniform_init(
                ctx,
                "pk key norm params",
                &SoftmaxParams {
                    rows: rows as u32,
                    knn: half as u32,
                    x_groups: g.0,
                    _pad: 0,
                },
            );
            self.key_norm.dispatch(
                ctx,
                encoder,
                &[
                    params.as_entire_binding(),
                    inputs.keys.as_entire_binding(),
                    keys_s_buf.as_entire_binding(),
                ],
                g,
            );
            &keys_s_buf
        } else {
            inputs.keys
        };

        // query gradient (and the scored query halves)
        let qs = storage_zeroed(ctx, "scored queries", (th * k_dim * 4) as u64);
        let g = grid(ctx, (2 * th) as u32);
        let params = uniform_init(
            ctx,
            "pk query params",
            &QueryParams {
                th: th as u32,
                heads: heads as u32,
                n_keys: n_keys as u32,
                half: half as u32,
                k_dim: k_dim as u32,
                knn: knn as u32,
                qk_norm,
                scale,
                x_groups: g.0,
                _pad: [0; 3],
            },
        );
        self.query.dispatch(
            ctx,
            encoder,
            &[
                params.as_entire_binding(),
                inputs.query.as_entire_binding(),
                keys_s.as_entire_binding(),
                inputs.indices.as_entire_binding(),
                out.d_scores.as_entire_binding(),
                qs.as_entire_binding(),
                out.d_query.as_entire_binding(),
            ],
            g,
        );

        // reverse index of the sub-key ids, entries p = (th * 2 + side) * knn + j
        let entries = 2 * sel;
        let key_ids = storage_zeroed(ctx, "sub-key ids", (entries * 4) as u64);
        let g = grid(ctx, entries.div_ceil(256) as u32);
        let params = uniform_init(
            ctx,
            "pk key ids params",
            &KeyIdsParams {
                th: th as u32,
                heads: heads as u32,
                n_keys: n_keys as u32,
                knn: knn as u32,
                x_groups: g.0,
                _pad: [0; 3],
            },
        );
        self.key_ids.dispatch(
            ctx,
            encoder,
            &[
                params.as_entire_binding(),
                inputs.indices.as_entire_binding(),
                key_ids.as_entire_binding(),
            ],
            g,
        );
        let index =
            self.index
                .record(ctx, encoder, &key_ids, entries, (heads * 2 * n_keys) as u64)?;

        // sub-key gradient, one workgroup per distinct sub-key
        let slots = entries.min(heads * 2 * n_keys);
        let g = grid(ctx, slots as u32);
        let params = uniform_init(
            ctx,
            "pk keys params",
            &KeysParams {
                half: half as u32,
                k_dim: k_dim as u32,
                knn: knn as u32,
                qk_norm,
                scale,
                slots: slots as u32,
                n_keys: n_keys as u32,
                x_groups: g.0,
            },
        );
        self.keys.dispatch(
            ctx,
            encoder,
            &[
                params.as_entire_binding(),
                index.seg_start.as_entire_binding(),
                index.sorted_entries.as_entire_binding(),
                index.unique_ids.as_entire_binding(),
                out.d_scores.as_entire_binding(),
                qs.as_entire_binding(),
                inputs.keys.as_entire_binding(),
                out.d_keys.as_entire_binding(),
            ],
            g,
        );
        Ok(out)
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
