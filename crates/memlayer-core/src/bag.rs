//! Embedding-bag (sum mode with per-sample weights).
