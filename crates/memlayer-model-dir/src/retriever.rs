//! The default offline retriever (DESIGN §2): hashed n-gram TF-IDF.
//!
//! A text's features are its lowercased words (maximal runs of alphanumeric
//! characters) and its word bigrams, each hashed (FNV-1a 64, bigrams with a
//! distinct prefix byte so they never collide textually with unigrams) into
//! one of `dim` buckets. For a text with bucket counts `tf_j`, the embedding
//! is
//!
//! ```text
//! x_j = (1 + ln tf_j) · idf_j     for tf_j > 0, else 0
//! idf_j = ln((1 + N) / (1 + df_j)) + 1
//! ```
//!
//! L2-normalised (norm in f64; a text without words embeds to zeros), where
//! `df_j` is the number of the `N` fitting texts that have bucket `j`. The
//! embedding only depends on the text and the fitted IDF, so the same
//! retriever embeds training contexts and prompts alike; it runs anywhere
//! (no model, no network) and is deterministic.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{ModelDirError as DataError, Result};
use crate::files::{read_utf8, write_atomic};

/// Format name stored in a saved retriever.
pub const RETRIEVER_FORMAT: &str = "memlayer-tfidf-retriever";

/// Hashed unigram + bigram TF-IDF embedder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TfIdfRetriever {
    format: String,
    version: u32,
    dim: usize,
    /// Number of texts the IDF was fitted on.
    docs: usize,
    /// (dim) inverse document frequency of each bucket.
    idf: Vec<f32>,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// Calls `f` with the bucket of every unigram and bigram of `text`.
fn for_each_feature(text: &str, dim: usize, mut f: impl FnMut(usize)) {
    let mut prev: Option<String> = None;
    for w in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        let w = w.to_lowercase();
        f((fnv(fnv(FNV_OFFSET, b"u"), w.as_bytes()) % dim as u64) as usize);
        if let Some(p) = &prev {
            let h = fnv(fnv(fnv(FNV_OFFSET, b"b"), p.as_bytes()), b" ");
            f((fnv(h, w.as_bytes()) % dim as u64) as usize);
        }
        prev = Some(w);
    }
}

/// Bucket counts of `text`.
fn counts(text: &str, dim: usize) -> Vec<u32> {
    let mut c = vec![0u32; dim];
    for_each_feature(text, dim, |j| c[j] = c[j].saturating_add(1));
    c
}

impl TfIdfRetriever {
    /// Fits the IDF on `texts` (typically the training contexts).
    pub fn fit<S: AsRef<str>>(texts: &[S], dim: usize) -> Result<Self> {
        if dim == 0 || dim > 1 << 24 {
            return Err(DataError::Config(format!(
                "retriever dim must be in 1..=16777216, got {dim}"
            )));
        }
        let mut df = vec![0u64; dim];
        for t in texts {
            for (d, &c) in df.iter_mut().zip(&counts(t.as_ref(), dim)) {
                if c > 0 {
                    *d += 1;
                }
            }
        }
        let n = texts.len() as f64;
        let idf = df
            .iter()
            .map(|&d| (((1.0 + n) / (1.0 + d as f64)).ln() + 1.0) as f32)
            .collect();
        Ok(Self {
            format: RETRIEVER_FORMAT.into(),
            version: 1,
            dim,
            docs: texts.len(),
            idf,
        })
    }

    /// Embedding dim.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of texts the IDF was fitted on.
    pub fn num_docs(&self) -> usize {
        self.docs
    }

    /// The L2-normalised embedding of `text` (dim).
    pub fn embed(&self, text: &str) -> Vec<f32> {
        let c = counts(text, self.dim);
        let x: Vec<f64> = c
            .iter()
            .zip(&self.idf)
            .map(|(&tf, &idf)| {
                if tf > 0 {
                    (1.0 + (tf as f64).ln()) * idf as f64
                } else {
                    0.0
                }
            })
            .collect();
        let norm = x.iter().map(|v| v * v).sum::<f64>().sqrt();
        x.iter()
            .map(|&v| if norm > 0.0 { (v / norm) as f32 } else { 0.0 })
            .collect()
    }

