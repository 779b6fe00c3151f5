//! What `mqbridge top` shows, as plain data: one row per route and per pair, with rates from two
//! polls of `/status`. Both faces (the full-screen table and the plain text table) draw these
//! rows, so they always agree.

use std::time::{Duration, Instant};

use crate::admin::status::{PairStatus, RouteStatus, Status};

/// One poll's answer and when it arrived (rates divide by the time between two of them).
#[derive(Debug, Clone)]
pub struct Sample {
    pub status: Status,
    pub at: Instant,
}

/// The column titles, in the order of [`Row::cells`].
pub const HEADER: [&str; 8] = [
    "ROUTE / PAIR",
    "STATE",
    "RECV/S",
    "FWD/S",
    "IN FLIGHT/WINDOW",
    "DROPS",
    "LAST ACK",
    "DROPPED BY REASON",
];

/// Which columns are numbers (right-aligned).
pub const NUMERIC: [bool; 8] = [false, false, true, true, true, true, true, false];

/// How a state reads at a glance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Good,
    /// On its way (connecting, subscribing) or deliberate (parked, spooling).
    Busy,
    Bad,
}

/// One line of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// A route's line (then its pairs' lines follow).
    pub is_route: bool,
    pub name: String,
    pub state: String,
    pub health: Health,
    /// Messages per second since the previous poll; `None` on the first poll, or when the
    /// counter went backwards (the route was restarted by a reload).
    pub received_per_s: Option<f64>,
    pub forwarded_per_s: Option<f64>,
    pub in_flight: u64,
    pub window: u64,
    pub dropped: u64,
    /// The reasons with a count, "refused 2, loop 1".
    pub dropped_by_reason: String,
    pub last_ack_age_ms: Option<u64>,
}

impl Row {
    /// The cells as text, in the order of [`HEADER`].
    pub fn cells(&self) -> [String; 8] {
        [
            if self.is_route {
                self.name.clone()
            } else {
                format!("  {}", self.name)
            },
            self.state.clone(),
            rate(self.received_per_s),
            rate(self.forwarded_per_s),
            format!("{}/{}", self.in_flight, self.window),
            self.dropped.to_string(),
            self.last_ack_age_ms
                .map_or_else(|| "never".to_owned(), |ms| age(Duration::from_millis(ms))),
            self.dropped_by_reason.clone(),
        ]
    }
}

pub fn health(state: &str) -> Health {
    match state {
        "ready" => Health::Good,
        "connecting" | "subscribing" | "parked" | "spooling" => Health::Busy,
        _ => Health::Bad,
    }
}

/// The rows for `now`, with rates against `before` (the previous successful poll).
pub fn rows(before: Option<&Sample>, now: &Sample) -> Vec<Row> {
    let seconds = before.map(|b| now.at.saturating_duration_since(b.at).as_secs_f64());
    let per_s = |old: Option<u64>, new: u64| -> Option<f64> {
        let (old, seconds) = (old?, seconds?);
        (new >= old && seconds > 0.0).then(|| (new - old) as f64 / seconds)
    };
    let mut out = Vec::new();
    for route in &now.status.routes {
        let old_route = before.and_then(|b| b.status.routes.iter().find(|r| r.name == route.name));
        let good = route
            .pairs
            .iter()
            .filter(|p| matches!(p.state.as_str(), "ready" | "parked"))
            .count();
        let (state, route_health) = if good == route.pairs.len() {
            ("ready".to_owned(), Health::Good)
        } else {
            let worst = route
                .pairs
                .iter()
                .map(|p| health(&p.state))
                .max_by_key(|h| match h {
                    Health::Good => 0,
                    Health::Busy => 1,
                    Health::Bad => 2,
                })
                .unwrap_or(Health::Good);
            (format!("{good}/{} ready", route.pairs.len()), worst)
        };
        out.push(Row {
            is_route: true,
            name: format!("{} ({} → {})", route.name, route.source, route.target),
            state,
            health: route_health,
            received_per_s: per_s(old_route.map(|r| r.received), route.received),
            forwarded_per_s: per_s(old_route.map(|r| r.forwarded), route.forwarded),
            in_flight: route.in_flight,
            window: route.window,
            dropped: route.dropped.values().sum(),
            dropped_by_reason: by_reason(route),
            last_ack_age_ms: route.last_progress_age_ms,
        });
        for pair in &route.pairs {
            let old = old_route.and_then(|r| r.pairs.iter().find(|p| p.index == pair.index));
            out.push(pair_row(pair, old, &per_s));
        }
    }
    out
}

