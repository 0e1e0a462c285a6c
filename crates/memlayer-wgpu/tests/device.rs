//! Device, copy kernel and sharded tables on a real adapter (lavapipe in CI).

use memlayer_core::rng::Rng;
use memlayer_wgpu::buffers::{read_back, storage_init, storage_zeroed};
use memlayer_wgpu::copy::CopyKernel;
use memlayer_wgpu::{GpuDtype, GpuOptions, ShardedTable, gpu_for_tests};

#[test]
fn copy_kernel_copies_exactly() {
    let Some(ctx) = gpu_for_tests(GpuOptions::default()) else {
        return;
    };
    eprintln!("adapter: {:?} ({})", ctx.info, ctx.name());
    let words: Vec<u32> = (0..70_000u32)
        .map(|i| i.wrapping_mul(2_654_435_761))
        .collect();
    let src = storage_init(&ctx, "src", &words);
    let dst = storage_zeroed(&ctx, "dst", (words.len() * 4) as u64);
    let kernel = CopyKernel::new(&ctx).unwrap();
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    kernel
        .record(&ctx, &mut enc, &src, &dst, (words.len() * 4) as u64)
        .unwrap();
    ctx.queue.submit([enc.finish()]);
    assert_eq!(read_back::<u32>(&ctx, &dst, 0, words.len()).unwrap(), words);
    assert!(
        kernel
            .record(
                &ctx,
                &mut ctx.device.create_command_encoder(&Default::default()),
                &src,
                &dst,
                12
            )
            .is_err()
    );
}

#[test]
fn tables_shard_under_a_forced_small_binding_limit() {
    // 4 KiB bindings: a 100 × 24 f32 table (9600 bytes) needs 3 shards.
    let opts = GpuOptions {
        max_binding_bytes: Some(4096),
        ..Default::default()
    };
    let Some(ctx) = gpu_for_tests(opts) else {
        return;
    };
    assert_eq!(ctx.max_binding_bytes(), 4096);
    let mut rng = Rng::new(1);
    let (rows, dim) = (100, 24);
    let data = rng.normal_vec(rows * dim, 0.0, 1.0);
    let t = ShardedTable::upload(&ctx, "values", &data, rows, dim, GpuDtype::F32).unwrap();
    assert_eq!(t.rows_per_shard, 4096 / (24 * 4));
    assert_eq!(t.shards.len(), 3);
    assert!(t.shards.iter().all(|b| b.size() <= 4096));
    assert_eq!(t.download(&ctx).unwrap(), data);
    // f16 storage, odd width (padded half), pages of 8 rows never straddle shards
    let dim = 37; // 19 words a row; 8-row units of 608 bytes: 6 units = 48 rows a shard
    let data = rng.normal_vec(rows * dim, 0.0, 1.0);
    let t = ShardedTable::zeroed(&ctx, "slots", rows, dim, GpuDtype::F16, 8).unwrap();
    assert_eq!(t.rows_per_shard, 48);
    assert_eq!(t.shards.len(), 3);
    t.write_rows(
        &ctx,
        0,
        &memlayer_wgpu::buffers::encode_rows(&data, dim, GpuDtype::F16),
    )
    .unwrap();
    let back = t.download(&ctx).unwrap();
    for (a, b) in data.iter().zip(&back) {
        assert_eq!(half::f16::from_f32(*a).to_f32(), *b);
    }
    // a unit larger than one binding is refused with a clear error
    let err = ShardedTable::zeroed(&ctx, "huge", 10, 2048, GpuDtype::F32, 1)
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("does not fit one binding"),
        "{err}"
    );
}
