//! The browser chat in a real browser: Debian's headless Chromium with
//! WebGPU (SwiftShader), driven by `web/tests/chat.mjs` (playwright-core),
//! loads the page `memlayer serve` serves, asks the shipped model a
//! held-out fact question and must answer exactly what the native CLI
//! answers for the same prompt and seed, streaming fewer pages than the bank
//! holds; after a reload every page comes from the browser's Cache API.
//! A screenshot is saved to `target/browser-chat.png`. Without the WebGPU
//! flag the page must say that WebGPU is missing and how to get it
//! (`target/browser-chat-no-webgpu.png`).
//!
//! Needs `web/pkg` (`scripts/build-web.sh`), `web/node_modules`
//! (`npm ci` in web/), node and chromium: `scripts/test.sh` provides them.
//! Missing pieces skip the test loudly, or fail it with MEMLAYER_REQUIRE_GPU=1 (CI).

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A held-out-template question about a fact stated 36 times in training;
/// the shipped model answers it right ("Difoul Partners").
const PROMPT: &str = "The company that employs Zovom Tudeind is";
const ANSWER: &str = "Difoul Partners";
const MAX_TOKENS: &str = "24";
const SEED: &str = "0";
const BUDGET_PERCENT: &str = "25";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Why the browser test cannot run here, if it cannot.
fn missing_parts(web: &Path) -> Option<String> {
    let mut missing = Vec::new();
    if !web.join("pkg/memlayer_web_bg.wasm").is_file() {
        missing.push("web/pkg (run scripts/build-web.sh)".to_string());
    }
    if !web.join("node_modules/playwright-core").is_dir() {
        missing.push("web/node_modules (run `npm ci` in web/)".to_string());
    }
    if Command::new("node").arg("--version").output().is_err() {
        missing.push("node (apt-get install nodejs)".to_string());
    }
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !Path::new(&chromium).exists() {
        missing.push(format!("{chromium} (apt-get install chromium)"));
    }
    (!missing.is_empty()).then(|| missing.join(", "))
}

fn num(v: &serde_json::Value, path: &[&str]) -> f64 {
    let mut at = v;
    for p in path {
        at = &at[*p];
    }
    at.as_f64()
        .unwrap_or_else(|| panic!("no number at {path:?} in {v}"))
}

/// The repository's root and `web/`, or `None` (after a loud message) when
/// the browser test cannot run here; under MEMLAYER_REQUIRE_GPU=1 that fails.
fn browser_setup() -> Option<(PathBuf, PathBuf)> {
    let root = repo();
    let web = root.join("web");
    if let Some(why) = missing_parts(&web) {
        let required = std::env::var("MEMLAYER_REQUIRE_GPU").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "MEMLAYER_REQUIRE_GPU=1 but the browser test lacks {why}"
        );
        eprintln!("\n!!!!!!!! SKIPPING THE BROWSER TEST: missing {why} !!!!!!!!\n");
        return None;
    }
    Some((root, web))
}

/// `memlayer generate`'s first line after `prompt` (greedy with [`SEED`],
/// [`BUDGET_PERCENT`] of the bank): what the browser must answer.
fn native_answer(model: &Path, prompt: &str, max_tokens: &str) -> String {
    let out = memlayer(&[
        "generate",
        model.to_str().unwrap(),
        "--prompt",
        prompt,
        "--line",
        "--max-tokens",
        max_tokens,
        "--seed",
        SEED,
        "--budget-percent",
        BUDGET_PERCENT,
    ]);
    let stdout = assert_ok(&out);
    stdout
        .strip_prefix(prompt)
        .and_then(|s| s.strip_suffix('\n'))
        .unwrap_or_else(|| panic!("unexpected CLI output {stdout:?}"))
        .to_string()
}

/// Runs `web/tests/chat.mjs` on `url` asking `prompt` (with `extra`
/// options), saving a screenshot to `shot`; its JSON line.
fn browser_chat(
    web: &Path,
    url: &str,
    prompt: &str,
    extra: &[&str],
    shot: &Path,
) -> serde_json::Value {
    let run = Command::new("node")
        .current_dir(web)
        .args(["tests/chat.mjs", "--url", url, "--prompt", prompt])
        .args(extra)
        .arg("--screenshot")
        .arg(shot)
        .stderr(Stdio::inherit())
        .output()
        .expect("run node tests/chat.mjs");
    let stdout = text(&run.stdout);
    assert!(
        run.status.success(),
        "chat.mjs failed ({}): {stdout}",
        run.status
    );
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON line from chat.mjs: {stdout}"));
    serde_json::from_str(line).expect("chat.mjs JSON")
}

