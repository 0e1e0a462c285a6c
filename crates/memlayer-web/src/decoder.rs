//! The browser's decoder: `memlayer-core`'s reference layers (RMSNorm, RoPE
//! attention with a KV cache, SwiGLU FFN) on the CPU, the product-key memory
//! layers awaited on the device and the hierarchical memory's blocks awaited
//! from the bank ([`WebMemory`]), as the runtime's
//! [`Decoder`](memlayer_runtime::Decoder): one step feeds new tokens and
//! returns the logits of the last one. A dense model (no memory) needs no
//! memory at all.

use crate::WebError;
use crate::bank::PageFetch;
use crate::memory::{MemoryStats, WebMemory};
use memlayer_core::hier::ffn::{FfnBlock, ffn_forward};
use memlayer_core::linalg::linear;
use memlayer_core::model::params::layer_name;
use memlayer_core::model::reference::{LayerKv, anchor_block, attention, rms_norm};
use memlayer_core::model::{ModelConfig, ParamStore};
use memlayer_runtime::Decoder;

/// Dense weights, the anchor FFNs unpacked once, the KV cache, the memory
/// and the context's block rows.
pub struct WebDecoder<F> {
    cfg: ModelConfig,
    store: ParamStore,
    /// Anchor FFN of each non-memory layer (`None` for memory layers).
    ffn: Vec<Option<FfnBlock>>,
    cache: Vec<LayerKv>,
    memory: Option<WebMemory<F>>,
    /// The context's route (one block row per level) since the last reset.
    block_rows: Option<Vec<usize>>,
}

impl<F: PageFetch> WebDecoder<F> {
    /// A decoder over the dense weights `store` of `cfg`, its memory on
    /// `memory`: required for a model with a product-key or hierarchical
    /// memory, refused for a dense one.
    pub fn new(
        cfg: ModelConfig,
        store: ParamStore,
        memory: Option<WebMemory<F>>,
    ) -> Result<Self, WebError> {
        cfg.validate()?;
        match (cfg.pkm.is_some() || cfg.hier.is_some(), memory.is_some()) {
            (true, false) => {
                return Err(WebError::Input(
                    "the model has a memory: it needs its memory.bank (and, for a product-key \
                     memory, a WebGPU device)"
                        .into(),
                ));
            }
            (false, true) => {
                return Err(WebError::Input(
                    "the model has no memory: no device memory is needed".into(),
                ));
            }
            _ => {}
        }
        store.check_dense(&cfg)?;
        let mut ffn = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            ffn.push(if cfg.is_pkm_layer(i) {
                None
            } else {
                Some(anchor_block(&cfg, &store, i)?)
            });
        }
        Ok(Self {
            cache: vec![LayerKv::default(); cfg.n_layers],
            cfg,
            store,
            ffn,
            memory,
            block_rows: None,
        })
    }

    /// The memory (`None` for a dense model).
    pub fn memory(&self) -> Option<&WebMemory<F>> {
        self.memory.as_ref()
    }

    /// The memory, mutably (`None` for a dense model).
    pub fn memory_mut(&mut self) -> Option<&mut WebMemory<F>> {
        self.memory.as_mut()
    }

    /// The memory's counters; for a dense model, zeros (hit rate 1).
    pub fn stats(&self) -> MemoryStats {
        self.memory.as_ref().map_or(
            MemoryStats {
                hit_rate: 1.0,
                ..MemoryStats::default()
            },
            WebMemory::stats,
        )
    }

    /// The dense weights.
    pub fn store(&self) -> &ParamStore {
        &self.store
    }

    /// Positions in the KV cache.
    pub fn position(&self) -> usize {
        self.cache[0].k.len() / self.cfg.dim
    }
}

