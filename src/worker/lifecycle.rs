//! A request's life in the worker (docs/DESIGN.md §5), one small function per
//! transition:
//!
//! ```text
//! chain ─start─▶ parsed ─admit─▶ pinned ─go─▶ submitted ─on_completion─▶ completed ─finish─▶ done
//!                 │               │  ▲                      │  (short: resubmit)     (verify: R3/R4,
//!                 │ refused       │  └── parked (stall,     └─▶ delayed (injected)    store; status,
//!                 ▼               ▼       bounce memory)                              used element, unpin)
//!               done            done (policy `fail`)
//! ```
//!
//! The job types are in `job.rs`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use smallvec::smallvec;
use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};

use super::events::{conflict_event, emit};
use super::job::{
    advance, host_iovecs, lba_blocks, write_extent, BounceBuf, ChunkCrcList, Io, Job, Park, Stage,
    Transfer,
};
use super::memory::{gather, guest_memory_lost, with_job_view, Reserve};

use super::{GuestMem, QueueWorker};
use crate::guest::{mark_dirty, write_ranges};
use crate::integrity::{copy_crc32c_blocks, BLOCK_SIZE};
use crate::pin::policy::{decide, Action};
use crate::pin::{Direction, PinRef};
use crate::storage::engine::{Fallocate, IoVec, GUARD_CHUNK};
use crate::storage::{CrcSink, Op, Tag};
use crate::virtio_blk::{parse, Command, Limits, Segment};

pub(super) const OK: u8 = VIRTIO_BLK_S_OK as u8;
pub(super) const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;

impl QueueWorker {
    /// The job in `slot`; a slot named by the worker's own bookkeeping is in use.
    pub(super) fn job(&mut self, slot: u32) -> &mut Job {
        self.jobs.get_mut(slot).expect("slot is in use")
    }

    /// chain → parsed: parses and checks a popped chain; a refused one is
    /// done at once, GET_ID is answered at once, the rest becomes a job.
    pub(super) fn start(
        &mut self,
        mem: Arc<GuestMem>,
        chain: virtio_queue::DescriptorChain<Arc<GuestMem>>,
    ) {
        let limits = Limits {
            capacity: self.dev.image().capacity_sectors(),
            logical_block_size: self.dev.config().logical_block_size,
            read_only: self.dev.config().read_only,
            max_transfer: self.dev.config().max_transfer,
        };
        let req = match parse(chain, &limits) {
            Ok(req) => req,
            Err(refused) => return self.refuse(&mem, refused),
        };
        let id = self.dev.next_request_id();
        let io = match &req.command {
            Command::GetId => return self.get_id(&mem, &req),
            Command::Read { sector } | Command::Write { sector } => {
                match host_iovecs(&mem, &req.data) {
                    Ok(iov) => Io::Transfer(Transfer {
                        iov,
                        iov_start: 0,
                        offset: sector.bytes(),
                        remaining: u64::from(req.data_len),
                        bounce: None,
                        crcs: ChunkCrcList::new(),
                        block_crcs: Vec::new(),
                        guard_done: false,
                    }),
                    Err(why) => {
                        log::warn!(
                            "queue {} request {id}: {} sector {} len {}: {why}",
                            self.index,
                            req.command.name(),
                            sector,
                            req.data_len
                        );
                        return self.push_used(&mem, req.head, Some(req.status_addr), IOERR, 1);
                    }
                }
            }
            Command::Flush => Io::Flush(None),
            Command::Discard(segs) | Command::WriteZeroes(segs) => Io::Segments(segs.clone()),
        };
        let slot = self.jobs.insert(Job {
            id,
            req,
            mem,
            pin: None,
            status: OK,
            stage: Stage::Pinned,
            io,
            range: None,
            intent: None,
        });
        self.admit(slot);
    }

