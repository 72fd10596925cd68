//! The disk image: a raw file or a host block device.
//!
//! A file's size in bytes gives the capacity (rounded down to the logical
//! block). It is held under an advisory `flock(2)` lock for as long as pinblk
//! serves it: exclusive when writable, shared when read-only, so two pinblk
//! processes never write one image. A block device (docs/DESIGN.md §6) is
//! opened with `O_EXCL` instead (the kernel refuses a second exclusive open,
//! and a mounted or otherwise claimed device), its size and block sizes come
//! from its ioctls ([`super::blockdev`]).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::aio::{self, Aio, AioChoice, ImageKind};
use super::blockdev::{self, BlockDeviceInfo};
use crate::guest::SECTOR_SIZE;
use crate::sys::{lock_file, LOCK_WAIT};

/// Errors opening or preparing the image.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The image does not exist and no size was given to create it.
    #[error("image {0} does not exist; pass --size BYTES to create a sparse image")]
    Missing(PathBuf),
    /// Another process (another pinblk) holds the advisory lock.
    #[error("image {0} is already in use by another pinblk (advisory lock held); stop that process or serve another image")]
    Locked(PathBuf),
    /// Another process holds the block device exclusively (O_EXCL open
    /// refused with EBUSY).
    #[error("block device {0} is busy: another pinblk serves it, or it is mounted or claimed (md, dm/LVM, another exclusive opener); stop that user or serve another device")]
    DeviceBusy(PathBuf),
    /// `--logical-block-size` is smaller than the device's, with O_DIRECT.
    #[error("--logical-block-size {asked} is smaller than the {device}-byte logical block of block device {path}, which O_DIRECT cannot address; pass --logical-block-size {device} (or leave it out), or drop --direct")]
    BlockSizeBelowDevice {
        /// The device.
        path: PathBuf,
        /// Logical block size asked for, in bytes.
        asked: u32,
        /// The device's logical block size (`BLKSSZGET`), in bytes.
        device: u32,
    },
    /// The image is smaller than one logical block.
    #[error("image {path} is {size} bytes, smaller than one {block}-byte logical block")]
    TooSmall {
        /// Image path.
        path: PathBuf,
        /// Image size in bytes.
        size: u64,
        /// Logical block size in bytes.
        block: u32,
    },
    /// `--aio mmap` asked for an image it cannot serve.
    #[error("image {path}: {why}")]
    Aio {
        /// The image.
        path: PathBuf,
        /// Why, and what to pass instead.
        why: String,
    },
    /// Any other I/O error, with what was being done.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Image path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// An open, locked disk image.
#[derive(Debug)]
pub struct Image {
    file: File,
    path: PathBuf,
    /// Size used as the capacity, in bytes: the file size rounded down to the logical block size.
    size: u64,
    read_only: bool,
    /// Logical block size served, in bytes.
    logical_block_size: u32,
    /// What the kernel says about it, when the image is a block device.
    block_device: Option<BlockDeviceInfo>,
    /// The engine `--aio` resolved to, and why.
    aio: AioChoice,
}

/// How to open an image.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageOptions {
    /// Create a sparse image of this many bytes if the file does not exist.
    pub create_size: Option<u64>,
    /// Open read-only (and lock shared).
    pub read_only: bool,
    /// Open with O_DIRECT (bypass the host page cache, like QEMU's `cache.direct=on`).
    pub direct: bool,
    /// Logical block size in bytes (512 or 4096); the capacity is rounded
    /// down to a multiple of it. `None`: a block device's own (`BLKSSZGET`),
    /// 512 for a file.
    pub logical_block_size: Option<u32>,
    /// Which engine carries READ and WRITE (`--aio`; resolved by [`Image::open`]).
    pub aio: Aio,
}

