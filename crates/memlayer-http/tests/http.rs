//! memlayer-http on 127.0.0.1: the static server's Range semantics,
//! `HttpSource` against it, a bank end to end, and fault injection with
//! hand-written misbehaving servers.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use memlayer_bank::{
    BankError, BankFileWriter, BankLayout, BankReader, Dtype, FileSource, PageSource, SectionSpec,
    SourceError,
};
use memlayer_http::test_support::read_request_head;
use memlayer_http::{HttpOptions, HttpSource, ServeConfig, ServerHandle};

// ---------------------------------------------------------------- helpers

/// Deterministic pseudo-random bytes.
fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Length of `data.bin`: more than one body chunk (64 KiB), so the tests
/// see that replies keep an exact `Content-Length` (never chunked).
const N: usize = 100_000;

struct Site {
    _tmp: tempfile::TempDir,
    data: Vec<u8>,
    server: ServerHandle,
}

/// tmp/secret.txt (outside every mount), tmp/site (mounted at `/`),
/// tmp/models (at `/model/`), tmp/deep (at `/model/deep/`).
fn site() -> Site {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let site = root.join("site");
    let models = root.join("models");
    let deep = root.join("deep");
    for d in [
        &site,
        &models,
        &deep,
        &site.join("sub"),
        &site.join("noindex"),
    ] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    let data = bytes(N, 1);
    let w = |p: &Path, b: &[u8]| std::fs::write(p, b).expect("write");
    w(&root.join("secret.txt"), b"secret");
    w(&root.join("Cargo.toml"), b"[package] secret");
    w(&site.join("data.bin"), &data);
    w(&site.join("empty.bin"), b"");
    w(&site.join("index.html"), b"<h1>root</h1>");
    w(&site.join("sub/index.html"), b"<h1>sub</h1>");
    for name in [
        "app.wasm",
        "app.js",
        "mod.mjs",
        "style.css",
        "x.json",
        "img.png",
        "pic.svg",
        "notes.txt",
        "m.safetensors",
        "m.bank",
    ] {
        w(&site.join(name), name.as_bytes());
    }
    w(&models.join("which.txt"), b"models");
    w(&models.join("only-models.txt"), b"only in models");
    w(&deep.join("which.txt"), b"deep");
    #[cfg(unix)]
    std::os::unix::fs::symlink(root.join("secret.txt"), site.join("link.txt")).expect("symlink");
    let server = ServeConfig::new("127.0.0.1:0".parse().expect("addr"))
        .mount("/", &site)
        .mount("/model/", &models)
        .mount("/model/deep", &deep);
    let server = memlayer_http::Server::start(server).expect("start");
    Site {
        _tmp: tmp,
        data,
        server,
    }
}

struct Reply {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Reply {
    fn h(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

/// One raw HTTP/1.1 request (sent exactly as written, no normalization).
fn raw(addr: SocketAddr, method: &str, target: &str, headers: &[(&str, &str)]) -> Reply {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).expect("send");
    let mut all = Vec::new();
    s.read_to_end(&mut all).expect("read reply");
    let split = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of headers");
    let head = String::from_utf8_lossy(&all[..split]).to_string();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Reply {
        status,
        headers,
        body: all[split + 4..].to_vec(),
    }
}

fn get(addr: SocketAddr, target: &str) -> Reply {
    raw(addr, "GET", target, &[])
}

fn get_range(addr: SocketAddr, target: &str, range: &str) -> Reply {
    raw(addr, "GET", target, &[("Range", range)])
}

// ------------------------------------------------------- server semantics

#[test]
fn server_full_get_and_head() {
    let s = site();
    let a = s.server.local_addr();
    let r = get(a, "/data.bin");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, s.data);
    assert_eq!(r.h("content-length"), Some("100000"));
    assert_eq!(r.h("accept-ranges"), Some("bytes"));
    assert_eq!(r.h("content-type"), Some("application/octet-stream"));
    assert_eq!(r.h("cache-control"), Some("no-cache"));
    // No CORS by default (tests/serve_hostile.rs covers `cors_origins`).
    assert_eq!(r.h("access-control-allow-origin"), None);
    assert_eq!(r.h("access-control-expose-headers"), None);
    assert_eq!(r.h("transfer-encoding"), None);

