//! Product-key memory layer oracle (DESIGN §1; Meta's `HashingMemory`).
//!
//! For a token `x` (batched over tokens):
//! ```text
//! q = W_q x + b_q                                  (heads, k_dim)
//! per head h: s1 = K[h,0] q[h,:half], s2 = K[h,1] q[h,half:]      (n_keys) each
//!   (S1, I1) = topk(s1, k); (S2, I2) = topk(s2, k)
//!   cand[a,b] = S1[a] + S2[b]; row[a,b] = I1[a] * n_keys + I2[b]   (k*k)
//!   (sigma, iota) = topk(cand, k)   ties by the lower row id
//!   w = softmax(sigma)
//! m   = Σ_h Σ_j w[h,j] V[iota[h,j]]                 embedding-bag, bag size heads*k
//! out = W_o (m ⊙ silu(W_s x + b_s)) + b_o           swilu gate
//! out = sigmoid(w_g·x + b_g) * out                  if gated
//! ```
//! With `qk_norm`, each query half and each sub-key is RMS-normalised (no
//! learned scale, eps [`QK_NORM_EPS`]) and the sub-key score is divided by
//! `sqrt(k_dim / 2)`, i.e. `s = sqrt(half) * cos(q_half, key)`.
//!
//! **Row order.** Rows rank by their f32 score `fl(s1[i] + s2[j])`, higher
//! first. Equal scores (ties) go to the lower row id — except that when two
//! f32 sums are equal only through rounding, the row with the higher `s1[i]`,
//! then the higher `s2[j]`, ranks first ([`candidate_order`]). With exact
//! arithmetic these rounding ties do not exist; with f32 they do, and without
//! this refinement the product-key search could miss a row a brute-force scan
//! over all n_keys² sums would pick. With it, the search is exact: the k best
//! rows of all n_keys² rows are always among the k×k candidates (see the
//! brute-force tests below). Backends must rank candidates the same way.

use crate::bag::{self, SparseRows};
use crate::error::{OracleError, check_len};
use crate::linalg::{self, dot, sigmoid, silu, silu_grad, softmax_in_place};
use crate::rng::Rng;
use crate::topk::{rank_key, topk};
use std::cmp::Ordering;

/// Epsilon of the qk-norm RMS normalisation.
pub const QK_NORM_EPS: f32 = 1e-6;

/// Shapes and options of one product-key memory layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PkmConfig {
    /// Model width: input and output dimension of the layer.
    pub dim: usize,
    /// Width of a value row (Meta's `mem_v_dim`; equal to `dim` by default).
    pub v_dim: usize,
    /// Number of read heads.
    pub heads: usize,
    /// Sub-keys per half; the memory has `n_keys²` rows.
    pub n_keys: usize,
    /// Query/key width per head (even: two halves).
    pub k_dim: usize,
    /// Rows read per head (top-k).
    pub knn: usize,
    /// RMS-normalise query halves and sub-keys.
    pub qk_norm: bool,
    /// Multiply the output by `sigmoid(w_g · x + b_g)`.
    pub gated: bool,
}

impl PkmConfig {
    /// The layer at the scale of Lample et al. (2019): width 1024, 4 heads,
    /// 1024² = 1M value rows, k_dim 512, k = 32, no qk-norm, no gate. The
    /// benches and profilers measure this shape.
    pub fn paper() -> Self {
        Self {
            dim: 1024,
            v_dim: 1024,
            heads: 4,
            n_keys: 1024,
            k_dim: 512,
            knn: 32,
            qk_norm: false,
            gated: false,
        }
    }

    /// Checks every field's domain.
    pub fn validate(&self) -> Result<(), OracleError> {
        let bad = |m: String| Err(OracleError::InvalidConfig(m));
        if self.dim == 0 || self.v_dim == 0 || self.heads == 0 || self.n_keys == 0 {
            return bad(format!(
                "dim, v_dim, heads and n_keys must be positive: {self:?}"
            ));
        }
        if self.k_dim < 2 || !self.k_dim.is_multiple_of(2) {
            return bad(format!("k_dim must be even and >= 2, got {}", self.k_dim));
        }
        if self.knn == 0 || self.knn > self.n_keys {
            return bad(format!(
                "knn must be in 1..=n_keys ({}), got {}",
                self.n_keys, self.knn
            ));
        }
        if self.n_keys > u16::MAX as usize {
            return bad(format!(
                "n_keys {} too large: n_keys² row ids must fit in u32",
                self.n_keys
            ));
        }
        Ok(())
    }

    /// Rows of the value table: `n_keys²`.
    pub fn n_rows(&self) -> usize {
        self.n_keys * self.n_keys
    }

    /// Half of `k_dim`: the width of a sub-key.
    pub fn half(&self) -> usize {
        self.k_dim / 2
    }

    /// Width of the query projection output: `heads * k_dim`.
    pub fn query_dim(&self) -> usize {
        self.heads * self.k_dim
    }

    /// Entries per token in the embedding-bag: `heads * knn`.
    pub fn bag_size(&self) -> usize {
        self.heads * self.knn
    }

    /// Factor applied to sub-key scores (`1/sqrt(half)` with qk-norm, else 1).
    pub fn score_scale(&self) -> f32 {
        if self.qk_norm {
            1.0 / (self.half() as f32).sqrt()
        } else {
            1.0
        }
    }
}

/// Random lookup inputs for `tokens` tokens from `seed`, as the benches and
/// profilers time them: sub-keys U(±0.05), (heads, 2, n_keys, half), and
/// queries N(0, 1), (tokens, heads, k_dim).
#[doc(hidden)]
pub fn random_lookup_inputs(cfg: &PkmConfig, tokens: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = Rng::new(seed);
    let keys = rng.uniform_vec(cfg.heads * 2 * cfg.n_keys * cfg.half(), -0.05, 0.05);
    let query = rng.normal_vec(tokens * cfg.heads * cfg.k_dim, 0.0, 1.0);
    (keys, query)
}

/// Output gate `sigmoid(w · x + b)`.
#[derive(Clone, Debug, PartialEq)]
pub struct PkmGate {
    /// (dim)
    pub w: Vec<f32>,
    /// scalar bias
    pub b: f32,
}

/// Parameters of one memory layer (the shared values live outside).
///
/// Layouts follow `torch.nn.Linear` (`(out, in)` row-major) and Meta's
/// `keys` parameter `(2 * heads * n_keys, half)` viewed as `(heads, 2, n_keys, half)`.
/// The same struct holds gradients in [`PkmGrads`].
#[derive(Clone, Debug, PartialEq)]
pub struct PkmParams {
    /// (heads * k_dim, dim)
    pub w_q: Vec<f32>,
    /// (heads * k_dim)
    pub b_q: Vec<f32>,
    /// (heads, 2, n_keys, k_dim / 2)
    pub keys: Vec<f32>,
    /// (v_dim, dim) — Meta's `swilu_projection`
    pub w_s: Vec<f32>,
    /// (v_dim)
    pub b_s: Vec<f32>,
    /// (dim, v_dim) — Meta's `value_proj`
    pub w_o: Vec<f32>,
    /// (dim)
    pub b_o: Vec<f32>,
    /// Present iff `config.gated`.
    pub gate: Option<PkmGate>,
}

