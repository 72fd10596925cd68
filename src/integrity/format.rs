//! The store file's format: the header (version 2, and version 1 read for
//! migration), the layout of bitmap and table, creation from an image, the
//! v1 → v2 migration and the image scan. The format itself is documented in
//! the module docs of `store.rs`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::error::IntegrityError;
use super::{crc32c, crc_of_zeros, BLOCK_SIZE};
use crate::sys::{lock_file, LOCK_WAIT};

/// Magic bytes at offset 0 of a checksum store.
pub const STORE_MAGIC: [u8; 8] = *b"PINBLKCS";
/// The store format version this code writes (and reads; a version 1 store
/// is migrated to it on a writable open).
pub const STORE_VERSION: u32 = 2;
/// Algorithm id of CRC32C in the store header.
pub const ALGORITHM_CRC32C: u32 = 1;
/// Size of the store header in bytes; the write-intent bitmap starts here.
pub const HEADER_SIZE: u64 = 4096;
/// Size of one write-intent region in bytes (1 MiB, md's bitmap "chunk"):
/// one bit of the bitmap per region. Stated in the header.
pub const REGION_SIZE: u64 = 1 << 20;
/// The bitmap is padded to a multiple of this many bytes (so the table
/// starts on a page boundary of 4 KiB pages).
const BITMAP_ALIGN: u64 = 4096;

pub(super) const STATE_CLEAN: u32 = 0;
pub(super) const STATE_IN_USE: u32 = 1;
/// Most bytes of a device identity a header records (bytes 100..300).
pub const IDENTITY_MAX: usize = 200;
/// Offset of the identity's length (u32) in the header; its bytes follow.
const IDENTITY_OFFSET: usize = 96;

/// What the store was made for: a block device's identity (its WWID,
/// serial, dm UUID or loop backing file, as the storage layer names it),
/// or nothing for an image file (identity length 0, which is also what
/// every store written before identities existed holds in its reserved bytes).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct Identity {
    len: u8,
    bytes: [u8; IDENTITY_MAX],
}

impl Identity {
    /// The identity of an image file: none.
    pub(super) const FILE: Identity = Identity {
        len: 0,
        bytes: [0; IDENTITY_MAX],
    };

    /// The identity `id` of a block device (cut to [`IDENTITY_MAX`] bytes),
    /// or [`Identity::FILE`] for `None`.
    pub(super) fn new(id: Option<&str>) -> Identity {
        let mut i = Identity::FILE;
        if let Some(id) = id {
            let b = &id.as_bytes()[..id.len().min(IDENTITY_MAX)];
            i.bytes[..b.len()].copy_from_slice(b);
            i.len = b.len() as u8;
        }
        i
    }

    /// How an error message names it: `block device "ID"` or `an image file`.
    pub(super) fn describe(&self) -> String {
        if self.len == 0 {
            "an image file".into()
        } else {
            format!(
                "block device {:?}",
                String::from_utf8_lossy(&self.bytes[..usize::from(self.len)])
            )
        }
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Bytes read from the image per scan step (256 blocks).
const SCAN_CHUNK: u64 = 1 << 20;

/// Where everything is in a version 2 store file, all in bytes unless named
/// otherwise. It follows from the image size and the region size alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreLayout {
    /// Image size covered, bytes.
    pub image_size: u64,
    /// 4 KiB checksum blocks: `ceil(image_size / 4096)`.
    pub block_count: u64,
    /// Bytes per write-intent region (a power of two, 4096 to 1 GiB).
    pub region_size: u64,
    /// Write-intent regions: `ceil(image_size / region_size)`.
    pub region_count: u64,
    /// Offset of the bitmap: [`HEADER_SIZE`].
    pub bitmap_offset: u64,
    /// Bitmap length: `ceil(region_count / 8)` rounded up to a multiple of
    /// 4096, at least 4096.
    pub bitmap_len: u64,
    /// Offset of the table: `bitmap_offset + bitmap_len`.
    pub table_offset: u64,
    /// File length: `table_offset + 4 * block_count`.
    pub file_len: u64,
}

impl StoreLayout {
    /// The layout of the store of an image of `image_size` bytes with
    /// regions of `region_size` bytes ([`REGION_SIZE`] for new stores).
    pub fn new(image_size: u64, region_size: u64) -> StoreLayout {
        let block_count = image_size.div_ceil(BLOCK_SIZE);
        let region_count = image_size.div_ceil(region_size);
        let bitmap_len = region_count.div_ceil(8).div_ceil(BITMAP_ALIGN).max(1) * BITMAP_ALIGN;
        let bitmap_offset = HEADER_SIZE;
        let table_offset = bitmap_offset + bitmap_len;
        StoreLayout {
            image_size,
            block_count,
            region_size,
            region_count,
            bitmap_offset,
            bitmap_len,
            table_offset,
            file_len: table_offset + 4 * block_count,
        }
    }

