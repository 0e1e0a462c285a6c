//! Packing tokenised contexts into fixed-length training sequences.
//!
//! # Streams and windows
//! Contexts are concatenated into a **stream**, each context's tokens
//! followed by EOS (contexts with no tokens are skipped). A stream of `S`
//! tokens gives `w = (S - 1) / seq_len` sequences (integer division; none if
//! `S < seq_len + 1`); sequence `k` is `stream[k·seq_len .. k·seq_len +
//! seq_len + 1]`, so consecutive sequences overlap by one token and every
//! stream token after the first is a target exactly once (inputs
//! `seq[..seq_len]`, targets `seq[1..]`). The last `S - (w·seq_len + 1)`
//! tokens (all `S` when `w = 0`) fit in no full sequence and are **dropped**;
//! [`PackedSequences::dropped_tokens`] counts them.
//!
//! # Plain and clustered
//! - [`pack_plain`] (dense / PKM models): one stream of all contexts in the
//!   given order.
//! - [`pack_clustered`] (hierarchical memory): one stream per distinct
//!   cluster path, holding that path's contexts in the given order; streams
//!   are taken in ascending (lexicographic) path order. Every sequence lies
//!   inside one stream and so has **one** path (the memory fetches one block
//!   per level per sequence); the tail of every stream is dropped.
//!   [`pack_with_tree`] takes the paths of a [`ClusterTree`]'s training
//!   points (its balanced assignments).
//!
//! # Order
//! [`PackedSequences::epoch_order`] is a permutation that is a pure function
//! of `(seed, epoch)`, and [`PackedSequences::batch_at`] of `(seed, step)`:
//! a trainer resumed at step `s` sees exactly the batches it would have seen.

use std::collections::BTreeMap;

use memlayer_core::hier::ClusterTree;
use memlayer_core::rng::Rng;

use super::{DataError, Result};

/// Fixed-length training sequences and their cluster paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedSequences {
    /// Tokens per input; every row holds `seq_len + 1` tokens.
    pub seq_len: usize,
    /// Path length per sequence; 0 when unclustered.
    pub levels: usize,
    /// (n_seq, seq_len + 1) token ids.
    pub tokens: Vec<u32>,
    /// (n_seq, levels) cluster node id per level (empty when unclustered).
    pub paths: Vec<u32>,
    /// Tokens of all streams, EOS included.
    pub stream_tokens: usize,
    /// Stream-tail tokens that fit in no full sequence.
    pub dropped_tokens: usize,
}

fn check_seq_len(seq_len: usize) -> Result<()> {
    if seq_len == 0 {
        return Err(DataError::Config("seq_len must be >= 1".into()));
    }
    Ok(())
}

/// Appends the windows of one stream to `out`; returns the dropped tokens.
fn cut_stream(stream: &[u32], seq_len: usize, path: &[u32], out: &mut PackedSequences) -> usize {
    if stream.len() < seq_len + 1 {
        return stream.len();
    }
    let w = (stream.len() - 1) / seq_len;
    for k in 0..w {
        out.tokens
            .extend_from_slice(&stream[k * seq_len..k * seq_len + seq_len + 1]);
        out.paths.extend_from_slice(path);
    }
    stream.len() - (w * seq_len + 1)
}

/// Builds the stream of `ids` (contexts' tokens, each followed by `eos`).
fn stream_of<'a>(contexts: impl Iterator<Item = &'a [u32]>, eos: u32) -> Vec<u32> {
    let mut s = Vec::new();
    for c in contexts.filter(|c| !c.is_empty()) {
        s.extend_from_slice(c);
        s.push(eos);
    }
    s
}

/// Packs all contexts into one stream (see the module docs).
pub fn pack_plain<C: AsRef<[u32]>>(
    contexts: &[C],
    seq_len: usize,
    eos: u32,
) -> Result<PackedSequences> {
    check_seq_len(seq_len)?;
    let stream = stream_of(contexts.iter().map(|c| c.as_ref()), eos);
    let mut out = PackedSequences::empty(seq_len, 0);
    out.stream_tokens = stream.len();
    out.dropped_tokens = cut_stream(&stream, seq_len, &[], &mut out);
    Ok(out)
}

