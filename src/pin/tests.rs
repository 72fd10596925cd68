//! Unit tests of the pin tracker, plus an ignored micro-benchmark.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;
use crate::guest::GuestRange;

const HOUR: Duration = Duration::from_secs(3600);
const TIB: u64 = 1 << 40;
const GIB: u64 = 1 << 30;

fn r(addr: u64, len: u32) -> GuestRange {
    GuestRange { addr, len }
}

fn ids(c: &[PinConflict]) -> Vec<(u16, u64, Rule)> {
    let mut v: Vec<_> = c.iter().map(|c| (c.by.queue, c.by.id, c.rule)).collect();
    v.sort_by_key(|&(q, id, _)| (q, id));
    v
}

fn assert_idle(t: &PinTracker) {
    let c = t.counters();
    assert_eq!(c.pins_acquired, c.pins_released, "{c:?}");
    assert_eq!(c.pinned_pages, 0, "{c:?}");
    assert_eq!(c.inflight_pins, 0, "{c:?}");
    assert!(c.peak_page_pins >= c.pinned_pages);
}

#[test]
fn pin_unpin_counting() {
    let t = PinTracker::new(2, HOUR);
    // Pages 1 and 2 (0x1800..0x2800), then page 2 again and page 3 from queue 1.
    let a = t.pin(0, 1, Direction::DeviceWrite, &[r(0x1800, 0x1000)]);
    let b = t.pin(1, 1, Direction::DeviceRead, &[r(0x2000, 0x2000)]);
    assert_eq!(a.pages(), 2);
    assert_eq!(b.pages(), 2);
    let c = t.counters();
    assert_eq!(c.pins_acquired, 4);
    assert_eq!(c.pins_released, 0);
    // Page 2 is pinned by both: 3 distinct pages, 4 page pins held.
    assert_eq!(c.pinned_pages, 3);
    assert_eq!(c.peak_page_pins, 4);
    assert_eq!(c.inflight_pins, 2);
    assert_eq!(
        t.page_pins(0x2fff),
        PagePins {
            device_write: 1,
            device_read: 1
        }
    );
    assert_eq!(t.page_pins(0x1000).device_write, 1);
    assert_eq!(t.page_pins(0x3000).device_read, 1);
    assert_eq!(t.page_pins(0x4000), PagePins::default());
    t.unpin(a);
    let c = t.counters();
    assert_eq!(
        (c.pins_released, c.pinned_pages, c.inflight_pins),
        (2, 2, 1)
    );
    t.unpin(b);
    assert_idle(&t);
    let c = t.counters();
    assert_eq!((c.pins_acquired, c.peak_page_pins), (4, 4));
    assert!(!t.maybe_pinned(&[r(0, 0x10000)], None));
}

#[test]
fn zero_length_and_subpage_ranges_count_pages() {
    let t = PinTracker::new(1, HOUR);
    // Two sub-page ranges in one page, one empty range: two page pins, one page.
    let h = t.pin(
        0,
        7,
        Direction::DeviceRead,
        &[r(0x5000, 0x200), r(0x5e00, 0x200), r(0x9000, 0)],
    );
    assert_eq!(h.pages(), 2);
    assert_eq!(t.page_pins(0x5000).device_read, 2);
    assert_eq!(t.counters().pinned_pages, 1);
    assert!(!t.maybe_pinned(&[r(0x9000, 0x1000)], None));
    // The request never conflicts with itself, even with its page counted twice.
    assert!(t
        .check(&h, &[r(0x5000, 0x200), r(0x5e00, 0x200), r(0x9000, 0)])
        .is_empty());
    t.unpin(h);
    assert_idle(&t);
}

