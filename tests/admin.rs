//! The admin endpoint of a running bridge (SPEC 5): `/metrics` counts what flowed, `/healthz`
//! answers while the process runs, `/readyz` follows the pairs' connections and stalls.

mod support;

use std::time::Duration;
use support::*;

/// The series SPEC 5 promises, as they appear in the exposition.
const SERIES: [&str; 9] = [
    "mqbridge_messages_received_total{",
    "mqbridge_messages_forwarded_total{",
    "mqbridge_messages_dropped_total{",
    "mqbridge_bytes_forwarded_total{",
    "mqbridge_inflight{",
    "mqbridge_window{",
    "mqbridge_connections_up{",
    "mqbridge_reconnects_total{",
    "mqbridge_forward_latency_seconds_bucket{",
];

/// A one-route config (`r`: `in/#` from `src` to `dst`) with the admin endpoint on a free port.
fn config(src: &Mosquitto, dst: &Mosquitto, pool_size: usize) -> (RouteConfig, String) {
    let admin = format!("127.0.0.1:{}", free_port());
    let mut cfg = RouteConfig::new(src.port(), Proto::V5, dst.port(), Proto::V5);
    cfg.pool_size = pool_size;
    cfg.qos = 1;
    // `tail` lands after the `[[routes]]` keys: a table header there starts a new table.
    cfg.tail = format!("\n[admin]\nlisten = \"{admin}\"\n");
    (cfg, admin)
}

/// The value of the sample whose series (name and labels) is exactly `series`.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let (s, v) = l.rsplit_once(' ')?;
        (s == series).then(|| v.parse().ok())?
    })
}

async fn get(addr: &str, path: &str) -> (u16, String) {
    http_get(addr, path)
        .await
        .unwrap_or_else(|| panic!("no answer from http://{addr}{path}"))
}

