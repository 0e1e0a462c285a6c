//! Real text: any UTF-8 file cut into contexts (DESIGN §5).
//!
//! [`contexts_from_text`]:
//! 1. Line endings are normalised (`\r\n` → `\n`). A **paragraph** is a
//!    maximal run of non-blank lines (a blank line holds only whitespace);
//!    its lines are kept, joined by `\n`, and it is trimmed.
//! 2. A paragraph longer than `target_chars` characters (Unicode scalar
//!    values) is split into pieces of at most `target_chars`, each cut at the
//!    last whitespace inside the window, or exactly at the limit if the
//!    window has none; whitespace at the cuts is dropped.
//! 3. Consecutive pieces are merged greedily, joined by a blank line
//!    (`\n\n`), while the result stays within `target_chars`.
//!
//! So every context has between 1 and `target_chars` characters, contexts
//! follow the file's order, and no non-whitespace character is lost or
//! reordered. Real-text contexts have `topic: None` and no entity ids.
//!
//! Compressed dictionaries (dictd's `.dict.dz`) must be decompressed first
//! (`zcat`/`dictunzip`); this module reads plain UTF-8 only.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{Context, DataError, Result, read_utf8};

/// How a text file is cut into contexts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CorpusConfig {
    /// Maximum characters per context (>= 1); paragraphs are merged up to it.
    pub target_chars: usize,
}

impl Default for CorpusConfig {
    /// 1 000 characters: a few hundred tokens, a handful of paragraphs.
    fn default() -> Self {
        Self { target_chars: 1000 }
    }
}

/// Reads a whole UTF-8 text file; errors name the path (missing, unreadable
/// or not UTF-8 with the offset of the first bad byte).
pub fn load_text(path: &Path) -> Result<String> {
    read_utf8(path)
}

/// Reads `path` and cuts it into contexts ([`contexts_from_text`]). A file
/// with no text is an error naming it.
pub fn load_contexts(path: &Path, config: &CorpusConfig) -> Result<Vec<Context>> {
    let text = load_text(path)?;
    let contexts = contexts_from_text(&text, config.target_chars)?;
    if contexts.is_empty() {
        return Err(DataError::parse(path, "the file holds no text"));
    }
    Ok(contexts)
}

