//! `memlayer bench paged`: decode speed and bytes streamed with the memory
//! paged under budgets (percent of the bank) against the fully resident
//! model, with and without block prefetch, in one run. With `--rtt-ms` the
//! bank is served over HTTP on 127.0.0.1 by an in-process `memlayer serve`
//! that holds every reply for the given round trip, one pass per RTT: the
//! latency-shaped benchmark (JSON rows carry `rtt_ms`; `--plot` draws tok/s
//! against RTT).

use crate::args::{Backend, MemoryArgs, parse_percent, parse_source};
use crate::open::{open_paged, require_memory_layers, runtime_device};
use crate::source::Source;
use anyhow::{Context, Result, bail};
use clap::Args;
use memlayer_runtime::{Budget, BurnDecoder, Generation, Generator, Sampling};
use memlayer_train::data::facts::read_eval_jsonl;
use serde_json::json;
use std::path::PathBuf;

#[derive(Args)]
pub struct PagedBenchArgs {
    /// Model directory (default: the shipped demo model).
    #[arg(long, default_value = "models/demo-pkm")]
    pub model: PathBuf,
    /// Held-out questions answered per configuration (after an untimed pass over the same ones).
    #[arg(long, default_value_t = 24)]
    pub questions: usize,
    /// Tokens generated per question (no early stop).
    #[arg(long, default_value_t = 16)]
    pub max_tokens: usize,
    /// Budgets in percent of the bank.
    #[arg(long, value_delimiter = ',', default_value = "100,25", value_parser = parse_percent)]
    pub budgets: Vec<f64>,
    /// Where the model runs and the page slots live.
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: Backend,
    /// The bank: `file` or an http(s):// URL.
    #[arg(long, default_value = "file", value_parser = parse_source)]
    pub source: Source,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Round trips to run at, in ms (e.g. `0,20,80`): the model's bank is
    /// served on 127.0.0.1 by an in-process server that holds every reply
    /// this long (needs `--source file`).
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u64).range(0..=2000))]
    pub rtt_ms: Vec<u64>,
    /// With `--rtt-ms`: the server refuses multi-range requests (answers
    /// them with the whole file), as servers and CDNs without support do;
    /// the client then sends one request per page.
    #[arg(long)]
    pub single_range: bool,
    /// With `--rtt-ms`: draw decode tok/s against the round trip (PNG).
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

/// Totals of one pass over the questions.
#[derive(Default)]
struct Pass {
    prompt_tokens: usize,
    generated: usize,
    decode_tokens: usize,
    decode_seconds: f64,
    first_token_seconds: f64,
}

impl Pass {
    fn add(&mut self, g: &Generation) {
        self.prompt_tokens += g.prompt_tokens;
        self.generated += g.tokens.len();
        self.decode_tokens += g.tokens.len().saturating_sub(1);
        self.decode_seconds += g.seconds - g.first_token_seconds;
        self.first_token_seconds += g.first_token_seconds;
    }

    fn decode_tok_s(&self) -> f64 {
        self.decode_tokens as f64 / self.decode_seconds.max(1e-9)
    }
}

fn pass(
    g: &mut Generator<BurnDecoder>,
    prompts: &[String],
    max_tokens: usize,
    mut first_token: impl FnMut(usize),
) -> Result<Pass> {
    let mut p = Pass::default();
    let sampling = Sampling {
        max_tokens,
        ..Sampling::default()
    };
    for (i, prompt) in prompts.iter().enumerate() {
        let mut fired = false;
        let out = g
            .generate(prompt, &sampling, None, |_, _| {
                if !fired {
                    fired = true;
                    first_token(i);
                }
            })
            .with_context(|| format!("question {i}"))?;
        p.add(&out);
    }
    Ok(p)
}

/// One measured pass per budget (and with/without block prefetch for a
/// hierarchical memory) with the bank read from `source`; a row each.
fn paged_rows(
    args: &PagedBenchArgs,
    prompts: &[String],
    source: &Source,
    rtt: Option<u64>,
    hier: bool,
    rows: &mut Vec<serde_json::Value>,
) -> Result<()> {
    let dir = &args.model;
    let mut full_tok_s = None;
    for &budget in &args.budgets {
        for prefetch in if hier { vec![false, true] } else { vec![false] } {
            let mem_args = MemoryArgs::new(source.clone(), Budget::percent(budget)?, args.backend);
            let mut o = open_paged(dir, &mem_args, prefetch, "bench paged")?;
            let routes: Vec<Option<Vec<usize>>> = prompts
                .iter()
                .map(|p| o.generator.route(p))
                .collect::<Result<_, _>>()?;
            // the next question's blocks are fetched once this one's prefill
            // has made its own blocks resident, while it decodes
            let mut first_token = |i: usize| {
                if prefetch && let Some(Some(next)) = routes.get(i + 1) {
                    let _ = o.memory.prefetch_blocks(next);
                }
            };
            // untimed pass, then the measured one
            pass(&mut o.generator, prompts, args.max_tokens, &mut first_token)?;
            o.memory.reset_stats();
            let p = pass(&mut o.generator, prompts, args.max_tokens, &mut first_token)?;
            o.memory.wait_prefetch();
            let st = o.memory.stats();
            let tok_s = p.decode_tok_s();
            let full = *full_tok_s.get_or_insert(tok_s);
            let processed = (p.prompt_tokens + p.generated) as f64;
            let name = format!(
                "paged{}{}",
                if prefetch { " + prefetch" } else { "" },
                rtt.map(|r| format!(" @{r}ms")).unwrap_or_default()
            );
            println!(
                "{:<22} {:>9.0} {:>12.1} {:>8.2}x {:>9.1}% {:>12.2} {:>12.3} {:>9}",
                name,
                budget,
                tok_s,
                tok_s / full,
                100.0 * st.hit_rate(),
                st.bytes_streamed as f64 / 1024.0 / processed,
                p.first_token_seconds / prompts.len() as f64,
                st.evictions
            );
            rows.push(json!({
                "memory": name,
                "rtt_ms": rtt,
                "budget_percent": budget,
                "budget_bytes": o.memory.budget_bytes(),
                "bank_bytes": o.bank_bytes,
                "prefetch": prefetch,
                "decode_tokens_per_second": tok_s,
                "ratio_vs_first_budget": tok_s / full,
                "first_token_seconds": p.first_token_seconds / prompts.len() as f64,
                "bytes_streamed_per_token": st.bytes_streamed as f64 / processed,
                "tokens": processed,
                "stats": st,
            }));
        }
    }
    Ok(())
}

