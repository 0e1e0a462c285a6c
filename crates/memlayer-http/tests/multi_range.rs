//! Batched range reads on 127.0.0.1: the server's `multipart/byteranges`
//! replies (RFC 9110 §14.6), `HttpSource::read_ranges` sending a batch as
//! one multi-range request (or falling back to one request per range on a
//! server without multi-range support), hand-written servers whose
//! multipart replies are reordered, merged or malformed, and a bank's
//! pages read in one batch with every checksum verified.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use memlayer_bank::multipart::{boundary, parse_byteranges, write_byteranges};
use memlayer_bank::{BankFileWriter, BankLayout, BankReader, Dtype, PageSource, SectionSpec};
use memlayer_http::test_support::read_request_head;
use memlayer_http::{HttpOptions, HttpSource, ServeConfig, ServerHandle};

const N: usize = 200_000;

fn data() -> Vec<u8> {
    (0..N)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// `data.bin` served from a temp dir, multi-range on or off.
fn serve(multi_range: bool) -> (tempfile::TempDir, ServerHandle) {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(tmp.path().join("data.bin"), data()).expect("write");
    let mut config = ServeConfig::new("127.0.0.1:0".parse().expect("addr")).mount("/", tmp.path());
    config.multi_range = multi_range;
    let server = memlayer_http::Server::start(config).expect("start");
    (tmp, server)
}

/// One raw GET with a Range header: (status, headers, body).
fn get(addr: SocketAddr, range: &str) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let (head, body) = memlayer_http::test_support::exchange(
        addr,
        Duration::from_secs(5),
        &format!(
            "GET /data.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\nRange: {range}\r\n\r\n"
        ),
    )
    .expect("exchange");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body)
}

fn h<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn the_server_answers_several_ranges_with_one_multipart_reply() {
    let (_tmp, server) = serve(true);
    let d = data();
    let (status, headers, body) = get(server.local_addr(), "bytes=150000-150009,10-19,-5");
    assert_eq!(status, 206);
    let b = boundary(h(&headers, "content-type").expect("content-type")).expect("multipart");
    assert_eq!(
        h(&headers, "content-length"),
        Some(body.len().to_string().as_str())
    );
    let parts = parse_byteranges(&body, &b).expect("parse");
    // sorted by offset, each with the file's length
    let got: Vec<(u64, u64)> = parts.iter().map(|p| (p.first, p.last)).collect();
    assert_eq!(
        got,
        vec![(10, 19), (150_000, 150_009), (N as u64 - 5, N as u64 - 1)]
    );
    for p in &parts {
        assert_eq!(p.complete, Some(N as u64));
        assert_eq!(p.bytes, d[p.first as usize..=p.last as usize]);
    }
    // too many ranges: refused
    let many: Vec<String> = (0..300)
        .map(|i| format!("{}-{}", i * 500, i * 500))
        .collect();
    let (status, _, _) = get(server.local_addr(), &format!("bytes={}", many.join(",")));
    assert_eq!(status, 416);
    // multi-range off: the whole file, as servers without support answer
    let (_tmp2, plain) = serve(false);
    let (status, _, body) = get(plain.local_addr(), "bytes=10-19,150000-150009");
    assert_eq!((status, body.len()), (200, N));
}

/// Ranges scattered over the file (pages of a token's misses).
fn scattered() -> Vec<(u64, u64)> {
    let mut r: Vec<(u64, u64)> = (0..40u64)
        .map(|i| ((i * 7919 * 13) % 190_000, 512))
        .collect();
    r.push((5, 0)); // empty
    r.push((100, 100)); // adjacent pair: one span
    r.push((200, 50));
    r
}

fn check(src: &HttpSource, ranges: &[(u64, u64)]) {
    let d = data();
    for (r, &(off, len)) in src.read_ranges(ranges).into_iter().zip(ranges) {
        let bytes = r.unwrap_or_else(|e| panic!("{off}+{len}: {e}"));
        assert_eq!(bytes, d[off as usize..(off + len) as usize], "{off}+{len}");
    }
}

