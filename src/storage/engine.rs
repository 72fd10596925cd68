//! Storage engines: what carries a request's I/O out (docs/DESIGN.md §6).
//!
//! The data path hands an [`Op`] with a [`Tag`] to an [`Engine`], calls
//! [`Engine::submit`], and later [`Engine::reap`]s `(Tag, result)` pairs,
//! where `result` is what the operation returned: bytes transferred, or a
//! negative errno (io_uring's CQE convention). The engine owns the encoding of
//! tags into io_uring `user_data`; its users only see typed tags.
//!
//! - [`Engine::Uring`]: io_uring on the image file (the real data path).
//! - [`Engine::Mapped`]: READ and WRITE are copies through a shared mapping
//!   of the image, made at push, complete at once (`--aio mmap`, [`mapped`]);
//!   the rest goes to io_uring.
//! - [`Engine::Null`]: READ and WRITE complete at once without touching the
//!   image (`--null`, a reference that shows what the rest of the path costs);
//!   FLUSH, DISCARD, WRITE_ZEROES and timers go to io_uring as usual.
//! - `Engine::Fake` (unit tests only): operations wait until the test
//!   completes them, one by one, in any order (`FakeHandle`, test builds only).
//!
//! Shape in the spirit of cloud-hypervisor's `block::async_io::AsyncIo`.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use io_uring::{opcode, types, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::aio::EngineKind;

/// One host buffer of a transfer, laid out as `struct iovec`: `len` bytes at
/// host-virtual address `base` (inside mapped guest memory, or a private
/// bounce buffer). `Send`, unlike `libc::iovec`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoVec {
    /// Host-virtual address of the first byte.
    pub base: usize,
    /// Length in bytes.
    pub len: usize,
}
const _: () = assert!(std::mem::size_of::<IoVec>() == std::mem::size_of::<libc::iovec>());

/// Who an operation belongs to; handed back with its completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tag {
    /// Operation number `op` of the request in worker slot `slot`.
    Job {
        /// The worker's slot of the request.
        slot: u32,
        /// Which of the request's operations (a DISCARD has one per segment).
        op: u16,
    },
    /// The worker's retry timer (parked requests).
    Timer,
    /// The injected completion delay of the READ in `slot` (`--inject-read-delay`).
    Delay {
        /// The worker's slot of the request.
        slot: u32,
    },
}

const TAG_KIND_SHIFT: u32 = 62;
const TAG_JOB: u64 = 0;
const TAG_TIMER: u64 = 1;
const TAG_DELAY: u64 = 2;

impl Tag {
    /// io_uring `user_data`: the kind in bits 62–63, the op in bits 32–47,
    /// the slot in bits 0–31.
    fn encode(self) -> u64 {
        match self {
            Tag::Job { slot, op } => {
                (TAG_JOB << TAG_KIND_SHIFT) | (u64::from(op) << 32) | u64::from(slot)
            }
            Tag::Timer => TAG_TIMER << TAG_KIND_SHIFT,
            Tag::Delay { slot } => (TAG_DELAY << TAG_KIND_SHIFT) | u64::from(slot),
        }
    }

    fn decode(user_data: u64) -> Tag {
        let slot = user_data as u32;
        match user_data >> TAG_KIND_SHIFT {
            TAG_TIMER => Tag::Timer,
            TAG_DELAY => Tag::Delay { slot },
            _ => Tag::Job {
                slot,
                op: (user_data >> 32) as u16,
            },
        }
    }
}

/// How [`Op::Fallocate`] changes a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallocate {
    /// Deallocate it (reads return zeroes): `FALLOC_FL_PUNCH_HOLE`.
    PunchHole,
    /// Zero it, keeping it allocated: `FALLOC_FL_ZERO_RANGE`.
    ZeroRange,
}

impl Fallocate {
    /// The fallocate(2) mode (always with `FALLOC_FL_KEEP_SIZE`).
    pub fn mode(self) -> i32 {
        match self {
            Fallocate::PunchHole => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            Fallocate::ZeroRange => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        }
    }
}

/// Bytes per guard CRC ([`CrcSink`]): the checksum store's 4 KiB block.
pub const GUARD_CHUNK: usize = 4096;

