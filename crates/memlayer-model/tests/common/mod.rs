//! Cases shared by the memory-op tests of the CPU and wgpu backends.
#![allow(dead_code)] // each test binary uses its own subset

use memlayer_core::pkm;
use memlayer_core::rng::Rng;

/// Sub-key scores (groups, 2, n_keys) — tie-heavy (values in {-1, 0, 1}) or
/// normal — and the rows `i1 * n_keys + i2` the oracle selects, (groups, knn).
pub fn selection_case(
    rng: &mut Rng,
    groups: usize,
    n_keys: usize,
    knn: usize,
    ties: bool,
) -> (Vec<f32>, Vec<u32>) {
    let scores: Vec<f32> = (0..groups * 2 * n_keys)
        .map(|_| {
            if ties {
                rng.below(3) as f32 - 1.0
            } else {
                rng.normal()
            }
        })
        .collect();
    let want = pkm::select_from_scores(&scores, n_keys, knn)
        .unwrap()
        .chunks_exact(2)
        .map(|p| p[0] * n_keys as u32 + p[1])
        .collect();
    (scores, want)
}