impl PkmParams {
    /// All-zero parameters (gradient accumulators).
    pub fn zeros(cfg: &PkmConfig) -> Self {
        Self {
            w_q: vec![0.0; cfg.query_dim() * cfg.dim],
            b_q: vec![0.0; cfg.query_dim()],
            keys: vec![0.0; cfg.heads * 2 * cfg.n_keys * cfg.half()],
            w_s: vec![0.0; cfg.v_dim * cfg.dim],
            b_s: vec![0.0; cfg.v_dim],
            w_o: vec![0.0; cfg.dim * cfg.v_dim],
            b_o: vec![0.0; cfg.dim],
            gate: cfg.gated.then(|| PkmGate {
                w: vec![0.0; cfg.dim],
                b: 0.0,
            }),
        }
    }

    /// Meta's initialisation: keys U(±1/sqrt(k_dim)); W_q xavier-uniform;
    /// W_s, W_o N(0, dim^-1/2); gate N(0, dim^-1/2); biases keep torch's
    /// `nn.Linear` default U(±1/sqrt(fan_in)).
    pub fn init(cfg: &PkmConfig, rng: &mut Rng) -> Self {
        let bias = |rng: &mut Rng, n: usize, fan_in: usize| {
            let b = 1.0 / (fan_in as f32).sqrt();
            rng.uniform_vec(n, -b, b)
        };
        let kb = 1.0 / (cfg.k_dim as f32).sqrt();
        let xavier = (6.0 / (cfg.dim + cfg.query_dim()) as f32).sqrt();
        let std = (cfg.dim as f32).powf(-0.5);
        // Field initialisers run in the order written: this is the order of the draws.
        Self {
            keys: rng.uniform_vec(cfg.heads * 2 * cfg.n_keys * cfg.half(), -kb, kb),
            w_q: rng.uniform_vec(cfg.query_dim() * cfg.dim, -xavier, xavier),
            b_q: bias(rng, cfg.query_dim(), cfg.dim),
            w_s: rng.normal_vec(cfg.v_dim * cfg.dim, 0.0, std),
            b_s: bias(rng, cfg.v_dim, cfg.dim),
            w_o: rng.normal_vec(cfg.dim * cfg.v_dim, 0.0, std),
            b_o: bias(rng, cfg.dim, cfg.v_dim),
            gate: cfg.gated.then(|| PkmGate {
                w: rng.normal_vec(cfg.dim, 0.0, std),
                b: bias(rng, 1, cfg.dim)[0],
            }),
        }
    }

    /// Checks every tensor's length against `cfg`.
    pub fn check(&self, cfg: &PkmConfig) -> Result<(), OracleError> {
        cfg.validate()?;
        check_len("w_q", &self.w_q, &[cfg.query_dim(), cfg.dim])?;
        check_len("b_q", &self.b_q, &[cfg.query_dim()])?;
        check_len("keys", &self.keys, &[cfg.heads, 2, cfg.n_keys, cfg.half()])?;
        check_len("w_s", &self.w_s, &[cfg.v_dim, cfg.dim])?;
        check_len("b_s", &self.b_s, &[cfg.v_dim])?;
        check_len("w_o", &self.w_o, &[cfg.dim, cfg.v_dim])?;
        check_len("b_o", &self.b_o, &[cfg.dim])?;
        match (&self.gate, cfg.gated) {
            (Some(g), true) => check_len("gate.w", &g.w, &[cfg.dim]),
            (None, false) => Ok(()),
            (Some(_), false) => Err(OracleError::InvalidConfig(
                "gate parameters given but config.gated is false".into(),
            )),
            (None, true) => Err(OracleError::InvalidConfig(
                "config.gated is true but no gate parameters".into(),
            )),
        }
    }
}

/// Meta's value initialisation: `n_keys²` rows of N(0, v_dim^-1/2). → (n_rows, v_dim)
pub fn init_values(cfg: &PkmConfig, rng: &mut Rng) -> Vec<f32> {
    rng.normal_vec(cfg.n_rows() * cfg.v_dim, 0.0, (cfg.v_dim as f32).powf(-0.5))
}

/// Result of the product-key search for a batch of queries.
#[derive(Clone, Debug, PartialEq)]
pub struct Lookup {
    /// (tokens, heads, knn) selected value rows, best first
    pub indices: Vec<u32>,
    /// (tokens, heads, knn) pre-softmax scores of those rows
    pub scores: Vec<f32>,
    /// (tokens, heads, knn) softmax of `scores` over knn
    pub weights: Vec<f32>,
}

/// RMS normalisation of one vector; returns the normalised copy and `1/rms`.
fn rms_normalise(v: &[f32]) -> (Vec<f32>, f32) {
    let ms = v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32;
    let inv = 1.0 / (ms + QK_NORM_EPS).sqrt();
    (v.iter().map(|x| x * inv).collect(), inv)
}

/// Backward of [`rms_normalise`]: `dx = inv * (dy - y * mean(dy ⊙ y))`.
fn rms_normalise_backward(y: &[f32], inv: f32, dy: &[f32]) -> Vec<f32> {
    let mean = dot(dy, y) / y.len() as f32;
    y.iter()
        .zip(dy)
        .map(|(&yi, &gi)| inv * (gi - yi * mean))
        .collect()
}

/// Sub-keys as scored: normalised when `qk_norm`, with their `1/rms`.
/// keys: (heads, 2, n_keys, half) → same shape, and (heads * 2 * n_keys) factors.
fn scored_keys(cfg: &PkmConfig, keys: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let half = cfg.half();
    if !cfg.qk_norm {
        return (keys.to_vec(), Vec::new());
    }
    let mut out = Vec::with_capacity(keys.len());
    let mut inv = Vec::with_capacity(keys.len() / half);
    for k in keys.chunks_exact(half) {
        let (n, i) = rms_normalise(k);
        out.extend_from_slice(&n);
        inv.push(i);
    }
    (out, inv)
}

/// The query half as scored (normalised when `qk_norm`) and its `1/rms`.
fn scored_query(cfg: &PkmConfig, q: &[f32]) -> (Vec<f32>, f32) {
    if cfg.qk_norm {
        rms_normalise(q)
    } else {
        (q.to_vec(), 1.0)
    }
}

/// A row considered by the search: its score `fl(s1 + s2)`, the two sub-key
/// scores it is made of, and its row id `i1 * n_keys + i2`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate {
    /// `s1 + s2` in f32
    pub score: f32,
    /// score of the first-half sub-key
    pub s1: f32,
    /// score of the second-half sub-key
    pub s2: f32,
    /// value row id
    pub row: u32,
}

