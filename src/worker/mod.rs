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
//! R4 and the checksum store at completion), `events.rs` (report events).

mod events;
mod inflight;
mod integrity;
mod job;
mod lifecycle;
mod memory;
mod park;

use std::num::Wrapping;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{Device, QueueCounters};
pub use crate::guest::{GuestMem, GuestMemAtomic};
use crate::storage::{Engine, Tag};
use job::Slots;

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
    engine: Engine,
    /// Requests between parsed and done, by slot (the engine's tags name slots).
    jobs: Slots,
    event_idx: bool,
    vring: Option<Vring>,
    needs_signal: bool,
    zero_range_unsupported: bool,
    park: park::Parked,
    rng: fastrand::Rng,
    /// Reused buffer for copies of guest data being checksummed.
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
}

/// Rounds of popping one kick may take under EVENT_IDX while the driver
/// keeps adding chains; then the worker lets go of its lock (a ring stop may
/// be waiting for it) and goes on from its completion eventfd.
const POP_ROUNDS: usize = 4;

/// Why a ring cannot be served (virtio 1.2 §2.7: a driver error; the device
/// stops using the ring until it is set up again, and logs it once).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RingFault {
    /// The avail `idx` is more than the queue size ahead of the device's
    /// next index (virtio 1.2 §2.7.6: at most queue size entries are available).
    AvailAhead {
        /// The driver's avail `idx`.
        avail: u16,
        /// The device's next avail index.
        next: u16,
        /// Queue size.
        size: u16,
    },
    /// The avail or used ring cannot be read or written (not in guest memory).
    Unreachable,
    /// More requests in flight than the queue has descriptors: the driver
    /// made a head available again before it was used (virtio 1.2 §2.7.13).
    Overcommitted,
}

/// What the avail ring holds for the device.
enum Avail {
    /// This many chains to pop (at most the queue size).
    Pending(u16),
    /// Nothing.
    Nothing,
    /// The ring is not ready (being stopped, not yet set up) or disabled, or
    /// the worker was abandoned: nothing may be popped.
    NotReady,
    /// Nothing can be popped because of a driver error.
    Fault(RingFault),
}

