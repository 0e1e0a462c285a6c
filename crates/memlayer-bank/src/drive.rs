//! The two drivers of the page-in engine ([`PageIn`]): each asks the engine
//! for a run's misses, fetches them from its source, writes each into its
//! slot through a caller-supplied closure (host slots, wgpu buffers) and
//! reports every arrival or failure back. A failure frees its slot and
//! leaves the page non-resident, so the memory stays consistent: a page is
//! in the page table only once its verified data is in its slot, and the
//! error names the page and the source.
//!
//! - **blocking** (native): [`page_in_blocking`] and [`block_blocking`]
//!   over a [`BankReader`] (file, HTTP Range), the misses of a run read by a
//!   [`FetchBurst`] — [`Sequential`] here, a bounded thread pool in
//!   `memlayer-runtime` (the bank crate spawns nothing: it builds for wasm32)
//!   — or, when the source batches ([`PageSource::batches_reads`]: HTTP),
//!   handed to it whole ([`BankReader::read_pages`]);
//! - **async** (browser): [`page_in_async`], [`block_async`] and
//!   [`prefetch_async`] over a [`RemoteBank`], every miss of a run (every
//!   level's block) in flight at once ([`RemoteBank::read_pages`]).
//!
//! The write closure gets `(slot, values)`: the page's values as f32,
//! `≤ page_rows × dim` of them (the last page may be short).

use crate::cache::SlotId;
use crate::pagein::{BlockStep, PageIn, PageInError};
use crate::remote::{FetchedPage, PageFetch, RemoteBank, RemoteError};
use crate::{BankError, PageId, decode_into};
#[cfg(not(all(target_arch = "wasm32", target_os = "unknown")))]
use crate::{BankReader, PageSource};

/// How a blocking driver runs a burst of page reads (the misses of a run).
pub trait FetchBurst {
    /// Calls `read(i)` for every `i in 0..n` and returns the `n` results in
    /// order (concurrently or not, as the implementation likes).
    fn run(
        &self,
        n: usize,
        read: &(dyn Fn(usize) -> Result<Vec<f32>, BankError> + Sync),
    ) -> Vec<Result<Vec<f32>, BankError>>;
}

/// Reads one page after the other on the calling thread (the right choice
/// for a local file).
#[derive(Clone, Copy, Debug, Default)]
pub struct Sequential;

impl FetchBurst for Sequential {
    fn run(
        &self,
        n: usize,
        read: &(dyn Fn(usize) -> Result<Vec<f32>, BankError> + Sync),
    ) -> Vec<Result<Vec<f32>, BankError>> {
        (0..n).map(read).collect()
    }
}

/// The error of a slot write.
fn slot_error(page: PageId, location: &str, slot: SlotId, message: String) -> PageInError {
    PageInError::Slot {
        page,
        location: location.to_string(),
        slot,
        message,
    }
}

/// Reports one miss's outcome to the engine; keeps the first failure.
fn settle<B: Clone>(
    engine: &mut PageIn<B>,
    (page, slot): (PageId, SlotId),
    outcome: Result<(u64, bool), PageInError>,
    failure: &mut Option<PageInError>,
) {
    match outcome {
        Ok((bytes, local_copy)) => {
            engine.arrived(page, slot, bytes, local_copy);
        }
        Err(e) => {
            // not resident: a later access fetches it again
            engine.failed(page, slot);
            failure.get_or_insert(e);
        }
    }
}

