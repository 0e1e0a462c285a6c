//! Product-key lookup kernels (forward): sub-key scores, per-half top-k, candidates, softmax.
//!
//! The GPU version of [`memlayer_core::pkm::lookup`], index-exact: the same
//! rows in the same order, bit-identical scores on IEEE-conforming devices
//! (each dot product is summed sequentially and products are rounded before
//! they are added, see the shader headers), weights within a few ulp (the
//! device's `exp`).
//!
//! Dispatches, per [`LookupKernels::record`]:
//! 1. with qk-norm: `pk_qk_norm.wgsl` on the sub-keys and on the query halves
//!    (into scratch buffers);
//! 2. per batch of tokens ([`LookupPlan::batch_tokens`], so the score scratch
//!    fits one binding): `pk_scores.wgsl`, every sub-key score of every query
//!    half (a tiled GEMM), then `pk_topk.wgsl`, the top-k of each half;
//! 3. `pk_candidates.wgsl`: the k best of the k×k candidates and the softmax.
//!
//! Outputs stay on the device ([`LookupBuffers`]), so the embedding-bag
//! ([`crate::bag_forward`]) can read `indices`/`weights` directly.

use crate::buffers::{
    StagingPool, read_back, read_back_pooled_async, storage_init, storage_zeroed,
};
use crate::context::{GpuContext, GpuError};
use crate::launch::{Kernels, Launcher, u32_of};
use crate::shaders::{self, Variant};
use memlayer_core::error::check_len;
use memlayer_core::pkm::{Lookup, PkmConfig, QK_NORM_EPS};

/// Largest `knn` the kernels support: `pk_topk.wgsl` takes its threshold
/// from at most 256 invocation maxima and wants at least 2k of them;
/// `pk_candidates.wgsl` keeps a private heap of at most 129 pairs.
pub const MAX_K: usize = 128;

/// Most bytes the per-batch score scratch `(batch, heads, 2, n_keys)` takes
/// (further capped by the binding limit).
pub const SCORE_SCRATCH_BYTES: u64 = 64 << 20;

/// Tile sizes of `pk_scores.wgsl`: sub-keys and tokens per workgroup.
const SCORE_TILE_KEYS: usize = 128;
const SCORE_TILE_TOKENS: usize = 32;

/// The kernels of product-key selection (per-half top-k, candidates).
pub const SELECT_KERNELS: [Variant; 2] = [shaders::PK_TOPK.plain(), shaders::PK_CANDIDATES.plain()];
/// The kernels of the whole lookup (qk-norm, sub-key scores, selection).
pub const LOOKUP_KERNELS: [Variant; 4] = [
    shaders::PK_QK_NORM.plain(),
    shaders::PK_SCORES.plain(),
    SELECT_KERNELS[0],
    SELECT_KERNELS[1],
];

crate::params! {
pub(crate) struct QkNormParams {
    rows: u32,
    len: u32,
    x_groups: u32,
    eps: f32,
    one: f32,
    _pad: [u32; 3],
}
}

crate::params! {
pub(crate) struct ScoresParams {
    n_keys: u32,
    half: u32,
    heads: u32,
    token0: u32,
    batch: u32,
    key_tiles: u32,
    token_tiles: u32,
    x_groups: u32,
    scale: f32,
    one: f32,
    _pad: [u32; 2],
}
}

crate::params! {
/// Uniform of `pk_topk.wgsl`. (WGSL layout).
pub struct TopkParams {
    /// Score rows to select from, one (token, head, half) each.
    pub rows: u32,
    /// Sub-keys per half: the length of a score row.
    pub n_keys: u32,
    /// Sub-keys kept per row (`knn`, 1 ..= min(n_keys, groups)).
    pub k: u32,
    /// First output row: row `r` of `scores` is written at row `row0 + r` of the outputs.
    pub row0: u32,
    /// Workgroups along x of the dispatch grid (workgroup id = `y * x_groups + x`).
    pub x_groups: u32,
    /// Invocations that scan the row in strides for the threshold (a power of two >= k, <= 256).
    pub groups: u32,
    /// Padding to a multiple of 16 bytes (WGSL uniform layout).
    pub _pad: [u32; 2],
}
}

