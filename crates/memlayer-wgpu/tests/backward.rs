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
        GpuDtype::Bf16 => unreachable!("bf16 tables are paged slots, never trained"),
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
/// on and off, f16 tables, odd widths, knn = n_keys > 64.
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
        // knn > 64: the query kernel takes the selected rows in several chunks
        Case { n_keys: 100, heads: 2, knn: 100, tokens: 3, k_dim: 6, qk_norm: true, dim: 3, seed: 9 },
    ];
    for c in &cases {
        run_case(&ctx, &bb, &lb, c, true);
    }
}

/// The big shapes: 1024 tokens × 4 heads × knn 32 (131072 bag entries, 262144
/// sub-key entries) over n_keys 100, 1024 and 4096 (2^24 rows), and the
/// paper's shape (n_keys 1024, k_dim 512, qk-norm) with an f16 table.
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
    // paper scale: k_dim 512 (sub-keys of 256), qk-norm, f16 values of width 64
    #[rustfmt::skip]
    let paper = Case { n_keys: 1024, heads: 4, knn: 32, tokens: 1024, k_dim: 512, qk_norm: true, dim: 64, seed: 24 };
    run_case(&ctx, &bb, &lb, &paper, true);
}

// ---------------------------------------------------------------- adversarial cases

/// Bag backward of explicit bags against the oracle (and a second run).
#[allow(clippy::too_many_arguments)]
fn check_bags(
    ctx: &GpuContext,
    bb: &BagBackward,
    rows: usize,
    dim: usize,
    dtype: GpuDtype,
    indices: &[u32],
    offsets: &[usize],
    seed: u64,
) {
    let mut rng = Rng::new(seed);
    let bags = offsets.len() - 1;
    let table = rng.normal_vec(rows * dim, 0.0, 1.0);
    let weights = rng.normal_vec(indices.len(), 0.0, 1.0);
    let grad_out = rng.normal_vec(bags * dim, 0.0, 1.0);
    let dev = ShardedTable::upload(ctx, "values", &table, rows, dim, dtype).unwrap();
    let stored = decode_rows(&encode_rows(&table, dim, dtype), dim, dtype);
    let want_t = bag::bag_backward_table(rows, dim, indices, &weights, offsets, &grad_out).unwrap();
    let want_w =
        bag::bag_backward_weights(&stored, rows, dim, indices, offsets, &grad_out).unwrap();
    let (got_t, got_w) = bb
        .run(ctx, &dev, indices, &weights, offsets, &grad_out)
        .unwrap();
    let exact = expect_bit_exact(ctx);
    assert_sparse("bag dtable", &got_t, &want_t, exact);
    assert_close("bag dweights", &got_w, &want_w, exact, 1e-5);
    let (again_t, again_w) = bb
        .run(ctx, &dev, indices, &weights, offsets, &grad_out)
        .unwrap();
    assert_eq!(again_t.rows, got_t.rows);
    same_bits("bag dtable", &again_t.grads, &got_t.grads);
    same_bits("bag dweights", &again_w, &got_w);
}

/// Every entry selects the same row (one segment of 32768 entries); the
/// lookup equivalent: every token selects the same row, so one sub-key per
/// (head, side) gathers every token's gradient.
#[test]
fn hot_row() {
    let Some(ctx) = gpu(None) else { return };
    let bb = BagBackward::new(&ctx).unwrap();
    let lb = LookupBackward::new(&ctx).unwrap();
    let (bags, per_bag) = (1024, 32);
    let indices = vec![77u32; bags * per_bag];
    let offsets = bag::uniform_offsets(bags, per_bag);
    check_bags(&ctx, &bb, 100, 64, GpuDtype::F32, &indices, &offsets, 31);
    check_bags(&ctx, &bb, 100, 33, GpuDtype::F16, &indices, &offsets, 32);

    for qk_norm in [false, true] {
        let c = Case {
            n_keys: 64,
            heads: 4,
            knn: 8,
            tokens: 512,
            k_dim: 32,
            qk_norm,
            dim: 4,
            seed: 33,
        };
        let mut f = forward(&c);
        // rows 5 * 64 + 9 for every selection: sub-keys 5 (first half) and 9
        f.lk.indices.fill(5 * 64 + 9);
        let d_weights = Rng::new(34).normal_vec(f.lk.weights.len(), 0.0, 1.0);
        check_lookup(&ctx, &lb, &f, &d_weights);
    }
}

