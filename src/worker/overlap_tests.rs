//! Overlapping requests on two queues with checksums on, completed by the
//! fake storage engine in every order it allows (docs/DESIGN.md §7): the
//! range locks must make every order one of the legal ones, never a
//! checksum failure, and leave the store agreeing with the image.
//!
//! The scenario mixes full-block and partial-block (512-byte) WRITEs and
//! READs on the same LBAs, and requests elsewhere that may complete in any
//! order relative to them. Every choice of "which held storage operation
//! completes next" is explored (depth-first, each path replayed from a fresh
//! image). With the range locks off (`range_tracking: false`) some orders do
//! report checksum failures: the control that shows the test can fail.

use std::path::PathBuf;
use std::sync::Arc;

use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};

use super::test_util::{
    device_with, guest_memory, image_bytes, image_file, pattern, r, report_lines, vring, w, Driver,
    Io, IMAGE_SIZE, OK,
};
use super::{GuestMem, QueueWorker, Vring};
use crate::device::{Device, DeviceParts};
use crate::integrity::{ChecksumStore, StoreOptions};
use crate::report::ReportWriter;
use crate::storage::{Engine, FakeHandle, Tag};

const RINGS: [u64; 2] = [0x0, 0x1_0000];
const BUFS: [u64; 2] = [0x10_0000, 0x40_0000];
const BUFS_LEN: u64 = 0x30_0000;

/// One request of the scenario: queue, READ or WRITE, sector, length, and
/// for a WRITE the seed of its data.
#[derive(Clone, Copy, Debug)]
struct Req {
    queue: usize,
    write: bool,
    sector: u64,
    len: u32,
    seed: u8,
}

const fn rd(queue: usize, sector: u64, len: u32) -> Req {
    Req {
        queue,
        write: false,
        sector,
        len,
        seed: 0,
    }
}

const fn wr(queue: usize, sector: u64, len: u32, seed: u8) -> Req {
    Req {
        queue,
        write: true,
        sector,
        len,
        seed,
    }
}

/// Queue 0's requests are popped (and take their range tickets) before
/// queue 1's; within a queue in this order.
const SCENARIO: [Req; 8] = [
    wr(0, 0, 8192, 0x11),   // blocks 0-1
    rd(0, 0, 16384),        // blocks 0-3, behind it
    wr(0, 64, 4096, 0x22),  // block 8, elsewhere
    wr(1, 8, 4096, 0x33),   // block 1
    rd(1, 4, 4096),         // halves of blocks 0 and 1
    wr(1, 2, 512, 0x44),    // part of block 0
    rd(1, 64, 4096),        // block 8
    wr(1, 128, 1024, 0x55), // part of block 16, alone
];

struct Rig {
    _dir: tempfile::TempDir,
    image_path: PathBuf,
    report_path: PathBuf,
    dev: Arc<Device>,
    vrings: Vec<Vring>,
    workers: Vec<QueueWorker>,
    fakes: Vec<FakeHandle>,
}

impl Rig {
    fn new(range_tracking: bool) -> (Rig, Arc<GuestMem>) {
        let dir = tempfile::tempdir().unwrap();
        let (image_path, image) = image_file(dir.path(), false);
        let report_path = dir.path().join("report.jsonl");
        let (store, _) = ChecksumStore::open(
            &image_path,
            &StoreOptions {
                image_size: Some(IMAGE_SIZE),
                ..StoreOptions::default()
            },
        )
        .unwrap();
        let dev = Arc::new(device_with(
            image,
            2,
            false,
            "overlap",
            DeviceParts {
                report: ReportWriter::open(Some(&report_path)).unwrap(),
                store: Some(store),
                range_tracking,
                ..DeviceParts::default()
            },
        ));
        let (mem, gm) = guest_memory();
        let (mut vrings, mut workers, mut fakes) = (Vec::new(), Vec::new(), Vec::new());
        for q in 0..2u16 {
            vrings.push(vring(&mem));
            let (engine, fake) = Engine::fake(dev.image().file());
            workers.push(QueueWorker::with_engine(dev.clone(), mem.clone(), q, engine).unwrap());
            fakes.push(fake);
        }
        let rig = Rig {
            _dir: dir,
            image_path,
            report_path,
            dev,
            vrings,
            workers,
            fakes,
        };
        (rig, gm)
    }

    /// Every held storage operation, as (queue, tag).
    fn held(&self) -> Vec<(usize, Tag)> {
        (0..2)
            .flat_map(|q| self.fakes[q].held().into_iter().map(move |t| (q, t)))
            .collect()
    }

