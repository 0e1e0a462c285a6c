//! Tests against hostile sources: headers that claim huge tables, sources
//! that claim terabytes, tables validated piece by piece, padding checks,
//! and paths that are not regular files (FIFOs, directories, devices).
//!
//! Nothing here may hang: every wait is bounded by a timeout, every loop by
//! a count.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::format::{
    check_source_len, encode_header, encode_page_entry, encode_section, parse_header,
};
use super::tests::{arb_bank, open, reseal, tiny_bank};
use super::*;

const TIB: u64 = 1 << 40;

/// A source that reports `len` bytes, serves `byte_at(offset)` for each
/// byte, and records every read (offset, length).
struct HostileSource {
    len: u64,
    byte_at: Box<dyn Fn(u64) -> u8 + Send + Sync>,
    reads: Mutex<Vec<(u64, usize)>>,
}

impl HostileSource {
    /// `prefix` at offset 0, then `rest(offset)`.
    fn new(len: u64, prefix: Vec<u8>, rest: impl Fn(u64) -> u8 + Send + Sync + 'static) -> Self {
        Self {
            len,
            byte_at: Box::new(
                move |o| match usize::try_from(o).ok().and_then(|i| prefix.get(i)) {
                    Some(&b) => b,
                    None => rest(o),
                },
            ),
            reads: Mutex::new(Vec::new()),
        }
    }

    fn reads(&self) -> Vec<(u64, usize)> {
        self.reads.lock().unwrap().clone()
    }

    /// Length of the largest read.
    fn largest_read(&self) -> usize {
        self.reads().iter().map(|r| r.1).max().unwrap_or(0)
    }

    /// End of the read that reached furthest into the source.
    fn furthest_end(&self) -> u64 {
        self.reads()
            .iter()
            .map(|&(o, n)| o + n as u64)
            .max()
            .unwrap_or(0)
    }

    /// Bytes read in all.
    fn total_read(&self) -> u64 {
        self.reads().iter().map(|r| r.1 as u64).sum()
    }
}

impl std::fmt::Debug for HostileSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostileSource")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl PageSource for HostileSource {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        self.reads.lock().unwrap().push((offset, buf.len()));
        let length = buf.len() as u64;
        if offset.checked_add(length).is_none_or(|end| end > self.len) {
            return Err(SourceError::OutOfBounds {
                offset,
                length,
                size: self.len,
            });
        }
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (self.byte_at)(offset + i as u64);
        }
        Ok(())
    }
    fn len(&self) -> Result<u64, SourceError> {
        Ok(self.len)
    }
    fn describe(&self) -> String {
        "hostile.bank".into()
    }
}

/// A valid header (checksum computed) with these counts.
fn header(sections: u32, pages: u64, file_len: u64, table_checksum: u64, align: u32) -> Vec<u8> {
    encode_header(&Header {
        version: VERSION,
        page_align: align,
        section_count: sections,
        page_count: pages,
        file_len,
        table_checksum,
    })
    .to_vec()
}

/// The descriptor of `spec` as section `index` starting at `first_page`.
fn section(index: usize, spec: SectionSpec, first_page: PageId) -> Vec<u8> {
    encode_section(&SectionInfo {
        index,
        spec,
        first_page,
        geometry: spec.geometry().unwrap(),
    })
    .to_vec()
}

/// Pages claimed by a header whose table fills a 1 TiB file.
fn terabyte_pages() -> u64 {
    (TIB - HEADER_LEN) / PAGE_ENTRY_LEN
}

