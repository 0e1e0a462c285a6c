//! Benchmarks of memlayer-cpu's embedding-bag forward (f32/f16/bf16, dense
//! tables larger than the caches), its backward, and the product-key lookup.
//!
//! `cargo bench --bench cpu_bag` runs the criterion groups (throughput in
//! decimal GB/s of gathered row bytes) and then prints one JSON line per
//! configuration, measured exactly like `scripts/bench_torch_bag.py`:
//! `gbps` = gathered row bytes per call (bags * bag_size * dim * element
//! size) / median seconds per call over `iters` calls after 3 warm-up calls.
//! Copy bandwidth (`memcpy` of 256 MiB, bytes read, best of 5) is measured
//! with the same thread count, and `ratio_to_copy` = gbps / copy gbps.
//!
//! Environment:
//! - `MEMLAYER_BENCH_THREADS` thread counts, default `1,2`
//! - `MEMLAYER_BENCH_MODE` `all` (default), `criterion`, `summary`; `single` (one
//!   table: `MEMLAYER_BENCH_SHAPE=rows,dim,bags`, `MEMLAYER_BENCH_DTYPE`) or `tune`
//!   (prefetch sweep on `MEMLAYER_BENCH_SHAPE`)
//! - `MEMLAYER_BENCH_PREFETCH` prefetch distance in bytes, `MEMLAYER_BENCH_PF_L2=0` T0 hint
//! - `MEMLAYER_BENCH_HUGE=1` tables on transparent huge pages (default off, as torch)
//! - `MEMLAYER_BENCH_ITERS` timed calls per summary line, default 20
//! - `MEMLAYER_BENCH_QUICK=1` only the 2^16 x 512 table and 1024 bags

use criterion::{BenchmarkId, Criterion, Throughput};
use half::{bf16, f16};
use memlayer_core::bag::uniform_offsets;
use memlayer_core::pkm::PkmConfig;
use memlayer_core::rng::Rng;
use memlayer_cpu::alloc::LargeBuf;
use memlayer_cpu::{Cpu, Storage, Table, TableRef, bag, pkm};
use std::time::{Duration, Instant};

const BAG_SIZE: usize = 128; // heads * knn = 4 * 32

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// A (rows, dim) table of uniform values in [-1, 1) stored as `T`.
fn table<T: Storage>(rows: usize, dim: usize, seed: u64, huge: bool) -> LargeBuf<T> {
    let mut buf = LargeBuf::filled(rows * dim, T::from_f32(0.0), huge);
    let mut rng = Rng::new(seed);
    for v in buf.iter_mut() {
        *v = T::from_f32(rng.uniform(-1.0, 1.0));
    }
    buf
}

struct Tables {
    rows: usize,
    dim: usize,
    f32: LargeBuf<f32>,
    f16: LargeBuf<f16>,
    bf16: LargeBuf<bf16>,
}

impl Tables {
    fn new(rows: usize, dim: usize, huge: bool) -> Self {
        Self {
            rows,
            dim,
            f32: table(rows, dim, 1, huge),
            f16: table(rows, dim, 2, huge),
            bf16: table(rows, dim, 3, huge),
        }
    }

    fn get(&self, dtype: &str) -> TableRef<'_> {
        let (r, d) = (self.rows, self.dim);
        match dtype {
            "f32" => TableRef::F32(Table::new(&self.f32, r, d).unwrap()),
            "f16" => TableRef::F16(Table::new(&self.f16, r, d).unwrap()),
            _ => TableRef::Bf16(Table::new(&self.bf16, r, d).unwrap()),
        }
    }
}

struct Bags {
    indices: Vec<u32>,
    weights: Vec<f32>,
    offsets: Vec<usize>,
}

fn bags(rows: usize, n: usize, seed: u64) -> Bags {
    let mut rng = Rng::new(seed);
    let indices = (0..n * BAG_SIZE)
        .map(|_| rng.below(rows as u64) as u32)
        .collect();
    Bags {
        indices,
        weights: rng.normal_vec(n * BAG_SIZE, 0.0, 1.0),
        offsets: uniform_offsets(n, BAG_SIZE),
    }
}

