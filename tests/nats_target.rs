//! NATS as the target: its MQTT listener speaks 3.1.1 and takes QoS 0 and 1 only. It closes the
//! connection at a QoS 2 PUBLISH ("publish QoS=2 not supported"), and 3.x has no CONNACK field
//! to say so. Before `max_qos`, a QoS 2 route into NATS reconnected five times per message and
//! then dropped it as poison (0 of 100 delivered in the first second, every one dropped in time).

mod support;

use std::time::Duration;
use support::*;

/// Without `max_qos`: the bridge names the key and drops nothing (the source keeps the rest).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos2_route_into_nats_names_max_qos_and_drops_nothing() {
    let Some(nats) = Nats::start().await else {
        panic!("nats-server is not installed (scripts/test.sh installs it)");
    };
    let src = Mosquitto::start().await;
    let mut cfg = RouteConfig::new(src.port(), Proto::V311, nats.mqtt_port(), Proto::V311);
    cfg.qos = 2;
    let bridge = start_ready(&cfg.toml(), 1).await;
    publish_numbered(
        src.port(),
        Proto::V311,
        |i| format!("in/{i}"),
        2,
        0,
        20,
        "q",
    )
    .await;
    let said = bridge
        .wait_log("brokers.dst.max_qos = 1", Duration::from_secs(20))
        .await;
    let log = bridge.log();
    assert!(
        said,
        "no word of max_qos:\n{log}\n--- nats ---\n{}",
        nats.log()
    );
    assert!(
        nats.log().contains("publish QoS=2 not supported"),
        "NATS refused something else:\n{}",
        nats.log()
    );
    // The fifth close, where a poison message is given up, gave up nothing.
    assert!(
        !log.contains("undeliverable message"),
        "a message was given up:\n{log}"
    );
}

/// With `max_qos = 1`: every QoS 2 message reaches NATS, at QoS 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_qos_1_carries_a_qos2_route_into_nats() {
    let Some(nats) = Nats::start().await else {
        panic!("nats-server is not installed (scripts/test.sh installs it)");
    };
    let src = Mosquitto::start().await;
    let collector = Collector::start(nats.mqtt_port(), Proto::V311, "in/#", 1).await;
    let mut cfg = RouteConfig::new(src.port(), Proto::V311, nats.mqtt_port(), Proto::V311);
    cfg.qos = 2;
    cfg.dst_extra = "max_qos = 1\n".into();
    let bridge = start_ready(&cfg.toml(), 1).await;
    publish_numbered(
        src.port(),
        Proto::V311,
        |i| format!("in/{i}"),
        2,
        0,
        500,
        "q",
    )
    .await;
    collector.wait_for_count(500, Duration::from_secs(30)).await;
    collector
        .settle(Duration::from_millis(500), Duration::from_secs(5))
        .await;
    let count = count_ids(&collector.received(), "q", 0..500);
    assert!(
        count.exactly_once(),
        "{count}\n{}\n--- nats ---\n{}",
        bridge.log(),
        nats.log()
    );
    assert!(
        !nats.log().contains("QoS=2 not supported"),
        "{}",
        nats.log()
    );
}
