// bag_forward_vec4.wgsl — embedding-bag forward (as bag_forward.wgsl) for
// rows whose width allows 16-byte loads: f32 rows with dim % 4 == 0, f16 rows
// with dim % 8 == 0. Same results, bit for bit; wider loads.
//
// Computes, for every bag b (CSR: entries offsets[b] .. offsets[b+1]):
//   out[b, :] = Σ_e weights[e] * table[indices[e], :]      (f32 accumulation)
// summing the entries in order, one element at a time, as
// memlayer_core::bag::bag_forward does (each product is multiplied by `one`
// = 1.0 from the uniform before it is added, so an FMA-contracting driver
// still rounds the product first: bit-identical to the oracle in one pass).
// Empty bags give zero rows.
//
// Row addressing (override constant PAGED):
//   flat  (PAGED = false): table row = indices[e]; valid if < rows.
//   paged (PAGED = true):  page = indices[e] / page_rows; valid if page < n_pages
//          and slot = page_table[page] < n_slots (0xFFFFFFFF marks a missing
//          page); table row = slot * page_rows + indices[e] % page_rows.
//   Then shard = row / rows_per_shard, local row = row % rows_per_shard.
//   A bag with any invalid entry is written as NaN (all of its elements).
// Storage (override constant F16): a vec4<u32> of a row is 4 f32 elements,
// or 8 f16 halves (low half first, unpack2x16float). row_vec4 = vec4s per row.
// The host builds the four (F16, PAGED) pipelines once.
//
// Sharding: as bag_forward.wgsl — 3 shard bindings picked per entry with a
// switch (WebGPU's default 8 storage buffers per stage minus the other 5),
// ceil(shards / 3) passes for more shards (pass 0 writes, later passes add
// and skip bags without entries in their shards; multi-pass sums are grouped
// by shard, so only close to the oracle). With one shard (n_shards = 1) the
// per-entry shard arithmetic is skipped.
//
// Bindings (group 0):
//   0: params      uniform  Params (below)
//   1: indices     storage, read        array<u32>        (nnz)
//   2: weights     storage, read        array<f32>        (nnz)
//   3: offsets     storage, read        array<u32>        (bags + 1)
//   4: page_table  storage, read        array<u32>        (n_pages)  (any 4 bytes when flat)
//   5: out         storage, read_write  array<vec4<f32>>  (bags, dim / 4)
//   6..8: shard0..2 storage, read       array<vec4<u32>>  (rows_per_shard, row_vec4) each
//          (shards first_shard .. first_shard+2; unused ones alias shard0)
// Workgroup layout: 256 invocations = bags_per_wg bags × tpb invocations
// (tpb a power of two, next_pow2(row_vec4 / 2) capped at 256). Invocation
// `lane` of a bag handles vec4s lane and lane + tpb of each block of 2*tpb:
// consecutive invocations read consecutive 16-byte words (coalesced); each
// entry's index and weight is a broadcast load; accumulators are separate
// variables (no dynamically indexed private memory).
// bag = (wg.y * x_groups + wg.x) * bags_per_wg + lid / tpb.
// Limits: each shard, the indices, weights and out must fit one binding.

// Pipeline constants: storage type and addressing (4 pipelines).
override F16: bool = false;
override PAGED: bool = false;