crate::params! {
/// Uniform of `pk_candidates.wgsl`. (WGSL layout).
pub struct CandidatesParams {
    /// Tokens × heads: the number of (token, head) selections, one invocation each.
    pub tokens_heads: u32,
    /// Candidates kept per (token, head) (`knn`, 1 ..= 128); also the length
    /// of each half's top-k list.
    pub k: u32,
    /// Sub-keys per half: value row = `i1 * n_keys + i2`.
    pub n_keys: u32,
    /// Workgroups along x of the dispatch grid (workgroup id = `y * x_groups + x`).
    pub x_groups: u32,
}
}

/// Workgroup lanes `pk_topk.wgsl` scans with for top-`k` of `n_keys`: the
/// k-th best of their maxima is the collection threshold, so at least k
/// (k <= n_keys), a few times k for a tight threshold, few enough that
/// ranking them by counting stays cheap, and no more than there are sub-keys.
pub fn topk_groups(k: usize, n_keys: usize) -> usize {
    (2 * k)
        .next_power_of_two()
        .clamp(64, 256)
        .min(n_keys.next_power_of_two())
}

/// The buffers product-key selection writes (`B`: the launcher's buffer type).
pub struct SelectOut<'a, B> {
    /// (rows, knn) f32 per-half top-k scores, rows = (group, half).
    pub half_scores: &'a B,
    /// (rows, knn) u32 per-half top-k sub-key ids.
    pub half_ids: &'a B,
    /// (groups, knn) u32 selected rows `i1 * n_keys + i2`, best first.
    pub indices: &'a B,
    /// (groups, knn) f32 pre-softmax scores of those rows.
    pub scores: &'a B,
    /// (groups, knn) f32 softmax of `scores`.
    pub weights: &'a B,
}

/// Launches `pk_topk.wgsl`: the top-`k` of rows `row0 .. row0 + rows` of
/// the half scores (rows of `n_keys`; `scores` holds rows from `row0` on,
/// written at the same rows of `out_s`/`out_i`, (rows, k)).
#[allow(clippy::too_many_arguments)]
pub fn topk<L: Launcher>(
    l: &mut L,
    scores: &L::Buffer,
    out_s: &L::Buffer,
    out_i: &L::Buffer,
    rows: usize,
    row0: usize,
    n_keys: usize,
    k: usize,
) -> Result<(), GpuError> {
    let g = l.grid(rows)?;
    let params = TopkParams {
        rows: u32_of("score rows", rows)?,
        n_keys: u32_of("n_keys", n_keys)?,
        k: u32_of("knn", k)?,
        row0: u32_of("score rows", row0)?,
        x_groups: g.x,
        groups: topk_groups(k, n_keys) as u32,
        _pad: [0; 2],
    };
    l.launch(SELECT_KERNELS[0], &params, &[scores, out_s, out_i], g)
}

/// Launches `pk_candidates.wgsl`: the k best of the k² pairs of each of
/// `groups` (token, head) groups, by the oracle's rule, and their softmax.
pub fn candidates<L: Launcher>(
    l: &mut L,
    out: &SelectOut<'_, L::Buffer>,
    groups: usize,
    n_keys: usize,
    k: usize,
) -> Result<(), GpuError> {
    let g = l.grid(groups.div_ceil(64))?;
    let params = CandidatesParams {
        tokens_heads: u32_of("selection groups", groups)?,
        k: u32_of("knn", k)?,
        n_keys: u32_of("n_keys", n_keys)?,
        x_groups: g.x,
    };
    l.launch(
        SELECT_KERNELS[1],
        &params,
        &[
            out.half_scores,
            out.half_ids,
            out.indices,
            out.scores,
            out.weights,
        ],
        g,
    )
}

