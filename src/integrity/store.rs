//! The checksum store: one CRC32C per 4 KiB block of the image and a
//! write-intent bitmap of 1 MiB regions, in a file beside the image that is
//! memory-mapped while the store is open.
//!
//! # File format (version 2, all integers little-endian)
//!
//! ```text
//! offset  size  field
//!      0     8  magic          b"PINBLKCS"
//!      8     4  version        2
//!     12     4  block_size     4096 (bytes per checksum block)
//!     16     4  algorithm      1 = crc32c
//!     20     4  state          0 = clean (closed by close()), 1 = in use
//!     24     8  image_size     bytes of the image the store covers
//!     32     8  block_count    N = ceil(image_size / 4096)
//!     40     8  generation     +1 at every writable open
//!     48     4  header_crc     CRC32C of bytes 0..4096 with this field zeroed
//!     52     4  table_crc      CRC32C of the whole table; valid only when clean
//!     56     8  region_size    bytes per write-intent region (1 MiB; a power
//!                              of two from 4096 to 1 GiB)
//!     64     8  region_count   R = ceil(image_size / region_size)
//!     72     8  bitmap_offset  4096
//!     80     8  bitmap_len     ceil(R / 8) rounded up to a multiple of 4096 (≥ 4096)
//!     88     8  table_offset   bitmap_offset + bitmap_len
//!     96     4  identity_len   bytes of identity; 0 = made for an image file
//!    100   200  identity       a block device's identity (WWID, serial, dm
//!                              UUID, loop backing file), zero-padded
//!    300  3796  reserved       zero
//!   4096     …  bitmap         bit r (bit r % 8 of byte r / 8) set: region r
//!                              (bytes r * region_size ..) may have a write in
//!                              flight or not yet flushed
//! table_offset 4*N table       u32 CRC32C of block i at table_offset + 4*i
//! ```
//!
//! The file is exactly `table_offset + 4 * N` bytes ([`StoreLayout`]).
//! Cost per GiB of image: table 1 MiB (4 bytes per 4 KiB, 0.1 %), bitmap 128
//! bytes (1024 regions; one 4 KiB bitmap page covers 32 GiB), plus the 4 KiB
//! header and the bitmap's padding. In memory: the mapping (page cache, the
//! same bytes) and 16 bytes per region (in-flight count, last completion
//! generation): 16 KiB per GiB.
//!
//! A version 1 store (no bitmap, table at 4096) is migrated on a writable
//! open: same table, a new file renamed into place; a clean one gets an empty
//! bitmap, one left in use gets every region marked (version 1 recorded no
//! write intent). A read-only open (scrub) refuses it
//! ([`IntegrityError::NeedsMigration`]).
//!
//! # Durability
//!
//! Table and bitmap live in a `MAP_SHARED` mapping of the file: every
//! [`ChecksumStore::set_expected`] / `record_*` and every bit set by
//! [`ChecksumStore::intent_begin`] is in the page cache as soon as the call
//! returns, so a **process crash** (`kill -9`, panic, abort) loses nothing.
//! [`ChecksumStore::flush`] is an fdatasync of the store file (which writes
//! back the pages dirtied through the mapping); the data path may submit that
//! fdatasync itself on [`ChecksumStore::file`]. After a FLUSH (image
//! fdatasync, then store fdatasync) data and checksums on disk agree for
//! every write completed before it. The header is written with `pwrite` +
//! fdatasync at open and at close only.
//!
//! # Write intent
//!
//! The data path brackets every WRITE / DISCARD / WRITE_ZEROES:
//! [`ChecksumStore::intent_begin`] before its checksums are recorded and
//! before it is submitted (sets the bits of its regions, counts it in flight),
//! [`ChecksumStore::intent_end`] after it completed and its checksums were
//! recorded (in flight −1, the region's last completion epoch = the FLUSH
//! epoch now). A FLUSH takes a [`FlushTicket`]
//! ([`ChecksumStore::flush_begin`]: the epoch, which it then advances) when it
//! is submitted, and after the fdatasync of the image and of the store
//! completed, [`ChecksumStore::flush_end`] clears the bit of every region with
//! nothing in flight and no completion in a later epoch. So a bit is clear
//! only when every write to its region is durable together with its
//! checksums. No lock on this path, and two atomic read-modify-writes per
//! write and region (the in-flight count up and down): per region one atomic
//! word (in-flight count, and a flag that holds off `intent_begin` for the
//! few instructions `flush_end` needs to clear that region's bit), the bit
//! set only if a relaxed load shows it clear, the region's epoch raised only
//! at its first completion after a FLUSH began (the epoch moves at FLUSHes,
//! not at every write).
//!
//! # Unclean stop and recovery
//!
//! A writable open sets `state = in use` (and fdatasyncs) before any write
//! is served; [`ChecksumStore::close`] clears the bitmap and sets
//! `state = clean` with a `table_crc`. Dropping a store without `close`
//! leaves it in use, exactly like `kill -9`.
//!
//! The next writable open of an in-use store scans the whole image
//! (`SEEK_DATA` skips holes, which count as zeros) and compares every block:
//!
//! - a mismatching block inside a **marked** region may have been in flight:
//!   the image's checksum is adopted, and the region is returned once, with
//!   the blocks re-learned, as a [`RecoveredRegion`] (reported `recovered`);
//! - a mismatching block **outside** every marked region had no write in
//!   flight: its stored checksum is kept and it is returned as a cold
//!   [`Mismatch`] in [`OpenOutcome::cold_mismatches`] (reported as a
//!   `checksum_failure`); later READs of it fail verification and scrub fails.
//!
//! Then the image and the store are fdatasynced, the bitmap cleared and the
//! header marked in use again. After `kill -9`, `recovered` covers at most the
//! regions written since the last completed FLUSH; the blocks re-learned are
//! at most those of the writes in flight (a completed write's data and
//! checksum are both in the page cache).
//!
//! Limit: bits and entries reach the disk at fdatasync. After a power loss
//! or kernel crash, a write submitted since the last FLUSH whose data
//! reached the disk while its region's bit did not is reported as a cold
//! mismatch (a false `checksum_failure`). md avoids this by writing the
//! bitmap synchronously before the first write to a region; here that would
//! put an fdatasync on the write path.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use super::error::IntegrityError;
use super::format::{
    create_store, migrate_v1, open_locked, Header, Identity, StoreLayout, STATE_CLEAN, STATE_IN_USE,
};
use super::mapping::Mapping;
use super::{crc32c, crc32c_append, crc_of_zeros, BLOCK_SIZE, SECTORS_PER_BLOCK, SECTOR_SIZE};

