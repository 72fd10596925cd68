//! The vhost-user inflight I/O tracking record, split-virtqueue layout
//! (vhost-user specification, section "Inflight I/O tracking"; the same
//! layout as QEMU's libvhost-user, `VuVirtqInflight`): a shared-memory
//! region that survives a crash of pinblk, because the frontend keeps its
//! file descriptor (`VHOST_USER_GET_INFLIGHT_FD`) and hands it to the next
//! pinblk (`VHOST_USER_SET_INFLIGHT_FD`).
//!
//! Layout of one queue's part (all little-endian, host byte order on x86):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | `features` (0) |
//! | 8 | 2 | `version` (1; 0 = never used, or reset by the frontend) |
//! | 10 | 2 | `desc_num` (queue size) |
//! | 12 | 2 | `last_batch_head`: the head being completed |
//! | 14 | 2 | `used_idx`: the used index after the last completion |
//! | 16 + 16·i | 16 | `desc[i]`: `inflight` (u8), 5 bytes padding, `next` (u16), `counter` (u64) |
//!
//! Each queue's part is [`queue_region_size`] bytes; queue `q` starts at
//! `q · queue_region_size(queue_size)`.
//!
//! The protocol, per request whose descriptor chain has head `h`:
//! 1. [`QueueInflight::mark`] when the chain is popped, before anything is
//!    done with it: `desc[h].counter = next counter; desc[h].inflight = 1`.
//! 2. [`QueueInflight::pre_put`] before its used element is written:
//!    `last_batch_head = h`.
//! 3. The used element is written and the used ring's `idx` published.
//! 4. [`QueueInflight::post_put`]: `desc[h].inflight = 0`, then
//!    `used_idx = ` the new used index.
//!
//! A crash between any two stores leaves a record that
//! [`QueueInflight::recover`] reads correctly: if the ring's used index is
//! ahead of the record's `used_idx`, the crash fell between 3 and 4 and
//! `last_batch_head` was completed; every other `inflight = 1` descriptor
//! was popped and not completed, and is resubmitted in `counter` order.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::atomic::Ordering;

use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory};

/// Version written into a queue's part on first use.
pub const INFLIGHT_VERSION: u16 = 1;
/// Bytes of one `desc[]` entry (`DescStateSplit`).
pub const DESC_STATE_SIZE: usize = 16;
/// Bytes of a queue's header before `desc[]`.
pub const HEADER_SIZE: usize = 16;
/// Each queue's part is aligned to this many bytes (a cache line).
pub const ALIGNMENT: usize = 64;

const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH_HEAD: usize = 12;
const OFF_USED_IDX: usize = 14;

/// Errors mapping or creating the record.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// The frontend asked for an impossible geometry.
    #[error("invalid inflight geometry: {0}")]
    Geometry(String),
    /// memfd_create(2), ftruncate(2) or fstat(2) failed.
    #[error("cannot create or inspect the inflight memfd: {0}")]
    Io(#[from] std::io::Error),
    /// mmap(2) failed.
    #[error("cannot map the inflight region: {0}")]
    Map(String),
}

/// Bytes of one queue's part of the record for a queue of `queue_size`
/// descriptors: header plus `desc[]`, rounded up to [`ALIGNMENT`].
pub fn queue_region_size(queue_size: u16) -> usize {
    (HEADER_SIZE + DESC_STATE_SIZE * usize::from(queue_size)).div_ceil(ALIGNMENT) * ALIGNMENT
}

/// The whole record: every queue's part, in one shared mapping of a memfd.
pub struct InflightRegion {
    map: MmapRegion<()>,
    file: File,
    num_queues: u16,
    queue_size: u16,
}