    let r = raw(a, "HEAD", "/data.bin", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.h("content-length"), Some("100000"));
    assert_eq!(r.h("accept-ranges"), Some("bytes"));
    assert!(r.body.is_empty());

    // The query string is not part of the path.
    assert_eq!(get(a, "/data.bin?v=3").body, s.data);
    assert!(s.server.url().starts_with("http://127.0.0.1:"));
}

#[test]
fn server_ranges() {
    let s = site();
    let a = s.server.local_addr();
    let d = &s.data;
    let check = |range: &str, start: usize, end: usize| {
        let r = get_range(a, "/data.bin", range);
        assert_eq!(r.status, 206, "{range}");
        assert_eq!(
            r.h("content-range"),
            Some(format!("bytes {start}-{end}/100000").as_str()),
            "{range}"
        );
        let len = (end - start + 1).to_string();
        assert_eq!(r.h("content-length"), Some(len.as_str()), "{range}");
        assert_eq!(r.h("accept-ranges"), Some("bytes"));
        assert_eq!(r.body, d[start..=end], "{range}");
    };
    check("bytes=0-0", 0, 0);
    check("bytes=100-4195", 100, 4195);
    check("bytes=99999-99999", 99_999, 99_999);
    check("bytes=90000-", 90_000, 99_999);
    check("bytes=-10", 99_990, 99_999);
    check("bytes=-40000", 60_000, 99_999);
    check("bytes=5000-999999", 5000, 99_999); // end clamped
    check("bytes=-200000", 0, 99_999); // suffix longer than the file

    // HEAD with a range: the headers of the 206, no body.
    let r = raw(a, "HEAD", "/data.bin", &[("Range", "bytes=10-19")]);
    assert_eq!(r.status, 206);
    assert_eq!(r.h("content-range"), Some("bytes 10-19/100000"));
    assert_eq!(r.h("content-length"), Some("10"));
    assert!(r.body.is_empty());

    for bad in [
        "bytes=100000-",
        "bytes=100000-100005",
        "bytes=-0",
        "bytes=5-3",
    ] {
        let r = get_range(a, "/data.bin", bad);
        assert_eq!(r.status, 416, "{bad}");
        assert_eq!(r.h("content-range"), Some("bytes */100000"), "{bad}");
        assert!(r.body.is_empty(), "{bad}");
    }
    let r = get_range(a, "/empty.bin", "bytes=0-0");
    assert_eq!(r.status, 416);
    assert_eq!(r.h("content-range"), Some("bytes */0"));

    // Several ranges close together: merged into one part (tests/multi_range.rs
    // has the multipart replies).
    check("bytes=0-1,5-6", 0, 6);
    // Another unit: ignored, the whole file.
    let r = get_range(a, "/data.bin", "items=0-1");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, *d);
}

#[test]
fn server_missing_dirs_and_methods() {
    let s = site();
    let a = s.server.local_addr();
    assert_eq!(get(a, "/nope.bin").status, 404);
    assert_eq!(get(a, "/sub/nope/deeper").status, 404);
    assert_eq!(get(a, "/model/nope").status, 404);
    let r = get(a, "/");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"<h1>root</h1>"[..]));
    assert_eq!(r.h("content-type"), Some("text/html; charset=utf-8"));
    let r = get(a, "/sub/");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"<h1>sub</h1>"[..]));
    let r = get(a, "/sub");
    assert_eq!(r.status, 301);
    assert_eq!(r.h("location"), Some("/sub/"));
    assert_eq!(get(a, "/noindex/").status, 404);
    let r = raw(a, "POST", "/data.bin", &[("Content-Length", "0")]);
    assert_eq!(r.status, 405);
    let r = raw(a, "OPTIONS", "/data.bin", &[]);
    assert_eq!(r.status, 204);
    assert_eq!(r.h("allow"), Some("GET, HEAD, OPTIONS"));
    // A preflight from an origin not allowed (none is by default) gets no CORS headers.
    assert_eq!(r.h("access-control-allow-headers"), None);
}

