//! A route's pool: `pool_size` pairs, each a task running `pair::driver`, sharing the route's
//! subscriptions through the broker's shared subscription group. Each route has its own stop
//! signal, so that a reload can drain one route and leave the others running.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{sync::watch, task::JoinHandle};

pub use crate::pair::LoopGuard;

use crate::{
    config::{Plan, Protocol, RoutePlan, Side, client_id},
    loops::{EchoDigest, analysis},
    pair::{
        PairSpec, driver, machine::MQTT3_SOURCE_WINDOW, retire, spec::SpoolLink, stats::PairStats,
    },
    spool::{LogGauges, LogOptions, Spool, startup},
};

/// A running route: its pairs' stats and tasks.
pub struct RunningRoute {
    pub plan: Arc<RoutePlan>,
    pub pairs: Vec<Arc<PairStats>>,
    pub tasks: Vec<JoinHandle<()>>,
    /// Per pair, with a spool (else empty): what its log holds.
    pub spool: Vec<Arc<LogGauges>>,
    /// Turned true by [`RunningRoute::stop`]; every pair of this route watches it.
    stop: watch::Sender<bool>,
}

/// Starts every pair of `route` (one of `plan`'s). They run until [`RunningRoute::stop`].
/// `digest` is the process's echo digest, shared by every route.
pub fn start(
    plan: &Plan,
    route: &RoutePlan,
    digest: &Arc<Mutex<EchoDigest>>,
    epoch: std::time::Instant,
) -> RunningRoute {
    let (stop, shutdown) = watch::channel(false);
    let bridge = &plan.bridge;
    let (record_echoes, check_echoes) = analysis::digest_roles(plan, route);
    let loops = LoopGuard {
        bridge_name: bridge.name.clone(),
        source_id: route.from.id.clone(),
        target_id: route.to.id.clone(),
        markers: analysis::writes_markers(plan, route),
        digest: (record_echoes || check_echoes).then(|| digest.clone()),
        record_echoes,
        check_echoes,
    };
    let plan = Arc::new(route.clone());
    // One thread per route does the spool's file I/O; each pair has a log of its own in it.
    let spool = route.spool.as_ref().map(|sp| {
        // `max_bytes` is the route's: each pair's log gets an equal share of it.
        let per_pair = sp.max_bytes / route.pool_size_max.max(1) as u64;
        // Segments an eighth of that (at most 64 MiB): space comes back as the backlog drains.
        let options = LogOptions {
            segment_bytes: (per_pair / 8).clamp(64 << 10, 64 << 20),
        };
        let (spool, _thread) = Spool::start(sp.dir.clone(), per_pair, options);
        spool
    });
    let mut gauges: Vec<Arc<LogGauges>> = (0..route.pool_size_max)
        .map(|_| Arc::new(LogGauges::default()))
        .collect();
    // Every pair of the route, and the sweep of indices past it, allow the same ack silence.
    let ack_silence = crate::pair::machine::ack_silence(bridge.stall_timeout);
    let mut pairs = Vec::new();
    let mut tasks = Vec::new();
    let mut switches = Vec::new();
    for (index, pair_gauges) in gauges.iter().enumerate() {
        let stats = Arc::new(PairStats::default());
        let spec = PairSpec {
            route: plan.clone(),
            index,
            source_client_id: client_id(bridge, route, index, Side::Source),
            target_client_id: client_id(bridge, route, index, Side::Target),
            stats: stats.clone(),
            drain_timeout: bridge.drain_timeout,
            ack_silence,
            epoch,
            loops: loops.clone(),
            spool: spool.as_ref().map(|spool| SpoolLink {
                spool: spool.clone(),
                gauges: pair_gauges.clone(),
            }),
        };
        pairs.push(stats);
        let (switch, active) = watch::channel(index < route.pool_size);
        switches.push(switch);
        tasks.push(tokio::spawn(driver::run_pooled(
            spec,
            shutdown.clone(),
            active,
        )));
    }
    // Indexes past the pool that an earlier run (or the config before a reload) ran may still
    // hold subscribed sessions, which the broker keeps feeding: clean them up (SPEC 4.1). With a
    // spool, an index past the pool that left a spool directory is retired with it: its backlog
    // is forwarded before it ends (SPEC 4.9: nothing acknowledged is orphaned).
    let retired_spools: RetiredSpools = match (&spool, &route.spool) {
        (Some(_), Some(sp)) => startup::pair_dirs(&sp.dir)
            .iter()
            .filter_map(|dir| startup::pair_index(dir))
            .filter(|&i| i >= route.pool_size_max)
            .map(|i| (i, Arc::new(LogGauges::default())))
            .collect(),
        _ => Vec::new(),
    };
    gauges.extend(retired_spools.iter().map(|(_, g)| g.clone()));
    let sweep_from = PairSpec {
        route: plan.clone(),
        index: route.pool_size_max,
        source_client_id: String::new(),
        target_client_id: String::new(),
        stats: Arc::new(PairStats::default()),
        drain_timeout: bridge.drain_timeout,
        ack_silence,
        epoch,
        loops: loops.clone(),
        spool: None,
    };
    tasks.push(tokio::spawn(sweep(
        bridge.clone(),
        sweep_from,
        spool.clone().map(|spool| (spool, retired_spools)),
        shutdown.clone(),
    )));
    let sizer = route
        .pool_auto
        .then(|| PoolSizer::new(route.pool_size, route.pool_size_max));
    tasks.push(tokio::spawn(watch_pool(
        plan.clone(),
        sizer,
        pairs.clone(),
        switches,
        shutdown,
    )));
    RunningRoute {
        plan,
        pairs,
        tasks,
        spool: if spool.is_some() { gauges } else { Vec::new() },
        stop,
    }
}