#[test]
fn a_batch_goes_out_as_one_request_or_falls_back_to_one_per_range() {
    let ranges = scattered();
    let (_tmp, server) = serve(true);
    let src = HttpSource::open(format!("{}/data.bin", server.url())).expect("open");
    assert_eq!(src.multi_range(), None, "not known before the first batch");
    let before = src.stats().requests;
    check(&src, &ranges);
    assert_eq!(src.multi_range(), Some(true));
    assert_eq!(
        src.stats().requests - before,
        1,
        "the whole batch in one request"
    );
    assert_eq!(
        src.stats().ranges,
        ranges.len() as u64 - 1,
        "every non-empty range delivered"
    );
    // more ranges than one request carries: several requests, in parallel
    let many: Vec<(u64, u64)> = (0..150u64).map(|i| (i * 1300, 100)).collect();
    let before = src.stats().requests;
    check(&src, &many);
    let sent = src.stats().requests - before;
    assert!((3..=4).contains(&sent), "150 ranges in {sent} requests");

    // a server without multi-range: its 200 is not read, then one request per span
    let (_tmp2, plain) = serve(false);
    let src = HttpSource::open(format!("{}/data.bin", plain.url())).expect("open");
    let before = src.stats().requests;
    check(&src, &ranges);
    assert_eq!(src.multi_range(), Some(false));
    let spans = memlayer_bank::multipart::coalesce(&ranges, memlayer_http::COALESCE_GAP)
        .0
        .iter()
        .filter(|s| s.1 > 0)
        .count() as u64;
    assert_eq!(src.stats().requests - before, 1 + spans);
    assert!(
        src.stats().bytes < N as u64,
        "the whole-file reply was not read"
    );
    // and with multi-range switched off by the client: no multi request at all
    let opts = HttpOptions {
        multi_range: false,
        ..HttpOptions::default()
    };
    let src = HttpSource::open_with(format!("{}/data.bin", server.url()), opts).expect("open");
    let before = src.stats().requests;
    check(&src, &ranges);
    assert_eq!(src.stats().requests - before, spans);
    // out of bounds: named per range, the others still read
    let r = src.read_ranges(&[(0, 4), (N as u64 - 2, 4)]);
    assert!(r[0].is_ok());
    assert!(r[1].as_ref().is_err_and(
        |e| e.to_string().contains("out of bounds") || e.to_string().contains(&N.to_string())
    ));
}

/// A hand-written server: HEAD is honest; every GET gets `reply(range)`.
fn fake(reply: impl Fn(&str) -> Vec<u8> + Send + Sync + 'static) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let gets = Arc::new(AtomicUsize::new(0));
    let (reply, g) = (Arc::new(reply), gets.clone());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let (reply, g) = (reply.clone(), g.clone());
            std::thread::spawn(move || {
                let Some(head) = read_request_head(&mut conn) else {
                    return;
                };
                let out = if head.starts_with("HEAD") {
                    format!(
                        "HTTP/1.1 200 OK\r\nConnection: close\r\nAccept-Ranges: bytes\r\nContent-Length: {N}\r\n\r\n"
                    )
                    .into_bytes()
                } else {
                    g.fetch_add(1, SeqCst);
                    let range = head
                        .lines()
                        .find_map(|l| {
                            let (n, v) = l.split_once(':')?;
                            n.eq_ignore_ascii_case("range").then_some(v.trim())
                        })
                        .unwrap_or("")
                        .to_string();
                    reply(&range)
                };
                let _ = conn.write_all(&out);
                let _ = conn.flush();
            });
        }
    });
    (format!("http://{addr}/f.bin"), gets)
}

/// A fake server's answer to a GET, given its Range header.
type Replier = dyn Fn(&str) -> Vec<u8> + Send + Sync;

