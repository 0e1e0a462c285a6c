//! `memlayer train` and `memlayer eval`.

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use clap::{Args, ValueEnum};
use memlayer_model::MemoryOps;
use memlayer_train::eval::EvalReport;
use memlayer_train::{PRESETS, TrainConfig, TrainOptions, eval_dir, train_and_report};
use std::path::PathBuf;

/// Where the model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// burn's CPU backend (Flex) with memlayer's CPU memory ops.
    Cpu,
    /// burn-wgpu (Vulkan/Metal/DX12; lavapipe on a machine without GPU).
    Wgpu,
}

/// Memory-op implementation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OpsChoice {
    /// The backend extension where it runs (CPU kernels, WGSL on wgpu), else portable.
    Auto,
    /// burn tensor ops only.
    Portable,
    /// The backend extension (CPU kernels on `cpu`, WGSL kernels on `wgpu`).
    Native,
}

/// Device and memory ops of a backend choice.
pub fn device_for(backend: Backend, ops: OpsChoice) -> Result<(Device, MemoryOps)> {
    let device = match backend {
        Backend::Cpu => Device::flex(),
        Backend::Wgpu => Device::wgpu(burn::tensor::DeviceKind::DefaultDevice),
    };
    let ops = match ops {
        OpsChoice::Auto => MemoryOps::best_for(&device),
        OpsChoice::Portable => MemoryOps::Portable,
        OpsChoice::Native => {
            if !memlayer_model::ops::native::supported(&device) {
                bail!("--ops native is not available on the {backend:?} backend");
            }
            MemoryOps::Native
        }
    };
    Ok((device, ops))
}

#[derive(Args)]
#[command(group = clap::ArgGroup::new("source").required(true).args(["config", "preset"]))]
pub struct TrainArgs {
    /// Training config (JSON, as written to `train.json`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// A built-in preset: tiny-{dense,pkm,hier}, demo-{dense,pkm,hier}.
    #[arg(long)]
    preset: Option<String>,
    /// Run and model directory.
    #[arg(long)]
    out: PathBuf,
    /// Continue from the checkpoint in `--out`.
    #[arg(long)]
    resume: bool,
    /// Backend.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: Backend,
    /// Memory-op implementation.
    #[arg(long, value_enum, default_value = "auto")]
    ops: OpsChoice,
    /// Override the number of steps of the schedule.
    #[arg(long)]
    steps: Option<u64>,
    /// Override the checkpoint interval.
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Stop after this many steps in total without finishing the run (the
    /// schedule is unchanged; `--resume` continues it).
    #[arg(long)]
    stop_after: Option<u64>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

fn load_config(args: &TrainArgs) -> Result<TrainConfig> {
    let mut cfg = if let Some(name) = &args.preset {
        TrainConfig::preset(name)
            .with_context(|| format!("unknown preset {name:?}; presets: {}", PRESETS.join(", ")))?
    } else if let Some(path) = &args.config {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing config {}", path.display()))?
    } else {
        bail!("give --config FILE or --preset NAME");
    };
    if let Some(s) = args.steps {
        cfg.steps = s;
        cfg.optim.warmup_steps = cfg.optim.warmup_steps.min(s / 5);
    }
    if let Some(c) = args.checkpoint_every {
        cfg.checkpoint_every = c;
    }
    cfg.validate()
        .map_err(|e| anyhow::anyhow!("invalid training config: {e}"))?;
    Ok(cfg)
}

pub fn print_eval(e: &EvalReport) {
    println!(
        "{:<10} {:>8} {:>8} {:>8} {:>9} {:>8}",
        "bucket", "queries", "recall", "ranked", "baseline", "chance"
    );
    for b in &e.buckets {
        println!(
            "{:<10} {:>8} {:>8.3} {:>8.3} {:>9.3} {:>8.3}",
            b.name, b.queries, b.recall, b.ranked_recall, b.baseline, b.chance
        );
    }
    println!(
        "recall {:.3}   held-out loss {:.3}   perplexity {:.2} ({} sequences)",
        e.recall, e.heldout_loss, e.perplexity, e.heldout_sequences
    );
}

pub fn run_train(args: TrainArgs) -> Result<()> {
    let cfg = load_config(&args)?;
    let (device, ops) = device_for(args.backend, args.ops)?;
    let counts = cfg.model.param_counts();
    eprintln!(
        "{}: {} params ({} dense, {} memory; {} active per token), {:.2} MFLOP/token, {} steps x {} tokens, {:?} ops on {:?}",
        cfg.name,
        counts.total(),
        counts.dense,
        counts.memory_values + counts.memory_blocks,
        counts.active(),
        cfg.model.flops_per_token(cfg.seq_len) / 1e6,
        cfg.steps,
        cfg.batch_size * cfg.seq_len,
        ops,
        args.backend,
    );
    let opts = TrainOptions {
        resume: args.resume,
        device,
        ops,
        stop_after: args.stop_after,
        progress: !args.quiet,
    };
    if let Some(stop) = args.stop_after.filter(|&s| s < cfg.steps) {
        let out = memlayer_train::train(&cfg, &args.out, &opts)?;
        let last = out.history.last().map_or(f32::NAN, |r| r.loss);
        println!(
            "stopped after step {stop} of {} (loss {last:.3}); continue with --resume",
            cfg.steps
        );
        return Ok(());
    }
    let report = train_and_report(&cfg, &args.out, &opts)?;
    println!(
        "{}: loss {:.3} -> {:.3}, {:.1} s, {:.0} tokens/s, {:.1} ms/step",
        report.name,
        report.first_loss,
        report.final_loss,
        report.train_seconds,
        report.tokens_per_second,
        report.seconds_per_step * 1e3
    );
    print_eval(&report.eval);
    println!("model written to {}", args.out.display());
    Ok(())
}

#[derive(Args)]
pub struct EvalArgs {
    /// Model directory written by `memlayer train`.
    dir: PathBuf,
    /// Backend.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: Backend,
    /// Memory-op implementation.
    #[arg(long, value_enum, default_value = "auto")]
    ops: OpsChoice,
    /// Also write the report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run_eval(args: EvalArgs) -> Result<()> {
    let (device, ops) = device_for(args.backend, args.ops)?;
    let report = eval_dir(&args.dir, &device, ops)?;
    print_eval(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