#[test]
fn server_rejects_traversal() {
    let s = site();
    let a = s.server.local_addr();
    for target in [
        "/../Cargo.toml",
        "/../secret.txt",
        "/%2e%2e/Cargo.toml",
        "/%2E%2E/secret.txt",
        "/sub/../../secret.txt",
        "/%2e%2e%2fsecret.txt",
        "/sub/..%2f..%2fsecret.txt",
        "/model/../../secret.txt",
        "/..%5csecret.txt",
        "/data.bin%00",
        "//etc/passwd",
        "/etc/passwd",
    ] {
        let r = get(a, target);
        assert!(r.status == 400 || r.status == 404, "{target}: {}", r.status);
        assert!(
            !r.body.windows(6).any(|w| w == b"secret"),
            "{target} leaked"
        );
    }
    // A symlink inside the mount that points outside it.
    #[cfg(unix)]
    assert_eq!(get(a, "/link.txt").status, 404);
    // Percent-encoding of ordinary characters still works.
    assert_eq!(get(a, "/%64ata.bin").body, s.data);
}

#[test]
fn server_content_types() {
    let s = site();
    let a = s.server.local_addr();
    for (name, ct) in [
        ("app.wasm", "application/wasm"),
        ("app.js", "text/javascript; charset=utf-8"),
        ("mod.mjs", "text/javascript; charset=utf-8"),
        ("style.css", "text/css; charset=utf-8"),
        ("x.json", "application/json"),
        ("img.png", "image/png"),
        ("pic.svg", "image/svg+xml"),
        ("notes.txt", "text/plain; charset=utf-8"),
        ("index.html", "text/html; charset=utf-8"),
        ("m.safetensors", "application/octet-stream"),
        ("m.bank", "application/octet-stream"),
    ] {
        let r = get(a, &format!("/{name}"));
        assert_eq!(r.status, 200, "{name}");
        assert_eq!(r.h("content-type"), Some(ct), "{name}");
    }
}

#[test]
fn server_longest_mount_prefix_wins() {
    let s = site();
    let a = s.server.local_addr();
    assert_eq!(get(a, "/model/which.txt").body, b"models");
    assert_eq!(get(a, "/model/deep/which.txt").body, b"deep");
    assert_eq!(get(a, "/model/only-models.txt").body, b"only in models");
    // Segment-wise: /modelx is not under /model/.
    assert_eq!(get(a, "/modelx/which.txt").status, 404);
    // The root mount does not see into other mounts' directories.
    assert_eq!(get(a, "/deep/which.txt").status, 404);
}

#[test]
fn server_shuts_down() {
    let s = site();
    let a = s.server.local_addr();
    assert_eq!(get(a, "/data.bin").status, 200);
    s.server.shutdown();
    // The listener closes once the accept thread sees the flag.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        if TcpStream::connect(a).is_err() {
            break;
        }
        assert!(Instant::now() < deadline, "still accepting after shutdown");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------- HttpSource vs server

#[test]
fn source_reads_match_the_file() {
    let s = site();
    let url = format!("{}/data.bin", s.server.url());
    let src = HttpSource::open(&url).expect("open");
    assert_eq!(src.len().expect("len"), N as u64);
    assert_eq!(src.describe(), url);
    let d = &s.data;
    let mut rng = 12345u64;
    let mut next = |n: u64| {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (rng >> 33) % n
    };
    let mut ranges = vec![
        (0usize, N),
        (N - 1, 1),
        (0, 1),
        (4096, 4096),
        (1000, 70_000),
    ];
    for _ in 0..40 {
        let off = next(N as u64) as usize;
        let len = 1 + next((N - off).min(20_000) as u64) as usize;
        ranges.push((off, len));
    }
    let before = src.stats();
    let mut total = 0u64;
    for &(off, len) in &ranges {
        let mut buf = vec![0u8; len];
        src.read_at(off as u64, &mut buf).expect("read_at");
        assert_eq!(buf, d[off..off + len], "{off}+{len}");
        total += len as u64;
    }
    let after = src.stats();
    assert_eq!(after.requests - before.requests, ranges.len() as u64);
    assert_eq!(after.bytes - before.bytes, total);
    assert_eq!(after.retries, 0);
    // 0-length reads inside the file (including at its end): no request.
    for off in [0, 5000, N as u64] {
        src.read_at(off, &mut []).expect("empty read");
    }
    assert_eq!(src.stats().requests, after.requests);
}

