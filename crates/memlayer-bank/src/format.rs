//! Byte layout of bank format v1 (see `docs/FORMAT.md`) and its pure parsers.
//!
//! ```text
//! [0, 64)                      header (fixed size)
//! [64, 64 + 64*S)              S section descriptors (64 bytes each)
//! [.., meta_len)               P page-table entries (24 bytes each)
//! [align_up(meta_len), ..)     pages, each starting on a `page_align` boundary,
//!                              zero padding between pages
//! ```
//! Everything is little-endian. Every function here works on byte slices
//! only, so the parser can be fuzzed without any I/O.

use std::fmt;
use std::str::FromStr;

use xxhash_rust::xxh3::Xxh3Default;

use super::error::{BankError, Region};

/// File magic, bytes 0..8 of every bank.
pub const MAGIC: [u8; 8] = *b"MEMLBANK";
/// The format version this crate writes and reads.
pub const VERSION: u32 = 1;
/// Size of the fixed header in bytes.
pub const HEADER_LEN: u64 = 64;
/// Size of one section descriptor in bytes.
pub const SECTION_DESC_LEN: u64 = 64;
/// Size of one page-table entry in bytes.
pub const PAGE_ENTRY_LEN: u64 = 24;
/// Default page alignment (a typical OS page, so pages can be mapped/uploaded directly).
pub const DEFAULT_PAGE_ALIGN: u32 = 4096;
/// Smallest accepted page alignment.
pub const MIN_PAGE_ALIGN: u32 = 8;
/// Largest accepted page alignment (16 MiB).
pub const MAX_PAGE_ALIGN: u32 = 1 << 24;
/// Largest page table a reader accepts: bytes `[64, meta_len)` (section
/// descriptors and page entries), 256 MiB, room for about 11.18 million
/// pages (`(2^28 - 64*S) / 24`).
///
/// The header's counts are checked against it before anything else is read
/// (`BankError::TableTooLarge`), so a header that claims a huge table never
/// makes a reader fetch or allocate it. See `docs/FORMAT.md` §7.1 for why the
/// number is generous for real banks.
pub const MAX_TABLE_LEN: u64 = 1 << 28;
/// Largest page a bank may have: 256 MiB. A page is read (and allocated)
/// whole, so its length must not be left to the file: the largest real page
/// is one hierarchical-memory block (`layers × 3 × units × dim` values; a
/// 4096-wide model with 4096 units per block in f32 is 192 MiB). Checked in
/// [`SectionSpec::geometry`], so writers refuse such a section and readers
/// refuse a table that describes one before any page is read.
pub const MAX_PAGE_LEN: u64 = 1 << 28;
/// Largest single read (and buffer) a reader makes while it reads the page
/// table ([`super::BankReader::open`]) or checks the padding between pages
/// ([`super::BankReader::verify_padding`]): 1 MiB.
pub const READ_CHUNK_LEN: usize = 1 << 20;

/// Section kind code of a product-key values table.
pub const KIND_PKM_VALUES: u32 = 1;
/// Section kind code of a level of FFN-memory blocks.
pub const KIND_FFN_BLOCKS: u32 = 2;

/// Global page id: pages are numbered from 0 across all sections, in file order.
pub type PageId = u64;

/// Element type of a section's values on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// IEEE-754 binary32 (code 1).
    F32,
    /// IEEE-754 binary16 (code 2).
    F16,
    /// bfloat16: the upper 16 bits of a binary32 (code 3).
    Bf16,
}

impl Dtype {
    /// All dtypes, in code order.
    pub const ALL: [Dtype; 3] = [Dtype::F32, Dtype::F16, Dtype::Bf16];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }

    /// The on-disk code (u32 at byte 4 of a section descriptor).
    pub fn code(self) -> u32 {
        match self {
            Dtype::F32 => 1,
            Dtype::F16 => 2,
            Dtype::Bf16 => 3,
        }
    }

    /// The dtype of an on-disk code, if known.
    pub fn from_code(code: u32) -> Option<Dtype> {
        match code {
            1 => Some(Dtype::F32),
            2 => Some(Dtype::F16),
            3 => Some(Dtype::Bf16),
            _ => None,
        }
    }

    /// Lower-case name: `f32`, `f16` or `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Dtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(Dtype::F32),
            "f16" => Ok(Dtype::F16),
            "bf16" => Ok(Dtype::Bf16),
            other => Err(format!(
                "unknown dtype `{other}` (expected f32, f16 or bf16)"
            )),
        }
    }
}

/// What a section holds and its shape.
///
/// Every section is a sequence of rows of `dim` values, grouped into pages;
/// the kind gives the rows their meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SectionKind {
    /// Product-key memory values `V: (rows, dim)`, row-major. A page is a run
    /// of `page_rows` consecutive rows; the last page holds the remainder.
    PkmValues {
        /// Number of value rows `N` (`n_keys^2`).
        rows: u64,
        /// Values per row (`v_dim`).
        dim: u32,
        /// Rows per page (the last page may hold fewer).
        page_rows: u32,
    },
    /// FFN-memory blocks of one tree level: `nodes` blocks, one page each.
    ///
    /// A block is `f[layers][3][units][dim]`: for layer `l` and unit `u`,
    /// `[l][0][u]` is row `u` of the gate matrix `(units, dim)`, `[l][1][u]`
    /// row `u` of the up matrix `(units, dim)`, and `[l][2][u]` column `u` of
    /// the down matrix `(dim, units)`. So a page is `layers*3*units` rows of `dim`.
    FfnBlocks {
        /// Level of the cluster tree (0 = root's children, or any numbering the model uses).
        level: u32,
        /// Number of blocks (tree nodes) at this level.
        nodes: u64,
        /// Transformer layers per block.
        layers: u32,
        /// Extra SwiGLU hidden units per layer (`r_l`).
        units: u32,
        /// Model width `d`.
        dim: u32,
    },
}

