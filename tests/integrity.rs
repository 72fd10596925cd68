//! Integrity against a real client (libblkio over the socket) and a real
//! image: clean workloads give no events; a block changed behind pinblk's
//! back is a checksum_failure (IOERR with --on-mismatch eio); a buffer
//! rewritten while WRITEs from it are in flight gives torn_write events under
//! passthrough and none with --bounce always; kill -9 then restart recovers.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use blkio::ReqFlags;
use common::{pattern, Client, Server};
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn events(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn start(dir: tempfile::TempDir, extra: &[&str]) -> (Server, PathBuf) {
    let report = dir.path().join("report.jsonl");
    let image = dir.path().join("disk.img");
    let mut args = vec!["--report", report.to_str().unwrap()];
    args.extend_from_slice(extra);
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let size = (16 * MIB).to_string();
    let create: &[&str] = if image.exists() {
        &[]
    } else {
        &["--size", &size]
    };
    (Server::start_in(dir, image, create, &args), report)
}

#[test]
fn clean_workload_gives_no_events() {
    let (srv, report) = start(tempfile::tempdir().unwrap(), &["--num-queues", "2"]);
    let mut c = Client::connect(&srv.socket, 2, 2 * MIB as usize).unwrap();
    for i in 0..32u64 {
        let q = (i % 2) as usize;
        let len = if i % 3 == 0 {
            512
        } else {
            4096 * (1 + i as usize % 4)
        };
        let data = pattern(i, len);
        c.buf()[..len].copy_from_slice(&data);
        assert_eq!(c.write(q, i * 65536 + (i % 8) * 512, 0, len), 0);
        assert_eq!(c.read(q, i * 65536 + (i % 8) * 512, MIB as usize, len), 0);
        assert_eq!(&c.buf()[MIB as usize..MIB as usize + len], &data[..]);
    }
    assert_eq!(c.flush(0), 0);
    assert_eq!(c.discard(0, 0, 65536), 0);
    assert_eq!(c.write_zeroes(1, 65536, 8192, ReqFlags::NO_UNMAP), 0);
    for i in 0..32u64 {
        assert_eq!(c.read(0, i * 65536, 0, 65536), 0);
    }
    drop(c);
    let (st, log) = srv.stop(libc::SIGTERM);
    assert!(st.success());
    assert_eq!(events(&report), Vec::<Value>::new(), "{log}");
    assert!(log.contains("checksum store closed cleanly"), "{log}");
}

fn changed_behind_back(on_mismatch: &str) -> (i32, Vec<Value>) {
    let (srv, report) = start(
        tempfile::tempdir().unwrap(),
        &["--on-mismatch", on_mismatch],
    );
    let mut c = Client::connect(&srv.socket, 1, MIB as usize).unwrap();
    c.buf()[..8192].copy_from_slice(&pattern(5, 8192));
    assert_eq!(c.write(0, 40960, 0, 8192), 0);
    // Flip one byte of the second block in the image file itself.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&srv.image)
        .unwrap();
    f.write_all_at(&[0x5a], 40960 + 4096 + 100).unwrap();
    f.sync_all().unwrap();
    let st = c.read(0, 40960, 65536, 8192);
    drop(c);
    (st, events(&report))
}

#[test]
fn block_changed_behind_pinblk_is_a_checksum_failure() {
    let (st, ev) = changed_behind_back("report");
    assert_eq!(st, 0);
    assert_eq!(ev.len(), 1, "{ev:?}");
    let e = &ev[0];
    assert_eq!(e["kind"], "checksum_failure");
    assert_eq!(e["block"], 11);
    assert_eq!(e["sector"], 88);
    assert_eq!(e["rule"], "R4");
    assert_eq!(e["algorithm"], "crc32c");
    assert_ne!(e["expected"], e["found"]);
}

#[test]
fn checksum_failure_with_on_mismatch_eio_fails_the_read() {
    let (st, ev) = changed_behind_back("eio");
    assert_eq!(st, -libc::EIO);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0]["kind"], "checksum_failure");
    assert_eq!(ev[0]["sector"], 88);
}

/// Rounds of [`scribble`], each 8 WRITEs of 64 KiB in flight at once.
const SCRIBBLE_ROUNDS: u64 = 24;

/// A thread keeps rewriting the buffer while WRITEs from it are in flight.
/// Each WRITE goes to its own 64 KiB of the image (written once, never
/// again), so a block torn on its way to the disk stays torn until it is
/// read back; the image's first 12 MiB are written, then read back.
fn scribble(extra: &[&str]) -> (Vec<Value>, Server, Vec<u8>) {
    let (srv, report) = start(tempfile::tempdir().unwrap(), extra);
    let mut c = Client::connect(&srv.socket, 1, MIB as usize).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let addr = c.ptr(0) as usize;
    let s2 = stop.clone();
    let scribbler = std::thread::spawn(move || {
        let mut v = 0u8;
        while !s2.load(Ordering::Relaxed) {
            v = v.wrapping_add(1);
            // SAFETY: the first 64 KiB of the client's shared memory region,
            // deliberately changed while the device reads it (the bug class
            // under test); the region outlives this thread (joined below).
            unsafe { std::ptr::write_bytes(addr as *mut u8, v, 65536) };
        }
    });
    // Several WRITEs in flight at once from the changing buffer.
    for round in 0..SCRIBBLE_ROUNDS {
        for i in 0..8u64 {
            let p = c.ptr(0);
            c.queues[0].write(
                (round * 8 + i) * 65536,
                p,
                65536,
                i as usize,
                ReqFlags::empty(),
            );
        }
        for _ in 0..8 {
            assert_eq!(c.wait(0), 0);
        }
    }
    stop.store(true, Ordering::Relaxed);
    scribbler.join().unwrap();
    // Read back everything written.
    let mut back = vec![0u8; 0];
    let mut st_all = Vec::new();
    for b in 0..SCRIBBLE_ROUNDS * 8 {
        st_all.push(c.read(0, b * 65536, 131072, 65536));
        back.extend_from_slice(&c.buf()[131072..131072 + 65536]);
    }
    drop(c);
    let _ = st_all;
    (events(&report), srv, back)
}

