//! Interop with facebookresearch/memory checkpoints: load one `HashingMemory`
//! layer (`lingua/product_key/memory.py`) from a safetensors state dict and run
//! it with the CPU oracle ([`crate::pkm::forward`]).
//!
//! Tensor names are Meta's `state_dict()` names (optionally behind a prefix such
//! as `layers.6.feed_forward.memory.`); shapes follow `torch.nn.Linear` `(out, in)`:
//!
//! | name                                   | shape                       | note                      |
//! |----------------------------------------|-----------------------------|---------------------------|
//! | `keys`                                 | `(2 * heads * n_keys, k_dim / 2)` | viewed `(heads, 2, n_keys, k_dim / 2)` |
//! | `values.weight`                        | `(n_keys², v_dim)`          | bf16 in Meta's code       |
//! | `query_proj.query_mlps.0.weight`       | `(heads * k_dim, dim)`      |                           |
//! | `query_proj.query_mlps.0.bias`         | `(heads * k_dim)`           | optional (`mem_query_bias=False` → 0) |
//! | `swilu_projection.weight` / `.bias`    | `(v_dim, dim)` / `(v_dim)`  | required (see below)      |
//! | `value_proj.weight` / `.bias`          | `(dim, v_dim)` / `(dim)`    |                           |
//! | `gating.weight` / `.bias`              | `(1, dim)` / `(1)`          | optional (`mem_gated`)    |
//!
//! `n_keys`, `heads`, `k_dim`, `dim` and `v_dim` are inferred from these shapes;
//! `knn` (Meta's `mem_knn`) is not stored in a state dict and is passed in.
//! Every float tensor may be f32, f16 or bf16 (f64 is accepted too); all are
//! widened to f32 exactly.
//!
//! Supported: Meta's default `swilu_projection=True` variant, with or without
//! `mem_v_dim`, gating and query bias, `input_dim == output_dim`. Not supported
//! (clear [`InteropError::Unsupported`] errors): the plain `value_proj` variant
//! (`swilu_projection=False`), the PEER variant (`values_u` / `values_v`), query
//! MLPs with batch norm or more than one layer, `output_dim != input_dim`.
//! A layer that shares its values with an earlier layer (`mem_share_values`,
//! the default) has no `values.weight` of its own: load the state dict of the
//! layer that owns them, or add `values.weight` to this one.
//!
//! Numerics: the oracle keeps the embedding-bag output in f32. Meta's Triton
//! embedding-bag accumulates in f32 too but stores its result in the values'
//! dtype, so with bf16 values Meta's output differs from this one by the bf16
//! rounding of the bag output (relative ~2⁻⁹).

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::error::OracleError;
use crate::pkm::{self, PkmConfig, PkmForward, PkmGate, PkmParams};

/// Meta's parameter names of one `HashingMemory` layer.
pub mod names {
    /// `(2 * heads * n_keys, k_dim / 2)`
    pub const KEYS: &str = "keys";
    /// `(n_keys², v_dim)`
    pub const VALUES: &str = "values.weight";
    /// `(heads * k_dim, dim)`
    pub const QUERY_WEIGHT: &str = "query_proj.query_mlps.0.weight";
    /// `(heads * k_dim)`
    pub const QUERY_BIAS: &str = "query_proj.query_mlps.0.bias";
    /// `(v_dim, dim)`
    pub const SWILU_WEIGHT: &str = "swilu_projection.weight";
    /// `(v_dim)`
    pub const SWILU_BIAS: &str = "swilu_projection.bias";
    /// `(dim, v_dim)`
    pub const VALUE_PROJ_WEIGHT: &str = "value_proj.weight";
    /// `(dim)`
    pub const VALUE_PROJ_BIAS: &str = "value_proj.bias";
    /// `(1, dim)`
    pub const GATING_WEIGHT: &str = "gating.weight";
    /// `(1)`
    pub const GATING_BIAS: &str = "gating.bias";
    /// Name of the tensor in a layer input file: `(tokens, dim)` or `(1, tokens, dim)`.
    pub const INPUT: &str = "input";
}

