//! `memlayer serve`'s server against slow and hostile clients, on 127.0.0.1:
//! stalled readers, an endless header, hundreds of idle connections, the
//! connection cap, dotfiles, CORS, and a fresh server read by 8 threads.
//!
//! Every test holds [`serial`]: thread and connection counts are per
//! process, so the tests must not overlap. Every wait has a deadline and
//! every socket a read/write timeout, so no test can hang.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use memlayer_bank::PageSource;
use memlayer_http::test_support::exchange;
use memlayer_http::{HttpOptions, HttpSource, ServeConfig, Server, ServerHandle};

// ---------------------------------------------------------------- helpers

/// Serializes the tests of this file (see the module docs).
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Size of `big.bin`: far more than the socket buffers of both ends hold.
const BIG: u64 = 64 << 20;
/// Where `big.bin` holds [`pattern`] (the rest is zeros: a sparse file).
const MARK: u64 = 40 << 20;

/// Deterministic non-zero bytes.
fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

struct Site {
    tmp: tempfile::TempDir,
    server: ServerHandle,
}

impl Site {
    fn addr(&self) -> SocketAddr {
        self.server.local_addr()
    }
}

/// tmp/model (at `/model/`): big.bin (sparse, 64 MiB), data.bin, dotfiles,
/// a symlink to a dotfile; tmp/web (at `/`): index.html, .env.
fn site(configure: impl FnOnce(&mut ServeConfig)) -> Site {
    let tmp = tempfile::tempdir().expect("tempdir");
    let model = tmp.path().join("model");
    let web = tmp.path().join("web");
    for d in [&model, &web, &model.join("sub/.git")] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    let big = std::fs::File::create(model.join("big.bin")).expect("big.bin");
    big.set_len(BIG).expect("sparse big.bin");
    {
        use std::os::unix::fs::FileExt;
        big.write_all_at(&pattern(4096, 7), MARK)
            .expect("mark big.bin");
    }
    let w = |p: &Path, b: &[u8]| std::fs::write(p, b).expect("write");
    w(&model.join("data.bin"), &pattern(10_000, 3));
    w(&model.join("config.json"), b"{}");
    w(&model.join(".secret"), b"secret");
    w(&model.join("sub/.git/config"), b"secret");
    w(&model.join("sub/ok.txt"), b"ok");
    w(&web.join("index.html"), b"<h1>chat</h1>");
    w(&web.join(".env"), b"secret");
    std::os::unix::fs::symlink(model.join(".secret"), model.join("alias.txt")).expect("symlink");
    let mut config = ServeConfig::new("127.0.0.1:0".parse().expect("addr"))
        .mount("/model/", &model)
        .mount("/", &web);
    configure(&mut config);
    let server = Server::start(config).expect("start the server");
    Site { tmp, server }
}

struct Reply {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Reply {
    /// The value of header `name` (case-insensitive), if present.
    fn h(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.set_write_timeout(Some(Duration::from_secs(5))).ok();
    s
}

/// One request with `Connection: close`; the reply read to its end. Errors
/// (refused, reset, timed out) are returned, not panicked on.
fn try_request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<Reply> {
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let (head, body) = exchange(addr, Duration::from_secs(5), &req)?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::new(ErrorKind::InvalidData, "no status"))?;
    Ok(Reply { status, head, body })
}

fn request(addr: SocketAddr, target: &str, headers: &[(&str, &str)]) -> Reply {
    try_request(addr, "GET", target, headers)
        .unwrap_or_else(|e| panic!("GET {target} from {addr}: {e}"))
}

/// Threads of this process (the server runs in it).
fn threads_now() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .count()
}

/// Polls `cond` every 20 ms until it holds or `limit` passes.
fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads until EOF (or a reset) or the deadline; `Some(bytes read)` if the
/// server closed the connection in time, `None` if it is still open.
fn drain_until_closed(s: &mut TcpStream, deadline: Instant) -> Option<u64> {
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        s.set_read_timeout(Some(left.max(Duration::from_millis(10))))
            .ok();
        match s.read(&mut buf) {
            Ok(0) => return Some(total),
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return None;
            }
            // Reset or aborted: the server closed it with data unread.
            Err(_) => return Some(total),
        }
    }
}

// ------------------------------------------------------------------ tests

