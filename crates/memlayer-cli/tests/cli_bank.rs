//! End-to-end tests of `memlayer bank synth` and `memlayer inspect`.

mod common;
use common::*;

use std::path::Path;
use std::process::Output;

use memlayer_bank::{BankReader, Dtype, FileSource, round_trip};
use memlayer_core::rng::Rng;

fn synth(path: &Path, rows: u64, dim: u32, page_rows: u32, dtype: &str, seed: u64) -> String {
    synth_bank(path, rows, dim, page_rows, seed, &["--dtype", dtype])
}

fn inspect(path: &Path, verify: bool) -> Output {
    let p = path.to_str().unwrap();
    if verify {
        memlayer(&["inspect", p, "--verify"])
    } else {
        memlayer(&["inspect", p])
    }
}

#[test]
fn synth_then_inspect_verify_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.bank");
    let summary = synth(&path, 1000, 16, 64, "f16", 7);
    assert!(
        summary.contains("16 pages") && summary.contains("f16"),
        "{summary}"
    );
    assert_eq!(summary.lines().count(), 1);

    let out = assert_ok(&inspect(&path, true));
    assert!(out.contains("format version 1"), "{out}");
    assert!(out.contains("pkm_values f16: 1000 rows x 16"), "{out}");
    assert!(out.contains("last page 40 rows"), "{out}");
    assert!(out.contains("16 pages"), "{out}");
    assert!(out.contains("verified 16 pages"), "{out}");
    let size = std::fs::metadata(&path).unwrap().len();
    assert!(out.contains(&format!("file size {size} bytes")), "{out}");
    // first and last pages of the table are listed, the middle elided
    let bank = BankReader::open(FileSource::open(&path).unwrap()).unwrap();
    for id in [0u64, 2, 13, 15] {
        let e = bank.page(id).unwrap();
        assert!(
            out.contains(&format!("{:#018x}", e.checksum)),
            "page {id}: {out}"
        );
    }
    assert!(!out.contains(&format!("{:#018x}", bank.page(7).unwrap().checksum)));
}

#[test]
fn synth_values_are_seeded_normal_and_every_dtype_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    for dtype in ["f32", "f16", "bf16"] {
        let a = dir.path().join(format!("a-{dtype}.bank"));
        let b = dir.path().join(format!("b-{dtype}.bank"));
        synth(&a, 300, 64, 32, dtype, 3);
        synth(&b, 300, 64, 32, dtype, 3);
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        assert_ok(&inspect(&a, true));

        // Values equal the seeded stream of N(0, 64^-1/2), rounded to the dtype.
        let d: Dtype = dtype.parse().unwrap();
        let bank = BankReader::open(FileSource::open(&a).unwrap()).unwrap();
        let mut rng = Rng::new(3);
        let mut sumsq = 0.0f64;
        for page in 0..bank.page_count() {
            let got = bank.read_page_f32(page).unwrap();
            let want = rng.normal_vec(got.len(), 0.0, 0.125);
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g.to_bits(), round_trip(d, *w).to_bits());
                sumsq += f64::from(*g) * f64::from(*g);
            }
        }
        let std = (sumsq / (300.0 * 64.0)).sqrt();
        assert!((std - 0.125).abs() < 0.005, "{dtype}: std {std}");
    }
    let c = dir.path().join("c.bank");
    synth(&c, 300, 64, 32, "f32", 4);
    let a = dir.path().join("a-f32.bank");
    assert_ne!(std::fs::read(&a).unwrap(), std::fs::read(&c).unwrap());
}

#[test]
fn flipped_byte_in_page_3_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.bank");
    synth(&path, 500, 8, 50, "bf16", 1);
    let offset = {
        let bank = BankReader::open(FileSource::open(&path).unwrap()).unwrap();
        bank.page(3).unwrap().offset
    };
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[offset as usize + 17] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();

    // Header and table are intact, so plain inspect still works.
    assert_ok(&inspect(&path, false));
    let err = assert_fails(&inspect(&path, true));
    assert!(err.contains("page 3 "), "{err}");
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(err.contains(&format!("byte offset {offset}")), "{err}");
    assert!(err.contains("v.bank"), "{err}");
}

#[test]
fn truncated_file_is_reported_with_the_page() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.bank");
    synth(&path, 500, 8, 50, "f32", 1);
    let (offset, length) = {
        let bank = BankReader::open(FileSource::open(&path).unwrap()).unwrap();
        let e = bank.page(6).unwrap();
        (e.offset, e.length)
    };
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(offset + length / 2).unwrap();
    drop(file);
    for verify in [false, true] {
        let err = assert_fails(&inspect(&path, verify));
        assert!(err.contains("page 6 "), "{err}");
        assert!(err.contains("truncated"), "{err}");
    }

    // Cut inside the page table: the table is named.
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(100).unwrap();
    drop(file);
    let err = assert_fails(&inspect(&path, true));
    assert!(
        err.contains("page table") && err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn garbage_and_corrupt_files_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.bin");
    std::fs::write(
        &garbage,
        b"this is certainly not a memlayer bank, just some text\n",
    )
    .unwrap();
    for verify in [false, true] {
        let err = assert_fails(&inspect(&garbage, verify));
        assert!(err.contains("bad magic"), "{err}");
    }

    let empty = dir.path().join("empty.bin");
    std::fs::write(&empty, b"").unwrap();
    let err = assert_fails(&inspect(&empty, true));
    assert!(err.contains("header") && err.contains("truncated"), "{err}");

    let missing = dir.path().join("missing.bank");
    let err = assert_fails(&inspect(&missing, false));
    assert!(err.contains("missing.bank"), "{err}");

    // A flipped byte in the page table is caught by the table checksum.
    let path = dir.path().join("v.bank");
    synth(&path, 100, 4, 10, "f32", 1);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[64 + 64 + 24 * 2 + 9] ^= 0x80;
    std::fs::write(&path, &bytes).unwrap();
    let err = assert_fails(&inspect(&path, false));
    assert!(err.contains("corrupt page table"), "{err}");

    // Random garbage with the right magic never panics.
    let mut rng = Rng::new(9);
    for i in 0..20 {
        let mut b = b"MEMLBANK".to_vec();
        b.extend((0..rng.below(300)).map(|_| rng.next_u64() as u8));
        let p = dir.path().join(format!("g{i}.bin"));
        std::fs::write(&p, &b).unwrap();
        assert_fails(&inspect(&p, true));
    }
}

#[test]
fn synth_rejects_invalid_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.bank");
    let p = path.to_str().unwrap();
    for (rows, dim, page_rows) in [("0", "4", "4"), ("4", "0", "4"), ("4", "4", "0")] {
        let err = assert_fails(&memlayer(&[
            "bank",
            "synth",
            "--out",
            p,
            "--rows",
            rows,
            "--dim",
            dim,
            "--page-rows",
            page_rows,
        ]));
        assert!(err.contains("invalid bank layout"), "{err}");
        assert!(!path.exists());
    }
    // Edge shapes: one row; page_rows larger than rows.
    synth(&path, 1, 3, 1, "f32", 0);
    assert_ok(&inspect(&path, true));
    synth(&path, 5, 3, 100, "f16", 0);
    let out = assert_ok(&inspect(&path, true));
    assert!(out.contains("1 section, 1 page\n"), "{out}");
    assert!(out.contains("verified 1 page ("), "{out}");
}
