// pk_topk.wgsl — product-key lookup, step 2: the top-k sub-keys of each
// query half, from the scores written by pk_scores.wgsl.
//
// Computes, for every row r (a (token, head, side) of the batch):
//   (S, I)[row0 + r] = the k best (scores[r, i], i), i < n_keys, best first
// in memlayer_core::topk's order: higher score first, ties to the lower
// sub-key id, NaN ranks as -inf, -0 == +0. Comparisons use an integer key
// derived from the bits (so "fast math" cannot reorder NaN or -0). Scores
// are copied, never recomputed, so they stay bit-identical.
//
// Method (few barriers — each one costs a coroutine switch per SIMD batch on
// CPU drivers like lavapipe — and 12 KiB of workgroup storage):
//  1. Invocation l < G (G = `groups`, chosen by the host: a power of two
//     >= k, usually 2k clamped to [64, 256], at most next_pow2(n_keys))
//     scans sub-keys l, l+G, … and keeps its best entry. Each of the G
//     maxima is ranked among them by counting (G comparisons); the one of
//     rank k-1 publishes T. At least k distinct entries rank at or before T,
//     so the whole top-k does.
//  2. Every entry ranking at or before T is appended (atomic slot counter) to
//     a buffer of 1024. At most k of the G strides hold such entries, so
//     that is at most k * ceil(n_keys / G) entries, typically k to 2k for
//     random scores. Each buffered entry's rank is counted against the others; the
//     ranks < k are written straight to the output.
//  3. If more than 1024 entries qualify (only when the best sub-keys crowd
//     into a few strides), fall back to a streaming top-k: chunks of 256
//     scores, those beating the current k-th best are appended after
//     buf[0..k) and buf[0 .. next_pow2(k + n)) is bitonic-sorted.
// Entries are distinct (unique ids) and the order is strict and total, so
// the result is exact and deterministic.
//
// Bindings (group 0):
//   0: params  uniform  { rows: u32, n_keys: u32, k: u32, row0: u32, x_groups: u32, groups: u32 }
//   1: scores  storage, read        array<f32>  (rows, n_keys)
//   2: out_s   storage, read_write  array<f32>  (row0 + rows, k)  = (tokens, heads, 2, k)
//   3: out_i   storage, read_write  array<u32>  (row0 + rows, k)  sub-key ids
// Workgroup layout: 256 invocations, one workgroup per row,
// r = wg.y * x_groups + wg.x.
// Workgroup storage: 1024 × (score, id, key) = 12 KiB + 16 bytes.
// Limits: 1 <= k <= min(n_keys, groups) <= 256.

// `struct Params` is generated from the host struct (src/shaders.rs of
// memlayer-wgpu) and prepended to this file.

const WG: u32 = 256u;
const CAP: u32 = 1024u;
const NONE: u32 = 0xffffffffu;

// -inf and NaN as runtime values: WGSL makes a constant expression that
// evaluates to inf or NaN a shader-creation error (Tint, i.e. Chrome's
// WebGPU, enforces it; naga does not), so the bits live in private variables.
var<private> NEG_INF_BITS: u32 = 0xff800000u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> scores: array<f32>;
@group(0) @binding(2) var<storage, read_write> out_s: array<f32>;
@group(0) @binding(3) var<storage, read_write> out_i: array<u32>;

var<workgroup> buf_s: array<f32, CAP>;
var<workgroup> buf_i: array<u32, CAP>;
var<workgroup> buf_k: array<u32, CAP>; // rank_key(buf_s), phases 1 and 2
var<workgroup> count: atomic<u32>;
var<workgroup> count_uniform: u32;
var<workgroup> thr_k: u32;
var<workgroup> thr_i: u32;

// rank_key (the order of scores): pk_rank_key.wgsl, appended by the registry.

// True when (key ka, id ia) ranks strictly before (kb, ib).
fn before_k(ka: u32, ia: u32, kb: u32, ib: u32) -> bool {
    return ka > kb || (ka == kb && ia < ib);
}

// True when (sa, ia) ranks strictly before (sb, ib).
fn before(sa: f32, ia: u32, sb: f32, ib: u32) -> bool {
    return before_k(rank_key(sa), ia, rank_key(sb), ib);
}

fn neg_inf() -> f32 {
    return bitcast<f32>(NEG_INF_BITS);
}

