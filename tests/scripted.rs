//! Behaviour only a scripted broker can provoke (issue #3): a target with a chosen Receive
//! Maximum and slow acks, and messages whose Message Expiry runs out while the bridge holds them.

mod support;

use std::time::Duration;

use mqbridge::broker::{BrokerOptions, EmbeddedBroker};
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use support::*;

/// The target advertises Receive Maximum 5 and delays every ack: the bridge's CONNECT to its v5
/// source advertises 5, and the source never has more than 5 messages unacknowledged out to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_receive_maximum_5_with_slow_acks_is_mirrored_to_the_source() {
    let source = EmbeddedBroker::start(BrokerOptions::named("source")).unwrap();
    let target = EmbeddedBroker::start(BrokerOptions::named("target")).unwrap();
    target.script().set_receive_maximum(Some(5));
    target
        .script()
        .delay_acks("in/#", Duration::from_millis(20));
    let out = Collector::start(target.port(), Proto::V5, "in/#", 1).await;
    let mut cfg = RouteConfig::new(source.port(), Proto::V5, target.port(), Proto::V5);
    cfg.qos = 1;
    let mut bridge = start_ready(&cfg.toml(), 1).await;
    let (client, _) = source
        .stats()
        .subscriptions()
        .into_iter()
        .find(|(_, f)| f.starts_with("$share/"))
        .expect("the bridge subscribed on the source");
    assert_eq!(
        source
            .stats()
            .connect_info(&client)
            .unwrap()
            .receive_maximum,
        Some(5)
    );

    publish_numbered(
        source.port(),
        Proto::V5,
        |i| format!("in/{}", i % 3),
        1,
        0,
        200,
        "rm",
    )
    .await;
    assert!(
        out.wait_for_count(200, Duration::from_secs(30)).await,
        "{}",
        out.count()
    );
    assert_exactly_once(&out.received(), "rm", 0..200);
    let most = source.stats().max_unacked(&client);
    assert!(
        most <= 5,
        "the source had {most} unacknowledged out to the pair"
    );
    assert!(
        most >= 3,
        "the window was used ({most}), so the bound was exercised"
    );
    assert!(
        bridge
            .stop(Duration::from_secs(10))
            .await
            .is_some_and(|s| s.success())
    );
}

/// Messages held by the bridge across a target outage: one whose Message Expiry ran out is not
/// forwarded and is counted; one with time left arrives with its expiry reduced by the time held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_expiry_counts_the_time_held_and_expired_messages_are_dropped() {
    let source = Mosquitto::start().await;
    let first = EmbeddedBroker::start(BrokerOptions::named("target")).unwrap();
    let addr = first.addr();
    first.script().withhold_acks("in/#"); // the bridge holds both messages, unacknowledged
    let mut cfg = RouteConfig::new(source.port(), Proto::V5, first.port(), Proto::V5);
    cfg.qos = 1;
    let mut bridge = start_ready(&cfg.toml(), 1).await;

    let mut p = Publisher::connect(source.port(), Proto::V5).await;
    for (payload, expiry) in [("short", 2), ("long", 100)] {
        let props = PublishProperties {
            message_expiry_interval: Some(expiry),
            ..Default::default()
        };
        p.publish_v5("in/x", 1, false, payload, props).await;
    }
    let got_both = wait_until(Duration::from_secs(10), || {
        first.stats().total_publishes_received() >= 2
    })
    .await;
    assert!(got_both, "{}", bridge.log());
    first.stop();
    tokio::time::sleep(Duration::from_secs(3)).await; // the outage: longer than "short" may live

    let second = EmbeddedBroker::start(BrokerOptions {
        addr,
        ..BrokerOptions::named("target")
    })
    .unwrap();
    let out = Collector::start(second.port(), Proto::V5, "in/#", 1).await;
    assert!(
        out.wait_for_count(1, Duration::from_secs(30)).await,
        "{}",
        bridge.log()
    );
    out.settle(Duration::from_millis(500), Duration::from_secs(2))
        .await;
    let rx = out.received();
    assert_eq!(rx.len(), 1, "only the message with time left");
    assert_eq!(rx[0].payload_str(), "long");
    let left = rx[0]
        .properties
        .as_ref()
        .and_then(|p| p.message_expiry_interval)
        .unwrap();
    assert!(left <= 97, "expiry {left} reduced by the ≥ 3 s held");
    assert!(
        p.wait_acked(Duration::from_secs(10)).await,
        "both acknowledged to the source"
    );
    p.disconnect().await;
    assert!(
        bridge
            .stop(Duration::from_secs(10))
            .await
            .is_some_and(|s| s.success())
    );
    assert!(
        bridge.log().contains("reason=\"expired\"") || bridge.log().contains("reason=expired"),
        "{}",
        bridge.log()
    );
}

