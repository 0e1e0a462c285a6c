//! Backend discovery and the four memory ops on each backend, called the same
//! way by the parity pass and the speed pass.
//!
//! A backend is one implementation in one storage dtype: the CPU oracle
//! (`memlayer-core`, f32), the fast CPU path per ISA family this CPU runs and
//! per dtype (`cpu_fast_<family>_<dtype>`), every wgpu adapter per dtype
//! (`wgpu_<backend>_<adapter>_<dtype>`), the first CUDA GPU per dtype (feature
//! `cuda`), PyTorch CPU (the peer: speed of the bag forward only), and the
//! runtimes that decode and train end to end (`runtime_<device>`). What is not
//! there is listed too, with the reason.

use std::process::Command;
use std::rc::Rc;

use anyhow::{Result, anyhow, bail};
use half::{bf16, f16};
use memlayer_core::bag::{Bags, SparseRows};
use memlayer_core::pkm::{Lookup, PkmConfig};
use memlayer_cpu::simd::{self, Kernel};
use memlayer_cpu::storage::narrow;
use memlayer_cpu::{Cpu, DType, Table};
use memlayer_wgpu::backward::{BagBackward, LookupBackward};
use memlayer_wgpu::bag_forward::BagForward;
use memlayer_wgpu::context::adapter_matches;
use memlayer_wgpu::lookup::LookupKernels;
use memlayer_wgpu::{GpuContext, GpuDtype, GpuOptions, ShardedTable};
use serde_json::{Value, json};

use crate::args::Backend as RuntimeBackend;

/// Runs `$body` with `$t` bound to the host table (rows, dim) in its
/// storage type (the body is instantiated once per type: the CPU kernels are
/// generic over it).
macro_rules! on_host_table {
    ($data:expr, $rows:expr, $dim:expr, |$t:ident| $body:expr) => {
        match $data {
            TableData::F32(v) => {
                let $t = &Table::new(v, $rows, $dim)?;
                $body
            }
            TableData::F16(v) => {
                let $t = &Table::new(v, $rows, $dim)?;
                $body
            }
            TableData::Bf16(v) => {
                let $t = &Table::new(v, $rows, $dim)?;
                $body
            }
            #[allow(unreachable_patterns)]
            _ => bail!("the table is not on the host"),
        }
    };
}

/// Why an f16/bf16 entry has no lookup of its own.
pub(crate) const F32_ONLY: &str = "keys and queries are f32: measured on the backend's f32 entry";

/// The storage dtypes every table op runs in.
pub(crate) const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::Bf16];

/// The ops the runner checks and times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    /// Product-key search + softmax.
    Lookup,
    /// Embedding-bag forward.
    BagForward,
    /// Embedding-bag backward: the sparse table gradient and the per-sample weights' gradient.
    BagBackward,
    /// Softmax + score backward of the lookup: gradients of sub-keys and queries.
    LookupBackward,
}

impl Op {
    pub(crate) const ALL: [Op; 4] = [
        Op::Lookup,
        Op::BagForward,
        Op::BagBackward,
        Op::LookupBackward,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Op::Lookup => "lookup",
            Op::BagForward => "bag_forward",
            Op::BagBackward => "bag_backward",
            Op::LookupBackward => "lookup_backward",
        }
    }
}

/// One wgpu adapter's device with its kernels, built once and shared by the
/// adapter's dtype entries.
pub(crate) struct WgpuEngine {
    pub(crate) ctx: GpuContext,
    bag_forward: BagForward,
    bag_backward: BagBackward,
    lookup: LookupKernels,
    lookup_backward: LookupBackward,
}

impl WgpuEngine {
    fn new(ctx: GpuContext) -> Result<Self> {
        Ok(Self {
            bag_forward: BagForward::new(&ctx)?,
            bag_backward: BagBackward::new(&ctx)?,
            lookup: LookupKernels::new(&ctx)?,
            lookup_backward: LookupBackward::new(&ctx)?,
            ctx,
        })
    }
}

/// What runs a backend's ops.
pub(crate) enum Engine {
    /// `memlayer-core`: the reference every other backend is compared with.
    Oracle,
    /// `memlayer-cpu` with this kernel family forced.
    CpuFast(Kernel),
    Wgpu(Rc<WgpuEngine>),
    #[cfg(feature = "cuda")]
    Cuda(Rc<memlayer_cuda::CudaDevice>),
    /// PyTorch CPU through `scripts/bench_torch_bag.py`: speed of the bag forward only.
    Torch,
    /// WebGPU in headless Chromium: the lookup and bag forward of one shared session.
    Browser(Rc<super::browser::BrowserRun>),
    /// A runtime device for the end-to-end rows (decode, train step).
    Runtime(RuntimeBackend),
}

