//! The page-in engine: what must be resident, where it goes, what came in.
//!
//! [`PageIn`] is the one page-in state machine of the native runtime and
//! the browser. It does **no IO**: a driver ([`crate::drive`]) asks it which
//! pages a batch needs, fetches them from its source (a [`crate::BankReader`]
//! or a [`crate::remote::RemoteBank`]), writes each into its slot (host
//! memory, wgpu buffers) and reports the arrival or the failure back.
//!
//! It owns
//! - the value section's geometry and the **budget arithmetic**: the FFN
//!   blocks' reserve (one block per level, two with prefetch) comes first,
//!   the value slots get the rest (never more slots than pages);
//! - the LRU [`PageCache`] and the **page table** (local value page → slot,
//!   [`NO_SLOT`] when not resident) the bag kernels read through; a page is
//!   published in the table only once its data is in the slot;
//! - the splitting of a batch into **runs of tokens** whose pages fit the
//!   slots together ([`bag_runs`]);
//! - the **FFN-block state** per level: the current block and, with
//!   prefetch, one block prefetched for the next context;
//! - the counters, [`MemoryStats`], the same type natively and in the browser.
//!
//! The engine is plain data: callers that share it across threads wrap it
//! in their own lock (the native runtime holds one mutex per batch, not per
//! row or page).

use std::sync::Arc;

use serde::Serialize;
use serde::ser::SerializeStruct;

use crate::cache::{BagRun, CacheError, CacheStats, NO_SLOT, PageCache, SlotId, bag_runs};
use crate::{BankError, PageId, SectionInfo, SectionKind};

/// Counters and gauges of a paged memory, native and browser alike.
///
/// Counters run since creation or the last reset; the gauges (budget,
/// slots, resident pages and bytes, bank pages, hit rate) are filled in by
/// [`PageIn::stats`]. Serialized (serde) with snake_case keys, the native
/// runtime's JSON; [`MemoryStats::camel_case`] is the browser's view.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct MemoryStats {
    /// Value-page accesses (one per distinct page per run of tokens).
    pub value_accesses: u64,
    /// Accesses that found the page resident.
    pub value_hits: u64,
    /// Accesses that had to bring the page in.
    pub value_misses: u64,
    /// Resident value pages dropped to make room.
    pub evictions: u64,
    /// Block requests (one per level per context).
    pub block_requests: u64,
    /// Block requests served without fetching (same block, or prefetched).
    pub block_hits: u64,
    /// Pages brought in (values + blocks, prefetch included; network or local copy).
    pub pages_streamed: u64,
    /// Bytes of the pages that came from the source (not from a local copy).
    pub bytes_streamed: u64,
    /// Wall time spent waiting for pages in the forward path, in seconds.
    pub fetch_seconds: f64,
    /// Of the pages streamed, those served by a local copy (the browser's
    /// OPFS mirror or Cache API).
    pub pages_from_cache: u64,
    /// Seconds of lookups and bags on the device, read-backs included (browser).
    pub device_seconds: f64,
    /// The byte budget (value slots in the bank's dtype + blocks as f32).
    pub budget_bytes: u64,
    /// Value-page slots the budget holds after the blocks' reserve.
    pub slots: u32,
    /// Value pages resident now.
    pub resident_pages: u64,
    /// Bytes resident now (value slots in use + blocks held): never above the budget.
    pub resident_bytes: u64,
    /// Value pages in the bank.
    pub bank_pages: u64,
    /// [`MemoryStats::hit_rate`] as of [`PageIn::stats`] (1 when idle).
    pub hit_rate: f64,
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

    /// The counters as the browser page reads them: camelCase keys, the
    /// value-page counters as `accesses` / `hits` / `misses`, and `hitRate`
    /// (`web/app.js`, `web/tests/chat.mjs`).
    pub fn camel_case(&self) -> impl Serialize + '_ {
        CamelCase(self)
    }
}

/// The browser's serialization of [`MemoryStats`].
struct CamelCase<'a>(&'a MemoryStats);

impl Serialize for CamelCase<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let s = self.0;
        let mut m = serializer.serialize_struct("MemoryStats", 17)?;
        m.serialize_field("budgetBytes", &s.budget_bytes)?;
        m.serialize_field("slots", &s.slots)?;
        m.serialize_field("residentPages", &s.resident_pages)?;
        m.serialize_field("residentBytes", &s.resident_bytes)?;
        m.serialize_field("bankPages", &s.bank_pages)?;
        m.serialize_field("pagesStreamed", &s.pages_streamed)?;
        m.serialize_field("pagesFromCache", &s.pages_from_cache)?;
        m.serialize_field("bytesStreamed", &s.bytes_streamed)?;
        m.serialize_field("accesses", &s.value_accesses)?;
        m.serialize_field("hits", &s.value_hits)?;
        m.serialize_field("misses", &s.value_misses)?;
        m.serialize_field("evictions", &s.evictions)?;
        m.serialize_field("blockRequests", &s.block_requests)?;
        m.serialize_field("blockHits", &s.block_hits)?;
        m.serialize_field("hitRate", &s.hit_rate)?;
        m.serialize_field("fetchSeconds", &s.fetch_seconds)?;
        m.serialize_field("deviceSeconds", &s.device_seconds)?;
        m.end()
    }
}

