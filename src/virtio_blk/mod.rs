//! The virtio-blk device type (virtio 1.2 §5.2): a descriptor chain parsed
//! into a typed request ([`chain`]) and the device's configuration space and
//! feature bits ([`config`]).

pub mod chain;
pub mod config;
pub mod request;

#[cfg(test)]
mod ring_access_tests;
#[cfg(test)]
pub(crate) mod test_util;

pub use request::{parse, Command, Limits, Refused, Request, RequestError, Segment};
