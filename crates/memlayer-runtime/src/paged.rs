//! The paged memory: a model's bank read page by page from a source (file,
//! HTTP Range) into a slot pool under a byte budget.
//!
//! - **Value pages** (product-key memory): the rows a batch's lookups chose
//!   are mapped to pages; the pages not resident are fetched in parallel
//!   (bounded) from the source, their checksums verified, and written into
//!   slots the LRU policy ([`PageCache`]) frees; the bag then reads through
//!   the page table. A batch whose pages do not fit the budget together is
//!   split into runs of tokens that do (the result is the same: each bag is
//!   independent), so the budget is never exceeded.
//! - **FFN-memory blocks** (hierarchical memory): one block per level for
//!   the current context, fetched once along the context's cluster path; a
//!   context change fetches only the levels whose block changed. With
//!   prefetch, [`PagedMemory::prefetch_blocks`] fetches the next context's
//!   blocks in the background into one extra block per level (budgeted).
//!
//! Every failure names the page and the source (path or URL) and leaves the
//! memory consistent (a page that failed is not resident); it never yields
//! a wrong value.

use crate::pool::{HostPool, MISSING, SlotPool};
use burn::tensor::{Device, Tensor, TensorData};
use memlayer_bank::cache::{BagRun, CacheError, CacheStats, PageCache, bag_runs};
use memlayer_bank::{BankReader, PageId, PageSource, SectionInfo, SectionKind};
use memlayer_model::{MemorySource, ModelError};
use serde::Serialize;
use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// A bank reader over any page source.
pub type Bank = BankReader<Box<dyn PageSource>>;

/// Where the value slots live.
#[derive(Clone)]
pub enum PoolDevice {
    /// Host memory (the CPU backend; phones and laptops without a usable GPU).
    Host,
    /// Device buffers on a wgpu adapter.
    #[cfg(feature = "wgpu")]
    Wgpu(Arc<memlayer_wgpu::GpuContext>),
}

/// Most pages a [`PagedMemory`] fetches at once (`PagedOptions::fetch_threads`):
/// more threads only queue on the same link, and thousands take long to start.
pub const MAX_FETCH_THREADS: usize = 64;

/// How a [`PagedMemory`] pages.
#[derive(Clone)]
pub struct PagedOptions {
    /// Bytes of resident memory (value slots + blocks), f32 as held.
    pub budget_bytes: u64,
    /// Pages fetched concurrently on a miss burst (1: on the calling thread,
    /// best for local files; more for HTTP, where a fetch is a round trip;
    /// at most [`MAX_FETCH_THREADS`]).
    pub fetch_threads: usize,
    /// Reserve one extra block per level for [`PagedMemory::prefetch_blocks`].
    pub prefetch: bool,
    /// Where the value slots live.
    pub device: PoolDevice,
}

impl PagedOptions {
    /// Host slots, fetches on the calling thread, no prefetch.
    pub fn host(budget_bytes: u64) -> Self {
        Self {
            budget_bytes,
            fetch_threads: 1,
            prefetch: false,
            device: PoolDevice::Host,
        }
    }
}

/// Counters of a [`PagedMemory`] (since creation or the last reset).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct MemoryStats {
    /// Value-page accesses (one per distinct page per run of tokens).
    pub value_accesses: u64,
    /// Accesses that found the page resident.
    pub value_hits: u64,
    /// Accesses that fetched the page.
    pub value_misses: u64,
    /// Resident value pages dropped to make room.
    pub evictions: u64,
    /// Block requests (one per level per context).
    pub block_requests: u64,
    /// Block requests served without fetching (same block, or prefetched).
    pub block_hits: u64,
    /// Pages read from the source (values + blocks, prefetch included).
    pub pages_streamed: u64,
    /// Bytes read from the source.
    pub bytes_streamed: u64,
    /// Wall time spent waiting for fetches in the forward path.
    pub fetch_seconds: f64,
}

impl MemoryStats {
    /// Hits over accesses of value pages and blocks together (1 when idle).
    pub fn hit_rate(&self) -> f64 {
        let acc = self.value_accesses + self.block_requests;
        if acc == 0 {
            1.0
        } else {
            (self.value_hits + self.block_hits) as f64 / acc as f64
        }
    }
}

/// Geometry of the value section.
#[derive(Clone, Copy, Debug)]
struct Values {
    section: SectionInfo,
    rows: usize,
    dim: usize,
    page_rows: usize,
}