/// Why the engine refuses a budget, a batch, a block or an arrival; and,
/// from the drivers, why a page could not be brought in.
#[derive(Debug, thiserror::Error)]
pub enum PageInError {
    /// The budget cannot hold the blocks' reserve plus one value page.
    #[error(
        "a budget of {budget_bytes} bytes cannot hold the blocks ({block_bytes} bytes) and one \
         value page ({slot_bytes} bytes): at least {} bytes",
        block_bytes.saturating_add(*slot_bytes)
    )]
    BudgetBelowOnePage {
        /// The budget asked for.
        budget_bytes: u64,
        /// Bytes reserved for the blocks (two per level with prefetch).
        block_bytes: u64,
        /// Bytes of one value slot.
        slot_bytes: u64,
    },
    /// A bank without values: the budget cannot hold the blocks' reserve.
    #[error(
        "a budget of {budget_bytes} bytes cannot hold the blocks: at least {block_bytes} bytes"
    )]
    BudgetBelowBlocks {
        /// The budget asked for.
        budget_bytes: u64,
        /// Bytes reserved for the blocks.
        block_bytes: u64,
    },
    /// The budget holds fewer value slots than one token may read
    /// ([`PageInOptions::token_pages`]).
    #[error(
        "a budget of {budget_bytes} bytes holds {slots} pages of {slot_bytes} bytes; one token \
         reads up to {token_pages} pages: raise the budget to at least {at_least} bytes"
    )]
    BudgetBelowOneToken {
        /// The budget asked for.
        budget_bytes: u64,
        /// Value slots it holds.
        slots: u32,
        /// Bytes of one value slot.
        slot_bytes: u64,
        /// Pages one token may read.
        token_pages: u32,
        /// The smallest budget that holds them (blocks included).
        at_least: u64,
    },
    /// One token of a batch reads more value pages than there are slots.
    #[error(
        "token {token} reads {pages} value pages; the budget of {budget_bytes} bytes holds \
         {slots} (raise --budget-mb)"
    )]
    TokenTooLarge {
        /// The token (bag) in the batch.
        token: usize,
        /// Distinct value pages it reads.
        pages: usize,
        /// Value slots.
        slots: usize,
        /// The budget.
        budget_bytes: u64,
    },
    /// The bank has no product-key value section.
    #[error("the bank has no product-key value section")]
    NoValues,
    /// A value row outside the table.
    #[error("value row {row} outside the bank's {rows} rows")]
    RowOutOfRange {
        /// The row.
        row: u32,
        /// Rows of the value table.
        rows: usize,
    },
    /// A level without a block section (1-based, as the model counts).
    #[error("the bank has no block section for level {level}")]
    NoLevel {
        /// The level (1-based).
        level: usize,
    },
    /// A block row outside its level's section.
    #[error("block row {row} outside level {level} ({blocks} blocks)")]
    BlockRowOutOfRange {
        /// The block (cluster-tree node) row.
        row: usize,
        /// The level (1-based).
        level: usize,
        /// Blocks of the level.
        blocks: u64,
    },
    /// A block page of the wrong size.
    #[error("block page {page} holds {values} values, level {level} blocks have {want}")]
    BlockLength {
        /// The page.
        page: PageId,
        /// Values it holds.
        values: usize,
        /// The level (1-based).
        level: usize,
        /// Values of one block of the level.
        want: usize,
    },
    /// A prefetch with a block row count other than the level count.
    #[error("{rows} block rows for {levels} levels")]
    PrefetchRows {
        /// Rows given.
        rows: usize,
        /// Levels of the bank.
        levels: usize,
    },
    /// A prefetch while the budget reserves no prefetch blocks.
    #[error("prefetch is off: open the memory with PagedOptions::prefetch")]
    PrefetchOff,
    /// The slot pool could not resize to a new budget (nothing changed).
    #[error("resizing the page slots: {0}")]
    Resize(String),
    /// The page-cache policy refused (budget, slots, table).
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// Reading a page from a bank failed (names the source, the page and why).
    #[error(transparent)]
    Bank(#[from] BankError),
    /// Fetching a page from a remote bank failed (names the source, the page and why).
    #[error(transparent)]
    Remote(#[from] crate::remote::RemoteError),
    /// Writing a fetched page into its slot failed.
    #[error("writing page {page} of {location} into slot {slot}: {message}")]
    Slot {
        /// The page (global id).
        page: PageId,
        /// The bank's path or URL.
        location: String,
        /// The slot.
        slot: SlotId,
        /// The slot pool's error.
        message: String,
    },
    /// A fetched block page could not be unpacked into the model's blocks.
    #[error("unpacking block page {page} of {location}: {message}")]
    Block {
        /// The page (global id).
        page: PageId,
        /// The bank's path or URL.
        location: String,
        /// Why.
        message: String,
    },
}

/// How a [`PageIn`] budgets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageInOptions {
    /// Bytes of resident memory: value slots in the bank's dtype, blocks as
    /// f32 (as held; [`crate::resident_bytes`]).
    pub budget_bytes: u64,
    /// Reserve one extra block per level for prefetch.
    pub prefetch: bool,
    /// Value pages one token may read (`heads × knn`): if set, a budget
    /// holding fewer slots (or all pages, if fewer) is refused at open,
    /// naming the minimum; if not, a batch with a token that does not fit
    /// fails when it comes ([`PageInError::TokenTooLarge`]).
    pub token_pages: Option<u32>,
}

impl PageInOptions {
    /// A budget without prefetch or token check.
    pub fn budget(budget_bytes: u64) -> Self {
        Self {
            budget_bytes,
            prefetch: false,
            token_pages: None,
        }
    }
}

/// Geometry of the product-key value section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValueGeometry {
    /// The section.
    pub section: SectionInfo,
    /// Rows of the value table.
    pub rows: usize,
    /// Values per row.
    pub dim: usize,
    /// Rows per page (the last page may hold fewer).
    pub page_rows: usize,
}

impl ValueGeometry {
    /// The geometry of `section`, if it holds product-key values.
    pub fn of(section: &SectionInfo) -> Option<Self> {
        match section.spec.kind {
            SectionKind::PkmValues {
                rows,
                dim,
                page_rows,
            } => Some(Self {
                section: *section,
                rows: rows as usize,
                dim: dim as usize,
                page_rows: page_rows as usize,
            }),
            SectionKind::FfnBlocks { .. } => None,
        }
    }

    /// Bytes of one slot: a full page in the bank's dtype (`page_rows ×
    /// dim × dtype size`; every slot pool stores values as the bank does).
    pub fn slot_bytes(&self) -> u64 {
        self.page_rows as u64 * self.dim as u64 * self.section.spec.dtype.size() as u64
    }

