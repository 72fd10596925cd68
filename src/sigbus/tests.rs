//! Unit tests of the guest memory checks and the SIGBUS handler ([`super`]).

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
    GuestRegionMmap,
};

use super::*;

const PAGE: u64 = 4096;

/// An anonymous memory file (as QEMU's memory-backend-memfd) of `len` bytes.
fn memfd(len: u64) -> File {
    // SAFETY: memfd_create with a NUL-terminated name; the fd is new and owned by the File.
    let fd = unsafe { libc::memfd_create(c"pinblk-test".as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

/// A region of `size` bytes at guest-physical `gpa`, mapping `file` from `offset`.
fn region(file: &File, offset: u64, gpa: u64, size: u64) -> GuestRegionMmap<Log> {
    GuestRegionMmap::from_range(
        GuestAddress(gpa),
        size as usize,
        Some(FileOffset::new(file.try_clone().unwrap(), offset)),
    )
    .unwrap()
}

#[test]
fn a_region_larger_than_its_file_is_refused_and_taken_out() {
    let good = memfd(16 * PAGE);
    let short = memfd(4 * PAGE);
    let mem = GuestMemoryMmap::from_regions(vec![
        region(&good, 0, 0, 16 * PAGE),
        // 8 pages declared, 4 in the file.
        region(&short, 0, 1 << 20, 8 * PAGE),
    ])
    .unwrap();
    let atomic = GuestMemoryAtomic::new(mem);
    let err = accept_memory(&atomic).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    let msg = err.to_string();
    assert!(
        msg.contains("0x100000") && msg.contains("16384 bytes"),
        "{msg}"
    );
    let now = atomic.memory();
    assert_eq!(now.num_regions(), 1, "the short region is taken out");
    assert!(now.find_region(GuestAddress(1 << 20)).is_none());
    assert!(now.find_region(GuestAddress(0)).is_some());
}

#[test]
fn an_offset_pushing_a_region_past_its_file_is_refused() {
    let f = memfd(8 * PAGE);
    let fits = GuestMemoryMmap::from_regions(vec![region(&f, 4 * PAGE, 0, 4 * PAGE)]).unwrap();
    accept_memory(&GuestMemoryAtomic::new(fits)).unwrap();
    let past = GuestMemoryMmap::from_regions(vec![region(&f, 5 * PAGE, 0, 4 * PAGE)]).unwrap();
    assert!(accept_memory(&GuestMemoryAtomic::new(past)).is_err());
}

#[test]
fn a_truncated_file_is_survived_and_its_tail_reported_lost() {
    let f = memfd(16 * PAGE);
    let gpa = 0x4000_0000u64;
    let mem = GuestMemoryMmap::from_regions(vec![region(&f, 0, gpa, 16 * PAGE)]).unwrap();
    let atomic = GuestMemoryAtomic::new(mem);
    accept_memory(&atomic).unwrap();
    let m = atomic.memory();
    m.write_slice(&[7u8; 4096], GuestAddress(gpa + 8 * PAGE))
        .unwrap();
    f.set_len(6 * PAGE).unwrap();
    let before = faults();
    // Past the new end: without the handler this read kills the process.
    let mut buf = [1u8; 64];
    m.read_slice(&mut buf, GuestAddress(gpa + 8 * PAGE + 100))
        .unwrap();
    assert_eq!(buf, [0u8; 64], "the faulting read completes on zeroes");
    assert!(faults() > before);
    // Writes past the end complete too (on anonymous memory).
    m.write_slice(&[9u8; 16], GuestAddress(gpa + 15 * PAGE))
        .unwrap();
    assert!(lost(&m, [(gpa + 8 * PAGE, 512)]));
    assert!(
        lost(&m, [(gpa + 7 * PAGE, 2 * PAGE)]),
        "a range reaching into the tail"
    );
    assert!(
        !lost(&m, [(gpa, 4 * PAGE)]),
        "the start of the region still holds"
    );
    // Below the fault the file still backs the mapping.
    m.write_slice(&[3u8; 8], GuestAddress(gpa)).unwrap();
    let mut b = [0u8; 8];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, 0).unwrap();
    assert_eq!(b, [3u8; 8]);
}

#[test]
fn a_sigbus_outside_guest_memory_still_kills() {
    install();
    let f = memfd(2 * PAGE);
    forget_unmapped();
    // SAFETY: the child only calls async-signal-safe functions (mmap,
    // ftruncate, a volatile load, _exit) before it exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: a shared mapping of our own memfd, never registered.
        unsafe {
            // At a fixed address far from anything mapped, so that no
            // stale entry of another test's (unmapped) region covers it.
            let p = libc::mmap(
                0x6d00_0000_0000usize as *mut libc::c_void,
                2 * PAGE as usize,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_FIXED_NOREPLACE,
                std::os::fd::AsRawFd::as_raw_fd(&f),
                0,
            );
            if p == libc::MAP_FAILED {
                libc::_exit(2);
            }
            libc::ftruncate(std::os::fd::AsRawFd::as_raw_fd(&f), 0);
            std::ptr::read_volatile(p.cast::<u8>().add(PAGE as usize));
            libc::_exit(0);
        }
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGBUS,
        "child status {status:#x}"
    );
}
