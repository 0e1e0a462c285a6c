//! `memlayer serve` under a low open-files limit (`ulimit -n 64`): idle
//! connections beyond what the limit allows, and descriptors running out
//! under `accept`, neither kill the port nor the process, and service
//! resumes. Linux only (/proc); every wait has a deadline.
#![cfg(target_os = "linux")]

mod common;

use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Served, serve_with};
use memlayer_http::test_support::exchange;

/// A model directory as far as `serve` cares: config.json and a bank file.
fn model_dir() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(tmp.path().join("config.json"), b"{}").expect("config.json");
    let bank: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(tmp.path().join("memory.bank"), bank).expect("memory.bank");
    tmp
}

/// `memlayer serve DIR --port 0 ...` run by bash after `ulimit -n 64`,
/// with `hog` more descriptors (/dev/null) left open for it to inherit.
fn serve_limited(dir: &Path, hog: u32, stderr: Stdio, extra: &[&str]) -> Served {
    let script = format!(
        "ulimit -n 64 || exit 1; for i in $(seq 10 $((9 + {hog}))); do eval \"exec $i</dev/null\"; done; exec \"$0\" \"$@\""
    );
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_memlayer"))
        .args(["serve", dir.to_str().expect("utf-8 path"), "--port", "0"])
        .args(["--web", "/nonexistent"])
        .args(extra)
        .stderr(stderr);
    serve_with(cmd)
}

fn addr_of(served: &Served) -> SocketAddr {
    served
        .1
        .trim_start_matches("http://")
        .parse()
        .unwrap_or_else(|e| panic!("address in {}: {e}", served.1))
}

/// A field of /proc/PID/status or /proc/PID/limits, as the first number after `key`.
fn proc_number(pid: u32, file: &str, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/{file}: {e}"));
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/{file}"))
}

fn assert_alive(served: &mut Served) {
    if let Some(status) = served.0.try_wait().expect("try_wait") {
        panic!("memlayer serve exited: {status}");
    }
}

/// One `GET` with `Connection: close`: status line and body, or an error.
fn get(addr: SocketAddr, target: &str, range: Option<&str>) -> std::io::Result<(String, Vec<u8>)> {
    let range = range.map(|r| format!("Range: {r}\r\n")).unwrap_or_default();
    let request =
        format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{range}Connection: close\r\n\r\n");
    let (head, body) = exchange(addr, Duration::from_secs(3), &request)?;
    let status = head.lines().next().unwrap_or("").to_string();
    Ok((status, body))
}