/// Empty bags (leading, inner, trailing), repeated rows within and across
/// bags, a single bag, and no entries at all.
#[test]
fn empty_bags_and_repeated_rows() {
    let Some(ctx) = gpu(None) else { return };
    let bb = BagBackward::new(&ctx).unwrap();
    let indices = [3u32, 3, 0, 6, 3, 1, 6, 6, 6, 2];
    let offsets = [0usize, 0, 3, 3, 3, 6, 10, 10];
    check_bags(&ctx, &bb, 7, 5, GpuDtype::F32, &indices, &offsets, 41);
    check_bags(&ctx, &bb, 7, 5, GpuDtype::F16, &indices, &offsets, 42);
    check_bags(&ctx, &bb, 7, 130, GpuDtype::F32, &indices, &[0, 10], 43);
    // random repeats over few rows, many bags of random sizes (some empty)
    let mut rng = Rng::new(44);
    let mut offsets = vec![0usize];
    let mut indices = Vec::new();
    for _ in 0..500 {
        for _ in 0..rng.below(9) {
            indices.push(rng.below(13) as u32);
        }
        offsets.push(indices.len());
    }
    check_bags(&ctx, &bb, 13, 19, GpuDtype::F32, &indices, &offsets, 45);

    // no entries: empty gradient, no dweights
    let table = ShardedTable::upload(&ctx, "t", &[0.0; 8], 2, 4, GpuDtype::F32).unwrap();
    let (t, w) = bb
        .run(&ctx, &table, &[], &[], &[0, 0, 0], &[0.0; 8])
        .unwrap();
    assert_eq!(t, SparseRows::empty(4));
    assert!(w.is_empty());
    let (t, _) = bb.run(&ctx, &table, &[], &[], &[0], &[]).unwrap();
    assert!(t.rows.is_empty());
}

/// A forced 4 KiB binding limit: value tables span many shards (f32 and
/// f16), and so does the gradient output.
#[test]
fn sharded_tables_under_a_small_binding_limit() {
    let Some(ctx) = gpu(Some(4096)) else { return };
    assert_eq!(ctx.max_binding_bytes(), 4096);
    let bb = BagBackward::new(&ctx).unwrap();
    let lb = LookupBackward::new(&ctx).unwrap();
    let (rows, dim) = (300, 24);
    let t32 = ShardedTable::zeroed(&ctx, "t", rows, dim, GpuDtype::F32, 1).unwrap();
    let t16 = ShardedTable::zeroed(&ctx, "t", rows, 37, GpuDtype::F16, 1).unwrap();
    assert!(t32.shards.len() >= 8 && t16.shards.len() >= 3);
    let mut rng = Rng::new(51);
    let bags = 27; // grad_out of 27 × 37 f32 fits 4 KiB
    let mut offsets = vec![0usize];
    let mut indices = Vec::new();
    for b in 0..bags {
        for _ in 0..(b % 7) * 3 {
            indices.push(rng.below(rows as u64) as u32);
        }
        offsets.push(indices.len());
    }
    assert!(indices.len() < 1024);
    check_bags(&ctx, &bb, rows, dim, GpuDtype::F32, &indices, &offsets, 52);
    check_bags(&ctx, &bb, rows, 37, GpuDtype::F16, &indices, &offsets, 53);
    // the gradient rows alone need several 4 KiB shards
    let distinct = {
        let mut v = indices.clone();
        v.sort_unstable();
        v.dedup();
        v.len()
    };
    assert!(distinct * dim * 4 > 3 * 4096);

    // the lookup backward within the same limits
    let c = Case {
        n_keys: 16,
        heads: 2,
        knn: 4,
        tokens: 7,
        k_dim: 8,
        qk_norm: true,
        dim: 4,
        seed: 54,
    };
    let f = forward(&c);
    let d_weights = Rng::new(55).normal_vec(f.lk.weights.len(), 0.0, 1.0);
    check_lookup(&ctx, &lb, &f, &d_weights);
    // arrays that cannot fit a binding are refused with a clear error
    let big = vec![0u32; 2000];
    let err = bb
        .run(
            &ctx,
            &t32,
            &big,
            &vec![0.0; 2000],
            &[0, 2000],
            &vec![0.0; dim],
        )
        .unwrap_err();
    assert!(err.to_string().contains("storage binding"), "{err}");
}