impl InflightRegion {
    /// A new, zeroed record for `num_queues` queues of `queue_size`
    /// descriptors in a fresh memfd (`VHOST_USER_GET_INFLIGHT_FD`; the
    /// caller sends [`InflightRegion::file`] and [`InflightRegion::size`]).
    ///
    /// # Errors
    /// [`InflightError`] for a zero geometry or if the memfd cannot be made.
    pub fn create(num_queues: u16, queue_size: u16) -> Result<Self, InflightError> {
        check_geometry(num_queues, queue_size)?;
        let size = usize::from(num_queues) * queue_region_size(queue_size);
        // SAFETY: memfd_create(2) takes a NUL-terminated name and flags and
        // returns a new descriptor or -1; no memory of ours is touched.
        let fd = unsafe { libc::memfd_create(c"pinblk-inflight".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size as u64)?;
        Self::map(file, 0, size, num_queues, queue_size)
    }

    /// Maps a record handed back by the frontend (`VHOST_USER_SET_INFLIGHT_FD`):
    /// `size` bytes at `offset` of `file`, for `num_queues` queues of
    /// `queue_size` descriptors.
    ///
    /// # Errors
    /// [`InflightError::Geometry`] if `size` is smaller than the geometry
    /// needs or the file is shorter than `offset + size` (touching such a
    /// mapping would raise SIGBUS), or if mapping fails.
    pub fn open(
        file: File,
        offset: u64,
        size: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        check_geometry(num_queues, queue_size)?;
        let need = usize::from(num_queues) * queue_region_size(queue_size);
        let len = file.metadata()?.len();
        if (size as usize) < need || offset.checked_add(size).is_none_or(|end| end > len) {
            return Err(InflightError::Geometry(format!(
                "{size} bytes at offset {offset} of a {len}-byte file; {num_queues} queue(s) \
                 of {queue_size} need {need}"
            )));
        }
        Self::map(file, offset, need, num_queues, queue_size)
    }

    fn map(
        file: File,
        offset: u64,
        size: usize,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        let dup = file.try_clone()?;
        let map = MmapRegion::from_file(FileOffset::new(dup, offset), size)
            .map_err(|e| InflightError::Map(e.to_string()))?;
        Ok(InflightRegion {
            map,
            file,
            num_queues,
            queue_size,
        })
    }

    /// The memfd (to send to the frontend).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Bytes of the record (`mmap_size` of `VhostUserInflight`).
    pub fn size(&self) -> u64 {
        (usize::from(self.num_queues) * queue_region_size(self.queue_size)) as u64
    }

    /// Number of queues recorded.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Queue `index`'s part, or `None` past the last queue. The handle
    /// shares the mapping; keep [`InflightRegion`] alive while it is used
    /// (it is reference-counted by the caller).
    pub fn queue(self: &std::sync::Arc<Self>, index: u16) -> Option<QueueInflight> {
        (index < self.num_queues).then(|| QueueInflight {
            region: self.clone(),
            base: usize::from(index) * queue_region_size(self.queue_size),
            desc_num: self.queue_size,
            counter: 0,
        })
    }
}

fn check_geometry(num_queues: u16, queue_size: u16) -> Result<(), InflightError> {
    if num_queues == 0 || queue_size == 0 {
        return Err(InflightError::Geometry(format!(
            "{num_queues} queue(s) of {queue_size} descriptors"
        )));
    }
    Ok(())
}

/// What [`QueueInflight::recover`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Heads popped and never completed, oldest first (by `counter`): to
    /// be processed again before any new avail entry.
    pub resubmit: Vec<u16>,
    /// The avail index to continue from: used index + requests in flight
    /// (the value for `Queue::set_next_avail`), or `None` when the record
    /// was never used (version 0) or was for another queue size: then it
    /// says nothing, and the frontend's `SET_VRING_BASE` stands (a
    /// migration's destination, a first start).
    pub next_avail: Option<u16>,
}

/// One queue's part of the record (see the module docs for the protocol).
pub struct QueueInflight {
    region: std::sync::Arc<InflightRegion>,
    base: usize,
    desc_num: u16,
    counter: u64,
}

impl QueueInflight {
    fn store<T: vm_memory::AtomicAccess>(&self, off: usize, v: T) {
        // Offsets are inside the queue's part by construction (checked
        // against desc_num by the callers); Release orders the stores as
        // the protocol needs them for a crash of this process.
        let _ = self
            .region
            .map
            .as_volatile_slice()
            .store(v, self.base + off, Ordering::Release);
    }

