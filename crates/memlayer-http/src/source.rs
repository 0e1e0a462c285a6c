//! [`HttpSource`]: a [`PageSource`] over HTTP `Range` requests.

use std::io::{self, Read};
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use memlayer_bank::{PageSource, SourceError};
use ureq::http::{HeaderMap, StatusCode};

use crate::range::{parse_content_range, parse_unsatisfied_length};

/// Timeouts and retries of an [`HttpSource`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpOptions {
    /// Limit for connecting, and for each wait for bytes from the server
    /// (reply headers or the next chunk of the body). A server that stalls
    /// longer fails the attempt with "timed out". Default 10 s.
    pub timeout: Duration,
    /// How many times a failed request is repeated after the first attempt
    /// (so at most `retries + 1` attempts). Only connection errors, timeouts
    /// and 5xx replies are retried. Default 3.
    pub retries: u32,
    /// Wait before the first retry; doubled before each further one
    /// (100 ms, 200 ms, 400 ms with the defaults). Default 100 ms.
    pub backoff: Duration,
    /// Send a batch of ranges ([`PageSource::read_ranges`]: a token's
    /// missed pages) as multi-range requests when the server supports them.
    /// The first batch finds out: a server that answers it with the whole
    /// file (`200`, its body left unread) gets single-range requests from
    /// then on. Default on.
    pub multi_range: bool,
    /// Requests in flight at once for one batch (multi-range requests of
    /// [`MAX_RANGES_PER_REQUEST`] ranges, or single ranges where the server
    /// has no multi-range support). Default 8.
    pub parallel: usize,
}

/// Most ranges one multi-range request asks for (servers cap them; this
/// keeps the header a few KiB).
pub const MAX_RANGES_PER_REQUEST: usize = 64;

/// Ranges at most this many bytes apart are fetched as one. Zero: only
/// ranges that touch or overlap (adjacent pages) merge, so a batch never
/// asks for bytes it does not need — a failure in bytes no page of the
/// batch reads cannot fail it. (A multi-range server merges near parts by
/// itself.)
pub const COALESCE_GAP: u64 = 0;

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            retries: 3,
            backoff: Duration::from_millis(100),
            multi_range: true,
            parallel: 8,
        }
    }
}

/// Traffic of an [`HttpSource`] since it was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HttpStats {
    /// HTTP requests sent, counting the length probe at open and every retry.
    pub requests: u64,
    /// Body bytes delivered by successful range reads (and the probe).
    pub bytes: u64,
    /// Attempts that failed with a retryable error and were repeated.
    pub retries: u64,
    /// Ranges delivered by [`PageSource::read_ranges`] (each page of a
    /// batch counts once, however many requests carried them).
    pub ranges: u64,
}

/// A bank file read with HTTP `Range` requests: one `GET` with
/// `Range: bytes=start-end` per [`PageSource::read_at`].
///
/// Opening sends a `HEAD` (or, when that does not show `Content-Length` and
/// `Accept-Ranges: bytes`, a `GET` of `bytes=0-0`) to learn the length and
/// check that the server honours ranges. Every read must then come back as
/// `206 Partial Content` with a `Content-Range` naming exactly the requested
/// bytes of a file of the length seen at open, and exactly that many body
/// bytes; anything else is an error, so a read never returns partial or
/// wrong bytes (the bank reader's checksums are a second line of defence).
///
/// Cheap to share between threads: requests go through one
/// [`ureq::Agent`], which keeps a pool of idle connections.
#[derive(Debug)]
pub struct HttpSource {
    url: String,
    agent: ureq::Agent,
    options: HttpOptions,
    len: u64,
    /// Whether the server answers several ranges with one multipart reply:
    /// [`MULTI_UNKNOWN`] until the first batch, then [`MULTI_YES`] or [`MULTI_NO`].
    multi: AtomicU8,
    requests: AtomicU64,
    bytes: AtomicU64,
    retries: AtomicU64,
    ranges: AtomicU64,
}

/// Why one attempt failed, and whether another attempt may help.
struct Failure {
    cause: String,
    retryable: bool,
    kind: io::ErrorKind,
}