/// Geometry of one level's block section.
#[derive(Clone, Copy, Debug)]
struct Level {
    section: SectionInfo,
    /// Values of one block (`layers · 3 · units · dim`).
    len: usize,
}

#[derive(Default)]
struct LevelState {
    /// The resident block: (table row, values).
    current: Option<(usize, Arc<Vec<f32>>)>,
    /// A block prefetched for the next context.
    next: Option<(usize, Arc<Vec<f32>>)>,
}

struct State {
    cache: Option<PageCache>,
    pool: Option<Box<dyn SlotPool>>,
    /// Slot of each value page (local page ids), [`MISSING`] when not resident.
    page_table: Vec<u32>,
    levels: Vec<LevelState>,
    stats: MemoryStats,
}

/// Shared between the memory and its prefetch threads.
struct Shared {
    bank: Bank,
    /// Fetch workers (`PagedOptions::fetch_threads`; none for 1: fetches run
    /// on the calling thread, the right choice for a local file).
    fetchers: Option<rayon::ThreadPool>,
    levels: Vec<Level>,
    state: Mutex<State>,
}

/// A model's memory paged in from its bank under a budget ([`MemorySource`]).
pub struct PagedMemory {
    shared: Arc<Shared>,
    values: Option<Values>,
    budget_bytes: u64,
    block_bytes: u64,
    value_slots: u32,
    prefetch_enabled: bool,
    /// The running prefetch: its block rows and thread.
    prefetch: Mutex<Option<(Vec<usize>, std::thread::JoinHandle<()>)>>,
    pool_name: String,
}

impl std::fmt::Debug for PagedMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagedMemory")
            .field("source", &self.shared.bank.location())
            .field("budget_bytes", &self.budget_bytes)
            .field("value_slots", &self.value_slots)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // a panic while holding the lock cannot leave a half-written slot: slots
    // are written before they are published in the page table
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn err(msg: impl std::fmt::Display) -> ModelError {
    ModelError::Memory(msg.to_string())
}

/// A fetched page's values, or why it could not be fetched.
type Fetched = Result<Vec<f32>, String>;

/// Reads `pages` (global ids) from the bank on `pool` (bounded concurrency:
/// its threads) or, without a pool or for a single page, on the caller's
/// thread; one result per page, in order.
fn fetch_pages(bank: &Bank, pages: &[PageId], pool: Option<&rayon::ThreadPool>) -> Vec<Fetched> {
    use rayon::prelude::*;
    let read = |&p: &PageId| bank.read_page_f32(p).map_err(|e| e.to_string());
    match pool {
        Some(pool) if pages.len() > 1 => pool.install(|| pages.par_iter().map(read).collect()),
        _ => pages.iter().map(read).collect(),
    }
}

