//! The `--aio mmap` engine ([`super::Engine::Mapped`]; docs/DESIGN.md §6,
//! "Engines"): READ and WRITE are copies between the request's buffers and
//! a `MAP_SHARED` mapping of the image, made inside [`super::Engine::push`]
//! on the queue's thread, and complete at once; FLUSH, DISCARD,
//! WRITE_ZEROES, the store's sync and timers go to io_uring as usual (the
//! page cache is one: fdatasync(2) writes back pages dirtied through the
//! mapping, fallocate(2) unmaps what it punches).
//!
//! A copy of at least [`COPIER_MIN`] bytes is not made on the queue's
//! thread but handed to the engine's copier thread, and completes
//! asynchronously (its completion signals the same eventfd as io_uring's):
//! the queue's thread meanwhile parses, pins and checksums the next
//! requests (R3, R4), as it does while io_uring's kernel workers copy. On a
//! 2-core machine that pipeline is where a 128 KiB request's checksums stop
//! costing throughput (docs/DESIGN.md §10). A large READ is still copied
//! inline while the copier has a copy it has not finished, so that both
//! threads copy (a READ leaves the queue's thread little else to do); a
//! large WRITE always goes to the copier (the queue's thread has its R3
//! checksums to take).
//!
//! A SIGBUS in the mapping (the file truncated under it, or tmpfs unable to
//! allocate a page for a hole) is absorbed by [`crate::sigbus`]; the engine
//! then drops the mapping, logs why, and redoes that operation and every
//! later one through io_uring, which answers with the file's data or a
//! real errno (ENOSPC, EIO) instead of a signal.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::{CrcSink, IoVec, Op, Tag, UringEngine};
use crate::sigbus::{self, WatchedMapping};

/// Smallest READ or WRITE (bytes) handed to the copier thread; smaller ones
/// are copied inline. A hand-off costs a few microseconds (a futex wake,
/// an eventfd write, a second thread's cache misses; an estimate, of the
/// order of copying 32 KiB here), so only copies well above that gain from
/// it. Measured only at 128 KiB: a sequential READ ran 1.42x
/// qemu-storage-daemon through the copier against 1.07x copied inline.
pub const COPIER_MIN: usize = 64 * 1024;

/// A shared mapping of the whole image, watched for SIGBUS.
struct ImageMap {
    /// Host-virtual address of image byte 0.
    base: usize,
    /// Bytes mapped (the image size served).
    len: usize,
    /// Mapped `PROT_WRITE` (the image is writable).
    writable: bool,
    /// The SIGBUS watch; dropped before the munmap.
    watch: Option<WatchedMapping>,
}

impl ImageMap {
    /// Maps `len` bytes of `file` (read-write when `writable`).
    fn new(file: &File, len: usize, writable: bool) -> io::Result<ImageMap> {
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        // SAFETY: a new shared mapping of an open file chosen by the kernel
        // (no MAP_FIXED), so no existing memory is affected; it stays valid
        // until the munmap in Drop, and is only touched through raw pointers.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = p as usize;
        let mut map = ImageMap {
            base,
            len,
            writable,
            watch: None,
        };
        map.watch =
            Some(sigbus::watch_mapping(base, len).ok_or_else(|| {
                io::Error::other("no SIGBUS watch slot left for the image mapping")
            })?);
        Ok(map)
    }

    /// `op` as a [`RawOp`] if this mapping can do it; `None` when it is not
    /// a READ or WRITE, reaches past the mapped end, is a WRITE on a
    /// read-only mapping, or is over `i32::MAX` bytes: the caller sends it
    /// to io_uring.
    fn fits(&self, op: &Op<'_>) -> Option<RawOp> {
        let (offset, iov, write, sink) = match *op {
            Op::Read { offset, iov } => (offset, iov, false, None),
            Op::ReadGuarded { offset, iov, crcs } => (offset, iov, false, Some(crcs)),
            Op::Write { offset, iov } if self.writable => (offset, iov, true, None),
            _ => return None,
        };
        let total = iov.iter().try_fold(0usize, |a, v| a.checked_add(v.len))?;
        let start = usize::try_from(offset).ok()?;
        if start.checked_add(total)? > self.len || i32::try_from(total).is_err() {
            return None;
        }
        Some(RawOp {
            offset,
            iov: iov.as_ptr(),
            n: iov.len(),
            total,
            write,
            sink,
        })
    }