#[test]
fn without_webgpu_the_page_says_so() {
    let Some((root, web)) = browser_setup() else {
        return;
    };
    let served = serve(&root.join("models/demo-pkm"), Some(&web));
    let shot = root.join("target/browser-chat-no-webgpu.png");
    std::fs::create_dir_all(root.join("target")).unwrap();
    let run = Command::new("node")
        .current_dir(&web)
        .args(["tests/chat.mjs", "--no-webgpu", "--timeout-ms", "120000"])
        .args(["--url", &format!("{}/", served.1), "--prompt", PROMPT])
        .arg("--screenshot")
        .arg(&shot)
        .output()
        .expect("run node tests/chat.mjs");
    let stderr = text(&run.stderr);
    assert_eq!(
        run.status.code(),
        Some(1),
        "chat.mjs must fail without WebGPU: {stderr}"
    );
    assert!(
        stderr.contains("no-WebGPU notice:") && stderr.contains("--enable-unsafe-webgpu"),
        "the page must explain that WebGPU is missing and how to get it: {stderr}"
    );
    assert!(
        std::fs::read(&shot)
            .expect("screenshot")
            .starts_with(b"\x89PNG")
    );
}

#[test]
fn the_browser_chat_answers_like_the_native_cli_streaming_a_fraction_of_the_bank() {
    let Some((root, web)) = browser_setup() else {
        return;
    };
    let model = root.join("models/demo-pkm");

    // the native answer: same prompt, seed, budget and stop (first line)
    let native = native_answer(&model, PROMPT, MAX_TOKENS);
    assert!(
        native.trim_start().starts_with(ANSWER),
        "the shipped model should answer {ANSWER:?}: {native:?}"
    );

    let served = serve(&model, Some(&web));
    let shot_dir = root.join("target");
    std::fs::create_dir_all(&shot_dir).unwrap();
    let shot = shot_dir.join("browser-chat.png");
    let _ = std::fs::remove_file(&shot);
    let url = format!(
        "{}/?budget={BUDGET_PERCENT}&max_tokens={MAX_TOKENS}&seed={SEED}",
        served.1
    );
    let t0 = std::time::Instant::now();
    let r = browser_chat(&web, &url, PROMPT, &["--reload"], &shot);

    let browser = r["text"].as_str().expect("text");
    assert_eq!(browser, native, "browser vs native CLI for {PROMPT:?}");
    let bank_pages = num(&r, &["stats", "bankPages"]);
    let streamed = num(&r, &["stats", "pagesStreamed"]);
    assert!(
        streamed > 0.0 && streamed < bank_pages,
        "pages streamed {streamed} must be in (0, {bank_pages})"
    );
    assert!(num(&r, &["stats", "residentBytes"]) <= num(&r, &["stats", "budgetBytes"]));
    assert_eq!(
        num(&r, &["stats", "pagesFromCache"]),
        0.0,
        "a fresh profile has no copy"
    );
    // a token's missed pages go out as one multi-range request (memlayer
    // serve answers multipart/byteranges): far fewer requests than pages
    let requests = num(&r, &["stats", "httpRequests"]);
    assert!(
        requests >= 1.0 && requests * 4.0 <= streamed,
        "{requests} requests for {streamed} pages: {}",
        r["stats"]
    );

    // the reload: same answer, every page from the Cache API, nothing over the network
    let again = &r["reload"];
    assert_eq!(
        again["text"].as_str(),
        Some(browser),
        "the reload answers the same"
    );
    assert_eq!(
        num(again, &["stats", "pagesFromCache"]),
        num(again, &["stats", "pagesStreamed"]),
        "after a reload every page comes from the Cache API: {}",
        again["stats"]
    );
    assert_eq!(num(again, &["stats", "bytesStreamed"]), 0.0);

    let png = std::fs::read(&shot).expect("screenshot");
    assert!(png.starts_with(b"\x89PNG"), "screenshot is not a PNG");
    let wasm = std::fs::metadata(web.join("pkg/memlayer_web_bg.wasm"))
        .expect("wasm")
        .len();
    eprintln!(
        "browser chat on {}: {browser:?} | wasm {:.2} MiB | load {:.2} s | first token {:.2} s | \
         {:.1} tok/s | {streamed} of {bank_pages} pages streamed ({:.2} MiB) in {requests} requests | reload: first token \
         {:.2} s, {:.1} tok/s | {:.0} s in all | screenshot {}",
        r["adapter"].as_str().unwrap_or("?"),
        wasm as f64 / (1024.0 * 1024.0),
        num(&r, &["loadSeconds"]),
        num(&r, &["result", "firstTokenSeconds"]),
        num(&r, &["result", "tokensPerSecond"]),
        num(&r, &["stats", "bytesStreamed"]) / (1024.0 * 1024.0),
        num(again, &["result", "firstTokenSeconds"]),
        num(again, &["result", "tokensPerSecond"]),
        t0.elapsed().as_secs_f64(),
        shot.display()
    );
}

