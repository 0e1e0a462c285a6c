//! Batched byte-range reads: which ranges to ask for and how to read the
//! reply, shared by the native HTTP client (`memlayer-http`), the browser
//! (`memlayer-web`) and the server's tests.
//!
//! A token's missed pages are scattered over the bank. Over a network each
//! request costs a round trip, so the misses go out together:
//! [`coalesce`] merges ranges that touch or nearly touch into spans,
//! [`range_header`] writes them as one `Range: bytes=a-b,c-d,…` header,
//! and a server that supports it answers `206` with a
//! `multipart/byteranges` body, read by [`parse_byteranges`]
//! (RFC 9110 §14.6). [`slice_spans`] then cuts each asked range out of the
//! parts that came back — a server may merge or reorder ranges, so parts
//! are matched by their `Content-Range`, never by position. A malformed
//! reply, or one that lacks an asked byte, is a named
//! [`MultipartError`], never wrong bytes (and every page is checked against
//! its checksum after this).

/// Why a multipart reply could not be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed multipart/byteranges reply: {0}")]
pub struct MultipartError(pub String);

fn bad(msg: impl Into<String>) -> MultipartError {
    MultipartError(msg.into())
}

/// One part of a `multipart/byteranges` body: bytes `first..=last`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BytePart {
    /// First byte's offset in the file.
    pub first: u64,
    /// Last byte's offset (inclusive).
    pub last: u64,
    /// Total file length from the part's `Content-Range` (`None` for `*`).
    pub complete: Option<u64>,
    /// The bytes (`last - first + 1` of them).
    pub bytes: Vec<u8>,
}

/// Ranges `(offset, length)` merged into spans `(offset, length)` sorted by
/// offset: ranges that overlap, touch, or leave a gap of at most `max_gap`
/// bytes share a span (fetching the gap is cheaper than another part or
/// request). Returns the spans and, for each input range, its span.
/// Empty ranges get an empty span of their own offset (never requested).
pub fn coalesce(ranges: &[(u64, u64)], max_gap: u64) -> (Vec<(u64, u64)>, Vec<usize>) {
    let mut order: Vec<usize> = (0..ranges.len()).filter(|&i| ranges[i].1 > 0).collect();
    order.sort_by_key(|&i| ranges[i].0);
    let mut spans: Vec<(u64, u64)> = Vec::new();
    let mut span_of = vec![usize::MAX; ranges.len()];
    for i in order {
        let (offset, len) = ranges[i];
        let end = offset.saturating_add(len);
        match spans.last_mut() {
            Some((s, l)) if offset <= s.saturating_add(*l).saturating_add(max_gap) => {
                *l = (*l).max(end - *s);
            }
            _ => spans.push((offset, len)),
        }
        span_of[i] = spans.len() - 1;
    }
    for (i, &(offset, len)) in ranges.iter().enumerate() {
        if len == 0 {
            spans.push((offset, 0));
            span_of[i] = spans.len() - 1;
        }
    }
    (spans, span_of)
}

/// `bytes=a-b,c-d,…` for non-empty spans `(offset, length)`.
pub fn range_header(spans: &[(u64, u64)]) -> String {
    let mut h = String::from("bytes=");
    for (i, &(offset, len)) in spans.iter().filter(|s| s.1 > 0).enumerate() {
        if i > 0 {
            h.push(',');
        }
        h.push_str(&format!("{offset}-{}", offset + len - 1));
    }
    h
}

/// The `boundary` parameter of a `multipart/byteranges` content type
/// (`None` for any other type).
pub fn boundary(content_type: &str) -> Option<String> {
    let mut params = content_type.split(';');
    let kind = params.next()?.trim();
    if !kind.eq_ignore_ascii_case("multipart/byteranges") {
        return None;
    }
    params.find_map(|p| {
        let (k, v) = p.split_once('=')?;
        if !k.trim().eq_ignore_ascii_case("boundary") {
            return None;
        }
        let v = v.trim().trim_matches('"');
        (!v.is_empty() && v.len() <= 70).then(|| v.to_string())
    })
}

