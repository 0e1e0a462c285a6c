// pk_qk_norm.wgsl — qk-norm of the product-key lookup: RMS-normalise rows.
//
// Computes, for every row r of a (rows, len) f32 matrix (sub-keys or query
// halves of memlayer_core::pkm with `qk_norm`):
//   ms     = (Σ_d x[r,d]²) / len            summed sequentially, d = 0, 1, …
//   inv    = 1 / sqrt(ms + eps)              eps = 1e-6 (pkm::QK_NORM_EPS)
//   y[r,d] = x[r,d] * inv
// exactly as the oracle's `rms_normalise` does it, in the same order, so that
// on an IEEE-exact device the result is bit-identical. Each product x² is
// multiplied by `one` (= 1.0, a uniform) before it is added: the compiler
// cannot see that this is a no-op, so it can only fuse the *outer* multiply
// into an FMA, and fma(round(x*x), 1, s) == round(round(x*x) + s) — the
// oracle's rounding — whether or not the driver contracts a*b+c into an FMA.
//
// Bindings (group 0):
//   0: params  uniform  { rows: u32, len: u32, x_groups: u32, eps: f32, one: f32 }
//   1: x       storage, read        array<f32>  (rows, len)
//   2: y       storage, read_write  array<f32>  (rows, len)
// Workgroup layout: 64 invocations, one row each (a sequential sum per row is
// what makes the result match the oracle bit for bit); grid (x_groups, y, 1),
// row = (wg.y * x_groups + wg.x) * 64 + lid.
// Limits: rows * len elements must fit one storage binding each for x and y.
// Cheap next to the scoring it feeds (len multiply-adds per row vs. tokens of them).

// `struct Params` is generated from the host struct (src/shaders.rs of
// memlayer-wgpu) and prepended to this file.

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = (wg.y * params.x_groups + wg.x) * 64u + lid;
    if r >= params.rows {
        return;
    }
    let base = r * params.len;
    var ss = 0.0;
    for (var d = 0u; d < params.len; d++) {
        let v = x[base + d];
        ss = ss + (v * v) * params.one;
    }
    let ms = ss / f32(params.len);
    let inv = 1.0 / sqrt(ms + params.eps);
    for (var d = 0u; d < params.len; d++) {
        y[base + d] = x[base + d] * inv;
    }
}
