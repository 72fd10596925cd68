//! The fake storage engine of unit tests (see `Engine::Fake`).

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{IoVec, Op, Tag};

/// An operation the fake holds until the test completes it.
#[derive(Debug)]
enum Held {
    Read(u64, Vec<IoVec>),
    Write(u64, Vec<IoVec>),
    Flush,
    SyncStore,
    Fallocate(u64, u64, i32),
}

#[derive(Default)]
struct State {
    store: Option<File>,
    held: Vec<(Tag, Held)>,
    ready: VecDeque<(Tag, i32)>,
    timers: Vec<(Instant, Tag)>,
}

/// The test's side of a fake engine: which operations are held, and
/// completing them (the I/O is done on the image file at that moment).
#[derive(Clone)]
pub struct FakeHandle {
    state: Arc<Mutex<State>>,
    file: Arc<File>,
    pub(super) eventfd: Arc<EventFd>,
}

impl FakeHandle {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tags of the operations held, in submission order.
    pub fn held(&self) -> Vec<Tag> {
        self.lock().held.iter().map(|(t, _)| *t).collect()
    }

    /// Carries out the held operation `tag` now and posts its completion;
    /// `false` if no such operation is held.
    pub fn complete(&self, tag: Tag) -> bool {
        let mut st = self.lock();
        let Some(i) = st.held.iter().position(|(t, _)| *t == tag) else {
            return false;
        };
        let (tag, op) = st.held.remove(i);
        let store = st.store.as_ref().map_or(-1, |f| f.as_raw_fd());
        let res = self.perform(op, store);
        st.ready.push_back((tag, res));
        let _ = self.eventfd.write(1);
        true
    }

    /// Posts `result` (bytes, or a negative errno) as the completion of the
    /// held operation `tag` without carrying it out (a device error, an
    /// unsupported operation); `false` if no such operation is held.
    pub fn fail(&self, tag: Tag, result: i32) -> bool {
        let mut st = self.lock();
        let Some(i) = st.held.iter().position(|(t, _)| *t == tag) else {
            return false;
        };
        st.held.remove(i);
        st.ready.push_back((tag, result));
        let _ = self.eventfd.write(1);
        true
    }

    /// Completes every held operation, in submission order.
    pub fn complete_all(&self) {
        for t in self.held() {
            self.complete(t);
        }
    }

    fn perform(&self, op: Held, store: i32) -> i32 {
        let fd = self.file.as_raw_fd();
        let ret = match op {
            // SAFETY: the worker's contract for `Engine::push` keeps these
            // iovecs' buffers valid until the completion is reaped, which
            // happens after this call.
            Held::Read(off, iov) => unsafe {
                libc::preadv(fd, iov.as_ptr().cast(), iov.len() as i32, off as i64)
            },
            // SAFETY: as above.
            Held::Write(off, iov) => unsafe {
                libc::pwritev(fd, iov.as_ptr().cast(), iov.len() as i32, off as i64)
            },
            // SAFETY: plain syscalls on an fd we own; no memory passed.
            Held::Flush => unsafe { libc::fdatasync(fd) as isize },
            // SAFETY: as above (-1 gives EBADF).
            Held::SyncStore => unsafe { libc::fdatasync(store) as isize },
            // SAFETY: as above.
            Held::Fallocate(off, len, mode) => unsafe {
                libc::fallocate(fd, mode, off as i64, len as i64) as isize
            },
        };
        if ret < 0 {
            -std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO)
        } else {
            ret as i32
        }
    }
}

/// The worker's side of a fake engine.
pub struct FakeEngine {
    pub(super) handle: FakeHandle,
}

impl FakeEngine {
    pub(super) fn new(file: &File) -> (FakeEngine, FakeHandle) {
        let handle = FakeHandle {
            state: Arc::default(),
            file: Arc::new(file.try_clone().expect("dup image fd")),
            eventfd: Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")),
        };
        (
            FakeEngine {
                handle: handle.clone(),
            },
            handle,
        )
    }

    pub(super) fn set_store(&mut self, store: Option<File>) {
        self.handle.lock().store = store;
    }

    pub(super) fn push(&mut self, op: Op<'_>, tag: Tag) {
        let mut st = self.handle.lock();
        let held = match op {
            Op::Read { offset, iov } | Op::ReadGuarded { offset, iov, .. } => {
                Held::Read(offset, iov.to_vec())
            }
            Op::Write { offset, iov } => Held::Write(offset, iov.to_vec()),
            Op::Flush => Held::Flush,
            Op::SyncStore => Held::SyncStore,
            Op::Fallocate { offset, len, how } => Held::Fallocate(offset, len, how.mode()),
            Op::Timeout(d) => {
                st.timers.push((Instant::now() + d, tag));
                return;
            }
        };
        st.held.push((tag, held));
    }

    /// Blocking wait (drain): completes what is held, in order, or sleeps
    /// until the next timer.
    pub(super) fn wait(&mut self) {
        if !self.handle.lock().ready.is_empty() {
            return;
        }
        if !self.handle.held().is_empty() {
            return self.handle.complete_all();
        }
        let next = self.handle.lock().timers.iter().map(|t| t.0).min();
        if let Some(at) = next {
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
        }
    }

    /// Completed operations are waiting (timers are not looked at).
    pub(super) fn has_completions(&self) -> bool {
        !self.handle.lock().ready.is_empty()
    }

    pub(super) fn reap(&mut self, out: &mut Vec<(Tag, i32)>) {
        let mut st = self.handle.lock();
        let now = Instant::now();
        let mut i = 0;
        while i < st.timers.len() {
            if st.timers[i].0 <= now {
                let (_, tag) = st.timers.swap_remove(i);
                st.ready.push_back((tag, -libc::ETIME));
            } else {
                i += 1;
            }
        }
        out.extend(st.ready.drain(..));
    }
}
