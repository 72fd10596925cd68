//! Storage: the image ([`image`], a file or a block device probed by
//! [`blockdev`]) and the engines that move data between it
//! and guest memory ([`engine`]; which one carries READ and WRITE: [`aio`]).
//!
//! The data path never builds io_uring submissions itself: it hands an
//! [`engine::Op`] with a typed [`engine::Tag`] to an [`engine::Engine`] and
//! later reaps `(Tag, result)` completions (docs/DESIGN.md §6).

pub mod aio;
pub mod blockdev;
pub mod engine;
pub mod image;

pub use aio::{Aio, AioChoice, EngineKind};
#[cfg(test)]
pub use engine::FakeHandle;
pub use engine::{CrcSink, Engine, Op, Tag};
pub use image::{Image, ImageOptions, StorageError};