/// Parses `bytes first-last/complete` (`complete` may be `*`).
pub fn parse_content_range(value: &str) -> Option<(u64, u64, Option<u64>)> {
    let (unit, rest) = value.trim().split_once(' ')?;
    if !unit.eq_ignore_ascii_case("bytes") {
        return None;
    }
    let (range, complete) = rest.trim().split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let num = |s: &str| {
        let s = s.trim();
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u64>().ok())
            .flatten()
    };
    let complete = match complete.trim() {
        "*" => None,
        c => Some(num(c)?),
    };
    let (first, last) = (num(first)?, num(last)?);
    (last >= first).then_some((first, last, complete))
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// Parses a `multipart/byteranges` body with `boundary`: every part's
/// `Content-Range` and exactly that many bytes after its headers (the
/// length comes from the header, so a boundary string inside the data
/// cannot cut a part short). A preamble before the first delimiter and an
/// epilogue after the last are ignored. Fails naming what is wrong: no
/// delimiter, a part without `Content-Range`, a part shorter than its
/// range, a missing closing delimiter.
pub fn parse_byteranges(body: &[u8], boundary: &str) -> Result<Vec<BytePart>, MultipartError> {
    let delim = format!("--{boundary}");
    let delim = delim.as_bytes();
    let mut at = find(body, delim, 0)
        .ok_or_else(|| bad(format!("no delimiter --{boundary} in {} bytes", body.len())))?
        + delim.len();
    let mut parts = Vec::new();
    loop {
        // after a delimiter: "--" closes, CRLF opens a part
        match body.get(at..at + 2) {
            Some(b"--") => return Ok(parts),
            Some(b"\r\n") => at += 2,
            _ => {
                return Err(bad(format!(
                    "part {} ends without a closing delimiter (byte {at} of {})",
                    parts.len(),
                    body.len()
                )));
            }
        }
        let head_end = find(body, b"\r\n\r\n", at)
            .ok_or_else(|| bad(format!("part {}: headers never end", parts.len())))?;
        let head = std::str::from_utf8(&body[at..head_end])
            .map_err(|_| bad(format!("part {}: headers are not text", parts.len())))?;
        let range = head
            .split("\r\n")
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.trim()
                    .eq_ignore_ascii_case("content-range")
                    .then_some(value)
            })
            .ok_or_else(|| bad(format!("part {} has no Content-Range", parts.len())))?;
        let (first, last, complete) = parse_content_range(range).ok_or_else(|| {
            bad(format!(
                "part {}: Content-Range {:?} is not bytes first-last/length",
                parts.len(),
                range.trim()
            ))
        })?;
        let start = head_end + 4;
        let len = usize::try_from(last - first + 1)
            .ok()
            .filter(|&n| n <= body.len().saturating_sub(start))
            .ok_or_else(|| {
                bad(format!(
                    "part {} (bytes {first}-{last}) is cut short: {} bytes left in the body",
                    parts.len(),
                    body.len().saturating_sub(start)
                ))
            })?;
        let end = start + len;
        parts.push(BytePart {
            first,
            last,
            complete,
            bytes: body[start..end].to_vec(),
        });
        // the data is followed by CRLF and the next delimiter
        if body.get(end..end + 2) != Some(b"\r\n")
            || body.get(end + 2..end + 2 + delim.len()) != Some(delim)
        {
            return Err(bad(format!(
                "part {} (bytes {first}-{last}) is not followed by the delimiter",
                parts.len() - 1
            )));
        }
        at = end + 2 + delim.len();
    }
}

/// The parts of a `206` reply to a multi-range request for a file of
/// `file_len` bytes (when known), whichever form the server chose: a
/// `multipart/byteranges` body (the boundary from `content_type`), or one
/// part that `content_range` describes (a server may merge the asked ranges
/// into one). Fails naming what is wrong: neither form, a single part whose
/// body is not as long as its `Content-Range`, a part that gives the file
/// another length (it changed on the server since it was opened).
pub fn reply_parts(
    content_type: &str,
    content_range: &str,
    body: Vec<u8>,
    file_len: Option<u64>,
) -> Result<Vec<BytePart>, MultipartError> {
    let parts = match boundary(content_type) {
        Some(b) => parse_byteranges(&body, &b)?,
        None => {
            let (first, last, complete) = parse_content_range(content_range).ok_or_else(|| {
                bad(format!(
                    "a 206 reply neither multipart/byteranges (Content-Type {content_type:?}) \
                     nor with a valid Content-Range ({content_range:?})"
                ))
            })?;
            if body.len() as u64 != last - first + 1 {
                return Err(bad(format!(
                    "{} body bytes for Content-Range bytes {first}-{last}",
                    body.len()
                )));
            }
            vec![BytePart {
                first,
                last,
                complete,
                bytes: body,
            }]
        }
    };
    if let Some(len) = file_len
        && let Some(c) = parts.iter().find_map(|p| p.complete.filter(|&c| c != len))
    {
        return Err(bad(format!(
            "the file changed on the server: a part says it is {c} bytes long, it was {len} \
             bytes when opened"
        )));
    }
    Ok(parts)
}