/// Product-key selection from sub-key scores (groups, 2, n_keys) f32:
/// per-half top-k, then the k best pairs, into `out`. `1 <= k <= min(n_keys,
/// MAX_K)` (checked).
pub fn select<L: Launcher>(
    l: &mut L,
    scores: &L::Buffer,
    groups: usize,
    n_keys: usize,
    k: usize,
    out: &SelectOut<'_, L::Buffer>,
) -> Result<(), GpuError> {
    check_select(n_keys, k)?;
    if groups == 0 {
        return Ok(());
    }
    topk(
        l,
        scores,
        out.half_scores,
        out.half_ids,
        2 * groups,
        0,
        n_keys,
        k,
    )?;
    candidates(l, out, groups, n_keys, k)
}

/// The selection kernels' limits: `1 <= k <= min(n_keys, MAX_K)`.
pub fn check_select(n_keys: usize, k: usize) -> Result<(), GpuError> {
    if k == 0 || k > n_keys.min(MAX_K) {
        return Err(GpuError::Invalid(format!(
            "product-key selection: knn {k} must be in 1..={} (n_keys {n_keys}, GPU limit {MAX_K})",
            n_keys.min(MAX_K)
        )));
    }
    Ok(())
}

/// Launches `pk_qk_norm.wgsl`: `y` = rows of `x` (rows, len) divided by their norm.
fn qk_norm<L: Launcher>(
    l: &mut L,
    x: &L::Buffer,
    y: &L::Buffer,
    rows: usize,
    len: usize,
) -> Result<(), GpuError> {
    let g = l.grid(rows.div_ceil(64))?;
    let params = QkNormParams {
        rows: u32_of("qk-norm rows", rows)?,
        len: u32_of("qk-norm width", len)?,
        x_groups: g.x,
        eps: QK_NORM_EPS,
        one: 1.0,
        _pad: [0; 3],
    };
    l.launch(LOOKUP_KERNELS[0], &params, &[x, y], g)
}

/// The buffers of one lookup (`B`: the launcher's buffer type).
pub struct LookupIo<'a, B> {
    /// (heads, 2, n_keys, k_dim / 2) f32 sub-keys.
    pub keys: &'a B,
    /// (tokens, heads, k_dim) f32 queries.
    pub query: &'a B,
    /// (batch_tokens, heads, 2, n_keys) f32 score scratch.
    pub sub_scores: &'a B,
    /// qk-norm scratch: (heads, 2, n_keys, half) keys and (tokens, heads, k_dim) queries.
    pub normed: Option<(&'a B, &'a B)>,
    /// The selection's outputs, (tokens, heads, ...).
    pub out: SelectOut<'a, B>,
}

/// The whole lookup of `plan`: qk-norm (when on), per batch of tokens the
/// sub-key scores and the per-half top-k, then the candidates and softmax.
pub fn lookup<L: Launcher>(
    l: &mut L,
    plan: &LookupPlan,
    io: &LookupIo<'_, L::Buffer>,
) -> Result<(), GpuError> {
    let cfg = &plan.cfg;
    if plan.tokens == 0 {
        return Ok(());
    }
    let (keys, query) = match io.normed {
        Some((nk, nq)) => {
            let half = cfg.half();
            qk_norm(l, io.keys, nk, plan.keys_len() / half, half)?;
            qk_norm(l, io.query, nq, plan.query_len() / half, half)?;
            (nk, nq)
        }
        None => (io.keys, io.query),
    };
    let key_tiles = cfg.n_keys.div_ceil(SCORE_TILE_KEYS);
    for token0 in (0..plan.tokens).step_by(plan.batch_tokens) {
        let batch = plan.batch_tokens.min(plan.tokens - token0);
        let token_tiles = batch.div_ceil(SCORE_TILE_TOKENS);
        let g = l.grid(key_tiles * token_tiles * cfg.heads * 2)?;
        let params = ScoresParams {
            n_keys: u32_of("n_keys", cfg.n_keys)?,
            half: cfg.half() as u32,
            heads: u32_of("heads", cfg.heads)?,
            token0: u32_of("tokens", token0)?,
            batch: batch as u32,
            key_tiles: key_tiles as u32,
            token_tiles: token_tiles as u32,
            x_groups: g.x,
            scale: cfg.score_scale(),
            one: 1.0,
            _pad: [0; 2],
        };
        l.launch(LOOKUP_KERNELS[1], &params, &[keys, query, io.sub_scores], g)?;
        let out = &io.out;
        let rows = batch * cfg.heads * 2;
        let row0 = token0 * cfg.heads * 2;
        topk(
            l,
            io.sub_scores,
            out.half_scores,
            out.half_ids,
            rows,
            row0,
            cfg.n_keys,
            cfg.knn,
        )?;
    }
    candidates(l, &io.out, plan.tokens * cfg.heads, cfg.n_keys, cfg.knn)
}

