//! Protocol fidelity against mosquitto (issue #3): all nine version pairs at every QoS, v5
//! properties end to end, retained messages, the target's limits mirrored, undeliverable
//! messages dead-lettered.

mod support;

use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use support::*;

const VERSIONS: [(&str, Proto); 3] = [
    ("3.1", Proto::V311),
    ("3.1.1", Proto::V311),
    ("5", Proto::V5),
];

/// 100 messages at each of QoS 0, 1 and 2 from a `src` broker spoken to in `src_v` to a `dst`
/// broker spoken to in `dst_v`: none lost, each with the QoS it was published with.
async fn nine_combinations_for(src_v: &'static str, dst_v: &'static str) {
    let client = |v: &str| VERSIONS.iter().find(|(n, _)| *n == v).unwrap().1;
    let src = Mosquitto::start().await;
    let dst = Mosquitto::start().await;
    let mut cfg = RouteConfig::new(src.port(), client(src_v), dst.port(), client(dst_v));
    cfg.src_version = Some(src_v);
    cfg.dst_version = Some(dst_v);
    let collector = Collector::start(dst.port(), Proto::V5, "in/#", 2).await;
    let mut bridge = start_ready(&cfg.toml(), 1).await;
    for qos in 0..=2u8 {
        let prefix = format!("q{qos}");
        if qos == 0 {
            publish_numbered_paced(
                src.port(),
                client(src_v),
                |i| format!("in/q0/{i}"),
                0,
                0,
                100,
                &prefix,
                Duration::from_micros(300),
            )
            .await;
        } else {
            publish_numbered(
                src.port(),
                client(src_v),
                move |i| format!("in/q{qos}/{i}"),
                qos,
                0,
                100,
                &prefix,
            )
            .await;
        }
    }
    assert!(
        collector.wait_for_count(300, Duration::from_secs(20)).await,
        "{src_v} -> {dst_v}: {} of 300\n{}",
        collector.count(),
        bridge.log()
    );
    collector
        .settle(Duration::from_millis(200), Duration::from_secs(2))
        .await;
    let rx = collector.received();
    for qos in 0..=2u8 {
        let prefix = format!("q{qos}");
        let mine: Vec<_> = rx
            .iter()
            .filter(|r| r.topic.starts_with(&format!("in/q{qos}/")))
            .cloned()
            .collect();
        assert_exactly_once(&mine, &prefix, 0..100);
        assert!(
            mine.iter().all(|r| r.qos == qos),
            "{src_v} -> {dst_v}: QoS {qos} kept"
        );
    }
    if src_v == "3.1" || dst_v == "3.1" {
        let side = if src_v == "3.1" { &src } else { &dst };
        assert!(
            side.log().contains("(p1,"),
            "mosquitto saw an MQTT 3.1 client:\n{}",
            side.log()
        );
    }
    assert!(
        bridge
            .stop(Duration::from_secs(10))
            .await
            .is_some_and(|s| s.success())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v31_to_v31() {
    nine_combinations_for("3.1", "3.1").await;
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v31_to_v311() {
    nine_combinations_for("3.1", "3.1.1").await;
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v31_to_v5() {
    nine_combinations_for("3.1", "5").await;
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_to_v31() {
    nine_combinations_for("3.1.1", "3.1").await;
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_to_v311() {
    nine_combinations_for("3.1.1", "3.1.1").await;
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_to_v5() {
    nine_combinations_for("3.1.1", "5").await;
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_to_v31() {
    nine_combinations_for("5", "3.1").await;
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_to_v311() {
    nine_combinations_for("5", "3.1.1").await;
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_to_v5() {
    nine_combinations_for("5", "5").await;
}

/// 5→5 keeps user properties in order (duplicates too), content type, correlation data, payload
/// format and the response topic (rewritten by the route's rule); Message Expiry arrives no
/// larger than sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_properties_cross_intact() {
    let src = Mosquitto::start().await;
    let dst = Mosquitto::start().await;
    let mut cfg = RouteConfig::new(src.port(), Proto::V5, dst.port(), Proto::V5);
    cfg.topics = r#"["dev/#"]"#;
    cfg.tail = "[[routes.rewrite]]\nmatch = \"dev/#\"\nto = \"cloud/dev/{1}\"\n".into();
    let collector = Collector::start(dst.port(), Proto::V5, "#", 1).await;
    let mut bridge = start_ready(&cfg.toml(), 1).await;

    let mut p = Publisher::connect(src.port(), Proto::V5).await;
    let props = PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(3600),
        content_type: Some("application/json".into()),
        response_topic: Some("dev/42/reply".into()),
        correlation_data: Some(Bytes::from_static(b"\x00corr\xff")),
        user_properties: vec![
            ("b".into(), "2".into()),
            ("a".into(), "1".into()),
            ("b".into(), "3".into()),
        ],
        ..Default::default()
    };
    p.publish_v5("dev/42/state", 1, false, "{\"on\":true}", props)
        .await;
    assert!(p.wait_acked(Duration::from_secs(5)).await);
    assert!(
        collector.wait_for_count(1, Duration::from_secs(10)).await,
        "{}",
        bridge.log()
    );
    let r = &collector.received()[0];
    assert_eq!(r.topic, "cloud/dev/42/state");
    type Props = Vec<(String, String)>;
    let (markers, user): (Props, Props) = r
        .user_properties
        .iter()
        .cloned()
        .partition(|(k, _)| k.starts_with("mqbridge-"));
    let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    assert_eq!(user, pairs(&[("b", "2"), ("a", "1"), ("b", "3")]));
    // brokers.src.id, by default a hash of host:port: no internal address in the message.
    let from = mqbridge::config::default_broker_id("127.0.0.1", src.port());
    assert_eq!(
        markers,
        pairs(&[("mqbridge-via", "test"), ("mqbridge-from", &from)]),
        "loop markers come after the publisher's own user properties"
    );
    let got = r.properties.as_ref().expect("v5 properties");
    assert_eq!(got.payload_format_indicator, Some(1));
    assert_eq!(got.content_type.as_deref(), Some("application/json"));
    assert_eq!(
        got.response_topic.as_deref(),
        Some("cloud/dev/42/reply"),
        "response topic rewritten"
    );
    assert_eq!(got.correlation_data.as_deref(), Some(&b"\x00corr\xff"[..]));
    let expiry = got.message_expiry_interval.expect("expiry kept");
    assert!(
        (3590..=3600).contains(&expiry),
        "expiry {expiry} reduced, not reset"
    );
    assert!(got.topic_alias.is_none() && got.subscription_identifiers.len() <= 1);
    p.disconnect().await;
    assert!(
        bridge
            .stop(Duration::from_secs(10))
            .await
            .is_some_and(|s| s.success())
    );
}

/// A retained message published before the bridge starts, and one published while it runs,
/// are retained on the target (5→5 with a plain subscription: brokers send no retained
/// messages to shared subscriptions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_stay_retained_v5() {
    let src = Mosquitto::start().await;
    let dst = Mosquitto::start().await;
    publish_one(src.port(), Proto::V5, "in/before", 1, true, "old").await;
    let mut cfg = RouteConfig::new(src.port(), Proto::V5, dst.port(), Proto::V5);
    cfg.route_extra = "share = \"none\"".into();
    let mut bridge = start_ready(&cfg.toml(), 1).await;
    publish_one(src.port(), Proto::V5, "in/during", 1, true, "new").await;
    publish_one(src.port(), Proto::V5, "in/live", 1, false, "not retained").await;
    // A subscriber that comes later sees both retained messages, and not the live one.
    let ok = wait_until_async(Duration::from_secs(10), || async {
        let late = Collector::start(dst.port(), Proto::V5, "in/#", 1).await;
        let ok = late.wait_for_count(2, Duration::from_millis(300)).await;
        late.disconnect().await;
        ok
    })
    .await;
    assert!(ok, "{}", bridge.log());
    let late = Collector::start(dst.port(), Proto::V5, "in/#", 1).await;
    late.settle(Duration::from_millis(300), Duration::from_secs(2))
        .await;
    let mut got: Vec<_> = late
        .received()
        .iter()
        .map(|r| (r.topic.clone(), r.payload_str(), r.retain))
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("in/before".into(), "old".into(), true),
            ("in/during".into(), "new".into(), true)
        ]
    );
    assert!(
        bridge
            .stop(Duration::from_secs(10))
            .await
            .is_some_and(|s| s.success())
    );
}

/// The same on 3.1.1, where only retained messages sent at subscribe time carry the flag: the
/// one published before the bridge starts is retained on the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_at_subscribe_stays_retained_v311() {
    let src = Mosquitto::start().await;
    let dst = Mosquitto::start().await;
    publish_one(src.port(), Proto::V311, "in/before", 1, true, "old").await;
    let mut cfg = RouteConfig::new(src.port(), Proto::V311, dst.port(), Proto::V311);
    cfg.route_extra = "share = \"none\"".into();
    let mut bridge = start_ready(&cfg.toml(), 1).await;
    let ok = wait_until_async(Duration::from_secs(10), || async {
        let late = Collector::start(dst.port(), Proto::V311, "in/#", 1).await;
        let ok = late
            .wait_for(Duration::from_millis(300), |rx| {
                rx.iter().any(|r| r.topic == "in/before" && r.retain)
            })
            .await;
        late.disconnect().await;
        ok
    })
    .await;
    assert!(ok, "{}", bridge.log());
    assert!(
        bridge
            .stop(Duration::from_secs(10))
            .await
            .is_some_and(|s| s.success())
    );
}

/// `retain = "clear"` forwards every message unretained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_clear_forwards_unretained() {
    let src = Mosquitto::start().await;
    let dst = Mosquitto::start().await;
    let mut cfg = RouteConfig::new(src.port(), Proto::V5, dst.port(), Proto::V5);
    cfg.route_extra = "retain = \"clear\"".into();
    let collector = Collector::start(dst.port(), Proto::V5, "in/#", 1).await;
    let mut bridge = start_ready(&cfg.toml(), 1).await;
    publish_one(src.port(), Proto::V5, "in/x", 1, true, "r").await;
    assert!(collector.wait_for_count(1, Duration::from_secs(10)).await);
    assert!(!collector.received()[0].retain);
    let late = Collector::start(dst.port(), Proto::V5, "in/#", 1).await;
    assert_eq!(
        late.settle(Duration::from_millis(300), Duration::from_secs(1))
            .await,
        0,
        "nothing retained on the target"
    );
    assert!(
        bridge
            .stop(Duration::from_secs(10))
            .await
            .is_some_and(|s| s.success())
    );
}

/// The target's Receive Maximum becomes the pair's window (and what the v5 source is told), and
/// a message over the target's Maximum Packet Size goes to the dead letter topic while the pair
/// keeps forwarding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_limits_are_mirrored_and_oversize_is_dead_lettered() {
    let src = Mosquitto::start().await;
    let dst = Mosquitto::start_with(MosquittoOpts {
        max_inflight_messages: Some(5),
        extra: "max_packet_size 1024\n".into(),
        ..Default::default()
    })
    .await;
    let mut cfg = RouteConfig::new(src.port(), Proto::V5, dst.port(), Proto::V5);
    cfg.qos = 1;
    cfg.route_extra = "dead_letter = \"dlq/r\"".into();
    let collector = Collector::start(dst.port(), Proto::V5, "in/#", 1).await;
    let dlq = Collector::start(src.port(), Proto::V5, "dlq/#", 1).await;
    let mut bridge = start_ready(&cfg.toml(), 1).await;
    assert!(bridge.log().contains("window=5"), "{}", bridge.log());

    let mut p = Publisher::connect(src.port(), Proto::V5).await;
    p.publish("in/small", 1, false, "a").await;
    p.publish("in/big", 1, false, vec![b'x'; 4096]).await;
    p.publish("in/small", 1, false, "b").await;
    assert!(p.wait_acked(Duration::from_secs(10)).await);
    assert!(
        collector.wait_for_count(2, Duration::from_secs(10)).await,
        "{}",
        bridge.log()
    );
    assert!(
        dlq.wait_for_count(1, Duration::from_secs(10)).await,
        "{}",
        bridge.log()
    );
    let dead = &dlq.received()[0];
    assert_eq!(dead.payload.len(), 4096);
    assert_eq!(
        dead.user_property("mqbridge-original-topic"),
        vec!["in/big"]
    );
    assert_eq!(dead.user_property("mqbridge-reason"), vec!["too_large"]);
    let small: Vec<_> = collector
        .received()
        .iter()
        .map(|r| r.payload_str())
        .collect();
    assert_eq!(small, vec!["a", "b"]);
    p.disconnect().await;
    assert!(
        bridge
            .stop(Duration::from_secs(10))
            .await
            .is_some_and(|s| s.success())
    );
    assert!(bridge.log().contains("too_large"));
}

/// A target whose ACL lets anyone publish under `in/` only: anything else gets 0x87 (v5).
async fn acl_target() -> Mosquitto {
    let acl = write_temp("acl", "topic readwrite in/#\npattern read #\n");
    Mosquitto::start_with(MosquittoOpts {
        extra: format!("acl_file {}\n", acl.display()),
        ..Default::default()
    })
    .await
}

/// A target that refuses a publish (mosquitto's ACL answers a v5 client with 0x87): the message
/// is dead-lettered once, not retried, and the next messages still flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_publish_is_dead_lettered_not_retried() {
    let src = Mosquitto::start().await;
    let dst = acl_target().await;
    let mut cfg = RouteConfig::new(src.port(), Proto::V5, dst.port(), Proto::V5);
    cfg.qos = 1;
    cfg.topics = r#"["in/#", "secret/#"]"#;
    cfg.route_extra = "dead_letter = \"dlq/r\"".into();
    let collector = Collector::start(dst.port(), Proto::V5, "#", 1).await;
    let dlq = Collector::start(src.port(), Proto::V5, "dlq/#", 1).await;
    let mut bridge = start_ready(&cfg.toml(), 1).await;

    let mut p = Publisher::connect(src.port(), Proto::V5).await;
    p.publish("in/1", 1, false, "one").await;
    p.publish("secret/x", 1, false, "denied").await;
    p.publish("in/2", 1, false, "two").await;
    assert!(p.wait_acked(Duration::from_secs(10)).await);
    assert!(
        collector.wait_for_count(2, Duration::from_secs(10)).await,
        "{}",
        bridge.log()
    );
    assert!(
        dlq.wait_for_count(1, Duration::from_secs(10)).await,
        "{}",
        bridge.log()
    );
    dlq.settle(Duration::from_millis(500), Duration::from_secs(2))
        .await;
    assert_eq!(dlq.count(), 1, "dead-lettered once, no retry storm");
    assert_eq!(
        dlq.received()[0].user_property("mqbridge-reason"),
        vec!["refused"]
    );
    p.disconnect().await;
    assert!(
        bridge
            .stop(Duration::from_secs(10))
            .await
            .is_some_and(|s| s.success())
    );
}

/// On a 3.1.1 source, live messages carry no retain flag (3.x has no Retain As Published);
/// with `try_private = true` mosquitto treats the connection as a bridge and keeps the flag, so
/// a retained message published while the bridge runs is retained on the target too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_while_running_stays_retained_v311_with_try_private() {
    let src = Mosquitto::start().await;
    let dst = Mosquitto::start().await;
    let mut cfg = RouteConfig::new(src.port(), Proto::V311, dst.port(), Proto::V311);
    cfg.src_extra = "try_private = true\n".into();
    let mut bridge = start_ready(&cfg.toml(), 1).await;
    assert!(src.log().contains("New bridge connected"), "{}", src.log());
    publish_one(src.port(), Proto::V311, "in/during", 1, true, "new").await;
    publish_one(src.port(), Proto::V311, "in/live", 1, false, "plain").await;
    let dst_port = dst.port();
    let ok = wait_until_async(Duration::from_secs(10), || async move {
        let late = Collector::start(dst_port, Proto::V311, "in/#", 1).await;
        let ok = late
            .wait_for(Duration::from_millis(300), |rx| {
                rx.iter().any(|r| r.topic == "in/during" && r.retain)
            })
            .await;
        late.disconnect().await;
        ok
    })
    .await;
    assert!(ok, "{}", bridge.log());
    let late = Collector::start(dst.port(), Proto::V311, "in/#", 1).await;
    late.settle(Duration::from_millis(300), Duration::from_secs(2))
        .await;
    let topics: Vec<_> = late.received().iter().map(|r| r.topic.clone()).collect();
    assert_eq!(
        topics,
        ["in/during"],
        "the live message was not made retained"
    );
    assert!(
        bridge
            .stop(Duration::from_secs(10))
            .await
            .is_some_and(|s| s.success())
    );
}

