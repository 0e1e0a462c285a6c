//! Device-agnostic page cache policy.
//!
//! A fixed pool of equal-size **slots** (`budget_bytes / slot_bytes` of them)
//! holds bank pages; the cache decides which page lives in which slot. It
//! moves no bytes itself: the caller loads the page into the returned slot
//! on a miss (device buffer upload, staging copy, ...), and kernels read
//! rows through the page table (`page id -> slot`, see
//! [`PageCache::fill_page_table`]).
//!
//! Eviction is LRU, O(1) per access: a hash map `page -> slot` plus an
//! intrusive doubly linked recency list over slot indices (`prev`/`next`
//! arrays). Slot bookkeeping grows lazily with the slots actually used, so a
//! large budget costs no memory up front.

use std::collections::{HashMap, HashSet};

use crate::PageId;

/// Index of a slot in the pool (`0..slot_count`).
pub type SlotId = u32;

/// Page-table value of a page that is not resident.
pub const NO_SLOT: SlotId = u32::MAX;

/// Largest supported number of slots.
pub const MAX_SLOTS: u64 = (u32::MAX - 1) as u64;

const NIL: u32 = u32::MAX;

/// Why a cache cannot be built or a batch cannot be made resident.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CacheError {
    /// A slot size of zero bytes.
    #[error("page cache slot size must be at least 1 byte")]
    ZeroSlotBytes,
    /// The budget is smaller than one slot.
    #[error("page cache budget of {budget_bytes} bytes cannot hold one slot of {slot_bytes} bytes")]
    BudgetTooSmall {
        /// Budget asked for.
        budget_bytes: u64,
        /// Slot size asked for.
        slot_bytes: u64,
    },
    /// The budget makes more slots than a `u32` slot id can address.
    #[error(
        "page cache budget of {budget_bytes} bytes gives {slots} slots of {slot_bytes} bytes, more than {MAX_SLOTS}"
    )]
    TooManySlots {
        /// Budget asked for.
        budget_bytes: u64,
        /// Slot size asked for.
        slot_bytes: u64,
        /// Resulting slot count.
        slots: u64,
    },
    /// A batch has more distinct pages than the cache has slots.
    #[error(
        "batch needs {distinct} distinct pages resident at once but the page cache has only {slots} slots"
    )]
    BatchTooLarge {
        /// Distinct pages in the batch.
        distinct: usize,
        /// Slots in the cache.
        slots: u32,
    },
    /// One bag alone reads more distinct pages than the cache has slots.
    #[error("bag {bag} reads {pages} distinct pages but the page cache has only {slots} slots")]
    BagTooLarge {
        /// The bag (a token, for a memory layer).
        bag: usize,
        /// Distinct pages it reads.
        pages: usize,
        /// Slots in the cache.
        slots: usize,
    },
    /// A page outside the page table given to [`PageCache::admit`].
    #[error("page {page} is outside the page table of {len} pages starting at page {first}")]
    PageOutsideTable {
        /// The page.
        page: PageId,
        /// First page of the table.
        first: PageId,
        /// Pages in the table.
        len: usize,
    },
}

/// Cache counters since creation (or the last [`PageCache::reset_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Page accesses (`hits + misses`).
    pub accesses: u64,
    /// Accesses that found the page resident.
    pub hits: u64,
    /// Accesses that had to load the page.
    pub misses: u64,
    /// Resident pages dropped to make room.
    pub evictions: u64,
    /// Bytes loaded into slots on misses (one full slot per miss).
    pub bytes_read: u64,
}

impl CacheStats {
    /// `hits / accesses` (0 before any access).
    pub fn hit_rate(&self) -> f64 {
        if self.accesses == 0 {
            0.0
        } else {
            self.hits as f64 / self.accesses as f64
        }
    }
}

/// Result of one page access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    /// Slot that holds (on a hit) or must now receive (on a miss) the page.
    pub slot: SlotId,
    /// Whether the page was already resident. On a miss the caller must
    /// load the page into `slot` (or [`PageCache::remove`] it if that fails).
    pub hit: bool,
    /// Page that lived in `slot` before and was evicted, if any.
    pub evicted: Option<PageId>,
}