/// One backend: a name, what it is, and its engine or why it is absent.
pub(crate) struct Backend {
    /// e.g. `cpu_fast_avx512_f16`, `wgpu_vulkan_llvmpipe_f32`.
    pub(crate) name: String,
    /// `cpu_oracle`, `cpu_fast`, `wgpu`, `cuda`, `torch_cpu`, `webgpu_chromium`, `runtime`.
    pub(crate) kind: &'static str,
    /// Storage dtype of its tables (`None`: not a table backend).
    pub(crate) dtype: Option<DType>,
    /// Adapter, driver, ISA path, versions.
    pub(crate) info: Value,
    /// The engine, or the reason the backend is absent.
    pub(crate) engine: Result<Engine, String>,
}

impl Backend {
    pub(crate) fn present(
        name: String,
        kind: &'static str,
        dtype: Option<DType>,
        info: Value,
        engine: Engine,
    ) -> Self {
        Self {
            name,
            kind,
            dtype,
            info,
            engine: Ok(engine),
        }
    }

    /// The CPU oracle (`memlayer-core`, f32, one thread): the reference.
    pub(crate) fn oracle() -> Self {
        Self::present(
            "cpu_oracle".into(),
            "cpu_oracle",
            Some(DType::F32),
            json!({"crate": "memlayer-core", "threads": 1, "note": "the reference of every parity check"}),
            Engine::Oracle,
        )
    }

    pub(crate) fn absent(name: &str, kind: &'static str, info: Value, reason: String) -> Self {
        Self {
            name: name.to_string(),
            kind,
            dtype: None,
            info,
            engine: Err(reason),
        }
    }

    /// Whether the parity pass and kernel speed rows apply (not the peer, not a runtime).
    pub(crate) fn has_kernels(&self) -> bool {
        matches!(
            self.engine,
            Ok(Engine::Oracle | Engine::CpuFast(_) | Engine::Wgpu(_) | Engine::Browser(_))
        ) || self.is_cuda()
    }

    fn is_cuda(&self) -> bool {
        #[cfg(feature = "cuda")]
        return matches!(self.engine, Ok(Engine::Cuda(_)));
        #[cfg(not(feature = "cuda"))]
        false
    }

