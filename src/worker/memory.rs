//! The worker's bounds on memory (docs/DESIGN.md §4 "Bounce pool", §5
//! "Guest memory that vanishes"): bounce memory reserved against the
//! queue's and the device's caps, and guest memory a truncation took away.

use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::job::Job;
use super::{GuestMem, QueueWorker};
use crate::guest::{one_region, GuestRange};
use crate::sigbus;

/// Host slices of a request's buffer kept on the stack by [`with_guest_view`]
/// (more spill to the heap): a Linux guest's 4 KiB and 128 KiB requests have
/// one or a few.
const VIEW_INLINE: usize = 8;

/// The answer to a bounce-memory reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Reserve {
    /// Reserved: the caller allocates the buffer.
    Taken,
    /// No room now: park and retry (memory comes back as requests complete).
    Wait,
    /// Larger than the queue's or the device's cap: can never be bounced.
    TooLarge,
}

/// The SIGBUS count last logged (so each new fault is logged once).
static LOGGED_FAULTS: AtomicU64 = AtomicU64::new(0);

impl QueueWorker {
    /// Reserves `len` bytes of bounce memory for the job `id`: within this
    /// queue's cap (`--bounce-queue-max`, never exceeded, also not in a drain)
    /// and the device's pool (`--bounce-pool`, which `force` may overflow
    /// during a drain, by at most the queues' caps). A request larger than
    /// either cap gets [`Reserve::TooLarge`]; one that fits them always
    /// fits an idle queue and pool, so it never waits forever.
    pub(super) fn reserve_bounce(&self, id: u64, len: u64, force: bool) -> Reserve {
        let policy = self.dev.policy();
        let (queue_cap, pool) = (policy.bounce_queue_bytes, policy.bounce_pool_bytes);
        if len > queue_cap.min(pool) {
            log::warn!(
                "queue {} request {id}: {len} bytes to bounce, over the bounce cap \
                 ({queue_cap} bytes per queue, {pool} per device): failing it",
                self.index
            );
            return Reserve::TooLarge;
        }
        let queue = &self.counters().bounce_bytes;
        // Only this queue's thread adds to its own gauge.
        if queue.load(Ordering::Acquire) + len > queue_cap {
            return Reserve::Wait;
        }
        let pooled =
            self.dev
                .bounce_in_use()
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                    (force || used + len <= pool).then_some(used + len)
                });
        if pooled.is_err() {
            return Reserve::Wait;
        }
        queue.fetch_add(len, Ordering::AcqRel);
        Reserve::Taken
    }

    /// Returns `len` bytes reserved by [`QueueWorker::reserve_bounce`].
    pub(super) fn release_bounce(&self, len: u64) {
        self.dev.bounce_in_use().fetch_sub(len, Ordering::AcqRel);
        self.counters()
            .bounce_bytes
            .fetch_sub(len, Ordering::AcqRel);
    }
}

