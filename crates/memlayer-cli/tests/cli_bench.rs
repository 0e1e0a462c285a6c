//! `memlayer bench kernels --quick` and the cross-backend runner (`memlayer
//! bench --quick --out DIR`) end to end: they finish and write the documented
//! JSON keys; the runner's parity pass fails the run on a differing backend
//! and `--compare` flags regressions. Numbers are checked for being measured
//! (positive, finite) — never against a speed.

use std::process::Command;

use serde_json::Value;

/// Asserts that `out` is a successful run (its output in the message) and
/// reads the JSON it wrote at `json`.
fn succeeded_with_json(out: &std::process::Output, json: &std::path::Path) -> Value {
    assert!(
        out.status.success(),
        "bench failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap()
}

fn positive(v: &Value, what: &str) -> f64 {
    let x = v
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"));
    assert!(x.is_finite() && x > 0.0, "{what} = {x}");
    x
}

/// A stand-in for `scripts/bench_torch_bag.py --paired` (no torch needed).
/// At dim 256: f32 answers every request with calls of 0.5 s; f16 dies at its
/// first request; bf16 answers with one call too many. At dim 64 f32 never
/// gets ready (the others answer as at dim 256).
const FAKE_TORCH: &str = r#"
import json, sys, time
args = sys.argv[1:]
dtype = args[args.index("--dtype") + 1]
dim = int(args[args.index("--dim") + 1])
assert "--paired" in args, args
if dim == 64 and dtype == "f32":
    time.sleep(3600)
print(json.dumps({"ready": True, "torch_version": "fake", "threads": 1}), flush=True)
for line in sys.stdin:
    words = line.split()
    if words == ["quit"]:
        break
    n = int(words[1])
    if dtype == "f16":
        sys.stderr.write("fake torch: gone\n")
        sys.exit(3)
    extra = 1 if dtype == "bf16" else 0
    print(json.dumps({"seconds": [0.5] * (n + extra)}), flush=True)
"#;

/// The torch peer runs in rounds interleaved with memlayer's calls: its
/// answers become `torch_cpu*` and `bag_fwd_vs_torch_rounds`; a peer that
/// dies, answers wrongly or falls silent is named in `errors` (the silent one
/// stopped after `--torch-timeout`) and the run goes on.
#[test]
fn torch_peer_in_rounds_and_its_failures_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("fake_torch.py");
    std::fs::write(&script, FAKE_TORCH).unwrap();
    let json = dir.path().join("bench.json");
    let out = Command::new(env!("CARGO_BIN_EXE_memlayer"))
        .args(["bench", "kernels", "--quick", "--threads", "1"])
        .args(["--adapter", "no-such-adapter", "--python", "python3"])
        .args(["--extra-dims", "64", "--torch-timeout", "3"])
        .arg("--torch-script")
        .arg(&script)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let r = succeeded_with_json(&out, &json);
    let bag = &r["bag_fwd_gbps"];
    let shape = &r["shapes"]["bag"];
    let gathered = ["bags", "bag_size", "dim"]
        .iter()
        .map(|k| shape[*k].as_f64().unwrap())
        .product::<f64>()
        * 4.0;
    // f32: torch's figure is the fake's 0.5 s per call, paired with memlayer's calls
    let torch = positive(&bag["torch_cpu"], "torch_cpu");
    assert!(
        (torch - gathered / 0.5 / 1e9).abs() < 1e-9 * torch.max(1.0),
        "{torch}"
    );
    let rounds = &r["bag_fwd_vs_torch_rounds"]["cpu_fast"];
    assert_eq!(rounds["rounds"], shape["rounds"], "{rounds}");
    assert_eq!(rounds["calls_per_burst"], 3, "{rounds}");
    let (lo, mid, hi) = (
        positive(&rounds["ratio_min"], "ratio_min"),
        positive(&rounds["ratio_median"], "ratio_median"),
        positive(&rounds["ratio_max"], "ratio_max"),
    );
    assert!(lo <= mid && mid <= hi, "{rounds}");
    assert_eq!(r["bag_fwd_vs_torch"]["cpu_fast"].as_f64(), Some(mid));
    positive(&rounds["memlayer_gbps"], "memlayer_gbps");
    assert_eq!(r["torch"]["version"], "fake");
    // f16: the script died; bf16: it answered one call too many
    let errors: Vec<&str> = r["errors"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for (key, says) in [
        ("torch_cpu_f16", "fake torch: gone"),
        ("torch_cpu_bf16", "for 3 calls"),
    ] {
        assert!(bag[key].is_null(), "{key} = {}", bag[key]);
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with(key) && e.contains(says)),
            "{key}: {errors:?}"
        );
        assert!(
            r["bag_fwd_vs_torch"]
                .get(key.replace("torch_cpu", "cpu_fast"))
                .is_none()
        );
    }
    // dim 64: f32 fell silent and was stopped
    let d64 = &r["bag_fwd_by_dim"]["64"];
    assert!(d64["bag_fwd_gbps"]["torch_cpu"].is_null(), "{d64}");
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("torch_cpu (dim 64)") && e.contains("no answer in 3 s")),
        "{errors:?}"
    );
    assert!(
        d64["bag_fwd_vs_torch_rounds"].get("cpu_fast").is_none(),
        "{d64}"
    );
}

