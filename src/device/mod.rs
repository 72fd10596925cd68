//! One served device: the options it is opened with ([`DeviceOptions`]),
//! the per-device state shared by every connection and every virtqueue (the
//! image, what the driver sees, the pin tracker, the report writer, the
//! checksum store) and the running counters.
//!
//! [`Device::open`] builds all of it once from a [`DeviceOptions`]; nothing
//! is assigned after construction. The command line (`cli`) converts its
//! arguments into a [`DeviceOptions`]; this module knows nothing of argument parsing.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::integrity::ranges::RangeLocks;
use crate::integrity::{
    default_store_path, ChecksumStore, OnMismatch, StoreOptions, STORE_VERSION,
};
use crate::pin::policy::PolicyConfig;
use crate::pin::PinTracker;
use crate::report::{ChecksumFailureEvent, Event, RecoveredEvent, ReportWriter};
use crate::storage::{EngineKind, Image, ImageOptions};
use crate::virtio_blk::config::DeviceConfig;

mod counters;
mod error;
mod parts;
mod runtime;
mod topology;

pub use counters::{Counters, QueueCounters, QueueGauges};
pub use error::DeviceError;
pub use parts::DeviceParts;
pub use runtime::RuntimeSettings;

/// Most request virtqueues a device has.
pub const MAX_QUEUES: u16 = 64;
/// Most vhost-user connections served at once (a migration's source and
/// destination on one host, docs/DESIGN.md §13), each in a lane of per-queue
/// slots (pins, wakers, counters): slot = lane × queues + queue.
pub const MAX_CONNECTIONS: u16 = 2;
/// Smallest and largest virtqueue size accepted (a power of two), in entries.
pub const QUEUE_SIZE_RANGE: std::ops::RangeInclusive<u16> = 2..=1024;
/// Default [`DeviceOptions::poll_max`]: 128 µs (4x QEMU's default
/// `poll-max-ns`: where a wake-up costs tens of microseconds, as in a VM
/// whose IPIs exit to the hypervisor, 32 µs ran out before the driver's
/// next batch and polling died out; docs/DESIGN.md §8 "Polling").
pub const DEFAULT_POLL_MAX: Duration = Duration::from_micros(128);

/// Everything a device needs, built by the caller (the command line, a test)
/// and given to [`Device::open`]. [`DeviceOptions::new`] has the defaults of
/// `pinblk serve`.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceOptions {
    /// The raw disk image file or host block device to serve.
    pub image: PathBuf,
    /// How to open the image: create size (bytes), read-only, O_DIRECT, and
    /// the logical block size (bytes, 512 or 4096; `None`: a block device's
    /// own, else 512). The driver is offered what the image ends up with
    /// ([`Image::read_only`]: also a read-only device;
    /// [`Image::logical_block_size`]).
    pub image_options: ImageOptions,
    /// Number of request virtqueues, 1 to [`MAX_QUEUES`].
    pub num_queues: u16,
    /// Largest virtqueue size accepted, in entries: a power of two in
    /// [`QUEUE_SIZE_RANGE`].
    pub queue_size: u16,
    /// Serial returned by GET_ID (at most 20 bytes are used).
    pub serial: String,
    /// READ and WRITE complete without touching the image (no checksums either).
    pub null: bool,
    /// Pin READ and WRITE buffers and check them for conflicts; `false`
    /// disables the pin model entirely.
    pub pin_tracking: bool,
    /// A pin held longer than this counts as long-term (FOLL_LONGTERM).
    pub longterm_after: Duration,
    /// What to do about conflicts, and the fault injection settings.
    pub policy: PolicyConfig,
    /// Checksum every write (CRC32C per 4 KiB block) and verify every READ.
    pub checksum: bool,
    /// Where the checksums live; `None`: `IMAGE.pinsum` beside the image.
    pub checksum_store: Option<PathBuf>,
    /// With checksums on: LBA range locks across queues and the write-intent
    /// record (docs/DESIGN.md §7). `false` only to measure what they cost:
    /// reports can then be wrong under overlapping I/O.
    pub range_tracking: bool,
    /// What a READ of a block that fails verification gets.
    pub on_mismatch: OnMismatch,
    /// Append report events (JSON Lines) to this file; `None`: log and count only.
    pub report: Option<PathBuf>,
    /// Largest READ or WRITE data buffer in bytes ([`DeviceConfig::max_transfer`]):
    /// at least `(queue_size - 2)` × 4 KiB ([`DeviceOptions::min_max_transfer`]).
    pub max_transfer: u32,
    /// Longest a queue worker busy-polls its ring and storage for more work
    /// before sleeping in epoll (adaptive, from 0; `ZERO`: never polls).
    pub poll_max: Duration,
}

