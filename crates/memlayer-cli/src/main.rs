//! `memlayer`: the command-line front end of the memlayer runtime.

use clap::{Parser, Subcommand};

mod cmd_bank;
mod cmd_bench;
mod cmd_bench_paged;
mod cmd_bench_train;
mod cmd_demo;
mod cmd_experiment;
mod cmd_generate;
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
    /// The memory-vs-dense grid at equal compute: trains every variant with 2 seeds and
    /// writes report.md, report.json and plots.
    Experiment(cmd_experiment::ExperimentArgs),
    /// Evaluate a model directory: fact recall by frequency bucket, perplexity.
    Eval(cmd_train::EvalArgs),
    /// Generate text with the model's memory paged in on demand under a budget.
    Generate(cmd_generate::GenerateArgs),
    /// Interactive generation, one prompt per line, with a stats line per turn.
    Chat(cmd_generate::ChatArgs),
    /// Serve a model directory (and the web app) over HTTP with Range support on 127.0.0.1.
    Serve(cmd_generate::ServeArgs),
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
        Command::Layer { command } => cmd_layer::run(command),
        Command::Train(args) => cmd_train::run_train(args),
        Command::Experiment(args) => cmd_experiment::run(args),
        Command::Eval(args) => cmd_train::run_eval(args),
        Command::Generate(args) => cmd_generate::run_generate(args),
        Command::Chat(args) => cmd_generate::run_chat(args),
        Command::Serve(args) => cmd_generate::run_serve(args),
        Command::Demo(args) => cmd_demo::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
