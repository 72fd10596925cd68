//! Per-guest-page pin counters: the tracker's counterpart of the kernel's
//! per-page pin count (`GUP_PIN_COUNTING_BIAS` in `page->_refcount`, read by
//! `folio_maybe_dma_pinned()`).
//!
//! Counts are kept at two levels, as the kernel pins a large folio with one
//! atomic (`try_grab_folio()` adds to the folio, not to each page):
//!
//! - a **granule word** per 64 KiB of guest-physical memory (16 guest pages,
//!   aligned), raised by a range that covers the whole granule;
//! - a **page word** per guest page (GPA >> 12), raised for the pages of a
//!   range that covers its granule only in part.
//!
//! A page's pin count is the sum of its page word and its granule word. Each
//! word holds both directions: low 32 bits = pins in direction
//! `DeviceWrite`, high 32 bits = pins in direction `DeviceRead`. An aligned
//! 128 KiB buffer is pinned with 2 atomic adds instead of 32.
//!
//! # No false negatives
//!
//! Every request raises its counts (SeqCst read-modify-writes) before it
//! checks (SeqCst loads). Two requests sharing a page either raise the same
//! word (one modification order: the later one's check reads the earlier
//! one's add) or different words of that page (a granule word and a page
//! word). The second case is the store-buffer pattern: in the single total
//! order of SeqCst operations one of the two adds comes first, and the other
//! request's load of that word comes after its own add, so it reads the
//! first add (or a later value). Either way at least one of the two checks
//! sees the other pin, which is what `tracker.rs` relies on. On x86 a SeqCst
//! load is a plain load and the adds are `lock xadd` either way.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::guest::GuestRange;

use super::{Direction, GUEST_PAGE_SHIFT};

/// Guest pages per chunk: 1 GiB of guest-physical memory (2^18 pages, 2 MiB of counters).
const CHUNK_PAGE_SHIFT: u32 = 30 - GUEST_PAGE_SHIFT;
const CHUNK_PAGES: u64 = 1 << CHUNK_PAGE_SHIFT;
/// Guest pages per granule: 64 KiB (a granule word counts pins covering all of it).
pub(crate) const GRANULE_PAGES: u64 = 16;
/// Chunks in the direct table: GPAs below 128 TiB (47 bits: guest RAM, and
/// libblkio, whose IOVAs are its own virtual addresses). The table itself is
/// 3 MiB; a chunk's counters are allocated when a page of it is first pinned.
const NUM_CHUNKS: usize = 1 << 17;
/// First guest page not covered by the direct table (GPA 128 TiB >> 12).
pub(crate) const DIRECT_PAGES: u64 = (NUM_CHUNKS as u64) << CHUNK_PAGE_SHIFT;

/// Mask of the `DeviceWrite` count in a page word.
pub(crate) const DW_MASK: u64 = 0xffff_ffff;

/// The amount one pin in direction `dir` adds to a page word.
pub(crate) fn one(dir: Direction) -> u64 {
    match dir {
        Direction::DeviceWrite => 1,
        Direction::DeviceRead => 1 << 32,
    }
}

/// Splits a page word into (DeviceWrite pins, DeviceRead pins).
pub(crate) fn split(word: u64) -> (u64, u64) {
    (word & DW_MASK, word >> 32)
}

/// First and last guest page (inclusive) touched by `r`, or `None` for an empty range.
pub(crate) fn page_span(r: &GuestRange) -> Option<(u64, u64)> {
    if r.len == 0 {
        return None;
    }
    let last_byte = r.addr.saturating_add(u64::from(r.len) - 1);
    Some((r.addr >> GUEST_PAGE_SHIFT, last_byte >> GUEST_PAGE_SHIFT))
}

/// Guest pages touched by `ranges`, counting a page once per range that touches it.
pub(crate) fn page_touches(ranges: &[GuestRange]) -> u64 {
    ranges
        .iter()
        .filter_map(page_span)
        .map(|(first, last)| last - first + 1)
        .sum()
}

/// How many of `ranges` touch guest page `page`.
pub(crate) fn touches_of(ranges: &[GuestRange], page: u64) -> u64 {
    ranges
        .iter()
        .filter_map(page_span)
        .filter(|&(first, last)| first <= page && page <= last)
        .count() as u64
}

/// The counters of 1 GiB of guest-physical memory.
struct Chunk {
    /// One word per guest page.
    pages: Box<[AtomicU64]>,
    /// One word per 64 KiB granule ([`GRANULE_PAGES`] pages).
    granules: Box<[AtomicU64]>,
    /// One bit per granule ever pinned (in either word): what
    /// [`Chunk::pinned_pages`] reads (a guest's buffers are rarely spread
    /// over all of its memory, a test's never).
    touched: Box<[AtomicU64]>,
}

impl Chunk {
    fn new() -> Self {
        let words = |n: u64| (0..n).map(|_| AtomicU64::new(0)).collect();
        Chunk {
            pages: words(CHUNK_PAGES),
            granules: words(CHUNK_PAGES / GRANULE_PAGES),
            touched: words(CHUNK_PAGES / GRANULE_PAGES / 64),
        }
    }

