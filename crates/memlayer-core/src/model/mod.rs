//! The decoder model's configuration, host-side parameters and reference
//! forward (the oracle of the burn model in `memlayer-model`).

pub mod config;
pub mod params;
pub mod reference;

pub use config::{HierRouting, HierSpec, ModelConfig, ParamCounts, PkmSpec};
pub use params::{Param, ParamGroup, ParamStore};