#[test]
fn source_out_of_bounds_without_a_request() {
    let s = site();
    let src = HttpSource::open(format!("{}/data.bin", s.server.url())).expect("open");
    let requests = src.stats().requests;
    for (off, len) in [
        (N as u64, 1usize),
        (N as u64 - 1, 2),
        (2 * N as u64, 0),
        (u64::MAX, 1),
    ] {
        let mut buf = vec![0u8; len];
        match src.read_at(off, &mut buf) {
            Err(SourceError::OutOfBounds {
                offset,
                length,
                size,
            }) => assert_eq!((offset, length, size), (off, len as u64, N as u64)),
            other => panic!("{off}+{len}: {other:?}"),
        }
    }
    assert_eq!(src.stats().requests, requests);
}

#[test]
fn source_concurrent_reads() {
    let s = site();
    let src = Arc::new(HttpSource::open(format!("{}/data.bin", s.server.url())).expect("open"));
    let data = Arc::new(s.data.clone());
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let src = Arc::clone(&src);
            let data = Arc::clone(&data);
            std::thread::spawn(move || {
                for i in 0..50u64 {
                    let off = ((t * 7919 + i * 104_729) % (N as u64 - 1000)) as usize;
                    let len = 1 + ((t + i * 31) % 1000) as usize;
                    let mut buf = vec![0u8; len];
                    src.read_at(off as u64, &mut buf).expect("read_at");
                    assert_eq!(buf, data[off..off + len]);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("reader thread");
    }
    assert_eq!(src.stats().retries, 0);
}

#[test]
fn source_open_errors_name_the_url() {
    let s = site();
    let url = format!("{}/missing.bank", s.server.url());
    match HttpSource::open(&url) {
        Err(SourceError::Open { location, source }) => {
            assert_eq!(location, url);
            assert_eq!(source.kind(), ErrorKind::NotFound);
            let msg = source.to_string();
            assert!(msg.contains("404"), "{msg}");
            assert!(msg.contains("not retried"), "{msg}");
        }
        other => panic!("{other:?}"),
    }
    let err = HttpSource::open("ftp://example.invalid/x.bank").expect_err("ftp");
    assert!(
        err.to_string().contains("ftp://example.invalid/x.bank"),
        "{err}"
    );
    // An empty file opens with length 0.
    let empty = HttpSource::open(format!("{}/empty.bin", s.server.url())).expect("empty");
    assert_eq!(empty.len().expect("len"), 0);
}

// ------------------------------------------------------------- end to end

#[test]
fn bank_over_http_matches_file_and_detects_corruption() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("demo.bank");
    let layout = BankLayout::new(vec![
        SectionSpec::pkm_values(100, 16, 8, Dtype::F16),
        SectionSpec::ffn_blocks(1, 4, 2, 3, 16, Dtype::F32),
    ]);
    let mut w = BankFileWriter::create(&path, &layout).expect("create");
    let pkm: Vec<f32> = (0..100 * 16).map(|i| (i as f32 * 0.37).sin()).collect();
    w.write_rows(&pkm).expect("pkm rows");
    let ffn: Vec<f32> = (0..4 * 2 * 3 * 3 * 16).map(|i| i as f32 * 0.01).collect();
    w.write_rows(&ffn).expect("ffn rows");
    w.finish().expect("finish");

    let server = memlayer_http::Server::start(
        ServeConfig::new("127.0.0.1:0".parse().expect("addr")).mount("/model/", tmp.path()),
    )
    .expect("start");
    let url = format!("{}/model/demo.bank", server.url());
    let over_http = BankReader::open(HttpSource::open(&url).expect("open")).expect("bank");
    let local = BankReader::open(FileSource::open(&path).expect("file")).expect("bank");
    assert_eq!(over_http.page_count(), local.page_count());
    assert!(over_http.page_count() >= 16);
    assert_eq!(over_http.location(), url);
    for p in 0..local.page_count() {
        assert_eq!(
            over_http.read_page(p).expect("http page"),
            local.read_page(p).expect("file page"),
            "page {p}"
        );
    }
    let stats = over_http.source().stats();
    assert!(stats.bytes > 0 && stats.requests > local.page_count());

    // Corrupt one byte of page 5 in the served file.
    let victim = 5;
    let entry = *local.page(victim).expect("entry");
    let mut file = std::fs::read(&path).expect("read");
    file[entry.offset as usize + 3] ^= 0x40;
    std::fs::write(&path, &file).expect("write");
    let err = over_http.read_page(victim).expect_err("corrupt page");
    assert!(
        matches!(err, BankError::ChecksumMismatch { page, .. } if page == victim),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("page 5") && msg.contains(&url), "{msg}");
    // Its neighbours still read.
    over_http.read_page(victim - 1).expect("page 4");
    over_http.read_page(victim + 1).expect("page 6");
}

// --------------------------------------------------------- faulty servers

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    Head,
    Get,
}