impl DeviceOptions {
    /// Options for serving `image` with the defaults of `pinblk serve`: one
    /// queue of up to 256 entries, 512-byte logical blocks (a block
    /// device's own), writable, serial
    /// `pinblk`, pin tracking on with pins long-term after 1 s, the default
    /// [`PolicyConfig`] (bounce), CRC32C checksums in `IMAGE.pinsum`, mismatches
    /// reported, no report file.
    pub fn new(image: impl Into<PathBuf>) -> DeviceOptions {
        DeviceOptions {
            image: image.into(),
            image_options: ImageOptions {
                create_size: None,
                read_only: false,
                direct: false,
                logical_block_size: None,
                aio: crate::storage::Aio::Auto,
            },
            num_queues: 1,
            queue_size: 256,
            serial: "pinblk".into(),
            null: false,
            pin_tracking: true,
            longterm_after: Duration::from_secs(1),
            policy: PolicyConfig::default(),
            checksum: true,
            checksum_store: None,
            range_tracking: true,
            on_mismatch: OnMismatch::Report,
            report: None,
            max_transfer: DEFAULT_MAX_TRANSFER,
            poll_max: DEFAULT_POLL_MAX,
        }
    }

    /// The smallest `max_transfer` the queue size allows: `seg_max`
    /// (queue size - 2) segments of 4 KiB, the smallest `size_max` offered.
    pub fn min_max_transfer(&self) -> u32 {
        u32::from(self.queue_size).saturating_sub(2).max(1) * 4096
    }

    /// Checks the values that do not depend on any file.
    ///
    /// # Errors
    /// [`DeviceError::NumQueues`], [`DeviceError::QueueSize`] or
    /// [`DeviceError::LogicalBlockSize`].
    pub fn validate(&self) -> Result<(), DeviceError> {
        if !(1..=MAX_QUEUES).contains(&self.num_queues) {
            return Err(DeviceError::NumQueues(self.num_queues));
        }
        if !QUEUE_SIZE_RANGE.contains(&self.queue_size) || !self.queue_size.is_power_of_two() {
            return Err(DeviceError::QueueSize(self.queue_size));
        }
        if let Some(lbs) = self.image_options.logical_block_size {
            if lbs != 512 && lbs != 4096 {
                return Err(DeviceError::LogicalBlockSize(lbs));
            }
        }
        if self.max_transfer < self.min_max_transfer() {
            return Err(DeviceError::MaxTransfer {
                asked: self.max_transfer,
                min: self.min_max_transfer(),
            });
        }
        Ok(())
    }
}

/// Default largest READ or WRITE data buffer (`--max-transfer`): 32 MiB, in bytes.
pub const DEFAULT_MAX_TRANSFER: u32 = 32 << 20;

/// One served block device. Built once ([`Device::open`] or
/// [`Device::from_parts`]) and never changed after, except the settings of
/// [`Device::runtime`] (atomics the control socket sets); shared by every
/// connection and queue behind an `Arc`.
pub struct Device {
    config: DeviceConfig,
    image: Image,
    queue_counters: Vec<QueueCounters>,
    null: bool,
    pins: PinTracker,
    pin_tracking: bool,
    policy: PolicyConfig,
    report: ReportWriter,
    bounce_in_use: AtomicU64,
    store: Option<ChecksumStore>,
    ranges: Option<RangeLocks>,
    runtime: RuntimeSettings,
    next_request_id: AtomicU64,
    poll_max: Duration,
}