impl Failure {
    fn fatal(cause: impl Into<String>) -> Self {
        Self {
            cause: cause.into(),
            retryable: false,
            kind: io::ErrorKind::Other,
        }
    }

    fn retry(cause: impl Into<String>, kind: io::ErrorKind) -> Self {
        Self {
            cause: cause.into(),
            retryable: true,
            kind,
        }
    }

    /// A failure because of the reply's status (5xx retryable, others not).
    fn status(status: StatusCode) -> Self {
        let cause = show_status(status);
        if status.is_server_error() {
            Self::retry(cause, io::ErrorKind::Other)
        } else {
            let kind = match status.as_u16() {
                404 | 410 => io::ErrorKind::NotFound,
                401 | 403 => io::ErrorKind::PermissionDenied,
                _ => io::ErrorKind::Other,
            };
            Self {
                cause,
                retryable: false,
                kind,
            }
        }
    }
}

fn show_status(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("HTTP {} {reason}", status.as_u16()),
        None => format!("HTTP {}", status.as_u16()),
    }
}

/// Classifies a ureq error: transport problems are retried, the rest not.
fn transport_failure(e: ureq::Error, timeout: Duration) -> Failure {
    match e {
        ureq::Error::Timeout(t) => Failure::retry(
            format!("timed out after {timeout:?} ({t})"),
            io::ErrorKind::TimedOut,
        ),
        ureq::Error::Io(e) => io_failure(&e, timeout),
        ureq::Error::ConnectionFailed => {
            Failure::retry("connection failed", io::ErrorKind::ConnectionRefused)
        }
        ureq::Error::HostNotFound => Failure {
            cause: "host not found".into(),
            retryable: true,
            kind: io::ErrorKind::NotFound,
        },
        e => Failure::fatal(e.to_string()),
    }
}

