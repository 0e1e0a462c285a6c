//! The C ABI called as C calls it (the extern functions, raw pointers),
//! against the runtime's own generation; and the C and Python examples,
//! built and run on the shipped model, answering what `memlayer generate`
//! answers.

use memlayer_capi::*;
use std::ffi::{CStr, CString, c_char, c_void};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::ptr::{null, null_mut};

const PROMPT: &str = "The company that employs Zovom Tudeind is";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn demo() -> PathBuf {
    repo().join("models/demo-pkm")
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

fn last_error() -> String {
    let p = memlayer_last_error();
    assert!(!p.is_null(), "a failed call leaves a message");
    // SAFETY: a NUL-terminated string owned by this thread's slot.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// What `memlayer generate --line --max-tokens 24 --budget-percent 25`
/// prints: the prompt and its first line, computed by the runtime itself.
fn native_answer() -> String {
    let device = burn::tensor::Device::flex();
    let ops = memlayer_model::MemoryOps::best_for(&device);
    let opts = memlayer_runtime::paged::PagedOptions::host(
        memlayer_runtime::Budget::percent(25.0).unwrap(),
    );
    let (mut g, _) = memlayer_runtime::open_paged(&demo(), None, opts, &device, ops).unwrap();
    let sampling = memlayer_runtime::Sampling {
        max_tokens: 24,
        ..Default::default()
    };
    let out = g
        .generate(PROMPT, &sampling, Some("\n"), |_, _| {})
        .unwrap();
    let mut text = format!("{PROMPT}{}", out.text);
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text
}

fn open(opts: &MemlayerOpenOptions) -> *mut MemlayerModel {
    let dir = c(demo().to_str().unwrap());
    let mut model = null_mut();
    // SAFETY: valid strings and out pointer.
    let s = unsafe { memlayer_open(dir.as_ptr(), opts, &mut model) };
    assert_eq!(s, MemlayerStatus::Ok, "{}", last_error());
    model
}

unsafe extern "C" fn collect(piece: *const c_char, len: usize, user: *mut c_void) -> i32 {
    // SAFETY: `user` is the test's String; `piece` holds `len` bytes + NUL.
    let out = unsafe { &mut *(user as *mut String) };
    let bytes = unsafe { std::slice::from_raw_parts(piece.cast::<u8>(), len) };
    assert_eq!(unsafe { *piece.add(len) }, 0, "pieces are NUL-terminated");
    out.push_str(std::str::from_utf8(bytes).unwrap());
    0
}

unsafe extern "C" fn stop_after_two(_: *const c_char, _: usize, user: *mut c_void) -> i32 {
    // SAFETY: `user` is the test's counter.
    let n = unsafe { &mut *(user as *mut u32) };
    *n += 1;
    i32::from(*n >= 2)
}

#[test]
fn generate_streams_the_runtimes_answer_and_reports_stats() {
    assert_eq!(memlayer_version() >> 16, 1);
    let mut opts = memlayer_open_options_default();
    opts.budget_percent = 25.0;
    let model = open(&opts);
    let prompt = c(PROMPT);
    let stop = c("\n");
    let mut sampling = memlayer_sampling_default();
    sampling.max_tokens = 24;
    sampling.stop = stop.as_ptr();
    let mut streamed = String::new();
    let mut text: *mut c_char = null_mut();
    let mut result = MemlayerResult::default();
    // SAFETY: live handle, valid pointers, a callback over `streamed`.
    let s = unsafe {
        memlayer_generate(
            model,
            prompt.as_ptr(),
            &sampling,
            Some(collect),
            (&mut streamed as *mut String).cast(),
            &mut text,
            &mut result,
        )
    };
    assert_eq!(s, MemlayerStatus::Ok, "{}", last_error());
    assert!(
        memlayer_last_error().is_null(),
        "a success clears the message"
    );
    // SAFETY: the library's string, freed once below.
    let whole = unsafe { CStr::from_ptr(text) }
        .to_str()
        .unwrap()
        .to_string();
    unsafe { memlayer_string_free(text) };
    assert_eq!(streamed, whole, "the pieces make the text");
    let mut want = format!("{PROMPT}{whole}");
    if !want.ends_with('\n') {
        want.push('\n');
    }
    assert_eq!(want, native_answer(), "C ABI vs the runtime");
    assert!(whole.starts_with(" Difoul Partners"), "{whole:?}");
    assert!(result.tokens > 0 && result.prompt_tokens > 0, "{result:?}");
    assert_eq!(result.stopped_by_caller, 0);

    let mut stats = MemlayerStats::default();
    // SAFETY: live handle, writable out.
    assert_eq!(
        unsafe { memlayer_stats(model, &mut stats) },
        MemlayerStatus::Ok
    );
    assert!(stats.pages_streamed > 0 && stats.resident_bytes <= stats.budget_bytes);
    assert!(stats.resident_pages < stats.bank_pages, "{stats:?}");

    // the callback stops it after two pieces
    let mut n = 0u32;
    // SAFETY: as above.
    let s = unsafe {
        memlayer_generate(
            model,
            prompt.as_ptr(),
            &sampling,
            Some(stop_after_two),
            (&mut n as *mut u32).cast(),
            null_mut(),
            &mut result,
        )
    };
    assert_eq!((s, n, result.stopped_by_caller), (MemlayerStatus::Ok, 2, 1));

    // the app is told to give memory back: 25 % -> 2 % in place, the same
    // answer after it; then more than before; a budget below one page is
    // refused naming it, and the budget stays
    let before = stats;
    for (percent, grows) in [(2.0, false), (50.0, true)] {
        // SAFETY: live handle.
        let s = unsafe { memlayer_set_budget(model, 0, percent) };
        assert_eq!(s, MemlayerStatus::Ok, "{}", last_error());
        // SAFETY: live handle, writable out.
        assert_eq!(
            unsafe { memlayer_stats(model, &mut stats) },
            MemlayerStatus::Ok
        );
        assert_eq!(stats.budget_bytes > before.budget_bytes, grows, "{stats:?}");
        assert!(stats.resident_bytes <= stats.budget_bytes, "{stats:?}");
        let mut again = String::new();
        // SAFETY: as above.
        let s = unsafe {
            memlayer_generate(
                model,
                prompt.as_ptr(),
                &sampling,
                Some(collect),
                (&mut again as *mut String).cast(),
                null_mut(),
                null_mut(),
            )
        };
        assert_eq!(s, MemlayerStatus::Ok, "{}", last_error());
        assert_eq!(again, streamed, "the answer at {percent} %");
    }
    let budget = stats.budget_bytes;
    // SAFETY: live handle.
    assert_eq!(
        unsafe { memlayer_set_budget(model, 1, 0.0) },
        MemlayerStatus::InvalidArgument
    );
    assert!(last_error().contains("budget"), "{}", last_error());
    // SAFETY: live handle, writable out.
    assert_eq!(
        unsafe { memlayer_stats(model, &mut stats) },
        MemlayerStatus::Ok
    );
    assert_eq!(
        stats.budget_bytes, budget,
        "a refused budget changes nothing"
    );
    // SAFETY: NULL is refused by name.
    assert_eq!(
        unsafe { memlayer_set_budget(std::ptr::null(), 0, 10.0) },
        MemlayerStatus::InvalidArgument
    );
    // SAFETY: closing the live handle once.
    unsafe { memlayer_close(model) };
}

#[test]
fn bad_arguments_are_named_and_nothing_panics_across() {
    let mut model = null_mut();
    // SAFETY: deliberately bad inputs; every pointer is NULL or valid.
    unsafe {
        assert_eq!(
            memlayer_open(null(), null(), &mut model),
            MemlayerStatus::InvalidArgument
        );
        assert!(last_error().contains("dir is NULL"));
        let missing = c("/no/such/model");
        assert_eq!(
            memlayer_open(missing.as_ptr(), null(), &mut model),
            MemlayerStatus::Model
        );
        assert!(last_error().contains("/no/such/model"), "{}", last_error());
        assert!(model.is_null());
        let dir = c(demo().to_str().unwrap());
        let mut opts = memlayer_open_options_default();
        opts.backend = 9;
        assert_eq!(
            memlayer_open(dir.as_ptr(), &opts, &mut model),
            MemlayerStatus::InvalidArgument
        );
        assert!(last_error().contains("backend 9"));
        opts = memlayer_open_options_default();
        opts.budget_percent = 250.0;
        assert_eq!(
            memlayer_open(dir.as_ptr(), &opts, &mut model),
            MemlayerStatus::InvalidArgument
        );
        assert!(last_error().contains("budget"), "{}", last_error());
        let bad_utf8 = [0xffu8, 0xfe, 0];
        assert_eq!(
            memlayer_open(bad_utf8.as_ptr().cast(), null(), &mut model),
            MemlayerStatus::InvalidArgument
        );
        assert!(last_error().contains("not UTF-8"));
        let bank = c("/no/such.bank");
        opts = memlayer_open_options_default();
        opts.bank = bank.as_ptr();
        assert_eq!(
            memlayer_open(dir.as_ptr(), &opts, &mut model),
            MemlayerStatus::Model
        );
        assert!(last_error().contains("/no/such.bank"), "{}", last_error());
        assert_eq!(
            memlayer_generate(
                null(),
                null(),
                null(),
                None,
                null_mut(),
                null_mut(),
                null_mut()
            ),
            MemlayerStatus::InvalidArgument
        );
        let mut stats = MemlayerStats::default();
        assert_eq!(
            memlayer_stats(null(), &mut stats),
            MemlayerStatus::InvalidArgument
        );
        // NULL is a no-op for the frees
        memlayer_string_free(null_mut());
        memlayer_close(null_mut());
        memlayer_cancel(null());
    }
}

#[test]
fn cancel_from_another_thread_and_one_generation_at_a_time() {
    let model = open(&memlayer_open_options_default());
    struct Handle(*mut MemlayerModel);
    // SAFETY: the ABI documents a model as shareable between threads.
    unsafe impl Send for Handle {}
    unsafe impl Sync for Handle {}
    let h = std::sync::Arc::new(Handle(model));
    let prompt = c(PROMPT);
    let mut sampling = memlayer_sampling_default();
    sampling.max_tokens = 200;
    // a callback that waits for the other thread's cancel
    unsafe extern "C" fn slow(_: *const c_char, _: usize, _: *mut c_void) -> i32 {
        std::thread::sleep(std::time::Duration::from_millis(20));
        0
    }
    let other = {
        let h = h.clone();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            let p = c(PROMPT);
            // SAFETY: live handle shared by contract.
            let busy = unsafe {
                memlayer_generate(
                    h.0,
                    p.as_ptr(),
                    null(),
                    None,
                    null_mut(),
                    null_mut(),
                    null_mut(),
                )
            };
            let mut stats = MemlayerStats::default();
            // SAFETY: as above; stats during a generation are allowed.
            let s = unsafe { memlayer_stats(h.0, &mut stats) };
            // SAFETY: as above.
            unsafe { memlayer_cancel(h.0) };
            (busy, s)
        })
    };
    let mut text = null_mut();
    let mut result = MemlayerResult::default();
    // SAFETY: live handle, valid pointers.
    let s = unsafe {
        memlayer_generate(
            h.0,
            prompt.as_ptr(),
            &sampling,
            Some(slow),
            null_mut(),
            &mut text,
            &mut result,
        )
    };
    let (busy, stats) = other.join().unwrap();
    assert_eq!(busy, MemlayerStatus::Busy);
    assert_eq!(stats, MemlayerStatus::Ok);
    assert_eq!(s, MemlayerStatus::Cancelled, "{}", last_error());
    assert!(result.tokens > 0 && result.tokens < 200 && result.stopped_by_caller == 1);
    assert!(
        !text.is_null(),
        "a cancelled generation returns its text so far"
    );
    // SAFETY: the library's string; then the handle, once.
    unsafe {
        memlayer_string_free(text);
        memlayer_close(h.0);
    }
}

