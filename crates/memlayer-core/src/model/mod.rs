//! The decoder model's configuration (with its bounds,
//! [`ModelConfig::check`]), host-side parameters and reference forward (the
//! oracle of the burn model in `memlayer-model`). The model directory's
//! checksums and the bank's fit to the config are `memlayer-model-dir`'s.

pub mod config;
pub mod params;
pub mod reference;
pub mod row_layout;

pub use config::{ConfigError, HierRouting, HierSpec, ModelConfig, ParamCounts, PkmSpec};
pub use params::{Param, ParamGroup, ParamStore};
