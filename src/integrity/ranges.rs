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
//! Grant rule: a request is granted when no *earlier* request (lower
//! ticket, granted or still waiting) holds or wants an overlapping range in a
//! conflicting mode. So overlapping requests are served in arrival order (a
//! stream of READs cannot starve a WRITE), and a wait is always on an earlier
//! ticket: no wait cycle is possible. Holders are always requests already
//! handed to storage (the lock is the last step before submission), so every
//! wait ends when storage completes.
//!
//! This is separate from the pin rules R1/R2 (overlap of guest *buffers*):
//! this is overlap of *LBAs*, which is legal and never reported as an error.

use std::collections::BTreeMap;
use std::ops::Range;
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
    seq: u64,
}

#[derive(Debug)]
struct Entry {
    blocks: Range<u64>,
    access: Access,
    granted: bool,
    queue: u16,
    id: u64,
}

impl Entry {
    fn conflicts(&self, blocks: &Range<u64>, access: Access) -> bool {
        self.blocks.start < blocks.end
            && blocks.start < self.blocks.end
            && (self.access == Access::Exclusive || access == Access::Exclusive)
    }
}

#[derive(Default)]
struct Table {
    next_seq: u64,
    /// By ticket: arrival order.
    entries: BTreeMap<u64, Entry>,
}

impl Table {
    /// Whether the entry `seq` may be granted: no earlier entry conflicts.
    fn grantable(&self, seq: u64) -> bool {
        let me = &self.entries[&seq];
        !self
            .entries
            .range(..seq)
            .any(|(_, e)| e.conflicts(&me.blocks, me.access))
    }
}

/// Counters of the range table (all queues).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RangeCounters {
    /// Requests that were not granted at once (waited on an overlapping one).
    pub waits: u64,
    /// Requests holding or waiting for a range now.
    pub entries: u64,
}

/// The range table of one device.
pub struct RangeLocks {
    table: Mutex<Table>,
    wakers: Mutex<Vec<Option<RangeWaker>>>,
    waits: std::sync::atomic::AtomicU64,
}

impl RangeLocks {
    /// An empty table for a device with `num_queues` queues.
    pub fn new(num_queues: u16) -> RangeLocks {
        RangeLocks {
            table: Mutex::new(Table::default()),
            wakers: Mutex::new(vec![None; usize::from(num_queues)]),
            waits: Default::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets (or clears) the waker of `queue`, called when a range its waiting
    /// requests overlap is released.
    pub fn set_waker(&self, queue: u16, waker: Option<RangeWaker>) {
        let mut w = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = w.get_mut(usize::from(queue)) {
            *slot = waker;
        }
    }

    /// Enters request `id` of `queue` for checksum blocks `blocks` (4 KiB
    /// units, end exclusive) in mode `access`. Returns its ticket and whether
    /// it is granted now; if not, retry with [`RangeLocks::try_grant`] when
    /// the queue's waker runs.
    pub fn acquire(
        &self,
        queue: u16,
        id: u64,
        blocks: Range<u64>,
        access: Access,
    ) -> (RangeTicket, bool) {
        let mut t = self.lock();
        let seq = t.next_seq;
        t.next_seq += 1;
        t.entries.insert(
            seq,
            Entry {
                blocks,
                access,
                granted: false,
                queue,
                id,
            },
        );
        let granted = t.grantable(seq);
        if granted {
            t.entries.get_mut(&seq).expect("just inserted").granted = true;
        } else {
            self.waits
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        (RangeTicket { seq }, granted)
    }

    /// Grants a waiting ticket if no earlier overlapping request is left;
    /// `true` once granted (also if it was already).
    pub fn try_grant(&self, ticket: &RangeTicket) -> bool {
        let mut t = self.lock();
        match t.entries.get(&ticket.seq) {
            Some(e) if e.granted => return true,
            Some(_) => {}
            None => return false,
        }
        let granted = t.grantable(ticket.seq);
        if granted {
            t.entries.get_mut(&ticket.seq).expect("present").granted = true;
        }
        granted
    }

    /// Releases a ticket (granted or not) and wakes every queue with a
    /// waiting request that overlapped it.
    pub fn release(&self, ticket: RangeTicket) {
        let mut wake: Vec<u16> = Vec::new();
        {
            let mut t = self.lock();
            let Some(gone) = t.entries.remove(&ticket.seq) else {
                return;
            };
            for e in t.entries.range(ticket.seq..).map(|(_, e)| e) {
                if !e.granted
                    && e.blocks.start < gone.blocks.end
                    && gone.blocks.start < e.blocks.end
                    && !wake.contains(&e.queue)
                {
                    wake.push(e.queue);
                }
            }
        }
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
    /// `blocks`, except `id` (for reports: who else is on these LBAs).
    pub fn overlapping(&self, blocks: &Range<u64>, id: u64) -> Vec<u64> {
        let t = self.lock();
        let mut ids: Vec<u64> = t
            .entries
            .values()
            .filter(|e| e.id != id && e.blocks.start < blocks.end && blocks.start < e.blocks.end)
            .map(|e| e.id)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Counters now.
    pub fn counters(&self) -> RangeCounters {
        RangeCounters {
            waits: self.waits.load(std::sync::atomic::Ordering::Relaxed),
            entries: self.lock().entries.len() as u64,
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
    fn waits_only_on_earlier_tickets() {
        // Random acquire/release sequences: every wait is on a lower ticket,
        // and releasing everything granted in order lets everyone through.
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..200 {
            let l = RangeLocks::new(1);
            let mut held: Vec<(RangeTicket, bool)> = Vec::new();
            for id in 0..12 {
                let s = rng.u64(0..8);
                let e = s + rng.u64(1..4);
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