pub(super) use super::format::scan_image;

/// Lock stripes serializing read-modify-checksum of partial blocks.
const STRIPES: usize = 64;
/// Bit of [`RegionState::state`] set while `flush_end` clears the region's
/// bit; the low 31 bits count the writes in flight.
const CLEARING: u32 = 1 << 31;
const IN_FLIGHT: u32 = CLEARING - 1;

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
    /// Open read-only (shared lock, never writes: no creation, no migration,
    /// no recovery, the `state` flag and the bitmap are left as found). Used
    /// by scrub.
    pub read_only: bool,
    /// The identity of the block device served (docs/DESIGN.md §7), `None`
    /// for an image file. A new store records it; an existing one must
    /// record the same (an image file's store records none), else
    /// [`IntegrityError::IdentityMismatch`]. Not checked on a read-only
    /// open without one (scrub reads any store against the image it is given).
    pub identity: Option<String>,
}

/// What [`ChecksumStore::open`] found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpenOutcome {
    /// The store did not exist and was created from the image's content.
    pub created: bool,
    /// The store was in this older format version and has been migrated to
    /// [`super::STORE_VERSION`] (writable open only).
    pub migrated_from: Option<u32>,
    /// The store was found in use: the previous user did not close it
    /// (crash, `kill -9`). On a writable open it has been recovered.
    pub unclean: bool,
    /// Write-intent regions marked when the store was opened (0 after a
    /// clean close).
    pub marked_regions: u64,
    /// Marked regions in which blocks disagreed with the image after an
    /// unclean stop and were re-checksummed from the image, in region order.
    /// Report each as one `recovered`. Empty on a clean or read-only open.
    pub recovered: Vec<RecoveredRegion>,
    /// Blocks outside every marked region that disagreed with the image
    /// after an unclean stop, in block order. No write was in flight there:
    /// the stored checksum is kept (so READs and scrub keep failing) and each
    /// is a `checksum_failure`. Empty on a clean or read-only open.
    pub cold_mismatches: Vec<Mismatch>,
    /// Generation of the store after this open (+1 per writable open).
    pub generation: u64,
}

