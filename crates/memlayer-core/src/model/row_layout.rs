//! A value-row layout for locality: reorders the product-key memory's
//! second-half sub-keys, and the value rows with them, so that rows one token
//! reads together tend to share a bank page.
//!
//! Row `i1 * n_keys + i2` is addressed by first-half sub-key `i1` and
//! second-half sub-key `i2`, and a page holds `page_rows` consecutive rows:
//! the same `i1` and neighbouring `i2`. Renumbering the second-half sub-keys
//! by a permutation (in every memory layer and head, since the value table is
//! shared) and moving each value row `i1 * n + old` to `i1 * n + new` gives an
//! *equivalent model*: every sub-key keeps its vector, so every score is the
//! same bits and the same rows are read, only under other ids (candidate
//! order breaks exact ties by row id last, after the score and both sub-key
//! scores, so only a tie in all three could pick differently). The layout
//! thus lives in the weights: the bank's rows and the dense file's keys are
//! written together and sealed together by `checksums.json`; readers,
//! kernels and the bank format need nothing new.
//!
//! The order comes from co-access counts ([`CoAccess`]): for every token and
//! memory layer, the rows all heads read, grouped by `i1`; each pair of
//! second-half sub-keys read under one `i1` counts once. [`second_half_order`]
//! then groups sub-keys into pages by greedy heaviest-pair matching, doubling
//! the group size each round (pairs, then pairs of pairs, …) until a group
//! fills a page.

use std::collections::{BTreeSet, HashMap};

use super::config::ModelConfig;
use super::params::{ParamStore, VALUES, layer_name};
use crate::error::OracleError;

/// Co-access counts of second-half sub-keys (sparse, symmetric).
#[derive(Clone, Debug, Default)]
pub struct CoAccess {
    n_keys: usize,
    /// (a, b) with a < b → times a and b were read under one first-half sub-key
    pairs: HashMap<(u32, u32), u64>,
    /// token-layer reads recorded
    reads: u64,
}

impl CoAccess {
    /// No counts yet, for a memory of `n_keys²` rows.
    pub fn new(n_keys: usize) -> Self {
        Self {
            n_keys,
            ..Self::default()
        }
    }

    /// Sub-keys per half.
    pub fn n_keys(&self) -> usize {
        self.n_keys
    }

    /// Token-layer reads recorded so far.
    pub fn reads(&self) -> u64 {
        self.reads
    }

    /// Distinct sub-key pairs seen.
    pub fn pair_count(&self) -> usize {
        self.pairs.len()
    }

    /// Times sub-keys `a` and `b` were read under one first-half sub-key.
    pub fn count(&self, a: u32, b: u32) -> u64 {
        let key = (a.min(b), a.max(b));
        self.pairs.get(&key).copied().unwrap_or(0)
    }

    /// Records one token's read at one memory layer: `rows`, every head's
    /// selected row ids (heads * knn). A row id outside the table is an error.
    pub fn add_read(&mut self, rows: &[u32]) -> Result<(), OracleError> {
        let n = self.n_keys as u64;
        let mut by_first: Vec<(u32, u32)> = Vec::with_capacity(rows.len());
        for &r in rows {
            if u64::from(r) >= n * n {
                return Err(OracleError::IndexOutOfRange {
                    index: u64::from(r),
                    rows: self.n_keys * self.n_keys,
                });
            }
            by_first.push(((u64::from(r) / n) as u32, (u64::from(r) % n) as u32));
        }
        // a row read by two heads counts once
        by_first.sort_unstable();
        by_first.dedup();
        for group in by_first.chunk_by(|a, b| a.0 == b.0) {
            for (x, &(_, a)) in group.iter().enumerate() {
                for &(_, b) in &group[x + 1..] {
                    *self.pairs.entry((a.min(b), a.max(b))).or_insert(0) += 1;
                }
            }
        }
        self.reads += 1;
        Ok(())
    }
}

