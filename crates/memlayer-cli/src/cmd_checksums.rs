//! `memlayer checksums DIR`: records the checksums of a model directory
//! whose files the user trusts (one exported before checksums existed, or
//! assembled by hand), after checking its config's bounds and that its bank
//! fits the config. `memlayer train` writes them itself on export.

use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct ChecksumsArgs {
    /// Model directory (config.json, model.safetensors, tokenizer.json, memory.bank, …).
    pub dir: PathBuf,
}

pub fn run(args: ChecksumsArgs) -> Result<()> {
    let sums = memlayer_train::model_dir::write_checksums(&args.dir)
        .with_context(|| format!("recording the checksums of {}", args.dir.display()))?;
    let path = args.dir.join(memlayer_model_dir::manifest::CHECKSUMS_FILE);
    println!("wrote {}", path.display());
    print!("{}", sums.to_json());
    Ok(())
}
