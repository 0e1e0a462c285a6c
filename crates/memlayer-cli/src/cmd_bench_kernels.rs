//! `memlayer bench kernels [--quick] --json FILE`: the cross-backend kernel benchmark.
//!
//! On identical shapes in one run it measures embedding-bag forward bandwidth
//! (bytes of rows gathered per second) on the CPU oracle, the optimised CPU
//! path (f32/f16/bf16 storage; the detected ISA family or `--cpu-kernel`, and
//! any `--compare-kernels` beside it), PyTorch CPU `embedding_bag` (through
//! `scripts/bench_torch_bag.py`, same thread count; `null` when torch is
//! missing) and every wgpu adapter present (f32 and f16 storage); the same
//! CPU and torch figures at `--extra-dims` row widths; the physical limits in
//! the same run (the CPU's copy and read bandwidth, a WGSL copy kernel's
//! bandwidth on each adapter); and product-key lookup time per token for
//! N = 2^16 … 2^24 against a brute-force scan of all N rows. Built with the
//! `cuda` feature it adds the first NVIDIA GPU ([`cuda`]: copy bandwidth, bag
//! forward f32/f16/bf16, PyTorch CUDA as the peer, lookup per N), each bag
//! figure also as a fraction of its device's copy bandwidth (CPU figures also
//! of the CPU's read bandwidth: a gather reads, a copy reads and writes).
//! The JSON names the CPU model and the ISA family that ran. Timings are
//! medians after a warm-up. Nothing here asserts a number: it reports.

#[cfg(feature = "cuda")]
pub(crate) mod cuda;
mod torch_paired;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use memlayer_core::pkm::{Candidate, PkmConfig, candidate_order, select_best};
use memlayer_core::rng::Rng;
use memlayer_cpu::alloc::LargeBuf;
use memlayer_cpu::simd::{self, Kernel};
use memlayer_cpu::storage::narrow;
use memlayer_cpu::{Cpu, Storage, Table};
use memlayer_wgpu::bag_forward::{BagForward, BagTable};
use memlayer_wgpu::buffers::{storage_init, storage_zeroed};
use memlayer_wgpu::context::adapter_matches;
use memlayer_wgpu::copy::CopyKernel;
use memlayer_wgpu::lookup::{LookupBuffers, LookupKernels, LookupPlan};
use memlayer_wgpu::{GpuContext, GpuDtype, GpuOptions, ShardedTable};
use rayon::prelude::*;
use serde_json::{Map, Value, json};
use torch_paired::{Started, TorchPeer, paired_bag};

#[derive(Args)]
pub struct KernelsArgs {
    /// Small shapes and few iterations (a smoke run of a minute or two).
    #[arg(long)]
    pub quick: bool,
    /// Write the results as one JSON object here.
    #[arg(long)]
    pub json: PathBuf,
    #[command(flatten)]
    pub peer: PeerArgs,
    /// Only adapters whose name, driver or backend contains this.
    #[arg(long)]
    pub adapter: Option<String>,
    /// CPU kernel family of the `cpu_fast*` figures and the lookup (avx512, avx2,
    /// neon, portable; default: the best this CPU runs).
    #[arg(long)]
    pub cpu_kernel: Option<String>,
    /// Also measure the CPU embedding-bag forward with these families
    /// (comma-separated), as `cpu_fast_<family>`, `.._f16`, `.._bf16`: an ISA
    /// path's before/after in the same run.
    #[arg(long, value_delimiter = ',')]
    pub compare_kernels: Vec<String>,
    /// Row width of the embedding-bag tables (default 256); rows and bags scale so
    /// the f32 table (1 GiB in the full run) and the bytes gathered per call keep their sizes.
    #[arg(long)]
    pub dim: Option<usize>,
    /// More row widths (comma-separated) for the CPU and torch embedding-bag
    /// forward only (scaled as `--dim`), under `bag_fwd_by_dim`.
    #[arg(long, value_delimiter = ',')]
    pub extra_dims: Vec<usize>,
}

/// The CPU threads and the PyTorch peer (`bench kernels` and the runner).
#[derive(Args)]
pub struct PeerArgs {
    /// CPU threads for memlayer and torch (0: all logical CPUs).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Python interpreter for the PyTorch reference.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// The PyTorch reference script.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/bench_torch_bag.py"))]
    pub torch_script: PathBuf,
    /// Seconds to wait for each answer of the PyTorch reference (its table
    /// set-up included) before it is stopped and recorded as failed.
    #[arg(long, default_value_t = 600.0, value_parser = positive_seconds)]
    pub torch_timeout: f64,
}

fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 && x <= 86_400.0 => Ok(x),
        _ => Err(format!("{s:?} is not a number of seconds in (0, 86400]")),
    }
}

/// The shapes one run uses (recorded in the JSON).
pub(crate) struct Shapes {
    pub(crate) rows: usize,
    pub(crate) dim: usize,
    pub(crate) bags: usize,
    pub(crate) bag_size: usize,
    pub(crate) iters: usize,
    pub(crate) cpu_copy_bytes: usize,
    pub(crate) cpu_read_bytes: usize,
    pub(crate) gpu_copy_bytes: u64,
    pub(crate) n_keys: Vec<usize>,
    pub(crate) heads: usize,
    pub(crate) knn: usize,
    pub(crate) k_dim: usize,
    pub(crate) lookup_tokens: usize,
    pub(crate) gpu_lookup_tokens: usize,
    pub(crate) brute_tokens: usize,
}

