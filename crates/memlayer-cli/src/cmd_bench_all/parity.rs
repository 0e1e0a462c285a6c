//! The parity pass: every op on every backend against the CPU oracle on the
//! same inputs, random and adversarial (tied scores, k = n_keys, empty bags,
//! rows repeated within and across bags, an odd row width). Indices must be
//! identical; floats within [`TOLERANCE`] relative error (the CPU path and the
//! WGSL kernels are bit-identical for most ops; reported as `bit_identical`).
//!
//! The oracle runs on the table as the backend stores it (f16/bf16 rounded
//! and widened back), so a dtype's rounding is not counted as an error.
//!
//! `MEMLAYER_BENCH_FAULT=<backend>:<op>` (test only) perturbs that op's
//! output on that backend before the comparison, to prove a failure is caught.

use anyhow::Result;
use half::{bf16, f16};
use memlayer_core::bag::{Bags, SparseRows};
use memlayer_core::pkm::{Lookup, PkmConfig};
use memlayer_core::rng::Rng;
use memlayer_cpu::storage::{narrow, widen};
use memlayer_cpu::{Cpu, DType};
use serde_json::{Value, json};

use super::backends::{Backend, Engine, F32_ONLY, LookupInputs, Op};

/// Largest relative error accepted: |got − want| / max(|want|, 1 % of the
/// largest |want| of the output). Reductions in another order (the weight
/// gradient on a GPU, a warp's tree sum) stay far below it.
pub(crate) const TOLERANCE: f64 = 1e-3;

/// Environment variable of the test-only fault injection (`<backend>:<op>`).
pub(crate) const FAULT_ENV: &str = "MEMLAYER_BENCH_FAULT";

/// One lookup input set.
pub(crate) struct LookupCase {
    pub(crate) name: &'static str,
    pub(crate) cfg: PkmConfig,
    /// (heads, 2, n_keys, half)
    pub(crate) keys: Vec<f32>,
    /// (tokens, heads, k_dim)
    pub(crate) query: Vec<f32>,
    pub(crate) tokens: usize,
    /// (tokens, heads, knn): the gradient of the softmax weights
    pub(crate) d_weights: Vec<f32>,
}

/// One embedding-bag input set.
pub(crate) struct BagCase {
    pub(crate) name: &'static str,
    pub(crate) rows: usize,
    pub(crate) dim: usize,
    /// (rows, dim)
    pub(crate) table: Vec<f32>,
    /// (nnz)
    pub(crate) indices: Vec<u32>,
    /// (nnz)
    pub(crate) weights: Vec<f32>,
    /// (bags + 1)
    pub(crate) offsets: Vec<usize>,
    /// (bags, dim)
    pub(crate) grad_out: Vec<f32>,
}

impl BagCase {
    fn bags(&self) -> Bags<'_> {
        Bags {
            indices: &self.indices,
            weights: &self.weights,
            offsets: &self.offsets,
        }
    }
}

fn pkm(heads: usize, n_keys: usize, k_dim: usize, knn: usize, qk_norm: bool) -> PkmConfig {
    PkmConfig {
        heads,
        n_keys,
        k_dim,
        knn,
        qk_norm,
        ..PkmConfig::paper()
    }
}

/// A lookup case with random keys and queries.
fn random_lookup(name: &'static str, cfg: PkmConfig, tokens: usize, rng: &mut Rng) -> LookupCase {
    lookup_case(name, cfg, tokens, rng, None, None)
}

fn lookup_case(
    name: &'static str,
    cfg: PkmConfig,
    tokens: usize,
    rng: &mut Rng,
    keys: Option<Vec<f32>>,
    query: Option<Vec<f32>>,
) -> LookupCase {
    let keys =
        keys.unwrap_or_else(|| rng.normal_vec(cfg.heads * 2 * cfg.n_keys * cfg.half(), 0.0, 1.0));
    let query = query.unwrap_or_else(|| rng.normal_vec(tokens * cfg.heads * cfg.k_dim, 0.0, 1.0));
    let d_weights = rng.normal_vec(tokens * cfg.heads * cfg.knn, 0.0, 1.0);
    LookupCase {
        name,
        cfg,
        keys,
        query,
        tokens,
        d_weights,
    }
}

