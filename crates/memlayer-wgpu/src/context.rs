//! Device setup: adapter choice, limits, errors.

use std::fmt;

/// Errors of the GPU runtime.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// No adapter matched the request.
    #[error("no wgpu adapter found{0}")]
    NoAdapter(String),
    /// The adapter refused the device request.
    #[error("device request failed on {adapter}: {source}")]
    RequestDevice {
        /// Name of the adapter that refused.
        adapter: String,
        /// The error wgpu returned.
        source: wgpu::RequestDeviceError,
    },
    /// A wgpu validation or out-of-memory error, with what was being done.
    #[error("wgpu error while {context}: {message}")]
    Wgpu {
        /// What was being done when the error was captured.
        context: String,
        /// The wgpu error message.
        message: String,
    },
    /// Reading a buffer back failed.
    #[error("buffer read-back failed: {0}")]
    ReadBack(String),
    /// An argument does not fit the kernel (shape, size, limits).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// An error from the CPU-side oracle checks (shapes, indices).
    #[error(transparent)]
    Oracle(#[from] memlayer_core::error::OracleError),
}

/// How to choose and configure the device.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Pick the first adapter whose `name`, `driver` or backend contains this
    /// (case-insensitive); also read from `MEMLAYER_ADAPTER` by [`gpu_for_tests`].
    pub adapter_filter: Option<String>,
    /// Force a smaller storage-binding size than the adapter allows (bytes).
    /// The device is *created* with this limit, so wgpu validates it: used to
    /// test that tables are sharded rather than assumed to fit one binding.
    pub max_binding_bytes: Option<u64>,
    /// Create the device with WebGPU's default limits (`wgpu::Limits::default()`:
    /// 16 KiB workgroup storage, 8 storage buffers per stage, 128 MiB bindings)
    /// instead of the adapter's: proves kernels run in any browser.
    pub webgpu_default_limits: bool,
    /// Enable every feature the adapter offers (except mappable primary
    /// buffers). Needed when the device is shared with burn-wgpu, whose
    /// compiler assumes the adapter's features (e.g. 64-bit integers).
    pub adapter_features: bool,
}

/// An adapter, its device and queue, and the limits kernels size themselves by.
#[derive(Clone)]
pub struct GpuContext {
    /// The adapter the device was created on.
    pub adapter: wgpu::Adapter,
    /// The device (limits = the adapter's, or smaller when forced).
    pub device: wgpu::Device,
    /// The queue of `device`.
    pub queue: wgpu::Queue,
    /// Adapter name, backend, driver.
    pub info: wgpu::AdapterInfo,
    /// The limits the device was created with.
    pub limits: wgpu::Limits,
}

impl fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GpuContext")
            .field("adapter", &self.info.name)
            .field("backend", &self.info.backend)
            .field("driver", &self.info.driver)
            .finish()
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn instance() -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env())
}

/// Whether the adapter's name, driver or backend contains `filter` (case-insensitive).
pub fn adapter_matches(info: &wgpu::AdapterInfo, filter: &str) -> bool {
    let f = filter.to_lowercase();
    info.name.to_lowercase().contains(&f)
        || info.driver.to_lowercase().contains(&f)
        || format!("{:?}", info.backend).to_lowercase().contains(&f)
}

