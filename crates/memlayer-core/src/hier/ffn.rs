//! SwiGLU FFN over `[anchor units | block_1 units | .. | block_L units]` (DESIGN §2).
//!
//! For one token `x` (d):
//! ```text
//! g = W_gate x          # (R,)   R = r_0 + r_1 + .. + r_L
//! u = W_up x            # (R,)
//! h = silu(g) ⊙ u       # (R,)
//! y = W_down h          # (d,)
//! ```
//! where the R hidden units are the anchor's `r_0` units followed by each
//! fetched block's `r_l` units, in the order the blocks are given. No biases
//! (Llama-style).
//!
//! # Layout
//! Every set of units (the anchor and each memory block) is an [`FfnBlock`]
//! holding three row-major `(r, d)` matrices, one row per hidden unit:
//! - `gate`: rows of `W_gate` (torch `w1.weight`, shape `(r, d)`),
//! - `up`: rows of `W_up` (torch `w3.weight`, shape `(r, d)`),
//! - `down`: **`W_down` transposed**, `(r, d)`: row `j` is the column of
//!   `W_down` (torch `w2.weight`, shape `(d, r)`) belonging to unit `j`.
//!
//! With this convention concatenating units (anchor + blocks) is a plain
//! concatenation of rows of each of the three matrices, and a block's page is
//! contiguous (see [`FfnBlock::to_page`]). [`FfnBlock::from_torch`] and
//! [`FfnBlock::down_torch`] convert from/to torch's `(d, r)` down layout.
//!
//! # Summation order (part of the oracle contract)
//! - `g_j = Σ_i x_i gate[j,i]` and `u_j = Σ_i x_i up[j,i]` are sequential f32
//!   dot products over `i = 0..d` ([`crate::linalg::dot`]).
//! - `y_o` starts at `+0.0` and adds `h_j * down[j,o]` for `j` in unit order:
//!   anchor units first, then block 1, block 2, ... This is exactly
//!   [`crate::linalg::linear`] over the concatenated weights, and it makes a
//!   block whose `down` is zero leave `y` unchanged bit for bit (it only adds
//!   `±0.0` to accumulators that can never be `-0.0`).
//! - Backward accumulates over tokens in order, and `dx` over units in order
//!   (gate term then up term per unit).

use crate::error::{OracleError, check_len};
use crate::linalg::{dot, silu, silu_grad};
use crate::rng::Rng;

/// A set of `r` SwiGLU hidden units of width `d`: the anchor FFN or one
/// FFN-memory block (also used for their gradients).
///
/// All three matrices are row-major `(r, d)`; `down` is `W_down` transposed
/// (see the module docs). `r == 0` is allowed (a level without units).
#[derive(Debug, Clone, PartialEq)]
pub struct FfnBlock {
    /// Number of hidden units.
    pub r: usize,
    /// Model width.
    pub d: usize,
    /// `W_gate` rows, (r, d).
    pub gate: Vec<f32>,
    /// `W_up` rows, (r, d).
    pub up: Vec<f32>,
    /// `W_down` transposed, (r, d).
    pub down: Vec<f32>,
}

fn matrix_len(r: usize, d: usize) -> Result<usize, OracleError> {
    if d == 0 {
        return Err(OracleError::InvalidConfig(
            "FFN width d must be positive".into(),
        ));
    }
    r.checked_mul(d)
        .and_then(|n| n.checked_mul(3).map(|_| n))
        .ok_or_else(|| OracleError::InvalidConfig(format!("FFN block {r} x {d} is too large")))
}

impl FfnBlock {
    /// Number of f32 values in the page payload of an `(r, d)` block: `3 r d`.
    pub fn page_len(r: usize, d: usize) -> Result<usize, OracleError> {
        Ok(3 * matrix_len(r, d)?)
    }

