//! `memlayer bank ...`: create paged memory banks.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use memlayer_bank::{BankFileWriter, BankLayout, DEFAULT_PAGE_ALIGN, Dtype, SectionSpec};
use memlayer_core::rng::Rng;

/// Bank subcommands.
#[derive(Subcommand)]
pub enum BankCommand {
    /// Write a bank with one `pkm_values` section of random N(0, dim^-1/2) values.
    Synth(SynthArgs),
}

/// On-disk value type.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DtypeArg {
    /// 32-bit float.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
}

impl From<DtypeArg> for Dtype {
    fn from(d: DtypeArg) -> Self {
        match d {
            DtypeArg::F32 => Dtype::F32,
            DtypeArg::F16 => Dtype::F16,
            DtypeArg::Bf16 => Dtype::Bf16,
        }
    }
}

/// Arguments of `memlayer bank synth`.
#[derive(Args)]
pub struct SynthArgs {
    /// Bank file to write (written atomically).
    #[arg(long)]
    pub out: PathBuf,
    /// Number of value rows N.
    #[arg(long)]
    pub rows: u64,
    /// Values per row.
    #[arg(long)]
    pub dim: u32,
    /// Rows per page (the last page may be short).
    #[arg(long)]
    pub page_rows: u32,
    /// On-disk value type.
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    /// Seed of the random values.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Page alignment in bytes (power of two).
    #[arg(long, default_value_t = DEFAULT_PAGE_ALIGN)]
    pub page_align: u32,
}

/// Runs a bank subcommand.
pub fn run(command: BankCommand) -> anyhow::Result<()> {
    match command {
        BankCommand::Synth(args) => synth(args),
    }
}

/// Streams a synthetic `pkm_values` bank to `args.out`, one page at a time.
fn synth(args: SynthArgs) -> anyhow::Result<()> {
    let dtype = Dtype::from(args.dtype);
    let layout = BankLayout::new(vec![SectionSpec::pkm_values(
        args.rows,
        args.dim,
        args.page_rows,
        dtype,
    )])
    .with_page_align(args.page_align);
    let plan = layout.plan()?;
    let geometry = plan.sections[0].geometry;
    let mut writer = BankFileWriter::create(&args.out, &layout)?;
    let mut rng = Rng::new(args.seed);
    // Meta init of the values: N(0, std = dim^-1/2).
    let std = (args.dim as f32).powf(-0.5);
    for local in 0..geometry.page_count {
        let n = usize::try_from(geometry.rows_in_page(local) * u64::from(args.dim))
            .context("page does not fit in memory")?;
        writer.write_page(&rng.normal_vec(n, 0.0, std))?;
    }
    let bytes = writer.finish()?;
    println!(
        "wrote {}: pkm_values {} x {} {dtype}, {} pages of {} rows, {bytes} bytes, seed {}",
        args.out.display(),
        args.rows,
        args.dim,
        geometry.page_count,
        args.page_rows,
        args.seed
    );
    Ok(())
}
