//! Text generation, written once for every runtime (the native CLI, the
//! browser, the C ABI): a [`Decoder`] (the model with its attention cache
//! and memory, however and wherever it runs) driven by a [`Generator`]
//! (tokenizer, routing of the prompt to its memory blocks, sampling,
//! stopping rules, streaming, timings).
//!
//! The loop: validate the sampling ([`Sampling::validate`]), encode the
//! prompt, route it ([`memlayer_model_dir::route`]), bound the new tokens
//! ([`new_token_budget`]: a prompt at the context length is an error), reset
//! the decoder with the prompt's block rows, feed the prompt (prefill), then
//! one token per step, each picked by [`pick`] with an [`Rng`] seeded by
//! `sampling.seed`. It stops at EOS, at the stop text (kept in the text), at
//! `max_tokens` or at the context length. The same prompt, seed and weights
//! give the same text in every runtime.

use memlayer_core::model::ModelConfig;
use memlayer_core::rng::Rng;
pub use memlayer_core::sample::{Sampling, new_token_budget, pick};
use memlayer_model_dir::{ModelDirError, Routing, Tokenizer};
use std::future::Future;
use std::ops::ControlFlow;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

/// What the generation loop itself refuses, before or between decoder
/// steps. Each [`Decoder::Error`] converts it into its own error type.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// Bad input: sampling parameters, an empty prompt or one at the
    /// context length, a tokenizer or router that does not fit the model, a
    /// decoder answer of the wrong size.
    #[error("{0}")]
    Input(String),
    /// The tokenizer or the router failed.
    #[error(transparent)]
    ModelDir(#[from] ModelDirError),
    /// [`Generator::generate`] (blocking) found the decoder waiting.
    #[error(
        "the decoder is waiting on I/O or a device: the blocking `generate` only drives decoders \
         that never wait; use `generate_async` with an executor"
    )]
    Pending,
}

/// A model that decodes: feeds tokens after the positions it has cached
/// and returns the logits of the last one.
///
/// The native runtime's decoder is the burn model with its KV cache
/// (`BurnDecoder`, feature `burn`); the browser's is `memlayer-core`'s
/// reference layers on the CPU with its memory layers awaited on WebGPU.
/// Futures need not be `Send` (the browser's are not).
pub trait Decoder {
    /// The decoder's error; the loop's own refusals convert into it.
    type Error: From<GenerateError>;

    /// The model's config (vocabulary, context length, memories).
    fn config(&self) -> &ModelConfig;

    /// Starts a new sequence: forgets the cached positions, and uses
    /// `block_rows` (one row per level, the context's route) for the
    /// hierarchical memory's blocks until the next reset (`None` for a
    /// model without one).
    fn reset(&mut self, block_rows: Option<&[usize]>) -> Result<(), Self::Error>;

    /// Feeds `tokens` (at least one) after the cached positions and returns
    /// the logits of the last one (`config().vocab_size` values).
    // The browser's futures are not Send, so no Send bound is promised.
    #[allow(async_fn_in_trait)]
    async fn step(&mut self, tokens: &[u32]) -> Result<Vec<f32>, Self::Error>;
}

/// The result of one generation (native and browser alike).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Generation {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated token ids (EOS not included).
    pub tokens: Vec<u32>,
    /// Generated text (the stop text included when it was met).
    pub text: String,
    /// Seconds from the call to the first generated token.
    pub first_token_seconds: f64,
    /// Seconds of the whole call.
    pub seconds: f64,
    /// The caller stopped it ([`Generator::generate_async_until`]).
    pub stopped_by_caller: bool,
}

impl Generation {
    /// Generated tokens per second after the first (decode speed); 0 with
    /// fewer than two tokens.
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

/// A decoder, its tokenizer and its router, ready to generate.
pub struct Generator<D> {
    decoder: D,
    tokenizer: Tokenizer,
    routing: Option<Routing>,
}

impl<D: Decoder> Generator<D> {
    /// Joins `decoder` with the model directory's `tokenizer` and `routing`.
    ///
    /// Refused: a tokenizer with more ids than the model's vocabulary, and a
    /// model with a hierarchical memory but no routing.
    pub fn new(
        decoder: D,
        tokenizer: Tokenizer,
        routing: Option<Routing>,
    ) -> Result<Self, D::Error> {
        let cfg = decoder.config();
        if tokenizer.vocab_size() > cfg.vocab_size {
            return Err(GenerateError::Input(format!(
                "the tokenizer has {} tokens, more than the model's vocabulary of {}",
                tokenizer.vocab_size(),
                cfg.vocab_size
            ))
            .into());
        }
        if cfg.hier.is_some() && routing.is_none() {
            return Err(GenerateError::Input(
                "the model has a hierarchical memory but no retriever/tree".into(),
            )
            .into());
        }
        Ok(Self {
            decoder,
            tokenizer,
            routing,
        })
    }

