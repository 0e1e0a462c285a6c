//! The wasm-bindgen API (`ChatEngine`, `webgpuSupport`) and the browser's
//! page source: `fetch` with a `Range` header, the Cache API as the local
//! copy of fetched pages. Runs in a Web Worker (or a window).

use crate::WebError;
use crate::bank::{FetchedPage, MAX_RUN_BYTES, PageFetch, RemoteBank, adjacent_runs};
use crate::engine::{Engine, MemorySetup, ModelFiles, RoutingBytes, check_bank};
use crate::memory::MemoryStats;
use js_sys::{Function, Promise, Reflect, Uint8Array};
use memlayer_bank::{PageEntry, PageId};
use memlayer_core::sample::Sampling;
use memlayer_model_dir::RoutingFiles;
use memlayer_model_dir::manifest::{CHECKSUMS_FILE, Checksums, ManifestError};
use memlayer_wgpu::{GpuContext, GpuOptions};
use serde::Serialize;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::{JsFuture, future_to_promise};
use web_sys::{Cache, CacheStorage, Request, RequestCache, RequestInit, Response};

/// Name of the Cache API cache holding fetched pages.
const PAGE_CACHE: &str = "memlayer-pages-v1";

#[wasm_bindgen(start)]
fn start() {
    // panics reach the console (and the worker's error handler) with their message
    std::panic::set_hook(Box::new(|info| {
        web_sys::console::error_1(&JsValue::from_str(&format!("memlayer-web panic: {info}")));
    }));
}

fn js_err(e: impl std::fmt::Display) -> JsValue {
    JsError::new(&e.to_string()).into()
}

fn describe(v: &JsValue) -> String {
    v.as_string()
        .or_else(|| {
            Reflect::get(v, &"message".into())
                .ok()
                .and_then(|m| m.as_string())
        })
        .unwrap_or_else(|| format!("{v:?}"))
}

/// The global scope's `fetch`, `caches` and `performance.now()`, in a
/// worker or a window.
enum Scope {
    Worker(web_sys::WorkerGlobalScope),
    Window(web_sys::Window),
}

impl Scope {
    fn get() -> Result<Self, String> {
        let g = js_sys::global();
        if let Ok(w) = g.clone().dyn_into::<web_sys::WorkerGlobalScope>() {
            return Ok(Self::Worker(w));
        }
        g.dyn_into::<web_sys::Window>()
            .map(Self::Window)
            .map_err(|_| "neither a window nor a worker".to_string())
    }

    fn fetch(&self, req: &Request) -> Promise {
        match self {
            Self::Worker(w) => w.fetch_with_request(req),
            Self::Window(w) => w.fetch_with_request(req),
        }
    }

    fn caches(&self) -> Result<CacheStorage, JsValue> {
        match self {
            Self::Worker(w) => w.caches(),
            Self::Window(w) => w.caches(),
        }
    }
}

fn now_seconds() -> f64 {
    let perf = Reflect::get(&js_sys::global(), &"performance".into()).ok();
    let now = perf.as_ref().and_then(|p| {
        let f: Function = Reflect::get(p, &"now".into()).ok()?.dyn_into().ok()?;
        f.call0(p).ok()?.as_f64()
    });
    now.unwrap_or_else(js_sys::Date::now) / 1000.0
}

/// GET `url` (optionally a byte range) → (status, body).
async fn get(url: &str, range: Option<(u64, u64)>) -> Result<(u16, Vec<u8>), String> {
    let range = range.map(|(offset, len)| format!("bytes={offset}-{}", offset + len - 1));
    let r = get_ranged(url, range.as_deref(), false).await?;
    Ok((r.status, r.body.unwrap_or_default()))
}

/// A reply to [`get_ranged`].
struct Ranged {
    status: u16,
    content_type: String,
    content_range: String,
    /// `None`: not read (a 200 to a multi-range request).
    body: Option<Vec<u8>>,
}

/// GET `url` with an optional `Range` header value. With `skip_full`, a
/// `200` (the whole file: a server without multi-range support) is
/// aborted once its headers are in, its body never downloaded.
async fn get_ranged(url: &str, range: Option<&str>, skip_full: bool) -> Result<Ranged, String> {
    let init = RequestInit::new();
    init.set_method("GET");
    let abort = web_sys::AbortController::new().map_err(|e| describe(&e))?;
    init.set_signal(Some(&abort.signal()));
    if let Some(range) = range {
        let headers = web_sys::Headers::new().map_err(|e| describe(&e))?;
        headers.set("Range", range).map_err(|e| describe(&e))?;
        init.set_headers(&headers);
        // pages persist in the Cache API; the HTTP cache would blur what was streamed
        init.set_cache(RequestCache::NoStore);
    }
    let req = Request::new_with_str_and_init(url, &init).map_err(|e| describe(&e))?;
    let scope = Scope::get()?;
    let resp: Response = JsFuture::from(scope.fetch(&req))
        .await
        .map_err(|e| format!("network error: {}", describe(&e)))?
        .dyn_into()
        .map_err(|_| "fetch did not return a Response".to_string())?;
    let status = resp.status();
    let header = |name: &str| resp.headers().get(name).ok().flatten().unwrap_or_default();
    let (content_type, content_range) = (header("content-type"), header("content-range"));
    if skip_full && status == 200 {
        abort.abort();
        return Ok(Ranged {
            status,
            content_type,
            content_range,
            body: None,
        });
    }
    let buf = JsFuture::from(resp.array_buffer().map_err(|e| describe(&e))?)
        .await
        .map_err(|e| describe(&e))?;
    Ok(Ranged {
        status,
        content_type,
        content_range,
        body: Some(Uint8Array::new(&buf).to_vec()),
    })
}

/// GET a whole file of the model directory; errors name the URL.
async fn get_file(url: &str) -> Result<Vec<u8>, WebError> {
    let err = |message: String| WebError::Model {
        file: url.to_string(),
        message,
    };
    let (status, body) = get(url, None).await.map_err(err)?;
    if status != 200 {
        return Err(err(format!("HTTP {status}")));
    }
    Ok(body)
}

/// GET the model directory's `checksums.json` and parse it; a 404 is the
/// named [`ManifestError::Missing`] (how to fix it included).
async fn get_checksums(base: &str) -> Result<Checksums, WebError> {
    let url = format!("{base}{CHECKSUMS_FILE}");
    let (status, body) = get(&url, None).await.map_err(|message| WebError::Model {
        file: url.clone(),
        message,
    })?;
    match status {
        200 => {}
        404 => return Err(ManifestError::Missing { location: url }.into()),
        s => {
            return Err(WebError::Model {
                file: url,
                message: format!("HTTP {s}"),
            });
        }
    }
    let text = String::from_utf8(body).map_err(|e| WebError::Model {
        file: url.clone(),
        message: e.to_string(),
    })?;
    Ok(Checksums::from_json(&text, &url)?)
}