    /// parsed → pinned: pins a READ's or WRITE's data buffer, checks it for
    /// conflicts (R1, R2, long-term pins) and carries out the policy; other
    /// requests go straight to storage.
    fn admit(&mut self, slot: u32) {
        let index = self.index;
        let slot_of_queue = self.slot;
        let dev = &self.dev;
        let job = self.jobs.get_mut(slot).expect("slot is in use");
        let is_write = job.is_write();
        if !matches!(job.io, Io::Transfer(_)) {
            return self.go(slot, false, false);
        }
        if !dev.pin_tracking() {
            let bounce = is_write && dev.policy().bounce_always;
            return self.go(slot, bounce, false);
        }
        let dir = if is_write {
            Direction::DeviceRead
        } else {
            Direction::DeviceWrite
        };
        let pin = dev.pins().pin(slot_of_queue, job.id, dir, &job.req.data);
        let conflicts = dev.pins().check(&pin, &job.req.data);
        job.pin = Some(pin);
        let (action, no_stall) = decide(&dev.policy(), is_write, &conflicts);
        if conflicts.is_empty() {
            return self.go(slot, action == Action::Bounce, false);
        }
        let event = conflict_event(index, job, &conflicts, dev, action, no_stall);
        match action {
            Action::ZeroCopy | Action::Bounce => {
                emit(dev, &event);
                self.go(slot, action == Action::Bounce, false)
            }
            Action::Fail => {
                emit(dev, &event);
                self.job(slot).status = IOERR;
                self.finish(slot)
            }
            Action::Stall => {
                let waits: Vec<PinRef> = conflicts
                    .iter()
                    .map(|c| c.by.pin)
                    .filter(|p| dev.pins().watch(p, slot_of_queue))
                    .collect();
                let now = Instant::now();
                self.park(
                    slot,
                    Park::Stalled {
                        since: now,
                        deadline: now + dev.policy().stall_timeout,
                        waits,
                        event: Box::new(event),
                    },
                );
            }
        }
    }

    /// pinned → submitted: sends the job to storage, through a bounce buffer
    /// if `bounce`. If the bounce pool is exhausted the job is parked until
    /// memory comes back, unless `force` (teardown), which lets the pool
    /// overflow.
    pub(super) fn go(&mut self, slot: u32, bounce: bool, force: bool) {
        if bounce && self.job(slot).bounce().is_none() {
            match self.take_bounce(slot, force) {
                Reserve::Taken => {}
                Reserve::Wait => return self.park(slot, Park::PoolWait),
                Reserve::TooLarge => {
                    self.job(slot).status = IOERR;
                    return self.finish(slot);
                }
            }
        }
        if !self.lock_range(slot) {
            return self.park(slot, Park::RangeWait);
        }
        let dev = &self.dev;
        let job = self.jobs.get_mut(slot).expect("slot is in use");
        if let Some(pin) = &job.pin {
            dev.pins().mark_submitted(pin);
        }
        // The write-intent record goes with the range locks (`--range-tracking`).
        let intent_store = dev.store().filter(|_| dev.ranges().is_some());
        if let (Some(store), Io::Flush(ticket)) = (intent_store, &mut job.io) {
            *ticket = Some(store.flush_begin());
        }
        if let (Some(store), Some((offset, len))) = (intent_store, write_extent(&job.req)) {
            if let Err(e) = store.intent_begin(offset, len) {
                log::error!("request {}: write-intent record: {e}", job.id);
                job.status = IOERR;
                return self.finish(slot);
            }
            job.intent = Some((offset, len));
        }
        self.integrity_submit(slot);
        // The copies just made (bounce, checksums) may have hit guest
        // memory a truncation took away: then nothing goes to storage.
        if guest_memory_lost(self.index, self.job(slot)) {
            self.job(slot).status = IOERR;
            return self.finish(slot);
        }
        self.issue(slot)
    }

    /// Takes (or retries) the job's LBA range lock: shared for a READ,
    /// exclusive for a WRITE, DISCARD or WRITE_ZEROES, on the 4 KiB checksum
    /// blocks it touches. `true` when held (or not needed: no range
    /// tracking, FLUSH, an empty range); `false` while an earlier
    /// overlapping request holds or waits for them.
    fn lock_range(&mut self, slot: u32) -> bool {
        // Field borrows, no Arc clone: two atomic RMWs less per request.
        let Some(ranges) = self.dev.ranges() else {
            return true;
        };
        let slot_of_queue = self.slot;
        let job = self.jobs.get_mut(slot).expect("slot is in use");
        if let Some(t) = &job.range {
            return ranges.try_grant(t);
        }
        let Some((blocks, access)) = lba_blocks(&job.req) else {
            return true;
        };
        let (ticket, granted) = ranges.acquire(slot_of_queue, job.id, blocks, access);
        job.range = Some(ticket);
        granted
    }