impl SectionKind {
    /// The on-disk kind code.
    pub fn code(&self) -> u32 {
        match self {
            SectionKind::PkmValues { .. } => KIND_PKM_VALUES,
            SectionKind::FfnBlocks { .. } => KIND_FFN_BLOCKS,
        }
    }

    /// `pkm_values` or `ffn_blocks`.
    pub fn name(&self) -> &'static str {
        match self {
            SectionKind::PkmValues { .. } => "pkm_values",
            SectionKind::FfnBlocks { .. } => "ffn_blocks",
        }
    }

    /// Values per row.
    pub fn dim(&self) -> u32 {
        match *self {
            SectionKind::PkmValues { dim, .. } | SectionKind::FfnBlocks { dim, .. } => dim,
        }
    }
}

/// One section of a bank layout: what it holds and how it is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SectionSpec {
    /// Kind and shape.
    pub kind: SectionKind,
    /// On-disk element type (writers convert f32 input to it).
    pub dtype: Dtype,
}

impl SectionSpec {
    /// A `pkm_values` section of `rows x dim` values, `page_rows` rows per page.
    pub fn pkm_values(rows: u64, dim: u32, page_rows: u32, dtype: Dtype) -> Self {
        Self {
            kind: SectionKind::PkmValues {
                rows,
                dim,
                page_rows,
            },
            dtype,
        }
    }

    /// An `ffn_blocks` section: `nodes` blocks of `f[layers][3][units][dim]`.
    pub fn ffn_blocks(
        level: u32,
        nodes: u64,
        layers: u32,
        units: u32,
        dim: u32,
        dtype: Dtype,
    ) -> Self {
        Self {
            kind: SectionKind::FfnBlocks {
                level,
                nodes,
                layers,
                units,
                dim,
            },
            dtype,
        }
    }

    /// Checked geometry of the section, or why the shape is invalid.
    pub fn geometry(&self) -> Result<Geometry, String> {
        let dim = self.kind.dim();
        if dim == 0 {
            return Err("dim is 0".into());
        }
        let row_bytes = u64::from(dim) * self.dtype.size() as u64;
        let (rows, page_rows) = match self.kind {
            SectionKind::PkmValues {
                rows, page_rows, ..
            } => {
                if rows == 0 {
                    return Err("rows is 0".into());
                }
                if page_rows == 0 {
                    return Err("page_rows is 0".into());
                }
                (rows, u64::from(page_rows))
            }
            SectionKind::FfnBlocks {
                nodes,
                layers,
                units,
                ..
            } => {
                if nodes == 0 || layers == 0 || units == 0 {
                    return Err(format!(
                        "empty block shape (nodes {nodes}, layers {layers}, units {units})"
                    ));
                }
                // (layers * 3) fits u64; times units may not.
                let per_block = (u64::from(layers) * 3)
                    .checked_mul(u64::from(units))
                    .ok_or_else(|| format!("{layers} layers x 3 x {units} units overflow u64"))?;
                let rows = nodes
                    .checked_mul(per_block)
                    .ok_or_else(|| format!("{nodes} blocks of {per_block} rows overflow u64"))?;
                (rows, per_block)
            }
        };
        let page_bytes = page_rows
            .checked_mul(row_bytes)
            .filter(|&b| b <= MAX_PAGE_LEN && usize::try_from(b).is_ok())
            .ok_or_else(|| {
                format!(
                    "a page of {page_rows} rows x {row_bytes} bytes is larger than the \
                     {MAX_PAGE_LEN}-byte limit (MAX_PAGE_LEN)"
                )
            })?;
        let page_count = rows.div_ceil(page_rows);
        let last_rows = rows - (page_count - 1) * page_rows;
        rows.checked_mul(row_bytes)
            .ok_or_else(|| format!("section of {rows} rows x {row_bytes} bytes overflows u64"))?;
        Ok(Geometry {
            rows,
            dim,
            row_bytes,
            page_rows,
            page_bytes,
            page_count,
            last_page_rows: last_rows,
        })
    }
}

/// Derived, overflow-checked sizes of a section.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Geometry {
    /// Total rows in the section (`nodes*layers*3*units` for blocks).
    pub rows: u64,
    /// Values per row.
    pub dim: u32,
    /// Bytes per row on disk (`dim * dtype.size()`).
    pub row_bytes: u64,
    /// Rows of every page but possibly the last.
    pub page_rows: u64,
    /// Bytes of a full page (`page_rows * row_bytes`); fits `usize`.
    pub page_bytes: u64,
    /// Number of pages (`ceil(rows / page_rows)`, >= 1).
    pub page_count: u64,
    /// Rows of the last page (`1..=page_rows`).
    pub last_page_rows: u64,
}

impl Geometry {
    /// Rows held by local page `local` (0-based within the section); 0 if out of range.
    pub fn rows_in_page(&self, local: u64) -> u64 {
        if local < self.page_count.saturating_sub(1) {
            self.page_rows
        } else if self.page_count > 0 && local == self.page_count - 1 {
            self.last_page_rows
        } else {
            0
        }
    }

    /// Bytes of local page `local`; 0 if out of range.
    pub fn page_len(&self, local: u64) -> u64 {
        self.rows_in_page(local).saturating_mul(self.row_bytes)
    }
}

/// A validated section of an opened or planned bank.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SectionInfo {
    /// Position of the section in the file's section table.
    pub index: usize,
    /// Kind, shape and dtype.
    pub spec: SectionSpec,
    /// Global id of the section's first page.
    pub first_page: PageId,
    /// Derived sizes.
    pub geometry: Geometry,
}

