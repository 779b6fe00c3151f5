//! The embedded broker (`mqbridge::broker`) against real rumqttc clients: publish/subscribe
//! at every QoS in MQTT 3.1.1 and 5, shared subscriptions, retained messages, persistent
//! sessions, MQTT 3.1, and the fault-injection script (Receive Maximum, reason codes,
//! delayed and withheld acks, disconnects) as a client sees it.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use mqbridge::broker::{BrokerOptions, EmbeddedBroker};
use mqbridge::config::Protocol;
use rumqttc::v5::{self, mqttbytes::QoS as QoS5, mqttbytes::v5::Packet as Packet5};
use support::{
    Collector, Proto, Publisher, RouteConfig, assert_at_least_once, assert_exactly_once, count_ids,
    ids_in_order, numbered_payload, publish_numbered, publish_one, start_ready, wait_until,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(10);

fn broker(options: BrokerOptions) -> EmbeddedBroker {
    EmbeddedBroker::start(options).expect("embedded broker starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_qos_crosses_between_311_and_5_exactly_once() {
    // A Receive Maximum below the message count: QoS 2 from MQTT 5 publishers must keep
    // flowing past it (packet ids are freed at PUBREL).
    let b = broker(BrokerOptions {
        receive_maximum: 10,
        ..BrokerOptions::named("pubsub")
    });
    for sub in Proto::ALL {
        for publ in Proto::ALL {
            for qos in 0..=2u8 {
                let prefix = format!("{sub:?}-{publ:?}-q{qos}");
                let topic = format!("pubsub/{prefix}");
                let c = Collector::start(b.port(), sub, "pubsub/#", 2).await;
                publish_numbered(b.port(), publ, |_| topic.clone(), qos, 0, 60, &prefix).await;
                assert!(c.wait_for_count(60, WAIT).await, "{prefix}: {}", c.count());
                let received = c.received();
                assert_exactly_once(&received, &prefix, 0..60);
                assert!(received.iter().all(|r| r.qos == qos && r.topic == topic));
                assert_eq!(
                    ids_in_order(&received, &prefix),
                    (0..60).collect::<Vec<_>>()
                );
                c.disconnect().await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn share_group_members_take_turns_and_plain_subscribers_get_everything() {
    let b = broker(BrokerOptions::named("share"));
    let members = [
        Collector::start(b.port(), Proto::V5, "$share/g/s/#", 1).await,
        Collector::start(b.port(), Proto::V311, "$share/g/s/#", 1).await,
        Collector::start(b.port(), Proto::V5, "$share/g/s/#", 1).await,
    ];
    let plain = Collector::start(b.port(), Proto::V311, "s/#", 1).await;
    publish_numbered(
        b.port(),
        Proto::V5,
        |i| format!("s/{}", i % 7),
        1,
        0,
        90,
        "sh",
    )
    .await;
    assert!(plain.wait_for_count(90, WAIT).await);
    assert_exactly_once(&plain.received(), "sh", 0..90);
    assert!(
        wait_until(WAIT, || members.iter().map(Collector::count).sum::<usize>()
            == 90)
        .await
    );
    let all: Vec<_> = members.iter().flat_map(Collector::received).collect();
    assert_exactly_once(&all, "sh", 0..90);
    for m in &members {
        assert_eq!(m.count(), 30, "round robin gives each member a third");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oshare_keeps_each_topic_on_one_member_in_order() {
    let b = broker(BrokerOptions::named("oshare"));
    let members = [
        Collector::start(b.port(), Proto::V5, "$oshare/g/o/+", 1).await,
        Collector::start(b.port(), Proto::V5, "$oshare/g/o/+", 1).await,
    ];
    publish_numbered(
        b.port(),
        Proto::V311,
        |i| format!("o/{}", i % 4),
        1,
        0,
        80,
        "os",
    )
    .await;
    assert!(
        wait_until(WAIT, || members.iter().map(Collector::count).sum::<usize>()
            == 80)
        .await
    );
    let mut owner: HashMap<String, usize> = HashMap::new();
    for (n, m) in members.iter().enumerate() {
        assert!(m.count() > 0, "both members own some topics");
        for r in m.received() {
            assert_eq!(
                *owner.entry(r.topic.clone()).or_insert(n),
                n,
                "{} split",
                r.topic
            );
        }
        let ids = ids_in_order(&m.received(), "os");
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "order kept: {ids:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_message_arrives_at_subscribe_and_empty_payload_deletes_it() {
    let b = broker(BrokerOptions::named("retain"));
    publish_one(b.port(), Proto::V311, "r/1", 1, true, "first").await;
    publish_one(b.port(), Proto::V5, "r/1", 1, true, "second").await;
    publish_one(b.port(), Proto::V5, "r/2", 0, true, "other").await;
    assert!(wait_until(WAIT, || b.stats().retained_count() == 2).await);

    for proto in Proto::ALL {
        let c = Collector::start(b.port(), proto, "r/1", 1).await;
        assert!(c.wait_for_count(1, WAIT).await);
        let r = &c.received()[0];
        assert_eq!(r.payload_str(), "second");
        assert!(r.retain, "{proto:?}: retained delivery has RETAIN set");
        c.disconnect().await;
    }

    publish_one(b.port(), Proto::V311, "r/1", 1, true, "").await;
    assert!(wait_until(WAIT, || b.stats().retained_count() == 1).await);
    let c = Collector::start(b.port(), Proto::V5, "r/#", 1).await;
    assert!(c.wait_for_count(1, WAIT).await);
    assert_eq!(c.settle(Duration::from_millis(300), WAIT).await, 1);
    assert_eq!(c.received()[0].topic, "r/2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_session_receives_what_was_published_while_away() {
    let b = broker(BrokerOptions::named("persist"));
    for proto in Proto::ALL {
        let id = format!("persist-{proto:?}");
        let c = Collector::start_persistent(b.port(), proto, &id, &[("q/#", 2)]).await;
        c.disconnect().await;
        let prefix = format!("away-{proto:?}");
        publish_numbered(b.port(), Proto::V5, |_| "q/x".into(), 1, 0, 20, &prefix).await;
        publish_numbered(b.port(), Proto::V5, |_| "q/x".into(), 0, 100, 5, &prefix).await;
        let c = Collector::start_persistent(b.port(), proto, &id, &[("q/#", 2)]).await;
        assert!(c.wait_for_count(20, WAIT).await);
        // QoS 0 is not kept for an absent client.
        assert_eq!(c.settle(Duration::from_millis(300), WAIT).await, 20);
        assert_exactly_once(&c.received(), &prefix, 0..20);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripted_0x87_puback_reaches_a_v5_client_and_the_message_is_dropped() {
    let b = broker(BrokerOptions::named("refuse"));
    b.script().ack_with_reason("deny/#", 0x87);
    let c = Collector::start(b.port(), Proto::V5, "#", 1).await;
    let mut p = Publisher::connect(b.port(), Proto::V5).await;
    p.publish("deny/x", 1, false, "no").await;
    p.publish("ok/x", 1, false, "yes").await;
    assert!(p.wait_acked(WAIT).await);
    assert_eq!(p.refused(), 1, "one PUBACK carried 0x87");
    assert!(c.wait_for_count(1, WAIT).await);
    assert_eq!(c.settle(Duration::from_millis(300), WAIT).await, 1);
    assert_eq!(c.received()[0].topic, "ok/x");
    let publisher = b
        .stats()
        .client_ids()
        .into_iter()
        .find(|id| b.stats().client(id).is_some_and(|s| s.refused == 1))
        .expect("the refusal is counted");
    assert_eq!(b.stats().publishes_received(&publisher), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripted_connack_limits_reach_a_v5_publisher_and_receive_maximum_holds() {
    let b = broker(BrokerOptions::named("recvmax"));
    b.script().set_receive_maximum(Some(5));
    b.script().set_maximum_packet_size(Some(4096));
    b.script().set_maximum_qos(Some(1));
    b.script().withhold_acks("held/#");

    let mut options = v5::MqttOptions::new("recvmax-pub", "127.0.0.1", b.port());
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = v5::AsyncClient::new(options, 100);
    let connack = loop {
        match eventloop.poll().await.expect("connects") {
            v5::Event::Incoming(Packet5::ConnAck(ack)) => break ack,
            _ => continue,
        }
    };
    let props = connack.properties.expect("CONNACK properties");
    assert_eq!(props.receive_max, Some(5));
    assert_eq!(props.max_packet_size, Some(4096));
    assert_eq!(props.max_qos, Some(1));
    let driver = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    for n in 0..20 {
        client
            .publish("held/x", QoS5::AtLeastOnce, false, format!("m{n}"))
            .await
            .unwrap();
    }
    let stats = b.stats().clone();
    assert!(wait_until(WAIT, || stats.publishes_received("recvmax-pub") == 5).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        stats.publishes_received("recvmax-pub"),
        5,
        "the client keeps to the advertised window while acks are withheld"
    );
    b.script().release_acks();
    assert!(wait_until(WAIT, || stats.publishes_received("recvmax-pub") == 20).await);
    driver.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_keeps_within_a_v5_subscribers_receive_maximum() {
    let b = broker(BrokerOptions::named("window"));
    let mut options = v5::MqttOptions::new("window-sub", "127.0.0.1", b.port());
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_receive_maximum(Some(3))
        .set_max_packet_size(Some(100_000))
        .set_manual_acks(true);
    let (client, mut eventloop) = v5::AsyncClient::new(options, 100);
    client
        .subscribe("w/#", QoS5::AtLeastOnce)
        .await
        .expect("subscribe queued");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            if let v5::Event::Incoming(packet) = event {
                let _ = tx.send(packet);
            }
        }
    });
    let stats = b.stats().clone();
    assert!(wait_until(WAIT, || !stats.subscriptions().is_empty()).await);
    let info = stats.connect_info("window-sub").expect("connected");
    assert_eq!(info.protocol, Protocol::V5);
    assert_eq!(info.receive_maximum, Some(3));
    assert_eq!(info.maximum_packet_size, Some(100_000));

    publish_numbered(b.port(), Proto::V311, |_| "w/x".into(), 1, 0, 10, "win").await;
    let mut held = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while held.len() < 10 {
        let packet = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("deliveries keep coming")
            .expect("event loop alive");
        if let Packet5::Publish(p) = packet {
            held.push(p);
            if held.len() % 3 == 0 {
                // A full window: nothing more may come until we ack.
                let extra = tokio::time::timeout(Duration::from_millis(300), async {
                    loop {
                        if let Some(Packet5::Publish(p)) = rx.recv().await {
                            return p;
                        }
                    }
                })
                .await;
                assert!(extra.is_err(), "a 4th unacked message arrived");
                assert_eq!(stats.max_unacked("window-sub"), 3);
                for p in &held[held.len() - 3..] {
                    client.ack(p).await.unwrap();
                }
            }
        }
    }
    for p in &held[9..] {
        client.ack(p).await.unwrap();
    }
    assert_eq!(stats.max_unacked("window-sub"), 3);
    driver.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_acks_and_disconnect_after_n_publishes() {
    let b = broker(BrokerOptions::named("faults"));
    b.script().delay_acks("slow/#", Duration::from_millis(400));
    let started = Instant::now();
    publish_one(b.port(), Proto::V5, "slow/x", 1, false, "late").await;
    assert!(started.elapsed() >= Duration::from_millis(400));

    // The 5th publish cuts its connection unacknowledged; the publisher (a persistent
    // session, so rumqttc resends what was unacknowledged) reconnects and resends.
    let c = Collector::start(b.port(), Proto::V311, "cut/#", 1).await;
    b.script().disconnect_after_publishes(5);
    let mut options = rumqttc::MqttOptions::new("cut-pub", "127.0.0.1", b.port());
    options
        .set_clean_session(false)
        .set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 100);
    let driver = tokio::spawn(async move {
        loop {
            if eventloop.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    for i in 0..10 {
        client
            .publish(
                "cut/x",
                rumqttc::QoS::AtLeastOnce,
                false,
                numbered_payload("cut", i),
            )
            .await
            .unwrap();
    }
    let all_there = c
        .wait_for(WAIT, |r| count_ids(r, "cut", 0..10).missing.is_empty())
        .await;
    assert!(all_there, "{:?}", count_ids(&c.received(), "cut", 0..10));
    assert_at_least_once(&c.received(), "cut", 0..10);
    let publisher = b.stats().client("cut-pub").unwrap();
    assert_eq!(publisher.connects, 2, "cut once, came back once");
    assert!(publisher.publishes_received >= 10);
    driver.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_31_client_is_accepted() {
    let b = broker(BrokerOptions::named("v31"));
    let c = Collector::start(b.port(), Proto::V311, "old/#", 0).await;
    let mut s = tokio::net::TcpStream::connect(b.addr()).await.unwrap();
    // CONNECT "MQIsdp" level 3, clean session, keep alive 60, client id "old-client".
    let mut connect = b"\x10\x18\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x0aold-client".to_vec();
    // PUBLISH QoS 0 "old/t" "hi".
    connect.extend_from_slice(b"\x30\x09\x00\x05old/thi");
    s.write_all(&connect).await.unwrap();
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);
    assert!(c.wait_for_count(1, WAIT).await);
    assert_eq!(c.received()[0].payload_str(), "hi");
    let info = b.stats().connect_info("old-client").unwrap();
    assert_eq!(info.protocol, Protocol::V31);
    b.stop();
    assert!(tokio::net::TcpStream::connect(b.addr()).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_between_embedded_brokers_mirrors_the_targets_receive_maximum() {
    // The target advertises Receive Maximum 4 and withholds its acks: the bridge's MQTT 5
    // source connection must announce 4, and the source broker must never have more than 4
    // messages unacknowledged out to it.
    let source = broker(BrokerOptions::named("source"));
    let target = broker(BrokerOptions::named("target"));
    target.script().set_receive_maximum(Some(4));
    target.script().withhold_acks("in/#");
    let out = Collector::start(target.port(), Proto::V311, "in/#", 1).await;
    let mut route = RouteConfig::new(source.port(), Proto::V5, target.port(), Proto::V5);
    route.qos = 1;
    let _bridge = start_ready(&route.toml(), 1).await;
    let bridge_client = source
        .stats()
        .subscriptions()
        .into_iter()
        .find(|(_, f)| f.starts_with("$share/"))
        .map(|(c, _)| c)
        .expect("the bridge subscribed on the source");
    let info = source.stats().connect_info(&bridge_client).unwrap();
    assert_eq!(info.receive_maximum, Some(4), "window mirrored: {info:?}");

    publish_numbered(source.port(), Proto::V5, |_| "in/x".into(), 1, 0, 30, "win").await;
    assert!(out.wait_for_count(4, WAIT).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(out.count(), 4, "the target took 4 and acknowledged none");
    assert_eq!(source.stats().max_unacked(&bridge_client), 4);

    target.script().release_acks();
    assert!(out.wait_for_count(30, WAIT).await, "{}", out.count());
    assert_exactly_once(&out.received(), "win", 0..30);
    assert!(source.stats().max_unacked(&bridge_client) <= 4);
}