/// The directory holding the built library (`target/<profile>`).
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
}

/// The built shared library (`cargo test` builds no cdylib; scripts/test.sh does).
fn built_library() -> PathBuf {
    let so = lib_dir().join(format!(
        "{}memlayer_capi{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ));
    assert!(
        so.is_file(),
        "{} is not built: `cargo test` builds no cdylib; run `cargo build --release --workspace \
         --lib` first (scripts/test.sh does)",
        so.display()
    );
    so
}

/// A command for `program`, run through `MEMLAYER_EXAMPLE_RUNNER` when set
/// (`qemu-aarch64` when these tests run under emulation: the example is
/// built for the tests' target, not for the machine).
fn example_command(program: &Path) -> Command {
    match std::env::var("MEMLAYER_EXAMPLE_RUNNER") {
        Ok(runner) if !runner.trim().is_empty() => {
            let mut words = runner.split_whitespace();
            let mut cmd = Command::new(words.next().unwrap_or_default());
            cmd.args(words).arg(program);
            cmd
        }
        _ => Command::new(program),
    }
}

#[test]
fn the_c_example_answers_like_memlayer_generate() {
    built_library();
    let dir = lib_dir();
    let want = native_answer();
    let tmp = std::env::temp_dir().join(format!("memlayer-capi-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let exe = tmp.join("chat");
    // MEMLAYER_EXAMPLE_CC: the C compiler for the tests' target (a cross gcc
    // under emulation); CC is left to build scripts
    let cc = std::env::var("MEMLAYER_EXAMPLE_CC")
        .or_else(|_| std::env::var("CC"))
        .unwrap_or_else(|_| "cc".into());
    let built = Command::new(&cc)
        .arg("-Wall")
        .arg("-Werror")
        .arg("-I")
        .arg(repo().join("include"))
        .arg(repo().join("examples/c/chat.c"))
        .arg("-L")
        .arg(&dir)
        .arg("-lmemlayer_capi")
        .arg(format!("-Wl,-rpath,{}", dir.display()))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("run {cc}: {e}"));
    assert!(
        built.status.success(),
        "{cc}: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let run = example_command(&exe)
        .arg(demo())
        .arg("25")
        .arg(PROMPT)
        .output()
        .expect("run the C chat");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&run.stdout), want, "the C example");
    assert!(String::from_utf8_lossy(&run.stderr).contains("hit rate"));
    let _ = std::fs::remove_dir_all(&tmp);
}

/// Host only: the interpreter loads the library, so it must be the host's
/// (scripts/test-aarch64.sh skips this test under emulation, by name).
#[test]
fn the_python_example_answers_like_memlayer_generate() {
    let so = built_library();
    let want = native_answer();
    let py = Command::new("python3")
        .arg(repo().join("examples/python/chat.py"))
        .arg("--lib")
        .arg(&so)
        .arg("--model")
        .arg(demo())
        .args(["--budget", "25", "--prompt", PROMPT])
        .output()
        .expect("run python3");
    assert!(
        py.status.success(),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&py.stdout),
        want,
        "the Python example"
    );
}

/// A bank page that fails its checksum, a budget too small for one page and
/// an unreachable URL: each an error code and a message naming it, never a
/// crash; after the corrupt page the handle still answers and closes.
#[test]
fn a_corrupt_page_a_tiny_budget_and_an_unreachable_url_are_named() {
    let tmp = std::env::temp_dir().join(format!("memlayer-capi-bad-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    // a byte flipped every 4 KiB in the last three quarters: the header and
    // page table (at the front) stay intact, the pages fail their checksum
    let mut bytes = std::fs::read(demo().join("memory.bank")).unwrap();
    let n = bytes.len();
    for i in (n / 4..n).step_by(4096) {
        bytes[i] ^= 0x5a;
    }
    let bad = tmp.join("corrupt.bank");
    std::fs::write(&bad, &bytes).unwrap();
    let bad_c = c(bad.to_str().unwrap());
    let mut opts = memlayer_open_options_default();
    opts.bank = bad_c.as_ptr();
    opts.budget_percent = 25.0;
    let model = open(&opts);
    let prompt = c(PROMPT);
    let mut sampling = memlayer_sampling_default();
    sampling.max_tokens = 8;
    for attempt in 0..2 {
        let mut text = String::new();
        let mut out = null_mut();
        // SAFETY: valid handle, strings and out pointers.
        let s = unsafe {
            memlayer_generate(
                model,
                prompt.as_ptr(),
                &sampling,
                Some(collect),
                (&mut text as *mut String).cast(),
                &mut out,
                null_mut(),
            )
        };
        assert_eq!(s, MemlayerStatus::Generate, "attempt {attempt}");
        let msg = last_error();
        assert!(
            msg.contains("checksum") && msg.contains("page"),
            "attempt {attempt}: {msg}"
        );
        assert!(out.is_null(), "no text is returned with an error");
        let mut stats = MemlayerStats::default();
        // SAFETY: valid handle and out pointer.
        assert_eq!(
            unsafe { memlayer_stats(model, &mut stats) },
            MemlayerStatus::Ok
        );
    }
    // SAFETY: the handle, once.
    unsafe { memlayer_close(model) };

    // budget_bytes 0 means "use budget_percent" (a zeroed struct is the
    // default); the smallest explicit budget, 1 byte, cannot hold a page
    let dir = c(demo().to_str().unwrap());
    let mut opts = memlayer_open_options_default();
    opts.budget_bytes = 1;
    let mut m = null_mut();
    // SAFETY: valid strings and out pointer.
    let s = unsafe { memlayer_open(dir.as_ptr(), &opts, &mut m) };
    assert_ne!(s, MemlayerStatus::Ok);
    assert!(m.is_null());
    assert!(last_error().contains("budget"), "{}", last_error());

    // a URL nobody listens on (a port just released on 127.0.0.1)
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/memory.bank");
    let url_c = c(&url);
    let mut opts = memlayer_open_options_default();
    opts.bank = url_c.as_ptr();
    // SAFETY: valid strings and out pointer.
    let s = unsafe { memlayer_open(dir.as_ptr(), &opts, &mut m) };
    assert!(m.is_null());
    assert!(last_error().contains(&url), "{}", last_error());
    if cfg!(feature = "http") {
        assert_eq!(s, MemlayerStatus::Model);
    } else {
        // a build without `http` (the phone build) names that instead
        assert_eq!(s, MemlayerStatus::Backend);
        assert!(last_error().contains("without the `http` feature"));
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