#[test]
fn a_terabyte_source_claiming_a_terabyte_table_fails_without_reading_it() {
    let pages = terabyte_pages();
    let head = header(0, pages, TIB, 0, 4096);
    let src = HostileSource::new(TIB, head.clone(), |_| 0);
    let start = Instant::now();
    let e = BankReader::open(&src).unwrap_err();
    match &e {
        BankError::TableTooLarge {
            location,
            section_count: 0,
            page_count,
            table_len,
            limit,
        } => {
            assert_eq!(location, "hostile.bank");
            assert_eq!(*page_count, pages);
            assert_eq!(*table_len, pages * PAGE_ENTRY_LEN);
            assert_eq!(*limit, MAX_TABLE_LEN);
        }
        other => panic!("expected TableTooLarge, got {other:?}"),
    }
    let msg = e.to_string();
    for needle in [
        "hostile.bank",
        "byte offset 20",
        &format!("{pages} pages"),
        &format!("{} bytes", pages * PAGE_ENTRY_LEN),
        &MAX_TABLE_LEN.to_string(),
    ] {
        assert!(msg.contains(needle), "{needle:?} not in {msg}");
    }
    assert!(src.largest_read() <= READ_CHUNK_LEN, "{:?}", src.reads());
    assert_eq!(src.furthest_end(), HEADER_LEN, "only the header is read");
    assert!(start.elapsed() < Duration::from_secs(5));
    // The pure parser applies the same cap before it looks for the table.
    assert!(matches!(
        BankMeta::parse(&head, "x"),
        Err(BankError::TableTooLarge { .. })
    ));
}