impl Shapes {
    pub(crate) fn new(quick: bool) -> Self {
        if quick {
            // the full run's table (1 GiB in f32: 16-bit tables too stay above the
            // 300 MiB L3 of this project's machines) with fewer bags and calls,
            // so the smoke run is memory-bound like the full run and ranks alike
            Self {
                rows: 1 << 20,
                dim: 256,
                bags: 1024,
                bag_size: 128,
                iters: 5,
                // above the 300 MiB L3 of this project's machines: memory, not cache
                cpu_copy_bytes: 512 << 20,
                cpu_read_bytes: 1 << 30,
                gpu_copy_bytes: 32 << 20,
                n_keys: vec![256, 1024],
                heads: 4,
                knn: 32,
                k_dim: 256,
                lookup_tokens: 32,
                gpu_lookup_tokens: 8,
                brute_tokens: 2,
            }
        } else {
            Self {
                rows: 1 << 20,
                dim: 256,
                bags: 2048,
                bag_size: 128,
                iters: 10,
                cpu_copy_bytes: 512 << 20,
                cpu_read_bytes: 1 << 30,
                gpu_copy_bytes: 128 << 20,
                n_keys: vec![256, 512, 1024, 2048, 4096],
                heads: 4,
                knn: 32,
                k_dim: 256,
                lookup_tokens: 256,
                gpu_lookup_tokens: 32,
                brute_tokens: 4,
            }
        }
    }

    /// The same workload at row width `dim`: rows and bags scaled so the f32
    /// table and the bytes gathered per call keep their sizes (bag size unchanged).
    fn at_dim(&self, dim: usize) -> Self {
        Self {
            rows: (self.rows * self.dim / dim.max(1)).max(1),
            bags: (self.bags * self.dim / dim.max(1)).max(1),
            dim,
            n_keys: self.n_keys.clone(),
            ..*self
        }
    }

    pub(crate) fn gathered_bytes(&self, elem: usize) -> f64 {
        (self.bags * self.bag_size * self.dim * elem) as f64
    }