/// Why a state dict or an input cannot be loaded. Messages name the tensor.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InteropError {
    /// The bytes are not a valid safetensors file.
    #[error("cannot parse the {what} as safetensors: {message}")]
    Parse {
        /// Which file (e.g. "state dict", "input").
        what: String,
        /// The parser's message.
        message: String,
    },
    /// A required tensor is absent.
    #[error("missing tensor `{name}` in the {what}{hint}")]
    MissingTensor {
        /// Full tensor name (with prefix).
        name: String,
        /// Which file.
        what: String,
        /// Extra explanation (may be empty; starts with "; " otherwise).
        hint: String,
    },
    /// A tensor's dtype is not a float type we read.
    #[error("tensor `{name}` has dtype {dtype}; expected F32, F16 or BF16")]
    UnsupportedDtype {
        /// Full tensor name.
        name: String,
        /// The dtype found.
        dtype: String,
    },
    /// A tensor's shape disagrees with the layer's other tensors.
    #[error("tensor `{name}` has shape {shape:?}; expected {expected}")]
    Shape {
        /// Full tensor name.
        name: String,
        /// The shape found.
        shape: Vec<usize>,
        /// The expected shape and where it comes from.
        expected: String,
    },
    /// A `HashingMemory` variant the oracle does not implement.
    #[error("unsupported HashingMemory variant: {0}")]
    Unsupported(String),
    /// `knn` is outside `1..=n_keys`.
    #[error(
        "knn {knn} is out of range: must be in 1..={n_keys} (n_keys = {n_keys}, from `keys`); \
         each half's top-k runs over n_keys sub-keys"
    )]
    Knn {
        /// Requested knn.
        knn: usize,
        /// The layer's n_keys.
        n_keys: usize,
    },
    /// The oracle rejected the config or tensors.
    #[error(transparent)]
    Oracle(#[from] OracleError),
}

/// One `HashingMemory` layer, ready for [`crate::pkm::forward`].
#[derive(Clone, Debug, PartialEq)]
pub struct HashingMemoryLayer {
    /// Inferred shapes (`qk_norm = false`: Meta has none) and the requested knn.
    pub config: PkmConfig,
    /// Per-layer parameters in the oracle's layout.
    pub params: PkmParams,
    /// `(n_keys², v_dim)` value table, widened to f32.
    pub values: Vec<f32>,
}

impl HashingMemoryLayer {
    /// Runs the layer. x: `(tokens, dim)` → [`PkmForward`] with `output`
    /// `(tokens, dim)`, `indices`/`scores` `(tokens, heads, knn)`.
    pub fn forward(&self, x: &[f32], tokens: usize) -> Result<PkmForward, OracleError> {
        pkm::forward(&self.config, &self.params, &self.values, x, tokens)
    }
}

/// Loads one `HashingMemory` layer from safetensors bytes holding its state
/// dict under Meta's names (no prefix). `knn` is Meta's `mem_knn`.
pub fn load_hashing_memory(bytes: &[u8], knn: usize) -> Result<HashingMemoryLayer, InteropError> {
    load_hashing_memory_prefixed(bytes, "", knn)
}

/// Like [`load_hashing_memory`], for tensors named `{prefix}keys`, ... A
/// non-empty prefix without a trailing `.` gets one.
pub fn load_hashing_memory_prefixed(
    bytes: &[u8],
    prefix: &str,
    knn: usize,
) -> Result<HashingMemoryLayer, InteropError> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| InteropError::Parse {
        what: "state dict".into(),
        message: e.to_string(),
    })?;
    hashing_memory_from_safetensors(&st, prefix, knn)
}