/// The ranges of a `bytes=a-b,c-d` header.
fn asked(range: &str) -> Vec<(u64, u64)> {
    range
        .trim_start_matches("bytes=")
        .split(',')
        .filter_map(|s| s.split_once('-'))
        .filter_map(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
        .collect()
}

fn multipart(body: &[u8], boundary: &str) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 206 Partial Content\r\nConnection: close\r\nContent-Type: multipart/byteranges; boundary={boundary}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

#[test]
fn reordered_parts_are_matched_by_content_range_and_bad_replies_are_named() {
    let d = Arc::new(data());
    let ranges = [(1000u64, 10u64), (90_000, 10), (150_000, 10)];
    // parts in reverse order, with the boundary inside the data
    let dd = d.clone();
    let (url, _) = fake(move |range| {
        let parts: Vec<(u64, &[u8])> = asked(range)
            .iter()
            .rev()
            .map(|&(a, b)| (a, &dd[a as usize..=b as usize]))
            .collect();
        multipart(
            &write_byteranges("zz", "application/octet-stream", N as u64, &parts),
            "zz",
        )
    });
    let src = HttpSource::open(url).expect("open");
    for (r, &(off, len)) in src.read_ranges(&ranges).into_iter().zip(&ranges) {
        assert_eq!(r.expect("read"), d[off as usize..(off + len) as usize]);
    }
    // malformed replies: each a named error for every range, never bytes
    let cases: Vec<(&str, Box<Replier>)> = vec![
        (
            "is cut short",
            Box::new(|_: &str| {
                multipart(
                    b"--b\r\nContent-Range: bytes 1000-1009/200000\r\n\r\nabc",
                    "b",
                )
            }),
        ),
        (
            "no part holds bytes 90000-90009",
            Box::new(|_: &str| {
                multipart(
                    &write_byteranges("b", "x", N as u64, &[(1000, &[0u8; 10][..])]),
                    "b",
                )
            }),
        ),
        (
            "the file changed on the server",
            Box::new(|range: &str| {
                let parts: Vec<(u64, Vec<u8>)> = asked(range)
                    .iter()
                    .map(|&(a, b)| (a, vec![0u8; (b - a + 1) as usize]))
                    .collect();
                let refs: Vec<(u64, &[u8])> =
                    parts.iter().map(|(a, v)| (*a, v.as_slice())).collect();
                multipart(&write_byteranges("b", "x", 999, &refs), "b")
            }),
        ),
        (
            "neither multipart/byteranges",
            Box::new(|_: &str| {
                b"HTTP/1.1 206 Partial Content\r\nConnection: close\r\nContent-Length: 3\r\n\r\nabc"
                    .to_vec()
            }),
        ),
        (
            "longer than",
            Box::new(|_: &str| multipart(&vec![b'-'; 200_000], "b")),
        ),
    ];
    let opts = HttpOptions {
        retries: 0,
        timeout: Duration::from_secs(5),
        ..HttpOptions::default()
    };
    for (want, reply) in cases {
        let (url, _) = fake(reply);
        let src = HttpSource::open_with(url.clone(), opts.clone()).expect("open");
        for r in src.read_ranges(&ranges) {
            let e = r.expect_err("a bad reply must fail").to_string();
            assert!(e.contains(want), "{want:?} not in {e:?}");
            assert!(e.contains(&url), "{e}");
        }
    }
}

#[test]
fn a_banks_pages_are_read_in_one_batch_and_each_is_verified() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("m.bank");
    let layout = BankLayout::new(vec![SectionSpec::pkm_values(4096, 16, 8, Dtype::F16)]);
    let mut w = BankFileWriter::create(&path, &layout).expect("create");
    let rows: Vec<f32> = (0..4096 * 16).map(|i| (i as f32 * 0.37).sin()).collect();
    w.write_rows(&rows).expect("rows");
    w.finish().expect("finish");
    let mut config = ServeConfig::new("127.0.0.1:0".parse().expect("addr")).mount("/", tmp.path());
    config.threads = 2;
    let server = memlayer_http::Server::start(config).expect("start");
    let url = format!("{}/m.bank", server.url());
    let src = Arc::new(HttpSource::open(&url).expect("open"));
    let bank = BankReader::open(Box::new(src.clone()) as Box<dyn PageSource>).expect("bank");
    let first = bank.sections()[0].first_page;
    let pages: Vec<u64> = [3u64, 400, 17, 250, 4, 5]
        .iter()
        .map(|p| first + p)
        .collect();
    let before = src.stats().requests;
    let got = bank.read_pages_f32(&pages);
    assert_eq!(src.stats().requests - before, 1);
    for (r, &p) in got.iter().zip(&pages) {
        assert_eq!(
            r.as_ref().expect("page"),
            &bank.read_page_f32(p).expect("page")
        );
    }
    // a flipped byte in one page: that page's checksum error, the others fine
    let e = *bank.page(pages[1]).expect("entry");
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[e.offset as usize + 3] ^= 1;
    std::fs::write(&path, &bytes).expect("write");
    let got = bank.read_pages_f32(&pages);
    assert!(
        got[1]
            .as_ref()
            .is_err_and(|e| e.to_string().contains("checksum")),
        "{:?}",
        got[1].as_ref().err()
    );
    assert!(got.iter().enumerate().all(|(i, r)| i == 1 || r.is_ok()));
}
