//! The shader registry against the files of `shaders/`, and the launcher's
//! caches: a repeated decode step (paged bag) or lookup with the same
//! buffers and shapes creates no bind group and no buffer.

mod common;

use common::Bags;

use memlayer_core::pkm::{self, PkmConfig};
use memlayer_core::rng::Rng;
use memlayer_wgpu::bag_forward::{BagForward, MISSING_PAGE};
use memlayer_wgpu::buffers::storage_init;
use memlayer_wgpu::launch::Grid;
use memlayer_wgpu::lookup::{LookupBuffers, LookupKernels, LookupPlan};
use memlayer_wgpu::shaders::{ALL, Binding};
use memlayer_wgpu::{GpuDtype, GpuOptions, ShardedTable, gpu_for_tests};

/// Every file of `shaders/` is registered once, and each entry says what
/// its file declares: bindings and their access, workgroup size, entry
/// point, override constants.
#[test]
fn registry_matches_the_shader_files() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shaders");
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".wgsl"))
        .collect();
    files.sort();
    let mut names: Vec<String> = ALL
        .iter()
        .flat_map(|s| s.files.iter().map(|f| format!("{f}.wgsl")))
        .collect();
    names.sort();
    names.dedup();
    assert_eq!(files, names, "shaders/ and the registry");
    for s in ALL {
        assert_eq!(s.files[0], s.name, "{}: its own file first", s.name);
        let text: String = (s.files.iter())
            .map(|f| std::fs::read_to_string(format!("{dir}/{f}.wgsl")).unwrap())
            .collect();
        assert_eq!(text, s.source, "{}: registered text", s.name);
        let mut bindings = Vec::new();
        for line in s.source.lines().map(str::trim) {
            let Some(rest) = line.strip_prefix("@group(0) @binding(") else {
                continue;
            };
            let (i, decl) = rest.split_once(')').unwrap();
            assert_eq!(
                i.parse::<usize>().unwrap(),
                bindings.len(),
                "{}: order",
                s.name
            );
            bindings.push(if decl.contains("var<uniform>") {
                Binding::Params
            } else if decl.contains("var<storage, read_write>") {
                Binding::ReadWrite
            } else {
                assert!(decl.contains("var<storage, read>"), "{}: {decl}", s.name);
                Binding::Read
            });
        }
        assert_eq!(bindings, s.bindings, "{}: bindings", s.name);
        assert_eq!(s.bindings[0], Binding::Params, "{}: params first", s.name);
        let wg = format!("@workgroup_size({})", s.workgroup);
        assert_eq!(
            s.source.matches("@workgroup_size(").count(),
            1,
            "{}",
            s.name
        );
        assert!(s.source.contains(&wg), "{}: {wg}", s.name);
        assert!(s.source.contains(&format!("fn {}(", s.entry)), "{}", s.name);
        let overrides: Vec<&str> = s
            .source
            .lines()
            .filter_map(|l| l.trim().strip_prefix("override "))
            .map(|l| l.split(':').next().unwrap().trim())
            .collect();
        assert_eq!(overrides, s.overrides, "{}: overrides", s.name);
        for v in s.variants() {
            let text = v.storage_text().unwrap();
            assert!(!text.contains("var<storage, read>"), "{}", v.label());
            assert!(!text.contains("var<uniform>"), "{}", v.label());
            let decl = |l: &str| l.trim_start().starts_with("override ");
            assert!(!text.lines().any(decl), "{}", v.label());
        }
    }
}

/// Grids are folded once: at most `max` per dimension, covering the count.
#[test]
fn grid_covers_large_counts() {
    assert_eq!(Grid::cover(0, 65_535).unwrap(), Grid { x: 1, y: 1 });
    assert_eq!(
        Grid::cover(65_535, 65_535).unwrap(),
        Grid { x: 65_535, y: 1 }
    );
    let g = Grid::cover(65_536 * 3, 65_535).unwrap();
    assert_eq!(g.x, 65_535);
    assert!(g.x as u64 * g.y as u64 >= 65_536 * 3);
    assert!(Grid::cover(usize::MAX, 65_535).is_err());
}