/// Loads one `HashingMemory` layer from a parsed safetensors file (see the module docs).
pub fn hashing_memory_from_safetensors(
    st: &SafeTensors<'_>,
    prefix: &str,
    knn: usize,
) -> Result<HashingMemoryLayer, InteropError> {
    let sd = StateDict::new(st, prefix);

    // Variants we do not implement: say so before complaining about missing tensors.
    if sd.has("values_u.weight") || sd.has("values_v.weight") {
        return Err(InteropError::Unsupported(format!(
            "found `{}`: the PEER variant (peer_variant=True) is not supported",
            sd.full(if sd.has("values_u.weight") {
                "values_u.weight"
            } else {
                "values_v.weight"
            })
        )));
    }
    let keys_v = sd.get(names::KEYS, "")?;
    if !sd.has(names::SWILU_WEIGHT) && !sd.has(names::SWILU_BIAS) {
        let variant = if sd.has(names::VALUE_PROJ_WEIGHT) {
            "a swilu_projection=False layer (plain `value_proj`)"
        } else {
            "a swilu_projection=False layer without value projection"
        };
        return Err(InteropError::Unsupported(format!(
            "no `{}`: this looks like {variant}; only the swilu_projection=True variant \
             (Meta's default) is supported",
            sd.full(names::SWILU_WEIGHT)
        )));
    }
    if let Some(extra) = sd.extra_query_layer() {
        return Err(InteropError::Unsupported(format!(
            "found `{extra}`: query MLPs with batch norm or more than one layer are not supported \
             (only `{}` / `.bias`)",
            sd.full(names::QUERY_WEIGHT)
        )));
    }

    // Shapes: keys (2 * heads * n_keys, half), query (heads * k_dim, dim).
    let [key_rows, half] = sd.dims2(
        names::KEYS,
        &keys_v,
        "2 dims (2 * heads * n_keys, k_dim / 2)",
    )?;
    if key_rows == 0 || half == 0 {
        return Err(sd.shape_err(
            names::KEYS,
            &keys_v,
            "(2 * heads * n_keys, k_dim / 2), both positive",
        ));
    }
    let k_dim = 2 * half;
    let wq_v = sd.get(names::QUERY_WEIGHT, "")?;
    let [q_rows, dim] = sd.dims2(names::QUERY_WEIGHT, &wq_v, "2 dims (heads * k_dim, dim)")?;
    if q_rows == 0 || dim == 0 || !q_rows.is_multiple_of(k_dim) {
        return Err(sd.shape_err(
            names::QUERY_WEIGHT,
            &wq_v,
            &format!(
                "(heads * k_dim, dim) with rows a positive multiple of k_dim = {k_dim} (2 * `{}`.shape[1])",
                sd.full(names::KEYS)
            ),
        ));
    }
    let heads = q_rows / k_dim;
    if !key_rows.is_multiple_of(2 * heads) {
        return Err(sd.shape_err(
            names::KEYS,
            &keys_v,
            &format!(
                "(2 * heads * n_keys, {half}) with rows a multiple of 2 * heads = {} \
                 (heads = {heads} from `{}` rows {q_rows} / k_dim {k_dim})",
                2 * heads,
                sd.full(names::QUERY_WEIGHT)
            ),
        ));
    }
    let n_keys = key_rows / (2 * heads);
    if knn == 0 || knn > n_keys {
        return Err(InteropError::Knn { knn, n_keys });
    }

    let values_v = sd.get(
        names::VALUES,
        "; this layer may share the values of another memory layer (Meta's mem_share_values): \
         load the state dict of the layer that owns `values.weight`",
    )?;
    let [v_rows, v_dim] = sd.dims2(names::VALUES, &values_v, "2 dims (n_keys², v_dim)")?;
    if v_rows != n_keys * n_keys || v_dim == 0 {
        return Err(sd.shape_err(
            names::VALUES,
            &values_v,
            &format!(
                "({}, v_dim) = (n_keys², v_dim) with n_keys = {n_keys} from `{}`",
                n_keys * n_keys,
                sd.full(names::KEYS)
            ),
        ));
    }

    let dims_note = format!(
        "dim = {dim} from `{}`, v_dim = {v_dim} from `{}`",
        sd.full(names::QUERY_WEIGHT),
        sd.full(names::VALUES)
    );
    let w_q = sd.f32(names::QUERY_WEIGHT, &wq_v)?;
    let b_q = match sd.try_get(names::QUERY_BIAS) {
        Some(v) => sd.vec(
            names::QUERY_BIAS,
            &v,
            &[q_rows],
            &format!("({q_rows}) = (heads * k_dim)"),
        )?,
        None => vec![0.0; q_rows], // mem_query_bias=False
    };
    let keys = sd.f32(names::KEYS, &keys_v)?;
    let values = sd.f32(names::VALUES, &values_v)?;

    let ws_v = sd.get(names::SWILU_WEIGHT, "")?;
    let w_s = sd.vec(
        names::SWILU_WEIGHT,
        &ws_v,
        &[v_dim, dim],
        &format!("({v_dim}, {dim}) = (v_dim, dim); {dims_note}"),
    )?;
    let bs_v = sd.get(names::SWILU_BIAS, "")?;
    let b_s = sd.vec(
        names::SWILU_BIAS,
        &bs_v,
        &[v_dim],
        &format!("({v_dim}) = (v_dim); {dims_note}"),
    )?;

    let wo_v = sd.get(names::VALUE_PROJ_WEIGHT, "")?;
    if wo_v.shape().len() == 2 && wo_v.shape()[1] == v_dim && wo_v.shape()[0] != dim {
        return Err(InteropError::Unsupported(format!(
            "`{}` has shape {:?}: output_dim {} != input_dim {dim}; only output_dim == input_dim is supported",
            sd.full(names::VALUE_PROJ_WEIGHT),
            wo_v.shape(),
            wo_v.shape()[0]
        )));
    }
    let w_o = sd.vec(
        names::VALUE_PROJ_WEIGHT,
        &wo_v,
        &[dim, v_dim],
        &format!("({dim}, {v_dim}) = (dim, v_dim); {dims_note}"),
    )?;
    let bo_v = sd.get(names::VALUE_PROJ_BIAS, "")?;
    let b_o = sd.vec(
        names::VALUE_PROJ_BIAS,
        &bo_v,
        &[dim],
        &format!("({dim}) = (dim); {dims_note}"),
    )?;

    let gate = match (
        sd.try_get(names::GATING_WEIGHT),
        sd.try_get(names::GATING_BIAS),
    ) {
        (None, None) => None,
        (Some(wv), Some(bv)) => {
            let w = sd.vec(
                names::GATING_WEIGHT,
                &wv,
                &[1, dim],
                &format!("(1, {dim}) = (1, dim); {dims_note}"),
            )?;
            let b = sd.vec(names::GATING_BIAS, &bv, &[1], "(1)")?;
            Some(PkmGate { w, b: b[0] })
        }
        (Some(_), None) => {
            return Err(sd.missing(
                names::GATING_BIAS,
                "; `gating.weight` is present, so the gate needs its bias",
            ));
        }
        (None, Some(_)) => {
            return Err(sd.missing(
                names::GATING_WEIGHT,
                "; `gating.bias` is present, so the gate needs its weight",
            ));
        }
    };

    let config = PkmConfig {
        dim,
        v_dim,
        heads,
        n_keys,
        k_dim,
        knn,
        qk_norm: false,
        gated: gate.is_some(),
    };
    let params = PkmParams {
        w_q,
        b_q,
        keys,
        w_s,
        b_s,
        w_o,
        b_o,
        gate,
    };
    params.check(&config)?;
    Ok(HashingMemoryLayer {
        config,
        params,
        values,
    })
}

