//! The worker's side of vhost-user inflight I/O tracking (issue 16,
//! docs/DESIGN.md §12): each popped head is marked in the record before
//! it is parsed, its used element is put between `pre_put` and
//! `post_put`, and when the queue starts with a record that names heads
//! still in flight (pinblk died or was replaced), they are processed again,
//! oldest first, before any new avail entry.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use vhost_user_backend::VringT;
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace};

use super::{QueueWorker, Vring};
use crate::inflight::QueueInflight;

/// This queue's part of the record and the heads still to resubmit.
#[derive(Default)]
pub(super) struct Tracking {
    part: Option<QueueInflight>,
    resubmit: VecDeque<u16>,
}

impl QueueWorker {
    /// Starts tracking with `part`, this queue's part of the inflight record,
    /// when the vring starts (after `SET_VRING_KICK`): reads it against the
    /// guest's used index, sets the next avail index a used record implies
    /// (overriding `SET_VRING_BASE`, which after a crash is only the used
    /// index; a fresh record leaves it) and queues the heads still in flight for resubmission, which
    /// begins at once (the worker wakes itself; no kick is needed).
    ///
    /// # Errors
    /// The guest's used index cannot be read (rings outside guest memory).
    pub fn start_inflight(
        &mut self,
        mut part: QueueInflight,
        vring: &Vring,
    ) -> std::io::Result<()> {
        let used = vring
            .queue_used_idx()
            .map_err(|e| std::io::Error::other(format!("cannot read the used index: {e}")))?;
        let rec = part.recover(used);
        if let Some(next) = rec.next_avail {
            vring.set_queue_next_avail(next);
        }
        if !rec.resubmit.is_empty() {
            log::info!(
                "queue {}: inflight record names {} request(s) popped and not completed \
                 before the restart; processing them again, oldest first (heads {:?})",
                self.index,
                rec.resubmit.len(),
                rec.resubmit
            );
            let _ = self.engine.completion_fd().write(1);
        }
        self.tracking = Tracking {
            part: Some(part),
            resubmit: rec.resubmit.into(),
        };
        self.vring = Some(vring.clone());
        Ok(())
    }

    /// One line on a ring's indices for the start and stop logs: the next
    /// avail index pinblk will pop (from SET_VRING_BASE or the inflight
    /// record's recovery, or where it stopped), its next used index, and the avail and used `idx` fields as
    /// they are in guest memory (virtio 1.2 §2.7.6, §2.7.8). A restart or a
    /// migration that loses or repeats a request shows here first.
    pub fn ring_state(&self, vring: &Vring) -> String {
        let mem = self.mem.memory();
        let state = vring.get_ref();
        let q = state.get_queue();
        let avail = q
            .avail_idx(&*mem, Ordering::Acquire)
            .map_or_else(|e| format!("? ({e})"), |i| i.0.to_string());
        let used = q
            .used_idx(&*mem, Ordering::Acquire)
            .map_or_else(|e| format!("? ({e})"), |i| i.0.to_string());
        format!(
            "next avail {}, next used {}; in guest memory: avail idx {avail}, used idx {used}; \
             last heads made available {}; last used elements (head:len) {}",
            q.next_avail(),
            q.next_used(),
            ring_tail(&mem, q.avail_ring(), 2, q.next_avail(), q.size()),
            ring_tail(&mem, q.used_ring(), 8, q.next_used(), q.size()),
        )
    }

    /// Step 1 of the record: `head` was popped.
    pub(super) fn inflight_mark(&mut self, head: u16) {
        if let Some(p) = &mut self.tracking.part {
            p.mark(head);
        }
    }

    /// Step 2: `head`'s used element is about to be written.
    pub(super) fn inflight_pre_put(&mut self, head: u16) {
        if let Some(p) = &mut self.tracking.part {
            p.pre_put(head);
        }
    }

    /// Step 4: `head`'s used element is published.
    pub(super) fn inflight_post_put(&mut self, head: u16, vring: &Vring) {
        if let Some(p) = &mut self.tracking.part {
            let used = vring.get_ref().get_queue().next_used();
            p.post_put(head, used);
        }
    }

    /// Starts every head the record says is still in flight (already
    /// marked: not marked again, so the record keeps their order).
    pub(super) fn resubmit_inflight(&mut self, vring: &Vring) {
        while let Some(head) = self.tracking.resubmit.pop_front() {
            let mem = self.mem.memory().into_inner();
            let (desc_table, size) = {
                let state = vring.get_ref();
                let q = state.get_queue();
                (q.desc_table(), q.size())
            };
            let chain = DescriptorChain::new(mem.clone(), GuestAddress(desc_table), size, head);
            self.start(mem, chain);
        }
    }
}

/// The last [`RING_TAIL`] entries of a split ring before index `end`
/// (virtio 1.2 §2.7.6 and §2.7.8: `ring` is the guest-physical address of
/// the ring (its flags field), `stride` 2 for the avail ring's heads, 8 for the
/// used ring's `{id: le32, len: le32}`), oldest first, as `head` or
/// `head:len`. For the ring-stop and ring-start lines: comparing the two
/// sides of a migration shows whether the used ring arrived as written.
fn ring_tail(mem: &crate::guest::GuestMem, ring: u64, stride: u64, end: u16, size: u16) -> String {
    use vm_memory::Bytes;
    if size == 0 || ring == 0 {
        return "-".into();
    }
    let n = RING_TAIL.min(u64::from(size));
    let mut out = Vec::with_capacity(n as usize);
    for k in (1..=n).rev() {
        let slot = u64::from(end.wrapping_sub(k as u16) % size);
        let at = GuestAddress(ring + 4 + slot * stride);
        let entry = if stride == 8 {
            match (
                mem.read_obj::<u32>(at),
                mem.read_obj::<u32>(GuestAddress(at.0 + 4)),
            ) {
                (Ok(id), Ok(len)) => format!("{}:{}", u32::from_le(id), u32::from_le(len)),
                _ => "?".into(),
            }
        } else {
            mem.read_obj::<u16>(at)
                .map_or_else(|_| "?".into(), |h| u16::from_le(h).to_string())
        };
        out.push(entry);
    }
    format!("[{}]", out.join(" "))
}

/// How many entries of each ring the ring-stop and ring-start lines show.
const RING_TAIL: u64 = 12;