    /// Fills a READ's CRC sink (if it has one) from the bytes it copied,
    /// read again from the mapping while they are still in this core's
    /// cache. Call only when the copy did not fault.
    ///
    /// # Safety
    /// As [`ImageMap::copy_raw`].
    unsafe fn guard(&self, raw: &RawOp) {
        let Some(sink) = raw.sink else {
            return;
        };
        // SAFETY: `[offset, offset + total)` lies inside the mapping
        // (`fits`), which stays mapped while `self` lives. A `&[u8]` over
        // shared file pages another queue may be writing: plain bytes with
        // no validity invariant, read once by the CRC; the range locks of
        // the checksum store keep WRITEs off a READ's blocks while it is in
        // flight, so the CRC sees the bytes just copied.
        let data = unsafe {
            std::slice::from_raw_parts((self.base + raw.offset as usize) as *const u8, raw.total)
        };
        // SAFETY: the sink's contract is the caller's (Engine::push).
        unsafe { sink.fill(data) };
    }

    /// Makes the copy `raw` describes; returns its length in bytes.
    ///
    /// # Safety
    /// `raw` came from [`ImageMap::fits`] on this mapping, and its iovec
    /// array and buffers are valid (the [`super::Engine::push`] contract:
    /// until the completion is reaped).
    unsafe fn copy_raw(&self, raw: &RawOp) -> i32 {
        // SAFETY: the iovec array is valid for `n` entries (contract).
        let iov = unsafe { std::slice::from_raw_parts(raw.iov, raw.n) };
        let write = raw.write;
        let mut at = self.base + raw.offset as usize;
        for v in iov {
            let (from, to) = if write {
                (v.base as *const u8, at as *mut u8)
            } else {
                (at as *const u8, v.base as *mut u8)
            };
            // SAFETY: `[at, at + v.len)` lies inside the mapping (checked
            // by `fits`: offset + total <= len), which stays mapped while `self`
            // lives; `[v.base, v.base + v.len)` is valid (the caller's
            // contract) and is guest memory or a private bounce buffer,
            // never the image mapping, so the two do not overlap. Other
            // threads (the guest's vCPUs, other queues) may write either
            // side meanwhile: plain bytes with no validity invariant, no
            // Rust reference held to them; a guest changing its pages
            // under a WRITE is the tearing the checksums catch (R3). A
            // SIGBUS on either side is absorbed (crate::sigbus) and
            // checked by the caller and by the worker (lost guest memory).
            unsafe { std::ptr::copy_nonoverlapping(from, to, v.len) };
            at += v.len;
        }
        raw.total as i32
    }

    fn faulted(&self) -> bool {
        self.watch.as_ref().is_some_and(WatchedMapping::faulted)
    }

    /// Makes the copy `raw` describes and, unless the mapping faulted
    /// meanwhile, fills its guard CRCs: the bytes copied, or `None` after a
    /// SIGBUS in the mapping (the operation must then be redone another way).
    ///
    /// # Safety
    /// As [`ImageMap::copy_raw`].
    unsafe fn transfer(&self, raw: &RawOp) -> Option<i32> {
        // SAFETY: forwarded contract.
        let n = unsafe { self.copy_raw(raw) };
        if self.faulted() {
            return None;
        }
        // SAFETY: forwarded contract; the copy did not fault.
        unsafe { self.guard(raw) };
        Some(n)
    }
}