    /// True when `region_size` can be a region size: a power of two from
    /// 4096 bytes to 1 GiB.
    fn valid_region_size(region_size: u64) -> bool {
        region_size.is_power_of_two() && (BLOCK_SIZE..=1 << 30).contains(&region_size)
    }
}

/// A decoded header. For a version 1 header the layout fields are those of
/// version 1 (no bitmap, table at 4096, region fields 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Header {
    pub(super) version: u32,
    pub(super) block_size: u32,
    pub(super) algorithm: u32,
    pub(super) state: u32,
    pub(super) generation: u64,
    pub(super) table_crc: u32,
    pub(super) layout: StoreLayout,
    /// What the store was made for (bytes 96..300, in the version 2
    /// header's once-reserved space; zero for an image file).
    pub(super) identity: Identity,
}

impl Header {
    pub(super) fn new(image_size: u64, identity: Identity) -> Header {
        Header {
            version: STORE_VERSION,
            block_size: BLOCK_SIZE as u32,
            algorithm: ALGORITHM_CRC32C,
            state: STATE_CLEAN,
            generation: 0,
            table_crc: 0,
            layout: StoreLayout::new(image_size, REGION_SIZE),
            identity,
        }
    }

    /// Refuses a store made for something else than `want` (the identity
    /// of the device being served, [`Identity::FILE`] for an image file).
    pub(super) fn check_identity(
        &self,
        want: &Identity,
        path: &Path,
    ) -> Result<(), IntegrityError> {
        if self.identity == *want {
            return Ok(());
        }
        Err(IntegrityError::IdentityMismatch {
            path: path.to_path_buf(),
            recorded: self.identity.describe(),
            found: want.describe(),
        })
    }

