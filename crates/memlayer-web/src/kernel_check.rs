//! The browser's side of `memlayer bench` (the `webgpu_chromium` backends):
//! runs the product-key lookup and the embedding-bag forward on a WebGPU
//! device for the inputs the runner sends (JSON), returns their outputs (the
//! runner compares them with the CPU oracle) and times the same kernels on
//! larger inputs made here from a seed, with the device's copy bandwidth as
//! their ceiling. Only the ops with an async read-back run: the backward ops'
//! host calls read back synchronously, which a browser cannot.
//!
//! Builds natively too (the tests run it on lavapipe); in the browser it is
//! called through `kernel_check` of the wasm API.

use memlayer_core::pkm::PkmConfig;
use memlayer_core::rng::Rng;
use memlayer_wgpu::bag_forward::BagForward;
use memlayer_wgpu::buffers::{read_back_async, storage_init, storage_zeroed};
use memlayer_wgpu::copy::CopyKernel;
use memlayer_wgpu::lookup::{LookupBuffers, LookupKernels, LookupPlan};
use memlayer_wgpu::{GpuContext, GpuDtype, ShardedTable};
use serde::{Deserialize, Serialize};

use crate::WebError;

/// What the runner asks for.
#[derive(Debug, Deserialize)]
pub struct KernelRequest {
    /// Lookups to run.
    pub lookups: Vec<LookupCase>,
    /// Bag forwards to run.
    pub bags: Vec<BagCase>,
    /// The speed pass, or none.
    pub speed: Option<SpeedRequest>,
}

/// One lookup: keys (heads, 2, n_keys, k_dim / 2), query (tokens, heads, k_dim).
#[derive(Debug, Deserialize)]
pub struct LookupCase {
    /// The case, echoed in the answer.
    pub name: String,
    /// Read heads.
    pub heads: usize,
    /// Sub-keys per half.
    pub n_keys: usize,
    /// Query width per head.
    pub k_dim: usize,
    /// Rows read per head.
    pub knn: usize,
    /// RMS-normalise queries and sub-keys.
    pub qk_norm: bool,
    /// Tokens of `query`.
    pub tokens: usize,
    /// (heads, 2, n_keys, k_dim / 2)
    pub keys: Vec<f32>,
    /// (tokens, heads, k_dim)
    pub query: Vec<f32>,
}

/// One bag forward: table (rows, dim) stored as `dtype` (`f32`, `f16`,
/// `bf16`); indices, weights (nnz); offsets (bags + 1).
#[derive(Debug, Deserialize)]
pub struct BagCase {
    /// The case, echoed in the answer.
    pub name: String,
    /// Storage type of the table on the device.
    pub dtype: String,
    /// Rows of the table.
    pub rows: usize,
    /// Row width.
    pub dim: usize,
    /// (rows, dim)
    pub table: Vec<f32>,
    /// (nnz)
    pub indices: Vec<u32>,
    /// (nnz)
    pub weights: Vec<f32>,
    /// (bags + 1)
    pub offsets: Vec<usize>,
}

/// Shapes of the speed pass (inputs made here from a seed).
#[derive(Debug, Deserialize)]
pub struct SpeedRequest {
    /// Rows of the bag table.
    pub rows: usize,
    /// Row width.
    pub dim: usize,
    /// Bags per call.
    pub bags: usize,
    /// Rows per bag.
    pub bag_size: usize,
    /// Sub-keys per half of each lookup size (N = n_keys²).
    pub n_keys: Vec<usize>,
    /// Lookup heads.
    pub heads: usize,
    /// Rows per head.
    pub knn: usize,
    /// Query width per head.
    pub k_dim: usize,
    /// Tokens per lookup call.
    pub tokens: usize,
    /// Bytes of the copy probe.
    pub copy_bytes: u64,
    /// Timed calls per figure (median).
    pub repeats: usize,
}

/// The answer.
#[derive(Debug, Default, Serialize)]
pub struct KernelReply {
    /// One per requested lookup.
    pub lookups: Vec<LookupOut>,
    /// One per requested bag forward.
    pub bags: Vec<BagOut>,
    /// The timed figures.
    pub speed: Vec<SpeedOut>,
    /// The device's copy kernel, GB/s (the speed figures' ceiling).
    pub copy_gbps: Option<f64>,
}

/// (tokens, heads, knn) each.
#[derive(Debug, Serialize)]
pub struct LookupOut {
    /// The case.
    pub name: String,
    /// Selected rows.
    pub indices: Vec<u32>,
    /// Their scores.
    pub scores: Vec<f32>,
    /// Softmax of the scores.
    pub weights: Vec<f32>,
}

/// (bags, dim).
#[derive(Debug, Serialize)]
pub struct BagOut {
    /// The case.
    pub name: String,
    /// The table's storage type.
    pub dtype: String,
    /// The bags.
    pub out: Vec<f32>,
}

