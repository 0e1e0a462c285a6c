//! Parity of the optimised CPU path with the oracle (`memlayer_core`):
//! embedding-bag forward (dense and paged, f32/f16/bf16), table and weight
//! gradients, product-key lookup and score backward, at 1 and 2 threads and
//! with every kernel family this CPU runs (AVX-512 and AVX2, or NEON, and portable).

use half::{bf16, f16};
use memlayer_core::bag as obag;
use memlayer_core::pkm::{self as opkm, PkmConfig};
use memlayer_core::rng::Rng;
use memlayer_cpu::simd::{self, Kernel};
use memlayer_cpu::storage::{narrow, widen};
use memlayer_cpu::{Cpu, CpuError, PagedTable, Storage, Table, bag, pkm};
use std::sync::Mutex;

/// Serialises the tests that force a kernel family (a process-wide setting).
static KERNEL: Mutex<()> = Mutex::new(());

/// Runs `f` once with each kernel family this CPU runs, forced.
fn each_kernel(mut f: impl FnMut(Kernel)) {
    let _guard = KERNEL.lock().unwrap_or_else(|e| e.into_inner());
    for k in simd::available() {
        simd::force_kernel(Some(k)).unwrap();
        f(k);
    }
    simd::force_kernel(None).unwrap();
}

