//! Reference forward of the whole decoder (plain loops, f32): the oracle the
//! burn model is tested against.
//!
//! Per layer: `x += Attn(RMSNorm(x))`, `x += FFN(RMSNorm(x))` where FFN is the
//! anchor SwiGLU over `[anchor | one block per level]` or, in memory layers,
//! the product-key memory layer. RoPE rotates the two halves of each head
//! (`x1 cos − x2 sin`, `x1 sin + x2 cos`, frequency `theta^(−2j/head_dim)`).

use super::config::ModelConfig;
use super::params::{ParamStore, VALUES, hier_name, layer_name};
use crate::error::OracleError;
use crate::hier::ffn::{FfnBlock, ffn_forward};
use crate::linalg::{dot, linear, softmax_in_place};
use crate::pkm::{self, PkmGate, PkmParams};

/// RMSNorm of each `d`-wide row of `x`, times `gain`.
pub fn rms_norm(x: &[f32], d: usize, gain: &[f32], eps: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(d) {
        let ms = dot(row, row) / d as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        out.extend(row.iter().zip(gain).map(|(&v, &g)| v * inv * g));
    }
    out
}

/// RoPE angles: (positions, head_dim/2) cos and sin tables.
pub fn rope_tables(positions: usize, head_dim: usize, theta: f32) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(positions * half);
    let mut sin = Vec::with_capacity(positions * half);
    for p in 0..positions {
        for j in 0..half {
            let freq = theta.powf(-2.0 * j as f32 / head_dim as f32);
            let a = p as f32 * freq;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    (cos, sin)
}

/// RoPE of `t` rows of `heads` heads at positions `p0 .. p0 + t`; `cos`,
/// `sin` are tables of at least `p0 + t` positions.
fn rope_in_place(
    x: &mut [f32],
    (p0, t): (usize, usize),
    heads: usize,
    hd: usize,
    cos: &[f32],
    sin: &[f32],
) {
    let half = hd / 2;
    for p in 0..t {
        let at = (p0 + p) * half;
        for h in 0..heads {
            let v = &mut x[(p * heads + h) * hd..][..hd];
            for j in 0..half {
                let (c, s) = (cos[at + j], sin[at + j]);
                let (a, b) = (v[j], v[j + half]);
                v[j] = a * c - b * s;
                v[j + half] = a * s + b * c;
            }
        }
    }
}

/// Keys (RoPE applied) and values of one layer's past positions, for
/// decoding one token at a time: (positions, dim) each.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerKv {
    /// (positions, dim) rotated keys.
    pub k: Vec<f32>,
    /// (positions, dim) values.
    pub v: Vec<f32>,
}

/// Causal multi-head self-attention with RoPE of layer `i`. x: (t, d) → (t, d).
///
/// Without a cache the `t` rows are positions `0..t`. With one, they are the
/// positions after the cached ones, their keys and values are appended to
/// it, and each attends to every cached position and its own predecessors
/// (the same numbers as one call over the whole sequence).
pub fn attention(
    cfg: &ModelConfig,
    s: &ParamStore,
    i: usize,
    x: &[f32],
    t: usize,
    cache: Option<&mut LayerKv>,
) -> Result<Vec<f32>, OracleError> {
    let (d, heads, hd) = (cfg.dim, cfg.n_heads, cfg.head_dim());
    let w = |n: &str| s.data(&layer_name(i, &format!("attention.{n}.weight")));
    let mut q = linear(x, t, d, w("wq")?, &[], d);
    let mut k = linear(x, t, d, w("wk")?, &[], d);
    let v = linear(x, t, d, w("wv")?, &[], d);
    let p0 = cache.as_ref().map_or(0, |c| c.k.len() / d);
    if p0 + t > cfg.max_seq_len {
        return Err(OracleError::InvalidConfig(format!(
            "{} positions exceed max_seq_len {}",
            p0 + t,
            cfg.max_seq_len
        )));
    }
    let (cos, sin) = rope_tables(p0 + t, hd, cfg.rope_theta);
    rope_in_place(&mut q, (p0, t), heads, hd, &cos, &sin);
    rope_in_place(&mut k, (p0, t), heads, hd, &cos, &sin);
    let (k, v) = match cache {
        Some(c) => {
            c.k.extend_from_slice(&k);
            c.v.extend_from_slice(&v);
            (
                std::borrow::Cow::Borrowed(&c.k[..]),
                std::borrow::Cow::Borrowed(&c.v[..]),
            )
        }
        None => (std::borrow::Cow::Owned(k), std::borrow::Cow::Owned(v)),
    };
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0.0f32; t * d];
    let mut att = Vec::with_capacity(p0 + t);
    for h in 0..heads {
        for p in 0..t {
            let qp = &q[(p * heads + h) * hd..][..hd];
            att.clear();
            att.extend((0..=p0 + p).map(|j| dot(qp, &k[(j * heads + h) * hd..][..hd]) * scale));
            softmax_in_place(&mut att);
            let o = &mut out[(p * heads + h) * hd..][..hd];
            for (j, &a) in att.iter().enumerate() {
                for (oo, &vv) in o.iter_mut().zip(&v[(j * heads + h) * hd..][..hd]) {
                    *oo += a * vv;
                }
            }
        }
    }
    Ok(linear(&out, t, d, w("wo")?, &[], d))
}

