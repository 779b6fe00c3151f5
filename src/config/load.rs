//! Planning: the config file (TOML, or YAML/JSON by extension) plus `MQBRIDGE__<PATH>`
//! environment overrides (`env`), deserialized into `schema` and validated into a `Plan` in one
//! step. Every error names the key path (`routes[1].rewrite[0].to`) and what to do (`error`).

use std::{
    collections::BTreeMap,
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

pub use super::env::ENV_PREFIX;
use super::{
    env::{blame_env, process_env, read, strip_env_prefix},
    error::*,
    plan::{
        BridgePlan, BrokerPlan, Plan, Protocol, Qos, RoutePlan, Secret, Share, TlsPlan, Transport,
        default_broker_id,
    },
    schema,
};
use crate::topic::{Rewrite, RewriteError, RewriteRule, TopicFilter, TopicName};

/// Loads `path` with the process environment's `MQBRIDGE__…` overrides.
pub fn load_plan(path: &Path) -> Result<Plan, ConfigError> {
    load_plan_with_env(path, process_env()?)
}

/// Loads `path` as [`load_plan`] does, but with `bridge.name` and `bridge.instance` held at
/// `running`'s: what a reload (SIGHUP) of a running bridge applies. Those two are read at start
/// only, and client ids, default client id prefixes and share groups derive from them, so a new
/// value in the file must not change the routes through their defaults either.
pub fn load_plan_keeping_bridge(path: &Path, running: &BridgePlan) -> Result<Plan, ConfigError> {
    let mut env = process_env()?;
    let pinned = ["BRIDGE__NAME", "BRIDGE__INSTANCE"];
    env.retain(|(var, _)| {
        strip_env_prefix(var)
            .is_none_or(|rest| !pinned.iter().any(|p| p.eq_ignore_ascii_case(rest)))
    });
    env.push((format!("{ENV_PREFIX}BRIDGE__NAME"), running.name.clone()));
    env.push((
        format!("{ENV_PREFIX}BRIDGE__INSTANCE"),
        running.instance.clone(),
    ));
    load_plan_with_env(path, env)
}

/// Loads `path` with overrides from `env` instead of the process environment (for tests, and
/// for embedding). `HOSTNAME` in `env` is the default instance name.
pub fn load_plan_with_env<K, V>(
    path: &Path,
    env: impl IntoIterator<Item = (K, V)>,
) -> Result<Plan, ConfigError>
where
    K: Into<String>,
    V: Into<String>,
{
    // Sorted, so that overrides apply and errors show in the same order on every run.
    let env: BTreeMap<String, String> =
        env.into_iter().map(|(k, v)| (k.into(), v.into())).collect();
    let (config, overrides) = read(path, &env)?;
    let context = Context {
        base_dir: path.parent().unwrap_or(Path::new("")).to_owned(),
        host_name: env.get("HOSTNAME").cloned(),
    };
    build_plan(config, &context).map_err(|e| blame_env(e, &overrides))
}

/// What validation needs besides the file.
struct Context {
    /// Relative file names in the config are relative to its directory, so a config works from
    /// any working directory.
    base_dir: PathBuf,
    host_name: Option<String>,
}

impl Context {
    fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_owned()
        } else {
            self.base_dir.join(path)
        }
    }

    /// The default instance: `HOSTNAME` (the pod name on Kubernetes), else the kernel's host
    /// name, else "local".
    fn instance(&self) -> String {
        self.host_name
            .clone()
            .or_else(|| fs::read_to_string("/proc/sys/kernel/hostname").ok())
            .or_else(|| fs::read_to_string("/etc/hostname").ok())
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "local".into())
    }
}

