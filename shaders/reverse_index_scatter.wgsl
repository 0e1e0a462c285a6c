// reverse_index_scatter.wgsl — stable scatter of one LSD radix-sort pass.
//
// The reverse index. Given n entry ids (`indices` of an embedding-bag, or
// sub-key ids of the product-key lookup), memlayer builds on the GPU the list
// of (id, entry) pairs sorted by id and, among equal ids, by ascending entry
// position — Meta's `reverse_indices` order, which is the order the CPU oracle
// sums gradients in. Scheme: a least-significant-digit radix sort of the n
// ids, 8 bits a pass, ceil(bits(id_range - 1) / 8) passes (1 pass for 256
// rows, 3 for n_keys = 4096, 4 for full u32 ids). Each pass: per-block digit
// histogram (reverse_index_hist.wgsl), exclusive scan of the digit-major
// histogram (reverse_index_scan*.wgsl), and this stable scatter. It costs
// O(n) memory and O(n * passes) work, independent of the id range N (no
// O(N) per-id counters, so N = 2^24 or 2^32 costs the same memory as N = 256).
//
// Determinism: every step is integer arithmetic with a fixed result. The
// initial order is the entry order; each pass is stable, because an element's
// slot is its block's first slot for its digit (from the scan) plus the
// number of elements *before it in the same block* with the same digit,
// counted by a plain loop over the block's digits in workgroup memory (no
// atomics decide an order). So the output is sorted by (id, entry) whatever
// the scheduling. (A scatter-add through compare-and-swap loops on u32 bit
// patterns would add floats in whatever order threads win the race: not
// reproducible, which is why the gradients are gathered per id instead.)
//
// Computes, for i < n: with d = (keys_in[i] >> shift) & 255 and block b = i / 256,
//   slot = offsets[d * n_blocks + b] + #{ j in block b, j < i : digit(j) == d }
//   keys_out[slot] = keys_in[i];  vals_out[slot] = first_pass ? i : vals_in[i]
//
// Bindings (group 0):
//   0: params    uniform  { n, shift, n_blocks, x_groups, first_pass: u32 }
//   1: keys_in   storage, read        array<u32>   (n)
//   2: vals_in   storage, read        array<u32>   (n; unread on the first pass)
//   3: offsets   storage, read        array<u32>   (256 * n_blocks) scanned histogram
//   4: keys_out  storage, read_write  array<u32>   (n)
//   5: vals_out  storage, read_write  array<u32>   (n) entry positions
// Workgroup layout: 256 invocations = one block, one element each; grid
// (x_groups, y, 1), block = wg.y * x_groups + wg.x. The rank loop is at most
// 255 reads of workgroup memory per element.
// Limits: n * 4 bytes must fit one storage binding.

// `struct Params` is generated from the host struct (src/shaders.rs of
// memlayer-wgpu) and prepended to this file.

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> keys_in: array<u32>;
@group(0) @binding(2) var<storage, read> vals_in: array<u32>;
@group(0) @binding(3) var<storage, read> offsets: array<u32>;
@group(0) @binding(4) var<storage, read_write> keys_out: array<u32>;
@group(0) @binding(5) var<storage, read_write> vals_out: array<u32>;

var<workgroup> digits: array<u32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let block = wg.y * params.x_groups + wg.x;
    if block >= params.n_blocks {
        return;
    }
    let i = block * 256u + lid;
    var key = 0u;
    var d = 0xffffffffu; // never equal to a real digit
    if i < params.n {
        key = keys_in[i];
        d = (key >> params.shift) & 255u;
    }
    digits[lid] = d;
    workgroupBarrier();
    if i < params.n {
        var rank = 0u;
        for (var j = 0u; j < lid; j++) {
            rank += select(0u, 1u, digits[j] == d);
        }
        let slot = offsets[d * params.n_blocks + block] + rank;
        keys_out[slot] = key;
        var val = i;
        if params.first_pass == 0u {
            val = vals_in[i];
        }
        vals_out[slot] = val;
    }
}