/// The product-key layer parameters of layer `i` as the oracle's struct.
pub fn pkm_params(cfg: &ModelConfig, s: &ParamStore, i: usize) -> Result<PkmParams, OracleError> {
    let m = |r: &str| -> Result<Vec<f32>, OracleError> {
        Ok(s.data(&layer_name(i, &format!("memory.{r}")))?.to_vec())
    };
    let gated = cfg.pkm.as_ref().is_some_and(|p| p.gated);
    Ok(PkmParams {
        w_q: m("query_proj.weight")?,
        b_q: m("query_proj.bias")?,
        keys: m("keys")?,
        w_s: m("swilu_projection.weight")?,
        b_s: m("swilu_projection.bias")?,
        w_o: m("value_proj.weight")?,
        b_o: m("value_proj.bias")?,
        gate: if gated {
            Some(PkmGate {
                w: m("gate.weight")?,
                b: m("gate.bias")?[0],
            })
        } else {
            None
        },
    })
}

/// The anchor FFN of layer `i` as an [`FfnBlock`].
pub fn anchor_block(cfg: &ModelConfig, s: &ParamStore, i: usize) -> Result<FfnBlock, OracleError> {
    let f = |r: &str| s.data(&layer_name(i, &format!("feed_forward.{r}.weight")));
    FfnBlock::from_torch(
        cfg.ffn_hidden,
        cfg.dim,
        f("w1")?.to_vec(),
        f("w3")?.to_vec(),
        f("w2")?,
    )
}

/// The block of table row `row` at `level` for the `dense_idx`-th dense layer.
pub fn hier_block(
    cfg: &ModelConfig,
    s: &ParamStore,
    level: usize,
    row: usize,
    dense_idx: usize,
) -> Result<FfnBlock, OracleError> {
    let h = cfg
        .hier
        .as_ref()
        .ok_or_else(|| OracleError::InvalidConfig("model has no hierarchical memory".into()))?;
    let p = s.get(&hier_name(level))?;
    let (r, d) = (h.units[level - 1], cfg.dim);
    let layers = cfg.dense_layers().len();
    if row >= h.rows(level) || dense_idx >= layers {
        return Err(OracleError::InvalidConfig(format!(
            "block row {row} / dense layer {dense_idx} out of range at level {level}"
        )));
    }
    let page = 3 * r * d;
    let start = (row * layers + dense_idx) * page;
    FfnBlock::from_page(r, d, &p.data[start..start + page])
}

/// Logits of one sequence. tokens: (t); `block_rows`: one table row per
/// level (the context's path, or generic rows) when the model has a
/// hierarchical memory → (t, vocab).
pub fn forward(
    cfg: &ModelConfig,
    s: &ParamStore,
    tokens: &[u32],
    block_rows: Option<&[usize]>,
) -> Result<Vec<f32>, OracleError> {
    forward_traced(cfg, s, tokens, block_rows, &mut |_, _| {})
}