    /// All-zero block.
    pub fn zeros(r: usize, d: usize) -> Result<Self, OracleError> {
        let n = matrix_len(r, d)?;
        Ok(Self {
            r,
            d,
            gate: vec![0.0; n],
            up: vec![0.0; n],
            down: vec![0.0; n],
        })
    }

    /// A fresh FFN-memory block: `gate`, `up` ~ N(0, std = d^-1/2) like the
    /// anchor, `down` = 0 so the block is a no-op until trained.
    ///
    /// Draws `r d` normals for `gate`, then `r d` for `up`, from `rng`.
    pub fn init(r: usize, d: usize, rng: &mut Rng) -> Result<Self, OracleError> {
        let n = matrix_len(r, d)?;
        let std = 1.0 / (d as f32).sqrt();
        let gate = rng.normal_vec(n, 0.0, std);
        let up = rng.normal_vec(n, 0.0, std);
        Ok(Self {
            r,
            d,
            gate,
            up,
            down: vec![0.0; n],
        })
    }

    /// A dense (anchor) SwiGLU: `gate`, `up` ~ N(0, std = d^-1/2), `down` ~
    /// N(0, std = r^-1/2). Draws `gate`, then `up`, then `down` from `rng`.
    pub fn init_anchor(r: usize, d: usize, rng: &mut Rng) -> Result<Self, OracleError> {
        let mut b = Self::init(r, d, rng)?;
        let std = 1.0 / (r.max(1) as f32).sqrt();
        b.down = rng.normal_vec(b.gate.len(), 0.0, std);
        Ok(b)
    }

    /// Builds a block from its three `(r, d)` matrices (`down` transposed).
    pub fn from_parts(
        r: usize,
        d: usize,
        gate: Vec<f32>,
        up: Vec<f32>,
        down: Vec<f32>,
    ) -> Result<Self, OracleError> {
        matrix_len(r, d)?;
        let b = Self {
            r,
            d,
            gate,
            up,
            down,
        };
        b.validate()?;
        Ok(b)
    }

    /// Builds a block from torch layouts: gate (r, d), up (r, d), down (d, r).
    pub fn from_torch(
        r: usize,
        d: usize,
        gate: Vec<f32>,
        up: Vec<f32>,
        down_dr: &[f32],
    ) -> Result<Self, OracleError> {
        matrix_len(r, d)?;
        check_len("ffn down (torch)", down_dr, &[d, r])?;
        Self::from_parts(r, d, gate, up, transpose(down_dr, d, r))
    }

    /// `W_down` in torch layout, (d, r).
    pub fn down_torch(&self) -> Vec<f32> {
        transpose(&self.down, self.r, self.d)
    }

    /// Checks that the three matrices have `r * d` elements each.
    pub fn validate(&self) -> Result<(), OracleError> {
        matrix_len(self.r, self.d)?;
        check_len("ffn gate", &self.gate, &[self.r, self.d])?;
        check_len("ffn up", &self.up, &[self.r, self.d])?;
        check_len("ffn down", &self.down, &[self.r, self.d])
    }

    /// The page payload: `[gate (r, d) | up (r, d) | down (r, d)]`, each
    /// row-major, `down` transposed as stored here; `3 r d` values.
    pub fn to_page(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(3 * self.gate.len());
        out.extend_from_slice(&self.gate);
        out.extend_from_slice(&self.up);
        out.extend_from_slice(&self.down);
        out
    }

    /// Writes the page payload (see [`Self::to_page`]) into `out` (3 r d).
    pub fn write_page(&self, out: &mut [f32]) -> Result<(), OracleError> {
        self.validate()?;
        check_len("ffn page", out, &[3, self.r, self.d])?;
        let n = self.gate.len();
        out[..n].copy_from_slice(&self.gate);
        out[n..2 * n].copy_from_slice(&self.up);
        out[2 * n..].copy_from_slice(&self.down);
        Ok(())
    }

