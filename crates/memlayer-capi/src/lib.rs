//! memlayer's C ABI: `include/memlayer.h` (generated from this file by
//! cbindgen; a test fails when the committed header is stale).
//!
//! An app opens a model directory with a byte budget for its memory (the
//! bank read page by page from the directory, another path, or an http(s)
//! URL), generates with a callback per piece of text, may cancel from any
//! thread, reads the paging counters, and closes it. The engine is the one
//! every front-end runs (`memlayer-runtime`'s `Generator` over the paged
//! burn model): the same prompt, seed and weights give the text
//! `memlayer generate` gives.
//!
//! ## Conventions
//! - Every function returns a [`MemlayerStatus`] (or a value that cannot
//!   fail); on an error, [`memlayer_last_error`] gives this thread's message.
//! - No Rust panic crosses the boundary: one is caught and reported as
//!   [`MemlayerStatus::Panic`] with its message.
//! - Strings are UTF-8 and NUL-terminated, in and out. A string the library
//!   returns for the caller to keep is freed with [`memlayer_string_free`],
//!   nothing else; a model with [`memlayer_close`].
//! - Thread safety: a [`MemlayerModel`] may be shared between threads. One
//!   generation runs at a time per model (a second concurrent call returns
//!   [`MemlayerStatus::Busy`]); [`memlayer_cancel`] and [`memlayer_stats`]
//!   may be called from any thread at any time, also during a generation.
//!   The token callback runs on the generating thread.
//! - ABI version: [`memlayer_version`] (`major << 16 | minor << 8 | patch`);
//!   a new minor version only adds functions, a new major one may change
//!   them. Structs passed by pointer start from their `*_default()` values.

use memlayer_bank::PageSource;
use memlayer_runtime::open::{
    BackendError, BankLocation, OpenSourceError, RuntimeBackend, RuntimeDevice,
};
use memlayer_runtime::paged::{PagedMemory, PagedOptions};
use memlayer_runtime::{Budget, BurnDecoder, Generator, Sampling};
use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char, c_void};
use std::ops::ControlFlow;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, TryLockError};

/// The ABI's version, `major << 16 | minor << 8 | patch`.
pub const MEMLAYER_ABI_VERSION: u32 = 1 << 16;

/// The model and page slots on the CPU (burn's CPU backend, host slots).
pub const MEMLAYER_BACKEND_CPU: u32 = 0;
/// The model and page slots on the default wgpu adapter (Vulkan, Metal, DX12).
pub const MEMLAYER_BACKEND_WGPU: u32 = 1;

/// What a call ended with.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemlayerStatus {
    /// Done.
    Ok = 0,
    /// A null pointer, a string that is not UTF-8, a value out of range.
    InvalidArgument = 1,
    /// The model directory or its bank could not be opened or read
    /// (missing, corrupt, not this model's, unreachable URL).
    Model = 2,
    /// The backend is not available in this build or on this machine.
    Backend = 3,
    /// Another generation is running on this model.
    Busy = 4,
    /// [`memlayer_cancel`] stopped the generation (its text so far is returned).
    Cancelled = 5,
    /// The generation failed (a page could not be read, a device error).
    Generate = 6,
    /// A bug: a panic was caught at the boundary; the message says where.
    Panic = 7,
}

/// How [`memlayer_open`] opens a model. Start from
/// [`memlayer_open_options_default`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MemlayerOpenOptions {
    /// The bank: NULL for the directory's `memory.bank`, else a path or an
    /// http(s):// URL (read with Range requests).
    pub bank: *const c_char,
    /// Resident memory for the bank's pages in bytes; 0: use `budget_percent`.
    pub budget_bytes: u64,
    /// Resident memory as a percent (0, 100] of the bank as held (values in
    /// the bank's dtype, blocks as f32); used when `budget_bytes` is 0 (0
    /// here too: 100 %).
    pub budget_percent: f64,
    /// [`MEMLAYER_BACKEND_CPU`] or [`MEMLAYER_BACKEND_WGPU`].
    pub backend: u32,
    /// Pages fetched concurrently on a miss (0: 1 for a file, 8 for a URL).
    pub fetch_threads: u32,
}

/// How [`memlayer_generate`] samples. Start from [`memlayer_sampling_default`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MemlayerSampling {
    /// Most tokens to generate.
    pub max_tokens: u32,
    /// 0: greedy; else softmax temperature.
    pub temperature: f32,
    /// Nucleus sampling mass in (0, 1] (1: off).
    pub top_p: f32,
    /// Seed of the sampler: the same seed, prompt and model give the same text.
    pub seed: u64,
    /// Stop once the text contains this (kept in the text); NULL: none.
    pub stop: *const c_char,
}

