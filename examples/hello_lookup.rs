//! hello_lookup: one product-key memory read on the GPU, checked against the CPU oracle.
//!
//! A product-key memory holds N = n_keys² value rows but reads only k of them per query:
//! the query's two halves are each scored against n_keys sub-keys, the top k of each half
//! make k × k candidate rows (row = i1 · n_keys + i2, score = s1 + s2), the best k of those
//! are kept and softmaxed, and an embedding-bag sums the k value rows with those weights.
//! This example runs both steps with memlayer's WGSL kernels on the default adapter and
//! checks them against `memlayer-core`, the CPU oracle every backend is tested against.
//!
//! ```sh
//! cargo run --release --example hello_lookup
//! ```
//! Any Vulkan/Metal/DX12 adapter works (on a machine without a GPU, Mesa's lavapipe);
//! `MEMLAYER_ADAPTER=llvmpipe` picks an adapter by name.

use memlayer_core::bag::bag_forward;
use memlayer_core::pkm::{self, PkmConfig};
use memlayer_core::rng::Rng;
use memlayer_wgpu::bag_forward::BagForward;
use memlayer_wgpu::lookup::LookupKernels;
use memlayer_wgpu::{GpuContext, GpuDtype, GpuOptions, ShardedTable};

type Error = Box<dyn std::error::Error>;

fn main() -> Result<(), Error> {
    // A device on the first Vulkan/Metal/DX12 adapter (falls back to GL).
    let ctx = GpuContext::new(&GpuOptions::default())?;
    println!("adapter: {}", ctx.name());
    let read = run(&ctx)?;
    println!(
        "{} tokens × {} heads read {} of {} value rows each; GPU rows == oracle rows, \
         output within {:.1e} of the oracle",
        read.tokens, read.heads, read.knn, read.rows, read.max_abs_diff
    );
    Ok(())
}

/// What one read did, for printing and for the test that runs this example.
pub struct MemoryRead {
    /// Tokens whose queries were looked up.
    pub tokens: usize,
    /// Memory heads per token.
    pub heads: usize,
    /// Value rows read per (token, head).
    pub knn: usize,
    /// Value rows in the memory (`n_keys²`).
    pub rows: usize,
    /// Largest |GPU − oracle| over the read vectors.
    pub max_abs_diff: f32,
}

/// Looks up and reads a small memory on `ctx`, checking each step against the oracle.
pub fn run(ctx: &GpuContext) -> Result<MemoryRead, Error> {
    // 64² = 4096 value rows of width 64, read by 4 heads, 16 rows per head.
    let cfg = PkmConfig {
        dim: 64,
        v_dim: 64,
        heads: 4,
        n_keys: 64,
        k_dim: 32,
        knn: 16,
        qk_norm: true,
        gated: false,
    };
    let tokens = 8;
    let mut rng = Rng::new(7);
    // keys: (heads, 2, n_keys, k_dim / 2) — one set of sub-keys per head and query half
    let keys = rng.normal_vec(cfg.heads * 2 * cfg.n_keys * cfg.half(), 0.0, 1.0);
    // queries: (tokens, heads, k_dim) — in a model, a projection of the hidden state
    let queries = rng.normal_vec(tokens * cfg.heads * cfg.k_dim, 0.0, 1.0);
    // values: (n_keys², v_dim), Meta's initialisation
    let values = pkm::init_values(&cfg, &mut rng);

    // 1. The search: sub-key scores, top-k per half, k × k candidates, top-k, softmax.
    //    → indices, scores, weights: (tokens, heads, knn)
    let gpu = LookupKernels::new(ctx)?.run(ctx, &cfg, &keys, &queries, tokens)?;
    let cpu = pkm::lookup(&cfg, &keys, &queries, tokens)?;
    if gpu.indices != cpu.indices {
        return Err("the GPU selected other rows than the oracle".into());
    }

    // 2. The read: one bag per (token, head) of its knn rows, weighted by the softmax.
    //    offsets: (bags + 1), bag b = entries offsets[b]..offsets[b + 1]
    let bags = tokens * cfg.heads;
    let offsets: Vec<usize> = (0..=bags).map(|b| b * cfg.knn).collect();
    let table = ShardedTable::upload(
        ctx,
        "values",
        &values,
        cfg.n_rows(),
        cfg.v_dim,
        GpuDtype::F32,
    )?;
    // → (bags, v_dim)
    let read = BagForward::new(ctx)?.run_flat(ctx, &table, &gpu.indices, &gpu.weights, &offsets)?;
    let want = bag_forward(
        &values,
        cfg.n_rows(),
        cfg.v_dim,
        &cpu.indices,
        &cpu.weights,
        &offsets,
    )?;
    let max_abs_diff = read
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    // f32 rounding of the softmax and the sums; a wrong row would be off by ~0.1.
    if max_abs_diff > 1e-4 {
        return Err(format!("GPU read differs from the oracle by {max_abs_diff}").into());
    }
    Ok(MemoryRead {
        tokens,
        heads: cfg.heads,
        knn: cfg.knn,
        rows: cfg.n_rows(),
        max_abs_diff,
    })
}