fn build_plan(config: schema::Config, cx: &Context) -> Result<Plan, ConfigError> {
    let bridge = bridge_plan(config.bridge, cx)?;
    let admin_listen = config
        .admin
        .map(|admin| listen_addr(&admin.listen))
        .transpose()?;
    if config.brokers.is_empty() {
        return Err(invalid(
            "brokers",
            r#"none configured; add a [brokers.<name>] table per broker with its url, e.g. [brokers.edge] url = "mqtt://127.0.0.1:1883""#,
        ));
    }
    let brokers = config
        .brokers
        .into_iter()
        .map(|(name, broker)| {
            let plan = broker_plan(&name, broker, &bridge, cx)?;
            Ok((name, Arc::new(plan)))
        })
        .collect::<Result<BTreeMap<_, _>, ConfigError>>()?;
    if config.routes.is_empty() {
        return Err(invalid(
            "routes",
            "none configured; add a [[routes]] table with name, from, to and topics",
        ));
    }
    let spool = spool_settings(config.spool, &bridge, cx)?;
    let mut routes: Vec<RoutePlan> = Vec::with_capacity(config.routes.len());
    for (i, route) in config.routes.into_iter().enumerate() {
        let wants_spool = route.spool;
        let mut plan = route_plan(i, route, &bridge, &brokers)?;
        if wants_spool {
            let Some((dir, max_bytes, max_age)) = &spool else {
                return Err(invalid(
                    format!("routes[{i}].spool"),
                    r#"is true but there is no [spool] table; add one with the directory, e.g. [spool] dir = "/var/lib/mqbridge""#,
                ));
            };
            plan.spool = Some(crate::config::plan::SpoolPlan {
                dir: dir.join(&plan.name),
                max_bytes: *max_bytes,
                max_age: *max_age,
            });
        }
        if let Some(first) = routes.iter().position(|r| r.name == plan.name) {
            return Err(invalid(
                format!("routes[{i}].name"),
                format!(
                    "\"{}\" is already the name of routes[{first}]; route names must be unique",
                    plan.name
                ),
            ));
        }
        routes.push(plan);
    }
    let plan = Plan {
        bridge,
        admin_listen,
        brokers,
        routes,
        spool_dir: spool.map(|(dir, _, _)| dir),
    };
    if let Some(why) = crate::loops::analysis::uncuttable(&plan) {
        return Err(invalid("bridge.loop_digest_window", why));
    }
    Ok(plan)
}

/// `[spool]`: the directory of this bridge instance's spools and the per-route limit.
fn spool_settings(
    spool: Option<schema::Spool>,
    bridge: &BridgePlan,
    cx: &Context,
) -> Result<Option<(PathBuf, u64, Option<std::time::Duration>)>, ConfigError> {
    let Some(spool) = spool else {
        return Ok(None);
    };
    let dir = spool.dir.ok_or_else(|| {
        invalid(
            "spool.dir",
            r#"missing; the directory spools are kept in, e.g. dir = "/var/lib/mqbridge""#,
        )
    })?;
    if dir.trim().is_empty() {
        return Err(invalid(
            "spool.dir",
            r#"is empty; name a directory, e.g. dir = "/var/lib/mqbridge""#,
        ));
    }
    if spool
        .max_age
        .is_some_and(|a| a < std::time::Duration::from_secs(1))
    {
        return Err(invalid(
            "spool.max_age",
            "is under a second: every spooled message would be dropped; use at least \"1s\" \
             (e.g. \"7d\"), or remove the key to keep messages until the target takes them",
        ));
    }
    let max_bytes = spool.max_bytes.unwrap_or(1 << 30);
    if max_bytes < 1 << 20 {
        return Err(invalid(
            "spool.max_bytes",
            format!("{max_bytes} bytes is too small to hold an outage; use at least \"1MiB\""),
        ));
    }
    let dir = cx
        .resolve(Path::new(&dir))
        .join(&bridge.name)
        .join(&bridge.instance);
    Ok(Some((dir, max_bytes, spool.max_age)))
}

/// More threads than this is a typo, not a machine.
const MAX_WORKER_THREADS: u64 = 256;