/// Cuts `text` into contexts of at most `target_chars` characters (see the
/// module docs). Empty or all-whitespace text gives no contexts.
pub fn contexts_from_text(text: &str, target_chars: usize) -> Result<Vec<Context>> {
    if target_chars == 0 {
        return Err(DataError::Config("target_chars must be >= 1".into()));
    }
    let text = text.replace("\r\n", "\n");
    let mut pieces: Vec<String> = Vec::new();
    let mut para: Vec<&str> = Vec::new();
    let flush = |para: &mut Vec<&str>, pieces: &mut Vec<String>| {
        if !para.is_empty() {
            split_long(para.join("\n").trim(), target_chars, pieces);
            para.clear();
        }
    };
    for line in text.split('\n') {
        if line.trim().is_empty() {
            flush(&mut para, &mut pieces);
        } else {
            para.push(line);
        }
    }
    flush(&mut para, &mut pieces);

    let mut out = Vec::new();
    let mut cur = String::new();
    let mut cur_chars = 0usize;
    for p in pieces {
        let n = p.chars().count();
        if !cur.is_empty() && cur_chars + 2 + n <= target_chars {
            cur.push_str("\n\n");
            cur.push_str(&p);
            cur_chars += 2 + n;
        } else {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            cur = p;
            cur_chars = n;
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    Ok(out
        .into_iter()
        .map(|text| Context {
            text,
            topic: None,
            entity_ids: Vec::new(),
        })
        .collect())
}

/// Splits a trimmed paragraph into pieces of at most `target` characters.
fn split_long(p: &str, target: usize, out: &mut Vec<String>) {
    let mut rest = p;
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            return;
        }
        let Some((limit, next)) = rest.char_indices().nth(target) else {
            out.push(rest.trim_end().to_string());
            return;
        };
        let cut = if next.is_whitespace() {
            limit
        } else {
            match rest[..limit]
                .char_indices()
                .rev()
                .find(|c| c.1.is_whitespace())
            {
                Some((i, _)) if i > 0 => i,
                _ => limit,
            }
        };
        let piece = rest[..cut].trim_end();
        if !piece.is_empty() {
            out.push(piece.to_string());
        }
        rest = &rest[cut..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(t: &str, target: usize) -> Vec<String> {
        contexts_from_text(t, target)
            .unwrap()
            .into_iter()
            .map(|c| c.text)
            .collect()
    }

    fn non_ws(s: &str) -> String {
        s.chars().filter(|c| !c.is_whitespace()).collect()
    }

    #[test]
    fn paragraphs_merge_up_to_target() {
        let t = "alpha beta\ngamma\n\n  \n\ndelta\r\n\r\nepsilon zeta eta\n";
        assert_eq!(
            texts(t, 1000),
            vec!["alpha beta\ngamma\n\ndelta\n\nepsilon zeta eta"]
        );
        assert_eq!(
            texts(t, 20),
            vec!["alpha beta\ngamma", "delta", "epsilon zeta eta"]
        );
        assert_eq!(
            texts(t, 23),
            vec!["alpha beta\ngamma\n\ndelta", "epsilon zeta eta"]
        );
        assert!(texts("", 10).is_empty());
        assert!(texts(" \n\n\t\n", 10).is_empty());
        assert!(contexts_from_text("x", 0).is_err());
    }

    #[test]
    fn long_paragraphs_split_at_whitespace_or_hard() {
        assert_eq!(texts("aaaa bbbb cccc", 9), vec!["aaaa bbbb", "cccc"]);
        assert_eq!(texts("aaaa bbbb cccc", 7), vec!["aaaa", "bbbb", "cccc"]);
        assert_eq!(texts("abcdefghij", 4), vec!["abcd", "efgh", "ij"]);
        // multi-byte characters are counted as characters and never cut
        assert_eq!(texts("éééé 😀😀😀", 4), vec!["éééé", "😀😀😀"]);
        assert_eq!(
            texts("日本語のテキスト", 3),
            vec!["日本語", "のテキ", "スト"]
        );
    }

    #[test]
    fn nothing_lost_and_within_target() {
        let mut s = String::new();
        let words = [
            "lorem", "ipsum", "dolor", "sit", "amet", "naïve", "東京", "🦀",
        ];
        let mut rng = memlayer_core::rng::Rng::new(3);
        for _ in 0..3000 {
            s.push_str(words[rng.below(words.len() as u64) as usize]);
            s.push_str(match rng.below(12) {
                0 => "\n\n",
                1 => "\n",
                2 => "",
                _ => " ",
            });
        }
        for target in [1, 7, 50, 333, 5000] {
            let cs = contexts_from_text(&s, target).unwrap();
            for c in &cs {
                let n = c.text.chars().count();
                assert!((1..=target).contains(&n), "{n} > {target}");
                assert_eq!(c.text.trim(), c.text);
                assert_eq!(c.topic, None);
            }
            let joined: String = cs.iter().map(|c| non_ws(&c.text)).collect();
            assert_eq!(joined, non_ws(&s), "target {target}");
        }
    }

    #[test]
    fn file_errors_name_the_path() {
        let dir = crate::data::test_dir("corpus");
        let missing = dir.join("missing.txt");
        let err = load_contexts(&missing, &CorpusConfig::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.txt"), "{err}");
        let bin = dir.join("binary.dat");
        std::fs::write(&bin, [0x66, 0x6f, 0xff, 0xfe]).unwrap();
        let err = load_contexts(&bin, &CorpusConfig::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("binary.dat") && err.contains("UTF-8"), "{err}");
        let empty = dir.join("empty.txt");
        std::fs::write(&empty, "\n \n").unwrap();
        let err = load_contexts(&empty, &CorpusConfig::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("empty.txt") && err.contains("no text"),
            "{err}"
        );
        let good = dir.join("good.txt");
        std::fs::write(&good, "one\n\ntwo\n").unwrap();
        let cs = load_contexts(&good, &CorpusConfig { target_chars: 3 }).unwrap();
        assert_eq!(cs.len(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