/// Shapes of one lookup and how its work is cut into dispatches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LookupPlan {
    /// The layer's shapes (only `heads`, `n_keys`, `k_dim`, `knn`, `qk_norm` matter).
    pub cfg: PkmConfig,
    /// Queries in the batch.
    pub tokens: usize,
    /// Tokens per scoring pass: the score scratch holds
    /// `(batch_tokens, heads, 2, n_keys)` f32.
    pub batch_tokens: usize,
}

impl LookupPlan {
    /// Validates `cfg` for the kernels; scores all tokens in one pass when
    /// their scores fit [`SCORE_SCRATCH_BYTES`] and one binding, else in
    /// batches that do.
    pub fn new(ctx: &GpuContext, cfg: &PkmConfig, tokens: usize) -> Result<Self, GpuError> {
        let limit = ctx.max_binding_bytes().min(SCORE_SCRATCH_BYTES);
        let per_token = (cfg.heads * 2 * cfg.n_keys) as u64 * 4;
        let batch = (limit / per_token.max(1)) as usize;
        Self::with_batch(ctx, cfg, tokens, batch.min(tokens).max(1))
    }

    /// As [`LookupPlan::new`] with a forced number of tokens per scoring pass.
    pub fn with_batch(
        ctx: &GpuContext,
        cfg: &PkmConfig,
        tokens: usize,
        batch_tokens: usize,
    ) -> Result<Self, GpuError> {
        cfg.validate()?;
        if cfg.knn > MAX_K {
            return Err(GpuError::Invalid(format!(
                "knn {} exceeds the GPU lookup's maximum of {MAX_K}",
                cfg.knn
            )));
        }
        if batch_tokens == 0 {
            return Err(GpuError::Invalid("batch_tokens must be at least 1".into()));
        }
        let plan = Self {
            cfg: cfg.clone(),
            tokens,
            batch_tokens: batch_tokens.min(tokens.max(1)),
        };
        plan.check_limits(ctx)?;
        Ok(plan)
    }

    /// (token, head, half) rows: `tokens * heads * 2`.
    pub fn rows(&self) -> usize {
        self.tokens * self.cfg.heads * 2
    }

    /// Elements of each output: `tokens * heads * knn`.
    pub fn out_len(&self) -> usize {
        self.tokens * self.cfg.heads * self.cfg.knn
    }

    fn keys_len(&self) -> usize {
        self.cfg.heads * 2 * self.cfg.n_keys * self.cfg.half()
    }

    fn query_len(&self) -> usize {
        self.tokens * self.cfg.heads * self.cfg.k_dim
    }

    fn scratch_len(&self) -> usize {
        self.batch_tokens * self.cfg.heads * 2 * self.cfg.n_keys
    }

    fn check_limits(&self, ctx: &GpuContext) -> Result<(), GpuError> {
        let limit = ctx.max_binding_bytes();
        for (what, elems) in [
            ("keys (heads, 2, n_keys, k_dim/2)", self.keys_len()),
            ("query (tokens, heads, k_dim)", self.query_len()),
            (
                "outputs (tokens, heads, 2, knn)",
                self.rows() * self.cfg.knn,
            ),
            (
                "score scratch (batch_tokens, heads, 2, n_keys)",
                self.scratch_len(),
            ),
        ] {
            let bytes = elems as u64 * 4;
            if bytes > limit {
                return Err(GpuError::Invalid(format!(
                    "{what} takes {bytes} bytes, more than one storage binding ({limit} bytes); \
                     split the batch"
                )));
            }
        }
        Ok(())
    }
}