/// A layer input read from safetensors, widened to f32.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerInput {
    /// `(tokens, dim)` row-major.
    pub data: Vec<f32>,
    /// The stored shape: `(tokens, dim)` or `(1, tokens, dim)`; outputs take it.
    pub shape: Vec<usize>,
    /// Number of tokens.
    pub tokens: usize,
}

/// Reads tensor [`names::INPUT`] (`(tokens, dim)` or `(1, tokens, dim)`; f32, f16
/// or bf16) from safetensors bytes and checks its last dimension against `dim`.
pub fn load_layer_input(bytes: &[u8], dim: usize) -> Result<LayerInput, InteropError> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| InteropError::Parse {
        what: "input".into(),
        message: e.to_string(),
    })?;
    let name = names::INPUT;
    let view = st.tensor(name).map_err(|_| {
        let mut found: Vec<String> = st.names().into_iter().map(|n| format!("`{n}`")).collect();
        found.sort();
        InteropError::MissingTensor {
            name: name.into(),
            what: "input".into(),
            hint: format!(
                "; it holds {}",
                if found.is_empty() {
                    "no tensors".into()
                } else {
                    found.join(", ")
                }
            ),
        }
    })?;
    let shape = view.shape().to_vec();
    let tokens = match *shape.as_slice() {
        [t, d] | [1, t, d] if d == dim => t,
        [_, d] | [1, _, d] => {
            return Err(InteropError::Shape {
                name: name.into(),
                shape,
                expected: format!(
                    "last dimension {dim} (the layer's dim, from `{}`), got {d}",
                    names::QUERY_WEIGHT
                ),
            });
        }
        _ => {
            return Err(InteropError::Shape {
                name: name.into(),
                shape,
                expected: format!("(tokens, {dim}) or (1, tokens, {dim})"),
            });
        }
    };
    let data = tensor_to_f32(name, &view)?;
    Ok(LayerInput {
        data,
        shape,
        tokens,
    })
}

