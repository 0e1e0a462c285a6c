//! The device: a CUDA context, its stream and the loaded kernels.

use crate::CudaError;
use crate::kernels::{self, KernelSource};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream};
use memlayer_bank::Dtype;
use std::collections::HashMap;
use std::sync::Arc;

/// One NVIDIA GPU: its context, the stream every op runs on, and its
/// kernels (compiled for its architecture on first use, then cached).
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: &'static str,
    name: String,
    functions: std::sync::Mutex<HashMap<&'static str, CudaFunction>>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("name", &self.name)
            .field("arch", &self.arch)
            .finish()
    }
}

impl CudaDevice {
    /// GPU `ordinal`: fails with a named error (never a panic) when the
    /// driver, NVRTC or the GPU is missing or its architecture is older
    /// than the kernels need.
    pub fn new(ordinal: usize) -> Result<Self, CudaError> {
        // SAFETY: only tries to open the libraries by their candidate names.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(CudaError::NoDriver);
        }
        if !kernels::nvrtc_available() {
            return Err(CudaError::NoNvrtc);
        }
        let count = CudaContext::device_count()
            .map_err(|e| CudaError::driver("counting CUDA devices", e))?;
        if ordinal >= count.max(0) as usize {
            return Err(CudaError::NoDevice {
                ordinal,
                count: count.max(0) as usize,
            });
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| CudaError::driver(format!("creating a context on GPU {ordinal}"), e))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| CudaError::driver("reading the compute capability", e))?;
        let arch = kernels::arch_of(major, minor)?;
        let name = ctx
            .name()
            .map_err(|e| CudaError::driver("reading the device name", e))?;
        let stream = ctx.default_stream();
        Ok(Self {
            ctx,
            stream,
            arch,
            name,
            functions: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// The device's name (e.g. "NVIDIA H100 80GB HBM3").
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The architecture the kernels are compiled for (`compute_90`, ...).
    pub fn arch(&self) -> &'static str {
        self.arch
    }

    /// The stream every op is enqueued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Kernel `function` of `source`, compiled and loaded on first use.
    pub(crate) fn function(
        &self,
        source: &KernelSource,
        function: &'static str,
    ) -> Result<CudaFunction, CudaError> {
        let mut cache = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = cache.get(function) {
            return Ok(f.clone());
        }
        let ptx = kernels::compile(source, self.arch)?;
        let module = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
            .map_err(|e| CudaError::driver(format!("loading {}", source.name), e))?;
        for &name in source.functions {
            let f = module
                .load_function(name)
                .map_err(|e| CudaError::driver(format!("finding {name} in {}", source.name), e))?;
            cache.insert(name, f);
        }
        cache.get(function).cloned().ok_or_else(|| {
            CudaError::Unsupported(format!("{} defines no kernel {function}", source.name))
        })
    }

    /// Copies `data` to the device.
    pub(crate) fn upload<T: cudarc::driver::DeviceRepr>(
        &self,
        what: &str,
        data: &[T],
    ) -> Result<CudaSlice<T>, CudaError> {
        self.stream
            .clone_htod(data)
            .map_err(|e| CudaError::driver(format!("copying {what} to the GPU"), e))
    }

    /// A zeroed device buffer of `n` elements.
    pub(crate) fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        what: &str,
        n: usize,
    ) -> Result<CudaSlice<T>, CudaError> {
        self.stream
            .alloc_zeros(n.max(1))
            .map_err(|e| CudaError::driver(format!("allocating {what} ({n} elements)"), e))
    }

    /// Copies `buf` back to the host (waits for the stream).
    pub(crate) fn download<T: cudarc::driver::DeviceRepr>(
        &self,
        what: &str,
        buf: &CudaSlice<T>,
        n: usize,
    ) -> Result<Vec<T>, CudaError> {
        let mut v = self
            .stream
            .clone_dtoh(buf)
            .map_err(|e| CudaError::driver(format!("copying {what} back"), e))?;
        v.truncate(n);
        Ok(v)
    }

    /// Waits for every op enqueued so far.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream
            .synchronize()
            .map_err(|e| CudaError::driver("synchronizing the stream", e))
    }
}

/// A table on the device in its storage dtype (f32, f16 or bf16): the
/// value rows a bag reads, widened to f32 in the kernel.
pub struct DeviceTable {
    /// The bytes: (rows, dim) elements of `dtype`.
    pub(crate) data: CudaSlice<u8>,
    /// Rows.
    pub rows: usize,
    /// Values per row.
    pub dim: usize,
    /// Storage dtype.
    pub dtype: Dtype,
}

impl DeviceTable {
    /// `table` (rows, dim) f32 stored on `dev` as `dtype` (rounded to
    /// nearest even for f16/bf16, as the bank codec does).
    pub fn upload(
        dev: &CudaDevice,
        table: &[f32],
        rows: usize,
        dim: usize,
        dtype: Dtype,
    ) -> Result<Self, CudaError> {
        memlayer_core::error::check_len("table", table, &[rows, dim])?;
        let bytes = memlayer_bank::encode(dtype, table);
        Ok(Self {
            data: dev.upload("a table", &bytes)?,
            rows,
            dim,
            dtype,
        })
    }

    /// Bytes on the device.
    pub fn bytes(&self) -> usize {
        self.rows * self.dim * self.dtype.size()
    }
}

/// The first GPU for tests, or `None` after a loud message; a failure under
/// `MEMLAYER_REQUIRE_CUDA=1` (the GPU script sets it).
pub fn cuda_for_tests() -> Option<CudaDevice> {
    match CudaDevice::new(0) {
        Ok(d) => Some(d),
        Err(e) => {
            assert!(
                std::env::var("MEMLAYER_REQUIRE_CUDA").as_deref() != Ok("1"),
                "MEMLAYER_REQUIRE_CUDA=1 but no CUDA device: {e}"
            );
            eprintln!("\n!!!!!!!! SKIPPING A CUDA TEST: {e} !!!!!!!!\n");
            None
        }
    }
}
