//! Bridge bugs found by the chaos and hostile-broker work (issue #7), each as the smallest test
//! that shows it. All five are fixed; these are their regression tests. A new bug found later
//! goes here too, as a failing reproduction, until it is fixed.
//!
//! Bugs 1-3 (fixed in e8119b0) had one shape: one message the pair could not get past, and a
//! connection re-established and failing again on it forever, so nothing behind it on that pair
//! moved. Bug 4 (fixed in bf87c64) lost QoS 2 messages after a crash. Bug 5 (fixed in f087ebf)
//! duplicated QoS 2 messages that mosquitto resends after their exchange completed.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use support::fake_broker::FakeSource;
use support::*;
use tokio::time::Instant;

fn assert_alive(bridge: &mut Bridge) {
    assert!(bridge.is_running(), "the bridge exited:\n{}", bridge.log());
    assert!(!bridge.log().contains("panicked"), "{}", bridge.log());
}

fn last_lines(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Bug 1 (fixed): a source message larger than the driver's `SOURCE_RBUF_HIGH` (256 KiB) stalled
/// its pair for good. The source socket was read only while fewer than 256 KiB waited undecoded, so a PUBLISH
/// bigger than that never completed in the buffer; the keep-alive then failed ("no PINGRESP
/// within 5s": the PINGRESP sits behind the unread message), the source reconnected, redelivered the
/// same message, and the cycle repeated every ~9 s. Nothing else on the pair moved, the pair never
/// became ready again (its SUBACK is behind the message too). Messages up to the 16 MiB
/// `DEFAULT_MAX_INCOMING` are meant to pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_mib_message_crosses_the_bridge() {
    let src = Mosquitto::start().await;
    let dst = Mosquitto::start().await;
    let collector = Collector::start(dst.port(), Proto::V5, "in/#", 1).await;
    let mut cfg = RouteConfig::new(src.port(), Proto::V5, dst.port(), Proto::V5);
    cfg.qos = 1;
    let mut bridge = start_ready(&cfg.toml(), 1).await;
    let mut p = Publisher::connect(src.port(), Proto::V5).await;
    p.publish("in/big", 1, false, padded_payload("big", 1, 1024 * 1024))
        .await;
    p.publish("in/small", 1, false, "after").await;
    assert!(p.wait_acked(Duration::from_secs(10)).await);
    let through = collector.wait_for_count(2, Duration::from_secs(15)).await;
    assert_alive(&mut bridge);
    assert!(
        through,
        "{} of 2 arrived; the bridge:\n{}",
        collector.count(),
        last_lines(&bridge.log(), 12)
    );
}

/// Bug 2 (fixed): a message the target answers by closing the connection was resent on every
/// reconnection, forever. mosquitto 2.0 closes a 3.1.1 client's connection when its PUBLISH exceeds
/// `max_packet_size` (3.1.1 has no way to announce the limit, so the bridge cannot know it up
/// front and dead-letter the message as it does on MQTT 5). Each CONNACK reset the backoff, so
/// the pair reconnected about 12 times a second (125 times in 10 s) and nothing behind the
/// message moved. Expected: a message after which the target closes the connection several times
/// in a row is treated as undeliverable (logged, counted, dead-lettered, acknowledged), and the
/// backoff grows while connections keep failing right after CONNACK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_v311_target_disconnects_for_does_not_block_the_pair() {
    let src = Mosquitto::start().await;
    let dst = Mosquitto::start_with(MosquittoOpts {
        extra: "max_packet_size 1024\n".into(),
        ..Default::default()
    })
    .await;
    let collector = Collector::start(dst.port(), Proto::V5, "in/#", 1).await;
    let mut cfg = RouteConfig::new(src.port(), Proto::V5, dst.port(), Proto::V311);
    cfg.qos = 1;
    let mut bridge = start_ready(&cfg.toml(), 1).await;
    let mut p = Publisher::connect(src.port(), Proto::V5).await;
    p.publish("in/small", 1, false, "a").await;
    p.publish("in/big", 1, false, vec![b'x'; 4096]).await;
    p.publish("in/small", 1, false, "b").await;
    assert!(p.wait_acked(Duration::from_secs(10)).await);
    let through = collector.wait_for_count(2, Duration::from_secs(10)).await;
    let log = bridge.log();
    assert_alive(&mut bridge);
    assert!(
        through,
        "the pair is stuck behind the oversize message ({} of 2 small ones arrived); the target \
         connection was re-established {} times:\n{}",
        collector.count(),
        log.matches("target connected").count(),
        last_lines(&log, 12)
    );
}

