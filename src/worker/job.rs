//! The state of a request in the worker (docs/DESIGN.md §5): a [`Job`]
//! holds what every stage needs (id, typed request, guest memory, pin,
//! status); what only one stage needs lives in that stage's variant of
//! [`Stage`] or in the request's [`Io`]. The transitions are in `lifecycle.rs`.

use std::sync::Arc;

use smallvec::SmallVec;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::GuestMem;
use crate::guest::{one_region, GuestRange};
use crate::integrity::ranges::{Access, RangeTicket};
use crate::integrity::FlushTicket;
use crate::integrity::BLOCK_SIZE;
use crate::pin::{PinHandle, PinRef};
use crate::report::Event;
use crate::storage::engine::IoVec;
use crate::virtio_blk::{Command, Request, Segment};

/// A request between parsed and done.
pub(super) struct Job {
    /// Request id, unique per process (reports name requests by it).
    pub id: u64,
    /// The typed request.
    pub req: Request,
    /// Keeps the guest memory mapped while storage may access it.
    pub mem: Arc<GuestMem>,
    /// The pin on the data buffer (READ and WRITE, with pin tracking on).
    pub pin: Option<PinHandle>,
    /// Status byte the driver will get (VIRTIO_BLK_S_*).
    pub status: u8,
    /// Where the job stands.
    pub stage: Stage,
    /// What the job moves.
    pub io: Io,
    /// Its LBA range lock (checksums on): from just before submission until
    /// its checksums are recorded or verified.
    pub range: Option<RangeTicket>,
    /// Image bytes (offset, length) counted in the write-intent record, to
    /// be ended when the job is done.
    pub intent: Option<(u64, u64)>,
}

/// Where a job stands.
pub(super) enum Stage {
    /// Pinned and decided, not yet handed to storage.
    Pinned,
    /// Waiting before submission (see [`Park`]).
    Parked(Park),
    /// Handed to the storage engine, `pending` operations outstanding.
    Submitted {
        /// Operations not yet completed.
        pending: u32,
    },
    /// Storage is done; the completion is held back (`--inject-read-delay`).
    Delayed,
}

/// Why a job waits before submission.
pub(super) enum Park {
    /// Stalled on conflicting pins until they are released or `deadline`.
    Stalled {
        /// When the stall began.
        since: std::time::Instant,
        /// When it ends at the latest (then the job is bounced).
        deadline: std::time::Instant,
        /// The pins waited on.
        waits: Vec<PinRef>,
        /// The conflict event, emitted when the stall ends.
        event: Box<Event>,
    },
    /// Waiting for bounce-pool memory.
    PoolWait,
    /// Waiting for an earlier request on overlapping LBAs (range lock).
    RangeWait,
    /// Done with storage, verified; a bounced READ waiting to copy its data
    /// to the guest until the WRITEs whose source it overlaps are unpinned.
    CopyOut {
        /// The WRITE pins waited on.
        waits: Vec<PinRef>,
        /// When the copy goes ahead anyway.
        deadline: std::time::Instant,
    },
}

/// What a job moves between guest memory and storage.
pub(super) enum Io {
    /// READ or WRITE.
    Transfer(Transfer),
    /// FLUSH, with its place in the write-intent record (checksums on).
    Flush(Option<FlushTicket>),
    /// DISCARD or WRITE_ZEROES: one fallocate per segment.
    Segments(Vec<Segment>),
}

/// A transfer's host iovecs: up to 4 inline (a request with a handful of
/// data descriptors allocates nothing for them), more on the heap. Inline,
/// they live inside the [`Job`]: that is why [`Slots`] never moves a job
/// while it is in a slot.
pub(super) type IoVecs = SmallVec<[IoVec; 4]>;

/// CRC32C of each 4 KiB chunk of a transfer: inline up to 32 KiB (8
/// chunks), so a small WRITE's R3 checksums allocate nothing (a larger one
/// allocates once, beside a copy that costs far more; more inline would
/// grow every job, which moves a few times per request).
pub(super) type ChunkCrcList = SmallVec<[u32; 8]>;

