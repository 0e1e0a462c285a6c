//! A model directory is checked before it runs: config bounds first, then
//! `checksums.json` and every file against it, then the bank against the
//! config (shapes) and against the checksums (identity) — for the
//! directory's own bank and for one given as another source. Every refusal
//! is a named error, never a panic or garbage text.

mod common;
use common::{ScratchDir, dir_cfg, export_model_dir};

use burn::tensor::Device;
use memlayer_bank::{BankReader, Dtype, FileSource, PageSource};
use memlayer_core::model::{ModelConfig, ParamStore};
use memlayer_model::MemoryOps;
use memlayer_model_dir::dir::{load, load_dense, write_bank, write_checksums};
use memlayer_runtime::paged::PagedOptions;
use memlayer_runtime::{BurnDecoder, Generator, Sampling, open_paged, open_resident};
use std::path::{Path, PathBuf};

fn file(path: &Path) -> Option<Box<dyn PageSource>> {
    Some(Box::new(FileSource::open(path).unwrap()))
}

/// Opens `dir` paged from `source` (its own bank when `None`); the error text.
fn paged(
    dir: &Path,
    source: Option<Box<dyn PageSource>>,
) -> Result<Generator<BurnDecoder>, String> {
    open_paged(
        dir,
        source,
        PagedOptions::host(memlayer_runtime::Budget::bytes(1 << 30)),
        &Device::flex(),
        MemoryOps::Portable,
    )
    .map(|(g, _)| g)
    .map_err(|e| e.to_string())
}

fn resident(dir: &Path) -> Result<Generator<BurnDecoder>, String> {
    open_resident(dir, &Device::flex(), MemoryOps::Portable).map_err(|e| e.to_string())
}

fn text(g: &mut Generator<BurnDecoder>) -> String {
    let s = Sampling {
        max_tokens: 6,
        ..Sampling::default()
    };
    g.generate("The city where", &s, None, |_, _| {})
        .unwrap()
        .text
}

/// An exported directory (seed 3) in a scratch dir.
fn exported(name: &str) -> (ScratchDir, PathBuf, ModelConfig) {
    let tmp = ScratchDir::new(name);
    let dir = tmp.join("model");
    let cfg = dir_cfg(false);
    export_model_dir(&dir, &cfg, 3);
    (tmp, dir, cfg)
}

/// Writes a bank of `cfg` with parameters drawn from `seed` to `path`.
fn bank_of(cfg: &ModelConfig, seed: u64, path: &Path) {
    let store = ParamStore::init(cfg, seed).unwrap();
    write_bank(cfg, &store, path, Dtype::F32).unwrap();
}

fn assert_has(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "missing {p:?} in: {msg}");
    }
    assert!(!msg.contains("panicked"), "{msg}");
}

#[test]
fn an_exported_directory_is_verified_and_runs_paged_and_resident() {
    let (_tmp, dir, _) = exported("dir-ok");
    assert!(dir.join("checksums.json").is_file());
    let d = load_dense(&dir).unwrap();
    assert!(d.checksums.bank.is_some());
    assert_eq!(
        d.checksums.files.keys().collect::<Vec<_>>(),
        ["config.json", "model.safetensors", "tokenizer.json"]
    );
    let mut g = paged(&dir, None).unwrap();
    let mut own = paged(&dir, file(&dir.join("memory.bank"))).unwrap();
    let mut r = resident(&dir).unwrap();
    let t = text(&mut g);
    assert!(!t.is_empty());
    assert_eq!(text(&mut own), t);
    assert_eq!(text(&mut r), t, "paged == resident");
    // the checksums written are what write_checksums finds again
    let before = std::fs::read(dir.join("checksums.json")).unwrap();
    write_checksums(&dir).unwrap();
    assert_eq!(std::fs::read(dir.join("checksums.json")).unwrap(), before);
}

#[test]
fn a_bank_of_another_dim_is_refused_naming_the_field() {
    let (tmp, dir, cfg) = exported("dir-dim");
    // the bank of a model with v_dim 8 (the config says 16)
    let mut other = cfg.clone();
    other.pkm.as_mut().unwrap().v_dim = 8;
    let path = tmp.join("dim8.bank");
    bank_of(&other, 3, &path);
    let err = paged(&dir, file(&path))
        .err()
        .expect("a dim-8 bank must be refused");
    assert_has(
        &err,
        &[
            &path.display().to_string(),
            "pkm_values) dim is 8 in the bank",
            "the config needs 16",
        ],
    );
    // the same bank as the directory's own: paged and resident refuse it
    std::fs::copy(&path, dir.join("memory.bank")).unwrap();
    for err in [paged(&dir, None).err(), resident(&dir).err()] {
        let err = err.expect("refused");
        assert_has(&err, &["dim is 8 in the bank", "the config needs 16"]);
    }
    // fewer rows (n_keys 15): named as rows
    let mut other = cfg.clone();
    other.pkm.as_mut().unwrap().n_keys = 15;
    bank_of(&other, 3, &path);
    let err = paged(&dir, file(&path)).err().expect("refused");
    assert_has(&err, &["rows is 225 in the bank", "256 (pkm.n_keys²)"]);
}

