//! The burn model and its memory ops against the CPU oracle
//! (`memlayer_core::model::reference`, `memlayer_core::bag`, `memlayer_core::pkm`),
//! on burn's Flex backend, portable and native ops.

mod common;

use burn::tensor::{Device, Int, Tensor, TensorData};
use memlayer_core::bag;
use memlayer_core::model::params::{ParamGroup, VALUES};
use memlayer_core::model::{HierSpec, ModelConfig, ParamStore, PkmSpec, reference};
use memlayer_core::rng::Rng;
use memlayer_model::{KvCache, MemoryOps, Model};

fn cfg(pkm: bool, hier: bool, qk_norm: bool, gated: bool) -> ModelConfig {
    ModelConfig {
        vocab_size: 41,
        dim: 16,
        n_layers: 3,
        n_heads: 2,
        ffn_hidden: 24,
        max_seq_len: 16,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
        tie_embeddings: !pkm,
        pkm: pkm.then(|| PkmSpec {
            layers: vec![1],
            n_keys: 6,
            heads: 2,
            k_dim: 8,
            knn: 4,
            v_dim: 12,
            qk_norm,
            gated,
        }),
        hier: hier.then(|| HierSpec {
            levels: 2,
            branching: 2,
            units: vec![4, 3],
            generic: true,
            routing: Default::default(),
        }),
    }
}

/// A store whose blocks are not no-ops (fresh blocks have down = 0, which
/// would hide errors in the block path).
fn store(cfg: &ModelConfig, seed: u64) -> ParamStore {
    let mut s = ParamStore::init(cfg, seed).unwrap();
    let mut rng = Rng::new(seed ^ 0xabc);
    for p in s.params_mut() {
        if p.group == ParamGroup::MemoryBlocks {
            for v in p.data.iter_mut() {
                *v = rng.normal() * 0.3;
            }
        }
    }
    s
}

fn tokens(cfg: &ModelConfig, n: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| rng.below(cfg.vocab_size as u64) as u32)
        .collect()
}

fn to_vec(t: Tensor<3>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{what}[{i}]: {x} vs {y}"
        );
    }
}

const VARIANTS: [(bool, bool, bool, bool); 5] = [
    (false, false, false, false),
    (true, false, false, false),
    (true, false, true, true),
    (false, true, false, false),
    (true, true, true, false),
];

#[test]
fn forward_equals_reference_for_every_variant_and_ops() {
    let device = Device::flex();
    for (p, h, qk, g) in VARIANTS {
        let cfg = cfg(p, h, qk, g);
        let s = store(&cfg, 7);
        let (b, t) = (2, 9);
        let toks = tokens(&cfg, b * t, 3);
        let rows: Vec<usize> = vec![0, 3, 1, 4]; // (b, levels): seq 1 uses the generic level-2 row 4
        let block_rows = h.then_some(rows.as_slice());
        for ops in [MemoryOps::Portable, MemoryOps::Native] {
            let m = Model::new(&cfg, &s, &device, ops, false).unwrap();
            let f = m
                .forward(m.tokens(&toks, b).unwrap(), block_rows, None)
                .unwrap();
            let got = to_vec(f.logits);
            for seq in 0..b {
                let want = reference::forward(
                    &cfg,
                    &s,
                    &toks[seq * t..(seq + 1) * t],
                    block_rows.map(|r| &r[seq * 2..seq * 2 + 2]),
                )
                .unwrap();
                close(
                    &got[seq * t * cfg.vocab_size..(seq + 1) * t * cfg.vocab_size],
                    &want,
                    2e-4,
                    &format!("pkm {p} hier {h} qk {qk} gated {g} {ops:?} seq {seq}"),
                );
            }
            if p {
                assert_eq!(f.reads.value_rows.len(), 1);
                assert_eq!(f.reads.value_rows[0].len(), b * t * 2 * 4);
            }
            if h {
                assert_eq!(f.reads.block_rows, vec![vec![0, 1], vec![3, 4]]);
            }
        }
    }
}

#[test]
fn loss_equals_reference_and_kv_cache_decoding_equals_full_forward() {
    let device = Device::flex();
    let cfg = cfg(true, true, true, true);
    let s = store(&cfg, 11);
    let toks = tokens(&cfg, 10, 5);
    let rows = [1usize, 2];
    let m = Model::new(&cfg, &s, &device, MemoryOps::Native, false).unwrap();
    let (loss, _) = m.loss(&toks, 1, Some(&rows)).unwrap();
    let want = reference::loss(&cfg, &s, &toks, Some(&rows)).unwrap();
    let got = loss.into_data().iter::<f32>().next().unwrap();
    assert!((got - want).abs() < 1e-4, "{got} vs {want}");

    let full = to_vec(
        m.forward(m.tokens(&toks, 1).unwrap(), Some(&rows), None)
            .unwrap()
            .logits,
    );
    let mut cache = KvCache::new();
    let mut inc = Vec::new();
    // a 4-token prompt, then one token at a time
    for (start, len) in [(0, 4), (4, 1), (5, 1), (6, 3), (9, 1)] {
        let step = m.tokens(&toks[start..start + len], 1).unwrap();
        inc.extend(to_vec(
            m.forward(step, Some(&rows), Some(&mut cache))
                .unwrap()
                .logits,
        ));
    }
    assert_eq!(cache.len, 10);
    close(&inc, &full, 1e-4, "kv-cache decoding");
    let err = m
        .forward(
            m.tokens(&toks[..7], 1).unwrap(),
            Some(&rows),
            Some(&mut cache),
        )
        .unwrap_err();
    assert!(err.to_string().contains("max_seq_len"), "{err}");
}

