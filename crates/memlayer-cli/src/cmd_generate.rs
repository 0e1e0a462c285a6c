//! `memlayer generate`: text after a prompt from a model directory, its
//! memory paged in on demand (local file or HTTP Range) under a budget.

use crate::args::{MemoryArgs, SamplingArgs};
use crate::open::open_model;
use crate::stats::stats_line;
use anyhow::{Context, Result};
use clap::Args;
use std::io::Write;
use std::path::PathBuf;

#[derive(Args)]
pub struct GenerateArgs {
    /// Model directory (config, dense weights, tokenizer; the bank unless --source says otherwise).
    pub dir: PathBuf,
    /// Prompt text.
    #[arg(long)]
    pub prompt: String,
    #[command(flatten)]
    pub memory: MemoryArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Stop after the first line of output.
    #[arg(long)]
    pub line: bool,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let mut o = open_model(&args.dir, &args.memory, false)?;
    let mut out = std::io::stdout();
    print!("{}", args.prompt);
    out.flush().ok();
    let g = o
        .generator
        .generate(
            &args.prompt,
            &args.sampling.sampling(),
            args.line.then_some("\n"),
            |piece, _| {
                print!("{piece}");
                out.flush().ok();
            },
        )
        .context("generating")?;
    println!();
    let stats = o.memory.as_ref().map(|m| (m.stats(), m));
    eprintln!(
        "{}",
        stats_line(&g, stats.as_ref().map(|(st, m)| (st, m.as_ref())))
    );
    Ok(())
}
