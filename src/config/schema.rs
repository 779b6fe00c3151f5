//! The configuration file exactly as the operator writes it (SPEC §3): one documented serde struct
//! per table, every key with its default. A value is parsed here as far as it can be on its own
//! (durations, sizes, choices, numbers written as strings); checks that need other keys and the
//! resolution into a [`Plan`](super::Plan) happen in `load`.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::Deserialize;

use super::plan::{LoopMarkers, PropertiesMode, Protocol, Qos, RetainMode, Secret, Share};

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[bridge]`: the logical bridge this process is one instance of.
    #[serde(default)]
    pub bridge: Bridge,
    /// `[admin]`: the HTTP endpoint (`/metrics`, `/healthz`, `/readyz`); absent = no endpoint.
    #[serde(default)]
    pub admin: Option<Admin>,
    /// `[brokers.<name>]`: the brokers routes connect to, by name.
    #[serde(default)]
    pub brokers: BTreeMap<String, Broker>,
    /// `[[routes]]`: what is taken from which broker and republished to which.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// `[spool]`: where routes with `spool = true` keep what the target has not taken yet.
    #[serde(default)]
    pub spool: Option<Spool>,
}

/// `[spool]` (SPEC 4.9)
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spool {
    /// Required: the directory; each route's spool is `<dir>/<bridge.name>/<instance>/<route>/`.
    /// Relative to the config file's directory.
    pub dir: Option<String>,
    /// Per route; when full the route stops reading its source (never drops). Default 1 GiB.
    #[serde(default, deserialize_with = "parse::opt_byte_size")]
    pub max_bytes: Option<u64>,
    /// A spooled message older than this is dead-lettered (or dropped) and counted instead of
    /// forwarded. Default: none (a message stays until the target takes it or it expires).
    #[serde(default, deserialize_with = "parse::opt_duration")]
    pub max_age: Option<Duration>,
}

/// `[bridge]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bridge {
    /// Required. The logical bridge: the default client id prefix and share groups are derived
    /// from it, and forwarded MQTT 5 messages carry it as the `mqbridge-via` loop marker.
    pub name: Option<String>,
    /// This process among replicas of one config (default: the host name, which is the pod name
    /// on Kubernetes). Part of every client id, so replicas never take each other's sessions.
    pub instance: Option<String>,
    /// How long SIGTERM waits for in-flight messages before disconnecting.
    #[serde(
        default = "default_drain_timeout",
        deserialize_with = "parse::duration"
    )]
    pub drain_timeout: Duration,
    /// In-flight messages without ack progress for this long make `/readyz` report stalled.
    #[serde(
        default = "default_stall_timeout",
        deserialize_with = "parse::duration"
    )]
    pub stall_timeout: Duration,
    /// Period of the summary log line (rates, in flight, drops).
    #[serde(
        default = "default_summary_interval",
        deserialize_with = "parse::duration"
    )]
    pub summary_interval: Duration,
    /// How long a message forwarded into an MQTT 3.x broker is remembered, so that its echo
    /// coming back through a route in the opposite direction is recognised and dropped (3.x
    /// carries no loop marker). "0s" turns the digest off.
    #[serde(
        default = "default_loop_digest_window",
        deserialize_with = "parse::duration"
    )]
    pub loop_digest_window: Duration,
    /// At most this many messages remembered by the echo digest (about 40 bytes each); the
    /// oldest are forgotten first.
    #[serde(
        default = "default_loop_digest_capacity",
        deserialize_with = "parse::uint"
    )]
    pub loop_digest_capacity: u64,
    /// Threads that run the pairs. One by default: a thread forwards far more than two
    /// brokers deliver, and pairs sharing it cost less per message than pairs spread over
    /// cores (docs/ARCHITECTURE.md). More for many TLS pairs at high rates.
    #[serde(default = "default_worker_threads", deserialize_with = "parse::uint")]
    pub worker_threads: u64,
}

pub const fn default_worker_threads() -> u64 {
    1
}

pub const fn default_loop_digest_window() -> Duration {
    Duration::from_secs(10)
}

pub const fn default_loop_digest_capacity() -> u64 {
    100_000
}

