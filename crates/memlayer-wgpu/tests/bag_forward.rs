//! Embedding-bag forward kernel against the CPU oracle (`memlayer_core::bag::bag_forward`).
//!
//! When the table takes at most `SHARDS_PER_PASS` shards the kernel sums each
//! bag's entries in the oracle's order and rounds every product before adding
//! it, so outputs are asserted bit-identical. With more shards the kernel runs
//! one pass per group of shards and the sum is grouped by shard: asserted
//! within 1e-5 relative.

mod common;

use common::Bags;

use memlayer_core::bag::{bag_forward, uniform_offsets};
use memlayer_core::pkm::{self, PkmConfig};
use memlayer_core::rng::Rng;
use memlayer_wgpu::bag_forward::{BagForward, BagTable, MISSING_PAGE, SHARDS_PER_PASS};
use memlayer_wgpu::buffers::{decode_rows, encode_rows, read_back, storage_init, storage_zeroed};
use memlayer_wgpu::lookup::{LookupBuffers, LookupKernels, LookupPlan};
use memlayer_wgpu::{GpuContext, GpuDtype, GpuOptions, ShardedTable, gpu_for_tests};

/// Random CSR bags over `rows` rows: sizes 0..=max_bag (empty bags included),
/// repeated indices, weights N(0, 1).
fn random_bags(
    rng: &mut Rng,
    bags: usize,
    max_bag: usize,
    rows: usize,
) -> (Vec<u32>, Vec<f32>, Vec<usize>) {
    let mut offsets = vec![0];
    let mut indices = Vec::new();
    for b in 0..bags {
        let n = if b % 5 == 1 {
            0
        } else {
            rng.below(max_bag as u64 + 1) as usize
        };
        for i in 0..n {
            // every third entry repeats the previous row
            if i > 0 && i % 3 == 0 {
                indices.push(*indices.last().unwrap());
            } else {
                indices.push(rng.below(rows as u64) as u32);
            }
        }
        offsets.push(indices.len());
    }
    let weights = rng.normal_vec(indices.len(), 0.0, 1.0);
    (indices, weights, offsets)
}

/// The table as the device stores it (f16/bf16-rounded for F16/Bf16).
fn stored(data: &[f32], dim: usize, dtype: GpuDtype) -> Vec<f32> {
    decode_rows(&encode_rows(data, dim, dtype), dim, dtype)
}

fn assert_close(want: &[f32], got: &[f32], exact: bool, what: &str) {
    assert_eq!(want.len(), got.len(), "{what}: lengths");
    for (i, (a, b)) in want.iter().zip(got).enumerate() {
        if exact {
            assert!(
                a.to_bits() == b.to_bits(),
                "{what}: element {i}: oracle {a:e} gpu {b:e} (not bit-identical)"
            );
        } else {
            assert!(
                (a - b).abs() <= 1e-5 * a.abs().max(1.0),
                "{what}: element {i}: oracle {a} gpu {b}"
            );
        }
    }
}

fn small_binding_ctx(bytes: u64) -> Option<GpuContext> {
    gpu_for_tests(GpuOptions {
        max_binding_bytes: Some(bytes),
        ..Default::default()
    })
}

#[test]
fn flat_tables_f32_f16_and_bf16_over_many_widths() {
    let Some(ctx) = gpu_for_tests(GpuOptions::default()) else {
        return;
    };
    let mut bag = BagForward::new(&ctx).unwrap();
    let mut rng = Rng::new(1);
    // widths cover: one word, fewer words than a lane's 4, odd f16 (padding
    // half), several bags per workgroup, exactly 256 lanes, rows wider than
    // one block of words (4 × 256 u32, 16 × 256 vec4 f32, 8 × 256 vec4 f16),
    // and f16 widths that are a multiple of 4 but not 8 (u32 kernel)
    for dim in [1, 3, 8, 12, 37, 64, 256, 1024, 2052, 2500, 4099, 16392] {
        for dtype in [GpuDtype::F32, GpuDtype::F16, GpuDtype::Bf16] {
            let rows = 300;
            let data = rng.normal_vec(rows * dim, 0.0, 1.0);
            let table = ShardedTable::upload(&ctx, "values", &data, rows, dim, dtype).unwrap();
            assert_eq!(table.shards.len(), 1);
            let bags = if dim > 1000 { 40 } else { 333 };
            let (idx, w, off) = random_bags(&mut rng, bags, 12, rows);
            let want = bag_forward(&stored(&data, dim, dtype), rows, dim, &idx, &w, &off).unwrap();
            // both kernels: 16-byte loads where the width allows, u32 loads
            for vectorised in [Some(true), Some(false), None] {
                bag.vectorised = vectorised;
                let got = bag.run_flat(&ctx, &table, &idx, &w, &off).unwrap();
                assert_close(
                    &want,
                    &got,
                    true,
                    &format!("dim {dim} {dtype:?} vectorised {vectorised:?}"),
                );
            }
        }
    }
}

