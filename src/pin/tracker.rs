//! The pin tracker: per-page counters plus per-queue registries of in-flight pins.

use std::mem::ManuallyDrop;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::guest::GuestRange;

use super::pages::{self, PageCounts};
use super::{Direction, Rule, GUEST_PAGE_SHIFT, GUEST_PAGE_SIZE};

/// A callback that wakes a worker (typically writes its eventfd). Called, off
/// any tracker lock, when a pin that worker [watches](PinTracker::watch) is
/// released.
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// Keeps per-queue state on its own cache lines (no false sharing between workers).
#[repr(align(128))]
struct Padded<T>(T);

/// One registry entry: an in-flight pin, or a free slot kept for reuse.
struct Slot {
    /// Bumped when the slot is freed: a [`PinRef`] with an older value is released.
    gen: u64,
    live: bool,
    id: u64,
    dir: Direction,
    /// The pinned guest-physical ranges; the Vec is reused, so a pin allocates
    /// only when a slot first sees more ranges than before.
    ranges: Vec<GuestRange>,
    /// Guest pages counted for this pin (once per range touching a page).
    pages: u64,
    /// Pin time, [`coarse_now_ns`].
    start_ns: u64,
    /// Registered with [`PinTracker::pin_longterm`] (FOLL_LONGTERM).
    registered_longterm: bool,
    /// Already counted in the long-term counters.
    counted_longterm: bool,
    /// The request was handed to storage ([`PinTracker::mark_submitted`]).
    submitted: bool,
    /// Worker queues to wake on release (bit q, bit 63 = any queue >= 63).
    watchers: u64,
    /// A thread blocks in [`PinTracker::wait_unpinned`] on this pin.
    blocking_waiter: bool,
}

impl Slot {
    fn new() -> Self {
        Slot {
            gen: 0,
            live: false,
            id: 0,
            dir: Direction::DeviceWrite,
            ranges: Vec::new(),
            pages: 0,
            start_ns: 0,
            registered_longterm: false,
            counted_longterm: false,
            submitted: false,
            watchers: 0,
            blocking_waiter: false,
        }
    }
}

/// The in-flight pins of one virtqueue, plus that queue's counters.
#[derive(Default)]
struct Registry {
    slots: Vec<Slot>,
    free: Vec<u32>,
    live: u64,
    /// Guest pages pinned by this queue (`nr_foll_pin_acquired`).
    acquired: u64,
    /// Guest pages unpinned by this queue (`nr_foll_pin_released`).
    released: u64,
    /// Pins counted as long-term, and their guest pages.
    longterm_pins: u64,
    longterm_pages: u64,
}

/// Who holds a pin, for the stall policy: names one pin of one queue.
///
/// Cheap to copy and to test with [`PinTracker::is_released`]; stays valid
/// (and reports "released") after the pin is gone and its slot reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PinRef {
    /// Virtqueue index of the pinning request.
    pub queue: u16,
    /// Request id given to [`PinTracker::pin`].
    pub id: u64,
    slot: u32,
    gen: u64,
}

/// A live pin, returned by [`PinTracker::pin`] and consumed by
/// [`PinTracker::unpin`]: not `Clone`, so a pin cannot be released twice.
///
/// Dropping a handle without `unpin` is a bug (the kernel's leaked
/// `pin_user_pages()`): the guest pages stay pinned (no false negatives: the
/// buffer may still be under DMA, e.g. owned by io_uring on an error path),
/// the pin turns long-term with age, and the drop logs an error; in debug
/// builds it also panics (unless already panicking). Use
/// [`PinHandle::forget`] to abandon a pin on purpose. Auto-unpin on drop was
/// rejected: it would need an `Arc<PinTracker>` per request (shared refcount
/// traffic) and would release pages whose DMA may still be running.
#[must_use = "a pin must be released with PinTracker::unpin"]
#[derive(Debug)]
pub struct PinHandle {
    queue: u16,
    id: u64,
    dir: Direction,
    slot: u32,
    gen: u64,
    pages: u64,
}

impl PinHandle {
    /// Virtqueue index the pin is registered on.
    pub fn queue(&self) -> u16 {
        self.queue
    }

    /// Request id given at pin time.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// DMA direction of the pin.
    pub fn direction(&self) -> Direction {
        self.dir
    }

