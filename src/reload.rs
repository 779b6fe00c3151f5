//! SIGHUP reload: the config file is read again and applied route by route. A route whose
//! fingerprint (everything it depends on) is unchanged keeps running untouched; a removed route
//! drains and stops; a changed one drains, then starts again with its new plan; an added one
//! starts. `[bridge]` and `[admin]` are read at start only: a change there is reported as
//! needing a restart. The decisions are pure functions at the top; [`Routes`] applies them.

use std::{
    collections::BTreeMap,
    fmt,
    hash::{BuildHasher, RandomState},
    path::Path,
    sync::{Arc, LazyLock, Mutex},
    time::{Duration, Instant},
};

use tokio::task::{JoinError, JoinSet};
use tracing::{error, info, warn};

use crate::{
    admin::RouteStats,
    config::{BridgePlan, BrokerPlan, ConfigError, Plan, RoutePlan, load},
    link,
    loops::{EchoDigest, analysis},
    route::{self, RunningRoute},
};

// ---------------------------------------------------------------------------------------------
// What changed (pure)

/// Everything a running route depends on, as named parts: its own keys, its two brokers'
/// settings (the password included) and the loop guard it derives from the other routes. Two
/// routes with equal fingerprints would run identically. Each part is kept only as a hash, keyed
/// per process, so that no secret is copied or printable from here.
#[derive(Clone, PartialEq, Eq)]
pub struct Fingerprint(BTreeMap<String, u64>);

impl fmt::Debug for Fingerprint {
    // Deliberately no hashes: a hash of a password is still about the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({} parts)", self.0.len())
    }
}

impl Fingerprint {
    /// The parts (config keys) in which `self` and `new` differ, for the log.
    pub fn changed_keys(&self, new: &Fingerprint) -> Vec<String> {
        let mut keys: Vec<String> = self
            .0
            .iter()
            .filter(|(k, v)| new.0.get(*k) != Some(v))
            .map(|(k, _)| k.clone())
            .collect();
        keys.extend(new.0.keys().filter(|k| !self.0.contains_key(*k)).cloned());
        keys.sort();
        keys
    }
}

/// Random per process: fingerprints are compared within one process only.
static HASH_KEYS: LazyLock<RandomState> = LazyLock::new(RandomState::new);

struct Parts(BTreeMap<String, u64>);

impl Parts {
    fn public(&mut self, key: String, value: &dyn fmt::Debug) {
        self.0.insert(key, HASH_KEYS.hash_one(format!("{value:?}")));
    }

    fn secret(&mut self, key: String, value: Option<&str>) {
        self.0.insert(key, HASH_KEYS.hash_one(value));
    }
}

/// The fingerprint of `route`, one of `plan`'s routes.
pub fn fingerprint(plan: &Plan, route: &RoutePlan) -> Fingerprint {
    let mut parts = Parts(BTreeMap::new());
    // Destructured without `..`: a field added to `RoutePlan` must be added here, or a change
    // to it would go unnoticed by reloads.
    let RoutePlan {
        name,
        from,
        to,
        topics,
        share,
        group,
        qos,
        pool_size,
        pool_size_max,
        pool_auto,
        retain,
        properties,
        queue_capacity,
        rewrite,
        dead_letter,
    } = route;
    let key = |k: &str| format!("routes.{name}.{k}");
    parts.public(key("from"), &from.name);
    parts.public(key("to"), &to.name);
    parts.public(key("topics"), topics);
    parts.public(key("share"), share);
    parts.public(key("group"), group);
    parts.public(key("qos"), qos);
    parts.public(key("pool_size"), &(pool_size, pool_size_max, pool_auto));
    parts.public(key("retain"), retain);
    parts.public(key("properties"), properties);
    parts.public(key("queue_capacity"), queue_capacity);
    parts.public(key("rewrite"), rewrite);
    parts.public(key("dead_letter"), dead_letter);
    // Whether the route records or checks echoes depends on the other routes: adding a route
    // back into a 3.x broker changes what this one must do.
    parts.public(
        key("loop guard (echo digest)"),
        &analysis::digest_roles(plan, route),
    );
    broker_parts(&mut parts, from);
    broker_parts(&mut parts, to);
    Fingerprint(parts.0)
}