/// Where an engine that makes a READ's copy itself ([`Engine::Mapped`])
/// puts the CRC32C (Castagnoli, as `integrity::crc32c`) of each 4 KiB
/// chunk of the bytes it read, from the first byte (the last chunk may be
/// shorter): guard tags taken by the "device" while the data is in its
/// cache, as a DIX-capable HBA returns them, so that the queue's thread
/// need not read the data again to verify it (R4). `done` is set only when
/// every chunk's CRC was written; an engine that cannot (io_uring, a
/// mapping lost to SIGBUS) leaves it `false`. Addresses, valid until the
/// completion is reaped (the [`Engine::push`] contract).
#[derive(Clone, Copy, Debug)]
pub struct CrcSink {
    crcs: *mut u32,
    n: usize,
    done: *mut bool,
}

impl CrcSink {
    /// A sink for `crcs.len()` chunk CRCs and the `done` flag.
    ///
    /// # Safety
    /// `crcs` and `done` must stay valid and unmoved, and not be accessed
    /// otherwise, until the completion of the operation carrying the sink
    /// is reaped.
    pub unsafe fn new(crcs: &mut [u32], done: &mut bool) -> CrcSink {
        *done = false;
        CrcSink {
            crcs: crcs.as_mut_ptr(),
            n: crcs.len(),
            done,
        }
    }

    /// Fills the sink with the chunk CRCs of `data` (the bytes read) if it
    /// has exactly one slot per chunk, and sets `done`.
    ///
    /// # Safety
    /// The sink's contract ([`CrcSink::new`]) holds.
    pub(super) unsafe fn fill(&self, data: &[u8]) {
        if data.len().div_ceil(GUARD_CHUNK) != self.n {
            return;
        }
        for (i, chunk) in data.chunks(GUARD_CHUNK).enumerate() {
            // SAFETY: i < n, the slots are valid (contract).
            unsafe { *self.crcs.add(i) = crc_fast::crc32_iscsi(chunk) };
        }
        // SAFETY: valid (contract).
        unsafe { *self.done = true };
    }
}

/// One operation on the image. Offsets and lengths are in bytes of the image.
#[derive(Clone, Copy, Debug)]
pub enum Op<'a> {
    /// preadv(2) into `iov` from `offset`.
    Read {
        /// Byte offset in the image.
        offset: u64,
        /// Destination buffers (at most `IOV_MAX`).
        iov: &'a [IoVec],
    },
    /// [`Op::Read`], asking for the chunk CRCs of the bytes read in `crcs`
    /// (filled by engines that copy the data themselves; others read only).
    ReadGuarded {
        /// Byte offset in the image.
        offset: u64,
        /// Destination buffers (at most `IOV_MAX`).
        iov: &'a [IoVec],
        /// Where the CRCs go.
        crcs: CrcSink,
    },
    /// pwritev(2) of `iov` at `offset`.
    Write {
        /// Byte offset in the image.
        offset: u64,
        /// Source buffers (at most `IOV_MAX`).
        iov: &'a [IoVec],
    },
    /// fdatasync(2) of the image.
    Flush,
    /// fdatasync(2) of the checksum store file given to
    /// [`Engine::set_store_file`] (completes with `-EBADF` without one).
    SyncStore,
    /// fallocate(2) of `len` bytes at `offset`.
    Fallocate {
        /// Byte offset in the image.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// What to do with the range.
        how: Fallocate,
    },
    /// Completes (with `-ETIME`) after this long.
    Timeout(Duration),
}

impl Op<'_> {
    /// Total bytes of a READ's or WRITE's buffers (0 for the others).
    fn iov_len(&self) -> usize {
        match self {
            Op::Read { iov, .. } | Op::ReadGuarded { iov, .. } | Op::Write { iov, .. } => {
                iov.iter().map(|v| v.len).sum()
            }
            _ => 0,
        }
    }
}

/// A storage engine of one virtqueue's worker (not shared between threads).
pub enum Engine {
    /// io_uring on the image.
    Uring(UringEngine),
    /// `--aio mmap`: READ and WRITE through a mapping, the rest to io_uring.
    Mapped(MappedEngine),
    /// `--null`: READ and WRITE complete at once, the rest goes to io_uring.
    Null(NullEngine),
    /// Unit tests: operations complete when the test says so.
    #[cfg(test)]
    Fake(FakeEngine),
}

