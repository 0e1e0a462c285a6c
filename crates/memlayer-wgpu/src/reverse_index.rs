//! Deterministic reverse index (ids -> sorted entry lists) on the GPU.
