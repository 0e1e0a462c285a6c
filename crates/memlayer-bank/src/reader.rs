//! Bank reader: validates the header and page table once, then reads and
//! checksum-verifies pages on demand from any [`PageSource`].

use super::codec::decode_into;
use super::error::{BankError, Region};
use super::format::{
    BankMeta, HEADER_LEN, Header, PageEntry, PageId, READ_CHUNK_LEN, SectionInfo, TableParser,
    check_source_len, parse_header,
};
use super::source::{PageSource, SourceError};

/// An opened bank: validated metadata plus the source to read pages from.
///
/// Opening reads only the header and page table. Pages are read one at a
/// time, and every read is checked against the page's checksum.
#[derive(Debug)]
pub struct BankReader<S: PageSource = Box<dyn PageSource>> {
    source: S,
    location: String,
    source_len: u64,
    meta: BankMeta,
}

impl<S: PageSource> BankReader<S> {
    /// Reads and validates the header and page table of `source`.
    ///
    /// Fails with `BadMagic`, `UnsupportedVersion`, `CorruptHeader`,
    /// `TableTooLarge`, `CorruptTable`, `Truncated` (header or table cut
    /// off) or `Source`. A source that is shorter than the header's file
    /// length but holds the whole table opens; reads of the missing pages
    /// fail with `Truncated` (see [`BankReader::first_truncated_page`]).
    ///
    /// The table is read in pieces of at most [`READ_CHUNK_LEN`] bytes (the
    /// section descriptors first, then the page entries) and validated as
    /// they arrive by a [`TableParser`], so a garbage table fails at its
    /// first bad piece and memory grows only with the entries validated,
    /// never with what the header or the source's reported length claim.
    pub fn open(source: S) -> Result<Self, BankError> {
        Self::open_chunked(source, READ_CHUNK_LEN)
    }

    /// [`BankReader::open`] reading the table in pieces of at most `chunk`
    /// bytes (at least 1).
    pub(crate) fn open_chunked(source: S, chunk: usize) -> Result<Self, BankError> {
        let location = source.describe();
        let src_err = |region, offset, length, source: SourceError| BankError::Source {
            location: location.clone(),
            region,
            offset,
            length,
            source,
        };
        let source_len = source
            .len()
            .map_err(|e| src_err(Region::Header, 0, HEADER_LEN, e))?;
        let head_len = source_len.min(HEADER_LEN) as usize;
        let mut head = vec![0u8; head_len];
        source
            .read_at(0, &mut head)
            .map_err(|e| src_err(Region::Header, 0, head_len as u64, e))?;
        // Also refuses a table longer than MAX_TABLE_LEN (TableTooLarge).
        let header = parse_header(&head, &location)?;
        check_source_len(&header, source_len, &location)?;
        let mut parser = TableParser::new(&header, &location)?;
        let mut buf = Vec::new();
        loop {
            let n = parser.next_read_len(chunk);
            if n == 0 {
                break;
            }
            let offset = parser.offset();
            buf.resize(n, 0);
            source
                .read_at(offset, &mut buf)
                .map_err(|e| src_err(Region::Table, offset, n as u64, e))?;
            parser.push(&buf)?;
        }
        let meta = parser.finish()?;
        Ok(Self {
            source,
            location,
            source_len,
            meta,
        })
    }

    /// The validated header, sections and page table.
    pub fn meta(&self) -> &BankMeta {
        &self.meta
    }

    /// The decoded header.
    pub fn header(&self) -> &Header {
        &self.meta.header
    }

    /// Sections in file order.
    pub fn sections(&self) -> &[SectionInfo] {
        &self.meta.sections
    }

    /// The page table, indexed by page id.
    pub fn pages(&self) -> &[PageEntry] {
        &self.meta.pages
    }

    /// Number of pages.
    pub fn page_count(&self) -> u64 {
        self.meta.page_count()
    }

    /// The source.
    pub fn source(&self) -> &S {
        &self.source
    }

    /// The source's path or URL.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Length of the source when it was opened.
    pub fn source_len(&self) -> u64 {
        self.source_len
    }

    /// First page whose bytes are missing from the source (a truncated file).
    pub fn first_truncated_page(&self) -> Option<PageId> {
        self.meta.first_truncated_page(self.source_len)
    }