/// Issue #14, hole 5: a target that answers 0x97 (quota exceeded) means "not now". Before the
/// fix every such message was taken for refused: logged, counted as dropped, acknowledged to the
/// source, lost. Now each is published again after a pause until the target takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_exceeded_is_retried_until_the_target_takes_every_message() {
    let src = Mosquitto::start().await;
    let target = EmbeddedBroker::start(BrokerOptions::named("target")).unwrap();
    target.script().ack_with_reason("in/#", 0x97);
    let out = Collector::start(target.port(), Proto::V5, "in/#", 1).await;
    let mut cfg = RouteConfig::new(src.port(), Proto::V5, target.port(), Proto::V5);
    cfg.qos = 1;
    let bridge = start_ready(&cfg.toml(), 1).await;
    publish_numbered(src.port(), Proto::V5, |i| format!("in/{i}"), 1, 0, 50, "qx").await;
    assert!(
        bridge
            .wait_log(
                "quota exceeded (0x97): publishing again",
                Duration::from_secs(10)
            )
            .await,
        "{}",
        bridge.log()
    );
    assert_eq!(out.count(), 0, "the target took nothing yet");
    target.script().reset();
    assert!(
        out.wait_for_count(50, Duration::from_secs(20)).await,
        "{} of 50 arrived:\n{}",
        out.count(),
        bridge.log()
    );
    assert_at_least_once(&out.received(), "qx", 0..50);
    let log = bridge.log();
    assert!(
        !log.contains("undeliverable"),
        "nothing was dropped:\n{log}"
    );
}

/// Issue #14, hole 9: when the target came back with another window, the source connection was
/// dropped at once to mirror it, with whatever it had delivered and not yet been read, and acks
/// not yet written. With a clean source session (nothing redelivers) those messages were lost.
/// Now a clean session keeps its old window (bounded) instead; a persistent one is renewed with
/// a DISCONNECT once everything was taken in and acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_target_window_loses_nothing_from_a_clean_source_session() {
    const N: u32 = 3000;
    let src = Mosquitto::start().await;
    let target = EmbeddedBroker::start(BrokerOptions::named("target")).unwrap();
    target.script().set_receive_maximum(Some(10));
    let out = Collector::start(target.port(), Proto::V5, "in/#", 1).await;
    let mut cfg = RouteConfig::new(src.port(), Proto::V5, target.port(), Proto::V5);
    cfg.qos = 1;
    let bridge = Bridge::start_with_env(
        &cfg.toml(),
        &[("MQBRIDGE__BROKERS__SRC__SESSION_EXPIRY", "0s")],
    );
    wait_ready(&bridge, 1, 1).await;
    let port = src.port();
    let publishing = tokio::spawn(async move {
        publish_numbered_paced(
            port,
            Proto::V5,
            |i| format!("in/{}", i % 5),
            1,
            0,
            N,
            "w",
            Duration::from_micros(500),
        )
        .await
    });
    assert!(out.wait_for_count(500, Duration::from_secs(20)).await);
    target.script().set_receive_maximum(Some(20));
    target.script().disconnect_after_publishes(1);
    publishing.await.unwrap();
    let all = out
        .wait_for(Duration::from_secs(30), |r| {
            count_ids(r, "w", 0..N).missing.is_empty()
        })
        .await;
    let count = count_ids(&out.received(), "w", 0..N);
    assert!(all, "{count}\n{}", bridge.log());
    assert!(
        bridge.log().contains("the target's window changed"),
        "the window did change:\n{}",
        bridge.log()
    );
}

