//! Product-key lookup (search + softmax) and the backward of its scores,
//! matching [`memlayer_core::pkm::lookup`] and
//! [`memlayer_core::pkm::scores_backward`] bit for bit.
//!
//! * Sub-key scores are a blocked matmul queries × sub-keys: sub-keys are
//!   repacked once into panels of [`PANEL`] keys, `(heads, 2, n_panels, half,
//!   PANEL)`, so a tile of 4 queries × 16 keys keeps 64 accumulators in
//!   registers while the panel stays in L1 for all query tiles of a chunk.
//!   Every score is still accumulated sequentially over `d` from 0.0 with a
//!   separate multiply and add, exactly like the oracle's `dot`, so scores
//!   (and hence indices) are bit-identical.
//! * Per-half top-k is a vectorised threshold scan with sorted insertion of
//!   u64 keys `(monotone score, !id)` (ties to the lower id, NaN as -inf,
//!   `-0.0 == +0.0`, as [`memlayer_core::topk`]).
//! * Candidates: only pairs `(a, b)` with `(a+1)(b+1) <= k` of the two sorted
//!   halves can be among the k best (each is beaten by every pair it
//!   dominates, under [`memlayer_core::pkm::candidate_order`]), so about
//!   `k ln k` instead of `k²` candidates are ranked (all `k²` if a half
//!   score is not finite). `candidate_order` is encoded as one u128 key
//!   (monotone images of score, s1, s2, then the negated row) so ranking is
//!   integer comparison.
//! * Parallel over chunks of tokens.

use crate::bag::bag_forward;
use crate::error::{CpuError, check_len};
#[cfg(test)]
use crate::simd::Portable;
use crate::simd::{Lanes, dispatch_lanes, kernel};
use crate::storage::Table;
use memlayer_core::linalg::{dot, softmax_backward, softmax_in_place};
use memlayer_core::pkm::{Lookup, PkmConfig, QK_NORM_EPS};
use memlayer_core::topk::rank_key;
use rayon::prelude::*;

/// Sub-keys per panel of the score matmul.
pub const PANEL: usize = 16;
/// Queries per register tile of the score matmul (8-lane and narrower
/// families: 4 queries × 16 keys = 8 AVX2 accumulators of 16 registers).
const TILE: usize = 4;
/// Queries per register tile for 16-lane families (AVX-512: 8 accumulators of
/// 32 registers; 4 would leave the adds latency-bound: measured 4 % slower).
const TILE_WIDE: usize = 8;

/// Queries per register tile for the family `S`.
const fn tile_of<S: Lanes>() -> usize {
    if S::LANES >= 16 { TILE_WIDE } else { TILE }
}
/// Tokens per parallel task.
const TOKEN_CHUNK: usize = 32;

/// RMS normalisation exactly as the oracle's (same expression, same order);
/// writes the normalised copy and returns `1/rms`.
fn rms_normalise_into(v: &[f32], out: &mut [f32]) -> f32 {
    let ms = v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32;
    let inv = 1.0 / (ms + QK_NORM_EPS).sqrt();
    for (o, x) in out.iter_mut().zip(v) {
        *o = x * inv;
    }
    inv
}

/// Backward of the RMS normalisation, exactly as the oracle's.
fn rms_normalise_backward_into(y: &[f32], inv: f32, dy: &[f32], dx: &mut [f32]) {
    let mean = dot(dy, y) / y.len() as f32;
    for ((o, &yi), &gi) in dx.iter_mut().zip(y).zip(dy) {
        *o = inv * (gi - yi * mean);
    }
}

/// Scored (normalised if `qk_norm`) copy of `v` and its `1/rms` (1 without qk-norm).
fn scored_into(qk_norm: bool, v: &[f32], out: &mut [f32]) -> f32 {
    if qk_norm {
        rms_normalise_into(v, out)
    } else {
        out.copy_from_slice(v);
        1.0
    }
}

