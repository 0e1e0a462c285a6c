//! A model without memory layers (a dense model: config.json has neither
//! `pkm` nor `hier`, the directory has no memory.bank) runs in `memlayer
//! generate` and `memlayer chat`, with a stats line that says it has no
//! memory and budget flags that change nothing; `--source` naming a bank is
//! refused; `memlayer serve` serves its files and says it has no bank;
//! `demo` and `bench paged`, which measure paged memory, refuse it by name.

mod common;
use common::{Served, assert_fails, assert_ok, chat, memlayer, text};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const PROMPT: &str = "The city where";

/// `memlayer train --preset tiny-dense` for a few steps (the weights only
/// need to be fixed): a dense model directory.
fn train_dense(dir: &Path) {
    assert_ok(&memlayer(&[
        "train",
        "--preset",
        "tiny-dense",
        "--out",
        dir.to_str().expect("utf-8 path"),
        "--steps",
        "20",
        "--quiet",
    ]));
    assert!(dir.join("config.json").is_file());
    assert!(
        !dir.join("memory.bank").exists(),
        "a dense export writes no bank"
    );
}

fn generate(dir: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "generate",
        dir.to_str().expect("utf-8 path"),
        "--prompt",
        PROMPT,
        "--max-tokens",
        "8",
    ];
    args.extend_from_slice(extra);
    memlayer(&args)
}

/// `GET target` with `Connection: close`: the status line and the body.
fn get(base: &str, target: &str, range: Option<&str>) -> (String, Vec<u8>) {
    let addr = base.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).expect("connect to memlayer serve");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let range = range.map(|r| format!("Range: {r}\r\n")).unwrap_or_default();
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\n{range}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).expect("read the reply");
    let split = reply
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete reply head");
    let head = String::from_utf8_lossy(&reply[..split]).into_owned();
    let status = head.lines().next().unwrap_or_default().to_string();
    (status, reply[split + 4..].to_vec())
}

#[test]
fn a_dense_model_generates_chats_and_is_served() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny-dense");
    train_dense(&dir);
    let d = dir.to_str().unwrap();

    // generate: the prompt and a continuation; the stats line has no memory figures
    let out = generate(&dir, &[]);
    let full = assert_ok(&out);
    assert!(
        full.starts_with(PROMPT) && full.len() > PROMPT.len(),
        "{full}"
    );
    let stats = text(&out.stderr);
    assert!(
        stats.contains("tok/s") && stats.contains("no memory layers"),
        "{stats}"
    );
    assert!(
        !stats.contains("hit rate") && !stats.contains("MiB streamed"),
        "{stats}"
    );
    // budget flags are accepted and change nothing (there is nothing to page)
    for budget in [["--budget-percent", "25"], ["--budget-mb", "0.0001"]] {
        let out = generate(&dir, &budget);
        assert_eq!(assert_ok(&out), full, "{budget:?}");
    }
    // ... but they are still checked like for any model
    let out = generate(&dir, &["--budget-percent", "0"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    // seeded sampling runs too
    let s1 = assert_ok(&generate(&dir, &["--temperature", "0.9", "--seed", "3"]));
    let s2 = assert_ok(&generate(&dir, &["--temperature", "0.9", "--seed", "3"]));
    assert_eq!(s1, s2);

    // a bank given for a model that has none is refused, naming the source
    for source in ["/no/such.bank", "http://127.0.0.1:1/model/memory.bank"] {
        let err = assert_fails(&generate(&dir, &["--source", source]));
        assert!(
            err.contains(&format!("--source {source}")) && err.contains("no memory layers"),
            "{err}"
        );
    }

    // chat: one answer per line, a stats line per turn without memory figures
    let out = chat(
        &[d, "--max-tokens", "6", "--budget-percent", "50"],
        b"The city where\nThe field that\n",
    );
    let stdout = assert_ok(&out);
    let stderr = text(&out.stderr);
    assert!(
        stdout.contains("The city where") && stdout.contains("The field that"),
        "{stdout}"
    );
    assert!(stderr.contains("(no memory layers)"), "{stderr}");
    assert_eq!(stderr.matches("tok/s").count(), 2, "{stderr}");
    assert_eq!(stderr.matches("| no memory layers]").count(), 2, "{stderr}");

    // serve: the directory's files over HTTP (Range too), no bank announced
    let mut child = Command::new(env!("CARGO_BIN_EXE_memlayer"))
        .args(["serve", d, "--port", "0", "--web", "/nonexistent"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn memlayer serve");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut head = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let last = line.starts_with("Ctrl-C");
        head.push(line);
        if last {
            break;
        }
    }
    let url = head[0]
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {head:?}"))
        .trim_end_matches("/model/")
        .to_string();
    let served = Served(child, url);
    assert!(
        head.iter()
            .any(|l| l.contains("bank: none (the model has no memory layers)")),
        "{head:?}"
    );
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "checksums.json",
    ] {
        let (status, body) = get(&served.1, &format!("/model/{file}"), None);
        assert!(status.contains(" 200 "), "{file}: {status}");
        assert_eq!(body, std::fs::read(dir.join(file)).unwrap(), "{file}");
    }
    let (status, body) = get(&served.1, "/model/model.safetensors", Some("bytes=0-7"));
    assert!(status.contains(" 206 "), "{status}");
    assert_eq!(
        body,
        std::fs::read(dir.join("model.safetensors")).unwrap()[..8]
    );
    let (status, _) = get(&served.1, "/model/memory.bank", None);
    assert!(status.contains(" 404 "), "{status}");
    drop(served);

    // demo and bench paged measure paged memory: refused by name
    let err = assert_fails(&memlayer(&["demo", "--model", d, "--per-bucket", "1"]));
    assert!(
        err.contains("no memory layers") && err.contains("memlayer demo"),
        "{err}"
    );
    let err = assert_fails(&memlayer(&[
        "bench",
        "paged",
        "--model",
        d,
        "--questions",
        "1",
    ]));
    assert!(
        err.contains("no memory layers") && err.contains("memlayer bench paged"),
        "{err}"
    );
}