/// Issue #16: drop warnings are rate-limited (one line a second), and the next line says how
/// many were not logged one by one; before, they just vanished from the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_drop_lines_say_how_many_were_suppressed() {
    let src = Mosquitto::start().await;
    let dst = acl_target().await;
    let mut cfg = RouteConfig::new(src.port(), Proto::V5, dst.port(), Proto::V5);
    cfg.qos = 1;
    cfg.topics = r#"["secret/#"]"#;
    let bridge = start_ready(&cfg.toml(), 1).await;
    publish_numbered(src.port(), Proto::V5, |_| "secret/x".into(), 1, 0, 10, "d").await;
    assert!(
        wait_until(Duration::from_secs(10), || bridge
            .log()
            .contains("not authorized (0x87)"))
        .await,
        "{}",
        bridge.log()
    );
    // The rate limit is a wall-clock second: the next drop after it is logged with the count.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    publish_one(src.port(), Proto::V5, "secret/y", 1, false, "late").await;
    assert!(
        bridge
            .wait_log("(9 more since the last such line", Duration::from_secs(10))
            .await,
        "{}",
        bridge.log()
    );
}

/// Issue #14, hole 16: a SUBACK granting less than the route's `qos` was taken silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suback_granting_less_than_the_routes_qos_is_a_warning_and_a_metric() {
    let src = Mosquitto::start_with(MosquittoOpts {
        extra: "max_qos 1\n".into(),
        ..Default::default()
    })
    .await;
    let dst = Mosquitto::start().await;
    let admin = format!("127.0.0.1:{}", free_port());
    let mut cfg = RouteConfig::new(src.port(), Proto::V311, dst.port(), Proto::V311);
    cfg.qos = 2;
    cfg.tail = format!("\n[admin]\nlisten = \"{admin}\"\n");
    let bridge = start_ready(&cfg.toml(), 1).await;
    assert!(
        bridge
            .wait_log(
                "granted QoS 1 where routes.r.qos asks for 2",
                Duration::from_secs(10)
            )
            .await,
        "{}",
        bridge.log()
    );
    let (_, body) = http_get(&admin, "/metrics").await.expect("metrics");
    assert_eq!(
        metric(
            &body,
            "mqbridge_subscriptions_downgraded_total{route=\"r\"}"
        ),
        1.0,
        "{body}"
    );
}

