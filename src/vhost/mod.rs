//! The vhost-user side: the [`backend`] of one connection (features,
//! config space reads, one worker thread per virtqueue) and the [`server`]
//! (the socket, one daemon per connection, signals).

pub mod backend;
pub mod server;
