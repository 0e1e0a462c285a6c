//! A hostile HTTP server: it serves a valid 64-byte bank header but claims
//! the file is 1 TiB long. Opening the bank over HTTP must fail with a
//! named error that mentions the URL, after requesting only bounded ranges,
//! and must never abort the process on a huge allocation.
//!
//! The server is hand-written on `std::net::TcpListener` (one request per
//! connection, read/write timeouts, a bounded number of connections and a
//! deadline), so no test can hang.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use memlayer_bank::format::{encode_header, encode_section};
use memlayer_bank::{
    BankError, BankReader, Dtype, HEADER_LEN, Header, MAX_TABLE_LEN, PAGE_ENTRY_LEN,
    READ_CHUNK_LEN, SectionInfo, SectionSpec, VERSION,
};
use memlayer_http::{HttpOptions, HttpSource};

const TIB: u64 = 1 << 40;
/// Connections one server accepts before it stops.
const MAX_CONNECTIONS: usize = 64;
/// How long a server accepts connections.
const SERVER_LIFETIME: Duration = Duration::from_secs(60);
/// The largest body the server will send (it refuses larger ranges with 416).
const MAX_BODY: u64 = 16 << 20;

/// A server of a "file" of `total` bytes: the bytes of a `head`, then zeros.
struct Hostile {
    addr: SocketAddr,
    /// Ranges requested by GETs (first, last), in order.
    ranges: Arc<Mutex<Vec<(u64, u64)>>>,
}

impl Hostile {
    fn url(&self) -> String {
        format!("http://{}/x.bank", self.addr)
    }

    fn ranges(&self) -> Vec<(u64, u64)> {
        self.ranges.lock().expect("ranges").clone()
    }
}

/// Starts the server. `head_tells_length`: a `HEAD` answers with
/// `Content-Length: total` and `Accept-Ranges: bytes`; otherwise `HEAD` is
/// refused (405) so the client learns the length from the
/// `Content-Range: bytes 0-0/total` of a ranged `GET`.
fn serve(total: u64, head_tells_length: bool, head: Vec<u8>) -> Hostile {
    let byte_at = move |i: u64| {
        usize::try_from(i)
            .ok()
            .and_then(|i| head.get(i))
            .copied()
            .unwrap_or(0)
    };
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr");
    let ranges = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&ranges);
    std::thread::spawn(move || {
        let deadline = Instant::now() + SERVER_LIFETIME;
        let mut served = 0;
        while served < MAX_CONNECTIONS && Instant::now() < deadline {
            match listener.accept() {
                Ok((conn, _)) => {
                    served += 1;
                    let _ = answer(conn, total, head_tells_length, &byte_at, &log);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return,
            }
        }
    });
    Hostile { addr, ranges }
}

/// Reads one request from `conn` and answers it, then closes the connection.
fn answer(
    mut conn: TcpStream,
    total: u64,
    head_tells_length: bool,
    byte_at: &impl Fn(u64) -> u8,
    log: &Mutex<Vec<(u64, u64)>>,
) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut req = Vec::new();
    let mut byte = [0u8; 1];
    while !req.ends_with(b"\r\n\r\n") {
        if req.len() > 16 * 1024 || conn.read(&mut byte)? == 0 {
            return Ok(());
        }
        req.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&req).into_owned();
    let head = |status: &str, headers: &[String]| {
        let mut out = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
        for h in headers {
            out.push_str(h);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        out.into_bytes()
    };
    if text.starts_with("HEAD ") {
        let reply = if head_tells_length {
            head(
                "200 OK",
                &[
                    format!("Content-Length: {total}"),
                    "Accept-Ranges: bytes".into(),
                ],
            )
        } else {
            head("405 Method Not Allowed", &["Content-Length: 0".into()])
        };
        return conn.write_all(&reply);
    }
    let range = text.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("range")
            .then(|| value.trim().to_string())
    });
    let parsed = range.as_deref().and_then(|r| {
        let (a, b) = r.strip_prefix("bytes=")?.split_once('-')?;
        Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?))
    });
    let Some((first, last)) = parsed else {
        return conn.write_all(&head("400 Bad Request", &["Content-Length: 0".into()]));
    };
    log.lock().expect("log").push((first, last));
    if first > last || last >= total || last - first + 1 > MAX_BODY {
        return conn.write_all(&head(
            "416 Range Not Satisfiable",
            &[
                format!("Content-Range: bytes */{total}"),
                "Content-Length: 0".into(),
            ],
        ));
    }
    let body: Vec<u8> = (first..=last).map(byte_at).collect();
    let mut reply = head(
        "206 Partial Content",
        &[
            format!("Content-Range: bytes {first}-{last}/{total}"),
            format!("Content-Length: {}", body.len()),
        ],
    );
    reply.extend_from_slice(&body);
    conn.write_all(&reply)
}

