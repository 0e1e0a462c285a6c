//! Portable memory ops from burn tensor ops: run on any backend, get their
//! backward from burn's autodiff. The reference the native ops are tested
//! against (besides the CPU oracle).

use burn::tensor::{Int, Tensor, TensorData};
use memlayer_core::pkm;

use super::OpsError;

/// Product-key selection. scores: (groups, 2, n_keys), already scaled →
/// (groups, knn) rows `i1 * n_keys + i2`, best first, by the oracle's rule
/// ([`pkm::select_from_scores`]). Reads the scores back to the host.
pub fn pk_select(scores: Tensor<3>, knn: usize) -> Result<Tensor<2, Int>, OpsError> {
    let [groups, two, n_keys] = scores.dims();
    debug_assert_eq!(two, 2);
    let device = scores.device();
    let host: Vec<f32> = scores.detach().into_data().iter::<f32>().collect();
    let pairs = pkm::select_from_scores(&host, n_keys, knn)?;
    let ids: Vec<i64> = pairs
        .chunks_exact(2)
        .map(|p| i64::from(p[0]) * n_keys as i64 + i64::from(p[1]))
        .collect();
    Ok(Tensor::from_data(
        TensorData::new(ids, [groups, knn]),
        &device,
    ))
}

/// Weighted embedding-bag with fixed bag size. values: (rows, v_dim);
/// indices, weights: (bags, bag) → (bags, v_dim), `out[b] = Σ_j w[b,j] · values[idx[b,j]]`.
pub fn embedding_bag(values: Tensor<2>, indices: Tensor<2, Int>, weights: Tensor<2>) -> Tensor<2> {
    let [bags, bag] = indices.dims();
    let [_, v_dim] = values.dims();
    let rows = values.select(0, indices.reshape([bags * bag]));
    // (bags, bag, v_dim) * (bags, bag, 1) summed over the bag
    let rows: Tensor<3> = rows.reshape([bags, bag, v_dim]);
    let w: Tensor<3> = weights.reshape([bags, bag, 1]);
    (rows * w).sum_dim(1).reshape([bags, v_dim])
}
