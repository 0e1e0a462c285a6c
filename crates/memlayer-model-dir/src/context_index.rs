//! Nearest-training-context routing for the hierarchical memory
//! ([`memlayer_core::model::HierRouting::NearestContext`]).
//!
//! Exact-vocabulary TF-IDF over the training contexts: a text's terms are
//! its lowercased words and word bigrams (the tokenisation of
//! [`super::retriever`], without hashing, so a rare name keeps its own
//! inverse document frequency). A training context `c` has the L2-normalised
//! vector `x_c[t] = (1 + ln tf) · idf_t`, `idf_t = ln((1 + N)/(1 + df_t)) + 1`.
//! A prompt is weighted the same way over the terms the index knows (an
//! unseen term says nothing about where its fact was trained) and routed to
//! the training path of the context with the largest dot product (ties: the
//! lower context). With no known term there is no nearest context and the
//! caller falls back to tree descent.
//!
//! Stored as `context_index.json`: terms sorted, postings per term in
//! compressed-sparse-row form, each context's training path.

use crate::error::{ModelDirError as DataError, Result};
use crate::files::{read_utf8, write_atomic};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Format name stored in a saved index.
pub const CONTEXT_INDEX_FORMAT: &str = "memlayer-context-index";

/// Inverted index of the training contexts, with their tree paths.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContextIndex {
    format: String,
    version: u32,
    /// Tree depth (path length).
    levels: usize,
    /// Number of contexts.
    contexts: usize,
    /// Sorted terms.
    terms: Vec<String>,
    /// (terms) inverse document frequency.
    idf: Vec<f32>,
    /// (terms + 1) start of each term's postings.
    offsets: Vec<u32>,
    /// (postings) context of each posting, ascending within a term.
    posting_context: Vec<u32>,
    /// (postings) the context vector's weight of the term.
    posting_weight: Vec<f32>,
    /// (contexts, levels) training path of each context.
    paths: Vec<u32>,
}

/// Term counts of `text`: lowercased alphanumeric words and bigrams
/// (`"a b"`).
fn term_counts(text: &str) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    let mut prev: Option<String> = None;
    for w in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        let w = w.to_lowercase();
        if let Some(p) = &prev {
            *out.entry(format!("{p} {w}")).or_default() += 1;
        }
        *out.entry(w.clone()).or_default() += 1;
        prev = Some(w);
    }
    out
}

