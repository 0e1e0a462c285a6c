//! `memlayer bench [--quick] --out DIR [--compare BASE.json]`: the
//! cross-backend runner. It discovers the backends ([`backends`]), checks
//! every op on each against the CPU oracle first ([`parity`]), then measures
//! speed ([`speed`]: the measurements of `bench kernels`, `bench paged` and
//! `bench train`, called from here), and writes `DIR/bench.json` (versioned),
//! `DIR/bench.md` and PNG plots ([`report`]).
//!
//! Exit codes: 0 done (and no regression under `--compare`); 1 an error;
//! 2 bad flags (clap); 3 a parity failure (the op, backend, case and first
//! differing element are printed; the report is written, speed is not
//! measured); 4 `--compare` found a row slower than the base by more than
//! `--threshold`.

pub mod backends;
pub mod browser;
#[cfg(feature = "cuda")]
mod cuda;
pub mod parity;
pub mod report;
pub mod speed;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use memlayer_cpu::Cpu;
use memlayer_cpu::simd;
use serde_json::{Value, json};

use crate::cmd_bench_kernels::{BagData, PeerArgs, cpu_isa_flags, cpu_model};
use backends::{Backend, BrowserConfig, Discovery, Engine};

/// Exit code of a parity failure.
pub const EXIT_PARITY: i32 = 3;
/// Exit code of a regression found by `--compare`.
pub const EXIT_REGRESSION: i32 = 4;

#[derive(Args)]
pub struct RunnerArgs {
    /// Small shapes and few iterations: the CI smoke run (under a minute on 2 cores).
    #[arg(long)]
    pub quick: bool,
    /// Write bench.json, bench.md and the PNG plots into this directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// An earlier run's bench.json: prints each row's ratio to it and flags
    /// rows slower by more than --threshold (exit code 4).
    #[arg(long)]
    pub compare: Option<PathBuf>,
    /// Slowdown that counts as a regression under --compare (0.10: 10 %).
    #[arg(long, default_value_t = 0.10)]
    pub threshold: f64,
    /// Only backends whose name contains one of these (comma-separated, e.g.
    /// `cpu_fast,vulkan`); the oracle always runs.
    #[arg(long, value_delimiter = ',')]
    pub backends: Vec<String>,
    /// Check parity only; measure no speed.
    #[arg(long)]
    pub parity_only: bool,
    #[command(flatten)]
    pub peer: PeerArgs,
    /// Model directory of the end-to-end decode rows.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/demo-pkm"))]
    pub model: PathBuf,
    /// Leave out the end-to-end rows (decode tok/s, train step).
    #[arg(long)]
    pub no_end_to_end: bool,
    /// The browser harness of the `webgpu_chromium` backends (`pkg/` from
    /// scripts/build-web.sh, `node_modules/` from `npm ci`).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../web"))]
    pub web: PathBuf,
    /// Chromium for the browser backends (default: $CHROMIUM, else /usr/bin/chromium).
    #[arg(long)]
    pub chromium: Option<PathBuf>,
    /// Leave out WebGPU in headless Chromium.
    #[arg(long)]
    pub no_browser: bool,
}

fn machine(cpu: &Cpu) -> Value {
    json!({
        "cpu_model": cpu_model(),
        "cpu_isa_flags": cpu_isa_flags(),
        "threads": cpu.threads(),
        "cpu_kernel_default": simd::detected().name(),
        "cpu_kernels_available": simd::available().iter().map(|k| k.name()).collect::<Vec<_>>(),
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
    })
}