/// Clients that ask for a 64 MiB file and never read fill the socket
/// buffers; the server must still answer others at once, and close the
/// stalled connections after the write timeout.
#[test]
fn stalled_readers_neither_block_others_nor_stay_open() {
    let _serial = serial();
    let s = site(|c| {
        c.threads = 2;
        c.write_timeout = Duration::from_secs(2);
    });
    let a = s.addr();
    let mut stalled: Vec<TcpStream> = (0..12)
        .map(|_| {
            let mut c = connect(a);
            c.write_all(b"GET /model/big.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                .expect("send");
            c
        })
        .collect();
    // Let the server fill the buffers of all twelve.
    std::thread::sleep(Duration::from_millis(500));

    let t0 = Instant::now();
    let range = format!("bytes={MARK}-{}", MARK + 4095);
    let r = request(a, "/model/big.bin", &[("Range", &range)]);
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert_eq!(r.status, 206);
    assert_eq!(
        r.h("content-range"),
        Some(format!("bytes {MARK}-{}/{BIG}", MARK + 4095).as_str())
    );
    assert_eq!(r.body, pattern(4096, 7));
    // The page source too, while they stall.
    let src = HttpSource::open_with(
        format!("{}/model/data.bin", s.server.url()),
        HttpOptions {
            timeout: Duration::from_secs(5),
            retries: 0,
            backoff: Duration::from_millis(10),
            ..HttpOptions::default()
        },
    )
    .expect("open while readers stall");
    let mut buf = [0u8; 100];
    src.read_at(9_900, &mut buf)
        .expect("read while readers stall");
    assert_eq!(buf[..], pattern(10_000, 3)[9_900..]);

    drop(src);

    // After the write timeout the server hangs up on every stalled reader
    // (and the page source's pooled connection closed with it)...
    assert!(
        wait_until(Duration::from_secs(15), || s.server.open_connections() == 0),
        "{} connections still open",
        s.server.open_connections()
    );
    // ...so each ends (EOF or reset) far short of the 64 MiB it asked for.
    let deadline = Instant::now() + Duration::from_secs(20);
    for (i, c) in stalled.iter_mut().enumerate() {
        let got = drain_until_closed(c, deadline)
            .unwrap_or_else(|| panic!("stalled reader {i} still open after the write timeout"));
        assert!(
            got < BIG / 2,
            "stalled reader {i} got {got} of {BIG} bytes after it was cut off"
        );
    }
}

/// A header line that never ends: the server answers 431 or hangs up
/// after at most 1 MiB, and serves the next client normally.
#[test]
fn endless_header_is_cut_off() {
    let _serial = serial();
    let s = site(|_| {});
    let a = s.addr();
    let mut c = connect(a);
    let mut reader = c.try_clone().expect("clone");
    let answered = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&answered);
    // Records the first sign of the server: a reply, EOF or a reset.
    let watcher = std::thread::spawn(move || {
        let mut first = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            reader
                .set_read_timeout(Some(Duration::from_millis(200)))
                .ok();
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    first.extend_from_slice(&buf[..n]);
                    break;
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => break,
            }
        }
        flag.store(true, SeqCst);
        first
    });
    c.write_all(b"GET /model/data.bin HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
        .expect("request line");
    let chunk = [b'a'; 1024];
    let mut sent = 0usize;
    let mut writes = 0u32;
    let cut_off = loop {
        if answered.load(SeqCst) {
            break true;
        }
        if sent >= 4 << 20 {
            break false;
        }
        match c.write(&chunk) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            // Our write timed out: the server stopped reading but neither
            // answered nor closed.
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                break false;
            }
            // Broken pipe or reset: the server closed the connection.
            Err(_) => break true,
        }
        // Paced, so that "how much got through" measures the server.
        writes += 1;
        if writes.is_multiple_of(16) {
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    let first = watcher.join().expect("watcher");
    assert!(
        cut_off,
        "the server took {sent} header bytes without stopping us"
    );
    assert!(sent <= 1 << 20, "the server took {sent} header bytes first");
    if !first.is_empty() {
        let text = String::from_utf8_lossy(&first);
        assert!(text.starts_with("HTTP/1.1 431"), "{text}");
    }
    let r = request(a, "/model/data.bin", &[]);
    assert_eq!((r.status, r.body.len()), (200, 10_000));
}