    /// Why `op` does not run on this backend, or `None` when it does. The
    /// lookup reads f32 keys and queries on every backend, so it runs on the
    /// f32 entry of each.
    pub(crate) fn lacks(&self, op: Op) -> Option<&'static str> {
        if !self.has_kernels() {
            return Some("no kernel ops (peer or runtime)");
        }
        match op {
            Op::Lookup | Op::LookupBackward if self.dtype != Some(DType::F32) => Some(F32_ONLY),
            Op::LookupBackward if self.is_cuda() => Some("not built in memlayer-cuda"),
            Op::BagBackward | Op::LookupBackward
                if matches!(self.engine, Ok(Engine::Browser(_))) =>
            {
                Some("not in the browser build: the backward host calls read back synchronously")
            }
            Op::BagBackward
                if self.dtype == Some(DType::Bf16)
                    && matches!(self.engine, Ok(Engine::Wgpu(_))) =>
            {
                Some("the WGSL per-sample-weight gradient reads f32 or f16 tables, not bf16")
            }
            _ => None,
        }
    }

    /// The backend's JSON description.
    pub(crate) fn json(&self) -> Value {
        json!({
            "name": self.name,
            "kind": self.kind,
            "dtype": self.dtype.map(DType::name),
            "present": self.engine.is_ok(),
            "absent_reason": self.engine.as_ref().err(),
            "info": match &self.engine {
                Ok(Engine::Browser(run)) if !run.device().is_null() => {
                    let mut info = self.info.clone();
                    info["session"] = run.device();
                    info
                }
                _ => self.info.clone(),
            },
        })
    }

    fn engine(&self) -> Result<&Engine> {
        self.engine
            .as_ref()
            .map_err(|reason| anyhow!("{} is absent: {reason}", self.name))
    }

    fn dtype(&self) -> DType {
        self.dtype.unwrap_or(DType::F32)
    }

    /// `table` (rows, dim) f32 stored the backend's way in its dtype.
    pub(crate) fn store(&self, table: &[f32], rows: usize, dim: usize) -> Result<StoredTable> {
        let data = match self.engine()? {
            Engine::Oracle => TableData::F32(table.to_vec()),
            Engine::CpuFast(_) => match self.dtype() {
                DType::F32 => TableData::F32(table.to_vec()),
                DType::F16 => TableData::F16(narrow::<f16>(table)),
                DType::Bf16 => TableData::Bf16(narrow::<bf16>(table)),
            },
            Engine::Wgpu(e) => TableData::Wgpu(ShardedTable::upload(
                &e.ctx,
                "values",
                table,
                rows,
                dim,
                gpu_dtype(self.dtype()),
            )?),
            #[cfg(feature = "cuda")]
            Engine::Cuda(dev) => TableData::Cuda(memlayer_cuda::DeviceTable::upload(
                dev,
                table,
                rows,
                dim,
                super::cuda::bank_dtype(self.dtype()),
            )?),
            Engine::Torch | Engine::Runtime(_) | Engine::Browser(_) => {
                bail!("{} has no host table ops", self.name)
            }
        };
        Ok(StoredTable { rows, dim, data })
    }

    /// Embedding-bag forward over `table` → (bags, dim).
    pub(crate) fn bag_forward(
        &self,
        cpu: &Cpu,
        table: &StoredTable,
        bags: &Bags<'_>,
    ) -> Result<Vec<f32>> {
        let (rows, dim) = (table.rows, table.dim);
        let (indices, weights, offsets) = (bags.indices, bags.weights, bags.offsets);
        Ok(match (self.engine()?, &table.data) {
            (Engine::Oracle, TableData::F32(t)) => {
                memlayer_core::bag::bag_forward(t, rows, dim, indices, weights, offsets)?
            }
            (Engine::CpuFast(k), data) => with_family(*k, || {
                on_host_table!(data, rows, dim, |t| {
                    let bag_count = offsets.len().saturating_sub(1);
                    // (bags, dim)
                    let mut out = vec![0.0f32; bag_count * dim];
                    cpu.bag_forward(t, indices, weights, offsets, &mut out)?;
                    Ok(out)
                })
            })?,
            (Engine::Wgpu(e), TableData::Wgpu(t)) => e
                .bag_forward
                .run_flat(&e.ctx, t, indices, weights, offsets)?,
            #[cfg(feature = "cuda")]
            (Engine::Cuda(dev), TableData::Cuda(t)) => {
                memlayer_cuda::bag::bag_forward(dev, t, bags)?
            }
            _ => bail!("{}: bag forward over a table stored elsewhere", self.name),
        })
    }

    /// Embedding-bag backward: (table gradient rows, dweights (nnz)).
    /// grad_out: (bags, dim).
    pub(crate) fn bag_backward(
        &self,
        cpu: &Cpu,
        table: &StoredTable,
        bags: &Bags<'_>,
        grad_out: &[f32],
    ) -> Result<(SparseRows, Vec<f32>)> {
        let (rows, dim) = (table.rows, table.dim);
        let (indices, weights, offsets) = (bags.indices, bags.weights, bags.offsets);
        Ok(match (self.engine()?, &table.data) {
            (Engine::Oracle, TableData::F32(t)) => (
                memlayer_core::bag::bag_backward_table(
                    rows, dim, indices, weights, offsets, grad_out,
                )?,
                memlayer_core::bag::bag_backward_weights(t, rows, dim, indices, offsets, grad_out)?,
            ),
            (Engine::CpuFast(k), data) => with_family(*k, || {
                on_host_table!(data, rows, dim, |t| {
                    cpu.install(|| {
                        let grads = memlayer_cpu::bag::bag_backward_table(
                            rows, dim, indices, weights, offsets, grad_out,
                        )?;
                        // (nnz)
                        let mut dweights = vec![0.0f32; indices.len()];
                        memlayer_cpu::bag::bag_backward_weights(
                            t,
                            indices,
                            offsets,
                            grad_out,
                            &mut dweights,
                        )?;
                        Ok((grads, dweights))
                    })
                })
            })?,
            (Engine::Wgpu(e), TableData::Wgpu(t)) => e
                .bag_backward
                .run(&e.ctx, t, indices, weights, offsets, grad_out)?,
            #[cfg(feature = "cuda")]
            (Engine::Cuda(dev), TableData::Cuda(t)) => (
                memlayer_cuda::bag::bag_backward_table(dev, (rows, dim), bags, grad_out)?,
                memlayer_cuda::bag::bag_backward_weights(dev, t, indices, offsets, grad_out)?,
            ),
            _ => bail!("{}: bag backward over a table stored elsewhere", self.name),
        })
    }

    /// Product-key lookup.
    pub(crate) fn lookup(&self, cpu: &Cpu, x: &LookupInputs<'_>) -> Result<Lookup> {
        let (cfg, keys, query, tokens) = (x.cfg, x.keys, x.query, x.tokens);
        Ok(match self.engine()? {
            Engine::Oracle => memlayer_core::pkm::lookup(cfg, keys, query, tokens)?,
            Engine::CpuFast(k) => with_family(*k, || {
                let prepared = memlayer_cpu::pkm::PreparedKeys::new(cfg, keys)?;
                Ok(cpu.lookup(&prepared, query, tokens)?)
            })?,
            Engine::Wgpu(e) => e.lookup.run(&e.ctx, cfg, keys, query, tokens)?,
            #[cfg(feature = "cuda")]
            Engine::Cuda(dev) => memlayer_cuda::lookup::lookup(dev, cfg, keys, query, tokens)?,
            Engine::Torch | Engine::Runtime(_) | Engine::Browser(_) => {
                bail!("{} has no host lookup", self.name)
            }
        })
    }

    /// Lookup backward from the forward's indices and weights and the weights'
    /// gradient d_weights, all (tokens, heads, knn) → (d_keys like keys, d_query like query).
    pub(crate) fn lookup_backward(
        &self,
        cpu: &Cpu,
        x: &LookupInputs<'_>,
        forward: &Lookup,
        d_weights: &[f32],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let LookupInputs {
            cfg,
            keys,
            query,
            tokens,
        } = *x;
        let (indices, weights) = (&forward.indices, &forward.weights);
        Ok(match self.engine()? {
            Engine::Oracle => {
                let d_scores =
                    memlayer_core::pkm::softmax_backward_rows(cfg.knn, weights, d_weights);
                memlayer_core::pkm::scores_backward(cfg, keys, query, tokens, indices, &d_scores)?
            }
            Engine::CpuFast(k) => with_family(*k, || {
                cpu.install(|| {
                    let d_scores =
                        memlayer_cpu::pkm::softmax_backward_rows(cfg.knn, weights, d_weights);
                    Ok(memlayer_cpu::pkm::scores_backward(
                        cfg, keys, query, tokens, indices, &d_scores,
                    )?)
                })
            })?,
            Engine::Wgpu(e) => e.lookup_backward.run(
                &e.ctx, cfg, keys, query, tokens, indices, weights, d_weights,
            )?,
            _ => bail!("{} has no lookup backward", self.name),
        })
    }
}

