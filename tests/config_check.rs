//! The config contract (SPEC §3) and `mqbridge check`: every shipped example is valid, every
//! mistake is reported with its key path and a fix, secrets never reach the output, and the
//! binary exits 0 for a valid config and 2 for an invalid one.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicUsize, Ordering},
};

use mqbridge::{
    check::{dry_run, render_plan},
    config::{ConfigError, Plan, Protocol, Qos, load::load_plan_with_env, load_plan},
};

/// A config written to a temp file, removed when dropped.
struct TempConfig(PathBuf);

impl TempConfig {
    fn new(extension: &str, text: &str) -> TempConfig {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "mqbridge-config-check-{}-{}.{extension}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        fs::write(&path, text).unwrap();
        TempConfig(path)
    }

    fn toml(text: &str) -> TempConfig {
        TempConfig::new("toml", text)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Two brokers and one route: the smallest valid config, which each test breaks in one place.
const MINIMAL: &str = r#"
[bridge]
name = "edge-1"
instance = "pod-0"

[brokers.edge]
url = "mqtt://127.0.0.1:21883"

[brokers.cloud]
url = "mqtt://127.0.0.1:1884"
protocol = "3.1.1"

[[routes]]
name = "up"
from = "edge"
to = "cloud"
topics = ["a/+/#"]
"#;

fn load(text: &str) -> Result<Plan, ConfigError> {
    load_env(text, &[])
}

fn load_env(text: &str, env: &[(&str, &str)]) -> Result<Plan, ConfigError> {
    let file = TempConfig::toml(text);
    load_plan_with_env(file.path(), env.iter().copied())
}

fn error(text: &str) -> String {
    match load(text) {
        Ok(_) => panic!("config was accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config")
}

#[test]
fn every_shipped_example_is_valid() {
    let mut checked = 0;
    for entry in fs::read_dir(config_dir()).unwrap() {
        let path = entry.unwrap().path();
        let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if !["toml", "yaml", "yml", "json"].contains(&extension) {
            continue;
        }
        let plan = load_plan(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let text = render_plan(&plan);
        assert!(text.contains("routes"), "{}:\n{text}", path.display());
        checked += 1;
    }
    assert!(checked >= 2, "expected the example configs in config/");
}

#[test]
fn minimal_config_gets_production_defaults() {
    let plan = load(MINIMAL).unwrap();
    let edge = &plan.brokers["edge"];
    let cloud = &plan.brokers["cloud"];
    assert_eq!(edge.protocol, Protocol::V5);
    assert_eq!(edge.max_inflight, 16384);
    assert_eq!(
        cloud.max_inflight, 16384,
        "QoS 1: nothing lost at any window"
    );
    assert_eq!(
        (edge.max_inflight_bytes, cloud.max_inflight_bytes),
        (4 << 20, 4 << 20),
        "a pair's memory bound whatever the message size"
    );
    assert_eq!(
        cloud.max_inflight_qos2, 20,
        "QoS 2: mosquitto's window towards 3.x"
    );
    assert_eq!(
        edge.max_inflight_qos2, 16384,
        "v5: the Receive Maximum counts both"
    );
    assert_eq!(
        edge.session_expiry.as_secs(),
        3600,
        "persistent sessions by default"
    );
    assert_eq!(edge.keep_alive.as_secs(), 30);
    assert_eq!(edge.max_filters_per_subscribe, 10);
    assert_eq!(edge.client_id_prefix, "edge-1");
    assert!(edge.tls.is_none());

    let route = &plan.routes[0];
    assert_eq!(route.group, "edge-1-up");
    assert_eq!(route.qos, Qos::ExactlyOnce);
    assert_eq!(route.pool_size, 1);
    assert_eq!(route.queue_capacity, 1000);
    assert_eq!(route.subscriptions(), ["$share/edge-1-up/a/+/#"]);
    assert_eq!(plan.bridge.drain_timeout.as_secs(), 10);
    assert_eq!(plan.bridge.worker_threads, 1, "pairs share one thread");
}

#[test]
fn tls_is_implied_by_the_scheme_and_ports_default() {
    let plan =
        load(&MINIMAL.replace("mqtt://127.0.0.1:1884", "mqtts://cloud.example.com")).unwrap();
    let cloud = &plan.brokers["cloud"];
    assert!(cloud.tls.is_some());
    assert_eq!(
        (cloud.host.as_str(), cloud.port),
        ("cloud.example.com", 8883)
    );
}

#[test]
fn unknown_key_is_named_with_a_suggestion() {
    let err = error(&format!("{MINIMAL}pool = 4\n"));
    assert_eq!(
        err,
        r#"unknown key "pool" in routes[0] (did you mean "pool_size"?)"#
    );
    let err = error(&MINIMAL.replace("[bridge]", "[bridge]\nnmae = \"x\""));
    assert_eq!(
        err,
        r#"unknown key "nmae" in bridge (did you mean "name"?)"#
    );
    let err = error(&format!("colour = \"blue\"\n{MINIMAL}"));
    assert!(
        err.starts_with(r#"unknown key "colour" at the top level (known keys: "#),
        "{err}"
    );
}

#[test]
fn route_naming_an_unknown_broker() {
    let err = error(&MINIMAL.replace(r#"from = "edge""#, r#"from = "edgee""#));
    assert_eq!(
        err,
        r#"routes[0].from: unknown broker "edgee" (brokers: cloud, edge)"#
    );
}

#[test]
fn rewrite_placeholder_beyond_the_filter_wildcards() {
    let err = error(&format!(
        "{MINIMAL}[[routes.rewrite]]\nmatch = \"a/+/#\"\nto = \"b/{{3}}\"\n"
    ));
    assert_eq!(
        err,
        r#"routes[0].rewrite[0].to: "{3}" but the filter "a/+/#" has 2 wildcards"#
    );
}

#[test]
fn invalid_protocol() {
    let err = error(&MINIMAL.replace(r#"protocol = "3.1.1""#, r#"protocol = "4""#));
    assert_eq!(
        err,
        r#"brokers.cloud.protocol: "4" is not a protocol; use "3.1", "3.1.1" or "5""#
    );
    // Numbers are fine where they mean the same.
    let plan = load(&MINIMAL.replace(r#"protocol = "3.1.1""#, "protocol = 5")).unwrap();
    assert_eq!(plan.brokers["cloud"].protocol, Protocol::V5);
}

#[test]
fn invalid_filter() {
    let err = error(&MINIMAL.replace(r#"["a/+/#"]"#, r#"["ok/#", "a/#/b"]"#));
    assert!(
        err.starts_with(r#"routes[0].topics[1]: "a/#/b" is not a valid filter: "#),
        "{err}"
    );
    let err = error(&MINIMAL.replace(r#"["a/+/#"]"#, r#"["$share/g/a"]"#));
    assert!(err.starts_with("routes[0].topics[0]: "), "{err}");
}

#[test]
fn type_mismatches_name_the_key() {
    let err = error(&format!("{MINIMAL}pool_size = \"four\"\n"));
    assert_eq!(
        err,
        r#"routes[0].pool_size: "four" is not a number of pairs or "auto""#
    );
    let err = error(&format!("{MINIMAL}pool_size = 0\n"));
    assert!(err.starts_with("routes[0].pool_size: "), "{err}");
    let err = error(&MINIMAL.replace("[bridge]", "[bridge]\ndrain_timeout = \"10\""));
    assert!(
        err.starts_with("bridge.drain_timeout: \"10\" is not a duration"),
        "{err}"
    );
    let err = error(&MINIMAL.replace("[bridge]", "[bridge]\nworker_threads = 0"));
    assert_eq!(
        err,
        "bridge.worker_threads: 0 is out of range; use 1 (the default) to 256"
    );
    let plan = load(&MINIMAL.replace("[bridge]", "[bridge]\nworker_threads = 4")).unwrap();
    assert_eq!(plan.bridge.worker_threads, 4);
    let err = error(&MINIMAL.replace("topics = [\"a/+/#\"]", "topics = { a = 1 }"));
    assert!(err.starts_with("routes[0].topics: "), "{err}");
}

#[test]
fn missing_required_keys() {
    let err = error(&MINIMAL.replace("name = \"edge-1\"", ""));
    assert!(err.starts_with("bridge.name: missing"), "{err}");
    let err = error(&MINIMAL.replace("url = \"mqtt://127.0.0.1:21883\"", ""));
    assert!(err.starts_with("brokers.edge.url: missing"), "{err}");
    let err = error(&MINIMAL.replace("to = \"cloud\"", ""));
    assert!(err.starts_with("routes[0].to: missing"), "{err}");
}

#[test]
fn bad_urls_name_the_broker() {
    let err = error(&MINIMAL.replace("mqtt://127.0.0.1:21883", "http://127.0.0.1:21883"));
    assert!(err.starts_with("brokers.edge.url: "), "{err}");
    let err = error(&MINIMAL.replace("mqtt://127.0.0.1:21883", "mqtt://bridge:pw@127.0.0.1"));
    assert!(
        err.starts_with("brokers.edge.url: put credentials"),
        "{err}"
    );
}

#[test]
fn route_names_are_unique() {
    let err = error(&format!(
        "{MINIMAL}\n[[routes]]\nname = \"up\"\nfrom = \"cloud\"\nto = \"edge\"\ntopics = [\"b\"]\n"
    ));
    assert!(
        err.starts_with("routes[1].name: \"up\" is already"),
        "{err}"
    );
}

#[test]
fn env_overrides_any_key() {
    let plan = load_env(
        MINIMAL,
        &[
            ("MQBRIDGE__BROKERS__CLOUD__PASSWORD", "0123"),
            ("MQBRIDGE__BROKERS__CLOUD__USERNAME", "bridge"),
            ("MQBRIDGE__ROUTES__0__POOL_SIZE", "4"),
            ("MQBRIDGE__ROUTES__0__QOS", "1"),
            ("MQBRIDGE__BRIDGE__INSTANCE", "pod-7"),
        ],
    )
    .unwrap();
    let cloud = &plan.brokers["cloud"];
    // A numeric-looking secret stays the string it was.
    assert_eq!(cloud.password.as_ref().unwrap().expose(), "0123");
    assert_eq!(cloud.username.as_deref(), Some("bridge"));
    assert_eq!(plan.routes[0].pool_size, 4);
    assert_eq!(plan.routes[0].qos, Qos::AtLeastOnce);
    assert_eq!(plan.bridge.instance, "pod-7");
}

#[test]
fn env_overrides_reach_mixed_case_names() {
    let text = MINIMAL
        .replace("[brokers.cloud]", "[brokers.Cloud]")
        .replace(r#"to = "cloud""#, r#"to = "Cloud""#);
    let plan = load_env(&text, &[("MQBRIDGE__BROKERS__CLOUD__PROTOCOL", "5")]).unwrap();
    assert_eq!(plan.brokers["Cloud"].protocol, Protocol::V5);
    assert_eq!(plan.brokers.len(), 2, "no new broker was made up");
}

/// Issue #16: a variable naming a broker the file does not have made up a new, unused broker
/// (check exited 0), or failed on a missing `url` without naming the variable.
#[test]
fn an_env_variable_naming_an_unknown_broker_says_so() {
    for var in [
        "MQBRIDGE__BROKERS__CLOUDD__PASSWORD",
        "MQBRIDGE__BROKERS__NOPE__URL",
    ] {
        let err = load_env(MINIMAL, &[(var, "mqtt://127.0.0.1:1")])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with(var), "{err}");
        assert!(err.contains("which the config file does not have"), "{err}");
        assert!(err.contains("cloud"), "lists the brokers it has: {err}");
    }
}

#[test]
fn max_inflight_bytes_takes_a_size_and_refuses_zero() {
    let with = |v: &str| {
        load(&MINIMAL.replace(
            "url = \"mqtt://127.0.0.1:21883\"",
            &format!("url = \"mqtt://127.0.0.1:21883\"\nmax_inflight_bytes = {v}"),
        ))
    };
    assert_eq!(
        with("\"16MiB\"").unwrap().brokers["edge"].max_inflight_bytes,
        16 << 20
    );
    assert_eq!(
        with("65536").unwrap().brokers["edge"].max_inflight_bytes,
        65536
    );
    // `check` says what a route may hold at most: pairs × the target's bound.
    let cloud_bound = load(&MINIMAL.replace(
        "url = \"mqtt://127.0.0.1:1884\"",
        "url = \"mqtt://127.0.0.1:1884\"\nmax_inflight_bytes = \"16MiB\"",
    ))
    .unwrap();
    let text = render_plan(&cloud_bound);
    let pairs = cloud_bound.routes[0].pool_size_max;
    assert!(
        text.contains(&format!(
            "held in memory while the target is slow or away: at most {}.0 MiB of messages ({pairs} pair",
            16 * pairs
        )),
        "{text}"
    );
    let err = with("0").unwrap_err().to_string();
    assert!(
        err.starts_with("brokers.edge.max_inflight_bytes: 0 would hold no message"),
        "{err}"
    );
    let err = with("\"lots\"").unwrap_err().to_string();
    assert!(
        err.contains("brokers.edge.max_inflight_bytes") && err.contains("16MiB"),
        "{err}"
    );
}

#[test]
fn ack_delay_is_said_by_check_and_refused_above_a_second() {
    let with = |v: &str| {
        load(&MINIMAL.replace(
            "url = \"mqtt://127.0.0.1:21883\"",
            &format!("url = \"mqtt://127.0.0.1:21883\"\nack_delay = {v}"),
        ))
    };
    let plan = with("\"10ms\"").unwrap();
    assert_eq!(
        plan.brokers["edge"].ack_delay,
        std::time::Duration::from_millis(10)
    );
    let text = render_plan(&plan);
    assert!(
        text.contains(
            "acks to edge wait up to 10ms to leave together (ack_delay; at most a quarter of its \
             window, none once half of it is in flight)"
        ),
        "{text}"
    );
    assert!(
        !render_plan(&load(MINIMAL).unwrap()).contains("ack_delay"),
        "off by default, and then not mentioned"
    );
    let err = with("\"2s\"").unwrap_err().to_string();
    assert!(
        err.starts_with("brokers.edge.ack_delay: 2s is above 1s") && err.contains("\"10ms\""),
        "{err}"
    );
}

#[test]
fn max_qos_caps_a_target_and_check_says_so() {
    let with = |v: &str| {
        load(&MINIMAL.replace(
            "url = \"mqtt://127.0.0.1:1884\"",
            &format!("url = \"mqtt://127.0.0.1:1884\"\nmax_qos = {v}"),
        ))
    };
    assert_eq!(MINIMAL.matches("127.0.0.1:1884").count(), 1);
    let plan = with("1").unwrap();
    assert_eq!(plan.brokers["cloud"].max_qos, Qos::AtLeastOnce);
    assert_eq!(
        load(MINIMAL).unwrap().brokers["cloud"].max_qos,
        Qos::ExactlyOnce
    );
    let text = render_plan(&plan);
    assert!(
        text.contains("as a target: QoS 1 at most (max_qos); messages of a higher QoS go at QoS 1"),
        "{text}"
    );
    let err = with("3").unwrap_err().to_string();
    assert!(
        err.starts_with("brokers.cloud.max_qos: 3 is not a QoS: 0, 1 or 2"),
        "{err}"
    );
}

#[test]
fn env_errors_say_which_variable() {
    let err = load_env(MINIMAL, &[("MQBRIDGE__ROUTES__0__POOL_SIZE", "lots")])
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        r#"routes[0].pool_size: "lots" is not a number of pairs or "auto" (set by MQBRIDGE__ROUTES__0__POOL_SIZE)"#
    );
    let err = load_env(MINIMAL, &[("MQBRIDGE__BROKERS__CLOUD__PASWORD", "x")])
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(r#"unknown key "pasword" in brokers.cloud (did you mean "password"?)"#),
        "{err}"
    );
    assert!(
        err.ends_with("(set by MQBRIDGE__BROKERS__CLOUD__PASWORD)"),
        "{err}"
    );
    let err = load_env(MINIMAL, &[("MQBRIDGE__ROUTES__5__QOS", "1")])
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("MQBRIDGE__ROUTES__5__QOS: routes has 1 entry,"),
        "{err}"
    );
}

#[test]
fn password_file_is_read_and_exclusive_with_password() {
    let secret = TempConfig::new("pw", "hunter2\n");
    let with_file = MINIMAL.replace(
        "protocol = \"3.1.1\"",
        &format!(
            "protocol = \"3.1.1\"\nusername = \"bridge\"\npassword_file = {:?}",
            secret.path()
        ),
    );
    let plan = load(&with_file).unwrap();
    let password = plan.brokers["cloud"].password.as_ref().unwrap();
    assert_eq!(password.expose(), "hunter2", "trailing newline trimmed");

    let err = load_env(&with_file, &[("MQBRIDGE__BROKERS__CLOUD__PASSWORD", "x")])
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("brokers.cloud.password: set either"),
        "{err}"
    );

    let missing = with_file.replace(&format!("{:?}", secret.path()), "\"/nonexistent/pw\"");
    let err = error(&missing);
    assert!(
        err.starts_with("brokers.cloud.password_file: cannot read /nonexistent/pw: "),
        "{err}"
    );
}

#[test]
fn password_never_appears_in_the_plan_output() {
    let plan = load_env(
        &MINIMAL.replace(
            "protocol = \"3.1.1\"",
            "protocol = \"3.1.1\"\nusername = \"u\"",
        ),
        &[("MQBRIDGE__BROKERS__CLOUD__PASSWORD", "Tr0ub4dor&3")],
    )
    .unwrap();
    let text = render_plan(&plan);
    assert!(!text.contains("Tr0ub4dor"), "{text}");
    assert!(text.contains("<redacted>"), "{text}");
    assert!(!format!("{plan:?}").contains("Tr0ub4dor"));
    assert!(!dry_run(&plan, "a/b/c").contains("Tr0ub4dor"));
}

#[test]
fn yaml_and_json_are_accepted_by_extension() {
    let yaml = TempConfig::new(
        "yaml",
        "bridge: {name: b, instance: i}\nbrokers:\n  x: {url: \"mqtt://h\"}\n  y: {url: \"ws://h\", protocol: 3.1}\nroutes:\n  - {name: r, from: x, to: y, topics: \"t/#\", pool_size: \"2\"}\n",
    );
    let plan = load_plan_with_env(yaml.path(), Vec::<(String, String)>::new()).unwrap();
    assert_eq!(plan.brokers["y"].protocol, Protocol::V31);
    assert_eq!(plan.brokers["y"].path, "/mqtt");
    assert_eq!(plan.routes[0].pool_size, 2);

    let json = TempConfig::new(
        "json",
        r#"{"bridge": {"name": "b"}, "brokers": {"x": {"url": "mqtt://h"}},
            "routes": [{"name": "r", "from": "x", "to": "x", "topics": ["a"],
                        "rewrite": [{"match": "a", "to": "b"}]}]}"#,
    );
    let plan = load_plan_with_env(json.path(), Vec::<(String, String)>::new()).unwrap();
    assert_eq!(plan.routes[0].rewrite.apply("a").unwrap(), "b");
}

#[test]
fn check_shows_pairs_capacity_and_rewrite_examples() {
    let plan = load_plan(&config_dir().join("example.toml")).unwrap();
    let text = render_plan(&plan);
    for expected in [
        "telemetry-up: edge → cloud",
        "$share/mqb-telemetry/factory/+/telemetry/#",
        "factory/x1/telemetry/rest/of/topic → sites/edge-1/x1/telemetry/rest/of/topic",
        "4 pairs",
        "mqb-edge-",
        "no loops",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
}

#[test]
fn check_reports_a_mirror_as_a_possible_loop() {
    let plan = load(&format!(
        "{MINIMAL}\n[[routes]]\nname = \"down\"\nfrom = \"cloud\"\nto = \"edge\"\ntopics = [\"a/#\"]\n"
    ))
    .unwrap();
    let text = render_plan(&plan);
    assert!(
        text.contains("could loop: up (edge → cloud) and down (cloud → edge)"),
        "{text}"
    );
    assert!(
        text.contains("at cloud: MQTT 3.x carries no marker"),
        "{text}"
    );
    assert!(
        text.contains("at edge: cut by the mqbridge-via marker"),
        "{text}"
    );
}

#[test]
fn dry_run_follows_one_topic() {
    let plan = load_plan(&config_dir().join("example.toml")).unwrap();
    let text = dry_run(&plan, "factory/line-3/telemetry/temp");
    assert!(
        text.contains("\"sites/edge-1/line-3/telemetry/temp\" on cloud"),
        "{text}"
    );
    assert!(!text.contains("commands-down"), "{text}");
    assert!(dry_run(&plan, "elsewhere").contains("no route takes it"));
}

fn mqbridge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mqbridge"))
        .args(args)
        .env("MQBRIDGE_LOG", "off")
        .output()
        .unwrap()
}

fn arg(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn binary_check_exits_0_and_prints_the_plan() {
    let example = config_dir().join("example.toml");
    let out = mqbridge(&["check", "-c", arg(&example)]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("telemetry-up: edge → cloud"), "{stdout}");
}

#[test]
fn binary_check_exits_2_naming_the_key() {
    let bad = TempConfig::toml(&MINIMAL.replace(r#"from = "edge""#, r#"from = "edgee""#));
    let out = mqbridge(&["check", "-c", arg(bad.path())]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(r#"error: routes[0].from: unknown broker "edgee""#),
        "{stderr}"
    );
}

#[test]
fn binary_dry_run_prints_the_rewritten_topic() {
    let example = config_dir().join("two-mosquitto.toml");
    let out = mqbridge(&[
        "check",
        "-c",
        arg(&example),
        "--topic",
        "sensors/kitchen/temp",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("\"bridged/kitchen/temp\" on right"),
        "{stdout}"
    );
}

/// Issue #16: `check --topic` with a wildcard said "not a topic name" and exited 0.
#[test]
fn binary_dry_run_of_a_wildcard_is_an_error() {
    let example = config_dir().join("two-mosquitto.toml");
    for topic in ["sensors/+/temp", "sensors/#"] {
        let out = mqbridge(&["check", "-c", arg(&example), "--topic", topic]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{topic}: {stderr}");
        assert!(stderr.contains("is not a topic name"), "{stderr}");
        assert!(stderr.contains("no + or #"), "{stderr}");
    }
}

/// Issue #16: a route from a broker to itself with no rewrite republishes every message onto
/// the topic it came from (subscribers get each twice); refused, naming the key.
#[test]
fn a_route_back_into_its_own_source_without_a_rewrite_is_refused() {
    let err = error(&MINIMAL.replace(r#"to = "cloud""#, r#"to = "edge""#));
    assert!(
        err.starts_with("routes[0].to: \"edge\" is also the route's source"),
        "{err}"
    );
    assert!(err.contains("[[routes.rewrite]]"), "{err}");
    // With a rewrite that moves it elsewhere it is a valid route.
    let moved = MINIMAL.replace(r#"to = "cloud""#, r#"to = "edge""#)
        + "\n[[routes.rewrite]]\nmatch = \"a/+/#\"\nto = \"b/{1}/{2}\"\n";
    load(&moved).unwrap();
}

/// Issue #16: the loop analysis printed a route into its own source's overlap twice.
#[test]
fn binary_loop_analysis_prints_each_finding_once() {
    let file = TempConfig::toml(
        &(MINIMAL.replace(r#"to = "cloud""#, r#"to = "edge""#)
            + "\n[[routes.rewrite]]\nmatch = \"a/+/#\"\nto = \"a/moved/{2}\"\n"),
    );
    let out = mqbridge(&["check", "-c", arg(file.path())]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let loops = stdout.split("loop analysis").nth(1).unwrap_or_default();
    assert!(loops.contains("up (edge → itself)"), "{stdout}");
    let lines: Vec<&str> = loops
        .lines()
        .filter(|l| l.contains(" publishes "))
        .collect();
    assert_eq!(lines.len(), 1, "{loops}");
}

/// `[spool]` (#15): `spool = true` needs the table, the table needs `dir`, and `max_age` is a
/// duration of at least a second.
#[test]
fn spool_settings_are_checked_and_name_the_key() {
    let spooled = MINIMAL.replace("[[routes]]", "[[routes]]\nspool = true");
    let err = error(&spooled);
    assert!(
        err.contains("routes[0].spool") && err.contains("[spool]"),
        "{err}"
    );
    let err = error(&format!("{spooled}\n[spool]\nmax_bytes = \"1GiB\"\n"));
    assert!(err.contains("spool.dir"), "{err}");
    let err = error(&format!(
        "{spooled}\n[spool]\ndir = \"s\"\nmax_age = \"0s\"\n"
    ));
    assert!(
        err.contains("spool.max_age") && err.contains("at least \"1s\""),
        "{err}"
    );
    let err = error(&format!(
        "{spooled}\n[spool]\ndir = \"s\"\nmax_age = \"a week\"\n"
    ));
    assert!(err.contains("spool.max_age"), "{err}");
    let plan = load(&format!(
        "{spooled}\n[spool]\ndir = \"s\"\nmax_age = \"7d\"\n"
    ))
    .unwrap();
    assert_eq!(
        plan.routes[0].spool.as_ref().and_then(|s| s.max_age),
        Some(std::time::Duration::from_secs(7 * 86400))
    );
    let plan = load(&format!(
        "{spooled}\n[spool]\ndir = \"s\"\nmax_bytes = \"64MiB\"\n"
    ))
    .unwrap();
    let spool = plan.routes[0].spool.as_ref().expect("the route spools");
    assert_eq!(spool.max_bytes, 64 << 20);
    assert!(
        spool.dir.ends_with(format!(
            "s/{}/{}/{}",
            plan.bridge.name, plan.bridge.instance, plan.routes[0].name
        )),
        "{}",
        spool.dir.display()
    );
}

/// Two broker entries at one address (one broker declared twice) gave the source and target
/// connections one client id: each took the other's session, for ever (#16).
#[test]
fn one_broker_declared_twice_gets_two_client_ids() {
    use mqbridge::config::{Side, client_id};
    let twice = MINIMAL.replace("mqtt://127.0.0.1:1884", "mqtt://127.0.0.1:21883")
        + "\n[[routes.rewrite]]\nmatch = \"a/+/#\"\nto = \"b/{1}/{2}\"\n";
    let plan = load(&twice).unwrap();
    let route = &plan.routes[0];
    let source = client_id(&plan.bridge, route, 0, Side::Source);
    let target = client_id(&plan.bridge, route, 0, Side::Target);
    assert_eq!(source, "edge-1-pod-0-up-0");
    assert_eq!(target, "edge-1-pod-0-up-0-t");
    // Two brokers: ids as before (sessions of running deployments are kept).
    let plan = load(MINIMAL).unwrap();
    let route = &plan.routes[0];
    assert_eq!(
        client_id(&plan.bridge, route, 0, Side::Target),
        client_id(&plan.bridge, route, 0, Side::Source)
    );
}

#[test]
fn check_says_what_caps_a_pair_on_the_source_side() {
    let v311 = load(&MINIMAL.replace(
        "url = \"mqtt://127.0.0.1:21883\"",
        "url = \"mqtt://127.0.0.1:21883\"\nprotocol = \"3.1.1\"",
    ))
    .unwrap();
    let text = render_plan(&v311);
    assert!(
        text.contains("edge speaks MQTT 3.1.1 and cannot be told a window: its own in-flight limit caps each pair"),
        "{text}"
    );
    let v5 = load(&MINIMAL.replace(
        "url = \"mqtt://127.0.0.1:21883\"",
        "url = \"mqtt://127.0.0.1:21883\"\nprotocol = \"5\"",
    ))
    .unwrap();
    let text = render_plan(&v5);
    assert!(
        text.contains("edge is told the target's window as its Receive Maximum (at most 16384)"),
        "{text}"
    );
}
