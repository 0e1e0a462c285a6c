// bag_forward.wgsl — embedding-bag forward, sum mode with per-sample weights,
// reading a table that is sharded across buffers, flat or through a page table.
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
//   A bag with any invalid entry is written as NaN (all of its elements),
//   never as a sum of garbage; the host-level API validates before dispatch
//   and reports such entries as errors.
// Storage (override constant F16): f32 (one element per u32 word) or f16
// (two per word, low half first, unpacked with unpack2x16float; rows of odd
// width carry one padding half). row_words = words per row. The host builds
// the four (F16, PAGED) pipelines once.
//
// Sharding: the shader has 3 shard bindings and picks one per entry with a
// switch. 3 because WebGPU's default maxStorageBuffersPerShaderStage is 8 and
// the other 5 storage bindings are taken; binding the shards side by side
// keeps a bag's entries in order (bit-identical sums) and writes the output
// once. A table of more than 3 shards is handled in ceil(shards / 3) passes:
// pass g (first_shard = 3g) adds only the entries whose row lies in shards
// 3g .. 3g+2; pass 0 writes out, later passes add to it (accumulate = 1) and
// skip bags with no entry in their shards. (Multi-pass sums are grouped by
// shard, so they are not bit-identical to the oracle, only close.) When the
// whole table is one shard (n_shards = 1) the per-entry shard arithmetic is
// skipped.
//
// Bindings (group 0):
//   0: params      uniform  Params (below)
//   1: indices     storage, read        array<u32>  (nnz)
//   2: weights     storage, read        array<f32>  (nnz)
//   3: offsets     storage, read        array<u32>  (bags + 1)
//   4: page_table  storage, read        array<u32>  (n_pages)  (any 4 bytes when flat)
//   5: out         storage, read_write  array<f32>  (bags, dim)
//   6..8: shard0..2 storage, read       array<u32>  (rows_per_shard, row_words) each
//          (shards first_shard .. first_shard+2; unused ones alias shard0)
// Workgroup layout: 256 invocations = bags_per_wg bags × tpb invocations
// (tpb a power of two, chosen by the host as next_pow2(row_words / 4) capped
// at 256, so small rows pack several bags into a workgroup). Invocation
// `lane` of a bag handles words lane + j*tpb, j = 0..3, of each block of
// 4*tpb words: consecutive invocations read consecutive words (coalesced),
// every entry's index and weight is a broadcast load, and the four
// accumulators are separate variables (no dynamically indexed private memory).
// bag = (wg.y * x_groups + wg.x) * bags_per_wg + lid / tpb.
// Limits: each shard, the indices, weights and out must fit one binding.

// Pipeline constants: storage type and addressing (4 pipelines).
override F16: bool = false;
override PAGED: bool = false;

struct Params {
    bags: u32,
    dim: u32,
    row_words: u32,
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
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
@group(0) @binding(6) var<storage, read> shard0: array<u32>;
@group(0) @binding(7) var<storage, read> shard1: array<u32>;
@group(0) @binding(8) var<storage, read> shard2: array<u32>;

const PER_LANE: u32 = 4u;
const SHARDS_PER_PASS: u32 = 3u;
const INVALID: u32 = 0xffffffffu;

// -inf and NaN as runtime values: WGSL makes a constant expression that
// evaluates to inf or NaN a shader-creation error (Tint, i.e. Chrome's
// WebGPU, enforces it; naga does not), so the bits live in private variables.
var<private> NAN_BITS: u32 = 0x7fc00000u;

fn load_word(s: u32, i: u32) -> u32 {
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

// acc + w * value(word), value = the f32 (x) or the two f16 halves (x, y);
// the product is rounded before it is added (`one`, see above).
fn add(acc: vec2<f32>, word: u32, w: f32) -> vec2<f32> {
    if !F16 {
        return vec2<f32>(acc.x + (w * bitcast<f32>(word)) * params.one, 0.0);
    }
    return acc + (w * unpack2x16float(word)) * params.one;
}

// Writes (or with `accumulate` adds) the value of word wi of a bag's row.
fn store(bag: u32, wi: u32, v: vec2<f32>) {
    if !F16 {
        let o = bag * params.dim + wi;
        var x = v.x;
        if params.accumulate != 0u {
            x = x + out[o];
        }
        out[o] = x;
    } else {
        let o = bag * params.dim + 2u * wi;
        let two = 2u * wi + 1u < params.dim;
        var y = v;
        if params.accumulate != 0u {
            y.x = y.x + out[o];
            if two {
                y.y = y.y + out[o + 1u];
            }
        }
        out[o] = y.x;
        if two {
            out[o + 1u] = y.y;
        }
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
    let rw = params.row_words;
    // clamped to the entries that exist: garbage offsets (e.g. from a buggy
    // producer kernel) cannot make the loop run away
    let end = min(offsets[bag + 1u], arrayLength(&indices));
    let start = min(offsets[bag], end);
    let nan = bitcast<f32>(NAN_BITS);
    // the whole table in shard0 (one pass): no shard arithmetic per entry
    let single = params.n_shards == 1u;

    for (var w0 = 0u; w0 < rw; w0 += PER_LANE * tpb) {
        // this invocation's words: w0 + lane + j*tpb, j = 0..3 (four explicit
        // accumulators: no dynamically indexed private memory)
        let i0 = w0 + lane;
        let v1 = i0 + tpb < rw;
        let v2 = i0 + 2u * tpb < rw;
        let v3 = i0 + 3u * tpb < rw;
        if i0 >= rw {
            break;
        }
        var a0 = vec2<f32>();
        var a1 = vec2<f32>();
        var a2 = vec2<f32>();
        var a3 = vec2<f32>();
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
                let base = row * rw + i0;
                a0 = add(a0, shard0[base], w);
                if v1 {
                    a1 = add(a1, shard0[base + tpb], w);
                }
                if v2 {
                    a2 = add(a2, shard0[base + 2u * tpb], w);
                }
                if v3 {
                    a3 = add(a3, shard0[base + 3u * tpb], w);
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
                let base = (row - shard * params.rows_per_shard) * rw + i0;
                a0 = add(a0, load_word(s, base), w);
                if v1 {
                    a1 = add(a1, load_word(s, base + tpb), w);
                }
                if v2 {
                    a2 = add(a2, load_word(s, base + 2u * tpb), w);
                }
                if v3 {
                    a3 = add(a3, load_word(s, base + 3u * tpb), w);
                }
            }
        }
        if params.accumulate != 0u && !touched && !bad {
            continue;
        }
        if bad {
            a0 = vec2<f32>(nan, nan);
            a1 = a0;
            a2 = a0;
            a3 = a0;
        }
        store(bag, i0, a0);
        if v1 {
            store(bag, i0 + tpb, a1);
        }
        if v2 {
            store(bag, i0 + 2u * tpb, a2);
        }
        if v3 {
            store(bag, i0 + 3u * tpb, a3);
        }
    }
}
