//! The validated, resolved configuration. Built once by `load::load_plan`; `check` prints it and
//! `run` starts from it. Every field here is already checked: consumers trust it.

use std::{collections::BTreeMap, fmt, net::SocketAddr, sync::Arc, time::Duration};

use crate::topic::{Rewrite, TopicFilter, TopicName};

/// MQTT protocol version spoken to one broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// MQTT 3.1: protocol name `MQIsdp`, level 3, client ids of at most 23 characters.
    V31,
    /// MQTT 3.1.1: protocol name `MQTT`, level 4.
    V311,
    /// MQTT 5.0: level 5.
    V5,
}

impl Protocol {
    pub fn is_v5(self) -> bool {
        self == Protocol::V5
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::V31 => "3.1",
            Protocol::V311 => "3.1.1",
            Protocol::V5 => "5",
        })
    }
}

/// Transport of a broker URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Tls,
    Ws,
    Wss,
}

/// A secret string (password). `Debug`/`Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Self {
        Secret(s)
    }
    /// The secret itself: only for putting it on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPlan {
    pub ca_file: Option<std::path::PathBuf>,
    pub cert_file: Option<std::path::PathBuf>,
    pub key_file: Option<std::path::PathBuf>,
    pub server_name: Option<String>,
    pub insecure_skip_verify: bool,
}

/// One broker, resolved.
#[derive(Debug, Clone)]
pub struct BrokerPlan {
    /// The key under `[brokers.<name>]`.
    pub name: String,
    /// The URL as written (for messages).
    pub url: String,
    pub transport: Transport,
    pub host: String,
    pub port: u16,
    /// Path part of a ws:// URL ("/mqtt" when absent); unused for TCP.
    pub path: String,
    pub protocol: Protocol,
    pub client_id_prefix: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub keep_alive: Duration,
    /// Zero: clean session. Above zero: persistent session (v3 clean_session=false, v5 Session Expiry).
    pub session_expiry: Duration,
    /// Cap on our outgoing window towards this broker (default 16384): for 3.x the QoS 1 window.
    pub max_inflight: u16,
    /// Bytes of messages a pair holds in flight towards this broker (default 4 MiB).
    pub max_inflight_bytes: u64,
    /// The highest QoS forwarded to this broker (default 2; a v5 broker's Maximum QoS caps it).
    pub max_qos: Qos,
    /// Cap on QoS 2 messages in flight, within `max_inflight` (default 20 for 3.x).
    pub max_inflight_qos2: u16,
    /// Bytes per second each connection may send to/receive from this broker.
    pub bandwidth_limit: Option<u64>,
    /// PUBLISH packets per second each connection may send to this broker.
    pub max_publish_rate: Option<u32>,
    /// As a source: how long an ack to it may wait for others to share its write (0: none).
    pub ack_delay: Duration,
    /// The largest packet taken from this broker (told to v5 brokers; skipped on 3.x).
    pub max_packet_size: u32,
    /// SUBSCRIBE packets carry at most this many filters.
    pub max_filters_per_subscribe: usize,
    /// MQTT 3.x: CONNECT as a bridge (protocol level | 0x80), mosquitto's `try_private`.
    pub try_private: bool,
    /// Check with a probe message that `$share` subscriptions are really shared.
    pub share_probe: bool,
    /// What this broker is called in `mqbridge-from` loop markers: `brokers.<name>.id`, by
    /// default a stable hash of the URL's host and port (so every bridge reaching the broker
    /// by the same address agrees, and no internal address leaks into messages).
    pub id: String,
    pub tls: Option<TlsPlan>,
}

impl BrokerPlan {
    /// Its per-connection limits in words ("512 KiB/s, 200 PUBLISH/s"), if it has any.
    pub fn per_connection_limits(&self) -> Option<String> {
        let mut limits = Vec::new();
        if let Some(rate) = self.bandwidth_limit {
            limits.push(format!("{}/s", bytesize::ByteSize(rate).display().iec()));
        }
        if let Some(rate) = self.max_publish_rate {
            limits.push(format!("{rate} PUBLISH/s"));
        }
        (!limits.is_empty()).then(|| limits.join(", "))
    }
}

/// Qos as a plain level 0..=2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Qos {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl Qos {
    pub fn from_u8(v: u8) -> Option<Qos> {
        match v {
            0 => Some(Qos::AtMostOnce),
            1 => Some(Qos::AtLeastOnce),
            2 => Some(Qos::ExactlyOnce),
            _ => None,
        }
    }
}

/// How the source connection subscribes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Share {
    /// `$share/<group>/<filter>`
    Share,
    /// BifroMQ's ordered sharing: `$oshare/<group>/<filter>`
    OShare,
    /// The plain filter (every pair receives every message: use with pool_size = 1).
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetainMode {
    AsPublished,
    Clear,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PropertiesMode {
    Forward,
    Drop,
}

/// `loop_markers`: when a route adds its `mqbridge-via` / `mqbridge-from` markers to what it
/// forwards to an MQTT 5 target (SPEC 4.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopMarkers {
    /// Always (the default): `check` cannot see rings that pass through other bridges.
    Always,
    /// Only where `check` finds a possible loop through this route in this config.
    Auto,
    /// Never: the target sees only the publisher's properties.
    Off,
}

impl fmt::Display for LoopMarkers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LoopMarkers::Always => "always",
            LoopMarkers::Auto => "auto",
            LoopMarkers::Off => "off",
        })
    }
}

