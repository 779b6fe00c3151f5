//! A pair: one source connection and one target connection that live and die together.
//! `window` is the sans-IO heart (ack chaining and flow control); `driver` runs it over sockets.

pub mod driver;
pub mod linger;
pub mod pacing;
pub mod share_probe;
pub mod stats;
pub mod window;
