//! Host-side parameters of a model: one named f32 tensor per parameter, in a
//! fixed order, with the optimiser group each belongs to. The burn model is
//! built from a [`ParamStore`], the trainer updates it, the reference forward
//! reads it, and it is saved as safetensors (dense part) and bank (memory).
//!
//! Names (Llama-style, product-key memory names as in Meta's `HashingMemory`):
//! ```text
//! tok_embeddings.weight                     (vocab, dim)
//! layers.{i}.attention_norm.weight          (dim)
//! layers.{i}.attention.w{q,k,v,o}.weight    (dim, dim)
//! layers.{i}.ffn_norm.weight                (dim)
//! layers.{i}.feed_forward.w{1,3}.weight     (hidden, dim)   gate, up   — dense layers
//! layers.{i}.feed_forward.w2.weight         (dim, hidden)   down       — dense layers
//! layers.{i}.memory.query_proj.{weight,bias}      (heads*k_dim, dim), (heads*k_dim)
//! layers.{i}.memory.keys                          (heads, 2, n_keys, k_dim/2)
//! layers.{i}.memory.swilu_projection.{weight,bias} (v_dim, dim), (v_dim)
//! layers.{i}.memory.value_proj.{weight,bias}      (dim, v_dim), (dim)
//! layers.{i}.memory.gate.{weight,bias}            (dim), (1)          — gated only
//! memory_values.weight                      (n_keys², v_dim)  shared by all memory layers
//! hier.level{l}.blocks                      (rows_l, dense_layers, 3, units_l, dim)
//!                                           [gate | up | down^T] per layer: the bank page layout
//! norm.weight                               (dim)
//! output.weight                             (vocab, dim)    — untied only
//! ```

use super::config::ModelConfig;
use crate::error::OracleError;
use crate::hier::ffn::FfnBlock;
use crate::pkm::{self, PkmParams};
use crate::rng::Rng;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// How the optimiser treats a parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ParamGroup {
    /// Matrices: base learning rate, weight decay.
    Dense,
    /// Norm gains, biases, sub-keys: base learning rate, no weight decay.
    NoDecay,
    /// The shared product-key value table: its own learning rate and
    /// clipping; only the rows read in a step are updated.
    MemoryValues,
    /// FFN-memory block tables: their own (lower) learning rate and small
    /// weight decay; only the blocks fetched in a step are updated.
    MemoryBlocks,
}

/// One named parameter.
#[derive(Clone, Debug, PartialEq)]
pub struct Param {
    /// Name (see the module docs).
    pub name: String,
    /// Shape, row-major.
    pub shape: Vec<usize>,
    /// Values.
    pub data: Vec<f32>,
    /// Optimiser group.
    pub group: ParamGroup,
}

impl Param {
    /// Elements per leading-dimension row (the unit of sparse updates).
    pub fn row_len(&self) -> usize {
        // a pushed shape's full product fits usize, so this one does too
        self.shape
            .iter()
            .skip(1)
            .try_fold(1usize, |a, &b| a.checked_mul(b))
            .unwrap_or(usize::MAX)
            .max(1)
    }
}

/// All parameters of a model, in a fixed order.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ParamStore {
    params: Vec<Param>,
    index: HashMap<String, usize>,
}

/// Name of a per-layer parameter.
pub fn layer_name(layer: usize, rest: &str) -> String {
    format!("layers.{layer}.{rest}")
}

/// Name of the level-`l` block table.
pub fn hier_name(level: usize) -> String {
    format!("hier.level{level}.blocks")
}

/// Name of the shared value table.
pub const VALUES: &str = "memory_values.weight";

/// Elements of a tensor of `shape` (the product, checked): an error naming
/// `name` and the shape when it overflows `usize`.
pub fn shape_elements(name: &str, shape: &[usize]) -> Result<usize, OracleError> {
    shape
        .iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b))
        .ok_or_else(|| {
            OracleError::InvalidConfig(format!(
                "parameter {name}: shape {shape:?} has more elements than fit in usize"
            ))
        })
}

