//! `memlayer`: the command-line front end of the memlayer runtime.

use clap::{Parser, Subcommand};

mod cmd_bank;
mod cmd_bench;
mod cmd_bench_train;
mod cmd_inspect;
mod cmd_layer;
mod cmd_train;

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
    /// Benchmarks across backends.
    Bench {
        #[command(subcommand)]
        command: cmd_bench::BenchCommand,
    },
    /// Run a single memory layer (e.g. one imported from facebookresearch/memory).
    Layer {
        #[command(subcommand)]
        command: cmd_layer::LayerCommand,
    },
    /// Train a model (preset or config) into a model directory, then evaluate it.
    Train(cmd_train::TrainArgs),
    /// Evaluate a model directory: fact recall by frequency bucket, perplexity.
    Eval(cmd_train::EvalArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bank { command } => cmd_bank::run(command),
        Command::Bench { command } => cmd_bench::run(command),
        Command::Inspect(args) => cmd_inspect::run(args),
        Command::Layer { command } => cmd_layer::run(command),
        Command::Train(args) => cmd_train::run_train(args),
        Command::Eval(args) => cmd_train::run_eval(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
