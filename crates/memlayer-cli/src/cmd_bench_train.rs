//! `memlayer bench train`: training step time of the memory variants against
//! dense at equal active parameters, on the same backend, in one run; and
//! tokens/s per backend (burn's CPU backend vs burn-wgpu).

use crate::args::{Backend, OpsChoice};
use crate::open::device_for;
use anyhow::{Context, Result};
use clap::Args;
use memlayer_train::TrainConfig;
use memlayer_train::optim::AdamW;
use memlayer_train::prepare::prepare;
use memlayer_train::trainer::train_step;
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct TrainBenchArgs {
    /// Preset size: `tiny` or `demo`.
    #[arg(long, default_value = "tiny")]
    pub size: String,
    /// Timed steps per variant and backend.
    #[arg(long, default_value_t = 20)]
    pub steps: u64,
    /// Untimed steps first (kernel compilation, allocator warm-up).
    #[arg(long, default_value_t = 3)]
    pub warmup: u64,
    /// Variants to measure (the first is the reference of "vs dense").
    #[arg(long, value_delimiter = ',', default_value = "dense,pkm,hier")]
    pub variants: Vec<String>,
    /// Backends to measure.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "cpu")]
    pub backends: Vec<Backend>,
    /// Memory ops: the backend extension (`native`: memlayer-cpu kernels on
    /// cpu, the WGSL kernels on wgpu), burn tensor ops, or the fastest.
    #[arg(long, value_enum, default_value = "auto")]
    pub ops: OpsChoice,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn run(args: TrainBenchArgs) -> Result<()> {
    let mut rows = Vec::new();
    println!(
        "{:<8} {:<9} {:<12} {:>10} {:>10} {:>12} {:>14} {:>10}",
        "backend", "ops", "variant", "ms/step", "tok/s", "vs dense", "active params", "MFLOP/tok"
    );
    for &backend in &args.backends {
        let (device, ops) = device_for(backend, args.ops)?;
        let device = device.autodiff();
        let mut dense_ms = None;
        for variant in &args.variants {
            let name = format!("{}-{variant}", args.size);
            let cfg = TrainConfig::preset(&name)
                .with_context(|| format!("no preset {name} (sizes: tiny, demo)"))?;
            let prepared = prepare(&cfg)?;
            let mut store = memlayer_core::model::ParamStore::init(&cfg.model, cfg.seed)?;
            let mut optim = AdamW::new(cfg.optim.clone(), &store);
            let mut run = |steps: std::ops::Range<u64>| -> Result<()> {
                for step in steps {
                    train_step(
                        &cfg,
                        &mut store,
                        &mut optim,
                        &prepared.train,
                        step,
                        &device,
                        ops,
                    )?;
                }
                Ok(())
            };
            run(0..args.warmup)?;
            let t0 = Instant::now();
            run(args.warmup..args.warmup + args.steps)?;
            let ms = t0.elapsed().as_secs_f64() * 1e3 / args.steps.max(1) as f64;
            let tokens = (cfg.batch_size * cfg.seq_len) as f64;
            let ratio = match dense_ms {
                None => {
                    dense_ms = Some(ms);
                    1.0
                }
                Some(d) => ms / d,
            };
            let counts = cfg.model.param_counts();
            let flops = cfg.model.flops_per_token(cfg.seq_len);
            println!(
                "{:<8} {:<9} {:<12} {:>10.1} {:>10.0} {:>11.2}x {:>14} {:>10.2}",
                format!("{backend:?}").to_lowercase(),
                format!("{ops:?}").to_lowercase(),
                name,
                ms,
                tokens / (ms / 1e3),
                ratio,
                counts.active(),
                flops / 1e6
            );
            rows.push(json!({
                "backend": format!("{backend:?}").to_lowercase(),
                "ops": format!("{ops:?}").to_lowercase(),
                "variant": name,
                "ms_per_step": ms,
                "tokens_per_second": tokens / (ms / 1e3),
                "ratio_vs_dense": ratio,
                "active_params": counts.active(),
                "total_params": counts.total(),
                "flops_per_token": flops,
                "tokens_per_step": tokens,
                "steps": args.steps,
                "warmup": args.warmup,
            }));
        }
    }
    if let Some(path) = &args.json {
        let doc = json!({ "bench": "train", "size": args.size, "results": rows });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
