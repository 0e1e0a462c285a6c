//! The runner's outputs: the versioned JSON (`bench.json`), the markdown
//! tables (`bench.md`), the PNG plots, and `--compare`'s per-row ratios.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use memlayer_train::plot::{BarGroup, Series, grouped_bars, line_chart};
use serde_json::{Value, json};

use super::speed::SpeedRow;

/// The JSON's `schema`; `schema_version` changes when a key changes meaning.
pub(crate) const SCHEMA: &str = "memlayer-bench";
pub(crate) const SCHEMA_VERSION: u64 = 1;

fn num(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x != 0.0 && (x.abs() >= 1e4 || x.abs() < 1e-2) => format!("{x:.3e}"),
        Some(x) => format!("{x:.3}"),
        None => match v.as_str() {
            Some(s) => s.to_string(),
            None => "–".into(),
        },
    }
}

/// Markdown cell text: no pipes, no newlines.
fn cell(s: &str) -> String {
    s.replace('|', "/").replace('\n', " ")
}

/// The string `v`, or `missing`.
fn text<'a>(v: &'a Value, missing: &'a str) -> &'a str {
    v.as_str().unwrap_or(missing)
}

fn yes_no(x: bool) -> &'static str {
    if x { "yes" } else { "no" }
}

/// A markdown table: the header row, then `rows` (cells escaped).
fn table(md: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let line = |cells: Vec<String>| format!("| {} |\n", cells.join(" | "));
    md.push_str(&line(header.iter().map(|h| h.to_string()).collect()));
    md.push_str(&line(header.iter().map(|_| "---".to_string()).collect()));
    for r in rows {
        md.push_str(&line(r.iter().map(|c| cell(c)).collect()));
    }
}

/// The markdown of a report (`doc`: the runner's JSON).
pub(crate) fn markdown(doc: &Value) -> String {
    let m = &doc["machine"];
    let mut md = String::new();
    let quick = if doc["quick"] == true { " --quick" } else { "" };
    let _ = writeln!(
        md,
        "# memlayer bench{quick}: {} ({} threads)\n",
        text(&m["cpu_model"], "unknown CPU"),
        m["threads"]
    );
    let flags: Vec<&str> = m["cpu_isa_flags"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let parity = if doc["parity_passed"] == true {
        "passed on every backend"
    } else {
        "FAILED"
    };
    let _ = writeln!(
        md,
        "ISA flags: {}; default CPU kernel family: {}. Parity: {parity}.\n\n## Backends\n",
        flags.join(" "),
        text(&m["cpu_kernel_default"], "?"),
    );
    let backends: Vec<Vec<String>> = doc["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            let details = match b["absent_reason"].as_str() {
                Some(reason) => reason.to_string(),
                None => b["info"].to_string(),
            };
            vec![
                text(&b["name"], "?").into(),
                text(&b["kind"], "?").into(),
                text(&b["dtype"], "–").into(),
                yes_no(b["present"] == true).into(),
                details,
            ]
        })
        .collect();
    table(
        &mut md,
        &["backend", "kind", "dtype", "present", "details"],
        &backends,
    );
    // parity, one line per (backend, op) over its cases
    let mut per_op: BTreeMap<(String, String), Vec<&Value>> = BTreeMap::new();
    for r in doc["parity"].as_array().into_iter().flatten() {
        let key = (
            text(&r["backend"], "?").to_string(),
            text(&r["op"], "?").to_string(),
        );
        per_op.entry(key).or_default().push(r);
    }
    let _ = writeln!(
        md,
        "\n## Parity against `cpu_oracle` (tolerance {} relative)\n",
        doc["parity_tolerance"]
    );
    let parity_rows: Vec<Vec<String>> = per_op
        .iter()
        .map(|((backend, op), rows)| {
            let passed = rows.iter().filter(|r| r["status"] == "pass").count();
            let skipped = rows.iter().all(|r| r["status"] == "skipped");
            let mut inexact: Vec<&str> = rows
                .iter()
                .flat_map(|r| r["inexact_outputs"].as_array().into_iter().flatten())
                .filter_map(Value::as_str)
                .collect();
            inexact.sort_unstable();
            inexact.dedup();
            let indices: Vec<bool> = rows
                .iter()
                .filter_map(|r| r["indices_identical"].as_bool())
                .collect();
            let max_err = rows
                .iter()
                .filter(|r| r["status"] != "skipped")
                .map(|r| r["max_rel_err"].as_f64().unwrap_or(f64::INFINITY))
                .fold(0.0f64, f64::max);
            let first = rows
                .iter()
                .find_map(|r| {
                    Some(format!(
                        "{}: {}",
                        text(&r["case"], "?"),
                        r["detail"].as_str()?
                    ))
                })
                .unwrap_or_default();
            vec![
                backend.clone(),
                op.clone(),
                if skipped {
                    "skipped".into()
                } else {
                    format!("{passed}/{}", rows.len())
                },
                if indices.is_empty() {
                    "–".into()
                } else {
                    yes_no(indices.iter().all(|&x| x)).into()
                },
                if skipped {
                    "–".into()
                } else if inexact.is_empty() {
                    "yes".into()
                } else {
                    format!("no ({})", inexact.join(", "))
                },
                if skipped {
                    "–".into()
                } else {
                    num(&json!(max_err))
                },
                first,
            ]
        })
        .collect();
    table(
        &mut md,
        &[
            "backend",
            "op",
            "cases passed",
            "indices identical",
            "bit-identical",
            "max rel. error",
            "first difference",
        ],
        &parity_rows,
    );
    md.push_str(
        "\n## Speed\n\nFraction: the figure's bytes per second over its device's ceiling \
         (CPU: read bandwidth; GPU: copy kernel), measured in the same run.\n\n",
    );
    let speed_rows: Vec<Vec<String>> = doc["speed"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let value = match r["error"].as_str() {
                Some(e) => format!("error: {e}"),
                None => num(&r["value"]),
            };
            vec![
                text(&r["backend"], "?").into(),
                text(&r["op"], "?").into(),
                text(&r["param"], "").into(),
                value,
                text(&r["unit"], "").into(),
                num(&r["fraction_of_ceiling"]),
                text(&r["ceiling"], "–").into(),
            ]
        })
        .collect();
    table(
        &mut md,
        &[
            "backend",
            "op",
            "param",
            "value",
            "unit",
            "fraction of ceiling",
            "ceiling",
        ],
        &speed_rows,
    );
    if let Some(c) = doc["ceilings_gbps"].as_object() {
        md.push_str("\n## Ceilings (GB/s)\n\n");
        for (k, v) in c {
            let _ = writeln!(md, "- {k}: {}", num(v));
        }
    }
    md
}

