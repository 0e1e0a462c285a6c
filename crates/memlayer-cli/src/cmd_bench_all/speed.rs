//! The speed pass, after parity: per backend the lookup (per N), the bag
//! forward and backward, the lookup backward; per runtime the decode tok/s
//! (resident, paged at each budget: `bench paged`) and the train step
//! (`bench train`). Each kernel figure is also a fraction of its device's
//! ceiling measured in the same run: the CPU's read bandwidth (a gather reads
//! rows and writes little) for CPU backends and torch, the copy kernel's
//! bandwidth on each wgpu adapter and CUDA GPU. The measurements are the ones
//! of `bench kernels`, `bench paged` and `bench train`, called here.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use half::{bf16, f16};
use indicatif::ProgressBar;
use memlayer_core::bag::Bags;
use memlayer_core::rng::Rng;
use memlayer_cpu::storage::narrow;
use memlayer_cpu::{Cpu, DType};
use serde_json::{Value, json};

use super::backends::{Backend, Engine, LookupInputs, Op, gpu_dtype, with_family};
use crate::cmd_bench_kernels::{
    BagData, Shapes, TorchScript, cpu_bag, cpu_lookup_secs, gpu_bag, gpu_copy, gpu_lookup,
    lookup_inputs, oracle_bag_secs, time_median, torch_bag_on,
};

/// One measured figure.
pub(crate) struct SpeedRow {
    pub(crate) backend: String,
    /// `bag_forward`, `bag_backward`, `lookup`, `lookup_backward`, `decode`, `train_step`.
    pub(crate) op: String,
    /// What varies within an op: `N 65536`, `paged 25%`, `tiny-pkm`, or empty.
    pub(crate) param: String,
    /// The x of the lookup-vs-N plot (N), where there is one.
    pub(crate) n_rows: Option<usize>,
    pub(crate) value: Option<f64>,
    pub(crate) unit: &'static str,
    pub(crate) higher_is_better: bool,
    /// The figure's bytes per second over its device's ceiling.
    pub(crate) fraction: Option<f64>,
    /// Which ceiling (`cpu_read`, `<adapter>_copy`, `cuda_copy`).
    pub(crate) ceiling: Option<String>,
    pub(crate) error: Option<String>,
}

impl SpeedRow {
    /// The row's identity across runs (what `--compare` matches).
    pub(crate) fn key(&self) -> String {
        format!("{} | {} | {}", self.backend, self.op, self.param)
    }

    pub(crate) fn json(&self) -> Value {
        json!({
            "key": self.key(), "backend": self.backend, "op": self.op, "param": self.param,
            "n_rows": self.n_rows, "value": self.value, "unit": self.unit,
            "higher_is_better": self.higher_is_better,
            "fraction_of_ceiling": self.fraction, "ceiling": self.ceiling, "error": self.error,
        })
    }
}

/// The shapes of a run: the runner's own small ones with `--quick` (a table
/// of 128 MiB, not above a large L3: the quick figures are a smoke test, not
/// memory-bound figures), `bench kernels`' full ones otherwise.
pub(crate) fn shapes(quick: bool) -> Shapes {
    if !quick {
        return Shapes::new(false);
    }
    Shapes {
        rows: 1 << 18,
        dim: 128,
        bags: 512,
        bag_size: 64,
        iters: 3,
        cpu_copy_bytes: 64 << 20,
        cpu_read_bytes: 128 << 20,
        gpu_copy_bytes: 16 << 20,
        n_keys: vec![128, 512],
        heads: 4,
        knn: 32,
        k_dim: 128,
        lookup_tokens: 32,
        gpu_lookup_tokens: 8,
        brute_tokens: 2,
    }
}

/// Each device's ceiling in GB/s, measured once per run.
pub(crate) struct Ceilings {
    /// device key → (ceiling name, GB/s)
    by_device: BTreeMap<String, (String, f64)>,
    /// Every probe's figure, for the JSON.
    pub(crate) figures: BTreeMap<String, Value>,
}

/// The device a backend runs on: `cpu`, a wgpu adapter's name, `cuda`.
fn device_key(b: &Backend) -> String {
    match b.kind {
        "webgpu_chromium" => "webgpu_chromium".into(),
        "wgpu" | "cuda" => b
            .name
            .rsplit_once('_')
            .map_or(b.name.clone(), |(device, _dtype)| device.to_string()),
        _ => "cpu".into(),
    }
}

