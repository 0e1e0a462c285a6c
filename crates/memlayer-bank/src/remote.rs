//! The memory bank read remotely: its header and page table are fetched
//! once, its pages on demand, each verified against the table's checksum.
//!
//! [`PageFetch`] is where bytes come from: in the browser `fetch` with a
//! `Range` header and the Cache API or an OPFS mirror as a local copy
//! (`memlayer-web`), natively any [`PageSource`] (a file, memory) through
//! [`SourceFetch`] — the path the native tests take through the same code.
//! Futures need not be `Send` and nothing here spawns: the crate stays
//! executor-free and builds for wasm32.

use crate::format::parse_header;
use crate::{
    BankError, BankMeta, HEADER_LEN, PageEntry, PageId, PageSource, SectionInfo, TableParser,
};

/// Why a remote bank could not be opened or a page not read.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// Fetching bank bytes failed.
    #[error("fetching {what} from {location}: {message}")]
    Fetch {
        /// What was fetched (header, table, page id and bytes).
        what: String,
        /// The bank's URL or path.
        location: String,
        /// The failure (HTTP status, network error).
        message: String,
    },
    /// The bank's bytes are invalid (checksum, truncation, table, page id).
    #[error(transparent)]
    Bank(#[from] BankError),
}

/// Page bytes and where they came from.
#[derive(Clone, Debug)]
pub struct FetchedPage {
    /// The page's bytes (not yet verified).
    pub bytes: Vec<u8>,
    /// Served by a local copy (the browser's Cache API), not the network.
    pub from_cache: bool,
}

/// Where bank bytes come from. Futures need not be `Send` (the browser's are not).
#[allow(async_fn_in_trait)]
pub trait PageFetch {
    /// The bank's URL or path, for messages.
    fn location(&self) -> String;

    /// Bytes `offset .. offset + len` of the bank (exactly `len`, or an error).
    async fn read_range(&self, offset: u64, len: u64) -> Result<Vec<u8>, String>;

    /// The bytes of each page (global id, table entry), in order. The
    /// default reads runs of adjacent pages with one range each.
    async fn read_pages(&self, pages: &[(PageId, PageEntry)]) -> Vec<Result<FetchedPage, String>> {
        let mut out = Vec::with_capacity(pages.len());
        for run in adjacent_runs(pages, MAX_RUN_BYTES) {
            let first = pages[run.start].1;
            let last = pages[run.end - 1].1;
            match self
                .read_range(first.offset, last.end() - first.offset)
                .await
            {
                Ok(bytes) => out.extend(pages[run].iter().map(|(_, e)| {
                    let at = (e.offset - first.offset) as usize;
                    Ok(FetchedPage {
                        bytes: bytes[at..at + e.length as usize].to_vec(),
                        from_cache: false,
                    })
                })),
                Err(e) => out.extend(run.map(|_| Err(e.clone()))),
            }
        }
        out
    }

    /// Drops a local copy of `page` that failed verification (the next read
    /// goes to the network).
    async fn forget(&self, page: PageId, entry: &PageEntry) {
        let _ = (page, entry);
    }
}

/// Largest single range [`PageFetch::read_pages`] merges adjacent pages into.
pub const MAX_RUN_BYTES: u64 = 1 << 20;

/// Largest range [`RemoteBank::open`] requests of the page table at once
/// (4 MiB, ~175k pages: one request for most banks). Each request costs a
/// round trip in the browser, so this is larger than the native reader's
/// chunk; the table as a whole is capped by
/// [`crate::MAX_TABLE_LEN`] before anything is requested.
pub const TABLE_RANGE_BYTES: u64 = 4 << 20;

/// Splits `pages` (in the given order) into runs of consecutive entries
/// whose bytes follow each other in the file (up to the page alignment's
/// padding) and whose total stays under `max_bytes`: one range read each.
pub fn adjacent_runs(pages: &[(PageId, PageEntry)], max_bytes: u64) -> Vec<std::ops::Range<usize>> {
    let mut runs = Vec::new();
    let mut start = 0;
    for i in 1..=pages.len() {
        let split = i == pages.len() || {
            let (prev, next) = (pages[i - 1].1, pages[i].1);
            let first = pages[start].1;
            next.offset < prev.end()
                || next.offset - prev.end() >= 4096
                || next.end() - first.offset > max_bytes
                || pages[i].0 != pages[i - 1].0 + 1
        };
        if split {
            runs.push(start..i);
            start = i;
        }
    }
    runs
}

/// A native [`PageSource`] (file, memory) as a [`PageFetch`].
pub struct SourceFetch<S>(pub S);

impl<S: PageSource> PageFetch for SourceFetch<S> {
    fn location(&self) -> String {
        self.0.describe()
    }

    async fn read_range(&self, offset: u64, len: u64) -> Result<Vec<u8>, String> {
        let mut buf = vec![0u8; len as usize];
        self.0
            .read_at(offset, &mut buf)
            .map_err(|e| e.to_string())?;
        Ok(buf)
    }
}

