//! The errors of the CUDA path.

use memlayer_core::error::OracleError;

/// Why a CUDA op could not run; every message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// The CUDA driver library (`libcuda.so`) is not on this machine.
    #[error(
        "no CUDA driver: libcuda.so was not found (install the NVIDIA driver, or run on a machine \
         with an NVIDIA GPU)"
    )]
    NoDriver,
    /// NVRTC (`libnvrtc.so`) is not loadable.
    #[error(
        "no NVRTC: libnvrtc.so was not found; install it (`pip install nvidia-cuda-nvrtc-cu12`) and \
         put its lib directory (site-packages/nvidia/cuda_nvrtc/lib) on LD_LIBRARY_PATH"
    )]
    NoNvrtc,
    /// The driver reports no GPU with this ordinal.
    #[error("no CUDA device {ordinal}: the driver reports {count}")]
    NoDevice {
        /// The ordinal asked for.
        ordinal: usize,
        /// Devices present.
        count: usize,
    },
    /// A kernel did not compile.
    #[error("NVRTC could not compile {kernel} for {arch}: {log}")]
    Compile {
        /// The kernel source's name.
        kernel: &'static str,
        /// The target architecture (`compute_90`, ...).
        arch: String,
        /// NVRTC's log.
        log: String,
    },
    /// A driver call failed.
    #[error("CUDA driver error while {what}: {message}")]
    Driver {
        /// What was being done.
        what: String,
        /// The driver's error.
        message: String,
    },
    /// The op does not support this shape on CUDA (the limit is named).
    #[error("{0}")]
    Unsupported(String),
    /// Shapes or indices rejected by the oracle's checks.
    #[error(transparent)]
    Oracle(#[from] OracleError),
}

impl CudaError {
    /// A driver error while doing `what`.
    pub(crate) fn driver(what: impl Into<String>, e: impl std::fmt::Debug) -> Self {
        Self::Driver {
            what: what.into(),
            message: format!("{e:?}"),
        }
    }
}
