//! `memlayer train`: a model trained from a preset or config into a model
//! directory, then evaluated.

use crate::args::{Backend, OpsChoice};
use crate::cmd_eval::print_eval;
use crate::open::device_for;
use anyhow::{Context, Result, bail};
use clap::Args;
use memlayer_train::{PRESETS, TrainConfig, TrainOptions, train_and_report};
use std::path::PathBuf;

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

pub fn run(args: TrainArgs) -> Result<()> {
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
