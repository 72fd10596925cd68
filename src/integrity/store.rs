//! The checksum store: one CRC32C per 4 KiB block of the image, in memory and
//! in a file beside the image.
//!
//! # File format (version 1, all integers little-endian)
//!
//! ```text
//! offset  size  field
//!      0     8  magic          b"PINBLKCS"
//!      8     4  version        1
//!     12     4  block_size     4096 (bytes per checksum block)
//!     16     4  algorithm      1 = crc32c
//!     20     4  state          0 = clean (closed by close()), 1 = in use
//!     24     8  image_size     bytes of the image the table covers
//!     32     8  block_count    ceil(image_size / 4096)
//!     40     8  generation     +1 at every writable open
//!     48     4  header_crc     CRC32C of bytes 0..4096 with this field zeroed
//!     52     4  table_crc      CRC32C of the whole table; valid only when clean
//!     56  4040  reserved       zero
//!   4096  4*N   table          u32 CRC32C of block i at 4096 + 4*i
//! ```
//!
//! The file is exactly `4096 + 4 * block_count` bytes. Cost: 4 bytes per 4 KiB
//! of image (0.1 %), the same in memory, plus one dirty bit per block.
//!
//! # Durability
//!
//! [`ChecksumStore::record_write`] and friends update the in-memory table and
//! mark the entries dirty; [`ChecksumStore::flush`] writes the dirty entries
//! and fdatasyncs the store. The data path calls it when it serves a FLUSH,
//! *after* the image's fdatasync, so after a FLUSH completes the data and the
//! checksums on disk agree for every write completed before the FLUSH.
//!
//! # Unclean shutdown and recovery
//!
//! A writable open sets `state = in use` (and fsyncs) before any write is
//! served; [`ChecksumStore::close`] writes everything back and sets
//! `state = clean` with a `table_crc`. Dropping a store without `close` leaves
//! it in use, exactly like `kill -9`.
//!
//! The next writable open of an in-use store does a **full scan**: it reads
//! every block of the image, and each block whose CRC32C differs from the
//! stored one gets the image's CRC32C and is returned as a
//! [`RecoveredBlock`] (the caller reports it as `recovered`, not as a
//! failure). This is correct whatever the crash: any block whose data and
//! checksum disagree after the crash is, by construction, found and
//! re-learned, whether its write was in flight, completed after the last
//! FLUSH, or its checksum was flushed before its data landed. It needs
//! nothing from the data path (no intent records on the write path, no
//! ordering between store and image writes beyond FLUSH).
//!
//! Cost: one sequential read of the whole image plus CRC32C at several GB/s
//! (see the measured cost in the tests), only after an unclean shutdown;
//! holes of a sparse image are skipped (`SEEK_DATA`) and count as zeros.
//! A clean restart reads only the table. The price of the full scan is that a
//! block corrupted behind pinblk's back *before* the crash (or a torn write
//! not yet read back) is also re-learned and reported as `recovered` rather
//! than as a `checksum_failure`; the recovered list names every such block.
//! A write-intent bitmap (md-style, set before submission, cleared after a
//! later FLUSH) would narrow the scan to suspect regions at the cost of a
//! synchronous store write on the first write to a region per FLUSH interval;
//! it is not needed for correctness.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use super::{crc32c, crc32c_append, crc_of_zeros, BLOCK_SIZE, SECTORS_PER_BLOCK, SECTOR_SIZE};

/// Magic bytes at offset 0 of a checksum store.
pub const STORE_MAGIC: [u8; 8] = *b"PINBLKCS";
/// The store format version this code reads and writes.
pub const STORE_VERSION: u32 = 1;
/// Algorithm id of CRC32C in the store header.
pub const ALGORITHM_CRC32C: u32 = 1;
/// Size of the store header in bytes; the table starts at this offset.
pub const HEADER_SIZE: u64 = 4096;