/// An I/O error on the connection: retried; timeouts say "timed out".
fn io_failure(e: &io::Error, timeout: Duration) -> Failure {
    // A ureq timeout hit while reading the body arrives wrapped in io::Error.
    if let Some(inner) = e.get_ref().and_then(|x| x.downcast_ref::<ureq::Error>())
        && let ureq::Error::Timeout(t) = inner
    {
        return Failure::retry(
            format!("timed out after {timeout:?} ({t})"),
            io::ErrorKind::TimedOut,
        );
    }
    match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Failure::retry(
            format!("timed out after {timeout:?} ({e})"),
            io::ErrorKind::TimedOut,
        ),
        kind => Failure::retry(format!("I/O error: {e}"), kind),
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Fails if the body is content-encoded (its bytes would not be the file's).
fn check_identity(headers: &HeaderMap) -> Result<(), Failure> {
    match header(headers, "content-encoding").map(str::trim) {
        None | Some("") => Ok(()),
        Some(enc) if enc.eq_ignore_ascii_case("identity") => Ok(()),
        Some(enc) => Err(Failure::fatal(format!(
            "the reply is content-encoded ({enc}), so its bytes are not the file's"
        ))),
    }
}

const NO_RANGE: &str = "the server does not support Range requests";

impl HttpSource {
    /// Opens `url` (`http://` or `https://`) with default [`HttpOptions`].
    pub fn open(url: impl Into<String>) -> Result<Self, SourceError> {
        Self::open_with(url, HttpOptions::default())
    }

    /// Opens `url`: learns its length and checks that the server honours
    /// byte ranges (see the type docs). Fails with [`SourceError::Open`]
    /// naming the URL; its I/O error kind is `TimedOut` for timeouts,
    /// `NotFound` for 404/410, `Unsupported` for a server without ranges.
    pub fn open_with(url: impl Into<String>, options: HttpOptions) -> Result<Self, SourceError> {
        let url = url.into();
        let scheme_ok = ["http://", "https://"].iter().any(|s| {
            url.get(..s.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(s))
        });
        if !scheme_ok {
            return Err(SourceError::Open {
                location: url,
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "not an http:// or https:// URL",
                ),
            });
        }
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(options.timeout))
            .timeout_per_read(Some(options.timeout))
            .timeout_per_write(Some(options.timeout))
            .max_idle_connections_per_host(16)
            .user_agent(concat!("memlayer-http/", env!("CARGO_PKG_VERSION")))
            .build();
        let mut source = Self {
            url,
            agent: config.into(),
            options,
            len: 0,
            multi: AtomicU8::new(MULTI_UNKNOWN),
            requests: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            ranges: AtomicU64::new(0),
        };
        source.len = source.probe()?;
        Ok(source)
    }

    /// Whether the server answers multi-range requests: `None` before the
    /// first batch asked ([`PageSource::read_ranges`]), then what it did.
    pub fn multi_range(&self) -> Option<bool> {
        match self.multi.load(Relaxed) {
            MULTI_YES => Some(true),
            MULTI_NO => Some(false),
            _ => None,
        }
    }

    /// The URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The options it was opened with.
    pub fn options(&self) -> &HttpOptions {
        &self.options
    }

    /// Requests, bytes and retries so far (relaxed atomics: a snapshot).
    pub fn stats(&self) -> HttpStats {
        HttpStats {
            requests: self.requests.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
            retries: self.retries.load(Relaxed),
            ranges: self.ranges.load(Relaxed),
        }
    }

    /// Runs `attempt` until it succeeds, fails for good, or the retries are
    /// spent; `what` names the request in the error (`GET <url> bytes=a-b`).
    fn with_retries<T>(
        &self,
        what: &str,
        mut attempt: impl FnMut() -> Result<T, Failure>,
    ) -> Result<T, (String, io::ErrorKind)> {
        let max = self.options.retries.saturating_add(1);
        let mut delay = self.options.backoff;
        let mut n = 1;
        loop {
            self.requests.fetch_add(1, Relaxed);
            let f = match attempt() {
                Ok(v) => return Ok(v),
                Err(f) => f,
            };
            let tries = if n == 1 {
                "1 attempt".to_string()
            } else {
                format!("{n} attempts")
            };
            if !f.retryable {
                return Err((
                    format!("{what}: {} ({tries}, not retried)", f.cause),
                    f.kind,
                ));
            }
            if n >= max {
                return Err((
                    format!("{what}: {} (gave up after {tries})", f.cause),
                    f.kind,
                ));
            }
            self.retries.fetch_add(1, Relaxed);
            std::thread::sleep(delay);
            delay = delay.saturating_mul(2);
            n += 1;
        }
    }

    /// Learns the length: `HEAD`, falling back to a `GET` of `bytes=0-0`.
    fn probe(&self) -> Result<u64, SourceError> {
        let open_err = |(msg, kind): (String, io::ErrorKind)| SourceError::Open {
            location: self.url.clone(),
            source: io::Error::new(kind, msg),
        };
        // The URL is the error's location already: name only the request.
        if let Some(len) = self
            .with_retries("HEAD", || self.head_once())
            .map_err(open_err)?
        {
            return Ok(len);
        }
        self.with_retries("GET bytes=0-0", || self.probe_once())
            .map_err(open_err)
    }

    /// `Some(len)` if a `HEAD` shows the length and `Accept-Ranges: bytes`;
    /// `None` (use the GET probe) for any other reply.
    fn head_once(&self) -> Result<Option<u64>, Failure> {
        let resp = self
            .agent
            .head(&self.url)
            .call()
            .map_err(|e| transport_failure(e, self.options.timeout))?;
        if !resp.status().is_success() {
            return Ok(None);
        }
        let h = resp.headers();
        let ranges = header(h, "accept-ranges")
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("bytes")));
        let len = header(h, "content-length").and_then(|v| v.trim().parse::<u64>().ok());
        Ok(len.filter(|_| ranges && check_identity(h).is_ok()))
    }

    /// One `GET` with `Range: {range}`: the reply and its `Content-Range`
    /// (empty when it has none).
    fn get_range(
        &self,
        range: &str,
    ) -> Result<(ureq::http::Response<ureq::Body>, String), Failure> {
        let resp = self
            .agent
            .get(&self.url)
            .header("Range", range)
            .call()
            .map_err(|e| transport_failure(e, self.options.timeout))?;
        let content_range = header(resp.headers(), "content-range")
            .unwrap_or("")
            .to_string();
        Ok((resp, content_range))
    }

    /// `GET` of `bytes=0-0`: the length from the `Content-Range` of a 206
    /// (or of a 416 for an empty file).
    fn probe_once(&self) -> Result<u64, Failure> {
        let (resp, content_range) = self.get_range("bytes=0-0")?;
        let status = resp.status();
        let h = resp.headers();
        match status.as_u16() {
            206 => {
                check_identity(h)?;
                let cr = parse_content_range(&content_range)
                    .filter(|cr| cr.first == 0 && cr.last == 0)
                    .ok_or_else(|| {
                        Failure::fatal(format!(
                            "206 reply with a Content-Range of {content_range:?} for bytes 0-0"
                        ))
                    })?;
                let len = cr.complete.ok_or_else(|| {
                    Failure::fatal(format!(
                        "the server does not tell the file length (Content-Range {content_range:?})"
                    ))
                })?;
                let mut byte = [0u8; 1];
                read_body(resp.into_body(), &mut byte, self.options.timeout)?;
                self.bytes.fetch_add(1, Relaxed);
                Ok(len)
            }
            // bytes=0-0 is unsatisfiable only for an empty file.
            416 => match parse_unsatisfied_length(&content_range) {
                Some(0) => Ok(0),
                _ => Err(Failure::fatal(format!(
                    "HTTP 416 Range Not Satisfiable for bytes=0-0 (Content-Range {content_range:?})"
                ))),
            },
            s if (200..300).contains(&s) => Err(Failure {
                cause: format!(
                    "{NO_RANGE}: it answered {} instead of 206 Partial Content",
                    show_status(status)
                ),
                retryable: false,
                kind: io::ErrorKind::Unsupported,
            }),
            _ => Err(Failure::status(status)),
        }
    }

    /// One `GET` of `offset..offset + buf.len()` (`buf` not empty, in bounds).
    fn read_once(&self, offset: u64, buf: &mut [u8]) -> Result<(), Failure> {
        let last = offset + buf.len() as u64 - 1;
        let (resp, content_range) = self.get_range(&format!("bytes={offset}-{last}"))?;
        let status = resp.status();
        let h = resp.headers();
        match status.as_u16() {
            206 => {}
            416 => {
                let now = parse_unsatisfied_length(&content_range)
                    .map_or_else(|| "unknown".to_string(), |n| format!("{n} bytes"));
                return Err(Failure::fatal(format!(
                    "HTTP 416 Range Not Satisfiable: the file is now {now} long, it was {} bytes when opened",
                    self.len
                )));
            }
            s if (200..300).contains(&s) => {
                return Err(Failure::fatal(format!(
                    "{NO_RANGE}: it answered {} instead of 206 Partial Content",
                    show_status(status)
                )));
            }
            _ => return Err(Failure::status(status)),
        }
        check_identity(h)?;
        let cr = parse_content_range(&content_range).ok_or_else(|| {
            Failure::fatal(format!(
                "206 reply without a valid Content-Range (got {content_range:?})"
            ))
        })?;
        if cr.first != offset || cr.last != last {
            return Err(Failure::fatal(format!(
                "the server sent bytes {}-{} (Content-Range {content_range:?}) instead of {offset}-{last}",
                cr.first, cr.last
            )));
        }
        if let Some(total) = cr.complete
            && total != self.len
        {
            return Err(Failure::fatal(format!(
                "the file changed on the server: it is now {total} bytes long, it was {} bytes when opened",
                self.len
            )));
        }
        if let Some(n) = header(h, "content-length").and_then(|v| v.trim().parse::<u64>().ok())
            && n != buf.len() as u64
        {
            return Err(Failure::fatal(format!(
                "206 reply with Content-Length {n} for a range of {} bytes",
                buf.len()
            )));
        }
        read_body(resp.into_body(), buf, self.options.timeout)?;
        self.bytes.fetch_add(buf.len() as u64, Relaxed);
        Ok(())
    }
}