/// What a generation did.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MemlayerResult {
    /// Tokens of the prompt.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub tokens: u32,
    /// Seconds to the first generated token.
    pub first_token_seconds: f64,
    /// Seconds of the whole call.
    pub seconds: f64,
    /// 1 when the callback or [`memlayer_cancel`] stopped it, else 0.
    pub stopped_by_caller: u32,
}

/// The paging counters of a model's memory (zeros for a model without one).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MemlayerStats {
    /// The byte budget (value slots in the bank's dtype + blocks as f32).
    pub budget_bytes: u64,
    /// Bytes resident now (never above the budget).
    pub resident_bytes: u64,
    /// Value pages resident now.
    pub resident_pages: u64,
    /// Value pages in the bank.
    pub bank_pages: u64,
    /// Pages brought in (values and blocks).
    pub pages_streamed: u64,
    /// Bytes read from the source.
    pub bytes_streamed: u64,
    /// Value-page accesses that found the page resident.
    pub value_hits: u64,
    /// Value-page accesses that had to bring it in.
    pub value_misses: u64,
    /// Block requests (hierarchical memory), and those served resident.
    pub block_requests: u64,
    /// Block requests served without fetching.
    pub block_hits: u64,
    /// Hits over accesses, values and blocks (1 when idle).
    pub hit_rate: f64,
    /// Seconds spent waiting for pages.
    pub fetch_seconds: f64,
}

/// Called with each new piece of generated text (`piece`, `len` bytes of
/// UTF-8, NUL-terminated too) and the caller's `user` pointer; returns 0 to
/// go on, anything else to stop after this piece.
pub type MemlayerTokenCallback =
    Option<unsafe extern "C" fn(piece: *const c_char, len: usize, user: *mut c_void) -> i32>;

/// An open model (opaque).
pub struct MemlayerModel {
    generator: Mutex<Generator<BurnDecoder>>,
    memory: Option<Arc<PagedMemory>>,
    cancel: AtomicBool,
}

thread_local! {
    static LAST_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
}

fn set_error(message: impl std::fmt::Display) {
    let text = message.to_string().replace('\0', "\\0");
    let c = CString::new(text).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = Some(c));
}

fn clear_error() {
    LAST_ERROR.with(|e| *e.borrow_mut() = None);
}

/// Runs `f`, turning an `Err((status, message))` or a panic into a status
/// and this thread's last error.
fn guard(f: impl FnOnce() -> Result<MemlayerStatus, (MemlayerStatus, String)>) -> MemlayerStatus {
    clear_error();
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(s)) => s,
        Ok(Err((status, message))) => {
            set_error(message);
            status
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into());
            set_error(format!(
                "memlayer panicked (a bug, please report it): {what}"
            ));
            MemlayerStatus::Panic
        }
    }
}

type Failure = (MemlayerStatus, String);

fn invalid(message: impl Into<String>) -> Failure {
    (MemlayerStatus::InvalidArgument, message.into())
}

/// A UTF-8 string argument, or why not.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string valid for the call.
unsafe fn utf8<'a>(p: *const c_char, what: &str) -> Result<Option<&'a str>, Failure> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: the caller guarantees a NUL-terminated string.
    let c = unsafe { CStr::from_ptr(p) };
    c.to_str()
        .map(Some)
        .map_err(|e| invalid(format!("{what} is not UTF-8: {e}")))
}

/// The ABI version, `major << 16 | minor << 8 | patch` ([`MEMLAYER_ABI_VERSION`]).
#[unsafe(no_mangle)]
pub extern "C" fn memlayer_version() -> u32 {
    MEMLAYER_ABI_VERSION
}

/// The library's version text (e.g. "memlayer 0.1.0, ABI 1.0.0"); static,
/// never freed.
#[unsafe(no_mangle)]
pub extern "C" fn memlayer_version_string() -> *const c_char {
    static TEXT: &CStr = match CStr::from_bytes_with_nul(
        concat!("memlayer ", env!("CARGO_PKG_VERSION"), ", ABI 1.0.0\0").as_bytes(),
    ) {
        Ok(c) => c,
        Err(_) => c"memlayer",
    };
    TEXT.as_ptr()
}