/// The second-half sub-key order for pages of `page_rows` rows:
/// `order[new] = old`, a permutation of `0..n_keys`. Deterministic for given
/// counts. Sub-keys never read together keep their relative order.
pub fn second_half_order(co: &CoAccess, page_rows: usize) -> Vec<u32> {
    let n = co.n_keys;
    // groups of old sub-key ids, each a run of the final order
    let mut groups: Vec<Vec<u32>> = (0..n as u32).map(|j| vec![j]).collect();
    let mut weights: HashMap<(u32, u32), u64> = co.pairs.clone();
    let mut size = 1usize;
    while size < page_rows && groups.len() > 1 {
        let mut edges: Vec<((u32, u32), u64)> = weights.iter().map(|(&k, &w)| (k, w)).collect();
        // heaviest first; ties by group ids, so the result does not depend
        // on the map's iteration order
        edges.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut partner: Vec<Option<u32>> = vec![None; groups.len()];
        for ((a, b), _) in edges {
            if partner[a as usize].is_none() && partner[b as usize].is_none() {
                partner[a as usize] = Some(b);
                partner[b as usize] = Some(a);
            }
        }
        // the rest pair up in id order (an odd one out stays alone)
        let alone: Vec<u32> = (0..groups.len() as u32)
            .filter(|&g| partner[g as usize].is_none())
            .collect();
        for pair in alone.chunks_exact(2) {
            partner[pair[0] as usize] = Some(pair[1]);
            partner[pair[1] as usize] = Some(pair[0]);
        }
        // new groups in the order of their first member's group id
        let mut new_id = vec![u32::MAX; groups.len()];
        let mut merged: Vec<Vec<u32>> = Vec::with_capacity(groups.len().div_ceil(2));
        for g in 0..groups.len() {
            if new_id[g] != u32::MAX {
                continue;
            }
            let id = merged.len() as u32;
            new_id[g] = id;
            let mut members = std::mem::take(&mut groups[g]);
            if let Some(p) = partner[g] {
                new_id[p as usize] = id;
                members.append(&mut groups[p as usize]);
            }
            merged.push(members);
        }
        let mut next: HashMap<(u32, u32), u64> = HashMap::with_capacity(weights.len());
        for ((a, b), w) in weights {
            let (x, y) = (new_id[a as usize], new_id[b as usize]);
            if x != y {
                *next.entry((x.min(y), x.max(y))).or_insert(0) += w;
            }
        }
        groups = merged;
        weights = next;
        size *= 2;
    }
    groups.concat()
}

/// Pages one token reads at one layer: the distinct pages of `rows` (every
/// head's row ids) for pages of `page_rows` rows.
pub fn distinct_pages(rows: &[u32], page_rows: usize) -> usize {
    let pages: BTreeSet<u32> = rows.iter().map(|&r| r / page_rows.max(1) as u32).collect();
    pages.len()
}

/// Row ids under `order` (`order[new] = old`): old row → new row, for a
/// memory of `n_keys²` rows. Returns the map `old_second → new_second`.
pub fn inverse_order(order: &[u32]) -> Result<Vec<u32>, OracleError> {
    let mut inv = vec![u32::MAX; order.len()];
    for (new, &old) in order.iter().enumerate() {
        let slot = inv
            .get_mut(old as usize)
            .ok_or(OracleError::IndexOutOfRange {
                index: u64::from(old),
                rows: order.len(),
            })?;
        if *slot != u32::MAX {
            return Err(OracleError::InvalidConfig(format!(
                "sub-key order names {old} twice: not a permutation"
            )));
        }
        *slot = new as u32;
    }
    Ok(inv)
}

