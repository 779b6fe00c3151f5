//! The running route set: every route of the last accepted config, by name, as a pool of pairs;
//! a SIGHUP applies what `reload` decided (keep, drain and restart, stop, start), and a pool is
//! never started while the previous one under its name still drains (both would use the same
//! client ids and take each other's sessions).

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::task::{JoinError, JoinSet};
use tracing::{error, info, warn};

use crate::{
    admin::RouteStats,
    config::{BridgePlan, Plan},
    loops::EchoDigest,
    reload::{Current, Decision, Fingerprint, Rejected, decide, fingerprint, read_new_plan},
    route::{self, RunningRoute},
};

/// The routes of a running bridge, by name, as the last accepted config wants them.
pub struct Routes {
    /// The last accepted plan, with the `[bridge]` and `[admin]` the process started with.
    plan: Plan,
    digest: Arc<Mutex<EchoDigest>>,
    epoch: Instant,
    /// In the order of `plan.routes`; routes draining after removal at the end.
    slots: Vec<Slot>,
    /// One task per draining pool; each returns its route's name when the pool is done.
    drains: JoinSet<String>,
}

/// One route name: the pool running under it, or the previous one still draining (never both:
/// a new pool would connect with the same client ids and take over the draining one's sessions).
struct Slot {
    name: String,
    live: Option<Live>,
    /// The pairs of a pool that was told to stop and is draining: still reported by the admin
    /// endpoint, since it still holds messages.
    draining: Option<RouteStats>,
    /// Start the route from the plan once `draining` is done.
    start_after_drain: bool,
}

struct Live {
    route: RunningRoute,
    fingerprint: Fingerprint,
    /// (received, forwarded) at the last summary line.
    last: (u64, u64),
    /// `route::source_window_note` was said.
    said_source_window: bool,
}

/// What one reload did, by route name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    pub unchanged: Vec<String>,
}

impl Routes {
    /// Starts every route of `plan`.
    pub fn start(plan: Plan, digest: Arc<Mutex<EchoDigest>>, epoch: Instant) -> Routes {
        let mut routes = Routes {
            plan,
            digest,
            epoch,
            slots: Vec::new(),
            drains: JoinSet::new(),
        };
        for i in 0..routes.plan.routes.len() {
            let live = routes.launch(i);
            routes.slots.push(Slot {
                name: routes.plan.routes[i].name.clone(),
                live: Some(live),
                draining: None,
                start_after_drain: false,
            });
        }
        routes
    }

