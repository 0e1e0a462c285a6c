//! The browser runtime's forward, run natively on a real wgpu adapter
//! (lavapipe in CI) with pages read through the same `RemoteBank` code,
//! against `memlayer-core`'s reference forward of the fully resident model.

use memlayer_bank::{
    BankLayout, BankWriter, Dtype, FileSource, MemSource, PageEntry, PageId, SectionSpec,
};
use memlayer_core::model::reference;
use memlayer_core::model::{ModelConfig, ParamStore, PkmSpec};
use memlayer_core::sample::Sampling;
use memlayer_model_dir::Tokenizer;
use memlayer_runtime::{Decoder, Generator};
use memlayer_web::bank::{FetchedPage, PageFetch, RemoteBank, SourceFetch};
use memlayer_web::{
    Engine, Generation, MemoryOptions, MemorySetup, ModelFiles, WebDecoder, WebMemory,
};
use memlayer_wgpu::{GpuContext, GpuOptions, gpu_for_tests};
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;

fn gpu() -> Option<GpuContext> {
    gpu_for_tests(GpuOptions::default())
}

/// A small product-key model: N = 12² = 144 rows (not a power of two),
/// 5-row pages (the last one short), k = 4 of 12 sub-keys, two heads.
fn small_config() -> ModelConfig {
    let tiny = ModelConfig::tiny_for_tests(true, false);
    ModelConfig {
        vocab_size: 50,
        pkm: Some(PkmSpec {
            n_keys: 12,
            knn: 4,
            v_dim: 16,
            ..tiny.pkm.clone().expect("pkm")
        }),
        ..tiny
    }
}

/// The bank of `store`'s value table in pages of `page_rows`.
fn bank_bytes(cfg: &ModelConfig, store: &ParamStore, page_rows: u32) -> Vec<u8> {
    bank_bytes_as(cfg, store, page_rows, Dtype::F32)
}

/// The bank of `store`'s value table in pages of `page_rows`, stored as `dtype`.
fn bank_bytes_as(cfg: &ModelConfig, store: &ParamStore, page_rows: u32, dtype: Dtype) -> Vec<u8> {
    let p = cfg.pkm_config().expect("pkm");
    let layout = BankLayout::new(vec![SectionSpec::pkm_values(
        p.n_rows() as u64,
        p.v_dim as u32,
        page_rows,
        dtype,
    )]);
    let mut w = BankWriter::new(std::io::Cursor::new(Vec::new()), &layout).expect("writer");
    w.write_rows(
        store
            .data(memlayer_core::model::params::VALUES)
            .expect("values"),
    )
    .expect("rows");
    w.finish().expect("finish").into_inner()
}

fn dense_of(cfg: &ModelConfig, full: &ParamStore) -> ParamStore {
    let bytes = full
        .to_safetensors(|p| !ParamStore::is_memory_name(&p.name), None)
        .expect("safetensors");
    let mut dense = ParamStore::dense_zeros(cfg).expect("dense");
    dense.load_safetensors(&bytes).expect("load");
    dense
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-4 * scale,
            "{what}: logit {i}: {g} vs reference {w}"
        );
    }
}

/// A decoder of `full`'s dense weights with its values paged from `bank`
/// into `budget_bytes` of device slots.
fn paged_decoder<F: PageFetch>(
    ctx: GpuContext,
    bank: RemoteBank<F>,
    cfg: &ModelConfig,
    full: &ParamStore,
    budget_bytes: u64,
) -> WebDecoder<F> {
    let opts = MemoryOptions {
        ctx: Some(ctx),
        budget_bytes,
        prefetch: false,
    };
    let memory = WebMemory::new(bank, cfg, &dense_of(cfg, full), opts).expect("memory");
    WebDecoder::new(cfg.clone(), dense_of(cfg, full), Some(memory)).expect("decoder")
}

