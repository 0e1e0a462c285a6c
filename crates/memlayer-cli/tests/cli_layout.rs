//! `memlayer layout`: the laid-out copy of the shipped model is the same
//! model (same answers, resident and paged), reads fewer pages per token
//! than the trained order at the same page size, and bad requests are named.

mod common;

use common::{assert_fails, assert_ok, generate_from, memlayer, shipped_demo_dir};
use std::path::Path;

/// The shipped model's runtime files plus the files `layout` reads
/// (facts.json for the training corpus, eval.jsonl for held-out questions).
fn demo_copy(to: &Path) -> std::path::PathBuf {
    let dir = common::copy_demo_model(to);
    for f in ["facts.json", "eval.jsonl"] {
        std::fs::copy(shipped_demo_dir().join(f), dir.join(f)).unwrap();
    }
    dir
}

fn layout(model: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "layout",
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--contexts",
        "48",
        "--questions",
        "64",
    ];
    args.extend_from_slice(extra);
    memlayer(&args)
}

fn report(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn answer(dir: &Path, budget: &str) -> String {
    let out = generate_from(
        dir,
        "The city where Staime Ribrom was born is",
        12,
        &["--budget-percent", budget],
    );
    assert_ok(&out)
}

#[test]
fn a_laid_out_copy_answers_the_same_and_reads_fewer_pages() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = demo_copy(&tmp.path().join("demo"));
    // the baseline: the trained order, f16 rows (256 B) in 1 KiB pages
    let (plain, relaid) = (tmp.path().join("plain"), tmp.path().join("relaid"));
    let (plain_json, relaid_json) = (
        tmp.path().join("plain.json"),
        tmp.path().join("relaid.json"),
    );
    let common_flags = ["--dtype", "f16", "--page-bytes", "1024"];
    let mut args = common_flags.to_vec();
    args.extend([
        "--order",
        "identity",
        "--json",
        plain_json.to_str().unwrap(),
    ]);
    assert_ok(&layout(&demo, &plain, &args));
    let mut args = common_flags.to_vec();
    args.extend(["--json", relaid_json.to_str().unwrap()]);
    let stdout = assert_ok(&layout(&demo, &relaid, &args));
    assert!(stdout.contains("pages per token"), "{stdout}");

    // the same model: the same text resident and paged at 25 %
    for budget in ["100", "25"] {
        assert_eq!(
            answer(&plain, budget),
            answer(&relaid, budget),
            "budget {budget}%"
        );
    }
    // both copies are sealed: `inspect --verify` passes on the new bank
    assert_ok(&memlayer(&[
        "inspect",
        relaid.join("memory.bank").to_str().unwrap(),
        "--verify",
    ]));
    for f in ["facts.json", "eval.jsonl"] {
        assert!(relaid.join(f).exists(), "{f} copied");
    }

    let (p, r) = (report(&plain_json), report(&relaid_json));
    assert_eq!(r["page_rows"], 4);
    assert_eq!(r["dtype"], "f16");
    for key in ["training", "heldout"] {
        let before = r[key]["pages_per_read_before"].as_f64().unwrap();
        let after = r[key]["pages_per_read_after"].as_f64().unwrap();
        // the identity order changes nothing
        let same = p[key]["pages_per_read_after"].as_f64().unwrap();
        assert_eq!(same, p[key]["pages_per_read_before"].as_f64().unwrap());
        assert_eq!(same, before, "{key}: both measured in the trained order");
        // counted pages, not time: the layout must gather rows read together
        assert!(
            after < before,
            "{key}: {after} pages per read, {before} before"
        );
        assert!(r[key]["token_reads"].as_u64().unwrap() > 0);
    }
}

#[test]
fn bad_layout_requests_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = demo_copy(&tmp.path().join("demo"));
    let out = tmp.path().join("out");
    let err = assert_fails(&layout(&demo, &out, &["--page-bytes", "700"]));
    assert!(
        err.contains("--page-bytes 700") && err.contains("512 bytes"),
        "{err}"
    );
    let err = assert_fails(&layout(&demo, &demo, &[]));
    assert!(err.contains("--out"), "{err}");
    let err = assert_fails(&memlayer(&[
        "layout",
        "--model",
        demo.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--contexts",
        "0",
    ]));
    assert!(err.contains("--contexts"), "{err}");
    std::fs::remove_file(demo.join("facts.json")).unwrap();
    let err = assert_fails(&layout(&demo, &out, &[]));
    assert!(
        err.contains("facts.json") && err.contains("--corpus"),
        "{err}"
    );
    assert!(!out.join("checksums.json").exists(), "nothing written");
    // without facts.json, the contexts come from --corpus
    let corpus = tmp.path().join("corpus.txt");
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "\n \n").unwrap();
    let err = assert_fails(&layout(&demo, &out, &["--corpus", empty.to_str().unwrap()]));
    assert!(err.contains("no contexts"), "{err}");
    let text = "Staime Ribrom was born in Staivaport in 1953.\n\n\
                Staime Ribrom works in astronomy at Mudaind Labs.\n";
    std::fs::write(&corpus, text).unwrap();
    let json = tmp.path().join("corpus.json");
    let args = [
        "--corpus",
        corpus.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ];
    assert_ok(&layout(&demo, &out, &args));
    let r = report(&json);
    assert!(
        r["contexts_from"].as_str().unwrap().contains("corpus.txt"),
        "{r}"
    );
    assert_eq!(r["contexts"], 1, "two short paragraphs make one context");
    assert!(out.join("checksums.json").exists());
}
