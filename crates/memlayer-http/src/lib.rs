//! memlayer-http: banks over HTTP.
//!
//! Two independent parts:
//!
//! 1. [`HttpSource`], a [`memlayer_bank::PageSource`] that reads a
//!    bank file with HTTP `Range` requests, so
//!    [`memlayer_bank::BankReader`] can stream pages from any static
//!    file server that honours ranges.
//! 2. [`Server`], a small static file server with `Range` support, used by
//!    `memlayer serve` to publish bank directories (and the web demo) on a
//!    local address.
//!
//! # `HttpSource`
//!
//! [`HttpSource::open`] sends a `HEAD` to learn the file length; if the reply
//! lacks `Content-Length` or `Accept-Ranges: bytes` it sends a `GET` with
//! `Range: bytes=0-0` and takes the length from the `206` reply's
//! `Content-Range`. A server that answers that probe with `200` (the whole
//! file) fails the open with "the server does not support Range requests".
//!
//! Each [`read_at`](memlayer_bank::PageSource::read_at) is one `GET`
//! with `Range: bytes=start-end`. The reply must be `206`, carry a
//! `Content-Range` of exactly `start-end` for a file of the length seen at
//! open (or `*`), no content encoding, and exactly `end - start + 1` body
//! bytes. A read past the end is [`SourceError::OutOfBounds`] without a
//! request; a read of 0 bytes inside the file succeeds without a request.
//!
//! **Timeouts and retries** ([`HttpOptions`]): `timeout` (default 10 s)
//! bounds connecting and every wait for bytes from the server (reply
//! headers or the next piece of the body), so a stalled server fails the
//! attempt but a slow, progressing transfer does not. Connection errors,
//! timeouts, bodies cut short, and `5xx` replies are retried up to
//! `retries` times (default 3, so at most 4 attempts) with exponential
//! backoff (`backoff` = 100 ms, then ×2). `4xx` replies and protocol
//! violations (`200` instead of `206`, a wrong `Content-Range` or length)
//! are not retried.
//!
//! **Error contract**: a read never returns partial or wrong bytes. Open
//! failures are [`SourceError::Open`] with the URL as location (the I/O
//! error kind is `TimedOut`, `NotFound`, `Unsupported`, … where it
//! applies). Read failures are [`SourceError::Other`] whose message names
//! the method, URL, byte range, cause (HTTP status, I/O error, "timed
//! out", …) and the number of attempts, e.g.
//! `GET http://127.0.0.1:8080/m.bank bytes=4096-8191: HTTP 500 Internal Server Error (gave up after 4 attempts)`.
//! The bank reader adds the page id and region on top.
//!
//! [`HttpSource`] is `Send + Sync`; all requests share one [`ureq::Agent`]
//! (a pool of keep-alive connections), so one reader can fetch pages from
//! many threads. [`HttpSource::stats`] counts requests, bytes and retries.
//! `https://` URLs use rustls with the webpki root certificates.
//!
//! # `Server`
//!
//! [`Server::start`] serves the [`ServeConfig::mounts`] (URL prefix →
//! directory; the longest matching prefix wins) on [`ServeConfig::addr`]:
//! hyper's HTTP/1 server on a tokio runtime of [`ServeConfig::threads`]
//! workers (and as many threads for file reads), run on its own threads
//! behind a blocking API ([`ServerHandle::wait`], [`ServerHandle::shutdown`]).
//!
//! - `GET` and `HEAD`; `OPTIONS` answers `204` with `Allow` (and a CORS
//!   preflight for an allowed origin); other methods 405.
//! - One byte range per request: `bytes=a-b`, `bytes=a-`, `bytes=-n` →
//!   `206` with `Content-Range`. A range that starts past the end (or any
//!   range of an empty file, or a malformed one such as `bytes=5-3`) →
//!   `416` with `Content-Range: bytes */len`. **Several ranges**
//!   (`bytes=0-1,5-6`) and other units are ignored: `200` with the whole
//!   file (RFC 9110 allows a server to ignore `Range`).
//! - Every file reply has `Accept-Ranges: bytes` and an exact
//!   `Content-Length` (never chunked); ranges are streamed from the file
//!   after a seek, in chunks of at most 64 KiB ([`BODY_CHUNK_BYTES`]) read
//!   only as fast as the client takes them, never loaded whole.
//! - All replies: `Cache-Control: no-cache`. **No CORS by default**: no
//!   `Access-Control-Allow-Origin`, so a web page of another origin cannot
//!   read what is served (the web app under `/` is same-origin). Origins in
//!   [`ServeConfig::cors_origins`] (`memlayer serve --cors-origin`), matched
//!   exactly, get their `Origin` echoed, `Access-Control-Expose-Headers:
//!   Content-Range, Content-Length, Accept-Ranges`, and every reply then
//!   has `Vary: Origin`.
//! - `Content-Type` from the extension ([`content_type`]); `.wasm` is
//!   `application/wasm` (needed for streaming compilation in browsers).
//! - A directory serves its `index.html` (a directory without the trailing
//!   slash is redirected to it, 301); no listings; missing files → 404.
//! - Paths are percent-decoded once; `..` segments, NUL and backslashes →
//!   400. Any segment starting with `.` (dotfiles such as `.git/config`)
//!   → 404. The resolved path is canonicalized and must stay inside the
//!   mount's canonical directory, with no dot-name on the way (symlinks
//!   pointing out, or at a dotfile → 404).
//! - Limits against slow and hostile clients, each a [`ServeConfig`]
//!   field: open connections ([`ServeConfig::max_connections`], 256, and
//!   never more than `RLIMIT_NOFILE` allows; one over the cap gets `503`
//!   and is closed at once), request head size
//!   ([`ServeConfig::max_header_bytes`], 16 KiB, then `431`), the wait for
//!   a request head on a new or kept-alive connection
//!   ([`ServeConfig::idle_timeout`], 10 s), and a reply the client stops
//!   reading ([`ServeConfig::write_timeout`], 10 s without a byte taken).
//!   Failing `accept` calls (out of file descriptors, …) are logged once
//!   per burst and retried every 100 ms; only an unusable listener stops
//!   the server ([`ServeError::Accept`] from [`ServerHandle::wait`]).
//! - With [`ServeConfig::verbose`], one line per request on stderr.
//!
//! ```no_run
//! use memlayer_bank::BankReader;
//! use memlayer_http::{HttpSource, ServeConfig, Server};
//!
//! let server = Server::start(ServeConfig::new("127.0.0.1:0".parse()?).mount("/model/", "out"))?;
//! let url = format!("{}/model/demo.bank", server.url());
//! let bank = BankReader::open(HttpSource::open(url)?)?;
//! let page0 = bank.read_page(0)?;
//! # let _ = page0;
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! ```

mod range;
mod serve;
mod source;
#[doc(hidden)]
pub mod test_support;

pub use serve::{
    BODY_CHUNK_BYTES, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_WRITE_TIMEOUT, Mount, ServeConfig, ServeError, Server, ServerHandle, content_type,
};
pub use source::{COALESCE_GAP, HttpOptions, HttpSource, HttpStats, MAX_RANGES_PER_REQUEST};

#[doc(no_inline)]
pub use memlayer_bank::SourceError;