fn bridge_plan(bridge: schema::Bridge, cx: &Context) -> Result<BridgePlan, ConfigError> {
    let name = bridge.name.ok_or_else(|| {
        invalid(
            "bridge.name",
            r#"missing; name the logical bridge, e.g. [bridge] name = "edge-1""#,
        )
    })?;
    if name.trim().is_empty() {
        return Err(invalid("bridge.name", "is empty; name the logical bridge"));
    }
    if name.contains(['/', '+', '#']) {
        return Err(invalid(
            "bridge.name",
            format!("\"{name}\" may not contain '/', '+' or '#': it is part of share group names"),
        ));
    }
    let instance = match bridge.instance {
        Some(i) if i.trim().is_empty() => {
            return Err(invalid(
                "bridge.instance",
                "is empty; remove it to use the host name",
            ));
        }
        Some(i) => i,
        None => cx.instance(),
    };
    for (key, value) in [
        ("bridge.stall_timeout", bridge.stall_timeout),
        ("bridge.summary_interval", bridge.summary_interval),
    ] {
        if value.is_zero() {
            return Err(invalid(key, "must be above zero, e.g. \"30s\""));
        }
    }
    if !(1..=MAX_WORKER_THREADS).contains(&bridge.worker_threads) {
        return Err(invalid(
            "bridge.worker_threads",
            format!(
                "{} is out of range; use 1 (the default) to {MAX_WORKER_THREADS}",
                bridge.worker_threads
            ),
        ));
    }
    Ok(BridgePlan {
        name,
        instance,
        drain_timeout: bridge.drain_timeout,
        stall_timeout: bridge.stall_timeout,
        summary_interval: bridge.summary_interval,
        loop_digest_window: bridge.loop_digest_window,
        loop_digest_capacity: usize::try_from(bridge.loop_digest_capacity).unwrap_or(usize::MAX),
        worker_threads: bridge.worker_threads as usize,
    })
}

