//! A small static file server with `Range` support (`memlayer serve`).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tiny_http::{Header, Method, Request, Response, StatusCode};

use crate::range::{RangeReply, resolve};

/// A URL prefix served from a directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// URL path prefix, e.g. `/model/` or `/`. Matched segment by segment
    /// (`/model` and `/model/` are the same mount; `/modelx` does not match).
    pub prefix: String,
    /// The directory served under `prefix`.
    pub dir: PathBuf,
}

impl Mount {
    /// `dir` served under `prefix`.
    pub fn new(prefix: impl Into<String>, dir: impl Into<PathBuf>) -> Self {
        Self {
            prefix: prefix.into(),
            dir: dir.into(),
        }
    }
}

/// What [`Server::start`] serves, and where.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Address to listen on; port 0 picks a free port (see [`ServerHandle::local_addr`]).
    pub addr: SocketAddr,
    /// Directories to serve; the mount with the longest matching prefix wins.
    pub mounts: Vec<Mount>,
    /// Worker threads answering requests (at least 1).
    pub threads: usize,
    /// Log one line per request to stderr.
    pub verbose: bool,
}

impl ServeConfig {
    /// `addr` with no mounts yet, 4 threads, quiet.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            mounts: Vec::new(),
            threads: 4,
            verbose: false,
        }
    }

    /// Adds a mount.
    pub fn mount(mut self, prefix: impl Into<String>, dir: impl Into<PathBuf>) -> Self {
        self.mounts.push(Mount::new(prefix, dir));
        self
    }
}

/// Why the server could not start (or stopped).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration has no mounts.
    #[error("nothing to serve: no mounts configured")]
    NoMounts,
    /// A mount prefix is not an absolute URL path or contains `..`.
    #[error("invalid mount prefix {prefix:?}: {reason}")]
    BadPrefix {
        /// The prefix.
        prefix: String,
        /// What is wrong.
        reason: String,
    },
    /// A mount's directory does not exist or is not a directory.
    #[error("cannot serve {} under {prefix:?}: {source}", .dir.display())]
    MountDir {
        /// The prefix.
        prefix: String,
        /// The directory.
        dir: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Listening on the address failed.
    #[error("cannot listen on {addr}: {reason}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error from the listener.
        reason: String,
    },
    /// Accepting connections failed; the server stopped.
    #[error("the server stopped accepting connections: {0}")]
    Accept(#[source] io::Error),
}

/// A mount with its directory canonicalized and its prefix split into segments.
#[derive(Debug)]
struct Root {
    segments: Vec<String>,
    dir: PathBuf,
}

struct Shared {
    server: tiny_http::Server,
    roots: Vec<Root>,
    stop: AtomicBool,
    verbose: bool,
    error: Mutex<Option<io::Error>>,
}

/// The static file server. See the crate docs for what it answers.
#[derive(Debug)]
pub struct Server;

impl Server {
    /// Validates the mounts, listens on `config.addr` and starts the worker
    /// threads. Returns once the server accepts connections.
    pub fn start(config: ServeConfig) -> Result<ServerHandle, ServeError> {
        if config.mounts.is_empty() {
            return Err(ServeError::NoMounts);
        }
        let mut roots = Vec::with_capacity(config.mounts.len());
        for m in &config.mounts {
            roots.push(root_of(m)?);
        }
        // Longest prefix first, so the first match is the longest.
        roots.sort_by_key(|r| std::cmp::Reverse(r.segments.len()));
        for pair in roots.windows(2) {
            if pair[0].segments == pair[1].segments {
                return Err(ServeError::BadPrefix {
                    prefix: format!("/{}", pair[0].segments.join("/")),
                    reason: "mounted twice".into(),
                });
            }
        }
        let server = tiny_http::Server::http(config.addr).map_err(|e| ServeError::Bind {
            addr: config.addr,
            reason: e.to_string(),
        })?;
        let local_addr = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| ServeError::Bind {
                addr: config.addr,
                reason: "not an IP listener".into(),
            })?;
        let shared = Arc::new(Shared {
            server,
            roots,
            stop: AtomicBool::new(false),
            verbose: config.verbose,
            error: Mutex::new(None),
        });
        let threads = config.threads.max(1);
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads {
            let for_worker = Arc::clone(&shared);
            let spawned = std::thread::Builder::new()
                .name(format!("memlayer-serve-{i}"))
                .spawn(move || worker(&for_worker, threads));
            match spawned {
                Ok(h) => workers.push(h),
                Err(e) => {
                    let handle = ServerHandle {
                        local_addr,
                        shared: Some(shared),
                        workers,
                    };
                    drop(handle);
                    return Err(ServeError::Bind {
                        addr: config.addr,
                        reason: format!("cannot start a worker thread: {e}"),
                    });
                }
            }
        }
        Ok(ServerHandle {
            local_addr,
            shared: Some(shared),
            workers,
        })
    }
}

