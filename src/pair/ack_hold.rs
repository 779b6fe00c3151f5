//! Source PUBACKs that wait a little (sans-IO). On a pair that carries a message every few
//! milliseconds (a pool spread over many connections, e.g. 200 pairs paced at 200 PUBLISH/s
//! each), every PUBACK to the source was its own write: on loopback that `sendto` is the
//! largest single cost per message, since the sender also pays for the receiving socket's TCP
//! work. Here an ack written into an otherwise empty buffer may wait up to
//! `brokers.<source>.ack_delay` (off by default) for the next ones, so that several leave in
//! one write.
//!
//! Nothing waits for the target: the message was forwarded (and acknowledged by the target)
//! before its ack to the source exists; only the source learns it a few milliseconds later.
//! What that costs is bounded by the caller: the source's window (acks held count as still in
//! flight there), and a bridge killed meanwhile, whose held acks the source resends (QoS 1
//! duplicates, as for any ack lost with a connection). The machine does not hold while it
//! drains, parks or spools, nor once a quarter of the source's window waits.

use std::time::{Duration, Instant};

/// The acks waiting in one write buffer.
#[derive(Debug, Clone, Default)]
pub struct AckHold {
    /// How long an ack may wait for others to join it (zero: not at all).
    delay: Duration,
    since: Option<Instant>,
    acks: usize,
    /// The buffer's length if nothing but the held acks is in it.
    bytes: usize,
}

impl AckHold {
    pub fn new(delay: Duration) -> Self {
        AckHold {
            delay,
            ..AckHold::default()
        }
    }

    /// An ack of `bytes` went into a write buffer that held `before` bytes.
    pub fn added(&mut self, now: Instant, before: usize, bytes: usize) {
        if self.delay.is_zero() {
            return; // off (the default): nothing to track on the per-message path
        }
        if before == 0 {
            *self = AckHold {
                delay: self.delay,
                since: Some(now),
                acks: 1,
                bytes,
            };
        } else if self.since.is_some() && before == self.bytes {
            self.acks += 1;
            self.bytes += bytes;
        }
        // Otherwise something else waits in the buffer: it leaves now, acks and all.
    }

    /// Acks waiting now.
    pub fn acks(&self) -> usize {
        if self.since.is_some() { self.acks } else { 0 }
    }

    /// Bytes of the buffer went out, or something that must not wait went in: nothing waits
    /// any more.
    pub fn clear(&mut self) {
        *self = AckHold::new(self.delay);
    }

    /// When the oldest held ack must leave.
    pub fn due(&self) -> Option<Instant> {
        self.since.map(|t| t + self.delay)
    }

    /// Whether a buffer of `len` bytes may wait, holding at most `limit` acks.
    pub fn holds(&self, now: Instant, len: usize, limit: usize) -> bool {
        self.since.is_some_and(|t| now < t + self.delay)
            && len > 0
            && len == self.bytes
            && self.acks < limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACK: usize = 4;
    const ACK_HOLD: Duration = Duration::from_millis(10);

    #[test]
    fn acks_wait_together_until_the_hold_ends() {
        let t0 = Instant::now();
        let mut h = AckHold::new(ACK_HOLD);
        assert!(!h.holds(t0, 0, 8), "nothing to hold");
        h.added(t0, 0, ACK);
        assert!(h.holds(t0, ACK, 8));
        h.added(t0 + Duration::from_millis(3), ACK, ACK);
        assert_eq!(h.acks(), 2);
        assert_eq!(
            h.due(),
            Some(t0 + ACK_HOLD),
            "the oldest ack sets the deadline"
        );
        assert!(h.holds(t0 + ACK_HOLD - Duration::from_nanos(1), 2 * ACK, 8));
        assert!(!h.holds(t0 + ACK_HOLD, 2 * ACK, 8), "due: leaves");
    }

    #[test]
    fn without_a_delay_nothing_waits() {
        let t0 = Instant::now();
        let mut h = AckHold::new(Duration::ZERO);
        h.added(t0, 0, ACK);
        assert!(!h.holds(t0, ACK, 8));
    }

    #[test]
    fn a_full_hold_leaves_at_once() {
        let t0 = Instant::now();
        let mut h = AckHold::new(ACK_HOLD);
        for i in 0..3 {
            h.added(t0, i * ACK, ACK);
        }
        assert!(h.holds(t0, 3 * ACK, 4));
        h.added(t0, 3 * ACK, ACK);
        assert!(!h.holds(t0, 4 * ACK, 4), "the limit of acks is reached");
        assert!(!h.holds(t0, 4 * ACK, 0), "a limit of 0 holds nothing");
    }

    #[test]
    fn anything_else_in_the_buffer_takes_the_acks_along_now() {
        let t0 = Instant::now();
        let mut h = AckHold::new(ACK_HOLD);
        h.added(t0, 0, ACK);
        // A PINGREQ (2 bytes) joins the buffer: it is not an ack and must not wait.
        assert!(!h.holds(t0, ACK + 2, 8));
        h.added(t0, ACK + 2, ACK);
        assert!(!h.holds(t0, 2 * ACK + 2, 8), "still not only acks");
        // A buffer with other bytes first never starts a hold.
        let mut h = AckHold::new(ACK_HOLD);
        h.added(t0, 2, ACK);
        assert_eq!(h.acks(), 0);
        assert!(!h.holds(t0, 2 + ACK, 8));
    }

    #[test]
    fn a_write_or_a_cleared_buffer_ends_the_hold() {
        let t0 = Instant::now();
        let mut h = AckHold::new(ACK_HOLD);
        h.added(t0, 0, ACK);
        h.clear();
        assert_eq!(h.due(), None);
        assert!(!h.holds(t0, ACK, 8));
        // The connection went (buffer cleared) while acks were held: the next ack into the
        // empty buffer starts afresh rather than being mistaken for "something else".
        h.added(t0, 0, ACK);
        h.added(t0, ACK, ACK);
        h.added(t0 + Duration::from_millis(1), 0, ACK);
        assert_eq!(h.acks(), 1);
        assert_eq!(h.due(), Some(t0 + Duration::from_millis(1) + ACK_HOLD));
    }
}
