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
    Kernel, grid, read_back, read_back_parts_async, storage_init, storage_zeroed, uniform_init,
};
use crate::context::{GpuContext, GpuError};
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

/// WGSL of the qk-norm kernel.
pub const QK_NORM_SOURCE: &str = include_str!("../../../shaders/pk_qk_norm.wgsl");
/// WGSL of the sub-key scoring kernel.
pub const SCORES_SOURCE: &str = include_str!("../../../shaders/pk_scores.wgsl");
/// WGSL of the per-half top-k kernel.
pub const TOPK_SOURCE: &str = include_str!("../../../shaders/pk_topk.wgsl");
/// WGSL of the candidate top-k + softmax kernel.
pub const CANDIDATES_SOURCE: &str = include_str!("../../../shaders/pk_candidates.wgsl");

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct QkNormParams {
    rows: u32,
    len: u32,
    x_groups: u32,
    eps: f32,
    one: f32,
    _pad: [u32; 3],
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ScoresParams {
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

/// Uniform of `pk_topk.wgsl`. (WGSL layout).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct TopkParams {
    pub rows: u32,
    pub n_keys: u32,
    pub k: u32,
    pub row0: u32,
    pub x_groups: u32,
    pub groups: u32,
    pub _pad: [u32; 2],
}

/// Uniform of `pk_candidates.wgsl`. (WGSL layout).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct CandidatesParams {
    pub tokens_heads: u32,
    pub k: u32,
    pub n_keys: u32,
    pub x_groups: u32,
}