/// Widens a float tensor (F32, F16, BF16, F64; little-endian) to f32, row-major.
pub fn tensor_to_f32(name: &str, view: &TensorView<'_>) -> Result<Vec<f32>, InteropError> {
    let bytes = view.data();
    let out = match view.dtype() {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        other => {
            return Err(InteropError::UnsupportedDtype {
                name: name.into(),
                dtype: format!("{other:?}"),
            });
        }
    };
    Ok(out)
}

/// Name resolution and typed reads over one state dict.
struct StateDict<'a, 'data> {
    st: &'a SafeTensors<'data>,
    prefix: String,
}

impl<'a, 'data> StateDict<'a, 'data> {
    fn new(st: &'a SafeTensors<'data>, prefix: &str) -> Self {
        let prefix = if prefix.is_empty() || prefix.ends_with('.') {
            prefix.to_string()
        } else {
            format!("{prefix}.")
        };
        Self { st, prefix }
    }

    fn full(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn has(&self, name: &str) -> bool {
        self.try_get(name).is_some()
    }

    fn try_get(&self, name: &str) -> Option<TensorView<'data>> {
        self.st.tensor(&self.full(name)).ok()
    }

    fn missing(&self, name: &str, hint: &str) -> InteropError {
        let mut hint = hint.to_string();
        if !self.prefix.is_empty() && !self.st.names().iter().any(|n| n.starts_with(&self.prefix)) {
            hint.push_str(&format!(
                "; no tensor name starts with the prefix `{}`",
                self.prefix
            ));
        }
        InteropError::MissingTensor {
            name: self.full(name),
            what: "state dict".into(),
            hint,
        }
    }

