//! The WGSL copy kernel (`shaders/copy.wgsl`): an adapter's bandwidth ceiling.

use crate::buffers::{Kernel, grid, uniform_init};
use crate::context::{GpuContext, GpuError};

/// WGSL source of the copy kernel.
pub const SOURCE: &str = include_str!("../../../shaders/copy.wgsl");

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n_vec4: u32,
    x_groups: u32,
}

/// The copy pipeline.
pub struct CopyKernel {
    kernel: Kernel,
}

impl CopyKernel {
    /// Builds the pipeline.
    pub fn new(ctx: &GpuContext) -> Result<Self, GpuError> {
        Ok(Self {
            kernel: Kernel::new(ctx, "copy", SOURCE, "main", &[])?,
        })
    }

    /// Records `dst[..bytes] = src[..bytes]`; `bytes` must be a multiple of 16.
    pub fn record(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        src: &wgpu::Buffer,
        dst: &wgpu::Buffer,
        bytes: u64,
    ) -> Result<(), GpuError> {
        if !bytes.is_multiple_of(16) || bytes > src.size() || bytes > dst.size() {
            return Err(GpuError::Invalid(format!(
                "copy of {bytes} bytes: must be a multiple of 16 within both buffers"
            )));
        }
        let n_vec4 = (bytes / 16) as u32;
        let groups = grid(ctx, n_vec4.div_ceil(256));
        let params = uniform_init(
            ctx,
            "copy params",
            &Params {
                n_vec4,
                x_groups: groups.0,
            },
        );
        self.kernel.dispatch(
            ctx,
            encoder,
            &[
                params.as_entire_binding(),
                src.as_entire_binding(),
                dst.as_entire_binding(),
            ],
            groups,
        );
        Ok(())
    }
}