/// The lookup cases: random, random with qk-norm (n_keys not a power of two),
/// tied scores (sub-keys drawn from four vectors, some queries zero: every
/// score ties), and k = n_keys (every sub-key a candidate).
pub(crate) fn lookup_cases() -> Vec<LookupCase> {
    let mut rng = Rng::new(21);
    let random = random_lookup("random", pkm(2, 64, 32, 8, false), 6, &mut rng);
    let qk = random_lookup("random_qk_norm", pkm(2, 48, 32, 16, true), 5, &mut rng);
    let ties_cfg = pkm(2, 32, 16, 8, false);
    let half = ties_cfg.half();
    let basis = rng.normal_vec(4 * half, 0.0, 1.0);
    // (heads, 2, n_keys, half): sub-key i is basis row i % 4
    let tied_keys: Vec<f32> = (0..ties_cfg.heads * 2 * ties_cfg.n_keys)
        .flat_map(|i| basis[(i % 4) * half..(i % 4 + 1) * half].to_vec())
        .collect();
    let tokens = 4;
    let mut tied_query = rng.normal_vec(tokens * ties_cfg.heads * ties_cfg.k_dim, 0.0, 1.0);
    // tokens 0 and 2: all zero, so every candidate scores 0
    for t in [0, 2] {
        let w = ties_cfg.heads * ties_cfg.k_dim;
        tied_query[t * w..(t + 1) * w].fill(0.0);
    }
    let ties = lookup_case(
        "ties",
        ties_cfg,
        tokens,
        &mut rng,
        Some(tied_keys),
        Some(tied_query),
    );
    let all = random_lookup("k_eq_n_keys", pkm(1, 16, 8, 16, false), 4, &mut rng);
    vec![random, qk, ties, all]
}

fn bag_case(
    name: &'static str,
    rows: usize,
    dim: usize,
    indices: Vec<u32>,
    weights: Vec<f32>,
    offsets: Vec<usize>,
    rng: &mut Rng,
) -> BagCase {
    let bags = offsets.len() - 1;
    BagCase {
        name,
        rows,
        dim,
        table: rng.normal_vec(rows * dim, 0.0, 1.0),
        indices,
        weights,
        offsets,
        grad_out: rng.normal_vec(bags * dim, 0.0, 1.0),
    }
}

/// CSR offsets (bags + 1) of bags of these sizes.
fn offsets_of(sizes: &[usize]) -> Vec<usize> {
    let mut offsets = vec![0];
    for s in sizes {
        offsets.push(offsets.last().copied().unwrap_or(0) + s);
    }
    offsets
}

/// The bag cases: random sizes (some empty), rows repeated within and across
/// bags with tied weights, empty first/middle/last bags, an odd row width
/// (f16/bf16 rows padded on the GPU).
pub(crate) fn bag_cases() -> Vec<BagCase> {
    let mut rng = Rng::new(2121);
    let sizes: Vec<usize> = (0..24).map(|_| rng.below(13) as usize).collect();
    let random = random_bags("random", 500, 64, &sizes, &mut rng);
    let indices = (0..60).map(|e| [0u32, 3, 7][e % 3]).collect();
    let weights = (0..60)
        .map(|e| if e % 2 == 0 { 1.0 } else { 0.5 })
        .collect();
    let repeated = bag_case(
        "repeated_rows",
        8,
        32,
        indices,
        weights,
        offsets_of(&[6; 10]),
        &mut rng,
    );
    let empty = random_bags("empty_bags", 100, 16, &[0, 3, 0, 0, 5, 1, 0], &mut rng);
    let odd = random_bags("odd_dim", 64, 33, &[4; 8], &mut rng);
    vec![random, repeated, empty, odd]
}

