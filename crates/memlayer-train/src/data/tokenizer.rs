//! Byte-level BPE tokenizer trained with HF `tokenizers` and saved as
//! `tokenizer.json` (DESIGN §5).
//!
//! The pipeline is GPT-2's: no normaliser, the `ByteLevel` pre-tokenizer
//! (GPT-2 split regex via `fancy-regex`, no prefix space) and the `ByteLevel`
//! decoder, a BPE model over the 256 byte symbols, no post-processor. Any
//! UTF-8 string therefore encodes without unknown tokens and decodes back to
//! itself. Special tokens ([`EOS_TOKEN`] always, plus the caller's) get the
//! first ids and are matched literally in encoded text.
//!
//! Training is deterministic: the same texts and vocabulary size give the
//! same `tokenizer.json`, byte for byte.

use tokenizers as hf;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::PostProcessorWrapper;

use super::{DataError, Result};
pub use memlayer_model_dir::tokenizer::{DEFAULT_SPECIAL_TOKENS, EOS_TOKEN, PAD_TOKEN, Tokenizer};

fn tok_err(what: &str, e: impl std::fmt::Display) -> DataError {
    DataError::Tokenizer(format!("{what}: {e}"))
}

/// Trains a byte-level BPE of `vocab_size` tokens (specials and the 256 byte
/// symbols included) on `texts`. [`EOS_TOKEN`] is always a special token
/// (added first if `special_tokens` lacks it); ids follow the order
/// `special_tokens` (after EOS if it was added), then bytes, then merges.
pub fn train_bpe<S: AsRef<str> + Sync>(
    texts: &[S],
    vocab_size: usize,
    special_tokens: &[&str],
) -> Result<Tokenizer> {
    let mut specials: Vec<&str> = Vec::new();
    if !special_tokens.contains(&EOS_TOKEN) {
        specials.push(EOS_TOKEN);
    }
    for &s in special_tokens {
        if s.is_empty() {
            return Err(DataError::Config("empty special token".into()));
        }
        if !specials.contains(&s) {
            specials.push(s);
        }
    }
    let alphabet: std::collections::HashSet<char> = ByteLevel::alphabet().into_iter().collect();
    let min = alphabet.len() + specials.len();
    if vocab_size < min || vocab_size > u32::MAX as usize {
        return Err(DataError::Config(format!(
            "vocab_size must be at least {min} (256 bytes + {} special tokens), got {vocab_size}",
            specials.len()
        )));
    }
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(0)
        .show_progress(false)
        .special_tokens(
            specials
                .iter()
                .map(|s| hf::AddedToken::from(s.to_string(), true))
                .collect(),
        )
        .initial_alphabet(alphabet)
        .build();
    let byte_level = ByteLevel::new(false, true, true);
    let mut tk: hf::TokenizerImpl<
        BPE,
        NormalizerWrapper,
        ByteLevel,
        PostProcessorWrapper,
        ByteLevel,
    > = hf::TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None)
        .with_pre_tokenizer(Some(byte_level))
        .with_post_processor(None)
        .with_decoder(Some(byte_level))
        .build()
        .map_err(|e| tok_err("building the pipeline", e))?;
    tk.train(&mut trainer, texts.iter().map(|s| s.as_ref()))
        .map_err(|e| tok_err("training BPE", e))?;
    Tokenizer::from_hf(hf::Tokenizer::from(tk)).map_err(DataError::Tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::facts::{FactsConfig, FactsDataset};

    fn small_corpus() -> Vec<String> {
        let ds = FactsDataset::generate(&FactsConfig {
            entities: 100,
            topics: 4,
            mentions: 1500,
            ..FactsConfig::tiny()
        })
        .unwrap();
        ds.contexts.into_iter().map(|c| c.text).collect()
    }

    #[test]
    fn round_trips_any_utf8() {
        let tk = train_bpe(&small_corpus(), 600, &DEFAULT_SPECIAL_TOKENS).unwrap();
        assert_eq!(tk.eos_id(), 0);
        assert_eq!(tk.pad_id(), Some(1));
        assert_eq!(tk.vocab_size(), 600);
        let samples = [
            "",
            " ",
            "  leading and trailing  ",
            "Hello, world!\n\tTabs\r\nand CRLF",
            "emoji 😀🦀👩‍👩‍👧 flags 🇫🇷",
            "Ελληνικά, русский, 日本語のテキスト, العربية, עברית, हिन्दी",
            "combining: e\u{301} vs é; zero-width\u{200b}joiner",
            "\u{0}\u{1}\u{7f} control",
            "numbers 1234567890 3.14159 -0.0",
            "special <|endoftext|> inside <|pad|> text",
            "The city where Zaima Drounth was born is Brevholm.",
        ];
        for s in samples {
            let ids = tk.encode(s).unwrap();
            assert_eq!(tk.decode(&ids).unwrap(), s, "{ids:?}");
        }
        // special tokens written in text map to their ids
        let ids = tk.encode("a<|endoftext|>b").unwrap();
        assert!(ids.contains(&tk.eos_id()));
        assert!(tk.decode(&[600]).is_err());
        // batch = one by one
        let batch = tk.encode_batch(&samples).unwrap();
        for (s, ids) in samples.iter().zip(&batch) {
            assert_eq!(&tk.encode(s).unwrap(), ids);
        }
        // random byte-valid strings
        let mut rng = memlayer_core::rng::Rng::new(5);
        for _ in 0..200 {
            let len = rng.below(40) as usize;
            let s: String = (0..len)
                .filter_map(|_| char::from_u32(rng.below(0x1_0000) as u32))
                .collect();
            assert_eq!(tk.decode(&tk.encode(&s).unwrap()).unwrap(), s);
        }
    }

    #[test]
    fn training_is_deterministic_and_save_load_is_identity() {
        let corpus = small_corpus();
        let a = train_bpe(&corpus, 700, &DEFAULT_SPECIAL_TOKENS).unwrap();
        let b = train_bpe(&corpus, 700, &DEFAULT_SPECIAL_TOKENS).unwrap();
        assert_eq!(a.to_json().unwrap(), b.to_json().unwrap());
        let dir = crate::data::test_dir("tokenizer");
        let path = dir.join("tokenizer.json");
        a.save(&path).unwrap();
        let c = Tokenizer::load(&path).unwrap();
        assert_eq!(c.to_json().unwrap(), a.to_json().unwrap());
        assert_eq!(c.eos_id(), a.eos_id());
        for text in corpus.iter().take(20) {
            assert_eq!(c.encode(text).unwrap(), a.encode(text).unwrap());
        }
        // errors name the path
        let err = Tokenizer::load(&dir.join("nope.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope.json"), "{err}");
        let bad = dir.join("bad.json");
        std::fs::write(&bad, "{\"not\": \"a tokenizer\"}").unwrap();
        let err = Tokenizer::load(&bad).unwrap_err().to_string();
        assert!(err.contains("bad.json"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn eos_is_always_present_and_bad_sizes_are_errors() {
        let corpus = small_corpus();
        let tk = train_bpe(&corpus, 300, &[]).unwrap();
        assert_eq!(tk.eos_id(), 0);
        assert_eq!(tk.pad_id(), None);
        let tk = train_bpe(&corpus, 300, &["<|sep|>", EOS_TOKEN]).unwrap();
        assert_eq!(tk.token_to_id("<|sep|>"), Some(0));
        assert_eq!(tk.eos_id(), 1);
        assert!(train_bpe(&corpus, 257, &DEFAULT_SPECIAL_TOKENS).is_err());
        assert!(train_bpe(&corpus, 300, &[""]).is_err());
    }

    #[test]
    fn fact_answers_are_few_tokens_and_split_cleanly() {
        let ds = FactsDataset::generate(&FactsConfig::tiny()).unwrap();
        let tk = train_bpe(&ds.texts(), 2048, &DEFAULT_SPECIAL_TOKENS).unwrap();
        // per value: short on average; the longest are values no topic
        // prefers (rare words such as " glassblowing")
        for attr in crate::data::facts::ATTRIBUTES {
            let vals = ds.attribute_values(attr).unwrap();
            let lens: Vec<usize> = vals
                .iter()
                .map(|v| tk.encode(&format!(" {v}")).unwrap().len())
                .collect();
            let mean = lens.iter().sum::<usize>() as f64 / lens.len() as f64;
            let max = *lens.iter().max().unwrap();
            assert!(max <= 8 && mean <= 2.5, "{attr}: mean {mean}, max {max}");
        }
        // per query: ~1.5 tokens
        let total: usize = ds
            .eval
            .iter()
            .map(|q| tk.encode(&q.continuation()).unwrap().len())
            .sum();
        let mean = total as f64 / ds.eval.len() as f64;
        assert!(mean <= 2.0, "mean answer tokens per query {mean}");
        // prompt and continuation tokenise independently: the prompt's ids
        // are a prefix of the full sentence's
        for q in ds.eval.iter().step_by(7) {
            let p = tk.encode(&q.prompt).unwrap();
            let c = tk.encode(&q.continuation()).unwrap();
            let full = tk
                .encode(&format!("{}{}", q.prompt, q.continuation()))
                .unwrap();
            assert_eq!([p, c].concat(), full, "{q:?}");
        }
    }
}
