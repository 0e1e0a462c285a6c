//! The memory bank read remotely: its header and page table are fetched
//! once, its pages on demand, each verified against the table's checksum.
//!
//! [`PageFetch`] is where bytes come from: in the browser `fetch` with a
//! `Range` header and the Cache API as a local copy (`web.rs`), natively any
//! [`PageSource`] (a file, memory) through [`SourceFetch`] — the path the
//! native tests take through the same code.

use crate::WebError;
use memlayer_core::bank::format::parse_header;
use memlayer_core::bank::{
    BankError, BankMeta, HEADER_LEN, PageEntry, PageId, PageSource, SectionInfo,
};

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
    /// Fetches and validates the header and page table (two range reads).
    pub async fn open(fetch: F) -> Result<Self, WebError> {
        let location = fetch.location();
        let fetch_err = |what: &str, e: String| WebError::Fetch {
            what: what.to_string(),
            location: location.clone(),
            message: e,
        };
        let mut bytes = fetch
            .read_range(0, HEADER_LEN)
            .await
            .map_err(|e| fetch_err("the bank header", e))?;
        let header = parse_header(&bytes, &location)?;
        let meta_len = header.meta_len().ok_or_else(|| BankError::CorruptHeader {
            location: location.clone(),
            offset: 0,
            reason: "page table length overflows".into(),
        })?;
        let table = fetch
            .read_range(HEADER_LEN, meta_len - HEADER_LEN)
            .await
            .map_err(|e| fetch_err("the bank's page table", e))?;
        bytes.extend_from_slice(&table);
        let meta = BankMeta::parse(&bytes, &location)?;
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
    pub async fn read_pages(&self, pages: &[PageId]) -> Vec<Result<FetchedPage, WebError>> {
        let mut entries = Vec::with_capacity(pages.len());
        for &p in pages {
            match self.entry(p) {
                Ok(e) => entries.push((p, e)),
                Err(e) => {
                    let msg = e.to_string();
                    return pages
                        .iter()
                        .map(|_| Err(WebError::Input(msg.clone())))
                        .collect();
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
        out
    }

    fn entry(&self, page: PageId) -> Result<PageEntry, WebError> {
        usize::try_from(page)
            .ok()
            .and_then(|i| self.meta.pages.get(i))
            .copied()
            .ok_or_else(|| {
                WebError::Bank(BankError::PageOutOfRange {
                    location: self.location.clone(),
                    page,
                    page_count: self.meta.page_count(),
                })
            })
    }

    fn page_fetch_error(&self, page: PageId, e: &PageEntry, message: String) -> WebError {
        WebError::Fetch {
            what: format!("page {page} (bytes {}..{})", e.offset, e.end()),
            location: self.location.clone(),
            message,
        }
    }

    /// Checks `bytes` against `page`'s length and checksum.
    pub fn verify(&self, page: PageId, e: &PageEntry, bytes: &[u8]) -> Result<(), WebError> {
        Ok(e.verify(page, bytes, &self.location)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
