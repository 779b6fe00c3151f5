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
    config::{Plan, RoutePlan, Side, client_id},
    loops::{EchoDigest, analysis},
    pair::{PairSpec, driver, retire, spec::SpoolLink, stats::PairStats},
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
    if route.pool_auto {
        let sizer = PoolSizer::new(route.pool_size, route.pool_size_max);
        tasks.push(tokio::spawn(size_pool(
            plan.clone(),
            sizer,
            pairs.clone(),
            switches,
            shutdown,
        )));
    }
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

/// Grows and shrinks an auto-sized pool by switching pairs on and off, until the route stops.
async fn size_pool(
    route: Arc<RoutePlan>,
    mut sizer: PoolSizer,
    pairs: Vec<Arc<PairStats>>,
    switches: Vec<watch::Sender<bool>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(SIZING_TICK);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let sample = Sample {
            paced: pairs.iter().map(|p| PairStats::get(&p.paced)).sum(),
            received: pairs.iter().map(|p| PairStats::get(&p.received)).sum(),
        };
        let before = sizer.active();
        let after = sizer.next(sample);
        if after != before {
            tracing::info!(route = %route.name, pairs = after, was = before, "pool resized: {}", if after > before { "pairs held back by the target's per-connection quota" } else { "no traffic" });
            for (i, s) in switches.iter().enumerate() {
                s.send_if_modified(|on| {
                    let want = i < after;
                    std::mem::replace(on, want) != want
                });
            }
        }
    }
}

/// What the sizer sees each tick: counters summed over the route's pairs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sample {
    /// Times a pair was held back by the target's quotas.
    pub paced: u64,
    pub received: u64,
}

/// The decision of an auto-sized pool (pure): one more pair after any tick in which a pair was
/// held back by its quotas; one fewer per `SHRINK_EVERY` ticks once `IDLE_TICKS` ticks passed
/// without a message.
#[derive(Debug, Clone)]
pub struct PoolSizer {
    min: usize,
    max: usize,
    active: usize,
    last: Option<Sample>,
    idle_ticks: u32,
}

const IDLE_TICKS: u32 = 10;
const SHRINK_EVERY: u32 = 2;

impl PoolSizer {
    pub fn new(min: usize, max: usize) -> Self {
        PoolSizer {
            min,
            max,
            active: min,
            last: None,
            idle_ticks: 0,
        }
    }

    pub fn active(&self) -> usize {
        self.active
    }

    /// Takes this tick's sample and returns how many pairs should be active.
    pub fn next(&mut self, now: Sample) -> usize {
        let Some(last) = self.last.replace(now) else {
            return self.active;
        };
        let paced = now.paced > last.paced;
        if now.received == last.received {
            self.idle_ticks += 1;
        } else {
            self.idle_ticks = 0;
        }
        if paced && self.active < self.max {
            self.active += 1;
        } else if self.idle_ticks >= IDLE_TICKS
            && (self.idle_ticks - IDLE_TICKS).is_multiple_of(SHRINK_EVERY)
            && self.active > self.min
        {
            self.active -= 1;
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
            .map(|&(paced, received)| sizer.next(Sample { paced, received }))
            .collect()
    }

    #[test]
    fn grows_while_quotas_hold_pairs_back_up_to_max() {
        let mut s = PoolSizer::new(1, 3);
        let sizes = run(
            &mut s,
            &[(0, 0), (5, 100), (9, 300), (20, 600), (30, 900), (30, 1100)],
        );
        assert_eq!(sizes, [1, 2, 3, 3, 3, 3]);
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