/// This thread's message of the last failed call (NULL if the last call on
/// this thread succeeded). Valid until the next memlayer call on this
/// thread; do not free it.
#[unsafe(no_mangle)]
pub extern "C" fn memlayer_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ref().map_or(std::ptr::null(), |c| c.as_ptr()))
}

/// Defaults: the directory's bank, 100 % budget, CPU, automatic fetch threads.
#[unsafe(no_mangle)]
pub extern "C" fn memlayer_open_options_default() -> MemlayerOpenOptions {
    MemlayerOpenOptions {
        bank: std::ptr::null(),
        budget_bytes: 0,
        budget_percent: 0.0,
        backend: MEMLAYER_BACKEND_CPU,
        fetch_threads: 0,
    }
}

/// Defaults: 64 tokens, greedy, top-p 1, seed 0, no stop text.
#[unsafe(no_mangle)]
pub extern "C" fn memlayer_sampling_default() -> MemlayerSampling {
    let s = Sampling::default();
    MemlayerSampling {
        max_tokens: 64,
        temperature: s.temperature,
        top_p: s.top_p,
        seed: s.seed,
        stop: std::ptr::null(),
    }
}

/// The bank's page source: the directory's file (`bank` NULL), a path or a URL.
fn bank_source(dir: &Path, bank: Option<&str>) -> Result<Option<Box<dyn PageSource>>, Failure> {
    let Some(bank) = bank else {
        return Ok(None);
    };
    let location: BankLocation = bank.parse().map_err(|e| invalid(format!("bank: {e}")))?;
    location.open(dir).map(Some).map_err(|e| match e {
        OpenSourceError::NoHttp(_) => (MemlayerStatus::Backend, e.to_string()),
        OpenSourceError::Open(_) => (MemlayerStatus::Model, e.to_string()),
    })
}

/// A budget in bytes, else in percent (0: 100 %), as the options say it.
fn budget_of(bytes: u64, percent: f64) -> Result<Budget, Failure> {
    if bytes > 0 {
        Ok(Budget::bytes(bytes))
    } else if percent == 0.0 {
        Budget::percent(100.0)
    } else {
        Budget::percent(percent)
    }
    .map_err(|e| invalid(format!("budget: {e}")))
}

/// The burn device, memory ops and slot placement of `backend`.
fn backend_device(backend: u32) -> Result<RuntimeDevice, Failure> {
    let backend = match backend {
        MEMLAYER_BACKEND_CPU => RuntimeBackend::Cpu,
        MEMLAYER_BACKEND_WGPU => RuntimeBackend::Wgpu,
        other => {
            return Err(invalid(format!(
                "backend {other}: use MEMLAYER_BACKEND_CPU (0) or MEMLAYER_BACKEND_WGPU (1)"
            )));
        }
    };
    RuntimeDevice::open(backend).map_err(|e| {
        let e = match e {
            BackendError::NotBuilt(m) => format!("MEMLAYER_BACKEND_WGPU: {m}"),
            BackendError::Unavailable(m) => m,
        };
        (MemlayerStatus::Backend, e)
    })
}

/// Opens the model directory `dir` (UTF-8 path) with `options` (NULL: the
/// defaults) into `*out`. On failure `*out` is NULL and
/// [`memlayer_last_error`] names the file, URL or value at fault.
///
/// # Safety
/// `dir` is a NUL-terminated string; `options` is NULL or points to a
/// [`MemlayerOpenOptions`] (whose `bank` is NULL or a NUL-terminated
/// string); `out` points to writable storage for a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memlayer_open(
    dir: *const c_char,
    options: *const MemlayerOpenOptions,
    out: *mut *mut MemlayerModel,
) -> MemlayerStatus {
    guard(|| {
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        // SAFETY: checked non-null; the caller provides writable storage.
        unsafe { *out = std::ptr::null_mut() };
        // SAFETY: the caller's contract for `dir`.
        let dir = unsafe { utf8(dir, "dir") }?.ok_or_else(|| invalid("dir is NULL"))?;
        let opts = if options.is_null() {
            memlayer_open_options_default()
        } else {
            // SAFETY: non-null, points to the struct by contract.
            unsafe { *options }
        };
        // SAFETY: the struct's `bank` contract.
        let bank = unsafe { utf8(opts.bank, "options.bank") }?;
        let budget = budget_of(opts.budget_bytes, opts.budget_percent)?;
        let remote = bank.is_some_and(|b| b.contains("://"));
        let fetch_threads = match opts.fetch_threads {
            0 if remote => 8,
            0 => 1,
            n => n as usize,
        };
        let dir = Path::new(dir);
        let source = bank_source(dir, bank)?;
        let rt = backend_device(opts.backend)?;
        let paged = PagedOptions {
            budget,
            fetch_threads,
            prefetch: false,
            device: rt.pool,
        };
        let (generator, memory) =
            memlayer_runtime::open_paged(dir, source, paged, &rt.device, rt.ops)
                .map_err(|e| (MemlayerStatus::Model, format!("{}: {e}", dir.display())))?;
        let model = Box::new(MemlayerModel {
            generator: Mutex::new(generator),
            memory,
            cancel: AtomicBool::new(false),
        });
        // SAFETY: checked non-null above.
        unsafe { *out = Box::into_raw(model) };
        Ok(MemlayerStatus::Ok)
    })
}

