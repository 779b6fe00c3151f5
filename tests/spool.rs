//! The spool (issue #15, SPEC 4.9): with `spool = true` a route takes what its source sends while
//! the target is away, acknowledges it once it is on disk, and forwards it when the target is
//! back, so a source broker with its default queue (mosquitto: 1,000 messages per session)
//! loses nothing through an outage longer than that queue lasts.

mod support;

use std::time::Duration;
use support::*;

const RATE_PACE: Duration = Duration::from_millis(1); // 1,000 msg/s

/// A route from a source mosquitto with its default queue (`max_queued_messages` unset) to a
/// target the test stops for 10 s and starts again. The target keeps a deep queue for the
/// test's own subscriber only: the backlog reaches it as one burst, faster than it reads.
fn spooled_route(src: &Mosquitto, dst: &Mosquitto, admin: &str) -> RouteConfig {
    RouteConfig::spooled(src.port(), dst.port(), admin)
}

/// Waits until the bridge's `/metrics` at `admin` satisfies `ok`.
async fn wait_metrics(admin: &str, timeout: Duration, ok: impl Fn(&str) -> bool) -> bool {
    wait_until_async(timeout, || async {
        http_get(admin, "/metrics")
            .await
            .is_some_and(|(_, body)| ok(&body))
    })
    .await
}

/// A pool-1 spooled route whose target is stopped, and `n` numbered QoS 1 messages (`prefix`)
/// published on the source and taken into the spool. Returns the running bridge and its config.
async fn backlog_in_the_spool(
    src: &Mosquitto,
    dst: &mut Mosquitto,
    admin: &str,
    n: u32,
    prefix: &str,
) -> (Bridge, RouteConfig) {
    let mut cfg = spooled_route(src, dst, admin);
    cfg.pool_size = 1;
    let bridge = start_ready(&cfg.toml(), 1).await;
    dst.stop().await;
    publish_numbered(
        src.port(),
        Proto::V311,
        |i| format!("in/{i}"),
        1,
        0,
        n,
        prefix,
    )
    .await;
    let spooled = wait_metrics(admin, Duration::from_secs(20), |b| {
        metric(b, "mqbridge_spool_messages") >= f64::from(n)
    })
    .await;
    assert!(spooled, "{}", bridge.log());
    (bridge, cfg)
}

async fn outage(count: u32, kill_bridge_during_it: bool) {
    let src = Mosquitto::start().await;
    let mut dst = Mosquitto::start_with(MosquittoOpts {
        persistence: true,
        ..MosquittoOpts::deep_queue()
    })
    .await;
    let collector =
        Collector::start_persistent(dst.port(), Proto::V5, "spool-collector", &[("in/#", 1)]).await;
    let admin = format!("127.0.0.1:{}", free_port());
    let cfg = spooled_route(&src, &dst, &admin);
    let mut bridge = start_ready(&cfg.toml(), 2).await;
    let port = src.port();
    let publisher = tokio::spawn(async move {
        publish_numbered_paced(
            port,
            Proto::V311,
            |i| format!("in/{}", i % 10),
            1,
            0,
            count,
            "s",
            RATE_PACE,
        )
        .await
    });
    assert!(
        collector.wait_for_count(500, Duration::from_secs(30)).await,
        "{}",
        bridge.log()
    );
    dst.stop().await;
    // The outage itself, not a wait for a condition: 10 s at 1,000 msg/s is ten times what
    // the source's default queue holds.
    if kill_bridge_during_it {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let spooled = http_get(&admin, "/metrics")
            .await
            .map(|(_, body)| metric(&body, "mqbridge_spool_messages"))
            .unwrap_or(0.0);
        assert!(spooled > 0.0, "the spool took the backlog");
        bridge.kill();
        tokio::time::sleep(Duration::from_millis(500)).await;
        bridge.restart();
        tokio::time::sleep(Duration::from_millis(4500)).await;
    } else {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let body = http_get(&admin, "/metrics").await.expect("/metrics").1;
        assert!(
            metric(&body, "mqbridge_spool_messages") > 1000.0,
            "the spool holds the outage's messages:\n{body}"
        );
        let ready = http_get(&admin, "/readyz").await.map(|(code, _)| code);
        assert_eq!(ready, Some(200), "ready while the spool absorbs the outage");
    }
    dst.restart().await;
    publisher.await.unwrap();
    let all = collector
        .wait_for(Duration::from_secs(60), |rx| {
            count_ids(rx, "s", 0..count).missing.is_empty()
        })
        .await;
    let got = count_ids(&collector.received(), "s", 0..count);
    assert!(all, "{got}\n{}", bridge.log());
    eprintln!("through a 10 s outage with a spool: {got}");
    let body = http_get(&admin, "/metrics").await.expect("/metrics").1;
    assert_eq!(
        metric(&body, "mqbridge_messages_dropped_total"),
        0.0,
        "{body}"
    );
    assert!(
        bridge
            .stop(Duration::from_secs(15))
            .await
            .is_some_and(|s| s.success())
    );
}