#[test]
fn quick_run_writes_the_report() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let out = Command::new(env!("CARGO_BIN_EXE_memlayer"))
        .args([
            "bench",
            "kernels",
            "--quick",
            "--adapter",
            "vulkan",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    let r = succeeded_with_json(&out, &json);
    let bag = &r["bag_fwd_gbps"];
    for k in ["cpu_oracle", "cpu_fast", "cpu_fast_f16", "cpu_fast_bf16"] {
        positive(&bag[k], k);
    }
    // torch is measured when installed and recorded as null (with the reason) when not
    for k in ["torch_cpu", "torch_cpu_f16", "torch_cpu_bf16"] {
        let v = &bag[k];
        assert!(
            v.is_null() || v.as_f64().is_some_and(|x| x > 0.0),
            "{k} = {v}"
        );
        if v.is_null() {
            assert!(
                !r["torch"]["error"].is_null() || !r["errors"].as_array().unwrap().is_empty(),
                "torch is null without a reason: {r}"
            );
        }
    }
    positive(&r["copy_gbps"]["cpu"], "copy_gbps.cpu");
    positive(&r["read_gbps"]["cpu"], "read_gbps.cpu");
    positive(
        &r["bag_fwd_fraction_of_read"]["cpu_fast"],
        "bag_fwd_fraction_of_read.cpu_fast",
    );
    // the machine and the ISA path chosen are recorded
    assert!(
        r["cpu_model"].as_str().is_some_and(|m| !m.is_empty()),
        "{r}"
    );
    let chosen = r["cpu_kernel"].as_str().expect("cpu_kernel");
    let available: Vec<&str> = r["cpu_kernels_available"]
        .as_array()
        .expect("cpu_kernels_available")
        .iter()
        .filter_map(|k| k.as_str())
        .collect();
    assert_eq!(
        available.first(),
        Some(&chosen),
        "the best family is chosen: {r}"
    );
    for n in ["65536", "1048576"] {
        positive(&r["lookup_us_per_token"][n], n);
        positive(&r["lookup_bruteforce_us_per_token"][n], n);
    }
    assert!(r["shapes"]["bag"]["rows"].as_u64().is_some());
    let gpu_required = std::env::var("MEMLAYER_REQUIRE_GPU").is_ok_and(|v| v == "1");
    let wgpu: Vec<&String> = bag
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| k.starts_with("wgpu_"))
        .collect();
    if gpu_required {
        assert!(!wgpu.is_empty(), "no wgpu adapter measured: {r}");
    }
    for k in wgpu {
        positive(&bag[k.as_str()], k);
        let adapter = k.trim_end_matches("_f16");
        positive(&r["copy_gbps"][adapter], adapter);
    }
}

