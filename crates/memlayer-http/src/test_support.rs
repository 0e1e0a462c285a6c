//! Helpers for tests of HTTP clients and servers (this crate's, the
//! runtime's and the CLI's): the two ends of a raw HTTP/1.1 exchange,
//! without any HTTP library in the way. Not part of the API.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Reads one request head (through its blank line) from `conn`, a byte at
/// a time so nothing after it is consumed: its text, or `None` when the
/// peer closes or the read fails first.
pub fn read_request_head(conn: &mut impl Read) -> Option<String> {
    let mut req = Vec::new();
    let mut byte = [0u8; 1];
    while !req.ends_with(b"\r\n\r\n") {
        match conn.read(&mut byte) {
            Ok(1) => req.push(byte[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&req).into_owned())
}

/// Sends `request` (a whole request, `Connection: close`) to `addr` on a
/// new connection, every step bounded by `timeout`, and reads the reply to
/// its end: `(head, body)`, the head without its blank line. Errors
/// (refused, reset, timed out, no end of headers) are returned.
pub fn exchange(
    addr: SocketAddr,
    timeout: Duration,
    request: &str,
) -> io::Result<(String, Vec<u8>)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(request.as_bytes())?;
    let mut all = Vec::new();
    s.read_to_end(&mut all)?;
    let split = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no end of headers"))?;
    let head = String::from_utf8_lossy(&all[..split]).into_owned();
    Ok((head, all[split + 4..].to_vec()))
}
