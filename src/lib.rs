//! pinblk: a vhost-user-blk backend that does DMA straight into and out of
//! guest memory and models the Linux kernel's pinned-page machinery around it.
//!
//! Layout, one concern per module:
//! - [`transport`]: vhost-user protocol and virtio-blk wire format (descriptor
//!   chains, config space, features).
//! - [`worker`]: the per-virtqueue data path from descriptor chain to io_uring and back.
//! - [`storage`]: the image file.
//! - [`pin`]: the pinned-DMA model (pin tracker, conflict detection).
//! - [`integrity`]: per-block checksums of every write and their store.
//! - [`device`]: per-device state and counters.

pub mod cli;
pub mod device;
pub mod integrity;
pub mod pin;
pub mod storage;
pub mod transport;
pub mod worker;