/// Device buffers of one lookup: the outputs and the scratch the kernels use.
pub struct LookupBuffers {
    /// (tokens, heads, knn) u32 selected value rows, best first.
    pub indices: wgpu::Buffer,
    /// (tokens, heads, knn) f32 pre-softmax scores of those rows.
    pub scores: wgpu::Buffer,
    /// (tokens, heads, knn) f32 softmax of `scores` over knn.
    pub weights: wgpu::Buffer,
    /// (tokens, heads, 2, knn) f32 per-half top-k scores.
    pub half_scores: wgpu::Buffer,
    /// (tokens, heads, 2, knn) u32 per-half top-k sub-key ids.
    pub half_ids: wgpu::Buffer,
    /// (batch_tokens, heads, 2, n_keys) f32 sub-key scores of one batch.
    sub_scores: wgpu::Buffer,
    /// qk-norm scratch: normalised keys (heads, 2, n_keys, half) and queries (tokens, heads, k_dim).
    normed: Option<(wgpu::Buffer, wgpu::Buffer)>,
    plan: LookupPlan,
    /// read-back staging, reused by [`LookupBuffers::read_async`]
    staging: StagingPool,
}

impl LookupBuffers {
    /// Allocates the outputs and scratch of `plan`.
    pub fn new(ctx: &GpuContext, plan: &LookupPlan) -> Result<Self, GpuError> {
        let out = plan.out_len() as u64 * 4;
        let half = (plan.rows() * plan.cfg.knn) as u64 * 4;
        ctx.scoped("allocating lookup buffers", || Self {
            indices: storage_zeroed(ctx, "lookup indices", out),
            scores: storage_zeroed(ctx, "lookup scores", out),
            weights: storage_zeroed(ctx, "lookup weights", out),
            half_scores: storage_zeroed(ctx, "lookup half scores", half),
            half_ids: storage_zeroed(ctx, "lookup half ids", half),
            sub_scores: storage_zeroed(ctx, "lookup sub-key scores", plan.scratch_len() as u64 * 4),
            normed: plan.cfg.qk_norm.then(|| {
                (
                    storage_zeroed(ctx, "lookup normed keys", plan.keys_len() as u64 * 4),
                    storage_zeroed(ctx, "lookup normed query", plan.query_len() as u64 * 4),
                )
            }),
            plan: plan.clone(),
            staging: StagingPool::default(),
        })
    }

    /// The plan these buffers were allocated for.
    pub fn plan(&self) -> &LookupPlan {
        &self.plan
    }

    /// Staging buffers [`LookupBuffers::read_async`] created so far (one,
    /// reused, when reads do not overlap).
    pub fn staging_created(&self) -> u64 {
        self.staging.created()
    }

    /// [`LookupBuffers::read`] as a future, in one round trip to the device
    /// (on the web a read-back must yield to the browser); the staging
    /// buffer is reused from call to call.
    pub async fn read_async(&self, ctx: &GpuContext) -> Result<Lookup, GpuError> {
        let bytes = self.plan.out_len() as u64 * 4;
        let parts = read_back_pooled_async(
            ctx,
            Some(&self.staging),
            &[
                (&self.indices, 0, bytes),
                (&self.scores, 0, bytes),
                (&self.weights, 0, bytes),
            ],
        )
        .await?;
        let [indices, scores, weights] = [&parts[0], &parts[1], &parts[2]];
        Ok(Lookup {
            indices: bytemuck::pod_collect_to_vec(indices),
            scores: bytemuck::pod_collect_to_vec(scores),
            weights: bytemuck::pod_collect_to_vec(weights),
        })
    }

    /// Reads the outputs back into an oracle-shaped [`Lookup`].
    pub fn read(&self, ctx: &GpuContext) -> Result<Lookup, GpuError> {
        let n = self.plan.out_len();
        Ok(Lookup {
            indices: read_back(ctx, &self.indices, 0, n)?,
            scores: read_back(ctx, &self.scores, 0, n)?,
            weights: read_back(ctx, &self.weights, 0, n)?,
        })
    }
}

