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
    /// Larger than the target's Maximum Packet Size.
    pub dropped_too_large: AtomicU64,
    /// Message Expiry ran out while held.
    pub dropped_expired: AtomicU64,
    /// Forwarded with a lower QoS than received because of the target's Maximum QoS.
    pub qos_downgraded: AtomicU64,
    /// v5 messages whose properties could not be carried to a 3.x target.
    pub properties_dropped: AtomicU64,
    /// Undeliverable messages published to the route's dead letter topic.
    pub dead_lettered: AtomicU64,
    pub redeliveries: AtomicU64,
    /// Messages from subscriptions a resumed session kept from an older config (not forwarded).
    pub stale_subscription: AtomicU64,
    /// Given up after the target closed the connection over them again and again.
    pub dropped_target_disconnects: AtomicU64,
    /// Spooled longer than `spool.max_age`.
    pub dropped_max_age: AtomicU64,
    /// Times the pair held back because of the target's per-connection quotas (load above
    /// the route's capacity).
    pub paced: AtomicU64,
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
    /// Parked by an auto-sized pool: not connected, on purpose.
    pub parked: AtomicBool,
    pub source_reconnects: AtomicU64,
    pub target_reconnects: AtomicU64,
    /// Milliseconds since the process started at the last ack progress.
    pub last_progress_ms: AtomicU64,
    /// Arrived with this bridge's own loop marker (or matched the echo digest): not forwarded.
    pub dropped_loop: AtomicU64,
    /// A retained message's copy sent because this pair (re)subscribed, which another pair (or
    /// an earlier subscription) already forwarded: not forwarded again.
    pub retained_copies: AtomicU64,
    /// Publishes sent again after the target said "not now" (0x97, 0x91).
    pub retried: AtomicU64,
    /// Dead letters over the source broker's Maximum Packet Size: not sent.
    pub dead_letters_unsendable: AtomicU64,
    /// Forwarded without RETAIN because the target has no retained messages (Retain Available 0).
    pub retain_cleared: AtomicU64,
    /// SUBACKs that granted less than the route's `qos`.
    pub subscriptions_downgraded: AtomicU64,
    /// Source receive to target ack (PUBACK, or PUBREC at QoS 2) of forwarded QoS ≥ 1 messages.
    pub forward_latency: LatencyHistogram,
    /// Milliseconds the window towards the target was full while the target was connected:
    /// the pair could have taken more from the source had the window been larger (an
    /// automatically sized pool grows on it).
    pub window_full_ms: AtomicU64,
    /// Reconnects of the target because it acknowledged later publishes and not an earlier one
    /// for `SKIPPED_ACK_GRACE`: it dropped that one without a word.
    pub skipped_acks: AtomicU64,
    /// The target's round trip in µs, from the last keep-alive PINGREQ of an idle connection to
    /// its PINGRESP (0: not measured yet).
    pub target_round_trip_us: AtomicU64,
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

    /// Parked on purpose (an auto-sized pool that shrank) counts as ready.
    pub fn ready(&self) -> bool {
        self.parked.load(Relaxed)
            || self.source_up.load(Relaxed)
                && self.target_up.load(Relaxed)
                && self.subscribed.load(Relaxed)
    }

    /// Messages not delivered, by the `reason` label of `mqbridge_messages_dropped_total`.
    /// Every reason is listed even at zero, so dashboards see the series from the start.
    pub fn drops(&self) -> [(&'static str, u64); 10] {
        let g = Self::get;
        [
            ("refused", g(&self.dropped_refused)),
            ("invalid_topic", g(&self.dropped_invalid_topic)),
            ("too_large", g(&self.dropped_too_large)),
            ("expired", g(&self.dropped_expired)),
            ("loop", g(&self.dropped_loop)),
            ("target_down_qos0", g(&self.dropped_qos0_target_down)),
            ("stale_subscription", g(&self.stale_subscription)),
            ("target_disconnects", g(&self.dropped_target_disconnects)),
            ("retained_copy", g(&self.retained_copies)),
            ("max_age", g(&self.dropped_max_age)),
        ]
    }

    /// All messages not delivered, whatever the reason.
    pub fn dropped_total(&self) -> u64 {
        self.drops().iter().map(|(_, n)| n).sum()
    }
}

