//! A route across a long link (issue #17): a QoS 1 pair carries at most window / round trip, so
//! `pool_size = "auto"` must add pairs while the windows are full and acks come back at the round
//! trip's pace, and give them back when the traffic ends, without stranding a message. The
//! source keeps mosquitto's default queue (1,000): the publisher's rate is chosen so that the
//! backlog stays under it while the pool grows.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;
use support::*;

const COUNT: u32 = 2000;

/// A source, a target 50 ms away each way behind a proxy, and a QoS 1 route between them with
/// a window of 20: one pair carries at most 20 / 100 ms = 200 msg/s.
async fn long_link() -> (Mosquitto, Mosquitto, Proxy, RouteConfig) {
    let src = Mosquitto::start().await;
    let dst = Mosquitto::start().await;
    let link = Proxy::start(dst.port()).await;
    link.latency(Duration::from_millis(50));
    let mut cfg = RouteConfig::new(src.port(), Proto::V311, link.port(), Proto::V311);
    cfg.qos = 1;
    cfg.dst_extra = "max_inflight = 20\n".into();
    (src, dst, link, cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_grows_on_a_window_bound_route_and_shrinks_back_stranding_nothing() {
    let (src, dst, _link, mut cfg) = long_link().await;
    cfg.route_extra = "pool_size = \"auto\"\npool_size_min = 1\npool_size_max = 4".into();
    let collector = Collector::start(dst.port(), Proto::V311, "in/#", 1).await;
    let bridge = start_ready(&cfg.toml().replace("pool_size = 1\n", ""), 1).await;

    // About 250 msg/s (one every 4 ms): more than one pair carries, less than two.
    publish_numbered_paced(
        src.port(),
        Proto::V311,
        |i| format!("in/{}", i % 5),
        1,
        0,
        COUNT,
        "w",
        Duration::from_millis(4),
    )
    .await;
    let all = collector
        .wait_for_count(COUNT as usize, Duration::from_secs(30))
        .await;
    let ids: BTreeSet<u32> = collector
        .received()
        .iter()
        .filter_map(|r| r.payload_str().strip_prefix("w-")?.parse().ok())
        .collect();
    let log = bridge.log();
    assert!(all, "{} of {COUNT} arrived:\n{log}", ids.len());
    assert_eq!(ids.len(), COUNT as usize, "every message, once or more");
    let grew = log
        .lines()
        .find(|l| l.contains("pool resized: window-bound"))
        .unwrap_or_else(|| panic!("the pool never grew on its windows:\n{log}"));
    assert!(grew.contains("pairs=2 was=1"), "{grew}");

    // The traffic is over: the pool gives its pairs back (after 10 idle seconds, one every 2 s)
    // and what the parked pairs' sessions held still arrives (nothing more was published).
    let shrunk = |log: &str| {
        log.lines()
            .any(|l| l.contains("pool resized: no traffic") && l.contains("pairs=1 was=2"))
    };
    let back = wait_until(Duration::from_secs(40), || shrunk(&bridge.log())).await;
    assert!(back, "{}", bridge.log());
    let after: BTreeSet<u32> = collector
        .received()
        .iter()
        .filter_map(|r| r.payload_str().strip_prefix("w-")?.parse().ok())
        .collect();
    assert_eq!(after.len(), COUNT as usize);
}

/// A fixed pool on the same link says what limits it, in figures, and what would help.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_pool_limited_by_its_window_says_so_with_the_round_trip() {
    let (src, dst, _link, mut cfg) = long_link().await;
    let admin = format!("127.0.0.1:{}", free_port());
    cfg.tail = format!("[admin]\nlisten = \"{admin}\"\n");
    let collector = Collector::start(dst.port(), Proto::V311, "in/#", 1).await;
    let bridge = start_ready(&cfg.toml(), 1).await;
    // Idle first: the keep-alive PINGREQ (at 3/4 of 5 s) measures the path, 100 ms and a bit.
    let measured = wait_until_async(Duration::from_secs(10), || async {
        let body = http_get(&admin, "/metrics")
            .await
            .map(|r| r.1)
            .unwrap_or_default();
        body.contains("mqbridge_target_round_trip_microseconds")
            && metric(&body, "mqbridge_target_round_trip_microseconds") > 0.0
    })
    .await;
    assert!(measured, "no round trip measured:\n{}", bridge.log());
    let body = http_get(&admin, "/metrics").await.unwrap().1;
    let rtt_us = metric(&body, "mqbridge_target_round_trip_microseconds");
    assert!((100_000.0..150_000.0).contains(&rtt_us), "{rtt_us} µs");
    // 250 msg/s for 12 s against 200 msg/s: the source's backlog stays under its 1,000.
    let count = 3000;
    publish_numbered_paced(
        src.port(),
        Proto::V311,
        |i| format!("in/{}", i % 5),
        1,
        0,
        count,
        "f",
        Duration::from_millis(4),
    )
    .await;
    let needle = "route r is limited by the target's window: 20 in flight per pair";
    let said = bridge.wait_log(needle, Duration::from_secs(20)).await;
    let log = bridge.log();
    assert!(said, "{log}");
    let line = log.lines().find(|l| l.contains(needle)).unwrap();
    eprintln!("{line}");
    assert!(
        line.contains("pool_size = \"auto\" would add pairs"),
        "{line}"
    );
    // The round trip is 100 ms plus the brokers' own time: "acknowledged every 1xx ms", set
    // against the path's as the idle ping measured it.
    assert!(line.contains("acknowledged every 1"), "{line}");
    assert!(
        line.contains("round trip") && line.contains("(PINGREQ while idle)"),
        "{line}"
    );
    assert!(
        collector
            .wait_for_count(count as usize, Duration::from_secs(30))
            .await,
        "{}",
        collector.count()
    );
}
