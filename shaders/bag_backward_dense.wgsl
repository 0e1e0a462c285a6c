// bag_backward_dense.wgsl — the embedding-bag table gradient as a dense
// (rows, dim) tensor, from the sparse rows bag_backward_table.wgsl wrote.
//
// Computes, for every row slot u < count (the reverse index's number of
// distinct rows) and element d < dim:
//   dense[unique_ids[u], d] = sparse[u, d]
// Rows no entry selected are not written: the caller hands a zeroed tensor.
// A framework's autodiff (burn) wants the gradient of a parameter in the
// parameter's own shape; this copy is the only dense work of the backward
// (the sums themselves stay O(entries × dim), see bag_backward_table.wgsl).
// Pure copies: the result is bit-identical to the sparse rows.
//
// Bindings (group 0):
//   0: params      uniform  { dim: u32, slots: u32, x_groups: u32 }
//   1: count       storage, read        array<u32>  (1) distinct rows (reverse_index_compact.wgsl)
//   2: unique_ids  storage, read        array<u32>  (slots) row id of each slot, ascending
//   3: sparse      storage, read        array<f32>  (slots, dim)
//   4: dense       storage, read_write  array<f32>  (rows, dim)
// Workgroup layout: 256 invocations, one element each,
// t = (wg.y * x_groups + wg.x) * 256 + lid, slot = t / dim, d = t % dim.
// Limits: slots * dim and rows * dim < 2^32; sparse and dense must each fit one binding.

// `struct Params` is generated from the host struct (src/shaders.rs of
// memlayer-wgpu) and prepended to this file.

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> count: array<u32>;
@group(0) @binding(2) var<storage, read> unique_ids: array<u32>;
@group(0) @binding(3) var<storage, read> sparse: array<f32>;
@group(0) @binding(4) var<storage, read_write> dense: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = (wg.y * params.x_groups + wg.x) * 256u + lid;
    if t >= params.slots * params.dim {
        return;
    }
    let slot = t / params.dim;
    if slot >= count[0] {
        return;
    }
    let d = t - slot * params.dim;
    dense[unique_ids[slot] * params.dim + d] = sparse[t];
}