/// A running server. Dropping it shuts the server down.
pub struct ServerHandle {
    local_addr: SocketAddr,
    shared: Option<Arc<Shared>>,
    workers: Vec<JoinHandle<()>>,
}

impl ServerHandle {
    /// The address the server listens on (with the real port if 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `http://ip:port` (no trailing slash): append a path such as `/model/x.bank`.
    pub fn url(&self) -> String {
        format!("http://{}", self.local_addr)
    }

    /// Stops accepting connections, lets the requests being answered finish,
    /// and joins the worker threads. A request that arrives afterwards on a
    /// connection the client kept alive is never answered (the client sees
    /// its own timeout): tiny_http offers no way to close those.
    pub fn shutdown(mut self) {
        self.stop();
    }

    /// Blocks until the server stops (it only stops by itself if accepting
    /// connections fails; the CLI runs until interrupted).
    pub fn wait(mut self) -> Result<(), ServeError> {
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        let err = self
            .shared
            .as_ref()
            .and_then(|s| s.error.lock().ok().and_then(|mut e| e.take()));
        self.stop();
        match err {
            Some(e) => Err(ServeError::Accept(e)),
            None => Ok(()),
        }
    }

    fn stop(&mut self) {
        if let Some(shared) = self.shared.take() {
            shared.stop.store(true, Ordering::SeqCst);
            for _ in 0..self.workers.len() {
                shared.server.unblock();
            }
            for w in self.workers.drain(..) {
                let _ = w.join();
            }
            // Dropping the last reference closes the listener.
            drop(shared);
        }
    }
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("local_addr", &self.local_addr)
            .field("running", &self.shared.is_some())
            .finish()
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

fn root_of(m: &Mount) -> Result<Root, ServeError> {
    let bad = |reason: &str| ServeError::BadPrefix {
        prefix: m.prefix.clone(),
        reason: reason.into(),
    };
    if !m.prefix.starts_with('/') {
        return Err(bad("must start with '/'"));
    }
    let segments: Vec<String> = m
        .prefix
        .split('/')
        .filter(|s| !s.is_empty() && *s != ".")
        .map(str::to_string)
        .collect();
    if segments.iter().any(|s| s == "..") {
        return Err(bad("must not contain '..'"));
    }
    let mount_err = |source| ServeError::MountDir {
        prefix: m.prefix.clone(),
        dir: m.dir.clone(),
        source,
    };
    let dir = std::fs::canonicalize(&m.dir).map_err(mount_err)?;
    if !dir.is_dir() {
        return Err(mount_err(io::Error::new(
            io::ErrorKind::NotADirectory,
            "not a directory",
        )));
    }
    Ok(Root { segments, dir })
}

fn worker(shared: &Shared, threads: usize) {
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        match shared.server.recv() {
            Ok(req) => handle(shared, req),
            Err(e) => {
                // Either shutdown's unblock() or the accept loop died.
                if !shared.stop.swap(true, Ordering::SeqCst) {
                    if let Ok(mut slot) = shared.error.lock() {
                        *slot = Some(e);
                    }
                    for _ in 0..threads {
                        shared.server.unblock();
                    }
                }
                return;
            }
        }
    }
}