struct Params {
    bags: u32,
    dim: u32,
    row_vec4: u32,
    n_shards: u32,
    tpb: u32,
    bags_per_wg: u32,
    x_groups: u32,
    page_shift: u32,
    rows: u32,
    page_rows: u32,
    n_pages: u32,
    n_slots: u32,
    rows_per_shard: u32,
    first_shard: u32,
    accumulate: u32,
    one: f32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> indices: array<u32>;
@group(0) @binding(2) var<storage, read> weights: array<f32>;
@group(0) @binding(3) var<storage, read> offsets: array<u32>;
@group(0) @binding(4) var<storage, read> page_table: array<u32>;
@group(0) @binding(5) var<storage, read_write> out: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read> shard0: array<vec4<u32>>;
@group(0) @binding(7) var<storage, read> shard1: array<vec4<u32>>;
@group(0) @binding(8) var<storage, read> shard2: array<vec4<u32>>;

const SHARDS_PER_PASS: u32 = 3u;
const INVALID: u32 = 0xffffffffu;

fn load(s: u32, i: u32) -> vec4<u32> {
    switch s {
        case 0u: {
            return shard0[i];
        }
        case 1u: {
            return shard1[i];
        }
        default: {
            return shard2[i];
        }
    }
}

// Table row of entry index `idx`, or INVALID.
fn table_row(idx: u32) -> u32 {
    if !PAGED {
        return select(INVALID, idx, idx < params.rows);
    }
    // page_shift = log2(page_rows) when that is a power of two: no division
    var page: u32;
    var in_page: u32;
    if params.page_shift != INVALID {
        page = idx >> params.page_shift;
        in_page = idx & (params.page_rows - 1u);
    } else {
        page = idx / params.page_rows;
        in_page = idx % params.page_rows;
    }
    if page >= params.n_pages {
        return INVALID;
    }
    let slot = page_table[page];
    if slot >= params.n_slots {
        return INVALID;
    }
    return slot * params.page_rows + in_page;
}

// (lo, hi) += w * value(x): f32 → lo gets 4 elements (hi unused); f16 → lo
// gets halves 0..3 and hi halves 4..7. Products are rounded before the add.
fn add(lo: ptr<function, vec4<f32>>, hi: ptr<function, vec4<f32>>, x: vec4<u32>, w: f32) {
    if !F16 {
        *lo = *lo + (w * bitcast<vec4<f32>>(x)) * params.one;
    } else {
        let a = vec4<f32>(unpack2x16float(x.x), unpack2x16float(x.y));
        let b = vec4<f32>(unpack2x16float(x.z), unpack2x16float(x.w));
        *lo = *lo + (w * a) * params.one;
        *hi = *hi + (w * b) * params.one;
    }
}

fn put(o: u32, v: vec4<f32>) {
    if params.accumulate != 0u {
        out[o] = v + out[o];
    } else {
        out[o] = v;
    }
}

// Writes (or with `accumulate` adds) the values of row vec4 i of a bag.
fn store(bag: u32, i: u32, lo: vec4<f32>, hi: vec4<f32>) {
    let row = bag * (params.dim / 4u);
    if !F16 {
        put(row + i, lo);
    } else {
        put(row + 2u * i, lo);
        put(row + 2u * i + 1u, hi);
    }
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let bag = (wg.y * params.x_groups + wg.x) * params.bags_per_wg + lid / params.tpb;
    if bag >= params.bags {
        return;
    }
    let lane = lid % params.tpb;
    let tpb = params.tpb;
    let rv = params.row_vec4;
    // clamped to the entries that exist: garbage offsets (e.g. from a buggy
    // producer kernel) cannot make the loop run away
    let end = min(offsets[bag + 1u], arrayLength(&indices));
    let start = min(offsets[bag], end);
    let nan = bitcast<f32>(0x7fc00000u);
    // the whole table in shard0 (one pass): no shard arithmetic per entry
    let single = params.n_shards == 1u;

    for (var v0 = 0u; v0 < rv; v0 += 2u * tpb) {
        let i0 = v0 + lane;
        if i0 >= rv {
            break;
        }
        let i1 = i0 + tpb;
        let has1 = i1 < rv;
        var a0 = vec4<f32>();
        var b0 = vec4<f32>();
        var a1 = vec4<f32>();
        var b1 = vec4<f32>();
        var bad = false;
        var touched = false;
        if single {
            for (var e = start; e < end; e++) {
                let row = table_row(indices[e]);
                if row == INVALID {
                    bad = true;
                    break;
                }
                let w = weights[e];
                let base = row * rv;
                add(&a0, &b0, shard0[base + i0], w);
                if has1 {
                    add(&a1, &b1, shard0[base + i1], w);
                }
            }
        } else {
            for (var e = start; e < end; e++) {
                let row = table_row(indices[e]);
                if row == INVALID {
                    bad = true;
                    break;
                }
                let shard = row / params.rows_per_shard;
                if shard < params.first_shard || shard >= params.first_shard + SHARDS_PER_PASS {
                    continue;
                }
                touched = true;
                let w = weights[e];
                let s = shard - params.first_shard;
                let base = (row - shard * params.rows_per_shard) * rv;
                add(&a0, &b0, load(s, base + i0), w);
                if has1 {
                    add(&a1, &b1, load(s, base + i1), w);
                }
            }
        }
        if params.accumulate != 0u && !touched && !bad {
            continue;
        }
        if bad {
            a0 = vec4<f32>(nan);
            b0 = a0;
            a1 = a0;
            b1 = a0;
        }
        store(bag, i0, a0, b0);
        if has1 {
            store(bag, i1, a1, b1);
        }
    }
}
