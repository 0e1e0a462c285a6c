// pk_backward_softmax.wgsl — softmax backward over each (token, head) row.
//
// Computes, for each row r of knn selected scores (CPU oracle:
// `pkm::softmax_backward_rows`):
//   inner = Σ_j w[r, j] * dw[r, j]               (sequential over j, from 0.0)
//   d_scores[r, j] = w[r, j] * (dw[r, j] - inner)
// w are the softmax weights of the forward, dw the gradient of the loss with
// respect to them (the per-sample-weight gradient of the embedding-bag).
// One invocation per row does the oracle's sequence of f32 operations.
//
// Bindings (group 0):
//   0: params     uniform  { rows: u32, knn: u32, x_groups: u32 }
//   1: weights    storage, read        array<f32> (rows, knn)
//   2: d_weights  storage, read        array<f32> (rows, knn)
//   3: d_scores   storage, read_write  array<f32> (rows, knn)
// Shapes: rows = tokens * heads.
// Workgroup layout: 64 invocations, one row each; grid (x_groups, y, 1),
// r = (wg.y * x_groups + wg.x) * 64 + lid.
// Limits: rows * knn * 4 bytes must fit one storage binding.

// `struct Params` is generated from the host struct (src/shaders.rs of
// memlayer-wgpu) and prepended to this file.

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> weights: array<f32>;
@group(0) @binding(2) var<storage, read> d_weights: array<f32>;
@group(0) @binding(3) var<storage, read_write> d_scores: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = (wg.y * params.x_groups + wg.x) * 64u + lid;
    if r >= params.rows {
        return;
    }
    let base = r * params.knn;
    var inner = 0.0;
    for (var j = 0u; j < params.knn; j++) {
        inner += weights[base + j] * d_weights[base + j];
    }
    for (var j = 0u; j < params.knn; j++) {
        d_scores[base + j] = weights[base + j] * (d_weights[base + j] - inner);
    }
}
