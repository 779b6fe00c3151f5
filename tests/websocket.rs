//! MQTT over ws:// against a real WebSocket MQTT server (issue #5): RabbitMQ 3.10's
//! `rabbitmq_web_mqtt` plugin, on a node each test starts for itself (`support::RabbitMq`, never
//! the machine's own node). The tests in `tls.rs` cover ws:// and wss:// through `WsRelay`, since
//! Debian's mosquitto 2.0.11 has no WebSocket listener; here the WebSocket server, its framing
//! and its MQTT implementation are someone else's.
//!
//! RabbitMQ 3.10 has no shared subscriptions, so as a source it takes `share = "none"`; by its
//! documentation it speaks MQTT 3.1 and 3.1.1 only, and QoS 0 and 1 (a QoS 2 subscription is
//! granted QoS 1), so the routes here are 3.1.1 at QoS 1. As a source it sends at most
//! `mqtt.prefetch` (10) unacknowledged messages, fewer than the bridge's window of 20.

mod support;

use std::time::Duration;
use support::*;

/// Messages per test: a few hundred, numbered.
const N: u32 = 300;

/// Waits until every id of `prefix` arrived, lets late duplicates show up, and asserts QoS 1
/// arrivals on `in/<id>`, each id exactly once.
async fn expect_all(collector: &Collector, prefix: &str) {
    assert!(
        collector
            .wait_for_count(N as usize, Duration::from_secs(30))
            .await,
        "{}",
        count_ids(&collector.received(), prefix, 0..N)
    );
    collector
        .settle(Duration::from_millis(300), Duration::from_secs(3))
        .await;
    let received = collector.received();
    assert_exactly_once(&received, prefix, 0..N);
    for r in &received {
        let id = parse_id(&r.payload, prefix).expect("numbered payload");
        assert_eq!(r.topic, format!("in/{id}"), "{r:?}");
        assert_eq!(r.qos, 1, "{r:?}");
    }
}

/// Lines of RabbitMQ's log about Web MQTT (WebSocket) connections.
fn web_mqtt_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("Web MQTT connection"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_to_rabbitmq_over_websocket_delivers_every_message() {
    let mut rabbit = RabbitMq::start().await;
    eprintln!(
        "RabbitMQ node {} up in {:?}",
        rabbit.node(),
        rabbit.started_in()
    );
    let src = Mosquitto::start().await;
    let mut cfg = RouteConfig::new(src.port(), Proto::V5, rabbit.mqtt_port(), Proto::V311);
    cfg.dst_url = Some(rabbit.ws_url());
    cfg.qos = 1;
    // On RabbitMQ's plain MQTT listener: what crosses the WebSocket must come out as MQTT.
    let collector = Collector::start(rabbit.mqtt_port(), Proto::V311, "in/#", 1).await;
    let mut bridge = start_ready(&cfg.toml(), 1).await;

    publish_numbered(src.port(), Proto::V5, |i| format!("in/{i}"), 1, 0, N, "ws").await;
    expect_all(&collector, "ws").await;

    let log = rabbit.log();
    assert!(
        !web_mqtt_lines(&log).is_empty(),
        "the bridge did not come in over Web MQTT:\n{log}"
    );
    bridge.stop_cleanly().await;
    rabbit.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_over_websocket_to_mosquitto_delivers_every_message() {
    let mut rabbit = RabbitMq::start().await;
    eprintln!(
        "RabbitMQ node {} up in {:?}",
        rabbit.node(),
        rabbit.started_in()
    );
    let dst = Mosquitto::start().await;
    let mut cfg = RouteConfig::new(rabbit.mqtt_port(), Proto::V311, dst.port(), Proto::V5);
    cfg.src_url = Some(rabbit.ws_url());
    cfg.qos = 1;
    // RabbitMQ 3.10 has no `$share/…`: a plain subscription, one pair.
    cfg.route_extra = "share = \"none\"".into();
    let collector = Collector::start(dst.port(), Proto::V5, "in/#", 1).await;
    let mut bridge = start_ready(&cfg.toml(), 1).await;

    publish_numbered(
        rabbit.mqtt_port(),
        Proto::V311,
        |i| format!("in/{i}"),
        1,
        0,
        N,
        "sw",
    )
    .await;
    expect_all(&collector, "sw").await;

    let log = rabbit.log();
    assert!(
        !web_mqtt_lines(&log).is_empty(),
        "the bridge did not come in over Web MQTT:\n{log}"
    );
    bridge.stop_cleanly().await;
    rabbit.stop().await;
}