impl ContextIndex {
    /// Indexes `texts` whose training paths are `paths` (row-major
    /// `(texts, levels)`).
    pub fn build<S: AsRef<str>>(texts: &[S], paths: &[u32], levels: usize) -> Result<Self> {
        if levels == 0 || paths.len() != texts.len() * levels {
            return Err(DataError::Config(format!(
                "context index: {} path entries for {} texts of {levels} levels",
                paths.len(),
                texts.len()
            )));
        }
        let counts: Vec<BTreeMap<String, u32>> =
            texts.iter().map(|t| term_counts(t.as_ref())).collect();
        let mut df: BTreeMap<&str, u32> = BTreeMap::new();
        for c in &counts {
            for t in c.keys() {
                *df.entry(t.as_str()).or_default() += 1;
            }
        }
        let n = texts.len() as f64;
        let terms: Vec<String> = df.keys().map(|t| t.to_string()).collect();
        let idf: Vec<f32> = df
            .values()
            .map(|&d| (((1.0 + n) / (1.0 + f64::from(d))).ln() + 1.0) as f32)
            .collect();
        let id: BTreeMap<&str, usize> = terms
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_str(), i))
            .collect();
        // per term, (context, weight) in ascending context order
        let mut postings: Vec<Vec<(u32, f32)>> = vec![Vec::new(); terms.len()];
        for (ci, c) in counts.iter().enumerate() {
            let w: Vec<(usize, f64)> = c
                .iter()
                .map(|(t, &tf)| {
                    let i = id[t.as_str()];
                    (i, (1.0 + f64::from(tf).ln()) * f64::from(idf[i]))
                })
                .collect();
            let norm = w.iter().map(|(_, x)| x * x).sum::<f64>().sqrt();
            if norm > 0.0 {
                for (i, x) in w {
                    postings[i].push((ci as u32, (x / norm) as f32));
                }
            }
        }
        let mut offsets = Vec::with_capacity(terms.len() + 1);
        let (mut posting_context, mut posting_weight) = (Vec::new(), Vec::new());
        offsets.push(0u32);
        for p in postings {
            for (c, w) in p {
                posting_context.push(c);
                posting_weight.push(w);
            }
            offsets.push(posting_context.len() as u32);
        }
        Ok(Self {
            format: CONTEXT_INDEX_FORMAT.into(),
            version: 1,
            levels,
            contexts: texts.len(),
            terms,
            idf,
            offsets,
            posting_context,
            posting_weight,
            paths: paths.to_vec(),
        })
    }

    /// Number of indexed contexts.
    pub fn len(&self) -> usize {
        self.contexts
    }

    /// Whether no context is indexed.
    pub fn is_empty(&self) -> bool {
        self.contexts == 0
    }

    /// The most similar indexed context of `text` and its score, or `None`
    /// when `text` shares no term with any context.
    pub fn nearest(&self, text: &str) -> Option<(usize, f32)> {
        let mut scores = vec![0.0f64; self.contexts];
        let mut any = false;
        for (t, tf) in term_counts(text) {
            let Ok(i) = self.terms.binary_search(&t) else {
                continue;
            };
            any = true;
            let q = (1.0 + f64::from(tf).ln()) * f64::from(self.idf[i]);
            let (a, b) = (self.offsets[i] as usize, self.offsets[i + 1] as usize);
            for p in a..b {
                scores[self.posting_context[p] as usize] += q * f64::from(self.posting_weight[p]);
            }
        }
        if !any {
            return None;
        }
        // first maximum: ties go to the lower context
        let mut best = (0usize, f64::NEG_INFINITY);
        for (c, &s) in scores.iter().enumerate() {
            if s > best.1 {
                best = (c, s);
            }
        }
        (best.1 > 0.0).then_some((best.0, best.1 as f32))
    }

    /// Training path of indexed context `c`: (levels).
    pub fn context_path(&self, c: usize) -> Option<&[u32]> {
        self.paths.get(c * self.levels..(c + 1) * self.levels)
    }

    /// The path of the nearest context of `text`, if any term is shared.
    pub fn path(&self, text: &str) -> Option<Vec<u32>> {
        let (c, _) = self.nearest(text)?;
        self.context_path(c).map(<[u32]>::to_vec)
    }

    /// Parses and validates a saved index.
    pub fn from_json(json: &str) -> std::result::Result<Self, String> {
        let r: Self = serde_json::from_str(json).map_err(|e| e.to_string())?;
        if r.format != CONTEXT_INDEX_FORMAT || r.version != 1 {
            return Err(format!(
                "format {:?} version {}, expected {CONTEXT_INDEX_FORMAT:?} version 1",
                r.format, r.version
            ));
        }
        let postings = r.posting_context.len();
        let ok = r.levels > 0
            && r.idf.len() == r.terms.len()
            && r.offsets.len() == r.terms.len() + 1
            && r.offsets.first() == Some(&0)
            && r.offsets.windows(2).all(|w| w[0] <= w[1])
            && r.offsets.last().map(|&x| x as usize) == Some(postings)
            && r.posting_weight.len() == postings
            && r.paths.len() == r.contexts * r.levels
            && r.posting_context.iter().all(|&c| (c as usize) < r.contexts)
            && r.terms.windows(2).all(|w| w[0] < w[1]);
        if !ok {
            return Err("inconsistent index (lengths, offsets, term order or context ids)".into());
        }
        Ok(r)
    }

    /// Writes the index as JSON, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_string(self).map_err(|e| DataError::Config(e.to_string()))?;
        write_atomic(path, json.as_bytes())
    }

    /// Loads an index written by [`Self::save`]; errors name the path.
    pub fn load(path: &Path) -> Result<Self> {
        let json = read_utf8(path)?;
        Self::from_json(&json).map_err(|m| DataError::parse(path, m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute_force(texts: &[&str], query: &str) -> Option<usize> {
        // dense exact-vocabulary TF-IDF, cosine, first maximum
        let counts: Vec<_> = texts.iter().map(|t| term_counts(t)).collect();
        let n = texts.len() as f64;
        let idf = |t: &str| {
            let d = counts.iter().filter(|c| c.contains_key(t)).count() as f64;
            ((1.0 + n) / (1.0 + d)).ln() + 1.0
        };
        let vec_of = |c: &BTreeMap<String, u32>, known: bool| -> BTreeMap<String, f64> {
            c.iter()
                .filter(|(t, _)| !known || counts.iter().any(|x| x.contains_key(t.as_str())))
                .map(|(t, &tf)| (t.clone(), (1.0 + f64::from(tf).ln()) * idf(t)))
                .collect()
        };
        let q = vec_of(&term_counts(query), true);
        if q.is_empty() {
            return None;
        }
        let mut best = (None, 0.0);
        for (i, c) in counts.iter().enumerate() {
            let v = vec_of(c, false);
            let norm = v.values().map(|x| x * x).sum::<f64>().sqrt();
            let s: f64 = q
                .iter()
                .map(|(t, w)| w * v.get(t).unwrap_or(&0.0))
                .sum::<f64>()
                / norm;
            if s > best.1 + 1e-12 {
                best = (Some(i), s);
            }
        }
        best.0
    }

    #[test]
    fn nearest_context_equals_brute_force_and_rare_names_win() {
        let texts = [
            "Staime Ribrom was born in Staivaport. Desei Thaijond works in astronomy.",
            "Desei Thaijond works for Touzo Foundry. The weather was fine.",
            "Mira Olt was born in 1953. Mira Olt works in chemistry.",
            "The company that employs many people is large.",
            "",
        ];
        let paths: Vec<u32> = (0..texts.len() as u32).flat_map(|i| [i % 2, i]).collect();
        let idx = ContextIndex::build(&texts, &paths, 2).unwrap();
        assert_eq!(idx.len(), 5);
        for q in [
            "The company that employs Desei Thaijond is",
            "The city where Staime Ribrom was born is",
            "The year in which Mira Olt was born is",
            "the weather",
            "The company that employs",
        ] {
            let got = idx.nearest(q).map(|x| x.0);
            assert_eq!(got, brute_force(&texts, q), "{q}");
        }
        // words no context has say nothing; the name decides
        assert_eq!(idx.nearest("Where does Staime Ribrom live?").unwrap().0, 0);
        assert_eq!(idx.path("Mira Olt").unwrap(), vec![0, 2]);
        // nothing known: no nearest context
        assert!(idx.nearest("zzz qqq").is_none());
        assert!(idx.nearest("").is_none());
    }

    #[test]
    fn round_trips_and_rejects_corruption() {
        let texts = ["a b c", "b c d", "d e"];
        let idx = ContextIndex::build(&texts, &[0, 1, 2], 1).unwrap();
        let dir = std::env::temp_dir().join(format!("memlayer-ctxidx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("context_index.json");
        idx.save(&p).unwrap();
        assert_eq!(ContextIndex::load(&p).unwrap(), idx);
        let json = std::fs::read_to_string(&p).unwrap();
        let bad = json.replace("\"levels\":1", "\"levels\":2");
        std::fs::write(&p, bad).unwrap();
        let e = ContextIndex::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("context_index.json") && e.contains("inconsistent"),
            "{e}"
        );
        assert!(ContextIndex::build(&texts, &[0, 1], 1).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
