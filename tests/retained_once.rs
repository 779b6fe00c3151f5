//! A retained message already on the source is forwarded once per route (issue #14, hole 4;
//! SPEC 4.5), not once per pair and again on every start: before the fix one retained message,
//! a pool of 3 and three starts showed a live subscriber on the target 12 copies. mosquitto 2.0
//! sends retained messages for shared subscriptions (MQTT 5 says it must not), and on 3.x on
//! every SUBSCRIBE.

mod support;

use std::time::Duration;
use support::*;

async fn one_copy_over_three_starts(proto: Proto) {
    let src = Mosquitto::start().await;
    let dst = Mosquitto::start().await;
    publish_one(src.port(), proto, "in/state", 1, true, "online").await;
    let live = Collector::start(dst.port(), Proto::V5, "in/#", 1).await;
    let mut cfg = RouteConfig::new(src.port(), proto, dst.port(), Proto::V5);
    cfg.qos = 1;
    cfg.pool_size = 3;
    for _ in 0..3 {
        let mut bridge = start_ready(&cfg.toml(), 3).await;
        // A live message after the subscriptions: once it is through, so is any retained copy
        // the pairs were sent (the broker sends those before anything newer).
        publish_one(src.port(), proto, "in/tick", 1, false, "t").await;
        assert!(
            live.wait_for(Duration::from_secs(10), |r| r
                .iter()
                .any(|m| m.topic == "in/tick"))
                .await,
            "{}",
            bridge.log()
        );
        bridge.stop_cleanly().await;
    }
    let copies = live
        .received()
        .iter()
        .filter(|m| m.topic == "in/state")
        .count();
    assert_eq!(
        copies, 1,
        "{proto:?}: the retained message arrived {copies} times"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_message_is_forwarded_once_v311() {
    one_copy_over_three_starts(Proto::V311).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_message_is_forwarded_once_v5() {
    one_copy_over_three_starts(Proto::V5).await;
}

/// Issue #14, hole 10: a v5 target without retained messages (CONNACK Retain Available 0;
/// mosquitto's `retain_available false`) disconnects a client that publishes with RETAIN 1.
/// Before the fix the bridge forwarded the retained message as it was, was cut off, reconnected
/// five times and then dropped it. Now it goes as a live message, counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_without_retained_messages_gets_them_as_live_messages() {
    let src = Mosquitto::start().await;
    let dst = Mosquitto::start_with(MosquittoOpts {
        extra: "retain_available false\n".into(),
        ..Default::default()
    })
    .await;
    publish_one(src.port(), Proto::V5, "in/state", 1, true, "online").await;
    let live = Collector::start(dst.port(), Proto::V5, "in/#", 1).await;
    let mut cfg = RouteConfig::new(src.port(), Proto::V5, dst.port(), Proto::V5);
    cfg.qos = 1;
    let admin = format!("127.0.0.1:{}", free_port());
    cfg.tail = format!("[admin]\nlisten = \"{admin}\"\n");
    let mut bridge = start_ready(&cfg.toml(), 1).await;
    publish_one(src.port(), Proto::V5, "in/live", 1, true, "retained too").await;
    assert!(
        live.wait_for_count(2, Duration::from_secs(10)).await,
        "{}",
        bridge.log()
    );
    let rx = live.received();
    assert!(rx.iter().any(|m| m.payload_str() == "online"));
    assert!(rx.iter().any(|m| m.payload_str() == "retained too"));
    let body = http_get(&admin, "/metrics").await.expect("/metrics").1;
    assert_eq!(
        metric(&body, "mqbridge_retain_cleared_total"),
        2.0,
        "{body}"
    );
    assert_eq!(
        metric(&body, "mqbridge_messages_dropped_total"),
        0.0,
        "{body}"
    );
    assert!(
        !bridge.log().contains("connection lost"),
        "{}",
        bridge.log()
    );
    bridge.stop_cleanly().await;
}