    fn json(&self, threads: usize) -> Value {
        json!({
            "bag": {
                "rows": self.rows, "dim": self.dim, "bags": self.bags, "bag_size": self.bag_size,
                "indices": "uniform random", "weights": "normal", "threads": threads,
                "index_sets": INDEX_SETS,
                "index_sets_note": "CPU and torch calls rotate through index sets shifted by k * rows / index_sets, so no call re-reads the previous call's rows from L3",
                "memory": "tables on transparent huge pages (madvise) for memlayer; THP_MEM_ALLOC_ENABLE=1 for torch",
                "iters": self.iters, "statistic": "median seconds per call after one warm-up call per index set (torch: 1 + 3 warm-up calls); torch_cpu* and bag_fwd_vs_torch come from rounds interleaved with memlayer's calls (bag_fwd_vs_torch_rounds)",
                "rounds": PAIRED_ROUNDS_PER_ITER * self.iters, "calls_per_burst": PAIRED_BURST,
                "gbps": "bags * bag_size * dim * element bytes / seconds / 1e9"
            },
            "copy": {
                "cpu_bytes": self.cpu_copy_bytes, "gpu_bytes": self.gpu_copy_bytes,
                "gbps": "bytes copied (read once, written once) / seconds / 1e9"
            },
            "read": {
                "cpu_bytes": self.cpu_read_bytes,
                "gbps": "bytes read (sum of u64 words, huge pages, no writes) / seconds / 1e9, best of 5"
            },
            "lookup": {
                "n_keys": self.n_keys, "rows": self.n_keys.iter().map(|n| n * n).collect::<Vec<_>>(),
                "heads": self.heads, "knn": self.knn, "k_dim": self.k_dim, "qk_norm": false,
                "tokens_cpu": self.lookup_tokens, "tokens_gpu": self.gpu_lookup_tokens,
                "tokens_bruteforce": self.brute_tokens, "threads": threads,
                "bruteforce": "all N = n_keys^2 sums s1[i] + s2[j] ranked by candidate_order"
            }
        })
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median seconds of the oracle's bag forward (single-threaded by design) on the bag workload.
pub(crate) fn oracle_bag_secs(s: &Shapes, data: &BagData) -> Result<f64> {
    time_median(s.iters.min(3), || {
        memlayer_core::bag::bag_forward(
            &data.table,
            s.rows,
            s.dim,
            &data.indices,
            &data.weights,
            &data.offsets,
        )?;
        Ok(())
    })
}

/// Median seconds of `iters` calls of `f` after one warm-up call.
pub(crate) fn time_median(iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

/// The bag workload: indices, weights, offsets and the f32 table.
pub(crate) struct BagData {
    /// (rows, dim)
    pub(crate) table: Vec<f32>,
    /// (bags * bag_size)
    pub(crate) indices: Vec<u32>,
    /// (bags * bag_size)
    pub(crate) weights: Vec<f32>,
    /// (bags + 1)
    pub(crate) offsets: Vec<usize>,
}

impl BagData {
    pub(crate) fn new(s: &Shapes) -> Self {
        let mut rng = Rng::new(2024);
        let table = rng.normal_vec(s.rows * s.dim, 0.0, 1.0);
        let nnz = s.bags * s.bag_size;
        let indices = (0..nnz).map(|_| rng.below(s.rows as u64) as u32).collect();
        let weights = rng.normal_vec(nnz, 0.0, 1.0);
        let offsets = memlayer_core::bag::uniform_offsets(s.bags, s.bag_size);
        Self {
            table,
            indices,
            weights,
            offsets,
        }
    }
}

pub fn run(args: KernelsArgs) -> Result<()> {
    let s = match args.dim {
        Some(0) => bail!("--dim must be positive"),
        Some(d) => Shapes::new(args.quick).at_dim(d),
        None => Shapes::new(args.quick),
    };
    if args.extra_dims.contains(&0) {
        bail!("--extra-dims must be positive");
    }
    let cpu = Cpu::new(args.peer.threads).context("creating the CPU thread pool")?;
    let threads = cpu.threads();
    let family = |name: &str| {
        Kernel::from_name(name).with_context(|| {
            let all: Vec<&str> = Kernel::ALL.iter().map(|k| k.name()).collect();
            format!(
                "no CPU kernel family {name:?} (families: {})",
                all.join(", ")
            )
        })
    };
    let main_kernel = args.cpu_kernel.as_deref().map(family).transpose()?;
    simd::force_kernel(main_kernel)?;
    let compare: Vec<Kernel> = args
        .compare_kernels
        .iter()
        .map(|n| family(n))
        .collect::<Result<_>>()?;
    for &k in &compare {
        if !simd::runs(k) {
            bail!("--compare-kernels {k}: this CPU does not run it");
        }
    }
    let main_kernel = simd::kernel();
    let adapters: Vec<wgpu::Adapter> = GpuContext::adapters()
        .into_iter()
        .filter(|a| {
            args.adapter
                .as_ref()
                .is_none_or(|f| adapter_matches(&a.get_info(), f))
        })
        .collect();
    let per_dim = 3 * (1 + compare.len() as u64) + 3;
    let steps = 5
        + per_dim
        + args.extra_dims.len() as u64 * (1 + per_dim)
        + adapters.len() as u64 * (1 + 2 + 1)
        + s.n_keys.len() as u64 * 2;
    let bar = ProgressBar::new(steps).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut errors: Vec<String> = Vec::new();
    let mut bag = Map::new();
    let mut copy = Map::new();
    let mut read = Map::new();
    let mut adapters_json = Vec::new();

    bar.set_message("generating data");
    let data = BagData::new(&s);
    bar.inc(1);

    // CPU copy bandwidth: the physical limit of a gather here
    bar.set_message("CPU copy bandwidth");
    let cpu_copy = cpu.copy_bandwidth(s.cpu_copy_bytes, 5);
    copy.insert("cpu".into(), json!(cpu_copy.gbps));
    bar.inc(1);
    // CPU read bandwidth: the ceiling of a gather (reads rows, writes little)
    bar.set_message("CPU read bandwidth");
    let cpu_read = cpu.read_bandwidth(s.cpu_read_bytes, 5);
    read.insert("cpu".into(), json!(cpu_read.gbps));
    bar.inc(1);

    // CPU oracle (single-threaded by design)
    bar.set_message("bag forward: CPU oracle");
    let oracle_s = oracle_bag_secs(&s, &data)?;
    bag.insert(
        "cpu_oracle".into(),
        json!(s.gathered_bytes(4) / oracle_s / 1e9),
    );
    bar.inc(1);

    // Optimised CPU path, f32 / f16 / bf16 storage (tables on huge pages), then
    // PyTorch CPU on the same shapes and thread count
    let mut torch_info = Value::Null;
    let cpu_bags = |s: &Shapes, data: &BagData, bag: &mut Map<String, Value>| -> Result<()> {
        cpu_fast_all(&cpu, s, data, "cpu_fast", bag, &bar)?;
        for &k in &compare {
            simd::force_kernel(Some(k))?;
            let r = cpu_fast_all(&cpu, s, data, &format!("cpu_fast_{k}"), bag, &bar);
            simd::force_kernel(Some(main_kernel))?;
            r?;
        }
        Ok(())
    };
    cpu_bags(&s, &data, &mut bag)?;
    let mut paired = Map::new();
    torch_all(
        &args,
        &cpu,
        &s,
        &data,
        &mut bag,
        &mut paired,
        &mut torch_info,
        &mut errors,
        &bar,
    );

    // The other row widths: CPU and torch only, same table bytes
    let mut by_dim = Map::new();
    for &dim in &args.extra_dims {
        let sd = s.at_dim(dim);
        bar.set_message(format!("generating data, dim {dim}"));
        let dd = BagData::new(&sd);
        bar.inc(1);
        let mut m = Map::new();
        cpu_bags(&sd, &dd, &mut m)?;
        let mut p = Map::new();
        torch_all(
            &args,
            &cpu,
            &sd,
            &dd,
            &mut m,
            &mut p,
            &mut torch_info,
            &mut errors,
            &bar,
        );
        drop(dd);
        by_dim.insert(
            dim.to_string(),
            json!({
                "rows": sd.rows, "dim": dim, "bags": sd.bags, "bag_size": sd.bag_size,
                "bag_fwd_fraction_of_read": fraction_of(&m, cpu_read.gbps),
                "bag_fwd_vs_torch": vs_torch(&m, &p),
                "bag_fwd_vs_torch_rounds": p,
                "bag_fwd_gbps": m,
            }),
        );
    }

    // Every wgpu adapter: copy kernel, bag forward f32/f16
    for adapter in adapters {
        let info = adapter.get_info();
        let label = format!("{} ({:?}, {})", info.name, info.backend, info.driver);
        bar.set_message(format!("adapter {label}"));
        let ctx =
            match pollster::block_on(GpuContext::from_adapter(adapter, &GpuOptions::default())) {
                Ok(c) => c,
                Err(e) => {
                    errors.push(format!("adapter {label}: {e}"));
                    bar.inc(4);
                    continue;
                }
            };
        let name = ctx.name();
        adapters_json.push(json!({
            "name": name, "adapter": info.name, "backend": format!("{:?}", info.backend),
            "driver": info.driver, "driver_info": info.driver_info,
            "device_type": format!("{:?}", info.device_type),
            "max_storage_buffer_binding_size": ctx.limits.max_storage_buffer_binding_size,
        }));
        match gpu_copy(&ctx, &s) {
            Ok(g) => {
                copy.insert(name.clone(), json!(g));
            }
            Err(e) => {
                errors.push(format!("{name} copy: {e:#}"));
                copy.insert(name.clone(), Value::Null);
            }
        }
        bar.inc(1);
        for (dtype, suffix, elem) in [(GpuDtype::F32, "", 4), (GpuDtype::F16, "_f16", 2)] {
            let key = format!("{name}{suffix}");
            bar.set_message(format!("bag forward: {key}"));
            match gpu_bag(&ctx, &s, &data, dtype) {
                Ok(secs) => {
                    bag.insert(key, json!(s.gathered_bytes(elem) / secs / 1e9));
                }
                Err(e) => {
                    errors.push(format!("{key}: {e:#}"));
                    bag.insert(key, Value::Null);
                }
            }
            bar.inc(1);
        }
        bar.set_message(format!("lookup: {name}"));
        let mut per_n = Map::new();
        for &n_keys in &s.n_keys {
            match gpu_lookup(&ctx, &s, n_keys) {
                Ok(us) => per_n.insert((n_keys * n_keys).to_string(), json!(us)),
                Err(e) => {
                    errors.push(format!("{name} lookup n_keys={n_keys}: {e:#}"));
                    per_n.insert((n_keys * n_keys).to_string(), Value::Null)
                }
            };
        }
        bar.inc(1);
        adapters_json
            .last_mut()
            .and_then(Value::as_object_mut)
            .map(|o| o.insert("lookup_us_per_token".into(), Value::Object(per_n)));
    }

    // The first NVIDIA GPU (feature `cuda`)
    #[cfg(feature = "cuda")]
    let cuda_json = cuda::measure(&args, &s, &data, &mut bag, &mut copy, &mut errors);
    #[cfg(not(feature = "cuda"))]
    let cuda_json: Option<Value> = None;

    // Product-key lookup vs brute force on the CPU
    let mut lookup = Map::new();
    let mut brute = Map::new();
    for &n_keys in &s.n_keys {
        let n = (n_keys * n_keys).to_string();
        bar.set_message(format!("lookup N = {n}"));
        let (pk_us, bf_us) = cpu_lookup(&cpu, &s, n_keys)?;
        lookup.insert(n.clone(), json!(pk_us));
        bar.inc(1);
        bar.set_message(format!("brute force N = {n}"));
        brute.insert(n, json!(bf_us));
        bar.inc(1);
    }
    bar.finish_with_message("done");

    let fraction: Map<String, Value> = bag
        .iter()
        .filter_map(|(k, v)| {
            let g = v.as_f64()?;
            let limit = if k.starts_with("wgpu_") {
                let adapter = k.trim_end_matches("_f16");
                copy.get(adapter)?.as_f64()?
            } else if k.starts_with("cuda") || k.starts_with("torch_cuda") {
                copy.get("cuda")?.as_f64()?
            } else {
                cpu_copy.gbps
            };
            Some((k.clone(), json!(g / limit)))
        })
        .collect();
    let report = json!({
        "memlayer_version": env!("CARGO_PKG_VERSION"),
        "quick": args.quick,
        "threads": threads,
        "cpu_model": cpu_model(),
        "cpu_isa_flags": cpu_isa_flags(),
        "cpu_kernel": main_kernel.name(),
        "cpu_kernels_available": simd::available().iter().map(|k| k.name()).collect::<Vec<_>>(),
        "cpu_kernels_compared": compare.iter().map(|k| k.name()).collect::<Vec<_>>(),
        "shapes": s.json(threads),
        "bag_fwd_fraction_of_read": fraction_of(&bag, cpu_read.gbps),
        "bag_fwd_vs_torch": vs_torch(&bag, &paired),
        "bag_fwd_vs_torch_rounds": paired,
        "bag_fwd_gbps": bag,
        "bag_fwd_fraction_of_copy": fraction,
        "bag_fwd_by_dim": by_dim,
        "copy_gbps": copy,
        "read_gbps": read,
        "lookup_us_per_token": lookup,
        "lookup_bruteforce_us_per_token": brute,
        "adapters": adapters_json,
        "cuda": cuda_json,
        "torch": torch_info,
        "errors": errors,
    });
    let text = serde_json::to_string_pretty(&report)?;
    std::fs::write(&args.json, &text)
        .with_context(|| format!("writing {}", args.json.display()))?;
    print_summary(&report);
    println!("wrote {}", args.json.display());
    Ok(())
}

/// The CPU's model name (`/proc/cpuinfo`), or null where it cannot be read.
pub(crate) fn cpu_model() -> Value {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            matches!(k.trim(), "model name" | "Model" | "Hardware" | "cpu model")
                .then(|| v.trim().to_string())
        })
        .map_or(Value::Null, Value::String)
}

/// The SIMD flags of the CPU that matter to the kernel families (`/proc/cpuinfo`).
pub(crate) fn cpu_isa_flags() -> Value {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let Some(flags) = info.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        matches!(k.trim(), "flags" | "Features").then_some(v)
    }) else {
        return Value::Null;
    };
    let keep = |f: &&str| {
        [
            "avx2", "fma", "f16c", "asimd", "fphp", "asimdhp", "bf16", "sve",
        ]
        .contains(f)
            || f.starts_with("avx512")
            || f.starts_with("amx")
    };
    json!(flags.split_whitespace().filter(keep).collect::<Vec<_>>())
}

