//! burn-wgpu on memlayer's own wgpu device: one device shared by burn's
//! tensors and memlayer's raw-wgpu kernels (`memlayer-wgpu`).

use burn::tensor::Device;
use burn::tensor::wgpu::WgpuSetup;
use memlayer_wgpu::GpuContext;

/// Registers `ctx`'s adapter, device and queue with burn's wgpu runtime and
/// returns the burn device on it. Register a context once per process, then
/// clone the returned device.
///
/// The context must have been created with `GpuOptions::adapter_features`:
/// burn's kernel compiler assumes every feature the adapter offers.
pub fn burn_device(ctx: &GpuContext) -> Result<Device, String> {
    let missing = ctx
        .adapter
        .features()
        .difference(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS)
        .difference(ctx.device.features());
    if !missing.is_empty() {
        return Err(format!(
            "the device on {} lacks adapter features {missing:?}: create it with GpuOptions::adapter_features",
            ctx.info.name
        ));
    }
    let setup = WgpuSetup {
        // cubecl keeps the instance only to hold it alive; the adapter was
        // enumerated by memlayer-wgpu's own instance.
        instance: wgpu::Instance::new(
            wgpu::InstanceDescriptor::new_without_display_handle_from_env(),
        ),
        adapter: ctx.adapter.clone(),
        device: ctx.device.clone(),
        queue: ctx.queue.clone(),
        backend: ctx.info.backend,
    };
    Device::wgpu_options()
        .setup(setup)
        .init()
        .map_err(|e| format!("burn-wgpu on {}: {e}", ctx.info.name))
}