/// Issue #14, hole 15: dead letters are our own QoS 1 PUBLISHes on the source, so they must keep
/// to the source's Receive Maximum (here 2). The target (mosquitto, `max_packet_size 1024`)
/// cannot take 4 KiB messages, so every one is dead-lettered on the source, and the source holds
/// back its PUBACKs for dead letters: at most 2 may be out. Before, all 40 went at once. Once the
/// source acknowledges again, every dead letter arrives, and the source never cut the bridge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_keep_to_the_sources_receive_maximum() {
    const N: usize = 40;
    let source = EmbeddedBroker::start(BrokerOptions::named("source")).unwrap();
    let dst = Mosquitto::start_with(MosquittoOpts {
        extra: "max_packet_size 1024\n".into(),
        ..Default::default()
    })
    .await;
    let dlq = Collector::start(source.port(), Proto::V5, "dlq/#", 1).await;
    let out = Collector::start(dst.port(), Proto::V5, "in/#", 1).await;
    let mut p = Publisher::connect(source.port(), Proto::V5).await;
    // Only the bridge's connections (made from here on) are told 2.
    source.script().set_receive_maximum(Some(2));
    source.script().withhold_acks("dlq/#");
    let mut cfg = RouteConfig::new(source.port(), Proto::V5, dst.port(), Proto::V5);
    cfg.qos = 1;
    cfg.route_extra = "dead_letter = \"dlq/r\"".into();
    let mut bridge = start_ready(&cfg.toml(), 1).await;
    for i in 0..N {
        p.publish(&format!("in/{i}"), 1, false, vec![b'x'; 4096])
            .await;
    }
    p.publish("in/small", 1, false, "after").await;
    assert!(p.wait_acked(Duration::from_secs(10)).await);
    assert!(
        dlq.wait_for_count(2, Duration::from_secs(10)).await,
        "{}",
        bridge.log()
    );
    dlq.settle(Duration::from_millis(500), Duration::from_secs(3))
        .await;
    assert_eq!(
        dlq.count(),
        2,
        "dead letters out while the source acknowledges none (its Receive Maximum is 2)"
    );
    source.script().release_acks();
    assert!(
        dlq.wait_for_count(N, Duration::from_secs(20)).await,
        "{} of {N} dead letters:\n{}",
        dlq.count(),
        bridge.log()
    );
    assert!(
        out.wait_for_count(1, Duration::from_secs(10)).await,
        "{}",
        bridge.log()
    );
    let log = bridge.log();
    let cut = log
        .lines()
        .any(|l| l.contains("connection lost") && l.contains("side=\"source\""));
    assert!(!cut, "the source cut the bridge:\n{log}");
    assert!(
        bridge
            .stop(Duration::from_secs(10))
            .await
            .is_some_and(|s| s.success())
    );
}

/// Issue #14, hole 14: acks to the source go out in the order its PUBLISHes arrived
/// (MQTT-4.6.0-2/3), refusals included. The target acks `in/slow` after 300 ms and cannot take
/// the 4 KiB `in/big` (Maximum Packet Size 1024), which the bridge refuses at once. The source
/// (embedded, counting acks that overtake one for an earlier unacknowledged PUBLISH) saw each
/// refusal's ack overtake the slow message's before the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_reach_the_source_in_the_order_of_its_publishes() {
    let source = EmbeddedBroker::start(BrokerOptions::named("source")).unwrap();
    let target = EmbeddedBroker::start(BrokerOptions {
        maximum_packet_size: Some(1024),
        ..BrokerOptions::named("target")
    })
    .unwrap();
    target
        .script()
        .delay_acks("in/slow", Duration::from_millis(300));
    let out = Collector::start(target.port(), Proto::V5, "in/#", 1).await;
    let mut cfg = RouteConfig::new(source.port(), Proto::V5, target.port(), Proto::V5);
    cfg.qos = 1;
    let mut bridge = start_ready(&cfg.toml(), 1).await;
    let mut p = Publisher::connect(source.port(), Proto::V5).await;
    for round in 0..5 {
        p.publish("in/slow", 1, false, format!("s{round}")).await;
        p.publish("in/big", 1, false, vec![b'x'; 4096]).await;
    }
    assert!(p.wait_acked(Duration::from_secs(10)).await);
    assert!(
        out.wait_for_count(5, Duration::from_secs(20)).await,
        "{} of 5:\n{}",
        out.count(),
        bridge.log()
    );
    let (client, _) = source
        .stats()
        .subscriptions()
        .into_iter()
        .find(|(_, f)| f.starts_with("$share/"))
        .expect("the bridge's subscription");
    let stats = source.stats().client(&client).expect("the bridge's client");
    assert_eq!(
        stats.acks_out_of_order, 0,
        "acks that overtook an earlier PUBLISH's"
    );
    assert!(bridge.log().contains("too_large"), "{}", bridge.log());
    assert!(
        bridge
            .stop(Duration::from_secs(10))
            .await
            .is_some_and(|s| s.success())
    );
}

