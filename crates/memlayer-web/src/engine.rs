//! Generation: the model directory's tokenizer, the [`Decoder`] and its
//! [`DeviceMemory`], and `memlayer-core`'s sampler — the same steps as the
//! native `memlayer generate` (prefill the prompt, then one token per step;
//! stop at EOS, at a stop text, at `max_tokens` or at the context length),
//! so the same prompt and seed give the same text.

use crate::WebError;
use crate::bank::{PageFetch, RemoteBank};
use crate::decoder::Decoder;
use crate::memory::{DeviceMemory, MemoryStats};
use memlayer_core::model::{ModelConfig, ParamStore};
use memlayer_core::rng::Rng;
use memlayer_core::sample::{Sampling, pick};
use memlayer_wgpu::GpuContext;
use serde::Serialize;
use std::str::FromStr;

/// End-of-text token of memlayer's tokenizers.
pub const EOS_TOKEN: &str = "<|endoftext|>";

/// The files of a model directory the browser downloads whole (the bank is
/// paged): `config.json`, `tokenizer.json`, `model.safetensors`.
pub struct ModelFiles {
    /// Where they came from (a URL or directory), for messages.
    pub location: String,
    /// `config.json` text.
    pub config_json: String,
    /// `tokenizer.json` text.
    pub tokenizer_json: String,
    /// `model.safetensors` bytes (the dense weights).
    pub safetensors: Vec<u8>,
}

impl ModelFiles {
    fn err(&self, file: &str, message: impl std::fmt::Display) -> WebError {
        WebError::Model {
            file: format!("{}/{file}", self.location.trim_end_matches('/')),
            message: message.to_string(),
        }
    }

    /// The parsed and validated config.
    pub fn config(&self) -> Result<ModelConfig, WebError> {
        let cfg: ModelConfig =
            serde_json::from_str(&self.config_json).map_err(|e| self.err("config.json", e))?;
        cfg.validate().map_err(|e| self.err("config.json", e))?;
        Ok(cfg)
    }

    /// The dense weights of `cfg` (every tensor present, shapes checked).
    pub fn dense_weights(&self, cfg: &ModelConfig) -> Result<ParamStore, WebError> {
        let mut store = ParamStore::dense_zeros(cfg)?;
        let n = store
            .load_safetensors(&self.safetensors)
            .map_err(|e| self.err("model.safetensors", e))?;
        if n != store.len() {
            return Err(self.err(
                "model.safetensors",
                format!("{n} tensors read, the config needs {}", store.len()),
            ));
        }
        Ok(store)
    }
}

/// The result of one generation.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Generation {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated token ids.
    pub token_ids: Vec<u32>,
    /// Generated text.
    pub text: String,
    /// Seconds from the call to the first generated token.
    pub first_token_seconds: f64,
    /// Seconds of the whole call.
    pub seconds: f64,
    /// Generated tokens per second after the first (decode speed).
    pub tokens_per_second: f64,
}

/// A model ready to generate: tokenizer, decoder, device memory.
pub struct Engine<F> {
    tokenizer: tokenizers::Tokenizer,
    eos_id: u32,
    vocab_len: usize,
    decoder: Decoder,
    memory: DeviceMemory<F>,
}

/// Bytes of the bank's value table held as f32 on the device: the
/// reference of a budget in percent.
pub fn value_table_bytes<F: PageFetch>(bank: &RemoteBank<F>) -> u64 {
    bank.sections()
        .iter()
        .map(|s| s.geometry.rows * u64::from(s.geometry.dim) * 4)
        .sum()
}

impl<F: PageFetch> Engine<F> {
    /// The model of `files` on `ctx`, its memory paged from `bank` under
    /// `budget_bytes`.
    pub fn new(
        files: &ModelFiles,
        ctx: GpuContext,
        bank: RemoteBank<F>,
        budget_bytes: u64,
    ) -> Result<Self, WebError> {
        let cfg = files.config()?;
        if cfg.pkm.is_none() {
            return Err(files.err(
                "config.json",
                "the browser runtime serves product-key memory models (this one has none)",
            ));
        }
        let store = files.dense_weights(&cfg)?;
        let tokenizer = tokenizers::Tokenizer::from_str(&files.tokenizer_json)
            .map_err(|e| files.err("tokenizer.json", e))?;
        let eos_id = tokenizer
            .token_to_id(EOS_TOKEN)
            .ok_or_else(|| files.err("tokenizer.json", format!("no {EOS_TOKEN} token")))?;
        let vocab_len = tokenizer.get_vocab_size(true);
        if vocab_len > cfg.vocab_size {
            return Err(files.err(
                "tokenizer.json",
                format!(
                    "{vocab_len} tokens, more than the model's vocabulary of {}",
                    cfg.vocab_size
                ),
            ));
        }
        let memory = DeviceMemory::new(ctx, bank, &cfg, &store, budget_bytes)?;
        let decoder = Decoder::new(cfg, store)?;
        Ok(Self {
            tokenizer,
            eos_id,
            vocab_len,
            decoder,
            memory,
        })
    }

