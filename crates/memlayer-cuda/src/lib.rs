//! memlayer's CUDA fast path: the memory ops on NVIDIA GPUs.
//!
//! The kernels are CUDA C, one file beside its launcher, compiled at run
//! time with NVRTC ([`kernels`]: every source gets `common.cuh` prepended;
//! the PTX is cached per source, architecture and NVRTC version) and
//! launched through [cudarc] with **dynamic loading**: this crate builds on
//! a machine without CUDA, and [`CudaDevice::new`] fails with a named
//! [`CudaError`] when the driver, NVRTC or a GPU is missing — it never
//! panics for that.
//!
//! - [`lookup`]: the product-key lookup (`pk_norm_rows.cu`, `lookup.cu`):
//!   sub-key scores, top-k per half, the k×k candidates, top-k, softmax —
//!   indices and scores bit-identical to `memlayer_core::pkm::lookup`;
//! - [`bag`]: the embedding-bag forward (f32/f16/bf16 tables, f32
//!   accumulation, bit-identical to `memlayer_core::bag::bag_forward`), the
//!   table gradient through the reverse index (deterministic, the oracle's
//!   summation order) and the per-sample-weight gradient;
//! - [`bandwidth`]: the device's copy bandwidth (the ceiling benchmarks
//!   report against).
//!
//! Each op has a host form (slices in, slices out: tests, benchmarks) and a
//! device form over buffers already on the GPU ([`BagsRef`], [`TableRef`],
//! `*_into`/`*_on`: the paged pool, benchmarks, and what a training bridge
//! would call on a framework's buffers): one launch sequence for both.
//!
//! Every op checks its inputs on the host (shapes, row ids) before any
//! device allocation is sized by them. What has run on a real GPU and what
//! was only compiled is said in `docs/BENCHMARKS.md`.

pub mod bag;
pub mod bandwidth;
mod device;
mod error;
pub mod kernels;
pub mod lookup;

pub use bag::{BagBatch, BagsRef, PagedSlots, ReverseIndex, TableRef};
pub use cudarc::driver::CudaSlice;
pub use device::{CudaDevice, DeviceTable, cuda_for_tests};
pub use error::CudaError;
