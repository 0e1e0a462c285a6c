//! Profiling driver for the embedding-bag forward (tuning and `perf`):
//! `cargo run --release -p memlayer-cpu --example bag_prof -- [key=value ...]`
//! keys: kernel (avx512|avx2|neon|portable, default detected), dtype (f32|f16|bf16),
//! rows (2^20), dim (256), bags (2048), bag_size (128), threads (2), iters (10),
//! pf (prefetch bytes), mode (prefetch mode), l2 (0|1), huge (0|1), op (fwd|dot).
//! Prints one line: median GB/s of gathered row bytes.
//! `sweep=CFG;CFG;..` with `CFG = kernel:pf:mode:l2:threads[:reg]` (e.g. `avx2:8192:0:1:2:0`;
//! `pf` or `mode` `-`: the family's default; `reg` 0 turns the register-accumulator forward off)
//! times every configuration on the same table, interleaved `rounds` (5) times,
//! and prints the median and best per configuration; `sets=N` rotates the calls
//! through N index sets (shifted by k * rows / N) so no call finds the last one's rows in L3.
use half::{bf16, f16};
use memlayer_core::rng::Rng;
use memlayer_cpu::alloc::LargeBuf;
use memlayer_cpu::storage::narrow;
use memlayer_cpu::{Cpu, Storage, Table, bag, simd};
use std::collections::HashMap;
use std::time::Instant;

fn run<T: Storage>(a: &HashMap<String, String>, get: &dyn Fn(&str, usize) -> usize) {
    let (rows, dim) = (get("rows", 1 << 20), get("dim", 256));
    let (bags, bag_size) = (get("bags", 2048), get("bag_size", 128));
    let mut rng = Rng::new(2024);
    let master = rng.normal_vec(rows * dim, 0.0, 1.0);
    let table = LargeBuf::from_slice(&narrow::<T>(&master), get("huge", 1) == 1);
    drop(master);
    let t = Table::new(&table, rows, dim).unwrap();
    let nnz = bags * bag_size;
    let indices: Vec<u32> = (0..nnz).map(|_| rng.below(rows as u64) as u32).collect();
    let weights = rng.normal_vec(nnz, 0.0, 1.0);
    let offsets = memlayer_core::bag::uniform_offsets(bags, bag_size);
    let bytes = (nnz * dim * std::mem::size_of::<T>()) as f64;
    if let Some(sweep) = a.get("sweep") {
        let cfgs: Vec<Vec<&str>> = sweep.split(';').map(|c| c.split(':').collect()).collect();
        let pools: Vec<Cpu> = cfgs
            .iter()
            .map(|c| Cpu::new(c[4].parse().unwrap()).unwrap())
            .collect();
        let mut out = vec![0.0f32; bags * dim];
        let mut res: Vec<Vec<f64>> = vec![Vec::new(); cfgs.len()];
        let n_sets = get("sets", 1);
        let sets: Vec<Vec<u32>> = (0..n_sets)
            .map(|k| {
                let shift = (k * rows / n_sets) as u64;
                let m = rows as u64;
                indices
                    .iter()
                    .map(|&i| ((i as u64 + shift) % m) as u32)
                    .collect()
            })
            .collect();
        let mut call = 0;
        for _ in 0..get("rounds", 5) {
            for (i, c) in cfgs.iter().enumerate() {
                simd::force_kernel(Some(simd::Kernel::from_name(c[0]).unwrap())).unwrap();
                simd::reset_prefetch();
                if let Ok(pf) = c[1].parse() {
                    simd::set_prefetch_bytes(pf);
                }
                if let Ok(mode) = c[2].parse() {
                    simd::set_prefetch_mode(mode);
                }
                simd::set_prefetch_l2(c[3] == "1");
                simd::set_register_accumulators(c.get(5).is_none_or(|&r| r == "1"));
                for it in 0..get("iters", 5) + 1 {
                    let s = Instant::now();
                    call += 1;
                    pools[i]
                        .bag_forward(&t, &sets[call % n_sets], &weights, &offsets, &mut out)
                        .unwrap();
                    if it > 0 {
                        res[i].push(bytes / s.elapsed().as_secs_f64() / 1e9);
                    }
                }
            }
        }
        for (c, r) in cfgs.iter().zip(&mut res) {
            r.sort_by(f64::total_cmp);
            println!(
                "{:<28} {} dim {dim}: median {:6.2} best {:6.2} GB/s",
                c.join(":"),
                T::DTYPE.name(),
                r[r.len() / 2],
                r[r.len() - 1]
            );
        }
        return;
    }
    let cpu = Cpu::new(get("threads", 2)).unwrap();
    let mut out = vec![0.0f32; bags * dim];
    let grad = vec![1.0f32; bags * dim];
    let mut dw = vec![0.0f32; nnz];
    let dot = a.get("op").is_some_and(|o| o == "dot");
    let mut call = || {
        if dot {
            cpu.install(|| bag::bag_backward_weights(&t, &indices, &offsets, &grad, &mut dw))
                .unwrap()
        } else {
            cpu.bag_forward(&t, &indices, &weights, &offsets, &mut out)
                .unwrap()
        }
    };
    call();
    let mut times: Vec<f64> = (0..get("iters", 10))
        .map(|_| {
            let s = Instant::now();
            call();
            s.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    println!(
        "kernel {} dtype {} dim {dim} threads {} pf {} mode {}: {:.2} GB/s (best {:.2})",
        simd::kernel(),
        T::DTYPE.name(),
        cpu.threads(),
        simd::prefetch_bytes(),
        simd::prefetch_mode(),
        bytes / times[times.len() / 2] / 1e9,
        bytes / times[0] / 1e9
    );
}

fn main() {
    let a: HashMap<String, String> = std::env::args()
        .skip(1)
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.into(), v.into())))
        .collect();
    let get = |k: &str, d: usize| a.get(k).map_or(d, |v| v.parse().expect("a number"));
    if let Some(k) = a.get("kernel") {
        simd::force_kernel(Some(simd::Kernel::from_name(k).expect("a kernel name"))).unwrap();
    }
    if a.contains_key("pf") {
        simd::set_prefetch_bytes(get("pf", 0));
    }
    if a.contains_key("mode") {
        simd::set_prefetch_mode(get("mode", 0));
    }
    simd::set_prefetch_l2(get("l2", 1) == 1);
    match a.get("dtype").map_or("f32", |s| s.as_str()) {
        "f16" => run::<f16>(&a, &get),
        "bf16" => run::<bf16>(&a, &get),
        _ => run::<f32>(&a, &get),
    }
}
