//! The virtio-blk device type (virtio 1.2 §5.2): a descriptor chain parsed
//! into a typed request ([`chain`]) and the device's configuration space and
//! feature bits ([`config`]).

pub mod chain;
pub mod config;
