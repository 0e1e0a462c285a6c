//! `memlayer demo`: the main job. A small memory model answers held-out
//! fact questions with its memory paged from the bank under a budget of 25 %
//! of the bank, next to the same model with its memory fully resident.

use crate::args::{Backend, MemoryArgs, parse_percent, parse_source};
use crate::open::{open_paged, require_memory_layers, runtime_device};
use crate::source::Source;
use anyhow::{Context, Result, bail};
use clap::Args;
use memlayer_core::rng::Rng;
use memlayer_runtime::{Budget, BurnDecoder, Generator, MemoryStats, Sampling};
use memlayer_train::data::facts::{FactQuery, read_eval_jsonl};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The model the demo ships with (trained by the command in its README).
const SHIPPED: &str = "models/demo-pkm";
/// Where the fallback model is trained when the shipped one is missing.
const FALLBACK: &str = "target/memlayer-demo/tiny-pkm";

#[derive(Args)]
pub struct DemoArgs {
    /// Model directory (default: the shipped demo model; if it is missing,
    /// `tiny-pkm` is trained into target/memlayer-demo first, ~2 min).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Questions per frequency bucket.
    #[arg(long, default_value_t = 12)]
    pub per_bucket: usize,
    /// Budget of the paged run, percent of the bank.
    #[arg(long, default_value_t = 25.0, value_parser = parse_percent)]
    pub budget_percent: f64,
    /// Where the model runs and the page slots live.
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: Backend,
    /// The bank: `file` or an http(s):// URL (e.g. from `memlayer serve`).
    #[arg(long, default_value = "file", value_parser = parse_source)]
    pub source: Source,
    /// Reserve and use block prefetch (models with a hierarchical memory).
    #[arg(long)]
    pub prefetch: bool,
    /// Seed of the question sample.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

fn model_dir(args: &DemoArgs) -> Result<PathBuf> {
    if let Some(m) = &args.model {
        if !m.join("config.json").is_file() {
            bail!("{} is not a model directory (no config.json)", m.display());
        }
        return Ok(m.clone());
    }
    let shipped = PathBuf::from(SHIPPED);
    if shipped.join("config.json").is_file() {
        return Ok(shipped);
    }
    let fallback = PathBuf::from(FALLBACK);
    if fallback.join("config.json").is_file() && fallback.join("memory.bank").is_file() {
        return Ok(fallback);
    }
    eprintln!("{SHIPPED} is missing: training tiny-pkm into {FALLBACK} first");
    let cfg = memlayer_train::TrainConfig::preset("tiny-pkm").context("preset tiny-pkm")?;
    let device = burn::tensor::Device::flex();
    let opts = memlayer_train::TrainOptions {
        resume: false,
        ops: memlayer_model::MemoryOps::best_for(&device),
        device,
        stop_after: None,
        progress: true,
    };
    memlayer_train::train_and_report(&cfg, &fallback, &opts).context("training tiny-pkm")?;
    Ok(fallback)
}

/// A deterministic sample of `per_bucket` questions of every bucket.
fn sample(queries: Vec<FactQuery>, per_bucket: usize, seed: u64) -> Vec<FactQuery> {
    let buckets = queries.iter().map(|q| q.bucket).max().map_or(0, |b| b + 1);
    let mut out = Vec::new();
    for b in 0..buckets {
        let mut qs: Vec<FactQuery> = queries.iter().filter(|q| q.bucket == b).cloned().collect();
        Rng::new(seed ^ (b as u64 + 1)).shuffle(&mut qs);
        qs.truncate(per_bucket);
        out.extend(qs);
    }
    out
}

/// Whether `text` (the generated continuation) starts with the answer as a whole word.
fn answered(text: &str, answer: &str) -> bool {
    let t = text.trim_start();
    t.strip_prefix(answer)
        .is_some_and(|rest| !rest.starts_with(|c: char| c.is_alphanumeric()))
}

struct Run {
    answers: Vec<String>,
    correct: Vec<bool>,
    tokens: usize,
    decode_seconds: f64,
    seconds: f64,
}

/// Answers every question greedily; `first_token(i)` runs when question
/// `i` produced its first token (its prefill is done), `after(i)` after it.
fn answer_all(
    g: &mut Generator<BurnDecoder>,
    qs: &[FactQuery],
    mut first_token: impl FnMut(usize),
    mut after: impl FnMut(usize),
) -> Result<Run> {
    let t0 = Instant::now();
    let mut run = Run {
        answers: Vec::new(),
        correct: Vec::new(),
        tokens: 0,
        decode_seconds: 0.0,
        seconds: 0.0,
    };
    for (i, q) in qs.iter().enumerate() {
        let mut fired = false;
        let sampling = Sampling {
            max_tokens: 8,
            ..Sampling::default()
        };
        let out = g
            .generate(&q.prompt, &sampling, Some("."), |_, _| {
                if !fired {
                    fired = true;
                    first_token(i);
                }
            })
            .with_context(|| format!("question {i}: {:?}", q.prompt))?;
        run.tokens += out.tokens.len();
        run.decode_seconds += out.seconds;
        run.correct.push(answered(&out.text, &q.answer));
        run.answers
            .push(out.text.trim().trim_end_matches('.').to_string());
        after(i);
    }
    run.seconds = t0.elapsed().as_secs_f64();
    Ok(run)
}

fn recall_by_bucket(qs: &[FactQuery], correct: &[bool]) -> Vec<(String, usize, f64)> {
    let buckets = qs.iter().map(|q| q.bucket).max().map_or(0, |b| b + 1);
    (0..buckets)
        .map(|b| {
            let idx: Vec<usize> = (0..qs.len()).filter(|&i| qs[i].bucket == b).collect();
            let lo = idx.iter().map(|&i| qs[i].mentions).min().unwrap_or(0);
            let hi = idx.iter().map(|&i| qs[i].mentions).max().unwrap_or(0);
            let hits = idx.iter().filter(|&&i| correct[i]).count();
            (
                format!("{lo}-{hi} mentions"),
                idx.len(),
                hits as f64 / idx.len().max(1) as f64,
            )
        })
        .collect()
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

pub fn run(args: DemoArgs) -> Result<()> {
    let dir = model_dir(&args)?;
    require_memory_layers(&dir, "demo")?;
    let queries = read_eval_jsonl(&dir.join("eval.jsonl"))
        .with_context(|| format!("reading {}", dir.join("eval.jsonl").display()))?;
    let qs = sample(queries, args.per_bucket, args.seed);
    if qs.is_empty() {
        bail!("{} has no evaluation questions", dir.display());
    }
    println!(
        "memlayer demo: {} held-out fact questions to {} ({} backend)",
        qs.len(),
        dir.display(),
        format!("{:?}", args.backend).to_lowercase()
    );

    // fully resident: the whole bank read into the model at load
    let (device, ops, _) = runtime_device(args.backend)?;
    let t0 = Instant::now();
    let mut resident = memlayer_runtime::open_resident(&dir, &device, ops)
        .with_context(|| format!("loading {}", dir.display()))?;
    let resident_load = t0.elapsed().as_secs_f64();
    let full = answer_all(&mut resident, &qs, |_| {}, |_| {})?;
    drop(resident);

    // paged under the budget
    let budget = Budget::percent(args.budget_percent)?;
    let mem_args = MemoryArgs::new(args.source.clone(), budget, args.backend);
    let t0 = Instant::now();
    let mut o = open_paged(&dir, &mem_args, args.prefetch, "demo")?;
    let paged_load = t0.elapsed().as_secs_f64();
    let mut max_resident = 0u64;
    // with --prefetch, the next question's blocks are fetched while this one
    // decodes (after its prefill made its own blocks resident)
    let routes: Vec<Option<Vec<usize>>> = qs
        .iter()
        .map(|q| o.generator.route(&q.prompt))
        .collect::<Result<_, _>>()?;
    let paged = answer_all(
        &mut o.generator,
        &qs,
        |i| {
            if args.prefetch
                && let Some(Some(next)) = routes.get(i + 1)
            {
                let _ = o.memory.prefetch_blocks(next);
            }
        },
        |_| max_resident = max_resident.max(o.memory.resident_bytes()),
    )?;
    o.memory.wait_prefetch();
    let st: MemoryStats = o.memory.stats();

    println!();
    println!(
        "{:<58} {:<20} {:<20}",
        "question → expected answer",
        "resident",
        format!("paged ({}%)", args.budget_percent)
    );
    // a few right and a few wrong answers of the resident run
    let right = (0..qs.len()).filter(|&i| full.correct[i]).take(4);
    let wrong = (0..qs.len()).filter(|&i| !full.correct[i]).take(4);
    for i in right.chain(wrong) {
        let mark = |ok: bool| if ok { "✓" } else { "✗" };
        let q = &qs[i];
        println!(
            "{:<58} {:<20} {:<20}",
            format!("{} → {}", truncate(&q.prompt, 40), truncate(&q.answer, 14)),
            format!(
                "{} {}",
                mark(full.correct[i]),
                truncate(&full.answers[i], 17)
            ),
            format!(
                "{} {}",
                mark(paged.correct[i]),
                truncate(&paged.answers[i], 17)
            ),
        );
    }
    let same = full
        .answers
        .iter()
        .zip(&paged.answers)
        .filter(|(a, b)| a == b)
        .count();
    let recall = |c: &[bool]| c.iter().filter(|&&x| x).count() as f64 / c.len() as f64;
    let tok_s = |r: &Run| r.tokens as f64 / r.decode_seconds.max(1e-9);
    println!();
    println!("{:<34} {:>14} {:>14}", "", "resident", "paged");
    println!(
        "{:<34} {:>14.2} {:>14.2}",
        "memory budget (MiB)",
        mib(o.bank_bytes),
        mib(o.memory.budget_bytes())
    );
    println!(
        "{:<34} {:>14.2} {:>14.2}",
        "memory resident at most (MiB)",
        mib(o.bank_bytes),
        mib(max_resident)
    );
    println!(
        "{:<34} {:>14.3} {:>14.3}",
        "recall (exact answer)",
        recall(&full.correct),
        recall(&paged.correct)
    );
    for ((name, n, r_full), (_, _, r_paged)) in recall_by_bucket(&qs, &full.correct)
        .into_iter()
        .zip(recall_by_bucket(&qs, &paged.correct))
    {
        println!(
            "{:<34} {:>14.3} {:>14.3}",
            format!("  {name} ({n} q)"),
            r_full,
            r_paged
        );
    }
    println!(
        "{:<34} {:>14.1} {:>14.1}",
        "answer tokens/s (incl. prefill)",
        tok_s(&full),
        tok_s(&paged)
    );
    println!(
        "{:<34} {:>14.2} {:>14.2}",
        "load time (s)", resident_load, paged_load
    );
    println!(
        "{:<34} {:>14} {:>14.1}",
        "hit rate (%)",
        "100",
        100.0 * st.hit_rate()
    );
    println!(
        "{:<34} {:>14.2} {:>14.2}",
        "bytes streamed (MiB)",
        mib(o.bank_bytes),
        mib(st.bytes_streamed)
    );
    println!(
        "{:<34} {:>14} {:>14}",
        "pages streamed / evicted",
        format!("{}", o.memory.value_pages()),
        format!("{} / {}", st.pages_streamed, st.evictions)
    );
    println!(
        "answers identical in both runs: {same}/{}{}",
        qs.len(),
        if same == qs.len() { "" } else { "  (MISMATCH)" }
    );
    if let Some(path) = &args.json {
        let doc = json!({
            "model": dir,
            "backend": format!("{:?}", args.backend).to_lowercase(),
            "questions": qs.len(),
            "budget_percent": args.budget_percent,
            "bank_bytes": o.bank_bytes,
            "budget_bytes": o.memory.budget_bytes(),
            "max_resident_bytes": max_resident,
            "resident": { "recall": recall(&full.correct), "tokens_per_second": tok_s(&full), "seconds": full.seconds },
            "paged": { "recall": recall(&paged.correct), "tokens_per_second": tok_s(&paged), "seconds": paged.seconds,
                       "stats": st },
            "identical_answers": same,
        });
        write_json(path, &doc)?;
    }
    if same != qs.len() {
        bail!(
            "paged answers differ from the resident run: {same}/{} identical",
            qs.len()
        );
    }
    Ok(())
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let t: String = s.chars().take(n - 1).collect();
        format!("{t}…")
    }
}

fn write_json(path: &Path, doc: &serde_json::Value) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(doc)?)
        .with_context(|| format!("writing {}", path.display()))
}
