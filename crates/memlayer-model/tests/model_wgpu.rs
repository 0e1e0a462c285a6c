//! The model on burn-wgpu (portable memory ops) against the CPU oracle, on
//! memlayer's shared wgpu device (lavapipe in CI: `MEMLAYER_REQUIRE_GPU=1`
//! makes a missing adapter a failure). Small shapes: each new shape costs a
//! kernel compile on a software driver.
#![cfg(feature = "wgpu")]

use burn::tensor::Device;
use memlayer_core::model::{HierSpec, ModelConfig, ParamStore, PkmSpec, reference};
use memlayer_core::rng::Rng;
use memlayer_model::{MemoryOps, Model};
use memlayer_wgpu::{GpuOptions, gpu_for_tests};

fn cfg() -> ModelConfig {
    ModelConfig {
        vocab_size: 29,
        dim: 16,
        n_layers: 2,
        n_heads: 2,
        ffn_hidden: 24,
        max_seq_len: 16,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
        tie_embeddings: true,
        pkm: Some(PkmSpec {
            layers: vec![1],
            n_keys: 5,
            heads: 2,
            k_dim: 8,
            knn: 3,
            v_dim: 16,
            qk_norm: true,
            gated: false,
        }),
        hier: Some(HierSpec {
            levels: 2,
            branching: 2,
            units: vec![4, 2],
            generic: false,
        }),
    }
}

#[test]
fn wgpu_forward_and_gradients_match_oracle_and_cpu() {
    let Some(ctx) = gpu_for_tests(GpuOptions {
        adapter_features: true,
        ..GpuOptions::default()
    }) else {
        return;
    };
    let device =
        memlayer_model::gpu::burn_device(&ctx).expect("burn device on the shared wgpu device");
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
    let m = Model::new(&cfg, &store, &device, MemoryOps::Portable, false).unwrap();
    let got: Vec<f32> = m
        .forward(m.tokens(&toks, 1).unwrap(), Some(&rows), None)
        .unwrap()
        .logits
        .into_data()
        .iter::<f32>()
        .collect();
    let want = reference::forward(&cfg, &store, &toks, Some(&rows)).unwrap();
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert!(
            (a - b).abs() < 1e-3 * (1.0 + b.abs()),
            "logit {i}: wgpu {a} vs oracle {b}"
        );
    }
    // one training step's gradients: wgpu == CPU (Flex, native ops)
    let grads_of = |device: &Device, ops| {
        let m = Model::new(&cfg, &store, &device.clone().autodiff(), ops, true).unwrap();
        let (loss, _) = m.loss(&toks, 1, Some(&rows)).unwrap();
        m.grads(&loss.backward())
    };
    let gw = grads_of(&device, MemoryOps::Portable);
    let gc = grads_of(&Device::flex(), MemoryOps::Native);
    for ((p, a), c) in store.params().iter().zip(&gw).zip(&gc) {
        let (a, c) = (a.as_ref().unwrap(), c.as_ref().unwrap());
        let scale = c.iter().fold(1e-3f32, |m, x| m.max(x.abs()));
        for (x, y) in a.iter().zip(c) {
            assert!(
                (x - y).abs() <= 2e-3 * scale,
                "{}: wgpu {x} vs cpu {y}",
                p.name
            );
        }
    }
}
