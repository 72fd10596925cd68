//! The errors of the checksum store, the scrubber and the report reader.

use std::io;
use std::path::{Path, PathBuf};

pub(super) const REMEDY: &str =
    "remove the store to rebuild it from the image, or pass --checksum off";

/// Errors of the checksum store, the scrubber and the report reader. Every
/// refusal of an existing store names the field that mismatched and what to do.
#[derive(Debug, thiserror::Error)]
pub enum IntegrityError {
    /// An I/O error, with what was being done and on which file.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file (store, image or report).
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A read-only open (e.g. scrub) found no store.
    #[error("checksum store {0} does not exist; serve the image once with --checksum crc32c to create it")]
    StoreMissing(PathBuf),
    /// The file does not start with [`super::STORE_MAGIC`].
    #[error(
        "{path} is not a pinblk checksum store (magic {found:?}, expected \"PINBLKCS\"); {REMEDY}"
    )]
    NotAStore {
        /// Store path.
        path: PathBuf,
        /// The first 8 bytes found, lossily as text.
        found: String,
    },
    /// The header's version is neither [`super::STORE_VERSION`] nor 1 (which
    /// is migrated).
    #[error("checksum store {path} has format version {found}, this pinblk reads version {supported}; {REMEDY}")]
    UnsupportedVersion {
        /// Store path.
        path: PathBuf,
        /// Version in the header.
        found: u32,
        /// Version this code supports.
        supported: u32,
    },
    /// A version 1 store (no write-intent bitmap) opened read-only: only a
    /// writable open migrates it to version 2.
    #[error("checksum store {path} has format version {found} (no write-intent bitmap); this pinblk reads version {supported} and migrates a version {found} store when it serves the image: run `pinblk serve` on it once (or remove the store to rebuild it from the image)")]
    NeedsMigration {
        /// Store path.
        path: PathBuf,
        /// Version in the header.
        found: u32,
        /// Version this code reads and writes.
        supported: u32,
    },
    /// The header's own CRC32C does not match: the header is corrupt.
    #[error("checksum store {path} has a corrupt header (header csum {stored:#010x}, computed {computed:#010x}); {REMEDY}")]
    HeaderCorrupt {
        /// Store path.
        path: PathBuf,
        /// CRC stored in the header.
        stored: u32,
        /// CRC computed over the header.
        computed: u32,
    },
    /// The header's block size is not 4096 bytes.
    #[error("checksum store {path} has block size {found} bytes, pinblk uses 4096; {REMEDY}")]
    BlockSizeMismatch {
        /// Store path.
        path: PathBuf,
        /// Block size in the header, bytes.
        found: u32,
    },
    /// The header names an algorithm other than CRC32C.
    #[error(
        "checksum store {path} uses algorithm id {found}, pinblk uses crc32c (id 1); {REMEDY}"
    )]
    AlgorithmMismatch {
        /// Store path.
        path: PathBuf,
        /// Algorithm id in the header.
        found: u32,
    },
    /// The header's block count does not follow from its image size.
    #[error("checksum store {path} header says {block_count} blocks for an image of {image_size} bytes (expected {expected}); the header is corrupt; {REMEDY}")]
    BlockCountMismatch {
        /// Store path.
        path: PathBuf,
        /// Block count in the header.
        block_count: u64,
        /// Image size in the header, bytes.
        image_size: u64,
        /// ceil(image_size / 4096).
        expected: u64,
    },
    /// A layout field of a version 2 header (region size, region count,
    /// bitmap offset or length, table offset) does not follow from the image
    /// size and region size.
    #[error("checksum store {path} header field {field} is {found}, expected {expected} for an image of {image_size} bytes; the header is corrupt; {REMEDY}")]
    LayoutMismatch {
        /// Store path.
        path: PathBuf,
        /// The header field.
        field: &'static str,
        /// Its value in the header.
        found: u64,
        /// What it must be (for `region_size`: a power of two from 4096 to 1 GiB).
        expected: String,
        /// Image size in the header, bytes.
        image_size: u64,
    },
    /// The store covers an image of another size (the image was resized or
    /// the store belongs to another image).
    #[error("checksum store {path} covers an image of {store_size} bytes, but the image is {image_size} bytes (resized, or another image's store?); {REMEDY}")]
    ImageSizeMismatch {
        /// Store path.
        path: PathBuf,
        /// Image size in the store header, bytes.
        store_size: u64,
        /// Image size now, bytes.
        image_size: u64,
    },
    /// The store was made for another block device, or for an image file
    /// while a block device is served, or the other way round.
    #[error("checksum store {path} was made for {recorded}, but the image served is {found}; pass --checksum-store the store made for this image, or remove {path} to checksum this image afresh, or pass --checksum off")]
    IdentityMismatch {
        /// Store path.
        path: PathBuf,
        /// What the store records (`block device "ID"` or `an image file`).
        recorded: String,
        /// What is being served, in the same words.
        found: String,
    },
    /// The store file is not as long as its header says (version 2:
    /// `table_offset + 4 * block_count` bytes; version 1: `4096 + 4 * block_count`).
    #[error("checksum store {path} is {actual} bytes, expected {expected} for its header (truncated or extended); {REMEDY}")]
    LengthMismatch {
        /// Store path.
        path: PathBuf,
        /// Expected file length, bytes.
        expected: u64,
        /// Actual file length, bytes.
        actual: u64,
    },
    /// A cleanly closed store whose table does not match its `table_crc`.
    #[error("checksum store {path} has a corrupt checksum table (table csum {stored:#010x}, computed {computed:#010x}); {REMEDY}")]
    TableCorrupt {
        /// Store path.
        path: PathBuf,
        /// CRC stored in the header.
        stored: u32,
        /// CRC computed over the table.
        computed: u32,
    },
    /// Another process holds the store's advisory lock.
    #[error("checksum store {0} is in use by another process (advisory lock held); stop it first")]
    InUse(PathBuf),
    /// `close` found write-intent regions with a write still in flight
    /// (`intent_begin` without its `intent_end`): the store is left marked in
    /// use, so the next start recovers those regions.
    #[error("cannot close checksum store {path} cleanly: {regions} write-intent region(s) still have a write in flight (intent_begin without intent_end); it stays marked in use and the next start recovers those regions")]
    InFlightAtClose {
        /// Store path.
        path: PathBuf,
        /// Regions with a write in flight.
        regions: u64,
    },
    /// A record_* call on a store opened read-only.
    #[error("checksum store {0} is open read-only")]
    ReadOnly(PathBuf),
    /// A byte range beyond the image.
    #[error("range {offset}+{len} bytes is beyond the image ({image_size} bytes)")]
    OutOfRange {
        /// Start, bytes.
        offset: u64,
        /// Length, bytes.
        len: u64,
        /// Image size, bytes.
        image_size: u64,
    },
    /// A range that covers only part of a 4 KiB block was given to a call that
    /// needs whole blocks; use the `_with` variant that reads the rest.
    #[error("range {offset}+{len} bytes covers part of a 4 KiB block; use record_write_with/record_zero_with to read the rest of the block")]
    PartialBlock {
        /// Start, bytes.
        offset: u64,
        /// Length, bytes.
        len: u64,
    },
}

impl IntegrityError {
    pub(super) fn io<'a>(
        what: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(io::Error) -> IntegrityError + 'a {
        move |source| IntegrityError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
}