const STATE_CLEAN: u32 = 0;
const STATE_IN_USE: u32 = 1;
const REMEDY: &str = "remove the store to rebuild it from the image, or pass --checksum off";
/// Bytes read from the image per scan step (256 blocks).
const SCAN_CHUNK: u64 = 1 << 20;
/// Lock stripes serializing read-modify-checksum of partial blocks.
const STRIPES: usize = 64;

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
    /// The file does not start with [`STORE_MAGIC`].
    #[error(
        "{path} is not a pinblk checksum store (magic {found:?}, expected \"PINBLKCS\"); {REMEDY}"
    )]
    NotAStore {
        /// Store path.
        path: PathBuf,
        /// The first 8 bytes found, lossily as text.
        found: String,
    },
    /// The header's version is not [`STORE_VERSION`].
    #[error("checksum store {path} has format version {found}, this pinblk reads version {supported}; {REMEDY}")]
    UnsupportedVersion {
        /// Store path.
        path: PathBuf,
        /// Version in the header.
        found: u32,
        /// Version this code supports.
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
    /// The store file is not `4096 + 4 * block_count` bytes long.
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
    fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> IntegrityError + 'a {
        move |source| IntegrityError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The default store path for an image: `IMAGE.pinsum` (the image's file
/// name with `.pinsum` appended, in the same directory).
pub fn default_store_path(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(".pinsum");
    PathBuf::from(s)
}

/// How to open a [`ChecksumStore`].
#[derive(Clone, Debug, Default)]
pub struct StoreOptions {
    /// Store path; `None` means [`default_store_path`] of the image.
    pub store_path: Option<PathBuf>,
    /// Image size in bytes the store must cover (the device capacity).
    /// `None` means the image file's length rounded down to 512-byte sectors.
    pub image_size: Option<u64>,
    /// Open read-only (shared lock, never writes: no creation, no recovery,
    /// the `state` flag is left as found). Used by scrub.
    pub read_only: bool,
}

/// What [`ChecksumStore::open`] found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpenOutcome {
    /// The store did not exist and was created from the image's content.
    pub created: bool,
    /// The store was found in use: the previous user did not close it
    /// (crash, `kill -9`). On a writable open it has been recovered.
    pub unclean: bool,
    /// Blocks whose stored checksum disagreed with the image after an
    /// unclean shutdown and were re-checksummed from the image. Report these
    /// as `recovered`. Empty on a clean open and on a read-only open.
    pub recovered: Vec<RecoveredBlock>,
    /// Generation of the store after this open (+1 per writable open).
    pub generation: u64,
}

/// A block re-checksummed from the image at open after an unclean shutdown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecoveredBlock {
    /// Block index (4 KiB units).
    pub block: u64,
    /// Checksum the store held (and that the data no longer matched).
    pub stored: u32,
    /// Checksum of the block as it is in the image, now stored.
    pub found: u32,
}

impl RecoveredBlock {
    /// First sector (512-byte units) of the block: `block * 8`.
    pub fn sector(&self) -> u64 {
        self.block * SECTORS_PER_BLOCK
    }
}

/// A block whose data does not match its stored checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// Block index (4 KiB units).
    pub block: u64,
    /// Checksum in the store.
    pub expected: u32,
    /// Checksum of the data.
    pub found: u32,
}

impl Mismatch {
    /// First sector (512-byte units) of the block: `block * 8`.
    pub fn sector(&self) -> u64 {
        self.block * SECTORS_PER_BLOCK
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    version: u32,
    block_size: u32,
    algorithm: u32,
    state: u32,
    image_size: u64,
    block_count: u64,
    generation: u64,
    table_crc: u32,
}

impl Header {
    fn new(image_size: u64) -> Header {
        Header {
            version: STORE_VERSION,
            block_size: BLOCK_SIZE as u32,
            algorithm: ALGORITHM_CRC32C,
            state: STATE_CLEAN,
            image_size,
            block_count: image_size.div_ceil(BLOCK_SIZE),
            generation: 0,
            table_crc: 0,
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE as usize];
        b[0..8].copy_from_slice(&STORE_MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&self.block_size.to_le_bytes());
        b[16..20].copy_from_slice(&self.algorithm.to_le_bytes());
        b[20..24].copy_from_slice(&self.state.to_le_bytes());
        b[24..32].copy_from_slice(&self.image_size.to_le_bytes());
        b[32..40].copy_from_slice(&self.block_count.to_le_bytes());
        b[40..48].copy_from_slice(&self.generation.to_le_bytes());
        b[52..56].copy_from_slice(&self.table_crc.to_le_bytes());
        let crc = crc32c(&b);
        b[48..52].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and validates everything that does not depend on the image.
    fn decode(b: &[u8], path: &Path) -> Result<Header, IntegrityError> {
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let path = || path.to_path_buf();
        if b.len() < 8 || b[0..8] != STORE_MAGIC {
            let n = b.len().min(8);
            return Err(IntegrityError::NotAStore {
                path: path(),
                found: String::from_utf8_lossy(&b[..n]).into_owned(),
            });
        }
        if b.len() < HEADER_SIZE as usize {
            return Err(IntegrityError::LengthMismatch {
                path: path(),
                expected: HEADER_SIZE,
                actual: b.len() as u64,
            });
        }
        let version = u32_at(8);
        if version != STORE_VERSION {
            return Err(IntegrityError::UnsupportedVersion {
                path: path(),
                found: version,
                supported: STORE_VERSION,
            });
        }
        let stored = u32_at(48);
        let mut copy = b[..HEADER_SIZE as usize].to_vec();
        copy[48..52].fill(0);
        let computed = crc32c(&copy);
        if stored != computed {
            return Err(IntegrityError::HeaderCorrupt {
                path: path(),
                stored,
                computed,
            });
        }
        let h = Header {
            version,
            block_size: u32_at(12),
            algorithm: u32_at(16),
            state: u32_at(20),
            image_size: u64_at(24),
            block_count: u64_at(32),
            generation: u64_at(40),
            table_crc: u32_at(52),
        };
        if u64::from(h.block_size) != BLOCK_SIZE {
            return Err(IntegrityError::BlockSizeMismatch {
                path: path(),
                found: h.block_size,
            });
        }
        if h.algorithm != ALGORITHM_CRC32C {
            return Err(IntegrityError::AlgorithmMismatch {
                path: path(),
                found: h.algorithm,
            });
        }
        let expected = h.image_size.div_ceil(BLOCK_SIZE);
        if h.block_count != expected {
            return Err(IntegrityError::BlockCountMismatch {
                path: path(),
                block_count: h.block_count,
                image_size: h.image_size,
                expected,
            });
        }
        Ok(h)
    }
}

/// Scatter-list cursor over the data of one request.
struct Gather<'a> {
    slices: &'a [&'a [u8]],
    idx: usize,
    pos: usize,
}