    /// Pages of the section.
    pub fn pages(&self) -> u64 {
        self.section.page_count()
    }
}

/// Geometry of one level's FFN-block section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockGeometry {
    /// The section.
    pub section: SectionInfo,
    /// Values of one block (`layers · 3 · units · dim`).
    pub len: usize,
}

impl BlockGeometry {
    /// The geometry of `section`, if it holds FFN blocks.
    pub fn of(section: &SectionInfo) -> Option<Self> {
        match section.spec.kind {
            SectionKind::FfnBlocks {
                layers, units, dim, ..
            } => Some(Self {
                section: *section,
                len: layers as usize * 3 * units as usize * dim as usize,
            }),
            SectionKind::PkmValues { .. } => None,
        }
    }
}

/// One level's blocks: (table row, block).
#[derive(Clone, Debug)]
struct LevelState<B> {
    /// The current context's block.
    current: Option<(usize, B)>,
    /// A block prefetched for the next context.
    next: Option<(usize, B)>,
}

/// What [`PageIn::request_block`] says about a block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlockStep<B> {
    /// The block is resident (current, or the prefetched one now promoted).
    Resident(B),
    /// Fetch this page, then hand it over with [`PageIn::block_arrived`].
    Fetch(PageId),
}

/// The IO-free page-in engine (see the module docs). `B` is how a block is
/// held once fetched (natively `Arc<Vec<f32>>`; cloned when handed out).
#[derive(Clone, Debug)]
pub struct PageIn<B = Arc<Vec<f32>>> {
    values: Option<ValueGeometry>,
    cache: Option<PageCache>,
    /// Slot of each value page (local ids), [`NO_SLOT`] when not resident: (value pages,)
    page_table: Vec<SlotId>,
    value_slots: u32,
    levels: Vec<BlockGeometry>,
    blocks: Vec<LevelState<B>>,
    budget_bytes: u64,
    block_bytes: u64,
    prefetch: bool,
    /// Value pages one token may read, checked against every budget.
    token_pages: Option<u32>,
    /// Counters (the gauges are filled in by `stats`).
    stats: MemoryStats,
}

impl<B: Clone> PageIn<B> {
    /// The engine of a bank with `sections` (its first product-key value
    /// section, every FFN-block section as a level in order) under `opts`.
    ///
    /// The blocks' reserve (`Σ levels block bytes`, twice with prefetch)
    /// comes out of the budget first; the rest is cut into value slots of
    /// one page each, at most one per page. Fails with the minimum budget
    /// if the budget cannot hold the reserve and one value page (or, with
    /// [`PageInOptions::token_pages`], one token's pages).
    pub fn new(sections: &[SectionInfo], opts: &PageInOptions) -> Result<Self, PageInError> {
        let values = sections.iter().find_map(ValueGeometry::of);
        let levels: Vec<BlockGeometry> = sections.iter().filter_map(BlockGeometry::of).collect();
        let per_level: u64 = levels.iter().map(|l| l.len as u64 * 4).sum();
        let block_bytes = per_level.saturating_mul(if opts.prefetch { 2 } else { 1 });
        let budget_bytes = opts.budget_bytes;
        let (cache, value_slots, pages) = match values {
            Some(v) => {
                let slots = Self::slots_for(&v, budget_bytes, block_bytes, opts.token_pages)?;
                let cache = PageCache::new(slots * v.slot_bytes(), v.slot_bytes())?;
                let slots = cache.slot_count();
                (Some(cache), slots, v.pages() as usize)
            }
            None => {
                Self::check_blocks_fit(budget_bytes, block_bytes)?;
                (None, 0, 0)
            }
        };
        let blocks = levels
            .iter()
            .map(|_| LevelState {
                current: None,
                next: None,
            })
            .collect();
        Ok(Self {
            values,
            cache,
            page_table: vec![NO_SLOT; pages],
            value_slots,
            levels,
            blocks,
            budget_bytes,
            block_bytes,
            prefetch: opts.prefetch,
            token_pages: opts.token_pages,
            stats: MemoryStats::default(),
        })
    }

    /// Value slots a budget holds after the blocks' reserve (at most one
    /// per page), refused below one page (or one token's pages).
    fn slots_for(
        v: &ValueGeometry,
        budget_bytes: u64,
        block_bytes: u64,
        token_pages: Option<u32>,
    ) -> Result<u64, PageInError> {
        let slot_bytes = v.slot_bytes();
        let pages = v.pages();
        let slots = (budget_bytes.saturating_sub(block_bytes) / slot_bytes.max(1)).min(pages);
        if let Some(token_pages) = token_pages
            && slots < u64::from(token_pages).min(pages)
        {
            return Err(PageInError::BudgetBelowOneToken {
                budget_bytes,
                slots: slots as u32,
                slot_bytes,
                token_pages,
                at_least: block_bytes
                    .saturating_add(u64::from(token_pages).saturating_mul(slot_bytes)),
            });
        }
        if slots == 0 {
            return Err(PageInError::BudgetBelowOnePage {
                budget_bytes,
                block_bytes,
                slot_bytes,
            });
        }
        Ok(slots)
    }

    /// A bank without values: the budget must hold the blocks' reserve.
    fn check_blocks_fit(budget_bytes: u64, block_bytes: u64) -> Result<(), PageInError> {
        if budget_bytes < block_bytes {
            return Err(PageInError::BudgetBelowBlocks {
                budget_bytes,
                block_bytes,
            });
        }
        Ok(())
    }

