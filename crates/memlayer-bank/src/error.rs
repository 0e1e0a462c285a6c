//! Typed errors of the bank format, its writers and readers.
//!
//! Every read error names the source (path or URL), the region (header, page
//! table, or page id), the byte offset and the reason.

use std::fmt;

use super::format::PageId;
use super::source::SourceError;

/// The part of a bank file an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Region {
    /// The fixed 64-byte header.
    Header,
    /// Section descriptors and page table.
    Table,
    /// A page, by global id.
    Page(PageId),
}

impl Region {
    /// The page id, if the region is a page.
    pub fn page(&self) -> Option<PageId> {
        match self {
            Region::Page(p) => Some(*p),
            _ => None,
        }
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Region::Header => f.write_str("header"),
            Region::Table => f.write_str("page table"),
            Region::Page(p) => write!(f, "page {p}"),
        }
    }
}

/// `67 61 72 62 ("garb")`: hex bytes and their lossy text.
fn show_bytes(b: &[u8]) -> String {
    let hex: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{} ({:?})", hex.join(" "), String::from_utf8_lossy(b))
}

/// `about 11184808 pages`: how many page entries fit a table of `limit` bytes.
fn pages_in(limit: &u64) -> String {
    format!("about {} pages", limit / super::format::PAGE_ENTRY_LEN)
}

/// `the page table` or `page 3`.
fn after_what(region: &Region) -> String {
    match region {
        Region::Table => "the page table".into(),
        other => other.to_string(),
    }
}

fn entry_of(page: &Option<PageId>) -> String {
    match page {
        Some(p) => format!(" (entry of page {p})"),
        None => String::new(),
    }
}

/// An error reading, validating or writing a bank.
#[derive(Debug, thiserror::Error)]
pub enum BankError {
    /// The source does not start with the bank magic.
    #[error("{location}: not a memlayer bank: bad magic {} at byte offset 0 (expected {:?})", show_bytes(.found), String::from_utf8_lossy(&super::format::MAGIC))]
    BadMagic {
        /// Path or URL.
        location: String,
        /// The first (up to 8) bytes found.
        found: Vec<u8>,
    },
    /// The file's format version is not one this reader knows.
    #[error(
        "{location}: unsupported bank format version {version} at byte offset 8 (this reader supports version {})",
        super::format::VERSION
    )]
    UnsupportedVersion {
        /// Path or URL.
        location: String,
        /// Version found in the header.
        version: u32,
    },
    /// The header is inconsistent or its checksum does not match.
    #[error("{location}: corrupt header at byte offset {offset}: {reason}")]
    CorruptHeader {
        /// Path or URL.
        location: String,
        /// File offset of the offending field.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A section descriptor or page-table entry is invalid, or the table checksum does not match.
    #[error("{location}: corrupt page table at byte offset {offset}{}: {reason}", entry_of(.page))]
    CorruptTable {
        /// Path or URL.
        location: String,
        /// File offset of the offending field.
        offset: u64,
        /// The page whose entry is wrong, if the error is about one entry.
        page: Option<PageId>,
        /// What is wrong.
        reason: String,
    },
    /// The header claims a page table longer than
    /// [`super::format::MAX_TABLE_LEN`]; nothing of it is read or allocated.
    #[error(
        "{location}: header at byte offset 20 claims {section_count} sections and {page_count} pages, a page table of {table_len} bytes, more than the {limit} bytes ({}) a reader accepts",
        pages_in(.limit)
    )]
    TableTooLarge {
        /// Path or URL.
        location: String,
        /// Section count in the header.
        section_count: u32,
        /// Page count in the header.
        page_count: u64,
        /// Table length the counts give (`64*S + 24*P`).
        table_len: u64,
        /// The largest table accepted ([`super::format::MAX_TABLE_LEN`]).
        limit: u64,
    },
    /// A padding byte (between the table and the first page, or between
    /// pages) is not zero.
    #[error(
        "{location}: padding after {} at byte offset {offset} is {byte:#04x}, not zero",
        after_what(.after)
    )]
    NonZeroPadding {
        /// Path or URL.
        location: String,
        /// What the padding follows: the page table, or a page.
        after: Region,
        /// File offset of the first non-zero padding byte.
        offset: u64,
        /// Its value.
        byte: u8,
    },
    /// The source ends before the bytes of `region`.
    #[error(
        "{location}: {region} at byte offset {offset} is truncated: it needs bytes {offset}..{end} but the source is only {source_len} bytes long"
    )]
    Truncated {
        /// Path or URL.
        location: String,
        /// What is cut off (header, page table, or the first affected page).
        region: Region,
        /// Start of the region.
        offset: u64,
        /// End (exclusive) of the region.
        end: u64,
        /// Actual length of the source.
        source_len: u64,
    },
    /// A page's bytes do not hash to the checksum in the page table.
    #[error(
        "{location}: page {page} at byte offset {offset} (length {length}): checksum mismatch: expected {expected:#018x}, got {got:#018x}"
    )]
    ChecksumMismatch {
        /// Path or URL.
        location: String,
        /// Global page id.
        page: PageId,
        /// Offset of the page.
        offset: u64,
        /// Length of the page.
        length: u64,
        /// Checksum in the page table.
        expected: u64,
        /// Checksum of the bytes read.
        got: u64,
    },
    /// A page id past the end of the page table.
    #[error("{location}: page {page} is out of range: the bank has {page_count} pages")]
    PageOutOfRange {
        /// Path or URL.
        location: String,
        /// Requested page id.
        page: PageId,
        /// Number of pages in the bank.
        page_count: u64,
    },
    /// The page source failed (I/O error, network error, ...).
    #[error(
        "{location}: reading {region} ({length} bytes at byte offset {offset}) failed: {source}"
    )]
    Source {
        /// Path or URL.
        location: String,
        /// What was being read.
        region: Region,
        /// Offset of the read.
        offset: u64,
        /// Length of the read.
        length: u64,
        /// The source's error.
        #[source]
        source: SourceError,
    },
    /// A bank layout given to a writer is invalid.
    #[error("invalid bank layout: {0}")]
    InvalidLayout(String),
    /// Data given to a writer or decoder has the wrong size or comes in the wrong order.
    #[error("{0}")]
    InvalidInput(String),
    /// Writing the bank failed.
    #[error("{location}: writing the bank failed: {source}")]
    Write {
        /// Path (or a description of the writer).
        location: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl BankError {
    /// The page the error is about, if any.
    pub fn page(&self) -> Option<PageId> {
        match self {
            BankError::CorruptTable { page, .. } => *page,
            BankError::Truncated { region, .. } | BankError::Source { region, .. } => region.page(),
            BankError::ChecksumMismatch { page, .. } | BankError::PageOutOfRange { page, .. } => {
                Some(*page)
            }
            _ => None,
        }
    }
}
