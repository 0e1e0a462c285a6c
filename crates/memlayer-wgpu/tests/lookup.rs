//! Product-key lookup kernels against the CPU oracle (`memlayer_core::pkm::lookup`).
//!
//! Contract checked here: identical indices (same rows, same order) and
//! bit-identical scores; softmax weights within 2e-6 (the device's `exp`).
//!
//! * Exactly representable inputs (multiples of 1/8, and tie-heavy values in
//!   {-1, 0, 1}, small k_dim): every product and sum is exact, so any correct
//!   device must match bit for bit — asserted everywhere.
//! * Random normal inputs without qk-norm: the kernels sum each dot product in
//!   the oracle's order and round every product before adding it (see
//!   `shaders/pk_scores_topk.wgsl`), and Vulkan/WebGPU require correctly
//!   rounded f32 add/mul, so this is bit-exact too — asserted everywhere.
//! * qk-norm divides and takes a square root, which WebGPU only requires to a
//!   few ulp. On lavapipe (llvmpipe; both correctly rounded, no FMA
//!   contraction) everything is asserted bit-identical. On other adapters,
//!   positions whose oracle margin to a neighbour (the next candidate included)
//!   is below 1e-5 relative may differ; they are counted and must stay below
//!   1% of positions, scores within 1e-5.

mod common;

use memlayer_core::pkm::{self, Lookup, PkmConfig};
use memlayer_core::rng::Rng;
use memlayer_wgpu::lookup::{LookupKernels, LookupPlan, MAX_K};
use memlayer_wgpu::{GpuContext, GpuError, GpuOptions, gpu_for_tests};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Inputs {
    /// multiples of 1/8 in [-1, 1]
    Dyadic,
    /// values in {-1, 0, 1}: massive ties
    Ties,
    /// N(0, 1)
    Normal,
}

#[derive(Clone, Copy, Debug)]
struct Case {
    n_keys: usize,
    k: usize,
    heads: usize,
    tokens: usize,
    k_dim: usize,
    qk_norm: bool,
    inputs: Inputs,
    /// forced tokens per scoring pass; None = the default plan
    batch: Option<usize>,
}

/// The (n_keys, k, heads, tokens) grid the bit-identity tests sweep, in
/// the order their seeds follow.
fn sweep() -> impl Iterator<Item = (usize, usize, usize, usize)> {
    N_KEYS.into_iter().flat_map(|n_keys| {
        let ks = KS.into_iter().filter(move |&k| k <= n_keys);
        ks.flat_map(move |k| {
            [1, 4].into_iter().flat_map(move |heads| {
                [1, 7]
                    .into_iter()
                    .map(move |tokens| (n_keys, k, heads, tokens))
            })
        })
    })
}

impl Case {
    /// A case with the default plan; `grid` is `(n_keys, k, heads, tokens)`
    /// as [`sweep`] yields it.
    fn new(
        (n_keys, k, heads, tokens): (usize, usize, usize, usize),
        k_dim: usize,
        qk_norm: bool,
        inputs: Inputs,
    ) -> Self {
        Self {
            n_keys,
            k,
            heads,
            tokens,
            k_dim,
            qk_norm,
            inputs,
            batch: None,
        }
    }
}

/// The layer a case runs (`dim = v_dim = 8`, no gate: all a lookup reads).
fn cfg_of(c: &Case) -> PkmConfig {
    PkmConfig {
        dim: 8,
        v_dim: 8,
        heads: c.heads,
        n_keys: c.n_keys,
        k_dim: c.k_dim,
        knn: c.k,
        qk_norm: c.qk_norm,
        gated: false,
    }
}

fn make_inputs(rng: &mut Rng, n: usize, inputs: Inputs) -> Vec<f32> {
    match inputs {
        Inputs::Dyadic => (0..n).map(|_| (rng.below(17) as f32 - 8.0) / 8.0).collect(),
        Inputs::Ties => (0..n).map(|_| rng.below(3) as f32 - 1.0).collect(),
        Inputs::Normal => rng.normal_vec(n, 0.0, 1.0),
    }
}

fn is_lavapipe(ctx: &GpuContext) -> bool {
    ctx.info.name.to_lowercase().contains("llvmpipe")
}

