//! The decoder model's configuration, host-side parameters and reference
//! forward (the oracle of the burn model in `memlayer-model`), and the checks
//! a model directory passes before it runs: config bounds
//! ([`ModelConfig::check`]), file checksums ([`manifest`]) and the bank's fit
//! to the config ([`bank_fit`]).

pub mod bank_fit;
pub mod config;
pub mod manifest;
pub mod params;
pub mod reference;

pub use bank_fit::{BankFitError, check_bank_fits};
pub use config::{ConfigError, HierRouting, HierSpec, ModelConfig, ParamCounts, PkmSpec};
pub use manifest::{BankIdentity, CHECKSUMS_FILE, Checksums, FileDigest, ManifestError};
pub use params::{Param, ParamGroup, ParamStore};