/// The bridge's client id on `target` (the one connection that published to it).
fn publisher_on(target: &EmbeddedBroker) -> String {
    target
        .stats()
        .client_ids()
        .into_iter()
        .find(|c| target.stats().publishes_received(c) > 0)
        .expect("the bridge published to the target")
}

/// Issue #14, hole 7: a QoS 2 PUBLISH the target already took stays the target's open exchange
/// across a reconnect with its session (MQTT-4.4.0-1), however long it was held: the bridge must
/// resend it (DUP) and release it, never drop it as expired. The target takes the message (its
/// subscriber gets it) and holds back the PUBREC past the message's 1 s expiry; then the
/// connection breaks and the bridge comes back to the same session. Before the fix the resend
/// was dropped as expired: counted as lost though delivered, and the target's exchange was left
/// open for ever (its packet id unusable, a later message reusing it swallowed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos2_exchange_the_resumed_target_holds_is_finished_even_once_expired() {
    let src = Mosquitto::start().await;
    let target = EmbeddedBroker::start(BrokerOptions::named("target")).unwrap();
    target.script().withhold_acks("in/#");
    let out = Collector::start(target.port(), Proto::V5, "in/#", 2).await;
    let mut cfg = RouteConfig::new(src.port(), Proto::V5, target.port(), Proto::V5);
    let admin = format!("127.0.0.1:{}", free_port());
    cfg.tail = format!("[admin]\nlisten = \"{admin}\"\n");
    let mut bridge = start_ready(&cfg.toml(), 1).await;
    let mut p = Publisher::connect(src.port(), Proto::V5).await;
    let props = PublishProperties {
        message_expiry_interval: Some(1),
        ..Default::default()
    };
    p.publish_v5("in/x", 2, false, "held", props).await;
    assert!(
        out.wait_for_count(1, Duration::from_secs(10)).await,
        "{}",
        bridge.log()
    );
    let client = publisher_on(&target);
    assert_eq!(target.stats().client(&client).unwrap().qos2_open, 1);
    // Past the message's expiry while the target holds the exchange, PUBREC withheld.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    target.script().cut_connection(&client);
    let resent = wait_until(Duration::from_secs(10), || {
        target.stats().publishes_received(&client) >= 2
    })
    .await;
    target.script().release_acks();
    let finished = wait_until(Duration::from_secs(10), || {
        target
            .stats()
            .client(&client)
            .is_some_and(|c| c.qos2_open == 0)
    })
    .await;
    let body = http_get(&admin, "/metrics").await.expect("/metrics").1;
    assert!(
        resent,
        "no resend to the resumed session:\n{}",
        bridge.log()
    );
    assert!(
        finished,
        "the exchange was never released:\n{}",
        bridge.log()
    );
    assert_eq!(
        metric(&body, "mqbridge_messages_dropped_total"),
        0.0,
        "{body}"
    );
    assert_eq!(target.stats().client(&client).unwrap().connects, 2);
    p.publish("in/x", 2, false, "after").await;
    assert!(out.wait_for_count(2, Duration::from_secs(10)).await);
    out.settle(Duration::from_millis(300), Duration::from_secs(2))
        .await;
    let payloads: Vec<String> = out.received().iter().map(|m| m.payload_str()).collect();
    assert_eq!(payloads, ["held", "after"], "each once");
    assert!(p.wait_acked(Duration::from_secs(10)).await);
    bridge.stop_cleanly().await;
}