#[test]
fn many_bags_and_large_bags() {
    let Some(ctx) = gpu_for_tests(GpuOptions::default()) else {
        return;
    };
    let bag = BagForward::new(&ctx).unwrap();
    let mut rng = Rng::new(2);
    let (rows, dim) = (5000, 32);
    let data = rng.normal_vec(rows * dim, 0.0, 1.0);
    let table = ShardedTable::upload(&ctx, "values", &data, rows, dim, GpuDtype::F32).unwrap();
    // 70 000 bags of 32-wide rows: 8 bags per workgroup, more than 65535
    // workgroups would be needed at 1 bag each
    let (idx, w, off) = random_bags(&mut rng, 70_000, 6, rows);
    let want = bag_forward(&data, rows, dim, &idx, &w, &off).unwrap();
    let got = bag.run_flat(&ctx, &table, &idx, &w, &off).unwrap();
    assert_close(&want, &got, true, "70k bags");
    // a few bags of 2000 entries
    let (idx, w, off) = random_bags(&mut rng, 4, 2000, rows);
    let want = bag_forward(&data, rows, dim, &idx, &w, &off).unwrap();
    let got = bag.run_flat(&ctx, &table, &idx, &w, &off).unwrap();
    assert_close(&want, &got, true, "large bags");
}

#[test]
fn flat_tables_spanning_shards_under_a_small_binding_limit() {
    // 64 KiB bindings
    let Some(ctx) = small_binding_ctx(64 * 1024) else {
        return;
    };
    let bag = BagForward::new(&ctx).unwrap();
    let mut rng = Rng::new(3);
    for (rows, dim, dtype) in [
        (500, 64, GpuDtype::F32),   // 128 KB: 2 shards, one pass
        (700, 64, GpuDtype::F32),   // 3 shards, one pass
        (1000, 64, GpuDtype::F16),  // 128 KB: 2 shards
        (1700, 61, GpuDtype::F32),  // 7 shards: 3 passes
        (3000, 37, GpuDtype::F16),  // 76 KB: 2 shards, odd width
        (9000, 40, GpuDtype::F16),  // 720 KB: 12 shards, 4 passes
        (1000, 64, GpuDtype::Bf16), // 128 KB: 2 shards
        (3000, 37, GpuDtype::Bf16), // 76 KB: 2 shards, odd width
    ] {
        let data = rng.normal_vec(rows * dim, 0.0, 1.0);
        let table = ShardedTable::upload(&ctx, "values", &data, rows, dim, dtype).unwrap();
        let n_shards = table.shards.len();
        assert!(n_shards >= 2, "{rows}×{dim}: {n_shards} shard(s)");
        let bags = (60 * 1024 / (dim * 4)).min(200);
        let (idx, w, off) = random_bags(&mut rng, bags, 16, rows);
        let want = bag_forward(&stored(&data, dim, dtype), rows, dim, &idx, &w, &off).unwrap();
        let got = bag.run_flat(&ctx, &table, &idx, &w, &off).unwrap();
        let single_pass = n_shards <= SHARDS_PER_PASS;
        assert_close(
            &want,
            &got,
            single_pass,
            &format!("{rows}×{dim} {dtype:?} in {n_shards} shards"),
        );
    }
}

