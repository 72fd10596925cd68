//! Kick handling (issue 13, docs/DESIGN.md §8 "Kicks are bounded"): pops
//! the chains the driver made available, bounded whatever the driver
//! writes into the avail ring: at most the queue size requests in flight,
//! at most `POP_ROUNDS` rounds per kick, nothing from a ring that is not
//! ready, and a ring fault logged once per episode.

use std::num::Wrapping;

use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;

use super::{QueueWorker, Vring};

/// Rounds of popping one kick may take under EVENT_IDX while the driver
/// keeps adding chains; then the worker lets go of its lock (a ring stop may
/// be waiting for it) and goes on from its completion eventfd.
const POP_ROUNDS: usize = 4;

/// Why a ring cannot be served (virtio 1.2 §2.7: a driver error; the device
/// stops using the ring until it is set up again, and logs it once).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RingFault {
    /// The avail `idx` is more than the queue size ahead of the device's
    /// next index (virtio 1.2 §2.7.6: at most queue size entries are available).
    AvailAhead {
        /// The driver's avail `idx`.
        avail: u16,
        /// The device's next avail index.
        next: u16,
        /// Queue size.
        size: u16,
    },
    /// The avail or used ring cannot be read or written (not in guest memory).
    Unreachable,
    /// More requests in flight than the queue has descriptors: the driver
    /// made a head available again before it was used (virtio 1.2 §2.7.13).
    Overcommitted,
}

/// What the avail ring holds for the device.
enum Avail {
    /// This many chains to pop (at most the queue size).
    Pending(u16),
    /// Nothing.
    Nothing,
    /// The ring is not ready (being stopped, not yet set up) or disabled, or
    /// the worker was abandoned: nothing may be popped.
    NotReady,
    /// Nothing can be popped because of a driver error.
    Fault(RingFault),
}

impl QueueWorker {
    /// Handles a kick: pops every available descriptor chain and starts it.
    ///
    /// Bounded whatever the driver writes: at most the queue size chains in
    /// flight, at most `POP_ROUNDS` (4) rounds of popping per call (the rest
    /// is popped from the completion eventfd), and nothing popped from a
    /// ring that is not ready (being stopped) or whose avail index is
    /// inconsistent: that is logged once, not per kick.
    pub fn process_queue(&mut self, vring: &Vring) {
        if self.vring.is_none() {
            self.vring = Some(vring.clone());
        }
        self.resubmit_inflight(vring);
        self.pop_pending = false;
        for round in 1..=POP_ROUNDS {
            if self.event_idx {
                if let Err(e) = vring.disable_notification() {
                    log::debug!("queue {}: cannot disable notifications: {e}", self.index);
                }
            }
            if self.pop_available(vring).is_none() {
                // Nothing can be popped although the avail index may be
                // ahead (ring stopping, a fault, the in-flight cap): looping
                // would spin under the worker's lock (issue 13 findings 1-2).
                if self.event_idx && !self.abandoned {
                    let _ = vring.enable_notification();
                }
                break;
            }
            // A poll (poll.rs) watches the avail index itself: kicks stay
            // off until it ends.
            if !self.event_idx || self.poller.active {
                break;
            }
            match vring.enable_notification() {
                // More was made available meanwhile: pop it, a few rounds at most.
                Ok(true) if round < POP_ROUNDS => continue,
                Ok(true) => {
                    self.pop_pending = true;
                    let _ = self.engine.completion_fd().write(1);
                }
                Ok(false) => {}
                Err(_) => self.set_fault(Some(RingFault::Unreachable)),
            }
            break;
        }
        self.engine.submit();
        if self.engine.completes_inline() {
            self.reap();
        }
        self.signal(vring);
    }

