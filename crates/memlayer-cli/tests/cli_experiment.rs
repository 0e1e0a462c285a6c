//! `memlayer experiment --quick`: the smoke test of the memory-vs-dense grid.
//! It checks that the report is produced, complete and consistent, and that
//! a rerun reuses the finished runs; it does not judge the numbers (the
//! quick grid trains for 150 steps).

mod common;

use common::{assert_ok, memlayer, text};
use serde_json::Value;
use std::path::Path;

fn json(path: &Path) -> Value {
    let t = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&t).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Equal JSON, numbers to 1e-12 relative (serde_json's default float
/// parsing may be one ulp off).
fn assert_close(a: &Value, b: &Value, at: &str) {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (f(&Value::Number(x.clone())), f(&Value::Number(y.clone())));
            assert!(
                (x - y).abs() <= 1e-12 * x.abs().max(y.abs()),
                "{at}: {x} vs {y}"
            );
        }
        (Value::Array(x), Value::Array(y)) => {
            assert_eq!(x.len(), y.len(), "{at}");
            for (i, (x, y)) in x.iter().zip(y).enumerate() {
                assert_close(x, y, &format!("{at}[{i}]"));
            }
        }
        (Value::Object(x), Value::Object(y)) => {
            assert_eq!(
                x.keys().collect::<Vec<_>>(),
                y.keys().collect::<Vec<_>>(),
                "{at}"
            );
            for (k, v) in x {
                assert_close(v, &y[k], &format!("{at}.{k}"));
            }
        }
        _ => assert_eq!(a, b, "{at}"),
    }
}

#[test]
fn quick_grid_writes_a_complete_report_and_reuses_finished_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("exp");
    let out_s = out.to_str().unwrap();
    let stdout = assert_ok(&memlayer(&["experiment", "--quick", "--out", out_s]));
    assert!(stdout.contains("report: "), "{stdout}");

    let r = json(&out.join("report.json"));
    let variants = r["variants"].as_array().unwrap();
    let names: Vec<&str> = variants
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["dense-1x", "dense-2x", "dense-4x", "pkm", "hier", "hier-nn"]
    );
    let seeds = r["grid"]["seeds"].as_array().unwrap().len();
    assert!(seeds >= 2);
    assert_eq!(r["runs"].as_array().unwrap().len(), 6 * seeds);
    assert_eq!(r["reused_runs"], 0);
    for v in variants {
        let name = v["name"].as_str().unwrap();
        // every per-seed figure is there and finite
        for key in [
            "train_seconds",
            "final_loss",
            "heldout_loss",
            "recall",
            "ranked_recall",
        ] {
            let vals = v[key]["values"].as_array().unwrap();
            assert_eq!(vals.len(), seeds, "{name} {key}");
            assert!(
                vals.iter().all(|x| f(x).is_finite()),
                "{name} {key}: {vals:?}"
            );
        }
        let buckets = v["buckets"].as_array().unwrap();
        assert_eq!(buckets.len(), 4, "{name}");
        for b in buckets {
            let rec = &b["recall"];
            assert!((0.0..=1.0).contains(&f(&rec["mean"])), "{name}: {b}");
            assert!(f(&rec["spread"]) >= 0.0);
            assert!(b["queries"].as_u64().unwrap() > 0);
        }
        // FLOPs per token: dense multiples and memory within 10 % of the base
        let ratio = f(&v["flops_ratio"]);
        let want = match name {
            "dense-2x" => 2.0,
            "dense-4x" => 4.0,
            _ => 1.0,
        };
        let tol = if name.starts_with("dense") {
            0.05
        } else {
            0.10
        };
        assert!((ratio / want - 1.0).abs() <= tol, "{name}: {ratio}");
    }
    let facts = &r["grid_facts"];
    assert!(f(&facts["hier_fetched_fraction"]) <= 0.10);
    assert!(f(&facts["hier_bank_ratio"]) >= 10.0);
    // pkm vs dense-2x, and each hierarchical memory vs its anchor; both metrics
    assert_eq!(r["targets"].as_array().unwrap().len(), 6);
    let routing = r["routing"].as_array().unwrap();
    assert_eq!(routing.len(), 2);
    assert_eq!(routing[1]["routing"], "nearest_context");
    for v in routing {
        let buckets = v["buckets"].as_array().unwrap();
        assert_eq!(buckets.len(), 4, "{v}");
        for b in buckets {
            assert_eq!(b["agreement"].as_array().unwrap().len(), 3, "{b}");
        }
    }
    // the nearest-context model directory carries its index: evaluated from
    // disk it routes and scores exactly as during the run
    let nn = out.join("runs/hier-nn-s1");
    assert!(nn.join("context_index.json").exists());
    let eval_json = tmp.path().join("eval-nn.json");
    assert_ok(&memlayer(&[
        "eval",
        nn.to_str().unwrap(),
        "--json",
        eval_json.to_str().unwrap(),
    ]));
    let from_disk = json(&eval_json);
    let during_run = json(&nn.join("report.json"));
    assert_close(
        &from_disk["buckets"],
        &during_run["eval"]["buckets"],
        "eval",
    );

    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for needle in [
        "## Variants",
        "1-2",
        "32+",
        "## Targets",
        "## Routing",
        "dense-2x",
        "recall_by_bucket.png",
    ] {
        assert!(md.contains(needle), "report.md lacks {needle}:\n{md}");
    }
    for png in [
        "recall_by_bucket.png",
        "ranked_recall_by_bucket.png",
        "recall_vs_flops.png",
        "ranked_recall_vs_flops.png",
        "loss.png",
    ] {
        let bytes = std::fs::read(out.join(png)).unwrap();
        assert!(bytes.len() > 1000 && bytes.starts_with(b"\x89PNG"), "{png}");
    }
    // each run is a model directory
    for file in [
        "model.safetensors",
        "memory.bank",
        "tokenizer.json",
        "report.json",
    ] {
        assert!(out.join("runs/pkm-s1").join(file).exists(), "{file}");
    }

    // a rerun trains nothing and reproduces the figures
    let again = memlayer(&["experiment", "--quick", "--out", out_s]);
    assert_ok(&again);
    let r2 = json(&out.join("report.json"));
    assert_eq!(r2["reused_runs"].as_u64().unwrap() as usize, 6 * seeds);
    assert_close(&r2["variants"], &r["variants"], "variants");

    // a run directory of another config is refused, by name
    let train_json = out.join("runs/hier-s2/train.json");
    let t = std::fs::read_to_string(&train_json).unwrap();
    std::fs::write(&train_json, t.replace("\"steps\": 150", "\"steps\": 151")).unwrap();
    let refused = memlayer(&["experiment", "--quick", "--out", out_s]);
    let err = text(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{err}");
    assert!(
        err.contains("\nerror: ") && !err.contains("panicked"),
        "{err}"
    );
    assert!(
        err.contains("hier-s2") && err.contains("different experiment config"),
        "{err}"
    );
}