/// (median, best) seconds of `iters` calls after 3 warm-up calls.
fn time_calls(iters: usize, mut f: impl FnMut()) -> (f64, f64) {
    for _ in 0..3 {
        f();
    }
    let mut t: Vec<f64> = (0..iters.max(1))
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = t.len();
    let med = if n % 2 == 1 {
        t[n / 2]
    } else {
        (t[n / 2 - 1] + t[n / 2]) / 2.0
    };
    (med, t[0])
}

/// Sweeps the prefetch distance and hint on one shape (`MEMLAYER_BENCH_SHAPE=rows,dim,bags`),
/// interleaving configurations over 3 rounds and keeping each one's best median.
fn tune(pools: &[Cpu], huge: bool, iters: usize) {
    let shape = env("MEMLAYER_BENCH_SHAPE", "1048576,256,1024");
    let v: Vec<usize> = shape.split(',').map(|x| x.parse().unwrap()).collect();
    let (rows, dim, nb) = (v[0], v[1], v[2]);
    let tables = Tables::new(rows, dim, huge);
    let b = bags(rows, nb, 7);
    let mut out = vec![0.0f32; nb * dim];
    let dists: Vec<usize> = env("MEMLAYER_BENCH_DISTS", "0,4096,8192,16384,32768,65536")
        .split(',')
        .map(|x| x.parse().unwrap())
        .collect();
    let hints: Vec<bool> = env("MEMLAYER_BENCH_HINTS", "0,1")
        .split(',')
        .map(|x| x == "1")
        .collect();
    let rounds: usize = env("MEMLAYER_BENCH_ROUNDS", "3").parse().unwrap();
    let modes: Vec<usize> = env("MEMLAYER_BENCH_PFMODES", "0")
        .split(',')
        .map(|x| x.parse().unwrap())
        .collect();
    let dtypes: Vec<String> = env("MEMLAYER_BENCH_DTYPES", "f32,f16,bf16")
        .split(',')
        .map(String::from)
        .collect();
    let mut best = std::collections::BTreeMap::new();
    let mut best_call = std::collections::BTreeMap::new();
    for _round in 0..rounds {
        for dtype in dtypes.iter().map(String::as_str) {
            let t = tables.get(dtype);
            let gathered = (nb * BAG_SIZE * dim * t.dtype().size()) as f64;
            for cpu in pools {
                for (&pf, &mode) in dists.iter().flat_map(|d| modes.iter().map(move |m| (d, m))) {
                    for &l2 in &hints {
                        memlayer_cpu::simd::set_prefetch_mode(mode);
                        memlayer_cpu::simd::set_prefetch_bytes(pf);
                        memlayer_cpu::simd::set_prefetch_l2(l2);
                        let (med, fastest) = time_calls(iters, || {
                            cpu.install(|| {
                                bag::bag_forward_any(
                                    t, &b.indices, &b.weights, &b.offsets, &mut out,
                                )
                            })
                            .unwrap()
                        });
                        let g = gathered / med / 1e9;
                        let e = best
                            .entry((dtype, cpu.threads(), pf * 10 + mode, l2))
                            .or_insert(0.0f64);
                        *e = e.max(g);
                        let e = best_call
                            .entry((dtype, cpu.threads(), pf * 10 + mode, l2))
                            .or_insert(0.0f64);
                        *e = e.max(gathered / fastest / 1e9);
                    }
                }
            }
        }
    }
    for ((dtype, t, pf, l2), g) in best {
        let f = best_call[&(dtype, t, pf, l2)];
        println!(
            "tune {rows}x{dim} bags {nb} {dtype} t{t} pf {} mode {} l2 {l2}: {g:.3} GB/s (fastest call {f:.3})",
            pf / 10,
            pf % 10
        );
    }
}