/// A valid header (checksum computed) with these counts, page alignment 4096.
fn header(sections: u32, pages: u64, file_len: u64) -> Vec<u8> {
    encode_header(&Header {
        version: VERSION,
        page_align: 4096,
        section_count: sections,
        page_count: pages,
        file_len,
        table_checksum: 0,
    })
    .to_vec()
}

/// Short timeout, no retries: a failing test fails fast.
fn options() -> HttpOptions {
    HttpOptions {
        timeout: Duration::from_secs(5),
        retries: 0,
        backoff: Duration::from_millis(10),
        ..HttpOptions::default()
    }
}

/// Opens the server's bank; the error must be a `BankError` naming the URL.
fn open_err(server: &Hostile) -> BankError {
    let source = HttpSource::open_with(server.url(), options()).expect("the HTTP open succeeds");
    assert_eq!(memlayer_bank::PageSource::len(&source).expect("len"), TIB);
    let err = match BankReader::open(source) {
        Err(e) => e,
        Ok(bank) => panic!("opened a hostile bank: {:?}", bank.header()),
    };
    let msg = err.to_string();
    assert!(msg.contains(&server.url()), "{msg}");
    err
}

#[test]
fn a_server_claiming_1_tib_with_a_valid_header_is_refused_without_abort() {
    // The header's table fills the claimed 1 TiB exactly.
    let pages = (TIB - HEADER_LEN) / PAGE_ENTRY_LEN;
    for head_tells_length in [true, false] {
        let server = serve(TIB, head_tells_length, header(0, pages, TIB));
        let err = open_err(&server);
        match &err {
            BankError::TableTooLarge {
                page_count, limit, ..
            } => {
                assert_eq!((*page_count, *limit), (pages, MAX_TABLE_LEN));
            }
            other => panic!("expected TableTooLarge, got {other}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("{pages} pages")) && msg.contains("a reader accepts"),
            "{msg}"
        );
        // Only the header was requested (after the length probe, if any).
        let ranges = server.ranges();
        let expected = if head_tells_length {
            vec![(0, HEADER_LEN - 1)]
        } else {
            vec![(0, 0), (0, HEADER_LEN - 1)]
        };
        assert_eq!(ranges, expected, "head_tells_length {head_tells_length}");
    }
}

#[test]
fn a_table_under_the_cap_is_read_in_bounded_ranges_and_fails_at_the_first_bad_one() {
    // 10 million pages (a 240 MB table, under the cap) behind one valid
    // section; every page entry the server sends is zero (offset 0: inside
    // the table), so page 0 is the first bad entry.
    let pages = 10_000_000u64;
    let spec = SectionSpec::pkm_values(pages, 1, 1, Dtype::F32);
    let mut bytes = header(1, pages, TIB);
    bytes.extend_from_slice(&encode_section(&SectionInfo {
        index: 0,
        spec,
        first_page: 0,
        geometry: spec.geometry().expect("geometry"),
    }));
    let server = serve(TIB, true, bytes);
    let err = open_err(&server);
    assert!(
        matches!(
            err,
            BankError::CorruptTable {
                page: Some(0),
                offset: 128,
                ..
            }
        ),
        "{err}"
    );
    let ranges = server.ranges();
    assert!(
        ranges.iter().all(|&(a, b)| b - a < READ_CHUNK_LEN as u64),
        "{ranges:?}"
    );
    // header, section descriptors, one chunk of page entries
    assert_eq!(ranges.len(), 3, "{ranges:?}");
    assert_eq!(ranges[1], (64, 127));
}
