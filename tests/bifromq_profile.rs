//! The embedded broker's BifroMQ profile (`BrokerOptions::bifromq`), limit by limit, as a
//! client on the wire sees it: raw packets, so that what the broker does (and does not) answer
//! is visible. BifroMQ's behaviour is read from its source (see `src/broker/quotas.rs`).

mod support;

use std::time::{Duration, Instant};

use mqbridge::broker::{BrokerOptions, EmbeddedBroker};
use support::fake_broker::{PUBACK, ack, packet, publish, spawn_reader, string};
use support::{Collector, Proto, wait_until};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, tcp::OwnedWriteHalf};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(10);

fn bifromq(name: &str) -> EmbeddedBroker {
    EmbeddedBroker::start(BrokerOptions::bifromq(name)).expect("embedded broker starts")
}

/// A client writing raw packets and reading whole ones.
struct Raw {
    v5: bool,
    tx: OwnedWriteHalf,
    rx: mpsc::Receiver<(u8, Vec<u8>)>,
    /// The CONNACK's body.
    connack: Vec<u8>,
}

impl Raw {
    async fn connect(port: u16, v5: bool, client_id: &str, clean: bool) -> Raw {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (r, mut tx) = stream.into_split();
        let mut body = string(b"MQTT");
        body.push(if v5 { 5 } else { 4 });
        body.push(if clean { 0x02 } else { 0x00 });
        body.extend_from_slice(&60u16.to_be_bytes());
        if v5 {
            if clean {
                body.push(0);
            } else {
                // Session Expiry Interval: an hour.
                body.extend_from_slice(&[5, 0x11, 0, 0, 0x0e, 0x10]);
            }
        }
        body.extend_from_slice(&string(client_id.as_bytes()));
        tx.write_all(&packet(0x10, &body)).await.unwrap();
        let mut rx = spawn_reader(r);
        let (first, connack) = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("CONNACK in time")
            .expect("CONNACK");
        assert_eq!(first, 0x20, "CONNACK");
        Raw {
            v5,
            tx,
            rx,
            connack,
        }
    }

    /// The Receive Maximum in an MQTT 5 CONNACK.
    fn receive_maximum(&self) -> Option<u16> {
        let props = &self.connack[3..];
        let mut at = 0;
        while at < props.len() {
            match props[at] {
                0x21 => return Some(u16::from_be_bytes([props[at + 1], props[at + 2]])),
                // Two-byte properties, four-byte ones, one-byte ones, strings: skip.
                0x13 | 0x22 => at += 3,
                0x11 | 0x27 => at += 5,
                0x24 | 0x25 | 0x28 | 0x29 | 0x2a => at += 2,
                _ => {
                    let len = usize::from(u16::from_be_bytes([props[at + 1], props[at + 2]]));
                    at += 3 + len;
                }
            }
        }
        None
    }

    async fn write(&mut self, bytes: &[u8]) {
        self.tx.write_all(bytes).await.unwrap();
    }

    /// `n` PUBLISH packets on `topic` in one write, packet ids from 1.
    async fn publish_burst(&mut self, topic: &str, qos: u8, n: u16, payload: &[u8]) {
        let mut all = Vec::new();
        for id in 1..=n {
            all.extend(publish(self.v5, qos, false, id, topic.as_bytes(), payload));
        }
        self.write(&all).await;
    }

    async fn subscribe(&mut self, pkid: u16, filters: &[&str]) {
        let mut body = pkid.to_be_bytes().to_vec();
        if self.v5 {
            body.push(0);
        }
        for f in filters {
            body.extend(string(f.as_bytes()));
            body.push(1);
        }
        self.write(&packet(0x82, &body)).await;
    }

    /// Packets until the connection closes or `quiet` passes without one.
    async fn read_until_quiet(&mut self, quiet: Duration) -> (Vec<(u8, Vec<u8>)>, bool) {
        let mut got = Vec::new();
        loop {
            match tokio::time::timeout(quiet, self.rx.recv()).await {
                Ok(Some(p)) => got.push(p),
                Ok(None) => return (got, true),
                Err(_) => return (got, false),
            }
        }
    }
}