/// Issue #14, hole 16: a source that takes the connection but never answers SUBSCRIBE left the
/// pair waiting for ever; it is timed out like a CONNACK and the connection renewed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suback_that_never_comes_is_timed_out() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let silent = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await; // CONNECT
                let _ = s.write_all(&[0x20, 0x02, 0x00, 0x00]).await; // CONNACK, accepted
                // Alive (PINGRESP for PINGREQ), but never a SUBACK.
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    for _ in buf[..n].windows(2).filter(|w| w == &[0xC0, 0x00]) {
                        let _ = s.write_all(&[0xD0, 0x00]).await;
                    }
                }
            });
        }
    });
    let dst = Mosquitto::start().await;
    let mut cfg = RouteConfig::new(port, Proto::V311, dst.port(), Proto::V311);
    cfg.src_extra = "share_probe = false".into();
    let bridge = Bridge::start(&cfg.toml());
    assert!(
        bridge
            .wait_log("no SUBACK within 10s", Duration::from_secs(20))
            .await,
        "{}",
        bridge.log()
    );
    silent.abort();
}

/// Issue #14, hole 8: a PUBLISH from a 3.1.1 source larger than `max_packet_size` (3.x cannot
/// announce a limit). Before, the decoder refused the frame, the source connection was renewed,
/// the broker redelivered the same message, and the pair looped with nothing behind it moving.
/// Now the frame is skipped unread as it streams in (never buffered whole), acknowledged,
/// counted as too_large and dead-lettered without its payload; the next messages flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_publish_from_a_v311_source_is_skipped_counted_and_dead_lettered() {
    let src = Mosquitto::start().await;
    let dst = Mosquitto::start().await;
    let mut cfg = RouteConfig::new(src.port(), Proto::V311, dst.port(), Proto::V5);
    cfg.qos = 1;
    cfg.src_extra = "max_packet_size = \"64KiB\"\n".into();
    cfg.route_extra = "dead_letter = \"dlq/r\"".into();
    let collector = Collector::start(dst.port(), Proto::V5, "in/#", 1).await;
    let dlq = Collector::start(src.port(), Proto::V5, "dlq/#", 1).await;
    let mut bridge = start_ready(&cfg.toml(), 1).await;

    let mut p = Publisher::connect(src.port(), Proto::V311).await;
    p.publish("in/small", 1, false, "a").await;
    p.publish("in/big", 1, false, vec![b'x'; 1024 * 1024]).await;
    p.publish("in/small", 1, false, "b").await;
    assert!(p.wait_acked(Duration::from_secs(10)).await);
    assert!(
        collector.wait_for_count(2, Duration::from_secs(10)).await,
        "{} of 2 small messages arrived:\n{}",
        collector.count(),
        bridge.log()
    );
    assert!(
        dlq.wait_for_count(1, Duration::from_secs(10)).await,
        "{}",
        bridge.log()
    );
    // A 3.1.1 source carries no user properties: the log names the topic and the reason.
    let dead = &dlq.received()[0];
    assert!(dead.payload.is_empty(), "dead-lettered without its payload");
    let log = bridge.log();
    assert!(
        log.contains("topic=\"in/big\"") && log.contains("reason=\"too_large\""),
        "{log}"
    );
    let small: Vec<_> = collector
        .received()
        .iter()
        .map(|r| r.payload_str())
        .collect();
    assert_eq!(small, vec!["a", "b"]);
    assert!(
        bridge.log().contains("brokers.src.max_packet_size"),
        "{}",
        bridge.log()
    );
    assert!(
        !bridge.log().contains("connection lost"),
        "{}",
        bridge.log()
    );
    p.disconnect().await;
    bridge.stop_cleanly().await;
}