    /// Marks the granules of pages `lo..=hi` as pinned once, for
    /// [`Chunk::pinned_pages`]: a load per 64 granules (4 MiB), a
    /// read-modify-write only the first time.
    fn touch(&self, lo: usize, hi: usize) {
        const G: usize = GRANULE_PAGES as usize;
        let (first, last) = (lo / G, hi / G);
        for w in first / 64..=last / 64 {
            let from = if w == first / 64 { first % 64 } else { 0 };
            let to = if w == last / 64 { last % 64 } else { 63 };
            let mask = (u64::MAX >> (63 - to)) & (u64::MAX << from);
            if self.touched[w].load(Ordering::Relaxed) & mask != mask {
                self.touched[w].fetch_or(mask, Ordering::Relaxed);
            }
        }
    }

    /// Adds `inc` (wrapping: a subtraction is the add of its negation) for
    /// the pages `lo..=hi` (indices in this chunk) of one range: to the
    /// granule word of every granule the range covers whole, to the page
    /// words of the others. Pin and unpin of the same range split it the same
    /// way, so each undoes the other word for word.
    fn add(&self, lo: usize, hi: usize, inc: u64) {
        const G: usize = GRANULE_PAGES as usize;
        let mut i = lo;
        while i <= hi {
            if i.is_multiple_of(G) && i + G - 1 <= hi {
                self.granules[i / G].fetch_add(inc, Ordering::SeqCst);
                i += G;
            } else {
                self.pages[i].fetch_add(inc, Ordering::SeqCst);
                i += 1;
            }
        }
    }

    /// A page's count: its page word plus its granule word.
    fn word(&self, i: usize) -> u64 {
        let g = self.granules[i / GRANULE_PAGES as usize].load(Ordering::SeqCst);
        self.pages[i].load(Ordering::SeqCst).wrapping_add(g)
    }

    /// Guest pages of this chunk with a count other than 0.
    fn pinned_pages(&self) -> u64 {
        const G: usize = GRANULE_PAGES as usize;
        let mut touched = Vec::new();
        for (w, bits) in self.touched.iter().enumerate() {
            let mut bits = bits.load(Ordering::Relaxed);
            while bits != 0 {
                touched.push(w * 64 + bits.trailing_zeros() as usize);
                bits &= bits - 1;
            }
        }
        touched
            .into_iter()
            .map(|g| {
                let pages = &self.pages[g * G..(g + 1) * G];
                if self.granules[g].load(Ordering::SeqCst) != 0 {
                    GRANULE_PAGES
                } else {
                    pages
                        .iter()
                        .filter(|p| p.load(Ordering::SeqCst) != 0)
                        .count() as u64
                }
            })
            .sum()
    }
}

/// One step of [`PageCounts::runs`].
enum Run<'a> {
    /// The pages `lo..=hi` (indices) of one chunk, the first of them at the
    /// given guest page.
    Direct(u64, &'a Chunk, usize, usize),
    /// One guest page at or above 128 TiB (hash-map fallback).
    High(u64),
}

/// The per-page counter table.
pub(crate) struct PageCounts {
    /// Direct table, indexed by GPA >> 30.
    chunks: Box<[OnceLock<Chunk>]>,
    /// Indices of the allocated chunks, in allocation order.
    allocated: Mutex<Vec<usize>>,
    /// Guest pages at or above 128 TiB: page -> word (absent = 0), page
    /// level only. Correctness over speed: no guest we serve has RAM there
    /// in practice.
    high: Mutex<HashMap<u64, u64>>,
}

impl PageCounts {
    pub(crate) fn new() -> Self {
        PageCounts {
            chunks: (0..NUM_CHUNKS).map(|_| OnceLock::new()).collect(),
            allocated: Mutex::new(Vec::new()),
            high: Mutex::new(HashMap::new()),
        }
    }

    /// Calls `f` for every run of direct-table pages of each range inside one
    /// chunk ([`Run::Direct`]; chunks are allocated first if `alloc`, skipped if
    /// absent otherwise), then for every page at or above 128 TiB ([`Run::High`]).
    /// Stops when `f` breaks.
    fn runs<'a>(
        &'a self,
        ranges: &[GuestRange],
        alloc: bool,
        mut f: impl FnMut(Run<'a>) -> ControlFlow<()>,
    ) {
        for (first, last) in ranges.iter().filter_map(page_span) {
            let mut page = first;
            while page <= last.min(DIRECT_PAGES - 1) {
                let idx = (page >> CHUNK_PAGE_SHIFT) as usize;
                let chunk_last = ((idx as u64 + 1) << CHUNK_PAGE_SHIFT) - 1;
                let run_last = last.min(chunk_last);
                let chunk = if alloc {
                    Some(self.chunks[idx].get_or_init(|| {
                        self.allocated
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(idx);
                        Chunk::new()
                    }))
                } else {
                    self.chunks[idx].get()
                };
                if let Some(chunk) = chunk {
                    let lo = (page & (CHUNK_PAGES - 1)) as usize;
                    let hi = (run_last & (CHUNK_PAGES - 1)) as usize;
                    if f(Run::Direct(page, chunk, lo, hi)).is_break() {
                        return;
                    }
                }
                page = run_last + 1;
            }
            let mut page = first.max(DIRECT_PAGES);
            while page <= last {
                if f(Run::High(page)).is_break() {
                    return;
                }
                if page == u64::MAX {
                    break;
                }
                page += 1;
            }
        }
    }