impl QueueWorker {
    /// A worker for virtqueue `index` of `dev`, reading guest memory through
    /// `mem`, on an io_uring engine (a null engine under `--null`).
    ///
    /// # Errors
    /// [`WorkerError::Setup`] if io_uring or its completion eventfd cannot be created.
    pub fn new(dev: Arc<Device>, mem: GuestMemAtomic, index: u16) -> Result<Self, WorkerError> {
        let entries = u32::from(dev.config().queue_size)
            .next_power_of_two()
            .max(8);
        let file = dev.image().file();
        let engine = if dev.null() {
            Engine::null(file, entries)
        } else {
            Engine::uring(file, entries)
        }
        .map_err(|source| WorkerError::Setup {
            queue: index,
            source,
        })?;
        Self::with_engine(dev, mem, index, engine)
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
        mut engine: Engine,
    ) -> Result<Self, WorkerError> {
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
            index,
            Some(Arc::new(move || {
                let _ = fd.write(1);
            })),
        );
        // A request waiting for an LBA range is woken when it is released.
        if let Some(ranges) = dev.ranges() {
            ranges.set_waker(
                index,
                Some(Arc::new(move || {
                    let _ = waker_fd.write(1);
                })),
            );
        }
        Ok(QueueWorker {
            dev,
            mem,
            index,
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

    /// Requests popped and not yet done.
    pub fn inflight(&self) -> usize {
        self.jobs.len()
    }

    fn counters(&self) -> &QueueCounters {
        &self.dev.queue_counters()[usize::from(self.index)]
    }

    /// Handles a kick: pops every available descriptor chain and starts it.
    ///
    /// Bounded whatever the driver writes: at most the queue size chains in
    /// flight, at most `POP_ROUNDS` (4) rounds of popping per call (the rest
    /// is popped from the completion eventfd), and nothing popped from a
    /// ring that is not ready (being stopped) or whose avail index is
    /// inconsistent: that is logged once, not per kick.
    pub fn process_queue(&mut self, vring: &Vring) {
        if self.vring.is_none() {
            self.vring = Some(vring.clone());
        }
        self.resubmit_inflight(vring);
        self.pop_pending = false;
        for round in 1..=POP_ROUNDS {
            if self.event_idx {
                if let Err(e) = vring.disable_notification() {
                    log::debug!("queue {}: cannot disable notifications: {e}", self.index);
                }
            }
            if self.pop_available(vring).is_none() {
                // Nothing can be popped although the avail index may be
                // ahead (ring stopping, a fault, the in-flight cap): looping
                // would spin under the worker's lock (issue 13 findings 1-2).
                if self.event_idx && !self.abandoned {
                    let _ = vring.enable_notification();
                }
                break;
            }
            if !self.event_idx {
                break;
            }
            match vring.enable_notification() {
                // More was made available meanwhile: pop it, a few rounds at most.
                Ok(true) if round < POP_ROUNDS => continue,
                Ok(true) => {
                    self.pop_pending = true;
                    let _ = self.engine.completion_fd().write(1);
                }
                Ok(false) => {}
                Err(_) => self.set_fault(Some(RingFault::Unreachable)),
            }
            break;
        }
        self.engine.submit();
        if self.engine.completes_inline() {
            self.reap();
        }
        self.signal(vring);
    }

    /// Pops and starts the chains the avail ring holds, up to the in-flight
    /// cap (the queue size); returns how many, or `None` if nothing can be
    /// popped although chains may be available (ring not ready, a fault,
    /// the cap).
    fn pop_available(&mut self, vring: &Vring) -> Option<usize> {
        let (n, size) = match self.avail(vring) {
            (Avail::Pending(n), size) => (n, size),
            (Avail::Nothing, _) => return Some(0),
            (Avail::NotReady, _) => return None,
            (Avail::Fault(f), _) => {
                self.set_fault(Some(f));
                return None;
            }
        };
        let mut popped = 0;
        for _ in 0..n {
            if self.jobs.len() >= usize::from(size) {
                self.set_fault(Some(RingFault::Overcommitted));
                self.pop_pending = true;
                return (popped > 0).then_some(popped);
            }
            // Snapshot guest memory for each chain, after the avail index
            // was read, so a memory-table change is seen at once.
            let mem = self.mem.memory().into_inner();
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(chain) = chain else { break };
            self.inflight_mark(chain.head_index());
            self.start(mem, chain);
            popped += 1;
        }
        if popped > 0 {
            self.set_fault(None);
        }
        Some(popped)
    }

    /// Reads the avail index and judges it against the device's next index
    /// and the queue size (virtio 1.2 §2.7.6); also the queue size.
    fn avail(&self, vring: &Vring) -> (Avail, u16) {
        if self.abandoned {
            return (Avail::NotReady, 0);
        }
        let state = vring.get_ref();
        let q = state.get_queue();
        let size = q.size();
        // Not ready (stopped by GET_VRING_BASE, or not set up) or disabled
        // (SET_VRING_ENABLE 0: "the back-end must not pass data to/from the
        // ring", vhost-user spec, "Ring states"): nothing may be popped, also
        // not from a completion with chains left over.
        if !q.ready() || !state.is_enabled() {
            return (Avail::NotReady, size);
        }
        let mem = self.mem.memory();
        let avail = match q.avail_idx(&*mem, std::sync::atomic::Ordering::Acquire) {
            Ok(i) => i,
            Err(_) => return (Avail::Fault(RingFault::Unreachable), size),
        };
        let ahead = (avail - Wrapping(q.next_avail())).0;
        let a = if ahead == 0 {
            Avail::Nothing
        } else if ahead > size {
            Avail::Fault(RingFault::AvailAhead {
                avail: avail.0,
                next: q.next_avail(),
                size,
            })
        } else {
            Avail::Pending(ahead)
        };
        (a, size)
    }

    /// Records the ring's fault (`None`: served again), logging a new one once.
    fn set_fault(&mut self, f: Option<RingFault>) {
        // One line per kind of fault, not per value a driver may cycle through.
        if f.as_ref().map(std::mem::discriminant) == self.fault.as_ref().map(std::mem::discriminant)
        {
            return;
        }
        match f {
            Some(RingFault::AvailAhead { avail, next, size }) => log::warn!(
                "queue {}: driver error: avail index {avail} is more than the queue size \
                 ({size}) ahead of the next index {next}; nothing popped until it is consistent",
                self.index
            ),
            Some(RingFault::Unreachable) => log::warn!(
                "queue {}: driver error: the avail or used ring is not in guest memory; \
                 nothing popped until it is",
                self.index
            ),
            Some(RingFault::Overcommitted) => log::warn!(
                "queue {}: driver error: more requests made available than the queue has \
                 entries while {} are in flight; the rest waits for completions",
                self.index,
                self.jobs.len()
            ),
            None if self.fault != Some(RingFault::Overcommitted) => {
                log::info!("queue {}: ring served again", self.index)
            }
            None => {}
        }
        self.fault = f;
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
        for job in self.jobs.iter() {
            log::error!(
                "queue {}: request {} (head {}, {:?}) still in flight at the ring stop: \
                 it completes inside pinblk, unreported to the driver",
                self.index,
                job.id,
                job.req.head,
                job.req.command,
            );
        }
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

    fn signal(&mut self, vring: &Vring) {
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
            if let Err(e) = mem.write_obj(status, addr) {
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
        let vring = self
            .vring
            .clone()
            .expect("vring is known once a chain was popped");
        self.inflight_pre_put(head);
        if let Err(e) = vring.add_used(head, used_len) {
            // Once per episode, not once per request (the used ring left
            // guest memory: REM_MEM_REG of its region, say).
            log::debug!("queue {}: cannot add used element {head}: {e}", self.index);
            self.set_fault(Some(RingFault::Unreachable));
        }
        self.inflight_post_put(head, &vring);
        self.needs_signal = true;
    }
}

impl Drop for QueueWorker {
    fn drop(&mut self) {
        // The kernel may still be writing into guest memory: never unmap it
        // (by dropping the jobs) under a running request.
        self.drain();
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
pub(crate) mod test_util;