/// `Less` when `a` ranks before `b`: higher score; on equal scores higher
/// `s1`, then higher `s2`, then lower row id (NaN ranks as `-inf`).
pub fn candidate_order(a: &Candidate, b: &Candidate) -> Ordering {
    let desc = |x: f32, y: f32| {
        rank_key(y)
            .partial_cmp(&rank_key(x))
            .unwrap_or(Ordering::Equal)
    };
    desc(a.score, b.score)
        .then_with(|| desc(a.s1, b.s1))
        .then_with(|| desc(a.s2, b.s2))
        .then_with(|| a.row.cmp(&b.row))
}

/// Keeps the `k` best candidates of `cand`, sorted best first.
pub fn select_best(cand: &mut Vec<Candidate>, k: usize) {
    if k < cand.len() {
        if k == 0 {
            cand.clear();
            return;
        }
        cand.select_nth_unstable_by(k - 1, candidate_order);
        cand.truncate(k);
    }
    cand.sort_unstable_by(candidate_order);
}

/// Sort key of a score in rank order (a smaller key ranks first): higher
/// [`rank_key`] first, `-0.0` equal to `+0.0`, NaN as `-inf` — the order
/// [`candidate_order`] and [`crate::topk`] use, as one integer compare.
#[inline]
fn desc_key(x: f32) -> u32 {
    let x = rank_key(x);
    // IEEE: -0.0 == +0.0, so both get the key of +0.0
    let bits = if x == 0.0 { 0 } else { x.to_bits() };
    // ascending order of the floats as unsigned integers, then reversed
    let asc = if bits >> 31 == 1 {
        !bits
    } else {
        bits | 0x8000_0000
    };
    !asc
}

/// Up to this `knn`, the selection keeps its best candidates in a sorted
/// buffer (insertion, stopping a row at its first rejected candidate); above,
/// it partitions (`select_nth_unstable`) and sorts.
const INSERTION_MAX_K: usize = 64;

/// Inserts `key` into `best` (ascending, at most `k` distinct keys), keeping
/// the `k` smallest; false when `key` is not kept (`best` is full and its
/// last key is smaller).
#[inline]
fn insert_best<T: Ord + Copy>(best: &mut Vec<T>, k: usize, key: T) -> bool {
    if best.len() == k {
        if best.last().is_some_and(|&last| key >= last) {
            return false;
        }
        best.pop();
    }
    let mut i = best.len();
    best.push(key);
    while i > 0 && best[i - 1] > key {
        best[i] = best[i - 1];
        i -= 1;
    }
    best[i] = key;
    true
}

/// Top-`k` of one half's sub-key scores into `keys`, best first, as
/// `desc_key(score) << 32 | id`: the order of [`topk`] (higher score, then
/// lower id).
fn top_half(scores: &[f32], k: usize, keys: &mut Vec<u64>) {
    keys.clear();
    keys.extend(
        scores
            .iter()
            .enumerate()
            .map(|(i, &v)| (u64::from(desc_key(v)) << 32) | i as u64),
    );
    if k < keys.len() {
        keys.select_nth_unstable(k - 1);
        keys.truncate(k);
    }
    keys.sort_unstable();
}

/// Product-key selection from precomputed sub-key scores (already scaled):
/// scores: (groups, 2, n_keys), one group per (token, head) → the `knn`
/// best rows of each group, best first, as `(i1, i2)` sub-key pairs
/// (row = `i1 * n_keys + i2`), shape (groups, knn, 2). The same rule and
/// result as [`lookup`]: top-`knn` of each half, then top-`knn` of the
/// `knn²` sums in [`candidate_order`]. `knn` must be `1..=n_keys`.
///
/// Faster than the rule as written, same result: with both halves in rank
/// order, candidate `(a, b)` (the a-th best first half with the b-th best
/// second half) ranks after every `(a', b') <= (a, b)` — f32 addition is
/// monotone, equal sums fall to `s1`, `s2` and then the row, which within a
/// tie follows `(a, b)` — so it is among the best `knn` only if
/// `(a + 1)(b + 1) <= knn`: about `knn·ln(knn)` candidates instead of `knn²`,
/// fewer still as a row `a` stops at its first candidate worse than the
/// `knn` kept so far. Scores compare as integer keys (`desc_key`).
pub fn select_from_scores(
    scores: &[f32],
    n_keys: usize,
    knn: usize,
) -> Result<Vec<u32>, OracleError> {
    if n_keys == 0 || knn == 0 || knn > n_keys {
        return Err(OracleError::InvalidConfig(format!(
            "product-key selection needs 1 <= knn ({knn}) <= n_keys ({n_keys})"
        )));
    }
    if !scores.len().is_multiple_of(2 * n_keys) {
        return Err(OracleError::Shape {
            what: "sub-key scores",
            shape: format!("[groups, 2, {n_keys}]"),
            expected: scores.len().div_ceil(2 * n_keys) * 2 * n_keys,
            got: scores.len(),
        });
    }
    if knn > u16::MAX as usize + 1 {
        return Err(OracleError::InvalidConfig(format!(
            "product-key selection supports knn <= 65536, got {knn}"
        )));
    }
    let mut out = Vec::with_capacity(scores.len() / n_keys * knn);
    let (mut k1, mut k2) = (Vec::with_capacity(n_keys), Vec::with_capacity(n_keys));
    // (score, s1, s2, a·knn + b) keys: within equal scores and sub-scores,
    // the order of (a, b) is the order of the row (see above)
    let mut cand: Vec<u128> = Vec::with_capacity(knn * 4);
    for g in scores.chunks_exact(2 * n_keys) {
        let (h1, h2) = g.split_at(n_keys);
        top_half(h1, knn, &mut k1);
        top_half(h2, knn, &mut k2);
        cand.clear();
        let small = knn <= INSERTION_MAX_K;
        'rows: for (a, &ka) in k1.iter().enumerate() {
            let s1 = h1[(ka & 0xffff_ffff) as usize];
            let key1 = u128::from((ka >> 32) as u32) << 64;
            for (b, &kb) in k2[..knn / (a + 1)].iter().enumerate() {
                let s2 = h2[(kb & 0xffff_ffff) as usize];
                let key2 = u128::from((kb >> 32) as u32) << 32;
                // a, b < knn <= 65536: a·knn + b < 2^32
                let ab = u128::from((a * knn + b) as u32);
                let key = (u128::from(desc_key(s1 + s2)) << 96) | key1 | key2 | ab;
                if !small {
                    cand.push(key);
                } else if !insert_best(&mut cand, knn, key) {
                    // keys grow along b, and (a', 0) > (a, 0) for a' > a
                    if b == 0 {
                        break 'rows;
                    }
                    break;
                }
            }
        }
        if !small {
            if knn < cand.len() {
                cand.select_nth_unstable(knn - 1);
                cand.truncate(knn);
            }
            cand.sort_unstable();
        }
        for &c in &cand {
            let ab = (c & 0xffff_ffff) as usize;
            out.push((k1[ab / knn] & 0xffff_ffff) as u32);
            out.push((k2[ab % knn] & 0xffff_ffff) as u32);
        }
    }
    Ok(out)
}