/// A marked write-intent region whose blocks that disagreed with the image
/// were re-checksummed from it at open after an unclean stop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveredRegion {
    /// Region index (units of the store's region size, 1 MiB).
    pub region: u64,
    /// First sector of the region (512-byte units).
    pub first_sector: u64,
    /// Length of the region in bytes (the region size; less for the image's
    /// last region).
    pub len_bytes: u64,
    /// The blocks re-learned (4 KiB units), ascending, at least one.
    pub blocks: Vec<u64>,
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

/// The FLUSH epoch at the submission of a FLUSH
/// ([`ChecksumStore::flush_begin`]); give it back to
/// [`ChecksumStore::flush_end`] once the FLUSH's fdatasyncs completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FlushTicket {
    epoch: u64,
}

impl FlushTicket {
    /// The epoch it holds: a write whose `intent_end` saw this epoch or an
    /// earlier one completed before the FLUSH was submitted.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

/// In-memory write-intent state of one region (not persisted).
#[derive(Debug, Default)]
struct RegionState {
    /// Writes in flight (low 31 bits) and [`CLEARING`].
    state: AtomicU32,
    /// FLUSH epoch at the last write to end here (0: none, or before the
    /// first FLUSH); only grows.
    last_epoch: AtomicU64,
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

/// CRC32C per 4 KiB block of an image and the write-intent bitmap, in a
/// memory-mapped store file (lock-free per entry). `Send + Sync`: several
/// queues update different blocks concurrently through `&self`. See the
/// module docs for the file format, durability, write intent and recovery.
#[derive(Debug)]
pub struct ChecksumStore {
    file: File,
    path: PathBuf,
    layout: StoreLayout,
    /// `log2(region_size)`.
    region_shift: u32,
    read_only: bool,
    /// The whole file; table and bitmap are accessed through it.
    map: Mapping,
    regions: Vec<RegionState>,
    /// FLUSH epoch: +1 at every [`ChecksumStore::flush_begin`].
    epoch: AtomicU64,
    /// The header as on disk; its lock serializes header writes.
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
    ///   algorithm, header CRC, block count, region size and layout, image
    ///   size, file length; a clean store's table CRC). Any mismatch is
    ///   refused, never silently rebuilt. A version 1 store is migrated
    ///   (writable open) or refused (read-only).
    /// - Store left in use (unclean stop): on a writable open, the image is
    ///   scanned; mismatching blocks in marked regions are re-checksummed and
    ///   returned in [`OpenOutcome::recovered`], the others are kept and
    ///   returned in [`OpenOutcome::cold_mismatches`] (module docs). On a
    ///   read-only open, nothing is changed and only
    ///   [`OpenOutcome::unclean`] and [`OpenOutcome::marked_regions`] are set.
    /// - A writable open then clears the bitmap, marks the store in use,
    ///   bumps the generation and fdatasyncs; it holds an exclusive `flock`
    ///   (shared when read-only) and the file's mapping until closed or dropped.
    ///
    /// `progress(done_blocks, total_blocks)` is called while the image is
    /// scanned (creation or recovery), in 4 KiB blocks.
    ///
    /// # Errors
    /// [`IntegrityError::StoreMissing`] (read-only, no store),
    /// [`IntegrityError::InUse`], [`IntegrityError::NotAStore`],
    /// [`IntegrityError::UnsupportedVersion`], [`IntegrityError::NeedsMigration`],
    /// [`IntegrityError::HeaderCorrupt`], [`IntegrityError::BlockSizeMismatch`],
    /// [`IntegrityError::AlgorithmMismatch`], [`IntegrityError::BlockCountMismatch`],
    /// [`IntegrityError::LayoutMismatch`], [`IntegrityError::ImageSizeMismatch`],
    /// [`IntegrityError::IdentityMismatch`],
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
                // The end offset, not the inode's length: a block device's is 0.
                use std::io::Seek;
                let len = (&image)
                    .seek(std::io::SeekFrom::End(0))
                    .map_err(IntegrityError::io("stat image", image_path))?;
                len / SECTOR_SIZE * SECTOR_SIZE
            }
        };
        let mut outcome = OpenOutcome::default();

        if !path.exists() {
            if opts.read_only {
                return Err(IntegrityError::StoreMissing(path));
            }
            let identity = Identity::new(opts.identity.as_deref());
            create_store(&path, &image, image_path, image_size, identity, progress)?;
            outcome.created = true;
        }