/// A resident page that [`PageCache::resize`] moved to another slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Relocation {
    /// The page.
    pub page: PageId,
    /// The slot it was in (gone after the resize).
    pub from: SlotId,
    /// The slot it is in now.
    pub to: SlotId,
}

/// What [`PageCache::admit`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Admission {
    /// Pages that were resident.
    pub hits: u64,
    /// Resident pages dropped to make room.
    pub evictions: u64,
    /// Pages to load, with the slot each must be written to.
    pub misses: Vec<(PageId, SlotId)>,
}

/// A run of consecutive bags whose pages fit a cache's slots together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BagRun {
    /// The bags of the run.
    pub bags: std::ops::Range<usize>,
    /// Their distinct pages (local ids): each bag's new pages, sorted, in bag order.
    pub pages: Vec<u32>,
}

/// Cuts `rows` — `(bags, bag)` row ids of equal-sized bags — into runs of
/// consecutive bags whose distinct pages (`row / page_rows`) fit `slots`
/// together, greedily from the first bag: a paged embedding-bag makes each
/// run's pages resident, then sums its bags. Fails if one bag alone reads
/// more pages than there are slots.
pub fn bag_runs(
    rows: &[u32],
    bag: usize,
    page_rows: usize,
    slots: usize,
) -> Result<Vec<BagRun>, CacheError> {
    let bags = rows.len().checked_div(bag).unwrap_or(0);
    let page_rows = page_rows.max(1) as u32;
    let mut runs = Vec::new();
    let mut start = 0;
    while start < bags {
        let mut pages: Vec<u32> = Vec::new();
        let mut seen: HashSet<u32> = HashSet::new();
        let mut end = start;
        while end < bags {
            let mut new: Vec<u32> = rows[end * bag..(end + 1) * bag]
                .iter()
                .map(|&r| r / page_rows)
                .filter(|p| !seen.contains(p))
                .collect::<HashSet<_>>()
                .into_iter()
                .collect();
            if seen.len() + new.len() > slots {
                if end == start {
                    return Err(CacheError::BagTooLarge {
                        bag: end,
                        pages: new.len(),
                        slots,
                    });
                }
                break;
            }
            new.sort_unstable();
            seen.extend(new.iter().copied());
            pages.extend(new);
            end += 1;
        }
        runs.push(BagRun {
            bags: start..end,
            pages,
        });
        start = end;
    }
    Ok(runs)
}

/// LRU page-to-slot cache policy under a byte budget.
#[derive(Clone, Debug)]
pub struct PageCache {
    budget_bytes: u64,
    slot_bytes: u64,
    slot_count: u32,
    /// Page held by each slot allocated so far (`None` = free).
    slot_page: Vec<Option<PageId>>,
    /// Recency list links (towards MRU / towards LRU), indexed by slot.
    prev: Vec<u32>,
    next: Vec<u32>,
    /// Most recently used slot.
    head: u32,
    /// Least recently used slot.
    tail: u32,
    /// Allocated slots freed by `remove`/`clear`.
    free: Vec<SlotId>,
    map: HashMap<PageId, SlotId>,
    stats: CacheStats,
}

impl PageCache {
    /// A cache of `floor(budget_bytes / slot_bytes)` slots of `slot_bytes` each.
    ///
    /// Fails if `slot_bytes` is 0, the budget cannot hold one slot, or the
    /// slot count exceeds [`MAX_SLOTS`].
    pub fn new(budget_bytes: u64, slot_bytes: u64) -> Result<Self, CacheError> {
        Ok(Self {
            budget_bytes,
            slot_bytes,
            slot_count: Self::slots_for(budget_bytes, slot_bytes)?,
            slot_page: Vec::new(),
            prev: Vec::new(),
            next: Vec::new(),
            head: NIL,
            tail: NIL,
            free: Vec::new(),
            map: HashMap::new(),
            stats: CacheStats::default(),
        })
    }