/// Sub-keys prepared for [`lookup`]: validated, normalised when `qk_norm`,
/// repacked into panels. Build once per key update, reuse across calls.
#[derive(Clone, Debug)]
pub struct PreparedKeys {
    cfg: PkmConfig,
    n_panels: usize,
    /// (heads, 2, n_panels, half, PANEL), zero-padded past n_keys
    panels: Vec<f32>,
}

impl PreparedKeys {
    /// keys: (heads, 2, n_keys, half), Meta's layout.
    pub fn new(cfg: &PkmConfig, keys: &[f32]) -> Result<Self, CpuError> {
        cfg.validate()?;
        let (n, half) = (cfg.n_keys, cfg.half());
        check_len("keys", keys.len(), cfg.heads * 2 * n * half)?;
        let n_panels = n.div_ceil(PANEL);
        let mut panels = vec![0.0f32; cfg.heads * 2 * n_panels * half * PANEL];
        panels
            .par_chunks_mut(half * PANEL)
            .enumerate()
            .for_each_init(
                || vec![0.0f32; half],
                |buf, (hp, panel)| {
                    let (hs, p) = (hp / n_panels, hp % n_panels);
                    for j in 0..PANEL {
                        let key = p * PANEL + j;
                        if key >= n {
                            break;
                        }
                        let src = &keys[(hs * n + key) * half..][..half];
                        scored_into(cfg.qk_norm, src, buf);
                        for (d, &v) in buf.iter().enumerate() {
                            panel[d * PANEL + j] = v;
                        }
                    }
                },
            );
        Ok(Self {
            cfg: cfg.clone(),
            n_panels,
            panels,
        })
    }

    /// The configuration the keys were prepared for.
    pub fn config(&self) -> &PkmConfig {
        &self.cfg
    }

    fn panel(&self, head: usize, side: usize, p: usize) -> &[f32] {
        let half = self.cfg.half();
        let i = (head * 2 + side) * self.n_panels + p;
        &self.panels[i * half * PANEL..][..half * PANEL]
    }
}

/// Most vectors of a tile row (`PANEL` keys, one lane each for the portable family).
const TILE_VECS: usize = PANEL;

/// One register tile: `out[t][j] = Σ_d qt[d][t] * panel[d][j]`, sequential in d
/// with a separate multiply and add (the oracle's `dot`), `PANEL / S::LANES`
/// vectors per query. panel: (half, PANEL); qt: (half, T) → out (T, PANEL).
///
/// # Safety
/// Inside `S`'s `#[target_feature]` wrapper; `S::LANES` divides `PANEL`.
#[inline(always)]
unsafe fn tile_lanes<S: Lanes, const T: usize>(
    panel: &[f32],
    qt: &[f32],
    out: &mut [[f32; PANEL]; T],
) {
    let nv = PANEL / S::LANES;
    // SAFETY: every vector lies within a PANEL-wide row of the panel or of out.
    unsafe {
        let mut acc = [[S::zero(); TILE_VECS]; T];
        for (kv, q) in panel.chunks_exact(PANEL).zip(qt.chunks_exact(T)) {
            let mut k = [S::zero(); TILE_VECS];
            for (v, kv_v) in k.iter_mut().enumerate().take(nv) {
                *kv_v = S::load(kv.as_ptr().add(v * S::LANES));
            }
            for (t, row) in acc.iter_mut().enumerate() {
                let qd = S::splat(q[t]);
                for v in 0..nv {
                    row[v] = S::add(row[v], S::mul(k[v], qd));
                }
            }
        }
        for (o, row) in out.iter_mut().zip(&acc) {
            for (v, &a) in row.iter().enumerate().take(nv) {
                S::store(o.as_mut_ptr().add(v * S::LANES), a);
            }
        }
    }
}

