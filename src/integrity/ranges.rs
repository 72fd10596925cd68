//! LBA range locks across all queues of a device (docs/DESIGN.md §7), in
//! the manner of dm-integrity's `add_new_range` / `wait_and_add_new_range`
//! (drivers/md/dm-integrity.c).
//!
//! virtio-blk lets a driver keep overlapping requests in flight; the device
//! may complete them in any order, but the result must be one of the legal
//! orders. The image alone would give that; the checksum store would not: a
//! READ verified while an overlapping WRITE is landing sees new data against
//! the old checksum, and two overlapping WRITEs can leave the image holding
//! one's data and the store the other's checksum. So every READ, WRITE,
//! DISCARD and WRITE_ZEROES holds a lock on the 4 KiB checksum blocks it
//! touches from just before it goes to storage until its checksums are
//! recorded or verified: shared for a READ, exclusive for the others.
//!
//! Grant rule: a request is granted when no request that entered the table
//! *before* it (granted or still waiting) holds or wants an overlapping range
//! in a conflicting mode. So overlapping requests are served in arrival order
//! (a stream of READs cannot starve a WRITE), and a wait is always on an
//! earlier request: no wait cycle is possible. Holders are always requests
//! already handed to storage (the lock is the last step before submission),
//! so every wait ends when storage completes. The table is sharded by 1 MiB
//! stripes of the image ([`RangeLocks`]).
//!
//! This is separate from the pin rules R1/R2 (overlap of guest *buffers*):
//! this is overlap of *LBAs*, which is legal and never reported as an error.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Called when a range is released that a waiter of a queue overlaps: wakes
/// that queue's worker (it then retries its waiting requests).
pub type RangeWaker = Arc<dyn Fn() + Send + Sync>;

/// How a request uses its blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// READ: any number of shared holders at once.
    Shared,
    /// WRITE, DISCARD, WRITE_ZEROES: alone on its blocks.
    Exclusive,
}

/// A request's place in the range table, from [`RangeLocks::acquire`] until
/// [`RangeLocks::release`]. Not `Clone`: exactly one release per acquire.
#[derive(Debug)]
#[must_use = "a range ticket must be released"]
pub struct RangeTicket {
    /// The request's id (unique among live tickets).
    id: u64,
    /// The shards its blocks fall in (bit i: shard i).
    shards: u64,
}

#[derive(Debug)]
struct Entry {
    blocks: Range<u64>,
    /// The shards of the request (to count each request once).
    shards: u64,
    access: Access,
    granted: bool,
    queue: u16,
    id: u64,
}

impl Entry {
    fn overlaps(&self, blocks: &Range<u64>) -> bool {
        self.blocks.start < blocks.end && blocks.start < self.blocks.end
    }

    fn conflicts(&self, blocks: &Range<u64>, access: Access) -> bool {
        self.overlaps(blocks) && (self.access == Access::Exclusive || access == Access::Exclusive)
    }
}

/// Blocks of one stripe: block `b` is in shard `(b / STRIPE_BLOCKS) % SHARDS`.
const STRIPE_BLOCKS: u64 = 256;
/// Number of shards (one bit each in a ticket's mask).
const SHARDS: usize = 64;

/// The entries of one shard, in arrival order: a few at most in practice,
/// so a vector scanned linearly beats a tree and allocates nothing once
/// grown.
#[derive(Default)]
struct Shard {
    entries: Vec<Entry>,
}

impl Shard {
    /// Index of the entry of request `id`.
    fn find(&self, id: u64) -> Option<usize> {
        self.entries.iter().position(|e| e.id == id)
    }

    /// Whether no entry before the one at `i` conflicts with it.
    fn clear_before(&self, i: usize) -> bool {
        let me = &self.entries[i];
        !self.entries[..i]
            .iter()
            .any(|e| e.conflicts(&me.blocks, me.access))
    }
}

/// The shards `blocks` falls in, as a bit mask.
fn shard_mask(blocks: &Range<u64>) -> u64 {
    let (first, last) = (
        blocks.start / STRIPE_BLOCKS,
        (blocks.end - 1) / STRIPE_BLOCKS,
    );
    if last - first >= SHARDS as u64 - 1 {
        return u64::MAX;
    }
    (first..=last).fold(0, |m, stripe| m | 1 << (stripe % SHARDS as u64))
}

/// The shard indexes of a mask, ascending (the order shards are locked in).
fn shards_of(mask: u64) -> impl Iterator<Item = usize> {
    (0..SHARDS).filter(move |i| mask & (1 << i) != 0)
}

/// Counters of the range table (all queues).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RangeCounters {
    /// Requests that were not granted at once (waited on an overlapping one).
    pub waits: u64,
    /// Requests holding or waiting for a range now.
    pub entries: u64,
}