    /// The 4096 bytes of a version 2 header, with its CRC.
    pub(super) fn encode(&self) -> Vec<u8> {
        let l = &self.layout;
        let mut b = vec![0u8; HEADER_SIZE as usize];
        b[0..8].copy_from_slice(&STORE_MAGIC);
        b[8..12].copy_from_slice(&STORE_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.block_size.to_le_bytes());
        b[16..20].copy_from_slice(&self.algorithm.to_le_bytes());
        b[20..24].copy_from_slice(&self.state.to_le_bytes());
        b[24..32].copy_from_slice(&l.image_size.to_le_bytes());
        b[32..40].copy_from_slice(&l.block_count.to_le_bytes());
        b[40..48].copy_from_slice(&self.generation.to_le_bytes());
        b[52..56].copy_from_slice(&self.table_crc.to_le_bytes());
        b[56..64].copy_from_slice(&l.region_size.to_le_bytes());
        b[64..72].copy_from_slice(&l.region_count.to_le_bytes());
        b[72..80].copy_from_slice(&l.bitmap_offset.to_le_bytes());
        b[80..88].copy_from_slice(&l.bitmap_len.to_le_bytes());
        b[88..96].copy_from_slice(&l.table_offset.to_le_bytes());
        let id = &self.identity;
        b[IDENTITY_OFFSET..IDENTITY_OFFSET + 4].copy_from_slice(&u32::from(id.len).to_le_bytes());
        b[IDENTITY_OFFSET + 4..IDENTITY_OFFSET + 4 + IDENTITY_MAX].copy_from_slice(&id.bytes);
        let crc = crc32c(&b);
        b[48..52].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and validates everything that does not depend on the image
    /// (versions 1 and 2; any other version is refused).
    pub(super) fn decode(b: &[u8], path: &Path) -> Result<Header, IntegrityError> {
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
        if version != STORE_VERSION && version != 1 {
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
        let (block_size, algorithm) = (u32_at(12), u32_at(16));
        if u64::from(block_size) != BLOCK_SIZE {
            return Err(IntegrityError::BlockSizeMismatch {
                path: path(),
                found: block_size,
            });
        }
        if algorithm != ALGORITHM_CRC32C {
            return Err(IntegrityError::AlgorithmMismatch {
                path: path(),
                found: algorithm,
            });
        }
        let (image_size, block_count) = (u64_at(24), u64_at(32));
        let expected = image_size.div_ceil(BLOCK_SIZE);
        if block_count != expected {
            return Err(IntegrityError::BlockCountMismatch {
                path: path(),
                block_count,
                image_size,
                expected,
            });
        }
        let layout = if version == 1 {
            StoreLayout {
                image_size,
                block_count,
                region_size: 0,
                region_count: 0,
                bitmap_offset: HEADER_SIZE,
                bitmap_len: 0,
                table_offset: HEADER_SIZE,
                file_len: HEADER_SIZE + 4 * block_count,
            }
        } else {
            let region_size = u64_at(56);
            let mismatch = |field, found, expected: String| IntegrityError::LayoutMismatch {
                path: path(),
                field,
                found,
                expected,
                image_size,
            };
            if !StoreLayout::valid_region_size(region_size) {
                return Err(mismatch(
                    "region_size",
                    region_size,
                    "a power of two from 4096 to 1 GiB".into(),
                ));
            }
            let want = StoreLayout::new(image_size, region_size);
            for (field, off, expected) in [
                ("region_count", 64, want.region_count),
                ("bitmap_offset", 72, want.bitmap_offset),
                ("bitmap_len", 80, want.bitmap_len),
                ("table_offset", 88, want.table_offset),
            ] {
                if u64_at(off) != expected {
                    return Err(mismatch(field, u64_at(off), expected.to_string()));
                }
            }
            want
        };
        let mut identity = Identity::FILE;
        if version != 1 {
            let len = u32_at(IDENTITY_OFFSET) as usize;
            if len > IDENTITY_MAX {
                return Err(IntegrityError::LayoutMismatch {
                    path: path(),
                    field: "identity_len",
                    found: len as u64,
                    expected: format!("at most {IDENTITY_MAX}"),
                    image_size,
                });
            }
            identity.len = len as u8;
            identity
                .bytes
                .copy_from_slice(&b[IDENTITY_OFFSET + 4..IDENTITY_OFFSET + 4 + IDENTITY_MAX]);
        }
        Ok(Header {
            version,
            block_size,
            algorithm,
            state: u32_at(20),
            generation: u64_at(40),
            table_crc: u32_at(52),
            layout,
            identity,
        })
    }
}

/// Opens `path` (read-write unless `read_only`) and takes its `flock`:
/// exclusive, or shared when read-only; never waits.
pub(super) fn open_locked(path: &Path, read_only: bool) -> Result<File, IntegrityError> {
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(IntegrityError::io("open checksum store", path))?;
    lock(&file, path, read_only)?;
    Ok(file)
}

fn lock(file: &File, path: &Path, shared: bool) -> Result<(), IntegrityError> {
    if let Err(err) = lock_file(file, !shared, LOCK_WAIT) {
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(IntegrityError::InUse(path.to_path_buf()));
        }
        return Err(IntegrityError::Io {
            what: "lock checksum store",
            path: path.to_path_buf(),
            source: err,
        });
    }
    Ok(())
}

/// Writes a complete version 2 store (header, bitmap, table) to `path.tmp`,
/// fsyncs it and renames it over `path`, then fsyncs the directory. The new
/// file is returned open read-write with its exclusive lock taken before the
/// rename, so no other process can lock it in between.
fn write_store(
    path: &Path,
    header: &Header,
    bitmap: &[u8],
    table: &[u8],
) -> Result<File, IntegrityError> {
    let mut tmp_os = path.as_os_str().to_owned();
    tmp_os.push(".tmp");
    let tmp = PathBuf::from(tmp_os);
    let l = &header.layout;
    debug_assert!(bitmap.len() as u64 <= l.bitmap_len && table.len() as u64 == 4 * l.block_count);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(IntegrityError::io("create checksum store", &tmp))?;
    lock(&f, &tmp, false)?;
    f.write_all_at(&header.encode(), 0)
        .and_then(|_| f.write_all_at(bitmap, l.bitmap_offset))
        .and_then(|_| f.write_all_at(table, l.table_offset))
        .and_then(|_| f.set_len(l.file_len))
        .and_then(|_| f.sync_all())
        .map_err(IntegrityError::io("write checksum store", &tmp))?;
    std::fs::rename(&tmp, path).map_err(IntegrityError::io("rename checksum store into", path))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(f)
}

/// Creates a clean version 2 store for `image` at `path` (no region
/// marked), its table checksummed from the image's content.
pub(super) fn create_store(
    path: &Path,
    image: &File,
    image_path: &Path,
    image_size: u64,
    identity: Identity,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), IntegrityError> {
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
    let mut header = Header::new(image_size, identity);
    header.table_crc = crc32c(&table);
    write_store(path, &header, &[], &table).map(drop)
}

/// Migrates the version 1 store `old` (open and locked, header `h`) at
/// `path` to version 2: same table, generation, state and table CRC, regions
/// of [`REGION_SIZE`]. A clean store gets an empty bitmap; a store left in
/// use gets every region marked, because version 1 recorded no write intent
/// (its recovery then re-learns every mismatch, as version 1 did). Written
/// as a new file renamed over the old one; returns it, open and locked.
pub(super) fn migrate_v1(
    path: &Path,
    old: &File,
    h: &Header,
    actual_len: u64,
) -> Result<File, IntegrityError> {
    let l = &h.layout;
    if actual_len != l.file_len {
        return Err(IntegrityError::LengthMismatch {
            path: path.to_path_buf(),
            expected: l.file_len,
            actual: actual_len,
        });
    }
    let mut table = vec![0u8; 4 * l.block_count as usize];
    old.read_exact_at(&mut table, l.table_offset)
        .map_err(IntegrityError::io("read checksum table", path))?;
    if h.state == STATE_CLEAN {
        let computed = crc32c(&table);
        if computed != h.table_crc {
            return Err(IntegrityError::TableCorrupt {
                path: path.to_path_buf(),
                stored: h.table_crc,
                computed,
            });
        }
    }
    let mut new = Header::new(l.image_size, Identity::FILE);
    new.state = h.state;
    new.generation = h.generation;
    new.table_crc = h.table_crc;
    let n = new.layout.region_count;
    let mut bitmap = vec![0u8; n.div_ceil(8) as usize];
    if h.state != STATE_CLEAN {
        for r in 0..n {
            bitmap[(r / 8) as usize] |= 1 << (r % 8);
        }
    }
    log::warn!(
        "checksum store {}: migrating format version 1 to {STORE_VERSION} (write-intent bitmap of {n} region(s) of {} KiB){}",
        path.display(),
        REGION_SIZE >> 10,
        if h.state == STATE_CLEAN {
            ""
        } else {
            "; it was not closed cleanly and version 1 recorded no write intent, so every region counts as marked"
        }
    );
    write_store(path, &new, &bitmap, &table)
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
