//! Setup shared by the wgpu integration tests (each test file uses a part).
#![allow(dead_code)]

use memlayer_core::bag::bag_forward;
use memlayer_wgpu::bag_forward::BagForward;
use memlayer_wgpu::{GpuContext, GpuError, GpuOptions, ShardedTable, gpu_for_tests};

/// A context held to WebGPU's default limits (16 KiB workgroup storage, 8
/// storage buffers per stage, 128 MiB bindings) rather than the adapter's;
/// `None` where no adapter is available (see [`gpu_for_tests`]).
pub fn webgpu_default_ctx() -> Option<GpuContext> {
    let opts = GpuOptions {
        webgpu_default_limits: true,
        ..Default::default()
    };
    gpu_for_tests(opts)
}

/// CSR bags of an embedding-bag call: entry rows, per-entry weights and
/// `bags + 1` offsets.
pub struct Bags {
    pub indices: Vec<u32>,
    pub weights: Vec<f32>,
    pub offsets: Vec<usize>,
}

impl Bags {
    /// The bags summed on the device over the slot pool `slots` through
    /// `page_table` ([`BagForward::run_paged`]).
    pub fn run_paged(
        &self,
        bag: &BagForward,
        ctx: &GpuContext,
        slots: &ShardedTable,
        page_rows: usize,
        page_table: &[u32],
    ) -> Result<Vec<f32>, GpuError> {
        bag.run_paged(
            ctx,
            slots,
            page_rows,
            page_table,
            &self.indices,
            &self.weights,
            &self.offsets,
        )
    }

    /// The oracle's sums over the `rows × dim` table `values`.
    pub fn oracle(&self, values: &[f32], rows: usize, dim: usize) -> Vec<f32> {
        bag_forward(
            values,
            rows,
            dim,
            &self.indices,
            &self.weights,
            &self.offsets,
        )
        .unwrap()
    }
}
