//! Generation in the browser: the runtime's [`Generator`] (the one loop of
//! every runtime: tokenizer, sampling, stopping rules, streaming, timings)
//! over the browser's [`WebDecoder`] and the model directory's
//! [`Tokenizer`] — the same steps as the native `memlayer generate`, so the
//! same prompt and seed give the same text.

use crate::WebError;
use crate::bank::{PageFetch, RemoteBank};
use crate::decoder::WebDecoder;
use crate::memory::{MemoryOptions, MemoryStats, WebMemory};
use memlayer_core::model::{ModelConfig, ParamStore};
use memlayer_core::sample::Sampling;
pub use memlayer_model_dir::tokenizer::EOS_TOKEN;
use memlayer_model_dir::{Checksums, Routing, RoutingFiles, Tokenizer, check_bank_fits};
use memlayer_runtime::{Generation, Generator};
use memlayer_wgpu::GpuContext;

/// The routing files of a hierarchical-memory model, as fetched.
#[derive(Clone, Debug, Default)]
pub struct RoutingBytes {
    /// `retriever.json`.
    pub retriever: Vec<u8>,
    /// `tree.safetensors`.
    pub tree: Vec<u8>,
    /// `context_index.json` (nearest-context routing only).
    pub context_index: Option<Vec<u8>>,
}

/// The files of a model directory the browser downloads whole (the bank is
/// paged): `config.json`, `tokenizer.json`, `model.safetensors`, and the
/// routing files of a hierarchical memory.
pub struct ModelFiles {
    /// Where they came from (a URL or directory), for messages.
    pub location: String,
    /// `config.json` text.
    pub config_json: String,
    /// `tokenizer.json` text.
    pub tokenizer_json: String,
    /// `model.safetensors` bytes (the dense weights).
    pub safetensors: Vec<u8>,
    /// The routing files (a model with a hierarchical memory).
    pub routing: Option<RoutingBytes>,
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