impl HttpSource {
    /// One multi-range `GET` of `spans` (`(offset, length)`, sorted, in
    /// bounds, not empty): the bytes of each span, or `None` if the server
    /// answered with the whole file (it has no multi-range support; the
    /// body is not read). A reply that is not a usable 206 — a malformed
    /// multipart body, a part missing, another file length — is an error
    /// naming it.
    fn read_multi_once(&self, spans: &[(u64, u64)]) -> Result<Option<Vec<Vec<u8>>>, Failure> {
        use memlayer_bank::multipart::{range_header, reply_parts, slice_spans};
        let (resp, content_range) = self.get_range(&range_header(spans))?;
        let status = resp.status();
        match status.as_u16() {
            206 => {}
            s if (200..300).contains(&s) => return Ok(None),
            416 => {
                return Err(Failure::fatal(format!(
                    "HTTP 416 Range Not Satisfiable for {} ranges of a file of {} bytes",
                    spans.len(),
                    self.len
                )));
            }
            _ => return Err(Failure::status(status)),
        }
        let h = resp.headers();
        check_identity(h)?;
        let wanted: u64 = spans.iter().map(|s| s.1).sum();
        // the parts' headers are small: a body far larger is refused unread
        let limit = wanted + 512 * spans.len() as u64 + 4096;
        let content_type = header(h, "content-type").unwrap_or("").to_string();
        let body = read_body_bounded(resp.into_body(), limit, self.options.timeout)?;
        self.bytes.fetch_add(body.len() as u64, Relaxed);
        let parts = reply_parts(&content_type, &content_range, body, Some(self.len))
            .map_err(|e| Failure::fatal(e.to_string()))?;
        slice_spans(&parts, spans)
            .map(Some)
            .map_err(|e| Failure::fatal(e.to_string()))
    }

