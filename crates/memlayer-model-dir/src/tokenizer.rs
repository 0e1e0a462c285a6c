//! The model directory's tokenizer: HF `tokenizers` loaded from
//! `tokenizer.json` (trained by `memlayer-train`'s `train_bpe`, DESIGN §5).
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

use std::path::Path;
use std::str::FromStr;

use tokenizers as hf;

use crate::error::{ModelDirError as DataError, Result};
use crate::files::{read_utf8, write_atomic};

/// End of text: separates contexts in packed sequences (id 0 when trained
/// by `train_bpe`).
pub const EOS_TOKEN: &str = "<|endoftext|>";
/// Padding (id 1 when trained by `train_bpe` with the default specials).
pub const PAD_TOKEN: &str = "<|pad|>";

/// The special tokens `train_bpe` is usually given.
pub const DEFAULT_SPECIAL_TOKENS: [&str; 2] = [EOS_TOKEN, PAD_TOKEN];

fn tok_err(what: &str, e: impl std::fmt::Display) -> DataError {
    DataError::Tokenizer(format!("{what}: {e}"))
}

/// A byte-level BPE tokenizer with a known end-of-text id.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: hf::Tokenizer,
    eos_id: u32,
    pad_id: Option<u32>,
    vocab_size: usize,
}

impl Tokenizer {
    /// Wraps a HF tokenizer; it must have [`EOS_TOKEN`].
    pub fn from_hf(inner: hf::Tokenizer) -> std::result::Result<Self, String> {
        let eos_id = inner
            .token_to_id(EOS_TOKEN)
            .ok_or_else(|| format!("the tokenizer has no {EOS_TOKEN} token"))?;
        let pad_id = inner.token_to_id(PAD_TOKEN);
        // HF builds the whole vocabulary map to count it: count once
        let vocab_size = inner.get_vocab_size(true);
        Ok(Self {
            inner,
            eos_id,
            pad_id,
            vocab_size,
        })
    }

    /// Parses `tokenizer.json` text.
    pub fn from_json(json: &str) -> std::result::Result<Self, String> {
        let inner = hf::Tokenizer::from_str(json).map_err(|e| e.to_string())?;
        Self::from_hf(inner)
    }

    /// The `tokenizer.json` text (pretty-printed).
    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(true)
            .map_err(|e| tok_err("serialising", e))
    }

    /// Writes `tokenizer.json` to `path` atomically (temp file + rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        write_atomic(path, self.to_json()?.as_bytes())
    }

    /// Loads a `tokenizer.json`; errors name the path.
    pub fn load(path: &Path) -> Result<Self> {
        let json = read_utf8(path)?;
        Self::from_json(&json).map_err(|m| DataError::parse(path, m))
    }

    /// Token ids of `text` (special tokens written literally in `text` are
    /// matched).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| tok_err("encoding", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// [`Self::encode`] of many texts (in parallel), in order.
    pub fn encode_batch<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Result<Vec<Vec<u32>>> {
        let inputs: Vec<&str> = texts.iter().map(|s| s.as_ref()).collect();
        let encs = self
            .inner
            .encode_batch(inputs, false)
            .map_err(|e| tok_err("encoding", e))?;
        Ok(encs.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// The text of `ids`, special tokens included. Ids that cut a UTF-8
    /// character decode lossily (U+FFFD); unknown ids are an error.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let n = self.vocab_size();
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= n) {
            return Err(DataError::Tokenizer(format!(
                "decoding: id {bad} is outside the vocabulary of {n}"
            )));
        }
        self.inner
            .decode(ids, false)
            .map_err(|e| tok_err("decoding", e))
    }

    /// Number of ids, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Id of [`EOS_TOKEN`].
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Id of [`PAD_TOKEN`], if the tokenizer has it.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    /// Id of a token string.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Token string of an id (byte-level symbols, e.g. `Ġthe`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The underlying HF tokenizer.
    pub fn hf(&self) -> &hf::Tokenizer {
        &self.inner
    }
}
