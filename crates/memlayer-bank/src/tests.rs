//! Tests of the bank format: golden layout, write→read property tests,
//! corruption/truncation detection, and a no-panic fuzz-style proptest.

use std::io::Cursor;

use proptest::prelude::*;

use super::format::{align_up, checksum, parse_header};
use super::*;
use memlayer_core::rng::Rng;

/// Writes `layout` with `values[s]` holding each section's rows, in memory.
pub(super) fn write_bank(
    layout: &BankLayout,
    values: &[Vec<f32>],
    chunks: &[usize],
    by_page: bool,
) -> Vec<u8> {
    let mut w = BankWriter::new(Cursor::new(Vec::new()), layout).unwrap();
    let plan = w.plan().clone();
    for (s, vals) in plan.sections.iter().zip(values) {
        let dim = s.geometry.dim as usize;
        if by_page {
            let mut at = 0;
            for local in 0..s.geometry.page_count {
                let n = s.geometry.rows_in_page(local) as usize * dim;
                w.write_page(&vals[at..at + n]).unwrap();
                at += n;
            }
        } else {
            let mut at = 0;
            let mut k = 0;
            while at < vals.len() {
                let rows = chunks
                    .get(k % chunks.len().max(1))
                    .copied()
                    .unwrap_or(1)
                    .max(1);
                let n = (rows * dim).min(vals.len() - at);
                w.write_rows(&vals[at..at + n]).unwrap();
                at += n;
                k += 1;
            }
        }
    }
    w.finish().unwrap().into_inner()
}

pub(super) fn open(bytes: &[u8]) -> Result<BankReader<MemSource>, BankError> {
    BankReader::open(MemSource::named(bytes.to_vec(), "test.bank"))
}

/// Recomputes the table and header checksums from the (possibly mutated)
/// counts, so mutations reach the field validation behind the checksums.
pub(super) fn reseal(bytes: &mut [u8]) {
    if bytes.len() < 64 {
        return;
    }
    let sections = u64::from(u32::from_le_bytes(bytes[20..24].try_into().unwrap()));
    let pages = u64::from_le_bytes(bytes[24..32].try_into().unwrap());
    if let Some(meta) = format::meta_len(sections, pages)
        && meta <= bytes.len() as u64
    {
        let sum = checksum(&bytes[64..meta as usize]);
        bytes[40..48].copy_from_slice(&sum.to_le_bytes());
    }
    let sum = checksum(&bytes[0..56]);
    bytes[56..64].copy_from_slice(&sum.to_le_bytes());
}

/// The tiny bank documented in `docs/FORMAT.md`.
pub(super) fn tiny_bank() -> Vec<u8> {
    let layout = BankLayout::new(vec![
        SectionSpec::pkm_values(5, 2, 2, Dtype::F16),
        SectionSpec::ffn_blocks(1, 2, 1, 1, 2, Dtype::F32),
    ]);
    let pkm = [1.0, -1.0, 0.5, 2.0, 0.0, -0.0, 3.0, 0.25, -2.0, 1.5];
    let blocks: Vec<f32> = (0..12).map(|i| i as f32).collect();
    write_bank(&layout, &[pkm.to_vec(), blocks], &[2], false)
}