/// Zero softmax weights give exactly-zero score gradients: the kernels skip
/// them as the oracle does (sign of zero included); tokens = 0.
#[test]
fn lookup_zero_gradients_and_no_tokens() {
    let Some(ctx) = gpu(None) else { return };
    let lb = LookupBackward::new(&ctx).unwrap();
    for qk_norm in [false, true] {
        let c = Case {
            n_keys: 32,
            heads: 2,
            knn: 8,
            tokens: 9,
            k_dim: 12,
            qk_norm,
            dim: 4,
            seed: 61,
        };
        let mut f = forward(&c);
        for (i, w) in f.lk.weights.iter_mut().enumerate() {
            if i % 3 == 0 {
                *w = 0.0;
            }
        }
        let mut d_weights = Rng::new(62).normal_vec(f.lk.weights.len(), 0.0, 1.0);
        // one (token, head) row with all-zero upstream gradient
        d_weights[..8].fill(0.0);
        check_lookup(&ctx, &lb, &f, &d_weights);
    }
    let cfg = forward(&Case {
        n_keys: 8,
        heads: 2,
        knn: 2,
        tokens: 1,
        k_dim: 4,
        qk_norm: true,
        dim: 4,
        seed: 63,
    });
    let (dk, dq) = lb
        .run(&ctx, &cfg.cfg, &cfg.keys, &[], 0, &[], &[], &[])
        .unwrap();
    assert_eq!(dk, vec![0.0; cfg.keys.len()]);
    assert!(dq.is_empty());
}

/// Bad inputs are refused host-side with clear errors.
#[test]
fn invalid_inputs_are_refused() {
    let Some(ctx) = gpu(None) else { return };
    let bb = BagBackward::new(&ctx).unwrap();
    let lb = LookupBackward::new(&ctx).unwrap();
    let t = ShardedTable::upload(&ctx, "t", &[0.0; 8], 4, 2, GpuDtype::F32).unwrap();
    let g = [0.0f32; 4];
    let msg =
        |r: Result<(SparseRows, Vec<f32>), memlayer_wgpu::GpuError>| r.unwrap_err().to_string();
    assert!(msg(bb.run(&ctx, &t, &[4], &[1.0], &[0, 1], &g[..2])).contains("out of range"));
    assert!(msg(bb.run(&ctx, &t, &[0, 1], &[1.0], &[0, 2], &g[..2])).contains("per_sample"));
    assert!(msg(bb.run(&ctx, &t, &[0, 1], &[1.0; 2], &[1, 2], &g[..2])).contains("offsets"));
    assert!(
        msg(bb.run(&ctx, &t, &[0, 1], &[1.0; 2], &[0, 2, 1, 2], &[0.0; 6]))
            .contains("non-decreasing")
    );
    assert!(msg(bb.run(&ctx, &t, &[0, 1], &[1.0; 2], &[], &g)).contains("offsets"));
    assert!(msg(bb.run(&ctx, &t, &[0, 1], &[1.0; 2], &[0, 2], &g)).contains("grad_out"));

    let f = forward(&Case {
        n_keys: 8,
        heads: 1,
        knn: 2,
        tokens: 2,
        k_dim: 4,
        qk_norm: false,
        dim: 4,
        seed: 71,
    });
    let (cfg, keys, q, lk) = (&f.cfg, &f.keys, &f.query, &f.lk);
    let err = |r: Result<(Vec<f32>, Vec<f32>), memlayer_wgpu::GpuError>| r.unwrap_err().to_string();
    let mut bad = lk.indices.clone();
    bad[1] = 64;
    assert!(
        err(lb.run(&ctx, cfg, keys, q, 2, &bad, &lk.weights, &lk.weights)).contains("out of range")
    );
    assert!(
        err(lb.run(
            &ctx,
            cfg,
            &keys[1..],
            q,
            2,
            &lk.indices,
            &lk.weights,
            &lk.weights
        ))
        .contains("keys")
    );
    assert!(
        err(lb.run(&ctx, cfg, keys, q, 3, &lk.indices, &lk.weights, &lk.weights)).contains("query")
    );
    assert!(
        err(lb.run(
            &ctx,
            cfg,
            keys,
            q,
            2,
            &lk.indices,
            &lk.weights,
            &lk.weights[1..]
        ))
        .contains("d_weights")
    );
    let mut wide = cfg.clone();
    wide.k_dim = 2050;
    assert!(
        err(lb.run(
            &ctx,
            &wide,
            keys,
            q,
            2,
            &lk.indices,
            &lk.weights,
            &lk.weights
        ))
        .contains("k_dim")
    );
    let mut bad_cfg = cfg.clone();
    bad_cfg.knn = 0;
    assert!(
        lb.run(
            &ctx,
            &bad_cfg,
            keys,
            q,
            2,
            &lk.indices,
            &lk.weights,
            &lk.weights
        )
        .is_err()
    );
}

