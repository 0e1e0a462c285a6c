//! memlayer's WGSL kernels on wgpu (Vulkan, Metal, DX12, GL natively; WebGPU in browsers).
//!
//! The kernels live in `shaders/*.wgsl` at the repository root, registered
//! once in [`shaders`] and built into pipelines once per [`GpuContext`];
//! every multi-kernel sequence is written once, generic over
//! [`launch::Launcher`] (raw wgpu here, cubecl in `memlayer-model`). Every kernel is tested against the
//! CPU oracle in `memlayer-core` (see `tests/`).
//!
//! Tables are never assumed to fit one binding: [`buffers::ShardedTable`]
//! splits them across buffers sized from the device's limits.

pub mod backward;
pub mod bag_forward;
pub mod buffers;
pub mod context;
pub mod copy;
pub mod launch;
pub mod lookup;
pub mod reverse_index;
pub mod shaders;

pub use buffers::{GpuDtype, ShardedTable};
#[cfg(not(target_arch = "wasm32"))]
pub use context::gpu_for_tests;
pub use context::{GpuContext, GpuError, GpuOptions};
