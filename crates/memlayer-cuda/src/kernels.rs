//! The CUDA C sources, compiled at run time with NVRTC.
//!
//! Each kernel file sits beside its launcher ([`crate::lookup`],
//! [`crate::bag`]) and is compiled with `common.cuh` prepended (no CUDA
//! headers: the NVRTC of PyPI's `nvidia-cuda-nvrtc-cu12` alone compiles
//! them, which is how CI proves they compile without a GPU). The PTX is
//! cached under `$MEMLAYER_PTX_CACHE` (default `~/.cache/memlayer/ptx`), one
//! file per source, architecture and NVRTC version, named by a hash of the
//! source: a changed kernel is compiled again, never loaded stale.

use crate::CudaError;
use std::path::PathBuf;

/// Prepended to every kernel source.
pub const COMMON: &str = include_str!("common.cuh");

/// One CUDA C source and the kernels (`extern "C" __global__`) it defines.
#[derive(Clone, Copy, Debug)]
pub struct KernelSource {
    /// File name beside its launcher.
    pub name: &'static str,
    /// The source text (without [`COMMON`]).
    pub source: &'static str,
    /// Its kernels' names.
    pub functions: &'static [&'static str],
}

/// Product-key lookup ([`crate::lookup`]).
pub const LOOKUP: KernelSource = KernelSource {
    name: "lookup.cu",
    source: include_str!("lookup.cu"),
    functions: &["pk_norm_rows", "pk_lookup", "pk_select_scores"],
};

/// Embedding-bag forward and the copy probe ([`crate::bag`], [`crate::bandwidth`]).
pub const BAG_FORWARD: KernelSource = KernelSource {
    name: "bag_forward.cu",
    source: include_str!("bag_forward.cu"),
    functions: &[
        "bag_forward_f32",
        "bag_forward_f16",
        "bag_forward_bf16",
        "copy_f32x4",
    ],
};

/// Embedding-bag backward ([`crate::bag`]).
pub const BAG_BACKWARD: KernelSource = KernelSource {
    name: "bag_backward.cu",
    source: include_str!("bag_backward.cu"),
    functions: &[
        "bag_backward_table",
        "bag_backward_weights_f32",
        "bag_backward_weights_f16",
        "bag_backward_weights_bf16",
    ],
};

/// Every kernel source.
pub const ALL: [KernelSource; 3] = [LOOKUP, BAG_FORWARD, BAG_BACKWARD];

/// Whether NVRTC (`libnvrtc.so`) can be loaded.
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to open the library by its candidate names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// NVRTC's version (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    if !nvrtc_available() {
        return Err(CudaError::NoNvrtc);
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked above); two out-pointers.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    r.result()
        .map_err(|e| CudaError::driver("asking NVRTC for its version", e))?;
    Ok((major, minor))
}

/// The full text NVRTC compiles for `k`.
pub fn full_source(k: &KernelSource) -> String {
    format!("{COMMON}\n// ---- {} ----\n{}", k.name, k.source)
}

/// FNV-1a of `bytes` (names cached PTX by its source).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("MEMLAYER_PTX_CACHE") {
        return Some(PathBuf::from(d));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/memlayer/ptx"))
}

/// Compiles `k` to PTX for `arch` (`compute_80`, `compute_90`, ...) with
/// NVRTC, or reads it from the cache. Fails naming the kernel with NVRTC's
/// log when it does not compile.
pub fn compile(k: &KernelSource, arch: &'static str) -> Result<String, CudaError> {
    compile_cached(k, arch, cache_dir().as_deref())
}