/// The bytes of each span `(offset, length)` cut from `parts` (each span
/// must lie inside one part, wherever that part came in the reply).
/// Fails naming the first span no part covers.
pub fn slice_spans(
    parts: &[BytePart],
    spans: &[(u64, u64)],
) -> Result<Vec<Vec<u8>>, MultipartError> {
    spans
        .iter()
        .map(|&(offset, len)| {
            if len == 0 {
                return Ok(Vec::new());
            }
            let last = offset + len - 1;
            let p = parts
                .iter()
                .find(|p| p.first <= offset && last <= p.last)
                .ok_or_else(|| {
                    bad(format!(
                        "no part holds bytes {offset}-{last} (the reply has {} parts)",
                        parts.len()
                    ))
                })?;
            let at = (offset - p.first) as usize;
            Ok(p.bytes[at..at + len as usize].to_vec())
        })
        .collect()
}

/// Writes a `multipart/byteranges` body of `parts` (the server's side, and
/// the tests'): each part's headers, its bytes, the closing delimiter.
pub fn write_byteranges(
    boundary: &str,
    content_type: &str,
    total: u64,
    parts: &[(u64, &[u8])],
) -> Vec<u8> {
    let mut out = Vec::new();
    for &(first, bytes) in parts {
        out.extend_from_slice(
            part_head(boundary, content_type, first, bytes.len() as u64, total).as_bytes(),
        );
        out.extend_from_slice(bytes);
    }
    out.extend_from_slice(closing(boundary).as_bytes());
    out
}

/// The delimiter and headers before a part of `len > 0` bytes at `first`
/// (a leading CRLF ends the previous part or is the empty preamble).
pub fn part_head(boundary: &str, content_type: &str, first: u64, len: u64, total: u64) -> String {
    format!(
        "\r\n--{boundary}\r\nContent-Type: {content_type}\r\nContent-Range: bytes {first}-{}/{total}\r\n\r\n",
        first + len - 1
    )
}

