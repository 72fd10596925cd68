//! The per-virtqueue data path: pops descriptor chains, checks them against
//! the device, turns guest-physical buffers into host iovecs into mapped guest
//! memory (zero-copy), submits them to io_uring and pushes each used element
//! when its own I/O completes, so requests are in flight concurrently and one
//! slow request does not hold up the queue.
//!
//! One [`QueueWorker`] serves one virtqueue and runs only on that queue's
//! vhost-user worker thread; it shares nothing mutable with other queues.

pub mod integrity;

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{Device, QueueCounters};
use crate::guest::{read_ranges, write_ranges, GuestRange, SECTOR_SIZE};
pub use crate::guest::{GuestMem, GuestMemAtomic};
use crate::pin::policy::{decide, Action, NoStall};
use crate::pin::{Direction, PinConflict, PinHandle, PinRef, Rule};
use crate::report::{gpa_range, ConflictAction, ConflictEvent, Event, EventBody, ReportOp};
use crate::virtio_blk::chain::{parse_chain, Request, RequestType, ID_LEN, SEGMENT_LEN};
use crate::virtio_blk::config::{MAX_DISCARD_SECTORS, MAX_DISCARD_SEG};

/// A vring as vhost-user-backend hands it to the worker.
pub type Vring = VringRwLock<GuestMemAtomic>;

/// A host iovec with the layout of `struct iovec`, but `Send`: the base is a
/// host-virtual address inside mapped guest memory, kept mapped by the
/// `Arc<GuestMem>` of the request that owns it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct HostIovec {
    base: usize,
    len: usize,
}
const _: () = assert!(std::mem::size_of::<HostIovec>() == std::mem::size_of::<libc::iovec>());

/// One DISCARD / WRITE_ZEROES segment, in bytes of the image.
#[derive(Clone, Copy, Debug)]
struct Segment {
    offset: u64,
    len: u64,
    /// fallocate(2) mode used for it.
    mode: i32,
}

/// user_data of the worker's retry timer (io_uring timeout).
const TIMER_TAG: u64 = u64::MAX;
/// Bit set in user_data of a READ's injected completion delay.
const DELAY_TAG: u64 = 1 << 63;
/// How often parked requests are retried while any exist.
const RETRY_INTERVAL: Duration = Duration::from_millis(1);

/// A private buffer a bounced request does its I/O through, 4 KiB-aligned
/// (so it also works with `--direct`).
struct BounceBuf {
    buf: Vec<u8>,
    off: usize,
    len: usize,
}

