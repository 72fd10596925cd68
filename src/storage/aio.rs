//! `--aio`: which engine carries READ and WRITE to the image
//! (docs/DESIGN.md §6, "Engines").
//!
//! QEMU's `aio=` property names how a file's I/O is issued (`threads`,
//! `native`, `io_uring`); pinblk offers io_uring and, for images that live
//! in memory anyway, `mmap`: a memcpy between guest memory and a shared
//! mapping of the image, done on the queue's thread, with no system call.
//! On tmpfs that copy runs at memcpy speed where the kernel's read path
//! (folio lookup, per-page copy) does not: measured here, 128 KiB copies
//! from a 256 MiB tmpfs file ran 8.7 GB/s through a mapping and 5.5 GB/s
//! through pread(2) on one core.

use std::fs::File;
use std::os::fd::AsRawFd;

/// How READ and WRITE reach the image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Aio {
    /// `mmap` for a fully allocated regular file on a memory filesystem
    /// (tmpfs, ramfs) opened without O_DIRECT; `io_uring` for anything
    /// else. [`choose`] says which, and why.
    #[default]
    Auto,
    /// io_uring readv/writev on the image file (asynchronous: the queue
    /// keeps working while the kernel copies, or the device transfers).
    IoUring,
    /// memcpy between guest memory and a `MAP_SHARED` mapping of the image,
    /// on the queue's thread. Synchronous: a page-cache miss (an image on
    /// a disk) blocks the queue while the page is read in.
    Mmap,
}

impl Aio {
    /// The name `--aio` takes (`auto`, `io_uring`, `mmap`).
    pub fn name(self) -> &'static str {
        match self {
            Aio::Auto => "auto",
            Aio::IoUring => "io_uring",
            Aio::Mmap => "mmap",
        }
    }
}

/// What `--aio` resolved to for one image: never [`Aio::Auto`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AioChoice {
    /// [`Aio::IoUring`] or [`Aio::Mmap`].
    pub aio: Aio,
    /// Why, for the start-up log line ("asked for", "tmpfs, fully allocated", ...).
    pub why: String,
}

/// The image as [`choose`] sees it.
pub struct ImageKind<'a> {
    /// The open image.
    pub file: &'a File,
    /// Bytes served (the mapping's length).
    pub size: u64,
    /// A host block device, not a regular file.
    pub block_device: bool,
    /// Opened with O_DIRECT (`--direct`).
    pub direct: bool,
}

/// Resolves `asked` for an image.
///
/// # Errors
/// A sentence saying why `--aio mmap` cannot serve this image (a block
/// device, `--direct`, or an empty image) and what to pass instead.
pub fn choose(asked: Aio, image: &ImageKind<'_>) -> Result<AioChoice, String> {
    let refusal = if image.block_device {
        Some("a block device (mmap serves regular files)")
    } else if image.direct {
        Some("opened with --direct (a mapping goes through the page cache O_DIRECT bypasses)")
    } else if image.size == 0 || usize::try_from(image.size).is_err() {
        Some("of a size that cannot be mapped")
    } else {
        None
    };
    let choice = |aio: Aio, why: String| Ok(AioChoice { aio, why });
    match asked {
        Aio::IoUring => choice(Aio::IoUring, "asked for".into()),
        Aio::Mmap => match refusal {
            Some(why) => Err(format!(
                "--aio mmap cannot serve an image {why}; pass --aio io_uring or --aio auto"
            )),
            None => choice(Aio::Mmap, "asked for".into()),
        },
        Aio::Auto => {
            if let Some(why) = refusal {
                return choice(Aio::IoUring, format!("auto: an image {why}"));
            }
            let Some(fs) = memory_filesystem(image.file) else {
                return choice(
                    Aio::IoUring,
                    "auto: not on a memory filesystem (through a mapping, a page-cache miss \
                     would block the queue)"
                        .into(),
                );
            };
            if has_hole(image.file, image.size) {
                return choice(
                    Aio::IoUring,
                    format!(
                        "auto: a sparse file on {fs} (a read of a hole through a mapping would \
                         allocate it; --aio mmap forces it)"
                    ),
                );
            }
            choice(Aio::Mmap, format!("auto: a fully allocated file on {fs}"))
        }
    }
}