/// Packs contexts per cluster path: `paths` is (contexts.len(), levels), the
/// path of each context (see the module docs).
pub fn pack_clustered<C: AsRef<[u32]>>(
    contexts: &[C],
    paths: &[u32],
    levels: usize,
    seq_len: usize,
    eos: u32,
) -> Result<PackedSequences> {
    check_seq_len(seq_len)?;
    if levels == 0 {
        return Err(DataError::Config("levels must be >= 1".into()));
    }
    if Some(paths.len()) != contexts.len().checked_mul(levels) {
        return Err(DataError::Config(format!(
            "paths has {} entries, expected {} contexts x {levels} levels",
            paths.len(),
            contexts.len()
        )));
    }
    let mut groups: BTreeMap<&[u32], Vec<usize>> = BTreeMap::new();
    for (i, p) in paths.chunks_exact(levels).enumerate() {
        groups.entry(p).or_default().push(i);
    }
    let mut out = PackedSequences::empty(seq_len, levels);
    for (path, members) in groups {
        let stream = stream_of(members.iter().map(|&i| contexts[i].as_ref()), eos);
        out.stream_tokens += stream.len();
        out.dropped_tokens += cut_stream(&stream, seq_len, path, &mut out);
    }
    Ok(out)
}

/// [`pack_clustered`] with the training paths of `tree`, which must have been
/// built over exactly these contexts (same count, same order).
pub fn pack_with_tree<C: AsRef<[u32]>>(
    contexts: &[C],
    tree: &ClusterTree,
    seq_len: usize,
    eos: u32,
) -> Result<PackedSequences> {
    if tree.num_points() != contexts.len() {
        return Err(DataError::Config(format!(
            "the cluster tree was built over {} points but there are {} contexts",
            tree.num_points(),
            contexts.len()
        )));
    }
    pack_clustered(contexts, tree.train_paths(), tree.levels(), seq_len, eos)
}

/// Mixes a seed and an epoch into one generator seed.
fn epoch_seed(seed: u64, epoch: u64) -> u64 {
    let mut z = seed ^ epoch.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z ^ (z >> 27)
}

impl PackedSequences {
    fn empty(seq_len: usize, levels: usize) -> Self {
        Self {
            seq_len,
            levels,
            tokens: Vec::new(),
            paths: Vec::new(),
            stream_tokens: 0,
            dropped_tokens: 0,
        }
    }

    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.tokens.len() / (self.seq_len + 1)
    }

    /// Whether there is no sequence.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Whether sequences carry cluster paths.
    pub fn is_clustered(&self) -> bool {
        self.levels > 0
    }

    /// Row `i`: `seq_len + 1` tokens. Panics if `i >= len()`.
    pub fn sequence(&self, i: usize) -> &[u32] {
        let r = self.seq_len + 1;
        &self.tokens[i * r..(i + 1) * r]
    }

    /// Inputs of row `i`: its first `seq_len` tokens.
    pub fn inputs(&self, i: usize) -> &[u32] {
        &self.sequence(i)[..self.seq_len]
    }

    /// Targets of row `i`: its last `seq_len` tokens.
    pub fn targets(&self, i: usize) -> &[u32] {
        &self.sequence(i)[1..]
    }

    /// Path of row `i` (empty when unclustered). Panics if `i >= len()`.
    pub fn path(&self, i: usize) -> &[u32] {
        &self.paths[i * self.levels..(i + 1) * self.levels]
    }

    /// The order of the sequences in `epoch`: a permutation of `0..len()`
    /// that depends only on `(seed, epoch)`.
    pub fn epoch_order(&self, seed: u64, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len()).collect();
        Rng::new(epoch_seed(seed, epoch)).shuffle(&mut order);
        order
    }

    /// Full batches per epoch; the last `len() % batch_size` sequences of
    /// each epoch's order are skipped (a different set every epoch).
    pub fn batches_per_epoch(&self, batch_size: usize) -> usize {
        self.len().checked_div(batch_size).unwrap_or(0)
    }

    /// The batches of `epoch`: [`Self::batches_per_epoch`] lists of
    /// `batch_size` sequence indices.
    pub fn batches(&self, seed: u64, epoch: u64, batch_size: usize) -> Vec<Vec<usize>> {
        if batch_size == 0 {
            return Vec::new();
        }
        let n = self.batches_per_epoch(batch_size);
        let order = self.epoch_order(seed, epoch);
        order
            .chunks_exact(batch_size)
            .take(n)
            .map(<[usize]>::to_vec)
            .collect()
    }

    /// The batch of global step `step` (0-based; epoch `step /
    /// batches_per_epoch`). Errors if not even one full batch fits.
    pub fn batch_at(&self, seed: u64, step: u64, batch_size: usize) -> Result<Vec<usize>> {
        let per = self.check_batch(batch_size)? as u64;
        let (epoch, b) = (step / per, (step % per) as usize);
        let order = self.epoch_order(seed, epoch);
        Ok(order[b * batch_size..(b + 1) * batch_size].to_vec())
    }

    /// Batches from global step `start` on, forever: yields `(step, batch)`
    /// equal to `(step, batch_at(seed, step, batch_size))`, computing each
    /// epoch's order once.
    pub fn batches_from(&self, seed: u64, batch_size: usize, start: u64) -> Result<BatchIter<'_>> {
        self.check_batch(batch_size)?;
        Ok(BatchIter {
            data: self,
            seed,
            batch_size,
            step: start,
            epoch: None,
            order: Vec::new(),
        })
    }

    fn check_batch(&self, batch_size: usize) -> Result<usize> {
        let per = self.batches_per_epoch(batch_size);
        if per == 0 {
            return Err(DataError::Config(format!(
                "batch size {batch_size} does not fit the {} packed sequences",
                self.len()
            )));
        }
        Ok(per)
    }
}