impl BounceBuf {
    fn new(len: usize) -> BounceBuf {
        let buf = vec![0u8; len + 4096];
        let off = buf.as_ptr().align_offset(4096);
        BounceBuf { buf, off, len }
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[self.off..self.off + self.len]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

/// Where a request stands.
enum State {
    /// Handed to storage (or about to be).
    Running,
    /// Stalled on conflicting pins until they are released or `deadline`.
    Stalled {
        since: Instant,
        deadline: Instant,
        waits: Vec<PinRef>,
        event: Box<Event>,
    },
    /// Waiting for bounce-pool memory.
    PoolWait,
    /// I/O done; completion held back by `--inject-read-delay`.
    Delayed,
}

/// A request submitted to the storage engine and not yet completed.
struct InFlight {
    req: Request,
    id: u64,
    /// Keeps the guest memory mapped while the kernel may access it.
    mem: Arc<GuestMem>,
    iov: Vec<HostIovec>,
    /// Index of the first iovec not yet fully transferred (short transfers).
    iov_start: usize,
    /// Image byte offset of the next transfer.
    offset: u64,
    /// Bytes still to transfer.
    remaining: u64,
    segments: Vec<Segment>,
    ops_pending: u32,
    status: u8,
    used_len: u32,
    /// The pin on the data buffer (READ and WRITE only).
    pin: Option<PinHandle>,
    bounce: Option<BounceBuf>,
    state: State,
    delay_ts: Option<Box<types::Timespec>>,
    /// CRC32C of each 4 KiB chunk of a WRITE's data at submission (R3).
    submitted_crcs: Vec<u32>,
}

/// Why a request is refused before any I/O, with the status it gets.
struct Refusal {
    status: u8,
    why: String,
}

fn ioerr(why: impl Into<String>) -> Refusal {
    Refusal {
        status: VIRTIO_BLK_S_IOERR as u8,
        why: why.into(),
    }
}

/// The data path of one virtqueue.
pub struct QueueWorker {
    dev: Arc<Device>,
    mem: GuestMemAtomic,
    index: u16,
    ring: IoUring,
    eventfd: EventFd,
    slots: Vec<Option<InFlight>>,
    free: Vec<u32>,
    inflight: usize,
    event_idx: bool,
    vring: Option<Vring>,
    needs_signal: bool,
    zero_range_unsupported: bool,
    /// Slots in State::Stalled or State::PoolWait.
    parked: Vec<u32>,
    timer_ts: Box<types::Timespec>,
    timer_pending: bool,
    rng: fastrand::Rng,
    /// Reused buffer for copies of guest data being checksummed.
    scratch: Vec<u8>,
    /// Reused buffer of (user_data, result) of reaped CQEs.
    cqes: Vec<(u64, i32)>,
}

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

impl QueueWorker {
    /// A worker for virtqueue `index` of `dev`, reading guest memory through `mem`.
    ///
    /// # Errors
    /// [`WorkerError::Setup`] if io_uring or its completion eventfd cannot be created.
    pub fn new(dev: Arc<Device>, mem: GuestMemAtomic, index: u16) -> Result<Self, WorkerError> {
        let setup = |source| WorkerError::Setup {
            queue: index,
            source,
        };
        let entries = u32::from(dev.config.queue_size).next_power_of_two().max(8);
        // COOP_TASKRUN (Linux 5.19+): completions are not pushed to this
        // thread by IPI but run at its next kernel entry; the profile showed
        // those interrupts and task switches as the largest cost. Older
        // kernels refuse the flag: fall back to a plain ring.
        let ring = IoUring::builder()
            .setup_coop_taskrun()
            .build(entries)
            .or_else(|_| IoUring::new(entries))
            .map_err(setup)?;
        let eventfd = EventFd::new(EFD_NONBLOCK).map_err(setup)?;
        ring.submitter()
            .register_eventfd(eventfd.as_raw_fd())
            .map_err(setup)?;
        // A stalled request waits on pins of other queues: their unpin wakes
        // this worker through its completion eventfd.
        let waker_fd = eventfd.try_clone().map_err(setup)?;
        dev.pins.set_waker(
            index,
            Some(Arc::new(move || {
                let _ = waker_fd.write(1);
            })),
        );
        Ok(QueueWorker {
            dev,
            mem,
            index,
            ring,
            eventfd,
            slots: Vec::new(),
            free: Vec::new(),
            inflight: 0,
            event_idx: false,
            vring: None,
            needs_signal: false,
            zero_range_unsupported: false,
            parked: Vec::new(),
            timer_ts: Box::new(types::Timespec::from(RETRY_INTERVAL)),
            timer_pending: false,
            rng: fastrand::Rng::new(),
            scratch: Vec::new(),
            cqes: Vec::new(),
        })
    }

    /// The eventfd signalled when io_uring posts completions; register it on
    /// this queue's epoll loop and call [`QueueWorker::complete`] when readable.
    pub fn completion_fd(&self) -> &EventFd {
        &self.eventfd
    }

    /// Enables or disables VIRTIO_RING_F_EVENT_IDX handling.
    pub fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    /// Requests submitted and not yet completed.
    pub fn inflight(&self) -> usize {
        self.inflight
    }

    fn counters(&self) -> &QueueCounters {
        &self.dev.queue_counters[usize::from(self.index)]
    }

    /// Handles a kick: pops every available descriptor chain and starts it.
    pub fn process_queue(&mut self, vring: &Vring) {
        if self.vring.is_none() {
            self.vring = Some(vring.clone());
        }
        loop {
            if self.event_idx {
                if let Err(e) = vring.disable_notification() {
                    log::error!("queue {}: cannot disable notifications: {e}", self.index);
                }
            }
            loop {
                // Snapshot guest memory for each chain, after the avail index
                // was read, so a memory-table change is seen at once.
                let mem = self.mem.memory().into_inner();
                let chain = vring
                    .get_mut()
                    .get_queue_mut()
                    .pop_descriptor_chain(mem.clone());
                let Some(chain) = chain else { break };
                self.start(vring, mem, chain);
            }
            if !self.event_idx {
                break;
            }
            match vring.enable_notification() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    log::error!("queue {}: cannot enable notifications: {e}", self.index);
                    break;
                }
            }
        }
        self.submit();
        self.signal(vring);
    }

    /// Handles the completion eventfd: completes every finished request.
    pub fn complete(&mut self, vring: &Vring) {
        let _ = self.eventfd.read();
        self.reap();
        self.retry_parked(false);
        self.submit();
        self.signal(vring);
    }