/// Renumbers the second-half sub-keys of every memory layer and head of
/// `store` by `order` (`order[new] = old`, a permutation of `0..n_keys`) and
/// moves the shared value rows with them: the model computes the same
/// outputs, reading row `i1 * n + new` where it read `i1 * n + old`.
pub fn apply_second_half_order(
    cfg: &ModelConfig,
    store: &mut ParamStore,
    order: &[u32],
) -> Result<(), OracleError> {
    let Some(c) = cfg.pkm_config() else {
        return Err(OracleError::InvalidConfig(
            "the model has no product-key memory to lay out".into(),
        ));
    };
    let (n, half, v_dim) = (c.n_keys, c.half(), c.v_dim);
    if order.len() != n {
        return Err(OracleError::InvalidConfig(format!(
            "sub-key order of {} entries for {n} sub-keys",
            order.len()
        )));
    }
    inverse_order(order)?;
    let layers = cfg
        .pkm
        .as_ref()
        .map(|p| p.layers.clone())
        .unwrap_or_default();
    for layer in layers {
        let name = layer_name(layer, "memory.keys");
        let i = store
            .position(&name)
            .ok_or_else(|| OracleError::InvalidConfig(format!("no parameter {name}")))?;
        let keys = &mut store.params_mut()[i].data;
        if keys.len() != c.heads * 2 * n * half {
            return Err(OracleError::InvalidConfig(format!(
                "{name} has {} values, (heads, 2, n_keys, half) needs {}",
                keys.len(),
                c.heads * 2 * n * half
            )));
        }
        for h in 0..c.heads {
            // (n_keys, half): the second half of head h
            let second = &mut keys[(h * 2 + 1) * n * half..][..n * half];
            let old = second.to_vec();
            for (new, &o) in order.iter().enumerate() {
                second[new * half..(new + 1) * half]
                    .copy_from_slice(&old[o as usize * half..(o as usize + 1) * half]);
            }
        }
    }
    let i = store
        .position(VALUES)
        .ok_or_else(|| OracleError::InvalidConfig(format!("no parameter {VALUES}")))?;
    let values = &mut store.params_mut()[i].data;
    if values.len() != n * n * v_dim {
        return Err(OracleError::InvalidConfig(format!(
            "{VALUES} has {} values, (n_keys², v_dim) needs {}",
            values.len(),
            n * n * v_dim
        )));
    }
    // (n_keys, n_keys, v_dim): permute the middle axis, one first-half row at a time
    let mut scratch = vec![0.0f32; n * v_dim];
    for block in values.chunks_exact_mut(n * v_dim) {
        scratch.copy_from_slice(block);
        for (new, &o) in order.iter().enumerate() {
            block[new * v_dim..(new + 1) * v_dim]
                .copy_from_slice(&scratch[o as usize * v_dim..(o as usize + 1) * v_dim]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::reference;
    use crate::rng::Rng;

    fn co_from(n: usize, reads: &[&[u32]]) -> CoAccess {
        let mut co = CoAccess::new(n);
        for r in reads {
            co.add_read(r).unwrap();
        }
        co
    }

    fn is_permutation(order: &[u32], n: usize) -> bool {
        let mut seen = order.to_vec();
        seen.sort_unstable();
        seen == (0..n as u32).collect::<Vec<_>>()
    }

    #[test]
    fn counts_pairs_under_one_first_half_sub_key_once_per_read() {
        // n = 8: rows 1*8+2, 1*8+5 share i1 = 1; 3*8+2 is alone; row 13 twice (two heads)
        let co = co_from(8, &[&[10, 13, 26, 13]]);
        assert_eq!(co.count(2, 5), 1);
        assert_eq!(co.count(5, 2), 1);
        assert_eq!(co.count(2, 2), 0);
        assert_eq!(co.pair_count(), 1);
        assert_eq!(co.reads(), 1);
        let mut bad = CoAccess::new(8);
        assert!(matches!(
            bad.add_read(&[64]),
            Err(OracleError::IndexOutOfRange { index: 64, .. })
        ));
        // an empty read records nothing but the read
        bad.add_read(&[]).unwrap();
        assert_eq!((bad.reads(), bad.pair_count()), (1, 0));
    }

    #[test]
    fn pairs_read_together_share_a_page() {
        // sub-keys (0,5), (1,6), (2,7), (3,4) are read together; in id order
        // they would straddle pages of 2
        let n = 8;
        let reads: Vec<Vec<u32>> = [(0, 5), (1, 6), (2, 7), (3, 4)]
            .iter()
            .flat_map(|&(a, b)| (0..4u32).map(move |i| vec![i * 8 + a, i * 8 + b]))
            .collect();
        let refs: Vec<&[u32]> = reads.iter().map(|r| r.as_slice()).collect();
        let co = co_from(n, &refs);
        let order = second_half_order(&co, 2);
        assert!(is_permutation(&order, n));
        let inv = inverse_order(&order).unwrap();
        let relaid = |r: &[u32]| -> Vec<u32> {
            r.iter()
                .map(|&x| (x / 8) * 8 + inv[(x % 8) as usize])
                .collect()
        };
        for r in &reads {
            assert_eq!(distinct_pages(r, 2), 2, "before: {r:?}");
            assert_eq!(distinct_pages(&relaid(r), 2), 1, "after: {r:?}");
        }
    }

    #[test]
    fn orders_are_permutations_for_any_page_size_and_no_counts() {
        let mut rng = Rng::new(7);
        for n in [1usize, 2, 3, 7, 16, 33] {
            let mut co = CoAccess::new(n);
            for _ in 0..50 {
                let rows: Vec<u32> = (0..6)
                    .map(|_| (rng.next_u64() % (n * n) as u64) as u32)
                    .collect();
                co.add_read(&rows).unwrap();
            }
            for page_rows in [1usize, 2, 4, 5, 8, 64] {
                let order = second_half_order(&co, page_rows);
                assert!(is_permutation(&order, n), "n {n} page_rows {page_rows}");
                assert_eq!(order, second_half_order(&co, page_rows), "deterministic");
            }
            // no counts, or one row per page: the identity
            assert_eq!(
                second_half_order(&CoAccess::new(n), 4),
                (0..n as u32).collect::<Vec<_>>()
            );
            assert_eq!(second_half_order(&co, 1), (0..n as u32).collect::<Vec<_>>());
        }
    }

    #[test]
    fn groups_of_four_gather_a_clique() {
        // sub-keys {1, 6, 9, 14} always read together, page of 4 rows
        let n = 16;
        let reads: Vec<Vec<u32>> = (0..5u32)
            .map(|i| [1, 6, 9, 14].iter().map(|&j| i * 16 + j).collect())
            .collect();
        let refs: Vec<&[u32]> = reads.iter().map(|r| r.as_slice()).collect();
        let order = second_half_order(&co_from(n, &refs), 4);
        let pos = |j: u32| order.iter().position(|&o| o == j).unwrap() / 4;
        assert!([6, 9, 14].iter().all(|&j| pos(j) == pos(1)), "{order:?}");
    }

    #[test]
    fn bad_orders_are_named() {
        let cfg = ModelConfig::tiny_for_tests(true, false);
        let mut store = ParamStore::init(&cfg, 3).unwrap();
        let n = cfg.pkm_config().unwrap().n_keys;
        let short: Vec<u32> = (0..n as u32 - 1).collect();
        assert!(apply_second_half_order(&cfg, &mut store, &short).is_err());
        let mut twice: Vec<u32> = (0..n as u32).collect();
        twice[1] = 0;
        assert!(apply_second_half_order(&cfg, &mut store, &twice).is_err());
        let mut far: Vec<u32> = (0..n as u32).collect();
        far[0] = n as u32;
        assert!(apply_second_half_order(&cfg, &mut store, &far).is_err());
        let dense = ModelConfig::tiny_for_tests(false, false);
        let mut s = ParamStore::init(&dense, 3).unwrap();
        assert!(apply_second_half_order(&dense, &mut s, &[]).is_err());
    }

    /// The relaid model is the same model: identical logits (bit for bit)
    /// and the same rows read under their new ids.
    #[test]
    fn relaid_model_computes_the_same_logits_reading_renumbered_rows() {
        // two memory layers sharing the values, 11² rows
        let mut cfg = ModelConfig::tiny_for_tests(true, false);
        if let Some(p) = cfg.pkm.as_mut() {
            p.layers = vec![0, 2];
            p.n_keys = 11;
            p.knn = 4;
        }
        let store = ParamStore::init(&cfg, 11).unwrap();
        let n = cfg.pkm_config().unwrap().n_keys;
        let mut rng = Rng::new(5);
        let mut order: Vec<u32> = (0..n as u32).collect();
        rng.shuffle(&mut order);
        assert_ne!(order, (0..n as u32).collect::<Vec<_>>());
        let mut relaid = store.clone();
        apply_second_half_order(&cfg, &mut relaid, &order).unwrap();
        let inv = inverse_order(&order).unwrap();
        let tokens: Vec<u32> = (0..24)
            .map(|_| (rng.next_u64() % cfg.vocab_size as u64) as u32)
            .collect();
        let (mut before, mut after) = (Vec::new(), Vec::new());
        let (mut layers_a, mut layers_b) = (Vec::new(), Vec::new());
        let a = reference::forward_traced(&cfg, &store, &tokens, None, &mut |l, f| {
            layers_a.push(l);
            before.extend_from_slice(&f.indices)
        })
        .unwrap();
        let b = reference::forward_traced(&cfg, &relaid, &tokens, None, &mut |l, f| {
            layers_b.push(l);
            after.extend_from_slice(&f.indices)
        })
        .unwrap();
        assert_eq!(
            (layers_a.as_slice(), layers_b.as_slice()),
            (&[0, 2][..], &[0, 2][..])
        );
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a), bits(&b));
        assert!(!before.is_empty());
        let renumbered: Vec<u32> = before
            .iter()
            .map(|&r| (r / n as u32) * n as u32 + inv[(r % n as u32) as usize])
            .collect();
        assert_eq!(renumbered, after);
        assert_eq!(
            reference::forward(&cfg, &relaid, &tokens, None).unwrap(),
            b,
            "forward is forward_traced without a trace"
        );
    }
}
