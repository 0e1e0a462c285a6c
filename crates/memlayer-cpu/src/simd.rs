//! Kernel selection: AVX2 + FMA + F16C when the CPU has them (runtime
//! detection, no `target-cpu` flag needed), else portable loops that build
//! for every target (aarch64, wasm32, ...).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

static FORCE_PORTABLE: AtomicBool = AtomicBool::new(false);
static PREFETCH_BYTES: AtomicUsize = AtomicUsize::new(DEFAULT_PREFETCH_BYTES);
static PREFETCH_L2: AtomicBool = AtomicBool::new(true);
static PREFETCH_MODE: AtomicUsize = AtomicUsize::new(0);

/// Prefetch pattern of the gather (tuning): 0 every line of each row at the
/// prefetch distance; 1 only the row's first line; 2 as 0 plus the first line
/// again at twice the distance (starts the page walk earlier).
pub fn set_prefetch_mode(mode: usize) {
    PREFETCH_MODE.store(mode, Ordering::Relaxed);
}

/// Current prefetch pattern (see [`set_prefetch_mode`]).
pub fn prefetch_mode() -> usize {
    PREFETCH_MODE.load(Ordering::Relaxed)
}

/// Default distance of the software prefetch in the embedding-bag gather:
/// rows are prefetched this many bytes of row data ahead of the row being summed.
pub const DEFAULT_PREFETCH_BYTES: usize = 8 * 1024;

/// Sets the software-prefetch distance in bytes of rows (0 disables it); for tuning.
pub fn set_prefetch_bytes(bytes: usize) {
    PREFETCH_BYTES.store(bytes, Ordering::Relaxed);
}

/// Current software-prefetch distance in bytes of rows.
pub fn prefetch_bytes() -> usize {
    PREFETCH_BYTES.load(Ordering::Relaxed)
}

/// Prefetch with the `T1` hint (L2 and outer levels; the default: it measured
/// faster than `T0` here, L1 miss buffers stay free for the loads) or `T0` (all levels); for tuning.
pub fn set_prefetch_l2(on: bool) {
    PREFETCH_L2.store(on, Ordering::Relaxed);
}

/// Whether the prefetch uses the `T1` hint.
pub fn prefetch_l2() -> bool {
    PREFETCH_L2.load(Ordering::Relaxed)
}

/// Which kernel family runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// x86-64 with AVX2, FMA and F16C.
    Avx2,
    /// Plain Rust loops (auto-vectorised for the compile target).
    Portable,
}

/// Forces the portable kernels even where AVX2 is available (tests, benches).
/// Results are identical except for `dot`-style reductions
/// ([`crate::bag::bag_backward_weights`]), whose lanes differ.
pub fn force_portable(on: bool) {
    FORCE_PORTABLE.store(on, Ordering::Relaxed);
}

/// The kernel family used by the next call.
pub fn kernel() -> Kernel {
    if !FORCE_PORTABLE.load(Ordering::Relaxed) && crate::storage::has_avx2() {
        Kernel::Avx2
    } else {
        Kernel::Portable
    }
}