/// Product-key search and softmax. keys: (heads, 2, n_keys, half); query: (tokens, heads, k_dim).
pub fn lookup(
    cfg: &PkmConfig,
    keys: &[f32],
    query: &[f32],
    tokens: usize,
) -> Result<Lookup, OracleError> {
    cfg.validate()?;
    check_len("keys", keys, &[cfg.heads, 2, cfg.n_keys, cfg.half()])?;
    check_len("query", query, &[tokens, cfg.heads, cfg.k_dim])?;
    let (n, half, k) = (cfg.n_keys, cfg.half(), cfg.knn);
    let scale = cfg.score_scale();
    let (keys_s, _) = scored_keys(cfg, keys);
    let mut out = Lookup {
        indices: Vec::with_capacity(tokens * cfg.heads * k),
        scores: Vec::with_capacity(tokens * cfg.heads * k),
        weights: Vec::with_capacity(tokens * cfg.heads * k),
    };
    let mut sub = vec![0.0f32; n];
    let mut cand: Vec<Candidate> = Vec::with_capacity(k * k);
    for t in 0..tokens {
        for h in 0..cfg.heads {
            let q = &query[(t * cfg.heads + h) * cfg.k_dim..][..cfg.k_dim];
            let mut best = [(Vec::new(), Vec::new()), (Vec::new(), Vec::new())];
            for (side, slot) in best.iter_mut().enumerate() {
                let (qs, _) = scored_query(cfg, &q[side * half..(side + 1) * half]);
                let kt = &keys_s[(h * 2 + side) * n * half..][..n * half];
                for (i, s) in sub.iter_mut().enumerate() {
                    *s = dot(&kt[i * half..(i + 1) * half], &qs) * scale;
                }
                *slot = topk(&sub, k);
            }
            let [(s1, i1), (s2, i2)] = &best;
            cand.clear();
            for a in 0..k {
                for b in 0..k {
                    cand.push(Candidate {
                        score: s1[a] + s2[b],
                        s1: s1[a],
                        s2: s2[b],
                        row: i1[a] * n as u32 + i2[b],
                    });
                }
            }
            select_best(&mut cand, k);
            let start = out.weights.len();
            for c in &cand {
                out.indices.push(c.row);
                out.scores.push(c.score);
                out.weights.push(c.score);
            }
            softmax_in_place(&mut out.weights[start..]);
        }
    }
    Ok(out)
}

/// Backward of the softmax over each (token, head) row:
/// weights, d_weights: (tokens, heads, knn) → d_scores (same shape).
pub fn softmax_backward_rows(knn: usize, weights: &[f32], d_weights: &[f32]) -> Vec<f32> {
    weights
        .chunks_exact(knn)
        .zip(d_weights.chunks_exact(knn))
        .flat_map(|(w, g)| linalg::softmax_backward(w, g))
        .collect()
}

/// Backward of the product-key scores: the gradient of each selected score
/// `sigma = s1[i1] + s2[i2]` (row = i1 * n_keys + i2) flows to both sub-key
/// scores, then to the sub-keys and the query (through qk-norm if enabled).
/// Selection itself is piecewise constant and gets no gradient.
///
/// keys: (heads, 2, n_keys, half); query: (tokens, heads, k_dim);
/// indices, d_scores: (tokens, heads, knn) → (d_keys like keys, d_query like query).
pub fn scores_backward(
    cfg: &PkmConfig,
    keys: &[f32],
    query: &[f32],
    tokens: usize,
    indices: &[u32],
    d_scores: &[f32],
) -> Result<(Vec<f32>, Vec<f32>), OracleError> {
    cfg.validate()?;
    check_len("keys", keys, &[cfg.heads, 2, cfg.n_keys, cfg.half()])?;
    check_len("query", query, &[tokens, cfg.heads, cfg.k_dim])?;
    check_len("d_scores", d_scores, &[tokens, cfg.heads, cfg.knn])?;
    if indices.len() != d_scores.len() {
        return Err(OracleError::Shape {
            what: "indices",
            shape: format!("[{tokens}, {}, {}]", cfg.heads, cfg.knn),
            expected: d_scores.len(),
            got: indices.len(),
        });
    }
    if let Some(&bad) = indices.iter().find(|&&r| r as usize >= cfg.n_rows()) {
        return Err(OracleError::IndexOutOfRange {
            index: bad as u64,
            rows: cfg.n_rows(),
        });
    }
    let (n, half, k) = (cfg.n_keys, cfg.half(), cfg.knn);
    let scale = cfg.score_scale();
    let (keys_s, keys_inv) = scored_keys(cfg, keys);
    // gradient w.r.t. the scored (possibly normalised) keys, summed over tokens
    let mut d_keys_s = vec![0.0f32; keys.len()];
    let mut d_query = vec![0.0f32; query.len()];
    for t in 0..tokens {
        for h in 0..cfg.heads {
            let th = t * cfg.heads + h;
            let q = &query[th * cfg.k_dim..(th + 1) * cfg.k_dim];
            for side in 0..2 {
                let q_half = &q[side * half..(side + 1) * half];
                let (qs, q_inv) = scored_query(cfg, q_half);
                let mut d_qs = vec![0.0f32; half];
                for j in 0..k {
                    let g = d_scores[th * k + j] * scale;
                    if g == 0.0 {
                        continue;
                    }
                    let row = indices[th * k + j] as usize;
                    let key = if side == 0 { row / n } else { row % n };
                    let off = ((h * 2 + side) * n + key) * half;
                    let kv = &keys_s[off..off + half];
                    for d in 0..half {
                        d_qs[d] += g * kv[d];
                        d_keys_s[off + d] += g * qs[d];
                    }
                }
                let dq = if cfg.qk_norm {
                    rms_normalise_backward(&qs, q_inv, &d_qs)
                } else {
                    d_qs
                };
                d_query[th * cfg.k_dim + side * half..][..half].copy_from_slice(&dq);
            }
        }
    }
    let d_keys = if cfg.qk_norm {
        let mut d = Vec::with_capacity(keys.len());
        for (r, (ks, dks)) in keys_s
            .chunks_exact(half)
            .zip(d_keys_s.chunks_exact(half))
            .enumerate()
        {
            d.extend(rms_normalise_backward(ks, keys_inv[r], dks));
        }
        d
    } else {
        d_keys_s
    };
    Ok((d_keys, d_query))
}