    /// Changes the budget in place: the blocks' reserve stays, the value
    /// slots become what `budget_bytes` holds (refused, changing nothing, as
    /// [`PageIn::new`] refuses a budget). The most recently used value pages
    /// that fit stay resident ([`PageCache::resize`]); the rest leave the
    /// page table. Pages admitted but not yet arrived are dropped (their
    /// late report is stale and ignored).
    ///
    /// `relocate(slots, kept)` is called before anything changes, with the
    /// new slot count and every kept page's `(old slot, new slot)`: the slot
    /// pool resizes itself there (new slot `to` must hold what old slot
    /// `from` holds). If it fails, nothing changes and its error is returned.
    pub fn resize<E: std::fmt::Display>(
        &mut self,
        budget_bytes: u64,
        relocate: impl FnOnce(u32, &[(SlotId, SlotId)]) -> Result<(), E>,
    ) -> Result<(), PageInError> {
        let Some(v) = self.values else {
            Self::check_blocks_fit(budget_bytes, self.block_bytes)?;
            relocate(0, &[]).map_err(|e| PageInError::Resize(e.to_string()))?;
            self.budget_bytes = budget_bytes;
            return Ok(());
        };
        let slots = Self::slots_for(&v, budget_bytes, self.block_bytes, self.token_pages)?;
        let mut cache = self.cache.clone().ok_or(PageInError::NoValues)?;
        let first = v.section.first_page;
        // pending misses (admitted, not arrived): dropped
        let pending: Vec<PageId> = cache
            .lru_order()
            .into_iter()
            .filter(|&p| {
                p.checked_sub(first)
                    .and_then(|l| self.page_table.get(l as usize))
                    .is_none_or(|&t| t == NO_SLOT)
            })
            .collect();
        for p in pending {
            cache.remove(p);
        }
        let before: Vec<(PageId, SlotId)> = cache
            .lru_order()
            .into_iter()
            .filter_map(|p| cache.slot_of(p).map(|s| (p, s)))
            .collect();
        cache.resize(slots * v.slot_bytes())?;
        let kept: Vec<(SlotId, SlotId)> = before
            .iter()
            .filter_map(|&(p, from)| cache.slot_of(p).map(|to| (from, to)))
            .collect();
        relocate(cache.slot_count(), &kept).map_err(|e| PageInError::Resize(e.to_string()))?;
        let evicted = before.len() - kept.len();
        self.stats.evictions += evicted as u64;
        self.value_slots = cache.slot_count();
        cache.fill_page_table_from(first, &mut self.page_table);
        self.cache = Some(cache);
        self.budget_bytes = budget_bytes;
        Ok(())
    }

    /// The value section's geometry (none: the bank has no product-key values).
    pub fn values(&self) -> Option<&ValueGeometry> {
        self.values.as_ref()
    }

    /// The block sections, one per level (index 0 = level 1).
    pub fn levels(&self) -> &[BlockGeometry] {
        &self.levels
    }

    /// The byte budget.
    pub fn budget_bytes(&self) -> u64 {
        self.budget_bytes
    }

    /// Bytes reserved for blocks (one per level, two with prefetch).
    pub fn block_bytes(&self) -> u64 {
        self.block_bytes
    }

    /// Whether the budget reserves a prefetch block per level.
    pub fn prefetch_enabled(&self) -> bool {
        self.prefetch
    }

    /// Value-page slots the budget holds (after the blocks' reserve, at most
    /// one per page): the slots a pool must allocate.
    pub fn value_slots(&self) -> u32 {
        self.value_slots
    }

    /// Pages of the value table in the bank.
    pub fn value_pages(&self) -> u64 {
        self.values.map_or(0, |v| v.pages())
    }

    /// The page table the bag kernels read: `table[local page]` is the
    /// page's slot, [`NO_SLOT`] when not resident. (value pages,)
    pub fn page_table(&self) -> &[SlotId] {
        &self.page_table
    }

    /// Value pages resident now.
    pub fn resident_pages(&self) -> usize {
        self.cache.as_ref().map_or(0, PageCache::resident_pages)
    }

    /// Bytes resident now (value slots in use + blocks held): never above the budget.
    pub fn resident_bytes(&self) -> u64 {
        let values = self.cache.as_ref().map_or(0, PageCache::resident_bytes);
        let blocks: u64 = self
            .blocks
            .iter()
            .zip(&self.levels)
            .map(|(s, l)| (s.current.is_some() as u64 + s.next.is_some() as u64) * l.len as u64 * 4)
            .sum();
        values + blocks
    }

    /// The counters, with the gauges (budget, slots, resident pages and
    /// bytes, bank pages) as of now.
    pub fn stats(&self) -> MemoryStats {
        MemoryStats {
            budget_bytes: self.budget_bytes,
            slots: self.value_slots,
            resident_pages: self.resident_pages() as u64,
            resident_bytes: self.resident_bytes(),
            bank_pages: self.value_pages(),
            hit_rate: self.stats.hit_rate(),
            ..self.stats
        }
    }

    /// The LRU policy's own counters (value pages), if the bank has values.
    pub fn cache_stats(&self) -> Option<CacheStats> {
        self.cache.as_ref().map(PageCache::stats)
    }

    /// Zeroes the counters (resident pages and blocks stay).
    pub fn reset_stats(&mut self) {
        self.stats = MemoryStats::default();
        if let Some(c) = self.cache.as_mut() {
            c.reset_stats();
        }
    }

    /// Adds time spent waiting for pages (the drivers' clocks).
    pub fn add_fetch_seconds(&mut self, seconds: f64) {
        self.stats.fetch_seconds += seconds;
    }

    /// Adds time spent on the device (lookups, bags, read-backs).
    pub fn add_device_seconds(&mut self, seconds: f64) {
        self.stats.device_seconds += seconds;
    }

    /// Cuts a batch of equal bags — `rows`: (bags, bag) value row ids —
    /// into runs of consecutive bags (tokens) whose distinct pages fit the
    /// slots together (each run's `pages` are local page ids). Fails if the
    /// bank has no values, a row is outside the table, or one token alone
    /// reads more pages than there are slots (naming the token and the budget).
    pub fn value_runs(&self, rows: &[u32], bag: usize) -> Result<Vec<BagRun>, PageInError> {
        let v = self.values.ok_or(PageInError::NoValues)?;
        if let Some(&row) = rows.iter().find(|&&r| r as usize >= v.rows) {
            return Err(PageInError::RowOutOfRange { row, rows: v.rows });
        }
        let slots = self.value_slots as usize;
        bag_runs(rows, bag, v.page_rows, slots).map_err(|e| match e {
            CacheError::BagTooLarge { bag, pages, slots } => PageInError::TokenTooLarge {
                token: bag,
                pages,
                slots,
                budget_bytes: self.budget_bytes,
            },
            e => e.into(),
        })
    }