/// A sparse mirror of the bank in the origin-private file system: page
/// bytes at their bank offsets in one file, written and read through a
/// synchronous access handle (workers only). No index is kept: a page is
/// present when the bytes at its offset hash to its checksum (holes read
/// as zeros and fail the check, unless the page is all zeros itself).
struct OpfsMirror {
    handle: JsValue,
    read: Function,
    write: Function,
    flush: Function,
    truncate: Function,
    get_size: Function,
}

impl OpfsMirror {
    /// Opens (creates) `name` in the origin-private file system. The access
    /// handle locks the file: a worker of a page being reloaded may still
    /// hold it, so the open is retried for a few seconds.
    async fn open(name: &str) -> Result<Self, String> {
        let get = |o: &JsValue, k: &str| -> Result<JsValue, String> {
            Reflect::get(o, &k.into()).map_err(|e| describe(&e))
        };
        let call = |o: &JsValue, k: &str, args: &[JsValue]| -> Result<JsValue, String> {
            let f: Function = get(o, k)?
                .dyn_into()
                .map_err(|_| format!("{k} is not a function (no OPFS here)"))?;
            let r = match args {
                [] => f.call0(o),
                [a] => f.call1(o, a),
                [a, b] => f.call2(o, a, b),
                _ => unreachable!("at most two arguments"),
            };
            r.map_err(|e| describe(&e))
        };
        let awaited = |v: JsValue| async move {
            let p: Promise = v.dyn_into().map_err(|_| "not a promise".to_string())?;
            JsFuture::from(p).await.map_err(|e| describe(&e))
        };
        let storage = get(&get(&js_sys::global(), "navigator")?, "storage")?;
        let dir = awaited(call(&storage, "getDirectory", &[])?).await?;
        let opts = js_sys::Object::new();
        Reflect::set(&opts, &"create".into(), &JsValue::TRUE).map_err(|e| describe(&e))?;
        let file = awaited(call(&dir, "getFileHandle", &[name.into(), opts.into()])?).await?;
        let mut last = String::new();
        for _ in 0..40 {
            match call(&file, "createSyncAccessHandle", &[]) {
                Ok(p) => match awaited(p).await {
                    Ok(handle) => {
                        let f = |k: &str| -> Result<Function, String> {
                            get(&handle, k)?.dyn_into().map_err(|_| format!("no {k}"))
                        };
                        return Ok(Self {
                            read: f("read")?,
                            write: f("write")?,
                            flush: f("flush")?,
                            truncate: f("truncate")?,
                            get_size: f("getSize")?,
                            handle,
                        });
                    }
                    Err(e) => last = e,
                },
                Err(e) => return Err(e),
            }
            sleep_ms(100).await;
        }
        Err(format!("the OPFS file {name} stays locked: {last}"))
    }

    fn at(offset: u64) -> JsValue {
        let o = js_sys::Object::new();
        let _ = Reflect::set(&o, &"at".into(), &JsValue::from_f64(offset as f64));
        o.into()
    }

    /// `len` bytes at `offset` (zeros past the end of the file).
    fn read_at(&self, offset: u64, len: u64) -> Vec<u8> {
        let buf = Uint8Array::new_with_length(len as u32);
        let _ = self.read.call2(&self.handle, &buf, &Self::at(offset));
        buf.to_vec()
    }

    /// Writes `bytes` at `offset`. At the origin's quota Chromium neither
    /// throws nor writes: `write()` returns its error code as an unsigned
    /// count (`-8`, no space, as 4294967288) and the file does not grow;
    /// other browsers throw a `QuotaExceededError`. Anything but all the
    /// bytes written, the file reaching the page's end, is an `Err`.
    fn write_at(&self, offset: u64, bytes: &[u8]) -> Result<(), String> {
        let buf = Uint8Array::from(bytes);
        let n = self
            .write
            .call2(&self.handle, &buf, &Self::at(offset))
            .map_err(|e| describe(&e))?
            .as_f64()
            .unwrap_or(-1.0);
        let end = offset + bytes.len() as u64;
        if n != bytes.len() as f64 || self.size() < end {
            return Err(format!(
                "OPFS write of {} bytes at {offset} returned {n}: no space left",
                bytes.len()
            ));
        }
        Ok(())
    }

    /// The file's length in bytes (a sparse file counts its holes: the
    /// quota charges the length, not the pages written).
    fn size(&self) -> u64 {
        self.get_size
            .call0(&self.handle)
            .ok()
            .and_then(|v| v.as_f64())
            .unwrap_or(0.0) as u64
    }

    /// Cuts the file to `len` bytes (the pages past it are dropped).
    fn truncate_to(&self, len: u64) -> Result<(), String> {
        self.truncate
            .call1(&self.handle, &JsValue::from_f64(len as f64))
            .map(|_| ())
            .map_err(|e| describe(&e))?;
        self.flush();
        Ok(())
    }

    fn flush(&self) {
        let _ = self.flush.call0(&self.handle);
    }

    fn clear(&self) -> Result<(), String> {
        self.truncate_to(0)
    }
}

async fn sleep_ms(ms: i32) {
    let p = Promise::new(&mut |resolve, _| {
        let set_timeout = Reflect::get(&js_sys::global(), &"setTimeout".into())
            .ok()
            .and_then(|f| f.dyn_into::<Function>().ok());
        if let Some(f) = set_timeout {
            let _ = f.call2(&JsValue::NULL, &resolve, &JsValue::from(ms));
        }
    });
    let _ = JsFuture::from(p).await;
}

/// Where fetched pages are kept so a reload does not fetch them again.
enum LocalCopy {
    /// The origin-private file system (a worker's synchronous access handle).
    Opfs(OpfsMirror),
    /// The Cache API, one entry per page (windows, or when OPFS is unavailable).
    CacheApi(Cache),
    /// Neither is available (e.g. an insecure origin): pages are always fetched.
    None,
}

impl LocalCopy {
    fn name(&self) -> &'static str {
        match self {
            Self::Opfs(_) => "OPFS",
            Self::CacheApi(_) => "Cache API",
            Self::None => "none",
        }
    }
}

const MIB: f64 = 1024.0 * 1024.0;

/// Precision of the probe for the length the quota lets the OPFS mirror
/// reach.
const OPFS_PROBE_STEP: u64 = 64 * 1024;

/// The browser's storage as the page is told about it, and the cap on the
/// local copy: `navigator.storage.estimate()` (usage, quota) and
/// `persisted()` read at load and after every generation; the local copy's
/// size; how often it was trimmed because the origin's quota was reached.
#[derive(Default)]
struct StorageState {
    /// `estimate().usage` / `.quota` in bytes (0 when unknown).
    usage: f64,
    quota: f64,
    /// `estimate().usageDetails.caches` (the Cache API's share), if given.
    caches_usage: Option<f64>,
    /// Whether the origin's storage is persistent (`persisted()`: the page
    /// asks `persist()` at load).
    persisted: bool,
    /// Most bytes the local copy may hold: set from the estimate at load
    /// (nine tenths of what the quota leaves), lowered at each trim.
    limit: u64,
    /// Bytes the local copy holds (OPFS: the file's length; Cache API: the
    /// estimate's `caches` usage plus the pages put since).
    copy_bytes: u64,
    /// Times the copy was trimmed, bytes dropped, pages not kept.
    trims: u32,
    trimmed_bytes: u64,
    pages_not_kept: u64,
    /// What the page is told when the quota is reached (the latest trim).
    notice: Option<String>,
}