    /// Gives the job in `slot` a bounce buffer (a WRITE's data copied into
    /// it) and points its iovec at it, if the bounce caps allow
    /// ([`QueueWorker::reserve_bounce`]).
    fn take_bounce(&mut self, slot: u32, force: bool) -> Reserve {
        let (id, len) = {
            let job = self.job(slot);
            (job.id, u64::from(job.req.data_len))
        };
        let r = self.reserve_bounce(id, len, force);
        if r != Reserve::Taken {
            return r;
        }
        let checksums = self.dev.store().is_some();
        let job = self.job(slot);
        let mut b = BounceBuf::new(len as usize);
        let mut crcs = ChunkCrcList::new();
        if job.is_write() {
            // With checksums on, each 4 KiB is checksummed right after it is
            // copied, while in cache (one pass; R3 needs no second one: the
            // copy is stable). `guest_memory_lost` is asked before submission.
            let dst = b.bytes_mut();
            let copied = with_job_view(job, |src| {
                if checksums {
                    crcs.reserve_exact(dst.len().div_ceil(BLOCK_SIZE as usize));
                    copy_crc32c_blocks(dst, src, |_, c| crcs.push(c));
                } else {
                    gather(dst, src);
                }
            });
            if let Err(e) = copied {
                log::warn!(
                    "request {}: cannot copy guest data to the bounce buffer: {e}",
                    job.id
                );
                job.status = IOERR;
                crcs.clear();
            }
        }
        if let Io::Transfer(t) = &mut job.io {
            t.crcs = crcs;
            t.iov = smallvec![IoVec {
                base: b.bytes().as_ptr() as usize,
                len: b.len(),
            }];
            t.iov_start = 0;
            t.bounce = Some(b);
        }
        Reserve::Taken
    }

