//! `memlayer`: the command-line front end of the memlayer runtime.

use clap::{Parser, Subcommand};

mod args;
mod cmd_bank;
mod cmd_bench;
mod cmd_bench_kernels;
mod cmd_bench_paged;
mod cmd_bench_train;
mod cmd_chat;
mod cmd_checksums;
mod cmd_demo;
mod cmd_eval;
mod cmd_experiment;
mod cmd_generate;
mod cmd_inspect;
mod cmd_layer;
mod cmd_layout;
mod cmd_serve;
mod cmd_train;
mod open;
mod source;
mod stats;

#[derive(Parser)]
#[command(
    name = "memlayer",
    version,
    about = "Portable memory layers: banks, kernels, models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create and manage paged memory banks.
    Bank {
        #[command(subcommand)]
        command: cmd_bank::BankCommand,
    },
    /// Print a bank's header and page table; `--verify` checks every page.
    Inspect(cmd_inspect::InspectArgs),
    /// Record the checksums of a model directory whose files you trust (checksums.json).
    Checksums(cmd_checksums::ChecksumsArgs),
    /// Copy a model directory with its product-key value rows laid out for locality (rows a
    /// token reads together share pages), optionally in another dtype / page size.
    Layout(cmd_layout::LayoutArgs),
    /// Benchmarks across backends: with no subcommand, parity against the CPU
    /// oracle then speed on every backend found, into `--out DIR`.
    Bench {
        #[command(flatten)]
        command: cmd_bench::BenchArgs,
    },
    /// Run a single memory layer (e.g. one imported from facebookresearch/memory).
    Layer {
        #[command(subcommand)]
        command: cmd_layer::LayerCommand,
    },
    /// Train a model (preset or config) into a model directory, then evaluate it.
    Train(cmd_train::TrainArgs),
    /// The memory-vs-dense grid at equal compute: trains every variant with 2 seeds and
    /// writes report.md, report.json and plots.
    Experiment(cmd_experiment::ExperimentArgs),
    /// Evaluate a model directory: fact recall by frequency bucket, perplexity.
    Eval(cmd_eval::EvalArgs),
    /// Generate text with the model's memory paged in on demand under a budget.
    ///
    /// A model without memory layers (config.json with neither `pkm` nor `hier`) has no
    /// bank: it runs as it is, the budget flags are unused and the stats line says so.
    Generate(cmd_generate::GenerateArgs),
    /// Interactive generation, one prompt per line, with a stats line per turn.
    ///
    /// A model without memory layers (config.json with neither `pkm` nor `hier`) has no
    /// bank: it runs as it is, the budget flags are unused and the stats line says so.
    Chat(cmd_chat::ChatArgs),
    /// Serve a model directory (and the web app) over HTTP with Range support on 127.0.0.1.
    Serve(cmd_serve::ServeArgs),
    /// The main job: held-out fact questions answered with 25% of the memory resident,
    /// next to the fully resident run.
    Demo(cmd_demo::DemoArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bank { command } => cmd_bank::run(command),
        Command::Bench { command } => cmd_bench::run(command),
        Command::Inspect(args) => cmd_inspect::run(args),
        Command::Checksums(args) => cmd_checksums::run(args),
        Command::Layout(args) => cmd_layout::run(args),
        Command::Layer { command } => cmd_layer::run(command),
        Command::Train(args) => cmd_train::run(args),
        Command::Experiment(args) => cmd_experiment::run(args),
        Command::Eval(args) => cmd_eval::run(args),
        Command::Generate(args) => cmd_generate::run(args),
        Command::Chat(args) => cmd_chat::run(args),
        Command::Serve(args) => cmd_serve::run(args),
        Command::Demo(args) => cmd_demo::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", error_chain(&err));
            std::process::ExitCode::FAILURE
        }
    }
}

/// `err` and its causes joined by ": ", leaving out a cause whose text the
/// message before it already contains (many error types print their source
/// in their own message; `{:#}` would print it twice).
fn error_chain(err: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut prev = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if !prev.is_empty() && prev.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
        prev = text;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::error_chain;
    use anyhow::Context;

    /// An error that prints its source in its own message and also returns it.
    #[derive(Debug)]
    struct Repeats(std::io::Error);
    impl std::fmt::Display for Repeats {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "cannot open x.bank: {}", self.0)
        }
    }
    impl std::error::Error for Repeats {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn error_chain_prints_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        let err = Err::<(), _>(Repeats(io))
            .context("opening the bank")
            .unwrap_err();
        assert_eq!(
            error_chain(&err),
            "opening the bank: cannot open x.bank: No such file or directory"
        );
        // Causes that add something are all kept.
        let err = Err::<(), _>(anyhow::anyhow!("disk full"))
            .context("writing y")
            .context("exporting")
            .unwrap_err();
        assert_eq!(error_chain(&err), "exporting: writing y: disk full");
    }
}