/// Gradients of the loss: native ops == portable ops, and both match central
/// finite differences of the reference loss (f64 of an f32 oracle: a loose
/// relative tolerance on coordinates with a clear signal).
#[test]
fn gradients_match_between_ops_and_finite_differences() {
    let device = Device::flex().autodiff();
    let cfg = cfg(true, true, true, true);
    let s = store(&cfg, 13);
    let (b, t1) = (2, 7);
    let toks = tokens(&cfg, b * t1, 9);
    let rows = [0usize, 2, 1, 4];
    let mut per_ops = Vec::new();
    for ops in [MemoryOps::Portable, MemoryOps::Native] {
        let m = Model::new(&cfg, &s, &device, ops, true).unwrap();
        let (loss, _) = m.loss(&toks, b, Some(&rows)).unwrap();
        let grads = loss.backward();
        per_ops.push(m.grads(&grads));
    }
    for (i, p) in s.params().iter().enumerate() {
        let (a, n) = (&per_ops[0][i], &per_ops[1][i]);
        match (a, n) {
            (Some(a), Some(n)) => close(n, a, 1e-4, &format!("native vs portable {}", p.name)),
            (None, None) => {}
            _ => panic!("{}: gradient presence differs", p.name),
        }
    }
    // finite differences on the reference loss (mean over the two sequences)
    let ref_loss = |s: &ParamStore| -> f64 {
        (0..b)
            .map(|q| {
                reference::loss(
                    &cfg,
                    s,
                    &toks[q * t1..(q + 1) * t1],
                    Some(&rows[q * 2..q * 2 + 2]),
                )
                .unwrap() as f64
            })
            .sum::<f64>()
            / b as f64
    };
    let flex = Device::flex();
    let reads = |s: &ParamStore| {
        let m = Model::new(&cfg, s, &flex, MemoryOps::Native, false).unwrap();
        m.loss(&toks, b, Some(&rows)).unwrap().1
    };
    let base_reads = reads(&s);
    let mut rng = Rng::new(1);
    let mut checked = 0;
    let mut skipped = 0;
    for (i, p) in s.params().iter().enumerate() {
        let g = per_ops[1][i]
            .clone()
            .unwrap_or_else(|| vec![0.0; p.data.len()]);
        // the coordinate with the largest gradient and two random ones
        let mut coords = vec![
            g.iter()
                .enumerate()
                .max_by(|x, y| x.1.abs().total_cmp(&y.1.abs()))
                .map_or(0, |(j, _)| j),
        ];
        for _ in 0..2 {
            coords.push(rng.below(p.data.len() as u64) as usize);
        }
        for j in coords {
            let eps = 2e-3f32;
            let mut plus = s.clone();
            plus.params_mut()[i].data[j] += eps;
            let mut minus = s.clone();
            minus.params_mut()[i].data[j] -= eps;
            // Selection is piecewise constant: a finite difference across a
            // change of the selected rows is not a derivative; skip those.
            if reads(&plus) != base_reads || reads(&minus) != base_reads {
                skipped += 1;
                continue;
            }
            let fd = (ref_loss(&plus) - ref_loss(&minus)) / (2.0 * eps as f64);
            if fd.abs() < 1e-3 && g[j].abs() < 1e-3 {
                continue;
            }
            let err = (fd - g[j] as f64).abs() / fd.abs().max(g[j].abs() as f64);
            assert!(
                err < 0.05,
                "{}[{j}]: autodiff {} vs finite difference {fd}",
                p.name,
                g[j]
            );
            checked += 1;
        }
    }
    assert!(
        skipped * 4 < checked,
        "{skipped} skipped vs {checked} checked"
    );
    assert!(checked > 30, "only {checked} coordinates had a signal");
}

