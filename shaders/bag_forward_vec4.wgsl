// bag_forward_vec4.wgsl — embedding-bag forward (as bag_forward.wgsl) for
// rows whose width allows 16-byte loads: f32 rows with dim % 4 == 0, f16 and
// bf16 rows with dim % 8 == 0. Same results, bit for bit; wider loads.
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
// Storage (override constants F16, BF16): a vec4<u32> of a row is 4 f32
// elements, or 8 f16 / bf16 halves (low half first, widened exactly by
// `halves`). row_words = vec4s per row. The host builds the six (storage,
// PAGED) pipelines once.
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
//   6..8: shard0..2 storage, read       array<vec4<u32>>  (rows_per_shard, row_words) each
//          (shards first_shard .. first_shard+2; unused ones: any 16 bytes)
// Workgroup layout: 256 invocations = bags_per_wg bags × tpb invocations.
// Invocation `lane` of a bag handles vec4s lane + j*tpb, j = 0..15, of each
// block of 16*tpb (PER_LANE = 16 separate accumulators, or 32 for f16: no
// dynamically indexed private memory); consecutive invocations read
// consecutive 16-byte words; each entry's index and weight is a broadcast
// load. The host picks tpb, a power of two capped at 256: next_pow2(row_words
// / 16) for f32, next_pow2(row_words / 8) for f16 (only slots j < 8 live:
// 16 f16 vec4s per invocation measured slower), at least 2 (one invocation
// per bag measured slower at dim 64). Each element is still summed in entry
// order (bit-identical). Few invocations per bag with
// many independent loads each keeps one whole row in flight per entry: on
// lavapipe (8-lane SIMD batches run one after the other) this measured 2-3×
// the throughput of 2 vec4s per invocation (e.g. 0.8 vs 0.26 of the copy
// kernel's bandwidth at dim 256 f32).
// bag = (wg.y * x_groups + wg.x) * bags_per_wg + lid / tpb.
// Limits: each shard, the indices, weights and out must fit one binding.

// The shared declarations (constants, Params, bindings, load, table_row) are
// in bag_forward_common.wgsl, appended by the registry.
alias Word = vec4<u32>;
alias Out = vec4<f32>;

const PER_LANE: u32 = 16u;

