//! The device's copy bandwidth: what the bag's GB/s are a fraction of.

use crate::device::CudaDevice;
use crate::{CudaError, kernels};
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// Copy bandwidth in GB/s (bytes read + written per second) of a
/// `bytes`-byte f32 copy kernel, the best of `reps` timed runs after a warm-up.
pub fn copy_gbps(dev: &CudaDevice, bytes: usize, reps: usize) -> Result<f64, CudaError> {
    let n4 = (bytes / 16).max(1);
    let src = dev.zeros::<f32>("copy source", n4 * 4)?;
    let mut dst = dev.zeros::<f32>("copy destination", n4 * 4)?;
    let f = dev.function(&kernels::BAG_FORWARD, "copy_f32x4")?;
    let n = n4 as u64;
    let cfg = LaunchConfig {
        grid_dim: (
            u32::try_from(n.div_ceil(256))
                .unwrap_or(u32::MAX)
                .min(65_535 * 8),
            1,
            1,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut best = f64::INFINITY;
    for rep in 0..=reps.max(1) {
        let t0 = std::time::Instant::now();
        let mut launch = dev.stream().launch_builder(&f);
        launch.arg(&src).arg(&mut dst).arg(&n);
        // SAFETY: both buffers hold n4 float4s.
        unsafe { launch.launch(cfg) }.map_err(|e| CudaError::driver("launching copy_f32x4", e))?;
        dev.synchronize()?;
        if rep > 0 {
            best = best.min(t0.elapsed().as_secs_f64());
        }
    }
    Ok(2.0 * (n4 * 16) as f64 / best / 1e9)
}
