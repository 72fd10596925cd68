//! Guest memory for the hand-built frontend: memfd-backed regions mapped
//! `MAP_SHARED` in the test, addressed by guest physical address (GPA).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use vhost::VhostUserMemoryRegionInfo;

/// One memfd-backed region of guest memory, mapped in the test.
pub struct Region {
    /// GPA of its first byte.
    pub gpa: u64,
    /// Bytes declared to the backend.
    pub declared: u64,
    /// The memfd.
    pub file: File,
    ptr: *mut u8,
    map_len: usize,
}

impl Region {
    /// A memfd of `file_len` bytes at `gpa`, declared as `declared` bytes.
    pub fn new(gpa: u64, file_len: u64, declared: u64) -> Region {
        // SAFETY: memfd_create with a NUL-terminated name; the fd is checked.
        let fd = unsafe { libc::memfd_create(c"pinblk-test-guest".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: fd is a fresh descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(file_len).unwrap();
        let map_len = file_len.max(declared) as usize;
        // SAFETY: a new shared mapping of our own memfd; it is unmapped in
        // Drop and only accessed through bounds-checked helpers.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Region {
            gpa,
            declared,
            file,
            ptr: ptr as *mut u8,
            map_len,
        }
    }

    /// The vhost-user description of this region (`userspace_addr` is where
    /// the test mapped it: SET_VRING_ADDR speaks those addresses).
    pub fn info(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: self.gpa,
            memory_size: self.declared,
            userspace_addr: self.ptr as u64,
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }

    /// Whether `len` bytes at `gpa` are inside the test's mapping.
    pub fn contains(&self, gpa: u64, len: usize) -> bool {
        gpa >= self.gpa && gpa - self.gpa + len as u64 <= self.map_len as u64
    }

    /// The test's address of `gpa` (panics unless `len` bytes there are mapped).
    pub fn host(&self, gpa: u64, len: usize) -> *mut u8 {
        assert!(self.contains(gpa, len), "GPA {gpa:#x}+{len} outside region");
        // SAFETY: in bounds of the mapping, checked above.
        unsafe { self.ptr.add((gpa - self.gpa) as usize) }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.map_len) };
    }
}