    /// Guest pages (4 KiB) this pin counts, once per range touching a page.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// A copyable name of this pin, for [`PinTracker::is_released`] and
    /// [`PinTracker::watch`].
    pub fn pin_ref(&self) -> PinRef {
        PinRef {
            queue: self.queue,
            id: self.id,
            slot: self.slot,
            gen: self.gen,
        }
    }

    /// Abandons the pin on purpose: its guest pages stay pinned for the life of
    /// the tracker (a deliberate leak, e.g. at teardown while DMA may still run).
    pub fn forget(self) {
        let _ = ManuallyDrop::new(self);
    }
}

impl Drop for PinHandle {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        log::error!(
            "pin of request {} on queue {} ({}, {} guest pages) dropped without unpin: pages stay pinned",
            self.id,
            self.queue,
            self.dir.name(),
            self.pages
        );
        if cfg!(debug_assertions) {
            panic!(
                "PinHandle of request {} on queue {} dropped without PinTracker::unpin",
                self.id, self.queue
            );
        }
    }
}

/// Pin counts of one guest page, by direction (the kernel's per-page pin count).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PagePins {
    /// Pins by in-flight READ requests (the device writes this page).
    pub device_write: u32,
    /// Pins by in-flight WRITE requests (the device reads this page).
    pub device_read: u32,
}

/// One in-flight pin overlapping a queried range: the "by whom" answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PinnedBy {
    /// Virtqueue index of the pinning request.
    pub queue: u16,
    /// Request id of the pinning request.
    pub id: u64,
    /// DMA direction of the pin.
    pub direction: Direction,
    /// Time since the pin was taken, at the resolution of the kernel tick
    /// (1-4 ms, `CLOCK_MONOTONIC_COARSE`). Serialized as `age_us`, microseconds.
    #[serde(rename = "age_us", serialize_with = "ser_micros")]
    pub age: Duration,
    /// Long-term at query time: older than `longterm_after`, or registered
    /// with [`PinTracker::pin_longterm`] (FOLL_LONGTERM).
    pub long_term: bool,
    /// Registered with [`PinTracker::pin_longterm`] (FOLL_LONGTERM).
    pub registered_long_term: bool,
    /// The pinning request was handed to storage ([`PinTracker::mark_submitted`]);
    /// the stall policy waits only on submitted pins.
    pub submitted: bool,
    /// The byte ranges themselves intersect (not only share guest pages).
    pub byte_overlap: bool,
    /// Guest-physical ranges of the *queried* buffer that lie on guest pages
    /// this pin holds (the queried ranges intersected with the pin's ranges
    /// rounded out to 4 KiB pages), sorted and merged. Serialized as a list of
    /// `{"addr": GPA, "len": bytes}`.
    #[serde(serialize_with = "ser_ranges")]
    pub overlap: Vec<GuestRange>,
    /// Name of the pin for [`PinTracker::is_released`] / [`PinTracker::watch`].
    #[serde(skip)]
    pub pin: PinRef,
}

/// A detected conflict: an in-flight pin a new request must not ignore.
///
/// Serialized flat: `{"rule": "R1", "queue": .., "id": .., "direction": ..,
/// "age_us": .., "long_term": .., ..., "overlap": [..]}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PinConflict {
    /// Which rule of docs/DESIGN.md §3 fired (R1, R2 or long_term).
    pub rule: Rule,
    /// The conflicting pin.
    #[serde(flatten)]
    pub by: PinnedBy,
}

/// Tracker counters, in guest pages (4 KiB), except `longterm_pins` and
/// `inflight_pins` (pins, one per request).
///
/// Kernel counterparts: `nr_foll_pin_acquired` / `nr_foll_pin_released` in
/// /proc/vmstat.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PinCounters {
    /// Guest pages pinned since start (a page counted once per range touching it).
    pub pins_acquired: u64,
    /// Guest pages unpinned since start; equals `pins_acquired` when idle
    /// unless long-term (or leaked) pins remain.
    pub pins_released: u64,
    /// Distinct guest pages pinned now (at least one pin of either
    /// direction), counted when the counters are read.
    pub pinned_pages: u64,
    /// Highest number of page pins held at once: `pins_acquired -
    /// pins_released` at its highest, a page counted once per pin (and
    /// range) holding it, as the kernel's vmstat pair counts. Never below
    /// `pinned_pages`.
    pub peak_page_pins: u64,
    /// Pins (requests) that were registered long-term or observed older than
    /// `longterm_after` (at query time or at unpin), each counted once.
    pub longterm_pins: u64,
    /// Guest pages of those long-term pins.
    pub longterm_pages: u64,
    /// Pins (requests) in flight now.
    pub inflight_pins: u64,
}