#[test]
fn overlaps_partial_pages_boundaries_and_subpage() {
    let t = PinTracker::new(2, HOUR);
    // In-flight READ (DeviceWrite pin) over pages 1..=2 (0x1800..0x2800).
    let read = t.pin(0, 10, Direction::DeviceWrite, &[r(0x1800, 0x1000)]);

    // Partial page overlap, bytes intersect.
    let w = [r(0x2000, 0x200)];
    let h = t.pin(1, 20, Direction::DeviceRead, &w);
    let c = t.check_write(&h, &w);
    assert_eq!(ids(&c), vec![(0, 10, Rule::R1)]);
    assert_eq!(c[0].by.overlap, vec![r(0x2000, 0x200)]);
    assert!(c[0].by.byte_overlap);
    assert_eq!(c[0].by.direction, Direction::DeviceWrite);
    assert!(!c[0].by.long_term);
    t.unpin(h);

    // Same page, disjoint bytes: still a conflict (pages are pinned whole).
    let w = [r(0x2c00, 0x200)];
    let h = t.pin(1, 21, Direction::DeviceRead, &w);
    let c = t.check_write(&h, &w);
    assert_eq!(ids(&c), vec![(0, 10, Rule::R1)]);
    assert!(!c[0].by.byte_overlap);
    assert_eq!(c[0].by.overlap, vec![r(0x2c00, 0x200)]);
    t.unpin(h);

    // Spanning a page boundary into the pinned page from below.
    let w = [r(0x0e00, 0x400)];
    let h = t.pin(1, 22, Direction::DeviceRead, &w);
    let c = t.check_write(&h, &w);
    assert_eq!(ids(&c), vec![(0, 10, Rule::R1)]);
    assert_eq!(c[0].by.overlap, vec![r(0x1000, 0x200)]);
    assert!(!c[0].by.byte_overlap);
    t.unpin(h);

    // Adjacent pages only: no conflict.
    let w = [r(0x0000, 0x1000), r(0x3000, 0x1000)];
    let h = t.pin(1, 23, Direction::DeviceRead, &w);
    assert!(t.check_write(&h, &w).is_empty());
    // Only `h` itself pins these pages.
    assert!(!t.maybe_pinned(&w, Some(Direction::DeviceWrite)));
    assert_eq!(t.pinned_by(&w, None, None).len(), 1);
    t.unpin(h);

    // Several ranges, overlap merged and sorted.
    let w = [r(0x2400, 0x100), r(0x1000, 0x1000), r(0x2000, 0x400)];
    let h = t.pin(1, 24, Direction::DeviceRead, &w);
    let c = t.check_write(&h, &w);
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].by.overlap, vec![r(0x1000, 0x1500)]);
    t.unpin(h);

    t.unpin(read);
    assert_idle(&t);
}

#[test]
fn rules_r1_r2_and_non_conflicts() {
    let t = PinTracker::new(3, HOUR);
    let buf = [r(0x10_0000, 0x4000)];

    // R1: WRITE from the destination of an in-flight READ.
    let read = t.pin(0, 1, Direction::DeviceWrite, &buf);
    let write = t.pin(1, 2, Direction::DeviceRead, &buf);
    assert_eq!(ids(&t.check(&write, &buf)), vec![(0, 1, Rule::R1)]);
    // R2 seen from the READ's side: the WRITE is a source pin.
    assert_eq!(ids(&t.check(&read, &buf)), vec![(1, 2, Rule::R2)]);
    t.unpin(read);
    t.unpin(write);

    // R2: READ into the source of an in-flight WRITE.
    let write = t.pin(0, 3, Direction::DeviceRead, &buf);
    let read = t.pin(2, 4, Direction::DeviceWrite, &buf[..]);
    let c = t.check_read(&read, &buf);
    assert_eq!(ids(&c), vec![(0, 3, Rule::R2)]);
    assert_eq!(c[0].by.direction, Direction::DeviceRead);

    // WRITE/WRITE is not a conflict (the other write is not long-term) ...
    let write2 = t.pin(1, 5, Direction::DeviceRead, &buf);
    let c = t.check_write(&write2, &buf);
    assert_eq!(ids(&c), vec![(2, 4, Rule::R1)], "only the READ conflicts");
    t.unpin(read);
    assert!(t.check_write(&write2, &buf).is_empty());
    t.unpin(write);
    t.unpin(write2);

    // ... nor is READ/READ.
    let r1 = t.pin(0, 6, Direction::DeviceWrite, &buf);
    let r2 = t.pin(1, 7, Direction::DeviceWrite, &buf);
    assert!(t.check_read(&r2, &buf).is_empty());
    assert!(t.check(&r1, &buf).is_empty());
    t.unpin(r1);
    t.unpin(r2);

    // Same request id on two queues: still two requests.
    let a = t.pin(0, 9, Direction::DeviceWrite, &buf);
    let b = t.pin(1, 9, Direction::DeviceRead, &buf);
    assert_eq!(ids(&t.check(&b, &buf)), vec![(0, 9, Rule::R1)]);
    assert_eq!(
        t.pinned_by(&buf, None, Some((1, 9)))
            .iter()
            .map(|p| (p.queue, p.id))
            .collect::<Vec<_>>(),
        vec![(0, 9)]
    );
    t.unpin(a);
    t.unpin(b);
    assert_idle(&t);
}

