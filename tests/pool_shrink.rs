//! A pool that gets smaller strands nothing (issue #14, hole 1; SPEC 4.1). Brokers keep delivering
//! to an offline member of a shared subscription whose session persists, so a pair that leaves
//! the pool must unsubscribe and end its session, and a process that starts with fewer pairs than
//! the last one ran must clean up the sessions of the indexes it no longer runs, forwarding what
//! they hold. The source brokers keep mosquitto's default queue (`max_queued_messages 1000`).

mod support;

use std::collections::BTreeSet;
use std::time::Duration;
use support::*;

const COUNT: u32 = 300;

fn ids(c: &Collector) -> BTreeSet<u32> {
    c.received()
        .iter()
        .filter_map(|r| r.payload_str().strip_prefix("m-")?.parse().ok())
        .collect()
}

async fn publish_and_count(src: &Mosquitto, proto: Proto, collector: &Collector, bridge: &Bridge) {
    publish_numbered(
        src.port(),
        proto,
        |i| format!("in/{}", i % 7),
        1,
        0,
        COUNT,
        "m",
    )
    .await;
    let all = collector
        .wait_for_count(COUNT as usize, Duration::from_secs(20))
        .await;
    let got = ids(collector);
    assert!(
        all && got.len() == COUNT as usize,
        "{} of {COUNT} arrived (missing e.g. {:?}); the bridge:\n{}",
        got.len(),
        (0..COUNT)
            .filter(|i| !got.contains(i))
            .take(10)
            .collect::<Vec<_>>(),
        bridge.log()
    );
}

async fn restart_smaller(src_proto: Proto) {
    let src = Mosquitto::start().await;
    let dst = Mosquitto::start().await;
    let collector = Collector::start(dst.port(), Proto::V5, "in/#", 1).await;
    let mut cfg = RouteConfig::new(src.port(), src_proto, dst.port(), Proto::V311);
    cfg.qos = 1;
    cfg.pool_size = 3;
    let mut bridge = start_ready(&cfg.toml(), 3).await;
    bridge.stop_cleanly().await;

    cfg.pool_size = 1;
    let bridge = start_ready(&cfg.toml(), 1).await;
    publish_and_count(&src, src_proto, &collector, &bridge).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_a_smaller_pool_strands_nothing_v311() {
    restart_smaller(Proto::V311).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_a_smaller_pool_strands_nothing_v5() {
    restart_smaller(Proto::V5).await;
}

/// The sessions left behind already hold messages when the smaller process starts: they are
/// forwarded, not lost with the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_queued_for_retired_indexes_are_forwarded_by_the_next_start() {
    let src = Mosquitto::start().await;
    let dst = Mosquitto::start().await;
    let collector = Collector::start(dst.port(), Proto::V5, "in/#", 1).await;
    let mut cfg = RouteConfig::new(src.port(), Proto::V5, dst.port(), Proto::V5);
    cfg.qos = 1;
    cfg.pool_size = 3;
    let mut bridge = start_ready(&cfg.toml(), 3).await;
    bridge.stop_cleanly().await;
    // Nobody connected: mosquitto queues a third for each of the three offline sessions.
    publish_numbered(
        src.port(),
        Proto::V5,
        |i| format!("in/{}", i % 7),
        1,
        0,
        COUNT,
        "m",
    )
    .await;
    cfg.pool_size = 1;
    let bridge = start_ready(&cfg.toml(), 1).await;
    let all = collector
        .wait_for_count(COUNT as usize, Duration::from_secs(20))
        .await;
    assert!(
        all,
        "{} of {COUNT} arrived; the bridge:\n{}",
        ids(&collector).len(),
        bridge.log()
    );
}

/// Pool 2 → 1 by SIGHUP: the route's old pool drains and the new one cleans up index 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_to_a_smaller_pool_strands_nothing() {
    let src = Mosquitto::start().await;
    let dst = Mosquitto::start().await;
    let collector = Collector::start(dst.port(), Proto::V5, "in/#", 1).await;
    let mut cfg = RouteConfig::new(src.port(), Proto::V311, dst.port(), Proto::V311);
    cfg.qos = 1;
    cfg.pool_size = 2;
    let bridge = start_ready(&cfg.toml(), 2).await;
    cfg.pool_size = 1;
    bridge.rewrite_config(&cfg.toml());
    bridge.hangup();
    wait_ready(&bridge, 1, 3).await;
    publish_and_count(&src, Proto::V311, &collector, &bridge).await;
    assert!(bridge.log().contains("retired index 1"), "{}", bridge.log());
}
