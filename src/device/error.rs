//! [`DeviceError`]: why a device cannot be opened or closed.

use std::path::PathBuf;

use super::MAX_QUEUES;
use crate::integrity::IntegrityError;
use crate::report::ReportError;
use crate::storage::StorageError;

/// Why a device cannot be opened or closed. Every message says what went
/// wrong and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The number of request queues is out of range.
    #[error("{0} request queues asked for; a device has 1 to {MAX_QUEUES} (--num-queues)")]
    NumQueues(u16),
    /// The queue size is not a power of two in range.
    #[error("queue size {0} asked for; use a power of two between 2 and 1024 (--queue-size)")]
    QueueSize(u16),
    /// The logical block size is neither 512 nor 4096.
    #[error("logical block size {0} asked for; use 512 or 4096 (--logical-block-size)")]
    LogicalBlockSize(u32),
    /// The largest transfer is below `seg_max` segments of 4 KiB.
    #[error("largest transfer of {asked} bytes asked for; with this queue size it must be at least {min} bytes (--max-transfer, or a smaller --queue-size)")]
    MaxTransfer {
        /// Bytes asked for.
        asked: u32,
        /// The least allowed, bytes.
        min: u32,
    },
    /// A block device is served with checksums on but no `--checksum-store`.
    #[error("{0} is a block device: there is no place beside it for the checksum store; pass --checksum-store PATH (a file on another disk, e.g. /var/lib/pinblk/NAME.pinsum), or --checksum off")]
    StoreRequired(PathBuf),
    /// The image cannot be created, opened or locked (the message says what to do).
    #[error(transparent)]
    Image(#[from] StorageError),
    /// The report file cannot be opened for appending.
    #[error("{0}; pass --report a file in a writable directory, or leave --report out")]
    Report(#[from] ReportError),
    /// The checksum store cannot be created, opened or recovered.
    #[error("{}", store_message(.0))]
    Store(#[from] IntegrityError),
    /// At close, the image cannot be made durable before the store is closed.
    #[error("cannot fdatasync image {path} before closing the checksum store: {source}; the store stays marked in use and the next start recovers it")]
    ImageSync {
        /// The image.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// At close, the checksum store cannot be written and marked clean.
    #[error("cannot close the checksum store cleanly: {0}; the next start recovers it")]
    StoreClose(#[source] IntegrityError),
}

/// The message of [`DeviceError::Store`]: the store's own message, which
/// says what to do, except for a plain I/O error, which gets a remedy here.
fn store_message(e: &IntegrityError) -> String {
    match e {
        IntegrityError::Io { .. } => format!(
            "{e}; check the checksum store's path and permissions (--checksum-store), or pass --checksum off"
        ),
        _ => e.to_string(),
    }
}