impl PagedMemory {
    /// Opens the paged memory of a model over `bank`, with the value table
    /// of `values` (rows, v_dim) if the model has a product-key memory and
    /// `levels` block sections. Fails with the minimum budget if `opts`'
    /// budget cannot hold the blocks plus one value page.
    pub fn new(bank: Bank, opts: PagedOptions) -> Result<Self, ModelError> {
        if !(1..=MAX_FETCH_THREADS).contains(&opts.fetch_threads) {
            return Err(err(format!(
                "{} fetch threads: must be 1..={MAX_FETCH_THREADS} (more only queue on the same link)",
                opts.fetch_threads
            )));
        }
        let mut values = None;
        let mut levels = Vec::new();
        for s in bank.sections() {
            match s.spec.kind {
                SectionKind::PkmValues {
                    rows,
                    dim,
                    page_rows,
                } => {
                    values = Some(Values {
                        section: *s,
                        rows: rows as usize,
                        dim: dim as usize,
                        page_rows: page_rows as usize,
                    });
                }
                SectionKind::FfnBlocks {
                    layers, units, dim, ..
                } => levels.push(Level {
                    section: *s,
                    len: layers as usize * 3 * units as usize * dim as usize,
                }),
            }
        }
        let per_level: u64 = levels.iter().map(|l| l.len as u64 * 4).sum();
        let block_bytes = per_level * if opts.prefetch { 2 } else { 1 };
        let (cache, pool, value_slots, pages) = match values {
            Some(v) => {
                let slot_bytes = (v.page_rows * v.dim * 4) as u64;
                let need = block_bytes + slot_bytes;
                if opts.budget_bytes < need {
                    return Err(err(format!(
                        "a budget of {} bytes cannot hold the blocks ({block_bytes} bytes) and one \
                         value page ({slot_bytes} bytes): at least {need} bytes",
                        opts.budget_bytes
                    )));
                }
                let pages = v.section.page_count() as usize;
                // never more slots than pages
                let slots_alloc =
                    (((opts.budget_bytes - block_bytes) / slot_bytes) as usize).min(pages);
                let pool: Box<dyn SlotPool> = match &opts.device {
                    PoolDevice::Host => Box::new(
                        HostPool::new(v.rows, v.dim, v.page_rows, slots_alloc).map_err(err)?,
                    ),
                    #[cfg(feature = "wgpu")]
                    PoolDevice::Wgpu(ctx) => Box::new(
                        crate::pool::DevicePool::new(ctx.clone(), v.dim, v.page_rows, slots_alloc)
                            .map_err(err)?,
                    ),
                };
                let cache =
                    PageCache::new(slots_alloc as u64 * slot_bytes, slot_bytes).map_err(err)?;
                (Some(cache), Some(pool), slots_alloc as u32, pages)
            }
            None => {
                if opts.budget_bytes < block_bytes {
                    return Err(err(format!(
                        "a budget of {} bytes cannot hold the blocks: at least {block_bytes} bytes",
                        opts.budget_bytes
                    )));
                }
                (None, None, 0, 0)
            }
        };
        let pool_name = pool
            .as_ref()
            .map_or_else(|| "host memory".to_string(), |p| p.describe());
        let state = State {
            cache,
            pool,
            page_table: vec![MISSING; pages],
            levels: levels.iter().map(|_| LevelState::default()).collect(),
            stats: MemoryStats::default(),
        };
        Ok(Self {
            shared: Arc::new(Shared {
                bank,
                fetchers: if opts.fetch_threads > 1 {
                    Some(
                        rayon::ThreadPoolBuilder::new()
                            .num_threads(opts.fetch_threads)
                            .thread_name(|i| format!("memlayer-fetch-{i}"))
                            .build()
                            .map_err(err)?,
                    )
                } else {
                    None
                },
                levels,
                state: Mutex::new(state),
            }),
            values,
            budget_bytes: opts.budget_bytes,
            block_bytes,
            value_slots,
            prefetch_enabled: opts.prefetch,
            prefetch: Mutex::new(None),
            pool_name,
        })
    }

    /// The bank's source (path or URL).
    pub fn location(&self) -> &str {
        self.shared.bank.location()
    }

    /// The budget in bytes.
    pub fn budget_bytes(&self) -> u64 {
        self.budget_bytes
    }

    /// Value-page slots the budget holds (after the blocks' reserve).
    pub fn value_slots(&self) -> u32 {
        self.value_slots
    }

    /// Pages of the value table in the bank.
    pub fn value_pages(&self) -> u64 {
        self.values.map_or(0, |v| v.section.page_count())
    }

    /// Where the value slots live.
    pub fn pool_name(&self) -> &str {
        &self.pool_name
    }

    /// Bytes resident now (value slots in use + blocks held): never above the budget.
    pub fn resident_bytes(&self) -> u64 {
        let st = lock(&self.shared.state);
        let values = st.cache.as_ref().map_or(0, PageCache::resident_bytes);
        let blocks: u64 = st
            .levels
            .iter()
            .zip(&self.shared.levels)
            .map(|(s, l)| (s.current.is_some() as u64 + s.next.is_some() as u64) * l.len as u64 * 4)
            .sum();
        values + blocks
    }

    /// Value pages resident now.
    pub fn resident_pages(&self) -> usize {
        lock(&self.shared.state)
            .cache
            .as_ref()
            .map_or(0, PageCache::resident_pages)
    }

    /// The counters.
    pub fn stats(&self) -> MemoryStats {
        lock(&self.shared.state).stats
    }

    /// The LRU policy's own counters (value pages).
    pub fn cache_stats(&self) -> Option<CacheStats> {
        lock(&self.shared.state)
            .cache
            .as_ref()
            .map(PageCache::stats)
    }

    /// Zeroes the counters (resident pages stay).
    pub fn reset_stats(&self) {
        let mut st = lock(&self.shared.state);
        st.stats = MemoryStats::default();
        if let Some(c) = st.cache.as_mut() {
            c.reset_stats();
        }
    }

