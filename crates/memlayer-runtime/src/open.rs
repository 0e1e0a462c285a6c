//! What every front-end asks before [`crate::open_paged`]: where the bank is
//! read from ([`BankLocation`]: the directory's file, a path or a URL) and
//! which device runs the model and holds the pages ([`RuntimeBackend`] →
//! [`RuntimeDevice`]). Written once for the CLI, the C ABI and the desktop
//! app; each maps its own flags or options onto these.

use crate::paged::PoolDevice;
use burn::tensor::Device;
use memlayer_bank::{FileSource, PageSource};
use memlayer_model::{MemoryOps, ModelError};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Where a model's memory bank is read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BankLocation {
    /// `file`: the model directory's own `memory.bank`.
    ModelDir,
    /// A local bank file.
    Path(PathBuf),
    /// An http(s):// URL (scheme in any case), read with Range requests.
    Url(String),
}

impl FromStr for BankLocation {
    type Err = String;

    /// `file`, a path, or a URL. A URL scheme is matched without regard to
    /// case (`HTTP://` is a URL); any scheme other than http and https is
    /// refused by name instead of being taken for a path.
    fn from_str(source: &str) -> Result<Self, String> {
        if source == "file" {
            return Ok(Self::ModelDir);
        }
        if source.is_empty() {
            return Err(
                "an empty source (give `file`, a bank's path or an http(s):// URL)".to_owned(),
            );
        }
        if let Some((scheme, _)) = source.split_once("://") {
            let is_scheme = scheme
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
            if is_scheme {
                if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https") {
                    return Ok(Self::Url(source.to_owned()));
                }
                return Err(format!(
                    "unsupported URL scheme {scheme}:// (a bank is read from a file path or an \
                     http:// or https:// URL)"
                ));
            }
        }
        Ok(Self::Path(PathBuf::from(source)))
    }
}

/// As it was given: `file`, the path, or the URL.
impl fmt::Display for BankLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ModelDir => f.write_str("file"),
            Self::Path(p) => write!(f, "{}", p.display()),
            Self::Url(u) => f.write_str(u),
        }
    }
}

/// Why a bank's source could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenSourceError {
    /// The file or URL could not be opened (the message names it).
    #[error("{0}")]
    Open(String),
    /// A URL, in a build without the `http` feature.
    #[error("{0}: this build reads no URLs (built without the `http` feature)")]
    NoHttp(String),
}

impl From<OpenSourceError> for ModelError {
    fn from(e: OpenSourceError) -> Self {
        ModelError::Input(e.to_string())
    }
}

impl BankLocation {
    /// Whether pages come over the network.
    pub fn is_remote(&self) -> bool {
        matches!(self, Self::Url(_))
    }

    /// Opens the page source; `dir` is the model directory ([`BankLocation::ModelDir`]).
    pub fn open(&self, dir: &Path) -> Result<Box<dyn PageSource>, OpenSourceError> {
        match self {
            Self::Url(url) => open_url(url),
            Self::ModelDir => open_file(&dir.join("memory.bank")),
            Self::Path(path) => open_file(path),
        }
    }
}

#[cfg(feature = "http")]
fn open_url(url: &str) -> Result<Box<dyn PageSource>, OpenSourceError> {
    let s = memlayer_http::HttpSource::open(url)
        .map_err(|e| OpenSourceError::Open(format!("opening the bank at {url}: {e}")))?;
    Ok(Box::new(s))
}

#[cfg(not(feature = "http"))]
fn open_url(url: &str) -> Result<Box<dyn PageSource>, OpenSourceError> {
    Err(OpenSourceError::NoHttp(url.to_owned()))
}

fn open_file(path: &Path) -> Result<Box<dyn PageSource>, OpenSourceError> {
    let s = FileSource::open(path)
        .map_err(|e| OpenSourceError::Open(format!("opening {}: {e}", path.display())))?;
    Ok(Box::new(s))
}

/// Which device runs the model and holds the resident pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuntimeBackend {
    /// burn's CPU backend; pages in host memory, summed by memlayer-cpu.
    Cpu,
    /// burn's wgpu backend and page slots on one wgpu device.
    Wgpu,
    /// Page slots on an NVIDIA GPU (memlayer-cuda), the dense part on the CPU.
    #[cfg(feature = "cuda")]
    Cuda,
}

/// The device, memory ops and page placement of a [`RuntimeBackend`]:
/// what [`crate::open_paged`] takes.
pub struct RuntimeDevice {
    /// The burn device the dense model runs on.
    pub device: Device,
    /// The memory ops for that device.
    pub ops: MemoryOps,
    /// Where the resident pages live.
    pub pool: PoolDevice,
}

