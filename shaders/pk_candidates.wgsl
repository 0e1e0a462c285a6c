// pk_candidates.wgsl — product-key lookup, step 3: the k best of the k×k
// candidate rows, and their softmax.
//
// Computes, for every (token t, head h), from the per-half top-k lists
// (S1, I1) = half[t, h, 0] and (S2, I2) = half[t, h, 1] (best first, as
// written by pk_topk.wgsl):
//   cand[a, b] = { score: S1[a] + S2[b] (f32), s1: S1[a], s2: S2[b],
//                  row:   I1[a] * n_keys + I2[b] }
//   the k best candidates in memlayer_core::pkm::candidate_order:
//     score desc, then s1 desc, then s2 desc, then row asc
//     (NaN ranks as -inf, -0 == +0; integer keys from the bits)
//   indices[t, h, j] = row, scores[t, h, j] = score,
//   weights[t, h, :] = softmax(scores[t, h, :]) in f32 with the max subtracted
//   (exp, then a sequential sum, then one division per weight, as the oracle).
// Scores and indices are exact (one f32 addition per candidate); weights
// differ from the oracle only by the device's exp (a few ulp).
//
// Method: k-best pair sums with a binary heap, one invocation per
// (token, head), no workgroup memory and no barriers. A pair (a', b') <=
// (a, b) component-wise never ranks after (a, b): rounding is monotone, and
// on equal S the lists are ordered by id, so the s1, s2 and row tie-breaks
// agree. So the best remaining pair is always the best of the "frontier":
// start with (0, 0); pop the best; push (a, b+1), and (a+1, 0) when b = 0
// (every pair has exactly one such parent, so none is pushed twice). The k
// pops are the k best candidates in order: O(k log k) comparisons instead of
// sorting k². The heap never holds more than k + 1 pairs.
//
// Bindings (group 0):
//   0: params   uniform  { tokens_heads: u32, k: u32, n_keys: u32, x_groups: u32 }
//   1: half_s   storage, read        array<f32>  (tokens, heads, 2, k)  per-half top-k scores
//   2: half_i   storage, read        array<u32>  (tokens, heads, 2, k)  per-half top-k sub-key ids
//   3: indices  storage, read_write  array<u32>  (tokens, heads, k)
//   4: scores   storage, read_write  array<f32>  (tokens, heads, k)
//   5: weights  storage, read_write  array<f32>  (tokens, heads, k)
// Workgroup layout: 64 invocations, one (token, head) each,
// th = (wg.y * x_groups + wg.x) * 64 + lid.
// Private memory: a heap of MAX_K + 1 packed pairs (516 bytes).
// Limits: 1 <= k <= MAX_K = 128; n_keys <= 65535 (rows fit u32).

// `struct Params` is generated from the host struct (src/shaders.rs of
// memlayer-wgpu) and prepended to this file.

const MAX_K: u32 = 128u;

// -inf and NaN as runtime values: WGSL makes a constant expression that
// evaluates to inf or NaN a shader-creation error (Tint, i.e. Chrome's
// WebGPU, enforces it; naga does not), so the bits live in private variables.
var<private> NEG_INF_BITS: u32 = 0xff800000u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> half_s: array<f32>;
@group(0) @binding(2) var<storage, read> half_i: array<u32>;
@group(0) @binding(3) var<storage, read_write> indices: array<u32>;
@group(0) @binding(4) var<storage, read_write> scores: array<f32>;
@group(0) @binding(5) var<storage, read_write> weights: array<f32>;

// rank_key (the order of scores): pk_rank_key.wgsl, appended by the registry.

// A candidate, unpacked: pair (a << 16) | b of the lists at base1 / base2.
struct Cand {
    score: u32, // rank_key(S1[a] + S2[b])
    s1: u32,    // rank_key(S1[a])
    s2: u32,    // rank_key(S2[b])
    row: u32,
}

fn cand(pair: u32, base1: u32, base2: u32) -> Cand {
    let a = pair >> 16u;
    let b = pair & 0xffffu;
    let x = half_s[base1 + a];
    let y = half_s[base2 + b];
    return Cand(
        rank_key(x + y),
        rank_key(x),
        rank_key(y),
        half_i[base1 + a] * params.n_keys + half_i[base2 + b],
    );
}

// True when candidate x ranks strictly before y (candidate_order).
fn before(x: Cand, y: Cand) -> bool {
    if x.score != y.score {
        return x.score > y.score;
    }
    if x.s1 != y.s1 {
        return x.s1 > y.s1;
    }
    if x.s2 != y.s2 {
        return x.s2 > y.s2;
    }
    return x.row < y.row;
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let th = (wg.y * params.x_groups + wg.x) * 64u + lid;
    if th >= params.tokens_heads {
        return;
    }
    let k = params.k;
    let base1 = th * 2u * k;
    let base2 = base1 + k;
    let out = th * k;

    var heap: array<u32, 129>; // MAX_K + 1 packed pairs; heap[0] is the best
    var len = 1u;
    heap[0] = 0u;
    var mx = bitcast<f32>(NEG_INF_BITS);
    for (var j = 0u; j < k; j++) {
        // pop the best pair
        let top = heap[0];
        let a = top >> 16u;
        let b = top & 0xffffu;
        let score = half_s[base1 + a] + half_s[base2 + b];
        indices[out + j] = half_i[base1 + a] * params.n_keys + half_i[base2 + b];
        scores[out + j] = score;
        mx = max(mx, score);
        len -= 1u;
        heap[0] = heap[len];
        // sift down
        var i = 0u;
        loop {
            let l = 2u * i + 1u;
            if l >= len {
                break;
            }
            var c = l;
            if l + 1u < len && before(cand(heap[l + 1u], base1, base2), cand(heap[l], base1, base2)) {
                c = l + 1u;
            }
            if !before(cand(heap[c], base1, base2), cand(heap[i], base1, base2)) {
                break;
            }
            let t = heap[c];
            heap[c] = heap[i];
            heap[i] = t;
            i = c;
        }
        // push the successors: (a, b+1), and (a+1, 0) when b = 0
        for (var s = 0u; s < 2u; s++) {
            var next = 0xffffffffu;
            if s == 0u && b + 1u < k {
                next = top + 1u;
            }
            if s == 1u && b == 0u && a + 1u < k {
                next = (a + 1u) << 16u;
            }
            if next == 0xffffffffu {
                continue;
            }
            // sift up
            var i = len;
            heap[i] = next;
            len += 1u;
            let nc = cand(next, base1, base2);
            loop {
                if i == 0u {
                    break;
                }
                let p = (i - 1u) / 2u;
                if !before(nc, cand(heap[p], base1, base2)) {
                    break;
                }
                heap[i] = heap[p];
                heap[p] = next;
                i = p;
            }
        }
    }

    // softmax over the k best, in f32 with the max subtracted
    var sum = 0.0;
    for (var j = 0u; j < k; j++) {
        let e = exp(scores[out + j] - mx);
        weights[out + j] = e;
        sum = sum + e;
    }
    for (var j = 0u; j < k; j++) {
        weights[out + j] = weights[out + j] / sum;
    }
}
