//! memlayer: portable memory layers.
//!
//! This facade re-exports the workspace crates; see `docs/ARCHITECTURE.md`
//! for the map.

pub use memlayer_core as core;
