// reverse_index_scan_add.wgsl — second half of the multi-level exclusive scan.
//
// Computes data[i] += sums[i / 1024] for i < n, where `data` holds per-block
// exclusive prefix sums (reverse_index_scan.wgsl) and `sums` the exclusive
// prefix sums of the block totals: afterwards `data` is the exclusive scan of
// the original words. Exact integer arithmetic.
//
// Bindings (group 0):
//   0: params  uniform  { n: u32, x_groups: u32 }
//   1: data    storage, read_write  array<u32>   (n)
//   2: sums    storage, read        array<u32>   (ceil(n / 1024))
// Workgroup layout: 256 invocations, one word each; grid (x_groups, y, 1),
// i = (wg.y * x_groups + wg.x) * 256 + lid.
// Limits: n * 4 bytes must fit one storage binding.

// `struct Params` is generated from the host struct (src/shaders.rs of
// memlayer-wgpu) and prepended to this file.

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> data: array<u32>;
@group(0) @binding(2) var<storage, read> sums: array<u32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = (wg.y * params.x_groups + wg.x) * 256u + lid;
    if i < params.n {
        data[i] += sums[i / 1024u];
    }
}