    fn get(&self, name: &str, hint: &str) -> Result<TensorView<'data>, InteropError> {
        self.try_get(name).ok_or_else(|| self.missing(name, hint))
    }

    /// First `query_proj.query_mlps.*` tensor other than layer 0's weight/bias.
    fn extra_query_layer(&self) -> Option<String> {
        let base = self.full("query_proj.query_mlps.");
        let ok = [self.full(names::QUERY_WEIGHT), self.full(names::QUERY_BIAS)];
        let mut extra: Vec<&str> = self
            .st
            .names()
            .into_iter()
            .filter(|n| n.starts_with(&base) && !ok.iter().any(|o| o == n))
            .collect();
        extra.sort_unstable();
        extra.first().map(|s| s.to_string())
    }

    fn shape_err(&self, name: &str, v: &TensorView<'_>, expected: &str) -> InteropError {
        InteropError::Shape {
            name: self.full(name),
            shape: v.shape().to_vec(),
            expected: expected.into(),
        }
    }

    fn dims2(
        &self,
        name: &str,
        v: &TensorView<'_>,
        expected: &str,
    ) -> Result<[usize; 2], InteropError> {
        match v.shape() {
            &[a, b] => Ok([a, b]),
            _ => Err(self.shape_err(name, v, expected)),
        }
    }

    fn f32(&self, name: &str, v: &TensorView<'_>) -> Result<Vec<f32>, InteropError> {
        tensor_to_f32(&self.full(name), v)
    }

    /// Reads a tensor that must have exactly shape `dims`.
    fn vec(
        &self,
        name: &str,
        v: &TensorView<'_>,
        dims: &[usize],
        expected: &str,
    ) -> Result<Vec<f32>, InteropError> {
        if v.shape() != dims {
            return Err(self.shape_err(name, v, expected));
        }
        self.f32(name, v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use safetensors::serialize;

    fn cfg(gated: bool) -> PkmConfig {
        PkmConfig {
            dim: 6,
            v_dim: 5,
            heads: 2,
            n_keys: 3,
            k_dim: 4,
            knn: 2,
            qk_norm: false,
            gated,
        }
    }

    /// A state dict as Meta's `state_dict()` names it, with `dtype` for every
    /// float tensor (values rounded to that dtype first).
    fn state_dict(
        c: &PkmConfig,
        p: &PkmParams,
        values: &[f32],
        dtype: Dtype,
        skip: &[&str],
    ) -> Vec<u8> {
        let enc = |x: &[f32]| -> Vec<u8> {
            match dtype {
                Dtype::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
                Dtype::F16 => x
                    .iter()
                    .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                    .collect(),
                Dtype::BF16 => x
                    .iter()
                    .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                    .collect(),
                _ => unreachable!(),
            }
        };
        let mut t: Vec<(&str, Vec<usize>, Vec<u8>)> = vec![
            (
                names::KEYS,
                vec![2 * c.heads * c.n_keys, c.half()],
                enc(&p.keys),
            ),
            (names::VALUES, vec![c.n_rows(), c.v_dim], enc(values)),
            (names::QUERY_WEIGHT, vec![c.query_dim(), c.dim], enc(&p.w_q)),
            (names::QUERY_BIAS, vec![c.query_dim()], enc(&p.b_q)),
            (names::SWILU_WEIGHT, vec![c.v_dim, c.dim], enc(&p.w_s)),
            (names::SWILU_BIAS, vec![c.v_dim], enc(&p.b_s)),
            (names::VALUE_PROJ_WEIGHT, vec![c.dim, c.v_dim], enc(&p.w_o)),
            (names::VALUE_PROJ_BIAS, vec![c.dim], enc(&p.b_o)),
        ];
        if let Some(g) = &p.gate {
            t.push((names::GATING_WEIGHT, vec![1, c.dim], enc(&g.w)));
            t.push((names::GATING_BIAS, vec![1], enc(&[g.b])));
        }
        let views: Vec<(String, TensorView<'_>)> = t
            .iter()
            .filter(|(n, _, _)| !skip.contains(n))
            .map(|(n, s, d)| (n.to_string(), TensorView::new(dtype, s.clone(), d).unwrap()))
            .collect();
        serialize(views, None).unwrap()
    }

    fn round(x: &[f32], dtype: Dtype) -> Vec<f32> {
        x.iter()
            .map(|&v| match dtype {
                Dtype::F16 => f16::from_f32(v).to_f32(),
                Dtype::BF16 => bf16::from_f32(v).to_f32(),
                _ => v,
            })
            .collect()
    }

    #[test]
    fn round_trips_every_float_dtype() {
        for gated in [false, true] {
            let c = cfg(gated);
            let mut rng = Rng::new(7);
            let p = PkmParams::init(&c, &mut rng);
            let v = pkm::init_values(&c, &mut rng);
            for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
                let layer =
                    load_hashing_memory(&state_dict(&c, &p, &v, dtype, &[]), c.knn).unwrap();
                assert_eq!(layer.config, c);
                assert_eq!(layer.values, round(&v, dtype));
                assert_eq!(layer.params.keys, round(&p.keys, dtype));
                assert_eq!(layer.params.w_q, round(&p.w_q, dtype));
                assert_eq!(layer.params.w_o, round(&p.w_o, dtype));
                assert_eq!(layer.params.gate.is_some(), gated);
                if dtype == Dtype::F32 {
                    assert_eq!(layer.params, p);
                }
            }
        }
    }

    #[test]
    fn prefix_and_missing_query_bias() {
        let c = cfg(false);
        let mut rng = Rng::new(8);
        let p = PkmParams::init(&c, &mut rng);
        let v = pkm::init_values(&c, &mut rng);
        let bytes = state_dict(&c, &p, &v, Dtype::F32, &[names::QUERY_BIAS]);
        let layer = load_hashing_memory(&bytes, 1).unwrap();
        assert_eq!(layer.params.b_q, vec![0.0; c.query_dim()]);
        assert_eq!(layer.config.knn, 1);
        // A prefix that matches nothing names the prefixed tensor.
        let err = load_hashing_memory_prefixed(&bytes, "layers.3.memory", 1)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("missing tensor `layers.3.memory.keys`"),
            "{err}"
        );
        assert!(
            err.contains("no tensor name starts with the prefix `layers.3.memory.`"),
            "{err}"
        );
        // The same tensors behind the prefix load to the same layer.
        let parsed = SafeTensors::deserialize(&bytes).unwrap();
        let renamed: Vec<(String, TensorView<'_>)> = parsed
            .tensors()
            .into_iter()
            .map(|(n, v)| (format!("layers.3.memory.{n}"), v))
            .collect();
        let prefixed = serialize(renamed, None).unwrap();
        assert_eq!(
            load_hashing_memory_prefixed(&prefixed, "layers.3.memory", 1).unwrap(),
            layer
        );
        assert_eq!(
            load_hashing_memory_prefixed(&prefixed, "layers.3.memory.", 1).unwrap(),
            layer
        );
    }

    #[test]
    fn errors_name_the_tensor() {
        let c = cfg(true);
        let mut rng = Rng::new(9);
        let p = PkmParams::init(&c, &mut rng);
        let v = pkm::init_values(&c, &mut rng);
        let msg = |skip: &[&str], knn: usize| {
            load_hashing_memory(&state_dict(&c, &p, &v, Dtype::F32, skip), knn)
                .unwrap_err()
                .to_string()
        };
        assert!(msg(&[names::KEYS], 2).contains("missing tensor `keys`"));
        assert!(msg(&[names::VALUES], 2).contains("mem_share_values"));
        assert!(msg(&[names::VALUE_PROJ_BIAS], 2).contains("`value_proj.bias`"));
        assert!(msg(&[names::GATING_BIAS], 2).contains("`gating.bias`"));
        assert!(
            msg(&[names::SWILU_WEIGHT, names::SWILU_BIAS], 2).contains("swilu_projection=True")
        );
        assert!(msg(&[], 4).contains("knn 4 is out of range: must be in 1..=3"));
        assert!(msg(&[], 0).contains("knn 0"));
        assert!(
            load_hashing_memory(b"not safetensors", 2)
                .unwrap_err()
                .to_string()
                .contains("cannot parse")
        );
    }

    /// `bytes` with tensor `name` replaced by an f32 tensor of `shape` (filled with 0.5).
    fn replace(bytes: &[u8], name: &str, shape: Vec<usize>) -> Vec<u8> {
        let parsed = SafeTensors::deserialize(bytes).unwrap();
        let data: Vec<u8> = (0..shape.iter().product::<usize>())
            .flat_map(|_| 0.5f32.to_le_bytes())
            .collect();
        let mut views: Vec<(String, TensorView<'_>)> = parsed
            .tensors()
            .into_iter()
            .filter(|(n, _)| n != name)
            .collect();
        views.push((
            name.into(),
            TensorView::new(Dtype::F32, shape, &data).unwrap(),
        ));
        serialize(views, None).unwrap()
    }

    #[test]
    fn inconsistent_shapes_are_reported() {
        let c = cfg(false);
        let mut rng = Rng::new(10);
        let p = PkmParams::init(&c, &mut rng);
        let v = pkm::init_values(&c, &mut rng);
        let good = state_dict(&c, &p, &v, Dtype::F32, &[]);
        let err = |name: &str, shape: Vec<usize>| {
            load_hashing_memory(&replace(&good, name, shape), 2)
                .unwrap_err()
                .to_string()
        };
        let e = err(names::VALUES, vec![4, 5]);
        assert!(
            e.contains("`values.weight` has shape [4, 5]; expected (9, v_dim)"),
            "{e}"
        );
        let e = err(names::SWILU_WEIGHT, vec![5, 7]);
        assert!(
            e.contains("`swilu_projection.weight` has shape [5, 7]; expected (5, 6)"),
            "{e}"
        );
        let e = err(names::QUERY_WEIGHT, vec![6, 6]);
        assert!(
            e.contains("`query_proj.query_mlps.0.weight` has shape [6, 6]"),
            "{e}"
        );
        assert!(e.contains("multiple of k_dim = 4"), "{e}");
        let e = err(names::KEYS, vec![12, 2, 1]);
        assert!(
            e.contains("`keys` has shape [12, 2, 1]; expected 2 dims"),
            "{e}"
        );
        let e = err(names::VALUE_PROJ_WEIGHT, vec![7, 5]);
        assert!(e.contains("output_dim 7 != input_dim 6"), "{e}");
        let e = err(names::QUERY_BIAS, vec![9]);
        assert!(
            e.contains("`query_proj.query_mlps.0.bias` has shape [9]"),
            "{e}"
        );
        let e = err("query_proj.query_mlps.1.running_mean", vec![8]);
        assert!(e.contains("batch norm"), "{e}");
        let e = err("values_u.weight", vec![9, 5]);
        assert!(e.contains("PEER"), "{e}");
    }

    #[test]
    fn input_shapes() {
        let x: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let b: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        let file = |shape: Vec<usize>, name: &str| {
            serialize(
                vec![(
                    name.to_string(),
                    TensorView::new(Dtype::F32, shape, &b).unwrap(),
                )],
                None,
            )
            .unwrap()
        };
        let i = load_layer_input(&file(vec![2, 6], "input"), 6).unwrap();
        assert_eq!(
            (i.tokens, i.shape.clone(), i.data),
            (2, vec![2, 6], x.clone())
        );
        assert_eq!(
            load_layer_input(&file(vec![1, 2, 6], "input"), 6)
                .unwrap()
                .tokens,
            2
        );
        let e = load_layer_input(&file(vec![3, 4], "input"), 6)
            .unwrap_err()
            .to_string();
        assert!(e.contains("last dimension 6") && e.contains("got 4"), "{e}");
        let e = load_layer_input(&file(vec![2, 1, 6], "input"), 6)
            .unwrap_err()
            .to_string();
        assert!(e.contains("(tokens, 6) or (1, tokens, 6)"), "{e}");
        let e = load_layer_input(&file(vec![2, 6], "x"), 6)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("missing tensor `input`") && e.contains("`x`"),
            "{e}"
        );
    }
}
