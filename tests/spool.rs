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
    let mut cfg = RouteConfig::new(src.port(), Proto::V311, dst.port(), Proto::V5);
    cfg.pool_size = 2;
    cfg.qos = 1;
    cfg.route_extra = "spool = true".into();
    cfg.tail = format!("[spool]\ndir = \"spool\"\n\n[admin]\nlisten = \"{admin}\"\n");
    cfg
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