    /// Admits the value pages `local` (distinct local ids, e.g. one run's
    /// pages) so that all of them are resident together once the misses
    /// arrive: hits are marked recently used, misses get a slot (evicting
    /// the least recently used pages of other runs, which leave the page
    /// table). Counts accesses, hits, misses and evictions.
    ///
    /// Returns the misses to fetch: (global page id, slot). Each must be
    /// reported with [`PageIn::arrived`] or [`PageIn::failed`]; until then
    /// it is not in the page table.
    pub fn admit(&mut self, local: &[u32]) -> Result<Vec<(PageId, SlotId)>, PageInError> {
        let v = self.values.ok_or(PageInError::NoValues)?;
        let cache = self.cache.as_mut().ok_or(PageInError::NoValues)?;
        let first = v.section.first_page;
        let globals: Vec<PageId> = local.iter().map(|&p| first + u64::from(p)).collect();
        let admitted = cache.admit(&globals, first, &mut self.page_table)?;
        self.stats.value_accesses += globals.len() as u64;
        self.stats.value_hits += admitted.hits;
        self.stats.value_misses += admitted.misses.len() as u64;
        self.stats.evictions += admitted.evictions;
        Ok(admitted.misses)
    }

    /// The data of miss `page` (global id) is in `slot`: publishes it in
    /// the page table and counts it (`bytes` from the source, or a page
    /// served by a local copy). Returns false, changing nothing, if `slot`
    /// is not the slot the engine gave `page` (a stale report).
    pub fn arrived(&mut self, page: PageId, slot: SlotId, bytes: u64, local_copy: bool) -> bool {
        let Some(local) = self.local_index(page) else {
            return false;
        };
        if self.cache.as_ref().and_then(|c| c.slot_of(page)) != Some(slot) {
            return false;
        }
        self.page_table[local] = slot;
        self.count_page(bytes, local_copy);
        true
    }

    /// Counts a page brought in: `bytes` from the source, or a page served
    /// by a local copy.
    fn count_page(&mut self, bytes: u64, local_copy: bool) {
        self.stats.pages_streamed += 1;
        if local_copy {
            self.stats.pages_from_cache += 1;
        } else {
            self.stats.bytes_streamed += bytes;
        }
    }

    /// Miss `page` (global id) could not be brought into `slot`: the slot
    /// is freed and the page stays non-resident (a later access fetches it
    /// again). Never leaves a slot published with wrong data.
    pub fn failed(&mut self, page: PageId, slot: SlotId) {
        if let Some(local) = self.local_index(page) {
            self.page_table[local] = NO_SLOT;
        }
        if let Some(c) = self.cache.as_mut()
            && c.slot_of(page) == Some(slot)
        {
            c.remove(page);
        }
    }

    /// Local index of a global value page id.
    fn local_index(&self, page: PageId) -> Option<usize> {
        let first = self.values?.section.first_page;
        page.checked_sub(first)
            .and_then(|l| usize::try_from(l).ok())
            .filter(|&l| l < self.page_table.len())
    }

    fn level(&self, level: usize) -> Result<BlockGeometry, PageInError> {
        self.levels
            .get(level)
            .copied()
            .ok_or(PageInError::NoLevel { level: level + 1 })
    }

    /// Requests the block of table row `row` at level `level` (0-based) for
    /// the current context, counting a request: the current block if it is
    /// that row, the prefetched one (promoted to current) if it is, else
    /// the page to fetch — the old current block is dropped first (the
    /// budget holds one per level) — to hand over with [`PageIn::block_arrived`].
    pub fn request_block(&mut self, level: usize, row: usize) -> Result<BlockStep<B>, PageInError> {
        let lv = self.level(level)?;
        self.stats.block_requests += 1;
        let ls = &mut self.blocks[level];
        if let Some((_, b)) = ls.current.as_ref().filter(|(r, _)| *r == row) {
            self.stats.block_hits += 1;
            return Ok(BlockStep::Resident(b.clone()));
        }
        if let Some((_, b)) = ls.next.take_if(|(r, _)| *r == row) {
            ls.current = Some((row, b.clone()));
            self.stats.block_hits += 1;
            return Ok(BlockStep::Resident(b));
        }
        ls.current = None;
        let page = lv
            .section
            .block_page(row as u64)
            .ok_or(PageInError::BlockRowOutOfRange {
                row,
                level: level + 1,
                blocks: lv.section.page_count(),
            })?;
        Ok(BlockStep::Fetch(page))
    }

    /// Block page `page` of row `row`, level `level` (0-based), asked for by
    /// [`PageIn::request_block`], arrived: `values` values, `bytes` read from
    /// the source (or served by a local copy: `local_copy`). Counts the page;
    /// makes `block` the level's current block and hands it back, or fails
    /// if it has the wrong number of values.
    #[allow(clippy::too_many_arguments)]
    pub fn block_arrived(
        &mut self,
        level: usize,
        row: usize,
        page: PageId,
        values: usize,
        bytes: u64,
        local_copy: bool,
        block: B,
    ) -> Result<B, PageInError> {
        let lv = self.level(level)?;
        self.count_page(bytes, local_copy);
        if values != lv.len {
            return Err(PageInError::BlockLength {
                page,
                values,
                level: level + 1,
                want: lv.len,
            });
        }
        self.blocks[level].current = Some((row, block.clone()));
        Ok(block)
    }

    /// Checks a prefetch of `rows` (one table row per level): false if the
    /// bank has no blocks (nothing to do); an error if the row count is not
    /// the level count or the budget reserves no prefetch blocks.
    pub fn check_prefetch(&self, rows: &[usize]) -> Result<bool, PageInError> {
        if self.block_bytes == 0 {
            return Ok(false);
        }
        if rows.len() != self.levels.len() {
            return Err(PageInError::PrefetchRows {
                rows: rows.len(),
                levels: self.levels.len(),
            });
        }
        if !self.prefetch {
            return Err(PageInError::PrefetchOff);
        }
        Ok(true)
    }