/// Bags of these sizes over random rows of a (rows, dim) table, normal weights.
fn random_bags(
    name: &'static str,
    rows: usize,
    dim: usize,
    sizes: &[usize],
    rng: &mut Rng,
) -> BagCase {
    let nnz: usize = sizes.iter().sum();
    let indices = (0..nnz).map(|_| rng.below(rows as u64) as u32).collect();
    let weights = rng.normal_vec(nnz, 0.0, 1.0);
    bag_case(name, rows, dim, indices, weights, offsets_of(sizes), rng)
}

/// The table as a backend of dtype `d` stores it, widened back to f32.
fn as_stored(table: &[f32], d: DType) -> Vec<f32> {
    match d {
        DType::F32 => table.to_vec(),
        DType::F16 => widen(&narrow::<f16>(table)),
        DType::Bf16 => widen(&narrow::<bf16>(table)),
    }
}

/// Index `flat` of a row-major array of `shape` as `[i, j, ...]`.
fn coords(mut flat: usize, shape: &[usize]) -> String {
    let mut c = vec![0; shape.len()];
    for (slot, &n) in c.iter_mut().zip(shape).rev() {
        *slot = flat % n.max(1);
        flat /= n.max(1);
    }
    let c: Vec<String> = c.iter().map(usize::to_string).collect();
    format!("[{}]", c.join(", "))
}

/// The comparison of one output against the oracle's.
#[derive(Default)]
struct Diff {
    max_rel_err: f64,
    /// The outputs that are not bit-identical to the oracle's.
    inexact: Vec<String>,
    /// The first element that differs beyond the tolerance (or an index that differs).
    first: Option<String>,
}

impl Diff {
    fn new() -> Self {
        Self::default()
    }

    fn mark_inexact(&mut self, what: &str) {
        if !self.inexact.iter().any(|w| w == what) {
            self.inexact.push(what.to_string());
        }
    }

    /// Ids must be equal element for element. `what`: the output's name; shape: its dims.
    fn ids(&mut self, what: &str, shape: &[usize], got: &[u32], want: &[u32]) {
        if got.len() != want.len() {
            self.mark_inexact(what);
            self.first.get_or_insert(format!(
                "{what} has {} elements, the oracle {}",
                got.len(),
                want.len()
            ));
            return;
        }
        if let Some(i) = got.iter().zip(want).position(|(g, w)| g != w) {
            self.mark_inexact(what);
            self.first.get_or_insert(format!(
                "{what}{} = {}, oracle {}",
                coords(i, shape),
                got[i],
                want[i]
            ));
        }
    }

    /// Floats within [`TOLERANCE`] (see there); NaN only where the oracle has NaN.
    fn floats(&mut self, what: &str, shape: &[usize], got: &[f32], want: &[f32]) {
        if got.len() != want.len() {
            self.mark_inexact(what);
            self.max_rel_err = f64::INFINITY;
            self.first.get_or_insert(format!(
                "{what} has {} elements, the oracle {}",
                got.len(),
                want.len()
            ));
            return;
        }
        let scale = want.iter().fold(0.0f64, |m, w| m.max(f64::from(w.abs())));
        let floor = (0.01 * scale).max(f64::from(f32::MIN_POSITIVE));
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            if g.to_bits() == w.to_bits() {
                continue;
            }
            self.mark_inexact(what);
            let rel = if g.is_nan() || w.is_nan() {
                if g.is_nan() && w.is_nan() {
                    0.0
                } else {
                    f64::INFINITY
                }
            } else {
                f64::from((g - w).abs()) / f64::from(w.abs()).max(floor)
            };
            self.max_rel_err = self.max_rel_err.max(rel);
            if rel > TOLERANCE && self.first.is_none() {
                self.first = Some(format!(
                    "{what}{} = {g}, oracle {w} (relative error {rel:.3e})",
                    coords(i, shape)
                ));
            }
        }
    }

    fn sparse_rows(&mut self, got: &SparseRows, want: &SparseRows) {
        self.ids("table_grad.rows", &[want.rows.len()], &got.rows, &want.rows);
        if got.rows == want.rows {
            self.floats(
                "table_grad.grads",
                &[want.rows.len(), want.dim],
                &got.grads,
                &want.grads,
            );
        }
    }
}