/// The inputs of one lookup.
#[derive(Clone, Copy)]
pub(crate) struct LookupInputs<'a> {
    pub(crate) cfg: &'a PkmConfig,
    /// (heads, 2, n_keys, half)
    pub(crate) keys: &'a [f32],
    /// (tokens, heads, k_dim)
    pub(crate) query: &'a [f32],
    pub(crate) tokens: usize,
}

impl<'a> LookupInputs<'a> {
    pub(crate) fn new(
        cfg: &'a PkmConfig,
        keys: &'a [f32],
        query: &'a [f32],
        tokens: usize,
    ) -> Self {
        Self {
            cfg,
            keys,
            query,
            tokens,
        }
    }
}

/// A table on a backend.
pub(crate) struct StoredTable {
    pub(crate) rows: usize,
    pub(crate) dim: usize,
    data: TableData,
}

enum TableData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
    Wgpu(ShardedTable),
    #[cfg(feature = "cuda")]
    Cuda(memlayer_cuda::DeviceTable),
}

/// Runs `f` with kernel family `k` forced, then back to detection.
pub(crate) fn with_family<R>(k: Kernel, f: impl FnOnce() -> Result<R>) -> Result<R> {
    simd::force_kernel(Some(k))?;
    let out = f();
    simd::force_kernel(None)?;
    out
}

pub(crate) fn gpu_dtype(d: DType) -> GpuDtype {
    match d {
        DType::F32 => GpuDtype::F32,
        DType::F16 => GpuDtype::F16,
        DType::Bf16 => GpuDtype::Bf16,
    }
}

