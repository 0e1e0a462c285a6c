// bag_backward_table.wgsl — sparse table gradient of the embedding-bag (sum
// mode, per-sample weights), deterministic, without float atomics.
//
// Computes, for every distinct touched row u (ascending, unique: the
// `SparseRows` of the CPU oracle `bag::bag_backward_table`):
//   out[u - slot_base, d] = Σ_{e in entries of row u, ascending e} weights[e] * grad_out[bag_of[e], d]
// i.e. the scatter-add dtable[indices[e]] += weights[e] * grad_out[bag(e)]
// written as a gather per row.
//
// Scheme and why: WGSL has no float atomics, and a scatter-add through
// compare-and-swap loops on the u32 bits of the accumulator adds the
// contributions of a row in whatever order threads win the race, so its
// rounding (hence its bits) changes from run to run. Instead the entries are
// first grouped by row with a deterministic reverse index built on the GPU
// (reverse_index_*.wgsl: a stable LSD radix sort of the n entry ids with
// integer-only histogram/scan/scatter, then segment heads and a compacted
// CSR — O(n) memory whatever the id range N; Meta's `reverse_indices`). Each
// row's entries come out in ascending entry position, and this kernel sums
// them in exactly that order, one invocation per (row, element) with a
// sequential f32 accumulator starting at 0.0: the same sequence of f32
// operations as the oracle, so the result can equal it bit for bit (when the
// driver does not contract `acc + w * g` into an fma; see tests/backward.rs).
//
// Bindings (group 0):
//   0: params          uniform  { dim, slot_base, slots, x_groups: u32 }
//   1: seg_start       storage, read   array<u32> (n + 1) CSR of the reverse index:
//                      row slot u owns sorted positions seg_start[u] .. seg_start[u + 1];
//                      words past the last valid one are 0 (so end <= start marks a free slot)
//   2: sorted_entries  storage, read   array<u32> (n) entry position of each sorted position
//   3: bag_of          storage, read   array<u32> (n) bag of each entry
//   4: weights         storage, read   array<f32> (n) per-sample weights
//   5: grad_out        storage, read   array<f32> (bags, dim)
//   6: out             storage, read_write array<f32> (slots, dim): one shard of the
//                      gradient rows, holding row slots slot_base .. slot_base + slots
// Workgroup layout: 256 invocations over consecutive (slot, element quad)
// pairs: invocation t = (wg.y * x_groups + wg.x) * 256 + lid handles slot
// slot_base + t / quads and elements 4 * (t % quads) .. + 4, quads =
// ceil(dim / 4) (a vec4 of four independent per-element sums, rounded per
// component; one load of the entry, weight and bag serves four elements).
// Reads of grad_out are coalesced; invocations of one row read its entry
// list uniformly. Elements past dim in the last quad are computed from
// in-bounds scratch and never stored.
// A row selected by every entry (hot row) is summed by `dim` invocations, each
// over all n entries in order: that serial chain is the price of a
// reproducible, oracle-exact order.
// Limits: (slots * dim) * 4 bytes must fit one binding (the host shards the
// output across buffers of ctx.max_binding_bytes() and dispatches per shard).

// `struct Params` is generated from the host struct (src/shaders.rs of
// memlayer-wgpu) and prepended to this file.

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> seg_start: array<u32>;
@group(0) @binding(2) var<storage, read> sorted_entries: array<u32>;
@group(0) @binding(3) var<storage, read> bag_of: array<u32>;
@group(0) @binding(4) var<storage, read> weights: array<f32>;
@group(0) @binding(5) var<storage, read> grad_out: array<f32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = (wg.y * params.x_groups + wg.x) * 256u + lid;
    let quads = (params.dim + 3u) / 4u;
    let local_slot = t / quads;
    let d = (t % quads) * 4u;
    if local_slot >= params.slots {
        return;
    }
    let u = params.slot_base + local_slot;
    let start = seg_start[u];
    let end = seg_start[u + 1u];
    if end <= start {
        return;
    }
    var acc = vec4<f32>(0.0);
    for (var p = start; p < end; p++) {
        let e = sorted_entries[p];
        let g = bag_of[e] * params.dim + d;
        acc += weights[e] * vec4<f32>(grad_out[g], grad_out[g + 1u], grad_out[g + 2u], grad_out[g + 3u]);
    }
    let o = local_slot * params.dim + d;
    out[o] = acc.x;
    if d + 1u < params.dim {
        out[o + 1u] = acc.y;
    }
    if d + 2u < params.dim {
        out[o + 2u] = acc.z;
    }
    if d + 3u < params.dim {
        out[o + 3u] = acc.w;
    }
}