/// Bug 3 (fixed): a source PUBLISH whose topic is not a valid topic name (a wildcard, or a NUL)
/// was forwarded unchanged when no rewrite rule applies: `Rewrite::apply` returns the topic borrowed
/// and unchecked. mosquitto closed the target connection on it, and from there it was bug 2: the
/// pair reconnected forever and stayed stuck. Only a broken or hostile source sends such a name,
/// but one bad message must not stop a pair. Expected: treated like a rewrite to an invalid
/// topic (SPEC 4.7: dead-lettered, counted as `invalid_topic`, acknowledged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_topic_names_from_the_source_do_not_block_the_pair() {
    const COUNT: u32 = 60;
    let bad: BTreeMap<u32, Vec<u8>> = [
        (10, b"in/+/bad".to_vec()),
        (20, b"in/#".to_vec()),
        (30, b"in/a\0b".to_vec()),
    ]
    .into_iter()
    .collect();
    let source = FakeSource::start_with_topics(false, COUNT, Vec::new(), bad.clone()).await;
    let dst = Mosquitto::start().await;
    let collector = Collector::start(dst.port(), Proto::V5, "in/#", 1).await;
    let mut cfg = RouteConfig::new(source.port, Proto::V311, dst.port(), Proto::V5);
    // A scripted source, not a broker: it cannot route the share probe back.
    cfg.src_extra = "share_probe = false".into();
    cfg.qos = 1;
    cfg.src_url = Some(source.url());
    let mut bridge = Bridge::start(&cfg.toml());
    let done = wait_until(Duration::from_secs(15), || source.all_acked()).await;
    collector
        .settle(Duration::from_millis(500), Duration::from_secs(3))
        .await;
    let arrived: BTreeSet<u32> = ids_in_order(&collector.received(), "h")
        .into_iter()
        .collect();
    let missing_good: Vec<u32> = (0..COUNT)
        .filter(|id| !bad.contains_key(id) && !arrived.contains(id))
        .collect();
    assert_alive(&mut bridge);
    assert!(
        done && missing_good.is_empty(),
        "the pair got stuck on an invalid topic name: {} of {COUNT} acknowledged, good ids \
         missing: {missing_good:?}\n{}",
        source.acked().len(),
        last_lines(&bridge.log(), 12)
    );
}

/// Bug 4 (fixed): QoS 2 after a bridge crash lost messages. When the bridge dies, the target broker's
/// session for the pair (kept: `session_expiry` > 0) still holds the QoS 2 exchanges the dead
/// process started: PUBLISHes it took (and PUBREC'd) but whose PUBREL never came. The new process
/// resumes that session (`session_present=true`) knowing nothing of them, so:
/// 1. they are never released: mosquitto delivers an incoming QoS 2 message at PUBREL, so those
///    whose PUBREC the old process had already passed on to the source (which then will not
///    redeliver) are lost;
/// 2. they fill the target's incoming window (Receive Maximum, 20 on mosquitto): the new
///    process's publishes are answered PUBREC 0x97 Quota exceeded, which the window takes for a
///    refusal (SPEC 4.7: dropped, counted as `refused`, acknowledged to the source) — lost; with
///    the window full of stranded ids that is every QoS 2 message of the pair, for as long as the
///    session lives;
/// 3. later, a new message reusing a stranded packet id is taken by the target for a duplicate
///    (PUBREC, not delivered), and our PUBREL releases the old stranded message in its place.
/// Towards a 3.1.1 mosquitto, which cannot say 0x97, point 2 becomes a silent drop.
///
/// Here the target's acks are held back (a one-way stall of the proxy) while 20 QoS 2 messages are
/// on the wire, so all 20 are stranded when the bridge is killed; the restarted bridge then sends
/// the redelivered and new messages into a full quota (15 of 50 were lost). Expected: everything
/// arrives (at least once). The fix: on the first connection of a pair to a resumed target
/// session, PUBREL every packet id before publishing (`Pair::release_stranded`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_exchanges_left_in_the_target_session_by_a_crash_do_not_lose_messages() {
    let src = Mosquitto::start().await;
    let dst = Mosquitto::start().await;
    let dst_proxy = Proxy::start(dst.port()).await;
    let collector = Collector::start(dst.port(), Proto::V5, "in/#", 2).await;
    let mut cfg = RouteConfig::new(src.port(), Proto::V5, dst.port(), Proto::V5);
    cfg.qos = 2;
    cfg.dst_url = Some(dst_proxy.url());
    let mut bridge = start_ready(&cfg.toml(), 1).await;
    publish_numbered(src.port(), Proto::V5, |_| "in/q2".into(), 2, 0, 100, "s").await;
    assert!(collector.wait_for_count(100, Duration::from_secs(10)).await);

    // The target takes the next publishes, but its PUBRECs are held: the window fills.
    dst_proxy.stall_one_way(false, Duration::from_secs(60));
    publish_numbered(src.port(), Proto::V5, |_| "in/q2".into(), 2, 100, 50, "s").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    bridge.kill();
    dst_proxy.unstall();
    bridge.restart();
    publish_numbered(src.port(), Proto::V5, |_| "in/q2".into(), 2, 150, 50, "s").await;
    let all = collector
        .wait_for(Duration::from_secs(15), |rx| {
            count_ids(rx, "s", 0..200).at_least_once()
        })
        .await;
    let count = count_ids(&collector.received(), "s", 0..200);
    let log = bridge.log();
    assert_alive(&mut bridge);
    assert!(
        all,
        "{count}; the restarted bridge:\n{}",
        last_lines(&log, 12)
    );
}