// (lo, hi) += w * value(x): f32 → lo gets 4 elements (hi unused); f16 / bf16
// → lo gets halves 0..3 and hi halves 4..7. Products are rounded before the add.
fn add(lo: ptr<function, vec4<f32>>, hi: ptr<function, vec4<f32>>, x: vec4<u32>, w: f32) {
    if !packed() {
        *lo = *lo + (w * bitcast<vec4<f32>>(x)) * params.one;
    } else {
        let a = vec4<f32>(halves(x.x), halves(x.y));
        let b = vec4<f32>(halves(x.z), halves(x.w));
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
    if !packed() {
        put(row + i, lo);
    } else {
        put(row + 2u * i, lo);
        put(row + 2u * i + 1u, hi);
    }
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let at = locate(wg, lid);
    if at.bag >= params.bags {
        return;
    }
    let tpb = params.tpb;
    let rv = params.row_words;

    for (var v0 = 0u; v0 < rv; v0 += PER_LANE * tpb) {
        let i0 = v0 + at.lane;
        if i0 >= rv {
            break;
        }
        let i1 = i0 + 1u * tpb;
        let has1 = i1 < rv;
        let i2 = i0 + 2u * tpb;
        let has2 = i2 < rv;
        let i3 = i0 + 3u * tpb;
        let has3 = i3 < rv;
        let i4 = i0 + 4u * tpb;
        let has4 = i4 < rv;
        let i5 = i0 + 5u * tpb;
        let has5 = i5 < rv;
        let i6 = i0 + 6u * tpb;
        let has6 = i6 < rv;
        let i7 = i0 + 7u * tpb;
        let has7 = i7 < rv;
        let i8 = i0 + 8u * tpb;
        let has8 = i8 < rv;
        let i9 = i0 + 9u * tpb;
        let has9 = i9 < rv;
        let i10 = i0 + 10u * tpb;
        let has10 = i10 < rv;
        let i11 = i0 + 11u * tpb;
        let has11 = i11 < rv;
        let i12 = i0 + 12u * tpb;
        let has12 = i12 < rv;
        let i13 = i0 + 13u * tpb;
        let has13 = i13 < rv;
        let i14 = i0 + 14u * tpb;
        let has14 = i14 < rv;
        let i15 = i0 + 15u * tpb;
        let has15 = i15 < rv;
        var a0 = vec4<f32>();
        var b0 = vec4<f32>();
        var a1 = vec4<f32>();
        var b1 = vec4<f32>();
        var a2 = vec4<f32>();
        var b2 = vec4<f32>();
        var a3 = vec4<f32>();
        var b3 = vec4<f32>();
        var a4 = vec4<f32>();
        var b4 = vec4<f32>();
        var a5 = vec4<f32>();
        var b5 = vec4<f32>();
        var a6 = vec4<f32>();
        var b6 = vec4<f32>();
        var a7 = vec4<f32>();
        var b7 = vec4<f32>();
        var a8 = vec4<f32>();
        var b8 = vec4<f32>();
        var a9 = vec4<f32>();
        var b9 = vec4<f32>();
        var a10 = vec4<f32>();
        var b10 = vec4<f32>();
        var a11 = vec4<f32>();
        var b11 = vec4<f32>();
        var a12 = vec4<f32>();
        var b12 = vec4<f32>();
        var a13 = vec4<f32>();
        var b13 = vec4<f32>();
        var a14 = vec4<f32>();
        var b14 = vec4<f32>();
        var a15 = vec4<f32>();
        var b15 = vec4<f32>();
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
                let base = row * rv;
                add(&a0, &b0, shard0[base + i0], w);
                if has1 {
                    add(&a1, &b1, shard0[base + i1], w);
                }
                if has2 {
                    add(&a2, &b2, shard0[base + i2], w);
                }
                if has3 {
                    add(&a3, &b3, shard0[base + i3], w);
                }
                if has4 {
                    add(&a4, &b4, shard0[base + i4], w);
                }
                if has5 {
                    add(&a5, &b5, shard0[base + i5], w);
                }
                if has6 {
                    add(&a6, &b6, shard0[base + i6], w);
                }
                if has7 {
                    add(&a7, &b7, shard0[base + i7], w);
                }
                if has8 {
                    add(&a8, &b8, shard0[base + i8], w);
                }
                if has9 {
                    add(&a9, &b9, shard0[base + i9], w);
                }
                if has10 {
                    add(&a10, &b10, shard0[base + i10], w);
                }
                if has11 {
                    add(&a11, &b11, shard0[base + i11], w);
                }
                if has12 {
                    add(&a12, &b12, shard0[base + i12], w);
                }
                if has13 {
                    add(&a13, &b13, shard0[base + i13], w);
                }
                if has14 {
                    add(&a14, &b14, shard0[base + i14], w);
                }
                if has15 {
                    add(&a15, &b15, shard0[base + i15], w);
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
                let base = (row - shard * params.rows_per_shard) * rv;
                add(&a0, &b0, load(s, base + i0), w);
                if has1 {
                    add(&a1, &b1, load(s, base + i1), w);
                }
                if has2 {
                    add(&a2, &b2, load(s, base + i2), w);
                }
                if has3 {
                    add(&a3, &b3, load(s, base + i3), w);
                }
                if has4 {
                    add(&a4, &b4, load(s, base + i4), w);
                }
                if has5 {
                    add(&a5, &b5, load(s, base + i5), w);
                }
                if has6 {
                    add(&a6, &b6, load(s, base + i6), w);
                }
                if has7 {
                    add(&a7, &b7, load(s, base + i7), w);
                }
                if has8 {
                    add(&a8, &b8, load(s, base + i8), w);
                }
                if has9 {
                    add(&a9, &b9, load(s, base + i9), w);
                }
                if has10 {
                    add(&a10, &b10, load(s, base + i10), w);
                }
                if has11 {
                    add(&a11, &b11, load(s, base + i11), w);
                }
                if has12 {
                    add(&a12, &b12, load(s, base + i12), w);
                }
                if has13 {
                    add(&a13, &b13, load(s, base + i13), w);
                }
                if has14 {
                    add(&a14, &b14, load(s, base + i14), w);
                }
                if has15 {
                    add(&a15, &b15, load(s, base + i15), w);
                }
            }
        }
        if params.accumulate != 0u && !touched && !bad {
            continue;
        }
        if bad {
            a0 = vec4<f32>(at.nan);
            b0 = a0;
            a1 = a0;
            b1 = a0;
            a2 = a0;
            b2 = a0;
            a3 = a0;
            b3 = a0;
            a4 = a0;
            b4 = a0;
            a5 = a0;
            b5 = a0;
            a6 = a0;
            b6 = a0;
            a7 = a0;
            b7 = a0;
            a8 = a0;
            b8 = a0;
            a9 = a0;
            b9 = a0;
            a10 = a0;
            b10 = a0;
            a11 = a0;
            b11 = a0;
            a12 = a0;
            b12 = a0;
            a13 = a0;
            b13 = a0;
            a14 = a0;
            b14 = a0;
            a15 = a0;
            b15 = a0;
        }
        store(at.bag, i0, a0, b0);
        if has1 {
            store(at.bag, i1, a1, b1);
        }
        if has2 {
            store(at.bag, i2, a2, b2);
        }
        if has3 {
            store(at.bag, i3, a3, b3);
        }
        if has4 {
            store(at.bag, i4, a4, b4);
        }
        if has5 {
            store(at.bag, i5, a5, b5);
        }
        if has6 {
            store(at.bag, i6, a6, b6);
        }
        if has7 {
            store(at.bag, i7, a7, b7);
        }
        if has8 {
            store(at.bag, i8, a8, b8);
        }
        if has9 {
            store(at.bag, i9, a9, b9);
        }
        if has10 {
            store(at.bag, i10, a10, b10);
        }
        if has11 {
            store(at.bag, i11, a11, b11);
        }
        if has12 {
            store(at.bag, i12, a12, b12);
        }
        if has13 {
            store(at.bag, i13, a13, b13);
        }
        if has14 {
            store(at.bag, i14, a14, b14);
        }
        if has15 {
            store(at.bag, i15, a15, b15);
        }
    }
}