/// Generates after `prompt` on `model`: `callback(piece, len, user)` with
/// each new piece (NULL: none); the whole text in `*out_text` (NULL: not
/// wanted; free it with [`memlayer_string_free`]) and the counts in
/// `*out_result` (NULL: not wanted) — also when cancelled. Returns
/// [`MemlayerStatus::Busy`] if a generation is running on `model`.
///
/// # Safety
/// `model` is a live handle from [`memlayer_open`]; `prompt` a
/// NUL-terminated string; `sampling` NULL or a valid struct (its `stop` NULL
/// or a NUL-terminated string); `out_text`, `out_result` NULL or writable;
/// `callback`, if set, is safe to call with `user` on this thread.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memlayer_generate(
    model: *const MemlayerModel,
    prompt: *const c_char,
    sampling: *const MemlayerSampling,
    callback: MemlayerTokenCallback,
    user: *mut c_void,
    out_text: *mut *mut c_char,
    out_result: *mut MemlayerResult,
) -> MemlayerStatus {
    guard(|| {
        if !out_text.is_null() {
            // SAFETY: non-null and writable by contract.
            unsafe { *out_text = std::ptr::null_mut() };
        }
        // SAFETY: a live handle by contract.
        let model = unsafe { model.as_ref() }.ok_or_else(|| invalid("model is NULL"))?;
        // SAFETY: the caller's contract for `prompt`.
        let prompt = unsafe { utf8(prompt, "prompt") }?.ok_or_else(|| invalid("prompt is NULL"))?;
        let s = if sampling.is_null() {
            memlayer_sampling_default()
        } else {
            // SAFETY: non-null, a valid struct by contract.
            unsafe { *sampling }
        };
        // SAFETY: the struct's `stop` contract.
        let stop = unsafe { utf8(s.stop, "sampling.stop") }?;
        let sampling = Sampling {
            max_tokens: s.max_tokens as usize,
            temperature: s.temperature,
            top_p: s.top_p,
            seed: s.seed,
        };
        sampling.validate().map_err(invalid)?;
        let mut generator = match model.generator.try_lock() {
            Ok(g) => g,
            Err(TryLockError::WouldBlock) => {
                return Err((
                    MemlayerStatus::Busy,
                    "a generation is already running on this model".into(),
                ));
            }
            // a panic in an earlier call: the generator restarts each call
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
        };
        model.cancel.store(false, Ordering::SeqCst);
        let mut cancelled = false;
        let mut piece_buf = Vec::new();
        let g = generator
            .generate_until(prompt, &sampling, stop, |piece, _| {
                if model.cancel.load(Ordering::SeqCst) {
                    cancelled = true;
                    return ControlFlow::Break(());
                }
                if let Some(cb) = callback {
                    piece_buf.clear();
                    piece_buf.extend_from_slice(piece.as_bytes());
                    piece_buf.push(0);
                    // SAFETY: the caller's callback contract; the piece
                    // lives until it returns.
                    let r = unsafe { cb(piece_buf.as_ptr().cast(), piece.len(), user) };
                    if r != 0 {
                        return ControlFlow::Break(());
                    }
                }
                if model.cancel.load(Ordering::SeqCst) {
                    cancelled = true;
                    return ControlFlow::Break(());
                }
                ControlFlow::Continue(())
            })
            .map_err(|e| (MemlayerStatus::Generate, e.to_string()))?;
        if !out_result.is_null() {
            // SAFETY: non-null and writable by contract.
            unsafe {
                *out_result = MemlayerResult {
                    prompt_tokens: g.prompt_tokens as u32,
                    tokens: g.tokens.len() as u32,
                    first_token_seconds: g.first_token_seconds,
                    seconds: g.seconds,
                    stopped_by_caller: u32::from(g.stopped_by_caller),
                }
            };
        }
        if !out_text.is_null() {
            let text = CString::new(g.text.replace('\0', "")).unwrap_or_default();
            // SAFETY: non-null and writable by contract.
            unsafe { *out_text = text.into_raw() };
        }
        if cancelled {
            set_error("cancelled by memlayer_cancel");
            return Ok(MemlayerStatus::Cancelled);
        }
        Ok(MemlayerStatus::Ok)
    })
}