/// Where a request path leads.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    File(PathBuf),
    /// A directory asked for without the trailing slash: redirect here.
    Redirect(String),
    NotFound,
    BadRequest(&'static str),
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hi = hex_val(*b.get(i + 1)?)?;
            let lo = hex_val(*b.get(i + 2)?)?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

fn percent_encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Maps a request target (`/model/x.bank?v=1`) to a file inside a mount.
///
/// The path is percent-decoded once, then split into segments; `..`
/// segments, NUL, backslashes and (on Windows) `:` are rejected before any
/// file system access. The joined path is canonicalized and must still lie
/// inside the mount's canonical directory (this also stops symlinks that
/// point outside).
fn resolve_target(roots: &[Root], raw: &str) -> Target {
    let path = raw.split(['?', '#']).next().unwrap_or("");
    if !path.starts_with('/') {
        return Target::BadRequest("the request target must be an absolute path");
    }
    let Some(decoded) = percent_decode(path) else {
        return Target::BadRequest("invalid percent-encoding");
    };
    let Ok(decoded) = String::from_utf8(decoded) else {
        return Target::BadRequest("the path is not UTF-8");
    };
    if decoded.contains(['\0', '\\']) || (cfg!(windows) && decoded.contains(':')) {
        return Target::BadRequest("forbidden character in the path");
    }
    let segments: Vec<&str> = decoded
        .split('/')
        .filter(|s| !s.is_empty() && *s != ".")
        .collect();
    if segments.contains(&"..") {
        return Target::BadRequest("'..' in the path");
    }
    let Some(root) = roots.iter().find(|r| {
        r.segments.len() <= segments.len() && r.segments.iter().zip(&segments).all(|(a, b)| a == b)
    }) else {
        return Target::NotFound;
    };
    let mut full = root.dir.clone();
    full.extend(&segments[root.segments.len()..]);
    let Some(canon) = inside(&root.dir, &full) else {
        return Target::NotFound;
    };
    if canon.is_dir() {
        if !decoded.ends_with('/') {
            let mut loc = String::new();
            for s in &segments {
                loc.push('/');
                loc.push_str(&percent_encode_segment(s));
            }
            loc.push('/');
            return Target::Redirect(loc);
        }
        return match inside(&root.dir, &canon.join("index.html")) {
            Some(index) if index.is_file() => Target::File(index),
            _ => Target::NotFound,
        };
    }
    if canon.is_file() {
        Target::File(canon)
    } else {
        Target::NotFound
    }
}

/// `path` canonicalized, if it exists and lies inside `dir` (canonical).
fn inside(dir: &Path, path: &Path) -> Option<PathBuf> {
    let canon = std::fs::canonicalize(path).ok()?;
    canon.starts_with(dir).then_some(canon)
}

/// The `Content-Type` for a file name.
pub fn content_type(path: &Path) -> &'static str {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    match ext.as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "wasm" => "application/wasm",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "svg" => "image/svg+xml",
        "ico" => "image/x-icon",
        "txt" | "md" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

fn hdr(name: &str, value: &str) -> Option<Header> {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).ok()
}

/// Headers on every reply: no caching without revalidation, and CORS for
/// browser `fetch` (which must be allowed to read `Content-Range`).
fn common_headers() -> Vec<Header> {
    [
        ("Cache-Control", "no-cache"),
        ("Access-Control-Allow-Origin", "*"),
        (
            "Access-Control-Expose-Headers",
            "Content-Range, Content-Length, Accept-Ranges",
        ),
    ]
    .iter()
    .filter_map(|(n, v)| hdr(n, v))
    .collect()
}

type Body = Box<dyn Read + Send>;

struct Reply {
    status: u16,
    headers: Vec<Header>,
    body: Body,
    length: u64,
}

impl Reply {
    fn text(status: u16, msg: &str) -> Self {
        let mut headers = common_headers();
        headers.extend(hdr("Content-Type", "text/plain; charset=utf-8"));
        let body = format!("{status} {msg}\n").into_bytes();
        Self {
            status,
            headers,
            length: body.len() as u64,
            body: Box::new(io::Cursor::new(body)),
        }
    }

    fn empty(status: u16, extra: &[(&str, &str)]) -> Self {
        let mut headers = common_headers();
        headers.extend(extra.iter().filter_map(|(n, v)| hdr(n, v)));
        Self {
            status,
            headers,
            length: 0,
            body: Box::new(io::empty()),
        }
    }
}

fn handle(shared: &Shared, req: Request) {
    let method = req.method().clone();
    let url = req.url().to_string();
    let range = req
        .headers()
        .iter()
        .find(|h| h.field.equiv("Range"))
        .map(|h| h.value.as_str().to_string());
    let reply = reply_to(&shared.roots, &method, &url, range.as_deref());
    if shared.verbose {
        let from = req
            .remote_addr()
            .map_or_else(|| "-".to_string(), |a| a.to_string());
        let range = range.map(|r| format!(" [{r}]")).unwrap_or_default();
        eprintln!(
            "{from} {method} {url}{range} -> {} ({} bytes)",
            reply.status,
            if method == Method::Head {
                0
            } else {
                reply.length
            }
        );
    }
    // On 32-bit targets a reply over 4 GiB cannot be described to tiny_http.
    let Ok(length) = usize::try_from(reply.length) else {
        let r = Reply::text(500, "reply too large for this platform");
        let _ = req.respond(to_response(r, 0));
        return;
    };
    // The client may have gone away; nothing to do about it.
    let _ = req.respond(to_response(reply, length));
}