/// 300 idle connections: no thread per connection, normal service meanwhile,
/// and every one closed by the server after the idle timeout.
#[test]
fn idle_connections_cost_no_threads_and_time_out() {
    let _serial = serial();
    let s = site(|c| {
        c.idle_timeout = Duration::from_secs(2);
        c.max_connections = 400;
    });
    let a = s.addr();
    assert_eq!(request(a, "/model/data.bin", &[]).status, 200);
    let before = threads_now();
    let t0 = Instant::now();
    let mut idle: Vec<TcpStream> = (0..300).map(|_| connect(a)).collect();
    assert!(
        wait_until(Duration::from_secs(5), || s.server.open_connections()
            >= 300),
        "the server holds {} of 300 connections",
        s.server.open_connections()
    );
    let during = threads_now();
    assert!(
        during <= before + 4,
        "threads: {before} before, {during} with 300 idle connections"
    );
    // Served meanwhile (before the idle timeout has passed).
    let r = request(a, "/model/data.bin", &[("Range", "bytes=0-9")]);
    assert_eq!((r.status, r.body.len()), (206, 10));
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());

    let deadline = t0 + Duration::from_secs(10);
    for (i, c) in idle.iter_mut().enumerate() {
        let got = drain_until_closed(c, deadline)
            .unwrap_or_else(|| panic!("idle connection {i} still open after the idle timeout"));
        assert_eq!(got, 0, "idle connection {i} got bytes");
    }
    // Not before the timeout: each was idle for at least 2 s.
    assert!(t0.elapsed() >= Duration::from_secs(2), "{:?}", t0.elapsed());
    assert!(wait_until(Duration::from_secs(5), || s
        .server
        .open_connections()
        == 0));
    assert!(threads_now() <= before + 4);
}

/// Over `max_connections`, a new connection is turned away at once (503 or
/// closed); service resumes when the held ones go.
#[test]
fn connections_over_the_cap_are_turned_away() {
    let _serial = serial();
    let s = site(|c| c.max_connections = 4);
    let a = s.addr();
    assert_eq!(s.server.max_connections(), 4);
    let held: Vec<TcpStream> = (0..4).map(|_| connect(a)).collect();
    assert!(wait_until(Duration::from_secs(5), || s
        .server
        .open_connections()
        == 4));
    for i in 0..3 {
        let t0 = Instant::now();
        let mut extra = connect(a);
        let _ = extra.write_all(b"GET /model/data.bin HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut got = Vec::new();
        let end = loop {
            let mut buf = [0u8; 1024];
            match extra.read(&mut buf) {
                Ok(0) => break "eof",
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    panic!("extra connection {i} neither answered nor closed in 5 s")
                }
                Err(_) => break "reset",
            }
        };
        assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
        let text = String::from_utf8_lossy(&got);
        assert!(
            got.is_empty() || text.starts_with("HTTP/1.1 503"),
            "{end}: {text}"
        );
    }
    assert_eq!(s.server.open_connections(), 4);
    for c in &held {
        let _ = c.shutdown(Shutdown::Both);
    }
    drop(held);
    assert!(
        wait_until(Duration::from_secs(5), || s.server.open_connections() == 0),
        "{} connections still open",
        s.server.open_connections()
    );
    let r = request(a, "/model/data.bin", &[]);
    assert_eq!((r.status, r.body.len()), (200, 10_000));
}

/// Any path segment starting with `.` is 404, however it is reached.
#[test]
fn dotfiles_are_not_served() {
    let _serial = serial();
    let s = site(|_| {});
    let a = s.addr();
    for target in [
        "/model/.secret",
        "/model/%2esecret",
        "/model/sub/.git/config",
        "/model/sub/%2Egit/config",
        "/model/sub/.git/",
        "/model/sub/.git",
        "/model/alias.txt",
        "/.env",
    ] {
        let r = request(a, target, &[]);
        assert_eq!(r.status, 404, "{target}");
        assert!(!r.body.windows(6).any(|w| w == b"secret"), "{target}");
        let r = try_request(a, "HEAD", target, &[]).expect("HEAD");
        assert_eq!(r.status, 404, "HEAD {target}");
    }
    assert_eq!(request(a, "/model/sub/ok.txt", &[]).body, b"ok");
    assert_eq!(request(a, "/model/./config.json", &[]).body, b"{}");
    assert_eq!(request(a, "/", &[]).body, b"<h1>chat</h1>");
    // The files exist: it is the server that refuses them.
    assert!(s.tmp.path().join("model/.secret").is_file());
}