impl StorageState {
    /// The limit the estimate allows for a copy now holding `copy` bytes
    /// (nine tenths of the quota left to it), at most `cap`.
    fn limit_from_estimate(&self, copy: u64, cap: u64) -> u64 {
        if self.quota <= 0.0 {
            return cap;
        }
        let left = (self.quota - self.usage).max(0.0) + copy as f64;
        ((left * 0.9) as u64).min(cap)
    }

    /// Records a trim of the local copy from `from` to `to` bytes.
    fn trimmed(&mut self, what: &str, why: &str, from: u64, to: u64, detail: &str) {
        self.trims += 1;
        self.trimmed_bytes += from.saturating_sub(to);
        self.copy_bytes = to;
        // a mirror that held less than the cut (its first write past the
        // quota) is capped rather than trimmed
        let done = if to < from {
            format!(
                "was trimmed to {:.2} MiB (it held {:.2} MiB)",
                to as f64 / MIB,
                from as f64 / MIB
            )
        } else {
            format!("is capped at {:.2} MiB", to as f64 / MIB)
        };
        let notice = format!(
            "storage quota reached ({why}): the local page copy ({what}) {done}{detail}; pages \
             not kept are fetched again from the network"
        );
        web_sys::console::warn_1(&JsValue::from_str(&format!("memlayer: {notice}")));
        self.notice = Some(notice);
    }
}

/// `navigator.storage` of the global scope, if any.
fn navigator_storage() -> Option<JsValue> {
    let nav = Reflect::get(&js_sys::global(), &"navigator".into()).ok()?;
    let storage = Reflect::get(&nav, &"storage".into()).ok()?;
    (!storage.is_undefined() && !storage.is_null()).then_some(storage)
}

/// Calls `navigator.storage[method]()` and awaits it.
async fn storage_call(method: &str) -> Option<JsValue> {
    let storage = navigator_storage()?;
    let f: Function = Reflect::get(&storage, &method.into())
        .ok()?
        .dyn_into()
        .ok()?;
    let p: Promise = f.call0(&storage).ok()?.dyn_into().ok()?;
    JsFuture::from(p).await.ok()
}

/// Reads `estimate()` and `persisted()` into `state`.
async fn refresh_storage(state: &RefCell<StorageState>) {
    let estimate = storage_call("estimate").await;
    let persisted = storage_call("persisted").await;
    let num = |o: &JsValue, k: &str| Reflect::get(o, &k.into()).ok().and_then(|v| v.as_f64());
    let mut s = state.borrow_mut();
    if let Some(e) = estimate {
        s.usage = num(&e, "usage").unwrap_or(0.0);
        s.quota = num(&e, "quota").unwrap_or(0.0);
        s.caches_usage = Reflect::get(&e, &"usageDetails".into())
            .ok()
            .and_then(|d| num(&d, "caches"));
    }
    if let Some(p) = persisted {
        s.persisted = p.is_truthy();
    }
}

/// Whether a rejection is the quota's (`QuotaExceededError`).
fn is_quota_error(e: &JsValue) -> bool {
    Reflect::get(e, &"name".into())
        .ok()
        .and_then(|n| n.as_string())
        .is_some_and(|n| n == "QuotaExceededError")
}

/// The bank over HTTP: Range requests, pages kept in a [`LocalCopy`].
struct HttpFetch {
    url: String,
    local: Rc<LocalCopy>,
    /// Whether the server answers multi-range requests: unknown until the
    /// first batch of several runs asks (then [`MULTI_YES`] / [`MULTI_NO`]).
    multi: Rc<Cell<u8>>,
    /// Requests sent for the bank (`httpRequests` in the stats).
    requests: Rc<Cell<u64>>,
    /// The storage counters and the local copy's limit.
    storage: Rc<RefCell<StorageState>>,
    /// The bank's length once its header is read: a reply part that gives
    /// another length means the file changed on the server.
    file_len: Option<u64>,
}

const MULTI_UNKNOWN: u8 = 0;
const MULTI_YES: u8 = 1;
const MULTI_NO: u8 = 2;

/// Most runs one multi-range request asks for (as natively).
const MAX_RANGES_PER_REQUEST: usize = 64;

impl HttpFetch {
    /// The Cache API key of a page: the bank URL, the page and its checksum
    /// (a rewritten bank never hits a stale copy).
    fn key(&self, page: PageId, e: &PageEntry) -> String {
        let sep = if self.url.contains('?') { '&' } else { '?' };
        format!(
            "{}{sep}memlayer-page={page}&xxh3={:016x}",
            self.url, e.checksum
        )
    }
}

impl HttpFetch {
    /// The bytes of each span: multi-range requests of up to
    /// [`MAX_RANGES_PER_REQUEST`] spans when the server supports them (all
    /// in flight together), else one request per span (all in flight).
    async fn read_spans(&self, spans: &[(u64, u64)]) -> Vec<Result<Vec<u8>, String>> {
        if spans.len() > 1 && self.multi.get() != MULTI_NO {
            let groups: Vec<&[(u64, u64)]> = spans.chunks(MAX_RANGES_PER_REQUEST).collect();
            let replies = futures_join(groups.iter().map(|g| self.read_multi(g)).collect()).await;
            if self.multi.get() != MULTI_NO {
                let mut out = Vec::with_capacity(spans.len());
                for (g, reply) in groups.iter().zip(replies) {
                    match reply {
                        Ok(Some(parts)) => out.extend(parts.into_iter().map(Ok)),
                        Ok(None) => out.extend(g.iter().map(|_| Err("not read".to_string()))),
                        Err(e) => out.extend(g.iter().map(|_| Err(e.clone()))),
                    }
                }
                return out;
            }
            // the server answered with the whole file: one request per span
        }
        futures_join(
            spans
                .iter()
                .map(|&(offset, len)| self.read_range(offset, len))
                .collect(),
        )
        .await
    }

    /// One multi-range request: each span's bytes, or `None` if the server
    /// answered `200` (no multi-range support; the body is not downloaded).
    async fn read_multi(&self, spans: &[(u64, u64)]) -> Result<Option<Vec<Vec<u8>>>, String> {
        use memlayer_bank::multipart::{range_header, reply_parts, slice_spans};
        self.requests.set(self.requests.get() + 1);
        let header = range_header(spans);
        let r = get_ranged(&self.url, Some(&header), true).await?;
        let what = format!("{} ranges of {}", spans.len(), self.url);
        match r.status {
            206 => {}
            200 => {
                self.multi.set(MULTI_NO);
                return Ok(None);
            }
            s => return Err(format!("HTTP {s} for {what}")),
        }
        let body = r.body.unwrap_or_default();
        let parts = reply_parts(&r.content_type, &r.content_range, body, self.file_len)
            .map_err(|e| format!("{what}: {e}"))?;
        self.multi.set(MULTI_YES);
        slice_spans(&parts, spans)
            .map(Some)
            .map_err(|e| format!("{what}: {e}"))
    }
}