    /// Fetches the blocks of `rows` (one table row per level) in the
    /// background, for the next context. Needs [`PagedOptions::prefetch`].
    pub fn prefetch_blocks(&self, rows: &[usize]) -> Result<(), ModelError> {
        if self.block_bytes == 0 {
            return Ok(());
        }
        if rows.len() != self.shared.levels.len() {
            return Err(err(format!(
                "{} block rows for {} levels",
                rows.len(),
                self.shared.levels.len()
            )));
        }
        if !self.prefetch_enabled {
            return Err(err(
                "prefetch is off: open the memory with PagedOptions::prefetch",
            ));
        }
        self.wait_prefetch();
        let shared = self.shared.clone();
        let target = rows.to_vec();
        let rows = target.clone();
        let handle = std::thread::spawn(move || {
            for (l, &row) in rows.iter().enumerate() {
                {
                    let st = lock(&shared.state);
                    let ls = &st.levels[l];
                    if ls.current.as_ref().is_some_and(|(r, _)| *r == row)
                        || ls.next.as_ref().is_some_and(|(r, _)| *r == row)
                    {
                        continue;
                    }
                }
                let Some(page) = shared.levels[l].section.block_page(row as u64) else {
                    continue;
                };
                // a failed prefetch is not an error: the forward fetches
                // again and reports the failure then
                if let Ok(data) = shared.bank.read_page_f32(page) {
                    let bytes = shared.bank.page(page).map_or(0, |e| e.length);
                    let mut st = lock(&shared.state);
                    st.stats.pages_streamed += 1;
                    st.stats.bytes_streamed += bytes;
                    st.levels[l].next = Some((row, Arc::new(data)));
                }
            }
        });
        *lock(&self.prefetch) = Some((target, handle));
        Ok(())
    }

    /// Waits for a running prefetch.
    pub fn wait_prefetch(&self) {
        if let Some((_, h)) = lock(&self.prefetch).take() {
            let _ = h.join();
        }
    }

    /// Waits for a running prefetch if it is fetching `row` of `level` (0-based).
    fn wait_prefetch_of(&self, level: usize, row: usize) {
        let pending = lock(&self.prefetch)
            .as_ref()
            .is_some_and(|(rows, _)| rows.get(level) == Some(&row));
        if pending {
            self.wait_prefetch();
        }
    }

    /// Makes every page of `local_pages` (value pages, local ids) resident
    /// together, fetching the misses; returns after the page table maps them.
    fn page_in(&self, st: &mut State, local_pages: &[u32]) -> Result<(), ModelError> {
        let v = self
            .values
            .ok_or_else(|| err("the bank has no value section"))?;
        let first = v.section.first_page;
        let globals: Vec<PageId> = local_pages.iter().map(|&p| first + u64::from(p)).collect();
        let cache = st.cache.as_mut().ok_or_else(|| err("no value cache"))?;
        let admitted = cache
            .admit(&globals, first, &mut st.page_table)
            .map_err(err)?;
        st.stats.value_accesses += globals.len() as u64;
        st.stats.value_hits += admitted.hits;
        st.stats.value_misses += admitted.misses.len() as u64;
        st.stats.evictions += admitted.evictions;
        let misses = admitted.misses;
        if misses.is_empty() {
            return Ok(());
        }
        let t0 = Instant::now();
        let pages: Vec<PageId> = misses.iter().map(|m| m.0).collect();
        let fetched = fetch_pages(&self.shared.bank, &pages, self.shared.fetchers.as_ref());
        st.stats.fetch_seconds += t0.elapsed().as_secs_f64();
        let mut failure = None;
        for ((page, slot), r) in misses.iter().zip(fetched) {
            let written = r.and_then(|data| {
                st.pool
                    .as_mut()
                    .ok_or_else(|| "no slot pool".to_string())?
                    .write_slot(*slot, &data)
            });
            match written {
                Ok(()) => {
                    st.page_table[(page - first) as usize] = *slot;
                    st.stats.pages_streamed += 1;
                    st.stats.bytes_streamed += self.shared.bank.page(*page).map_or(0, |e| e.length);
                }
                Err(e) => {
                    if let Some(c) = st.cache.as_mut() {
                        c.remove(*page);
                    }
                    failure.get_or_insert(e);
                }
            }
        }
        match failure {
            Some(e) => Err(err(e)),
            None => Ok(()),
        }
    }
}