/// QoS 1 at 1,000 msg/s, the target down for 10 s: every message arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_10s_target_outage_loses_nothing_with_the_sources_default_queue() {
    outage(15_000, false).await;
}

/// The same, with the bridge SIGKILLed in the middle of the outage and started again within a
/// second: what it had acknowledged to the source was on disk, and is forwarded after the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_killed_during_the_outage_loses_nothing_it_spooled() {
    outage(15_000, true).await;
}

/// QoS 0 through an outage: without a spool a pair drops QoS 0 while its target is down
/// (counted `target_down_qos0`); with one, every QoS 0 message the bridge read arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos0_rides_out_an_outage_in_the_spool() {
    const N: u32 = 3000;
    let src = Mosquitto::start().await;
    let mut dst = Mosquitto::start_with(MosquittoOpts {
        persistence: true,
        ..MosquittoOpts::deep_queue()
    })
    .await;
    let collector =
        Collector::start_persistent(dst.port(), Proto::V5, "spool-q0", &[("in/#", 0)]).await;
    let admin = format!("127.0.0.1:{}", free_port());
    let mut cfg = spooled_route(&src, &dst, &admin);
    cfg.qos = 0;
    cfg.pool_size = 1;
    let mut bridge = start_ready(&cfg.toml(), 1).await;
    dst.stop().await;
    publish_numbered_paced(
        src.port(),
        Proto::V311,
        |i| format!("in/{}", i % 10),
        0,
        0,
        N,
        "q",
        Duration::from_micros(500),
    )
    .await;
    let read = wait_metrics(&admin, Duration::from_secs(20), |b| {
        metric(b, "mqbridge_spool_messages") >= f64::from(N)
    })
    .await;
    assert!(read, "the spool took every message read:\n{}", bridge.log());
    dst.restart().await;
    let all = collector
        .wait_for(Duration::from_secs(30), |rx| {
            count_ids(rx, "q", 0..N).missing.is_empty()
        })
        .await;
    let got = count_ids(&collector.received(), "q", 0..N);
    assert!(all, "{got}\n{}", bridge.log());
    let body = http_get(&admin, "/metrics").await.expect("/metrics").1;
    assert_eq!(
        metric(&body, "mqbridge_messages_received_total"),
        f64::from(N)
    );
    assert_eq!(
        metric(&body, "mqbridge_messages_dropped_total"),
        0.0,
        "{body}"
    );
    bridge.stop_cleanly().await;
}

