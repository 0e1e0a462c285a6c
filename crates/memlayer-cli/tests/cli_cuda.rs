//! `--backend cuda` end to end (the CLI built with `--features cuda`; the
//! test command runs this file so). On a machine with an NVIDIA GPU the
//! paged decode with the slots on the GPU must answer what the CPU answers;
//! without one (CI) every CUDA command must end with a named error, never a
//! panic, and `bench kernels` must record why in its JSON and go on.
#![cfg(feature = "cuda")]

mod common;
use common::*;

const PROMPT: &str = "The company that employs Zovom Tudeind is";

fn generate(backend: &str) -> std::process::Output {
    memlayer(&[
        "generate",
        shipped_demo_dir().to_str().unwrap(),
        "--prompt",
        PROMPT,
        "--line",
        "--max-tokens",
        "12",
        "--budget-percent",
        "25",
        "--backend",
        backend,
    ])
}

#[test]
fn generate_on_cuda_answers_like_the_cpu_or_names_what_is_missing() {
    let cpu = assert_ok(&generate("cpu"));
    let cuda = generate("cuda");
    match memlayer_cuda::CudaDevice::new(0) {
        Ok(dev) => {
            assert_eq!(assert_ok(&cuda), cpu, "slots on {} vs the CPU", dev.name());
        }
        Err(why) => {
            let stderr = assert_fails(&cuda);
            assert!(
                stderr.contains("--backend cuda") && stderr.contains(&why.to_string()),
                "{stderr}"
            );
            eprintln!("no GPU here: `generate --backend cuda` says {stderr:?}");
        }
    }
}

#[test]
fn training_on_cuda_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let out = memlayer(&[
        "train",
        "--preset",
        "tiny-pkm",
        "--out",
        tmp.path().join("m").to_str().unwrap(),
        "--steps",
        "2",
        "--backend",
        "cuda",
        "--quiet",
    ]);
    let stderr = assert_fails(&out);
    assert!(
        stderr.contains("training on CUDA is not built yet"),
        "{stderr}"
    );
}

#[test]
fn bench_kernels_reports_the_cuda_columns_or_why_they_are_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("k.json");
    assert_ok(&memlayer(&[
        "bench",
        "kernels",
        "--quick",
        "--json",
        json.to_str().unwrap(),
        "--adapter",
        "no-such-adapter",
    ]));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    match memlayer_cuda::CudaDevice::new(0) {
        Ok(_) => {
            assert!(
                r["bag_fwd_gbps"]["cuda"].as_f64().is_some_and(|g| g > 0.0),
                "{r}"
            );
            assert!(
                r["bag_fwd_fraction_of_copy"]["cuda"].as_f64().is_some(),
                "{r}"
            );
            assert!(r["cuda"]["name"].is_string(), "{r}");
        }
        Err(why) => {
            assert!(r["cuda"].is_null(), "{r}");
            let errors = r["errors"].to_string();
            assert!(errors.contains(&format!("cuda: {why}")), "{errors}");
        }
    }
}
