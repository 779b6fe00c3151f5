//! `/status`: the bridge's routes and pairs as JSON, for `mqbridge top` and for scripts. Every
//! counter is a total since the pair started (rates are the difference of two polls); each pair
//! is read once, and a route's totals are the sums of the pair rows in the same answer.
//!
//! The types are shared by the endpoint (serialize) and `mqbridge top` (deserialize), so the
//! two cannot drift apart.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::health::PairHealth;

/// `Content-Type` of the answer.
pub const CONTENT_TYPE: &str = "application/json";

/// The whole answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// `bridge.name`.
    pub bridge: String,
    /// `bridge.instance`.
    pub instance: String,
    /// mqbridge's version.
    pub version: String,
    /// Seconds since the bridge started.
    pub uptime_s: u64,
    pub routes: Vec<RouteStatus>,
}

/// One route: its pairs summed, then each pair.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteStatus {
    pub name: String,
    /// The source and target brokers' names in the config.
    pub source: String,
    pub target: String,
    /// Pairs ready (both connections up and the source subscribed, or parked on purpose), as
    /// `mqbridge_pairs_ready`; the pair count is the length of `pairs`.
    pub pairs_ready: u64,
    pub received: u64,
    pub forwarded: u64,
    pub bytes_forwarded: u64,
    /// Messages not delivered, by the reason of `mqbridge_messages_dropped_total`; every reason
    /// is listed, at zero too.
    pub dropped: BTreeMap<String, u64>,
    pub in_flight: u64,
    pub window: u64,
    /// Reconnections to either broker (the first connection not counted).
    pub reconnects: u64,
    /// The most recent ack progress of any pair; `null` if none has had any yet.
    pub last_progress_age_ms: Option<u64>,
    /// The route's spool summed over its pairs; `null` without `spool = true`.
    pub spool: Option<SpoolStatus>,
    pub pairs: Vec<PairStatus>,
}

/// One pair of connections.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairStatus {
    pub index: usize,
    /// What the pair is doing, from its flags: see [`pair_state`].
    pub state: String,
    pub source_up: bool,
    pub target_up: bool,
    pub subscribed: bool,
    pub received: u64,
    pub forwarded: u64,
    pub bytes_forwarded: u64,
    pub dropped: BTreeMap<String, u64>,
    pub in_flight: u64,
    pub window: u64,
    pub reconnects: u64,
    /// Milliseconds since the target last acknowledged something for this pair; `null` if it
    /// never has.
    pub last_progress_age_ms: Option<u64>,
    pub spool: Option<SpoolStatus>,
}

/// A spool's gauges (a pair's, or a route's summed).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SpoolStatus {
    /// Messages on disk not yet acknowledged by the target.
    pub messages: u64,
    /// Bytes on disk (whole segments), held against `spool.max_bytes`.
    pub bytes: u64,
    /// At `spool.max_bytes`: not reading the source.
    pub full: bool,
    /// Age of the oldest message in it; `null` when empty.
    pub oldest_age_s: Option<u64>,
}

/// A pair's state, in words, from what readiness sees (`stall_ms`: `bridge.stall_timeout`).
/// The first that applies: `parked` (an `auto` pool shrank), `connecting` (both connections
/// down), `source down`, `subscribing`, `spool full`, `spooling` (target down, the spool takes
/// the messages), `target down`, `stalled` (in flight, no ack for `stall_timeout`), `ready`.
pub fn pair_state(h: &PairHealth, now_ms: u64, stall_ms: u64) -> &'static str {
    let spooled = h.spool_full.is_some();
    if h.parked {
        "parked"
    } else if !h.source_up && !h.target_up {
        "connecting"
    } else if !h.source_up {
        "source down"
    } else if !h.subscribed {
        "subscribing"
    } else if h.spool_full == Some(true) {
        "spool full"
    } else if !h.target_up {
        if spooled { "spooling" } else { "target down" }
    } else if !spooled && h.in_flight > 0 && now_ms.saturating_sub(h.waiting_since_ms) >= stall_ms {
        "stalled"
    } else {
        "ready"
    }
}