#[test]
fn cached_decoding_with_paged_device_memory_equals_the_reference_forward() {
    let Some(ctx) = gpu() else { return };
    let cfg = small_config();
    let full = ParamStore::init(&cfg, 11).expect("init");
    let bank = bank_bytes(&cfg, &full, 5);
    let bank = pollster::block_on(RemoteBank::open(SourceFetch(MemSource::named(
        bank,
        "mem://small.bank",
    ))))
    .expect("open");
    let pages = bank.sections()[0].geometry.page_count;
    assert_eq!(pages, 29, "144 rows in 5-row pages");
    // the smallest budget: one token's 2 × 4 rows → 8 slots of 5 rows × 16 f32;
    // the prefill's pages cannot all be resident: runs of tokens, evictions
    let slot_bytes = 5 * 16 * 4;
    let mut decoder = paged_decoder(ctx, bank, &cfg, &full, 8 * slot_bytes);
    let tokens: Vec<u32> = vec![3, 17, 17, 42, 0, 9, 33, 21, 5, 49, 12];
    let prefill = 7;
    let logits = pollster::block_on(decoder.step(&tokens[..prefill])).expect("step");
    let v = cfg.vocab_size;
    let want = reference::forward(&cfg, &full, &tokens[..prefill], None).expect("reference");
    assert_close(&logits, &want[(prefill - 1) * v..], "prefill");
    for t in prefill..tokens.len() {
        let logits = pollster::block_on(decoder.step(&tokens[t..=t])).expect("step");
        let want = reference::forward(&cfg, &full, &tokens[..=t], None).expect("reference");
        assert_close(&logits, &want[t * v..], &format!("token {t}"));
    }
    let s = decoder.stats();
    assert_eq!(s.slots, 8);
    assert!(s.resident_pages <= 8, "{s:?}");
    assert!(s.evictions > 0, "a budget of 8 pages must evict: {s:?}");
    assert_eq!(s.value_accesses, s.value_hits + s.value_misses);
    assert_eq!(
        s.pages_streamed, s.value_misses,
        "every miss streams its page: {s:?}"
    );
    assert_eq!(s.pages_from_cache, 0);
    assert_eq!(decoder.position(), tokens.len());
}

/// An f16 or bf16 bank stays 16-bit in the device slots (a slot is half an
/// f32 one: the same 8 slots in half the budget) and the decoder equals the
/// reference forward over the bank's own (rounded) values.
#[test]
fn a_16_bit_bank_pages_into_16_bit_device_slots_like_the_reference() {
    let Some(ctx) = gpu() else { return };
    let cfg = small_config();
    for dtype in [Dtype::F16, Dtype::Bf16] {
        let mut full = ParamStore::init(&cfg, 11).expect("init");
        let bank = bank_bytes_as(&cfg, &full, 5, dtype);
        // the reference reads what the bank holds
        for p in full.params_mut() {
            if p.name == memlayer_core::model::params::VALUES {
                p.data
                    .iter_mut()
                    .for_each(|v| *v = memlayer_bank::round_trip(dtype, *v));
            }
        }
        let bank = pollster::block_on(RemoteBank::open(SourceFetch(MemSource::named(
            bank,
            "mem://small-16.bank",
        ))))
        .expect("open");
        // one token's 2 × 4 rows → 8 slots of 5 rows × 16 values of 2 bytes
        let slot_bytes = 5 * 16 * 2;
        let mut decoder = paged_decoder(ctx.clone(), bank, &cfg, &full, 8 * slot_bytes);
        let tokens: Vec<u32> = vec![3, 17, 17, 42, 0, 9, 33, 21, 5, 49, 12];
        let prefill = 7;
        let logits = pollster::block_on(decoder.step(&tokens[..prefill])).expect("step");
        let v = cfg.vocab_size;
        let want = reference::forward(&cfg, &full, &tokens[..prefill], None).expect("reference");
        assert_close(
            &logits,
            &want[(prefill - 1) * v..],
            &format!("{dtype} prefill"),
        );
        for t in prefill..tokens.len() {
            let logits = pollster::block_on(decoder.step(&tokens[t..=t])).expect("step");
            let want = reference::forward(&cfg, &full, &tokens[..=t], None).expect("reference");
            assert_close(&logits, &want[t * v..], &format!("{dtype} token {t}"));
        }
        let s = decoder.stats();
        assert_eq!((s.slots, s.budget_bytes), (8, 8 * slot_bytes), "{dtype}");
        assert!(
            s.evictions > 0,
            "{dtype}: a budget of 8 pages must evict: {s:?}"
        );
    }
}

#[test]
fn budgets_below_one_token_and_product_keys_without_a_device_are_refused() {
    let Some(ctx) = gpu() else { return };
    let cfg = small_config();
    let full = ParamStore::init(&cfg, 3).expect("init");
    let open = |b: Vec<u8>| {
        pollster::block_on(RemoteBank::open(SourceFetch(MemSource::named(
            b, "mem://x",
        ))))
        .expect("open")
    };
    let opts = |ctx, budget_bytes| MemoryOptions {
        ctx,
        budget_bytes,
        prefetch: false,
    };
    let dense = dense_of(&cfg, &full);
    let bank = open(bank_bytes(&cfg, &full, 5));
    let err = WebMemory::new(bank, &cfg, &dense, opts(Some(ctx), 7 * 5 * 16 * 4))
        .err()
        .expect("7 slots < 8 pages per token")
        .to_string();
    assert!(
        err.contains("raise the budget to at least 2560 bytes"),
        "{err}"
    );
    let bank = open(bank_bytes(&cfg, &full, 5));
    let err = WebMemory::new(bank, &cfg, &dense, opts(None, 1 << 20))
        .err()
        .expect("no device")
        .to_string();
    assert!(err.contains("needs a WebGPU device"), "{err}");
}