/// How many indexes past the pool a start looks at, at most: a guard against a broker that
/// reports a session for every client id.
const SWEEP_LIMIT: usize = 1024;

/// Retires indexes `first.index`, `first.index + 1`, … until one whose source had no session
/// and past every index that left a spool directory (`spools`: the route's spool thread and
/// those indexes). MQTT 3.1 cannot tell, so on 3.1 only the first is looked at
/// (see docs/GUARANTEES.md).
async fn sweep(
    bridge: crate::config::BridgePlan,
    first: PairSpec,
    spools: Option<(Spool, RetiredSpools)>,
    shutdown: watch::Receiver<bool>,
) {
    let route = first.route.clone();
    let last_spool = spools
        .as_ref()
        .and_then(|(_, s)| s.iter().map(|(i, _)| *i).max());
    for index in first.index..first.index + SWEEP_LIMIT {
        let spool = spools.as_ref().and_then(|(spool, indexes)| {
            let (_, gauges) = indexes.iter().find(|(i, _)| *i == index)?;
            Some(SpoolLink {
                spool: spool.clone(),
                gauges: gauges.clone(),
            })
        });
        let spec = PairSpec {
            index,
            source_client_id: client_id(&bridge, &route, index, Side::Source),
            target_client_id: client_id(&bridge, &route, index, Side::Target),
            spool,
            ..first.clone()
        };
        let had_session = retire::retire(spec, shutdown.clone()).await;
        if *shutdown.borrow() {
            return;
        }
        if had_session != Some(true) && last_spool.is_none_or(|last| index >= last) {
            return;
        }
    }
}

/// Indexes past the pool that left a spool directory, each with its gauges.
type RetiredSpools = Vec<(usize, Arc<LogGauges>)>;

/// How often an auto-sized pool looks at its pairs.
const SIZING_TICK: Duration = Duration::from_secs(1);