/// Each CPU figure (memlayer's and torch's) as a fraction of the read bandwidth.
fn fraction_of(bag: &Map<String, Value>, read_gbps: f64) -> Map<String, Value> {
    bag.iter()
        .filter(|(k, _)| k.starts_with("cpu_") || k.starts_with("torch_cpu"))
        .filter_map(|(k, v)| Some((k.clone(), json!(v.as_f64()? / read_gbps))))
        .collect()
}

/// memlayer over torch per storage type, for every `cpu_fast*` family measured:
/// the median ratio of the interleaved rounds where `paired` has them (the
/// family the run chose), else GB/s over torch's GB/s.
fn vs_torch(bag: &Map<String, Value>, paired: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for (k, v) in bag {
        if let Some(r) = paired.get(k).and_then(|p| p["ratio_median"].as_f64()) {
            out.insert(k.clone(), json!(r));
            continue;
        }
        let Some(rest) = k.strip_prefix("cpu_fast") else {
            continue;
        };
        let suffix = ["_f16", "_bf16"]
            .into_iter()
            .find(|x| rest.ends_with(x))
            .unwrap_or("");
        let torch = format!("torch_cpu{suffix}");
        if let (Some(a), Some(b)) = (v.as_f64(), bag.get(&torch).and_then(Value::as_f64)) {
            out.insert(k.clone(), json!(a / b));
        }
    }
    out
}