/// The pin tracker, shared by all queues of a device as `Arc<PinTracker>`.
///
/// Kernel counterpart: the FOLL_PIN machinery of mm/gup.c
/// (`pin_user_pages()` / `unpin_user_page()` / `folio_maybe_dma_pinned()`),
/// with FOLL_LONGTERM for [`PinTracker::pin_longterm`].
///
/// # Cost
///
/// No global lock. A pin takes the queue's own registry mutex once
/// (uncontended without conflicts), then one atomic add per 64 KiB granule
/// it covers whole and per guest page of the granules it covers in part
/// (`pages.rs`); an unpin the same mutex and the same subtractions; a check
/// two atomic loads per page, and scans the registries (locking every queue's mutex) only if
/// some page is pinned by another request in a relevant direction. One shared
/// atomic (the page pins held, for `peak_page_pins`) is updated per pin and
/// per unpin.
///
/// # Long-term pins
///
/// A pin is long-term if registered with [`PinTracker::pin_longterm`] or older
/// than `longterm_after`; age is computed at query time (and at unpin, for the
/// counters). A WRITE touching a long-term pin of either direction is a
/// [`Rule::LongTerm`] conflict; such a pin on the R1 side is reported as
/// `LongTerm` rather than `R1`, which tells the stall policy not to wait on it.
///
/// # Stall support (non-blocking)
///
/// A conflict carries a [`PinRef`]. A worker that parks a stalled request
/// calls [`PinTracker::watch`] with its own queue index; when a watched pin is
/// released, the unpinning thread bumps [`PinTracker::release_generation`] and
/// calls the watcher queue's [`Waker`] (set with [`PinTracker::set_waker`], e.g.
/// a write to the worker's eventfd). The worker then re-tests its parked
/// requests with [`PinTracker::is_released`] (one uncontended mutex, O(1)).
/// Unwatched releases cost nothing extra. [`PinTracker::wait_unpinned`] is a
/// blocking variant for threads that may block (tests, tools).
pub struct PinTracker {
    pages: PageCounts,
    queues: Box<[Padded<Mutex<Registry>>]>,
    wakers: Box<[Mutex<Option<Waker>>]>,
    longterm_after: Duration,
    /// Page pins held now (acquired - released, over all queues).
    held: Padded<AtomicU64>,
    peak_page_pins: Padded<AtomicU64>,
    release_generation: Padded<AtomicU64>,
    blocking: Mutex<()>,
    blocking_cv: Condvar,
}

/// Monotonic time in ns from `CLOCK_MONOTONIC_COARSE`: a vDSO read of the
/// kernel's tick-resolution clock (1-4 ms), about 5-10 ns where
/// `Instant::now()` costs 20-60 ns. Pin ages need milliseconds, and this is
/// read twice per request.
fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC_COARSE
    // exists on every Linux since 2.6.32, and the call cannot fail then.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn ser_micros<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

fn ser_ranges<S: serde::Serializer>(r: &[GuestRange], s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Out {
        addr: u64,
        len: u32,
    }
    s.collect_seq(r.iter().map(|r| Out {
        addr: r.addr,
        len: r.len,
    }))
}