    /// Reads a block from its page payload (see [`Self::to_page`]), `3 r d` values.
    pub fn from_page(r: usize, d: usize, page: &[f32]) -> Result<Self, OracleError> {
        let n = matrix_len(r, d)?;
        check_len("ffn page", page, &[3, r, d])?;
        Ok(Self {
            r,
            d,
            gate: page[..n].to_vec(),
            up: page[n..2 * n].to_vec(),
            down: page[2 * n..].to_vec(),
        })
    }

    /// Concatenates the units of `parts` in order into one block of
    /// `Σ r` units (all parts must share `d`).
    pub fn concat(parts: &[&FfnBlock]) -> Result<Self, OracleError> {
        let Some(first) = parts.first() else {
            return Err(OracleError::InvalidConfig(
                "FfnBlock::concat needs at least one part".into(),
            ));
        };
        let d = first.d;
        let r = check_parts(parts, d)?;
        let mut out = Self::zeros(r, d)?;
        let mut off = 0;
        for p in parts {
            let n = p.gate.len();
            out.gate[off..off + n].copy_from_slice(&p.gate);
            out.up[off..off + n].copy_from_slice(&p.up);
            out.down[off..off + n].copy_from_slice(&p.down);
            off += n;
        }
        Ok(out)
    }
}

/// Row-major transpose of a (rows, cols) matrix into (cols, rows).
fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; a.len()];
    for i in 0..rows {
        for j in 0..cols {
            out[j * rows + i] = a[i * cols + j];
        }
    }
    out
}

/// Validates every part against width `d`; returns the total number of units.
fn check_parts(parts: &[&FfnBlock], d: usize) -> Result<usize, OracleError> {
    let mut r = 0usize;
    for p in parts {
        p.validate()?;
        if p.d != d {
            return Err(OracleError::Shape {
                what: "ffn block width",
                shape: format!("[{d}]"),
                expected: d,
                got: p.d,
            });
        }
        r = r
            .checked_add(p.r)
            .ok_or_else(|| OracleError::InvalidConfig("too many FFN units".into()))?;
    }
    Ok(r)
}

/// `[anchor, blocks..]` after validating shapes against `x` (t, d).
fn gather<'a>(
    x: &[f32],
    t: usize,
    anchor: &'a FfnBlock,
    blocks: &[&'a FfnBlock],
) -> Result<Vec<&'a FfnBlock>, OracleError> {
    let mut parts = Vec::with_capacity(1 + blocks.len());
    parts.push(anchor);
    parts.extend_from_slice(blocks);
    check_parts(&parts, anchor.d)?;
    check_len("ffn input x", x, &[t, anchor.d])?;
    Ok(parts)
}

/// Pre-activations of one token over all units in order: `(g, u)`, each (R,).
fn pre_activations(xr: &[f32], parts: &[&FfnBlock]) -> (Vec<f32>, Vec<f32>) {
    let mut g = Vec::new();
    let mut u = Vec::new();
    for p in parts {
        for j in 0..p.r {
            let row = j * p.d..(j + 1) * p.d;
            g.push(dot(xr, &p.gate[row.clone()]));
            u.push(dot(xr, &p.up[row]));
        }
    }
    (g, u)
}

/// Hidden activations `h = silu(W_gate x) ⊙ (W_up x)` over
/// `[anchor | blocks..]`. x: (t, d) → h: (t, R), `R = anchor.r + Σ block.r`.
pub fn ffn_hidden(
    x: &[f32],
    t: usize,
    anchor: &FfnBlock,
    blocks: &[&FfnBlock],
) -> Result<Vec<f32>, OracleError> {
    let parts = gather(x, t, anchor, blocks)?;
    let d = anchor.d;
    let mut h = Vec::new();
    for xr in x.chunks_exact(d).take(t) {
        let (g, u) = pre_activations(xr, &parts);
        h.extend(g.iter().zip(&u).map(|(&gj, &uj)| silu(gj) * uj));
    }
    Ok(h)
}