fn broker_parts(parts: &mut Parts, broker: &BrokerPlan) {
    // Without `..` for the same reason as in `fingerprint`.
    let BrokerPlan {
        name,
        url,
        transport,
        host,
        port,
        path,
        protocol,
        client_id_prefix,
        username,
        password,
        keep_alive,
        session_expiry,
        max_inflight,
        bandwidth_limit,
        max_publish_rate,
        max_packet_size,
        max_filters_per_subscribe,
        try_private,
        share_probe,
        tls,
    } = broker;
    let key = |k: &str| format!("brokers.{name}.{k}");
    parts.public(key("url"), &(url, transport, host, port, path));
    parts.public(key("protocol"), protocol);
    parts.public(key("client_id_prefix"), client_id_prefix);
    parts.public(key("username"), username);
    parts.secret(key("password"), password.as_ref().map(|p| p.expose()));
    parts.public(key("keep_alive"), keep_alive);
    parts.public(key("session_expiry"), session_expiry);
    parts.public(key("max_inflight"), max_inflight);
    parts.public(key("bandwidth_limit"), bandwidth_limit);
    parts.public(key("max_publish_rate"), max_publish_rate);
    parts.public(key("max_packet_size"), max_packet_size);
    parts.public(key("max_filters_per_subscribe"), max_filters_per_subscribe);
    parts.public(key("try_private"), try_private);
    parts.public(key("share_probe"), share_probe);
    parts.public(key("tls"), tls);
}

/// The `[bridge]` and `[admin]` keys whose value differs between the running plan and `new`:
/// they are read at start only (client ids, share groups, loop markers, the digest, the admin
/// socket and the timeouts every running pair was given).
pub fn restart_only_changes(running: &Plan, new: &Plan) -> Vec<&'static str> {
    // Without `..`: a new `[bridge]` key must be classified here.
    let BridgePlan {
        name,
        instance,
        drain_timeout,
        stall_timeout,
        summary_interval,
        loop_digest_window,
        loop_digest_capacity,
        worker_threads,
    } = &running.bridge;
    let n = &new.bridge;
    let mut keys = Vec::new();
    let mut differs = |key, changed: bool| {
        if changed {
            keys.push(key);
        }
    };
    differs("bridge.name", *name != n.name);
    differs("bridge.instance", *instance != n.instance);
    differs("bridge.drain_timeout", *drain_timeout != n.drain_timeout);
    differs("bridge.stall_timeout", *stall_timeout != n.stall_timeout);
    differs(
        "bridge.summary_interval",
        *summary_interval != n.summary_interval,
    );
    differs(
        "bridge.loop_digest_window",
        *loop_digest_window != n.loop_digest_window,
    );
    differs(
        "bridge.loop_digest_capacity",
        *loop_digest_capacity != n.loop_digest_capacity,
    );
    differs("bridge.worker_threads", *worker_threads != n.worker_threads);
    differs("admin.listen", running.admin_listen != new.admin_listen);
    keys
}

/// Where one route name stands before a reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Current {
    /// Running with this fingerprint.
    Running(Fingerprint),
    /// A previous pool is draining; nothing runs under this name until it is done.
    Draining,
    /// Not known to the running bridge.
    Absent,
}

/// What a reload does with one route name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Leave it as it is (running untouched, or nothing to do).
    Keep,
    /// Start it now.
    Start,
    /// Drain and stop it.
    Stop,
    /// Drain and stop it, then start it with the new plan.
    Replace,
    /// A previous pool is draining: start this one once it is done (the same client ids must
    /// not be connected twice).
    StartAfterDrain,
    /// A previous pool is draining and the route is gone: start nothing after it.
    StayStopped,
}