impl Drop for ImageMap {
    fn drop(&mut self) {
        // Stop the watch first: once unmapped, the range may be reused.
        drop(self.watch.take());
        // SAFETY: `base`/`len` are the mapping made in `new`, unmapped once.
        // This is the last `Arc` of the mapping: the engine's is gone and the
        // copier thread, which holds the other, has been joined, so no copy
        // (inline or the copier's) is running or can start.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

/// A READ or WRITE the mapping can do, with the caller's iovec array by
/// address (valid until its completion is reaped: the
/// [`super::Engine::push`] contract), so it can cross to the copier thread
/// and, after a SIGBUS, be redone through io_uring.
#[derive(Clone, Copy)]
struct RawOp {
    /// Byte offset in the image.
    offset: u64,
    /// The caller's iovec array.
    iov: *const IoVec,
    /// Its entries.
    n: usize,
    /// Bytes in all.
    total: usize,
    /// A WRITE (image ← buffers), else a READ.
    write: bool,
    /// A READ's guard CRCs ([`Op::ReadGuarded`]).
    sink: Option<CrcSink>,
}

impl RawOp {
    /// The operation again, for io_uring.
    ///
    /// # Safety
    /// The iovec array must still be valid (its completion not reaped yet).
    unsafe fn op<'a>(&self) -> Op<'a> {
        // SAFETY: forwarded contract.
        let iov = unsafe { std::slice::from_raw_parts(self.iov, self.n) };
        if self.write {
            Op::Write {
                offset: self.offset,
                iov,
            }
        } else {
            Op::Read {
                offset: self.offset,
                iov,
            }
        }
    }
}

/// An operation handed to the copier thread.
struct CopyJob {
    tag: Tag,
    op: RawOp,
}

// SAFETY: a CopyJob carries addresses, not ownership: the iovec array, the
// buffers it points to and a READ's CRC sink stay valid until the job's
// completion is reaped (the Engine::push contract), which happens only
// after the copier thread has handed the job back (under the mutex, so its
// writes are seen); nothing else in it is thread-bound.
unsafe impl Send for CopyJob {}

/// What the owner and the copier thread share.
struct CopierShared {
    state: Mutex<CopierState>,
    /// Signalled when `todo` gets a job or `stop` is set.
    work: Condvar,
    /// Jobs in `done`, readable without the lock (busy-polling).
    done_count: AtomicUsize,
    /// The engine's completion eventfd (a duplicate): written after each job.
    wake: EventFd,
}

struct CopierState {
    todo: VecDeque<CopyJob>,
    /// Copied jobs with their result (`None`: the mapping faulted).
    done: Vec<(CopyJob, Option<i32>)>,
    stop: bool,
}

/// The engine's copier thread (see the module documentation).
struct Copier {
    shared: Arc<CopierShared>,
    thread: Option<JoinHandle<()>>,
    /// Jobs handed over and not yet reaped.
    in_flight: usize,
}

impl Copier {
    fn start(map: Arc<ImageMap>, wake: EventFd) -> io::Result<Copier> {
        let shared = Arc::new(CopierShared {
            state: Mutex::new(CopierState {
                todo: VecDeque::new(),
                done: Vec::new(),
                stop: false,
            }),
            work: Condvar::new(),
            done_count: AtomicUsize::new(0),
            wake,
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("pinblk-copier".into())
            .spawn(move || copier_loop(&s, &map))?;
        Ok(Copier {
            shared,
            thread: Some(thread),
            in_flight: 0,
        })
    }

    fn lock(&self) -> MutexGuard<'_, CopierState> {
        lock(&self.shared.state)
    }

    fn hand_over(&mut self, job: CopyJob) {
        self.lock().todo.push_back(job);
        self.shared.work.notify_one();
        self.in_flight += 1;
    }

    /// Takes the copied jobs.
    fn take_done(&mut self, into: &mut Vec<(CopyJob, Option<i32>)>) {
        if self.shared.done_count.load(Ordering::Acquire) == 0 {
            return;
        }
        let n = {
            let mut st = lock(&self.shared.state);
            self.shared.done_count.store(0, Ordering::Release);
            let n = st.done.len();
            into.append(&mut st.done);
            n
        };
        self.in_flight -= n;
    }

    /// Whether a copy handed over is not copied yet (queued or being
    /// copied): then the next large copy is made inline, so that both
    /// threads copy.
    fn busy(&self) -> bool {
        self.in_flight > self.shared.done_count.load(Ordering::Acquire)
    }

    fn has_done(&self) -> bool {
        self.shared.done_count.load(Ordering::Acquire) > 0
    }
}

impl Drop for Copier {
    fn drop(&mut self) {
        self.lock().stop = true;
        self.shared.work.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn lock(m: &Mutex<CopierState>) -> MutexGuard<'_, CopierState> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The copier thread: copies jobs in order until told to stop (jobs still
/// waiting then are dropped uncopied).
fn copier_loop(shared: &CopierShared, map: &ImageMap) {
    loop {
        let job = {
            let mut st = lock(&shared.state);
            loop {
                // Stopped: the owner drained every operation first (the
                // Engine contract), so nothing is left; were something
                // left, its buffers may be gone: it is dropped, not copied.
                if st.stop {
                    return;
                }
                if let Some(j) = st.todo.pop_front() {
                    break j;
                }
                st = shared.work.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        };
        // SAFETY: `job.op` came from `fits` on this mapping, and its buffers
        // stay valid until its completion is reaped, after we hand it back.
        let n = unsafe { map.transfer(&job.op) };
        {
            let mut st = lock(&shared.state);
            st.done.push((job, n));
            // Under the lock, so it never counts a job already taken.
            shared.done_count.fetch_add(1, Ordering::AcqRel);
        }
        let _ = shared.wake.write(1);
    }
}

/// The `--aio mmap` engine: see the module documentation.
pub struct MappedEngine {
    pub(super) uring: UringEngine,
    /// `None` once a SIGBUS made it unusable: everything goes to io_uring.
    map: Option<Arc<ImageMap>>,
    /// READ and WRITE completions made in `push`, to be reaped.
    ready: VecDeque<(Tag, i32)>,
    /// Copies of at least [`COPIER_MIN`] bytes (stopped and joined on drop,
    /// before the mapping goes).
    copier: Copier,
    /// Reused buffer of copied jobs (no allocation per reap).
    copied: Vec<(CopyJob, Option<i32>)>,
}

impl MappedEngine {
    pub(super) fn new(
        file: &File,
        entries: u32,
        size: u64,
        writable: bool,
    ) -> io::Result<MappedEngine> {
        let len = usize::try_from(size).map_err(|_| io::Error::other("image too large to map"))?;
        let uring = UringEngine::new(file, entries)?;
        let map = Arc::new(ImageMap::new(file, len, writable)?);
        let copier = Copier::start(map.clone(), uring.eventfd.try_clone()?)?;
        Ok(MappedEngine {
            uring,
            map: Some(map),
            ready: VecDeque::new(),
            copier,
            copied: Vec::new(),
        })
    }

    /// Whether READ and WRITE still go through the mapping (not after a SIGBUS).
    pub fn mapped(&self) -> bool {
        self.map.is_some()
    }

    fn lose_mapping(&mut self) {
        if self.map.take().is_some() {
            log::error!(
                "image mapping raised SIGBUS (the image file was truncated, or its \
                 filesystem could not allocate a page); this queue goes on with io_uring, \
                 starting with that request again"
            );
        }
    }

    /// # Safety
    /// As [`super::Engine::push`].
    pub(super) unsafe fn push(&mut self, op: Op<'_>, tag: Tag) {
        if let Some(map) = &self.map {
            if let Some(raw) = map.fits(&op) {
                if raw.total >= COPIER_MIN && (raw.write || !self.copier.busy()) {
                    self.copier.hand_over(CopyJob { tag, op: raw });
                    return;
                }
                // SAFETY: forwarded contract; `fits` checked the range.
                if let Some(n) = unsafe { map.transfer(&raw) } {
                    self.ready.push_back((tag, n));
                    return;
                }
                self.lose_mapping();
            }
        }
        // SAFETY: forwarded contract.
        unsafe { self.uring.push(op, tag) }
    }

    /// Copies handed to the copier thread and not yet reaped.
    pub(super) fn copying(&self) -> bool {
        self.copier.in_flight > 0
    }

    pub(super) fn has_completions(&mut self) -> bool {
        !self.ready.is_empty() || self.copier.has_done() || self.uring.has_completions()
    }

    /// Submits and blocks until at least one completion is available
    /// (inline, from the copier, or from io_uring).
    pub(super) fn wait(&mut self) -> io::Result<()> {
        loop {
            if !self.ready.is_empty() || self.copier.has_done() {
                return Ok(());
            }
            if self.copier.in_flight == 0 {
                return self.uring.ring.submit_and_wait(1).map(drop);
            }
            // EBUSY and EINTR are normal here too (logged otherwise): the
            // loop checks again, as the engine's other submits do.
            super::submit(&mut self.uring.ring);
            // Reset, check again, then sleep until the copier or io_uring
            // writes the eventfd (bounded: re-checked every 10 ms).
            let _ = self.uring.eventfd.read();
            if self.copier.has_done() || !self.uring.ring.completion().is_empty() {
                return Ok(());
            }
            crate::sys::wait_readable(&self.uring.eventfd, Duration::from_millis(10));
        }
    }

    pub(super) fn reap(&mut self, out: &mut Vec<(Tag, i32)>) {
        out.extend(self.ready.drain(..));
        let mut copied = std::mem::take(&mut self.copied);
        self.copier.take_done(&mut copied);
        for (job, n) in copied.drain(..) {
            if let Some(n) = n {
                out.push((job.tag, n));
                continue;
            }
            self.lose_mapping();
            // SAFETY: the job's completion is not reaped yet, so its iovec
            // array and buffers are still valid (Engine::push contract).
            unsafe { self.uring.push(job.op.op(), job.tag) };
        }
        self.copied = copied;
        self.uring.reap(out);
    }
}

#[cfg(test)]
#[path = "mapped_tests.rs"]
mod tests;
