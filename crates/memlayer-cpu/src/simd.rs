//! Kernel selection: AVX2 + FMA + F16C when the CPU has them (runtime
//! detection, no `target-cpu` flag needed), else portable loops that build
//! for every target (aarch64, wasm32, ...).

use std::sync::atomic::{AtomicBool, Ordering};

static FORCE_PORTABLE: AtomicBool = AtomicBool::new(false);

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