/// A virtual table of `n_pages` pages; `resident` of them sit in a pool of
/// `n_slots` slots in random order; the rest are missing. Returns the virtual
/// table (rows of missing pages are zero and never referenced), the page
/// table and the slot pool contents.
fn paged_setup(
    rng: &mut Rng,
    n_pages: usize,
    resident: usize,
    n_slots: usize,
    page_rows: usize,
    dim: usize,
) -> (Vec<f32>, Vec<u32>, Vec<f32>, Vec<usize>) {
    let virt = rng.normal_vec(n_pages * page_rows * dim, 0.0, 1.0);
    let mut pages: Vec<usize> = (0..n_pages).collect();
    rng.shuffle(&mut pages);
    let mut slots: Vec<usize> = (0..n_slots).collect();
    rng.shuffle(&mut slots);
    let mut page_table = vec![MISSING_PAGE; n_pages];
    let mut pool = rng.normal_vec(n_slots * page_rows * dim, 0.0, 1.0); // garbage in free slots
    for (&p, &s) in pages.iter().zip(&slots).take(resident) {
        page_table[p] = s as u32;
        let n = page_rows * dim;
        pool[s * n..(s + 1) * n].copy_from_slice(&virt[p * n..(p + 1) * n]);
    }
    let resident_pages: Vec<usize> = pages[..resident].to_vec();
    (virt, page_table, pool, resident_pages)
}

/// Runs one paged case against the oracle; returns the slot pool's shard count.
fn paged_case(
    ctx: &GpuContext,
    bag: &BagForward,
    seed: u64,
    dtype: GpuDtype,
    dim: usize,
    page_rows: usize,
) -> usize {
    let mut rng = Rng::new(seed);
    let (n_pages, resident, n_slots) = (60, 35, 48);
    let (virt, page_table, pool, resident_pages) =
        paged_setup(&mut rng, n_pages, resident, n_slots, page_rows, dim);
    let slots =
        ShardedTable::zeroed(ctx, "slots", n_slots * page_rows, dim, dtype, page_rows).unwrap();
    slots
        .write_rows(ctx, 0, &encode_rows(&pool, dim, dtype))
        .unwrap();
    // entries only on resident pages; the output must fit one binding
    let bags = (ctx.max_binding_bytes() as usize / (dim * 4)).min(150);
    let (mut idx, w, off) = random_bags(&mut rng, bags, 20, resident * page_rows);
    for i in &mut idx {
        let p = resident_pages[*i as usize / page_rows];
        *i = (p * page_rows + *i as usize % page_rows) as u32;
    }
    let rows = n_pages * page_rows;
    let want = bag_forward(&stored(&virt, dim, dtype), rows, dim, &idx, &w, &off).unwrap();
    let got = bag
        .run_paged(ctx, &slots, page_rows, &page_table, &idx, &w, &off)
        .unwrap();
    let n_shards = slots.shards.len();
    assert_close(
        &want,
        &got,
        n_shards <= SHARDS_PER_PASS,
        &format!("paged {dtype:?} dim {dim}, {n_shards} shard(s)"),
    );
    n_shards
}

#[test]
fn paged_tables_with_random_slots_and_a_partly_filled_pool() {
    let Some(ctx) = gpu_for_tests(GpuOptions::default()) else {
        return;
    };
    let bag = BagForward::new(&ctx).unwrap();
    // page_rows 8 (shift and mask) and 6 (division)
    for (i, (dtype, dim, page_rows)) in [
        (GpuDtype::F32, 64, 8),
        (GpuDtype::F16, 64, 8),
        (GpuDtype::F16, 37, 8),
        (GpuDtype::F32, 5, 8),
        (GpuDtype::F32, 64, 6),
        (GpuDtype::F16, 37, 6),
        (GpuDtype::Bf16, 64, 8),
        (GpuDtype::Bf16, 37, 8),
        (GpuDtype::Bf16, 37, 6),
    ]
    .into_iter()
    .enumerate()
    {
        assert_eq!(
            paged_case(&ctx, &bag, 10 + i as u64, dtype, dim, page_rows),
            1
        );
    }
}