/// A decode step of the paged bag (`run_paged` with the same slot pool and
/// shapes, new contents) creates no bind group and no buffer after the
/// first call, and stays equal to the oracle.
#[test]
fn repeated_paged_bag_creates_nothing() {
    let Some(ctx) = gpu_for_tests(GpuOptions::default()) else {
        return;
    };
    let bag = BagForward::new(&ctx).unwrap();
    let (page_rows, n_slots, n_pages, dim) = (8, 6, 20, 32);
    let slots = ShardedTable::zeroed(
        &ctx,
        "slots",
        n_slots * page_rows,
        dim,
        GpuDtype::F32,
        page_rows,
    )
    .unwrap();
    let mut rng = Rng::new(7);
    let values = rng.normal_vec(n_pages * page_rows * dim, 0.0, 1.0);
    let mut page_table = vec![MISSING_PAGE; n_pages];
    // pages 0..n_slots resident in reverse slot order
    for p in 0..n_slots {
        let s = n_slots - 1 - p;
        page_table[p] = s as u32;
        let rows = &values[p * page_rows * dim..(p + 1) * page_rows * dim];
        slots
            .write_rows(&ctx, s * page_rows, bytemuck::cast_slice(rows))
            .unwrap();
    }
    let (bags, bag_len) = (4, 8);
    let offsets: Vec<usize> = (0..=bags).map(|b| b * bag_len).collect();
    let mut after_first = None;
    for step in 0..4 {
        let indices: Vec<u32> = (0..bags * bag_len)
            .map(|_| rng.below((n_slots * page_rows) as u64) as u32)
            .collect();
        let weights = rng.normal_vec(indices.len(), 0.0, 1.0);
        let step_bags = Bags {
            indices,
            weights,
            offsets: offsets.clone(),
        };
        let got = (step_bags.run_paged(&bag, &ctx, &slots, page_rows, &page_table)).unwrap();
        let want = step_bags.oracle(&values, n_pages * page_rows, dim);
        assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "step {step}"
        );
        match after_first {
            None => after_first = Some(bag.stats()),
            Some(first) => {
                let now = bag.stats();
                assert_eq!(
                    now.bind_groups, first.bind_groups,
                    "step {step}: bind groups"
                );
                assert_eq!(now.buffers, first.buffers, "step {step}: buffers");
                assert!(now.dispatches > first.dispatches);
            }
        }
    }
}

/// Recording a lookup again with the same buffers creates no bind group
/// and no buffer; reading it back again reuses its staging buffer.
#[test]
fn repeated_lookup_creates_nothing() {
    let Some(ctx) = gpu_for_tests(GpuOptions::default()) else {
        return;
    };
    let lookup = LookupKernels::new(&ctx).unwrap();
    // the paper's layer, scaled down (qk-norm on)
    let cfg = PkmConfig {
        n_keys: 64,
        heads: 2,
        k_dim: 16,
        knn: 8,
        qk_norm: true,
        ..PkmConfig::paper()
    };
    let tokens = 3;
    let (keys, _) = pkm::random_lookup_inputs(&cfg, tokens, 9);
    let mut rng = Rng::new(9);
    let plan = LookupPlan::new(&ctx, &cfg, tokens).unwrap();
    let bufs = LookupBuffers::new(&ctx, &plan).unwrap();
    let kb = storage_init(&ctx, "keys", &keys);
    let qb = storage_init(&ctx, "query", &vec![0.0f32; tokens * cfg.query_dim()]);
    let mut after_first = None;
    for step in 0..3 {
        let query = rng.normal_vec(tokens * cfg.query_dim(), 0.0, 1.0);
        ctx.queue.write_buffer(&qb, 0, bytemuck::cast_slice(&query));
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        lookup.record(&ctx, &mut enc, &kb, &qb, &bufs).unwrap();
        ctx.queue.submit([enc.finish()]);
        let got = pollster::block_on(bufs.read_async(&ctx)).unwrap();
        let want = pkm::lookup(&cfg, &keys, &query, tokens).unwrap();
        assert_eq!(got.indices, want.indices, "step {step}");
        assert_eq!(got.scores, want.scores, "step {step}");
        let now = (lookup.kernels().stats(), bufs.staging_created());
        match after_first {
            None => after_first = Some(now),
            Some((first, staging)) => {
                assert_eq!(now.0.bind_groups, first.bind_groups, "step {step}");
                assert_eq!(now.0.buffers, first.buffers, "step {step}");
                assert_eq!(now.1, staging, "step {step}: staging");
            }
        }
    }
}
