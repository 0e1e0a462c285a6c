//! `memlayer inspect` on hostile inputs: a sparse 1 TiB file whose valid
//! header claims a 1 TiB page table, a bank whose padding is not zero, and
//! paths that are not regular files. Every run is bounded in time and must
//! end as a clean failure (exit code 1), never an abort or a signal.

mod common;
use common::*;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use memlayer_bank::format::encode_header;
use memlayer_bank::source::testing::sparse_file;
use memlayer_bank::{BankReader, FileSource, HEADER_LEN, Header, PAGE_ENTRY_LEN, VERSION};

const TIB: u64 = 1 << 40;
/// Generous bound for one `memlayer inspect` run (they take milliseconds).
const LIMIT: Duration = Duration::from_secs(30);

fn inspect(path: &Path, verify: bool) -> Output {
    let p = path.to_str().expect("utf-8 path");
    if verify {
        memlayer_within(&["inspect", p, "--verify"], LIMIT)
    } else {
        memlayer_within(&["inspect", p], LIMIT)
    }
}

/// A clean failure: exit code 1 with an `error:` line, not killed by a signal.
fn assert_clean_failure(out: &Output) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            out.status.signal(),
            None,
            "killed by a signal (abort?): {}",
            text(&out.stderr)
        );
    }
    assert_fails(out)
}

#[test]
fn inspect_of_a_sparse_terabyte_file_fails_with_the_named_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("huge.bank");
    // A valid header whose page table fills the whole terabyte.
    let pages = (TIB - HEADER_LEN) / PAGE_ENTRY_LEN;
    let header = encode_header(&Header {
        version: VERSION,
        page_align: 4096,
        section_count: 0,
        page_count: pages,
        file_len: TIB,
        table_checksum: 0,
    });
    let test = "inspect_of_a_sparse_terabyte_file_fails_with_the_named_error";
    if !sparse_file(&path, TIB, &header, test).expect("sparse 1 TiB file") {
        return;
    }
    for verify in [false, true] {
        let err = assert_clean_failure(&inspect(&path, verify));
        assert!(err.contains("huge.bank"), "{err}");
        assert!(err.contains(&format!("{pages} pages")), "{err}");
        assert!(
            err.contains("a reader accepts") && err.contains("268435456"),
            "{err}"
        );
        assert!(!err.contains("memory allocation"), "{err}");
    }
}

#[test]
fn inspect_verify_names_a_non_zero_padding_byte() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pad.bank");
    // 24-byte pages at 4096-byte alignment: padding after the table and between pages.
    synth_bank(&path, 10, 3, 2, 1, &["--dtype", "f32"]);
    let (meta_len, page0_end, page1) = {
        let bank = BankReader::open(FileSource::open(&path).expect("source")).expect("bank");
        (
            bank.meta().meta_len(),
            bank.page(0).expect("page 0").end(),
            bank.page(1).expect("page 1").offset,
        )
    };
    assert!(page0_end + 100 < page1 && meta_len + 100 < 4096);
    let good = std::fs::read(&path).expect("read");
    let out = assert_ok(&inspect(&path, true));
    assert!(out.contains("verified 5 pages"), "{out}");
    assert!(out.contains("bytes of padding, all zero"), "{out}");

    for (at, after) in [
        (meta_len + 100, "padding after the page table"),
        (page0_end + 100, "padding after page 0"),
    ] {
        let mut bad = good.clone();
        bad[at as usize] = 0x7f;
        std::fs::write(&path, &bad).expect("write");
        // Header, table and pages are intact: a plain inspect still works.
        assert_ok(&inspect(&path, false));
        let err = assert_clean_failure(&inspect(&path, true));
        assert!(err.contains("pad.bank"), "{err}");
        assert!(
            err.contains(&format!("{after} at byte offset {at} is 0x7f, not zero")),
            "{err}"
        );
    }
    std::fs::write(&path, &good).expect("write");
    assert_ok(&inspect(&path, true));
}

#[cfg(unix)]
#[test]
fn inspect_of_a_fifo_or_a_directory_fails_fast_with_the_named_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("pipe.bank");
    memlayer_bank::source::testing::mkfifo(&fifo);
    let short = Duration::from_secs(10);
    for verify in [false, true] {
        let p = fifo.to_str().expect("utf-8 path");
        let args: &[&str] = if verify {
            &["inspect", p, "--verify"]
        } else {
            &["inspect", p]
        };
        let err = assert_clean_failure(&memlayer_within(args, short));
        assert!(
            err.contains("pipe.bank")
                && err.contains("FIFO (named pipe)")
                && err.contains("not a regular file"),
            "{err}"
        );
    }
    let d = dir.path().to_str().expect("utf-8 path");
    let err = assert_clean_failure(&memlayer_within(&["inspect", d], short));
    assert!(
        err.contains("directory, not a regular file") && err.contains(d),
        "{err}"
    );
}
