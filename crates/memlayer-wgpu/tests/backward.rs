//! Backward kernels against the CPU oracle on a real adapter (lavapipe in CI):
//! the GPU reverse index, the embedding-bag backward (sparse table gradient,
//! per-sample-weight gradient; f32/f16, sharded tables) and the product-key
//! lookup backward (softmax, sub-keys, queries; qk-norm on/off).
//!
//! Forward results (indices, weights) come from the oracle
//! (`memlayer_core::pkm::lookup`); the kernels take them as inputs.
//!
//! Exactness: every gradient element is computed on the GPU with the
//! oracle's sequence of f32 operations (see the shader headers). On
//! llvmpipe (lavapipe) the results are asserted **bit-identical** to the
//! oracle; on any other adapter (where the driver may contract `a * b + c`
//! into an fma, or round sqrt/division differently) within a tight
//! tolerance. Sparse row sets are always asserted identical, and two runs
//! are always asserted bit-identical (determinism).

use memlayer_core::bag::{self, SparseRows};
use memlayer_core::pkm::{self, PkmConfig};
use memlayer_core::rng::Rng;
use memlayer_wgpu::backward::{BagBackward, LookupBackward};
use memlayer_wgpu::buffers::{decode_rows, encode_rows};
use memlayer_wgpu::reverse_index::ReverseIndexKernels;
use memlayer_wgpu::{GpuContext, GpuDtype, GpuOptions, ShardedTable, gpu_for_tests};

fn gpu(max_binding_bytes: Option<u64>) -> Option<GpuContext> {
    gpu_for_tests(GpuOptions {
        max_binding_bytes,
        ..Default::default()
    })
}

/// llvmpipe rounds every f32 operation as IEEE does and does not contract
/// (checked by `fma_contraction_probe`), so parity there is bit for bit.
fn expect_bit_exact(ctx: &GpuContext) -> bool {
    ctx.info.name.to_lowercase().contains("llvmpipe")
        || ctx.info.driver.to_lowercase().contains("llvmpipe")
}

/// Distance in units in the last place (0 for identical bits, and for ±0).
fn ulps(a: f32, b: f32) -> u32 {
    let key = |x: f32| {
        let i = x.to_bits() as i32;
        if i < 0 { i32::MIN - i } else { i }
    };
    (key(a) as i64 - key(b) as i64)
        .unsigned_abs()
        .min(u32::MAX as u64) as u32
}

/// Asserts `got` ≈ `want`: bit-identical when `exact`, else every element
/// within `rel * max|want|` (absolute) or 64 ulps.
fn assert_close(what: &str, got: &[f32], want: &[f32], exact: bool, rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let (mut worst_ulp, mut worst_abs, mut differing) = (0u32, 0.0f32, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let u = ulps(g, w);
        if g.to_bits() != w.to_bits() && !(g == 0.0 && w == 0.0) {
            differing += 1;
        }
        worst_ulp = worst_ulp.max(u);
        worst_abs = worst_abs.max((g - w).abs());
        if exact {
            assert!(
                g.to_bits() == w.to_bits() || (g == 0.0 && w == 0.0),
                "{what}[{i}]: {g:e} vs oracle {w:e} ({u} ulps)"
            );
        } else {
            assert!(
                (g - w).abs() <= rel * scale || u <= 64,
                "{what}[{i}]: {g:e} vs oracle {w:e} ({u} ulps, scale {scale:e})"
            );
        }
    }
    eprintln!(
        "  {what}: {} values, {differing} not bit-identical, max {worst_ulp} ulps, max abs {worst_abs:e}",
        got.len()
    );
}

fn same_bits(what: &str, a: &[f32], b: &[f32]) {
    assert!(
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
        "{what}: two runs differ"
    );
}

fn assert_sparse(what: &str, got: &SparseRows, want: &SparseRows, exact: bool) {
    assert_eq!(got.dim, want.dim, "{what}: dim");
    assert_eq!(got.rows, want.rows, "{what}: touched rows");
    assert_close(what, &got.grads, &want.grads, exact, 1e-5);
}

// ---------------------------------------------------------------- reverse index