#[test]
fn pinned_by_and_maybe_pinned_directions() {
    let t = PinTracker::new(2, HOUR);
    let a = t.pin(0, 1, Direction::DeviceWrite, &[r(0x1000, 0x1000)]);
    let b = t.pin(1, 2, Direction::DeviceRead, &[r(0x2000, 0x1000)]);
    let q = [r(0x1ff0, 0x20)];
    assert!(t.maybe_pinned(&q, None));
    assert!(t.maybe_pinned(&q, Some(Direction::DeviceWrite)));
    assert!(t.maybe_pinned(&q, Some(Direction::DeviceRead)));
    assert!(!t.maybe_pinned(&[r(0x1000, 1)], Some(Direction::DeviceRead)));
    let by = t.pinned_by(&q, None, None);
    assert_eq!(
        by.iter().map(|p| (p.queue, p.id)).collect::<Vec<_>>(),
        vec![(0, 1), (1, 2)]
    );
    assert_eq!(by[0].overlap, vec![r(0x1ff0, 0x10)]);
    assert_eq!(by[1].overlap, vec![r(0x2000, 0x10)]);
    let by = t.pinned_by(&q, Some(Direction::DeviceRead), None);
    assert_eq!(by.len(), 1);
    assert_eq!(by[0].id, 2);
    t.unpin(a);
    t.unpin(b);
}

#[test]
fn longterm_promotion_by_age() {
    const AFTER: Duration = Duration::from_millis(20);
    let t = PinTracker::new(2, AFTER);
    let buf = [r(0x4000, 0x2000)];
    let t0 = Instant::now();
    let read = t.pin(0, 1, Direction::DeviceWrite, &buf);
    let w = t.pin(1, 2, Direction::DeviceRead, &buf);
    let c = t.check_write(&w, &buf);
    if t0.elapsed() + Duration::from_millis(5) < AFTER {
        // (Skipped if this thread was descheduled for ~15 ms: the other tests
        // run in parallel. Ages have the 4 ms resolution of the coarse clock.)
        assert_eq!(ids(&c), vec![(0, 1, Rule::R1)]);
        assert!(!c[0].by.long_term);
        assert_eq!(t.counters().longterm_pins, 0);
    }
    thread::sleep(Duration::from_millis(30));

    // Both pins are now long-term; the READ is reported under the long-term rule.
    let c = t.check_write(&w, &buf);
    assert_eq!(ids(&c), vec![(0, 1, Rule::LongTerm)]);
    assert!(c[0].by.long_term && !c[0].by.registered_long_term);
    assert!(c[0].by.age >= Duration::from_millis(20));
    // The scan counted the READ (2 pages) as long-term; the checker itself is
    // not scanned.
    let k = t.counters();
    assert_eq!((k.longterm_pins, k.longterm_pages), (1, 2));
    // Observed again: not counted twice.
    let _ = t.check_write(&w, &buf);
    t.unpin(read);

    // A WRITE touching an aged WRITE pin conflicts (long-term rule), unlike a
    // fresh WRITE/WRITE.
    let w2 = t.pin(0, 3, Direction::DeviceRead, &buf);
    let c = t.check_write(&w2, &buf);
    assert_eq!(ids(&c), vec![(1, 2, Rule::LongTerm)]);
    // A READ into an aged WRITE's source is R2, flagged long-term.
    let rd = t.pin(0, 4, Direction::DeviceWrite, &buf);
    let c = t.check_read(&rd, &buf);
    assert_eq!(ids(&c), vec![(0, 3, Rule::R2), (1, 2, Rule::R2)]);
    assert!(c.iter().any(|c| c.by.id == 2 && c.by.long_term));
    assert!(c.iter().any(|c| c.by.id == 3 && !c.by.long_term));
    // Now the aged WRITE was counted too (w2 and rd are fresh, unless this
    // machine is very slow).
    assert!(t.counters().longterm_pins >= 2);
    t.unpin(w);
    t.unpin(w2);
    t.unpin(rd);
    assert_idle(&t);

    // Promotion also counted at unpin when nobody looked.
    let before = t.counters().longterm_pins;
    let h = t.pin(1, 5, Direction::DeviceWrite, &[r(0, 1)]);
    thread::sleep(Duration::from_millis(25));
    t.unpin(h);
    assert_eq!(t.counters().longterm_pins, before + 1);
}