    /// Reads one group of spans: one multi-range request (falling back to
    /// single ranges if the server turns out not to support them), or one
    /// request per span.
    fn read_group(&self, spans: &[(u64, u64)], multi: bool) -> Vec<SpanResult> {
        if multi && spans.len() > 1 {
            let what = format!("GET {} ({} ranges)", self.url, spans.len());
            match self.with_retries(&what, || self.read_multi_once(spans)) {
                Ok(Some(bytes)) => {
                    self.multi.store(MULTI_YES, Relaxed);
                    return bytes.into_iter().map(Ok).collect();
                }
                // answered with the whole file: no multi-range support
                Ok(None) => self.multi.store(MULTI_NO, Relaxed),
                Err((msg, kind)) => {
                    return spans
                        .iter()
                        .map(|_| Err((msg.clone(), kind, true)))
                        .collect();
                }
            }
        }
        spans
            .iter()
            .map(|&(offset, len)| {
                let mut buf = vec![0u8; len as usize];
                let what = format!("GET {} bytes={offset}-{}", self.url, offset + len - 1);
                self.with_retries(&what, || self.read_once(offset, &mut buf))
                    .map(|()| buf)
                    .map_err(|(msg, kind)| (msg, kind, false))
            })
            .collect()
    }
}

/// A span's bytes, or (the message, the error kind, whether the request
/// carried other spans too).
type SpanResult = Result<Vec<u8>, (String, io::ErrorKind, bool)>;

/// Reads a whole body of at most `limit` bytes (more is an error).
fn read_body_bounded(body: ureq::Body, limit: u64, timeout: Duration) -> Result<Vec<u8>, Failure> {
    let mut reader = body.into_reader().take(limit + 1);
    let mut out = Vec::new();
    loop {
        let mut chunk = [0u8; 16 * 1024];
        match reader.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                let mut f = io_failure(&e, timeout);
                f.cause = format!("{} after {} body bytes", f.cause, out.len());
                return Err(f);
            }
        }
    }
    if out.len() as u64 > limit {
        return Err(Failure::fatal(format!(
            "the reply's body is longer than the {limit} bytes its ranges need"
        )));
    }
    Ok(out)
}

