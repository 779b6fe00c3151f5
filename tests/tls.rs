//! TLS and WebSocket transports against real mosquitto (issue #5): mutual TLS with a password,
//! a wrong CA and a missing client certificate reported by broker and cause while the bridge keeps
//! retrying, no password in any log line or in `check`, and MQTT over ws:// and wss://.
//!
//! Certificates come from `certs/make-dev-certs.sh`, run into a scratch directory per test.
//! Debian's mosquitto has no websockets support, so the WebSocket tests put `WsRelay` (a
//! WebSocket ↔ TCP relay in the test process) in front of a real mosquitto's TCP port.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::*;

const PASSWORD: &str = "tls-pw-7Qx9-never-logged";

/// A fresh dev CA with server and client certificates, in a directory of its own.
fn dev_certs() -> TestDir {
    let dir = TestDir::new("certs");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs/make-dev-certs.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(dir.path())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

fn file(dir: &TestDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// A mosquitto password file with `bridge` / [`PASSWORD`].
fn password_file(dir: &TestDir) -> PathBuf {
    let path = file(dir, "passwords");
    let status = Command::new("mosquitto_passwd")
        .arg("-c")
        .arg("-b")
        .arg(&path)
        .arg("bridge")
        .arg(PASSWORD)
        .status()
        .expect("mosquitto_passwd (Debian package mosquitto) is needed");
    assert!(status.success(), "mosquitto_passwd failed");
    path
}

/// A mosquitto with its usual plain listener (for the test's own clients) and a TLS listener that
/// requires a client certificate signed by `certs`' CA. Returns the broker and the TLS port.
async fn tls_mosquitto(certs: &TestDir, passwords: Option<&Path>) -> (Mosquitto, u16) {
    let tls_port = free_port();
    let mut extra = format!(
        "listener {tls_port} 127.0.0.1\n\
         cafile {ca}\n\
         certfile {cert}\n\
         keyfile {key}\n\
         require_certificate true\n",
        ca = file(certs, "ca.pem").display(),
        cert = file(certs, "server.pem").display(),
        key = file(certs, "server.key").display(),
    );
    if let Some(p) = passwords {
        // A general option: anonymous clients (the test's) still get in, but a client that
        // sends credentials must send the right ones.
        extra.push_str(&format!("password_file {}\n", p.display()));
    }
    let broker = Mosquitto::start_with(MosquittoOpts {
        extra,
        ..Default::default()
    })
    .await;
    (broker, tls_port)
}

/// `[brokers.<name>.tls]` with the given files (`None` leaves a key out).
fn tls_table(broker: &str, ca: &Path, client: Option<&TestDir>) -> String {
    let mut t = format!("[brokers.{broker}.tls]\nca_file = \"{}\"\n", ca.display());
    if let Some(c) = client {
        t.push_str(&format!(
            "cert_file = \"{}\"\nkey_file = \"{}\"\n",
            file(c, "client.pem").display(),
            file(c, "client.key").display()
        ));
    }
    t
}

/// Lines of the bridge log that report a failed connection attempt to broker `dst`.
fn failed_attempts<'a>(log: &'a str, cause: &str) -> Vec<&'a str> {
    log.lines()
        .filter(|l| l.contains("cannot connect") && l.contains("broker=dst") && l.contains(cause))
        .collect()
}

