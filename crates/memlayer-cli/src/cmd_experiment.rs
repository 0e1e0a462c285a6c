//! `memlayer experiment`: the memory-vs-dense grid at equal compute.

use crate::args::{Backend, OpsChoice};
use crate::open::device_for;
use anyhow::{Context, Result};
use clap::Args;
use memlayer_train::TrainOptions;
use memlayer_train::experiment::diagnose::{VariantRouting, routing_agreement};
use memlayer_train::experiment::grid::{Grid, VariantKind};
use memlayer_train::experiment::report::{summarize, write_report};
use memlayer_train::experiment::run_grid;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct ExperimentArgs {
    /// The smoke-test grid (same variants, a few steps on the tiny world; ≤ 8 min).
    #[arg(long)]
    quick: bool,
    /// Output directory: `report.md`, `report.json`, plots, and one model directory
    /// per run under `runs/` (a rerun reuses finished runs and resumes interrupted ones).
    #[arg(long)]
    out: PathBuf,
    /// Backend.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: Backend,
    /// Memory-op implementation.
    #[arg(long, value_enum, default_value = "auto")]
    ops: OpsChoice,
}

/// `git describe --always --dirty` of the working directory, when it is a checkout.
fn commit() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty", "--abbrev=12"])
        .output()
        .ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !s.is_empty()).then_some(s)
}

pub fn run(args: ExperimentArgs) -> Result<()> {
    let grid = if args.quick {
        Grid::quick()
    } else {
        Grid::full()
    }
    .map_err(anyhow::Error::msg)?;
    let (device, ops) = device_for(args.backend, args.ops)?;
    let facts = grid.check().map_err(anyhow::Error::msg)?;
    eprintln!(
        "experiment `{}`: {} variants × {} seeds, {} steps each → {}",
        grid.name,
        grid.variants.len(),
        grid.seeds.len(),
        grid.base.steps,
        args.out.display()
    );
    for (v, r) in grid.variants.iter().zip(&facts.flops_ratio) {
        let p = v.model.param_counts();
        eprintln!(
            "  {:<9} {:>9} params, {:>8} active/token, {:.2}× base FLOPs/token",
            v.name,
            p.total(),
            p.active(),
            r
        );
    }
    let t0 = Instant::now();
    let opts = TrainOptions {
        resume: true,
        device,
        ops,
        stop_after: None,
        progress: true,
    };
    let runs = run_grid(&grid, &args.out, &opts, |i, n, r| {
        let e = &r.report.eval;
        let buckets: Vec<String> = e
            .buckets
            .iter()
            .map(|b| format!("{} {:.3}/{:.3}", b.name, b.recall, b.ranked_recall))
            .collect();
        eprintln!(
            "[{i}/{n}] {} seed {}{}: loss {:.3}, train {:.0} s, recall exact/choice by bucket: {}",
            r.variant,
            r.seed,
            if r.reused { " (reused)" } else { "" },
            r.report.final_loss,
            r.report.train_seconds,
            buckets.join(", ")
        );
    })
    .with_context(|| format!("experiment in {}", args.out.display()))?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let mut routing = Vec::new();
    for v in grid.variants.iter().filter(|v| v.kind == VariantKind::Hier) {
        routing.push(VariantRouting {
            variant: v.name.clone(),
            routing: v.model.hier.as_ref().map(|h| h.routing).unwrap_or_default(),
            buckets: routing_agreement(&grid.run_config(v, grid.seeds[0]))?,
        });
    }
    let report = summarize(
        &grid,
        &runs,
        command,
        commit(),
        t0.elapsed().as_secs_f64(),
        routing,
    )?;
    write_report(&args.out, &report, &runs)?;
    println!(
        "{:<82} {:>16} {:>8} {:>8} {:>4}",
        "target", "metric", "memory", "needed", "met"
    );
    for t in &report.targets {
        println!(
            "{:<82} {:>16} {:>8.3} {:>8.3} {:>4}",
            t.claim.chars().take(82).collect::<String>(),
            t.metric,
            t.value,
            t.threshold,
            if t.met { "yes" } else { "no" }
        );
    }
    println!(
        "report: {} ({:.1} min)",
        args.out.join("report.md").display(),
        report.wall_seconds / 60.0
    );
    Ok(())
}