impl Device {
    /// Opens the device `opts` describes: checks the options, opens (creating
    /// if asked) and locks the image, opens the report file, builds the pin
    /// tracker, and opens (creating or recovering) the checksum store unless
    /// checksums are off or the device is `null`. After an unclean stop, the
    /// regions recovered are reported as `recovered` events and the blocks
    /// mismatching outside every write-intent region as `checksum_failure`. Logs what is
    /// served and how.
    ///
    /// # Errors
    /// [`DeviceError::NumQueues`], [`DeviceError::QueueSize`],
    /// [`DeviceError::LogicalBlockSize`] for bad options;
    /// [`DeviceError::Image`], [`DeviceError::Report`] or
    /// [`DeviceError::Store`] if a file cannot be opened.
    pub fn open(opts: &DeviceOptions) -> Result<Device, DeviceError> {
        Self::open_with_progress(opts, None)
    }

    /// As [`Device::open`], with `progress(done_blocks, total_blocks)`
    /// called while the checksum store is created from the image or
    /// recovered (`None`: a log line every 10 % for images of 256 MiB or
    /// more).
    ///
    /// # Errors
    /// As [`Device::open`].
    pub fn open_with_progress(
        opts: &DeviceOptions,
        progress: Option<&mut dyn FnMut(u64, u64)>,
    ) -> Result<Device, DeviceError> {
        opts.validate()?;
        let io = &opts.image_options;
        let image = Image::open(&opts.image, io)?;
        let config = DeviceConfig {
            capacity_sectors: image.capacity_sectors(),
            logical_block_size: image.logical_block_size(),
            num_queues: opts.num_queues,
            queue_size: opts.queue_size,
            read_only: image.read_only(),
            serial: opts.serial.clone(),
            max_transfer: opts.max_transfer,
            topology: topology::of(&image),
        };

        log::info!(
            "serving {} ({} bytes, {} sectors{}) with {} queue(s) of up to {} entries",
            image.path().display(),
            image.size(),
            image.capacity_sectors(),
            if image.read_only() { ", read-only" } else { "" },
            opts.num_queues,
            opts.queue_size
        );
        let report = ReportWriter::open(opts.report.as_deref())?;
        if !opts.pin_tracking {
            log::warn!("--pin-tracking off: no pins, no conflict detection, no policy");
        }
        let store = if opts.checksum && !opts.null {
            open_store(opts, &image, &report, progress)?
        } else {
            None
        };
        let p = &opts.policy;
        log::info!(
            "pin model: policy {}, bounce {:?}, stall timeout {:?}, long-term after {:?}{}",
            p.policy.name(),
            p.bounce_mode(),
            p.stall_timeout,
            opts.longterm_after,
            p.read_delay
                .map(|d| format!(
                    ", injected READ delay {d:?} (p={})",
                    p.read_delay_probability
                ))
                .unwrap_or_default()
        );
        if opts.null {
            log::warn!(
                "--null: READ and WRITE complete without touching the image; data is not stored"
            );
        } else {
            let aio = image.aio();
            log::info!("aio: {} ({})", aio.aio.name(), aio.why);
        }
        Ok(Device::from_parts(
            config,
            image,
            DeviceParts {
                null: opts.null,
                pin_tracking: opts.pin_tracking,
                longterm_after: opts.longterm_after,
                policy: opts.policy.clone(),
                report,
                store,
                range_tracking: opts.range_tracking,
                on_mismatch: opts.on_mismatch,
                poll_max: opts.poll_max,
            },
        ))
    }