    fn lock_high(&self) -> std::sync::MutexGuard<'_, HashMap<u64, u64>> {
        self.high.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `inc` to the count of every page of `ranges` (once per range
    /// touching it): one granule word for each 64 KiB granule a range covers
    /// whole, the page words otherwise.
    ///
    /// SeqCst: the caller registered the pin before; a checker that reads
    /// the raised count then finds the registration, and of two requests
    /// that raise different words of one page at least one sees the other
    /// (module documentation).
    pub(crate) fn add(&self, ranges: &[GuestRange], inc: u64) {
        self.runs(ranges, true, |run| {
            match run {
                Run::Direct(_, chunk, lo, hi) => {
                    chunk.touch(lo, hi);
                    chunk.add(lo, hi, inc);
                }
                Run::High(page) => *self.lock_high().entry(page).or_insert(0) += inc,
            }
            ControlFlow::Continue(())
        });
    }

    /// Subtracts `dec` from the count of every page of `ranges`, the exact
    /// inverse of [`PageCounts::add`] with the same ranges (the same words).
    pub(crate) fn sub(&self, ranges: &[GuestRange], dec: u64) {
        self.runs(ranges, false, |run| {
            match run {
                Run::Direct(_, chunk, lo, hi) => chunk.add(lo, hi, dec.wrapping_neg()),
                Run::High(page) => {
                    let mut high = self.lock_high();
                    if let Some(w) = high.get_mut(&page) {
                        debug_assert!(*w >= dec);
                        *w -= dec;
                        if *w == 0 {
                            high.remove(&page);
                        }
                    }
                }
            }
            ControlFlow::Continue(())
        });
    }

    /// Calls `f(page, count)` for every page of `ranges` whose count is not
    /// 0 (once per range touching it), stopping when `f` breaks. Never allocates.
    pub(crate) fn visit_pinned(
        &self,
        ranges: &[GuestRange],
        f: impl FnMut(u64, u64) -> ControlFlow<()>,
    ) {
        self.visit_where(ranges, |_| true, f)
    }

    /// [`PageCounts::visit_pinned`] for the pages whose count also passes
    /// `keep`, a cheap test run inline on every count (the caller's common
    /// case filtered out before `f`).
    pub(crate) fn visit_where(
        &self,
        ranges: &[GuestRange],
        keep: impl Fn(u64) -> bool,
        mut f: impl FnMut(u64, u64) -> ControlFlow<()>,
    ) {
        self.runs(ranges, false, |run| match run {
            Run::Direct(first, chunk, lo, hi) => {
                const G: usize = GRANULE_PAGES as usize;
                let mut granule = usize::MAX;
                let mut g = 0;
                for (i, p) in chunk.pages[lo..=hi].iter().enumerate() {
                    let at = lo + i;
                    if at / G != granule {
                        granule = at / G;
                        g = chunk.granules[granule].load(Ordering::SeqCst);
                    }
                    let v = p.load(Ordering::SeqCst).wrapping_add(g);
                    if v != 0 && keep(v) {
                        f(first + i as u64, v)?;
                    }
                }
                ControlFlow::Continue(())
            }
            Run::High(page) => {
                let v = self.lock_high().get(&page).copied().unwrap_or(0);
                if v != 0 && keep(v) {
                    f(page, v)
                } else {
                    ControlFlow::Continue(())
                }
            }
        });
    }

    /// The count of one guest page (0 if never pinned).
    pub(crate) fn word(&self, page: u64) -> u64 {
        if page < DIRECT_PAGES {
            let idx = (page >> CHUNK_PAGE_SHIFT) as usize;
            self.chunks[idx]
                .get()
                .map(|c| c.word((page & (CHUNK_PAGES - 1)) as usize))
                .unwrap_or(0)
        } else {
            self.lock_high().get(&page).copied().unwrap_or(0)
        }
    }

    /// Distinct guest pages pinned now (a count other than 0), counted over
    /// every allocated chunk: exact when no pin or unpin runs meanwhile, a
    /// snapshot otherwise. Reads the counters of every 64 KiB granule ever
    /// pinned (up to 2 MiB per GiB of guest-physical memory): for counters,
    /// not for the request path.
    pub(crate) fn pinned_pages(&self) -> u64 {
        let allocated = self
            .allocated
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let direct: u64 = allocated
            .into_iter()
            .filter_map(|idx| self.chunks[idx].get())
            .map(Chunk::pinned_pages)
            .sum();
        direct + self.lock_high().len() as u64
    }
}