/// Everything the forward computed (kept for the backward).
#[derive(Clone, Debug, PartialEq)]
pub struct PkmForward {
    /// Number of tokens.
    pub tokens: usize,
    /// (tokens, heads * k_dim) the projected queries
    pub query: Vec<f32>,
    /// (tokens, heads, knn) selected value rows, best first
    pub indices: Vec<u32>,
    /// (tokens, heads, knn) pre-softmax scores (what Meta's `get_indices` returns)
    pub scores: Vec<f32>,
    /// (tokens, heads, knn) softmax weights
    pub weights: Vec<f32>,
    /// (tokens, v_dim) embedding-bag output `m`
    pub memory: Vec<f32>,
    /// (tokens, v_dim) `u = W_s x + b_s`
    pub swilu_pre: Vec<f32>,
    /// (tokens, dim) `W_o (m ⊙ silu(u)) + b_o`, before the optional gate
    pub projected: Vec<f32>,
    /// (tokens) gate logits `w_g · x + b_g` (empty when not gated)
    pub gate_logits: Vec<f32>,
    /// (tokens, dim) the layer output
    pub output: Vec<f32>,
}

/// Forward of one memory layer.
/// values: (n_rows, v_dim) shared table; x: (tokens, dim).
pub fn forward(
    cfg: &PkmConfig,
    params: &PkmParams,
    values: &[f32],
    x: &[f32],
    tokens: usize,
) -> Result<PkmForward, OracleError> {
    params.check(cfg)?;
    check_len("values", values, &[cfg.n_rows(), cfg.v_dim])?;
    check_len("input", x, &[tokens, cfg.dim])?;
    let v_dim = cfg.v_dim;
    let query = project_query(cfg, params, x, tokens);
    let lk = lookup(cfg, &params.keys, &query, tokens)?;
    let offsets = bag::uniform_offsets(tokens, cfg.bag_size());
    let memory = bag::bag_forward(
        values,
        cfg.n_rows(),
        v_dim,
        &lk.indices,
        &lk.weights,
        &offsets,
    )?;
    let out = finish(cfg, params, x, &memory, tokens);
    Ok(PkmForward {
        tokens,
        query,
        indices: lk.indices,
        scores: lk.scores,
        weights: lk.weights,
        memory,
        swilu_pre: out.swilu_pre,
        projected: out.projected,
        gate_logits: out.gate_logits,
        output: out.output,
    })
}

/// What the layer computes after the embedding-bag.
#[derive(Clone, Debug, PartialEq)]
pub struct PkmFinish {
    /// (tokens, v_dim) `u = W_s x + b_s`
    pub swilu_pre: Vec<f32>,
    /// (tokens, dim) `W_o (m ⊙ silu(u)) + b_o`
    pub projected: Vec<f32>,
    /// (tokens) gate logits (empty when not gated)
    pub gate_logits: Vec<f32>,
    /// (tokens, dim) the layer output
    pub output: Vec<f32>,
}

/// The layer's query projection `W_q x + b_q`. x: (tokens, dim) →
/// (tokens, heads * k_dim).
pub fn project_query(cfg: &PkmConfig, params: &PkmParams, x: &[f32], tokens: usize) -> Vec<f32> {
    linalg::linear(
        x,
        tokens,
        cfg.dim,
        &params.w_q,
        &params.b_q,
        cfg.query_dim(),
    )
}

/// The layer's output from its input `x` (tokens, dim) and the bag of
/// memory rows `memory` (tokens, v_dim): swilu gate, value projection and
/// the optional output gate. Runtimes that do the lookup and the bag
/// elsewhere (a GPU, a paged bank) finish the layer with this.
pub fn finish(
    cfg: &PkmConfig,
    params: &PkmParams,
    x: &[f32],
    memory: &[f32],
    tokens: usize,
) -> PkmFinish {
    let (dim, v_dim) = (cfg.dim, cfg.v_dim);
    let swilu_pre = linalg::linear(x, tokens, dim, &params.w_s, &params.b_s, v_dim);
    let gated_mem: Vec<f32> = memory
        .iter()
        .zip(&swilu_pre)
        .map(|(&m, &u)| m * silu(u))
        .collect();
    let projected = linalg::linear(&gated_mem, tokens, v_dim, &params.w_o, &params.b_o, dim);
    let (gate_logits, output) = match &params.gate {
        Some(g) => {
            let logits: Vec<f32> = x.chunks_exact(dim).map(|xr| dot(xr, &g.w) + g.b).collect();
            let out = projected
                .chunks_exact(dim)
                .zip(&logits)
                .flat_map(|(o, &z)| {
                    let s = sigmoid(z);
                    o.iter().map(move |&v| s * v)
                })
                .collect();
            (logits, out)
        }
        None => (Vec::new(), projected.clone()),
    };
    PkmFinish {
        swilu_pre,
        projected,
        gate_logits,
        output,
    }
}

/// Every gradient of one memory layer.
#[derive(Clone, Debug, PartialEq)]
pub struct PkmGrads {
    /// Gradients of the layer's own parameters (same shapes as [`PkmParams`]).
    pub params: PkmParams,
    /// Gradient of the shared value table: only the touched rows.
    pub values: SparseRows,
    /// (tokens, dim) gradient of the input
    pub input: Vec<f32>,
}