/// Issue #14, hole 10: a target that comes back (a new broker process, no session) with a lower
/// Maximum QoS gets the messages the bridge held at that QoS, first PUBLISHes, not the QoS 2 the
/// old session had: a PUBLISH above Maximum QoS is a protocol error (MQTT-3.2.2-11) and the
/// broker closes the connection on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_back_with_a_lower_maximum_qos_takes_the_held_message_at_that_qos() {
    let src = Mosquitto::start().await;
    let first = EmbeddedBroker::start(BrokerOptions::named("target")).unwrap();
    let addr = first.addr();
    first.script().withhold_acks("in/#");
    let mut cfg = RouteConfig::new(src.port(), Proto::V5, first.port(), Proto::V5);
    let admin = format!("127.0.0.1:{}", free_port());
    cfg.tail = format!("[admin]\nlisten = \"{admin}\"\n");
    let mut bridge = start_ready(&cfg.toml(), 1).await;
    let mut p = Publisher::connect(src.port(), Proto::V5).await;
    p.publish("in/x", 2, false, "held").await;
    assert!(
        wait_until(Duration::from_secs(10), || first
            .stats()
            .total_publishes_received()
            >= 1)
        .await,
        "{}",
        bridge.log()
    );
    first.stop();
    let second = EmbeddedBroker::start(BrokerOptions {
        addr,
        ..BrokerOptions::named("target")
    })
    .unwrap();
    second.script().set_maximum_qos(Some(1));
    let out = Collector::start(second.port(), Proto::V5, "in/#", 2).await;
    assert!(
        out.wait_for_count(1, Duration::from_secs(20)).await,
        "{}",
        bridge.log()
    );
    p.publish("in/x", 2, false, "after").await;
    assert!(out.wait_for_count(2, Duration::from_secs(10)).await);
    out.settle(Duration::from_millis(300), Duration::from_secs(2))
        .await;
    let rx = out.received();
    let payloads: Vec<String> = rx.iter().map(|m| m.payload_str()).collect();
    assert_eq!(payloads, ["held", "after"], "each once");
    assert!(rx.iter().all(|m| m.qos == 1), "{rx:?}");
    let client = publisher_on(&second);
    assert_eq!(
        second.stats().client(&client).unwrap().connects,
        1,
        "the second broker never had to close the bridge's connection:\n{}",
        bridge.log()
    );
    let body = http_get(&admin, "/metrics").await.expect("/metrics").1;
    assert_eq!(
        metric(&body, "mqbridge_messages_dropped_total"),
        0.0,
        "{body}"
    );
    assert!(p.wait_acked(Duration::from_secs(10)).await);
    bridge.stop_cleanly().await;
}

/// Issue #14, hole 10: a target that comes back (no session) with a smaller Maximum Packet
/// Size than a held message needs: that message is refused at once as too large (counted, acked
/// to the source), and what follows flows. Sending it anyway is a protocol error the broker
/// answers by closing the connection (MQTT-3.2.2-15), again on every reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_back_with_a_smaller_maximum_packet_size_refuses_only_what_no_longer_fits() {
    let src = Mosquitto::start().await;
    let first = EmbeddedBroker::start(BrokerOptions::named("target")).unwrap();
    let addr = first.addr();
    first.script().withhold_acks("in/#");
    let mut cfg = RouteConfig::new(src.port(), Proto::V5, first.port(), Proto::V5);
    cfg.qos = 1;
    let admin = format!("127.0.0.1:{}", free_port());
    cfg.tail = format!("[admin]\nlisten = \"{admin}\"\n");
    let mut bridge = start_ready(&cfg.toml(), 1).await;
    let mut p = Publisher::connect(src.port(), Proto::V5).await;
    p.publish("in/x", 1, false, vec![b'x'; 2048]).await;
    assert!(
        wait_until(Duration::from_secs(10), || first
            .stats()
            .total_publishes_received()
            >= 1)
        .await,
        "{}",
        bridge.log()
    );
    first.stop();
    let second = EmbeddedBroker::start(BrokerOptions {
        addr,
        maximum_packet_size: Some(1024),
        ..BrokerOptions::named("target")
    })
    .unwrap();
    let out = Collector::start(second.port(), Proto::V5, "in/#", 1).await;
    p.publish("in/x", 1, false, "after").await;
    assert!(
        out.wait_for_count(1, Duration::from_secs(20)).await,
        "{}",
        bridge.log()
    );
    assert!(p.wait_acked(Duration::from_secs(10)).await);
    out.settle(Duration::from_millis(300), Duration::from_secs(2))
        .await;
    let payloads: Vec<String> = out.received().iter().map(|m| m.payload_str()).collect();
    assert_eq!(payloads, ["after"]);
    let client = publisher_on(&second);
    assert_eq!(
        second.stats().client(&client).unwrap().connects,
        1,
        "the second broker never had to close the bridge's connection:\n{}",
        bridge.log()
    );
    let body = http_get(&admin, "/metrics").await.expect("/metrics").1;
    assert_eq!(
        metric(
            &body,
            r#"mqbridge_messages_dropped_total{route="r",reason="too_large"}"#
        ),
        1.0,
        "{body}"
    );
    assert_eq!(
        metric(&body, "mqbridge_messages_dropped_total"),
        1.0,
        "{body}"
    );
    bridge.stop_cleanly().await;
}

