//! The paged memory: a model's bank read page by page from a source (file,
//! HTTP Range) into a slot pool under a byte budget.
//!
//! - **Value pages** (product-key memory): the rows a batch's lookups chose
//!   are mapped to pages; the pages not resident are fetched in parallel
//!   (bounded) from the source, their checksums verified, and written into
//!   slots the LRU policy ([`memlayer_bank::cache::PageCache`]) frees; the bag then reads through
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
//!
//! The paging itself (budget, LRU slots, page table, runs of tokens, block
//! state, counters) is `memlayer_bank`'s IO-free engine ([`PageIn`]), driven
//! here by its blocking driver ([`page_in_blocking`], [`block_blocking`])
//! with a bounded fetch pool for HTTP; this module adds the slot pools, the
//! prefetch thread and the model's [`MemorySource`] contract.

use crate::budget::Budget;
use crate::pool::{HostPool, PagedBag, SlotPool};
use burn::tensor::{Device, Tensor, TensorData};
use memlayer_bank::cache::CacheStats;
use memlayer_bank::drive::{FetchBurst, block_blocking, page_in_blocking};
use memlayer_bank::pagein::{PageIn, PageInOptions, ValueGeometry};
use memlayer_bank::{BankError, BankReader, PageSource};
use memlayer_model::{MemorySource, ModelError};
use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};

pub use memlayer_bank::pagein::MemoryStats;

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
    /// Device memory on an NVIDIA GPU, in the bank's dtype.
    #[cfg(feature = "cuda")]
    Cuda(Arc<memlayer_cuda::CudaDevice>),
}

/// Most pages a [`PagedMemory`] fetches at once (`PagedOptions::fetch_threads`):
/// more threads only queue on the same link, and thousands take long to start.
pub const MAX_FETCH_THREADS: usize = 64;

/// How a [`PagedMemory`] pages.
#[derive(Clone)]
pub struct PagedOptions {
    /// Resident memory (value slots in the bank's dtype + blocks as f32):
    /// bytes, or a percent of the bank's resident size
    /// ([`memlayer_bank::resident_bytes`]), resolved against the bank when it
    /// is opened (the bank is read once).
    pub budget: Budget,
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
    pub fn host(budget: Budget) -> Self {
        Self {
            budget,
            fetch_threads: 1,
            prefetch: false,
            device: PoolDevice::Host,
        }
    }
}

/// The bounded fetch pool of a [`PagedMemory`] (`PagedOptions::fetch_threads`;
/// none for 1: reads run on the calling thread, the right choice for a
/// local file): the blocking driver's [`FetchBurst`].
struct FetchPool(Option<rayon::ThreadPool>);

impl FetchBurst for FetchPool {
    fn run(
        &self,
        n: usize,
        read: &(dyn Fn(usize) -> Result<Vec<f32>, BankError> + Sync),
    ) -> Vec<Result<Vec<f32>, BankError>> {
        use rayon::prelude::*;
        match &self.0 {
            Some(pool) if n > 1 => pool.install(|| (0..n).into_par_iter().map(read).collect()),
            _ => (0..n).map(read).collect(),
        }
    }
}

/// What one read of the memory touched, recorded while tracing is on
/// ([`PagedMemory::set_trace`]): what the desktop demo draws as the memory
/// map, token by token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemoryAccess {
    /// One product-key read (one memory layer's forward; layers share the
    /// values, so the reads of a token come in layer order).
    Values {
        /// The value rows summed: (bags, bag), bag = heads × knn, each bag
        /// one token's rows (heads, knn).
        rows: Vec<u32>,
        /// Rows per bag.
        bag: usize,
        /// Value pages (ids within the value section, sorted) that were
        /// resident when the read began.
        hit_pages: Vec<u32>,
        /// Value pages (sorted) this read brought in.
        fetched_pages: Vec<u32>,
    },
    /// One hierarchical block read: one level's block of one context.
    Block {
        /// Level, from 1.
        level: usize,
        /// The block's row in that level's table.
        row: usize,
        /// Whether it was fetched (else resident: the same block as before, or prefetched).
        fetched: bool,
    },
}

/// What [`PagedMemory::set_budget`] did: (before, after) pairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BudgetChange {
    /// The budget in bytes.
    pub budget_bytes: (u64, u64),
    /// Value-page slots.
    pub value_slots: (u32, u32),
    /// Value pages still resident (none fetched again).
    pub kept_pages: usize,
    /// Of the kept pages, those moved to another slot (their slot is gone).
    pub moved_pages: usize,
    /// Value pages dropped (the least recently used that no longer fit).
    pub dropped_pages: usize,
}