    /// The decoder (e.g. to read its memory's counters).
    pub fn decoder(&self) -> &D {
        &self.decoder
    }

    /// The decoder, mutably (e.g. to warm up or clear its memory).
    pub fn decoder_mut(&mut self) -> &mut D {
        &mut self.decoder
    }

    /// The model's config.
    pub fn config(&self) -> &ModelConfig {
        self.decoder.config()
    }

    /// The tokenizer of the model directory.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Retriever + tree (+ context index) of the hierarchical memory.
    pub fn routing(&self) -> Option<&Routing> {
        self.routing.as_ref()
    }

    /// The decoder, tokenizer and routing back.
    pub fn into_parts(self) -> (D, Tokenizer, Option<Routing>) {
        (self.decoder, self.tokenizer, self.routing)
    }

    /// Block rows of the context `text` (one per level), when the model has
    /// a hierarchical memory; `None` otherwise.
    pub fn route(&self, text: &str) -> Result<Option<Vec<usize>>, D::Error> {
        memlayer_model_dir::route(self.decoder.config(), self.routing.as_ref(), text)
            .map_err(|e| GenerateError::from(e).into())
    }

    /// Generates after `prompt`, calling `on_text(piece, decoder)` with each
    /// new piece of text as it is decoded. Stops at EOS, at `stop` (once the
    /// generated text contains it; the stop text is kept), at
    /// `sampling.max_tokens` or at the model's context length. `clock` gives
    /// seconds since any origin (`Instant` natively, `performance.now()` in
    /// the browser) for the timings.
    pub async fn generate_async(
        &mut self,
        prompt: &str,
        sampling: &Sampling,
        stop: Option<&str>,
        clock: &dyn Fn() -> f64,
        mut on_text: impl FnMut(&str, &D),
    ) -> Result<Generation, D::Error> {
        self.generate_async_until(prompt, sampling, stop, clock, |piece, d| {
            on_text(piece, d);
            ControlFlow::Continue(())
        })
        .await
    }

    /// [`Self::generate_async`] whose caller may stop it: `on_text` returns
    /// [`ControlFlow::Break`] to end the generation after that piece
    /// ([`Generation::stopped_by_caller`] is then set; the text so far is
    /// kept). The C ABI's cancellation and per-token callbacks use it.
    pub async fn generate_async_until(
        &mut self,
        prompt: &str,
        sampling: &Sampling,
        stop: Option<&str>,
        clock: &dyn Fn() -> f64,
        mut on_text: impl FnMut(&str, &D) -> ControlFlow<()>,
    ) -> Result<Generation, D::Error> {
        let t0 = clock();
        sampling.validate().map_err(GenerateError::Input)?;
        let ids = self.tokenizer.encode(prompt).map_err(GenerateError::from)?;
        let (v, max_seq) = {
            let cfg = self.decoder.config();
            (cfg.vocab_size, cfg.max_seq_len)
        };
        let max_new = new_token_budget(ids.len(), sampling.max_tokens, max_seq)
            .map_err(GenerateError::Input)?;
        let rows = self.route(prompt)?;
        self.decoder.reset(rows.as_deref())?;
        let mut rng = Rng::new(sampling.seed);
        let eos = self.tokenizer.eos_id();
        let mut out = Generation {
            prompt_tokens: ids.len(),
            ..Default::default()
        };
        let mut input = ids;
        for _ in 0..max_new {
            let logits = self.decoder.step(&input).await?;
            // (vocab); a decoder may hand back every position's logits
            let last = logits
                .len()
                .checked_sub(v)
                .filter(|_| v > 0 && logits.len().is_multiple_of(v))
                .map(|at| &logits[at..])
                .ok_or_else(|| {
                    GenerateError::Input(format!(
                        "the decoder returned {} logits for a vocabulary of {v}",
                        logits.len()
                    ))
                })?;
            let next = pick(last, sampling, &mut rng);
            if out.tokens.is_empty() {
                out.first_token_seconds = clock() - t0;
            }
            if next == eos {
                break;
            }
            out.tokens.push(next);
            let text = self
                .tokenizer
                .decode(&out.tokens)
                .map_err(GenerateError::from)?;
            let flow = match text.get(out.text.len()..) {
                Some(piece) => on_text(piece, &self.decoder),
                None => ControlFlow::Continue(()),
            };
            out.text = text;
            if flow.is_break() {
                out.stopped_by_caller = true;
                break;
            }
            if stop.is_some_and(|s| out.text.contains(s)) {
                break;
            }
            input = vec![next];
        }
        out.seconds = clock() - t0;
        Ok(out)
    }