    /// `floor(budget_bytes / slot_bytes)`, checked as [`PageCache::new`] does.
    fn slots_for(budget_bytes: u64, slot_bytes: u64) -> Result<u32, CacheError> {
        if slot_bytes == 0 {
            return Err(CacheError::ZeroSlotBytes);
        }
        let slots = budget_bytes / slot_bytes;
        if slots == 0 {
            return Err(CacheError::BudgetTooSmall {
                budget_bytes,
                slot_bytes,
            });
        }
        if slots > MAX_SLOTS {
            return Err(CacheError::TooManySlots {
                budget_bytes,
                slot_bytes,
                slots,
            });
        }
        Ok(slots as u32)
    }

    /// Changes the budget in place, keeping the most recently used pages
    /// that fit the new slot count (the others are evicted, counted as
    /// evictions) in their recency order. A kept page whose slot no longer
    /// exists moves to a free slot below the new count: the returned
    /// relocations `(page, from slot, to slot)` say which slot contents the
    /// caller must copy (old slot contents, before any is overwritten) for
    /// its slots to match. Growing moves nothing. Fails, changing nothing,
    /// as [`PageCache::new`] does for the new budget.
    pub fn resize(&mut self, budget_bytes: u64) -> Result<Vec<Relocation>, CacheError> {
        let slots = Self::slots_for(budget_bytes, self.slot_bytes)?;
        let order = self.lru_order(); // least → most recently used
        let keep = order.len().min(slots as usize);
        let (dropped, kept) = order.split_at(order.len() - keep);
        // slots allocated after the resize: kept pages fit (kept ≤ both)
        let allocated = self.slot_page.len().min(slots as usize);
        let mut used = vec![false; allocated];
        for p in kept {
            let s = self.map[p] as usize;
            if s < allocated {
                used[s] = true;
            }
        }
        let mut free_below = (0..allocated as u32).filter(|&s| !used[s as usize]);
        let mut relocations = Vec::new();
        let mut placed = Vec::with_capacity(kept.len());
        for &page in kept {
            let from = self.map[&page];
            let to = if (from as usize) < allocated {
                from
            } else {
                // kept ≤ allocated, so a free slot below is left for each mover
                free_below.next().unwrap_or(from)
            };
            if to != from {
                relocations.push(Relocation { page, from, to });
            }
            placed.push((page, to));
        }
        self.stats.evictions += dropped.len() as u64;
        self.budget_bytes = budget_bytes;
        self.slot_count = slots;
        self.slot_page = vec![None; allocated];
        self.prev = vec![NIL; allocated];
        self.next = vec![NIL; allocated];
        self.head = NIL;
        self.tail = NIL;
        self.map.clear();
        for &(page, slot) in &placed {
            self.slot_page[slot as usize] = Some(page);
            self.map.insert(page, slot);
            self.push_front(slot);
        }
        self.free = (0..allocated as u32)
            .rev()
            .filter(|&s| self.slot_page[s as usize].is_none())
            .collect();
        Ok(relocations)
    }

    /// The byte budget.
    pub fn budget_bytes(&self) -> u64 {
        self.budget_bytes
    }

    /// Bytes per slot.
    pub fn slot_bytes(&self) -> u64 {
        self.slot_bytes
    }

    /// Number of slots.
    pub fn slot_count(&self) -> u32 {
        self.slot_count
    }

    /// Number of resident pages.
    pub fn resident_pages(&self) -> usize {
        self.map.len()
    }

    /// Bytes of the slots holding pages (`resident_pages * slot_bytes <= budget`).
    pub fn resident_bytes(&self) -> u64 {
        self.map.len() as u64 * self.slot_bytes
    }

    /// Counters.
    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Zeroes the counters (residency is kept).
    pub fn reset_stats(&mut self) {
        self.stats = CacheStats::default();
    }

    /// Slot of `page` if resident (does not count as an access or change recency).
    pub fn slot_of(&self, page: PageId) -> Option<SlotId> {
        self.map.get(&page).copied()
    }

    /// Whether `page` is resident.
    pub fn contains(&self, page: PageId) -> bool {
        self.map.contains_key(&page)
    }

    /// Page held by `slot`, if any.
    pub fn page_in(&self, slot: SlotId) -> Option<PageId> {
        self.slot_page.get(slot as usize).copied().flatten()
    }