impl ParamStore {
    /// Empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a parameter; fails on a duplicate name or a length that does
    /// not match the shape.
    pub fn push(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        data: Vec<f32>,
        group: ParamGroup,
    ) -> Result<(), OracleError> {
        let name = name.into();
        let n = shape_elements(&name, shape)?;
        if data.len() != n {
            return Err(OracleError::InvalidConfig(format!(
                "parameter {name}: {} values for shape {shape:?}",
                data.len()
            )));
        }
        if self.index.contains_key(&name) {
            return Err(OracleError::InvalidConfig(format!(
                "duplicate parameter {name}"
            )));
        }
        self.index.insert(name.clone(), self.params.len());
        self.params.push(Param {
            name,
            shape: shape.to_vec(),
            data,
            group,
        });
        Ok(())
    }

    /// Parameters in order.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// Parameters in order, mutable (shapes must not change).
    pub fn params_mut(&mut self) -> &mut [Param] {
        &mut self.params
    }

    /// Number of parameters (tensors).
    pub fn len(&self) -> usize {
        self.params.len()
    }

    /// No parameters.
    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// Position of `name`.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// The parameter called `name`.
    pub fn get(&self, name: &str) -> Result<&Param, OracleError> {
        self.position(name)
            .map(|i| &self.params[i])
            .ok_or_else(|| OracleError::InvalidConfig(format!("missing parameter {name}")))
    }

    /// The data of `name`.
    pub fn data(&self, name: &str) -> Result<&[f32], OracleError> {
        Ok(&self.get(name)?.data)
    }

    /// Total elements.
    pub fn num_elements(&self) -> usize {
        self.params.iter().map(|p| p.data.len()).sum()
    }

    /// Fresh parameters for `cfg`, deterministic in `seed`.
    ///
    /// Dense weights ~ N(0, 0.02) (residual output projections scaled by
    /// `1/sqrt(2 n_layers)`), norm gains 1; memory layers use Meta's init
    /// ([`PkmParams::init`], [`pkm::init_values`]); blocks use
    /// [`FfnBlock::init`] (down = 0: a new block is a no-op).
    pub fn init(cfg: &ModelConfig, seed: u64) -> Result<Self, OracleError> {
        cfg.validate()?;
        let mut rng = Rng::new(seed);
        let mut s = Self::new();
        let (d, v, h) = (cfg.dim, cfg.vocab_size, cfg.ffn_hidden);
        let std = 0.02;
        let out_std = std / (2.0 * cfg.n_layers as f32).sqrt();
        let n = |name: &str, shape: &[usize]| shape_elements(name, shape);
        s.push(
            "tok_embeddings.weight",
            &[v, d],
            rng.normal_vec(n("tok_embeddings.weight", &[v, d])?, 0.0, std),
            ParamGroup::Dense,
        )?;
        for i in 0..cfg.n_layers {
            s.push(
                layer_name(i, "attention_norm.weight"),
                &[d],
                vec![1.0; d],
                ParamGroup::NoDecay,
            )?;
            for w in ["wq", "wk", "wv", "wo"] {
                let sd = if w == "wo" { out_std } else { std };
                let name = layer_name(i, &format!("attention.{w}.weight"));
                let len = n(&name, &[d, d])?;
                s.push(
                    name,
                    &[d, d],
                    rng.normal_vec(len, 0.0, sd),
                    ParamGroup::Dense,
                )?;
            }
            s.push(
                layer_name(i, "ffn_norm.weight"),
                &[d],
                vec![1.0; d],
                ParamGroup::NoDecay,
            )?;
            if let (true, Some(c)) = (cfg.is_pkm_layer(i), cfg.pkm_config()) {
                let p = PkmParams::init(&c, &mut rng);
                let m = |r: &str| layer_name(i, &format!("memory.{r}"));
                let (qd, vd) = (c.query_dim(), c.v_dim);
                s.push(m("query_proj.weight"), &[qd, d], p.w_q, ParamGroup::Dense)?;
                s.push(m("query_proj.bias"), &[qd], p.b_q, ParamGroup::NoDecay)?;
                s.push(
                    m("keys"),
                    &[c.heads, 2, c.n_keys, c.half()],
                    p.keys,
                    ParamGroup::NoDecay,
                )?;
                s.push(
                    m("swilu_projection.weight"),
                    &[vd, d],
                    p.w_s,
                    ParamGroup::Dense,
                )?;
                s.push(
                    m("swilu_projection.bias"),
                    &[vd],
                    p.b_s,
                    ParamGroup::NoDecay,
                )?;
                s.push(m("value_proj.weight"), &[d, vd], p.w_o, ParamGroup::Dense)?;
                s.push(m("value_proj.bias"), &[d], p.b_o, ParamGroup::NoDecay)?;
                if let Some(g) = p.gate {
                    s.push(m("gate.weight"), &[d], g.w, ParamGroup::Dense)?;
                    s.push(m("gate.bias"), &[1], vec![g.b], ParamGroup::NoDecay)?;
                }
            } else {
                let f = |r: &str| layer_name(i, &format!("feed_forward.{r}"));
                let len = n(&f("w1.weight"), &[h, d])?;
                s.push(
                    f("w1.weight"),
                    &[h, d],
                    rng.normal_vec(len, 0.0, std),
                    ParamGroup::Dense,
                )?;
                s.push(
                    f("w3.weight"),
                    &[h, d],
                    rng.normal_vec(len, 0.0, std),
                    ParamGroup::Dense,
                )?;
                s.push(
                    f("w2.weight"),
                    &[d, h],
                    rng.normal_vec(len, 0.0, out_std),
                    ParamGroup::Dense,
                )?;
            }
        }
        if let Some(c) = cfg.pkm_config() {
            s.push(
                VALUES,
                &[c.n_rows(), c.v_dim],
                pkm::init_values(&c, &mut rng),
                ParamGroup::MemoryValues,
            )?;
        }
        if let Some(hs) = &cfg.hier {
            let layers = cfg.dense_layers().len();
            for l in 1..=hs.levels {
                let r = hs.units[l - 1];
                let rows = hs.rows(l);
                let shape = [rows, layers, 3, r, d];
                let mut data = Vec::with_capacity(n(&hier_name(l), &shape)?);
                // rows · layers ≤ the checked product above
                for _ in 0..rows * layers {
                    data.extend(FfnBlock::init(r, d, &mut rng)?.to_page());
                }
                s.push(hier_name(l), &shape, data, ParamGroup::MemoryBlocks)?;
            }
        }
        s.push("norm.weight", &[d], vec![1.0; d], ParamGroup::NoDecay)?;
        if !cfg.tie_embeddings {
            s.push(
                "output.weight",
                &[v, d],
                rng.normal_vec(n("output.weight", &[v, d])?, 0.0, std),
                ParamGroup::Dense,
            )?;
        }
        Ok(s)
    }

