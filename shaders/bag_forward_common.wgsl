// bag_forward_common.wgsl — the part bag_forward.wgsl and
// bag_forward_vec4.wgsl share: pipeline constants, parameters, bindings,
// shard loads and row addressing. Not a shader by itself: the registry
// (crates/memlayer-wgpu/src/shaders.rs) appends it to each of the two
// files, which define `Word` (the shard element type: u32 or vec4<u32>) and
// `Out` (the output element type: f32 or vec4<f32>) and PER_LANE.
// row_words = shard elements (`Word`s) per row.

// Pipeline constants: storage type and addressing. Storage is f32 (neither
// F16 nor BF16), f16 (F16) or bf16 (BF16; takes precedence if both are set,
// a combination the host never builds): 6 pipelines per file.
override F16: bool = false;
override PAGED: bool = false;
override BF16: bool = false;

// `struct Params` is generated from the host struct (src/shaders.rs of
// memlayer-wgpu) and prepended to this file.

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> indices: array<u32>;
@group(0) @binding(2) var<storage, read> weights: array<f32>;
@group(0) @binding(3) var<storage, read> offsets: array<u32>;
@group(0) @binding(4) var<storage, read> page_table: array<u32>;
@group(0) @binding(5) var<storage, read_write> out: array<Out>;
@group(0) @binding(6) var<storage, read> shard0: array<Word>;
@group(0) @binding(7) var<storage, read> shard1: array<Word>;
@group(0) @binding(8) var<storage, read> shard2: array<Word>;

const SHARDS_PER_PASS: u32 = 3u;
const INVALID: u32 = 0xffffffffu;

// -inf and NaN as runtime values: WGSL makes a constant expression that
// evaluates to inf or NaN a shader-creation error (Tint, i.e. Chrome's
// WebGPU, enforces it; naga does not), so the bits live in private variables.
var<private> NAN_BITS: u32 = 0x7fc00000u;

// Storage of two 16-bit elements per u32 word (f16 or bf16).
fn packed() -> bool {
    return F16 || BF16;
}

// The two elements of a word of 16-bit storage, low half first, widened to
// f32 exactly: f16 by unpack2x16float, bf16 by moving its bits into the top
// half of an f32 (a bf16 is the top 16 bits of the f32 it rounds).
fn halves(word: u32) -> vec2<f32> {
    if BF16 {
        return vec2<f32>(bitcast<f32>(word << 16u), bitcast<f32>(word & 0xffff0000u));
    }
    return unpack2x16float(word);
}

fn load(s: u32, i: u32) -> Word {
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

// One invocation's place in the workgroup layout: its bag (at or past
// params.bags: none), its lane among the bag's tpb invocations, and the
// bag's entries start .. end, the offsets clamped to the entries that exist
// (garbage offsets, e.g. from a buggy producer kernel, cannot make the loop
// run away).
struct At {
    bag: u32,
    lane: u32,
    start: u32,
    end: u32,
    // the value of a bag with an invalid entry
    nan: f32,
    // the whole table in shard0 (one pass): no shard arithmetic per entry
    single: bool,
}

fn locate(wg: vec3<u32>, lid: u32) -> At {
    var at: At;
    at.bag = (wg.y * params.x_groups + wg.x) * params.bags_per_wg + lid / params.tpb;
    at.lane = lid % params.tpb;
    at.nan = bitcast<f32>(NAN_BITS);
    at.single = params.n_shards == 1u;
    if at.bag < params.bags {
        at.end = min(offsets[at.bag + 1u], arrayLength(&indices));
        at.start = min(offsets[at.bag], at.end);
    }
    return at;
}