/// A fetcher with a local copy (like the browser's Cache API) that can be
/// corrupted: pages once fetched are served from the copy.
struct CachingFetch {
    network: MemSource,
    copy: RefCell<HashMap<PageId, Vec<u8>>>,
    network_reads: RefCell<u64>,
}

impl PageFetch for CachingFetch {
    fn location(&self) -> String {
        "mem://cached.bank".into()
    }

    async fn read_range(&self, offset: u64, len: u64) -> Result<Vec<u8>, String> {
        *self.network_reads.borrow_mut() += 1;
        let b = self.network.bytes();
        b.get(offset as usize..(offset + len) as usize)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| format!("HTTP 416 for bytes {offset}+{len}"))
    }

    async fn read_pages(&self, pages: &[(PageId, PageEntry)]) -> Vec<Result<FetchedPage, String>> {
        let mut out = Vec::new();
        for &(p, e) in pages {
            if let Some(bytes) = self.copy.borrow().get(&p) {
                out.push(Ok(FetchedPage {
                    bytes: bytes.clone(),
                    from_cache: true,
                }));
                continue;
            }
            let r = self.read_range(e.offset, e.length).await;
            if let Ok(b) = &r {
                self.copy.borrow_mut().insert(p, b.clone());
            }
            out.push(r.map(|bytes| FetchedPage {
                bytes,
                from_cache: false,
            }));
        }
        out
    }

    async fn forget(&self, page: PageId, _: &PageEntry) {
        self.copy.borrow_mut().remove(&page);
    }
}

#[test]
fn corrupt_pages_are_named_and_a_corrupt_local_copy_is_fetched_again() {
    let Some(ctx) = gpu() else { return };
    let cfg = small_config();
    let full = ParamStore::init(&cfg, 5).expect("init");
    let bytes = bank_bytes(&cfg, &full, 5);
    let tokens = [1u32, 2, 3, 4];
    let want = reference::forward(&cfg, &full, &tokens, None).expect("reference");
    let last = &want[3 * cfg.vocab_size..];

    // 1. a corrupt page on the network: the error names the page and checksum
    let meta = memlayer_bank::BankMeta::parse(&bytes, "x").expect("meta");
    let mut bad = bytes.clone();
    for e in &meta.pages {
        bad[e.offset as usize] ^= 0x40;
    }
    let bank = pollster::block_on(RemoteBank::open(SourceFetch(MemSource::named(
        bad,
        "mem://corrupt.bank",
    ))))
    .expect("open");
    let mut decoder = paged_decoder(ctx, bank, &cfg, &full, 1 << 20);
    let err = pollster::block_on(decoder.step(&tokens))
        .expect_err("corrupt pages must fail")
        .to_string();
    assert!(
        err.contains("mem://corrupt.bank")
            && err.contains("checksum mismatch")
            && err.contains("page "),
        "{err}"
    );
    assert_eq!(
        decoder.stats().resident_pages,
        0,
        "a failed page is not resident"
    );

    // 2. a corrupt local copy is dropped and fetched again from the network
    let Some(ctx) = gpu() else { return };
    let fetch = CachingFetch {
        network: MemSource::named(bytes, "mem://cached.bank"),
        copy: RefCell::new(HashMap::new()),
        network_reads: RefCell::new(0),
    };
    let bank = pollster::block_on(RemoteBank::open(fetch)).expect("open");
    let mut decoder = paged_decoder(ctx, bank, &cfg, &full, 1 << 20);
    let logits = pollster::block_on(decoder.step(&tokens)).expect("step");
    assert_close(&logits, last, "first run");
    let first = decoder.stats();
    assert_eq!(first.pages_from_cache, 0);
    // a second memory over the same fetcher is the reload: pages come from the copy,
    // one of which is now corrupt
    let Some(ctx) = gpu() else { return };
    let previous = decoder.memory().expect("memory").bank().fetcher();
    let fetch = CachingFetch {
        network: MemSource::named(previous.network.bytes().to_vec(), "m"),
        copy: RefCell::new(previous.copy.borrow().clone()),
        network_reads: RefCell::new(0),
    };
    let some_page = *fetch
        .copy
        .borrow()
        .keys()
        .min()
        .expect("a page was fetched");
    fetch.copy.borrow_mut().get_mut(&some_page).expect("page")[0] ^= 1;
    let bank = pollster::block_on(RemoteBank::open(fetch)).expect("open");
    let mut decoder = paged_decoder(ctx, bank, &cfg, &full, 1 << 20);
    let logits = pollster::block_on(decoder.step(&tokens)).expect("step");
    assert_close(&logits, last, "reload with one corrupt local copy");
    let s = decoder.stats();
    assert_eq!(s.pages_streamed, first.pages_streamed);
    assert_eq!(
        s.pages_from_cache,
        first.pages_streamed - 1,
        "all but the corrupt page from the local copy: {s:?}"
    );
    // header + table + the one corrupt page
    let memory = decoder.memory().expect("memory");
    assert_eq!(*memory.bank().fetcher().network_reads.borrow(), 3);
}