/// One route, resolved.
#[derive(Debug, Clone)]
pub struct RoutePlan {
    pub name: String,
    pub from: Arc<BrokerPlan>,
    pub to: Arc<BrokerPlan>,
    pub topics: Vec<TopicFilter>,
    pub share: Share,
    pub group: String,
    pub qos: Qos,
    /// Pairs running from the start (with `pool_auto`, the fewest).
    pub pool_size: usize,
    /// Pairs at most (= `pool_size` unless `pool_auto`).
    pub pool_size_max: usize,
    /// `pool_size = "auto"`: grow towards `pool_size_max` while quotas hold pairs back.
    pub pool_auto: bool,
    pub retain: RetainMode,
    pub properties: PropertiesMode,
    pub queue_capacity: usize,
    pub rewrite: Rewrite,
    pub dead_letter: Option<TopicName>,
    pub loop_markers: LoopMarkers,
    /// `spool = true`: this route's spool directory and limit.
    pub spool: Option<SpoolPlan>,
}

/// Where one route keeps its spool (SPEC 4.9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolPlan {
    /// `<spool.dir>/<bridge.name>/<instance>/<route>`; each pair has a directory in it.
    pub dir: std::path::PathBuf,
    pub max_bytes: u64,
    /// `spool.max_age`: older spooled messages are dead-lettered or dropped, not forwarded.
    pub max_age: Option<std::time::Duration>,
}

/// Which side of a pair a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Target,
}

impl RoutePlan {
    /// The filters the source connection subscribes, with the share prefix applied.
    pub fn subscriptions(&self) -> Vec<String> {
        self.topics
            .iter()
            .map(|f| match self.share {
                Share::Share => format!("$share/{}/{}", self.group, f.as_str()),
                Share::OShare => format!("$oshare/{}/{}", self.group, f.as_str()),
                Share::None => f.as_str().to_string(),
            })
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct BridgePlan {
    pub name: String,
    pub instance: String,
    /// How long SIGTERM waits for in-flight messages.
    pub drain_timeout: Duration,
    /// In flight without ack progress this long = stalled.
    pub stall_timeout: Duration,
    /// Period of the summary log line.
    pub summary_interval: Duration,
    /// How long the echo digest remembers a message forwarded into a 3.x broker (zero: off).
    pub loop_digest_window: Duration,
    /// Most messages the echo digest remembers.
    pub loop_digest_capacity: usize,
    /// Threads of the runtime the pairs run on (1: a single-threaded runtime).
    pub worker_threads: usize,
}

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Plan {
    pub bridge: BridgePlan,
    pub admin_listen: Option<SocketAddr>,
    pub brokers: BTreeMap<String, Arc<BrokerPlan>>,
    pub routes: Vec<RoutePlan>,
    /// `<spool.dir>/<bridge.name>/<instance>` when there is a `[spool]` table: every route's
    /// spool is a directory in it.
    pub spool_dir: Option<std::path::PathBuf>,
}

/// Stable client id of one connection of one pair: `<prefix>-<instance>-<route>-<index>`.
///
/// Stable across restarts so persistent sessions resume; the instance keeps replicas of one
/// config apart. When a route bridges a broker to itself (one broker entry, or two at the same
/// host and port with the same prefix), the target side gets a `-t` suffix so the two
/// connections do not take each other's session. MQTT 3.1 allows at most 23 characters:
/// longer ids are cut and end in a stable hash of the full id.
pub fn client_id(bridge: &BridgePlan, route: &RoutePlan, index: usize, side: Side) -> String {
    let broker = match side {
        Side::Source => &route.from,
        Side::Target => &route.to,
    };
    let mut id = format!(
        "{}-{}-{}-{}",
        broker.client_id_prefix, bridge.instance, route.name, index
    );
    // By address, not by name: two broker entries for one broker (a route that rewrites into
    // the broker it reads, declared twice) must not share ids either.
    let same_broker = route.from.name == route.to.name
        || (route.from.host == route.to.host
            && route.from.port == route.to.port
            && route.from.client_id_prefix == route.to.client_id_prefix);
    if side == Side::Target && same_broker {
        id.push_str("-t");
    }
    if broker.protocol == Protocol::V31 && id.len() > 23 {
        id = shorten(&id, 23);
    }
    id
}

/// FNV-1a 64: stable across Rust versions and platforms, unlike `DefaultHasher`.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The default `brokers.<name>.id`: 16 hex digits of a hash of `host:port` (host lower-cased).
pub fn default_broker_id(host: &str, port: u16) -> String {
    format!(
        "{:016x}",
        fnv1a(&format!("{}:{port}", host.to_ascii_lowercase()))
    )
}

/// Cuts `id` to `max` bytes, the last 9 being `-` and 8 hex digits of a stable hash of `id`.
fn shorten(id: &str, max: usize) -> String {
    let hash = fnv1a(id);
    let tag = format!("-{:08x}", hash as u32);
    let mut keep = max - tag.len();
    while !id.is_char_boundary(keep) {
        keep -= 1;
    }
    format!("{}{}", &id[..keep], tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortened_ids_are_stable_distinct_and_fit() {
        let a = shorten("mqbridge-pod-0-telemetry-up-0", 23);
        let b = shorten("mqbridge-pod-0-telemetry-up-1", 23);
        assert_eq!(a.len(), 23);
        assert_eq!(a, shorten("mqbridge-pod-0-telemetry-up-0", 23));
        assert_ne!(a, b);
        assert!(a.starts_with("mqbridge-pod-"));
    }
}
