//! A route into a BifroMQ-shaped target (the embedded broker's profile: 200 PUBLISH/s and
//! 512 KiB/s per connection, Receive Maximum 200), configured as an operator would, with the
//! broker's quotas: nothing lost, nothing ever over a quota (BifroMQ discards what is over, on
//! MQTT 3.x without an ack), and an auto pool that doubles to the offered load. The source is
//! mosquitto with its default queue of 1,000 per session.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use mqbridge::broker::{BrokerOptions, EmbeddedBroker};
use support::*;

const COUNT: u32 = 3_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auto_pool_into_bifromq_quotas_grows_loses_nothing_and_is_never_discarded() {
    for dst_proto in [Proto::V311, Proto::V5] {
        let src = Mosquitto::start().await;
        let dst = EmbeddedBroker::start(BrokerOptions::bifromq("cloud")).unwrap();
        let mut cfg = RouteConfig::new(src.port(), Proto::V311, dst.port(), dst_proto);
        cfg.qos = 1;
        cfg.dst_extra = "max_publish_rate = 200\nbandwidth_limit = \"512KiB/s\"\n".into();
        cfg.route_extra = "pool_size = \"auto\"\npool_size_min = 1\npool_size_max = 8".into();
        let collector = Collector::start(dst.port(), Proto::V5, "in/#", 1).await;
        let bridge = start_ready(&cfg.toml().replace("pool_size = 1\n", ""), 1).await;

        // 600 msg/s for 5 s: three pairs' worth at 200 PUBLISH/s each.
        publish_numbered_paced(
            src.port(),
            Proto::V311,
            |i| format!("in/{}", i % 7),
            1,
            0,
            COUNT,
            "b",
            Duration::from_micros(1_667),
        )
        .await;
        let all = collector
            .wait_for_count(COUNT as usize, Duration::from_secs(60))
            .await;
        let ids: BTreeSet<u32> = collector
            .received()
            .iter()
            .filter_map(|r| r.payload_str().strip_prefix("b-")?.parse().ok())
            .collect();
        let log = bridge.log();
        assert!(
            all,
            "{dst_proto:?}: {} of {COUNT} arrived:\n{log}",
            ids.len()
        );
        assert_eq!(ids.len(), COUNT as usize, "{dst_proto:?}: every message");
        // Not one PUBLISH over BifroMQ's count per second of its clock, on any connection.
        for client in dst.stats().client_ids() {
            let over = dst.stats().client(&client).unwrap().over_rate;
            assert_eq!(over, 0, "{dst_proto:?}: {client} went over 200 PUBLISH/s");
        }
        let grew: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("pool resized: pairs held back by the target's"))
            .collect();
        assert!(
            grew.iter().any(|l| l.contains("pairs=4 was=2")),
            "{dst_proto:?}: the pool did not double to the load:\n{log}"
        );
        drop(bridge);
    }
}

/// An operator who did not tell the bridge the target's quota: BifroMQ (3.x) drops what is over
/// 200 PUBLISH/s in a second without an ack and acknowledges the next second's publishes. The
/// pair sees an ack for a later publish and none for the earlier one, takes it for dropped after
/// `SKIPPED_ACK_GRACE` (10 s), says what to set, and sends it again on a new connection:
/// every message arrives. Before, the pair and the source held the dropped ones for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_dropping_publishes_without_an_ack_gets_them_again() {
    // mosquitto's window towards the bridge at 1,000 (its default is 20): with 20, the dropped
    // ones fill it, no later publish reaches the target, and only the 60 s silence rule (the
    // machine's unit test) notices.
    let src = Mosquitto::start_with(MosquittoOpts {
        max_inflight_messages: Some(1000),
        ..Default::default()
    })
    .await;
    let dst = EmbeddedBroker::start(BrokerOptions::bifromq("cloud")).unwrap();
    let mut cfg = RouteConfig::new(src.port(), Proto::V311, dst.port(), Proto::V311);
    cfg.qos = 1;
    let collector = Collector::start(dst.port(), Proto::V5, "in/#", 1).await;
    let bridge = start_ready(&cfg.toml(), 1).await;
    // 300 msg/s for 2 s: about 100 a second over the quota.
    let count = 600;
    publish_numbered_paced(
        src.port(),
        Proto::V311,
        |i| format!("in/{}", i % 3),
        1,
        0,
        count,
        "s",
        Duration::from_micros(3_333),
    )
    .await;
    let all = collector
        .wait_for_count(count as usize, Duration::from_secs(60))
        .await;
    let ids: BTreeSet<u32> = collector
        .received()
        .iter()
        .filter_map(|r| r.payload_str().strip_prefix("s-")?.parse().ok())
        .collect();
    let log = bridge.log();
    let over: u64 = dst
        .stats()
        .client_ids()
        .iter()
        .filter_map(|c| dst.stats().client(c))
        .map(|c| c.over_rate)
        .sum();
    assert!(over > 0, "the target dropped nothing: no test\n{log}");
    assert!(
        all,
        "{} of {count} arrived ({over} dropped by the target):\n{log}",
        ids.len()
    );
    assert_eq!(ids.len(), count as usize);
    assert!(
        log.contains("it dropped it without a word") && log.contains("max_publish_rate"),
        "{log}"
    );
}