/// Makes the value pages `pages` (distinct local ids: one run of
/// [`PageIn::value_runs`]) resident together, reading the misses from
/// `bank` (checksums verified) with `burst` (a single miss is read on the
/// calling thread) and writing each with `write(slot, values)`. Counts the
/// wait in [`crate::pagein::MemoryStats::fetch_seconds`].
///
/// Every miss is settled before returning: the ones that arrived are
/// published, the ones that failed are not resident; the first failure is
/// returned (it names the page and the bank's path or URL).
#[cfg(not(all(target_arch = "wasm32", target_os = "unknown")))]
pub fn page_in_blocking<B: Clone, S: PageSource>(
    engine: &mut PageIn<B>,
    bank: &BankReader<S>,
    burst: &(impl FetchBurst + ?Sized),
    pages: &[u32],
    mut write: impl FnMut(SlotId, &[f32]) -> Result<(), String>,
) -> Result<(), PageInError> {
    let misses = engine.admit(pages)?;
    if misses.is_empty() {
        return Ok(());
    }
    let t0 = std::time::Instant::now();
    let fetched = match misses.as_slice() {
        [(page, _)] => vec![bank.read_page_f32(*page)],
        // one batch for the whole burst: an HTTP source asks for all of it
        // in as few requests as it can (multi-range, coalesced)
        _ if bank.source().batches_reads() => {
            let pages: Vec<PageId> = misses.iter().map(|&(p, _)| p).collect();
            bank.read_pages_f32(&pages)
        }
        _ => burst.run(misses.len(), &|i| bank.read_page_f32(misses[i].0)),
    };
    engine.add_fetch_seconds(t0.elapsed().as_secs_f64());
    let mut fetched = fetched.into_iter();
    let mut failure = None;
    for &(page, slot) in &misses {
        let outcome = match fetched.next() {
            Some(Ok(values)) => write(slot, &values)
                .map(|()| (bank.page(page).map_or(0, |e| e.length), false))
                .map_err(|m| slot_error(page, bank.location(), slot, m)),
            Some(Err(e)) => Err(e.into()),
            None => Err(slot_error(
                page,
                bank.location(),
                slot,
                "the fetch burst returned no result for it".into(),
            )),
        };
        settle(engine, (page, slot), outcome, &mut failure);
    }
    failure.map_or(Ok(()), Err)
}

/// The block of table row `row` at level `level` (0-based) for the current
/// context: the resident one, or read from `bank` (checksum verified, the
/// wait counted in `fetch_seconds`) and made current. Fails naming the page
/// and the bank (read), or the level and sizes (a block of the wrong size).
#[cfg(not(all(target_arch = "wasm32", target_os = "unknown")))]
pub fn block_blocking<B: Clone + From<Vec<f32>>, S: PageSource>(
    engine: &mut PageIn<B>,
    bank: &BankReader<S>,
    level: usize,
    row: usize,
) -> Result<B, PageInError> {
    match engine.request_block(level, row)? {
        BlockStep::Resident(b) => Ok(b),
        BlockStep::Fetch(page) => {
            let t0 = std::time::Instant::now();
            let data = bank.read_page_f32(page)?;
            engine.add_fetch_seconds(t0.elapsed().as_secs_f64());
            let bytes = bank.page(page).map_or(0, |e| e.length);
            let values = data.len();
            engine.block_arrived(level, row, page, values, bytes, false, B::from(data))
        }
    }
}

/// Makes the value pages `pages` (distinct local ids: one run of
/// [`PageIn::value_runs`]) resident together, fetching every miss from
/// `bank` at once (verified against the page table; a corrupt local copy is
/// refetched by the bank), decoding each into `decoded` (a buffer reused
/// across calls) and writing it with `write(slot, values)`.
///
/// Every miss is settled before returning, as in [`page_in_blocking`]; the
/// first failure is returned. The caller times the call (the browser's clock).
pub async fn page_in_async<B: Clone, F: PageFetch>(
    engine: &mut PageIn<B>,
    bank: &RemoteBank<F>,
    pages: &[u32],
    decoded: &mut Vec<f32>,
    mut write: impl FnMut(SlotId, &[f32]) -> Result<(), String>,
) -> Result<(), PageInError> {
    let misses = engine.admit(pages)?;
    if misses.is_empty() {
        return Ok(());
    }
    let dtype = engine
        .values()
        .ok_or(PageInError::NoValues)?
        .section
        .spec
        .dtype;
    let ids: Vec<PageId> = misses.iter().map(|m| m.0).collect();
    let mut fetched = bank.read_pages(&ids).await.into_iter();
    let mut failure = None;
    for &(page, slot) in &misses {
        let outcome = match fetched.next() {
            Some(Ok(f)) => {
                decoded.clear();
                decoded.resize(f.bytes.len() / dtype.size(), 0.0);
                decode_into(dtype, &f.bytes, decoded)
                    .map_err(PageInError::from)
                    .and_then(|()| {
                        write(slot, decoded).map_err(|m| slot_error(page, bank.location(), slot, m))
                    })
                    .map(|()| (f.bytes.len() as u64, f.from_cache))
            }
            Some(Err(e)) => Err(e.into()),
            None => Err(RemoteError::Fetch {
                what: format!("page {page}"),
                location: bank.location().to_string(),
                message: "no reply".into(),
            }
            .into()),
        };
        settle(engine, (page, slot), outcome, &mut failure);
    }
    failure.map_or(Ok(()), Err)
}

