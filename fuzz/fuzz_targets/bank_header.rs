//! Fuzzes the bank header/page-table parser and checksum-verified page reads.
//!
//! Every input is parsed twice: as given (exercises magic, version, the
//! header/table checksums and truncation), and "resealed" — with the table
//! and header checksums recomputed from the input's own counts — so the
//! fuzzer also reaches the field validation behind the checksums (an xxh3
//! checksum is not something a fuzzer can solve for).
#![no_main]

use libfuzzer_sys::fuzz_target;
use memlayer_bank::format::{checksum, meta_len};
use memlayer_bank::{BankMeta, BankReader, MemSource};

fn exercise(data: &[u8]) {
    let parsed = BankMeta::parse(data, "fuzz");
    let opened = BankReader::open(MemSource::named(data.to_vec(), "fuzz"));
    assert_eq!(parsed.is_ok(), opened.is_ok(), "parse and open disagree");
    if let Ok(bank) = opened {
        let _ = bank.first_truncated_page();
        for page in 0..bank.page_count() {
            let _ = bank.read_page_f32(page);
        }
        let _ = bank.read_page(bank.page_count());
        for s in 0..bank.sections().len() {
            let _ = bank.read_row(s, 0);
        }
    }
}

fn reseal(bytes: &mut [u8]) {
    if bytes.len() < 64 {
        return;
    }
    let sections = u64::from(u32::from_le_bytes([
        bytes[20], bytes[21], bytes[22], bytes[23],
    ]));
    let mut pages = [0u8; 8];
    pages.copy_from_slice(&bytes[24..32]);
    let pages = u64::from_le_bytes(pages);
    if let Some(end) = meta_len(sections, pages)
        && end <= bytes.len() as u64
    {
        let sum = checksum(&bytes[64..end as usize]);
        bytes[40..48].copy_from_slice(&sum.to_le_bytes());
    }
    let sum = checksum(&bytes[0..56]);
    bytes[56..64].copy_from_slice(&sum.to_le_bytes());
}

fuzz_target!(|data: &[u8]| {
    exercise(data);
    let mut sealed = data.to_vec();
    reseal(&mut sealed);
    exercise(&sealed);
});
