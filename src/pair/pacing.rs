//! Pacing that keeps a connection within a broker's per-connection quotas (PUBLISH/s and
//! bytes/s, e.g. BifroMQ's 200 PUBLISH/s and 512 KiB/s): the pair waits instead of being
//! throttled or disconnected by the broker. Pure: the caller passes the time.
//!
//! PUBLISH/s is kept over every span of a second, not on average: BifroMQ counts per whole
//! second of its own clock (phase unknown to us) and discards what is over, silently on MQTT
//! 3.x (no PUBACK: the message waits for the next reconnect) and with DISCONNECT 0x96 on
//! MQTT 5. A token bucket with a second's burst lets up to twice the rate into one of its
//! seconds (a full bucket, then the refill); a window over the last `rate` sends cannot.
//! Bytes/s stay a token bucket: traffic shaping delays, it does not discard.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

/// The span over which at most `rate` PUBLISH packets go: a second, and a margin for the
/// network to bunch packets up on the way (a delayed first packet shortens the span the
/// broker sees). Costs 2 % of the rate.
pub const PUBLISH_SPAN: Duration = Duration::from_millis(1_020);

/// At most `limit` events in any `span`: the times of the last `limit` sends.
#[derive(Debug, Clone)]
pub struct SpanLimit {
    limit: usize,
    span: Duration,
    sent: VecDeque<Instant>,
}

impl SpanLimit {
    pub fn new(limit: u32, span: Duration) -> Self {
        let limit = limit.max(1) as usize;
        SpanLimit {
            limit,
            span,
            sent: VecDeque::with_capacity(limit),
        }
    }

    /// When the next event may happen.
    pub fn ready_at(&self, now: Instant) -> Instant {
        if self.sent.len() < self.limit {
            return now;
        }
        self.sent
            .front()
            .map_or(now, |first| (*first + self.span).max(now))
    }

    pub fn ready(&self, now: Instant) -> bool {
        self.ready_at(now) <= now
    }

    pub fn spend(&mut self, now: Instant, events: u32) {
        for _ in 0..events {
            if self.sent.len() == self.limit {
                self.sent.pop_front();
            }
            self.sent.push_back(now);
        }
    }
}

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
    publishes: Option<SpanLimit>,
    bytes: Option<Bucket>,
}

impl Pacer {
    pub fn new(publish_rate: Option<u32>, byte_rate: Option<u64>, now: Instant) -> Self {
        Pacer {
            publishes: publish_rate
                .filter(|r| *r > 0)
                .map(|r| SpanLimit::new(r, PUBLISH_SPAN)),
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
            b.spend(now, publishes);
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

    /// A sender as eager as the pacer lets it be, for `secs`: the times it sent at.
    fn eager(p: &mut Pacer, start: Instant, secs: u64) -> Vec<Instant> {
        let mut now = start;
        let mut sent = Vec::new();
        while now < start + Duration::from_secs(secs) {
            if p.ready(now) {
                p.spend(now, 1, 100);
                sent.push(now);
            } else {
                now = p.ready_at(now).max(now + Duration::from_micros(1));
            }
        }
        sent
    }

    /// Over any second, never more than the rate; over a long run, the rate less the margin.
    #[test]
    fn two_hundred_per_second_is_two_hundred_in_every_second() {
        let start = Instant::now();
        let mut p = Pacer::new(Some(200), None, start);
        let sent = eager(&mut p, start, 10);
        for (i, t) in sent.iter().enumerate() {
            let within = sent[i..]
                .iter()
                .take_while(|u| **u < *t + Duration::from_secs(1))
                .count();
            assert!(within <= 200, "{within} within a second of send {i}");
        }
        assert!(
            (1_900..=2_000).contains(&sent.len()),
            "{} in 10 s at 200/s",
            sent.len()
        );
    }

    /// BifroMQ's counter per whole second of its own clock, at any phase against ours:
    /// nothing the pacer lets through is over it.
    #[test]
    fn a_paced_sender_is_never_over_a_per_second_counter_at_any_phase() {
        let start = Instant::now();
        let mut p = Pacer::new(Some(200), None, start);
        // Idle first (a full allowance), then eager, then idle and eager again.
        let mut sent = eager(&mut p, start + Duration::from_millis(700), 3);
        sent.extend(eager(&mut p, start + Duration::from_millis(5_300), 3));
        for phase_ms in (0..1_000).step_by(7) {
            let mut per_second = std::collections::HashMap::<u128, u32>::new();
            for t in &sent {
                let since = (*t - start).as_millis() + phase_ms;
                *per_second.entry(since / 1_000).or_default() += 1;
            }
            let most = per_second.values().max().copied().unwrap_or(0);
            assert!(most <= 200, "phase {phase_ms} ms: {most} in one second");
        }
    }

    /// A token bucket with a second's burst, which this replaced, lets 400 into one second.
    #[test]
    fn a_token_bucket_would_be_over_a_per_second_counter() {
        let start = Instant::now();
        let mut b = Bucket::new(200.0, 1.0, start);
        let mut now = start;
        let mut in_first_second = 0;
        while now < start + Duration::from_secs(1) {
            if b.ready(now) {
                b.spend(now, 1.0);
                in_first_second += 1;
            } else {
                now = b.ready_at(now);
            }
        }
        assert!(in_first_second > 390, "{in_first_second}");
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