/// The engine and the slots its page table points into, under one lock.
struct State {
    engine: PageIn<Arc<Vec<f32>>>,
    pool: Option<Box<dyn SlotPool>>,
}

/// Shared between the memory and its prefetch threads.
struct Shared {
    bank: Bank,
    fetchers: FetchPool,
    state: Mutex<State>,
}

/// A model's memory paged in from its bank under a budget ([`MemorySource`]).
pub struct PagedMemory {
    shared: Arc<Shared>,
    /// Fixed at open (copied out of the engine: read without the lock).
    values: Option<ValueGeometry>,
    /// Values of one block per level (index 0 = level 1).
    block_lens: Vec<usize>,
    /// The bank's size fully resident, values in its dtype and blocks as
    /// f32 ([`memlayer_bank::resident_bytes`]: what a percent budget is of).
    bank_bytes: u64,
    block_bytes: u64,
    /// The running prefetch: its block rows and thread.
    prefetch: Mutex<Option<(Vec<usize>, std::thread::JoinHandle<()>)>>,
    pool_name: String,
    /// The accesses since the last `take_trace`, while tracing is on.
    trace: Mutex<Option<Vec<MemoryAccess>>>,
}

impl std::fmt::Debug for PagedMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagedMemory")
            .field("source", &self.shared.bank.location())
            .field("budget_bytes", &self.budget_bytes())
            .field("value_slots", &self.value_slots())
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

