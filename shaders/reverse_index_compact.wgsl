// reverse_index_compact.wgsl — CSR of the reverse index from the segment heads.
//
// Computes, from the ascending ids `sorted` and `slot` = exclusive scan of the
// segment heads (reverse_index_heads.wgsl + scan), for every position i < n
// that starts a segment (i == 0 or sorted[i] != sorted[i - 1]):
//   unique_ids[slot[i]] = sorted[i];  seg_start[slot[i]] = i
// and at i = n - 1: count = slot[i] + head(i);  seg_start[count] = n;
// count_out[0] = count. So distinct id u (ascending, unique) owns the sorted
// positions seg_start[u] .. seg_start[u + 1], whose entries (vals of the sort)
// ascend. Integer only; deterministic.
//
// Bindings (group 0):
//   0: params      uniform  { n: u32, x_groups: u32 }
//   1: sorted      storage, read        array<u32>   (n)
//   2: slot        storage, read        array<u32>   (n)
//   3: unique_ids  storage, read_write  array<u32>   (n; first count valid)
//   4: seg_start   storage, read_write  array<u32>   (n + 1; first count + 1 valid)
//   5: count_out   storage, read_write  array<u32>   (1): count of distinct ids
// Workgroup layout: 256 invocations, one position each; grid (x_groups, y, 1),
// i = (wg.y * x_groups + wg.x) * 256 + lid.
// Limits: (n + 1) * 4 bytes must fit one storage binding; n >= 1.

// `struct Params` is generated from the host struct (src/shaders.rs of
// memlayer-wgpu) and prepended to this file.

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> sorted: array<u32>;
@group(0) @binding(2) var<storage, read> slot: array<u32>;
@group(0) @binding(3) var<storage, read_write> unique_ids: array<u32>;
@group(0) @binding(4) var<storage, read_write> seg_start: array<u32>;
@group(0) @binding(5) var<storage, read_write> count_out: array<u32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = (wg.y * params.x_groups + wg.x) * 256u + lid;
    if i >= params.n {
        return;
    }
    let id = sorted[i];
    let head = i == 0u || id != sorted[i - 1u];
    if head {
        unique_ids[slot[i]] = id;
        seg_start[slot[i]] = i;
    }
    if i == params.n - 1u {
        let count = slot[i] + select(0u, 1u, head);
        seg_start[count] = params.n;
        count_out[0] = count;
    }
}