    /// The page to prefetch for row `row` of level `level` (0-based): none
    /// if that block is already current or prefetched, the row is outside
    /// the level, or prefetch is off.
    pub fn prefetch_page(&self, level: usize, row: usize) -> Option<PageId> {
        let ls = self.blocks.get(level)?;
        if !self.prefetch
            || ls.current.as_ref().is_some_and(|(r, _)| *r == row)
            || ls.next.as_ref().is_some_and(|(r, _)| *r == row)
        {
            return None;
        }
        self.levels[level].section.block_page(row as u64)
    }

    /// A prefetched block arrived (`values` values, `bytes` from the
    /// source, or served by a local copy: `local_copy`): counted, and held as
    /// the level's next block, replacing any earlier one. A block of the
    /// wrong size is dropped (the forward fetches it again and reports the
    /// error then).
    pub fn prefetched(
        &mut self,
        level: usize,
        row: usize,
        values: usize,
        (bytes, local_copy): (u64, bool),
        block: B,
    ) {
        let Some(&lv) = self.levels.get(level) else {
            return;
        };
        self.count_page(bytes, local_copy);
        if self.prefetch && values == lv.len {
            self.blocks[level].next = Some((row, block));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BankLayout, Dtype, SectionSpec};

    /// Values: 40 rows × 2 f32 in pages of 4 rows (10 pages, 32-byte slots);
    /// optionally two levels of 3 blocks (1 layer, 2 units, dim 2: 12 values).
    fn sections(blocks: bool) -> Vec<SectionInfo> {
        let mut specs = vec![SectionSpec::pkm_values(40, 2, 4, Dtype::F32)];
        if blocks {
            for level in 0..2 {
                specs.push(SectionSpec::ffn_blocks(level, 3, 1, 2, 2, Dtype::F32));
            }
        }
        BankLayout::new(specs).plan().expect("plan").sections
    }

    /// Slots hold pages in the bank's dtype: an f16 or bf16 bank's slot is
    /// half an f32 bank's, so the same fraction of the bank as held
    /// ([`crate::resident_bytes`]; blocks as f32) gives the same slots.
    #[test]
    fn slots_are_counted_in_the_banks_dtype() {
        let of = |dtype: Dtype| {
            let mut specs = vec![SectionSpec::pkm_values(40, 2, 4, dtype)];
            specs.push(SectionSpec::ffn_blocks(0, 3, 1, 2, 2, dtype));
            BankLayout::new(specs).plan().expect("plan").sections
        };
        let f32_bank = of(Dtype::F32);
        // values 40 × 2 × 4 bytes + blocks 3 × 12 values as f32
        assert_eq!(crate::resident_bytes(&f32_bank), 320 + 144);
        for dtype in [Dtype::F16, Dtype::Bf16] {
            let bank = of(dtype);
            assert_eq!(crate::resident_bytes(&bank), 160 + 144, "{dtype}");
            let v = bank.iter().find_map(ValueGeometry::of).expect("values");
            assert_eq!(v.slot_bytes(), 16, "{dtype}: half the f32 slot");
            // the blocks' reserve (one block, 48 bytes) stays f32
            let at = |sections: &[SectionInfo], budget| {
                PageIn::<u32>::new(sections, &PageInOptions::budget(budget))
                    .expect("engine")
                    .value_slots()
            };
            assert_eq!(at(&bank, 48 + 3 * 16), 3);
            assert_eq!(at(&f32_bank, 48 + 3 * 32), 3);
            assert_eq!(at(&bank, 48 + 10 * 16), 10);
            let mut e = PageIn::<u32>::new(&bank, &PageInOptions::budget(48 + 2 * 16)).unwrap();
            e.resize(48 + 5 * 16, |_, _| Ok::<(), String>(())).unwrap();
            assert_eq!(e.value_slots(), 5);
            assert!(matches!(
                PageIn::<u32>::new(&bank, &PageInOptions::budget(48 + 15)),
                Err(PageInError::BudgetBelowOnePage { slot_bytes: 16, .. })
            ));
        }
    }

    fn engine(budget_bytes: u64) -> PageIn<u32> {
        PageIn::new(&sections(false), &PageInOptions::budget(budget_bytes)).expect("engine")
    }

    /// Admits `local` and reports every miss as arrived.
    fn page_in(e: &mut PageIn<u32>, local: &[u32]) -> Vec<(PageId, SlotId)> {
        let misses = e.admit(local).expect("admit");
        for &(p, s) in &misses {
            assert!(e.arrived(p, s, 16, false));
        }
        misses
    }

    #[test]
    fn hits_misses_and_evictions_are_counted_and_the_table_follows() {
        let mut e = engine(3 * 32);
        assert_eq!((e.value_slots(), e.value_pages()), (3, 10));
        let first = e.values().unwrap().section.first_page;
        assert_eq!(page_in(&mut e, &[0, 1, 2]).len(), 3);
        for p in 0..3 {
            assert_ne!(e.page_table()[p], NO_SLOT);
        }
        // 1 is a hit; 5 evicts the least recently used page, 0
        let misses = page_in(&mut e, &[1, 5]);
        assert_eq!(misses.len(), 1);
        assert_eq!(misses[0].0, first + 5);
        assert_eq!(e.page_table()[0], NO_SLOT);
        assert_eq!(e.page_table()[5], misses[0].1);
        let s = e.stats();
        assert_eq!(
            (s.value_accesses, s.value_hits, s.value_misses, s.evictions),
            (5, 1, 4, 1)
        );
        assert_eq!((s.pages_streamed, s.bytes_streamed), (4, 64));
        assert_eq!((s.slots, s.resident_pages, s.resident_bytes), (3, 3, 96));
        assert_eq!((s.budget_bytes, s.bank_pages), (96, 10));
        assert_eq!((s.hit_rate(), s.hit_rate), (0.2, 0.2));
        // a page from a local copy counts as streamed, not its bytes
        let m = e.admit(&[7]).unwrap();
        assert!(e.arrived(m[0].0, m[0].1, 16, true));
        let s = e.stats();
        assert_eq!(
            (s.pages_streamed, s.pages_from_cache, s.bytes_streamed),
            (5, 1, 64)
        );
        e.reset_stats();
        let s = e.stats();
        assert_eq!(
            (s.value_accesses, s.pages_streamed, s.resident_pages),
            (0, 0, 3)
        );
        assert_eq!(s.hit_rate(), 1.0);
    }

    #[test]
    fn resize_keeps_recent_pages_moves_their_slots_and_refuses_what_new_refuses() {
        let mut e = engine(4 * 32);
        let first = e.values().unwrap().section.first_page;
        page_in(&mut e, &[0, 1, 2, 3]);
        page_in(&mut e, &[0]); // recency 1, 2, 3, 0
        // a slot pool that mirrors the engine: slot → page it holds
        let mut pool: Vec<Option<u32>> = vec![None; 4];
        for (p, &s) in e.page_table().iter().enumerate() {
            if s != NO_SLOT {
                pool[s as usize] = Some(p as u32);
            }
        }
        // a failing pool changes nothing
        let table = e.page_table().to_vec();
        let err = e
            .resize(2 * 32, |_, _| Err("out of device memory"))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "resizing the page slots: out of device memory"
        );
        assert_eq!((e.page_table(), e.value_slots()), (&table[..], 4));
        // shrink to 2 slots: pages 3 and 0 stay
        e.resize(2 * 32, |slots, kept| {
            assert_eq!((slots, kept.len()), (2, 2));
            let old = pool.clone();
            pool = vec![None; slots as usize];
            for &(from, to) in kept {
                pool[to as usize] = old[from as usize];
            }
            Ok::<_, String>(())
        })
        .unwrap();
        assert_eq!(e.value_slots(), 2);
        for (p, &s) in e.page_table().iter().enumerate() {
            let want = matches!(p, 0 | 3);
            assert_eq!(s != NO_SLOT, want, "page {p}");
            if want {
                assert_eq!(pool[s as usize], Some(p as u32), "slot {s} holds page {p}");
            }
        }
        let s = e.stats();
        assert_eq!(
            (s.budget_bytes, s.slots, s.resident_pages, s.evictions),
            (64, 2, 2, 2)
        );
        // the next miss evicts page 3 (least recent of the kept)
        page_in(&mut e, &[7]);
        assert_eq!(e.page_table()[3], NO_SLOT);
        // grow: nothing moves, a pending miss is dropped and its report is stale
        let pending = e.admit(&[8]).unwrap();
        e.resize(10 * 32, |slots, kept| {
            assert_eq!(slots, 10);
            assert!(kept.iter().all(|&(from, to)| from == to));
            // 8 evicted 0; 7 stays, the pending 8 does not
            assert_eq!(kept.len(), 1);
            Ok::<_, String>(())
        })
        .unwrap();
        assert!(!e.arrived(pending[0].0, pending[0].1, 16, false));
        assert_eq!(e.page_table()[8], NO_SLOT);
        assert_eq!(e.admit(&[8]).unwrap()[0].0, first + 8, "fetched again");
        // below one page: refused as at open, nothing changes
        let err = e.resize(31, |_, _| Ok::<_, String>(())).unwrap_err();
        assert!(
            matches!(err, PageInError::BudgetBelowOnePage { .. }),
            "{err}"
        );
        assert_eq!(e.value_slots(), 10);
    }