fn pools() -> Vec<Cpu> {
    vec![Cpu::new(1).unwrap(), Cpu::new(2).unwrap()]
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Random CSR bags: sizes in 0..=max_size (some empty), indices may repeat.
fn random_bags(
    rng: &mut Rng,
    rows: usize,
    bags: usize,
    max_size: usize,
) -> (Vec<u32>, Vec<f32>, Vec<usize>) {
    let mut offsets = vec![0usize];
    let mut indices = Vec::new();
    for _ in 0..bags {
        let size = match rng.below(5) {
            0 => 0,
            _ => rng.below(max_size as u64 + 1) as usize,
        };
        let first = rng.below(rows as u64) as u32;
        for j in 0..size {
            // repeated indices inside a bag now and then
            if j > 0 && rng.below(6) == 0 {
                indices.push(first);
            } else {
                indices.push(rng.below(rows as u64) as u32);
            }
        }
        offsets.push(indices.len());
    }
    let weights = rng.normal_vec(indices.len(), 0.0, 1.0);
    (indices, weights, offsets)
}

/// Runs the forward over `table` and asserts it equals `want` bit for bit
/// (`what` names the case). out starts as NaN so unwritten rows show.
fn assert_forward<R: memlayer_cpu::Rows>(
    cpu: &Cpu,
    table: &R,
    (indices, weights, offsets): (&[u32], &[f32], &[usize]),
    want: &[f32],
    what: std::fmt::Arguments<'_>,
) {
    let mut out = vec![f32::NAN; want.len()];
    cpu.bag_forward(table, indices, weights, offsets, &mut out)
        .unwrap();
    assert_eq!(bits(&out), bits(want), "{what}");
}

fn check_forward<T: Storage>(seed: u64) {
    let mut rng = Rng::new(seed);
    for &(rows, dim, bags, max_size) in &[
        (50usize, 1usize, 9usize, 5usize),
        (37, 5, 13, 9),
        (64, 13, 7, 20),
        (300, 256, 33, 128),
        (100, 24, 0, 4),
        (200, 100, 64, 3),
        (90, 40, 17, 11),
        (70, 512, 9, 30),
        // whole 16-lane rows: the register-accumulator forward (AVX-512)
        (60, 16, 10, 12),
        (80, 64, 10, 40),
        (80, 128, 7, 9),
    ] {
        let master = rng.normal_vec(rows * dim, 0.0, 1.0);
        let stored: Vec<T> = narrow(&master);
        let wide = widen(&stored);
        let (indices, weights, offsets) = random_bags(&mut rng, rows, bags, max_size);
        let want = obag::bag_forward(&wide, rows, dim, &indices, &weights, &offsets).unwrap();
        let table = Table::new(&stored, rows, dim).unwrap();
        for cpu in pools() {
            each_kernel(|k| {
                assert_forward(
                    &cpu,
                    &table,
                    (&indices, &weights, &offsets),
                    &want,
                    format_args!(
                        "{:?} rows {rows} dim {dim} threads {} kernel {k}",
                        T::DTYPE,
                        cpu.threads()
                    ),
                );
            });
        }
    }
}

#[test]
fn forward_is_bit_identical_f32() {
    check_forward::<f32>(1);
}

#[test]
fn forward_is_bit_identical_f16() {
    check_forward::<f16>(2);
}

#[test]
fn forward_is_bit_identical_bf16() {
    check_forward::<bf16>(3);
}

/// Every 16-bit pattern (subnormals, ±0, ±inf, NaNs) as a table of one-row
/// bags with weight 1 and -0.5: the widening of each family matches the oracle's.
fn check_every_bit_pattern<T: Storage>(from_bits: impl Fn(u16) -> T, dim: usize) {
    let stored: Vec<T> = (0..=u16::MAX).map(&from_bits).collect();
    let rows = stored.len() / dim;
    let stored = &stored[..rows * dim];
    let wide = widen(stored);
    let indices: Vec<u32> = (0..rows as u32).chain(0..rows as u32).collect();
    let weights: Vec<f32> = (0..2 * rows)
        .map(|e| if e < rows { 1.0 } else { -0.5 })
        .collect();
    let offsets: Vec<usize> = (0..=2 * rows).collect();
    let want = obag::bag_forward(&wide, rows, dim, &indices, &weights, &offsets).unwrap();
    let table = Table::new(stored, rows, dim).unwrap();
    let cpu = Cpu::new(2).unwrap();
    each_kernel(|k| {
        let mut out = vec![0.0; 2 * rows * dim];
        cpu.bag_forward(&table, &indices, &weights, &offsets, &mut out)
            .unwrap();
        assert_eq!(bits(&out), bits(&want), "{:?} kernel {k}", T::DTYPE);
    });
}

#[test]
fn forward_widens_every_16_bit_pattern_exactly() {
    // 48: three 16-lane vectors (the 4-row loop); 64: four (AVX-512's registers)
    for dim in [48, 64] {
        check_every_bit_pattern(f16::from_bits, dim);
        check_every_bit_pattern(bf16::from_bits, dim);
    }
}

/// The prefetch knobs change no result: every pattern and distance (none, a
/// few rows, far past the last entry), either cache level, with and without
/// the register path; also bags that are all empty, and a single entry.
#[test]
fn forward_is_bit_identical_under_every_prefetch_setting() {
    let mut rng = Rng::new(7);
    let cpu = Cpu::new(2).unwrap();
    for &(rows, dim, bags, max_size) in &[
        (300usize, 256usize, 40usize, 50usize),
        (200, 64, 30, 9),
        (50, 64, 7, 0),
        (50, 32, 1, 1),
    ] {
        let table_f32 = rng.normal_vec(rows * dim, 0.0, 1.0);
        let stored: Vec<f16> = narrow(&table_f32);
        let wide = widen(&stored);
        let (indices, weights, offsets) = random_bags(&mut rng, rows, bags, max_size);
        let want = obag::bag_forward(&wide, rows, dim, &indices, &weights, &offsets).unwrap();
        let table = Table::new(&stored, rows, dim).unwrap();
        each_kernel(|k| {
            for mode in 0..4 {
                for bytes in [0, 1024, 1 << 20] {
                    for reg in [true, false] {
                        for l2 in [true, false] {
                            simd::set_prefetch_mode(mode);
                            simd::set_prefetch_bytes(bytes);
                            simd::set_prefetch_l2(l2);
                            simd::set_register_accumulators(reg);
                            assert_forward(
                                &cpu,
                                &table,
                                (&indices, &weights, &offsets),
                                &want,
                                format_args!(
                                    "dim {dim} kernel {k} mode {mode} bytes {bytes} reg {reg} l2 {l2}"
                                ),
                            );
                        }
                    }
                }
            }
            simd::reset_prefetch();
            simd::set_prefetch_l2(true);
            simd::set_register_accumulators(true);
        });
    }
}

#[test]
fn forward_any_dispatches_on_dtype() {
    let mut rng = Rng::new(4);
    let (rows, dim) = (20, 16);
    let master = rng.normal_vec(rows * dim, 0.0, 1.0);
    let h: Vec<f16> = narrow(&master);
    let (indices, weights, offsets) = random_bags(&mut rng, rows, 5, 6);
    let want = obag::bag_forward(&widen(&h), rows, dim, &indices, &weights, &offsets).unwrap();
    let mut out = vec![0.0; 5 * dim];
    let t = memlayer_cpu::TableRef::F16(Table::new(&h, rows, dim).unwrap());
    assert_eq!(t.dtype(), memlayer_cpu::DType::F16);
    bag::bag_forward_any(t, &indices, &weights, &offsets, &mut out).unwrap();
    assert_eq!(bits(&out), bits(&want));
}

fn check_paged<T: Storage>(seed: u64, rows: usize, dim: usize, page_rows: usize, spb: usize) {
    let mut rng = Rng::new(seed);
    let pages = rows.div_ceil(page_rows);
    let master = rng.normal_vec(rows * dim, 0.0, 1.0);
    let stored: Vec<T> = narrow(&master);
    // random page -> slot map over several buffers, with spare slots
    let n_slots = pages + 4;
    let mut slots: Vec<u32> = (0..n_slots as u32).collect();
    rng.shuffle(&mut slots);
    let page_to_slot = &slots[..pages];
    let n_buf = n_slots.div_ceil(spb);
    let mut bufs: Vec<Vec<T>> = (0..n_buf)
        .map(|_| vec![T::from_f32(f32::NAN); spb * page_rows * dim])
        .collect();
    for (p, &s) in page_to_slot.iter().enumerate() {
        let (b, i) = (s as usize / spb, s as usize % spb);
        for r in 0..page_rows {
            let row = p * page_rows + r;
            if row < rows {
                bufs[b][(i * page_rows + r) * dim..][..dim]
                    .copy_from_slice(&stored[row * dim..][..dim]);
            }
        }
    }
    let buf_refs: Vec<&[T]> = bufs.iter().map(|b| b.as_slice()).collect();
    let paged = PagedTable::new(rows, dim, page_rows, page_to_slot, spb, &buf_refs).unwrap();
    let (indices, weights, offsets) = random_bags(&mut rng, rows, 40, 30);
    let want = obag::bag_forward(&widen(&stored), rows, dim, &indices, &weights, &offsets).unwrap();
    for cpu in pools() {
        each_kernel(|k| {
            assert_forward(
                &cpu,
                &paged,
                (&indices, &weights, &offsets),
                &want,
                format_args!("{:?} threads {} kernel {k}", T::DTYPE, cpu.threads()),
            );
        });
    }
    // a page that is not resident fails loudly
    let mut holes = page_to_slot.to_vec();
    holes[3] = memlayer_bank::cache::NO_SLOT;
    let paged = PagedTable::new(rows, dim, page_rows, &holes, spb, &buf_refs).unwrap();
    let mut out = vec![0.0; dim];
    let err =
        bag::bag_forward(&paged, &[3 * page_rows as u32], &[1.0], &[0, 1], &mut out).unwrap_err();
    assert!(
        matches!(err, CpuError::PageNotResident { page: 3, .. }),
        "{err}"
    );
}

#[test]
fn paged_forward_matches_the_dense_oracle() {
    // rows not a multiple of page_rows (the last page is partial); divisions
    check_paged::<f32>(10, 101, 12, 8, 3);
    check_paged::<f16>(11, 101, 12, 8, 3);
    check_paged::<bf16>(12, 101, 12, 8, 3);
    // powers of two: shifts
    check_paged::<f32>(13, 256, 16, 8, 4);
    check_paged::<f16>(14, 250, 24, 16, 2);
    check_paged::<bf16>(15, 64, 8, 1, 1);
}

#[test]
fn backward_table_is_bit_identical() {
    let mut rng = Rng::new(20);
    for &(rows, dim, bags, max_size) in &[
        (10usize, 3usize, 7usize, 8usize),
        (1000, 64, 200, 128),
        (50, 17, 0, 1),
        (5, 256, 30, 40),
    ] {
        let (indices, weights, offsets) = random_bags(&mut rng, rows, bags, max_size);
        let grad = rng.normal_vec(bags * dim, 0.0, 1.0);
        let want =
            obag::bag_backward_table(rows, dim, &indices, &weights, &offsets, &grad).unwrap();
        for cpu in pools() {
            let got = cpu
                .install(|| bag::bag_backward_table(rows, dim, &indices, &weights, &offsets, &grad))
                .unwrap();
            assert_eq!(got.rows, want.rows);
            assert_eq!(got.dim, want.dim);
            assert_eq!(
                bits(&got.grads),
                bits(&want.grads),
                "threads {}",
                cpu.threads()
            );
            let mut dense = vec![f32::NAN; rows * dim];
            cpu.install(|| {
                bag::bag_backward_table_dense(
                    rows, dim, &indices, &weights, &offsets, &grad, &mut dense,
                )
            })
            .unwrap();
            assert_eq!(
                bits(&dense),
                bits(&want.to_dense(rows)),
                "dense, threads {}",
                cpu.threads()
            );
        }
    }
}

fn check_backward_weights<T: Storage>(seed: u64) {
    let mut rng = Rng::new(seed);
    for &(rows, dim, bags) in &[(40usize, 7usize, 9usize), (500, 256, 50), (30, 33, 5)] {
        let master = rng.normal_vec(rows * dim, 0.0, 1.0);
        let stored: Vec<T> = narrow(&master);
        let wide = widen(&stored);
        let (indices, _, offsets) = random_bags(&mut rng, rows, bags, 20);
        let grad = rng.normal_vec(bags * dim, 0.0, 1.0);
        let want = obag::bag_backward_weights(&wide, rows, dim, &indices, &offsets, &grad).unwrap();
        let table = Table::new(&stored, rows, dim).unwrap();
        for cpu in pools() {
            each_kernel(|_| {
                let mut dw = vec![f32::NAN; indices.len()];
                cpu.install(|| {
                    bag::bag_backward_weights(&table, &indices, &offsets, &grad, &mut dw)
                })
                .unwrap();
                let mut bag_of = vec![0; indices.len()];
                for b in 0..bags {
                    bag_of[offsets[b]..offsets[b + 1]].fill(b);
                }
                for e in 0..indices.len() {
                    // tolerance relative to Σ|row * grad|
                    let r = indices[e] as usize;
                    let mag: f32 = (0..dim)
                        .map(|d| (wide[r * dim + d] * grad[bag_of[e] * dim + d]).abs())
                        .sum();
                    assert!(
                        (dw[e] - want[e]).abs() <= 1e-6 * mag + 1e-30,
                        "entry {e}: {} vs {}",
                        dw[e],
                        want[e]
                    );
                }
            });
        }
    }
}

#[test]
fn backward_weights_match_to_rounding() {
    check_backward_weights::<f32>(30);
    check_backward_weights::<f16>(31);
    check_backward_weights::<bf16>(32);
}

#[test]
fn bag_errors() {
    let t = [0.0f32; 8];
    let table = Table::new(&t, 4, 2).unwrap();
    let mut out = [0.0; 2];
    assert!(matches!(
        bag::bag_forward(&table, &[4], &[1.0], &[0, 1], &mut out),
        Err(CpuError::IndexOutOfRange { index: 4, rows: 4 })
    ));
    assert!(bag::bag_forward(&table, &[0], &[1.0], &[0, 2], &mut out).is_err());
    assert!(bag::bag_forward(&table, &[0], &[], &[0, 1], &mut out).is_err());
    assert!(bag::bag_forward(&table, &[0, 1], &[1.0, 1.0], &[0, 2, 1], &mut out).is_err());
    assert!(bag::bag_forward(&table, &[0], &[1.0], &[0, 1], &mut [0.0; 3]).is_err());
    assert!(Table::new(&t, 3, 2).is_err());
}

fn cfg(n_keys: usize, heads: usize, knn: usize, k_dim: usize, qk_norm: bool) -> PkmConfig {
    PkmConfig {
        dim: 8,
        v_dim: 8,
        heads,
        n_keys,
        k_dim,
        knn,
        qk_norm,
        gated: false,
    }
}

fn assert_lookup_eq(got: &opkm::Lookup, want: &opkm::Lookup, what: &str) {
    assert_eq!(got.indices, want.indices, "indices: {what}");
    assert_eq!(bits(&got.scores), bits(&want.scores), "scores: {what}");
    assert_eq!(bits(&got.weights), bits(&want.weights), "weights: {what}");
}

/// Keys and queries: Gaussian, or integer-valued in {-1, 0, 1} (many exact ties).
fn keys_and_query(rng: &mut Rng, c: &PkmConfig, tokens: usize, ties: bool) -> (Vec<f32>, Vec<f32>) {
    let nk = c.heads * 2 * c.n_keys * c.half();
    let nq = tokens * c.heads * c.k_dim;
    if ties {
        let tri = |rng: &mut Rng, n| {
            (0..n)
                .map(|_| rng.below(3) as f32 - 1.0)
                .collect::<Vec<_>>()
        };
        (tri(rng, nk), tri(rng, nq))
    } else {
        (rng.normal_vec(nk, 0.0, 1.0), rng.normal_vec(nq, 0.0, 1.0))
    }
}

#[test]
fn lookup_is_bit_identical() {
    let mut rng = Rng::new(40);
    let cases = [
        // (n_keys, heads, knn, k_dim, tokens)
        (16usize, 1usize, 4usize, 8usize, 7usize),
        (100, 4, 32, 16, 7),
        (100, 1, 1, 6, 1),
        (100, 4, 100, 4, 7),
        (37, 2, 37, 2, 5),
        (33, 4, 8, 34, 0),
        (64, 4, 32, 64, 1024),
        (100, 1, 5, 2, 64),
        // threshold top-k path (k * 8 <= n_keys), heads 4, ties and qk-norm
        (1000, 4, 32, 8, 9),
        (300, 2, 3, 2, 33),
    ];
    for &(n_keys, heads, knn, k_dim, tokens) in &cases {
        for qk_norm in [false, true] {
            for ties in [false, true] {
                let c = cfg(n_keys, heads, knn, k_dim, qk_norm);
                let (keys, query) = keys_and_query(&mut rng, &c, tokens, ties);
                let want = opkm::lookup(&c, &keys, &query, tokens).unwrap();
                let prepared = pkm::PreparedKeys::new(&c, &keys).unwrap();
                for cpu in pools() {
                    each_kernel(|k| {
                        let got = cpu.lookup(&prepared, &query, tokens).unwrap();
                        assert_lookup_eq(
                            &got,
                            &want,
                            &format!(
                                "{c:?} tokens {tokens} ties {ties} threads {} kernel {k}",
                                cpu.threads()
                            ),
                        );
                    });
                }
            }
        }
    }
}

#[test]
fn lookup_with_non_finite_scores() {
    let mut rng = Rng::new(41);
    let c = cfg(20, 2, 6, 4, false);
    let (keys, mut query) = keys_and_query(&mut rng, &c, 5, false);
    query[0] = f32::INFINITY;
    query[5] = f32::NEG_INFINITY;
    query[9] = f32::NAN;
    let want = opkm::lookup(&c, &keys, &query, 5).unwrap();
    each_kernel(|k| {
        let got = pkm::lookup_keys(&c, &keys, &query, 5).unwrap();
        assert_lookup_eq(&got, &want, &format!("non-finite, kernel {k}"));
    });
}

#[test]
fn scores_backward_is_bit_identical() {
    let mut rng = Rng::new(50);
    for &(n_keys, heads, knn, k_dim, tokens) in &[
        (16usize, 1usize, 4usize, 8usize, 7usize),
        (100, 4, 32, 16, 64),
        (10, 2, 10, 6, 1),
        (12, 4, 3, 4, 0),
    ] {
        for qk_norm in [false, true] {
            let c = cfg(n_keys, heads, knn, k_dim, qk_norm);
            let (keys, query) = keys_and_query(&mut rng, &c, tokens, false);
            let lk = opkm::lookup(&c, &keys, &query, tokens).unwrap();
            let mut d_scores = rng.normal_vec(lk.scores.len(), 0.0, 1.0);
            for (i, d) in d_scores.iter_mut().enumerate() {
                if i % 7 == 3 {
                    *d = 0.0;
                }
            }
            let (wk, wq) =
                opkm::scores_backward(&c, &keys, &query, tokens, &lk.indices, &d_scores).unwrap();
            for cpu in pools() {
                let (gk, gq) = cpu
                    .install(|| {
                        pkm::scores_backward(&c, &keys, &query, tokens, &lk.indices, &d_scores)
                    })
                    .unwrap();
                assert_eq!(
                    bits(&gk),
                    bits(&wk),
                    "d_keys {c:?} threads {}",
                    cpu.threads()
                );
                assert_eq!(
                    bits(&gq),
                    bits(&wq),
                    "d_query {c:?} threads {}",
                    cpu.threads()
                );
            }
            let dw = rng.normal_vec(lk.weights.len(), 0.0, 1.0);
            assert_eq!(
                bits(&pkm::softmax_backward_rows(knn, &lk.weights, &dw)),
                bits(&opkm::softmax_backward_rows(knn, &lk.weights, &dw))
            );
        }
    }
}

#[test]
fn kernel_families_are_detected_and_forced_by_name() {
    let _guard = KERNEL.lock().unwrap_or_else(|e| e.into_inner());
    let avail = simd::available();
    assert_eq!(avail[0], simd::detected());
    assert_eq!(*avail.last().unwrap(), Kernel::Portable);
    #[cfg(target_arch = "aarch64")]
    assert_eq!(
        simd::detected(),
        Kernel::Neon,
        "every aarch64 Linux CPU has NEON"
    );
    #[cfg(target_arch = "x86_64")]
    {
        assert_ne!(simd::detected(), Kernel::Neon);
        // the parity tests run AVX-512 wherever the CPU has it, and AVX2 beside it
        if std::is_x86_feature_detected!("avx512f") {
            assert_eq!(simd::detected(), Kernel::Avx512);
            assert_eq!(avail[1], Kernel::Avx2);
        }
    }
    for k in Kernel::ALL {
        assert_eq!(Kernel::from_name(k.name()), Some(k));
        let forced = simd::force_kernel(Some(k));
        if avail.contains(&k) {
            forced.unwrap();
            assert_eq!(simd::kernel(), k);
        } else {
            let err = forced.unwrap_err().to_string();
            assert!(
                err.contains(k.name()) && err.contains("do not run"),
                "{err}"
            );
            assert_eq!(
                simd::kernel(),
                simd::detected(),
                "a refused family changes nothing"
            );
        }
        simd::force_kernel(None).unwrap();
    }
    assert_eq!(simd::kernel(), simd::detected());
}

#[test]
fn bandwidth_probe_runs() {
    let cpu = Cpu::new(2).unwrap();
    let b = cpu.copy_bandwidth(8 << 20, 2);
    assert!(b.gbps > 0.0 && b.gbps.is_finite());
    assert_eq!((b.bytes, b.threads), (8 << 20, 2));
    let r = cpu.install(|| memlayer_cpu::bandwidth::read_bandwidth(8 << 20, 2));
    assert!(r.gbps > 0.0);
}