    /// Checks that this store has exactly the parameters `cfg` needs, with
    /// the right shapes (the error names the first mismatch).
    pub fn check(&self, cfg: &ModelConfig) -> Result<(), OracleError> {
        self.check_against(&Self::shapes(cfg)?, "this config")
    }

    fn check_against(
        &self,
        reference: &[(String, Vec<usize>)],
        what: &str,
    ) -> Result<(), OracleError> {
        for (name, shape) in reference {
            let p = self.get(name)?;
            if &p.shape != shape {
                return Err(OracleError::InvalidConfig(format!(
                    "parameter {name} has shape {:?}, config wants {shape:?}",
                    p.shape
                )));
            }
        }
        if let Some(extra) = self
            .params
            .iter()
            .find(|p| !reference.iter().any(|(n, _)| n == &p.name))
        {
            return Err(OracleError::InvalidConfig(format!(
                "unexpected parameter {} for {what}",
                extra.name
            )));
        }
        Ok(())
    }

    /// Whether `name` is a memory parameter (the product-key values or a
    /// level's FFN-memory blocks): what lives in the bank, not in
    /// `model.safetensors`.
    pub fn is_memory_name(name: &str) -> bool {
        name == VALUES || name.starts_with("hier.level")
    }

    /// The dense parameters of `cfg` (everything but the memory), zero-filled,
    /// in store order: what a runtime loads `model.safetensors` into while the
    /// memory stays in the bank and is paged in on demand.
    pub fn dense_zeros(cfg: &ModelConfig) -> Result<Self, OracleError> {
        Self::zeros_where(cfg, |name| !Self::is_memory_name(name))
    }

    /// Every parameter of `cfg`, zero-filled, in store order (a target to
    /// load weights into; no random draws).
    pub fn zeros(cfg: &ModelConfig) -> Result<Self, OracleError> {
        Self::zeros_where(cfg, |_| true)
    }