#[test]
fn explicit_longterm_pins() {
    let t = PinTracker::new(1, HOUR);
    // An io_uring fixed buffer: registered long-term, DeviceWrite direction.
    let fixed = t.pin_longterm(0, 100, Direction::DeviceWrite, &[r(0x8000, 0x1000)]);
    let k = t.counters();
    assert_eq!((k.longterm_pins, k.longterm_pages), (1, 1));
    let w = [r(0x8800, 0x10)];
    let h = t.pin(0, 1, Direction::DeviceRead, &w);
    let c = t.check_write(&h, &w);
    assert_eq!(ids(&c), vec![(0, 100, Rule::LongTerm)]);
    assert!(c[0].by.registered_long_term && c[0].by.long_term);
    t.unpin(h);
    // A long-term DeviceRead pin conflicts with WRITEs too.
    let src = t.pin_longterm(0, 101, Direction::DeviceRead, &[r(0xa000, 0x1000)]);
    let w = [r(0xa000, 0x1000)];
    let h = t.pin(0, 2, Direction::DeviceRead, &w);
    assert_eq!(ids(&t.check_write(&h, &w)), vec![(0, 101, Rule::LongTerm)]);
    t.unpin(h);
    // Idle but long-term pins remain: acquired != released.
    let k = t.counters();
    assert_eq!(k.pins_acquired - k.pins_released, 2);
    assert_eq!(k.pinned_pages, 2);
    t.unpin(fixed);
    t.unpin(src);
    assert_idle(&t);
    assert_eq!(t.counters().longterm_pins, 2);
}

#[test]
fn gpas_above_one_tib_and_at_the_top() {
    let t = PinTracker::new(2, HOUR);
    // Straddles the direct table / hash map boundary.
    let a_buf = [r(TIB - 0x1000, 0x2000)];
    let a = t.pin(0, 1, Direction::DeviceWrite, &a_buf);
    assert_eq!(t.counters().pinned_pages, 2);
    assert_eq!(t.page_pins(TIB).device_write, 1);
    assert_eq!(t.page_pins(TIB - 1).device_write, 1);
    assert!(t.maybe_pinned(&[r(TIB + 0xfff, 1)], Some(Direction::DeviceWrite)));
    assert!(!t.maybe_pinned(&[r(TIB + 0x1000, 0x1000)], None));
    let w = [r(TIB + 0x800, 0x100)];
    let h = t.pin(1, 2, Direction::DeviceRead, &w);
    assert_eq!(ids(&t.check_write(&h, &w)), vec![(0, 1, Rule::R1)]);
    t.unpin(h);
    // Far up, and the last page of the address space.
    let top = [r(u64::MAX - 0xfff, 0x1000), r(5 * TIB, 0x3000)];
    let b = t.pin(1, 3, Direction::DeviceRead, &top);
    assert_eq!(b.pages(), 4);
    let rd = [r(u64::MAX - 0x10, 0x11)];
    let h = t.pin(0, 4, Direction::DeviceWrite, &rd);
    let c = t.check_read(&h, &rd);
    assert_eq!(ids(&c), vec![(1, 3, Rule::R2)]);
    assert_eq!(c[0].by.overlap, rd.to_vec());
    t.unpin(h);
    t.unpin(b);
    t.unpin(a);
    assert_idle(&t);
    assert!(!t.maybe_pinned(&top, None));
    // Chunk boundary at 1 GiB inside the direct table.
    let c = t.pin(0, 5, Direction::DeviceRead, &[r(GIB - 0x800, 0x1000)]);
    assert_eq!(t.counters().pinned_pages, 2);
    assert!(t.maybe_pinned(&[r(GIB, 1)], None));
    t.unpin(c);
    assert_idle(&t);
}