/// Grows and shrinks an auto-sized pool by switching pairs on and off, and says when a route's
/// windows limit it (`WindowWatch`), until the route stops.
async fn watch_pool(
    route: Arc<RoutePlan>,
    mut sizer: Option<PoolSizer>,
    pairs: Vec<Arc<PairStats>>,
    switches: Vec<watch::Sender<bool>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(SIZING_TICK);
    let mut watch = WindowWatch::default();
    let mut pacing = PacingWatch::default();
    let advice = || {
        if route.pool_auto {
            format!(
                "the pool is at pool_size_max ({}): raise it",
                route.pool_size_max
            )
        } else {
            "pool_size = \"auto\" would add pairs (or raise pool_size)".to_string()
        }
    };
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let sample = Sample::of(&pairs);
        let active = sizer.as_ref().map_or(route.pool_size, PoolSizer::active);
        // Below its maximum an auto-sized pool grows instead, and says so.
        let at_most = sizer.is_none() || active >= route.pool_size_max;
        if let Some(holds) = pacing.next(sample.paced).filter(|_| at_most) {
            let to = &route.to;
            let limits = to.per_connection_limits().unwrap_or_default();
            tracing::warn!(route = %route.name, pairs = active, broker = %to.name, "route {} is held back by {}'s per-connection limit ({limits}): {holds} publishes waited for the quota in the last second, so the offered load exceeds what {active} pairs may carry and the source broker holds the rest; {}", route.name, to.name, advice());
        }
        if let Some(w) = watch.next(sample, active).filter(|_| at_most) {
            let advice = advice();
            tracing::warn!(route = %route.name, pairs = active, "route {} is limited by the target's window: {} in flight per pair ({}), acknowledged every {:?} ({:.0} msg/s per pair){}, the windows full {:.0} % of the last {:?}; {advice}", route.name, w.held, w.limit(), w.round_trip, w.per_pair_rate, w.against_the_path(), w.full_share * 100.0, w.span);
        }
        let Some(sizer) = sizer.as_mut() else {
            continue;
        };
        let before = sizer.active();
        let after = sizer.next(sample);
        if after != before {
            tracing::info!(route = %route.name, pairs = after, was = before, "pool resized: {}", sizer.why());
            for (i, s) in switches.iter().enumerate() {
                s.send_if_modified(|on| {
                    let want = i < after;
                    std::mem::replace(on, want) != want
                });
            }
        }
    }
}

/// What the sizer sees each tick: counters summed over the route's pairs, gauges as of now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sample {
    /// Times a pair was held back by the target's quotas.
    pub paced: u64,
    pub received: u64,
    pub forwarded: u64,
    /// Milliseconds windows were full with the target connected (`PairStats::window_full_ms`).
    pub window_full_ms: u64,
    /// QoS ≥ 1 messages held now, all pairs.
    pub in_flight: u64,
    /// The largest pair window (the target's Receive Maximum capped by `max_inflight`).
    pub window: u64,
    /// The longest round trip to the target an idle pair measured (PINGREQ), µs; 0: none yet.
    pub round_trip_us: u64,
}

impl Sample {
    pub fn of(pairs: &[Arc<PairStats>]) -> Sample {
        let sum = |f: fn(&PairStats) -> &std::sync::atomic::AtomicU64| {
            pairs.iter().map(|p| PairStats::get(f(p))).sum()
        };
        Sample {
            paced: sum(|p| &p.paced),
            received: sum(|p| &p.received),
            forwarded: sum(|p| &p.forwarded),
            window_full_ms: sum(|p| &p.window_full_ms),
            in_flight: sum(|p| &p.in_flight),
            window: pairs
                .iter()
                .map(|p| PairStats::get(&p.window))
                .max()
                .unwrap_or(0),
            round_trip_us: pairs
                .iter()
                .map(|p| PairStats::get(&p.target_round_trip_us))
                .max()
                .unwrap_or(0),
        }
    }
}

/// A route limited by its windows, in figures: what [`WindowWatch`] says.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowBound {
    pub window: u64,
    /// Messages a full window held per pair: `window`, or fewer when its bytes bound binds.
    pub held: u64,
    /// Window / acks per second per pair: the forward time a window takes (Little's law).
    pub round_trip: Duration,
    pub per_pair_rate: f64,
    pub full_share: f64,
    pub span: Duration,
    /// The path's round trip as an idle pair's PINGREQ measured it, if one did.
    pub path_round_trip: Option<Duration>,
}

impl WindowBound {
    /// What bounds a pair's window, in words.
    pub fn limit(&self) -> String {
        if self.held < self.window {
            format!(
                "its max_inflight_bytes: the window of {} messages is not reached",
                self.window
            )
        } else {
            "the window".to_string()
        }
    }

    /// What the acks' pace says against the path's round trip, in words.
    pub fn against_the_path(&self) -> String {
        let Some(path) = self.path_round_trip else {
            return String::new();
        };
        let extra = self.round_trip.saturating_sub(path);
        if extra * 4 <= path {
            format!(
                ", the path's own round trip being {path:?} (PINGREQ while idle): the window over \
                 the distance is the limit"
            )
        } else {
            format!(
                ", while the path's round trip is {path:?} (PINGREQ while idle): the acks take \
                 {extra:?} more than the distance (the target holds them back, e.g. mosquitto's \
                 default set_tcp_nodelay false delays its PUBACKs)"
            )
        }
    }
}