impl PagedMemory {
    /// Opens the paged memory of a model over `bank`: its product-key value
    /// section (if any) paged into slots on `opts.device`, its block
    /// sections one level each. Fails with the minimum budget if `opts`'
    /// budget cannot hold the blocks plus one value page, or if
    /// `fetch_threads` is outside `1..=MAX_FETCH_THREADS`.
    pub fn new(bank: Bank, opts: PagedOptions) -> Result<Self, ModelError> {
        if !(1..=MAX_FETCH_THREADS).contains(&opts.fetch_threads) {
            return Err(err(format!(
                "{} fetch threads: must be 1..={MAX_FETCH_THREADS} (more only queue on the same link)",
                opts.fetch_threads
            )));
        }
        let bank_bytes = memlayer_bank::resident_bytes(bank.sections());
        let engine = PageIn::new(
            bank.sections(),
            &PageInOptions {
                budget_bytes: opts.budget.resolve(bank_bytes),
                prefetch: opts.prefetch,
                token_pages: None,
            },
        )
        .map_err(err)?;
        let values = engine.values().copied();
        let slots = engine.value_slots() as usize;
        let pool: Option<Box<dyn SlotPool>> = match values {
            Some(v) => Some(match &opts.device {
                PoolDevice::Host => Box::new(
                    HostPool::new(v.rows, v.dim, v.page_rows, slots, v.section.spec.dtype)
                        .map_err(err)?,
                ),
                #[cfg(feature = "wgpu")]
                PoolDevice::Wgpu(ctx) => Box::new(
                    crate::pool::DevicePool::new(
                        ctx.clone(),
                        v.dim,
                        v.page_rows,
                        slots,
                        v.section.spec.dtype,
                    )
                    .map_err(err)?,
                ),
                #[cfg(feature = "cuda")]
                PoolDevice::Cuda(dev) => Box::new(
                    crate::pool::CudaPool::new(
                        dev.clone(),
                        v.rows,
                        v.dim,
                        v.page_rows,
                        slots,
                        v.section.spec.dtype,
                    )
                    .map_err(err)?,
                ),
            }),
            None => None,
        };
        let pool_name = pool
            .as_ref()
            .map_or_else(|| "host memory".to_string(), |p| p.describe());
        let fetchers = FetchPool(if opts.fetch_threads > 1 {
            Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(opts.fetch_threads)
                    .thread_name(|i| format!("memlayer-fetch-{i}"))
                    .build()
                    .map_err(err)?,
            )
        } else {
            None
        });
        Ok(Self {
            values,
            block_lens: engine.levels().iter().map(|l| l.len).collect(),
            bank_bytes,
            block_bytes: engine.block_bytes(),
            shared: Arc::new(Shared {
                bank,
                fetchers,
                state: Mutex::new(State { engine, pool }),
            }),
            prefetch: Mutex::new(None),
            pool_name,
            trace: Mutex::new(None),
        })
    }

    /// The bank's source (path or URL).
    pub fn location(&self) -> &str {
        self.shared.bank.location()
    }

    /// The budget in bytes.
    pub fn budget_bytes(&self) -> u64 {
        lock(&self.shared.state).engine.budget_bytes()
    }

    /// Changes the budget while the model is open: the next read runs under
    /// it. The most recently used value pages that fit stay resident (moved
    /// within the slot pool on its device; none is fetched again), the rest
    /// are dropped; growing keeps every page and adds empty slots. The
    /// blocks' reserve stays. A budget [`PagedMemory::new`] would refuse is
    /// refused here, changing nothing; so is a pool that cannot reallocate.
    pub fn set_budget(&self, budget: Budget) -> Result<BudgetChange, ModelError> {
        let budget_bytes = budget.resolve(self.bank_bytes);
        let mut guard = lock(&self.shared.state);
        let State { engine, pool } = &mut *guard;
        let (before_bytes, before_slots) = (engine.budget_bytes(), engine.value_slots());
        let before_pages = engine.resident_pages();
        let mut moved = 0;
        engine
            .resize(budget_bytes, |slots, kept| {
                moved = kept.iter().filter(|(from, to)| from != to).count();
                match pool.as_mut() {
                    Some(p) => p.resize(slots as usize, kept),
                    None => Ok(()),
                }
            })
            .map_err(err)?;
        Ok(BudgetChange {
            budget_bytes: (before_bytes, engine.budget_bytes()),
            value_slots: (before_slots, engine.value_slots()),
            kept_pages: engine.resident_pages(),
            moved_pages: moved,
            dropped_pages: before_pages.saturating_sub(engine.resident_pages()),
        })
    }

    /// Bytes of the bank when fully resident (every value row in the bank's
    /// dtype, every block as f32: [`memlayer_bank::resident_bytes`]): what
    /// a percent budget is a percent of.
    pub fn bank_bytes(&self) -> u64 {
        self.bank_bytes
    }

    /// Value-page slots the budget holds (after the blocks' reserve).
    pub fn value_slots(&self) -> u32 {
        lock(&self.shared.state).engine.value_slots()
    }

    /// Pages of the value table in the bank.
    pub fn value_pages(&self) -> u64 {
        self.values.map_or(0, |v| v.pages())
    }

    /// Where the value slots live.
    pub fn pool_name(&self) -> &str {
        &self.pool_name
    }

    /// Bytes the value slots take in their pool, allocated (every slot, in
    /// the bank's dtype; 0 without a value section): `value_slots ×
    /// slot_bytes`, padding of odd-width 16-bit rows on a wgpu device aside.
    pub fn pool_bytes(&self) -> u64 {
        lock(&self.shared.state)
            .pool
            .as_ref()
            .map_or(0, |p| p.bytes())
    }

    /// Bytes resident now (value slots in use + blocks held): never above the budget.
    pub fn resident_bytes(&self) -> u64 {
        lock(&self.shared.state).engine.resident_bytes()
    }

    /// The value table's geometry (rows, width, rows per page), if the bank has one.
    pub fn value_geometry(&self) -> Option<ValueGeometry> {
        self.values
    }

    /// The value pages resident now (ids within the value section, ascending).
    pub fn resident_value_pages(&self) -> Vec<u32> {
        let st = lock(&self.shared.state);
        st.engine
            .page_table()
            .iter()
            .enumerate()
            .filter(|&(_, &slot)| slot != memlayer_bank::cache::NO_SLOT)
            .map(|(p, _)| p as u32)
            .collect()
    }

    /// Value pages resident now.
    pub fn resident_pages(&self) -> usize {
        lock(&self.shared.state).engine.resident_pages()
    }

    /// The counters (with the budget, slots and resident gauges as of now).
    pub fn stats(&self) -> MemoryStats {
        lock(&self.shared.state).engine.stats()
    }

    /// The LRU policy's own counters (value pages).
    pub fn cache_stats(&self) -> Option<CacheStats> {
        lock(&self.shared.state).engine.cache_stats()
    }

    /// Starts (`true`) or stops recording every read as a [`MemoryAccess`];
    /// stopping drops what was recorded. Off by default (it costs a copy of
    /// the rows per read).
    pub fn set_trace(&self, on: bool) {
        *lock(&self.trace) = on.then(Vec::new);
    }

    /// The reads recorded since the last call, oldest first (empty when tracing is off).
    pub fn take_trace(&self) -> Vec<MemoryAccess> {
        lock(&self.trace)
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    fn record(&self, access: impl FnOnce() -> MemoryAccess) {
        if let Some(t) = lock(&self.trace).as_mut() {
            t.push(access());
        }
    }

    fn tracing(&self) -> bool {
        lock(&self.trace).is_some()
    }

    /// Zeroes the counters (resident pages stay).
    pub fn reset_stats(&self) {
        lock(&self.shared.state).engine.reset_stats();
    }

    /// Fetches the blocks of `rows` (one table row per level) in the
    /// background, for the next context. Needs [`PagedOptions::prefetch`].
    pub fn prefetch_blocks(&self, rows: &[usize]) -> Result<(), ModelError> {
        if self.block_bytes == 0 {
            return Ok(());
        }
        if !lock(&self.shared.state)
            .engine
            .check_prefetch(rows)
            .map_err(err)?
        {
            return Ok(());
        }
        self.wait_prefetch();
        let shared = self.shared.clone();
        let target = rows.to_vec();
        let rows = target.clone();
        let handle = std::thread::spawn(move || {
            // every level's page in one batch: one round trip over HTTP
            // (multi-range), not one per level
            let wanted: Vec<(usize, usize, memlayer_bank::PageId)> = {
                let st = lock(&shared.state);
                rows.iter()
                    .enumerate()
                    .filter_map(|(l, &row)| st.engine.prefetch_page(l, row).map(|p| (l, row, p)))
                    .collect()
            };
            let pages: Vec<memlayer_bank::PageId> = wanted.iter().map(|w| w.2).collect();
            // read without the lock: the forward runs on meanwhile. A
            // failed prefetch is not an error: the forward fetches again
            // and reports the failure then
            let read = if pages.len() > 1 {
                shared.bank.read_pages_f32(&pages)
            } else {
                pages
                    .iter()
                    .map(|&p| shared.bank.read_page_f32(p))
                    .collect()
            };
            for ((l, row, page), data) in wanted.into_iter().zip(read) {
                if let Ok(data) = data {
                    let bytes = shared.bank.page(page).map_or(0, |e| e.length);
                    let values = data.len();
                    lock(&shared.state).engine.prefetched(
                        l,
                        row,
                        values,
                        (bytes, false),
                        Arc::new(data),
                    );
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
        let w: Vec<f32> = weights.into_data().iter::<f32>().collect();
        let mut out = Vec::with_capacity(bags * v.dim);
        let tracing = self.tracing();
        let (mut hit_pages, mut fetched_pages) = (Vec::new(), Vec::new());
        let mut guard = lock(&self.shared.state);
        let State { engine, pool } = &mut *guard;
        let pool = pool.as_mut().ok_or_else(|| err("no slot pool"))?;
        // runs of tokens whose pages fit the slots together
        for run in engine.value_runs(rows, bag).map_err(err)? {
            let (start, end) = (run.bags.start, run.bags.end);
            if tracing {
                let table = engine.page_table();
                for &p in &run.pages {
                    match table.get(p as usize) {
                        Some(&slot) if slot != memlayer_bank::cache::NO_SLOT => hit_pages.push(p),
                        _ => fetched_pages.push(p),
                    }
                }
            }
            page_in_blocking(
                engine,
                &self.shared.bank,
                &self.shared.fetchers,
                &run.pages,
                |slot, data| pool.write_slot(slot, data),
            )
            .map_err(err)?;
            let offsets = memlayer_core::bag::uniform_offsets(end - start, bag);
            let part = pool
                .bag(&PagedBag {
                    page_table: engine.page_table(),
                    indices: &rows[start * bag..end * bag],
                    weights: &w[start * bag..end * bag],
                    offsets: &offsets,
                })
                .map_err(err)?;
            out.extend(part);
        }
        drop(guard);
        if tracing {
            // a page fetched by one run and read again by a later run is a fetch
            fetched_pages.sort_unstable();
            fetched_pages.dedup();
            hit_pages.sort_unstable();
            hit_pages.dedup();
            hit_pages.retain(|p| fetched_pages.binary_search(p).is_err());
            self.record(|| MemoryAccess::Values {
                rows: rows.to_vec(),
                bag,
                hit_pages,
                fetched_pages,
            });
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
        let (i, len) = level
            .checked_sub(1)
            .and_then(|i| self.block_lens.get(i).map(|&len| (i, len)))
            .ok_or_else(|| err(format!("the bank has no block section for level {level}")))?;
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
                TensorData::new(Vec::<f32>::new(), [0, len]),
                device,
            ));
        };
        // a prefetch of another context runs on while this one computes
        self.wait_prefetch_of(i, row);
        let (block, fetched) = {
            let mut st = lock(&self.shared.state);
            let hits = st.engine.stats().block_hits;
            let block = block_blocking(&mut st.engine, &self.shared.bank, i, row).map_err(err)?;
            (block, st.engine.stats().block_hits == hits)
        };
        self.record(|| MemoryAccess::Block {
            level,
            row,
            fetched,
        });
        let mut data = Vec::with_capacity(rows.len() * len);
        for _ in rows {
            data.extend_from_slice(&block);
        }
        Ok(Tensor::from_data(
            TensorData::new(data, [rows.len(), len]),
            device,
        ))
    }
}