impl HttpFetch {
    /// Keeps a fetched page in the OPFS mirror when it lies within the
    /// copy's limit. A write the quota refuses trims the mirror: the file
    /// is addressed by bank offset and its length is what the quota charges
    /// (holes included), so the most it may grow to is probed (grown by
    /// `truncate`, halving the step; Chromium's `estimate()` does not report
    /// an origin's real quota), and the file is cut to three quarters of
    /// that, room left for the origin's other data. The mirror has no
    /// index: its tail is the only space it can give back; every page below
    /// the cut stays, and the limit drops to the cut, so pages past it are
    /// no longer written and the quota is not hit again.
    fn keep_opfs(&self, m: &OpfsMirror, e: &PageEntry, bytes: &[u8]) {
        let limit = self.storage.borrow().limit;
        if e.end() > limit {
            self.storage.borrow_mut().pages_not_kept += 1;
            return;
        }
        let Err(why) = m.write_at(e.offset, bytes) else {
            let mut s = self.storage.borrow_mut();
            s.copy_bytes = s.copy_bytes.max(e.end());
            return;
        };
        let held = m.size();
        // the quota allows `lo` bytes and refuses `hi`
        let (mut lo, mut hi) = (held, e.end().max(held + 1));
        while hi - lo > OPFS_PROBE_STEP {
            let mid = lo + (hi - lo) / 2;
            if m.truncate_to(mid).is_ok() && m.size() == mid {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let to = (lo.min(limit) / 4 * 3) / 4096 * 4096;
        let kept = if m.truncate_to(to).is_ok() {
            to
        } else {
            m.size()
        };
        let mut s = self.storage.borrow_mut();
        s.limit = to;
        s.pages_not_kept += 1;
        s.trimmed(
            "OPFS",
            &why,
            held,
            kept,
            &format!(
                "; the quota lets it reach about {:.2} MiB, so pages past {:.2} MiB of the bank \
                 are no longer kept",
                lo as f64 / MIB,
                to as f64 / MIB
            ),
        );
    }

    /// Drops the oldest half of the Cache API's entries (`keys()` lists
    /// them in insertion order), after the quota refused a put (`refused`:
    /// the limit becomes what the copy held) or the copy reached its limit.
    async fn trim_cache(&self, cache: &Cache, why: &str, refused: bool) {
        let Ok(keys) = JsFuture::from(cache.keys()).await else {
            return;
        };
        let keys: js_sys::Array = keys.unchecked_into();
        let n = keys.length();
        let drop = n.div_ceil(2);
        // each promise is handed to a JsFuture at once, which attaches its
        // handlers: a rejection is never left unhandled while an earlier one
        // is awaited (the worker would report it as an uncaught error)
        let deletes: Vec<JsFuture> = keys
            .iter()
            .take(drop as usize)
            .filter_map(|k| k.dyn_into::<Request>().ok())
            .map(|req| JsFuture::from(cache.delete_with_str(&req.url())))
            .collect();
        for d in deletes {
            let _ = d.await;
        }
        let from = self.storage.borrow().copy_bytes;
        refresh_storage(&self.storage).await;
        let mut s = self.storage.borrow_mut();
        if refused {
            s.limit = s.limit.min(from);
        }
        // the entries' sizes are not listed: the bytes dropped are counted
        // in proportion to the entries
        let to = from - from * u64::from(drop) / u64::from(n.max(1));
        s.trimmed(
            "Cache API",
            why,
            from,
            to,
            &format!(" ({drop} of {n} pages dropped, oldest first)"),
        );
    }
}

impl PageFetch for HttpFetch {
    fn location(&self) -> String {
        self.url.clone()
    }

    async fn read_range(&self, offset: u64, len: u64) -> Result<Vec<u8>, String> {
        self.requests.set(self.requests.get() + 1);
        let (status, body) = get(&self.url, Some((offset, len))).await?;
        let bytes = match status {
            206 => body,
            // a server without Range support sends the whole file
            200 => body
                .get(offset as usize..(offset + len) as usize)
                .ok_or_else(|| format!("HTTP 200 with {} bytes, short of the range", body.len()))?
                .to_vec(),
            s => return Err(format!("HTTP {s} for bytes {offset}..{}", offset + len)),
        };
        if bytes.len() as u64 != len {
            return Err(format!(
                "{} bytes for the range {offset}..{} ({len} expected)",
                bytes.len(),
                offset + len
            ));
        }
        Ok(bytes)
    }

    async fn read_pages(&self, pages: &[(PageId, PageEntry)]) -> Vec<Result<FetchedPage, String>> {
        let mut out: Vec<Option<Result<FetchedPage, String>>> = vec![None; pages.len()];
        // 1. the local copies
        match &*self.local {
            LocalCopy::Opfs(m) => {
                for (i, (_, e)) in pages.iter().enumerate() {
                    let bytes = m.read_at(e.offset, e.length);
                    if memlayer_bank::format::checksum(&bytes) == e.checksum {
                        out[i] = Some(Ok(FetchedPage {
                            bytes,
                            from_cache: true,
                        }));
                    }
                }
            }
            LocalCopy::CacheApi(cache) => {
                // every lookup in flight at once, then every body
                // (handlers attached at once: see `trim_cache`)
                let lookups: Vec<JsFuture> = pages
                    .iter()
                    .map(|(p, e)| JsFuture::from(cache.match_with_str(&self.key(*p, e))))
                    .collect();
                let mut bodies = Vec::new();
                for (i, lookup) in lookups.into_iter().enumerate() {
                    let found = lookup.await.ok();
                    let body = found
                        .and_then(|f| f.dyn_into::<Response>().ok())
                        .and_then(|r| r.array_buffer().ok());
                    if let Some(b) = body {
                        bodies.push((i, JsFuture::from(b)));
                    }
                }
                for (i, body) in bodies {
                    if let Ok(buf) = body.await {
                        out[i] = Some(Ok(FetchedPage {
                            bytes: Uint8Array::new(&buf).to_vec(),
                            from_cache: true,
                        }));
                    }
                }
            }
            LocalCopy::None => {}
        }
        // 2. the rest over the network: runs of adjacent pages, all requests in flight together
        let missing: Vec<usize> = (0..pages.len()).filter(|&i| out[i].is_none()).collect();
        let wanted: Vec<(PageId, PageEntry)> = missing.iter().map(|&i| pages[i]).collect();
        let runs = adjacent_runs(&wanted, MAX_RUN_BYTES);
        let spans: Vec<(u64, u64)> = runs
            .iter()
            .map(|r| {
                let (first, last) = (wanted[r.start].1, wanted[r.end - 1].1);
                (first.offset, last.end() - first.offset)
            })
            .collect();
        let replies = self.read_spans(&spans).await;
        let mut puts = Vec::new();
        let (mut put_bytes, mut over_limit) = (0u64, false);
        for (run, reply) in runs.into_iter().zip(replies) {
            let first = wanted[run.start].1;
            for j in run {
                let (page, e) = wanted[j];
                let r = reply.as_ref().map_err(Clone::clone).map(|bytes| {
                    let at = (e.offset - first.offset) as usize;
                    bytes[at..at + e.length as usize].to_vec()
                });
                if let Ok(bytes) = &r {
                    // a page not kept only costs a later refetch: storage
                    // never fails a generation
                    match &*self.local {
                        LocalCopy::Opfs(m) => self.keep_opfs(m, &e, bytes),
                        LocalCopy::CacheApi(cache) => {
                            let len = e.length;
                            let fits = {
                                let mut s = self.storage.borrow_mut();
                                let fits = s.copy_bytes + put_bytes + len <= s.limit;
                                if !fits {
                                    s.pages_not_kept += 1;
                                }
                                fits
                            };
                            let mut copy = bytes.clone();
                            match Response::new_with_opt_u8_array(Some(&mut copy)) {
                                Ok(resp) if fits => {
                                    put_bytes += len;
                                    // a JsFuture at once: a put the quota
                                    // refuses while an earlier one is awaited
                                    // is handled, not an uncaught rejection
                                    puts.push((
                                        JsFuture::from(
                                            cache.put_with_str(&self.key(page, &e), &resp),
                                        ),
                                        len,
                                    ));
                                }
                                _ => over_limit |= !fits,
                            }
                        }
                        LocalCopy::None => {}
                    }
                }
                out[missing[j]] = Some(r.map(|bytes| FetchedPage {
                    bytes,
                    from_cache: false,
                }));
            }
        }
        // 3. keep the new pages; a put the quota refuses (or a copy at its
        // limit) trims the copy, the page is fetched again when next missed
        let mut refused: Option<String> = None;
        for (p, len) in puts {
            match p.await {
                Ok(_) => self.storage.borrow_mut().copy_bytes += len,
                Err(e) => {
                    self.storage.borrow_mut().pages_not_kept += 1;
                    if refused.is_none() || is_quota_error(&e) {
                        refused = Some(describe(&e));
                    }
                }
            }
        }
        if let LocalCopy::CacheApi(cache) = &*self.local {
            if let Some(why) = refused {
                self.trim_cache(cache, &why, true).await;
            } else if over_limit {
                self.trim_cache(cache, "the copy reached its limit", false)
                    .await;
            }
        }
        if let LocalCopy::Opfs(m) = &*self.local {
            m.flush();
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err("not fetched".into())))
            .collect()
    }

    async fn forget(&self, page: PageId, entry: &PageEntry) {
        match &*self.local {
            LocalCopy::Opfs(m) => {
                let _ = m.write_at(entry.offset, &vec![0u8; entry.length as usize]);
            }
            LocalCopy::CacheApi(cache) => {
                let _ = JsFuture::from(cache.delete_with_str(&self.key(page, entry))).await;
            }
            LocalCopy::None => {}
        }
    }
}

/// Awaits `futs` together: each is polled as soon as the join is, so every
/// request is in flight at once; results in order.
async fn futures_join<T, F: std::future::Future<Output = T>>(futs: Vec<F>) -> Vec<T> {
    let mut futs: Vec<std::pin::Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<T>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(move |cx| {
        let mut pending = false;
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *o = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(out.iter_mut().filter_map(Option::take).collect())
        }
    })
    .await
}

