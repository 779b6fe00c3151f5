//! mqbridge: a broker-to-broker MQTT bridge appliance.
//!
//! The core (`topic`, `pair::machine` with `pair::window`, `loops`, `message`) is sans-IO: plain
//! data in, data out, time passed in.
//! The edges (`link`, `pair::driver`, `route`, `run`) own sockets, timers and tasks.

pub mod admin;
pub mod broker;
pub mod check;
pub mod config;
pub mod demo;
pub mod link;
pub mod loops;
pub mod message;
pub mod pair;
pub mod reload;
pub mod route;
pub mod route_set;
pub mod run;
pub mod spool;
pub mod top;
pub mod topic;