/// Parts of `mine` on guest pages touched by `theirs`, merged, and whether
/// the bytes themselves intersect. `None` if they share no guest page.
fn overlap(mine: &[GuestRange], theirs: &[GuestRange]) -> Option<(Vec<GuestRange>, bool)> {
    const PAGE: u128 = GUEST_PAGE_SIZE as u128;
    let mut spans: Vec<(u128, u128)> = Vec::new();
    let mut bytes = false;
    for a in mine.iter().filter(|r| r.len > 0) {
        let (a0, a1) = (u128::from(a.addr), u128::from(a.addr) + u128::from(a.len));
        for b in theirs.iter().filter(|r| r.len > 0) {
            let (b0, b1) = (u128::from(b.addr), u128::from(b.addr) + u128::from(b.len));
            let (p0, p1) = (b0 & !(PAGE - 1), (b1 + PAGE - 1) & !(PAGE - 1));
            let (lo, hi) = (a0.max(p0), a1.min(p1));
            if lo < hi {
                spans.push((lo, hi));
                bytes |= a0.max(b0) < a1.min(b1);
            }
        }
    }
    if spans.is_empty() {
        return None;
    }
    spans.sort_unstable();
    let mut merged: Vec<(u128, u128)> = Vec::with_capacity(spans.len());
    for (lo, hi) in spans {
        match merged.last_mut() {
            Some(last) if lo <= last.1 && hi.max(last.1) - last.0 <= u128::from(u32::MAX) => {
                last.1 = last.1.max(hi);
            }
            _ => merged.push((lo, hi)),
        }
    }
    let out = merged
        .into_iter()
        .map(|(lo, hi)| GuestRange {
            addr: lo as u64,
            len: (hi - lo) as u32,
        })
        .collect();
    Some((out, bytes))
}

impl PinTracker {
    /// A tracker for `num_queues` virtqueues (queue indices `0..num_queues`);
    /// pins older than `longterm_after` count as long-term (`Duration::MAX`
    /// disables age promotion). Allocates no page counters yet (1 GiB chunks of
    /// 2 MiB are allocated on first pin of a page in them).
    ///
    /// Panics if `num_queues` is 0.
    pub fn new(num_queues: u16, longterm_after: Duration) -> Self {
        assert!(num_queues > 0, "PinTracker needs at least one queue");
        PinTracker {
            pages: PageCounts::new(),
            queues: (0..num_queues)
                .map(|_| Padded(Mutex::new(Registry::default())))
                .collect(),
            wakers: (0..num_queues).map(|_| Mutex::new(None)).collect(),
            longterm_after,
            held: Padded(AtomicU64::new(0)),
            peak_page_pins: Padded(AtomicU64::new(0)),
            release_generation: Padded(AtomicU64::new(0)),
            blocking: Mutex::new(()),
            blocking_cv: Condvar::new(),
        }
    }

    /// Number of queue slots this tracker has registries for (one per
    /// virtqueue per connection lane: the device's queues ×
    /// `MAX_CONNECTIONS`, docs/DESIGN.md §13).
    pub fn num_queues(&self) -> u16 {
        self.queues.len() as u16
    }

    /// Age after which a pin counts as long-term.
    pub fn longterm_after(&self) -> Duration {
        self.longterm_after
    }

    /// Is a pin taken at `start_ns` older than `longterm_after` at `now_ns`?
    fn is_old(&self, now_ns: u64, start_ns: u64) -> bool {
        Duration::from_nanos(now_ns.saturating_sub(start_ns)) >= self.longterm_after
    }