pub fn run(args: RunnerArgs) -> Result<()> {
    let started = Instant::now();
    let Some(out_dir) = args.out.clone() else {
        bail!(
            "`memlayer bench` with no subcommand runs every backend and needs --out DIR (or name one: kernels, train, paged)"
        );
    };
    if !(args.threshold > 0.0 && args.threshold < 1.0) {
        bail!("--threshold must be in (0, 1), got {}", args.threshold);
    }
    // read the base first: a bad --compare fails before the run, not after it
    let base = match &args.compare {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Some(
                serde_json::from_str::<Value>(&text)
                    .with_context(|| format!("parsing {}", path.display()))?,
            )
        }
        None => None,
    };
    let raw_dir = out_dir.join("raw");
    std::fs::create_dir_all(&raw_dir).with_context(|| format!("creating {}", raw_dir.display()))?;
    let cpu = Cpu::new(args.peer.threads).context("creating the CPU thread pool")?;

    let end_to_end = !args.no_end_to_end && !args.parity_only;
    let chromium = args.chromium.clone().unwrap_or_else(|| {
        std::env::var_os("CHROMIUM").map_or_else(|| "/usr/bin/chromium".into(), PathBuf::from)
    });
    let backends = Discovery {
        filter: &args.backends,
        python: &args.peer.python,
        end_to_end,
        browser: (!args.no_browser).then_some(BrowserConfig {
            web_dir: &args.web,
            chromium: &chromium,
            quick: args.quick,
            raw_dir: &raw_dir,
        }),
    }
    .run();
    for b in &backends {
        match &b.engine {
            Ok(_) => println!("found  {:<34} {}", b.name, b.kind),
            Err(reason) => println!("absent {:<34} {reason}", b.name),
        }
    }
    let kernel_backends: Vec<&Backend> = backends.iter().filter(|b| b.has_kernels()).collect();
    let timed_backends: Vec<&Backend> = backends
        .iter()
        .filter(|b| b.has_kernels() || matches!(b.engine, Ok(Engine::Torch)))
        .collect();
    let runtimes: Vec<&Backend> = backends
        .iter()
        .filter(|b| matches!(b.engine, Ok(Engine::Runtime(_))))
        .collect();
    let steps = kernel_backends.len()
        + if args.parity_only {
            0
        } else {
            2 + 4 * timed_backends.len() + 2 * runtimes.len()
        };
    let bar = ProgressBar::new(steps as u64).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );

    // parity first, on every backend with kernels
    let lookup_cases = parity::lookup_cases();
    let bag_cases = parity::bag_cases();
    let mut parity_rows = Vec::new();
    for b in &kernel_backends {
        bar.set_message(format!("parity: {}", b.name));
        parity_rows.extend(parity::check(b, &cpu, &lookup_cases, &bag_cases));
        bar.inc(1);
    }
    let failures: Vec<&parity::ParityRow> = parity_rows
        .iter()
        .filter(|r| matches!(r.status, "fail" | "error"))
        .collect();
    let parity_passed = failures.is_empty();

    let mut speed_rows = Vec::new();
    let mut ceilings_json = Value::Null;
    let s = speed::shapes(args.quick);
    if parity_passed && !args.parity_only {
        bar.set_message("generating the bag data");
        let data = BagData::new(&s);
        bar.inc(1);
        bar.set_message("ceilings: CPU read/copy, GPU copy");
        let ceilings = speed::Ceilings::measure(&backends, &cpu, &s);
        ceilings_json = json!(ceilings.figures);
        bar.inc(1);
        let inputs = speed::SpeedInputs {
            cpu: &cpu,
            shapes: &s,
            data: &data,
            ceilings: &ceilings,
            torch: args.peer.torch(),
        };
        for b in &timed_backends {
            speed_rows.extend(speed::kernel_rows(b, &inputs, &bar));
        }
        drop(data);
        let e2e = speed::EndToEnd {
            model: &args.model,
            quick: args.quick,
            raw_dir: &raw_dir,
        };
        for b in &runtimes {
            bar.set_message(format!("decode: {}", b.name));
            speed_rows.extend(speed::decode_rows(b, &e2e, &bar));
            bar.inc(1);
            bar.set_message(format!("train step: {}", b.name));
            // training on wgpu compiles its kernels first (~20 s on lavapipe): full runs only
            let train_here =
                !args.quick || matches!(b.engine, Ok(Engine::Runtime(crate::args::Backend::Cpu)));
            if train_here {
                speed_rows.extend(speed::train_rows(b, &e2e, &bar));
            }
            bar.inc(1);
        }
    }
    bar.finish_and_clear();

    let compared = match (&base, &args.compare) {
        (Some(base), Some(path)) if parity_passed => {
            Some((report::compare(base, &speed_rows, args.threshold)?, path))
        }
        _ => None,
    };
    let mut doc = json!({
        "schema": report::SCHEMA,
        "schema_version": report::SCHEMA_VERSION,
        "memlayer_version": env!("CARGO_PKG_VERSION"),
        "quick": args.quick,
        "machine": machine(&cpu),
        "backends": backends.iter().map(Backend::json).collect::<Vec<_>>(),
        "parity_tolerance": parity::TOLERANCE,
        "parity_passed": parity_passed,
        "parity": parity_rows.iter().map(parity::ParityRow::json).collect::<Vec<_>>(),
        "speed_measured": parity_passed && !args.parity_only,
        "shapes": {
            "bag": {"rows": s.rows, "dim": s.dim, "bags": s.bags, "bag_size": s.bag_size, "iters": s.iters},
            "lookup": {"n_keys": s.n_keys, "heads": s.heads, "knn": s.knn, "k_dim": s.k_dim,
                       "tokens_cpu": s.lookup_tokens, "tokens_wgpu": s.gpu_lookup_tokens, "tokens_oracle": s.brute_tokens},
            "bytes": {
                "bag_forward": "bags * bag_size * dim * dtype bytes (rows gathered)",
                "bag_backward": "nnz * dim * (4 + dtype bytes) (grad_out rows read by the table gradient, table rows read by the weight gradient); wgpu and CUDA include the uploads and read-back of their host calls",
                "lookup": "heads * 2 * n_keys * k_dim/2 * 4 per token (sub-keys scored)",
                "lookup_backward": "2 * sub-key bytes per call (keys read, key gradient written); wgpu includes uploads and read-back",
                "decode, train_step": "no byte model: no fraction",
            },
        },
        "ceilings_gbps": ceilings_json,
        "speed": speed_rows.iter().map(speed::SpeedRow::json).collect::<Vec<_>>(),
        "seconds": started.elapsed().as_secs_f64(),
    });
    if let Some((rows, path)) = &compared {
        doc["compare"] = report::compared_json(rows, args.threshold, path);
    }
    let json_path = out_dir.join("bench.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&doc)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    let md = report::markdown(&doc);
    let md_path = out_dir.join("bench.md");
    std::fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
    let plots = report::plots(&out_dir, &speed_rows)?;
    println!("{md}");
    println!(
        "wrote {}, {} and {} plot(s) in {:.1} s",
        json_path.display(),
        md_path.display(),
        plots.len(),
        started.elapsed().as_secs_f64()
    );

    if !parity_passed {
        for f in &failures {
            eprintln!("parity FAILED: {}", f.message());
        }
        eprintln!(
            "error: parity failed on {} (op, backend, case); speed not measured",
            failures.len()
        );
        std::process::exit(EXIT_PARITY);
    }
    if let Some((rows, _)) = &compared {
        report::print_compared(rows, args.threshold);
        let regressions = rows.iter().filter(|c| c.regression).count();
        if regressions > 0 {
            eprintln!(
                "error: {regressions} row(s) slower than the base by more than {:.0} %",
                args.threshold * 100.0
            );
            std::process::exit(EXIT_REGRESSION);
        }
    }
    Ok(())
}
