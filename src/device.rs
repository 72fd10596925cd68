//! Per-device state shared by every connection and every virtqueue: the
//! image, what the driver sees, and the running counters.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::integrity::ChecksumStore;
use crate::integrity::OnMismatch;
use crate::pin::policy::PolicyConfig;
use crate::pin::PinTracker;
use crate::report::ReportWriter;
use crate::storage::Image;
use crate::virtio_blk::config::DeviceConfig;

/// Counters of one virtqueue. Each queue has its own, so queues never share a
/// cache line on the hot path; [`Device::counters`] sums them.
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

/// One served block device.
pub struct Device {
    /// What the driver sees (capacity, block size, queues, serial).
    pub config: DeviceConfig,
    /// The open, locked image.
    pub image: Image,
    /// One set of counters per virtqueue, indexed by queue index.
    pub queue_counters: Vec<QueueCounters>,
    /// `--null`: READ and WRITE complete without touching the image.
    pub null: bool,
    /// Pins of every in-flight READ and WRITE, all queues.
    pub pins: PinTracker,
    /// Whether READ and WRITE are pinned and checked (`--pin-tracking`).
    pub pin_tracking: bool,
    /// What to do about conflicts.
    pub policy: PolicyConfig,
    /// Where events go (log, counters and the `--report` file).
    pub report: ReportWriter,
    /// Bytes of bounce buffers held now, all queues.
    pub bounce_in_use: AtomicU64,
    /// Per-block CRC32C of the image (`--checksum crc32c`), or `None` (`off`).
    pub store: Option<ChecksumStore>,
    /// What a READ gets when a block fails verification.
    pub on_mismatch: OnMismatch,
    next_request_id: AtomicU64,
}

impl Device {
    /// A device serving `image` as described by `config`.
    pub fn new(config: DeviceConfig, image: Image) -> Device {
        let num_queues = config.num_queues;
        let queue_counters = (0..config.num_queues)
            .map(|_| QueueCounters::default())
            .collect();
        Device {
            config,
            image,
            queue_counters,
            null: false,
            pins: PinTracker::new(num_queues, std::time::Duration::from_secs(1)),
            pin_tracking: true,
            policy: PolicyConfig::default(),
            report: ReportWriter::open(None).expect("a report without a file cannot fail"),
            bounce_in_use: AtomicU64::new(0),
            store: None,
            on_mismatch: OnMismatch::Report,
            next_request_id: AtomicU64::new(1),
        }
    }

    /// A fresh request id, unique for the life of the process, starting at 1.
    pub fn next_request_id(&self) -> u64 {
        self.next_request_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Every counter (requests, pins, integrity events) as one JSON object,
    /// for the shutdown and SIGUSR1 log lines.
    pub fn counters_json(&self) -> String {
        serde_json::json!({
            "requests": self.counters(),
            "pins": self.pins.counters(),
            "events": self.report.counters(),
        })
        .to_string()
    }

    /// Counters summed over all queues.
    pub fn counters(&self) -> Counters {
        let mut c = Counters::default();
        for q in &self.queue_counters {
            let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
            c.requests += g(&q.requests);
            c.bytes_read += g(&q.bytes_read);
            c.bytes_written += g(&q.bytes_written);
            c.flushes += g(&q.flushes);
            c.discards += g(&q.discards);
            c.ioerr += g(&q.ioerr);
            c.unsupp += g(&q.unsupp);
            c.dropped += g(&q.dropped);
        }
        c
    }
}