/// No `Access-Control-Allow-Origin` by default; with an allow list, exactly
/// the listed origins are echoed (with `Vary: Origin`).
#[test]
fn cors_only_for_listed_origins() {
    let _serial = serial();
    let s = site(|_| {});
    let a = s.addr();
    let evil = [("Origin", "http://evil.example")];
    let r = request(a, "/model/data.bin", &evil);
    assert_eq!(r.status, 200);
    assert_eq!(r.h("access-control-allow-origin"), None, "{}", r.head);
    assert_eq!(r.h("access-control-expose-headers"), None, "{}", r.head);
    let r = try_request(a, "OPTIONS", "/model/data.bin", &evil).expect("OPTIONS");
    assert_eq!(r.status, 204);
    assert_eq!(r.h("access-control-allow-origin"), None, "{}", r.head);
    assert_eq!(r.h("access-control-allow-headers"), None, "{}", r.head);
    drop(s);

    let app = "http://localhost:3000";
    let s = site(|c| c.cors_origins = vec![app.to_string(), "https://b.example".into()]);
    let a = s.addr();
    let r = request(
        a,
        "/model/data.bin",
        &[("Origin", app), ("Range", "bytes=0-9")],
    );
    assert_eq!(r.status, 206);
    assert_eq!(r.h("access-control-allow-origin"), Some(app));
    assert!(
        r.h("vary").is_some_and(|v| v.contains("Origin")),
        "{}",
        r.head
    );
    let expose = r.h("access-control-expose-headers").expect("expose");
    for h in ["Content-Range", "Content-Length", "Accept-Ranges"] {
        assert!(expose.contains(h), "{expose}");
    }
    // The preflight of a Range read from that origin.
    let r = try_request(
        a,
        "OPTIONS",
        "/model/data.bin",
        &[
            ("Origin", app),
            ("Access-Control-Request-Method", "GET"),
            ("Access-Control-Request-Headers", "range"),
        ],
    )
    .expect("preflight");
    assert_eq!(r.status, 204);
    assert_eq!(r.h("access-control-allow-origin"), Some(app));
    assert!(
        r.h("access-control-allow-headers")
            .is_some_and(|h| h.contains("Range")),
        "{}",
        r.head
    );
    // Another origin (or a prefix of a listed one) gets nothing.
    for other in ["http://evil.example", "http://localhost:3000.evil", "null"] {
        let r = request(a, "/model/data.bin", &[("Origin", other)]);
        assert_eq!(r.status, 200);
        assert_eq!(r.h("access-control-allow-origin"), None, "{other}");
        assert!(r.h("vary").is_some_and(|v| v.contains("Origin")), "{other}");
    }
}

/// A fresh server read by 8 threads at once, as `memlayer generate
/// --source URL` does with its fetch pool: no request may time out and be
/// retried.
#[test]
fn fresh_server_read_in_parallel_needs_no_retries() {
    let _serial = serial();
    let data = pattern(10_000, 3);
    for round in 0..3 {
        let s = site(|_| {});
        let src = Arc::new(
            HttpSource::open_with(
                format!("{}/model/data.bin", s.server.url()),
                HttpOptions {
                    timeout: Duration::from_secs(3),
                    retries: 3,
                    backoff: Duration::from_millis(10),
                    ..HttpOptions::default()
                },
            )
            .expect("open"),
        );
        let readers: Vec<_> = (0..8u64)
            .map(|t| {
                let src = Arc::clone(&src);
                std::thread::spawn(move || {
                    let mut got = Vec::new();
                    for i in 0..16u64 {
                        let off = (t * 1237 + i * 331) % 9_000;
                        let mut buf = vec![0u8; 1000];
                        src.read_at(off, &mut buf).expect("read_at");
                        got.push((off, buf));
                    }
                    got
                })
            })
            .collect();
        for r in readers {
            for (off, buf) in r.join().expect("reader") {
                assert_eq!(buf[..], data[off as usize..off as usize + 1000]);
            }
        }
        let st = src.stats();
        assert_eq!(st.retries, 0, "round {round}: {st:?}");
        assert_eq!(st.requests, 1 + 8 * 16, "round {round}: {st:?}");
    }
}