/// One fetched block page decoded to f32 and checked against its level's
/// block length, then made into a `B` by `make` (the browser unpacks it into
/// its dense layers' FFN blocks once, here).
fn decode_block<B, F: PageFetch>(
    engine: &PageIn<B>,
    bank: &RemoteBank<F>,
    level: usize,
    page: PageId,
    fetched: Result<FetchedPage, RemoteError>,
    make: &mut impl FnMut(usize, &[f32]) -> Result<B, String>,
) -> Result<(B, usize, u64, bool), PageInError>
where
    B: Clone,
{
    let f = fetched?;
    let lv = engine
        .levels()
        .get(level)
        .ok_or(PageInError::NoLevel { level: level + 1 })?;
    let dtype = lv.section.spec.dtype;
    let mut values = vec![0.0; f.bytes.len() / dtype.size()];
    decode_into(dtype, &f.bytes, &mut values)?;
    if values.len() != lv.len {
        return Err(PageInError::BlockLength {
            page,
            values: values.len(),
            level: level + 1,
            want: lv.len,
        });
    }
    let block = make(level, &values).map_err(|message| PageInError::Block {
        page,
        location: bank.location().to_string(),
        message,
    })?;
    Ok((block, values.len(), f.bytes.len() as u64, f.from_cache))
}