#[test]
fn torn_writes_under_passthrough_none_with_bounce_always() {
    let (ev, _srv, _) = scribble(&["--policy", "passthrough"]);
    let torn: Vec<&Value> = ev.iter().filter(|e| e["kind"] == "torn_write").collect();
    assert!(
        !torn.is_empty(),
        "a scribbled buffer under zero-copy writes gives torn_write events"
    );
    let t = torn[0];
    assert_eq!(t["rule"], "R3");
    assert_eq!(t["op"], "write");
    assert!(["submitted_bytes", "later_bytes", "neither"].contains(&t["outcome"].as_str().unwrap()));
    assert!(!t["guest_ranges"].as_array().unwrap().is_empty());
    // The stored checksum is the submitted one: torn blocks fail on read-back.
    let failures = ev
        .iter()
        .filter(|e| e["kind"] == "checksum_failure")
        .count();
    let later = torn
        .iter()
        .filter(|t| t["outcome"] != "submitted_bytes")
        .count();
    assert!(
        later == 0 || failures > 0,
        "torn blocks that reached the disk as later bytes fail verification"
    );

    let (ev, srv, _) = scribble(&["--bounce", "always"]);
    assert!(
        ev.is_empty(),
        "--bounce always: every write is a stable copy: {ev:?}"
    );
    // And every block verifies offline.
    let (st, log) = srv.stop(libc::SIGTERM);
    assert!(st.success(), "{log}");
}

#[test]
fn kill_9_mid_workload_then_restart_recovers_without_false_failures() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, _report) = start(dir, &["--num-queues", "2"]);
    let mut c = Client::connect(&srv.socket, 2, 4 * MIB as usize).unwrap();
    for i in 0..64usize {
        c.buf()[i * 65536..(i + 1) * 65536].copy_from_slice(&pattern(i as u64, 65536));
    }
    // Writes that complete (data on the image, checksums not yet flushed)...
    for i in 0..16u64 {
        assert_eq!(
            c.write(
                (i % 2) as usize,
                (100 + i) * 65536,
                i as usize * 65536,
                65536
            ),
            0
        );
    }
    // ...then many writes in flight on both queues, and kill -9 in the middle.
    for i in 0..64u64 {
        let q = (i % 2) as usize;
        let p = c.ptr(i as usize * 65536);
        c.queues[q].write(i * 65536, p, 65536, i as usize, ReqFlags::empty());
    }
    let mut none = [std::mem::MaybeUninit::uninit(); 1];
    for q in 0..2 {
        let mut t = std::time::Duration::ZERO;
        let _ = c.queues[q].do_io(&mut none, 0, Some(&mut t), None);
    }
    let mut srv = srv;
    srv.child.kill().unwrap(); // SIGKILL
    srv.child.wait().unwrap();
    drop(c);
    // Restart on the same image and store.
    let dir = std::mem::replace(&mut srv.dir, tempfile::tempdir().unwrap());
    let _ = std::fs::remove_file(&srv.socket); // left behind by SIGKILL
    drop(srv);
    let (srv, report2) = start(dir, &[]);
    let mut c = Client::connect(&srv.socket, 1, MIB as usize).unwrap();
    for i in 0..(16 * MIB / 65536) {
        assert_eq!(c.read(0, i * 65536, 0, 65536), 0);
    }
    drop(c);
    let ev = events(&report2);
    assert!(
        ev.iter().all(|e| e["kind"] == "recovered"),
        "only recovered regions, no checksum failure after the restart: {ev:?}"
    );
    // The checksums of the writes completed before the kill were in the
    // store's mapping (page cache) although no FLUSH was sent: nothing of
    // theirs is recovered. Only blocks of the 64 writes in flight at the
    // kill (blocks 0..1024) may be re-learned.
    let blocks: Vec<u64> = ev
        .iter()
        .flat_map(|e| e["block_list"].as_array().unwrap().clone())
        .map(|b| b.as_u64().unwrap())
        .collect();
    assert!(blocks.iter().all(|&b| b < 64 * 16), "{ev:?}");
    let image = srv.image.clone();
    let mut srv = srv;
    let _keep = std::mem::replace(&mut srv.dir, tempfile::tempdir().unwrap());
    let (st, log) = srv.stop(libc::SIGTERM);
    assert!(st.success(), "{log}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pinblk"))
        .args(["scrub", "--image"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scrub: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn report_subcommand_summarizes() {
    let (_st, _ev) = changed_behind_back("report");
    let (srv, report) = start(tempfile::tempdir().unwrap(), &[]);
    let mut c = Client::connect(&srv.socket, 1, MIB as usize).unwrap();
    assert_eq!(c.write(0, 0, 0, 4096), 0);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&srv.image)
        .unwrap();
    f.write_all_at(&[1], 10).unwrap();
    assert_eq!(c.read(0, 0, 4096, 4096), 0);
    drop(c);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pinblk"))
        .arg("report")
        .arg(&report)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("checksum_failure"), "{text}");
}
