//! Opening a model: the device of a [`Backend`] ([`device_for`] for
//! training, [`runtime_device`] for inference) and a model directory ready
//! to generate with its memory paged per [`MemoryArgs`] ([`open_model`]), or
//! with none when the model has no memory layers.

use crate::args::{Backend, MemoryArgs, OpsChoice};
use crate::source::Source;
use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use memlayer_core::model::ModelConfig;
use memlayer_model::MemoryOps;
use memlayer_runtime::open::{RuntimeBackend, RuntimeDevice};
use memlayer_runtime::paged::{PagedMemory, PagedOptions, PoolDevice};
use memlayer_runtime::{BurnDecoder, Generator};
use std::path::Path;
use std::sync::Arc;

/// Device and memory ops of a backend choice (training, evaluation).
pub fn device_for(backend: Backend, ops: OpsChoice) -> Result<(Device, MemoryOps)> {
    let device = match backend {
        Backend::Cpu => Device::flex(),
        Backend::Wgpu => Device::wgpu(burn::tensor::DeviceKind::DefaultDevice),
        #[cfg(feature = "cuda")]
        Backend::Cuda => bail!(
            "training on CUDA is not built yet: memlayer-cuda has the memory ops' kernels \
             (forward, backward, selection from scores), but burn's CUDA backend, which would \
             run the dense part, cannot be built where memlayer is built (cubecl-cuda downloads \
             an LLVM bundle at build time; docs/ARCHITECTURE.md, memlayer-cuda); use --backend \
             cpu or wgpu (--backend cuda runs generate, chat, demo and bench paged)"
        ),
    };
    let ops = match ops {
        OpsChoice::Auto => MemoryOps::best_for(&device),
        OpsChoice::Portable => MemoryOps::Portable,
        OpsChoice::Native => {
            if !memlayer_model::ops::native::supported(&device) {
                bail!("--ops native is not available on the {backend:?} backend");
            }
            MemoryOps::Native
        }
    };
    Ok((device, ops))
}

/// Device, ops and page-pool placement of a backend (wgpu: one shared
/// device): the runtime's [`RuntimeDevice`].
pub fn runtime_device(backend: Backend) -> Result<(Device, MemoryOps, PoolDevice)> {
    let backend = match backend {
        Backend::Cpu => RuntimeBackend::Cpu,
        Backend::Wgpu => RuntimeBackend::Wgpu,
        #[cfg(feature = "cuda")]
        Backend::Cuda => RuntimeBackend::Cuda,
    };
    let rt = RuntimeDevice::open(backend)?;
    Ok((rt.device, rt.ops, rt.pool))
}

/// A model directory opened for generation.
pub struct Opened {
    pub generator: Generator<BurnDecoder>,
    /// The paged memory; `None` for a model without memory layers.
    pub memory: Option<Arc<PagedMemory>>,
    /// Bytes of the bank when fully resident (f32); 0 without memory layers.
    pub bank_bytes: u64,
}

/// A model directory opened with paged memory (a model that has memory layers).
pub struct OpenedPaged {
    pub generator: Generator<BurnDecoder>,
    pub memory: Arc<PagedMemory>,
    /// Bytes of the bank when fully resident (f32).
    pub bank_bytes: u64,
}

/// Whether the model of `dir` has memory layers (`config.json` has `pkm` or
/// `hier`), i.e. a bank to page.
///
/// A `config.json` that cannot be read or is out of bounds is named by the
/// directory's own check (the error `generate` gives for it).
pub fn has_memory_layers(dir: &Path) -> Result<bool> {
    if let Some(has) = config_has_memory_layers(dir) {
        return Ok(has);
    }
    let m = memlayer_model_dir::dir::load_dense(dir)
        .map_err(|e| anyhow::Error::msg(e.to_string()))
        .with_context(|| format!("opening {}", dir.display()))?;
    Ok(memory_layers(&m.config))
}

/// [`has_memory_layers`] from `config.json` alone; `None` when it cannot
/// be read or is out of bounds.
pub fn config_has_memory_layers(dir: &Path) -> Option<bool> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let config = ModelConfig::from_json(&text).ok()?;
    Some(memory_layers(&config))
}

fn memory_layers(config: &ModelConfig) -> bool {
    config.pkm.is_some() || config.hier.is_some()
}

/// Opens `dir` with its memory paged per `args` (`prefetch`: reserve block
/// prefetch). A model without memory layers opens with no memory: the
/// budget and fetch threads do not apply, and a `--source` other than
/// `file` is refused (there is no bank to read).
pub fn open_model(dir: &Path, args: &MemoryArgs, prefetch: bool) -> Result<Opened> {
    let memory_layers = has_memory_layers(dir)?;
    if !memory_layers && args.source != Source::ModelDir {
        bail!(
            "--source {}: {} has no memory layers (its config.json has neither `pkm` nor \
             `hier`), so there is no bank to read; leave --source out",
            args.source,
            dir.display()
        );
    }
    let (device, ops, pool) = runtime_device(args.backend)?;
    let opts = PagedOptions {
        budget: args.budget.0,
        fetch_threads: args.fetch_threads(),
        prefetch,
        device: pool,
    };
    // the runtime opens the bank once: checks it against the directory and
    // resolves a percent budget against its size
    let source = if memory_layers {
        Some(args.source.open(dir)?)
    } else {
        None
    };
    let (generator, memory) = memlayer_runtime::open_paged(dir, source, opts, &device, ops)
        .with_context(|| format!("opening {}", dir.display()))?;
    let bank_bytes = memory.as_ref().map_or(0, |m| m.bank_bytes());
    Ok(Opened {
        generator,
        memory,
        bank_bytes,
    })
}

/// [`open_model`] for a command that pages memory (`demo`, `bench paged`):
/// a model without memory layers is refused, naming `command`.
pub fn open_paged(
    dir: &Path,
    args: &MemoryArgs,
    prefetch: bool,
    command: &str,
) -> Result<OpenedPaged> {
    let o = open_model(dir, args, prefetch)?;
    let Some(memory) = o.memory else {
        bail!("{}", no_memory_layers(dir, command));
    };
    Ok(OpenedPaged {
        generator: o.generator,
        memory,
        bank_bytes: o.bank_bytes,
    })
}

/// Refuses `dir` for `command` (one that compares paged memory with the
/// resident model) when its model has no memory layers.
pub fn require_memory_layers(dir: &Path, command: &str) -> Result<()> {
    if !has_memory_layers(dir)? {
        bail!("{}", no_memory_layers(dir, command));
    }
    Ok(())
}

fn no_memory_layers(dir: &Path, command: &str) -> String {
    format!(
        "{} has no memory layers (its config.json has neither `pkm` nor `hier`): `memlayer \
         {command}` measures paged memory; run the model with `memlayer generate` or `memlayer \
         chat`",
        dir.display()
    )
}