#[test]
fn reverse_index_matches_a_stable_cpu_sort() {
    let Some(ctx) = gpu(None) else { return };
    let ri = ReverseIndexKernels::new(&ctx).unwrap();
    let mut rng = Rng::new(11);
    // (n, id range): one radix pass, two, three, four (full u32 ids), many duplicates
    for &(n, range) in &[
        (1usize, 1u64),
        (5, 3),
        (300, 256),
        (1000, 257),
        (4097, 70_000),
        (20_000, 1 << 24),
        (3000, 1 << 32),
        (50_000, 7),
    ] {
        let ids: Vec<u32> = (0..n).map(|_| rng.below(range) as u32).collect();
        let got = ri.run(&ctx, &ids, range).unwrap();
        let mut order: Vec<u32> = (0..n as u32).collect();
        order.sort_by_key(|&e| (ids[e as usize], e));
        assert_eq!(got.sorted_entries, order, "n={n} range={range}");
        let mut unique: Vec<u32> = ids.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(got.unique_ids, unique, "n={n} range={range}");
        assert_eq!(got.seg_start.len(), unique.len() + 1);
        for (u, &id) in unique.iter().enumerate() {
            let seg = &got.sorted_entries[got.seg_start[u] as usize..got.seg_start[u + 1] as usize];
            assert!(!seg.is_empty() && seg.iter().all(|&e| ids[e as usize] == id));
            assert!(seg.windows(2).all(|w| w[0] < w[1]));
        }
    }
    let empty = ri.run(&ctx, &[], 10).unwrap();
    assert!(empty.sorted_entries.is_empty() && empty.unique_ids.is_empty());
    assert!(ri.run(&ctx, &[3, 10], 10).is_err());
}

// ---------------------------------------------------------------- forward data

struct Case {
    n_keys: usize,
    heads: usize,
    knn: usize,
    tokens: usize,
    k_dim: usize,
    qk_norm: bool,
    /// value-table width for the bag test
    dim: usize,
    seed: u64,
}

struct Fwd {
    cfg: PkmConfig,
    keys: Vec<f32>,
    query: Vec<f32>,
    lk: pkm::Lookup,
}

fn forward(c: &Case) -> Fwd {
    let cfg = PkmConfig {
        dim: c.dim,
        v_dim: c.dim,
        heads: c.heads,
        n_keys: c.n_keys,
        k_dim: c.k_dim,
        knn: c.knn,
        qk_norm: c.qk_norm,
        gated: false,
    };
    let mut rng = Rng::new(c.seed);
    let kb = 1.0 / (c.k_dim as f32).sqrt();
    let keys = rng.uniform_vec(c.heads * 2 * c.n_keys * cfg.half(), -kb, kb);
    let query = rng.normal_vec(c.tokens * cfg.query_dim(), 0.0, 1.0);
    let lk = pkm::lookup(&cfg, &keys, &query, c.tokens).unwrap();
    Fwd {
        cfg,
        keys,
        query,
        lk,
    }
}

/// Bag backward of the forward's bags (bag = token, entries = heads × knn)
/// against the oracle, twice (determinism).
fn check_bag(ctx: &GpuContext, bb: &BagBackward, f: &Fwd, dtype: GpuDtype, seed: u64) {
    let (rows, dim) = (f.cfg.n_rows(), f.cfg.v_dim);
    let tokens = f.lk.indices.len() / f.cfg.bag_size();
    let mut rng = Rng::new(seed);
    let table = rng.normal_vec(rows * dim, 0.0, 1.0);
    let grad_out = rng.normal_vec(tokens * dim, 0.0, 1.0);
    let offsets = bag::uniform_offsets(tokens, f.cfg.bag_size());
    let dev = ShardedTable::upload(ctx, "values", &table, rows, dim, dtype).unwrap();
    let stored = match dtype {
        GpuDtype::F32 => table,
        // the oracle runs on the values the device stores
        GpuDtype::F16 => decode_rows(&encode_rows(&table, dim, dtype), dim, dtype),
    };
    let want_t =
        bag::bag_backward_table(rows, dim, &f.lk.indices, &f.lk.weights, &offsets, &grad_out)
            .unwrap();
    let want_w =
        bag::bag_backward_weights(&stored, rows, dim, &f.lk.indices, &offsets, &grad_out).unwrap();
    let (got_t, got_w) = bb
        .run(ctx, &dev, &f.lk.indices, &f.lk.weights, &offsets, &grad_out)
        .unwrap();
    let exact = expect_bit_exact(ctx);
    assert_sparse("bag dtable", &got_t, &want_t, exact);
    assert_close("bag dweights", &got_w, &want_w, exact, 1e-5);
    let (again_t, again_w) = bb
        .run(ctx, &dev, &f.lk.indices, &f.lk.weights, &offsets, &grad_out)
        .unwrap();
    assert_eq!(again_t.rows, got_t.rows);
    same_bits("bag dtable", &again_t.grads, &got_t.grads);
    same_bits("bag dweights", &again_w, &got_w);
}