/// Says (at most every `WATCH_REPEAT` ticks) when the last `WATCH_TICKS` ticks had the windows
/// full at least half the time while acks came back: the pairs carry window / round trip each,
/// and more pairs (or a larger window) would carry more (pure).
#[derive(Debug, Default)]
pub struct WindowWatch {
    samples: std::collections::VecDeque<Sample>,
    quiet_for: u32,
}

const WATCH_TICKS: usize = 10;
const WATCH_REPEAT: u32 = 300;

impl WindowWatch {
    pub fn next(&mut self, now: Sample, active: usize) -> Option<WindowBound> {
        self.quiet_for = self.quiet_for.saturating_sub(1);
        self.samples.push_back(now);
        if self.samples.len() > WATCH_TICKS + 1 {
            self.samples.pop_front();
        }
        let first = self.samples.front()?;
        let ticks = (self.samples.len() - 1) as u64;
        if ticks < WATCH_TICKS as u64 || self.quiet_for > 0 || active == 0 {
            return None;
        }
        let span = SIZING_TICK * ticks as u32;
        let full_ms = now.window_full_ms.saturating_sub(first.window_full_ms);
        let acked = now.forwarded.saturating_sub(first.forwarded);
        let full_share = full_ms as f64 / (span.as_millis() as f64 * active as f64);
        if acked == 0 || full_share < 0.5 || now.window == 0 {
            return None;
        }
        self.quiet_for = WATCH_REPEAT;
        let per_pair_rate = acked as f64 / span.as_secs_f64() / active as f64;
        // What a full window holds: the count, or fewer when `max_inflight_bytes` binds (large
        // messages); the fullest sample shows it.
        let fullest = self.samples.iter().map(|s| s.in_flight).max().unwrap_or(0);
        let held = match fullest / active as u64 {
            0 => now.window,
            n => n.min(now.window),
        };
        Some(WindowBound {
            window: now.window,
            held,
            round_trip: Duration::from_millis((held as f64 / per_pair_rate * 1000.0) as u64),
            per_pair_rate,
            full_share: full_share.min(1.0),
            span,
            path_round_trip: (now.round_trip_us > 0)
                .then(|| Duration::from_micros(now.round_trip_us)),
        })
    }
}

/// Says (at most every `PACING_REPEAT` ticks) that the route's pairs waited for the target's
/// per-connection quotas in the last tick: the offered load is above what the pool may carry
/// and the source broker holds the rest (pure). One line for the route: each pair saying it
/// was 256 lines at once from a pool of 256.
#[derive(Debug, Default)]
pub struct PacingWatch {
    /// The route's holds so far (`Sample::paced`) at the last tick.
    last: u64,
    quiet_for: u32,
}

const PACING_REPEAT: u32 = 30;

impl PacingWatch {
    /// The route's holds so far; returns how many happened since the last tick when that is
    /// to be said now.
    pub fn next(&mut self, paced: u64) -> Option<u64> {
        self.quiet_for = self.quiet_for.saturating_sub(1);
        let holds = paced.saturating_sub(std::mem::replace(&mut self.last, paced));
        if holds == 0 || self.quiet_for > 0 {
            return None;
        }
        self.quiet_for = PACING_REPEAT;
        Some(holds)
    }
}

/// What an operator is told, once per route, when one pair held more QoS ≥ 1 messages from an
/// MQTT 3.x source unacknowledged (`in_flight_max`) than the 20 such a source is assumed to
/// allow (`MQTT3_SOURCE_WINDOW`, mosquitto's default `max_inflight_messages`): either it allows
/// more, or it keeps no window at all, as mosquitto before 2.0.13 does once a queue forms, and
/// then counts them against its queue too (pure). Measured on 2.0.11: after a QoS 1 burst the
/// queue of 1,000 filled with messages in flight to the pairs and newer ones were dropped at the
/// source, which the bridge cannot see. With a spool the source is acknowledged at the disk and
/// holds nothing for long, so nothing is said.
pub fn source_window_note(
    route: &str,
    source: &str,
    protocol: Protocol,
    spooled: bool,
    in_flight_max: u64,
) -> Option<String> {
    if protocol == Protocol::V5 || spooled || in_flight_max <= MQTT3_SOURCE_WINDOW as u64 {
        return None;
    }
    Some(format!(
        "route {route}: a pair held {in_flight_max} messages from {source} unacknowledged, more \
         than the {MQTT3_SOURCE_WINDOW} of mosquitto's default max_inflight_messages. If {source} \
         allows that many, all is well. If not, it keeps no window for QoS 1 (mosquitto before \
         2.0.13, once a queue forms) and counts these against its max_queued_messages \
         (1,000 by default), so a burst that fills it drops newer messages at {source}, unseen by \
         the bridge (docs/GUARANTEES.md): upgrade it, raise its max_queued_messages, or give the \
         route a spool"
    ))
}