/// Forward of the FFN over `[anchor | blocks..]` (one context's fetched
/// blocks, shared by its `t` tokens). x: (t, d) → y: (t, d).
///
/// With `blocks` empty this is a plain SwiGLU. Summation order: see the
/// module docs.
pub fn ffn_forward(
    x: &[f32],
    t: usize,
    anchor: &FfnBlock,
    blocks: &[&FfnBlock],
) -> Result<Vec<f32>, OracleError> {
    let h = ffn_hidden(x, t, anchor, blocks)?;
    let d = anchor.d;
    // unit k's row of `down`: the anchor's units, then each block's (validated above)
    let r = anchor.r + blocks.iter().map(|b| b.r).sum::<usize>();
    let down = || {
        std::iter::once(anchor)
            .chain(blocks.iter().copied())
            .flat_map(|p| p.down.chunks_exact(d))
    };
    let mut y = vec![0.0f32; t * d];
    for (hr, yr) in h.chunks_exact(r.max(1)).zip(y.chunks_exact_mut(d)) {
        for (&hk, dn) in hr.iter().zip(down()) {
            for (yo, &w) in yr.iter_mut().zip(dn) {
                *yo += hk * w;
            }
        }
    }
    Ok(y)
}

/// Gradients of [`ffn_backward`].
#[derive(Debug, Clone, PartialEq)]
pub struct FfnGrads {
    /// dL/dx, (t, d).
    pub dx: Vec<f32>,
    /// dL/d(anchor weights), same layout as the anchor.
    pub anchor: FfnBlock,
    /// dL/d(block weights), one per fetched block, in the order given.
    pub blocks: Vec<FfnBlock>,
}

/// Backward of [`ffn_forward`]. x: (t, d), dy = dL/dy: (t, d).
///
/// Returns `dx` (t, d) and the gradients of the anchor and of every fetched
/// block (blocks not passed in get none). Per token and unit `j`:
/// `dh = dy · down_j`, `d down_j += h dy`, `dg = dh u silu'(g)`,
/// `du = dh silu(g)`, `d gate_j += dg x`, `d up_j += du x`,
/// `dx += dg gate_j` then `dx += du up_j`. Tokens and units are accumulated
/// in order.
pub fn ffn_backward(
    x: &[f32],
    t: usize,
    anchor: &FfnBlock,
    blocks: &[&FfnBlock],
    dy: &[f32],
) -> Result<FfnGrads, OracleError> {
    let parts = gather(x, t, anchor, blocks)?;
    let d = anchor.d;
    check_len("ffn output grad dy", dy, &[t, d])?;
    let mut grads = parts
        .iter()
        .map(|p| FfnBlock::zeros(p.r, d))
        .collect::<Result<Vec<_>, _>>()?;
    let mut dx = vec![0.0f32; t * d];
    for ((xr, dyr), dxr) in x
        .chunks_exact(d)
        .zip(dy.chunks_exact(d))
        .zip(dx.chunks_exact_mut(d))
    {
        let (g, u) = pre_activations(xr, &parts);
        let mut k = 0;
        for (p, gp) in parts.iter().zip(grads.iter_mut()) {
            for j in 0..p.r {
                let row = j * d..(j + 1) * d;
                let (gk, uk) = (g[k], u[k]);
                k += 1;
                let s = silu(gk);
                let dh = dot(dyr, &p.down[row.clone()]);
                axpy(s * uk, dyr, &mut gp.down[row.clone()]);
                let dg = dh * uk * silu_grad(gk);
                let du = dh * s;
                axpy(dg, xr, &mut gp.gate[row.clone()]);
                axpy(du, xr, &mut gp.up[row.clone()]);
                axpy(dg, &p.gate[row.clone()], dxr);
                axpy(du, &p.up[row], dxr);
            }
        }
    }
    let anchor_grad = grads.remove(0);
    Ok(FfnGrads {
        dx,
        anchor: anchor_grad,
        blocks: grads,
    })
}