fn demo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/demo-pkm")
}

/// Greedy text of the fully resident reference model (no KV cache: the
/// whole sequence each step), stopping like the engine.
fn reference_greedy(
    cfg: &ModelConfig,
    full: &ParamStore,
    tok: &Tokenizer,
    prompt: &str,
    max_tokens: usize,
) -> String {
    let eos = tok.eos_id();
    let mut ids = tok.encode(prompt).expect("encode");
    let n0 = ids.len();
    let v = cfg.vocab_size;
    let mut rng = memlayer_core::rng::Rng::new(0);
    for _ in 0..max_tokens {
        let logits = reference::forward(cfg, full, &ids, None).expect("forward");
        let next = memlayer_core::sample::pick(
            &logits[logits.len() - v..],
            &Sampling::default(),
            &mut rng,
        );
        if next == eos {
            break;
        }
        ids.push(next);
        let text = tok.decode(&ids[n0..]).expect("decode");
        if text.contains('\n') {
            break;
        }
    }
    tok.decode(&ids[n0..]).expect("decode")
}

#[test]
fn the_shipped_model_answers_like_the_resident_reference_with_a_quarter_of_its_bank() {
    let Some(ctx) = gpu() else { return };
    let dir = demo_dir();
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
    let files = ModelFiles {
        location: dir.display().to_string(),
        config_json: String::from_utf8(read("config.json")).expect("utf8"),
        tokenizer_json: String::from_utf8(read("tokenizer.json")).expect("utf8"),
        safetensors: read("model.safetensors"),
        routing: None,
    };
    let cfg = files.config().expect("config");
    let source = FileSource::open(dir.join("memory.bank")).expect("bank");
    let bank = pollster::block_on(RemoteBank::open(SourceFetch(source))).expect("open");
    let table = memlayer_bank::resident_bytes(bank.sections());
    let memory = MemorySetup {
        ctx: Some(ctx),
        bank,
        budget_bytes: table / 4,
        prefetch: false,
    };
    let mut engine = Engine::new(&files, Some(memory), None).expect("engine");
    let t0 = std::time::Instant::now();
    let now = move || t0.elapsed().as_secs_f64();
    let sampling = Sampling {
        max_tokens: 12,
        ..Sampling::default()
    };
    let prompt = "The city where Staime Ribrom was born is";
    let mut streamed = String::new();
    let g = pollster::block_on(
        engine.generate(prompt, &sampling, Some("\n"), &now, |p, _| {
            streamed.push_str(p)
        }),
    )
    .expect("generate");
    assert_eq!(streamed, g.text, "the pieces make the text");
    assert!(!g.text.is_empty());

    // the reference: dense weights + every value row read from the bank
    let mut full = files.dense_weights(&cfg).expect("dense");
    let reader =
        memlayer_bank::BankReader::open(FileSource::open(dir.join("memory.bank")).expect("bank"))
            .expect("reader");
    let mut values = Vec::new();
    for p in 0..reader.page_count() {
        values.extend(reader.read_page_f32(p).expect("page"));
    }
    let mut full_store = ParamStore::zeros(&cfg).expect("zeros");
    for p in full_store.params_mut() {
        p.data = if p.name == memlayer_core::model::params::VALUES {
            values.clone()
        } else {
            full.get(&p.name).expect("dense param").data.clone()
        };
    }
    full = full_store;
    let tok = Tokenizer::load(&dir.join("tokenizer.json")).expect("tokenizer");
    let want = reference_greedy(&cfg, &full, &tok, prompt, 12);
    assert_eq!(g.text, want, "browser runtime vs resident reference");
    let s = engine.stats();
    assert!(
        s.pages_streamed > 0 && s.pages_streamed < s.bank_pages,
        "{s:?}"
    );
    assert!(s.resident_bytes <= s.budget_bytes, "{s:?}");
    eprintln!(
        "demo-pkm: {:?} in {:.2} s (first token {:.2} s); {} of {} pages streamed",
        g.text, g.seconds, g.first_token_seconds, s.pages_streamed, s.bank_pages
    );
}