/// The decision for a route that is `current` and that the new config wants with fingerprint
/// `wanted` (`None`: removed).
pub fn decide(current: &Current, wanted: Option<&Fingerprint>) -> Decision {
    match (current, wanted) {
        (Current::Running(fp), Some(new)) if fp == new => Decision::Keep,
        (Current::Running(_), Some(_)) => Decision::Replace,
        (Current::Running(_), None) => Decision::Stop,
        (Current::Draining, Some(_)) => Decision::StartAfterDrain,
        (Current::Draining, None) => Decision::StayStopped,
        (Current::Absent, Some(_)) => Decision::Start,
        (Current::Absent, None) => Decision::Keep,
    }
}

/// Why a new config file is not applied.
#[derive(Debug, thiserror::Error)]
pub enum Rejected {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Unusable(String),
}

/// Reads `path` for a bridge running `running`: validated as `check` does, then with the
/// running `[bridge]` and `[admin]` in place of the file's (see [`restart_only_changes`], the
/// second value). The result is checked again where the kept settings matter (loops, TLS).
pub fn read_new_plan(path: &Path, running: &Plan) -> Result<(Plan, Vec<&'static str>), Rejected> {
    let as_written = load::load_plan(path)?;
    let restart_only = restart_only_changes(running, &as_written);
    let same_identity = as_written.bridge.name == running.bridge.name
        && as_written.bridge.instance == running.bridge.instance;
    let mut plan = if same_identity {
        as_written
    } else {
        load::load_plan_keeping_bridge(path, &running.bridge)?
    };
    plan.bridge = running.bridge.clone();
    plan.admin_listen = running.admin_listen;
    // The file's routes were checked against the file's loop digest settings; the running
    // ones may not cut the same loops.
    if let Some(why) = analysis::uncuttable(&plan) {
        return Err(Rejected::Unusable(format!(
            "bridge.loop_digest_window (running value): {why}"
        )));
    }
    link::reload_tls(plan.brokers.values().map(|b| b.as_ref()))
        .map_err(|e| Rejected::Unusable(e.to_string()))?;
    Ok((plan, restart_only))
}

