//! The test harness itself, against a real mosquitto and no bridge: if these fail, every bridge
//! test's verdict is meaningless.

mod support;

use std::time::Duration;
use support::*;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_v311_sees_every_message_once_and_survives_a_broker_restart() {
    round_trip(Proto::V311).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_v5_sees_every_message_once_and_survives_a_broker_restart() {
    round_trip(Proto::V5).await;
}

async fn round_trip(proto: Proto) {
    let mut broker = Mosquitto::start().await;
    let collector = Collector::start(broker.port(), proto, "t/#", 1).await;

    publish_numbered(
        broker.port(),
        proto,
        |i| format!("t/q1/{}", i % 7),
        1,
        0,
        200,
        "q1",
    )
    .await;
    publish_numbered(
        broker.port(),
        proto,
        |i| format!("t/q2/{i}"),
        2,
        0,
        50,
        "q2",
    )
    .await;

    assert!(
        collector.wait_for_count(250, WAIT).await,
        "got {} of 250",
        collector.count()
    );
    assert_eq!(
        collector.settle(Duration::from_millis(200), WAIT).await,
        250
    );
    let received = collector.received();
    assert_exactly_once(&received, "q1", 0..200);
    assert_exactly_once(&received, "q2", 0..50);
    // Delivered at the subscription's QoS, never above it.
    assert!(received.iter().all(|r| r.qos == 1));
    assert!(received.iter().any(|r| r.topic == "t/q2/49"));

    broker.restart().await;
    assert!(!broker.log().is_empty());
    // The collector reconnects and subscribes again on its own.
    assert!(
        collector.wait_for_subacks(2, WAIT).await,
        "collector did not resubscribe"
    );
    publish_one(broker.port(), proto, "t/after", 1, false, "after-restart").await;
    assert!(
        collector
            .wait_for(WAIT, |r| r
                .iter()
                .any(|m| m.payload_str() == "after-restart"))
            .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_v5_keeps_properties_and_the_retain_flag() {
    let broker = Mosquitto::start().await;
    let collector = Collector::start(broker.port(), Proto::V5, "p/#", 2).await;
    let mut publisher = Publisher::connect(broker.port(), Proto::V5).await;
    let properties = rumqttc::v5::mqttbytes::v5::PublishProperties {
        user_properties: vec![("k".into(), "v".into())],
        ..Default::default()
    };
    publisher
        .publish_v5("p/props", 2, true, "with-props", properties)
        .await;
    assert!(publisher.wait_acked(WAIT).await);
    publisher.disconnect().await;

    assert!(collector.wait_for_count(1, WAIT).await);
    let message = &collector.received()[0];
    assert_eq!(message.user_property("k"), ["v"]);
    assert_eq!(message.qos, 2);
    assert!(
        message.retain,
        "Retain As Published is set by the collector"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_qos0_paced_publishing_arrives() {
    let broker = Mosquitto::start().await;
    let collector = Collector::start(broker.port(), Proto::V311, "z/#", 0).await;
    let pace = Duration::from_millis(1);
    publish_numbered_paced(
        broker.port(),
        Proto::V311,
        |_| "z/a".into(),
        0,
        10,
        100,
        "z",
        pace,
    )
    .await;
    assert!(collector.wait_for_count(100, WAIT).await);
    assert_exactly_once(&collector.received(), "z", 10..110);
    assert_eq!(
        ids_in_order(&collector.received(), "z"),
        (10..110).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_persistent_broker_keeps_its_state_across_stop_and_restart() {
    let mut broker = Mosquitto::start_with(MosquittoOpts {
        persistence: true,
        max_inflight_messages: Some(20),
        ..Default::default()
    })
    .await;
    publish_one(broker.port(), Proto::V311, "r/kept", 1, true, "retained").await;
    broker.stop().await;
    assert!(!broker.is_running());
    broker.restart().await;
    assert!(broker.is_running());

    let collector = Collector::start(broker.port(), Proto::V311, "r/#", 1).await;
    assert!(collector.wait_for_count(1, WAIT).await, "{}", broker.log());
    let message = &collector.received()[0];
    assert_eq!(message.payload_str(), "retained");
    assert!(message.retain);
}

#[test]
fn count_ids_reports_duplicates_missing_and_strangers() {
    let at = tokio::time::Instant::now();
    let message = |payload: &str| Received {
        topic: "t".into(),
        payload: bytes::Bytes::from(payload.to_string()),
        qos: 1,
        retain: false,
        dup: false,
        user_properties: Vec::new(),
        properties: None,
        at,
    };
    let received: Vec<Received> = ["a-0", "a-1", "a-1", "a-3", "a-9", "b-2", "a-x", "ab-2"]
        .into_iter()
        .map(message)
        .chain([Received {
            payload: padded_payload("a", 4, 100),
            ..message("")
        }])
        .collect();
    let count = count_ids(&received, "a", 0..5);
    assert_eq!(
        count,
        IdCount {
            unique: 4,
            duplicates: 1,
            missing: vec![2],
            unexpected: vec![9],
        }
    );
    assert!(!count.exactly_once());
    assert_eq!(parse_id(&padded_payload("a", 4, 100), "a"), Some(4));
    assert_eq!(padded_payload("a", 4, 100).len(), 100);
}

#[test]
fn free_ports_are_distinct() {
    let ports: std::collections::BTreeSet<u16> = (0..50).map(|_| free_port()).collect();
    assert_eq!(ports.len(), 50);
    let file = write_temp("x.toml", "a = 1\n");
    assert_eq!(std::fs::read_to_string(file).unwrap(), "a = 1\n");
}

/// The harness's broker keeps mosquitto's default queue for an offline persistent session:
/// 1,000 messages, the rest dropped. That is what a bridge meets in the field, so tests that
/// need more ask for it (`MosquittoOpts::deep_queue`, which keeps all of them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_broker_queues_1000_by_default_and_thousands_when_deep() {
    // Offline, mosquitto may hold up to its in-flight window (20) beside the queue.
    for (opts, kept) in [
        (MosquittoOpts::default(), 1000..=1020),
        (MosquittoOpts::deep_queue(), 5000..=5000),
    ] {
        let broker = Mosquitto::start_with(opts).await;
        for proto in Proto::ALL {
            let id = format!("offline-{}", proto.as_config());
            let filters = [("q/#", 2)];
            Collector::start_persistent(broker.port(), proto, &id, &filters)
                .await
                .disconnect()
                .await;
            let prefix = format!("off{}", proto.as_config());
            publish_numbered(broker.port(), proto, |_| "q/x".into(), 1, 0, 3000, &prefix).await;
            publish_numbered(
                broker.port(),
                proto,
                |_| "q/y".into(),
                2,
                3000,
                2000,
                &prefix,
            )
            .await;

            let back = Collector::start_persistent(broker.port(), proto, &id, &filters).await;
            assert!(
                back.wait_for_count(*kept.start(), WAIT).await,
                "{proto:?}: got {} of {kept:?}",
                back.count()
            );
            back.settle(Duration::from_millis(300), WAIT).await;
            assert!(
                kept.contains(&back.count()),
                "{proto:?}: kept {}",
                back.count()
            );
        }
    }
}
