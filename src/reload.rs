//! SIGHUP reload: the config file is read again and applied route by route. A route whose
//! fingerprint (everything it depends on) is unchanged keeps running untouched; a removed route
//! drains and stops; a changed one drains, then starts again with its new plan; an added one
//! starts. `[bridge]` and `[admin]` are read at start only: a change there is reported as
//! needing a restart. The decisions here are pure; `route_set::Routes` applies them.

use std::{
    collections::BTreeMap,
    fmt,
    hash::{BuildHasher, RandomState},
    path::Path,
    sync::LazyLock,
};

use crate::{
    config::{BridgePlan, BrokerPlan, ConfigError, Plan, RoutePlan, load},
    link,
    loops::analysis,
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
        loop_markers,
        spool,
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
    parts.public(key("spool"), spool);
    parts.public(key("loop_markers"), loop_markers);
    // With "auto", whether markers are written depends on the other routes too.
    parts.public(
        key("loop markers (in effect)"),
        &analysis::writes_markers(plan, route),
    );
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
        max_inflight_bytes,
        max_qos,
        max_inflight_qos2,
        bandwidth_limit,
        max_publish_rate,
        ack_delay,
        max_packet_size,
        max_filters_per_subscribe,
        try_private,
        share_probe,
        id,
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
    parts.public(key("max_inflight_bytes"), max_inflight_bytes);
    parts.public(key("max_qos"), max_qos);
    parts.public(key("max_inflight_qos2"), max_inflight_qos2);
    parts.public(key("bandwidth_limit"), bandwidth_limit);
    parts.public(key("max_publish_rate"), max_publish_rate);
    parts.public(key("ack_delay"), ack_delay);
    parts.public(key("max_packet_size"), max_packet_size);
    parts.public(key("max_filters_per_subscribe"), max_filters_per_subscribe);
    parts.public(key("try_private"), try_private);
    parts.public(key("share_probe"), share_probe);
    parts.public(key("id"), id);
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
pub fn read_new_plan(path: &Path, running: &Plan) -> Result<(Plan, Vec<String>), Rejected> {
    let as_written = load::load_plan(path)?;
    let mut restart_only: Vec<String> = restart_only_changes(running, &as_written)
        .into_iter()
        .map(String::from)
        .collect();
    let same_identity = as_written.bridge.name == running.bridge.name
        && as_written.bridge.instance == running.bridge.instance;
    let mut plan = if same_identity {
        as_written
    } else {
        load::load_plan_keeping_bridge(path, &running.bridge)?
    };
    plan.bridge = running.bridge.clone();
    plan.admin_listen = running.admin_listen;
    // A running route's spool (whether it has one, where, how large) changes on restart only:
    // switching it off or moving it with a reload would strand what it holds.
    for route in &mut plan.routes {
        if let Some(run) = running.routes.iter().find(|r| r.name == route.name)
            && run.spool != route.spool
        {
            restart_only.push(format!("routes.{}.spool (or [spool])", route.name));
            route.spool = run.spool.clone();
        }
    }
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
