//! The memory mapping of a checksum store file: `MAP_SHARED` for a writable
//! store (every store to the table or the bitmap is in the page cache at
//! once, so a process crash loses nothing), `MAP_PRIVATE` for a read-only one
//! (never written; private only so that the same atomic accessors work on it).
//!
//! All `unsafe` of the store is here, with its argument.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64};

/// A mapping of a whole store file, unmapped on drop.
#[derive(Debug)]
pub(super) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; every access to
// it goes through `&AtomicU32` / `&AtomicU64` (see `u32s`, `u64s`), which
// are `Sync`. The pointer is never handed out as `&mut`.
unsafe impl Send for Mapping {}
// SAFETY: as for `Send`.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the whole of `file`, which must be exactly `len` bytes long
    /// (checked here with `fstat` just before mapping, so no access within
    /// `len` can fault with SIGBUS unless someone truncates the file while it
    /// is mapped: the store holds the file's `flock` for as long as the
    /// mapping lives and never truncates it). `writable`: `MAP_SHARED` with
    /// read and write; otherwise `MAP_PRIVATE` (changes would stay private;
    /// none are made).
    pub(super) fn new(file: &File, len: u64, writable: bool) -> io::Result<Mapping> {
        let actual = file.metadata()?.len();
        if actual != len || len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("store file is {actual} bytes, expected {len} (not mapped)"),
            ));
        }
        let len = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "store too large to map"))?;
        let flags = if writable {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL) of `len`
        // bytes (non-zero, equal to the file size checked above) of a valid
        // fd, at offset 0 (page-aligned whatever the page size). It aliases
        // no Rust object.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave NULL"))?;
        Ok(Mapping { ptr, len })
    }

    /// `count` little-endian `u32` entries at byte `offset` of the file.
    ///
    /// # Panics
    /// If `offset` is not 4-aligned or the entries reach past the mapping.
    pub(super) fn u32s(&self, offset: usize, count: usize) -> &[AtomicU32] {
        assert!(offset.is_multiple_of(4) && offset + 4 * count <= self.len);
        // SAFETY: the range is inside the mapping (asserted), which lives as
        // long as `&self`; the mapping is page-aligned and `offset` is a
        // multiple of 4, so every entry is aligned for `AtomicU32` (same size
        // and alignment as `u32`; every bit pattern is valid). The memory is
        // only ever accessed through atomics in this process; another process
        // could only change it by ignoring the store's `flock`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(offset).cast(), count) }
    }

    /// `count` little-endian `u64` words at byte `offset` of the file.
    ///
    /// # Panics
    /// If `offset` is not 8-aligned or the words reach past the mapping.
    pub(super) fn u64s(&self, offset: usize, count: usize) -> &[AtomicU64] {
        assert!(offset.is_multiple_of(8) && offset + 8 * count <= self.len);
        // SAFETY: as in `u32s`, with 8-byte alignment for `AtomicU64`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(offset).cast(), count) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned; no reference
        // into the mapping outlives `self` (accessors borrow `&self`).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}