/// One configuration (`MEMLAYER_BENCH_SHAPE=rows,dim,bags`, `MEMLAYER_BENCH_DTYPE`), one
/// JSON line per thread count, in the format of `scripts/bench_torch_bag.py`.
fn single(pools: &[Cpu], huge: bool, iters: usize) {
    let shape = env("MEMLAYER_BENCH_SHAPE", "1048576,256,1024");
    let v: Vec<usize> = shape.split(',').map(|x| x.parse().unwrap()).collect();
    let (rows, dim, nb) = (v[0], v[1], v[2]);
    let dtype = env("MEMLAYER_BENCH_DTYPE", "f32");
    let (f, h, b16);
    let t = match dtype.as_str() {
        "f32" => {
            f = table::<f32>(rows, dim, 1, huge);
            TableRef::F32(Table::new(&f, rows, dim).unwrap())
        }
        "f16" => {
            h = table::<f16>(rows, dim, 2, huge);
            TableRef::F16(Table::new(&h, rows, dim).unwrap())
        }
        _ => {
            b16 = table::<bf16>(rows, dim, 3, huge);
            TableRef::Bf16(Table::new(&b16, rows, dim).unwrap())
        }
    };
    let b = bags(rows, nb, 7);
    let mut out = vec![0.0f32; nb * dim];
    let gathered = (nb * BAG_SIZE * dim * t.dtype().size()) as f64;
    for cpu in pools {
        let (med, best) = time_calls(iters, || {
            cpu.install(|| bag::bag_forward_any(t, &b.indices, &b.weights, &b.offsets, &mut out))
                .unwrap()
        });
        println!(
            "{{\"gbps\": {:.4}, \"seconds_per_call\": {med:.6}, \"best_gbps\": {:.4}, \
             \"best_seconds\": {best:.6}, \"threads\": {}, \"rows\": {rows}, \"dim\": {dim}, \
             \"bags\": {nb}, \"bag_size\": {BAG_SIZE}, \"dtype\": \"{dtype}\", \
             \"huge_pages\": {huge}, \"kernel\": \"{:?}\", \"prefetch_bytes\": {}}}",
            gathered / med / 1e9,
            gathered / best / 1e9,
            cpu.threads(),
            memlayer_cpu::simd::kernel(),
            memlayer_cpu::simd::prefetch_bytes(),
        );
    }
}