/// `null` when this browser exposes WebGPU (`navigator.gpu`), else why not.
#[wasm_bindgen(js_name = webgpuSupport)]
pub fn webgpu_support() -> Option<String> {
    let nav = Reflect::get(&js_sys::global(), &"navigator".into()).ok()?;
    let gpu = Reflect::get(&nav, &"gpu".into()).ok();
    if gpu.is_some_and(|g| !g.is_undefined() && !g.is_null()) {
        None
    } else {
        Some(
            "this browser has no WebGPU (navigator.gpu is missing): use Chrome or Edge 113+, or \
             Chromium with --enable-unsafe-webgpu on Linux"
                .into(),
        )
    }
}

/// What the page shows about the device.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DeviceInfo {
    adapter: String,
    vendor: String,
    architecture: String,
    description: String,
    backend: String,
    limits: Limits,
    features: Vec<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Limits {
    max_storage_buffer_binding_size: u64,
    max_buffer_size: u64,
    max_storage_buffers_per_shader_stage: u32,
    max_compute_workgroup_storage_size: u32,
    max_compute_invocations_per_workgroup: u32,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ModelInfo {
    dim: usize,
    n_layers: usize,
    vocab_size: usize,
    memory_layers: Vec<usize>,
    /// Levels of the hierarchical memory (0: none).
    block_levels: usize,
    /// Whether a block per level is reserved for prefetching the question
    /// being typed.
    prefetch: bool,
    bank_pages: u64,
    bank_bytes: u64,
    value_rows: u64,
    page_bytes: u64,
    budget_bytes: u64,
    slots: u32,
    dense_bytes: u64,
    /// Where fetched pages are kept across reloads: `OPFS`, `Cache API` or `none`.
    local_copy: &'static str,
}

fn to_js(v: &impl Serialize) -> Result<JsValue, JsValue> {
    let text = serde_json::to_string(v).map_err(js_err)?;
    js_sys::JSON::parse(&text)
}

/// `navigator.gpu.requestAdapter()`'s `info` (vendor, architecture,
/// description), which wgpu does not expose on the web.
async fn adapter_info() -> (String, String, String) {
    let get = |o: &JsValue, k: &str| Reflect::get(o, &k.into()).ok();
    let info = async {
        let nav = get(&js_sys::global(), "navigator")?;
        let gpu = get(&nav, "gpu")?;
        let request: Function = get(&gpu, "requestAdapter")?.dyn_into().ok()?;
        let promise: Promise = request.call0(&gpu).ok()?.dyn_into().ok()?;
        let adapter = JsFuture::from(promise).await.ok()?;
        get(&adapter, "info")
    }
    .await;
    let field = |k: &str| {
        info.as_ref()
            .and_then(|i| get(i, k))
            .and_then(|v| v.as_string())
            .unwrap_or_default()
    };
    (field("vendor"), field("architecture"), field("description"))
}

/// `memlayer bench`'s browser backends: the lookup and bag forward of
/// `request` (JSON, [`crate::kernel_check::KernelRequest`]) on this page's
/// WebGPU device → JSON: the outputs, timings and the device.
#[wasm_bindgen(js_name = kernelCheck)]
pub async fn kernel_check(request: String) -> Result<String, JsValue> {
    let req: crate::kernel_check::KernelRequest = serde_json::from_str(&request).map_err(js_err)?;
    let (ctx, device, _) = open_gpu().await?;
    let reply = crate::kernel_check::run(&ctx, &req, now_seconds)
        .await
        .map_err(js_err)?;
    let mut reply = serde_json::to_value(&reply).map_err(js_err)?;
    reply["device"] = serde_json::to_value(&device).map_err(js_err)?;
    serde_json::to_string(&reply).map_err(js_err)
}

/// A WebGPU device with the adapter's own limits, what the page shows
/// about it, and the slot keeping the device's first uncaptured error.
async fn open_gpu() -> Result<(GpuContext, DeviceInfo, Arc<Mutex<Option<String>>>), JsValue> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: wgpu::Backends::BROWSER_WEBGPU,
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    let adapter = instance
        .request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            ..Default::default()
        })
        .await
        .map_err(|e| {
            js_err(format!(
                "WebGPU gave no adapter ({e}): on Linux start Chromium with \
                 --enable-unsafe-webgpu"
            ))
        })?;
    let ctx = GpuContext::from_adapter(adapter, &GpuOptions::default())
        .await
        .map_err(js_err)?;
    // WebGPU reports validation errors asynchronously: keep the first
    // one so a generation that hit it fails with its message
    let gpu_error = Arc::new(Mutex::new(None::<String>));
    let slot = gpu_error.clone();
    ctx.device
        .on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let msg = e.to_string();
            web_sys::console::error_1(&JsValue::from_str(&format!("WebGPU error: {msg}")));
            slot.lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert(msg);
        }));
    let (vendor, architecture, description) = adapter_info().await;
    let l = &ctx.limits;
    let adapter_name = [description.as_str(), &ctx.info.name]
        .into_iter()
        .find(|s| !s.is_empty())
        .map_or_else(
            || format!("{vendor} {architecture}").trim().to_string(),
            str::to_string,
        );
    let device = DeviceInfo {
        adapter: adapter_name,
        vendor,
        architecture,
        description,
        backend: format!("{:?}", ctx.info.backend),
        limits: Limits {
            max_storage_buffer_binding_size: l.max_storage_buffer_binding_size,
            max_buffer_size: l.max_buffer_size,
            max_storage_buffers_per_shader_stage: l.max_storage_buffers_per_shader_stage,
            max_compute_workgroup_storage_size: l.max_compute_workgroup_storage_size,
            max_compute_invocations_per_workgroup: l.max_compute_invocations_per_workgroup,
        },
        features: format!("{:?}", ctx.adapter.features())
            .split(['|', '(', ')'])
            .map(str::trim)
            .filter(|s| !s.is_empty() && *s != "Features")
            .map(str::to_string)
            .collect(),
    };
    Ok((ctx, device, gpu_error))
}

