//! Token buckets that keep a connection within a broker's per-connection quotas (PUBLISH/s and
//! bytes/s, e.g. BifroMQ's 200 PUBLISH/s and 512 KiB/s): the pair waits for tokens instead of
//! being throttled or disconnected by the broker. Pure: the caller passes the time.

use std::time::{Duration, Instant};

/// A token bucket refilled at `rate` per second up to `burst`. Spending may go into debt (a
/// message larger than the burst still goes); the bucket then stays empty until repaid.
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// `rate` per second, bursts of at most one second's worth (at least `min_burst`).
    pub fn new(rate: f64, min_burst: f64, now: Instant) -> Self {
        let burst = rate.max(min_burst);
        Bucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
    }

    /// Whether something may be spent now (the bucket is not empty or in debt).
    pub fn ready(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= 1.0
    }

    pub fn spend(&mut self, now: Instant, amount: f64) {
        self.refill(now);
        self.tokens -= amount;
    }

    /// What may be spent now without going into debt.
    pub fn available(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.tokens.max(0.0)
    }

    /// When the bucket will next be ready.
    pub fn ready_at(&mut self, now: Instant) -> Instant {
        self.refill(now);
        if self.tokens >= 1.0 {
            now
        } else {
            // A microsecond more than the exact time, so rounding never leaves it just short.
            now + Duration::from_secs_f64((1.0 - self.tokens) / self.rate)
                + Duration::from_micros(1)
        }
    }
}

/// The quotas of one connection: PUBLISH packets per second and bytes per second, either absent.
#[derive(Debug, Clone, Default)]
pub struct Pacer {
    publishes: Option<Bucket>,
    bytes: Option<Bucket>,
}

impl Pacer {
    pub fn new(publish_rate: Option<u32>, byte_rate: Option<u64>, now: Instant) -> Self {
        Pacer {
            publishes: publish_rate
                .filter(|r| *r > 0)
                .map(|r| Bucket::new(f64::from(r), 1.0, now)),
            // A burst of at least 64 KiB so that one large message never waits forever.
            bytes: byte_rate
                .filter(|r| *r > 0)
                .map(|r| Bucket::new(r as f64, 65_536.0, now)),
        }
    }

    pub fn is_limited(&self) -> bool {
        self.publishes.is_some() || self.bytes.is_some()
    }

    /// Whether one more message may go now.
    pub fn ready(&mut self, now: Instant) -> bool {
        self.publishes.as_mut().is_none_or(|b| b.ready(now))
            && self.bytes.as_mut().is_none_or(|b| b.ready(now))
    }

    /// Accounts for one PUBLISH of `bytes` bytes (or, with `publishes == 0`, bytes alone).
    pub fn spend(&mut self, now: Instant, publishes: u32, bytes: usize) {
        if let Some(b) = self.publishes.as_mut() {
            b.spend(now, f64::from(publishes));
        }
        if let Some(b) = self.bytes.as_mut() {
            b.spend(now, bytes as f64);
        }
    }

    /// How many bytes may go now without debt, when bytes are limited: what one read of a paced
    /// socket may take, so that a large read cannot run ahead of the rate.
    pub fn byte_allowance(&mut self, now: Instant) -> Option<usize> {
        self.bytes.as_mut().map(|b| b.available(now) as usize)
    }

    /// When `ready` will next be true.
    pub fn ready_at(&mut self, now: Instant) -> Instant {
        let p = self.publishes.as_mut().map_or(now, |b| b.ready_at(now));
        let b = self.bytes.as_mut().map_or(now, |b| b.ready_at(now));
        p.max(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Over any stretch of simulated time, a paced sender never exceeds rate × time + burst.
    #[test]
    fn two_hundred_per_second_is_two_hundred_per_second() {
        let start = Instant::now();
        let mut p = Pacer::new(Some(200), None, start);
        let mut now = start;
        let mut sent = 0u32;
        while now < start + Duration::from_secs(10) {
            if p.ready(now) {
                p.spend(now, 1, 100);
                sent += 1;
            } else {
                now = p.ready_at(now).max(now + Duration::from_micros(1));
            }
        }
        assert!(
            (2000..=2201).contains(&sent),
            "{sent} in 10 s at 200/s with a burst of 200"
        );
    }

    #[test]
    fn bytes_are_paced_and_a_large_message_goes_into_debt() {
        let start = Instant::now();
        let mut p = Pacer::new(None, Some(512 * 1024), start);
        assert!(p.ready(start));
        p.spend(start, 1, 2 * 1024 * 1024); // 2 MiB: four seconds' worth
        assert!(!p.ready(start));
        let at = p.ready_at(start);
        let waited = at - start;
        assert!(
            waited > Duration::from_secs(3) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
        assert!(p.ready(at));
    }

    #[test]
    fn the_byte_allowance_is_what_is_left_of_the_burst() {
        let start = Instant::now();
        let mut p = Pacer::new(Some(100), Some(64 * 1024), start);
        assert_eq!(p.byte_allowance(start), Some(64 * 1024));
        p.spend(start, 1, 60 * 1024);
        assert_eq!(p.byte_allowance(start), Some(4 * 1024));
        p.spend(start, 1, 8 * 1024); // in debt: nothing more now
        assert_eq!(p.byte_allowance(start), Some(0));
        let later = start + Duration::from_secs(1);
        assert_eq!(p.byte_allowance(later), Some(60 * 1024));
        assert_eq!(
            Pacer::new(Some(100), None, start).byte_allowance(start),
            None
        );
    }

    #[test]
    fn no_limits_never_wait() {
        let now = Instant::now();
        let mut p = Pacer::new(None, None, now);
        assert!(!p.is_limited());
        p.spend(now, 1_000_000, usize::MAX / 2);
        assert!(p.ready(now));
    }
}
