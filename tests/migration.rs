//! Live migration over the real socket (issue 12, docs/DESIGN.md §13): a
//! second frontend connects while the first is served; the first (the
//! source) turns dirty logging on (VHOST_F_LOG_ALL + SET_LOG_BASE with a
//! LOG_SHMFD memfd) and stops its ring with READs in flight; every page
//! pinblk wrote is in the log; the destination serves; when the source
//! ends, the report names both connections. Plus: two libblkio clients
//! served side by side share the image, a third waits for a free lane,
//! and SIGTERM stops them all cleanly.

mod common;

use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use common::frontend::*;
use common::{count, events, pattern, Client, Server};
use vhost::VhostUserDirtyLogRegion;

const MIB: u64 = 1 << 20;
const MEM: u64 = 4 * MIB;
const READS: u16 = 8;

/// The frontend's dirty log: one bit per 4 KiB page of `MEM`, in a memfd.
fn log_memfd() -> std::fs::File {
    // SAFETY: memfd_create(2) with a NUL-terminated name; the fd is owned
    // by the File from here on.
    let fd = unsafe { libc::memfd_create(c"test-dirty-log".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: `fd` was just created and is owned by nobody else.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(MEM / 4096 / 8).unwrap();
    f
}

fn dirty(log: &std::fs::File, gpa: u64) -> bool {
    let page = gpa / 4096;
    let mut b = [0u8];
    log.read_exact_at(&mut b, page / 8).unwrap();
    b[0] & (1 << (page % 8)) != 0
}

/// Waits up to 10 s for the report to hold a `migration` event.
fn wait_migration_event(server: &Server, report: &std::path::Path) -> Vec<serde_json::Value> {
    let t = Instant::now();
    loop {
        let ev = events(report);
        if count(&ev, "migration") > 0 {
            return ev;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no migration event\n{}",
            server.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_migration_on_one_host_logs_every_write_and_marks_the_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.jsonl");
    // READs held 300 ms in pinblk: in flight when the source stops its ring.
    let server = Server::start_reporting(dir, 4 * MIB, &report, &["--inject-read-delay", "300ms"]);
    let a = Arena {
        meta: MIB,
        data: 2 * MIB,
        stride: 4096,
    };

    let mut src = TestFrontend::connect(&server.socket, GuestLayout::new(MEM));
    src.start_queue(0, RingLayout::at(0, 256)).unwrap();
    // The destination connects to the same socket while the source is served.
    let mut dst = TestFrontend::connect(&server.socket, GuestLayout::new(MEM));

    // Migration starts: LOG_ALL acked, then the log handed over (LOG_SHMFD).
    let log = log_memfd();
    let features = src.features | F_LOG_ALL;
    src.call(move |fe| vhost::VhostBackend::set_features(fe, features))
        .expect("SET_FEATURES with LOG_ALL");
    let region = VhostUserDirtyLogRegion {
        mmap_size: MEM / 4096 / 8,
        mmap_offset: 0,
        mmap_handle: log.as_raw_fd(),
    };
    src.call(move |fe| vhost::VhostBackend::set_log_base(fe, 0, Some(region)))
        .expect("SET_LOG_BASE");

    let heads: Vec<u16> = (0..READS)
        .map(|n| src.write_request(0, Arena::first_desc(n), &a.read(n, 8 * u64::from(n))))
        .collect();
    src.publish(0, &heads);
    src.kick(0);
    std::thread::sleep(Duration::from_millis(50));
    // The switch-over: the source's ring stops with the READs in flight.
    let base = src.get_vring_base(0).expect("GET_VRING_BASE");
    assert_eq!(base, u32::from(READS));
    assert_eq!(src.used_idx(0), READS, "drained before the answer");
    let ring = src.ring(0);
    assert!(dirty(&log, ring.used), "used ring page logged");
    for n in 0..READS {
        let r = a.read(n, 8 * u64::from(n));
        assert_eq!(src.read_u8(r.status), 0, "READ {n} status");
        assert!(
            dirty(&log, r.data.unwrap().0),
            "READ {n} data (zero-copy DMA) logged"
        );
        assert!(dirty(&log, r.status), "READ {n} status byte logged");
    }
    assert!(
        !dirty(&log, a.meta + 64 * 4096),
        "an untouched page stays clean"
    );

    // The destination takes over and serves.
    dst.start_queue(0, RingLayout::at(0, 256)).unwrap();
    let h = dst.write_request(0, 0, &a.read(0, 8));
    dst.publish(0, &[h]);
    dst.kick(0);
    dst.wait_used(0, 1, Duration::from_secs(10))
        .unwrap_or_else(|i| panic!("destination READ not completed (used idx {i})"));

    // The source goes away: the boundary is reported, naming both.
    src.disconnect();
    let ev = wait_migration_event(&server, &report);
    let m: Vec<&serde_json::Value> = ev.iter().filter(|e| e["kind"] == "migration").collect();
    assert_eq!(m.len(), 1, "{ev:?}");
    assert_eq!(m[0]["source_connection"], 1);
    assert_eq!(m[0]["destination_connection"], 2);
    assert_eq!(m[0]["requests_drained"], u64::from(READS));
    assert_eq!(count(&ev, "checksum_failure"), 0);

    dst.disconnect();
    let (st, log_text) = server.stop(libc::SIGTERM);
    assert!(st.success(), "{log_text}");
    assert!(
        log_text.contains("checksum store closed cleanly"),
        "{log_text}"
    );
    assert!(
        log_text.contains("connection 1: dirty logging on"),
        "{log_text}"
    );
}

/// A frontend that never turned dirty logging on is no migration source:
/// its end is not reported, even with another connection served.
#[test]
fn a_connection_without_dirty_logging_is_no_migration() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.jsonl");
    let server = Server::start_reporting(dir, 4 * MIB, &report, &[]);
    let mut a = TestFrontend::connect(&server.socket, GuestLayout::new(MEM));
    a.start_queue(0, RingLayout::at(0, 256)).unwrap();
    let b = TestFrontend::connect(&server.socket, GuestLayout::new(MEM));
    a.get_vring_base(0).expect("GET_VRING_BASE");
    a.disconnect();
    b.disconnect();
    let (st, log) = server.stop(libc::SIGTERM);
    assert!(st.success(), "{log}");
    assert_eq!(count(&events(&report), "migration"), 0, "{log}");
}

/// Two clients served side by side share the image; a third waits until a
/// connection ends (at most two at once); SIGTERM stops the rest cleanly.
#[test]
fn two_connections_share_the_device_and_a_third_waits() {
    let server = Server::start(8 * MIB, &[]);
    let mut a = Client::connect(&server.socket, 1, 64 * 1024).expect("first client");
    let mut b = Client::connect(&server.socket, 1, 64 * 1024).expect("second client");
    let data = pattern(7, 8192);
    a.buf()[..8192].copy_from_slice(&data);
    assert_eq!(a.write(0, 0, 0, 8192), 0);
    assert_eq!(b.read(0, 0, 0, 8192), 0);
    assert_eq!(
        &b.buf()[..8192],
        &data[..],
        "the second sees the first's write"
    );
    let data2 = pattern(9, 4096);
    b.buf()[..4096].copy_from_slice(&data2);
    assert_eq!(b.write(0, 65536, 0, 4096), 0);
    assert_eq!(a.read(0, 65536, 0, 4096), 0);
    assert_eq!(&a.buf()[..4096], &data2[..]);

    let socket = server.socket.clone();
    let third = std::thread::spawn(move || {
        let mut c = Client::connect(&socket, 1, 4096).expect("third client");
        assert_eq!(c.read(0, 65536, 0, 4096), 0);
        c.buf()[..4096].to_vec()
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !third.is_finished(),
        "a third connection was served at once"
    );
    drop(a);
    let got = third.join().unwrap();
    assert_eq!(got, data2, "the third, served once the first ended");

    let (st, log) = server.stop(libc::SIGTERM);
    assert!(st.success(), "{log}");
    assert!(log.contains("checksum store closed cleanly"), "{log}");
    drop(b);
}

/// QEMU turns dirty logging on (and off) with SET_VRING_ADDR on running
/// rings. Requests completing meanwhile must each get their used element:
/// none overwritten by the next (vhost-user-backend patch L3).
#[test]
fn set_vring_addr_on_a_running_ring_loses_no_used_element() {
    let server = Server::start(4 * MIB, &[]);
    let a = Arena {
        meta: MIB,
        data: 2 * MIB,
        stride: 4096,
    };
    let mut f = TestFrontend::connect(&server.socket, GuestLayout::new(MEM));
    f.start_queue(0, RingLayout::at(0, 256)).unwrap();
    const N: u16 = 80;
    for round in 0..100u16 {
        let start = f.used_idx(0);
        let mut heads: Vec<u16> = (0..N)
            .map(|n| f.write_request(0, Arena::first_desc(n), &a.read(n, 8 * u64::from(n))))
            .collect();
        f.publish(0, &heads);
        f.kick(0);
        for i in 0..20 {
            f.set_vring_addr_again(0, (round + i) % 2 == 0)
                .expect("SET_VRING_ADDR on a running ring");
        }
        let target = start.wrapping_add(N);
        f.wait_used(0, target, Duration::from_secs(10))
            .unwrap_or_else(|i| {
                panic!("round {round}: used index {i}, want {target}: a used element was lost")
            });
        let mut got: Vec<u16> = (0..N)
            .map(|k| f.used_elem(0, start.wrapping_add(k)).0 as u16)
            .collect();
        got.sort_unstable();
        heads.sort_unstable();
        assert_eq!(got, heads, "round {round}: each head used once");
    }
    f.disconnect();
    let (st, log) = server.stop(libc::SIGTERM);
    assert!(st.success(), "{log}");
}