    #[test]
    fn a_failed_arrival_frees_the_slot_and_leaves_the_page_out() {
        let mut e = engine(2 * 32);
        let misses = e.admit(&[3, 4]).unwrap();
        let (ok, bad) = (misses[0], misses[1]);
        assert!(e.arrived(ok.0, ok.1, 16, false));
        e.failed(bad.0, bad.1);
        assert_eq!(e.page_table()[4], NO_SLOT);
        assert_ne!(e.page_table()[3], NO_SLOT);
        assert_eq!(e.resident_pages(), 1);
        // a stale report of the failed page changes nothing
        assert!(!e.arrived(bad.0, bad.1, 16, false));
        assert_eq!(e.page_table()[4], NO_SLOT);
        // the freed slot is reused; the page is fetched again on its next access
        let again = e.admit(&[4]).unwrap();
        assert_eq!(again, vec![(bad.0, bad.1)]);
        assert_eq!(e.stats().evictions, 0, "the free slot, not an eviction");
    }

    #[test]
    fn budgets_too_small_are_refused_with_the_minimum() {
        // no blocks: one 32-byte page is the minimum
        let e = PageIn::<u32>::new(&sections(false), &PageInOptions::budget(31)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "a budget of 31 bytes cannot hold the blocks (0 bytes) and one value page (32 bytes): \
             at least 32 bytes"
        );
        // blocks: 2 levels × 12 values × 4 bytes = 96 bytes, 192 with prefetch
        let opts = PageInOptions {
            budget_bytes: 192 + 31,
            prefetch: true,
            token_pages: None,
        };
        let e = PageIn::<u32>::new(&sections(true), &opts).unwrap_err();
        assert!(e.to_string().contains("blocks (192 bytes)"), "{e}");
        assert!(e.to_string().contains("at least 224 bytes"), "{e}");
        let ok = PageIn::<u32>::new(
            &sections(true),
            &PageInOptions {
                budget_bytes: 224,
                ..opts
            },
        );
        assert_eq!(ok.unwrap().value_slots(), 1);
        // a bank of blocks only
        let blocks_only: Vec<SectionInfo> = sections(true).into_iter().skip(1).collect();
        let e = PageIn::<u32>::new(&blocks_only, &PageInOptions::budget(95)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "a budget of 95 bytes cannot hold the blocks: at least 96 bytes"
        );
        // one token's pages at open
        let opts = PageInOptions {
            budget_bytes: 3 * 32 + 5,
            prefetch: false,
            token_pages: Some(4),
        };
        let e = PageIn::<u32>::new(&sections(false), &opts).unwrap_err();
        assert_eq!(
            e.to_string(),
            "a budget of 101 bytes holds 3 pages of 32 bytes; one token reads up to 4 pages: \
             raise the budget to at least 128 bytes"
        );
        // never more slots than pages
        assert_eq!(engine(1 << 20).value_slots(), 10);
    }