/// Backward of [`forward`] for `grad_out` (tokens, dim) = dL/d output.
pub fn backward(
    cfg: &PkmConfig,
    params: &PkmParams,
    values: &[f32],
    x: &[f32],
    fwd: &PkmForward,
    grad_out: &[f32],
) -> Result<PkmGrads, OracleError> {
    params.check(cfg)?;
    let (t, dim, v_dim) = (fwd.tokens, cfg.dim, cfg.v_dim);
    check_len("values", values, &[cfg.n_rows(), v_dim])?;
    check_len("input", x, &[t, dim])?;
    check_len("grad_out", grad_out, &[t, dim])?;
    let mut g = PkmParams::zeros(cfg);
    let mut dx = vec![0.0f32; t * dim];

    // output gate
    let d_projected: Vec<f32> = match (&params.gate, &mut g.gate) {
        (Some(gate), Some(dgate)) => {
            let mut d = vec![0.0f32; t * dim];
            for r in 0..t {
                let s = sigmoid(fwd.gate_logits[r]);
                let dy = &grad_out[r * dim..(r + 1) * dim];
                let o = &fwd.projected[r * dim..(r + 1) * dim];
                for c in 0..dim {
                    d[r * dim + c] = s * dy[c];
                }
                let dz = dot(dy, o) * s * (1.0 - s);
                dgate.b += dz;
                for c in 0..dim {
                    dgate.w[c] += dz * x[r * dim + c];
                    dx[r * dim + c] += dz * gate.w[c];
                }
            }
            d
        }
        _ => grad_out.to_vec(),
    };

    // value projection and swilu gate
    let gated_mem: Vec<f32> = fwd
        .memory
        .iter()
        .zip(&fwd.swilu_pre)
        .map(|(&m, &u)| m * silu(u))
        .collect();
    let d_gated = linalg::linear_backward(
        &gated_mem,
        t,
        v_dim,
        &params.w_o,
        dim,
        &d_projected,
        &mut g.w_o,
        &mut g.b_o,
    );
    let mut d_memory = vec![0.0f32; t * v_dim];
    let mut d_swilu = vec![0.0f32; t * v_dim];
    for i in 0..t * v_dim {
        let u = fwd.swilu_pre[i];
        d_memory[i] = d_gated[i] * silu(u);
        d_swilu[i] = d_gated[i] * fwd.memory[i] * silu_grad(u);
    }
    let dx_s = linalg::linear_backward(
        x,
        t,
        dim,
        &params.w_s,
        v_dim,
        &d_swilu,
        &mut g.w_s,
        &mut g.b_s,
    );

    // embedding-bag
    let offsets = bag::uniform_offsets(t, cfg.bag_size());
    let d_values = bag::bag_backward_table(
        cfg.n_rows(),
        v_dim,
        &fwd.indices,
        &fwd.weights,
        &offsets,
        &d_memory,
    )?;
    let d_weights = bag::bag_backward_weights(
        values,
        cfg.n_rows(),
        v_dim,
        &fwd.indices,
        &offsets,
        &d_memory,
    )?;

    // softmax, product keys, query projection
    let d_scores = softmax_backward_rows(cfg.knn, &fwd.weights, &d_weights);
    let (d_keys, d_query) =
        scores_backward(cfg, &params.keys, &fwd.query, t, &fwd.indices, &d_scores)?;
    g.keys = d_keys;
    let dx_q = linalg::linear_backward(
        x,
        t,
        dim,
        &params.w_q,
        cfg.query_dim(),
        &d_query,
        &mut g.w_q,
        &mut g.b_q,
    );
    for i in 0..t * dim {
        dx[i] += dx_s[i] + dx_q[i];
    }
    Ok(PkmGrads {
        params: g,
        values: d_values,
        input: dx,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(n_keys: usize, heads: usize, knn: usize, k_dim: usize) -> PkmConfig {
        PkmConfig {
            dim: 6,
            v_dim: 5,
            heads,
            n_keys,
            k_dim,
            knn,
            qk_norm: false,
            gated: false,
        }
    }

    /// Sub-key scores computed independently of `lookup`: (n_keys) per side.
    fn sub_scores(c: &PkmConfig, keys: &[f32], q: &[f32], h: usize, side: usize) -> Vec<f32> {
        let half = c.half();
        let norm = |v: &[f32]| -> Vec<f32> {
            if !c.qk_norm {
                return v.to_vec();
            }
            let ms = v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32;
            let inv = 1.0 / (ms + QK_NORM_EPS).sqrt();
            v.iter().map(|x| x * inv).collect()
        };
        let qs = norm(&q[side * half..(side + 1) * half]);
        (0..c.n_keys)
            .map(|i| {
                let off = ((h * 2 + side) * c.n_keys + i) * half;
                dot(&norm(&keys[off..off + half]), &qs) * c.score_scale()
            })
            .collect()
    }

    /// Top-k over all n_keys² rows by brute force: (indices, scores) per (token, head).
    fn brute_force(
        c: &PkmConfig,
        keys: &[f32],
        query: &[f32],
        tokens: usize,
    ) -> (Vec<u32>, Vec<f32>) {
        let (mut idx, mut sc) = (Vec::new(), Vec::new());
        for t in 0..tokens {
            for h in 0..c.heads {
                let q = &query[(t * c.heads + h) * c.k_dim..][..c.k_dim];
                let s1 = sub_scores(c, keys, q, h, 0);
                let s2 = sub_scores(c, keys, q, h, 1);
                let mut all: Vec<Candidate> = (0..c.n_rows())
                    .map(|r| {
                        let (a, b) = (s1[r / c.n_keys], s2[r % c.n_keys]);
                        Candidate {
                            score: a + b,
                            s1: a,
                            s2: b,
                            row: r as u32,
                        }
                    })
                    .collect();
                all.sort_by(candidate_order);
                all.truncate(c.knn);
                idx.extend(all.iter().map(|c| c.row));
                sc.extend(all.iter().map(|c| c.score));
            }
        }
        (idx, sc)
    }

    /// Keys and queries drawn from {-1, 0, 1}: dot products and sums are exact
    /// small integers, so ties are everywhere and exact.
    fn tie_heavy(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.below(3) as f32 - 1.0).collect()
    }

    #[test]
    fn product_key_topk_equals_brute_force_over_all_rows() {
        let mut rng = Rng::new(42);
        let mut checked = 0;
        for &n_keys in &[1usize, 3, 7, 10, 16, 33] {
            for &heads in &[1usize, 3] {
                for &k_dim in &[2usize, 8] {
                    let mut knns = vec![1, n_keys.div_ceil(2), n_keys];
                    knns.dedup();
                    for &knn in &knns {
                        for qk_norm in [false, true] {
                            for ties in [false, true] {
                                let c = PkmConfig {
                                    qk_norm,
                                    ..cfg(n_keys, heads, knn, k_dim)
                                };
                                let tokens = 5;
                                let nk = heads * 2 * n_keys * c.half();
                                let nq = tokens * heads * k_dim;
                                let (keys, query) = if ties {
                                    (tie_heavy(&mut rng, nk), tie_heavy(&mut rng, nq))
                                } else {
                                    (rng.normal_vec(nk, 0.0, 1.0), rng.normal_vec(nq, 0.0, 1.0))
                                };
                                let got = lookup(&c, &keys, &query, tokens).unwrap();
                                let (want_i, want_s) = brute_force(&c, &keys, &query, tokens);
                                assert_eq!(got.indices, want_i, "{c:?} ties={ties}");
                                assert_eq!(got.scores, want_s, "{c:?} ties={ties}");
                                checked += 1;
                            }
                        }
                    }
                }
            }
        }
        assert!(checked > 200);
    }

    #[test]
    fn ties_resolve_to_the_lowest_row() {
        // All keys equal: every row scores the same, so the k lowest rows win.
        let c = cfg(4, 1, 3, 2);
        let keys = vec![1.0; 2 * 4];
        let query = vec![0.5, 0.5];
        let lk = lookup(&c, &keys, &query, 1).unwrap();
        assert_eq!(lk.indices, vec![0, 1, 2]);
        for w in &lk.weights {
            assert!((w - 1.0 / 3.0).abs() < 1e-6);
        }
    }

    #[test]
    fn weights_are_a_softmax_of_the_scores() {
        let mut rng = Rng::new(3);
        let c = cfg(9, 2, 4, 6);
        let keys = rng.normal_vec(2 * 2 * 9 * 3, 0.0, 1.0);
        let query = rng.normal_vec(3 * 2 * 6, 0.0, 1.0);
        let lk = lookup(&c, &keys, &query, 3).unwrap();
        for (s, w) in lk.scores.chunks(4).zip(lk.weights.chunks(4)) {
            assert!(
                s.windows(2).all(|p| p[0] >= p[1]),
                "scores sorted descending"
            );
            let z: f64 = s.iter().map(|&v| ((v - s[0]) as f64).exp()).sum();
            for (sv, wv) in s.iter().zip(w) {
                let want = ((sv - s[0]) as f64).exp() / z;
                assert!((want - *wv as f64).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn config_errors_are_reported() {
        assert!(matches!(
            cfg(4, 1, 5, 2).validate(),
            Err(OracleError::InvalidConfig(_))
        ));
        assert!(cfg(4, 1, 0, 2).validate().is_err());
        assert!(cfg(4, 1, 2, 3).validate().is_err());
        assert!(cfg(0, 1, 1, 2).validate().is_err());
        let c = cfg(4, 2, 2, 4);
        let mut p = PkmParams::init(&c, &mut Rng::new(0));
        p.keys.pop();
        let err = forward(&c, &p, &vec![0.0; 16 * 5], &[0.0; 6], 1).unwrap_err();
        assert!(err.to_string().contains("keys"), "{err}");
    }

    /// L = Σ r ⊙ output, in f64.
    fn loss(
        c: &PkmConfig,
        p: &PkmParams,
        v: &[f32],
        x: &[f32],
        t: usize,
        r: &[f32],
    ) -> (f64, Vec<u32>) {
        let f = forward(c, p, v, x, t).unwrap();
        let l = f
            .output
            .iter()
            .zip(r)
            .map(|(&o, &g)| o as f64 * g as f64)
            .sum();
        (l, f.indices)
    }

    /// Central differences of every parameter, the values and the input against
    /// `backward`. Coordinates whose ±eps perturbation changes the selection are
    /// skipped (the loss is piecewise smooth); most must be checked.
    fn check_gradients(c: &PkmConfig, tokens: usize, seed: u64) {
        let mut rng = Rng::new(seed);
        let mut p = PkmParams::init(c, &mut rng);
        // O(1) keys and queries so the softmax is not uniform
        p.keys = rng.normal_vec(p.keys.len(), 0.0, 1.0);
        let v = rng.normal_vec(c.n_rows() * c.v_dim, 0.0, 1.0);
        let x = rng.normal_vec(tokens * c.dim, 0.0, 1.0);
        let r = rng.normal_vec(tokens * c.dim, 0.0, 1.0);
        let f = forward(c, &p, &v, &x, tokens).unwrap();
        let g = backward(c, &p, &v, &x, &f, &r).unwrap();
        let eps = 1e-2f32;
        let (mut checked, mut skipped) = (0usize, 0usize);
        let mut compare =
            |name: &str, i: usize, analytic: f32, lp: (f64, Vec<u32>), lm: (f64, Vec<u32>)| {
                if lp.1 != f.indices || lm.1 != f.indices {
                    skipped += 1;
                    return;
                }
                checked += 1;
                let fd = (lp.0 - lm.0) / (2.0 * eps as f64);
                let tol = 2e-3 + 2e-2 * fd.abs().max(analytic.abs() as f64);
                assert!(
                    (fd - analytic as f64).abs() <= tol,
                    "{c:?}: d{name}[{i}] finite difference {fd} vs backward {analytic}"
                );
            };
        type Field = fn(&mut PkmParams) -> &mut Vec<f32>;
        let fields: [(&str, Field, &Vec<f32>); 7] = [
            ("w_q", |p| &mut p.w_q, &g.params.w_q),
            ("b_q", |p| &mut p.b_q, &g.params.b_q),
            ("keys", |p| &mut p.keys, &g.params.keys),
            ("w_s", |p| &mut p.w_s, &g.params.w_s),
            ("b_s", |p| &mut p.b_s, &g.params.b_s),
            ("w_o", |p| &mut p.w_o, &g.params.w_o),
            ("b_o", |p| &mut p.b_o, &g.params.b_o),
        ];
        for (name, field, grad) in fields {
            for (i, &analytic) in grad.iter().enumerate() {
                let (mut pp, mut pm) = (p.clone(), p.clone());
                field(&mut pp)[i] += eps;
                field(&mut pm)[i] -= eps;
                compare(
                    name,
                    i,
                    analytic,
                    loss(c, &pp, &v, &x, tokens, &r),
                    loss(c, &pm, &v, &x, tokens, &r),
                );
            }
        }
        if let (Some(_), Some(dg)) = (&p.gate, &g.params.gate) {
            for i in 0..=c.dim {
                let (mut pp, mut pm) = (p.clone(), p.clone());
                let (gp, gm) = (pp.gate.as_mut().unwrap(), pm.gate.as_mut().unwrap());
                let an = if i < c.dim {
                    gp.w[i] += eps;
                    gm.w[i] -= eps;
                    dg.w[i]
                } else {
                    gp.b += eps;
                    gm.b -= eps;
                    dg.b
                };
                compare(
                    "gate",
                    i,
                    an,
                    loss(c, &pp, &v, &x, tokens, &r),
                    loss(c, &pm, &v, &x, tokens, &r),
                );
            }
        }
        let dv = g.values.to_dense(c.n_rows());
        for row in g.values.rows.iter() {
            assert!(
                f.indices.contains(row),
                "gradient on an unselected row {row}"
            );
        }
        for i in 0..v.len() {
            let (mut vp, mut vm) = (v.clone(), v.clone());
            vp[i] += eps;
            vm[i] -= eps;
            compare(
                "values",
                i,
                dv[i],
                loss(c, &p, &vp, &x, tokens, &r),
                loss(c, &p, &vm, &x, tokens, &r),
            );
        }
        for i in 0..x.len() {
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[i] += eps;
            xm[i] -= eps;
            compare(
                "input",
                i,
                g.input[i],
                loss(c, &p, &v, &xp, tokens, &r),
                loss(c, &p, &v, &xm, tokens, &r),
            );
        }
        assert!(
            checked >= 9 * (checked + skipped) / 10,
            "{c:?}: only {checked} of {} coordinates kept their selection",
            checked + skipped
        );
    }

    #[test]
    fn gradients_match_finite_differences() {
        let base = PkmConfig {
            dim: 6,
            v_dim: 5,
            heads: 2,
            n_keys: 5,
            k_dim: 4,
            knn: 3,
            qk_norm: false,
            gated: false,
        };
        for (i, (qk_norm, gated)) in [(false, false), (true, false), (false, true), (true, true)]
            .into_iter()
            .enumerate()
        {
            check_gradients(
                &PkmConfig {
                    qk_norm,
                    gated,
                    ..base.clone()
                },
                3,
                100 + i as u64,
            );
        }
        // v_dim == dim, one head, k = 1 and k = n_keys
        check_gradients(
            &PkmConfig {
                v_dim: 6,
                heads: 1,
                knn: 1,
                ..base.clone()
            },
            2,
            7,
        );
        check_gradients(
            &PkmConfig {
                knn: 5,
                gated: true,
                ..base.clone()
            },
            2,
            8,
        );
        // batch of 1
        check_gradients(&base, 1, 9);
    }

    #[test]
    fn zero_tokens_and_edge_shapes_run() {
        for (heads, knn, n_keys) in [(1, 1, 1), (1, 4, 4), (3, 1, 6), (2, 6, 6)] {
            let c = PkmConfig {
                gated: true,
                ..cfg(n_keys, heads, knn, 4)
            };
            let mut rng = Rng::new(1);
            let p = PkmParams::init(&c, &mut rng);
            let v = init_values(&c, &mut rng);
            for tokens in [0usize, 1, 4] {
                let x = rng.normal_vec(tokens * c.dim, 0.0, 1.0);
                let f = forward(&c, &p, &v, &x, tokens).unwrap();
                assert_eq!(f.indices.len(), tokens * heads * knn);
                assert_eq!(f.output.len(), tokens * c.dim);
                assert!(f.output.iter().all(|o| o.is_finite()));
                for ids in f.indices.chunks(knn) {
                    let mut u = ids.to_vec();
                    u.sort_unstable();
                    u.dedup();
                    assert_eq!(u.len(), knn, "rows of one head are distinct");
                }
                let g = backward(&c, &p, &v, &x, &f, &vec![1.0; tokens * c.dim]).unwrap();
                if tokens == 0 {
                    assert_eq!(g.params, PkmParams::zeros(&c));
                    assert!(g.values.rows.is_empty());
                    assert!(g.input.is_empty());
                }
            }
        }
    }
}

#[cfg(test)]
mod select_from_scores_tests {
    use super::*;

    /// Scaled sub-key scores as [`lookup`] computes them: (tokens*heads, 2, n_keys).
    fn sub_scores(cfg: &PkmConfig, keys: &[f32], query: &[f32], tokens: usize) -> Vec<f32> {
        let (n, half) = (cfg.n_keys, cfg.half());
        let (keys_s, _) = scored_keys(cfg, keys);
        let mut out = Vec::new();
        for t in 0..tokens {
            for h in 0..cfg.heads {
                let q = &query[(t * cfg.heads + h) * cfg.k_dim..][..cfg.k_dim];
                for side in 0..2 {
                    let (qs, _) = scored_query(cfg, &q[side * half..(side + 1) * half]);
                    let kt = &keys_s[(h * 2 + side) * n * half..][..n * half];
                    for i in 0..n {
                        out.push(dot(&kt[i * half..(i + 1) * half], &qs) * cfg.score_scale());
                    }
                }
            }
        }
        out
    }

    #[test]
    fn equals_lookup_on_random_and_tied_scores() {
        let mut rng = Rng::new(5);
        for (n_keys, knn, qk_norm, ties) in [
            (7, 3, false, false),
            (7, 7, true, false),
            (16, 4, false, true),
            (10, 1, true, true),
        ] {
            let cfg = PkmConfig {
                dim: 8,
                v_dim: 8,
                heads: 3,
                n_keys,
                k_dim: 6,
                knn,
                qk_norm,
                gated: false,
            };
            let tokens = 9;
            let draw = |rng: &mut Rng, n: usize| -> Vec<f32> {
                if ties {
                    (0..n).map(|_| rng.below(3) as f32 - 1.0).collect()
                } else {
                    rng.normal_vec(n, 0.0, 1.0)
                }
            };
            let keys = draw(&mut rng, cfg.heads * 2 * n_keys * cfg.half());
            let query = draw(&mut rng, tokens * cfg.query_dim());
            let lk = lookup(&cfg, &keys, &query, tokens).unwrap();
            let pairs =
                select_from_scores(&sub_scores(&cfg, &keys, &query, tokens), n_keys, knn).unwrap();
            let rows: Vec<u32> = pairs
                .chunks_exact(2)
                .map(|p| p[0] * n_keys as u32 + p[1])
                .collect();
            assert_eq!(rows, lk.indices, "n_keys {n_keys} knn {knn}");
        }
    }

    /// The rule as written: top-`knn` of each half with [`topk`], all
    /// `knn²` sums as [`Candidate`]s, [`select_best`].
    fn select_by_the_rule(scores: &[f32], n_keys: usize, knn: usize) -> Vec<u32> {
        let mut out = Vec::new();
        for g in scores.chunks_exact(2 * n_keys) {
            let (s1, i1) = topk(&g[..n_keys], knn);
            let (s2, i2) = topk(&g[n_keys..], knn);
            let mut cand = Vec::new();
            for a in 0..knn {
                for b in 0..knn {
                    cand.push(Candidate {
                        score: s1[a] + s2[b],
                        s1: s1[a],
                        s2: s2[b],
                        row: i1[a] * n_keys as u32 + i2[b],
                    });
                }
            }
            select_best(&mut cand, knn);
            for c in &cand {
                out.push(c.row / n_keys as u32);
                out.push(c.row % n_keys as u32);
            }
        }
        out
    }

    #[test]
    fn pruned_selection_equals_the_rule_on_ties_signed_zeros_nan_and_inf() {
        let mut rng = Rng::new(17);
        let special = [
            0.0,
            -0.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1.0,
            -1.0,
            f32::MAX,
            -f32::MAX,
            f32::MIN_POSITIVE,
            1e-45,
        ];
        for trial in 0..700 {
            // every 7th trial: knn above INSERTION_MAX_K (partition path)
            let big = trial % 7 == 6;
            let n_keys = if big {
                INSERTION_MAX_K + 1 + rng.below(80) as usize
            } else {
                1 + rng.below(40) as usize
            };
            let knn = match trial % 4 {
                _ if big => {
                    INSERTION_MAX_K + 1 + rng.below((n_keys - INSERTION_MAX_K) as u64) as usize
                }
                0 => 1,
                1 => n_keys,
                _ => 1 + rng.below(n_keys as u64) as usize,
            };
            let groups = 1 + rng.below(6) as usize;
            let scores: Vec<f32> = (0..groups * 2 * n_keys)
                .map(|_| match trial % 5 {
                    0 => rng.normal(),
                    // few distinct values: exact ties everywhere
                    1 => rng.below(3) as f32 - 1.0,
                    // sums that tie only through rounding
                    2 => [1.0, 1e-8, 2e-8, 3.0e-8, 16_777_216.0, 1.0 + f32::EPSILON]
                        [rng.below(6) as usize],
                    3 => special[rng.below(special.len() as u64) as usize],
                    _ => {
                        if rng.below(4) == 0 {
                            special[rng.below(special.len() as u64) as usize]
                        } else {
                            rng.normal()
                        }
                    }
                })
                .collect();
            assert_eq!(
                select_from_scores(&scores, n_keys, knn).unwrap(),
                select_by_the_rule(&scores, n_keys, knn),
                "trial {trial}: n_keys {n_keys} knn {knn} scores {scores:?}"
            );
        }
    }

    #[test]
    fn rejects_bad_knn_and_ragged_scores() {
        assert!(select_from_scores(&[0.0; 8], 4, 5).is_err());
        assert!(select_from_scores(&[0.0; 8], 4, 0).is_err());
        assert!(select_from_scores(&[0.0; 9], 4, 2).is_err());
        assert_eq!(select_from_scores(&[], 4, 2).unwrap(), Vec::<u32>::new());
    }
}