enum Action {
    /// Send these bytes, then close the connection.
    Send(Vec<u8>),
    /// Never answer (hold the connection until the client gives up).
    Hang,
}

struct Fake {
    addr: SocketAddr,
    gets: Arc<AtomicUsize>,
    heads: Arc<AtomicUsize>,
}

impl Fake {
    fn url(&self) -> String {
        format!("http://{}/f.bank", self.addr)
    }
}

/// A hand-written HTTP server: `handler(method, range header, n)` decides
/// each reply, `n` counting requests of that method (1-based).
fn fake(handler: impl Fn(Method, Option<&str>, usize) -> Action + Send + Sync + 'static) -> Fake {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let gets = Arc::new(AtomicUsize::new(0));
    let heads = Arc::new(AtomicUsize::new(0));
    let handler = Arc::new(handler);
    let (g, h) = (Arc::clone(&gets), Arc::clone(&heads));
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let (handler, g, h) = (Arc::clone(&handler), Arc::clone(&g), Arc::clone(&h));
            std::thread::spawn(move || {
                let Some(text) = read_request_head(&mut conn) else {
                    return;
                };
                let method = if text.starts_with("HEAD") {
                    Method::Head
                } else {
                    Method::Get
                };
                let range = text.lines().find_map(|l| {
                    let (n, v) = l.split_once(':')?;
                    n.eq_ignore_ascii_case("range")
                        .then(|| v.trim().to_string())
                });
                let n = match method {
                    Method::Head => h.fetch_add(1, SeqCst) + 1,
                    Method::Get => g.fetch_add(1, SeqCst) + 1,
                };
                match handler(method, range.as_deref(), n) {
                    Action::Send(bytes) => {
                        let _ = conn.write_all(&bytes);
                    }
                    Action::Hang => {
                        // Wait until the client hangs up.
                        let mut sink = [0u8; 64];
                        while matches!(conn.read(&mut sink), Ok(n) if n > 0) {}
                    }
                }
            });
        }
    });
    Fake { addr, gets, heads }
}

/// A reply with `Content-Length` and `Connection: close`.
fn reply(status: &str, headers: &[(&str, String)], body: &[u8], content_length: usize) -> Action {
    let mut out =
        format!("HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {content_length}\r\n");
    for (n, v) in headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    Action::Send(out)
}

/// An honest HEAD for a file of `len` bytes.
fn head_ok(len: usize) -> Action {
    reply("200 OK", &[("Accept-Ranges", "bytes".into())], &[], len)
}

/// An honest 206 for `range` over `data`.
fn partial(data: &[u8], range: Option<&str>) -> Action {
    let spec = range
        .and_then(|r| r.strip_prefix("bytes="))
        .expect("range header");
    let (a, b) = spec.split_once('-').expect("a-b");
    let (a, b): (usize, usize) = (a.parse().expect("a"), b.parse().expect("b"));
    let body = &data[a..=b];
    reply(
        "206 Partial Content",
        &[("Content-Range", format!("bytes {a}-{b}/{}", data.len()))],
        body,
        body.len(),
    )
}

fn fast(retries: u32, timeout_ms: u64) -> HttpOptions {
    HttpOptions {
        timeout: Duration::from_millis(timeout_ms),
        retries,
        backoff: Duration::from_millis(10),
        ..HttpOptions::default()
    }
}

fn other_msg(e: SourceError) -> String {
    match e {
        SourceError::Other(msg) => msg,
        e => panic!("expected SourceError::Other, got {e:?}"),
    }
}