/// Bug 4, as chaos finds it: the bridge is SIGKILLed three times during 6,000 QoS 2 messages
/// (MQTT 5 on both sides, no proxy) and restarted each time. A crash may duplicate (SPEC 4.2: at
/// least once after a crash) but must not lose a message; before the fix 6 to 43 were lost per
/// run (see the deterministic reproduction above for why).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_across_bridge_kills_is_at_least_once() {
    const MESSAGES: u32 = 6_000;
    let started = Instant::now();
    // The stream outruns the bridge while it is away (kills, cuts, outages): with mosquitto's
    // default queue of 1,000 the source itself would drop the excess (#15: the spool). This test
    // is about what the bridge does, so the source's queue holds the whole backlog.
    let src = Mosquitto::start_with(MosquittoOpts::deep_queue()).await;
    // The recovered backlog reaches the test's subscriber on the target as one burst, faster
    // than it reads; mosquitto queues at most 1,000 for a subscriber that falls behind.
    let dst = Mosquitto::start_with(MosquittoOpts::deep_queue()).await;
    let collector = Collector::start(dst.port(), Proto::V5, "in/#", 2).await;
    let mut cfg = RouteConfig::new(src.port(), Proto::V5, dst.port(), Proto::V5);
    cfg.qos = 2;
    let mut bridge = start_ready(&cfg.toml(), 1).await;
    let port = src.port();
    let publisher = tokio::spawn(async move {
        publish_numbered(
            port,
            Proto::V5,
            |i| format!("in/{}", i % 16),
            2,
            0,
            MESSAGES,
            "k",
        )
        .await;
    });
    for kill in 1..=3 {
        let at = kill * MESSAGES as usize / 5;
        assert!(
            collector.wait_for_count(at, Duration::from_secs(30)).await,
            "stuck before kill {kill}:\n{}",
            last_lines(&bridge.log(), 12)
        );
        bridge.kill();
        bridge.restart();
    }
    publisher.await.expect("publisher");
    collector
        .wait_for_count(MESSAGES as usize, Duration::from_secs(20))
        .await;
    collector
        .settle(Duration::from_millis(1000), Duration::from_secs(5))
        .await;
    let received = collector.received();
    let count = count_ids(&received, "k", 0..MESSAGES);
    eprintln!(
        "QoS 2 across 3 bridge kills: {count}; {} ids duplicated; {:.1}s",
        duplicate_ids(&received, "k").len(),
        started.elapsed().as_secs_f64()
    );
    assert_alive(&mut bridge);
    assert!(
        count.at_least_once(),
        "lost: {count}\n{}",
        last_lines(&bridge.log(), 12)
    );
}