impl Default for Bridge {
    fn default() -> Self {
        Bridge {
            name: None,
            instance: None,
            drain_timeout: default_drain_timeout(),
            stall_timeout: default_stall_timeout(),
            summary_interval: default_summary_interval(),
            loop_digest_window: default_loop_digest_window(),
            loop_digest_capacity: default_loop_digest_capacity(),
            worker_threads: default_worker_threads(),
        }
    }
}

pub const fn default_drain_timeout() -> Duration {
    Duration::from_secs(10)
}

pub const fn default_stall_timeout() -> Duration {
    Duration::from_secs(30)
}

pub const fn default_summary_interval() -> Duration {
    Duration::from_secs(10)
}

/// `[admin]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// `host:port` to serve on. Loopback by default: metrics are not for the whole network
    /// unless the operator says so.
    #[serde(default = "default_admin_listen")]
    pub listen: String,
}

pub fn default_admin_listen() -> String {
    "127.0.0.1:9464".to_owned()
}

/// `[brokers.<name>]`: one broker. The name is what routes refer to in `from` and `to`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Broker {
    /// Required. `mqtt://host[:1883]`, `mqtts://host[:8883]`, `ws://host[:80][/path]` or
    /// `wss://host[:443][/path]` (the WebSocket path defaults to `/mqtt`).
    pub url: Option<String>,
    /// `"3.1"`, `"3.1.1"` or `"5"`.
    #[serde(default = "default_protocol", deserialize_with = "parse::protocol")]
    pub protocol: Protocol,
    /// Start of every client id on this broker (default: the bridge name).
    pub client_id_prefix: Option<String>,
    /// User name for the broker's authentication (MQTT 3.x needs one to send a password).
    pub username: Option<String>,
    /// The password itself; prefer `password_file` or an `MQBRIDGE__BROKERS__<NAME>__PASSWORD`
    /// environment variable. Never printed or logged.
    #[serde(default, deserialize_with = "parse::secret")]
    pub password: Option<Secret>,
    /// A file holding the password (one trailing newlines are ignored); relative to the config
    /// file's directory. Exclusive with `password`.
    pub password_file: Option<PathBuf>,
    /// MQTT keep alive, whole seconds, at most 65535s; `"0s"` turns it off.
    #[serde(default = "default_keep_alive", deserialize_with = "parse::duration")]
    pub keep_alive: Duration,
    /// How long the broker keeps the bridge's session while it is away. Above zero the session
    /// is persistent (v3 `clean_session = false`, v5 Session Expiry Interval), which is what
    /// lets the source redeliver unacknowledged QoS ≥ 1 messages after a restart, so the
    /// default is one hour rather than MQTT's zero. `"0s"`: clean sessions, which can lose
    /// QoS ≥ 1 messages across restarts.
    #[serde(
        default = "default_session_expiry",
        deserialize_with = "parse::duration"
    )]
    pub session_expiry: Duration,
    /// Cap on our own window towards this broker, 1..=65535 (default 16384; an MQTT 5 broker's
    /// Receive Maximum caps it further). Towards 3.x brokers this is the QoS 1 window: mosquitto,
    /// NATS and RabbitMQ lose nothing with 50,000 unacknowledged QoS 1 publishes
    /// (examples/inflight_probe.rs, docs/BENCHMARKS.md).
    #[serde(default, deserialize_with = "parse::opt_uint")]
    pub max_inflight: Option<u64>,
    /// Bytes of messages a pair holds in flight towards this broker, e.g. `"4MiB"` (the
    /// default): with small messages `max_inflight` binds, with large ones this does, so a
    /// pair's memory stays bounded whatever the message size.
    #[serde(default, deserialize_with = "parse::opt_byte_size")]
    pub max_inflight_bytes: Option<u64>,
    /// The highest QoS this broker takes as a target, 0..=2 (default 2). MQTT 5 brokers say it
    /// in their CONNACK; a 3.x broker cannot, and NATS closes the connection at a QoS 2
    /// PUBLISH: `max_qos = 1` forwards QoS 2 messages to it at QoS 1 (at least once).
    #[serde(default, deserialize_with = "parse::opt_uint")]
    pub max_qos: Option<u64>,
    /// Cap on QoS 2 messages in flight towards this broker, within `max_inflight` (default: 20
    /// for 3.x, whose window cannot be learned and which mosquitto enforces by acknowledging and
    /// then dropping QoS 2 beyond it; for 5, `max_inflight`: Receive Maximum counts both).
    #[serde(default, deserialize_with = "parse::opt_uint")]
    pub max_inflight_qos2: Option<u64>,
    /// Bytes per second each connection may send to or receive from this broker, e.g.
    /// `"512KiB/s"` (BifroMQ's default). Absent: no limit.
    #[serde(default, deserialize_with = "parse::opt_byte_rate")]
    pub bandwidth_limit: Option<u64>,
    /// The largest packet taken from this broker, e.g. `"16MiB"` (the default) or `"1MB"`. A v5
    /// broker is told (CONNECT Maximum Packet Size) and discards larger messages itself; a 3.x
    /// broker cannot be told, so a larger PUBLISH is skipped unread, acknowledged and counted
    /// as `too_large` (dead-lettered without its payload).
    #[serde(default, deserialize_with = "parse::opt_byte_size")]
    pub max_packet_size: Option<u64>,
    /// As a route's source: how long an acknowledgement to this broker may wait for others to
    /// leave in the same write, e.g. `"10ms"`, at most 1s (default `"0s"`: each leaves at once).
    /// Saves CPU where many pairs each carry a message every few milliseconds; messages are
    /// never held, only their acks. Against a broker that delays small writes (mosquitto's
    /// default `set_tcp_nodelay false`) its next messages wait for the acks: latency rises by
    /// about this much (docs/BENCHMARKS.md).
    #[serde(default, deserialize_with = "parse::duration")]
    pub ack_delay: Duration,
    /// PUBLISH packets per second each connection may send to this broker, e.g. `200`
    /// (BifroMQ's default). Absent: no limit.
    #[serde(default, deserialize_with = "parse::opt_uint")]
    pub max_publish_rate: Option<u64>,
    /// SUBSCRIBE packets carry at most this many filters; more filters are split over several
    /// packets. 10 is BifroMQ's limit and costs nothing elsewhere.
    #[serde(
        default = "default_max_filters_per_subscribe",
        deserialize_with = "parse::uint"
    )]
    pub max_filters_per_subscribe: u64,
    /// MQTT 3.x only: announce the connection as a bridge (protocol level with bit 0x80, as
    /// mosquitto's own bridges do with `try_private`). mosquitto then forwards the retain flag
    /// as published (3.x has no Retain As Published) and never echoes our own publishes. A
    /// broker that does not know it refuses the connection ("unsupported protocol version").
    #[serde(default, deserialize_with = "parse::boolean")]
    pub try_private: bool,
    /// As a source with `share = "$share"` or `"$oshare"`: after subscribing, each pair checks
    /// that the broker really shares, by publishing a probe to `mqbridge/probe/<client id>` that
    /// only a shared subscription of its own can deliver. A broker that takes `$share/g/f` as a
    /// literal filter (NATS, aedes, amqtt) would otherwise deliver nothing to a pair that looks
    /// ready. Set false where ACLs forbid that topic; MQTT 5 brokers also say so in CONNACK.
    #[serde(default = "default_true", deserialize_with = "parse::boolean")]
    pub share_probe: bool,
    /// This broker's name in `mqbridge-from` loop markers (default: a stable hash of the URL's
    /// host and port). Set the same id in every bridge that reaches this broker by different
    /// addresses (a load balancer and a pod address), so a ring is cut whichever way it goes.
    pub id: Option<String>,
    /// `[brokers.<name>.tls]`: present = TLS; implied by `mqtts://` and `wss://`.
    #[serde(default)]
    pub tls: Option<Tls>,
}

