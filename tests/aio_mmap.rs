//! `--aio`: the mapped engine end to end — the real `pinblk` binary, a
//! libblkio client over its socket, a real image file on tmpfs
//! (docs/DESIGN.md §6, "Engines").

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{count, ctl, events, pattern, scrub, Client, Server};

const MIB: usize = 1 << 20;

/// A fresh directory on tmpfs, or `None` (the test is then skipped) where
/// this machine has no /dev/shm.
fn shm_dir() -> Option<tempfile::TempDir> {
    match tempfile::tempdir_in("/dev/shm") {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("no tmpfs at /dev/shm ({e}): skipped");
            None
        }
    }
}

/// `pinblk serve` on a fully allocated (written) image of `size` bytes on tmpfs.
fn start_on_shm(size: usize, extra: &[&str]) -> Option<Server> {
    let dir = shm_dir()?;
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0u8; size]).unwrap();
    Some(Server::start_in(dir, image, &[], extra))
}

#[test]
fn auto_maps_a_tmpfs_image_and_data_round_trips_inline_and_through_the_copier() {
    let report_dir = tempfile::tempdir().unwrap();
    let report = report_dir.path().join("report.jsonl");
    let Some(srv) = start_on_shm(16 * MIB, &["--report", report.to_str().unwrap()]) else {
        return;
    };
    assert_eq!(
        srv.logged("aio: mmap (auto: a fully allocated file on tmpfs)"),
        1,
        "{}",
        srv.log_text()
    );
    let mut c = Client::connect(&srv.socket, 1, 8 * MIB).unwrap();
    // 4 KiB: copied inline; 128 KiB and 1 MiB: by the copier thread.
    let cases = [
        (0u64, 4096usize, 1u64),
        (MIB as u64, 128 << 10, 2),
        (4 * MIB as u64, MIB, 3),
    ];
    for &(off, len, seed) in &cases {
        let data = pattern(seed, len);
        c.buf()[..len].copy_from_slice(&data);
        assert_eq!(c.write(0, off, 0, len), 0, "write {len} at {off}");
    }
    assert_eq!(c.flush(0), 0);
    for &(off, len, seed) in &cases {
        c.buf()[2 * MIB..2 * MIB + len].fill(0);
        assert_eq!(c.read(0, off, 2 * MIB, len), 0, "read {len} at {off}");
        assert!(
            c.buf()[2 * MIB..2 * MIB + len] == pattern(seed, len)[..],
            "read-back of {len} at {off}"
        );
    }
    // The file holds what was written (the mapping is the page cache).
    let img = std::fs::read(&srv.image).unwrap();
    assert!(img[4 * MIB..5 * MIB] == pattern(3, MIB)[..]);
    // DISCARD goes to io_uring (a punched hole); the mapping reads it as zeros.
    assert_eq!(c.discard(0, MIB as u64, 65536), 0);
    c.buf()[..65536].fill(0x55);
    assert_eq!(c.read(0, MIB as u64, 0, 65536), 0);
    assert!(c.buf()[..65536].iter().all(|&b| b == 0));
    drop(c);
    let image = srv.image.clone();
    let (status, log, _dir) = srv.stop_keeping_dir(libc::SIGTERM);
    assert!(status.success(), "{log}");
    let ev = events(&report);
    assert_eq!(count(&ev, "checksum_failure"), 0, "{ev:?}");
    assert_eq!(count(&ev, "torn_write"), 0, "{ev:?}");
    // Every checksum recorded through the mapped path matches the image.
    let (ok, code, out) = scrub(&image);
    assert!(ok, "scrub exit {code:?}: {out}");
}

#[test]
fn a_sparse_tmpfs_image_stays_on_io_uring() {
    let Some(dir) = shm_dir() else {
        return;
    };
    let image = dir.path().join("sparse.img");
    let srv = Server::start_in(dir, image, &["--size", "16M"], &[]);
    assert_eq!(
        srv.logged("aio: io_uring (auto: a sparse file on tmpfs"),
        1,
        "{}",
        srv.log_text()
    );
    let mut c = Client::connect(&srv.socket, 1, MIB).unwrap();
    c.write_flush_read_back(&[0, 8 * MIB as u64]);
}

