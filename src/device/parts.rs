//! [`DeviceParts`]: what a [`super::Device`] is built from beyond its config and image.

use std::time::Duration;

use super::DEFAULT_POLL_MAX;
use crate::integrity::{ChecksumStore, OnMismatch};
use crate::pin::policy::PolicyConfig;
use crate::report::ReportWriter;

/// The parts of a [`super::Device`] beyond its config and image, already built:
/// what [`super::Device::open`] builds from a [`super::DeviceOptions`], given directly by
/// tests. [`DeviceParts::default`] has the defaults of `pinblk serve` with no
/// report file and no checksum store.
pub struct DeviceParts {
    /// READ and WRITE complete without touching the image.
    pub null: bool,
    /// Pin READ and WRITE buffers and check them for conflicts.
    pub pin_tracking: bool,
    /// A pin held longer than this counts as long-term; the [`crate::pin::PinTracker`]
    /// is built with it (one per device, one slot per queue).
    pub longterm_after: Duration,
    /// What to do about conflicts.
    pub policy: PolicyConfig,
    /// Where events go.
    pub report: ReportWriter,
    /// The open checksum store, or `None` (no checksums).
    pub store: Option<ChecksumStore>,
    /// With a store: LBA range locks and the write-intent record.
    pub range_tracking: bool,
    /// What a READ of a block that fails verification gets.
    pub on_mismatch: OnMismatch,
    /// Longest a queue worker busy-polls its ring and storage before sleeping
    /// ([`super::DeviceOptions::poll_max`]).
    pub poll_max: Duration,
}

impl Default for DeviceParts {
    fn default() -> Self {
        DeviceParts {
            null: false,
            pin_tracking: true,
            longterm_after: Duration::from_secs(1),
            policy: PolicyConfig::default(),
            report: ReportWriter::open(None).expect("a report without a file cannot fail"),
            store: None,
            range_tracking: true,
            on_mismatch: OnMismatch::Report,
            poll_max: DEFAULT_POLL_MAX,
        }
    }
}