/// Why a backend could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// No usable adapter or device (the message says what to install).
    #[error("{0}")]
    Unavailable(String),
    /// The backend is not in this build.
    #[error("{0}")]
    NotBuilt(String),
}

impl From<BackendError> for ModelError {
    fn from(e: BackendError) -> Self {
        ModelError::Input(e.to_string())
    }
}

impl RuntimeDevice {
    /// Opens `backend`: for wgpu, a device on the preferred adapter with its
    /// own features and limits (the burn model and the page slots share it).
    pub fn open(backend: RuntimeBackend) -> Result<Self, BackendError> {
        match backend {
            RuntimeBackend::Cpu => {
                let device = Device::flex();
                let ops = MemoryOps::best_for(&device);
                Ok(Self {
                    device,
                    ops,
                    pool: PoolDevice::Host,
                })
            }
            RuntimeBackend::Wgpu => Self::open_wgpu(),
            #[cfg(feature = "cuda")]
            RuntimeBackend::Cuda => {
                let dev = memlayer_cuda::CudaDevice::new(0)
                    .map_err(|e| BackendError::Unavailable(format!("--backend cuda: {e}")))?;
                let device = Device::flex();
                let ops = MemoryOps::best_for(&device);
                Ok(Self {
                    device,
                    ops,
                    pool: PoolDevice::Cuda(std::sync::Arc::new(dev)),
                })
            }
        }
    }

    #[cfg(feature = "wgpu")]
    fn open_wgpu() -> Result<Self, BackendError> {
        let ctx = memlayer_wgpu::GpuContext::new(&memlayer_wgpu::GpuOptions {
            adapter_features: true,
            ..Default::default()
        })
        .map_err(|e| {
            BackendError::Unavailable(format!(
                "no wgpu adapter ({e}): install a Vulkan/Metal/DX12 driver (on Debian: \
                 mesa-vulkan-drivers)"
            ))
        })?;
        Self::on_wgpu(ctx)
    }

    #[cfg(not(feature = "wgpu"))]
    fn open_wgpu() -> Result<Self, BackendError> {
        Err(BackendError::NotBuilt(
            "the wgpu backend: this build has none (built without the `wgpu` feature)".into(),
        ))
    }

    /// The wgpu backend on an existing device (a window's, so that the
    /// model, the page slots and the UI share one device). The device must
    /// have its adapter's features ([`memlayer_model::gpu::burn_device`]).
    #[cfg(feature = "wgpu")]
    pub fn on_wgpu(ctx: memlayer_wgpu::GpuContext) -> Result<Self, BackendError> {
        let device = memlayer_model::gpu::burn_device(&ctx).map_err(BackendError::Unavailable)?;
        let ops = MemoryOps::best_for(&device);
        Ok(Self {
            device,
            ops,
            pool: PoolDevice::Wgpu(std::sync::Arc::new(ctx)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::BankLocation;

    #[test]
    fn locations_parse_by_scheme_not_by_prefix() {
        let p = |s: &str| s.parse::<BankLocation>();
        assert_eq!(p("file"), Ok(BankLocation::ModelDir));
        assert_eq!(
            p("http://h/m.bank"),
            Ok(BankLocation::Url("http://h/m.bank".into()))
        );
        assert_eq!(
            p("HtTpS://h/m.bank"),
            Ok(BankLocation::Url("HtTpS://h/m.bank".into()))
        );
        // a file whose name starts with "http" is a path
        assert_eq!(
            p("httpdocs/m.bank"),
            Ok(BankLocation::Path("httpdocs/m.bank".into()))
        );
        assert_eq!(p("./http:/x"), Ok(BankLocation::Path("./http:/x".into())));
        // "://" after something that is not a scheme: a path
        assert_eq!(p("a b://c"), Ok(BankLocation::Path("a b://c".into())));
        assert_eq!(p("1x://c"), Ok(BankLocation::Path("1x://c".into())));
        for bad in ["ftp://h/b", "file://h/b", "gopher://x/y", "s3://b/k"] {
            let e = p(bad).unwrap_err();
            assert!(e.starts_with("unsupported URL scheme "), "{bad}: {e}");
        }
        assert!(p("").is_err());
        for s in ["file", "http://h/m.bank", "/x/m.bank"] {
            assert_eq!(p(s).unwrap().to_string(), s);
        }
    }
}