#[test]
fn paged_tables_spanning_shards_under_a_small_binding_limit() {
    // 8 KiB bindings: a slot pool of 48 pages × 8 rows × 64 f32 (96 KiB)
    // takes 12 shards of 4 pages (4 passes); f16 takes 6 (2 passes)
    let Some(ctx) = small_binding_ctx(8 * 1024) else {
        return;
    };
    let bag = BagForward::new(&ctx).unwrap();
    assert_eq!(paged_case(&ctx, &bag, 20, GpuDtype::F32, 64, 8), 12);
    assert_eq!(paged_case(&ctx, &bag, 21, GpuDtype::F16, 64, 8), 6);
    assert_eq!(paged_case(&ctx, &bag, 24, GpuDtype::Bf16, 64, 8), 6);
    // odd width (u32-load kernel): 6 pages a shard, 8 shards, 3 passes
    assert_eq!(paged_case(&ctx, &bag, 23, GpuDtype::F32, 37, 8), 8);
    // 36 KiB: 3 shards, a single (bit-identical) pass
    let Some(ctx) = small_binding_ctx(36 * 1024) else {
        return;
    };
    let bag = BagForward::new(&ctx).unwrap();
    assert_eq!(paged_case(&ctx, &bag, 22, GpuDtype::F32, 64, 8), 3);
}

#[test]
fn missing_pages_are_errors_on_the_host_and_nan_on_the_device() {
    let Some(ctx) = gpu_for_tests(GpuOptions::default()) else {
        return;
    };
    let bag = BagForward::new(&ctx).unwrap();
    // 16: bag_forward_vec4.wgsl, 15: bag_forward.wgsl
    for dim in [16, 15] {
        missing_pages_case(&ctx, &bag, dim);
    }
}

fn missing_pages_case(ctx: &GpuContext, bag: &BagForward, dim: usize) {
    let mut rng = Rng::new(30);
    let (page_rows, n_pages, n_slots) = (4, 10, 6);
    let (_, mut page_table, pool, _) = paged_setup(&mut rng, n_pages, 6, n_slots, page_rows, dim);
    let missing = page_table.iter().position(|&s| s == MISSING_PAGE).unwrap();
    let present = page_table.iter().position(|&s| s != MISSING_PAGE).unwrap();
    page_table[n_pages - 1] = 77; // a slot outside the pool
    if present == n_pages - 1 {
        panic!("test setup: pick another seed");
    }
    let slots =
        ShardedTable::zeroed(ctx, "slots", n_slots * page_rows, dim, GpuDtype::F32, 4).unwrap();
    slots
        .write_rows(ctx, 0, &encode_rows(&pool, dim, GpuDtype::F32))
        .unwrap();
    let row_on = |p: usize| (p * page_rows + 1) as u32;
    // bag 0: resident only; bag 1: touches the missing page; bag 2: empty;
    // bag 3: the out-of-pool slot; bag 4: resident only
    let bags = Bags {
        indices: vec![
            row_on(present),
            row_on(present),
            row_on(missing),
            row_on(n_pages - 1),
            row_on(present),
        ],
        weights: vec![1.0, 0.5, 2.0, 1.0, -1.0],
        offsets: vec![0, 1, 3, 3, 4, 5],
    };
    let e = bags
        .run_paged(bag, ctx, &slots, page_rows, &page_table)
        .unwrap_err()
        .to_string();
    assert!(e.contains(&format!("page {missing} is missing")), "{e}");
    // the device path: bags touching bad pages come out NaN, the others exact
    let ib = storage_init(ctx, "i", &bags.indices);
    let wb = storage_init(ctx, "w", &bags.weights);
    let offsets32: Vec<u32> = bags.offsets.iter().map(|&o| o as u32).collect();
    let ob = storage_init(ctx, "o", &offsets32);
    let pt = storage_init(ctx, "pt", &page_table);
    let out = storage_zeroed(ctx, "out", 5 * dim as u64 * 4);
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    let table = BagTable::Paged {
        slots: &slots,
        page_rows,
        n_pages,
        page_table: &pt,
    };
    bag.record(ctx, &mut enc, table, &ib, &wb, &ob, 5, &out)
        .unwrap();
    ctx.queue.submit([enc.finish()]);
    let got: Vec<f32> = read_back(ctx, &out, 0, 5 * dim).unwrap();
    let slot = page_table[present] as usize;
    let row = &pool[(slot * page_rows + 1) * dim..][..dim];
    for (b, want) in [
        (0, Some(1.0f32)),
        (1, None),
        (2, Some(0.0)),
        (3, None),
        (4, Some(-1.0)),
    ] {
        let g = &got[b * dim..(b + 1) * dim];
        match want {
            Some(wt) => {
                for (c, v) in g.iter().enumerate() {
                    assert_eq!(*v, wt * row[c], "bag {b}");
                }
            }
            None => assert!(g.iter().all(|v| v.is_nan()), "bag {b} should be NaN: {g:?}"),
        }
    }
    // a flat table: rows past the end are NaN on the device too
    let flat =
        ShardedTable::upload(ctx, "flat", &pool, n_slots * page_rows, dim, GpuDtype::F32).unwrap();
    let bad = storage_init(ctx, "i", &[0u32, 24, 3, 1000, 2]);
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    bag.record(
        ctx,
        &mut enc,
        BagTable::Flat(&flat),
        &bad,
        &wb,
        &ob,
        5,
        &out,
    )
    .unwrap();
    ctx.queue.submit([enc.finish()]);
    let got: Vec<f32> = read_back(ctx, &out, 0, 5 * dim).unwrap();
    assert!(got[..dim].iter().all(|v| v.is_finite()));
    assert!(got[dim..2 * dim].iter().all(|v| v.is_nan()), "row 24 of 24");
    assert!(got[3 * dim..4 * dim].iter().all(|v| v.is_nan()), "row 1000");
    assert!(got[4 * dim..].iter().all(|v| v.is_finite()));
}