impl<F: PageFetch> Decoder for WebDecoder<F> {
    type Error = WebError;

    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Forgets the cached positions (a new sequence); `block_rows` is the
    /// context's route, one table row per level, for a model with a
    /// hierarchical memory (its blocks are fetched by the next step), and
    /// must be `None` for a model without one.
    fn reset(&mut self, block_rows: Option<&[usize]>) -> Result<(), WebError> {
        match (&self.cfg.hier, block_rows) {
            (Some(h), Some(rows)) if rows.len() == h.levels => {}
            (Some(h), Some(rows)) => {
                return Err(WebError::Input(format!(
                    "{} block rows for a memory of {} levels",
                    rows.len(),
                    h.levels
                )));
            }
            (Some(_), None) => {
                return Err(WebError::Input(
                    "the model has a hierarchical memory: a sequence needs its block rows".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(WebError::Input(
                    "block rows given to a model without a hierarchical memory".into(),
                ));
            }
            (None, None) => {}
        }
        self.block_rows = block_rows.map(<[usize]>::to_vec);
        self.cache.iter_mut().for_each(|c| *c = LayerKv::default());
        Ok(())
    }

    /// Feeds `tokens` after the cached positions; returns the logits of the
    /// last one (vocab).
    async fn step(&mut self, tokens: &[u32]) -> Result<Vec<f32>, WebError> {
        let (d, t) = (self.cfg.dim, tokens.len());
        if t == 0 {
            return Err(WebError::Input("no tokens to feed".into()));
        }
        if self.position() + t > self.cfg.max_seq_len {
            return Err(WebError::Input(format!(
                "{} positions exceed the model's context of {}",
                self.position() + t,
                self.cfg.max_seq_len
            )));
        }
        // the context's blocks, (levels) of (dense layers): fetched on the
        // first step after a reset, resident after
        let blocks = match (&self.block_rows, self.memory.as_mut()) {
            (Some(rows), Some(memory)) => memory.blocks(rows).await?,
            (Some(_), None) => {
                return Err(WebError::Input("block rows but no memory".into()));
            }
            (None, _) if self.cfg.hier.is_some() => {
                return Err(WebError::Input(
                    "the model has a hierarchical memory: reset with the context's block rows \
                     before the first step"
                        .into(),
                ));
            }
            (None, _) => Vec::new(),
        };
        let s = &self.store;
        let emb = s.data("tok_embeddings.weight")?;
        // (t, d)
        let mut x = Vec::with_capacity(t * d);
        for &tok in tokens {
            let r = tok as usize;
            if r >= self.cfg.vocab_size {
                return Err(WebError::Input(format!(
                    "token {tok} outside the vocabulary of {}",
                    self.cfg.vocab_size
                )));
            }
            x.extend_from_slice(&emb[r * d..(r + 1) * d]);
        }
        let mut dense_idx = 0;
        for i in 0..self.cfg.n_layers {
            let norm = |name: &str, x: &[f32]| -> Result<Vec<f32>, WebError> {
                Ok(rms_norm(
                    x,
                    d,
                    s.data(&layer_name(i, name))?,
                    self.cfg.norm_eps,
                ))
            };
            let h = norm("attention_norm.weight", &x)?;
            let a = attention(&self.cfg, s, i, &h, t, Some(&mut self.cache[i]))?;
            x.iter_mut().zip(&a).for_each(|(xv, av)| *xv += av);
            let h = norm("ffn_norm.weight", &x)?;
            let y = match &self.ffn[i] {
                Some(anchor) => {
                    // this dense layer's block of each level
                    let own: Vec<&FfnBlock> = blocks.iter().map(|l| &l[dense_idx]).collect();
                    dense_idx += 1;
                    ffn_forward(&h, t, anchor, &own)?
                }
                None => {
                    let memory = self.memory.as_mut().ok_or_else(|| {
                        WebError::Input(format!("layer {i} is a memory layer: no device memory"))
                    })?;
                    memory.forward(i, &h, t).await?
                }
            };
            x.iter_mut().zip(&y).for_each(|(xv, yv)| *xv += yv);
        }
        // logits of the last position only: (1, vocab)
        let last = &x[(t - 1) * d..];
        let h = rms_norm(last, d, s.data("norm.weight")?, self.cfg.norm_eps);
        let out = if self.cfg.tie_embeddings {
            emb
        } else {
            s.data("output.weight")?
        };
        Ok(linear(&h, 1, d, out, &[], self.cfg.vocab_size))
    }
}