fn pair_row(
    pair: &PairStatus,
    old: Option<&PairStatus>,
    per_s: &dyn Fn(Option<u64>, u64) -> Option<f64>,
) -> Row {
    let spool = pair
        .spool
        .map(|s| format!(" (spool {})", s.messages))
        .unwrap_or_default();
    Row {
        is_route: false,
        name: format!("pair {}", pair.index),
        state: format!("{}{spool}", pair.state),
        health: health(&pair.state),
        received_per_s: per_s(old.map(|p| p.received), pair.received),
        forwarded_per_s: per_s(old.map(|p| p.forwarded), pair.forwarded),
        in_flight: pair.in_flight,
        window: pair.window,
        dropped: pair.dropped.values().sum(),
        dropped_by_reason: reasons(pair.dropped.iter()),
        last_ack_age_ms: pair.last_progress_age_ms,
    }
}

fn by_reason(route: &RouteStatus) -> String {
    reasons(route.dropped.iter())
}

fn reasons<'a>(dropped: impl Iterator<Item = (&'a String, &'a u64)>) -> String {
    dropped
        .filter(|(_, n)| **n > 0)
        .map(|(reason, n)| format!("{reason} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// "-" before there are two polls; one decimal under 10/s.
pub fn rate(per_s: Option<f64>) -> String {
    match per_s {
        None => "-".to_owned(),
        Some(r) if r < 10.0 => format!("{r:.1}"),
        Some(r) => format!("{r:.0}"),
    }
}

/// "0.4s", "12s", "3m05s", "2h03m", "3d04h".
pub fn age(d: Duration) -> String {
    let s = d.as_secs();
    if s < 10 {
        format!("{:.1}s", d.as_secs_f64())
    } else if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else if s < 86_400 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else {
        format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600)
    }
}

/// The first line of both faces: which bridge, since when, where from.
pub fn title(status: &Status, admin: &str) -> String {
    let pairs: usize = status.routes.iter().map(|r| r.pairs.len()).sum();
    format!(
        "mqbridge top: bridge {} (instance {}), mqbridge {}, up {}, admin {admin}, {} route{}, {} pair{}",
        status.bridge,
        status.instance,
        status.version,
        age(Duration::from_secs(status.uptime_s)),
        status.routes.len(),
        if status.routes.len() == 1 { "" } else { "s" },
        pairs,
        if pairs == 1 { "" } else { "s" },
    )
}

/// The plain text table: the title, the header and the rows, columns padded to their widest
/// cell (numbers right-aligned), no trailing spaces.
pub fn plain(status: &Status, admin: &str, rows: &[Row]) -> String {
    let cells: Vec<[String; 8]> = std::iter::once(HEADER.map(str::to_owned))
        .chain(rows.iter().map(Row::cells))
        .collect();
    let mut widths = [0; 8];
    for line in &cells {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = title(status, admin);
    out.push('\n');
    for line in &cells {
        let mut text = String::new();
        for (i, cell) in line.iter().enumerate() {
            let pad = " ".repeat(widths[i] - cell.chars().count());
            if i > 0 {
                text.push_str("  ");
            }
            if NUMERIC[i] {
                text.push_str(&pad);
                text.push_str(cell);
            } else {
                text.push_str(cell);
                text.push_str(&pad);
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::admin::status::SpoolStatus;

    fn pair(index: usize, state: &str, received: u64, forwarded: u64) -> PairStatus {
        PairStatus {
            index,
            state: state.into(),
            source_up: true,
            target_up: true,
            subscribed: true,
            received,
            forwarded,
            bytes_forwarded: 0,
            dropped: BTreeMap::from([("refused".into(), 0), ("loop".into(), 0)]),
            in_flight: 1,
            window: 20,
            reconnects: 0,
            last_progress_age_ms: Some(400),
            spool: None,
        }
    }

    fn sample(pairs: Vec<PairStatus>, at: Instant) -> Sample {
        Sample {
            status: Status {
                bridge: "edge-1".into(),
                instance: "pod-0".into(),
                version: "0.1.0".into(),
                uptime_s: 75,
                routes: vec![RouteStatus::from_pairs("up", "edge", "cloud", 1, pairs)],
            },
            at,
        }
    }

    #[test]
    fn rates_come_from_two_polls_and_pairs_follow_their_route() {
        let t0 = Instant::now();
        let before = sample(vec![pair(0, "ready", 100, 90), pair(1, "ready", 0, 0)], t0);
        let mut now_pairs = vec![pair(0, "ready", 300, 290), pair(1, "target down", 0, 0)];
        now_pairs[1].dropped.insert("refused".into(), 3);
        now_pairs[1].last_progress_age_ms = None;
        let now = sample(now_pairs, t0 + Duration::from_secs(2));

        let first = rows(None, &before);
        assert_eq!(first[0].received_per_s, None, "one poll has no rate");

        let rows = rows(Some(&before), &now);
        assert_eq!(rows.len(), 3);
        assert!(rows[0].is_route);
        assert_eq!(rows[0].name, "up (edge → cloud)");
        assert_eq!(rows[0].state, "1/2 ready");
        assert_eq!(rows[0].health, Health::Bad);
        assert_eq!(rows[0].received_per_s, Some(100.0));
        assert_eq!(rows[0].forwarded_per_s, Some(100.0));
        assert_eq!((rows[0].in_flight, rows[0].window), (2, 40));
        assert_eq!(rows[0].dropped, 3);
        assert_eq!(rows[0].dropped_by_reason, "refused 3");
        assert_eq!(rows[1].cells()[0], "  pair 0");
        assert_eq!(rows[1].cells()[2], "100");
        assert_eq!(rows[1].cells()[4], "1/20");
        assert_eq!(rows[1].cells()[6], "0.4s");
        assert_eq!(rows[2].state, "target down");
        assert_eq!(rows[2].cells()[2], "0.0");
        assert_eq!(rows[2].cells()[6], "never");
    }

    #[test]
    fn a_counter_that_went_back_has_no_rate() {
        let t0 = Instant::now();
        let before = sample(vec![pair(0, "ready", 100, 100)], t0);
        let now = sample(vec![pair(0, "ready", 5, 5)], t0 + Duration::from_secs(1));
        assert_eq!(rows(Some(&before), &now)[1].received_per_s, None);
    }

    #[test]
    fn a_spooled_pair_shows_its_backlog() {
        let mut p = pair(0, "spooling", 1, 1);
        p.spool = Some(SpoolStatus {
            messages: 12,
            bytes: 4096,
            full: false,
            oldest_age_s: Some(3),
        });
        let rows = rows(None, &sample(vec![p], Instant::now()));
        assert_eq!(rows[1].state, "spooling (spool 12)");
        assert_eq!(rows[1].health, Health::Busy);
    }

    #[test]
    fn the_plain_table_is_aligned() {
        let s = sample(vec![pair(0, "ready", 1, 1)], Instant::now());
        let text = plain(&s.status, "127.0.0.1:9464", &rows(None, &s));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "mqbridge top: bridge edge-1 (instance pod-0), mqbridge 0.1.0, up 1m15s, \
             admin 127.0.0.1:9464, 1 route, 1 pair"
        );
        assert!(
            lines[1].starts_with("ROUTE / PAIR       STATE  RECV/S"),
            "{text}"
        );
        assert!(lines[2].starts_with("up (edge → cloud)  ready"), "{text}");
        assert!(lines[3].starts_with("  pair 0           ready"), "{text}");
        // Right-aligned numbers end where their header ends.
        let end = |line: &str, what: &str| line.find(what).map(|i| i + what.len());
        assert_eq!(end(lines[1], "IN FLIGHT/WINDOW"), end(lines[3], " 1/20"));
    }

    #[test]
    fn ages_read_at_a_glance() {
        let s = Duration::from_secs;
        assert_eq!(age(Duration::from_millis(420)), "0.4s");
        assert_eq!(age(s(12)), "12s");
        assert_eq!(age(s(185)), "3m05s");
        assert_eq!(age(s(7380)), "2h03m");
        assert_eq!(age(s(3 * 86_400 + 4 * 3600)), "3d04h");
        assert_eq!(rate(Some(2.24)), "2.2");
        assert_eq!(rate(Some(1234.6)), "1235");
    }
}
