//! The native generator on exported model directories: a dense model (no
//! memory, no bank) opens paged and resident and answers like the CPU
//! reference; the streaming callback reads the decoder (the paged memory's
//! counters, the cache position); the loop's refusals are named errors.

mod common;
use common::{ScratchDir, dir_cfg, export_model_dir};

use burn::tensor::Device;
use memlayer_core::model::{ModelConfig, ParamStore, reference};
use memlayer_core::rng::Rng;
use memlayer_model::MemoryOps;
use memlayer_runtime::generate::poll_ready;
use memlayer_runtime::paged::{PagedMemory, PagedOptions};
use memlayer_runtime::{BurnDecoder, Decoder, Generator, Sampling, open_paged, open_resident};
use std::path::Path;
use std::sync::Arc;

fn paged(dir: &Path) -> (Generator<BurnDecoder>, Option<Arc<PagedMemory>>) {
    open_paged(
        dir,
        None,
        PagedOptions::host(memlayer_runtime::Budget::bytes(1 << 30)),
        &Device::flex(),
        MemoryOps::Portable,
    )
    .unwrap()
}

/// Greedy text of the reference forward (the whole sequence each step),
/// stopping like the generator.
fn reference_greedy(
    cfg: &ModelConfig,
    store: &ParamStore,
    g: &Generator<BurnDecoder>,
    prompt: &str,
    max_tokens: usize,
) -> String {
    let tok = g.tokenizer();
    let mut ids = tok.encode(prompt).unwrap();
    let n0 = ids.len();
    let v = cfg.vocab_size;
    let mut rng = Rng::new(0);
    for _ in 0..max_tokens.min(cfg.max_seq_len - n0) {
        let logits = reference::forward(cfg, store, &ids, None).unwrap();
        let next = memlayer_core::sample::pick(
            &logits[logits.len() - v..],
            &Sampling::default(),
            &mut rng,
        );
        if next == tok.eos_id() {
            break;
        }
        ids.push(next);
    }
    tok.decode(&ids[n0..]).unwrap()
}

fn greedy(max_tokens: usize) -> Sampling {
    Sampling {
        max_tokens,
        ..Sampling::default()
    }
}

#[test]
fn a_dense_directory_opens_without_a_bank_and_answers_like_the_reference() {
    let tmp = ScratchDir::new("gen-dense");
    let dir = tmp.join("model");
    let cfg = ModelConfig {
        pkm: None,
        hier: None,
        ..dir_cfg(false)
    };
    let store = export_model_dir(&dir, &cfg, 7);
    assert!(
        !dir.join("memory.bank").exists(),
        "a dense export has no bank"
    );

    let (mut g, memory) = paged(&dir);
    assert!(memory.is_none(), "no memory to page");
    assert!(g.decoder().memory().is_none());
    let prompt = "The city where";
    let mut streamed = String::new();
    let out = g
        .generate(prompt, &greedy(8), None, |p, d| {
            streamed.push_str(p);
            assert!(d.memory().is_none());
        })
        .unwrap();
    assert_eq!(streamed, out.text);
    assert!(!out.tokens.is_empty());
    assert_eq!(out.text, reference_greedy(&cfg, &store, &g, prompt, 8));

    let mut r = open_resident(&dir, &Device::flex(), MemoryOps::Portable).unwrap();
    let again = r.generate(prompt, &greedy(8), None, |_, _| {}).unwrap();
    assert_eq!(again.text, out.text, "resident == paged for a dense model");
    assert_eq!(again.tokens, out.tokens);
}

#[test]
fn the_callback_reads_the_decoder_and_its_paged_memory() {
    let tmp = ScratchDir::new("gen-stats");
    let dir = tmp.join("model");
    let cfg = dir_cfg(false);
    export_model_dir(&dir, &cfg, 5);
    let (mut g, memory) = paged(&dir);
    let memory = memory.expect("a product-key model pages its memory");
    let mut seen = Vec::new();
    let out = g
        .generate("The city where", &greedy(6), None, |_, d| {
            let m = d.memory().expect("the decoder keeps the memory");
            seen.push((d.position(), m.stats().value_accesses));
        })
        .unwrap();
    assert_eq!(seen.len(), out.tokens.len());
    for (i, &(pos, _)) in seen.iter().enumerate() {
        // the newest token is picked, not yet fed
        assert_eq!(pos, out.prompt_tokens + i, "position at piece {i}");
    }
    assert!(seen.windows(2).all(|w| w[0].1 < w[1].1), "{seen:?}");
    assert_eq!(
        seen.last().unwrap().1,
        memory.stats().value_accesses,
        "the same memory"
    );
    assert_eq!(g.config(), &cfg);
}

#[test]
fn prompts_at_the_context_length_and_bad_sampling_are_errors() {
    let tmp = ScratchDir::new("gen-errors");
    let dir = tmp.join("model");
    let cfg = dir_cfg(false);
    export_model_dir(&dir, &cfg, 5);
    let (mut g, _) = paged(&dir);
    let long = "The city where ".repeat(40);
    let err = g
        .generate(&long, &greedy(4), None, |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("the model's context is 32") && err.contains("no token is left"),
        "{err}"
    );
    let bad = Sampling {
        top_p: 0.0,
        ..greedy(4)
    };
    let err = g.generate("The city", &bad, None, |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("top"), "{err}");
    // the generator still works after refusals
    assert!(g.generate("The city", &greedy(2), None, |_, _| {}).is_ok());
    // the decoder refuses an empty step by name
    let err = poll_ready(g.decoder_mut().step(&[]))
        .expect("never waits")
        .unwrap_err();
    assert!(err.to_string().contains("no tokens"), "{err}");
}
