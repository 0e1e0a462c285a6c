//! `memlayer inspect FILE [--verify]`: print a bank's header, sections and
//! page table; `--verify` reads every page and checks its checksum, and
//! checks that the padding between the table and the pages is zero.

use clap::Args;
use memlayer_bank::{BankReader, FileSource, PageEntry, SectionInfo};

/// Arguments of `memlayer inspect`.
#[derive(Args)]
pub struct InspectArgs {
    /// Bank file to inspect.
    pub file: std::path::PathBuf,
    /// Read and verify every page (checksums) and every padding byte (zero).
    #[arg(long)]
    pub verify: bool,
}

/// Pages shown at each end of the page-table summary.
const SHOWN: u64 = 3;

/// Prints the bank summary; fails (naming the first bad page) on any check.
pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    let source = FileSource::open(&args.file)?;
    let bank = BankReader::open(source)?;
    let h = bank.header();
    let meta_len = bank.meta().meta_len();
    println!("bank {}", bank.location());
    println!(
        "  format version {}, page alignment {} bytes, {}, {}",
        h.version,
        h.page_align,
        plural(bank.sections().len() as u64, "section"),
        plural(bank.page_count(), "page")
    );
    println!(
        "  file size {} bytes (header says {}), header + page table {meta_len} bytes",
        bank.source_len(),
        h.file_len
    );
    for s in bank.sections() {
        println!("{}", describe_section(s));
    }
    println!("page table:");
    println!(
        "  {:>10}  {:>14}  {:>10}  checksum",
        "page", "offset", "length"
    );
    let n = bank.page_count();
    for id in 0..n {
        if n > 2 * SHOWN && id == SHOWN {
            println!("  {:>10}", "...");
        }
        if n > 2 * SHOWN && (SHOWN..n - SHOWN).contains(&id) {
            continue;
        }
        let e: &PageEntry = bank.page(id)?;
        println!(
            "  {id:>10}  {:>14}  {:>10}  {:#018x}",
            e.offset, e.length, e.checksum
        );
    }
    if let Some(page) = bank.first_truncated_page() {
        // Reading the first missing page gives the precise `Truncated` error.
        bank.read_page(page)?;
        anyhow::bail!(
            "{}: page {page} is truncated (file is {} bytes)",
            bank.location(),
            bank.source_len()
        );
    }
    if args.verify {
        // Pages against their checksums, padding (in bounded chunks) against zero.
        bank.verify_all(|_| {})?;
        let bytes: u64 = bank.pages().iter().map(|e| e.length).sum();
        println!(
            "verified {} ({bytes} bytes): all checksums match; {} bytes of padding, all zero",
            plural(n, "page"),
            bank.padding_len()
        );
    }
    Ok(())
}

/// `1 page`, `3 pages`.
fn plural(n: u64, what: &str) -> String {
    if n == 1 {
        format!("{n} {what}")
    } else {
        format!("{n} {what}s")
    }
}

fn describe_section(s: &SectionInfo) -> String {
    let g = &s.geometry;
    let pages = s.page_ids();
    let shape = s.shape_summary();
    format!(
        "section {}: {shape}; pages {}..{} ({} pages, {} bytes per full page)",
        s.index, pages.start, pages.end, g.page_count, g.page_bytes
    )
}
