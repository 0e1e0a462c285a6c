//! `memlayer bench kernels --quick` end to end: the runner finishes and writes
//! the documented JSON keys. Numbers are checked for being measured (positive,
//! finite) — never against a speed.

use std::process::Command;

use serde_json::Value;

fn positive(v: &Value, what: &str) -> f64 {
    let x = v
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"));
    assert!(x.is_finite() && x > 0.0, "{what} = {x}");
    x
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
    assert!(
        out.status.success(),
        "bench failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
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