/// [`small_config`] without memory, with the vocabulary of the runtime's
/// tiny tokenizer fixture.
fn dense_config() -> (ModelConfig, Tokenizer) {
    let tok = Tokenizer::from_json(include_str!(
        "../../memlayer-runtime/tests/fixtures/tiny_tokenizer.json"
    ))
    .expect("tokenizer");
    let cfg = ModelConfig {
        vocab_size: tok.vocab_size(),
        pkm: None,
        ..small_config()
    };
    (cfg, tok)
}

#[test]
fn a_dense_model_decodes_without_device_memory_like_the_reference() {
    let (cfg, _) = dense_config();
    let store = ParamStore::init(&cfg, 13).expect("init");
    let mut decoder = WebDecoder::<SourceFetch<MemSource>>::new(cfg.clone(), store.clone(), None)
        .expect("a dense model needs no device memory");
    assert!(decoder.memory().is_none());
    assert_eq!(decoder.stats().hit_rate, 1.0);
    let tokens: Vec<u32> = vec![3, 17, 250, 42, 0, 9, 33, 21];
    let v = cfg.vocab_size;
    let logits = pollster::block_on(decoder.step(&tokens[..5])).expect("prefill");
    let want = reference::forward(&cfg, &store, &tokens[..5], None).expect("reference");
    assert_close(&logits, &want[4 * v..], "dense prefill");
    for t in 5..tokens.len() {
        let logits = pollster::block_on(decoder.step(&tokens[t..=t])).expect("step");
        let want = reference::forward(&cfg, &store, &tokens[..=t], None).expect("reference");
        assert_close(&logits, &want[t * v..], &format!("dense token {t}"));
    }
    // a new sequence starts at position 0; block rows are refused (no hierarchical memory)
    decoder.reset(None).expect("reset");
    assert_eq!(decoder.position(), 0);
    assert!(decoder.reset(Some(&[0])).is_err());

    // a product-key model without its memory is refused by name
    let err = WebDecoder::<SourceFetch<MemSource>>::new(
        small_config(),
        ParamStore::dense_zeros(&small_config()).expect("dense"),
        None,
    )
    .err()
    .expect("pkm without memory")
    .to_string();
    assert!(err.contains("needs its memory.bank"), "{err}");
}

#[test]
fn a_dense_model_directory_generates_in_the_engine_like_the_reference() {
    let (cfg, tok) = dense_config();
    let store = ParamStore::init(&cfg, 21).expect("init");
    let files = ModelFiles {
        location: "mem://dense".into(),
        config_json: serde_json::to_string(&cfg).expect("config"),
        tokenizer_json: tok.to_json().expect("tokenizer"),
        safetensors: store.to_safetensors(|_| true, None).expect("safetensors"),
        routing: None,
    };
    let mut engine = Engine::<SourceFetch<MemSource>>::new(&files, None, None).expect("engine");
    assert!(engine.memory().is_none());
    let sampling = Sampling {
        max_tokens: 10,
        ..Sampling::default()
    };
    let prompt = "The city where";
    let mut pieces = String::new();
    let g = pollster::block_on(
        engine.generate(prompt, &sampling, Some("\n"), &|| 0.0, |p, s| {
            pieces.push_str(p);
            assert_eq!(s.pages_streamed, 0);
        }),
    )
    .expect("generate");
    assert_eq!(pieces, g.text);
    assert!(!g.tokens.is_empty());
    assert_eq!(g.text, reference_greedy(&cfg, &store, &tok, prompt, 10));

    // the same loop, driven by the runtime's Generator directly, gives the same
    let decoder =
        WebDecoder::<SourceFetch<MemSource>>::new(cfg.clone(), store.clone(), None).expect("dec");
    let mut generator = Generator::new(decoder, tok.clone(), None).expect("generator");
    let again = generator
        .generate(prompt, &sampling, Some("\n"), |_, _| {})
        .expect("a dense browser decoder never waits");
    assert_eq!(
        again,
        Generation {
            seconds: again.seconds,
            first_token_seconds: again.first_token_seconds,
            ..g
        }
    );

    // a dense model given a bank, and a memory model given none, are refused by name
    let pkm_files = ModelFiles {
        config_json: serde_json::to_string(&small_config()).expect("config"),
        ..files
    };
    let err = Engine::<SourceFetch<MemSource>>::new(&pkm_files, None, None)
        .err()
        .expect("no bank")
        .to_string();
    assert!(err.contains("needs its memory.bank"), "{err}");
}

