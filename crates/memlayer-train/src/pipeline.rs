//! Train → export → evaluate → report, as `memlayer train` runs it, and
//! `memlayer eval DIR` on an exported model.

use crate::config::TrainConfig;
use crate::data::facts::{FactsDataset, read_eval_jsonl};
use crate::data::packing::PackedSequences;
use crate::data::write_atomic;
use crate::eval::{EvalReport, evaluate, sample_queries};
use crate::model_dir::{ExportParts, export, load};
use crate::plot::{Series, line_chart};
use crate::trainer::{StepRecord, TrainError, TrainOptions, train};
use memlayer_bank::Dtype;
use memlayer_core::model::ParamCounts;
use memlayer_model::{MemoryOps, Model};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// `report.json` of a trained model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// Run name.
    pub name: String,
    /// Parameter counts.
    pub params: ParamCounts,
    /// Forward FLOPs per token at the training context length.
    pub flops_per_token: f64,
    /// Steps in the run.
    pub steps: u64,
    /// Tokens per step.
    pub tokens_per_step: u64,
    /// Loss of the first and last 10 steps (mean).
    pub first_loss: f32,
    /// Mean loss of the last 10 steps.
    pub final_loss: f32,
    /// Training seconds of the whole run: the step times summed over every
    /// step, including steps before a resume.
    pub train_seconds: f64,
    /// Training tokens per second (steps of this process).
    pub tokens_per_second: f64,
    /// Mean seconds per step (steps of this process).
    pub seconds_per_step: f64,
    /// Evaluation.
    pub eval: EvalReport,
}

fn mean_loss(h: &[StepRecord]) -> f32 {
    h.iter().map(|r| r.loss).sum::<f32>() / h.len().max(1) as f32
}

/// Writes `loss.png` of `history` into `dir`.
pub fn plot_loss(dir: &Path, name: &str, history: &[StepRecord]) -> Result<(), TrainError> {
    let series = Series {
        name: name.to_string(),
        points: history
            .iter()
            .map(|r| (r.step as f64, r.loss as f64))
            .collect(),
    };
    line_chart(
        &dir.join("loss.png"),
        &format!("training loss — {name}"),
        "step",
        "loss (nats/token)",
        &[series],
        false,
    )
    .map_err(|e| TrainError::Other(format!("{}: {e}", dir.join("loss.png").display())))
}

/// Trains `cfg` into `dir`, exports the model there, evaluates it and writes
/// `report.json`, `eval.jsonl`, `loss.png`.
pub fn train_and_report(
    cfg: &TrainConfig,
    dir: &Path,
    opts: &TrainOptions,
) -> Result<RunReport, TrainError> {
    let out = train(cfg, dir, opts)?;
    let p = &out.prepared;
    export(
        &cfg.model,
        &out.store,
        dir,
        &ExportParts {
            tokenizer: &p.tokenizer,
            routing: p.routing.as_ref(),
            bank_dtype: Dtype::F32,
            value_page_rows: None,
        },
    )?;
    let queries = p
        .facts
        .as_ref()
        .map(|f| sample_queries(f, cfg.eval_per_bucket, cfg.data_seed()))
        .unwrap_or_default();
    if let Some(f) = &p.facts {
        f.write_eval_jsonl(&dir.join("eval.jsonl"))?;
        write_atomic(
            &dir.join("facts.json"),
            serde_json::to_string_pretty(&f.config)
                .map_err(|e| TrainError::Other(e.to_string()))?
                .as_bytes(),
        )?;
    }
    let model = Model::new(&cfg.model, &out.store, &opts.device, opts.ops, false)?;
    let eval = evaluate(
        &model,
        &p.tokenizer,
        p.routing.as_ref(),
        p.facts.as_ref(),
        &queries,
        &p.heldout,
    )?;
    plot_loss(dir, &cfg.name, &out.history)?;
    let h = &out.history;
    let steps_here = out.steps_this_run.max(1);
    let report = RunReport {
        name: cfg.name.clone(),
        params: cfg.model.param_counts(),
        flops_per_token: cfg.model.flops_per_token(cfg.seq_len),
        steps: cfg.steps,
        tokens_per_step: (cfg.batch_size * cfg.seq_len) as u64,
        first_loss: mean_loss(&h[..h.len().min(10)]),
        final_loss: mean_loss(&h[h.len().saturating_sub(10)..]),
        train_seconds: h.iter().map(|r| r.seconds).sum(),
        tokens_per_second: (out.steps_this_run * (cfg.batch_size * cfg.seq_len) as u64) as f64
            / out.seconds_this_run.max(1e-9),
        seconds_per_step: out.seconds_this_run / steps_here as f64,
        eval,
    };
    write_atomic(
        &dir.join("report.json"),
        serde_json::to_string_pretty(&report)
            .map_err(|e| TrainError::Other(e.to_string()))?
            .as_bytes(),
    )?;
    Ok(report)
}

/// Evaluates an exported model directory: recall by bucket on its
/// `eval.jsonl` (the facts world is regenerated from `facts.json` for the
/// buckets and baselines) and perplexity on the held-out split of its
/// training config.
pub fn eval_dir(
    dir: &Path,
    device: &burn::tensor::Device,
    ops: MemoryOps,
) -> Result<EvalReport, TrainError> {
    let m = load(dir)?;
    let train_cfg: TrainConfig = {
        let p = dir.join("train.json");
        let t = std::fs::read_to_string(&p).map_err(|e| TrainError::Io {
            path: p.clone(),
            message: e.to_string(),
        })?;
        serde_json::from_str(&t).map_err(|e| TrainError::Io {
            path: p,
            message: e.to_string(),
        })?
    };
    let prepared = crate::prepare::prepare(&train_cfg)?;
    let facts: Option<FactsDataset> = prepared.facts;
    let queries = match &facts {
        Some(f) => {
            let on_disk = read_eval_jsonl(&dir.join("eval.jsonl"))?;
            if on_disk != f.eval {
                return Err(TrainError::Io {
                    path: dir.join("eval.jsonl"),
                    message: "does not match the facts world of train.json".into(),
                });
            }
            sample_queries(f, train_cfg.eval_per_bucket, train_cfg.data_seed())
        }
        None => Vec::new(),
    };
    let model = Model::new(&m.config, &m.store, device, ops, false)?;
    let heldout: &PackedSequences = &prepared.heldout;
    evaluate(
        &model,
        &m.tokenizer,
        m.routing.as_ref(),
        facts.as_ref(),
        &queries,
        heldout,
    )
}