fn print_summary(r: &Value) {
    println!(
        "CPU: {} ({} threads), kernel family {} (runs: {})",
        r["cpu_model"].as_str().unwrap_or("unknown model"),
        r["threads"],
        r["cpu_kernel"].as_str().unwrap_or("?"),
        r["cpu_kernels_available"]
            .as_array()
            .map(|a| a
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", "))
            .unwrap_or_default()
    );
    let show = |title: &str, m: &Value, unit: &str| {
        println!("{title}");
        if let Some(o) = m.as_object() {
            for (k, v) in o {
                match v.as_f64() {
                    Some(x) => println!("  {k:<34} {x:>12.4} {unit}"),
                    None => println!("  {k:<34} {:>12} {unit}", "null"),
                }
            }
        }
    };
    show("embedding-bag forward", &r["bag_fwd_gbps"], "GB/s");
    show(
        "fraction of the copy bandwidth",
        &r["bag_fwd_fraction_of_copy"],
        "",
    );
    show(
        "fraction of the CPU read bandwidth",
        &r["bag_fwd_fraction_of_read"],
        "",
    );
    show("memlayer / torch", &r["bag_fwd_vs_torch"], "x");
    if let Some(dims) = r["bag_fwd_by_dim"].as_object() {
        for (dim, d) in dims {
            show(
                &format!("embedding-bag forward, dim {dim} ({} rows)", d["rows"]),
                &d["bag_fwd_gbps"],
                "GB/s",
            );
            show(
                &format!("  dim {dim}: fraction of the CPU read bandwidth"),
                &d["bag_fwd_fraction_of_read"],
                "",
            );
            show(
                &format!("  dim {dim}: memlayer / torch"),
                &d["bag_fwd_vs_torch"],
                "x",
            );
        }
    }
    show("copy bandwidth", &r["copy_gbps"], "GB/s");
    show("read bandwidth", &r["read_gbps"], "GB/s");
    show(
        "product-key lookup (cpu_fast)",
        &r["lookup_us_per_token"],
        "us/token",
    );
    show(
        "brute-force scan",
        &r["lookup_bruteforce_us_per_token"],
        "us/token",
    );
    if let Some(errors) = r["errors"].as_array() {
        for e in errors {
            println!("note: {}", e.as_str().unwrap_or_default());
        }
    }
}

/// The Python interpreter, the PyTorch reference script and how long to
/// wait for each of its answers.
pub(crate) struct TorchScript<'a> {
    pub(crate) python: &'a str,
    pub(crate) script: &'a std::path::Path,
    pub(crate) timeout: std::time::Duration,
}

impl PeerArgs {
    pub(crate) fn torch(&self) -> TorchScript<'_> {
        TorchScript {
            python: &self.python,
            script: &self.torch_script,
            timeout: std::time::Duration::from_secs_f64(self.torch_timeout),
        }
    }
}

