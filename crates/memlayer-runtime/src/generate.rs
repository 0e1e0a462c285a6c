//! Text generation with a KV cache: prefill the prompt, then one token per
//! forward; greedy, temperature and top-p sampling with a seed.

use memlayer_core::rng::Rng;
pub use memlayer_core::sample::{Sampling, new_token_budget, pick};
use memlayer_model::{KvCache, Model, ModelError};
use memlayer_model_dir::Routing;
use memlayer_model_dir::Tokenizer;
use std::time::Instant;

/// The result of one generation.
#[derive(Clone, Debug, Default)]
pub struct Generation {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated token ids.
    pub tokens: Vec<u32>,
    /// Generated text.
    pub text: String,
    /// Seconds from the call to the first generated token.
    pub first_token_seconds: f64,
    /// Seconds of the whole call.
    pub seconds: f64,
}

impl Generation {
    /// Generated tokens per second after the first (decode speed).
    pub fn decode_tokens_per_second(&self) -> f64 {
        let n = self.tokens.len().saturating_sub(1);
        let t = self.seconds - self.first_token_seconds;
        if n == 0 || t <= 0.0 {
            0.0
        } else {
            n as f64 / t
        }
    }
}

/// A model, its tokenizer and its router, ready to generate.
pub struct Generator {
    /// The model (resident or paged memory).
    pub model: Model,
    /// The tokenizer of the model directory.
    pub tokenizer: Tokenizer,
    /// Retriever + tree for the hierarchical memory's blocks.
    pub routing: Option<Routing>,
}

impl Generator {
    /// Block rows of the context `text` (one per level), when the model has
    /// a hierarchical memory.
    pub fn route(&self, text: &str) -> Result<Option<Vec<usize>>, ModelError> {
        memlayer_model_dir::route(self.model.config(), self.routing.as_ref(), text)
            .map_err(|e| ModelError::Input(e.to_string()))
    }

    /// Generates after `prompt`, calling `on_text` with each new piece of
    /// text as it is decoded. Stops at EOS, at `stop` (if the generated text
    /// contains it; the stop text is kept), at `max_tokens` or at the
    /// model's context length.
    pub fn generate(
        &self,
        prompt: &str,
        sampling: &Sampling,
        stop: Option<&str>,
        mut on_text: impl FnMut(&str),
    ) -> Result<Generation, ModelError> {
        let t0 = Instant::now();
        let tok_err = |e: memlayer_model_dir::ModelDirError| ModelError::Input(e.to_string());
        sampling.validate().map_err(ModelError::Input)?;
        let ids = self.tokenizer.encode(prompt).map_err(tok_err)?;
        let cfg = self.model.config();
        let max_new = new_token_budget(ids.len(), sampling.max_tokens, cfg.max_seq_len)
            .map_err(ModelError::Input)?;
        let rows = self.route(prompt)?;
        let mut cache = KvCache::new();
        let mut rng = Rng::new(sampling.seed);
        let eos = self.tokenizer.eos_id();
        let mut out = Generation {
            prompt_tokens: ids.len(),
            ..Default::default()
        };
        let v = cfg.vocab_size;
        let mut input = ids;
        for _ in 0..max_new {
            let f = self.model.forward(
                self.model.tokens(&input, 1)?,
                rows.as_deref(),
                Some(&mut cache),
            )?;
            let logits: Vec<f32> = f.logits.into_data().iter::<f32>().collect();
            let last = &logits[logits.len() - v..];
            let next = pick(last, sampling, &mut rng);
            if out.tokens.is_empty() {
                out.first_token_seconds = t0.elapsed().as_secs_f64();
            }
            if next == eos {
                break;
            }
            out.tokens.push(next);
            let text = self.tokenizer.decode(&out.tokens).map_err(tok_err)?;
            if let Some(piece) = text.get(out.text.len()..) {
                on_text(piece);
            }
            out.text = text;
            if stop.is_some_and(|s| out.text.contains(s)) {
                break;
            }
            input = vec![next];
        }
        out.seconds = t0.elapsed().as_secs_f64();
        Ok(out)
    }
}
