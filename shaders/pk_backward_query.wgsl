// pk_backward_query.wgsl — query gradient of the product-key lookup.
//
// Computes, for each (token t, head h) = th and side s (CPU oracle:
// `pkm::scores_backward`, query part), with q = query[th, s*half .. (s+1)*half]:
//   qs = q * inv_q, inv_q = 1/sqrt(Σ q²/half + 1e-6)   if qk_norm, else qs = q
//   dqs[d] = Σ_{j ascending, g_j != 0} g_j * keys_s[(h,s,key_j), d],
//            g_j = d_scores[th, j] * scale, key_j = s == 0 ? row_j / n_keys : row_j % n_keys
//   d_query[th, s-half] = inv_q * (dqs - qs * mean), mean = (Σ_d dqs[d] qs[d]) / half   if qk_norm
//                       = dqs                                                          else
// and stores qs (the query half as scored) for pk_backward_keys.wgsl.
// scale = 1/sqrt(half) with qk-norm, else 1. Every reduction is sequential in
// the oracle's order (sums of squares and the mean dot by invocation 0,
// dqs[d] over j by the invocation owning d), so the results can equal the
// oracle bit for bit when the driver rounds sqrt, division and a*b+c as
// IEEE f32 does.
//
// Bindings (group 0):
//   0: params    uniform  { th, heads, n_keys, half, k_dim, knn, qk_norm: u32, scale: f32, x_groups: u32 }
//   1: query     storage, read        array<f32> (th, k_dim), k_dim = 2 * half
//   2: keys_s    storage, read        array<f32> (heads, 2, n_keys, half) scored sub-keys
//                (pk_backward_key_norm.wgsl output with qk-norm, the raw keys without)
//   3: indices   storage, read        array<u32> (th, knn) selected rows
//   4: d_scores  storage, read        array<f32> (th, knn) (pk_backward_softmax.wgsl)
//   5: qs_out    storage, read_write  array<f32> (th, k_dim)
//   6: d_query   storage, read_write  array<f32> (th, k_dim)
// Workgroup layout: 64 invocations per (th, side), element d handled by
// invocation d % 64; workgroup w = wg.y * x_groups + wg.x is (th, side) = (w / 2, w % 2).
// The knn selected rows are taken in chunks of 64, each prepared once in
// workgroup memory (g_j and the sub-key offset), so the inner loop has no
// integer division; an invocation accumulates four consecutive elements
// (a vec4 of independent per-element sums, rounded per component). Workgroup memory: two arrays of MAX_HALF f32 and two of
// 64 words (8.5 KiB).
// Limits: half <= MAX_HALF = 1024 (host-checked); every array fits one binding.

const WG: u32 = 64u;
const MAX_HALF: u32 = 1024u;
const EPS: f32 = 1e-6;

// `struct Params` is generated from the host struct (src/shaders.rs of
// memlayer-wgpu) and prepended to this file.

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> query: array<f32>;
@group(0) @binding(2) var<storage, read> keys_s: array<f32>;
@group(0) @binding(3) var<storage, read> indices: array<u32>;
@group(0) @binding(4) var<storage, read> d_scores: array<f32>;
@group(0) @binding(5) var<storage, read_write> qs_out: array<f32>;
@group(0) @binding(6) var<storage, read_write> d_query: array<f32>;

var<workgroup> qv: array<f32, MAX_HALF>;
var<workgroup> dq: array<f32, MAX_HALF>;
var<workgroup> g_sh: array<f32, WG>;
var<workgroup> koff_sh: array<u32, WG>;
var<workgroup> inv_shared: f32;
var<workgroup> mean_shared: f32;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let w = wg.y * params.x_groups + wg.x;
    if w >= params.th * 2u {
        return;
    }
    let th = w / 2u;
    let side = w % 2u;
    let h = th % params.heads;
    let half = params.half;
    let qoff = th * params.k_dim + side * half;
    for (var d = lid; d < half; d += WG) {
        qv[d] = query[qoff + d];
    }
    workgroupBarrier();
    if lid == 0u {
        var inv = 1.0;
        if params.qk_norm != 0u {
            var ms = 0.0;
            for (var d = 0u; d < half; d++) {
                ms += qv[d] * qv[d];
            }
            inv = 1.0 / sqrt(ms / f32(half) + EPS);
        }
        inv_shared = inv;
    }
    workgroupBarrier();
    let inv = inv_shared;
    let kbase = (h * 2u + side) * params.n_keys;
    let sbase = th * params.knn;
    for (var d = lid; d < half; d += WG) {
        var q = qv[d];
        if params.qk_norm != 0u {
            q = q * inv;
            qv[d] = q;
        }
        qs_out[qoff + d] = q;
    }
    for (var d = lid; d < MAX_HALF; d += WG) {
        dq[d] = 0.0;
    }
    // the selected rows in chunks of WG: invocation lid prepares slot j0 + lid
    // (score gradient and sub-key offset, one division per slot), then every
    // invocation adds the chunk's slots, in ascending j, to its elements
    for (var j0 = 0u; j0 < params.knn; j0 += WG) {
        let j = j0 + lid;
        if j < params.knn {
            g_sh[lid] = d_scores[sbase + j] * params.scale;
            let row = indices[sbase + j];
            var key = row / params.n_keys;
            if side == 1u {
                key = row % params.n_keys;
            }
            koff_sh[lid] = (kbase + key) * half;
        }
        workgroupBarrier();
        let m = min(WG, params.knn - j0);
        // four consecutive elements per invocation and step (amortises the
        // loads of g and the offset); lanes past `half` compute scratch that
        // is never stored (reads stay within bounds-checked buffers)
        for (var q0 = lid * 4u; q0 < half; q0 += WG * 4u) {
            var acc = vec4<f32>(dq[q0], dq[q0 + 1u], dq[q0 + 2u], dq[q0 + 3u]);
            for (var jj = 0u; jj < m; jj++) {
                let g = g_sh[jj];
                if g == 0.0 {
                    continue;
                }
                let k = koff_sh[jj] + q0;
                acc += g * vec4<f32>(keys_s[k], keys_s[k + 1u], keys_s[k + 2u], keys_s[k + 3u]);
            }
            dq[q0] = acc.x;
            dq[q0 + 1u] = acc.y;
            dq[q0 + 2u] = acc.z;
            dq[q0 + 3u] = acc.w;
        }
        workgroupBarrier();
    }
    if lid == 0u {
        var m = 0.0;
        if params.qk_norm != 0u {
            for (var d = 0u; d < half; d++) {
                m += dq[d] * qv[d];
            }
            m = m / f32(half);
        }
        mean_shared = m;
    }
    workgroupBarrier();
    let mean = mean_shared;
    for (var d = lid; d < half; d += WG) {
        if params.qk_norm != 0u {
            d_query[qoff + d] = inv * (dq[d] - qv[d] * mean);
        } else {
            d_query[qoff + d] = dq[d];
        }
    }
}