#[test]
fn a_header_with_valid_sections_but_2_pow_40_pages_is_too_large() {
    let spec = SectionSpec::pkm_values(5, 1, 1, Dtype::F32);
    let mut prefix = header(1, 1 << 40, TIB, 0, 8);
    prefix.extend(section(0, spec, 0));
    let src = HostileSource::new(TIB, prefix, |_| 0);
    let e = BankReader::open(&src).unwrap_err();
    assert!(
        matches!(
            e,
            BankError::TableTooLarge {
                section_count: 1,
                page_count: 0x100_0000_0000,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(src.furthest_end(), HEADER_LEN, "{:?}", src.reads());
}

#[test]
fn a_section_with_pages_over_max_page_len_is_refused_before_any_page_is_read() {
    // One page of 2^26 f32 rows of 8 values = 2 GiB: the shape check refuses
    // it, so no reader ever allocates such a page.
    let spec = SectionSpec::pkm_values(1 << 26, 8, 1 << 26, Dtype::F32);
    let e = spec.geometry().unwrap_err();
    assert!(e.contains("MAX_PAGE_LEN"), "{e}");
    // The largest page accepted is exactly MAX_PAGE_LEN bytes.
    let rows = MAX_PAGE_LEN / 32;
    let ok = SectionSpec::pkm_values(rows, 8, rows as u32, Dtype::F32);
    assert_eq!(ok.geometry().unwrap().page_bytes, MAX_PAGE_LEN);
    let over = SectionSpec::pkm_values(rows + 1, 8, rows as u32 + 1, Dtype::F32);
    assert!(over.geometry().is_err());

    // A table describing such a section fails on its descriptor.
    let mut desc = encode_section(&SectionInfo {
        index: 0,
        spec: ok,
        first_page: 0,
        geometry: ok.geometry().unwrap(),
    });
    // rows and page_rows (offsets 24 and 36) of the 2 GiB page.
    desc[24..32].copy_from_slice(&(1u64 << 26).to_le_bytes());
    desc[36..40].copy_from_slice(&(1u32 << 26).to_le_bytes());
    let mut prefix = header(1, 1, TIB, 0, 8);
    prefix.extend(desc);
    let src = HostileSource::new(TIB, prefix, |_| 0);
    let e = BankReader::open(&src).unwrap_err();
    assert!(
        matches!(e, BankError::CorruptTable { .. }) && e.to_string().contains("MAX_PAGE_LEN"),
        "{e}"
    );
    assert!(src.largest_read() <= READ_CHUNK_LEN);
}

#[test]
fn the_cap_is_exact() {
    // The largest table accepted: 64*S + 24*P == MAX_TABLE_LEN (S = 4, so
    // the remainder divides by 24).
    let pages = (MAX_TABLE_LEN - 4 * SECTION_DESC_LEN) / PAGE_ENTRY_LEN;
    assert_eq!(4 * SECTION_DESC_LEN + pages * PAGE_ENTRY_LEN, MAX_TABLE_LEN);
    let ok = header(4, pages, TIB, 0, 8);
    let h = parse_header(&ok, "x").unwrap();
    assert_eq!(h.meta_len(), Some(HEADER_LEN + MAX_TABLE_LEN));
    let over = header(4, pages + 1, TIB, 0, 8);
    assert!(matches!(
        parse_header(&over, "x"),
        Err(BankError::TableTooLarge { .. })
    ));
    // A hand-made header is checked by the parser too.
    let big = Header {
        page_count: pages + 1,
        ..h
    };
    assert!(matches!(
        TableParser::new(&big, "x"),
        Err(BankError::TableTooLarge { .. })
    ));
}

#[test]
fn sections_that_do_not_back_the_header_fail_before_any_page_entry_is_read() {
    // 10 million pages (a 240 MB table, under the cap) claimed, one valid
    // section of 5 pages behind them.
    let spec = SectionSpec::pkm_values(5, 1, 1, Dtype::F32);
    let mut prefix = header(1, 10_000_000, TIB, 0, 8);
    prefix.extend(section(0, spec, 0));
    let src = HostileSource::new(TIB, prefix, |_| 0xff);
    let e = BankReader::open(&src).unwrap_err();
    assert!(
        matches!(
            e,
            BankError::CorruptTable {
                offset: 64,
                page: None,
                ..
            }
        ),
        "{e}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("sections hold 5 pages but the header says 10000000"),
        "{msg}"
    );
    assert_eq!(
        src.furthest_end(),
        HEADER_LEN + SECTION_DESC_LEN,
        "no page entry is read: {:?}",
        src.reads()
    );

    // No sections at all behind a page count: fails before reading anything past the header.
    let src = HostileSource::new(TIB, header(0, 10_000_000, TIB, 0, 8), |_| 0);
    let e = BankReader::open(&src).unwrap_err();
    assert!(e.to_string().contains("sections hold 0 pages"), "{e}");
    assert_eq!(src.furthest_end(), HEADER_LEN);
}

#[test]
fn page_entries_are_validated_chunk_by_chunk() {
    // 3 million valid-looking entries; entry BAD is misaligned. The reader
    // must stop at the chunk holding BAD, reading no piece over the chunk size.
    const PAGES: u64 = 3_000_000;
    const BAD: u64 = 100_000;
    let spec = SectionSpec::pkm_values(PAGES, 1, 1, Dtype::F32);
    let meta = HEADER_LEN + SECTION_DESC_LEN + PAGES * PAGE_ENTRY_LEN;
    let data_start = meta.next_multiple_of(8);
    let file_len = data_start + 8 * (PAGES - 1) + 4;
    let mut prefix = header(1, PAGES, file_len, 0, 8);
    prefix.extend(section(0, spec, 0));
    let table_start = HEADER_LEN + SECTION_DESC_LEN;
    let src = HostileSource::new(file_len, prefix, move |o| {
        if o < table_start || o >= meta {
            return 0;
        }
        let id = (o - table_start) / PAGE_ENTRY_LEN;
        let e = PageEntry {
            offset: data_start + 8 * id + u64::from(id == BAD),
            length: 4,
            checksum: 0,
        };
        encode_page_entry(&e)[((o - table_start) % PAGE_ENTRY_LEN) as usize]
    });
    let e = BankReader::open(&src).unwrap_err();
    let bad_at = table_start + BAD * PAGE_ENTRY_LEN;
    match &e {
        BankError::CorruptTable { offset, page, .. } => {
            assert_eq!((*offset, *page), (bad_at, Some(BAD)), "{e}");
        }
        other => panic!("expected CorruptTable, got {other:?}"),
    }
    assert!(e.to_string().contains("not a multiple"), "{e}");
    assert!(src.largest_read() <= READ_CHUNK_LEN);
    let chunk = READ_CHUNK_LEN as u64;
    assert!(
        src.furthest_end() < bad_at + PAGE_ENTRY_LEN + chunk,
        "read on past the bad chunk: {}",
        src.furthest_end()
    );
    assert!(
        src.total_read() <= table_start + 3 * chunk,
        "{}",
        src.total_read()
    );
    // The first read after the header is exactly the section descriptors.
    assert_eq!(src.reads()[1], (HEADER_LEN, SECTION_DESC_LEN as usize));
}

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("memlayer-hostile-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Opens `path` with `FileSource` + `BankReader` on a thread; fails the
/// test if that takes longer than `limit` (a hang, not a result).
fn open_path_within(path: &Path, limit: Duration) -> Result<BankReader<FileSource>, String> {
    let (tx, rx) = mpsc::channel();
    let p = path.to_path_buf();
    std::thread::spawn(move || {
        let r = FileSource::open(&p)
            .map_err(|e| format!("source: {e}"))
            .and_then(|s| BankReader::open(s).map_err(|e| format!("bank: {e}")));
        let _ = tx.send(r);
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("opening {} did not return within {limit:?}", path.display()))
}

#[test]
fn a_sparse_terabyte_file_with_a_valid_header_fails_fast() {
    use std::io::Write;
    let dir = TempDir::new("sparse");
    let path = dir.path().join("huge.bank");
    let head = header(0, terabyte_pages(), TIB, 0, 4096);
    let test = "a_sparse_terabyte_file_with_a_valid_header_fails_fast";
    if !source::testing::sparse_file(&path, TIB, &head, test).expect("sparse 1 TiB file") {
        return;
    }
    let start = Instant::now();
    let e = open_path_within(&path, Duration::from_secs(10)).unwrap_err();
    assert!(e.starts_with("bank: "), "{e}");
    assert!(
        e.contains("huge.bank") && e.contains("a reader accepts") && e.contains("byte offset 20"),
        "{e}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );

    // A table under the cap over the file's zeros: fails at the first
    // section descriptor (dtype 0), not after reading 240 MB.
    let mut file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all(&header(1, 10_000_000, TIB, 0, 4096))
        .unwrap();
    drop(file);
    let start = Instant::now();
    let e = open_path_within(&path, Duration::from_secs(10)).unwrap_err();
    assert!(
        e.contains("corrupt page table at byte offset 68") && e.contains("unknown dtype code 0"),
        "{e}"
    );
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn truncated_and_garbled_tables_keep_their_errors() {
    let b = tiny_bank();
    // Cut inside the table.
    let e = open(&b[..200]).unwrap_err();
    assert!(
        matches!(
            e,
            BankError::Truncated {
                region: Region::Table,
                offset: 64,
                end: 312,
                source_len: 200,
                ..
            }
        ),
        "{e}"
    );
    // A page checksum field changed (no field check can see it): the table checksum.
    let mut bad = b.clone();
    bad[192 + 16] ^= 1;
    let e = open(&bad).unwrap_err();
    assert!(
        matches!(e, BankError::CorruptTable { offset: 64, .. })
            && e.to_string().contains("table checksum mismatch"),
        "{e}"
    );
    // A page entry garbled: named by page, whether or not the checksum was redone.
    for sealed in [false, true] {
        let mut bad = b.clone();
        bad[192 + 24 * 2] = 1;
        if sealed {
            reseal(&mut bad);
        }
        let e = open(&bad).unwrap_err();
        assert!(
            matches!(
                e,
                BankError::CorruptTable {
                    offset: 240,
                    page: Some(2),
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            BankMeta::parse(&bad, "test.bank").unwrap_err().to_string()
        );
    }
}

#[test]
fn table_parser_refuses_misuse() {
    let b = tiny_bank();
    let h = parse_header(&b, "t").unwrap();
    let mut p = TableParser::new(&h, "t").unwrap();
    assert_eq!(p.meta_len(), 312);
    assert_eq!((p.offset(), p.remaining()), (64, 248));
    // Reads stop at the end of the section descriptors, then at the table's end.
    assert_eq!(p.next_read_len(1000), 128);
    assert_eq!(p.next_read_len(0), 1);
    p.push(&b[64..100]).unwrap();
    assert_eq!(p.next_read_len(1000), 92);
    p.push(&b[100..192]).unwrap();
    assert_eq!(p.next_read_len(1000), 120);
    // Past the end of the table.
    let e = p.push(&b[192..313]).unwrap_err();
    assert!(matches!(e, BankError::InvalidInput(_)), "{e}");
    assert!(p.push(&b[192..200]).is_err(), "used after an error");
    assert!(p.finish().is_err());

    // Short: Truncated naming the table.
    let mut p = TableParser::new(&h, "t").unwrap();
    p.push(&b[64..300]).unwrap();
    let e = p.finish().unwrap_err();
    assert!(
        matches!(
            e,
            BankError::Truncated {
                region: Region::Table,
                source_len: 300,
                ..
            }
        ),
        "{e}"
    );

    // Byte by byte equals one piece.
    let mut p = TableParser::new(&h, "t").unwrap();
    for byte in &b[64..312] {
        p.push(std::slice::from_ref(byte)).unwrap();
    }
    assert_eq!(p.next_read_len(1000), 0);
    assert_eq!(p.finish().unwrap(), BankMeta::parse(&b, "t").unwrap());
}

/// Parses `bytes` like `BankMeta::parse`, but feeding the table to the
/// parser in pieces of the given sizes (cycled).
fn parse_in_pieces(bytes: &[u8], sizes: &[usize]) -> Result<BankMeta, BankError> {
    let h = parse_header(bytes, "x")?;
    check_source_len(&h, bytes.len() as u64, "x")?;
    let mut p = TableParser::new(&h, "x")?;
    let table = &bytes[HEADER_LEN as usize..p.meta_len() as usize];
    let mut at = 0;
    for k in 0..=table.len() {
        if at == table.len() {
            break;
        }
        let n = sizes[k % sizes.len()].min(table.len() - at);
        p.push(&table[at..at + n])?;
        at += n;
    }
    p.finish()
}

fn same(a: &Result<BankMeta, BankError>, b: &Result<BankMeta, BankError>) -> bool {
    match (a, b) {
        (Ok(x), Ok(y)) => x == y,
        (Err(x), Err(y)) => x.to_string() == y.to_string(),
        _ => false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Feeding the table in pieces of random sizes gives exactly what one
    /// piece gives: the same metadata for valid banks, the same error for
    /// mutated ones (with and without recomputed checksums). The reader,
    /// with a random chunk size, agrees too.
    #[test]
    fn chunked_parsing_equals_one_shot(
        (_, _, bytes) in arb_bank(),
        sizes in prop::collection::vec(1usize..100, 1..6),
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..3),
        do_reseal in any::<bool>(),
    ) {
        let mut b = bytes.clone();
        let meta = BankMeta::parse(&bytes, "x").unwrap().meta_len() as usize;
        for (idx, x) in &flips {
            b[idx.index(meta)] ^= x;
        }
        if do_reseal {
            reseal(&mut b);
        }
        let one = BankMeta::parse(&b, "x");
        if flips.is_empty() {
            prop_assert!(one.is_ok(), "{:?}", one);
        }
        let pieces = parse_in_pieces(&b, &sizes);
        prop_assert!(same(&one, &pieces), "{:?} vs {:?}", one, pieces);
        let read = BankReader::open_chunked(MemSource::named(b.clone(), "x"), sizes[0])
            .map(|r| r.meta().clone());
        prop_assert!(same(&one, &read), "{:?} vs {:?}", one, read);
    }
}

#[test]
fn padding_is_verified_and_a_non_zero_byte_is_named() {
    let b = tiny_bank();
    let r = open(&b).unwrap();
    r.verify_padding().unwrap();
    r.verify_all(|_| {}).unwrap();
    assert_eq!(r.padding_len(), 20504 - 312 - (8 + 8 + 4 + 24 + 24));

    // (offset, what the padding follows): after the table, between pages.
    for (at, after) in [
        (312usize, Region::Table),
        (1000, Region::Table),
        (4095, Region::Table),
        (4104 + 7, Region::Page(0)),
        (16408, Region::Page(3)),
        (20479, Region::Page(3)),
    ] {
        let mut bad = b.clone();
        bad[at] = 0x5a;
        // Header, table and pages are intact: it opens and every page reads.
        let r = open(&bad).unwrap();
        for p in 0..r.page_count() {
            r.read_page(p).unwrap();
        }
        for e in [
            r.verify_padding().unwrap_err(),
            r.verify_all(|_| {}).unwrap_err(),
        ] {
            match &e {
                BankError::NonZeroPadding {
                    location,
                    after: a,
                    offset,
                    byte,
                } => {
                    assert_eq!(
                        (location.as_str(), *a, *offset, *byte),
                        ("test.bank", after, at as u64, 0x5a)
                    );
                }
                other => panic!("byte {at}: expected NonZeroPadding, got {other:?}"),
            }
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("byte offset {at}")) && msg.contains("0x5a"),
                "{msg}"
            );
        }
    }
}

#[test]
fn padding_longer_than_a_chunk_is_read_in_chunks() {
    // Alignment 4 MiB: about 4 MiB of padding before the first page.
    let layout = BankLayout::new(vec![SectionSpec::pkm_values(3, 2, 2, Dtype::F32)])
        .with_page_align(4 << 20);
    let mut w = BankWriter::new(std::io::Cursor::new(Vec::new()), &layout).unwrap();
    w.write_rows(&[1.0; 6]).unwrap();
    let mut b = w.finish().unwrap().into_inner();
    let first = BankMeta::parse(&b, "x").unwrap().pages[0].offset;
    assert_eq!(first, 4 << 20);
    let at = first - 100;
    b[at as usize] = 1;
    let len = b.len() as u64;
    let src = HostileSource::new(len, b, |_| 0);
    let r = BankReader::open(&src).unwrap();
    let e = r.verify_padding().unwrap_err();
    assert!(
        matches!(e, BankError::NonZeroPadding { offset, byte: 1, after: Region::Table, .. } if offset == at),
        "{e}"
    );
    assert!(src.largest_read() <= READ_CHUNK_LEN, "{:?}", src.reads());
}

#[test]
fn padding_of_a_truncated_file_names_the_cut_page() {
    let b = tiny_bank();
    // Cut inside the padding before page 1 (8192): page 1 is the one named.
    let r = open(&b[..6000]).unwrap();
    let e = r.verify_padding().unwrap_err();
    assert!(
        matches!(
            e,
            BankError::Truncated {
                region: Region::Page(1),
                offset: 8192,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(r.verify_all(|_| {}).unwrap_err().page(), Some(1));
}

/// Runs `FileSource::open(path)` on a thread; the test fails if it does
/// not return within 5 s (a blocking open).
#[cfg(unix)]
fn file_source_open_within_5s(path: &Path) -> Result<FileSource, SourceError> {
    let (tx, rx) = mpsc::channel();
    let p = path.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(FileSource::open(&p));
    });
    rx.recv_timeout(Duration::from_secs(5)).unwrap_or_else(|_| {
        panic!(
            "FileSource::open({}) blocked for 5 s instead of failing",
            path.display()
        )
    })
}

#[cfg(unix)]
fn assert_not_regular(r: Result<FileSource, SourceError>, path: &Path, want: &str) {
    match r {
        Err(SourceError::NotRegularFile { location, kind }) => {
            assert_eq!(location, path.display().to_string());
            assert_eq!(kind, want);
        }
        other => panic!("{}: expected NotRegularFile, got {other:?}", path.display()),
    }
}

#[cfg(unix)]
#[test]
fn a_fifo_a_directory_and_a_device_are_refused_without_blocking() {
    let dir = TempDir::new("fifo");
    let fifo = dir.path().join("pipe.bank");
    source::testing::mkfifo(&fifo);
    let r = file_source_open_within_5s(&fifo);
    let msg = r.as_ref().map(|_| ()).unwrap_err().to_string();
    assert!(
        msg.contains("pipe.bank") && msg.contains("FIFO") && msg.contains("not a regular file"),
        "{msg}"
    );
    assert_not_regular(r, &fifo, "FIFO (named pipe)");

    assert_not_regular(
        file_source_open_within_5s(dir.path()),
        dir.path(),
        "directory",
    );
    let null = Path::new("/dev/null");
    if null.exists() {
        assert_not_regular(file_source_open_within_5s(null), null, "character device");
    }

    // A symlink to a regular file is followed and opens.
    let real = dir.path().join("real.bank");
    std::fs::write(&real, tiny_bank()).unwrap();
    let link = dir.path().join("link.bank");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let r = BankReader::open(file_source_open_within_5s(&link).unwrap()).unwrap();
    r.verify_all(|_| {}).unwrap();
}