impl MemorySource for PagedMemory {
    fn values_bag(
        &self,
        rows: &[u32],
        weights: Tensor<2>,
        device: &Device,
    ) -> Result<Tensor<2>, ModelError> {
        let v = self
            .values
            .ok_or_else(|| err("the bank has no product-key value section"))?;
        let [bags, bag] = weights.dims();
        if rows.len() != bags * bag {
            return Err(err(format!("{} rows for {bags} bags of {bag}", rows.len())));
        }
        if let Some(&bad) = rows.iter().find(|&&r| r as usize >= v.rows) {
            return Err(err(format!(
                "value row {bad} outside the bank's {} rows",
                v.rows
            )));
        }
        let w: Vec<f32> = weights.into_data().iter::<f32>().collect();
        let slots = self.value_slots as usize;
        let mut out = Vec::with_capacity(bags * v.dim);
        let mut st = lock(&self.shared.state);
        // runs of bags whose pages fit the slots together
        let runs = bag_runs(rows, bag, v.page_rows, slots).map_err(|e| match e {
            CacheError::BagTooLarge { bag, pages, .. } => err(format!(
                "token {bag} reads {pages} value pages; the budget of {} bytes holds {slots} \
                 (raise --budget-mb)",
                self.budget_bytes
            )),
            e => err(e),
        })?;
        for BagRun { bags: run, pages } in runs {
            let (start, end) = (run.start, run.end);
            self.page_in(&mut st, &pages)?;
            let st = &mut *st;
            let pool = st.pool.as_mut().ok_or_else(|| err("no slot pool"))?;
            let offsets = memlayer_core::bag::uniform_offsets(end - start, bag);
            let part = pool
                .bag(
                    &st.page_table,
                    &rows[start * bag..end * bag],
                    &w[start * bag..end * bag],
                    &offsets,
                )
                .map_err(err)?;
            out.extend(part);
        }
        Ok(Tensor::from_data(
            TensorData::new(out, [bags, v.dim]),
            device,
        ))
    }

    fn blocks(
        &self,
        level: usize,
        rows: &[usize],
        device: &Device,
    ) -> Result<Tensor<2>, ModelError> {
        let l = level
            .checked_sub(1)
            .and_then(|i| self.shared.levels.get(i).map(|lv| (i, *lv)))
            .ok_or_else(|| err(format!("the bank has no block section for level {level}")));
        let (i, lv) = l?;
        let distinct: HashSet<usize> = rows.iter().copied().collect();
        if distinct.len() > 1 {
            return Err(err(format!(
                "{} different level-{level} blocks in one batch; the paged memory holds one \
                 context's blocks",
                distinct.len()
            )));
        }
        let Some(&row) = rows.first() else {
            return Ok(Tensor::from_data(
                TensorData::new(Vec::<f32>::new(), [0, lv.len]),
                device,
            ));
        };
        // a prefetch of another context runs on while this one computes
        self.wait_prefetch_of(i, row);
        let mut guard = lock(&self.shared.state);
        let st = &mut *guard;
        st.stats.block_requests += 1;
        let ls = &mut st.levels[i];
        let resident = if let Some((_, b)) = ls.current.as_ref().filter(|(r, _)| *r == row) {
            Some(b.clone())
        } else if let Some((_, b)) = ls.next.take_if(|(r, _)| *r == row) {
            ls.current = Some((row, b.clone()));
            Some(b)
        } else {
            None
        };
        let block = if let Some(b) = resident {
            st.stats.block_hits += 1;
            b
        } else {
            // drop the old block first: the budget holds one per level
            ls.current = None;
            let page = lv.section.block_page(row as u64).ok_or_else(|| {
                err(format!(
                    "block row {row} outside level {level} ({} blocks)",
                    lv.section.page_count()
                ))
            })?;
            let t0 = Instant::now();
            let data = self.shared.bank.read_page_f32(page).map_err(err)?;
            st.stats.fetch_seconds += t0.elapsed().as_secs_f64();
            st.stats.pages_streamed += 1;
            st.stats.bytes_streamed += self.shared.bank.page(page).map_or(0, |e| e.length);
            if data.len() != lv.len {
                return Err(err(format!(
                    "block page {page} holds {} values, level {level} blocks have {}",
                    data.len(),
                    lv.len
                )));
            }
            let b = Arc::new(data);
            st.levels[i].current = Some((row, b.clone()));
            b
        };
        drop(guard);
        let mut data = Vec::with_capacity(rows.len() * lv.len);
        for _ in rows {
            data.extend_from_slice(&block);
        }
        Ok(Tensor::from_data(
            TensorData::new(data, [rows.len(), lv.len]),
            device,
        ))
    }
}