/// Per-chunk scratch buffers.
#[derive(Default)]
struct Scratch {
    /// (tiles, half, tile) packed scored query halves (tile: [`tile_of`])
    qt: Vec<f32>,
    /// (tiles * tile, n_panels * PANEL) sub-key scores
    scores: Vec<f32>,
    /// per side: (tokens, k) top-k scores and ids of each token's half
    top_s: [Vec<f32>; 2],
    top_i: [Vec<u32>; 2],
    /// one top-k selection as rank keys
    sel: Vec<u64>,
    /// candidates: (sort key, a, b)
    cand: Vec<(u128, u32, u32)>,
    qbuf: Vec<f32>,
}
/// Monotone u32 image of a score's rank: NaN ranks as -inf and -0.0 == +0.0,
/// so `mono(a) > mono(b)` iff `a` ranks strictly above `b` in
/// [`memlayer_core::topk::rank_order`] (ignoring ids).
#[inline(always)]
fn mono(s: f32) -> u32 {
    let s = rank_key(s);
    let s = if s == 0.0 { 0.0 } else { s };
    let b = s.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// Sortable key of (score, id): larger key ranks first (higher score, then lower id).
#[inline(always)]
fn rank_u64(s: f32, id: u32) -> u64 {
    ((mono(s) as u64) << 32) | (u32::MAX - id) as u64
}

/// Top-k of `scores` (ids = positions), best first, as keys of [`rank_u64`] in
/// `keys`; same selection and order as [`memlayer_core::topk::topk`].
///
/// Threshold scan: 16 scores at a time are compared with the current k-th
/// score (vectorised), and only the few that beat it are inserted.
///
/// # Safety
/// Inside `S`'s `#[target_feature]` wrapper (always safe for [`Portable`]).
#[inline(always)]
unsafe fn topk_into<S: Lanes>(scores: &[f32], k: usize, keys: &mut Vec<u64>) {
    keys.clear();
    let k = k.min(scores.len());
    if k == 0 {
        return;
    }
    if k * 8 > scores.len() {
        keys.extend(
            scores
                .iter()
                .enumerate()
                .map(|(i, &s)| rank_u64(s, i as u32)),
        );
        if k < keys.len() {
            keys.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
            keys.truncate(k);
        }
        keys.sort_unstable_by_key(|&x| std::cmp::Reverse(x));
        return;
    }
    keys.extend(
        scores[..k]
            .iter()
            .enumerate()
            .map(|(i, &s)| rank_u64(s, i as u32)),
    );
    keys.sort_unstable_by_key(|&x| std::cmp::Reverse(x));
    // rank key of the k-th: a later score (higher id) enters iff it is strictly greater;
    // `s > thr` is false for NaN, as `rank_key(NaN) = -inf > thr` is
    let kth = |keys: &[u64]| rank_key(scores[(u32::MAX - keys[k - 1] as u32) as usize]);
    let mut thr = kth(keys);
    const BLOCK: usize = 16;
    let mut base = k;
    for chunk in scores[k..].chunks(BLOCK) {
        let mut mask = 0u32;
        if chunk.len() == BLOCK {
            // SAFETY: BLOCK is a multiple of S::LANES; every load is within the chunk.
            unsafe {
                let t = S::splat(thr);
                for v in 0..BLOCK / S::LANES {
                    let x = S::load(chunk.as_ptr().add(v * S::LANES));
                    mask |= S::gt_mask(x, t) << (v * S::LANES);
                }
            }
        } else {
            for (j, &s) in chunk.iter().enumerate() {
                mask |= ((s > thr) as u32) << j;
            }
        }
        while mask != 0 {
            let j = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            let s = chunk[j];
            if s > thr {
                let key = rank_u64(s, (base + j) as u32);
                // insert in descending order, dropping the last
                let mut pos = k - 1;
                while pos > 0 && keys[pos - 1] < key {
                    keys[pos] = keys[pos - 1];
                    pos -= 1;
                }
                keys[pos] = key;
                thr = kth(keys);
            }
        }
        base += chunk.len();
    }
}

/// Id of a [`rank_u64`] key.
#[inline(always)]
fn key_id(key: u64) -> u32 {
    u32::MAX - key as u32
}

/// Product-key search and softmax, bit-identical to [`memlayer_core::pkm::lookup`].
///
/// query: (tokens, heads, k_dim) → [`Lookup`] with indices, scores, weights
/// (tokens, heads, knn).
pub fn lookup(keys: &PreparedKeys, query: &[f32], tokens: usize) -> Result<Lookup, CpuError> {
    let cfg = &keys.cfg;
    check_len("query", query.len(), tokens * cfg.heads * cfg.k_dim)?;
    let (heads, knn) = (cfg.heads, cfg.knn);
    let hk = heads * knn;
    let mut out = Lookup {
        indices: vec![0; tokens * hk],
        scores: vec![0.0; tokens * hk],
        weights: vec![0.0; tokens * hk],
    };
    if tokens == 0 {
        return Ok(out);
    }
    let kern = kernel();
    out.indices
        .par_chunks_mut(TOKEN_CHUNK * hk)
        .zip(out.scores.par_chunks_mut(TOKEN_CHUNK * hk))
        .zip(out.weights.par_chunks_mut(TOKEN_CHUNK * hk))
        .enumerate()
        .for_each_init(Scratch::default, |scratch, (c, ((idx, sc), w))| {
            let t0 = c * TOKEN_CHUNK;
            let nt = idx.len() / hk;
            let q = &query[t0 * heads * cfg.k_dim..(t0 + nt) * heads * cfg.k_dim];
            // SAFETY: `kern` comes from `kernel()`; the slices hold nt tokens.
            unsafe { lookup_chunk(kern, keys, q, nt, scratch, idx, sc, w) };
        });
    Ok(out)
}

/// [`lookup`] with keys prepared on the fly. keys: (heads, 2, n_keys, half)
pub fn lookup_keys(
    cfg: &PkmConfig,
    keys: &[f32],
    query: &[f32],
    tokens: usize,
) -> Result<Lookup, CpuError> {
    lookup(&PreparedKeys::new(cfg, keys)?, query, tokens)
}

dispatch_lanes! {
    /// One chunk of `nt` tokens. query: (nt, heads, k_dim); idx, sc, w: (nt, heads, knn).
    ///
    /// # Safety
    /// None beyond the kernel family's (the slices are checked).
    unsafe fn lookup_chunk[](
        keys: &PreparedKeys,
        query: &[f32],
        nt: usize,
        s: &mut Scratch,
        idx: &mut [u32],
        sc: &mut [f32],
        w: &mut [f32],
    ) => lookup_chunk_lanes
}

/// Sub-key scores of one (head, side) for `tiles` query tiles of `T`:
/// panels outer (each stays in L1), query tiles inner, then scaled.
/// qt: (tiles, half, T); scores: (tiles * T, n_panels * PANEL).
///
/// # Safety
/// Inside `S`'s `#[target_feature]` wrapper.
#[inline(always)]
unsafe fn scores_lanes<S: Lanes, const T: usize>(
    keys: &PreparedKeys,
    h: usize,
    side: usize,
    tiles: usize,
    qt: &[f32],
    scores: &mut [f32],
) {
    let (half, scale) = (keys.cfg.half(), keys.cfg.score_scale());
    let width = keys.n_panels * PANEL;
    let mut acc = [[0.0f32; PANEL]; T];
    for p in 0..keys.n_panels {
        let panel = keys.panel(h, side, p);
        for tl in 0..tiles {
            // SAFETY: inside S's wrapper (caller).
            unsafe { tile_lanes::<S, T>(panel, &qt[tl * half * T..][..half * T], &mut acc) };
            for (t, row) in acc.iter().enumerate() {
                let dst = &mut scores[(tl * T + t) * width + p * PANEL..][..PANEL];
                for (o, &v) in dst.iter_mut().zip(row) {
                    *o = v * scale;
                }
            }
        }
    }
}

/// The lookup of one chunk, written once for every kernel family: score
/// tiles and the top-k scan in `S`'s lanes, candidates and softmax scalar.
///
/// # Safety
/// Inside `S`'s `#[target_feature]` wrapper.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn lookup_chunk_lanes<S: Lanes>(
    keys: &PreparedKeys,
    query: &[f32],
    nt: usize,
    s: &mut Scratch,
    idx: &mut [u32],
    sc: &mut [f32],
    w: &mut [f32],
) {
    let cfg = &keys.cfg;
    let (n, half, k, heads) = (cfg.n_keys, cfg.half(), cfg.knn, cfg.heads);
    let tile = tile_of::<S>();
    let tiles = nt.div_ceil(tile);
    let width = keys.n_panels * PANEL;
    s.qt.resize(tiles * half * tile, 0.0);
    s.scores.resize(tiles * tile * width, 0.0);
    s.qbuf.resize(half, 0.0);
    for side in 0..2 {
        s.top_s[side].resize(nt * k, 0.0);
        s.top_i[side].resize(nt * k, 0);
    }
    for h in 0..heads {
        for side in 0..2 {
            // pack scored query halves: (tiles, half, tile), zero-padded
            s.qt.fill(0.0);
            for t in 0..nt {
                let q = &query[(t * heads + h) * cfg.k_dim + side * half..][..half];
                scored_into(cfg.qk_norm, q, &mut s.qbuf);
                let base = (t / tile) * half * tile + t % tile;
                for (d, &v) in s.qbuf.iter().enumerate() {
                    s.qt[base + d * tile] = v;
                }
            }
            // SAFETY: inside S's wrapper (caller).
            unsafe {
                if tile == TILE_WIDE {
                    scores_lanes::<S, TILE_WIDE>(keys, h, side, tiles, &s.qt, &mut s.scores)
                } else {
                    scores_lanes::<S, TILE>(keys, h, side, tiles, &s.qt, &mut s.scores)
                }
            }
            for t in 0..nt {
                let row = &s.scores[t * width..t * width + n];
                // SAFETY: inside S's wrapper (caller).
                unsafe { topk_into::<S>(row, k, &mut s.sel) };
                for (j, &key) in s.sel.iter().enumerate() {
                    let id = key_id(key);
                    s.top_s[side][t * k + j] = row[id as usize];
                    s.top_i[side][t * k + j] = id;
                }
            }
        }
        for t in 0..nt {
            let (s1, i1) = (
                &s.top_s[0][t * k..(t + 1) * k],
                &s.top_i[0][t * k..(t + 1) * k],
            );
            let (s2, i2) = (
                &s.top_s[1][t * k..(t + 1) * k],
                &s.top_i[1][t * k..(t + 1) * k],
            );
            let finite = s1.iter().chain(s2).all(|x| x.is_finite());
            s.cand.clear();
            for a in 0..k {
                let bmax = if finite { k / (a + 1) } else { k };
                let m1 = (mono(s1[a]) as u128) << 64;
                for b in 0..bmax {
                    let row = i1[a] * n as u32 + i2[b];
                    // candidate_order as one integer: (score, s1, s2) higher, then row lower
                    let key = ((mono(s1[a] + s2[b]) as u128) << 96)
                        | m1
                        | ((mono(s2[b]) as u128) << 32)
                        | (u32::MAX - row) as u128;
                    s.cand.push((key, a as u32, b as u32));
                }
            }
            if k < s.cand.len() {
                s.cand.select_nth_unstable_by(k - 1, |x, y| y.0.cmp(&x.0));
                s.cand.truncate(k);
            }
            s.cand.sort_unstable_by_key(|x| std::cmp::Reverse(x.0));
            let o = (t * heads + h) * k;
            for (j, &(_, a, b)) in s.cand.iter().enumerate() {
                let (a, b) = (a as usize, b as usize);
                idx[o + j] = i1[a] * n as u32 + i2[b];
                let score = s1[a] + s2[b];
                sc[o + j] = score;
                w[o + j] = score;
            }
            softmax_in_place(&mut w[o..o + k]);
        }
    }
}

