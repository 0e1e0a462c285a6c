//! The decoder: `memlayer-core`'s reference layers (RMSNorm, RoPE attention
//! with a KV cache, SwiGLU FFN) on the CPU, the memory layers awaited on the
//! device ([`DeviceMemory`]). One call feeds new tokens and returns the
//! logits of the last one.

use crate::WebError;
use crate::bank::PageFetch;
use crate::memory::DeviceMemory;
use memlayer_core::hier::ffn::{FfnBlock, ffn_forward};
use memlayer_core::linalg::linear;
use memlayer_core::model::params::layer_name;
use memlayer_core::model::reference::{LayerKv, anchor_block, attention, rms_norm};
use memlayer_core::model::{ModelConfig, ParamStore};

/// Dense weights, the FFN blocks unpacked once, and the KV cache.
pub struct Decoder {
    cfg: ModelConfig,
    store: ParamStore,
    /// Anchor FFN of each non-memory layer (`None` for memory layers).
    ffn: Vec<Option<FfnBlock>>,
    cache: Vec<LayerKv>,
}

impl Decoder {
    /// A decoder over the dense weights `store` of `cfg` (hierarchical
    /// memories are not supported here: their routing needs the retriever).
    pub fn new(cfg: ModelConfig, store: ParamStore) -> Result<Self, WebError> {
        cfg.validate()?;
        if cfg.hier.is_some() {
            return Err(WebError::Input(
                "hierarchical-memory models do not run in the browser yet (their routing needs \
                 the training-side retriever); use a product-key model"
                    .into(),
            ));
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
        })
    }

    /// The model's config.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The dense weights.
    pub fn store(&self) -> &ParamStore {
        &self.store
    }

    /// Positions in the KV cache.
    pub fn position(&self) -> usize {
        self.cache[0].k.len() / self.cfg.dim
    }

    /// Forgets the cached positions (a new sequence).
    pub fn reset(&mut self) {
        self.cache.iter_mut().for_each(|c| *c = LayerKv::default());
    }

    /// Feeds `tokens` after the cached positions; returns the logits of the
    /// last one (vocab).
    pub async fn step<F: PageFetch>(
        &mut self,
        tokens: &[u32],
        memory: &mut DeviceMemory<F>,
    ) -> Result<Vec<f32>, WebError> {
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
                Some(block) => ffn_forward(&h, t, block, &[])?,
                None => memory.forward(i, &h, t).await?,
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