/// Iterator of [`PackedSequences::batches_from`].
#[derive(Debug, Clone)]
pub struct BatchIter<'a> {
    data: &'a PackedSequences,
    seed: u64,
    batch_size: usize,
    step: u64,
    epoch: Option<u64>,
    order: Vec<usize>,
}

impl Iterator for BatchIter<'_> {
    type Item = (u64, Vec<usize>);

    fn next(&mut self) -> Option<Self::Item> {
        let per = self.data.batches_per_epoch(self.batch_size) as u64;
        let (epoch, b) = (self.step / per, (self.step % per) as usize);
        if self.epoch != Some(epoch) {
            self.order = self.data.epoch_order(self.seed, epoch);
            self.epoch = Some(epoch);
        }
        let bs = self.batch_size;
        let batch = self.order[b * bs..(b + 1) * bs].to_vec();
        let step = self.step;
        self.step += 1;
        Some((step, batch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memlayer_core::hier::ClusterConfig;

    const EOS: u32 = 0;

    /// `n` contexts of random lengths 0..40 with tokens `1000 * group + k`;
    /// context `i` is in group `i % groups`.
    fn contexts(n: usize, groups: usize, seed: u64) -> (Vec<Vec<u32>>, Vec<usize>) {
        let mut rng = Rng::new(seed);
        let mut cs = Vec::new();
        let mut g = Vec::new();
        for i in 0..n {
            let grp = i % groups;
            let len = rng.below(40) as usize;
            cs.push(
                (0..len)
                    .map(|_| 1000 * grp as u32 + 1 + rng.below(999) as u32)
                    .collect(),
            );
            g.push(grp);
        }
        (cs, g)
    }

    /// Rebuilds the covered prefix of each stream from the windows.
    fn unwindow(p: &PackedSequences, rows: &[usize]) -> Vec<u32> {
        let mut s = Vec::new();
        for (k, &r) in rows.iter().enumerate() {
            let seq = p.sequence(r);
            if k == 0 {
                s.extend_from_slice(seq);
            } else {
                assert_eq!(s.last(), Some(&seq[0]), "windows overlap by one token");
                s.extend_from_slice(&seq[1..]);
            }
        }
        s
    }

    #[test]
    fn plain_packing_loses_only_the_tail() {
        let (cs, _) = contexts(50, 1, 1);
        for seq_len in [1, 7, 64, 5000] {
            let p = pack_plain(&cs, seq_len, EOS).unwrap();
            let stream = stream_of(cs.iter().map(|c| c.as_slice()), EOS);
            assert_eq!(p.stream_tokens, stream.len());
            assert_eq!(p.tokens.len(), p.len() * (seq_len + 1));
            assert!(p.paths.is_empty() && !p.is_clustered());
            let rows: Vec<usize> = (0..p.len()).collect();
            let covered = unwindow(&p, &rows);
            assert_eq!(&stream[..covered.len()], covered.as_slice());
            assert_eq!(covered.len() + p.dropped_tokens, stream.len());
            assert!(p.dropped_tokens <= seq_len, "{}", p.dropped_tokens);
            if !p.is_empty() {
                assert_eq!(p.inputs(0), &p.sequence(0)[..seq_len]);
                assert_eq!(p.targets(0), &p.sequence(0)[1..]);
            }
        }
        // every context ends with EOS in the stream; empty ones are skipped
        let p = pack_plain(&[vec![5, 6], vec![], vec![7]], 2, EOS).unwrap();
        assert_eq!(p.tokens, vec![5, 6, 0, 0, 7, 0]);
        assert_eq!((p.stream_tokens, p.dropped_tokens), (5, 0));
        let p = pack_plain(&[vec![5, 6, 7]], 2, EOS).unwrap();
        assert_eq!(p.tokens, vec![5, 6, 7]);
        assert_eq!((p.stream_tokens, p.dropped_tokens), (4, 1));
        assert!(pack_plain(&[vec![1u32]], 0, EOS).is_err());
    }

    #[test]
    fn clustered_packing_keeps_one_path_per_sequence() {
        let (cs, groups) = contexts(300, 5, 2);
        // a 2-level path determined by the group
        let levels = 2;
        let paths: Vec<u32> = groups
            .iter()
            .flat_map(|&g| [g as u32 / 2, 10 + g as u32])
            .collect();
        let seq_len = 16;
        let p = pack_clustered(&cs, &paths, levels, seq_len, EOS).unwrap();
        assert_eq!(p.paths.len(), p.len() * levels);
        let mut total_stream = 0;
        for g in 0..5u32 {
            let want = [g / 2, 10 + g];
            let rows: Vec<usize> = (0..p.len()).filter(|&i| p.path(i) == want).collect();
            // every non-EOS token of a sequence comes from its path's group
            for &r in &rows {
                for &t in p.sequence(r) {
                    assert!(t == EOS || t / 1000 == g, "token {t} in group {g}");
                }
            }
            // rows of a group are consecutive and rebuild its stream
            let members = (0..cs.len()).filter(|&i| groups[i] == g as usize);
            let stream = stream_of(members.map(|i| cs[i].as_slice()), EOS);
            total_stream += stream.len();
            let covered = unwindow(&p, &rows);
            assert_eq!(&stream[..covered.len()], covered.as_slice());
            assert!(stream.len() - covered.len() <= seq_len);
        }
        assert_eq!(p.stream_tokens, total_stream);
        let kept = p.len() * seq_len + 5; // +1 leading token per stream
        assert_eq!(kept + p.dropped_tokens, total_stream);
        // paths ascend
        assert!((1..p.len()).all(|i| p.path(i - 1) <= p.path(i)));
        assert!(pack_clustered(&cs, &paths[1..], levels, seq_len, EOS).is_err());
        assert!(pack_clustered(&cs, &[], 0, seq_len, EOS).is_err());
    }

    #[test]
    fn packing_with_a_cluster_tree() {
        let (cs, groups) = contexts(200, 4, 3);
        let e = 8;
        let mut rng = Rng::new(9);
        let emb: Vec<f32> = groups
            .iter()
            .flat_map(|&g| {
                let mut v = rng.normal_vec(e, 0.0, 0.05);
                v[g] += 1.0;
                v
            })
            .collect();
        let tree = ClusterTree::build(&emb, cs.len(), e, &ClusterConfig::new(2, 4, 1)).unwrap();
        let p = pack_with_tree(&cs, &tree, 8, EOS).unwrap();
        assert_eq!(p.levels, 2);
        // one group per level-1 cluster here, so tokens of a sequence share a group
        for i in 0..p.len() {
            let gs: std::collections::HashSet<u32> = p
                .sequence(i)
                .iter()
                .filter(|&&t| t != EOS)
                .map(|t| t / 1000)
                .collect();
            assert!(gs.len() <= 1, "row {i}: {gs:?}");
        }
        assert!(pack_with_tree(&cs[1..], &tree, 8, EOS).is_err());
    }

    #[test]
    fn batch_order_is_a_pure_function_of_seed_and_step() {
        let (cs, _) = contexts(400, 1, 4);
        let p = pack_plain(&cs, 8, EOS).unwrap();
        let n = p.len();
        assert!(n > 100);
        let bs = 16;
        let per = p.batches_per_epoch(bs);
        assert_eq!(per, n / bs);
        let e0 = p.batches(7, 0, bs);
        assert_eq!(e0.len(), per);
        assert_eq!(e0, p.batches(7, 0, bs));
        assert_ne!(e0, p.batches(7, 1, bs));
        assert_ne!(e0, p.batches(8, 0, bs));
        let mut seen: Vec<usize> = e0.concat();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), per * bs, "no sequence twice in an epoch");
        let mut order = p.epoch_order(7, 3);
        order.sort_unstable();
        assert_eq!(order, (0..n).collect::<Vec<_>>());
        // resuming at any step gives the same batches
        let e1 = p.batches(7, 1, bs);
        for step in [0, 1, per as u64 - 1, per as u64, per as u64 + 2] {
            let want = if step < per as u64 {
                &e0[step as usize]
            } else {
                &e1[step as usize - per]
            };
            assert_eq!(&p.batch_at(7, step, bs).unwrap(), want);
        }
        let from: Vec<(u64, Vec<usize>)> =
            p.batches_from(7, bs, 3).unwrap().take(2 * per).collect();
        for (step, b) in from {
            assert_eq!(b, p.batch_at(7, step, bs).unwrap());
        }
        assert!(p.batch_at(7, 0, n + 1).is_err());
        assert!(p.batches_from(7, 0, 0).is_err());
        assert!(p.batches(7, 0, 0).is_empty());
    }

    /// The whole data path on the tiny facts world: tokenizer, retriever,
    /// cluster tree, packing.
    #[test]
    fn facts_end_to_end() {
        use crate::data::facts::{FactsConfig, FactsDataset};
        use crate::data::retriever::TfIdfRetriever;
        use crate::data::tokenizer::{DEFAULT_SPECIAL_TOKENS, train_bpe};
        let ds = FactsDataset::generate(&FactsConfig::tiny()).unwrap();
        let texts = ds.texts();
        let tk = train_bpe(&texts, 1024, &DEFAULT_SPECIAL_TOKENS).unwrap();
        let ids = tk.encode_batch(&texts).unwrap();
        let r = TfIdfRetriever::fit(&texts, 256).unwrap();
        let emb = r.embed_all(&texts);
        let tree =
            ClusterTree::build(&emb, texts.len(), 256, &ClusterConfig::new(2, 4, 0)).unwrap();
        let seq_len = 128;
        let p = pack_with_tree(&ids, &tree, seq_len, tk.eos_id()).unwrap();
        let plain = pack_plain(&ids, seq_len, tk.eos_id()).unwrap();
        assert_eq!(p.stream_tokens, plain.stream_tokens);
        // at most one tail per leaf (16 leaves) is dropped
        assert!(p.dropped_tokens <= 16 * seq_len);
        assert!(p.len() >= plain.len() - 16);
        // leaves are mostly topic-pure (chance would be ~1/8 per leaf)
        let mut pure = 0;
        for leaf in 0..16u32 {
            let mut counts = vec![0usize; ds.config.topics];
            for (i, ctx) in ds.contexts.iter().enumerate() {
                if tree.train_path(i).unwrap()[1] == leaf {
                    counts[ctx.topic.unwrap() as usize] += 1;
                }
            }
            pure += counts.iter().max().unwrap();
        }
        let purity = pure as f64 / ds.contexts.len() as f64;
        assert!(purity > 0.6, "leaf majority-topic share {purity}");
        let total: usize = ids.iter().map(|c| c.len() + 1).sum();
        println!(
            "tiny facts: {} contexts, {total} tokens (vocab 1024), {} sequences of {seq_len}, {} dropped, leaf purity {purity:.3}",
            texts.len(),
            p.len(),
            p.dropped_tokens
        );
    }
}
