//! Paged memory over HTTP Range: a server that answers 500 for one page, or
//! never answers for it, makes the forward fail with an error that names the
//! page, the URL and the cause; every other page still reads, and nothing
//! wrong is ever returned.

mod common;
use common::{cfg, dense_of};

use burn::tensor::Device;
use memlayer_bank::{BankReader, Dtype, PageSource};
use memlayer_core::model::ParamStore;
use memlayer_core::rng::Rng;
use memlayer_http::test_support::read_request_head;
use memlayer_http::{HttpOptions, HttpSource};
use memlayer_model::{MemoryOps, Model};
use memlayer_runtime::paged::{PagedMemory, PagedOptions};
use std::io::Write;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    Status500,
    Silent,
}

/// Serves `bytes` with single-range GETs and HEAD; requests overlapping
/// `bad` get `fault`. Returns the URL.
fn faulty_server(bytes: Arc<Vec<u8>>, bad: std::ops::Range<u64>, fault: Fault) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let (bytes, bad) = (bytes.clone(), bad.clone());
            std::thread::spawn(move || {
                loop {
                    let Some(text) = read_request_head(&mut conn) else {
                        return;
                    };
                    let len = bytes.len() as u64;
                    let range = text.lines().find_map(|l| {
                        let (n, v) = l.split_once(':')?;
                        let v = v.trim().strip_prefix("bytes=")?;
                        let (a, b) = v.split_once('-')?;
                        n.eq_ignore_ascii_case("range")
                            .then(|| (a.parse::<u64>().ok(), b.parse::<u64>().ok()))
                    });
                    let head = text.starts_with("HEAD");
                    let (status, body, extra): (&str, Vec<u8>, String) = match range {
                        Some((Some(a), Some(b))) if b < len && a <= b => {
                            if a < bad.end && bad.start <= b {
                                match fault {
                                    Fault::Status500 => (
                                        "500 Internal Server Error",
                                        b"oops".to_vec(),
                                        String::new(),
                                    ),
                                    Fault::Silent => {
                                        std::thread::sleep(Duration::from_secs(30));
                                        return;
                                    }
                                }
                            } else {
                                (
                                    "206 Partial Content",
                                    bytes[a as usize..=b as usize].to_vec(),
                                    format!("Content-Range: bytes {a}-{b}/{len}\r\n"),
                                )
                            }
                        }
                        _ => ("200 OK", bytes.to_vec(), String::new()),
                    };
                    let mut reply = format!(
                        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\n{extra}\r\n",
                        body.len()
                    )
                    .into_bytes();
                    if !head {
                        reply.extend_from_slice(&body);
                    }
                    if conn.write_all(&reply).is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("http://{addr}/memory.bank")
}

#[test]
fn http_500_and_timeouts_name_the_page_and_the_url() {
    let cfg = cfg(false);
    let store = ParamStore::init(&cfg, 3).unwrap();
    let dense = dense_of(&cfg, &store);
    let dir = std::env::temp_dir().join(format!("memlayer-paged-http-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("memory.bank");
    memlayer_model_dir::dir::write_bank_with(&cfg, &store, &path, Dtype::F32, 4).unwrap();
    let bytes = Arc::new(std::fs::read(&path).unwrap());
    let file = memlayer_bank::FileSource::open(&path).unwrap();
    let reader = BankReader::open(file).unwrap();
    let device = Device::flex();
    let resident = Model::new(&cfg, &store, &device, MemoryOps::Portable, false).unwrap();
    let bad_page = reader.sections()[0].first_page + 3;
    let e = *reader.page(bad_page).unwrap();
    let first = reader.sections()[0].first_page;
    for fault in [Fault::Status500, Fault::Silent] {
        let url = faulty_server(bytes.clone(), e.offset..e.offset + e.length, fault);
        let opts = HttpOptions {
            timeout: Duration::from_millis(300),
            retries: 1,
            backoff: Duration::from_millis(10),
            ..HttpOptions::default()
        };
        let src = HttpSource::open_with(url.clone(), opts).unwrap();
        let bank = BankReader::open(Box::new(src) as Box<dyn PageSource>).unwrap();
        let mem = Arc::new(
            PagedMemory::new(
                bank,
                PagedOptions::host(memlayer_runtime::Budget::bytes(64 * 4 * 16 * 4)),
            )
            .unwrap(),
        );
        let m = Model::with_memory(&cfg, &dense, &device, MemoryOps::Portable, mem).unwrap();
        let (mut failed, mut ok) = (0, 0);
        for seed in 0..12 {
            let mut rng = Rng::new(seed);
            let toks: Vec<u32> = (0..8).map(|_| rng.below(31) as u32).collect();
            let want = resident
                .forward(resident.tokens(&toks, 1).unwrap(), None, None)
                .unwrap();
            let reads_bad = want
                .reads
                .value_rows
                .concat()
                .iter()
                .any(|&r| u64::from(r / 4) + first == bad_page);
            match m.forward(m.tokens(&toks, 1).unwrap(), None, None) {
                Ok(f) => {
                    assert!(!reads_bad, "page {bad_page} was read without an error");
                    let got: Vec<f32> = f.logits.into_data().iter::<f32>().collect();
                    let want: Vec<f32> = want.logits.into_data().iter::<f32>().collect();
                    assert_eq!(got, want);
                    ok += 1;
                }
                Err(err) => {
                    let msg = err.to_string();
                    assert!(reads_bad, "{msg}");
                    // a failed request names its page; a timed-out request
                    // that carried the bad page with its neighbours (pages
                    // that touch are one range) names its
                    // first page and the byte range, which covers the bad one
                    let names_bad = msg.contains(&format!("page {bad_page}"));
                    let covers_bad = msg
                        .split("bytes=")
                        .nth(1)
                        .and_then(|r| r.split(':').next())
                        .and_then(|r| r.split_once('-'))
                        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)))
                        .is_some_and(|(a, b)| a <= e.offset && e.offset + e.length - 1 <= b);
                    assert!(names_bad || (fault == Fault::Silent && covers_bad), "{msg}");
                    assert!(msg.contains(&url), "{msg}");
                    let cause = match fault {
                        Fault::Status500 => "HTTP 500",
                        Fault::Silent => "timed out",
                    };
                    assert!(msg.contains(cause), "{msg}");
                    failed += 1;
                }
            }
        }
        assert!(failed > 0 && ok > 0, "failed {failed}, ok {ok}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Prefetching the next context's blocks over HTTP: every level's block in
/// one multi-range request (one round trip), each checksum-verified, then
/// served to the forward as hits.
#[test]
fn a_prefetch_fetches_every_levels_block_in_one_request() {
    let cfg = cfg(true);
    let store = ParamStore::init(&cfg, 3).unwrap();
    let dir = std::env::temp_dir().join(format!("memlayer-prefetch-http-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("memory.bank");
    memlayer_model_dir::dir::write_bank_with(&cfg, &store, &path, Dtype::F32, 4).unwrap();
    let server = memlayer_http::Server::start(
        memlayer_http::ServeConfig::new("127.0.0.1:0".parse().unwrap()).mount("/", &dir),
    )
    .unwrap();
    let src = Arc::new(HttpSource::open(format!("{}/memory.bank", server.url())).unwrap());
    let bank = BankReader::open(Box::new(src.clone()) as Box<dyn PageSource>).unwrap();
    let levels = cfg.hier.as_ref().unwrap().levels;
    assert!(levels >= 2, "the fixture has {levels} levels");
    let opts = PagedOptions {
        prefetch: true,
        ..PagedOptions::host(memlayer_runtime::Budget::bytes(u64::MAX))
    };
    let mem = PagedMemory::new(bank, opts).unwrap();
    let rows: Vec<usize> = (0..levels).map(|l| l % 2).collect();
    let before = src.stats().requests;
    mem.prefetch_blocks(&rows).unwrap();
    mem.wait_prefetch();
    assert_eq!(
        src.stats().requests - before,
        1,
        "{levels} levels in one request"
    );
    assert_eq!(mem.stats().pages_streamed, levels as u64);
    // the forward's block reads are now hits: nothing more is fetched
    let device = Device::flex();
    for (l, &row) in rows.iter().enumerate() {
        memlayer_model::MemorySource::blocks(&mem, l + 1, &[row], &device).unwrap();
    }
    assert_eq!(src.stats().requests - before, 1);
    assert_eq!(mem.stats().block_hits, levels as u64);
    let _ = std::fs::remove_dir_all(&dir);
}