/// `y += a x`, sequential.
#[inline]
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::linear;

    /// Plain SwiGLU via `linalg::linear` with torch layouts (independent reference).
    fn swiglu_ref(x: &[f32], t: usize, w: &FfnBlock) -> Vec<f32> {
        let (r, d) = (w.r, w.d);
        let g = linear(x, t, d, &w.gate, &[], r);
        let u = linear(x, t, d, &w.up, &[], r);
        let h: Vec<f32> = g.iter().zip(&u).map(|(&a, &b)| silu(a) * b).collect();
        linear(&h, t, r, &w.down_torch(), &[], d)
    }

    /// A block with every matrix random (down non-zero), for gradient checks.
    fn dense_block(r: usize, d: usize, rng: &mut Rng) -> FfnBlock {
        FfnBlock::init_anchor(r, d, rng).unwrap()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn empty_block_list_is_plain_swiglu_bit_exact() {
        let mut rng = Rng::new(1);
        let (t, d, r) = (4, 7, 9);
        let a = dense_block(r, d, &mut rng);
        let x = rng.normal_vec(t * d, 0.0, 1.0);
        let y = ffn_forward(&x, t, &a, &[]).unwrap();
        assert_eq!(bits(&y), bits(&swiglu_ref(&x, t, &a)));
    }

    #[test]
    fn zero_down_and_all_zero_blocks_leave_output_bit_identical() {
        let mut rng = Rng::new(2);
        let (t, d, r) = (5, 8, 6);
        let a = dense_block(r, d, &mut rng);
        let x = rng.normal_vec(t * d, 0.0, 1.0);
        let fresh1 = FfnBlock::init(4, d, &mut rng).unwrap();
        let fresh2 = FfnBlock::init(3, d, &mut rng).unwrap();
        assert!(fresh1.down.iter().all(|&v| v == 0.0));
        assert!(fresh1.gate.iter().any(|&v| v != 0.0));
        let zero = FfnBlock::zeros(5, d).unwrap();
        let empty = FfnBlock::zeros(0, d).unwrap();
        let base = ffn_forward(&x, t, &a, &[]).unwrap();
        for blocks in [
            vec![&fresh1],
            vec![&zero],
            vec![&fresh1, &zero, &fresh2, &empty],
        ] {
            let y = ffn_forward(&x, t, &a, &blocks).unwrap();
            assert_eq!(bits(&y), bits(&base));
        }
        // Backward too: dx and the anchor gradients are unchanged bit for bit,
        // a fresh block gets no gate/up gradient and down grad = h ⊗ dy.
        let dy = rng.normal_vec(t * d, 0.0, 1.0);
        let g0 = ffn_backward(&x, t, &a, &[], &dy).unwrap();
        let g1 = ffn_backward(&x, t, &a, &[&fresh1, &zero], &dy).unwrap();
        assert_eq!(bits(&g0.dx), bits(&g1.dx));
        assert_eq!(g0.anchor, g1.anchor);
        assert_eq!(g1.blocks.len(), 2);
        assert!(g1.blocks[0].gate.iter().all(|&v| v == 0.0));
        assert!(g1.blocks[0].up.iter().all(|&v| v == 0.0));
        let h = ffn_hidden(&x, t, &fresh1, &[]).unwrap();
        let mut want = vec![0.0f32; fresh1.r * d];
        for tok in 0..t {
            for j in 0..fresh1.r {
                for o in 0..d {
                    want[j * d + o] += h[tok * fresh1.r + j] * dy[tok * d + o];
                }
            }
        }
        assert_eq!(bits(&g1.blocks[0].down), bits(&want));
    }

    #[test]
    fn blocks_equal_concatenated_swiglu_bit_exact() {
        let mut rng = Rng::new(3);
        let (t, d) = (6, 5);
        let a = dense_block(4, d, &mut rng);
        let b1 = dense_block(3, d, &mut rng);
        let b2 = dense_block(0, d, &mut rng);
        let b3 = dense_block(2, d, &mut rng);
        let x = rng.normal_vec(t * d, 0.0, 1.0);
        let y = ffn_forward(&x, t, &a, &[&b1, &b2, &b3]).unwrap();
        let cat = FfnBlock::concat(&[&a, &b1, &b2, &b3]).unwrap();
        assert_eq!(cat.r, 9);
        assert_eq!(bits(&y), bits(&ffn_forward(&x, t, &cat, &[]).unwrap()));
        assert_eq!(bits(&y), bits(&swiglu_ref(&x, t, &cat)));
        // hidden units are laid out [anchor | b1 | b2 | b3]
        let h = ffn_hidden(&x, t, &a, &[&b1, &b2, &b3]).unwrap();
        assert_eq!(bits(&h), bits(&ffn_hidden(&x, t, &cat, &[]).unwrap()));
        // and the backward of the concatenation splits into the parts
        let dy = rng.normal_vec(t * d, 0.0, 1.0);
        let gs = ffn_backward(&x, t, &a, &[&b1, &b2, &b3], &dy).unwrap();
        let gc = ffn_backward(&x, t, &cat, &[], &dy).unwrap();
        assert_eq!(bits(&gs.dx), bits(&gc.dx));
        let parts: Vec<&FfnBlock> = std::iter::once(&gs.anchor).chain(&gs.blocks).collect();
        assert_eq!(FfnBlock::concat(&parts).unwrap(), gc.anchor);
    }

    #[test]
    fn page_round_trip_and_layout() {
        let mut rng = Rng::new(4);
        let b = dense_block(3, 4, &mut rng);
        let page = b.to_page();
        assert_eq!(page.len(), FfnBlock::page_len(3, 4).unwrap());
        assert_eq!(&page[..12], &b.gate[..]);
        assert_eq!(&page[12..24], &b.up[..]);
        assert_eq!(&page[24..], &b.down[..]);
        assert_eq!(FfnBlock::from_page(3, 4, &page).unwrap(), b);
        let mut buf = vec![0.0; 36];
        b.write_page(&mut buf).unwrap();
        assert_eq!(buf, page);
        // torch layout round trip: down (d, r)
        let dt = b.down_torch();
        assert_eq!(dt[4 * 3 - 1], b.down[2 * 4 + 3]); // W_down[3, 2]
        let b2 = FfnBlock::from_torch(3, 4, b.gate.clone(), b.up.clone(), &dt).unwrap();
        assert_eq!(b2, b);
    }

    #[test]
    fn bad_shapes_are_errors() {
        let mut rng = Rng::new(5);
        let a = dense_block(3, 4, &mut rng);
        let other = dense_block(2, 5, &mut rng);
        let x = vec![0.0; 8];
        assert!(ffn_forward(&x, 3, &a, &[]).is_err());
        assert!(ffn_forward(&x, 2, &a, &[&other]).is_err());
        assert!(ffn_backward(&x, 2, &a, &[], &[0.0; 7]).is_err());
        assert!(FfnBlock::from_page(3, 4, &[0.0; 35]).is_err());
        assert!(FfnBlock::zeros(3, 0).is_err());
        assert!(FfnBlock::zeros(usize::MAX, 2).is_err());
        assert!(FfnBlock::from_parts(2, 2, vec![0.0; 4], vec![0.0; 4], vec![0.0; 3]).is_err());
        let mut broken = a.clone();
        broken.up.pop();
        assert!(ffn_forward(&x, 2, &broken, &[]).is_err());
        assert!(ffn_forward(&x, 2, &a, &[&broken]).is_err());
        assert!(FfnBlock::concat(&[]).is_err());
        let mut buf = vec![0.0; 10];
        assert!(a.write_page(&mut buf).is_err());
        // t = 0 is fine
        assert_eq!(ffn_forward(&[], 0, &a, &[]).unwrap(), Vec::<f32>::new());
    }

    /// L = Σ r ⊙ y in f64.
    fn loss(x: &[f32], t: usize, a: &FfnBlock, bl: &[FfnBlock], r: &[f32]) -> f64 {
        let refs: Vec<&FfnBlock> = bl.iter().collect();
        let y = ffn_forward(x, t, a, &refs).unwrap();
        y.iter().zip(r).map(|(&a, &b)| a as f64 * b as f64).sum()
    }

    /// Central differences of `loss` w.r.t. each entry reached by `get`.
    fn check_grad(
        name: &str,
        analytic: &[f32],
        mut eval: impl FnMut(usize, f32) -> f64,
        base: impl Fn(usize) -> f32,
    ) {
        let eps = 1e-2f32;
        let (mut diff2, mut norm2) = (0.0f64, 0.0f64);
        for (i, &an) in analytic.iter().enumerate() {
            let w = base(i);
            let (wp, wm) = (w + eps, w - eps);
            let fd = (eval(i, wp) - eval(i, wm)) / (wp as f64 - wm as f64);
            let an = an as f64;
            assert!(
                (fd - an).abs() <= 2e-3 + 1e-2 * an.abs(),
                "{name}[{i}]: fd {fd} vs analytic {an}"
            );
            diff2 += (fd - an).powi(2);
            norm2 += an * an;
        }
        assert!(norm2 > 0.0, "{name}: gradient is identically zero");
        assert!(
            diff2.sqrt() <= 1e-2 * norm2.sqrt(),
            "{name}: |fd - analytic| = {} vs |analytic| = {}",
            diff2.sqrt(),
            norm2.sqrt()
        );
    }

    #[test]
    fn finite_differences_match_every_gradient() {
        let mut rng = Rng::new(6);
        let (t, d) = (3, 5);
        let anchor = dense_block(4, d, &mut rng);
        let blocks = vec![
            dense_block(3, d, &mut rng),
            dense_block(0, d, &mut rng),
            dense_block(2, d, &mut rng),
        ];
        let x = rng.normal_vec(t * d, 0.0, 1.0);
        let r = rng.normal_vec(t * d, 0.0, 1.0);
        let refs: Vec<&FfnBlock> = blocks.iter().collect();
        let g = ffn_backward(&x, t, &anchor, &refs, &r).unwrap();
        assert_eq!(g.blocks.len(), 3);
        assert_eq!(g.dx.len(), x.len());

        check_grad(
            "dx",
            &g.dx,
            |i, v| {
                let mut xp = x.clone();
                xp[i] = v;
                loss(&xp, t, &anchor, &blocks, &r)
            },
            |i| x[i],
        );

        type Field = fn(&mut FfnBlock) -> &mut Vec<f32>;
        let fields: [(&str, Field); 3] = [
            ("gate", |b| &mut b.gate),
            ("up", |b| &mut b.up),
            ("down", |b| &mut b.down),
        ];
        // which = None: the anchor; Some(k): block k.
        for which in [None, Some(0), Some(1), Some(2)] {
            for (fname, field) in fields {
                let mut gw = match which {
                    None => g.anchor.clone(),
                    Some(k) => g.blocks[k].clone(),
                };
                let analytic = field(&mut gw).clone();
                let mut base_block = match which {
                    None => anchor.clone(),
                    Some(k) => blocks[k].clone(),
                };
                let base = field(&mut base_block).clone();
                if base.is_empty() {
                    assert!(analytic.is_empty());
                    continue;
                }
                assert_eq!(analytic.len(), base.len());
                check_grad(
                    &format!("{which:?}.{fname}"),
                    &analytic,
                    |i, v| {
                        let (mut a, mut bl) = (anchor.clone(), blocks.clone());
                        let target = match which {
                            None => &mut a,
                            Some(k) => &mut bl[k],
                        };
                        field(target)[i] = v;
                        loss(&x, t, &a, &bl, &r)
                    },
                    |i| base[i],
                );
            }
        }
    }
}