/// Waits until `/readyz` answers `status` with a body containing `needle`; the last answer.
async fn wait_readyz(addr: &str, status: u16, needle: &str, timeout: Duration) -> (u16, String) {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = (0, String::new());
    let ok = loop {
        if let Some(answer) = http_get(addr, "/readyz").await {
            last = answer;
        }
        if last.0 == status && last.1.contains(needle) {
            break true;
        }
        if tokio::time::Instant::now() >= deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        ok,
        "/readyz did not answer {status} with {needle:?}; last: {} {}",
        last.0, last.1
    );
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_the_traffic_and_readiness_follows_the_target() {
    let src = Mosquitto::start().await;
    let mut dst = Mosquitto::start().await;
    let (cfg, admin) = config(&src, &dst, 2);
    let collector = Collector::start(dst.port(), Proto::V5, "in/#", 1).await;
    let mut bridge = start_ready(&cfg.toml(), 2).await;

    wait_readyz(&admin, 200, "ready: 2 pairs", Duration::from_secs(10)).await;
    assert_eq!(get(&admin, "/healthz").await.0, 200);

    publish_numbered(
        src.port(),
        Proto::V5,
        |i| format!("in/{}", i % 10),
        1,
        0,
        500,
        "m",
    )
    .await;
    assert!(
        collector.wait_for_count(500, Duration::from_secs(20)).await,
        "{}",
        bridge.log()
    );
    drop(collector);

    // The collector can see the last message before the bridge has read the target's PUBACK
    // for it, and `forwarded` counts acknowledged messages: give the ack a moment.
    let forwarded_series = r#"mqbridge_messages_forwarded_total{route="r"}"#;
    let mut metrics = String::new();
    for _ in 0..100 {
        let (status, text) = get(&admin, "/metrics").await;
        assert_eq!(status, 200);
        metrics = text;
        if sample(&metrics, forwarded_series).is_some_and(|n| n >= 500.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let forwarded = sample(&metrics, forwarded_series);
    assert!(forwarded.is_some_and(|n| n >= 500.0), "{metrics}");
    for series in SERIES {
        assert!(metrics.contains(series), "no {series} in:\n{metrics}");
    }
    let received = sample(&metrics, r#"mqbridge_messages_received_total{route="r"}"#);
    assert!(received.is_some_and(|n| n >= 500.0), "{metrics}");
    let latencies = sample(
        &metrics,
        r#"mqbridge_forward_latency_seconds_count{route="r"}"#,
    );
    assert!(
        latencies.is_some_and(|n| n >= 500.0),
        "one latency per forwarded QoS 1 message:\n{metrics}"
    );
    for (broker, up) in [("src", 2.0), ("dst", 2.0)] {
        let series = format!(r#"mqbridge_connections_up{{broker="{broker}",route="r"}}"#);
        assert_eq!(
            sample(&metrics, &series),
            Some(up),
            "{series} in:\n{metrics}"
        );
    }
    assert_eq!(
        sample(
            &metrics,
            r#"mqbridge_messages_dropped_total{route="r",reason="refused"}"#
        ),
        Some(0.0)
    );

    dst.stop().await;
    // The pairs notice the closed connections one after the other: wait for both.
    let (_, body) = wait_readyz(&admin, 503, "not ready: 2 of 2", Duration::from_secs(15)).await;
    for pair in 0..2 {
        let line = format!("route r pair {pair}: target down (broker dst)");
        assert!(body.contains(&line), "{body}");
    }
    assert_eq!(
        get(&admin, "/healthz").await.0,
        200,
        "alive while not ready"
    );

    dst.restart().await;
    wait_readyz(&admin, 200, "ready", Duration::from_secs(40)).await;
    let metrics = get(&admin, "/metrics").await.1;
    let reconnects = sample(
        &metrics,
        r#"mqbridge_reconnects_total{broker="dst",route="r"}"#,
    );
    assert!(reconnects.is_some_and(|n| n >= 2.0), "{metrics}");

    assert!(
        bridge
            .stop(Duration::from_secs(15))
            .await
            .is_some_and(|s| s.success()),
        "{}",
        bridge.log()
    );
}

/// A target that holds the connection but acknowledges nothing: the pairs are connected, yet
/// messages wait in flight, and after `stall_timeout` the bridge is not ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connected_but_stalled_is_not_ready() {
    let src = Mosquitto::start().await;
    let mut dst = Mosquitto::start().await;
    let (cfg, admin) = config(&src, &dst, 1);
    let bridge = Bridge::start_with_env(&cfg.toml(), &[("MQBRIDGE__BRIDGE__STALL_TIMEOUT", "2s")]);
    wait_ready(&bridge, 1, 1).await;
    wait_readyz(&admin, 200, "ready", Duration::from_secs(10)).await;

    dst.pause();
    publish_numbered(src.port(), Proto::V5, |i| format!("in/{i}"), 1, 0, 10, "s").await;
    let (_, body) = wait_readyz(&admin, 503, "stalled for", Duration::from_secs(15)).await;
    assert!(body.contains("route r pair 0:"), "{body}");
    assert!(body.contains("in flight, no ack from the target"), "{body}");

    dst.resume();
    wait_readyz(&admin, 200, "ready", Duration::from_secs(40)).await;
}

/// `admin.listen` on a port another process holds: the bridge says so and exits 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_admin_port_is_a_clear_error() {
    let src = Mosquitto::start().await;
    let dst = Mosquitto::start().await;
    let (cfg, admin) = config(&src, &dst, 1);
    let _holder = std::net::TcpListener::bind(&admin).expect("bind the admin port first");
    let mut bridge = Bridge::start(&cfg.toml());
    let status = bridge.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{}", bridge.log());
    let log = bridge.log();
    assert!(
        log.contains(&format!("admin.listen: cannot listen on {admin}")),
        "{log}"
    );
    assert!(!log.contains("pair ready"), "no pair starts: {log}");
}

/// Issue #14, hole 17: an `auto` pool parks the pairs it does not need, and `/readyz` was 503
/// for ever over them ("source down"). Parked on purpose is ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auto_pool_with_parked_pairs_is_ready() {
    let src = Mosquitto::start().await;
    let dst = Mosquitto::start().await;
    let (mut cfg, admin) = config(&src, &dst, 1);
    cfg.route_extra = "pool_size = \"auto\"\npool_size_min = 1\npool_size_max = 3".into();
    let toml = cfg.toml().replace("pool_size = 1\n", "");
    let _bridge = start_ready(&toml, 1).await;
    let (_, body) = wait_readyz(&admin, 200, "ready", Duration::from_secs(15)).await;
    assert!(body.starts_with("ready: 3 pairs"), "{body}");
}