pub const fn default_true() -> bool {
    true
}

pub const fn default_protocol() -> Protocol {
    Protocol::V5
}

pub const fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
}

pub const fn default_session_expiry() -> Duration {
    Duration::from_secs(3600)
}

/// `max_inflight` when the operator does not set it: an MQTT 5 broker announces its Receive
/// Maximum, which caps this further; towards a 3.x broker it is the QoS 1 window.
pub const fn default_max_inflight(_protocol: Protocol) -> u16 {
    16384
}

/// `max_inflight_bytes` when the operator does not set it: 4 MiB per pair. A held message counts
/// its topic and payload and a slot of about 200 bytes: about 15,000 messages of 64 bytes
/// (100,000 msg/s per pair over a 150 ms round trip) or 3,400 of 1 KiB.
pub const fn default_max_inflight_bytes() -> u64 {
    4 * 1024 * 1024
}

/// `max_inflight_qos2` when the operator does not set it. Towards a 3.x broker nothing tells us
/// its window, and mosquitto acknowledges and then drops QoS 2 publishes beyond its 20 (SPEC
/// 4.3; 64 % of them at a window of 100, docs/BENCHMARKS.md); for MQTT 5 the Receive Maximum.
pub const fn default_max_inflight_qos2(protocol: Protocol, max_inflight: u16) -> u16 {
    match protocol {
        Protocol::V31 | Protocol::V311 => {
            if max_inflight < 20 {
                max_inflight
            } else {
                20
            }
        }
        Protocol::V5 => max_inflight,
    }
}