    /// Both workers handle their completion eventfd (a completion, or a
    /// range released by the other queue).
    fn poke(&mut self) {
        for q in 0..2 {
            self.workers[q].complete(&self.vrings[q]);
        }
    }
}

/// What one run saw.
struct Run {
    /// How many operations were held at each step (the choices there).
    choices: Vec<usize>,
    checksum_failures: usize,
    /// The store disagrees with the image at the end (a later READ would
    /// report a checksum failure).
    store_mismatch: bool,
    /// `None` if every check passed, else what went wrong.
    wrong: Option<String>,
}

/// Runs the scenario, completing at step i the `path[i]`-th held operation
/// (0 past the end of `path`).
fn run(path: &[usize], range_tracking: bool) -> Run {
    let (mut rig, gm) = Rig::new(range_tracking);
    let mut drivers: Vec<Driver<'_>> = (0..2)
        .map(|q| Driver::new(&gm, &rig.vrings[q], RINGS[q], BUFS[q]..BUFS[q] + BUFS_LEN))
        .collect();
    let ios: Vec<Io> = SCENARIO
        .iter()
        .map(|q| {
            let d = &mut drivers[q.queue];
            if q.write {
                let data = d.buf(&pattern(q.seed, q.len as usize));
                d.request_with(VIRTIO_BLK_T_OUT, q.sector, data, &[r(data, q.len)])
            } else {
                let data = d.buf(&vec![0xee; q.len as usize]);
                d.request_with(VIRTIO_BLK_T_IN, q.sector, data, &[w(data, q.len)])
            }
        })
        .collect();
    for q in 0..2 {
        rig.workers[q].process_queue(&rig.vrings[q]);
    }
    let mut choices = Vec::new();
    loop {
        let held = rig.held();
        if held.is_empty() {
            break;
        }
        let pick = path.get(choices.len()).copied().unwrap_or(0);
        choices.push(held.len());
        let (q, tag) = held[pick.min(held.len() - 1)];
        assert!(rig.fakes[q].complete(tag));
        rig.poke();
    }
    // The model: the range tickets serialize overlapping requests in pop
    // order (queue 0's, then queue 1's).
    let mut model = image_bytes(0, IMAGE_SIZE as usize);
    let mut wrong = Vec::new();
    for (q, io) in SCENARIO.iter().zip(&ios) {
        let d = &drivers[q.queue];
        let (off, len) = (q.sector as usize * 512, q.len as usize);
        if !d.done(io) {
            wrong.push(format!("{q:?} not completed"));
            continue;
        }
        if d.status_of(io) != OK {
            wrong.push(format!("{q:?} status {}", d.status_of(io)));
        }
        if q.write {
            model[off..off + len].copy_from_slice(&pattern(q.seed, len));
        } else if range_tracking && d.bytes(io.data, len) != model[off..off + len] {
            wrong.push(format!("{q:?} read data is not the state at its turn"));
        }
    }
    let image = std::fs::read(&rig.image_path).unwrap();
    if range_tracking && image != model {
        wrong.push("image is not the writes applied in ticket order".into());
    }
    let store = rig.dev.store().unwrap();
    let mismatches = store.verify(0, &[&image]).unwrap();
    let store_mismatch = !mismatches.is_empty();
    if store_mismatch {
        wrong.push(format!("store disagrees with the image: {mismatches:?}"));
    }
    let events = report_lines(&rig.report_path);
    let checksum_failures = events
        .iter()
        .filter(|e| e["kind"] == "checksum_failure")
        .count();
    if let Some(e) = events.iter().find(|e| e["kind"] != "conflict") {
        wrong.push(format!("unexpected event {e}"));
    }
    Run {
        choices,
        checksum_failures,
        store_mismatch,
        wrong: (!wrong.is_empty()).then(|| wrong.join("; ")),
    }
}