    /// A device serving `image` as described by `config`, from parts already
    /// built (tests; [`Device::open`] ends here). The pin tracker is built
    /// here, with [`MAX_CONNECTIONS`] slots per queue of `config`.
    pub fn from_parts(config: DeviceConfig, image: Image, parts: DeviceParts) -> Device {
        let slots = config.num_queues * MAX_CONNECTIONS;
        let queue_counters = (0..slots).map(|_| QueueCounters::default()).collect();
        Device {
            pins: PinTracker::new(slots, parts.longterm_after),
            config,
            image,
            queue_counters,
            null: parts.null,
            pin_tracking: parts.pin_tracking,
            policy: parts.policy.clone(),
            report: parts.report,
            bounce_in_use: AtomicU64::new(0),
            ranges: (parts.store.is_some() && parts.range_tracking).then(|| RangeLocks::new(slots)),
            store: parts.store,
            runtime: RuntimeSettings::new(&parts.policy, parts.on_mismatch),
            next_request_id: AtomicU64::new(1),
            poll_max: parts.poll_max,
        }
    }

    /// Closes the device at shutdown, once no connection is left: if there
    /// is a checksum store, fdatasyncs the image and then closes the store
    /// cleanly, so that the next start skips recovery.
    ///
    /// # Errors
    /// [`DeviceError::ImageSync`] or [`DeviceError::StoreClose`]; the store
    /// then stays marked in use and the next start recovers it.
    pub fn close(self) -> Result<(), DeviceError> {
        let Some(store) = self.store else {
            return Ok(());
        };
        self.image
            .file()
            .sync_data()
            .map_err(|source| DeviceError::ImageSync {
                path: self.image.path().to_path_buf(),
                source,
            })?;
        store.close().map_err(DeviceError::StoreClose)
    }

    /// What the driver sees (capacity, block size, queues, serial).
    pub fn config(&self) -> &DeviceConfig {
        &self.config
    }

    /// The open, locked image.
    pub fn image(&self) -> &Image {
        &self.image
    }

    /// One set of counters per queue slot: [`MAX_CONNECTIONS`] lanes of one
    /// per virtqueue, slot = lane × queues + queue index.
    pub fn queue_counters(&self) -> &[QueueCounters] {
        &self.queue_counters
    }

    /// The gauges of every queue slot a worker has served (engine set),
    /// in slot order.
    pub fn queue_gauges(&self) -> Vec<QueueGauges> {
        let queues = self.config.num_queues.max(1);
        self.queue_counters
            .iter()
            .enumerate()
            .filter_map(|(slot, q)| {
                let engine = EngineKind::from_u8(q.engine.load(Ordering::Relaxed))?;
                Some(QueueGauges {
                    lane: slot as u16 / queues,
                    queue: slot as u16 % queues,
                    engine: engine.name(),
                    in_flight: q.in_flight.load(Ordering::Relaxed),
                    bounce_bytes: q.bounce_bytes.load(Ordering::Relaxed),
                })
            })
            .collect()
    }

    /// `--null`: READ and WRITE complete without touching the image.
    pub fn null(&self) -> bool {
        self.null
    }

    /// Longest a queue worker busy-polls before sleeping (`--poll-max-us`).
    pub fn poll_max(&self) -> Duration {
        self.poll_max
    }

    /// Pins of every in-flight READ and WRITE, all queues.
    pub fn pins(&self) -> &PinTracker {
        &self.pins
    }

    /// Whether READ and WRITE are pinned and checked (`--pin-tracking`).
    pub fn pin_tracking(&self) -> bool {
        self.pin_tracking
    }

    /// What to do about conflicts, now: the settings the device was opened
    /// with, and the policy, bounce mode and fault injection as last set
    /// ([`Device::runtime`]; a few relaxed atomic loads, no lock).
    pub fn policy(&self) -> PolicyConfig {
        self.runtime.policy(&self.policy)
    }

    /// The settings the control socket may change while the device serves.
    pub fn runtime(&self) -> &RuntimeSettings {
        &self.runtime
    }

