//! Embedding-bag, sum mode with per-sample weights (`torch.nn.functional.embedding_bag`
//! with `mode="sum"` and `per_sample_weights`), forward and backward.
//!
//! Bags are given CSR-style, as torch does: `indices`/`weights` hold all
//! bags' entries back to back and `offsets` (len `bags + 1`, non-decreasing,
//! starting at 0 and ending at `indices.len()`) marks where each bag starts.
//! An empty bag (`offsets[b] == offsets[b + 1]`) yields a zero row.
//!
//! Accumulation order is part of the contract (so GPU kernels can match it
//! bit for bit where they choose to): the forward sums a bag's entries in
//! order; the table gradient sums, per row, the contributions in ascending
//! entry position (Meta's `reverse_indices` order).

use crate::error::{OracleError, check_len};

/// Offsets of `bags` bags of `bag_size` entries each.
pub fn uniform_offsets(bags: usize, bag_size: usize) -> Vec<usize> {
    (0..=bags).map(|b| b * bag_size).collect()
}

/// A CSR batch of bags (see the module docs): what every bag op takes.
#[derive(Clone, Copy, Debug)]
pub struct Bags<'a> {
    /// Table rows of all bags' entries, back to back.
    pub indices: &'a [u32],
    /// Weight of each entry.
    pub weights: &'a [f32],
    /// Start of each bag in `indices` (bags + 1).
    pub offsets: &'a [usize],
}

impl Bags<'_> {
    /// [`check_bags`] against a table of `rows` rows → the number of bags.
    pub fn check(&self, rows: usize) -> Result<usize, OracleError> {
        check_bags(rows, self.indices, self.weights, self.offsets)
    }
}

/// Checks a CSR batch of bags against a table of `rows` rows (what every
/// bag op, CPU or GPU, checks before it runs) → the number of bags.
pub fn check_bags(
    rows: usize,
    indices: &[u32],
    weights: &[f32],
    offsets: &[usize],
) -> Result<usize, OracleError> {
    if weights.len() != indices.len() {
        return Err(OracleError::Shape {
            what: "per_sample_weights",
            shape: format!("[{}] (one per index)", indices.len()),
            expected: indices.len(),
            got: weights.len(),
        });
    }
    let bags = offsets.len().checked_sub(1).ok_or_else(|| {
        OracleError::InvalidConfig("offsets must have bags + 1 entries (at least one)".into())
    })?;
    if offsets[0] != 0 || offsets[bags] != indices.len() {
        return Err(OracleError::InvalidConfig(format!(
            "offsets must start at 0 and end at {} (got {} .. {})",
            indices.len(),
            offsets[0],
            offsets[bags]
        )));
    }
    if offsets.windows(2).any(|w| w[0] > w[1]) {
        return Err(OracleError::InvalidConfig(
            "offsets must be non-decreasing".into(),
        ));
    }
    if let Some(&bad) = indices.iter().find(|&&i| i as usize >= rows) {
        return Err(OracleError::IndexOutOfRange {
            index: bad as u64,
            rows,
        });
    }
    Ok(bags)
}

/// Forward: `out[b] = Σ_{e in bag b} weights[e] * table[indices[e]]`.
///
/// table: (rows, dim); indices, weights: (nnz); offsets: (bags + 1) → (bags, dim).
pub fn bag_forward(
    table: &[f32],
    rows: usize,
    dim: usize,
    indices: &[u32],
    weights: &[f32],
    offsets: &[usize],
) -> Result<Vec<f32>, OracleError> {
    check_len("table", table, &[rows, dim])?;
    let bags = check_bags(rows, indices, weights, offsets)?;
    let mut out = vec![0.0f32; bags * dim];
    for b in 0..bags {
        let acc = &mut out[b * dim..(b + 1) * dim];
        for e in offsets[b]..offsets[b + 1] {
            let w = weights[e];
            let row = &table[indices[e] as usize * dim..(indices[e] as usize + 1) * dim];
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += w * v;
            }
        }
    }
    Ok(out)
}

/// Gradient rows of a table: `rows` sorted ascending and unique, `grads` (rows.len(), dim).
#[derive(Clone, Debug, PartialEq)]
pub struct SparseRows {
    /// Row width.
    pub dim: usize,
    /// Touched row ids, ascending, unique.
    pub rows: Vec<u32>,
    /// (rows.len(), dim) gradient of each touched row.
    pub grads: Vec<f32>,
}

impl SparseRows {
    /// An empty gradient of row width `dim`.
    pub fn empty(dim: usize) -> Self {
        Self {
            dim,
            rows: Vec::new(),
            grads: Vec::new(),
        }
    }

    /// The gradient of `row`, if it was touched.
    pub fn get(&self, row: u32) -> Option<&[f32]> {
        let i = self.rows.binary_search(&row).ok()?;
        Some(&self.grads[i * self.dim..(i + 1) * self.dim])
    }

    /// Dense (n_rows, dim) gradient with zeros in untouched rows.
    pub fn to_dense(&self, n_rows: usize) -> Vec<f32> {
        let mut dense = vec![0.0f32; n_rows * self.dim];
        for (i, &r) in self.rows.iter().enumerate() {
            dense[r as usize * self.dim..(r as usize + 1) * self.dim]
                .copy_from_slice(&self.grads[i * self.dim..(i + 1) * self.dim]);
        }
        dense
    }
}

