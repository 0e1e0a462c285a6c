//! The decoder in burn: one definition for training (autodiff device) and
//! inference (plain device, KV cache).
//!
//! Parameters come from a host [`ParamStore`] (same names and order); each is
//! one leaf tensor, reshaped where used, so gradients map back by position.

use burn::tensor::{Device, Int, Tensor, TensorData, activation};
use memlayer_core::model::params::{VALUES, hier_name, layer_name};
use memlayer_core::model::reference::rope_tables;
use memlayer_core::model::{ModelConfig, ParamStore};

use crate::ops::{MemoryOps, OpsError};
use std::sync::Arc;

/// Errors of the burn model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Config, parameters or inputs rejected.
    #[error(transparent)]
    Oracle(#[from] memlayer_core::error::OracleError),
    /// A memory op failed.
    #[error(transparent)]
    Ops(#[from] OpsError),
    /// Inputs that do not fit the model.
    #[error("{0}")]
    Input(String),
    /// The external memory could not deliver (a page source failed, a page
    /// was corrupt, the budget cannot hold a token's pages...).
    #[error("memory: {0}")]
    Memory(String),
}

/// Memory held outside the model's parameters: a runtime that pages the
/// bank in on demand ([`Model::with_memory`]). It answers the two reads the
/// model makes of its memory, with the same values the resident parameters
/// would give.
pub trait MemorySource: Send + Sync + std::fmt::Debug {
    /// Weighted embedding-bag over the product-key value table:
    /// `out[b] = Σ_j weights[b, j] · values[rows[b * bag + j]]`.
    /// rows: (bags · bag) host row ids; weights: (bags, bag) → (bags, v_dim) on `device`.
    fn values_bag(
        &self,
        rows: &[u32],
        weights: Tensor<2>,
        device: &Device,
    ) -> Result<Tensor<2>, ModelError>;

    /// The FFN-memory blocks of `level` (1-based) at table rows `rows`, one
    /// per sequence: (rows.len(), dense_layers · 3 · units · dim), each row
    /// in the bank page layout (gate, up, down per dense layer).
    fn blocks(
        &self,
        level: usize,
        rows: &[usize],
        device: &Device,
    ) -> Result<Tensor<2>, ModelError>;
}

/// The model's parameters on a device.
#[derive(Clone, Debug)]
pub struct Model {
    cfg: ModelConfig,
    device: Device,
    ops: MemoryOps,
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    /// One flat leaf per parameter, in [`ParamStore`] order.
    tensors: Vec<Tensor<1>>,
    /// Memory outside the parameters ([`Model::with_memory`]).
    memory: Option<Arc<dyn MemorySource>>,
    /// RoPE cos and sin for positions `0..max_seq_len`, (positions, head_dim/2).
    rope: Arc<(Vec<f32>, Vec<f32>)>,
}

/// Per-layer attention cache: keys and values after RoPE, (batch, heads, positions, head_dim).
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    /// Positions already in the cache.
    pub len: usize,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }
}

/// What a forward read from memory, for sparse updates and paging.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MemoryReads {
    /// Per memory layer: the value rows read, (tokens, heads, knn) flattened.
    pub value_rows: Vec<Vec<u32>>,
    /// Per level: the block table row used by each sequence.
    pub block_rows: Vec<Vec<usize>>,
}

/// Output of a forward pass.
#[derive(Debug)]
pub struct Forward {
    /// (batch, seq, vocab)
    pub logits: Tensor<3>,
    /// Memory rows and blocks read.
    pub reads: MemoryReads,
}

fn rms_norm<const D: usize>(x: Tensor<D>, gain: Tensor<1>, eps: f32) -> Tensor<D> {
    let ms = x.clone().square().mean_dim(D - 1);
    let inv = (ms + eps).sqrt().recip();
    let d = gain.dims()[0];
    let mut shape = [1usize; D];
    shape[D - 1] = d;
    x * inv * gain.reshape(shape)
}