impl Engine {
    /// An io_uring engine on `file` (duplicated: the engine owns its own
    /// descriptor) with `entries` submission entries.
    ///
    /// # Errors
    /// io_uring_setup(2), eventfd(2) or dup(2) failing.
    pub fn uring(file: &File, entries: u32) -> io::Result<Engine> {
        UringEngine::new(file, entries).map(Engine::Uring)
    }

    /// An `--aio mmap` engine on the first `size` bytes of `file`, mapped
    /// read-write when `writable` (else WRITE goes to io_uring, which
    /// refuses it): see [`Engine::Mapped`].
    ///
    /// # Errors
    /// As [`Engine::uring`], and mmap(2) failing.
    pub fn mapped(file: &File, entries: u32, size: u64, writable: bool) -> io::Result<Engine> {
        MappedEngine::new(file, entries, size, writable).map(Engine::Mapped)
    }

    /// A `--null` engine: see [`Engine::Null`].
    ///
    /// # Errors
    /// As [`Engine::uring`].
    pub fn null(file: &File, entries: u32) -> io::Result<Engine> {
        Ok(Engine::Null(NullEngine {
            uring: UringEngine::new(file, entries)?,
            ready: VecDeque::new(),
        }))
    }

    /// A fake engine on `file` and the handle a test completes its operations with.
    #[cfg(test)]
    pub fn fake(file: &File) -> (Engine, FakeHandle) {
        let (e, h) = FakeEngine::new(file);
        (Engine::Fake(e), h)
    }

    /// Which engine this is now (a mapped engine that lost its mapping to
    /// a SIGBUS is io_uring from then on). A test's fake engine counts as
    /// io_uring.
    pub fn kind(&self) -> EngineKind {
        match self {
            Engine::Uring(_) => EngineKind::Uring,
            Engine::Mapped(m) if m.mapped() => EngineKind::Mapped,
            Engine::Mapped(_) => EngineKind::UringAfterSigbus,
            Engine::Null(_) => EngineKind::Null,
            #[cfg(test)]
            Engine::Fake(_) => EngineKind::Uring,
        }
    }

    /// Whether operations may complete inside [`Engine::push`] without the
    /// completion eventfd being signalled (the null and mapped engines): the
    /// caller then reaps right after submitting.
    pub fn completes_inline(&self) -> bool {
        matches!(self, Engine::Null(_) | Engine::Mapped(_))
    }

    /// Whether completions may be waiting to be reaped, checked without a
    /// system call (for busy-polling): the completion queue is not empty,
    /// or the kernel flagged completion work that runs at this thread's
    /// next system call (`IORING_SQ_TASKRUN`: with COOP_TASKRUN completions
    /// are posted then; reading the completion eventfd is one). The null
    /// engine's own completions are reaped inline, but counted too.
    pub fn has_completions(&mut self) -> bool {
        match self {
            Engine::Uring(u) => u.has_completions(),
            Engine::Mapped(m) => m.has_completions(),
            Engine::Null(n) => !n.ready.is_empty() || n.uring.has_completions(),
            #[cfg(test)]
            Engine::Fake(f) => f.has_completions(),
        }
    }

    /// Whether the engine's own copier thread has copies in hand
    /// ([`Engine::Mapped`]): their completions signal the completion
    /// eventfd, and busy-polling for them would take a core from the very
    /// thread doing the work (on the 2-core machines this project measures
    /// on, the queue's poll and the copier then halve each other).
    pub fn copying(&self) -> bool {
        matches!(self, Engine::Mapped(m) if m.copying())
    }

    /// Gives the engine (its own duplicate of) the checksum store's file,
    /// for [`Op::SyncStore`].
    ///
    /// # Errors
    /// dup(2) failing.
    pub fn set_store_file(&mut self, store: &File) -> io::Result<()> {
        let f = Some(store.try_clone()?);
        match self {
            Engine::Uring(u) => u.store = f,
            Engine::Mapped(m) => m.uring.store = f,
            Engine::Null(n) => n.uring.store = f,
            #[cfg(test)]
            Engine::Fake(e) => e.set_store(f),
        }
        Ok(())
    }

