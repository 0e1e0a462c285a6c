//! `memlayer layout`: writes a copy of a model directory whose product-key
//! value rows are laid out for locality (`memlayer_core::model::row_layout`):
//! co-access counts gathered on the model's training contexts order the
//! second-half sub-keys, and the value rows with them, so that rows one token
//! reads together tend to share a bank page. The copy is the same model (the
//! layout lives in the weights: bank rows and sub-keys move together), so
//! every reader, kernel and source serves it unchanged. Optionally changes
//! the bank's dtype and page size on the way, and reports pages and KiB per
//! token before and after on the training contexts and on held-out
//! questions.

use crate::cmd_bank::DtypeArg;
use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use memlayer_bank::format::SectionKind;
use memlayer_bank::{BankReader, Dtype, FileSource};
use memlayer_core::model::reference::forward_traced;
use memlayer_core::model::row_layout::{
    CoAccess, apply_second_half_order, distinct_pages, inverse_order, second_half_order,
};
use memlayer_core::model::{ModelConfig, ParamStore};
use memlayer_model_dir::dir::{ExportParts, LoadedModel, export, load, value_page_rows};
use memlayer_model_dir::manifest::BANK_FILE;
use memlayer_train::data::corpus::contexts_from_text;
use memlayer_train::data::facts::{FactsDataset, read_config, read_eval_jsonl};
use rayon::prelude::*;
use serde_json::json;
use std::path::{Path, PathBuf};

/// How the second-half sub-keys are ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RowOrder {
    /// Pages gather sub-keys read together (co-access counts).
    CoAccess,
    /// Keep the trained order (only the dtype / page size change): the baseline.
    Identity,
}

#[derive(Args)]
pub struct LayoutArgs {
    /// Model directory to read (with a product-key memory).
    #[arg(long)]
    pub model: PathBuf,
    /// Directory to write the laid-out model into (created; files replaced atomically).
    #[arg(long)]
    pub out: PathBuf,
    /// Bank element type of the copy (default: the model's bank's).
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
    /// Bytes per value page of the copy, a multiple of one row's bytes
    /// (default: the export's rule, 512-byte pages).
    #[arg(long)]
    pub page_bytes: Option<usize>,
    /// Text file whose paragraphs are the contexts the co-access counts are
    /// gathered on (default: the model's training corpus, regenerated from
    /// its facts.json).
    #[arg(long)]
    pub corpus: Option<PathBuf>,
    /// Contexts read at most (the first ones of the corpus).
    #[arg(long, default_value_t = 1000)]
    pub contexts: usize,
    /// Held-out questions (eval.jsonl, with their answers) the layout is measured on.
    #[arg(long, default_value_t = 1000)]
    pub questions: usize,
    /// How the sub-keys are ordered.
    #[arg(long, value_enum, default_value = "co-access")]
    pub order: RowOrder,
    /// Write the report (pages and KiB per token before and after) as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Files of a model directory that the export does not write but the demo,
/// `eval` and `bench paged` read; copied when present.
const COPIED_FILES: [&str; 3] = ["facts.json", "eval.jsonl", "train.json"];

/// Every token's read at every memory layer: row ids, `stride` (heads × knn) each.
struct Reads {
    stride: usize,
    rows: Vec<u32>,
}

impl Reads {
    fn tokens(&self) -> usize {
        self.rows.len() / self.stride.max(1)
    }

    /// Mean distinct pages per token-layer read, with the second-half
    /// sub-keys renumbered by `inv` (old → new).
    fn pages_per_read(&self, n_keys: u32, inv: &[u32], page_rows: usize) -> f64 {
        let mut total = 0usize;
        let mut relaid = Vec::with_capacity(self.stride);
        for read in self.rows.chunks_exact(self.stride) {
            relaid.clear();
            relaid.extend(
                read.iter()
                    .map(|&r| (r / n_keys) * n_keys + inv[(r % n_keys) as usize]),
            );
            total += distinct_pages(&relaid, page_rows);
        }
        total as f64 / self.tokens().max(1) as f64
    }

