//! Data-path tests on the fake storage engine: storage operations complete
//! when the test says so, in any order, so orders that real io_uring on
//! tmpfs almost never shows (a later request completing first, a READ and an
//! overlapping WRITE finishing either way round) are reproduced exactly.

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};

use super::test_util::{image_bytes, pattern, r, w, Driver, FakeRig, Io, OK};
use super::GuestMem;
use crate::guest::GuestRange;
use crate::storage::{FakeHandle, Tag};

const BUF_START: u64 = 0x10_0000;
const BUF_END: u64 = 0x80_0000;
const LEN: u32 = 4096;

type Rig = FakeRig;

impl FakeRig {
    fn driver<'a>(&self, gm: &'a GuestMem) -> Driver<'a> {
        Driver::new(gm, &self.vring, 0, BUF_START..BUF_END)
    }

    fn kick(&mut self) {
        self.worker.process_queue(&self.vring);
    }

    fn image_at(&self, sector: u64, len: usize) -> Vec<u8> {
        let img = std::fs::read(&self.path).unwrap();
        img[sector as usize * 512..][..len].to_vec()
    }
}

fn read(d: &mut Driver<'_>, sector: u64) -> Io {
    let data = d.buf(&[0xee; LEN as usize]);
    d.request_with(VIRTIO_BLK_T_IN, sector, data, &[w(data, LEN)])
}

fn write(d: &mut Driver<'_>, sector: u64, bytes: &[u8]) -> Io {
    let data = d.buf(bytes);
    d.request_with(
        VIRTIO_BLK_T_OUT,
        sector,
        data,
        &[r(data, bytes.len() as u32)],
    )
}

/// The slots of the held operations, in submission order.
fn held_slots(fake: &FakeHandle) -> Vec<u32> {
    fake.held()
        .into_iter()
        .map(|t| match t {
            Tag::Job { slot, .. } => slot,
            other => panic!("unexpected held operation {other:?}"),
        })
        .collect()
}

#[test]
fn requests_complete_in_the_order_storage_finishes_them() {
    let (mut rig, gm) = Rig::new("fake");
    let mut d = rig.driver(&gm);
    let a = read(&mut d, 0);
    let b = read(&mut d, 8);
    let c = d.request_with(VIRTIO_BLK_T_FLUSH, 0, 0, &[]);
    rig.kick();
    let slots = held_slots(&rig.fake);
    assert_eq!(slots.len(), 3, "one storage operation per request");
    assert_eq!(rig.worker.inflight(), 3);
    for io in [&a, &b, &c] {
        d.expect_pending(io);
    }

    // The second READ finishes first: only its used element is pushed.
    rig.complete_slot(slots[1]);
    d.expect(&b, OK, LEN + 1);
    assert_eq!(
        d.bytes(b.data, LEN as usize),
        image_bytes(8 * 512, LEN as usize)
    );
    d.expect_pending(&a);
    d.expect_pending(&c);

    rig.complete_slot(slots[2]);
    d.expect(&c, OK, 1);
    d.expect_pending(&a);

    rig.complete_slot(slots[0]);
    d.expect(&a, OK, LEN + 1);
    assert_eq!(d.bytes(a.data, LEN as usize), image_bytes(0, LEN as usize));
    assert_eq!(rig.worker.inflight(), 0);
    assert_eq!(rig.dev.counters().requests, 3);
}

#[test]
fn a_request_stays_pinned_until_storage_completes_it() {
    let (mut rig, gm) = Rig::new("fake");
    let mut d = rig.driver(&gm);
    let a = read(&mut d, 0);
    let range = [GuestRange {
        addr: a.data,
        len: LEN,
    }];
    rig.kick();
    assert!(
        rig.dev.pins().maybe_pinned(&range, None),
        "pinned while in flight"
    );
    let c = rig.dev.pins().counters();
    assert!(c.pins_acquired > c.pins_released, "{c:?}");

    // Completions the worker has not reaped yet change nothing.
    rig.fake.complete_all();
    assert!(rig.dev.pins().maybe_pinned(&range, None));
    d.expect_pending(&a);

    rig.worker.complete(&rig.vring);
    d.expect(&a, OK, LEN + 1);
    assert!(
        !rig.dev.pins().maybe_pinned(&range, None),
        "unpinned when done"
    );
    let c = rig.dev.pins().counters();
    assert_eq!(c.pins_acquired, c.pins_released, "{c:?}");
}