#[test]
fn stall_support_watch_wake_and_wait() {
    let t = Arc::new(PinTracker::new(2, HOUR));
    let woken = Arc::new(AtomicUsize::new(0));
    let w2 = woken.clone();
    t.set_waker(
        1,
        Some(Arc::new(move || {
            w2.fetch_add(1, Ordering::SeqCst);
        })),
    );
    let buf = [r(0x1000, 0x1000)];
    let read = t.pin(0, 1, Direction::DeviceWrite, &buf);
    t.mark_submitted(&read);
    let w = t.pin(1, 2, Direction::DeviceRead, &buf);
    let c = t.check(&w, &buf);
    assert_eq!(c.len(), 1);
    assert!(c[0].by.submitted);
    let pin = c[0].by.pin;
    assert_eq!(pin, read.pin_ref());
    assert!(!t.is_released(&pin));
    let gen = t.release_generation();
    assert!(t.watch(&pin, 1));
    // Unwatched releases do not wake anyone.
    let other = t.pin(0, 3, Direction::DeviceWrite, &[r(0x9000, 1)]);
    t.unpin(other);
    assert_eq!(woken.load(Ordering::SeqCst), 0);
    assert_eq!(t.release_generation(), gen);
    t.unpin(read);
    assert!(t.is_released(&pin));
    assert_eq!(woken.load(Ordering::SeqCst), 1);
    assert_eq!(t.release_generation(), gen + 1);
    assert!(!t.watch(&pin, 1), "already released");
    // Slot reuse does not resurrect the old PinRef.
    let again = t.pin(0, 1, Direction::DeviceWrite, &buf);
    assert!(t.is_released(&pin));
    assert!(!again.pin_ref().eq(&pin));
    assert!(!t.check(&w, &buf)[0].by.submitted);

    // Blocking wait: released by another thread after 20 ms.
    let p = again.pin_ref();
    let t2 = t.clone();
    let start = Instant::now();
    let j = thread::spawn(move || {
        thread::sleep(Duration::from_millis(20));
        t2.unpin(again);
    });
    assert!(t.wait_unpinned(&[p], Duration::from_secs(10)));
    assert!(start.elapsed() >= Duration::from_millis(15));
    j.join().unwrap();
    // Timeout.
    let held = t.pin(0, 4, Direction::DeviceWrite, &buf);
    let start = Instant::now();
    assert!(!t.wait_unpinned(&[held.pin_ref()], Duration::from_millis(20)));
    assert!(start.elapsed() >= Duration::from_millis(20));
    assert!(t.wait_unpinned(&[], Duration::ZERO));
    t.unpin(held);
    t.unpin(w);
    assert_idle(&t);
}

#[test]
fn serde_names() {
    let t = PinTracker::new(2, HOUR);
    let buf = [r(0x3000, 0x1000)];
    let a = t.pin(0, 1, Direction::DeviceWrite, &buf);
    let b = t.pin(1, 2, Direction::DeviceRead, &buf);
    let c = t.check(&b, &buf);
    let j = serde_json::to_value(&c[0]).unwrap();
    assert_eq!(j["rule"], "R1");
    assert_eq!(j["queue"], 0);
    assert_eq!(j["id"], 1);
    assert_eq!(j["direction"], "DeviceWrite");
    assert!(j["age_us"].is_u64());
    assert_eq!(j["long_term"], false);
    assert_eq!(j["overlap"][0]["addr"], 0x3000);
    assert_eq!(j["overlap"][0]["len"], 0x1000);
    assert!(j.get("pin").is_none());
    assert_eq!(
        serde_json::to_string(&Rule::LongTerm).unwrap(),
        "\"long_term\""
    );
    assert_eq!(serde_json::to_string(&Rule::R2).unwrap(), "\"R2\"");
    let k = serde_json::to_value(t.counters()).unwrap();
    assert_eq!(k["pins_acquired"], 2);
    assert_eq!(k["pinned_pages"], 1);
    t.unpin(a);
    t.unpin(b);
}

#[test]
#[cfg(debug_assertions)]
#[should_panic(expected = "dropped without PinTracker::unpin")]
fn dropping_a_handle_without_unpin_panics_in_debug() {
    let t = PinTracker::new(1, HOUR);
    let _h = t.pin(0, 1, Direction::DeviceRead, &[r(0, 1)]);
}

