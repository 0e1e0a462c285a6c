//! The training loop: batches as a pure function of (seed, step), forward
//! and backward with burn, AdamW on the host store, atomic checkpoints, and
//! `--resume` that continues bit for bit.

use crate::checkpoint;
use crate::config::TrainConfig;
use crate::data::DataError;
use crate::data::packing::PackedSequences;
use crate::optim::{AdamW, StepGrads, StepStats};
use crate::prepare::{Prepared, prepare};
use burn::tensor::Device;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use memlayer_core::model::{ModelConfig, ParamGroup, ParamStore};
use memlayer_core::rng::Rng;
use memlayer_model::{MemoryOps, MemoryReads, Model};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Errors of a training run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Data preparation.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The model.
    #[error(transparent)]
    Model(#[from] memlayer_model::ModelError),
    /// Checkpoint.
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    /// Optimiser.
    #[error(transparent)]
    Optim(#[from] crate::optim::OptimError),
    /// Oracle / parameters.
    #[error(transparent)]
    Oracle(#[from] memlayer_core::error::OracleError),
    /// Files of the run directory.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// Anything else, with its reason.
    #[error("{0}")]
    Other(String),
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Step (1-based: steps taken after this one).
    pub step: u64,
    /// Training loss of the step's batch.
    pub loss: f32,
    /// Tokens seen so far.
    pub tokens: u64,
    /// Norms and learning rate.
    pub stats: StepStats,
    /// Wall time of the step in seconds (forward, backward, update).
    pub seconds: f64,
}

/// Options of [`train`] beyond the config.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// Continue from the checkpoint in the run directory.
    pub resume: bool,
    /// Device to train on (an autodiff device is made from it).
    pub device: Device,
    /// Memory-ops implementation.
    pub ops: MemoryOps,
    /// Stop after this many steps in total (for tests and experiments; the
    /// schedule still follows `config.steps`).
    pub stop_after: Option<u64>,
    /// Draw a progress bar.
    pub progress: bool,
}

/// Result of [`train`].
#[derive(Clone, Debug)]
pub struct TrainOutcome {
    /// Final parameters.
    pub store: ParamStore,
    /// Loss per step of the whole run (including steps before a resume).
    pub history: Vec<StepRecord>,
    /// Prepared data (tokenizer, routing, eval set).
    pub prepared: PreparedHandle,
    /// Steps taken in this process.
    pub steps_this_run: u64,
    /// Training seconds in this process.
    pub seconds_this_run: f64,
}

/// Shared prepared data (cheap to clone).
pub type PreparedHandle = std::sync::Arc<Prepared>;

/// The tokens (batch, seq_len + 1) and block rows (batch, levels) of the
/// sequences `ids`; for each sequence and level the generic block replaces
/// the path's block with probability `1/(b+1)` (drawn from `(seed, step)`).
pub fn batch_inputs(
    cfg: &ModelConfig,
    data: &PackedSequences,
    ids: &[usize],
    seed: u64,
    step: u64,
) -> (Vec<u32>, Option<Vec<usize>>) {
    let mut tokens = Vec::with_capacity(ids.len() * (data.seq_len + 1));
    for &i in ids {
        tokens.extend_from_slice(data.sequence(i));
    }
    let rows = cfg.hier.as_ref().map(|h| {
        let mut rng = Rng::new(seed ^ 0x6765_6e65 ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut rows = Vec::with_capacity(ids.len() * h.levels);
        for &i in ids {
            let path = data.path(i);
            for l in 1..=h.levels {
                let generic = h
                    .generic_row(l)
                    .filter(|_| rng.below(h.branching as u64 + 1) == 0);
                rows.push(generic.unwrap_or(path[l - 1] as usize));
            }
        }
        rows
    });
    (tokens, rows)
}

/// The distinct values of `ids`, ascending: marked in a table of `n_rows`
/// flags (one pass, no sort of the tens of thousands of reads of a step); ids
/// outside `0..n_rows` are kept too (the optimiser rejects them).
fn sorted_unique(ids: impl Iterator<Item = u32> + Clone, n_rows: usize) -> Vec<u32> {
    let mut seen = vec![false; n_rows];
    let mut outside = false;
    for r in ids.clone() {
        match seen.get_mut(r as usize) {
            Some(s) => *s = true,
            None => outside = true,
        }
    }
    if outside {
        let mut rows: Vec<u32> = ids.collect();
        rows.sort_unstable();
        rows.dedup();
        return rows;
    }
    (0..n_rows as u32).filter(|&r| seen[r as usize]).collect()
}

/// Rows touched per parameter (sparse groups) from what the forward read.
fn touched(store: &ParamStore, reads: &MemoryReads) -> Vec<Option<Vec<u32>>> {
    store
        .params()
        .iter()
        .map(|p| match p.group {
            ParamGroup::MemoryValues => Some(sorted_unique(
                reads.value_rows.iter().flatten().copied(),
                p.shape.first().copied().unwrap_or(0),
            )),
            ParamGroup::MemoryBlocks => {
                let level: usize = p
                    .name
                    .strip_prefix("hier.level")
                    .and_then(|s| s.split('.').next())
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let mut rows: Vec<u32> = reads
                    .block_rows
                    .get(level.wrapping_sub(1))
                    .map(|r| r.iter().map(|&x| x as u32).collect())
                    .unwrap_or_default();
                rows.sort_unstable();
                rows.dedup();
                Some(rows)
            }
            _ => None,
        })
        .collect()
}

/// One optimiser step on `store`; returns the loss and stats.
pub fn train_step(
    cfg: &TrainConfig,
    store: &mut ParamStore,
    optim: &mut AdamW,
    data: &PackedSequences,
    step: u64,
    device: &Device,
    ops: MemoryOps,
) -> Result<(f32, StepStats), TrainError> {
    let ids = data.batch_at(cfg.seed, step, cfg.batch_size)?;
    let (tokens, rows) = batch_inputs(&cfg.model, data, &ids, cfg.seed, step);
    let model = Model::new(&cfg.model, store, device, ops, true)?;
    let (loss, reads) = model.loss(&tokens, ids.len(), rows.as_deref())?;
    let loss_value: f32 = loss
        .clone()
        .into_data()
        .iter::<f32>()
        .next()
        .unwrap_or(f32::NAN);
    if !loss_value.is_finite() {
        return Err(TrainError::Other(format!(
            "loss is {loss_value} at step {step}; lower the learning rate"
        )));
    }
    let mut grads = loss.backward();
    let g = StepGrads {
        grads: model.take_grads(&mut grads),
        touched: touched(store, &reads),
    };
    let lr = cfg.optim.lr_at(step, cfg.steps);
    let stats = optim.step(store, &g, lr)?;
    Ok((loss_value, stats))
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Reads `metrics.jsonl`, keeping the records up to `step`.
pub(crate) fn read_history(path: &Path, step: u64) -> Result<Vec<StepRecord>, TrainError> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        // A line cut by a kill is the only acceptable parse failure (the last one).
        match serde_json::from_str::<StepRecord>(line) {
            Ok(r) if r.step <= step => out.push(r),
            Ok(_) => {}
            Err(e) if n + 1 == text.lines().count() => {
                let _ = e;
            }
            Err(e) => return Err(io_err(path, format!("line {}: {e}", n + 1))),
        }
    }
    Ok(out)
}

fn write_history(path: &Path, history: &[StepRecord]) -> Result<(), TrainError> {
    let mut s = String::new();
    for r in history {
        s.push_str(&serde_json::to_string(r).map_err(|e| io_err(path, e))?);
        s.push('\n');
    }
    crate::data::write_atomic(path, s.as_bytes()).map_err(|e| io_err(path, e))
}

/// Trains `cfg` in `dir` (created if missing): writes `train.json`,
/// `tokenizer.json`, `metrics.jsonl` and `checkpoint.safetensors`.
pub fn train(
    cfg: &TrainConfig,
    dir: &Path,
    opts: &TrainOptions,
) -> Result<TrainOutcome, TrainError> {
    cfg.validate().map_err(TrainError::Other)?;
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let prepared = std::sync::Arc::new(prepare(cfg)?);
    let config_json = cfg.to_json();
    let tok_path = dir.join("tokenizer.json");
    let tok_json = prepared.tokenizer.to_json()?;
    let metrics_path = dir.join("metrics.jsonl");
    let template = ParamStore::init(&cfg.model, cfg.seed)?;
    let (mut store, mut optim, mut history) = if opts.resume && checkpoint::exists(dir) {
        let saved = std::fs::read_to_string(&tok_path).map_err(|e| io_err(&tok_path, e))?;
        if saved != tok_json {
            return Err(io_err(
                &tok_path,
                "differs from the tokenizer this config trains; refusing to resume",
            ));
        }
        let c = checkpoint::load(dir, &template, &config_json)?;
        let h = read_history(&metrics_path, c.optim.step)?;
        (c.store, c.optim, h)
    } else {
        if !opts.resume && checkpoint::exists(dir) {
            return Err(io_err(
                &dir.join(checkpoint::CHECKPOINT_FILE),
                "a run is already here: pass --resume to continue it, or choose another --out",
            ));
        }
        crate::data::write_atomic(&dir.join("train.json"), config_json.as_bytes())?;
        crate::data::write_atomic(&tok_path, tok_json.as_bytes())?;
        let optim = AdamW::new(cfg.optim.clone(), &template);
        (template, optim, Vec::new())
    };
    let device = opts.device.clone().autodiff();
    let start = optim.step;
    let end = opts.stop_after.unwrap_or(cfg.steps).min(cfg.steps);
    let tokens_per_step = (cfg.batch_size * cfg.seq_len) as u64;
    let pb = if opts.progress {
        ProgressBar::with_draw_target(Some(end), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} steps  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_prefix(cfg.name.clone());
    pb.set_position(start);
    let run_start = Instant::now();
    let mut window = (Instant::now(), 0u64);
    for step in start..end {
        let t0 = Instant::now();
        let (loss, stats) = train_step(
            cfg,
            &mut store,
            &mut optim,
            &prepared.train,
            step,
            &device,
            opts.ops,
        )?;
        let seconds = t0.elapsed().as_secs_f64();
        history.push(StepRecord {
            step: step + 1,
            loss,
            tokens: (step + 1) * tokens_per_step,
            stats,
            seconds,
        });
        window.1 += tokens_per_step;
        let tps = window.1 as f64 / window.0.elapsed().as_secs_f64().max(1e-9);
        pb.set_message(format!(
            "loss {loss:.3}  lr {:.2e}  {:.0} tok/s",
            stats.lr, tps
        ));
        pb.inc(1);
        if pb.is_hidden() && opts.progress && (step + 1) % 50 == 0 {
            eprintln!(
                "{} step {}/{end}: loss {loss:.3}, {tps:.0} tok/s",
                cfg.name,
                step + 1
            );
        }
        if (step + 1) % 25 == 0 {
            window = (Instant::now(), 0);
        }
        if (step + 1) % cfg.checkpoint_every == 0 || step + 1 == end {
            // metrics first: a kill between the two leaves extra lines, which
            // the resume drops (it keeps records up to the checkpoint's step)
            write_history(&metrics_path, &history)?;
            checkpoint::save(dir, &store, &optim, &config_json)?;
        }
    }
    pb.finish_and_clear();
    let _ = std::io::stderr().flush();
    Ok(TrainOutcome {
        store,
        history,
        prepared,
        steps_this_run: end.saturating_sub(start),
        seconds_this_run: run_start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::sorted_unique;

    #[test]
    fn sorted_unique_equals_sort_and_dedup() {
        let ids = [7u32, 3, 3, 0, 9, 7, 1];
        assert_eq!(sorted_unique(ids.iter().copied(), 10), vec![0, 1, 3, 7, 9]);
        assert!(sorted_unique(std::iter::empty(), 4).is_empty());
        // ids outside the table are kept, sorted, for the optimiser to reject
        assert_eq!(sorted_unique(ids.iter().copied(), 8), vec![0, 1, 3, 7, 9]);
    }
}