#[test]
fn a_right_shaped_bank_of_another_model_is_refused() {
    let (tmp, dir, cfg) = exported("dir-identity");
    let path = tmp.join("seed4.bank");
    bank_of(&cfg, 4, &path);
    // same shapes and length: the sections fit, the identity does not
    let theirs = BankReader::open(FileSource::open(&path).unwrap()).unwrap();
    let ours = BankReader::open(FileSource::open(dir.join("memory.bank")).unwrap()).unwrap();
    assert_eq!(theirs.sections().len(), ours.sections().len());
    assert_eq!(theirs.header().file_len, ours.header().file_len);
    let err = paged(&dir, file(&path))
        .err()
        .expect("another model's bank");
    assert_has(
        &err,
        &[
            &format!("the bank at {} is not this model's bank", path.display()),
            &format!("{:016x}", theirs.header().table_checksum),
            &format!("{:016x}", ours.header().table_checksum),
        ],
    );
    // as the directory's own bank: paged and resident refuse it
    std::fs::copy(&path, dir.join("memory.bank")).unwrap();
    for err in [paged(&dir, None).err(), resident(&dir).err()] {
        assert_has(&err.expect("refused"), &["is not this model's bank"]);
    }
}

#[test]
fn a_flipped_byte_in_a_model_file_is_a_named_checksum_error() {
    for name in ["model.safetensors", "tokenizer.json", "config.json"] {
        let (_tmp, dir, _) = exported(&format!("dir-flip-{}", name.replace('.', "-")));
        let path = dir.join(name);
        let mut bytes = std::fs::read(&path).unwrap();
        // a byte the parsers accept either way: a weight's low mantissa
        // byte, a space in the JSON files
        let at = match name {
            "model.safetensors" => bytes.len() - 4 * 100,
            _ => bytes.iter().rposition(|&b| b == b' ').unwrap(),
        };
        bytes[at] ^= if name == "model.safetensors" {
            0x01
        } else {
            b' ' ^ b'\n'
        };
        std::fs::write(&path, &bytes).unwrap();
        for err in [paged(&dir, None).err(), resident(&dir).err()] {
            let err = err.unwrap_or_else(|| panic!("{name}: a flipped byte must be refused"));
            assert_has(
                &err,
                &[
                    &path.display().to_string(),
                    &format!("checksum mismatch for {name}"),
                ],
            );
        }
    }
}

#[test]
fn a_directory_without_checksums_is_refused_with_the_fix() {
    let (_tmp, dir, _) = exported("dir-nosums");
    std::fs::remove_file(dir.join("checksums.json")).unwrap();
    for err in [paged(&dir, None).err(), resident(&dir).err()] {
        let err = err.expect("no checksums.json");
        assert_has(
            &err,
            &[
                "checksums.json is missing",
                "memlayer checksums DIR",
                "Re-export",
            ],
        );
    }
    // recording them makes it load again
    write_checksums(&dir).unwrap();
    paged(&dir, None).unwrap();
    // an entry dropped from checksums.json: the file is not verifiable
    let p = dir.join("checksums.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["files"].as_object_mut().unwrap().remove("tokenizer.json");
    std::fs::write(&p, v.to_string()).unwrap();
    let err = paged(&dir, None).err().expect("unlisted file");
    assert_has(&err, &["tokenizer.json has no entry in checksums.json"]);
}

#[test]
fn config_bounds_are_checked_before_checksums() {
    let (_tmp, dir, _) = exported("dir-bounds");
    let path = dir.join("config.json");
    let good = std::fs::read_to_string(&path).unwrap();
    let json: serde_json::Value = serde_json::from_str(&good).unwrap();
    for (field, value) in [
        ("vocab_size", serde_json::json!(1u64 << 40)),
        ("vocab_size", serde_json::json!(1u64 << 62)),
        ("max_seq_len", serde_json::json!(1u64 << 40)),
        ("rope_theta", serde_json::json!(-1.0)),
        ("norm_eps", serde_json::json!(0.0)),
    ] {
        let mut bad = json.clone();
        bad[field] = value;
        std::fs::write(&path, serde_json::to_string_pretty(&bad).unwrap()).unwrap();
        for err in [paged(&dir, None).err(), resident(&dir).err()] {
            let err = err.unwrap_or_else(|| panic!("{field}: must be refused"));
            assert_has(&err, &[&format!("config field `{field}`"), "config.json"]);
            assert!(!err.contains("checksum"), "bounds first: {err}");
        }
    }
    std::fs::write(&path, &good).unwrap();
    load(&dir).unwrap();
}

#[test]
fn write_checksums_refuses_a_truncated_bank() {
    let (_tmp, dir, _) = exported("dir-trunc");
    let bank = dir.join("memory.bank");
    let bytes = std::fs::read(&bank).unwrap();
    std::fs::write(&bank, &bytes[..bytes.len() - 1]).unwrap();
    let err = write_checksums(&dir).unwrap_err().to_string();
    assert_has(&err, &["memory.bank", "truncated"]);
    // and the recorded identity catches it at open
    let err = paged(&dir, None).err().expect("truncated bank");
    assert_has(&err, &["is not this model's bank"]);
}

/// `models/demo-pkm/checksums.json` is what `write_checksums` writes for
/// the shipped files, and the shipped model passes every check.
#[test]
fn the_shipped_demo_model_has_current_checksums() {
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/demo-pkm");
    let tmp = ScratchDir::new("dir-demo");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "memory.bank",
    ] {
        std::fs::copy(demo.join(f), tmp.join(f)).unwrap();
    }
    write_checksums(&tmp.0).unwrap();
    assert_eq!(
        std::fs::read_to_string(tmp.join("checksums.json")).unwrap(),
        std::fs::read_to_string(demo.join("checksums.json")).unwrap(),
        "models/demo-pkm/checksums.json is stale"
    );
    let d = load_dense(&demo).unwrap();
    let bank = BankReader::open(FileSource::open(demo.join("memory.bank")).unwrap()).unwrap();
    memlayer_model_dir::dir::check_bank(&d.config, &d.checksums, &bank).unwrap();
}
