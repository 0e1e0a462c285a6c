//! Profiling driver: repeated product-key lookups at paper scale (1 thread).
//! `pkm_prof [kernel]` forces a kernel family (`avx512`, `avx2`, `portable`, ...).
use memlayer_core::pkm::PkmConfig;
use memlayer_cpu::{Cpu, pkm, simd};
use std::time::Instant;

fn main() {
    if let Some(k) = std::env::args().nth(1) {
        simd::force_kernel(Some(simd::Kernel::from_name(&k).expect("a kernel name"))).unwrap();
    }
    let cfg = PkmConfig::paper();
    let tokens = 256;
    let (keys, query) = memlayer_core::pkm::random_lookup_inputs(&cfg, tokens, 10);
    let prepared = pkm::PreparedKeys::new(&cfg, &keys).unwrap();
    let cpu = Cpu::new(1).unwrap();
    let t = Instant::now();
    for _ in 0..10 {
        std::hint::black_box(cpu.lookup(&prepared, &query, tokens).unwrap());
    }
    println!(
        "{}: {:.0} tokens/s",
        simd::kernel(),
        10.0 * tokens as f64 / t.elapsed().as_secs_f64()
    );
}