    /// The eventfd that becomes readable when completions may be waiting.
    pub fn completion_fd(&self) -> &EventFd {
        match self {
            Engine::Uring(u) => &u.eventfd,
            Engine::Mapped(m) => &m.uring.eventfd,
            Engine::Null(n) => &n.uring.eventfd,
            #[cfg(test)]
            Engine::Fake(f) => &f.handle.eventfd,
        }
    }

    /// Queues `op`; it goes to the kernel at the next [`Engine::submit`] (or
    /// at once if the submission queue is full).
    ///
    /// # Safety
    /// For [`Op::Read`] and [`Op::Write`], the iovec array and every buffer
    /// it points to must stay valid (allocated, mapped, and not moved) until
    /// the completion of `tag` has been returned by [`Engine::reap`]; the
    /// kernel reads and writes them asynchronously.
    pub unsafe fn push(&mut self, op: Op<'_>, tag: Tag) {
        match self {
            // SAFETY: forwarded contract.
            Engine::Uring(u) => unsafe { u.push(op, tag) },
            // SAFETY: forwarded contract.
            Engine::Mapped(m) => unsafe { m.push(op, tag) },
            Engine::Null(n) => match op {
                Op::Read { .. } | Op::ReadGuarded { .. } | Op::Write { .. } => n
                    .ready
                    .push_back((tag, op.iov_len().min(i32::MAX as usize) as i32)),
                // SAFETY: forwarded contract (no buffers in these ops).
                _ => unsafe { n.uring.push(op, tag) },
            },
            #[cfg(test)]
            Engine::Fake(f) => f.push(op, tag),
        }
    }

    /// Hands queued operations to the kernel. Errors are logged (EBUSY and
    /// EINTR are normal: completions are reaped and the submission retried).
    pub fn submit(&mut self) {
        let ring = match self {
            Engine::Uring(u) => &mut u.ring,
            Engine::Mapped(m) => &mut m.uring.ring,
            Engine::Null(n) => &mut n.uring.ring,
            #[cfg(test)]
            Engine::Fake(_) => return,
        };
        submit(ring);
    }

    /// Submits and blocks until at least one completion is available.
    ///
    /// # Errors
    /// io_uring_enter(2) failing (EINTR included: the caller retries).
    pub fn wait(&mut self) -> io::Result<()> {
        match self {
            Engine::Uring(u) => u.ring.submit_and_wait(1).map(drop),
            Engine::Mapped(m) => m.wait(),
            Engine::Null(n) if !n.ready.is_empty() => Ok(()),
            Engine::Null(n) => n.uring.ring.submit_and_wait(1).map(drop),
            #[cfg(test)]
            Engine::Fake(f) => {
                f.wait();
                Ok(())
            }
        }
    }

    /// Appends every available completion to `out` as `(tag, result)`;
    /// `result` is bytes transferred or a negative errno. Does not touch the
    /// completion eventfd (the caller resets it once per wake-up, before
    /// reaping, so a completion posted meanwhile signals it again).
    pub fn reap(&mut self, out: &mut Vec<(Tag, i32)>) {
        match self {
            Engine::Uring(u) => u.reap(out),
            Engine::Mapped(m) => m.reap(out),
            Engine::Null(n) => {
                out.extend(n.ready.drain(..));
                n.uring.reap(out);
            }
            #[cfg(test)]
            Engine::Fake(f) => f.reap(out),
        }
    }
}

fn submit(ring: &mut IoUring) {
    if let Err(e) = ring.submit() {
        if e.raw_os_error() != Some(libc::EBUSY) && e.raw_os_error() != Some(libc::EINTR) {
            log::error!("io_uring submit failed: {e}");
        }
    }
}

/// io_uring on the image file, with a completion eventfd.
pub struct UringEngine {
    ring: IoUring,
    file: File,
    /// The checksum store (for [`Op::SyncStore`]).
    store: Option<File>,
    eventfd: EventFd,
    /// Timespecs of pending timeouts, by encoded tag (the kernel reads them
    /// until the timeout completes).
    timeouts: HashMap<u64, Box<types::Timespec>>,
}

