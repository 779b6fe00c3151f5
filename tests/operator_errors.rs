//! What an operator meets once the config is valid but the brokers disagree with it (#16): each
//! case is one error line that names the cause and the key to change, seen against real peers
//! (NATS, mosquitto with a password file, mosquitto's plain port, two processes with one
//! `bridge.instance`).

mod support;

use std::time::Duration;
use support::*;

const SAY_WITHIN: Duration = Duration::from_secs(20);

/// The first log line containing `needle`, which must be an error.
fn error_line(log: &str, needle: &str) -> String {
    let line = log
        .lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?}:\n{log}"));
    assert!(line.contains(" ERROR "), "logged as an error: {line}");
    line.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v5_connect_to_a_broker_without_mqtt5_suggests_protocol_3_1_1() {
    let Some(nats) = Nats::start().await else {
        panic!("nats-server is not installed (scripts/test.sh installs it)");
    };
    let dst = Mosquitto::start().await;
    // NATS speaks 3.1.1 only: it answers a v5 CONNECT with a 3.1.1 CONNACK (return code 1),
    // which a v5 decoder took for a malformed packet ("its contents overrun") for ever.
    let cfg = RouteConfig::new(nats.mqtt_port(), Proto::V5, dst.port(), Proto::V311);
    let bridge = Bridge::start(&cfg.toml());
    let needle = r#"set brokers.src.protocol = "3.1.1""#;
    assert!(
        bridge.wait_log(needle, SAY_WITHIN).await,
        "{}",
        bridge.log()
    );
    let line = error_line(&bridge.log(), needle);
    assert!(line.contains("does not speak MQTT 5"), "{line}");
    assert!(line.contains("unsupported protocol version"), "{line}");
    assert!(!bridge.log().contains("overrun"), "{}", bridge.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_and_wrong_credentials_name_the_keys_and_what_was_sent() {
    // A broker as an operator secures it: no anonymous clients, one user in a password file.
    let dir = TestDir::new("passwd");
    let file = dir.path().join("passwd");
    let made = std::process::Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&file)
        .args(["bridge", "right"])
        .status()
        .expect("run mosquitto_passwd");
    assert!(made.success());
    let secured = Mosquitto::start_with(MosquittoOpts {
        extra: format!("allow_anonymous false\npassword_file {}\n", file.display()),
        ..Default::default()
    })
    .await;
    let open = Mosquitto::start().await;
    for v5 in [false, true] {
        let proto = if v5 { Proto::V5 } else { Proto::V311 };
        // The source connects once the target did: the target is the one refused. One bridge
        // sends no credentials, the other a wrong password.
        let none = RouteConfig::new(open.port(), proto, secured.port(), proto);
        let mut wrong = none.clone();
        wrong.dst_extra = "username = \"bridge\"\npassword = \"wrong\"\n".into();
        let (a, b) = (Bridge::start(&none.toml()), Bridge::start(&wrong.toml()));
        let check = |bridge: &Bridge, needle: &str| {
            let log = bridge.log();
            let line = error_line(&log, needle);
            // mosquitto says "not authorized" to both (v5 0x87, 3.1.1 return code 5): only
            // what we sent tells them apart.
            let refusal = if v5 {
                "not authorized (code 0x87)"
            } else {
                "not authorized (code 0x05)"
            };
            assert!(line.contains(refusal), "{line}");
            assert!(
                !line.contains("wrong"),
                "the password never appears: {line}"
            );
        };
        let no_creds =
            "no credentials were sent: check brokers.dst.username and brokers.dst.password";
        let bad_creds = r#"username "bridge" and a password were sent: check brokers.dst.username and brokers.dst.password"#;
        assert!(
            a.wait_log(no_creds, SAY_WITHIN).await,
            "v5 {v5}:\n{}",
            a.log()
        );
        assert!(
            b.wait_log(bad_creds, SAY_WITHIN).await,
            "v5 {v5}:\n{}",
            b.log()
        );
        check(&a, no_creds);
        check(&b, bad_creds);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_or_websocket_to_a_plain_mqtt_port_says_the_port_may_not_speak_it() {
    let (src, plain) = (Mosquitto::start().await, Mosquitto::start().await);
    let mut tls = RouteConfig::new(src.port(), Proto::V311, plain.port(), Proto::V311);
    tls.dst_url = Some(format!("mqtts://127.0.0.1:{}", plain.port()));
    let mut ws = tls.clone();
    ws.dst_url = Some(format!("ws://127.0.0.1:{}/mqtt", plain.port()));
    let cases = [
        (
            Bridge::start(&tls.toml()),
            "does this port speak TLS?",
            "TLS handshake with 127.0.0.1:",
        ),
        (
            Bridge::start(&ws.toml()),
            "does this port speak WebSocket?",
            "WebSocket handshake with ws://127.0.0.1:",
        ),
    ];
    for (bridge, needle, what) in &cases {
        assert!(
            bridge.wait_log(needle, SAY_WITHIN).await,
            "{}",
            bridge.log()
        );
        let line = error_line(&bridge.log(), needle);
        assert!(line.contains(what), "{line}");
        assert!(line.contains("broker=dst"), "{line}");
    }
}

/// Two processes with one config (one `bridge.instance`, so one set of client ids) take each
/// other's sessions: 28 reconnects in 20 s and nothing ready, with only "connection lost" to
/// see. mosquitto just closes the older connection, in 3.1.1 and (2.0.11) in MQTT 5 alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_with_one_instance_are_told_their_session_is_taken_over() {
    for proto in [Proto::V311, Proto::V5] {
        let (src, dst) = (Mosquitto::start().await, Mosquitto::start().await);
        let cfg = RouteConfig::new(src.port(), proto, dst.port(), proto);
        let needle = "another client may be taking the session over";
        two_processes_say(&cfg, needle).await;
    }
}

/// A broker that says it in MQTT 5 (DISCONNECT 0x8E, as our embedded broker does) is named at
/// the first take-over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v5_session_taken_over_is_named_at_once() {
    use mqbridge::broker::{BrokerOptions, EmbeddedBroker};
    let src = EmbeddedBroker::start(BrokerOptions::named("src")).expect("embedded broker");
    let dst = EmbeddedBroker::start(BrokerOptions::named("dst")).expect("embedded broker");
    let cfg = RouteConfig::new(src.port(), Proto::V5, dst.port(), Proto::V5);
    let needle = "session taken over (0x8e): another client connected with client id";
    two_processes_say(&cfg, needle).await;
}

/// Runs `cfg` in two processes at once (one `bridge.instance`) until one of them logs `needle`
/// as an error naming `bridge.instance`.
async fn two_processes_say(cfg: &RouteConfig, needle: &str) {
    let (a, b) = (Bridge::start(&cfg.toml()), Bridge::start(&cfg.toml()));
    let said = wait_until_async(SAY_WITHIN, || async {
        a.log().contains(needle) || b.log().contains(needle)
    })
    .await;
    let log = format!("--- a ---\n{}\n--- b ---\n{}", a.log(), b.log());
    assert!(said, "{log}");
    let line = error_line(&log, needle);
    assert!(line.contains("same bridge.instance"), "{line}");
}