    /// Pops and starts the chains the avail ring holds, up to the in-flight
    /// cap (the queue size); returns how many, or `None` if nothing can be
    /// popped although chains may be available (ring not ready, a fault,
    /// the cap).
    fn pop_available(&mut self, vring: &Vring) -> Option<usize> {
        let (n, size) = match self.avail(vring) {
            (Avail::Pending(n), size) => (n, size),
            (Avail::Nothing, _) => return Some(0),
            (Avail::NotReady, _) => return None,
            (Avail::Fault(f), _) => {
                self.set_fault(Some(f));
                return None;
            }
        };
        let mut popped = 0;
        for _ in 0..n {
            if self.jobs.len() >= usize::from(size) {
                self.set_fault(Some(RingFault::Overcommitted));
                self.pop_pending = true;
                return (popped > 0).then_some(popped);
            }
            // Snapshot guest memory for each chain, after the avail index
            // was read, so a memory-table change is seen at once.
            let mem = self.mem.memory().into_inner();
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(chain) = chain else { break };
            self.inflight_mark(chain.head_index());
            self.start(mem, chain);
            popped += 1;
        }
        if popped > 0 {
            self.poller.work += popped as u64;
            self.set_fault(None);
        }
        Some(popped)
    }

    /// For a poll: `Some(true)` if chains can be popped now, `Some(false)`
    /// if none are available (or the in-flight cap is reached), `None` if
    /// polling must stop (ring not ready or disabled, worker abandoned, a
    /// fault). No system call.
    pub(super) fn poll_avail(&self, vring: &Vring) -> Option<bool> {
        if self.fault.is_some() {
            return None;
        }
        match self.avail(vring) {
            (Avail::Pending(_), size) => Some(self.jobs.len() < usize::from(size)),
            (Avail::Nothing, _) => Some(false),
            _ => None,
        }
    }

    /// The ring is ready and enabled and the worker not abandoned.
    pub(super) fn ring_ready(&self, vring: &Vring) -> bool {
        let state = vring.get_ref();
        !self.abandoned && state.get_queue().ready() && state.is_enabled()
    }

    /// Reads the avail index and judges it against the device's next index
    /// and the queue size (virtio 1.2 §2.7.6); also the queue size.
    fn avail(&self, vring: &Vring) -> (Avail, u16) {
        if self.abandoned {
            return (Avail::NotReady, 0);
        }
        let state = vring.get_ref();
        let q = state.get_queue();
        let size = q.size();
        // Not ready (stopped by GET_VRING_BASE, or not set up) or disabled
        // (SET_VRING_ENABLE 0: "the back-end must not pass data to/from the
        // ring", vhost-user spec, "Ring states"): nothing may be popped, also
        // not from a completion with chains left over.
        if !q.ready() || !state.is_enabled() {
            return (Avail::NotReady, size);
        }
        let mem = self.mem.memory();
        let avail = match q.avail_idx(&*mem, std::sync::atomic::Ordering::Acquire) {
            Ok(i) => i,
            Err(_) => return (Avail::Fault(RingFault::Unreachable), size),
        };
        let ahead = (avail - Wrapping(q.next_avail())).0;
        let a = if ahead == 0 {
            Avail::Nothing
        } else if ahead > size {
            Avail::Fault(RingFault::AvailAhead {
                avail: avail.0,
                next: q.next_avail(),
                size,
            })
        } else {
            Avail::Pending(ahead)
        };
        (a, size)
    }

    /// Records the ring's fault (`None`: served again), logging a new one once.
    pub(super) fn set_fault(&mut self, f: Option<RingFault>) {
        // One line per kind of fault, not per value a driver may cycle through.
        if f.as_ref().map(std::mem::discriminant) == self.fault.as_ref().map(std::mem::discriminant)
        {
            return;
        }
        match f {
            Some(RingFault::AvailAhead { avail, next, size }) => log::warn!(
                "queue {}: driver error: avail index {avail} is more than the queue size \
                 ({size}) ahead of the next index {next}; nothing popped until it is consistent",
                self.index
            ),
            Some(RingFault::Unreachable) => log::warn!(
                "queue {}: driver error: the avail or used ring is not in guest memory; \
                 nothing popped until it is",
                self.index
            ),
            Some(RingFault::Overcommitted) => log::warn!(
                "queue {}: driver error: more requests made available than the queue has \
                 entries while {} are in flight; the rest waits for completions",
                self.index,
                self.jobs.len()
            ),
            None if self.fault != Some(RingFault::Overcommitted) => {
                log::info!("queue {}: ring served again", self.index)
            }
            None => {}
        }
        self.fault = f;
    }
}