#[test]
fn forget_leaves_the_pin() {
    let t = PinTracker::new(1, HOUR);
    t.pin(0, 1, Direction::DeviceRead, &[r(0, 1)]).forget();
    assert!(t.maybe_pinned(&[r(0, 1)], None));
    assert_eq!(t.counters().inflight_pins, 1);
}

/// Two levels of counts (`pages.rs`): a READ pinning a whole 64 KiB
/// granule raises the granule word, a WRITE pinning one page of it raises
/// that page's word. Pinned at the same moment on two threads, each then
/// checking, at least one of the two checks must see the other pin (the
/// store-buffer argument of `pages.rs`); and after both pinned, every
/// count reads 2 on that page and 1 on the granule's others.
#[test]
fn granule_and_page_pins_of_one_page_see_each_other() {
    const ROUNDS: usize = 3_000;
    let t = Arc::new(PinTracker::new(2, HOUR));
    let start = Arc::new(Barrier::new(2));
    let checked = Arc::new(Barrier::new(2));
    let spawn = |q: u16, dir: Direction, range: GuestRange| {
        let (t, start, checked) = (t.clone(), start.clone(), checked.clone());
        thread::spawn(move || {
            let mut seen = Vec::with_capacity(ROUNDS);
            for i in 0..ROUNDS {
                start.wait();
                let h = t.pin(q, i as u64, dir, &[range]);
                seen.push(!t.check(&h, &[range]).is_empty());
                checked.wait();
                if q == 0 {
                    let (page, other) = (t.page_pins(0x2_3000), t.page_pins(0x2_4000));
                    assert_eq!((page.device_write, page.device_read), (1, 1));
                    assert_eq!((other.device_write, other.device_read), (1, 0));
                }
                checked.wait();
                t.unpin(h);
            }
            seen
        })
    };
    // READ of the granule 0x20000..0x30000; WRITE of its page 0x23000.
    let read = spawn(0, Direction::DeviceWrite, r(0x2_0000, 0x1_0000));
    let write = spawn(1, Direction::DeviceRead, r(0x2_3000, 0x1000));
    let (read, write) = (read.join().unwrap(), write.join().unwrap());
    for (i, (a, b)) in read.iter().zip(&write).enumerate() {
        assert!(*a || *b, "round {i}: neither check saw the other pin");
    }
    assert_idle(&t);
}

#[test]
fn concurrent_pin_unpin_counters_consistent() {
    const THREADS: u16 = 8;
    const ROUNDS: u64 = 5_000;
    let t = Arc::new(PinTracker::new(THREADS, HOUR));
    let joins: Vec<_> = (0..THREADS)
        .map(|q| {
            let t = t.clone();
            thread::spawn(move || {
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(q);
                let mut conflicts = 0u64;
                for i in 0..ROUNDS {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let dir = if x & 1 == 0 {
                        Direction::DeviceWrite
                    } else {
                        Direction::DeviceRead
                    };
                    // Half private (disjoint per queue), half in a shared 64 KiB.
                    let base = if x & 2 == 0 {
                        u64::from(q) * 0x10_0000
                    } else {
                        0x100_0000
                    };
                    let ranges = [
                        r(base + (x >> 8) % 0x10000, ((x >> 32) % 0x3000) as u32 + 1),
                        r(base + (x >> 20) % 0x10000, 0x200),
                    ];
                    let h = t.pin(q, i, dir, &ranges);
                    conflicts += t.check(&h, &ranges).len() as u64;
                    let _ = t.maybe_pinned(&ranges, None);
                    if i % 7 == 0 {
                        let k = t.counters();
                        assert!(k.peak_page_pins >= k.pinned_pages);
                    }
                    t.unpin(h);
                }
                conflicts
            })
        })
        .collect();
    let conflicts: u64 = joins.into_iter().map(|j| j.join().unwrap()).sum();
    assert_idle(&t);
    let k = t.counters();
    assert!(k.pins_acquired >= u64::from(THREADS) * ROUNDS * 2);
    assert!(k.peak_page_pins > 0);
    assert!(
        conflicts > 0,
        "the shared region must have produced conflicts"
    );
    assert!(!t.maybe_pinned(&[r(0, 0x200_0000)], None));
}

