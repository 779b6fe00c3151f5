//! Bridge bugs found by the chaos and hostile-broker work (issue #7), each as the smallest test
//! that shows it: regression tests for the fixed ones, `#[ignore]`d reproductions for the open
//! ones (run them with `cargo test --release --test found_bugs -- --ignored`; drop the `ignore`
//! when one passes).
//!
//! Bugs 1-3 (fixed in e8119b0) had one shape: one message the pair could not get past, and a
//! connection re-established and failing again on it forever, so nothing behind it on that pair
//! moved. Bug 4 (open) loses QoS 2 messages after a crash.

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

/// Bug 4 (open): QoS 2 after a bridge crash loses messages. When the bridge dies, the target broker's
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
/// the redelivered and new messages into a full quota. Expected: everything arrives (at least
/// once). Ways out, for whoever fixes it: on a resumed target session that the window does not
/// know (first connection of a process), release whatever it may hold — e.g. PUBREL every packet
/// id the previous process could have used (the broker answers PUBCOMP, or 0x92 for an unknown
/// id), before publishing; and treat 0x97 as back-pressure to retry, not as a refusal.
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
/// least once after a crash) but must not lose a message; here 6 to 43 are lost per run (see
/// the deterministic reproduction above for why).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_across_bridge_kills_is_at_least_once() {
    const MESSAGES: u32 = 6_000;
    let started = Instant::now();
    let src = Mosquitto::start().await;
    let dst = Mosquitto::start().await;
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
