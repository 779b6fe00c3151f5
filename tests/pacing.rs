//! A pair stays within its target's per-connection quota by pacing (SPEC 4.1): it never sends
//! more than `max_publish_rate` PUBLISH in any second, loses nothing, and says in
//! its log, once for the route, that the offered load is above the route's capacity.

mod support;

use std::time::Duration;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_are_paced_to_the_targets_max_publish_rate() {
    const RATE: usize = 100;
    let src = Mosquitto::start().await;
    let dst = Mosquitto::start().await;
    let mut cfg = RouteConfig::new(src.port(), Proto::V311, dst.port(), Proto::V311);
    cfg.qos = 1;
    cfg.dst_extra = format!("max_publish_rate = {RATE}\n");
    let admin = format!("127.0.0.1:{}", free_port());
    cfg.tail = format!("[admin]\nlisten = \"{admin}\"\n");
    let collector = Collector::start(dst.port(), Proto::V5, "in/#", 1).await;
    let mut bridge = start_ready(&cfg.toml(), 1).await;
    publish_numbered(
        src.port(),
        Proto::V311,
        |i| format!("in/{}", i % 4),
        1,
        0,
        400,
        "p",
    )
    .await;
    assert!(
        collector.wait_for_count(400, Duration::from_secs(30)).await,
        "{}",
        collector.count()
    );
    let rx = collector.received();
    assert_exactly_once(&rx, "p", 0..400);
    // No one-second window holds more than the rate (BifroMQ counts per second of its clock
    // and discards the rest); a little more at the subscriber, where mosquitto may bunch them.
    let times: Vec<_> = rx.iter().map(|r| r.at).collect();
    let most = times
        .iter()
        .map(|start| {
            times
                .iter()
                .filter(|t| **t >= *start && **t < *start + Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap();
    assert!(
        most <= RATE + RATE / 10,
        "{most} messages within one second at {RATE}/s"
    );
    let span = *times.last().unwrap() - times[0];
    assert!(
        span >= Duration::from_millis(2800),
        "400 messages at {RATE}/s after a burst of {RATE} take ≥ 3 s, took {span:?}"
    );
    // Said once for the route, by the route, naming the limit and what to do.
    let log = bridge.log();
    assert_eq!(
        log.matches("per-connection limit (100 PUBLISH/s)").count(),
        1,
        "{log}"
    );
    assert!(
        log.contains("pool_size = \"auto\" would add pairs"),
        "{log}"
    );
    // Held back again and again (at least once in each second beyond the first).
    let body = http_get(&admin, "/metrics").await.expect("/metrics").1;
    let paced = metric(&body, "mqbridge_paced_total");
    assert!(paced >= 3.0, "paced {paced} times:\n{body}");
    assert!(
        bridge
            .stop(Duration::from_secs(10))
            .await
            .is_some_and(|s| s.success())
    );
}

/// A source allowing 64 KiB/s per connection is read no faster: 48 messages of 4 KiB (192 KiB)
/// take at least two seconds after the first second's burst, and all arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_reads_are_paced_to_its_bandwidth_limit() {
    let src = Mosquitto::start().await;
    let dst = Mosquitto::start().await;
    let mut cfg = RouteConfig::new(src.port(), Proto::V311, dst.port(), Proto::V311);
    cfg.qos = 1;
    cfg.src_extra = "bandwidth_limit = \"64KiB/s\"\n".into();
    let collector = Collector::start(dst.port(), Proto::V5, "in/#", 1).await;
    let mut bridge = start_ready(&cfg.toml(), 1).await;
    let mut p = Publisher::connect(src.port(), Proto::V311).await;
    for i in 0..48u32 {
        p.publish("in/big", 1, false, padded_payload("b", i, 4096))
            .await;
    }
    assert!(p.wait_acked(Duration::from_secs(20)).await);
    assert!(
        collector.wait_for_count(48, Duration::from_secs(30)).await,
        "{}",
        collector.count()
    );
    let rx = collector.received();
    assert_exactly_once(&rx, "b", 0..48);
    let span = rx.last().unwrap().at - rx[0].at;
    assert!(
        span >= Duration::from_millis(1800),
        "192 KiB at 64 KiB/s after a 64 KiB burst took {span:?}"
    );
    p.disconnect().await;
    assert!(
        bridge
            .stop(Duration::from_secs(10))
            .await
            .is_some_and(|s| s.success())
    );
}

/// `pool_size = "auto"`: with a target taking at most 200 PUBLISH/s per connection, an offered
/// 1,000 msg/s is carried without loss by growing the pool, which shrinks back when the load
/// stops; parked pairs unsubscribe first, so nothing is stranded in their sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_pool_grows_to_carry_the_load_and_shrinks_when_it_stops() {
    const N: u32 = 3000;
    let src = Mosquitto::start_with(MosquittoOpts {
        max_inflight_messages: Some(100),
        ..Default::default()
    })
    .await;
    let dst = Mosquitto::start().await;
    let mut cfg = RouteConfig::new(src.port(), Proto::V311, dst.port(), Proto::V311);
    cfg.qos = 1;
    cfg.pool_size = 1;
    // Two pairs to start: a step from nothing to 1,000 msg/s gives a lone pair's session at
    // the source 1,000 messages in the first second and 500 more in the next while it sends
    // 200 a second, past mosquitto's default queue of 1,000 before the pool has doubled twice
    // (measured: 40 of 3,000 dropped by mosquitto). Two pairs take the step.
    cfg.route_extra = "pool_size = \"auto\"\npool_size_min = 2\npool_size_max = 8".into();
    cfg.dst_extra = "max_publish_rate = 200\n".into();
    let toml = cfg.toml().replace("pool_size = 1\n", "");
    let collector = Collector::start(dst.port(), Proto::V5, "in/#", 1).await;
    let mut bridge = start_ready(&toml, 2).await;
    publish_numbered_paced(
        src.port(),
        Proto::V311,
        |i| format!("in/{}", i % 8),
        1,
        0,
        N,
        "a",
        Duration::from_millis(1),
    )
    .await;
    assert!(
        collector
            .wait_for_count(N as usize, Duration::from_secs(60))
            .await,
        "{} of {N}\n{}",
        collector.count(),
        bridge.log()
    );
    assert_at_least_once(&collector.received(), "a", 0..N);
    let log = bridge.log();
    let resized: String = log
        .lines()
        .filter(|l| l.contains("pool resized"))
        .map(|l| format!("{l}\n"))
        .collect();
    let most = largest_after(&resized, " pairs=").unwrap_or(1);
    assert!(
        most >= 5,
        "1,000 msg/s at 200/s per pair needs ≥ 5 pairs; grew to {most}\n{log}"
    );
    let shrunk = wait_until(Duration::from_secs(40), || {
        bridge
            .log()
            .lines()
            .rev()
            .find(|l| l.contains("pool resized"))
            .is_some_and(|l| l.contains(" pairs=2 "))
    })
    .await;
    assert!(shrunk, "{}", bridge.log());
    assert!(bridge.log().contains("pair parked"));
    assert!(
        bridge
            .stop(Duration::from_secs(15))
            .await
            .is_some_and(|s| s.success())
    );
}
