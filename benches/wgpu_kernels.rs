//! Criterion benches of the WGSL kernels on the default wgpu adapter
//! (lavapipe here): the copy kernel (the adapter's bandwidth ceiling), the
//! embedding-bag forward (f32 and f16 storage, flat and paged through a page
//! table) and the product-key lookup.
//! Each iteration records, submits and waits for one dispatch chain; uploads
//! happen once, outside the timed loop.
//!
//! `cargo bench --bench wgpu_kernels` (release profile). Without an adapter
//! the bench prints a loud message and measures nothing.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use memlayer_core::pkm::PkmConfig;
use memlayer_core::rng::Rng;
use memlayer_wgpu::bag_forward::{BagForward, BagTable};
use memlayer_wgpu::buffers::{encode_rows, storage_init, storage_zeroed};
use memlayer_wgpu::copy::CopyKernel;
use memlayer_wgpu::lookup::{LookupBuffers, LookupKernels, LookupPlan};
use memlayer_wgpu::{GpuContext, GpuDtype, GpuOptions, ShardedTable};

const ROWS: usize = 1 << 18;
const DIM: usize = 256;
const BAGS: usize = 512;
const BAG_SIZE: usize = 128;

fn context() -> Option<GpuContext> {
    match GpuContext::new(&GpuOptions::default()) {
        Ok(ctx) => Some(ctx),
        Err(e) => {
            eprintln!("\n!!!!!!!! wgpu_kernels: no adapter ({e}); nothing measured !!!!!!!!\n");
            None
        }
    }
}

fn submit(ctx: &GpuContext, record: impl FnOnce(&mut wgpu::CommandEncoder)) {
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    record(&mut enc);
    ctx.queue.submit([enc.finish()]);
    ctx.wait().expect("device wait");
}

fn benches(c: &mut Criterion) {
    let Some(ctx) = context() else { return };
    let name = ctx.name();
    let mut rng = Rng::new(7);

    let mut g = c.benchmark_group(format!("{name}/copy"));
    let bytes = (64u64 << 20).min(ctx.max_binding_bytes()) / 16 * 16;
    let (src, dst) = (
        storage_zeroed(&ctx, "src", bytes),
        storage_zeroed(&ctx, "dst", bytes),
    );
    let copy = CopyKernel::new(&ctx).expect("copy kernel");
    g.throughput(Throughput::Bytes(bytes));
    g.bench_function("copy", |b| {
        b.iter(|| {
            submit(&ctx, |e| {
                copy.record(&ctx, e, &src, &dst, bytes).expect("copy")
            })
        })
    });
    g.finish();

    let table = rng.normal_vec(ROWS * DIM, 0.0, 1.0);
    let nnz = BAGS * BAG_SIZE;
    let indices: Vec<u32> = (0..nnz).map(|_| rng.below(ROWS as u64) as u32).collect();
    let weights = rng.normal_vec(nnz, 0.0, 1.0);
    let offsets: Vec<u32> = (0..=BAGS as u32).map(|b| b * BAG_SIZE as u32).collect();
    let (ib, wb, ob) = (
        storage_init(&ctx, "indices", &indices),
        storage_init(&ctx, "weights", &weights),
        storage_init(&ctx, "offsets", &offsets),
    );
    let out = storage_zeroed(&ctx, "out", (BAGS * DIM * 4) as u64);
    let bag = BagForward::new(&ctx).expect("bag kernel");
    let mut g = c.benchmark_group(format!("{name}/bag_forward"));
    for (dtype, label, elem) in [(GpuDtype::F32, "f32", 4), (GpuDtype::F16, "f16", 2)] {
        let t = ShardedTable::upload(&ctx, "values", &table, ROWS, DIM, dtype).expect("upload");
        g.throughput(Throughput::Bytes((nnz * DIM * elem) as u64));
        g.bench_function(label, |b| {
            b.iter(|| {
                submit(&ctx, |e| {
                    bag.record(&ctx, e, BagTable::Flat(&t), &ib, &wb, &ob, BAGS, &out)
                        .expect("bag")
                })
            })
        });
    }
    // paged: every page resident, slots in a random order (the runtime's
    // device cache at a 100% budget), pages of 4096 rows
    let page_rows = 4096;
    let n_pages = ROWS / page_rows;
    let mut slot_of: Vec<u32> = (0..n_pages as u32).collect();
    rng.shuffle(&mut slot_of);
    for (dtype, label, elem) in [
        (GpuDtype::F32, "paged_f32", 4),
        (GpuDtype::F16, "paged_f16", 2),
    ] {
        let slots =
            ShardedTable::zeroed(&ctx, "slots", ROWS, DIM, dtype, page_rows).expect("slot pool");
        for (page, &slot) in slot_of.iter().enumerate() {
            let rows = &table[page * page_rows * DIM..(page + 1) * page_rows * DIM];
            slots
                .write_rows(
                    &ctx,
                    slot as usize * page_rows,
                    &encode_rows(rows, DIM, dtype),
                )
                .expect("upload page");
        }
        let pt = storage_init(&ctx, "page table", &slot_of);
        let paged = BagTable::Paged {
            slots: &slots,
            page_rows,
            n_pages,
            page_table: &pt,
        };
        g.throughput(Throughput::Bytes((nnz * DIM * elem) as u64));
        g.bench_function(label, |b| {
            b.iter(|| {
                submit(&ctx, |e| {
                    bag.record(&ctx, e, paged, &ib, &wb, &ob, BAGS, &out)
                        .expect("paged bag")
                })
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group(format!("{name}/lookup"));
    g.sample_size(10);
    let lookup = LookupKernels::new(&ctx).expect("lookup kernels");
    for n_keys in [256usize, 1024, 4096] {
        let cfg = PkmConfig {
            dim: 256,
            v_dim: 256,
            heads: 4,
            n_keys,
            k_dim: 256,
            knn: 32,
            qk_norm: false,
            gated: false,
        };
        let tokens = 16;
        let keys = rng.normal_vec(cfg.heads * 2 * n_keys * cfg.half(), 0.0, 1.0);
        let query = rng.normal_vec(tokens * cfg.heads * cfg.k_dim, 0.0, 1.0);
        let plan = LookupPlan::new(&ctx, &cfg, tokens).expect("plan");
        let bufs = LookupBuffers::new(&ctx, &plan).expect("buffers");
        let (kb, qb) = (
            storage_init(&ctx, "keys", &keys),
            storage_init(&ctx, "query", &query),
        );
        g.throughput(Throughput::Elements(tokens as u64));
        g.bench_function(format!("N={}", n_keys * n_keys), |b| {
            b.iter(|| {
                submit(&ctx, |e| {
                    lookup.record(&ctx, e, &kb, &qb, &bufs).expect("lookup")
                })
            })
        });
    }
    g.finish();
}

criterion_group!(wgpu_kernels, benches);
criterion_main!(wgpu_kernels);
