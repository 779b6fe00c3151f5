//! The durable spool (SPEC 4.9, issue #15): per pair, an append-only log of the messages a
//! pair took from its source, so that they can be acknowledged to the source once on disk and
//! forwarded to the target later, in order, after outages longer than a broker's own queue.
//!
//! `record` is the on-disk format and the scan that recovers from torn or damaged data (pure);
//! `log` is the directory of segments with group commit, cursor and lock (blocking file I/O,
//! run off the async runtime).

pub mod log;
pub mod record;
pub mod startup;
pub mod writer;

pub use self::log::{Log, LogOptions};
pub use self::record::{Damage, Record};
pub use self::writer::{LogGauges, Reply, Spool};