impl Ceilings {
    pub(crate) fn measure(backends: &[Backend], cpu: &Cpu, s: &Shapes) -> Self {
        let mut by_device = BTreeMap::new();
        let mut figures = BTreeMap::new();
        let copy = cpu.copy_bandwidth(s.cpu_copy_bytes, 3);
        let read = cpu.read_bandwidth(s.cpu_read_bytes, 3);
        figures.insert("cpu_copy_gbps".into(), json!(copy.gbps));
        figures.insert("cpu_read_gbps".into(), json!(read.gbps));
        by_device.insert("cpu".into(), ("cpu_read".into(), read.gbps));
        for b in backends {
            let key = device_key(b);
            if by_device.contains_key(&key) {
                continue;
            }
            let measured = match &b.engine {
                Ok(Engine::Wgpu(e)) => gpu_copy(&e.ctx, s),
                // the browser session measured its copy kernel in the page
                Ok(Engine::Browser(run)) => run
                    .speed("f32")
                    .and_then(|(_, copy)| copy.context("the browser gave no copy figure")),
                #[cfg(feature = "cuda")]
                Ok(Engine::Cuda(dev)) => {
                    memlayer_cuda::bandwidth::copy_gbps(dev, s.gpu_copy_bytes as usize, s.iters)
                        .map_err(anyhow::Error::from)
                }
                _ => continue,
            };
            match measured {
                Ok(g) => {
                    figures.insert(format!("{key}_copy_gbps"), json!(g));
                    by_device.insert(key.clone(), (format!("{key}_copy"), g));
                }
                Err(e) => {
                    figures.insert(format!("{key}_copy_error"), json!(format!("{e:#}")));
                }
            }
        }
        Self { by_device, figures }
    }

    fn of(&self, b: &Backend) -> Option<&(String, f64)> {
        self.by_device.get(&device_key(b))
    }
}

/// What the speed pass needs besides the backend.
pub(crate) struct SpeedInputs<'a> {
    pub(crate) cpu: &'a Cpu,
    pub(crate) shapes: &'a Shapes,
    pub(crate) data: &'a BagData,
    pub(crate) ceilings: &'a Ceilings,
    pub(crate) torch: TorchScript<'a>,
}

/// A figure's unit and direction.
#[derive(Clone, Copy)]
pub(crate) struct Unit {
    name: &'static str,
    higher_is_better: bool,
}

const fn unit(name: &'static str, higher_is_better: bool) -> Unit {
    Unit {
        name,
        higher_is_better,
    }
}

const GBPS: Unit = unit("GB/s", true);
const US_PER_TOKEN: Unit = unit("us/token", false);
const TOK_S: Unit = unit("tok/s", true);
const MS_PER_STEP: Unit = unit("ms/step", false);

/// A row with its figure; `bytes_per_second` turns the figure into the bytes
/// per second its fraction of the ceiling is taken of.
fn row(
    b: &Backend,
    op: &str,
    param: String,
    measured: Result<f64>,
    unit: Unit,
    bytes_per_second: impl Fn(f64) -> f64,
    ceilings: &Ceilings,
) -> SpeedRow {
    let mut r = bare_row(b, op, param, measured, unit);
    if let Some((name, gbps)) = ceilings.of(b) {
        r.fraction = r.value.map(|v| bytes_per_second(v) / 1e9 / gbps);
        r.ceiling = Some(name.clone());
    }
    r
}