/// A READ's or WRITE's transfer.
pub(super) struct Transfer {
    /// Host buffers: into guest memory (zero-copy) or the bounce buffer.
    pub iov: IoVecs,
    /// First iovec not yet fully transferred (short transfers).
    pub iov_start: usize,
    /// Image byte offset of the next transfer.
    pub offset: u64,
    /// Bytes still to transfer.
    pub remaining: u64,
    /// The private buffer of a bounced request.
    pub bounce: Option<BounceBuf>,
    /// CRC32C of each 4 KiB chunk of the data: for a WRITE, taken at
    /// submission (R3); for a READ, the guard CRCs the storage engine took
    /// as it read (`storage::CrcSink`; only engines that copy the data
    /// themselves fill them), valid when `guard_done`, which R4 then
    /// verifies instead of reading guest memory again.
    pub crcs: ChunkCrcList,
    /// For a WRITE covering blocks only partly: the checksum of each block
    /// it touches, the image's bytes merged with the submitted ones (empty
    /// for aligned writes, whose `crcs` are the block checksums).
    pub block_crcs: Vec<u32>,
    /// A READ's `crcs` are the engine's guard CRCs (set false when the
    /// sink is made, true by the engine).
    pub guard_done: bool,
}

impl Job {
    /// The transfer of a READ or WRITE.
    pub fn transfer(&self) -> Option<&Transfer> {
        match &self.io {
            Io::Transfer(t) => Some(t),
            _ => None,
        }
    }

    /// The bounce buffer, if the request was bounced.
    pub fn bounce(&self) -> Option<&BounceBuf> {
        self.transfer().and_then(|t| t.bounce.as_ref())
    }

    /// Whether this is a WRITE (VIRTIO_BLK_T_OUT).
    pub fn is_write(&self) -> bool {
        matches!(self.req.command, Command::Write { .. })
    }

    /// Whether this is a READ (VIRTIO_BLK_T_IN).
    pub fn is_read(&self) -> bool {
        matches!(self.req.command, Command::Read { .. })
    }
}

/// A private buffer a bounced request does its I/O through, 4 KiB-aligned
/// (so it also works with `--direct`).
pub(super) struct BounceBuf {
    buf: Vec<u8>,
    off: usize,
    len: usize,
}

impl BounceBuf {
    pub(super) fn new(len: usize) -> BounceBuf {
        let buf = vec![0u8; len + 4096];
        let off = buf.as_ptr().align_offset(4096);
        BounceBuf { buf, off, len }
    }

    /// The buffer's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.off..self.off + self.len]
    }

    pub(super) fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.off..self.off + self.len]
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
}

/// Jobs by slot: O(1) insert, lookup and removal; a slot number names a job
/// in the storage engine's tags.
///
/// A job does not move while it is in its slot: each slot is a box of its
/// own, allocated when the slot is first used and reused after, so growing
/// the table moves only the boxes' pointers. The storage engine reads a
/// transfer's iovec array, inline in the job ([`IoVecs`]), until the job's
/// last completion is reaped.
#[derive(Default)]
pub(super) struct Slots {
    #[allow(
        clippy::vec_box,
        reason = "boxed so a job stays put when the Vec grows (its iovecs are inline)"
    )]
    slots: Vec<Box<Option<Job>>>,
    free: Vec<u32>,
    len: usize,
    /// An empty box that stands in a slot while [`Slots::take_box`] has its
    /// own out (no allocation per request).
    spare: Option<Box<Option<Job>>>,
}