/// Retries `get` until it answers or the deadline passes.
fn get_by(
    deadline: Instant,
    addr: SocketAddr,
    target: &str,
    range: Option<&str>,
) -> (String, Vec<u8>) {
    loop {
        match get(addr, target, range) {
            Ok(reply) if !reply.0.contains(" 503 ") => return reply,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "GET {target} still failing: {other:?}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Whether the server has closed `s` (EOF, reset, or a 503 then EOF),
/// waiting at most `wait` for it.
fn closed_by_server(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).ok();
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {} // the 503 reply; its EOF follows
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
}

/// 100 idle connections at `ulimit -n 64`: the server holds what the limit
/// allows ((64 - 32) / 2 = 16), turns the rest away at once, keeps a
/// bounded thread count, closes the held ones after the idle timeout, and
/// then serves normally.
#[test]
fn serve_at_ulimit_64_survives_100_idle_connections() {
    let dir = model_dir();
    let mut served = serve_limited(
        dir.path(),
        0,
        Stdio::inherit(),
        &["--idle-timeout-secs", "4", "--max-connections", "1000"],
    );
    let pid = served.0.id();
    let addr = addr_of(&served);
    assert_eq!(proc_number(pid, "limits", "Max open files"), 64);

    let t0 = Instant::now();
    let mut conns: Vec<TcpStream> = (0..100)
        .map(|i| {
            TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("connection {i}: {e}"))
        })
        .collect();
    // Let the server take them all in.
    std::thread::sleep(Duration::from_millis(500));
    assert_alive(&mut served);
    let threads = proc_number(pid, "status", "Threads:");
    assert!(threads <= 16, "{threads} threads with 100 connections");
    let mut held = Vec::new();
    for (i, c) in conns.iter_mut().enumerate() {
        if !closed_by_server(c, Duration::from_millis(20)) {
            held.push(i);
        }
    }
    assert!(
        !held.is_empty() && held.len() <= 16,
        "the server holds {} connections at ulimit -n 64",
        held.len()
    );
    // All told before the idle timeout could have closed any.
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "too slow to tell: {:?}",
        t0.elapsed()
    );

    // After the idle timeout the server closes the held ones...
    for &i in &held {
        let left = (t0 + Duration::from_secs(10)).saturating_duration_since(Instant::now());
        assert!(
            closed_by_server(&mut conns[i], left.max(Duration::from_millis(10))),
            "held connection {i} still open 10 s after it was opened (idle timeout 4 s)"
        );
    }
    assert!(t0.elapsed() >= Duration::from_secs(4), "{:?}", t0.elapsed());
    // ...and serves normally, while the 100 are still open on our side.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (status, body) = get_by(
        deadline,
        addr,
        "/model/memory.bank",
        Some("bytes=1000-1009"),
    );
    assert!(status.contains(" 206 "), "{status}");
    let want: Vec<u8> = (1000..1010u32).map(|i| (i * 7 % 251) as u8).collect();
    assert_eq!(body, want);
    let (status, body) = get_by(deadline, addr, "/model/config.json", None);
    assert!(status.contains(" 200 "), "{status}");
    assert_eq!(body, b"{}");
    assert_alive(&mut served);
    let threads = proc_number(pid, "status", "Threads:");
    assert!(threads <= 16, "{threads} threads");
}

/// With 48 of its 64 descriptors taken by inherited files, `accept` fails
/// with EMFILE before the connection cap is reached: the server logs it
/// once per burst, keeps the port, and serves again once clients go.
#[test]
fn serve_recovers_when_accept_runs_out_of_descriptors() {
    let dir = model_dir();
    let log_path = dir.path().join("serve.stderr");
    let log = std::fs::File::create(&log_path).expect("stderr file");
    let mut served = serve_limited(
        dir.path(),
        48,
        Stdio::from(log),
        &["--idle-timeout-secs", "30"],
    );
    let pid = served.0.id();
    let addr = addr_of(&served);
    assert_eq!(proc_number(pid, "limits", "Max open files"), 64);

    let conns: Vec<TcpStream> = (0..30)
        .map(|i| {
            TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("connection {i}: {e}"))
        })
        .collect();
    // Out of descriptors for well over a second: many failed accepts.
    std::thread::sleep(Duration::from_millis(1500));
    assert_alive(&mut served);
    let threads = proc_number(pid, "status", "Threads:");
    assert!(threads <= 16, "{threads} threads with 30 connections");
    // The clients go; the backlog drains and the server answers again.
    drop(conns);
    let deadline = Instant::now() + Duration::from_secs(15);
    let (status, body) = get_by(deadline, addr, "/model/config.json", None);
    assert!(status.contains(" 200 "), "{status}");
    assert_eq!(body, b"{}");
    assert_alive(&mut served);
    drop(served);

    let log = std::fs::read_to_string(&log_path).expect("read stderr");
    let emfile = log
        .lines()
        .filter(|l| l.contains("Too many open files"))
        .count();
    assert!(emfile >= 1, "no EMFILE reported:\n{log}");
    // Once per burst, not once per 100 ms retry: the 1.5 s burst above
    // failed many times and was reported by one line (and its end by another).
    let longest = log
        .lines()
        .filter_map(|l| l.split(" again after ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    assert!(longest >= 5, "longest burst {longest}:\n{log}");
    assert!(emfile <= 10, "{emfile} EMFILE lines:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
}
