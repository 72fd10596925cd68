//! The inflight record under simulated crashes: stop after every step of
//! marking, completing (pre-put, used-index publish, post-put) and check
//! that a new process reading the record resubmits exactly the requests
//! whose used element the guest has not seen, oldest first.

use std::sync::Arc;

use super::*;

/// One step of the protocol as the worker performs it.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// Pop `head`: mark it.
    Mark(u16),
    /// Before writing `head`'s used element.
    PrePut(u16),
    /// The used element of `head` is written and the used index published
    /// (guest-visible; not a store into the record).
    Publish(u16),
    /// After publishing: clear `head`, store the used index.
    PostPut(u16),
}

fn complete(h: u16) -> [Step; 3] {
    [Step::PrePut(h), Step::Publish(h), Step::PostPut(h)]
}

/// Runs `steps[..stop]` on a fresh record, "crashes", maps the memfd again
/// in a new `InflightRegion` (as the next pinblk does on SET_INFLIGHT_FD)
/// and returns what recovery found, with the guest's used index.
fn run_and_recover(qsize: u16, steps: &[Step], stop: usize) -> (Recovery, u16, Vec<u16>) {
    let region = Arc::new(InflightRegion::create(1, qsize).unwrap());
    let mut q = region.queue(0).unwrap();
    assert_eq!(
        q.recover(0),
        Recovery {
            resubmit: vec![],
            next_avail: None
        }
    );
    let mut used = 0u16;
    let mut popped = Vec::new();
    let mut published = Vec::new();
    for s in &steps[..stop] {
        match *s {
            Step::Mark(h) => {
                q.mark(h);
                popped.push(h);
            }
            Step::PrePut(h) => q.pre_put(h),
            Step::Publish(h) => {
                used = used.wrapping_add(1);
                published.push(h);
            }
            Step::PostPut(h) => q.post_put(h, used),
        }
    }
    let file = region.file().try_clone().unwrap();
    let size = region.size();
    drop(q);
    drop(region);
    let again = Arc::new(InflightRegion::open(file, 0, size, 1, qsize).unwrap());
    let mut q = again.queue(0).unwrap();
    let expected: Vec<u16> = popped
        .into_iter()
        .filter(|h| !published.contains(h))
        .collect();
    (q.recover(used), used, expected)
}

#[test]
fn a_crash_after_any_step_resubmits_exactly_the_uncompleted_heads_oldest_first() {
    // Out of order: 5, 2, 7 popped; 2 completes, 9 popped, 7, then 5, then 9.
    let mut steps = vec![Step::Mark(5), Step::Mark(2), Step::Mark(7)];
    steps.extend(complete(2));
    steps.push(Step::Mark(9));
    steps.extend(complete(7));
    steps.extend(complete(5));
    steps.extend(complete(9));
    for stop in 0..=steps.len() {
        let (rec, used, expected) = run_and_recover(16, &steps, stop);
        assert_eq!(
            rec.resubmit,
            expected,
            "crash after {stop} steps ({:?})",
            &steps[..stop]
        );
        assert_eq!(
            rec.next_avail,
            Some(used.wrapping_add(expected.len() as u16)),
            "crash after {stop} steps"
        );
    }
}

#[test]
fn a_crash_between_publishing_the_used_index_and_clearing_is_read_correctly() {
    let region = Arc::new(InflightRegion::create(1, 8).unwrap());
    let mut q = region.queue(0).unwrap();
    q.recover(0);
    q.mark(3);
    q.mark(4);
    q.pre_put(4);
    // Used element of 4 published (guest used idx 1), then the crash
    // before post_put: the record still says 4 is in flight and used_idx 0.
    let mut again = region.queue(0).unwrap();
    let rec = again.recover(1);
    assert_eq!(
        rec,
        Recovery {
            resubmit: vec![3],
            next_avail: Some(2)
        }
    );
    assert!(!again.is_inflight(4));
}

#[test]
fn the_counter_continues_after_recovery_so_order_holds_over_two_crashes() {
    let region = Arc::new(InflightRegion::create(1, 8).unwrap());
    let mut q = region.queue(0).unwrap();
    q.recover(0);
    q.mark(6);
    q.mark(1);
    let mut q = region.queue(0).unwrap();
    assert_eq!(q.recover(0).resubmit, vec![6, 1]);
    // Resubmitted heads keep their marks; a new pop comes after them.
    q.mark(0);
    let mut q = region.queue(0).unwrap();
    assert_eq!(q.recover(0).resubmit, vec![6, 1, 0]);
}

#[test]
fn queues_have_separate_parts_and_used_index_wraps() {
    let region = Arc::new(InflightRegion::create(2, 4).unwrap());
    assert_eq!(region.size(), 2 * queue_region_size(4) as u64);
    let mut a = region.queue(0).unwrap();
    let mut b = region.queue(1).unwrap();
    assert!(region.queue(2).is_none());
    a.recover(u16::MAX);
    b.recover(0);
    a.mark(3);
    b.mark(3);
    b.pre_put(3);
    b.post_put(3, 1);
    let mut a = region.queue(0).unwrap();
    let rec = a.recover(u16::MAX);
    assert_eq!(
        rec,
        Recovery {
            resubmit: vec![3],
            next_avail: Some(0)
        }
    );
    let mut b = region.queue(1).unwrap();
    assert_eq!(b.recover(1).resubmit, Vec::<u16>::new());
}

#[test]
fn heads_outside_the_queue_are_ignored_and_bad_geometry_is_refused() {
    let region = Arc::new(InflightRegion::create(1, 4).unwrap());
    let mut q = region.queue(0).unwrap();
    q.recover(0);
    q.mark(4);
    q.mark(u16::MAX);
    q.pre_put(9);
    q.post_put(9, 1);
    assert_eq!(
        region.queue(0).unwrap().recover(0).resubmit,
        Vec::<u16>::new()
    );
    assert!(InflightRegion::create(0, 4).is_err());
    assert!(InflightRegion::create(1, 0).is_err());
    // A file shorter than the declared size is refused (it would SIGBUS).
    let f = region.file().try_clone().unwrap();
    assert!(matches!(
        InflightRegion::open(f, 0, region.size() * 2, 1, 8),
        Err(InflightError::Geometry(_))
    ));
    let f = region.file().try_clone().unwrap();
    assert!(InflightRegion::open(f, 64, region.size(), 1, 4).is_err());
}

#[test]
fn a_record_of_another_queue_size_starts_afresh() {
    let region = Arc::new(InflightRegion::create(1, 8).unwrap());
    let mut q = region.queue(0).unwrap();
    q.recover(0);
    q.mark(2);
    let f = region.file().try_clone().unwrap();
    let small = Arc::new(InflightRegion::open(f, 0, region.size(), 1, 4).unwrap());
    assert_eq!(
        small.queue(0).unwrap().recover(0).resubmit,
        Vec::<u16>::new()
    );
}
