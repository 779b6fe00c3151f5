//! Live counters of one pair, written by its driver and read by the summary log and metrics.
//! Plain atomics: one writer per pair, readers never block it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

#[derive(Debug, Default)]
pub struct PairStats {
    pub received: AtomicU64,
    pub forwarded: AtomicU64,
    pub bytes_forwarded: AtomicU64,
    pub dropped_refused: AtomicU64,
    pub dropped_invalid_topic: AtomicU64,
    pub dropped_qos0_target_down: AtomicU64,
    pub redeliveries: AtomicU64,
    /// QoS ≥ 1 messages held now.
    pub in_flight: AtomicU64,
    /// The most ever held at once.
    pub in_flight_max: AtomicU64,
    /// The current window (target Receive Maximum capped by `max_inflight`).
    pub window: AtomicU64,
    pub source_up: AtomicBool,
    pub target_up: AtomicBool,
    /// All SUBACKs of the current source connection received and successful.
    pub subscribed: AtomicBool,
    pub source_reconnects: AtomicU64,
    pub target_reconnects: AtomicU64,
    /// Milliseconds since the process started at the last ack progress.
    pub last_progress_ms: AtomicU64,
}

impl PairStats {
    pub fn get(v: &AtomicU64) -> u64 {
        v.load(Relaxed)
    }

    pub(crate) fn set(v: &AtomicU64, x: u64) {
        v.store(x, Relaxed);
    }

    pub(crate) fn raise(v: &AtomicU64, x: u64) {
        v.fetch_max(x, Relaxed);
    }

    pub(crate) fn add(v: &AtomicU64, x: u64) {
        v.fetch_add(x, Relaxed);
    }

    pub fn ready(&self) -> bool {
        self.source_up.load(Relaxed)
            && self.target_up.load(Relaxed)
            && self.subscribed.load(Relaxed)
    }
}