/// A spool too small for the outage: it fills, the route stops reading its source and says so
/// (`mqbridge_spool_full` 1, `/readyz` 503 naming it), and mqbridge drops nothing; what the
/// source broker then does with its own queue is the source's (mosquitto drops beyond 1,000).
/// When the target is back, the spool drains and reading resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_stops_reading_and_drops_nothing() {
    const N: u32 = 1500;
    let src = Mosquitto::start().await;
    let mut dst = Mosquitto::start_with(MosquittoOpts {
        persistence: true,
        ..MosquittoOpts::deep_queue()
    })
    .await;
    let collector =
        Collector::start_persistent(dst.port(), Proto::V5, "spool-full", &[("in/#", 1)]).await;
    let admin = format!("127.0.0.1:{}", free_port());
    let mut cfg = spooled_route(&src, &dst, &admin);
    cfg.pool_size = 1;
    cfg.tail = format!(
        "[spool]\ndir = \"spool\"\nmax_bytes = \"1MiB\"\n\n[admin]\nlisten = \"{admin}\"\n"
    );
    let mut bridge = start_ready(&cfg.toml(), 1).await;
    dst.stop().await;
    let mut p = Publisher::connect(src.port(), Proto::V311).await;
    for i in 0..N {
        p.publish(
            &format!("in/{}", i % 10),
            1,
            false,
            padded_payload("f", i, 2048),
        )
        .await;
    }
    let full = wait_metrics(&admin, Duration::from_secs(20), |b| {
        metric(b, "mqbridge_spool_full") == 1.0
    })
    .await;
    assert!(full, "{}", bridge.log());
    let (code, body) = http_get(&admin, "/readyz").await.expect("/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("spool full"), "{body}");
    let metrics = http_get(&admin, "/metrics").await.expect("/metrics").1;
    let spooled = metric(&metrics, "mqbridge_spool_messages");
    assert!(
        spooled > 100.0 && spooled < f64::from(N),
        "{spooled} spooled"
    );
    assert_eq!(metric(&metrics, "mqbridge_messages_dropped_total"), 0.0);
    dst.restart().await;
    // Everything the bridge took arrives, and the route reads again once there is room.
    let drained = wait_metrics(&admin, Duration::from_secs(30), |b| {
        metric(b, "mqbridge_spool_full") == 0.0
    })
    .await;
    assert!(drained, "{}", bridge.log());
    let taken = wait_metrics(&admin, Duration::from_secs(30), |b| {
        metric(b, "mqbridge_messages_forwarded_total")
            == metric(b, "mqbridge_messages_received_total")
            && metric(b, "mqbridge_spool_messages") == 0.0
    })
    .await;
    let metrics = http_get(&admin, "/metrics").await.expect("/metrics").1;
    assert!(taken, "{metrics}");
    let received = metric(&metrics, "mqbridge_messages_received_total") as usize;
    assert!(
        collector
            .wait_for_count(received, Duration::from_secs(20))
            .await,
        "{} of {received} taken arrived",
        collector.count()
    );
    assert_eq!(metric(&metrics, "mqbridge_messages_dropped_total"), 0.0);
    p.disconnect().await;
    bridge.stop_cleanly().await;
}

/// A spool that holds messages and whose route is gone from the config (renamed here) stops
/// the start with exit 2, naming the directory; a second process on a running bridge's spool
/// does too. Started again as it was, the bridge forwards what the spool held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_that_would_be_orphaned_or_shared_stops_the_start() {
    const N: u32 = 200;
    let src = Mosquitto::start().await;
    let mut dst = Mosquitto::start().await;
    let admin = format!("127.0.0.1:{}", free_port());
    let (mut bridge, cfg) = backlog_in_the_spool(&src, &mut dst, &admin, N, "o").await;

    // A second process with the same spool directory and instance: refused before any pair
    // starts (it would otherwise also take the first one's broker sessions).
    let mut second_cfg = spooled_route(&src, &dst, &format!("127.0.0.1:{}", free_port()));
    second_cfg.pool_size = 1;
    second_cfg.tail = format!(
        "[spool]\ndir = \"{}\"\n",
        bridge.dir().join("spool").display()
    );
    let mut second = Bridge::start(&second_cfg.toml());
    let status = second.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{}", second.log());
    assert!(
        second.log().contains("in use by another process"),
        "{}",
        second.log()
    );
    assert!(
        bridge
            .stop(Duration::from_secs(15))
            .await
            .is_some_and(|s| s.success()),
        "{}",
        bridge.log()
    );

    let renamed = cfg.toml().replace("name = \"r\"", "name = \"r2\"");
    bridge.rewrite_config(&renamed);
    bridge.restart();
    let status = bridge.wait_exit(Duration::from_secs(10)).await;
    let log = bridge.log();
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{log}");
    assert!(
        log.contains("holds 200 messages") && log.contains("spool/test/"),
        "{log}"
    );

    dst.restart().await;
    let collector = Collector::start(dst.port(), Proto::V5, "in/#", 1).await;
    bridge.rewrite_config(&cfg.toml());
    bridge.restart();
    let all = collector
        .wait_for(Duration::from_secs(20), |rx| {
            count_ids(rx, "o", 0..N).missing.is_empty()
        })
        .await;
    assert!(
        all,
        "{}\n{}",
        count_ids(&collector.received(), "o", 0..N),
        bridge.log()
    );
    bridge.stop_cleanly().await;
}

