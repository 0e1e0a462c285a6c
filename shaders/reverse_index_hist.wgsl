// reverse_index_hist.wgsl — digit histogram of one LSD radix-sort pass.
//
// Part of the deterministic reverse index (see reverse_index_scatter.wgsl for
// the whole scheme). Computes, for block b of 256 consecutive keys and each
// 8-bit digit d = (key >> shift) & 255, the number of keys of the block with
// that digit: hist[d * n_blocks + b]. The layout is digit-major so that one
// exclusive scan over `hist` (reverse_index_scan*.wgsl) gives every
// (digit, block) pair its first output slot in a stable sort.
//
// Bindings (group 0):
//   0: params  uniform  { n: u32, shift: u32, n_blocks: u32, x_groups: u32 }
//   1: keys    storage, read        array<u32>   (n)
//   2: hist    storage, read_write  array<u32>   (256 * n_blocks), every word written
// Shapes: n keys (any u32 values), n_blocks = ceil(n / 256).
// Workgroup layout: 256 invocations = one block, one key each; the grid is
// (x_groups, y, 1) with block = wg.y * x_groups + wg.x (more than 65535 blocks fit).
// Counting uses workgroup atomic<u32> (integer atomics only: exact and
// order-independent). Limits: n * 4 bytes must fit one storage binding.

// `struct Params` is generated from the host struct (src/shaders.rs of
// memlayer-wgpu) and prepended to this file.

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> keys: array<u32>;
@group(0) @binding(2) var<storage, read_write> hist: array<u32>;

var<workgroup> counts: array<atomic<u32>, 256>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let block = wg.y * params.x_groups + wg.x;
    if block >= params.n_blocks {
        return;
    }
    atomicStore(&counts[lid], 0u);
    workgroupBarrier();
    let i = block * 256u + lid;
    if i < params.n {
        atomicAdd(&counts[(keys[i] >> params.shift) & 255u], 1u);
    }
    workgroupBarrier();
    hist[lid * params.n_blocks + block] = atomicLoad(&counts[lid]);
}