    fn zeros_where(cfg: &ModelConfig, keep: impl Fn(&str) -> bool) -> Result<Self, OracleError> {
        let mut s = Self::new();
        for (name, shape) in Self::shapes(cfg)? {
            if !keep(&name) {
                continue;
            }
            let n = shape_elements(&name, &shape)?;
            let group = if name == VALUES {
                ParamGroup::MemoryValues
            } else if Self::is_memory_name(&name) {
                ParamGroup::MemoryBlocks
            } else if shape.len() == 1 {
                ParamGroup::NoDecay
            } else {
                ParamGroup::Dense
            };
            s.push(name, &shape, vec![0.0; n], group)?;
        }
        Ok(s)
    }

    /// Like [`ParamStore::check`] for a store without the memory parameters
    /// ([`ParamStore::dense_zeros`]).
    pub fn check_dense(&self, cfg: &ModelConfig) -> Result<(), OracleError> {
        let reference: Vec<_> = Self::shapes(cfg)?
            .into_iter()
            .filter(|(n, _)| !Self::is_memory_name(n))
            .collect();
        self.check_against(&reference, "a dense store of this config")
    }

    /// (name, shape) of every parameter of `cfg`, in order.
    pub fn shapes(cfg: &ModelConfig) -> Result<Vec<(String, Vec<usize>)>, OracleError> {
        cfg.validate()?;
        Ok(Self::shape_list(cfg))
    }

    fn shape_list(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
        let (d, v, h) = (cfg.dim, cfg.vocab_size, cfg.ffn_hidden);
        let mut out = vec![("tok_embeddings.weight".to_string(), vec![v, d])];
        for i in 0..cfg.n_layers {
            out.push((layer_name(i, "attention_norm.weight"), vec![d]));
            for w in ["wq", "wk", "wv", "wo"] {
                out.push((layer_name(i, &format!("attention.{w}.weight")), vec![d, d]));
            }
            out.push((layer_name(i, "ffn_norm.weight"), vec![d]));
            if let (true, Some(c)) = (cfg.is_pkm_layer(i), cfg.pkm_config()) {
                let m = |r: &str| layer_name(i, &format!("memory.{r}"));
                let (qd, vd) = (c.query_dim(), c.v_dim);
                out.push((m("query_proj.weight"), vec![qd, d]));
                out.push((m("query_proj.bias"), vec![qd]));
                out.push((m("keys"), vec![c.heads, 2, c.n_keys, c.half()]));
                out.push((m("swilu_projection.weight"), vec![vd, d]));
                out.push((m("swilu_projection.bias"), vec![vd]));
                out.push((m("value_proj.weight"), vec![d, vd]));
                out.push((m("value_proj.bias"), vec![d]));
                if c.gated {
                    out.push((m("gate.weight"), vec![d]));
                    out.push((m("gate.bias"), vec![1]));
                }
            } else {
                let f = |r: &str| layer_name(i, &format!("feed_forward.{r}"));
                out.push((f("w1.weight"), vec![h, d]));
                out.push((f("w3.weight"), vec![h, d]));
                out.push((f("w2.weight"), vec![d, h]));
            }
        }
        if let Some(c) = cfg.pkm_config() {
            out.push((VALUES.to_string(), vec![c.n_rows(), c.v_dim]));
        }
        if let Some(hs) = &cfg.hier {
            let layers = cfg.dense_layers().len();
            for l in 1..=hs.levels {
                out.push((
                    hier_name(l),
                    vec![hs.rows(l), layers, 3, hs.units[l - 1], d],
                ));
            }
        }
        out.push(("norm.weight".to_string(), vec![d]));
        if !cfg.tie_embeddings {
            out.push(("output.weight".to_string(), vec![v, d]));
        }
        out
    }

    /// Serialises the parameters selected by `keep` as safetensors (f32,
    /// little-endian), with `metadata`.
    pub fn to_safetensors(
        &self,
        keep: impl Fn(&Param) -> bool,
        metadata: Option<HashMap<String, String>>,
    ) -> Result<Vec<u8>, OracleError> {
        let mut views = Vec::new();
        for p in self.params.iter().filter(|p| keep(p)) {
            let bytes: &[u8] = bytemuck::cast_slice(&p.data);
            let view = TensorView::new(Dtype::F32, p.shape.clone(), bytes)
                .map_err(|e| OracleError::InvalidConfig(format!("tensor {}: {e}", p.name)))?;
            views.push((p.name.clone(), view));
        }
        safetensors::serialize(views, metadata)
            .map_err(|e| OracleError::InvalidConfig(format!("safetensors: {e}")))
    }

