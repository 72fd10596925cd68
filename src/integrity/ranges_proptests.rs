//! Property test of the LBA range locks ([`RangeLocks`], docs/DESIGN.md §7)
//! against a model: one list of requests in arrival order, where a request
//! may hold its blocks once no earlier request (holding or waiting) overlaps
//! it in a conflicting mode (two shared requests never conflict).
//!
//! For random acquire / retry / release sequences over blocks that cross
//! 1 MiB stripes, alias in the 64 shards and sometimes span all of them:
//!
//! - a grant (at acquire or at retry) happens exactly when the model allows
//!   it: no missed overlap (never two conflicting holders at once) and no
//!   false overlap (never a wait without an earlier conflicting request);
//! - FIFO per overlap: a request is granted only after every earlier
//!   request it conflicts with has been released;
//! - no lost wake-up: a release wakes the queue of every waiter that the
//!   release makes grantable;
//! - `overlapping` names exactly the other requests on the blocks, and the
//!   counters agree; draining the table grants every waiter eventually.

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use proptest::prelude::*;

use super::ranges::{Access, RangeCounters, RangeLocks, RangeTicket};

const QUEUES: u16 = 3;

/// Blocks (4 KiB units) in four places: the start of the image, a stripe
/// boundary (256 blocks), the same stripe offsets 64 stripes on (the same
/// shard, other blocks), and far out; one in eight ranges is long enough
/// to span every shard.
fn blocks() -> impl Strategy<Value = Range<u64>> {
    let start = prop_oneof![
        0u64..24,
        250u64..262,
        (64 * 256 + 250u64)..(64 * 256 + 262),
        (1u64 << 40)..(1 << 40) + 16,
    ];
    let len = prop_oneof![7 => 1u64..12, 1 => 64 * 256u64..64 * 256 + 600];
    (start, len).prop_map(|(s, l)| s..s + l)
}

fn access() -> impl Strategy<Value = Access> {
    prop_oneof![Just(Access::Shared), Just(Access::Exclusive)]
}

#[derive(Clone, Debug)]
enum Op {
    /// A request of a queue enters the table.
    Acquire(u16, Range<u64>, Access),
    /// The request at this index (modulo the number in the table) leaves,
    /// granted or not; then every waiter is retried.
    Release(prop::sample::Index),
    /// `overlapping` for these blocks.
    Query(Range<u64>, Option<prop::sample::Index>),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..QUEUES, blocks(), access()).prop_map(|(q, b, a)| Op::Acquire(q, b, a)),
        3 => any::<prop::sample::Index>().prop_map(Op::Release),
        1 => (blocks(), prop::option::of(any::<prop::sample::Index>()))
            .prop_map(|(b, x)| Op::Query(b, x)),
    ]
}

/// A request of the model, in arrival order.
struct Req {
    ticket: RangeTicket,
    id: u64,
    queue: u16,
    blocks: Range<u64>,
    access: Access,
    granted: bool,
}

fn overlap(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

fn conflict(a: &Req, b: &Req) -> bool {
    overlap(&a.blocks, &b.blocks)
        && (a.access == Access::Exclusive || b.access == Access::Exclusive)
}

/// Model: may the request at `i` hold its blocks?
fn grantable(reqs: &[Req], i: usize) -> bool {
    !reqs[..i].iter().any(|e| conflict(e, &reqs[i]))
}

/// No two conflicting requests hold their blocks at once.
fn check_holders(reqs: &[Req]) -> Result<(), TestCaseError> {
    for (i, a) in reqs.iter().enumerate().filter(|(_, r)| r.granted) {
        for b in reqs[i + 1..].iter().filter(|r| r.granted) {
            prop_assert!(
                !conflict(a, b),
                "requests {} {:?} {:?} and {} {:?} {:?} both hold",
                a.id,
                a.blocks,
                a.access,
                b.id,
                b.blocks,
                b.access
            );
        }
    }
    Ok(())
}

/// The model's requests. Releases leftover tickets when a case fails early.
struct Table<'a>(&'a RangeLocks, Vec<Req>);

