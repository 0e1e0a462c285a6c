//! Model configuration shared by the reference forward, the burn model, the
//! trainer, the exporter and the runtimes (serialised as `config.json` in a
//! model directory).

use crate::error::OracleError;
use crate::hier::addr::BlockLayout;
use crate::pkm::PkmConfig;
use serde::{Deserialize, Serialize};

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
    pub fn nodes(&self, level: usize) -> usize {
        self.branching.pow(level as u32)
    }

    /// Rows of the level-`l` block table: its nodes, plus the generic block
    /// (last row) when enabled.
    pub fn rows(&self, level: usize) -> usize {
        self.nodes(level) + usize::from(self.generic)
    }

    /// Row of the generic block of level `l`.
    pub fn generic_row(&self, level: usize) -> Option<usize> {
        self.generic.then(|| self.nodes(level))
    }
}

impl ModelConfig {
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

    /// Checks every shape constraint; the error says which.
    pub fn validate(&self) -> Result<(), OracleError> {
        let bad = |m: String| Err(OracleError::InvalidConfig(m));
        if self.vocab_size == 0 || self.dim == 0 || self.n_layers == 0 || self.n_heads == 0 {
            return bad("vocab_size, dim, n_layers and n_heads must be positive".into());
        }
        if !self.dim.is_multiple_of(self.n_heads) || !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "dim {} must split into {} heads of even width",
                self.dim, self.n_heads
            ));
        }
        if self.max_seq_len == 0 {
            return bad("max_seq_len must be positive".into());
        }
        if let (Some(p), Some(c)) = (&self.pkm, self.pkm_config()) {
            c.validate()?;
            if p.layers.is_empty() {
                return bad("pkm.layers is empty".into());
            }
            if let Some(&l) = p.layers.iter().find(|&&l| l >= self.n_layers) {
                return bad(format!(
                    "pkm layer {l} out of range ({} layers)",
                    self.n_layers
                ));
            }
        }
        if let Some(h) = &self.hier {
            BlockLayout::new(h.levels, h.branching)?;
            if h.units.len() != h.levels {
                return bad(format!(
                    "hier.units has {} entries for {} levels",
                    h.units.len(),
                    h.levels
                ));
            }
            if self.dense_layers().is_empty() {
                return bad("hier memory needs at least one dense FFN layer".into());
            }
        }
        Ok(())
    }

    /// Parameters by kind: (dense, memory values, memory blocks), all in
    /// elements. "Active per token" counts the dense part, the `heads * knn`
    /// value rows read per memory layer, and one block per level.
    pub fn param_counts(&self) -> ParamCounts {
        let d = self.dim;
        let mut dense = self.vocab_size * d + d; // embedding + final norm
        if !self.tie_embeddings {
            dense += self.vocab_size * d;
        }
        let mut active_memory = 0;
        let mut values = 0;
        for i in 0..self.n_layers {
            dense += 2 * d + 4 * d * d; // norms + attention
            if self.is_pkm_layer(i) {
                if let Some(c) = self.pkm_config() {
                    dense += c.query_dim() * (d + 1)
                        + 2 * c.heads * c.n_keys * c.half()
                        + 2 * (c.v_dim * d)
                        + c.v_dim
                        + d;
                    if c.gated {
                        dense += d + 1;
                    }
                    active_memory += c.bag_size() * c.v_dim;
                }
            } else {
                dense += 3 * d * self.ffn_hidden;
            }
        }
        if let Some(c) = self.pkm_config() {
            values = c.n_rows() * c.v_dim;
        }
        let mut blocks = 0;
        if let Some(h) = &self.hier {
            let per_unit = 3 * d * self.dense_layers().len();
            for l in 1..=h.levels {
                blocks += h.rows(l) * h.units[l - 1] * per_unit;
                active_memory += h.units[l - 1] * per_unit;
            }
        }
        ParamCounts {
            dense,
            memory_values: values,
            memory_blocks: blocks,
            active_memory,
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
                    f += 2.0 * (c.heads * 2 * c.n_keys * c.half()) as f64; // sub-key scores
                    f += 2.0 * c.bag_size() as f64 * v; // embedding-bag
                    f += 2.0 * 2.0 * d * v; // swilu and output projections
                }
            } else {
                let mut units = self.ffn_hidden;
                if let Some(h) = &self.hier {
                    units += h.units.iter().sum::<usize>();
                }
                f += 2.0 * 3.0 * d * units as f64;
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
        self.dense + self.memory_values + self.memory_blocks
    }

    /// Parameters read per token.
    pub fn active(&self) -> usize {
        self.dense + self.active_memory
    }
}