#[test]
fn mmap_with_direct_is_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let image: PathBuf = dir.path().join("disk.img");
    std::fs::write(&image, vec![0u8; MIB]).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pinblk"))
        .args(["serve", "--socket"])
        .arg(dir.path().join("s.sock"))
        .arg("--image")
        .arg(&image)
        .args(["--aio", "mmap", "--direct", "--checksum", "off"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--aio mmap cannot serve an image opened with --direct")
            && err.contains("--aio io_uring"),
        "{err}"
    );
}

#[test]
fn an_image_truncated_under_its_mapping_does_not_kill_pinblk() {
    let ctl_dir = tempfile::tempdir().unwrap();
    let control = ctl_dir.path().join("ctl.sock");
    let Some(srv) = start_on_shm(
        16 * MIB,
        &[
            "--aio",
            "mmap",
            "--checksum",
            "off",
            "--control",
            control.to_str().unwrap(),
        ],
    ) else {
        return;
    };
    let mut c = Client::connect(&srv.socket, 1, 2 * MIB).unwrap();
    c.buf()[..4096].copy_from_slice(&pattern(5, 4096));
    assert_eq!(c.write(0, 0, 0, 4096), 0);
    let (ok, stats, err) = ctl(&control, &["query-stats"]);
    assert!(ok, "{err}");
    let q = &stats["queues"][0];
    assert_eq!(q["engine"], "mmap", "{q}");
    assert_eq!(q["queue"], 0, "{q}");
    assert_eq!(q["in_flight"], 0, "nothing in flight between requests: {q}");
    // Another process shrinks the image to 1 MiB under pinblk.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&srv.image)
        .unwrap()
        .set_len(MIB as u64)
        .unwrap();
    // Past the new end, through the copier: a SIGBUS in the copy. The
    // request is redone through io_uring, which reads nothing there: the
    // driver gets an error, not a dead backend.
    assert_ne!(c.read(0, 8 * MIB as u64, 0, 128 << 10), 0);
    assert_eq!(
        srv.logged("image mapping raised SIGBUS"),
        1,
        "{}",
        srv.log_text()
    );
    // The queue goes on with io_uring, and says so.
    let (ok, stats, err) = ctl(&control, &["query-stats"]);
    assert!(ok, "{err}");
    let q = &stats["queues"][0];
    assert_eq!(q["engine"], "io_uring_after_sigbus", "{q}");
    c.buf()[..4096].fill(0);
    assert_eq!(c.read(0, 0, 0, 4096), 0);
    assert!(c.buf()[..4096] == pattern(5, 4096)[..]);
    c.buf()[..4096].copy_from_slice(&pattern(6, 4096));
    assert_eq!(c.write(0, 4096, 0, 4096), 0);
    assert_eq!(c.flush(0), 0);
    let img = std::fs::read(&srv.image).unwrap();
    assert!(img[4096..8192] == pattern(6, 4096)[..]);
}

/// Guest memory the frontend truncates under requests the mapped engine
/// copies (a 128 KiB WRITE out of it on the copier thread, a 4 KiB READ
/// into it inline; checksums off, so the engine's copies are the first CPU
/// accesses): both fail with IOERR, pinblk lives, and the queue serves a
/// good request after them (issue 13 finding 5, on the mapped engine).
#[test]
fn guest_memory_truncated_under_mapped_copies_fails_only_those_requests() {
    use common::frontend::*;
    const WAIT: std::time::Duration = std::time::Duration::from_secs(20);
    let arena = Arena {
        meta: 64 * 1024,
        data: MIB as u64,
        stride: 4096,
    };
    let Some(mut server) = start_on_shm(8 * MIB, &["--aio", "mmap", "--checksum", "off"]) else {
        return;
    };
    let mut f = TestFrontend::connect(&server.socket, GuestLayout::new(8 * MIB as u64));
    f.start_queue(0, RingLayout::at(0, 256)).unwrap();
    let lost = 6 * MIB as u64;
    f.write_mem(lost, &pattern(9, 128 << 10));
    f.truncate_region(0, 4 * MIB as u64);
    let wr = BlkRequest::write(64, lost, 128 << 10, arena.meta + 32 * 10);
    let rd = BlkRequest::read(1024, lost + (256 << 10), 4096, arena.meta + 32 * 11);
    let hw = f.write_request(0, Arena::first_desc(10), &wr);
    let hr = f.write_request(0, Arena::first_desc(11), &rd);
    f.publish(0, &[hw, hr]);
    f.kick(0);
    if f.wait_used(0, 2, WAIT).is_err() {
        panic!(
            "requests on lost memory never completed; pinblk exit: {:?}: {}",
            server.child.try_wait().unwrap(),
            server.log_text()
        );
    }
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "{}",
        server.log_text()
    );
    assert_eq!(f.read_u8(wr.status), VIRTIO_BLK_S_IOERR);
    assert_eq!(f.read_u8(rd.status), VIRTIO_BLK_S_IOERR);
    // A good WRITE and READ back on memory that is still there.
    let data = pattern(3, 4096);
    let w = arena.write(20, 8 * 20);
    f.write_mem(w.data.unwrap().0, &data);
    let h = f.write_request(0, Arena::first_desc(20), &w);
    f.publish(0, &[h]);
    f.kick(0);
    f.wait_used(0, 3, WAIT).expect("WRITE completes");
    assert_eq!(f.read_u8(w.status), VIRTIO_BLK_S_OK);
    let r = arena.read(21, 8 * 20);
    f.fill_mem(r.data.unwrap().0, 4096, 0);
    let h = f.write_request(0, Arena::first_desc(21), &r);
    f.publish(0, &[h]);
    f.kick(0);
    f.wait_used(0, 4, WAIT).expect("READ completes");
    assert_eq!(f.read_u8(r.status), VIRTIO_BLK_S_OK);
    assert_eq!(f.read_mem(r.data.unwrap().0, 4096), data);
    assert!(
        server.log_text().contains("SIGBUS absorbed"),
        "{}",
        server.log_text()
    );
    // Not the image mapping's SIGBUS: that one is still served through it.
    assert_eq!(server.logged("image mapping raised SIGBUS"), 0);
}