fn listen_addr(listen: &str) -> Result<SocketAddr, ConfigError> {
    if let Ok(addr) = listen.parse() {
        return Ok(addr);
    }
    // The one host name people write here; resolving others would make `check` depend on DNS.
    if let Some(port) = listen.strip_prefix("localhost:")
        && let Ok(port) = port.parse()
    {
        return Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    }
    Err(invalid(
        "admin.listen",
        format!(r#""{listen}" is not an address; write it like "127.0.0.1:9464" or "[::]:9464""#),
    ))
}

/// Names that appear in client ids, metric labels and `MQBRIDGE__` variables.
fn check_name(key: &str, what: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() {
        return Err(invalid(key, format!("is empty; give the {what} a name")));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(invalid(
            key,
            format!(
                "\"{name}\": {what} names may use letters, digits, '-' and '_' \
                 (they appear in client ids, metrics and MQBRIDGE__ variables)"
            ),
        ));
    }
    Ok(())
}

fn broker_plan(
    name: &str,
    broker: schema::Broker,
    bridge: &BridgePlan,
    cx: &Context,
) -> Result<BrokerPlan, ConfigError> {
    let at = |key: &str| format!("brokers.{name}.{key}");
    check_name(&format!("brokers.{name}"), "broker", name)?;
    let url = broker.url.ok_or_else(|| {
        invalid(
            at("url"),
            r#"missing; e.g. url = "mqtt://127.0.0.1:1883" (mqtt, mqtts, ws or wss)"#,
        )
    })?;
    let endpoint = parse_url(&url, broker.tls.is_some()).map_err(|m| invalid(at("url"), m))?;

    let id = match broker.id {
        None => default_broker_id(&endpoint.host, endpoint.port),
        Some(id) if id.trim().is_empty() => {
            return Err(invalid(
                at("id"),
                "is empty; remove it for the default (a hash of the URL's host and port)",
            ));
        }
        Some(id) => id,
    };
    let protocol = broker.protocol;
    let client_id_prefix = broker
        .client_id_prefix
        .unwrap_or_else(|| bridge.name.clone());
    if client_id_prefix.is_empty() {
        return Err(invalid(
            at("client_id_prefix"),
            "is empty; remove it to use the bridge name",
        ));
    }

    let password = match (broker.password, broker.password_file) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                at("password"),
                "set either password or password_file, not both",
            ));
        }
        (Some(p), None) => Some(p),
        (None, Some(file)) => {
            let file = cx.resolve(&file);
            let text = fs::read_to_string(&file).map_err(|e| {
                invalid(
                    at("password_file"),
                    format!("cannot read {}: {e}", file.display()),
                )
            })?;
            // Secret files and `echo pw > file` end in a newline that is no part of it.
            Some(Secret::new(text.trim_end_matches(['\n', '\r']).to_owned()))
        }
        (None, None) => None,
    };
    if password.is_some() && broker.username.is_none() && protocol != Protocol::V5 {
        return Err(invalid(
            at("password"),
            format!("MQTT {protocol} cannot send a password without a username; set username"),
        ));
    }

    let keep_alive = whole_seconds(&at("keep_alive"), broker.keep_alive, u16::MAX.into())?;
    let session_expiry = whole_seconds(
        &at("session_expiry"),
        broker.session_expiry,
        u32::MAX.into(),
    )?;

    let max_inflight = match broker.max_inflight {
        None => schema::default_max_inflight(protocol),
        Some(n) => u16::try_from(n)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| invalid(at("max_inflight"), format!("{n} is not in 1..=65535")))?,
    };
    let max_inflight_qos2 = match broker.max_inflight_qos2 {
        None => schema::default_max_inflight_qos2(protocol, max_inflight),
        Some(n) => u16::try_from(n)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| invalid(at("max_inflight_qos2"), format!("{n} is not in 1..=65535")))?
            .min(max_inflight),
    };
    let nonzero = |key: &str, v: Option<u64>| match v {
        Some(0) => Err(invalid(
            at(key),
            "0 would stop all traffic; remove the key for no limit",
        )),
        v => Ok(v),
    };
    let bandwidth_limit = nonzero("bandwidth_limit", broker.bandwidth_limit)?;
    let max_inflight_bytes = match broker.max_inflight_bytes {
        None => schema::default_max_inflight_bytes(),
        Some(0) => {
            return Err(invalid(
                at("max_inflight_bytes"),
                r#"0 would hold no message; remove the key for 4 MiB, or write e.g. "16MiB""#,
            ));
        }
        Some(n) => n,
    };
    let max_qos = match broker.max_qos {
        None => Qos::ExactlyOnce,
        Some(n) => u8::try_from(n).ok().and_then(Qos::from_u8).ok_or_else(|| {
            invalid(
                at("max_qos"),
                format!(
                    "{n} is not a QoS: 0, 1 or 2 (1 for a 3.x broker without QoS 2, e.g. NATS)"
                ),
            )
        })?,
    };
    let max_publish_rate = nonzero("max_publish_rate", broker.max_publish_rate)?
        .map(|n| {
            u32::try_from(n)
                .map_err(|_| invalid(at("max_publish_rate"), format!("{n} is too large")))
        })
        .transpose()?;
    if broker.ack_delay > MAX_ACK_DELAY {
        return Err(invalid(
            at("ack_delay"),
            format!(
                "{} is above 1s: a source may take acks that late for lost; use e.g. \"10ms\", or \"0s\" for none",
                humantime::format_duration(broker.ack_delay)
            ),
        ));
    }
    // MQTT's own limit is 268,435,455 bytes of remaining length; below a few hundred bytes
    // not even a CONNACK with properties would fit.
    let max_packet_size = match broker.max_packet_size {
        None => crate::link::DEFAULT_MAX_INCOMING,
        Some(n) => u32::try_from(n)
            .ok()
            .filter(|n| (512..=268_435_460).contains(n))
            .ok_or_else(|| {
                invalid(
                    at("max_packet_size"),
                    format!("{n} bytes is not in 512 B..=256 MiB; remove the key for 16 MiB"),
                )
            })?,
    };
    let max_filters_per_subscribe = usize::try_from(broker.max_filters_per_subscribe)
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| {
            invalid(
                at("max_filters_per_subscribe"),
                format!("{} must be at least 1", broker.max_filters_per_subscribe),
            )
        })?;

    let tls = match (broker.tls, endpoint.transport) {
        (Some(tls), _) => Some(tls_plan(name, tls, cx)?),
        (None, Transport::Tls | Transport::Wss) => Some(TlsPlan {
            ca_file: None,
            cert_file: None,
            key_file: None,
            server_name: None,
            insecure_skip_verify: false,
        }),
        (None, _) => None,
    };

    Ok(BrokerPlan {
        name: name.to_owned(),
        url,
        transport: endpoint.transport,
        host: endpoint.host,
        port: endpoint.port,
        path: endpoint.path,
        protocol,
        client_id_prefix,
        username: broker.username,
        password,
        keep_alive,
        session_expiry,
        max_inflight,
        max_inflight_bytes,
        max_qos,
        max_inflight_qos2,
        bandwidth_limit,
        max_publish_rate,
        ack_delay: broker.ack_delay,
        max_packet_size,
        max_filters_per_subscribe,
        try_private: broker.try_private,
        share_probe: broker.share_probe,
        id,
        tls,
    })
}

