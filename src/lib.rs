//! pinblk: a vhost-user-blk backend that does DMA straight into and out of
//! guest memory and models the Linux kernel's pinned-page machinery around it.
//!
//! Layout (docs/DESIGN.md §7), one concern per module; a module imports only
//! modules below it in this list (`ci/check-layers` enforces it):
//! - [`guest`], [`rule`], [`sys`]: the shared vocabulary (guest-physical
//!   ranges, sectors, guest pages; the detection rules R1–R4) and small OS
//!   helpers; [`logging`]: log lines rate-limited per kind of message;
//!   [`progress`]: progress of long operations (bar, plain lines, quiet).
//! - [`sigbus`]: guest memory the frontend can take away: region sizes
//!   checked against their files, SIGBUS on guest memory survived.
//! - [`virtio_blk`]: the virtio-blk wire format: a descriptor chain parsed
//!   into a typed request, the config space and feature bits.
//! - [`storage`]: the image and the storage engines that move data between
//!   it and guest memory (io_uring, null, a fake for tests).
//! - [`pin`]: the pinned-DMA model (pin tracker, conflict detection, policy).
//! - [`inflight`]: the vhost-user inflight I/O tracking record (restart).
//! - [`integrity`]: per-block checksums of every write and their store.
//! - [`report`]: report events (JSON Lines, human lines, counters, summary).
//! - [`device`]: one served device: options, state and counters.
//! - [`plot`]: a picture of a run, drawn from its report (`pinblk plot`).
//! - [`worker`]: the per-virtqueue data path, a state machine per request.
//! - [`vhost`]: the vhost-user side: backend, socket, connections.
//! - [`control`]: the control socket (QMP-style JSON lines) and its client.
//! - [`cli`]: the command line (only `main` uses it).

pub mod guest;
pub mod logging;
pub mod progress;
pub mod rule;
pub mod sigbus;
pub mod sys;

pub mod inflight;
pub mod integrity;
pub mod pin;
pub mod storage;
pub mod virtio_blk;

pub mod report;

pub mod device;
pub mod plot;

pub mod worker;

pub mod control;
pub mod vhost;

pub mod cli;