/// Lookup backward against `softmax_backward_rows` + `scores_backward`, twice.
fn check_lookup(ctx: &GpuContext, lb: &LookupBackward, f: &Fwd, d_weights: &[f32]) {
    let tokens = f.lk.indices.len() / f.cfg.bag_size();
    let d_scores = pkm::softmax_backward_rows(f.cfg.knn, &f.lk.weights, d_weights);
    let (want_k, want_q) =
        pkm::scores_backward(&f.cfg, &f.keys, &f.query, tokens, &f.lk.indices, &d_scores).unwrap();
    let run = || {
        lb.run(
            ctx,
            &f.cfg,
            &f.keys,
            &f.query,
            tokens,
            &f.lk.indices,
            &f.lk.weights,
            d_weights,
        )
        .unwrap()
    };
    let (got_k, got_q) = run();
    let exact = expect_bit_exact(ctx);
    assert_close("d_keys", &got_k, &want_k, exact, 1e-5);
    assert_close("d_query", &got_q, &want_q, exact, 1e-5);
    let (again_k, again_q) = run();
    same_bits("d_keys", &again_k, &got_k);
    same_bits("d_query", &again_q, &got_q);
}

fn run_case(ctx: &GpuContext, bb: &BagBackward, lb: &LookupBackward, c: &Case, f16: bool) {
    eprintln!(
        "case n_keys {} heads {} knn {} tokens {} k_dim {} qk_norm {} dim {}",
        c.n_keys, c.heads, c.knn, c.tokens, c.k_dim, c.qk_norm, c.dim
    );
    let f = forward(c);
    check_bag(ctx, bb, &f, GpuDtype::F32, c.seed + 1);
    if f16 {
        check_bag(ctx, bb, &f, GpuDtype::F16, c.seed + 2);
    }
    let d_weights = Rng::new(c.seed + 3).normal_vec(f.lk.weights.len(), 0.0, 1.0);
    check_lookup(ctx, lb, &f, &d_weights);
}

// ---------------------------------------------------------------- parity matrix

/// Small and medium shapes: every n_keys, knn, heads and token count, qk-norm
/// on and off, f16 tables, odd widths.
#[test]
fn backward_matches_oracle_small_shapes() {
    let Some(ctx) = gpu(None) else { return };
    let bb = BagBackward::new(&ctx).unwrap();
    let lb = LookupBackward::new(&ctx).unwrap();
    #[rustfmt::skip]
    let cases = [
        // n_keys heads knn tokens k_dim qk_norm dim
        Case { n_keys: 16, heads: 1, knn: 1, tokens: 1, k_dim: 8, qk_norm: false, dim: 8, seed: 1 },
        Case { n_keys: 16, heads: 4, knn: 8, tokens: 7, k_dim: 8, qk_norm: true, dim: 37, seed: 2 },
        Case { n_keys: 16, heads: 1, knn: 16, tokens: 7, k_dim: 2, qk_norm: true, dim: 5, seed: 3 },
        Case { n_keys: 100, heads: 1, knn: 8, tokens: 7, k_dim: 16, qk_norm: false, dim: 70, seed: 4 },
        Case { n_keys: 100, heads: 4, knn: 32, tokens: 7, k_dim: 16, qk_norm: true, dim: 24, seed: 5 },
        Case { n_keys: 1024, heads: 1, knn: 1, tokens: 7, k_dim: 32, qk_norm: true, dim: 16, seed: 6 },
        Case { n_keys: 4096, heads: 4, knn: 8, tokens: 1, k_dim: 16, qk_norm: false, dim: 2, seed: 7 },
        Case { n_keys: 100, heads: 4, knn: 8, tokens: 7, k_dim: 512, qk_norm: true, dim: 9, seed: 8 },
    ];
    for c in &cases {
        run_case(&ctx, &bb, &lb, c, true);
    }
}

/// The big shapes: 1024 tokens × 4 heads × knn 32 (131072 bag entries, 262144
/// sub-key entries) over n_keys 100, 1024 and 4096 (2^24 rows).
#[test]
fn backward_matches_oracle_big_shapes() {
    let Some(ctx) = gpu(None) else { return };
    let bb = BagBackward::new(&ctx).unwrap();
    let lb = LookupBackward::new(&ctx).unwrap();
    #[rustfmt::skip]
    let cases = [
        Case { n_keys: 100, heads: 4, knn: 32, tokens: 1024, k_dim: 16, qk_norm: true, dim: 16, seed: 21 },
        Case { n_keys: 1024, heads: 4, knn: 32, tokens: 1024, k_dim: 32, qk_norm: false, dim: 8, seed: 22 },
        Case { n_keys: 4096, heads: 4, knn: 32, tokens: 1024, k_dim: 16, qk_norm: true, dim: 2, seed: 23 },
    ];
    for c in &cases {
        run_case(&ctx, &bb, &lb, c, false);
    }
}
