//! Deterministic tests of every detection rule and policy on mock virtqueues.
//!
//! Each test builds one [`Device`] with two queues over a real image file and
//! one guest memory, one [`QueueWorker`] (real io_uring) per queue, each with
//! its own vring on its own `MockSplitQueue` (at different guest addresses),
//! and plays the driver by hand: two overlapping requests on the two queues.
//!
//! A READ is held in flight with `read_delay` (probability 1.0): its I/O lands
//! and its completion and pin are held back until the delay ends. A WRITE
//! cannot be held that way, so an in-flight WRITE (R2) is simulated by pinning
//! the buffer directly in the device's [`PinTracker`](crate::pin::PinTracker) on queue 0.
//!
//! Every test checks the `conflict` events read back from the JSON Lines
//! report, the used rings, the status bytes, the image and the guest buffers,
//! and at the end that no pin is left (acquired == released, no pinned page).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};

use super::test_util::{
    device_with, fill, guest_memory, image_bytes, image_file, pattern, peek, report_lines, vring,
    Driver, Io, IMAGE_SIZE, IOERR, OK,
};
use super::{GuestMem, QueueWorker, Vring};
use crate::device::{Device, DeviceParts};
use crate::guest::GuestRange;
use crate::pin::policy::{Policy, PolicyConfig};
use crate::pin::{Direction, PinHandle};
use crate::report::ReportWriter;

/// Where each queue's descriptor table and rings are.
const RINGS: [u64; 2] = [0x0, 0x1_0000];
/// Where each queue's headers and status bytes are allocated.
const HDR_AREA: [u64; 2] = [0x10_0000, 0x18_0000];
/// Size of each `HDR_AREA`.
const HDR_AREA_LEN: u64 = 0x8_0000;
/// The shared data buffer B: 8 KiB, not page-aligned, so it touches 3 guest pages.
const B: u64 = 0x40_0200;
const LEN: u32 = 8192;
/// Two more data buffers, far from B (no shared guest page).
const W0: u64 = 0x50_0000;
const W1: u64 = 0x60_0000;
/// Sectors: what READs read, and where WRITEs write.
const SRC: u64 = 64;
const SRC2: u64 = 256;
const DST: u64 = 512;
const DST2: u64 = 1024;

/// What the driver puts in B before a test.
const FILL: u8 = 0xee;

/// How long a held READ is held.
const HOLD: Duration = Duration::from_millis(300);
/// Upper bound on anything that is expected to happen soon.
const SOON: Duration = Duration::from_secs(5);
/// `longterm_after` of the tests in which no pin becomes long-term.
const NOT_LONG: Duration = Duration::from_secs(60);

/// What a READ of `LEN` bytes at `sector` returns (the image is never written there).
fn sector_data(sector: u64) -> Vec<u8> {
    image_bytes(sector * 512, LEN as usize)
}

fn b_range() -> GuestRange {
    GuestRange { addr: B, len: LEN }
}

/// B as the report names it.
fn b_report_range() -> String {
    format!("{B:#x}+{LEN:#x}")
}

fn settings(policy: Policy) -> PolicyConfig {
    PolicyConfig {
        policy,
        bounce_always: false,
        stall_timeout: Duration::from_secs(30),
        read_delay: None,
        read_delay_probability: 1.0,
        bounce_pool_bytes: 64 << 20,
        bounce_queue_bytes: 32 << 20,
    }
}

/// `settings(policy)` with every READ held for `HOLD`.
fn held(policy: Policy) -> PolicyConfig {
    PolicyConfig {
        read_delay: Some(HOLD),
        ..settings(policy)
    }
}

/// The device side: image, report, device, and one vring + worker per queue.
struct Rig {
    image_path: PathBuf,
    report_path: PathBuf,
    dev: Arc<Device>,
    gm: Arc<GuestMem>,
    vrings: Vec<Vring>,
    workers: Vec<QueueWorker>,
    _dir: tempfile::TempDir,
}

impl Rig {
    /// A two-queue device with `policy` and pins long-term after `longterm_after`,
    /// and (a handle on) its guest memory, for `Rig::drivers`.
    fn new(policy: PolicyConfig, longterm_after: Duration) -> (Rig, Arc<GuestMem>) {
        let dir = tempfile::tempdir().unwrap();
        let (image_path, image) = image_file(dir.path(), false);
        let report_path = dir.path().join("report.jsonl");
        let dev = Arc::new(device_with(
            image,
            2,
            false,
            "pinblk-policy-test",
            DeviceParts {
                policy,
                longterm_after,
                report: ReportWriter::open(Some(&report_path)).unwrap(),
                ..DeviceParts::default()
            },
        ));
        let (mem, gm) = guest_memory();
        let mut vrings = Vec::new();
        let mut workers = Vec::new();
        for q in 0..2 {
            vrings.push(vring(&mem));
            workers.push(QueueWorker::new(dev.clone(), mem.clone(), q).unwrap());
        }
        let rig = Rig {
            image_path,
            report_path,
            dev,
            gm: gm.clone(),
            vrings,
            workers,
            _dir: dir,
        };
        (rig, gm)
    }

