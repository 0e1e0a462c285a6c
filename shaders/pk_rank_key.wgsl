// pk_rank_key.wgsl — the score order pk_topk.wgsl and pk_candidates.wgsl
// share (the oracle's: higher first, NaN as -inf, -0 == +0). Not a shader by
// itself: the registry (crates/memlayer-wgpu/src/shaders.rs) appends it to
// both.

// Order-preserving integer key of a score: larger key = ranks first.
// NaN ranks as -inf; -0 and +0 get the same key.
fn rank_key(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    let mag = b & 0x7fffffffu;
    if mag > 0x7f800000u {
        return 0x007fffffu; // NaN -> key of -inf
    }
    if mag == 0u {
        return 0x80000000u; // -0 == +0
    }
    if (b & 0x80000000u) != 0u {
        return ~b;
    }
    return b | 0x80000000u;
}
