// reverse_index_scan.wgsl — block-wise exclusive prefix sum of u32 words.
//
// Computes, in place, the exclusive prefix sum of each block of 1024
// consecutive words of `data` (data[i] = Σ data[j] for block start <= j < i)
// and writes each block's total to sums[block]. The host scans `sums` the same
// way (recursively, until one block remains) and then adds the scanned block
// sums back with reverse_index_scan_add.wgsl: a full exclusive scan of any
// length. Integer addition is associative, so the result is exact and
// independent of scheduling.
//
// Bindings (group 0):
//   0: params  uniform  { n: u32, x_groups: u32 }
//   1: data    storage, read_write  array<u32>   (n)
//   2: sums    storage, read_write  array<u32>   (ceil(n / 1024))
// Workgroup layout: 256 invocations, 4 consecutive words each (a block of
// 1024); a Hillis-Steele scan of the 256 per-invocation sums in workgroup
// memory. Grid (x_groups, y, 1), block = wg.y * x_groups + wg.x.
// Limits: totals must fit u32 (they count entries, n < 2^32).

// `struct Params` is generated from the host struct (src/shaders.rs of
// memlayer-wgpu) and prepended to this file.

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> data: array<u32>;
@group(0) @binding(2) var<storage, read_write> sums: array<u32>;

var<workgroup> partial: array<u32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let block = wg.y * params.x_groups + wg.x;
    let n_blocks = (params.n + 1023u) / 1024u;
    if block >= n_blocks {
        return;
    }
    let base = block * 1024u + lid * 4u;
    var v: array<u32, 4>;
    var own = 0u;
    for (var k = 0u; k < 4u; k++) {
        v[k] = select(0u, data[base + k], base + k < params.n);
        own += v[k];
    }
    partial[lid] = own;
    workgroupBarrier();
    for (var off = 1u; off < 256u; off <<= 1u) {
        var t = 0u;
        if lid >= off {
            t = partial[lid - off];
        }
        workgroupBarrier();
        partial[lid] += t;
        workgroupBarrier();
    }
    var run = partial[lid] - own;
    for (var k = 0u; k < 4u; k++) {
        if base + k < params.n {
            data[base + k] = run;
        }
        run += v[k];
    }
    if lid == 255u {
        sums[block] = partial[255];
    }
}