/// A pool made smaller while pair 1's spool holds messages: the start retires index 1 with its
/// spool (forwards the backlog, then ends), instead of refusing or leaving it on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_smaller_pool_forwards_the_spool_of_the_pair_it_no_longer_runs() {
    const N: u32 = 400;
    let src = Mosquitto::start().await;
    let mut dst = Mosquitto::start().await;
    let admin = format!("127.0.0.1:{}", free_port());
    let cfg = spooled_route(&src, &dst, &admin); // pool 2
    let mut bridge = start_ready(&cfg.toml(), 2).await;
    dst.stop().await;
    publish_numbered(src.port(), Proto::V311, |i| format!("in/{i}"), 1, 0, N, "p").await;
    let spooled = wait_metrics(&admin, Duration::from_secs(20), |b| {
        metric(b, "mqbridge_spool_messages") >= f64::from(N)
    })
    .await;
    assert!(spooled, "{}", bridge.log());
    bridge.stop_cleanly().await;
    let pair1 = bridge.dir().join(format!("spool/test/t{}/r/1", src.port()));
    let held = |dir: &std::path::Path| -> u64 {
        std::fs::read_dir(dir)
            .map(|es| {
                es.flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "seg"))
                    .map(|e| e.metadata().map_or(0, |m| m.len()))
                    .sum()
            })
            .unwrap_or(0)
    };
    assert!(
        held(&pair1) > 0,
        "the shared subscription gave pair 1 a share"
    );

    dst.restart().await;
    let collector = Collector::start(dst.port(), Proto::V5, "in/#", 1).await;
    let mut smaller = cfg.clone();
    smaller.pool_size = 1;
    bridge.rewrite_config(&smaller.toml());
    bridge.restart();
    let all = collector
        .wait_for(Duration::from_secs(30), |rx| {
            count_ids(rx, "p", 0..N).missing.is_empty()
        })
        .await;
    assert!(
        all,
        "{}\n{}",
        count_ids(&collector.received(), "p", 0..N),
        bridge.log()
    );
    let emptied = wait_metrics(&admin, Duration::from_secs(10), |b| {
        metric(b, "mqbridge_spool_messages") == 0.0
    })
    .await;
    assert!(emptied, "{}", bridge.log());
    assert!(
        bridge
            .log()
            .contains("its spool holds messages: forwarding them before it retires"),
        "{}",
        bridge.log()
    );
    assert_eq!(
        held(&pair1),
        0,
        "index 1's spool is empty: its segments went"
    );
    bridge.stop_cleanly().await;
}