    /// The page-table entry of `page`.
    pub fn page(&self, page: PageId) -> Result<&PageEntry, BankError> {
        usize::try_from(page)
            .ok()
            .and_then(|i| self.meta.pages.get(i))
            .ok_or_else(|| BankError::PageOutOfRange {
                location: self.location.clone(),
                page,
                page_count: self.page_count(),
            })
    }

    /// The section holding `page` and the page's index inside it.
    pub fn section_of_page(&self, page: PageId) -> Result<(&SectionInfo, u64), BankError> {
        self.meta
            .section_of_page(page)
            .ok_or_else(|| BankError::PageOutOfRange {
                location: self.location.clone(),
                page,
                page_count: self.page_count(),
            })
    }

    /// Reads `page` into `buf` (resized to the page length) and verifies its checksum.
    pub fn read_page_into(&self, page: PageId, buf: &mut Vec<u8>) -> Result<(), BankError> {
        let e = *self.page(page)?;
        let region = Region::Page(page);
        if e.end() > self.source_len {
            return Err(BankError::Truncated {
                location: self.location.clone(),
                region,
                offset: e.offset,
                end: e.end(),
                source_len: self.source_len,
            });
        }
        // The page lies inside the source, so its length fits memory bounds
        // of the source itself (and `usize`, checked by the parser).
        buf.clear();
        buf.resize(e.length as usize, 0);
        self.source
            .read_at(e.offset, buf)
            .map_err(|source| BankError::Source {
                location: self.location.clone(),
                region,
                offset: e.offset,
                length: e.length,
                source,
            })?;
        e.verify(page, buf, &self.location)
    }

    /// Reads several pages with one [`PageSource::read_ranges`] call (an
    /// HTTP source sends them as few requests as it can) and verifies each
    /// against its checksum: one result per page, in order, each error
    /// naming its page (out of range, truncated, a failed read, a checksum).
    pub fn read_pages(&self, pages: &[PageId]) -> Vec<Result<Vec<u8>, BankError>> {
        let mut out: Vec<Option<Result<Vec<u8>, BankError>>> = Vec::with_capacity(pages.len());
        let mut asked = Vec::new(); // (index in pages, entry)
        for (i, &page) in pages.iter().enumerate() {
            let e = match self.page(page) {
                Ok(e) => *e,
                Err(err) => {
                    out.push(Some(Err(err)));
                    continue;
                }
            };
            if e.end() > self.source_len {
                out.push(Some(Err(BankError::Truncated {
                    location: self.location.clone(),
                    region: Region::Page(page),
                    offset: e.offset,
                    end: e.end(),
                    source_len: self.source_len,
                })));
                continue;
            }
            out.push(None);
            asked.push((i, e));
        }
        let ranges: Vec<(u64, u64)> = asked.iter().map(|(_, e)| (e.offset, e.length)).collect();
        let read = self.source.read_ranges(&ranges);
        for ((i, e), r) in asked.into_iter().zip(read) {
            let page = pages[i];
            out[i] = Some(
                r.map_err(|source| BankError::Source {
                    location: self.location.clone(),
                    region: Region::Page(page),
                    offset: e.offset,
                    length: e.length,
                    source,
                })
                .and_then(|bytes| {
                    // a source that returns the wrong length is caught by the checksum too
                    e.verify(page, &bytes, &self.location).map(|()| bytes)
                }),
            );
        }
        out.into_iter()
            .zip(pages)
            .map(|(r, &page)| {
                // every page got a result above; this is never reached
                r.unwrap_or_else(|| {
                    Err(BankError::PageOutOfRange {
                        location: self.location.clone(),
                        page,
                        page_count: self.page_count(),
                    })
                })
            })
            .collect()
    }

    /// [`BankReader::read_pages`] decoded to f32.
    pub fn read_pages_f32(&self, pages: &[PageId]) -> Vec<Result<Vec<f32>, BankError>> {
        self.read_pages(pages)
            .into_iter()
            .zip(pages)
            .map(|(r, &page)| {
                let bytes = r?;
                self.decode_page(page, &bytes)
            })
            .collect()
    }

    /// Reads `page` and verifies its checksum; returns its raw bytes
    /// (the section's dtype, little-endian, `rows × dim` elements).
    pub fn read_page(&self, page: PageId) -> Result<Vec<u8>, BankError> {
        let mut buf = Vec::new();
        self.read_page_into(page, &mut buf)?;
        Ok(buf)
    }

    /// Reads `page`, verifies it, and decodes it to f32: `rows × dim` values, row-major.
    pub fn read_page_f32(&self, page: PageId) -> Result<Vec<f32>, BankError> {
        let bytes = self.read_page(page)?;
        self.decode_page(page, &bytes)
    }