/// Two requests on the same LBA in flight (legal for a guest: virtio-blk
/// leaves their order to the device). Whichever storage finishes first is
/// the order the guest sees; both orders are reproduced here.
#[test]
fn overlapping_read_and_write_finish_in_either_order() {
    let (mut rig, gm) = Rig::new("fake");
    let mut d = rig.driver(&gm);
    let old = image_bytes(16 * 512, LEN as usize);

    // READ finishes before the WRITE: it returns the old data.
    let new1 = pattern(0x31, LEN as usize);
    let wr = write(&mut d, 16, &new1);
    let rd = read(&mut d, 16);
    rig.kick();
    let slots = held_slots(&rig.fake);
    rig.complete_slot(slots[1]);
    d.expect(&rd, OK, LEN + 1);
    assert_eq!(d.bytes(rd.data, LEN as usize), old);
    rig.complete_slot(slots[0]);
    d.expect(&wr, OK, 1);
    assert_eq!(rig.image_at(16, LEN as usize), new1);

    // WRITE finishes before the READ: it returns the new data.
    let new2 = pattern(0x52, LEN as usize);
    let wr = write(&mut d, 16, &new2);
    let rd = read(&mut d, 16);
    rig.kick();
    let slots = held_slots(&rig.fake);
    rig.complete_slot(slots[0]);
    d.expect(&wr, OK, 1);
    d.expect_pending(&rd);
    rig.complete_slot(slots[1]);
    d.expect(&rd, OK, LEN + 1);
    assert_eq!(d.bytes(rd.data, LEN as usize), new2);
}

#[test]
fn drain_completes_what_storage_still_holds() {
    let (mut rig, gm) = Rig::new("fake");
    let mut d = rig.driver(&gm);
    let ios: Vec<Io> = (0..4)
        .map(|i| write(&mut d, i * 8, &pattern(i as u8, LEN as usize)))
        .collect();
    rig.kick();
    assert_eq!(rig.fake.held().len(), 4);
    rig.worker.drain();
    assert_eq!(rig.worker.inflight(), 0);
    for (i, io) in ios.iter().enumerate() {
        d.expect(io, OK, 1);
        assert_eq!(
            rig.image_at(i as u64 * 8, LEN as usize),
            pattern(i as u8, LEN as usize)
        );
    }
}

/// A ring stop whose deadline passes while storage still holds requests
/// (docs/DESIGN.md §8, "Stopping a ring"): `stop` fails within its bound;
/// when storage completes them later they are finished without a status
/// byte or a used element (the WRITE's data still reaches the image), and
/// nothing more is popped.
#[test]
fn ring_stop_past_its_deadline_abandons_what_storage_holds() {
    let (mut rig, gm) = Rig::new("fake");
    let mut d = rig.driver(&gm);
    let a = read(&mut d, 0);
    let b = write(&mut d, 8, &pattern(1, LEN as usize));
    rig.kick();
    assert_eq!(rig.fake.held().len(), 2);
    let t = std::time::Instant::now();
    let e = rig
        .worker
        .stop(std::time::Duration::from_millis(50))
        .unwrap_err();
    assert!(t.elapsed() < std::time::Duration::from_secs(2));
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
    for slot in held_slots(&rig.fake) {
        rig.complete_slot(slot);
    }
    assert_eq!(rig.worker.inflight(), 0);
    d.expect_pending(&a);
    d.expect_pending(&b);
    assert_eq!(rig.image_at(8, LEN as usize), pattern(1, LEN as usize));
    let c = read(&mut d, 16);
    rig.kick();
    assert!(
        rig.fake.held().is_empty(),
        "popped after the ring was abandoned"
    );
    d.expect_pending(&c);
}

/// A ring stop while storage completes within the bound: `stop` returns
/// only once every popped request is in the used ring.
#[test]
fn ring_stop_waits_for_storage_within_its_deadline() {
    let (mut rig, gm) = Rig::new("fake");
    let mut d = rig.driver(&gm);
    let ios = [read(&mut d, 0), read(&mut d, 8)];
    rig.kick();
    let fake = rig.fake.clone();
    let storage = std::thread::spawn(move || {
        for tag in fake.held() {
            std::thread::sleep(std::time::Duration::from_millis(30));
            fake.complete(tag);
        }
    });
    rig.worker
        .stop(std::time::Duration::from_secs(10))
        .expect("storage completed within the bound");
    storage.join().unwrap();
    assert_eq!(rig.worker.inflight(), 0);
    for io in &ios {
        d.expect(io, OK, LEN + 1);
    }
}