/// What mosquitto 2.0.11 does that bug 5 trips over (a broker behaviour, kept as a passing test
/// so a mosquitto upgrade that changes it shows up): a 3.1.1 subscriber receives a QoS 2 message,
/// answers PUBREC, gets PUBREL, and its connection drops before its PUBCOMP arrives; the next
/// connection dies right after its CONNECT; on the one after that mosquitto may send the PUBLISH
/// again (DUP) instead of the PUBREL the protocol asks for (MQTT-4.3.3: the sender "MUST NOT
/// re-send the PUBLISH once it has sent the corresponding PUBREL"). It depends on mosquitto
/// handling the dying connection's CONNECT before its reset, so the test tries up to 10 times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_resends_a_released_qos2_publish_after_a_connection_dies_at_connect() {
    let broker = Mosquitto::start().await;
    let mut seen = Vec::new();
    for attempt in 0..10 {
        let id = format!("q2quirk{}-{attempt}", std::process::id() % 100_000);
        let resent = resumed_qos2_exchange(broker.port(), &id).await;
        seen.push(resent);
        if resent == 0x3c {
            break;
        }
    }
    eprintln!("what mosquitto resent on each attempt: {seen:x?} (0x3c PUBLISH DUP, 0x62 PUBREL)");
    assert!(
        seen.contains(&0x3c),
        "mosquitto resent only PUBREL ({seen:x?}): has it been upgraded? Then bug 5's guard may go"
    );
}

/// One try at the sequence above with client id `id`: the first byte of what mosquitto sends
/// on the resumed session.
async fn resumed_qos2_exchange(port: u16, id: &str) -> u8 {
    use support::fake_broker::{PUBREC, ack, packet, parse_publish, spawn_reader, string};
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;

    let connect_packet = || {
        let mut body = string(b"MQTT");
        body.extend_from_slice(&[4, 0x00, 0, 60]); // 3.1.1, clean session 0, keep-alive 60 s
        body.extend_from_slice(&string(id.as_bytes()));
        packet(0x10, &body)
    };
    let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (read, mut write) = stream.into_split();
    let mut rx = spawn_reader(read);
    write.write_all(&connect_packet()).await.unwrap();
    assert_eq!(rx.recv().await.unwrap().0 >> 4, 2, "CONNACK");
    let mut subscribe = 1u16.to_be_bytes().to_vec();
    let filter = format!("q2/{id}");
    subscribe.extend_from_slice(&string(filter.as_bytes()));
    subscribe.push(2);
    write.write_all(&packet(0x82, &subscribe)).await.unwrap();
    assert_eq!(rx.recv().await.unwrap().0 >> 4, 9, "SUBACK");
    publish_one(port, Proto::V311, &filter, 2, false, "m").await;
    let (first, body) = rx.recv().await.unwrap();
    let (qos, pkid, _) = parse_publish(false, first, &body);
    assert_eq!((first >> 4, qos), (3, 2));
    write.write_all(&ack(PUBREC, pkid)).await.unwrap();
    assert_eq!(rx.recv().await.unwrap().0, 0x62, "PUBREL");
    drop((write, rx)); // no PUBCOMP
    tokio::time::sleep(Duration::from_millis(100)).await;

    // A connection that dies right after its CONNECT.
    let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (read, mut write) = stream.into_split();
    write.write_all(&connect_packet()).await.unwrap();
    let stream = write.reunite(read).unwrap();
    stream.set_zero_linger().unwrap();
    drop(stream);
    tokio::time::sleep(Duration::from_millis(100)).await;

    let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (read, mut write) = stream.into_split();
    let mut rx = spawn_reader(read);
    write.write_all(&connect_packet()).await.unwrap();
    let (_, connack) = rx.recv().await.unwrap();
    assert_eq!(connack[0], 1, "session present");
    let (first, body) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("mosquitto resumes the exchange")
        .unwrap();
    assert!(u16::from_be_bytes([body[0], body[1]]) == pkid || first == 0x3c);
    first
}