    /// Waits until every in-flight request has completed and its used element
    /// is pushed (vhost-user GET_VRING_BASE, disconnect, shutdown).
    pub fn drain(&mut self) {
        // End every stall now (as a timeout): nothing may wait past a drain.
        self.retry_parked(true);
        while self.inflight > 0 {
            self.submit();
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.raw_os_error() != Some(libc::EINTR) {
                    log::error!("queue {}: io_uring wait failed: {e}", self.index);
                    break;
                }
            }
            self.reap();
            self.retry_parked(true);
        }
        if let Some(v) = self.vring.clone() {
            self.signal(&v);
        }
    }

    fn submit(&mut self) {
        if let Err(e) = self.ring.submit() {
            if e.raw_os_error() != Some(libc::EBUSY) && e.raw_os_error() != Some(libc::EINTR) {
                log::error!("queue {}: io_uring submit failed: {e}", self.index);
            }
        }
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

    /// Pushes a used element for `head` after writing `status` (if it has a status byte).
    fn push_used(
        &mut self,
        mem: &GuestMem,
        head: u16,
        status_addr: Option<GuestAddress>,
        status: u8,
        used_len: u32,
    ) {
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
            .as_ref()
            .expect("vring is known once a chain was popped");
        if let Err(e) = vring.add_used(head, used_len) {
            log::error!("queue {}: cannot add used element {head}: {e}", self.index);
        }
        self.needs_signal = true;
    }

    fn start(
        &mut self,
        vring: &Vring,
        mem: Arc<GuestMem>,
        chain: virtio_queue::DescriptorChain<Arc<GuestMem>>,
    ) {
        let _ = vring;
        let req = match parse_chain(chain) {
            Ok(req) => req,
            Err(bad) => {
                log::warn!(
                    "queue {}: malformed descriptor chain (head {}): {}; {}",
                    self.index,
                    bad.head,
                    bad.error,
                    if bad.status_addr.is_some() {
                        "completing with IOERR"
                    } else {
                        "no status byte, completing with length 0"
                    }
                );
                if bad.status_addr.is_none() {
                    self.counters().dropped.fetch_add(1, Ordering::Relaxed);
                }
                let used = u32::from(bad.status_addr.is_some());
                self.push_used(
                    &mem,
                    bad.head,
                    bad.status_addr,
                    VIRTIO_BLK_S_IOERR as u8,
                    used,
                );
                return;
            }
        };
        let id = self.dev.next_request_id();
        match self.prepare(&mem, &req) {
            Err(r) => {
                log::warn!(
                    "queue {} request {id}: {} sector {} len {}: {}",
                    self.index,
                    req.kind.name(),
                    req.sector,
                    req.data_len,
                    r.why
                );
                self.push_used(&mem, req.head, Some(req.status_addr), r.status, 1);
            }
            Ok(Prepared::Done { used_len }) => self.push_used(
                &mem,
                req.head,
                Some(req.status_addr),
                VIRTIO_BLK_S_OK as u8,
                used_len,
            ),
            Ok(Prepared::Io { iov, segments }) => {
                let offset = req.sector * SECTOR_SIZE;
                let remaining = u64::from(req.data_len);
                let used_len = match req.kind {
                    RequestType::In => req.data_len + 1,
                    _ => 1,
                };
                let f = InFlight {
                    req,
                    id,
                    mem,
                    iov,
                    iov_start: 0,
                    offset,
                    remaining,
                    segments,
                    ops_pending: 0,
                    status: VIRTIO_BLK_S_OK as u8,
                    used_len,
                    pin: None,
                    bounce: None,
                    state: State::Running,
                    delay_ts: None,
                    submitted_crcs: Vec::new(),
                };
                let slot = match self.free.pop() {
                    Some(s) => s,
                    None => {
                        self.slots.push(None);
                        (self.slots.len() - 1) as u32
                    }
                };
                self.slots[slot as usize] = Some(f);
                self.inflight += 1;
                self.admit(slot);
            }
        }
    }

    fn slot(&mut self, slot: u32) -> &mut InFlight {
        self.slots[slot as usize].as_mut().expect("slot is in use")
    }

    /// Pins a READ's or WRITE's data buffer, checks it for conflicts (R1, R2,
    /// long-term pins) and carries out the policy; other requests go straight
    /// to storage.
    fn admit(&mut self, slot: u32) {
        let index = self.index;
        let dev = self.dev.clone();
        let f = self.slot(slot);
        let is_write = match f.req.kind {
            RequestType::Out => true,
            RequestType::In => false,
            _ => return self.issue(slot),
        };
        if !dev.pin_tracking {
            let bounce = is_write && dev.policy.bounce_always;
            return self.go(slot, bounce, false);
        }
        let dir = if is_write {
            Direction::DeviceRead
        } else {
            Direction::DeviceWrite
        };
        let pin = dev.pins.pin(index, f.id, dir, &f.req.data);
        let conflicts = dev.pins.check(&pin, &f.req.data);
        f.pin = Some(pin);
        let (action, no_stall) = decide(&dev.policy, is_write, &conflicts);
        if conflicts.is_empty() {
            return self.go(slot, action == Action::Bounce, false);
        }
        let event = conflict_event(index, f, &conflicts, &dev, action, no_stall);
        match action {
            Action::ZeroCopy | Action::Bounce => {
                emit(&dev, &event);
                self.go(slot, action == Action::Bounce, false)
            }
            Action::Fail => {
                emit(&dev, &event);
                self.slot(slot).status = VIRTIO_BLK_S_IOERR as u8;
                self.finish(slot)
            }
            Action::Stall => {
                let waits: Vec<PinRef> = conflicts
                    .iter()
                    .map(|c| c.by.pin)
                    .filter(|p| dev.pins.watch(p, index))
                    .collect();
                let now = Instant::now();
                self.slot(slot).state = State::Stalled {
                    since: now,
                    deadline: now + dev.policy.stall_timeout,
                    waits,
                    event: Box::new(event),
                };
                self.parked.push(slot);
                self.arm_timer();
            }
        }
    }

    /// Sends slot `slot` to storage, through a bounce buffer if `bounce`. If
    /// the bounce pool is exhausted the request waits (parked) for memory,
    /// unless `force` (teardown), which lets the pool overflow.
    fn go(&mut self, slot: u32, bounce: bool, force: bool) {
        if bounce && self.slot(slot).bounce.is_none() && !self.take_bounce(slot, force) {
            self.slot(slot).state = State::PoolWait;
            self.parked.push(slot);
            self.arm_timer();
            return;
        }
        let dev = self.dev.clone();
        let f = self.slot(slot);
        f.state = State::Running;
        if let Some(pin) = &f.pin {
            dev.pins.mark_submitted(pin);
        }
        self.integrity_submit(slot);
        self.issue(slot)
    }

    /// Gives slot `slot` a bounce buffer (a WRITE's data copied into it) and
    /// points its iovec at it. `false` if the pool has no room for it now.
    fn take_bounce(&mut self, slot: u32, force: bool) -> bool {
        let dev = self.dev.clone();
        let f = self.slot(slot);
        let len = u64::from(f.req.data_len);
        let limit = dev.policy.bounce_pool_bytes;
        let reserved =
            dev.bounce_in_use
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                    // An empty pool always serves one request, however large.
                    (force || used == 0 || used + len <= limit).then_some(used + len)
                });
        if reserved.is_err() {
            return false;
        }
        let mut b = BounceBuf::new(len as usize);
        if f.req.kind == RequestType::Out {
            if let Err(e) = read_ranges(&*f.mem, &f.req.data, 0, b.bytes_mut()) {
                log::warn!(
                    "request {}: cannot copy guest data to the bounce buffer: {e}",
                    f.id
                );
                f.status = VIRTIO_BLK_S_IOERR as u8;
            }
        }
        f.iov = vec![HostIovec {
            base: b.bytes().as_ptr() as usize,
            len: b.len,
        }];
        f.iov_start = 0;
        f.bounce = Some(b);
        true
    }

    /// Pushes the retry timer (an io_uring timeout) unless one is pending.
    fn arm_timer(&mut self) {
        if self.timer_pending {
            return;
        }
        let sqe = opcode::Timeout::new(&*self.timer_ts as *const types::Timespec)
            .build()
            .user_data(TIMER_TAG);
        // SAFETY: the timespec is owned by `self` (boxed, never replaced) and
        // outlives the SQE; a timeout carries no other pointer.
        while unsafe { self.ring.submission().push(&sqe) }.is_err() {
            self.submit();
        }
        self.timer_pending = true;
    }

    /// Retries parked requests: a stall ends when every pin it waits on is
    /// released (zero-copy), or at its deadline or when `force` (bounce); a
    /// request waiting for bounce memory tries the pool again.
    fn retry_parked(&mut self, force: bool) {
        if self.parked.is_empty() {
            return;
        }
        let dev = self.dev.clone();
        let now = Instant::now();
        for slot in std::mem::take(&mut self.parked) {
            let f = self.slot(slot);
            match std::mem::replace(&mut f.state, State::Running) {
                State::Stalled {
                    since,
                    deadline,
                    waits,
                    mut event,
                } => {
                    let released = waits.iter().all(|w| dev.pins.is_released(w));
                    if released || force || now >= deadline {
                        if let EventBody::Conflict(c) = &mut event.body {
                            c.stall_us = Some(since.elapsed().as_micros() as u64);
                            c.action = if released {
                                ConflictAction::Stall
                            } else {
                                ConflictAction::StallTimeoutBounce
                            };
                        }
                        emit(&dev, &event);
                        self.go(slot, !released, force);
                    } else {
                        f.state = State::Stalled {
                            since,
                            deadline,
                            waits,
                            event,
                        };
                        self.parked.push(slot);
                    }
                }
                State::PoolWait => self.go(slot, true, force),
                other => f.state = other,
            }
        }
        if !self.parked.is_empty() {
            self.arm_timer();
        }
    }

    /// Checks a parsed request against the device and prepares its I/O.
    fn prepare(&mut self, mem: &GuestMem, req: &Request) -> Result<Prepared, Refusal> {
        let cfg = &self.dev.config;
        let capacity = self.dev.image.capacity_sectors();
        match req.kind {
            RequestType::In | RequestType::Out => {
                if req.kind == RequestType::Out && cfg.read_only {
                    return Err(ioerr("write to a read-only device"));
                }
                let lbs = u64::from(cfg.logical_block_size);
                let len = u64::from(req.data_len);
                if !len.is_multiple_of(lbs) {
                    return Err(ioerr(format!(
                        "length {len} is not a multiple of the {lbs}-byte logical block"
                    )));
                }
                if !req.sector.wrapping_mul(SECTOR_SIZE).is_multiple_of(lbs) {
                    return Err(ioerr(format!(
                        "sector {} is not aligned to the {lbs}-byte logical block",
                        req.sector
                    )));
                }
                let end = req.sector.checked_add(len / SECTOR_SIZE);
                if end.is_none_or(|e| e > capacity) {
                    return Err(ioerr(format!("past capacity ({capacity} sectors)")));
                }
                if self.dev.null {
                    let used_len = if req.kind == RequestType::In {
                        req.data_len + 1
                    } else {
                        1
                    };
                    return Ok(Prepared::Done { used_len });
                }
                let iov = host_iovecs(mem, &req.data).map_err(ioerr)?;
                Ok(Prepared::Io {
                    iov,
                    segments: Vec::new(),
                })
            }
            RequestType::Flush => Ok(Prepared::Io {
                iov: Vec::new(),
                segments: Vec::new(),
            }),
            RequestType::GetId => {
                let mut id = [0u8; ID_LEN];
                let serial = cfg.serial.as_bytes();
                let n = serial.len().min(ID_LEN);
                id[..n].copy_from_slice(&serial[..n]);
                let n = (req.data_len as usize).min(ID_LEN);
                write_ranges(mem, &req.data, 0, &id[..n])
                    .map_err(|e| ioerr(format!("cannot write id: {e}")))?;
                Ok(Prepared::Done {
                    used_len: n as u32 + 1,
                })
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                if cfg.read_only {
                    return Err(ioerr(format!("{} on a read-only device", req.kind.name())));
                }
                let len = req.data_len as usize;
                if len == 0
                    || !len.is_multiple_of(SEGMENT_LEN)
                    || len / SEGMENT_LEN > MAX_DISCARD_SEG as usize
                {
                    return Err(ioerr(format!("{len} bytes of segments: not 1..={MAX_DISCARD_SEG} segments of {SEGMENT_LEN} bytes")));
                }
                let mut buf = vec![0u8; len];
                read_ranges(mem, &req.data, 0, &mut buf)
                    .map_err(|e| ioerr(format!("cannot read segments: {e}")))?;
                let mut segments = Vec::with_capacity(len / SEGMENT_LEN);
                for s in buf.chunks_exact(SEGMENT_LEN) {
                    let sector = u64::from_le_bytes(s[0..8].try_into().unwrap());
                    let num = u32::from_le_bytes(s[8..12].try_into().unwrap());
                    let flags = u32::from_le_bytes(s[12..16].try_into().unwrap());
                    let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
                    if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0
                        || (unmap && req.kind == RequestType::Discard)
                    {
                        return Err(Refusal {
                            status: VIRTIO_BLK_S_UNSUPP as u8,
                            why: format!("segment flags {flags:#x} not supported"),
                        });
                    }
                    if num > MAX_DISCARD_SECTORS {
                        return Err(ioerr(format!(
                            "segment of {num} sectors exceeds {MAX_DISCARD_SECTORS}"
                        )));
                    }
                    if sector
                        .checked_add(u64::from(num))
                        .is_none_or(|e| e > capacity)
                    {
                        return Err(ioerr(format!(
                            "segment {sector}+{num} past capacity ({capacity} sectors)"
                        )));
                    }
                    let mode = if req.kind == RequestType::Discard || unmap {
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                    } else {
                        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                    };
                    if num > 0 {
                        segments.push(Segment {
                            offset: sector * SECTOR_SIZE,
                            len: u64::from(num) * SECTOR_SIZE,
                            mode,
                        });
                    }
                }
                Ok(Prepared::Io {
                    iov: Vec::new(),
                    segments,
                })
            }
            RequestType::Unsupported(t) => Err(Refusal {
                status: VIRTIO_BLK_S_UNSUPP as u8,
                why: format!("unknown request type {t}"),
            }),
        }
    }

    /// Pushes the SQEs of slot `slot` (all of them for a new request, the rest
    /// of a short transfer otherwise). Completes at once if there is nothing to do.
    fn issue(&mut self, slot: u32) {
        let fd = types::Fd(self.dev.image.file().as_raw_fd());
        let f = self.slots[slot as usize]
            .as_mut()
            .expect("issued slot is in use");
        let mut sqes = Vec::new();
        match f.req.kind {
            RequestType::In | RequestType::Out => {
                if f.remaining == 0 {
                    return self.finish(slot);
                }
                let iov = &f.iov[f.iov_start..];
                let ptr = iov.as_ptr() as *const libc::iovec;
                let n = iov.len().min(libc::UIO_MAXIOV as usize) as u32;
                let e = if f.req.kind == RequestType::In {
                    opcode::Readv::new(fd, ptr, n).offset(f.offset).build()
                } else {
                    opcode::Writev::new(fd, ptr, n).offset(f.offset).build()
                };
                sqes.push(e.user_data(u64::from(slot)));
            }
            RequestType::Flush => {
                sqes.push(
                    opcode::Fsync::new(fd)
                        .flags(types::FsyncFlags::DATASYNC)
                        .build()
                        .user_data(u64::from(slot)),
                );
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                if f.segments.is_empty() {
                    return self.finish(slot);
                }
                for (i, s) in f.segments.iter().enumerate() {
                    sqes.push(
                        opcode::Fallocate::new(fd, s.len)
                            .offset(s.offset)
                            .mode(s.mode)
                            .build()
                            .user_data(u64::from(slot) | ((i as u64) << 32)),
                    );
                }
            }
            RequestType::GetId | RequestType::Unsupported(_) => {
                unreachable!("completed without I/O")
            }
        }
        f.ops_pending += sqes.len() as u32;
        for sqe in sqes {
            loop {
                // SAFETY: the SQE points at iovecs in `f.iov`, which stays
                // allocated in its slot until the CQE is reaped; each iovec
                // points into guest memory mapped by `f.mem`, which the slot
                // keeps alive (Arc) until then. Fsync/Fallocate carry no
                // pointers. The image fd outlives the ring (both owned via self).
                let pushed = unsafe { self.ring.submission().push(&sqe) };
                if pushed.is_ok() {
                    break;
                }
                // Submission queue full: hand what we have to the kernel.
                self.submit();
            }
        }
    }

    /// Reaps every available CQE.
    fn reap(&mut self) {
        // Reused between calls: no allocation per batch.
        let mut cqes = std::mem::take(&mut self.cqes);
        loop {
            cqes.clear();
            cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            if cqes.is_empty() {
                break;
            }
            for &(ud, res) in &cqes {
                self.on_cqe(ud, res);
            }
        }
        self.cqes = cqes;
    }

    fn on_cqe(&mut self, user_data: u64, res: i32) {
        if user_data == TIMER_TAG {
            self.timer_pending = false;
            return;
        }
        if user_data & DELAY_TAG != 0 {
            let slot = (user_data & 0xffff_ffff) as u32;
            self.slot(slot).state = State::Running;
            return self.finish(slot);
        }
        let slot = (user_data & 0xffff_ffff) as u32;
        let op = (user_data >> 32) as usize;
        let index = self.index;
        let Some(f) = self.slots.get_mut(slot as usize).and_then(|s| s.as_mut()) else {
            log::error!("queue {index}: completion for unknown slot {slot}");
            return;
        };
        f.ops_pending -= 1;
        match f.req.kind {
            RequestType::In | RequestType::Out => {
                if res < 0 {
                    let e = std::io::Error::from_raw_os_error(-res);
                    log::error!(
                        "queue {index} request {}: {} sector {} len {} failed: {e}",
                        f.id,
                        f.req.kind.name(),
                        f.req.sector,
                        f.req.data_len
                    );
                    f.status = VIRTIO_BLK_S_IOERR as u8;
                } else if res == 0 && f.remaining > 0 {
                    log::error!(
                        "queue {index} request {}: unexpected end of image at byte {}",
                        f.id,
                        f.offset
                    );
                    f.status = VIRTIO_BLK_S_IOERR as u8;
                } else {
                    let mut n = res as u64;
                    f.remaining -= n.min(f.remaining);
                    f.offset += n;
                    if f.remaining > 0 {
                        // Short transfer: skip what was done and go on.
                        while n > 0 {
                            let v = &mut f.iov[f.iov_start];
                            if n >= v.len as u64 {
                                n -= v.len as u64;
                                f.iov_start += 1;
                            } else {
                                v.base += n as usize;
                                v.len -= n as usize;
                                n = 0;
                            }
                        }
                        return self.issue(slot);
                    }
                }
            }
            RequestType::Flush => {
                if res < 0 {
                    log::error!(
                        "queue {index} request {}: FLUSH failed: {}",
                        f.id,
                        std::io::Error::from_raw_os_error(-res)
                    );
                    f.status = VIRTIO_BLK_S_IOERR as u8;
                }
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                if res < 0 {
                    let s = f.segments[op];
                    let zeroing = f.req.kind == RequestType::WriteZeroes;
                    if -res == libc::EOPNOTSUPP && !zeroing {
                        // Discard is a hint (virtio 1.2 §5.2.6): nothing to undo.
                        log::debug!(
                            "queue {index} request {}: punch hole not supported, discard ignored",
                            f.id
                        );
                    } else if -res == libc::EOPNOTSUPP {
                        if !self.zero_range_unsupported {
                            log::info!("image does not support fallocate mode {:#x}; writing zeroes instead", s.mode);
                            self.zero_range_unsupported = true;
                        }
                        let f = self.slots[slot as usize].as_mut().unwrap();
                        if let Err(e) = self.dev.image.write_zeroes_sync(s.offset, s.len) {
                            log::error!(
                                "queue {index} request {}: writing zeroes failed: {e}",
                                f.id
                            );
                            f.status = VIRTIO_BLK_S_IOERR as u8;
                        }
                    } else {
                        log::error!(
                            "queue {index} request {}: {} at byte {} len {} failed: {}",
                            f.id,
                            f.req.kind.name(),
                            s.offset,
                            s.len,
                            std::io::Error::from_raw_os_error(-res)
                        );
                        f.status = VIRTIO_BLK_S_IOERR as u8;
                    }
                }
            }
            RequestType::GetId | RequestType::Unsupported(_) => {}
        }
        let f = self.slots[slot as usize].as_ref().unwrap();
        if f.ops_pending == 0 {
            if f.req.kind == RequestType::In && f.status == VIRTIO_BLK_S_OK as u8 {
                if let Some(delay) = self.dev.policy.read_delay {
                    if self.rng.f64() < self.dev.policy.read_delay_probability {
                        return self.delay(slot, delay);
                    }
                }
            }
            self.finish(slot);
        }
    }

    /// `--inject-read-delay`: holds a completed READ (and its pin) for `delay`.
    fn delay(&mut self, slot: u32, delay: Duration) {
        let f = self.slot(slot);
        f.state = State::Delayed;
        let ts = f.delay_ts.insert(Box::new(types::Timespec::from(delay)));
        let sqe = opcode::Timeout::new(&**ts as *const types::Timespec)
            .build()
            .user_data(u64::from(slot) | DELAY_TAG);
        // SAFETY: the timespec is boxed in the slot, which lives until this
        // timeout's CQE is reaped; a timeout carries no other pointer.
        while unsafe { self.ring.submission().push(&sqe) }.is_err() {
            self.submit();
        }
    }

    /// Completes slot `slot`: bounce copy-out, status byte, used element,
    /// unpin, counters, slot freed.
    fn finish(&mut self, slot: u32) {
        let mut f = self.slots[slot as usize]
            .take()
            .expect("finished slot is in use");
        self.integrity_complete(&mut f);
        if let Some(b) = f.bounce.take() {
            if f.req.kind == RequestType::In && f.status == VIRTIO_BLK_S_OK as u8 {
                if let Err(e) = write_ranges(&*f.mem, &f.req.data, 0, b.bytes()) {
                    log::warn!(
                        "request {}: cannot copy the bounce buffer to the guest: {e}",
                        f.id
                    );
                    f.status = VIRTIO_BLK_S_IOERR as u8;
                }
            }
            self.dev
                .bounce_in_use
                .fetch_sub(b.len as u64, Ordering::AcqRel);
        }
        self.free.push(slot);
        self.inflight -= 1;
        let c = self.counters();
        if f.status == VIRTIO_BLK_S_OK as u8 {
            let len = u64::from(f.req.data_len);
            match f.req.kind {
                RequestType::In => c.bytes_read.fetch_add(len, Ordering::Relaxed),
                RequestType::Out => c.bytes_written.fetch_add(len, Ordering::Relaxed),
                RequestType::Flush => c.flushes.fetch_add(1, Ordering::Relaxed),
                _ => c.discards.fetch_add(1, Ordering::Relaxed),
            };
        }
        let used_len = if f.status == VIRTIO_BLK_S_OK as u8 {
            f.used_len
        } else {
            1
        };
        self.push_used(
            &f.mem,
            f.req.head,
            Some(f.req.status_addr),
            f.status,
            used_len,
        );
        if let Some(pin) = f.pin.take() {
            self.dev.pins.unpin(pin);
        }
    }
}