/// What the runner looks for, and how.
pub(crate) struct Discovery<'a> {
    /// Keep only backends whose name contains one of these (all when empty;
    /// the oracle always stays: it is the reference).
    pub(crate) filter: &'a [String],
    /// The Python interpreter that may import torch.
    pub(crate) python: &'a str,
    /// The runtimes' end-to-end rows (decode, train step) are wanted.
    pub(crate) end_to_end: bool,
    /// The browser harness, or `None` (`--no-browser`).
    pub(crate) browser: Option<BrowserConfig<'a>>,
}

/// Where the browser backends' harness is.
pub(crate) struct BrowserConfig<'a> {
    /// `web/` with `pkg/` (scripts/build-web.sh) and `node_modules/` (npm ci).
    pub(crate) web_dir: &'a std::path::Path,
    pub(crate) chromium: &'a std::path::Path,
    pub(crate) quick: bool,
    /// Where the session's request, answer and log are written.
    pub(crate) raw_dir: &'a std::path::Path,
}

impl Discovery<'_> {
    fn wanted(&self, name: &str) -> bool {
        self.filter.is_empty() || self.filter.iter().any(|f| name.contains(f.as_str()))
    }

    /// Every backend found, then the absent ones with their reasons.
    pub(crate) fn run(&self) -> Vec<Backend> {
        let mut found = vec![Backend::oracle()];
        for k in Kernel::ALL {
            if !simd::runs(k) {
                found.push(Backend::absent(
                    &format!("cpu_fast_{k}"),
                    "cpu_fast",
                    json!({"isa": k.name()}),
                    format!("this CPU does not run the {k} kernels"),
                ));
                continue;
            }
            for d in DTYPES {
                found.push(Backend::present(
                    format!("cpu_fast_{k}_{}", d.name()),
                    "cpu_fast",
                    Some(d),
                    json!({"crate": "memlayer-cpu", "isa": k.name(), "default_family": k == simd::detected()}),
                    Engine::CpuFast(k),
                ));
            }
        }
        found.extend(self.wgpu());
        found.extend(cuda_backends());
        found.extend(self.torch());
        match &self.browser {
            Some(c) => found.extend(super::browser::backends(
                c.web_dir, c.chromium, c.quick, c.raw_dir,
            )),
            None => found.push(Backend::absent(
                "webgpu_chromium",
                "webgpu_chromium",
                Value::Null,
                "not run: --no-browser".into(),
            )),
        }
        if self.end_to_end {
            let wgpu_found = found.iter().any(|b| b.kind == "wgpu" && b.engine.is_ok());
            let cuda_found = found.iter().any(|b| b.kind == "cuda" && b.engine.is_ok());
            found.extend(runtime_backends(wgpu_found, cuda_found));
        }
        found.retain(|b| b.kind == "cpu_oracle" || self.wanted(&b.name));
        found
    }

    /// Every wgpu adapter, one entry per dtype (its device and kernels shared).
    fn wgpu(&self) -> Vec<Backend> {
        let adapters = GpuContext::adapters();
        if adapters.is_empty() {
            return vec![Backend::absent(
                "wgpu",
                "wgpu",
                Value::Null,
                "no wgpu adapter found".into(),
            )];
        }
        let mut out = Vec::new();
        let mut names: Vec<String> = Vec::new();
        for adapter in adapters {
            let info = adapter.get_info();
            let adapter_json = json!({
                "adapter": info.name, "backend": format!("{:?}", info.backend),
                "driver": info.driver, "driver_info": info.driver_info,
                "device_type": format!("{:?}", info.device_type),
                "vendor": info.vendor, "device": info.device,
            });
            // opening a device takes a while: only where a filter could keep it
            let maybe_wanted = self.filter.is_empty()
                || self.filter.iter().any(|f| {
                    f.starts_with("wgpu") || f.starts_with("runtime") || adapter_matches(&info, f)
                });
            if !maybe_wanted {
                continue;
            }
            let label = format!("{} ({:?}, {})", info.name, info.backend, info.driver);
            let engine =
                pollster::block_on(GpuContext::from_adapter(adapter, &GpuOptions::default()))
                    .map_err(anyhow::Error::from)
                    .and_then(WgpuEngine::new);
            match engine {
                Ok(e) => {
                    let mut name = e.ctx.name();
                    if names.contains(&name) {
                        name = format!("{name}{}", names.len());
                    }
                    names.push(name.clone());
                    let mut info = adapter_json;
                    info["max_storage_buffer_binding_size"] =
                        json!(e.ctx.limits.max_storage_buffer_binding_size);
                    let e = Rc::new(e);
                    for d in DTYPES {
                        out.push(Backend::present(
                            format!("{name}_{}", d.name()),
                            "wgpu",
                            Some(d),
                            info.clone(),
                            Engine::Wgpu(Rc::clone(&e)),
                        ));
                    }
                }
                Err(err) => out.push(Backend::absent(
                    &format!("wgpu_{}", label.to_lowercase().replace(' ', "_")),
                    "wgpu",
                    adapter_json,
                    format!("opening {label}: {err:#}"),
                )),
            }
        }
        out
    }

    /// PyTorch CPU when `python` imports torch (the peer of the bag forward).
    fn torch(&self) -> Vec<Backend> {
        let probe = Command::new(self.python)
            .args(["-c", "import torch; print(torch.__version__)"])
            .output();
        let version = match probe {
            Ok(out) if out.status.success() => {
                String::from_utf8_lossy(&out.stdout).trim().to_string()
            }
            Ok(out) => {
                let err = String::from_utf8_lossy(&out.stderr);
                let last = err.lines().last().unwrap_or("no output").trim().to_string();
                return vec![Backend::absent(
                    "torch_cpu",
                    "torch_cpu",
                    json!({"python": self.python}),
                    format!("{} cannot import torch: {last}", self.python),
                )];
            }
            Err(e) => {
                return vec![Backend::absent(
                    "torch_cpu",
                    "torch_cpu",
                    json!({"python": self.python}),
                    format!("running {}: {e}", self.python),
                )];
            }
        };
        DTYPES
            .into_iter()
            .map(|d| {
                Backend::present(
                    format!("torch_cpu_{}", d.name()),
                    "torch_cpu",
                    Some(d),
                    json!({"torch_version": version, "op": "embedding_bag (sum, per_sample_weights)",
                           "note": "the peer: bag forward speed only, no parity check"}),
                    Engine::Torch,
                )
            })
            .collect()
    }
}

