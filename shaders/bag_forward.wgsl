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
// Storage (override constants F16, BF16): f32 (one element per u32 word), f16
// or bf16 (two per word, low half first, widened exactly by `halves`; rows of
// odd width carry one padding half). row_words = words per row. The host
// builds the six (storage, PAGED) pipelines once.
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
//          (shards first_shard .. first_shard+2; unused ones: any 16 bytes)
// Workgroup layout: 256 invocations = bags_per_wg bags × tpb invocations
// (tpb a power of two, chosen by the host as next_pow2(row_words / 4) capped
// at 256, so small rows pack several bags into a workgroup). Invocation
// `lane` of a bag handles words lane + j*tpb, j = 0..3, of each block of
// 4*tpb words: consecutive invocations read consecutive words (coalesced),
// every entry's index and weight is a broadcast load, and the four
// accumulators are separate variables (no dynamically indexed private memory).
// bag = (wg.y * x_groups + wg.x) * bags_per_wg + lid / tpb.
// Limits: each shard, the indices, weights and out must fit one binding.

// The shared declarations (constants, Params, bindings, load, table_row) are
// in bag_forward_common.wgsl, appended by the registry.
alias Word = u32;
alias Out = f32;

const PER_LANE: u32 = 4u;

// acc + w * value(word), value = the f32 (x) or the two 16-bit halves (x, y);
// the product is rounded before it is added (`one`, see above).
fn add(acc: vec2<f32>, word: u32, w: f32) -> vec2<f32> {
    if !packed() {
        return vec2<f32>(acc.x + (w * bitcast<f32>(word)) * params.one, 0.0);
    }
    return acc + (w * halves(word)) * params.one;
}

// Writes (or with `accumulate` adds) the value of word wi of a bag's row.
fn store(bag: u32, wi: u32, v: vec2<f32>) {
    if !packed() {
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
    let at = locate(wg, lid);
    if at.bag >= params.bags {
        return;
    }
    let tpb = params.tpb;
    let rw = params.row_words;

    for (var w0 = 0u; w0 < rw; w0 += PER_LANE * tpb) {
        // this invocation's words: w0 + at.lane + j*tpb, j = 0..3 (four explicit
        // accumulators: no dynamically indexed private memory)
        let i0 = w0 + at.lane;
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
        if at.single {
            for (var e = at.start; e < at.end; e++) {
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
            for (var e = at.start; e < at.end; e++) {
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
                a0 = add(a0, load(s, base), w);
                if v1 {
                    a1 = add(a1, load(s, base + tpb), w);
                }
                if v2 {
                    a2 = add(a2, load(s, base + 2u * tpb), w);
                }
                if v3 {
                    a3 = add(a3, load(s, base + 3u * tpb), w);
                }
            }
        }
        if params.accumulate != 0u && !touched && !bad {
            continue;
        }
        if bad {
            a0 = vec2<f32>(at.nan, at.nan);
            a1 = a0;
            a2 = a0;
            a3 = a0;
        }
        store(at.bag, i0, a0);
        if v1 {
            store(at.bag, i0 + tpb, a1);
        }
        if v2 {
            store(at.bag, i0 + 2u * tpb, a2);
        }
        if v3 {
            store(at.bag, i0 + 3u * tpb, a3);
        }
    }
}
