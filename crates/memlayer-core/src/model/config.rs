//! Model configuration shared by the reference forward, the burn model, the
//! trainer, the exporter and the runtimes (serialised as `config.json` in a
//! model directory).

use crate::error::OracleError;
use crate::hier::addr::BlockLayout;
use crate::pkm::PkmConfig;
use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------
// Bounds of a config.
//
// A `config.json` is untrusted input: every size in it becomes an allocation
// (embedding tables, RoPE tables, the bank's rows) or a loop bound. Each field
// has a named maximum, generous for real models (Llama-3-405B has a vocabulary
// of 128 256, dim 16 384, 126 layers, 128 heads, 53 248 FFN units, a context of
// 131 072 and RoPE base 500 000; Meta's memory layers use n_keys 1024–4096),
// and the sizes derived from several fields are bounded with checked
// arithmetic. `ModelConfig::check` applies all of them.
// ---------------------------------------------------------------------------

/// Largest `vocab_size` (2^22 = 4 194 304 tokens).
pub const MAX_VOCAB_SIZE: usize = 1 << 22;
/// Largest model width `dim` (2^16 = 65 536).
pub const MAX_DIM: usize = 1 << 16;
/// Most decoder layers `n_layers` (1024).
pub const MAX_LAYERS: usize = 1 << 10;
/// Most attention heads `n_heads` (1024; also at most `dim / 2`).
pub const MAX_HEADS: usize = 1 << 10;
/// Most hidden units of the anchor FFN `ffn_hidden` (2^20), and of a
/// hierarchical-memory block per level (`hier.units[l]`).
pub const MAX_FFN_HIDDEN: usize = 1 << 20;
/// Longest context `max_seq_len` (2^20 = 1 048 576 positions).
pub const MAX_SEQ_LEN: usize = 1 << 20;
/// Smallest RoPE base `rope_theta` (1: every frequency is 1).
pub const MIN_ROPE_THETA: f32 = 1.0;
/// Largest RoPE base `rope_theta` (1e12).
pub const MAX_ROPE_THETA: f32 = 1e12;
/// Largest RMSNorm epsilon `norm_eps` (1; it must also be > 0).
pub const MAX_NORM_EPS: f32 = 1.0;
/// Most sub-keys per half `pkm.n_keys` (65 535: the `n_keys²` row ids fit in u32).
pub const MAX_PKM_N_KEYS: usize = u16::MAX as usize;
/// Most memory read heads `pkm.heads` (256).
pub const MAX_PKM_HEADS: usize = 1 << 8;
/// Widest query/sub-key `pkm.k_dim` (4096).
pub const MAX_PKM_K_DIM: usize = 1 << 12;
/// Most rows read per head `pkm.knn` (4096; also at most `n_keys`).
pub const MAX_PKM_KNN: usize = 1 << 12;
/// Deepest cluster tree `hier.levels` (8).
pub const MAX_HIER_LEVELS: usize = 8;
/// Largest branching factor `hier.branching` (4096).
pub const MAX_HIER_BRANCHING: usize = 1 << 12;
/// Most nodes of one tree level, `branching^level` (2^24 = 16 777 216 blocks).
pub const MAX_HIER_NODES: usize = 1 << 24;
/// Most values in one FFN-memory block (`dense layers · 3 · units · dim`,
/// one bank page: 2^28 values = 1 GiB of f32).
pub const MAX_BLOCK_ELEMENTS: u64 = 1 << 28;
/// Most elements of one RoPE table (`max_seq_len · head_dim / 2`, 2^28 =
/// 1 GiB of f32 each for the cos and the sin table).
pub const MAX_ROPE_TABLE_ELEMENTS: u64 = 1 << 28;
/// Most dense parameters (everything every runtime holds in memory:
/// embeddings, attention, FFNs, memory-layer projections; 2^36 ≈ 68.7 G).
pub const MAX_DENSE_PARAMS: u64 = 1 << 36;
/// Most parameters in all (dense + product-key values + FFN-memory blocks:
/// what the bank holds may be much larger than the dense part; 2^42 ≈ 4.4 T).
pub const MAX_TOTAL_PARAMS: u64 = 1 << 42;

