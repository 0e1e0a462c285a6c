//! Paged bank format v1: see `docs/FORMAT.md`.
//!
//! A bank file holds the shared product-key memory values and the
//! hierarchical FFN-memory blocks in **sections**, each cut into **pages**
//! (a run of value rows, or one block), every page aligned, listed in a page
//! table with its offset, length and xxh3-64 checksum.
//!
//! - [`format`]: the byte layout, [`BankLayout`] / [`SectionSpec`], pure parsers
//!   ([`BankMeta::parse`] works on a byte slice, for fuzzing; [`TableParser`]
//!   validates the page table incrementally, as its bytes arrive).
//! - [`writer`]: [`BankWriter`] (any `Write + Seek`) and [`BankFileWriter`]
//!   (atomic write to a path), streaming pages.
//! - [`source`]: the [`PageSource`] trait, [`FileSource`], [`MemSource`].
//! - [`reader`]: [`BankReader`], checksum-verified page reads, padding checks.
//! - [`codec`]: f32 ⇄ f32/f16/bf16.
//! - [`cache`]: the LRU page-to-slot policy under a byte budget, [`cache::bag_runs`].
//! - [`remote`]: the async page source: [`remote::PageFetch`] (byte ranges,
//!   futures need not be `Send`), [`remote::RemoteBank`] (validated table,
//!   verified page reads), [`remote::SourceFetch`] (any [`PageSource`]).
//! - [`pagein`]: [`pagein::PageIn`], the IO-free page-in engine (budget
//!   arithmetic, page table, runs of tokens, FFN-block state, one
//!   [`pagein::MemoryStats`] for native and browser).
//! - [`drive`]: its blocking (native, [`BankReader`]) and async (browser,
//!   [`remote::RemoteBank`]) drivers.
//!
//! ```
//! use memlayer_bank::*;
//! let layout = BankLayout::new(vec![SectionSpec::pkm_values(5, 2, 2, Dtype::F16)]);
//! let mut w = BankWriter::new(std::io::Cursor::new(Vec::new()), &layout).unwrap();
//! w.write_rows(&[0.5; 10]).unwrap();
//! let bytes = w.finish().unwrap().into_inner();
//! let bank = BankReader::open(MemSource::new(bytes)).unwrap();
//! assert_eq!(bank.page_count(), 3);
//! assert_eq!(bank.read_page_f32(2).unwrap(), vec![0.5, 0.5]);
//! ```

pub mod cache;
pub mod codec;
pub mod drive;
pub mod error;
pub mod format;
pub mod multipart;
pub mod pagein;
pub mod reader;
pub mod remote;
pub mod source;
pub mod writer;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_hostile;

pub use codec::{decode, decode_into, encode, encode_into, round_trip};
pub use error::{BankError, Region};
pub use format::{
    BankLayout, BankMeta, DEFAULT_PAGE_ALIGN, Dtype, Geometry, HEADER_LEN, Header, MAGIC,
    MAX_PAGE_LEN, MAX_TABLE_LEN, PAGE_ENTRY_LEN, PageEntry, PageId, Plan, READ_CHUNK_LEN,
    SECTION_DESC_LEN, SectionInfo, SectionKind, SectionSpec, TableParser, VERSION,
};
pub use pagein::{MemoryStats, PageIn, PageInError, PageInOptions};
pub use reader::BankReader;
pub use remote::{FetchedPage, PageFetch, RemoteBank, RemoteError, SourceFetch};
pub use source::{FileSource, MemSource, PageSource, SourceError};
pub use writer::{BankFileWriter, BankWriter};

/// Bytes of a bank with `sections` held fully resident, as the runtimes
/// hold it: product-key values in their stored dtype (every slot pool keeps
/// an f16/bf16 bank 16-bit: [`pagein::ValueGeometry::slot_bytes`]) and FFN
/// blocks as f32 (unpacked into the model's blocks when fetched). What a
/// budget in percent is a percent of, natively and in the browser: a 25 %
/// budget of an f16 bank holds the same fraction of its value pages as 25 %
/// of the same bank stored as f32, in half the bytes.
pub fn resident_bytes(sections: &[SectionInfo]) -> u64 {
    sections
        .iter()
        .map(|s| {
            let elem = match s.spec.kind {
                SectionKind::PkmValues { .. } => s.spec.dtype.size() as u64,
                SectionKind::FfnBlocks { .. } => 4,
            };
            s.geometry.rows * u64::from(s.geometry.dim) * elem
        })
        .sum()
}