/// A runtime of the end-to-end rows.
fn runtime(name: &str, device: RuntimeBackend, description: &str) -> Backend {
    Backend::present(
        name.into(),
        "runtime",
        None,
        json!({ "device": description }),
        Engine::Runtime(device),
    )
}

/// The runtimes that decode (`bench paged`) and train (`bench train`) end to end.
fn runtime_backends(wgpu_found: bool, cuda_found: bool) -> Vec<Backend> {
    let mut out = vec![runtime(
        "runtime_cpu",
        RuntimeBackend::Cpu,
        "burn Flex (CPU) with memlayer-cpu memory ops",
    )];
    if wgpu_found {
        out.push(runtime(
            "runtime_wgpu",
            RuntimeBackend::Wgpu,
            "burn-wgpu on the default adapter (MEMLAYER_ADAPTER picks one) with the WGSL memory ops",
        ));
    }
    #[cfg(feature = "cuda")]
    if cuda_found {
        out.push(runtime(
            "runtime_cuda",
            RuntimeBackend::Cuda,
            "value slots and the bag on CUDA GPU 0, dense part on burn Flex (decode only)",
        ));
    }
    #[cfg(not(feature = "cuda"))]
    let _ = cuda_found;
    out
}

/// The first CUDA GPU per dtype, or why there is none.
#[cfg(feature = "cuda")]
fn cuda_backends() -> Vec<Backend> {
    super::cuda::backends()
}

#[cfg(not(feature = "cuda"))]
fn cuda_backends() -> Vec<Backend> {
    vec![Backend::absent(
        "cuda",
        "cuda",
        Value::Null,
        "built without the `cuda` feature".into(),
    )]
}

#[cfg(feature = "cuda")]
impl Backend {
    /// A present CUDA entry (for `cuda.rs`).
    pub(crate) fn cuda(
        name: String,
        d: DType,
        info: Value,
        dev: Rc<memlayer_cuda::CudaDevice>,
    ) -> Self {
        Self::present(name, "cuda", Some(d), info, Engine::Cuda(dev))
    }

    /// An absent CUDA entry (for `cuda.rs`).
    pub(crate) fn cuda_absent(reason: String) -> Self {
        Self::absent("cuda", "cuda", Value::Null, reason)
    }
}