impl<'a> Gather<'a> {
    fn new(slices: &'a [&'a [u8]]) -> Self {
        Gather {
            slices,
            idx: 0,
            pos: 0,
        }
    }

    /// Feeds the next `n` bytes to `f`, slice by slice.
    fn take(&mut self, mut n: usize, mut f: impl FnMut(&[u8])) {
        while n > 0 {
            let s = self.slices[self.idx];
            let k = (s.len() - self.pos).min(n);
            f(&s[self.pos..self.pos + k]);
            self.pos += k;
            n -= k;
            if self.pos == s.len() {
                self.idx += 1;
                self.pos = 0;
            }
        }
    }

    fn crc_next(&mut self, n: usize) -> u32 {
        let mut crc = 0;
        self.take(n, |s| crc = crc32c_append(crc, s));
        crc
    }

    fn copy_next(&mut self, dst: &mut [u8]) {
        let mut at = 0;
        self.take(dst.len(), |s| {
            dst[at..at + s.len()].copy_from_slice(s);
            at += s.len();
        });
    }
}

/// Where the new bytes of a range come from.
enum Source<'a> {
    Data(Gather<'a>),
    Zero,
}

impl Source<'_> {
    fn crc_next(&mut self, n: usize) -> u32 {
        match self {
            Source::Data(g) => g.crc_next(n),
            Source::Zero => crc_of_zeros(n),
        }
    }

    fn copy_next(&mut self, dst: &mut [u8]) {
        match self {
            Source::Data(g) => g.copy_next(dst),
            Source::Zero => dst.fill(0),
        }
    }
}

/// Callback reading one whole block of the image: `(block byte offset, buf)`,
/// `buf.len()` = [`ChecksumStore::block_len`] (4096 except a short last block).
type ReadBlock<'r> = &'r mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>;

/// CRC32C per 4 KiB block of an image, in memory (lock-free per entry) and in
/// a store file. `Send + Sync`: several queues update different blocks
/// concurrently through `&self`. See the module docs for the file format,
/// durability and recovery.
#[derive(Debug)]
pub struct ChecksumStore {
    file: File,
    path: PathBuf,
    image_size: u64,
    block_count: u64,
    read_only: bool,
    table: Vec<AtomicU32>,
    /// One bit per block: entry changed since it was last written to the file.
    dirty: Vec<AtomicU64>,
    /// The header as on disk; its lock also serializes flush and close.
    header: Mutex<Header>,
    stripes: Vec<Mutex<()>>,
}

impl ChecksumStore {
    /// Opens the store of the image at `image_path`, creating it from the
    /// image's content if missing (progress as `log::info!` lines, every 10 %,
    /// for images of 256 MiB or more). See [`ChecksumStore::open_with_progress`].
    ///
    /// # Errors
    /// As [`ChecksumStore::open_with_progress`].
    pub fn open(
        image_path: &Path,
        opts: &StoreOptions,
    ) -> Result<(ChecksumStore, OpenOutcome), IntegrityError> {
        let store_path = opts
            .store_path
            .clone()
            .unwrap_or_else(|| default_store_path(image_path));
        let mut last_decile = u64::MAX;
        let mut progress = |done: u64, total: u64| {
            if total < (256 << 20) / BLOCK_SIZE {
                return;
            }
            let decile = done * 10 / total.max(1);
            if decile != last_decile {
                last_decile = decile;
                log::info!(
                    "checksum store {}: checksumming image {}: {}% ({done}/{total} blocks of 4 KiB)",
                    store_path.display(),
                    image_path.display(),
                    decile * 10
                );
            }
        };
        Self::open_with_progress(image_path, opts, &mut progress)
    }