/// `x @ w^T` for x: (n, in), w: (out, in) → (n, out).
fn linear(x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
    x.matmul(w.transpose())
}

impl Model {
    /// Uploads `store` to `device`. With `trainable`, every parameter is a
    /// leaf that collects gradients (use an autodiff device).
    pub fn new(
        cfg: &ModelConfig,
        store: &ParamStore,
        device: &Device,
        ops: MemoryOps,
        trainable: bool,
    ) -> Result<Self, ModelError> {
        cfg.validate()?;
        store.check(cfg)?;
        Self::upload(cfg, store, device, ops, trainable, None)
    }

    /// A model whose memory (product-key values, FFN-memory blocks) is read
    /// through `memory` instead of parameters: `store` holds the dense
    /// parameters only ([`ParamStore::dense_zeros`] + `model.safetensors`).
    /// For inference (no gradient reaches the memory).
    pub fn with_memory(
        cfg: &ModelConfig,
        store: &ParamStore,
        device: &Device,
        ops: MemoryOps,
        memory: Arc<dyn MemorySource>,
    ) -> Result<Self, ModelError> {
        cfg.validate()?;
        store.check_dense(cfg)?;
        Self::upload(cfg, store, device, ops, false, Some(memory))
    }

    fn upload(
        cfg: &ModelConfig,
        store: &ParamStore,
        device: &Device,
        ops: MemoryOps,
        trainable: bool,
        memory: Option<Arc<dyn MemorySource>>,
    ) -> Result<Self, ModelError> {
        let mut names = Vec::new();
        let mut shapes = Vec::new();
        let mut tensors = Vec::new();
        for p in store.params() {
            let t = Tensor::<1>::from_data(TensorData::new(p.data.clone(), [p.data.len()]), device);
            let t = if trainable { t.require_grad() } else { t };
            names.push(p.name.clone());
            shapes.push(p.shape.clone());
            tensors.push(t);
        }
        Ok(Self {
            cfg: cfg.clone(),
            device: device.clone(),
            ops,
            names,
            shapes,
            tensors,
            memory,
            rope: Arc::new(rope_tables(cfg.max_seq_len, cfg.head_dim(), cfg.rope_theta)),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The memory-ops implementation.
    pub fn ops(&self) -> MemoryOps {
        self.ops
    }

    fn index(&self, name: &str) -> Result<usize, ModelError> {
        self.names
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| ModelError::Input(format!("missing parameter {name}")))
    }

    fn p1(&self, name: &str) -> Result<Tensor<1>, ModelError> {
        Ok(self.tensors[self.index(name)?].clone())
    }

    fn p<const D: usize>(&self, name: &str) -> Result<Tensor<D>, ModelError> {
        let i = self.index(name)?;
        let shape: [usize; D] = self.shapes[i]
            .clone()
            .try_into()
            .map_err(|s| ModelError::Input(format!("parameter {name} has shape {s:?}")))?;
        Ok(self.tensors[i].clone().reshape(shape))
    }

    /// Gradients of every parameter after `loss.backward()`, in store order
    /// (`None` for parameters the loss did not reach). With the `autodiff`
    /// feature only.
    #[cfg(feature = "autodiff")]
    pub fn grads(&self, grads: &burn::tensor::Gradients) -> Vec<Option<Vec<f32>>> {
        self.tensors
            .iter()
            .map(|t| t.grad(grads).map(host_f32))
            .collect()
    }

    /// [`Self::grads`], taking the gradients out of `grads`: a gradient no
    /// longer shared with `grads` moves to the host without a copy where the
    /// backend allows it (burn's CPU backend). With the `autodiff` feature
    /// only.
    #[cfg(feature = "autodiff")]
    pub fn take_grads(&self, grads: &mut burn::tensor::Gradients) -> Vec<Option<Vec<f32>>> {
        self.tensors
            .iter()
            .map(|t| t.grad_remove(grads).map(host_f32))
            .collect()
    }

    /// Token ids as an int tensor. tokens: (batch, seq) row-major.
    pub fn tokens(&self, tokens: &[u32], batch: usize) -> Result<Tensor<2, Int>, ModelError> {
        if batch == 0 || !tokens.len().is_multiple_of(batch) {
            return Err(ModelError::Input(format!(
                "{} tokens do not split into {batch} sequences",
                tokens.len()
            )));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(ModelError::Input(format!(
                "token {t} outside the vocabulary ({})",
                self.cfg.vocab_size
            )));
        }
        let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
        Ok(Tensor::from_data(
            TensorData::new(ids, [batch, tokens.len() / batch]),
            &self.device,
        ))
    }

    /// Forward. tokens: (batch, seq); `block_rows`: (batch, levels) table
    /// rows when the model has a hierarchical memory; `cache`: attention cache
    /// for incremental decoding (positions continue from `cache.len`).
    pub fn forward(
        &self,
        tokens: Tensor<2, Int>,
        block_rows: Option<&[usize]>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Forward, ModelError> {
        let cfg = &self.cfg;
        let [b, t] = tokens.dims();
        let pos0 = cache.as_ref().map_or(0, |c| c.len);
        if pos0 + t > cfg.max_seq_len {
            return Err(ModelError::Input(format!(
                "{} positions exceed max_seq_len {}",
                pos0 + t,
                cfg.max_seq_len
            )));
        }
        let mut reads = MemoryReads::default();
        let blocks = self.gather_blocks(block_rows, b, &mut reads)?;
        // (b*t, d)
        let emb: Tensor<2> = self.p("tok_embeddings.weight")?;
        let mut x = emb.clone().select(0, tokens.reshape([b * t]));
        let (cos, sin) = self.rope(pos0, t);
        let mut dense_idx = 0;
        if let Some(c) = cache.as_deref_mut() {
            c.layers.resize(cfg.n_layers, None);
        }
        for i in 0..cfg.n_layers {
            let h = rms_norm(
                x.clone(),
                self.p1(&layer_name(i, "attention_norm.weight"))?,
                cfg.norm_eps,
            );
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let a = self.attention(i, h, b, t, pos0, &cos, &sin, layer_cache)?;
            x = x + a;
            let h = rms_norm(
                x.clone(),
                self.p1(&layer_name(i, "ffn_norm.weight"))?,
                cfg.norm_eps,
            );
            let y = if cfg.is_pkm_layer(i) {
                let (y, rows) = self.memory_layer(i, h)?;
                reads.value_rows.push(rows);
                y
            } else {
                let y = self.ffn(i, dense_idx, h, b, t, blocks.as_ref())?;
                dense_idx += 1;
                y
            };
            x = x + y;
        }
        if let Some(c) = cache {
            c.len = pos0 + t;
        }
        let h = rms_norm(x, self.p1("norm.weight")?, cfg.norm_eps);
        let out: Tensor<2> = if cfg.tie_embeddings {
            emb
        } else {
            self.p("output.weight")?
        };
        let logits = linear(h, out).reshape([b, t, cfg.vocab_size]);
        Ok(Forward { logits, reads })
    }

    /// Mean next-token cross-entropy. tokens: (batch, seq + 1).
    pub fn loss(
        &self,
        tokens: &[u32],
        batch: usize,
        block_rows: Option<&[usize]>,
    ) -> Result<(Tensor<1>, MemoryReads), ModelError> {
        let all = self.tokens(tokens, batch)?;
        let [b, t1] = all.dims();
        if t1 < 2 {
            return Err(ModelError::Input(
                "loss needs sequences of >= 2 tokens".into(),
            ));
        }
        let inputs = all.clone().narrow(1, 0, t1 - 1);
        let targets = all.narrow(1, 1, t1 - 1).reshape([b * (t1 - 1), 1]);
        let f = self.forward(inputs, block_rows, None)?;
        let logits = f.logits.reshape([b * (t1 - 1), self.cfg.vocab_size]);
        let logp = activation::log_softmax(logits, 1);
        let nll = logp.gather(1, targets).neg().mean();
        Ok((nll, f.reads))
    }

    /// (1, 1, t, head_dim/2) cos and sin for positions `pos0..pos0+t`.
    fn rope(&self, pos0: usize, t: usize) -> (Tensor<4>, Tensor<4>) {
        let half = self.cfg.head_dim() / 2;
        // forward checked pos0 + t <= max_seq_len, the tables' length
        let mk = |v: &[f32]| {
            Tensor::<4>::from_data(
                TensorData::new(v[pos0 * half..(pos0 + t) * half].to_vec(), [1, 1, t, half]),
                &self.device,
            )
        };
        (mk(&self.rope.0), mk(&self.rope.1))
    }

    /// x: (b, heads, t, hd) → rotated.
    fn apply_rope(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
        let hd = x.dims()[3];
        let half = hd / 2;
        let x1 = x.clone().narrow(3, 0, half);
        let x2 = x.narrow(3, half, half);
        Tensor::cat(
            vec![
                x1.clone() * cos.clone() - x2.clone() * sin.clone(),
                x1 * sin.clone() + x2 * cos.clone(),
            ],
            3,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        i: usize,
        h: Tensor<2>,
        b: usize,
        t: usize,
        pos0: usize,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
        cache: Option<&mut Option<(Tensor<4>, Tensor<4>)>>,
    ) -> Result<Tensor<2>, ModelError> {
        let (d, heads, hd) = (self.cfg.dim, self.cfg.n_heads, self.cfg.head_dim());
        let w = |n: &str| self.p::<2>(&layer_name(i, &format!("attention.{n}.weight")));
        // (b*t, d) → (b, heads, t, hd)
        let split = |x: Tensor<2>| x.reshape([b, t, heads, hd]).swap_dims(1, 2);
        let q = Self::apply_rope(split(linear(h.clone(), w("wq")?)), cos, sin);
        let mut k = Self::apply_rope(split(linear(h.clone(), w("wk")?)), cos, sin);
        let mut v = split(linear(h, w("wv")?));
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.take() {
                k = Tensor::cat(vec![pk, k], 2);
                v = Tensor::cat(vec![pv, v], 2);
            }
            *slot = Some((k.clone(), v.clone()));
        }
        let tk = k.dims()[2];
        // (b, heads, t, tk)
        let scores = q.matmul(k.swap_dims(2, 3)) / (hd as f32).sqrt();
        let mut mask = vec![0.0f32; t * tk];
        for r in 0..t {
            for c in 0..tk {
                if c > pos0 + r {
                    mask[r * tk + c] = -1e30;
                }
            }
        }
        let mask = Tensor::<4>::from_data(TensorData::new(mask, [1, 1, t, tk]), &self.device);
        let att = activation::softmax(scores + mask, 3);
        // (b, heads, t, hd) → (b*t, d)
        let o = att.matmul(v).swap_dims(1, 2).reshape([b * t, d]);
        Ok(linear(o, w("wo")?))
    }

    /// Blocks of every level for each sequence: (gate, up, down), each
    /// (b, dense_layers, R, d) with R the units of all levels.
    fn gather_blocks(
        &self,
        block_rows: Option<&[usize]>,
        b: usize,
        reads: &mut MemoryReads,
    ) -> Result<Option<[Tensor<4>; 3]>, ModelError> {
        let Some(hs) = &self.cfg.hier else {
            return Ok(None);
        };
        let Some(rows) = block_rows else {
            return Err(ModelError::Input(
                "the model has a hierarchical memory: give one block row per level per sequence"
                    .into(),
            ));
        };
        if rows.len() != b * hs.levels {
            return Err(ModelError::Input(format!(
                "{} block rows for {b} sequences x {} levels",
                rows.len(),
                hs.levels
            )));
        }
        let (d, layers) = (self.cfg.dim, self.cfg.dense_layers().len());
        let mut parts: [Vec<Tensor<4>>; 3] = Default::default();
        for l in 1..=hs.levels {
            let r = hs.units[l - 1];
            let level_rows: Vec<usize> = (0..b).map(|s| rows[s * hs.levels + l - 1]).collect();
            if let Some(&bad) = level_rows.iter().find(|&&x| x >= hs.rows(l)) {
                return Err(ModelError::Input(format!(
                    "block row {bad} outside level {l} ({} rows)",
                    hs.rows(l)
                )));
            }
            reads.block_rows.push(level_rows.clone());
            if r == 0 {
                continue;
            }
            // (b, layers * 3 * r * d)
            let sel: Tensor<2> = match &self.memory {
                Some(src) => src.blocks(l, &level_rows, &self.device)?,
                None => {
                    let table: Tensor<2> = self
                        .p1(&hier_name(l))?
                        .reshape([hs.rows(l), layers * 3 * r * d]);
                    let ids: Vec<i64> = level_rows.iter().map(|&x| x as i64).collect();
                    let ids = Tensor::<1, Int>::from_data(TensorData::new(ids, [b]), &self.device);
                    table.select(0, ids)
                }
            };
            if sel.dims() != [b, layers * 3 * r * d] {
                return Err(ModelError::Memory(format!(
                    "level {l} blocks came back as {:?}, expected [{b}, {}]",
                    sel.dims(),
                    layers * 3 * r * d
                )));
            }
            // (b, layers, 3, r, d)
            let sel: Tensor<5> = sel.reshape([b, layers, 3, r, d]);
            for (k, part) in parts.iter_mut().enumerate() {
                part.push(sel.clone().narrow(2, k, 1).reshape([b, layers, r, d]));
            }
        }
        if parts[0].is_empty() {
            return Ok(None);
        }
        let [g, u, dn] = parts;
        Ok(Some([
            Tensor::cat(g, 2),
            Tensor::cat(u, 2),
            Tensor::cat(dn, 2),
        ]))
    }

    /// SwiGLU over [anchor | blocks]. h: (b*t, d) → (b*t, d).
    fn ffn(
        &self,
        i: usize,
        dense_idx: usize,
        h: Tensor<2>,
        b: usize,
        t: usize,
        blocks: Option<&[Tensor<4>; 3]>,
    ) -> Result<Tensor<2>, ModelError> {
        let f = |n: &str| self.p::<2>(&layer_name(i, &format!("feed_forward.{n}.weight")));
        let g = linear(h.clone(), f("w1")?);
        let u = linear(h.clone(), f("w3")?);
        let mut y = linear(activation::silu(g) * u, f("w2")?);
        if let Some([gate, up, down]) = blocks {
            let d = self.cfg.dim;
            let pick = |x: &Tensor<4>| {
                let [bb, _, r, _] = x.dims();
                x.clone().narrow(1, dense_idx, 1).reshape([bb, r, d])
            };
            // (b, t, d) @ (b, d, R) → (b, t, R)
            let hb: Tensor<3> = h.reshape([b, t, d]);
            let gb = hb.clone().matmul(pick(gate).swap_dims(1, 2));
            let ub = hb.matmul(pick(up).swap_dims(1, 2));
            let yb = (activation::silu(gb) * ub).matmul(pick(down));
            y = y + yb.reshape([b * t, d]);
        }
        Ok(y)
    }

    /// Product-key memory layer. h: (n, d) → ((n, d), value rows read (n, heads, knn)).
    fn memory_layer(&self, i: usize, h: Tensor<2>) -> Result<(Tensor<2>, Vec<u32>), ModelError> {
        let c = self
            .cfg
            .pkm_config()
            .ok_or_else(|| ModelError::Input("no pkm config".into()))?;
        let [n, d] = h.dims();
        let (heads, half, nk, knn) = (c.heads, c.half(), c.n_keys, c.knn);
        let m = |r: &str| layer_name(i, &format!("memory.{r}"));
        let q = linear(h.clone(), self.p(&m("query_proj.weight"))?)
            + self.p1(&m("query_proj.bias"))?.reshape([1, c.query_dim()]);
        // (n, heads*2, half)
        let mut q: Tensor<3> = q.reshape([n, heads * 2, half]);
        let mut keys: Tensor<3> = self.p1(&m("keys"))?.reshape([heads * 2, nk, half]);
        if c.qk_norm {
            let norm = |x: Tensor<3>| {
                let inv = (x.clone().square().mean_dim(2) + pkm_eps()).sqrt().recip();
                x * inv
            };
            q = norm(q);
            keys = norm(keys);
        }
        // (heads*2, n, half) @ (heads*2, half, nk) → (heads*2, n, nk) → (n, heads, 2, nk),
        // scaled once contiguous (the backward then scales a contiguous gradient)
        let s = q
            .swap_dims(0, 1)
            .matmul(keys.swap_dims(1, 2))
            .swap_dims(0, 1);
        let s: Tensor<3> = s.reshape([n * heads, 2, nk]).mul_scalar(c.score_scale());
        // (n*heads, knn) rows i1 * n_keys + i2, and their sub-key ids
        let rows = self.ops.pk_select(s.clone(), knn)?;
        let a = rows.clone().div_scalar(nk as i64);
        let bb = rows.clone().remainder_scalar(nk as i64);
        // (n*heads, 2*knn) scores of the selected first-half then second-half
        // sub-keys, in one gather from (n*heads, 2*nk)
        let cols = Tensor::cat(vec![a, bb.add_scalar(nk as i64)], 1);
        let picked: Tensor<2> = s.reshape([n * heads, 2 * nk]).gather(1, cols);
        // (n*heads, knn) selected scores s1[a] + s2[b] and their softmax
        let sigma = picked.clone().narrow(1, 0, knn) + picked.narrow(1, knn, knn);
        let w = activation::softmax(sigma, 1);
        let host_rows: Vec<u32> = rows
            .clone()
            .into_data()
            .iter::<i64>()
            .map(|v| v as u32)
            .collect();
        // (n, v_dim)
        let mem = match &self.memory {
            Some(src) => src.values_bag(&host_rows, w.reshape([n, heads * knn]), &self.device)?,
            None => self.ops.embedding_bag(
                self.p(VALUES)?,
                rows.reshape([n, heads * knn]),
                w.reshape([n, heads * knn]),
            ),
        };
        let u = linear(h.clone(), self.p(&m("swilu_projection.weight"))?)
            + self.p1(&m("swilu_projection.bias"))?.reshape([1, c.v_dim]);
        let out = linear(mem * activation::silu(u), self.p(&m("value_proj.weight"))?)
            + self.p1(&m("value_proj.bias"))?.reshape([1, d]);
        let out = if c.gated {
            let gw: Tensor<2> = self.p1(&m("gate.weight"))?.reshape([d, 1]);
            let z = h.matmul(gw) + self.p1(&m("gate.bias"))?.reshape([1, 1]);
            out * activation::sigmoid(z)
        } else {
            out
        };
        Ok((out, host_rows))
    }
}

/// The values of `t` as a host f32 vector, reusing the tensor's buffer when
/// it is an f32 buffer of its own (else a copy).
#[cfg(feature = "autodiff")]
fn host_f32<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .try_into_vec_as::<f32>()
        .unwrap_or_else(|e| panic!("tensor values to host f32: {e:?}"))
}

fn pkm_eps() -> f32 {
    memlayer_core::pkm::QK_NORM_EPS
}
