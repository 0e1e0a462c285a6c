//! `Range` / `Content-Range` parsing shared by the server and the client.

/// What a server does with a request's `Range` header for a file of a given length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum RangeReply {
    /// No usable `Range` (absent, another unit, or several ranges): 200 with the whole file.
    Full,
    /// 206 with bytes `start..=end` (inclusive, `end < len`).
    Partial { start: u64, end: u64 },
    /// 206 `multipart/byteranges` with these `(start, end)` ranges
    /// (inclusive, sorted, not overlapping, at least two).
    Multi(Vec<(u64, u64)>),
    /// 416: malformed, or no byte of the range lies inside the file.
    Unsatisfiable,
}

/// Most ranges one request may ask for; more are refused (416): RFC 9110
/// §14.2 lets a server reject a `Range` of too many ranges, and a client
/// batching a token's misses asks for far fewer.
pub(crate) const MAX_RANGES: usize = 256;

/// Ranges whose gap is at most this many bytes are sent as one part (a
/// part's headers cost about as much).
const MERGE_GAP: u64 = 80;

/// Resolves a `Range` header that may name several ranges: each is resolved
/// as [`resolve`] does one; the satisfiable ones are sorted and merged where
/// they overlap or nearly touch (so the reply is never larger than the
/// file); one left is a plain 206, none is 416, more than [`MAX_RANGES`]
/// asked is 416. With `multi` off, several ranges get the whole file (200),
/// as a server without multi-range support answers.
pub(crate) fn resolve_multi(header: Option<&str>, len: u64, multi: bool) -> RangeReply {
    let Some(value) = header else {
        return RangeReply::Full;
    };
    let Some((unit, set)) = value.trim().split_once('=') else {
        return RangeReply::Unsatisfiable;
    };
    if !set.contains(',') || !unit.trim().eq_ignore_ascii_case("bytes") {
        return resolve(header, len);
    }
    if !multi {
        return RangeReply::Full;
    }
    let specs: Vec<&str> = set
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if specs.len() > MAX_RANGES {
        return RangeReply::Unsatisfiable;
    }
    let mut ranges = Vec::with_capacity(specs.len());
    for spec in specs {
        match resolve(Some(&format!("bytes={spec}")), len) {
            RangeReply::Partial { start, end } => ranges.push((start, end)),
            // a malformed spec makes the whole header invalid
            RangeReply::Unsatisfiable if !spec_is_well_formed(spec) => {
                return RangeReply::Unsatisfiable;
            }
            _ => {}
        }
    }
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match merged.last_mut() {
            Some((_, e)) if start <= e.saturating_add(MERGE_GAP + 1) => *e = (*e).max(end),
            _ => merged.push((start, end)),
        }
    }
    match merged.as_slice() {
        [] => RangeReply::Unsatisfiable,
        &[(start, end)] => RangeReply::Partial { start, end },
        _ => RangeReply::Multi(merged),
    }
}

/// Whether one range spec (`a-b`, `a-`, `-n`) is well formed, whether or
/// not it lies inside the file.
fn spec_is_well_formed(spec: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    match spec.split_once('-') {
        Some((a, b)) => {
            let (a, b) = (a.trim(), b.trim());
            match (a.is_empty(), b.is_empty()) {
                (true, false) => digits(b),
                (false, true) => digits(a),
                (false, false) => {
                    digits(a) && digits(b) && a.parse::<u64>().ok() <= b.parse::<u64>().ok()
                }
                (true, true) => false,
            }
        }
        None => false,
    }
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
    memlayer_bank::multipart::parse_content_range(value).map(|(first, last, complete)| {
        ContentRange {
            first,
            last,
            complete,
        }
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
    fn several_ranges_are_sorted_merged_and_bounded() {
        let r = |h: &str, len| resolve_multi(Some(h), len, true);
        assert_eq!(
            r("bytes=500-599,0-9", 1000),
            Multi(vec![(0, 9), (500, 599)])
        );
        // overlapping, touching and nearly touching ranges merge
        assert_eq!(
            r("bytes=0-9,5-20,21-30,200-210", 1000),
            Multi(vec![(0, 30), (200, 210)])
        );
        assert_eq!(r("bytes=0-9,50-59", 1000), Partial { start: 0, end: 59 });
        // parts past the end are dropped; none left is 416
        assert_eq!(r("bytes=0-0,2000-2001", 1000), Partial { start: 0, end: 0 });
        assert_eq!(r("bytes=2000-2001,3000-", 1000), Unsatisfiable);
        // the suffix form and a range running past the end are clamped
        assert_eq!(r("bytes=-10,0-0", 1000), Multi(vec![(0, 0), (990, 999)]));
        // malformed: the whole header
        assert_eq!(r("bytes=0-1,x-2", 1000), Unsatisfiable);
        assert_eq!(r("bytes=0-1,5-3", 1000), Unsatisfiable);
        // a pile of whole-file ranges is no bigger than the file
        assert_eq!(r("bytes=0-,0-,0-,0-", 1000), Partial { start: 0, end: 999 });
        let many = (0..=MAX_RANGES)
            .map(|i| format!("{}-{}", i * 200, i * 200))
            .collect::<Vec<_>>();
        assert_eq!(
            r(&format!("bytes={}", many.join(",")), 1 << 20),
            Unsatisfiable
        );
        // off: the whole file, as a server without multi-range answers
        assert_eq!(resolve_multi(Some("bytes=0-1,500-501"), 1000, false), Full);
        assert_eq!(
            resolve_multi(Some("bytes=3-4"), 1000, false),
            Partial { start: 3, end: 4 }
        );
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