/// Does the driver contract `acc + a * b` into an fma? The bit-exact parity
/// above rests on it not doing so (the oracle rounds the product first).
/// Reports counts; on llvmpipe asserts no contraction.
#[test]
fn fma_contraction_probe() {
    let Some(ctx) = gpu(None) else { return };
    const PROBE: &str = "
@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> c: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x;
    if i < arrayLength(&c) {
        var acc = c[i];
        acc += a[i] * b[i];
        c[i] = acc;
    }
}";
    let n = 4096;
    let mut rng = Rng::new(81);
    let a = rng.normal_vec(n, 0.0, 1.0);
    let b = rng.normal_vec(n, 0.0, 1.0);
    let c = rng.normal_vec(n, 0.0, 1.0);
    let k = memlayer_wgpu::buffers::Kernel::new(&ctx, "fma probe", PROBE, "main", &[]).unwrap();
    let (da, db) = (
        memlayer_wgpu::buffers::storage_init(&ctx, "a", &a),
        memlayer_wgpu::buffers::storage_init(&ctx, "b", &b),
    );
    let dc = memlayer_wgpu::buffers::storage_init(&ctx, "c", &c);
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    k.dispatch(
        &ctx,
        &mut enc,
        &[
            da.as_entire_binding(),
            db.as_entire_binding(),
            dc.as_entire_binding(),
        ],
        ((n / 64) as u32, 1, 1),
    );
    ctx.queue.submit([enc.finish()]);
    let got = memlayer_wgpu::buffers::read_back::<f32>(&ctx, &dc, 0, n).unwrap();
    let (mut separate, mut fused, mut distinguishing) = (0, 0, 0);
    for i in 0..n {
        let s = c[i] + a[i] * b[i];
        let f = a[i].mul_add(b[i], c[i]);
        if s.to_bits() != f.to_bits() {
            distinguishing += 1;
            separate += (got[i].to_bits() == s.to_bits()) as usize;
            fused += (got[i].to_bits() == f.to_bits()) as usize;
        }
    }
    eprintln!(
        "fma probe on {} ({}): of {distinguishing} inputs where a fused and a separately \
         rounded multiply-add differ, the GPU matched separate rounding {separate} times, \
         fused {fused} times",
        ctx.info.name, ctx.info.driver
    );
    assert!(distinguishing > 100);
    if expect_bit_exact(&ctx) {
        assert_eq!(separate, distinguishing, "llvmpipe contracted a * b + c");
    }
}