    /// The model's config.
    pub fn config(&self) -> &ModelConfig {
        self.decoder.config()
    }

    /// The device memory (counters, bank, device).
    pub fn memory(&self) -> &DeviceMemory<F> {
        &self.memory
    }

    /// Times the memory's fetches and device work with `clock` (seconds).
    pub fn set_clock(&mut self, clock: fn() -> f64) {
        self.memory.set_clock(clock);
    }

    /// Compiles the device kernels before the first token ([`DeviceMemory::warm_up`]).
    pub async fn warm_up(&mut self) -> Result<(), WebError> {
        self.memory.warm_up().await
    }

    /// The memory's counters.
    pub fn stats(&self) -> MemoryStats {
        self.memory.stats()
    }

    /// Bytes of the dense weights (held in wasm memory).
    pub fn dense_bytes(&self) -> u64 {
        self.decoder.store().num_elements() as u64 * 4
    }

    fn decode(&self, ids: &[u32]) -> Result<String, WebError> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.vocab_len) {
            return Err(WebError::Input(format!(
                "decoding: id {bad} is outside the vocabulary of {}",
                self.vocab_len
            )));
        }
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| WebError::Input(format!("decoding: {e}")))
    }

    /// Generates after `prompt`, calling `on_text` with each new piece of
    /// text. Stops at EOS, at `stop` (kept in the text), at
    /// `sampling.max_tokens` or at the context length. `now` is a clock in
    /// seconds (the browser's `performance.now()`, natively `Instant`).
    pub async fn generate(
        &mut self,
        prompt: &str,
        sampling: &Sampling,
        stop: Option<&str>,
        now: &dyn Fn() -> f64,
        mut on_text: impl FnMut(&str, &MemoryStats),
    ) -> Result<Generation, WebError> {
        let t0 = now();
        let ids = self
            .tokenizer
            .encode(prompt, false)
            .map_err(|e| WebError::Input(format!("encoding the prompt: {e}")))?
            .get_ids()
            .to_vec();
        if ids.is_empty() {
            return Err(WebError::Input("the prompt encodes to no tokens".into()));
        }
        let max_seq = self.decoder.config().max_seq_len;
        if ids.len() >= max_seq {
            return Err(WebError::Input(format!(
                "the prompt takes {} tokens; the model's context is {max_seq}",
                ids.len()
            )));
        }
        let max_new = sampling.max_tokens.min(max_seq - ids.len());
        let mut rng = Rng::new(sampling.seed);
        let mut out = Generation {
            prompt_tokens: ids.len(),
            ..Default::default()
        };
        self.decoder.reset();
        let mut input = ids;
        for _ in 0..max_new {
            // (vocab)
            let logits = self.decoder.step(&input, &mut self.memory).await?;
            let next = pick(&logits, sampling, &mut rng);
            if out.token_ids.is_empty() {
                out.first_token_seconds = now() - t0;
            }
            if next == self.eos_id {
                break;
            }
            out.token_ids.push(next);
            let text = self.decode(&out.token_ids)?;
            if let Some(piece) = text.get(out.text.len()..) {
                on_text(piece, &self.memory.stats());
            }
            out.text = text;
            if stop.is_some_and(|s| out.text.contains(s)) {
                break;
            }
            input = vec![next];
        }
        out.seconds = now() - t0;
        let n = out.token_ids.len().saturating_sub(1);
        let t = out.seconds - out.first_token_seconds;
        out.tokens_per_second = if n == 0 || t <= 0.0 {
            0.0
        } else {
            n as f64 / t
        };
        Ok(out)
    }
}