/// The closing delimiter after the last part.
pub fn closing(boundary: &str) -> String {
    format!("\r\n--{boundary}--\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_parts_reads_either_form_and_names_what_is_wrong() {
        let file = b"0123456789abcdefghij".to_vec();
        let parts = [(2u64, 4u64), (10, 3)];
        let written: Vec<(u64, &[u8])> = parts
            .iter()
            .map(|&(o, n)| (o, &file[o as usize..(o + n) as usize]))
            .collect();
        let body = write_byteranges("xyz", "application/octet-stream", 20, &written);
        let got = reply_parts("multipart/byteranges; boundary=xyz", "", body, Some(20)).unwrap();
        assert_eq!(
            slice_spans(&got, &parts).unwrap(),
            vec![b"2345".to_vec(), b"abc".to_vec()]
        );
        // one merged part
        let got = reply_parts(
            "application/octet-stream",
            "bytes 2-12/20",
            file[2..13].to_vec(),
            Some(20),
        )
        .unwrap();
        assert_eq!(
            slice_spans(&got, &parts).unwrap(),
            vec![b"2345".to_vec(), b"abc".to_vec()]
        );
        let err = |r: Result<Vec<BytePart>, MultipartError>| r.unwrap_err().to_string();
        let e = err(reply_parts(
            "text/plain",
            "bytes */20",
            Vec::new(),
            Some(20),
        ));
        assert!(e.contains("neither multipart/byteranges"), "{e}");
        let e = err(reply_parts(
            "text/plain",
            "bytes 2-12/20",
            file[2..12].to_vec(),
            Some(20),
        ));
        assert!(
            e.contains("10 body bytes for Content-Range bytes 2-12"),
            "{e}"
        );
        let e = err(reply_parts(
            "text/plain",
            "bytes 2-12/21",
            file[2..13].to_vec(),
            Some(20),
        ));
        assert!(e.contains("the file changed on the server"), "{e}");
        // an unknown file length (the bank not opened yet) is not checked
        assert!(reply_parts("text/plain", "bytes 2-12/21", file[2..13].to_vec(), None).is_ok());
        let body = write_byteranges("xyz", "application/octet-stream", 20, &written);
        let e = err(reply_parts(
            "multipart/byteranges; boundary=xyz",
            "",
            body,
            Some(19),
        ));
        assert!(e.contains("it was 19 bytes when opened"), "{e}");
    }

    #[test]
    fn coalesce_merges_near_ranges_and_keeps_each_ranges_span() {
        // three pages of 10 bytes with 2-byte gaps, one far away, one empty
        let ranges = [(24, 10), (0, 10), (12, 10), (1000, 10), (5, 0)];
        let (spans, of) = coalesce(&ranges, 2);
        assert_eq!(spans, vec![(0, 34), (1000, 10), (5, 0)]);
        assert_eq!(of, vec![0, 0, 0, 1, 2]);
        let (spans, _) = coalesce(&ranges, 1);
        assert_eq!(
            spans.len(),
            5,
            "gaps of 2 bytes are not merged with max_gap 1"
        );
        // overlapping and contained ranges
        let (spans, of) = coalesce(&[(0, 100), (10, 5), (90, 20)], 0);
        assert_eq!((spans, of), (vec![(0, 110)], vec![0, 0, 0]));
        assert_eq!(
            range_header(&[(0, 34), (1000, 10), (5, 0)]),
            "bytes=0-33,1000-1009"
        );
    }

    #[test]
    fn a_body_as_servers_write_it_is_parsed_and_sliced() {
        // the shape of RFC 9110 §14.6's example (nginx and Apache write the same)
        let body = b"--THIS_STRING_SEPARATES\r\n\
Content-Type: application/octet-stream\r\n\
Content-Range: bytes 500-503/8000\r\n\
\r\n\
abcd\r\n\
--THIS_STRING_SEPARATES\r\n\
Content-Type: application/octet-stream\r\n\
Content-Range: bytes 7000-7001/8000\r\n\
\r\n\
xy\r\n\
--THIS_STRING_SEPARATES--\r\n";
        let ct = "multipart/byteranges; boundary=THIS_STRING_SEPARATES";
        let b = boundary(ct).unwrap();
        let parts = parse_byteranges(body, &b).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(
            (parts[1].first, parts[1].last, parts[1].complete),
            (7000, 7001, Some(8000))
        );
        // asked in another order than the reply's
        let got = slice_spans(&parts, &[(7001, 1), (501, 2)]).unwrap();
        assert_eq!(got, vec![b"y".to_vec(), b"bc".to_vec()]);
        let e = slice_spans(&parts, &[(503, 2)]).unwrap_err();
        assert!(e.to_string().contains("no part holds bytes 503-504"), "{e}");
        assert_eq!(
            boundary("multipart/byteranges; boundary=\"q r\"").as_deref(),
            Some("q r")
        );
        assert_eq!(boundary("application/octet-stream"), None);
    }

    #[test]
    fn the_writer_round_trips_even_with_the_boundary_inside_the_data() {
        let data: &[u8] = b"--B\r\n--B--\r\n";
        let body = write_byteranges(
            "B",
            "application/octet-stream",
            99,
            &[(3, data), (40, b"z")],
        );
        let parts = parse_byteranges(&body, "B").unwrap();
        assert_eq!(parts[0].bytes, data);
        assert_eq!((parts[1].first, parts[1].bytes.as_slice()), (40, &b"z"[..]));
    }

    #[test]
    fn malformed_replies_are_named() {
        let good = write_byteranges("B", "x", 10, &[(0, b"abcd"), (6, b"gh")]);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"no delimiter here".to_vec(), "no delimiter"),
            (
                good[..good.len() - 6].to_vec(),
                "not followed by the delimiter",
            ),
            (good[..57].to_vec(), "cut short"),
            (
                b"--B\r\nContent-Type: x\r\n\r\nabcd\r\n--B--".to_vec(),
                "no Content-Range",
            ),
            (
                b"--B\r\nContent-Range: bytes 4-1/10\r\n\r\nabcd\r\n--B--".to_vec(),
                "is not bytes first-last/length",
            ),
            (
                b"--B\r\nContent-Range: bytes 0-3/10\r\n\r\nabcdEXTRA\r\n--B--".to_vec(),
                "not followed by the delimiter",
            ),
            (
                b"--B\r\nContent-Range: bytes 0-3/10".to_vec(),
                "headers never end",
            ),
            (b"--Bxx".to_vec(), "without a closing delimiter"),
        ];
        for (body, want) in cases {
            let e = parse_byteranges(&body, "B").unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} should say {want:?}");
            assert!(e.starts_with("malformed multipart/byteranges reply"), "{e}");
        }
    }
}