/// The device-level API chained without host round trips: the bag
/// backward's dweights feed the lookup backward as d_weights, as in a
/// training step; compared with the oracle's chain.
#[test]
fn device_level_chain_matches_oracle() {
    use memlayer_wgpu::backward::LookupBackwardInputs;
    use memlayer_wgpu::buffers::{read_back, storage_init, storage_zeroed};
    let Some(ctx) = gpu(None) else { return };
    let bb = BagBackward::new(&ctx).unwrap();
    let lb = LookupBackward::new(&ctx).unwrap();
    let c = Case {
        n_keys: 100,
        heads: 4,
        knn: 16,
        tokens: 33,
        k_dim: 16,
        qk_norm: true,
        dim: 20,
        seed: 91,
    };
    let f = forward(&c);
    let (rows, dim, n) = (f.cfg.n_rows(), c.dim, f.lk.indices.len());
    let mut rng = Rng::new(92);
    let values = rng.normal_vec(rows * dim, 0.0, 1.0);
    let dm = rng.normal_vec(c.tokens * dim, 0.0, 1.0);
    let offsets = bag::uniform_offsets(c.tokens, f.cfg.bag_size());
    // oracle chain
    let dw = bag::bag_backward_weights(&values, rows, dim, &f.lk.indices, &offsets, &dm).unwrap();
    let ds = pkm::softmax_backward_rows(c.knn, &f.lk.weights, &dw);
    let (want_k, want_q) =
        pkm::scores_backward(&f.cfg, &f.keys, &f.query, c.tokens, &f.lk.indices, &ds).unwrap();
    let want_t =
        bag::bag_backward_table(rows, dim, &f.lk.indices, &f.lk.weights, &offsets, &dm).unwrap();
    // device chain, one submission
    let table = ShardedTable::upload(&ctx, "values", &values, rows, dim, GpuDtype::F32).unwrap();
    let offsets32: Vec<u32> = offsets.iter().map(|&o| o as u32).collect();
    let (d_idx, d_w, d_off, d_dm) = (
        storage_init(&ctx, "indices", &f.lk.indices),
        storage_init(&ctx, "weights", &f.lk.weights),
        storage_init(&ctx, "offsets", &offsets32),
        storage_init(&ctx, "dm", &dm),
    );
    let (d_keys, d_query) = (
        storage_init(&ctx, "keys", &f.keys),
        storage_init(&ctx, "query", &f.query),
    );
    let d_dw = storage_zeroed(&ctx, "dw", (n * 4) as u64);
    // capacity: every entry could touch a distinct row
    let grads = ShardedTable::zeroed(&ctx, "dvalues", n, dim, GpuDtype::F32, 1).unwrap();
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    let idx = bb
        .record_index(&ctx, &mut enc, &d_idx, &d_off, n, c.tokens, rows)
        .unwrap();
    bb.record_weight_grad(&ctx, &mut enc, &idx, &table, &d_dm, &d_dw)
        .unwrap();
    bb.record_table_grad(&ctx, &mut enc, &idx, &d_w, &d_dm, &grads)
        .unwrap();
    let out = lb
        .record(
            &ctx,
            &mut enc,
            &f.cfg,
            c.tokens,
            &LookupBackwardInputs {
                keys: &d_keys,
                query: &d_query,
                indices: &d_idx,
                weights: &d_w,
                d_weights: &d_dw,
            },
        )
        .unwrap();
    ctx.queue.submit([enc.finish()]);
    let exact = expect_bit_exact(&ctx);
    let count = read_back::<u32>(&ctx, &idx.index.count, 0, 1).unwrap()[0] as usize;
    let got_t = SparseRows {
        dim,
        rows: read_back(&ctx, &idx.index.unique_ids, 0, count).unwrap(),
        grads: grads.download(&ctx).unwrap()[..count * dim].to_vec(),
    };
    assert_sparse("chained dvalues", &got_t, &want_t, exact);
    let got_ds = read_back::<f32>(&ctx, &out.d_scores, 0, n).unwrap();
    assert_close("chained d_scores", &got_ds, &ds, exact, 1e-5);
    let got_k = read_back::<f32>(&ctx, &out.d_keys, 0, want_k.len()).unwrap();
    let got_q = read_back::<f32>(&ctx, &out.d_query, 0, want_q.len()).unwrap();
    assert_close("chained d_keys", &got_k, &want_k, exact, 1e-5);
    assert_close("chained d_query", &got_q, &want_q, exact, 1e-5);
}
