//! Helpers shared by the CLI's end-to-end tests: run the `memlayer` binary
//! and check how it ended.
#![allow(dead_code)] // each test binary uses its own subset

use std::process::{Command, Output};

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