/// The blocks of `rows` (one table row per level, the current context's
/// route) for the forward, as [`block_blocking`] does natively: each level's
/// current or prefetched block, or its page fetched from `bank` (every
/// level that misses in flight at once, verified, decoded and turned into a
/// `B` by `make(level, values)`). One result per level, in order; the first
/// failure is returned and the levels that failed hold no block.
pub async fn block_async<B: Clone, F: PageFetch>(
    engine: &mut PageIn<B>,
    bank: &RemoteBank<F>,
    rows: &[usize],
    mut make: impl FnMut(usize, &[f32]) -> Result<B, String>,
) -> Result<Vec<B>, PageInError> {
    let mut out: Vec<Option<B>> = Vec::with_capacity(rows.len());
    let mut wanted = Vec::new();
    for (level, &row) in rows.iter().enumerate() {
        match engine.request_block(level, row)? {
            BlockStep::Resident(b) => out.push(Some(b)),
            BlockStep::Fetch(page) => {
                out.push(None);
                wanted.push((level, row, page));
            }
        }
    }
    if !wanted.is_empty() {
        let ids: Vec<PageId> = wanted.iter().map(|w| w.2).collect();
        let fetched = bank.read_pages(&ids).await;
        let mut failure = None;
        for (&(level, row, page), f) in wanted.iter().zip(fetched) {
            let arrived = decode_block(engine, bank, level, page, f, &mut make).and_then(
                |(block, values, bytes, local)| {
                    engine.block_arrived(level, row, page, values, bytes, local, block)
                },
            );
            match arrived {
                Ok(b) => out[level] = Some(b),
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
    }
    out.into_iter()
        .enumerate()
        .map(|(level, b)| {
            b.ok_or_else(|| {
                PageInError::Remote(RemoteError::Fetch {
                    what: format!("the level-{} block", level + 1),
                    location: bank.location().to_string(),
                    message: "no reply".into(),
                })
            })
        })
        .collect()
}

/// Fetches the blocks of `rows` (one table row per level: the next
/// context's route) ahead of the forward, every level at once, into the
/// engine's prefetch slots (see [`PageIn::check_prefetch`]); a level whose
/// block is already current or prefetched is skipped. Returns the blocks
/// fetched. A page that fails is not an error: the forward fetches it again
/// and reports the failure then.
pub async fn prefetch_async<B: Clone, F: PageFetch>(
    engine: &mut PageIn<B>,
    bank: &RemoteBank<F>,
    rows: &[usize],
    mut make: impl FnMut(usize, &[f32]) -> Result<B, String>,
) -> Result<usize, PageInError> {
    if !engine.check_prefetch(rows)? {
        return Ok(0);
    }
    let wanted: Vec<(usize, usize, PageId)> = rows
        .iter()
        .enumerate()
        .filter_map(|(level, &row)| engine.prefetch_page(level, row).map(|p| (level, row, p)))
        .collect();
    if wanted.is_empty() {
        return Ok(0);
    }
    let ids: Vec<PageId> = wanted.iter().map(|w| w.2).collect();
    let fetched = bank.read_pages(&ids).await;
    let mut n = 0;
    for (&(level, row, page), f) in wanted.iter().zip(fetched) {
        if let Ok((block, values, bytes, local)) =
            decode_block(engine, bank, level, page, f, &mut make)
        {
            engine.prefetched(level, row, values, (bytes, local), block);
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::NO_SLOT;
    use crate::pagein::PageInOptions;
    use crate::remote::SourceFetch;
    use crate::{BankLayout, BankWriter, Dtype, MemSource, SectionSpec};

    /// 12 rows × 2 in 3-row pages (4 pages); row r holds (r, -r).
    fn bank_bytes() -> Vec<u8> {
        let layout = BankLayout::new(vec![SectionSpec::pkm_values(12, 2, 3, Dtype::F32)]);
        let mut w = BankWriter::new(std::io::Cursor::new(Vec::new()), &layout).unwrap();
        let rows: Vec<f32> = (0..12).flat_map(|r| [r as f32, -(r as f32)]).collect();
        w.write_rows(&rows).unwrap();
        w.finish().unwrap().into_inner()
    }

    /// Host slots of 3 rows × 2.
    fn write_into(slots: &mut [f32]) -> impl FnMut(SlotId, &[f32]) -> Result<(), String> + '_ {
        move |slot, data| {
            slots[slot as usize * 6..][..data.len()].copy_from_slice(data);
            Ok(())
        }
    }

    #[test]
    fn blocking_and_async_drivers_fill_slots_and_publish_them() {
        let bytes = bank_bytes();
        let reader = BankReader::open(MemSource::named(bytes.clone(), "mem://d.bank")).unwrap();
        let remote = pollster::block_on(RemoteBank::open(SourceFetch(MemSource::named(
            bytes,
            "mem://d.bank",
        ))))
        .unwrap();
        for asynchronous in [false, true] {
            let mut e: PageIn<u32> =
                PageIn::new(reader.sections(), &PageInOptions::budget(2 * 24)).unwrap();
            let mut slots = vec![0f32; 2 * 6];
            let mut decoded = Vec::new();
            for run in [vec![1, 3], vec![3, 0]] {
                if asynchronous {
                    pollster::block_on(page_in_async(
                        &mut e,
                        &remote,
                        &run,
                        &mut decoded,
                        write_into(&mut slots),
                    ))
                    .unwrap();
                } else {
                    page_in_blocking(&mut e, &reader, &Sequential, &run, write_into(&mut slots))
                        .unwrap();
                }
                for &p in &run {
                    let slot = e.page_table()[p as usize] as usize;
                    assert_eq!(slots[slot * 6], (p * 3) as f32, "page {p}");
                }
            }
            let s = e.stats();
            assert_eq!((s.value_misses, s.value_hits, s.evictions), (3, 1, 1));
            assert_eq!(e.page_table()[1], NO_SLOT);
            assert_eq!(s.bytes_streamed, 3 * 24);
        }
    }

    #[test]
    fn a_failed_write_or_read_leaves_the_page_out_and_names_it() {
        let bytes = bank_bytes();
        let reader = BankReader::open(MemSource::named(bytes.clone(), "mem://d.bank")).unwrap();
        let mut e: PageIn<u32> =
            PageIn::new(reader.sections(), &PageInOptions::budget(4 * 24)).unwrap();
        let err = page_in_blocking(&mut e, &reader, &Sequential, &[0, 2], |slot, _| {
            if slot == 1 {
                Err("device lost".into())
            } else {
                Ok(())
            }
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("page 2 of mem://d.bank") && err.contains("device lost"),
            "{err}"
        );
        assert_ne!(e.page_table()[0], NO_SLOT);
        assert_eq!(e.page_table()[2], NO_SLOT);
        assert_eq!(e.resident_pages(), 1);
        // a corrupt page on the async path: checksum error, page not resident
        let mut bad = bytes.clone();
        let page = *reader.page(3).unwrap();
        bad[page.offset as usize] ^= 0xff;
        let remote = pollster::block_on(RemoteBank::open(SourceFetch(MemSource::named(
            bad,
            "mem://bad.bank",
        ))))
        .unwrap();
        let mut slots = vec![0f32; 4 * 6];
        let mut decoded = Vec::new();
        let err = pollster::block_on(page_in_async(
            &mut e,
            &remote,
            &[1, 3],
            &mut decoded,
            write_into(&mut slots),
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("mem://bad.bank") && err.contains("page 3"),
            "{err}"
        );
        assert_ne!(e.page_table()[1], NO_SLOT);
        assert_eq!(e.page_table()[3], NO_SLOT);
    }
}