/// Waits up to `limit` for `child` to exit, then kills it; whether it exited by itself.
pub(crate) fn wait_or_kill(child: &mut std::process::Child, limit: std::time::Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

/// Runs the PyTorch reference on `device` (`cpu` or `cuda`) once, as one
/// block of calls; `Ok((None, info))` when torch is not installed.
pub(crate) fn torch_bag_on(
    torch: &TorchScript<'_>,
    s: &Shapes,
    threads: usize,
    dtype: &str,
    device: &str,
) -> Result<(Option<f64>, Value)> {
    // torch gets transparent huge pages for its tensors, as memlayer's tables have
    let mut child = Command::new(torch.python)
        .env("THP_MEM_ALLOC_ENABLE", "1")
        .arg(torch.script)
        .args(["--rows", &s.rows.to_string(), "--dim", &s.dim.to_string()])
        .args([
            "--bags",
            &s.bags.to_string(),
            "--bag-size",
            &s.bag_size.to_string(),
        ])
        .args(["--threads", &threads.to_string(), "--dtype", dtype])
        .args(["--iters", &s.iters.to_string(), "--seed", "2024"])
        .args(["--index-sets", &INDEX_SETS.to_string()])
        .args(["--device", device])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {} {}", torch.python, torch.script.display()))?;
    // both pipes drained on threads while the run is timed out
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut text);
            }
            text
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    if !wait_or_kill(&mut child, torch.timeout) {
        bail!(
            "{} gave no answer in {} s (--torch-timeout); stopped it",
            torch.script.display(),
            torch.timeout.as_secs_f64()
        );
    }
    let status = child.wait()?;
    let (stdout, stderr) = (
        stdout.join().unwrap_or_default(),
        stderr.join().unwrap_or_default(),
    );
    if !status.success() {
        bail!(
            "{} exited with {}: {}",
            torch.script.display(),
            status,
            String::from_utf8_lossy(&stderr).trim()
        );
    }
    let line = String::from_utf8_lossy(&stdout);
    let v: Value = serde_json::from_str(line.trim())
        .with_context(|| format!("parsing the torch script's output {line:?}"))?;
    let info = json!({
        "version": v.get("torch_version").cloned().unwrap_or(Value::Null),
        "threads": v.get("threads").cloned().unwrap_or(Value::Null),
        "error": v.get("error").cloned().unwrap_or(Value::Null),
    });
    Ok((v["gbps"].as_f64(), info))
}

/// The optimised CPU bag forward in f32, f16 and bf16 storage with the current
/// kernel family, as `{prefix}`, `{prefix}_f16`, `{prefix}_bf16` in `bag`.
fn cpu_fast_all(
    cpu: &Cpu,
    s: &Shapes,
    data: &BagData,
    prefix: &str,
    bag: &mut Map<String, Value>,
    bar: &ProgressBar,
) -> Result<()> {
    let family = simd::kernel();
    bar.set_message(format!(
        "bag forward: {prefix} f32 ({family}, dim {})",
        s.dim
    ));
    bag.insert(prefix.into(), json!(cpu_bag(cpu, s, data, &data.table)?));
    bar.inc(1);
    bar.set_message(format!(
        "bag forward: {prefix} f16 ({family}, dim {})",
        s.dim
    ));
    let t = narrow::<half::f16>(&data.table);
    bag.insert(format!("{prefix}_f16"), json!(cpu_bag(cpu, s, data, &t)?));
    drop(t);
    bar.inc(1);
    bar.set_message(format!(
        "bag forward: {prefix} bf16 ({family}, dim {})",
        s.dim
    ));
    let t = narrow::<half::bf16>(&data.table);
    bag.insert(format!("{prefix}_bf16"), json!(cpu_bag(cpu, s, data, &t)?));
    bar.inc(1);
    Ok(())
}

/// PyTorch CPU f32 / f16 / bf16 on the shapes `s` into `bag` (null with the
/// reason in `errors` when it fails; `torch_info` from the first answer),
/// measured in rounds interleaved with memlayer's own bag forward
/// ([`torch_paired`]): `torch_cpu*` is torch's GB/s over the rounds, `paired`
/// gets each dtype's rounds under its `cpu_fast*` key.
#[allow(clippy::too_many_arguments)]
fn torch_all(
    args: &KernelsArgs,
    cpu: &Cpu,
    s: &Shapes,
    data: &BagData,
    bag: &mut Map<String, Value>,
    paired: &mut Map<String, Value>,
    torch_info: &mut Value,
    errors: &mut Vec<String>,
    bar: &ProgressBar,
) {
    let threads = cpu.threads();
    // rounds of 3 torch calls and 3 memlayer calls (120 calls each in the
    // full run, a second or two): single rounds here range over 0.5–2x, the
    // median of many is what repeats
    let (rounds, burst) = (PAIRED_ROUNDS_PER_ITER * s.iters, PAIRED_BURST);
    for (dtype, suffix) in [("f32", ""), ("f16", "_f16"), ("bf16", "_bf16")] {
        let name = format!("torch_cpu{suffix}");
        bar.set_message(format!(
            "bag forward: {name} and cpu_fast{suffix} in turns (dim {})",
            s.dim
        ));
        let measured = (|| -> Result<Option<(f64, Value)>> {
            let (mut peer, info) = match TorchPeer::start(&args.peer.torch(), s, threads, dtype)? {
                Started::Peer(p, info) => (p, info),
                Started::NoTorch(info) => {
                    if torch_info.is_null() {
                        *torch_info = info;
                    }
                    return Ok(None);
                }
            };
            if torch_info.is_null() {
                *torch_info = info;
            }
            let p = match dtype {
                "f16" => {
                    let t = narrow::<half::f16>(&data.table);
                    paired_bag(cpu, s, data, &t, &mut peer, rounds, burst)?
                }
                "bf16" => {
                    let t = narrow::<half::bf16>(&data.table);
                    paired_bag(cpu, s, data, &t, &mut peer, rounds, burst)?
                }
                _ => paired_bag(cpu, s, data, &data.table, &mut peer, rounds, burst)?,
            };
            Ok(Some((p.torch_gbps, p.json())))
        })();
        match measured {
            Ok(Some((gbps, rounds_json))) => {
                bag.insert(name, json!(gbps));
                paired.insert(format!("cpu_fast{suffix}"), rounds_json);
            }
            Ok(None) => {
                bag.insert(name, Value::Null);
            }
            Err(e) => {
                errors.push(format!("{name} (dim {}): {e:#}", s.dim));
                bag.insert(name, Value::Null);
            }
        }
        bar.inc(1);
    }
}