/// Invocations of `pk_topk.wgsl` whose maxima set the collection threshold:
/// at least k (the threshold is the k-th best of them; k <= n_keys), a few
/// times k for a tight threshold, few enough that ranking them by counting
/// stays cheap, and no more than there are sub-keys.
/// Workgroup lanes `pk_topk.wgsl` scans with for top-`k` of `n_keys`.
pub fn topk_groups(k: usize, n_keys: usize) -> usize {
    (2 * k)
        .next_power_of_two()
        .clamp(64, 256)
        .min(n_keys.next_power_of_two())
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
        })
    }

    /// The plan these buffers were allocated for.
    pub fn plan(&self) -> &LookupPlan {
        &self.plan
    }

    /// [`LookupBuffers::read`] as a future, in one round trip to the device
    /// (on the web a read-back must yield to the browser).
    pub async fn read_async(&self, ctx: &GpuContext) -> Result<Lookup, GpuError> {
        let bytes = self.plan.out_len() as u64 * 4;
        let parts = read_back_parts_async(
            ctx,
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

/// The lookup pipelines, built once per device.
pub struct LookupKernels {
    qk_norm: Kernel,
    scores: Kernel,
    topk: Kernel,
    candidates: Kernel,
}

impl LookupKernels {
    /// Compiles the four kernels.
    pub fn new(ctx: &GpuContext) -> Result<Self, GpuError> {
        Ok(Self {
            qk_norm: Kernel::new(ctx, "pk_qk_norm", QK_NORM_SOURCE, "main", &[])?,
            scores: Kernel::new(ctx, "pk_scores", SCORES_SOURCE, "main", &[])?,
            topk: Kernel::new(ctx, "pk_topk", TOPK_SOURCE, "main", &[])?,
            candidates: Kernel::new(ctx, "pk_candidates", CANDIDATES_SOURCE, "main", &[])?,
        })
    }

    /// Records the lookup of `out.plan()` into `encoder`: reads `keys`
    /// (heads, 2, n_keys, k_dim/2) f32 and `query` (tokens, heads, k_dim) f32,
    /// writes `out.indices`/`out.scores`/`out.weights` (tokens, heads, knn).
    /// Records nothing for zero tokens.
    pub fn record(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        keys: &wgpu::Buffer,
        query: &wgpu::Buffer,
        out: &LookupBuffers,
    ) -> Result<(), GpuError> {
        let plan = &out.plan;
        let cfg = &plan.cfg;
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
        if plan.tokens == 0 {
            return Ok(());
        }
        let (keys, query) = match &out.normed {
            Some((nk, nq)) => {
                let half = cfg.half();
                self.record_qk_norm(ctx, encoder, keys, nk, plan.keys_len() / half, half);
                self.record_qk_norm(ctx, encoder, query, nq, plan.query_len() / half, half);
                (nk, nq)
            }
            None => (keys, query),
        };
        let key_tiles = cfg.n_keys.div_ceil(SCORE_TILE_KEYS);
        for token0 in (0..plan.tokens).step_by(plan.batch_tokens) {
            let batch = plan.batch_tokens.min(plan.tokens - token0);
            let token_tiles = batch.div_ceil(SCORE_TILE_TOKENS);
            let groups = grid(ctx, (key_tiles * token_tiles * cfg.heads * 2) as u32);
            let params = uniform_init(
                ctx,
                "pk_scores params",
                &ScoresParams {
                    n_keys: cfg.n_keys as u32,
                    half: cfg.half() as u32,
                    heads: cfg.heads as u32,
                    token0: token0 as u32,
                    batch: batch as u32,
                    key_tiles: key_tiles as u32,
                    token_tiles: token_tiles as u32,
                    x_groups: groups.0,
                    scale: cfg.score_scale(),
                    one: 1.0,
                    _pad: [0; 2],
                },
            );
            self.scores.dispatch(
                ctx,
                encoder,
                &[
                    params.as_entire_binding(),
                    keys.as_entire_binding(),
                    query.as_entire_binding(),
                    out.sub_scores.as_entire_binding(),
                ],
                groups,
            );
            let rows = batch * cfg.heads * 2;
            let groups = grid(ctx, rows as u32);
            let params = uniform_init(
                ctx,
                "pk_topk params",
                &TopkParams {
                    rows: rows as u32,
                    n_keys: cfg.n_keys as u32,
                    k: cfg.knn as u32,
                    row0: (token0 * cfg.heads * 2) as u32,
                    x_groups: groups.0,
                    groups: topk_groups(cfg.knn, cfg.n_keys) as u32,
                    _pad: [0; 2],
                },
            );
            self.topk.dispatch(
                ctx,
                encoder,
                &[
                    params.as_entire_binding(),
                    out.sub_scores.as_entire_binding(),
                    out.half_scores.as_entire_binding(),
                    out.half_ids.as_entire_binding(),
                ],
                groups,
            );
        }
        let th = plan.tokens * cfg.heads;
        let groups = grid(ctx, th.div_ceil(64) as u32);
        let params = uniform_init(
            ctx,
            "pk_candidates params",
            &CandidatesParams {
                tokens_heads: th as u32,
                k: cfg.knn as u32,
                n_keys: cfg.n_keys as u32,
                x_groups: groups.0,
            },
        );
        self.candidates.dispatch(
            ctx,
            encoder,
            &[
                params.as_entire_binding(),
                out.half_scores.as_entire_binding(),
                out.half_ids.as_entire_binding(),
                out.indices.as_entire_binding(),
                out.scores.as_entire_binding(),
                out.weights.as_entire_binding(),
            ],
            groups,
        );
        Ok(())
    }

    fn record_qk_norm(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        rows: usize,
        len: usize,
    ) {
        let groups = grid(ctx, rows.div_ceil(64) as u32);
        let params = uniform_init(
            ctx,
            "pk_qk_norm params",
            &QkNormParams {
                rows: rows as u32,
                len: len as u32,
                x_groups: groups.0,
                eps: QK_NORM_EPS,
                one: 1.0,
                _pad: [0; 3],
            },
        );
        self.qk_norm.dispatch(
            ctx,
            encoder,
            &[
                params.as_entire_binding(),
                x.as_entire_binding(),
                y.as_entire_binding(),
            ],
            groups,
        );
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
