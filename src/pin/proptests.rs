//! Property tests of the pin tracker against a naive model (issue 13, "pins
//! balance; no missed overlap; no false overlap"), complementing
//! `tests.rs::maybe_pinned_matches_model` (which checks who conflicts, by
//! direction only):
//!
//! - per guest page, both pin counts equal the model's (a page counted once
//!   per range touching it, `pages.rs`) after every step, on both sides of
//!   the 1 GiB chunk boundary and of the 128 TiB direct-table limit (hash-map
//!   pages above it), and are all 0 once every pin is released; the
//!   counters balance (acquired - released = pages of the live pins);
//! - a new request's check reports exactly the other live pins that share a
//!   guest page with it under the rules of docs/DESIGN.md §3 (WRITE: R1 for
//!   READ pins, LongTerm for long-term pins of either direction; READ: R2
//!   for WRITE pins), with the right rule, long-term flags, byte overlap and
//!   overlapping ranges (the queried bytes on the other pin's pages);
//! - `pinned_by` with a direction filter and an excluded request names
//!   exactly the live pins sharing a page.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::guest::GuestRange;

/// Pins never age into long-term within a test case.
const HOUR: Duration = Duration::from_secs(3600);
const GIB: u64 = 1 << 30;
/// The direct-table limit of `pages.rs` (pages above it live in a hash map).
const DIRECT_LIMIT: u64 = 128 << 40;
const PAGE: u128 = GUEST_PAGE_SIZE as u128;

/// Guest-physical addresses in four 40-56 KiB windows, so that requests
/// overlap often: low memory, a 1 GiB chunk boundary, the 128 TiB
/// direct-table limit, and the top of the address space (no range there
/// reaches past `u64::MAX`: lengths are below 0x6000).
fn gpa() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..0xa000,
        (GIB - 0x6000)..(GIB + 0x6000),
        (DIRECT_LIMIT - 0x6000)..(DIRECT_LIMIT + 0x6000),
        (u64::MAX - 0xe000)..=(u64::MAX - 0x6000),
    ]
}

/// Ranges of 1 byte to 20 KiB; half of them in 512-byte units, so that
/// ranges often end exactly where another begins. One in four is large
/// instead: 4 KiB to 192 KiB, half of them starting on a 64 KiB granule, so
/// that whole granules are counted in their granule word and partial ones
/// in page words (`pages.rs`), on both sides of the 1 GiB chunk boundary
/// and of the 128 TiB direct-table limit.
fn ranges() -> impl Strategy<Value = Vec<GuestRange>> {
    let small = (gpa(), 1u32..0x5000, any::<bool>()).prop_map(|(addr, len, sectors)| {
        if sectors {
            GuestRange {
                addr: addr & !0x1ff,
                len: (len & !0x1ff).max(0x200),
            }
        } else {
            GuestRange { addr, len }
        }
    });
    let large_at = prop_oneof![
        0u64..0x20000,
        (GIB - 0x20000)..(GIB + 0x10000),
        (DIRECT_LIMIT - 0x20000)..(DIRECT_LIMIT + 0x10000),
    ];
    let large =
        (large_at, 0x1000u32..0x30000, any::<bool>()).prop_map(|(addr, len, aligned)| GuestRange {
            addr: if aligned { addr & !0xffff } else { addr },
            len,
        });
    prop::collection::vec(prop_oneof![3 => small, 1 => large], 1..4)
}

fn direction() -> impl Strategy<Value = Direction> {
    prop_oneof![Just(Direction::DeviceWrite), Just(Direction::DeviceRead)]
}

#[derive(Clone, Debug)]
enum Op {
    /// Pin (long-term if the flag) on a queue, then check.
    Pin(u16, Direction, bool, Vec<GuestRange>),
    /// Unpin the live pin at this index (modulo the number live).
    Unpin(prop::sample::Index),
    /// `pinned_by` with an optional direction, excluding the live pin at
    /// the index if any.
    Query(
        Vec<GuestRange>,
        Option<Direction>,
        Option<prop::sample::Index>,
    ),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u16..3, direction(), prop::bool::weighted(0.2), ranges())
            .prop_map(|(q, d, lt, r)| Op::Pin(q, d, lt, r)),
        3 => any::<prop::sample::Index>().prop_map(Op::Unpin),
        2 => (ranges(), prop::option::of(direction()), prop::option::of(any::<prop::sample::Index>()))
            .prop_map(|(r, d, x)| Op::Query(r, d, x)),
    ]
}