/// A backend's name without its dtype suffix, and the dtype.
fn split_dtype(name: &str) -> (&str, &str) {
    for d in ["_f32", "_f16", "_bf16"] {
        if let Some(base) = name.strip_suffix(d) {
            return (base, &d[1..]);
        }
    }
    (name, "f32")
}

/// A device's short label on a chart's x axis (`avx512`, `vulkan_llvmpipe`).
fn chart_label(device: &str) -> String {
    ["cpu_fast_", "wgpu_"]
        .iter()
        .find_map(|p| device.strip_prefix(p))
        .unwrap_or(device)
        .to_string()
}

/// GB/s of `op` per device (categories) and dtype (groups).
fn gbps_chart(path: &Path, speed: &[SpeedRow], op: &str) -> Result<bool> {
    let mut devices: Vec<String> = Vec::new();
    let mut values: BTreeMap<(String, String), f64> = BTreeMap::new();
    for r in speed.iter().filter(|r| r.op == op) {
        let Some(v) = r.value else { continue };
        let (device, dtype) = split_dtype(&r.backend);
        if !devices.iter().any(|d| d == device) {
            devices.push(device.to_string());
        }
        values.insert((device.to_string(), dtype.to_string()), v);
    }
    if devices.is_empty() {
        return Ok(false);
    }
    let groups: Vec<BarGroup> = ["f32", "f16", "bf16"]
        .iter()
        .map(|d| BarGroup {
            name: (*d).into(),
            values: devices
                .iter()
                .map(|dev| {
                    values
                        .get(&(dev.clone(), (*d).to_string()))
                        .copied()
                        .unwrap_or(0.0)
                })
                .collect(),
            errors: Vec::new(),
        })
        .collect();
    let labels: Vec<String> = devices.iter().map(|d| chart_label(d)).collect();
    grouped_bars(
        path,
        &format!("{op}, GB/s per backend and dtype"),
        &labels,
        "GB/s",
        &groups,
    )
    .with_context(|| format!("plotting {}", path.display()))?;
    Ok(true)
}

/// Lookup µs/token against N, one line per backend (log y; x = log2 N).
fn lookup_chart(path: &Path, speed: &[SpeedRow]) -> Result<bool> {
    let mut series: Vec<Series> = Vec::new();
    for r in speed.iter().filter(|r| r.op == "lookup") {
        let (Some(v), Some(n)) = (r.value, r.n_rows) else {
            continue;
        };
        let point = ((n as f64).log2(), v.max(1e-6));
        match series.iter_mut().find(|s| s.name == r.backend) {
            Some(s) => s.points.push(point),
            None => series.push(Series {
                name: r.backend.clone(),
                points: vec![point],
            }),
        }
    }
    if series.is_empty() {
        return Ok(false);
    }
    line_chart(
        path,
        "product-key lookup",
        "log2 N (rows)",
        "us per token",
        &series,
        true,
    )
    .with_context(|| format!("plotting {}", path.display()))?;
    Ok(true)
}

