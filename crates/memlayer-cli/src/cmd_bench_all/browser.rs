//! The `webgpu_chromium_<dtype>` backends: the WGSL lookup and bag forward on
//! WebGPU in headless Chromium (SwiftShader on a machine without a GPU),
//! through the browser harness: `web/` served on 127.0.0.1 by an in-process
//! `memlayer serve`, `web/tests/kernels.mjs` (playwright-core) calling the wasm
//! bundle's `kernelCheck` (`crates/memlayer-web/src/kernel_check.rs`). One
//! browser session answers every parity case of every dtype and the timed
//! figures; the three backends share it. The backward ops do not run there
//! (their host calls read back synchronously, which a browser cannot).

use std::cell::OnceCell;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::rc::Rc;

use anyhow::{Context, Result, anyhow, bail};
use memlayer_core::pkm::Lookup;
use serde_json::{Value, json};

use super::backends::{Backend, DTYPES, Engine};
use super::parity::{BagCase, LookupCase, bag_cases, lookup_cases};

/// Where the browser harness is and what the session asks.
pub(crate) struct BrowserRun {
    web_dir: PathBuf,
    chromium: PathBuf,
    quick: bool,
    /// Where the request and the answer are kept.
    raw_dir: PathBuf,
    answer: OnceCell<Result<Value, String>>,
}

/// The browser backends, or one absent entry naming what is missing.
pub(crate) fn backends(
    web_dir: &Path,
    chromium: &Path,
    quick: bool,
    raw_dir: &Path,
) -> Vec<Backend> {
    let mut missing = Vec::new();
    let bundle = web_dir.join("pkg/memlayer_web.js");
    match std::fs::read_to_string(&bundle) {
        Ok(js) if js.contains("kernelCheck") => {}
        Ok(_) => missing.push(format!(
            "{} predates kernelCheck (run scripts/build-web.sh)",
            bundle.display()
        )),
        Err(_) => missing.push(format!("{} (run scripts/build-web.sh)", bundle.display())),
    }
    if !web_dir.join("node_modules/playwright-core").is_dir() {
        missing.push(format!(
            "{}/node_modules (run `npm ci` there)",
            web_dir.display()
        ));
    }
    if Command::new("node").arg("--version").output().is_err() {
        missing.push("node".into());
    }
    if !chromium.exists() {
        missing.push(format!("{} (--chromium or $CHROMIUM)", chromium.display()));
    }
    let info = json!({
        "harness": "web/tests/kernels.mjs (playwright-core) → the wasm bundle's kernelCheck",
        "chromium": chromium, "flags": "--headless --enable-unsafe-webgpu",
    });
    if !missing.is_empty() {
        return vec![Backend::browser_absent(
            info,
            format!("missing: {}", missing.join(", ")),
        )];
    }
    let run = Rc::new(BrowserRun {
        web_dir: web_dir.to_path_buf(),
        chromium: chromium.to_path_buf(),
        quick,
        raw_dir: raw_dir.to_path_buf(),
        answer: OnceCell::new(),
    });
    DTYPES
        .into_iter()
        .map(|d| {
            Backend::browser(
                format!("webgpu_chromium_{}", d.name()),
                d,
                info.clone(),
                Rc::clone(&run),
            )
        })
        .collect()
}

/// A bag case's name in the request: one per dtype.
fn bag_key(case: &str, dtype: &str) -> String {
    format!("{case}/{dtype}")
}

fn lookup_json(c: &LookupCase) -> Value {
    json!({
        "name": c.name, "heads": c.cfg.heads, "n_keys": c.cfg.n_keys, "k_dim": c.cfg.k_dim,
        "knn": c.cfg.knn, "qk_norm": c.cfg.qk_norm, "tokens": c.tokens,
        "keys": c.keys, "query": c.query,
    })
}

fn bag_json(c: &BagCase, dtype: &str) -> Value {
    json!({
        "name": bag_key(c.name, dtype), "dtype": dtype, "rows": c.rows, "dim": c.dim,
        "table": c.table, "indices": c.indices, "weights": c.weights, "offsets": c.offsets,
    })
}

impl BrowserRun {
    /// The session's answer (run on first use).
    fn answer(&self) -> Result<&Value> {
        self.answer
            .get_or_init(|| self.run().map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow!("the browser session failed: {e}"))
    }

    /// The answer's device description, once the session ran.
    pub(crate) fn device(&self) -> Value {
        match self.answer.get() {
            Some(Ok(a)) => {
                let d = &a["device"];
                json!({
                    "adapter": d["adapter"], "backend": d["backend"], "limits": d["limits"],
                    "user_agent": a["userAgent"],
                })
            }
            _ => Value::Null,
        }
    }

