//! Jobs that wait before submission (docs/DESIGN.md §4, §5): stalled on
//! conflicting pins (policy `stall`) or waiting for bounce memory; the retry
//! timer that re-checks them; and the injected READ completion delay.
//!
//! Stalls never block the worker thread: a stalled job is parked, and is
//! retried when a pin it waits on is released (the unpinning queue writes
//! this worker's completion eventfd), at each completion, and every
//! [`RETRY_INTERVAL`] while any job is parked.

use std::time::{Duration, Instant};

use super::events::emit;
use super::job::{Park, Stage};
use super::QueueWorker;
use crate::report::{ConflictAction, EventBody};
use crate::storage::{Op, Tag};

/// How often parked jobs are retried while any exist.
pub(super) const RETRY_INTERVAL: Duration = Duration::from_millis(1);

/// The worker's parked jobs and its retry timer.
#[derive(Default)]
pub(super) struct Parked {
    slots: Vec<u32>,
    timer_pending: bool,
}

impl Parked {
    /// The retry timer's completion was reaped.
    pub(super) fn timer_fired(&mut self) {
        self.timer_pending = false;
    }
}

impl QueueWorker {
    /// Parks the job in `slot` for `why` and arms the retry timer.
    pub(super) fn park(&mut self, slot: u32, why: Park) {
        self.job(slot).stage = Stage::Parked(why);
        self.park.slots.push(slot);
        self.arm_timer();
    }

    /// Pushes the retry timer unless one is pending.
    fn arm_timer(&mut self) {
        if self.park.timer_pending {
            return;
        }
        // SAFETY: a timeout carries no buffer of ours (the engine owns its timespec).
        unsafe { self.engine.push(Op::Timeout(RETRY_INTERVAL), Tag::Timer) };
        self.park.timer_pending = true;
    }

    /// Retries parked jobs: a stall ends when every pin it waits on is
    /// released (zero-copy), or at its deadline or when `force` (bounce); a
    /// job waiting for bounce memory tries the pool again.
    pub(super) fn retry_parked(&mut self, force: bool) {
        if self.park.slots.is_empty() {
            return;
        }
        let dev = self.dev.clone();
        let now = Instant::now();
        for slot in std::mem::take(&mut self.park.slots) {
            let job = self.job(slot);
            match std::mem::replace(&mut job.stage, Stage::Pinned) {
                Stage::Parked(Park::Stalled {
                    since,
                    deadline,
                    waits,
                    mut event,
                }) => {
                    let released = waits.iter().all(|w| dev.pins().is_released(w));
                    if released || force || now >= deadline {
                        if let EventBody::Conflict(c) = &mut event.body {
                            c.stall_us = Some(since.elapsed().as_micros() as u64);
                            c.action = if released {
                                ConflictAction::Stall
                            } else {
                                ConflictAction::StallTimeoutBounce
                            };
                        }
                        emit(&dev, &event);
                        self.go(slot, !released, force);
                    } else {
                        job.stage = Stage::Parked(Park::Stalled {
                            since,
                            deadline,
                            waits,
                            event,
                        });
                        self.park.slots.push(slot);
                    }
                }
                Stage::Parked(Park::PoolWait) => self.go(slot, true, force),
                Stage::Parked(Park::CopyOut { waits, deadline }) => {
                    let released = waits.iter().all(|w| dev.pins().is_released(w));
                    if released || force || now >= deadline {
                        let mut job = self.jobs.take(slot).expect("parked slot is in use");
                        self.done(&mut job);
                    } else {
                        self.job(slot).stage = Stage::Parked(Park::CopyOut { waits, deadline });
                        self.park.slots.push(slot);
                    }
                }
                // Never forced: the earlier request it waits on is submitted
                // and completes by itself.
                Stage::Parked(Park::RangeWait) => self.go(slot, false, force),
                other => job.stage = other,
            }
        }
        if !self.park.slots.is_empty() {
            self.arm_timer();
        }
    }

    /// completed → delayed (`--inject-read-delay`): holds a completed READ
    /// (and so its pin) for `delay`.
    pub(super) fn delay(&mut self, slot: u32, delay: Duration) {
        self.job(slot).stage = Stage::Delayed;
        // SAFETY: a timeout carries no buffer of ours (the engine owns its timespec).
        unsafe { self.engine.push(Op::Timeout(delay), Tag::Delay { slot }) };
    }

    /// delayed → done: the injected delay of the READ in `slot` is over.
    pub(super) fn delay_over(&mut self, slot: u32) {
        match self.jobs.get_mut(slot) {
            Some(job) if matches!(job.stage, Stage::Delayed) => self.finish(slot),
            _ => log::error!("queue {}: delay over for unknown slot {slot}", self.index),
        }
    }
}
