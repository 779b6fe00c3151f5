//! Readiness of the bridge, decided from its pairs' live state by a pure function: `/readyz`
//! feeds it numbers read from `PairStats`, the tests feed it by hand. A pair is ready when both
//! connections are up and subscribed, and not stalled (messages in flight, no ack progress).

use std::{fmt, time::Duration};

/// Which pair, for the message that explains why it is not ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairId<'a> {
    pub route: &'a str,
    pub index: usize,
    pub source_broker: &'a str,
    pub target_broker: &'a str,
}

/// What readiness needs to know about one pair at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PairHealth {
    pub source_up: bool,
    pub target_up: bool,
    pub subscribed: bool,
    /// Parked on purpose by an `auto` pool that shrank: not expected to be connected.
    pub parked: bool,
    /// QoS ≥ 1 messages held.
    pub in_flight: u64,
    /// Milliseconds since process start from which a lack of acks counts: the later of the last
    /// ack progress and the moment the in-flight count rose from zero (see [`BusySince`]).
    pub waiting_since_ms: u64,
    /// With a spool (SPEC 4.9): whether it is full. A spooled pair is ready while its source
    /// is connected and its spool has room: the spool absorbs a target outage or stall.
    pub spool_full: Option<bool>,
}

/// When one pair's in-flight count was last seen rising from zero.
///
/// `last_progress_ms` alone cannot tell a stall: after an idle hour it is an hour old the very
/// moment a message arrives, and that message is not stalled. The admin task samples each pair
/// about once a second, so a stall is reported at most a sample late, and never early.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BusySince(Option<u64>);

impl BusySince {
    /// Notes the in-flight count seen at `now_ms`.
    pub fn observe(&mut self, in_flight: u64, now_ms: u64) {
        if in_flight == 0 {
            self.0 = None;
        } else if self.0.is_none() {
            self.0 = Some(now_ms);
        }
    }

    /// The moment from which no ack counts as waiting, given the pair's last ack progress.
    pub fn waiting_since(&self, last_progress_ms: u64) -> u64 {
        last_progress_ms.max(self.0.unwrap_or(0))
    }
}

/// The verdict over every pair, and one line per pair that is not ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub pairs: usize,
    pub problems: Vec<String>,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.problems.is_empty()
    }
}

impl fmt::Display for Readiness {
    /// The `/readyz` body: "ready" with the pair count, or one line per failing pair.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_ready() {
            return writeln!(f, "ready: {} pairs connected and subscribed", self.pairs);
        }
        writeln!(
            f,
            "not ready: {} of {} pairs",
            self.problems.len(),
            self.pairs
        )?;
        for p in &self.problems {
            writeln!(f, "{p}")?;
        }
        Ok(())
    }
}

