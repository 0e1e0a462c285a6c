//! A model directory is checked before `memlayer generate` runs it: hostile
//! sizes and floats in config.json, a flipped byte in model.safetensors, a
//! missing checksums.json, a bank of another width and another model's bank
//! (file or URL) all end with exit code 1 and an error naming the field or
//! file — never a panic (101), an abort (a signal) or garbage text.

mod common;
use common::*;

use std::path::Path;
use std::process::Output;

const PROMPT: &str = "The city where Zamend Jebuth was born is";

fn generate(dir: &Path, extra: &[&str]) -> Output {
    generate_from(dir, PROMPT, 3, extra)
}

/// Exit code 1, no panic, and every one of `parts` in stderr.
fn fails_naming(out: &Output, parts: &[&str]) -> String {
    let stderr = assert_fails(out);
    for p in parts {
        assert!(stderr.contains(p), "missing {p:?} in: {stderr}");
    }
    stderr
}

/// `memlayer bank synth` of the demo's value-table shape but `dim` wide.
fn synth_bank(path: &Path, dim: u32, seed: u64) {
    common::synth_bank(path, 16384, dim, 1, seed, &[]);
}

#[test]
fn the_shipped_model_passes_its_checks() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_demo_model(&tmp.path().join("m"));
    let out = assert_ok(&generate(&dir, &[]));
    assert!(out.starts_with(PROMPT) && out.len() > PROMPT.len(), "{out}");
}

#[test]
fn hostile_config_sizes_and_floats_exit_1_naming_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_demo_model(&tmp.path().join("m"));
    let path = dir.join("config.json");
    let good: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for (field, value, limit) in [
        (
            "vocab_size",
            serde_json::json!(1u64 << 40),
            "MAX_VOCAB_SIZE",
        ),
        (
            "vocab_size",
            serde_json::json!(1u64 << 62),
            "MAX_VOCAB_SIZE",
        ),
        ("max_seq_len", serde_json::json!(1u64 << 40), "MAX_SEQ_LEN"),
        ("rope_theta", serde_json::json!(-1.0), "MIN_ROPE_THETA"),
    ] {
        let mut bad = good.clone();
        bad[field] = value.clone();
        std::fs::write(&path, serde_json::to_string_pretty(&bad).unwrap()).unwrap();
        let out = generate(&dir, &[]);
        let stderr = fails_naming(
            &out,
            &[&format!("config field `{field}` = "), limit, "config.json"],
        );
        assert!(!stderr.contains("checksum"), "bounds come first: {stderr}");
        assert!(
            text(&out.stdout).is_empty(),
            "{field} = {value}: nothing generated"
        );
    }
}

#[test]
fn a_flipped_byte_in_the_dense_weights_exits_1_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_demo_model(&tmp.path().join("m"));
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    // the low byte of a weight near the end: still parses, silently wrong
    let at = bytes.len() - 1000;
    bytes[at] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    fails_naming(
        &generate(&dir, &[]),
        &["checksum mismatch for model.safetensors", "xxh3"],
    );
}

#[test]
fn a_directory_without_checksums_exits_1_telling_how_to_fix_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_demo_model(&tmp.path().join("m"));
    std::fs::remove_file(dir.join("checksums.json")).unwrap();
    fails_naming(
        &generate(&dir, &[]),
        &[
            "checksums.json is missing",
            "Re-export",
            "memlayer checksums DIR",
        ],
    );
    // The fix the message names works: the same checksums as shipped, and
    // the model runs again.
    let d = dir.to_str().unwrap();
    assert_ok(&memlayer(&["checksums", d]));
    let shipped = std::fs::read_to_string(shipped_demo_dir().join("checksums.json")).unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("checksums.json")).unwrap(),
        shipped
    );
    assert_ok(&generate(&dir, &[]));
    // It refuses to seal a directory whose bank does not fit its config.
    synth_bank(&dir.join("memory.bank"), 64, 1);
    fails_naming(&memlayer(&["checksums", d]), &["dim is 64 in the bank"]);
}

#[test]
fn a_bank_of_another_width_given_as_source_exits_1_naming_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_demo_model(&tmp.path().join("m"));
    let bank = tmp.path().join("dim64.bank");
    synth_bank(&bank, 64, 1);
    let b = bank.to_str().unwrap();
    fails_naming(
        &generate(&dir, &["--source", b]),
        &[
            b,
            "does not fit this model's config.json",
            "dim is 64 in the bank",
            "the config needs 128",
        ],
    );
}

#[test]
fn another_models_bank_of_the_right_shape_exits_1_from_a_file_or_a_url() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_demo_model(&tmp.path().join("m"));
    let bank = tmp.path().join("other.bank");
    synth_bank(&bank, 128, 7);
    let b = bank.to_str().unwrap();
    fails_naming(
        &generate(&dir, &["--source", b]),
        &[&format!("the bank at {b} is not this model's bank")],
    );
    // the same bank served over HTTP
    let served_dir = copy_demo_model(&tmp.path().join("served"));
    std::fs::copy(&bank, served_dir.join("memory.bank")).unwrap();
    let served = serve(&served_dir, None);
    let url = format!("{}/model/memory.bank", served.1);
    fails_naming(
        &generate(&dir, &["--source", &url, "--budget-percent", "25"]),
        &[&format!("the bank at {url} is not this model's bank")],
    );
    // and as the directory's own bank
    std::fs::copy(&bank, dir.join("memory.bank")).unwrap();
    fails_naming(&generate(&dir, &[]), &["is not this model's bank"]);
}
