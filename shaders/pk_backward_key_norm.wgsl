// pk_backward_key_norm.wgsl — qk-norm of the sub-keys, for the lookup backward.
//
// Computes, for each sub-key row r of (heads, 2, n_keys) rows of width half
// (CPU oracle: `pkm` rms_normalise with eps 1e-6, no learned scale):
//   ms = (Σ_d keys[r, d]^2) / half        (sequential, from 0.0)
//   inv = 1 / sqrt(ms + 1e-6);  keys_s[r, d] = keys[r, d] * inv
// keys_s are the sub-keys as scored; pk_backward_query.wgsl reads them. Only
// dispatched when qk-norm is on (otherwise the raw keys are the scored keys).
//
// Bindings (group 0):
//   0: params  uniform  { rows: u32, half: u32, x_groups: u32 }
//   1: keys    storage, read        array<f32> (rows, half)
//   2: keys_s  storage, read_write  array<f32> (rows, half)
// Workgroup layout: 64 invocations, one row each; grid (x_groups, y, 1),
// r = (wg.y * x_groups + wg.x) * 64 + lid.
// Limits: rows * half * 4 bytes must fit one storage binding.

const EPS: f32 = 1e-6;

// `struct Params` is generated from the host struct (src/shaders.rs of
// memlayer-wgpu) and prepended to this file.

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> keys: array<f32>;
@group(0) @binding(2) var<storage, read_write> keys_s: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = (wg.y * params.x_groups + wg.x) * 64u + lid;
    if r >= params.rows {
        return;
    }
    let off = r * params.half;
    var ms = 0.0;
    for (var d = 0u; d < params.half; d++) {
        let x = keys[off + d];
        ms += x * x;
    }
    let inv = 1.0 / sqrt(ms / f32(params.half) + EPS);
    for (var d = 0u; d < params.half; d++) {
        keys_s[off + d] = keys[off + d] * inv;
    }
}