    /// Opens the store of the image at `image_path`.
    ///
    /// - Missing store (writable open): created from the image's content
    ///   (every block read and checksummed, holes of a sparse image count as
    ///   zeros), written to `STORE.tmp`, fsynced and renamed into place, so a
    ///   pre-existing image starts consistent.
    /// - Existing store: the header is validated (magic, version, block size,
    ///   algorithm, header CRC, image size, file length; a clean store's
    ///   table CRC). Any mismatch is refused, never silently rebuilt.
    /// - Store left in use (unclean shutdown): on a writable open, full scan
    ///   of the image; mismatching blocks are re-checksummed and returned in
    ///   [`OpenOutcome::recovered`]. On a read-only open, nothing is changed
    ///   and only [`OpenOutcome::unclean`] is set.
    /// - A writable open then marks the store in use, bumps the generation
    ///   and fsyncs, and holds an exclusive `flock` (shared when read-only).
    ///
    /// `progress(done_blocks, total_blocks)` is called while the image is
    /// scanned (creation or recovery), in 4 KiB blocks.
    ///
    /// # Errors
    /// [`IntegrityError::StoreMissing`] (read-only, no store),
    /// [`IntegrityError::InUse`], [`IntegrityError::NotAStore`],
    /// [`IntegrityError::UnsupportedVersion`], [`IntegrityError::HeaderCorrupt`],
    /// [`IntegrityError::BlockSizeMismatch`], [`IntegrityError::AlgorithmMismatch`],
    /// [`IntegrityError::BlockCountMismatch`], [`IntegrityError::ImageSizeMismatch`],
    /// [`IntegrityError::LengthMismatch`], [`IntegrityError::TableCorrupt`],
    /// [`IntegrityError::Io`].
    pub fn open_with_progress(
        image_path: &Path,
        opts: &StoreOptions,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(ChecksumStore, OpenOutcome), IntegrityError> {
        let path = opts
            .store_path
            .clone()
            .unwrap_or_else(|| default_store_path(image_path));
        let image = File::open(image_path).map_err(IntegrityError::io("open image", image_path))?;
        let image_size = match opts.image_size {
            Some(s) => s,
            None => {
                let len = image
                    .metadata()
                    .map_err(IntegrityError::io("stat image", image_path))?
                    .len();
                len / SECTOR_SIZE * SECTOR_SIZE
            }
        };
        let mut outcome = OpenOutcome::default();

        if !path.exists() {
            if opts.read_only {
                return Err(IntegrityError::StoreMissing(path));
            }
            create_store(&path, &image, image_path, image_size, progress)?;
            outcome.created = true;
        }

        let file = OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .open(&path)
            .map_err(IntegrityError::io("open checksum store", &path))?;
        let op = if opts.read_only {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on a valid, owned fd; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(IntegrityError::InUse(path));
            }
            return Err(IntegrityError::Io {
                what: "lock checksum store",
                path,
                source: err,
            });
        }

        let actual = file
            .metadata()
            .map_err(IntegrityError::io("stat checksum store", &path))?
            .len();
        let mut hbuf = vec![0u8; (HEADER_SIZE.min(actual)) as usize];
        file.read_exact_at(&mut hbuf, 0)
            .map_err(IntegrityError::io("read checksum store header", &path))?;
        let mut header = Header::decode(&hbuf, &path)?;
        if header.image_size != image_size {
            return Err(IntegrityError::ImageSizeMismatch {
                path,
                store_size: header.image_size,
                image_size,
            });
        }
        let expected_len = HEADER_SIZE + 4 * header.block_count;
        if actual != expected_len {
            return Err(IntegrityError::LengthMismatch {
                path,
                expected: expected_len,
                actual,
            });
        }

        let mut raw = vec![0u8; 4 * header.block_count as usize];
        file.read_exact_at(&mut raw, HEADER_SIZE)
            .map_err(IntegrityError::io("read checksum table", &path))?;
        if header.state == STATE_CLEAN {
            let computed = crc32c(&raw);
            if computed != header.table_crc {
                return Err(IntegrityError::TableCorrupt {
                    path,
                    stored: header.table_crc,
                    computed,
                });
            }
        } else {
            outcome.unclean = true;
        }
        let table: Vec<AtomicU32> = raw
            .chunks_exact(4)
            .map(|c| AtomicU32::new(u32::from_le_bytes(c.try_into().unwrap())))
            .collect();
        drop(raw);

        let block_count = header.block_count;
        let store = ChecksumStore {
            file,
            path,
            image_size,
            block_count,
            read_only: opts.read_only,
            table,
            dirty: (0..block_count.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            header: Mutex::new(header),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        };

        if opts.read_only {
            outcome.generation = header.generation;
            return Ok((store, outcome));
        }

        if outcome.unclean {
            log::warn!(
                "checksum store {}: not closed cleanly (generation {}); re-checksumming the image {} to recover blocks that were in flight",
                store.path.display(),
                header.generation,
                image_path.display()
            );
            scan_image(&image, image_path, image_size, progress, |block, crc| {
                let stored = store.table[block as usize].load(Ordering::Relaxed);
                if stored != crc {
                    store.set(block, crc);
                    outcome.recovered.push(RecoveredBlock {
                        block,
                        stored,
                        found: crc,
                    });
                }
            })?;
            log::warn!(
                "checksum store {}: recovered {} block(s) after the unclean shutdown",
                store.path.display(),
                outcome.recovered.len()
            );
        }

        header.state = STATE_IN_USE;
        header.generation += 1;
        header.table_crc = 0;
        {
            let mut h = store.header.lock().unwrap_or_else(|e| e.into_inner());
            store
                .write_dirty()
                .map_err(IntegrityError::io("write checksum table", &store.path))?;
            store
                .file
                .write_all_at(&header.encode(), 0)
                .and_then(|_| store.file.sync_data())
                .map_err(IntegrityError::io(
                    "mark checksum store in use",
                    &store.path,
                ))?;
            *h = header;
        }
        outcome.generation = header.generation;
        Ok((store, outcome))
    }

    /// Path of the store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Image size covered, in bytes.
    pub fn image_size(&self) -> u64 {
        self.image_size
    }

    /// Number of 4 KiB blocks: `ceil(image_size / 4096)`.
    pub fn block_count(&self) -> u64 {
        self.block_count
    }

    /// Store generation (incremented at every writable open).
    pub fn generation(&self) -> u64 {
        self.header
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .generation
    }

    /// Length in bytes of block `block`: 4096, or less for the last block of
    /// an image whose size is not a multiple of 4096; 0 beyond the image.
    pub fn block_len(&self, block: u64) -> usize {
        let start = block.saturating_mul(BLOCK_SIZE);
        (self.image_size.saturating_sub(start)).min(BLOCK_SIZE) as usize
    }

    /// The stored CRC32C of block `block` (4 KiB units), or `None` beyond the image.
    pub fn expected(&self, block: u64) -> Option<u32> {
        self.table
            .get(usize::try_from(block).ok()?)
            .map(|e| e.load(Ordering::Acquire))
    }

    /// Sets the stored CRC32C of block `block` (4 KiB units) directly, e.g.
    /// to the checksum taken at submission when the caller already has it
    /// (R3: the stored checksum is the submitted one).
    ///
    /// # Errors
    /// [`IntegrityError::OutOfRange`] beyond the image,
    /// [`IntegrityError::ReadOnly`].
    pub fn set_expected(&self, block: u64, crc: u32) -> Result<(), IntegrityError> {
        self.writable()?;
        if block >= self.block_count {
            return Err(IntegrityError::OutOfRange {
                offset: block.saturating_mul(BLOCK_SIZE),
                len: BLOCK_SIZE,
                image_size: self.image_size,
            });
        }
        self.set(block, crc);
        Ok(())
    }

    /// Records a WRITE of `data` (a scatter list, concatenated) at byte
    /// `offset`: every 4 KiB block it covers gets the CRC32C of its new
    /// content. The range must consist of whole blocks (a short last block of
    /// the image counts as whole); call it at submission, with the bytes
    /// being submitted.
    ///
    /// # Errors
    /// [`IntegrityError::PartialBlock`] if the range starts or ends inside a
    /// block (nothing is recorded; use [`ChecksumStore::record_write_with`]),
    /// [`IntegrityError::OutOfRange`], [`IntegrityError::ReadOnly`].
    pub fn record_write(&self, offset: u64, data: &[&[u8]]) -> Result<(), IntegrityError> {
        let len = data.iter().map(|s| s.len() as u64).sum();
        self.apply(offset, len, Source::Data(Gather::new(data)), None)
    }

    /// Records a WRITE of `data` at byte `offset` of any alignment (e.g.
    /// 512-byte writes with a 512-byte logical block). For a block the write
    /// covers only partly, the new checksum is of the whole block as it will
    /// be on disk: `read_rest(block_offset_bytes, buf)` must fill `buf`
    /// (`block_len` bytes, 4096 except a short last block) with the block's
    /// current content from the image, and the written bytes are laid over it.
    /// `read_rest` is called at most twice (first and last block), under a
    /// per-block lock, so concurrent partial writes recorded through this
    /// store are serialized. The caller must make sure that what `read_rest`
    /// returns includes earlier writes to the same block (e.g. serialize
    /// overlapping partial-block writes, or call
    /// [`ChecksumStore::refresh_with`] at completion).
    ///
    /// # Errors
    /// [`IntegrityError::OutOfRange`], [`IntegrityError::ReadOnly`],
    /// [`IntegrityError::Io`] if `read_rest` fails (blocks fully covered
    /// before the failing block may already be recorded).
    pub fn record_write_with(
        &self,
        offset: u64,
        data: &[&[u8]],
        mut read_rest: impl FnMut(u64, &mut [u8]) -> io::Result<()>,
    ) -> Result<(), IntegrityError> {
        let len = data.iter().map(|s| s.len() as u64).sum();
        self.apply(
            offset,
            len,
            Source::Data(Gather::new(data)),
            Some(&mut read_rest),
        )
    }

    /// Records a DISCARD or WRITE_ZEROES of `len` bytes at byte `offset`:
    /// every block covered gets the checksum of zeros
    /// ([`super::crc_of_zero_block`]). Whole blocks only.
    ///
    /// # Errors
    /// [`IntegrityError::PartialBlock`] (nothing recorded; use
    /// [`ChecksumStore::record_zero_with`]), [`IntegrityError::OutOfRange`],
    /// [`IntegrityError::ReadOnly`].
    pub fn record_zero(&self, offset: u64, len: u64) -> Result<(), IntegrityError> {
        self.apply(offset, len, Source::Zero, None)
    }

    /// Records a DISCARD or WRITE_ZEROES of `len` bytes at byte `offset` of
    /// any alignment; partly covered blocks are read with `read_rest` as in
    /// [`ChecksumStore::record_write_with`] and the zeroed bytes laid over.
    ///
    /// # Errors
    /// As [`ChecksumStore::record_write_with`].
    pub fn record_zero_with(
        &self,
        offset: u64,
        len: u64,
        mut read_rest: impl FnMut(u64, &mut [u8]) -> io::Result<()>,
    ) -> Result<(), IntegrityError> {
        self.apply(offset, len, Source::Zero, Some(&mut read_rest))
    }

    /// Re-checksums every block that the byte range `offset..offset+len`
    /// touches from the image, reading each whole block with
    /// `read(block_offset_bytes, buf)`. For a data path that records partial
    /// blocks at completion (after the write landed) instead of at submission.
    ///
    /// # Errors
    /// [`IntegrityError::OutOfRange`], [`IntegrityError::ReadOnly`],
    /// [`IntegrityError::Io`] if `read` fails.
    pub fn refresh_with(
        &self,
        offset: u64,
        len: u64,
        mut read: impl FnMut(u64, &mut [u8]) -> io::Result<()>,
    ) -> Result<(), IntegrityError> {
        self.writable()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let mut buf = [0u8; BLOCK_SIZE as usize];
        for block in offset / BLOCK_SIZE..=(offset + len - 1) / BLOCK_SIZE {
            let blen = self.block_len(block);
            let _g = self.stripe(block);
            read(block * BLOCK_SIZE, &mut buf[..blen]).map_err(IntegrityError::io(
                "read image block to re-checksum",
                &self.path,
            ))?;
            self.set(block, crc32c(&buf[..blen]));
        }
        Ok(())
    }

    /// Verifies `data` (a scatter list) read from byte `offset` against the
    /// store. Only blocks the read covers whole are verified: a partly
    /// covered edge block cannot be checked from the read data alone and is
    /// skipped (use [`ChecksumStore::verify_with`] to check it too). Returns
    /// the mismatching blocks, in block order; empty means all verified
    /// blocks match.
    ///
    /// # Errors
    /// [`IntegrityError::OutOfRange`].
    pub fn verify(&self, offset: u64, data: &[&[u8]]) -> Result<Vec<Mismatch>, IntegrityError> {
        self.verify_inner(offset, data, None)
    }

    /// Like [`ChecksumStore::verify`], but partly covered edge blocks are
    /// verified too: `read_rest(block_offset_bytes, buf)` fills the whole
    /// block from the image, and the read data is laid over it.
    ///
    /// # Errors
    /// [`IntegrityError::OutOfRange`], [`IntegrityError::Io`] if `read_rest` fails.
    pub fn verify_with(
        &self,
        offset: u64,
        data: &[&[u8]],
        mut read_rest: impl FnMut(u64, &mut [u8]) -> io::Result<()>,
    ) -> Result<Vec<Mismatch>, IntegrityError> {
        self.verify_inner(offset, data, Some(&mut read_rest))
    }

    /// Writes the entries changed since the last flush to the store file and
    /// fdatasyncs it. Call it when serving a FLUSH, after the image's
    /// fdatasync: then data and checksums on disk agree for every write
    /// completed before the FLUSH. Concurrent record_* calls are fine (what
    /// they change after the dirty bits were taken goes in the next flush).
    ///
    /// # Errors
    /// The `io::Error` of the write or fdatasync (the entries stay dirty in
    /// memory only as far as they were not written; retry is safe).
    /// On a read-only store: `PermissionDenied`.
    pub fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "checksum store is read-only",
            ));
        }
        let _h = self.header.lock().unwrap_or_else(|e| e.into_inner());
        self.write_dirty()?;
        self.file.sync_data()
    }

    /// Closes the store cleanly: writes the dirty entries, the table CRC and
    /// `state = clean`, and fdatasyncs. Call it at shutdown after the image's
    /// last fdatasync and with no write in flight. The next open then skips
    /// recovery. A read-only store is just closed.
    ///
    /// # Errors
    /// [`IntegrityError::Io`]; the store then stays marked in use and the
    /// next open recovers.
    pub fn close(self) -> Result<(), IntegrityError> {
        if self.read_only {
            return Ok(());
        }
        let mut h = self.header.lock().unwrap_or_else(|e| e.into_inner());
        let io = IntegrityError::io("close checksum store", &self.path);
        let res = (|| {
            self.write_dirty()?;
            let mut table_crc = 0;
            let mut buf = Vec::with_capacity(64 * 1024);
            for chunk in self.table.chunks(16 * 1024) {
                buf.clear();
                for e in chunk {
                    buf.extend_from_slice(&e.load(Ordering::Acquire).to_le_bytes());
                }
                table_crc = crc32c_append(table_crc, &buf);
            }
            let mut clean = *h;
            clean.state = STATE_CLEAN;
            clean.table_crc = table_crc;
            // The table is durable before the header says clean.
            self.file.sync_data()?;
            self.file.write_all_at(&clean.encode(), 0)?;
            self.file.sync_data()?;
            *h = clean;
            Ok(())
        })();
        res.map_err(io)
    }

    fn writable(&self) -> Result<(), IntegrityError> {
        if self.read_only {
            Err(IntegrityError::ReadOnly(self.path.clone()))
        } else {
            Ok(())
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), IntegrityError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.image_size => Ok(()),
            _ => Err(IntegrityError::OutOfRange {
                offset,
                len,
                image_size: self.image_size,
            }),
        }
    }

    fn stripe(&self, block: u64) -> std::sync::MutexGuard<'_, ()> {
        self.stripes[(block % STRIPES as u64) as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Stores an entry and marks it dirty (entry first, so a flush that sees
    /// the bit writes the new value; one that misses it leaves it for later).
    fn set(&self, block: u64, crc: u32) {
        self.table[block as usize].store(crc, Ordering::Release);
        self.dirty[(block / 64) as usize].fetch_or(1 << (block % 64), Ordering::AcqRel);
    }

    /// Range of a block covered by `offset..end`, as offsets within the block.
    fn covered(&self, block: u64, offset: u64, end: u64) -> (usize, usize, usize) {
        let bs = block * BLOCK_SIZE;
        let blen = self.block_len(block);
        let s = offset.max(bs) - bs;
        let e = end.min(bs + blen as u64) - bs;
        (s as usize, e as usize, blen)
    }

    fn apply(
        &self,
        offset: u64,
        len: u64,
        mut src: Source<'_>,
        mut read_rest: Option<ReadBlock<'_>>,
    ) -> Result<(), IntegrityError> {
        self.writable()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let (first, last) = (offset / BLOCK_SIZE, (end - 1) / BLOCK_SIZE);
        if read_rest.is_none() {
            for b in [first, last] {
                let (s, e, blen) = self.covered(b, offset, end);
                if s != 0 || e != blen {
                    return Err(IntegrityError::PartialBlock { offset, len });
                }
            }
        }
        let mut buf = [0u8; BLOCK_SIZE as usize];
        for block in first..=last {
            let (s, e, blen) = self.covered(block, offset, end);
            if s == 0 && e == blen {
                let crc = src.crc_next(blen);
                self.set(block, crc);
                continue;
            }
            let read = read_rest.as_mut().expect("partial blocks checked above");
            let _g = self.stripe(block);
            read(block * BLOCK_SIZE, &mut buf[..blen]).map_err(IntegrityError::io(
                "read rest of partial block from image",
                &self.path,
            ))?;
            src.copy_next(&mut buf[s..e]);
            self.set(block, crc32c(&buf[..blen]));
        }
        Ok(())
    }

    fn verify_inner(
        &self,
        offset: u64,
        data: &[&[u8]],
        mut read_rest: Option<ReadBlock<'_>>,
    ) -> Result<Vec<Mismatch>, IntegrityError> {
        let len: u64 = data.iter().map(|s| s.len() as u64).sum();
        self.check_range(offset, len)?;
        let mut out = Vec::new();
        if len == 0 {
            return Ok(out);
        }
        let end = offset + len;
        let mut g = Gather::new(data);
        for block in offset / BLOCK_SIZE..=(end - 1) / BLOCK_SIZE {
            let (s, e, blen) = self.covered(block, offset, end);
            let found = if s == 0 && e == blen {
                g.crc_next(blen)
            } else if let Some(read) = read_rest.as_mut() {
                // Only partial edge blocks need a buffer (no 4 KiB memset per READ).
                let mut buf = [0u8; BLOCK_SIZE as usize];
                read(block * BLOCK_SIZE, &mut buf[..blen]).map_err(IntegrityError::io(
                    "read rest of partial block from image",
                    &self.path,
                ))?;
                g.copy_next(&mut buf[s..e]);
                crc32c(&buf[..blen])
            } else {
                g.take(e - s, |_| {});
                continue;
            };
            let expected = self.table[block as usize].load(Ordering::Acquire);
            if expected != found {
                out.push(Mismatch {
                    block,
                    expected,
                    found,
                });
            }
        }
        Ok(out)
    }

    /// Writes every dirty entry (coalesced into runs of consecutive blocks)
    /// to the file. Caller holds the header lock. On error every entry taken
    /// here is marked dirty again, so a retry writes it.
    fn write_dirty(&self) -> io::Result<()> {
        let taken: Vec<(usize, u64)> = self
            .dirty
            .iter()
            .enumerate()
            .filter_map(|(w, word)| match word.swap(0, Ordering::AcqRel) {
                0 => None,
                bits => Some((w, bits)),
            })
            .collect();
        let mut run_start = 0u64;
        let mut run: Vec<u8> = Vec::new();
        let mut res = Ok(());
        for &(w, mut bits) in &taken {
            while bits != 0 && res.is_ok() {
                let block = w as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                if !run.is_empty() && run_start + (run.len() / 4) as u64 != block {
                    res = self.file.write_all_at(&run, HEADER_SIZE + 4 * run_start);
                    run.clear();
                }
                if run.is_empty() {
                    run_start = block;
                }
                let val = self.table[block as usize].load(Ordering::Acquire);
                run.extend_from_slice(&val.to_le_bytes());
            }
        }
        if res.is_ok() && !run.is_empty() {
            res = self.file.write_all_at(&run, HEADER_SIZE + 4 * run_start);
        }
        if res.is_err() {
            for &(w, bits) in &taken {
                self.dirty[w].fetch_or(bits, Ordering::AcqRel);
            }
        }
        res
    }
}

/// A FLUSH's place in the write-intent record (see [`ChecksumStore::flush_begin`]).
#[derive(Clone, Copy, Debug)]
pub struct FlushTicket(#[allow(dead_code)] u64);

// Write-intent API of the data path (interim: no record yet).
impl ChecksumStore {
    /// Before a write of image bytes `offset..offset+len` is submitted.
    ///
    /// # Errors
    /// None yet.
    pub fn intent_begin(&self, _offset: u64, _len: u64) -> Result<(), IntegrityError> {
        Ok(())
    }

    /// After that write completed and its checksums were recorded.
    pub fn intent_end(&self, _offset: u64, _len: u64) {}

    /// When a FLUSH is submitted.
    pub fn flush_begin(&self) -> FlushTicket {
        FlushTicket(0)
    }

    /// After the FLUSH made image and store durable.
    pub fn flush_end(&self, _t: FlushTicket) {}

    /// The store file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// Creates a clean store for `image` at `path` via `path.tmp` + rename.
fn create_store(
    path: &Path,
    image: &File,
    image_path: &Path,
    image_size: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), IntegrityError> {
    let mut tmp_os = path.as_os_str().to_owned();
    tmp_os.push(".tmp");
    let tmp = PathBuf::from(tmp_os);
    log::info!(
        "checksum store {}: creating from image {} ({} bytes, {} blocks of 4 KiB)",
        path.display(),
        image_path.display(),
        image_size,
        image_size.div_ceil(BLOCK_SIZE)
    );
    let mut table = Vec::with_capacity(4 * image_size.div_ceil(BLOCK_SIZE) as usize);
    scan_image(image, image_path, image_size, progress, |_, crc| {
        table.extend_from_slice(&crc.to_le_bytes())
    })?;
    let mut header = Header::new(image_size);
    header.table_crc = crc32c(&table);
    let io = IntegrityError::io("create checksum store", &tmp);
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(IntegrityError::io("create checksum store", &tmp))?;
    f.write_all_at(&header.encode(), 0)
        .and_then(|_| f.write_all_at(&table, HEADER_SIZE))
        .and_then(|_| f.sync_all())
        .map_err(io)?;
    std::fs::rename(&tmp, path).map_err(IntegrityError::io("rename checksum store into", path))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Reads the image (`image_size` bytes) in 1 MiB steps and calls
/// `per_block(block, crc)` for every 4 KiB block in order; `progress(done,
/// total)` after each step. Holes (per `SEEK_DATA`) are not read: they are
/// zeros. Bytes past the end of the file read as zeros.
pub(super) fn scan_image(
    image: &File,
    image_path: &Path,
    image_size: u64,
    progress: &mut dyn FnMut(u64, u64),
    mut per_block: impl FnMut(u64, u32),
) -> Result<(), IntegrityError> {
    let total = image_size.div_ceil(BLOCK_SIZE);
    let mut buf = vec![0u8; SCAN_CHUNK as usize];
    let mut pos = 0u64;
    let mut block = 0u64;
    progress(0, total);
    while pos < image_size {
        let n = (image_size - pos).min(SCAN_CHUNK) as usize;
        let hole = chunk_is_hole(image, pos, n as u64);
        if !hole {
            read_full_at(image, &mut buf[..n], pos)
                .map_err(IntegrityError::io("read image", image_path))?;
        }
        let mut at = 0;
        while at < n {
            let blen = (n - at).min(BLOCK_SIZE as usize);
            let crc = if hole {
                crc_of_zeros(blen)
            } else {
                crc32c(&buf[at..at + blen])
            };
            per_block(block, crc);
            block += 1;
            at += blen;
        }
        pos += n as u64;
        progress(block, total);
    }
    Ok(())
}

/// True when `pos..pos+len` of `f` is certainly a hole (no data per
/// `SEEK_DATA`); false when it has data or the filesystem cannot tell.
fn chunk_is_hole(f: &File, pos: u64, len: u64) -> bool {
    let Ok(off) = libc::off_t::try_from(pos) else {
        return false;
    };
    // SAFETY: lseek on a valid, owned fd; the file offset it moves is unused
    // (all reads here are positional).
    let r = unsafe { libc::lseek(f.as_raw_fd(), off, libc::SEEK_DATA) };
    if r < 0 {
        // ENXIO: no data at or after pos (the rest is a hole or past EOF).
        return io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
    }
    r as u64 >= pos + len
}

/// Reads `buf.len()` bytes at `pos`, zero-filling past the end of the file.
fn read_full_at(f: &File, buf: &mut [u8], mut pos: u64) -> io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        match f.read_at(&mut buf[at..], pos) {
            Ok(0) => {
                buf[at..].fill(0);
                break;
            }
            Ok(k) => {
                at += k;
                pos += k as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
