// pk_scores.wgsl — product-key lookup, step 1: all sub-key scores of a batch
// of query halves (a tiled, bit-exact batched GEMM).
//
// Computes, for tokens t in [token0, token0 + batch), every head h, side
// (0 = first query half, 1 = second) and sub-key i < n_keys:
//   scores[((t - token0) * heads + h) * 2 + side, i]
//       = dot(keys[h, side, i, :], query[t, h, side*half .. (side+1)*half]) * scale
// exactly as memlayer_core::pkm::lookup does: each dot product is summed
// sequentially, d = 0, 1, …, half-1, in f32, and every product is multiplied
// by `one` (= 1.0 from the uniform) before it is added. The compiler cannot
// see that this is a no-op, so a driver that contracts a*b+c into an FMA can
// only fuse the outer multiply, and fma(round(q*k), 1, acc) ==
// round(round(q*k) + acc): the oracle's rounding. With IEEE f32 add/mul
// (required by Vulkan and WebGPU) the scores are bit-identical to the oracle.
// With qk-norm the caller passes keys and queries normalised by
// pk_qk_norm.wgsl and scale = 1/sqrt(half) (computed on the host exactly as
// PkmConfig::score_scale); otherwise scale = 1 (exact).
//
// Method: one workgroup computes a 32-token × 128-key tile of one (head,
// side). The dot products advance in steps of 8 dimensions: the 128 × 8 key
// slab and 32 × 8 query slab are staged in workgroup memory, transposed and
// packed as vec4 (4 consecutive keys / tokens of one dimension), so each
// step reads one vec4 of keys and one of tokens per invocation and adds 8
// products to each of its 4 tokens × 4 keys accumulators (an outer product
// per dimension). Keys are read from global memory once per 32 tokens
// instead of once per token; 2 barriers per step.
//
// Bindings (group 0):
//   0: params  uniform  Params (below)
//   1: keys    storage, read        array<f32>  (heads, 2, n_keys, half)
//   2: query   storage, read        array<f32>  (tokens, heads, 2 * half)
//   3: scores  storage, read_write  array<f32>  (batch, heads, 2, n_keys)
// Workgroup layout: 256 invocations = 8 token groups (ty) × 32 key groups
// (kx); invocation (ty, kx) owns tokens t0 + 4*ty + i and keys k0 + 4*kx + j,
// i, j = 0..3. Workgroups: key_tiles × token_tiles × heads × 2, linear id
// wid = wg.y * x_groups + wg.x, key tile = wid % key_tiles, token tile =
// (wid / key_tiles) % token_tiles, head/side = wid / (key_tiles * token_tiles).
// Workgroup storage: 5 KiB.
// Limits: keys, query and scores must each fit one binding (the host cuts
// the tokens into batches so that scores does).

// `struct Params` is generated from the host struct (src/shaders.rs of
// memlayer-wgpu) and prepended to this file.

const TK: u32 = 128u; // keys per tile
const TT: u32 = 32u;  // tokens per tile
const TD: u32 = 8u;   // dimensions per step

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> keys: array<f32>;
@group(0) @binding(2) var<storage, read> query: array<f32>;
@group(0) @binding(3) var<storage, read_write> scores: array<f32>;

var<workgroup> k_tile: array<vec4<f32>, 256>; // [dd * 32 + key / 4][key % 4]
var<workgroup> q_tile: array<vec4<f32>, 64>;   // [dd * 8 + token / 4][token % 4]

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let wid = wg.y * params.x_groups + wg.x;
    let tiles = params.key_tiles * params.token_tiles;
    if wid >= tiles * params.heads * 2u {
        return;
    }
    let k0 = (wid % params.key_tiles) * TK;
    let t0 = ((wid / params.key_tiles) % params.token_tiles) * TT;
    let hs = wid / tiles; // h * 2 + side
    let h = hs / 2u;
    let side = hs % 2u;
    let half = params.half;
    let n_keys = params.n_keys;
    let key_base = hs * n_keys; // first sub-key row of (h, side)
    let ty = lid / 32u;
    let kx = lid % 32u;

    // acc_i[j]: token t0 + 4*ty + i, key k0 + 4*kx + j (vectors, not arrays:
    // no dynamically indexed private memory)
    var acc0 = vec4<f32>();
    var acc1 = vec4<f32>();
    var acc2 = vec4<f32>();
    var acc3 = vec4<f32>();
    for (var d0 = 0u; d0 < half; d0 += TD) {
        // key slab: 128 keys × 8 dims, 4 loads per invocation (8 consecutive floats per key row)
        for (var e = 0u; e < 4u; e++) {
            let idx = lid + e * 256u;
            let key = idx / TD;
            let dd = idx % TD;
            var v = 0.0;
            if k0 + key < n_keys && d0 + dd < half {
                v = keys[(key_base + k0 + key) * half + d0 + dd];
            }
            k_tile[dd * 32u + key / 4u][key % 4u] = v;
        }
        // query slab: 32 tokens × 8 dims, 1 load per invocation
        {
            let tok = lid / TD;
            let dd = lid % TD;
            var v = 0.0;
            if t0 + tok < params.batch && d0 + dd < half {
                let t = params.token0 + t0 + tok;
                v = query[((t * params.heads + h) * 2u + side) * half + d0 + dd];
            }
            q_tile[dd * 8u + tok / 4u][tok % 4u] = v;
        }
        workgroupBarrier();
        let dn = min(TD, half - d0);
        for (var dd = 0u; dd < dn; dd++) {
            let kv = k_tile[dd * 32u + kx];
            let qv = q_tile[dd * 8u + ty];
            // (q * k) * one: the product is rounded before it is added, FMA or not
            acc0 = acc0 + (qv.x * kv) * params.one;
            acc1 = acc1 + (qv.y * kv) * params.one;
            acc2 = acc2 + (qv.z * kv) * params.one;
            acc3 = acc3 + (qv.w * kv) * params.one;
        }
        workgroupBarrier();
    }

    let accs = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
    for (var i = 0u; i < 4u; i++) {
        let tok = t0 + ty * 4u + i;
        if tok >= params.batch {
            continue;
        }
        let row = (tok * params.heads + h) * 2u + side;
        let acc = accs[i];
        for (var j = 0u; j < 4u; j++) {
            let key = k0 + kx * 4u + j;
            if key < n_keys {
                scores[row * n_keys + key] = acc[j] * params.scale;
            }
        }
    }
}
