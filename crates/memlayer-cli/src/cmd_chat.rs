//! `memlayer chat`: interactive generation, one prompt per line on stdin,
//! the model's memory paged in on demand under a budget, a stats line per turn.

use crate::args::{MemoryArgs, SamplingArgs};
use crate::open::open_model;
use crate::stats::{since, stats_line};
use anyhow::{Context, Result};
use clap::Args;
use memlayer_runtime::Sampling;
use std::io::Write;
use std::path::PathBuf;

#[derive(Args)]
pub struct ChatArgs {
    /// Model directory.
    pub dir: PathBuf,
    #[command(flatten)]
    pub memory: MemoryArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

pub fn run(args: ChatArgs) -> Result<()> {
    let mut o = open_model(&args.dir, &args.memory, false)?;
    match &o.memory {
        Some(memory) => eprintln!(
            "memlayer chat: {} (memory from {}, budget {:.2} MiB of {:.2} MiB). Empty line or Ctrl-D quits.",
            args.dir.display(),
            memory.location(),
            mib(memory.budget_bytes()),
            mib(o.bank_bytes)
        ),
        None => eprintln!(
            "memlayer chat: {} (no memory layers). Empty line or Ctrl-D quits.",
            args.dir.display()
        ),
    }
    let mut stdin = std::io::stdin().lock();
    let mut raw = Vec::new();
    let mut turn = 0u64;
    loop {
        eprint!("> ");
        raw.clear();
        if std::io::BufRead::read_until(&mut stdin, b'\n', &mut raw)
            .context("reading a line from stdin")?
            == 0
        {
            break;
        }
        let line = match std::str::from_utf8(&raw) {
            Ok(line) => line,
            Err(e) => {
                // Not text: say so and wait for the next line.
                eprintln!(
                    "error: that line is not UTF-8 text (invalid byte {:#04x} at byte {}); type it again",
                    raw.get(e.valid_up_to()).copied().unwrap_or_default(),
                    e.valid_up_to()
                );
                continue;
            }
        };
        let prompt = line.trim_end_matches(['\n', '\r']);
        if prompt.is_empty() {
            break;
        }
        let before = o.memory.as_ref().map(|m| m.stats());
        let mut out = std::io::stdout();
        print!("{prompt}");
        out.flush().ok();
        let sampling = Sampling {
            seed: args.sampling.seed.wrapping_add(turn),
            ..args.sampling.sampling()
        };
        match o
            .generator
            .generate(prompt, &sampling, Some("\n"), |piece, _| {
                print!("{piece}");
                out.flush().ok();
            }) {
            Ok(g) => {
                println!();
                let turn_stats = o
                    .memory
                    .as_ref()
                    .zip(before)
                    .map(|(m, before)| (since(&before, &m.stats()), m));
                eprintln!(
                    "{}",
                    stats_line(&g, turn_stats.as_ref().map(|(st, m)| (st, m.as_ref())))
                );
            }
            Err(e) => {
                println!();
                eprintln!("error: {e}");
            }
        }
        turn += 1;
    }
    Ok(())
}
