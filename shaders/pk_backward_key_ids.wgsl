// pk_backward_key_ids.wgsl — the sub-key ids read by every selected score.
//
// Computes, for every selected row (token t, head h, slot j) and side s in
// {0, 1}, the id of the sub-key its score came from:
//   p = ((t * heads + h) * 2 + s) * knn + j
//   key_ids[p] = (h * 2 + s) * n_keys + (s == 0 ? row / n_keys : row % n_keys),
//   row = indices[(t * heads + h) * knn + j]
// i.e. the row of `keys` viewed as (heads * 2 * n_keys, half). The reverse
// index of key_ids (reverse_index_*.wgsl) groups, per sub-key, its entries p
// in ascending p — for one (head, side) that is ascending (token, j), the
// order the CPU oracle (`pkm::scores_backward`) accumulates key gradients in.
//
// Bindings (group 0):
//   0: params   uniform  { th: u32 (tokens * heads), heads: u32, n_keys: u32, knn: u32, x_groups: u32 }
//   1: indices  storage, read        array<u32> (th, knn) selected rows < n_keys²
//   2: key_ids  storage, read_write  array<u32> (th, 2, knn)
// Workgroup layout: 256 invocations, one p each; grid (x_groups, y, 1),
// p = (wg.y * x_groups + wg.x) * 256 + lid.
// Limits: th * 2 * knn * 4 bytes must fit one storage binding.

// `struct Params` is generated from the host struct (src/shaders.rs of
// memlayer-wgpu) and prepended to this file.

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> indices: array<u32>;
@group(0) @binding(2) var<storage, read_write> key_ids: array<u32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let p = (wg.y * params.x_groups + wg.x) * 256u + lid;
    if p >= params.th * 2u * params.knn {
        return;
    }
    let j = p % params.knn;
    let side = (p / params.knn) % 2u;
    let th = p / (2u * params.knn);
    let h = th % params.heads;
    let row = indices[th * params.knn + j];
    var key = row / params.n_keys;
    if side == 1u {
        key = row % params.n_keys;
    }
    key_ids[p] = (h * 2u + side) * params.n_keys + key;
}
