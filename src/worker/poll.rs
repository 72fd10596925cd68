//! Adaptive busy-polling of the queue before the worker goes back to epoll
//! (docs/DESIGN.md §8 "Polling"): the ring's avail index and the storage
//! engine's completion queue are watched for a short budget, so a request
//! that follows closely costs neither side an eventfd wake-up. As QEMU's
//! `aio_poll` (`poll-max-ns`) does; SPDK always polls.

use std::time::{Duration, Instant};

use vhost_user_backend::VringT;

use super::kick::RingFault;
use super::{QueueWorker, Vring};

/// Smallest non-zero budget: the first growth from 0, and below it a
/// shrinking budget becomes 0 (QEMU's `poll-grow` start).
pub(super) const POLL_MIN: Duration = Duration::from_micros(4);

/// A poll call never spins longer than this many times the device's
/// maximum budget in all, however often it finds work: the worker lock
/// (which a ring stop, GET_VRING_BASE, waits for) is let go after it.
pub(super) const POLL_CAP_FACTOR: u32 = 10;

/// The polling state of one worker.
#[derive(Debug, Default)]
pub(super) struct Poller {
    /// The longest budget (`--poll-max-us`); zero: never poll.
    pub(super) max: Duration,
    /// The current budget: how long a poll spins after the last work found.
    pub(super) budget: Duration,
    /// A poll is running: [`QueueWorker::process_queue`] leaves the
    /// driver's notifications (kicks) off, as the poll watches the ring.
    pub(super) active: bool,
    /// Chains popped and completions reaped, ever (to tell whether a
    /// wake-up found work).
    pub(super) work: u64,
    /// When the last poll found its last work (or began, if it found none):
    /// the start of the idle stretch the next wake-up ends.
    idle_since: Option<Instant>,
    /// When epoll woke the worker after a poll, and [`Poller::work`] then.
    woke: Option<(Instant, u64)>,
}

impl Poller {
    /// A poller whose budget starts at 0 and grows up to `max`.
    pub(super) fn new(max: Duration) -> Poller {
        Poller {
            max,
            ..Poller::default()
        }
    }

    /// Judges the last wake-up (see [`QueueWorker::poll`] for the rule).
    fn adapt(&mut self) {
        let (Some(idle), Some((woke, work))) = (self.idle_since.take(), self.woke.take()) else {
            return;
        };
        let waited = woke.saturating_duration_since(idle);
        if waited > self.max {
            // Nothing came within the longest budget: polling was wasted.
            self.budget /= 2;
            if self.budget < POLL_MIN {
                self.budget = Duration::ZERO;
            }
        } else if self.work != work && waited > self.budget {
            // Work came soon after the budget ran out: a longer poll would
            // have caught it without a wake-up.
            self.budget = (self.budget * 2).max(POLL_MIN).min(self.max);
        }
    }
}

impl QueueWorker {
    /// Notes that epoll woke this worker (call before handling the event),
    /// for the budget rule of [`QueueWorker::poll`].
    pub fn woke(&mut self) {
        if self.poller.idle_since.is_some() {
            self.poller.woke = Some((Instant::now(), self.poller.work));
        }
    }

    /// Busy-polls the ring and the storage engine for more work before the
    /// worker goes back to epoll (call after handling an event, with the
    /// worker lock held). Checks without system calls whether the driver
    /// made chains available (its avail index is past the queue's next
    /// index) or storage completions are waiting
    /// ([`crate::storage::Engine::has_completions`]); if so they are
    /// processed as a kick or the completion eventfd would, and the budget
    /// starts again. Returns once the budget runs out with nothing found;
    /// kicks and the completion eventfd stay armed, so nothing is lost to
    /// epoll. While polling, the driver's kicks are suppressed (no
    /// NO_NOTIFY flag / avail event update); they are enabled again, and
    /// the ring checked once more, before returning.
    ///
    /// Bounded whatever the driver does: at most `POLL_CAP_FACTOR` (10) ×
    /// the maximum budget in all, and no polling when the ring is not ready
    /// or disabled, the worker was abandoned, or a ring fault is set. No
    /// polling either while the engine's copier thread has copies in hand
    /// ([`crate::storage::Engine::copying`]).
    ///
    /// The budget adapts, as QEMU's `aio_poll` does: it starts at 0 (no
    /// polling). When an epoll wake-up after a poll found work no later than
    /// the maximum budget after the poll's last work, and later than the
    /// budget, a longer poll would have caught it: the budget doubles (from
    /// 4 µs), up to the maximum. When a poll ran out of budget and nothing
    /// came within the maximum budget, the poll was wasted: the budget
    /// halves (below 4 µs it is 0). Judging the idle poll at the next
    /// wake-up rather than at once keeps a budget shorter than the gap
    /// between requests from being halved and doubled forever.
    pub fn poll(&mut self, vring: &Vring) {
        if self.poller.max.is_zero() {
            return;
        }
        if self.engine.copying() {
            // The copier thread signals when done; spinning here would take
            // its core. Not an idle poll: the budget is not judged.
            self.poller.idle_since = None;
            return;
        }
        self.poller.adapt();
        let start = Instant::now();
        if self.fault.is_some() || !self.ring_ready(vring) {
            return;
        }
        let budget = self.poller.budget;
        self.poller.idle_since = Some(start);
        if budget.is_zero() {
            return;
        }
        let cap = start + self.poller.max * POLL_CAP_FACTOR;
        let mut deadline = start + budget;
        if let Err(e) = vring.disable_notification() {
            log::debug!("queue {}: cannot disable notifications: {e}", self.index);
        }
        self.poller.active = true;
        while let Some(chains) = self.poll_avail(vring) {
            let before = self.poller.work;
            if chains {
                self.process_queue(vring);
            }
            if self.engine.has_completions() {
                self.complete(vring);
            }
            let now = Instant::now();
            // Found work only if something was popped or reaped: a chain
            // that cannot be popped does not keep the poll going.
            if self.poller.work != before {
                self.poller.idle_since = Some(now);
                deadline = now + budget;
            }
            if now >= deadline || now >= cap {
                break;
            }
            std::hint::spin_loop();
        }
        self.poller.active = false;
        if self.abandoned {
            return;
        }
        // Kicks on again; what came meanwhile is popped now.
        match vring.enable_notification() {
            Ok(true) => {
                self.process_queue(vring);
                self.poller.idle_since = Some(Instant::now());
            }
            Ok(false) => {}
            Err(_) if self.ring_ready(vring) => self.set_fault(Some(RingFault::Unreachable)),
            Err(_) => {}
        }
    }

    /// The current poll budget.
    pub fn poll_budget(&self) -> Duration {
        self.poller.budget
    }
}