/// The longest `ack_delay`: far below any broker's resend timer (EMQX: 30 s), and a second is
/// already longer than a useful batch.
const MAX_ACK_DELAY: Duration = Duration::from_secs(1);

/// MQTT carries these intervals in whole seconds.
fn whole_seconds(key: &str, d: Duration, max: u64) -> Result<Duration, ConfigError> {
    if d.subsec_nanos() != 0 {
        return Err(invalid(key, "must be whole seconds, e.g. \"30s\""));
    }
    if d.as_secs() > max {
        return Err(invalid(
            key,
            format!(
                "is above the MQTT limit of {max}s ({})",
                humantime::format_duration(Duration::from_secs(max))
            ),
        ));
    }
    Ok(d)
}

struct Endpoint {
    transport: Transport,
    host: String,
    port: u16,
    path: String,
}

/// `scheme://host[:port][/path]`; the message of an error is for the `url` key.
fn parse_url(url: &str, tls: bool) -> Result<Endpoint, String> {
    let (scheme, rest) = url.split_once("://").ok_or_else(|| {
        format!(
            r#""{url}" has no scheme; write it like "mqtt://host:1883" (mqtt, mqtts, ws or wss)"#
        )
    })?;
    let transport = match scheme.to_ascii_lowercase().as_str() {
        "mqtt" => Transport::Tcp,
        "mqtts" => Transport::Tls,
        "ws" => Transport::Ws,
        "wss" => Transport::Wss,
        _ => {
            return Err(format!(
                r#""{scheme}://" is not supported; use mqtt://, mqtts://, ws:// or wss://"#
            ));
        }
    };
    // A `[tls]` table upgrades the plain schemes (SPEC: "present => TLS").
    let transport = match (transport, tls) {
        (Transport::Tcp, true) => Transport::Tls,
        (Transport::Ws, true) => Transport::Wss,
        (t, _) => t,
    };
    if rest.contains(['?', '#']) {
        return Err(format!(
            "\"{url}\": query strings and fragments are not supported"
        ));
    }
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if authority.contains('@') {
        // The url is printed by `check` and in logs; credentials have their own keys.
        return Err("put credentials in username and password_file, not in the url".into());
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("\"{url}\": unclosed '[' in the host"))?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(format!("\"{url}\" has no host"));
    }
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| format!("\"{url}\": port \"{p}\" is not a number in 1..=65535"))?,
        None => match transport {
            Transport::Tcp => 1883,
            Transport::Tls => 8883,
            Transport::Ws => 80,
            Transport::Wss => 443,
        },
    };
    let path = match transport {
        Transport::Ws | Transport::Wss if path.is_empty() => "/mqtt".to_owned(),
        Transport::Ws | Transport::Wss => path.to_owned(),
        Transport::Tcp | Transport::Tls if path.is_empty() || path == "/" => String::new(),
        Transport::Tcp | Transport::Tls => {
            return Err(format!(
                "\"{url}\": a path is only meaningful for ws:// and wss://"
            ));
        }
    };
    Ok(Endpoint {
        transport,
        host: host.to_owned(),
        port,
        path,
    })
}