impl Slots {
    pub(super) fn insert(&mut self, job: Job) -> u32 {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(Box::new(None));
                (self.slots.len() - 1) as u32
            }
        };
        *self.slots[slot as usize] = Some(job);
        self.len += 1;
        slot
    }

    /// The job in `slot`, if any.
    pub fn get_mut(&mut self, slot: u32) -> Option<&mut Job> {
        self.slots
            .get_mut(slot as usize)
            .and_then(|s| (**s).as_mut())
    }

    pub(super) fn take(&mut self, slot: u32) -> Option<Job> {
        let job = self.slots.get_mut(slot as usize)?.take()?;
        self.free.push(slot);
        self.len -= 1;
        Some(job)
    }

    /// Takes `slot`'s box out with its job (which is not copied: a job is a
    /// few hundred bytes and `finish` runs once per request), leaving an
    /// empty box in its place. The job counts as out of the table, as after
    /// [`Slots::take`], but the slot stays reserved until
    /// [`Slots::put_box`] returns the box.
    pub(super) fn take_box(&mut self, slot: u32) -> Option<Box<Option<Job>>> {
        let s = self.slots.get_mut(slot as usize)?;
        if s.is_none() {
            return None;
        }
        let stand_in = self.spare.take().unwrap_or_default();
        let b = std::mem::replace(s, stand_in);
        self.len -= 1;
        Some(b)
    }

    /// Returns a box [`Slots::take_box`] took from `slot`: with a job in
    /// it, that job is in `slot` again; empty, the slot is free.
    pub(super) fn put_box(&mut self, slot: u32, b: Box<Option<Job>>) {
        let held = b.is_some();
        let stand_in = std::mem::replace(&mut self.slots[slot as usize], b);
        debug_assert!(stand_in.is_none(), "slot {slot} was not taken");
        self.spare = Some(stand_in);
        if held {
            self.len += 1;
        } else {
            self.free.push(slot);
        }
    }

    /// The jobs held, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = &Job> {
        self.slots.iter().filter_map(|s| (**s).as_ref())
    }

    /// Jobs held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no job is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Moves a transfer on by `n` bytes done; `true` if bytes remain (a short
/// transfer: its iovecs now start at the first byte not transferred).
pub(super) fn advance(t: &mut Transfer, mut n: u64) -> bool {
    t.remaining -= n.min(t.remaining);
    t.offset += n;
    if t.remaining == 0 {
        return false;
    }
    while n > 0 {
        let v = &mut t.iov[t.iov_start];
        if n >= v.len as u64 {
            n -= v.len as u64;
            t.iov_start += 1;
        } else {
            v.base += n as usize;
            v.len -= n as usize;
            n = 0;
        }
    }
    true
}