/// R4 on the mapped engine verifies the guard CRCs the engine took while
/// it copied (no second pass over guest memory): a byte changed in the
/// image file behind pinblk's back is still a `checksum_failure` naming the
/// block, for a 128 KiB READ through the copier and a 4 KiB one inline, and
/// `--on-mismatch eio` still fails the READ.
#[test]
fn a_block_changed_behind_pinblk_fails_verification_from_the_guard_crcs() {
    use std::os::unix::fs::FileExt;
    for on_mismatch in ["report", "eio"] {
        let report_dir = tempfile::tempdir().unwrap();
        let report = report_dir.path().join("report.jsonl");
        let Some(srv) = start_on_shm(
            16 * MIB,
            &[
                "--report",
                report.to_str().unwrap(),
                "--on-mismatch",
                on_mismatch,
            ],
        ) else {
            return;
        };
        assert_eq!(srv.logged("aio: mmap"), 1, "{}", srv.log_text());
        let mut c = Client::connect(&srv.socket, 1, 4 * MIB).unwrap();
        c.buf()[..128 << 10].copy_from_slice(&pattern(7, 128 << 10));
        assert_eq!(c.write(0, MIB as u64, 0, 128 << 10), 0);
        c.buf()[..4096].copy_from_slice(&pattern(8, 4096));
        assert_eq!(c.write(0, 8192, 0, 4096), 0);
        // Clean reads first: nothing to report.
        assert_eq!(c.read(0, MIB as u64, MIB, 128 << 10), 0);
        assert_eq!(c.read(0, 8192, MIB, 4096), 0);
        assert_eq!(count(&events(&report), "checksum_failure"), 0);
        // One byte in block 261 (the 128 KiB READ's sixth) and in block 2.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&srv.image)
            .unwrap();
        f.write_all_at(
            &[0x5a ^ pattern(7, 128 << 10)[5 * 4096 + 7]],
            MIB as u64 + 5 * 4096 + 7,
        )
        .unwrap();
        f.write_all_at(&[0xa5 ^ pattern(8, 4096)[100]], 8192 + 100)
            .unwrap();
        let want = if on_mismatch == "eio" { -libc::EIO } else { 0 };
        assert_eq!(c.read(0, MIB as u64, MIB, 128 << 10), want);
        assert_eq!(c.read(0, 8192, MIB, 4096), want);
        let ev = events(&report);
        let fails: Vec<_> = ev
            .iter()
            .filter(|e| e["kind"] == "checksum_failure")
            .collect();
        assert_eq!(fails.len(), 2, "{ev:?}");
        assert_eq!(fails[0]["block"], 261);
        assert_eq!(fails[1]["block"], 2);
        assert!(fails
            .iter()
            .all(|e| e["rule"] == "R4" && e["expected"] != e["found"]));
    }
}