/// Asks the running generation on `model` to stop after its current token
/// (it returns [`MemlayerStatus::Cancelled`]); any thread, any time. A
/// no-op when none runs (the next generation starts afresh).
///
/// # Safety
/// `model` is NULL or a live handle from [`memlayer_open`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memlayer_cancel(model: *const MemlayerModel) {
    // SAFETY: NULL or a live handle by contract.
    if let Some(m) = unsafe { model.as_ref() } {
        m.cancel.store(true, Ordering::SeqCst);
    }
}

/// The paging counters of `model` into `*out` (zeros for a model without
/// memory); any thread, also during a generation.
///
/// # Safety
/// `model` is a live handle; `out` points to a writable [`MemlayerStats`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memlayer_stats(
    model: *const MemlayerModel,
    out: *mut MemlayerStats,
) -> MemlayerStatus {
    guard(|| {
        // SAFETY: a live handle by contract.
        let model = unsafe { model.as_ref() }.ok_or_else(|| invalid("model is NULL"))?;
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        let s = model.memory.as_ref().map(|m| m.stats());
        let stats = s.map_or(
            MemlayerStats {
                hit_rate: 1.0,
                ..Default::default()
            },
            |s| MemlayerStats {
                budget_bytes: s.budget_bytes,
                resident_bytes: s.resident_bytes,
                resident_pages: s.resident_pages,
                bank_pages: s.bank_pages,
                pages_streamed: s.pages_streamed,
                bytes_streamed: s.bytes_streamed,
                value_hits: s.value_hits,
                value_misses: s.value_misses,
                block_requests: s.block_requests,
                block_hits: s.block_hits,
                hit_rate: s.hit_rate,
                fetch_seconds: s.fetch_seconds,
            },
        );
        // SAFETY: checked non-null; writable by contract.
        unsafe { *out = stats };
        Ok(MemlayerStatus::Ok)
    })
}

/// Changes the open model's memory budget in place: `budget_bytes`, or
/// when it is 0 `budget_percent` of the bank as held (0: 100 %), as in
/// [`MemlayerOpenOptions`]. The most recently used pages that fit stay
/// resident (none is fetched again); growing adds empty slots. For an app
/// told to give memory back (Android's `onTrimMemory`, iOS's memory
/// warning) or allowed more. Any thread, also during a generation (the
/// next page read runs under the new budget). A budget below one token's
/// pages is refused ([`MemlayerStatus::InvalidArgument`], naming the
/// minimum) and the old budget stays. A model without a memory bank has
/// nothing to resize: `Ok`.
///
/// # Safety
/// `model` is a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memlayer_set_budget(
    model: *const MemlayerModel,
    budget_bytes: u64,
    budget_percent: f64,
) -> MemlayerStatus {
    guard(|| {
        // SAFETY: a live handle by contract.
        let model = unsafe { model.as_ref() }.ok_or_else(|| invalid("model is NULL"))?;
        let budget = budget_of(budget_bytes, budget_percent)?;
        if let Some(memory) = &model.memory {
            memory
                .set_budget(budget)
                .map_err(|e| invalid(format!("budget {budget}: {e}")))?;
        }
        Ok(MemlayerStatus::Ok)
    })
}

/// Frees a string the library returned ([`memlayer_generate`]'s text); NULL
/// is a no-op.
///
/// # Safety
/// `s` is NULL or a string from this library not freed before.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memlayer_string_free(s: *mut c_char) {
    if !s.is_null() {
        // SAFETY: made by CString::into_raw in this library, by contract.
        drop(unsafe { CString::from_raw(s) });
    }
}

/// Closes `model` and frees it (and its memory's slots); NULL is a no-op.
/// No call on it may run or follow.
///
/// # Safety
/// `model` is NULL or a handle from [`memlayer_open`] not closed before.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memlayer_close(model: *mut MemlayerModel) {
    if !model.is_null() {
        // SAFETY: made by Box::into_raw in memlayer_open, by contract.
        let m = unsafe { Box::from_raw(model) };
        let _ = catch_unwind(AssertUnwindSafe(move || drop(m)));
    }
}