pub const fn default_max_filters_per_subscribe() -> u64 {
    10
}

/// `[brokers.<name>.tls]`. Relative paths are relative to the config file's directory.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// CA certificates (PEM) to verify the broker with; default: the system roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM); with `key_file`, for mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// Client private key (PEM); with `cert_file`.
    pub key_file: Option<PathBuf>,
    /// Name to verify the broker's certificate against (default: the url's host).
    pub server_name: Option<String>,
    /// Accept any certificate. For tests only: anyone on the path can then read and forge
    /// traffic; `run` warns loudly at start.
    #[serde(default, deserialize_with = "parse::boolean")]
    pub insecure_skip_verify: bool,
}

/// `[[routes]]`: a pool of pairs taking `topics` from `from` and republishing them to `to`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Required, unique: names the route in client ids, metrics and logs.
    pub name: Option<String>,
    /// Required: the source broker's name.
    pub from: Option<String>,
    /// Required: the target broker's name.
    pub to: Option<String>,
    /// Required: the filters subscribed on the source (one filter may be written as a string).
    #[serde(default, deserialize_with = "parse::one_or_many")]
    pub topics: Vec<String>,
    /// `"$share"`, `"$oshare"` (BifroMQ's ordered sharing) or `"none"` (plain subscriptions:
    /// every pair gets every message, so only with `pool_size = 1`).
    #[serde(default = "default_share", deserialize_with = "parse::share")]
    pub share: Share,
    /// Share group (default `"<bridge.name>-<route.name>"`); every replica and every pair of
    /// this route joins it, so the source balances between them.
    pub group: Option<String>,
    /// Highest QoS used: the subscription's QoS, and the forwarded QoS is min(received, qos).
    /// Default 2, so QoS is kept end to end unless the operator trades it for speed.
    #[serde(default = "default_qos", deserialize_with = "parse::qos")]
    pub qos: Qos,
    /// Pairs of connections (one source + one target each), or `"auto"`: between `pool_size_min`
    /// and `pool_size_max` pairs, growing while their windows are full (a long link) or pairs are
    /// held back by the target's per-connection quotas, and shrinking after 10 s without traffic
    /// or once fewer pairs would do.
    #[serde(default = "default_pool_size", deserialize_with = "parse::pool_size")]
    pub pool_size: PoolSize,
    /// With `pool_size = "auto"`: the fewest pairs (default 1).
    #[serde(default, deserialize_with = "parse::opt_uint")]
    pub pool_size_min: Option<u64>,
    /// With `pool_size = "auto"`: the most pairs (default 8).
    #[serde(default, deserialize_with = "parse::opt_uint")]
    pub pool_size_max: Option<u64>,
    /// `"as-published"` or `"clear"` (forward every message with retain = 0).
    #[serde(default = "default_retain", deserialize_with = "parse::retain")]
    pub retain: RetainMode,
    /// `"forward"` or `"drop"` MQTT 5 publish properties.
    #[serde(default = "default_properties", deserialize_with = "parse::properties")]
    pub properties: PropertiesMode,
    /// Bound on buffered QoS 0 messages per pair; when full the pair stops reading.
    #[serde(default = "default_queue_capacity", deserialize_with = "parse::uint")]
    pub queue_capacity: u64,
    /// Topic on the source broker where undeliverable messages are published (default: none,
    /// they are logged and counted only).
    pub dead_letter: Option<String>,
    /// `"always"` (default), `"auto"` (only where `check` finds a possible loop through this
    /// route) or `"off"`: loop markers on what is forwarded to an MQTT 5 target.
    #[serde(
        default = "default_loop_markers",
        deserialize_with = "parse::loop_markers"
    )]
    pub loop_markers: LoopMarkers,
    /// `[[routes.rewrite]]`: first match wins; no match leaves the topic unchanged.
    #[serde(default)]
    pub rewrite: Vec<Rewrite>,
    /// Acknowledge the source once a message is on disk in the `[spool]` (or the target took
    /// it), and keep reading the source while the target is slow or away. Default false: pure
    /// ack chaining.
    #[serde(default, deserialize_with = "parse::boolean")]
    pub spool: bool,
}

