//! End-to-end tests of `memlayer layer run` on the Meta fixtures in
//! `tests/fixtures/meta/` (made by `scripts/make_meta_fixtures.py` with
//! facebookresearch/memory's own `HashingMemory` on CPU, torch 2.15.0; see
//! `tests/meta_interop.rs`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::{Dtype, SafeTensors, tensor::TensorView};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/meta")
        .join(name)
}

fn memlayer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_memlayer"))
        .args(args)
        .output()
        .expect("spawn memlayer")
}

fn run_layer(weights: &Path, knn: &str, input: &Path, out: &Path) -> Output {
    memlayer(&[
        "layer",
        "run",
        "--weights",
        weights.to_str().unwrap(),
        "--knn",
        knn,
        "--input",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])
}

fn f32s(st: &SafeTensors<'_>, name: &str) -> (Vec<f32>, Vec<usize>) {
    let v = st.tensor(name).unwrap_or_else(|_| panic!("tensor {name}"));
    assert_eq!(v.dtype(), Dtype::F32, "{name} dtype");
    let d = v
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()));
    (d.collect(), v.shape().to_vec())
}

fn i64s(st: &SafeTensors<'_>, name: &str) -> (Vec<i64>, Vec<usize>) {
    let v = st.tensor(name).unwrap_or_else(|_| panic!("tensor {name}"));
    assert_eq!(v.dtype(), Dtype::I64, "{name} dtype");
    let d = v
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()));
    (d.collect(), v.shape().to_vec())
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

/// Runs the CLI on fixture `name` and compares Y with Meta's expected tensors.
fn check_fixture(name: &str, knn: usize, input_shape: &[usize], heads: usize) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("y.safetensors");
    let o = run_layer(
        &fixture(&format!("{name}.weights.safetensors")),
        &knn.to_string(),
        &fixture(&format!("{name}.input.safetensors")),
        &out,
    );
    assert!(
        o.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    let y_bytes = std::fs::read(&out).unwrap();
    let y = SafeTensors::deserialize(&y_bytes).unwrap();
    let mut names = y.names();
    names.sort();
    assert_eq!(names, ["indices", "output", "scores"]);
    let e_bytes = std::fs::read(fixture(&format!("{name}.expected.safetensors"))).unwrap();
    let e = SafeTensors::deserialize(&e_bytes).unwrap();

    let tokens = input_shape[input_shape.len() - 2];
    let (out_y, shape) = f32s(&y, "output");
    assert_eq!(shape, input_shape, "output keeps the input's shape");
    let (idx_y, ishape) = i64s(&y, "indices");
    let (sc_y, sshape) = f32s(&y, "scores");
    assert_eq!(ishape, [tokens, heads, knn]);
    assert_eq!(sshape, [tokens, heads, knn]);

    assert_eq!(idx_y, i64s(&e, "indices").0, "{name}: indices");
    let (sd, od) = (
        max_abs_diff(&sc_y, &f32s(&e, "scores").0),
        max_abs_diff(&out_y, &f32s(&e, "output").0),
    );
    assert!(sd <= 1e-5, "{name}: scores differ by {sd}");
    assert!(od <= 1e-5, "{name}: output differs by {od}");
}

#[test]
fn runs_f32_fixture_tokens_by_dim() {
    check_fixture("pkm_f32", 4, &[8, 32], 2);
}

#[test]
fn runs_bf16_gated_fixture_with_batch_dim() {
    check_fixture("pkm_bf16_gated", 8, &[1, 6, 24], 4);
}

/// Asserts a clean failure: exit code 1 (not a panic's 101) and `needle` in stderr.
fn assert_fails_with(o: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
}

/// A copy of fixture `name` without the tensors in `drop`, written into `dir`.
fn without(dir: &Path, name: &str, drop: &[&str]) -> PathBuf {
    let bytes = std::fs::read(fixture(name)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| !drop.contains(&n.as_str()))
        .collect();
    let path = dir.join(format!("without-{}", drop.join("-")));
    std::fs::write(&path, safetensors::serialize(kept, None).unwrap()).unwrap();
    path
}

#[test]
fn missing_keys_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let w = without(dir.path(), "pkm_f32.weights.safetensors", &["keys"]);
    let o = run_layer(
        &w,
        "4",
        &fixture("pkm_f32.input.safetensors"),
        &dir.path().join("y"),
    );
    assert_fails_with(&o, "missing tensor `keys`");
    assert!(!dir.path().join("y").exists());
}

#[test]
fn missing_swilu_projection_is_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    let w = without(
        dir.path(),
        "pkm_f32.weights.safetensors",
        &["swilu_projection.weight", "swilu_projection.bias"],
    );
    let o = run_layer(
        &w,
        "4",
        &fixture("pkm_f32.input.safetensors"),
        &dir.path().join("y"),
    );
    assert_fails_with(&o, "only the swilu_projection=True variant");
}

#[test]
fn knn_larger_than_n_keys_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let o = run_layer(
        &fixture("pkm_f32.weights.safetensors"),
        "17",
        &fixture("pkm_f32.input.safetensors"),
        &dir.path().join("y"),
    );
    assert_fails_with(&o, "knn 17 is out of range: must be in 1..=16 (n_keys = 16");
}

#[test]
fn input_with_wrong_dim_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    // pkm_bf16_gated's input has dim 24; pkm_f32's layer wants 32.
    let o = run_layer(
        &fixture("pkm_f32.weights.safetensors"),
        "4",
        &fixture("pkm_bf16_gated.input.safetensors"),
        &dir.path().join("y"),
    );
    assert_fails_with(
        &o,
        "tensor `input` has shape [1, 6, 24]; expected last dimension 32",
    );
}

#[test]
fn input_without_input_tensor_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    // A weights file is a safetensors file without `input`.
    let o = run_layer(
        &fixture("pkm_f32.weights.safetensors"),
        "4",
        &fixture("pkm_f32.weights.safetensors"),
        &dir.path().join("y"),
    );
    assert_fails_with(&o, "missing tensor `input` in the input");
}

#[test]
fn unreadable_files_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.safetensors");
    let o = run_layer(
        &missing,
        "4",
        &fixture("pkm_f32.input.safetensors"),
        &dir.path().join("y"),
    );
    assert_fails_with(&o, "cannot read weights");
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"definitely not safetensors").unwrap();
    let o = run_layer(
        &junk,
        "4",
        &fixture("pkm_f32.input.safetensors"),
        &dir.path().join("y"),
    );
    assert_fails_with(&o, "cannot parse the state dict as safetensors");
}