fn tls_plan(broker: &str, tls: schema::Tls, cx: &Context) -> Result<TlsPlan, ConfigError> {
    let at = |key: &str| format!("brokers.{broker}.tls.{key}");
    // Checked now so that `check` catches a missing file before `run` needs it.
    let file = |key: &str, path: Option<PathBuf>| -> Result<Option<PathBuf>, ConfigError> {
        path.map(|p| {
            let p = cx.resolve(&p);
            fs::File::open(&p)
                .map(|_| p.clone())
                .map_err(|e| invalid(at(key), format!("cannot read {}: {e}", p.display())))
        })
        .transpose()
    };
    let plan = TlsPlan {
        ca_file: file("ca_file", tls.ca_file)?,
        cert_file: file("cert_file", tls.cert_file)?,
        key_file: file("key_file", tls.key_file)?,
        server_name: tls.server_name,
        insecure_skip_verify: tls.insecure_skip_verify,
    };
    match (&plan.cert_file, &plan.key_file) {
        (Some(_), None) => Err(invalid(
            at("cert_file"),
            "mutual TLS needs key_file too (the client certificate's private key)",
        )),
        (None, Some(_)) => Err(invalid(
            at("key_file"),
            "mutual TLS needs cert_file too (the client certificate)",
        )),
        _ if plan.server_name.as_deref() == Some("") => Err(invalid(
            at("server_name"),
            "is empty; remove it to use the url's host",
        )),
        _ => Ok(plan),
    }
}

