//! Bridge configurations for tests: one route between two test brokers, with knobs.

use super::{Bridge, Proto};
use std::time::Duration;

/// One route `src → dst` as TOML. `route_extra` is appended inside `[[routes]]` (before any
/// `[[routes.rewrite]]`), `tail` after everything (rewrite rules, more tables).
#[derive(Clone)]
pub struct RouteConfig {
    pub name: &'static str,
    pub src_port: u16,
    pub src_proto: Proto,
    pub dst_port: u16,
    pub dst_proto: Proto,
    /// Protocol strings for the bridge's connections, when not the clients' (e.g. "3.1").
    pub src_version: Option<&'static str>,
    pub dst_version: Option<&'static str>,
    pub topics: &'static str,
    pub qos: u8,
    pub pool_size: usize,
    pub broker_extra: &'static str,
    pub route_extra: String,
    pub tail: String,
    /// A broker's `url` when not `mqtt://127.0.0.1:<port>` (e.g. `mqtts://…`, `ws://…/mqtt`).
    pub src_url: Option<String>,
    pub dst_url: Option<String>,
    /// Lines for one broker's table only, after `broker_extra`: credentials, or a
    /// `[brokers.src.tls]` / `[brokers.dst.tls]` table (last, as TOML wants).
    pub src_extra: String,
    pub dst_extra: String,
}

impl RouteConfig {
    /// A pool-2 QoS 1 route from a 3.1.1 source to a v5 target with `spool = true`, its spool
    /// in the bridge's directory and an admin endpoint on `admin` (the spool tests' route).
    pub fn spooled(src_port: u16, dst_port: u16, admin: &str) -> Self {
        let mut cfg = RouteConfig::new(src_port, Proto::V311, dst_port, Proto::V5);
        cfg.pool_size = 2;
        cfg.qos = 1;
        cfg.route_extra = "spool = true".into();
        cfg.tail = format!("[spool]\ndir = \"spool\"\n\n[admin]\nlisten = \"{admin}\"\n");
        cfg
    }

    pub fn new(src_port: u16, src_proto: Proto, dst_port: u16, dst_proto: Proto) -> Self {
        RouteConfig {
            name: "r",
            src_port,
            src_proto,
            dst_port,
            dst_proto,
            src_version: None,
            dst_version: None,
            topics: r#"["in/#"]"#,
            qos: 2,
            pool_size: 1,
            broker_extra: "",
            route_extra: String::new(),
            tail: String::new(),
            src_url: None,
            dst_url: None,
            src_extra: String::new(),
            dst_extra: String::new(),
        }
    }

    pub fn toml(&self) -> String {
        format!(
            r#"[bridge]
name = "test"
instance = "t{src}"
summary_interval = "1s"
drain_timeout = "10s"

[brokers.src]
url = "{su}"
protocol = "{sp}"
session_expiry = "1h"
keep_alive = "5s"
{be}
{sx}
[brokers.dst]
url = "{du}"
protocol = "{dp}"
session_expiry = "1h"
keep_alive = "5s"
{be}
{dx}
[[routes]]
name = "{name}"
from = "src"
to = "dst"
topics = {topics}
qos = {qos}
pool_size = {pool}
{re}
{tail}
"#,
            src = self.src_port,
            sp = self.src_version.unwrap_or(self.src_proto.as_config()),
            dp = self.dst_version.unwrap_or(self.dst_proto.as_config()),
            be = self.broker_extra,
            su = self
                .src_url
                .clone()
                .unwrap_or_else(|| format!("mqtt://127.0.0.1:{}", self.src_port)),
            du = self
                .dst_url
                .clone()
                .unwrap_or_else(|| format!("mqtt://127.0.0.1:{}", self.dst_port)),
            sx = self.src_extra,
            dx = self.dst_extra,
            name = self.name,
            topics = self.topics,
            qos = self.qos,
            pool = self.pool_size,
            re = self.route_extra,
            tail = self.tail,
        )
    }
}

/// Starts the bridge and waits until every pair has subscribed (`pairs` "pair ready" lines).
pub async fn start_ready(toml: &str, pairs: usize) -> Bridge {
    let bridge = Bridge::start(toml);
    wait_ready(&bridge, pairs, 1).await;
    bridge
}

/// Waits until the bridge log holds `pairs * round` "pair ready" lines.
pub async fn wait_ready(bridge: &Bridge, pairs: usize, round: usize) {
    let ok = super::wait_until(Duration::from_secs(20), || {
        bridge.log().matches("pair ready").count() >= pairs * round
    })
    .await;
    assert!(ok, "bridge not ready; log:\n{}", bridge.log());
}
