//! The memory ops' WGSL kernels as burn-wgpu custom ops, and the model on
//! burn-wgpu, against the CPU oracle, on memlayer's shared wgpu device
//! (lavapipe in CI: `MEMLAYER_REQUIRE_GPU=1` makes a missing adapter a
//! failure). Small shapes: each new shape costs a kernel compile on a
//! software driver.
#![cfg(feature = "wgpu")]

mod common;

use burn::tensor::{Device, Int, Tensor, TensorData};
use memlayer_core::bag;
use memlayer_core::model::{ModelConfig, ParamStore, reference};
use memlayer_core::rng::Rng;
use memlayer_model::{MemoryOps, Model};
use memlayer_wgpu::{GpuContext, GpuOptions, gpu_for_tests};
use std::sync::OnceLock;

/// One burn device on one shared context for the whole test binary (burn
/// registers a wgpu setup once per process).
fn device() -> Option<Device> {
    static DEVICE: OnceLock<Option<(GpuContext, Device)>> = OnceLock::new();
    DEVICE
        .get_or_init(|| {
            let ctx = gpu_for_tests(GpuOptions {
                adapter_features: true,
                ..GpuOptions::default()
            })?;
            let device = memlayer_model::gpu::burn_device(&ctx)
                .expect("burn device on the shared wgpu device");
            Some((ctx, device))
        })
        .as_ref()
        .map(|(_, d)| d.clone())
}

fn floats(t: Tensor<2>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

#[test]
fn wgsl_embedding_bag_equals_oracle_forward_and_backward() {
    let Some(device) = device() else { return };
    let device = device.autodiff();
    let mut rng = Rng::new(11);
    // (rows, v_dim, bags, bag): N = 49 (not a power of two) with a hot row;
    // 1056 entries (several radix blocks, 2 radix passes, a two-level scan);
    // rows wider than a workgroup's lanes; one-entry bags; one table row
    for (rows, v_dim, bags, bag_size) in [
        (49, 5, 6, 8),
        (1000, 64, 33, 32),
        (3, 1030, 2, 1),
        (1, 7, 4, 3),
    ] {
        let what = format!("rows {rows} v_dim {v_dim} bags {bags}x{bag_size}");
        let table = rng.normal_vec(rows * v_dim, 0.0, 1.0);
        let mut idx: Vec<u32> = (0..bags * bag_size)
            .map(|_| rng.below(rows as u64) as u32)
            .collect();
        // a hot row: the first bag entirely, and every 5th entry
        for (e, i) in idx.iter_mut().enumerate() {
            if e < bag_size || e % 5 == 0 {
                *i = (rows as u32) / 2;
            }
        }
        let w = rng.normal_vec(bags * bag_size, 0.0, 1.0);
        let g_out = rng.normal_vec(bags * v_dim, 0.0, 1.0);
        let offsets = bag::uniform_offsets(bags, bag_size);
        let want = bag::bag_forward(&table, rows, v_dim, &idx, &w, &offsets).unwrap();
        let want_dv = bag::bag_backward_table(rows, v_dim, &idx, &w, &offsets, &g_out).unwrap();
        let want_dw =
            bag::bag_backward_weights(&table, rows, v_dim, &idx, &offsets, &g_out).unwrap();
        let values = Tensor::<2>::from_data(TensorData::new(table.clone(), [rows, v_dim]), &device)
            .require_grad();
        let weights = Tensor::<2>::from_data(TensorData::new(w.clone(), [bags, bag_size]), &device)
            .require_grad();
        let ids: Vec<i64> = idx.iter().map(|&i| i64::from(i)).collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [bags, bag_size]), &device);
        let out = MemoryOps::Native.embedding_bag(values.clone(), ids, weights.clone());
        assert_eq!(
            floats(out.clone()),
            want,
            "{what}: forward is bit-identical"
        );
        let go = Tensor::<2>::from_data(TensorData::new(g_out.clone(), [bags, v_dim]), &device);
        let grads = (out * go).sum().backward();
        let mut dense = vec![0.0f32; rows * v_dim];
        for (r, g) in want_dv.rows.iter().zip(want_dv.grads.chunks_exact(v_dim)) {
            dense[*r as usize * v_dim..][..v_dim].copy_from_slice(g);
        }
        let dv = floats(values.grad(&grads).unwrap());
        assert_eq!(dv, dense, "{what}: table gradient is bit-identical");
        let dw = floats(weights.grad(&grads).unwrap());
        for (e, (a, b)) in dw.iter().zip(&want_dw).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * (1.0 + b.abs()) * (v_dim as f32).sqrt(),
                "{what}: weight gradient {e}: wgsl {a} vs oracle {b}"
            );
        }
    }
}