/// Table gradient: `dtable[indices[e]] += weights[e] * grad_out[bag(e)]`, summed
/// per row in ascending entry position. grad_out: (bags, dim).
pub fn bag_backward_table(
    rows: usize,
    dim: usize,
    indices: &[u32],
    weights: &[f32],
    offsets: &[usize],
    grad_out: &[f32],
) -> Result<SparseRows, OracleError> {
    let bags = check_bags(rows, indices, weights, offsets)?;
    check_len("grad_out", grad_out, &[bags, dim])?;
    // bag of each entry
    let mut bag_of = vec![0usize; indices.len()];
    for b in 0..bags {
        bag_of[offsets[b]..offsets[b + 1]].fill(b);
    }
    // entries sorted by (row, position): the reverse index
    let mut order: Vec<usize> = (0..indices.len()).collect();
    order.sort_by_key(|&e| (indices[e], e));
    let mut out = SparseRows::empty(dim);
    for &e in &order {
        let r = indices[e];
        if out.rows.last() != Some(&r) {
            out.rows.push(r);
            out.grads.extend(std::iter::repeat_n(0.0, dim));
        }
        let base = out.grads.len() - dim;
        let g = &grad_out[bag_of[e] * dim..(bag_of[e] + 1) * dim];
        for (acc, &gv) in out.grads[base..].iter_mut().zip(g) {
            *acc += weights[e] * gv;
        }
    }
    Ok(out)
}

/// Per-sample-weight gradient: `dweights[e] = dot(table[indices[e]], grad_out[bag(e)])`.
pub fn bag_backward_weights(
    table: &[f32],
    rows: usize,
    dim: usize,
    indices: &[u32],
    offsets: &[usize],
    grad_out: &[f32],
) -> Result<Vec<f32>, OracleError> {
    check_len("table", table, &[rows, dim])?;
    let zeros = vec![0.0f32; indices.len()];
    let bags = check_bags(rows, indices, &zeros, offsets)?;
    check_len("grad_out", grad_out, &[bags, dim])?;
    let mut dw = vec![0.0f32; indices.len()];
    for b in 0..bags {
        let g = &grad_out[b * dim..(b + 1) * dim];
        for e in offsets[b]..offsets[b + 1] {
            let r = indices[e] as usize;
            dw[e] = crate::linalg::dot(&table[r * dim..(r + 1) * dim], g);
        }
    }
    Ok(dw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn forward_by_hand_with_an_empty_bag() {
        // table (3, 2)
        let table = [1.0, 2.0, 10.0, 20.0, 100.0, 200.0];
        let out = bag_forward(&table, 3, 2, &[2, 0, 1], &[0.5, 2.0, 1.0], &[0, 2, 2, 3]).unwrap();
        assert_eq!(out, vec![52.0, 104.0, 0.0, 0.0, 10.0, 20.0]);
    }

    #[test]
    fn rejects_bad_bags() {
        let table = [0.0; 4];
        assert!(matches!(
            bag_forward(&table, 2, 2, &[2], &[1.0], &[0, 1]),
            Err(OracleError::IndexOutOfRange { index: 2, rows: 2 })
        ));
        assert!(bag_forward(&table, 2, 2, &[0], &[1.0], &[0, 2]).is_err());
        assert!(bag_forward(&table, 2, 2, &[0, 1], &[1.0, 1.0], &[0, 2, 1, 2]).is_err());
        assert!(bag_forward(&table, 2, 2, &[0], &[], &[0, 1]).is_err());
        assert!(bag_forward(&table, 2, 2, &[], &[], &[]).is_err());
    }

    /// Finite differences of L = Σ r ⊙ out w.r.t. table entries and weights (the
    /// function is bilinear, so central differences are exact up to rounding).
    #[test]
    fn gradients_match_finite_differences() {
        let mut rng = Rng::new(5);
        let (rows, dim) = (7, 3);
        let table = rng.normal_vec(rows * dim, 0.0, 1.0);
        // repeated rows in one bag and across bags, plus an empty bag
        let indices = vec![3, 3, 0, 6, 3, 1];
        let weights = rng.normal_vec(indices.len(), 0.0, 1.0);
        let offsets = vec![0, 3, 3, 6];
        let r = rng.normal_vec(3 * dim, 0.0, 1.0);
        let loss = |t: &[f32], w: &[f32]| -> f64 {
            let out = bag_forward(t, rows, dim, &indices, w, &offsets).unwrap();
            out.iter().zip(&r).map(|(&o, &g)| o as f64 * g as f64).sum()
        };
        let dtable = bag_backward_table(rows, dim, &indices, &weights, &offsets, &r)
            .unwrap()
            .to_dense(rows);
        let dw = bag_backward_weights(&table, rows, dim, &indices, &offsets, &r).unwrap();
        let eps = 1e-2f32;
        for i in 0..table.len() {
            let (mut p, mut m) = (table.clone(), table.clone());
            p[i] += eps;
            m[i] -= eps;
            let fd = (loss(&p, &weights) - loss(&m, &weights)) / (2.0 * eps as f64);
            assert!(
                (fd - dtable[i] as f64).abs() < 1e-4,
                "table[{i}]: {fd} vs {}",
                dtable[i]
            );
        }
        for e in 0..weights.len() {
            let (mut p, mut m) = (weights.clone(), weights.clone());
            p[e] += eps;
            m[e] -= eps;
            let fd = (loss(&table, &p) - loss(&table, &m)) / (2.0 * eps as f64);
            assert!(
                (fd - dw[e] as f64).abs() < 1e-4,
                "w[{e}]: {fd} vs {}",
                dw[e]
            );
        }
        let sparse = bag_backward_table(rows, dim, &indices, &weights, &offsets, &r).unwrap();
        assert_eq!(sparse.rows, vec![0, 1, 3, 6]);
        assert!(sparse.get(2).is_none());
    }
}