fn count(packets: &[(u8, Vec<u8>)], first: u8) -> usize {
    packets.iter().filter(|(f, _)| *f == first).count()
}

/// The reason code of an MQTT 5 DISCONNECT among `packets`.
fn disconnect_reason(packets: &[(u8, Vec<u8>)]) -> Option<u8> {
    packets
        .iter()
        .find(|(f, _)| *f == 0xe0)
        .map(|(_, body)| body.first().copied().unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_publishes_over_200_in_a_second_are_discarded_without_an_ack() {
    let b = bifromq("rate3");
    let sub = Collector::start(b.port(), Proto::V311, "rate/#", 1).await;
    let mut c = Raw::connect(b.port(), false, "fast", true).await;
    // 450 in one write: whatever the phase of the broker's seconds, at most 400 fit in the
    // (at most two) seconds they arrive in.
    c.publish_burst("rate/x", 1, 450, b"m").await;
    let (got, closed) = c.read_until_quiet(Duration::from_millis(1_500)).await;
    assert!(
        !closed,
        "an MQTT 3.x client over the rate keeps its connection"
    );
    let acked = count(&got, 0x40);
    let over = b.stats().client("fast").unwrap().over_rate;
    assert!(over >= 50, "{over} discarded, {acked} acknowledged");
    assert_eq!(
        acked as u64 + over,
        450,
        "every PUBLISH is either acked or discarded"
    );
    // What was discarded was not routed either.
    assert!(sub.wait_for_count(acked, WAIT).await);
    assert_eq!(sub.settle(Duration::from_millis(300), WAIT).await, acked);
    // Still usable: a PINGREQ is answered.
    c.write(&packet(0xc0, &[])).await;
    let (got, _) = c.read_until_quiet(Duration::from_millis(500)).await;
    assert_eq!(count(&got, 0xd0), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_publishes_over_200_in_a_second_end_the_connection_with_0x96() {
    let b = bifromq("rate5");
    let mut c = Raw::connect(b.port(), true, "fast5", true).await;
    // QoS 0: the Receive Maximum does not count them, only the rate does.
    c.publish_burst("rate/x", 0, 450, b"m").await;
    let (got, closed) = c.read_until_quiet(WAIT).await;
    assert!(closed, "the connection ends");
    assert_eq!(disconnect_reason(&got), Some(0x96), "Message Rate Too High");
    assert!(b.stats().client("fast5").unwrap().over_rate >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_in_each_second_all_pass() {
    let b = bifromq("rate-ok");
    let mut c = Raw::connect(b.port(), false, "steady", true).await;
    // 190 every 1.05 s, three times: never over 200 in any second, whatever the phase.
    let mut acked = 0;
    for round in 0..3u16 {
        let mut all = Vec::new();
        for i in 0..190u16 {
            all.extend(publish(false, 1, false, round * 190 + i + 1, b"ok/x", b"m"));
        }
        let started = Instant::now();
        c.write(&all).await;
        let (got, _) = c.read_until_quiet(Duration::from_millis(300)).await;
        acked += count(&got, 0x40);
        tokio::time::sleep(Duration::from_millis(1_050).saturating_sub(started.elapsed())).await;
    }
    assert_eq!(acked, 570);
    assert_eq!(b.stats().client("steady").unwrap().over_rate, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_bytes_are_read_at_512_kib_per_second() {
    let b = bifromq("inbound");
    let mut c = Raw::connect(b.port(), false, "bulk-in", true).await;
    // 64 publishes of 32 KiB (2 MiB, within the PUBLISH/s quota): a second's worth is
    // taken at once, then 512 KiB/s, so all of it takes three seconds to be read.
    let payload = vec![b'x'; 32 * 1024];
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        c.publish_burst("in/x", 0, 64, &payload).await;
        c
    });
    let received = || {
        b.stats()
            .client("bulk-in")
            .map_or(0, |s| s.publishes_received)
    };
    tokio::time::sleep(Duration::from_millis(1_200).saturating_sub(started.elapsed())).await;
    let early = received();
    assert!(
        early < 56,
        "{early} of 64 read 1.2 s in: the reads are not paced"
    );
    assert!(
        wait_until(WAIT, || received() == 64).await,
        "{}",
        received()
    );
    assert!(
        started.elapsed() >= Duration::from_millis(2_500),
        "{:?}",
        started.elapsed()
    );
    drop(writer.await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_bytes_are_written_at_512_kib_per_second() {
    let b = bifromq("outbound");
    let sub = Collector::start(b.port(), Proto::V311, "out/#", 0).await;
    // Four publishers, 512 KiB each: each within its own inbound second's worth, so the
    // broker has 2 MiB for the one subscriber at once, and writes it at 512 KiB/s.
    let payload = vec![b'y'; 32 * 1024];
    let started = Instant::now();
    let mut publishers = Vec::new();
    for p in 0..4 {
        let mut c = Raw::connect(b.port(), false, &format!("pub-{p}"), true).await;
        c.publish_burst("out/x", 0, 16, &payload).await;
        publishers.push(c);
    }
    let total = || {
        (0..4)
            .map(|p| {
                b.stats()
                    .client(&format!("pub-{p}"))
                    .map_or(0, |s| s.publishes_received)
            })
            .sum::<u64>()
    };
    assert!(wait_until(WAIT, || total() == 64).await, "{}", total());
    tokio::time::sleep(Duration::from_millis(1_200).saturating_sub(started.elapsed())).await;
    let early = sub.count();
    assert!(
        early < 56,
        "{early} of 64 written 1.2 s in: the writes are not paced"
    );
    assert!(sub.wait_for_count(64, WAIT).await, "{}", sub.count());
    assert!(started.elapsed() >= Duration::from_millis(2_500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_maximum_is_200_and_enforced() {
    let b = bifromq("rm");
    b.script().withhold_acks("rm/#");
    let mut c = Raw::connect(b.port(), true, "rm5", true).await;
    assert_eq!(c.receive_maximum(), Some(200));
    // 150 now and 51 in the next second (within the rate): 201 unacknowledged.
    c.publish_burst("rm/x", 1, 150, b"m").await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let mut more = Vec::new();
    for id in 151..=201u16 {
        more.extend(publish(true, 1, false, id, b"rm/x", b"m"));
    }
    c.write(&more).await;
    let (got, closed) = c.read_until_quiet(WAIT).await;
    assert!(closed, "201 unacknowledged ends the connection");
    assert_eq!(
        disconnect_reason(&got),
        Some(0x93),
        "Receive Maximum Exceeded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eleven_filters_in_one_subscribe_close_the_connection() {
    let b = bifromq("filters");
    let ten: Vec<String> = (0..10).map(|i| format!("f/{i}")).collect();
    let ten: Vec<&str> = ten.iter().map(String::as_str).collect();
    let eleven: Vec<&str> = ten.iter().copied().chain(["f/10"]).collect();
    for v5 in [false, true] {
        let mut c = Raw::connect(b.port(), v5, "ten", true).await;
        c.subscribe(1, &ten).await;
        let (got, closed) = c.read_until_quiet(Duration::from_millis(500)).await;
        assert!(!closed);
        let (_, suback) = got.iter().find(|(f, _)| *f == 0x90).expect("SUBACK");
        assert_eq!(&suback[suback.len() - 10..], &[1; 10], "v5 {v5}");

        let mut c = Raw::connect(b.port(), v5, "eleven", true).await;
        c.subscribe(1, &eleven).await;
        let (got, closed) = c.read_until_quiet(WAIT).await;
        assert!(closed, "v5 {v5}: the connection ends");
        assert_eq!(count(&got, 0x90), 0, "v5 {v5}: no SUBACK");
        if v5 {
            assert_eq!(disconnect_reason(&got), Some(0x98), "Administrative Action");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_group_takes_200_members() {
    let b = bifromq("group");
    let mut members = Vec::new();
    for i in 0..200 {
        let mut c = Raw::connect(b.port(), i % 2 == 0, &format!("m{i}"), true).await;
        c.subscribe(1, &["$share/g/t/#"]).await;
        members.push(c);
    }
    for (i, c) in members.iter_mut().enumerate() {
        let (first, body) = tokio::time::timeout(WAIT, c.rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((first, *body.last().unwrap()), (0x90, 1), "member {i}");
    }
    for (v5, refused) in [(false, 0x80), (true, 0x97)] {
        let mut c = Raw::connect(b.port(), v5, "one-too-many", true).await;
        // Another group and a plain filter in the same SUBSCRIBE are not refused.
        c.subscribe(1, &["$share/g/t/#", "$share/h/t/#", "t/#"])
            .await;
        let (first, body) = tokio::time::timeout(WAIT, c.rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first, 0x90);
        assert_eq!(&body[body.len() - 3..], &[refused, 1, 1], "v5 {v5}");
    }
    // A member that leaves makes room.
    drop(members.pop());
    let mut c = Raw::connect(b.port(), false, "late", true).await;
    let mut granted = 0;
    let deadline = Instant::now() + WAIT;
    while granted != 1 && Instant::now() < deadline {
        c.subscribe(2, &["$share/g/t/#"]).await;
        let (_, body) = tokio::time::timeout(WAIT, c.rx.recv())
            .await
            .unwrap()
            .unwrap();
        granted = *body.last().unwrap();
    }
    assert_eq!(granted, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_inbox_holds_1000_and_drops_the_rest() {
    let b = bifromq("inbox");
    let mut s = Raw::connect(b.port(), false, "away", false).await;
    s.subscribe(1, &["inbox/#"]).await;
    let (got, _) = s.read_until_quiet(Duration::from_millis(300)).await;
    assert_eq!(count(&got, 0x90), 1);
    drop(s);
    assert!(wait_until(WAIT, || !b.stats().client("away").unwrap().connected).await);
    // 1,200 QoS 1 messages from seven publishers (within their PUBLISH/s quota).
    for p in 0..7u16 {
        let mut c = Raw::connect(b.port(), false, &format!("fill-{p}"), true).await;
        let n = if p < 6 { 180 } else { 120 };
        c.publish_burst("inbox/x", 1, n, b"m").await;
        let (got, _) = c.read_until_quiet(Duration::from_millis(300)).await;
        assert_eq!(count(&got, 0x40), usize::from(n));
    }
    assert_eq!(b.stats().client("away").unwrap().dropped, 200);
    let mut s = Raw::connect(b.port(), false, "away", false).await;
    let mut delivered = 0;
    loop {
        let (got, closed) = s.read_until_quiet(Duration::from_millis(500)).await;
        let publishes: Vec<_> = got.iter().filter(|(f, _)| f & 0xf0 == 0x30).collect();
        if publishes.is_empty() || closed {
            break;
        }
        delivered += publishes.len();
        let mut acks = Vec::new();
        for (first, body) in publishes {
            let (_, pkid, _) = support::fake_broker::parse_publish(false, *first, body);
            acks.extend(ack(PUBACK, pkid));
        }
        s.write(&acks).await;
    }
    assert_eq!(delivered, 1_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn share_and_oshare_both_work() {
    let b = bifromq("sharing");
    let ordered = [
        Collector::start(b.port(), Proto::V311, "$oshare/o/s/#", 1).await,
        Collector::start(b.port(), Proto::V5, "$oshare/o/s/#", 1).await,
    ];
    let shared = [
        Collector::start(b.port(), Proto::V311, "$share/g/s/#", 1).await,
        Collector::start(b.port(), Proto::V5, "$share/g/s/#", 1).await,
    ];
    let mut c = Raw::connect(b.port(), false, "sharer", true).await;
    let mut all = Vec::new();
    for i in 1..=100u16 {
        let topic = format!("s/{}", i % 4);
        all.extend(publish(
            false,
            1,
            false,
            i,
            topic.as_bytes(),
            format!("{i}").as_bytes(),
        ));
    }
    c.write(&all).await;
    for group in [&ordered, &shared] {
        let total = || group.iter().map(Collector::count).sum::<usize>();
        assert!(wait_until(WAIT, || total() == 100).await, "{}", total());
    }
    assert!(
        shared.iter().all(|m| m.count() > 0),
        "$share: both members take turns"
    );
    // $oshare: each topic stays on one member.
    for topic in (0..4).map(|t| format!("s/{t}")) {
        let holders = ordered
            .iter()
            .filter(|m| m.received().iter().any(|r| r.topic == topic))
            .count();
        assert_eq!(holders, 1, "{topic}");
    }
}
