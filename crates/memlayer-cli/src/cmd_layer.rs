//! `memlayer layer ...`

use clap::Subcommand;

#[derive(Subcommand)]
pub enum LayerCommand {}

pub fn run(command: LayerCommand) -> anyhow::Result<()> {
    match command {}
}
