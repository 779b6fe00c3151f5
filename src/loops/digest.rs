//! The echo digest: what this process forwarded into MQTT 3.x brokers in the last few seconds,
//! as hashes of (broker, topic, payload). A route reading from such a broker drops a message
//! found here: it is our own forward coming back. Bounded in time and in entries.

use std::{
    collections::{HashMap, VecDeque},
    hash::BuildHasher,
    time::{Duration, Instant},
};

/// Remembers recent forwards; one remembered forward suppresses one echo.
#[derive(Debug)]
pub struct EchoDigest {
    window: Duration,
    capacity: usize,
    hasher: std::collections::hash_map::RandomState,
    /// Hash → (forwards of it remembered, how many of those already matched an echo). Echoes
    /// match the oldest forwards first, so expiring the oldest also retires a matched one.
    counts: HashMap<u64, (u32, u32)>,
    /// Hashes by age, oldest first, for expiry and the capacity bound.
    order: VecDeque<(Instant, u64)>,
}

impl EchoDigest {
    /// A digest remembering forwards for `window`, at most `capacity` at once. A zero window or
    /// capacity remembers nothing.
    pub fn new(window: Duration, capacity: usize) -> Self {
        EchoDigest {
            window,
            capacity,
            hasher: Default::default(),
            counts: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    pub fn is_enabled(&self) -> bool {
        !self.window.is_zero() && self.capacity > 0
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    fn key(&self, broker: &str, topic: &str, payload: &[u8]) -> u64 {
        self.hasher.hash_one((broker, topic, payload))
    }

    /// We published `payload` on `topic` at `broker` at `now`.
    pub fn record(&mut self, now: Instant, broker: &str, topic: &str, payload: &[u8]) {
        if !self.is_enabled() {
            return;
        }
        self.expire(now);
        if self.order.len() >= self.capacity {
            self.forget_oldest();
        }
        let key = self.key(broker, topic, payload);
        self.counts.entry(key).or_default().0 += 1;
        self.order.push_back((now, key));
    }

    /// A message arrived from `broker`: true (and forgotten) if it is the echo of a recent
    /// forward of ours.
    pub fn take_echo(&mut self, now: Instant, broker: &str, topic: &str, payload: &[u8]) -> bool {
        if !self.is_enabled() {
            return false;
        }
        self.expire(now);
        let key = self.key(broker, topic, payload);
        match self.counts.get_mut(&key) {
            Some((records, taken)) if *taken < *records => {
                *taken += 1;
                true
            }
            _ => false,
        }
    }

    fn expire(&mut self, now: Instant) {
        while self
            .order
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > self.window)
        {
            self.forget_oldest();
        }
    }

    fn forget_oldest(&mut self) {
        if let Some((_, key)) = self.order.pop_front()
            && let Some((records, taken)) = self.counts.get_mut(&key)
        {
            *records -= 1;
            *taken = taken.saturating_sub(1);
            if *records == 0 {
                self.counts.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_forward_suppresses_one_echo() {
        let t = Instant::now();
        let mut d = EchoDigest::new(Duration::from_secs(10), 100);
        d.record(t, "b", "m/1", b"x");
        assert!(!d.take_echo(t, "a", "m/1", b"x"), "another broker");
        assert!(!d.take_echo(t, "b", "m/2", b"x"), "another topic");
        assert!(!d.take_echo(t, "b", "m/1", b"y"), "another payload");
        assert!(d.take_echo(t, "b", "m/1", b"x"));
        assert!(
            !d.take_echo(t, "b", "m/1", b"x"),
            "a second identical message is real"
        );
    }

    #[test]
    fn forwards_are_forgotten_after_the_window() {
        let t = Instant::now();
        let mut d = EchoDigest::new(Duration::from_secs(10), 100);
        d.record(t, "b", "m", b"x");
        assert!(!d.take_echo(t + Duration::from_secs(11), "b", "m", b"x"));
        assert!(d.is_empty());
    }

    #[test]
    fn memory_is_bounded_by_capacity() {
        let t = Instant::now();
        let mut d = EchoDigest::new(Duration::from_secs(10), 3);
        for i in 0..10u8 {
            d.record(t, "b", "m", &[i]);
        }
        assert_eq!(d.len(), 3);
        assert!(!d.take_echo(t, "b", "m", &[0]), "the oldest were forgotten");
        assert!(d.take_echo(t, "b", "m", &[9]));
    }

    #[test]
    fn a_disabled_digest_remembers_nothing() {
        let t = Instant::now();
        let mut d = EchoDigest::new(Duration::ZERO, 100);
        d.record(t, "b", "m", b"x");
        assert!(!d.take_echo(t, "b", "m", b"x"));
    }
}
