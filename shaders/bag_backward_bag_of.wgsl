// bag_backward_bag_of.wgsl — the bag of every embedding-bag entry.
//
// Computes bag_of[e] = the bag b with offsets[b] <= e < offsets[b + 1], for
// e < n, by binary search over the CSR offsets (the largest b < bags with
// offsets[b] <= e; empty bags, offsets[b] == offsets[b + 1], are skipped
// naturally). The gradient kernels (bag_backward_table.wgsl,
// bag_backward_weights.wgsl) read it to find grad_out's row for an entry.
//
// Bindings (group 0):
//   0: params   uniform  { n: u32, bags: u32, x_groups: u32 }
//   1: offsets  storage, read        array<u32>   (bags + 1), offsets[0] = 0,
//                                    offsets[bags] = n, non-decreasing (host-validated)
//   2: bag_of   storage, read_write  array<u32>   (n)
// Workgroup layout: 256 invocations, one entry each; grid (x_groups, y, 1),
// e = (wg.y * x_groups + wg.x) * 256 + lid. ceil(log2(bags)) reads per entry.
// Limits: (bags + 1) * 4 and n * 4 bytes must each fit one storage binding; bags >= 1.

// `struct Params` is generated from the host struct (src/shaders.rs of
// memlayer-wgpu) and prepended to this file.

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> offsets: array<u32>;
@group(0) @binding(2) var<storage, read_write> bag_of: array<u32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let e = (wg.y * params.x_groups + wg.x) * 256u + lid;
    if e >= params.n {
        return;
    }
    // invariant: offsets[lo] <= e < offsets[hi]
    var lo = 0u;
    var hi = params.bags;
    while hi - lo > 1u {
        let mid = lo + (hi - lo) / 2u;
        if offsets[mid] <= e {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    bag_of[e] = lo;
}