    fn run(&self) -> Result<Value> {
        let bags: Vec<Value> = bag_cases()
            .iter()
            .flat_map(|c| DTYPES.map(|d| bag_json(c, d.name())))
            .collect();
        let request = json!({
            "lookups": lookup_cases().iter().map(lookup_json).collect::<Vec<_>>(),
            "bags": bags,
            "speed": {
                "rows": 1 << 16, "dim": 128, "bags": 256, "bag_size": 64,
                "n_keys": if self.quick { vec![128] } else { vec![128, 512] },
                "heads": 4, "knn": 32, "k_dim": 128, "tokens": 8,
                "copy_bytes": 16 << 20, "repeats": if self.quick { 3 } else { 5 },
            },
        });
        let request_path = self.raw_dir.join("browser_request.json");
        std::fs::write(&request_path, request.to_string())
            .with_context(|| format!("writing {}", request_path.display()))?;
        let config =
            memlayer_http::ServeConfig::new(([127, 0, 0, 1], 0).into()).mount("/", &self.web_dir);
        let server = memlayer_http::Server::start(config)
            .map_err(|e| anyhow!("serving {}: {e}", self.web_dir.display()))?;
        let out = Command::new("node")
            .current_dir(&self.web_dir)
            .arg("tests/kernels.mjs")
            .args(["--url", &format!("{}/", server.url()), "--request"])
            .arg(&request_path)
            .arg("--chromium")
            .arg(&self.chromium)
            .output()
            .context("running node tests/kernels.mjs");
        server.shutdown();
        let out = out?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        std::fs::write(self.raw_dir.join("browser.log"), stderr.as_bytes())
            .context("writing the browser's log")?;
        if !out.status.success() {
            let last = stderr.lines().rev().take(3).collect::<Vec<_>>();
            bail!(
                "kernels.mjs exited with {}: {}",
                out.status,
                last.join(" / ")
            );
        }
        let answer: Value =
            serde_json::from_slice(&out.stdout).context("parsing kernels.mjs's answer")?;
        std::fs::write(self.raw_dir.join("browser_answer.json"), answer.to_string())
            .context("writing the browser's answer")?;
        Ok(answer)
    }

    /// The browser's lookup of case `name`.
    pub(crate) fn lookup(&self, name: &str) -> Result<Lookup> {
        let a = self.answer()?;
        let l = a["lookups"]
            .as_array()
            .and_then(|v| v.iter().find(|l| l["name"] == name))
            .with_context(|| format!("the browser gave no lookup {name:?}"))?;
        Ok(Lookup {
            indices: serde_json::from_value(l["indices"].clone())?,
            scores: floats(&l["scores"])?,
            weights: floats(&l["weights"])?,
        })
    }

    /// The browser's bag forward of case `name` over a table of `dtype`.
    pub(crate) fn bag_forward(&self, name: &str, dtype: &str) -> Result<Vec<f32>> {
        let key = bag_key(name, dtype);
        let a = self.answer()?;
        let b = a["bags"]
            .as_array()
            .and_then(|v| v.iter().find(|b| b["name"] == key.as_str()))
            .with_context(|| format!("the browser gave no bag {key:?}"))?;
        floats(&b["out"])
    }

    /// The timed figures for `dtype`, and the copy kernel's GB/s (their ceiling).
    pub(crate) fn speed(&self, dtype: &str) -> Result<(Vec<BrowserFigure>, Option<f64>)> {
        let a = self.answer()?;
        let figures = a["speed"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["dtype"] == dtype)
            .filter_map(|s| {
                Some(BrowserFigure {
                    op: s["op"].as_str()?.to_string(),
                    n_rows: s["n_rows"].as_u64().map(|n| n as usize),
                    value: s["value"].as_f64()?,
                    bytes_per_second: s["bytes_per_second"].as_f64()?,
                })
            })
            .collect();
        Ok((figures, a["copy_gbps"].as_f64()))
    }
}

/// One figure the browser timed.
pub(crate) struct BrowserFigure {
    /// `bag_forward` (GB/s) or `lookup` (µs per token).
    pub(crate) op: String,
    /// N of a lookup.
    pub(crate) n_rows: Option<usize>,
    pub(crate) value: f64,
    pub(crate) bytes_per_second: f64,
}

/// JSON numbers as f32 (a NaN or infinity arrives as null: kept as NaN, so
/// the comparison reports it).
fn floats(v: &Value) -> Result<Vec<f32>> {
    let a = v.as_array().context("not an array")?;
    Ok(a.iter()
        .map(|x| x.as_f64().map_or(f32::NAN, |f| f as f32))
        .collect())
}

impl Backend {
    /// A browser backend sharing `run`.
    fn browser(name: String, d: memlayer_cpu::DType, info: Value, run: Rc<BrowserRun>) -> Self {
        Self::present(name, "webgpu_chromium", Some(d), info, Engine::Browser(run))
    }

    fn browser_absent(info: Value, reason: String) -> Self {
        Self::absent("webgpu_chromium", "webgpu_chromium", info, reason)
    }
}