    fn registry(&self, queue: u16) -> MutexGuard<'_, Registry> {
        lock(&self.queues[usize::from(queue)].0)
    }

    /// Pins every guest page (4 KiB, GPA >> 12) touched by `ranges`
    /// (guest-physical addresses, lengths in bytes) for request `id` of
    /// virtqueue `queue`, in direction `dir`. Counterpart of
    /// `pin_user_pages()` (FOLL_PIN; FOLL_WRITE for [`Direction::DeviceWrite`]).
    ///
    /// `id` needs to be unique only within the queue. Cost: O(pages) atomic
    /// adds plus one uncontended mutex; allocates only when a registry slot
    /// grows. Panics if `queue >= num_queues`.
    pub fn pin(&self, queue: u16, id: u64, dir: Direction, ranges: &[GuestRange]) -> PinHandle {
        self.pin_inner(queue, id, dir, ranges, false)
    }

    /// Like [`PinTracker::pin`], registered as long-term from the start:
    /// counterpart of FOLL_LONGTERM (RDMA, io_uring fixed buffers). Every WRITE
    /// touching these pages conflicts ([`Rule::LongTerm`]) until
    /// [`PinTracker::unpin`].
    pub fn pin_longterm(
        &self,
        queue: u16,
        id: u64,
        dir: Direction,
        ranges: &[GuestRange],
    ) -> PinHandle {
        self.pin_inner(queue, id, dir, ranges, true)
    }

    fn pin_inner(
        &self,
        queue: u16,
        id: u64,
        dir: Direction,
        ranges: &[GuestRange],
        registered_longterm: bool,
    ) -> PinHandle {
        let now = coarse_now_ns();
        let pages = pages::page_touches(ranges);
        // Register first, raise the page counts second: whoever sees a raised
        // count (Acquire) and then scans this registry finds the entry.
        let (slot, gen) = {
            let mut reg = self.registry(queue);
            let idx = match reg.free.pop() {
                Some(i) => i,
                None => {
                    reg.slots.push(Slot::new());
                    (reg.slots.len() - 1) as u32
                }
            };
            let s = &mut reg.slots[idx as usize];
            s.live = true;
            s.id = id;
            s.dir = dir;
            s.ranges.clear();
            s.ranges.extend_from_slice(ranges);
            s.pages = pages;
            s.start_ns = now;
            s.registered_longterm = registered_longterm;
            s.counted_longterm = registered_longterm;
            s.submitted = false;
            s.watchers = 0;
            s.blocking_waiter = false;
            let gen = s.gen;
            reg.live += 1;
            reg.acquired += pages;
            if registered_longterm {
                reg.longterm_pins += 1;
                reg.longterm_pages += pages;
            }
            (idx, gen)
        };
        self.pages.add(ranges, pages::one(dir));
        if pages > 0 {
            let cur = self.held.0.fetch_add(pages, Ordering::Relaxed) + pages;
            if self.peak_page_pins.0.load(Ordering::Relaxed) < cur {
                self.peak_page_pins.0.fetch_max(cur, Ordering::Relaxed);
            }
        }
        PinHandle {
            queue,
            id,
            dir,
            slot,
            gen,
            pages,
        }
    }

    /// Releases a pin: decrements the counters of its guest pages and removes
    /// it from its queue's registry. Counterpart of `unpin_user_page()`.
    /// Consumes the handle (no double unpin). Wakes the watchers of this pin,
    /// if any (see [`PinTracker::watch`]).
    pub fn unpin(&self, handle: PinHandle) {
        let h = ManuallyDrop::new(handle);
        let now = coarse_now_ns();
        let (pages, watchers, blocking) = {
            let mut reg = self.registry(h.queue);
            let reg = &mut *reg;
            let Some(s) = reg.slots.get_mut(h.slot as usize) else {
                debug_assert!(false, "unpin of unknown slot");
                return;
            };
            if !s.live || s.gen != h.gen {
                debug_assert!(false, "unpin of a released pin");
                return;
            }
            // Lower the counts while the entry is still registered.
            self.pages.sub(&s.ranges, pages::one(s.dir));
            if !s.counted_longterm && self.is_old(now, s.start_ns) {
                reg.longterm_pins += 1;
                reg.longterm_pages += s.pages;
            }
            s.live = false;
            s.gen += 1;
            let watchers = std::mem::take(&mut s.watchers);
            let blocking = std::mem::take(&mut s.blocking_waiter);
            reg.released += s.pages;
            reg.live -= 1;
            reg.free.push(h.slot);
            (s.pages, watchers, blocking)
        };
        if pages > 0 {
            self.held.0.fetch_sub(pages, Ordering::Relaxed);
        }
        if watchers != 0 || blocking {
            self.release_generation.0.fetch_add(1, Ordering::AcqRel);
            self.wake(watchers);
            if blocking {
                let _g = lock(&self.blocking);
                self.blocking_cv.notify_all();
            }
        }
    }

    /// Marks the pin's request as handed to storage. The stall policy waits
    /// only on submitted pins ([`PinnedBy::submitted`]); a request never waits
    /// after it is submitted, so waits cannot form a cycle. One uncontended mutex.
    pub fn mark_submitted(&self, handle: &PinHandle) {
        let mut reg = self.registry(handle.queue);
        if let Some(s) = reg.slots.get_mut(handle.slot as usize) {
            if s.live && s.gen == handle.gen {
                s.submitted = true;
            }
        }
    }

    /// Pin counts of the guest page containing guest-physical address `gpa`.
    pub fn page_pins(&self, gpa: u64) -> PagePins {
        let (w, r) = pages::split(self.pages.word(gpa >> GUEST_PAGE_SHIFT));
        PagePins {
            device_write: w as u32,
            device_read: r as u32,
        }
    }

    /// Is any guest page of `ranges` (GPA, bytes) pinned, in direction `dir`
    /// (or either direction if `None`)? Counterpart of
    /// `folio_maybe_dma_pinned()`: `false` means certainly not pinned (no false
    /// negatives); `true` means some pin, possibly the caller's own, holds one
    /// of those pages (pages count whole: disjoint sub-page ranges in one page
    /// share its count, a false positive at byte level).
    /// O(pages) atomic loads, no lock, no allocation (below 128 TiB).
    pub fn maybe_pinned(&self, ranges: &[GuestRange], dir: Option<Direction>) -> bool {
        self.any_pinned_page(ranges, |_, word| {
            let (w, r) = pages::split(word);
            pinned_in(w, r, dir)
        })
    }

    /// Whether `pinned(page, counter word)` holds for any pinned page of
    /// `ranges` (GPA, bytes); stops at the first. Lock-free, no allocation.
    fn any_pinned_page(
        &self,
        ranges: &[GuestRange],
        mut pinned: impl FnMut(u64, u64) -> bool,
    ) -> bool {
        let mut found = false;
        self.pages.visit_pinned(ranges, |page, word| {
            found = pinned(page, word);
            if found {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        found
    }

    /// The in-flight pins sharing a guest page with `ranges` (GPA, bytes), in
    /// direction `dir` (or either if `None`), except the pin of request
    /// `exclude = (queue, id)`: "by whom" for a range. Checks the page counters
    /// first and scans the registries only if some page is pinned.
    pub fn pinned_by(
        &self,
        ranges: &[GuestRange],
        dir: Option<Direction>,
        exclude: Option<(u16, u64)>,
    ) -> Vec<PinnedBy> {
        if !self.maybe_pinned(ranges, dir) {
            return Vec::new();
        }
        self.scan(None, exclude, ranges, |d, _| {
            (dir.is_none() || dir == Some(d)).then_some(())
        })
        .into_iter()
        .map(|((), by)| by)
        .collect()
    }

    /// Detection for a new request already pinned as `me` with `ranges` (the
    /// same ranges given to [`PinTracker::pin`]): [`PinTracker::check_write`]
    /// for a [`Direction::DeviceRead`] pin (WRITE request),
    /// [`PinTracker::check_read`] for a [`Direction::DeviceWrite`] pin (READ).
    pub fn check(&self, me: &PinHandle, ranges: &[GuestRange]) -> Vec<PinConflict> {
        match me.dir {
            Direction::DeviceRead => self.check_write(me, ranges),
            Direction::DeviceWrite => self.check_read(me, ranges),
        }
    }

    /// Conflicts of a new WRITE request (pinned as `me`, source `ranges`):
    /// [`Rule::R1`] for every in-flight READ (DeviceWrite pin) sharing a guest
    /// page, [`Rule::LongTerm`] for every long-term pin of either direction
    /// sharing a guest page. WRITE/WRITE is not a conflict. `me` itself is
    /// never reported. Empty (no allocation) when no other request pins these
    /// pages; the registries are scanned only otherwise.
    pub fn check_write(&self, me: &PinHandle, ranges: &[GuestRange]) -> Vec<PinConflict> {
        self.debug_check_own(me, ranges);
        // Any other pin of either direction: R1 needs DeviceWrite pins, the
        // long-term rule any long-term pin (known only by age, in the registry).
        if !self.others(me, ranges, None) {
            return Vec::new();
        }
        self.conflicts_of(me, ranges, |dir, long_term| match (dir, long_term) {
            (_, true) => Some(Rule::LongTerm),
            (Direction::DeviceWrite, false) => Some(Rule::R1),
            (Direction::DeviceRead, false) => None,
        })
    }

    /// Conflicts of a new READ request (pinned as `me`, destination `ranges`):
    /// [`Rule::R2`] for every in-flight WRITE (DeviceRead pin) sharing a guest
    /// page (its `long_term` flag tells whether that pin is long-term).
    /// READ/READ is not a conflict; `me` is never reported. Empty (no
    /// allocation) when no other WRITE pins these pages.
    pub fn check_read(&self, me: &PinHandle, ranges: &[GuestRange]) -> Vec<PinConflict> {
        self.debug_check_own(me, ranges);
        if !self.others(me, ranges, Some(Direction::DeviceRead)) {
            return Vec::new();
        }
        self.conflicts_of(me, ranges, |dir, _| {
            (dir == Direction::DeviceRead).then_some(Rule::R2)
        })
    }

    fn conflicts_of(
        &self,
        me: &PinHandle,
        ranges: &[GuestRange],
        rule: impl FnMut(Direction, bool) -> Option<Rule>,
    ) -> Vec<PinConflict> {
        self.scan(Some((me.queue, me.slot)), None, ranges, rule)
            .into_iter()
            .map(|(rule, by)| PinConflict { rule, by })
            .collect()
    }

    /// In debug builds: `ranges` must be exactly what `me` pinned (the fast
    /// path subtracts `me`'s own counts from the page words).
    fn debug_check_own(&self, me: &PinHandle, ranges: &[GuestRange]) {
        if cfg!(debug_assertions) {
            let reg = self.registry(me.queue);
            let s = &reg.slots[me.slot as usize];
            assert!(s.live && s.gen == me.gen, "check with a released pin");
            assert_eq!(s.ranges, ranges, "check ranges differ from pinned ranges");
        }
    }

    /// Fast path: is any page of `ranges` pinned by another pin than `me`'s,
    /// in direction `dir` (or either if `None`)? Page counts minus `me`'s own
    /// contribution; stops at the first such page. Lock-free, no allocation.
    fn others(&self, me: &PinHandle, ranges: &[GuestRange], dir: Option<Direction>) -> bool {
        // The common page: `me`'s one pin alone, or no pin in direction `dir`.
        let mine = pages::one(me.dir);
        let asked = match dir {
            None => u64::MAX,
            Some(Direction::DeviceWrite) => pages::DW_MASK,
            Some(Direction::DeviceRead) => !pages::DW_MASK,
        };
        let mut found = false;
        let keep = |word: u64| word != mine && word & asked != 0;
        self.pages.visit_where(ranges, keep, |page, word| {
            let (mut w, mut r) = pages::split(word);
            let own = match me.dir {
                Direction::DeviceWrite => &mut w,
                Direction::DeviceRead => &mut r,
            };
            // `me` pinned this page at least once; a count of 1 is only `me`.
            *own = if *own <= 1 {
                0
            } else {
                own.saturating_sub(pages::touches_of(ranges, page))
            };
            found = pinned_in(w, r, dir);
            if found {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        found
    }

    /// Slow path: every live pin of every queue that shares a guest page with
    /// `ranges`, except slot `me` = (queue, slot) and request `exclude` =
    /// (queue, id), for which `pick(direction, long_term)` returns `Some`.
    /// Long-term pins seen here are counted.
    fn scan<T>(
        &self,
        me: Option<(u16, u32)>,
        exclude: Option<(u16, u64)>,
        ranges: &[GuestRange],
        mut pick: impl FnMut(Direction, bool) -> Option<T>,
    ) -> Vec<(T, PinnedBy)> {
        let now = coarse_now_ns();
        let mut out = Vec::new();
        for (q, cell) in self.queues.iter().enumerate() {
            let q = q as u16;
            let mut reg = lock(&cell.0);
            let reg = &mut *reg;
            for (i, s) in reg.slots.iter_mut().enumerate() {
                if !s.live || me == Some((q, i as u32)) || exclude == Some((q, s.id)) {
                    continue;
                }
                let age = Duration::from_nanos(now.saturating_sub(s.start_ns));
                let long_term = s.registered_longterm || age >= self.longterm_after;
                if long_term && !s.counted_longterm {
                    s.counted_longterm = true;
                    reg.longterm_pins += 1;
                    reg.longterm_pages += s.pages;
                }
                let Some(t) = pick(s.dir, long_term) else {
                    continue;
                };
                let Some((overlap, byte_overlap)) = overlap(ranges, &s.ranges) else {
                    continue;
                };
                out.push((
                    t,
                    PinnedBy {
                        queue: q,
                        id: s.id,
                        direction: s.dir,
                        age,
                        long_term,
                        registered_long_term: s.registered_longterm,
                        submitted: s.submitted,
                        byte_overlap,
                        overlap,
                        pin: PinRef {
                            queue: q,
                            id: s.id,
                            slot: i as u32,
                            gen: s.gen,
                        },
                    },
                ));
            }
        }
        out
    }

    /// Has the pin named by `pin` been released? O(1): one mutex (the pin's
    /// queue registry), uncontended unless that queue is pinning right now.
    pub fn is_released(&self, pin: &PinRef) -> bool {
        let reg = self.registry(pin.queue);
        reg.slots
            .get(pin.slot as usize)
            .is_none_or(|s| !s.live || s.gen != pin.gen)
    }

    /// Asks to be woken when `pin` is released: the releasing thread bumps
    /// [`PinTracker::release_generation`] and calls the [`Waker`] of queue
    /// `waiter_queue`. Returns `false` if the pin is already released (then
    /// nothing will be called: retry the parked request now). Non-blocking.
    pub fn watch(&self, pin: &PinRef, waiter_queue: u16) -> bool {
        let mut reg = self.registry(pin.queue);
        match reg.slots.get_mut(pin.slot as usize) {
            Some(s) if s.live && s.gen == pin.gen => {
                s.watchers |= 1u64 << waiter_queue.min(63);
                true
            }
            _ => false,
        }
    }

    /// Sets (or clears) the [`Waker`] called when a pin watched by queue
    /// `queue` is released. Called from the releasing thread, off tracker locks.
    pub fn set_waker(&self, queue: u16, waker: Option<Waker>) {
        *lock(&self.wakers[usize::from(queue)]) = waker;
    }

    /// Number of watched pins released so far. A worker can skip re-testing
    /// its parked requests while this has not changed.
    pub fn release_generation(&self) -> u64 {
        self.release_generation.0.load(Ordering::Acquire)
    }

    fn wake(&self, watchers: u64) {
        for (q, w) in self.wakers.iter().enumerate() {
            if watchers & (1u64 << q.min(63)) != 0 {
                let waker = lock(w).clone();
                if let Some(waker) = waker {
                    waker();
                }
            }
        }
    }

    /// Blocks the calling thread until every pin in `pins` is released or
    /// `timeout` passes; `true` if all were released. Not for worker threads
    /// (they use [`PinTracker::watch`]); meant for tests and tools.
    pub fn wait_unpinned(&self, pins: &[PinRef], timeout: Duration) -> bool {
        let deadline = Instant::now().checked_add(timeout);
        for p in pins {
            let mut reg = self.registry(p.queue);
            if let Some(s) = reg.slots.get_mut(p.slot as usize) {
                if s.live && s.gen == p.gen {
                    s.blocking_waiter = true;
                }
            }
        }
        let mut guard = lock(&self.blocking);
        loop {
            if pins.iter().all(|p| self.is_released(p)) {
                return true;
            }
            let left = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => left,
                    _ => return false,
                },
                None => Duration::from_secs(3600),
            };
            guard = self
                .blocking_cv
                .wait_timeout(guard, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// A snapshot of the counters ([`PinCounters`]). Takes each queue's
    /// registry mutex briefly and reads every page counter ever allocated
    /// (`pinned_pages`: about 0.1 ms per GiB of guest memory pinned); not for
    /// the hot path.
    pub fn counters(&self) -> PinCounters {
        let mut c = PinCounters::default();
        for cell in self.queues.iter() {
            let reg = lock(&cell.0);
            c.pins_acquired += reg.acquired;
            c.pins_released += reg.released;
            c.longterm_pins += reg.longterm_pins;
            c.longterm_pages += reg.longterm_pages;
            c.inflight_pins += reg.live;
        }
        c.pinned_pages = self.pages.pinned_pages();
        c.peak_page_pins = self
            .peak_page_pins
            .0
            .load(Ordering::Relaxed)
            .max(c.pinned_pages);
        c
    }
}

/// Whether a page with `w` DeviceWrite and `r` DeviceRead pins is pinned in
/// direction `dir` (either direction when `None`).
fn pinned_in(w: u64, r: u64, dir: Option<Direction>) -> bool {
    match dir {
        None => w > 0 || r > 0,
        Some(Direction::DeviceWrite) => w > 0,
        Some(Direction::DeviceRead) => r > 0,
    }
}