#[test]
fn fault_500_gives_up_after_the_retries() {
    let f = fake(|m, _, _| match m {
        Method::Head => head_ok(100),
        Method::Get => reply("500 Internal Server Error", &[], b"oops", 4),
    });
    let src = HttpSource::open_with(f.url(), fast(2, 2000)).expect("open");
    let mut buf = [0u8; 10];
    let msg = other_msg(src.read_at(20, &mut buf).expect_err("500"));
    assert!(msg.contains(&f.url()), "{msg}");
    assert!(msg.contains("bytes=20-29"), "{msg}");
    assert!(msg.contains("HTTP 500"), "{msg}");
    assert!(msg.contains("3 attempts"), "{msg}");
    assert_eq!(f.gets.load(SeqCst), 3);
    assert_eq!(src.stats().retries, 2);

    // Open against a server that fails everything: the GET probe is retried too.
    let f = fake(|_, _, _| reply("503 Service Unavailable", &[], b"", 0));
    let err = HttpSource::open_with(f.url(), fast(1, 2000)).expect_err("503");
    let msg = err.to_string();
    assert!(msg.contains(&f.url()) && msg.contains("HTTP 503"), "{msg}");
    assert!(msg.contains("2 attempts"), "{msg}");
    assert_eq!((f.heads.load(SeqCst), f.gets.load(SeqCst)), (1, 2));
}

#[test]
fn fault_4xx_is_not_retried() {
    let f = fake(|m, _, _| match m {
        Method::Head => head_ok(100),
        Method::Get => reply("403 Forbidden", &[], b"", 0),
    });
    let src = HttpSource::open_with(f.url(), fast(3, 2000)).expect("open");
    let msg = other_msg(src.read_at(0, &mut [0u8; 4]).expect_err("403"));
    assert!(
        msg.contains("HTTP 403") && msg.contains("not retried"),
        "{msg}"
    );
    assert_eq!(f.gets.load(SeqCst), 1);
}

#[test]
fn fault_silent_server_times_out() {
    // Never answers anything: the open fails after the timeout.
    let f = fake(|_, _, _| Action::Hang);
    let t0 = Instant::now();
    let err = HttpSource::open_with(f.url(), fast(0, 300)).expect_err("timeout");
    let took = t0.elapsed();
    let msg = err.to_string();
    assert!(msg.contains(&f.url()) && msg.contains("timed out"), "{msg}");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
    match err {
        SourceError::Open { source, .. } => assert_eq!(source.kind(), ErrorKind::TimedOut),
        e => panic!("{e:?}"),
    }

    // Answers HEAD, then stalls on every GET: each attempt times out.
    let f = fake(|m, _, _| match m {
        Method::Head => head_ok(100),
        Method::Get => Action::Hang,
    });
    let src = HttpSource::open_with(f.url(), fast(1, 300)).expect("open");
    let t0 = Instant::now();
    let msg = other_msg(src.read_at(0, &mut [0u8; 8]).expect_err("timeout"));
    assert!(t0.elapsed() >= Duration::from_millis(600));
    assert!(msg.contains(&f.url()) && msg.contains("bytes=0-7"), "{msg}");
    assert!(
        msg.contains("timed out") && msg.contains("2 attempts"),
        "{msg}"
    );
    assert_eq!(f.gets.load(SeqCst), 2);
}

#[test]
fn fault_server_ignoring_range_is_refused() {
    let data = bytes(100, 7);
    // HEAD without Accept-Ranges, GET answers 200 with the whole body.
    let d = data.clone();
    let f = fake(move |m, _, _| match m {
        Method::Head => reply("200 OK", &[], &[], d.len()),
        Method::Get => reply("200 OK", &[], &d, d.len()),
    });
    let err = HttpSource::open_with(f.url(), fast(3, 2000)).expect_err("no ranges");
    let msg = err.to_string();
    assert!(msg.contains(&f.url()), "{msg}");
    assert!(msg.contains("does not support Range"), "{msg}");
    match err {
        SourceError::Open { source, .. } => assert_eq!(source.kind(), ErrorKind::Unsupported),
        e => panic!("{e:?}"),
    }
    assert_eq!(f.gets.load(SeqCst), 1);

    // HEAD claims Accept-Ranges, but GET still answers 200: the read fails,
    // and the buffer is never handed back as if it held the range.
    let d = data.clone();
    let f = fake(move |m, _, _| match m {
        Method::Head => head_ok(d.len()),
        Method::Get => reply("200 OK", &[], &d, d.len()),
    });
    let src = HttpSource::open_with(f.url(), fast(3, 2000)).expect("open");
    let msg = other_msg(src.read_at(10, &mut [0u8; 5]).expect_err("200"));
    assert!(
        msg.contains("does not support Range") && msg.contains("bytes=10-14"),
        "{msg}"
    );
    assert_eq!(f.gets.load(SeqCst), 1);
}