/// The range table of one device, sharded by 1 MiB stripes so that queues
/// working on different parts of the image share no lock and no counter. A
/// request is entered in every shard its blocks fall in (usually one) while
/// it holds all of them (locked in ascending order), so any two requests are
/// in the same order in every shard they share (the order in which they
/// entered), two requests that overlap always meet in a shard they share,
/// and "earlier" is one order across the table: waits cannot form a cycle.
pub struct RangeLocks {
    shards: Vec<Mutex<Shard>>,
    waits: AtomicU64,
    wakers: Mutex<Vec<Option<RangeWaker>>>,
}

impl RangeLocks {
    /// An empty table for a device with `num_queues` queues.
    pub fn new(num_queues: u16) -> RangeLocks {
        RangeLocks {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            waits: AtomicU64::new(0),
            wakers: Mutex::new(vec![None; usize::from(num_queues)]),
        }
    }

    fn lock_one(&self, i: usize) -> MutexGuard<'_, Shard> {
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` with the shards of `mask` locked (in ascending order). The
    /// common case, one shard, allocates nothing.
    fn with_shards<R>(&self, mask: u64, f: impl FnOnce(&mut [MutexGuard<'_, Shard>]) -> R) -> R {
        if mask.is_power_of_two() {
            let mut g = self.lock_one(mask.trailing_zeros() as usize);
            return f(std::slice::from_mut(&mut g));
        }
        let mut guards: Vec<_> = shards_of(mask).map(|i| self.lock_one(i)).collect();
        f(&mut guards)
    }

    /// Sets (or clears) the waker of `queue`, called when a range its waiting
    /// requests overlap is released.
    pub fn set_waker(&self, queue: u16, waker: Option<RangeWaker>) {
        let mut w = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = w.get_mut(usize::from(queue)) {
            *slot = waker;
        }
    }

    /// Enters request `id` (unique among the requests in the table) of
    /// `queue` for checksum blocks `blocks` (4 KiB units, end exclusive, not
    /// empty) in mode `access`. Returns its ticket
    /// and whether it is granted now; if not, retry with
    /// [`RangeLocks::try_grant`] when the queue's waker runs.
    pub fn acquire(
        &self,
        queue: u16,
        id: u64,
        blocks: Range<u64>,
        access: Access,
    ) -> (RangeTicket, bool) {
        let mask = shard_mask(&blocks);
        let granted = self.with_shards(mask, |guards| {
            let mut granted = true;
            for g in guards.iter_mut() {
                g.entries.push(Entry {
                    blocks: blocks.clone(),
                    shards: mask,
                    access,
                    granted: false,
                    queue,
                    id,
                });
                granted &= g.clear_before(g.entries.len() - 1);
            }
            if granted {
                for g in guards.iter_mut() {
                    g.entries.last_mut().expect("just pushed").granted = true;
                }
            }
            granted
        });
        if !granted {
            self.waits.fetch_add(1, Ordering::Relaxed);
        }
        (RangeTicket { id, shards: mask }, granted)
    }

    /// Grants a waiting ticket if no earlier overlapping request is left;
    /// `true` once granted (also if it was already).
    pub fn try_grant(&self, ticket: &RangeTicket) -> bool {
        self.with_shards(ticket.shards, |guards| {
            for g in guards.iter() {
                let Some(i) = g.find(ticket.id) else {
                    return false;
                };
                if g.entries[i].granted {
                    return true;
                }
                if !g.clear_before(i) {
                    return false;
                }
            }
            for g in guards.iter_mut() {
                if let Some(i) = g.find(ticket.id) {
                    g.entries[i].granted = true;
                }
            }
            true
        })
    }

    /// Releases a ticket (granted or not) and wakes every queue with a
    /// waiting request that overlapped it.
    pub fn release(&self, ticket: RangeTicket) {
        let mut wake: Vec<u16> = Vec::new();
        self.with_shards(ticket.shards, |guards| {
            for g in guards.iter_mut() {
                let Some(i) = g.find(ticket.id) else {
                    continue;
                };
                let gone = g.entries.remove(i);
                for e in &g.entries[i..] {
                    if !e.granted && e.overlaps(&gone.blocks) && !wake.contains(&e.queue) {
                        wake.push(e.queue);
                    }
                }
            }
        });
        if wake.is_empty() {
            return;
        }
        let wakers = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
        for q in wake {
            if let Some(Some(w)) = wakers.get(usize::from(q)) {
                w();
            }
        }
    }

    /// Ids of the requests that hold or wait for a range overlapping
    /// `blocks` (not empty), except `id` (for reports: who else is on these
    /// LBAs).
    pub fn overlapping(&self, blocks: &Range<u64>, id: u64) -> Vec<u64> {
        let mut ids: Vec<u64> = self.with_shards(shard_mask(blocks), |guards| {
            guards
                .iter()
                .flat_map(|g| g.entries.iter())
                .filter(|e| e.id != id && e.overlaps(blocks))
                .map(|e| e.id)
                .collect()
        });
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Counters now.
    pub fn counters(&self) -> RangeCounters {
        RangeCounters {
            waits: self.waits.load(Ordering::Relaxed),
            // Each request counted in the lowest of its shards.
            entries: (0..SHARDS)
                .map(|i| {
                    self.lock_one(i)
                        .entries
                        .iter()
                        .filter(|e| e.shards.trailing_zeros() as usize == i)
                        .count() as u64
                })
                .sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn shared_ranges_coexist_exclusive_ones_wait_in_order() {
        let l = RangeLocks::new(2);
        let (r1, g1) = l.acquire(0, 1, 0..2, Access::Shared);
        let (r2, g2) = l.acquire(1, 2, 1..3, Access::Shared);
        assert!(g1 && g2, "two READs share blocks");
        let (w3, g3) = l.acquire(0, 3, 1..2, Access::Exclusive);
        assert!(!g3, "a WRITE waits for the READs");
        // A READ arriving after the waiting WRITE waits behind it (no starvation).
        let (r4, g4) = l.acquire(1, 4, 1..2, Access::Shared);
        assert!(!g4);
        // Elsewhere: no wait.
        let (w5, g5) = l.acquire(1, 5, 10..11, Access::Exclusive);
        assert!(g5);
        l.release(r1);
        assert!(!l.try_grant(&w3), "still one READ");
        l.release(r2);
        assert!(l.try_grant(&w3));
        assert!(!l.try_grant(&r4), "behind the WRITE");
        l.release(w3);
        assert!(l.try_grant(&r4));
        l.release(r4);
        l.release(w5);
        assert_eq!(
            l.counters(),
            RangeCounters {
                waits: 2,
                entries: 0
            }
        );
    }

    #[test]
    fn release_wakes_the_queues_of_overlapping_waiters_only() {
        let l = RangeLocks::new(3);
        let woken: Arc<[AtomicU32; 3]> = Arc::new(Default::default());
        for q in 0..3u16 {
            let w = woken.clone();
            l.set_waker(
                q,
                Some(Arc::new(move || {
                    w[usize::from(q)].fetch_add(1, Ordering::Relaxed);
                })),
            );
        }
        let (a, _) = l.acquire(0, 1, 0..4, Access::Exclusive);
        let (b, gb) = l.acquire(1, 2, 3..5, Access::Shared);
        let (c, gc) = l.acquire(2, 3, 8..9, Access::Exclusive);
        assert!(!gb && gc);
        assert_eq!(l.overlapping(&(0..4), 1), vec![2]);
        l.release(a);
        let n: Vec<u32> = woken.iter().map(|w| w.load(Ordering::Relaxed)).collect();
        assert_eq!(n, vec![0, 1, 0]);
        assert!(l.try_grant(&b));
        l.release(b);
        l.release(c);
    }

    #[test]
    fn requests_meet_in_the_shards_they_share() {
        let l = RangeLocks::new(2);
        // Spans stripes 0 and 1 (shards 0 and 1).
        let (a, ga) = l.acquire(0, 1, 250..260, Access::Exclusive);
        // Stripe 1 only: overlaps `a` there.
        let (b, gb) = l.acquire(1, 2, 258..259, Access::Shared);
        // Stripe 64 = shard 0 again, but other blocks: no wait.
        let (c, gc) = l.acquire(1, 3, 64 * 256..64 * 256 + 1, Access::Exclusive);
        // Everything: all shards; behind `a` (and `b`, `c`).
        let (d, gd) = l.acquire(0, 4, 0..1 << 20, Access::Shared);
        assert_eq!((ga, gb, gc, gd), (true, false, true, false));
        assert_eq!(l.overlapping(&(255..256), 0), vec![1, 4]);
        l.release(a);
        assert!(l.try_grant(&b));
        assert!(!l.try_grant(&d), "still behind the exclusive `c`");
        l.release(c);
        assert!(l.try_grant(&d), "shared with `b`");
        l.release(b);
        l.release(d);
        assert_eq!(
            l.counters(),
            RangeCounters {
                waits: 2,
                entries: 0
            }
        );
    }

    #[test]
    fn waits_only_on_earlier_tickets() {
        // Random acquire/release sequences: every wait is on a lower ticket,
        // and releasing everything granted in order lets everyone through.
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..200 {
            let l = RangeLocks::new(1);
            let mut held: Vec<(RangeTicket, bool)> = Vec::new();
            for id in 0..12 {
                // Around a stripe boundary, so that requests span shards.
                let s = 250 + rng.u64(0..12);
                let e = s + rng.u64(1..8);
                let acc = if rng.bool() {
                    Access::Shared
                } else {
                    Access::Exclusive
                };
                held.push(l.acquire(0, id, s..e, acc));
            }
            // The first ticket is always granted.
            assert!(held[0].1);
            // Release in ticket order, retrying the rest: all get granted.
            while !held.is_empty() {
                let (t, _) = held.remove(0);
                assert!(l.try_grant(&t), "the oldest ticket is always grantable");
                l.release(t);
                for (t, g) in held.iter_mut() {
                    *g = l.try_grant(t);
                }
            }
            assert_eq!(l.counters().entries, 0);
        }
    }
}