/// [`compile`] with the PTX cached in `cache` (none: not cached).
pub fn compile_cached(
    k: &KernelSource,
    arch: &'static str,
    cache: Option<&std::path::Path>,
) -> Result<String, CudaError> {
    let (major, minor) = nvrtc_version()?;
    let src = full_source(k);
    let file = cache.map(|d| {
        d.join(format!(
            "{}-{arch}-nvrtc{major}.{minor}-{:016x}.ptx",
            k.name.trim_end_matches(".cu"),
            fnv1a(src.as_bytes())
        ))
    });
    if let Some(text) = file.as_ref().and_then(|f| std::fs::read_to_string(f).ok())
        && text.contains(".entry")
    {
        return Ok(text);
    }
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        name: Some(k.name.to_string()),
        // IEEE division and square root: the oracle's bits
        prec_div: Some(true),
        prec_sqrt: Some(true),
        ftz: Some(false),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(&src, opts).map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => CudaError::Compile {
            kernel: k.name,
            arch: arch.to_string(),
            log: log.to_string_lossy().into_owned(),
        },
        e => CudaError::Compile {
            kernel: k.name,
            arch: arch.to_string(),
            log: format!("{e:?}"),
        },
    })?;
    let text = ptx.to_src();
    if let Some(f) = file {
        // best effort: a cache that cannot be written only costs a compile
        if let Some(dir) = f.parent()
            && std::fs::create_dir_all(dir).is_ok()
        {
            let tmp = f.with_extension(format!("tmp.{}", std::process::id()));
            if std::fs::write(&tmp, &text).is_ok() {
                let _ = std::fs::rename(&tmp, &f);
            }
        }
    }
    Ok(text)
}

/// The `compute_XY` architecture of a device of compute capability (X, Y).
pub fn arch_of(major: i32, minor: i32) -> Result<&'static str, CudaError> {
    Ok(match (major, minor) {
        (7, 0) => "compute_70",
        (7, 5) => "compute_75",
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 9) => "compute_89",
        (9, 0) => "compute_90",
        (10, 0) => "compute_100",
        (12, 0) => "compute_120",
        (m, _) if m >= 8 => "compute_80",
        (m, n) => {
            return Err(CudaError::Unsupported(format!(
                "compute capability {m}.{n}: memlayer's CUDA kernels need 7.0 or newer"
            )));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NVRTC, or a loud skip (a failure under `MEMLAYER_REQUIRE_NVRTC=1`,
    /// which the test command sets after installing it).
    fn nvrtc_or_skip() -> bool {
        if nvrtc_available() {
            return true;
        }
        assert!(
            std::env::var("MEMLAYER_REQUIRE_NVRTC").as_deref() != Ok("1"),
            "MEMLAYER_REQUIRE_NVRTC=1 but {}",
            CudaError::NoNvrtc
        );
        eprintln!(
            "\n!!!!!!!! SKIPPING THE PTX COMPILE CHECK: {} !!!!!!!!\n",
            CudaError::NoNvrtc
        );
        false
    }

    /// Every kernel compiles to PTX for the GPUs memlayer targets (Ampere,
    /// Hopper) and defines the kernels its launcher loads. Needs NVRTC only
    /// (no driver, no GPU): this is CI's proof that the CUDA code compiles.
    #[test]
    fn every_kernel_compiles_to_ptx_for_ampere_and_hopper() {
        if !nvrtc_or_skip() {
            return;
        }
        // a fresh cache: this test compiles, it does not read old PTX
        let dir = std::env::temp_dir().join(format!("memlayer-ptx-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (major, minor) = nvrtc_version().expect("version");
        for arch in ["compute_80", "compute_90"] {
            for k in ALL {
                let ptx = compile_cached(&k, arch, Some(&dir)).unwrap_or_else(|e| panic!("{e}"));
                for f in k.functions {
                    assert!(
                        ptx.contains(&format!(".entry {f}(")),
                        "{} for {arch}: no kernel {f} in the PTX",
                        k.name
                    );
                }
                // the cache now answers the same text
                assert_eq!(compile_cached(&k, arch, Some(&dir)).expect("cached"), ptx);
            }
        }
        let cached = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
        assert_eq!(cached, 2 * ALL.len(), "one PTX file per source and arch");
        let _ = std::fs::remove_dir_all(&dir);
        eprintln!(
            "PTX: {} sources × 2 architectures compiled with NVRTC {major}.{minor}",
            ALL.len()
        );
    }

    #[test]
    fn a_kernel_that_does_not_compile_is_named_with_the_log() {
        if !nvrtc_or_skip() {
            return;
        }
        let bad = KernelSource {
            name: "broken.cu",
            source: "extern \"C\" __global__ void broken(float* x) { x[0] = undefined_name; }",
            functions: &["broken"],
        };
        let err = compile_cached(&bad, "compute_80", None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("broken.cu") && err.contains("undefined_name"),
            "{err}"
        );
    }
}