/// A `config.json` (or a [`ModelConfig`] built in code) that cannot be run:
/// unparsable, or a field outside its bounds. The error names the field,
/// its value and the limit it breaks.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// The JSON is not a model config (syntax, types, a number that does
    /// not fit its field).
    #[error("not a valid model config: {0}")]
    Parse(String),
    /// A field (or a size derived from several fields) is out of range.
    #[error("config field `{field}` = {value} is out of range: {limit}")]
    Field {
        /// The field (`pkm.n_keys`, `hier.units[1]`, or a derived size such
        /// as `total parameters`).
        field: String,
        /// Its value (or the derivation's).
        value: String,
        /// The rule it breaks, with the named maximum where there is one.
        limit: String,
    },
}

impl ConfigError {
    fn field(field: impl Into<String>, value: impl ToString, limit: impl Into<String>) -> Self {
        Self::Field {
            field: field.into(),
            value: value.to_string(),
            limit: limit.into(),
        }
    }

    /// The field named by the error (`None` for a parse error).
    pub fn field_name(&self) -> Option<&str> {
        match self {
            Self::Parse(_) => None,
            Self::Field { field, .. } => Some(field),
        }
    }
}

impl From<ConfigError> for OracleError {
    fn from(e: ConfigError) -> Self {
        OracleError::InvalidConfig(e.to_string())
    }
}

/// `1 <= value <= max`, or a [`ConfigError`] naming `field` and `max_name`.
fn in_range(field: &str, value: usize, max: usize, max_name: &str) -> Result<(), ConfigError> {
    if value == 0 || value > max {
        return Err(ConfigError::field(
            field,
            value,
            format!("must be in 1..={max} ({max_name})"),
        ));
    }
    Ok(())
}

/// A derived size: `Some(n)` with `n <= max`, or a [`ConfigError`] (`None`
/// is an overflow of the checked arithmetic that computed it).
fn derived(field: &str, value: Option<u64>, max: u64, max_name: &str) -> Result<u64, ConfigError> {
    match value {
        Some(n) if n <= max => Ok(n),
        Some(n) => Err(ConfigError::field(
            field,
            n,
            format!("must be at most {max} ({max_name})"),
        )),
        None => Err(ConfigError::field(
            field,
            "overflow",
            format!("must be at most {max} ({max_name})"),
        )),
    }
}

/// Parameter counts in u64 with checked arithmetic (None on overflow).
#[derive(Clone, Copy, Debug)]
struct Counts64 {
    dense: u64,
    values: u64,
    blocks: u64,
    active_memory: u64,
}

/// A Llama-style decoder with optional product-key memory layers and an
/// optional hierarchical FFN memory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Tokenizer vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub dim: usize,
    /// Number of decoder layers.
    pub n_layers: usize,
    /// Attention heads (`dim % n_heads == 0`, head width even for RoPE).
    pub n_heads: usize,
    /// Hidden units of the anchor SwiGLU FFN.
    pub ffn_hidden: usize,
    /// Longest sequence (RoPE tables, KV cache).
    pub max_seq_len: usize,
    /// RoPE base.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f32,
    /// RMSNorm epsilon.
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f32,
    /// Output projection shares the token embedding.
    #[serde(default)]
    pub tie_embeddings: bool,
    /// Product-key memory layers replacing the FFN of some layers.
    #[serde(default)]
    pub pkm: Option<PkmSpec>,
    /// Hierarchical FFN memory appended to every dense FFN.
    #[serde(default)]
    pub hier: Option<HierSpec>,
}

fn default_rope_theta() -> f32 {
    10_000.0
}

fn default_norm_eps() -> f32 {
    1e-5
}

/// Product-key memory (DESIGN §1): which layers, and the layer shapes. The
/// value table `(n_keys², v_dim)` is shared by all memory layers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PkmSpec {
    /// Layers whose FFN is replaced by a memory layer.
    pub layers: Vec<usize>,
    /// Sub-keys per half.
    pub n_keys: usize,
    /// Read heads.
    pub heads: usize,
    /// Query/key width per head.
    pub k_dim: usize,
    /// Rows read per head.
    pub knn: usize,
    /// Value width (0 means `dim`).
    #[serde(default)]
    pub v_dim: usize,
    /// RMS-normalise query halves and sub-keys.
    #[serde(default)]
    pub qk_norm: bool,
    /// Output gate.
    #[serde(default)]
    pub gated: bool,
}