    /// The drivers of queues 0 and 1 (`gm` is the rig's guest memory). Data
    /// buffers are placed by the test.
    fn drivers<'a>(&self, gm: &'a GuestMem) -> (Driver<'a>, Driver<'a>) {
        assert!(std::ptr::eq(gm, &*self.gm));
        let driver = |q: usize| {
            let bufs = HDR_AREA[q]..HDR_AREA[q] + HDR_AREA_LEN;
            Driver::new(gm, &self.vrings[q], RINGS[q], bufs)
        };
        (driver(0), driver(1))
    }

    /// A kick of queue `q`: pops and starts everything available.
    fn kick(&mut self, q: usize) {
        self.workers[q].process_queue(&self.vrings[q]);
    }

    /// The completion eventfd of queue `q` fired (or not: it is harmless).
    fn poke(&mut self, q: usize) {
        self.workers[q].complete(&self.vrings[q]);
    }

    /// Waits for every in-flight request of queue `q`.
    fn drain(&mut self, q: usize) {
        self.workers[q].drain();
        assert_eq!(self.workers[q].inflight(), 0);
    }

    /// Pokes queue `q` every millisecond until `done()` or `SOON` has passed.
    fn poke_until(&mut self, q: usize, what: &str, mut done: impl FnMut() -> bool) {
        let t = Instant::now();
        loop {
            self.poke(q);
            if done() {
                return;
            }
            assert!(t.elapsed() < SOON, "queue {q}: {what} did not happen");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Pokes queue `q` every millisecond for `d`, checking `still()` each time.
    fn poke_for(&mut self, q: usize, d: Duration, mut still: impl FnMut()) {
        let t = Instant::now();
        while t.elapsed() < d {
            self.poke(q);
            still();
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn image(&self) -> Vec<u8> {
        std::fs::read(&self.image_path).unwrap()
    }

    fn image_at(&self, sector: u64) -> Vec<u8> {
        let off = (sector * 512) as usize;
        self.image()[off..off + LEN as usize].to_vec()
    }

    /// Every `conflict` event of the report file, in order.
    fn conflicts(&self) -> Vec<Value> {
        let all = report_lines(&self.report_path);
        for e in &all {
            assert_eq!(e["kind"], "conflict", "unexpected event {e}");
        }
        all
    }

    /// The one conflict event of the report.
    fn the_conflict(&self) -> Value {
        let mut c = self.conflicts();
        assert_eq!(c.len(), 1, "conflict events: {c:?}");
        c.pop().unwrap()
    }

    /// No pin, no bounce buffer and no request is left.
    fn assert_idle(&self) {
        for w in &self.workers {
            assert_eq!(w.inflight(), 0);
        }
        let c = self.dev.pins().counters();
        assert_eq!(c.pins_acquired, c.pins_released, "pin counters {c:?}");
        assert_eq!(c.pinned_pages, 0, "pin counters {c:?}");
        assert_eq!(c.inflight_pins, 0, "pin counters {c:?}");
        assert_eq!(self.bounce_in_use(), 0);
    }

    /// Bytes of bounce buffers held now.
    fn bounce_in_use(&self) -> u64 {
        self.dev.bounce_in_use().load(Ordering::Relaxed)
    }
}

/// Request builders of these tests: `LEN` bytes of data at a buffer the test
/// placed, in three descriptors.
impl Driver<'_> {
    fn read_into(&mut self, sector: u64, data: u64) -> Io {
        self.request_with(VIRTIO_BLK_T_IN, sector, data, &[(data, LEN, true)])
    }

    fn write_from(&mut self, sector: u64, data: u64) -> Io {
        self.request_with(VIRTIO_BLK_T_OUT, sector, data, &[(data, LEN, false)])
    }
}

/// Starts a READ of `SRC` into B on queue 0 (B filled with `FILL` first) and
/// waits until its data has landed in B; the READ stays in flight (held by
/// `read_delay`, pinned, submitted). Returns it.
fn start_held_read(rig: &mut Rig, d0: &mut Driver<'_>) -> Io {
    assert!(rig.dev.policy().read_delay.is_some());
    fill(d0.mem, B, &[FILL; LEN as usize]);
    let rd = d0.read_into(SRC, B);
    rig.kick(0);
    let mem = d0.mem;
    rig.poke_until(0, "READ data landing in B", || {
        peek(mem, B, LEN as usize) == sector_data(SRC)
    });
    d0.expect_pending(&rd);
    let by = rig.dev.pins().pinned_by(&[b_range()], None, None);
    assert_eq!(by.len(), 1, "{by:?}");
    assert_eq!((by[0].queue, by[0].direction), (0, Direction::DeviceWrite));
    assert!(by[0].submitted, "a READ under I/O is submitted");
    rd
}

/// The R1 setup: READ 1 of `SRC` into B held on queue 0 (`start_held_read`),
/// then WRITE 2 from B to `DST` on queue 1, kicked. Returns (READ, WRITE).
fn start_r1(rig: &mut Rig, d0: &mut Driver<'_>, d1: &mut Driver<'_>) -> (Io, Io) {
    let rd = start_held_read(rig, d0);
    let wr = d1.write_from(DST, B);
    rig.kick(1);
    (rd, wr)
}

/// Lets the held READ `rd` of queue 0 complete, and checks it did.
fn finish_held_read(rig: &mut Rig, d0: &Driver<'_>, rd: &Io) {
    rig.drain(0);
    d0.expect(rd, OK, LEN + 1);
}
/// The fields every conflict event over B has: `kind`, `length` and
/// `guest_ranges`, and each of `fields` (name, value).
fn assert_b_event(e: &Value, fields: &[(&str, Value)]) {
    assert_eq!(e["kind"], "conflict", "{e}");
    for (name, want) in fields {
        assert_eq!(&e[*name], want, "{name}: {e}");
    }
    assert_eq!(e["length"], LEN, "{e}");
    assert_eq!(
        e["guest_ranges"],
        serde_json::json!([b_report_range()]),
        "{e}"
    );
}

/// The fields every R1 event has: WRITE `write_id` on queue 1 from B to DST
/// against READ `read_id` (queue 0) into B.
fn assert_r1_event(e: &Value, policy: &str, action: &str, write_id: u64, read_id: u64) {
    assert_b_event(
        e,
        &[
            ("rule", "R1".into()),
            ("policy", policy.into()),
            ("action", action.into()),
            ("op", "write".into()),
            ("queue", 1.into()),
            ("request_id", write_id.into()),
            ("sector", DST.into()),
            ("pin_direction", "DeviceWrite".into()),
            ("overlapping", serde_json::json!([read_id])),
        ],
    );
}

// ---------------------------------------------------------------- R1

// R1 under each policy: READ into B held on queue 0 (request 1), WRITE from
// B to DST on queue 1 (request 2).

#[test]
fn r1_passthrough_reports_and_writes_zero_copy() {
    let (mut rig, gm) = Rig::new(held(Policy::Passthrough), NOT_LONG);
    let (mut d0, mut d1) = rig.drivers(&gm);
    let (rd, wr) = start_r1(&mut rig, &mut d0, &mut d1);
    assert_eq!(rig.bounce_in_use(), 0, "copied");
    rig.drain(1);
    d1.expect(&wr, OK, 1);
    d0.expect_pending(&rd);
    // B held the READ's data when the WRITE was submitted.
    assert_eq!(rig.image_at(DST), sector_data(SRC));
    let e = rig.the_conflict();
    assert_r1_event(&e, "passthrough", "passthrough", 2, 1);
    assert!(e.get("stall_us").is_none(), "{e}");
    finish_held_read(&mut rig, &d0, &rd);
    assert_eq!(peek(&gm, B, LEN as usize), sector_data(SRC));
    rig.assert_idle();
}

#[test]
fn r1_bounce_writes_a_private_copy() {
    let (mut rig, gm) = Rig::new(held(Policy::Bounce), NOT_LONG);
    let (mut d0, mut d1) = rig.drivers(&gm);
    let (rd, wr) = start_r1(&mut rig, &mut d0, &mut d1);
    // A bounce buffer is held until the WRITE completes.
    assert_eq!(rig.bounce_in_use(), u64::from(LEN));
    // The copy was taken when the WRITE was admitted: a later change of B
    // (the guest, or more DMA) does not reach the disk.
    fill(&gm, B, &[0x77; LEN as usize]);
    rig.drain(1);
    d1.expect(&wr, OK, 1);
    d0.expect_pending(&rd);
    assert_eq!(rig.image_at(DST), sector_data(SRC));
    assert_r1_event(&rig.the_conflict(), "bounce", "bounce", 2, 1);
    finish_held_read(&mut rig, &d0, &rd);
    rig.assert_idle();
}

#[test]
fn r1_fail_is_ioerr_and_leaves_the_image() {
    let (mut rig, gm) = Rig::new(held(Policy::Fail), NOT_LONG);
    let (mut d0, mut d1) = rig.drivers(&gm);
    let (rd, wr) = start_r1(&mut rig, &mut d0, &mut d1);
    // Completed at once, without waiting for anything.
    d1.expect(&wr, IOERR, 1);
    rig.drain(1);
    assert_eq!(rig.image(), image_bytes(0, IMAGE_SIZE as usize));
    assert_r1_event(&rig.the_conflict(), "fail", "fail", 2, 1);
    finish_held_read(&mut rig, &d0, &rd);
    assert_eq!(peek(&gm, B, LEN as usize), sector_data(SRC));
    assert_eq!(rig.dev.counters().ioerr, 1);
    rig.assert_idle();
}

#[test]
fn r1_stall_waits_for_the_read() {
    let (mut rig, gm) = Rig::new(held(Policy::Stall), NOT_LONG);
    let (mut d0, mut d1) = rig.drivers(&gm);
    let (rd, wr) = start_r1(&mut rig, &mut d0, &mut d1);
    // Parked: no used element on queue 1 while the READ is in flight, however
    // often queue 1 runs; nothing reaches the image.
    rig.poke_for(1, Duration::from_millis(30), || d1.expect_pending(&wr));
    assert_eq!(rig.workers[1].inflight(), 1);
    assert_eq!(rig.image_at(DST), image_bytes(DST * 512, LEN as usize));
    // The stalled WRITE is pinned but not submitted: nobody may wait on it.
    let w = rig
        .dev
        .pins()
        .pinned_by(&[b_range()], Some(Direction::DeviceRead), None);
    assert_eq!(w.len(), 1, "{w:?}");
    assert_eq!((w[0].queue, w[0].id, w[0].submitted), (1, 2, false));
    // The READ completes (its unpin wakes queue 1, which watches it), then
    // the WRITE goes.
    let gen = rig.dev.pins().release_generation();
    rig.drain(0);
    assert!(
        rig.dev.pins().release_generation() > gen,
        "watched pin released"
    );
    d0.expect(&rd, OK, LEN + 1);
    d1.expect_pending(&wr);
    rig.poke_until(1, "stalled WRITE completing", || d1.done(&wr));
    rig.drain(1);
    d1.expect(&wr, OK, 1);
    assert_eq!(rig.image_at(DST), sector_data(SRC));
    let e = rig.the_conflict();
    assert_r1_event(&e, "stall", "stall", 2, 1);
    let stall_us = e["stall_us"].as_u64().expect("stall_us");
    assert!(stall_us >= 30_000, "{e}");
    rig.assert_idle();
}

#[test]
fn r1_stall_timeout_bounces() {
    let policy = PolicyConfig {
        stall_timeout: Duration::from_millis(20),
        read_delay: Some(Duration::from_millis(1500)),
        ..settings(Policy::Stall)
    };
    let (mut rig, gm) = Rig::new(policy, NOT_LONG);
    let (mut d0, mut d1) = rig.drivers(&gm);
    let rd = start_held_read(&mut rig, &mut d0);
    let t = Instant::now();
    let wr = d1.write_from(DST, B);
    rig.kick(1);
    // Only queue 1 runs (its 1 ms retry timer): the READ stays in flight.
    rig.poke_until(1, "WRITE after the stall timeout", || d1.done(&wr));
    assert!(t.elapsed() >= Duration::from_millis(20));
    d1.expect(&wr, OK, 1);
    d0.expect_pending(&rd);
    assert!(!rig
        .dev
        .pins()
        .pinned_by(&[b_range()], None, None)
        .is_empty());
    assert_eq!(rig.image_at(DST), sector_data(SRC));
    let e = rig.the_conflict();
    assert_r1_event(&e, "stall", "stall_timeout_bounce", 2, 1);
    let stall_us = e["stall_us"].as_u64().expect("stall_us");
    assert!((20_000..1_500_000).contains(&stall_us), "{e}");
    rig.drain(1);
    finish_held_read(&mut rig, &d0, &rd);
    rig.assert_idle();
}

#[test]
fn long_term_pin_is_never_waited_on() {
    let (mut rig, gm) = Rig::new(held(Policy::Stall), Duration::from_millis(10));
    let (mut d0, mut d1) = rig.drivers(&gm);
    let rd = start_held_read(&mut rig, &mut d0);
    std::thread::sleep(Duration::from_millis(20));
    let wr = d1.write_from(DST, B);
    rig.kick(1);
    // Bounced at once (no stall): done while the READ is still held.
    assert_eq!(rig.bounce_in_use(), u64::from(LEN));
    fill(&gm, B, &[0x77; LEN as usize]);
    rig.poke_until(1, "WRITE next to a long-term pin", || d1.done(&wr));
    d1.expect(&wr, OK, 1);
    d0.expect_pending(&rd);
    assert_eq!(rig.image_at(DST), sector_data(SRC));
    let e = rig.the_conflict();
    assert_eq!(e["rule"], "long_term", "{e}");
    assert_eq!(e["policy"], "stall", "{e}");
    assert_eq!(e["action"], "bounce", "{e}");
    assert_eq!(e["overlapping"], serde_json::json!([1]), "{e}");
    assert!(e["pin_age_us"].as_u64().unwrap() >= 20_000, "{e}");
    assert!(e.get("stall_us").is_none(), "{e}");
    let detail = e["detail"].as_str().expect("detail");
    assert!(detail.contains("long-term"), "{e}");
    rig.drain(1);
    finish_held_read(&mut rig, &d0, &rd);
    assert!(rig.dev.pins().counters().longterm_pins >= 1);
    rig.assert_idle();
}

// ---------------------------------------------------------------- R2

/// Simulates a WRITE from B in flight on queue 0 (request 999, submitted).
fn simulated_write(rig: &Rig) -> PinHandle {
    let h = rig
        .dev
        .pins()
        .pin(0, 999, Direction::DeviceRead, &[b_range()]);
    rig.dev.pins().mark_submitted(&h);
    h
}

/// The R2 setup: B filled with `FILL`, a simulated WRITE from B on queue 0,
/// then READ 1 of `SRC` into B on queue 1, kicked. Returns (the simulated
/// WRITE's pin, the READ).
fn start_r2(rig: &mut Rig, d1: &mut Driver<'_>) -> (PinHandle, Io) {
    fill(d1.mem, B, &[FILL; LEN as usize]);
    let h = simulated_write(rig);
    let rd = d1.read_into(SRC, B);
    rig.kick(1);
    (h, rd)
}

/// The R2 end where `policy` is also the action: the one event, then the
/// simulated WRITE is unpinned and nothing is left.
fn finish_r2(rig: &Rig, h: PinHandle, policy: &str) {
    assert_r2_event(&rig.the_conflict(), policy, policy);
    rig.dev.pins().unpin(h);
    rig.assert_idle();
}

/// The fields every R2 event has: READ request 1 on queue 1 into B from SRC
/// against the simulated WRITE 999.
fn assert_r2_event(e: &Value, policy: &str, action: &str) {
    assert_b_event(
        e,
        &[
            ("rule", "R2".into()),
            ("policy", policy.into()),
            ("action", action.into()),
            ("op", "read".into()),
            ("queue", 1.into()),
            ("request_id", 1.into()),
            ("sector", SRC.into()),
            ("pin_direction", "DeviceRead".into()),
            ("overlapping", serde_json::json!([999])),
        ],
    );
}

#[test]
fn r2_passthrough_reports_and_reads_zero_copy() {
    let (mut rig, gm) = Rig::new(settings(Policy::Passthrough), NOT_LONG);
    let (_d0, mut d1) = rig.drivers(&gm);
    let (h, rd) = start_r2(&mut rig, &mut d1);
    rig.drain(1);
    d1.expect(&rd, OK, LEN + 1);
    assert_eq!(peek(&gm, B, LEN as usize), sector_data(SRC));
    finish_r2(&rig, h, "passthrough");
}

#[test]
fn r2_bounce_lands_in_a_private_buffer() {
    let (mut rig, gm) = Rig::new(held(Policy::Bounce), NOT_LONG);
    let (_d0, mut d1) = rig.drivers(&gm);
    let (h, rd) = start_r2(&mut rig, &mut d1);
    assert_eq!(rig.bounce_in_use(), u64::from(LEN));
    // The READ's I/O is done long before its held completion, yet the
    // simulated WRITE's source B is untouched: the data is in a private buffer.
    rig.poke_for(1, Duration::from_millis(50), || {
        d1.expect_pending(&rd);
        assert_eq!(peek(&gm, B, LEN as usize), [FILL; LEN as usize]);
    });
    // At completion the guest gets the data.
    rig.drain(1);
    d1.expect(&rd, OK, LEN + 1);
    assert_eq!(peek(&gm, B, LEN as usize), sector_data(SRC));
    finish_r2(&rig, h, "bounce");
}

/// A bounced READ that completes while the WRITE it conflicts with is still
/// under DMA must not copy into that WRITE's source yet (that would tear
/// it): it completes when the WRITE is unpinned.
#[test]
fn r2_bounce_copies_out_only_after_the_write_is_unpinned() {
    let (mut rig, gm) = Rig::new(settings(Policy::Bounce), NOT_LONG);
    let (_d0, mut d1) = rig.drivers(&gm);
    let (h, rd) = start_r2(&mut rig, &mut d1);
    rig.poke_for(1, Duration::from_millis(30), || {
        d1.expect_pending(&rd);
        assert_eq!(peek(&gm, B, LEN as usize), [FILL; LEN as usize]);
    });
    assert_r2_event(&rig.the_conflict(), "bounce", "bounce");
    rig.dev.pins().unpin(h);
    rig.poke_until(1, "READ copied out after the unpin", || d1.done(&rd));
    d1.expect(&rd, OK, LEN + 1);
    assert_eq!(peek(&gm, B, LEN as usize), sector_data(SRC));
    rig.assert_idle();
}

#[test]
fn r2_fail_is_ioerr_and_leaves_the_buffer() {
    let (mut rig, gm) = Rig::new(settings(Policy::Fail), NOT_LONG);
    let (_d0, mut d1) = rig.drivers(&gm);
    let (h, rd) = start_r2(&mut rig, &mut d1);
    d1.expect(&rd, IOERR, 1);
    rig.drain(1);
    assert_eq!(peek(&gm, B, LEN as usize), [FILL; LEN as usize]);
    finish_r2(&rig, h, "fail");
}

#[test]
fn r2_stall_waits_for_the_unpin() {
    let (mut rig, gm) = Rig::new(settings(Policy::Stall), NOT_LONG);
    let (_d0, mut d1) = rig.drivers(&gm);
    let (h, rd) = start_r2(&mut rig, &mut d1);
    rig.poke_for(1, Duration::from_millis(30), || {
        d1.expect_pending(&rd);
        assert_eq!(peek(&gm, B, LEN as usize), [FILL; LEN as usize]);
    });
    assert!(rig.conflicts().is_empty(), "event before the stall ended");
    rig.dev.pins().unpin(h);
    rig.poke_until(1, "stalled READ completing", || d1.done(&rd));
    d1.expect(&rd, OK, LEN + 1);
    assert_eq!(peek(&gm, B, LEN as usize), sector_data(SRC));
    let e = rig.the_conflict();
    assert_r2_event(&e, "stall", "stall");
    assert!(e["stall_us"].as_u64().expect("stall_us") >= 30_000, "{e}");
    rig.drain(1);
    rig.assert_idle();
}

// ---------------------------------------------------- deadlock freedom

#[test]
fn stall_never_waits_on_an_unsubmitted_pin() {
    let (mut rig, gm) = Rig::new(settings(Policy::Stall), NOT_LONG);
    let (_d0, mut d1) = rig.drivers(&gm);
    let data = pattern(3, LEN as usize);
    fill(&gm, B, &data);
    // A READ into B on queue 0, pinned but itself still waiting (not submitted).
    let h = rig
        .dev
        .pins()
        .pin(0, 999, Direction::DeviceWrite, &[b_range()]);
    let wr = d1.write_from(DST, B);
    rig.kick(1);
    assert_eq!(rig.bounce_in_use(), u64::from(LEN));
    fill(&gm, B, &[0x77; LEN as usize]);
    rig.poke_until(1, "WRITE next to a waiting READ", || d1.done(&wr));
    d1.expect(&wr, OK, 1);
    assert_eq!(rig.image_at(DST), data);
    let e = rig.the_conflict();
    assert_eq!(e["rule"], "R1", "{e}");
    assert_eq!(e["action"], "bounce", "{e}");
    assert_eq!(e["overlapping"], serde_json::json!([999]), "{e}");
    assert!(e.get("stall_us").is_none(), "{e}");
    let detail = e["detail"].as_str().expect("detail");
    assert!(detail.contains("itself waiting"), "{e}");
    rig.dev.pins().unpin(h);
    rig.drain(1);
    rig.assert_idle();
}

/// A,B / B,A: a WRITE on queue 1 stalls on a READ of queue 0; a second READ
/// into the same buffer on queue 0 conflicts with that stalled WRITE (R2). It
/// must not wait on it (the WRITE is not submitted), or the two could wait on
/// each other: it bounces, and everything completes.
#[test]
fn stalled_request_is_never_waited_on() {
    let (mut rig, gm) = Rig::new(held(Policy::Stall), NOT_LONG);
    let (mut d0, mut d1) = rig.drivers(&gm);
    let (rd1, wr) = start_r1(&mut rig, &mut d0, &mut d1);
    rig.poke_for(1, Duration::from_millis(5), || d1.expect_pending(&wr));
    // Who pins B: the READ (submitted) and the stalled WRITE (not submitted).
    let mut by = rig.dev.pins().pinned_by(&[b_range()], None, None);
    by.sort_by_key(|p| p.queue);
    assert_eq!(by.len(), 2, "{by:?}");
    assert_eq!((by[0].queue, by[0].id, by[0].submitted), (0, 1, true));
    assert_eq!((by[1].queue, by[1].id, by[1].submitted), (1, 2, false));
    assert_eq!(by[1].direction, Direction::DeviceRead);

    let rd2 = d0.read_into(SRC2, B);
    rig.kick(0);
    // READ 3 was not parked: it bounced, and only the delay holds it.
    let c = rig.conflicts();
    assert_eq!(c.len(), 1, "{c:?}");
    let e = &c[0];
    assert_eq!(e["rule"], "R2", "{e}");
    assert_eq!(e["request_id"], 3, "{e}");
    assert_eq!(e["queue"], 0, "{e}");
    assert_eq!(e["action"], "bounce", "{e}");
    assert_eq!(e["overlapping"], serde_json::json!([2]), "{e}");
    assert!(
        e["detail"].as_str().unwrap().contains("itself waiting"),
        "{e}"
    );

    rig.drain(0);
    d0.expect(&rd1, OK, LEN + 1);
    d0.expect(&rd2, OK, LEN + 1);
    // READ 3 was copied to the guest at its completion, after READ 1 landed.
    assert_eq!(peek(&gm, B, LEN as usize), sector_data(SRC2));
    rig.poke_until(1, "stalled WRITE completing", || d1.done(&wr));
    rig.drain(1);
    d1.expect(&wr, OK, 1);
    assert_eq!(rig.image_at(DST), sector_data(SRC2));
    let c = rig.conflicts();
    assert_eq!(c.len(), 2, "{c:?}");
    assert_r1_event(&c[1], "stall", "stall", 2, 1);
    rig.assert_idle();
}

// ---------------------------------------------------------- bounce pool

#[test]
fn bounce_always_copies_every_write() {
    let policy = PolicyConfig {
        bounce_always: true,
        ..settings(Policy::Passthrough)
    };
    let (mut rig, gm) = Rig::new(policy, NOT_LONG);
    let (mut d0, mut d1) = rig.drivers(&gm);
    let (a, b) = (pattern(1, LEN as usize), pattern(2, LEN as usize));
    fill(&gm, W0, &a);
    fill(&gm, W1, &b);
    let wa = d0.write_from(DST, W0);
    let wb = d1.write_from(DST2, W1);
    rig.kick(0);
    rig.kick(1);
    assert_eq!(rig.bounce_in_use(), 2 * u64::from(LEN));
    // Both were copied at admission: scribbling now changes nothing on disk.
    fill(&gm, W0, &[0x77; LEN as usize]);
    fill(&gm, W1, &[0x77; LEN as usize]);
    rig.drain(0);
    rig.drain(1);
    d0.expect(&wa, OK, 1);
    d1.expect(&wb, OK, 1);
    assert_eq!(rig.image_at(DST), a);
    assert_eq!(rig.image_at(DST2), b);
    assert!(rig.conflicts().is_empty());
    rig.assert_idle();
}

#[test]
fn bounce_pool_exhausted_waits_for_memory() {
    let policy = PolicyConfig {
        bounce_always: true,
        bounce_pool_bytes: u64::from(LEN),
        ..settings(Policy::Bounce)
    };
    let (mut rig, gm) = Rig::new(policy, NOT_LONG);
    let (mut d0, mut d1) = rig.drivers(&gm);
    let (a, b) = (pattern(1, LEN as usize), pattern(2, LEN as usize));
    fill(&gm, W0, &a);
    fill(&gm, W1, &b);
    let wa = d0.write_from(DST, W0);
    rig.kick(0);
    // The first fills the pool.
    assert_eq!(rig.bounce_in_use(), u64::from(LEN));
    fill(&gm, W0, &[0x77; LEN as usize]);
    let wb = d1.write_from(DST2, W1);
    rig.kick(1);
    // The second waits for memory while the first holds the pool.
    rig.poke_for(1, Duration::from_millis(20), || d1.expect_pending(&wb));
    assert_eq!(rig.bounce_in_use(), u64::from(LEN));
    rig.poke_until(0, "first bounced WRITE", || d0.done(&wa));
    d0.expect(&wa, OK, 1);
    assert_eq!(rig.bounce_in_use(), 0);
    rig.poke_until(1, "second bounced WRITE", || d1.done(&wb));
    d1.expect(&wb, OK, 1);
    assert_eq!(rig.image_at(DST), a);
    assert_eq!(rig.image_at(DST2), b);
    assert!(rig.conflicts().is_empty());
    rig.drain(0);
    rig.drain(1);
    rig.assert_idle();
}

#[test]
fn a_request_over_the_bounce_caps_fails_without_taking_memory() {
    // Issue 13 finding 8 / item 4: no "an empty pool serves one request,
    // however large" any more: over the per-device or per-queue cap is IOERR.
    for (pool, queue) in [
        (u64::from(LEN) - 4096, 64 << 20),
        (64 << 20, u64::from(LEN) / 2),
    ] {
        let policy = PolicyConfig {
            bounce_always: true,
            bounce_pool_bytes: pool,
            bounce_queue_bytes: queue,
            ..settings(Policy::Bounce)
        };
        let (mut rig, gm) = Rig::new(policy, NOT_LONG);
        let (mut d0, _d1) = rig.drivers(&gm);
        fill(&gm, W0, &pattern(1, LEN as usize));
        let before = rig.image_at(DST);
        let wa = d0.write_from(DST, W0);
        rig.kick(0);
        assert_eq!(rig.bounce_in_use(), 0, "pool {pool} queue {queue}");
        rig.drain(0);
        d0.expect(&wa, IOERR, 1);
        assert_eq!(rig.image_at(DST), before);
        assert_eq!(
            rig.dev.queue_counters()[0]
                .bounce_bytes
                .load(Ordering::Relaxed),
            0
        );
        rig.assert_idle();
    }
}

#[test]
fn a_queue_waits_at_its_own_cap_while_the_pool_has_room() {
    let policy = PolicyConfig {
        bounce_always: true,
        bounce_queue_bytes: u64::from(LEN),
        ..settings(Policy::Bounce)
    };
    let (mut rig, gm) = Rig::new(policy, NOT_LONG);
    let (mut d0, mut d1) = rig.drivers(&gm);
    let (a, b) = (pattern(1, LEN as usize), pattern(2, LEN as usize));
    fill(&gm, W0, &a);
    fill(&gm, W1, &b);
    let wa = d0.write_from(DST, W0);
    let wb = d0.write_from(DST2, W1);
    rig.kick(0);
    // Queue 0 holds its cap; its second WRITE waits, queue 1 is not held up.
    assert_eq!(rig.bounce_in_use(), u64::from(LEN));
    d0.expect_pending(&wb);
    let wc = d1.write_from(DST + 2 * u64::from(LEN) / 512, W1);
    rig.kick(1);
    rig.drain(1);
    d1.expect(&wc, OK, 1);
    rig.drain(0);
    d0.expect(&wa, OK, 1);
    d0.expect(&wb, OK, 1);
    assert_eq!(rig.image_at(DST), a);
    assert_eq!(rig.image_at(DST2), b);
    rig.assert_idle();
}

// ------------------------------------------------------- not conflicts

const POLICIES: [Policy; 4] = [
    Policy::Passthrough,
    Policy::Bounce,
    Policy::Stall,
    Policy::Fail,
];

#[test]
fn write_write_from_one_buffer_is_not_a_conflict() {
    for policy in POLICIES {
        let (mut rig, gm) = Rig::new(settings(policy), NOT_LONG);
        let (mut d0, mut d1) = rig.drivers(&gm);
        let data = pattern(5, LEN as usize);
        fill(&gm, B, &data);
        let w0 = d0.write_from(DST, B);
        rig.kick(0);
        // Not reaped: the first WRITE still pins B.
        let by = rig.dev.pins().pinned_by(&[b_range()], None, None);
        assert_eq!(by.len(), 1, "{policy:?}: {by:?}");
        assert_eq!(by[0].direction, Direction::DeviceRead);
        let w1 = d1.write_from(DST2, B);
        rig.kick(1);
        rig.drain(1);
        rig.drain(0);
        d0.expect(&w0, OK, 1);
        d1.expect(&w1, OK, 1);
        assert_eq!(rig.image_at(DST), data, "{policy:?}");
        assert_eq!(rig.image_at(DST2), data, "{policy:?}");
        assert!(rig.conflicts().is_empty(), "{policy:?}");
        rig.assert_idle();
    }
}

#[test]
fn read_read_into_one_buffer_is_not_a_conflict() {
    for policy in POLICIES {
        let (mut rig, gm) = Rig::new(held(policy), NOT_LONG);
        let (mut d0, mut d1) = rig.drivers(&gm);
        let r0 = start_held_read(&mut rig, &mut d0);
        let r1 = d1.read_into(SRC, B);
        rig.kick(1);
        rig.drain(1);
        d1.expect(&r1, OK, LEN + 1);
        d0.expect_pending(&r0);
        rig.drain(0);
        d0.expect(&r0, OK, LEN + 1);
        assert_eq!(peek(&gm, B, LEN as usize), sector_data(SRC), "{policy:?}");
        assert!(rig.conflicts().is_empty(), "{policy:?}");
        assert_eq!(rig.dev.counters().ioerr, 0);
        rig.assert_idle();
    }
}