/// Explores every completion order depth-first (without range tracking:
/// until the first failing order); returns (orders run, orders with a
/// checksum failure or a store that disagrees with the image, the first
/// wrong outcome).
fn every_order(range_tracking: bool, cap: usize) -> (usize, usize, Option<String>) {
    let mut stack: Vec<Vec<usize>> = vec![Vec::new()];
    let (mut runs, mut failing, mut first_wrong) = (0, 0, None);
    while let Some(path) = stack.pop() {
        let out = run(&path, range_tracking);
        runs += 1;
        failing += usize::from(out.checksum_failures > 0 || out.store_mismatch);
        if first_wrong.is_none() {
            first_wrong = out.wrong.map(|w| format!("order {:?}: {w}", out.choices));
        }
        if runs >= cap || (!range_tracking && failing > 0) {
            break;
        }
        // Branch on every step at or after the end of this path where more
        // than one operation was held (this run took choice 0 there).
        for (i, &n) in out.choices.iter().enumerate().skip(path.len()) {
            for c in 1..n {
                let mut next = out.choices[..i].iter().map(|_| 0).collect::<Vec<_>>();
                next[..path.len()].copy_from_slice(&path);
                next.push(c);
                stack.push(next);
            }
        }
    }
    (runs, failing, first_wrong)
}

#[test]
fn overlapping_requests_complete_legally_in_every_order() {
    let (runs, failing, wrong) = every_order(true, 2000);
    eprintln!("{runs} completion orders explored");
    assert!(runs > 1, "the scenario must allow more than one order");
    assert_eq!(wrong, None, "after {runs} orders");
    assert_eq!(failing, 0);
    assert!(runs < 2000, "every order explored ({runs})");
}

#[test]
fn without_range_locks_some_orders_break_the_checksums() {
    let (runs, failing, _) = every_order(false, 2000);
    assert!(
        failing > 0,
        "{runs} orders, none with a checksum failure or a store that disagrees with the image"
    );
}

/// A DISCARD the file system cannot carry out (EOPNOTSUPP) is a hint that
/// was not taken (virtio 1.2 §5.2.6): it completes OK, the blocks keep their
/// data, and so their checksums; a later READ verifies.
#[test]
fn an_ignored_discard_keeps_the_checksums() {
    let (mut rig, gm) = Rig::new(true);
    let mut d = Driver::new(&gm, &rig.vrings[0], RINGS[0], BUFS[0]..BUFS[0] + BUFS_LEN);
    let mut seg = Vec::new();
    seg.extend_from_slice(&24u64.to_le_bytes()); // sector 24 = block 3
    seg.extend_from_slice(&8u32.to_le_bytes());
    seg.extend_from_slice(&0u32.to_le_bytes());
    let data = d.buf(&seg);
    let discard = d.request_with(
        virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_T_DISCARD,
        0,
        data,
        &[r(data, 16)],
    );
    rig.workers[0].process_queue(&rig.vrings[0]);
    let held = rig.fakes[0].held();
    assert_eq!(held.len(), 1, "{held:?}");
    assert!(rig.fakes[0].fail(held[0], -libc::EOPNOTSUPP));
    rig.poke();
    d.expect(&discard, OK, 1);
    let buf = d.buf(&[0xee; 4096]);
    let read = d.request_with(VIRTIO_BLK_T_IN, 24, buf, &[w(buf, 4096)]);
    rig.workers[0].process_queue(&rig.vrings[0]);
    rig.fakes[0].complete_all();
    rig.poke();
    d.expect(&read, OK, 4097);
    assert_eq!(d.bytes(buf, 4096), image_bytes(24 * 512, 4096));
    let image = std::fs::read(&rig.image_path).unwrap();
    let store = rig.dev.store().unwrap();
    assert_eq!(store.verify(0, &[&image]).unwrap(), vec![]);
    let failures = report_lines(&rig.report_path)
        .into_iter()
        .filter(|e| e["kind"] == "checksum_failure")
        .count();
    assert_eq!(failures, 0);
}

/// FLUSH with checksums on syncs the image and the checksum store as two
/// storage operations of the engine, side by side: no fdatasync runs on the
/// queue's thread, and the FLUSH completes only when both did.
#[test]
fn flush_syncs_image_and_store_through_the_engine() {
    let (mut rig, gm) = Rig::new(true);
    let mut d = Driver::new(&gm, &rig.vrings[0], RINGS[0], BUFS[0]..BUFS[0] + BUFS_LEN);
    let flush = d.request_with(
        virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_T_FLUSH,
        0,
        0,
        &[],
    );
    rig.workers[0].process_queue(&rig.vrings[0]);
    let held = rig.fakes[0].held();
    assert_eq!(held.len(), 2, "image and store fdatasync: {held:?}");
    assert!(rig.fakes[0].complete(held[0]));
    rig.poke();
    d.expect_pending(&flush);
    assert!(rig.fakes[0].complete(held[1]));
    rig.poke();
    d.expect(&flush, OK, 1);
}