/// Hierarchical FFN memory (DESIGN §2): a cluster tree of `levels` levels and
/// `branching` children; a block at level `l` adds `units[l-1]` SwiGLU units
/// to every dense FFN.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HierSpec {
    /// Tree depth `L`.
    pub levels: usize,
    /// Branching factor `b`.
    pub branching: usize,
    /// Units per block, one entry per level (level 1 first).
    pub units: Vec<usize>,
    /// Train a context-independent generic block per level, used instead of
    /// the context's block with probability `1/(b+1)`.
    #[serde(default)]
    pub generic: bool,
    /// How a context that is not a training context (a prompt) finds its
    /// path. Training contexts always use their tree assignment.
    #[serde(default, skip_serializing_if = "HierRouting::is_descent")]
    pub routing: HierRouting,
}

/// How the hierarchical memory routes a prompt to its tree path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HierRouting {
    /// Greedy descent: the nearest centroid at each level (DESIGN §2).
    #[default]
    Descent,
    /// The path of the most similar training context (exact-vocabulary
    /// TF-IDF, cosine); descent when no word is shared. A context that alone
    /// mentions a rare name weighs 1/(cluster size) in a centroid, so descent
    /// rarely finds it; nearest-context search does.
    NearestContext,
}

impl HierRouting {
    /// `Descent` (the default, left out of serialised configs).
    pub fn is_descent(&self) -> bool {
        *self == Self::Descent
    }
}

impl HierSpec {
    /// Nodes of level `l` (`1..=levels`): `b^l`.
    /// Saturates at `usize::MAX` (a validated config stays far below it).
    pub fn nodes(&self, level: usize) -> usize {
        u32::try_from(level).map_or(usize::MAX, |l| self.branching.saturating_pow(l))
    }

    /// Rows of the level-`l` block table: its nodes, plus the generic block
    /// (last row) when enabled.
    pub fn rows(&self, level: usize) -> usize {
        self.nodes(level).saturating_add(usize::from(self.generic))
    }

    /// Row of the generic block of level `l`.
    pub fn generic_row(&self, level: usize) -> Option<usize> {
        self.generic.then(|| self.nodes(level))
    }
}

impl ModelConfig {
    /// A small valid config for tests: 3 layers of width 16, with `pkm` a
    /// product-key memory in layer 1 (5² rows of 12, qk-norm, gate), with
    /// `hier` a 2-level hierarchical memory (branching 2, units [4, 2], a
    /// generic block). Tests change the fields they are about.
    #[doc(hidden)]
    pub fn tiny_for_tests(pkm: bool, hier: bool) -> Self {
        Self {
            vocab_size: 37,
            dim: 16,
            n_layers: 3,
            n_heads: 2,
            ffn_hidden: 24,
            max_seq_len: 32,
            rope_theta: 10_000.0,
            norm_eps: 1e-5,
            tie_embeddings: false,
            pkm: pkm.then(|| PkmSpec {
                layers: vec![1],
                n_keys: 5,
                heads: 2,
                k_dim: 8,
                knn: 3,
                v_dim: 12,
                qk_norm: true,
                gated: true,
            }),
            hier: hier.then(|| HierSpec {
                levels: 2,
                branching: 2,
                units: vec![4, 2],
                generic: true,
                routing: Default::default(),
            }),
        }
    }

    /// [`Self::tiny_for_tests`] as the runtime and burn-model tests run it:
    /// 2 layers, tied embeddings, the product-key memory (always) ungated
    /// with `v_dim = dim`, the hierarchy (with `hier`) without a generic block.
    #[doc(hidden)]
    pub fn tiny_tied_for_tests(hier: bool) -> Self {
        let tiny = Self::tiny_for_tests(true, hier);
        Self {
            n_layers: 2,
            tie_embeddings: true,
            pkm: (tiny.pkm.clone()).map(|p| PkmSpec {
                v_dim: tiny.dim,
                gated: false,
                ..p
            }),
            hier: (tiny.hier.clone()).map(|h| HierSpec {
                generic: false,
                ..h
            }),
            ..tiny
        }
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.dim / self.n_heads.max(1)
    }

    /// Whether layer `i` is a product-key memory layer.
    pub fn is_pkm_layer(&self, i: usize) -> bool {
        self.pkm.as_ref().is_some_and(|p| p.layers.contains(&i))
    }

    /// Layers with a dense FFN (the ones the hierarchical memory extends), in order.
    pub fn dense_layers(&self) -> Vec<usize> {
        (0..self.n_layers)
            .filter(|&i| !self.is_pkm_layer(i))
            .collect()
    }

    /// The oracle's view of one memory layer.
    pub fn pkm_config(&self) -> Option<PkmConfig> {
        self.pkm.as_ref().map(|p| PkmConfig {
            dim: self.dim,
            v_dim: if p.v_dim == 0 { self.dim } else { p.v_dim },
            heads: p.heads,
            n_keys: p.n_keys,
            k_dim: p.k_dim,
            knn: p.knn,
            qk_norm: p.qk_norm,
            gated: p.gated,
        })
    }