    /// The policy settings the device was opened with.
    pub fn initial_policy(&self) -> &PolicyConfig {
        &self.policy
    }

    /// Where events go (log, counters and the `--report` file).
    pub fn report(&self) -> &ReportWriter {
        &self.report
    }

    /// The LBA range locks of all queues: `Some` with a checksum store and
    /// range tracking on (docs/DESIGN.md §7).
    pub fn ranges(&self) -> Option<&RangeLocks> {
        self.ranges.as_ref()
    }

    /// Bytes of bounce buffers held now, all queues (the worker adds and
    /// subtracts; limited by [`PolicyConfig::bounce_pool_bytes`]).
    pub fn bounce_in_use(&self) -> &AtomicU64 {
        &self.bounce_in_use
    }

    /// Per-block CRC32C of the image (`--checksum crc32c`), or `None` (`off`,
    /// `--null`, or a read-only device without a store).
    pub fn store(&self) -> Option<&ChecksumStore> {
        self.store.as_ref()
    }

    /// What a READ gets when a block fails verification.
    pub fn on_mismatch(&self) -> OnMismatch {
        self.runtime.on_mismatch()
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
            "ranges": self.ranges.as_ref().map(RangeLocks::counters),
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

/// Opens the checksum store of `image`. After an unclean stop, each
/// write-intent region whose blocks were re-checksummed from the image is
/// reported as one `recovered`, and each block found mismatching outside
/// every marked region as a `checksum_failure` (no request, `op: other`,
/// action `report`), through `report`. `Ok(None)` for a read-only device
/// without a store (checksums off).
fn open_store(
    opts: &DeviceOptions,
    image: &Image,
    report: &ReportWriter,
    progress: Option<&mut dyn FnMut(u64, u64)>,
) -> Result<Option<ChecksumStore>, DeviceError> {
    let read_only = image.read_only();
    let identity = image.block_device().map(|b| b.identity.clone());
    if identity.is_some() && opts.checksum_store.is_none() {
        return Err(DeviceError::StoreRequired(opts.image.clone()));
    }
    let store_opts = StoreOptions {
        store_path: opts.checksum_store.clone(),
        image_size: Some(image.size()),
        read_only,
        identity,
    };
    let path = store_opts
        .store_path
        .clone()
        .unwrap_or_else(|| default_store_path(&opts.image));
    if read_only && !path.exists() {
        log::warn!(
            "read-only device and no checksum store at {}: checksums off",
            path.display()
        );
        return Ok(None);
    }
    let (store, outcome) = match progress {
        Some(p) => ChecksumStore::open_with_progress(&opts.image, &store_opts, p)?,
        None => ChecksumStore::open(&opts.image, &store_opts)?,
    };
    if outcome.created {
        log::info!(
            "created checksum store {} from the image",
            store.path().display()
        );
    }
    if let Some(v) = outcome.migrated_from {
        log::info!(
            "migrated checksum store {} from format version {v} to {STORE_VERSION}",
            store.path().display()
        );
    }
    if outcome.unclean {
        log::warn!(
            "checksum store {} was not closed cleanly (crash or kill -9): {} write-intent region(s) marked, {} recovered ({} block(s) re-checksummed from the image), {} block(s) mismatching outside every marked region",
            store.path().display(),
            outcome.marked_regions,
            outcome.recovered.len(),
            outcome.recovered.iter().map(|r| r.blocks.len()).sum::<usize>(),
            outcome.cold_mismatches.len()
        );
    }
    let emit = |e: Event| {
        if let Err(err) = report.emit(&e) {
            log::error!("cannot write report event: {err}");
        }
    };
    for r in &outcome.recovered {
        emit(Event::new(RecoveredEvent::new(r)));
    }
    for m in &outcome.cold_mismatches {
        emit(Event::new(ChecksumFailureEvent::at_start(
            m.block,
            m.expected,
            m.found,
            opts.policy.policy,
        )));
    }
    Ok(Some(store))
}

#[cfg(test)]
mod tests;