#[test]
fn wgsl_pk_select_equals_oracle_on_ties_and_full_k() {
    let Some(device) = device() else { return };
    let mut rng = Rng::new(8);
    // ties (scores in {-1, 0, 1}), k = n_keys, k = 1, n_keys not a power of
    // two, more groups than one grid row of workgroups holds at 64 lanes
    for (groups, n_keys, knn, ties) in [
        (11, 6, 6, false),
        (300, 9, 3, true),
        (17, 16, 1, true),
        (5, 100, 32, false),
        (8, 64, 16, true),
    ] {
        let (scores, want) = common::selection_case(&mut rng, groups, n_keys, knn, ties);
        let s = Tensor::<3>::from_data(TensorData::new(scores, [groups, 2, n_keys]), &device);
        let got: Vec<u32> = MemoryOps::Native
            .pk_select(s, knn)
            .unwrap()
            .into_data()
            .convert::<i64>()
            .iter::<i64>()
            .map(|v| v as u32)
            .collect();
        assert_eq!(got, want, "groups {groups} n_keys {n_keys} knn {knn}");
    }
    let s = Tensor::<3>::zeros([2, 2, 200], &device);
    let err = MemoryOps::Native.pk_select(s, 129).unwrap_err();
    assert!(err.to_string().contains("GPU limit 128"), "{err}");
}

fn cfg() -> ModelConfig {
    ModelConfig {
        vocab_size: 29,
        max_seq_len: 16,
        ..ModelConfig::tiny_tied_for_tests(true)
    }
}

#[test]
fn wgpu_forward_and_gradients_match_oracle_and_cpu() {
    let Some(device) = device() else { return };
    assert_eq!(MemoryOps::best_for(&device), MemoryOps::Native);
    let cfg = cfg();
    let mut store = ParamStore::init(&cfg, 5).unwrap();
    let mut rng = Rng::new(2);
    for p in store.params_mut() {
        if p.name.starts_with("hier.") {
            p.data.iter_mut().for_each(|v| *v = rng.normal() * 0.3);
        }
    }
    let toks: Vec<u32> = (0..8).map(|_| rng.below(29) as u32).collect();
    let rows = [1usize, 2];
    let want = reference::forward(&cfg, &store, &toks, Some(&rows)).unwrap();
    for ops in [MemoryOps::Portable, MemoryOps::Native] {
        let m = Model::new(&cfg, &store, &device, ops, false).unwrap();
        let got: Vec<f32> = m
            .forward(m.tokens(&toks, 1).unwrap(), Some(&rows), None)
            .unwrap()
            .logits
            .into_data()
            .iter::<f32>()
            .collect();
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() < 1e-3 * (1.0 + b.abs()),
                "{ops:?} logit {i}: wgpu {a} vs oracle {b}"
            );
        }
    }
    // one training step's gradients: wgpu (both ops) == CPU (Flex, native ops)
    let grads_of = |device: &Device, ops| {
        let m = Model::new(&cfg, &store, &device.clone().autodiff(), ops, true).unwrap();
        let (loss, _) = m.loss(&toks, 1, Some(&rows)).unwrap();
        m.grads(&loss.backward())
    };
    let gc = grads_of(&Device::flex(), MemoryOps::Native);
    for ops in [MemoryOps::Portable, MemoryOps::Native] {
        let gw = grads_of(&device, ops);
        for ((p, a), c) in store.params().iter().zip(&gw).zip(&gc) {
            let (a, c) = (a.as_ref().unwrap(), c.as_ref().unwrap());
            let scale = c.iter().fold(1e-3f32, |m, x| m.max(x.abs()));
            for (x, y) in a.iter().zip(c) {
                assert!(
                    (x - y).abs() <= 2e-3 * scale,
                    "{ops:?} {}: wgpu {x} vs cpu {y}",
                    p.name
                );
            }
        }
    }
}

/// The WGSL route's limits (those `memlayer-wgpu` returns as errors) are
/// checked before the route is taken: a bag past them runs on the portable
/// ops, a selection past them is an error, never a panic inside a kernel
/// launch.
#[test]
fn wgsl_route_limits_are_checked_up_front() {
    use memlayer_model::ops::wgsl::{MAX_BINDING_BYTES, check_bag, check_select_route};
    assert!(check_bag(10, 4, 2, 3, true).is_ok());
    assert!(check_bag(10, 4, 2, 3, false).unwrap_err().contains("f32"));
    let rows = (MAX_BINDING_BYTES / 4 / 8 + 1) as usize;
    let e = check_bag(rows, 8, 2, 3, true).unwrap_err();
    assert!(e.contains("value table"), "{e}");
    assert!(check_bag(10, 4, usize::MAX, 2, true).is_err());
    assert!(check_select_route(4, 256, 128).is_ok());
    for knn in [0, 17] {
        assert!(check_select_route(4, 16, knn).is_err(), "knn {knn}");
    }
    assert!(check_select_route(4, 256, 129).is_err());
    let e = check_select_route(usize::MAX / 4, 256, 8).unwrap_err();
    assert!(e.contains("binding"), "{e}");
}