/// One timed figure: `op` (`bag_forward` GB/s of rows gathered, `lookup`
/// µs per token), its dtype and N.
#[derive(Debug, Serialize)]
pub struct SpeedOut {
    /// `bag_forward` or `lookup`.
    pub op: String,
    /// Storage type.
    pub dtype: String,
    /// N of a lookup.
    pub n_rows: Option<usize>,
    /// GB/s or µs per token.
    pub value: f64,
    /// Bytes per second of the figure (rows gathered; sub-keys scored).
    pub bytes_per_second: f64,
}

fn gpu_dtype(name: &str) -> Result<GpuDtype, WebError> {
    match name {
        "f32" => Ok(GpuDtype::F32),
        "f16" => Ok(GpuDtype::F16),
        "bf16" => Ok(GpuDtype::Bf16),
        other => Err(WebError::Input(format!("no dtype {other:?}"))),
    }
}

/// The layer of a lookup: `PkmConfig::paper()` with these shapes (its
/// widths other than `k_dim` do not enter the lookup).
fn pkm(heads: usize, n_keys: usize, k_dim: usize, knn: usize, qk_norm: bool) -> PkmConfig {
    let mut cfg = PkmConfig::paper();
    (cfg.heads, cfg.n_keys, cfg.k_dim, cfg.knn, cfg.qk_norm) = (heads, n_keys, k_dim, knn, qk_norm);
    cfg
}

/// The kernels, built once.
struct Kernels {
    lookup: LookupKernels,
    bag: BagForward,
}

/// Lookup of `tokens` tokens, read back without blocking.
async fn lookup(
    ctx: &GpuContext,
    k: &Kernels,
    cfg: &PkmConfig,
    keys: &[f32],
    query: &[f32],
    tokens: usize,
) -> Result<memlayer_core::pkm::Lookup, WebError> {
    let plan = LookupPlan::new(ctx, cfg, tokens)?;
    let out = LookupBuffers::new(ctx, &plan)?;
    let keys = storage_init(ctx, "keys", keys);
    let query = storage_init(ctx, "query", query);
    let mut encoder = ctx.device.create_command_encoder(&Default::default());
    k.lookup.record(ctx, &mut encoder, &keys, &query, &out)?;
    ctx.queue.submit([encoder.finish()]);
    Ok(out.read_async(ctx).await?)
}

/// Bag forward over a flat table on the device: one slot of all its rows.
async fn bag_forward(
    ctx: &GpuContext,
    k: &Kernels,
    table: &ShardedTable,
    indices: &[u32],
    weights: &[f32],
    offsets: &[usize],
) -> Result<Vec<f32>, WebError> {
    Ok(k.bag
        .run_paged_async(ctx, table, table.rows, &[0], indices, weights, offsets)
        .await?)
}

/// Runs every case of `req` on `ctx`; `now` is a clock in seconds.
pub async fn run(
    ctx: &GpuContext,
    req: &KernelRequest,
    now: impl Fn() -> f64,
) -> Result<KernelReply, WebError> {
    let k = Kernels {
        lookup: LookupKernels::new(ctx)?,
        bag: BagForward::new(ctx)?,
    };
    let mut reply = KernelReply::default();
    for c in &req.lookups {
        let cfg = pkm(c.heads, c.n_keys, c.k_dim, c.knn, c.qk_norm);
        let l = lookup(ctx, &k, &cfg, &c.keys, &c.query, c.tokens).await?;
        reply.lookups.push(LookupOut {
            name: c.name.clone(),
            indices: l.indices,
            scores: l.scores,
            weights: l.weights,
        });
    }
    for c in &req.bags {
        let table =
            ShardedTable::upload(ctx, "values", &c.table, c.rows, c.dim, gpu_dtype(&c.dtype)?)?;
        let out = bag_forward(ctx, &k, &table, &c.indices, &c.weights, &c.offsets).await?;
        reply.bags.push(BagOut {
            name: c.name.clone(),
            dtype: c.dtype.clone(),
            out,
        });
    }
    if let Some(s) = &req.speed {
        speed(ctx, &k, s, &now, &mut reply).await?;
    }
    Ok(reply)
}

/// Median seconds of `repeats` calls (after one warm-up) of an async op.
macro_rules! time_median {
    ($now:expr, $repeats:expr, $call:expr) => {{
        $call;
        let mut times = Vec::new();
        for _ in 0..$repeats.max(1) {
            let t0 = $now();
            $call;
            times.push($now() - t0);
        }
        times.sort_by(f64::total_cmp);
        times[times.len() / 2].max(1e-9)
    }};
}

