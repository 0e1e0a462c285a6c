//! `memlayer bench ...`: benchmarks across backends, one file per
//! subcommand (`cmd_bench_kernels`, `cmd_bench_train`, `cmd_bench_paged`);
//! with no subcommand, the cross-backend runner (`cmd_bench_all/`): parity
//! against the oracle on every backend found, then speed, into `--out DIR`.

use anyhow::Result;
use clap::{Args, Subcommand};

#[path = "cmd_bench_all/mod.rs"]
pub mod cmd_bench_all;

/// `memlayer bench [SUBCOMMAND]`: a subcommand runs one benchmark; none runs
/// them all through the runner.
/// (Boxed: `Command`'s variants stay small.)
#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: Option<Box<BenchCommand>>,
    #[command(flatten)]
    pub all: Box<cmd_bench_all::RunnerArgs>,
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Embedding-bag and product-key lookup on every backend, with the copy-bandwidth limits.
    Kernels(crate::cmd_bench_kernels::KernelsArgs),
    /// Training step time of dense vs memory variants, per backend.
    Train(crate::cmd_bench_train::TrainBenchArgs),
    /// Decode speed and bytes streamed with paged memory under budgets vs resident.
    Paged(crate::cmd_bench_paged::PagedBenchArgs),
}

pub fn run(args: BenchArgs) -> Result<()> {
    match args.command.map(|c| *c) {
        Some(BenchCommand::Kernels(args)) => crate::cmd_bench_kernels::run(args),
        Some(BenchCommand::Train(args)) => crate::cmd_bench_train::run(args),
        Some(BenchCommand::Paged(args)) => crate::cmd_bench_paged::run(args),
        None => cmd_bench_all::run(*args.all),
    }
}
