//! Profiling driver: repeated product-key lookups at paper scale (1 thread).
use memlayer_core::pkm::PkmConfig;
use memlayer_core::rng::Rng;
use memlayer_cpu::{Cpu, pkm};
use std::time::Instant;

fn main() {
    let cfg = PkmConfig {
        dim: 1024,
        v_dim: 1024,
        heads: 4,
        n_keys: 1024,
        k_dim: 512,
        knn: 32,
        qk_norm: false,
        gated: false,
    };
    let tokens = 256;
    let mut rng = Rng::new(10);
    let keys = rng.uniform_vec(cfg.heads * 2 * cfg.n_keys * cfg.half(), -0.05, 0.05);
    let query = rng.normal_vec(tokens * cfg.heads * cfg.k_dim, 0.0, 1.0);
    let prepared = pkm::PreparedKeys::new(&cfg, &keys).unwrap();
    let cpu = Cpu::new(1).unwrap();
    let t = Instant::now();
    for _ in 0..10 {
        std::hint::black_box(cpu.lookup(&prepared, &query, tokens).unwrap());
    }
    println!(
        "{:.0} tokens/s",
        10.0 * tokens as f64 / t.elapsed().as_secs_f64()
    );
}
