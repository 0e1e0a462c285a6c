//! `memlayer bank ...`

use clap::Subcommand;

#[derive(Subcommand)]
pub enum BankCommand {}

pub fn run(command: BankCommand) -> anyhow::Result<()> {
    match command {}
}