/// Runs `f` on a read-only view of the guest-physical `ranges` of `mem`: the
/// host slices that map them, in order, with no copy (for CRCs computed in
/// place over pinned guest memory, and the bounce copy-in). No allocation
/// for up to [`VIEW_INLINE`] host slices. `Err` if a range is outside `mem`.
///
/// The bytes may be changed by the guest while `f` reads them (a WRITE's
/// source scribbled under DMA: R3 exists to see it), and may lie on memory
/// a truncation took away: the caller asks [`sigbus::lost`] afterwards and
/// then drops whatever `f` computed.
pub(super) fn with_guest_view<R>(
    mem: &GuestMem,
    ranges: &[GuestRange],
    f: impl FnOnce(&[&[u8]]) -> R,
) -> Result<R, String> {
    let mut inline: [&[u8]; VIEW_INLINE] = [&[]; VIEW_INLINE];
    let mut spilled: Vec<&[u8]> = Vec::new();
    let mut n = 0;
    let mut push = |view| {
        if n < VIEW_INLINE {
            inline[n] = view;
        } else {
            if spilled.is_empty() {
                spilled.extend_from_slice(&inline);
            }
            spilled.push(view);
        }
        n += 1;
    };
    for r in ranges {
        // The common range lies in one region: one lookup, no slice iterator.
        if let Some((region, offset)) = one_region(mem, r.addr, u64::from(r.len)) {
            if let Ok(host) = region.get_host_address(MemoryRegionAddress(offset)) {
                // SAFETY: `one_region` checked that `region` holds all `r.len`
                // bytes from `offset`, so `host..host+r.len` is inside its
                // mapping; otherwise as for a slice of `get_slices` below.
                push(unsafe { std::slice::from_raw_parts(host.cast_const(), r.len as usize) });
                continue;
            }
        }
        for slice in mem.get_slices(GuestAddress(r.addr), r.len as usize) {
            let slice = slice.map_err(|e| format!("buffer {r} is outside guest memory: {e}"))?;
            // SAFETY: `slice` is a host range inside one mapped region of
            // `mem`, and `mem` (a memory snapshot that owns its mappings) is
            // borrowed for as long as the view lives, so the pages stay mapped;
            // `u8` has no invalid values. The view is handed to `f` only and
            // never outlives this call. What Rust cannot see: the mapping is
            // MAP_SHARED with the frontend, so the guest may store into it
            // while `f` reads (nothing pinblk does writes through it). Such a
            // store can only change the bytes `f` reads (a CRC or a copy of
            // them, taken byte for byte); it is the torn write R3 then reports
            // or the changed buffer R4 rechecks from the image. A page lost to
            // a truncated memfd faults, and the SIGBUS handler maps zeroes
            // there (`crate::sigbus`): the read completes and the caller
            // drops its result after `sigbus::lost`.
            push(unsafe { std::slice::from_raw_parts(slice.ptr_guard().as_ptr(), slice.len()) });
        }
    }
    Ok(if n <= VIEW_INLINE {
        f(&inline[..n])
    } else {
        f(&spilled)
    })
}

/// Runs `f` on a read-only view of `job`'s data buffer, as
/// [`with_guest_view`] does for its guest ranges, but through the host
/// iovecs the job's transfer already holds (translated once, when the
/// request was parsed: no region lookup) while they still cover the whole
/// buffer; otherwise (a short transfer advanced them, more than
/// [`VIEW_INLINE`] of them, no transfer) through [`with_guest_view`]. A
/// bounced job's iovecs are its bounce buffer's. Same errors and caveats as
/// [`with_guest_view`] (the guest may store into the bytes; lost memory
/// reads as zeroes and the caller asks [`sigbus::lost`]).
pub(super) fn with_job_view<R>(job: &Job, f: impl FnOnce(&[&[u8]]) -> R) -> Result<R, String> {
    let whole = job.transfer().filter(|t| {
        t.iov_start == 0
            && t.iov.len() <= VIEW_INLINE
            && t.iov.iter().map(|v| v.len as u64).sum::<u64>() == u64::from(job.req.data_len)
    });
    let Some(t) = whole else {
        return with_guest_view(&job.mem, &job.req.data, f);
    };
    let mut views: [&[u8]; VIEW_INLINE] = [&[]; VIEW_INLINE];
    for (view, v) in views.iter_mut().zip(&t.iov) {
        // SAFETY: `host_iovecs` made each iovec from a range inside one mapped
        // region of `job.mem` (or the job's bounce buffer, owned by the job),
        // and `job` (which owns that `Arc` snapshot of guest memory) is
        // borrowed while the view lives, so the pages stay mapped; `u8` has
        // no invalid values; the view goes to `f` only. As in
        // `with_guest_view`, the guest may store into the bytes while `f`
        // reads them, which only changes what `f` computes from them.
        *view = unsafe { std::slice::from_raw_parts(v.base as *const u8, v.len) };
    }
    Ok(f(&views[..t.iov.len()]))
}

