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
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_memlayer"));
    cmd.args(["serve", dir.to_str().unwrap(), "--port", "0", "--web"])
        .arg(web.unwrap_or(Path::new("/nonexistent")))
        .stderr(Stdio::inherit());
    serve_with(cmd)
}

/// Spawns `cmd`, a `memlayer serve ... --port 0` command line (perhaps
/// wrapped, e.g. in a shell that lowers `ulimit -n` first and `exec`s the
/// binary), with stdout piped, and waits for the URL on its first line.
/// stderr goes wherever `cmd` sends it.
pub fn serve_with(mut cmd: Command) -> Served {
    let mut child = cmd
        .stdout(Stdio::piped())
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

/// Runs the `memlayer` binary like [`memlayer`], but gives it at most
/// `limit`: a run that takes longer (a hang, e.g. blocked on a FIFO) is
/// killed and fails the test. stdout and stderr are drained on threads so
/// a full pipe cannot stall the child.
pub fn memlayer_within(args: &[&str], limit: std::time::Duration) -> Output {
    use std::io::Read;
    let mut child = Command::new(env!("CARGO_BIN_EXE_memlayer"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn memlayer");
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("stderr")));
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for memlayer") {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("memlayer {args:?} did not finish within {limit:?}; killed");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    Output {
        status,
        stdout: stdout.join().expect("stdout thread"),
        stderr: stderr.join().expect("stderr thread"),
    }
}

/// The shipped model directory, `models/demo-pkm`.
pub fn shipped_demo_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/demo-pkm")
}

/// Files of a model directory a runtime reads (the shipped model's: no
/// routing files), `checksums.json` included.
pub const MODEL_DIR_FILES: [&str; 5] = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "memory.bank",
    "checksums.json",
];

/// Copies the runtime files of `models/demo-pkm` ([`MODEL_DIR_FILES`]) into
/// a new directory `to` (to be tampered with); returns `to`.
pub fn copy_demo_model(to: &Path) -> std::path::PathBuf {
    std::fs::create_dir_all(to).unwrap();
    let from = shipped_demo_dir();
    for f in MODEL_DIR_FILES {
        std::fs::copy(from.join(f), to.join(f)).unwrap_or_else(|e| panic!("copying {f}: {e}"));
    }
    to.to_path_buf()
}

/// `memlayer bank synth --out PATH` of `rows` x `dim` values, `page_rows`
/// rows per page, seed `seed`, then the flags in `extra` (e.g. `--dtype
/// f16`); asserts success and returns stdout.
pub fn synth_bank(
    path: &Path,
    rows: u64,
    dim: u32,
    page_rows: u32,
    seed: u64,
    extra: &[&str],
) -> String {
    let (rows, dim, page_rows, seed) = (
        rows.to_string(),
        dim.to_string(),
        page_rows.to_string(),
        seed.to_string(),
    );
    let out = path.to_str().expect("utf-8 path");
    let mut args = vec![
        "bank",
        "synth",
        "--out",
        out,
        "--rows",
        &rows,
        "--dim",
        &dim,
        "--page-rows",
        &page_rows,
        "--seed",
        &seed,
    ];
    args.extend_from_slice(extra);
    assert_ok(&memlayer(&args))
}

/// `memlayer generate DIR --prompt PROMPT --max-tokens N`, then the flags
/// in `extra`.
pub fn generate_from(dir: &Path, prompt: &str, max_tokens: u32, extra: &[&str]) -> Output {
    let max_tokens = max_tokens.to_string();
    let mut args = vec![
        "generate",
        dir.to_str().expect("utf-8 path"),
        "--prompt",
        prompt,
        "--max-tokens",
        &max_tokens,
    ];
    args.extend_from_slice(extra);
    memlayer(&args)
}

/// `memlayer chat` with `args`, fed `input` on stdin (closed after it, which
/// ends the chat); its output once it exits.
pub fn chat(args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_memlayer"))
        .arg("chat")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn memlayer chat");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(input).unwrap();
    }
    child.wait_with_output().unwrap()
}

/// `memlayer train --preset tiny-hier --steps 30` into `out`: a small
/// hierarchical-memory model for the front-end tests (seconds to train).
pub fn train_tiny_hier(out: &Path) {
    assert_ok(&memlayer(&[
        "train",
        "--preset",
        "tiny-hier",
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "30",
        "--quiet",
    ]));
}