/// Two requests pinned concurrently on two queues, then each checked: at
/// least one of them must see the other (pin-then-check ordering).
#[test]
fn concurrent_conflicting_pair_is_never_missed() {
    const ROUNDS: u64 = 20_000;
    let t = Arc::new(PinTracker::new(2, HOUR));
    let barrier = Arc::new(Barrier::new(2));
    let run = |q: u16, dir: Direction| {
        let t = t.clone();
        let barrier = barrier.clone();
        thread::spawn(move || {
            let mut seen = Vec::with_capacity(ROUNDS as usize);
            for i in 0..ROUNDS {
                let buf = [r(0x7000 + (i % 16) * 0x1000, 0x1000)];
                barrier.wait();
                let h = t.pin(q, i, dir, &buf);
                seen.push(!t.check(&h, &buf).is_empty());
                barrier.wait();
                t.unpin(h);
            }
            seen
        })
    };
    let a = run(0, Direction::DeviceWrite);
    let b = run(1, Direction::DeviceRead);
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    for i in 0..ROUNDS as usize {
        assert!(a[i] || b[i], "round {i}: both missed the conflict");
    }
    assert_idle(&t);
}

/// A naive model: the live pins, checked page by page.
#[derive(Debug, Clone)]
enum Op {
    Pin(u16, bool, Vec<(u64, u32)>),
    Unpin(usize),
    Query(Vec<(u64, u32)>, u8),
}

fn gpa() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..0x20_000,
        (GIB - 0x8000)..(GIB + 0x8000),
        (TIB - 0x8000)..(TIB + 0x8000),
        (u64::MAX - 0x8000)..=(u64::MAX - 0x2000),
    ]
}

fn ranges() -> impl Strategy<Value = Vec<(u64, u32)>> {
    prop::collection::vec((gpa(), 0u32..0x5000), 0..4)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u16..3, any::<bool>(), ranges()).prop_map(|(q, d, r)| Op::Pin(q, d, r)),
        any::<prop::sample::Index>().prop_map(|i| Op::Unpin(i.index(1 << 16))),
        (ranges(), 0u8..3).prop_map(|(r, d)| Op::Query(r, d)),
    ]
}

/// Live pins of the model; forgets leftover handles if a case fails early
/// (so that a failing case reports its assertion, not the drop check).
struct Live(Vec<(PinHandle, Vec<GuestRange>)>);

impl Drop for Live {
    fn drop(&mut self) {
        for (h, _) in self.0.drain(..) {
            h.forget();
        }
    }
}

fn pages_of(ranges: &[GuestRange]) -> BTreeSet<u64> {
    let mut s = BTreeSet::new();
    for g in ranges.iter().filter(|g| g.len > 0) {
        let last = g.addr.saturating_add(u64::from(g.len) - 1) >> 12;
        for p in (g.addr >> 12)..=last {
            s.insert(p);
        }
    }
    s
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// maybe_pinned never gives a false negative (here: equals the page-level
    /// model), pinned_by names exactly the overlapping pins, and the counters
    /// agree with the model, for random pin/unpin/query sequences.
    #[test]
    fn maybe_pinned_matches_model(ops in prop::collection::vec(op(), 1..60)) {
        let t = PinTracker::new(3, HOUR);
        let mut live = Live(Vec::new());
        let mut next_id = 0u64;
        for op in ops {
            match op {
                Op::Pin(q, d, rs) => {
                    let rs: Vec<_> = rs.into_iter().map(|(a, l)| r(a, l)).collect();
                    let dir = if d { Direction::DeviceWrite } else { Direction::DeviceRead };
                    next_id += 1;
                    let h = t.pin(q, next_id, dir, &rs);
                    // The new pin's own check must equal the model's view.
                    let got: BTreeSet<_> = t.check(&h, &rs).iter().map(|c| (c.by.queue, c.by.id)).collect();
                    let mine = pages_of(&rs);
                    let want: BTreeSet<_> = live.0.iter().filter(|(o, ors)| {
                        let rel = match dir {
                            Direction::DeviceRead => o.direction() == Direction::DeviceWrite,
                            Direction::DeviceWrite => o.direction() == Direction::DeviceRead,
                        };
                        rel && !pages_of(ors).is_disjoint(&mine)
                    }).map(|(o, _)| (o.queue(), o.id())).collect();
                    prop_assert_eq!(got, want);
                    live.0.push((h, rs));
                }
                Op::Unpin(i) => {
                    if !live.0.is_empty() {
                        let n = live.0.len();
                        let (h, _) = live.0.swap_remove(i % n);
                        t.unpin(h);
                    }
                }
                Op::Query(rs, d) => {
                    let rs: Vec<_> = rs.into_iter().map(|(a, l)| r(a, l)).collect();
                    let dir = match d {
                        0 => None,
                        1 => Some(Direction::DeviceWrite),
                        _ => Some(Direction::DeviceRead),
                    };
                    let q = pages_of(&rs);
                    let want: BTreeSet<_> = live.0.iter()
                        .filter(|(h, ors)| dir.is_none_or(|d| d == h.direction()) && !pages_of(ors).is_disjoint(&q))
                        .map(|(h, _)| (h.queue(), h.id()))
                        .collect();
                    prop_assert_eq!(t.maybe_pinned(&rs, dir), !want.is_empty());
                    let got: BTreeSet<_> = t.pinned_by(&rs, dir, None).iter().map(|p| (p.queue, p.id)).collect();
                    prop_assert_eq!(got, want);
                }
            }
            let all: BTreeSet<u64> = live.0.iter().flat_map(|(_, rs)| pages_of(rs)).collect();
            let k = t.counters();
            prop_assert_eq!(k.pinned_pages, all.len() as u64);
            prop_assert!(k.peak_page_pins >= k.pinned_pages);
            prop_assert_eq!(k.inflight_pins, live.0.len() as u64);
        }
        for (h, _) in live.0.drain(..) {
            t.unpin(h);
        }
        assert_idle(&t);
    }
}