pub const fn default_share() -> Share {
    Share::Share
}

pub const fn default_qos() -> Qos {
    Qos::ExactlyOnce
}

/// `pool_size`: a number of pairs, or sized automatically.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolSize {
    Fixed(u64),
    Auto,
}

pub const fn default_pool_size() -> PoolSize {
    PoolSize::Fixed(default_pool_size_count())
}

pub const fn default_pool_size_count() -> u64 {
    1
}

pub const fn default_retain() -> RetainMode {
    RetainMode::AsPublished
}

pub const fn default_properties() -> PropertiesMode {
    PropertiesMode::Forward
}

pub const fn default_loop_markers() -> LoopMarkers {
    LoopMarkers::Always
}

pub const fn default_queue_capacity() -> u64 {
    1000
}

/// `[[routes.rewrite]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rewrite {
    /// Required: the filter a topic must match for this rule to apply.
    #[serde(rename = "match")]
    pub filter: Option<String>,
    /// Required: the new topic. `{1}`, `{2}`… are the levels matched by each `+` and the final
    /// `#` in order; `{topic}` is the whole source topic.
    pub to: Option<String>,
}

/// Value parsers for `deserialize_with`. Every value may arrive as a string: environment
/// overrides are always strings, and we keep them so (no guessing at types) because a password
/// like `0123` must not become the number 123.
mod parse {
    use std::{fmt, time::Duration};

    use bytesize::ByteSize;
    use serde::{
        Deserialize, Deserializer,
        de::{self, Error as _},
    };

    use super::{LoopMarkers, PropertiesMode, Protocol, Qos, RetainMode, Secret, Share};

    /// A scalar as written: its text, and whether it was a string (for quoting it back).
    struct Scalar {
        text: String,
        quoted: bool,
    }