/// Why the pool last changed size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resize {
    Paced,
    WindowBound,
    Idle,
    Underused,
}

/// The decision of an auto-sized pool (pure), once per `SIZING_TICK`:
/// - twice as many pairs after a tick in which a pair was held back by the target's quotas, or
///   in which the windows were full at least half the time while acks came back (window-bound:
///   the path's round trip, not the target, limits the pairs; a stalled target gives no acks);
/// - one fewer per `SHRINK_EVERY` ticks once `IDLE_TICKS` ticks passed without a message, and
///   one fewer after `UNDERUSED_TICKS` ticks in a row in which what was in flight would have
///   fitted in half the windows of one pair fewer, with no window full and no pacing (the
///   hysteresis keeps a pool sized by its window from flapping).
#[derive(Debug, Clone)]
pub struct PoolSizer {
    min: usize,
    max: usize,
    active: usize,
    last: Option<Sample>,
    idle_ticks: u32,
    underused_ticks: u32,
    why: Option<Resize>,
}

const IDLE_TICKS: u32 = 10;
const SHRINK_EVERY: u32 = 2;
const UNDERUSED_TICKS: u32 = 30;

impl PoolSizer {
    pub fn new(min: usize, max: usize) -> Self {
        PoolSizer {
            min,
            max,
            active: min,
            last: None,
            idle_ticks: 0,
            underused_ticks: 0,
            why: None,
        }
    }

    pub fn active(&self) -> usize {
        self.active
    }

    /// Why the size last changed, in words.
    pub fn why(&self) -> &'static str {
        match self.why {
            Some(Resize::Paced) => "pairs held back by the target's per-connection quota",
            Some(Resize::WindowBound) => {
                "window-bound: the pairs' windows were full at least half the time while acks \
                 came back at the round trip's pace"
            }
            Some(Resize::Idle) => "no traffic",
            Some(Resize::Underused) => "what is in flight fits in fewer pairs",
            None => "",
        }
    }

    /// Takes this tick's sample and returns how many pairs should be active.
    pub fn next(&mut self, now: Sample) -> usize {
        let Some(last) = self.last.replace(now) else {
            return self.active;
        };
        let paced = now.paced > last.paced;
        let full_ms = now.window_full_ms.saturating_sub(last.window_full_ms);
        let tick_ms = SIZING_TICK.as_millis() as u64;
        let acked = now.forwarded > last.forwarded;
        let window_bound = acked && full_ms * 2 >= self.active as u64 * tick_ms;
        if now.received == last.received {
            self.idle_ticks += 1;
        } else {
            self.idle_ticks = 0;
        }
        let fits_in_fewer =
            now.in_flight * 2 <= (self.active as u64).saturating_sub(1) * now.window;
        if !paced && full_ms == 0 && fits_in_fewer && self.active > self.min {
            self.underused_ticks += 1;
        } else {
            self.underused_ticks = 0;
        }
        let grow = if paced {
            Some(Resize::Paced)
        } else if window_bound {
            Some(Resize::WindowBound)
        } else {
            None
        };
        if let Some(why) = grow.filter(|_| self.active < self.max) {
            // Double, whether window-bound or paced: a source assigns each message to a
            // member of the shared subscription when it is published, so what arrives before
            // the pool has grown stays queued for the pairs there were (+1 a second took 31 s
            // to 32 pairs and left the first pairs a backlog of minutes; to 200 pairs paced
            // at BifroMQ's 200 PUBLISH/s it would take over three minutes, while the source's
            // queue of 1,000 per session overflows). Overshoot is at most 2x, shed by
            // `UNDERUSED_TICKS`.
            self.active = (self.active * 2).min(self.max);
            self.why = Some(why);
        } else if self.idle_ticks >= IDLE_TICKS
            && (self.idle_ticks - IDLE_TICKS).is_multiple_of(SHRINK_EVERY)
            && self.active > self.min
        {
            self.active -= 1;
            self.why = Some(Resize::Idle);
        } else if self.underused_ticks >= UNDERUSED_TICKS && self.idle_ticks == 0 {
            self.active -= 1;
            self.underused_ticks = 0;
            self.why = Some(Resize::Underused);
        }
        self.active
    }
}