async fn speed(
    ctx: &GpuContext,
    k: &Kernels,
    s: &SpeedRequest,
    now: &impl Fn() -> f64,
    reply: &mut KernelReply,
) -> Result<(), WebError> {
    // the copy kernel: the ceiling (a 4-byte read-back waits for it)
    let bytes = s.copy_bytes.min(ctx.max_binding_bytes()) / 16 * 16;
    let src = storage_zeroed(ctx, "copy src", bytes);
    let dst = storage_zeroed(ctx, "copy dst", bytes);
    let copy = CopyKernel::new(ctx)?;
    let secs = time_median!(now, s.repeats, {
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        copy.record(ctx, &mut enc, &src, &dst, bytes)?;
        ctx.queue.submit([enc.finish()]);
        read_back_async::<u32>(ctx, &dst, 0, 1).await?;
    });
    reply.copy_gbps = Some(bytes as f64 / secs / 1e9);
    drop((src, dst));

    let mut rng = Rng::new(2024);
    let table = rng.normal_vec(s.rows * s.dim, 0.0, 1.0);
    let nnz = s.bags * s.bag_size;
    let indices: Vec<u32> = (0..nnz).map(|_| rng.below(s.rows as u64) as u32).collect();
    let weights = rng.normal_vec(nnz, 0.0, 1.0);
    let offsets = memlayer_core::bag::uniform_offsets(s.bags, s.bag_size);
    for dtype in ["f32", "f16", "bf16"] {
        let t = ShardedTable::upload(ctx, "values", &table, s.rows, s.dim, gpu_dtype(dtype)?)?;
        let secs = time_median!(now, s.repeats, {
            bag_forward(ctx, k, &t, &indices, &weights, &offsets).await?;
        });
        let elem = if dtype == "f32" { 4 } else { 2 };
        let gathered = (nnz * s.dim * elem) as f64;
        reply.speed.push(SpeedOut {
            op: "bag_forward".into(),
            dtype: dtype.into(),
            n_rows: None,
            value: gathered / secs / 1e9,
            bytes_per_second: gathered / secs,
        });
    }
    for &n_keys in &s.n_keys {
        let cfg = pkm(s.heads, n_keys, s.k_dim, s.knn, false);
        let keys = rng.normal_vec(s.heads * 2 * n_keys * cfg.half(), 0.0, 1.0);
        let query = rng.normal_vec(s.tokens * s.heads * s.k_dim, 0.0, 1.0);
        let secs = time_median!(now, s.repeats, {
            lookup(ctx, k, &cfg, &keys, &query, s.tokens).await?;
        });
        let key_bytes = (s.heads * 2 * n_keys * cfg.half() * 4) as f64;
        let per_token = secs / s.tokens as f64;
        reply.speed.push(SpeedOut {
            op: "lookup".into(),
            dtype: "f32".into(),
            n_rows: Some(n_keys * n_keys),
            value: per_token * 1e6,
            bytes_per_second: key_bytes / per_token,
        });
    }
    Ok(())
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;

    /// The request's lookup and bag forward on lavapipe equal the oracle's.
    #[test]
    fn answers_like_the_oracle() {
        let Some(ctx) = memlayer_wgpu::context::gpu_for_tests(Default::default()) else {
            return;
        };
        let mut rng = Rng::new(5);
        let cfg = pkm(2, 16, 8, 4, false);
        let keys = rng.normal_vec(2 * 2 * 16 * 4, 0.0, 1.0);
        let query = rng.normal_vec(3 * 2 * 8, 0.0, 1.0);
        let table = rng.normal_vec(10 * 6, 0.0, 1.0);
        let req = KernelRequest {
            lookups: vec![LookupCase {
                name: "l".into(),
                heads: 2,
                n_keys: 16,
                k_dim: 8,
                knn: 4,
                qk_norm: false,
                tokens: 3,
                keys: keys.clone(),
                query: query.clone(),
            }],
            bags: vec![BagCase {
                name: "b".into(),
                dtype: "f32".into(),
                rows: 10,
                dim: 6,
                table: table.clone(),
                indices: vec![1, 9, 9, 0],
                weights: vec![0.5, 1.0, -2.0, 3.0],
                offsets: vec![0, 2, 2, 4],
            }],
            speed: Some(SpeedRequest {
                rows: 64,
                dim: 8,
                bags: 4,
                bag_size: 3,
                n_keys: vec![16],
                heads: 1,
                knn: 4,
                k_dim: 8,
                tokens: 2,
                copy_bytes: 1 << 16,
                repeats: 1,
            }),
        };
        let start = std::time::Instant::now();
        let reply = pollster::block_on(run(&ctx, &req, || start.elapsed().as_secs_f64())).unwrap();
        let want = memlayer_core::pkm::lookup(&cfg, &keys, &query, 3).unwrap();
        assert_eq!(reply.lookups[0].indices, want.indices);
        assert_eq!(reply.lookups[0].scores, want.scores);
        let bag = memlayer_core::bag::bag_forward(
            &table,
            10,
            6,
            &[1, 9, 9, 0],
            &[0.5, 1.0, -2.0, 3.0],
            &[0, 2, 2, 4],
        )
        .unwrap();
        assert_eq!(reply.bags[0].out, bag);
        assert_eq!(reply.speed.len(), 4, "{:?}", reply.speed);
        assert!(reply.copy_gbps.is_some_and(|g| g > 0.0));
    }
}