        let mut file = open_locked(&path, opts.read_only)?;
        let (mut header, mut actual) = read_header(&file, &path)?;
        if !opts.read_only || opts.identity.is_some() {
            header.check_identity(&Identity::new(opts.identity.as_deref()), &path)?;
        }
        if header.layout.image_size != image_size {
            return Err(IntegrityError::ImageSizeMismatch {
                path,
                store_size: header.layout.image_size,
                image_size,
            });
        }
        if header.version != super::STORE_VERSION {
            if opts.read_only {
                return Err(IntegrityError::NeedsMigration {
                    path,
                    found: header.version,
                    supported: super::STORE_VERSION,
                });
            }
            file = migrate_v1(&path, &file, &header, actual)?;
            outcome.migrated_from = Some(header.version);
            (header, actual) = read_header(&file, &path)?;
        }
        let layout = header.layout;
        if actual != layout.file_len {
            return Err(IntegrityError::LengthMismatch {
                path,
                expected: layout.file_len,
                actual,
            });
        }
        let map = Mapping::new(&file, layout.file_len, !opts.read_only)
            .map_err(IntegrityError::io("map checksum store", &path))?;
        let store = ChecksumStore {
            file,
            path,
            layout,
            region_shift: layout.region_size.trailing_zeros(),
            read_only: opts.read_only,
            map,
            regions: (0..layout.region_count)
                .map(|_| RegionState::default())
                .collect(),
            epoch: AtomicU64::new(0),
            header: Mutex::new(header),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        };
        if header.state == STATE_CLEAN {
            let computed = store.table_crc();
            if computed != header.table_crc {
                return Err(IntegrityError::TableCorrupt {
                    path: store.path,
                    stored: header.table_crc,
                    computed,
                });
            }
        } else {
            outcome.unclean = true;
            outcome.marked_regions = store.marked_regions();
        }