impl SectionInfo {
    /// The kind, dtype and shape in words, as `memlayer inspect` prints them:
    /// `pkm_values f16: 1000 rows x 16, 64 rows per page (last page 40 rows)`,
    /// `ffn_blocks f32: level 1, 3 blocks of [2 layers][3][4 units][16], one block per page`.
    pub fn shape_summary(&self) -> String {
        let (kind, dtype, dim) = (self.spec.kind, self.spec.dtype, self.spec.kind.dim());
        match kind {
            SectionKind::PkmValues {
                rows, page_rows, ..
            } => format!(
                "pkm_values {dtype}: {rows} rows x {dim}, {page_rows} rows per page (last page {} rows)",
                self.geometry.last_page_rows
            ),
            SectionKind::FfnBlocks {
                level,
                nodes,
                layers,
                units,
                ..
            } => format!(
                "ffn_blocks {dtype}: level {level}, {nodes} blocks of [{layers} layers][3][{units} units][{dim}], one block per page"
            ),
        }
    }

    /// Number of pages of the section.
    pub fn page_count(&self) -> u64 {
        self.geometry.page_count
    }

    /// Global page ids of the section.
    pub fn page_ids(&self) -> std::ops::Range<PageId> {
        self.first_page..self.first_page.saturating_add(self.geometry.page_count)
    }

    /// Global page holding section row `row` and the row's index inside that page.
    pub fn locate_row(&self, row: u64) -> Option<(PageId, u64)> {
        if row >= self.geometry.rows {
            return None;
        }
        let page = self
            .first_page
            .checked_add(row.checked_div(self.geometry.page_rows)?)?;
        Some((page, row % self.geometry.page_rows))
    }

    /// Global page of block `node` of an `ffn_blocks` section (None for other kinds).
    pub fn block_page(&self, node: u64) -> Option<PageId> {
        match self.spec.kind {
            SectionKind::FfnBlocks { nodes, .. } if node < nodes => Some(self.first_page + node),
            _ => None,
        }
    }
}

/// One page-table entry (24 bytes on disk: offset, length, checksum).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageEntry {
    /// Byte offset of the page from the start of the file (multiple of `page_align`).
    pub offset: u64,
    /// Length of the page in bytes (exactly the section's rows × row bytes, no padding).
    pub length: u64,
    /// xxh3-64 (seed 0) of the `length` page bytes.
    pub checksum: u64,
}

impl PageEntry {
    /// One past the last byte of the page.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }

    /// Checks the bytes read for `page` (from `location`) against this
    /// entry: a short read is `Truncated`, other bytes `ChecksumMismatch`.
    pub fn verify(&self, page: PageId, bytes: &[u8], location: &str) -> Result<(), BankError> {
        if bytes.len() as u64 != self.length {
            return Err(BankError::Truncated {
                location: location.to_owned(),
                region: Region::Page(page),
                offset: self.offset,
                end: self.end(),
                source_len: self.offset + bytes.len() as u64,
            });
        }
        let got = checksum(bytes);
        if got != self.checksum {
            return Err(BankError::ChecksumMismatch {
                location: location.to_owned(),
                page,
                offset: self.offset,
                length: self.length,
                expected: self.checksum,
                got,
            });
        }
        Ok(())
    }
}

/// The fixed 64-byte header, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Header {
    /// Format version (1).
    pub version: u32,
    /// Page alignment in bytes (power of two in `MIN_PAGE_ALIGN..=MAX_PAGE_ALIGN`).
    pub page_align: u32,
    /// Number of section descriptors.
    pub section_count: u32,
    /// Number of page-table entries.
    pub page_count: u64,
    /// Total file length in bytes (end of the last page).
    pub file_len: u64,
    /// xxh3-64 of bytes `[64, meta_len)` (section descriptors and page table).
    pub table_checksum: u64,
}

impl Header {
    /// End of the page table: `64 + 64*section_count + 24*page_count` (None on overflow).
    pub fn meta_len(&self) -> Option<u64> {
        meta_len(u64::from(self.section_count), self.page_count)
    }
}

/// `64 + 64*sections + 24*pages`, checked.
pub fn meta_len(sections: u64, pages: u64) -> Option<u64> {
    sections
        .checked_mul(SECTION_DESC_LEN)?
        .checked_add(pages.checked_mul(PAGE_ENTRY_LEN)?)?
        .checked_add(HEADER_LEN)
}

/// `x` rounded up to a multiple of the power of two `align` (None on overflow).
pub fn align_up(x: u64, align: u64) -> Option<u64> {
    debug_assert!(align.is_power_of_two());
    Some(x.checked_add(align - 1)? & !(align - 1))
}

