//! A pair: one source connection and one target connection that live and die together.
//! `machine` is the pair's whole protocol state, sans-IO, with `window` (ack chaining and flow
//! control), `linger`, `ack_hold`, `pacing` and `share_probe` as its parts; `driver` runs it over sockets;
//! `retire` cleans up pool indexes no longer run.

pub mod ack_hold;
pub mod dead_letter;
pub mod driver;
pub mod linger;
pub mod machine;
pub mod pacing;
pub mod retire;
pub mod share_probe;
pub mod spec;
pub mod spool_io;
pub mod stats;
pub mod window;

pub use spec::{LoopGuard, PairSpec};