/// The name of the memory filesystem holding `file` (tmpfs, ramfs), or
/// `None` (fstatfs(2) `f_type`; linux/magic.h).
fn memory_filesystem(file: &File) -> Option<&'static str> {
    const TMPFS_MAGIC: u64 = 0x0102_1994;
    const RAMFS_MAGIC: u64 = 0x8584_58f6;
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes into `fs`, which we own; the fd is open (owned by `file`).
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) } != 0 {
        return None;
    }
    match fs.f_type as u64 {
        TMPFS_MAGIC => Some("tmpfs"),
        RAMFS_MAGIC => Some("ramfs"),
        _ => None,
    }
}

/// Whether `[0, size)` of `file` holds a hole (lseek(2) `SEEK_HOLE`; an
/// error counts as a hole, the cautious answer).
fn has_hole(file: &File, size: u64) -> bool {
    // SAFETY: lseek on an fd we own; SEEK_HOLE only reads the file's layout.
    // The file position it moves is not used (all I/O is positioned).
    let hole = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_HOLE) };
    u64::try_from(hole).map_or(true, |h| h < size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(file: &File, size: u64) -> ImageKind<'_> {
        ImageKind {
            file,
            size,
            block_device: false,
            direct: false,
        }
    }

    fn shm_file(bytes: &[u8]) -> Option<(tempfile::NamedTempFile, File)> {
        let t = tempfile::NamedTempFile::new_in("/dev/shm").ok()?;
        std::fs::write(t.path(), bytes).unwrap();
        let f = File::open(t.path()).unwrap();
        Some((t, f))
    }

    #[test]
    fn auto_maps_a_full_tmpfs_file_and_not_a_sparse_one() {
        let Some((_t, f)) = shm_file(&[1u8; 65536]) else {
            eprintln!("no /dev/shm: skipped");
            return;
        };
        let c = choose(Aio::Auto, &kind(&f, 65536)).unwrap();
        assert_eq!(c.aio, Aio::Mmap, "{}", c.why);
        assert!(c.why.contains("tmpfs"), "{}", c.why);
        let sparse = tempfile::NamedTempFile::new_in("/dev/shm").unwrap();
        sparse.as_file().set_len(1 << 20).unwrap();
        let c = choose(Aio::Auto, &kind(sparse.as_file(), 1 << 20)).unwrap();
        assert_eq!(c.aio, Aio::IoUring);
        assert!(c.why.contains("sparse"), "{}", c.why);
    }

    #[test]
    fn auto_keeps_io_uring_off_memory_filesystems_and_with_direct() {
        let t = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(t.path(), [0u8; 4096]).unwrap();
        let f = File::open(t.path()).unwrap();
        let c = choose(Aio::Auto, &kind(&f, 4096)).unwrap();
        // The temporary directory is on a disk here; were it on tmpfs the
        // answer would be mmap, which the test above covers.
        if memory_filesystem(&f).is_none() {
            assert_eq!(c.aio, Aio::IoUring);
        }
        let mut k = kind(&f, 4096);
        k.direct = true;
        assert_eq!(choose(Aio::Auto, &k).unwrap().aio, Aio::IoUring);
        let e = choose(Aio::Mmap, &k).unwrap_err();
        assert!(
            e.contains("--direct") && e.contains("--aio io_uring"),
            "{e}"
        );
        k.direct = false;
        k.block_device = true;
        assert!(choose(Aio::Mmap, &k).unwrap_err().contains("block device"));
        assert_eq!(choose(Aio::IoUring, &k).unwrap().aio, Aio::IoUring);
    }
}

/// Which engine serves a queue now (`query-stats`), kept in an `AtomicU8`
/// ([`crate::device::QueueCounters::engine`]; 0 is "none yet").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum EngineKind {
    /// io_uring on the image (`--aio io_uring`).
    Uring = 1,
    /// READ and WRITE through a mapping of the image (`--aio mmap`).
    Mapped = 2,
    /// `--null`.
    Null = 3,
    /// `--aio mmap` whose mapping raised SIGBUS: io_uring from then on.
    UringAfterSigbus = 4,
}

impl EngineKind {
    /// The kind stored as `v`; `None` for 0 (no engine yet) or an unknown value.
    pub fn from_u8(v: u8) -> Option<EngineKind> {
        [
            EngineKind::Uring,
            EngineKind::Mapped,
            EngineKind::Null,
            EngineKind::UringAfterSigbus,
        ]
        .into_iter()
        .find(|k| *k as u8 == v)
    }

    /// Its name in `query-stats` (`--aio`'s names for io_uring and mmap).
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Uring => Aio::IoUring.name(),
            EngineKind::Mapped => Aio::Mmap.name(),
            EngineKind::Null => "null",
            EngineKind::UringAfterSigbus => "io_uring_after_sigbus",
        }
    }
}