/// xxh3-64 with seed 0: the checksum of pages, the header and the table.
pub fn checksum(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Encodes the header; computes the header checksum (bytes 56..64).
pub fn encode_header(h: &Header) -> [u8; HEADER_LEN as usize] {
    let mut b = [0u8; HEADER_LEN as usize];
    b[0..8].copy_from_slice(&MAGIC);
    b[8..12].copy_from_slice(&h.version.to_le_bytes());
    // 12..16 flags = 0
    b[16..20].copy_from_slice(&h.page_align.to_le_bytes());
    b[20..24].copy_from_slice(&h.section_count.to_le_bytes());
    b[24..32].copy_from_slice(&h.page_count.to_le_bytes());
    b[32..40].copy_from_slice(&h.file_len.to_le_bytes());
    b[40..48].copy_from_slice(&h.table_checksum.to_le_bytes());
    // 48..56 reserved = 0
    let sum = checksum(&b[0..56]);
    b[56..64].copy_from_slice(&sum.to_le_bytes());
    b
}

/// Encodes a section descriptor (64 bytes).
pub fn encode_section(info: &SectionInfo) -> [u8; SECTION_DESC_LEN as usize] {
    let mut b = [0u8; SECTION_DESC_LEN as usize];
    b[0..4].copy_from_slice(&info.spec.kind.code().to_le_bytes());
    b[4..8].copy_from_slice(&info.spec.dtype.code().to_le_bytes());
    b[8..16].copy_from_slice(&info.first_page.to_le_bytes());
    b[16..24].copy_from_slice(&info.geometry.page_count.to_le_bytes());
    // count, then three u32 fields after `dim`; a pkm_values section leaves
    // bytes 40..48 reserved (zero)
    let (count, a, c, d) = match info.spec.kind {
        SectionKind::PkmValues {
            rows, page_rows, ..
        } => (rows, page_rows, 0, 0),
        SectionKind::FfnBlocks {
            level,
            nodes,
            layers,
            units,
            ..
        } => (nodes, units, layers, level),
    };
    b[24..32].copy_from_slice(&count.to_le_bytes());
    b[32..36].copy_from_slice(&info.spec.kind.dim().to_le_bytes());
    b[36..40].copy_from_slice(&a.to_le_bytes());
    b[40..44].copy_from_slice(&c.to_le_bytes());
    b[44..48].copy_from_slice(&d.to_le_bytes());
    b
}

/// Encodes a page-table entry (24 bytes).
pub fn encode_page_entry(e: &PageEntry) -> [u8; PAGE_ENTRY_LEN as usize] {
    let mut b = [0u8; PAGE_ENTRY_LEN as usize];
    b[0..8].copy_from_slice(&e.offset.to_le_bytes());
    b[8..16].copy_from_slice(&e.length.to_le_bytes());
    b[16..24].copy_from_slice(&e.checksum.to_le_bytes());
    b
}

/// Checks the file's first bytes against the magic; `prefix` may be shorter than 8.
///
/// Returns `Ok(true)` if the whole magic is present, `Ok(false)` if `prefix`
/// is a (too short) prefix of it, and `BadMagic` otherwise.
pub fn check_magic(prefix: &[u8], location: &str) -> Result<bool, BankError> {
    let n = prefix.len().min(MAGIC.len());
    if prefix[..n] != MAGIC[..n] {
        let mut found = [0u8; 8];
        found[..n].copy_from_slice(&prefix[..n]);
        return Err(BankError::BadMagic {
            location: location.to_owned(),
            found: found[..n].to_vec(),
        });
    }
    Ok(n == MAGIC.len())
}

fn corrupt_header(location: &str, offset: u64, reason: String) -> BankError {
    BankError::CorruptHeader {
        location: location.to_owned(),
        offset,
        reason,
    }
}

/// Parses and validates the 64-byte header (`bytes` = the file's first bytes).
///
/// Order of checks: length, magic, version, header checksum, then fields. So
/// a file of a future version is reported as such, not as corrupt.
pub fn parse_header(bytes: &[u8], location: &str) -> Result<Header, BankError> {
    let complete = check_magic(bytes, location)?;
    if !complete || bytes.len() < HEADER_LEN as usize {
        return Err(BankError::Truncated {
            location: location.to_owned(),
            region: Region::Header,
            offset: 0,
            end: HEADER_LEN,
            source_len: bytes.len() as u64,
        });
    }
    let b = &bytes[..HEADER_LEN as usize];
    let version = u32_at(b, 8);
    if version != VERSION {
        return Err(BankError::UnsupportedVersion {
            location: location.to_owned(),
            version,
        });
    }
    let stored = u64_at(b, 56);
    let computed = checksum(&b[0..56]);
    if stored != computed {
        return Err(corrupt_header(
            location,
            56,
            format!("header checksum mismatch: stored {stored:#018x}, computed {computed:#018x}"),
        ));
    }
    let flags = u32_at(b, 12);
    if flags != 0 {
        return Err(corrupt_header(
            location,
            12,
            format!("unknown flags {flags:#x} (v1 defines none)"),
        ));
    }
    let page_align = u32_at(b, 16);
    if !page_align.is_power_of_two() || !(MIN_PAGE_ALIGN..=MAX_PAGE_ALIGN).contains(&page_align) {
        return Err(corrupt_header(
            location,
            16,
            format!(
                "page alignment {page_align} is not a power of two in {MIN_PAGE_ALIGN}..={MAX_PAGE_ALIGN}"
            ),
        ));
    }
    let reserved = u64_at(b, 48);
    if reserved != 0 {
        return Err(corrupt_header(
            location,
            48,
            format!("reserved field is {reserved:#x}, not 0"),
        ));
    }
    let h = Header {
        version,
        page_align,
        section_count: u32_at(b, 20),
        page_count: u64_at(b, 24),
        file_len: u64_at(b, 32),
        table_checksum: u64_at(b, 40),
    };
    let meta = checked_meta_len(&h, location)?;
    if meta > h.file_len {
        return Err(corrupt_header(
            location,
            32,
            format!(
                "file length {} is smaller than the page table end {meta}",
                h.file_len
            ),
        ));
    }
    Ok(h)
}

/// The header's `meta_len` (end of the page table), checked: `CorruptHeader`
/// if `64 + 64*S + 24*P` overflows `u64`, `TableTooLarge` if the table
/// (`meta_len - 64` bytes) is longer than [`MAX_TABLE_LEN`].
///
/// [`parse_header`] applies it, so every reader refuses an oversized table
/// before it requests or allocates any of it.
pub fn checked_meta_len(h: &Header, location: &str) -> Result<u64, BankError> {
    let Some(meta) = h.meta_len() else {
        return Err(corrupt_header(
            location,
            20,
            format!(
                "{} sections and {} pages overflow the table size",
                h.section_count, h.page_count
            ),
        ));
    };
    let table_len = meta - HEADER_LEN;
    if table_len > MAX_TABLE_LEN {
        return Err(BankError::TableTooLarge {
            location: location.to_owned(),
            section_count: h.section_count,
            page_count: h.page_count,
            table_len,
            limit: MAX_TABLE_LEN,
        });
    }
    Ok(meta)
}

fn corrupt_table(location: &str, offset: u64, page: Option<PageId>, reason: String) -> BankError {
    BankError::CorruptTable {
        location: location.to_owned(),
        offset,
        page,
        reason,
    }
}

/// Parses one section descriptor (64 bytes) at file offset `at`.
fn parse_section(
    b: &[u8],
    at: u64,
    index: usize,
    location: &str,
) -> Result<SectionInfo, BankError> {
    let bad = |field: u64, reason: String| {
        corrupt_table(
            location,
            at + field,
            None,
            format!("section {index}: {reason}"),
        )
    };
    let kind_code = u32_at(b, 0);
    let dtype_code = u32_at(b, 4);
    let dtype = Dtype::from_code(dtype_code)
        .ok_or_else(|| bad(4, format!("unknown dtype code {dtype_code}")))?;
    let first_page = u64_at(b, 8);
    let page_count = u64_at(b, 16);
    let count = u64_at(b, 24);
    let dim = u32_at(b, 32);
    let a = u32_at(b, 36);
    let c = u32_at(b, 40);
    let d = u32_at(b, 44);
    let (kind, reserved_from) = match kind_code {
        KIND_PKM_VALUES => (
            SectionKind::PkmValues {
                rows: count,
                dim,
                page_rows: a,
            },
            40,
        ),
        KIND_FFN_BLOCKS => (
            SectionKind::FfnBlocks {
                level: d,
                nodes: count,
                layers: c,
                units: a,
                dim,
            },
            48,
        ),
        other => return Err(bad(0, format!("unknown section kind {other}"))),
    };
    if let Some(pos) = b[reserved_from..SECTION_DESC_LEN as usize]
        .iter()
        .position(|&x| x != 0)
    {
        return Err(bad(
            (reserved_from + pos) as u64,
            "reserved bytes are not zero".into(),
        ));
    }
    let spec = SectionSpec { kind, dtype };
    let geometry = spec
        .geometry()
        .map_err(|r| bad(24, format!("invalid {} shape: {r}", kind.name())))?;
    if geometry.page_count != page_count {
        return Err(bad(
            16,
            format!(
                "page count {page_count} does not match the shape, which needs {}",
                geometry.page_count
            ),
        ));
    }
    Ok(SectionInfo {
        index,
        spec,
        first_page,
        geometry,
    })
}

/// Incremental parser and validator of the section descriptors and page
/// table (bytes `[64, meta_len)` of a bank): the one validation path of
/// [`BankMeta::parse`], [`parse_table`], [`super::BankReader::open`] and the
/// browser's reader.
///
/// Bytes are [pushed](TableParser::push) in order, in pieces of any size,
/// and checked as they arrive, so garbage fails at the first bad piece:
///
/// 1. each section descriptor as soon as its 64 bytes are in (known kind and
///    dtype, non-empty shape, zero reserved bytes, page count matching the
///    shape, first page where the previous section ends); once all are in,
///    their page counts must add up to the header's page count, so a header
///    that claims pages no section holds fails before any page entry is read;
/// 2. each page entry as soon as its 24 bytes are in: offset aligned, after
///    the table and after the previous page (no overlap), length exactly the
///    one its section's shape and dtype give, end within the header's file
///    length;
/// 3. at [`finish`](TableParser::finish): every byte present (else
///    `Truncated` naming the table), the table checksum (a streaming
///    xxh3-64 over the bytes pushed), and the last page ending exactly at
///    the file length.
///
/// Memory grows only with what was validated: the parser keeps one partial
/// record (at most 64 bytes), the sections and the page entries accepted so
/// far; no count from the header sizes an allocation. The table's total
/// size is capped by [`MAX_TABLE_LEN`] in [`TableParser::new`].
///
/// ```
/// use memlayer_bank::format::{parse_header, TableParser};
/// use memlayer_bank::*;
/// let layout = BankLayout::new(vec![SectionSpec::pkm_values(5, 2, 2, Dtype::F16)]);
/// let mut w = BankWriter::new(std::io::Cursor::new(Vec::new()), &layout).unwrap();
/// w.write_rows(&[0.5; 10]).unwrap();
/// let bytes = w.finish().unwrap().into_inner();
/// let header = parse_header(&bytes, "mem").unwrap();
/// let mut parser = TableParser::new(&header, "mem").unwrap();
/// let table = &bytes[64..parser.meta_len() as usize];
/// for piece in table.chunks(7) {
///     parser.push(piece).unwrap();
/// }
/// let meta = parser.finish().unwrap();
/// assert_eq!(meta, BankMeta::parse(&bytes, "mem").unwrap());
/// ```
pub struct TableParser {
    header: Header,
    location: String,
    /// End of the table (`64 + 64*S + 24*P`), at most `64 + MAX_TABLE_LEN`.
    meta_len: u64,
    /// Bytes of section descriptors (`64*S`).
    sections_len: u64,
    /// First byte a page may use: `align_up(meta_len, page_align)`.
    data_start: u64,
    /// Bytes of complete records consumed (relative to byte 64).
    consumed: u64,
    /// The record being filled and how many of its bytes are in.
    record: [u8; SECTION_DESC_LEN as usize],
    filled: usize,
    hasher: Xxh3Default,
    sections: Vec<SectionInfo>,
    /// Sum of the page counts of the sections parsed so far.
    section_pages: PageId,
    pages: Vec<PageEntry>,
    /// End of the previous page (`data_start` before page 0).
    prev_end: u64,
    /// Index of the section of the next page entry.
    current: usize,
    /// An earlier push failed; the parser refuses further input.
    failed: bool,
}

impl fmt::Debug for TableParser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TableParser")
            .field("location", &self.location)
            .field("meta_len", &self.meta_len)
            .field("pushed", &self.pushed())
            .field("sections", &self.sections.len())
            .field("pages", &self.pages.len())
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl TableParser {
    /// A parser for the table of `header` (normally from [`parse_header`],
    /// which has checked it; a hand-made header is checked again here).
    ///
    /// Fails with `TableTooLarge` if the table is longer than
    /// [`MAX_TABLE_LEN`], `CorruptHeader` if its size overflows or the
    /// alignment is invalid, and `CorruptTable` if the header claims pages
    /// but no sections.
    pub fn new(header: &Header, location: &str) -> Result<Self, BankError> {
        let meta_len = checked_meta_len(header, location)?;
        let a = header.page_align;
        if !a.is_power_of_two() || !(MIN_PAGE_ALIGN..=MAX_PAGE_ALIGN).contains(&a) {
            return Err(corrupt_header(
                location,
                16,
                format!(
                    "page alignment {a} is not a power of two in {MIN_PAGE_ALIGN}..={MAX_PAGE_ALIGN}"
                ),
            ));
        }
        // meta_len <= 64 + MAX_TABLE_LEN, so neither can overflow.
        let data_start = align_up(meta_len, u64::from(a)).unwrap_or(u64::MAX);
        let sections_len = u64::from(header.section_count) * SECTION_DESC_LEN;
        let parser = Self {
            header: *header,
            location: location.to_owned(),
            meta_len,
            sections_len,
            data_start,
            consumed: 0,
            record: [0; SECTION_DESC_LEN as usize],
            filled: 0,
            hasher: Xxh3Default::new(),
            sections: Vec::new(),
            section_pages: 0,
            pages: Vec::new(),
            prev_end: data_start,
            current: 0,
            failed: false,
        };
        if sections_len == 0 {
            parser.sections_done()?;
        }
        Ok(parser)
    }

    /// End of the table: `64 + 64*S + 24*P` (at most `64 + MAX_TABLE_LEN`).
    pub fn meta_len(&self) -> u64 {
        self.meta_len
    }

    /// Bytes pushed so far.
    fn pushed(&self) -> u64 {
        self.consumed + self.filled as u64
    }

    /// File offset of the next byte the parser wants (`64` + bytes pushed).
    pub fn offset(&self) -> u64 {
        HEADER_LEN + self.pushed()
    }

    /// Bytes of the table not pushed yet.
    pub fn remaining(&self) -> u64 {
        self.meta_len - self.offset()
    }

    /// Length of the next read a reader should make: at most `max` (at
    /// least 1), and never past the end of the section descriptors, so the
    /// sections are all checked before any page entry is read. 0 once the
    /// whole table is pushed.
    pub fn next_read_len(&self, max: usize) -> usize {
        let pushed = self.pushed();
        let region_end = if pushed < self.sections_len {
            self.sections_len
        } else {
            self.meta_len - HEADER_LEN
        };
        let left = region_end - pushed;
        usize::try_from(left).map_or(max.max(1), |left| left.min(max.max(1)))
    }

    /// Feeds the next `bytes` of the table (they start at [`Self::offset`])
    /// and validates every record they complete.
    ///
    /// Fails at the first invalid record (`CorruptTable` naming its offset
    /// and, for a page entry, the page) or if `bytes` run past the end of
    /// the table (`InvalidInput`). After an error the parser refuses more
    /// input.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), BankError> {
        if self.failed {
            return Err(self.used_after_error());
        }
        let r = self.push_records(bytes);
        self.failed = r.is_err();
        r
    }

    fn used_after_error(&self) -> BankError {
        BankError::InvalidInput(format!(
            "{}: the page table parser was used after it reported an error",
            self.location
        ))
    }

    fn push_records(&mut self, bytes: &[u8]) -> Result<(), BankError> {
        if bytes.len() as u64 > self.remaining() {
            return Err(BankError::InvalidInput(format!(
                "{}: {} bytes given at byte offset {}, but the page table ends at {}",
                self.location,
                bytes.len(),
                self.offset(),
                self.meta_len
            )));
        }
        self.hasher.update(bytes);
        let mut rest = bytes;
        while !rest.is_empty() {
            let in_sections = self.consumed < self.sections_len;
            let record_len = if in_sections {
                SECTION_DESC_LEN as usize
            } else {
                PAGE_ENTRY_LEN as usize
            };
            let take = (record_len - self.filled).min(rest.len());
            self.record[self.filled..self.filled + take].copy_from_slice(&rest[..take]);
            self.filled += take;
            rest = &rest[take..];
            if self.filled == record_len {
                let record = self.record;
                let at = HEADER_LEN + self.consumed;
                self.filled = 0;
                if in_sections {
                    self.section(&record, at)?;
                } else {
                    self.entry(&record[..record_len], at)?;
                }
                self.consumed += record_len as u64;
            }
        }
        Ok(())
    }

    /// Validates the section descriptor at file offset `at`.
    fn section(&mut self, b: &[u8], at: u64) -> Result<(), BankError> {
        let location = self.location.as_str();
        let i = self.sections.len();
        let s = parse_section(b, at, i, location)?;
        if s.first_page != self.section_pages {
            return Err(corrupt_table(
                location,
                at + 8,
                None,
                format!(
                    "section {i}: first page {} but the previous sections end at page {}",
                    s.first_page, self.section_pages
                ),
            ));
        }
        self.section_pages = self
            .section_pages
            .checked_add(s.geometry.page_count)
            .ok_or_else(|| {
                corrupt_table(
                    location,
                    at + 16,
                    None,
                    format!("section {i}: page count overflows"),
                )
            })?;
        self.sections.push(s);
        if at + SECTION_DESC_LEN == HEADER_LEN + self.sections_len {
            self.sections_done()?;
        }
        Ok(())
    }

    /// All sections are in: their pages must be exactly the header's.
    fn sections_done(&self) -> Result<(), BankError> {
        if self.section_pages != self.header.page_count {
            return Err(corrupt_table(
                &self.location,
                HEADER_LEN,
                None,
                format!(
                    "sections hold {} pages but the header says {}",
                    self.section_pages, self.header.page_count
                ),
            ));
        }
        Ok(())
    }

    /// Validates the page entry at file offset `at` and keeps it.
    fn entry(&mut self, chunk: &[u8], at: u64) -> Result<(), BankError> {
        let location = self.location.as_str();
        let align = u64::from(self.header.page_align);
        let id = self.pages.len() as PageId;
        while let Some(s) = self.sections.get(self.current) {
            if id < s.first_page + s.geometry.page_count {
                break;
            }
            self.current += 1;
        }
        let Some(s) = self.sections.get(self.current) else {
            return Err(corrupt_table(
                location,
                at,
                Some(id),
                "page belongs to no section".into(),
            ));
        };
        let e = PageEntry {
            offset: u64_at(chunk, 0),
            length: u64_at(chunk, 8),
            checksum: u64_at(chunk, 16),
        };
        if !e.offset.is_multiple_of(align) {
            return Err(corrupt_table(
                location,
                at,
                Some(id),
                format!(
                    "offset {} is not a multiple of the page alignment {align}",
                    e.offset
                ),
            ));
        }
        if e.offset < self.prev_end {
            let what = if id == 0 {
                format!(
                    "starts inside the header/table (data starts at {})",
                    self.data_start
                )
            } else {
                format!("overlaps page {} which ends at {}", id - 1, self.prev_end)
            };
            return Err(corrupt_table(
                location,
                at,
                Some(id),
                format!("offset {} {what}", e.offset),
            ));
        }
        let expected = s.geometry.page_len(id - s.first_page);
        if e.length != expected {
            return Err(corrupt_table(
                location,
                at + 8,
                Some(id),
                format!(
                    "length {} but section {} ({} {}) needs {expected}",
                    e.length,
                    s.index,
                    s.spec.kind.name(),
                    s.spec.dtype
                ),
            ));
        }
        let file_len = self.header.file_len;
        let end = e
            .offset
            .checked_add(e.length)
            .filter(|&end| end <= file_len)
            .ok_or_else(|| {
                corrupt_table(
                    location,
                    at,
                    Some(id),
                    format!(
                        "page {}..+{} ends past the file length {file_len}",
                        e.offset, e.length
                    ),
                )
            })?;
        self.prev_end = end;
        // Grows by one validated entry (24 bytes read) at a time.
        self.pages.push(e);
        Ok(())
    }

    /// Checks that the whole table was pushed, its checksum, and that the
    /// last page ends at the file length; returns the validated metadata.
    pub fn finish(self) -> Result<BankMeta, BankError> {
        if self.failed {
            return Err(self.used_after_error());
        }
        let location = self.location.as_str();
        let meta = self.meta_len;
        if self.offset() != meta {
            return Err(BankError::Truncated {
                location: location.to_owned(),
                region: Region::Table,
                offset: HEADER_LEN,
                end: meta,
                source_len: self.offset(),
            });
        }
        let computed = self.hasher.digest();
        if computed != self.header.table_checksum {
            return Err(corrupt_table(
                location,
                HEADER_LEN,
                None,
                format!(
                    "table checksum mismatch: header says {:#018x}, bytes {HEADER_LEN}..{meta} hash to {computed:#018x}",
                    self.header.table_checksum
                ),
            ));
        }
        let last_end = self.pages.last().map_or(meta, PageEntry::end);
        if last_end != self.header.file_len {
            return Err(corrupt_header(
                location,
                32,
                format!(
                    "file length {} but the last page ends at {last_end}",
                    self.header.file_len
                ),
            ));
        }
        Ok(BankMeta {
            header: self.header,
            sections: self.sections,
            pages: self.pages,
        })
    }
}