/// Micro-benchmark: pin + check + unpin of a request with no conflict.
/// `cargo test --release --lib pin -- --ignored --nocapture`
#[test]
#[ignore]
fn bench_pin_check_unpin() {
    fn run(name: &str, ranges: &[GuestRange], threads: u16) {
        const N: u64 = 1_000_000;
        let t = Arc::new(PinTracker::new(threads, HOUR));
        let start = Instant::now();
        let joins: Vec<_> = (0..threads)
            .map(|q| {
                let t = t.clone();
                // Each queue uses its own 1 MiB slice of guest memory.
                let rs: Vec<_> = ranges
                    .iter()
                    .map(|g| r(g.addr + u64::from(q) * 0x10_0000, g.len))
                    .collect();
                thread::spawn(move || {
                    for i in 0..N {
                        let h = t.pin(q, i, Direction::DeviceRead, &rs);
                        let c = t.check(&h, &rs);
                        assert!(c.is_empty());
                        t.unpin(h);
                    }
                })
            })
            .collect();
        for j in joins {
            j.join().unwrap();
        }
        let ns = start.elapsed().as_nanos() as f64 / N as f64;
        println!("bench {name:<34} threads={threads}: {ns:8.1} ns/request (per thread)");
        assert_idle(&t);
    }
    let one_page = [r(0x1000, 0x1000)];
    let big = [r(0x2_0000, 0x2_0000)];
    let big_sg: Vec<_> = (0..32).map(|i| r(0x2_0000 + i * 0x1000, 0x1000)).collect();
    for threads in [1, 2] {
        run("4 KiB (1 page, 1 range)", &one_page, threads);
        run("128 KiB (32 pages, 1 range)", &big, threads);
        run("128 KiB (32 pages, 32 ranges)", &big_sg, threads);
    }
    // Also: a READ checked against an in-flight WRITE on other pages (page
    // counters of the neighbours non-zero, still no conflict).
    let t = PinTracker::new(1, HOUR);
    let other = t.pin(0, u64::MAX, Direction::DeviceRead, &[r(0x4_0000, 0x1000)]);
    let start = Instant::now();
    for i in 0..1_000_000u64 {
        let h = t.pin(0, i, Direction::DeviceWrite, &big);
        assert!(t.check(&h, &big).is_empty());
        t.unpin(h);
    }
    println!(
        "bench {:<34} threads=1: {:8.1} ns/request",
        "128 KiB READ, unrelated WRITE live",
        start.elapsed().as_nanos() as f64 / 1e6
    );
    t.unpin(other);
}
