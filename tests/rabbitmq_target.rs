//! RabbitMQ 3.x as a target: its MQTT plugin has no QoS 2 and answers a QoS 2 PUBLISH with
//! PUBACK (examples/inflight_probe.rs saw it). Before, the bridge took that PUBACK for an ack of
//! nothing: the window filled after 20 messages and the route stalled.

mod support;

use std::time::Duration;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos2_route_into_rabbitmq_delivers_every_message_at_qos1_and_says_so() {
    let rabbit = RabbitMq::start().await;
    let src = Mosquitto::start().await;
    let mut cfg = RouteConfig::new(src.port(), Proto::V5, rabbit.mqtt_port(), Proto::V311);
    cfg.qos = 2;
    let collector = Collector::start(rabbit.mqtt_port(), Proto::V311, "in/#", 1).await;
    let bridge = start_ready(&cfg.toml(), 1).await;
    // Five times the QoS 2 window of 20.
    let count = 100;
    publish_numbered(
        src.port(),
        Proto::V5,
        |i| format!("in/{}", i % 3),
        2,
        0,
        count,
        "q",
    )
    .await;
    let arrived = collector
        .wait_for_count(count as usize, Duration::from_secs(30))
        .await;
    let log = bridge.log();
    assert!(arrived, "{} of {count}:\n{log}", collector.count());
    let ids: std::collections::BTreeSet<String> = collector
        .received()
        .iter()
        .map(|r| r.payload_str().to_string())
        .collect();
    assert_eq!(ids.len(), count as usize);
    let needle = "the target answered a QoS 2 publish with PUBACK";
    assert_eq!(log.matches(needle).count(), 1, "said once:\n{log}");
    assert!(log.contains("set routes.r.qos = 1"), "{log}");
}