/// Parses and validates the section descriptors and the page table in one
/// piece (a [`TableParser`] fed all of `table`).
///
/// `table` is the file's bytes `[64, meta_len)`; any other length is
/// `Truncated` naming the table. See [`TableParser`] for the checks.
pub fn parse_table(
    h: &Header,
    table: &[u8],
    location: &str,
) -> Result<(Vec<SectionInfo>, Vec<PageEntry>), BankError> {
    let mut parser = TableParser::new(h, location)?;
    let meta = parser.meta_len();
    if table.len() as u64 != meta - HEADER_LEN {
        return Err(BankError::Truncated {
            location: location.to_owned(),
            region: Region::Table,
            offset: HEADER_LEN,
            end: meta,
            source_len: HEADER_LEN.saturating_add(table.len() as u64),
        });
    }
    parser.push(table)?;
    let meta = parser.finish()?;
    Ok((meta.sections, meta.pages))
}

/// Everything a bank's header and page table say, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BankMeta {
    /// The decoded header.
    pub header: Header,
    /// Sections in file order.
    pub sections: Vec<SectionInfo>,
    /// The page table, indexed by global page id.
    pub pages: Vec<PageEntry>,
}

impl BankMeta {
    /// Parses a whole bank file held in memory (pure function, fuzzable).
    ///
    /// Validates the header and page table exactly as [`super::BankReader::open`]
    /// does (the same [`parse_header`], [`check_source_len`] and
    /// [`TableParser`], here fed the table in one piece); pages are not read (their bytes may be missing: `bytes` may end
    /// anywhere after the table, see [`BankMeta::first_truncated_page`]).
    pub fn parse(bytes: &[u8], location: &str) -> Result<BankMeta, BankError> {
        let header = parse_header(bytes, location)?;
        check_source_len(&header, bytes.len() as u64, location)?;
        let mut parser = TableParser::new(&header, location)?;
        // check_source_len guarantees meta_len <= bytes.len(); `get` keeps
        // that from being a panic if it ever were not so.
        let table = usize::try_from(parser.meta_len())
            .ok()
            .and_then(|meta| bytes.get(HEADER_LEN as usize..meta))
            .ok_or_else(|| BankError::Truncated {
                location: location.to_owned(),
                region: Region::Table,
                offset: HEADER_LEN,
                end: parser.meta_len(),
                source_len: bytes.len() as u64,
            })?;
        parser.push(table)?;
        parser.finish()
    }