impl DeviceInfo {
    /// A model without a product-key memory runs on the CPU (wasm): no
    /// WebGPU device is opened.
    fn cpu_only() -> Self {
        Self {
            adapter: "CPU (wasm): this model has no product-key memory, no WebGPU device is used"
                .into(),
            vendor: String::new(),
            architecture: String::new(),
            description: String::new(),
            backend: "wasm".into(),
            limits: Limits {
                max_storage_buffer_binding_size: 0,
                max_buffer_size: 0,
                max_storage_buffers_per_shader_stage: 0,
                max_compute_workgroup_storage_size: 0,
                max_compute_invocations_per_workgroup: 0,
            },
            features: Vec::new(),
        }
    }
}

/// The browser's copy of `bank`'s pages: an OPFS file named after the
/// bank's table checksum (a rewritten bank never reads pages of an older
/// one), else the Cache API, else none. `prefer`: `"cache"` skips OPFS,
/// `"none"` keeps no copy (the page's `?local_copy=`).
async fn local_copy(bank: &RemoteBank<HttpFetch>, prefer: &str) -> Result<LocalCopy, JsValue> {
    let h = bank.meta().header;
    let name = format!("memlayer-{:016x}-{}.bank", h.table_checksum, h.file_len);
    let opfs = match prefer {
        "none" => return Ok(LocalCopy::None),
        "cache" => Err("the page asked for the Cache API".to_string()),
        _ => OpfsMirror::open(&name).await,
    };
    Ok(match opfs {
        Ok(m) => LocalCopy::Opfs(m),
        Err(why) => {
            web_sys::console::warn_1(&JsValue::from_str(&format!(
                "OPFS not used ({why}); keeping pages in the Cache API"
            )));
            let storage = Scope::get().map_err(js_err)?.caches();
            let cache = match storage {
                Ok(s) => JsFuture::from(s.open(PAGE_CACHE))
                    .await
                    .ok()
                    .and_then(|c| c.dyn_into::<Cache>().ok()),
                Err(_) => None,
            };
            cache.map_or(LocalCopy::None, LocalCopy::CacheApi)
        }
    })
}

/// Reads the storage estimate and sets the local copy's size and limit (at
/// most the bank's length); an OPFS copy already past the limit is trimmed.
async fn init_storage(state: &RefCell<StorageState>, local: &LocalCopy, bank_len: u64) {
    refresh_storage(state).await;
    let mut s = state.borrow_mut();
    let copy = match local {
        LocalCopy::Opfs(m) => m.size(),
        LocalCopy::CacheApi(_) => s.caches_usage.unwrap_or(0.0) as u64,
        LocalCopy::None => 0,
    };
    s.copy_bytes = copy;
    s.limit = s.limit_from_estimate(copy, bank_len);
    if let LocalCopy::Opfs(m) = local
        && copy > s.limit
    {
        let to = s.limit;
        let kept = if m.truncate_to(to).is_ok() {
            to
        } else {
            m.size()
        };
        s.trimmed(
            "OPFS",
            "the copy is larger than the quota now leaves it",
            copy,
            kept,
            "",
        );
    }
}

/// The chat model in the browser: load once, generate many times.
#[wasm_bindgen]
pub struct ChatEngine {
    engine: Rc<RefCell<Engine<HttpFetch>>>,
    /// The counters as of the last piece (read while a generation runs).
    last_stats: Rc<Cell<MemoryStats>>,
    device: DeviceInfo,
    model: ModelInfo,
    local: Rc<LocalCopy>,
    /// The device's first uncaptured error.
    gpu_error: Arc<Mutex<Option<String>>>,
    /// HTTP requests sent for the bank (its header and table, then pages; a
    /// multi-range request counts once): `httpRequests` in the stats.
    http_requests: Rc<Cell<u64>>,
    /// The browser's storage and the local copy's limit (`storage*` and
    /// `localCopy*` in the stats).
    storage: Rc<RefCell<StorageState>>,
}

