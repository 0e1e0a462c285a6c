//! Paged bank format v1: see `docs/FORMAT.md`.