/// `spool.max_age`: messages that waited in the spool longer (the target away for longer) are
/// dead-lettered on the source and counted, not forwarded; later ones are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spooled_messages_past_max_age_are_dead_lettered_not_forwarded() {
    const N: u32 = 50;
    let src = Mosquitto::start().await;
    let mut dst = Mosquitto::start().await;
    let admin = format!("127.0.0.1:{}", free_port());
    let mut cfg = spooled_route(&src, &dst, &admin);
    cfg.pool_size = 1;
    cfg.route_extra = "spool = true\ndead_letter = \"dl/r\"".into();
    cfg.tail = cfg
        .tail
        .replace("dir = \"spool\"", "dir = \"spool\"\nmax_age = \"2s\"");
    let bridge = start_ready(&cfg.toml(), 1).await;
    let letters = Collector::start(src.port(), Proto::V5, "dl/r", 1).await;
    dst.stop().await;
    publish_numbered(src.port(), Proto::V311, |i| format!("in/{i}"), 1, 0, N, "a").await;
    let spooled = wait_metrics(&admin, Duration::from_secs(20), |b| {
        metric(b, "mqbridge_spool_messages") >= f64::from(N)
    })
    .await;
    assert!(spooled, "{}", bridge.log());
    // Older than max_age by the time the target is back.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    dst.restart().await;
    let collector = Collector::start(dst.port(), Proto::V5, "in/#", 1).await;
    let max_age_drops = |b: &str| -> f64 {
        b.lines()
            .filter(|l| {
                l.starts_with("mqbridge_messages_dropped_total{")
                    && l.contains("reason=\"max_age\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let counted = wait_metrics(&admin, Duration::from_secs(20), |b| {
        max_age_drops(b) >= f64::from(N) && metric(b, "mqbridge_spool_messages") == 0.0
    })
    .await;
    assert!(counted, "{}", bridge.log());
    assert!(
        letters
            .wait_for_count(N as usize, Duration::from_secs(10))
            .await,
        "{} dead letters\n{}",
        letters.received().len(),
        bridge.log()
    );
    // Fresh messages go through once the target is back; none of the old ones did.
    let target_up = wait_metrics(&admin, Duration::from_secs(20), |b| {
        b.lines().any(|l| {
            l.starts_with("mqbridge_connections_up{")
                && l.contains("broker=\"dst\"")
                && l.ends_with(" 1")
        })
    })
    .await;
    assert!(target_up, "{}", bridge.log());
    publish_numbered(
        src.port(),
        Proto::V311,
        |i| format!("in/{i}"),
        1,
        0,
        10,
        "b",
    )
    .await;
    assert!(
        collector
            .wait_for(Duration::from_secs(10), |rx| count_ids(rx, "b", 0..10)
                .missing
                .is_empty())
            .await,
        "{}",
        bridge.log()
    );
    let old = count_ids(&collector.received(), "a", 0..N);
    assert_eq!(
        old.missing.len(),
        N as usize,
        "none past max_age forwarded: {old}"
    );
    drop(bridge);
}

/// A spool damaged while the bridge was down (a byte flipped in one record, the last record cut
/// short as a crash mid-write leaves it): the start skips exactly those two, counts them, and
/// forwards every other message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_spool_loses_only_the_damaged_records() {
    const N: u32 = 300;
    let src = Mosquitto::start().await;
    let mut dst = Mosquitto::start().await;
    let admin = format!("127.0.0.1:{}", free_port());
    let (mut bridge, _) = backlog_in_the_spool(&src, &mut dst, &admin, N, "d").await;
    bridge.stop_cleanly().await;

    let pair_dir = bridge.dir().join(format!("spool/test/t{}/r/0", src.port()));
    let segment = std::fs::read_dir(&pair_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "seg"))
        .expect("a segment");
    let mut data = std::fs::read(&segment).unwrap();
    let middle = data.len() / 2;
    data[middle] ^= 0x5a;
    data.truncate(data.len() - 5);
    std::fs::write(&segment, &data).unwrap();

    dst.restart().await;
    let collector = Collector::start(dst.port(), Proto::V5, "in/#", 1).await;
    bridge.restart();
    let got = collector
        .wait_for(Duration::from_secs(20), |rx| {
            count_ids(rx, "d", 0..N).missing.len() <= 2
        })
        .await;
    collector
        .settle(Duration::from_millis(500), Duration::from_secs(3))
        .await;
    let count = count_ids(&collector.received(), "d", 0..N);
    assert!(got, "{count}\n{}", bridge.log());
    assert_eq!(
        count.missing.len(),
        2,
        "exactly the two damaged records: {count}"
    );
    assert!(
        count.missing.contains(&(N - 1)),
        "the torn last one: {count}"
    );
    let body = http_get(&admin, "/metrics").await.expect("/metrics").1;
    assert_eq!(
        metric(&body, "mqbridge_spool_damaged_records_total"),
        2.0,
        "{body}"
    );
    assert!(
        bridge.log().contains("damaged records found"),
        "{}",
        bridge.log()
    );
    bridge.stop_cleanly().await;
}