#[wasm_bindgen]
impl ChatEngine {
    /// Loads the model directory at `model_url` (config, tokenizer, dense
    /// weights, a hierarchical memory's routing files; the bank's header
    /// and page table), opens a WebGPU device with the adapter's own limits
    /// when the model has a product-key memory, and sizes the memory to
    /// `budget_percent` of the bank as held (values in its dtype, blocks as
    /// f32). `on_progress(message)` is called at each step. `local_copy`:
    /// where fetched pages are kept, `"opfs"` (the default: OPFS, else the
    /// Cache API), `"cache"` or `"none"`.
    pub async fn load(
        model_url: String,
        budget_percent: f64,
        on_progress: Function,
        local_copy_kind: Option<String>,
    ) -> Result<ChatEngine, JsValue> {
        let progress = |m: &str| {
            let _ = on_progress.call1(&JsValue::NULL, &JsValue::from_str(m));
        };
        if !(budget_percent > 0.0 && budget_percent <= 100.0) {
            return Err(js_err(format!(
                "the budget must be in (0, 100] percent of the bank, got {budget_percent}"
            )));
        }
        let base = if model_url.ends_with('/') {
            model_url
        } else {
            format!("{model_url}/")
        };
        progress("fetching config.json and tokenizer.json");
        let text = |b: Vec<u8>, f: &str| {
            String::from_utf8(b).map_err(|e| js_err(format!("{base}{f}: {e}")))
        };
        let config_json = text(
            get_file(&format!("{base}config.json"))
                .await
                .map_err(js_err)?,
            "config.json",
        )?;
        // bounds before anything else is fetched or allocated
        let cfg = memlayer_core::model::ModelConfig::from_json(&config_json)
            .map_err(|e| js_err(format!("{base}config.json: {e}")))?;
        // the product-key layers run on WebGPU; dense and hierarchical-memory
        // layers on the CPU
        let (mut ctx, device, gpu_error) = if cfg.pkm.is_some() {
            if let Some(why) = webgpu_support() {
                return Err(js_err(why));
            }
            progress("requesting a WebGPU adapter");
            let (ctx, device, error) = open_gpu().await?;
            (Some(ctx), device, error)
        } else {
            (None, DeviceInfo::cpu_only(), Arc::new(Mutex::new(None)))
        };
        let on_gpu = ctx.is_some();
        let tokenizer_json = text(
            get_file(&format!("{base}tokenizer.json"))
                .await
                .map_err(js_err)?,
            "tokenizer.json",
        )?;
        progress("fetching the dense weights (model.safetensors)");
        let safetensors = get_file(&format!("{base}model.safetensors"))
            .await
            .map_err(js_err)?;
        let routing = if cfg.hier.is_some() {
            progress("fetching the memory's routing (retriever, cluster tree)");
            let mut got = Vec::new();
            for name in RoutingFiles::needed(&cfg) {
                got.push(get_file(&format!("{base}{name}")).await.map_err(js_err)?);
            }
            let mut got = got.into_iter();
            Some(RoutingBytes {
                retriever: got.next().unwrap_or_default(),
                tree: got.next().unwrap_or_default(),
                context_index: got.next(),
            })
        } else {
            None
        };
        let files = ModelFiles {
            location: base.clone(),
            config_json,
            tokenizer_json,
            safetensors,
            routing,
        };
        progress("verifying the model files (checksums.json)");
        let checksums = get_checksums(&base).await.map_err(js_err)?;
        let cfg = files.verify(&checksums).map_err(js_err)?;
        let routing = files.routing(&cfg, &checksums).map_err(js_err)?;
        // a dense model (no memory in its config) has no bank: nothing is paged
        let has_memory = cfg.pkm.is_some() || cfg.hier.is_some();
        let http_requests = Rc::new(Cell::new(0u64));
        let storage = Rc::new(RefCell::new(StorageState::default()));
        let (memory, local, bank_bytes, value_section) = if has_memory {
            progress("reading the memory bank's page table");
            let url = format!("{base}memory.bank");
            let bank = RemoteBank::open(HttpFetch {
                url: url.clone(),
                local: Rc::new(LocalCopy::None),
                multi: Rc::new(Cell::new(MULTI_UNKNOWN)),
                requests: http_requests.clone(),
                storage: storage.clone(),
                file_len: None,
            })
            .await
            .map_err(js_err)?;
            // its shapes fit the config, and it is the bank checksums.json records
            check_bank(&cfg, Some(&checksums), &bank).map_err(js_err)?;
            let prefer = local_copy_kind.as_deref().unwrap_or("opfs");
            let local = Rc::new(local_copy(&bank, prefer).await?);
            let file_len = bank.meta().header.file_len;
            init_storage(&storage, &local, file_len).await;
            let bank = bank.with_fetcher(HttpFetch {
                url,
                local: local.clone(),
                multi: Rc::new(Cell::new(MULTI_UNKNOWN)),
                requests: http_requests.clone(),
                storage: storage.clone(),
                file_len: Some(file_len),
            });
            let bank_bytes = memlayer_bank::resident_bytes(bank.sections());
            let budget_bytes = (bank_bytes as f64 * budget_percent / 100.0) as u64;
            let value_section = bank
                .sections()
                .iter()
                .find(|s| matches!(s.spec.kind, memlayer_bank::SectionKind::PkmValues { .. }))
                .map(|s| s.geometry);
            let memory = MemorySetup {
                ctx: ctx.take(),
                bank,
                budget_bytes,
                prefetch: cfg.hier.is_some(),
            };
            (Some(memory), local, bank_bytes, value_section)
        } else {
            refresh_storage(&storage).await;
            (None, Rc::new(LocalCopy::None), 0, None)
        };
        progress("building the model and its memory");
        let mut engine = Engine::new(&files, memory, routing).map_err(js_err)?;
        engine.set_clock(now_seconds);
        if on_gpu {
            progress("compiling the WebGPU kernels");
        }
        engine.warm_up().await.map_err(js_err)?;
        let cfg = engine.config();
        let stats = engine.stats();
        let model = ModelInfo {
            dim: cfg.dim,
            n_layers: cfg.n_layers,
            vocab_size: cfg.vocab_size,
            memory_layers: (0..cfg.n_layers).filter(|&i| cfg.is_pkm_layer(i)).collect(),
            block_levels: cfg.hier.as_ref().map_or(0, |h| h.levels),
            prefetch: engine.memory().is_some_and(|m| m.prefetch_enabled()),
            bank_pages: stats.bank_pages,
            bank_bytes,
            value_rows: value_section.map_or(0, |g| g.rows),
            page_bytes: value_section.map_or(0, |g| g.page_bytes),
            budget_bytes: stats.budget_bytes,
            slots: stats.slots,
            dense_bytes: engine.dense_bytes(),
            local_copy: local.name(),
        };
        Ok(ChatEngine {
            engine: Rc::new(RefCell::new(engine)),
            last_stats: Rc::new(Cell::new(stats)),
            device,
            model,
            local,
            gpu_error,
            http_requests,
            storage,
        })
    }

