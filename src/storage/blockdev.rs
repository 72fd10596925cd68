//! Host block devices served as images (docs/DESIGN.md §6 "Block devices").
//!
//! What pinblk asks the kernel about a block device it serves: its size and
//! block sizes (ioctls of `include/uapi/linux/fs.h`), whether it is
//! read-only, its queue limits (sysfs `queue/`, the same numbers
//! `lsblk --topology` prints) and an identity that names the disk rather
//! than the device node (WWID, serial, dm UUID, a loop device's backing
//! file), which the checksum store records (docs/DESIGN.md §7).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// `BLKROGET` (`_IO(0x12, 94)`, include/uapi/linux/fs.h): read-only flag, an `int`.
const BLKROGET: libc::c_ulong = 0x125e;
/// `BLKSSZGET` (`_IO(0x12, 104)`): logical block size in bytes, an `int`.
const BLKSSZGET: libc::c_ulong = 0x1268;
/// `BLKGETSIZE64` (`_IOR(0x12, 114, size_t)`): size in bytes, a `u64`.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `BLKPBSZGET` (`_IO(0x12, 123)`): physical block size in bytes, an `unsigned int`.
const BLKPBSZGET: libc::c_ulong = 0x127b;

/// Longest identity kept, in bytes (the checksum store has room for this much).
pub const IDENTITY_MAX: usize = 200;

/// The queue limits of a block device, from sysfs
/// (`/sys/dev/block/MAJ:MIN/queue/*`, of the whole disk for a partition;
/// Documentation/ABI/stable/sysfs-block). All in bytes; 0 where the kernel
/// gives none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueLimits {
    /// `queue/minimum_io_size`: smallest preferred I/O size, in bytes.
    pub min_io_size: u64,
    /// `queue/optimal_io_size`: optimal (streaming) I/O size, in bytes; 0: none given.
    pub opt_io_size: u64,
    /// `alignment_offset`: bytes the device's natural alignment is offset by.
    pub alignment_offset: u64,
    /// `queue/discard_max_bytes`: largest discard, in bytes; 0: no discard.
    pub discard_max_bytes: u64,
    /// `queue/discard_granularity`: discard unit, in bytes.
    pub discard_granularity: u64,
    /// `queue/write_zeroes_max_bytes`: largest REQ_OP_WRITE_ZEROES, in
    /// bytes; 0: the device cannot zero without being written.
    pub write_zeroes_max_bytes: u64,
}

/// What the kernel says about an open block device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockDeviceInfo {
    /// Kernel name (`loop0`, `nvme0n1`, `nbd0p1`).
    pub name: String,
    /// Size in bytes (`BLKGETSIZE64`).
    pub size: u64,
    /// Logical block size in bytes (`BLKSSZGET`): the smallest unit of direct I/O.
    pub logical_block_size: u32,
    /// Physical block size in bytes (`BLKPBSZGET`).
    pub physical_block_size: u32,
    /// Read-only (`BLKROGET`).
    pub read_only: bool,
    /// Queue limits (sysfs).
    pub limits: QueueLimits,
    /// What names the disk itself, not the node: see [`identity_of`].
    pub identity: String,
}