impl Drop for Table<'_> {
    fn drop(&mut self) {
        for r in self.1.drain(..) {
            self.0.release(r.ticket);
        }
    }
}

/// Releases request `i`, retries every waiter, and checks grants, FIFO
/// order and wake-ups against the model.
fn release(
    l: &RangeLocks,
    t: &mut Table<'_>,
    woken: &Mutex<BTreeSet<u16>>,
    i: usize,
) -> Result<(), TestCaseError> {
    let gone = t.1.remove(i);
    let was_waiting: Vec<bool> = t.1.iter().map(|r| !r.granted).collect();
    woken.lock().unwrap().clear();
    l.release(gone.ticket);
    let woken = woken.lock().unwrap().clone();
    for (j, &waiting) in was_waiting.iter().enumerate() {
        if t.1[j].granted {
            prop_assert!(
                l.try_grant(&t.1[j].ticket),
                "a held ticket is no longer granted"
            );
            continue;
        }
        let want = grantable(&t.1, j);
        let got = l.try_grant(&t.1[j].ticket);
        prop_assert_eq!(
            got,
            want,
            "retry of request {} after {} left",
            t.1[j].id,
            gone.id
        );
        if got && waiting {
            prop_assert!(
                woken.contains(&t.1[j].queue),
                "request {} of queue {} became grantable when {} left, its queue was not woken",
                t.1[j].id,
                t.1[j].queue,
                gone.id
            );
        }
        t.1[j].granted = got;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Grants, FIFO order, wake-ups and queries equal the model's (see the
    /// module documentation).
    #[test]
    fn range_locks_match_model(ops in prop::collection::vec(op(), 1..60)) {
        let l = RangeLocks::new(QUEUES);
        let woken = Arc::new(Mutex::new(BTreeSet::new()));
        for q in 0..QUEUES {
            let w = woken.clone();
            l.set_waker(q, Some(Arc::new(move || {
                w.lock().unwrap().insert(q);
            })));
        }
        let mut t = Table(&l, Vec::new());
        let mut next_id = 0u64;
        let mut waits = 0u64;
        for op in ops {
            match op {
                Op::Acquire(queue, blocks, access) => {
                    next_id += 1;
                    let (ticket, granted) = l.acquire(queue, next_id, blocks.clone(), access);
                    t.1.push(Req { ticket, id: next_id, queue, blocks, access, granted });
                    let want = grantable(&t.1, t.1.len() - 1);
                    prop_assert_eq!(granted, want, "acquire of request {}", next_id);
                    waits += u64::from(!granted);
                }
                Op::Release(i) => {
                    if !t.1.is_empty() {
                        let i = i.index(t.1.len());
                        release(&l, &mut t, &woken, i)?;
                    }
                }
                Op::Query(blocks, me) => {
                    let me = me.filter(|_| !t.1.is_empty()).map(|i| t.1[i.index(t.1.len())].id);
                    let want: Vec<u64> = t.1.iter()
                        .filter(|r| Some(r.id) != me && overlap(&r.blocks, &blocks))
                        .map(|r| r.id)
                        .collect();
                    prop_assert_eq!(l.overlapping(&blocks, me.unwrap_or(0)), want);
                }
            }
            check_holders(&t.1)?;
            prop_assert_eq!(l.counters(), RangeCounters { waits, entries: t.1.len() as u64 });
        }
        // Drain: release the oldest holder until the table is empty; every
        // waiter is granted on the way (release() checks it against the model).
        while !t.1.is_empty() {
            let i = t.1.iter().position(|r| r.granted);
            prop_assert!(i.is_some(), "requests wait but none holds: {:?}", t.1.iter().map(|r| r.id).collect::<Vec<_>>());
            release(&l, &mut t, &woken, i.unwrap_or(0))?;
            check_holders(&t.1)?;
        }
        prop_assert_eq!(l.counters().entries, 0);
    }
}