    /// The routing of `cfg`'s hierarchical memory from the routing files,
    /// each verified against `checksums` before it is parsed, the tree
    /// checked against the config and the retriever
    /// ([`Routing::from_files`], the native load's checks); `None` for a
    /// model without one.
    pub fn routing(
        &self,
        cfg: &ModelConfig,
        checksums: &Checksums,
    ) -> Result<Option<Routing>, WebError> {
        if cfg.hier.is_none() {
            return Ok(None);
        }
        let r = self.routing.as_ref().ok_or_else(|| {
            self.err(
                "retriever.json",
                "the model has a hierarchical memory: its routing files were not given",
            )
        })?;
        let files = RoutingFiles {
            retriever: &r.retriever,
            tree: &r.tree,
            context_index: r.context_index.as_deref(),
        };
        let dir = std::path::Path::new(&self.location);
        Ok(Some(Routing::from_files(cfg, dir, &files, checksums)?))
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

/// The memory of a model with a product-key or hierarchical memory: the
/// bank it is paged from, where its product-key layers run, its budget.
pub struct MemorySetup<F> {
    /// The device of the product-key layers (WebGPU in the browser, any
    /// wgpu adapter natively); `None` for a hierarchical memory alone.
    pub ctx: Option<GpuContext>,
    /// The bank (header and page table read).
    pub bank: RemoteBank<F>,
    /// Bytes of resident memory: value slots on the device in the bank's
    /// dtype plus the blocks held as f32 (see [`memlayer_bank::resident_bytes`]
    /// for what a percent is of).
    pub budget_bytes: u64,
    /// Reserve a block per level for [`Engine::prefetch`] (hierarchical memory).
    pub prefetch: bool,
}

/// A model ready to generate: the runtime's [`Generator`] over the browser
/// decoder (and its memory, for a model with one).
pub struct Engine<F> {
    generator: Generator<WebDecoder<F>>,
}

impl<F: PageFetch> Engine<F> {
    /// The model of `files`; its memory (product-key values on `memory`'s
    /// device, hierarchical blocks on the host) paged from `memory`'s bank
    /// under its budget (the bank's sections must fit the config:
    /// [`check_bank`]); a dense model (no memory in its config) with
    /// `memory` `None`. A hierarchical memory routes each prompt with
    /// `routing` ([`ModelFiles::routing`]). The browser verifies the files
    /// and the bank's identity against `checksums.json` before
    /// ([`ModelFiles::verify`], [`check_bank`]).
    pub fn new(
        files: &ModelFiles,
        memory: Option<MemorySetup<F>>,
        routing: Option<Routing>,
    ) -> Result<Self, WebError> {
        let cfg = files.config()?;
        // what the config asks for, before anything is parsed or allocated
        let has_memory = cfg.pkm.is_some() || cfg.hier.is_some();
        match (&memory, has_memory) {
            (Some(m), true) => {
                check_bank(&cfg, None, &m.bank)?;
                if cfg.pkm.is_some() && m.ctx.is_none() {
                    return Err(files.err(
                        "config.json",
                        "the model has a product-key memory: it needs a WebGPU device",
                    ));
                }
            }
            (Some(_), false) => {
                return Err(files.err("config.json", "the model has no memory: it takes no bank"));
            }
            (None, true) => {
                return Err(files.err(
                    "config.json",
                    "the model has a memory: it needs its memory.bank",
                ));
            }
            (None, false) => {}
        }
        if cfg.hier.is_some() != routing.is_some() {
            return Err(files.err(
                "config.json",
                if routing.is_some() {
                    "routing given for a model without a hierarchical memory"
                } else {
                    "the model has a hierarchical memory: it needs its routing \
                     (retriever.json, tree.safetensors)"
                },
            ));
        }
        let store = files.dense_weights(&cfg)?;
        let tokenizer = Tokenizer::from_json(&files.tokenizer_json)
            .map_err(|e| files.err("tokenizer.json", e))?;
        let memory = match memory {
            Some(m) => Some(WebMemory::new(
                m.bank,
                &cfg,
                &store,
                MemoryOptions {
                    ctx: m.ctx,
                    budget_bytes: m.budget_bytes,
                    prefetch: m.prefetch,
                },
            )?),
            None => None,
        };
        let decoder = WebDecoder::new(cfg, store, memory)?;
        let generator = Generator::new(decoder, tokenizer, routing).map_err(|e| match e {
            WebError::Generate(e) => files.err("tokenizer.json", e),
            e => e,
        })?;
        Ok(Self { generator })
    }

    /// The model's config.
    pub fn config(&self) -> &ModelConfig {
        self.generator.config()
    }

    /// The generator (tokenizer, decoder).
    pub fn generator(&self) -> &Generator<WebDecoder<F>> {
        &self.generator
    }

    /// The memory (counters, bank, device); `None` for a dense model.
    pub fn memory(&self) -> Option<&WebMemory<F>> {
        self.generator.decoder().memory()
    }

    /// Times the memory's fetches and device work with `clock` (seconds).
    pub fn set_clock(&mut self, clock: fn() -> f64) {
        if let Some(m) = self.generator.decoder_mut().memory_mut() {
            m.set_clock(clock);
        }
    }

    /// Compiles the device kernels before the first token ([`WebMemory::warm_up`]).
    pub async fn warm_up(&mut self) -> Result<(), WebError> {
        match self.generator.decoder_mut().memory_mut() {
            Some(m) => m.warm_up().await,
            None => Ok(()),
        }
    }

    /// The memory's counters (zeros, hit rate 1, for a dense model).
    pub fn stats(&self) -> MemoryStats {
        self.generator.decoder().stats()
    }

    /// Bytes of the dense weights (held in wasm memory).
    pub fn dense_bytes(&self) -> u64 {
        self.generator.decoder().store().num_elements() as u64 * 4
    }

    /// Fetches the memory blocks of `text`'s route ahead of a generation
    /// with that prompt (the chat calls it while the question is typed):
    /// the blocks land in the prefetch reserve and the generation finds
    /// them resident. Returns the blocks fetched: 0 for a model without a
    /// hierarchical memory or prefetch, or when they are already held.
    pub async fn prefetch(&mut self, text: &str) -> Result<usize, WebError> {
        let Some(rows) = self.generator.route(text)? else {
            return Ok(0);
        };
        match self.generator.decoder_mut().memory_mut() {
            Some(m) if m.prefetch_enabled() => m.prefetch(&rows).await,
            _ => Ok(0),
        }
    }

    /// Generates after `prompt` ([`Generator::generate_async`]), calling
    /// `on_text(piece, stats)` with each new piece of text and the memory's
    /// counters. Stops at EOS, at `stop` (kept in the text), at
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
        self.generator
            .generate_async(prompt, sampling, stop, now, |piece, d| {
                on_text(piece, &d.stats())
            })
            .await
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
            routing: None,
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