impl Drop for QueueWorker {
    fn drop(&mut self) {
        // The kernel may still be writing into guest memory: never unmap it
        // (by dropping the slots) under a running request.
        self.drain();
    }
}

/// Logs and records a report event; a failing report file is logged, not fatal.
fn emit(dev: &Device, e: &Event) {
    if let Err(err) = dev.report.emit(e) {
        log::error!("cannot write report event: {err}");
    }
}

/// The `conflict` event of a request (DESIGN.md "Checksums and reports").
fn conflict_event(
    queue: u16,
    f: &InFlight,
    conflicts: &[PinConflict],
    dev: &Device,
    action: Action,
    no_stall: Option<NoStall>,
) -> Event {
    let rule = if conflicts.iter().any(|c| c.rule == Rule::LongTerm) {
        Rule::LongTerm
    } else {
        conflicts[0].rule
    };
    let oldest = conflicts
        .iter()
        .max_by_key(|c| c.by.age)
        .expect("non-empty");
    let mut overlapping: Vec<u64> = conflicts.iter().map(|c| c.by.id).collect();
    overlapping.sort_unstable();
    overlapping.dedup();
    let mut guest_ranges: Vec<String> = conflicts
        .iter()
        .flat_map(|c| {
            c.by.overlap
                .iter()
                .map(|r| gpa_range(r.addr, u64::from(r.len)))
        })
        .collect();
    guest_ranges.dedup();
    Event::new(ConflictEvent {
        request_id: f.id,
        queue,
        op: if f.req.kind == RequestType::Out {
            ReportOp::Write
        } else {
            ReportOp::Read
        },
        sector: f.req.sector,
        length: u64::from(f.req.data_len),
        rule,
        policy: dev.policy.policy,
        action: match action {
            Action::ZeroCopy => ConflictAction::Passthrough,
            Action::Bounce => ConflictAction::Bounce,
            Action::Stall => ConflictAction::Stall,
            Action::Fail => ConflictAction::Fail,
        },
        stall_us: None,
        pin_direction: oldest.by.direction,
        pin_age_us: oldest.by.age.as_micros() as u64,
        overlapping,
        guest_ranges,
        detail: no_stall.map(|n| {
            match n {
                NoStall::LongTerm => "not stalling: a conflicting pin is long-term",
                NoStall::Waiting => "not stalling: a conflicting request is itself waiting",
            }
            .into()
        }),
    })
}

/// What `prepare` decided.
enum Prepared {
    /// Completed without I/O, with this used length.
    Done { used_len: u32 },
    /// I/O to submit.
    Io {
        iov: Vec<HostIovec>,
        segments: Vec<Segment>,
    },
}

/// Translates guest-physical ranges to host iovecs into mapped guest memory.
fn host_iovecs(mem: &GuestMem, ranges: &[GuestRange]) -> Result<Vec<HostIovec>, String> {
    let mut iov = Vec::with_capacity(ranges.len());
    for r in ranges {
        for slice in GuestMemoryBackend::get_slices(mem, GuestAddress(r.addr), r.len as usize) {
            let slice = slice.map_err(|e| format!("buffer {r} is outside guest memory: {e}"))?;
            iov.push(HostIovec {
                base: slice.ptr_guard_mut().as_ptr() as usize,
                len: slice.len(),
            });
        }
    }
    if iov.len() > libc::UIO_MAXIOV as usize {
        return Err(format!("{} host segments exceed IOV_MAX", iov.len()));
    }
    Ok(iov)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod policy_tests;

#[cfg(test)]
pub(crate) mod test_util;
