//! `memlayer experiment`: trains and evaluates the memory-vs-dense grid
//! ([`grid`]) and writes its report ([`report`]).
//!
//! Each run lives in `OUT/runs/<variant>-s<seed>/` as a full model directory
//! (`train.json`, checkpoint, exported model, `report.json`). A finished run
//! whose `train.json` matches is reused, an interrupted one resumes from its
//! checkpoint, so a killed experiment continues where it stopped.

pub mod diagnose;
pub mod grid;
pub mod report;

use crate::pipeline::{RunReport, train_and_report};
use crate::trainer::{StepRecord, TrainError, TrainOptions};
use grid::{Grid, Variant};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// How one run of the grid was obtained.
#[derive(Clone, Debug, PartialEq)]
pub struct RunOutcome {
    /// Variant name.
    pub variant: String,
    /// Model seed.
    pub seed: u64,
    /// Its directory.
    pub dir: PathBuf,
    /// Its report.
    pub report: RunReport,
    /// Loss per step of the whole run.
    pub history: Vec<StepRecord>,
    /// Taken from a finished run directory instead of trained.
    pub reused: bool,
    /// Wall seconds spent on it in this process (training and evaluation).
    pub wall_seconds: f64,
}

/// The run directory of `variant` with `seed` under `out`.
pub fn run_dir(out: &Path, variant: &Variant, seed: u64) -> PathBuf {
    out.join("runs").join(Grid::run_dir_name(variant, seed))
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn finished_report(dir: &Path, config_json: &str) -> Result<Option<RunReport>, TrainError> {
    let (train, report) = (dir.join("train.json"), dir.join("report.json"));
    if !report.exists() {
        return Ok(None);
    }
    let saved = std::fs::read_to_string(&train).map_err(|e| io_err(&train, e))?;
    if saved != config_json {
        return Err(io_err(
            &train,
            "belongs to a different experiment config; choose another --out or remove the run",
        ));
    }
    let text = std::fs::read_to_string(&report).map_err(|e| io_err(&report, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| io_err(&report, e))
}

/// Trains (or reuses) every run of `grid` under `out`, calling `on_run`
/// after each, and returns the runs in grid order (variants × seeds).
pub fn run_grid(
    grid: &Grid,
    out: &Path,
    opts: &TrainOptions,
    mut on_run: impl FnMut(usize, usize, &RunOutcome),
) -> Result<Vec<RunOutcome>, TrainError> {
    grid.check().map_err(TrainError::Other)?;
    std::fs::create_dir_all(out.join("runs")).map_err(|e| io_err(out, e))?;
    crate::data::write_atomic(
        &out.join("grid.json"),
        serde_json::to_string_pretty(grid)
            .map_err(|e| TrainError::Other(e.to_string()))?
            .as_bytes(),
    )?;
    let total = grid.variants.len() * grid.seeds.len();
    let mut outcomes = Vec::with_capacity(total);
    for v in &grid.variants {
        for &seed in &grid.seeds {
            let cfg = grid.run_config(v, seed);
            let dir = run_dir(out, v, seed);
            let t0 = Instant::now();
            let (report, reused) = match finished_report(&dir, &cfg.to_json())? {
                Some(r) => (r, true),
                None => {
                    let opts = TrainOptions {
                        resume: true,
                        ..opts.clone()
                    };
                    (train_and_report(&cfg, &dir, &opts)?, false)
                }
            };
            let history = crate::trainer::read_history(&dir.join("metrics.jsonl"), u64::MAX)?;
            let outcome = RunOutcome {
                variant: v.name.clone(),
                seed,
                dir,
                report,
                history,
                reused,
                wall_seconds: t0.elapsed().as_secs_f64(),
            };
            on_run(outcomes.len() + 1, total, &outcome);
            outcomes.push(outcome);
        }
    }
    Ok(outcomes)
}
