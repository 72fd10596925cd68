//! The per-virtqueue data path (docs/DESIGN.md §5): pops descriptor chains,
//! carries each request through its states (parsed → pinned → (parked) →
//! submitted → completed → verified → done) and pushes each used element as
//! soon as its own request is done, so requests are in flight concurrently
//! and one slow request does not hold up the queue.
//!
//! One [`QueueWorker`] serves one virtqueue and runs only on that queue's
//! vhost-user worker thread; it shares nothing mutable with other queues.
//! Files: `job.rs` (a request's state), `lifecycle.rs` (its transitions), `park.rs`
//! (stalls, bounce-pool waits, timers, injected delays), `integrity.rs` (R3,
//! R4 and the checksum store at completion), `events.rs` (report events),
//! `kick.rs` (bounded popping of the avail ring), `poll.rs` (adaptive
//! busy-polling before epoll), `answer.rs` (refusals and
//! GET_ID), `inflight.rs` (the
//! vhost-user inflight record: marking and resubmission), `memory.rs`
//! (guest memory lost to a truncation).

mod answer;
mod events;
mod inflight;
mod integrity;
mod job;
mod kick;
mod lifecycle;
mod memory;
mod park;
mod poll;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::device::{Device, QueueCounters};
pub use crate::guest::{GuestMem, GuestMemAtomic};
use crate::storage::{Aio, Engine, Tag};
use job::Slots;
use kick::RingFault;

/// A vring as vhost-user-backend hands it to the worker.
pub type Vring = VringRwLock<GuestMemAtomic>;