/// True when `path` is a block device (following symlinks, as
/// `/dev/disk/by-id/...` are). False for a missing path.
pub fn is_block_device(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

/// Runs an ioctl that writes one value of type `T` through its argument.
///
/// # Safety
/// `req` must be an ioctl that writes at most `size_of::<T>()` bytes to the
/// pointer it is given, and any bit pattern must be a valid `T`.
unsafe fn ioctl_get<T: Default>(f: &File, req: libc::c_ulong) -> io::Result<T> {
    let mut v = T::default();
    // SAFETY: `v` is a live, writable `T` for the whole call; the caller
    // promises the kernel writes no more than `size_of::<T>()` bytes of it.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), req as _, &mut v as *mut T) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

/// Probes the block device open as `f` (opened from `path`).
///
/// # Errors
/// The OS error of `fstat` or of one of the ioctls. Missing sysfs files give
/// 0 limits, not an error.
pub fn probe(f: &File, path: &Path) -> io::Result<BlockDeviceInfo> {
    // SAFETY (all four): BLKGETSIZE64 writes a u64; BLKSSZGET and BLKROGET
    // write an int; BLKPBSZGET writes an unsigned int (block/ioctl.c).
    let size: u64 = unsafe { ioctl_get(f, BLKGETSIZE64)? };
    let logical: libc::c_int = unsafe { ioctl_get(f, BLKSSZGET)? };
    let physical: libc::c_uint = unsafe { ioctl_get(f, BLKPBSZGET)? };
    let ro: libc::c_int = unsafe { ioctl_get(f, BLKROGET)? };
    let rdev = f.metadata()?.rdev();
    let sys = sysfs_dir(rdev);
    let name = sys
        .as_ref()
        .and_then(|d| d.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    let (limits, identity) = match &sys {
        Some(dir) => (queue_limits(dir), identity_of(dir, &name)),
        None => (QueueLimits::default(), format!("name:{name}")),
    };
    Ok(BlockDeviceInfo {
        name,
        size,
        logical_block_size: logical as u32,
        physical_block_size: physical.max(logical as u32),
        read_only: ro != 0,
        limits,
        identity,
    })
}

/// The sysfs directory of device `rdev` (`/sys/dev/block/MAJ:MIN`, resolved).
fn sysfs_dir(rdev: u64) -> Option<PathBuf> {
    let (maj, min) = (libc::major(rdev), libc::minor(rdev));
    std::fs::canonicalize(format!("/sys/dev/block/{maj}:{min}")).ok()
}

/// The directory holding `queue/`: the device's own, or its disk's for a partition.
fn disk_dir(dir: &Path) -> PathBuf {
    if dir.join("partition").exists() {
        if let Some(parent) = dir.parent() {
            return parent.to_path_buf();
        }
    }
    dir.to_path_buf()
}

fn read_trimmed(p: &Path) -> Option<String> {
    let s = std::fs::read_to_string(p).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

fn read_u64(p: &Path) -> u64 {
    read_trimmed(p).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// Reads the queue limits of the device whose sysfs directory is `dir`.
pub fn queue_limits(dir: &Path) -> QueueLimits {
    let q = disk_dir(dir).join("queue");
    QueueLimits {
        min_io_size: read_u64(&q.join("minimum_io_size")),
        opt_io_size: read_u64(&q.join("optimal_io_size")),
        alignment_offset: read_u64(&dir.join("alignment_offset")),
        discard_max_bytes: read_u64(&q.join("discard_max_bytes")),
        discard_granularity: read_u64(&q.join("discard_granularity")),
        write_zeroes_max_bytes: read_u64(&q.join("write_zeroes_max_bytes")),
    }
}

/// The identity of the device whose sysfs directory is `dir` and kernel
/// name `name`: the first of `wwid` (NVMe, SCSI: `wwid`, `device/wwid`),
/// `dm/uuid` (device mapper, LVM), `md/uuid` (md RAID), `serial` /
/// `device/serial` (virtio-blk, some SCSI and NVMe), a Ceph RBD mapping's
/// `device/{cluster_fsid,pool,name,current_snap,image_id}`
/// (`rbd:FSID/POOL/IMAGE@SNAP#ID`), `loop/backing_file` (loop devices),
/// `backend` (nbd, when its client set one over netlink), else `name:NAME`
/// (e.g. an nbd device connected by `qemu-nbd`: the node name, which a
/// different image connected at the same node shares; the size check still
/// applies). A partition adds `/partN@START` (START in 512-byte sectors).
/// Cut to [`IDENTITY_MAX`] bytes.
pub fn identity_of(dir: &Path, name: &str) -> String {
    let disk = disk_dir(dir);
    let file = |f: &str| read_trimmed(&disk.join(f));
    let rbd = || {
        let part = |f: &str| file(&format!("device/{f}"));
        Some(format!(
            "rbd:{}/{}/{}@{}#{}",
            part("cluster_fsid")?,
            part("pool")?,
            part("name")?,
            part("current_snap").unwrap_or_else(|| "-".into()),
            part("image_id")?
        ))
    };
    let sources = [
        ("wwid", "wwid"),
        ("wwid", "device/wwid"),
        ("dm-uuid", "dm/uuid"),
        ("md-uuid", "md/uuid"),
        ("serial", "serial"),
        ("serial", "device/serial"),
    ];
    let mut id = sources
        .iter()
        .find_map(|(kind, f)| file(f).map(|v| format!("{kind}:{v}")))
        .or_else(rbd)
        .or_else(|| file("loop/backing_file").map(|v| format!("loop:{v}")))
        .or_else(|| file("backend").map(|v| format!("nbd-backend:{v}")))
        .unwrap_or_else(|| {
            let n = disk
                .file_name()
                .map_or(name.into(), |n| n.to_string_lossy().into_owned());
            format!("name:{n}")
        });
    if disk != dir {
        id.push_str(&format!(
            "/part{}@{}",
            read_u64(&dir.join("partition")),
            read_u64(&dir.join("start"))
        ));
    }
    truncate(id)
}

/// `s` cut to at most [`IDENTITY_MAX`] bytes, at a character boundary.
fn truncate(mut s: String) -> String {
    if s.len() > IDENTITY_MAX {
        let mut end = IDENTITY_MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The request numbers, computed as include/uapi/asm-generic/ioctl.h does.
    #[test]
    fn ioctl_numbers_match_the_uapi_macros() {
        let io = |nr: libc::c_ulong| (0x12 << 8) | nr;
        let ior = |nr: libc::c_ulong, size: libc::c_ulong| (2 << 30) | (size << 16) | io(nr);
        assert_eq!(BLKROGET, io(94));
        assert_eq!(BLKSSZGET, io(104));
        assert_eq!(BLKGETSIZE64, ior(114, 8));
        assert_eq!(BLKPBSZGET, io(123));
    }

    #[test]
    fn files_are_not_block_devices() {
        let f = tempfile::NamedTempFile::new().unwrap();
        assert!(!is_block_device(f.path()));
        assert!(!is_block_device(Path::new("/nonexistent/x")));
        assert!(probe(f.as_file(), f.path()).is_err());
    }

    #[test]
    fn identity_prefers_wwid_and_names_partitions() {
        let d = tempfile::tempdir().unwrap();
        let disk = d.path().join("sdz");
        let part = disk.join("sdz2");
        std::fs::create_dir_all(part.join("x")).unwrap();
        std::fs::create_dir_all(disk.join("device")).unwrap();
        std::fs::write(disk.join("device/serial"), "S1\n").unwrap();
        assert_eq!(identity_of(&disk, "sdz"), "serial:S1");
        std::fs::write(disk.join("device/wwid"), "naa.5000\n").unwrap();
        assert_eq!(identity_of(&disk, "sdz"), "wwid:naa.5000");
        std::fs::write(part.join("partition"), "2\n").unwrap();
        std::fs::write(part.join("start"), "2048\n").unwrap();
        assert_eq!(identity_of(&part, "sdz2"), "wwid:naa.5000/part2@2048");
        let rbd = d.path().join("rbd0");
        std::fs::create_dir_all(rbd.join("device")).unwrap();
        for (f, v) in [
            ("cluster_fsid", "f00d"),
            ("pool", "rbd"),
            ("name", "vm1"),
            ("current_snap", "-"),
            ("image_id", "10ab"),
        ] {
            std::fs::write(rbd.join("device").join(f), format!("{v}\n")).unwrap();
        }
        assert_eq!(identity_of(&rbd, "rbd0"), "rbd:f00d/rbd/vm1@-#10ab");
        let bare = d.path().join("nbd3");
        std::fs::create_dir_all(&bare).unwrap();
        assert_eq!(identity_of(&bare, "nbd3"), "name:nbd3");
        assert_eq!(truncate("é".repeat(150)).len(), IDENTITY_MAX);
    }
}