    /// [`Self::generate_async`] run to completion on the calling thread,
    /// timed with [`std::time::Instant`]: for decoders whose steps never
    /// wait (the native burn decoder).
    ///
    /// The future is polled once with a no-op waker; if it is pending (a
    /// decoder step awaited I/O or a device that was not ready) the
    /// generation is abandoned and [`GenerateError::Pending`] returned —
    /// such decoders need `generate_async` and an executor.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn generate(
        &mut self,
        prompt: &str,
        sampling: &Sampling,
        stop: Option<&str>,
        mut on_text: impl FnMut(&str, &D),
    ) -> Result<Generation, D::Error> {
        self.generate_until(prompt, sampling, stop, |piece, d| {
            on_text(piece, d);
            ControlFlow::Continue(())
        })
    }

    /// [`Self::generate_async_until`] run to completion on the calling
    /// thread (see [`Self::generate`]).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn generate_until(
        &mut self,
        prompt: &str,
        sampling: &Sampling,
        stop: Option<&str>,
        on_text: impl FnMut(&str, &D) -> ControlFlow<()>,
    ) -> Result<Generation, D::Error> {
        let t0 = std::time::Instant::now();
        let clock = move || t0.elapsed().as_secs_f64();
        poll_ready(self.generate_async_until(prompt, sampling, stop, &clock, on_text))
            .unwrap_or_else(|| Err(GenerateError::Pending.into()))
    }
}

