//! Dense helpers of the oracle: plain loops, f32, sequential accumulation.
//!
//! Weight layout follows `torch.nn.Linear`: `w` is `(out, in)` row-major, so
//! `y = x @ w^T + b`.

/// `y = x @ w^T + b`. x: (t, n_in), w: (n_out, n_in), b: (n_out) or empty → y: (t, n_out).
pub fn linear(x: &[f32], t: usize, n_in: usize, w: &[f32], b: &[f32], n_out: usize) -> Vec<f32> {
    debug_assert_eq!(x.len(), t * n_in);
    debug_assert_eq!(w.len(), n_out * n_in);
    debug_assert!(b.is_empty() || b.len() == n_out);
    let mut y = vec![0.0f32; t * n_out];
    for r in 0..t {
        let xr = &x[r * n_in..(r + 1) * n_in];
        for o in 0..n_out {
            let acc = dot(xr, &w[o * n_in..(o + 1) * n_in]);
            y[r * n_out + o] = acc + if b.is_empty() { 0.0 } else { b[o] };
        }
    }
    y
}

/// Backward of [`linear`]: accumulates `dw += dy^T x`, `db += sum_t dy` (if `db`
/// is non-empty) and returns `dx = dy @ w`. dy: (t, n_out) → dx: (t, n_in).
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    x: &[f32],
    t: usize,
    n_in: usize,
    w: &[f32],
    n_out: usize,
    dy: &[f32],
    dw: &mut [f32],
    db: &mut [f32],
) -> Vec<f32> {
    debug_assert_eq!(dy.len(), t * n_out);
    let mut dx = vec![0.0f32; t * n_in];
    for r in 0..t {
        let xr = &x[r * n_in..(r + 1) * n_in];
        let dxr = &mut dx[r * n_in..(r + 1) * n_in];
        for o in 0..n_out {
            let g = dy[r * n_out + o];
            if g == 0.0 {
                continue;
            }
            let wo = &w[o * n_in..(o + 1) * n_in];
            let dwo = &mut dw[o * n_in..(o + 1) * n_in];
            for i in 0..n_in {
                dwo[i] += g * xr[i];
                dxr[i] += g * wo[i];
            }
            if !db.is_empty() {
                db[o] += g;
            }
        }
    }
    dx
}

/// Sequential dot product.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = 0.0f32;
    for (x, y) in a.iter().zip(b) {
        acc += x * y;
    }
    acc
}

/// Logistic sigmoid.
#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `silu(x) = x * sigmoid(x)`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

/// `d silu(x) / dx = s (1 + x (1 - s))` with `s = sigmoid(x)`.
#[inline]
pub fn silu_grad(x: f32) -> f32 {
    let s = sigmoid(x);
    s * (1.0 + x * (1.0 - s))
}

/// In-place softmax of one row, computed in f32 with the max subtracted.
pub fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in row.iter_mut() {
        *v /= sum;
    }
}

/// Backward of softmax for one row: `dz = w ⊙ (dw - Σ w dw)`.
pub fn softmax_backward(w: &[f32], dw: &[f32]) -> Vec<f32> {
    let inner: f32 = dot(w, dw);
    w.iter().zip(dw).map(|(&wi, &g)| wi * (g - inner)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_matches_hand_computation() {
        // x: (2, 3), w: (2, 3), b: (2)
        let x = [1.0, 2.0, 3.0, -1.0, 0.5, 0.0];
        let w = [1.0, 0.0, -1.0, 2.0, 1.0, 0.5];
        let b = [0.5, -0.5];
        let y = linear(&x, 2, 3, &w, &b, 2);
        assert_eq!(
            y,
            vec![
                1.0 - 3.0 + 0.5,
                2.0 + 2.0 + 1.5 - 0.5,
                -1.0 + 0.5,
                -2.0 + 0.5 - 0.5
            ]
        );
    }

    #[test]
    fn silu_grad_matches_finite_difference() {
        for &x in &[-4.0f32, -1.0, -0.1, 0.0, 0.3, 2.0, 5.0] {
            let e = 1e-3f64;
            let f = |v: f64| v / (1.0 + (-v).exp());
            let fd = (f(x as f64 + e) - f(x as f64 - e)) / (2.0 * e);
            assert!((fd - silu_grad(x) as f64).abs() < 1e-5, "x={x}");
        }
    }

    #[test]
    fn softmax_sums_to_one_and_is_shift_invariant() {
        let mut a = vec![1.0, 2.0, 3.0, 100.0];
        let mut b = vec![-99.0, -98.0, -97.0, 0.0];
        softmax_in_place(&mut a);
        softmax_in_place(&mut b);
        assert!((a.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-6);
        }
    }
}