    /// End of the page table (`64 + 64*S + 24*P`).
    pub fn meta_len(&self) -> u64 {
        meta_len(self.sections.len() as u64, self.pages.len() as u64).unwrap_or(u64::MAX)
    }

    /// Number of pages.
    pub fn page_count(&self) -> u64 {
        self.pages.len() as u64
    }

    /// Section holding global page `page` and the page's index inside it.
    pub fn section_of_page(&self, page: PageId) -> Option<(&SectionInfo, u64)> {
        let i = self
            .sections
            .partition_point(|s| s.first_page + s.geometry.page_count <= page);
        let s = self.sections.get(i)?;
        (page >= s.first_page && page < s.first_page + s.geometry.page_count)
            .then(|| (s, page - s.first_page))
    }

    /// First page whose bytes end past `source_len` (a truncated file), if any.
    pub fn first_truncated_page(&self, source_len: u64) -> Option<PageId> {
        let i = self.pages.partition_point(|e| e.end() <= source_len);
        (i < self.pages.len()).then_some(i as PageId)
    }
}

/// Checks the source length against the header before the table is read:
/// the table must be present (else `Truncated` naming the table) and the
/// source must not be longer than the header's file length (trailing bytes
/// mean the file is not what was written). A source shorter than the file
/// length but holding the whole table is accepted here; reads of the missing
/// pages fail with `Truncated` naming the page.
pub fn check_source_len(h: &Header, source_len: u64, location: &str) -> Result<(), BankError> {
    let meta = h.meta_len().unwrap_or(u64::MAX);
    if source_len < meta {
        return Err(BankError::Truncated {
            location: location.to_owned(),
            region: Region::Table,
            offset: HEADER_LEN,
            end: meta,
            source_len,
        });
    }
    if source_len > h.file_len {
        return Err(corrupt_header(
            location,
            32,
            format!(
                "the source is {source_len} bytes but the header's file length is {} ({} trailing bytes)",
                h.file_len,
                source_len - h.file_len
            ),
        ));
    }
    Ok(())
}