#[test]
fn golden_tiny_bank_layout() {
    let b = tiny_bank();
    // header
    assert_eq!(&b[0..8], b"MEMLBANK");
    assert_eq!(&b[8..12], &1u32.to_le_bytes()); // version
    assert_eq!(&b[12..16], &0u32.to_le_bytes()); // flags
    assert_eq!(&b[16..20], &4096u32.to_le_bytes()); // page_align
    assert_eq!(&b[20..24], &2u32.to_le_bytes()); // section_count
    assert_eq!(&b[24..32], &5u64.to_le_bytes()); // page_count (3 + 2)
    assert_eq!(&b[32..40], &20504u64.to_le_bytes()); // file_len
    assert_eq!(&b[48..56], &[0u8; 8]); // reserved
    let meta = 64 + 2 * 64 + 5 * 24;
    assert_eq!(meta, 312);
    assert_eq!(
        u64::from_le_bytes(b[40..48].try_into().unwrap()),
        checksum(&b[64..meta])
    );
    assert_eq!(
        u64::from_le_bytes(b[56..64].try_into().unwrap()),
        checksum(&b[0..56])
    );
    // Pinned values from docs/FORMAT.md, cross-checked with the reference
    // implementation (`xxhsum -H3`, XXH3_64bits with seed 0).
    assert_eq!(checksum(&b[0..56]), 0x16dc_e9df_e2f9_930a);
    assert_eq!(checksum(&b[64..meta]), 0xced1_3c6d_99ff_5c54);
    assert_eq!(checksum(&b[4096..4104]), 0xbf39_cba5_ba5b_8d09);
    // section 0: pkm_values f16, pages 0..3, rows 5, dim 2, page_rows 2
    let s0 = &b[64..128];
    assert_eq!(&s0[0..8], &[1, 0, 0, 0, 2, 0, 0, 0]);
    assert_eq!(
        &s0[8..24],
        &[0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(
        &s0[24..40],
        &[5, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0]
    );
    assert!(s0[40..].iter().all(|&x| x == 0));
    // section 1: ffn_blocks f32, pages 3..5, nodes 2, dim 2, units 1, layers 1, level 1
    let s1 = &b[128..192];
    assert_eq!(&s1[0..8], &[2, 0, 0, 0, 1, 0, 0, 0]);
    assert_eq!(
        &s1[8..24],
        &[3, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(
        &s1[24..48],
        &[
            2, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0
        ]
    );
    assert!(s1[48..].iter().all(|&x| x == 0));
    // page table: offsets / lengths
    let expect = [
        (4096u64, 8u64),
        (8192, 8),
        (12288, 4),
        (16384, 24),
        (20480, 24),
    ];
    for (i, (off, len)) in expect.iter().enumerate() {
        let e = &b[192 + 24 * i..216 + 24 * i];
        assert_eq!(
            u64::from_le_bytes(e[0..8].try_into().unwrap()),
            *off,
            "page {i}"
        );
        assert_eq!(
            u64::from_le_bytes(e[8..16].try_into().unwrap()),
            *len,
            "page {i}"
        );
        let page = &b[*off as usize..(*off + *len) as usize];
        assert_eq!(
            u64::from_le_bytes(e[16..24].try_into().unwrap()),
            checksum(page),
            "page {i}"
        );
    }
    // page bytes: f16 1.0 = 0x3c00, -1.0 = 0xbc00, 0.5 = 0x3800, 2.0 = 0x4000
    assert_eq!(
        &b[4096..4104],
        &[0x00, 0x3c, 0x00, 0xbc, 0x00, 0x38, 0x00, 0x40]
    );
    assert_eq!(&b[12288..12292], &[0x00, 0xc0, 0x00, 0x3e]); // -2.0, 1.5
    assert_eq!(&b[16384..16388], &0.0f32.to_le_bytes());
    // padding is zero
    assert!(b[312..4096].iter().all(|&x| x == 0));
    assert!(b[4104..8192].iter().all(|&x| x == 0));
    assert_eq!(b.len(), 20504);

    let r = open(&b).unwrap();
    assert_eq!(r.sections().len(), 2);
    assert_eq!(r.read_row(0, 4).unwrap(), vec![-2.0, 1.5]);
    assert_eq!(
        r.read_page_f32(4).unwrap(),
        (6..12).map(|i| i as f32).collect::<Vec<_>>()
    );
    assert_eq!(r.sections()[1].block_page(1), Some(4));
    assert_eq!(r.section_of_page(3).unwrap().1, 0);
    assert_eq!(r.meta(), &BankMeta::parse(&b, "test.bank").unwrap());
}

#[test]
fn empty_layout_is_a_valid_bank() {
    let b = write_bank(&BankLayout::new(vec![]), &[], &[], false);
    assert_eq!(b.len(), 64);
    let r = open(&b).unwrap();
    assert_eq!(r.page_count(), 0);
    assert!(matches!(
        r.read_page(0),
        Err(BankError::PageOutOfRange {
            page: 0,
            page_count: 0,
            ..
        })
    ));
}

#[test]
fn typed_errors_for_bad_magic_version_and_trailing_bytes() {
    let b = tiny_bank();
    let e = open(b"hello world, this is not a bank at all.....").unwrap_err();
    assert!(matches!(e, BankError::BadMagic { .. }), "{e}");
    assert!(e.to_string().contains("test.bank"), "{e}");
    assert!(matches!(
        open(b"").unwrap_err(),
        BankError::Truncated {
            region: Region::Header,
            ..
        }
    ));
    assert!(matches!(
        open(b"MEML").unwrap_err(),
        BankError::Truncated {
            region: Region::Header,
            ..
        }
    ));
    assert!(matches!(
        open(b"x").unwrap_err(),
        BankError::BadMagic { .. }
    ));

    let mut v2 = b.clone();
    v2[8] = 2;
    let e = open(&v2).unwrap_err();
    assert!(
        matches!(e, BankError::UnsupportedVersion { version: 2, .. }),
        "{e}"
    );

    let mut long = b.clone();
    long.push(0);
    let e = open(&long).unwrap_err();
    assert!(matches!(e, BankError::CorruptHeader { .. }), "{e}");
    assert!(e.to_string().contains("trailing"), "{e}");

    let r = open(&b).unwrap();
    let e = r.read_page(5).unwrap_err();
    assert!(matches!(
        e,
        BankError::PageOutOfRange {
            page: 5,
            page_count: 5,
            ..
        }
    ));
    assert!(r.read_page(u64::MAX).is_err());
    assert!(r.read_row(0, 5).is_err());
    assert!(r.read_row(2, 0).is_err());
}

#[test]
fn checksum_error_message_names_page_location_and_offset() {
    let mut b = tiny_bank();
    b[8192 + 3] ^= 0x40;
    let r = open(&b).unwrap();
    let e = r.read_page(1).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(
        e,
        BankError::ChecksumMismatch {
            page: 1,
            offset: 8192,
            ..
        }
    ));
    assert!(
        msg.contains("test.bank") && msg.contains("page 1") && msg.contains("8192"),
        "{msg}"
    );
    assert_eq!(e.page(), Some(1));
    assert!(r.verify_all(|_| {}).is_err());
}

#[test]
fn corrupted_table_fields_behind_valid_checksums_are_rejected() {
    let good = tiny_bank();
    let cases: Vec<(usize, Vec<u8>, &str)> = vec![
        (12, vec![1], "flags"),
        (16, vec![0, 0x30, 0, 0], "alignment"),
        (48, vec![1], "reserved"),
        (64, vec![9], "kind"),
        (68, vec![7], "dtype"),
        (72, vec![1], "first page"),
        (80, vec![4], "page count"),
        (88, vec![6], "rows"),
        (96, vec![0, 0, 0, 0], "dim"),
        (100, vec![0, 0, 0, 0], "page_rows"),
        (110, vec![1], "reserved section bytes"),
        (192, vec![1], "unaligned offset"),
        (192 + 24, vec![0, 0x10], "overlap"),
        (192 + 8, vec![9], "length"),
        (192 + 24 * 4 + 1, vec![0x60], "past file end"),
        (32, vec![0x19], "file length"),
        (24, vec![6], "header page count"),
        // Found by cargo-fuzz: layers * 3 * units overflowing u64 panicked.
        (128 + 36, vec![0xff; 8], "huge ffn block"),
        (128 + 24, vec![0xff; 8], "huge ffn node count"),
        (88, vec![0xff; 8], "huge row count"),
    ];
    for (at, patch, what) in cases {
        let mut b = good.clone();
        b[at..at + patch.len()].copy_from_slice(&patch);
        reseal(&mut b);
        let e = open(&b).expect_err(what);
        assert!(
            matches!(
                e,
                BankError::CorruptHeader { .. }
                    | BankError::CorruptTable { .. }
                    | BankError::Truncated { .. }
            ),
            "{what}: {e}"
        );
        assert!(BankMeta::parse(&b, "x").is_err(), "{what}");
    }
}

#[test]
fn file_writer_is_atomic_and_file_source_reads() {
    let dir = std::env::temp_dir().join(format!("memlayer-bank-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("b.bank");
    let layout = BankLayout::new(vec![SectionSpec::pkm_values(7, 3, 2, Dtype::Bf16)]);
    let vals = Rng::new(1).normal_vec(21, 0.0, 1.0);

    // An unfinished writer leaves nothing behind.
    {
        let mut w = BankFileWriter::create(&path, &layout).unwrap();
        w.write_rows(&vals[..6]).unwrap();
    }
    assert!(!path.exists());
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);

    let mut w = BankFileWriter::create(&path, &layout).unwrap();
    w.write_rows(&vals).unwrap();
    assert!(!path.exists(), "nothing at the destination before finish");
    let len = w.finish().unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        1,
        "no temp file left"
    );

    let r = BankReader::open(FileSource::open(&path).unwrap()).unwrap();
    assert_eq!(r.location(), path.display().to_string());
    for row in 0..7 {
        let got = r.read_row(0, row).unwrap();
        let want: Vec<f32> = vals[row as usize * 3..row as usize * 3 + 3]
            .iter()
            .map(|&x| round_trip(Dtype::Bf16, x))
            .collect();
        assert_eq!(got, want);
    }
    // A boxed dyn source works too.
    let boxed: Box<dyn PageSource> = Box::new(FileSource::open(&path).unwrap());
    let r2: BankReader = BankReader::open(boxed).unwrap();
    r2.verify_all(|_| {}).unwrap();

    // Overwrite an existing bank atomically.
    let mut w = BankFileWriter::create(&path, &layout).unwrap();
    w.write_rows(&[0.0; 21]).unwrap();
    w.finish().unwrap();
    let r = BankReader::open(FileSource::open(&path).unwrap()).unwrap();
    assert_eq!(r.read_row(0, 6).unwrap(), vec![0.0; 3]);

    let e = FileSource::open(dir.join("missing")).unwrap_err();
    assert!(e.to_string().contains("missing"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn writer_rejects_misuse() {
    let layout = BankLayout::new(vec![
        SectionSpec::pkm_values(3, 2, 2, Dtype::F32),
        SectionSpec::ffn_blocks(0, 1, 1, 1, 2, Dtype::F16),
    ]);
    let mut w = BankWriter::new(Cursor::new(Vec::new()), &layout).unwrap();
    assert!(w.write_rows(&[1.0; 3]).is_err(), "not whole rows");
    assert!(
        w.write_rows(&[1.0; 8]).is_err(),
        "more rows than the section"
    );
    assert!(w.write_page(&[1.0; 2]).is_err(), "short page");
    w.write_rows(&[1.0; 2]).unwrap();
    assert!(w.write_page(&[1.0; 4]).is_err(), "page partly filled");
    w.write_rows(&[1.0; 4]).unwrap();
    assert!(w.write_page_bytes(&[0; 3]).is_err(), "wrong byte length");
    let w2 = BankWriter::new(Cursor::new(Vec::new()), &layout).unwrap();
    assert!(w2.finish().is_err(), "incomplete");
    w.write_page(&[2.0; 6]).unwrap();
    assert!(w.write_rows(&[1.0; 2]).is_err(), "all written");
    assert!(w.write_page(&[1.0; 2]).is_err(), "all written");
    let b = w.finish().unwrap().into_inner();
    let r = open(&b).unwrap();
    assert_eq!(r.read_page_f32(2).unwrap(), vec![2.0; 6]);

    for bad in [
        BankLayout::new(vec![SectionSpec::pkm_values(0, 2, 2, Dtype::F32)]),
        BankLayout::new(vec![SectionSpec::pkm_values(2, 0, 2, Dtype::F32)]),
        BankLayout::new(vec![SectionSpec::pkm_values(2, 2, 0, Dtype::F32)]),
        BankLayout::new(vec![SectionSpec::ffn_blocks(0, 1, 0, 1, 2, Dtype::F32)]),
        BankLayout::new(vec![SectionSpec::pkm_values(
            u64::MAX,
            u32::MAX,
            u32::MAX,
            Dtype::F32,
        )]),
        BankLayout::new(vec![SectionSpec::pkm_values(2, 2, 2, Dtype::F32)]).with_page_align(3),
        BankLayout::new(vec![SectionSpec::pkm_values(2, 2, 2, Dtype::F32)]).with_page_align(4),
    ] {
        assert!(matches!(
            BankWriter::new(Cursor::new(Vec::new()), &bad).err(),
            Some(BankError::InvalidLayout(_))
        ));
    }
}

fn arb_section() -> impl Strategy<Value = SectionSpec> {
    let dtype = prop::sample::select(Dtype::ALL.to_vec());
    prop_oneof![
        (1u64..40, 1u32..6, 1u32..12, dtype.clone())
            .prop_map(|(r, d, p, t)| SectionSpec::pkm_values(r, d, p, t)),
        (0u32..4, 1u64..4, 1u32..3, 1u32..3, 1u32..5, dtype)
            .prop_map(|(l, n, ly, u, d, t)| SectionSpec::ffn_blocks(l, n, ly, u, d, t)),
    ]
}

/// A valid bank: layout, its values and the file bytes.
pub(super) fn arb_bank() -> impl Strategy<Value = (BankLayout, Vec<Vec<f32>>, Vec<u8>)> {
    (
        prop::collection::vec(arb_section(), 1..4),
        prop::sample::select(vec![8u32, 64, 4096]),
        any::<u64>(),
        prop::collection::vec(1usize..9, 1..4),
        any::<bool>(),
    )
        .prop_map(|(sections, align, seed, chunks, by_page)| {
            let layout = BankLayout::new(sections).with_page_align(align);
            let mut rng = Rng::new(seed);
            let values: Vec<Vec<f32>> = layout
                .plan()
                .unwrap()
                .sections
                .iter()
                .map(|s| {
                    let n = (s.geometry.rows * u64::from(s.geometry.dim)) as usize;
                    let mut v = rng.normal_vec(n, 0.0, 10.0);
                    // Specials, subnormals and out-of-range values for f16/bf16 rounding.
                    let specials = [
                        f32::INFINITY,
                        -1e-8,
                        70000.0,
                        f32::MIN_POSITIVE,
                        -0.0,
                        f32::NAN,
                    ];
                    for x in &mut v {
                        if rng.below(8) == 0 {
                            *x = specials[rng.below(specials.len() as u64) as usize];
                        }
                    }
                    v
                })
                .collect();
            let bytes = write_bank(&layout, &values, &chunks, by_page);
            (layout, values, bytes)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// write → read gives back every value (bit-exact for f32, the f16/bf16
    /// rounding of the input otherwise), page by page and row by row.
    #[test]
    fn write_then_read_round_trips((layout, values, bytes) in arb_bank()) {
        let r = open(&bytes).unwrap();
        prop_assert_eq!(r.sections().len(), layout.sections.len());
        prop_assert_eq!(r.header().page_align, layout.page_align);
        for (s, vals) in r.sections().iter().zip(&values) {
            prop_assert_eq!(s.spec, layout.sections[s.index]);
            let mut got = Vec::new();
            for p in s.page_ids() {
                let e = r.page(p).unwrap();
                prop_assert_eq!(e.offset % u64::from(layout.page_align), 0);
                got.extend(r.read_page_f32(p).unwrap());
            }
            prop_assert_eq!(got.len(), vals.len());
            for (g, x) in got.iter().zip(vals) {
                prop_assert_eq!(g.to_bits(), round_trip(s.spec.dtype, *x).to_bits());
            }
            let last = s.geometry.rows - 1;
            let dim = s.geometry.dim as usize;
            let row = r.read_row(s.index, last).unwrap();
            prop_assert_eq!(row.len(), dim);
            prop_assert_eq!(row[0].to_bits(), round_trip(s.spec.dtype, vals[last as usize * dim]).to_bits());
        }
        prop_assert_eq!(r.first_truncated_page(), None);
        let verified = r.verify_all(|_| {});
        prop_assert!(verified.is_ok(), "{:?}", verified);
        prop_assert_eq!(r.meta(), &BankMeta::parse(&bytes, "test.bank").unwrap());
    }

    /// Flipping any bit of any byte inside a page gives a checksum error
    /// naming that page (and its offset); every other page still reads.
    #[test]
    fn flipping_a_page_byte_names_the_page((_, _, bytes) in arb_bank(), pick in any::<prop::sample::Index>(), bit in 0u8..8) {
        let r = open(&bytes).unwrap();
        let page = pick.index(r.page_count() as usize) as u64;
        let e = *r.page(page).unwrap();
        let at = e.offset + (pick.index(e.length as usize * 7 + 3) as u64 % e.length);
        let mut bad = bytes.clone();
        bad[at as usize] ^= 1 << bit;
        let r = open(&bad).unwrap();
        match r.read_page(page) {
            Err(BankError::ChecksumMismatch { page: p, offset, expected, got, .. }) => {
                prop_assert_eq!(p, page);
                prop_assert_eq!(offset, e.offset);
                prop_assert_eq!(expected, e.checksum);
                prop_assert_ne!(got, expected);
            }
            other => prop_assert!(false, "expected a checksum error, got {:?}", other),
        }
        let e = r.verify_all(|_| {}).unwrap_err();
        prop_assert_eq!(e.page(), Some(page));
        for p in (0..r.page_count()).filter(|&p| p != page) {
            prop_assert!(r.read_page(p).is_ok());
        }
    }

    /// Any change to the header or page table is detected when opening.
    #[test]
    fn flipping_a_header_or_table_byte_fails_open((_, _, bytes) in arb_bank(), pick in any::<prop::sample::Index>(), bit in 0u8..8) {
        let meta = BankMeta::parse(&bytes, "x").unwrap().meta_len() as usize;
        let at = pick.index(meta);
        let mut bad = bytes.clone();
        bad[at] ^= 1 << bit;
        let e = open(&bad).unwrap_err();
        let ok = matches!(
            e,
            BankError::BadMagic { .. }
                | BankError::UnsupportedVersion { .. }
                | BankError::CorruptHeader { .. }
                | BankError::CorruptTable { .. }
        );
        prop_assert!(ok, "byte {}: {}", at, e);
    }

    /// Truncating anywhere gives a `Truncated` error naming the header, the
    /// table, or the first page that lost bytes; earlier pages still read.
    #[test]
    fn truncation_names_the_first_affected_page((_, _, bytes) in arb_bank(), pick in any::<prop::sample::Index>()) {
        let full = BankMeta::parse(&bytes, "x").unwrap();
        let t = pick.index(bytes.len());
        let cut = &bytes[..t];
        let meta = full.meta_len() as usize;
        if t < 64 {
            let e = open(cut).unwrap_err();
            prop_assert!(matches!(e, BankError::Truncated { region: Region::Header, .. }), "{}", e);
        } else if t < meta {
            let e = open(cut).unwrap_err();
            prop_assert!(matches!(e, BankError::Truncated { region: Region::Table, .. }), "{}", e);
        } else {
            let r = open(cut).unwrap();
            let first = full.pages.iter().position(|e| e.end() > t as u64).map(|i| i as u64);
            prop_assert_eq!(r.first_truncated_page(), first);
            let first = first.unwrap();
            for p in 0..first {
                prop_assert!(r.read_page(p).is_ok());
            }
            let e = r.read_page(first).unwrap_err();
            prop_assert!(matches!(e, BankError::Truncated { region: Region::Page(p), .. } if p == first), "{}", e);
            let needle = format!("page {}", first);
            prop_assert!(e.to_string().contains(&needle), "{}", e);
            prop_assert_eq!(r.verify_all(|_| {}).unwrap_err().page(), Some(first));
        }
    }

    /// Arbitrary bytes, and valid banks with random mutations (flips,
    /// overwrites with extreme values, truncation, extension — some with
    /// checksums recomputed so field validation is reached) never panic.
    #[test]
    fn parser_never_panics_on_mutated_input(
        (_, _, bytes) in arb_bank(),
        garbage in prop::collection::vec(any::<u8>(), 0..600),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u64>(), 0u8..4), 0..6),
        cut in any::<prop::sample::Index>(),
        mode in 0u8..5,
        do_reseal in any::<bool>(),
    ) {
        let mut b = match mode {
            0 => garbage.clone(),
            1 => { let mut b = MAGIC.to_vec(); b.extend(&garbage); b }
            _ => bytes.clone(),
        };
        if !b.is_empty() {
            let meta = BankMeta::parse(&bytes, "x").map(|m| m.meta_len() as usize).unwrap_or(64).min(b.len());
            for (idx, val, kind) in &edits {
                // Most edits target the header/table, where the parser's logic is.
                let at = if mode == 4 { idx.index(b.len()) } else { idx.index(meta.max(1)) };
                match kind {
                    0 => b[at] ^= *val as u8,
                    1 => { let n = (b.len() - at).min(8); b[at..at + n].copy_from_slice(&val.to_le_bytes()[..n]); }
                    2 => { let n = (b.len() - at).min(8); b[at..at + n].copy_from_slice(&u64::MAX.to_le_bytes()[..n]); }
                    _ => { let n = (b.len() - at).min(4); b[at..at + n].copy_from_slice(&(*val as u32 % 5).to_le_bytes()[..n]); }
                }
            }
        }
        if mode == 3 { b.truncate(cut.index(b.len() + 1)); }
        if mode == 2 { b.extend(&garbage); }
        if do_reseal { reseal(&mut b); }
        let _ = BankMeta::parse(&b, "x");
        if let Ok(r) = open(&b) {
            for p in 0..r.page_count() {
                let _ = r.read_page_f32(p);
            }
            let _ = r.verify_all(|_| {});
        }
        let _ = parse_header(&b, "x");
    }
}

#[test]
fn align_up_works() {
    assert_eq!(align_up(0, 4096), Some(0));
    assert_eq!(align_up(1, 4096), Some(4096));
    assert_eq!(align_up(4096, 4096), Some(4096));
    assert_eq!(align_up(u64::MAX, 8), None);
}