impl GpuContext {
    /// All adapters wgpu can see on this machine (natively).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn adapters() -> Vec<wgpu::Adapter> {
        pollster::block_on(instance().enumerate_adapters(wgpu::Backends::all()))
    }

    /// Opens a device on the chosen adapter (blocking; native only).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new(opts: &GpuOptions) -> Result<Self, GpuError> {
        let adapters = Self::adapters();
        let adapter = match &opts.adapter_filter {
            Some(f) => adapters
                .into_iter()
                .find(|a| adapter_matches(&a.get_info(), f))
                .ok_or_else(|| GpuError::NoAdapter(format!(" matching {f:?}")))?,
            None => {
                // Prefer Vulkan/Metal/DX12 over GL, discrete over integrated over CPU.
                let rank = |a: &wgpu::Adapter| {
                    let i = a.get_info();
                    let backend = match i.backend {
                        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
                        _ => 1,
                    };
                    let kind = match i.device_type {
                        wgpu::DeviceType::DiscreteGpu => 0,
                        wgpu::DeviceType::IntegratedGpu => 1,
                        wgpu::DeviceType::VirtualGpu => 2,
                        _ => 3,
                    };
                    (backend, kind)
                };
                adapters
                    .into_iter()
                    .min_by_key(rank)
                    .ok_or_else(|| GpuError::NoAdapter(String::new()))?
            }
        };
        pollster::block_on(Self::from_adapter(adapter, opts))
    }

    /// Opens a device on `adapter` with the adapter's own limits (never above
    /// them), lowered to `opts.max_binding_bytes` if given.
    pub async fn from_adapter(adapter: wgpu::Adapter, opts: &GpuOptions) -> Result<Self, GpuError> {
        let info = adapter.get_info();
        let mut limits = if opts.webgpu_default_limits {
            wgpu::Limits::default()
        } else {
            adapter.limits()
        };
        if let Some(max) = opts.max_binding_bytes {
            let max = max.min(limits.max_storage_buffer_binding_size);
            limits.max_storage_buffer_binding_size = max;
        }
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("memlayer"),
                required_features: if opts.adapter_features {
                    adapter
                        .features()
                        .difference(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS)
                } else {
                    wgpu::Features::empty()
                },
                required_limits: limits.clone(),
                ..Default::default()
            })
            .await
            .map_err(|source| GpuError::RequestDevice {
                adapter: info.name.clone(),
                source,
            })?;
        Ok(Self {
            adapter,
            device,
            queue,
            info,
            limits,
        })
    }

    /// The context of a device opened elsewhere (a window's, so that the
    /// memory kernels and the UI share it): its limits are the device's.
    pub fn from_parts(adapter: wgpu::Adapter, device: wgpu::Device, queue: wgpu::Queue) -> Self {
        let info = adapter.get_info();
        let limits = device.limits();
        Self {
            adapter,
            device,
            queue,
            info,
            limits,
        }
    }

    /// A short stable name for reports, e.g. `wgpu_vulkan_llvmpipe`.
    pub fn name(&self) -> String {
        let backend = format!("{:?}", self.info.backend).to_lowercase();
        let first = self
            .info
            .name
            .split(|c: char| !c.is_ascii_alphanumeric())
            .find(|s| !s.is_empty())
            .unwrap_or("unknown")
            .to_lowercase();
        format!("wgpu_{backend}_{first}")
    }

    /// Largest storage buffer one binding (and one buffer) may hold, in bytes.
    pub fn max_binding_bytes(&self) -> u64 {
        self.limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size)
    }

    /// Runs `f` inside a validation + out-of-memory error scope and turns a
    /// captured error into [`GpuError::Wgpu`] naming `context`.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn scoped<T>(&self, context: &str, f: impl FnOnce() -> T) -> Result<T, GpuError> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let out = f();
        let v = pollster::block_on(validation.pop());
        let o = pollster::block_on(oom.pop());
        match v.or(o) {
            None => Ok(out),
            Some(e) => Err(GpuError::Wgpu {
                context: context.to_string(),
                message: e.to_string(),
            }),
        }
    }

    /// On the web error scopes resolve asynchronously: `f` runs unscoped and
    /// errors reach the device's uncaptured-error handler.
    #[cfg(target_arch = "wasm32")]
    pub fn scoped<T>(&self, _context: &str, f: impl FnOnce() -> T) -> Result<T, GpuError> {
        Ok(f())
    }

    /// Blocks until all submitted work is done.
    pub fn wait(&self) -> Result<(), GpuError> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| GpuError::ReadBack(e.to_string()))
    }
}

/// The device for a test. With `MEMLAYER_REQUIRE_GPU=1` (set in CI) a missing
/// adapter is a test failure (panic); otherwise the test is skipped with a
/// loud message. `MEMLAYER_ADAPTER` picks an adapter by name/driver/backend.
#[cfg(not(target_arch = "wasm32"))]
pub fn gpu_for_tests(opts: GpuOptions) -> Option<GpuContext> {
    let mut opts = opts;
    if opts.adapter_filter.is_none() {
        opts.adapter_filter = std::env::var("MEMLAYER_ADAPTER")
            .ok()
            .filter(|s| !s.is_empty());
    }
    let required = std::env::var("MEMLAYER_REQUIRE_GPU").is_ok_and(|v| v == "1");
    match GpuContext::new(&opts) {
        Ok(ctx) => Some(ctx),
        Err(e) if required => panic!(
            "MEMLAYER_REQUIRE_GPU=1 but no usable GPU adapter: {e}. Install a Vulkan driver \
             (Debian: mesa-vulkan-drivers for lavapipe)."
        ),
        Err(e) => {
            eprintln!(
                "\n!!!!!!!! SKIPPING GPU TEST: no usable wgpu adapter ({e}). Set \
                 MEMLAYER_REQUIRE_GPU=1 to make this a failure. !!!!!!!!\n"
            );
            None
        }
    }
}