fn same_score(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

/// Runs one case on the GPU and the oracle and compares; returns the number
/// of near-tie positions that were excluded (always 0 when strict).
fn check(kernels: &LookupKernels, ctx: &GpuContext, c: &Case, seed: u64) -> usize {
    let cfg = cfg_of(c);
    let mut rng = Rng::new(seed);
    let keys = make_inputs(&mut rng, c.heads * 2 * c.n_keys * c.k_dim / 2, c.inputs);
    let query = make_inputs(&mut rng, c.tokens * c.heads * c.k_dim, c.inputs);
    let want = pkm::lookup(&cfg, &keys, &query, c.tokens).unwrap();
    let got = match c.batch {
        None => kernels.run(ctx, &cfg, &keys, &query, c.tokens),
        Some(b) => {
            let plan = LookupPlan::with_batch(ctx, &cfg, c.tokens, b).unwrap();
            kernels.run_plan(ctx, &plan, &keys, &query)
        }
    }
    .unwrap_or_else(|e| panic!("{c:?}: {e}"));
    let strict = !c.qk_norm || is_lavapipe(ctx);
    compare(&cfg, c, &keys, &query, &want, &got, strict)
}

fn compare(
    cfg: &PkmConfig,
    c: &Case,
    keys: &[f32],
    query: &[f32],
    want: &Lookup,
    got: &Lookup,
    strict: bool,
) -> usize {
    let n = c.tokens * c.heads * c.k;
    assert_eq!(got.indices.len(), n, "{c:?}");
    assert_eq!(got.scores.len(), n, "{c:?}");
    assert_eq!(got.weights.len(), n, "{c:?}");
    let mut max_w_err = 0.0f32;
    for (a, b) in want.weights.iter().zip(&got.weights) {
        if a.is_finite() {
            max_w_err = max_w_err.max((a - b).abs());
        }
    }
    if strict {
        if let Some(p) = (0..n).find(|&p| want.indices[p] != got.indices[p]) {
            panic!(
                "{c:?}: index mismatch at (token, head, j) = ({}, {}, {}): oracle row {} score {}, \
                 gpu row {} score {}",
                p / (c.heads * c.k),
                p / c.k % c.heads,
                p % c.k,
                want.indices[p],
                want.scores[p],
                got.indices[p],
                got.scores[p]
            );
        }
        if let Some(p) = (0..n).find(|&p| !same_score(want.scores[p], got.scores[p])) {
            panic!(
                "{c:?}: score at {p} not bit-identical: oracle {:e} ({:#x}), gpu {:e} ({:#x})",
                want.scores[p],
                want.scores[p].to_bits(),
                got.scores[p],
                got.scores[p].to_bits()
            );
        }
        assert!(max_w_err <= 2e-6, "{c:?}: weight error {max_w_err}");
        return 0;
    }
    // Non-strict (qk-norm on a device whose sqrt/division may be a few ulp
    // off): margins come from the oracle's top-(k+1).
    let next = (c.k < c.n_keys).then(|| {
        let mut cfg1 = cfg.clone();
        cfg1.knn = c.k + 1;
        pkm::lookup(&cfg1, keys, query, c.tokens).unwrap()
    });
    let mut excluded = 0;
    for r in 0..c.tokens * c.heads {
        let s = |j: usize| -> Option<f32> {
            if j < c.k {
                Some(want.scores[r * c.k + j])
            } else {
                next.as_ref().map(|n| n.scores[r * (c.k + 1) + j])
            }
        };
        for j in 0..c.k {
            let p = r * c.k + j;
            let tol = 1e-5 * want.scores[p].abs().max(1.0);
            assert!(
                (want.scores[p] - got.scores[p]).abs() <= tol,
                "{c:?}: score at {p}: oracle {} gpu {}",
                want.scores[p],
                got.scores[p]
            );
            if want.indices[p] == got.indices[p] {
                continue;
            }
            let margin = [j.checked_sub(1).and_then(s), s(j + 1)]
                .into_iter()
                .flatten()
                .map(|o| (o - want.scores[p]).abs())
                .fold(f32::INFINITY, f32::min);
            assert!(
                margin < tol,
                "{c:?}: index mismatch at {p} with oracle margin {margin} (not a near-tie)"
            );
            excluded += 1;
        }
    }
    assert!(
        excluded * 100 <= n.max(100),
        "{c:?}: {excluded} near-tie exclusions of {n} positions"
    );
    assert!(max_w_err <= 1e-5, "{c:?}: weight error {max_w_err}");
    excluded
}

fn setup() -> Option<(GpuContext, LookupKernels)> {
    let ctx = gpu_for_tests(GpuOptions::default())?;
    let kernels = LookupKernels::new(&ctx).unwrap();
    Some((ctx, kernels))
}

const N_KEYS: [usize; 4] = [16, 100, 1024, 4096];
const KS: [usize; 3] = [1, 8, 32];

#[test]
fn exact_inputs_bit_identical_over_the_grid() {
    let Some((ctx, kernels)) = setup() else {
        return;
    };
    let mut seed = 100;
    for (n_keys, k, heads, tokens) in sweep() {
        for inputs in [Inputs::Dyadic, Inputs::Ties] {
            seed += 1;
            let k_dim = if inputs == Inputs::Ties { 4 } else { 16 };
            let c = Case::new((n_keys, k, heads, tokens), k_dim, false, inputs);
            check(&kernels, &ctx, &c, seed);
        }
    }
}

#[test]
fn random_normal_bit_identical_over_the_grid() {
    let Some((ctx, kernels)) = setup() else {
        return;
    };
    let mut seed = 200;
    for (n_keys, k, heads, tokens) in sweep() {
        seed += 1;
        let c = Case::new((n_keys, k, heads, tokens), 32, false, Inputs::Normal);
        check(&kernels, &ctx, &c, seed);
    }
}

#[test]
fn qk_norm_over_the_grid() {
    let Some((ctx, kernels)) = setup() else {
        return;
    };
    let strict = is_lavapipe(&ctx);
    let mut seed = 300;
    let mut excluded = 0;
    for (n_keys, k, heads, tokens) in sweep() {
        for inputs in [Inputs::Normal, Inputs::Ties] {
            seed += 1;
            let k_dim = if inputs == Inputs::Ties { 6 } else { 24 };
            let c = Case::new((n_keys, k, heads, tokens), k_dim, true, inputs);
            excluded += check(&kernels, &ctx, &c, seed);
        }
    }
    eprintln!(
        "qk-norm on {}: {} (near-tie exclusions: {excluded})",
        ctx.name(),
        if strict {
            "bit-identical asserted"
        } else {
            "near-ties allowed"
        }
    );
}

#[test]
fn a_thousand_tokens_at_full_size() {
    let Some((ctx, kernels)) = setup() else {
        return;
    };
    let big = |n_keys, k, heads, k_dim, qk_norm, inputs| {
        Case::new((n_keys, k, heads, 1024), k_dim, qk_norm, inputs)
    };
    for (i, c) in [
        big(4096, 32, 4, 32, false, Inputs::Normal),
        big(4096, 32, 4, 16, false, Inputs::Dyadic),
        big(1024, 8, 4, 64, true, Inputs::Normal),
        big(100, 32, 1, 8, false, Inputs::Ties),
        big(16, 1, 4, 16, true, Inputs::Normal),
    ]
    .iter()
    .enumerate()
    {
        check(&kernels, &ctx, c, 400 + i as u64);
    }
}

#[test]
fn tokens_scored_in_several_batches_match_the_oracle() {
    let Some((ctx, kernels)) = setup() else {
        return;
    };
    let cfg = |n_keys, k| cfg_of(&Case::new((n_keys, k, 2, 1), 16, false, Inputs::Normal));
    // the default plan scores everything at once when the scratch is small,
    // and batches when (tokens, heads, 2, n_keys) scores exceed the budget
    let plan = LookupPlan::new(&ctx, &cfg(4096, 8), 1024).unwrap();
    assert_eq!(plan.batch_tokens, 1024);
    let plan = LookupPlan::new(&ctx, &cfg(4096, 8), 5000).unwrap();
    assert!(plan.batch_tokens < 5000, "{plan:?}");
    let mut seed = 500;
    for (n_keys, k, tokens, batch, inputs, qk_norm) in [
        (1030, 32, 7, 3, Inputs::Normal, false),
        (1030, 32, 7, 1, Inputs::Ties, false),
        (4096, 32, 100, 33, Inputs::Normal, true),
        (100, 8, 65, 32, Inputs::Dyadic, false),
    ] {
        seed += 1;
        let c = Case {
            batch: Some(batch),
            ..Case::new(
                (n_keys, k, 2, tokens),
                if inputs == Inputs::Ties { 4 } else { 16 },
                qk_norm,
                inputs,
            )
        };
        check(&kernels, &ctx, &c, seed);
    }
}

/// pk_topk.wgsl first collects every score at or above the k-th best of its
/// 256 invocations' maxima; when the best sub-keys all sit in a few
/// invocations' strides that is more than its 1024-entry buffer and it falls
/// back to the streaming top-k. Both must give the oracle's answer.
#[test]
fn concentrated_best_keys_take_the_streaming_fallback() {
    let Some((ctx, kernels)) = setup() else {
        return;
    };
    let n_keys = 4096;
    let mut rng = Rng::new(800);
    for (k, strong_lanes) in [(MAX_K, 127), (MAX_K, 128), (64, 63), (32, 31), (8, 200)] {
        let cfg = cfg_of(&Case::new((n_keys, k, 1, 1), 2, false, Inputs::Normal));
        // half = 1 and query 1.0: the sub-key score is the key itself
        let keys: Vec<f32> = (0..2 * n_keys)
            .map(|i| {
                let v = rng.normal();
                if (i % n_keys) % 256 < strong_lanes {
                    100.0 + v
                } else {
                    v
                }
            })
            .collect();
        let query = vec![1.0f32; 2 * 3];
        let want = pkm::lookup(&cfg, &keys, &query, 3).unwrap();
        let got = kernels.run(&ctx, &cfg, &keys, &query, 3).unwrap();
        assert_eq!(
            got.indices, want.indices,
            "k {k}, strong lanes {strong_lanes}"
        );
        assert_eq!(
            got.scores, want.scores,
            "k {k}, strong lanes {strong_lanes}"
        );
    }
}

/// More (token, head, half) rows than one grid dimension holds (65535
/// workgroups): the top-k dispatch spills into the grid's y dimension.
#[test]
fn grids_beyond_65535_workgroups() {
    let Some((ctx, kernels)) = setup() else {
        return;
    };
    let c = Case::new((16, 4, 1, 40_000), 4, false, Inputs::Dyadic);
    check(&kernels, &ctx, &c, 900);
}

#[test]
fn large_k_non_power_of_two_and_odd_half() {
    let Some((ctx, kernels)) = setup() else {
        return;
    };
    let mut seed = 600;
    for (n_keys, k, k_dim, inputs) in [
        (100, 100, 2, Inputs::Ties),   // k == n_keys, half = 1
        (300, 64, 10, Inputs::Normal), // half 5 (not a multiple of the 8-wide tile)
        (4096, MAX_K, 18, Inputs::Normal),
        (4096, MAX_K, 4, Inputs::Ties),
        (1, 1, 2, Inputs::Normal),
        (257, 57, 34, Inputs::Dyadic),
    ] {
        for qk_norm in [false, true] {
            seed += 1;
            let c = Case::new((n_keys, k, 3, 5), k_dim, qk_norm, inputs);
            check(&kernels, &ctx, &c, seed);
        }
    }
}

#[test]
fn all_equal_scores_pick_the_lowest_rows() {
    let Some((ctx, kernels)) = setup() else {
        return;
    };
    let cfg = cfg_of(&Case::new((1000, 32, 2, 1), 8, false, Inputs::Normal));
    let keys = vec![0.5f32; 2 * 2 * 1000 * 4];
    let query = vec![0.25f32; 3 * 2 * 8];
    let want = pkm::lookup(&cfg, &keys, &query, 3).unwrap();
    let got = kernels.run(&ctx, &cfg, &keys, &query, 3).unwrap();
    assert_eq!(got.indices, want.indices);
    assert_eq!(&got.indices[..4], &[0, 1, 2, 3]);
    assert_eq!(got.scores, want.scores);
}

#[test]
fn nan_inf_and_signed_zero_rank_as_the_oracle() {
    let Some((ctx, kernels)) = setup() else {
        return;
    };
    let cfg = cfg_of(&Case::new((300, 16, 1, 1), 2, false, Inputs::Normal));
    let mut rng = Rng::new(7);
    let specials = [
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        -0.0,
        0.0,
        1.0,
        -1.0,
    ];
    for trial in 0..6 {
        let keys: Vec<f32> = (0..2 * 300)
            .map(|_| specials[rng.below(specials.len() as u64) as usize])
            .collect();
        let query: Vec<f32> = match trial % 3 {
            0 => vec![1.0; 2 * 4],
            1 => vec![-1.0, 1.0, 1.0, -1.0, 0.0, 1.0, 1.0, 0.0],
            _ => vec![0.0; 2 * 4],
        };
        let want = pkm::lookup(&cfg, &keys, &query, 4).unwrap();
        let got = kernels.run(&ctx, &cfg, &keys, &query, 4).unwrap();
        assert_eq!(got.indices, want.indices, "trial {trial}");
        for (a, b) in want.scores.iter().zip(&got.scores) {
            assert!(same_score(*a, *b), "trial {trial}: {a} vs {b}");
        }
    }
}

#[test]
fn zero_tokens_and_bad_arguments() {
    let Some((ctx, kernels)) = setup() else {
        return;
    };
    let cfg = cfg_of(&Case::new((16, 4, 2, 1), 8, false, Inputs::Normal));
    let keys = vec![0.0f32; 2 * 2 * 16 * 4];
    let out = kernels.run(&ctx, &cfg, &keys, &[], 0).unwrap();
    assert!(out.indices.is_empty() && out.scores.is_empty() && out.weights.is_empty());
    let query = vec![0.0f32; 2 * 8];
    let err = |r: Result<Lookup, GpuError>| r.expect_err("should fail").to_string();
    // wrong lengths
    let e = err(kernels.run(&ctx, &cfg, &keys[1..], &query, 1));
    assert!(e.contains("keys"), "{e}");
    let e = err(kernels.run(&ctx, &cfg, &keys, &query, 2));
    assert!(e.contains("query"), "{e}");
    // k > n_keys, k > MAX_K, odd k_dim, zero heads
    let bad = |f: &dyn Fn(&mut PkmConfig)| {
        let mut c = cfg.clone();
        f(&mut c);
        c
    };
    let e = err(kernels.run(&ctx, &bad(&|c| c.knn = 17), &keys, &query, 1));
    assert!(e.contains("knn"), "{e}");
    let big = bad(&|c| {
        c.n_keys = 200;
        c.knn = MAX_K + 1
    });
    let e = err(kernels.run(&ctx, &big, &vec![0.0; 2 * 2 * 200 * 4], &query, 1));
    assert!(e.contains("maximum"), "{e}");
    let e = err(kernels.run(&ctx, &bad(&|c| c.k_dim = 7), &keys, &query, 1));
    assert!(e.contains("k_dim"), "{e}");
    let e = err(kernels.run(&ctx, &bad(&|c| c.heads = 0), &keys, &query, 1));
    assert!(e.contains("positive"), "{e}");
    assert!(LookupPlan::with_batch(&ctx, &cfg, 1, 0).is_err());
}

/// The kernels fit WebGPU's default limits (16 KiB workgroup storage, 8
/// storage buffers per stage, 128 MiB bindings), not only lavapipe's.
#[test]
fn kernels_build_and_run_under_webgpu_default_limits() {
    let Some(ctx) = common::webgpu_default_ctx() else {
        return;
    };
    let limits = &ctx.limits;
    assert_eq!(limits.max_compute_workgroup_storage_size, 16384);
    let kernels = LookupKernels::new(&ctx).unwrap();
    for (batch, qk_norm) in [(None, true), (Some(2), false)] {
        let c = Case {
            batch,
            ..Case::new((1024, MAX_K, 2, 3), 16, qk_norm, Inputs::Dyadic)
        };
        check(&kernels, &ctx, &c, 700);
    }
}