    /// Pushes the job's storage operations (all of them for a new job, the
    /// rest of a short transfer otherwise). Completes at once if there is
    /// nothing to do.
    fn issue(&mut self, slot: u32) {
        let guarded = self.dev.store().is_some();
        let job = self.jobs.get_mut(slot).expect("issued slot is in use");
        let mut ops = 0u16;
        let mut push = |engine: &mut crate::storage::Engine, op: Op<'_>| {
            // SAFETY: a transfer's iovecs live in the job's `Transfer` (inline,
            // or on the heap past four), which stays in its slot, neither
            // moved (`Slots` boxes every slot) nor touched, until the last
            // completion of the job is reaped; each iovec points into
            // guest memory kept mapped by the job's `mem` (an Arc) or into its
            // bounce buffer, owned by the same `Transfer`. Other ops carry no
            // pointers.
            unsafe { engine.push(op, Tag::Job { slot, op: ops }) };
            ops += 1;
        };
        let data_len = u64::from(job.req.data_len);
        let read = job.is_read();
        match &mut job.io {
            Io::Transfer(t) => {
                if t.remaining > 0 {
                    let offset = t.offset;
                    // A whole, block-aligned, zero-copy READ with checksums
                    // on asks the engine for guard CRCs (R4 from them).
                    const _: () = assert!(GUARD_CHUNK as u64 == BLOCK_SIZE);
                    let guard = read
                        && guarded
                        && t.bounce.is_none()
                        && t.remaining == data_len
                        && offset.is_multiple_of(BLOCK_SIZE)
                        && data_len.is_multiple_of(BLOCK_SIZE);
                    let iov = &t.iov[t.iov_start..];
                    let op = if guard {
                        t.crcs.clear();
                        t.crcs.resize((data_len / BLOCK_SIZE) as usize, 0);
                        // SAFETY: `crcs` and `guard_done` live in the job's
                        // `Transfer`, which stays in its slot unmoved
                        // (`Slots` boxes every slot) and is not touched
                        // until the READ's completion is reaped.
                        let crcs = unsafe { CrcSink::new(&mut t.crcs, &mut t.guard_done) };
                        Op::ReadGuarded { offset, iov, crcs }
                    } else if read {
                        Op::Read { offset, iov }
                    } else {
                        Op::Write { offset, iov }
                    };
                    push(&mut self.engine, op);
                }
            }
            Io::Flush(_) => {
                // Image and checksum store synced at once, both off this
                // thread; the FLUSH completes when both did.
                push(&mut self.engine, Op::Flush);
                if self.dev.store().is_some() {
                    push(&mut self.engine, Op::SyncStore);
                }
            }
            Io::Segments(segs) => {
                let zeroing = matches!(job.req.command, Command::WriteZeroes(_));
                for s in segs {
                    let how = if zeroing && !s.unmap {
                        Fallocate::ZeroRange
                    } else {
                        Fallocate::PunchHole
                    };
                    push(
                        &mut self.engine,
                        Op::Fallocate {
                            offset: s.offset(),
                            len: s.len(),
                            how,
                        },
                    );
                }
            }
        }
        if ops == 0 {
            return self.finish(slot);
        }
        job.stage = Stage::Submitted {
            pending: u32::from(ops),
        };
    }

    /// submitted → completed: one storage operation of the job in `slot`
    /// completed with `res` (bytes, or a negative errno).
    pub(super) fn on_completion(&mut self, slot: u32, op: u16, res: i32) {
        let index = self.index;
        let Some(job) = self.jobs.get_mut(slot) else {
            log::error!("queue {index}: completion for unknown slot {slot}");
            return;
        };
        if let Stage::Submitted { pending } = &mut job.stage {
            *pending -= 1;
        }
        let err = (res < 0).then(|| std::io::Error::from_raw_os_error(-res));
        match &mut job.io {
            Io::Transfer(t) => {
                if let Some(e) = err {
                    log::error!(
                        "queue {index} request {}: {} sector {} len {} failed: {e}",
                        job.id,
                        job.req.command.name(),
                        job.req.sector(),
                        job.req.data_len
                    );
                    job.status = IOERR;
                } else if res == 0 && t.remaining > 0 {
                    log::error!(
                        "queue {index} request {}: unexpected end of image at byte {}",
                        job.id,
                        t.offset
                    );
                    job.status = IOERR;
                } else if advance(t, res as u64) {
                    // Short transfer: the rest goes to storage again.
                    return self.issue(slot);
                }
            }
            Io::Flush(_) => {
                if let Some(e) = err {
                    log::error!("queue {index} request {}: FLUSH failed: {e}", job.id);
                    job.status = IOERR;
                }
            }
            Io::Segments(segs) => {
                if let Some(e) = err {
                    let zeroing = matches!(job.req.command, Command::WriteZeroes(_));
                    let s = segs[usize::from(op)];
                    if !zeroing && e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                        // The blocks keep their data: their checksums must
                        // stay too (the segment no longer counts as zeroed).
                        segs[usize::from(op)].sectors = 0;
                    }
                    let id = job.id;
                    self.segment_failed(slot, id, s, zeroing, e);
                }
            }
        }
        let job = self.job(slot);
        if matches!(job.stage, Stage::Submitted { pending: 0 }) {
            if job.is_read() && job.status == OK {
                if let Some(delay) = self.dev.policy().read_delay {
                    if self.rng.f64() < self.dev.policy().read_delay_probability {
                        return self.delay(slot, delay);
                    }
                }
            }
            self.finish(slot);
        }
    }

    /// A DISCARD or WRITE_ZEROES segment failed with `e`.
    fn segment_failed(&mut self, slot: u32, id: u64, s: Segment, zeroing: bool, e: std::io::Error) {
        let index = self.index;
        let name = if zeroing { "WRITE_ZEROES" } else { "DISCARD" };
        if e.raw_os_error() == Some(libc::EOPNOTSUPP) && !zeroing {
            // Discard is a hint (virtio 1.2 §5.2.6): nothing to undo.
            log::debug!("queue {index} request {id}: punch hole not supported, discard ignored");
        } else if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
            if !self.zero_range_unsupported {
                log::info!(
                    "image does not support fallocate for WRITE_ZEROES; writing zeroes instead"
                );
                self.zero_range_unsupported = true;
            }
            if let Err(e) = self.dev.image().write_zeroes_sync(s.offset(), s.len()) {
                log::error!("queue {index} request {id}: writing zeroes failed: {e}");
                self.job(slot).status = IOERR;
            }
        } else {
            log::error!(
                "queue {index} request {id}: {name} at byte {} len {} failed: {e}",
                s.offset(),
                s.len()
            );
            self.job(slot).status = IOERR;
        }
    }

    /// completed → done: verifies (R3, R4, checksum store), copies a bounced
    /// READ out, writes the status byte, pushes the used element, unpins and
    /// frees the slot.
    pub(super) fn finish(&mut self, slot: u32) {
        // The job stays in its box (no copy of it); the box is out of the
        // table meanwhile, so `self` can be borrowed beside the job.
        let mut boxed = self.jobs.take_box(slot).expect("finished slot is in use");
        let job = (*boxed).as_mut().expect("a taken box holds its job");
        // Lost guest memory (before, or during the checks' copies): the
        // request fails, and the store takes what the image holds.
        if job.status == OK && guest_memory_lost(self.index, job) {
            job.status = IOERR;
        }
        self.integrity_complete(job);
        if job.status == OK && guest_memory_lost(self.index, job) {
            job.status = IOERR;
        }
        if let (Some(store), Some((offset, len))) = (self.dev.store(), job.intent.take()) {
            store.intent_end(offset, len);
        }
        if let (Some(ranges), Some(t)) = (self.dev.ranges(), job.range.take()) {
            ranges.release(t);
        }
        if let Some(waits) = self.copy_out_waits(job) {
            // A bounced READ whose destination is still the source of a
            // WRITE under DMA: copying now would tear that write. Wait for
            // its unpin (bounded like a stall), then copy out. The job goes
            // back into its slot.
            let deadline = Instant::now() + self.dev.policy().stall_timeout;
            self.jobs.put_box(slot, boxed);
            return self.park(slot, Park::CopyOut { waits, deadline });
        }
        self.done(job);
        *boxed = None;
        self.jobs.put_box(slot, boxed);
    }

    /// The pins a bounced READ must wait for before its data is copied to
    /// the guest: those of WRITEs submitted to storage (so under DMA) whose
    /// source overlaps its destination (R2). `None` when there are none.
    fn copy_out_waits(&self, job: &Job) -> Option<Vec<PinRef>> {
        let dev = &self.dev;
        let pin = job.pin.as_ref()?;
        if !job.is_read() || job.status != OK || job.bounce().is_none() {
            return None;
        }
        let waits: Vec<PinRef> = dev
            .pins()
            .check(pin, &job.req.data)
            .iter()
            .filter(|c| c.by.submitted && c.by.direction == Direction::DeviceRead)
            .map(|c| c.by.pin)
            .filter(|p| dev.pins().watch(p, self.slot))
            .collect();
        (!waits.is_empty()).then_some(waits)
    }

    /// verified → done: copies a bounced READ out, writes the status byte,
    /// pushes the used element, unpins.
    pub(super) fn done(&mut self, job: &mut Job) {
        let (bounce, transfer) = match &mut job.io {
            Io::Transfer(t) => (t.bounce.take(), true),
            _ => (None, false),
        };
        if transfer && bounce.is_none() && job.is_read() {
            // Zero-copy READ: io_uring wrote the guest pages through their
            // host-virtual addresses, which vm-memory's dirty log cannot
            // see. Marked now, before the used element (docs/DESIGN.md §13),
            // whatever the status: a failed or short READ may have written
            // part of them. A READ popped before logging started is marked
            // too (the log is looked up now, not at submission).
            mark_dirty(&job.mem, &job.req.data);
        }
        if let Some(b) = bounce {
            // Not after a failed ring stop: guest memory is the frontend's again.
            if job.is_read() && job.status == OK && !self.abandoned {
                if let Err(e) = write_ranges(&*job.mem, &job.req.data, 0, b.bytes()) {
                    log::warn!(
                        "request {}: cannot copy the bounce buffer to the guest: {e}",
                        job.id
                    );
                    job.status = IOERR;
                }
            }
            self.release_bounce(b.len() as u64);
            if job.status == OK && guest_memory_lost(self.index, job) {
                job.status = IOERR;
            }
        }
        let c = self.counters();
        let len = u64::from(job.req.data_len);
        if job.status == OK {
            match job.req.command {
                Command::Read { .. } => c.bytes_read.fetch_add(len, Ordering::Relaxed),
                Command::Write { .. } => c.bytes_written.fetch_add(len, Ordering::Relaxed),
                Command::Flush => c.flushes.fetch_add(1, Ordering::Relaxed),
                _ => c.discards.fetch_add(1, Ordering::Relaxed),
            };
        }
        let used_len = match job.req.command {
            Command::Read { .. } if job.status == OK => job.req.data_len + 1,
            _ => 1,
        };
        self.push_used(
            &job.mem,
            job.req.head,
            Some(job.req.status_addr),
            job.status,
            used_len,
        );
        if let Some(pin) = job.pin.take() {
            self.dev.pins().unpin(pin);
        }
    }
}