    impl fmt::Display for Scalar {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            if self.quoted {
                write!(f, "{:?}", self.text)
            } else {
                f.write_str(&self.text)
            }
        }
    }

    impl<'de> Deserialize<'de> for Scalar {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            maybe_scalar(d)?.ok_or_else(|| D::Error::custom("is empty; give a value"))
        }
    }

    /// A scalar, or `None` for an explicit null (YAML `~`, JSON `null`), which reads as "not set".
    fn maybe_scalar<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Scalar>, D::Error> {
        d.deserialize_any(ScalarVisitor)
    }

    struct ScalarVisitor;

    impl ScalarVisitor {
        fn unquoted<E>(text: impl ToString) -> Result<Option<Scalar>, E> {
            Ok(Some(Scalar {
                text: text.to_string(),
                quoted: false,
            }))
        }
    }

    impl<'de> de::Visitor<'de> for ScalarVisitor {
        type Value = Option<Scalar>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a string or a number")
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            maybe_scalar(d)
        }
        fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
            Self::unquoted(v)
        }
        fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
            Self::unquoted(v)
        }
        fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
            Self::unquoted(v)
        }
        fn visit_i128<E>(self, v: i128) -> Result<Self::Value, E> {
            Self::unquoted(v)
        }
        fn visit_u128<E>(self, v: u128) -> Result<Self::Value, E> {
            Self::unquoted(v)
        }
        // `protocol = 3.1` and `5.0` print back as "3.1" and "5".
        fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
            Self::unquoted(v)
        }
        fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(Scalar {
                text: v.to_owned(),
                quoted: true,
            }))
        }
    }

    /// One of a fixed set of spellings (case-insensitive), else an error listing the choices.
    fn choice<'de, D: Deserializer<'de>, T: Copy>(
        d: D,
        what: &str,
        spellings: &[(&str, T)],
        hint: &str,
    ) -> Result<T, D::Error> {
        let s = Scalar::deserialize(d)?;
        spellings
            .iter()
            .find(|(spelling, _)| spelling.eq_ignore_ascii_case(s.text.trim()))
            .map(|&(_, v)| v)
            .ok_or_else(|| D::Error::custom(format!("{s} is not {what}; use {hint}")))
    }

    pub fn protocol<'de, D: Deserializer<'de>>(d: D) -> Result<Protocol, D::Error> {
        choice(
            d,
            "a protocol",
            &[
                ("3.1", Protocol::V31),
                ("3.1.1", Protocol::V311),
                ("5", Protocol::V5),
                ("5.0", Protocol::V5),
            ],
            r#""3.1", "3.1.1" or "5""#,
        )
    }

    pub fn qos<'de, D: Deserializer<'de>>(d: D) -> Result<Qos, D::Error> {
        choice(
            d,
            "a QoS level",
            &[
                ("0", Qos::AtMostOnce),
                ("1", Qos::AtLeastOnce),
                ("2", Qos::ExactlyOnce),
            ],
            "0, 1 or 2",
        )
    }

    pub fn share<'de, D: Deserializer<'de>>(d: D) -> Result<Share, D::Error> {
        // Without the `$` too: it is awkward to pass through shells and env files.
        choice(
            d,
            "a share mode",
            &[
                ("$share", Share::Share),
                ("share", Share::Share),
                ("$oshare", Share::OShare),
                ("oshare", Share::OShare),
                ("none", Share::None),
            ],
            r#""$share", "$oshare" or "none""#,
        )
    }

    pub fn retain<'de, D: Deserializer<'de>>(d: D) -> Result<RetainMode, D::Error> {
        choice(
            d,
            "a retain mode",
            &[
                ("as-published", RetainMode::AsPublished),
                ("as_published", RetainMode::AsPublished),
                ("clear", RetainMode::Clear),
            ],
            r#""as-published" or "clear""#,
        )
    }

    pub fn properties<'de, D: Deserializer<'de>>(d: D) -> Result<PropertiesMode, D::Error> {
        choice(
            d,
            "a properties mode",
            &[
                ("forward", PropertiesMode::Forward),
                ("drop", PropertiesMode::Drop),
            ],
            r#""forward" or "drop""#,
        )
    }

    pub fn loop_markers<'de, D: Deserializer<'de>>(d: D) -> Result<LoopMarkers, D::Error> {
        choice(
            d,
            "a loop marker mode",
            &[
                ("always", LoopMarkers::Always),
                ("auto", LoopMarkers::Auto),
                ("off", LoopMarkers::Off),
            ],
            r#""always", "auto" or "off""#,
        )
    }

    pub fn boolean<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
        choice(
            d,
            "a boolean",
            &[("true", true), ("false", false)],
            "true or false",
        )
    }

    fn whole_number<E: de::Error>(s: &Scalar) -> Result<u64, E> {
        s.text
            .trim()
            .parse()
            .map_err(|_| E::custom(format!("{s} is not a whole number")))
    }

    pub fn uint<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        whole_number(&Scalar::deserialize(d)?)
    }

    /// A number of pairs, or `"auto"`.
    pub fn pool_size<'de, D: Deserializer<'de>>(d: D) -> Result<super::PoolSize, D::Error> {
        let s = Scalar::deserialize(d)?;
        if s.text.trim().eq_ignore_ascii_case("auto") {
            return Ok(super::PoolSize::Auto);
        }
        whole_number(&s)
            .map(super::PoolSize::Fixed)
            .map_err(|_: D::Error| {
                D::Error::custom(format!("{s} is not a number of pairs or \"auto\""))
            })
    }

    /// A count per second: `200` or `"200/s"`.
    pub fn opt_uint<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        maybe_scalar(d)?
            .map(|mut s| {
                if let Some(n) = s.text.trim().strip_suffix("/s") {
                    s.text = n.to_owned();
                }
                whole_number(&s)
            })
            .transpose()
    }

    /// `"512KiB/s"`, `"1MB/s"` or a plain number of bytes per second.
    pub fn opt_byte_rate<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        maybe_scalar(d)?
            .map(|s| {
                let text = s.text.trim();
                let size = text.strip_suffix("/s").unwrap_or(text).trim_end();
                size.parse::<ByteSize>().map(|b| b.as_u64()).map_err(|_| {
                    D::Error::custom(format!(
                        r#"{s} is not a byte rate; write it like "512KiB/s" or "1MB/s""#
                    ))
                })
            })
            .transpose()
    }

    /// `"16MiB"`, `"1MB"` or a plain number of bytes.
    pub fn opt_byte_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        maybe_scalar(d)?
            .map(|s| {
                s.text
                    .trim()
                    .parse::<ByteSize>()
                    .map(|b| b.as_u64())
                    .map_err(|_| {
                        D::Error::custom(format!(
                            r#"{s} is not a size in bytes; write it like "16MiB" or "1MB""#
                        ))
                    })
            })
            .transpose()
    }

    pub fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        duration(d).map(Some)
    }

    pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = Scalar::deserialize(d)?;
        humantime::parse_duration(s.text.trim()).map_err(|e| {
            D::Error::custom(format!(
                r#"{s} is not a duration ({e}); write it like "30s", "5m" or "1h""#
            ))
        })
    }

    pub fn secret<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Secret>, D::Error> {
        // Through `Scalar` so that a numeric password in TOML or YAML still works; the error
        // (a table or list given) never contains the value.
        Ok(maybe_scalar(d)?.map(|s| Secret::new(s.text)))
    }

    /// A list of strings, or one string standing for a list of one (handy in env overrides).
    pub fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        struct OneOrMany;

        impl<'de> de::Visitor<'de> for OneOrMany {
            type Value = Vec<String>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of strings or one string")
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(vec![v.to_owned()])
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some(s) = seq.next_element::<Scalar>()? {
                    out.push(s.text);
                }
                Ok(out)
            }
        }

        d.deserialize_any(OneOrMany)
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use serde::de::value::{Error, F64Deserializer, I64Deserializer, StrDeserializer};

        fn str_de(s: &str) -> StrDeserializer<'_, Error> {
            StrDeserializer::new(s)
        }

        #[test]
        fn protocol_accepts_strings_and_numbers() {
            assert_eq!(protocol(str_de("3.1.1")).unwrap(), Protocol::V311);
            assert_eq!(protocol(str_de("5")).unwrap(), Protocol::V5);
            assert_eq!(
                protocol(I64Deserializer::<Error>::new(5)).unwrap(),
                Protocol::V5
            );
            assert_eq!(
                protocol(F64Deserializer::<Error>::new(3.1)).unwrap(),
                Protocol::V31
            );
            let err = protocol(str_de("4")).unwrap_err().to_string();
            assert_eq!(err, r#""4" is not a protocol; use "3.1", "3.1.1" or "5""#);
        }

        #[test]
        fn numbers_may_be_strings() {
            assert_eq!(uint(str_de("4")).unwrap(), 4);
            assert_eq!(uint(I64Deserializer::<Error>::new(4)).unwrap(), 4);
            assert_eq!(
                uint(str_de("four")).unwrap_err().to_string(),
                r#""four" is not a whole number"#
            );
            assert_eq!(
                uint(I64Deserializer::<Error>::new(-1))
                    .unwrap_err()
                    .to_string(),
                "-1 is not a whole number"
            );
            assert_eq!(
                qos(I64Deserializer::<Error>::new(3))
                    .unwrap_err()
                    .to_string(),
                "3 is not a QoS level; use 0, 1 or 2"
            );
        }

        #[test]
        fn durations_and_rates_are_humane() {
            assert_eq!(duration(str_de("5m")).unwrap(), Duration::from_secs(300));
            assert!(duration(str_de("30")).is_err());
            assert_eq!(opt_byte_rate(str_de("512KiB/s")).unwrap(), Some(512 * 1024));
            assert_eq!(opt_byte_rate(str_de("1MB")).unwrap(), Some(1_000_000));
            assert!(opt_byte_rate(str_de("fast")).is_err());
            assert_eq!(opt_uint(str_de("200/s")).unwrap(), Some(200));
        }
    }
}