impl SpoolStatus {
    /// Sums pairs' spools into the route's: the oldest message is the oldest of any pair.
    pub fn sum<'a>(pairs: impl IntoIterator<Item = &'a SpoolStatus>) -> Option<SpoolStatus> {
        pairs.into_iter().fold(None, |acc, s| {
            Some(match acc {
                None => *s,
                Some(a) => SpoolStatus {
                    messages: a.messages + s.messages,
                    bytes: a.bytes + s.bytes,
                    full: a.full || s.full,
                    oldest_age_s: a.oldest_age_s.max(s.oldest_age_s),
                },
            })
        })
    }
}

impl RouteStatus {
    /// The route's totals from its pair rows.
    pub fn from_pairs(
        name: &str,
        source: &str,
        target: &str,
        pairs_ready: u64,
        pairs: Vec<PairStatus>,
    ) -> RouteStatus {
        let sum = |f: fn(&PairStatus) -> u64| pairs.iter().map(f).sum::<u64>();
        let mut dropped = BTreeMap::new();
        for p in &pairs {
            for (reason, n) in &p.dropped {
                *dropped.entry(reason.clone()).or_insert(0) += n;
            }
        }
        RouteStatus {
            name: name.to_owned(),
            source: source.to_owned(),
            target: target.to_owned(),
            pairs_ready,
            received: sum(|p| p.received),
            forwarded: sum(|p| p.forwarded),
            bytes_forwarded: sum(|p| p.bytes_forwarded),
            dropped,
            in_flight: sum(|p| p.in_flight),
            window: sum(|p| p.window),
            reconnects: sum(|p| p.reconnects),
            last_progress_age_ms: pairs.iter().filter_map(|p| p.last_progress_age_ms).min(),
            spool: SpoolStatus::sum(pairs.iter().filter_map(|p| p.spool.as_ref())),
            pairs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up() -> PairHealth {
        PairHealth {
            source_up: true,
            target_up: true,
            subscribed: true,
            ..Default::default()
        }
    }

    #[test]
    fn states_follow_the_flags_first_match_wins() {
        let stall = 30_000;
        let state = |h: PairHealth| pair_state(&h, 100_000, stall);
        assert_eq!(state(up()), "ready");
        assert_eq!(state(PairHealth::default()), "connecting");
        let parked = PairHealth {
            parked: true,
            ..Default::default()
        };
        assert_eq!(state(parked), "parked");
        let source_down = PairHealth {
            source_up: false,
            ..up()
        };
        assert_eq!(state(source_down), "source down");
        let subscribing = PairHealth {
            subscribed: false,
            ..up()
        };
        assert_eq!(state(subscribing), "subscribing");
        let target_down = PairHealth {
            target_up: false,
            ..up()
        };
        assert_eq!(state(target_down), "target down");
        let spooling = PairHealth {
            spool_full: Some(false),
            ..target_down
        };
        assert_eq!(state(spooling), "spooling");
        let spool_full = PairHealth {
            spool_full: Some(true),
            ..up()
        };
        assert_eq!(state(spool_full), "spool full");
        let waiting = |since| PairHealth {
            in_flight: 3,
            waiting_since_ms: since,
            ..up()
        };
        assert_eq!(state(waiting(70_000)), "stalled");
        assert_eq!(state(waiting(70_001)), "ready");
        // A spooled pair is not stalled by a slow target: the spool holds the messages.
        let spooled_waiting = PairHealth {
            spool_full: Some(false),
            ..waiting(0)
        };
        assert_eq!(state(spooled_waiting), "ready");
    }

    #[test]
    fn spools_sum_to_the_routes() {
        let a = SpoolStatus {
            messages: 2,
            bytes: 100,
            full: false,
            oldest_age_s: Some(5),
        };
        let b = SpoolStatus {
            messages: 1,
            bytes: 50,
            full: true,
            oldest_age_s: None,
        };
        assert_eq!(SpoolStatus::sum([]), None);
        assert_eq!(
            SpoolStatus::sum([&a, &b]),
            Some(SpoolStatus {
                messages: 3,
                bytes: 150,
                full: true,
                oldest_age_s: Some(5)
            })
        );
    }
}