/// A row without a ceiling (the end-to-end rows: no byte model).
fn bare_row(b: &Backend, op: &str, param: String, measured: Result<f64>, unit: Unit) -> SpeedRow {
    let (value, error) = match measured {
        Ok(v) => (Some(v), None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    SpeedRow {
        backend: b.name.clone(),
        op: op.into(),
        param,
        n_rows: None,
        value,
        unit: unit.name,
        higher_is_better: unit.higher_is_better,
        fraction: None,
        ceiling: None,
        error,
    }
}

/// The kernel speed rows of one backend (steps on `bar`: one per op).
pub(crate) fn kernel_rows(b: &Backend, inp: &SpeedInputs<'_>, bar: &ProgressBar) -> Vec<SpeedRow> {
    let s = inp.shapes;
    let dtype = b.dtype.unwrap_or(DType::F32);
    let elem = dtype.size();
    let mut rows = Vec::new();
    let dim = format!("dim {}", s.dim);
    if let Ok(Engine::Browser(run)) = &b.engine {
        // the session timed its own inputs (see browser.rs)
        bar.inc(4);
        return browser_rows(b, run, dtype, inp.ceilings);
    }

    bar.set_message(format!("speed: {} bag forward", b.name));
    let fwd = bag_forward_gbps(b, inp);
    rows.push(row(
        b,
        Op::BagForward.name(),
        dim.clone(),
        fwd,
        GBPS,
        |g| g * 1e9,
        inp.ceilings,
    ));
    bar.inc(1);
    if !b.has_kernels() {
        bar.inc(3);
        return rows;
    }

    bar.set_message(format!("speed: {} bag backward", b.name));
    if b.lacks(Op::BagBackward).is_none() {
        let nnz = s.bags * s.bag_size;
        let backward_bytes = (nnz * s.dim * (4 + elem)) as f64;
        let secs = bag_backward_secs(b, inp);
        rows.push(row(
            b,
            Op::BagBackward.name(),
            dim,
            secs.map(|t| backward_bytes / t / 1e9),
            GBPS,
            |g| g * 1e9,
            inp.ceilings,
        ));
    }
    bar.inc(1);

    bar.set_message(format!("speed: {} lookup", b.name));
    if b.lacks(Op::Lookup).is_none() {
        for &n_keys in &s.n_keys {
            let n = n_keys * n_keys;
            // sub-key bytes each token is scored against
            let key_bytes = (s.heads * 2 * n_keys * (s.k_dim / 2) * 4) as f64;
            let mut r = row(
                b,
                Op::Lookup.name(),
                format!("N {n}"),
                lookup_us(b, inp, n_keys),
                US_PER_TOKEN,
                |us| key_bytes / (us * 1e-6),
                inp.ceilings,
            );
            r.n_rows = Some(n);
            rows.push(r);
        }
    }
    bar.inc(1);

    bar.set_message(format!("speed: {} lookup backward", b.name));
    if b.lacks(Op::LookupBackward).is_none() {
        let n_keys = s.n_keys[0];
        let tokens = lookup_tokens(b, s);
        // keys read, key gradient written, per call
        let call_bytes = (2 * s.heads * 2 * n_keys * (s.k_dim / 2) * 4) as f64;
        rows.push(row(
            b,
            Op::LookupBackward.name(),
            format!("N {}", n_keys * n_keys),
            lookup_backward_us(b, inp, n_keys, tokens),
            US_PER_TOKEN,
            |us| call_bytes / (us * 1e-6 * tokens as f64),
            inp.ceilings,
        ));
    }
    bar.inc(1);
    rows
}

/// The browser session's figures for `b`'s dtype, as fractions of its copy kernel.
fn browser_rows(
    b: &Backend,
    run: &super::browser::BrowserRun,
    dtype: DType,
    ceilings: &Ceilings,
) -> Vec<SpeedRow> {
    let (figures, _) = match run.speed(dtype.name()) {
        Ok(f) => f,
        Err(e) => {
            return vec![bare_row(
                b,
                Op::BagForward.name(),
                String::new(),
                Err(e),
                GBPS,
            )];
        }
    };
    figures
        .into_iter()
        .map(|f| {
            let (param, unit) = match f.n_rows {
                Some(n) => (format!("N {n}"), US_PER_TOKEN),
                None => ("dim 128".to_string(), GBPS),
            };
            let mut r = bare_row(b, &f.op, param, Ok(f.value), unit);
            r.n_rows = f.n_rows;
            if let Some((name, gbps)) = ceilings.of(b) {
                r.fraction = Some(f.bytes_per_second / 1e9 / gbps);
                r.ceiling = Some(name.clone());
            }
            r
        })
        .collect()
}

/// Tokens per lookup call on this backend (the oracle is slow, GPUs here emulated).
fn lookup_tokens(b: &Backend, s: &Shapes) -> usize {
    match b.engine {
        Ok(Engine::Oracle) => s.brute_tokens,
        Ok(Engine::Wgpu(_)) => s.gpu_lookup_tokens,
        _ => s.lookup_tokens,
    }
}

fn bag_forward_gbps(b: &Backend, inp: &SpeedInputs<'_>) -> Result<f64> {
    let (s, data, cpu) = (inp.shapes, inp.data, inp.cpu);
    let dtype = b.dtype.unwrap_or(DType::F32);
    let gathered = s.gathered_bytes(dtype.size());
    match b
        .engine
        .as_ref()
        .map_err(|r| anyhow::anyhow!("absent: {r}"))?
    {
        Engine::Oracle => Ok(gathered / oracle_bag_secs(s, data)? / 1e9),
        Engine::CpuFast(k) => with_family(*k, || match dtype {
            DType::F32 => cpu_bag(cpu, s, data, &data.table),
            DType::F16 => cpu_bag(cpu, s, data, &narrow::<f16>(&data.table)),
            DType::Bf16 => cpu_bag(cpu, s, data, &narrow::<bf16>(&data.table)),
        }),
        Engine::Wgpu(e) => Ok(gathered / gpu_bag(&e.ctx, s, data, gpu_dtype(dtype))? / 1e9),
        #[cfg(feature = "cuda")]
        Engine::Cuda(dev) => {
            let secs = crate::cmd_bench_kernels::cuda::cuda_bag(
                dev,
                s,
                data,
                super::cuda::bank_dtype(dtype),
            )?;
            Ok(gathered / secs / 1e9)
        }
        Engine::Torch => {
            let (gbps, info) = torch_bag_on(&inp.torch, s, cpu.threads(), dtype.name(), "cpu")?;
            gbps.with_context(|| format!("torch gave no figure: {}", info["error"]))
        }
        Engine::Runtime(_) | Engine::Browser(_) => bail!("{} times no host bag forward", b.name),
    }
}

fn bag_backward_secs(b: &Backend, inp: &SpeedInputs<'_>) -> Result<f64> {
    let (s, data, cpu) = (inp.shapes, inp.data, inp.cpu);
    let table = b.store(&data.table, s.rows, s.dim)?;
    let bags = Bags {
        indices: &data.indices,
        weights: &data.weights,
        offsets: &data.offsets,
    };
    // (bags, dim)
    let grad_out = Rng::new(7).normal_vec(s.bags * s.dim, 0.0, 1.0);
    time_median(s.iters.min(3), || {
        b.bag_backward(cpu, &table, &bags, &grad_out)?;
        Ok(())
    })
}

fn lookup_us(b: &Backend, inp: &SpeedInputs<'_>, n_keys: usize) -> Result<f64> {
    let (s, cpu) = (inp.shapes, inp.cpu);
    match b
        .engine
        .as_ref()
        .map_err(|r| anyhow::anyhow!("absent: {r}"))?
    {
        Engine::CpuFast(k) => with_family(*k, || {
            let (cfg, keys, query) = lookup_inputs(s, n_keys, s.lookup_tokens);
            Ok(cpu_lookup_secs(cpu, s, &cfg, &keys, &query)? * 1e6 / s.lookup_tokens as f64)
        }),
        Engine::Wgpu(e) => gpu_lookup(&e.ctx, s, n_keys),
        #[cfg(feature = "cuda")]
        Engine::Cuda(dev) => crate::cmd_bench_kernels::cuda::cuda_lookup(dev, s, n_keys),
        _ => {
            let tokens = lookup_tokens(b, s);
            let (cfg, keys, query) = lookup_inputs(s, n_keys, tokens);
            let secs = time_median(1, || {
                b.lookup(cpu, &LookupInputs::new(&cfg, &keys, &query, tokens))?;
                Ok(())
            })?;
            Ok(secs * 1e6 / tokens as f64)
        }
    }
}

fn lookup_backward_us(
    b: &Backend,
    inp: &SpeedInputs<'_>,
    n_keys: usize,
    tokens: usize,
) -> Result<f64> {
    let (s, cpu) = (inp.shapes, inp.cpu);
    let (cfg, keys, query) = lookup_inputs(s, n_keys, tokens);
    // the forward's selection (the CPU path is bit-identical to the oracle)
    let forward = memlayer_cpu::pkm::lookup_keys(&cfg, &keys, &query, tokens)?;
    // (tokens, heads, knn)
    let d_weights = Rng::new(11).normal_vec(tokens * cfg.heads * cfg.knn, 0.0, 1.0);
    let secs = time_median(s.iters.min(3), || {
        let inputs = LookupInputs::new(&cfg, &keys, &query, tokens);
        b.lookup_backward(cpu, &inputs, &forward, &d_weights)?;
        Ok(())
    })?;
    Ok(secs * 1e6 / tokens as f64)
}

/// How the end-to-end rows run.
pub(crate) struct EndToEnd<'a> {
    pub(crate) model: &'a Path,
    pub(crate) quick: bool,
    /// Where `bench paged` / `bench train` write their JSON.
    pub(crate) raw_dir: &'a Path,
}

/// Decode tok/s of one runtime: resident, then paged at 100 % and 25 % (`bench paged`).
pub(crate) fn decode_rows(b: &Backend, e2e: &EndToEnd<'_>, bar: &ProgressBar) -> Vec<SpeedRow> {
    let Ok(Engine::Runtime(device)) = b.engine else {
        return Vec::new();
    };
    let json_path = e2e.raw_dir.join(format!("paged_{}.json", b.name));
    let args = crate::cmd_bench_paged::PagedBenchArgs {
        model: e2e.model.to_path_buf(),
        questions: if e2e.quick { 2 } else { 24 },
        max_tokens: if e2e.quick { 8 } else { 16 },
        budgets: vec![100.0, 25.0],
        backend: device,
        source: crate::source::Source::ModelDir,
        json: Some(json_path.clone()),
        rtt_ms: Vec::new(),
        single_range: false,
        plot: None,
    };
    let result = bar.suspend(|| crate::cmd_bench_paged::run(args));
    e2e_rows(b, "decode", TOK_S, result, &json_path, |r| {
        let param = match r["budget_percent"].as_f64() {
            Some(p) => format!("{} {p}%", r["memory"].as_str().unwrap_or("paged")),
            None => "resident".into(),
        };
        (param, figure(r, "decode_tokens_per_second"))
    })
}

/// Train step ms of one runtime, dense and pkm (`bench train`, preset `tiny`).
pub(crate) fn train_rows(b: &Backend, e2e: &EndToEnd<'_>, bar: &ProgressBar) -> Vec<SpeedRow> {
    let Ok(Engine::Runtime(device)) = b.engine else {
        return Vec::new();
    };
    let json_path = e2e.raw_dir.join(format!("train_{}.json", b.name));
    let args = crate::cmd_bench_train::TrainBenchArgs {
        size: "tiny".into(),
        steps: if e2e.quick { 3 } else { 20 },
        warmup: if e2e.quick { 1 } else { 3 },
        variants: vec!["dense".into(), "pkm".into()],
        backends: vec![device],
        ops: crate::args::OpsChoice::Auto,
        json: Some(json_path.clone()),
    };
    let result = bar.suspend(|| crate::cmd_bench_train::run(args));
    e2e_rows(b, "train_step", MS_PER_STEP, result, &json_path, |r| {
        let variant = r["variant"].as_str().unwrap_or("?").to_string();
        (variant, figure(r, "ms_per_step"))
    })
}

/// The rows of a `bench paged` / `bench train` run that wrote `json_path`:
/// `row_of` gives each result row's param and figure.
fn e2e_rows(
    b: &Backend,
    op: &str,
    unit: Unit,
    ran: Result<()>,
    json_path: &Path,
    row_of: impl Fn(&Value) -> (String, Result<f64>),
) -> Vec<SpeedRow> {
    match ran.and_then(|()| read_results(json_path)) {
        Ok(results) => results
            .iter()
            .map(|r| {
                let (param, measured) = row_of(r);
                bare_row(b, op, param, measured, unit)
            })
            .collect(),
        Err(e) => vec![bare_row(b, op, String::new(), Err(e), unit)],
    }
}

/// The number `key` of a result row.
fn figure(row: &Value, key: &str) -> Result<f64> {
    row[key]
        .as_f64()
        .with_context(|| format!("no {key} in {row}"))
}

/// The `results` rows of a `bench paged` / `bench train` JSON.
fn read_results(path: &Path) -> Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let doc: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    doc["results"]
        .as_array()
        .cloned()
        .with_context(|| format!("{} has no results", path.display()))
}
