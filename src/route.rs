//! A route's pool: `pool_size` pairs, each a task running `pair::driver`, sharing the route's
//! subscriptions through the broker's shared subscription group. Each route has its own stop
//! signal, so that a reload can drain one route and leave the others running.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{sync::watch, task::JoinHandle};

pub use crate::pair::driver::LoopGuard;

use crate::{
    config::{Plan, RoutePlan, Side, client_id},
    loops::{EchoDigest, analysis},
    pair::{
        driver::{self, PairSpec},
        stats::PairStats,
    },
};

/// A running route: its pairs' stats and tasks.
pub struct RunningRoute {
    pub plan: Arc<RoutePlan>,
    pub pairs: Vec<Arc<PairStats>>,
    pub tasks: Vec<JoinHandle<()>>,
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
        source_id: format!("{}:{}", route.from.host, route.from.port),
        target_id: format!("{}:{}", route.to.host, route.to.port),
        digest: (record_echoes || check_echoes).then(|| digest.clone()),
        record_echoes,
        check_echoes,
    };
    let plan = Arc::new(route.clone());
    let mut pairs = Vec::new();
    let mut tasks = Vec::new();
    for index in 0..route.pool_size {
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
        };
        pairs.push(stats);
        tasks.push(tokio::spawn(driver::run(spec, shutdown.clone())));
    }
    RunningRoute {
        plan,
        pairs,
        tasks,
        stop,
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

    /// Waits for every pair to finish (after [`RunningRoute::stop`]), at most `limit`.
    pub async fn join(&mut self, limit: Duration) {
        let tasks = std::mem::take(&mut self.tasks);
        let _ = tokio::time::timeout(limit, async {
            for t in tasks {
                let _ = t.await;
            }
        })
        .await;
    }
}