/// Upper bounds (seconds) of the forward latency buckets. From well under a millisecond (both
/// brokers local) to a minute (messages held through a target outage); `+Inf` is implicit.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// A fixed-bucket histogram the pair's task records into without locks and the metrics
/// endpoint reads at scrape time: one atomic per bucket (the last is `+Inf`) and the sum.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    /// Sum of all samples in nanoseconds: integer adds stay exact and lock-free.
    sum_nanos: AtomicU64,
}

/// A copy of a [`LatencyHistogram`] at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LatencySnapshot {
    /// Samples per bucket (not cumulative), in the order of [`LATENCY_BUCKETS`], then `+Inf`.
    pub buckets: [u64; LATENCY_BUCKETS.len() + 1],
    pub sum_seconds: f64,
}

impl LatencyHistogram {
    /// Counts one sample. Negative or NaN samples (clock oddities) count as zero.
    pub fn record(&self, seconds: f64) {
        let seconds = if seconds.is_nan() {
            0.0
        } else {
            seconds.max(0.0)
        };
        let i = LATENCY_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        // `as` saturates: a sample of centuries cannot wrap the sum.
        self.sum_nanos.fetch_add((seconds * 1e9) as u64, Relaxed);
    }

    pub fn snapshot(&self) -> LatencySnapshot {
        LatencySnapshot {
            buckets: std::array::from_fn(|i| self.buckets[i].load(Relaxed)),
            sum_seconds: self.sum_nanos.load(Relaxed) as f64 / 1e9,
        }
    }
}

impl LatencySnapshot {
    /// The sample count. Derived from the buckets rather than kept apart, so `_count` always
    /// equals the `+Inf` bucket even when read while the pair records.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Adds another pair's samples (a route's histogram is the sum of its pairs').
    pub fn merge(&mut self, other: &LatencySnapshot) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a += b;
        }
        self.sum_seconds += other.sum_seconds;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_samples_land_in_the_first_bucket_that_holds_them() {
        let h = LatencyHistogram::default();
        h.record(0.0002); // ≤ 0.5 ms
        h.record(0.001); // exactly on a bound: that bucket (Prometheus `le`)
        h.record(0.003); // ≤ 5 ms
        h.record(120.0); // +Inf
        h.record(-1.0); // clock oddity: zero
        let s = h.snapshot();
        assert_eq!(s.buckets[0], 2);
        assert_eq!(s.buckets[1], 1);
        assert_eq!(s.buckets[3], 1);
        assert_eq!(s.buckets[LATENCY_BUCKETS.len()], 1);
        assert_eq!(s.count(), 5);
        assert!((s.sum_seconds - 120.0042).abs() < 1e-6, "{}", s.sum_seconds);
    }

    #[test]
    fn every_drop_reason_is_listed_and_summed() {
        let s = PairStats::default();
        PairStats::add(&s.dropped_refused, 1);
        PairStats::add(&s.dropped_qos0_target_down, 2);
        PairStats::add(&s.dropped_loop, 4);
        let reasons: Vec<_> = s.drops().iter().map(|(r, _)| *r).collect();
        assert_eq!(
            reasons,
            [
                "refused",
                "invalid_topic",
                "too_large",
                "expired",
                "loop",
                "target_down_qos0",
                "stale_subscription",
                "target_disconnects",
                "retained_copy",
                "max_age"
            ]
        );
        PairStats::add(&s.retained_copies, 8);
        assert_eq!(s.dropped_total(), 15);
    }
}