/// A hierarchical-memory model in the browser: routed in wasm, its blocks
/// fetched by Range under a quarter of the bank (the typed question's blocks
/// prefetched before it is sent), verified, kept in the browser's copy, and
/// the answer equal to `memlayer generate`'s; after a reload every block
/// comes from the copy.
#[test]
fn a_hierarchical_model_answers_in_the_browser_like_the_native_cli() {
    let Some((root, web)) = browser_setup() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny-hier");
    train_tiny_hier(&model);
    let prompt = "The city where";
    let native = native_answer(&model, prompt, "12");

    let served = serve(&model, Some(&web));
    let shot = root.join("target/browser-chat-hier.png");
    std::fs::create_dir_all(root.join("target")).unwrap();
    let url = format!(
        "{}/?budget={BUDGET_PERCENT}&max_tokens=12&seed={SEED}",
        served.1
    );
    let r = browser_chat(
        &web,
        &url,
        prompt,
        &["--reload", "--type-pause-ms", "1500"],
        &shot,
    );
    assert_eq!(
        r["text"].as_str(),
        Some(native.as_str()),
        "browser vs native CLI for {prompt:?} on a hierarchical model"
    );
    assert_eq!(num(&r, &["model", "blockLevels"]), 2.0, "{}", r["model"]);
    assert_eq!(r["model"]["prefetch"].as_bool(), Some(true));
    // the typed question's blocks were prefetched: every request a hit
    let requests = num(&r, &["stats", "blockRequests"]);
    assert!(requests > 0.0, "{}", r["stats"]);
    assert_eq!(
        num(&r, &["stats", "blockHits"]),
        requests,
        "every block was prefetched while the question was typed: {}",
        r["stats"]
    );
    let streamed = num(&r, &["stats", "pagesStreamed"]);
    assert!(streamed >= 2.0, "{}", r["stats"]);
    assert!(num(&r, &["stats", "residentBytes"]) <= num(&r, &["stats", "budgetBytes"]));
    // the reload: same answer, the blocks from the browser's copy
    let again = &r["reload"];
    assert_eq!(again["text"].as_str(), Some(native.as_str()));
    assert_eq!(
        num(again, &["stats", "pagesFromCache"]),
        num(again, &["stats", "pagesStreamed"]),
        "after a reload every page comes from the browser's copy: {}",
        again["stats"]
    );
    assert_eq!(num(again, &["stats", "bytesStreamed"]), 0.0);
    assert!(
        std::fs::read(&shot)
            .expect("screenshot")
            .starts_with(b"\x89PNG")
    );
    eprintln!(
        "browser chat, tiny-hier: {native:?} | device {} | {streamed} pages streamed \
         ({} blocks asked, all held) | reload: {} from the copy",
        r["device"].as_str().unwrap_or("?"),
        requests,
        num(again, &["stats", "pagesFromCache"]),
    );
}