    fn load<T: vm_memory::AtomicAccess + Default>(&self, off: usize) -> T {
        self.region
            .map
            .as_volatile_slice()
            .load(self.base + off, Ordering::Acquire)
            .unwrap_or_default()
    }

    fn desc_off(head: u16) -> usize {
        HEADER_SIZE + DESC_STATE_SIZE * usize::from(head)
    }

    fn valid(&self, head: u16) -> bool {
        head < self.desc_num
    }

    /// Step 1: `head` was popped. Ignored for a head outside the queue.
    pub fn mark(&mut self, head: u16) {
        if !self.valid(head) {
            return;
        }
        let off = Self::desc_off(head);
        self.store(off + 8, self.counter);
        self.counter += 1;
        self.store(off, 1u8);
    }

    /// Step 2: `head`'s used element is about to be written.
    pub fn pre_put(&mut self, head: u16) {
        if self.valid(head) {
            self.store(OFF_LAST_BATCH_HEAD, head);
        }
    }

    /// Step 4: `head`'s used element is published and the used index is
    /// now `used_idx`.
    pub fn post_put(&mut self, head: u16, used_idx: u16) {
        if !self.valid(head) {
            return;
        }
        self.store(Self::desc_off(head), 0u8);
        self.store(OFF_USED_IDX, used_idx);
    }

    /// Whether `head` is recorded as in flight.
    pub fn is_inflight(&self, head: u16) -> bool {
        self.valid(head) && self.load::<u8>(Self::desc_off(head)) == 1
    }

    /// Reads the record when the queue starts (after `SET_VRING_KICK`),
    /// with `ring_used_idx` the `idx` field of the guest's used ring. A
    /// never-used record (version 0) is initialised and nothing is
    /// resubmitted; a record of another queue size is reset with a log line.
    /// Later [`QueueInflight::mark`] calls continue the counter.
    pub fn recover(&mut self, ring_used_idx: u16) -> Recovery {
        let fresh = Recovery {
            resubmit: Vec::new(),
            next_avail: None,
        };
        if self.load::<u16>(OFF_VERSION) == 0 {
            self.reset(ring_used_idx);
            return fresh;
        }
        if self.load::<u16>(OFF_DESC_NUM) != self.desc_num {
            log::warn!(
                "inflight record was made for a queue of {} descriptors, not {}: starting afresh",
                self.load::<u16>(OFF_DESC_NUM),
                self.desc_num
            );
            self.reset(ring_used_idx);
            return fresh;
        }
        if self.load::<u16>(OFF_USED_IDX) != ring_used_idx {
            // Crashed between publishing the used index and clearing the
            // descriptor: that head was completed.
            let head: u16 = self.load(OFF_LAST_BATCH_HEAD);
            if self.valid(head) {
                self.store(Self::desc_off(head), 0u8);
            }
            self.store(OFF_USED_IDX, ring_used_idx);
        }
        let mut found: Vec<(u64, u16)> = (0..self.desc_num)
            .filter(|&h| self.is_inflight(h))
            .map(|h| (self.load::<u64>(Self::desc_off(h) + 8), h))
            .collect();
        found.sort_unstable();
        self.counter = found.last().map_or(0, |&(c, _)| c + 1);
        Recovery {
            next_avail: Some(ring_used_idx.wrapping_add(found.len() as u16)),
            resubmit: found.into_iter().map(|(_, h)| h).collect(),
        }
    }

    fn reset(&mut self, ring_used_idx: u16) {
        for h in 0..self.desc_num {
            self.store(Self::desc_off(h), 0u8);
            self.store(Self::desc_off(h) + 8, 0u64);
        }
        self.store(0, 0u64);
        self.store(OFF_DESC_NUM, self.desc_num);
        self.store(OFF_LAST_BATCH_HEAD, 0u16);
        self.store(OFF_USED_IDX, ring_used_idx);
        self.store(OFF_VERSION, INFLIGHT_VERSION);
        self.counter = 0;
    }
}

#[cfg(test)]
mod tests;
