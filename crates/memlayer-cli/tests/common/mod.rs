//! Helpers shared by the CLI's end-to-end tests: run the `memlayer` binary
//! and check how it ended.
#![allow(dead_code)] // each test binary uses its own subset

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

/// Runs the `memlayer` binary built for these tests.
pub fn memlayer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_memlayer"))
        .args(args)
        .output()
        .expect("run memlayer")
}

/// Lossy UTF-8 of a process stream.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts success; returns stdout.
pub fn assert_ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Asserts a clean failure: exit code 1 (an error), never 101 (a panic).
pub fn assert_fails(out: &Output) -> String {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    stderr
}

/// `memlayer serve DIR --port 0` (with `--web WEB`, or no web app), killed
/// on drop; `.1` is its base URL (`http://127.0.0.1:PORT`).
pub struct Served(pub Child, pub String);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `memlayer serve` on a free port and waits for its URL.
pub fn serve(dir: &Path, web: Option<&Path>) -> Served {
    let mut child = Command::new(env!("CARGO_BIN_EXE_memlayer"))
        .args(["serve", dir.to_str().unwrap(), "--port", "0", "--web"])
        .arg(web.unwrap_or(Path::new("/nonexistent")))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn memlayer serve");
    let mut first = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut first)
        .unwrap();
    let url = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {first:?}"))
        .trim_end_matches("/model/")
        .to_string();
    Served(child, url)
}