/// Polls `f` once with a no-op waker: its output when it completed without
/// waiting, `None` when it is pending (and then dropped).
pub fn poll_ready<F: Future>(f: F) -> Option<F::Output> {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memlayer_core::model::ModelConfig;

    /// A decoder whose logits favour `(last token + 1) % vocab`.
    struct Counting {
        cfg: ModelConfig,
        fed: Vec<Vec<u32>>,
        rows: Option<Vec<usize>>,
        wait_once: bool,
    }

    #[derive(Debug)]
    struct TestError(String);

    impl From<GenerateError> for TestError {
        fn from(e: GenerateError) -> Self {
            Self(e.to_string())
        }
    }

    /// A future pending once (a wake-up requested), then ready.
    struct YieldOnce(bool);

    impl Future for YieldOnce {
        type Output = ();
        fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.0 {
                Poll::Ready(())
            } else {
                self.0 = true;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }

    impl Decoder for Counting {
        type Error = TestError;
        fn config(&self) -> &ModelConfig {
            &self.cfg
        }
        fn reset(&mut self, block_rows: Option<&[usize]>) -> Result<(), TestError> {
            self.fed.clear();
            self.rows = block_rows.map(<[usize]>::to_vec);
            Ok(())
        }
        async fn step(&mut self, tokens: &[u32]) -> Result<Vec<f32>, TestError> {
            if self.wait_once {
                YieldOnce(false).await;
            }
            self.fed.push(tokens.to_vec());
            let v = self.cfg.vocab_size;
            let mut l = vec![0.0; v];
            l[(*tokens.last().unwrap() as usize + 1) % v] = 1.0;
            Ok(l)
        }
    }

    fn tokenizer() -> Tokenizer {
        Tokenizer::from_json(include_str!("../tests/fixtures/tiny_tokenizer.json")).unwrap()
    }

    fn cfg(vocab_size: usize, max_seq_len: usize) -> ModelConfig {
        ModelConfig {
            vocab_size,
            dim: 8,
            n_layers: 1,
            n_heads: 1,
            ffn_hidden: 8,
            max_seq_len,
            rope_theta: 10_000.0,
            norm_eps: 1e-5,
            tie_embeddings: true,
            pkm: None,
            hier: None,
        }
    }

    fn generator(max_seq_len: usize) -> Generator<Counting> {
        let tok = tokenizer();
        let cfg = cfg(tok.vocab_size(), max_seq_len);
        let d = Counting {
            cfg,
            fed: Vec::new(),
            rows: None,
            wait_once: false,
        };
        Generator::new(d, tok, None).unwrap()
    }

    #[test]
    fn prefill_then_one_token_per_step_with_pieces_making_the_text() {
        let mut g = generator(64);
        let prompt_ids = g.tokenizer().encode("ab").unwrap();
        let s = Sampling {
            max_tokens: 5,
            ..Sampling::default()
        };
        let mut pieces = String::new();
        let mut calls = 0;
        let out = g
            .generate("ab", &s, None, |p, d| {
                pieces.push_str(p);
                calls += 1;
                assert_eq!(d.fed.len(), calls, "the callback sees the decoder");
            })
            .unwrap();
        assert_eq!(out.prompt_tokens, prompt_ids.len());
        assert_eq!(out.tokens.len(), 5);
        assert_eq!(pieces, out.text);
        let fed = &g.decoder().fed;
        assert_eq!(fed[0], prompt_ids, "the prompt in one step");
        assert!(fed[1..].iter().all(|f| f.len() == 1));
        let mut want = *prompt_ids.last().unwrap();
        for &t in &out.tokens {
            want = (want + 1) % g.config().vocab_size as u32;
            assert_eq!(t, want);
        }
        assert!(out.seconds >= out.first_token_seconds);
    }

    #[test]
    fn the_caller_stops_the_generation_after_a_piece() {
        let mut g = generator(64);
        let s = Sampling {
            max_tokens: 10,
            ..Sampling::default()
        };
        let mut pieces = 0;
        let out = g
            .generate_until("ab", &s, None, |_, _| {
                pieces += 1;
                if pieces == 3 {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })
            .unwrap();
        assert_eq!((out.tokens.len(), pieces), (3, 3));
        assert!(out.stopped_by_caller);
        let full = g.generate("ab", &s, None, |_, _| {}).unwrap();
        assert!(!full.stopped_by_caller);
        assert!(full.text.starts_with(&out.text) && full.tokens.len() == 10);
    }

    #[test]
    fn the_context_bounds_the_tokens_and_a_full_prompt_is_an_error() {
        let mut g = generator(8);
        let n = g.tokenizer().encode("ab").unwrap().len();
        let s = Sampling {
            max_tokens: 100,
            ..Sampling::default()
        };
        let out = g.generate("ab", &s, None, |_, _| {}).unwrap();
        assert!(out.tokens.len() <= 8 - n, "{out:?}");
        let long = "x ".repeat(40);
        let e = g.generate(&long, &s, None, |_, _| {}).unwrap_err();
        assert!(e.0.contains("no token is left to generate"), "{e:?}");
        let bad = Sampling {
            temperature: f32::NAN,
            ..s
        };
        assert!(g.generate("ab", &bad, None, |_, _| {}).is_err());
    }

    #[test]
    fn a_decoder_that_waits_is_refused_by_the_blocking_generate_only() {
        let mut g = generator(64);
        g.decoder_mut().wait_once = true;
        let s = Sampling {
            max_tokens: 3,
            ..Sampling::default()
        };
        let e = g.generate("ab", &s, None, |_, _| {}).unwrap_err();
        assert!(e.0.contains("use `generate_async`"), "{e:?}");
        // driven by an executor that polls again, it completes
        let fut = g.generate_async("ab", &s, None, &|| 0.0, |_, _| {});
        let mut fut = pin!(fut);
        let out = loop {
            if let Poll::Ready(r) = fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
                break r.unwrap();
            }
        };
        assert_eq!(out.tokens.len(), 3);
    }

    #[test]
    fn a_tokenizer_larger_than_the_vocabulary_is_refused() {
        let tok = tokenizer();
        let cfg = cfg(tok.vocab_size() - 1, 64);
        let d = Counting {
            cfg,
            fed: Vec::new(),
            rows: None,
            wait_once: false,
        };
        let e = Generator::new(d, tok, None).err().unwrap();
        assert!(e.0.contains("more than the model's vocabulary"), "{e:?}");
    }
}