/// Decode tok/s against the round trip, one line per budget (and prefetch),
/// log y: the latency-shaped benchmark's plot.
fn plot_rtt(path: &std::path::Path, rows: &[serde_json::Value], single_range: bool) -> Result<()> {
    use memlayer_train::plot::{Series, line_chart};
    let mut series: Vec<Series> = Vec::new();
    for r in rows.iter().filter(|r| r["rtt_ms"].is_u64()) {
        let name = format!(
            "{} % {}",
            r["budget_percent"].as_f64().unwrap_or(0.0),
            if r["prefetch"].as_bool() == Some(true) {
                "+ prefetch"
            } else {
                ""
            }
        );
        let point = (
            r["rtt_ms"].as_f64().unwrap_or(0.0),
            r["decode_tokens_per_second"]
                .as_f64()
                .unwrap_or(0.0)
                .max(1e-3),
        );
        match series.iter_mut().find(|s| s.name == name) {
            Some(s) => s.points.push(point),
            None => series.push(Series {
                name,
                points: vec![point],
            }),
        }
    }
    let title = format!(
        "paged decode over HTTP on 127.0.0.1 ({})",
        if single_range {
            "one request per page"
        } else {
            "multi-range"
        }
    );
    line_chart(
        path,
        &title,
        "round trip (ms)",
        "decode tok/s",
        &series,
        true,
    )
    .with_context(|| format!("plotting {}", path.display()))
}

pub fn run(args: PagedBenchArgs) -> Result<()> {
    let dir = &args.model;
    let queries = read_eval_jsonl(&dir.join("eval.jsonl"))
        .with_context(|| format!("reading {}", dir.join("eval.jsonl").display()))?;
    // spread over the buckets: every k-th question
    let step = (queries.len() / args.questions.max(1)).max(1);
    let prompts: Vec<String> = queries
        .iter()
        .step_by(step)
        .take(args.questions)
        .map(|q| q.prompt.clone())
        .collect();
    if prompts.is_empty() {
        bail!("{} has no questions", dir.display());
    }
    require_memory_layers(dir, "bench paged")?;
    let backend = format!("{:?}", args.backend).to_lowercase();
    println!(
        "{:<22} {:>9} {:>12} {:>9} {:>10} {:>12} {:>12} {:>9}",
        "memory",
        "budget%",
        "decode tok/s",
        "vs 100%",
        "hit rate",
        "KiB/token",
        "1st token s",
        "evicted"
    );
    let mut rows = Vec::new();

    // fully resident reference
    let (device, ops, _) = runtime_device(args.backend)?;
    let mut resident = memlayer_runtime::open_resident(dir, &device, ops)?;
    pass(&mut resident, &prompts, args.max_tokens, |_| {})?;
    let r = pass(&mut resident, &prompts, args.max_tokens, |_| {})?;
    println!(
        "{:<22} {:>9} {:>12.1} {:>9} {:>10} {:>12} {:>12.3} {:>9}",
        "resident (all loaded)",
        "-",
        r.decode_tok_s(),
        "",
        "",
        "",
        r.first_token_seconds / prompts.len() as f64,
        ""
    );
    rows.push(
        json!({"memory": "resident", "decode_tokens_per_second": r.decode_tok_s(),
        "first_token_seconds": r.first_token_seconds / prompts.len() as f64}),
    );
    let hier = resident.config().hier.is_some();
    drop(resident);

    if args.rtt_ms.is_empty() {
        paged_rows(&args, &prompts, &args.source, None, hier, &mut rows)?;
    } else {
        if !matches!(args.source, Source::ModelDir) {
            bail!(
                "--rtt-ms serves the model's own bank on 127.0.0.1: leave --source at `file` (got {})",
                args.source
            );
        }
        for &rtt in &args.rtt_ms {
            let mut config =
                memlayer_http::ServeConfig::new(([127, 0, 0, 1], 0).into()).mount("/model/", dir);
            config.delay = std::time::Duration::from_millis(rtt);
            config.multi_range = !args.single_range;
            config.threads = 2;
            let server = memlayer_http::Server::start(config)
                .map_err(|e| anyhow::anyhow!("starting the bench's server: {e}"))?;
            let url: Source = format!("{}/model/memory.bank", server.url())
                .parse()
                .map_err(|e: String| anyhow::anyhow!(e))?;
            paged_rows(&args, &prompts, &url, Some(rtt), hier, &mut rows)?;
            server.shutdown();
        }
        if let Some(path) = &args.plot {
            plot_rtt(path, &rows, args.single_range)?;
        }
    }
    if let Some(path) = &args.json {
        let doc = json!({
            "bench": "paged",
            "model": dir,
            "backend": backend,
            "source": args.source.to_string(),
            "questions": prompts.len(),
            "max_tokens": args.max_tokens,
            "results": rows,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