#[test]
fn fault_5xx_then_ok_succeeds_by_retrying() {
    let data = bytes(1000, 3);
    let d = data.clone();
    let f = fake(move |m, range, n| match (m, n) {
        (Method::Head, _) => head_ok(d.len()),
        (Method::Get, 1) => reply("503 Service Unavailable", &[], b"", 0),
        (Method::Get, 2) => reply("502 Bad Gateway", &[], b"", 0),
        (Method::Get, _) => partial(&d, range),
    });
    let src = HttpSource::open_with(f.url(), fast(3, 2000)).expect("open");
    let mut buf = vec![0u8; 300];
    src.read_at(500, &mut buf).expect("read after retries");
    assert_eq!(buf, data[500..800]);
    assert_eq!(f.gets.load(SeqCst), 3);
    let st = src.stats();
    assert_eq!((st.retries, st.bytes), (2, 300));
}

#[test]
fn fault_wrong_range_or_length_is_an_error() {
    let data = bytes(1000, 5);
    // A 206 for the wrong bytes.
    let d = data.clone();
    let f = fake(move |m, _, _| match m {
        Method::Head => head_ok(d.len()),
        Method::Get => partial(&d, Some("bytes=0-9")),
    });
    let src = HttpSource::open_with(f.url(), fast(3, 2000)).expect("open");
    let msg = other_msg(src.read_at(100, &mut [0u8; 10]).expect_err("wrong range"));
    assert!(msg.contains("instead of 100-109"), "{msg}");
    assert_eq!(f.gets.load(SeqCst), 1);

    // A 206 whose body is cut short (the connection closes early): retried, then fails.
    let d = data.clone();
    let f = fake(move |m, _, _| match m {
        Method::Head => head_ok(d.len()),
        Method::Get => {
            let Action::Send(mut full) = partial(&d, Some("bytes=0-99")) else {
                unreachable!()
            };
            full.truncate(full.len() - 40);
            Action::Send(full)
        }
    });
    let src = HttpSource::open_with(f.url(), fast(1, 2000)).expect("open");
    let msg = other_msg(src.read_at(0, &mut [0u8; 100]).expect_err("short body"));
    assert!(
        msg.contains(&f.url()) && msg.contains("2 attempts"),
        "{msg}"
    );
    assert_eq!(f.gets.load(SeqCst), 2);

    // The file changed length since it was opened.
    let d = data.clone();
    let f = fake(move |m, range, _| match m {
        Method::Head => head_ok(d.len()),
        Method::Get => partial(&d[..500], range),
    });
    let src = HttpSource::open_with(f.url(), fast(0, 2000)).expect("open");
    let msg = other_msg(src.read_at(0, &mut [0u8; 10]).expect_err("changed"));
    assert!(msg.contains("changed"), "{msg}");
}

#[test]
fn probe_falls_back_to_a_range_get() {
    // HEAD not allowed: the length comes from the 206 of `bytes=0-0`.
    let data = bytes(777, 9);
    let d = data.clone();
    let f = fake(move |m, range, _| match m {
        Method::Head => reply("405 Method Not Allowed", &[], &[], 0),
        Method::Get => partial(&d, range),
    });
    let src = HttpSource::open_with(f.url(), fast(0, 2000)).expect("open");
    assert_eq!(src.len().expect("len"), 777);
    let mut buf = [0u8; 7];
    src.read_at(770, &mut buf).expect("read");
    assert_eq!(buf, data[770..]);
    assert_eq!((f.heads.load(SeqCst), f.gets.load(SeqCst)), (1, 2));
}