/// Backward of the softmax over each (token, head) row, in parallel:
/// weights, d_weights: (tokens, heads, knn) → d_scores (same shape).
pub fn softmax_backward_rows(knn: usize, weights: &[f32], d_weights: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0f32; weights.len()];
    if knn == 0 {
        return out;
    }
    out.par_chunks_mut(knn)
        .zip(weights.par_chunks(knn).zip(d_weights.par_chunks(knn)))
        .for_each(|(o, (w, g))| o.copy_from_slice(&softmax_backward(w, g)));
    out
}

/// Backward of the product-key scores, bit-identical to
/// [`memlayer_core::pkm::scores_backward`].
///
/// keys: (heads, 2, n_keys, half); query: (tokens, heads, k_dim);
/// indices, d_scores: (tokens, heads, knn) → (d_keys like keys, d_query like query).
///
/// `d_query` is computed in parallel over (token, head). The sub-key
/// gradient is a sum over tokens: its contributions are sorted by
/// `(sub-key, position)` and each sub-key's segment is summed in ascending
/// position — the oracle's order — as an embedding-bag over the scored
/// query halves, so the reduction is deterministic for any thread count.
pub fn scores_backward(
    cfg: &PkmConfig,
    keys: &[f32],
    query: &[f32],
    tokens: usize,
    indices: &[u32],
    d_scores: &[f32],
) -> Result<(Vec<f32>, Vec<f32>), CpuError> {
    cfg.validate()?;
    let (n, half, k, heads) = (cfg.n_keys, cfg.half(), cfg.knn, cfg.heads);
    check_len("keys", keys.len(), heads * 2 * n * half)?;
    check_len("query", query.len(), tokens * heads * cfg.k_dim)?;
    check_len("d_scores", d_scores.len(), tokens * heads * k)?;
    check_len("indices", indices.len(), d_scores.len())?;
    if let Some(&m) = indices.iter().max()
        && m as usize >= cfg.n_rows()
    {
        return Err(CpuError::IndexOutOfRange {
            index: m,
            rows: cfg.n_rows(),
        });
    }
    if d_scores.len() >= u32::MAX as usize {
        return Err(CpuError::InvalidConfig(
            "too many scores for u32 positions".into(),
        ));
    }
    let scale = cfg.score_scale();
    let qk = cfg.qk_norm;
    // scored sub-keys and their 1/rms: (heads*2*n, half), (heads*2*n)
    let mut keys_s = vec![0.0f32; keys.len()];
    let mut keys_inv = vec![1.0f32; heads * 2 * n];
    keys_s
        .par_chunks_mut(half)
        .zip(keys_inv.par_iter_mut())
        .zip(keys.par_chunks(half))
        .for_each(|((o, inv), kv)| *inv = scored_into(qk, kv, o));
    // scored query halves: (tokens*heads*2, half), (tokens*heads*2)
    let mut qs_all = vec![0.0f32; query.len()];
    let mut q_inv = vec![1.0f32; tokens * heads * 2];
    qs_all
        .par_chunks_mut(half)
        .zip(q_inv.par_iter_mut())
        .zip(query.par_chunks(half))
        .for_each(|((o, inv), qv)| *inv = scored_into(qk, qv, o));

    // d_query, one (token, head) per task item
    let mut d_query = vec![0.0f32; query.len()];
    d_query.par_chunks_mut(cfg.k_dim).enumerate().for_each_init(
        || vec![0.0f32; half],
        |d_qs, (th, dq)| {
            let h = th % heads;
            for side in 0..2 {
                d_qs.fill(0.0);
                for j in 0..k {
                    let g = d_scores[th * k + j] * scale;
                    if g == 0.0 {
                        continue;
                    }
                    let row = indices[th * k + j] as usize;
                    let key = if side == 0 { row / n } else { row % n };
                    let kv = &keys_s[((h * 2 + side) * n + key) * half..][..half];
                    for (a, &v) in d_qs.iter_mut().zip(kv) {
                        *a += g * v;
                    }
                }
                let qs = &qs_all[(th * 2 + side) * half..][..half];
                let dst = &mut dq[side * half..(side + 1) * half];
                if qk {
                    rms_normalise_backward_into(qs, q_inv[th * 2 + side], d_qs, dst);
                } else {
                    dst.copy_from_slice(d_qs);
                }
            }
        },
    );

    // d_keys_s: contributions (sub-key row, position), sorted
    let mut contrib: Vec<u64> = (0..d_scores.len())
        .into_par_iter()
        .flat_map_iter(|p| {
            let g = d_scores[p] * scale;
            let th = p / k;
            let h = th % heads;
            let row = indices[p] as usize;
            let skip = g == 0.0;
            (0..2usize).filter_map(move |side| {
                if skip {
                    return None;
                }
                let key = if side == 0 { row / n } else { row % n };
                let krow = ((h * 2 + side) * n + key) as u64;
                Some((krow << 32) | p as u64)
            })
        })
        .collect();
    contrib.par_sort_unstable();
    let (gather, gw): (Vec<u32>, Vec<f32>) = contrib
        .par_iter()
        .map(|&c| {
            let krow = (c >> 32) as usize;
            let p = (c & 0xffff_ffff) as usize;
            let side = (krow / n) % 2;
            (((p / k) * 2 + side) as u32, d_scores[p] * scale)
        })
        .unzip();
    let mut touched = Vec::new();
    let mut seg = vec![0usize];
    for (i, &c) in contrib.iter().enumerate() {
        let krow = (c >> 32) as u32;
        if touched.last() != Some(&krow) {
            if i > 0 {
                seg.push(i);
            }
            touched.push(krow);
        }
    }
    if !contrib.is_empty() {
        seg.push(contrib.len());
    }
    let mut sums = vec![0.0f32; touched.len() * half];
    let qs_table = Table::new(&qs_all, tokens * heads * 2, half)?;
    bag_forward(&qs_table, &gather, &gw, &seg, &mut sums)?;
    let mut d_keys_s = vec![0.0f32; keys.len()];
    for (&r, g) in touched.iter().zip(sums.chunks_exact(half.max(1))) {
        d_keys_s[r as usize * half..][..half].copy_from_slice(g);
    }
    let d_keys = if qk {
        let mut d = vec![0.0f32; keys.len()];
        d.par_chunks_mut(half).enumerate().for_each(|(r, o)| {
            let (ks, dks) = (&keys_s[r * half..][..half], &d_keys_s[r * half..][..half]);
            rms_normalise_backward_into(ks, keys_inv[r], dks, o);
        });
        d
    } else {
        d_keys_s
    };
    Ok((d_keys, d_query))
}