fn route_plan(
    i: usize,
    route: schema::Route,
    bridge: &BridgePlan,
    brokers: &BTreeMap<String, Arc<BrokerPlan>>,
) -> Result<RoutePlan, ConfigError> {
    let at = |key: &str| format!("routes[{i}].{key}");
    let name = route.name.ok_or_else(|| {
        invalid(
            at("name"),
            r#"missing; every route needs a unique name, e.g. name = "telemetry-up""#,
        )
    })?;
    check_name(&at("name"), "route", &name)?;

    let broker_names = || brokers.keys().cloned().collect::<Vec<_>>().join(", ");
    let broker = |key: &str, value: Option<String>| {
        let value = value.ok_or_else(|| {
            invalid(
                at(key),
                format!("missing; name a broker (brokers: {})", broker_names()),
            )
        })?;
        brokers.get(&value).cloned().ok_or_else(|| {
            invalid(
                at(key),
                format!("unknown broker \"{value}\" (brokers: {})", broker_names()),
            )
        })
    };
    let from = broker("from", route.from)?;
    let to = broker("to", route.to)?;

    if route.topics.is_empty() {
        return Err(invalid(
            at("topics"),
            r#"missing; list the filters to subscribe on the source, e.g. topics = ["factory/#"]"#,
        ));
    }
    let mut topics: Vec<TopicFilter> = Vec::with_capacity(route.topics.len());
    for (j, topic) in route.topics.iter().enumerate() {
        let key = at(&format!("topics[{j}]"));
        if topic.starts_with("$share/") || topic.starts_with("$oshare/") {
            return Err(invalid(
                key,
                format!(
                    "\"{topic}\": write the plain filter; the share prefix comes from `share` and `group`"
                ),
            ));
        }
        let filter = TopicFilter::parse(topic)
            .map_err(|e| invalid(&key, format!("\"{topic}\" is not a valid filter: {e}")))?;
        if topics.contains(&filter) {
            return Err(invalid(key, format!("\"{topic}\" is listed twice")));
        }
        topics.push(filter);
    }

    let group = route
        .group
        .unwrap_or_else(|| format!("{}-{}", bridge.name, name));
    if group.is_empty() || group.contains(['/', '+', '#', '\0']) {
        return Err(invalid(
            at("group"),
            format!(
                "\"{group}\" is not a share group name: it must be non-empty without '/', '+' or '#'"
            ),
        ));
    }

    let count = |key: &str, n: u64| {
        usize::try_from(n)
            .ok()
            .filter(|&n| (1..=1000).contains(&n))
            .ok_or_else(|| invalid(at(key), format!("{n} must be between 1 and 1000")))
    };
    let (pool_size, pool_size_max, pool_auto) = match route.pool_size {
        schema::PoolSize::Fixed(n) => {
            if route.pool_size_min.is_some() || route.pool_size_max.is_some() {
                let key = if route.pool_size_min.is_some() {
                    "pool_size_min"
                } else {
                    "pool_size_max"
                };
                return Err(invalid(
                    at(key),
                    "only applies with pool_size = \"auto\"; remove it or set pool_size = \"auto\"",
                ));
            }
            let n = count("pool_size", n)?;
            (n, n, false)
        }
        schema::PoolSize::Auto => {
            let min = count("pool_size_min", route.pool_size_min.unwrap_or(1))?;
            let max = count("pool_size_max", route.pool_size_max.unwrap_or(8))?;
            if max < min {
                return Err(invalid(
                    at("pool_size_max"),
                    format!("{max} is below pool_size_min = {min}"),
                ));
            }
            (min, max, true)
        }
    };
    if route.share == Share::None && pool_auto {
        return Err(invalid(
            at("pool_size"),
            "\"auto\" with share = \"none\" would forward every message once per pair; use a shared subscription",
        ));
    }
    if route.share == Share::None && pool_size > 1 {
        return Err(invalid(
            at("pool_size"),
            format!(
                "{pool_size} with share = \"none\" would forward every message {pool_size} times; \
                 use pool_size = 1 or a shared subscription"
            ),
        ));
    }
    let queue_capacity = usize::try_from(route.queue_capacity)
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| {
            invalid(
                at("queue_capacity"),
                format!("{} must be at least 1", route.queue_capacity),
            )
        })?;

    let mut rules = Vec::with_capacity(route.rewrite.len());
    for (j, rule) in route.rewrite.into_iter().enumerate() {
        rules.push(rewrite_rule(&format!("routes[{i}].rewrite[{j}]"), rule)?);
    }

    let dead_letter = route
        .dead_letter
        .map(|topic| {
            let name = TopicName::parse(&topic).map_err(|e| {
                invalid(
                    at("dead_letter"),
                    format!("\"{topic}\" is not a valid topic name: {e}"),
                )
            })?;
            // Published on the source, where the route's own subscription would take it
            // straight back.
            match topics.iter().find(|f| f.matches(&topic)) {
                Some(f) => Err(invalid(
                    at("dead_letter"),
                    format!(
                        "\"{topic}\" matches the route's own filter \"{f}\", so dead letters would be \
                         forwarded again; pick a topic outside the route's topics"
                    ),
                )),
                None => Ok(name),
            }
        })
        .transpose()?;

    if from.name == to.name && rules.is_empty() {
        return Err(invalid(
            at("to"),
            format!(
                "\"{}\" is also the route's source, and without a rewrite every message would be \
                 published back onto the topic it came from: subscribers would get it twice and \
                 the route's own subscription would take it again; add a [[routes.rewrite]] rule \
                 that moves it elsewhere, or name another broker",
                to.name
            ),
        ));
    }

    Ok(RoutePlan {
        name,
        from,
        to,
        topics,
        share: route.share,
        group,
        qos: route.qos,
        pool_size,
        pool_size_max,
        pool_auto,
        retain: route.retain,
        properties: route.properties,
        queue_capacity,
        rewrite: Rewrite::new(rules),
        dead_letter,
        loop_markers: route.loop_markers,
        spool: None,
    })
}