/// Totals over a route's pairs, for the summary line.
#[derive(Debug, Default, Clone, Copy)]
pub struct RouteTotals {
    pub received: u64,
    pub forwarded: u64,
    pub dropped: u64,
    /// Echoes of our own forwards suppressed (part of `dropped`).
    pub loops: u64,
    pub in_flight: u64,
    pub in_flight_max: u64,
    pub window: u64,
    pub pairs_ready: usize,
    pub reconnects: u64,
}

impl RunningRoute {
    pub fn totals(&self) -> RouteTotals {
        let mut t = RouteTotals::default();
        for s in &self.pairs {
            let g = PairStats::get;
            t.received += g(&s.received);
            t.forwarded += g(&s.forwarded);
            t.dropped += s.dropped_total();
            t.loops += g(&s.dropped_loop);
            t.in_flight += g(&s.in_flight);
            t.in_flight_max = t.in_flight_max.max(g(&s.in_flight_max));
            t.window = t.window.max(g(&s.window));
            t.pairs_ready += usize::from(s.ready());
            t.reconnects += g(&s.source_reconnects) + g(&s.target_reconnects);
        }
        t
    }

    /// Tells every pair to stop reading, finish what it holds (up to `drain_timeout`) and
    /// disconnect; see [`RunningRoute::join`].
    pub fn stop(&self) {
        // `send_replace`: pairs that already ended have dropped their receivers.
        self.stop.send_replace(true);
    }

    /// Waits for every pair to finish (after [`RunningRoute::stop`]), at most `limit`; then
    /// aborts those still running and waits until they are gone, so that no pair of this pool
    /// still holds a connection when a new pool starts with the same client ids (a live old
    /// connection and a new one would take each other's sessions in turn).
    pub async fn join(&mut self, limit: Duration) {
        join_or_abort(std::mem::take(&mut self.tasks), limit).await;
    }
}