/// One (backend, op, case) comparison.
pub(crate) struct ParityRow {
    pub(crate) backend: String,
    pub(crate) op: Op,
    pub(crate) case: String,
    /// `pass`, `fail` (differs from the oracle), `error` (the op failed) or
    /// `skipped` (the backend does not have the op: `detail` says why).
    pub(crate) status: &'static str,
    pub(crate) indices_identical: Option<bool>,
    /// The outputs that are not bit-identical to the oracle's (within the tolerance when passed).
    pub(crate) inexact_outputs: Vec<String>,
    pub(crate) max_rel_err: f64,
    /// What differed first, or the op's error.
    pub(crate) detail: Option<String>,
}

impl ParityRow {
    pub(crate) fn json(&self) -> Value {
        json!({
            "backend": self.backend, "op": self.op.name(), "case": self.case,
            "status": self.status, "indices_identical": self.indices_identical,
            "bit_identical": self.status == "pass" && self.inexact_outputs.is_empty(),
            "inexact_outputs": self.inexact_outputs,
            "max_rel_err": match self.max_rel_err {
                e if e.is_finite() => json!(e),
                e if e.is_nan() => Value::Null,
                _ => json!("inf"),
            },
            "detail": self.detail,
        })
    }

    /// The failure as one line: op, backend, case and the first differing element.
    pub(crate) fn message(&self) -> String {
        format!(
            "{} on {} (case {}): {}",
            self.op.name(),
            self.backend,
            self.case,
            self.detail.as_deref().unwrap_or("differs from the oracle")
        )
    }
}

/// The fault to inject, from [`FAULT_ENV`]: `(backend, op)`.
fn fault() -> Option<(String, String)> {
    let v = std::env::var(FAULT_ENV).ok()?;
    let (b, o) = v.split_once(':')?;
    Some((b.to_string(), o.to_string()))
}

/// Perturbs element 0 of `x` (the injected fault).
fn perturb(x: &mut [f32]) {
    if let Some(v) = x.first_mut() {
        *v += 1.0 + v.abs();
    }
}

/// Every op of `backend` against the oracle on every case; a row per (op, case).
pub(crate) fn check(
    backend: &Backend,
    cpu: &Cpu,
    lookups: &[LookupCase],
    bags: &[BagCase],
) -> Vec<ParityRow> {
    let fault = fault().filter(|(b, _)| *b == backend.name);
    let faulty = |op: Op| fault.as_ref().is_some_and(|(_, o)| o == op.name());
    let mut rows = Vec::new();
    let row = |op: Op, case: &str, status: &'static str, detail: Option<String>| ParityRow {
        backend: backend.name.clone(),
        op,
        case: case.to_string(),
        status,
        indices_identical: None,
        inexact_outputs: Vec::new(),
        max_rel_err: f64::NAN,
        detail,
    };
    for op in Op::ALL {
        if let Some(reason) = backend.lacks(op) {
            // the f16/bf16 entries' lookup is their f32 entry's: not a gap
            if reason != F32_ONLY {
                rows.push(row(op, "-", "skipped", Some(reason.into())));
            }
            continue;
        }
        let mut push = |case: &str, result: Result<(Diff, Option<bool>)>| {
            rows.push(match result {
                Ok((d, indices_identical)) => ParityRow {
                    status: if d.first.is_some() { "fail" } else { "pass" },
                    indices_identical,
                    inexact_outputs: d.inexact,
                    max_rel_err: d.max_rel_err,
                    ..row(op, case, "pass", d.first)
                },
                Err(e) => row(op, case, "error", Some(format!("{e:#}"))),
            });
        };
        match op {
            Op::Lookup | Op::LookupBackward => {
                for c in lookups {
                    push(c.name, lookup_parity(backend, cpu, op, c, faulty(op)));
                }
            }
            Op::BagForward | Op::BagBackward => {
                for c in bags {
                    push(c.name, bag_parity(backend, cpu, op, c, faulty(op)));
                }
            }
        }
    }
    rows
}