    /// Embeddings of many texts, row-major (n, dim) — the input of
    /// `ClusterTree::build`.
    pub fn embed_all<S: AsRef<str>>(&self, texts: &[S]) -> Vec<f32> {
        let mut out = Vec::with_capacity(texts.len() * self.dim);
        for t in texts {
            out.extend(self.embed(t.as_ref()));
        }
        out
    }

    /// The retriever as JSON.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string(self).map_err(|e| DataError::Config(e.to_string()))
    }

    /// Parses and validates [`Self::to_json`] output.
    pub fn from_json(json: &str) -> std::result::Result<Self, String> {
        let r: Self = serde_json::from_str(json).map_err(|e| e.to_string())?;
        if r.format != RETRIEVER_FORMAT {
            return Err(format!(
                "format is {:?}, expected {RETRIEVER_FORMAT:?}",
                r.format
            ));
        }
        if r.version != 1 {
            return Err(format!("unsupported version {}", r.version));
        }
        if r.dim == 0 || r.idf.len() != r.dim {
            return Err(format!("idf has {} values for dim {}", r.idf.len(), r.dim));
        }
        if let Some(i) = r.idf.iter().position(|v| !v.is_finite() || *v <= 0.0) {
            return Err(format!(
                "idf[{i}] = {} is not positive and finite",
                r.idf[i]
            ));
        }
        Ok(r)
    }

    /// Writes the retriever as JSON, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        write_atomic(path, self.to_json()?.as_bytes())
    }

    /// Loads a retriever written by [`Self::save`]; errors name the path.
    pub fn load(path: &Path) -> Result<Self> {
        let json = read_utf8(path)?;
        Self::from_json(&json).map_err(|m| DataError::parse(path, m))
    }
}

/// Cosine of two L2-normalised embeddings.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embeddings_are_normalised_and_deterministic() {
        let texts = ["the cat sat", "the dog sat down", "a bird flew", ""];
        let r = TfIdfRetriever::fit(&texts, 64).unwrap();
        for t in &texts[..3] {
            let e = r.embed(t);
            let n: f32 = e.iter().map(|v| v * v).sum();
            assert!((n - 1.0).abs() < 1e-5);
            assert!(e.iter().all(|v| *v >= 0.0));
            assert_eq!(e, r.embed(t));
        }
        assert!(r.embed("").iter().all(|&v| v == 0.0));
        assert!(r.embed("!!! ...").iter().all(|&v| v == 0.0));
        // case and punctuation do not matter; word order does (bigrams)
        assert_eq!(r.embed("The CAT, sat."), r.embed("the cat sat"));
        assert_ne!(r.embed("sat cat the"), r.embed("the cat sat"));
        assert_eq!(r.embed_all(&texts).len(), 4 * 64);
        assert!(TfIdfRetriever::fit(&texts, 0).is_err());
        // a shared word gives a positive cosine; an unseen word is its own direction
        let q = r.embed("bird");
        assert!(cosine(&q, &r.embed("a bird flew")) > 0.0);
        assert_eq!(cosine(&r.embed("zebra"), &r.embed("zebra")), 1.0);
    }

    #[test]
    fn save_load_round_trip_and_validation() {
        let r = TfIdfRetriever::fit(&["one two", "two three", "three four five"], 32).unwrap();
        let dir = crate::files::test_dir("retriever");
        let p = dir.join("retriever.json");
        r.save(&p).unwrap();
        let back = TfIdfRetriever::load(&p).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.embed("two three"), r.embed("two three"));
        let mut v: serde_json::Value = serde_json::from_str(&r.to_json().unwrap()).unwrap();
        v["idf"][3] = serde_json::json!(-1.0);
        std::fs::write(&p, v.to_string()).unwrap();
        let err = TfIdfRetriever::load(&p).unwrap_err().to_string();
        assert!(
            err.contains("retriever.json") && err.contains("idf[3]"),
            "{err}"
        );
        v["idf"] = serde_json::json!([1.0]);
        std::fs::write(&p, v.to_string()).unwrap();
        assert!(TfIdfRetriever::load(&p).is_err());
        let err = TfIdfRetriever::load(&dir.join("absent.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("absent.json"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
