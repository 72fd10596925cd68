//! Per-queue counters and gauges of a device, and their sums
//! ([`super::Device::counters`], [`super::Device::queue_gauges`]).

use std::sync::atomic::{AtomicU64, AtomicU8};

use serde::Serialize;

#[cfg(doc)]
use crate::pin::policy::PolicyConfig;

/// Counters of one virtqueue. Each queue has its own, so queues never share a
/// cache line on the hot path; [`super::Device::counters`] sums them.
#[derive(Debug, Default)]
pub struct QueueCounters {
    /// Requests completed, any status.
    pub requests: AtomicU64,
    /// Bytes read from the image into guest memory.
    pub bytes_read: AtomicU64,
    /// Bytes written from guest memory to the image.
    pub bytes_written: AtomicU64,
    /// FLUSH requests completed.
    pub flushes: AtomicU64,
    /// DISCARD and WRITE_ZEROES requests completed.
    pub discards: AtomicU64,
    /// Requests completed with VIRTIO_BLK_S_IOERR.
    pub ioerr: AtomicU64,
    /// Requests completed with VIRTIO_BLK_S_UNSUPP.
    pub unsupp: AtomicU64,
    /// Descriptor chains so malformed that no status could be written.
    pub dropped: AtomicU64,
    /// Bytes of bounce buffers this queue holds now (a gauge, limited by
    /// [`PolicyConfig::bounce_queue_bytes`]; not in [`Counters`]).
    pub bounce_bytes: AtomicU64,
    /// Requests popped from the avail ring and not yet done (a gauge the
    /// worker sets after each batch; not in [`Counters`]).
    pub in_flight: AtomicU64,
    /// The storage engine serving this queue now, as
    /// [`crate::storage::EngineKind`] `as u8`; 0 before a worker served it.
    pub engine: AtomicU8,
}

/// One queue slot's gauges (`query-stats` "queues"): see [`QueueCounters`].
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct QueueGauges {
    /// Connection lane (0, or 1 for a second connection during a migration
    /// or a reconnect).
    pub lane: u16,
    /// Virtqueue index.
    pub queue: u16,
    /// Storage engine now: `io_uring`, `mmap`, `null`, or
    /// `io_uring_after_sigbus` (the image mapping was dropped).
    pub engine: &'static str,
    /// Requests popped and not yet done.
    pub in_flight: u64,
    /// Bytes of bounce buffers held.
    pub bounce_bytes: u64,
}

/// A summed snapshot of [`QueueCounters`], for logs and reports.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Counters {
    /// Requests completed, any status.
    pub requests: u64,
    /// Bytes read from the image into guest memory.
    pub bytes_read: u64,
    /// Bytes written from guest memory to the image.
    pub bytes_written: u64,
    /// FLUSH requests completed.
    pub flushes: u64,
    /// DISCARD and WRITE_ZEROES requests completed.
    pub discards: u64,
    /// Requests completed with VIRTIO_BLK_S_IOERR.
    pub ioerr: u64,
    /// Requests completed with VIRTIO_BLK_S_UNSUPP.
    pub unsupp: u64,
    /// Chains dropped without a status byte.
    pub dropped: u64,
}