// ---- hierarchical memory: blocks streamed into the CPU decoder ------------

/// The bank of `store`'s memory (value table, if any, and the block tables,
/// as `memlayer export` writes it).
fn model_bank(cfg: &ModelConfig, store: &ParamStore, name: &str) -> Vec<u8> {
    let path =
        std::env::temp_dir().join(format!("memlayer-web-{name}-{}.bank", std::process::id()));
    memlayer_model_dir::dir::write_bank(cfg, store, &path, memlayer_bank::Dtype::F32)
        .expect("write bank");
    let bytes = std::fs::read(&path).expect("read bank");
    let _ = std::fs::remove_file(&path);
    bytes
}

fn remote(bytes: Vec<u8>, name: &str) -> RemoteBank<SourceFetch<MemSource>> {
    pollster::block_on(RemoteBank::open(SourceFetch(MemSource::named(
        bytes,
        format!("mem://{name}"),
    ))))
    .expect("open")
}

/// The tiny hierarchical model of the tests (2 levels, branching 2, a
/// generic block per level: rows 0..=2 and 0..=4), no product-key memory.
fn hier_config() -> ModelConfig {
    ModelConfig::tiny_for_tests(false, true)
}

/// A prefill and decode steps with the blocks of `rows`, each against the
/// reference forward of the fully resident model.
fn decode_like_the_reference<F: PageFetch>(
    decoder: &mut WebDecoder<F>,
    cfg: &ModelConfig,
    full: &ParamStore,
    rows: &[usize],
    what: &str,
) {
    let tokens: Vec<u32> = vec![3, 17, 17, 30, 0, 9, 33, 21];
    let (prefill, v) = (5, cfg.vocab_size);
    decoder.reset(Some(rows)).expect("reset");
    let logits = pollster::block_on(decoder.step(&tokens[..prefill])).expect("prefill");
    let want = reference::forward(cfg, full, &tokens[..prefill], Some(rows)).expect("reference");
    assert_close(
        &logits,
        &want[(prefill - 1) * v..],
        &format!("{what}: prefill"),
    );
    for t in prefill..tokens.len() {
        let logits = pollster::block_on(decoder.step(&tokens[t..=t])).expect("step");
        let want = reference::forward(cfg, full, &tokens[..=t], Some(rows)).expect("reference");
        assert_close(&logits, &want[t * v..], &format!("{what}: token {t}"));
    }
}