#[test]
fn empty_inputs_and_bad_arguments() {
    let Some(ctx) = gpu_for_tests(GpuOptions::default()) else {
        return;
    };
    let bag = BagForward::new(&ctx).unwrap();
    let data: Vec<f32> = (0..40).map(|i| i as f32).collect();
    let table = ShardedTable::upload(&ctx, "t", &data, 10, 4, GpuDtype::F32).unwrap();
    // zero bags; bags without entries
    assert!(
        bag.run_flat(&ctx, &table, &[], &[], &[0])
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        bag.run_flat(&ctx, &table, &[], &[], &[0, 0, 0]).unwrap(),
        vec![0.0; 8]
    );
    let err = |r: Result<Vec<f32>, memlayer_wgpu::GpuError>| r.unwrap_err().to_string();
    let e = err(bag.run_flat(&ctx, &table, &[1, 2], &[1.0], &[0, 2]));
    assert!(e.contains("per-sample weights"), "{e}");
    let e = err(bag.run_flat(&ctx, &table, &[1, 10], &[1.0, 1.0], &[0, 2]));
    assert!(e.contains("out of range"), "{e}");
    let e = err(bag.run_flat(&ctx, &table, &[1, 2], &[1.0, 1.0], &[0, 1]));
    assert!(e.contains("end at 2"), "{e}");
    let e = err(bag.run_flat(&ctx, &table, &[1, 2], &[1.0, 1.0], &[0, 2, 1, 2]));
    assert!(e.contains("non-decreasing"), "{e}");
    let e = err(bag.run_flat(&ctx, &table, &[], &[], &[]));
    assert!(e.contains("bags + 1"), "{e}");
    // paged: page_rows must not let a page straddle shards; index past the pages
    let e = err(bag.run_paged(&ctx, &table, 3, &[0, 1, 2], &[1], &[1.0], &[0, 1]));
    assert!(e.contains("straddle"), "{e}");
    let e = err(bag.run_paged(&ctx, &table, 5, &[0], &[7], &[1.0], &[0, 1]));
    assert!(e.contains("out of range"), "{e}");
    let e = err(bag.run_paged(&ctx, &table, 0, &[0], &[0], &[1.0], &[0, 1]));
    assert!(e.contains("page_rows"), "{e}");
    // record-level buffer checks
    let small = storage_zeroed(&ctx, "small", 4);
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    let e = bag
        .record(
            &ctx,
            &mut enc,
            BagTable::Flat(&table),
            &small,
            &small,
            &small,
            3,
            &small,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("output"), "{e}");
}

