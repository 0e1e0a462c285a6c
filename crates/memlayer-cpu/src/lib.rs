//! Optimised CPU path of memlayer's memory ops, checked against the oracle in
//! [`memlayer_core`]: embedding-bag forward/backward over f32/f16/bf16 tables
//! (dense or paged), the product-key lookup and its score backward, and
//! memory-bandwidth probes (copy and read).
//!
//! Every op runs on the *current* rayon pool; [`Cpu`] owns a pool with an
//! explicit thread count and runs ops inside it. Each kernel is written once
//! over [`simd`]'s lanes and runs as AVX-512 or AVX2 + FMA + F16C on x86-64,
//! NEON on aarch64 or portable code elsewhere, picked at run time ([`simd::kernel`]).
//!
//! Results do not depend on the thread count: the embedding-bag forward, the
//! table gradient and the lookup are bit-identical to the oracle; the
//! per-sample-weight gradient matches it to rounding.

pub mod alloc;
pub mod bag;
pub mod bandwidth;
pub mod error;
pub mod pkm;
pub mod simd;
pub mod storage;

pub use error::CpuError;
pub use storage::{AnyDtype, DType, PagedTable, PagedTableRef, Rows, Storage, Table, TableRef};

/// A rayon thread pool with an explicit thread count; ops called through
/// [`Cpu::install`] run on it (`cpu.install(|| bag::bag_backward_table(..))`),
/// and so do the convenience methods for the forward, the lookup and the
/// bandwidth probe.
pub struct Cpu {
    pool: rayon::ThreadPool,
}

impl Cpu {
    /// A pool of `threads` threads (0: one per logical CPU, rayon's default).
    pub fn new(threads: usize) -> Result<Self, CpuError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("memlayer-cpu-{i}"))
            .build()
            .map_err(|e| CpuError::ThreadPool(e.to_string()))?;
        Ok(Self { pool })
    }

    /// Threads of the pool.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Runs `f` inside the pool: every op it calls uses this pool's threads.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    /// [`bag::bag_forward`] on this pool. out: (bags, dim)
    pub fn bag_forward<R: Rows>(
        &self,
        table: &R,
        indices: &[u32],
        weights: &[f32],
        offsets: &[usize],
        out: &mut [f32],
    ) -> Result<(), CpuError> {
        self.install(|| bag::bag_forward(table, indices, weights, offsets, out))
    }

    /// [`pkm::lookup`] on this pool.
    pub fn lookup(
        &self,
        keys: &pkm::PreparedKeys,
        query: &[f32],
        tokens: usize,
    ) -> Result<memlayer_core::pkm::Lookup, CpuError> {
        self.install(|| pkm::lookup(keys, query, tokens))
    }

    /// [`bandwidth::copy_bandwidth`] with this pool's threads.
    pub fn copy_bandwidth(&self, bytes: usize, runs: usize) -> bandwidth::Bandwidth {
        self.install(|| bandwidth::copy_bandwidth(bytes, runs))
    }

    /// [`bandwidth::read_bandwidth`] with this pool's threads: the ceiling of a
    /// gather, which reads rows and writes almost nothing.
    pub fn read_bandwidth(&self, bytes: usize, runs: usize) -> bandwidth::Bandwidth {
        self.install(|| bandwidth::read_bandwidth(bytes, runs))
    }
}