    /// Parses `config.json` text and checks it ([`ModelConfig::check`]):
    /// the one way a runtime or trainer reads a config from a file.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let cfg: Self =
            serde_json::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        cfg.check()?;
        Ok(cfg)
    }

    /// Checks every field against its bounds (`MAX_*` of this module), the
    /// shape constraints between fields, and the derived sizes (RoPE table,
    /// one block, dense and total parameters) with checked arithmetic. The
    /// error names the field, its value and the limit.
    ///
    /// Sizes are checked before anything is derived from them, so no input
    /// makes this overflow or allocate more than `n_layers` entries.
    pub fn check(&self) -> Result<(), ConfigError> {
        in_range(
            "vocab_size",
            self.vocab_size,
            MAX_VOCAB_SIZE,
            "MAX_VOCAB_SIZE",
        )?;
        in_range("dim", self.dim, MAX_DIM, "MAX_DIM")?;
        in_range("n_layers", self.n_layers, MAX_LAYERS, "MAX_LAYERS")?;
        in_range("n_heads", self.n_heads, MAX_HEADS, "MAX_HEADS")?;
        in_range(
            "ffn_hidden",
            self.ffn_hidden,
            MAX_FFN_HIDDEN,
            "MAX_FFN_HIDDEN",
        )?;
        in_range("max_seq_len", self.max_seq_len, MAX_SEQ_LEN, "MAX_SEQ_LEN")?;
        let theta = self.rope_theta;
        if !(theta.is_finite() && (MIN_ROPE_THETA..=MAX_ROPE_THETA).contains(&theta)) {
            return Err(ConfigError::field(
                "rope_theta",
                theta,
                format!(
                    "must be finite and in {MIN_ROPE_THETA}..={MAX_ROPE_THETA:e} \
                     (MIN_ROPE_THETA..=MAX_ROPE_THETA)"
                ),
            ));
        }
        let eps = self.norm_eps;
        if !(eps.is_finite() && eps > 0.0 && eps <= MAX_NORM_EPS) {
            return Err(ConfigError::field(
                "norm_eps",
                eps,
                format!("must be finite, > 0 and at most {MAX_NORM_EPS} (MAX_NORM_EPS)"),
            ));
        }
        if !self.dim.is_multiple_of(self.n_heads) || !self.head_dim().is_multiple_of(2) {
            return Err(ConfigError::field(
                "dim",
                self.dim,
                format!(
                    "must split into n_heads = {} heads of even width (RoPE)",
                    self.n_heads
                ),
            ));
        }
        derived(
            "RoPE table elements (max_seq_len · head_dim / 2)",
            (self.max_seq_len as u64).checked_mul(self.head_dim() as u64 / 2),
            MAX_ROPE_TABLE_ELEMENTS,
            "MAX_ROPE_TABLE_ELEMENTS",
        )?;
        if let Some(p) = &self.pkm {
            self.check_pkm(p)?;
        }
        if let Some(h) = &self.hier {
            self.check_hier(h)?;
        }
        let c = self.counts64().ok_or_else(|| {
            ConfigError::field(
                "total parameters",
                "overflow",
                format!("must be at most {MAX_TOTAL_PARAMS} (MAX_TOTAL_PARAMS)"),
            )
        })?;
        derived(
            "dense parameters",
            Some(c.dense),
            MAX_DENSE_PARAMS,
            "MAX_DENSE_PARAMS",
        )?;
        let total = derived(
            "total parameters",
            c.dense
                .checked_add(c.values)
                .and_then(|t| t.checked_add(c.blocks)),
            MAX_TOTAL_PARAMS,
            "MAX_TOTAL_PARAMS",
        )?;
        if usize::try_from(total).is_err() {
            return Err(ConfigError::field(
                "total parameters",
                total,
                format!("must fit this platform's usize (at most {})", usize::MAX),
            ));
        }
        Ok(())
    }

    fn check_pkm(&self, p: &PkmSpec) -> Result<(), ConfigError> {
        in_range("pkm.n_keys", p.n_keys, MAX_PKM_N_KEYS, "MAX_PKM_N_KEYS")?;
        in_range("pkm.heads", p.heads, MAX_PKM_HEADS, "MAX_PKM_HEADS")?;
        in_range("pkm.k_dim", p.k_dim, MAX_PKM_K_DIM, "MAX_PKM_K_DIM")?;
        if p.k_dim < 2 || !p.k_dim.is_multiple_of(2) {
            return Err(ConfigError::field(
                "pkm.k_dim",
                p.k_dim,
                "must be even and at least 2",
            ));
        }
        in_range(
            "pkm.knn",
            p.knn,
            MAX_PKM_KNN.min(p.n_keys),
            "min(MAX_PKM_KNN, pkm.n_keys)",
        )?;
        if p.v_dim > MAX_DIM {
            return Err(ConfigError::field(
                "pkm.v_dim",
                p.v_dim,
                format!("must be at most {MAX_DIM} (MAX_DIM; 0 means dim)"),
            ));
        }
        if p.layers.is_empty() || p.layers.len() > self.n_layers {
            return Err(ConfigError::field(
                "pkm.layers",
                format!("{} entries", p.layers.len()),
                format!("must list 1..={} layers (n_layers)", self.n_layers),
            ));
        }
        if let Some((i, &l)) = p
            .layers
            .iter()
            .enumerate()
            .find(|&(_, &l)| l >= self.n_layers)
        {
            return Err(ConfigError::field(
                format!("pkm.layers[{i}]"),
                l,
                format!(
                    "pkm layer {l} out of range: must be < n_layers = {}",
                    self.n_layers
                ),
            ));
        }
        // the oracle's own rules (none left to break, kept as the backstop)
        if let Some(c) = self.pkm_config() {
            c.validate()
                .map_err(|e| ConfigError::field("pkm", format!("{p:?}"), e.to_string()))?;
        }
        Ok(())
    }

    fn check_hier(&self, h: &HierSpec) -> Result<(), ConfigError> {
        in_range("hier.levels", h.levels, MAX_HIER_LEVELS, "MAX_HIER_LEVELS")?;
        in_range(
            "hier.branching",
            h.branching,
            MAX_HIER_BRANCHING,
            "MAX_HIER_BRANCHING",
        )?;
        let deepest = (h.branching as u64).checked_pow(h.levels as u32);
        derived(
            "hier.branching^hier.levels (nodes of the deepest level)",
            deepest,
            MAX_HIER_NODES as u64,
            "MAX_HIER_NODES",
        )?;
        if h.units.len() != h.levels {
            return Err(ConfigError::field(
                "hier.units",
                format!("{} entries", h.units.len()),
                format!("must have one entry per level ({} levels)", h.levels),
            ));
        }
        for (i, &u) in h.units.iter().enumerate() {
            in_range(
                &format!("hier.units[{i}]"),
                u,
                MAX_FFN_HIDDEN,
                "MAX_FFN_HIDDEN",
            )?;
        }
        let dense = self.dense_layers().len();
        if dense == 0 {
            return Err(ConfigError::field(
                "hier",
                "every layer is a pkm layer",
                "hier memory needs at least one dense FFN layer",
            ));
        }
        for (i, &u) in h.units.iter().enumerate() {
            derived(
                &format!(
                    "values of one level-{} block (dense layers · 3 · units · dim)",
                    i + 1
                ),
                (dense as u64)
                    .checked_mul(3 * u as u64)
                    .and_then(|n| n.checked_mul(self.dim as u64)),
                MAX_BLOCK_ELEMENTS,
                "MAX_BLOCK_ELEMENTS",
            )?;
        }
        BlockLayout::new(h.levels, h.branching).map_err(|e| {
            ConfigError::field(
                "hier",
                format!("{} x {}", h.levels, h.branching),
                e.to_string(),
            )
        })?;
        Ok(())
    }

    /// Checks every bound and shape constraint ([`ModelConfig::check`]) as
    /// an [`OracleError`], for the oracle's callers.
    pub fn validate(&self) -> Result<(), OracleError> {
        Ok(self.check()?)
    }

    /// Parameter counts in u64, checked (None on overflow).
    fn counts64(&self) -> Option<Counts64> {
        let u = |x: usize| x as u64;
        let d = u(self.dim);
        let vd = u(self.vocab_size).checked_mul(d)?;
        let embeddings = if self.tie_embeddings {
            vd
        } else {
            vd.checked_mul(2)?
        };
        let mut dense = embeddings.checked_add(d)?; // + final norm
        let attention = d
            .checked_mul(d)?
            .checked_mul(4)?
            .checked_add(d.checked_mul(2)?)?;
        let ffn = d.checked_mul(u(self.ffn_hidden))?.checked_mul(3)?;
        let mut active_memory = 0u64;
        let mut values = 0u64;
        let pkm = self.pkm_config();
        let pkm_layer = match &pkm {
            Some(c) => {
                let (qd, v) = (u(c.heads).checked_mul(u(c.k_dim))?, u(c.v_dim));
                let mut n = qd
                    .checked_mul(d.checked_add(1)?)?
                    .checked_add(
                        u(c.heads)
                            .checked_mul(2)?
                            .checked_mul(u(c.n_keys))?
                            .checked_mul(u(c.k_dim / 2))?,
                    )?
                    .checked_add(v.checked_mul(d)?.checked_mul(2)?)?
                    .checked_add(v)?
                    .checked_add(d)?;
                if c.gated {
                    n = n.checked_add(d.checked_add(1)?)?;
                }
                values = u(c.n_keys).checked_mul(u(c.n_keys))?.checked_mul(v)?;
                Some((n, u(c.heads).checked_mul(u(c.knn))?.checked_mul(v)?))
            }
            None => None,
        };
        let mut dense_layers = 0u64;
        for i in 0..self.n_layers {
            dense = dense.checked_add(attention)?;
            match (self.is_pkm_layer(i), pkm_layer) {
                (true, Some((n, active))) => {
                    dense = dense.checked_add(n)?;
                    active_memory = active_memory.checked_add(active)?;
                }
                _ => {
                    dense = dense.checked_add(ffn)?;
                    dense_layers += 1;
                }
            }
        }
        let mut blocks = 0u64;
        if let Some(h) = &self.hier {
            let per_unit = d.checked_mul(3)?.checked_mul(dense_layers)?;
            for l in 1..=h.levels {
                let units = u(*h.units.get(l - 1)?);
                let block = units.checked_mul(per_unit)?;
                blocks = blocks.checked_add(u(h.rows(l)).checked_mul(block)?)?;
                active_memory = active_memory.checked_add(block)?;
            }
        }
        Some(Counts64 {
            dense,
            values,
            blocks,
            active_memory,
        })
    }

    /// Parameters by kind: (dense, memory values, memory blocks), all in
    /// elements. "Active per token" counts the dense part, the `heads * knn`
    /// value rows read per memory layer, and one block per level.
    ///
    /// Computed with checked arithmetic; a config that fails
    /// [`ModelConfig::check`] may get counts saturated at `usize::MAX`.
    pub fn param_counts(&self) -> ParamCounts {
        let sat = |x: u64| usize::try_from(x).unwrap_or(usize::MAX);
        match self.counts64() {
            Some(c) => ParamCounts {
                dense: sat(c.dense),
                memory_values: sat(c.values),
                memory_blocks: sat(c.blocks),
                active_memory: sat(c.active_memory),
            },
            None => ParamCounts {
                dense: usize::MAX,
                memory_values: usize::MAX,
                memory_blocks: usize::MAX,
                active_memory: usize::MAX,
            },
        }
    }

    /// Forward FLOPs per token at context length `ctx` (multiply-adds × 2):
    /// matmuls, attention scores/values, memory lookup and bag.
    pub fn flops_per_token(&self, ctx: usize) -> f64 {
        let d = self.dim as f64;
        let mut f = 0.0;
        for i in 0..self.n_layers {
            f += 2.0 * 4.0 * d * d + 2.0 * 2.0 * ctx as f64 * d;
            if self.is_pkm_layer(i) {
                if let Some(c) = self.pkm_config() {
                    let (qd, v) = (c.query_dim() as f64, c.v_dim as f64);
                    f += 2.0 * d * qd; // query projection
                    f += 2.0 * (c.heads as f64 * 2.0 * c.n_keys as f64 * c.half() as f64); // sub-key scores
                    f += 2.0 * (c.heads as f64 * c.knn as f64) * v; // embedding-bag
                    f += 2.0 * 2.0 * d * v; // swilu and output projections
                }
            } else {
                let mut units = self.ffn_hidden as f64;
                if let Some(h) = &self.hier {
                    units += h.units.iter().map(|&u| u as f64).sum::<f64>();
                }
                f += 2.0 * 3.0 * d * units;
            }
        }
        f + 2.0 * d * self.vocab_size as f64
    }
}