fn main() {
    let threads: Vec<usize> = env("MEMLAYER_BENCH_THREADS", "1,2")
        .split(',')
        .map(|t| t.trim().parse().expect("MEMLAYER_BENCH_THREADS: numbers"))
        .collect();
    let mode = env("MEMLAYER_BENCH_MODE", "all");
    let huge = env("MEMLAYER_BENCH_HUGE", "0") == "1";
    let quick = env("MEMLAYER_BENCH_QUICK", "0") == "1";
    let iters: usize = env("MEMLAYER_BENCH_ITERS", "20").parse().unwrap();
    let shapes: &[(usize, usize)] = if quick {
        &[(1 << 16, 512)]
    } else {
        &[(1 << 20, 256), (1 << 16, 512)]
    };
    let bag_counts: &[usize] = if quick { &[1024] } else { &[1024, 4096] };
    let dtypes = ["f32", "f16", "bf16"];
    let pools: Vec<Cpu> = threads.iter().map(|&t| Cpu::new(t).unwrap()).collect();
    if let Ok(pf) = std::env::var("MEMLAYER_BENCH_PREFETCH") {
        memlayer_cpu::simd::set_prefetch_bytes(pf.parse().expect("MEMLAYER_BENCH_PREFETCH: bytes"));
    }
    memlayer_cpu::simd::set_prefetch_l2(env("MEMLAYER_BENCH_PF_L2", "1") == "1");
    if mode == "tune" {
        tune(&pools, huge, iters);
        return;
    }
    if mode == "single" {
        single(&pools, huge, iters);
        return;
    }

    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let mut summary = Vec::new();
    for &(rows, dim) in shapes {
        let tables = Tables::new(rows, dim, huge);
        for &nb in bag_counts {
            let b = bags(rows, nb, 7);
            let mut out = vec![0.0f32; nb * dim];
            for dtype in dtypes {
                let t = tables.get(dtype);
                let gathered = (nb * BAG_SIZE * dim * t.dtype().size()) as u64;
                for cpu in &pools {
                    let mut run = || {
                        cpu.install(|| {
                            bag::bag_forward_any(t, &b.indices, &b.weights, &b.offsets, &mut out)
                        })
                        .unwrap()
                    };
                    if mode != "summary" {
                        let mut g = c.benchmark_group(format!("bag_forward/{rows}x{dim}"));
                        g.throughput(Throughput::BytesDecimal(gathered));
                        g.bench_function(
                            BenchmarkId::new(
                                format!("{dtype}/bags{nb}"),
                                format!("t{}", cpu.threads()),
                            ),
                            |bch| bch.iter(&mut run),
                        );
                        g.finish();
                    }
                    if mode != "criterion" {
                        let (med, best) = time_calls(iters, &mut run);
                        summary.push((
                            cpu.threads(),
                            format!(
                                "\"op\": \"bag_forward\", \"gbps\": {:.3}, \"seconds_per_call\": {:.6}, \
                                 \"best_gbps\": {:.3}, \"rows_per_second\": {:.0}, \"threads\": {}, \
                                 \"rows\": {rows}, \"dim\": {dim}, \"bags\": {nb}, \"bag_size\": {BAG_SIZE}, \
                                 \"dtype\": \"{dtype}\", \"huge_pages\": {huge}, \"kernel\": \"{:?}\"",
                                gathered as f64 / med / 1e9,
                                med,
                                gathered as f64 / best / 1e9,
                                (nb * BAG_SIZE) as f64 / med,
                                cpu.threads(),
                                memlayer_cpu::simd::kernel(),
                            ),
                            gathered as f64 / med / 1e9,
                        ));
                    }
                }
            }
        }
    }

    // paged f16 table (2^16 x 512, pages of 256 rows in 4 slot buffers, shuffled slots)
    // against the same rows read densely
    if mode != "summary" {
        let (rows, dim, nb, page_rows) = (1 << 16, 512, 1024, 256);
        let dense = table::<f16>(rows, dim, 5, huge);
        let pages = rows / page_rows;
        let spb = pages / 4;
        let mut slots: Vec<u32> = (0..pages as u32).collect();
        Rng::new(6).shuffle(&mut slots);
        let mut bufs: Vec<LargeBuf<f16>> = (0..4)
            .map(|_| LargeBuf::filled(spb * page_rows * dim, f16::ZERO, huge))
            .collect();
        for (p, &s) in slots.iter().enumerate() {
            let (bi, si) = (s as usize / spb, s as usize % spb);
            bufs[bi][si * page_rows * dim..(si + 1) * page_rows * dim]
                .copy_from_slice(&dense[p * page_rows * dim..(p + 1) * page_rows * dim]);
        }
        let refs: Vec<&[f16]> = bufs.iter().map(|b| &b[..]).collect();
        let paged =
            memlayer_cpu::PagedTable::new(rows, dim, page_rows, &slots, spb, &refs).unwrap();
        let dense_t = Table::new(&dense, rows, dim).unwrap();
        let b = bags(rows, nb, 11);
        let mut out = vec![0.0f32; nb * dim];
        let gathered = (nb * BAG_SIZE * dim * 2) as u64;
        for cpu in &pools {
            let mut g = c.benchmark_group(format!("bag_forward_paged/{rows}x{dim}/f16"));
            g.throughput(Throughput::BytesDecimal(gathered));
            g.bench_function(format!("paged/t{}", cpu.threads()), |bch| {
                bch.iter(|| {
                    cpu.bag_forward(&paged, &b.indices, &b.weights, &b.offsets, &mut out)
                        .unwrap()
                })
            });
            g.bench_function(format!("dense/t{}", cpu.threads()), |bch| {
                bch.iter(|| {
                    cpu.bag_forward(&dense_t, &b.indices, &b.weights, &b.offsets, &mut out)
                        .unwrap()
                })
            });
            g.finish();
        }
    }

    // backward on the small table, f32
    if mode != "summary" {
        let (rows, dim, nb) = (1 << 16, 512, 1024);
        let t = table::<f32>(rows, dim, 4, huge);
        let b = bags(rows, nb, 8);
        let grad = Rng::new(9).normal_vec(nb * dim, 0.0, 1.0);
        let mut dw = vec![0.0f32; nb * BAG_SIZE];
        let tab = Table::new(&t, rows, dim).unwrap();
        for cpu in &pools {
            let mut g = c.benchmark_group("bag_backward");
            g.throughput(Throughput::Elements((nb * BAG_SIZE) as u64));
            g.bench_function(format!("table/{rows}x{dim}/t{}", cpu.threads()), |bch| {
                bch.iter(|| {
                    cpu.install(|| {
                        bag::bag_backward_table(
                            rows, dim, &b.indices, &b.weights, &b.offsets, &grad,
                        )
                    })
                    .unwrap()
                })
            });
            let mut reused = memlayer_core::bag::SparseRows::empty(dim);
            g.bench_function(
                format!("table_into/{rows}x{dim}/t{}", cpu.threads()),
                |bch| {
                    bch.iter(|| {
                        cpu.install(|| {
                            bag::bag_backward_table_into(
                                rows,
                                dim,
                                &b.indices,
                                &b.weights,
                                &b.offsets,
                                &grad,
                                &mut reused,
                            )
                        })
                        .unwrap()
                    })
                },
            );
            g.bench_function(format!("weights/{rows}x{dim}/t{}", cpu.threads()), |bch| {
                bch.iter(|| {
                    cpu.install(|| {
                        bag::bag_backward_weights(&tab, &b.indices, &b.offsets, &grad, &mut dw)
                    })
                    .unwrap()
                })
            });
            g.finish();
        }
    }

    // product-key lookup at paper scale
    {
        let cfg = PkmConfig::paper();
        let tokens = 256;
        let (keys, query) = memlayer_core::pkm::random_lookup_inputs(&cfg, tokens, 10);
        let prepared = pkm::PreparedKeys::new(&cfg, &keys).unwrap();
        for cpu in &pools {
            if mode != "summary" {
                let mut g = c.benchmark_group("pkm_lookup");
                g.throughput(Throughput::Elements(tokens as u64));
                g.bench_function(format!("paper/tokens{tokens}/t{}", cpu.threads()), |bch| {
                    bch.iter(|| cpu.lookup(&prepared, &query, tokens).unwrap())
                });
                g.finish();
            }
            if mode != "criterion" {
                let (med, _) = time_calls(5, || {
                    cpu.lookup(&prepared, &query, tokens).unwrap();
                });
                summary.push((
                    cpu.threads(),
                    format!(
                        "\"op\": \"pkm_lookup\", \"tokens_per_second\": {:.0}, \"seconds_per_call\": {med:.6}, \
                         \"threads\": {}, \"tokens\": {tokens}, \"config\": \"{cfg:?}\"",
                        tokens as f64 / med,
                        cpu.threads()
                    ),
                    f64::NAN,
                ));
            }
        }
        if mode != "criterion" {
            let t0 = Instant::now();
            let want = memlayer_core::pkm::lookup(&cfg, &keys, &query, tokens).unwrap();
            let oracle = t0.elapsed().as_secs_f64();
            assert_eq!(pkm::lookup(&prepared, &query, tokens).unwrap(), want);
            println!(
                "{{\"op\": \"pkm_lookup_oracle\", \"tokens_per_second\": {:.0}, \"seconds_per_call\": {oracle:.6}, \"threads\": 1}}",
                tokens as f64 / oracle
            );
        }
    }

    if mode != "criterion" {
        for cpu in &pools {
            let cb = cpu.copy_bandwidth(256 << 20, 5);
            let rb = cpu.install(|| memlayer_cpu::bandwidth::read_bandwidth(256 << 20, 5));
            println!(
                "{{\"op\": \"copy_bandwidth\", \"gbps\": {:.3}, \"counts\": \"bytes read (= bytes copied)\", \
                 \"bytes\": {}, \"threads\": {}, \"read_only_gbps\": {:.3}}}",
                cb.gbps, cb.bytes, cb.threads, rb.gbps
            );
            for (t, line, gbps) in &summary {
                if *t == cpu.threads() {
                    if gbps.is_nan() {
                        println!("{{{line}}}");
                    } else {
                        println!(
                            "{{{line}, \"copy_gbps\": {:.3}, \"ratio_to_copy\": {:.3}}}",
                            cb.gbps,
                            gbps / cb.gbps
                        );
                    }
                }
            }
        }
    }
    c.final_summary();
}