    #[test]
    fn runs_split_where_pages_do_not_fit_and_tokens_too_large_are_named() {
        let e = engine(3 * 32);
        // bags of 2 rows; pages 0,1 | 1,2 | 5,6 | 6,6 → runs [0,1], [2,3]
        let rows = [0, 4, 5, 8, 20, 24, 25, 26];
        let runs = e.value_runs(&rows, 2).unwrap();
        assert_eq!(
            runs,
            vec![
                BagRun {
                    bags: 0..2,
                    pages: vec![0, 1, 2]
                },
                BagRun {
                    bags: 2..4,
                    pages: vec![5, 6]
                }
            ]
        );
        let e2 = engine(2 * 32);
        let err = e2.value_runs(&[0, 4, 8], 3).unwrap_err();
        assert_eq!(
            err.to_string(),
            "token 0 reads 3 value pages; the budget of 64 bytes holds 2 (raise --budget-mb)"
        );
        let err = e.value_runs(&[40], 1).unwrap_err();
        assert_eq!(err.to_string(), "value row 40 outside the bank's 40 rows");
        let none = PageIn::<u32>::new(&sections(true)[1..], &PageInOptions::budget(1 << 20));
        assert!(matches!(
            none.unwrap().value_runs(&[0], 1),
            Err(PageInError::NoValues)
        ));
    }

    #[test]
    fn blocks_current_and_prefetched_transitions() {
        let opts = PageInOptions {
            budget_bytes: 192 + 32,
            prefetch: true,
            token_pages: None,
        };
        let mut e = PageIn::<u32>::new(&sections(true), &opts).unwrap();
        let l0 = e.levels()[0].section.first_page;
        // first request: fetch; the arrival becomes current
        assert_eq!(e.request_block(0, 1).unwrap(), BlockStep::Fetch(l0 + 1));
        assert_eq!(
            e.block_arrived(0, 1, l0 + 1, 12, 48, false, 101).unwrap(),
            101
        );
        assert_eq!(e.request_block(0, 1).unwrap(), BlockStep::Resident(101));
        assert_eq!(e.resident_bytes(), 48);
        // prefetch row 2: wanted once, then held as next
        assert!(e.check_prefetch(&[2, 0]).unwrap());
        assert_eq!(e.prefetch_page(0, 1), None, "row 1 is current");
        assert_eq!(e.prefetch_page(0, 2), Some(l0 + 2));
        e.prefetched(0, 2, 12, (48, false), 102);
        assert_eq!(e.prefetch_page(0, 2), None, "row 2 is prefetched");
        assert_eq!(e.resident_bytes(), 96);
        // the next context asks for row 2: a hit, promoted to current
        assert_eq!(e.request_block(0, 2).unwrap(), BlockStep::Resident(102));
        assert_eq!(e.resident_bytes(), 48);
        // a wrong-size prefetch is dropped; a wrong-size fetch is an error
        e.prefetched(0, 0, 11, (44, false), 100);
        assert_eq!(e.prefetch_page(0, 0), Some(l0));
        assert_eq!(e.request_block(0, 0).unwrap(), BlockStep::Fetch(l0));
        let err = e.block_arrived(0, 0, l0, 11, 44, false, 100).unwrap_err();
        assert!(
            err.to_string()
                .contains("holds 11 values, level 1 blocks have 12")
        );
        assert_eq!(e.resident_bytes(), 0, "the old block was dropped first");
        let s = e.stats();
        assert_eq!((s.block_requests, s.block_hits), (4, 2));
        assert_eq!((s.pages_streamed, s.bytes_streamed), (4, 184));
        // errors: levels, rows, prefetch off
        assert_eq!(
            e.request_block(2, 0).unwrap_err().to_string(),
            "the bank has no block section for level 3"
        );
        assert_eq!(
            e.request_block(1, 3).unwrap_err().to_string(),
            "block row 3 outside level 2 (3 blocks)"
        );
        assert_eq!(
            e.check_prefetch(&[0]).unwrap_err().to_string(),
            "1 block rows for 2 levels"
        );
        let off = PageIn::<u32>::new(&sections(true), &PageInOptions::budget(1 << 20)).unwrap();
        assert!(matches!(
            off.check_prefetch(&[0, 0]),
            Err(PageInError::PrefetchOff)
        ));
        assert_eq!(off.prefetch_page(0, 0), None);
        assert!(!engine(1 << 20).check_prefetch(&[]).unwrap(), "no blocks");
    }

    #[test]
    fn the_browser_view_keeps_its_keys() {
        let mut e = engine(3 * 32);
        page_in(&mut e, &[0, 1]);
        let s = e.stats();
        let js = serde_json::to_value(s.camel_case()).unwrap();
        for k in [
            "budgetBytes",
            "slots",
            "residentPages",
            "residentBytes",
            "bankPages",
            "pagesStreamed",
            "pagesFromCache",
            "bytesStreamed",
            "accesses",
            "hits",
            "misses",
            "evictions",
            "hitRate",
            "fetchSeconds",
            "deviceSeconds",
        ] {
            assert!(js.get(k).is_some(), "{k} missing: {js}");
        }
        assert_eq!(js["accesses"], 2);
        assert_eq!(js["hitRate"], 0.0);
        let native = serde_json::to_value(s).unwrap();
        for k in [
            "value_accesses",
            "value_hits",
            "value_misses",
            "evictions",
            "block_requests",
            "block_hits",
            "pages_streamed",
            "bytes_streamed",
            "fetch_seconds",
        ] {
            assert!(native.get(k).is_some(), "{k} missing: {native}");
        }
    }
}