/// The fault-injection variable of the runner's parity pass (test only).
const FAULT_ENV: &str = "MEMLAYER_BENCH_FAULT";

fn runner(args: &[&str], out: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_memlayer"));
    cmd.arg("bench")
        .args(args)
        .arg("--out")
        .arg(out)
        .env_remove(FAULT_ENV);
    cmd
}

fn read_json(path: &std::path::Path) -> Value {
    let text = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&text).unwrap()
}

/// `memlayer bench --quick --out DIR` (no subcommand: every backend): parity
/// passed on every backend found, and DIR holds the versioned JSON with the
/// `backends` list and the parity results, the markdown and PNG plots.
#[test]
fn runner_quick_checks_parity_on_every_backend_and_writes_the_report() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("run");
    let out = runner(&["--quick"], &out_dir).output().unwrap();
    let r = succeeded_with_json(&out, &out_dir.join("bench.json"));
    assert_eq!(r["schema"], "memlayer-bench", "{r}");
    assert_eq!(r["schema_version"], 1, "{r}");
    assert!(
        r["machine"]["cpu_model"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{r}"
    );
    let backends = r["backends"].as_array().expect("backends");
    let present = |kind: &str| -> Vec<&str> {
        backends
            .iter()
            .filter(|b| b["kind"] == kind && b["present"] == true)
            .filter_map(|b| b["name"].as_str())
            .collect()
    };
    assert_eq!(present("cpu_oracle"), ["cpu_oracle"], "{r}");
    for dtype in ["f32", "f16", "bf16"] {
        assert!(
            present("cpu_fast")
                .iter()
                .any(|n| n.ends_with(&format!("_{dtype}"))),
            "no cpu_fast {dtype} backend: {r}"
        );
    }
    // every absent backend says why
    for b in backends.iter().filter(|b| b["present"] == false) {
        assert!(
            b["absent_reason"].as_str().is_some_and(|s| !s.is_empty()),
            "{b}"
        );
    }
    // parity: every row passed (or names the op the backend lacks), and
    // every backend with kernels was checked
    let parity = r["parity"].as_array().expect("parity");
    assert_eq!(r["parity_passed"], true, "{r}");
    for row in parity {
        let skipped = row["status"] == "skipped" && row["detail"].is_string();
        assert!(row["status"] == "pass" || skipped, "{row}");
    }
    for kind in ["cpu_fast", "wgpu", "cuda", "webgpu_chromium"] {
        for name in present(kind) {
            let ops: Vec<&str> = parity
                .iter()
                .filter(|p| p["backend"] == name)
                .filter_map(|p| p["op"].as_str())
                .collect();
            assert!(ops.contains(&"bag_forward"), "{name} not checked: {ops:?}");
            if name.ends_with("_f32") {
                assert!(ops.contains(&"lookup"), "{name}: no lookup parity");
            }
        }
    }
    let gpu_required = std::env::var("MEMLAYER_REQUIRE_GPU").is_ok_and(|v| v == "1");
    if gpu_required {
        assert!(
            !present("wgpu").is_empty(),
            "no wgpu adapter among the backends: {r}"
        );
        // CI builds web/pkg and web/node_modules first (scripts/test.sh)
        assert!(
            !present("webgpu_chromium").is_empty(),
            "no WebGPU in headless Chromium among the backends: {r}"
        );
    }
    // speed is reported (measured), never asserted
    let speed = r["speed"].as_array().expect("speed");
    let oracle_fwd = speed
        .iter()
        .find(|s| s["backend"] == "cpu_oracle" && s["op"] == "bag_forward")
        .expect("the oracle's bag forward row");
    positive(&oracle_fwd["value"], "cpu_oracle bag_forward");
    let md = std::fs::read_to_string(out_dir.join("bench.md")).unwrap();
    assert!(md.contains("## Parity") && md.contains("## Speed"), "{md}");
    let pngs: Vec<_> = std::fs::read_dir(&out_dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    assert!(!pngs.is_empty(), "no PNG in {}", out_dir.display());
    for p in &pngs {
        let bytes = std::fs::read(p).unwrap();
        assert!(
            bytes.starts_with(b"\x89PNG"),
            "{} is not a PNG",
            p.display()
        );
    }
}

/// A backend whose output differs from the oracle's fails the run (exit code
/// 3) naming the op, the backend, the case and the first differing element;
/// the same run without the injected fault passes.
#[test]
fn runner_parity_failure_names_op_backend_and_element() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--parity-only", "--backends", "cpu_fast_portable_f32"];
    let clean = runner(&args, &dir.path().join("clean")).output().unwrap();
    assert!(
        clean.status.success(),
        "{}",
        String::from_utf8_lossy(&clean.stderr)
    );
    for (fault, want) in [
        (
            "cpu_fast_portable_f32:bag_forward",
            "bag_forward on cpu_fast_portable_f32 (case random): out[0, 0] = ",
        ),
        (
            "cpu_fast_portable_f32:lookup",
            "lookup on cpu_fast_portable_f32 (case random): indices[0, 0, 0] = ",
        ),
        (
            "cpu_fast_portable_f32:bag_backward",
            "bag_backward on cpu_fast_portable_f32 (case random): table_grad.grads[0, 0] = ",
        ),
        (
            "cpu_fast_portable_f32:lookup_backward",
            "lookup_backward on cpu_fast_portable_f32 (case random): d_query[0, 0, 0] = ",
        ),
    ] {
        let out_dir = dir.path().join(fault.replace(':', "_"));
        let out = runner(&args, &out_dir)
            .env(FAULT_ENV, fault)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{fault}: {stderr}");
        assert!(stderr.contains(want), "{fault}: {stderr}");
        let r = read_json(&out_dir.join("bench.json"));
        assert_eq!(r["parity_passed"], false, "{r}");
        assert!(
            r["parity"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["status"] == "fail" && p["backend"] == "cpu_fast_portable_f32"),
            "{r}"
        );
    }
}