/// Translates guest-physical ranges to host iovecs into mapped guest memory.
/// A range inside one region (the common case) takes one region lookup;
/// one over a region border, or outside guest memory, goes through
/// vm-memory's `get_slices` (one iovec per region, or the error).
pub(super) fn host_iovecs(mem: &GuestMem, ranges: &[GuestRange]) -> Result<IoVecs, String> {
    let mut iov = IoVecs::with_capacity(ranges.len());
    for r in ranges {
        if let Some((region, offset)) = one_region(mem, r.addr, u64::from(r.len)) {
            if let Ok(host) = region.get_host_address(MemoryRegionAddress(offset)) {
                iov.push(IoVec {
                    base: host as usize,
                    len: r.len as usize,
                });
                continue;
            }
        }
        for slice in GuestMemoryBackend::get_slices(mem, GuestAddress(r.addr), r.len as usize) {
            let slice = slice.map_err(|e| format!("buffer {r} is outside guest memory: {e}"))?;
            iov.push(IoVec {
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

/// The image bytes a WRITE, DISCARD or WRITE_ZEROES changes, as one extent
/// (offset, length; the hull of a DISCARD's segments); `None` for the others
/// and for empty ones.
pub(super) fn write_extent(req: &Request) -> Option<(u64, u64)> {
    let (start, end) = match &req.command {
        Command::Write { sector } => (sector.bytes(), sector.bytes() + u64::from(req.data_len)),
        Command::Discard(segs) | Command::WriteZeroes(segs) => (
            segs.iter().map(Segment::offset).min()?,
            segs.iter().map(|s| s.offset() + s.len()).max()?,
        ),
        _ => return None,
    };
    (end > start).then_some((start, end - start))
}

/// The 4 KiB checksum blocks (end exclusive) a request's range lock covers
/// and how; `None` for FLUSH, GET_ID and empty requests.
pub(super) fn lba_blocks(req: &Request) -> Option<(std::ops::Range<u64>, Access)> {
    let (start, len, access) = match &req.command {
        Command::Read { sector } => (sector.bytes(), u64::from(req.data_len), Access::Shared),
        _ => {
            let (start, len) = write_extent(req)?;
            (start, len, Access::Exclusive)
        }
    };
    (len > 0).then(|| {
        (
            start / BLOCK_SIZE..(start + len).div_ceil(BLOCK_SIZE),
            access,
        )
    })
}

#[cfg(test)]
mod tests {
    use smallvec::smallvec;

    use super::*;
    use crate::guest::{Ranges, Sector};
    use crate::worker::test_util::guest_memory;

    fn read_job(id: u64, mem: &Arc<GuestMem>) -> Job {
        Job {
            id,
            req: Request {
                head: 0,
                status_addr: GuestAddress(0),
                command: Command::Read { sector: Sector(0) },
                data: Ranges::new(),
                data_len: 512,
            },
            mem: mem.clone(),
            pin: None,
            status: 0,
            stage: Stage::Pinned,
            io: Io::Transfer(Transfer {
                iov: smallvec![IoVec {
                    base: 0x1000,
                    len: 512,
                }],
                iov_start: 0,
                offset: 0,
                remaining: 512,
                bounce: None,
                crcs: ChunkCrcList::new(),
                block_crcs: Vec::new(),
                guard_done: false,
            }),
            range: None,
            intent: None,
        }
    }

    /// A range inside one region becomes one iovec at its host address; one
    /// over a region border one per region; one outside guest memory an error.
    #[test]
    fn host_iovecs_within_and_across_regions() {
        let mem =
            GuestMem::from_ranges(&[(GuestAddress(0), 0x4000), (GuestAddress(0x4000), 0x4000)])
                .unwrap();
        let host =
            |a| GuestMemoryBackend::get_host_address(&mem, GuestAddress(a)).unwrap() as usize;
        let at = |addr, len| GuestRange { addr, len };
        let iov = host_iovecs(
            &mem,
            &[at(0x100, 0x200), at(0x3f00, 0x200), at(0x4000, 0x4000)],
        )
        .unwrap();
        let got: Vec<(usize, usize)> = iov.iter().map(|v| (v.base, v.len)).collect();
        assert_eq!(
            got,
            [
                (host(0x100), 0x200),
                (host(0x3f00), 0x100),
                (host(0x4000), 0x100),
                (host(0x4000), 0x4000),
            ]
        );
        for r in [at(0x7f00, 0x200), at(0x8000, 1), at(u64::MAX, 1)] {
            let err = host_iovecs(&mem, &[at(0x100, 0x200), r]).unwrap_err();
            assert!(err.contains("outside guest memory"), "{r}: {err}");
        }
    }

    /// The storage engine reads a transfer's iovec array, inline in the
    /// job, until the job's last completion: the job must stay where it is
    /// while later jobs take new slots and freed ones.
    #[test]
    fn a_job_does_not_move_while_in_its_slot() {
        let (_, mem) = guest_memory();
        let mut slots = Slots::default();
        let first = slots.insert(read_job(0, &mem));
        let iov_at = |slots: &mut Slots| {
            let t = slots.get_mut(first).unwrap().transfer().unwrap();
            assert!(!t.iov.spilled(), "one iovec is held inline");
            t.iov.as_ptr()
        };
        let at = iov_at(&mut slots);
        let later: Vec<u32> = (1..100)
            .map(|id| slots.insert(read_job(id, &mem)))
            .collect();
        assert_eq!(iov_at(&mut slots), at);
        for s in later.iter().step_by(2) {
            slots.take(*s).unwrap();
        }
        for id in 100..200 {
            slots.insert(read_job(id, &mem));
        }
        assert_eq!(iov_at(&mut slots), at);
        assert_eq!(slots.len(), 150);
    }

    /// R3/R4 and the bounce copy-in view a buffer through the iovecs made
    /// at parse time while they cover it, and through the guest ranges once
    /// a short transfer advanced them: the same bytes either way.
    #[test]
    fn a_job_view_is_its_buffer_before_and_after_a_short_transfer() {
        use vm_memory::Bytes;
        let mem = Arc::new(
            GuestMem::from_ranges(&[(GuestAddress(0), 0x4000), (GuestAddress(0x4000), 0x4000)])
                .unwrap(),
        );
        let bytes: Vec<u8> = (0..0x8000u32).map(|i| (i * 7 % 251) as u8).collect();
        mem.write_slice(&bytes, GuestAddress(0)).unwrap();
        let at = |addr, len| GuestRange { addr, len };
        // Two ranges, the second over the region border: three iovecs.
        let data: Ranges = [at(0x100, 0x200), at(0x3f00, 0x200)].into_iter().collect();
        let want: Vec<u8> = [&bytes[0x100..0x300], &bytes[0x3f00..0x4100]].concat();
        let mut job = read_job(1, &mem);
        job.req.data = data.clone();
        job.req.data_len = 0x400;
        let Io::Transfer(t) = &mut job.io else {
            unreachable!()
        };
        t.iov = host_iovecs(&mem, &data).unwrap();
        t.remaining = 0x400;
        let first_iov = t.iov[0].base;
        let view = |job: &Job| {
            super::super::memory::with_job_view(job, |v| {
                let mut out = vec![0u8; v.iter().map(|s| s.len()).sum()];
                super::super::memory::gather(&mut out, v);
                (out, v[0].as_ptr() as usize)
            })
            .unwrap()
        };
        assert_eq!(view(&job), (want.clone(), first_iov), "through the iovecs");
        let Io::Transfer(t) = &mut job.io else {
            unreachable!()
        };
        assert!(advance(t, 0x80), "a short transfer");
        let host = GuestMemoryBackend::get_host_address(&*mem, GuestAddress(0x100)).unwrap();
        assert_eq!(
            view(&job),
            (want, host as usize),
            "through the guest ranges"
        );
    }

    /// `finish` takes a job's box out instead of the job: the job keeps its
    /// address, is out of the count meanwhile, and its slot is neither
    /// handed to a new job nor listed until the box comes back.
    #[test]
    fn a_taken_box_keeps_its_slot_until_it_is_put_back() {
        let (_, mem) = guest_memory();
        let mut slots = Slots::default();
        let a = slots.insert(read_job(1, &mem));
        let b = slots.insert(read_job(2, &mem));
        let at = slots.get_mut(a).unwrap() as *const Job;
        let boxed = slots.take_box(a).unwrap();
        assert_eq!((*boxed).as_ref().unwrap() as *const Job, at, "not moved");
        assert_eq!(slots.len(), 1);
        assert!(slots.get_mut(a).is_none() && slots.take_box(a).is_none());
        assert_eq!(slots.iter().map(|j| j.id).collect::<Vec<_>>(), [2]);
        let c = slots.insert(read_job(3, &mem));
        assert!(c != a && c != b, "a taken slot is not free");
        // Put back with its job (a parked copy-out): the same slot again.
        slots.put_box(a, boxed);
        assert_eq!(slots.len(), 3);
        assert_eq!(slots.get_mut(a).unwrap() as *const Job, at);
        // Put back empty (finished): the slot is free for the next job.
        let mut boxed = slots.take_box(a).unwrap();
        *boxed = None;
        slots.put_box(a, boxed);
        assert_eq!(slots.len(), 2);
        assert_eq!(slots.insert(read_job(4, &mem)), a);
    }
}