// Sorts buf[0..p) best first (p a power of two, uniform). Bitonic network;
// each compare-exchange of a stage is done by one invocation.
fn sort_buf(p: u32, lid: u32) {
    for (var size = 2u; size <= p; size <<= 1u) {
        for (var stride = size >> 1u; stride > 0u; stride >>= 1u) {
            for (var c = lid; c < p / 2u; c += WG) {
                let i = 2u * stride * (c / stride) + c % stride;
                let j = i + stride;
                // blocks with (i & size) == 0 are sorted best-first, the others worst-first
                let first_best = (i & size) == 0u;
                if before(buf_s[j], buf_i[j], buf_s[i], buf_i[i]) == first_best {
                    let ts = buf_s[i];
                    let ti = buf_i[i];
                    buf_s[i] = buf_s[j];
                    buf_i[i] = buf_i[j];
                    buf_s[j] = ts;
                    buf_i[j] = ti;
                }
            }
            workgroupBarrier();
        }
    }
}

fn next_pow2(x: u32) -> u32 {
    var p = 1u;
    while p < x {
        p <<= 1u;
    }
    return p;
}

// Sentinels in buf[lo..hi): rank after every real entry.
fn pad(lo: u32, hi: u32, lid: u32) {
    for (var i = lo + lid; i < hi; i += WG) {
        buf_s[i] = neg_inf();
        buf_i[i] = NONE;
    }
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = wg.y * params.x_groups + wg.x;
    if r >= params.rows {
        return;
    }
    let n = params.n_keys;
    let k = params.k;
    let base = r * n;

    // 1. per-invocation maxima; T = the k-th best of them
    var mk = 0u; // below every rank key (the lowest is that of -inf, 0x007fffff)
    var mi = NONE;
    let g = params.groups;
    for (var i = lid; lid < g && i < n; i += g) {
        let key = rank_key(scores[base + i]);
        if key > mk {
            // ids grow along the loop: an equal key never ranks before
            mk = key;
            mi = i;
        }
    }
    buf_k[lid] = mk;
    buf_i[lid] = mi;
    if lid == 0u {
        atomicStore(&count, 0u);
    }
    workgroupBarrier();
    var rank = 0u;
    // (the loop condition, not an `if` around it, lets SIMD drivers skip
    // batches of idle invocations)
    for (var m = 0u; lid < g && m < g; m++) {
        if before_k(buf_k[m], buf_i[m], mk, mi) {
            rank++;
        }
    }
    if lid < g && rank == k - 1u {
        thr_k = mk;
        thr_i = mi;
    }
    workgroupBarrier();
    let tk = thr_k;
    let ti = thr_i;

    // 2. collect everything ranking at or before T, rank it by counting
    for (var i = lid; i < n; i += WG) {
        let s = scores[base + i];
        let key = rank_key(s);
        if key > tk || (key == tk && i <= ti) {
            let slot = atomicAdd(&count, 1u);
            if slot < CAP {
                buf_s[slot] = s;
                buf_i[slot] = i;
                buf_k[slot] = key;
            }
        }
    }
    workgroupBarrier();
    if lid == 0u {
        count_uniform = atomicLoad(&count);
        atomicStore(&count, 0u);
    }
    let c = workgroupUniformLoad(&count_uniform);
    let out_base = (params.row0 + r) * k;
    if c <= CAP {
        for (var e = lid; e < c; e += WG) {
            let ek = buf_k[e];
            let ei = buf_i[e];
            var rank = 0u;
            for (var f = 0u; f < c; f++) {
                if before_k(buf_k[f], buf_i[f], ek, ei) {
                    rank++;
                }
            }
            if rank < k {
                out_s[out_base + rank] = buf_s[e];
                out_i[out_base + rank] = ei;
            }
        }
    } else {
        // 3. fallback: streaming top-k over chunks of 256
        pad(0u, k, lid);
        workgroupBarrier();
        for (var c0 = 0u; c0 < n; c0 += WG) {
            let i = c0 + lid;
            if i < n {
                let s = scores[base + i];
                if before(s, i, buf_s[k - 1u], buf_i[k - 1u]) {
                    let slot = atomicAdd(&count, 1u);
                    buf_s[k + slot] = s;
                    buf_i[k + slot] = i;
                }
            }
            workgroupBarrier();
            if lid == 0u {
                count_uniform = atomicLoad(&count);
                atomicStore(&count, 0u);
            }
            let m = workgroupUniformLoad(&count_uniform);
            if m > 0u {
                let p = next_pow2(k + m);
                pad(k + m, p, lid);
                workgroupBarrier();
                sort_buf(p, lid);
            }
        }
        for (var i = lid; i < k; i += WG) {
            out_s[out_base + i] = buf_s[i];
            out_i[out_base + i] = buf_i[i];
        }
    }
}
