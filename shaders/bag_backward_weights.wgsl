// bag_backward_weights.wgsl — per-sample-weight gradient of the embedding-bag.
//
// Computes dw[e] = dot(table[indices[e]], grad_out[bag(e)]) for the entries
// whose row lies in one shard of a sharded table (CPU oracle:
// `bag::bag_backward_weights`). The dot product is one invocation's
// sequential f32 sum over d = 0 .. dim starting at 0.0, the oracle's order
// (`linalg::dot`), so results can equal the oracle bit for bit (f16 rows are
// widened exactly with unpack2x16float first).
//
// Sharding: a table larger than one storage binding is split across buffers
// (ShardedTable: shard s holds rows [first_row, first_row + shard_rows)), and
// WGSL cannot index an array of buffers, so the host dispatches this kernel
// once per shard with that shard bound; an entry is computed by the dispatch
// of the shard holding its row, so any number of shards works. Invocations
// walk the entries in reverse-index order (sorted by row, see
// reverse_index_scatter.wgsl), so neighbouring invocations read the same or
// nearby rows and an entry outside the shard exits at once.
//
// Bindings (group 0):
//   0: params          uniform  { n, dim, row_words, first_row, shard_rows, x_groups: u32 }
//   1: sorted_ids      storage, read  array<u32> (n) row of each sorted position
//   2: sorted_entries  storage, read  array<u32> (n) entry of each sorted position
//   3: bag_of          storage, read  array<u32> (n)
//   4: grad_out        storage, read  array<f32> (bags, dim)
//   5: table           storage, read  array<u32> (shard_rows, row_words): f32 bits, or
//                      with F16 two IEEE halves per word (low half first, odd dim padded)
//   6: dw              storage, read_write array<f32> (n)
// Override: F16 (bool) — the table stores f16 pairs instead of f32.
// Workgroup layout: 64 invocations, one sorted position each; grid (x_groups, y, 1),
// p = (wg.y * x_groups + wg.x) * 64 + lid.
// Limits: one shard and each other array must fit one storage binding.

override F16: bool = false;

// `struct Params` is generated from the host struct (src/shaders.rs of
// memlayer-wgpu) and prepended to this file.

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> sorted_ids: array<u32>;
@group(0) @binding(2) var<storage, read> sorted_entries: array<u32>;
@group(0) @binding(3) var<storage, read> bag_of: array<u32>;
@group(0) @binding(4) var<storage, read> grad_out: array<f32>;
@group(0) @binding(5) var<storage, read> table: array<u32>;
@group(0) @binding(6) var<storage, read_write> dw: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let p = (wg.y * params.x_groups + wg.x) * 64u + lid;
    if p >= params.n {
        return;
    }
    let row = sorted_ids[p];
    if row < params.first_row || row - params.first_row >= params.shard_rows {
        return;
    }
    let e = sorted_entries[p];
    let t = (row - params.first_row) * params.row_words;
    let g = bag_of[e] * params.dim;
    var acc = 0.0;
    if F16 {
        let pairs = params.dim / 2u;
        for (var i = 0u; i < pairs; i++) {
            let v = unpack2x16float(table[t + i]);
            acc += v.x * grad_out[g + 2u * i];
            acc += v.y * grad_out[g + 2u * i + 1u];
        }
        if (params.dim & 1u) == 1u {
            acc += unpack2x16float(table[t + pairs]).x * grad_out[g + params.dim - 1u];
        }
    } else {
        for (var d = 0u; d < params.dim; d++) {
            acc += bitcast<f32>(table[t + d]) * grad_out[g + d];
        }
    }
    dw[e] = acc;
}