const MULTI_UNKNOWN: u8 = 0;
const MULTI_YES: u8 = 1;
const MULTI_NO: u8 = 2;

/// Fills `buf` from the body, which must hold exactly `buf.len()` bytes.
fn read_body(body: ureq::Body, buf: &mut [u8], timeout: Duration) -> Result<(), Failure> {
    let mut reader = body.into_reader();
    let mut done = 0;
    while done < buf.len() {
        match reader.read(&mut buf[done..]) {
            Ok(0) => {
                return Err(Failure::retry(
                    format!(
                        "the body ended after {done} of {} bytes (connection closed)",
                        buf.len()
                    ),
                    io::ErrorKind::UnexpectedEof,
                ));
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                let mut f = io_failure(&e, timeout);
                f.cause = format!("{} after {done} of {} body bytes", f.cause, buf.len());
                return Err(f);
            }
        }
    }
    // The body must end here (ureq enforces Content-Length; this catches
    // chunked or close-delimited bodies that run long). Reading to the end
    // also lets the connection go back to the pool.
    let mut extra = [0u8; 1];
    loop {
        match reader.read(&mut extra) {
            Ok(0) => return Ok(()),
            Ok(_) => {
                return Err(Failure::fatal(format!(
                    "the body is longer than the {} bytes requested",
                    buf.len()
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                let mut f = io_failure(&e, timeout);
                f.cause = format!("{} at the end of the body", f.cause);
                return Err(f);
            }
        }
    }
}

impl PageSource for HttpSource {
    /// One ranged `GET` (with retries); a read of 0 bytes inside the file
    /// succeeds without a request; a range past the end is
    /// [`SourceError::OutOfBounds`] without a request. Other failures are
    /// [`SourceError::Other`] naming the URL, the byte range, the cause and
    /// the number of attempts.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let length = buf.len() as u64;
        match offset.checked_add(length) {
            Some(end) if end <= self.len => {}
            _ => {
                return Err(SourceError::OutOfBounds {
                    offset,
                    length,
                    size: self.len,
                });
            }
        }
        if buf.is_empty() {
            return Ok(());
        }
        let what = format!("GET {} bytes={offset}-{}", self.url, offset + length - 1);
        self.with_retries(&what, || self.read_once(offset, buf))
            .map_err(|(msg, _)| SourceError::Other(msg))
    }

    fn len(&self) -> Result<u64, SourceError> {
        Ok(self.len)
    }

    fn describe(&self) -> String {
        self.url.clone()
    }

    /// A batch as few round trips as it can: ranges closer than
    /// [`COALESCE_GAP`] merged, then multi-range requests of up to
    /// [`MAX_RANGES_PER_REQUEST`] ranges when the server supports them,
    /// else one request per merged range; up to [`HttpOptions::parallel`]
    /// requests in flight. Each range's result names the URL and cause.
    fn read_ranges(&self, ranges: &[(u64, u64)]) -> Vec<Result<Vec<u8>, SourceError>> {
        let in_bounds = |&(offset, len): &(u64, u64)| {
            offset.checked_add(len).is_some_and(|end| end <= self.len)
        };
        let valid: Vec<(u64, u64)> = ranges
            .iter()
            .map(|r| if in_bounds(r) { *r } else { (0, 0) })
            .collect();
        let (spans, span_of) = memlayer_bank::multipart::coalesce(&valid, COALESCE_GAP);
        let asked: Vec<usize> = (0..spans.len()).filter(|&i| spans[i].1 > 0).collect();
        let multi = self.options.multi_range && self.multi_range() != Some(false);
        let groups: Vec<&[usize]> = if multi {
            asked.chunks(MAX_RANGES_PER_REQUEST).collect()
        } else {
            asked.chunks(1).collect()
        };
        let results: Vec<Vec<SpanResult>> = {
            let next = AtomicUsize::new(0);
            let done = std::sync::Mutex::new(vec![Vec::new(); groups.len()]);
            let workers = self.options.parallel.clamp(1, 64).min(groups.len());
            if workers == 1 {
                // one request (a token's misses): no thread to start
                let d = groups
                    .iter()
                    .map(|group| {
                        let group_spans: Vec<(u64, u64)> =
                            group.iter().map(|&i| spans[i]).collect();
                        self.read_group(&group_spans, multi)
                    })
                    .collect();
                return self.finish_ranges(ranges, &spans, &span_of, &groups, d);
            }
            std::thread::scope(|scope| {
                for _ in 0..workers {
                    scope.spawn(|| {
                        loop {
                            let g = next.fetch_add(1, Relaxed);
                            let Some(group) = groups.get(g) else { break };
                            let group_spans: Vec<(u64, u64)> =
                                group.iter().map(|&i| spans[i]).collect();
                            let got = self.read_group(&group_spans, multi);
                            if let Ok(mut d) = done.lock() {
                                d[g] = got;
                            }
                        }
                    });
                }
            });
            done.into_inner().unwrap_or_else(|e| e.into_inner())
        };
        self.finish_ranges(ranges, &spans, &span_of, &groups, results)
    }

    fn batches_reads(&self) -> bool {
        true
    }
}

impl HttpSource {
    /// Cuts each range of a batch out of its span's bytes (or its error).
    fn finish_ranges(
        &self,
        ranges: &[(u64, u64)],
        spans: &[(u64, u64)],
        span_of: &[usize],
        groups: &[&[usize]],
        results: Vec<Vec<SpanResult>>,
    ) -> Vec<Result<Vec<u8>, SourceError>> {
        let in_bounds = |&(offset, len): &(u64, u64)| {
            offset.checked_add(len).is_some_and(|end| end <= self.len)
        };
        let mut span_bytes: Vec<Option<SpanResult>> = vec![None; spans.len()];
        let mut members = vec![0usize; spans.len()];
        for &s in span_of {
            members[s] += 1;
        }
        for (group, got) in groups.iter().zip(results) {
            for (&i, r) in group.iter().zip(got) {
                span_bytes[i] = Some(r);
            }
        }
        ranges
            .iter()
            .enumerate()
            .map(|(i, &(offset, len))| {
                if !in_bounds(&(offset, len)) {
                    return Err(SourceError::OutOfBounds {
                        offset,
                        length: len,
                        size: self.len,
                    });
                }
                if len == 0 {
                    return Ok(Vec::new());
                }
                let (span_off, _) = spans[span_of[i]];
                match &span_bytes[span_of[i]] {
                    Some(Ok(bytes)) => {
                        self.ranges.fetch_add(1, Relaxed);
                        let at = (offset - span_off) as usize;
                        Ok(bytes[at..at + len as usize].to_vec())
                    }
                    // the server answered, but not for this request of
                    // several ranges (a status, a bad reply): this range
                    // alone, so the error names what failed, and the
                    // healthy ranges beside it are read. A timeout or a
                    // refused connection is not repeated range by range.
                    Some(Err((msg, kind, shared)))
                        if (*shared || members[span_of[i]] > 1)
                            && !matches!(
                                kind,
                                io::ErrorKind::TimedOut
                                    | io::ErrorKind::ConnectionRefused
                                    | io::ErrorKind::ConnectionReset
                            ) =>
                    {
                        let mut buf = vec![0u8; len as usize];
                        self.read_at(offset, &mut buf)
                            .map(|()| {
                                self.ranges.fetch_add(1, Relaxed);
                                buf
                            })
                            .map_err(|e| match e {
                                SourceError::Other(m) => {
                                    SourceError::Other(format!("{m}; with other ranges: {msg}"))
                                }
                                e => e,
                            })
                    }
                    Some(Err((msg, _, _))) => Err(SourceError::Other(msg.clone())),
                    None => Err(SourceError::Other(format!(
                        "GET {} bytes={offset}-{}: not read",
                        self.url,
                        offset + len - 1
                    ))),
                }
            })
            .collect()
    }
}
