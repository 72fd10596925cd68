//! The pin model against a real client: libblkio on two queues, with
//! `--inject-read-delay` keeping a READ's pin alive while a WRITE from the
//! same buffer arrives on the other queue (R1). Each policy must report the
//! conflict with its action, and the data the client reads back afterwards
//! must be what the policy promises.

mod common;

use std::time::Duration;

use blkio::ReqFlags;
use common::{pattern, Client, Server};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const SRC: u64 = 0; // block the READ fills buffer B from
const DST: u64 = 64 * 4096; // block the WRITE from B goes to

/// Runs READ(SRC → B) on queue 0, then while its completion is held back,
/// WRITE(B → DST) on queue 1. Returns (write status, DST content read back, report events).
fn r1_case(extra: &[&str], wait_before_write: Duration) -> (i32, Vec<u8>, Vec<Value>, Server) {
    let mut args = vec!["--num-queues", "2", "--inject-read-delay", "400ms"];
    args.extend_from_slice(extra);
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.jsonl");
    let image = dir.path().join("disk.img");
    let report_s = report.to_str().unwrap().to_string();
    args.extend_from_slice(&["--report", &report_s]);
    let srv = Server::start_in(dir, image, &["--size", &(16 * MIB).to_string()], &args);
    let mut c = Client::connect(&srv.socket, 2, MIB as usize).unwrap();
    // The source block holds a known pattern; B starts as 0xee.
    c.buf()[8192..12288].copy_from_slice(&pattern(1, 4096));
    assert_eq!(c.write(0, SRC, 8192, 4096), 0);
    c.buf()[..4096].fill(0xee);

    let b = c.ptr(0);
    c.queues[0].read(SRC, b, 4096, 1, ReqFlags::empty());
    // Let pinblk pop the READ and pin B (blkio submits on do_io; poll once).
    let mut none = [std::mem::MaybeUninit::uninit()];
    let mut t = Duration::from_millis(0);
    let _ = c.queues[0].do_io(&mut none, 0, Some(&mut t), None);
    std::thread::sleep(wait_before_write);
    let write_status = c.write(1, DST, 0, 4096);
    assert_eq!(c.wait(0), 0, "the delayed READ completes");
    c.buf()[16384..20480].fill(0);
    assert_eq!(c.read(0, DST, 16384, 4096), 0);
    let back = c.buf()[16384..20480].to_vec();
    drop(c);
    let events = std::fs::read_to_string(&report)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (write_status, back, events, srv)
}

fn conflict(events: &[Value], srv: &Server) -> Value {
    let c: Vec<&Value> = events.iter().filter(|e| e["kind"] == "conflict").collect();
    assert_eq!(
        c.len(),
        1,
        "one conflict event: {events:?}\n{}",
        srv.log_text()
    );
    c[0].clone()
}

#[test]
fn passthrough_reports_r1_and_writes_zero_copy() {
    let (st, back, events, srv) = r1_case(&["--policy", "passthrough"], Duration::from_millis(100));
    assert_eq!(st, 0);
    let e = conflict(&events, &srv);
    assert_eq!(e["rule"], "R1");
    assert_eq!(e["action"], "passthrough");
    assert_eq!(e["op"], "write");
    assert_eq!(e["pin_direction"], "DeviceWrite");
    assert_eq!(e["sector"], DST / 512);
    assert_eq!(e["overlapping"].as_array().unwrap().len(), 1);
    assert!(!e["guest_ranges"].as_array().unwrap().is_empty());
    assert_eq!(
        back,
        pattern(1, 4096),
        "B held the READ's data when the WRITE was made"
    );
}

#[test]
fn bounce_copies_the_conflicting_write() {
    let (st, back, events, srv) = r1_case(&["--policy", "bounce"], Duration::from_millis(100));
    assert_eq!(st, 0);
    let e = conflict(&events, &srv);
    assert_eq!(e["rule"], "R1");
    assert_eq!(e["action"], "bounce");
    assert_eq!(back, pattern(1, 4096));
}

#[test]
fn stall_waits_for_the_unpin() {
    let (st, back, events, srv) = r1_case(
        &["--policy", "stall", "--stall-timeout", "5s"],
        Duration::from_millis(100),
    );
    assert_eq!(st, 0);
    let e = conflict(&events, &srv);
    assert_eq!(e["action"], "stall");
    let waited = e["stall_us"].as_u64().unwrap();
    assert!(
        waited >= 150_000,
        "stalled until the READ's unpin (~300 ms), waited {waited} µs"
    );
    assert!(
        waited < 5_000_000,
        "did not run into the timeout: {waited} µs"
    );
    assert_eq!(back, pattern(1, 4096));
}

#[test]
fn stall_times_out_and_bounces() {
    let (st, back, events, srv) = r1_case(
        &["--policy", "stall", "--stall-timeout", "50ms"],
        Duration::from_millis(100),
    );
    assert_eq!(st, 0);
    let e = conflict(&events, &srv);
    assert_eq!(e["action"], "stall_timeout_bounce");
    let waited = e["stall_us"].as_u64().unwrap();
    assert!((50_000..300_000).contains(&waited), "waited {waited} µs");
    assert_eq!(back, pattern(1, 4096));
}

#[test]
fn stall_never_waits_on_a_long_term_pin() {
    let (st, back, events, srv) = r1_case(
        &[
            "--policy",
            "stall",
            "--stall-timeout",
            "5s",
            "--longterm-after",
            "50ms",
        ],
        Duration::from_millis(200),
    );
    assert_eq!(st, 0);
    let e = conflict(&events, &srv);
    assert_eq!(e["rule"], "long_term");
    assert_eq!(e["action"], "bounce");
    assert!(e.get("stall_us").is_none(), "{e}");
    assert_eq!(back, pattern(1, 4096));
}

#[test]
fn fail_completes_the_conflicting_write_with_eio() {
    let (st, back, events, srv) = r1_case(&["--policy", "fail"], Duration::from_millis(100));
    assert_eq!(st, -libc::EIO);
    let e = conflict(&events, &srv);
    assert_eq!(e["action"], "fail");
    assert_eq!(
        back,
        vec![0u8; 4096],
        "the failed WRITE did not reach the image"
    );
}

#[test]
fn no_conflict_no_event_and_counters_balance() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.jsonl");
    let image = dir.path().join("disk.img");
    let srv = Server::start_in(
        dir,
        image,
        &["--size", &(16 * MIB).to_string()],
        &["--num-queues", "2", "--report", report.to_str().unwrap()],
    );
    let mut c = Client::connect(&srv.socket, 2, MIB as usize).unwrap();
    for i in 0..64u64 {
        let q = (i % 2) as usize;
        assert_eq!(c.write(q, i * 4096, (i as usize % 8) * 4096, 4096), 0);
        assert_eq!(c.read(q, i * 4096, 65536, 4096), 0);
    }
    drop(c);
    let (st, log) = srv.stop(libc::SIGTERM);
    assert!(st.success());
    assert_eq!(
        std::fs::read_to_string(&report).unwrap_or_default(),
        "",
        "no events without conflicts"
    );
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("stopped; counters: "))
        .expect("final counters logged");
    let v: Value = serde_json::from_str(line.split("stopped; counters: ").nth(1).unwrap()).unwrap();
    let pins = &v["pins"];
    assert_eq!(pins["pins_acquired"], 128, "{v}");
    assert_eq!(pins["pins_acquired"], pins["pins_released"], "{v}");
    assert_eq!(pins["pinned_pages"], 0, "{v}");
    assert_eq!(v["requests"]["requests"], 128, "{v}");
}