#[test]
fn hierarchical_blocks_stream_into_the_cpu_decoder_like_the_reference() {
    let cfg = hier_config();
    let full = ParamStore::init(&cfg, 5).expect("init");
    let bank = remote(model_bank(&cfg, &full, "hier"), "hier.bank");
    let sections = bank.sections().to_vec();
    // f32 bytes of one block per level: 3 dense layers × 3 × units [4, 2] × dim 16
    let block_bytes: Vec<u64> = sections
        .iter()
        .map(|s| s.geometry.page_rows * u64::from(s.geometry.dim) * 4)
        .collect();
    assert_eq!(block_bytes, [3 * 3 * 4 * 16 * 4, 3 * 3 * 2 * 16 * 4]);
    let reserve: u64 = block_bytes.iter().sum::<u64>() * 2;
    let opts = |budget_bytes| MemoryOptions {
        ctx: None,
        budget_bytes,
        prefetch: true,
    };
    // no WebGPU device: a hierarchical memory runs on the CPU
    let memory = WebMemory::new(bank, &cfg, &dense_of(&cfg, &full), opts(reserve)).expect("memory");
    assert!(memory.gpu().is_none() && memory.prefetch_enabled());
    let mut decoder =
        WebDecoder::new(cfg.clone(), dense_of(&cfg, &full), Some(memory)).expect("decoder");

    // a context's blocks: fetched by the first step, resident after
    decode_like_the_reference(&mut decoder, &cfg, &full, &[1, 2], "context [1, 2]");
    let s = decoder.stats();
    assert_eq!((s.block_requests, s.block_hits), (8, 6), "{s:?}");
    assert_eq!(s.pages_streamed, 2, "one block page per level: {s:?}");
    assert_eq!(s.bytes_streamed, block_bytes.iter().sum::<u64>());
    assert!(s.resident_bytes <= s.budget_bytes, "{s:?}");

    // the next context prefetched: its first step finds both blocks
    let m = decoder.memory_mut().expect("memory");
    assert_eq!(
        pollster::block_on(m.prefetch(&[2, 4])).expect("prefetch"),
        2
    );
    assert_eq!(
        pollster::block_on(m.prefetch(&[2, 4])).expect("again"),
        0,
        "held"
    );
    assert_eq!(decoder.stats().pages_streamed, 4);
    // the generic blocks (last rows) route like any other
    decode_like_the_reference(&mut decoder, &cfg, &full, &[2, 4], "context [2, 4]");
    let s = decoder.stats();
    assert_eq!((s.block_requests, s.block_hits), (16, 14), "{s:?}");
    assert_eq!(
        s.pages_streamed, 4,
        "nothing fetched after the prefetch: {s:?}"
    );
    // a change of one level fetches that level only
    decode_like_the_reference(&mut decoder, &cfg, &full, &[2, 0], "context [2, 0]");
    assert_eq!(decoder.stats().pages_streamed, 5);

    // refused by name: rows of the wrong count or range, a budget below the blocks
    assert!(
        decoder
            .reset(Some(&[1]))
            .unwrap_err()
            .to_string()
            .contains("1 block rows")
    );
    decoder.reset(Some(&[1, 5])).expect("reset");
    let err = pollster::block_on(decoder.step(&[1]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("row 5") && err.contains("level 2"), "{err}");
    assert!(decoder.reset(None).is_err(), "a sequence needs its route");
    let bank = remote(model_bank(&cfg, &full, "hier2"), "hier.bank");
    let err = WebMemory::new(bank, &cfg, &dense_of(&cfg, &full), opts(reserve - 1))
        .err()
        .expect("budget below the blocks")
        .to_string();
    assert!(err.contains(&reserve.to_string()), "{err}");

    // a corrupt block page is named, never used; the good level still is
    let mut bad = model_bank(&cfg, &full, "hier3");
    let l2 = sections[1].first_page + 3;
    assert!(matches!(
        sections[1].spec.kind,
        memlayer_bank::SectionKind::FfnBlocks { .. }
    ));
    let entry = remote(bad.clone(), "x").entry(l2).expect("entry");
    bad[entry.offset as usize + 5] ^= 0x40;
    let memory = WebMemory::new(
        remote(bad, "corrupt.bank"),
        &cfg,
        &dense_of(&cfg, &full),
        opts(reserve),
    )
    .expect("memory");
    let mut decoder =
        WebDecoder::new(cfg.clone(), dense_of(&cfg, &full), Some(memory)).expect("decoder");
    decoder.reset(Some(&[0, 3])).expect("reset");
    let err = pollster::block_on(decoder.step(&[1, 2]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("mem://corrupt.bank") && err.contains(&format!("page {l2}")),
        "{err}"
    );
    decode_like_the_reference(&mut decoder, &cfg, &full, &[0, 2], "after a corrupt page");
}

#[test]
fn product_keys_and_blocks_together_on_the_device_equal_the_reference() {
    let Some(ctx) = gpu() else { return };
    let cfg = ModelConfig::tiny_for_tests(true, true);
    let full = ParamStore::init(&cfg, 8).expect("init");
    let bank = remote(model_bank(&cfg, &full, "both"), "both.bank");
    let budget = memlayer_bank::resident_bytes(bank.sections()) / 2;
    let opts = MemoryOptions {
        ctx: Some(ctx),
        budget_bytes: budget,
        prefetch: false,
    };
    let memory = WebMemory::new(bank, &cfg, &dense_of(&cfg, &full), opts).expect("memory");
    let mut decoder =
        WebDecoder::new(cfg.clone(), dense_of(&cfg, &full), Some(memory)).expect("decoder");
    decode_like_the_reference(&mut decoder, &cfg, &full, &[0, 3], "pkm + hier");
    let s = decoder.stats();
    assert!(s.value_accesses > 0 && s.block_requests > 0, "{s:?}");
    assert!(s.resident_bytes <= s.budget_bytes, "{s:?}");
}

/// A routing over `texts` for the tiny hierarchical model (TF-IDF of 32
/// dims, a 2 × 2 tree), and `checksums.json` of its files.
fn tiny_routing(texts: &[&str]) -> (memlayer_web::RoutingBytes, memlayer_model_dir::Checksums) {
    use memlayer_core::hier::cluster::{ClusterConfig, ClusterTree};
    let retriever = memlayer_model_dir::retriever::TfIdfRetriever::fit(texts, 32).expect("fit");
    let emb = retriever.embed_all(texts);
    let tree =
        ClusterTree::build(&emb, texts.len(), 32, &ClusterConfig::new(2, 2, 1)).expect("tree");
    let bytes = memlayer_web::RoutingBytes {
        retriever: retriever.to_json().expect("json").into_bytes(),
        tree: tree.to_safetensors().expect("tree"),
        context_index: None,
    };
    let mut sums = memlayer_model_dir::Checksums::new();
    sums.add_file("retriever.json", &bytes.retriever);
    sums.add_file("tree.safetensors", &bytes.tree);
    (bytes, sums)
}

#[test]
fn the_engine_routes_prompts_and_prefetches_the_typed_question() {
    let tok = Tokenizer::from_json(include_str!(
        "../../memlayer-runtime/tests/fixtures/tiny_tokenizer.json"
    ))
    .expect("tokenizer");
    let cfg = ModelConfig {
        vocab_size: tok.vocab_size(),
        ..hier_config()
    };
    let full = ParamStore::init(&cfg, 12).expect("init");
    let texts = [
        "The city where the river meets the sea",
        "A company that builds ships",
        "The river city was born",
        "Ships and companies employ people",
        "Where the sea is",
    ];
    let (routing_bytes, sums) = tiny_routing(&texts);
    let files = ModelFiles {
        location: "mem://hier".into(),
        config_json: serde_json::to_string(&cfg).expect("config"),
        tokenizer_json: tok.to_json().expect("tokenizer"),
        safetensors: dense_of(&cfg, &full)
            .to_safetensors(|_| true, None)
            .expect("safetensors"),
        routing: Some(routing_bytes.clone()),
    };
    let routing = files.routing(&cfg, &sums).expect("routing").expect("hier");
    let prompt = "The city where";
    let rows: Vec<usize> = routing
        .path(prompt)
        .expect("path")
        .into_iter()
        .map(|r| r as usize)
        .collect();
    let bank = remote(model_bank(&cfg, &full, "engine"), "engine.bank");
    let memory = MemorySetup {
        ctx: None,
        budget_bytes: memlayer_bank::resident_bytes(bank.sections()),
        bank,
        prefetch: true,
    };
    let mut engine = Engine::new(&files, Some(memory), Some(routing)).expect("engine");
    // typing the question fetches its blocks; the answer finds them resident
    assert_eq!(
        pollster::block_on(engine.prefetch(prompt)).expect("prefetch"),
        2
    );
    let sampling = Sampling {
        max_tokens: 8,
        ..Sampling::default()
    };
    let g = pollster::block_on(engine.generate(prompt, &sampling, None, &|| 0.0, |_, _| {}))
        .expect("generate");
    let s = engine.stats();
    assert_eq!(
        s.block_hits, s.block_requests,
        "every block was prefetched: {s:?}"
    );
    assert_eq!(s.pages_streamed, 2, "{s:?}");

    // the reference: the whole sequence each step with the prompt's route
    let v = cfg.vocab_size;
    let mut ids = tok.encode(prompt).expect("encode");
    let n0 = ids.len();
    let mut rng = memlayer_core::rng::Rng::new(0);
    for _ in 0..8 {
        let logits = reference::forward(&cfg, &full, &ids, Some(&rows)).expect("forward");
        let next = memlayer_core::sample::pick(&logits[logits.len() - v..], &sampling, &mut rng);
        if next == tok.eos_id() {
            break;
        }
        ids.push(next);
    }
    assert_eq!(g.tokens, ids[n0..], "engine vs resident reference");

    // routing files that do not match the model are refused by name
    let other = ModelConfig {
        hier: cfg
            .hier
            .clone()
            .map(|h| memlayer_core::model::HierSpec { branching: 3, ..h }),
        ..cfg.clone()
    };
    let err = files.routing(&other, &sums).unwrap_err().to_string();
    assert!(
        err.contains("tree.safetensors") && err.contains("branching 2"),
        "{err}"
    );
    let mut flipped = files.routing.clone().expect("bytes");
    flipped.tree[40] ^= 1;
    let err = ModelFiles {
        routing: Some(flipped),
        ..files
    }
    .routing(&cfg, &sums)
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("tree.safetensors") && err.contains("checksum"),
        "{err}"
    );
}