    /// The least mean pages per read any sub-key order could give: the
    /// distinct second-half sub-keys read under each first-half sub-key,
    /// `page_rows` to a page (a page holds rows of one first-half sub-key).
    fn pages_per_read_bound(&self, n_keys: u32, page_rows: usize) -> f64 {
        let mut total = 0usize;
        let mut pairs = Vec::with_capacity(self.stride);
        for read in self.rows.chunks_exact(self.stride) {
            pairs.clear();
            pairs.extend(read.iter().map(|&r| (r / n_keys, r % n_keys)));
            pairs.sort_unstable();
            pairs.dedup();
            total += pairs
                .chunk_by(|a, b| a.0 == b.0)
                .map(|g| g.len().div_ceil(page_rows.max(1)))
                .sum::<usize>();
        }
        total as f64 / self.tokens().max(1) as f64
    }
}

/// Runs the reference forward over `sequences` (in parallel) and returns
/// every token's rows at every memory layer.
fn gather_reads(
    cfg: &ModelConfig,
    store: &ParamStore,
    sequences: &[Vec<u32>],
    stride: usize,
    what: &str,
) -> Result<Reads> {
    let bar = ProgressBar::new(sequences.len() as u64).with_style(
        ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(format!("reading {what}"));
    let per_sequence: Vec<Vec<u32>> = sequences
        .par_iter()
        .map(|tokens| {
            let mut rows = Vec::new();
            forward_traced(cfg, store, tokens, None, &mut |_, f| {
                rows.extend_from_slice(&f.indices)
            })
            .map_err(anyhow::Error::from)?;
            bar.inc(1);
            Ok(rows)
        })
        .collect::<Result<_>>()?;
    bar.finish_and_clear();
    Ok(Reads {
        stride,
        rows: per_sequence.concat(),
    })
}

/// Token sequences of the contexts the counts are gathered on.
fn training_sequences(args: &LayoutArgs, m: &LoadedModel) -> Result<(Vec<Vec<u32>>, String)> {
    let (texts, from): (Vec<String>, String) = if let Some(path) = &args.corpus {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the corpus {}", path.display()))?;
        // about four characters a token: contexts of up to max_seq_len tokens
        let target_chars = m.config.max_seq_len.saturating_mul(4).max(1);
        let contexts = contexts_from_text(&text, target_chars)
            .with_context(|| format!("splitting {} into contexts", path.display()))?;
        (
            contexts.into_iter().map(|c| c.text).collect(),
            path.display().to_string(),
        )
    } else {
        let facts = m.dir.join("facts.json");
        if !facts.exists() {
            bail!(
                "{} has no facts.json to regenerate its training corpus from: give the \
                 contexts with --corpus FILE",
                m.dir.display()
            );
        }
        let config = read_config(&facts)?;
        let data = FactsDataset::generate(&config)
            .with_context(|| format!("regenerating the corpus of {}", facts.display()))?;
        let texts = data.texts().into_iter().map(str::to_owned).collect();
        (texts, format!("the facts corpus of {}", facts.display()))
    };
    let texts: Vec<String> = texts.into_iter().take(args.contexts).collect();
    if texts.is_empty() {
        bail!("no contexts in {from}");
    }
    let max = m.config.max_seq_len;
    let mut sequences = Vec::with_capacity(texts.len());
    for t in &texts {
        let mut ids = m.tokenizer.encode(t)?;
        ids.truncate(max);
        if !ids.is_empty() {
            sequences.push(ids);
        }
    }
    Ok((sequences, from))
}

/// Held-out questions with their answers (eval.jsonl), as token sequences.
fn heldout_sequences(m: &LoadedModel, questions: usize) -> Result<Vec<Vec<u32>>> {
    let path = m.dir.join("eval.jsonl");
    if !path.exists() {
        return Ok(Vec::new());
    }
    let max = m.config.max_seq_len;
    let mut out = Vec::new();
    for q in read_eval_jsonl(&path)?.into_iter().take(questions) {
        let mut ids = m.tokenizer.encode(&format!("{} {}", q.prompt, q.answer))?;
        ids.truncate(max);
        out.push(ids);
    }
    Ok(out)
}

/// The source bank's value dtype and rows per page.
fn bank_values(dir: &Path) -> Result<(Dtype, u32)> {
    let path = dir.join(BANK_FILE);
    let src = FileSource::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let bank = BankReader::open(src).with_context(|| format!("reading {}", path.display()))?;
    for s in bank.sections() {
        if let SectionKind::PkmValues { page_rows, .. } = s.spec.kind {
            return Ok((s.spec.dtype, page_rows));
        }
    }
    bail!("{} has no product-key values section", path.display())
}

pub fn run(args: LayoutArgs) -> Result<()> {
    if args.contexts == 0 {
        bail!("--contexts must be at least 1");
    }
    if args.out == args.model {
        bail!("--out must be another directory than --model (the copy is written beside it)");
    }
    let m = load(&args.model).with_context(|| format!("loading {}", args.model.display()))?;
    let Some(c) = m.config.pkm_config() else {
        bail!(
            "{} has no product-key memory: there are no value rows to lay out",
            args.model.display()
        );
    };
    let (src_dtype, src_page_rows) = bank_values(&args.model)?;
    let dtype = args.dtype.map_or(src_dtype, Dtype::from);
    let row_bytes = c.v_dim * dtype.size();
    let page_rows = match args.page_bytes {
        None => value_page_rows(c.n_rows(), c.v_dim, dtype) as usize,
        Some(b) if b == 0 || b % row_bytes != 0 => bail!(
            "--page-bytes {b} is not a positive multiple of one row ({} values of {dtype}: \
             {row_bytes} bytes)",
            c.v_dim
        ),
        Some(b) => b / row_bytes,
    };
    if page_rows > u32::MAX as usize || page_rows > c.n_rows() {
        bail!(
            "{page_rows} rows per page: more than the table's {} rows",
            c.n_rows()
        );
    }
    let stride = c.heads * c.knn;
    let n = c.n_keys as u32;

    let (train, from) = training_sequences(&args, &m)?;
    let train_reads = gather_reads(&m.config, &m.store, &train, stride, "training contexts")?;
    let mut co = CoAccess::new(c.n_keys);
    for read in train_reads.rows.chunks_exact(stride) {
        co.add_read(read)?;
    }
    let order: Vec<u32> = match args.order {
        RowOrder::CoAccess => second_half_order(&co, page_rows),
        RowOrder::Identity => (0..n).collect(),
    };
    let identity: Vec<u32> = (0..n).collect();
    let inv = inverse_order(&order)?;
    let heldout = heldout_sequences(&m, args.questions)?;
    let heldout_reads = gather_reads(&m.config, &m.store, &heldout, stride, "held-out questions")?;

    let mut store = m.store.clone();
    apply_second_half_order(&m.config, &mut store, &order)?;
    export(
        &m.config,
        &store,
        &args.out,
        &ExportParts {
            tokenizer: &m.tokenizer,
            routing: m.routing.as_ref(),
            bank_dtype: dtype,
            value_page_rows: Some(page_rows as u32),
        },
    )
    .with_context(|| format!("writing {}", args.out.display()))?;
    for name in COPIED_FILES {
        let from_path = args.model.join(name);
        if from_path.exists() {
            std::fs::copy(&from_path, args.out.join(name))
                .with_context(|| format!("copying {}", from_path.display()))?;
        }
    }

    let page_bytes = page_rows * row_bytes;
    let kib = |pages: f64| pages * page_bytes as f64 / 1024.0;
    let summary = |reads: &Reads| {
        let before = reads.pages_per_read(n, &identity, page_rows);
        let after = reads.pages_per_read(n, &inv, page_rows);
        json!({
            "token_reads": reads.tokens(),
            "rows_per_read": stride,
            "pages_per_read_before": before,
            "pages_per_read_after": after,
            "kib_per_read_before": kib(before),
            "kib_per_read_after": kib(after),
            "ratio": after / before.max(f64::MIN_POSITIVE),
            "pages_per_read_bound": reads.pages_per_read_bound(n, page_rows),
        })
    };
    let report = json!({
        "model": args.model.display().to_string(),
        "out": args.out.display().to_string(),
        "order": format!("{:?}", args.order),
        "contexts_from": from,
        "contexts": train.len(),
        "dtype": dtype.name(),
        "source_dtype": src_dtype.name(),
        "source_page_rows": src_page_rows,
        "page_rows": page_rows,
        "page_bytes": page_bytes,
        "sub_key_pairs_counted": co.pair_count(),
        "training": summary(&train_reads),
        "heldout": (heldout_reads.tokens() > 0).then(|| summary(&heldout_reads)),
    });
    println!(
        "wrote {} ({dtype}, {page_rows} rows = {page_bytes} B per value page, {:?} order from \
         {} contexts of {from})",
        args.out.display(),
        args.order,
        train.len()
    );
    for (name, key) in [
        ("training contexts", "training"),
        ("held-out questions", "heldout"),
    ] {
        let r = &report[key];
        if r.is_null() {
            continue;
        }
        println!(
            "  {name}: {:.2} -> {:.2} pages per token and memory layer (at best {:.2}; {:.1} -> \
             {:.1} KiB; {} rows read each), {} token reads",
            r["pages_per_read_before"].as_f64().unwrap_or(0.0),
            r["pages_per_read_after"].as_f64().unwrap_or(0.0),
            r["pages_per_read_bound"].as_f64().unwrap_or(0.0),
            r["kib_per_read_before"].as_f64().unwrap_or(0.0),
            r["kib_per_read_after"].as_f64().unwrap_or(0.0),
            stride,
            r["token_reads"]
        );
    }
    if page_rows == 1 {
        println!("  one row per page: no layout changes the pages a token reads");
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