impl UringEngine {
    fn new(file: &File, entries: u32) -> io::Result<UringEngine> {
        // COOP_TASKRUN (Linux 5.19+): completions are not pushed to this
        // thread by IPI but run at its next kernel entry; the profile showed
        // those interrupts and task switches as the largest cost. Older
        // kernels refuse the flag: fall back to a plain ring. TASKRUN_FLAG
        // (also 5.19) tells a busy-polling worker that completions wait for
        // its next kernel entry ([`Engine::has_completions`]).
        let ring = IoUring::builder()
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .build(entries)
            .or_else(|_| IoUring::new(entries))?;
        let eventfd = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        Ok(UringEngine {
            ring,
            file: file.try_clone()?,
            store: None,
            eventfd,
            timeouts: HashMap::new(),
        })
    }

    /// # Safety
    /// As [`Engine::push`].
    unsafe fn push(&mut self, op: Op<'_>, tag: Tag) {
        let fd = types::Fd(self.file.as_raw_fd());
        let ud = tag.encode();
        let sqe = match op {
            Op::Read { offset, iov } | Op::ReadGuarded { offset, iov, .. } => {
                let n = iov.len().min(libc::UIO_MAXIOV as usize) as u32;
                opcode::Readv::new(fd, iov.as_ptr().cast::<libc::iovec>(), n)
                    .offset(offset)
                    .build()
            }
            Op::Write { offset, iov } => {
                let n = iov.len().min(libc::UIO_MAXIOV as usize) as u32;
                opcode::Writev::new(fd, iov.as_ptr().cast::<libc::iovec>(), n)
                    .offset(offset)
                    .build()
            }
            Op::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Op::SyncStore => {
                // -1 is not an fd: the kernel answers EBADF, as documented.
                let store = types::Fd(self.store.as_ref().map_or(-1, |f| f.as_raw_fd()));
                opcode::Fsync::new(store)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build()
            }
            Op::Fallocate { offset, len, how } => opcode::Fallocate::new(fd, len)
                .offset(offset)
                .mode(how.mode())
                .build(),
            Op::Timeout(d) => {
                let ts = self
                    .timeouts
                    .entry(ud)
                    .or_insert_with(|| Box::new(types::Timespec::from(d)));
                **ts = types::Timespec::from(d);
                opcode::Timeout::new(&**ts as *const types::Timespec).build()
            }
        };
        let sqe = sqe.user_data(ud);
        loop {
            // SAFETY: the iovecs and their buffers stay valid until the
            // completion is reaped (the caller's contract); a timeout's
            // timespec is boxed in `self.timeouts` until its completion is
            // reaped; the image fd is owned by `self` and outlives the ring's
            // use of it (the ring is dropped with `self`, after the caller
            // drained every operation). Fsync and Fallocate carry no pointers.
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                break;
            }
            // Submission queue full: hand what we have to the kernel.
            submit(&mut self.ring);
        }
    }

    fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty() || self.ring.submission().taskrun()
    }

    fn reap(&mut self, out: &mut Vec<(Tag, i32)>) {
        for c in self.ring.completion() {
            let tag = Tag::decode(c.user_data());
            if !matches!(tag, Tag::Job { .. }) {
                self.timeouts.remove(&c.user_data());
            }
            out.push((tag, c.result()));
        }
    }
}

/// The `--null` engine: see [`Engine::Null`].
pub struct NullEngine {
    uring: UringEngine,
    /// READ and WRITE completions, ready at once.
    ready: VecDeque<(Tag, i32)>,
}

pub use mapped::MappedEngine;

#[path = "mapped.rs"]
pub mod mapped;

#[cfg(test)]
pub use fake::{FakeEngine, FakeHandle};

#[cfg(test)]
#[path = "fake.rs"]
mod fake;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip() {
        for t in [
            Tag::Job { slot: 0, op: 0 },
            Tag::Job {
                slot: u32::MAX,
                op: u16::MAX,
            },
            Tag::Job { slot: 7, op: 31 },
            Tag::Timer,
            Tag::Delay { slot: 0 },
            Tag::Delay { slot: u32::MAX },
        ] {
            assert_eq!(Tag::decode(t.encode()), t);
        }
    }
}