impl Image {
    /// Opens (creating if asked) and locks the image at `path`.
    ///
    /// # Errors
    /// [`StorageError::Missing`] if absent and no size given,
    /// [`StorageError::Locked`] if another pinblk serves it,
    /// [`StorageError::DeviceBusy`] if a block device is held exclusively,
    /// [`StorageError::BlockSizeBelowDevice`],
    /// [`StorageError::TooSmall`], [`StorageError::Aio`] if `--aio mmap`
    /// cannot serve it, or [`StorageError::Io`].
    pub fn open(path: &Path, opts: &ImageOptions) -> Result<Image, StorageError> {
        let mut image = Image::open_unresolved(path, opts)?;
        let kind = ImageKind {
            file: &image.file,
            size: image.size,
            block_device: image.block_device.is_some(),
            direct: opts.direct,
        };
        image.aio = aio::choose(opts.aio, &kind).map_err(|why| StorageError::Aio {
            path: path.to_path_buf(),
            why,
        })?;
        Ok(image)
    }

    /// [`Image::open`] but for the `--aio` choice (left at io_uring).
    fn open_unresolved(path: &Path, opts: &ImageOptions) -> Result<Image, StorageError> {
        if blockdev::is_block_device(path) {
            return Image::open_block_device(path, opts);
        }
        let io = |what: &'static str| {
            let path = path.to_path_buf();
            move |source| StorageError::Io { what, path, source }
        };
        let exists = path.exists();
        if !exists {
            let Some(size) = opts.create_size else {
                return Err(StorageError::Missing(path.to_path_buf()));
            };
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(io("cannot create image"))?;
            f.set_len(size).map_err(io("cannot size image"))?;
            log::info!("created sparse image {} of {} bytes", path.display(), size);
        }
        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        if opts.direct {
            oo.custom_flags(libc::O_DIRECT);
        }
        let file = oo.open(path).map_err(io("cannot open image"))?;
        if let Err(e) = lock_file(&file, !opts.read_only, LOCK_WAIT) {
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(StorageError::Locked(path.to_path_buf()));
            }
            return Err(io("cannot lock image")(e));
        }
        let file_size = file.metadata().map_err(io("cannot stat image"))?.len();
        if let (true, Some(want)) = (exists, opts.create_size) {
            if want != file_size {
                log::warn!(
                    "image {} exists with {} bytes; ignoring --size {}",
                    path.display(),
                    file_size,
                    want
                );
            }
        }
        let block = opts.logical_block_size.unwrap_or(512);
        Image::finish(file, path, file_size, block, opts.read_only, None)
    }

    /// Opens a block device: `O_EXCL` (refused while another pinblk serves
    /// it or it is mounted), read-only when the device is (`BLKROGET`) or
    /// cannot be opened for writing, size and logical block size from its
    /// ioctls.
    fn open_block_device(path: &Path, opts: &ImageOptions) -> Result<Image, StorageError> {
        let io = |what: &'static str| {
            let path = path.to_path_buf();
            move |source| StorageError::Io { what, path, source }
        };
        if opts.create_size.is_some() {
            log::warn!("{} is a block device; ignoring --size", path.display());
        }
        let open = |write: bool| {
            let mut oo = OpenOptions::new();
            let direct = if opts.direct { libc::O_DIRECT } else { 0 };
            oo.read(true)
                .write(write)
                .custom_flags(libc::O_EXCL | direct);
            oo.open(path)
        };
        let busy = |e: &std::io::Error| e.raw_os_error() == Some(libc::EBUSY);
        let mut read_only = opts.read_only;
        let file = match open(!read_only) {
            Ok(f) => f,
            Err(e)
                if !read_only && matches!(e.raw_os_error(), Some(libc::EROFS | libc::EACCES)) =>
            {
                log::warn!(
                    "block device {} cannot be opened for writing ({e}); serving it read-only",
                    path.display()
                );
                read_only = true;
                open(false).map_err(|e| {
                    if busy(&e) {
                        StorageError::DeviceBusy(path.to_path_buf())
                    } else {
                        io("cannot open block device")(e)
                    }
                })?
            }
            Err(e) if busy(&e) => return Err(StorageError::DeviceBusy(path.to_path_buf())),
            Err(e) => return Err(io("cannot open block device")(e)),
        };
        let info = blockdev::probe(&file, path).map_err(io("cannot query block device"))?;
        if info.read_only && !read_only {
            log::warn!(
                "block device {} is read-only (BLKROGET); serving it read-only",
                path.display()
            );
            read_only = true;
        }
        let block = opts.logical_block_size.unwrap_or(info.logical_block_size);
        if opts.direct && block < info.logical_block_size {
            return Err(StorageError::BlockSizeBelowDevice {
                path: path.to_path_buf(),
                asked: block,
                device: info.logical_block_size,
            });
        }
        log::info!(
            "block device {} ({}): {} bytes, logical block {}, physical block {}, identity {:?}, limits {:?}",
            path.display(),
            info.name,
            info.size,
            info.logical_block_size,
            info.physical_block_size,
            info.identity,
            info.limits
        );
        let size = info.size;
        Image::finish(file, path, size, block, read_only, Some(info))
    }

    /// The capacity checks common to files and devices.
    fn finish(
        file: File,
        path: &Path,
        file_size: u64,
        block: u32,
        read_only: bool,
        block_device: Option<BlockDeviceInfo>,
    ) -> Result<Image, StorageError> {
        let b = u64::from(block.max(SECTOR_SIZE as u32));
        let size = file_size / b * b;
        if size == 0 {
            return Err(StorageError::TooSmall {
                path: path.to_path_buf(),
                size: file_size,
                block,
            });
        }
        if size != file_size {
            log::warn!(
                "image {} is {} bytes, not a multiple of {}; serving the first {} bytes",
                path.display(),
                file_size,
                b,
                size
            );
        }
        Ok(Image {
            file,
            path: path.to_path_buf(),
            size,
            read_only,
            logical_block_size: block,
            block_device,
            aio: AioChoice {
                aio: Aio::IoUring,
                why: "not resolved yet".into(),
            },
        })
    }

    /// The engine that carries READ and WRITE ([`Aio::IoUring`] or
    /// [`Aio::Mmap`], never `Auto`), and why it was chosen.
    pub fn aio(&self) -> &AioChoice {
        &self.aio
    }

    /// What the kernel says about the image, when it is a block device.
    pub fn block_device(&self) -> Option<&BlockDeviceInfo> {
        self.block_device.as_ref()
    }

    /// Logical block size served, in bytes: `--logical-block-size`, else a
    /// block device's own (`BLKSSZGET`), else 512.
    pub fn logical_block_size(&self) -> u32 {
        self.logical_block_size
    }

    /// The open file (for io_uring submissions and synchronous fallbacks).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Path the image was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Served size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    /// Whether the image is served read-only (asked for, or a read-only block device).
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Writes `len` zero bytes at byte `offset` with pwrite(2): the fallback
    /// for WRITE_ZEROES where fallocate(2) modes are not supported.
    ///
    /// # Errors
    /// The OS error of the first failing pwrite.
    pub fn write_zeroes_sync(&self, mut offset: u64, len: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        const CHUNK: usize = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len as usize)];
        let end = offset + len;
        while offset < end {
            let n = ((end - offset) as usize).min(CHUNK);
            self.file.write_all_at(&zeros[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(size: Option<u64>) -> ImageOptions {
        ImageOptions {
            create_size: size,
            logical_block_size: Some(512),
            aio: Aio::Auto,
            ..Default::default()
        }
    }

    #[test]
    fn creates_sparse_and_locks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.img");
        assert!(matches!(
            Image::open(&p, &opts(None)),
            Err(StorageError::Missing(_))
        ));
        let img = Image::open(&p, &opts(Some(1 << 20))).unwrap();
        assert_eq!(img.capacity_sectors(), 2048);
        let second = Image::open(&p, &opts(None));
        assert!(matches!(second, Err(StorageError::Locked(_))), "{second:?}");
        let msg = second.unwrap_err().to_string();
        assert!(msg.contains("already in use by another pinblk"), "{msg}");
        drop(img);
        Image::open(&p, &opts(None)).unwrap();
    }
}