#[test]
fn embedding_bag_ops_equal_oracle_forward_and_backward() {
    let device = Device::flex().autodiff();
    let mut rng = Rng::new(3);
    // N = 7*7 (not a power of two), repeated rows inside a bag, a hot row
    let (rows, v_dim, bags, bag_size) = (49, 5, 6, 8);
    let table = rng.normal_vec(rows * v_dim, 0.0, 1.0);
    let mut idx: Vec<u32> = (0..bags * bag_size)
        .map(|_| rng.below(rows as u64) as u32)
        .collect();
    idx[..4].copy_from_slice(&[3, 3, 3, 3]);
    let w = rng.normal_vec(bags * bag_size, 0.0, 1.0);
    let g_out = rng.normal_vec(bags * v_dim, 0.0, 1.0);
    let offsets = bag::uniform_offsets(bags, bag_size);
    let want = bag::bag_forward(&table, rows, v_dim, &idx, &w, &offsets).unwrap();
    let want_dv = bag::bag_backward_table(rows, v_dim, &idx, &w, &offsets, &g_out).unwrap();
    let want_dw = bag::bag_backward_weights(&table, rows, v_dim, &idx, &offsets, &g_out).unwrap();
    for ops in [MemoryOps::Portable, MemoryOps::Native] {
        let values = Tensor::<2>::from_data(TensorData::new(table.clone(), [rows, v_dim]), &device)
            .require_grad();
        let weights = Tensor::<2>::from_data(TensorData::new(w.clone(), [bags, bag_size]), &device)
            .require_grad();
        let ids: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [bags, bag_size]), &device);
        let out = ops.embedding_bag(values.clone(), ids, weights.clone());
        let got: Vec<f32> = out.clone().into_data().iter::<f32>().collect();
        let exact = ops == MemoryOps::Native;
        if exact {
            assert_eq!(got, want, "native forward is bit-identical");
        } else {
            close(&got, &want, 1e-5, "portable forward");
        }
        let go = Tensor::<2>::from_data(TensorData::new(g_out.clone(), [bags, v_dim]), &device);
        let grads = (out * go).sum().backward();
        let dv: Vec<f32> = values
            .grad(&grads)
            .unwrap()
            .into_data()
            .iter::<f32>()
            .collect();
        let mut dense = vec![0.0f32; rows * v_dim];
        for (r, g) in want_dv.rows.iter().zip(want_dv.grads.chunks_exact(v_dim)) {
            dense[*r as usize * v_dim..][..v_dim].copy_from_slice(g);
        }
        if exact {
            assert_eq!(dv, dense, "native table gradient is bit-identical");
        } else {
            close(&dv, &dense, 1e-5, "portable table gradient");
        }
        let dw: Vec<f32> = weights
            .grad(&grads)
            .unwrap()
            .into_data()
            .iter::<f32>()
            .collect();
        close(&dw, &want_dw, 1e-5, &format!("{ops:?} weight gradient"));
    }
}

#[test]
fn pk_select_ops_equal_oracle_on_ties_and_full_k() {
    let device = Device::flex();
    let mut rng = Rng::new(8);
    for (n_keys, knn, ties) in [(6, 6, false), (9, 3, true), (16, 1, true), (5, 4, false)] {
        let groups = 11;
        let (scores, want) = common::selection_case(&mut rng, groups, n_keys, knn, ties);
        for ops in [MemoryOps::Portable, MemoryOps::Native] {
            let s = Tensor::<3>::from_data(
                TensorData::new(scores.clone(), [groups, 2, n_keys]),
                &device,
            );
            let got: Vec<u32> = ops
                .pk_select(s, knn)
                .unwrap()
                .into_data()
                .iter::<i64>()
                .map(|v| v as u32)
                .collect();
            assert_eq!(got, want, "{ops:?} n_keys {n_keys} knn {knn}");
        }
    }
    let s = Tensor::<3>::zeros([2, 2, 4], &device);
    for ops in [MemoryOps::Portable, MemoryOps::Native] {
        let err = ops.pk_select(s.clone(), 5).unwrap_err();
        assert!(err.to_string().contains("knn"), "{err}");
    }
}

#[test]
fn bad_inputs_are_named() {
    let device = Device::flex();
    let cfg = cfg(false, true, false, false);
    let s = store(&cfg, 1);
    let m = Model::new(&cfg, &s, &device, MemoryOps::Native, false).unwrap();
    let toks = tokens(&cfg, 4, 1);
    let err = m
        .forward(m.tokens(&toks, 1).unwrap(), None, None)
        .unwrap_err();
    assert!(err.to_string().contains("block row"), "{err}");
    let err = m
        .forward(m.tokens(&toks, 1).unwrap(), Some(&[0, 9]), None)
        .unwrap_err();
    assert!(err.to_string().contains("outside level 2"), "{err}");
    assert!(
        m.tokens(&[1, 2, 99], 1)
            .unwrap_err()
            .to_string()
            .contains("99")
    );
    let mut other = cfg.clone();
    other.dim = 32;
    assert!(Model::new(&other, &s, &device, MemoryOps::Native, false).is_err());
    let _ = VALUES;
}
