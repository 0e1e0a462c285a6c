//! `memlayer bench ...`: benchmarks across backends, one file per
//! subcommand (`cmd_bench_kernels`, `cmd_bench_train`, `cmd_bench_paged`).

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Embedding-bag and product-key lookup on every backend, with the copy-bandwidth limits.
    Kernels(crate::cmd_bench_kernels::KernelsArgs),
    /// Training step time of dense vs memory variants, per backend.
    Train(crate::cmd_bench_train::TrainBenchArgs),
    /// Decode speed and bytes streamed with paged memory under budgets vs resident.
    Paged(crate::cmd_bench_paged::PagedBenchArgs),
}

pub fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Kernels(args) => crate::cmd_bench_kernels::run(args),
        BenchCommand::Train(args) => crate::cmd_bench_train::run(args),
        BenchCommand::Paged(args) => crate::cmd_bench_paged::run(args),
    }
}