/// `--compare BASE.json` prints each row's ratio and exits with code 4 when a
/// row is slower than the base by more than `--threshold`.
#[test]
fn runner_compare_flags_regressions() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--quick",
        "--no-end-to-end",
        "--backends",
        "cpu_fast_portable_f32",
    ];
    let first = dir.path().join("first");
    let out = runner(&args, &first).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // a base 100x faster than anything this run can measure
    let mut base = read_json(&first.join("bench.json"));
    for row in base["speed"].as_array_mut().unwrap() {
        if let Some(v) = row["value"].as_f64() {
            let faster = if row["higher_is_better"] == true {
                v * 100.0
            } else {
                v / 100.0
            };
            row["value"] = serde_json::json!(faster);
        }
    }
    let base_path = dir.path().join("base.json");
    std::fs::write(&base_path, serde_json::to_string(&base).unwrap()).unwrap();
    let second = dir.path().join("second");
    let mut cmd = runner(&args, &second);
    let out = cmd.arg("--compare").arg(&base_path).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(4),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("REGRESSION"), "{stdout}");
    let r = read_json(&second.join("bench.json"));
    assert!(
        r["compare"]["regressions"].as_u64().is_some_and(|n| n > 0),
        "{r}"
    );
    // against the real first run with a loose threshold: no regression
    let third = dir.path().join("third");
    let mut cmd = runner(&args, &third);
    let out = cmd
        .args(["--threshold", "0.95", "--compare"])
        .arg(first.join("bench.json"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("new/base"));
}
