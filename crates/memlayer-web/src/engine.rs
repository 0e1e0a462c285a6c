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
use memlayer_core::sample::{Sampling, new_token_budget, pick};
use memlayer_model_dir::{Checksums, check_bank_fits};
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

    /// The parsed config, every size and float within its bounds
    /// ([`ModelConfig::from_json`], the check the native runtime makes).
    pub fn config(&self) -> Result<ModelConfig, WebError> {
        ModelConfig::from_json(&self.config_json).map_err(|e| self.err("config.json", e))
    }

    /// The config ([`ModelFiles::config`]: bounds first), then every file
    /// checked against `checksums` (`checksums.json` of the directory):
    /// `config.json`, `tokenizer.json` and `model.safetensors` must have the
    /// recorded length and xxh3, or the error names the file and both digests.
    pub fn verify(&self, checksums: &Checksums) -> Result<ModelConfig, WebError> {
        let cfg = self.config()?;
        for (name, bytes) in [
            ("config.json", self.config_json.as_bytes()),
            ("tokenizer.json", self.tokenizer_json.as_bytes()),
            ("model.safetensors", self.safetensors.as_slice()),
        ] {
            checksums
                .verify_file(name, bytes)
                .map_err(|e| self.err(name, e))?;
        }
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

/// Checks `bank` before it is used for the model of `cfg`: its sections fit
/// the config ([`check_bank_fits`]: the field, the bank's value and the
/// config's), and, with `checksums`, its header is the bank they record
/// (table checksum and length) — the same checks as the native runtime's.
pub fn check_bank<F: PageFetch>(
    cfg: &ModelConfig,
    checksums: Option<&Checksums>,
    bank: &RemoteBank<F>,
) -> Result<(), WebError> {
    check_bank_fits(cfg, bank.sections(), bank.location())?;
    if let Some(c) = checksums {
        c.verify_bank(bank.location(), &bank.meta().header, None)?;
    }
    Ok(())
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
    /// `budget_bytes`. The bank's sections must fit the config
    /// ([`check_bank`]); the browser verifies the files and the bank's
    /// identity against `checksums.json` before ([`ModelFiles::verify`]).
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
        check_bank(&cfg, None, &bank)?;
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
        sampling.validate().map_err(WebError::Input)?;
        let ids = self
            .tokenizer
            .encode(prompt, false)
            .map_err(|e| WebError::Input(format!("encoding the prompt: {e}")))?
            .get_ids()
            .to_vec();
        let max_seq = self.decoder.config().max_seq_len;
        let max_new =
            new_token_budget(ids.len(), sampling.max_tokens, max_seq).map_err(WebError::Input)?;
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

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;
    use crate::bank::SourceFetch;
    use memlayer_bank::{BankLayout, BankWriter, Dtype, FileSource, MemSource, SectionSpec};
    use std::path::{Path, PathBuf};

    fn demo() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/demo-pkm")
    }

    fn read(f: &str) -> Vec<u8> {
        std::fs::read(demo().join(f)).unwrap_or_else(|e| panic!("{f}: {e}"))
    }

    fn files() -> ModelFiles {
        ModelFiles {
            location: demo().display().to_string(),
            config_json: String::from_utf8(read("config.json")).unwrap(),
            tokenizer_json: String::from_utf8(read("tokenizer.json")).unwrap(),
            safetensors: read("model.safetensors"),
        }
    }

    fn checksums() -> Checksums {
        let text = String::from_utf8(read("checksums.json")).unwrap();
        Checksums::from_json(&text, "checksums.json").unwrap()
    }

    /// A one-section bank of `rows` value rows of `dim` values `seed + i`.
    fn bank(rows: u64, dim: u32, seed: f32) -> RemoteBank<SourceFetch<MemSource>> {
        let layout = BankLayout::new(vec![SectionSpec::pkm_values(rows, dim, 64, Dtype::F16)]);
        let mut w = BankWriter::new(std::io::Cursor::new(Vec::new()), &layout).unwrap();
        let n = rows as usize * dim as usize;
        w.write_rows(&(0..n).map(|i| seed + (i % 7) as f32).collect::<Vec<_>>())
            .unwrap();
        let bytes = w.finish().unwrap().into_inner();
        pollster::block_on(RemoteBank::open(SourceFetch(MemSource::new(bytes)))).unwrap()
    }

    #[test]
    fn the_shipped_files_and_bank_pass_every_check() {
        let cfg = files().verify(&checksums()).unwrap();
        let own = FileSource::open(demo().join("memory.bank")).unwrap();
        let own = pollster::block_on(RemoteBank::open(SourceFetch(own))).unwrap();
        check_bank(&cfg, Some(&checksums()), &own).unwrap();
    }

    #[test]
    fn a_flipped_byte_in_a_fetched_file_names_the_file() {
        let mut f = files();
        let at = f.safetensors.len() - 1000;
        f.safetensors[at] ^= 1;
        let msg = f.verify(&checksums()).unwrap_err().to_string();
        assert!(
            msg.contains("model.safetensors") && msg.contains("checksum mismatch"),
            "{msg}"
        );
        let mut f = files();
        f.tokenizer_json.push(' ');
        let msg = f.verify(&checksums()).unwrap_err().to_string();
        assert!(
            msg.contains("checksum mismatch for tokenizer.json"),
            "{msg}"
        );
    }

    #[test]
    fn config_bounds_come_before_checksums() {
        for (from, to, field) in [
            (
                "\"vocab_size\": 2048",
                "\"vocab_size\": 1099511627776",
                "vocab_size",
            ),
            (
                "\"max_seq_len\": 256",
                "\"max_seq_len\": 1099511627776",
                "max_seq_len",
            ),
            (
                "\"rope_theta\": 10000.0",
                "\"rope_theta\": -1.0",
                "rope_theta",
            ),
        ] {
            let mut f = files();
            assert!(f.config_json.contains(from), "{from}");
            f.config_json = f.config_json.replace(from, to);
            let msg = f.verify(&checksums()).unwrap_err().to_string();
            assert!(
                msg.contains(&format!("config field `{field}`")) && !msg.contains("checksum"),
                "{msg}"
            );
        }
    }

    #[test]
    fn a_bank_of_another_shape_or_model_is_refused() {
        let cfg = files().config().unwrap();
        // 64 wide: the shapes do not fit (checked by Engine::new as well)
        let msg = check_bank(&cfg, Some(&checksums()), &bank(16384, 64, 0.0))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("dim is 64 in the bank") && msg.contains("the config needs 128"),
            "{msg}"
        );
        // right shape, other values: not this model's bank
        let other = bank(16384, 128, 1.0);
        check_bank(&cfg, None, &other).unwrap();
        let msg = check_bank(&cfg, Some(&checksums()), &other)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("is not this model's bank"), "{msg}");
    }
}