fn lookup_parity(
    backend: &Backend,
    cpu: &Cpu,
    op: Op,
    c: &LookupCase,
    faulty: bool,
) -> Result<(Diff, Option<bool>)> {
    let cfg = &c.cfg;
    let inputs = LookupInputs::new(cfg, &c.keys, &c.query, c.tokens);
    let want = memlayer_core::pkm::lookup(cfg, &c.keys, &c.query, c.tokens)?;
    let out_shape = [c.tokens, cfg.heads, cfg.knn];
    let mut d = Diff::new();
    if op == Op::Lookup {
        let mut got: Lookup = match &backend.engine {
            Ok(Engine::Browser(run)) => run.lookup(c.name)?,
            _ => backend.lookup(cpu, &inputs)?,
        };
        if faulty && let Some(i) = got.indices.first_mut() {
            *i = (*i + 1) % cfg.n_rows() as u32;
        }
        d.ids("indices", &out_shape, &got.indices, &want.indices);
        let same = got.indices == want.indices;
        d.floats("scores", &out_shape, &got.scores, &want.scores);
        d.floats("weights", &out_shape, &got.weights, &want.weights);
        return Ok((d, Some(same)));
    }
    let oracle = Backend::oracle();
    let (want_keys, want_query) = oracle.lookup_backward(cpu, &inputs, &want, &c.d_weights)?;
    let (got_keys, mut got_query) = backend.lookup_backward(cpu, &inputs, &want, &c.d_weights)?;
    if faulty {
        perturb(&mut got_query);
    }
    d.floats(
        "d_keys",
        &[cfg.heads, 2, cfg.n_keys, cfg.half()],
        &got_keys,
        &want_keys,
    );
    d.floats(
        "d_query",
        &[c.tokens, cfg.heads, cfg.k_dim],
        &got_query,
        &want_query,
    );
    Ok((d, None))
}

fn bag_parity(
    backend: &Backend,
    cpu: &Cpu,
    op: Op,
    c: &BagCase,
    faulty: bool,
) -> Result<(Diff, Option<bool>)> {
    let dtype = backend.dtype.unwrap_or(DType::F32);
    let oracle = Backend::oracle();
    let oracle_table = oracle.store(&as_stored(&c.table, dtype), c.rows, c.dim)?;
    let bags = c.bags();
    let bag_count = c.offsets.len() - 1;
    let mut d = Diff::new();
    if op == Op::BagForward {
        let want = oracle.bag_forward(cpu, &oracle_table, &bags)?;
        let mut got = match &backend.engine {
            Ok(Engine::Browser(run)) => run.bag_forward(c.name, dtype.name())?,
            _ => backend.bag_forward(cpu, &backend.store(&c.table, c.rows, c.dim)?, &bags)?,
        };
        if faulty {
            perturb(&mut got);
        }
        d.floats("out", &[bag_count, c.dim], &got, &want);
        return Ok((d, None));
    }
    let stored = backend.store(&c.table, c.rows, c.dim)?;
    let (want_grads, want_dw) = oracle.bag_backward(cpu, &oracle_table, &bags, &c.grad_out)?;
    let (mut got_grads, got_dw) = backend.bag_backward(cpu, &stored, &bags, &c.grad_out)?;
    if faulty {
        perturb(&mut got_grads.grads);
    }
    d.sparse_rows(&got_grads, &want_grads);
    let same = got_grads.rows == want_grads.rows;
    d.floats("dweights", &[c.indices.len()], &got_dw, &want_dw);
    Ok((d, Some(same)))
}