/// Judges every pair at `now_ms` (milliseconds since process start): down or unsubscribed
/// connections, and messages in flight without ack progress for `stall_timeout`, are not ready.
pub fn readiness<'a>(
    pairs: impl IntoIterator<Item = (PairId<'a>, PairHealth)>,
    now_ms: u64,
    stall_timeout: Duration,
) -> Readiness {
    let stall_ms = u64::try_from(stall_timeout.as_millis()).unwrap_or(u64::MAX);
    let mut count = 0;
    let mut problems = Vec::new();
    for (id, h) in pairs {
        count += 1;
        if h.parked {
            continue;
        }
        let mut why = Vec::new();
        if !h.source_up {
            why.push(format!("source down (broker {})", id.source_broker));
        } else if !h.subscribed {
            // Only meaningful on a live source: a down source is never subscribed.
            why.push(format!(
                "source not subscribed (broker {})",
                id.source_broker
            ));
        }
        if h.spool_full == Some(true) {
            why.push("spool full (spool.max_bytes): not reading the source".to_string());
        }
        if !h.target_up && h.spool_full.is_none() {
            why.push(format!("target down (broker {})", id.target_broker));
        }
        let waited = now_ms.saturating_sub(h.waiting_since_ms);
        if h.in_flight > 0 && waited >= stall_ms && h.spool_full.is_none() {
            why.push(format!(
                "stalled for {} s: {} in flight, no ack from the target",
                waited / 1000,
                h.in_flight
            ));
        }
        if !why.is_empty() {
            problems.push(format!(
                "route {} pair {}: {}",
                id.route,
                id.index,
                why.join("; ")
            ));
        }
    }
    Readiness {
        pairs: count,
        problems,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALL: Duration = Duration::from_secs(30);

    fn id(route: &str, index: usize) -> PairId<'_> {
        PairId {
            route,
            index,
            source_broker: "edge",
            target_broker: "cloud",
        }
    }

    fn up() -> PairHealth {
        PairHealth {
            source_up: true,
            target_up: true,
            subscribed: true,
            parked: false,
            in_flight: 0,
            waiting_since_ms: 0,
            spool_full: None,
        }
    }

    /// Issue #14, hole 17: an `auto` pool's parked pairs made `/readyz` 503 for ever.
    #[test]
    fn parked_pairs_of_an_auto_pool_are_fine() {
        let parked = PairHealth {
            source_up: false,
            target_up: false,
            subscribed: false,
            parked: true,
            ..up()
        };
        let r = readiness([(id("a", 0), up()), (id("a", 1), parked)], 0, STALL);
        assert!(r.is_ready(), "{r}");
    }

    #[test]
    fn ready_when_every_pair_is_connected_and_subscribed() {
        let r = readiness([(id("a", 0), up()), (id("a", 1), up())], 100_000, STALL);
        assert!(r.is_ready());
        assert_eq!(r.to_string(), "ready: 2 pairs connected and subscribed\n");
    }

    #[test]
    fn a_down_side_is_named_with_its_broker() {
        let target_down = PairHealth {
            target_up: false,
            ..up()
        };
        let source_down = PairHealth {
            source_up: false,
            subscribed: false,
            ..up()
        };
        let r = readiness(
            [
                (id("a", 0), up()),
                (id("a", 1), target_down),
                (id("b", 0), source_down),
            ],
            0,
            STALL,
        );
        assert!(!r.is_ready());
        assert_eq!(
            r.problems,
            [
                "route a pair 1: target down (broker cloud)",
                "route b pair 0: source down (broker edge)",
            ]
        );
        assert!(r.to_string().starts_with("not ready: 2 of 3 pairs\n"));
    }

    #[test]
    fn connected_but_not_yet_subscribed_is_not_ready() {
        let h = PairHealth {
            subscribed: false,
            ..up()
        };
        let r = readiness([(id("a", 0), h)], 0, STALL);
        assert_eq!(
            r.problems,
            ["route a pair 0: source not subscribed (broker edge)"]
        );
    }

    #[test]
    fn connected_but_stalled_is_not_ready() {
        let h = PairHealth {
            in_flight: 12,
            waiting_since_ms: 10_000,
            ..up()
        };
        let before = readiness([(id("a", 0), h)], 10_000 + 29_999, STALL);
        assert!(before.is_ready(), "{before}");
        let after = readiness([(id("a", 0), h)], 10_000 + 45_000, STALL);
        assert_eq!(
            after.problems,
            ["route a pair 0: stalled for 45 s: 12 in flight, no ack from the target"]
        );
    }

    #[test]
    fn no_ack_progress_with_nothing_in_flight_is_idle_not_stalled() {
        let h = PairHealth {
            waiting_since_ms: 0,
            ..up()
        };
        assert!(readiness([(id("a", 0), h)], 3_600_000, STALL).is_ready());
    }

    #[test]
    fn a_down_target_holding_messages_reports_both() {
        let h = PairHealth {
            target_up: false,
            in_flight: 3,
            waiting_since_ms: 0,
            ..up()
        };
        let r = readiness([(id("a", 0), h)], 60_000, STALL);
        assert_eq!(
            r.problems,
            [
                "route a pair 0: target down (broker cloud); stalled for 60 s: 3 in flight, no ack from the target"
            ]
        );
    }

    #[test]
    fn the_stall_clock_starts_when_messages_arrive_after_an_idle_spell() {
        // Last ack an hour ago; a message arrives now: not stalled until stall_timeout passes.
        let last_progress = 0;
        let mut busy = BusySince::default();
        busy.observe(0, 3_600_000);
        busy.observe(1, 3_601_000);
        let at = |now_ms: u64| {
            readiness(
                [(
                    id("a", 0),
                    PairHealth {
                        in_flight: 1,
                        waiting_since_ms: busy.waiting_since(last_progress),
                        ..up()
                    },
                )],
                now_ms,
                STALL,
            )
        };
        assert!(at(3_601_000).is_ready());
        assert!(at(3_630_999).is_ready());
        assert!(!at(3_631_000).is_ready());
    }

    #[test]
    fn busy_since_follows_the_in_flight_count() {
        let mut busy = BusySince::default();
        assert_eq!(busy.waiting_since(500), 500);
        busy.observe(4, 1_000);
        busy.observe(9, 2_000); // still busy: the clock keeps its start
        assert_eq!(busy.waiting_since(500), 1_000);
        // Acks after it became busy move the clock on.
        assert_eq!(busy.waiting_since(1_500), 1_500);
        busy.observe(0, 3_000);
        busy.observe(1, 4_000);
        assert_eq!(busy.waiting_since(1_500), 4_000);
    }

    #[test]
    fn a_spooled_pair_is_ready_with_its_target_down_until_its_spool_is_full() {
        let spooled = PairHealth {
            target_up: false,
            in_flight: 20,
            spool_full: Some(false),
            ..up()
        };
        let r = readiness([(id("r", 0), spooled)], 3_600_000, STALL);
        assert!(r.is_ready(), "{r}");
        let full = PairHealth {
            spool_full: Some(true),
            ..spooled
        };
        let r = readiness([(id("r", 0), full)], 3_600_000, STALL);
        assert!(r.to_string().contains("spool full"), "{r}");
        let unspooled = PairHealth {
            spool_full: None,
            ..spooled
        };
        assert!(!readiness([(id("r", 0), unspooled)], 0, STALL).is_ready());
    }
}