/// Rounds of [`torch_all`] per `Shapes::iters`, and calls per burst.
const PAIRED_ROUNDS_PER_ITER: usize = 4;
const PAIRED_BURST: usize = 3;

/// Index sets the CPU and torch bag calls rotate through: set `k` is the
/// workload's indices shifted by `k * rows / INDEX_SETS` (mod rows), still
/// uniform, so consecutive calls gather different rows and the rows of one
/// call (up to 256 MiB at the default shape) are not served from a large L3
/// (300 MiB here) by the next: the figure is the memory's, not the cache's.
const INDEX_SETS: usize = 4;

/// Index set `k` of [`INDEX_SETS`] (see there).
fn index_set(indices: &[u32], k: usize, rows: usize) -> Vec<u32> {
    let shift = (k * rows / INDEX_SETS) as u64;
    indices
        .iter()
        .map(|&i| ((i as u64 + shift) % rows as u64) as u32)
        .collect()
}

/// Calls of the optimised CPU bag forward over the bag workload's table in
/// storage type `T`, copied onto transparent huge pages first; successive
/// calls rotate through [`INDEX_SETS`] index sets. Set-up ends with one
/// untimed call per index set (as the torch script's 1 + 3 warm-up calls
/// also cover each of the 4 sets once).
pub(crate) struct CpuBagCalls<'a, T: Storage> {
    cpu: &'a Cpu,
    s: &'a Shapes,
    data: &'a BagData,
    table: LargeBuf<T>,
    sets: Vec<Vec<u32>>,
    /// (bags, dim)
    out: Vec<f32>,
    calls: usize,
}

impl<'a, T: Storage> CpuBagCalls<'a, T> {
    pub(crate) fn new(cpu: &'a Cpu, s: &'a Shapes, data: &'a BagData, table: &[T]) -> Result<Self> {
        let mut c = Self {
            cpu,
            s,
            data,
            table: LargeBuf::from_slice(table, true),
            sets: (0..INDEX_SETS)
                .map(|k| index_set(&data.indices, k, s.rows))
                .collect(),
            out: vec![0.0f32; s.bags * s.dim],
            calls: 0,
        };
        for _ in 0..INDEX_SETS {
            c.call()?;
        }
        Ok(c)
    }

    /// Seconds of one call (the next index set).
    pub(crate) fn call(&mut self) -> Result<f64> {
        let t = Table::new(&self.table, self.s.rows, self.s.dim)?;
        let indices = &self.sets[self.calls % INDEX_SETS];
        self.calls += 1;
        let t0 = Instant::now();
        let d = self.data;
        self.cpu
            .bag_forward(&t, indices, &d.weights, &d.offsets, &mut self.out)?;
        Ok(t0.elapsed().as_secs_f64())
    }

    /// GB/s of gathered row bytes at `secs` per call.
    pub(crate) fn gbps(&self, secs: f64) -> f64 {
        self.s.gathered_bytes(std::mem::size_of::<T>()) / secs / 1e9
    }
}

/// GB/s of the optimised CPU bag forward over `table` ([`CpuBagCalls`]):
/// the median of `s.iters` calls.
pub(crate) fn cpu_bag<T: Storage>(
    cpu: &Cpu,
    s: &Shapes,
    data: &BagData,
    table: &[T],
) -> Result<f64> {
    let mut calls = CpuBagCalls::new(cpu, s, data, table)?;
    let secs = (0..s.iters.max(1))
        .map(|_| calls.call())
        .collect::<Result<Vec<f64>>>()?;
    Ok(calls.gbps(median(secs)))
}

/// GB/s of the WGSL copy kernel (bytes copied per second).
pub(crate) fn gpu_copy(ctx: &GpuContext, s: &Shapes) -> Result<f64> {
    let bytes = s.gpu_copy_bytes.min(ctx.max_binding_bytes()) / 16 * 16;
    let src = storage_zeroed(ctx, "copy src", bytes);
    let dst = storage_zeroed(ctx, "copy dst", bytes);
    let kernel = CopyKernel::new(ctx)?;
    let secs = time_median(s.iters, || {
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        kernel.record(ctx, &mut enc, &src, &dst, bytes)?;
        ctx.queue.submit([enc.finish()]);
        ctx.wait()?;
        Ok(())
    })?;
    Ok(bytes as f64 / secs / 1e9)
}

/// Median seconds of one WGSL bag forward (device time incl. submit, no uploads).
pub(crate) fn gpu_bag(
    ctx: &GpuContext,
    s: &Shapes,
    data: &BagData,
    dtype: GpuDtype,
) -> Result<f64> {
    let table = ShardedTable::upload(ctx, "values", &data.table, s.rows, s.dim, dtype)?;
    let indices = storage_init(ctx, "indices", &data.indices);
    let weights = storage_init(ctx, "weights", &data.weights);
    let offsets: Vec<u32> = data.offsets.iter().map(|&o| o as u32).collect();
    let offsets = storage_init(ctx, "offsets", &offsets);
    let out = storage_zeroed(ctx, "out", (s.bags * s.dim * 4) as u64);
    let kernel = BagForward::new(ctx)?;
    time_median(s.iters, || {
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        kernel.record(
            ctx,
            &mut enc,
            BagTable::Flat(&table),
            &indices,
            &weights,
            &offsets,
            s.bags,
            &out,
        )?;
        ctx.queue.submit([enc.finish()]);
        ctx.wait()?;
        Ok(())
    })
}

