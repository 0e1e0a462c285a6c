//! The WGSL copy kernel (`shaders/copy.wgsl`): an adapter's bandwidth ceiling.

use crate::context::{GpuContext, GpuError};
use crate::launch::{Kernels, Launcher, u32_of};
use crate::shaders;

crate::params! {
pub(crate) struct Params {
    n_vec4: u32,
    x_groups: u32,
}
}

/// The copy pipeline.
pub struct CopyKernel {
    kernels: Kernels,
}

impl CopyKernel {
    /// Builds the pipeline.
    pub fn new(ctx: &GpuContext) -> Result<Self, GpuError> {
        Ok(Self {
            kernels: Kernels::new(ctx, [shaders::COPY.plain()])?,
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
        let n_vec4 = u32_of("copy words", (bytes / 16) as usize)?;
        let mut l = self.kernels.launcher(ctx, encoder);
        let g = l.grid(n_vec4.div_ceil(256) as usize)?;
        let params = Params {
            n_vec4,
            x_groups: g.x,
        };
        l.launch(shaders::COPY.plain(), &params, &[src, dst], g)
    }
}