/// [`forward`], handing each product-key memory layer's forward (its
/// selected rows, weights, …) to `trace` with the layer index, in layer
/// order: what the row layout's co-access counts are gathered from.
pub fn forward_traced(
    cfg: &ModelConfig,
    s: &ParamStore,
    tokens: &[u32],
    block_rows: Option<&[usize]>,
    trace: &mut dyn FnMut(usize, &pkm::PkmForward),
) -> Result<Vec<f32>, OracleError> {
    cfg.validate()?;
    let (d, t) = (cfg.dim, tokens.len());
    if t > cfg.max_seq_len {
        return Err(OracleError::InvalidConfig(format!(
            "{t} tokens exceed max_seq_len {}",
            cfg.max_seq_len
        )));
    }
    let emb = s.data("tok_embeddings.weight")?;
    let mut x = Vec::with_capacity(t * d);
    for &tok in tokens {
        let r = tok as usize;
        if r >= cfg.vocab_size {
            return Err(OracleError::IndexOutOfRange {
                index: tok as u64,
                rows: cfg.vocab_size,
            });
        }
        x.extend_from_slice(&emb[r * d..(r + 1) * d]);
    }
    let mut dense_idx = 0;
    for i in 0..cfg.n_layers {
        let h = rms_norm(
            &x,
            d,
            s.data(&layer_name(i, "attention_norm.weight"))?,
            cfg.norm_eps,
        );
        let a = attention(cfg, s, i, &h, t, None)?;
        x.iter_mut().zip(&a).for_each(|(xv, av)| *xv += av);
        let h = rms_norm(
            &x,
            d,
            s.data(&layer_name(i, "ffn_norm.weight"))?,
            cfg.norm_eps,
        );
        let y = if let (true, Some(c)) = (cfg.is_pkm_layer(i), cfg.pkm_config()) {
            let p = pkm_params(cfg, s, i)?;
            let f = pkm::forward(&c, &p, s.data(VALUES)?, &h, t)?;
            trace(i, &f);
            f.output
        } else {
            let anchor = anchor_block(cfg, s, i)?;
            let mut blocks = Vec::new();
            if let (Some(hs), Some(rows)) = (&cfg.hier, block_rows) {
                if rows.len() != hs.levels {
                    return Err(OracleError::InvalidConfig(format!(
                        "{} block rows for {} levels",
                        rows.len(),
                        hs.levels
                    )));
                }
                for (l, &row) in rows.iter().enumerate() {
                    blocks.push(hier_block(cfg, s, l + 1, row, dense_idx)?);
                }
            }
            dense_idx += 1;
            let refs: Vec<&FfnBlock> = blocks.iter().collect();
            ffn_forward(&h, t, &anchor, &refs)?
        };
        x.iter_mut().zip(&y).for_each(|(xv, yv)| *xv += yv);
    }
    let h = rms_norm(&x, d, s.data("norm.weight")?, cfg.norm_eps);
    let out = if cfg.tie_embeddings {
        emb
    } else {
        s.data("output.weight")?
    };
    Ok(linear(&h, t, d, out, &[], cfg.vocab_size))
}

/// Mean next-token cross-entropy of `tokens[1..]` given `tokens[..t-1]`.
pub fn loss(
    cfg: &ModelConfig,
    s: &ParamStore,
    tokens: &[u32],
    block_rows: Option<&[usize]>,
) -> Result<f32, OracleError> {
    if tokens.len() < 2 {
        return Err(OracleError::InvalidConfig(
            "loss needs at least two tokens".into(),
        ));
    }
    let t = tokens.len() - 1;
    let logits = forward(cfg, s, &tokens[..t], block_rows)?;
    let v = cfg.vocab_size;
    let mut total = 0.0f64;
    for (p, row) in logits.chunks_exact(v).enumerate() {
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let lse = row
            .iter()
            .map(|&z| ((z - m) as f64).exp())
            .sum::<f64>()
            .ln()
            + m as f64;
        total += lse - row[tokens[p + 1] as usize] as f64;
    }
    Ok((total / t as f64) as f32)
}