    /// Resident pages from least to most recently used.
    pub fn lru_order(&self) -> Vec<PageId> {
        let mut out = Vec::with_capacity(self.map.len());
        let mut s = self.tail;
        while s != NIL {
            if let Some(p) = self.slot_page[s as usize] {
                out.push(p);
            }
            s = self.prev[s as usize];
        }
        out
    }

    /// Writes the dense page table for pages `0..table.len()`: the slot of
    /// each resident page, [`NO_SLOT`] for the others. O(len + resident).
    pub fn fill_page_table(&self, table: &mut [SlotId]) {
        self.fill_page_table_from(0, table);
    }

    /// [`PageCache::fill_page_table`] for a section whose pages start at
    /// global id `first`: `table[page - first]` is each resident page's slot.
    pub fn fill_page_table_from(&self, first: PageId, table: &mut [SlotId]) {
        table.fill(NO_SLOT);
        for (&page, &slot) in &self.map {
            if let Some(t) = page
                .checked_sub(first)
                .and_then(|l| usize::try_from(l).ok())
                .and_then(|i| table.get_mut(i))
            {
                *t = slot;
            }
        }
    }

    fn unlink(&mut self, s: u32) {
        let (p, n) = (self.prev[s as usize], self.next[s as usize]);
        if p == NIL {
            self.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NIL {
            self.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.prev[s as usize] = NIL;
        self.next[s as usize] = NIL;
    }

    fn push_front(&mut self, s: u32) {
        self.prev[s as usize] = NIL;
        self.next[s as usize] = self.head;
        if self.head != NIL {
            self.prev[self.head as usize] = s;
        }
        self.head = s;
        if self.tail == NIL {
            self.tail = s;
        }
    }

    /// Accesses `page`: on a hit marks it most recently used; on a miss
    /// assigns it a free slot or evicts the least recently used page. O(1).
    pub fn access(&mut self, page: PageId) -> Access {
        self.stats.accesses += 1;
        if let Some(&slot) = self.map.get(&page) {
            self.stats.hits += 1;
            if self.head != slot {
                self.unlink(slot);
                self.push_front(slot);
            }
            return Access {
                slot,
                hit: true,
                evicted: None,
            };
        }
        self.stats.misses += 1;
        self.stats.bytes_read += self.slot_bytes;
        let mut evicted = None;
        let slot = if let Some(s) = self.free.pop() {
            s
        } else if self.slot_page.len() < self.slot_count as usize {
            let s = self.slot_page.len() as u32;
            self.slot_page.push(None);
            self.prev.push(NIL);
            self.next.push(NIL);
            s
        } else {
            // Full: every slot is linked, so the tail exists.
            let s = self.tail;
            self.unlink(s);
            if let Some(old) = self.slot_page[s as usize].take() {
                self.map.remove(&old);
                self.stats.evictions += 1;
                evicted = Some(old);
            }
            s
        };
        self.slot_page[slot as usize] = Some(page);
        self.map.insert(page, slot);
        self.push_front(slot);
        Access {
            slot,
            hit: false,
            evicted,
        }
    }

    /// Accesses every page of `pages` in order so that all of them are
    /// resident together when the call returns: a page of the batch is never
    /// evicted by a later page of the same batch. Repeated pages are hits.
    ///
    /// Returns one [`Access`] per input page (load the misses). Fails,
    /// changing nothing, if the batch has more distinct pages than slots.
    pub fn access_batch(&mut self, pages: &[PageId]) -> Result<Vec<Access>, CacheError> {
        let distinct = pages.iter().collect::<HashSet<_>>().len();
        if distinct > self.slot_count as usize {
            return Err(CacheError::BatchTooLarge {
                distinct,
                slots: self.slot_count,
            });
        }
        // Each access moves its page to the front of the recency list, so the
        // batch's pages occupy the first `k < slot_count` positions while a
        // new page of the batch is placed; the evicted tail is never one of them.
        Ok(pages.iter().map(|&p| self.access(p)).collect())
    }

    /// [`PageCache::access_batch`] keeping a dense page table in step:
    /// `table[page - first]` is the slot of each resident page of a section
    /// whose pages start at global id `first`, [`NO_SLOT`] otherwise.
    /// Evicted pages and misses are unmapped (a miss is mapped by the caller
    /// once its data is in the slot); the misses to load are returned with
    /// their slots. Fails, changing nothing, as `access_batch` does, or if a
    /// page falls outside `table`.
    pub fn admit(
        &mut self,
        pages: &[PageId],
        first: PageId,
        table: &mut [SlotId],
    ) -> Result<Admission, CacheError> {
        let len = table.len();
        let local = |p: PageId| {
            p.checked_sub(first)
                .and_then(|l| usize::try_from(l).ok())
                .filter(|&l| l < len)
        };
        if let Some(&bad) = pages.iter().find(|&&p| local(p).is_none()) {
            return Err(CacheError::PageOutsideTable {
                page: bad,
                first,
                len,
            });
        }
        let accesses = self.access_batch(pages)?;
        let mut out = Admission::default();
        for (a, &p) in accesses.iter().zip(pages) {
            if let Some(old) = a.evicted {
                if let Some(l) = local(old) {
                    table[l] = NO_SLOT;
                }
                out.evictions += 1;
            }
            if a.hit {
                out.hits += 1;
            } else {
                if let Some(l) = local(p) {
                    table[l] = NO_SLOT;
                }
                out.misses.push((p, a.slot));
            }
        }
        Ok(out)
    }

    /// Slots of `pages` after [`PageCache::access_batch`] (convenience).
    pub fn access_batch_slots(&mut self, pages: &[PageId]) -> Result<Vec<SlotId>, CacheError> {
        Ok(self
            .access_batch(pages)?
            .into_iter()
            .map(|a| a.slot)
            .collect())
    }

    /// Drops `page` (e.g. when loading it failed); returns the slot it held.
    pub fn remove(&mut self, page: PageId) -> Option<SlotId> {
        let slot = self.map.remove(&page)?;
        self.unlink(slot);
        self.slot_page[slot as usize] = None;
        self.free.push(slot);
        Some(slot)
    }

    /// Drops every page (counters are kept).
    pub fn clear(&mut self) {
        self.map.clear();
        self.slot_page.clear();
        self.prev.clear();
        self.next.clear();
        self.free.clear();
        self.head = NIL;
        self.tail = NIL;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn construction_errors() {
        assert_eq!(
            PageCache::new(10, 0).unwrap_err(),
            CacheError::ZeroSlotBytes
        );
        assert!(matches!(
            PageCache::new(99, 100),
            Err(CacheError::BudgetTooSmall { .. })
        ));
        assert!(matches!(
            PageCache::new(u64::MAX, 1),
            Err(CacheError::TooManySlots { .. })
        ));
        let c = PageCache::new(1 << 40, 4096).unwrap();
        assert_eq!(c.slot_count(), 1 << 28);
        assert_eq!(PageCache::new(250, 100).unwrap().slot_count(), 2);
    }

    #[test]
    fn lru_evicts_least_recently_used() {
        let mut c = PageCache::new(300, 100).unwrap();
        let a = c.access(1);
        assert!(!a.hit && a.evicted.is_none());
        c.access(2);
        c.access(3);
        assert!(c.access(1).hit); // order now 2, 3, 1
        let a = c.access(4);
        assert_eq!(a.evicted, Some(2));
        assert_eq!(c.slot_of(4), Some(a.slot));
        assert_eq!(c.lru_order(), vec![3, 1, 4]);
        let s = c.stats();
        assert_eq!(
            (s.accesses, s.hits, s.misses, s.evictions, s.bytes_read),
            (5, 1, 4, 1, 400)
        );
        let s3 = c.slot_of(3);
        assert!(s3.is_some());
        assert_eq!(c.remove(3), s3);
        assert_eq!(c.lru_order(), vec![1, 4]);
    }

    #[test]
    fn remove_frees_the_slot_and_page_table_is_dense() {
        let mut c = PageCache::new(200, 100).unwrap();
        let a = c.access(7).slot;
        let b = c.access(9).slot;
        assert_eq!(c.remove(7), Some(a));
        assert_eq!(c.remove(7), None);
        let again = c.access(11);
        assert_eq!((again.slot, again.evicted), (a, None));
        let mut table = vec![0; 12];
        c.fill_page_table(&mut table);
        for (p, &t) in table.iter().enumerate() {
            let want = match p {
                9 => b,
                11 => a,
                _ => NO_SLOT,
            };
            assert_eq!(t, want, "page {p}");
        }
        c.clear();
        assert_eq!(c.resident_pages(), 0);
        assert!(!c.access(9).hit);
    }

    #[test]
    fn batch_larger_than_cache_fails_without_changes() {
        let mut c = PageCache::new(300, 100).unwrap();
        c.access(1);
        let before = c.stats();
        let e = c.access_batch(&[5, 6, 7, 8, 5]).unwrap_err();
        assert_eq!(
            e,
            CacheError::BatchTooLarge {
                distinct: 4,
                slots: 3
            }
        );
        assert_eq!(c.stats(), before);
        assert_eq!(c.lru_order(), vec![1]);
        let slots = c.access_batch_slots(&[5, 6, 5, 7]).unwrap();
        assert_eq!(slots[0], slots[2]);
        for (p, s) in [5, 6, 5, 7].iter().zip(&slots) {
            assert_eq!(c.page_in(*s), Some(*p));
        }
    }

    #[test]
    fn big_cache_is_fast() {
        // 1M slots, 4M accesses: an O(n) scan per access would take minutes.
        let mut c = PageCache::new(1 << 20, 1).unwrap();
        let mut rng = memlayer_core::rng::Rng::new(5);
        for _ in 0..4_000_000 {
            c.access(rng.below(1 << 21));
        }
        let s = c.stats();
        assert_eq!(s.hits + s.misses, s.accesses);
        assert!(c.resident_bytes() <= c.budget_bytes());
    }

    /// Reference LRU: pages from least to most recently used.
    struct Model {
        order: VecDeque<PageId>,
        cap: usize,
    }

    impl Model {
        fn access(&mut self, p: PageId) -> (bool, Option<PageId>) {
            if let Some(i) = self.order.iter().position(|&x| x == p) {
                self.order.remove(i);
                self.order.push_back(p);
                return (true, None);
            }
            let ev = if self.order.len() == self.cap {
                self.order.pop_front()
            } else {
                None
            };
            self.order.push_back(p);
            (false, ev)
        }
        fn remove(&mut self, p: PageId) {
            self.order.retain(|&x| x != p);
        }
        /// Keeps the `cap` most recently used pages; returns how many went.
        fn resize(&mut self, cap: usize) -> usize {
            self.cap = cap;
            let gone = self.order.len().saturating_sub(cap);
            self.order.drain(..gone);
            gone
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        One(PageId),
        Batch(Vec<PageId>),
        Remove(PageId),
        /// Resize to this many slots.
        Resize(u64),
    }

    fn op(pages: u64) -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..pages).prop_map(Op::One),
            3 => prop::collection::vec(0..pages, 0..8).prop_map(Op::Batch),
            1 => (0..pages).prop_map(Op::Remove),
            1 => (1u64..9).prop_map(Op::Resize),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        /// Against a shadow LRU model and a shadow slot map: same hits and
        /// evictions, every returned slot holds exactly the asked page, batch
        /// pages are all resident together, the budget is never exceeded and
        /// the counters add up.
        #[test]
        fn matches_shadow_model(
            slot_bytes in 1u64..5000,
            slots in 1u64..9,
            extra in 0u64..5000,
            pages in 1u64..20,
            ops in prop::collection::vec(op(20), 0..200),
        ) {
            let mut budget = slots * slot_bytes + extra % slot_bytes;
            let mut slots = slots;
            let mut c = PageCache::new(budget, slot_bytes).unwrap();
            prop_assert_eq!(u64::from(c.slot_count()), slots);
            let mut model = Model { order: VecDeque::new(), cap: slots as usize };
            let mut shadow: HashMap<SlotId, PageId> = HashMap::new();
            let mut accesses = 0u64;
            let mut removed = 0u64;
            let check_one = |c: &PageCache, shadow: &mut HashMap<SlotId, PageId>, model: &mut Model, p: PageId, a: Access| -> Result<(), TestCaseError> {
                let (hit, ev) = model.access(p);
                prop_assert_eq!(a.hit, hit);
                prop_assert_eq!(a.evicted, ev);
                prop_assert!(a.slot < c.slot_count());
                if a.hit {
                    prop_assert_eq!(shadow.get(&a.slot).copied(), Some(p));
                } else {
                    prop_assert_eq!(shadow.get(&a.slot).copied(), a.evicted);
                }
                shadow.insert(a.slot, p);
                Ok(())
            };
            for o in ops {
                match o {
                    Op::One(p) => {
                        let p = p % pages;
                        let a = c.access(p);
                        accesses += 1;
                        check_one(&c, &mut shadow, &mut model, p, a)?;
                        prop_assert_eq!(c.page_in(a.slot), Some(p));
                    }
                    Op::Batch(b) => {
                        let b: Vec<PageId> = b.into_iter().map(|p| p % pages).collect();
                        let distinct = b.iter().collect::<HashSet<_>>().len();
                        let before = c.stats();
                        match c.access_batch(&b) {
                            Ok(acc) => {
                                prop_assert!(distinct as u64 <= slots);
                                prop_assert_eq!(acc.len(), b.len());
                                for (&p, &a) in b.iter().zip(&acc) {
                                    check_one(&c, &mut shadow, &mut model, p, a)?;
                                }
                                accesses += b.len() as u64;
                                // All pages of the batch resident at once, in their slots.
                                for (&p, a) in b.iter().zip(&acc) {
                                    prop_assert_eq!(c.page_in(a.slot), Some(p));
                                    prop_assert_eq!(c.slot_of(p), Some(a.slot));
                                }
                            }
                            Err(CacheError::BatchTooLarge { distinct: d, .. }) => {
                                prop_assert_eq!(d, distinct);
                                prop_assert!(distinct as u64 > slots);
                                prop_assert_eq!(c.stats(), before);
                            }
                            Err(e) => prop_assert!(false, "{}", e),
                        }
                    }
                    Op::Remove(p) => {
                        let p = p % pages;
                        let had = c.slot_of(p);
                        prop_assert_eq!(c.remove(p), had);
                        if let Some(s) = had {
                            shadow.remove(&s);
                            removed += 1;
                        }
                        model.remove(p);
                    }
                    Op::Resize(n) => {
                        let before: HashMap<PageId, SlotId> =
                            shadow.iter().map(|(&s, &p)| (p, s)).collect();
                        budget = n * slot_bytes + extra % slot_bytes;
                        slots = n;
                        let moved = c.resize(budget).unwrap();
                        prop_assert_eq!(u64::from(c.slot_count()), n);
                        model.resize(n as usize);
                        // every kept page is where it was or where a
                        // relocation says, and each relocation's source held it
                        let mut now = HashMap::new();
                        for &p in &model.order {
                            let old = before[&p];
                            let slot = match moved.iter().find(|r| r.page == p) {
                                Some(r) => {
                                    prop_assert_eq!(r.from, old);
                                    prop_assert!(r.to != old);
                                    r.to
                                }
                                None => old,
                            };
                            prop_assert!(slot < c.slot_count());
                            prop_assert_eq!(c.slot_of(p), Some(slot));
                            now.insert(slot, p);
                        }
                        prop_assert_eq!(now.len(), model.order.len());
                        prop_assert!(moved.iter().all(|r| model.order.contains(&r.page)));
                        shadow = now;
                    }
                }
                prop_assert!(c.resident_bytes() <= budget);
                prop_assert_eq!(c.resident_pages(), model.order.len());
                prop_assert_eq!(c.lru_order(), model.order.iter().copied().collect::<Vec<_>>());
                let s = c.stats();
                prop_assert_eq!(s.accesses, accesses);
                prop_assert_eq!(s.hits + s.misses, s.accesses);
                prop_assert_eq!(s.bytes_read, s.misses * slot_bytes);
                prop_assert_eq!(s.misses, s.evictions + removed + c.resident_pages() as u64);
            }
        }
    }

    #[test]
    fn resize_keeps_the_most_recent_pages_and_moves_them_below_the_new_count() {
        let mut c = PageCache::new(400, 100).unwrap();
        for p in [10, 11, 12, 13] {
            c.access(p); // slots 0..4 in order
        }
        c.access(10); // recency 11, 12, 13, 10
        let moved = c.resize(200).unwrap();
        assert_eq!(c.lru_order(), vec![13, 10]);
        assert_eq!(c.slot_of(10), Some(0), "page 10 stays in slot 0");
        // page 13 was in slot 3, gone: it moves to the free slot 1
        assert_eq!(
            moved,
            vec![Relocation {
                page: 13,
                from: 3,
                to: 1
            }]
        );
        assert_eq!(c.stats().evictions, 2);
        assert!(c.resident_bytes() <= c.budget_bytes());
        // full: the next miss evicts the least recently used kept page
        assert_eq!(c.access(14).evicted, Some(13));
        // growing moves nothing and the new slots fill before evicting
        assert!(c.resize(450).unwrap().is_empty());
        assert_eq!(c.slot_count(), 4);
        assert_eq!(c.access(15).evicted, None);
        assert_eq!(c.access(16).evicted, None);
        assert_eq!(c.access(17).evicted, Some(10));
        // a budget below one slot changes nothing
        let before = c.lru_order();
        assert!(matches!(
            c.resize(99),
            Err(CacheError::BudgetTooSmall { .. })
        ));
        assert_eq!((c.lru_order(), c.slot_count()), (before, 4));
    }

    #[test]
    fn admit_keeps_the_page_table_in_step_with_the_cache() {
        // 2 slots; a section whose pages start at global id 10
        let mut c = PageCache::new(2, 1).unwrap();
        let mut table = vec![NO_SLOT; 4];
        let a = c.admit(&[10, 12], 10, &mut table).unwrap();
        assert_eq!((a.hits, a.evictions, a.misses.len()), (0, 0, 2));
        assert_eq!(table, vec![NO_SLOT; 4], "misses are mapped by the caller");
        for &(p, s) in &a.misses {
            table[(p - 10) as usize] = s;
        }
        // 13 evicts the LRU page 10, which leaves the table; 12 is a hit
        let b = c.admit(&[12, 13], 10, &mut table).unwrap();
        assert_eq!((b.hits, b.evictions), (1, 1));
        assert_eq!(table[0], NO_SLOT);
        assert_ne!(table[2], NO_SLOT);
        assert_eq!(b.misses, vec![(13, a.misses[0].1)]);
        let e = c.admit(&[9], 10, &mut table).unwrap_err();
        assert!(e.to_string().contains("page 9 is outside"), "{e}");
        assert!(c.admit(&[14], 10, &mut table).is_err());
    }

    #[test]
    fn bag_runs_fit_the_slots_and_cover_every_bag_in_order() {
        // bags of 2 rows, 1-row pages, 3 slots
        let rows = [0, 1, 1, 2, 5, 6, 6, 6, 0, 0];
        let runs = bag_runs(&rows, 2, 1, 3).unwrap();
        assert_eq!(
            runs,
            vec![
                BagRun {
                    bags: 0..2,
                    pages: vec![0, 1, 2]
                },
                BagRun {
                    bags: 2..5,
                    pages: vec![5, 6, 0]
                },
            ]
        );
        // 2-row pages: pages 0, 0 | 0, 1 | 2, 3 | 3, 3 | 0, 0 → 4 pages, one run in 4 slots
        assert_eq!(bag_runs(&rows, 2, 2, 4).unwrap().len(), 1);
        assert_eq!(bag_runs(&rows, 2, 2, 3).unwrap().len(), 2);
        let e = bag_runs(&[0, 1, 2, 3], 4, 1, 3).unwrap_err();
        assert_eq!(
            e,
            CacheError::BagTooLarge {
                bag: 0,
                pages: 4,
                slots: 3
            }
        );
        assert!(bag_runs(&[], 2, 1, 1).unwrap().is_empty());
    }
}