/// Decode tok/s per budget (categories), one bar per runtime.
fn decode_chart(path: &Path, speed: &[SpeedRow]) -> Result<bool> {
    let rows: Vec<&SpeedRow> = speed
        .iter()
        .filter(|r| r.op == "decode" && r.value.is_some())
        .collect();
    let mut budgets: Vec<String> = Vec::new();
    let mut runtimes: Vec<String> = Vec::new();
    for r in &rows {
        if !budgets.contains(&r.param) {
            budgets.push(r.param.clone());
        }
        if !runtimes.contains(&r.backend) {
            runtimes.push(r.backend.clone());
        }
    }
    if rows.is_empty() {
        return Ok(false);
    }
    let groups: Vec<BarGroup> = runtimes
        .iter()
        .map(|rt| BarGroup {
            name: rt.clone(),
            values: budgets
                .iter()
                .map(|b| {
                    rows.iter()
                        .find(|r| &r.backend == rt && &r.param == b)
                        .and_then(|r| r.value)
                        .unwrap_or(0.0)
                })
                .collect(),
            errors: Vec::new(),
        })
        .collect();
    grouped_bars(path, "decode tok/s per budget", &budgets, "tok/s", &groups)
        .with_context(|| format!("plotting {}", path.display()))?;
    Ok(true)
}

/// Draws every plot that has data into `dir`; returns the files written.
pub(crate) fn plots(dir: &Path, speed: &[SpeedRow]) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for (file, op) in [
        ("bag_forward_gbps.png", "bag_forward"),
        ("bag_backward_gbps.png", "bag_backward"),
    ] {
        let path = dir.join(file);
        if gbps_chart(&path, speed, op)? {
            written.push(path);
        }
    }
    let path = dir.join("lookup_us_vs_n.png");
    if lookup_chart(&path, speed)? {
        written.push(path);
    }
    let path = dir.join("decode_tok_s.png");
    if decode_chart(&path, speed)? {
        written.push(path);
    }
    Ok(written)
}

/// One row of `--compare`.
pub(crate) struct Compared {
    pub(crate) key: String,
    pub(crate) base: f64,
    pub(crate) new: f64,
    pub(crate) unit: String,
    /// new / base.
    pub(crate) ratio: f64,
    /// Slower than the base by more than the threshold.
    pub(crate) regression: bool,
}

/// This run's rows against `base` (an earlier `bench.json`): a row is a
/// regression when it is slower than the base by more than `threshold`
/// (0.10: 10 %), in its own direction (GB/s and tok/s higher, µs and ms lower).
pub(crate) fn compare(base: &Value, speed: &[SpeedRow], threshold: f64) -> Result<Vec<Compared>> {
    if base["schema"] != SCHEMA {
        bail!("not a `memlayer bench` report (schema {})", base["schema"]);
    }
    let version = base["schema_version"].as_u64().unwrap_or(0);
    if version != SCHEMA_VERSION {
        bail!("report schema version {version}, this runner writes {SCHEMA_VERSION}");
    }
    let base_rows: BTreeMap<&str, f64> = base["speed"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| Some((r["key"].as_str()?, r["value"].as_f64()?)))
        .collect();
    Ok(speed
        .iter()
        .filter_map(|r| {
            let new = r.value?;
            let base = *base_rows.get(r.key().as_str())?;
            if base <= 0.0 || new <= 0.0 {
                return None;
            }
            let ratio = new / base;
            let speedup = if r.higher_is_better {
                ratio
            } else {
                1.0 / ratio
            };
            Some(Compared {
                key: r.key(),
                base,
                new,
                unit: r.unit.into(),
                ratio,
                regression: speedup < 1.0 - threshold,
            })
        })
        .collect())
}

pub(crate) fn compared_json(rows: &[Compared], threshold: f64, base: &Path) -> Value {
    json!({
        "base": base, "threshold": threshold,
        "regressions": rows.iter().filter(|c| c.regression).count(),
        "rows": rows.iter().map(|c| json!({
            "key": c.key, "base": c.base, "new": c.new, "unit": c.unit,
            "ratio_new_over_base": c.ratio, "regression": c.regression,
        })).collect::<Vec<_>>(),
    })
}

pub(crate) fn print_compared(rows: &[Compared], threshold: f64) {
    println!(
        "\ncompared with the base (regression: slower by more than {:.0} %)",
        threshold * 100.0
    );
    println!(
        "{:<60} {:>12} {:>12} {:>10} {:>8}",
        "row", "base", "new", "unit", "new/base"
    );
    for c in rows {
        println!(
            "{:<60} {:>12.4} {:>12.4} {:>10} {:>7.3}x{}",
            c.key,
            c.base,
            c.new,
            c.unit,
            c.ratio,
            if c.regression { "  REGRESSION" } else { "" }
        );
    }
}
