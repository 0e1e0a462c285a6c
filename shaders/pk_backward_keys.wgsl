// pk_backward_keys.wgsl — sub-key gradient of the product-key lookup,
// summed over tokens deterministically.
//
// Computes, for every sub-key id u touched by some selected score (id =
// (h * 2 + s) * n_keys + key, a row of `keys` viewed as (heads*2*n_keys, half);
// CPU oracle: `pkm::scores_backward`, key part):
//   dks[d] = Σ_{entries p of u, ascending p; g_p != 0} g_p * qs[th_p, s*half + d]
//            p = (th * 2 + s) * knn + j,  g_p = d_scores[th, j] * scale
//   d_keys[u, d] = inv * (dks[d] - y[d] * mean),  y = keys[u] * inv,
//                  inv = 1/sqrt(Σ keys[u]²/half + 1e-6), mean = (Σ_d dks[d] y[d]) / half   if qk_norm
//                = dks[d]                                                                    else
// Rows no score touched are not written (the host clears d_keys first).
//
// Scheme: the sum over tokens is a scatter-add onto shared sub-keys; with no
// float atomics (and a CAS loop on u32 bits being order-nondeterministic), it
// is done as a gather over the deterministic reverse index of the sub-key ids
// (pk_backward_key_ids.wgsl + reverse_index_*.wgsl): entries per sub-key in
// ascending p, i.e. ascending (token, j) for one (head, side), the oracle's
// accumulation order, with one sequential accumulator per element d. The
// qk-norm backward's sums (Σ keys², the mean dot) are sequential by
// invocation 0, as in the oracle.
//
// Bindings (group 0):
//   0: params          uniform  { half, k_dim, knn, qk_norm: u32, scale: f32, slots, n_keys, x_groups: u32 }
//   1: seg_start       storage, read  array<u32> (slots + 1 at least) CSR: slot u owns
//                      sorted positions seg_start[u] .. seg_start[u + 1]; 0 past the
//                      last valid word, so end <= start marks a free slot
//   2: sorted_entries  storage, read  array<u32> (th * 2 * knn) entries p, by sub-key
//   3: unique_ids      storage, read  array<u32> (slots) sub-key id of each slot
//   4: d_scores        storage, read  array<f32> (th, knn)
//   5: qs              storage, read  array<f32> (th, k_dim) scored query halves
//                      (pk_backward_query.wgsl output)
//   6: keys            storage, read  array<f32> (heads, 2, n_keys, half) raw sub-keys
//   7: d_keys          storage, read_write array<f32> (heads, 2, n_keys, half)
// Workgroup layout: 64 invocations per slot, element d handled by invocation
// d % 64; slot = wg.y * x_groups + wg.x. Entries are taken in chunks of 64,
// each prepared once in workgroup memory (g_p and the query offset), so the
// inner loop has no integer division, and an invocation accumulates four
// consecutive elements (a vec4 of independent sums); the segment bounds are read with
// workgroupUniformLoad so the chunk loop (with barriers) is uniform.
// Workgroup memory: MAX_HALF f32 + 2 × 64 words (4.5 KiB).
// Limits: half <= MAX_HALF = 1024 (host-checked); every array fits one binding.

const WG: u32 = 64u;
const MAX_HALF: u32 = 1024u;
const EPS: f32 = 1e-6;

// `struct Params` is generated from the host struct (src/shaders.rs of
// memlayer-wgpu) and prepended to this file.

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> seg_start: array<u32>;
@group(0) @binding(2) var<storage, read> sorted_entries: array<u32>;
@group(0) @binding(3) var<storage, read> unique_ids: array<u32>;
@group(0) @binding(4) var<storage, read> d_scores: array<f32>;
@group(0) @binding(5) var<storage, read> qs: array<f32>;
@group(0) @binding(6) var<storage, read> keys: array<f32>;
@group(0) @binding(7) var<storage, read_write> d_keys: array<f32>;

var<workgroup> dk: array<f32, MAX_HALF>;
var<workgroup> g_sh: array<f32, WG>;
var<workgroup> qoff_sh: array<u32, WG>;
var<workgroup> range_sh: vec2<u32>;
var<workgroup> inv_shared: f32;
var<workgroup> mean_shared: f32;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let slot = wg.y * params.x_groups + wg.x;
    if slot >= params.slots {
        return;
    }
    if lid == 0u {
        range_sh = vec2<u32>(seg_start[slot], seg_start[slot + 1u]);
    }
    let range = workgroupUniformLoad(&range_sh);
    let start = range.x;
    let end = range.y;
    // a free slot (end <= start) computes nothing and writes nothing
    let valid = end > start;
    let id = select(0u, unique_ids[slot], valid);
    let side = (id / params.n_keys) % 2u;
    let half = params.half;
    let koff = id * half;
    for (var d = lid; d < MAX_HALF; d += WG) {
        dk[d] = 0.0;
    }
    // the sub-key's entries in chunks of WG: invocation lid prepares entry
    // p0 + lid (score gradient and query offset, the divisions once per
    // entry), then every invocation adds the chunk, in ascending p, to its elements
    for (var p0 = start; p0 < end; p0 += WG) {
        let p = p0 + lid;
        if p < end {
            let e = sorted_entries[p];
            let th = e / (2u * params.knn);
            g_sh[lid] = d_scores[th * params.knn + e % params.knn] * params.scale;
            qoff_sh[lid] = th * params.k_dim + side * half;
        }
        workgroupBarrier();
        let m = min(WG, end - p0);
        // four consecutive elements per invocation and step; lanes past `half`
        // compute scratch that is never stored
        for (var q0 = lid * 4u; q0 < half; q0 += WG * 4u) {
            var acc = vec4<f32>(dk[q0], dk[q0 + 1u], dk[q0 + 2u], dk[q0 + 3u]);
            for (var i = 0u; i < m; i++) {
                let g = g_sh[i];
                if g == 0.0 {
                    continue;
                }
                let q = qoff_sh[i] + q0;
                acc += g * vec4<f32>(qs[q], qs[q + 1u], qs[q + 2u], qs[q + 3u]);
            }
            dk[q0] = acc.x;
            dk[q0 + 1u] = acc.y;
            dk[q0 + 2u] = acc.z;
            dk[q0 + 3u] = acc.w;
        }
        workgroupBarrier();
    }
    if params.qk_norm == 0u {
        if valid {
            for (var d = lid; d < half; d += WG) {
                d_keys[koff + d] = dk[d];
            }
        }
        return;
    }
    workgroupBarrier();
    if lid == 0u {
        var ms = 0.0;
        for (var d = 0u; d < half; d++) {
            let x = keys[koff + d];
            ms += x * x;
        }
        let inv = 1.0 / sqrt(ms / f32(half) + EPS);
        var m = 0.0;
        for (var d = 0u; d < half; d++) {
            m += dk[d] * (keys[koff + d] * inv);
        }
        inv_shared = inv;
        mean_shared = m / f32(half);
    }
    workgroupBarrier();
    let inv = inv_shared;
    let mean = mean_shared;
    if valid {
        for (var d = lid; d < half; d += WG) {
            d_keys[koff + d] = inv * (dk[d] - (keys[koff + d] * inv) * mean);
        }
    }
}