/// Copies the scatter list `src` (concatenated) into `dst`, which it fills.
pub(super) fn gather(dst: &mut [u8], src: &[&[u8]]) {
    let mut at = 0;
    for s in src {
        let n = s.len().min(dst.len() - at);
        dst[at..at + n].copy_from_slice(&s[..n]);
        at += n;
    }
}

/// Whether `job`'s data buffer or status byte lies on guest memory lost to
/// a truncation of its file (a SIGBUS absorbed by [`crate::sigbus`]): its
/// CPU copies saw zeroes and its DMA went nowhere, so it must fail with
/// IOERR. One atomic load while no SIGBUS ever happened. Each new fault is
/// logged once.
#[inline]
pub(super) fn guest_memory_lost(queue: u16, job: &Job) -> bool {
    sigbus::faults() != 0 && guest_memory_lost_after_a_fault(queue, job)
}

/// [`guest_memory_lost`] once a SIGBUS happened in this process.
#[cold]
fn guest_memory_lost_after_a_fault(queue: u16, job: &Job) -> bool {
    let ranges = job
        .req
        .data
        .iter()
        .map(|r| (r.addr, u64::from(r.len)))
        .chain([(job.req.status_addr.0, 1)]);
    if !sigbus::lost(&job.mem, ranges) {
        return false;
    }
    let n = sigbus::faults();
    if LOGGED_FAULTS.fetch_max(n, Ordering::AcqRel) < n {
        log::error!(
            "queue {queue} request {}: guest memory past the end of its file (truncated by \
             the frontend; {n} SIGBUS absorbed so far): requests on it fail with IOERR",
            job.id
        );
    }
    true
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    use super::{gather, with_guest_view, GuestMem, VIEW_INLINE};
    use crate::guest::GuestRange;

    #[test]
    fn guest_view_is_the_bytes_of_the_ranges_in_order_across_regions_and_spills() {
        // Two adjacent regions: a range over their border maps to two slices.
        let mem =
            GuestMem::from_ranges(&[(GuestAddress(0), 0x4000), (GuestAddress(0x4000), 0x4000)])
                .unwrap();
        let bytes: Vec<u8> = (0..0x8000u32).map(|i| (i * 7 % 251) as u8).collect();
        mem.write_slice(&bytes, GuestAddress(0)).unwrap();
        let at = |a: u64, l: u32| GuestRange { addr: a, len: l };
        let want = |rs: &[GuestRange]| -> Vec<u8> {
            rs.iter()
                .flat_map(|r| bytes[r.addr as usize..r.end() as usize].to_vec())
                .collect()
        };
        // One range across the border; then more ranges than fit inline.
        let across = vec![at(0x3f00, 0x200)];
        let many: Vec<GuestRange> = (0..VIEW_INLINE as u64 + 5)
            .map(|i| at(0x7000 - i * 0x300, 0x100 + i as u32))
            .collect();
        for rs in [&across, &many] {
            let got = with_guest_view(&mem, rs, |v| {
                let mut out = vec![0u8; v.iter().map(|s| s.len()).sum()];
                gather(&mut out, v);
                out
            })
            .unwrap();
            assert_eq!(got, want(rs));
        }
        let n = with_guest_view(&mem, &across, |v| v.len()).unwrap();
        assert_eq!(n, 2, "one slice per region");
        // Inside one region: one slice, at the range's host address.
        let inside = [at(0x4100, 0x200)];
        let p = with_guest_view(&mem, &inside, |v| (v.len(), v[0].as_ptr())).unwrap();
        let host = GuestMemoryBackend::get_host_address(&mem, GuestAddress(0x4100)).unwrap();
        assert_eq!(p, (1, host.cast_const()));
        // Outside guest memory: an error, `f` not called.
        let err = with_guest_view(&mem, &[at(0x7f00, 0x200)], |_| panic!("called"));
        assert!(err.is_err());
    }
}
