//! Text generation with a KV cache: prefill the prompt, then one token per
//! forward; greedy, temperature and top-p sampling with a seed.

use memlayer_core::rng::Rng;
use memlayer_model::{KvCache, Model, ModelError};
use memlayer_train::data::tokenizer::Tokenizer;
use memlayer_train::prepare::Routing;
use std::time::Instant;

/// How to pick the next token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// 0 = greedy (argmax, ties to the lower id); otherwise softmax(logits / T).
    pub temperature: f32,
    /// Nucleus: sample among the most likely tokens whose mass reaches `top_p` (1 = all).
    pub top_p: f32,
    /// Seed of the sampler.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            max_tokens: 32,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// Picks a token from `logits` (vocab) by `s`, drawing from `rng` when sampling.
pub fn pick(logits: &[f32], s: &Sampling, rng: &mut Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
            .map_or(0, |(i, _)| i as u32)
    };
    if s.temperature <= 0.0 {
        return argmax();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return argmax();
    }
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, f64::from((l - max) / s.temperature).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    // most likely first (ties to the lower id), cut at top_p
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let top_p = f64::from(s.top_p.clamp(0.0, 1.0));
    let mut kept = 0;
    let mut mass = 0.0;
    for p in &probs {
        kept += 1;
        mass += p.1 / total;
        if mass >= top_p {
            break;
        }
    }
    let probs = &probs[..kept.max(1)];
    let kept_mass: f64 = probs.iter().map(|p| p.1).sum();
    let mut u = rng.next_f64() * kept_mass;
    for p in probs {
        u -= p.1;
        if u <= 0.0 {
            return p.0;
        }
    }
    probs[probs.len() - 1].0
}

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
        memlayer_train::eval::route(self.model.config(), self.routing.as_ref(), text)
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
        let tok_err = |e: memlayer_train::data::DataError| ModelError::Input(e.to_string());
        let ids = self.tokenizer.encode(prompt).map_err(tok_err)?;
        if ids.is_empty() {
            return Err(ModelError::Input("the prompt encodes to no tokens".into()));
        }
        let cfg = self.model.config();
        let max_new = sampling
            .max_tokens
            .min(cfg.max_seq_len.saturating_sub(ids.len()));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_argmax_with_ties_to_the_lower_id() {
        let mut rng = Rng::new(0);
        let s = Sampling::default();
        assert_eq!(pick(&[0.0, 2.0, 2.0, 1.0], &s, &mut rng), 1);
    }

    #[test]
    fn top_p_keeps_only_the_nucleus_and_sampling_follows_the_seed() {
        let s = Sampling {
            temperature: 1.0,
            top_p: 0.5,
            ..Default::default()
        };
        // token 2 holds > 50 % of the mass: the nucleus is {2}
        let logits = [0.0, 0.0, 5.0, 0.0];
        let mut rng = Rng::new(7);
        for _ in 0..50 {
            assert_eq!(pick(&logits, &s, &mut rng), 2);
        }
        let s = Sampling { top_p: 1.0, ..s };
        let draw = |seed| {
            let mut rng = Rng::new(seed);
            (0..64)
                .map(|_| pick(&[1.0, 1.0, 1.0, 1.0], &s, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        let d = draw(3);
        for t in 0..4 {
            assert!(d.contains(&t), "uniform logits must reach token {t}: {d:?}");
        }
    }
}