/// A bank whose header and page table were fetched and validated.
pub struct RemoteBank<F> {
    fetch: F,
    meta: BankMeta,
    location: String,
}

impl<F: PageFetch> RemoteBank<F> {
    /// Fetches and validates the header and page table: one range read for
    /// the header, then the table in ranges of at most
    /// [`TABLE_RANGE_BYTES`], each validated by the core's
    /// [`TableParser`] as it arrives (the same checks as
    /// [`BankMeta::parse`] and the native reader).
    ///
    /// A header whose table would exceed
    /// [`crate::MAX_TABLE_LEN`] fails with
    /// `BankError::TableTooLarge` before any of the table is requested.
    pub async fn open(fetch: F) -> Result<Self, RemoteError> {
        let location = fetch.location();
        let fetch_err = |what: &str, e: String| RemoteError::Fetch {
            what: what.to_string(),
            location: location.clone(),
            message: e,
        };
        let head = fetch
            .read_range(0, HEADER_LEN)
            .await
            .map_err(|e| fetch_err("the bank header", e))?;
        // Checks the table size against MAX_TABLE_LEN too.
        let header = parse_header(&head, &location)?;
        let mut parser = TableParser::new(&header, &location)?;
        while parser.remaining() > 0 {
            let offset = parser.offset();
            let len = parser.remaining().min(TABLE_RANGE_BYTES);
            let bytes = fetch
                .read_range(offset, len)
                .await
                .map_err(|e| fetch_err("the bank's page table", e))?;
            if bytes.len() as u64 != len {
                return Err(fetch_err(
                    "the bank's page table",
                    format!(
                        "{} bytes for the range {offset}..{} ({len} expected)",
                        bytes.len(),
                        offset + len
                    ),
                ));
            }
            parser.push(&bytes)?;
        }
        let meta = parser.finish()?;
        Ok(Self {
            fetch,
            meta,
            location,
        })
    }

    /// The validated header, sections and page table.
    pub fn meta(&self) -> &BankMeta {
        &self.meta
    }

    /// The bank's URL or path.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Sections in file order.
    pub fn sections(&self) -> &[SectionInfo] {
        &self.meta.sections
    }

    /// The fetcher.
    pub fn fetcher(&self) -> &F {
        &self.fetch
    }

    /// The same bank read through another fetcher (e.g. one with a local
    /// copy named after this bank's table checksum).
    pub fn with_fetcher<G: PageFetch>(self, fetch: G) -> RemoteBank<G> {
        RemoteBank {
            fetch,
            meta: self.meta,
            location: self.location,
        }
    }

    /// Fetches `pages` (global ids) and verifies each against the page
    /// table; a local copy that fails verification is dropped and fetched
    /// again from the network once. One result per page, in order: the
    /// verified bytes and whether they came from the local copy.
    ///
    /// A page outside the table fails every page of the call (nothing is
    /// fetched).
    pub async fn read_pages(&self, pages: &[PageId]) -> Vec<Result<FetchedPage, RemoteError>> {
        let mut entries = Vec::with_capacity(pages.len());
        for &p in pages {
            match self.entry(p) {
                Ok(e) => entries.push((p, e)),
                Err(_) => {
                    return pages.iter().map(|_| Err(self.out_of_range(p))).collect();
                }
            }
        }
        let fetched = self.fetch.read_pages(&entries).await;
        let mut out = Vec::with_capacity(pages.len());
        for (&(page, entry), r) in entries.iter().zip(fetched) {
            let checked = match r {
                Err(e) => Err(self.page_fetch_error(page, &entry, e)),
                Ok(f) => match self.verify(page, &entry, &f.bytes) {
                    Ok(()) => Ok(f),
                    Err(_) if f.from_cache => {
                        // a corrupt local copy: drop it, go to the network
                        self.fetch.forget(page, &entry).await;
                        match self.fetch.read_pages(&[(page, entry)]).await.pop() {
                            Some(Ok(f)) => self.verify(page, &entry, &f.bytes).map(|()| f),
                            Some(Err(e)) => Err(self.page_fetch_error(page, &entry, e)),
                            None => Err(self.page_fetch_error(page, &entry, "no reply".into())),
                        }
                    }
                    Err(e) => Err(e),
                },
            };
            out.push(checked);
        }
        // a fetcher that answered fewer pages than asked: the rest failed
        for &(page, entry) in &entries[out.len()..] {
            out.push(Err(self.page_fetch_error(page, &entry, "no reply".into())));
        }
        out
    }

    fn out_of_range(&self, page: PageId) -> RemoteError {
        RemoteError::Bank(BankError::PageOutOfRange {
            location: self.location.clone(),
            page,
            page_count: self.meta.page_count(),
        })
    }

    /// The table entry of `page` (global id).
    pub fn entry(&self, page: PageId) -> Result<PageEntry, RemoteError> {
        usize::try_from(page)
            .ok()
            .and_then(|i| self.meta.pages.get(i))
            .copied()
            .ok_or_else(|| self.out_of_range(page))
    }