#[cfg(test)]
mod tests {
    use super::*;
    use memlayer_core::rng::Rng;

    /// The threshold top-k equals the oracle's on random, tied and non-finite scores.
    #[test]
    fn topk_into_matches_the_oracle() {
        let mut rng = Rng::new(3);
        let mut keys = Vec::new();
        for trial in 0..400 {
            let n = 1 + rng.below(700) as usize;
            let k = 1 + rng.below(n as u64) as usize;
            let k = if trial % 3 == 0 {
                k.min(n / 8).max(1)
            } else {
                k
            };
            let s: Vec<f32> = (0..n)
                .map(|_| match trial % 4 {
                    0 => rng.normal(),
                    1 => rng.below(3) as f32 - 1.0,
                    2 => [f32::NAN, -0.0, 0.0, f32::INFINITY, f32::NEG_INFINITY, 1.0]
                        [rng.below(6) as usize],
                    _ => (rng.below(5) as f32) * 0.5,
                })
                .collect();
            // SAFETY: the portable lanes need no ISA.
            unsafe { topk_into::<Portable>(&s, k, &mut keys) };
            let ids: Vec<u32> = keys.iter().map(|&x| key_id(x)).collect();
            let (_, want) = memlayer_core::topk::topk(&s, k);
            assert_eq!(ids, want, "trial {trial} n {n} k {k}");
        }
    }

    #[test]
    fn mono_is_the_rank_order() {
        let v = [
            f32::NEG_INFINITY,
            -3.0,
            -f32::MIN_POSITIVE,
            -0.0,
            0.0,
            1e-40,
            2.0,
            f32::INFINITY,
        ];
        for w in v.windows(2) {
            assert!(mono(w[0]) <= mono(w[1]), "{} {}", w[0], w[1]);
        }
        assert_eq!(mono(-0.0), mono(0.0));
        assert_eq!(mono(f32::NAN), mono(f32::NEG_INFINITY));
        assert!(mono(-3.0) < mono(-2.0));
    }
}