/// The lookup pipelines, built once per device, with their bind-group cache
/// ([`Kernels`]): recording the lookup again into the same [`LookupBuffers`]
/// with the same key and query buffers creates no bind group and no buffer.
pub struct LookupKernels {
    kernels: Kernels,
}

impl LookupKernels {
    /// Compiles the four kernels.
    pub fn new(ctx: &GpuContext) -> Result<Self, GpuError> {
        Ok(Self {
            kernels: Kernels::new(ctx, LOOKUP_KERNELS)?,
        })
    }

    /// The pipeline set (for its [`Kernels::stats`]).
    pub fn kernels(&self) -> &Kernels {
        &self.kernels
    }

    /// Records the lookup of `out.plan()` into `encoder` (one compute pass):
    /// reads `keys` (heads, 2, n_keys, k_dim/2) f32 and `query` (tokens,
    /// heads, k_dim) f32, writes `out.indices`/`out.scores`/`out.weights`
    /// (tokens, heads, knn). Records nothing for zero tokens.
    pub fn record(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        keys: &wgpu::Buffer,
        query: &wgpu::Buffer,
        out: &LookupBuffers,
    ) -> Result<(), GpuError> {
        let plan = &out.plan;
        for (what, buf, elems) in [
            ("keys", keys, plan.keys_len()),
            ("query", query, plan.query_len()),
        ] {
            if buf.size() < elems as u64 * 4 {
                return Err(GpuError::Invalid(format!(
                    "{what} buffer holds {} bytes, the lookup reads {}",
                    buf.size(),
                    elems * 4
                )));
            }
        }
        let io = LookupIo {
            keys,
            query,
            sub_scores: &out.sub_scores,
            normed: out.normed.as_ref().map(|(k, q)| (k, q)),
            out: SelectOut {
                half_scores: &out.half_scores,
                half_ids: &out.half_ids,
                indices: &out.indices,
                scores: &out.scores,
                weights: &out.weights,
            },
        };
        lookup(&mut self.kernels.launcher(ctx, encoder), plan, &io)
    }

    /// Host-level lookup with the default plan: uploads `keys`
    /// (heads, 2, n_keys, k_dim/2) and `query` (tokens, heads, k_dim), runs,
    /// reads back (tokens, heads, knn) indices, scores and weights.
    pub fn run(
        &self,
        ctx: &GpuContext,
        cfg: &PkmConfig,
        keys: &[f32],
        query: &[f32],
        tokens: usize,
    ) -> Result<Lookup, GpuError> {
        let plan = LookupPlan::new(ctx, cfg, tokens)?;
        self.run_plan(ctx, &plan, keys, query)
    }

    /// As [`LookupKernels::run`] with an explicit plan (e.g. small batches).
    pub fn run_plan(
        &self,
        ctx: &GpuContext,
        plan: &LookupPlan,
        keys: &[f32],
        query: &[f32],
    ) -> Result<Lookup, GpuError> {
        let cfg = &plan.cfg;
        cfg.validate()?;
        check_len("keys", keys, &[cfg.heads, 2, cfg.n_keys, cfg.half()])?;
        check_len("query", query, &[plan.tokens, cfg.heads, cfg.k_dim])?;
        if plan.tokens == 0 {
            return Ok(Lookup {
                indices: Vec::new(),
                scores: Vec::new(),
                weights: Vec::new(),
            });
        }
        let out = LookupBuffers::new(ctx, plan)?;
        let (keys_buf, query_buf) = ctx.scoped("uploading lookup inputs", || {
            (
                storage_init(ctx, "lookup keys", keys),
                storage_init(ctx, "lookup query", query),
            )
        })?;
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        ctx.scoped("recording the lookup", || {
            self.record(ctx, &mut encoder, &keys_buf, &query_buf, &out)
        })??;
        ctx.queue.submit([encoder.finish()]);
        out.read(ctx)
    }
}
