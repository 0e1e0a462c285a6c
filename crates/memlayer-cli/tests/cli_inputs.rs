//! Bad command-line input gets a clear error and a non-zero exit, never a
//! silent no-op: sampling settings, budgets, fetch threads, URL schemes,
//! prompts that fill the context, non-UTF-8 chat lines, error messages that
//! would repeat their cause. Runs the release binary on models/demo-pkm.

mod common;

use common::{assert_fails, assert_ok, chat, memlayer, serve, shipped_demo_dir, text};
use std::time::{Duration, Instant};

fn generate(extra: &[&str]) -> std::process::Output {
    let dir = shipped_demo_dir();
    let mut args = vec![
        "generate",
        dir.to_str().unwrap(),
        "--prompt",
        "The city where Zamend Jebuth was born is",
        "--max-tokens",
        "4",
    ];
    args.extend_from_slice(extra);
    memlayer(&args)
}

/// A usage error: clap's exit code 2 and a message naming the flag.
fn assert_usage_error(out: &std::process::Output, flag: &str, why: &str) {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains(flag) && stderr.contains(why), "{stderr}");
}

#[test]
fn sampling_and_budget_flags_refuse_nan_and_out_of_range_values() {
    assert_usage_error(
        &generate(&["--temperature", "nan"]),
        "--temperature",
        "finite",
    );
    assert_usage_error(&generate(&["--temperature=-1"]), "--temperature", ">= 0");
    assert_usage_error(&generate(&["--top-p", "0"]), "--top-p", "(0, 1]");
    assert_usage_error(&generate(&["--top-p", "NaN"]), "--top-p", "(0, 1]");
    assert_usage_error(&generate(&["--budget-mb", "nan"]), "--budget-mb", "> 0");
    assert_usage_error(&generate(&["--budget-mb=-4"]), "--budget-mb", "> 0");
    assert_usage_error(
        &generate(&["--budget-percent", "0"]),
        "--budget-percent",
        "(0, 100]",
    );
}

#[test]
fn fetch_threads_are_bounded_and_refused_at_once() {
    let t0 = Instant::now();
    let out = generate(&["--fetch-threads", "5000"]);
    assert_usage_error(&out, "--fetch-threads", "more than 64");
    // Refused while parsing flags, before any model is opened.
    assert!(t0.elapsed() < Duration::from_secs(30));
    assert_ok(&generate(&["--fetch-threads", "64"]));
}

#[test]
fn unknown_url_schemes_are_refused_and_scheme_case_does_not_matter() {
    // refused while the flags are parsed (a usage error), not taken for a path
    assert_usage_error(
        &generate(&["--source", "ftp://127.0.0.1/memory.bank"]),
        "--source",
        "unsupported URL scheme ftp://",
    );
    assert_usage_error(
        &generate(&["--source", "gopher://x/y"]),
        "--source",
        "unsupported URL scheme gopher://",
    );

    // `HTTP://` is a URL, read over HTTP like `http://`, with the same answer.
    let dir = shipped_demo_dir();
    let served = serve(&dir, None);
    let lower = format!("{}/model/memory.bank", served.1);
    let upper = lower.replacen("http://", "HTTP://", 1);
    let a = assert_ok(&generate(&["--source", &lower, "--budget-percent", "25"]));
    let b = assert_ok(&generate(&["--source", &upper, "--budget-percent", "25"]));
    assert_eq!(a, b);
    let stats = text(&generate(&["--source", &upper]).stderr);
    assert!(stats.contains("MiB streamed"), "{stats}");
}

#[test]
fn a_prompt_that_fills_the_context_is_an_error_not_an_empty_answer() {
    // demo-pkm has a 256-token context; 300 words take more.
    let prompt = "the ".repeat(300);
    let dir = shipped_demo_dir();
    let out = memlayer(&["generate", dir.to_str().unwrap(), "--prompt", &prompt]);
    let err = assert_fails(&out);
    assert!(err.contains("tokens; the model's context is 256"), "{err}");
    // One token short of the context still generates.
    let ok = memlayer(&[
        "generate",
        dir.to_str().unwrap(),
        "--prompt",
        "the city",
        "--max-tokens",
        "1",
    ]);
    assert_ok(&ok);
}

#[test]
fn chat_says_a_line_is_not_utf8_and_goes_on() {
    let dir = shipped_demo_dir();
    // stdin closes after the second line: the chat ends there.
    let out = chat(
        &[dir.to_str().unwrap(), "--max-tokens", "4"],
        b"The city where \xff\xfe was born is\nThe city where Zamend Jebuth was born is\n",
    );
    let stdout = assert_ok(&out);
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("not UTF-8 text (invalid byte 0xff at byte 15)"),
        "{stderr}"
    );
    // The second line was answered: its prompt was echoed with a continuation.
    assert!(
        stdout.contains("The city where Zamend Jebuth was born is"),
        "{stdout}"
    );
    assert_eq!(stderr.matches("tok/s").count(), 1, "{stderr}");
}

#[test]
fn error_messages_name_their_cause_once() {
    let out = generate(&["--source", "/nonexistent/memory.bank"]);
    let err = assert_fails(&out);
    assert!(err.contains("/nonexistent/memory.bank"), "{err}");
    assert_eq!(
        err.matches("No such file or directory").count(),
        1,
        "cause repeated: {err}"
    );
}