/// One chat under a small per-origin storage quota (`--quota-bytes`), with
/// a reload: the answer must equal `native`, the page must be told once
/// that the quota was reached and the local copy (`what`) trimmed, and the
/// storage must be reported. Returns the JSON line.
fn chat_under_quota(
    root: &Path,
    web: &Path,
    base: &str,
    native: &str,
    local_copy: &str,
    quota: u64,
) -> serde_json::Value {
    let shot = root.join(format!("target/browser-chat-quota-{local_copy}.png"));
    let url = format!(
        "{base}/?budget={BUDGET_PERCENT}&max_tokens={MAX_TOKENS}&seed={SEED}&local_copy={local_copy}"
    );
    let r = browser_chat(
        web,
        &url,
        PROMPT,
        &["--reload", "--quota-bytes", &quota.to_string()],
        &shot,
    );
    let what = if local_copy == "cache" {
        "Cache API"
    } else {
        "OPFS"
    };
    assert_eq!(
        r["model"]["localCopy"].as_str(),
        Some(what),
        "{}",
        r["model"]
    );
    for (run, label) in [(&r, "first run"), (&r["reload"], "reload")] {
        assert_eq!(
            run["text"].as_str(),
            Some(native),
            "{label} under a {quota}-byte quota ({what}): the answer must not change"
        );
        let stats = &run["stats"];
        assert!(
            num(stats, &["localCopyTrims"]) >= 1.0 && num(stats, &["pagesNotKept"]) > 0.0,
            "{label}: the quota must have trimmed the copy: {stats}"
        );
        let notice = run["storageNotice"]
            .as_str()
            .unwrap_or_else(|| panic!("{label}: the page was not told about the quota: {run}"));
        assert!(
            notice.starts_with("storage quota reached")
                && (notice.contains(&format!("the local page copy ({what}) was trimmed to"))
                    || notice.contains(&format!("the local page copy ({what}) is capped at")))
                && notice.contains("fetched again from the network"),
            "{label}: {notice}"
        );
        // Chromium's estimate() reports usage + a fixed amount, not the
        // overridden quota: only that a quota is reported is checked
        assert!(num(stats, &["storageQuota"]) > 0.0, "{stats}");
        assert!(stats["storagePersisted"].is_boolean(), "{stats}");
        assert!(
            num(stats, &["localCopyBytes"]) <= quota as f64,
            "{label}: the copy must fit the quota: {stats}"
        );
        let status = run["status"].as_str().unwrap_or_default();
        assert!(
            status.contains("Local copy:") && status.contains("quota"),
            "{label}: the status line must show the storage: {status:?}"
        );
    }
    r
}

#[test]
fn under_a_tiny_storage_quota_the_local_copy_is_trimmed_and_the_answer_stays() {
    let Some((root, web)) = browser_setup() else {
        return;
    };
    let model = root.join("models/demo-pkm");
    let native = native_answer(&model, PROMPT, MAX_TOKENS);
    let served = serve(&model, Some(&web));
    std::fs::create_dir_all(root.join("target")).unwrap();
    let bank = std::fs::metadata(model.join("memory.bank")).unwrap().len();

    // OPFS (the worker's default): a 1 MiB quota for an 8.4 MiB bank (the
    // mirror is addressed by bank offset, so the quota counts its length)
    let quota = 1 << 20;
    let r = chat_under_quota(&root, &web, &served.1, &native, "opfs", quota);
    let streamed = num(&r, &["stats", "bytesStreamed"]);
    assert!(
        streamed > quota as f64 / 2.0 && (bank as f64) > 4.0 * quota as f64,
        "the pages streamed ({streamed} bytes, bank {bank}) must be far more than fit"
    );
    // the mirror keeps the pages below the cut: some come from it after the
    // reload, the rest from the network again
    let again = &r["reload"];
    let (from_copy, pages) = (
        num(again, &["stats", "pagesFromCache"]),
        num(again, &["stats", "pagesStreamed"]),
    );
    assert!(
        from_copy > 0.0 && from_copy < pages && num(again, &["stats", "bytesStreamed"]) > 0.0,
        "after the reload some pages come from the trimmed copy: {}",
        again["stats"]
    );

    // the Cache API: a 512 KiB quota; a refused put drops the oldest half
    let cache_quota = 512 << 10;
    let c = chat_under_quota(&root, &web, &served.1, &native, "cache", cache_quota);
    assert!(
        c["storageNotice"]
            .as_str()
            .unwrap()
            .contains("oldest first")
    );

    for (label, run, q) in [("OPFS", &r, quota), ("Cache API", &c, cache_quota)] {
        let s = &run["stats"];
        eprintln!(
            "browser chat under a {q}-byte quota ({label}): {:?} | {} pages streamed ({:.2} MiB) | \
             copy {:.2} MiB, limit {:.2} MiB, trimmed {}x ({:.2} MiB dropped), {} pages not \
             kept | reload: {} of {} pages from the copy | estimate: usage {} of quota {}, \
             persisted {} | notice: {}",
            run["text"].as_str().unwrap_or("?"),
            num(s, &["pagesStreamed"]),
            num(s, &["bytesStreamed"]) / (1024.0 * 1024.0),
            num(s, &["localCopyBytes"]) / (1024.0 * 1024.0),
            num(s, &["localCopyLimit"]) / (1024.0 * 1024.0),
            num(s, &["localCopyTrims"]),
            num(s, &["localCopyTrimmedBytes"]) / (1024.0 * 1024.0),
            num(s, &["pagesNotKept"]),
            num(&run["reload"], &["stats", "pagesFromCache"]),
            num(&run["reload"], &["stats", "pagesStreamed"]),
            num(s, &["storageUsage"]),
            num(s, &["storageQuota"]),
            s["storagePersisted"],
            run["storageNotice"].as_str().unwrap_or("?"),
        );
    }
}
