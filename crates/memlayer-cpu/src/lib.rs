//! Optimised CPU path of the memory ops (checked against `memlayer_core`).
