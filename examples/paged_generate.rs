//! paged_generate: stream a model's answer while its memory is paged in under a budget.
//!
//! A model directory holds the dense weights and a memory bank far larger than what a
//! phone or a browser tab should hold. Here the bank stays where it is (the directory's
//! `memory.bank`, or any http(s) URL of it, read with Range requests); a quarter of it
//! may be resident; the pages each token's lookups choose are fetched, checked and
//! evicted on demand. The text is the same as with the whole memory loaded.
//!
//! ```sh
//! cargo run --release --example paged_generate                      # models/demo-pkm
//! memlayer serve models/demo-pkm --port 8080 &
//! cargo run --release --example paged_generate -- models/demo-pkm http://127.0.0.1:8080/model/memory.bank
//! ```

use memlayer_bank::PageSource;
use memlayer_runtime::paged::PagedOptions;
use memlayer_runtime::{Budget, Sampling, open_paged};
use std::path::Path;

type Error = Box<dyn std::error::Error>;

fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().unwrap_or_else(|| "models/demo-pkm".into());
    let text = run(Path::new(&dir), args.next().as_deref(), |piece| {
        print!("{piece}")
    })?;
    println!("\n({} characters)", text.len());
    Ok(())
}

/// Generates after a fact question with `dir`'s memory paged from `bank_url` (or the
/// directory's bank) under a 25 % budget, streaming pieces to `on_piece`; returns the text.
pub fn run(
    dir: &Path,
    bank_url: Option<&str>,
    mut on_piece: impl FnMut(&str),
) -> Result<String, Error> {
    // 1. Where pages come from: `None` is the directory's own file (positioned reads).
    let source: Option<Box<dyn PageSource>> = match bank_url {
        Some(url) => Some(Box::new(memlayer_http::HttpSource::open(url)?)),
        None => None,
    };
    // 2. How much may be resident (25 % of the bank's f32 size), fetches in flight.
    let mut opts = PagedOptions::host(Budget::percent(25.0)?);
    opts.fetch_threads = if bank_url.is_some() { 8 } else { 1 };
    // 3. The model: checked against checksums.json, dense weights on burn's CPU backend.
    let device = burn::tensor::Device::flex();
    let ops = memlayer_model::MemoryOps::best_for(&device);
    let (mut generator, memory) = open_paged(dir, source, opts, &device, ops)?;
    // 4. Greedy decoding, each decoded piece streamed as it comes.
    let sampling = Sampling {
        max_tokens: 16,
        ..Sampling::default()
    };
    let prompt = "The company that employs Zovom Tudeind is";
    on_piece(prompt);
    let g = generator.generate(prompt, &sampling, Some("."), |piece, _| on_piece(piece))?;
    if let Some(m) = memory {
        let s = m.stats();
        on_piece(&format!(
            "\n[{:.1} tok/s, hit rate {:.0} %, {} pages streamed, {} of {} bytes resident]",
            g.decode_tokens_per_second(),
            100.0 * s.hit_rate(),
            s.pages_streamed,
            m.resident_bytes(),
            m.bank_bytes()
        ));
    }
    Ok(g.text)
}
