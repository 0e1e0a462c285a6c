// copy.wgsl — the bandwidth ceiling of an adapter.
//
// Computes: dst[i] = src[i] for i in [0, n_vec4), one vec4<u32> (16 bytes) per
// invocation. A gather (embedding-bag) on the same adapter can at best read
// as fast as this kernel copies, so benchmarks report gather bandwidth as a
// fraction of it.
//
// Bindings (group 0):
//   0: params  uniform  { n_vec4: u32, x_groups: u32 }
//   1: src     storage, read        array<vec4<u32>>   (n_vec4)
//   2: dst     storage, read_write  array<vec4<u32>>   (n_vec4)
// Workgroup layout: 256 invocations in x; the dispatch grid is (x_groups, y, 1)
// so more than 65535 workgroups fit; linear id = (wg.y * x_groups + wg.x) * 256 + lid.
// Limits: n_vec4 * 16 bytes must fit one storage binding.

// `struct Params` is generated from the host struct (src/shaders.rs of
// memlayer-wgpu) and prepended to this file.

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read_write> dst: array<vec4<u32>>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = (wg.y * params.x_groups + wg.x) * 256u + lid;
    if i < params.n_vec4 {
        dst[i] = src[i];
    }
}
