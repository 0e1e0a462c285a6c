//! `Range` / `Content-Range` parsing shared by the server and the client.

/// What a server does with a request's `Range` header for a file of a given length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RangeReply {
    /// No usable `Range` (absent, another unit, or several ranges): 200 with the whole file.
    Full,
    /// 206 with bytes `start..=end` (inclusive, `end < len`).
    Partial { start: u64, end: u64 },
    /// 416: malformed, or no byte of the range lies inside the file.
    Unsatisfiable,
}

/// Resolves the value of a `Range` header against a file of `len` bytes.
///
/// - `bytes=a-b`, `bytes=a-`, `bytes=-n` (one range): 206, clamped to the
///   file (`b` past the end is cut, `-n` larger than the file is the whole
///   file); 416 if `a >= len`, `n == 0` or the file is empty.
/// - A malformed byte range (`bytes=5-3`, `bytes=x-`, `bytes=-`): 416.
/// - Several ranges (`bytes=0-1,5-6`): the header is ignored, 200 with the
///   whole file (RFC 9110 §14.2 lets a server ignore `Range`).
/// - Another unit (`items=0-1`): ignored, 200 (RFC 9110 §14.2: MUST ignore).
pub(crate) fn resolve(header: Option<&str>, len: u64) -> RangeReply {
    let Some(value) = header else {
        return RangeReply::Full;
    };
    let value = value.trim();
    let Some((unit, set)) = value.split_once('=') else {
        return RangeReply::Unsatisfiable;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return RangeReply::Full;
    }
    if set.contains(',') {
        return RangeReply::Full;
    }
    let Some((first, last)) = set.trim().split_once('-') else {
        return RangeReply::Unsatisfiable;
    };
    let (first, last) = (first.trim(), last.trim());
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    match (first.is_empty(), last.is_empty()) {
        // `-n`: the last n bytes.
        (true, false) => {
            let Some(n) = digits(last).then(|| last.parse::<u64>().ok()).flatten() else {
                return RangeReply::Unsatisfiable;
            };
            if n == 0 || len == 0 {
                return RangeReply::Unsatisfiable;
            }
            RangeReply::Partial {
                start: len.saturating_sub(n),
                end: len - 1,
            }
        }
        // `a-` or `a-b`.
        (false, _) => {
            // A start too large for u64 is past any file: unsatisfiable too.
            let Some(start) = digits(first).then(|| first.parse::<u64>().ok()).flatten() else {
                return RangeReply::Unsatisfiable;
            };
            let end = if last.is_empty() {
                u64::MAX
            } else if digits(last) {
                // A huge last position is clamped like any other past the end.
                last.parse::<u64>().unwrap_or(u64::MAX)
            } else {
                return RangeReply::Unsatisfiable;
            };
            if end < start || start >= len {
                return RangeReply::Unsatisfiable;
            }
            RangeReply::Partial {
                start,
                end: end.min(len - 1),
            }
        }
        (true, true) => RangeReply::Unsatisfiable,
    }
}

/// A parsed `Content-Range: bytes first-last/complete` (complete `None` for `*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ContentRange {
    pub first: u64,
    pub last: u64,
    pub complete: Option<u64>,
}

/// Parses a satisfied `Content-Range` value (`bytes 0-99/1000` or `bytes 0-99/*`).
pub(crate) fn parse_content_range(value: &str) -> Option<ContentRange> {
    let rest = value.trim();
    let (unit, rest) = rest.split_once(' ')?;
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
    if last < first {
        return None;
    }
    Some(ContentRange {
        first,
        last,
        complete,
    })
}

/// Parses the complete length of an unsatisfied `Content-Range: bytes */len`.
pub(crate) fn parse_unsatisfied_length(value: &str) -> Option<u64> {
    let rest = value.trim();
    let (unit, rest) = rest.split_once(' ')?;
    if !unit.eq_ignore_ascii_case("bytes") {
        return None;
    }
    let len = rest.trim().strip_prefix("*/")?.trim();
    (!len.is_empty() && len.bytes().all(|b| b.is_ascii_digit()))
        .then(|| len.parse().ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::RangeReply::*;
    use super::*;

    #[test]
    fn resolve_ranges() {
        let r = |h: &str, len| resolve(Some(h), len);
        assert_eq!(resolve(None, 10), Full);
        assert_eq!(r("bytes=0-0", 10), Partial { start: 0, end: 0 });
        assert_eq!(r("bytes=2-5", 10), Partial { start: 2, end: 5 });
        assert_eq!(r("bytes=2-100", 10), Partial { start: 2, end: 9 });
        assert_eq!(r("bytes=9-", 10), Partial { start: 9, end: 9 });
        assert_eq!(r("bytes=-3", 10), Partial { start: 7, end: 9 });
        assert_eq!(r("bytes=-30", 10), Partial { start: 0, end: 9 });
        assert_eq!(r(" BYTES = 1 - 2 ", 10), Partial { start: 1, end: 2 });
        assert_eq!(
            r("bytes=3-99999999999999999999999", 10),
            Partial { start: 3, end: 9 }
        );
        assert_eq!(r("bytes=10-", 10), Unsatisfiable);
        assert_eq!(r("bytes=10-20", 10), Unsatisfiable);
        assert_eq!(r("bytes=99999999999999999999999-", 10), Unsatisfiable);
        assert_eq!(r("bytes=-0", 10), Unsatisfiable);
        assert_eq!(r("bytes=0-0", 0), Unsatisfiable);
        assert_eq!(r("bytes=-5", 0), Unsatisfiable);
        assert_eq!(r("bytes=5-3", 10), Unsatisfiable);
        assert_eq!(r("bytes=-", 10), Unsatisfiable);
        assert_eq!(r("bytes=x-1", 10), Unsatisfiable);
        assert_eq!(r("bytes=1-x", 10), Unsatisfiable);
        assert_eq!(r("bytes=+1-2", 10), Unsatisfiable);
        assert_eq!(r("bytes", 10), Unsatisfiable);
        assert_eq!(r("bytes=0-1,4-5", 10), Full);
        assert_eq!(r("items=0-1", 10), Full);
    }

    #[test]
    fn content_range() {
        assert_eq!(
            parse_content_range("bytes 0-99/1000"),
            Some(ContentRange {
                first: 0,
                last: 99,
                complete: Some(1000)
            })
        );
        assert_eq!(
            parse_content_range("bytes 5-5/*"),
            Some(ContentRange {
                first: 5,
                last: 5,
                complete: None
            })
        );
        assert_eq!(parse_content_range("bytes 9-5/10"), None);
        assert_eq!(parse_content_range("bytes */10"), None);
        assert_eq!(parse_content_range("items 0-1/10"), None);
        assert_eq!(parse_content_range("bytes 0-1"), None);
        assert_eq!(parse_unsatisfied_length("bytes */0"), Some(0));
        assert_eq!(parse_unsatisfied_length("bytes */123"), Some(123));
        assert_eq!(parse_unsatisfied_length("bytes 0-1/123"), None);
    }
}
