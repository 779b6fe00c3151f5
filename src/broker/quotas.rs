//! Per-connection quotas as BifroMQ enforces them by default, for the embedded broker's
//! BifroMQ profile (`BrokerOptions::bifromq`): what a bridge meets on the real broker, without
//! a JVM cluster in the test. Pure: the caller passes the time.
//!
//! How BifroMQ (3.x) behaves, read from its source:
//! - `MsgPubPerSec` (200): `MPSThrottler`, a counter per whole second of the broker's clock,
//!   not a sliding window or a token bucket. A PUBLISH over it is discarded: on MQTT 3.x
//!   silently (no PUBACK, no PUBREC: the sender's packet id stays in use until it resends after
//!   a reconnect), on MQTT 5 with DISCONNECT 0x96 Message Rate Too High.
//! - `InBoundBandWidth` / `OutBoundBandWidth` (512 KiB/s): netty's traffic shaping, which stops
//!   reading (or delays writing) while the connection is ahead of its rate: TCP pushes back.
//! - `ReceivingMaximum` (200): advertised to MQTT 5 clients; more unacknowledged publishes
//!   than that is DISCONNECT 0x93.
//! - `MaxTopicFiltersPerSub` (10): a SUBSCRIBE with more filters closes the connection (MQTT 5:
//!   DISCONNECT 0x98 Administrative Action).
//! - `MaxSharedGroupMembers` (200): one more member is refused in its SUBACK (0x80; MQTT 5:
//!   0x97 Quota Exceeded).
//! - `SessionInboxSize` (1,000): a session's queue; beyond it messages are dropped.

use std::time::{Duration, Instant};

/// The quotas of every connection to one broker; `None`: no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quotas {
    /// PUBLISH packets a connection may send per second of the broker's clock.
    pub publish_rate: Option<u32>,
    /// Bytes per second the broker reads from one connection.
    pub inbound_bytes: Option<u64>,
    /// Bytes per second the broker writes to one connection.
    pub outbound_bytes: Option<u64>,
    /// Topic filters one SUBSCRIBE may carry.
    pub max_filters_per_subscribe: Option<usize>,
    /// Members one shared subscription group may have.
    pub max_shared_group_members: Option<usize>,
}

impl Quotas {
    /// BifroMQ's defaults (`MsgPubPerSec`, `InBoundBandWidth`, `OutBoundBandWidth`,
    /// `MaxTopicFiltersPerSub`, `MaxSharedGroupMembers`).
    pub const BIFROMQ: Quotas = Quotas {
        publish_rate: Some(200),
        inbound_bytes: Some(512 * 1024),
        outbound_bytes: Some(512 * 1024),
        max_filters_per_subscribe: Some(10),
        max_shared_group_members: Some(200),
    };
}

/// BifroMQ's `MPSThrottler`: at most `limit` PUBLISH packets in each whole second of the
/// broker's clock (seconds counted from `origin`). Bursts across a second's edge pass, so
/// a sender must keep *every* second-long span within the limit to be safe.
#[derive(Debug, Clone)]
pub(crate) struct PublishCounter {
    limit: u32,
    origin: Instant,
    second: u64,
    count: u32,
}

impl PublishCounter {
    /// `origin`: where the broker's seconds start (its own start, as `System.nanoTime()` has
    /// an arbitrary origin: the sender cannot know the phase).
    pub fn new(limit: u32, origin: Instant) -> Self {
        PublishCounter {
            limit: limit.max(1),
            origin,
            second: u64::MAX,
            count: 0,
        }
    }

    /// Counts one PUBLISH; false if it is over the limit (discard it).
    pub fn pass(&mut self, now: Instant) -> bool {
        let second = now.saturating_duration_since(self.origin).as_secs();
        if second != self.second {
            self.second = second;
            self.count = 1;
            return true;
        }
        if self.count >= self.limit {
            return false;
        }
        self.count += 1;
        true
    }
}

