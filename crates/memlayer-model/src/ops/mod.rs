//! Memory ops of the model: product-key selection and the weighted
//! embedding-bag.
//!
//! Two implementations with one contract:
//! - [`portable`]: burn tensor ops (any backend; autodiff by burn);
//! - [`native`]: a burn backend extension ([`native::MemoryBackend`]) whose
//!   CPU implementation runs `memlayer-cpu`'s kernels on burn's Flex backend
//!   and whose GPU implementation ([`wgsl`], feature `wgpu`) launches the
//!   WGSL kernels of `shaders/` on burn-wgpu, with a hand-written backward
//!   on `Autodiff<B>` for both.
//!
//! [`MemoryOps`] picks one; the tests check that both agree with each other
//! and with the CPU oracle, forward and backward.

pub mod native;
pub mod portable;
#[cfg(feature = "wgpu")]
pub mod wgsl;

use burn::tensor::{Device, Int, Tensor};
use memlayer_core::error::OracleError;

/// Errors of the memory ops.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// Shapes or configuration rejected by the oracle.
    #[error(transparent)]
    Oracle(#[from] OracleError),
    /// The native ops do not run on this device.
    #[error("native memory ops are not available on {0}")]
    Unsupported(String),
}

/// Which implementation of the memory ops a model uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryOps {
    /// Composition of burn tensor ops.
    Portable,
    /// The backend extension (memlayer-cpu kernels on Flex, WGSL kernels on burn-wgpu).
    Native,
}

impl MemoryOps {
    /// The backend extension where it runs on `device` (the memory ops stay
    /// on the device), else the portable ops. On a software Vulkan driver
    /// (lavapipe) the portable ops train small models faster
    /// (docs/BENCHMARKS.md); pick them explicitly there.
    pub fn best_for(device: &Device) -> Self {
        if native::supported(device) {
            Self::Native
        } else {
            Self::Portable
        }
    }

    /// Product-key selection. scores: (groups, 2, n_keys) → (groups, knn) rows `i1 * n_keys + i2`.
    pub fn pk_select(self, scores: Tensor<3>, knn: usize) -> Result<Tensor<2, Int>, OpsError> {
        match self {
            Self::Portable => portable::pk_select(scores, knn),
            Self::Native => native::pk_select(scores, knn),
        }
    }

    /// Weighted embedding-bag. values: (rows, v_dim); indices, weights: (bags, bag) → (bags, v_dim).
    pub fn embedding_bag(
        self,
        values: Tensor<2>,
        indices: Tensor<2, Int>,
        weights: Tensor<2>,
    ) -> Tensor<2> {
        match self {
            Self::Portable => portable::embedding_bag(values, indices, weights),
            Self::Native => native::embedding_bag(values, indices, weights),
        }
    }
}