/// Errors creating a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// io_uring_setup(2) or eventfd(2) failed.
    #[error("cannot set up io_uring for queue {queue}: {source}")]
    Setup {
        /// Queue index.
        queue: u16,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The data path of one virtqueue.
pub struct QueueWorker {
    dev: Arc<Device>,
    mem: GuestMemAtomic,
    index: u16,
    /// This worker's index in the device's per-queue structures (pin
    /// registries and wakers, range-lock wakers, counters): connection lane
    /// × queues + `index`, so that two connections' workers of one queue
    /// (a migration's source and destination) never share a slot.
    slot: u16,
    /// Declared before `jobs`, so dropped first: a mapped engine's copier
    /// thread is joined while the jobs (and the guest memory their buffers
    /// are in) still live.
    engine: Engine,
    /// Requests between parsed and done, by slot (the engine's tags name slots).
    jobs: Slots,
    event_idx: bool,
    vring: Option<Vring>,
    needs_signal: bool,
    zero_range_unsupported: bool,
    park: park::Parked,
    rng: fastrand::Rng,
    /// Reused buffer for copies of guest data: only a zero-copy WRITE
    /// covering blocks partly is checksummed through it.
    scratch: Vec<u8>,
    /// Reused buffer of reaped completions.
    completions: Vec<(Tag, i32)>,
    /// Inflight I/O tracking (vhost-user), when the frontend set a record.
    tracking: inflight::Tracking,
    /// Chains were left available (the in-flight cap or the round limit of
    /// [`QueueWorker::process_queue`]): pop them at the next completion.
    pop_pending: bool,
    /// The ring fault last logged (logged once per episode, not per kick).
    fault: Option<RingFault>,
    /// A ring stop gave up on requests still in flight
    /// ([`QueueWorker::abandon`]): from then on nothing is written to guest
    /// memory or the used ring any more.
    abandoned: bool,
    /// Busy-polling before epoll: budget and its adaptation (poll.rs).
    poller: poll::Poller,
}

impl QueueWorker {
    /// A worker for virtqueue `index` of `dev`, reading guest memory through
    /// `mem`, on the engine the image's `--aio` chose (io_uring or mapped;
    /// a null engine under `--null`).
    ///
    /// # Errors
    /// [`WorkerError::Setup`] if io_uring or its completion eventfd cannot be created.
    pub fn new(dev: Arc<Device>, mem: GuestMemAtomic, index: u16) -> Result<Self, WorkerError> {
        Self::new_in_lane(dev, mem, 0, index)
    }

    /// [`QueueWorker::new`] for the connection holding lane `lane` (below
    /// [`crate::device::MAX_CONNECTIONS`]; docs/DESIGN.md §13).
    ///
    /// # Errors
    /// As [`QueueWorker::new`].
    pub fn new_in_lane(
        dev: Arc<Device>,
        mem: GuestMemAtomic,
        lane: u16,
        index: u16,
    ) -> Result<Self, WorkerError> {
        let entries = u32::from(dev.config().queue_size)
            .next_power_of_two()
            .max(8);
        let image = dev.image();
        let file = image.file();
        let engine = if dev.null() {
            Engine::null(file, entries)
        } else if image.aio().aio == Aio::Mmap {
            Engine::mapped(file, entries, image.size(), !image.read_only())
        } else {
            Engine::uring(file, entries)
        }
        .map_err(|source| WorkerError::Setup {
            queue: index,
            source,
        })?;
        Self::with_engine_in_lane(dev, mem, lane, index, engine)
    }

    /// A worker on a given storage engine (unit tests use a fake one); the
    /// engine gets the checksum store's file for FLUSH.
    ///
    /// # Errors
    /// [`WorkerError::Setup`] if the wake-up eventfd or the store's file
    /// cannot be duplicated.
    pub fn with_engine(
        dev: Arc<Device>,
        mem: GuestMemAtomic,
        index: u16,
        engine: Engine,
    ) -> Result<Self, WorkerError> {
        Self::with_engine_in_lane(dev, mem, 0, index, engine)
    }

    /// [`QueueWorker::with_engine`] for the connection holding lane `lane`.
    ///
    /// # Errors
    /// As [`QueueWorker::with_engine`].
    pub fn with_engine_in_lane(
        dev: Arc<Device>,
        mem: GuestMemAtomic,
        lane: u16,
        index: u16,
        mut engine: Engine,
    ) -> Result<Self, WorkerError> {
        let slot = lane * dev.config().num_queues + index;
        let dev_poll_max = dev.poll_max();
        if let Some(store) = dev.store() {
            engine
                .set_store_file(store.file())
                .map_err(|source| WorkerError::Setup {
                    queue: index,
                    source,
                })?;
        }
        // A stalled request waits on pins of other queues: their unpin wakes
        // this worker through its completion eventfd.
        let waker_fd = engine
            .completion_fd()
            .try_clone()
            .map_err(|source| WorkerError::Setup {
                queue: index,
                source,
            })?;
        let waker_fd = Arc::new(waker_fd);
        let fd = waker_fd.clone();
        dev.pins().set_waker(
            slot,
            Some(Arc::new(move || {
                let _ = fd.write(1);
            })),
        );
        // A request waiting for an LBA range is woken when it is released.
        if let Some(ranges) = dev.ranges() {
            ranges.set_waker(
                slot,
                Some(Arc::new(move || {
                    let _ = waker_fd.write(1);
                })),
            );
        }
        let c = &dev.queue_counters()[usize::from(slot)];
        c.engine.store(engine.kind() as u8, Ordering::Relaxed);
        c.in_flight.store(0, Ordering::Relaxed);
        Ok(QueueWorker {
            dev,
            mem,
            index,
            slot,
            engine,
            jobs: Slots::default(),
            event_idx: false,
            vring: None,
            needs_signal: false,
            zero_range_unsupported: false,
            park: park::Parked::default(),
            rng: fastrand::Rng::new(),
            scratch: Vec::new(),
            completions: Vec::new(),
            tracking: inflight::Tracking::default(),
            pop_pending: false,
            fault: None,
            abandoned: false,
            poller: poll::Poller::new(dev_poll_max),
        })
    }

    /// The eventfd signalled when storage completions (or pin releases a
    /// stalled request waits on) are ready; register it on this queue's
    /// epoll loop and call [`QueueWorker::complete`] when readable.
    pub fn completion_fd(&self) -> &EventFd {
        self.engine.completion_fd()
    }

    /// Enables or disables VIRTIO_RING_F_EVENT_IDX handling.
    pub fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    /// The vring this queue last served (set when it first processed the
    /// ring or started with an inflight record), for the ring-state log.
    pub fn vring(&self) -> Option<Vring> {
        self.vring.clone()
    }

    /// Requests popped and not yet done.
    pub fn inflight(&self) -> usize {
        self.jobs.len()
    }

    fn counters(&self) -> &QueueCounters {
        &self.dev.queue_counters()[usize::from(self.slot)]
    }

    /// Handles the completion eventfd: completes every finished request and
    /// retries parked ones.
    pub fn complete(&mut self, vring: &Vring) {
        // Reset the eventfd before reaping: a completion posted after this
        // read signals it again, so none is missed.
        let _ = self.engine.completion_fd().read();
        self.resubmit_inflight(vring);
        self.reap();
        self.retry_parked(false);
        if self.pop_pending {
            // process_queue submits and signals.
            return self.process_queue(vring);
        }
        self.engine.submit();
        self.signal(vring);
    }

    /// Waits until every popped request is done and its used element pushed
    /// (vhost-user GET_VRING_BASE, disconnect, shutdown). Stalls end at once
    /// (as timeouts): nothing may wait past a drain.
    pub fn drain(&mut self) {
        self.drain_until(None);
    }

    /// [`QueueWorker::drain`], giving up at `deadline` (if any); `true` when
    /// nothing is left. With a deadline the wait is bounded by it (poll(2)
    /// on the completion eventfd), whatever storage does. A request waiting
    /// for an LBA range held by another queue's request needs that queue to
    /// make progress too: drain all queues of a connection in turns with
    /// short deadlines.
    pub fn drain_until(&mut self, deadline: Option<Instant>) -> bool {
        self.retry_parked(true);
        while !self.jobs.is_empty() {
            match deadline {
                None => {
                    if let Err(e) = self.engine.wait() {
                        if e.raw_os_error() != Some(libc::EINTR) {
                            log::error!("queue {}: io_uring wait failed: {e}", self.index);
                            break;
                        }
                    }
                }
                Some(d) => {
                    // What is ready already (inline completions too) first.
                    self.engine.submit();
                    self.reap();
                    self.retry_parked(true);
                    let now = Instant::now();
                    if self.jobs.is_empty() || now >= d {
                        break;
                    }
                    crate::sys::wait_readable(self.engine.completion_fd(), d - now);
                    let _ = self.engine.completion_fd().read();
                }
            }
            self.reap();
            self.retry_parked(true);
        }
        if let Some(v) = self.vring.clone() {
            self.signal(&v);
        }
        self.jobs.is_empty()
    }

    /// Stops the ring for vhost-user GET_VRING_BASE: drains for at most
    /// `limit`. `Ok` when every popped request is done and in the used ring.
    /// Otherwise the requests still in flight may still be under DMA into
    /// guest memory, so the ring cannot be reported stopped: they are
    /// logged, the worker is [abandoned](QueueWorker::abandon), and the
    /// error says how many (docs/DESIGN.md §8, "Stopping a ring").
    ///
    /// # Errors
    /// `TimedOut` naming the requests still in flight after `limit`.
    pub fn stop(&mut self, limit: Duration) -> std::io::Result<()> {
        if self.drain_until(Some(Instant::now() + limit)) {
            return Ok(());
        }
        let n = self.abandon();
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "queue {}: {n} request(s) still in flight {limit:?} after the ring stop began; \
                 the ring cannot be reported stopped",
                self.index
            ),
        ))
    }

    /// Gives up on reporting the requests in flight: each is logged (id,
    /// head, stage); when it finishes it is completed inside pinblk (pins,
    /// checksums, range locks) but neither its data (bounced READ), its
    /// status byte nor its used element reaches guest memory, and nothing
    /// more is popped. Returns how many were in flight.
    pub fn abandon(&mut self) -> usize {
        self.abandoned = true;
        // One line for all of them (a per-request line would be rate-limited).
        let left: Vec<String> = self
            .jobs
            .iter()
            .map(|job| {
                format!(
                    "request {} head {} {:?}",
                    job.id, job.req.head, job.req.command
                )
            })
            .collect();
        log::error!(
            "queue {}: {} request(s) still in flight at the ring stop: they complete inside \
             pinblk, unreported to the driver: {}",
            self.index,
            left.len(),
            left.join(", ")
        );
        self.jobs.len()
    }

    /// Reaps every available completion and moves its request on.
    fn reap(&mut self) {
        // Reused between calls: no allocation per batch.
        let mut done = std::mem::take(&mut self.completions);
        loop {
            done.clear();
            self.engine.reap(&mut done);
            if done.is_empty() {
                break;
            }
            self.poller.work += done.len() as u64;
            for &(tag, res) in &done {
                match tag {
                    Tag::Timer => self.park.timer_fired(),
                    Tag::Delay { slot } => self.delay_over(slot),
                    Tag::Job { slot, op } => self.on_completion(slot, op, res),
                }
            }
        }
        self.completions = done;
    }

    /// Ends a batch: publishes the queue's gauges (`query-stats`) and, if
    /// used elements were pushed, notifies the driver unless it asked not
    /// to be (virtio 1.2 §2.7.10).
    fn signal(&mut self, vring: &Vring) {
        let c = self.counters();
        c.in_flight.store(self.inflight() as u64, Ordering::Relaxed);
        let kind = self.engine.kind() as u8;
        if c.engine.load(Ordering::Relaxed) != kind {
            c.engine.store(kind, Ordering::Relaxed);
        }
        if !self.needs_signal {
            return;
        }
        self.needs_signal = false;
        match vring.needs_notification() {
            Ok(false) => {}
            Ok(true) | Err(_) => {
                if let Err(e) = vring.signal_used_queue() {
                    log::error!("queue {}: cannot signal used queue: {e}", self.index);
                }
            }
        }
    }

    /// Writes `status` (if the chain has a status byte) and pushes the used
    /// element of `head` (virtio 1.2 §2.7.8).
    fn push_used(
        &mut self,
        mem: &GuestMem,
        head: u16,
        status_addr: Option<GuestAddress>,
        status: u8,
        used_len: u32,
    ) {
        if self.abandoned {
            log::warn!(
                "queue {}: head {head} finished (status {status}) after the ring stop gave \
                 up on it: not reported to the driver",
                self.index
            );
            return;
        }
        if let Some(addr) = status_addr {
            // One region lookup and a volatile store, the dirty log marked as
            // vm-memory marks it (the vendored virtio-queue's ring fast path;
            // anything unusual falls back to vm-memory's `write_obj`).
            if let Err(e) = virtio_queue::fast::write_obj(mem, status, addr) {
                log::warn!(
                    "queue {}: cannot write status byte at {:#x}: {e}",
                    self.index,
                    addr.0
                );
            }
        }
        let c = self.counters();
        c.requests.fetch_add(1, Ordering::Relaxed);
        if status == VIRTIO_BLK_S_IOERR as u8 {
            c.ioerr.fetch_add(1, Ordering::Relaxed);
        } else if status == VIRTIO_BLK_S_UNSUPP as u8 {
            c.unsupp.fetch_add(1, Ordering::Relaxed);
        }
        // Taken out and put back (no Arc clone: two atomic RMWs per request).
        let vring = self
            .vring
            .take()
            .expect("vring is known once a chain was popped");
        self.inflight_pre_put(head);
        if let Err(e) = vring.add_used(head, used_len) {
            // Once per episode, not once per request (the used ring left
            // guest memory: REM_MEM_REG of its region, say).
            log::debug!("queue {}: cannot add used element {head}: {e}", self.index);
            self.set_fault(Some(RingFault::Unreachable));
        }
        self.inflight_post_put(head, &vring);
        self.vring = Some(vring);
        self.needs_signal = true;
    }
}

impl Drop for QueueWorker {
    fn drop(&mut self) {
        // The kernel may still be writing into guest memory: never unmap it
        // (by dropping the jobs) under a running request.
        self.drain();
        // The slot goes to the next connection in this lane.
        self.dev.pins().set_waker(self.slot, None);
        if let Some(ranges) = self.dev.ranges() {
            ranges.set_waker(self.slot, None);
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod policy_tests;

#[cfg(test)]
mod engine_tests;

#[cfg(test)]
mod overlap_tests;

#[cfg(test)]
mod dirty_log_tests;

#[cfg(test)]
mod poll_tests;

#[cfg(test)]
pub(crate) mod test_util;
