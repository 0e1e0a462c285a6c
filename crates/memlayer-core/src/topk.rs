//! Deterministic top-k: descending score, ties broken by the lower id.
//!
//! This order is part of memlayer's contract: every backend (WGSL, CUDA,
//! burn) must select exactly the same ids as these functions. NaN scores rank
//! as `-inf` (below every number) so a NaN never displaces a real candidate,
//! and `-0.0 == +0.0` (IEEE comparison, as GPU code does).

use std::cmp::Ordering;

/// Canonical comparison key of a score: NaN becomes `-inf`.
#[inline]
pub fn rank_key(score: f32) -> f32 {
    if score.is_nan() {
        f32::NEG_INFINITY
    } else {
        score
    }
}

/// `Less` when `(sa, ia)` ranks before `(sb, ib)`: higher score first, then lower id.
#[inline]
pub fn rank_order(sa: f32, ia: u32, sb: f32, ib: u32) -> Ordering {
    let (ka, kb) = (rank_key(sa), rank_key(sb));
    if ka > kb {
        Ordering::Less
    } else if ka < kb {
        Ordering::Greater
    } else {
        ia.cmp(&ib)
    }
}

/// Positions (into `scores`/`ids`) of the `k` best entries, best first.
///
/// `ids[i]` is the id that breaks ties for `scores[i]`; ids must be distinct.
/// If `k > scores.len()` all positions are returned.
pub fn topk_positions(scores: &[f32], ids: &[u32], k: usize) -> Vec<usize> {
    assert_eq!(scores.len(), ids.len(), "scores and ids differ in length");
    let k = k.min(scores.len());
    let mut pos: Vec<usize> = (0..scores.len()).collect();
    if k == 0 {
        return Vec::new();
    }
    let cmp = |&a: &usize, &b: &usize| rank_order(scores[a], ids[a], scores[b], ids[b]);
    if k < pos.len() {
        pos.select_nth_unstable_by(k - 1, cmp);
        pos.truncate(k);
    }
    pos.sort_unstable_by(cmp);
    pos
}

/// Top-k of `scores` where the id of entry `i` is `i`: returns `(scores, ids)`, best first.
pub fn topk(scores: &[f32], k: usize) -> (Vec<f32>, Vec<u32>) {
    let ids: Vec<u32> = (0..scores.len() as u32).collect();
    let pos = topk_positions(scores, &ids, k);
    (
        pos.iter().map(|&p| scores[p]).collect(),
        pos.iter().map(|&p| p as u32).collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn naive(scores: &[f32], k: usize) -> Vec<u32> {
        let mut ids: Vec<u32> = (0..scores.len() as u32).collect();
        ids.sort_by(|&a, &b| rank_order(scores[a as usize], a, scores[b as usize], b));
        ids.truncate(k);
        ids
    }

    #[test]
    fn ties_go_to_the_lower_index() {
        let s = [1.0, 3.0, 3.0, 2.0, 3.0, -0.0, 0.0];
        let (v, i) = topk(&s, 4);
        assert_eq!(i, vec![1, 2, 4, 3]);
        assert_eq!(v, vec![3.0, 3.0, 3.0, 2.0]);
        // -0.0 and +0.0 tie: the lower index wins.
        let (_, i) = topk(&[-0.0, 0.0], 1);
        assert_eq!(i, vec![0]);
        let (_, i) = topk(&[0.0, -0.0], 1);
        assert_eq!(i, vec![0]);
    }

    #[test]
    fn nan_ranks_last_and_k_larger_than_n() {
        let s = [f32::NAN, f32::NEG_INFINITY, 1.0];
        let (_, i) = topk(&s, 5);
        // NaN ties with -inf and loses on index? No: NaN is index 0, -inf index 1,
        // both rank as -inf, so the lower index (the NaN) comes first among them.
        assert_eq!(i, vec![2, 0, 1]);
        assert!(topk(&s, 0).1.is_empty());
        assert!(topk(&[], 3).1.is_empty());
    }

    #[test]
    fn matches_a_full_sort_on_random_and_tied_inputs() {
        let mut rng = Rng::new(11);
        for trial in 0..300 {
            let n = 1 + rng.below(200) as usize;
            let k = rng.below(n as u64 + 3) as usize;
            let s: Vec<f32> = if trial % 2 == 0 {
                rng.normal_vec(n, 0.0, 1.0)
            } else {
                (0..n).map(|_| rng.below(4) as f32).collect()
            };
            assert_eq!(topk(&s, k).1, naive(&s, k), "n={n} k={k}");
        }
    }
}
