// reverse_index_heads.wgsl — segment heads of a sorted id list.
//
// Computes heads[i] = 1 if i == 0 or sorted[i] != sorted[i - 1], else 0, for
// i < n: the first sorted position of every distinct id. An exclusive scan of
// `heads` (reverse_index_scan*.wgsl) then numbers the distinct ids, and
// reverse_index_compact.wgsl writes the CSR of the reverse index.
//
// Bindings (group 0):
//   0: params  uniform  { n: u32, x_groups: u32 }
//   1: sorted  storage, read        array<u32>   (n) ids, ascending
//   2: heads   storage, read_write  array<u32>   (n)
// Workgroup layout: 256 invocations, one position each; grid (x_groups, y, 1),
// i = (wg.y * x_groups + wg.x) * 256 + lid.
// Limits: n * 4 bytes must fit one storage binding.

// `struct Params` is generated from the host struct (src/shaders.rs of
// memlayer-wgpu) and prepended to this file.

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> sorted: array<u32>;
@group(0) @binding(2) var<storage, read_write> heads: array<u32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = (wg.y * params.x_groups + wg.x) * 256u + lid;
    if i < params.n {
        var head = 1u;
        if i > 0u && sorted[i] == sorted[i - 1u] {
            head = 0u;
        }
        heads[i] = head;
    }
}