    /// A verified page's bytes decoded from its section's dtype to f32.
    fn decode_page(&self, page: PageId, bytes: &[u8]) -> Result<Vec<f32>, BankError> {
        let dtype = self.section_of_page(page)?.0.spec.dtype;
        let mut out = vec![0.0; bytes.len() / dtype.size()];
        decode_into(dtype, bytes, &mut out)?;
        Ok(out)
    }

    /// Row `row` of section `section` as f32 (reads and verifies its whole page).
    pub fn read_row(&self, section: usize, row: u64) -> Result<Vec<f32>, BankError> {
        let s = self.meta.sections.get(section).ok_or_else(|| {
            BankError::InvalidInput(format!(
                "{}: section {section} out of range ({} sections)",
                self.location,
                self.meta.sections.len()
            ))
        })?;
        let (page, in_page) = s.locate_row(row).ok_or_else(|| {
            BankError::InvalidInput(format!(
                "{}: row {row} out of range for section {section} of {} rows",
                self.location, s.geometry.rows
            ))
        })?;
        let dim = s.geometry.dim as usize;
        let values = self.read_page_f32(page)?;
        let start = in_page as usize * dim;
        Ok(values[start..start + dim].to_vec())
    }

    /// Reads and verifies every page and every padding byte, in file
    /// order; the first failure is returned. `progress` is called after
    /// each page with the number of pages done.
    ///
    /// Pages must match their checksums ([`BankReader::read_page`]); the
    /// padding before each page (after the table, or after the previous
    /// page) must be zero (see [`BankReader::verify_padding`]).
    pub fn verify_all(&self, mut progress: impl FnMut(u64)) -> Result<(), BankError> {
        let mut buf = Vec::new();
        for page in 0..self.page_count() {
            self.verify_gap_before(page, &mut buf)?;
            self.read_page_into(page, &mut buf)?;
            progress(page + 1);
        }
        Ok(())
    }

    /// Reads the padding (the bytes between the end of the page table and
    /// the first page, and between consecutive pages) in pieces of at most
    /// [`READ_CHUNK_LEN`] bytes and checks that every byte is zero.
    ///
    /// Fails with `NonZeroPadding` naming the offset and value of the first
    /// non-zero byte, `Truncated` naming the page whose padding (and so the
    /// page itself) is cut off, or `Source`. Pages are not read.
    pub fn verify_padding(&self) -> Result<(), BankError> {
        let mut buf = Vec::new();
        for page in 0..self.page_count() {
            self.verify_gap_before(page, &mut buf)?;
        }
        Ok(())
    }

    /// Total bytes of padding: the file length minus the table and the pages.
    pub fn padding_len(&self) -> u64 {
        let pages: u64 = self.meta.pages.iter().map(|e| e.length).sum();
        self.meta
            .header
            .file_len
            .saturating_sub(self.meta.meta_len())
            .saturating_sub(pages)
    }

    /// Checks that the bytes between the previous page (or the table) and
    /// `page` are zero.
    fn verify_gap_before(&self, page: PageId, buf: &mut Vec<u8>) -> Result<(), BankError> {
        let e = *self.page(page)?;
        let (start, after) = match page.checked_sub(1) {
            None => (self.meta.meta_len(), Region::Table),
            Some(prev) => (self.page(prev)?.end(), Region::Page(prev)),
        };
        if e.offset > self.source_len {
            // The padding, and so the page after it, is cut off.
            return Err(BankError::Truncated {
                location: self.location.clone(),
                region: Region::Page(page),
                offset: e.offset,
                end: e.end(),
                source_len: self.source_len,
            });
        }
        let mut at = start;
        while at < e.offset {
            // At most READ_CHUNK_LEN, so it fits usize.
            let n = (e.offset - at).min(READ_CHUNK_LEN as u64) as usize;
            buf.clear();
            buf.resize(n, 0);
            self.source
                .read_at(at, buf)
                .map_err(|source| BankError::Source {
                    location: self.location.clone(),
                    region: Region::Page(page),
                    offset: at,
                    length: n as u64,
                    source,
                })?;
            if let Some(i) = buf.iter().position(|&b| b != 0) {
                return Err(BankError::NonZeroPadding {
                    location: self.location.clone(),
                    after,
                    offset: at + i as u64,
                    byte: buf[i],
                });
            }
            at += n as u64;
        }
        Ok(())
    }
}