// ---------------------------------------------------------------------------------------------
// The running routes

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::load_plan_with_env;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Two brokers and two routes; `{rewrite}`, `{password}` and `{extra}` vary per test.
    fn config(rewrite: &str, password: &str, extra: &str) -> String {
        format!(
            r#"
[bridge]
name = "edge-1"
instance = "pod-0"

[brokers.edge]
url = "mqtt://127.0.0.1:1883"

[brokers.cloud]
url = "mqtt://127.0.0.1:1884"
username = "bridge"
password = "{password}"

[[routes]]
name = "keep"
from = "edge"
to = "cloud"
topics = ["k/#"]

[[routes]]
name = "change"
from = "edge"
to = "edge"
topics = ["c/#"]

[[routes.rewrite]]
match = "c/#"
to = "{rewrite}/{{1}}"
{extra}
"#
        )
    }

    fn plan(text: &str) -> Plan {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "mqbridge-reload-{}-{}.toml",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, text).unwrap();
        let plan = load_plan_with_env(&path, [("HOSTNAME", "host")]);
        let _ = std::fs::remove_file(&path);
        plan.unwrap()
    }

    fn prints(plan: &Plan) -> BTreeMap<String, Fingerprint> {
        plan.routes
            .iter()
            .map(|r| (r.name.clone(), fingerprint(plan, r)))
            .collect()
    }

    #[test]
    fn the_same_file_changes_nothing() {
        let a = plan(&config("old", "pw-1", ""));
        let b = plan(&config("old", "pw-1", ""));
        assert_eq!(prints(&a), prints(&b));
        assert!(restart_only_changes(&a, &b).is_empty());
    }

    #[test]
    fn a_new_rewrite_changes_only_its_route() {
        let (a, b) = (
            prints(&plan(&config("old", "pw-1", ""))),
            prints(&plan(&config("new", "pw-1", ""))),
        );
        assert_eq!(a["keep"], b["keep"]);
        assert_ne!(a["change"], b["change"]);
        assert_eq!(
            a["change"].changed_keys(&b["change"]),
            ["routes.change.rewrite"]
        );
    }

    #[test]
    fn a_new_password_changes_the_routes_of_its_broker_and_is_never_shown() {
        let (a, b) = (
            prints(&plan(&config("old", "secret-one", ""))),
            prints(&plan(&config("old", "secret-two", ""))),
        );
        // `keep` writes to cloud, whose password changed; `change` stays on edge.
        assert_ne!(a["keep"], b["keep"]);
        assert_eq!(a["change"], b["change"]);
        let keys = a["keep"].changed_keys(&b["keep"]);
        assert_eq!(keys, ["brokers.cloud.password"]);
        let shown = format!("{:?} {:?} {keys:?}", a["keep"], b["keep"]);
        assert!(!shown.contains("secret"), "{shown}");
    }

    #[test]
    fn a_broker_setting_changes_every_route_using_it() {
        let a = plan(&config("old", "pw", ""));
        let text = config("old", "pw", "").replace(
            "url = \"mqtt://127.0.0.1:1883\"",
            "url = \"mqtt://127.0.0.1:1883\"\nprotocol = \"3.1.1\"",
        );
        let (pa, pb) = (prints(&a), prints(&plan(&text)));
        assert_ne!(pa["keep"], pb["keep"]);
        assert_ne!(pa["change"], pb["change"]);
        assert!(
            pa["keep"]
                .changed_keys(&pb["keep"])
                .contains(&"brokers.edge.protocol".to_string())
        );
    }

    #[test]
    fn a_route_back_into_a_3x_broker_changes_the_loop_guard_of_the_route_into_it() {
        let base = config("old", "pw", "").replace(
            "username = \"bridge\"",
            "protocol = \"3.1.1\"\nusername = \"bridge\"",
        );
        let back =
            "\n[[routes]]\nname = \"down\"\nfrom = \"cloud\"\nto = \"edge\"\ntopics = [\"d/#\"]\n";
        let (a, b) = (
            prints(&plan(&base)),
            prints(&plan(&format!("{base}{back}"))),
        );
        assert_eq!(
            a["keep"].changed_keys(&b["keep"]),
            ["routes.keep.loop guard (echo digest)"]
        );
    }

    #[test]
    fn bridge_and_admin_changes_are_named_as_needing_a_restart() {
        let a = plan(&config("old", "pw", ""));
        let text = config("old", "pw", "")
            .replace(
                "name = \"edge-1\"",
                "name = \"edge-2\"\ndrain_timeout = \"20s\"",
            )
            .replace(
                "[brokers.edge]",
                "[admin]\nlisten = \"127.0.0.1:9464\"\n\n[brokers.edge]",
            );
        let b = plan(&text);
        assert_eq!(
            restart_only_changes(&a, &b),
            ["bridge.name", "bridge.drain_timeout", "admin.listen"]
        );
    }

    #[test]
    fn a_reload_keeps_the_running_bridge_name_in_derived_defaults() {
        let a = plan(&config("old", "pw", ""));
        let path = std::env::temp_dir().join(format!(
            "mqbridge-reload-renamed-{}.toml",
            std::process::id()
        ));
        std::fs::write(
            &path,
            config("old", "pw", "").replace("name = \"edge-1\"", "name = \"edge-2\""),
        )
        .unwrap();
        let (b, restart) = read_new_plan(&path, &a).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(restart, ["bridge.name"]);
        assert_eq!(b.bridge.name, "edge-1");
        assert_eq!(b.routes[0].group, "edge-1-keep");
        assert_eq!(prints(&a), prints(&b));
    }

    #[test]
    fn decisions() {
        let fp = prints(&plan(&config("old", "pw", "")))["keep"].clone();
        let other = prints(&plan(&config("old", "pw2", "")))["keep"].clone();
        let running = Current::Running(fp.clone());
        assert_eq!(decide(&running, Some(&fp)), Decision::Keep);
        assert_eq!(decide(&running, Some(&other)), Decision::Replace);
        assert_eq!(decide(&running, None), Decision::Stop);
        assert_eq!(
            decide(&Current::Draining, Some(&fp)),
            Decision::StartAfterDrain
        );
        assert_eq!(decide(&Current::Draining, None), Decision::StayStopped);
        assert_eq!(decide(&Current::Absent, Some(&fp)), Decision::Start);
    }
}