/// Bytes at a fixed rate, as traffic shaping passes them: each transfer moves the clock on by
/// its bytes / rate; while the clock is ahead of now, reading (or writing) waits. Up to one
/// second's worth may pass at once after a quiet spell (shaping accounts per second).
#[derive(Debug, Clone)]
pub(crate) struct ByteClock {
    rate: f64,
    free_at: Instant,
}

const BURST: Duration = Duration::from_secs(1);

impl ByteClock {
    pub fn new(bytes_per_second: u64, now: Instant) -> Self {
        ByteClock {
            rate: bytes_per_second.max(1) as f64,
            free_at: now,
        }
    }

    /// Counts a transfer of `bytes` made now.
    pub fn spend(&mut self, now: Instant, bytes: usize) {
        let start = self.free_at.max(now.checked_sub(BURST).unwrap_or(now));
        self.free_at = start + Duration::from_secs_f64(bytes as f64 / self.rate);
    }

    /// How long to wait before the next transfer (`None`: go now).
    pub fn wait(&self, now: Instant) -> Option<Duration> {
        let ahead = self.free_at.checked_duration_since(now)?;
        // Ahead by less than the burst: still within this second's allowance.
        (ahead > BURST).then(|| ahead - BURST)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_counter_passes_the_limit_per_whole_second_and_no_more() {
        let t0 = Instant::now();
        let mut c = PublishCounter::new(200, t0);
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!((0..250).filter(|_| c.pass(at(100))).count(), 200);
        // Same second: still refused.
        assert!(!c.pass(at(999)));
        // The next second starts a new count: 200 more right after the edge, so 400 passed
        // within 2 ms of each other (a burst across the edge, as BifroMQ allows).
        assert_eq!((0..250).filter(|_| c.pass(at(1_001))).count(), 200);
    }

    #[test]
    fn publish_counter_phase_is_the_brokers() {
        // The count is per second of the broker's clock: bursts 0.9 s apart pass while
        // each lands in a second of its own, a second burst within one second does not.
        let t0 = Instant::now();
        let mut c = PublishCounter::new(200, t0);
        let start = t0 + Duration::from_millis(500);
        let mut refused = 0;
        for burst in 0..3u64 {
            // 200 at once at 0.5 s, 1.4 s and 2.3 s: each burst falls within one whole
            // second of the broker's clock (0, 1, 2), so all pass.
            let at = start + Duration::from_millis(900 * burst);
            refused += (0..200).filter(|_| !c.pass(at)).count();
        }
        assert_eq!(refused, 0);
        // Two bursts of 200 in the same broker second (2.6 s and 2.9 s): the second is refused.
        let at = t0 + Duration::from_millis(2_900);
        assert_eq!((0..200).filter(|_| !c.pass(at)).count(), 200);
    }

    #[test]
    fn byte_clock_allows_a_second_then_paces() {
        let t0 = Instant::now();
        let mut c = ByteClock::new(1_000, t0);
        // One second's worth goes at once.
        c.spend(t0, 1_000);
        assert_eq!(c.wait(t0), None);
        // Beyond it, the clock runs ahead: 500 more bytes wait half a second.
        c.spend(t0, 500);
        assert_eq!(c.wait(t0), Some(Duration::from_millis(500)));
        assert_eq!(c.wait(t0 + Duration::from_millis(500)), None);
        // Steady state at the rate: 100 bytes every 100 ms never wait beyond the allowance.
        let mut now = t0 + Duration::from_secs(10);
        let mut steady = ByteClock::new(1_000, now);
        for _ in 0..100 {
            steady.spend(now, 100);
            assert_eq!(steady.wait(now), None);
            now += Duration::from_millis(100);
        }
        // Twice the rate for long: waits grow until the sender is held to the rate.
        let mut fast = ByteClock::new(1_000, t0);
        let mut now = t0;
        let mut sent = 0u64;
        while now < t0 + Duration::from_secs(10) {
            match fast.wait(now) {
                Some(d) => now += d,
                None => {
                    fast.spend(now, 100);
                    sent += 100;
                    now += Duration::from_millis(50);
                }
            }
        }
        // 10 s at 1,000 B/s plus the one-second allowance.
        assert!((10_000..=11_100).contains(&sent), "{sent}");
    }
}