/// A live pin of the model.
struct Pin {
    handle: PinHandle,
    long_term: bool,
    ranges: Vec<GuestRange>,
}

/// The model's live pins. Forgets leftover handles when a case fails, so
/// that the failure reports its assertion rather than the drop check.
struct Live(Vec<Pin>);

impl Drop for Live {
    fn drop(&mut self) {
        for p in self.0.drain(..) {
            p.handle.forget();
        }
    }
}

fn span(r: &GuestRange) -> (u128, u128) {
    (u128::from(r.addr), u128::from(r.addr) + u128::from(r.len))
}

/// Guest pages of `r`, first to last.
fn pages(r: &GuestRange) -> impl Iterator<Item = u64> {
    let (a, b) = span(r);
    ((a / PAGE) as u64)..=(((b - 1) / PAGE) as u64)
}

fn page_set(rs: &[GuestRange]) -> BTreeSet<u64> {
    rs.iter().flat_map(pages).collect()
}

/// Pins of `page` by `rs`: one per range touching it.
fn touches(rs: &[GuestRange], page: u64) -> u32 {
    rs.iter().filter(|r| pages(r).any(|p| p == page)).count() as u32
}

/// Sorted spans with touching or overlapping ones merged.
fn merged(mut v: Vec<(u128, u128)>) -> Vec<(u128, u128)> {
    v.sort_unstable();
    let mut out: Vec<(u128, u128)> = Vec::new();
    for (lo, hi) in v {
        match out.last_mut() {
            Some(last) if lo <= last.1 => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

/// The bytes of `mine` that lie on guest pages of `theirs`, page by page.
fn model_overlap(mine: &[GuestRange], theirs: &[GuestRange]) -> Vec<(u128, u128)> {
    let theirs = page_set(theirs);
    let mut v = Vec::new();
    for r in mine {
        let (a, b) = span(r);
        for p in pages(r).filter(|p| theirs.contains(p)) {
            let (p0, p1) = (u128::from(p) * PAGE, (u128::from(p) + 1) * PAGE);
            v.push((a.max(p0), b.min(p1)));
        }
    }
    merged(v)
}

fn bytes_meet(mine: &[GuestRange], theirs: &[GuestRange]) -> bool {
    mine.iter().any(|a| {
        theirs.iter().any(|b| {
            let ((a0, a1), (b0, b1)) = (span(a), span(b));
            a0.max(b0) < a1.min(b1)
        })
    })
}

fn as_spans(rs: &[GuestRange]) -> Vec<(u128, u128)> {
    merged(rs.iter().map(span).collect())
}

/// Checks one reported pin against the live model pin it names.
fn check_by(by: &PinnedBy, o: &Pin, mine: &[GuestRange]) -> Result<(), TestCaseError> {
    prop_assert_eq!(by.direction, o.handle.direction());
    prop_assert_eq!(by.long_term, o.long_term);
    prop_assert_eq!(by.registered_long_term, o.long_term);
    prop_assert_eq!(by.byte_overlap, bytes_meet(mine, &o.ranges));
    prop_assert_eq!(as_spans(&by.overlap), model_overlap(mine, &o.ranges));
    prop_assert_eq!(by.pin, o.handle.pin_ref());
    Ok(())
}

/// The page counts of `pages` and the counters equal the model's.
fn check_counts(t: &PinTracker, live: &[Pin], at: &BTreeSet<u64>) -> Result<(), TestCaseError> {
    for &p in at {
        let (mut w, mut r) = (0, 0);
        for o in live {
            let n = touches(&o.ranges, p);
            match o.handle.direction() {
                Direction::DeviceWrite => w += n,
                Direction::DeviceRead => r += n,
            }
        }
        prop_assert_eq!(
            t.page_pins(p << GUEST_PAGE_SHIFT),
            PagePins {
                device_write: w,
                device_read: r
            },
            "page {:#x}",
            p
        );
    }
    let c = t.counters();
    let live_pages: u64 = live.iter().map(|o| o.handle.pages()).sum();
    let model_pages: u64 = live
        .iter()
        .map(|o| {
            o.ranges
                .iter()
                .map(|r| pages(r).count() as u64)
                .sum::<u64>()
        })
        .sum();
    prop_assert_eq!(live_pages, model_pages);
    prop_assert_eq!(c.pins_acquired - c.pins_released, live_pages);
    prop_assert_eq!(c.inflight_pins, live.len() as u64);
    let distinct: BTreeSet<u64> = live.iter().flat_map(|o| page_set(&o.ranges)).collect();
    prop_assert_eq!(c.pinned_pages, distinct.len() as u64);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Pins balance page by page, and check / pinned_by report exactly the
    /// overlapping pins with the right rule and overlap (see the module doc).
    #[test]
    fn pins_balance_and_conflicts_are_exact(ops in prop::collection::vec(op(), 1..64)) {
        let t = PinTracker::new(3, HOUR);
        let mut live = Live(Vec::new());
        let mut seen: BTreeSet<u64> = BTreeSet::new();
        let mut next_id = 0u64;
        for op in ops {
            let touched = match op {
                Op::Pin(q, dir, long_term, rs) => {
                    next_id += 1;
                    let h = if long_term {
                        t.pin_longterm(q, next_id, dir, &rs)
                    } else {
                        t.pin(q, next_id, dir, &rs)
                    };
                    let got: BTreeMap<(u16, u64), PinConflict> = t
                        .check(&h, &rs)
                        .into_iter()
                        .map(|c| ((c.by.queue, c.by.id), c))
                        .collect();
                    let mine = page_set(&rs);
                    let mut want = BTreeMap::new();
                    for o in &live.0 {
                        if page_set(&o.ranges).is_disjoint(&mine) {
                            continue;
                        }
                        let rule = match (dir, o.handle.direction(), o.long_term) {
                            (Direction::DeviceRead, _, true) => Some(Rule::LongTerm),
                            (Direction::DeviceRead, Direction::DeviceWrite, false) => Some(Rule::R1),
                            (Direction::DeviceWrite, Direction::DeviceRead, _) => Some(Rule::R2),
                            _ => None,
                        };
                        if let Some(rule) = rule {
                            want.insert((o.handle.queue(), o.handle.id()), (rule, o));
                        }
                    }
                    prop_assert_eq!(
                        got.keys().collect::<Vec<_>>(),
                        want.keys().collect::<Vec<_>>(),
                        "conflicts of a {:?} pin of {:?}", dir, rs
                    );
                    for (k, c) in &got {
                        let (rule, o) = want[k];
                        prop_assert_eq!(c.rule, rule);
                        check_by(&c.by, o, &rs)?;
                    }
                    seen.extend(&mine);
                    live.0.push(Pin { handle: h, long_term, ranges: rs.clone() });
                    mine
                }
                Op::Unpin(i) => {
                    if live.0.is_empty() {
                        continue;
                    }
                    let p = live.0.swap_remove(i.index(live.0.len()));
                    let touched = page_set(&p.ranges);
                    t.unpin(p.handle);
                    touched
                }
                Op::Query(rs, dir, exclude) => {
                    let exclude = exclude
                        .filter(|_| !live.0.is_empty())
                        .map(|i| {
                            let h = &live.0[i.index(live.0.len())].handle;
                            (h.queue(), h.id())
                        });
                    let mine = page_set(&rs);
                    let want: BTreeMap<(u16, u64), &Pin> = live
                        .0
                        .iter()
                        .filter(|o| dir.is_none_or(|d| d == o.handle.direction()))
                        .filter(|o| Some((o.handle.queue(), o.handle.id())) != exclude)
                        .filter(|o| !page_set(&o.ranges).is_disjoint(&mine))
                        .map(|o| ((o.handle.queue(), o.handle.id()), o))
                        .collect();
                    let got: BTreeMap<(u16, u64), PinnedBy> = t
                        .pinned_by(&rs, dir, exclude)
                        .into_iter()
                        .map(|b| ((b.queue, b.id), b))
                        .collect();
                    prop_assert_eq!(
                        got.keys().collect::<Vec<_>>(),
                        want.keys().collect::<Vec<_>>(),
                        "pinned_by({:?}, {:?}, {:?})", rs, dir, exclude
                    );
                    for (k, by) in &got {
                        check_by(by, want[k], &rs)?;
                    }
                    mine
                }
            };
            check_counts(&t, &live.0, &touched)?;
        }
        for p in live.0.drain(..) {
            t.unpin(p.handle);
        }
        // Balanced: no page keeps a pin, the counters are back to idle.
        check_counts(&t, &[], &seen)?;
        let c = t.counters();
        prop_assert_eq!(c.pins_acquired, c.pins_released);
        let every: Vec<GuestRange> = seen
            .iter()
            .map(|&p| GuestRange { addr: p << GUEST_PAGE_SHIFT, len: 1 })
            .collect();
        prop_assert!(!t.maybe_pinned(&every, None), "a page stays pinned");
    }
}