/// Awaits `tasks` for at most `limit` in all, then aborts the rest and awaits their end.
async fn join_or_abort(tasks: Vec<JoinHandle<()>>, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    let mut tasks = tasks.into_iter();
    let mut late = Vec::new();
    while let Some(mut t) = tasks.next() {
        if tokio::time::timeout_at(deadline, &mut t).await.is_err() {
            late.push(t);
            late.extend(tasks.by_ref());
        }
    }
    for t in &late {
        t.abort();
    }
    for t in late {
        let _ = t.await; // a finished handle is never polled twice: only unfinished ones are here
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue #14, hole 18: a pair task that outlives the drain limit is aborted and gone before
    /// `join` returns (before, `join` only stopped waiting for it, and it kept its connections).
    #[tokio::test]
    async fn join_aborts_what_outlives_the_limit_and_waits_for_its_end() {
        struct Alive(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Alive {
            fn drop(&mut self) {
                self.0.store(false, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let guard = Alive(alive.clone());
        let stuck = tokio::spawn(async move {
            let _guard = guard;
            std::future::pending::<()>().await
        });
        let quick = tokio::spawn(async {});
        join_or_abort(vec![quick, stuck], Duration::from_millis(50)).await;
        assert!(
            !alive.load(std::sync::atomic::Ordering::SeqCst),
            "the stuck task is gone once join returns"
        );
    }

    fn run(sizer: &mut PoolSizer, samples: &[(u64, u64)]) -> Vec<usize> {
        samples
            .iter()
            .map(|&(paced, received)| {
                sizer.next(Sample {
                    paced,
                    received,
                    ..Sample::default()
                })
            })
            .collect()
    }

    /// A window-bound route: each tick adds `per_pair` forwarded messages per active pair, and
    /// the windows were full `full` of the time; `in_flight` per pair of a window of 20.
    fn window_ticks(sizer: &mut PoolSizer, ticks: usize, full: f64, in_flight: u64) -> Vec<usize> {
        let mut s = sizer.last.unwrap_or_default();
        (0..ticks)
            .map(|_| {
                let active = sizer.active() as u64;
                s.received += 100 * active;
                s.forwarded += 100 * active;
                s.window_full_ms += (full * 1000.0) as u64 * active;
                s.in_flight = in_flight * active;
                s.window = 20;
                sizer.next(s)
            })
            .collect()
    }

    #[test]
    fn grows_while_windows_are_full_and_acks_come_back_up_to_max() {
        let mut s = PoolSizer::new(1, 6);
        let sizes = window_ticks(&mut s, 6, 0.9, 20);
        assert_eq!(sizes, [1, 2, 4, 6, 6, 6], "doubling, capped at the max");
        assert!(s.why().starts_with("window-bound"), "{}", s.why());
        // Full less than half the time: no growth.
        let mut s = PoolSizer::new(1, 4);
        assert_eq!(window_ticks(&mut s, 5, 0.4, 10), [1; 5]);
    }

    #[test]
    fn a_3x_source_past_its_assumed_window_is_named_unless_it_cannot_be() {
        let note = |protocol, spooled, n| source_window_note("r", "edge", protocol, spooled, n);
        assert_eq!(note(Protocol::V311, false, 20), None, "its window, no more");
        let said = note(Protocol::V311, false, 21).expect("one more than 20");
        assert!(
            said.starts_with("route r: a pair held 21 messages from edge unacknowledged")
                && said.contains("mosquitto before 2.0.13"),
            "{said}"
        );
        assert!(note(Protocol::V31, false, 3948).is_some());
        assert_eq!(
            note(Protocol::V5, false, 3948),
            None,
            "a v5 source is told its window"
        );
        assert_eq!(
            note(Protocol::V311, true, 3948),
            None,
            "acknowledged at the disk"
        );
    }

    #[test]
    fn a_paced_route_is_told_once_per_half_minute_while_its_pairs_wait() {
        let mut p = PacingWatch::default();
        assert_eq!(p.next(0), None, "nothing held back");
        assert_eq!(p.next(7), Some(7), "held back since the last tick");
        let said: Vec<_> = (1..=PACING_REPEAT as u64).map(|i| p.next(7 + i)).collect();
        assert!(
            said[..PACING_REPEAT as usize - 1]
                .iter()
                .all(Option::is_none),
            "quiet for {PACING_REPEAT} ticks: {said:?}"
        );
        assert_eq!(said.last(), Some(&Some(1)), "and then again");
        // Once the pairs no longer wait, nothing is said.
        let total = 7 + PACING_REPEAT as u64;
        for _ in 0..PACING_REPEAT * 2 {
            assert_eq!(p.next(total), None);
        }
    }

    #[test]
    fn a_window_bound_route_is_told_once_with_its_round_trip() {
        let mut w = WindowWatch::default();
        let mut s = Sample {
            window: 20,
            ..Sample::default()
        };
        let mut said = Vec::new();
        for _ in 0..=WATCH_TICKS * 3 {
            // 2 pairs, each 200 acks/s with 20 in flight: 100 ms per window; full 80 %.
            s.forwarded += 400;
            s.window_full_ms += 1600;
            said.push(w.next(s, 2));
        }
        assert!(
            said[..WATCH_TICKS].iter().all(Option::is_none),
            "10 ticks first"
        );
        let b = said[WATCH_TICKS].clone().expect("window-bound");
        assert_eq!(b.round_trip, Duration::from_millis(100));
        assert_eq!(b.per_pair_rate, 200.0);
        assert!((b.full_share - 0.8).abs() < 1e-9);
        assert!(
            said[WATCH_TICKS + 1..].iter().all(Option::is_none),
            "said once"
        );
        // Full 40 % of the time: not window-bound.
        let mut w = WindowWatch::default();
        let mut s = Sample {
            window: 20,
            ..Sample::default()
        };
        for _ in 0..=WATCH_TICKS * 2 {
            s.forwarded += 400;
            s.window_full_ms += 800;
            assert_eq!(w.next(s, 2), None);
        }
    }

    /// With large messages `max_inflight_bytes` fills before the count: the round trip is what
    /// the fuller windows held over the acks' pace, and the warning names the bytes bound.
    #[test]
    fn a_window_bound_by_bytes_is_measured_by_what_it_held() {
        let mut w = WindowWatch::default();
        let mut s = Sample {
            window: 16384,
            ..Sample::default()
        };
        let mut said = None;
        for tick in 0..=WATCH_TICKS {
            // 2 pairs, each 9,700 acks/s with 970 in flight (4 MiB of 4 KiB messages): 100 ms.
            s.forwarded += 2 * 9_700;
            s.window_full_ms += 1800;
            s.in_flight = if tick % 3 == 0 { 2 * 900 } else { 2 * 970 };
            said = w.next(s, 2).or(said);
        }
        let b = said.expect("window-bound");
        assert_eq!((b.held, b.window), (970, 16384));
        assert_eq!(b.round_trip, Duration::from_millis(100));
        assert!(b.limit().contains("max_inflight_bytes"), "{}", b.limit());
    }

    #[test]
    fn the_acks_pace_is_set_against_the_paths_round_trip() {
        let bound = |path_ms: Option<u64>| {
            let mut w = WindowWatch::default();
            let mut s = Sample {
                window: 20,
                round_trip_us: path_ms.map_or(0, |ms| ms * 1000),
                ..Sample::default()
            };
            (0..=WATCH_TICKS)
                .filter_map(|_| {
                    // One pair, 200 acks/s with 20 in flight: a window every 100 ms.
                    s.forwarded += 200;
                    s.window_full_ms += 900;
                    w.next(s, 1)
                })
                .next()
                .expect("window-bound")
        };
        assert_eq!(bound(None).path_round_trip, None);
        assert_eq!(bound(None).against_the_path(), "");
        let far = bound(Some(95)).against_the_path();
        assert!(
            far.contains("the path's own round trip being 95ms")
                && far.contains("the window over the distance is the limit"),
            "{far}"
        );
        let held = bound(Some(51)).against_the_path();
        assert!(
            held.contains("the path's round trip is 51ms")
                && held.contains("the acks take 49ms more than the distance"),
            "{held}"
        );
    }

    #[test]
    fn a_full_window_without_acks_is_a_stalled_target_not_a_reason_to_grow() {
        let mut s = PoolSizer::new(1, 4);
        let mut sample = Sample {
            window: 20,
            in_flight: 20,
            ..Sample::default()
        };
        for _ in 0..5 {
            sample.received += 10;
            sample.window_full_ms += 1000;
            assert_eq!(s.next(sample), 1);
        }
    }

    #[test]
    fn shrinks_once_what_is_in_flight_fits_in_fewer_pairs_and_not_before() {
        let mut s = PoolSizer::new(1, 8);
        s.active = 4;
        // Traffic goes on but needs ~2 pairs' worth of half-windows: 4 in flight per pair.
        let sizes = window_ticks(&mut s, 2 * UNDERUSED_TICKS as usize + 1, 0.0, 4);
        assert_eq!(
            sizes[..UNDERUSED_TICKS as usize],
            [4; UNDERUSED_TICKS as usize]
        );
        assert_eq!(sizes[UNDERUSED_TICKS as usize], 3, "{sizes:?}");
        assert_eq!(*sizes.last().unwrap(), 2, "{sizes:?}");
        assert_eq!(s.why(), "what is in flight fits in fewer pairs");
        // Half-full windows at 2 pairs (10 of 20 each) would not fit in one: it stays.
        let mut s = PoolSizer::new(1, 8);
        s.active = 2;
        let sizes = window_ticks(&mut s, 3 * UNDERUSED_TICKS as usize, 0.0, 10);
        assert!(sizes.iter().all(|&n| n == 2), "{sizes:?}");
    }

    #[test]
    fn grows_while_quotas_hold_pairs_back_up_to_max() {
        let mut s = PoolSizer::new(1, 5);
        let sizes = run(
            &mut s,
            &[(0, 0), (5, 100), (9, 300), (20, 600), (30, 900), (30, 1100)],
        );
        assert_eq!(sizes, [1, 2, 4, 5, 5, 5], "doubling, capped at the max");
    }

    #[test]
    fn shrinks_one_pair_at_a_time_after_idling_down_to_min() {
        let mut s = PoolSizer::new(2, 8);
        s.active = 5;
        let mut samples = vec![(0, 100)];
        samples.extend(std::iter::repeat_n((0, 100), 20));
        let sizes = run(&mut s, &samples);
        assert_eq!(sizes[..10], [5; 10], "ten idle ticks before shrinking");
        assert_eq!(sizes[10..], [4, 4, 3, 3, 2, 2, 2, 2, 2, 2, 2]);
    }

    #[test]
    fn traffic_without_pacing_keeps_the_size() {
        let mut s = PoolSizer::new(1, 4);
        s.active = 3;
        let sizes = run(&mut s, &[(0, 0), (0, 50), (0, 100), (0, 150)]);
        assert_eq!(sizes, [3, 3, 3, 3]);
    }
}
