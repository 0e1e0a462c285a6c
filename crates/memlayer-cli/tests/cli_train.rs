//! End-to-end tests of `memlayer train` and `memlayer eval` on burn's CPU
//! backend: the `tiny` preset trains for real (loss falls, frequent facts are
//! recalled above the baseline), and a run killed mid-way (SIGKILL) and
//! resumed ends with the same weights as an unbroken run.

mod common;
use common::*;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn report(dir: &Path) -> serde_json::Value {
    let t = std::fs::read_to_string(dir.join("report.json")).expect("report.json");
    serde_json::from_str(&t).expect("report is JSON")
}

/// `tiny-pkm` end to end: the loss of the last 10 steps is at most 30% of the
/// first 10 steps'; in the most frequent bucket the held-out-template answer
/// is the model's first choice among the attribute's values (multiple-choice
/// recall) well above both chance and always answering the most mentioned
/// value; `memlayer eval` on the exported directory reproduces the report.
#[test]
fn tiny_pkm_trains_recalls_frequent_facts_and_evaluates() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny-pkm");
    let d = dir.to_str().unwrap();
    let out = assert_ok(&memlayer(&[
        "train", "--preset", "tiny-pkm", "--out", d, "--quiet",
    ]));
    assert!(out.contains("recall"), "{out}");
    for f in [
        "config.json",
        "model.safetensors",
        "memory.bank",
        "tokenizer.json",
        "train.json",
        "report.json",
        "eval.jsonl",
        "metrics.jsonl",
        "loss.png",
        "checkpoint.safetensors",
    ] {
        assert!(dir.join(f).is_file(), "missing {f}");
    }
    let r = report(&dir);
    let first = r["first_loss"].as_f64().unwrap();
    let last = r["final_loss"].as_f64().unwrap();
    assert!(last < 0.30 * first, "loss {first} -> {last}");
    let buckets = r["eval"]["buckets"].as_array().unwrap();
    let common = buckets.last().unwrap();
    let (recall, baseline, chance) = (
        common["ranked_recall"].as_f64().unwrap(),
        common["baseline"].as_f64().unwrap(),
        common["chance"].as_f64().unwrap(),
    );
    assert!(common["queries"].as_u64().unwrap() >= 30, "{common}");
    assert!(
        recall >= baseline + 0.1 && recall >= 5.0 * chance,
        "most frequent bucket: recall {recall}, baseline {baseline}, chance {chance}"
    );
    // the memory is in the bank and verifies
    assert_ok(&memlayer(&[
        "inspect",
        dir.join("memory.bank").to_str().unwrap(),
        "--verify",
    ]));
    // eval of the exported directory gives the same numbers
    let json = tmp.path().join("eval.json");
    assert_ok(&memlayer(&["eval", d, "--json", json.to_str().unwrap()]));
    let e: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(e["buckets"], r["eval"]["buckets"]);
    let (a, b) = (
        e["heldout_loss"].as_f64().unwrap(),
        r["eval"]["heldout_loss"].as_f64().unwrap(),
    );
    assert!((a - b).abs() < 1e-6, "{a} vs {b}");
}

fn file_bytes(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn losses(dir: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

fn checkpoint_step(dir: &Path) -> Option<u64> {
    let bytes = std::fs::read(dir.join("checkpoint.safetensors")).ok()?;
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header: serde_json::Value = serde_json::from_slice(bytes.get(8..8 + n)?).ok()?;
    header["__metadata__"]["step"].as_str()?.parse().ok()
}

/// Kill -9 after the first checkpoint (mid-run), resume, and compare with an
/// unbroken run of the same config: weights, memory bank and per-step losses
/// are identical.
#[test]
fn killed_and_resumed_run_equals_unbroken_run() {
    for preset in ["tiny-pkm", "tiny-hier"] {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        let common = [
            "train",
            "--preset",
            preset,
            "--steps",
            "24",
            "--checkpoint-every",
            "8",
            "--quiet",
        ];
        let mut args_a = common.to_vec();
        args_a.extend(["--out", a.to_str().unwrap()]);
        assert_ok(&memlayer(&args_a));

        let mut args_b = common.to_vec();
        args_b.extend(["--out", b.to_str().unwrap()]);
        let mut child = Command::new(env!("CARGO_BIN_EXE_memlayer"))
            .args(&args_b)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        // wait for a checkpoint at step 8 or 16, then kill without warning
        loop {
            if checkpoint_step(&b).is_some_and(|s| (8..24).contains(&s)) {
                break;
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!("{preset}: run b ended ({status}) before it could be killed");
            }
            assert!(t0.elapsed() < Duration::from_secs(600), "no checkpoint");
            std::thread::sleep(Duration::from_millis(20));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let killed_at = checkpoint_step(&b).unwrap();
        assert!(killed_at < 24, "{preset}: killed after the end");
        // resuming without --resume is refused, naming the checkpoint
        let refused = memlayer(&args_b);
        assert_eq!(refused.status.code(), Some(1));
        assert!(
            text(&refused.stderr).contains("--resume"),
            "{}",
            text(&refused.stderr)
        );
        let mut resume = args_b.clone();
        resume.push("--resume");
        assert_ok(&memlayer(&resume));
        for f in ["model.safetensors", "memory.bank"] {
            assert!(
                file_bytes(&a, f) == file_bytes(&b, f),
                "{preset}: {f} differs after resume from step {killed_at}"
            );
        }
        assert_eq!(losses(&a), losses(&b), "{preset}: loss history");
        assert_eq!(losses(&a).len(), 24);
    }
}

#[test]
fn bad_train_inputs_fail_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("x");
    let out = memlayer(&[
        "train",
        "--preset",
        "tiny-huge",
        "--out",
        d.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("tiny-pkm"),
        "{}",
        text(&out.stderr)
    );
    let missing = tmp.path().join("nope.json");
    let out = memlayer(&[
        "train",
        "--config",
        missing.to_str().unwrap(),
        "--out",
        d.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("nope.json"),
        "{}",
        text(&out.stderr)
    );
    let out = memlayer(&["eval", tmp.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("config.json"),
        "{}",
        text(&out.stderr)
    );
}
