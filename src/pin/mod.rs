//! Pinned-DMA model (docs/DESIGN.md §1, §3, §8): pin tracking of guest pages under DMA.
//!
//! Every in-flight request pins the guest pages of its data buffer when its
//! descriptor chain is popped ([`PinTracker::pin`], the counterpart of
//! `pin_user_pages()` / FOLL_PIN in mm/gup.c) and unpins them when its used
//! element is pushed ([`PinTracker::unpin`], `unpin_user_page()`). A guest page
//! is 4 KiB of guest-physical memory named by its GPA >> 12
//! ([`GUEST_PAGE_SHIFT`]).
//!
//! # Structure
//!
//! - Per guest page, one `AtomicU64` holds two pin counts: the low 32 bits count
//!   [`Direction::DeviceWrite`] pins (READ requests), the high 32 bits
//!   [`Direction::DeviceRead`] pins (WRITE requests). This is the kernel's
//!   per-page pin count (`GUP_PIN_COUNTING_BIAS` in the page refcount), read by
//!   [`PinTracker::maybe_pinned`] like `folio_maybe_dma_pinned()`. The counters
//!   live in lazily allocated 1 GiB chunks (2 MiB of counters each) for GPAs
//!   below 128 TiB, and in a mutex-protected hash map above that.
//! - Per virtqueue, a registry (a mutex-protected slab) of in-flight pins says
//!   *by whom*: request id, direction, guest-physical ranges, start time. A
//!   queue's mutex is taken by its own worker on pin/unpin and by other queues
//!   only on the conflict path, so it is uncontended when there is no conflict.
//! - Counters in guest pages ([`PinCounters`]): the counterparts of
//!   `nr_foll_pin_acquired` / `nr_foll_pin_released` (kept per queue, under
//!   that queue's registry mutex), plus current and peak pinned pages (one
//!   shared relaxed atomic each) and long-term pins.
//!
//! # Protocol for the data path
//!
//! 1. `let h = tracker.pin(queue, id, dir, &req.data);` when the chain is popped.
//! 2. `let conflicts = tracker.check(&h, &req.data);` (R1 / R2 / long-term).
//!    Pin *before* checking: of two concurrent conflicting requests on two
//!    queues, at least one then sees the other (both directions of a page share
//!    one atomic word, and a pin is registered before its counters are raised).
//! 3. `tracker.mark_submitted(&h);` right before the I/O goes to storage (the
//!    stall policy only waits on submitted pins: no wait cycle is possible).
//! 4. `tracker.unpin(h);` when the used element is pushed.
//!
//! See [`PinTracker`] for long-term pins and for the non-blocking stall support.

mod pages;
pub mod policy;
mod tracker;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

pub use tracker::{
    PagePins, PinConflict, PinCounters, PinHandle, PinRef, PinTracker, PinnedBy, Waker,
};

pub use crate::guest::{GUEST_PAGE_SHIFT, GUEST_PAGE_SIZE};
pub use crate::rule::Rule;

/// Direction of the DMA a pin covers, named from the device's side.
///
/// Kernel counterpart: the DMA direction of a pinned page (`DMA_FROM_DEVICE` /
/// `DMA_TO_DEVICE`); FOLL_WRITE is set for [`Direction::DeviceWrite`].
/// Serialized (reports) as `"DeviceWrite"` / `"DeviceRead"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Direction {
    /// The device writes guest memory: a READ request (`VIRTIO_BLK_T_IN`), the
    /// pinned pages are its destination. Kernel: `DMA_FROM_DEVICE`.
    DeviceWrite,
    /// The device reads guest memory: a WRITE request (`VIRTIO_BLK_T_OUT`), the
    /// pinned pages are its source. Kernel: `DMA_TO_DEVICE`.
    DeviceRead,
}

impl Direction {
    /// Short name used in logs ("DeviceWrite" / "DeviceRead").
    pub fn name(&self) -> &'static str {
        match self {
            Direction::DeviceWrite => "DeviceWrite",
            Direction::DeviceRead => "DeviceRead",
        }
    }
}
