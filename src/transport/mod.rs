//! vhost-user transport: the protocol side ([`backend`], [`server`]) and the
//! virtio-blk wire format ([`config`], [`request`]).

pub mod backend;
pub mod config;
pub mod request;
pub mod server;