/// Issue #14, hole 20: Message Expiry counts down for the whole time a message is held,
/// resends to a resumed target session included. The target takes a QoS 1 message with 60 s
/// to live (its subscriber gets a copy), withholds the PUBACK for 3 s, then the connection
/// breaks; the bridge resends it (DUP) to the same session, and that copy must say ≤ 57 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_to_a_resumed_session_carries_the_expiry_left() {
    let src = Mosquitto::start().await;
    let target = EmbeddedBroker::start(BrokerOptions::named("target")).unwrap();
    target.script().withhold_acks("in/#");
    let out = Collector::start(target.port(), Proto::V5, "in/#", 1).await;
    let mut cfg = RouteConfig::new(src.port(), Proto::V5, target.port(), Proto::V5);
    cfg.qos = 1;
    let mut bridge = start_ready(&cfg.toml(), 1).await;
    let mut p = Publisher::connect(src.port(), Proto::V5).await;
    let props = PublishProperties {
        message_expiry_interval: Some(60),
        ..Default::default()
    };
    p.publish_v5("in/x", 1, false, "m", props).await;
    assert!(
        out.wait_for_count(1, Duration::from_secs(10)).await,
        "{}",
        bridge.log()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let client = publisher_on(&target);
    target.script().cut_connection(&client);
    assert!(
        out.wait_for_count(2, Duration::from_secs(10)).await,
        "{}",
        bridge.log()
    );
    target.script().release_acks();
    let expiry: Vec<u32> = out
        .received()
        .iter()
        .map(|m| {
            m.properties
                .as_ref()
                .and_then(|p| p.message_expiry_interval)
                .unwrap()
        })
        .collect();
    assert!(expiry[0] >= 59, "{expiry:?}");
    assert!(expiry[1] <= 57, "the resend after 3 s held: {expiry:?}");
    assert!(p.wait_acked(Duration::from_secs(10)).await);
    bridge.stop_cleanly().await;
}

/// An MQTT 3.x source that has more than 20 messages unacknowledged out to one pair is named
/// once for the route: the 20 of mosquitto's default `max_inflight_messages` is all such a
/// source is assumed to allow, and mosquitto before 2.0.13 keeps no window for QoS 1 once a
/// queue forms, counting what is in flight against its queue of 1,000 (docs/GUARANTEES.md).
/// The source here says `max_inflight_messages 0` (no limit), so that it sends past 20 on any
/// version, as 2.0.11 does at its defaults; the target withholds its acks, so all it was sent
/// stays in flight. Once the acks come, everything arrives, and the note was said once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_3x_source_past_the_window_it_is_assumed_to_keep_is_named_once() {
    const N: u32 = 100;
    let source = Mosquitto::start_with(MosquittoOpts {
        max_inflight_messages: Some(0),
        ..Default::default()
    })
    .await;
    let target = EmbeddedBroker::start(BrokerOptions::named("target")).unwrap();
    target.script().withhold_acks("in/#");
    let out = Collector::start(target.port(), Proto::V5, "in/#", 1).await;
    let mut cfg = RouteConfig::new(source.port(), Proto::V311, target.port(), Proto::V5);
    cfg.qos = 1;
    let mut bridge = start_ready(&cfg.toml(), 1).await;
    publish_numbered(
        source.port(),
        Proto::V311,
        |i| format!("in/{}", i % 4),
        1,
        0,
        N,
        "w",
    )
    .await;
    let note = "unacknowledged, more than the 20 of mosquitto's default max_inflight_messages";
    let said = wait_until(Duration::from_secs(20), || bridge.log().contains(note)).await;
    assert!(said, "{}", bridge.log());
    target.script().release_acks();
    assert!(
        out.wait_for_count(N as usize, Duration::from_secs(30))
            .await,
        "{}",
        out.count()
    );
    assert_exactly_once(&out.received(), "w", 0..N);
    bridge.stop_cleanly().await;
    let log = bridge.log();
    assert_eq!(log.matches(note).count(), 1, "once for the route:\n{log}");
}
