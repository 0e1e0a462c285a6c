//! `memlayer eval`: fact recall by frequency bucket and held-out
//! perplexity of a model directory.

use crate::args::{Backend, OpsChoice};
use crate::open::device_for;
use anyhow::{Context, Result};
use clap::Args;
use memlayer_train::eval::EvalReport;
use memlayer_train::eval_dir;
use std::path::PathBuf;

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

pub fn run(args: EvalArgs) -> Result<()> {
    let (device, ops) = device_for(args.backend, args.ops)?;
    let report = eval_dir(&args.dir, &device, ops)?;
    print_eval(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The evaluation table (also printed by `memlayer train`).
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
