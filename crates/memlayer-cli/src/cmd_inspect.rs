//! `memlayer inspect FILE [--verify]`

use clap::Args;

#[derive(Args)]
pub struct InspectArgs {
    /// Bank file to inspect.
    pub file: std::path::PathBuf,
    /// Read and verify every page.
    #[arg(long)]
    pub verify: bool,
}

pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    anyhow::bail!("inspect {} is not wired yet", args.file.display())
}