/// Parameter counts (elements) of a [`ModelConfig`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamCounts {
    /// Everything read for every token.
    pub dense: usize,
    /// The shared product-key value table.
    pub memory_values: usize,
    /// Every FFN-memory block of every level.
    pub memory_blocks: usize,
    /// Memory parameters read per token (value rows and fetched blocks).
    pub active_memory: usize,
}

impl ParamCounts {
    /// All parameters.
    pub fn total(&self) -> usize {
        self.dense
            .saturating_add(self.memory_values)
            .saturating_add(self.memory_blocks)
    }

    /// Parameters read per token.
    pub fn active(&self) -> usize {
        self.dense.saturating_add(self.active_memory)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small valid config with both memories (the demo model's shape,
    /// plus a hierarchical memory).
    fn ok() -> ModelConfig {
        ModelConfig {
            vocab_size: 2048,
            dim: 128,
            n_layers: 4,
            n_heads: 4,
            ffn_hidden: 344,
            max_seq_len: 256,
            rope_theta: 10_000.0,
            norm_eps: 1e-5,
            tie_embeddings: true,
            pkm: Some(PkmSpec {
                layers: vec![2],
                n_keys: 128,
                heads: 4,
                k_dim: 64,
                knn: 16,
                v_dim: 128,
                qk_norm: true,
                gated: false,
            }),
            hier: Some(HierSpec {
                levels: 2,
                branching: 4,
                units: vec![8, 4],
                generic: true,
                routing: HierRouting::Descent,
            }),
        }
    }

    /// `cfg` fails with an error naming `field`; returns the message.
    fn fails_on(cfg: &ModelConfig, field: &str) -> String {
        let e = cfg.check().expect_err(field);
        assert_eq!(e.field_name(), Some(field), "{e}");
        let msg = e.to_string();
        assert!(msg.contains(field), "{msg}");
        // the oracle's view names it too
        let o = cfg.validate().expect_err(field).to_string();
        assert!(o.contains(field), "{o}");
        msg
    }

    #[test]
    fn a_valid_config_passes_and_its_counts_match() {
        let c = ok();
        c.check().unwrap();
        let p = c.param_counts();
        assert_eq!(p.memory_values, 128 * 128 * 128);
        // 3 dense layers; levels of 4 + 1 and 16 + 1 rows of 8 and 4 units
        assert_eq!(p.memory_blocks, (5 * 8 + 17 * 4) * 3 * 128 * 3);
        assert!(p.total() > p.dense);
    }

    #[test]
    fn every_size_field_over_its_maximum_is_named() {
        type Set = fn(&mut ModelConfig, usize);
        let cases: [(&str, usize, Set); 16] = [
            ("vocab_size", MAX_VOCAB_SIZE, |c, v| c.vocab_size = v),
            ("dim", MAX_DIM, |c, v| c.dim = v),
            ("n_layers", MAX_LAYERS, |c, v| c.n_layers = v),
            ("n_heads", MAX_HEADS, |c, v| c.n_heads = v),
            ("ffn_hidden", MAX_FFN_HIDDEN, |c, v| c.ffn_hidden = v),
            ("max_seq_len", MAX_SEQ_LEN, |c, v| c.max_seq_len = v),
            ("pkm.n_keys", MAX_PKM_N_KEYS, |c, v| {
                c.pkm.as_mut().unwrap().n_keys = v
            }),
            ("pkm.heads", MAX_PKM_HEADS, |c, v| {
                c.pkm.as_mut().unwrap().heads = v
            }),
            ("pkm.k_dim", MAX_PKM_K_DIM, |c, v| {
                c.pkm.as_mut().unwrap().k_dim = v
            }),
            ("pkm.knn", 128, |c, v| c.pkm.as_mut().unwrap().knn = v),
            ("pkm.v_dim", MAX_DIM, |c, v| {
                c.pkm.as_mut().unwrap().v_dim = v
            }),
            ("hier.levels", MAX_HIER_LEVELS, |c, v| {
                let h = c.hier.as_mut().unwrap();
                h.levels = v;
                h.units = vec![1; v.min(64)];
            }),
            ("hier.branching", MAX_HIER_BRANCHING, |c, v| {
                c.hier.as_mut().unwrap().branching = v
            }),
            ("hier.units[1]", MAX_FFN_HIDDEN, |c, v| {
                c.hier.as_mut().unwrap().units[1] = v
            }),
            ("pkm.layers[0]", 3, |c, v| {
                c.pkm.as_mut().unwrap().layers = vec![v + 1]
            }),
            ("pkm.layers", 4, |c, v| {
                c.pkm.as_mut().unwrap().layers = vec![0; v + 1]
            }),
        ];
        for (field, max, set) in cases {
            for bad in [max + 1, 0] {
                if (field.starts_with("pkm.layers") || field == "pkm.v_dim") && bad == 0 {
                    continue;
                }
                let mut c = ok();
                set(&mut c, bad);
                let msg = fails_on(&c, field);
                if bad > 0 && !field.starts_with("pkm.layers") {
                    assert!(msg.contains(&bad.to_string()), "{msg}");
                }
            }
        }
        // zero v_dim means dim: valid
        let mut c = ok();
        c.pkm.as_mut().unwrap().v_dim = 0;
        c.check().unwrap();
    }

    #[test]
    fn huge_vocab_and_context_are_refused_not_allocated() {
        for v in [1usize << 40, 1 << 62, usize::MAX] {
            let mut c = ok();
            c.vocab_size = v;
            let msg = fails_on(&c, "vocab_size");
            assert!(msg.contains("MAX_VOCAB_SIZE"), "{msg}");
            // nothing derived from it overflows either
            let _ = c.param_counts();
            let _ = c.flops_per_token(16);
            assert!(crate::model::ParamStore::dense_zeros(&c).is_err());
        }
        let mut c = ok();
        c.max_seq_len = 1 << 40;
        let msg = fails_on(&c, "max_seq_len");
        assert!(msg.contains("MAX_SEQ_LEN"), "{msg}");
    }

    #[test]
    fn parsed_json_is_checked() {
        let json = serde_json::to_string(&ok()).unwrap();
        assert_eq!(ModelConfig::from_json(&json).unwrap(), ok());
        let big = json.replace("\"vocab_size\":2048", "\"vocab_size\":4611686018427387904");
        assert_ne!(big, json);
        let e = ModelConfig::from_json(&big).unwrap_err();
        assert_eq!(e.field_name(), Some("vocab_size"), "{e}");
        let e = ModelConfig::from_json("{\"vocab_size\": -1}").unwrap_err();
        assert!(matches!(e, ConfigError::Parse(_)), "{e}");
        let neg = json.replace("\"rope_theta\":10000.0", "\"rope_theta\":-1.0");
        assert_ne!(neg, json);
        let e = ModelConfig::from_json(&neg).unwrap_err();
        assert_eq!(e.field_name(), Some("rope_theta"), "{e}");
    }

    #[test]
    fn floats_must_be_finite_and_in_range() {
        for t in [
            -1.0,
            0.0,
            0.5,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e13,
        ] {
            let mut c = ok();
            c.rope_theta = t;
            fails_on(&c, "rope_theta");
        }
        for e in [-1.0, 0.0, f32::NAN, f32::INFINITY, 2.0] {
            let mut c = ok();
            c.norm_eps = e;
            fails_on(&c, "norm_eps");
        }
        let mut c = ok();
        c.rope_theta = 500_000.0;
        c.norm_eps = 1e-6;
        c.check().unwrap();
    }

    #[test]
    fn derived_sizes_are_bounded() {
        // every field within its own bound, their products not
        let mut c = ok();
        c.max_seq_len = MAX_SEQ_LEN;
        c.dim = MAX_DIM;
        c.n_heads = 1;
        let msg = c.check().unwrap_err().to_string();
        assert!(msg.contains("MAX_ROPE_TABLE_ELEMENTS"), "{msg}");
        let mut c = ok();
        c.vocab_size = MAX_VOCAB_SIZE;
        c.dim = MAX_DIM;
        c.n_heads = 8;
        c.hier = None;
        let msg = c.check().unwrap_err().to_string();
        assert!(
            msg.contains("dense parameters") && msg.contains("MAX_DENSE_PARAMS"),
            "{msg}"
        );
        let mut c = ok();
        let h = c.hier.as_mut().unwrap();
        h.branching = MAX_HIER_BRANCHING;
        h.levels = 3;
        h.units = vec![8, 4, 2];
        let msg = c.check().unwrap_err().to_string();
        assert!(msg.contains("MAX_HIER_NODES"), "{msg}");
        let mut c = ok();
        c.hier.as_mut().unwrap().units[0] = MAX_FFN_HIDDEN;
        c.dim = 1 << 12;
        let msg = c.check().unwrap_err().to_string();
        assert!(msg.contains("MAX_BLOCK_ELEMENTS"), "{msg}");
        // shape rules between fields keep their names
        let mut c = ok();
        c.n_heads = 3;
        fails_on(&c, "dim");
        let mut c = ok();
        c.hier.as_mut().unwrap().units = vec![1];
        fails_on(&c, "hier.units");
    }
}