    /// Starts `self.plan.routes[i]`.
    fn launch(&self, i: usize) -> Live {
        let plan = &self.plan.routes[i];
        Live {
            route: route::start(&self.plan, plan, &self.digest, self.epoch),
            fingerprint: fingerprint(&self.plan, plan),
            last: (0, 0),
            said_source_window: false,
        }
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Routes running now.
    pub fn running(&self) -> usize {
        self.slots.iter().filter(|s| s.live.is_some()).count()
    }

    /// Pairs of the routes running now.
    pub fn pairs(&self) -> usize {
        self.live().map(|l| l.route.pairs.len()).sum()
    }

    fn live(&self) -> impl Iterator<Item = &Live> {
        self.slots.iter().filter_map(|s| s.live.as_ref())
    }

    /// What the admin endpoint reports: the running pools and those still draining.
    pub fn stats(&self) -> Vec<RouteStats> {
        let mut stats = Vec::new();
        for slot in &self.slots {
            if let Some(live) = &slot.live {
                stats.push(RouteStats::of(&live.route));
            }
            if let Some(draining) = &slot.draining {
                stats.push(draining.clone());
            }
        }
        stats
    }

    /// One summary line per running route: rates since the last one (`secs` ago) and totals.
    pub fn log_summary(&mut self, secs: f64) {
        for live in self.slots.iter_mut().filter_map(|s| s.live.as_mut()) {
            let r = &live.route;
            let t = r.totals();
            let prev = live.last;
            info!(
                route = %r.plan.name,
                received_per_s = format!("{:.0}", t.received.saturating_sub(prev.0) as f64 / secs),
                forwarded_per_s = format!("{:.0}", t.forwarded.saturating_sub(prev.1) as f64 / secs),
                received = t.received,
                forwarded = t.forwarded,
                dropped = t.dropped,
                in_flight = t.in_flight,
                in_flight_max = t.in_flight_max,
                window = t.window,
                pairs_ready = t.pairs_ready,
                pairs = r.pairs.len(),
                reconnects = t.reconnects,
                "summary"
            );
            live.last = (t.received, t.forwarded);
            if live.said_source_window {
                continue;
            }
            let p = &r.plan;
            if let Some(note) = route::source_window_note(
                &p.name,
                &p.from.name,
                p.from.protocol,
                p.spool.is_some(),
                t.in_flight_max,
            ) {
                warn!(route = %p.name, in_flight_max = t.in_flight_max, "{note}");
                live.said_source_window = true;
            }
        }
    }

    /// Reads `path` again and applies it. A file that does not validate changes nothing; its
    /// error is logged as `check` would print it. The file, and every TLS certificate and key
    /// it names (read anew: rotated in place, they take effect), are read on a blocking thread,
    /// off the runtime the pairs run on.
    pub async fn reload(&mut self, path: &Path) -> Result<Applied, Rejected> {
        let (path, running) = (path.to_owned(), self.plan.clone());
        let (plan, restart_only) =
            tokio::task::spawn_blocking(move || read_new_plan(&path, &running))
                .await
                .map_err(|e| {
                    Rejected::Unusable(format!("reading the configuration failed: {e}"))
                })??;
        for key in restart_only {
            warn!(
                key,
                "reload: {key} changed, which needs a restart; the running value stays until then"
            );
        }
        let wanted: Vec<(String, Fingerprint)> = plan
            .routes
            .iter()
            .map(|r| (r.name.clone(), fingerprint(&plan, r)))
            .collect();
        self.plan = plan;
        let mut applied = Applied::default();

        // Names the running bridge knows, decided first; then the new ones.
        for s in 0..self.slots.len() {
            let slot = &self.slots[s];
            let current = match (&slot.live, &slot.draining) {
                (Some(live), _) => Current::Running(live.fingerprint.clone()),
                (None, Some(_)) => Current::Draining,
                (None, None) => Current::Absent,
            };
            let new = wanted.iter().find(|(n, _)| *n == slot.name).map(|(_, f)| f);
            let name = slot.name.clone();
            match decide(&current, new) {
                Decision::Keep => applied.unchanged.push(name),
                Decision::Replace => {
                    if let (Current::Running(old), Some(new)) = (&current, new) {
                        let changed = old.changed_keys(new).join(", ");
                        info!(route = %name, %changed, "reload: route changed; draining its pairs, then starting them with the new settings");
                    }
                    self.retire(s, true);
                    applied.changed.push(name);
                }
                Decision::Stop => {
                    info!(route = %name, "reload: route removed; draining and stopping its pairs");
                    self.retire(s, false);
                    applied.removed.push(name);
                }
                Decision::StartAfterDrain => {
                    info!(route = %name, "reload: route changed while its previous pairs drain; starting it once they are done");
                    self.slots[s].start_after_drain = true;
                    applied.changed.push(name);
                }
                Decision::StayStopped => {
                    self.slots[s].start_after_drain = false;
                    applied.removed.push(name);
                }
                Decision::Start => {
                    // An empty slot is removed once its pool drained; not reached.
                    self.start_slot(s);
                    applied.added.push(name);
                }
            }
        }
        for (name, _) in &wanted {
            if self.slots.iter().any(|s| s.name == *name) {
                continue;
            }
            info!(route = %name, "reload: route added; starting its pairs");
            self.slots.push(Slot {
                name: name.clone(),
                live: None,
                draining: None,
                start_after_drain: false,
            });
            self.start_slot(self.slots.len() - 1);
            applied.added.push(name.clone());
        }
        self.order_slots();
        Ok(applied)
    }

    /// Starts the slot's route from the current plan, if the plan still has it.
    fn start_slot(&mut self, s: usize) {
        if let Some(i) = self
            .plan
            .routes
            .iter()
            .position(|r| r.name == self.slots[s].name)
        {
            let live = self.launch(i);
            self.slots[s].live = Some(live);
        }
    }

    /// Tells the slot's running pool to drain, and watches it until it is done.
    fn retire(&mut self, s: usize, start_after_drain: bool) {
        let slot = &mut self.slots[s];
        let Some(live) = slot.live.take() else {
            return;
        };
        live.route.stop();
        slot.draining = Some(RouteStats::of(&live.route));
        slot.start_after_drain = start_after_drain;
        let limit = drain_limit(&self.plan.bridge);
        let name = slot.name.clone();
        self.drains.spawn(async move {
            let mut route = live.route;
            route.join(limit).await;
            log_final(&route);
            name
        });
    }

    /// Whether some pool is draining (then [`Routes::next_drained`] has something to wait for).
    pub fn draining(&self) -> bool {
        !self.drains.is_empty()
    }

    /// Waits for a draining pool to finish; pending forever while none is draining.
    pub async fn next_drained(&mut self) -> Result<String, JoinError> {
        match self.drains.join_next().await {
            Some(done) => done,
            None => std::future::pending().await,
        }
    }

    /// A draining pool is done: start what waited for it, forget the name if nothing did.
    pub fn drained(&mut self, done: Result<String, JoinError>) {
        let name = match done {
            Ok(name) => name,
            Err(e) => {
                // Cannot tell which route: its slot stays marked draining (nothing restarts it).
                error!("a draining route's watcher failed: {e}");
                return;
            }
        };
        let Some(s) = self.slots.iter().position(|s| s.name == name) else {
            return;
        };
        self.slots[s].draining = None;
        if std::mem::take(&mut self.slots[s].start_after_drain) {
            info!(route = %name, "previous pairs drained; starting the route with its new settings");
            self.start_slot(s);
        }
        if self.slots[s].live.is_none() {
            self.slots.remove(s);
        }
    }

    /// The plan's order first (so logs and metrics follow the file), then what is only draining.
    fn order_slots(&mut self) {
        let routes = &self.plan.routes;
        self.slots.sort_by_key(|s| {
            routes
                .iter()
                .position(|r| r.name == s.name)
                .unwrap_or(usize::MAX)
        });
    }

    /// SIGTERM: every pool drains (up to `drain_timeout`) and stops; then the final counts.
    pub async fn shutdown(mut self) {
        let limit = drain_limit(&self.plan.bridge);
        for live in self.slots.iter().filter_map(|s| s.live.as_ref()) {
            live.route.stop();
        }
        for live in self.slots.iter_mut().filter_map(|s| s.live.as_mut()) {
            live.route.join(limit).await;
        }
        // Pools retired by a reload are already draining, with their own deadline.
        let _ = tokio::time::timeout(limit, async {
            while self.drains.join_next().await.is_some() {}
        })
        .await;
        for live in self.live() {
            log_final(&live.route);
        }
    }
}

/// How long to wait for a stopping pool: its own drain deadline and a little for the goodbye.
fn drain_limit(bridge: &BridgePlan) -> Duration {
    bridge.drain_timeout + Duration::from_secs(3)
}

fn log_final(r: &RunningRoute) {
    let t = r.totals();
    info!(route = %r.plan.name, received = t.received, forwarded = t.forwarded, dropped = t.dropped, loops = t.loops, in_flight = t.in_flight, in_flight_max = t.in_flight_max, window = t.window, "final");
}