    fn page_fetch_error(&self, page: PageId, e: &PageEntry, message: String) -> RemoteError {
        RemoteError::Fetch {
            what: format!("page {page} (bytes {}..{})", e.offset, e.end()),
            location: self.location.clone(),
            message,
        }
    }

    /// Checks `bytes` against `page`'s length and checksum.
    pub fn verify(&self, page: PageId, e: &PageEntry, bytes: &[u8]) -> Result<(), RemoteError> {
        Ok(e.verify(page, bytes, &self.location)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::encode_header;
    use crate::{
        BankLayout, BankWriter, Dtype, Header, MAX_TABLE_LEN, MemSource, SectionSpec, VERSION,
    };
    use std::cell::RefCell;

    /// A fetcher over `bytes` that claims nothing about its length and
    /// records every range requested.
    struct Recording {
        bytes: Vec<u8>,
        ranges: RefCell<Vec<(u64, u64)>>,
    }

    impl PageFetch for Recording {
        fn location(&self) -> String {
            "mem://hostile.bank".into()
        }

        async fn read_range(&self, offset: u64, len: u64) -> Result<Vec<u8>, String> {
            self.ranges.borrow_mut().push((offset, len));
            let end = offset.checked_add(len).ok_or("overflow")?;
            let (Ok(a), Ok(b)) = (usize::try_from(offset), usize::try_from(end)) else {
                return Err("range too large".into());
            };
            self.bytes
                .get(a..b)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| format!("HTTP 416 for bytes {offset}..{end}"))
        }
    }

    #[test]
    fn a_header_claiming_a_huge_table_fails_before_the_table_is_requested() {
        let tib = 1u64 << 40;
        let header = encode_header(&Header {
            version: VERSION,
            page_align: 4096,
            section_count: 0,
            page_count: (tib - HEADER_LEN) / 24,
            file_len: tib,
            table_checksum: 0,
        });
        let fetch = Recording {
            bytes: header.to_vec(),
            ranges: RefCell::new(Vec::new()),
        };
        let err = match pollster::block_on(RemoteBank::open(fetch)) {
            Err(e) => e,
            Ok(_) => panic!("a 1 TiB table must be refused"),
        };
        assert!(
            matches!(
                err,
                RemoteError::Bank(BankError::TableTooLarge { limit, .. }) if limit == MAX_TABLE_LEN
            ),
            "{err}"
        );
        assert!(err.to_string().contains("mem://hostile.bank"), "{err}");
    }

    #[test]
    fn the_table_is_fetched_in_bounded_ranges_and_parsed_by_the_core() {
        // 200k pages of 4 bytes: a 4.8 MB table, two ranges.
        let rows = 200_000u64;
        let layout = BankLayout::new(vec![SectionSpec::pkm_values(rows, 1, 1, Dtype::F32)])
            .with_page_align(8);
        let mut w = BankWriter::new(std::io::Cursor::new(Vec::new()), &layout).expect("writer");
        w.write_rows(&vec![0.5; rows as usize]).expect("rows");
        let bytes = w.finish().expect("finish").into_inner();
        let fetch = Recording {
            bytes: bytes.clone(),
            ranges: RefCell::new(Vec::new()),
        };
        let bank = pollster::block_on(RemoteBank::open(fetch)).expect("open");
        let ranges = bank.fetcher().ranges.borrow().clone();
        let meta_len = HEADER_LEN + 64 + 24 * rows;
        assert_eq!(
            ranges,
            vec![
                (0, HEADER_LEN),
                (HEADER_LEN, TABLE_RANGE_BYTES),
                (
                    HEADER_LEN + TABLE_RANGE_BYTES,
                    meta_len - HEADER_LEN - TABLE_RANGE_BYTES
                )
            ]
        );
        assert_eq!(
            bank.meta(),
            &BankMeta::parse(&bytes, "mem://hostile.bank").expect("parse")
        );
        // The same bytes through SourceFetch open too.
        let native = SourceFetch(MemSource::named(bytes, "mem"));
        assert!(pollster::block_on(RemoteBank::open(native)).is_ok());
    }

    fn entry(offset: u64, length: u64) -> PageEntry {
        PageEntry {
            offset,
            length,
            checksum: 0,
        }
    }

    #[test]
    fn adjacent_pages_merge_into_bounded_runs() {
        let pages = [
            (0, entry(512, 512)),
            (1, entry(1024, 512)),
            (2, entry(1536, 512)),
            (7, entry(4096, 512)),
            (8, entry(4608, 512)),
            (20, entry(20_000, 512)),
        ];
        assert_eq!(adjacent_runs(&pages, 1 << 20), vec![0..3, 3..5, 5..6]);
        // the size cap splits a run
        assert_eq!(adjacent_runs(&pages, 1024), vec![0..2, 2..3, 3..5, 5..6]);
        assert!(adjacent_runs(&[], 1024).is_empty());
    }
}