fn rewrite_rule(at: &str, rule: schema::Rewrite) -> Result<RewriteRule, ConfigError> {
    let filter = rule.filter.ok_or_else(|| {
        invalid(
            format!("{at}.match"),
            r#"missing; the filter this rule applies to, e.g. match = "factory/+/telemetry/#""#,
        )
    })?;
    let to = rule.to.ok_or_else(|| {
        invalid(
            format!("{at}.to"),
            r#"missing; the new topic, e.g. to = "sites/edge-1/{1}/telemetry/{2}""#,
        )
    })?;
    let compiled = RewriteRule::compile(&filter, &to).map_err(|e| match e {
        RewriteError::InvalidFilter { reason, .. } => invalid(
            format!("{at}.match"),
            format!("\"{filter}\" is not a valid filter: {reason}"),
        ),
        other => invalid(format!("{at}.to"), other.to_string()),
    })?;
    // A template may still produce no valid topic for every topic its filter matches (say,
    // nothing but captures that can be empty); try the typical one.
    let sample = sample_topic(compiled.filter());
    if let Some(Err(e)) = compiled.apply(&sample) {
        return Err(invalid(
            format!("{at}.to"),
            format!("rewrites \"{sample}\" to an invalid topic: {e}"),
        ));
    }
    Ok(compiled)
}

/// A topic the filter matches, with recognisable stand-ins for the wildcards: `+` becomes
/// `x1`, `x2`…, `#` becomes `rest/of/topic`. Used for `check`'s rewrite examples too.
pub fn sample_topic(filter: &TopicFilter) -> String {
    let mut plus = 0;
    filter
        .as_str()
        .split('/')
        .map(|level| match level {
            "+" => {
                plus += 1;
                format!("x{plus}")
            }
            "#" => "rest/of/topic".to_owned(),
            literal => literal.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_suggest_the_near_one() {
        let known = ["name", "from", "to", "pool_size", "queue_capacity"].map(String::from);
        let err = ConfigError::UnknownKey {
            parent: "routes[0]".into(),
            key: "pool".into(),
            known: known.to_vec(),
        };
        assert_eq!(
            err.to_string(),
            r#"unknown key "pool" in routes[0] (did you mean "pool_size"?)"#
        );
        let err = ConfigError::UnknownKey {
            parent: String::new(),
            key: "zzz".into(),
            known: vec!["bridge".into(), "routes".into()],
        };
        assert_eq!(
            err.to_string(),
            r#"unknown key "zzz" at the top level (known keys: bridge, routes)"#
        );
    }

    #[test]
    fn typos_are_near() {
        assert_eq!(edit_distance("nmae", "name"), 1);
        assert_eq!(edit_distance("qso", "qos"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(did_you_mean("tpoics", ["topics", "to"]), Some("topics"));
        assert_eq!(did_you_mean("colour", ["bridge", "routes"]), None);
    }

    #[test]
    fn config_paths_are_repaired() {
        assert_eq!(fix_path("routes[0]name"), "routes[0].name");
        assert_eq!(
            fix_path("routes[0].rewrite[1].to"),
            "routes[0].rewrite[1].to"
        );
        assert_eq!(fix_path("a[0][1]b"), "a[0][1].b");
    }

    #[test]
    fn urls_get_default_ports_and_tls() {
        let e = parse_url("mqtt://h", false).unwrap();
        assert_eq!((e.transport, e.port), (Transport::Tcp, 1883));
        let e = parse_url("mqtt://h", true).unwrap();
        assert_eq!((e.transport, e.port), (Transport::Tls, 8883));
        let e = parse_url("wss://h", false).unwrap();
        assert_eq!(
            (e.transport, e.port, e.path.as_str()),
            (Transport::Wss, 443, "/mqtt")
        );
        let e = parse_url("ws://[::1]:9001/ws", false).unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.path.as_str()),
            ("::1", 9001, "/ws")
        );
        assert!(parse_url("http://h", false).is_err());
        assert!(parse_url("mqtt://u:p@h", false).is_err());
        assert!(parse_url("mqtt://h:0", false).is_err());
        assert!(parse_url("mqtt://:1883", false).is_err());
        assert!(parse_url("mqtt://h/x", false).is_err());
    }

    #[test]
    fn samples_name_the_wildcards() {
        let f = TopicFilter::parse("factory/+/telemetry/+/#").unwrap();
        assert_eq!(sample_topic(&f), "factory/x1/telemetry/x2/rest/of/topic");
    }
}