/// The canonical placement of a layout's pages: validated sections, the
/// table end, and each page's offset and length (checksums unknown yet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Sections with their first pages.
    pub sections: Vec<SectionInfo>,
    /// End of the page table.
    pub meta_len: u64,
    /// Page alignment.
    pub page_align: u32,
    /// Total number of pages.
    pub page_count: u64,
}

/// A bank layout: page alignment and sections, in file order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BankLayout {
    /// Page alignment in bytes (power of two, `MIN_PAGE_ALIGN..=MAX_PAGE_ALIGN`).
    pub page_align: u32,
    /// Sections in file order.
    pub sections: Vec<SectionSpec>,
}

impl BankLayout {
    /// A layout with the default 4096-byte page alignment.
    pub fn new(sections: Vec<SectionSpec>) -> Self {
        Self {
            page_align: DEFAULT_PAGE_ALIGN,
            sections,
        }
    }

    /// The same layout with another page alignment.
    pub fn with_page_align(mut self, page_align: u32) -> Self {
        self.page_align = page_align;
        self
    }

    /// Validates the layout and assigns page ids.
    pub fn plan(&self) -> Result<Plan, BankError> {
        let invalid = |r: String| BankError::InvalidLayout(r);
        let a = self.page_align;
        if !a.is_power_of_two() || !(MIN_PAGE_ALIGN..=MAX_PAGE_ALIGN).contains(&a) {
            return Err(invalid(format!(
                "page alignment {a} is not a power of two in {MIN_PAGE_ALIGN}..={MAX_PAGE_ALIGN}"
            )));
        }
        let section_count =
            u32::try_from(self.sections.len()).map_err(|_| invalid("too many sections".into()))?;
        let mut sections = Vec::with_capacity(self.sections.len());
        let mut next: PageId = 0;
        for (index, spec) in self.sections.iter().enumerate() {
            let geometry = spec
                .geometry()
                .map_err(|r| invalid(format!("section {index} ({}): {r}", spec.kind.name())))?;
            sections.push(SectionInfo {
                index,
                spec: *spec,
                first_page: next,
                geometry,
            });
            next = next
                .checked_add(geometry.page_count)
                .ok_or_else(|| invalid("page count overflows".into()))?;
        }
        let meta_len = meta_len(u64::from(section_count), next)
            .ok_or_else(|| invalid("page table too large".into()))?;
        Ok(Plan {
            sections,
            meta_len,
            page_align: a,
            page_count: next,
        })
    }
}