pub(crate) fn lookup_cfg(s: &Shapes, n_keys: usize) -> PkmConfig {
    PkmConfig {
        dim: s.k_dim,
        v_dim: s.k_dim,
        heads: s.heads,
        n_keys,
        k_dim: s.k_dim,
        knn: s.knn,
        qk_norm: false,
        gated: false,
    }
}

/// The lookup's inputs at `n_keys` for `tokens` tokens: the config, sub-keys
/// (heads, 2, n_keys, k_dim / 2) and queries (tokens, heads, k_dim).
pub(crate) fn lookup_inputs(
    s: &Shapes,
    n_keys: usize,
    tokens: usize,
) -> (PkmConfig, Vec<f32>, Vec<f32>) {
    let cfg = lookup_cfg(s, n_keys);
    let mut rng = Rng::new(n_keys as u64);
    let keys = rng.normal_vec(cfg.heads * 2 * n_keys * cfg.half(), 0.0, 1.0);
    let query = rng.normal_vec(tokens * cfg.heads * cfg.k_dim, 0.0, 1.0);
    (cfg, keys, query)
}

/// Microseconds per token of the WGSL lookup.
pub(crate) fn gpu_lookup(ctx: &GpuContext, s: &Shapes, n_keys: usize) -> Result<f64> {
    let tokens = s.gpu_lookup_tokens;
    let (cfg, keys, query) = lookup_inputs(s, n_keys, tokens);
    let plan = LookupPlan::new(ctx, &cfg, tokens)?;
    let bufs = LookupBuffers::new(ctx, &plan)?;
    let keys_buf = storage_init(ctx, "keys", &keys);
    let query_buf = storage_init(ctx, "query", &query);
    let kernels = LookupKernels::new(ctx)?;
    let secs = time_median(s.iters.min(3), || {
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        kernels.record(ctx, &mut enc, &keys_buf, &query_buf, &bufs)?;
        ctx.queue.submit([enc.finish()]);
        ctx.wait()?;
        Ok(())
    })?;
    Ok(secs * 1e6 / tokens as f64)
}

/// Microseconds per token of the optimised CPU lookup and of a brute-force
/// scan over all N = n_keys² rows (same scores, same order, same threads).
fn cpu_lookup(cpu: &Cpu, s: &Shapes, n_keys: usize) -> Result<(f64, f64)> {
    let (cfg, keys, query) = lookup_inputs(s, n_keys, s.lookup_tokens);
    let pk = cpu_lookup_secs(cpu, s, &cfg, &keys, &query)?;
    let bt = s.brute_tokens;
    let brute = time_median(1, || {
        let found =
            cpu.install(|| brute_force(&cfg, &keys, &query[..bt * cfg.heads * cfg.k_dim], bt));
        // the brute force must agree with the product-key search
        let want =
            memlayer_core::pkm::lookup(&cfg, &keys, &query[..bt * cfg.heads * cfg.k_dim], bt)?;
        if found != want.indices {
            bail!("brute force and product-key search disagree at n_keys = {n_keys}");
        }
        Ok(())
    })?;
    // the oracle check inside the brute-force timing is small next to the N-row scan
    Ok((pk * 1e6 / s.lookup_tokens as f64, brute * 1e6 / bt as f64))
}

/// Median seconds of the optimised CPU lookup of `s.lookup_tokens` tokens
/// (current kernel family). keys: (heads, 2, n_keys, half); query: (tokens, heads, k_dim).
pub(crate) fn cpu_lookup_secs(
    cpu: &Cpu,
    s: &Shapes,
    cfg: &PkmConfig,
    keys: &[f32],
    query: &[f32],
) -> Result<f64> {
    let prepared = memlayer_cpu::pkm::PreparedKeys::new(cfg, keys)?;
    time_median(s.iters.min(5), || {
        cpu.lookup(&prepared, query, s.lookup_tokens)?;
        Ok(())
    })
}

/// Top-k over all n_keys² rows of each (token, head), parallel over (token, head).
fn brute_force(cfg: &PkmConfig, keys: &[f32], query: &[f32], tokens: usize) -> Vec<u32> {
    let (n, half, k) = (cfg.n_keys, cfg.half(), cfg.knn);
    (0..tokens * cfg.heads)
        .into_par_iter()
        .flat_map_iter(|th| {
            let h = th % cfg.heads;
            let q = &query[th * cfg.k_dim..(th + 1) * cfg.k_dim];
            let sub = |side: usize| -> Vec<f32> {
                (0..n)
                    .map(|i| {
                        let off = ((h * 2 + side) * n + i) * half;
                        memlayer_core::linalg::dot(
                            &keys[off..off + half],
                            &q[side * half..(side + 1) * half],
                        )
                    })
                    .collect()
            };
            let (s1, s2) = (sub(0), sub(1));
            // keep the best k seen so far; scan every row
            let mut best: Vec<Candidate> = Vec::with_capacity(2 * k);
            let mut floor: Option<Candidate> = None;
            for (i, &a) in s1.iter().enumerate() {
                for (j, &b) in s2.iter().enumerate() {
                    let c = Candidate {
                        score: a + b,
                        s1: a,
                        s2: b,
                        row: (i * n + j) as u32,
                    };
                    if floor.is_some_and(|f| candidate_order(&c, &f).is_ge()) {
                        continue;
                    }
                    best.push(c);
                    if best.len() == 2 * k {
                        select_best(&mut best, k);
                        floor = best.last().copied();
                    }
                }
            }
            select_best(&mut best, k);
            best.into_iter().map(|c| c.row)
        })
        .collect()
}