        if opts.read_only {
            outcome.generation = header.generation;
            return Ok((store, outcome));
        }
        if outcome.unclean {
            store.recover(&image, image_path, progress, &mut outcome)?;
        }
        store.clear_bitmap();
        let mut h = store.header.lock().unwrap_or_else(|e| e.into_inner());
        h.state = STATE_IN_USE;
        h.generation += 1;
        h.table_crc = 0;
        store
            .file
            .write_all_at(&h.encode(), 0)
            .and_then(|_| store.file.sync_data())
            .map_err(IntegrityError::io(
                "mark checksum store in use",
                &store.path,
            ))?;
        outcome.generation = h.generation;
        drop(h);
        Ok((store, outcome))
    }

    /// Recovery after an unclean stop (module docs): scans the image, adopts
    /// mismatches inside marked regions, keeps the others as cold
    /// mismatches, then makes image and store durable. The bitmap is left as
    /// found (the caller clears it).
    fn recover(
        &self,
        image: &File,
        image_path: &Path,
        progress: &mut dyn FnMut(u64, u64),
        outcome: &mut OpenOutcome,
    ) -> Result<(), IntegrityError> {
        log::warn!(
            "checksum store {}: not closed cleanly (generation {}); {} write-intent region(s) marked; checking the image {}",
            self.path.display(),
            self.generation(),
            outcome.marked_regions,
            image_path.display()
        );
        let (recovered, cold) = (&mut outcome.recovered, &mut outcome.cold_mismatches);
        scan_image(
            image,
            image_path,
            self.layout.image_size,
            progress,
            |block, found| {
                let expected = self.entry(block);
                if expected == found {
                    return;
                }
                let region = (block * BLOCK_SIZE) >> self.region_shift;
                if !self.region_marked(region) {
                    cold.push(Mismatch {
                        block,
                        expected,
                        found,
                    });
                    return;
                }
                self.set(block, found);
                match recovered.last_mut() {
                    Some(r) if r.region == region => r.blocks.push(block),
                    _ => recovered.push(RecoveredRegion {
                        region,
                        first_sector: (region << self.region_shift) / SECTOR_SIZE,
                        len_bytes: self.region_len(region),
                        blocks: vec![block],
                    }),
                }
            },
        )?;
        // What was adopted is durable before the bits that allowed it go.
        image.sync_data().map_err(IntegrityError::io(
            "fdatasync image after recovery",
            image_path,
        ))?;
        self.file
            .sync_data()
            .map_err(IntegrityError::io("write checksum table", &self.path))?;
        log::warn!(
            "checksum store {}: {} region(s) recovered ({} block(s) re-learned), {} block(s) mismatching outside every write-intent region",
            self.path.display(),
            outcome.recovered.len(),
            outcome.recovered.iter().map(|r| r.blocks.len()).sum::<usize>(),
            outcome.cold_mismatches.len()
        );
        Ok(())
    }

    /// Path of the store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The store file (e.g. to submit its fdatasync at FLUSH). Valid while
    /// the store lives. Never truncate it or write it other than through the
    /// store: its table and bitmap are mapped.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Image size covered, in bytes.
    pub fn image_size(&self) -> u64 {
        self.layout.image_size
    }

    /// Number of 4 KiB blocks: `ceil(image_size / 4096)`.
    pub fn block_count(&self) -> u64 {
        self.layout.block_count
    }

    /// Where header, bitmap and table are in the file, and the region size.
    pub fn layout(&self) -> StoreLayout {
        self.layout
    }

    /// Bytes per write-intent region ([`super::REGION_SIZE`] for stores this
    /// version creates).
    pub fn region_size(&self) -> u64 {
        self.layout.region_size
    }

    /// Number of write-intent regions: `ceil(image_size / region_size)`.
    pub fn region_count(&self) -> u64 {
        self.layout.region_count
    }

    /// The region holding byte `offset` of the image.
    pub fn region_of(&self, offset: u64) -> u64 {
        offset >> self.region_shift
    }

    /// True when region `region`'s bit is set in the bitmap (false beyond
    /// the image).
    pub fn region_marked(&self, region: u64) -> bool {
        if region >= self.layout.region_count {
            return false;
        }
        let (w, m) = bit(region);
        self.bitmap()[w].load(Ordering::Acquire) & m != 0
    }

    /// Number of regions whose bit is set.
    pub fn marked_regions(&self) -> u64 {
        self.bitmap()
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// Writes in flight in region `region` (between `intent_begin` and
    /// `intent_end`), 0 beyond the image.
    pub fn in_flight(&self, region: u64) -> u32 {
        usize::try_from(region)
            .ok()
            .and_then(|r| self.regions.get(r))
            .map_or(0, |r| r.state.load(Ordering::Acquire) & IN_FLIGHT)
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
        (self.layout.image_size.saturating_sub(start)).min(BLOCK_SIZE) as usize
    }

    /// The stored CRC32C of block `block` (4 KiB units), or `None` beyond the image.
    pub fn expected(&self, block: u64) -> Option<u32> {
        (block < self.layout.block_count).then(|| self.entry(block))
    }

    /// Before a WRITE / DISCARD / WRITE_ZEROES of image bytes
    /// `offset..offset+len` is submitted, and before its checksums are
    /// recorded: sets the bits of its regions in the mapped bitmap (in the
    /// page cache when this returns, so it survives a process crash) and
    /// counts it in flight in each. Pair every successful call with one
    /// [`ChecksumStore::intent_end`] of the same range. Lock-free; a bit
    /// already set is only read.
    ///
    /// # Errors
    /// [`IntegrityError::OutOfRange`], [`IntegrityError::ReadOnly`] (nothing
    /// is counted then).
    pub fn intent_begin(&self, offset: u64, len: u64) -> Result<(), IntegrityError> {
        self.writable()?;
        self.check_range(offset, len)?;
        for r in self.regions_of(offset, len) {
            self.begin_region(r);
        }
        Ok(())
    }

    /// After the request of a successful [`ChecksumStore::intent_begin`]
    /// completed (successfully or not) and its checksums were recorded: one
    /// write fewer in flight in each of its regions, and each region's last
    /// completion epoch becomes the FLUSH epoch now (so a FLUSH submitted
    /// before now does not clear the region). A range beyond the image, or a
    /// call on a read-only store, is ignored (logged). Lock-free: one atomic
    /// read-modify-write per region, two in a region's first completion
    /// after a FLUSH began.
    pub fn intent_end(&self, offset: u64, len: u64) {
        if self.read_only || self.check_range(offset, len).is_err() {
            log::error!(
                "checksum store {}: intent_end({offset}, {len}) without a matching intent_begin",
                self.path.display()
            );
            return;
        }
        let regions = self.regions_of(offset, len);
        if regions.is_empty() {
            return;
        }
        // SeqCst, as flush_begin's increment: this write completed (it
        // was reaped before this call) before a FLUSH whose increment comes
        // later in the epoch's order was submitted, so a ticket not older
        // than the epoch read here means the FLUSH covers it.
        let epoch = self.epoch.load(Ordering::SeqCst);
        for r in regions {
            self.end_region(r, epoch);
        }
    }

    /// When a FLUSH is submitted: a ticket holding the FLUSH epoch now, and
    /// the epoch advanced. Every write whose `intent_end` came before this
    /// call (it saw this epoch or an earlier one) completed before the FLUSH
    /// was submitted, so the FLUSH makes it durable.
    pub fn flush_begin(&self) -> FlushTicket {
        FlushTicket {
            epoch: self.epoch.fetch_add(1, Ordering::SeqCst),
        }
    }

    /// After the FLUSH of ticket `t` completed its fdatasync of the image and
    /// then of the store file: clears the bit of every marked region with
    /// nothing in flight whose last completion is not newer than the ticket.
    /// A region with a write in flight, or one whose write completed after
    /// the FLUSH was submitted (it may not be durable), stays marked. Visits
    /// only the set bits (the bitmap is 128 bytes per GiB of image). No-op on
    /// a read-only store.
    pub fn flush_end(&self, t: FlushTicket) {
        if self.read_only {
            return;
        }
        for (w, word) in self.bitmap().iter().enumerate() {
            let mut bits = u64::from_le(word.load(Ordering::Relaxed));
            while bits != 0 {
                let r = w as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                if r < self.layout.region_count {
                    self.try_clear(r, t.epoch);
                }
            }
        }
    }

    /// fdatasyncs the store file: every entry and bit changed so far (in the
    /// page cache through the mapping) reaches the disk. Call it when serving
    /// a FLUSH, after the image's fdatasync (or submit the same fdatasync on
    /// [`ChecksumStore::file`]); then data and checksums on disk agree for
    /// every write completed before the FLUSH. Concurrent record_* calls are
    /// fine.
    ///
    /// # Errors
    /// The `io::Error` of fdatasync (retry is safe). On a read-only store:
    /// `PermissionDenied`.
    pub fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "checksum store is read-only",
            ));
        }
        self.file.sync_data()
    }

    /// Closes the store cleanly: clears the bitmap, computes the table CRC,
    /// fdatasyncs, writes `state = clean` and fdatasyncs. Call it at shutdown
    /// after the image's last fdatasync and with no write in flight. The next
    /// open then skips recovery. A read-only store is just closed.
    ///
    /// # Errors
    /// [`IntegrityError::InFlightAtClose`] if a region still counts a write
    /// in flight (an `intent_begin` without its `intent_end`), or
    /// [`IntegrityError::Io`]; the store then stays marked in use (with its
    /// bits) and the next open recovers.
    pub fn close(self) -> Result<(), IntegrityError> {
        if self.read_only {
            return Ok(());
        }
        let busy = (0..self.layout.region_count)
            .filter(|&r| self.in_flight(r) > 0)
            .count() as u64;
        if busy > 0 {
            return Err(IntegrityError::InFlightAtClose {
                path: self.path.clone(),
                regions: busy,
            });
        }
        let mut h = self.header.lock().unwrap_or_else(|e| e.into_inner());
        self.clear_bitmap();
        let mut clean = *h;
        clean.state = STATE_CLEAN;
        clean.table_crc = self.table_crc();
        // Table and cleared bitmap are durable before the header says clean.
        self.file
            .sync_data()
            .and_then(|_| self.file.write_all_at(&clean.encode(), 0))
            .and_then(|_| self.file.sync_data())
            .map_err(IntegrityError::io("close checksum store", &self.path))?;
        *h = clean;
        Ok(())
    }

    /// The table: one little-endian CRC32C per block.
    fn table(&self) -> &[AtomicU32] {
        self.map.u32s(
            self.layout.table_offset as usize,
            self.layout.block_count as usize,
        )
    }

    /// The bitmap, as little-endian 64-bit words (region r: bit r % 64 of word r / 64).
    fn bitmap(&self) -> &[AtomicU64] {
        self.map.u64s(
            self.layout.bitmap_offset as usize,
            (self.layout.bitmap_len / 8) as usize,
        )
    }

    /// The stored checksum of `block` (< block_count).
    fn entry(&self, block: u64) -> u32 {
        u32::from_le(self.table()[block as usize].load(Ordering::Acquire))
    }

    /// Stores the checksum of `block` (in the page cache at once).
    fn set(&self, block: u64, crc: u32) {
        self.table()[block as usize].store(crc.to_le(), Ordering::Release);
    }

    /// CRC32C of the table's bytes as in the file.
    fn table_crc(&self) -> u32 {
        let mut crc = 0;
        let mut buf = Vec::with_capacity(64 * 1024);
        for chunk in self.table().chunks(16 * 1024) {
            buf.clear();
            for e in chunk {
                buf.extend_from_slice(&u32::from_le(e.load(Ordering::Acquire)).to_le_bytes());
            }
            crc = crc32c_append(crc, &buf);
        }
        crc
    }

    fn clear_bitmap(&self) {
        for w in self.bitmap() {
            if w.load(Ordering::Relaxed) != 0 {
                w.store(0, Ordering::Release);
            }
        }
    }

    /// Length in bytes of region `region` (the last one may be shorter).
    fn region_len(&self, region: u64) -> u64 {
        let start = region << self.region_shift;
        (self.layout.image_size - start).min(self.layout.region_size)
    }

    /// The regions a byte range touches (empty for `len == 0`).
    fn regions_of(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        (offset >> self.region_shift)..((offset + len - 1) >> self.region_shift) + 1
    }

    fn begin_region(&self, r: u64) {
        let st = &self.regions[r as usize].state;
        let mut s = st.load(Ordering::Relaxed);
        let mut spins = 0u32;
        loop {
            if s & CLEARING != 0 {
                // flush_end is clearing this region's bit: a few instructions.
                spins += 1;
                if spins < 64 {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
                s = st.load(Ordering::Relaxed);
                continue;
            }
            assert!(s < IN_FLIGHT, "2^31 writes in flight in one region");
            match st.compare_exchange_weak(s, s + 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => break,
                Err(now) => s = now,
            }
        }
        // Counted in flight first: flush_end cannot clear the bit from now
        // on, and any clear it did is visible here (its release of CLEARING
        // is what the CAS above read, directly or through later increments).
        let (w, m) = bit(r);
        let word = &self.bitmap()[w];
        if word.load(Ordering::Relaxed) & m == 0 {
            word.fetch_or(m, Ordering::AcqRel);
        }
    }

    fn end_region(&self, r: u64, epoch: u64) {
        let reg = &self.regions[r as usize];
        // The epoch is visible to whoever sees the decrement (Release below):
        // stored here, or stored by another write's Release that this
        // Acquire load read. It moves only at FLUSHes, so mostly it is here.
        if reg.last_epoch.load(Ordering::Acquire) < epoch {
            reg.last_epoch.fetch_max(epoch, Ordering::AcqRel);
        }
        let mut s = reg.state.load(Ordering::Relaxed);
        loop {
            if s & IN_FLIGHT == 0 {
                log::error!(
                    "checksum store {}: intent_end on region {r} with nothing in flight",
                    self.path.display()
                );
                return;
            }
            match reg
                .state
                .compare_exchange_weak(s, s - 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(now) => s = now,
            }
        }
    }

    /// Clears region `r`'s bit if nothing is in flight there and its last
    /// completion is not in an epoch later than `ticket`. While it clears, the region is
    /// flagged [`CLEARING`] so that `intent_begin` waits instead of reading
    /// the bit as set just before it goes.
    fn try_clear(&self, r: u64, ticket: u64) {
        let reg = &self.regions[r as usize];
        if reg.state.load(Ordering::Acquire) != 0 || reg.last_epoch.load(Ordering::Acquire) > ticket
        {
            return;
        }
        if reg
            .state
            .compare_exchange(0, CLEARING, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        if reg.last_epoch.load(Ordering::Acquire) <= ticket {
            let (w, m) = bit(r);
            self.bitmap()[w].fetch_and(!m, Ordering::AcqRel);
        }
        reg.state.store(0, Ordering::Release);
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
        if block >= self.layout.block_count {
            return Err(IntegrityError::OutOfRange {
                offset: block.saturating_mul(BLOCK_SIZE),
                len: BLOCK_SIZE,
                image_size: self.layout.image_size,
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

    /// Verifies whole blocks from their CRC32Cs alone: `crcs[i]` is the
    /// checksum of block `first + i` as read (4096 bytes each; e.g. guard
    /// CRCs a storage engine took while it copied the data). Returns the
    /// mismatching blocks in block order, as [`ChecksumStore::verify`].
    ///
    /// # Errors
    /// [`IntegrityError::OutOfRange`] if the blocks reach past the image
    /// (so also for the image's last block when it is shorter than 4096
    /// bytes: whole blocks only).
    pub fn verify_crcs(&self, first: u64, crcs: &[u32]) -> Result<Vec<Mismatch>, IntegrityError> {
        let len = crcs.len() as u64 * BLOCK_SIZE;
        self.check_range(first * BLOCK_SIZE, len)?;
        let mut out = Vec::new();
        for (i, &found) in crcs.iter().enumerate() {
            self.compare(first + i as u64, found, &mut out);
        }
        Ok(out)
    }

    /// Appends a [`Mismatch`] to `out` if `found` is not the stored
    /// checksum of `block`.
    fn compare(&self, block: u64, found: u32, out: &mut Vec<Mismatch>) {
        let expected = self.entry(block);
        if expected != found {
            out.push(Mismatch {
                block,
                expected,
                found,
            });
        }
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

    fn writable(&self) -> Result<(), IntegrityError> {
        if self.read_only {
            Err(IntegrityError::ReadOnly(self.path.clone()))
        } else {
            Ok(())
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), IntegrityError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.layout.image_size => Ok(()),
            _ => Err(IntegrityError::OutOfRange {
                offset,
                len,
                image_size: self.layout.image_size,
            }),
        }
    }

    fn stripe(&self, block: u64) -> std::sync::MutexGuard<'_, ()> {
        self.stripes[(block % STRIPES as u64) as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
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
        src: Source<'_>,
        read_rest: Option<ReadBlock<'_>>,
    ) -> Result<(), IntegrityError> {
        self.writable()?;
        self.block_checksums(offset, len, src, read_rest, |block, crc| {
            self.set(block, crc)
        })
    }

    /// Calls `each(block, crc)` with the checksum every block of
    /// `offset..offset+len` (bytes) gets when `src` is written there: whole
    /// blocks from `src` alone, partly covered ones with the rest of the
    /// block read by `read_rest` (under the block's stripe lock).
    fn block_checksums(
        &self,
        offset: u64,
        len: u64,
        mut src: Source<'_>,
        mut read_rest: Option<ReadBlock<'_>>,
        mut each: impl FnMut(u64, u32),
    ) -> Result<(), IntegrityError> {
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
                each(block, src.crc_next(blen));
                continue;
            }
            let read = read_rest.as_mut().expect("partial blocks checked above");
            let _g = self.stripe(block);
            read(block * BLOCK_SIZE, &mut buf[..blen]).map_err(IntegrityError::io(
                "read rest of partial block from image",
                &self.path,
            ))?;
            src.copy_next(&mut buf[s..e]);
            each(block, crc32c(&buf[..blen]));
        }
        Ok(())
    }

    /// The checksum each block touched by `data` at byte `offset` will have
    /// once it is written, without recording anything: as
    /// [`ChecksumStore::record_write_with`] computes them (`read_rest` reads
    /// the rest of a partly covered block from the image). One entry per
    /// block, from block `offset / 4096` on.
    ///
    /// # Errors
    /// [`IntegrityError::OutOfRange`], [`IntegrityError::Io`] if `read_rest`
    /// fails.
    pub fn checksums_with(
        &self,
        offset: u64,
        data: &[&[u8]],
        mut read_rest: impl FnMut(u64, &mut [u8]) -> io::Result<()>,
    ) -> Result<Vec<u32>, IntegrityError> {
        let len = data.iter().map(|s| s.len() as u64).sum();
        let mut out = Vec::new();
        self.block_checksums(
            offset,
            len,
            Source::Data(Gather::new(data)),
            Some(&mut read_rest),
            |_, crc| out.push(crc),
        )?;
        Ok(out)
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
            self.compare(block, found, &mut out);
        }
        Ok(out)
    }
}

/// Word index and mask (in the file's little-endian byte order) of region
/// `r`'s bit in the bitmap words.
fn bit(r: u64) -> (usize, u64) {
    ((r / 64) as usize, (1u64 << (r % 64)).to_le())
}

/// Reads and decodes the header of the open store `file`; also returns the
/// file's length (fstat).
fn read_header(file: &File, path: &Path) -> Result<(Header, u64), IntegrityError> {
    let actual = file
        .metadata()
        .map_err(IntegrityError::io("stat checksum store", path))?
        .len();
    let mut hbuf = vec![0u8; (super::HEADER_SIZE.min(actual)) as usize];
    file.read_exact_at(&mut hbuf, 0)
        .map_err(IntegrityError::io("read checksum store header", path))?;
    Ok((Header::decode(&hbuf, path)?, actual))
}