async fn forward_and_check(src: &Mosquitto, collector: &Collector, n: u32) {
    publish_numbered(src.port(), Proto::V5, |i| format!("in/{i}"), 1, 0, n, "m").await;
    assert!(
        collector
            .wait_for_count(n as usize, Duration::from_secs(20))
            .await,
        "{}",
        count_ids(&collector.received(), "m", 0..n)
    );
    collector
        .settle(Duration::from_millis(200), Duration::from_secs(2))
        .await;
    assert_exactly_once(&collector.received(), "m", 0..n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_a_password_forwards_and_never_shows_the_password() {
    let certs = dev_certs();
    let passwords = password_file(&certs);
    let src = Mosquitto::start().await;
    let (dst, tls_port) = tls_mosquitto(&certs, Some(&passwords)).await;
    let mut cfg = RouteConfig::new(src.port(), Proto::V5, dst.port(), Proto::V311);
    // By IP address: verified against the certificate's IP SAN.
    cfg.dst_url = Some(format!("mqtts://127.0.0.1:{tls_port}"));
    cfg.dst_extra = format!(
        "username = \"bridge\"\npassword = \"{PASSWORD}\"\n{}",
        tls_table("dst", &file(&certs, "ca.pem"), Some(&certs))
    );
    let collector = Collector::start(dst.port(), Proto::V5, "in/#", 1).await;
    // Debug level: the most a log can say, and still no password.
    let mut bridge = Bridge::start_with_env(&cfg.toml(), &[("MQBRIDGE_LOG", "debug")]);
    wait_ready(&bridge, 1, 1).await;

    forward_and_check(&src, &collector, 200).await;
    assert!(
        dst.log().contains("u'bridge'"),
        "the bridge logged in as `bridge` on the TLS listener:\n{}",
        dst.log()
    );

    let check = mqbridge_cli(
        &["check", "-c", bridge.config_path().to_str().unwrap()],
        &[],
    );
    assert_eq!(check.code(), Some(0), "{check:?}");
    assert!(
        !check.stdout.contains(PASSWORD) && !check.stderr.contains(PASSWORD),
        "check shows the password:\n{}{}",
        check.stdout,
        check.stderr
    );
    assert!(
        bridge
            .stop(Duration::from_secs(15))
            .await
            .is_some_and(|s| s.success()),
        "{}",
        bridge.log()
    );
    let log = bridge.log();
    assert!(log.contains("pair ready"), "{log}");
    let leaks: Vec<_> = log.lines().filter(|l| l.contains(PASSWORD)).collect();
    assert!(leaks.is_empty(), "password in the log: {leaks:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_is_reported_with_broker_and_cause_and_retried() {
    let certs = dev_certs();
    let other = dev_certs();
    let src = Mosquitto::start().await;
    let (dst, tls_port) = tls_mosquitto(&certs, None).await;
    let mut cfg = RouteConfig::new(src.port(), Proto::V5, dst.port(), Proto::V5);
    cfg.dst_url = Some(format!("mqtts://127.0.0.1:{tls_port}"));
    // The client certificate is fine; the CA we trust did not sign the broker's.
    cfg.dst_extra = tls_table("dst", &file(&other, "ca.pem"), Some(&certs));
    let mut bridge = Bridge::start(&cfg.toml());

    let retried = wait_until(Duration::from_secs(15), || {
        failed_attempts(&bridge.log(), "invalid peer certificate: UnknownIssuer").len() >= 3
    })
    .await;
    let log = bridge.log();
    assert!(
        retried,
        "expected several attempts naming broker dst and the cause:\n{log}"
    );
    let line = failed_attempts(&log, "UnknownIssuer")[0];
    assert!(
        line.contains(&format!("TLS handshake with 127.0.0.1:{tls_port} failed")),
        "{line}"
    );
    assert!(!log.contains("pair ready"), "{log}");
    assert!(bridge.is_running(), "the bridge keeps retrying:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_client_certificate_is_reported_and_retried() {
    let certs = dev_certs();
    let src = Mosquitto::start().await;
    let (dst, tls_port) = tls_mosquitto(&certs, None).await;
    let mut cfg = RouteConfig::new(src.port(), Proto::V5, dst.port(), Proto::V5);
    cfg.dst_url = Some(format!("mqtts://127.0.0.1:{tls_port}"));
    cfg.dst_extra = tls_table("dst", &file(&certs, "ca.pem"), None);
    let bridge = Bridge::start(&cfg.toml());

    // TLS 1.3: the client's handshake is done before the broker looks at the (missing)
    // certificate, so the broker's alert arrives on the first read.
    let retried = wait_until(Duration::from_secs(15), || {
        failed_attempts(&bridge.log(), "CertificateRequired").len() >= 3
    })
    .await;
    assert!(
        retried,
        "expected several attempts naming broker dst and the broker's alert:\n{}",
        bridge.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_websocket_forwards_through_a_relay_to_mosquitto() {
    let src = Mosquitto::start().await;
    let dst = Mosquitto::start().await;
    let relay = WsRelay::start(src.port(), "/mqtt").await;
    let mut cfg = RouteConfig::new(src.port(), Proto::V5, dst.port(), Proto::V5);
    // No path: the default, /mqtt.
    cfg.src_url = Some(format!("ws://127.0.0.1:{}", relay.port()));
    cfg.pool_size = 2;
    let collector = Collector::start(dst.port(), Proto::V5, "in/#", 2).await;
    let mut bridge = start_ready(&cfg.toml(), 2).await;

    forward_and_check(&src, &collector, 500).await;
    let seen = relay.seen();
    // Pairs 0 and 1, and the start's look for a session left at index 2 (SPEC 4.1).
    assert_eq!(seen.connections, 3, "{seen:?}");
    assert!(seen.protocols.iter().all(|p| p == "mqtt"), "{seen:?}");
    assert!(seen.paths.iter().all(|p| p == "/mqtt"), "{seen:?}");
    assert!(seen.binary_frames > 0, "{seen:?}");
    assert_eq!(seen.text_frames, 0, "{seen:?}");
    assert!(
        bridge
            .stop(Duration::from_secs(15))
            .await
            .is_some_and(|s| s.success()),
        "{}",
        bridge.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_secure_websocket_forwards_to_mosquitto() {
    let certs = dev_certs();
    let src = Mosquitto::start().await;
    let dst = Mosquitto::start().await;
    let relay = WsRelay::start_tls(
        dst.port(),
        "/ws",
        &file(&certs, "server.pem"),
        &file(&certs, "server.key"),
    )
    .await;
    let mut cfg = RouteConfig::new(src.port(), Proto::V5, dst.port(), Proto::V311);
    // By DNS name this time: verified against the certificate's DNS SAN.
    cfg.dst_url = Some(format!("wss://localhost:{}/ws", relay.port()));
    cfg.dst_extra = format!(
        "[brokers.dst.tls]\nca_file = \"{}\"\n",
        file(&certs, "ca.pem").display()
    );
    let collector = Collector::start(dst.port(), Proto::V5, "in/#", 2).await;
    let mut bridge = start_ready(&cfg.toml(), 1).await;

    forward_and_check(&src, &collector, 200).await;
    let seen = relay.seen();
    assert_eq!(seen.paths, ["/ws"], "{seen:?}");
    assert_eq!(seen.protocols, ["mqtt"], "{seen:?}");
    assert!(
        bridge
            .stop(Duration::from_secs(15))
            .await
            .is_some_and(|s| s.success()),
        "{}",
        bridge.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_path_the_broker_does_not_serve_is_reported() {
    let src = Mosquitto::start().await;
    let dst = Mosquitto::start().await;
    let relay = WsRelay::start(dst.port(), "/mqtt").await;
    let mut cfg = RouteConfig::new(src.port(), Proto::V5, dst.port(), Proto::V5);
    cfg.dst_url = Some(format!("ws://127.0.0.1:{}/nope", relay.port()));
    let bridge = Bridge::start(&cfg.toml());
    let retried = wait_until(Duration::from_secs(15), || {
        failed_attempts(&bridge.log(), "404").len() >= 2
    })
    .await;
    assert!(retried, "{}", bridge.log());
    assert!(
        bridge
            .log()
            .contains("WebSocket handshake with ws://127.0.0.1:")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_skip_verify_connects_with_a_loud_warning_once() {
    let certs = dev_certs();
    let src = Mosquitto::start().await;
    let (dst, tls_port) = tls_mosquitto(&certs, None).await;
    let mut cfg = RouteConfig::new(src.port(), Proto::V5, dst.port(), Proto::V5);
    cfg.pool_size = 2;
    cfg.dst_url = Some(format!("mqtts://127.0.0.1:{tls_port}"));
    // No ca_file: the system roots would refuse the dev CA, but nothing is verified.
    cfg.dst_extra = format!(
        "[brokers.dst.tls]\ninsecure_skip_verify = true\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        file(&certs, "client.pem").display(),
        file(&certs, "client.key").display()
    );
    let collector = Collector::start(dst.port(), Proto::V5, "in/#", 1).await;
    let bridge = start_ready(&cfg.toml(), 2).await;
    forward_and_check(&src, &collector, 50).await;
    let log = bridge.log();
    let warnings: Vec<_> = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("insecure_skip_verify") && l.contains("dst"))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning for broker dst:\n{log}");
    assert!(warnings[0].contains("NOT verified"), "{}", warnings[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_key_file_stops_the_start_naming_broker_and_file() {
    let certs = dev_certs();
    let bad_key = certs.write("not-a-key.pem", "this is no PEM key\n");
    let mut cfg = RouteConfig::new(free_port(), Proto::V5, free_port(), Proto::V5);
    cfg.dst_url = Some("mqtts://127.0.0.1:8883".into());
    cfg.dst_extra = format!(
        "[brokers.dst.tls]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        file(&certs, "ca.pem").display(),
        file(&certs, "client.pem").display(),
        bad_key.display()
    );
    let mut bridge = Bridge::start(&cfg.toml());
    let status = bridge.wait_exit(Duration::from_secs(10)).await;
    let log = bridge.log();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{log}");
    assert!(
        log.contains("broker \"dst\"")
            && log.contains("tls.key_file")
            && log.contains(&bad_key.display().to_string()),
        "{log}"
    );
}

/// Issue #14, hole 18: certificates rotated at the same path are read again on SIGHUP. Before,
/// TLS configurations were built once per broker and path and kept for the life of the process,
/// so a CA (or client certificate) replaced in place was never seen: here the bridge trusts the
/// wrong CA, the right one is written over it at the same path, and a SIGHUP must let it connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_file_replaced_in_place_is_read_again_on_sighup() {
    let certs = dev_certs();
    let other = dev_certs();
    let rotated = TestDir::new("rotated");
    let ca = file(&rotated, "ca.pem");
    std::fs::copy(file(&other, "ca.pem"), &ca).unwrap();
    let src = Mosquitto::start().await;
    let (dst, tls_port) = tls_mosquitto(&certs, None).await;
    let mut cfg = RouteConfig::new(src.port(), Proto::V5, dst.port(), Proto::V5);
    cfg.dst_url = Some(format!("mqtts://127.0.0.1:{tls_port}"));
    cfg.dst_extra = tls_table("dst", &ca, Some(&certs));
    let collector = Collector::start(dst.port(), Proto::V5, "in/#", 1).await;
    let mut bridge = Bridge::start(&cfg.toml());
    let refused = wait_until(Duration::from_secs(15), || {
        !failed_attempts(&bridge.log(), "UnknownIssuer").is_empty()
    })
    .await;
    assert!(refused, "{}", bridge.log());

    // Rotation as deployments do it: the new file takes the old one's place in one rename.
    let tmp = file(&rotated, "ca.pem.new");
    std::fs::copy(file(&certs, "ca.pem"), &tmp).unwrap();
    std::fs::rename(&tmp, &ca).unwrap();
    bridge.hangup();
    wait_ready(&bridge, 1, 1).await;
    forward_and_check(&src, &collector, 50).await;
    assert!(bridge.is_running(), "{}", bridge.log());
}
