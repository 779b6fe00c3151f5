//! Sources without shared subscriptions (issue #14, hole 19; SPEC 4.1). NATS's MQTT listener
//! (like aedes and amqtt) grants `$share/<group>/<filter>` as a literal filter that no topic
//! matches: before the fix the pair said "ready" and 0 of the messages arrived. Now a 3.x pair
//! proves the share works with a probe message before it calls itself ready.

mod support;

use std::time::Duration;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_takes_share_literally_is_an_error_naming_share() {
    let Some(nats) = Nats::start().await else {
        panic!("nats-server is not installed (scripts/test.sh installs it)");
    };
    let dst = Mosquitto::start().await;
    let mut cfg = RouteConfig::new(nats.mqtt_port(), Proto::V311, dst.port(), Proto::V311);
    cfg.qos = 1;
    let bridge = Bridge::start(&cfg.toml());
    let said = bridge
        .wait_log(
            "does not deliver shared subscriptions",
            Duration::from_secs(20),
        )
        .await;
    let log = bridge.log();
    assert!(
        said,
        "no error about the share:\n{log}\n--- nats ---\n{}",
        nats.log()
    );
    assert!(log.contains("routes.r.share = \"none\""), "{log}");
    assert!(log.contains("brokers.src.share_probe = false"), "{log}");
    assert!(log.contains(" ERROR "), "logged as an error: {log}");
    assert!(
        !log.contains("pair ready"),
        "a pair that gets nothing is not ready: {log}"
    );
}

/// The fix the error suggests works: `share = "none"` on NATS carries every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn share_none_on_a_source_without_shares_carries_everything() {
    let Some(nats) = Nats::start().await else {
        panic!("nats-server is not installed (scripts/test.sh installs it)");
    };
    let dst = Mosquitto::start().await;
    let collector = Collector::start(dst.port(), Proto::V5, "in/#", 1).await;
    let mut cfg = RouteConfig::new(nats.mqtt_port(), Proto::V311, dst.port(), Proto::V311);
    cfg.qos = 1;
    cfg.route_extra = "share = \"none\"".into();
    let bridge = start_ready(&cfg.toml(), 1).await;
    publish_numbered(
        nats.mqtt_port(),
        Proto::V311,
        |i| format!("in/{i}"),
        1,
        0,
        200,
        "n",
    )
    .await;
    let all = collector.wait_for_count(200, Duration::from_secs(20)).await;
    assert!(
        all,
        "{} of 200 arrived:\n{}",
        collector.count(),
        bridge.log()
    );
}

/// `share_probe = false` skips the probe (for brokers whose ACLs forbid its topic): the pair is
/// ready after its SUBACKs, as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn share_probe_false_skips_the_probe() {
    let src = Mosquitto::start().await;
    let dst = Mosquitto::start().await;
    let mut cfg = RouteConfig::new(src.port(), Proto::V311, dst.port(), Proto::V311);
    cfg.src_extra = "share_probe = false".into();
    let _bridge = start_ready(&cfg.toml(), 1).await;
    assert!(
        !src.log().contains("mqbridge/probe/"),
        "probed anyway:\n{}",
        src.log()
    );
}

/// On mosquitto (which shares) the probe passes, and its topic never reaches the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_passes_on_a_sharing_broker_and_is_not_forwarded() {
    let src = Mosquitto::start().await;
    let dst = Mosquitto::start().await;
    let collector = Collector::start(dst.port(), Proto::V5, "#", 1).await;
    let mut cfg = RouteConfig::new(src.port(), Proto::V311, dst.port(), Proto::V311);
    cfg.topics = r##"["#"]"##;
    let bridge = start_ready(&cfg.toml(), 1).await;
    assert!(src.log().contains("mqbridge/probe/"), "{}", src.log());
    publish_one(src.port(), Proto::V311, "in/after", 1, false, "x").await;
    assert!(
        collector.wait_for_count(1, Duration::from_secs(10)).await,
        "{}",
        bridge.log()
    );
    collector
        .settle(Duration::from_millis(300), Duration::from_secs(2))
        .await;
    let topics: Vec<String> = collector
        .received()
        .iter()
        .map(|r| r.topic.clone())
        .collect();
    assert_eq!(topics, ["in/after"], "{}", bridge.log());
}