    /// Reads tensors from safetensors bytes into this store, replacing the
    /// data of every parameter whose name is present (shapes must match).
    /// Returns how many were read.
    pub fn load_safetensors(&mut self, bytes: &[u8]) -> Result<usize, OracleError> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| OracleError::InvalidConfig(format!("safetensors: {e}")))?;
        let mut n = 0;
        // store order, so the first mismatch reported does not depend on the file
        for p in self.params.iter_mut() {
            let Ok(view) = st.tensor(&p.name) else {
                continue;
            };
            if view.dtype() != Dtype::F32 || view.shape() != p.shape.as_slice() {
                return Err(OracleError::InvalidConfig(format!(
                    "tensor {}: {:?} {:?}, expected F32 {:?}",
                    p.name,
                    view.dtype(),
                    view.shape(),
                    p.shape
                )));
            }
            for (dst, src) in p.data.iter_mut().zip(view.data().chunks_exact(4)) {
                *dst = f32::from_le_bytes([src[0], src[1], src[2], src[3]]);
            }
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn tiny(pkm: bool, hier: bool) -> ModelConfig {
        ModelConfig::tiny_for_tests(pkm, hier)
    }

    #[test]
    fn init_matches_shapes_and_counts() {
        for (p, h) in [(false, false), (true, false), (false, true), (true, true)] {
            let cfg = tiny(p, h);
            let s = ParamStore::init(&cfg, 1).unwrap();
            s.check(&cfg).unwrap();
            let c = cfg.param_counts();
            assert_eq!(c.total(), s.num_elements(), "pkm {p} hier {h}");
            assert_eq!(
                ParamStore::init(&cfg, 1).unwrap(),
                s,
                "init is deterministic"
            );
        }
    }

    #[test]
    fn safetensors_round_trip_and_mismatch_named() {
        let cfg = tiny(true, true);
        let s = ParamStore::init(&cfg, 3).unwrap();
        let bytes = s.to_safetensors(|_| true, None).unwrap();
        let mut t = ParamStore::init(&cfg, 4).unwrap();
        assert_ne!(s, t);
        assert_eq!(t.load_safetensors(&bytes).unwrap(), s.len());
        assert_eq!(s, t);
        let mut cfg2 = tiny(false, false);
        cfg2.dim = 32;
        cfg2.ffn_hidden = 8;
        let err = ParamStore::init(&cfg2, 1)
            .unwrap()
            .check(&tiny(false, false))
            .unwrap_err();
        assert!(err.to_string().contains("tok_embeddings.weight"), "{err}");
        // names shared with a wider model: shapes differ → named error
        let mut other = ParamStore::init(&cfg2, 4).unwrap();
        let msg = other.load_safetensors(&bytes).unwrap_err().to_string();
        assert!(
            msg.contains("tok_embeddings.weight") && msg.contains("expected F32 [37, 32]"),
            "{msg}"
        );
    }

    #[test]
    fn shapes_that_overflow_are_errors_not_panics() {
        let mut s = ParamStore::new();
        let err = s
            .push("huge", &[1 << 40, 1 << 40], Vec::new(), ParamGroup::Dense)
            .unwrap_err()
            .to_string();
        assert!(err.contains("huge") && err.contains("usize"), "{err}");
        assert!(shape_elements("x", &[usize::MAX, 2]).is_err());
        assert_eq!(shape_elements("x", &[3, 0, usize::MAX]).unwrap(), 0);
        assert_eq!(shape_elements("x", &[]).unwrap(), 1);
        // a config whose sizes multiply past usize is refused by every constructor
        let mut cfg = tiny(true, true);
        cfg.vocab_size = 1 << 62;
        for r in [
            ParamStore::init(&cfg, 1).map(|_| ()),
            ParamStore::zeros(&cfg).map(|_| ()),
            ParamStore::dense_zeros(&cfg).map(|_| ()),
            ParamStore::shapes(&cfg).map(|_| ()),
        ] {
            let e = r.unwrap_err().to_string();
            assert!(e.contains("vocab_size"), "{e}");
        }
    }

    #[test]
    fn bad_config_is_named() {
        let mut cfg = tiny(true, false);
        cfg.pkm.as_mut().unwrap().layers = vec![7];
        let err = ParamStore::init(&cfg, 1).unwrap_err();
        assert!(err.to_string().contains("pkm layer 7"), "{err}");
    }
}
