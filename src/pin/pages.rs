//! Per-guest-page pin counters: the tracker's counterpart of the kernel's
//! per-page pin count (`GUP_PIN_COUNTING_BIAS` in `page->_refcount`, read by
//! `folio_maybe_dma_pinned()`).
//!
//! One `AtomicU64` per guest page (GPA >> 12): low 32 bits = pins in direction
//! `DeviceWrite`, high 32 bits = pins in direction `DeviceRead`. Keeping both
//! directions in one word makes a pin and a concurrent check on the same page
//! totally ordered (one modification order), which the no-false-negative
//! argument in `tracker.rs` relies on.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::guest::GuestRange;

use super::{Direction, GUEST_PAGE_SHIFT};

/// Guest pages per chunk: 1 GiB of guest-physical memory (2^18 pages, 2 MiB of counters).
const CHUNK_PAGE_SHIFT: u32 = 30 - GUEST_PAGE_SHIFT;
const CHUNK_PAGES: u64 = 1 << CHUNK_PAGE_SHIFT;
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

/// One step of [`PageCounts::runs`].
enum Run<'a> {
    /// Consecutive guest pages starting at the given page, all in one chunk.
    Direct(u64, &'a [AtomicU64]),
    /// One guest page at or above 128 TiB (hash-map fallback).
    High(u64),
}

/// The per-page counter table.
pub(crate) struct PageCounts {
    /// Direct table, indexed by GPA >> 30; each chunk has one word per guest page.
    chunks: Box<[OnceLock<Box<[AtomicU64]>>]>,
    /// Guest pages at or above 128 TiB: page -> word (absent = 0). Correctness
    /// over speed: no guest we serve has RAM there in practice.
    high: Mutex<HashMap<u64, u64>>,
}

fn new_chunk() -> Box<[AtomicU64]> {
    (0..CHUNK_PAGES).map(|_| AtomicU64::new(0)).collect()
}

impl PageCounts {
    pub(crate) fn new() -> Self {
        PageCounts {
            chunks: (0..NUM_CHUNKS).map(|_| OnceLock::new()).collect(),
            high: Mutex::new(HashMap::new()),
        }
    }

    /// Calls `f` for every run of direct-table pages of `ranges` inside one
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
                    Some(self.chunks[idx].get_or_init(new_chunk))
                } else {
                    self.chunks[idx].get()
                };
                if let Some(chunk) = chunk {
                    let lo = (page & (CHUNK_PAGES - 1)) as usize;
                    let hi = (run_last & (CHUNK_PAGES - 1)) as usize;
                    if f(Run::Direct(page, &chunk[lo..=hi])).is_break() {
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

    /// Adds `inc` to the word of every page of `ranges` (once per range touching
    /// it). Returns how many pages went from no pin at all to pinned.
    ///
    /// AcqRel: the caller registered the pin before; a checker that reads the
    /// raised count (Acquire) then finds the registration.
    pub(crate) fn add(&self, ranges: &[GuestRange], inc: u64) -> u64 {
        let mut newly = 0;
        self.runs(ranges, true, |run| {
            match run {
                Run::Direct(_, words) => {
                    for w in words {
                        if w.fetch_add(inc, Ordering::AcqRel) == 0 {
                            newly += 1;
                        }
                    }
                }
                Run::High(page) => {
                    let mut high = self.lock_high();
                    let w = high.entry(page).or_insert(0);
                    if *w == 0 {
                        newly += 1;
                    }
                    *w += inc;
                }
            }
            ControlFlow::Continue(())
        });
        newly
    }

    /// Subtracts `dec` from the word of every page of `ranges`, the exact
    /// inverse of [`PageCounts::add`]. Returns how many pages became unpinned.
    pub(crate) fn sub(&self, ranges: &[GuestRange], dec: u64) -> u64 {
        let mut freed = 0;
        self.runs(ranges, false, |run| {
            match run {
                Run::Direct(_, words) => {
                    for w in words {
                        let prev = w.fetch_sub(dec, Ordering::AcqRel);
                        debug_assert!(prev >= dec && (prev & DW_MASK) >= (dec & DW_MASK));
                        if prev == dec {
                            freed += 1;
                        }
                    }
                }
                Run::High(page) => {
                    let mut high = self.lock_high();
                    if let Some(w) = high.get_mut(&page) {
                        debug_assert!(*w >= dec);
                        *w -= dec;
                        if *w == 0 {
                            high.remove(&page);
                            freed += 1;
                        }
                    }
                }
            }
            ControlFlow::Continue(())
        });
        freed
    }

    /// Calls `f(page, word)` for every page of `ranges` whose word is not 0
    /// (once per range touching it), stopping when `f` breaks. Never allocates.
    pub(crate) fn visit_pinned(
        &self,
        ranges: &[GuestRange],
        f: impl FnMut(u64, u64) -> ControlFlow<()>,
    ) {
        self.visit_where(ranges, |_| true, f)
    }

    /// [`PageCounts::visit_pinned`] for the pages whose word also passes
    /// `keep`, a cheap test run inline on every word (the caller's common
    /// case filtered out before `f`).
    pub(crate) fn visit_where(
        &self,
        ranges: &[GuestRange],
        keep: impl Fn(u64) -> bool,
        mut f: impl FnMut(u64, u64) -> ControlFlow<()>,
    ) {
        self.runs(ranges, false, |run| match run {
            Run::Direct(first, words) => {
                for (i, w) in words.iter().enumerate() {
                    let v = w.load(Ordering::Acquire);
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

    /// The word of one guest page (0 if never pinned).
    pub(crate) fn word(&self, page: u64) -> u64 {
        if page < DIRECT_PAGES {
            let idx = (page >> CHUNK_PAGE_SHIFT) as usize;
            self.chunks[idx]
                .get()
                .map(|c| c[(page & (CHUNK_PAGES - 1)) as usize].load(Ordering::Acquire))
                .unwrap_or(0)
        } else {
            self.lock_high().get(&page).copied().unwrap_or(0)
        }
    }
}
