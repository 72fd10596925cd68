//! Small operating-system helpers shared by the rooms that own files.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// How long [`lock_file`] waits for a lock held by someone else.
///
/// A pinblk killed with SIGKILL while its io_uring had requests in flight
/// keeps its files (and their `flock` locks) referenced until the kernel has
/// torn the ring down, which happens asynchronously, shortly after the
/// process is gone: a restart right after a kill sees the lock still held
/// for a moment.
pub const LOCK_WAIT: Duration = Duration::from_secs(3);

/// Takes an advisory `flock(2)` lock on `file`: shared or exclusive,
/// retrying every 20 ms for up to `wait` while another open file description
/// holds a conflicting lock.
///
/// # Errors
/// `ErrorKind::WouldBlock` (EWOULDBLOCK) if the lock is still held after
/// `wait`; any other error of flock(2) at once.
pub fn lock_file(file: &File, exclusive: bool, wait: Duration) -> io::Result<()> {
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    let start = Instant::now();
    loop {
        // SAFETY: flock on a valid fd owned by `file`; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) || start.elapsed() >= wait {
            return Err(e);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `fd` is readable or `timeout` has passed (poll(2), POLLIN);
/// `true` if readable. EINTR counts as not readable (the caller re-checks
/// its own deadline).
pub fn wait_readable(fd: &impl AsRawFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd on our stack, nfds = 1; poll(2) only writes
    // its `revents`.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    n > 0 && p.revents & libc::POLLIN != 0
}
