//! The worker's bounds on memory (docs/DESIGN.md §4 "Bounce pool", §5
//! "Guest memory that vanishes"): bounce memory reserved against the
//! queue's and the device's caps, and guest memory a truncation took away.

use std::sync::atomic::{AtomicU64, Ordering};

use super::job::Job;
use super::QueueWorker;
use crate::sigbus;

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

/// Whether `job`'s data buffer or status byte lies on guest memory lost to
/// a truncation of its file (a SIGBUS absorbed by [`crate::sigbus`]): its
/// CPU copies saw zeroes and its DMA went nowhere, so it must fail with
/// IOERR. One atomic load while no SIGBUS ever happened. Each new fault is
/// logged once.
pub(super) fn guest_memory_lost(queue: u16, job: &Job) -> bool {
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