fn to_response(reply: Reply, length: usize) -> Response<Body> {
    // A threshold above every length: always send Content-Length, never chunked.
    Response::new(
        StatusCode(reply.status),
        reply.headers,
        reply.body,
        Some(length),
        None,
    )
    .with_chunked_threshold(usize::MAX)
}

fn reply_to(roots: &[Root], method: &Method, url: &str, range: Option<&str>) -> Reply {
    match method {
        Method::Get | Method::Head => {}
        Method::Options => {
            return Reply::empty(
                204,
                &[
                    ("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS"),
                    ("Access-Control-Allow-Headers", "Range"),
                    ("Access-Control-Max-Age", "86400"),
                    ("Allow", "GET, HEAD, OPTIONS"),
                ],
            );
        }
        _ => {
            let mut r = Reply::text(405, "Method Not Allowed");
            r.headers.extend(hdr("Allow", "GET, HEAD, OPTIONS"));
            return r;
        }
    }
    let path = match resolve_target(roots, url) {
        Target::File(p) => p,
        Target::Redirect(loc) => {
            let mut r = Reply::text(301, "Moved Permanently");
            r.headers.extend(hdr("Location", &loc));
            return r;
        }
        Target::NotFound => return Reply::text(404, "Not Found"),
        Target::BadRequest(why) => return Reply::text(400, &format!("Bad Request: {why}")),
    };
    match file_reply(&path, *method == Method::Head, range) {
        Ok(r) => r,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Reply::text(404, "Not Found"),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Reply::text(403, "Forbidden"),
        Err(_) => Reply::text(500, "Internal Server Error"),
    }
}

fn file_reply(path: &Path, head: bool, range: Option<&str>) -> io::Result<Reply> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut headers = common_headers();
    headers.extend(hdr("Accept-Ranges", "bytes"));
    headers.extend(hdr("Content-Type", content_type(path)));
    let (status, start, length) = match resolve(range, len) {
        RangeReply::Full => (200, 0, len),
        RangeReply::Partial { start, end } => {
            headers.extend(hdr("Content-Range", &format!("bytes {start}-{end}/{len}")));
            (206, start, end - start + 1)
        }
        RangeReply::Unsatisfiable => {
            headers.extend(hdr("Content-Range", &format!("bytes */{len}")));
            return Ok(Reply {
                status: 416,
                headers,
                body: Box::new(io::empty()),
                length: 0,
            });
        }
    };
    let body: Body = if head {
        // tiny_http sends no body for HEAD, only the Content-Length.
        Box::new(io::empty())
    } else {
        // Stream the range straight from the file: no whole-file buffer.
        file.seek(SeekFrom::Start(start))?;
        Box::new(file.take(length))
    };
    Ok(Reply {
        status,
        headers,
        body,
        length,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roots(dir: &Path, prefixes: &[&str]) -> Vec<Root> {
        let mut r: Vec<Root> = prefixes
            .iter()
            .map(|p| root_of(&Mount::new(*p, dir)).expect("mount"))
            .collect();
        r.sort_by_key(|r| std::cmp::Reverse(r.segments.len()));
        r
    }

    #[test]
    fn decode_and_encode() {
        assert_eq!(percent_decode("/a%20b%2F").as_deref(), Some(&b"/a b/"[..]));
        assert_eq!(percent_decode("/%2"), None);
        assert_eq!(percent_decode("/%zz"), None);
        assert_eq!(percent_encode_segment("a b/é"), "a%20b%2F%C3%A9");
    }

    #[test]
    fn traversal_is_rejected_before_the_file_system() {
        let dir = std::env::temp_dir();
        let r = roots(&dir, &["/"]);
        for bad in [
            "/../etc/passwd",
            "/%2e%2e/etc/passwd",
            "/%2E%2E%2Fetc/passwd",
            "/a/..%2f..%2fetc",
            "/..\\etc",
            "/a%00b",
            "etc/passwd",
            "http://x/etc/passwd",
        ] {
            assert!(
                matches!(resolve_target(&r, bad), Target::BadRequest(_)),
                "{bad}"
            );
        }
        // Double encoding decodes once: a literal file named "%2e%2e", absent.
        assert_eq!(resolve_target(&r, "/%252e%252e/x"), Target::NotFound);
    }

    #[test]
    fn content_types() {
        let ct = |n: &str| content_type(Path::new(n));
        assert_eq!(ct("a.wasm"), "application/wasm");
        assert_eq!(ct("A.HTML"), "text/html; charset=utf-8");
        assert_eq!(ct("x.mjs"), "text/javascript; charset=utf-8");
        assert_eq!(ct("m.bank"), "application/octet-stream");
        assert_eq!(ct("noext"), "application/octet-stream");
    }
}