    /// Fetches the memory blocks of `text`'s route ahead of a generation
    /// (the page calls it while the question is typed); resolves to the
    /// number of blocks fetched: 0 for a model without a hierarchical
    /// memory, when they are already held, or while a generation runs (it
    /// is skipped, never waited for).
    // The engine stays borrowed across the fetch on purpose: a generation
    // started meanwhile fails with a message (the page's worker handles one
    // message at a time, so it never does).
    #[allow(clippy::await_holding_refcell_ref)]
    pub fn prefetch(&self, text: String) -> Promise {
        let engine = self.engine.clone();
        let last = self.last_stats.clone();
        future_to_promise(async move {
            let Ok(mut engine) = engine.try_borrow_mut() else {
                return Ok(JsValue::from(0));
            };
            let n = engine.prefetch(&text).await.map_err(js_err)?;
            last.set(engine.stats());
            Ok(JsValue::from(n as u32))
        })
    }

    /// The adapter, backend, limits and features of the device.
    #[wasm_bindgen(js_name = deviceInfo)]
    pub fn device_info(&self) -> Result<JsValue, JsValue> {
        to_js(&self.device)
    }

    /// The model's shape, the bank and the budget.
    #[wasm_bindgen(js_name = modelInfo)]
    pub fn model_info(&self) -> Result<JsValue, JsValue> {
        to_js(&self.model)
    }

    /// The memory counters (also while a generation runs).
    pub fn stats(&self) -> Result<JsValue, JsValue> {
        let s = match self.engine.try_borrow() {
            Ok(e) => e.stats(),
            Err(_) => self.last_stats.get(),
        };
        // the page reads camelCase keys (`web/app.js`)
        let v = to_js(&s.camel_case())?;
        Reflect::set(
            &v,
            &"httpRequests".into(),
            &JsValue::from_f64(self.http_requests.get() as f64),
        )?;
        add_storage(&v, &self.storage.borrow())?;
        Ok(v)
    }

    /// Generates after `prompt` (stops at the first newline, at EOS or after
    /// `max_tokens`), calling `on_piece(text, stats)` with each new piece.
    /// Resolves to `{text, tokens, promptTokens, firstTokenSeconds, seconds,
    /// tokensPerSecond}`.
    // The engine stays borrowed across the awaits on purpose: one generation
    // at a time (a second call fails with a message), and `stats()` reads the
    // copy the pieces leave in `last_stats` meanwhile.
    #[allow(clippy::await_holding_refcell_ref)]
    pub fn generate(
        &self,
        prompt: String,
        max_tokens: u32,
        temperature: f32,
        top_p: f32,
        seed: f64,
        on_piece: Function,
    ) -> Promise {
        let engine = self.engine.clone();
        let last = self.last_stats.clone();
        let gpu_error = self.gpu_error.clone();
        let storage = self.storage.clone();
        future_to_promise(async move {
            if !(seed >= 0.0 && seed.fract() == 0.0 && seed <= 9_007_199_254_740_991.0) {
                return Err(js_err(format!(
                    "seed must be a whole number ≥ 0, got {seed}"
                )));
            }
            let sampling = Sampling {
                max_tokens: max_tokens as usize,
                temperature,
                top_p,
                seed: seed as u64,
            };
            let mut engine = engine
                .try_borrow_mut()
                .map_err(|_| js_err("a generation is already running"))?;
            let g = engine
                .generate(
                    &prompt,
                    &sampling,
                    Some("\n"),
                    &now_seconds,
                    |piece, stats| {
                        last.set(*stats);
                        if let Ok(s) = to_js(&stats.camel_case()) {
                            let _ = add_storage(&s, &storage.borrow());
                            let _ = on_piece.call2(&JsValue::NULL, &JsValue::from_str(piece), &s);
                        }
                    },
                )
                .await
                .map_err(js_err)?;
            last.set(engine.stats());
            refresh_storage(&storage).await;
            if let Some(e) = gpu_error.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                return Err(js_err(format!("WebGPU error during generation: {e}")));
            }
            #[derive(Serialize)]
            #[serde(rename_all = "camelCase")]
            struct Reply<'a> {
                text: &'a str,
                tokens: usize,
                prompt_tokens: usize,
                first_token_seconds: f64,
                seconds: f64,
                tokens_per_second: f64,
            }
            to_js(&Reply {
                text: &g.text,
                tokens: g.tokens.len(),
                prompt_tokens: g.prompt_tokens,
                first_token_seconds: g.first_token_seconds,
                seconds: g.seconds,
                tokens_per_second: g.decode_tokens_per_second(),
            })
        })
    }

    /// Empties the browser's copy of the pages (the next misses go to the
    /// network); resolves to the number of entries dropped (OPFS: 1 file).
    #[wasm_bindgen(js_name = clearPageCache)]
    pub fn clear_page_cache(&self) -> Promise {
        let local = self.local.clone();
        let storage = self.storage.clone();
        future_to_promise(async move {
            storage.borrow_mut().copy_bytes = 0;
            let dropped = clear_copy(&local).await;
            refresh_storage(&storage).await;
            dropped
        })
    }
}

/// Empties `local`; the number of entries dropped (OPFS: 1 file).
async fn clear_copy(local: &LocalCopy) -> Result<JsValue, JsValue> {
    match local {
        LocalCopy::Opfs(m) => {
            m.clear().map_err(js_err)?;
            Ok(JsValue::from(1))
        }
        LocalCopy::CacheApi(cache) => {
            let keys: js_sys::Array = JsFuture::from(cache.keys()).await?.dyn_into()?;
            let mut n = 0;
            for k in keys.iter() {
                let req: Request = k.dyn_into()?;
                JsFuture::from(cache.delete_with_str(&req.url())).await?;
                n += 1;
            }
            Ok(JsValue::from(n))
        }
        LocalCopy::None => Ok(JsValue::from(0)),
    }
}

/// Adds the storage fields to a stats object: `storageUsage`,
/// `storageQuota` (bytes, `navigator.storage.estimate()`; 0 when unknown),
/// `storagePersisted`, `localCopyBytes`, `localCopyLimit`,
/// `localCopyTrims`, `localCopyTrimmedBytes`, `pagesNotKept`,
/// `storageNotice` (the latest trim's message, or null).
fn add_storage(v: &JsValue, s: &StorageState) -> Result<(), JsValue> {
    let set = |k: &str, x: JsValue| Reflect::set(v, &k.into(), &x).map(|_| ());
    set("storageUsage", JsValue::from_f64(s.usage))?;
    set("storageQuota", JsValue::from_f64(s.quota))?;
    set("storagePersisted", JsValue::from_bool(s.persisted))?;
    set("localCopyBytes", JsValue::from_f64(s.copy_bytes as f64))?;
    set("localCopyLimit", JsValue::from_f64(s.limit as f64))?;
    set("localCopyTrims", JsValue::from(s.trims))?;
    set(
        "localCopyTrimmedBytes",
        JsValue::from_f64(s.trimmed_bytes as f64),
    )?;
    set("pagesNotKept", JsValue::from_f64(s.pages_not_kept as f64))?;
    set(
        "storageNotice",
        s.notice.as_deref().map_or(JsValue::NULL, JsValue::from_str),
    )
}