/// Bug 5 (fixed): a QoS 2 message whose exchange the bridge completed (PUBREC, PUBREL, PUBCOMP)
/// is forwarded a second time when the source sends its PUBLISH again with DUP and the same packet
/// id — which mosquitto 2.0.11 does after a connection dies right after CONNECT (see the test
/// above). The chaos test `qos2_with_connection_cuts_on_both_sides_is_exactly_once` hits it about
/// one run in ten (239 and 572 duplicates in two runs: every message that was at that point of
/// its exchange). The window forgets a source packet id at PUBREL, so the DUP PUBLISH looks new.
/// The fix (`Window::released`): remember, per source packet id, a digest of the last QoS 2 message completed under
/// it until a PUBLISH without DUP reuses the id; a DUP PUBLISH with that id and the same digest is
/// answered PUBREC without being forwarded.
///
/// Here a fake 3.1.1 source plays mosquitto's part: the exchange completes on the first
/// connection, then the second connection resends the PUBLISH with DUP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos2_publish_resent_after_its_exchange_completed_is_not_forwarded_again() {
    resent_after_completion(0).await;
}

/// Bug 5, second part (fixed): the resend may come after more than one connection. The chaos
/// tests cut the source's connections right after their CONNACK, several in a row, and mosquitto
/// resent the released PUBLISHes on the first connection that lasted: the bridge kept their
/// digests for the next connection only, and forwarded them again (269 and 680 duplicates, one
/// run in about 80). Now they are kept until a connection gets past the broker's resends. Here
/// the fake source accepts three connections (CONNACK, session present) and drops each as soon
/// as the bridge subscribes, then resends the PUBLISH with DUP on the fourth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_qos2_publish_resent_after_connections_that_died_at_once_is_not_forwarded_again()
{
    resent_after_completion(3).await;
}

/// A fake 3.1.1 source completes a QoS 2 exchange with the bridge (the PUBCOMP lost with the
/// connection), accepts `dying` connections and drops each once the bridge subscribed, then
/// sends the same PUBLISH again with DUP, as mosquitto does: it must reach the target once.
async fn resent_after_completion(dying: usize) {
    use support::fake_broker::{PUBREL, ack, connack, publish, spawn_reader, suback};
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let source_port = listener.local_addr().unwrap().port();
    let dst = Mosquitto::start().await;
    let collector = Collector::start(dst.port(), Proto::V5, "in/#", 2).await;
    let mut cfg = RouteConfig::new(source_port, Proto::V311, dst.port(), Proto::V5);
    // A scripted source, not a broker: it cannot route the share probe back.
    cfg.src_extra = "share_probe = false".into();
    cfg.qos = 2;
    let mut bridge = Bridge::start(&cfg.toml());
    let mut connection = 0;
    while connection < dying + 2 {
        let (stream, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .expect("the bridge connects")
            .unwrap();
        let (read, mut write) = stream.into_split();
        let mut rx = spawn_reader(read);
        let (first, connect) = rx.recv().await.unwrap();
        assert_eq!(first >> 4, 1, "CONNECT");
        if !connect.windows(4).any(|w| w == b"-r-0") {
            // The start's clean-up of index 1 (past the pool): no session here, nothing to do.
            write.write_all(&connack(false, false)).await.unwrap();
            continue;
        }
        write
            .write_all(&connack(false, connection > 0))
            .await
            .unwrap();
        let (first, subscribe) = rx.recv().await.unwrap();
        assert_eq!(first >> 4, 8, "SUBSCRIBE");
        write.write_all(&suback(false, &subscribe)).await.unwrap();
        connection += 1;
        if (2..dying + 2).contains(&connection) {
            // Taken (CONNACK, SUBACK) and gone before the broker resent anything.
            continue;
        }
        // The first connection: the message; the last: the same PUBLISH again, DUP, as
        // mosquitto resends it.
        let bytes = publish(false, 2, connection > 1, 7, b"in/q2", b"q2-0");
        write.write_all(&bytes).await.unwrap();
        let (first, _) = rx.recv().await.unwrap();
        assert_eq!(first >> 4, 5, "PUBREC");
        write.write_all(&ack(PUBREL, 7)).await.unwrap();
        let (first, _) = rx.recv().await.unwrap();
        assert_eq!(first >> 4, 7, "PUBCOMP");
        // The first connection ends as if the PUBCOMP had been lost with it.
    }
    collector
        .settle(Duration::from_millis(500), Duration::from_secs(5))
        .await;
    let count = count_ids(&collector.received(), "q2", 0..1);
    assert_alive(&mut bridge);
    assert!(count.exactly_once(), "{count}");
}
