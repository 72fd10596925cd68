//! Busy-polling before epoll (poll.rs): bounded, off with a zero budget,
//! pops and completes without a kick or a completion wake-up, and the
//! budget adapts. Timing bounds are generous (the machine may be loaded).

use std::time::{Duration, Instant};

use vhost_user_backend::VringT;
use virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_T_IN;

use super::poll::POLL_MIN;
use super::test_util::{w, Driver, FakeRig, Io, OK};
use super::GuestMem;
use crate::storage::Tag;

const BUF_START: u64 = 0x10_0000;
const BUF_END: u64 = 0x80_0000;
const LEN: u32 = 4096;

fn rig() -> (FakeRig, std::sync::Arc<GuestMem>) {
    let (rig, gm) = FakeRig::new("poll");
    assert_eq!(
        rig.worker.poller.max,
        crate::device::DEFAULT_POLL_MAX,
        "the device's poll maximum reaches the worker"
    );
    (rig, gm)
}

fn read(d: &mut Driver<'_>, sector: u64) -> Io {
    let data = d.buf(&[0xee; LEN as usize]);
    d.request_with(VIRTIO_BLK_T_IN, sector, data, &[w(data, LEN)])
}

#[test]
fn poll_with_nothing_to_do_returns_within_the_cap() {
    let (mut rig, gm) = rig();
    let _d = Driver::new(&gm, &rig.vring, 0, BUF_START..BUF_END);
    rig.worker.poller.budget = rig.worker.poller.max;
    let t = Instant::now();
    rig.worker.poll(&rig.vring);
    assert!(t.elapsed() < Duration::from_millis(50), "{:?}", t.elapsed());
}

#[test]
fn poll_with_a_zero_budget_returns_at_once() {
    let (mut rig, gm) = rig();
    let _d = Driver::new(&gm, &rig.vring, 0, BUF_START..BUF_END);
    assert_eq!(
        rig.worker.poll_budget(),
        Duration::ZERO,
        "the budget starts at 0"
    );
    // Even with a long maximum, a zero budget does not spin.
    rig.worker.poller.max = Duration::from_secs(10);
    let t = Instant::now();
    rig.worker.poll(&rig.vring);
    assert!(t.elapsed() < Duration::from_millis(50), "{:?}", t.elapsed());
}

#[test]
fn poll_does_not_run_on_a_ring_that_is_not_ready() {
    let (mut rig, gm) = rig();
    let mut d = Driver::new(&gm, &rig.vring, 0, BUF_START..BUF_END);
    let io = read(&mut d, 0);
    rig.vring.set_queue_ready(false);
    rig.worker.poller.max = Duration::from_secs(10);
    rig.worker.poller.budget = Duration::from_secs(10);
    let t = Instant::now();
    rig.worker.poll(&rig.vring);
    assert!(t.elapsed() < Duration::from_millis(50), "{:?}", t.elapsed());
    assert_eq!(rig.worker.inflight(), 0, "nothing popped");
    d.expect_pending(&io);
}

#[test]
fn poll_pops_and_completes_without_a_kick() {
    let (mut rig, gm) = rig();
    let mut d = Driver::new(&gm, &rig.vring, 0, BUF_START..BUF_END);
    rig.worker.poller.budget = rig.worker.poller.max;
    // Made available before the poll, no kick: the poll pops it.
    let io = read(&mut d, 8);
    rig.worker.poll(&rig.vring);
    assert_eq!(rig.worker.inflight(), 1, "popped by the poll");
    d.expect_pending(&io);
    // Storage finishes, nobody reads the completion eventfd: the poll reaps it.
    assert!(rig.fake.complete(Tag::Job { slot: 0, op: 0 }));
    rig.worker.poll(&rig.vring);
    assert_eq!(rig.worker.inflight(), 0);
    d.expect(&io, OK, LEN + 1);
    assert_eq!(d.used().len(), 1);
}

#[test]
fn the_budget_grows_after_a_wake_up_with_work_and_shrinks_after_idle_polls() {
    let (mut rig, gm) = rig();
    let mut d = Driver::new(&gm, &rig.vring, 0, BUF_START..BUF_END);
    // A long maximum, so that the time between the poll and the "kick"
    // below counts as soon whatever the machine's load.
    rig.worker.poller.max = Duration::from_secs(5);
    rig.worker.poll(&rig.vring);
    assert_eq!(rig.worker.poll_budget(), Duration::ZERO);
    // A kick soon after: the wake-up found work a longer poll would have caught.
    let _io = read(&mut d, 0);
    rig.worker.woke();
    rig.worker.process_queue(&rig.vring);
    rig.worker.poll(&rig.vring);
    assert_eq!(rig.worker.poll_budget(), POLL_MIN, "grown from 0");
    let _io = read(&mut d, 8);
    rig.worker.woke();
    rig.worker.process_queue(&rig.vring);
    rig.worker.poll(&rig.vring);
    let b = rig.worker.poll_budget();
    assert!(
        b == 2 * POLL_MIN || b == POLL_MIN,
        "doubled (or kept if the kick came within it): {b:?}"
    );

    // Idle polls with nothing coming within the maximum: halved, then 0.
    rig.worker.poller.max = Duration::from_micros(32);
    rig.worker.poller.budget = Duration::from_micros(32);
    rig.worker.poll(&rig.vring);
    let mut want = Duration::from_micros(32);
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(2));
        rig.worker.woke();
        rig.worker.poll(&rig.vring);
        want /= 2;
        if want < POLL_MIN {
            want = Duration::ZERO;
        }
        assert_eq!(rig.worker.poll_budget(), want);
    }
    assert_eq!(
        rig.worker.poll_budget(),
        Duration::ZERO,
        "32 → 16 → 8 → 4 → 0"
    );
}

#[test]
fn poll_leaves_kicks_enabled() {
    let (mut rig, gm) = rig();
    let d = Driver::new(&gm, &rig.vring, 0, BUF_START..BUF_END);
    rig.worker.poller.budget = rig.worker.poller.max;
    rig.worker.poll(&rig.vring);
    // The used ring's flags (no EVENT_IDX): VRING_USED_F_NO_NOTIFY is clear.
    let flags: u16 =
        vm_memory::Bytes::read_obj(&*gm, vm_memory::GuestAddress(d.used_addr())).unwrap();
    assert_eq!(flags, 0);
}