/// Lookup → bag on the device, no read-back in between: the PKM memory
/// read `m` of `memlayer_core::pkm` for a batch of tokens.
#[test]
fn lookup_then_bag_chained_on_the_device() {
    let Some(ctx) = gpu_for_tests(GpuOptions::default()) else {
        return;
    };
    let lookup = LookupKernels::new(&ctx).unwrap();
    let bag = BagForward::new(&ctx).unwrap();
    let cfg = PkmConfig {
        dim: 16,
        v_dim: 48,
        heads: 4,
        n_keys: 64,
        k_dim: 16,
        knn: 8,
        qk_norm: true,
        gated: false,
    };
    let tokens = 33;
    let mut rng = Rng::new(40);
    let keys = rng.normal_vec(cfg.heads * 2 * cfg.n_keys * cfg.half(), 0.0, 1.0);
    let query = rng.normal_vec(tokens * cfg.query_dim(), 0.0, 1.0);
    let values = pkm::init_values(&cfg, &mut rng);
    let lk = pkm::lookup(&cfg, &keys, &query, tokens).unwrap();
    let offsets = uniform_offsets(tokens, cfg.bag_size());
    let want = bag_forward(
        &values,
        cfg.n_rows(),
        cfg.v_dim,
        &lk.indices,
        &lk.weights,
        &offsets,
    )
    .unwrap();

    let table = ShardedTable::upload(
        &ctx,
        "values",
        &values,
        cfg.n_rows(),
        cfg.v_dim,
        GpuDtype::F32,
    )
    .unwrap();
    let plan = LookupPlan::new(&ctx, &cfg, tokens).unwrap();
    let bufs = LookupBuffers::new(&ctx, &plan).unwrap();
    let kb = storage_init(&ctx, "keys", &keys);
    let qb = storage_init(&ctx, "query", &query);
    let offsets32: Vec<u32> = offsets.iter().map(|&o| o as u32).collect();
    let ob = storage_init(&ctx, "offsets", &offsets32);
    let out = storage_zeroed(&ctx, "m", (tokens * cfg.v_dim) as u64 * 4);
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    lookup.record(&ctx, &mut enc, &kb, &qb, &bufs).unwrap();
    bag.record(
        &ctx,
        &mut enc,
        BagTable::Flat(&table),
        &bufs.indices,
        &bufs.weights,
        &ob,
        tokens,
        &out,
    )
    .unwrap();
    ctx.queue.submit([enc.finish()]);
    let got: Vec<f32> = read_back(&ctx, &out, 0, tokens * cfg.v_dim).unwrap();
    // indices are identical; weights differ by the device's exp (a few ulp)
    assert_eq!(bufs.read(&ctx).unwrap().indices, lk.indices);
    for (a, b) in want.iter().zip(&got) {
        assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{a} vs {b}");
    }
}

/// The kernel fits WebGPU's default limits (8 storage buffers per stage).
#[test]
fn kernel_builds_and_runs_under_webgpu_default_limits() {
    let Some(ctx) = common::webgpu_default_ctx() else {
        return;
    };
    let limits = &ctx.limits;
    assert_eq!(limits.max_storage_buffers_per_shader_stage, 8);
    let bag = BagForward::new(&ctx).unwrap();
    let mut rng = Rng::new(50);
    let (rows, dim) = (100, 24);
    let data = rng.normal_vec(rows * dim, 0.0, 1.0);
    let table = ShardedTable::upload(&ctx, "values", &data, rows, dim, GpuDtype::F16).unwrap();
    let (idx, w, off) = random_bags(&mut rng, 50, 10, rows);
    let want = bag_forward(
        &stored(&data, dim, GpuDtype::F16),
        rows,
        dim,
        &idx,
        &w,
        &off,
    )
    .unwrap();
    let got = bag.run_flat(&ctx, &table, &idx, &w, &off).unwrap();
    assert_close(&want, &got, true, "webgpu limits");
}
